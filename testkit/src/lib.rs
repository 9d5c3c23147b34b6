//! Tenantry's test kit: what the end-to-end tests (`tests/`) and the benches (`benches/`)
//! share. A dev-dependency of the root package only; nothing here ships.
//!
//! - [`postgres`]: finds (or starts) the PostgreSQL server the tests and benches use;
//! - [`sandbox`]: a control plane and a data plane started in-process, on either backend;
//! - [`backend`]: the two backends and the macros that run one scenario on each
//!   ([`backend_tests!`], [`postgres_only_tests!`]);
//! - [`requests`]: data-plane requests and values built for tests;
//! - [`wait`]: polling for a condition with a deadline, never a fixed sleep;
//! - [`otlp`]: OTLP collectors standing in for a tracing or metrics backend;
//! - [`load`]: the load generator (concurrent Query calls over a set of tenants);
//! - [`proxy`]: a TCP proxy a test can cut, to make a database server unreachable;
//! - [`bench`]: what only the benches need (round lengths, percentiles, cleanup).

pub mod backend;
pub mod bench;
pub mod load;
pub mod otlp;
pub mod postgres;
pub mod proxy;
pub mod requests;
pub mod sandbox;
pub mod wait;

pub use backend::{Backend, placeholder};
pub use requests::{
    connect, execute_within, int, null, plain, query_within, text, with_deadline, with_tenant,
};
pub use sandbox::{Sandbox, SandboxOptions, with_database};
pub use wait::{Patience, wait_until, wait_until_ok, wait_until_ok_blocking};
