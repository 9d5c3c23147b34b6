//! The data plane's tower layers, outermost first: `tenant_id` (parses `x-tenant-id`
//! once into a `CallTenant` in the request's extensions), the shared trace layer
//! (`tenantry_shared::grpc_trace`), `metrics` (counts SqlService calls, refused ones too),
//! `tenant` (resolves the tenant's route, refuses a tenant that does not serve, and puts
//! a `TenantContext` in the extensions for the services).
//!
//! Layers name routing (to resolve a tenant) and nothing above it: the metrics layer
//! records through `RecordRequest`, which the metrics registry implements.

mod context;
mod metrics;
mod tenant;
mod tenant_id;

use tenantry_proto::dataplane::v1::sql_service_server::SERVICE_NAME as SQL_SERVICE;

pub(crate) use context::TenantContext;
pub(crate) use metrics::{MetricsLayer, RecordRequest};
pub use tenant::TenantLayer;
pub use tenant_id::TenantIdLayer;

/// The SqlService method a request path calls (`/tenantry.dataplane.v1.SqlService/Query`
/// -> `Query`); None for other services. SqlService is the one that acts for a tenant.
pub(crate) fn sql_service_method(path: &str) -> Option<&str> {
    path.strip_prefix('/')?
        .strip_prefix(SQL_SERVICE)?
        .strip_prefix('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sql_service_paths_name_a_method() {
        assert_eq!(
            sql_service_method("/tenantry.dataplane.v1.SqlService/Query"),
            Some("Query")
        );
        assert_eq!(
            sql_service_method("/tenantry.dataplane.v1.PoolService/GetPoolStats"),
            None
        );
        assert_eq!(
            sql_service_method("/tenantry.dataplane.v1.SqlServiceX/Query"),
            None
        );
    }
}
