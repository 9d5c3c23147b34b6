//! `RoutingService`: what a data plane needs to reach a tenant. The routes carry the
//! tenant role's credentials, so this service is for data planes only: the control-plane
//! port must not be reachable by internal services.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tenantry_proto::controlplane::v1 as pb;
use tenantry_proto::controlplane::v1::routing_service_server::RoutingService;
use tenantry_shared::TenantId;
use tonic::{Request, Response, Status};

use crate::convert::{backend_to_proto, state_to_proto};
use crate::error::{ControlPlaneError, Result};
use crate::provisioner::{postgres, sqlite_path};
use crate::registry::{Backend, Registry, TenantState, database_server, tenant};

const MAX_ROUTES_PER_CALL: usize = 1000;
/// Routes per WatchRoutes message while sending a snapshot or backlog.
const ROUTES_PER_MESSAGE: u64 = 500;
/// How often an idle route stream looks for changes without being told of one.
const SAFETY_NET_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

pub struct RoutingApi {
    pub registry: Registry,
    /// Fires when the control plane stops: route streams end so the server can drain.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Route streams open now.
    pub streams: Arc<AtomicUsize>,
}

type RouteStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchRoutesResponse, Status>> + Send>>;

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
    out: &tokio::sync::mpsc::Sender<Result<pb::WatchRoutesResponse, Status>>,
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
            let rows = registry
                .tenants_changed_after(cursor, ROUTES_PER_MESSAGE)
                .await?;
            let full = rows.len() as u64 == ROUTES_PER_MESSAGE;
            if rows.is_empty() && caught_up_once {
                break;
            }
            let servers = if rows.is_empty() {
                HashMap::new()
            } else {
                servers_by_name(&registry).await?
            };
            let routes = rows
                .iter()
                .map(|row| route_of(row, &servers))
                .collect::<Result<Vec<_>>>()?;
            if let Some(last) = rows.last() {
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

async fn servers_by_name(registry: &Registry) -> Result<HashMap<String, database_server::Model>> {
    Ok(registry
        .list_servers()
        .await?
        .into_iter()
        .map(|server| (server.name.clone(), server))
        .collect())
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
        max_connections: row.max_connections,
        tracing: crate::convert::tracing_to_proto(row),
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
        servers_by_name(&self.registry).await
    }
}

#[tonic::async_trait]
impl RoutingService for RoutingApi {
    type WatchRoutesStream = RouteStream;

    async fn watch_routes(
        &self,
        request: Request<pb::WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        let after_version = request.into_inner().after_version;
        if after_version < 0 {
            return Err(Status::invalid_argument(format!(
                "after_version is {after_version}; give the version of the last message applied, or 0 for a snapshot"
            )));
        }
        if *self.shutdown.borrow() {
            return Err(Status::unavailable("the control plane is shutting down"));
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
                let _ = out.send(Err(Status::from(error))).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn get_route(
        &self,
        request: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        let tenant_id = TenantId::parse(&request.get_ref().tenant_id)
            .map_err(|error| Status::invalid_argument(format!("tenant_id: {error}")))?;
        tracing::Span::current().record("tenant.id", tenant_id.as_str());
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
