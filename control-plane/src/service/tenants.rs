//! `TenantService`: create, read, list, suspend, resume and delete tenants, translated
//! to the tenant manager.

use std::sync::Arc;

use tenantry_proto::controlplane::v1 as pb;
use tenantry_proto::controlplane::v1::tenant_service_server::TenantService;
use tenantry_shared::TenantId;
use tonic::{Request, Response, Status};

use super::{actor, parse_tenant_id, record_tenant};
use crate::convert::{state_filter, tenant_to_proto};
use crate::domain::tenants::{CreateTenant, SetTracing, TenantManager};
use crate::error::ControlPlaneError;

const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;

pub(crate) struct TenantApi {
    tenants: Arc<TenantManager>,
}

impl TenantApi {
    pub(crate) fn new(tenants: Arc<TenantManager>) -> Self {
        Self { tenants }
    }
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
        record_tenant(&tenant_id);
        let create = CreateTenant {
            tenant_id,
            display_name: request.display_name,
            database_server: request.database_server,
            max_connections: request.max_connections,
            reuse_deleted_id: request.reuse_deleted_id,
        };
        let tenant = self.tenants.create(create, &actor).await?;
        Ok(Response::new(tenant_to_proto(&tenant)))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let tenant_id = parse_tenant_id(&request.get_ref().tenant_id)?;
        record_tenant(&tenant_id);
        let tenant = self.tenants.get(&tenant_id).await?;
        Ok(Response::new(tenant_to_proto(&tenant)))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size < 0 => {
                return Err(ControlPlaneError::InvalidArgument(
                    "page_size must not be negative".to_owned(),
                )
                .into());
            }
            size => size.min(MAX_PAGE_SIZE),
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(TenantId::parse(&request.page_token).map_err(|_| {
                ControlPlaneError::InvalidArgument(
                    "page_token is not one this server issued; pass next_page_token from the previous response"
                        .to_owned(),
                )
            })?)
        };
        let state = pb::TenantState::try_from(request.state).map_err(|_| {
            ControlPlaneError::InvalidArgument(format!(
                "state {} is not a TenantState",
                request.state
            ))
        })?;
        // One more than a page: whether there is a next page.
        let limit = u64::try_from(page_size).unwrap_or(100) + 1;
        let mut tenants = self
            .tenants
            .list(after.as_ref(), state_filter(state), limit)
            .await?;
        let more = tenants.len() as u64 == limit;
        if more {
            tenants.pop();
        }
        let next_page_token = match (more, tenants.last()) {
            (true, Some(last)) => last.tenant_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: tenants.iter().map(tenant_to_proto).collect(),
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
        record_tenant(&tenant_id);
        let tenant = self
            .tenants
            .suspend(&tenant_id, request.reason, &actor)
            .await?;
        Ok(Response::new(tenant_to_proto(&tenant)))
    }

    async fn set_tenant_tracing(
        &self,
        request: Request<pb::SetTenantTracingRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let tenant_id = parse_tenant_id(&request.tenant_id)?;
        record_tenant(&tenant_id);
        let duration = request.duration.unwrap_or_default();
        let set = SetTracing {
            ratio: request.ratio,
            log_level: request.log_level,
            // Negative if either field is (the manager refuses it).
            duration: (duration.seconds >= 0 && duration.nanos >= 0)
                .then(|| std::time::Duration::new(duration.seconds as u64, duration.nanos as u32)),
        };
        let tenant = self.tenants.set_tracing(&tenant_id, set, &actor).await?;
        Ok(Response::new(tenant_to_proto(&tenant)))
    }

    async fn resume_tenant(
        &self,
        request: Request<pb::ResumeTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = actor(&request);
        let tenant_id = parse_tenant_id(&request.get_ref().tenant_id)?;
        record_tenant(&tenant_id);
        let tenant = self.tenants.resume(&tenant_id, &actor).await?;
        Ok(Response::new(tenant_to_proto(&tenant)))
    }

    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = actor(&request);
        let tenant_id = parse_tenant_id(&request.get_ref().tenant_id)?;
        record_tenant(&tenant_id);
        let tenant = self.tenants.delete(&tenant_id, &actor).await?;
        Ok(Response::new(tenant_to_proto(&tenant)))
    }
}
