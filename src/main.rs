//! `tenantry`: one binary for the whole platform. This file parses flags and wires the
//! crates together; it holds no logic of its own.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;
use tenantry_control_plane::ControlPlaneConfig;
use tenantry_data_plane::DataPlaneConfig;
use tenantry_shared::config::{load, process_env};

use tenantry_shared::grpc::bind;
use tenantry_shared::metrics::{MetricsEndpoint, MetricsSource};
use tenantry_shared::metrics_otlp::{self, MetricsPush};
use tenantry_shared::telemetry::{self, LogFormat, TracingConfig};
use tracing::Instrument;

#[derive(Parser)]
#[command(
    name = "tenantry",
    version,
    about = "Database-per-tenant platform spoken to over gRPC"
)]
struct Cli {
    /// Log lines as `text` (default) or `json` (one object per line, with tenant_id).
    #[arg(
        long,
        global = true,
        env = "TENANTRY_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run control plane and data plane in one process, SQLite everywhere.
    Dev(DevArgs),
    /// Run the control plane (config: --config FILE and TENANTRY_* variables).
    ControlPlane {
        #[arg(long, env = "TENANTRY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a data plane (config: --config FILE and TENANTRY_* variables).
    DataPlane {
        #[arg(long, env = "TENANTRY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Manage tenants through the control plane.
    Tenants {
        #[command(flatten)]
        endpoint: cli::ControlPlaneEndpoint,
        #[command(subcommand)]
        command: cli::TenantsCommand,
    },
    /// Manage database servers through the control plane.
    Servers {
        #[command(flatten)]
        endpoint: cli::ControlPlaneEndpoint,
        #[command(subcommand)]
        command: cli::ServersCommand,
    },
    /// Run SQL on a tenant's database through the data plane.
    Sql(cli::SqlArgs),
}

#[derive(clap::Args)]
struct DevArgs {
    /// Where the registry and the tenant SQLite files live.
    #[arg(long, default_value = ".tenantry", env = "TENANTRY_DATA_DIR")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:50051")]
    control_plane_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:50052")]
    data_plane_addr: SocketAddr,
    /// Tenant migrations (sqlx format) applied to every new tenant database.
    #[arg(long)]
    tenant_migrations: Option<PathBuf>,
    /// Export traces over OTLP/gRPC to OTEL_EXPORTER_OTLP_ENDPOINT, or to
    /// http://127.0.0.1:4317 if that is unset. (Setting OTEL_EXPORTER_OTLP_ENDPOINT alone
    /// also turns tracing on.)
    #[arg(long)]
    trace: bool,
    /// Default share of traces kept when tracing (0.0 to 1.0; default: OTEL_TRACES_SAMPLER,
    /// else 1.0).
    #[arg(long)]
    trace_ratio: Option<f64>,
    /// Where both planes' Prometheus metrics are served (`/metrics`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Also push both planes' metrics over OTLP/gRPC, to
    /// OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT, else
    /// http://127.0.0.1:4317, every OTEL_METRIC_EXPORT_INTERVAL ms (default 60000).
    /// (OTEL_METRICS_EXPORTER=otlp alone does it too.)
    #[arg(long)]
    otlp_metrics: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.log_format;
    match cli.command {
        Command::Dev(args) => {
            let tracing = TracingConfig {
                otlp_endpoint: args.trace.then(|| {
                    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                        .unwrap_or_else(|_| "http://127.0.0.1:4317".to_owned())
                }),
                sample_ratio: args.trace_ratio,
            };
            let _telemetry = telemetry::init("tenantry", format, &tracing, "info")?;
            dev(args).await
        }
        Command::ControlPlane { config } => {
            let config: ControlPlaneConfig = load(config.as_deref(), &process_env())?;
            let _telemetry =
                telemetry::init("tenantry-control-plane", format, &config.tracing(), "info")?;
            let listener = bind(config.listen_addr, "control plane").await?;
            let server = tenantry_control_plane::start(&config, listener).await?;
            tracing::info!(addr = %server.local_addr, "control plane serving");
            let metrics = match config.metrics_addr {
                Some(addr) => Some(metrics_endpoint(addr, server.metrics.iter().cloned()).await?),
                None => None,
            };
            let push = metrics_push(
                config.otlp_metrics_endpoint.as_deref(),
                config.metrics_export_interval_ms,
                "tenantry-control-plane",
                server.metrics.iter().cloned().collect(),
            )?;
            wait_for_shutdown_signal().await;
            let stopped = server.shutdown().await;
            if let Some(metrics) = metrics {
                metrics.stop();
            }
            if let Some(push) = push {
                push.stop().await;
            }
            stopped
        }
        Command::DataPlane { config } => {
            let config: DataPlaneConfig = load(config.as_deref(), &process_env())?;
            let _telemetry =
                telemetry::init("tenantry-data-plane", format, &config.tracing(), "info")?;
            let listener = bind(config.listen_addr, "data plane").await?;
            let plane = tenantry_data_plane::start(&config, listener).await?;
            tracing::info!(addr = %plane.server.local_addr, control_plane = %config.control_plane_url, "data plane serving");
            let plane_metrics: Arc<dyn MetricsSource> = plane.metrics.clone();
            let metrics = match config.metrics_addr {
                Some(addr) => Some(metrics_endpoint(addr, [plane_metrics.clone()]).await?),
                None => None,
            };
            let push = metrics_push(
                config.otlp_metrics_endpoint.as_deref(),
                config.metrics_export_interval_ms,
                "tenantry-data-plane",
                vec![plane_metrics],
            )?;
            wait_for_shutdown_signal().await;
            let stopped = plane.server.shutdown().await;
            if let Some(metrics) = metrics {
                metrics.stop();
            }
            if let Some(push) = push {
                push.stop().await;
            }
            stopped
        }
        Command::Tenants { endpoint, command } => {
            let _telemetry = cli_telemetry(format)?;
            cli::tenants(&endpoint, command)
                .instrument(cli_span("tenants"))
                .await
        }
        Command::Servers { endpoint, command } => {
            let _telemetry = cli_telemetry(format)?;
            cli::servers(&endpoint, command)
                .instrument(cli_span("servers"))
                .await
        }
        Command::Sql(args) => {
            let _telemetry = cli_telemetry(format)?;
            cli::sql(args).instrument(cli_span("sql")).await
        }
    }
}

/// Serves `sources` at `addr`/metrics.
async fn metrics_endpoint(
    addr: SocketAddr,
    sources: impl IntoIterator<Item = Arc<dyn MetricsSource>>,
) -> anyhow::Result<MetricsEndpoint> {
    let endpoint = MetricsEndpoint::start(addr).await?;
    for source in sources {
        endpoint.add(source);
    }
    tracing::info!(url = %endpoint.url(), "metrics served");
    Ok(endpoint)
}

/// Pushes `sources` over OTLP/gRPC if an endpoint is configured or set in the
/// environment (see `metrics_otlp::endpoint`).
fn metrics_push(
    configured: Option<&str>,
    interval_ms: Option<u64>,
    service_name: &str,
    sources: Vec<Arc<dyn MetricsSource>>,
) -> anyhow::Result<Option<MetricsPush>> {
    metrics_otlp::endpoint(configured)
        .map(|endpoint| {
            MetricsPush::start(
                &endpoint,
                metrics_otlp::interval(interval_ms),
                service_name,
                sources,
            )
        })
        .transpose()
}

/// Client commands log warnings only, and trace when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
/// (their calls then carry the trace context to the planes).
fn cli_telemetry(format: LogFormat) -> anyhow::Result<telemetry::TelemetryGuard> {
    telemetry::init("tenantry-cli", format, &TracingConfig::default(), "warn")
}

fn cli_span(command: &str) -> tracing::Span {
    tracing::info_span!("cli", otel.name = %format!("tenantry {command}"), otel.kind = "client")
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let control_plane_config = ControlPlaneConfig {
        listen_addr: args.control_plane_addr,
        registry_url: args.data_dir.join("registry.db").display().to_string(),
        tenant_migrations_dir: args.tenant_migrations,
        sqlite_directory: Some(args.data_dir.join("tenants")),
        // One process on a developer's machine: no load balancer to tell.
        shutdown_grace_ms: 0,
        ..ControlPlaneConfig::default()
    };
    let control_plane_listener = bind(args.control_plane_addr, "control plane").await?;
    let data_plane_listener = bind(args.data_plane_addr, "data plane").await?;
    let control_plane =
        tenantry_control_plane::start(&control_plane_config, control_plane_listener).await?;
    let data_plane_config = DataPlaneConfig {
        listen_addr: args.data_plane_addr,
        control_plane_url: control_plane.url(),
        shutdown_grace_ms: 0,
        ..DataPlaneConfig::default()
    };
    let data_plane = tenantry_data_plane::start(&data_plane_config, data_plane_listener).await?;
    let data_plane_metrics: Arc<dyn MetricsSource> = data_plane.metrics.clone();
    let sources: Vec<Arc<dyn MetricsSource>> = control_plane
        .metrics
        .iter()
        .cloned()
        .chain([data_plane_metrics])
        .collect();
    let metrics = metrics_endpoint(args.metrics_addr, sources.clone()).await?;
    let otlp_metrics_endpoint = args.otlp_metrics.then(|| {
        [
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
        .unwrap_or_else(|| "http://127.0.0.1:4317".to_owned())
    });
    let push = metrics_push(otlp_metrics_endpoint.as_deref(), None, "tenantry", sources)?;
    println!(
        "tenantry dev is running (data in {})\n\
         \x20 control plane: {}   (tenants, servers, routes; keep it private)\n\
         \x20 data plane:    {}   (SqlService; send x-tenant-id)\n\
         \x20 metrics:       {}\n\n\
         try:\n\
         \x20 cargo run --release -- tenants create acme\n\
         \x20 cargo run --release -- sql --tenant acme \"CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)\"\n\
         \x20 grpcurl -plaintext -H 'x-tenant-id: acme' -d '{{\"statement\":{{\"sql\":\"SELECT 1 AS one\"}}}}' {} tenantry.dataplane.v1.SqlService/Query\n\n\
         press Ctrl-C to stop",
        args.data_dir.display(),
        control_plane.url(),
        data_plane.server.url(),
        metrics.url(),
        data_plane.server.local_addr,
    );
    wait_for_shutdown_signal().await;
    tracing::info!("shutting down");
    data_plane.server.shutdown().await?;
    let stopped = control_plane.shutdown().await;
    metrics.stop();
    if let Some(push) = push {
        push.stop().await;
    }
    stopped
}

async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(terminate) => terminate,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; stop with Ctrl-C");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
