//! The tenant registry: which tenants exist, their lifecycle state, where each one's
//! database lives and the credentials of its role; which database servers tenants can
//! live on; and an audit log of every change.
//!
//! It is stored with sea-orm in a SQLite file by default, or in PostgreSQL when given a
//! `postgres://` URL, so several control-plane replicas can share it later. Every change
//! of a tenant's route (state, placement, credentials) runs in one transaction that
//! appends an audit event and sets the tenant's `route_version` to that event's id: one
//! monotonic sequence for the whole registry.

pub mod entities;
pub mod migration;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, Database, DatabaseConnection, EntityTrait,
    IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

pub use entities::{audit_event, database_server, tenant};

use crate::error::{ControlPlaneError, Result};

/// Lifecycle state of a tenant, as stored in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TenantState {
    Provisioning,
    Active,
    Suspended,
    Failed,
    Deleting,
    Deleted,
}

impl TenantState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "PROVISIONING",
            Self::Active => "ACTIVE",
            Self::Suspended => "SUSPENDED",
            Self::Failed => "FAILED",
            Self::Deleting => "DELETING",
            Self::Deleted => "DELETED",
        }
    }

    pub fn parse(raw: &str) -> Result<Self> {
        Ok(match raw {
            "PROVISIONING" => Self::Provisioning,
            "ACTIVE" => Self::Active,
            "SUSPENDED" => Self::Suspended,
            "FAILED" => Self::Failed,
            "DELETING" => Self::Deleting,
            "DELETED" => Self::Deleted,
            other => {
                return Err(ControlPlaneError::Internal(format!(
                    "registry holds unknown tenant state {other:?}"
                )));
            }
        })
    }
}

impl fmt::Display for TenantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which kind of database a server provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }

    pub fn parse(raw: &str) -> Result<Self> {
        match raw {
            "postgres" => Ok(Self::Postgres),
            "sqlite" => Ok(Self::Sqlite),
            other => Err(ControlPlaneError::Internal(format!(
                "registry holds unknown backend {other:?}"
            ))),
        }
    }
}

/// What a new tenant row starts with.
pub struct NewTenant {
    pub tenant_id: String,
    pub display_name: String,
    pub requested_server: String,
    pub max_connections: i32,
}

/// A change to one tenant, recorded as one audit event.
pub struct TenantChange<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub detail: String,
    pub to_state: Option<TenantState>,
}

#[derive(Clone)]
pub struct Registry {
    db: DatabaseConnection,
    /// Serializes this process's write transactions. SQLite (WAL) lets readers run
    /// beside a writer but fails a deferred transaction that tries to write after another
    /// writer committed ("database is locked"), so writers take turns here.
    write_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The highest route version committed, published after each commit (under the write
    /// lock, so in version order). Route streams wait on it.
    committed: std::sync::Arc<tokio::sync::watch::Sender<i64>>,
}

impl Registry {
    /// Opens (creating if needed) and migrates the registry at `url`: `postgres://...`,
    /// `sqlite://PATH`, or a plain file path for SQLite.
    pub async fn open(url: &str) -> Result<Self> {
        let url = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.to_owned()
        } else if url.starts_with("sqlite:") {
            // Create the file if it is missing unless the URL says otherwise.
            match (url.contains("mode="), url.contains('?')) {
                (true, _) => url.to_owned(),
                (false, true) => format!("{url}&mode=rwc"),
                (false, false) => format!("{url}?mode=rwc"),
            }
        } else {
            let path = std::path::Path::new(url);
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|error| {
                    ControlPlaneError::InvalidArgument(format!(
                        "cannot create the registry directory {}: {error}",
                        parent.display()
                    ))
                })?;
            }
            format!("sqlite://{url}?mode=rwc")
        };
        let mut options = ConnectOptions::new(url);
        options
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .sqlx_logging(false)
            .map_sqlx_sqlite_opts(|sqlite| {
                sqlite
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
            });
        let db = Database::connect(options).await.map_err(|error| {
            ControlPlaneError::Unavailable(format!("cannot open the registry: {error}"))
        })?;
        migration::Migrator::up(&db, None).await?;
        let registry = Self {
            db,
            write_lock: Default::default(),
            committed: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let latest = registry.latest_route_version().await?;
        registry.committed.send_replace(latest);
        Ok(registry)
    }

    pub async fn close(self) {
        let _ = self.db.close().await;
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> Result<Option<tenant::Model>> {
        Ok(tenant::Entity::find_by_id(tenant_id.to_owned())
            .one(&self.db)
            .await?)
    }

    /// Tenants ordered by id, after `after_id`, optionally in one state.
    pub async fn list_tenants(
        &self,
        after_id: Option<&str>,
        state: Option<TenantState>,
        limit: u64,
    ) -> Result<Vec<tenant::Model>> {
        let mut query = tenant::Entity::find().order_by_asc(tenant::Column::TenantId);
        if let Some(after_id) = after_id {
            query = query.filter(tenant::Column::TenantId.gt(after_id));
        }
        if let Some(state) = state {
            query = query.filter(tenant::Column::State.eq(state.as_str()));
        }
        Ok(query.limit(limit).all(&self.db).await?)
    }

    pub async fn tenants_in_states(&self, states: &[TenantState]) -> Result<Vec<tenant::Model>> {
        Ok(tenant::Entity::find()
            .filter(tenant::Column::State.is_in(states.iter().map(|s| s.as_str())))
            .order_by_asc(tenant::Column::TenantId)
            .all(&self.db)
            .await?)
    }

    pub async fn get_tenants(&self, tenant_ids: &[String]) -> Result<Vec<tenant::Model>> {
        Ok(tenant::Entity::find()
            .filter(tenant::Column::TenantId.is_in(tenant_ids.iter().cloned()))
            .all(&self.db)
            .await?)
    }

    /// Inserts a PROVISIONING tenant. Returns `Ok(None)` when the id is already taken
    /// (by any state, tombstones included): the caller compares requests.
    pub async fn insert_tenant(
        &self,
        new: NewTenant,
        actor: &str,
    ) -> Result<Option<tenant::Model>> {
        let _writer = self.write_lock.lock().await;
        let txn = self.db.begin().await?;
        let exists = tenant::Entity::find_by_id(new.tenant_id.clone())
            .count(&txn)
            .await?
            > 0;
        if exists {
            return Ok(None);
        }
        let now = chrono::Utc::now();
        let event = append_event(
            &txn,
            Some(&new.tenant_id),
            None,
            actor,
            "create",
            None,
            Some(TenantState::Provisioning),
            format!("display name {:?}", new.display_name),
        )
        .await?;
        let row = tenant::ActiveModel {
            tenant_id: Set(new.tenant_id),
            display_name: Set(new.display_name),
            state: Set(TenantState::Provisioning.as_str().to_owned()),
            reason: Set(String::new()),
            requested_server: Set(new.requested_server),
            database_server: Set(None),
            backend: Set(None),
            database_name: Set(None),
            db_username: Set(None),
            db_password: Set(None),
            route_version: Set(event.id),
            schema_version: Set(0),
            max_connections: Set(new.max_connections),
            trace_ratio: Set(None),
            trace_until: Set(None),
            log_level: Set(None),
            create_time: Set(now),
            update_time: Set(now),
        };
        let inserted = match row.insert(&txn).await {
            Ok(inserted) => inserted,
            // Lost a race with a concurrent insert of the same id.
            Err(error) if is_unique_violation(&error) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        txn.commit().await?;
        self.committed.send_replace(event.id);
        Ok(Some(inserted))
    }

    /// Applies `apply` to a tenant in one transaction with an audit event, and bumps its
    /// route version. `apply` sees the current row and may refuse the change.
    pub async fn update_tenant<F>(
        &self,
        tenant_id: &str,
        change: TenantChange<'_>,
        apply: F,
    ) -> Result<tenant::Model>
    where
        F: FnOnce(&tenant::Model, &mut tenant::ActiveModel) -> Result<()>,
    {
        let _writer = self.write_lock.lock().await;
        let txn = self.db.begin().await?;
        let current = tenant::Entity::find_by_id(tenant_id.to_owned())
            .one(&txn)
            .await?
            .ok_or_else(|| {
                ControlPlaneError::NotFound(format!("tenant {tenant_id} does not exist"))
            })?;
        let mut row = current.clone().into_active_model();
        apply(&current, &mut row)?;
        let event = append_event(
            &txn,
            Some(tenant_id),
            None,
            change.actor,
            change.action,
            Some(TenantState::parse(&current.state)?),
            change.to_state,
            change.detail,
        )
        .await?;
        if let Some(to_state) = change.to_state {
            row.state = Set(to_state.as_str().to_owned());
        }
        row.route_version = Set(event.id);
        row.update_time = Set(chrono::Utc::now());
        let updated = row.update(&txn).await?;
        txn.commit().await?;
        self.committed.send_replace(event.id);
        Ok(updated)
    }

    /// Tells when a route version newer than the receiver has seen commits.
    pub fn watch_committed(&self) -> tokio::sync::watch::Receiver<i64> {
        self.committed.subscribe()
    }

    /// The highest route version of any tenant (0 for an empty registry).
    pub async fn latest_route_version(&self) -> Result<i64> {
        let latest: Option<Option<i64>> = tenant::Entity::find()
            .select_only()
            .column_as(Expr::col(tenant::Column::RouteVersion).max(), "latest")
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(latest.flatten().unwrap_or(0))
    }

    /// Tenants whose route changed after `after_version`, in route-version order. Each row
    /// holds the tenant's latest state, so these are the changes since then, compacted.
    pub async fn tenants_changed_after(
        &self,
        after_version: i64,
        limit: u64,
    ) -> Result<Vec<tenant::Model>> {
        Ok(tenant::Entity::find()
            .filter(tenant::Column::RouteVersion.gt(after_version))
            .order_by_asc(tenant::Column::RouteVersion)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    pub async fn get_server(&self, name: &str) -> Result<Option<database_server::Model>> {
        Ok(database_server::Entity::find_by_id(name.to_owned())
            .one(&self.db)
            .await?)
    }

    pub async fn list_servers(&self) -> Result<Vec<database_server::Model>> {
        Ok(database_server::Entity::find()
            .order_by_asc(database_server::Column::Name)
            .all(&self.db)
            .await?)
    }

    /// Inserts a server; `Ok(None)` when the name is taken.
    pub async fn insert_server(
        &self,
        name: &str,
        backend: Backend,
        location: &str,
        actor: &str,
    ) -> Result<Option<database_server::Model>> {
        let _writer = self.write_lock.lock().await;
        let txn = self.db.begin().await?;
        if database_server::Entity::find_by_id(name.to_owned())
            .count(&txn)
            .await?
            > 0
        {
            return Ok(None);
        }
        let row = database_server::ActiveModel {
            name: Set(name.to_owned()),
            backend: Set(backend.as_str().to_owned()),
            location: Set(location.to_owned()),
            create_time: Set(chrono::Utc::now()),
        };
        let inserted = match row.insert(&txn).await {
            Ok(inserted) => inserted,
            Err(error) if is_unique_violation(&error) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        append_event(
            &txn,
            None,
            Some(name),
            actor,
            "register server",
            None,
            None,
            format!("backend {}", backend.as_str()),
        )
        .await?;
        txn.commit().await?;
        Ok(Some(inserted))
    }

    /// Number of tenants on each server that still have (or are getting) a database.
    pub async fn tenant_counts(&self) -> Result<HashMap<String, i64>> {
        let rows: Vec<(Option<String>, i64)> = tenant::Entity::find()
            .select_only()
            .column(tenant::Column::DatabaseServer)
            .column_as(Expr::col(tenant::Column::TenantId).count(), "count")
            .filter(tenant::Column::State.ne(TenantState::Deleted.as_str()))
            .filter(tenant::Column::DatabaseServer.is_not_null())
            .group_by(tenant::Column::DatabaseServer)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(server, count)| server.map(|server| (server, count)))
            .collect())
    }

    /// Number of tenants in each state.
    pub async fn tenant_states(&self) -> Result<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = tenant::Entity::find()
            .select_only()
            .column(tenant::Column::State)
            .column_as(Expr::col(tenant::Column::TenantId).count(), "count")
            .group_by(tenant::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Audit events of one tenant, oldest first.
    pub async fn audit_events(&self, tenant_id: &str) -> Result<Vec<audit_event::Model>> {
        Ok(audit_event::Entity::find()
            .filter(audit_event::Column::TenantId.eq(tenant_id))
            .order_by_asc(audit_event::Column::Id)
            .all(&self.db)
            .await?)
    }
}

#[allow(clippy::too_many_arguments)]
async fn append_event<C: sea_orm::ConnectionTrait>(
    db: &C,
    tenant_id: Option<&str>,
    database_server: Option<&str>,
    actor: &str,
    action: &str,
    from_state: Option<TenantState>,
    to_state: Option<TenantState>,
    detail: String,
) -> Result<audit_event::Model> {
    let event = audit_event::ActiveModel {
        tenant_id: Set(tenant_id.map(str::to_owned)),
        database_server: Set(database_server.map(str::to_owned)),
        actor: Set(actor.to_owned()),
        action: Set(action.to_owned()),
        from_state: Set(from_state.map(|s| s.as_str().to_owned())),
        to_state: Set(to_state.map(|s| s.as_str().to_owned())),
        detail: Set(detail),
        time: Set(chrono::Utc::now()),
        ..Default::default()
    };
    Ok(event.insert(db).await?)
}

fn is_unique_violation(error: &sea_orm::DbErr) -> bool {
    matches!(
        error.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}
