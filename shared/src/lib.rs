//! What both Tenantry planes need: the `TenantId` type, metadata keys, config loading,
//! and the gRPC server plumbing every plane shares (health, reflection, shutdown,
//! trace context), and telemetry set-up (logs, traces, metrics).

pub mod config;
pub mod grpc;
pub mod grpc_trace;
pub mod json_log;
pub mod metadata;
pub mod metrics;
pub mod metrics_otlp;
pub mod telemetry;
pub mod tenant_id;

pub use tenant_id::{InvalidTenantId, TenantId};
