//! The reconciler: drives every tenant left half-way (PROVISIONING or DELETING, e.g.
//! because the process died) to the end of its sequence. Runs at start-up.

use std::sync::Arc;

use tenantry_shared::TenantId;

use crate::provisioner::Provisioner;
use crate::registry::{Registry, TenantState};

const ACTOR: &str = "reconciler";

/// Resumes every unfinished tenant, one after another. Errors are logged, not returned:
/// one broken tenant must not stop the others.
pub(crate) async fn resume_unfinished(registry: Registry, provisioner: Arc<Provisioner>) {
    let unfinished = match registry
        .tenants_in_states(&[TenantState::Provisioning, TenantState::Deleting])
        .await
    {
        Ok(unfinished) => unfinished,
        Err(error) => {
            tracing::error!(%error, "cannot list unfinished tenants");
            return;
        }
    };
    if !unfinished.is_empty() {
        tracing::info!(count = unfinished.len(), "resuming unfinished tenants");
    }
    for tenant in unfinished {
        let Ok(tenant_id) = TenantId::parse(&tenant.tenant_id) else {
            tracing::error!(tenant.id = %tenant.tenant_id, "registry holds an invalid tenant id");
            continue;
        };
        let outcome = if tenant.state == TenantState::Deleting {
            provisioner.delete(&tenant_id, ACTOR).await
        } else {
            provisioner.provision(&tenant_id, ACTOR).await
        };
        match outcome {
            Ok(tenant) => {
                tracing::info!(tenant.id = %tenant_id, state = %tenant.state, "resumed tenant")
            }
            Err(error) => tracing::warn!(tenant.id = %tenant_id, %error, "cannot resume tenant"),
        }
    }
}
