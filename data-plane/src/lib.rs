//! Tenantry data plane: stateless. A tower layer finds the tenant of every call from
//! `x-tenant-id` and its route through the router; the SQL service runs the call on the
//! tenant's own pool from the pool manager. It talks to the control plane only over
//! gRPC (`RoutingService`) and never links it.
//!
//! One folder per role, each naming only the rooms below it (checked by
//! `tests/module_dependencies.rs`):
//! - `service` (gRPC services, the metrics registry) -> `layers` (tower layers) ->
//!   `routing` (router, route stream, the `Route` rules);
//! - `service` -> `pool` (pool manager, budget, waiting queue, the `TenantPool` interface)
//!   -> `routing`; `backend` (PostgreSQL wire client, SQLite) -> `pool`, `routing`;
//! - `error` (the one error model and its one conversion to `tonic::Status`) names none.
//!
//! The public API below is what the `tenantry` binary, the tests and the benches use.

#![warn(unreachable_pub)]

mod backend;
mod error;
mod layers;
mod pool;
mod routing;
mod service;

pub use error::DataPlaneError;
pub use layers::{TenantIdLayer, TenantLayer};
pub use pool::{PoolFigures, PoolManager, ServerPoolStats, TenantPoolStats};
pub use routing::{
    ROUTE_STREAM_HEALTH_SERVICE, Route, RouteState, Router, RouterOptions, SslMode, StreamProgress,
    Target,
};
pub use service::DataPlaneMetrics;

/// Hooks for tests (feature `testing`).
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::backend::channel_bound_logins;
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tenantry_proto::dataplane::v1::pool_service_server::PoolServiceServer;
use tenantry_proto::dataplane::v1::sql_service_server::SqlServiceServer;
use tenantry_shared::config::PlaneConfig;
use tenantry_shared::grpc::{
    Drain, ServerHandle, incoming, serve_and_drain, with_health_and_reflection,
};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus as Health;

use backend::{BackendFactory, BackendOptions, TlsConfigs};
use layers::{MetricsLayer, RecordRequest};
use pool::{PoolManagerOptions, SqlLimits};
use routing::RouteListener;
use service::{PoolApi, SqlApi};

/// Data-plane settings (TOML file, `TENANTRY_*` overrides). See docs/configuration.md.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// gRPC address internal services call.
    pub listen_addr: SocketAddr,
    /// Where the control plane's RoutingService is. The data plane holds a route stream
    /// to it (`WatchRoutes`) and asks it for tenants it has not seen yet.
    pub control_plane_url: String,
    /// How long an id the control plane does not know is answered NOT_FOUND without
    /// asking again.
    pub unknown_tenant_ttl_ms: u64,
    /// Deadline of one call to the control plane.
    pub control_plane_timeout_ms: u64,
    /// Most connections one tenant's pool opens, unless the tenant's record says
    /// otherwise (`max_connections` at CreateTenant).
    pub max_connections_per_tenant: u32,
    /// Most connections this data plane holds to one PostgreSQL server, over all the
    /// pools of tenants on it. Keep the sum over data planes under the server's
    /// `max_connections`.
    pub postgres_connection_budget: u32,
    /// How long a request waits for a connection (a free one, room in the budget, and
    /// connecting) before UNAVAILABLE.
    pub pool_acquire_timeout_ms: u64,
    /// Idle connections are closed after this long; a pool with no connection and no
    /// request for this long is dropped.
    pub pool_idle_timeout_ms: u64,
    /// Largest Query response, in bytes.
    pub max_response_bytes: usize,
    /// PEM file of certificate authorities trusted for TLS to PostgreSQL servers
    /// registered with `sslmode=verify-ca` or `verify-full`, besides the system's.
    pub postgres_ssl_root_cert: Option<std::path::PathBuf>,
    /// Deadline of a SQL call that comes without one (no `grpc-timeout`), in
    /// milliseconds: its statement is cancelled then and the call answers
    /// DEADLINE_EXCEEDED. 0: such calls run until they end.
    pub default_statement_timeout_ms: u64,
    /// Reset a PostgreSQL connection's session state (open transaction, SET, temporary
    /// tables, cursors, LISTEN, advisory locks) before another request may use it. Off
    /// saves PostgreSQL work on every request but lets one request's session state reach
    /// later requests of the same tenant (never another tenant's: pools are per tenant).
    pub postgres_session_reset: bool,
    /// While every connection of a tenant's PostgreSQL pool is lent out, send the
    /// requests that wait for one together, in one write with the next request that gets
    /// a connection (each still in its own implicit transaction, reset ahead of it). Off:
    /// each waits for a connection of its own.
    pub postgres_pipelining: bool,
    /// On shutdown, how long health reports NOT_SERVING before new calls are refused.
    pub shutdown_grace_ms: u64,
    /// On shutdown, how long calls in flight get to finish.
    pub shutdown_drain_ms: u64,
    /// Prometheus endpoint (`GET /metrics`) of `tenantry data-plane`; unset: none.
    pub metrics_addr: Option<SocketAddr>,
    /// Most tenants with a `tenant` label value of their own in metrics (the busiest).
    pub metrics_tenant_limit: usize,
    /// Window over which "busiest" is counted, in milliseconds.
    pub metrics_window_ms: u64,
    /// OTLP/gRPC endpoint for traces (e.g. `http://127.0.0.1:4317`). Unset:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; neither: no traces.
    pub otlp_endpoint: Option<String>,
    /// Default share of traces kept, 0.0 to 1.0. Unset: `OTEL_TRACES_SAMPLER(_ARG)`, else 1.0.
    pub trace_sample_ratio: Option<f64>,
    /// OTLP/gRPC endpoint metrics are pushed to as well as served. Unset:
    /// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, or with `OTEL_METRICS_EXPORTER=otlp`
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; none of them: no push.
    pub otlp_metrics_endpoint: Option<String>,
    /// How often metrics are pushed over OTLP, in milliseconds. Unset:
    /// `OTEL_METRIC_EXPORT_INTERVAL`, else 60000.
    pub metrics_export_interval_ms: Option<u64>,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50052)),
            control_plane_url: "http://127.0.0.1:50051".to_owned(),
            unknown_tenant_ttl_ms: 2000,
            control_plane_timeout_ms: 3000,
            max_connections_per_tenant: 4,
            postgres_connection_budget: 32,
            pool_acquire_timeout_ms: 3000,
            pool_idle_timeout_ms: 60_000,
            max_response_bytes: 4 * 1024 * 1024 - 64 * 1024,
            postgres_ssl_root_cert: None,
            default_statement_timeout_ms: 30_000,
            postgres_session_reset: true,
            postgres_pipelining: true,
            shutdown_grace_ms: 1000,
            shutdown_drain_ms: 10_000,
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9465))),
            metrics_tenant_limit: 100,
            metrics_window_ms: 60_000,
            otlp_endpoint: None,
            trace_sample_ratio: None,
            otlp_metrics_endpoint: None,
            metrics_export_interval_ms: None,
        }
    }
}

impl PlaneConfig for DataPlaneConfig {
    const OPTIONAL_KEYS: &'static [&'static str] = &[
        "otlp_endpoint",
        "trace_sample_ratio",
        "metrics_addr",
        "otlp_metrics_endpoint",
        "metrics_export_interval_ms",
        "postgres_ssl_root_cert",
    ];
}

impl DataPlaneConfig {
    pub fn tracing(&self) -> tenantry_shared::telemetry::TracingConfig {
        tenantry_shared::telemetry::TracingConfig {
            otlp_endpoint: self.otlp_endpoint.clone(),
            sample_ratio: self.trace_sample_ratio,
        }
    }
}

/// A running data plane.
pub struct DataPlane {
    pub server: ServerHandle,
    pub router: Arc<Router>,
    pub pools: Arc<PoolManager>,
    pub route_stream: Arc<StreamProgress>,
    pub metrics: Arc<DataPlaneMetrics>,
}

const SERVICE_NAMES: &[&str] = &[
    "tenantry.dataplane.v1.SqlService",
    "tenantry.dataplane.v1.PoolService",
];

/// Every health service name, for shutdown (the route stream's too).
const HEALTH_NAMES: &[&str] = &[
    "tenantry.dataplane.v1.SqlService",
    "tenantry.dataplane.v1.PoolService",
    ROUTE_STREAM_HEALTH_SERVICE,
];

/// Starts a data plane on `listener`.
pub async fn start(config: &DataPlaneConfig, listener: TcpListener) -> anyhow::Result<DataPlane> {
    let router = Arc::new(
        Router::new(
            &config.control_plane_url,
            RouterOptions {
                unknown_tenant_ttl: Duration::from_millis(config.unknown_tenant_ttl_ms),
                control_plane_timeout: Duration::from_millis(
                    config.control_plane_timeout_ms.max(1),
                ),
            },
        )
        .map_err(|error| anyhow::anyhow!("{error}"))?,
    );
    let tls = TlsConfigs::new(config.postgres_ssl_root_cert.as_deref())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let backends = Arc::new(BackendFactory::new(
        BackendOptions {
            postgres_session_reset: config.postgres_session_reset,
            postgres_pipelining: config.postgres_pipelining,
            postgres_connection_budget: config.postgres_connection_budget.max(1),
            max_response_bytes: config.max_response_bytes,
        },
        Some(Arc::new(tls)),
    ));
    let pools = Arc::new(PoolManager::new(
        PoolManagerOptions {
            max_connections_per_tenant: config.max_connections_per_tenant.max(1),
            acquire_timeout: Duration::from_millis(config.pool_acquire_timeout_ms),
            idle_timeout: Duration::from_millis(config.pool_idle_timeout_ms),
        },
        backends,
    ));
    let route_stream = Arc::new(StreamProgress::default());
    let sql = SqlApi {
        router: router.clone(),
        pools: pools.clone(),
        limits: SqlLimits {
            max_response_bytes: config.max_response_bytes,
            default_timeout: (config.default_statement_timeout_ms > 0)
                .then(|| Duration::from_millis(config.default_statement_timeout_ms)),
        },
    };
    let routes = Routes::new(
        SqlServiceServer::new(sql)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(config.max_response_bytes + 64 * 1024),
    )
    .add_service(PoolServiceServer::new(PoolApi {
        pools: pools.clone(),
        router: router.clone(),
        route_stream: route_stream.clone(),
    }));
    let (routes, health) = with_health_and_reflection(routes, SERVICE_NAMES)?;
    health
        .set_service_status(ROUTE_STREAM_HEALTH_SERVICE, Health::NotServing)
        .await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The stream and the sweep run apart, so a slow pool close never delays routes.
    let route_listener: Arc<dyn RouteListener> = pools.clone();
    tokio::spawn(routing::run_route_stream(
        router.clone(),
        route_listener,
        health.clone(),
        route_stream.clone(),
        stop_rx.clone(),
    ));
    {
        let router = router.clone();
        let pools = pools.clone();
        let mut stop = stop_rx;
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
    let plane_metrics = Arc::new(DataPlaneMetrics::new(
        config.metrics_tenant_limit.max(1),
        pools.clone(),
        router.clone(),
        route_stream.clone(),
    ));
    {
        let plane_metrics = plane_metrics.clone();
        let mut stop = stop_tx.subscribe();
        let window = Duration::from_millis(config.metrics_window_ms.max(1000));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + window, window);
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = ticks.tick() => plane_metrics.end_window(),
                }
            }
        });
    }
    let recorder: Arc<dyn RecordRequest> = plane_metrics.clone();
    let metrics_layer = MetricsLayer::new(recorder);
    let tenant_layer = TenantLayer::new(router.clone());
    let server_pools = pools.clone();
    let drain = Drain {
        grace: Duration::from_millis(config.shutdown_grace_ms),
        drain: Duration::from_millis(config.shutdown_drain_ms),
    };
    let server = ServerHandle::spawn(listener, move |listener, shutdown| async move {
        let served = serve_and_drain(
            |signal| {
                tonic::transport::Server::builder()
                    .layer(TenantIdLayer)
                    .layer(tenantry_shared::grpc_trace::TraceLayer)
                    .layer(metrics_layer)
                    .layer(tenant_layer)
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(incoming(listener), signal)
            },
            shutdown,
            health,
            HEALTH_NAMES,
            drain,
            || {},
        )
        .await;
        let _ = stop_tx.send(true);
        server_pools.close_all().await;
        served.context("data plane gRPC server failed")
    })?;
    Ok(DataPlane {
        server,
        router,
        pools,
        route_stream,
        metrics: plane_metrics,
    })
}
