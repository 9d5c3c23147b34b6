//! Tenant identification and isolation end to end, on SQLite and PostgreSQL:
//! `x-tenant-id` is checked before anything is looked up, concurrent requests that miss
//! the route cache make one look-up (and unknown ids are remembered), and no response
//! ever carries another tenant's data; a wrong route shows that the check can fail.

use std::sync::Arc;

use tenantry_proto::dataplane::v1 as dp;
use tenantry_testkit::{Backend, Sandbox, backend_tests, placeholder, text, with_tenant};
use tonic::Code;

backend_tests!(
    bad_tenant_metadata_is_refused,
    isolation_under_concurrent_traffic,
    isolation_check_catches_a_wrong_route,
    concurrent_misses_make_one_route_call,
);

async fn bad_tenant_metadata_is_refused(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let request = || dp::QueryRequest {
        statement: Some(dp::Statement {
            sql: "SELECT 1".into(),
            params: vec![],
        }),
    };
    // Missing.
    let missing = sandbox
        .sql()
        .query(tonic::Request::new(request()))
        .await
        .err();
    assert_eq!(
        missing.as_ref().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );
    assert!(missing.is_some_and(|s| s.message().contains("x-tenant-id")));
    // Empty, malformed, oversized.
    for bad in [
        "",
        "Acme",
        "1acme",
        "ac_me",
        "acme-",
        "a b",
        &"a".repeat(49),
        "acme;drop",
    ] {
        let status = sandbox
            .sql()
            .query(with_tenant(request(), bad))
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(status, Some(Code::InvalidArgument), "{bad:?}");
    }
    // Non-ASCII (binary metadata cannot carry it as text; send raw bytes).
    let mut non_ascii = tonic::Request::new(request());
    non_ascii.metadata_mut().insert(
        "x-tenant-id",
        tonic::metadata::MetadataValue::try_from("acme\u{e9}".as_bytes())
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let status = sandbox.sql().query(non_ascii).await.err().map(|s| s.code());
    assert_eq!(status, Some(Code::InvalidArgument));
    // Twice.
    let mut twice = with_tenant(request(), "acme");
    twice.metadata_mut().append(
        "x-tenant-id",
        "globex".parse().unwrap_or_else(|e| panic!("{e}")),
    );
    let status = sandbox.sql().query(twice).await.err().map(|s| s.code());
    assert_eq!(status, Some(Code::InvalidArgument));
    // Unknown tenant (asked twice: the second answer comes from the negative cache).
    for _ in 0..2 {
        let status = sandbox
            .query(&sandbox.tid("ghost"), "SELECT 1", vec![])
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(status, Some(Code::NotFound));
    }
}

/// Creates `count` tenants with a canary row each, runs concurrent mixed traffic
/// across them, and returns every response that carried another tenant's canary.
async fn cross_tenant_leaks(sandbox: &Arc<Sandbox>, ids: &[String], rounds: usize) -> Vec<String> {
    let p1 = placeholder(sandbox.backend, 1);
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let sandbox = sandbox.clone();
        let ids = ids.to_vec();
        let p1 = p1.clone();
        tasks.push(tokio::spawn(async move {
            let mut leaks = Vec::new();
            for round in 0..rounds {
                let id = &ids[(worker * 7 + round * 3) % ids.len()];
                let canaries: Vec<String> = match round % 3 {
                    0 => sandbox
                        .query(id, "SELECT owner FROM canary", vec![])
                        .await
                        .unwrap_or_else(|e| panic!("{id}: {e}"))
                        .rows
                        .iter()
                        .filter_map(|r| match &r.values[0].kind {
                            Some(dp::value::Kind::Text(t)) => Some(t.clone()),
                            _ => None,
                        })
                        .collect(),
                    1 => {
                        sandbox
                            .execute(
                                id,
                                &format!("INSERT INTO hits (owner) VALUES ({p1})"),
                                vec![text(id)],
                            )
                            .await
                            .unwrap_or_else(|e| panic!("{id}: {e}"));
                        vec![]
                    }
                    _ => sandbox
                        .query(id, "SELECT DISTINCT owner FROM hits", vec![])
                        .await
                        .unwrap_or_else(|e| panic!("{id}: {e}"))
                        .rows
                        .iter()
                        .filter_map(|r| match &r.values[0].kind {
                            Some(dp::value::Kind::Text(t)) => Some(t.clone()),
                            _ => None,
                        })
                        .collect(),
                };
                for canary in canaries {
                    if &canary != id {
                        leaks.push(format!("request for {id} saw {canary}"));
                    }
                }
            }
            leaks
        }));
    }
    let mut leaks = Vec::new();
    for task in tasks {
        leaks.extend(task.await.unwrap_or_else(|e| panic!("{e}")));
    }
    leaks
}

async fn setup_canaries(sandbox: &Sandbox, count: usize) -> Vec<String> {
    let p1 = placeholder(sandbox.backend, 1);
    let mut ids = Vec::new();
    for n in 0..count {
        let id = sandbox.tid(&format!("iso{n}"));
        sandbox.create(&id).await;
        sandbox
            .batch(
                &id,
                &[
                    ("CREATE TABLE canary (owner TEXT NOT NULL)", vec![]),
                    ("CREATE TABLE hits (owner TEXT NOT NULL)", vec![]),
                    (
                        &format!("INSERT INTO canary (owner) VALUES ({p1})"),
                        vec![text(&id)],
                    ),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        ids.push(id);
    }
    ids
}

async fn isolation_under_concurrent_traffic(backend: Backend) {
    let sandbox = Arc::new(Sandbox::start(backend).await);
    let ids = setup_canaries(&sandbox, 20).await;
    let leaks = cross_tenant_leaks(&sandbox, &ids, 60).await;
    assert!(leaks.is_empty(), "cross-tenant responses: {leaks:?}");
}

/// Shows the isolation check can fail: with one tenant's route deliberately pointing at
/// another tenant's database, the same check reports leaks.
async fn isolation_check_catches_a_wrong_route(backend: Backend) {
    // Nothing changes these tenants during the test, so the route stream leaves the
    // wrong route in place.
    let sandbox = Arc::new(Sandbox::start(backend).await);
    let ids = setup_canaries(&sandbox, 3).await;
    let router = sandbox.data_plane().router.clone();
    let victim = tenantry_shared::TenantId::parse(&ids[0]).unwrap_or_else(|e| panic!("{e}"));
    let neighbour = tenantry_shared::TenantId::parse(&ids[1]).unwrap_or_else(|e| panic!("{e}"));
    let wrong = router
        .cached(&neighbour)
        .unwrap_or_else(|| panic!("route of {neighbour} not cached"));
    router.insert_route_for_tests(victim, wrong);
    let leaks = cross_tenant_leaks(&sandbox, &ids, 12).await;
    assert!(
        !leaks.is_empty(),
        "a wrong route went unnoticed by the isolation check"
    );
}

async fn concurrent_misses_make_one_route_call(backend: Backend) {
    let sandbox = Arc::new(Sandbox::start(backend).await);
    let id = sandbox.tid("flight");
    sandbox.create(&id).await;
    // The route stream brings the route; drop it again so every call below misses.
    sandbox.wait_for_code(&id, Code::Ok).await;
    let router = sandbox.data_plane().router.clone();
    let tenant = tenantry_shared::TenantId::parse(&id).unwrap_or_else(|e| panic!("{e}"));
    router.forget_route_for_tests(&tenant);
    let before = router.route_fetches();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let sandbox = sandbox.clone();
            let id = id.clone();
            tokio::spawn(async move { sandbox.query(&id, "SELECT 1", vec![]).await.map(|_| ()) })
        })
        .collect();
    for call in calls {
        call.await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        router.route_fetches() - before,
        1,
        "50 concurrent misses, one GetRoute"
    );

    // An unknown id asked for 50 times at once, then again: one GetRoute, answered from
    // the negative cache after that.
    let ghost = sandbox.tid("ghost");
    let before = router.route_fetches();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let sandbox = sandbox.clone();
            let ghost = ghost.clone();
            tokio::spawn(async move {
                sandbox
                    .query(&ghost, "SELECT 1", vec![])
                    .await
                    .err()
                    .map(|s| s.code())
            })
        })
        .collect();
    for call in calls {
        assert_eq!(
            call.await.unwrap_or_else(|e| panic!("{e}")),
            Some(Code::NotFound)
        );
    }
    let status = sandbox
        .query(&ghost, "SELECT 1", vec![])
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(status, Some(Code::NotFound));
    assert_eq!(
        router.route_fetches() - before,
        1,
        "unknown ids are remembered"
    );
}
