//! What both Tenantry planes need: the `TenantId` type, metadata keys, config loading,
//! and the gRPC server plumbing every plane shares (health, reflection, shutdown).

pub mod config;
pub mod grpc;
pub mod metadata;
pub mod tenant_id;

pub use tenant_id::{InvalidTenantId, TenantId};
