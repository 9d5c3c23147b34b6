//! End-to-end tests of the whole platform: control plane and data plane in-process,
//! real gRPC on loopback, real SQLite files and a real PostgreSQL. Every test runs on
//! both backends.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tenantry_control_plane::provisioner::{FaultInjection, Step};
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::pool_service_client::PoolServiceClient;
use tenantry_testkit::{
    Backend, Patience, Sandbox, SandboxOptions, backend_tests, execute_within, int, null, placeholder,
    postgres_only_tests, query_within, text, wait_until, wait_until_ok, with_database, with_tenant,
};
use tonic::Code;

backend_tests!(
    tenant_lifecycle,
    create_is_idempotent_and_conflicts_are_refused,
    deleted_id_is_reserved_until_reused_on_purpose,
    bad_tenant_metadata_is_refused,
    tenant_states_map_to_status_codes,
    sql_errors_map_to_status_codes,
    values_round_trip,
    batch_is_all_or_nothing,
    session_state_does_not_leak,
    requests_sharing_a_connection_keep_their_own_answers,
    deadline_cancels_the_statement,
    long_reads_finish_and_stop_at_the_deadline,
    oversized_result_is_refused,
    tenant_migrations_are_applied,
    provisioning_resumes_after_a_crash,
    failing_step_leaves_tenant_failed_and_delete_cleans_up,
    isolation_under_concurrent_traffic,
    isolation_check_catches_a_wrong_route,
    list_is_paged_and_filtered,
    health_and_reflection_are_served,
    concurrent_misses_make_one_route_call,
    placement_spreads_tenants_and_honours_pins,
);

async fn tenant_lifecycle(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("life");
    let tenant = sandbox.create(&id).await;
    assert_eq!(tenant.state, cp::TenantState::Active as i32);
    assert_eq!(tenant.database_server, "main");
    assert!(sandbox.database_exists(&tenant).await);

    let create_notes = match backend {
        Backend::Postgres => {
            "CREATE TABLE notes (id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body TEXT)"
        }
        Backend::Sqlite => "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
    };
    sandbox
        .execute(&id, create_notes, vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let p1 = placeholder(backend, 1);
    let inserted = sandbox
        .execute(
            &id,
            &format!("INSERT INTO notes (body) VALUES ({p1})"),
            vec![text("hello")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(inserted.rows_affected, 1);
    assert_eq!(
        inserted.last_insert_id.is_some(),
        backend == Backend::Sqlite
    );
    // A statement that changes nothing reports nothing, whatever ran before it.
    let select = sandbox
        .execute(&id, "SELECT 1", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // (PostgreSQL's command tag counts the rows a SELECT returned.)
    let selected = if backend == Backend::Postgres { 1 } else { 0 };
    assert_eq!(
        (select.rows_affected, select.last_insert_id),
        (selected, None)
    );
    let updated = sandbox
        .execute(&id, "UPDATE notes SET body = body", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((updated.rows_affected, updated.last_insert_id), (1, None));
    let rows = sandbox
        .query(&id, "SELECT id, body FROM notes", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.columns, vec!["id", "body"]);
    assert_eq!(rows.rows.len(), 1);
    assert_eq!(rows.rows[0].values[1], text("hello"));

    // Suspend: refused once the route stream brings it; resume: served again.
    let suspended = sandbox
        .tenants()
        .suspend_tenant(cp::SuspendTenantRequest {
            tenant_id: id.clone(),
            reason: "unpaid invoice".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(suspended.state, cp::TenantState::Suspended as i32);
    assert!(suspended.route_version > tenant.route_version);
    sandbox.wait_for_code(&id, Code::FailedPrecondition).await;
    let refused = sandbox.query(&id, "SELECT 1", vec![]).await.err();
    assert!(refused.is_some_and(|s| s.message().contains("unpaid invoice")));
    let resumed = sandbox
        .tenants()
        .resume_tenant(cp::ResumeTenantRequest {
            tenant_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(resumed.state, cp::TenantState::Active as i32);
    sandbox.wait_for_code(&id, Code::Ok).await;
    // Resuming an active tenant is a no-op; suspending a deleted one is refused below.
    let again = sandbox
        .tenants()
        .resume_tenant(cp::ResumeTenantRequest {
            tenant_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(again.route_version, resumed.route_version);

    // Delete: database and role gone, tombstone kept, data plane answers NOT_FOUND.
    let deleted = sandbox
        .tenants()
        .delete_tenant(cp::DeleteTenantRequest {
            tenant_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(deleted.state, cp::TenantState::Deleted as i32);
    assert!(!sandbox.database_exists(&tenant).await);
    if backend == Backend::Postgres {
        assert!(!sandbox.role_exists(&tenant.database_name).await);
    }
    sandbox.wait_for_code(&id, Code::NotFound).await;
    let tombstone = sandbox.get(&id).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tombstone.state, cp::TenantState::Deleted as i32);
    let suspend_deleted = sandbox
        .tenants()
        .suspend_tenant(cp::SuspendTenantRequest {
            tenant_id: id.clone(),
            reason: String::new(),
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(suspend_deleted, Some(Code::FailedPrecondition));
    // Deleting again is a no-op.
    let deleted_again = sandbox
        .tenants()
        .delete_tenant(cp::DeleteTenantRequest {
            tenant_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(deleted_again.route_version, deleted.route_version);

    // Every change is in the audit log, in order, and each one's id is a route version.
    let registry = tenantry_control_plane::registry::Registry::open(
        &sandbox.control_plane_config.registry_url,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let events = registry
        .audit_events(&id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        vec![
            "create", "place", "activate", "suspend", "resume", "delete", "deleted"
        ]
    );
    assert!(
        events.iter().all(|e| e.actor.starts_with("api:")),
        "{events:?}"
    );
    assert_eq!(events.last().map(|e| e.id), Some(deleted.route_version));
    assert_eq!(events[3].detail, "unpaid invoice");
    registry.close().await;
}

async fn create_is_idempotent_and_conflicts_are_refused(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("idem");
    let request = cp::CreateTenantRequest {
        tenant_id: id.clone(),
        display_name: "Idem Inc".into(),
        ..Default::default()
    };
    let first = sandbox
        .tenants()
        .create_tenant(request.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    let second = sandbox
        .tenants()
        .create_tenant(request.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(
        first, second,
        "a retried create returns the existing tenant unchanged"
    );
    let conflicting = sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            display_name: "Someone Else".into(),
            ..request
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(conflicting, Some(Code::AlreadyExists));

    // Concurrent creates of one id: one tenant, every caller gets it.
    let id = sandbox.tid("race");
    let sandbox = Arc::new(sandbox);
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let sandbox = sandbox.clone();
            let id = id.clone();
            tokio::spawn(async move { sandbox.create(&id).await })
        })
        .collect();
    let mut versions = HashSet::new();
    for call in calls {
        let tenant = call.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tenant.state, cp::TenantState::Active as i32);
        versions.insert(tenant.route_version);
    }
    assert_eq!(versions.len(), 1);

    // Bad requests.
    for (bad_id, code) in [
        ("", Code::InvalidArgument),
        ("Upper", Code::InvalidArgument),
    ] {
        let status = sandbox
            .tenants()
            .create_tenant(cp::CreateTenantRequest {
                tenant_id: bad_id.into(),
                ..Default::default()
            })
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(status, Some(code), "{bad_id:?}");
    }
    let unknown_server = sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: sandbox.tid("pinned"),
            database_server: "nowhere".into(),
            ..Default::default()
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(unknown_server, Some(Code::NotFound));
    let missing = sandbox
        .get(&sandbox.tid("never"))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(missing, Some(Code::NotFound));
}

async fn deleted_id_is_reserved_until_reused_on_purpose(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("reuse");
    sandbox.create(&id).await;
    sandbox
        .execute(&id, "CREATE TABLE old_data (x INTEGER)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sandbox
        .tenants()
        .delete_tenant(cp::DeleteTenantRequest {
            tenant_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: id.clone(),
            ..Default::default()
        })
        .await
        .err();
    assert_eq!(
        refused.as_ref().map(|s| s.code()),
        Some(Code::AlreadyExists)
    );
    assert!(refused.is_some_and(|s| s.message().contains("reuse_deleted_id")));
    let reused = sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: id.clone(),
            reuse_deleted_id: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(reused.state, cp::TenantState::Active as i32);
    // Once the route stream brings the new route, the data plane serves the fresh,
    // empty database: the old table is gone.
    let patience = Patience::new(Duration::from_secs(15), Duration::from_millis(50));
    wait_until_ok(patience, || async {
        let old = sandbox
            .query(&id, "SELECT * FROM old_data", vec![])
            .await
            .err()
            .map(|s| s.code());
        if old == Some(Code::InvalidArgument) {
            Ok(())
        } else {
            Err("the reused id still reaches the old database".to_owned())
        }
    })
    .await;
    sandbox
        .query(&id, "SELECT 1", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

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

async fn tenant_states_map_to_status_codes(backend: Backend) {
    // Suspended and deleted are covered by tenant_lifecycle; here: a tenant stuck in
    // PROVISIONING (the control plane "crashed" before activating it) is UNAVAILABLE.
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            faults: FaultInjection {
                crash_before: Some(Step::Activate),
                fail_step: None,
            },
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("prov");
    let created = sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: id.clone(),
            ..Default::default()
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(created, Some(Code::Unavailable));
    let tenant = sandbox.get(&id).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tenant.state, cp::TenantState::Provisioning as i32);
    let status = sandbox
        .query(&id, "SELECT 1", vec![])
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(status, Some(Code::Unavailable));
}

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
            let expected = tenantry_control_plane::provisioner::postgres::scram_sha256_verifier(
                &pg.password,
                &salt,
            )
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

postgres_only_tests!(
    an_answer_does_not_wait_for_statements_behind_it,
    requests_sharing_a_connection_with_pipelining_off,
    idle_connections_the_server_ended_are_not_lent,
);

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

const LOCKS_HELD: &str = "SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM pg_locks \
     WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS held";

async fn session_state_does_not_leak(backend: Backend) {
    // One connection per tenant, so the next request surely reuses the connection.
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            max_connections_per_tenant: Some(1),
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

async fn tenant_migrations_are_applied(backend: Backend) {
    let migrations = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        migrations.path().join("0001_create_accounts.sql"),
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT NOT NULL);",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        migrations.path().join("0002_seed.sql"),
        "INSERT INTO accounts (id, name) VALUES (1, 'owner');",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            tenant_migrations: Some(migrations.path().to_path_buf()),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("migr");
    let tenant = sandbox.create(&id).await;
    assert_eq!(tenant.schema_version, 2);
    let rows = sandbox
        .query(&id, "SELECT name FROM accounts", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.rows[0].values[0], text("owner"));
}

async fn provisioning_resumes_after_a_crash(backend: Backend) {
    for crash_before in [Step::CreateDatabase, Step::Migrate, Step::Activate] {
        let mut sandbox = Sandbox::start_with(
            backend,
            SandboxOptions {
                faults: FaultInjection {
                    crash_before: Some(crash_before),
                    fail_step: None,
                },
                ..Default::default()
            },
        )
        .await;
        let id = sandbox.tid("crash");
        let status = sandbox
            .tenants()
            .create_tenant(cp::CreateTenantRequest {
                tenant_id: id.clone(),
                ..Default::default()
            })
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(status, Some(Code::Unavailable), "{crash_before:?}");
        assert_eq!(
            sandbox.get(&id).await.map(|t| t.state).ok(),
            Some(cp::TenantState::Provisioning as i32)
        );
        // "Restart": a new control plane on the same registry finishes the job by itself.
        sandbox
            .restart_control_plane(FaultInjection::default())
            .await;
        let tenant = sandbox.wait_for_state(&id, cp::TenantState::Active).await;
        assert!(sandbox.database_exists(&tenant).await);
        sandbox.wait_for_code(&id, Code::Ok).await;
        // A retried create after the restart returns the same tenant.
        assert_eq!(
            sandbox.create(&id).await.route_version,
            tenant.route_version
        );
        // An interrupted delete is resumed too.
        sandbox
            .restart_control_plane(FaultInjection {
                crash_before: Some(Step::DropDatabase),
                fail_step: None,
            })
            .await;
        let status = sandbox
            .tenants()
            .delete_tenant(cp::DeleteTenantRequest {
                tenant_id: id.clone(),
            })
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(status, Some(Code::Unavailable));
        sandbox
            .restart_control_plane(FaultInjection::default())
            .await;
        sandbox.wait_for_state(&id, cp::TenantState::Deleted).await;
        assert!(!sandbox.database_exists(&tenant).await);
    }
}

async fn failing_step_leaves_tenant_failed_and_delete_cleans_up(backend: Backend) {
    let failing = match backend {
        Backend::Postgres => Step::LockDown,
        Backend::Sqlite => Step::Migrate,
    };
    let mut sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            faults: FaultInjection {
                crash_before: None,
                fail_step: Some(failing),
            },
            provision_attempts: Some(3),
            ..Default::default()
        },
    )
    .await;
    let id = sandbox.tid("fail");
    let status = sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: id.clone(),
            ..Default::default()
        })
        .await
        .err();
    assert_eq!(status.as_ref().map(|s| s.code()), Some(Code::Unavailable));
    let tenant = sandbox.get(&id).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tenant.state, cp::TenantState::Failed as i32);
    assert!(
        tenant.reason.contains(&failing.to_string()),
        "reason: {}",
        tenant.reason
    );
    assert!(
        tenant.reason.contains("3 times"),
        "reason: {}",
        tenant.reason
    );
    // The half-made database exists; the data plane refuses the tenant.
    assert!(sandbox.database_exists(&tenant).await);
    let served = sandbox
        .query(&id, "SELECT 1", vec![])
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(served, Some(Code::Unavailable));
    // Retrying with the fault still there fails again with the reason; without it, works.
    sandbox
        .restart_control_plane(FaultInjection::default())
        .await;
    let retried = sandbox.create(&id).await;
    assert_eq!(retried.state, cp::TenantState::Active as i32);
    // Delete leaves no database, role or file behind.
    sandbox
        .tenants()
        .delete_tenant(cp::DeleteTenantRequest {
            tenant_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!sandbox.database_exists(&tenant).await);
    if backend == Backend::Postgres {
        assert!(!sandbox.role_exists(&tenant.database_name).await);
    } else {
        let dir = sandbox.temp.path().join("tenants-main");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "files left behind: {left:?}");
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

async fn list_is_paged_and_filtered(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    let mut created = Vec::new();
    for n in 0..5 {
        let id = sandbox.tid(&format!("list{n}"));
        sandbox.create(&id).await;
        created.push(id);
    }
    sandbox
        .tenants()
        .suspend_tenant(cp::SuspendTenantRequest {
            tenant_id: created[0].clone(),
            reason: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = sandbox
            .tenants()
            .list_tenants(cp::ListTenantsRequest {
                page_size: 2,
                page_token,
                state: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner();
        assert!(page.tenants.len() <= 2);
        seen.extend(page.tenants.into_iter().map(|t| t.tenant_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, created);
    let suspended = sandbox
        .tenants()
        .list_tenants(cp::ListTenantsRequest {
            page_size: 0,
            page_token: String::new(),
            state: cp::TenantState::Suspended as i32,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(suspended.tenants.len(), 1);
    let bad = sandbox
        .tenants()
        .list_tenants(cp::ListTenantsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(bad, Some(Code::InvalidArgument));
    let servers = sandbox
        .servers()
        .list_database_servers(cp::ListDatabaseServersRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner()
        .servers;
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].tenant_count, 5);
    assert!(!servers[0].location.contains("password"));
}

async fn health_and_reflection_are_served(backend: Backend) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let sandbox = Sandbox::start(backend).await;
    for channel in [
        sandbox.control_plane_channel.clone(),
        sandbox.data_plane_channel.clone(),
    ] {
        let status = HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32);
    }
    // Reflection lists each plane's own services (v1 and v1alpha both answer).
    let control_services = reflected_services(sandbox.control_plane_channel.clone()).await;
    assert!(control_services.contains(&"tenantry.controlplane.v1.TenantService".to_owned()));
    assert!(!control_services.contains(&"tenantry.dataplane.v1.SqlService".to_owned()));
    let data_services = reflected_services(sandbox.data_plane_channel.clone()).await;
    assert!(data_services.contains(&"tenantry.dataplane.v1.SqlService".to_owned()));
    assert!(data_services.contains(&"grpc.health.v1.Health".to_owned()));
    assert!(!data_services.contains(&"tenantry.controlplane.v1.RoutingService".to_owned()));
    let mut v1alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            sandbox.data_plane_channel.clone(),
        );
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut answers = v1alpha
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert!(
        answers
            .message()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
    // Registering the same server again is a no-op; another location is refused.
    let again = sandbox.register_server("main").await;
    assert_eq!(again.name, "main");
    let conflict = sandbox
        .servers()
        .register_database_server(cp::RegisterDatabaseServerRequest {
            name: "main".into(),
            location: Some(
                cp::register_database_server_request::Location::SqliteDirectory(
                    sandbox.temp.path().join("elsewhere").display().to_string(),
                ),
            ),
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(conflict, Some(Code::AlreadyExists));
    // TLS to PostgreSQL is not offered yet: an admin URL that demands it is refused with
    // a message that says so, before any connection is tried.
    for mode in ["require", "verify-ca", "verify-full"] {
        let refused = sandbox
            .servers()
            .register_database_server(cp::RegisterDatabaseServerRequest {
                name: "tls".into(),
                location: Some(
                    cp::register_database_server_request::Location::PostgresAdminUrl(format!(
                        "postgres://admin@127.0.0.1:5432/postgres?sslmode={mode}"
                    )),
                ),
            })
            .await
            .err();
        assert_eq!(
            refused.as_ref().map(|s| s.code()),
            Some(Code::InvalidArgument),
            "{mode}: {refused:?}"
        );
        assert!(
            refused
                .is_some_and(|s| s.message().contains(&format!("sslmode={mode}"))
                    && s.message().contains("TLS")),
            "{mode}: the message names the sslmode and TLS"
        );
    }
}

async fn reflected_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    match answers.message().await.unwrap_or_else(|e| panic!("{e}")) {
        Some(answer) => match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        },
        None => panic!("no reflection answer"),
    }
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

async fn placement_spreads_tenants_and_honours_pins(backend: Backend) {
    let sandbox = Sandbox::start(backend).await;
    sandbox.register_server("second").await;
    let mut placed = std::collections::HashMap::new();
    for n in 0..4 {
        let tenant = sandbox.create(&sandbox.tid(&format!("place{n}"))).await;
        *placed.entry(tenant.database_server).or_insert(0) += 1;
    }
    assert_eq!(placed.get("main"), Some(&2), "{placed:?}");
    assert_eq!(placed.get("second"), Some(&2), "{placed:?}");
    let pinned = sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: sandbox.tid("pinned"),
            database_server: "second".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(pinned.database_server, "second");
    let counts: std::collections::HashMap<String, i64> = sandbox
        .servers()
        .list_database_servers(cp::ListDatabaseServersRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner()
        .servers
        .into_iter()
        .map(|s| (s.name, s.tenant_count))
        .collect();
    assert_eq!(counts.get("second"), Some(&3));
    assert_eq!(counts.get("main"), Some(&2));
    sandbox.wait_for_code(&pinned.tenant_id, Code::Ok).await;
}
