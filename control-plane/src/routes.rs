//! Routes: what a data plane needs to reach a tenant (the API's `Route`), built from the
//! tenant's registry row and its server, and the route feed behind WatchRoutes (a
//! snapshot or the backlog after a version, then every change as it commits).
//!
//! Routes carry the tenant role's credentials, so they are for data planes only.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tenantry_proto::controlplane::v1 as pb;
use tenantry_shared::TenantId;
use tokio_stream::wrappers::ReceiverStream;

use crate::convert::{backend_to_proto, tracing_to_proto};
use crate::error::{ControlPlaneError, Result};
use crate::location;
use crate::registry::{Backend, DatabaseServer, Registry, Tenant, TenantState};

/// Most tenants one GetRoutes call may ask for.
const MAX_ROUTES_PER_CALL: usize = 1000;
/// Routes per WatchRoutes message while sending a snapshot or backlog.
const ROUTES_PER_MESSAGE: u64 = 500;
/// How often an idle route stream looks for changes without being told of one.
const SAFETY_NET_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A stream of route messages, ending with an error if the control plane stops.
pub(crate) type RouteFeed = ReceiverStream<Result<pb::WatchRoutesResponse>>;

/// A tenant's route. Connection details only for tenants that serve (ACTIVE).
pub(crate) fn route_of(
    tenant: &Tenant,
    servers: &HashMap<String, DatabaseServer>,
) -> Result<pb::Route> {
    let mut route = pb::Route {
        tenant_id: tenant.tenant_id.clone(),
        state: pb::TenantState::from(tenant.state).into(),
        reason: tenant.reason.clone(),
        route_version: tenant.route_version,
        backend: backend_to_proto(tenant.backend).into(),
        connection: None,
        incarnation: tenant.create_time.timestamp_micros(),
        max_connections: tenant.max_connections,
        tracing: tracing_to_proto(tenant),
    };
    if tenant.state != TenantState::Active {
        return Ok(route);
    }
    let (Some(server_name), Some(database_name)) = (&tenant.database_server, &tenant.database_name)
    else {
        return Ok(route);
    };
    let server = servers.get(server_name).ok_or_else(|| {
        ControlPlaneError::Internal(format!(
            "tenant {} lives on unknown server {server_name}",
            tenant.tenant_id
        ))
    })?;
    route.connection = Some(match server.backend {
        Backend::Postgres => {
            let host_port = location::host_port(&server.location).map_err(|error| {
                ControlPlaneError::Internal(format!(
                    "the PostgreSQL admin URL is not a valid URL: {error}"
                ))
            })?;
            let ssl_mode = location::ssl_mode(&server.location).map_err(|error| {
                ControlPlaneError::Internal(format!(
                    "the PostgreSQL admin URL of server {server_name} cannot be read: {error}"
                ))
            })?;
            pb::route::Connection::Postgres(pb::PostgresConnection {
                host: host_port.host,
                port: u32::from(host_port.port),
                database: database_name.clone(),
                username: tenant.db_username.clone().unwrap_or_default(),
                password: tenant.db_password.clone().unwrap_or_default(),
                ssl_mode: ssl_mode as i32,
            })
        }
        Backend::Sqlite => pb::route::Connection::Sqlite(pb::SqliteConnection {
            path: location::database_path(&server.location, database_name)
                .display()
                .to_string(),
        }),
    });
    Ok(route)
}

/// Reads routes from the registry.
#[derive(Clone)]
pub(crate) struct RouteTable {
    registry: Registry,
    /// Fires when the control plane stops: route streams end so the server can drain.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Route streams open now.
    streams: Arc<AtomicUsize>,
}

impl RouteTable {
    pub(crate) fn new(
        registry: Registry,
        shutdown: tokio::sync::watch::Receiver<bool>,
        streams: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            registry,
            shutdown,
            streams,
        }
    }

    pub(crate) async fn route(&self, tenant_id: &TenantId) -> Result<pb::Route> {
        let tenant = self
            .registry
            .get_tenant(tenant_id)
            .await?
            .ok_or_else(|| ControlPlaneError::tenant_not_found(tenant_id))?;
        route_of(&tenant, &servers_by_name(&self.registry).await?)
    }

    /// Routes of the tenants that exist among `tenant_ids` (others are left out).
    pub(crate) async fn routes(&self, tenant_ids: &[String]) -> Result<Vec<pb::Route>> {
        if tenant_ids.len() > MAX_ROUTES_PER_CALL {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "{} tenant ids in one call; the limit is {MAX_ROUTES_PER_CALL}",
                tenant_ids.len()
            )));
        }
        // A string that is not a valid id names no tenant: the registry holds valid ids only.
        let tenant_ids: Vec<TenantId> = tenant_ids
            .iter()
            .filter_map(|raw| TenantId::parse(raw).ok())
            .collect();
        let tenants = self.registry.get_tenants(&tenant_ids).await?;
        let servers = servers_by_name(&self.registry).await?;
        tenants
            .iter()
            .map(|tenant| route_of(tenant, &servers))
            .collect()
    }

    /// Starts a route feed after `after_version` (0: a snapshot of every route).
    pub(crate) async fn watch(&self, after_version: i64) -> Result<RouteFeed> {
        if after_version < 0 {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "after_version is {after_version}; give the version of the last message applied, or 0 for a snapshot"
            )));
        }
        if *self.shutdown.borrow() {
            return Err(ControlPlaneError::Unavailable(
                "the control plane is shutting down".to_owned(),
            ));
        }
        // A version this registry has not reached comes from another (or a restored)
        // registry: the receiver's routes cannot be trusted, so it gets a snapshot.
        let latest = self.registry.latest_route_version().await?;
        let snapshot = after_version == 0 || after_version > latest;
        let from = if snapshot { 0 } else { after_version };
        let (out, receiver) = tokio::sync::mpsc::channel(4);
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        self.streams.fetch_add(1, Ordering::AcqRel);
        let open = OpenStream(self.streams.clone());
        tokio::spawn(async move {
            let _open = open;
            if let Err(error) = stream_routes(registry, from, snapshot, &out, shutdown).await {
                let _ = out.send(Err(error)).await;
            }
        });
        Ok(ReceiverStream::new(receiver))
    }
}

/// Counts an open route stream while it lives.
struct OpenStream(Arc<AtomicUsize>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends routes changed after `after_version` (all of them for a snapshot), then every
/// change as it commits, until the receiver goes away or the control plane stops.
async fn stream_routes(
    registry: Registry,
    after_version: i64,
    snapshot: bool,
    out: &tokio::sync::mpsc::Sender<Result<pb::WatchRoutesResponse>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    // Subscribe before reading, so no commit falls between the read and the wait.
    let mut committed = registry.watch_committed();
    let mut cursor = after_version;
    let mut in_snapshot = snapshot;
    let mut caught_up_once = false;
    loop {
        committed.borrow_and_update();
        loop {
            let tenants = registry
                .tenants_changed_after(cursor, ROUTES_PER_MESSAGE)
                .await?;
            let full = tenants.len() as u64 == ROUTES_PER_MESSAGE;
            if tenants.is_empty() && caught_up_once {
                break;
            }
            let servers = if tenants.is_empty() {
                HashMap::new()
            } else {
                servers_by_name(&registry).await?
            };
            let routes = tenants
                .iter()
                .map(|tenant| route_of(tenant, &servers))
                .collect::<Result<Vec<_>>>()?;
            if let Some(last) = tenants.last() {
                cursor = last.route_version;
            }
            let message = pb::WatchRoutesResponse {
                routes,
                snapshot: in_snapshot,
                caught_up: !full,
                version: cursor,
            };
            tokio::select! {
                sent = out.send(Ok(message)) => {
                    if sent.is_err() {
                        return Ok(());
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => return Err(shutting_down()),
            }
            if !full {
                in_snapshot = false;
                caught_up_once = true;
                break;
            }
        }
        tokio::select! {
            changed = committed.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return Err(shutting_down()),
            () = out.closed() => return Ok(()),
            // A safety net: a commit whose caller was cancelled between commit and
            // publication is still sent within a second.
            () = tokio::time::sleep(SAFETY_NET_INTERVAL) => {}
        }
    }
}

fn shutting_down() -> ControlPlaneError {
    ControlPlaneError::Unavailable(
        "the control plane is shutting down; resume the stream from the last version".to_owned(),
    )
}

async fn servers_by_name(registry: &Registry) -> Result<HashMap<String, DatabaseServer>> {
    Ok(registry
        .list_servers()
        .await?
        .into_iter()
        .map(|server| (server.name.clone(), server))
        .collect())
}
