//! Tenantry benchmarks (`cargo bench --bench platform`). Every figure is reported with
//! its baseline from the same run:
//!
//! 1. layers: per-request cost of the tenant layer plus a router lookup for a cached
//!    tenant, against the same inner service without the layer;
//! 2. create: time to create a tenant (p50, p99) on SQLite and PostgreSQL;
//! 3. point selects through SqlService: a baseline tonic service on one pre-opened pool
//!    with no tenant layers, vs the routed data plane with 1 tenant and with many tenants
//!    (1,000 on SQLite, 50 on PostgreSQL), traffic spread uniformly; on PostgreSQL also
//!    the 1 tenant through data planes with the session reset off and with pipelining
//!    off (`postgres_session_reset`, `postgres_pipelining`);
//! 4. limit: a PostgreSQL Query whose result passes `max_response_bytes` (an endless
//!    series of 100-byte rows), against the same Query cut to the rows that fit: how long
//!    after the limit is reached the refusal comes.
//!
//! Scenarios are measured in `TENANTRY_BENCH_ROUNDS` (default 12) rounds of
//! `TENANTRY_BENCH_SECONDS / 2` each (default 3, so 1.5 s rounds, after 1 s of unmeasured
//! load): every round runs each scenario once, back to back,
//! starting with a different scenario each time, so a machine's drift hits all alike.
//! A ratio is the median over rounds of the ratio within a round; its spread is shown.
//! `TENANTRY_BENCH_ONLY=layers,sqlite,postgres,limit` picks parts (default all);
//! `TENANTRY_BENCH_CONNECTIONS` sizes the baseline's and the first tenant's pool (default 4);
//! `TENANTRY_BENCH_VERBOSE=1` prints every round.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tenantry_control_plane::ControlPlaneConfig;
use tenantry_data_plane::DataPlaneConfig;
use tenantry_data_plane::TenantLayer;
use tenantry_data_plane::{Route, RouteState, Router, RouterOptions, Target};
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::controlplane::v1::database_server_service_client::DatabaseServerServiceClient;
use tenantry_proto::controlplane::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::sql_service_client::SqlServiceClient;
use tenantry_proto::dataplane::v1::sql_service_server::{SqlService, SqlServiceServer};
use tenantry_shared::TenantId;
use tenantry_testkit::Backend;
use tenantry_testkit::bench::{delete_tenants, ms, percentile, run_id, seconds_per_round};
use tenantry_testkit::load::Load;
use tonic::transport::Channel;
use tower::{Layer, Service, ServiceExt};

const CONCURRENCY: usize = 32;
const CHANNELS: usize = 4;
const ROWS_PER_TENANT: i64 = 100;
/// Rounds per scenario (`TENANTRY_BENCH_ROUNDS`, default 12); each measures half of
/// `TENANTRY_BENCH_SECONDS`.
fn round_count() -> usize {
    std::env::var("TENANTRY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(12)
}

/// Connections in the baseline's pool and in the first tenant's pool
/// (`TENANTRY_BENCH_CONNECTIONS`, 1 to 12; default 4, the data plane's default per
/// tenant). With 50 PostgreSQL tenants, more would not fit the server's 100 connections.
fn connections_per_pool() -> u32 {
    std::env::var("TENANTRY_BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=12).contains(n))
        .unwrap_or(4)
}

/// Whether scenario `n` (0 = baseline) runs: `TENANTRY_BENCH_SCENARIOS=1,2` (default all)
/// runs only those, e.g. to profile one.
fn scenario_wanted(n: usize) -> bool {
    std::env::var("TENANTRY_BENCH_SCENARIOS")
        .map(|only| only.split(',').any(|s| s.trim() == n.to_string()))
        .unwrap_or(true)
}

fn wanted(part: &str) -> bool {
    std::env::var("TENANTRY_BENCH_ONLY")
        .map(|only| only.split(',').any(|s| s.trim() == part))
        .unwrap_or(true)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` probes bench binaries; nothing to test here.
        return Ok(());
    }
    println!("# Tenantry benchmarks\n");
    if wanted("layers") {
        layers().await?;
    }
    let sqlite = if wanted("sqlite") {
        end_to_end(Backend::Sqlite, 1000).await?
    } else {
        Vec::new()
    };
    let postgres = if wanted("postgres") {
        end_to_end(Backend::Postgres, 50).await?
    } else {
        Vec::new()
    };
    if wanted("limit") {
        limit_crossing().await?;
    }
    println!("\n## Summary\n");
    println!("| backend | scenario | throughput (req/s) | p50 | p99 | ratio |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (backend, results) in [("SQLite", &sqlite), ("PostgreSQL", &postgres)] {
        for line in results {
            println!("| {backend} | {line} |");
        }
    }
    Ok(())
}

/// Part 4, a result past the response limit: the over-limit Query (an endless series)
/// against the same Query cut to the rows that fit (what reading up to the limit costs
/// anyway), twice (A/A), in interleaved rounds. The difference bounds the time from
/// reaching the limit to the refusal (cancelling the statement and reading what was
/// already on its way included).
async fn limit_crossing() -> anyhow::Result<()> {
    use tenantry_testkit::{Backend as TestBackend, Sandbox};
    println!("\n## 4. Result past the response limit (PostgreSQL)\n");
    let sandbox = Sandbox::start(TestBackend::Postgres).await;
    let id = sandbox.tid("limit");
    sandbox.create(&id).await;
    let endless = "SELECT repeat('x', 100) AS filler, generate_series(1, 2000000000) AS n";
    let refusal = sandbox
        .query(&id, endless, vec![])
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the endless Query was answered"))?;
    let fitted: u64 = refusal
        .message()
        .split("stopped after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no row count in {:?}", refusal.message()))?;
    let fit = format!("SELECT repeat('x', 100) AS filler, generate_series(1, {fitted}) AS n");
    let time = |sql: String, over: bool| {
        let sandbox = &sandbox;
        let id = &id;
        async move {
            let started = Instant::now();
            let answer = sandbox.query(id, &sql, vec![]).await;
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            match (answer, over) {
                (Err(status), true) if status.code() == tonic::Code::ResourceExhausted => {
                    Ok(elapsed)
                }
                (Ok(_), false) => Ok(elapsed),
                (other, _) => Err(anyhow::anyhow!("unexpected answer: {other:?}")),
            }
        }
    };
    let rounds = round_count().max(5);
    let (mut over, mut fits, mut aa) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b, c) = if round % 2 == 0 {
            let a = time(endless.to_owned(), true).await?;
            let b = time(fit.clone(), false).await?;
            let c = time(fit.clone(), false).await?;
            (a, b, c)
        } else {
            let c = time(fit.clone(), false).await?;
            let b = time(fit.clone(), false).await?;
            let a = time(endless.to_owned(), true).await?;
            (a, b, c)
        };
        over.push(a - b);
        fits.push(b);
        aa.push(c - b);
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let spread = |values: &[f64]| {
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{low:.1} to {high:.1}")
    };
    let (over_spread, aa_spread) = (spread(&over), spread(&aa));
    println!(
        "{fitted} rows fit; reading them takes {:.1} ms (median of {rounds} rounds).",
        median(&mut fits)
    );
    println!(
        "over-limit answer minus fitting answer: {:.1} ms median (rounds {over_spread}); \
         A/A (fitting minus fitting): {:.1} ms median (rounds {aa_spread})",
        median(&mut over),
        median(&mut aa)
    );
    Ok(())
}

/// 1. The tenant layer and router lookup, against the bare inner service.
async fn layers() -> anyhow::Result<()> {
    let router = Arc::new(
        Router::new(
            "http://127.0.0.1:9",
            RouterOptions {
                unknown_tenant_ttl: Duration::from_secs(1),
                control_plane_timeout: Duration::from_secs(1),
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let tenant = TenantId::parse("acme")?;
    router.insert_route_for_tests(
        tenant,
        Arc::new(Route {
            state: RouteState::Active,
            reason: String::new(),
            version: 1,
            target: Some(Target::Sqlite {
                path: "/nonexistent".into(),
                incarnation: 1,
            }),
            max_connections: 0,
            tracing: None,
        }),
    );
    let inner = tower::service_fn(|_request: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
    });
    let request = || {
        http::Request::builder()
            .uri("/tenantry.dataplane.v1.SqlService/Query")
            .header("x-tenant-id", "acme")
            .body(tonic::body::Body::empty())
            .unwrap_or_default()
    };
    let iterations = 300_000;
    let mut bare = inner;
    let started = Instant::now();
    for _ in 0..iterations {
        let response = bare.ready().await?.call(request()).await?;
        std::hint::black_box(response);
    }
    let bare_time = started.elapsed();
    let mut layered = TenantLayer::new(router.clone()).layer(inner);
    let started = Instant::now();
    for _ in 0..iterations {
        let response = layered.ready().await?.call(request()).await?;
        std::hint::black_box(response);
    }
    let layered_time = started.elapsed();
    let per = |d: Duration| d.as_nanos() as f64 / iterations as f64;
    println!("## Tenant layer + router lookup (cached tenant), {iterations} calls\n");
    println!("| service | ns per request |");
    println!("| --- | --- |");
    println!("| inner service alone (baseline) | {:.0} |", per(bare_time));
    println!(
        "| tenant layer + router lookup + inner | {:.0} |",
        per(layered_time)
    );
    println!(
        "| added by the layer | {:.0} |\n",
        per(layered_time) - per(bare_time)
    );
    Ok(())
}

/// The baseline: SqlService.Query on one pre-opened pool, no tenant layers.
#[derive(Clone)]
enum BaselinePool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// A plain tonic `SqlService` without Tenantry: a map from tenant id (`x-tenant-id`) to a
/// pre-opened sqlx pool, the home-made way to serve a database per tenant.
struct Baseline {
    pools: Arc<HashMap<String, BaselinePool>>,
}

impl BaselinePool {
    async fn close(&self) {
        match self {
            Self::Sqlite(pool) => pool.close().await,
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

/// Serves `pools` on a port of its own; returns channels to it.
async fn baseline_server(pools: HashMap<String, BaselinePool>) -> anyhow::Result<Vec<Channel>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let service = SqlServiceServer::new(Baseline {
        pools: Arc::new(pools),
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tenantry_shared::grpc::incoming(listener))
            .await;
    });
    channels(&format!("http://{address}")).await
}

fn to_value_i64(v: i64) -> dp::Value {
    dp::Value {
        kind: Some(dp::value::Kind::Int64(v)),
    }
}

#[tonic::async_trait]
impl SqlService for Baseline {
    async fn execute(
        &self,
        _request: tonic::Request<dp::ExecuteRequest>,
    ) -> Result<tonic::Response<dp::ExecuteResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("baseline serves Query only"))
    }

    async fn query(
        &self,
        request: tonic::Request<dp::QueryRequest>,
    ) -> Result<tonic::Response<dp::QueryResponse>, tonic::Status> {
        let pool = request
            .metadata()
            .get("x-tenant-id")
            .and_then(|id| id.to_str().ok())
            .and_then(|id| self.pools.get(id))
            .ok_or_else(|| tonic::Status::not_found("no pool for this x-tenant-id"))?
            .clone();
        let statement = request.into_inner().statement.unwrap_or_default();
        let id = match statement.params.first().and_then(|p| p.kind.clone()) {
            Some(dp::value::Kind::Int64(id)) => id,
            _ => 0,
        };
        let sql = sqlx::AssertSqlSafe(statement.sql);
        let row: (String,) = match &pool {
            BaselinePool::Sqlite(pool) => sqlx::query_as(sql).bind(id).fetch_one(pool).await,
            BaselinePool::Postgres(pool) => sqlx::query_as(sql).bind(id).fetch_one(pool).await,
        }
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(dp::QueryResponse {
            columns: vec!["v".into()],
            rows: vec![dp::Row {
                values: vec![dp::Value {
                    kind: Some(dp::value::Kind::Text(row.0)),
                }],
            }],
        }))
    }

    async fn batch(
        &self,
        _request: tonic::Request<dp::BatchRequest>,
    ) -> Result<tonic::Response<dp::BatchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("baseline serves Query only"))
    }
}

/// A load scenario: its label, where it sends requests, and which tenants it uses.
type Scenario<'a> = (String, &'a [Channel], Arc<Vec<String>>);

/// A ratio over rounds: the median and the lowest and highest round.
struct Ratio {
    median: f64,
    low: f64,
    high: f64,
}

impl Ratio {
    /// Scenario `n`'s throughput over scenario `against`'s, round by round.
    fn of(rounds: &[Vec<Measured>], n: usize, against: usize) -> Self {
        let mut ratios: Vec<f64> = rounds[n]
            .iter()
            .zip(&rounds[against])
            .map(|(a, b)| a.throughput / b.throughput)
            .collect();
        ratios.sort_by(f64::total_cmp);
        Self {
            median: ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN),
            low: ratios.first().copied().unwrap_or(f64::NAN),
            high: ratios.last().copied().unwrap_or(f64::NAN),
        }
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} ({:.2}–{:.2})", self.median, self.low, self.high)
    }
}

#[derive(Default)]
struct Measured {
    throughput: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

/// Load that runs before a round's measured time: the requests of the first second after
/// a switch of scenario (while caches, threads and connections of the scenario warm up
/// again) are not counted.
const RAMP: Duration = Duration::from_secs(1);

/// Runs point selects from CONCURRENCY tasks against `tenants`: `RAMP`, then one measured
/// round of `round`.
async fn run_load(
    channels: &[Channel],
    tenants: Arc<Vec<String>>,
    placeholder: &str,
    round: Duration,
) -> Measured {
    let sql = format!("SELECT v FROM kv WHERE id = {placeholder}");
    let running = Load::new(channels, tenants, move |_| dp::Statement {
        sql: sql.clone(),
        params: vec![to_value_i64(rand::rng().random_range(1..=ROWS_PER_TENANT))],
    })
    .workers(CONCURRENCY)
    .ramp(RAMP)
    .only_answers_before_stop()
    .latency_capacity(100_000)
    .start();
    tokio::time::sleep_until((running.counted_from() + round).into()).await;
    let tally = running.stop().await;
    Measured {
        throughput: tally.latencies.len() as f64 / round.as_secs_f64(),
        p50: percentile(&tally.latencies, 0.5),
        p99: percentile(&tally.latencies, 0.99),
        errors: usize::try_from(tally.errors).unwrap_or(usize::MAX),
    }
}

async fn channels(url: &str) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(
            Channel::from_shared(url.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(channels)
}

/// 2 and 3 for one backend; returns summary table lines.
async fn end_to_end(backend: Backend, many: usize) -> anyhow::Result<Vec<String>> {
    let name = match backend {
        Backend::Sqlite => "SQLite",
        Backend::Postgres => "PostgreSQL",
    };
    let run_id = run_id();
    let temp = tempfile::tempdir()?;
    let admin_url = match backend {
        Backend::Postgres => Some(tenantry_testkit::postgres::admin_url().await),
        Backend::Sqlite => None,
    };
    let control_plane_config = ControlPlaneConfig {
        listen_addr: "127.0.0.1:0".parse()?,
        registry_url: temp.path().join("registry.db").display().to_string(),
        ..ControlPlaneConfig::default()
    };
    let control_plane = tenantry_control_plane::start(
        &control_plane_config,
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    // The baseline pool and the first tenant's pool (the 1-tenant scenarios) have the
    // same number of connections. PostgreSQL here allows 100 connections, so the other
    // tenants of the 50 get 1 each (their record's max_connections), under a budget of 64.
    let connections_per_pool = connections_per_pool();
    let other_tenant_connections = match backend {
        Backend::Sqlite => 4,
        Backend::Postgres => 1,
    };
    let plane_config = DataPlaneConfig {
        listen_addr: "127.0.0.1:0".parse()?,
        control_plane_url: control_plane.url(),
        max_connections_per_tenant: other_tenant_connections,
        // Room for every tenant's pool: this measures routing, not budget churn
        // (the routing bench's Zipf scenario covers that).
        postgres_connection_budget: 64,
        ..DataPlaneConfig::default()
    };
    let data_plane = tenantry_data_plane::start(
        &plane_config,
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    let control_channel = Channel::from_shared(control_plane.url())?.connect().await?;
    let location = match &admin_url {
        Some(url) => cp::register_database_server_request::Location::PostgresAdminUrl(url.clone()),
        None => cp::register_database_server_request::Location::SqliteDirectory(
            temp.path().join("tenants").display().to_string(),
        ),
    };
    DatabaseServerServiceClient::new(control_channel.clone())
        .register_database_server(cp::RegisterDatabaseServerRequest {
            name: "main".into(),
            location: Some(location),
        })
        .await?;

    // 2. Create tenants, timing each create. Whatever happens from here on, the tenants
    // created are deleted at the end (their PostgreSQL databases and roles dropped).
    let mut tenants_client = TenantServiceClient::new(control_channel.clone());
    let mut tenant_ids = Vec::new();
    let measured = async {
        let mut create_times = Vec::new();
        for n in 0..many {
            let tenant_id = format!("b{n}-{run_id}");
            tenant_ids.push(tenant_id.clone());
            let started = Instant::now();
            tenants_client
                .create_tenant(cp::CreateTenantRequest {
                    tenant_id: tenant_id.clone(),
                    max_connections: if n == 0 {
                        i32::try_from(connections_per_pool)?
                    } else {
                        0
                    },
                    ..Default::default()
                })
                .await?;
            create_times.push(started.elapsed());
        }
        create_times.sort();
        println!("## {name}: time to create a tenant ({many} tenants)\n");
        println!("| p50 | p99 |");
        println!("| --- | --- |");
        println!(
            "| {} | {} |\n",
            ms(percentile(&create_times, 0.5)),
            ms(percentile(&create_times, 0.99))
        );

        // Schema and rows in every tenant, through the data plane.
        let data_channels = channels(&data_plane.server.url()).await?;
        let mut sql_client = SqlServiceClient::new(data_channels[0].clone());
        let placeholder = match backend {
            Backend::Postgres => "$1",
            Backend::Sqlite => "?",
        };
        for tenant_id in &tenant_ids {
            let mut statements = vec![dp::Statement {
                sql: "CREATE TABLE kv (id BIGINT PRIMARY KEY, v TEXT NOT NULL)".into(),
                params: vec![],
            }];
            statements.push(dp::Statement {
                sql: match backend {
                    Backend::Postgres => format!(
                        "INSERT INTO kv (id, v) SELECT n, 'value-' || n FROM generate_series(1, {ROWS_PER_TENANT}) AS n"
                    ),
                    Backend::Sqlite => format!(
                        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {ROWS_PER_TENANT}) \
                         INSERT INTO kv (id, v) SELECT n, 'value-' || n FROM c"
                    ),
                },
                params: vec![],
            });
            let mut request = tonic::Request::new(dp::BatchRequest { statements });
            request
                .metadata_mut()
                .insert("x-tenant-id", tenant_id.parse()?);
            sql_client.batch(request).await?;
        }

        // The baselines: the first tenant's database on one pre-opened pool, and every
        // tenant's database on a pool of its own (sized like the data plane's), in a map.
        let mut baseline_pools = HashMap::new();
        for (n, tenant_id) in tenant_ids.iter().enumerate() {
            let tenant = tenants_client
                .get_tenant(cp::GetTenantRequest {
                    tenant_id: tenant_id.clone(),
                })
                .await?
                .into_inner();
            let connections = if n == 0 {
                connections_per_pool
            } else {
                other_tenant_connections
            };
            let pool = match &admin_url {
                Some(url) => {
                    let mut parsed = url::Url::parse(url)?;
                    parsed.set_path(&format!("/{}", tenant.database_name));
                    let options = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(connections)
                        .test_before_acquire(false);
                    BaselinePool::Postgres(if n == 0 {
                        options.connect(parsed.as_str()).await?
                    } else {
                        options.connect_lazy(parsed.as_str())?
                    })
                }
                None => {
                    let options = sqlx::sqlite::SqlitePoolOptions::new()
                        .max_connections(connections)
                        .test_before_acquire(false);
                    let connect = sqlx::sqlite::SqliteConnectOptions::new()
                        .filename(temp.path().join("tenants").join(&tenant.database_name));
                    BaselinePool::Sqlite(if n == 0 {
                        options.connect_with(connect).await?
                    } else {
                        options.connect_lazy_with(connect)
                    })
                }
            };
            baseline_pools.insert(tenant_id.clone(), pool);
        }
        let baseline_pool = baseline_pools[&tenant_ids[0]].clone();
        let baseline_channels = baseline_server(HashMap::from([(
            tenant_ids[0].clone(),
            baseline_pool.clone(),
        )]))
        .await?;

        let one = Arc::new(vec![tenant_ids[0].clone()]);
        let all = Arc::new(tenant_ids.clone());
        // Warm every tenant's pool once.
        for tenant_id in all.iter() {
            let mut request = tonic::Request::new(dp::QueryRequest {
                statement: Some(dp::Statement {
                    sql: format!("SELECT v FROM kv WHERE id = {placeholder}"),
                    params: vec![to_value_i64(1)],
                }),
            });
            request
                .metadata_mut()
                .insert("x-tenant-id", tenant_id.parse()?);
            sql_client.query(request).await?;
        }
        // On PostgreSQL, more data planes serve the first tenant with one setting off: the
        // session reset (what it costs), and pipelining (what sending waiting requests
        // together gains), apart from the tenant layers and routing.
        let mut variants = Vec::new();
        if backend == Backend::Postgres {
            for (label, postgres_session_reset, postgres_pipelining) in [
                ("routed, 1 tenant, session reset off", false, true),
                ("routed, 1 tenant, pipelining off", true, false),
            ] {
                let plane = tenantry_data_plane::start(
                    &DataPlaneConfig {
                        postgres_session_reset,
                        postgres_pipelining,
                        ..plane_config.clone()
                    },
                    tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                )
                .await?;
                let plane_channels = channels(&plane.server.url()).await?;
                variants.push((label, plane, plane_channels));
            }
        }
        let mut scenarios: Vec<Scenario<'_>> = vec![
            (
                "baseline (1 pool, no tenant layers)".to_owned(),
                &baseline_channels,
                one.clone(),
            ),
            ("routed, 1 tenant".to_owned(), &data_channels, one.clone()),
            (
                format!("routed, {many} tenants"),
                &data_channels,
                all.clone(),
            ),
        ];
        for (label, _, plane_channels) in &variants {
            scenarios.push(((*label).to_owned(), plane_channels, one.clone()));
        }
        // Creating the tenants' databases leaves dirty pages behind; flush them now so the
        // rounds measure requests, not the server's catch-up writes.
        if let Some(url) = &admin_url {
            use sqlx::Connection;
            let mut admin = sqlx::PgConnection::connect(url).await?;
            sqlx::raw_sql("CHECKPOINT").execute(&mut admin).await?;
            admin.close().await?;
        }
        println!(
            "## {name}: point selects through SqlService ({CONCURRENCY} concurrent callers, {connections_per_pool} connections in the baseline's and the first tenant's pool, {other_tenant_connections} in the others', {} rounds of {:?} per scenario)\n",
            round_count(),
            seconds_per_round() / 2
        );
        let rounds = measure(name, &scenarios, placeholder).await;
        if backend == Backend::Postgres {
            let (_, pools) = data_plane.pools.stats();
            let of = |tenant: &str| {
                pools
                    .iter()
                    .find(|pool| pool.tenant_id.as_str() == tenant)
                    .map_or(0, |pool| pool.pipelined_statements)
            };
            let others: u64 = tenant_ids[1..].iter().map(|tenant| of(tenant)).sum();
            println!(
                "Statements sent in one write with other requests' (`pipelined_statements`, over all rounds and ramps): {} on the first tenant, {others} on the other {}\n",
                of(&tenant_ids[0]),
                many - 1
            );
        }
        let mut summary = report(&scenarios, &rounds, |n| match n {
            0 => "1.00 (baseline)".to_owned(),
            2 if backend == Backend::Postgres => format!(
                "{} of baseline, {} of 1 tenant, {} of 1 tenant with pipelining off",
                Ratio::of(&rounds, 2, 0),
                Ratio::of(&rounds, 2, 1),
                Ratio::of(&rounds, 2, 4)
            ),
            2 => format!(
                "{} of baseline, {} of 1 tenant",
                Ratio::of(&rounds, 2, 0),
                Ratio::of(&rounds, 2, 1)
            ),
            _ => format!("{} of baseline", Ratio::of(&rounds, n, 0)),
        });
        for (_, plane, _) in variants {
            plane.server.shutdown().await?;
        }
        data_plane.server.shutdown().await?;

        // The same load without Tenantry: the 1-pool baseline against a map of pools, one per
        // tenant (after the data planes closed their connections, so that on PostgreSQL both
        // fit in the server's connection limit). Tells what many databases cost the database
        // engine and a home-made service, apart from Tenantry.
        let map_channels = baseline_server(baseline_pools.clone()).await?;
        let without: Vec<Scenario<'_>> = vec![
            (
                "baseline (1 pool, no tenant layers)".to_owned(),
                &baseline_channels,
                one.clone(),
            ),
            (
                format!("baseline, {many} tenants (a map of {many} sqlx pools, no tenant layers)"),
                &map_channels,
                all.clone(),
            ),
        ];
        // Opens the map's pools before the rounds.
        run_load(&map_channels, all.clone(), placeholder, Duration::ZERO).await;
        println!("\n## {name}: the same without Tenantry (a map of sqlx pools)\n");
        let without_rounds = measure(name, &without, placeholder).await;
        summary.extend(report(&without, &without_rounds, |n| match n {
            0 => "1.00 (baseline)".to_owned(),
            _ => format!("{} of 1 pool", Ratio::of(&without_rounds, n, 0)),
        }));
        println!();

        for pool in baseline_pools.values() {
            pool.close().await;
        }
        Ok::<_, anyhow::Error>(summary)
    }
    .await;

    // Clean up: delete every tenant created, even after a failure above.
    let deleted = delete_tenants(&tenants_client, tenant_ids, 4).await;
    control_plane.shutdown().await?;
    let summary = measured?;
    deleted?;
    Ok(summary)
}

/// Runs `round_count()` rounds of every scenario (each round starts with the next
/// scenario) and returns each scenario's rounds.
async fn measure(name: &str, scenarios: &[Scenario<'_>], placeholder: &str) -> Vec<Vec<Measured>> {
    let round_length = seconds_per_round() / 2;
    let mut rounds: Vec<Vec<Measured>> = scenarios.iter().map(|_| Vec::new()).collect();
    for round in 0..round_count() {
        for step in 0..scenarios.len() {
            let n = (round + step) % scenarios.len();
            if !scenario_wanted(n) {
                rounds[n].push(Measured::default());
                continue;
            }
            let (_, scenario_channels, tenants) = &scenarios[n];
            let measured = run_load(
                scenario_channels,
                tenants.clone(),
                placeholder,
                round_length,
            )
            .await;
            rounds[n].push(measured);
        }
        if std::env::var_os("TENANTRY_BENCH_VERBOSE").is_some() {
            let line: Vec<String> = rounds
                .iter()
                .map(|r| format!("{:.0}", r[round].throughput))
                .collect();
            eprintln!("{name} round {round}: {} req/s", line.join(" / "));
        }
    }
    rounds
}

/// Prints a scenario table (median round of each, and `ratio(n)`); returns summary lines.
fn report(
    scenarios: &[Scenario<'_>],
    rounds: &[Vec<Measured>],
    ratio: impl Fn(usize) -> String,
) -> Vec<String> {
    println!(
        "| scenario | throughput (req/s, median round) | p50 | p99 | errors | ratio (median of rounds, range) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut summary = Vec::new();
    for (n, ((label, _, _), scenario_rounds)) in scenarios.iter().zip(rounds).enumerate() {
        let mut sorted: Vec<&Measured> = scenario_rounds.iter().collect();
        sorted.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
        let Some(m) = sorted.get(sorted.len() / 2) else {
            continue;
        };
        let ratio = ratio(n);
        println!(
            "| {label} | {:.0} | {} | {} | {} | {ratio} |",
            m.throughput,
            ms(m.p50),
            ms(m.p99),
            m.errors
        );
        summary.push(format!(
            "{label} | {:.0} | {} | {} | {ratio}",
            m.throughput,
            ms(m.p50),
            ms(m.p99)
        ));
    }
    summary
}
