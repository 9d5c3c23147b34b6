//! The step machine: provisioning and deletion as sequences of idempotent steps, tried
//! again with a doubling pause, and the FAILED end of a sequence that keeps failing.
//! With the `testing` feature, `FaultInjection` stops or breaks a chosen step.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use tenantry_shared::TenantId;
use tracing::Instrument;

use super::error::{ProvisionError, ProvisionResult};
use super::placement::{self, Scheduler};
use super::{Provisioner, sqlite};
use crate::error::{ControlPlaneError, Result};
use crate::registry::{Backend, DatabaseServer, Tenant, TenantState};

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

/// Test hooks that break provisioning on purpose. Not part of the config file.
#[cfg(feature = "testing")]
#[derive(Clone, Debug, Default)]
pub struct FaultInjection {
    /// Stop before this step as if the process had died: the tenant is left as it is.
    pub crash_before: Option<Step>,
    /// Make this step fail every time it runs.
    pub fail_step: Option<Step>,
}

/// A provisioning step's span, a child of the CreateTenant call that started it.
fn step_span(step: Step, tenant_id: &TenantId) -> tracing::Span {
    tracing::info_span!(
        "provisioning step",
        otel.name = %format!("provision: {step}"),
        step = %step,
        tenant.id = tenant_id.as_str(),
    )
}

/// The two step sequences, for messages and the audit log.
#[derive(Clone, Copy)]
pub(super) enum Sequence {
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
pub(super) enum StepError {
    /// The process "died" (fault injection): leave the registry as it is.
    #[cfg(feature = "testing")]
    Crashed(Step),
    Failed {
        step: Step,
        error: ProvisionError,
    },
}

/// Tags an error with the step it stopped.
fn failed<E: Into<ProvisionError>>(step: Step) -> impl FnOnce(E) -> StepError {
    move |error| StepError::Failed {
        step,
        error: error.into(),
    }
}

/// The only state a tenant may be activated from: anything else means someone changed
/// it while its steps ran.
fn still_provisioning(current: &Tenant) -> Result<()> {
    if current.state != TenantState::Provisioning {
        return Err(ControlPlaneError::FailedPrecondition(format!(
            "tenant {} left PROVISIONING while it was being provisioned (now {})",
            current.tenant_id, current.state
        )));
    }
    Ok(())
}

impl Provisioner {
    /// Runs `attempt` until it succeeds, up to `attempts` times with a doubling pause.
    /// An injected crash stops at once and leaves the registry as it is; a sequence that
    /// keeps failing leaves the tenant FAILED with the step and the error as its reason.
    pub(super) async fn with_retries<F, Fut>(
        &self,
        tenant_id: &TenantId,
        actor: &str,
        sequence: Sequence,
        mut attempt: F,
    ) -> Result<Tenant>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Tenant, StepError>>,
    {
        let attempts = self.options.attempts.max(1);
        let mut delay = self.options.retry_delay;
        let mut last_failure = None;
        for attempt_number in 1..=attempts {
            match attempt().await {
                Ok(done) => return Ok(done),
                #[cfg(feature = "testing")]
                Err(StepError::Crashed(step)) => {
                    return Err(ControlPlaneError::Unavailable(format!(
                        "{} of tenant {tenant_id} stopped before step '{step}' (injected crash)",
                        sequence.noun()
                    )));
                }
                Err(StepError::Failed { step, error }) => {
                    tracing::warn!(tenant.id = %tenant_id, %step, attempt = attempt_number, %error, "{} step failed", sequence.noun());
                    last_failure = Some((step, error.to_string()));
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
            .mark_failed(tenant_id, sequence.failed_action(), reason, actor)
            .await
    }

    /// Where fault injection stops or breaks a sequence (nothing without `testing`).
    fn checkpoint(&self, step: Step) -> Result<(), StepError> {
        #[cfg(feature = "testing")]
        {
            if self.options.faults.crash_before == Some(step) {
                return Err(StepError::Crashed(step));
            }
            if self.options.faults.fail_step == Some(step) {
                return Err(StepError::Failed {
                    step,
                    error: ProvisionError::Injected,
                });
            }
        }
        #[cfg(not(feature = "testing"))]
        let _ = step;
        Ok(())
    }

    /// One attempt at provisioning, from wherever the tenant is: place, create role and
    /// database, lock it down, migrate, activate. Steps done before are done again,
    /// harmlessly.
    pub(super) async fn run_provision_steps(
        &self,
        tenant_id: &TenantId,
        actor: &str,
    ) -> Result<Tenant, StepError> {
        let mut current = self.get(tenant_id).await.map_err(failed(Step::Place))?;
        if current.database_server.is_none() {
            self.checkpoint(Step::Place)?;
            current = self
                .place(tenant_id, &current.requested_server, actor)
                .instrument(step_span(Step::Place, tenant_id))
                .await
                .map_err(failed(Step::Place))?;
        }
        let server = self
            .server_of(&current)
            .instrument(step_span(Step::Place, tenant_id))
            .await
            .map_err(failed(Step::Place))?;
        let database_name = current.database_name.clone().unwrap_or_default();
        let schema_version = match server.backend {
            Backend::Postgres => {
                let admin = self.postgres_server(&server).map_err(failed(Step::Place))?;
                let role = current.db_username.clone().unwrap_or_default();
                let password = current.db_password.clone().unwrap_or_default();
                self.checkpoint(Step::CreateRole)?;
                admin
                    .ensure_role(&role, &password)
                    .instrument(step_span(Step::CreateRole, tenant_id))
                    .await
                    .map_err(failed(Step::CreateRole))?;
                self.checkpoint(Step::CreateDatabase)?;
                admin
                    .ensure_database(&database_name, &role)
                    .instrument(step_span(Step::CreateDatabase, tenant_id))
                    .await
                    .map_err(failed(Step::CreateDatabase))?;
                self.checkpoint(Step::LockDown)?;
                admin
                    .lock_down(&database_name, &role)
                    .instrument(step_span(Step::LockDown, tenant_id))
                    .await
                    .map_err(failed(Step::LockDown))?;
                self.checkpoint(Step::Migrate)?;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(admin.tenant_options(&database_name, &role, &password))
                    .instrument(step_span(Step::Migrate, tenant_id))
                    .await
                    .map_err(failed(Step::Migrate))?;
                let migrated = self.migrate(&pool).await;
                pool.close().await;
                migrated.map_err(failed(Step::Migrate))?
            }
            Backend::Sqlite => {
                let path = crate::location::database_path(&server.location, &database_name);
                self.checkpoint(Step::CreateDatabase)?;
                sqlite::ensure_database(&path)
                    .instrument(step_span(Step::CreateDatabase, tenant_id))
                    .await
                    .map_err(failed(Step::CreateDatabase))?;
                self.checkpoint(Step::Migrate)?;
                let pool = sqlite::open(&path)
                    .instrument(step_span(Step::Migrate, tenant_id))
                    .await
                    .map_err(failed(Step::Migrate))?;
                let migrated = self.migrate(&pool).await;
                pool.close().await;
                migrated.map_err(failed(Step::Migrate))?
            }
        };
        self.checkpoint(Step::Activate)?;
        self.registry
            .mark_active(tenant_id, schema_version, actor, still_provisioning)
            .instrument(step_span(Step::Activate, tenant_id))
            .await
            .map_err(failed(Step::Activate))
    }

    /// One attempt at deletion: drop the database and the role, keep a DELETED tombstone.
    pub(super) async fn run_delete_steps(
        &self,
        current: &Tenant,
        tenant_id: &TenantId,
        actor: &str,
    ) -> Result<Tenant, StepError> {
        if current.database_server.is_some() {
            let server = self
                .server_of(current)
                .await
                .map_err(failed(Step::DropDatabase))?;
            let database_name = current.database_name.clone().unwrap_or_default();
            match server.backend {
                Backend::Postgres => {
                    let admin = self
                        .postgres_server(&server)
                        .map_err(failed(Step::DropDatabase))?;
                    self.checkpoint(Step::DropDatabase)?;
                    admin
                        .drop_database(&database_name)
                        .await
                        .map_err(failed(Step::DropDatabase))?;
                    self.checkpoint(Step::DropRole)?;
                    if let Some(role) = &current.db_username {
                        admin
                            .drop_role(role)
                            .await
                            .map_err(failed(Step::DropRole))?;
                    }
                }
                Backend::Sqlite => {
                    self.checkpoint(Step::DropDatabase)?;
                    sqlite::remove_database(&crate::location::database_path(
                        &server.location,
                        &database_name,
                    ))
                    .map_err(failed(Step::DropDatabase))?;
                }
            }
        }
        self.checkpoint(Step::MarkDeleted)?;
        self.registry
            .mark_deleted(tenant_id, actor)
            .await
            .map_err(failed(Step::MarkDeleted))
    }

    /// Applies the tenant migrations; returns the schema version reached.
    async fn migrate<DB>(&self, pool: &sqlx::Pool<DB>) -> ProvisionResult<i64>
    where
        DB: sqlx::Database,
        <DB as sqlx::Database>::Connection: sqlx::migrate::Migrate,
    {
        let Some(migrator) = &self.options.tenant_migrations else {
            return Ok(0);
        };
        migrator.run(pool).await?;
        Ok(migrator
            .iter()
            .filter(|migration| migration.migration_type.is_up_migration())
            .map(|migration| migration.version)
            .max()
            .unwrap_or(0))
    }

    /// The place step: chooses a server and records the tenant's database name and
    /// credentials there.
    async fn place(
        &self,
        tenant_id: &TenantId,
        requested_server: &str,
        actor: &str,
    ) -> ProvisionResult<Tenant> {
        let servers = self.registry.list_servers().await?;
        let tenant_counts = if requested_server.is_empty() {
            self.registry.tenant_counts().await?
        } else {
            HashMap::new()
        };
        let server = Scheduler {
            servers,
            tenant_counts: &tenant_counts,
        }
        .choose(requested_server)?;
        let placement = placement::plan(tenant_id, &server);
        Ok(self
            .registry
            .mark_placed(tenant_id, placement, actor)
            .await?)
    }

    /// The server a placed tenant lives on.
    async fn server_of(&self, current: &Tenant) -> ProvisionResult<DatabaseServer> {
        let name = current.database_server.clone().unwrap_or_default();
        self.registry
            .get_server(&name)
            .await?
            .ok_or(ProvisionError::UnknownServer(name))
    }
}
