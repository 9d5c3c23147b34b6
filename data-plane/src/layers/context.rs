//! `TenantContext`: what the tenant layer resolved for a request, put in its extensions.

use std::sync::Arc;

use tenantry_shared::TenantId;

use crate::routing::Route;

/// The tenant a request acts for and its (serving) route. Handlers read it from the
/// request extensions; below the handler it is passed explicitly.
#[derive(Clone, Debug)]
pub(crate) struct TenantContext {
    pub(crate) tenant_id: TenantId,
    pub(crate) route: Arc<Route>,
}
