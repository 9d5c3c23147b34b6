//! Database servers: the rules of registering the places tenants can live. A location
//! is checked before it is stored (a PostgreSQL admin role must be able to create roles
//! and databases; a SQLite directory must exist or be creatable, and is stored absolute).
//! Registration is idempotent on the name: the same name and location again returns the
//! server, another location is refused.

use tenantry_shared::TenantId;

use crate::error::{ControlPlaneError, Result};
use crate::provisioner::postgres::PostgresServer;
use crate::registry::{Backend, DatabaseServer, Registry};

/// Where a server is, as the caller gave it.
pub(crate) enum ServerLocation {
    PostgresAdminUrl(String),
    SqliteDirectory(String),
}

/// Checks a server's location and returns it in the form stored in the registry.
pub(crate) async fn check_location(location: &ServerLocation) -> Result<(Backend, String)> {
    match location {
        ServerLocation::PostgresAdminUrl(url) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ControlPlaneError::InvalidArgument(
                    "postgres_admin_url must look like postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                        .to_owned(),
                ));
            }
            let server =
                PostgresServer::new(url).map_err(|error| error.into_registration_error())?;
            let checked = server.check_privileges().await;
            server.close().await;
            checked.map_err(|error| error.into_registration_error())?;
            Ok((Backend::Postgres, url.clone()))
        }
        ServerLocation::SqliteDirectory(directory) => {
            if directory.is_empty() {
                return Err(ControlPlaneError::InvalidArgument(
                    "sqlite_directory is empty".to_owned(),
                ));
            }
            std::fs::create_dir_all(directory).map_err(|error| {
                ControlPlaneError::FailedPrecondition(format!(
                    "cannot create directory {directory}: {error}"
                ))
            })?;
            let absolute = std::fs::canonicalize(directory).map_err(|error| {
                ControlPlaneError::FailedPrecondition(format!(
                    "cannot resolve directory {directory}: {error}"
                ))
            })?;
            let absolute = absolute.to_str().ok_or_else(|| {
                ControlPlaneError::InvalidArgument(format!(
                    "directory {directory} is not valid UTF-8"
                ))
            })?;
            Ok((Backend::Sqlite, absolute.to_owned()))
        }
    }
}

pub(crate) struct ServerManager {
    registry: Registry,
}

impl ServerManager {
    pub(crate) fn new(registry: Registry) -> Self {
        Self { registry }
    }

    /// Registers a server (or, repeated, returns it) with its tenant count. Server names
    /// follow the tenant id pattern, so they arrive parsed as one.
    pub(crate) async fn register(
        &self,
        name: &TenantId,
        location: ServerLocation,
        actor: &str,
    ) -> Result<(DatabaseServer, i64)> {
        let (backend, stored_location) = check_location(&location).await?;
        let server = match self
            .registry
            .insert_server(name.as_str(), backend, &stored_location, actor)
            .await?
        {
            Some(server) => server,
            None => {
                let existing = self
                    .registry
                    .get_server(name.as_str())
                    .await?
                    .ok_or_else(|| {
                        ControlPlaneError::Aborted("server changed concurrently; retry".to_owned())
                    })?;
                if existing.backend != backend || existing.location != stored_location {
                    return Err(ControlPlaneError::AlreadyExists(format!(
                        "database server {name} is already registered with another location"
                    )));
                }
                existing
            }
        };
        let counts = self.registry.tenant_counts().await?;
        tracing::info!(server = %name, %backend, %actor, "database server registered");
        let tenant_count = counts.get(&server.name).copied().unwrap_or(0);
        Ok((server, tenant_count))
    }

    /// Every server, by name, with its tenant count.
    pub(crate) async fn list(&self) -> Result<Vec<(DatabaseServer, i64)>> {
        let counts = self.registry.tenant_counts().await?;
        Ok(self
            .registry
            .list_servers()
            .await?
            .into_iter()
            .map(|server| {
                let tenant_count = counts.get(&server.name).copied().unwrap_or(0);
                (server, tenant_count)
            })
            .collect())
    }
}
