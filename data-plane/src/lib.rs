//! Tenantry data plane: stateless. A tower layer finds the tenant of every call from
//! `x-tenant-id` and its route through the router; the SQL service runs the call on the
//! tenant's own pool from the pool manager. It talks to the control plane only over
//! gRPC (`RoutingService`) and never links it.

pub mod connection_pool;
pub mod context;
pub mod error;
pub mod pools;
pub mod router;
pub mod sql;
pub mod tenant_layer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tenantry_proto::dataplane::v1::sql_service_server::SqlServiceServer;
use tenantry_shared::config::PlaneConfig;
use tenantry_shared::grpc::{ServerHandle, incoming, shutdown_signal, with_health_and_reflection};
use tokio::net::TcpListener;
use tonic::service::Routes;

use pools::{PoolManager, PoolOptions};
use router::{Router, RouterOptions};
use sql::{SqlApi, SqlLimits};
use tenant_layer::TenantLayer;

/// Data-plane settings (TOML file, `TENANTRY_*` overrides). See README.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// gRPC address internal services call.
    pub listen_addr: SocketAddr,
    /// Where the control plane's RoutingService is.
    pub control_plane_url: String,
    /// How often cached routes are re-read from the control plane.
    pub route_refresh_interval_ms: u64,
    /// How long an id the control plane does not know is answered NOT_FOUND without
    /// asking again.
    pub unknown_tenant_ttl_ms: u64,
    /// Deadline of one call to the control plane.
    pub control_plane_timeout_ms: u64,
    /// Most connections one tenant's pool opens.
    pub max_connections_per_tenant: u32,
    /// How long a request waits for a free connection before UNAVAILABLE.
    pub pool_acquire_timeout_ms: u64,
    /// Idle connections are closed after this long.
    pub pool_idle_timeout_ms: u64,
    /// Largest Query response, in bytes.
    pub max_response_bytes: usize,
    /// Reset a PostgreSQL connection's session state (open transaction, SET, temporary
    /// tables, cursors, LISTEN, advisory locks) before another request may use it. Off
    /// saves PostgreSQL work on every request but lets one request's session state reach
    /// later requests of the same tenant (never another tenant's: pools are per tenant).
    pub postgres_session_reset: bool,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50052)),
            control_plane_url: "http://127.0.0.1:50051".to_owned(),
            route_refresh_interval_ms: 2000,
            unknown_tenant_ttl_ms: 2000,
            control_plane_timeout_ms: 3000,
            max_connections_per_tenant: 4,
            pool_acquire_timeout_ms: 5000,
            pool_idle_timeout_ms: 60_000,
            max_response_bytes: 4 * 1024 * 1024 - 64 * 1024,
            postgres_session_reset: true,
        }
    }
}

impl PlaneConfig for DataPlaneConfig {}

/// A running data plane.
pub struct DataPlane {
    pub server: ServerHandle,
    pub router: Arc<Router>,
    pub pools: Arc<PoolManager>,
}

/// Starts a data plane on `listener`.
pub async fn start(config: &DataPlaneConfig, listener: TcpListener) -> anyhow::Result<DataPlane> {
    let router = Arc::new(
        Router::new(
            &config.control_plane_url,
            RouterOptions {
                refresh_interval: Duration::from_millis(config.route_refresh_interval_ms.max(10)),
                unknown_tenant_ttl: Duration::from_millis(config.unknown_tenant_ttl_ms),
                control_plane_timeout: Duration::from_millis(
                    config.control_plane_timeout_ms.max(1),
                ),
            },
        )
        .map_err(|error| anyhow::anyhow!("{error}"))?,
    );
    let pools = Arc::new(PoolManager::new(PoolOptions {
        max_connections_per_tenant: config.max_connections_per_tenant.max(1),
        acquire_timeout: Duration::from_millis(config.pool_acquire_timeout_ms),
        idle_timeout: Duration::from_millis(config.pool_idle_timeout_ms),
        postgres_session_reset: config.postgres_session_reset,
    }));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let router = router.clone();
        let pools = pools.clone();
        let mut stop = stop_rx.clone();
        // Refresh and sweep run apart, so a slow pool close never delays route updates.
        tokio::spawn(router.clone().run_refresh_loop(stop_rx));
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = sweep.tick() => pools.close_stale(&router).await,
                }
            }
        });
    }
    let sql = SqlApi {
        pools: pools.clone(),
        limits: SqlLimits {
            max_response_bytes: config.max_response_bytes,
        },
    };
    let routes = Routes::new(
        SqlServiceServer::new(sql)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(config.max_response_bytes + 64 * 1024),
    );
    let (routes, health) =
        with_health_and_reflection(routes, &["tenantry.dataplane.v1.SqlService"])?;
    let layer = TenantLayer::new(router.clone());
    let server_pools = pools.clone();
    let server = ServerHandle::spawn(listener, move |listener, shutdown| async move {
        let served = tonic::transport::Server::builder()
            .layer(layer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming(listener), async move {
                shutdown_signal(shutdown).await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            })
            .await;
        let _ = stop_tx.send(true);
        server_pools.close_all().await;
        served.context("data plane gRPC server failed")
    })?;
    Ok(DataPlane {
        server,
        router,
        pools,
    })
}
