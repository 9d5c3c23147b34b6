//! The tenant manager: the lifecycle rules of tenants.
//!
//! - CreateTenant is idempotent on the tenant id: repeating the original request returns
//!   the tenant (provisioning it further if it is PROVISIONING or FAILED); the same id
//!   with another display name, server or connection maximum is refused; so is the id
//!   of a tenant being deleted.
//! - The id of a DELETED tenant stays reserved; a request that sets `reuse_deleted_id`
//!   turns the tombstone into a fresh tenant, under the tenant's lock and only from
//!   DELETED.
//! - Transitions: only an ACTIVE tenant can be suspended and only a SUSPENDED one
//!   resumed; a DELETED tenant has no tracing override. Provisioning and deletion run in
//!   the provisioner's step machine.
//! - Route versions: every change is one registry transaction, which bumps the tenant's
//!   route version (creation, reuse, each provisioning and deletion step that changes the
//!   row, suspension, resumption, tracing override). Repeats that change nothing (suspend
//!   a SUSPENDED tenant, repeat a CreateTenant) write nothing and bump nothing, so data
//!   planes are not told of changes that did not happen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tenantry_shared::TenantId;
use tracing::Instrument;

use crate::error::{ControlPlaneError, Result};
use crate::metrics::ControlPlaneMetrics;
use crate::provisioner::Provisioner;
use crate::registry::{NewTenant, Registry, Tenant, TenantState, TracingOverride};

const MAX_DISPLAY_NAME_LEN: usize = 200;
/// Longest a tracing override may last.
const MAX_TRACING_OVERRIDE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Highest per-tenant connection maximum a CreateTenant may ask for.
const MAX_CONNECTIONS_PER_TENANT: i32 = 1000;

/// A CreateTenant request, its id already parsed.
pub(crate) struct CreateTenant {
    pub tenant_id: TenantId,
    /// "" for the tenant id.
    pub display_name: String,
    /// The server to pin the tenant to ("" to let placement choose).
    pub database_server: String,
    /// 0 for the data plane's default.
    pub max_connections: i32,
    pub reuse_deleted_id: bool,
}

/// A SetTenantTracing request.
pub(crate) struct SetTracing {
    pub ratio: f64,
    /// "" for none; any case.
    pub log_level: String,
    /// How long the override lasts; zero clears it. `None`: the request's was negative.
    pub duration: Option<Duration>,
}

pub(crate) struct TenantManager {
    registry: Registry,
    provisioner: Arc<Provisioner>,
    metrics: Arc<ControlPlaneMetrics>,
}

impl TenantManager {
    pub(crate) fn new(
        registry: Registry,
        provisioner: Arc<Provisioner>,
        metrics: Arc<ControlPlaneMetrics>,
    ) -> Self {
        Self {
            registry,
            provisioner,
            metrics,
        }
    }

    /// Creates (or, repeated, returns) a tenant and provisions it. A tenant that ends
    /// FAILED is an UNAVAILABLE error naming the reason.
    pub(crate) async fn create(&self, request: CreateTenant, actor: &str) -> Result<Tenant> {
        let tenant_id = request.tenant_id;
        let display_name = if request.display_name.is_empty() {
            tenant_id.to_string()
        } else {
            request.display_name
        };
        if display_name.len() > MAX_DISPLAY_NAME_LEN {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "display_name is {} bytes long; the limit is {MAX_DISPLAY_NAME_LEN}",
                display_name.len()
            )));
        }
        if !(0..=MAX_CONNECTIONS_PER_TENANT).contains(&request.max_connections) {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "max_connections is {}; give 1 to {MAX_CONNECTIONS_PER_TENANT}, or 0 for the data plane's default",
                request.max_connections
            )));
        }
        if !request.database_server.is_empty() {
            if self
                .registry
                .get_server(&request.database_server)
                .await?
                .is_none()
            {
                return Err(ControlPlaneError::NotFound(format!(
                    "database server {} is not registered; see `tenantry servers list`",
                    request.database_server
                )));
            }
        } else if self.registry.list_servers().await?.is_empty() {
            return Err(ControlPlaneError::FailedPrecondition(
                "no database server is registered; register one with `tenantry servers register`"
                    .to_owned(),
            ));
        }
        let new_tenant = || NewTenant {
            display_name: display_name.clone(),
            requested_server: request.database_server.clone(),
            max_connections: request.max_connections,
        };
        let inserted = self
            .registry
            .insert_provisioning(&tenant_id, new_tenant(), actor)
            .await?;
        if inserted.is_none() {
            let existing = self.registry.get_tenant(&tenant_id).await?.ok_or_else(|| {
                ControlPlaneError::Aborted("tenant changed concurrently; retry".to_owned())
            })?;
            if existing.state == TenantState::Deleted {
                if !request.reuse_deleted_id {
                    return Err(ControlPlaneError::AlreadyExists(format!(
                        "tenant id {tenant_id} belonged to a tenant that was deleted on {}; ids of deleted \
                         tenants stay reserved. Pick another id, or set reuse_deleted_id to reuse it on purpose",
                        existing.update_time.format("%Y-%m-%d %H:%M:%S UTC")
                    )));
                }
                self.reuse_deleted(&tenant_id, new_tenant(), actor).await?;
            } else if existing.display_name != display_name
                || existing.requested_server != request.database_server
                || existing.max_connections != request.max_connections
            {
                return Err(ControlPlaneError::AlreadyExists(format!(
                    "tenant {tenant_id} already exists with another display name, database server or max_connections; \
                     use another id, or repeat the original request"
                )));
            } else if existing.state == TenantState::Deleting {
                return Err(ControlPlaneError::FailedPrecondition(format!(
                    "tenant {tenant_id} is being deleted; wait for DeleteTenant to finish"
                )));
            }
        }
        // In a task of its own: a caller that gives up must not stop provisioning half-way.
        let provisioner = self.provisioner.clone();
        let started = Instant::now();
        let provisioned = tokio::spawn({
            let tenant_id = tenant_id.clone();
            let actor = actor.to_owned();
            async move { provisioner.provision(&tenant_id, &actor).await }
                .instrument(tracing::Span::current())
        })
        .await
        .map_err(|error| {
            ControlPlaneError::Internal(format!("provisioning task failed: {error}"))
        })??;
        let failed = provisioned.state == TenantState::Failed;
        self.metrics
            .provisioned(if failed { "failed" } else { "active" }, started.elapsed());
        if failed {
            tracing::warn!(reason = %provisioned.reason, "tenant provisioning failed");
            return Err(failed_error(&provisioned, "provisioning"));
        }
        tracing::info!(
            server = provisioned.database_server.as_deref().unwrap_or_default(),
            took_ms = started.elapsed().as_millis() as u64,
            "tenant active"
        );
        Ok(provisioned)
    }

    /// Turns a DELETED tombstone back into a fresh PROVISIONING tenant (reuse of a
    /// deleted id on purpose). Under the tenant's lock and only from DELETED, so two
    /// concurrent reuses or a late delete cannot undo each other's work.
    async fn reuse_deleted(
        &self,
        tenant_id: &TenantId,
        new_tenant: NewTenant,
        actor: &str,
    ) -> Result<Tenant> {
        let _guard = self.provisioner.lock_tenant(tenant_id).await;
        self.registry
            .reuse_deleted(tenant_id, new_tenant, actor, |current| {
                if current.state != TenantState::Deleted {
                    return Err(ControlPlaneError::FailedPrecondition(format!(
                        "tenant {} is {}, no longer DELETED; retry the call",
                        current.tenant_id, current.state
                    )));
                }
                Ok(())
            })
            .await
    }

    pub(crate) async fn get(&self, tenant_id: &TenantId) -> Result<Tenant> {
        self.registry
            .get_tenant(tenant_id)
            .await?
            .ok_or_else(|| ControlPlaneError::tenant_not_found(tenant_id))
    }

    /// Tenants ordered by id, after `after_id`, optionally in one state.
    pub(crate) async fn list(
        &self,
        after_id: Option<&TenantId>,
        state: Option<TenantState>,
        limit: u64,
    ) -> Result<Vec<Tenant>> {
        self.registry.list_tenants(after_id, state, limit).await
    }

    /// ACTIVE to SUSPENDED, with a reason ("" for the default one).
    pub(crate) async fn suspend(
        &self,
        tenant_id: &TenantId,
        reason: String,
        actor: &str,
    ) -> Result<Tenant> {
        let reason = if reason.is_empty() {
            "suspended by the platform team".to_owned()
        } else {
            reason
        };
        let current = self.get(tenant_id).await?;
        if current.state == TenantState::Suspended {
            return Ok(current);
        }
        let suspended = self
            .registry
            .mark_suspended(tenant_id, reason, actor, |current| {
                only_from(current, TenantState::Active, "suspended")
            })
            .await?;
        log_state_change(tenant_id, actor, TenantState::Suspended);
        Ok(suspended)
    }

    /// SUSPENDED back to ACTIVE.
    pub(crate) async fn resume(&self, tenant_id: &TenantId, actor: &str) -> Result<Tenant> {
        let current = self.get(tenant_id).await?;
        if current.state == TenantState::Active {
            return Ok(current);
        }
        let resumed = self
            .registry
            .mark_resumed(tenant_id, actor, |current| {
                only_from(current, TenantState::Suspended, "resumed")
            })
            .await?;
        log_state_change(tenant_id, actor, TenantState::Active);
        Ok(resumed)
    }

    /// Sets the tenant's tracing override (a zero duration clears it). This process's own
    /// spans of the tenant follow it too.
    pub(crate) async fn set_tracing(
        &self,
        tenant_id: &TenantId,
        request: SetTracing,
        actor: &str,
    ) -> Result<Tenant> {
        if !(0.0..=1.0).contains(&request.ratio) {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "ratio is {}; give a share of traces from 0.0 to 1.0",
                request.ratio
            )));
        }
        let log_level = request.log_level.trim().to_ascii_lowercase();
        if !log_level.is_empty() && tenantry_shared::telemetry::parse_level(&log_level).is_none() {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "log_level {:?}: use error, warn, info, debug or trace, or leave it empty",
                request.log_level
            )));
        }
        let Some(duration) = request.duration else {
            return Err(ControlPlaneError::InvalidArgument(
                "duration is negative".to_owned(),
            ));
        };
        if !duration.is_zero()
            && (duration < Duration::from_secs(1) || duration > MAX_TRACING_OVERRIDE)
        {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "duration is {duration:?}; give 1 s to 7 days, or 0 to clear the override"
            )));
        }
        let until = (!duration.is_zero()).then(|| {
            chrono::Utc::now()
                + chrono::Duration::from_std(duration).unwrap_or_else(|_| chrono::Duration::days(7))
        });
        let detail = match until {
            Some(until) => format!(
                "trace ratio {}, log level {:?}, until {}",
                request.ratio,
                log_level,
                until.to_rfc3339()
            ),
            None => "trace override cleared".to_owned(),
        };
        let tracing_override = until.map(|until| TracingOverride {
            ratio: request.ratio,
            until,
            log_level: log_level.clone(),
        });
        let updated = self
            .registry
            .set_tracing(tenant_id, tracing_override, detail, actor, |current| {
                if current.state == TenantState::Deleted {
                    return Err(ControlPlaneError::NotFound(format!(
                        "tenant {} was deleted",
                        current.tenant_id
                    )));
                }
                Ok(())
            })
            .await?;
        match until {
            Some(until) => tenantry_shared::telemetry::set_tenant_tracing(
                tenant_id.as_str(),
                request.ratio,
                &log_level,
                until.into(),
            ),
            None => tenantry_shared::telemetry::clear_tenant_tracing(tenant_id.as_str()),
        }
        Ok(updated)
    }

    /// Deletes the tenant's database and role, keeping a DELETED tombstone. A tenant that
    /// ends FAILED is an UNAVAILABLE error naming the reason.
    pub(crate) async fn delete(&self, tenant_id: &TenantId, actor: &str) -> Result<Tenant> {
        // In a task of its own: a caller that gives up must not stop deletion half-way.
        let provisioner = self.provisioner.clone();
        let deleted = tokio::spawn({
            let tenant_id = tenant_id.clone();
            let actor = actor.to_owned();
            async move { provisioner.delete(&tenant_id, &actor).await }
                .instrument(tracing::Span::current())
        })
        .await
        .map_err(|error| ControlPlaneError::Internal(format!("deletion task failed: {error}")))??;
        if deleted.state == TenantState::Failed {
            return Err(failed_error(&deleted, "deletion"));
        }
        Ok(deleted)
    }
}

/// The rule of suspend and resume: only from `from` (`done` says what the change does).
fn only_from(current: &Tenant, from: TenantState, done: &str) -> Result<()> {
    if current.state != from {
        return Err(ControlPlaneError::FailedPrecondition(format!(
            "tenant {} is {}; only a {from} tenant can be {done}",
            current.tenant_id, current.state
        )));
    }
    Ok(())
}

fn log_state_change(tenant_id: &TenantId, actor: &str, to: TenantState) {
    tracing::info!(tenant.id = %tenant_id, %actor, to = %to, "tenant state changed");
}

/// The error for a provisioning or deletion run that ended FAILED.
fn failed_error(tenant: &Tenant, what: &str) -> ControlPlaneError {
    ControlPlaneError::Unavailable(format!(
        "tenant {} is FAILED after {what}: {}",
        tenant.tenant_id, tenant.reason
    ))
}
