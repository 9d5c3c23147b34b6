//! `DatabaseServerService`: register and list the places tenants can live.

use std::sync::Arc;

use tenantry_proto::controlplane::v1 as pb;
use tenantry_proto::controlplane::v1::database_server_service_server::DatabaseServerService;
use tenantry_shared::TenantId;
use tonic::{Request, Response, Status};

use super::actor;
use crate::convert::server_to_proto;
use crate::provisioner::Provisioner;
use crate::provisioner::postgres::PostgresServer;
use crate::registry::{Backend, Registry};

pub struct DatabaseServerApi {
    pub registry: Registry,
    pub provisioner: Arc<Provisioner>,
}

/// Checks a server's location and returns it in the form stored in the registry.
pub async fn check_location(
    location: &pb::register_database_server_request::Location,
) -> Result<(Backend, String), Status> {
    use pb::register_database_server_request::Location;
    match location {
        Location::PostgresAdminUrl(url) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(Status::invalid_argument(
                    "postgres_admin_url must look like postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                ));
            }
            let server = PostgresServer::new(url).map_err(Status::invalid_argument)?;
            let checked = server.check_privileges().await;
            server.close().await;
            checked.map_err(Status::failed_precondition)?;
            Ok((Backend::Postgres, url.clone()))
        }
        Location::SqliteDirectory(directory) => {
            if directory.is_empty() {
                return Err(Status::invalid_argument("sqlite_directory is empty"));
            }
            std::fs::create_dir_all(directory).map_err(|error| {
                Status::failed_precondition(format!("cannot create directory {directory}: {error}"))
            })?;
            let absolute = std::fs::canonicalize(directory).map_err(|error| {
                Status::failed_precondition(format!(
                    "cannot resolve directory {directory}: {error}"
                ))
            })?;
            let absolute = absolute.to_str().ok_or_else(|| {
                Status::invalid_argument(format!("directory {directory} is not valid UTF-8"))
            })?;
            Ok((Backend::Sqlite, absolute.to_owned()))
        }
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
        let name = TenantId::parse(&request.name).map_err(|error| {
            Status::invalid_argument(format!(
                "name: {}",
                error.to_string().replace("tenant id", "server name")
            ))
        })?;
        let location = request.location.ok_or_else(|| {
            Status::invalid_argument("set postgres_admin_url or sqlite_directory")
        })?;
        let (backend, stored_location) = check_location(&location).await?;
        let row = match self
            .registry
            .insert_server(name.as_str(), backend, &stored_location, &actor)
            .await?
        {
            Some(row) => row,
            None => {
                let existing = self
                    .registry
                    .get_server(name.as_str())
                    .await?
                    .ok_or_else(|| Status::aborted("server changed concurrently; retry"))?;
                if existing.backend != backend.as_str() || existing.location != stored_location {
                    return Err(Status::already_exists(format!(
                        "database server {name} is already registered with another location"
                    )));
                }
                existing
            }
        };
        let counts = self.registry.tenant_counts().await?;
        tracing::info!(server = %name, backend = backend.as_str(), %actor, "database server registered");
        Ok(Response::new(server_to_proto(
            &row,
            counts.get(&row.name).copied().unwrap_or(0),
        )))
    }

    async fn list_database_servers(
        &self,
        _request: Request<pb::ListDatabaseServersRequest>,
    ) -> Result<Response<pb::ListDatabaseServersResponse>, Status> {
        let counts = self.registry.tenant_counts().await?;
        let servers = self
            .registry
            .list_servers()
            .await?
            .iter()
            .map(|row| server_to_proto(row, counts.get(&row.name).copied().unwrap_or(0)))
            .collect();
        Ok(Response::new(pb::ListDatabaseServersResponse { servers }))
    }
}
