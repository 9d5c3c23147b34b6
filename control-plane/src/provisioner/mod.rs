//! Provisioning and deletion of tenant databases, as sequences of idempotent steps.
//!
//! Provisioning: place the tenant on a server, create its role, create its database,
//! lock the database down, apply the tenant migrations, mark it ACTIVE. Deletion: mark
//! it DELETING, drop the database, drop the role, keep a DELETED tombstone. Every step
//! can be re-run after a crash, so the reconciler resumes a tenant left half-way by just
//! running the whole sequence again. A step that keeps failing leaves the tenant FAILED
//! with the reason.
//!
//! This module owns where a sequence starts and the per-tenant lock it runs under;
//! `placement` chooses the server, `steps` is the step machine, and `postgres` and
//! `sqlite` do the work on each backend.

pub(crate) mod error;
mod locks;
mod placement;
pub(crate) mod postgres;
pub(crate) mod sqlite;
mod steps;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use sqlx::migrate::Migrator;
use tenantry_shared::TenantId;

use crate::error::{ControlPlaneError, Result};
use crate::registry::{DatabaseServer, Registry, Tenant, TenantState};
use error::ProvisionResult;
pub(crate) use locks::TenantLockGuard;
use locks::TenantLocks;
use postgres::PostgresServer;
use steps::Sequence;
#[cfg(feature = "testing")]
pub use steps::{FaultInjection, Step};

pub(crate) struct ProvisionerOptions {
    /// Tenant migrations (sqlx format: `NNNN_description.sql`) applied to every new
    /// tenant database.
    pub tenant_migrations: Option<Arc<Migrator>>,
    /// How many times a failing sequence is tried before the tenant is FAILED.
    pub attempts: u32,
    /// Pause before the second attempt; doubles after each one.
    pub retry_delay: Duration,
    #[cfg(feature = "testing")]
    pub faults: FaultInjection,
}

pub(crate) struct Provisioner {
    registry: Registry,
    options: ProvisionerOptions,
    postgres_servers: DashMap<String, Arc<PostgresServer>>,
    tenant_locks: TenantLocks,
}

impl Provisioner {
    pub(crate) fn new(registry: Registry, options: ProvisionerOptions) -> Self {
        Self {
            registry,
            options,
            postgres_servers: DashMap::new(),
            tenant_locks: TenantLocks::default(),
        }
    }

    /// Admin access to a registered PostgreSQL server, opened once.
    fn postgres_server(&self, server: &DatabaseServer) -> ProvisionResult<Arc<PostgresServer>> {
        if let Some(existing) = self.postgres_servers.get(&server.name) {
            return Ok(existing.clone());
        }
        let opened = Arc::new(PostgresServer::new(&server.location)?);
        Ok(self
            .postgres_servers
            .entry(server.name.clone())
            .or_insert(opened)
            .clone())
    }

    /// The tenant's lock: sequences and lifecycle changes of one tenant take turns.
    pub(crate) async fn lock_tenant(&self, tenant_id: &TenantId) -> TenantLockGuard {
        self.tenant_locks.lock(tenant_id).await
    }

    /// Drives a tenant from PROVISIONING (or FAILED) to ACTIVE. Returns the tenant as it
    /// ends: ACTIVE, or FAILED with the reason. A tenant in any other state is returned
    /// as it is.
    pub(crate) async fn provision(&self, tenant_id: &TenantId, actor: &str) -> Result<Tenant> {
        let _guard = self.lock_tenant(tenant_id).await;
        let current = self.get(tenant_id).await?;
        match current.state {
            TenantState::Provisioning => {}
            TenantState::Failed => {
                self.registry.retry_provisioning(tenant_id, actor).await?;
            }
            _ => return Ok(current),
        }
        self.with_retries(tenant_id, actor, Sequence::Provisioning, || {
            self.run_provision_steps(tenant_id, actor)
        })
        .await
    }

    /// Drops a tenant's database and role and leaves a DELETED tombstone. Returns the
    /// tenant as it ends: DELETED, or FAILED with the reason.
    pub(crate) async fn delete(&self, tenant_id: &TenantId, actor: &str) -> Result<Tenant> {
        let _guard = self.lock_tenant(tenant_id).await;
        let mut current = self.get(tenant_id).await?;
        match current.state {
            TenantState::Deleted => return Ok(current),
            TenantState::Deleting => {}
            _ => current = self.registry.mark_deleting(tenant_id, actor).await?,
        }
        self.with_retries(tenant_id, actor, Sequence::Deletion, || {
            self.run_delete_steps(&current, tenant_id, actor)
        })
        .await
    }

    async fn get(&self, tenant_id: &TenantId) -> Result<Tenant> {
        self.registry
            .get_tenant(tenant_id)
            .await?
            .ok_or_else(|| ControlPlaneError::tenant_not_found(tenant_id))
    }

    pub(crate) async fn close(&self) {
        // Collected first: no map guard is held across an await.
        let servers: Vec<Arc<PostgresServer>> = self
            .postgres_servers
            .iter()
            .map(|entry| entry.value().clone())
            .collect();
        for server in servers {
            server.close().await;
        }
    }
}
