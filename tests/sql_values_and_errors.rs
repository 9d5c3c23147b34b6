//! SQL through the data plane end to end, on SQLite and PostgreSQL: values of every kind
//! round-trip, a batch is all or nothing, SQL errors map to status codes, and a request
//! ends at its limits (its gRPC deadline cancels the statement, long reads still finish,
//! an oversized response is refused), and a statement cached on a connection follows the
//! schema.

use std::time::Duration;

use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_testkit::{
    Backend, Patience, Sandbox, SandboxOptions, backend_tests, execute_within, int, null,
    placeholder, postgres_only_tests, query_within, text, wait_until_ok, with_tenant,
};
use tonic::Code;

backend_tests!(
    sql_errors_map_to_status_codes,
    values_round_trip,
    batch_is_all_or_nothing,
    deadline_cancels_the_statement,
    long_reads_finish_and_stop_at_the_deadline,
    oversized_result_is_refused,
    a_schema_change_does_not_break_cached_statements,
);

postgres_only_tests!(
    long_statements_are_not_kept_prepared,
    refused_statements_never_reach_the_server,
);

async fn sql_errors_map_to_status_codes(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("errs");
    let other = sandbox.tid("other");
    let tenant = sandbox.create(&id).await;
    let other_tenant = sandbox.create(&other).await;

    let syntax = sandbox.query(&id, "SELEC 1", vec![]).await.err();
    assert_eq!(
        syntax.as_ref().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );
    if backend == Backend::Postgres {
        assert!(
            syntax.is_some_and(|s| s.message().contains("42601")),
            "SQLSTATE in the message"
        );
    }
    let p1 = placeholder(backend, 1);
    let p2 = placeholder(backend, 2);
    let too_few = sandbox
        .query(&id, &format!("SELECT {p1}, {p2}"), vec![int(1)])
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(too_few, Some(Code::InvalidArgument));
    let too_many = sandbox
        .query(&id, &format!("SELECT {p1}"), vec![int(1), int(2)])
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(too_many, Some(Code::InvalidArgument));
    // One statement per Execute or Query: a second one is refused, never skipped.
    let two = sandbox.query(&id, "SELECT 1; SELECT 2", vec![]).await.err();
    assert_eq!(two.as_ref().map(|s| s.code()), Some(Code::InvalidArgument));
    let two_writes = sandbox
        .execute(&id, "SELECT 1; SELECT 2", vec![])
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(two_writes, Some(Code::InvalidArgument));
    let trailing = sandbox
        .query(&id, "SELECT 1 AS one; -- nothing after this", vec![])
        .await
        .unwrap_or_else(|e| panic!("a trailing semicolon and comment: {e}"));
    assert_eq!(trailing.rows.len(), 1);
    let missing_statement = sandbox
        .sql()
        .query(with_tenant(dp::QueryRequest { statement: None }, &id))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(missing_statement, Some(Code::InvalidArgument));
    let empty = sandbox
        .query(&id, "   ", vec![])
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(empty, Some(Code::InvalidArgument));

    match backend {
        Backend::Sqlite => {
            let other_file = sandbox
                .temp
                .path()
                .join("tenants-main")
                .join(&other_tenant.database_name);
            for statement in [
                format!("ATTACH DATABASE '{}' AS other", other_file.display()),
                "DETACH DATABASE main".to_owned(),
                "SELECT load_extension('/tmp/x.so')".to_owned(),
                "PRAGMA query_only = 1".to_owned(),
                "CREATE TEMP TABLE scratch (x)".to_owned(),
            ] {
                let status = sandbox
                    .execute(&id, &statement, vec![])
                    .await
                    .err()
                    .map(|s| s.code());
                assert_eq!(status, Some(Code::InvalidArgument), "{statement}");
            }
            // Named parameters are refused with a message that names the supported forms.
            let named = sandbox.query(&id, "SELECT :name", vec![int(1)]).await.err();
            assert_eq!(
                named.as_ref().map(|s| s.code()),
                Some(Code::InvalidArgument)
            );
            assert!(named.is_some_and(|s| s.message().contains("?NNN")));
            // $NNN takes the parameter of that number, wherever it stands.
            let numbered = sandbox
                .query(
                    &id,
                    "SELECT $2 AS b, $1 AS a, ?3 AS c",
                    vec![int(1), int(2), int(3)],
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(numbered.rows[0].values, vec![int(2), int(1), int(3)]);
            // A text with no statement at all is refused with a message saying so.
            let nothing = sandbox.query(&id, "-- only a comment", vec![]).await.err();
            assert_eq!(
                nothing.as_ref().map(|s| s.code()),
                Some(Code::InvalidArgument)
            );
            assert!(nothing.is_some_and(|s| s.message().contains("no statement")));
            // Reading PRAGMAs is fine.
            sandbox
                .query(&id, "PRAGMA journal_mode", vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        Backend::Postgres => {
            // The tenant's own credentials cannot open another tenant's database.
            let route = sandbox
                .routing()
                .get_route(cp::GetRouteRequest {
                    tenant_id: id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .into_inner();
            let Some(cp::route::Connection::Postgres(pg)) = route.connection else {
                panic!("no PostgreSQL connection in {route:?}");
            };
            let options = sqlx::postgres::PgConnectOptions::new()
                .host(&pg.host)
                .port(u16::try_from(pg.port).unwrap_or(5432))
                .username(&pg.username)
                .password(&pg.password);
            use sqlx::ConnectOptions;
            let own = options
                .clone()
                .database(&tenant.database_name)
                .connect()
                .await;
            assert!(
                own.is_ok(),
                "the tenant role opens its own database: {:?}",
                own.err()
            );
            let foreign = options
                .clone()
                .database(&other_tenant.database_name)
                .connect()
                .await;
            let code = match foreign {
                Err(sqlx::Error::Database(error)) => error.code().map(|c| c.into_owned()),
                other => panic!("connecting to another tenant's database must fail, got {other:?}"),
            };
            assert_eq!(code.as_deref(), Some("42501"), "insufficient_privilege");
            // The server stores a SCRAM verifier of exactly the route's password: the
            // password itself never reached it.
            let stored: String = {
                use sqlx::Connection;
                let admin = sandbox.pg_admin_url.clone().unwrap_or_default();
                let mut connection = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
                    .bind(&pg.username)
                    .fetch_one(&mut connection)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            };
            let salt_b64 = stored
                .split(['$', ':'])
                .nth(2)
                .unwrap_or_else(|| panic!("not a SCRAM verifier: {stored}"));
            let salt = {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(salt_b64)
                    .unwrap_or_else(|e| panic!("{e}"))
            };
            let expected =
                tenantry_control_plane::testing::scram_sha256_verifier(&pg.password, &salt)
                    .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(stored, expected);
            // And it is not a superuser and cannot create roles or databases.
            let flags: (bool, bool, bool) = sandbox
                .query(&id, "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user", vec![])
                .await
                .map(|r| {
                    let b = |v: &dp::Value| matches!(v.kind, Some(dp::value::Kind::Bool(true)));
                    (b(&r.rows[0].values[0]), b(&r.rows[0].values[1]), b(&r.rows[0].values[2]))
                })
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(flags, (false, false, false));
            // A column type with no Value mapping names the column and its type.
            let inet = sandbox
                .query(&id, "SELECT '10.0.0.1'::inet AS addr", vec![])
                .await
                .err();
            assert_eq!(inet.as_ref().map(|s| s.code()), Some(Code::InvalidArgument));
            assert!(inet.is_some_and(
                |s| s.message().contains("addr") && s.message().to_lowercase().contains("inet")
            ));
        }
    }
}

async fn values_round_trip(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("vals");
    sandbox.create(&id).await;
    use dp::value::Kind;
    let values = vec![
        int(-42),
        dp::Value {
            kind: Some(Kind::Double(1.5)),
        },
        text("héllo, 世界"),
        dp::Value {
            kind: Some(Kind::Bytes(vec![0, 1, 254, 255])),
        },
        dp::Value {
            kind: Some(Kind::Bool(true)),
        },
        null(),
    ];
    let sql = match backend {
        Backend::Postgres => {
            "SELECT $1::int8 AS i, $2::float8 AS d, $3::text AS t, $4::bytea AS b, $5::bool AS o, $6::text AS n"
        }
        Backend::Sqlite => "SELECT ? AS i, ? AS d, ? AS t, ? AS b, ? AS o, ? AS n",
    };
    let rows = sandbox
        .query(&id, sql, values.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.columns, vec!["i", "d", "t", "b", "o", "n"]);
    let mut expected = values;
    if backend == Backend::Sqlite {
        expected[4] = int(1); // SQLite stores booleans as integers
    }
    assert_eq!(rows.rows[0].values, expected);

    // Empty results still name their columns.
    let empty = sandbox
        .query(&id, "SELECT 1 AS one WHERE 1 = 0", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(empty.columns, vec!["one"]);
    assert!(empty.rows.is_empty());

    if backend == Backend::Postgres {
        let rows = sandbox
            .query(
                &id,
                "SELECT 12345678901234567890.123::numeric AS n, DATE '2024-02-29' AS d, \
                 TIMESTAMPTZ '2024-02-29 12:00:00+00' AS ts, '6f1c4a1e-0000-4000-8000-000000000001'::uuid AS u, \
                 '{\"a\": 1}'::jsonb AS j, 7::int2 AS small, 'x'::varchar AS v, INTERVAL '1 day 2 hours' AS iv",
                vec![],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<dp::Value> = rows.rows[0].values.clone();
        assert_eq!(
            got,
            vec![
                text("12345678901234567890.123"),
                text("2024-02-29"),
                text("2024-02-29T12:00:00Z"),
                text("6f1c4a1e-0000-4000-8000-000000000001"),
                text("{\"a\":1}"),
                int(7),
                text("x"),
                text("P0M1DT7200S"),
            ]
        );
        // A function that returns nothing (void) gives NULL; a column with no Value
        // mapping is refused before the statement runs.
        let void = sandbox
            .query(&id, "SELECT pg_sleep(0) AS nothing", vec![])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(void.rows[0].values, vec![null()]);
        sandbox
            .execute(&id, "CREATE TABLE side_effects (n int4)", vec![])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let refused = sandbox
            .query(
                &id,
                "INSERT INTO side_effects VALUES (1) RETURNING '10.0.0.1'::inet AS addr",
                vec![],
            )
            .await
            .err();
        assert_eq!(
            refused.as_ref().map(|s| s.code()),
            Some(Code::InvalidArgument),
            "{refused:?}"
        );
        let count = sandbox
            .query(&id, "SELECT count(*) FROM side_effects", vec![])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            count.rows[0].values[0],
            int(0),
            "the refused statement did not run"
        );
        // The same SQL with another parameter kind gets its own prepared statement.
        sandbox
            .execute(&id, "CREATE TABLE t (v int4)", vec![])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sandbox
            .execute(&id, "INSERT INTO t VALUES ($1)", vec![null()])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sandbox
            .execute(&id, "INSERT INTO t VALUES ($1)", vec![int(5)])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let count = sandbox
            .query(&id, "SELECT count(*) FROM t WHERE v = $1", vec![int(5)])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(count.rows[0].values[0], int(1));
    }
}

async fn batch_is_all_or_nothing(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("batch");
    sandbox.create(&id).await;
    sandbox
        .execute(
            &id,
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let p1 = placeholder(backend, 1);
    let p2 = placeholder(backend, 2);
    let insert = format!("INSERT INTO items (id, name) VALUES ({p1}, {p2})");
    let ok = sandbox
        .batch(
            &id,
            &[
                (&insert, vec![int(1), text("a")]),
                (&insert, vec![int(2), text("b")]),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok.results.len(), 2);
    let failed = sandbox
        .batch(
            &id,
            &[
                (&insert, vec![int(3), text("c")]),
                (&insert, vec![int(1), text("duplicate")]),
            ],
        )
        .await
        .err();
    assert_eq!(
        failed.as_ref().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );
    assert!(failed.is_some_and(|s| s.message().starts_with("statement 1:")));
    let count = sandbox
        .query(&id, "SELECT count(*) FROM items", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        count.rows[0].values[0],
        int(2),
        "the failed batch left nothing behind"
    );
    let empty = sandbox.batch(&id, &[]).await.err().map(|s| s.code());
    assert_eq!(empty, Some(Code::InvalidArgument));
    // Transaction control inside a batch is refused and nothing before it stays.
    for control in ["COMMIT", "ROLLBACK", "SAVEPOINT s", "BEGIN"] {
        let refused = sandbox
            .batch(
                &id,
                &[(&insert, vec![int(10), text("x")]), (control, vec![])],
            )
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(refused, Some(Code::InvalidArgument), "{control}");
    }
    let count = sandbox
        .query(&id, "SELECT count(*) FROM items", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        count.rows[0].values[0],
        int(2),
        "a refused batch left rows behind"
    );
    // The connection still works for batches afterwards.
    sandbox
        .batch(&id, &[(&insert, vec![int(11), text("y")])])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn deadline_cancels_the_statement(backend: Backend) {
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            max_connections_per_tenant: Some(1),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("slow");
    sandbox.create(&id).await;
    sandbox
        .execute(&id, "CREATE TABLE sink (x BIGINT)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A write that would run for a long time (forever, on SQLite) and holds its locks.
    let slow = match backend {
        Backend::Postgres => "INSERT INTO sink SELECT 1 FROM pg_sleep(60)",
        Backend::Sqlite => {
            "INSERT INTO sink WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
             SELECT x FROM c"
        }
    };
    let request = execute_within(slow, &id, Duration::from_millis(300));
    let status = sandbox.sql().execute(request).await.err().map(|s| s.code());
    assert!(
        matches!(status, Some(Code::DeadlineExceeded) | Some(Code::Cancelled)),
        "got {status:?}"
    );
    // The statement itself stopped: a write needing the same table's lock goes through
    // (SQLite: the write lock; PostgreSQL: nothing of the tenant is still running).
    let patience = Patience::new(Duration::from_secs(20), Duration::from_millis(100));
    wait_until_ok(patience, || async {
        let still_running = match backend {
            Backend::Postgres => {
                let rows = sandbox
                    .query(
                        &id,
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND pid <> pg_backend_pid() AND query LIKE 'INSERT INTO sink%' AND state = 'active'",
                        vec![],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                rows.rows[0].values[0] != int(0)
            }
            Backend::Sqlite => sandbox
                .batch(&id, &[("INSERT INTO sink VALUES (1)", vec![])])
                .await
                .is_err(),
        };
        if still_running {
            Err("the cancelled statement kept running".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    let rows = sandbox
        .query(&id, "SELECT count(*) FROM sink", vec![])
        .await
        .unwrap_or_else(|e| panic!("after a cancelled statement: {e}"));
    let expected = match backend {
        Backend::Postgres => int(0),
        Backend::Sqlite => int(1),
    };
    assert_eq!(
        rows.rows[0].values[0], expected,
        "the cancelled insert wrote nothing"
    );
}

/// SQLite runs a read first on the request's own thread, for a moment, then moves it to a
/// blocking thread: a read that takes longer must still finish with the whole answer, and
/// one that never ends must still stop at the deadline.
async fn long_reads_finish_and_stop_at_the_deadline(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("long");
    sandbox.create(&id).await;
    let counted = sandbox
        .query(
            &id,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) \
             SELECT count(*) AS n, sum(x) AS s FROM c",
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("a long read: {e}"));
    assert_eq!(
        counted.rows[0].values,
        vec![int(300_000), int(300_000 * 300_001 / 2)]
    );
    let endless = match backend {
        Backend::Postgres => "SELECT count(*) FROM generate_series(1, 1000000000)",
        Backend::Sqlite => {
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        }
    };
    let request = query_within(endless, &id, Duration::from_millis(300));
    let status = sandbox.sql().query(request).await.err().map(|s| s.code());
    assert!(
        matches!(status, Some(Code::DeadlineExceeded) | Some(Code::Cancelled)),
        "got {status:?}"
    );
    // Large values: SQLite reads them on a blocking thread (on the request's own thread
    // it refuses values over a few KiB, to keep every step short there).
    let large = "x".repeat(100_000);
    sandbox
        .execute(&id, "CREATE TABLE docs (body TEXT)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sandbox
        .execute(
            &id,
            &format!("INSERT INTO docs VALUES ({})", placeholder(backend, 1)),
            vec![text(&large)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let read = sandbox
        .query(&id, "SELECT body, length(body) AS n FROM docs", vec![])
        .await
        .unwrap_or_else(|e| panic!("reading a large value: {e}"));
    assert_eq!(read.rows[0].values, vec![text(&large), int(100_000)]);
    let made = match backend {
        Backend::Postgres => "SELECT length(repeat('y', 1000000)) AS n",
        Backend::Sqlite => "SELECT length(zeroblob(1000000)) AS n",
    };
    let made = sandbox
        .query(&id, made, vec![])
        .await
        .unwrap_or_else(|e| panic!("making a large value: {e}"));
    assert_eq!(made.rows[0].values, vec![int(1_000_000)]);
    // A count over many rows is one long step in SQLite (the watchdog's case): whether
    // or not it is interrupted on the request's thread, the answer is whole.
    sandbox
        .execute(&id, "CREATE TABLE nums (x BIGINT)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sandbox
        .execute(
            &id,
            "INSERT INTO nums WITH RECURSIVE c(x) AS \
             (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) SELECT x FROM c",
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let count = sandbox
        .query(&id, "SELECT count(*) AS n FROM nums", vec![])
        .await
        .unwrap_or_else(|e| panic!("counting many rows: {e}"));
    assert_eq!(count.rows[0].values, vec![int(300_000)]);
    // The tenant is served as before.
    let one = sandbox
        .query(&id, "SELECT 1 AS one", vec![])
        .await
        .unwrap_or_else(|e| panic!("after a read stopped at its deadline: {e}"));
    assert_eq!(one.rows[0].values, vec![int(1)]);
}

async fn oversized_result_is_refused(backend: Backend) {
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            max_response_bytes: Some(64 * 1024),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("big");
    sandbox.create(&id).await;
    let big = match backend {
        Backend::Postgres => "SELECT repeat('x', 1000) FROM generate_series(1, 1000)",
        Backend::Sqlite => {
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 1000) \
             SELECT printf('%.1000c', 'x') FROM c"
        }
    };
    let status = sandbox.query(&id, big, vec![]).await.err();
    assert_eq!(
        status.as_ref().map(|s| s.code()),
        Some(Code::ResourceExhausted)
    );
    assert!(status.is_some_and(|s| s.message().contains("LIMIT")));
    sandbox
        .query(&id, "SELECT 1", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A statement the data plane keeps prepared on its connections still answers after the
/// table it reads changes shape (PostgreSQL: "cached plan must not change result type",
/// then the statement is prepared again and run once more, transparently).
async fn a_schema_change_does_not_break_cached_statements(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("schema");
    sandbox.create(&id).await;
    sandbox
        .execute(&id, "CREATE TABLE s (a INTEGER)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sandbox
        .execute(&id, "INSERT INTO s (a) VALUES (1)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Sequential requests reuse the most recently used connection: it caches the query.
    for _ in 0..5 {
        let rows = sandbox
            .query(&id, "SELECT * FROM s", vec![])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows.columns, vec!["a"]);
    }
    sandbox
        .execute(&id, "ALTER TABLE s ADD COLUMN b INTEGER", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..5 {
        let rows = sandbox
            .query(&id, "SELECT * FROM s", vec![])
            .await
            .unwrap_or_else(|e| panic!("a cached statement broke after ALTER TABLE: {e}"));
        assert_eq!(rows.columns, vec!["a", "b"]);
        assert_eq!(rows.rows.len(), 1);
    }
    let counted = sandbox
        .execute(&id, "UPDATE s SET b = 2", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counted.rows_affected, 1);
}

/// A connection's statement cache is bounded by bytes as well as by count: a statement
/// text over 64 KiB is prepared for its one use, never kept on the connection.
async fn long_statements_are_not_kept_prepared() {
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            max_connections_per_tenant: Some(1),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("longsql");
    sandbox.create(&id).await;
    let long = format!("SELECT 1 AS one -- {}", "x".repeat(100 * 1024));
    for _ in 0..3 {
        for sql in [long.as_str(), "SELECT 2 AS two"] {
            sandbox
                .query(&id, sql, vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // The tenant's one connection: what it keeps prepared (its own statements are named
    // tenantry_...).
    let kept = sandbox
        .query(
            &id,
            "SELECT length(statement) AS len FROM pg_prepared_statements \
             WHERE name LIKE 'tenantry%' ORDER BY 1",
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let lengths: Vec<i64> = kept
        .rows
        .iter()
        .filter_map(
            |row| match row.values.first().and_then(|v| v.kind.as_ref()) {
                Some(dp::value::Kind::Int64(len)) => Some(*len),
                _ => None,
            },
        )
        .collect();
    assert!(
        lengths.iter().any(|len| *len < 100),
        "the short statement was not kept either, so this test would pass for the wrong \
         reason: {lengths:?}"
    );
    assert!(
        lengths.iter().all(|len| *len < 64 * 1024),
        "a statement over 64 KiB stayed prepared: {lengths:?}"
    );
}

/// A statement the data plane refuses is refused before anything reaches the server: a
/// COPY whose query writes (`COPY (INSERT ... RETURNING) TO STDOUT`) leaves no row, however
/// it is spelled (leading semicolons, comments, vertical tab, case).
async fn refused_statements_never_reach_the_server() {
    let sandbox = Sandbox::start(Backend::Postgres).await;
    let id = sandbox.tid("copy");
    sandbox.create(&id).await;
    sandbox
        .execute(&id, "CREATE TABLE w (v text)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for sql in [
        "COPY (INSERT INTO w (v) VALUES ('copied') RETURNING v) TO STDOUT",
        "; /* x */ -- y\n\u{0B}copy (insert into w (v) values ('copied') returning v) to stdout",
    ] {
        for refused in [
            sandbox.query(&id, sql, vec![]).await.err(),
            sandbox.execute(&id, sql, vec![]).await.err(),
        ] {
            assert_eq!(
                refused.as_ref().map(|s| s.code()),
                Some(Code::InvalidArgument),
                "{sql:?}: {refused:?}"
            );
            assert!(
                refused.is_some_and(|s| s.message().contains("COPY is not available")),
                "{sql:?}"
            );
        }
    }
    let count = sandbox
        .query(&id, "SELECT count(*) AS n FROM w", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        count.rows[0].values.first().and_then(|v| v.kind.clone()),
        Some(dp::value::Kind::Int64(0)),
        "a refused COPY wrote its row"
    );
}
