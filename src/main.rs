//! `tenantry`: one binary for the whole platform. This file parses flags and wires the
//! crates together; it holds no logic of its own.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tenantry_control_plane::ControlPlaneConfig;
use tenantry_data_plane::DataPlaneConfig;
use tenantry_shared::config::{load, process_env};
use tenantry_shared::grpc::bind;

#[derive(Parser)]
#[command(
    name = "tenantry",
    version,
    about = "Database-per-tenant platform spoken to over gRPC"
)]
struct Cli {
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => {
            init_logging();
            dev(args).await
        }
        Command::ControlPlane { config } => {
            init_logging();
            let config: ControlPlaneConfig = load(config.as_deref(), &process_env())?;
            let listener = bind(config.listen_addr, "control plane").await?;
            let server =
                tenantry_control_plane::start(&config, listener, Default::default()).await?;
            tracing::info!(addr = %server.local_addr, "control plane serving");
            wait_for_shutdown_signal().await;
            server.shutdown().await
        }
        Command::DataPlane { config } => {
            init_logging();
            let config: DataPlaneConfig = load(config.as_deref(), &process_env())?;
            let listener = bind(config.listen_addr, "data plane").await?;
            let plane = tenantry_data_plane::start(&config, listener).await?;
            tracing::info!(addr = %plane.server.local_addr, control_plane = %config.control_plane_url, "data plane serving");
            wait_for_shutdown_signal().await;
            plane.server.shutdown().await
        }
        Command::Tenants { endpoint, command } => cli::tenants(&endpoint, command).await,
        Command::Servers { endpoint, command } => cli::servers(&endpoint, command).await,
        Command::Sql(args) => cli::sql(args).await,
    }
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
    let control_plane = tenantry_control_plane::start(
        &control_plane_config,
        control_plane_listener,
        Default::default(),
    )
    .await?;
    let data_plane_config = DataPlaneConfig {
        listen_addr: args.data_plane_addr,
        control_plane_url: control_plane.url(),
        shutdown_grace_ms: 0,
        ..DataPlaneConfig::default()
    };
    let data_plane = tenantry_data_plane::start(&data_plane_config, data_plane_listener).await?;
    println!(
        "tenantry dev is running (data in {})\n\
         \x20 control plane: {}   (tenants, servers, routes; keep it private)\n\
         \x20 data plane:    {}   (SqlService; send x-tenant-id)\n\n\
         try:\n\
         \x20 cargo run --release -- tenants create acme\n\
         \x20 cargo run --release -- sql --tenant acme \"CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)\"\n\
         \x20 grpcurl -plaintext -H 'x-tenant-id: acme' -d '{{\"statement\":{{\"sql\":\"SELECT 1 AS one\"}}}}' {} tenantry.dataplane.v1.SqlService/Query\n\n\
         press Ctrl-C to stop",
        args.data_dir.display(),
        control_plane.url(),
        data_plane.server.url(),
        data_plane.server.local_addr,
    );
    wait_for_shutdown_signal().await;
    tracing::info!("shutting down");
    data_plane.server.shutdown().await?;
    control_plane.shutdown().await
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
