//! What happens to work a caller gives up on, and to answers too large to send: an
//! abandoned PostgreSQL statement is cancelled on the server and its connection's slots
//! are freed only once its backend is gone (so a tenant never holds more backends than
//! its cap), a call without a deadline gets the default statement timeout, a result over
//! the response limit stops the statement instead of being read to its end, and a
//! connection that breaks after a write was sent answers "outcome unknown", never
//! "retry". (Memory under huge single values: `memory_bound.rs`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_testkit::{
    Backend, Patience, Sandbox, SandboxOptions, backend_tests, plain, postgres_only_tests,
    wait_until_ok, with_deadline, with_tenant,
};
use tonic::Code;

backend_tests!(
    calls_without_a_deadline_get_the_default_statement_timeout,
    a_result_past_the_limit_stops_the_statement,
);
postgres_only_tests!(
    abandoned_statements_are_cancelled_and_stay_within_the_cap,
    a_connection_lost_after_sending_answers_outcome_unknown,
);

/// The data plane's backends of one tenant database in pg_stat_activity: all of them,
/// and those running `pg_sleep`.
async fn backends_of(admin: &sqlx::PgPool, database: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'active' AND query LIKE '%pg_sleep%') \
         FROM pg_stat_activity \
         WHERE application_name = 'tenantry-data-plane' AND datname = $1",
    )
    .bind(database)
    .fetch_one(admin)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn abandoned_statements_are_cancelled_and_stay_within_the_cap() {
    const CAP: u32 = 4;
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            max_connections_per_tenant: Some(CAP),
            pool_acquire_timeout_ms: Some(10_000),
            ..Default::default()
        },
    )
    .await;
    let admin = sqlx::PgPool::connect(sandbox.pg_admin_url.as_deref().unwrap_or_default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let id = sandbox.tid("abandon");
    let tenant = sandbox.create(&id).await;

    // pg_stat_activity every 10 ms for the whole test.
    let most_seen = Arc::new(AtomicI64::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (admin, database) = (admin.clone(), tenant.database_name.clone());
        let (most_seen, watching) = (most_seen.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Acquire) {
                let (all, _) = backends_of(&admin, &database).await;
                most_seen.fetch_max(all, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // 12 calls of a 10-minute statement, without a deadline, one every 50 ms, each given
    // up by its client after 250 ms: later ones find the connections earlier ones left.
    let mut calls = Vec::new();
    for n in 0..12u64 {
        let mut sql = sandbox.sql();
        let id = id.clone();
        calls.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * n)).await;
            let request = with_tenant(
                dp::QueryRequest {
                    statement: plain("SELECT pg_sleep(600)"),
                },
                &id,
            );
            tokio::time::timeout(Duration::from_millis(250), sql.query(request))
                .await
                .map(|answer| answer.map(|_| ()).map_err(|status| status.code()))
        }));
    }
    for call in calls {
        let outcome = call.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            outcome.is_err(),
            "a 10-minute statement answered: {outcome:?}"
        );
    }
    // The server stops every abandoned statement (it would run for 10 minutes).
    let patience = Patience::new(Duration::from_secs(10), Duration::from_millis(20));
    wait_until_ok(patience, || async {
        match backends_of(&admin, &tenant.database_name).await {
            (_, 0) => Ok(()),
            (_, sleeping) => Err(format!(
                "{sleeping} abandoned pg_sleep statements still run on the server"
            )),
        }
    })
    .await;
    // The tenant still serves, on connections that are idle again.
    let rows = sandbox
        .query(&id, "SELECT 1 AS one", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.rows.len(), 1);
    watching.store(false, Ordering::Release);
    watcher.await.unwrap_or_else(|e| panic!("{e}"));
    let most_seen = most_seen.load(Ordering::Acquire);
    assert!(
        most_seen <= i64::from(CAP),
        "pg_stat_activity showed {most_seen} backends for a tenant whose cap is {CAP}"
    );
    assert!(most_seen > 0, "the watcher never saw a backend");
}

async fn calls_without_a_deadline_get_the_default_statement_timeout(backend: Backend) {
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            default_statement_timeout_ms: Some(300),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("default");
    sandbox.create(&id).await;
    let long = match backend {
        Backend::Postgres => "SELECT pg_sleep(30)",
        // About a billion steps.
        Backend::Sqlite => {
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000) \
             SELECT count(*) FROM c"
        }
    };
    let status = sandbox
        .query(&id, long, vec![])
        .await
        .err()
        .unwrap_or_else(|| panic!("a long statement without a deadline answered"));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("default_statement_timeout_ms"),
        "{status:?}"
    );
    // A deadline of the call's own wins over the default, longer or shorter.
    let short = match backend {
        Backend::Postgres => "SELECT pg_sleep(0.6) IS NULL AS slept",
        Backend::Sqlite => {
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 300000) \
             SELECT count(*) FROM c"
        }
    };
    let request = with_deadline(
        dp::QueryRequest {
            statement: plain(short),
        },
        &id,
        Some(Duration::from_secs(30)),
    );
    if backend == Backend::Postgres {
        // 0.6 s: past the default, within the call's own deadline.
        let answered = sandbox.sql().query(request).await;
        assert!(answered.is_ok(), "{answered:?}");
    }
    let request = with_deadline(
        dp::QueryRequest {
            statement: plain(long),
        },
        &id,
        Some(Duration::from_millis(100)),
    );
    let status = sandbox
        .sql()
        .query(request)
        .await
        .err()
        .unwrap_or_else(|| panic!("a long statement answered within 100 ms"));
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        !status.message().contains("default_statement_timeout_ms")
            || status.code() == Code::Cancelled,
        "{status:?}"
    );
    // The tenant still serves.
    assert!(sandbox.query(&id, "SELECT 1", vec![]).await.is_ok());
}

async fn a_result_past_the_limit_stops_the_statement(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("endless");
    let tenant = sandbox.create(&id).await;
    // Two billion rows of 100 bytes: read to its end, it would take the better part of
    // an hour; the response limit is passed after about 40,000 rows.
    let endless = match backend {
        // In the select list, generate_series streams its rows (in FROM it would make
        // all of them before the first).
        Backend::Postgres => {
            "SELECT repeat('x', 100) AS filler, generate_series(1, 2000000000) AS n"
        }
        Backend::Sqlite => {
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 2000000000) \
             SELECT hex(zeroblob(50)) AS filler FROM c"
        }
    };
    let status = sandbox
        .query(&id, endless, vec![])
        .await
        .err()
        .unwrap_or_else(|| panic!("two billion rows fit the response limit"));
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit"), "{status:?}");
    if backend == Backend::Postgres {
        // Cancelled where reading stopped, and the answer says so.
        assert!(
            status
                .message()
                .contains("cancelled: nothing it did was kept"),
            "{status:?}"
        );
        // The statement was cancelled on the server, not left to run for an hour.
        let admin = sqlx::PgPool::connect(sandbox.pg_admin_url.as_deref().unwrap_or_default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let patience = Patience::new(Duration::from_secs(20), Duration::from_millis(20));
        wait_until_ok(patience, || async {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = $1 AND state = 'active' AND query LIKE '%generate_series%'",
            )
            .bind(&tenant.database_name)
            .fetch_one(&admin)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            match running {
                0 => Ok(()),
                _ => Err("the statement past the limit still runs on the server".to_owned()),
            }
        })
        .await;
    }
    // The tenant still serves.
    let rows = sandbox
        .query(&id, "SELECT 2 AS two", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.rows.len(), 1);
}

async fn a_connection_lost_after_sending_answers_outcome_unknown() {
    let sandbox = Sandbox::start(Backend::Postgres).await;
    // A second "server": the same PostgreSQL behind a TCP proxy the test can cut.
    let proxy = sandbox.register_behind_proxy("cut").await;
    let id = sandbox.tid("unknown");
    sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: id.clone(),
            database_server: "cut".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sandbox
        .execute(&id, "CREATE TABLE w (v INTEGER)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // A write that is on the server when the connection is cut.
    let writing = {
        let mut sql = sandbox.sql();
        let request = with_tenant(
            dp::ExecuteRequest {
                statement: plain("INSERT INTO w SELECT 1 FROM pg_sleep(1)"),
            },
            &id,
        );
        tokio::spawn(async move { sql.execute(request).await })
    };
    // Cut once the write runs on the server.
    let admin = sqlx::PgPool::connect(sandbox.pg_admin_url.as_deref().unwrap_or_default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let patience = Patience::new(Duration::from_secs(10), Duration::from_millis(5));
    wait_until_ok(patience, || async {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND query LIKE 'INSERT INTO w SELECT 1 FROM pg_sleep%'",
        )
        .fetch_one(&admin)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        match running {
            0 => Err("the write never started on the server".to_owned()),
            _ => Ok(()),
        }
    })
    .await;
    proxy.black_hole().await;
    let status = writing
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .unwrap_or_else(|| panic!("a write answered through a cut connection"));
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(status.message().contains("outcome unknown"), "{status:?}");
    assert!(!status.message().contains("retry"), "{status:?}");

    // Once the server is unreachable, nothing is sent: that is UNAVAILABLE, with retry
    // advice.
    let request = with_deadline(
        dp::ExecuteRequest {
            statement: plain("INSERT INTO w VALUES (2)"),
        },
        &id,
        Some(Duration::from_secs(10)),
    );
    let status = sandbox
        .sql()
        .execute(request)
        .await
        .err()
        .unwrap_or_else(|| panic!("a write answered through a dead server"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
