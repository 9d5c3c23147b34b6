//! Pools: connections to tenant databases. The generic connection pool
//! (`connection_pool`: bounded size and wait, idle expiry, clean-up between requests),
//! the per-server connection budget (`budget`), the waiting queue of requests that share
//! a write (`queue`), the `TenantPool`/`PoolFactory` interface backends implement
//! (`tenant`), and the pool manager that keeps one pool per tenant (`manager`).
//!
//! The pool names no backend: backends plug in through `Backend` (a connection) and
//! `PoolFactory` (a tenant's pool). It names routing only for `Route`/`Target` and to
//! listen to route changes.

mod budget;
pub(crate) mod connection_pool;
mod manager;
mod queue;
mod tenant;

pub(crate) use budget::ServerBudget;
pub use connection_pool::PoolFigures;
pub(crate) use connection_pool::{
    Backend, Clean, ConnectionPool, PoolOptions, PooledConnection, micros_since_epoch,
};
pub(crate) use manager::PoolManagerOptions;
pub use manager::{PoolManager, ServerPoolStats, TenantPoolStats};
pub(crate) use queue::{Pick, Queued, WaitQueue};
pub(crate) use tenant::{BudgetFigures, Call, PoolFactory, SqlLimits, TenantPool};
