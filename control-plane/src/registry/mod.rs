//! The tenant registry: which tenants exist, their lifecycle state, where each one's
//! database lives and the credentials of its role; which database servers tenants can
//! live on; and an audit log of every change.
//!
//! It is stored with sea-orm in a SQLite file by default, or in PostgreSQL when given a
//! `postgres://` URL, so several control-plane replicas can share it later. Every change
//! of a tenant's route (state, placement, credentials) runs in one transaction that
//! appends an audit event and sets the tenant's `route_version` to that event's id: one
//! monotonic sequence for the whole registry.
//!
//! The API is typed and named by intent (`mark_active`, `mark_failed`, ...): callers never
//! see a sea-orm `ActiveModel`. The lifecycle rules (which state a change may start from)
//! belong to the tenant manager and the provisioner's step machine; they hand them in as
//! a check that runs inside the change's transaction, so no concurrent change slips
//! between check and write.

pub(crate) mod entities;
pub(crate) mod error;
pub(crate) mod migration;

use std::collections::HashMap;
use std::time::Duration;

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, Database, DatabaseConnection, EntityTrait,
    IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use tenantry_shared::TenantId;

pub(crate) use entities::{Backend, TenantState};
use entities::{audit_event, database_server, tenant};
use error::{DbFailure, classify};

use crate::error::{ControlPlaneError, Result};

/// A tenant as the registry holds it (tombstones included).
pub(crate) type Tenant = tenant::Model;
/// A place tenants can live: a PostgreSQL server or a SQLite directory.
pub(crate) type DatabaseServer = database_server::Model;
/// One change of a tenant or a server, as the audit log records it.
pub type AuditEvent = audit_event::Model;

/// What a new (or reused) tenant starts with.
pub(crate) struct NewTenant {
    pub display_name: String,
    /// The server the request pinned ("" if none).
    pub requested_server: String,
    pub max_connections: i32,
}

/// Where a tenant's database lives, and the credentials of its role (PostgreSQL).
pub(crate) struct Placement {
    pub server: String,
    pub backend: Backend,
    pub database_name: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A tenant's tracing override.
pub(crate) struct TracingOverride {
    /// Share of the tenant's traces kept.
    pub ratio: f64,
    pub until: chrono::DateTime<chrono::Utc>,
    /// Log level ("" for none).
    pub log_level: String,
}

/// The audit event one tenant change records.
struct Change<'a> {
    actor: &'a str,
    action: &'a str,
    detail: String,
    to_state: Option<TenantState>,
}

/// The check of a change that any state allows (the caller decided under the tenant's
/// lock already).
fn no_check(_: &Tenant) -> Result<()> {
    Ok(())
}

#[derive(Clone)]
pub(crate) struct Registry {
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
    pub(crate) async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, BUSY_TIMEOUT).await
    }

    /// `open`, with how long a SQLite statement waits for another writer's lock before
    /// it fails with SQLITE_BUSY (and `retrying` runs its transaction again).
    async fn open_with(url: &str, busy_timeout: Duration) -> Result<Self> {
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
            .map_sqlx_sqlite_opts(move |sqlite| {
                sqlite
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(busy_timeout)
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

    pub(crate) async fn close(self) {
        let _ = self.db.close().await;
    }

    // Tenants: reads.

    pub(crate) async fn get_tenant(&self, tenant_id: &TenantId) -> Result<Option<Tenant>> {
        retrying(|| tenant::Entity::find_by_id(tenant_id.to_string()).one(&self.db)).await
    }

    /// Tenants ordered by id, after `after_id`, optionally in one state.
    pub(crate) async fn list_tenants(
        &self,
        after_id: Option<&TenantId>,
        state: Option<TenantState>,
        limit: u64,
    ) -> Result<Vec<Tenant>> {
        let mut query = tenant::Entity::find().order_by_asc(tenant::Column::TenantId);
        if let Some(after_id) = after_id {
            query = query.filter(tenant::Column::TenantId.gt(after_id.as_str()));
        }
        if let Some(state) = state {
            query = query.filter(tenant::Column::State.eq(state));
        }
        let query = query.limit(limit);
        retrying(|| query.clone().all(&self.db)).await
    }

    pub(crate) async fn tenants_in_states(&self, states: &[TenantState]) -> Result<Vec<Tenant>> {
        retrying(|| {
            tenant::Entity::find()
                .filter(tenant::Column::State.is_in(states.iter().copied()))
                .order_by_asc(tenant::Column::TenantId)
                .all(&self.db)
        })
        .await
    }

    pub(crate) async fn get_tenants(&self, tenant_ids: &[TenantId]) -> Result<Vec<Tenant>> {
        retrying(|| {
            tenant::Entity::find()
                .filter(tenant::Column::TenantId.is_in(tenant_ids.iter().map(TenantId::to_string)))
                .all(&self.db)
        })
        .await
    }

    /// Tells when a route version newer than the receiver has seen commits.
    pub(crate) fn watch_committed(&self) -> tokio::sync::watch::Receiver<i64> {
        self.committed.subscribe()
    }

    /// The highest route version of any tenant (0 for an empty registry).
    pub(crate) async fn latest_route_version(&self) -> Result<i64> {
        let latest: Option<Option<i64>> = retrying(|| {
            tenant::Entity::find()
                .select_only()
                .column_as(Expr::col(tenant::Column::RouteVersion).max(), "latest")
                .into_tuple()
                .one(&self.db)
        })
        .await?;
        Ok(latest.flatten().unwrap_or(0))
    }

    /// Tenants whose route changed after `after_version`, in route-version order. Each row
    /// holds the tenant's latest state, so these are the changes since then, compacted.
    pub(crate) async fn tenants_changed_after(
        &self,
        after_version: i64,
        limit: u64,
    ) -> Result<Vec<Tenant>> {
        retrying(|| {
            tenant::Entity::find()
                .filter(tenant::Column::RouteVersion.gt(after_version))
                .order_by_asc(tenant::Column::RouteVersion)
                .limit(limit)
                .all(&self.db)
        })
        .await
    }

    /// Number of tenants on each server that still have (or are getting) a database.
    pub(crate) async fn tenant_counts(&self) -> Result<HashMap<String, i64>> {
        let rows: Vec<(Option<String>, i64)> = retrying(|| {
            tenant::Entity::find()
                .select_only()
                .column(tenant::Column::DatabaseServer)
                .column_as(Expr::col(tenant::Column::TenantId).count(), "count")
                .filter(tenant::Column::State.ne(TenantState::Deleted))
                .filter(tenant::Column::DatabaseServer.is_not_null())
                .group_by(tenant::Column::DatabaseServer)
                .into_tuple()
                .all(&self.db)
        })
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(server, count)| server.map(|server| (server, count)))
            .collect())
    }

    /// Number of tenants in each state.
    pub(crate) async fn tenant_states(&self) -> Result<HashMap<TenantState, i64>> {
        let rows: Vec<(TenantState, i64)> = retrying(|| {
            tenant::Entity::find()
                .select_only()
                .column(tenant::Column::State)
                .column_as(Expr::col(tenant::Column::TenantId).count(), "count")
                .group_by(tenant::Column::State)
                .into_tuple()
                .all(&self.db)
        })
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Audit events of one tenant, oldest first.
    #[cfg(feature = "testing")]
    pub(crate) async fn audit_events(&self, tenant_id: &str) -> Result<Vec<AuditEvent>> {
        Ok(audit_event::Entity::find()
            .filter(audit_event::Column::TenantId.eq(tenant_id))
            .order_by_asc(audit_event::Column::Id)
            .all(&self.db)
            .await?)
    }

    // Tenants: changes. Each one is one transaction with one audit event, and bumps the
    // tenant's route version.

    /// Inserts a PROVISIONING tenant. Returns `Ok(None)` when the id is already taken
    /// (by any state, tombstones included): the caller compares requests.
    pub(crate) async fn insert_provisioning(
        &self,
        tenant_id: &TenantId,
        new: NewTenant,
        actor: &str,
    ) -> Result<Option<Tenant>> {
        let _writer = self.write_lock.lock().await;
        retrying(|| self.try_insert_provisioning(tenant_id, &new, actor)).await
    }

    async fn try_insert_provisioning(
        &self,
        tenant_id: &TenantId,
        new: &NewTenant,
        actor: &str,
    ) -> Result<Option<Tenant>> {
        let txn = self.db.begin().await?;
        let exists = tenant::Entity::find_by_id(tenant_id.to_string())
            .count(&txn)
            .await?
            > 0;
        if exists {
            return Ok(None);
        }
        let now = chrono::Utc::now();
        let event = append_event(
            &txn,
            Event {
                tenant_id: Some(tenant_id.as_str()),
                database_server: None,
                actor,
                action: "create",
                from_state: None,
                to_state: Some(TenantState::Provisioning),
                detail: format!("display name {:?}", new.display_name),
            },
        )
        .await?;
        let row = tenant::ActiveModel {
            tenant_id: Set(tenant_id.to_string()),
            display_name: Set(new.display_name.clone()),
            state: Set(TenantState::Provisioning),
            reason: Set(String::new()),
            requested_server: Set(new.requested_server.clone()),
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
            Err(error) if classify(&error) == DbFailure::UniqueViolation => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        txn.commit().await?;
        self.committed.send_replace(event.id);
        Ok(Some(inserted))
    }

    /// Turns a tombstone back into a fresh PROVISIONING tenant: new request, no
    /// placement, no credentials, a new incarnation (`create_time`).
    pub(crate) async fn reuse_deleted(
        &self,
        tenant_id: &TenantId,
        new: NewTenant,
        actor: &str,
        check: impl Fn(&Tenant) -> Result<()> + Send + Sync,
    ) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "create (reusing deleted id)",
            detail: format!("display name {:?}", new.display_name),
            to_state: Some(TenantState::Provisioning),
        };
        self.change_tenant(tenant_id, change, check, |row| {
            row.display_name = Set(new.display_name.clone());
            row.requested_server = Set(new.requested_server.clone());
            row.max_connections = Set(new.max_connections);
            row.reason = Set(String::new());
            row.database_server = Set(None);
            row.backend = Set(None);
            row.database_name = Set(None);
            row.db_username = Set(None);
            row.db_password = Set(None);
            row.schema_version = Set(0);
            row.create_time = Set(chrono::Utc::now());
        })
        .await
    }

    /// FAILED back to PROVISIONING, for another run of the provisioning steps.
    pub(crate) async fn retry_provisioning(
        &self,
        tenant_id: &TenantId,
        actor: &str,
    ) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "retry provisioning",
            detail: String::new(),
            to_state: Some(TenantState::Provisioning),
        };
        self.change_tenant(tenant_id, change, no_check, |row| {
            row.reason = Set(String::new());
        })
        .await
    }

    /// Records where the tenant's database lives and its role's credentials.
    pub(crate) async fn mark_placed(
        &self,
        tenant_id: &TenantId,
        placement: Placement,
        actor: &str,
    ) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "place",
            detail: format!("on database server {}", placement.server),
            to_state: None,
        };
        self.change_tenant(tenant_id, change, no_check, |row| {
            row.database_server = Set(Some(placement.server.clone()));
            row.backend = Set(Some(placement.backend));
            row.database_name = Set(Some(placement.database_name.clone()));
            row.db_username = Set(placement.username.clone());
            row.db_password = Set(placement.password.clone());
        })
        .await
    }

    /// The tenant's database is ready at `schema_version`: it serves.
    pub(crate) async fn mark_active(
        &self,
        tenant_id: &TenantId,
        schema_version: i64,
        actor: &str,
        check: impl Fn(&Tenant) -> Result<()> + Send + Sync,
    ) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "activate",
            detail: format!("schema version {schema_version}"),
            to_state: Some(TenantState::Active),
        };
        self.change_tenant(tenant_id, change, check, |row| {
            row.schema_version = Set(schema_version);
            row.reason = Set(String::new());
        })
        .await
    }

    /// A step sequence gave up: FAILED, with the reason (recorded under `action`).
    pub(crate) async fn mark_failed(
        &self,
        tenant_id: &TenantId,
        action: &str,
        reason: String,
        actor: &str,
    ) -> Result<Tenant> {
        let change = Change {
            actor,
            action,
            detail: reason.clone(),
            to_state: Some(TenantState::Failed),
        };
        self.change_tenant(tenant_id, change, no_check, |row| {
            row.reason = Set(reason.clone());
        })
        .await
    }

    /// Deletion starts: DELETING (the tenant no longer serves).
    pub(crate) async fn mark_deleting(&self, tenant_id: &TenantId, actor: &str) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "delete",
            detail: String::new(),
            to_state: Some(TenantState::Deleting),
        };
        self.change_tenant(tenant_id, change, no_check, |row| {
            row.reason = Set(String::new());
        })
        .await
    }

    /// Database and role are gone: a DELETED tombstone, without the password.
    pub(crate) async fn mark_deleted(&self, tenant_id: &TenantId, actor: &str) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "deleted",
            detail: "database and role dropped".to_owned(),
            to_state: Some(TenantState::Deleted),
        };
        self.change_tenant(tenant_id, change, no_check, |row| {
            row.db_password = Set(None);
            row.reason = Set(String::new());
        })
        .await
    }

    /// SUSPENDED with the reason: the tenant stops serving.
    pub(crate) async fn mark_suspended(
        &self,
        tenant_id: &TenantId,
        reason: String,
        actor: &str,
        check: impl Fn(&Tenant) -> Result<()> + Send + Sync,
    ) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "suspend",
            detail: reason.clone(),
            to_state: Some(TenantState::Suspended),
        };
        self.change_tenant(tenant_id, change, check, |row| {
            row.reason = Set(reason.clone());
        })
        .await
    }

    /// ACTIVE again after a suspension.
    pub(crate) async fn mark_resumed(
        &self,
        tenant_id: &TenantId,
        actor: &str,
        check: impl Fn(&Tenant) -> Result<()> + Send + Sync,
    ) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "resume",
            detail: String::new(),
            to_state: Some(TenantState::Active),
        };
        self.change_tenant(tenant_id, change, check, |row| {
            row.reason = Set(String::new());
        })
        .await
    }

    /// Sets (or with `None` clears) the tenant's tracing override; routes carry it.
    pub(crate) async fn set_tracing(
        &self,
        tenant_id: &TenantId,
        tracing_override: Option<TracingOverride>,
        detail: String,
        actor: &str,
        check: impl Fn(&Tenant) -> Result<()> + Send + Sync,
    ) -> Result<Tenant> {
        let change = Change {
            actor,
            action: "set tracing",
            detail,
            to_state: None,
        };
        self.change_tenant(tenant_id, change, check, |row| match &tracing_override {
            Some(tracing_override) => {
                row.trace_ratio = Set(Some(tracing_override.ratio));
                row.trace_until = Set(Some(tracing_override.until));
                row.log_level =
                    Set(Some(tracing_override.log_level.clone()).filter(|l| !l.is_empty()));
            }
            None => {
                row.trace_ratio = Set(None);
                row.trace_until = Set(None);
                row.log_level = Set(None);
            }
        })
        .await
    }

    /// Applies one change to a tenant in one transaction with an audit event, and bumps
    /// its route version. `check` sees the current row and may refuse the change.
    async fn change_tenant(
        &self,
        tenant_id: &TenantId,
        change: Change<'_>,
        check: impl Fn(&Tenant) -> Result<()> + Send + Sync,
        apply: impl Fn(&mut tenant::ActiveModel) + Send + Sync,
    ) -> Result<Tenant> {
        let _writer = self.write_lock.lock().await;
        retrying(|| self.try_change_tenant(tenant_id, &change, &check, &apply)).await
    }

    async fn try_change_tenant(
        &self,
        tenant_id: &TenantId,
        change: &Change<'_>,
        check: &(impl Fn(&Tenant) -> Result<()> + Send + Sync),
        apply: &(impl Fn(&mut tenant::ActiveModel) + Send + Sync),
    ) -> Result<Tenant> {
        let txn = self.db.begin().await?;
        let current = tenant::Entity::find_by_id(tenant_id.to_string())
            .one(&txn)
            .await?
            .ok_or_else(|| ControlPlaneError::tenant_not_found(tenant_id))?;
        check(&current)?;
        let from_state = current.state;
        let mut row = current.into_active_model();
        apply(&mut row);
        let event = append_event(
            &txn,
            Event {
                tenant_id: Some(tenant_id.as_str()),
                database_server: None,
                actor: change.actor,
                action: change.action,
                from_state: Some(from_state),
                to_state: change.to_state,
                detail: change.detail.clone(),
            },
        )
        .await?;
        if let Some(to_state) = change.to_state {
            row.state = Set(to_state);
        }
        row.route_version = Set(event.id);
        row.update_time = Set(chrono::Utc::now());
        let updated = row.update(&txn).await?;
        txn.commit().await?;
        self.committed.send_replace(event.id);
        Ok(updated)
    }

    // Database servers.

    pub(crate) async fn get_server(&self, name: &str) -> Result<Option<DatabaseServer>> {
        retrying(|| database_server::Entity::find_by_id(name.to_owned()).one(&self.db)).await
    }

    pub(crate) async fn list_servers(&self) -> Result<Vec<DatabaseServer>> {
        retrying(|| {
            database_server::Entity::find()
                .order_by_asc(database_server::Column::Name)
                .all(&self.db)
        })
        .await
    }

    /// Inserts a server; `Ok(None)` when the name is taken.
    pub(crate) async fn insert_server(
        &self,
        name: &str,
        backend: Backend,
        location: &str,
        actor: &str,
    ) -> Result<Option<DatabaseServer>> {
        let _writer = self.write_lock.lock().await;
        retrying(|| self.try_insert_server(name, backend, location, actor)).await
    }

    async fn try_insert_server(
        &self,
        name: &str,
        backend: Backend,
        location: &str,
        actor: &str,
    ) -> Result<Option<DatabaseServer>> {
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
            backend: Set(backend),
            location: Set(location.to_owned()),
            create_time: Set(chrono::Utc::now()),
        };
        let inserted = match row.insert(&txn).await {
            Ok(inserted) => inserted,
            Err(error) if classify(&error) == DbFailure::UniqueViolation => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        append_event(
            &txn,
            Event {
                tenant_id: None,
                database_server: Some(name),
                actor,
                action: "register server",
                from_state: None,
                to_state: None,
                detail: format!("backend {backend}"),
            },
        )
        .await?;
        txn.commit().await?;
        Ok(Some(inserted))
    }
}

/// How long a SQLite registry statement waits for another writer's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Most runs of one registry query or transaction that meets a busy database.
const BUSY_ATTEMPTS: u32 = 12;

/// Longest `retrying` keeps running a query again (each run may itself wait up to the
/// busy timeout), so a writer never holds the write lock for minutes.
const BUSY_RETRY_FOR: Duration = Duration::from_secs(15);

/// Runs a registry query, or a whole transaction, again while the database answers that
/// another writer holds it (`DbFailure::Busy`: SQLite busy or locked past its busy
/// timeout, or a snapshot that another connection's commit made stale; a PostgreSQL
/// serialization failure or deadlock), backing off from 5 ms to 1 s. In-process writers
/// already take turns (`Registry::write_lock`), so this covers what is left: another
/// process on the same file, a connection opening while a writer commits, a checkpoint.
/// A caller sees such an error only if it lasts through 12 runs or 15 s of them (each
/// run may itself wait up to the busy timeout), so a writer never holds the write lock
/// for minutes.
async fn retrying<T, E, F, Fut>(attempt: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::result::Result<T, E>>,
    E: Into<ControlPlaneError>,
{
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(5);
    let mut runs = 1;
    loop {
        match attempt().await.map_err(Into::into) {
            Err(ControlPlaneError::Registry(error))
                if runs < BUSY_ATTEMPTS
                    && started.elapsed() < BUSY_RETRY_FOR
                    && classify(&error) == DbFailure::Busy =>
            {
                tracing::info!(%error, runs, "the registry database was busy; running the query again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
                runs += 1;
            }
            outcome => return outcome,
        }
    }
}

/// One row of the audit log.
struct Event<'a> {
    tenant_id: Option<&'a str>,
    database_server: Option<&'a str>,
    actor: &'a str,
    action: &'a str,
    from_state: Option<TenantState>,
    to_state: Option<TenantState>,
    detail: String,
}

async fn append_event<C: sea_orm::ConnectionTrait>(db: &C, event: Event<'_>) -> Result<AuditEvent> {
    let row = audit_event::ActiveModel {
        tenant_id: Set(event.tenant_id.map(str::to_owned)),
        database_server: Set(event.database_server.map(str::to_owned)),
        actor: Set(event.actor.to_owned()),
        action: Set(event.action.to_owned()),
        from_state: Set(event.from_state),
        to_state: Set(event.to_state),
        detail: Set(event.detail),
        time: Set(chrono::Utc::now()),
        ..Default::default()
    };
    Ok(row.insert(db).await?)
}

#[cfg(test)]
mod tests {
    use sea_orm::{ActiveEnum, ConnectionTrait, FromQueryResult, Iterable};

    use super::*;

    #[test]
    fn enums_keep_the_strings_registries_hold() {
        let states: Vec<String> = TenantState::iter().map(|state| state.to_value()).collect();
        assert_eq!(
            states,
            [
                "PROVISIONING",
                "ACTIVE",
                "SUSPENDED",
                "FAILED",
                "DELETING",
                "DELETED"
            ]
        );
        let backends: Vec<String> = Backend::iter().map(|backend| backend.to_value()).collect();
        assert_eq!(backends, ["postgres", "sqlite"]);
        assert_eq!(TenantState::Suspended.to_string(), "SUSPENDED");
    }

    /// A registry file of its own for one test.
    fn temp_registry_path(test: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "tenantry-registry-{test}-{}-{}.db",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ))
    }

    /// Another process holds the SQLite registry's write lock for longer than a
    /// statement's busy timeout: the change waits (its transaction runs again) and
    /// succeeds; no busy error reaches the caller.
    #[tokio::test]
    async fn a_lock_held_past_the_busy_timeout_is_waited_out() -> Result<()> {
        use sea_orm::sqlx::Connection;
        let path = temp_registry_path("busy");
        let url = path.display().to_string();
        let registry = Registry::open_with(&url, Duration::from_millis(100)).await?;
        let mut other = sea_orm::sqlx::SqliteConnection::connect(&format!("sqlite://{url}"))
            .await
            .map_err(|e| ControlPlaneError::Internal(e.to_string()))?;
        sea_orm::sqlx::raw_sql("BEGIN EXCLUSIVE")
            .execute(&mut other)
            .await
            .map_err(|e| ControlPlaneError::Internal(e.to_string()))?;
        let holder = tokio::spawn(async move {
            // Ten busy timeouts.
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let _ = sea_orm::sqlx::raw_sql("COMMIT").execute(&mut other).await;
            other
        });
        let inserted = registry
            .insert_server("busy", Backend::Sqlite, "/tmp", "test")
            .await?;
        assert!(inserted.is_some());
        drop(holder.await);
        registry.close().await;
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    /// A registry written before the enums existed (plain strings) reads unchanged.
    #[tokio::test]
    async fn reads_rows_written_as_plain_strings() -> Result<()> {
        let path = temp_registry_path("strings");
        let registry = Registry::open(&path.display().to_string()).await?;
        registry
            .db
            .execute_unprepared(
                "INSERT INTO database_servers (name, backend, location, create_time) \
                 VALUES ('local', 'sqlite', '/tmp', '2026-01-01T00:00:00Z'); \
                 INSERT INTO tenants (tenant_id, display_name, state, reason, requested_server, \
                 database_server, backend, database_name, route_version, schema_version, \
                 create_time, update_time, max_connections) \
                 VALUES ('acme', 'Acme', 'SUSPENDED', 'unpaid', '', 'local', 'sqlite', \
                 'acme.sqlite3', 7, 0, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z', 0)",
            )
            .await?;
        let acme =
            TenantId::parse("acme").map_err(|e| ControlPlaneError::Internal(e.to_string()))?;
        let tenant = registry.get_tenant(&acme).await?;
        assert_eq!(
            tenant.map(|t| (t.state, t.backend)),
            Some((TenantState::Suspended, Some(Backend::Sqlite)))
        );
        let suspended = registry
            .list_tenants(None, Some(TenantState::Suspended), 10)
            .await?;
        assert_eq!(suspended.len(), 1);
        assert!(
            registry
                .list_tenants(None, Some(TenantState::Active), 10)
                .await?
                .is_empty()
        );
        assert_eq!(
            registry.tenant_states().await?.get(&TenantState::Suspended),
            Some(&1)
        );
        assert_eq!(
            registry.get_server("local").await?.map(|s| s.backend),
            Some(Backend::Sqlite)
        );
        // A change writes the same strings back.
        let resumed = registry.mark_resumed(&acme, "test", |_| Ok(())).await?;
        assert_eq!(resumed.state, TenantState::Active);
        let stored = StoredState::find_by_statement(sea_orm::Statement::from_string(
            registry.db.get_database_backend(),
            "SELECT state FROM tenants WHERE tenant_id = 'acme'",
        ))
        .one(&registry.db)
        .await?
        .map(|row| row.state);
        assert_eq!(stored.as_deref(), Some("ACTIVE"));
        registry.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        Ok(())
    }

    #[derive(FromQueryResult)]
    struct StoredState {
        state: String,
    }
}
