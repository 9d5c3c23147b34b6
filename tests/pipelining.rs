//! Requests of one tenant sharing a connection, end to end: each gets its own answer on
//! SQLite and on PostgreSQL (where waiting requests go out together in one write, or,
//! with pipelining off, one by one), and an answer does not wait for the statements sent
//! behind it.

use std::sync::Arc;
use std::time::Duration;

use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::pool_service_client::PoolServiceClient;
use tenantry_testkit::{
    Backend, Sandbox, SandboxOptions, backend_tests, int, placeholder, postgres_only_tests,
    wait_until, with_database,
};

backend_tests!(requests_sharing_a_connection_keep_their_own_answers);

postgres_only_tests!(
    requests_sharing_a_connection_with_pipelining_off,
    an_answer_does_not_wait_for_statements_behind_it,
);

/// Many concurrent requests on a tenant with one connection. On PostgreSQL, requests that
/// wait for the connection go out together in one write (`pipelined_statements`); each
/// must still get its own answer (or error) and a session no earlier request changed.
async fn requests_sharing_a_connection_keep_their_own_answers(backend: Backend) {
    requests_sharing_a_connection(backend, true).await;
}

/// The same with `postgres_pipelining = false`: every request waits for the connection
/// of its own, and none goes out with another's.
async fn requests_sharing_a_connection_with_pipelining_off() {
    requests_sharing_a_connection(Backend::Postgres, false).await;
}

async fn requests_sharing_a_connection(backend: Backend, pipelining: bool) {
    let sandbox = Arc::new(
        Sandbox::start_with(
            backend,
            SandboxOptions {
                max_connections_per_tenant: Some(1),
                postgres_pipelining: Some(pipelining),
                ..Default::default()
            },
        )
        .await,
    );
    let id = sandbox.tid("pipe");
    sandbox.create(&id).await;
    let p1 = placeholder(backend, 1);
    sandbox
        .execute(&id, "CREATE TABLE t (id bigint PRIMARY KEY)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (echo, change_session, fail) = match backend {
        Backend::Postgres => (
            format!("SELECT CAST({p1} AS bigint) AS echo, current_setting('search_path') AS path"),
            format!(
                "SELECT CAST({p1} AS bigint) AS echo, set_config('search_path', 'elsewhere', false) AS path"
            ),
            format!("SELECT 1 / (CAST({p1} AS bigint) - CAST({p1} AS bigint)) AS boom"),
        ),
        Backend::Sqlite => (
            format!("SELECT CAST({p1} AS INTEGER) AS echo, 'main' AS path"),
            format!("SELECT CAST({p1} AS INTEGER) AS echo, 'elsewhere' AS path"),
            format!("SELECT json_extract('not json' || {p1}, '$') AS boom"),
        ),
    };
    let insert = format!("INSERT INTO t (id) VALUES ({p1})");
    // Each statement once first, so the connection has them all prepared.
    let path = |response: &dp::QueryResponse| match &response.rows[0].values[1].kind {
        Some(dp::value::Kind::Text(path)) => path.clone(),
        other => panic!("path: {other:?}"),
    };
    let default_path = path(
        &sandbox
            .query(&id, &echo, vec![int(0)])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    sandbox
        .query(&id, &change_session, vec![int(0)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let failure = sandbox
        .query(&id, &fail, vec![int(0)])
        .await
        .expect_err("the failing statement succeeded");
    sandbox
        .execute(&id, &insert, vec![int(-1)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let requests = 400;
    let mut tasks = Vec::new();
    for n in 0..requests {
        let sandbox = sandbox.clone();
        let (id, echo, change_session, fail, insert) = (
            id.clone(),
            echo.clone(),
            change_session.clone(),
            fail.clone(),
            insert.clone(),
        );
        let (default_path, failure_code) = (default_path.clone(), failure.code());
        tasks.push(tokio::spawn(async move {
            let value = i64::from(n);
            match n % 4 {
                0 | 1 => {
                    let sql = if n % 4 == 0 { &echo } else { &change_session };
                    let response = sandbox
                        .query(&id, sql, vec![int(value)])
                        .await
                        .unwrap_or_else(|e| panic!("request {n}: {e}"));
                    let answered = match &response.rows[0].values[0].kind {
                        Some(dp::value::Kind::Int64(answered)) => *answered,
                        other => panic!("request {n}: echo {other:?}"),
                    };
                    assert_eq!(answered, value, "request {n} got another request's answer");
                    if n % 4 == 0 {
                        assert_eq!(
                            path(&response),
                            default_path,
                            "request {n} ran with search_path set by an earlier request"
                        );
                    }
                }
                2 => {
                    let error = sandbox
                        .query(&id, &fail, vec![int(value)])
                        .await
                        .expect_err("the failing statement succeeded");
                    assert_eq!(error.code(), failure_code, "request {n}: {error}");
                }
                _ => {
                    let response = sandbox
                        .execute(&id, &insert, vec![int(value)])
                        .await
                        .unwrap_or_else(|e| panic!("request {n}: {e}"));
                    assert_eq!(response.rows_affected, 1, "request {n}");
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let count = sandbox
        .query(&id, "SELECT count(*) AS n FROM t", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        count.rows[0].values[0].kind,
        Some(dp::value::Kind::Int64(i64::from(requests / 4) + 1)),
        "every insert ran exactly once"
    );
    let stats = PoolServiceClient::new(sandbox.data_plane_channel.clone())
        .get_pool_stats(dp::GetPoolStatsRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    let pipelined = stats
        .tenants
        .iter()
        .find(|tenant| tenant.tenant_id == id)
        .map(|tenant| tenant.pipelined_statements)
        .unwrap_or_else(|| panic!("no pool figures for {id}"));
    match backend {
        // With 400 requests queued on one connection, most go out with others.
        Backend::Postgres if pipelining => {
            assert!(pipelined > 0, "no statement was pipelined");
        }
        Backend::Postgres | Backend::Sqlite => assert_eq!(
            pipelined, 0,
            "statements went out with others' though nothing may pipeline"
        ),
    }
}

/// Requests of one tenant sent together in one write: each gets its answer as soon as it
/// is read, not once the statements behind it have ended. The request behind waits for a
/// row lock that the test releases only after the request ahead has answered.
async fn an_answer_does_not_wait_for_statements_behind_it() {
    use sqlx::Connection;
    let sandbox = Arc::new(
        Sandbox::start_with(
            Backend::Postgres,
            SandboxOptions {
                max_connections_per_tenant: Some(1),
                ..Default::default()
            },
        )
        .await,
    );
    let id = sandbox.tid("ahead");
    let tenant = sandbox.create(&id).await;
    for sql in [
        "CREATE TABLE t (id bigint PRIMARY KEY)",
        "INSERT INTO t VALUES (1), (2), (3)",
    ] {
        sandbox
            .execute(&id, sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    const LOCK_ROW: &str = "SELECT id FROM t WHERE id = $1 FOR UPDATE";
    // Prepared on the tenant's one connection, so that waiting requests can go together.
    sandbox
        .query(&id, LOCK_ROW, vec![int(2)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let admin = sandbox
        .pg_admin_url
        .clone()
        .unwrap_or_else(|| panic!("no PostgreSQL admin URL"));
    let url = with_database(&admin, &tenant.database_name);
    let lock = |row: i64| {
        let url = url.clone();
        async move {
            let mut connection = sqlx::PgConnection::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "BEGIN; SELECT 1 FROM t WHERE id = {row} FOR UPDATE"
            )))
            .execute(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            connection
        }
    };
    let mut holder_lock = lock(3).await;
    let mut behind_lock = lock(1).await;
    let read = |row: i64| {
        let sandbox = sandbox.clone();
        let id = id.clone();
        tokio::spawn(async move { sandbox.query(&id, LOCK_ROW, vec![int(row)]).await })
    };
    let pool = |sandbox: Arc<Sandbox>, id: String| async move {
        PoolServiceClient::new(sandbox.data_plane_channel.clone())
            .get_pool_stats(dp::GetPoolStatsRequest {})
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner()
            .tenants
            .into_iter()
            .find(|tenant| tenant.tenant_id == id)
    };
    let wait_for_waiting = |count: u32| {
        let (sandbox, id) = (sandbox.clone(), id.clone());
        wait_until(
            format!("{count} requests waiting for the tenant's connection"),
            move || {
                let (sandbox, id) = (sandbox.clone(), id.clone());
                async move {
                    pool(sandbox, id)
                        .await
                        .and_then(|tenant| tenant.connections)
                        .is_some_and(|figures| figures.waiting >= count)
                }
            },
        )
    };
    // The holder takes the one connection and waits for row 3; two more requests wait for
    // the connection, the one ahead (row 2, free) before the one behind (row 1, locked).
    let holder = read(3);
    let watcher = sqlx::PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let watcher = &tokio::sync::Mutex::new(watcher);
    wait_until(
        "the first request waiting for row 3".to_owned(),
        || async move {
            let blocked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut *watcher.lock().await)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            blocked > 0
        },
    )
    .await;
    let ahead = {
        let request = read(2);
        wait_for_waiting(1).await;
        request
    };
    let behind = read(1);
    wait_for_waiting(2).await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut holder_lock)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answered = tokio::time::timeout(Duration::from_secs(30), ahead)
        .await
        .unwrap_or_else(|_| panic!("the request ahead waited for the statement behind it"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        answered.rows[0].values[0].kind,
        Some(dp::value::Kind::Int64(2))
    );
    assert!(!behind.is_finished(), "row 1 is still locked");
    sqlx::raw_sql("COMMIT")
        .execute(&mut behind_lock)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (request, row) in [(behind, 1), (holder, 3)] {
        let response = request
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            response.rows[0].values[0].kind,
            Some(dp::value::Kind::Int64(row))
        );
    }
    let pipelined = pool(sandbox.clone(), id.clone())
        .await
        .map_or(0, |tenant| tenant.pipelined_statements);
    assert!(
        pipelined >= 2,
        "the two waiting requests did not go out together"
    );
}
