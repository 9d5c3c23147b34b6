//! Backends: the tenant databases themselves. `postgres` (the data plane's own
//! wire-protocol client) and `sqlite` (rusqlite) each implement the pool's `Backend`
//! (a connection) and `TenantPool` (statements on a tenant's pool); `BackendFactory`
//! opens the right one for a route's target, and holds the connection budget of each
//! PostgreSQL server. `sql_text` classifies SQL text before anything runs; `answer` holds
//! what both backends share in building an answer.
//!
//! A backend names the pool (whose traits it implements) and routing's `Target`, never
//! the layers or the services.

pub(crate) mod answer;
mod postgres;
pub(crate) mod sql_text;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::backend::answer::VALUE_MARGIN;
use crate::pool::{BudgetFigures, Clean, PoolFactory, PoolOptions, ServerBudget, TenantPool};
use crate::routing::Target;
pub(crate) use postgres::TlsConfigs;
#[cfg(feature = "testing")]
pub use postgres::channel_bound_logins;
use postgres::{PgBackend, PgConnectOptions, PgTenantPool, postgres_connected, reset_session};
use sqlite::{SqliteConnectOptions, SqliteTenantPool, harden_connection};

/// How the backends open connections.
#[derive(Clone, Debug)]
pub(crate) struct BackendOptions {
    /// See `DataPlaneConfig::postgres_session_reset`.
    pub(crate) postgres_session_reset: bool,
    /// See `DataPlaneConfig::postgres_pipelining`.
    pub(crate) postgres_pipelining: bool,
    /// Most connections to one PostgreSQL server, over all its tenants' pools.
    pub(crate) postgres_connection_budget: u32,
    /// Largest Query response (`DataPlaneConfig::max_response_bytes`): no single value
    /// or server message larger than it (plus `answer::VALUE_MARGIN`) is ever held.
    pub(crate) max_response_bytes: usize,
}

/// Opens tenant pools for the pool manager, by the route's target.
pub(crate) struct BackendFactory {
    options: BackendOptions,
    /// TLS to PostgreSQL servers (None: it could not be set up; servers registered
    /// with an sslmode that needs it are then unreachable, saying so).
    tls: Option<Arc<TlsConfigs>>,
    /// Connection budgets of PostgreSQL servers, by `host:port`.
    budgets: DashMap<String, Arc<ServerBudget<PgBackend>>>,
}

impl BackendFactory {
    pub(crate) fn new(options: BackendOptions, tls: Option<Arc<TlsConfigs>>) -> Self {
        Self {
            options,
            tls,
            budgets: DashMap::new(),
        }
    }

    fn budget(&self, server: String) -> Arc<ServerBudget<PgBackend>> {
        self.budgets
            .entry(server.clone())
            .or_insert_with(|| ServerBudget::new(server, self.options.postgres_connection_budget))
            .clone()
    }
}

impl PoolFactory for BackendFactory {
    fn open(&self, target: &Target, options: PoolOptions) -> Arc<dyn TenantPool> {
        match target {
            Target::Postgres {
                host,
                port,
                database,
                username,
                password,
                ssl_mode,
            } => {
                let mut connect = PgConnectOptions::new(host, *port, database, username, password);
                connect.ssl_mode = *ssl_mode;
                connect.tls = self.tls.clone();
                connect.session_reset = self.options.postgres_session_reset;
                connect.pipelining = self.options.postgres_pipelining;
                connect.max_message_bytes = self.options.max_response_bytes + VALUE_MARGIN;
                let reset: Option<Clean<PgBackend>> = if self.options.postgres_session_reset {
                    Some(reset_session)
                } else {
                    None
                };
                Arc::new(PgTenantPool::new_lazy(
                    connect,
                    options,
                    postgres_connected,
                    reset,
                    Some(self.budget(target.server())),
                ))
            }
            Target::Sqlite { path, .. } => {
                let connect = SqliteConnectOptions {
                    path: path.into(),
                    busy_timeout: Duration::from_secs(5),
                    max_value_bytes: self.options.max_response_bytes + VALUE_MARGIN,
                };
                Arc::new(SqliteTenantPool::new_lazy(
                    connect,
                    options,
                    harden_connection,
                    None,
                    None,
                ))
            }
        }
    }

    fn budgets(&self) -> Vec<BudgetFigures> {
        self.budgets
            .iter()
            .map(|budget| BudgetFigures {
                server: budget.server().to_owned(),
                budget: budget.budget(),
                open: budget.open(),
                pools: budget.live_pools(),
                evictions: budget.evictions(),
            })
            .collect()
    }
}
