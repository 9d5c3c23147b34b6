//! The tenant lifecycle end to end, on SQLite and PostgreSQL: create (idempotent,
//! conflicts refused), suspend, resume and delete (database and role gone, tombstone and
//! audit log kept), reuse of a deleted id, listing, placement over database servers, and
//! what each plane serves besides (health, reflection, server registration).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tenantry_proto::controlplane::v1 as cp;
use tenantry_testkit::{
    Backend, Patience, Sandbox, backend_tests, placeholder, text, wait_until_ok,
};
use tonic::Code;

backend_tests!(
    tenant_lifecycle,
    create_is_idempotent_and_conflicts_are_refused,
    deleted_id_is_reserved_until_reused_on_purpose,
    list_is_paged_and_filtered,
    health_and_reflection_are_served,
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
    let events = tenantry_control_plane::testing::audit_events(
        &sandbox.control_plane_config.registry_url,
        &id,
    )
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
    // An admin URL that demands a checked TLS connection to a server whose certificate
    // cannot be checked (no trusted authority; or no TLS at all) is refused, saying so.
    // (TLS that works, in every sslmode: postgres_tls.rs.)
    // (verify-ca would pass where the system trusts the server's self-signed certificate,
    // as Debian's snakeoil one is in /etc/ssl/certs; no certificate is for 127.0.0.1.)
    for mode in ["verify-full"] {
        let refused = sandbox
            .servers()
            .register_database_server(cp::RegisterDatabaseServerRequest {
                name: "tls".into(),
                location: Some(
                    cp::register_database_server_request::Location::PostgresAdminUrl(format!(
                        "postgres://postgres@127.0.0.1:5432/postgres?sslmode={mode}"
                    )),
                ),
            })
            .await
            .err();
        assert_eq!(
            refused.as_ref().map(|s| s.code()),
            Some(Code::FailedPrecondition),
            "{mode}: {refused:?}"
        );
        assert!(
            refused.as_ref().is_some_and(|s| {
                let message = s.message().to_lowercase();
                message.contains("tls") || message.contains("certificate")
            }),
            "{mode}: the message names TLS or the certificate: {refused:?}"
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

/// Many concurrent creates on the SQLite registry (one file, one writer at a time) and
/// on PostgreSQL: every one succeeds, none meets a registry lock or busy error, and
/// every tenant serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_meet_a_registry_lock() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let sandbox = Arc::new(Sandbox::start(backend).await);
        let (tenants, callers) = match backend {
            Backend::Sqlite => (400, 48),
            Backend::Postgres => (64, 16),
        };
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..callers {
            let sandbox = sandbox.clone();
            let next = next.clone();
            workers.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= tenants {
                        return errors;
                    }
                    let id = sandbox.tid(&format!("busy{n}"));
                    let created = sandbox
                        .tenants()
                        .create_tenant(cp::CreateTenantRequest {
                            tenant_id: id.clone(),
                            ..Default::default()
                        })
                        .await;
                    if let Err(status) = created {
                        errors.push(format!("{id}: {status}"));
                        continue;
                    }
                    // Reads and other writers interleave with the creates.
                    if let Err(status) = sandbox.get(&id).await {
                        errors.push(format!("get {id}: {status}"));
                    }
                }
            }));
        }
        let mut errors = Vec::new();
        for worker in workers {
            errors.extend(worker.await.unwrap_or_else(|e| panic!("{e}")));
        }
        assert!(
            errors.is_empty(),
            "{backend:?}: {} of {tenants} creates failed, first: {:?}",
            errors.len(),
            errors.first()
        );
        let listed = sandbox
            .tenants()
            .list_tenants(cp::ListTenantsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner();
        let active = listed
            .tenants
            .iter()
            .filter(|tenant| tenant.state == cp::TenantState::Active as i32)
            .count();
        assert_eq!(active, tenants, "{backend:?}");
    }
}
