//! Session state end to end: what a request changes in its connection's session
//! (settings, temporary tables, transactions, LISTEN, advisory locks, its statement
//! timeout) does not outlive the request, on SQLite and PostgreSQL; and a PostgreSQL
//! connection the server ended is not lent again.

use std::time::Duration;

use tenantry_proto::dataplane::v1 as dp;
use tenantry_testkit::{
    Backend, Patience, Sandbox, SandboxOptions, backend_tests, execute_within, int,
    postgres_only_tests, query_within, text, wait_until, wait_until_ok, with_database,
};
use tonic::Code;

backend_tests!(session_state_does_not_leak);

postgres_only_tests!(
    idle_connections_the_server_ended_are_not_lent,
    statements_the_tenant_prepares_do_not_outlive_requests,
    refused_effects_reached_through_code_are_refused_or_undone,
);

async fn session_state_does_not_leak(backend: Backend) {
    // One connection per tenant, so the next request surely reuses the connection. No
    // default statement timeout: requests without a deadline run with none, so any
    // timeout a probe sees is one a request left behind.
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            max_connections_per_tenant: Some(1),
            default_statement_timeout_ms: Some(0),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("sess");
    sandbox.create(&id).await;
    match backend {
        Backend::Postgres => {
            let before = sandbox
                .query(&id, "SELECT current_setting('search_path') AS p", vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            sandbox
                .execute(&id, "SET search_path TO nowhere", vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let after = sandbox
                .query(&id, "SELECT current_setting('search_path') AS p", vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                before.rows, after.rows,
                "SET search_path leaked into the next request"
            );
            // set_config() from a SELECT (what a function could do as well).
            sandbox
                .query(
                    &id,
                    "SELECT set_config('search_path', 'elsewhere', false)",
                    vec![],
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let after_config = sandbox
                .query(&id, "SELECT current_setting('search_path') AS p", vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                before.rows, after_config.rows,
                "set_config() leaked into the next request"
            );
            // Transactions cannot be left open: transaction control is refused.
            let begin = sandbox.execute(&id, "BEGIN", vec![]).await.err();
            assert_eq!(
                begin.as_ref().map(|s| s.code()),
                Some(Code::InvalidArgument)
            );
            assert!(begin.is_some_and(|s| s.message().contains("Batch")));
            let savepoint = sandbox
                .execute(&id, "SAVEPOINT probe", vec![])
                .await
                .err()
                .map(|s| s.code());
            assert_eq!(savepoint, Some(Code::InvalidArgument));
            sandbox
                .execute(&id, "CREATE TEMP TABLE scratch (x int)", vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let temp = sandbox
                .query(&id, "SELECT * FROM scratch", vec![])
                .await
                .err()
                .map(|s| s.code());
            assert_eq!(
                temp,
                Some(Code::InvalidArgument),
                "a temp table outlived its request"
            );
            // A statement that drops the connection's prepared statements on the server
            // does not break the ones the connection had cached.
            for drop_all in ["DEALLOCATE ALL", "DISCARD ALL", "DISCARD PLANS"] {
                sandbox
                    .execute(&id, drop_all, vec![])
                    .await
                    .unwrap_or_else(|e| panic!("{drop_all}: {e}"));
                let again = sandbox
                    .query(&id, "SELECT current_setting('search_path') AS p", vec![])
                    .await
                    .unwrap_or_else(|e| panic!("a cached statement after {drop_all}: {e}"));
                assert_eq!(before.rows, again.rows);
            }
            session_reset_runs_before_the_next_statement(&sandbox, &id).await;
            statement_timeout_ends_with_its_request().await;
            advisory_locks_do_not_outlive_requests(&sandbox).await;
        }
        Backend::Sqlite => {
            let begin = sandbox
                .execute(&id, "BEGIN", vec![])
                .await
                .err()
                .map(|s| s.code());
            assert_eq!(begin, Some(Code::InvalidArgument));
            sandbox
                .execute(&id, "CREATE TABLE t (x INTEGER)", vec![])
                .await
                .unwrap_or_else(|e| panic!("the transaction was not rolled back: {e}"));
            // A write from another connection would block on a leftover transaction; a
            // Batch (which begins its own transaction) must succeed.
            sandbox
                .batch(&id, &[("INSERT INTO t VALUES (1)", vec![])])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let pragma = sandbox
                .execute(&id, "PRAGMA foreign_keys = OFF", vec![])
                .await
                .err()
                .map(|s| s.code());
            assert_eq!(pragma, Some(Code::InvalidArgument));
        }
    }
}

/// PostgreSQL: the reset of a connection that served a request runs before anything of
/// the next request, including the preparation of a new statement, and statements that
/// cannot run behind it in one transaction (VACUUM) still run.
async fn session_reset_runs_before_the_next_statement(sandbox: &Sandbox, id: &str) {
    for sql in [
        "CREATE SCHEMA other",
        "CREATE TABLE other.probe (v TEXT)",
        "INSERT INTO other.probe VALUES ('other')",
        "CREATE TABLE public.probe (v TEXT)",
        "INSERT INTO public.probe VALUES ('public')",
        "SET search_path TO other, public",
    ] {
        sandbox
            .execute(id, sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // A new text: prepared (names resolved) in the next request.
    let probe = sandbox
        .query(id, "SELECT v FROM probe", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        probe.rows[0].values,
        vec![text("public")],
        "a statement was prepared with the previous request's search_path"
    );
    sandbox
        .execute(id, "LISTEN tenantry_probe", vec![])
        .await
        .unwrap_or_else(|e| panic!("LISTEN: {e}"));
    let listening = sandbox
        .query(id, "SELECT count(*) FROM pg_listening_channels()", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        listening.rows[0].values,
        vec![int(0)],
        "LISTEN outlived its request"
    );
    // VACUUM cannot run in a transaction block or behind other statements: with the
    // reset (and a deadline's statement timeout) due ahead of it, it still runs.
    let vacuum = execute_within("VACUUM probe", id, Duration::from_secs(60));
    sandbox
        .sql()
        .execute(vacuum)
        .await
        .unwrap_or_else(|e| panic!("VACUUM with a deadline: {e}"));
    sandbox
        .execute(id, "VACUUM public.probe", vec![])
        .await
        .unwrap_or_else(|e| panic!("VACUUM: {e}"));
    // A connection's first request, whose reset goes out behind it: VACUUM there too.
    let fresh = sandbox.tid("fresh");
    sandbox.create(&fresh).await;
    sandbox
        .sql()
        .execute(execute_within("VACUUM", &fresh, Duration::from_secs(60)))
        .await
        .unwrap_or_else(|e| panic!("VACUUM as a connection's first request: {e}"));
    sandbox
        .query(&fresh, "SELECT 1 AS one", vec![])
        .await
        .unwrap_or_else(|e| panic!("after VACUUM as a connection's first request: {e}"));
    // The deadline's statement timeout ended with its request.
    let timed = query_within("SELECT 1 AS one", id, Duration::from_secs(60));
    sandbox
        .sql()
        .query(timed)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let timeout = sandbox
        .query(
            id,
            "SELECT current_setting('statement_timeout') AS t",
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        timeout.rows[0].values,
        vec![text("0")],
        "a request's statement timeout outlived it"
    );
    // A connection the server ends under a request is not lent again.
    let ended = sandbox
        .query(id, "SELECT pg_terminate_backend(pg_backend_pid())", vec![])
        .await
        .err();
    assert_eq!(
        ended.as_ref().map(|s| s.code()),
        Some(Code::Unavailable),
        "{ended:?}"
    );
    sandbox
        .query(id, "SELECT v FROM probe", vec![])
        .await
        .unwrap_or_else(|e| panic!("after the server ended a connection: {e}"));
    // COPY over the connection is refused, and the tenant's next request runs.
    for copy in [
        "COPY public.probe FROM STDIN",
        "COPY public.probe TO STDOUT",
    ] {
        let refused = sandbox.execute(id, copy, vec![]).await.err();
        assert_eq!(
            refused.as_ref().map(|s| s.code()),
            Some(Code::InvalidArgument),
            "{copy}: {refused:?}"
        );
        assert!(
            refused.is_some_and(|s| s.message().contains("COPY")),
            "{copy}: the message names COPY"
        );
        sandbox
            .query(id, "SELECT v FROM probe", vec![])
            .await
            .unwrap_or_else(|e| panic!("after {copy}: {e}"));
    }
}

/// PostgreSQL with the session reset off: a request's statement timeout still ends with
/// the request, whether its statement succeeded, failed, or had to run alone (VACUUM).
async fn statement_timeout_ends_with_its_request() {
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            max_connections_per_tenant: Some(1),
            postgres_session_reset: Some(false),
            // The probe below runs without a deadline: with no default one either, any
            // statement timeout it sees is one a request left behind.
            default_statement_timeout_ms: Some(0),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("timeout");
    sandbox.create(&id).await;
    sandbox
        .execute(&id, "CREATE TABLE probe (v TEXT)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (sql, fails) in [
        ("SELECT 1", false),
        ("SELECT * FROM nowhere", true),
        ("VACUUM probe", false),
        ("VACUUM nowhere", true),
    ] {
        let outcome = sandbox
            .sql()
            .execute(execute_within(sql, &id, Duration::from_secs(60)))
            .await;
        assert_eq!(outcome.is_err(), fails, "{sql}: {outcome:?}");
        let timeout = sandbox
            .query(
                &id,
                "SELECT current_setting('statement_timeout') AS t",
                vec![],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            timeout.rows[0].values,
            vec![text("0")],
            "the statement timeout of {sql:?} outlived its request"
        );
    }
}

/// PostgreSQL: tenants cannot take session-level advisory locks (provisioning revokes
/// them), transaction-level ones work in a Batch, and a tenant database where the
/// functions are granted again (as for a tenant provisioned before the revoke) still
/// gets its locks released between requests on the same connection.
async fn advisory_locks_do_not_outlive_requests(sandbox: &Sandbox) {
    let id = sandbox.tid("lock");
    sandbox.create(&id).await;
    let refused = sandbox
        .query(&id, "SELECT pg_advisory_lock(42)", vec![])
        .await
        .err();
    assert_eq!(
        refused.as_ref().map(|s| s.code()),
        Some(Code::InvalidArgument),
        "{refused:?}"
    );
    assert!(
        refused
            .as_ref()
            .is_some_and(|s| s.message().contains("pg_advisory_xact_lock")),
        "the refusal says what to use instead: {refused:?}"
    );
    sandbox
        .batch(&id, &[("SELECT pg_advisory_xact_lock(42)", vec![])])
        .await
        .unwrap_or_else(|e| panic!("transaction-level advisory lock in a Batch: {e}"));

    // A tenant whose role can take them: granted back before its first connection.
    let legacy = sandbox.tid("legacy");
    let tenant = sandbox.create(&legacy).await;
    let admin = sandbox
        .pg_admin_url
        .as_deref()
        .unwrap_or_else(|| panic!("PostgreSQL sandbox without an admin URL"));
    {
        use sqlx::Connection;
        let mut connection =
            sqlx::PgConnection::connect(&with_database(admin, &tenant.database_name))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        sqlx::raw_sql("GRANT EXECUTE ON FUNCTION pg_catalog.pg_advisory_lock(bigint) TO PUBLIC")
            .execute(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = connection.close().await;
    }
    // The connection's first reset releases them and finds out that its role can take
    // them; the later resets must release them too.
    let mut first_pid = None;
    for request in 0..3 {
        let locked = sandbox
            .query(
                &legacy,
                "SELECT pg_backend_pid() AS pid FROM (SELECT pg_advisory_lock(42)) AS l",
                vec![],
            )
            .await
            .unwrap_or_else(|e| panic!("a role granted pg_advisory_lock may take it: {e}"));
        let after = sandbox
            .query(&legacy, LOCKS_HELD, vec![])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = first_pid.get_or_insert_with(|| locked.rows[0].values[0].clone());
        assert_eq!(
            (&locked.rows[0].values[0], &after.rows[0].values[0]),
            (&*pid, &*pid),
            "every request ran on the same connection"
        );
        assert_eq!(
            after.rows[0].values[1],
            int(0),
            "a session-level advisory lock outlived its request (lock {request})"
        );
    }
}

/// The backend's pid and the advisory locks it holds.
const LOCKS_HELD: &str = "SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM pg_locks \
     WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS held";

/// The server ends a tenant's idle connections (as a restart, a failover or
/// `idle_session_timeout` would): the tenant's next requests get new connections and
/// succeed, instead of failing on the dead ones.
async fn idle_connections_the_server_ended_are_not_lent() {
    use sqlx::Connection;
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            max_connections_per_tenant: Some(1),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("ended");
    sandbox.create(&id).await;
    let backend_pid = || async {
        let answer = sandbox
            .query(&id, "SELECT pg_backend_pid() AS pid", vec![])
            .await
            .unwrap_or_else(|e| panic!("the request after the server ended a connection: {e}"));
        match answer.rows[0].values[0].kind {
            Some(dp::value::Kind::Int64(pid)) => pid,
            ref other => panic!("pg_backend_pid() gave {other:?}"),
        }
    };
    let admin = sandbox
        .pg_admin_url
        .clone()
        .unwrap_or_else(|| panic!("no PostgreSQL admin URL"));
    let admin = &tokio::sync::Mutex::new(
        sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mut pid = backend_pid().await;
    for round in 0..3 {
        // A second request on the connection: a new connection's first session reset is
        // collected after its first answer has gone out; after the second request the
        // connection is idle in the pool, which is the case under test.
        assert_eq!(
            backend_pid().await,
            pid,
            "round {round}: the tenant's one connection changed"
        );
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1::int)")
            .bind(pid)
            .fetch_one(&mut *admin.lock().await)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(ended, "round {round}: backend {pid} was not ended");
        wait_until(format!("backend {pid} to exit"), || async move {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int")
                    .bind(pid)
                    .fetch_one(&mut *admin.lock().await)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            left == 0
        })
        .await;
        let next = backend_pid().await;
        assert_ne!(
            next, pid,
            "round {round}: the ended connection was lent again"
        );
        pid = next;
    }
}

/// Statements prepared by SQL are removed by the session reset, whichever way they were
/// prepared (PREPARE, a DO block, a function made through the data plane or before it
/// connected), and the data plane's own prepared statements stay.
async fn statements_the_tenant_prepares_do_not_outlive_requests() {
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            max_connections_per_tenant: Some(2),
            ..Default::default()
        },
    )
    .await;
    // Made by the tenant's migrations would be the same: there before the data plane
    // connects.
    let id = sandbox.tid("prep");
    let tenant = sandbox.create(&id).await;
    {
        use sqlx::Connection;
        let admin = sandbox.pg_admin_url.clone().unwrap_or_default();
        let mut owner = sqlx::PgConnection::connect(&with_database(&admin, &tenant.database_name))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sqlx::raw_sql(
            "CREATE FUNCTION early_prep() RETURNS int LANGUAGE plpgsql AS \
             $$BEGIN EXECUTE 'PREPARE leaky_early AS SELECT 4'; RETURN 1; END$$; \
             GRANT EXECUTE ON FUNCTION early_prep() TO PUBLIC",
        )
        .execute(&mut owner)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let routes = [
        "PREPARE leaky AS SELECT 1",
        "DO $$BEGIN EXECUTE 'PREPARE leaky_do AS SELECT 2'; END$$",
        "CREATE FUNCTION prep() RETURNS int LANGUAGE plpgsql AS \
         $$BEGIN EXECUTE 'PREPARE leaky_fn AS SELECT 3'; RETURN 1; END$$",
        "SELECT prep()",
        "SELECT early_prep()",
    ];
    for route in routes {
        sandbox
            .execute(&id, route, vec![])
            .await
            .unwrap_or_else(|e| panic!("{route}: {e}"));
        assert_none_prepared_by_tenant(&sandbox, &id, route).await;
    }
    // The data plane's own statements stay prepared (the query above is one of them).
    let ours = sandbox
        .query(
            &id,
            "SELECT count(*) AS n FROM pg_prepared_statements WHERE NOT from_sql \
             AND statement = $1",
            vec![text(TENANT_PREPARED)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ours.rows[0].values[0], int(1));
    // A tenant statement named like one of ours is refused (the name is taken) or, where
    // it is not yet, removed like any other: either way it gets in nobody's way.
    for named_like_ours in [
        "PREPARE tenantry_reset_prepared AS SELECT 5",
        "PREPARE tenantry_reset_0 AS SELECT 6",
        "PREPARE tenantry_once AS SELECT 7",
    ] {
        let _ = sandbox.execute(&id, named_like_ours, vec![]).await;
        assert_none_prepared_by_tenant(&sandbox, &id, named_like_ours).await;
    }
}

const TENANT_PREPARED: &str = "SELECT count(*) AS n FROM pg_prepared_statements WHERE from_sql";

/// Every later request, on either connection (four at a time over two), sees no
/// statement the tenant prepared by SQL (`after` names what ran before).
async fn assert_none_prepared_by_tenant(sandbox: &Sandbox, id: &str, after: &str) {
    for _ in 0..3 {
        let probes = (0..4).map(|_| sandbox.query(id, TENANT_PREPARED, vec![]));
        for rows in futures::future::join_all(probes).await {
            let rows = rows.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                rows.rows[0].values[0],
                int(0),
                "a statement prepared by `{after}` outlived its request"
            );
        }
    }
}

/// What the data plane refuses in SQL text (COPY, transaction control outside Batch,
/// session-level advisory locks) is, when reached through code (a DO block, a function,
/// a procedure), refused by the server (privileges, PL/pgSQL's own rules) or contained
/// (no transaction outlives its request, no lock is held).
async fn refused_effects_reached_through_code_are_refused_or_undone() {
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            max_connections_per_tenant: Some(1),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("code");
    let tenant = sandbox.create(&id).await;
    for setup in [
        "CREATE TABLE w (v TEXT)",
        "CREATE FUNCTION lock_it() RETURNS void LANGUAGE plpgsql AS \
         $$BEGIN PERFORM pg_advisory_lock(7); END$$",
        "CREATE FUNCTION copy_out() RETURNS void LANGUAGE plpgsql AS \
         $$BEGIN COPY w TO '/tmp/tenantry-copy-test'; END$$",
        "CREATE PROCEDURE commit_it() LANGUAGE plpgsql AS \
         $$BEGIN INSERT INTO w VALUES ('procedure'); COMMIT; END$$",
    ] {
        sandbox
            .execute(&id, setup, vec![])
            .await
            .unwrap_or_else(|e| panic!("{setup}: {e}"));
    }
    // Refused by the server.
    for refused in [
        "DO $$BEGIN PERFORM pg_advisory_lock(7); END$$",
        "SELECT lock_it()",
        "DO $$BEGIN PERFORM pg_try_advisory_lock_shared(8); END$$",
        "DO $$BEGIN COPY w TO STDOUT; END$$",
        "DO $$BEGIN COPY w FROM STDIN; END$$",
        "SELECT copy_out()",
        "DO $$BEGIN COPY w TO PROGRAM 'true'; END$$",
    ] {
        let status = sandbox
            .execute(&id, refused, vec![])
            .await
            .err()
            .unwrap_or_else(|| panic!("`{refused}` ran"));
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{refused}: {status:?}"
        );
    }
    let locks = sandbox
        .query(
            &id,
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'",
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(locks.rows[0].values[0], int(0));
    // Transaction control in code: refused, or it ends within its request; either way
    // the connection is idle, in no transaction, once the request has answered.
    let admin = sqlx::PgPool::connect(sandbox.pg_admin_url.as_deref().unwrap_or_default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for contained in [
        "CALL commit_it()",
        "DO $$BEGIN INSERT INTO w VALUES ('do'); COMMIT; END$$",
        "DO $$BEGIN INSERT INTO w VALUES ('do'); ROLLBACK; END$$",
    ] {
        let _ = sandbox.execute(&id, contained, vec![]).await;
        let patience = Patience::new(Duration::from_secs(10), Duration::from_millis(20));
        wait_until_ok(patience, || async {
            let states: Vec<String> = sqlx::query_scalar(
                "SELECT state FROM pg_stat_activity \
                 WHERE application_name = 'tenantry-data-plane' AND datname = $1",
            )
            .bind(&tenant.database_name)
            .fetch_all(&admin)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            if states.iter().all(|state| state == "idle") {
                Ok(())
            } else {
                Err(format!("after `{contained}` the connection is {states:?}"))
            }
        })
        .await;
    }
}
