//! gRPC metadata keys Tenantry reads.

/// The metadata entry that names the tenant a data-plane call acts for.
pub const TENANT_ID: &str = "x-tenant-id";
