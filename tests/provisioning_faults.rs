//! Provisioning end to end, on SQLite and PostgreSQL, and what happens when it goes
//! wrong: tenant migrations run at creation; a control plane that crashes before a step
//! leaves the tenant PROVISIONING (UNAVAILABLE to callers) and the next control plane
//! finishes the job, deletes included; a step that keeps failing leaves the tenant FAILED,
//! and a delete cleans up what it left.

use tenantry_control_plane::testing::{FaultInjection, Step};
use tenantry_proto::controlplane::v1 as cp;
use tenantry_testkit::{Backend, Sandbox, SandboxOptions, backend_tests, text};
use tonic::Code;

backend_tests!(
    tenant_states_map_to_status_codes,
    tenant_migrations_are_applied,
    provisioning_resumes_after_a_crash,
    failing_step_leaves_tenant_failed_and_delete_cleans_up,
);

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
