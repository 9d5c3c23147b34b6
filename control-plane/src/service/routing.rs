//! `RoutingService`: what a data plane needs to reach a tenant. The routes carry the
//! tenant role's credentials, so this service is for data planes only: the control-plane
//! port must not be reachable by internal services.

use std::collections::HashMap;

use tenantry_proto::controlplane::v1 as pb;
use tenantry_proto::controlplane::v1::routing_service_server::RoutingService;
use tenantry_shared::TenantId;
use tonic::{Request, Response, Status};

use crate::convert::{backend_to_proto, state_to_proto};
use crate::error::{ControlPlaneError, Result};
use crate::provisioner::{postgres, sqlite_path};
use crate::registry::{Backend, Registry, TenantState, database_server, tenant};

const MAX_ROUTES_PER_CALL: usize = 1000;

pub struct RoutingApi {
    pub registry: Registry,
}

/// A tenant's route. Connection details only for tenants that serve (ACTIVE).
pub fn route_of(
    row: &tenant::Model,
    servers: &HashMap<String, database_server::Model>,
) -> Result<pb::Route> {
    let state = TenantState::parse(&row.state)?;
    let mut route = pb::Route {
        tenant_id: row.tenant_id.clone(),
        state: state_to_proto(state).into(),
        reason: row.reason.clone(),
        route_version: row.route_version,
        backend: backend_to_proto(row.backend.as_deref()).into(),
        connection: None,
        incarnation: row.create_time.timestamp_micros(),
    };
    if state != TenantState::Active {
        return Ok(route);
    }
    let (Some(server_name), Some(database_name)) = (&row.database_server, &row.database_name)
    else {
        return Ok(route);
    };
    let server = servers.get(server_name).ok_or_else(|| {
        ControlPlaneError::Internal(format!(
            "tenant {} lives on unknown server {server_name}",
            row.tenant_id
        ))
    })?;
    route.connection = Some(match Backend::parse(&server.backend)? {
        Backend::Postgres => {
            let host_port =
                postgres::host_port(&server.location).map_err(ControlPlaneError::Internal)?;
            pb::route::Connection::Postgres(pb::PostgresConnection {
                host: host_port.host,
                port: u32::from(host_port.port),
                database: database_name.clone(),
                username: row.db_username.clone().unwrap_or_default(),
                password: row.db_password.clone().unwrap_or_default(),
            })
        }
        Backend::Sqlite => pb::route::Connection::Sqlite(pb::SqliteConnection {
            path: sqlite_path(server, database_name).display().to_string(),
        }),
    });
    Ok(route)
}

impl RoutingApi {
    async fn servers(&self) -> Result<HashMap<String, database_server::Model>> {
        Ok(self
            .registry
            .list_servers()
            .await?
            .into_iter()
            .map(|server| (server.name.clone(), server))
            .collect())
    }
}

#[tonic::async_trait]
impl RoutingService for RoutingApi {
    async fn get_route(
        &self,
        request: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        let tenant_id = TenantId::parse(&request.get_ref().tenant_id)
            .map_err(|error| Status::invalid_argument(format!("tenant_id: {error}")))?;
        let row = self
            .registry
            .get_tenant(tenant_id.as_str())
            .await?
            .ok_or_else(|| Status::not_found(format!("tenant {tenant_id} does not exist")))?;
        Ok(Response::new(route_of(&row, &self.servers().await?)?))
    }

    async fn get_routes(
        &self,
        request: Request<pb::GetRoutesRequest>,
    ) -> Result<Response<pb::GetRoutesResponse>, Status> {
        let tenant_ids = request.into_inner().tenant_ids;
        if tenant_ids.len() > MAX_ROUTES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} tenant ids in one call; the limit is {MAX_ROUTES_PER_CALL}",
                tenant_ids.len()
            )));
        }
        let rows = self.registry.get_tenants(&tenant_ids).await?;
        let servers = self.servers().await?;
        let routes = rows
            .iter()
            .map(|row| route_of(row, &servers))
            .collect::<Result<Vec<_>>>()?;
        Ok(Response::new(pb::GetRoutesResponse { routes }))
    }
}
