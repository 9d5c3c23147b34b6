//! The control plane's gRPC services: each handler translates protobuf to a domain call
//! and the result back; domain errors become statuses through `?` (see `error`).

pub(crate) mod routing;
pub(crate) mod servers;
pub(crate) mod tenants;

use tenantry_shared::TenantId;

use crate::error::ControlPlaneError;

/// Who made a call, for the audit log: the caller's address.
fn actor<T>(request: &tonic::Request<T>) -> String {
    match request.remote_addr() {
        Some(addr) => format!("api:{addr}"),
        None => "api".to_owned(),
    }
}

/// Parses a request's `tenant_id` field, once; the handler trusts it after.
fn parse_tenant_id(raw: &str) -> Result<TenantId, ControlPlaneError> {
    TenantId::parse(raw)
        .map_err(|error| ControlPlaneError::InvalidArgument(format!("tenant_id: {error}")))
}

/// Records the tenant on the call's span (opened by the trace layer with a `tenant.id` field).
fn record_tenant(tenant_id: &TenantId) {
    tracing::Span::current().record("tenant.id", tenant_id.as_str());
}
