//! The data plane's gRPC services and its metrics registry: `sql` (SqlService),
//! `pool_stats` (PoolService), `metrics` (what `/metrics` reports). Services translate
//! between protobuf and the rooms below (routing, pool, backends) and hold no logic of
//! their own beyond checking their input.

mod metrics;
mod pool_stats;
mod sql;

pub use metrics::DataPlaneMetrics;
pub(crate) use pool_stats::PoolApi;
pub(crate) use sql::SqlApi;
