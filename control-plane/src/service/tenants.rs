//! `TenantService`: create, read, list, suspend, resume and delete tenants.

use std::sync::Arc;
use tracing::Instrument;

use sea_orm::Set;
use tenantry_proto::controlplane::v1 as pb;
use tenantry_proto::controlplane::v1::tenant_service_server::TenantService;
use tenantry_shared::TenantId;
use tonic::{Request, Response, Status};

use super::actor;
use crate::convert::{state_from_proto, tenant_to_proto};
use crate::error::ControlPlaneError;
use crate::provisioner::Provisioner;
use crate::registry::{NewTenant, Registry, TenantChange, TenantState};

const MAX_DISPLAY_NAME_LEN: usize = 200;
/// Longest a tracing override may last.
const MAX_TRACING_OVERRIDE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// Highest per-tenant connection maximum a CreateTenant may ask for.
const MAX_CONNECTIONS_PER_TENANT: i32 = 1000;
const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;

pub struct TenantApi {
    pub registry: Registry,
    pub provisioner: Arc<Provisioner>,
    pub metrics: Arc<crate::metrics::ControlPlaneMetrics>,
}

fn parse_tenant_id(raw: &str) -> Result<TenantId, Status> {
    TenantId::parse(raw).map_err(|error| Status::invalid_argument(format!("tenant_id: {error}")))
}

/// The response for a provisioning or deletion run that ended FAILED.
fn failed_status(tenant: &pb::Tenant, what: &str) -> Status {
    Status::unavailable(format!(
        "tenant {} is FAILED after {what}: {}",
        tenant.tenant_id, tenant.reason
    ))
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let tenant_id = parse_tenant_id(&request.tenant_id)?;
        tracing::Span::current().record("tenant.id", tenant_id.as_str());
        let display_name = if request.display_name.is_empty() {
            tenant_id.to_string()
        } else {
            request.display_name.clone()
        };
        if display_name.len() > MAX_DISPLAY_NAME_LEN {
            return Err(Status::invalid_argument(format!(
                "display_name is {} bytes long; the limit is {MAX_DISPLAY_NAME_LEN}",
                display_name.len()
            )));
        }
        if !(0..=MAX_CONNECTIONS_PER_TENANT).contains(&request.max_connections) {
            return Err(Status::invalid_argument(format!(
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
                return Err(Status::not_found(format!(
                    "database server {} is not registered; see `tenantry servers list`",
                    request.database_server
                )));
            }
        } else if self.registry.list_servers().await?.is_empty() {
            return Err(Status::failed_precondition(
                "no database server is registered; register one with `tenantry servers register`",
            ));
        }
        let inserted = self
            .registry
            .insert_tenant(
                NewTenant {
                    tenant_id: tenant_id.to_string(),
                    display_name: display_name.clone(),
                    requested_server: request.database_server.clone(),
                    max_connections: request.max_connections,
                },
                &actor,
            )
            .await?;
        if inserted.is_none() {
            let existing = self
                .registry
                .get_tenant(tenant_id.as_str())
                .await?
                .ok_or_else(|| Status::aborted("tenant changed concurrently; retry"))?;
            let state = TenantState::parse(&existing.state)?;
            if state == TenantState::Deleted {
                if !request.reuse_deleted_id {
                    return Err(Status::already_exists(format!(
                        "tenant id {tenant_id} belonged to a tenant that was deleted on {}; ids of deleted \
                         tenants stay reserved. Pick another id, or set reuse_deleted_id to reuse it on purpose",
                        existing.update_time.format("%Y-%m-%d %H:%M:%S UTC")
                    )));
                }
                self.provisioner
                    .reset_deleted_for_reuse(
                        &tenant_id,
                        &actor,
                        &display_name,
                        &request.database_server,
                        request.max_connections,
                    )
                    .await?;
            } else if existing.display_name != display_name
                || existing.requested_server != request.database_server
                || existing.max_connections != request.max_connections
            {
                return Err(Status::already_exists(format!(
                    "tenant {tenant_id} already exists with another display name, database server or max_connections; \
                     use another id, or repeat the original request"
                )));
            } else if state == TenantState::Deleting {
                return Err(Status::failed_precondition(format!(
                    "tenant {tenant_id} is being deleted; wait for DeleteTenant to finish"
                )));
            }
        }
        // In a task of its own: a caller that gives up must not stop provisioning half-way.
        let provisioner = self.provisioner.clone();
        let started = std::time::Instant::now();
        let provisioned = tokio::spawn({
            let tenant_id = tenant_id.clone();
            let actor = actor.clone();
            async move { provisioner.provision(&tenant_id, &actor).await }
                .instrument(tracing::Span::current())
        })
        .await
        .map_err(|error| Status::internal(format!("provisioning task failed: {error}")))??;
        let tenant = tenant_to_proto(&provisioned)?;
        let failed = provisioned.state == TenantState::Failed.as_str();
        self.metrics
            .provisioned(if failed { "failed" } else { "active" }, started.elapsed());
        if failed {
            tracing::warn!(reason = %provisioned.reason, "tenant provisioning failed");
            return Err(failed_status(&tenant, "provisioning"));
        }
        tracing::info!(
            server = %tenant.database_server,
            took_ms = started.elapsed().as_millis() as u64,
            "tenant active"
        );
        Ok(Response::new(tenant))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let tenant_id = parse_tenant_id(&request.get_ref().tenant_id)?;
        tracing::Span::current().record("tenant.id", tenant_id.as_str());
        let row = self
            .registry
            .get_tenant(tenant_id.as_str())
            .await?
            .ok_or_else(|| Status::not_found(format!("tenant {tenant_id} does not exist")))?;
        Ok(Response::new(tenant_to_proto(&row)?))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size < 0 => {
                return Err(Status::invalid_argument("page_size must not be negative"));
            }
            size => size.min(MAX_PAGE_SIZE),
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            let token = TenantId::parse(&request.page_token).map_err(|_| {
                Status::invalid_argument(
                    "page_token is not one this server issued; pass next_page_token from the previous response",
                )
            })?;
            Some(token.to_string())
        };
        let state_filter = pb::TenantState::try_from(request.state).map_err(|_| {
            Status::invalid_argument(format!("state {} is not a TenantState", request.state))
        })?;
        let limit = u64::try_from(page_size).unwrap_or(100) + 1;
        let mut rows = self
            .registry
            .list_tenants(after.as_deref(), state_from_proto(state_filter), limit)
            .await?;
        let more = rows.len() as u64 == limit;
        if more {
            rows.pop();
        }
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => last.tenant_id.clone(),
            _ => String::new(),
        };
        let tenants = rows
            .iter()
            .map(tenant_to_proto)
            .collect::<Result<Vec<_>, ControlPlaneError>>()?;
        Ok(Response::new(pb::ListTenantsResponse {
            tenants,
            next_page_token,
        }))
    }

    async fn suspend_tenant(
        &self,
        request: Request<pb::SuspendTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let tenant_id = parse_tenant_id(&request.tenant_id)?;
        tracing::Span::current().record("tenant.id", tenant_id.as_str());
        let reason = if request.reason.is_empty() {
            "suspended by the platform team".to_owned()
        } else {
            request.reason
        };
        let row = self
            .change_state(
                &tenant_id,
                &actor,
                TenantState::Active,
                TenantState::Suspended,
                "suspend",
                reason,
            )
            .await?;
        Ok(Response::new(tenant_to_proto(&row)?))
    }

    async fn set_tenant_tracing(
        &self,
        request: Request<pb::SetTenantTracingRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let tenant_id = parse_tenant_id(&request.tenant_id)?;
        tracing::Span::current().record("tenant.id", tenant_id.as_str());
        if !(0.0..=1.0).contains(&request.ratio) {
            return Err(Status::invalid_argument(format!(
                "ratio is {}; give a share of traces from 0.0 to 1.0",
                request.ratio
            )));
        }
        let log_level = request.log_level.trim().to_ascii_lowercase();
        if !log_level.is_empty() && tenantry_shared::telemetry::parse_level(&log_level).is_none() {
            return Err(Status::invalid_argument(format!(
                "log_level {:?}: use error, warn, info, debug or trace, or leave it empty",
                request.log_level
            )));
        }
        let duration = request.duration.unwrap_or_default();
        if duration.seconds < 0 || duration.nanos < 0 {
            return Err(Status::invalid_argument("duration is negative"));
        }
        let duration = std::time::Duration::new(duration.seconds as u64, duration.nanos as u32);
        if !duration.is_zero()
            && (duration < std::time::Duration::from_secs(1) || duration > MAX_TRACING_OVERRIDE)
        {
            return Err(Status::invalid_argument(format!(
                "duration is {:?}; give 1 s to 7 days, or 0 to clear the override",
                duration
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
        let row = self
            .registry
            .update_tenant(
                tenant_id.as_str(),
                TenantChange {
                    actor: &actor,
                    action: "set tracing",
                    detail,
                    to_state: None,
                },
                |current, row| {
                    if current.state == TenantState::Deleted.as_str() {
                        return Err(crate::error::ControlPlaneError::NotFound(format!(
                            "tenant {} was deleted",
                            current.tenant_id
                        )));
                    }
                    row.trace_ratio = Set(until.map(|_| request.ratio));
                    row.trace_until = Set(until);
                    row.log_level =
                        Set(until.and(Some(log_level.clone())).filter(|l| !l.is_empty()));
                    Ok(())
                },
            )
            .await?;
        // This process's own spans of the tenant follow the override too.
        match until {
            Some(until) => tenantry_shared::telemetry::set_tenant_tracing(
                tenant_id.as_str(),
                request.ratio,
                &log_level,
                until.into(),
            ),
            None => tenantry_shared::telemetry::clear_tenant_tracing(tenant_id.as_str()),
        }
        Ok(Response::new(tenant_to_proto(&row)?))
    }

    async fn resume_tenant(
        &self,
        request: Request<pb::ResumeTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = actor(&request);
        let tenant_id = parse_tenant_id(&request.get_ref().tenant_id)?;
        tracing::Span::current().record("tenant.id", tenant_id.as_str());
        let row = self
            .change_state(
                &tenant_id,
                &actor,
                TenantState::Suspended,
                TenantState::Active,
                "resume",
                String::new(),
            )
            .await?;
        Ok(Response::new(tenant_to_proto(&row)?))
    }

    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = actor(&request);
        let tenant_id = parse_tenant_id(&request.get_ref().tenant_id)?;
        tracing::Span::current().record("tenant.id", tenant_id.as_str());
        // In a task of its own: a caller that gives up must not stop deletion half-way.
        let provisioner = self.provisioner.clone();
        let deleted = tokio::spawn({
            let tenant_id = tenant_id.clone();
            async move { provisioner.delete(&tenant_id, &actor).await }
                .instrument(tracing::Span::current())
        })
        .await
        .map_err(|error| Status::internal(format!("deletion task failed: {error}")))??;
        let tenant = tenant_to_proto(&deleted)?;
        if deleted.state == TenantState::Failed.as_str() {
            return Err(failed_status(&tenant, "deletion"));
        }
        Ok(Response::new(tenant))
    }
}

impl TenantApi {
    /// `from` -> `to`; already in `to` is a no-op; any other state is refused.
    async fn change_state(
        &self,
        tenant_id: &TenantId,
        actor: &str,
        from: TenantState,
        to: TenantState,
        action: &str,
        reason: String,
    ) -> Result<crate::registry::tenant::Model, Status> {
        let current = self
            .registry
            .get_tenant(tenant_id.as_str())
            .await?
            .ok_or_else(|| Status::not_found(format!("tenant {tenant_id} does not exist")))?;
        if current.state == to.as_str() {
            return Ok(current);
        }
        let detail = reason.clone();
        let updated = self
            .registry
            .update_tenant(
                tenant_id.as_str(),
                TenantChange {
                    actor,
                    action,
                    detail,
                    to_state: Some(to),
                },
                |row_now, row| {
                    if row_now.state != from.as_str() {
                        return Err(ControlPlaneError::FailedPrecondition(format!(
                            "tenant {} is {}; only a {from} tenant can be {}",
                            row_now.tenant_id,
                            row_now.state,
                            if to == TenantState::Suspended {
                                "suspended"
                            } else {
                                "resumed"
                            }
                        )));
                    }
                    row.reason = Set(reason.clone());
                    Ok(())
                },
            )
            .await?;
        tracing::info!(tenant.id = %tenant_id, %actor, to = %to, "tenant state changed");
        Ok(updated)
    }
}
