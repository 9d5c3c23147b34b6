//! Routing at scale, end to end: pushed route updates to several data planes, the
//! per-server connection budget, serving through a control-plane outage and a database
//! server outage, and graceful shutdown. Real gRPC on loopback, real SQLite files and a
//! real PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tenantry_data_plane::DataPlane;
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::pool_service_client::PoolServiceClient;
use tenantry_proto::dataplane::v1::sql_service_client::SqlServiceClient;
use tenantry_testkit::load::{Load, Pick, RunningLoad};
use tenantry_testkit::{
    Backend, Patience, Sandbox, SandboxOptions, backend_tests, connect, plain, postgres_only_tests,
    wait_until_ok, with_deadline,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

backend_tests!(
    watch_routes_snapshot_resume_and_live,
    changes_reach_every_data_plane,
    created_tenant_is_routable_at_once_even_if_remembered_unknown,
    tenant_max_connections_is_kept,
    data_plane_serves_through_control_plane_outage,
    shutdown_drains_calls_in_flight,
);

postgres_only_tests!(
    budget_caps_connections_over_many_tenants,
    full_budget_fails_fast_with_its_cause,
    unreachable_server_fails_only_its_tenants,
);

const WAIT: Duration = Duration::from_secs(20);

/// Waits until the data plane has applied route `version`.
async fn wait_applied(plane: &DataPlane, version: i64) {
    let mut applied = plane.route_stream.applied();
    tokio::time::timeout(WAIT, applied.wait_for(|applied| *applied >= version))
        .await
        .unwrap_or_else(|_| panic!("data plane never applied route version {version}"))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until every data plane has applied `version`; returns the time taken since
/// `since`.
async fn wait_all_applied(planes: &[&DataPlane], version: i64, since: Instant) -> Duration {
    for plane in planes {
        wait_applied(plane, version).await;
    }
    since.elapsed()
}

async fn query_on(
    channel: &Channel,
    tenant_id: &str,
    sql: &str,
    timeout: Option<Duration>,
) -> Result<dp::QueryResponse, tonic::Status> {
    let request = with_deadline(
        dp::QueryRequest {
            statement: plain(sql),
        },
        tenant_id,
        timeout,
    );
    SqlServiceClient::new(channel.clone())
        .query(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn code_on(channel: &Channel, tenant_id: &str) -> Code {
    match query_on(channel, tenant_id, "SELECT 1", None).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn health(channel: &Channel, service: &str) -> Option<ServingStatus> {
    HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()
        .and_then(|response| ServingStatus::try_from(response.into_inner().status).ok())
}

async fn wait_health(channel: &Channel, service: &str, want: ServingStatus) {
    let patience = Patience::new(WAIT, Duration::from_millis(20));
    wait_until_ok(patience, || async move {
        let got = health(channel, service).await;
        if got == Some(want) {
            Ok(())
        } else {
            Err(format!(
                "health of {service:?} is {got:?}, expected {want:?}"
            ))
        }
    })
    .await;
}

/// Reads a route stream until a message marked `caught_up`; returns the messages.
async fn until_caught_up(
    stream: &mut tonic::Streaming<cp::WatchRoutesResponse>,
) -> Vec<cp::WatchRoutesResponse> {
    let mut messages = Vec::new();
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap_or_else(|_| panic!("the stream went quiet before catching up"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("the stream ended"));
        let caught_up = message.caught_up;
        messages.push(message);
        if caught_up {
            return messages;
        }
    }
}

async fn watch(sandbox: &Sandbox, after_version: i64) -> tonic::Streaming<cp::WatchRoutesResponse> {
    sandbox
        .routing()
        .watch_routes(cp::WatchRoutesRequest { after_version })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner()
}

async fn watch_routes_snapshot_resume_and_live(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    // More than one message's worth (500 routes).
    let ids = create_many(&sandbox, "w", 510, "").await;

    // A snapshot: every tenant once, in version order, over several messages.
    let mut stream = watch(&sandbox, 0).await;
    let snapshot = until_caught_up(&mut stream).await;
    assert!(snapshot.len() >= 2, "510 routes fit in one message?");
    assert!(snapshot.iter().all(|m| m.snapshot));
    let routes: Vec<&cp::Route> = snapshot.iter().flat_map(|m| &m.routes).collect();
    assert_eq!(routes.len(), ids.len());
    assert!(
        routes
            .windows(2)
            .all(|w| w[0].route_version < w[1].route_version)
    );
    assert!(
        routes
            .iter()
            .all(|r| r.state == cp::TenantState::Active as i32)
    );
    let version = snapshot.last().map(|m| m.version).unwrap_or_default();
    assert_eq!(
        version,
        routes.last().map(|r| r.route_version).unwrap_or_default()
    );

    // Changes made while nobody listens: a resume gets exactly those, not a snapshot.
    for id in &ids[..3] {
        sandbox
            .tenants()
            .suspend_tenant(cp::SuspendTenantRequest {
                tenant_id: id.clone(),
                reason: "backlog".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut resumed = watch(&sandbox, version).await;
    let backlog = until_caught_up(&mut resumed).await;
    assert!(backlog.iter().all(|m| !m.snapshot));
    let changed: Vec<(String, i32)> = backlog
        .iter()
        .flat_map(|m| &m.routes)
        .map(|r| (r.tenant_id.clone(), r.state))
        .collect();
    let expected: Vec<(String, i32)> = ids[..3]
        .iter()
        .map(|id| (id.clone(), cp::TenantState::Suspended as i32))
        .collect();
    assert_eq!(changed, expected);

    // Live: the next change arrives on the open stream by itself.
    sandbox
        .tenants()
        .resume_tenant(cp::ResumeTenantRequest {
            tenant_id: ids[0].clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let live = until_caught_up(&mut resumed).await;
    let live_routes: Vec<&cp::Route> = live.iter().flat_map(|m| &m.routes).collect();
    assert_eq!(live_routes.len(), 1);
    assert_eq!(live_routes[0].tenant_id, ids[0]);
    assert_eq!(live_routes[0].state, cp::TenantState::Active as i32);

    // A version this registry never reached (another registry's): a snapshot again.
    let mut foreign = watch(&sandbox, version + 1_000_000).await;
    let again = until_caught_up(&mut foreign).await;
    assert!(again.iter().all(|m| m.snapshot));
    assert_eq!(
        again.iter().map(|m| m.routes.len()).sum::<usize>(),
        ids.len()
    );

    // Nonsense is refused.
    let refused = sandbox
        .routing()
        .watch_routes(cp::WatchRoutesRequest { after_version: -1 })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(refused, Some(Code::InvalidArgument));
}

async fn changes_reach_every_data_plane(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let second = sandbox.start_data_plane().await;
    let third = sandbox.start_data_plane().await;
    let channels = [
        sandbox.data_plane_channel.clone(),
        connect(&second.server.url()).await,
        connect(&third.server.url()).await,
    ];
    let planes = [sandbox.data_plane(), &second, &third];
    let id = sandbox.tid("spread");

    let mut timings = Vec::new();
    let started = Instant::now();
    let created = sandbox.create(&id).await;
    timings.push((
        "create",
        wait_all_applied(&planes, created.route_version, started).await,
    ));
    for channel in &channels {
        assert_eq!(code_on(channel, &id).await, Code::Ok);
    }

    let started = Instant::now();
    let suspended = sandbox
        .tenants()
        .suspend_tenant(cp::SuspendTenantRequest {
            tenant_id: id.clone(),
            reason: "audit".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    timings.push((
        "suspend",
        wait_all_applied(&planes, suspended.route_version, started).await,
    ));
    // Applied means applied: no data plane serves the tenant any more.
    for channel in &channels {
        assert_eq!(code_on(channel, &id).await, Code::FailedPrecondition);
    }

    let started = Instant::now();
    let resumed = sandbox
        .tenants()
        .resume_tenant(cp::ResumeTenantRequest {
            tenant_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    timings.push((
        "resume",
        wait_all_applied(&planes, resumed.route_version, started).await,
    ));
    for channel in &channels {
        assert_eq!(code_on(channel, &id).await, Code::Ok);
    }

    let started = Instant::now();
    let deleted = sandbox
        .tenants()
        .delete_tenant(cp::DeleteTenantRequest {
            tenant_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    timings.push((
        "delete",
        wait_all_applied(&planes, deleted.route_version, started).await,
    ));
    for (plane, channel) in planes.iter().zip(&channels) {
        assert_eq!(code_on(channel, &id).await, Code::NotFound);
        // The pool of the deleted tenant is gone (closed at once when the route came).
        let (_, tenants) = plane.pools.stats();
        assert!(
            tenants.iter().all(|t| t.tenant_id.as_str() != id),
            "pool of a deleted tenant still open"
        );
    }
    for (change, took) in &timings {
        eprintln!(
            "{backend:?}: {change} seen by all three data planes {:.1} ms after the call was sent",
            took.as_secs_f64() * 1000.0
        );
    }
    second
        .server
        .shutdown()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    third
        .server
        .shutdown()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn created_tenant_is_routable_at_once_even_if_remembered_unknown(backend: Backend) {
    // Remembered as unknown for a minute: only the pushed route can clear it in time.
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            unknown_tenant_ttl_ms: Some(60_000),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("late");
    let channel = sandbox.data_plane_channel.clone();
    assert_eq!(code_on(&channel, &id).await, Code::NotFound);
    // Still remembered: no second lookup.
    let fetches = sandbox.data_plane().router.route_fetches();
    assert_eq!(code_on(&channel, &id).await, Code::NotFound);
    assert_eq!(sandbox.data_plane().router.route_fetches(), fetches);

    sandbox.create(&id).await;
    // Straight after CreateTenant returns: served, on the first try.
    assert_eq!(code_on(&channel, &id).await, Code::Ok);
}

async fn tenant_max_connections_is_kept(backend: Backend) {
    // 8 slow calls on 2 connections: the last ones wait for three calls ahead of them,
    // which on a loaded machine can take longer than the default acquire timeout. This
    // test is about the cap, not the timeout.
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            pool_acquire_timeout_ms: Some(60_000),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("capped");
    sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: id.clone(),
            max_connections: 2,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: sandbox.tid("greedy"),
            max_connections: -1,
            ..Default::default()
        })
        .await
        .err();
    assert_eq!(refused.map(|s| s.code()), Some(Code::InvalidArgument));
    let slow = match backend {
        Backend::Postgres => "SELECT pg_sleep(0.2)::text AS slept",
        Backend::Sqlite => {
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400000) \
             SELECT count(*) FROM c"
        }
    };
    let busiest = Arc::new(AtomicU64::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let pools = sandbox.data_plane().pools.clone();
        let busiest = busiest.clone();
        let watching = watching.clone();
        let id = id.clone();
        tokio::spawn(async move {
            while watching.load(Ordering::Acquire) {
                let (_, tenants) = pools.stats();
                if let Some(tenant) = tenants.iter().find(|t| t.tenant_id.as_str() == id) {
                    assert_eq!(tenant.max_connections, 2);
                    busiest.fetch_max(u64::from(tenant.connections.open), Ordering::AcqRel);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let channel = sandbox.data_plane_channel.clone();
    let calls = (0..8).map(|_| query_on(&channel, &id, slow, None));
    for result in futures::future::join_all(calls).await {
        result.unwrap_or_else(|e| panic!("{e}"));
    }
    watching.store(false, Ordering::Release);
    watcher.await.unwrap_or_else(|e| panic!("{e}"));
    let busiest = busiest.load(Ordering::Acquire);
    assert!(
        (1..=2).contains(&busiest),
        "tenant with max_connections 2 had {busiest} connections open"
    );
}

/// Connections the data plane holds to this run's tenant databases, per pg_stat_activity.
async fn data_plane_backends(admin: &sqlx::PgPool, run_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'tenantry-data-plane' AND datname LIKE $1",
    )
    .bind(format!("tenantry\\_%{run_id}"))
    .fetch_one(admin)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn create_many(sandbox: &Sandbox, prefix: &str, count: usize, server: &str) -> Vec<String> {
    let ids: Vec<String> = (0..count)
        .map(|n| sandbox.tid(&format!("{prefix}{n}")))
        .collect();
    let created: Vec<_> = futures::stream::iter(ids.clone())
        .map(|id| {
            let mut tenants = sandbox.tenants();
            let server = server.to_owned();
            async move {
                tenants
                    .create_tenant(cp::CreateTenantRequest {
                        tenant_id: id.clone(),
                        database_server: server,
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("create {id}: {e}"))
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    assert_eq!(created.len(), count);
    ids
}

async fn budget_caps_connections_over_many_tenants() {
    const BUDGET: u32 = 20;
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            postgres_connection_budget: Some(BUDGET),
            pool_idle_timeout_ms: Some(1500),
            // This test is about the cap, not the wait: with other tests loading the
            // machine, each of these requests opens a connection (300 tenants through
            // 20), so give the wait room. full_budget_fails_fast_with_its_cause tests
            // the bounded wait.
            pool_acquire_timeout_ms: Some(15_000),
            ..Default::default()
        },
    )
    .await;
    let admin = sqlx::PgPool::connect(sandbox.pg_admin_url.as_deref().unwrap_or_default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ids = Arc::new(create_many(&sandbox, "b", 300, "").await);

    let most_seen = Arc::new(AtomicU64::new(0));
    let loading = Arc::new(AtomicBool::new(true));
    let watcher = {
        let admin = admin.clone();
        let run_id = sandbox.run_id.clone();
        let most_seen = most_seen.clone();
        let loading = loading.clone();
        tokio::spawn(async move {
            while loading.load(Ordering::Acquire) {
                let now = data_plane_backends(&admin, &run_id).await;
                most_seen.fetch_max(u64::try_from(now).unwrap_or(0), Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // 32 concurrent clients, round robin over the 300 tenants, three times over.
    let tally = Load::new(
        std::slice::from_ref(&sandbox.data_plane_channel),
        ids.clone(),
        |_| dp::Statement {
            sql: "SELECT 1 AS one".into(),
            params: vec![],
        },
    )
    .workers(32)
    .pick(Pick::RoundRobin)
    .max_calls(ids.len() as u64 * 3)
    .start()
    .wait()
    .await;
    loading.store(false, Ordering::Release);
    watcher.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tally.calls, ids.len() as u64 * 3);
    assert!(
        tally.errors == 0,
        "{} failed requests: {:?}",
        tally.errors,
        tally.failures
    );
    let most_seen = most_seen.load(Ordering::Acquire);
    assert!(
        most_seen <= u64::from(BUDGET),
        "pg_stat_activity showed {most_seen} data-plane connections; the budget is {BUDGET}"
    );
    assert!(most_seen > 0, "the watcher never saw a connection");
    let (servers, _) = sandbox.data_plane().pools.stats();
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].budget, BUDGET);
    assert!(
        servers[0].evictions > 0,
        "300 tenants through 20 connections must have evicted idle ones"
    );
    // The same figures over gRPC.
    let stats = PoolServiceClient::new(sandbox.data_plane_channel.clone())
        .get_pool_stats(dp::GetPoolStatsRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(stats.servers.len(), 1);
    assert_eq!(stats.servers[0].budget, BUDGET);
    assert!(stats.tenants.len() <= ids.len());

    // Idle pools close: no connection left after the idle timeout.
    wait_until_ok(Patience::new(WAIT, Duration::from_millis(100)), || async {
        let open = data_plane_backends(&admin, &sandbox.run_id).await;
        let (servers, tenants) = sandbox.data_plane().pools.stats();
        if open == 0 && servers[0].connections.open == 0 && tenants.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{open} connections and {} pools still open after the idle timeout",
                tenants.len()
            ))
        }
    })
    .await;
    admin.close().await;
}

async fn full_budget_fails_fast_with_its_cause() {
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            postgres_connection_budget: Some(2),
            pool_acquire_timeout_ms: Some(300),
            ..Default::default()
        },
    )
    .await;
    let ids = create_many(&sandbox, "f", 3, "").await;
    let channel = sandbox.data_plane_channel.clone();
    // Two tenants hold the whole budget with slow statements...
    let holders: Vec<_> = ids[..2]
        .iter()
        .map(|id| {
            let channel = channel.clone();
            let id = id.clone();
            tokio::spawn(async move {
                query_on(&channel, &id, "SELECT pg_sleep(2)::text AS slept", None).await
            })
        })
        .collect();
    wait_until_ok(Patience::new(WAIT, Duration::from_millis(10)), || async {
        let in_use = sandbox
            .data_plane()
            .pools
            .stats()
            .0
            .first()
            .map(|s| s.connections.in_use);
        if in_use == Some(2) {
            Ok(())
        } else {
            Err("the slow statements never started".to_owned())
        }
    })
    .await;
    // ...so the third gets UNAVAILABLE after the bounded wait, naming the budget.
    let started = Instant::now();
    let refused = query_on(&channel, &ids[2], "SELECT 1", None).await.err();
    let waited = started.elapsed();
    let refused = refused.unwrap_or_else(|| panic!("the third tenant got a connection"));
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("connection budget"),
        "{}",
        refused.message()
    );
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    for holder in holders {
        holder
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Once they are done, the third tenant is served (an idle connection is evicted).
    assert_eq!(code_on(&channel, &ids[2]).await, Code::Ok);
}

/// `SELECT 1` on `ids` round robin from 8 clients, each call with a 5 s deadline, until
/// stopped.
fn load(channel: Channel, ids: Arc<Vec<String>>) -> RunningLoad {
    Load::new(&[channel], ids, |_| dp::Statement {
        sql: "SELECT 1".into(),
        params: vec![],
    })
    .workers(8)
    .pick(Pick::RoundRobin)
    .call_timeout(Duration::from_secs(5))
    .start()
}

async fn data_plane_serves_through_control_plane_outage(backend: Backend) {
    let mut sandbox = Sandbox::start(backend).await;
    let ids = Arc::new(create_many(&sandbox, "o", 50, "").await);
    let channel = sandbox.data_plane_channel.clone();
    for id in ids.iter() {
        sandbox.wait_for_code(id, Code::Ok).await;
    }
    wait_health(
        &channel,
        tenantry_data_plane::ROUTE_STREAM_HEALTH_SERVICE,
        ServingStatus::Serving,
    )
    .await;

    let running = load(channel.clone(), ids.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    sandbox.stop_control_plane().await;
    // The data plane notices the lost stream and says so, but keeps serving.
    wait_health(
        &channel,
        tenantry_data_plane::ROUTE_STREAM_HEALTH_SERVICE,
        ServingStatus::NotServing,
    )
    .await;
    assert_eq!(health(&channel, "").await, Some(ServingStatus::Serving));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // A tenant this data plane has never seen cannot be looked up: UNAVAILABLE.
    let never_seen = sandbox.tid("newcomer");
    let status = query_on(&channel, &never_seen, "SELECT 1", None)
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(status, Some(Code::Unavailable));

    sandbox.start_control_plane(Default::default()).await;
    wait_health(
        &channel,
        tenantry_data_plane::ROUTE_STREAM_HEALTH_SERVICE,
        ServingStatus::Serving,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tally = running.stop().await;
    let (failures, calls) = (tally.failures, tally.calls);
    assert!(calls > 0);
    assert!(
        tally.errors == 0,
        "{} of {calls} calls failed during the outage: {:?}",
        tally.errors,
        &failures[..failures.len().min(5)]
    );
    // A change made after the restart reaches the data plane.
    let suspended = sandbox
        .tenants()
        .suspend_tenant(cp::SuspendTenantRequest {
            tenant_id: ids[0].clone(),
            reason: "after the outage".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    wait_applied(sandbox.data_plane(), suspended.route_version).await;
    assert_eq!(code_on(&channel, &ids[0]).await, Code::FailedPrecondition);
}

async fn shutdown_drains_calls_in_flight(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let ids = create_many(&sandbox, "d", 4, "").await;
    let mut config = sandbox.data_plane_config.clone();
    config.shutdown_grace_ms = 300;
    let plane = sandbox.start_data_plane_with(&config).await;
    let channel = connect(&plane.server.url()).await;
    for id in &ids {
        assert_eq!(code_on(&channel, id).await, Code::Ok);
    }
    let slow = match backend {
        Backend::Postgres => "SELECT pg_sleep(0.6)::text AS slept",
        Backend::Sqlite => {
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1500000) \
             SELECT count(*) FROM c"
        }
    };
    let calls: Vec<_> = ids
        .iter()
        .flat_map(|id| [id.clone(), id.clone()])
        .map(|id| {
            let channel = channel.clone();
            tokio::spawn(async move { query_on(&channel, &id, slow, None).await })
        })
        .collect();
    // Every call is running before the shutdown starts.
    wait_until_ok(Patience::new(WAIT, Duration::from_millis(5)), || async {
        let (_, tenants) = plane.pools.stats();
        let in_use: u32 = tenants.iter().map(|t| t.connections.in_use).sum();
        if in_use == 8 {
            Ok(())
        } else {
            Err(format!("only {in_use} calls started"))
        }
    })
    .await;
    let url = plane.server.url();
    let stopping = tokio::spawn(async move { plane.server.shutdown().await });
    // First, health says NOT_SERVING while the plane still takes calls.
    wait_health(&channel, "", ServingStatus::NotServing).await;
    for call in calls {
        let result = call.await.unwrap_or_else(|e| panic!("{e}"));
        result.unwrap_or_else(|status| panic!("an in-flight call failed: {status}"));
    }
    stopping
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Then it is gone.
    let after = Channel::from_shared(url)
        .unwrap_or_else(|e| panic!("{e}"))
        .connect()
        .await;
    assert!(after.is_err(), "the data plane still accepts connections");
}

async fn unreachable_server_fails_only_its_tenants() {
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            pool_acquire_timeout_ms: Some(1000),
            ..Default::default()
        },
    )
    .await;
    // A second "server": the same PostgreSQL behind a TCP proxy the test can cut.
    let proxy = sandbox.register_behind_proxy("flaky").await;
    let steady = Arc::new(create_many(&sandbox, "s", 5, "main").await);
    let flaky = create_many(&sandbox, "k", 3, "flaky").await;
    let channel = sandbox.data_plane_channel.clone();
    for id in steady.iter().chain(&flaky) {
        assert_eq!(code_on(&channel, id).await, Code::Ok);
    }

    let running = load(channel.clone(), steady.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The flaky server stops answering: open connections are cut, new ones hang.
    proxy.black_hole().await;
    for id in &flaky {
        let started = Instant::now();
        let status = query_on(&channel, id, "SELECT 1", Some(Duration::from_secs(4)))
            .await
            .err()
            .unwrap_or_else(|| panic!("{id} still served through a dead server"));
        let took = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(took < Duration::from_secs(4), "took {took:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tally = running.stop().await;
    let (failures, calls) = (tally.failures, tally.calls);
    assert!(calls > 0);
    assert!(
        tally.errors == 0,
        "tenants on the healthy server failed: {:?}",
        &failures[..failures.len().min(5)]
    );
}
