//! `DatabaseServerService`: register and list the places tenants can live, translated to
//! the server manager.

use tenantry_proto::controlplane::v1 as pb;
use tenantry_proto::controlplane::v1::database_server_service_server::DatabaseServerService;
use tenantry_proto::controlplane::v1::register_database_server_request::Location;
use tenantry_shared::TenantId;
use tonic::{Request, Response, Status};

use super::actor;
use crate::convert::server_to_proto;
use crate::domain::servers::{ServerLocation, ServerManager};
use crate::error::ControlPlaneError;

pub(crate) struct DatabaseServerApi {
    servers: ServerManager,
}

impl DatabaseServerApi {
    pub(crate) fn new(servers: ServerManager) -> Self {
        Self { servers }
    }
}

#[tonic::async_trait]
impl DatabaseServerService for DatabaseServerApi {
    async fn register_database_server(
        &self,
        request: Request<pb::RegisterDatabaseServerRequest>,
    ) -> Result<Response<pb::DatabaseServer>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        // Server names follow the tenant id pattern.
        let name = TenantId::parse(&request.name).map_err(|error| {
            ControlPlaneError::InvalidArgument(format!(
                "name: {}",
                error.to_string().replace("tenant id", "server name")
            ))
        })?;
        let location = match request.location {
            Some(Location::PostgresAdminUrl(url)) => ServerLocation::PostgresAdminUrl(url),
            Some(Location::SqliteDirectory(directory)) => {
                ServerLocation::SqliteDirectory(directory)
            }
            None => {
                return Err(ControlPlaneError::InvalidArgument(
                    "set postgres_admin_url or sqlite_directory".to_owned(),
                )
                .into());
            }
        };
        let (server, tenant_count) = self.servers.register(&name, location, &actor).await?;
        Ok(Response::new(server_to_proto(&server, tenant_count)))
    }

    async fn list_database_servers(
        &self,
        _request: Request<pb::ListDatabaseServersRequest>,
    ) -> Result<Response<pb::ListDatabaseServersResponse>, Status> {
        let servers = self
            .servers
            .list()
            .await?
            .iter()
            .map(|(server, tenant_count)| server_to_proto(server, *tenant_count))
            .collect();
        Ok(Response::new(pb::ListDatabaseServersResponse { servers }))
    }
}
