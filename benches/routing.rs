//! Routing-at-scale benchmarks (`cargo bench --bench routing`):
//!
//! 1. propagation: 1,000 route changes (suspend/resume), each timed from sending the
//!    change until all three data planes have applied it, against the time the change's
//!    own call takes (the baseline);
//! 2. cold: first request to a tenant with no open pool against a second, warm request
//!    to the same tenant, on SQLite and PostgreSQL;
//! 3. memory: RSS of a `tenantry data-plane` process before and after it holds 10,000
//!    routes;
//! 4. zipf: PostgreSQL point selects with Zipf-distributed (s = 1.1) traffic over 5,000
//!    tenants under a 50-connection budget, against the same load over 50 tenants.
//!
//! `TENANTRY_BENCH_ONLY=propagation,cold,memory,zipf` picks scenarios (default all);
//! `TENANTRY_BENCH_ZIPF_TENANTS` (default 5000), `TENANTRY_BENCH_MEMORY_ROUTES` (default
//! 10000) and `TENANTRY_BENCH_SECONDS` (default 3, per measured round) size them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tenantry_control_plane::ControlPlaneConfig;
use tenantry_data_plane::{DataPlane, DataPlaneConfig};
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::controlplane::v1::database_server_service_client::DatabaseServerServiceClient;
use tenantry_proto::controlplane::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::pool_service_client::PoolServiceClient;
use tenantry_proto::dataplane::v1::sql_service_client::SqlServiceClient;
use tenantry_shared::grpc::ServerHandle;
use tenantry_testkit::Backend;
use tenantry_testkit::bench::{delete_tenants, ms, percentile, run_id, seconds_per_round};
use tenantry_testkit::load::{Load, Pick, Zipf};
use tonic::transport::Channel;

const CONCURRENCY: usize = 32;
const CHANNELS: usize = 4;
const ROUNDS: usize = 3;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wanted(scenario: &str) -> bool {
    std::env::var("TENANTRY_BENCH_ONLY")
        .map(|only| only.split(',').any(|s| s.trim() == scenario))
        .unwrap_or(true)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return Ok(());
    }
    println!("# Tenantry routing benchmarks\n");
    if wanted("propagation") {
        propagation().await?;
    }
    if wanted("cold") {
        cold(Backend::Sqlite, 200).await?;
        cold(Backend::Postgres, 50).await?;
    }
    if wanted("memory") {
        memory(env_usize("TENANTRY_BENCH_MEMORY_ROUTES", 10_000)).await?;
    }
    if wanted("zipf") {
        zipf(env_usize("TENANTRY_BENCH_ZIPF_TENANTS", 5000), 50).await?;
    }
    Ok(())
}

/// A control plane with one database server "main", and what it takes to clean up.
struct Platform {
    run_id: String,
    _temp: tempfile::TempDir,
    control_plane: ServerHandle,
    channel: Channel,
    /// Every tenant `create` was asked for, deleted by `finish`.
    created: std::sync::Mutex<Vec<String>>,
}

impl Platform {
    async fn start(backend: Backend) -> anyhow::Result<Self> {
        let temp = tempfile::tempdir()?;
        let config = ControlPlaneConfig {
            listen_addr: "127.0.0.1:0".parse()?,
            registry_url: temp.path().join("registry.db").display().to_string(),
            shutdown_grace_ms: 0,
            ..ControlPlaneConfig::default()
        };
        let control_plane = tenantry_control_plane::start(
            &config,
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        )
        .await?;
        let channel = Channel::from_shared(control_plane.url())?.connect().await?;
        let location = match backend {
            Backend::Postgres => cp::register_database_server_request::Location::PostgresAdminUrl(
                tenantry_testkit::postgres::admin_url().await,
            ),
            Backend::Sqlite => cp::register_database_server_request::Location::SqliteDirectory(
                temp.path().join("tenants").display().to_string(),
            ),
        };
        DatabaseServerServiceClient::new(channel.clone())
            .register_database_server(cp::RegisterDatabaseServerRequest {
                name: "main".into(),
                location: Some(location),
            })
            .await?;
        Ok(Self {
            run_id: run_id(),
            _temp: temp,
            control_plane,
            channel,
            created: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn tenants(&self) -> TenantServiceClient<Channel> {
        TenantServiceClient::new(self.channel.clone())
    }

    fn id(&self, prefix: &str, n: usize) -> String {
        format!("{prefix}{n}-{}", self.run_id)
    }

    /// Creates tenants `prefix0..count`, `parallel` at a time; returns their ids.
    async fn create(
        &self,
        prefix: &str,
        count: usize,
        parallel: usize,
    ) -> anyhow::Result<Vec<String>> {
        let ids: Vec<String> = (0..count).map(|n| self.id(prefix, n)).collect();
        self.created
            .lock()
            .map_err(|_| anyhow::anyhow!("a bench thread panicked"))?
            .extend(ids.iter().cloned());
        let started = Instant::now();
        let done = AtomicU64::new(0);
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(ids.clone())
            .map(|tenant_id| {
                let mut tenants = self.tenants();
                let done = &done;
                async move {
                    tenants
                        .create_tenant(cp::CreateTenantRequest {
                            tenant_id,
                            ..Default::default()
                        })
                        .await?;
                    let n = done.fetch_add(1, Ordering::AcqRel) + 1;
                    if n.is_multiple_of(1000) {
                        eprintln!(
                            "  created {n} tenants ({:.0} s)",
                            started.elapsed().as_secs_f64()
                        );
                    }
                    Ok(())
                }
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        Ok(ids)
    }

    /// Deletes every tenant `create` was asked for (their databases and roles), 4 at a
    /// time, and stops the control plane; then gives back `result`, the run's. Called
    /// whether or not the run got through, so a failed run leaves no database behind.
    async fn finish<T>(self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        let ids = std::mem::take(
            &mut *self
                .created
                .lock()
                .map_err(|_| anyhow::anyhow!("a bench thread panicked"))?,
        );
        if ids.len() > 100 {
            eprintln!("deleting {} tenants...", ids.len());
        }
        let deleted = delete_tenants(&self.tenants(), ids, 4).await;
        self.control_plane.shutdown().await?;
        let value = result?;
        deleted?;
        Ok(value)
    }

    /// Stops the control plane without deleting tenants: only for SQLite, whose tenant
    /// files go with the temporary directory.
    async fn stop(self) -> anyhow::Result<()> {
        self.control_plane.shutdown().await
    }

    async fn data_plane(&self, config: DataPlaneConfig) -> anyhow::Result<DataPlane> {
        tenantry_data_plane::start(
            &DataPlaneConfig {
                listen_addr: "127.0.0.1:0".parse()?,
                control_plane_url: self.control_plane.url(),
                shutdown_grace_ms: 0,
                ..config
            },
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        )
        .await
    }
}

async fn wait_applied(plane: &DataPlane, version: i64) -> anyhow::Result<()> {
    let mut applied = plane.route_stream.applied();
    tokio::time::timeout(
        Duration::from_secs(60),
        applied.wait_for(|applied| *applied >= version),
    )
    .await
    .map_err(|_| anyhow::anyhow!("route version {version} never applied"))??;
    Ok(())
}

fn with_tenant<T>(message: T, tenant_id: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-tenant-id", tenant_id.parse()?);
    Ok(request)
}

/// A query that needs the tenant's connection but no table.
fn point_query(tenant_id: &str) -> anyhow::Result<tonic::Request<dp::QueryRequest>> {
    with_tenant(
        dp::QueryRequest {
            statement: Some(dp::Statement {
                sql: "SELECT 1 + 1 AS two".into(),
                params: vec![],
            }),
        },
        tenant_id,
    )
}

/// 1. Route propagation to three data planes.
async fn propagation() -> anyhow::Result<()> {
    let platform = Platform::start(Backend::Sqlite).await?;
    let result = propagation_on(&platform).await;
    platform.finish(result).await
}

async fn propagation_on(platform: &Platform) -> anyhow::Result<()> {
    const CHANGES: usize = 1000;
    let planes = [
        platform.data_plane(DataPlaneConfig::default()).await?,
        platform.data_plane(DataPlaneConfig::default()).await?,
        platform.data_plane(DataPlaneConfig::default()).await?,
    ];
    let ids = platform.create("p", 10, 4).await?;
    let mut tenants = platform.tenants();
    let mut suspended = vec![false; ids.len()];
    let mut call_times = Vec::with_capacity(CHANGES);
    let mut applied_times = Vec::with_capacity(CHANGES);
    for change in 0..CHANGES {
        let n = change % ids.len();
        let tenant_id = ids[n].clone();
        let started = Instant::now();
        let tenant = if suspended[n] {
            tenants
                .resume_tenant(cp::ResumeTenantRequest { tenant_id })
                .await?
        } else {
            tenants
                .suspend_tenant(cp::SuspendTenantRequest {
                    tenant_id,
                    reason: "bench".into(),
                })
                .await?
        }
        .into_inner();
        call_times.push(started.elapsed());
        suspended[n] = !suspended[n];
        for plane in &planes {
            wait_applied(plane, tenant.route_version).await?;
        }
        applied_times.push(started.elapsed());
    }
    call_times.sort();
    applied_times.sort();
    println!("## Route propagation to three data planes ({CHANGES} changes, SQLite registry)\n");
    println!("| measured from sending the change until | p50 | p99 | max |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| the change's own call returned (baseline) | {} | {} | {} |",
        ms(percentile(&call_times, 0.5)),
        ms(percentile(&call_times, 0.99)),
        ms(percentile(&call_times, 1.0))
    );
    println!(
        "| all three data planes applied it | {} | {} | {} |\n",
        ms(percentile(&applied_times, 0.5)),
        ms(percentile(&applied_times, 0.99)),
        ms(percentile(&applied_times, 1.0))
    );
    for plane in planes {
        plane.server.shutdown().await?;
    }
    Ok(())
}

/// 2. Cold (no pool yet) vs warm first requests.
async fn cold(backend: Backend, count: usize) -> anyhow::Result<()> {
    let platform = Platform::start(backend).await?;
    let result = cold_on(&platform, backend, count).await;
    platform.finish(result).await
}

async fn cold_on(platform: &Platform, backend: Backend, count: usize) -> anyhow::Result<()> {
    let ids = platform.create("c", count, 4).await?;
    // A budget above the tenant count: this measures opening a pool, not eviction (the
    // zipf scenario has those).
    let plane = platform
        .data_plane(DataPlaneConfig {
            postgres_connection_budget: u32::try_from(count + 10)?,
            ..DataPlaneConfig::default()
        })
        .await?;
    let latest = platform
        .tenants()
        .get_tenant(cp::GetTenantRequest {
            tenant_id: ids[count - 1].clone(),
        })
        .await?
        .into_inner()
        .route_version;
    wait_applied(&plane, latest).await?;
    let channel = Channel::from_shared(plane.server.url())?.connect().await?;
    let mut client = SqlServiceClient::new(channel);
    let (mut cold_times, mut warm_times) = (Vec::new(), Vec::new());
    for tenant_id in &ids {
        let started = Instant::now();
        client.query(point_query(tenant_id)?).await?;
        cold_times.push(started.elapsed());
        let started = Instant::now();
        client.query(point_query(tenant_id)?).await?;
        warm_times.push(started.elapsed());
    }
    cold_times.sort();
    warm_times.sort();
    println!(
        "## {backend:?}: first request to a tenant with no open pool ({count} tenants, route already held)\n"
    );
    println!("| request | p50 | p99 |");
    println!("| --- | --- | --- |");
    println!(
        "| warm (second request, baseline) | {} | {} |",
        ms(percentile(&warm_times, 0.5)),
        ms(percentile(&warm_times, 0.99))
    );
    println!(
        "| cold (first request: open pool and connection) | {} | {} |\n",
        ms(percentile(&cold_times, 0.5)),
        ms(percentile(&cold_times, 0.99))
    );
    plane.server.shutdown().await?;
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// 3. RSS of a separate data-plane process before and after it holds `count` routes.
async fn memory(count: usize) -> anyhow::Result<()> {
    let platform = Platform::start(Backend::Sqlite).await?;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .arg("data-plane")
        .env("TENANTRY_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("TENANTRY_CONTROL_PLANE_URL", platform.control_plane.url())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("data plane exited"))?;
    let url = format!("http://127.0.0.1:{port}");
    let stats = |channel: Channel| async move {
        PoolServiceClient::new(channel)
            .get_pool_stats(dp::GetPoolStatsRequest {})
            .await
            .map(tonic::Response::into_inner)
    };
    let channel = loop {
        if let Ok(endpoint) = Channel::from_shared(url.clone())
            && let Ok(channel) = endpoint.connect().await
            && stats(channel.clone())
                .await
                .is_ok_and(|stats| stats.route_stream_live)
        {
            break channel;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let ids = platform.create("m", count, 8).await?;
    loop {
        if stats(channel.clone()).await?.routes as usize >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    child.kill().await?;
    println!("## Memory of a data-plane process holding {count} routes\n");
    println!("| RSS before (no routes) | RSS after | added | per route |");
    println!("| --- | --- | --- | --- |");
    let added = after.saturating_sub(before);
    println!(
        "| {:.1} MiB | {:.1} MiB | {:.1} MiB | {} bytes |\n",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        added as f64 / 1024.0,
        added * 1024 / count.max(1) as u64
    );
    drop(ids);
    platform.stop().await
}

struct Round {
    requests: u64,
    errors: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

async fn zipf_round(
    channels: &[Channel],
    ids: Arc<Vec<String>>,
    duration: Duration,
) -> anyhow::Result<Round> {
    let zipf = Zipf::new(ids.len(), 1.1);
    let running = Load::new(channels, ids, |_| dp::Statement {
        sql: "SELECT 1 + 1 AS two".into(),
        params: vec![],
    })
    .workers(CONCURRENCY)
    .pick(Pick::Zipf(zipf))
    .start();
    tokio::time::sleep(duration).await;
    let tally = running.stop().await;
    for failure in tally.failures.iter().take(3) {
        eprintln!("  error: {failure}");
    }
    Ok(Round {
        requests: tally.latencies.len() as u64,
        errors: tally.errors,
        latencies: tally.latencies,
        elapsed: tally.elapsed,
    })
}

/// 4. Zipf traffic over `many` PostgreSQL tenants under a `budget`, against 50 tenants.
async fn zipf(many: usize, budget: u32) -> anyhow::Result<()> {
    let platform = Platform::start(Backend::Postgres).await?;
    let result = zipf_on(&platform, many, budget).await;
    platform.finish(result).await
}

async fn zipf_on(platform: &Platform, many: usize, budget: u32) -> anyhow::Result<()> {
    eprintln!("creating {many} PostgreSQL tenants...");
    let ids = platform.create("z", many, 4).await?;
    // Creating thousands of databases leaves gigabytes of dirty pages; flush them now so
    // the rounds measure routing, not the server's catch-up writes.
    {
        use sqlx::Connection;
        let mut admin =
            sqlx::PgConnection::connect(&tenantry_testkit::postgres::admin_url().await).await?;
        sqlx::raw_sql("CHECKPOINT").execute(&mut admin).await?;
        admin.close().await?;
    }
    let plane = platform
        .data_plane(DataPlaneConfig {
            postgres_connection_budget: budget,
            ..DataPlaneConfig::default()
        })
        .await?;
    let latest = platform
        .tenants()
        .get_tenant(cp::GetTenantRequest {
            tenant_id: ids[many - 1].clone(),
        })
        .await?
        .into_inner()
        .route_version;
    wait_applied(&plane, latest).await?;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(Channel::from_shared(plane.server.url())?.connect().await?);
    }
    let few = Arc::new(ids[..50.min(many)].to_vec());
    let all = Arc::new(ids.clone());
    // Warm-up, then interleaved rounds.
    zipf_round(&channels, few.clone(), Duration::from_secs(1)).await?;
    zipf_round(&channels, all.clone(), Duration::from_secs(1)).await?;
    let (mut few_rounds, mut all_rounds) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        few_rounds.push(zipf_round(&channels, few.clone(), seconds_per_round()).await?);
        all_rounds.push(zipf_round(&channels, all.clone(), seconds_per_round()).await?);
    }
    let median = |rounds: &mut Vec<Round>| {
        rounds.sort_by(|a, b| {
            let rate = |r: &Round| r.requests as f64 / r.elapsed.as_secs_f64();
            rate(a).total_cmp(&rate(b))
        });
        rounds.remove(rounds.len() / 2)
    };
    let errors: u64 = few_rounds
        .iter()
        .chain(all_rounds.iter())
        .map(|r| r.errors)
        .sum();
    let few_round = median(&mut few_rounds);
    let all_round = median(&mut all_rounds);
    let rate = |r: &Round| r.requests as f64 / r.elapsed.as_secs_f64();
    let (servers, _) = plane.pools.stats();
    println!(
        "## PostgreSQL: Zipf (s = 1.1) traffic, budget {budget} connections, {CONCURRENCY} concurrent callers\n"
    );
    println!("| tenants | throughput (req/s) | p50 | p99 | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| {} (baseline) | {:.0} | {} | {} | 1.00 |",
        few.len(),
        rate(&few_round),
        ms(percentile(&few_round.latencies, 0.5)),
        ms(percentile(&few_round.latencies, 0.99))
    );
    println!(
        "| {many} | {:.0} | {} | {} | {:.2} |\n",
        rate(&all_round),
        ms(percentile(&all_round.latencies, 0.5)),
        ms(percentile(&all_round.latencies, 0.99)),
        rate(&all_round) / rate(&few_round)
    );
    println!(
        "errors over all rounds: {errors}; idle connections evicted to make room: {}\n",
        servers.first().map_or(0, |s| s.evictions)
    );
    plane.server.shutdown().await?;
    Ok(())
}
