//! Tracing overhead (`cargo bench --bench tracing`): SQLite point-select throughput
//! through the data plane with tracing on (spans exported over OTLP/gRPC to a collector
//! in this process, default ratio 0.01) against the same load with tracing off, in one
//! run. Each side has its own control plane, data plane and load generator on a runtime
//! of its own, whose threads use that side's subscriber: the "off" side logs as a plane
//! without an OTLP endpoint does (warnings only here), the "on" side also has the
//! OpenTelemetry layer. The sides are measured in pairs of short rounds back to back
//! (which side goes first alternates), so that a machine's drift hits both alike; the
//! ratio reported is the median of the pairs' ratios, with their spread.

use std::sync::Arc;
use std::time::Duration;

use tenantry_control_plane::ControlPlaneConfig;
use tenantry_data_plane::DataPlaneConfig;
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::controlplane::v1::database_server_service_client::DatabaseServerServiceClient;
use tenantry_proto::controlplane::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::sql_service_client::SqlServiceClient;
use tenantry_shared::telemetry::{self, LogFormat, TracingConfig};
use tenantry_testkit::bench::{ms, percentile, run_id, seconds_per_round};
use tenantry_testkit::load::Load;
use tenantry_testkit::otlp::TraceCollector;
use tonic::transport::Channel;

const CONCURRENCY: usize = 32;
const CHANNELS: usize = 4;
/// Pairs of rounds; each round is a sixth of `TENANTRY_BENCH_SECONDS` (default 0.5 s).
const PAIRS: usize = 40;

/// One side of the comparison: a platform with one tenant holding a 100-row table.
struct Side {
    _temp: tempfile::TempDir,
    channels: Vec<Channel>,
    /// The one tenant, as a load's tenant list.
    tenant: Arc<Vec<String>>,
}

async fn side() -> anyhow::Result<Side> {
    let temp = tempfile::tempdir()?;
    let control_plane = tenantry_control_plane::start(
        &ControlPlaneConfig {
            listen_addr: "127.0.0.1:0".parse()?,
            registry_url: temp.path().join("registry.db").display().to_string(),
            shutdown_grace_ms: 0,
            ..ControlPlaneConfig::default()
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    let data_plane = tenantry_data_plane::start(
        &DataPlaneConfig {
            listen_addr: "127.0.0.1:0".parse()?,
            control_plane_url: control_plane.url(),
            shutdown_grace_ms: 0,
            ..DataPlaneConfig::default()
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    let control = Channel::from_shared(control_plane.url())?.connect().await?;
    DatabaseServerServiceClient::new(control.clone())
        .register_database_server(cp::RegisterDatabaseServerRequest {
            name: "main".into(),
            location: Some(
                cp::register_database_server_request::Location::SqliteDirectory(
                    temp.path().join("tenants").display().to_string(),
                ),
            ),
        })
        .await?;
    let tenant = format!("traced-{}", run_id());
    TenantServiceClient::new(control)
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: tenant.clone(),
            ..Default::default()
        })
        .await?;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(
            Channel::from_shared(data_plane.server.url())?
                .connect()
                .await?,
        );
    }
    let mut request = tonic::Request::new(dp::BatchRequest {
        statements: vec![
            dp::Statement {
                sql: "CREATE TABLE kv (id INTEGER PRIMARY KEY, v TEXT NOT NULL)".into(),
                params: vec![],
            },
            dp::Statement {
                sql:
                    "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 100) \
                      INSERT INTO kv (id, v) SELECT n, 'value-' || n FROM c"
                        .into(),
                params: vec![],
            },
        ],
    });
    request
        .metadata_mut()
        .insert("x-tenant-id", tenant.parse()?);
    SqlServiceClient::new(channels[0].clone())
        .batch(request)
        .await?;
    // The planes live as long as the runtime that runs them.
    std::mem::forget(control_plane);
    std::mem::forget(data_plane);
    Ok(Side {
        _temp: temp,
        channels,
        tenant: Arc::new(vec![tenant]),
    })
}

struct Round {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

async fn round(side: &Side, duration: Duration) -> anyhow::Result<Round> {
    let running = Load::new(&side.channels, side.tenant.clone(), |n| dp::Statement {
        sql: "SELECT v FROM kv WHERE id = ?".into(),
        params: vec![dp::Value {
            kind: Some(dp::value::Kind::Int64(
                i64::try_from(n % 100).unwrap_or(0) + 1,
            )),
        }],
    })
    .workers(CONCURRENCY)
    .start();
    tokio::time::sleep(duration).await;
    let tally = running.stop().await;
    Ok(Round {
        rate: tally.latencies.len() as f64 / tally.elapsed.as_secs_f64(),
        p50: percentile(&tally.latencies, 0.5),
        p99: percentile(&tally.latencies, 0.99),
    })
}

/// A runtime whose threads all use `dispatch`.
/// Threads are named after the side, so a profiler can tell the sides apart.
fn runtime(name: &str, dispatch: tracing::Dispatch) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).thread_name(name).enable_all();
    builder.on_thread_start(move || {
        std::mem::forget(tracing::dispatcher::set_default(&dispatch));
    });
    Ok(builder.build()?)
}

fn median(mut rounds: Vec<Round>) -> Round {
    rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    rounds.remove(rounds.len() / 2)
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return Ok(());
    }
    // The collector gets a runtime of its own, outside both measured sides.
    let collector_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let collector = TraceCollector::counting_spans();
    // The exporter's channel lives on the collector's runtime too.
    let (on_dispatch, guard) = collector_runtime.block_on(async {
        let endpoint = collector.serve().await?;
        telemetry::dispatch(
            "tenantry-bench",
            LogFormat::Text,
            &TracingConfig {
                otlp_endpoint: Some(endpoint),
                sample_ratio: Some(0.01),
            },
            "warn",
        )
    })?;
    let _collector_thread = std::thread::spawn(move || {
        collector_runtime.block_on(std::future::pending::<()>());
    });
    let (off_dispatch, _off_guard) = telemetry::dispatch(
        "tenantry-bench",
        LogFormat::Text,
        &TracingConfig {
            otlp_endpoint: Some(String::new()),
            sample_ratio: None,
        },
        "warn",
    )?;
    let off = runtime("tracing-off", off_dispatch)?;
    let on = runtime("tracing-on", on_dispatch)?;
    let on_side = on.block_on(side())?;
    let off_side = off.block_on(side())?;
    on.block_on(round(&on_side, Duration::from_secs(1)))?;
    off.block_on(round(&off_side, Duration::from_secs(1)))?;
    let round_length = seconds_per_round() / 6;
    let (mut on_rounds, mut off_rounds, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..PAIRS {
        let (on_round, off_round) = if pair % 2 == 0 {
            let off_round = off.block_on(round(&off_side, round_length))?;
            (on.block_on(round(&on_side, round_length))?, off_round)
        } else {
            let on_round = on.block_on(round(&on_side, round_length))?;
            (on_round, off.block_on(round(&off_side, round_length))?)
        };
        ratios.push(on_round.rate / off_round.rate);
        if std::env::var_os("TENANTRY_BENCH_VERBOSE").is_some() {
            eprintln!(
                "pair {pair}: off {:.0} req/s, on {:.0} req/s",
                off_round.rate, on_round.rate
            );
        }
        on_rounds.push(on_round);
        off_rounds.push(off_round);
    }
    guard.flush();
    ratios.sort_by(f64::total_cmp);
    let (on_round, off_round) = (median(on_rounds), median(off_rounds));
    println!(
        "# Tracing overhead (SQLite point select, {CONCURRENCY} concurrent callers, \
         {PAIRS} pairs of {:.1} s rounds)\n",
        round_length.as_secs_f64()
    );
    println!("| tracing | throughput (req/s, median) | p50 | p99 | ratio (median of pairs) |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| off (baseline) | {:.0} | {} | {} | 1.00 |",
        off_round.rate,
        ms(off_round.p50),
        ms(off_round.p99)
    );
    println!(
        "| on, exporting, default ratio 0.01 | {:.0} | {} | {} | {:.2} |\n",
        on_round.rate,
        ms(on_round.p50),
        ms(on_round.p99),
        ratios[ratios.len() / 2]
    );
    println!(
        "pair ratios: {}",
        ratios
            .iter()
            .map(|ratio| format!("{ratio:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "spans received by the collector: {}",
        collector.span_count()
    );
    Ok(())
}
