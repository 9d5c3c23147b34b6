//! Provisioning and deletion of tenant databases, as sequences of idempotent steps.
//!
//! Provisioning: place the tenant on a server, create its role, create its database,
//! lock the database down, apply the tenant migrations, mark it ACTIVE. Deletion: mark
//! it DELETING, drop the database, drop the role, keep a DELETED tombstone. Every step
//! can be re-run after a crash, so the reconciler resumes a tenant left half-way by just
//! running the whole sequence again. A step that keeps failing leaves the tenant FAILED
//! with the reason.

pub mod postgres;
pub mod sqlite;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use dashmap::DashMap;
use rand::Rng;
use rand::distr::Alphanumeric;
use sea_orm::Set;
use sqlx::migrate::Migrator;
use tenantry_shared::TenantId;

use crate::error::{ControlPlaneError, Result};
use crate::registry::{Backend, Registry, TenantChange, TenantState, database_server, tenant};
use postgres::PostgresServer;

/// One step of provisioning or deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Place,
    CreateRole,
    CreateDatabase,
    LockDown,
    Migrate,
    Activate,
    DropDatabase,
    DropRole,
    MarkDeleted,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Place => "place",
            Self::CreateRole => "create role",
            Self::CreateDatabase => "create database",
            Self::LockDown => "lock down database",
            Self::Migrate => "apply tenant migrations",
            Self::Activate => "activate",
            Self::DropDatabase => "drop database",
            Self::DropRole => "drop role",
            Self::MarkDeleted => "mark deleted",
        })
    }
}

/// A provisioning step's span, a child of the CreateTenant call that started it.
fn step_span(step: Step, tenant_id: &str) -> tracing::Span {
    tracing::info_span!(
        "provisioning step",
        otel.name = %format!("provision: {step}"),
        step = %step,
        tenant.id = tenant_id,
    )
}

/// Test hooks that break provisioning on purpose. Not part of the config file.
#[derive(Clone, Debug, Default)]
pub struct FaultInjection {
    /// Stop before this step as if the process had died: the tenant is left as it is.
    pub crash_before: Option<Step>,
    /// Make this step fail every time it runs.
    pub fail_step: Option<Step>,
}

/// The two step sequences, for messages and the audit log.
#[derive(Clone, Copy)]
enum Sequence {
    Provisioning,
    Deletion,
}

impl Sequence {
    fn noun(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Deletion => "deletion",
        }
    }

    fn failed_action(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning failed",
            Self::Deletion => "deletion failed",
        }
    }

    fn retry_hint(self) -> &'static str {
        match self {
            Self::Provisioning => "retry CreateTenant, or DeleteTenant to clean up",
            Self::Deletion => "retry DeleteTenant",
        }
    }
}

/// Why a run of steps stopped.
enum StepError {
    /// The process "died" (fault injection): leave the registry as it is.
    Crashed(Step),
    Failed {
        step: Step,
        message: String,
    },
}

fn failed(step: Step) -> impl FnOnce(String) -> StepError {
    move |message| StepError::Failed { step, message }
}

fn failed_sql(step: Step) -> impl FnOnce(sqlx::Error) -> StepError {
    move |error| StepError::Failed {
        step,
        message: error.to_string(),
    }
}

fn failed_registry(step: Step) -> impl FnOnce(ControlPlaneError) -> StepError {
    move |error| StepError::Failed {
        step,
        message: error.to_string(),
    }
}

pub struct ProvisionerOptions {
    /// Tenant migrations (sqlx format: `NNNN_description.sql`) applied to every new
    /// tenant database.
    pub tenant_migrations: Option<Arc<Migrator>>,
    /// How many times a failing sequence is tried before the tenant is FAILED.
    pub attempts: u32,
    /// Pause before the second attempt; doubles after each one.
    pub retry_delay: Duration,
    pub faults: FaultInjection,
}

pub struct Provisioner {
    registry: Registry,
    options: ProvisionerOptions,
    postgres_servers: DashMap<String, Arc<PostgresServer>>,
    tenant_locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl Provisioner {
    pub fn new(registry: Registry, options: ProvisionerOptions) -> Self {
        Self {
            registry,
            options,
            postgres_servers: DashMap::new(),
            tenant_locks: DashMap::new(),
        }
    }

    /// Admin access to a registered PostgreSQL server, opened once.
    pub fn postgres_server(
        &self,
        server: &database_server::Model,
    ) -> Result<Arc<PostgresServer>, String> {
        if let Some(existing) = self.postgres_servers.get(&server.name) {
            return Ok(existing.clone());
        }
        let opened = Arc::new(PostgresServer::new(&server.location)?);
        Ok(self
            .postgres_servers
            .entry(server.name.clone())
            .or_insert(opened)
            .clone())
    }

    async fn lock_tenant(&self, tenant_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .tenant_locks
            .entry(tenant_id.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Turns a DELETED tombstone back into a fresh PROVISIONING tenant (reuse of a
    /// deleted id on purpose). Under the tenant's lock and only from DELETED, so two
    /// concurrent reuses or a late delete cannot undo each other's work.
    pub async fn reset_deleted_for_reuse(
        &self,
        tenant_id: &TenantId,
        actor: &str,
        display_name: &str,
        requested_server: &str,
        max_connections: i32,
    ) -> Result<tenant::Model> {
        let _guard = self.lock_tenant(tenant_id.as_str()).await;
        self.registry
            .update_tenant(
                tenant_id.as_str(),
                TenantChange {
                    actor,
                    action: "create (reusing deleted id)",
                    detail: format!("display name {display_name:?}"),
                    to_state: Some(TenantState::Provisioning),
                },
                |row_now, row| {
                    if row_now.state != TenantState::Deleted.as_str() {
                        return Err(ControlPlaneError::FailedPrecondition(format!(
                            "tenant {} is {}, no longer DELETED; retry the call",
                            row_now.tenant_id, row_now.state
                        )));
                    }
                    row.display_name = Set(display_name.to_owned());
                    row.requested_server = Set(requested_server.to_owned());
                    row.max_connections = Set(max_connections);
                    row.reason = Set(String::new());
                    row.database_server = Set(None);
                    row.backend = Set(None);
                    row.database_name = Set(None);
                    row.db_username = Set(None);
                    row.db_password = Set(None);
                    row.schema_version = Set(0);
                    row.create_time = Set(chrono::Utc::now());
                    Ok(())
                },
            )
            .await
    }

    /// Drives a tenant from PROVISIONING (or FAILED) to ACTIVE. Returns the tenant as it
    /// ends: ACTIVE, or FAILED with the reason.
    pub async fn provision(&self, tenant_id: &TenantId, actor: &str) -> Result<tenant::Model> {
        let _guard = self.lock_tenant(tenant_id.as_str()).await;
        let current = self.get(tenant_id).await?;
        match TenantState::parse(&current.state)? {
            TenantState::Provisioning => {}
            TenantState::Failed => {
                self.registry
                    .update_tenant(
                        tenant_id.as_str(),
                        TenantChange {
                            actor,
                            action: "retry provisioning",
                            detail: String::new(),
                            to_state: Some(TenantState::Provisioning),
                        },
                        |_, row| {
                            row.reason = Set(String::new());
                            Ok(())
                        },
                    )
                    .await?;
            }
            _ => return Ok(current),
        }
        self.with_retries(tenant_id, actor, Sequence::Provisioning, || async {
            let current = self
                .get(tenant_id)
                .await
                .map_err(failed_registry(Step::Place))?;
            self.run_provision_steps(current, actor).await
        })
        .await
    }

    /// Runs `attempt` until it succeeds, up to `attempts` times with a doubling pause.
    /// An injected crash stops at once and leaves the registry as it is; a sequence that
    /// keeps failing leaves the tenant FAILED with the step and the error as its reason.
    async fn with_retries<F, Fut>(
        &self,
        tenant_id: &TenantId,
        actor: &str,
        sequence: Sequence,
        mut attempt: F,
    ) -> Result<tenant::Model>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tenant::Model, StepError>>,
    {
        let attempts = self.options.attempts.max(1);
        let mut delay = self.options.retry_delay;
        let mut last_failure = None;
        for attempt_number in 1..=attempts {
            match attempt().await {
                Ok(done) => return Ok(done),
                Err(StepError::Crashed(step)) => {
                    return Err(ControlPlaneError::Unavailable(format!(
                        "{} of tenant {tenant_id} stopped before step '{step}' (injected crash)",
                        sequence.noun()
                    )));
                }
                Err(StepError::Failed { step, message }) => {
                    tracing::warn!(tenant.id = %tenant_id, %step, attempt = attempt_number, error = %message, "{} step failed", sequence.noun());
                    last_failure = Some((step, message));
                    if attempt_number < attempts {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        }
        let (step, message) = last_failure.unwrap_or((Step::Place, "no attempt ran".to_owned()));
        let reason = format!(
            "{} step '{step}' failed {attempts} times: {message}; {}",
            sequence.noun(),
            sequence.retry_hint()
        );
        self.registry
            .update_tenant(
                tenant_id.as_str(),
                TenantChange {
                    actor,
                    action: sequence.failed_action(),
                    detail: reason.clone(),
                    to_state: Some(TenantState::Failed),
                },
                |_, row| {
                    row.reason = Set(reason.clone());
                    Ok(())
                },
            )
            .await
    }

    fn checkpoint(&self, step: Step) -> Result<(), StepError> {
        if self.options.faults.crash_before == Some(step) {
            return Err(StepError::Crashed(step));
        }
        if self.options.faults.fail_step == Some(step) {
            return Err(StepError::Failed {
                step,
                message: "injected failure".to_owned(),
            });
        }
        Ok(())
    }

    async fn run_provision_steps(
        &self,
        mut current: tenant::Model,
        actor: &str,
    ) -> Result<tenant::Model, StepError> {
        let tenant_id = current.tenant_id.clone();
        if current.database_server.is_none() {
            self.checkpoint(Step::Place)?;
            current = self
                .place(&current, actor)
                .instrument(step_span(Step::Place, &tenant_id))
                .await
                .map_err(failed(Step::Place))?;
        }
        let server = self
            .server_of(&current)
            .instrument(step_span(Step::Place, &tenant_id))
            .await
            .map_err(failed(Step::Place))?;
        let database_name = current.database_name.clone().unwrap_or_default();
        let schema_version =
            match Backend::parse(&server.backend).map_err(failed_registry(Step::Place))? {
                Backend::Postgres => {
                    let admin = self.postgres_server(&server).map_err(failed(Step::Place))?;
                    let role = current.db_username.clone().unwrap_or_default();
                    let password = current.db_password.clone().unwrap_or_default();
                    self.checkpoint(Step::CreateRole)?;
                    admin
                        .ensure_role(&role, &password)
                        .instrument(step_span(Step::CreateRole, &tenant_id))
                        .await
                        .map_err(failed_sql(Step::CreateRole))?;
                    self.checkpoint(Step::CreateDatabase)?;
                    admin
                        .ensure_database(&database_name, &role)
                        .instrument(step_span(Step::CreateDatabase, &tenant_id))
                        .await
                        .map_err(failed_sql(Step::CreateDatabase))?;
                    self.checkpoint(Step::LockDown)?;
                    admin
                        .lock_down(&database_name, &role)
                        .instrument(step_span(Step::LockDown, &tenant_id))
                        .await
                        .map_err(failed_sql(Step::LockDown))?;
                    self.checkpoint(Step::Migrate)?;
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(1)
                        .connect_with(admin.tenant_options(&database_name, &role, &password))
                        .instrument(step_span(Step::Migrate, &tenant_id))
                        .await
                        .map_err(failed_sql(Step::Migrate))?;
                    let migrated = self.migrate(&pool).await;
                    pool.close().await;
                    migrated.map_err(failed(Step::Migrate))?
                }
                Backend::Sqlite => {
                    let path = sqlite_path(&server, &database_name);
                    self.checkpoint(Step::CreateDatabase)?;
                    sqlite::ensure_database(&path)
                        .instrument(step_span(Step::CreateDatabase, &tenant_id))
                        .await
                        .map_err(failed_sql(Step::CreateDatabase))?;
                    self.checkpoint(Step::Migrate)?;
                    let pool = sqlite::open(&path)
                        .instrument(step_span(Step::Migrate, &tenant_id))
                        .await
                        .map_err(failed_sql(Step::Migrate))?;
                    let migrated = self.migrate(&pool).await;
                    pool.close().await;
                    migrated.map_err(failed(Step::Migrate))?
                }
            };
        self.checkpoint(Step::Activate)?;
        self.registry
            .update_tenant(
                &current.tenant_id,
                TenantChange {
                    actor,
                    action: "activate",
                    detail: format!("schema version {schema_version}"),
                    to_state: Some(TenantState::Active),
                },
                |row_now, row| {
                    if row_now.state != TenantState::Provisioning.as_str() {
                        return Err(ControlPlaneError::FailedPrecondition(format!(
                            "tenant {} left PROVISIONING while it was being provisioned (now {})",
                            row_now.tenant_id, row_now.state
                        )));
                    }
                    row.schema_version = Set(schema_version);
                    row.reason = Set(String::new());
                    Ok(())
                },
            )
            .instrument(step_span(Step::Activate, &tenant_id))
            .await
            .map_err(failed_registry(Step::Activate))
    }

    async fn migrate<DB>(&self, pool: &sqlx::Pool<DB>) -> Result<i64, String>
    where
        DB: sqlx::Database,
        <DB as sqlx::Database>::Connection: sqlx::migrate::Migrate,
    {
        let Some(migrator) = &self.options.tenant_migrations else {
            return Ok(0);
        };
        migrator
            .run(pool)
            .await
            .map_err(|error| error.to_string())?;
        Ok(migrator
            .iter()
            .filter(|migration| migration.migration_type.is_up_migration())
            .map(|migration| migration.version)
            .max()
            .unwrap_or(0))
    }

    async fn server_of(&self, current: &tenant::Model) -> Result<database_server::Model, String> {
        let name = current.database_server.clone().unwrap_or_default();
        self.registry
            .get_server(&name)
            .await
            .map_err(|error| error.to_string())?
            .ok_or_else(|| format!("database server {name} is not registered"))
    }

    /// Picks a server (the pinned one, or the one with the fewest tenants) and records
    /// the tenant's database name and credentials.
    async fn place(&self, current: &tenant::Model, actor: &str) -> Result<tenant::Model, String> {
        let servers = self
            .registry
            .list_servers()
            .await
            .map_err(|e| e.to_string())?;
        let server = if current.requested_server.is_empty() {
            let counts = self
                .registry
                .tenant_counts()
                .await
                .map_err(|e| e.to_string())?;
            servers
                .into_iter()
                .min_by_key(|server| {
                    (
                        counts.get(&server.name).copied().unwrap_or(0),
                        server.name.clone(),
                    )
                })
                .ok_or_else(|| "no database server is registered".to_owned())?
        } else {
            servers
                .into_iter()
                .find(|server| server.name == current.requested_server)
                .ok_or_else(|| {
                    format!(
                        "database server {} is not registered",
                        current.requested_server
                    )
                })?
        };
        let tenant_id = TenantId::parse(&current.tenant_id).map_err(|e| e.to_string())?;
        let backend = Backend::parse(&server.backend).map_err(|e| e.to_string())?;
        let (database_name, username, password) = match backend {
            Backend::Postgres => (
                format!("tenantry_{}", tenant_id.as_identifier_part()),
                Some(format!("tenantry_{}", tenant_id.as_identifier_part())),
                Some(random_password()),
            ),
            Backend::Sqlite => (format!("{tenant_id}.sqlite3"), None, None),
        };
        let server_name = server.name.clone();
        self.registry
            .update_tenant(
                &current.tenant_id,
                TenantChange {
                    actor,
                    action: "place",
                    detail: format!("on database server {server_name}"),
                    to_state: None,
                },
                |_, row| {
                    row.database_server = Set(Some(server_name.clone()));
                    row.backend = Set(Some(backend.as_str().to_owned()));
                    row.database_name = Set(Some(database_name.clone()));
                    row.db_username = Set(username.clone());
                    row.db_password = Set(password.clone());
                    Ok(())
                },
            )
            .await
            .map_err(|error| error.to_string())
    }

    /// Drops a tenant's database and role and leaves a DELETED tombstone. Returns the
    /// tenant as it ends: DELETED, or FAILED with the reason.
    pub async fn delete(&self, tenant_id: &TenantId, actor: &str) -> Result<tenant::Model> {
        let _guard = self.lock_tenant(tenant_id.as_str()).await;
        let mut current = self.get(tenant_id).await?;
        match TenantState::parse(&current.state)? {
            TenantState::Deleted => return Ok(current),
            TenantState::Deleting => {}
            _ => {
                current = self
                    .registry
                    .update_tenant(
                        tenant_id.as_str(),
                        TenantChange {
                            actor,
                            action: "delete",
                            detail: String::new(),
                            to_state: Some(TenantState::Deleting),
                        },
                        |_, row| {
                            row.reason = Set(String::new());
                            Ok(())
                        },
                    )
                    .await?;
            }
        }
        self.with_retries(tenant_id, actor, Sequence::Deletion, || {
            self.run_delete_steps(&current, actor)
        })
        .await
    }

    async fn run_delete_steps(
        &self,
        current: &tenant::Model,
        actor: &str,
    ) -> Result<tenant::Model, StepError> {
        if current.database_server.is_some() {
            let server = self
                .server_of(current)
                .await
                .map_err(failed(Step::DropDatabase))?;
            let database_name = current.database_name.clone().unwrap_or_default();
            match Backend::parse(&server.backend).map_err(failed_registry(Step::DropDatabase))? {
                Backend::Postgres => {
                    let admin = self
                        .postgres_server(&server)
                        .map_err(failed(Step::DropDatabase))?;
                    self.checkpoint(Step::DropDatabase)?;
                    admin
                        .drop_database(&database_name)
                        .await
                        .map_err(failed_sql(Step::DropDatabase))?;
                    self.checkpoint(Step::DropRole)?;
                    if let Some(role) = &current.db_username {
                        admin
                            .drop_role(role)
                            .await
                            .map_err(failed_sql(Step::DropRole))?;
                    }
                }
                Backend::Sqlite => {
                    self.checkpoint(Step::DropDatabase)?;
                    sqlite::remove_database(&sqlite_path(&server, &database_name))
                        .map_err(|error| error.to_string())
                        .map_err(failed(Step::DropDatabase))?;
                }
            }
        }
        self.checkpoint(Step::MarkDeleted)?;
        self.registry
            .update_tenant(
                &current.tenant_id,
                TenantChange {
                    actor,
                    action: "deleted",
                    detail: "database and role dropped".to_owned(),
                    to_state: Some(TenantState::Deleted),
                },
                |_, row| {
                    row.db_password = Set(None);
                    row.reason = Set(String::new());
                    Ok(())
                },
            )
            .await
            .map_err(failed_registry(Step::MarkDeleted))
    }

    async fn get(&self, tenant_id: &TenantId) -> Result<tenant::Model> {
        self.registry
            .get_tenant(tenant_id.as_str())
            .await?
            .ok_or_else(|| {
                ControlPlaneError::NotFound(format!("tenant {tenant_id} does not exist"))
            })
    }

    pub async fn close(&self) {
        // Collected first: no map guard is held across an await.
        let servers: Vec<Arc<PostgresServer>> = self
            .postgres_servers
            .iter()
            .map(|entry| entry.value().clone())
            .collect();
        for server in servers {
            server.close().await;
        }
    }
}

/// Path of a tenant's SQLite file on a SQLite server.
pub fn sqlite_path(server: &database_server::Model, database_name: &str) -> PathBuf {
    Path::new(&server.location).join(database_name)
}

/// 32 random letters and digits (about 190 bits).
fn random_password() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}
