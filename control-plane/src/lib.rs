//! Tenantry control plane: the tenant registry, the provisioner that creates and drops
//! tenant databases, the reconciler that finishes interrupted work, and the gRPC
//! services (`TenantService`, `DatabaseServerService`, `RoutingService`).
//!
//! The public API is what the binary, the tests and the benches use: the config, `start`
//! and, with the `testing` feature, `start_with_faults` and the `testing` hooks.
//! Inside, dependencies point one way: `service` (gRPC translation) → `domain` (the
//! rules) and `routes` (route building and the WatchRoutes feed); `domain` →
//! `provisioner` → `registry`; `reconciler` → `provisioner`; `convert` (registry types to
//! protobuf), `location` (what a server's stored location means) and `error` serve them.
//! No lower module names a higher one (tests/module_dependencies.rs).

mod convert;
mod domain;
mod error;
mod location;
mod metrics;
mod provisioner;
mod reconciler;
mod registry;
mod routes;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tenantry_proto::controlplane::v1::database_server_service_server::DatabaseServerServiceServer;
use tenantry_proto::controlplane::v1::routing_service_server::RoutingServiceServer;
use tenantry_proto::controlplane::v1::tenant_service_server::TenantServiceServer;
use tenantry_shared::config::PlaneConfig;
use tenantry_shared::grpc::{
    Drain, ServerHandle, incoming, serve_and_drain, with_health_and_reflection,
};
use tokio::net::TcpListener;
use tonic::service::Routes;

use domain::servers::{ServerLocation, ServerManager, check_location};
use domain::tenants::TenantManager;
#[cfg(feature = "testing")]
use provisioner::FaultInjection;
use provisioner::{Provisioner, ProvisionerOptions};
use registry::Registry;
use routes::RouteTable;

/// Control-plane settings (TOML file, `TENANTRY_*` overrides). See README.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// gRPC address. Serve it only to data planes and operators.
    pub listen_addr: SocketAddr,
    /// `postgres://...` or a SQLite file path (or `sqlite://PATH`).
    pub registry_url: String,
    /// Directory of tenant migrations in sqlx format (`NNNN_description.sql`).
    pub tenant_migrations_dir: Option<PathBuf>,
    /// If set, a SQLite database server named `local` in this directory is registered at
    /// start (if no server of that name exists).
    pub sqlite_directory: Option<PathBuf>,
    /// Attempts of a provisioning or deletion sequence before the tenant is FAILED.
    pub provision_attempts: u32,
    /// Pause before the second attempt, doubling after each one.
    pub provision_retry_delay_ms: u64,
    /// On shutdown, how long health reports NOT_SERVING before new calls are refused.
    pub shutdown_grace_ms: u64,
    /// On shutdown, how long calls in flight get to finish.
    pub shutdown_drain_ms: u64,
    /// Prometheus endpoint (`GET /metrics`) of `tenantry control-plane`; unset: none.
    pub metrics_addr: Option<SocketAddr>,
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

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            registry_url: ".tenantry/registry.db".to_owned(),
            tenant_migrations_dir: None,
            sqlite_directory: None,
            provision_attempts: 3,
            provision_retry_delay_ms: 200,
            shutdown_grace_ms: 1000,
            shutdown_drain_ms: 10_000,
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            otlp_endpoint: None,
            trace_sample_ratio: None,
            otlp_metrics_endpoint: None,
            metrics_export_interval_ms: None,
        }
    }
}

impl ControlPlaneConfig {
    pub fn tracing(&self) -> tenantry_shared::telemetry::TracingConfig {
        tenantry_shared::telemetry::TracingConfig {
            otlp_endpoint: self.otlp_endpoint.clone(),
            sample_ratio: self.trace_sample_ratio,
        }
    }
}

impl PlaneConfig for ControlPlaneConfig {
    const OPTIONAL_KEYS: &'static [&'static str] = &[
        "tenant_migrations_dir",
        "sqlite_directory",
        "otlp_endpoint",
        "trace_sample_ratio",
        "metrics_addr",
        "otlp_metrics_endpoint",
        "metrics_export_interval_ms",
    ];
}

const SERVICE_NAMES: &[&str] = &[
    "tenantry.controlplane.v1.TenantService",
    "tenantry.controlplane.v1.DatabaseServerService",
    "tenantry.controlplane.v1.RoutingService",
];

/// Name of the SQLite server registered from `sqlite_directory`.
const LOCAL_SQLITE_SERVER: &str = "local";

/// Opens the registry, resumes unfinished tenants in the background, and serves on
/// `listener` until shut down.
pub async fn start(
    config: &ControlPlaneConfig,
    listener: TcpListener,
) -> anyhow::Result<ServerHandle> {
    start_serving(config, listener, |options| options).await
}

/// `start`, with provisioning broken on purpose as `faults` says.
#[cfg(feature = "testing")]
pub async fn start_with_faults(
    config: &ControlPlaneConfig,
    listener: TcpListener,
    faults: FaultInjection,
) -> anyhow::Result<ServerHandle> {
    start_serving(config, listener, |options| ProvisionerOptions {
        faults,
        ..options
    })
    .await
}

/// Test hooks: fault injection, and reads of what the control plane stored.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::provisioner::postgres::scram_sha256_verifier;
    pub use crate::provisioner::{FaultInjection, Step};
    pub use crate::registry::AuditEvent;

    /// The audit log of one tenant, oldest first, read from the registry at
    /// `registry_url` (a control plane may be running on it).
    pub async fn audit_events(
        registry_url: &str,
        tenant_id: &str,
    ) -> anyhow::Result<Vec<AuditEvent>> {
        let registry = crate::registry::Registry::open(registry_url).await?;
        let events = registry.audit_events(tenant_id).await;
        registry.close().await;
        Ok(events?)
    }
}

async fn start_serving(
    config: &ControlPlaneConfig,
    listener: TcpListener,
    provisioner_options: impl FnOnce(ProvisionerOptions) -> ProvisionerOptions,
) -> anyhow::Result<ServerHandle> {
    let registry = Registry::open(&config.registry_url)
        .await
        .context("opening the tenant registry")?;
    let tenant_migrations = match &config.tenant_migrations_dir {
        Some(dir) => {
            let mut migrator = sqlx::migrate::Migrator::new(dir.as_path())
                .await
                .with_context(|| format!("reading tenant migrations from {}", dir.display()))?;
            // No advisory lock around a tenant's migrations: tenant roles cannot take
            // session-level ones (see the provisioner's lock-down), and the control plane
            // runs one sequence per tenant at a time already.
            migrator.set_locking(false);
            Some(Arc::new(migrator))
        }
        None => None,
    };
    if let Some(directory) = &config.sqlite_directory {
        register_local_sqlite(&registry, directory).await?;
    }
    let provisioner = Arc::new(Provisioner::new(
        registry.clone(),
        provisioner_options(ProvisionerOptions {
            tenant_migrations,
            attempts: config.provision_attempts.max(1),
            retry_delay: Duration::from_millis(config.provision_retry_delay_ms),
            #[cfg(feature = "testing")]
            faults: FaultInjection::default(),
        }),
    ));
    tokio::spawn(reconciler::resume_unfinished(
        registry.clone(),
        provisioner.clone(),
    ));

    let (streams_stop_tx, streams_stop_rx) = tokio::sync::watch::channel(false);
    let watch_streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let plane_metrics = Arc::new(metrics::ControlPlaneMetrics::new(
        registry.clone(),
        watch_streams.clone(),
    ));
    let tenants = Arc::new(TenantManager::new(
        registry.clone(),
        provisioner.clone(),
        plane_metrics.clone(),
    ));
    let routes = Routes::new(TenantServiceServer::new(service::tenants::TenantApi::new(
        tenants,
    )))
    .add_service(DatabaseServerServiceServer::new(
        service::servers::DatabaseServerApi::new(ServerManager::new(registry.clone())),
    ))
    .add_service(RoutingServiceServer::new(
        service::routing::RoutingApi::new(RouteTable::new(
            registry.clone(),
            streams_stop_rx,
            watch_streams.clone(),
        )),
    ));
    let (routes, health) = with_health_and_reflection(routes, SERVICE_NAMES)?;
    let drain = Drain {
        grace: Duration::from_millis(config.shutdown_grace_ms),
        drain: Duration::from_millis(config.shutdown_drain_ms),
    };
    let handle = ServerHandle::spawn(listener, move |listener, shutdown| async move {
        let served = serve_and_drain(
            |signal| {
                tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(Duration::from_secs(10)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                    .layer(tenantry_shared::grpc_trace::TraceLayer)
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(incoming(listener), signal)
            },
            shutdown,
            health,
            SERVICE_NAMES,
            drain,
            // Route streams never end by themselves: end them, or the drain waits.
            move || {
                let _ = streams_stop_tx.send(true);
            },
        )
        .await;
        provisioner.close().await;
        registry.close().await;
        served.context("control plane gRPC server failed")
    })?;
    Ok(handle.with_metrics(plane_metrics))
}

async fn register_local_sqlite(
    registry: &Registry,
    directory: &std::path::Path,
) -> anyhow::Result<()> {
    if registry.get_server(LOCAL_SQLITE_SERVER).await?.is_some() {
        return Ok(());
    }
    let directory = directory
        .to_str()
        .context("sqlite_directory is not valid UTF-8")?
        .to_owned();
    let (backend, location) = check_location(&ServerLocation::SqliteDirectory(directory))
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    registry
        .insert_server(LOCAL_SQLITE_SERVER, backend, &location, "startup")
        .await?;
    Ok(())
}
