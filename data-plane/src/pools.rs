//! The pool manager: one connection pool (`connection_pool`) per tenant, opened lazily
//! with the tenant's own credentials, replaced (and the old one closed) when the tenant's
//! connection details change, closed when the tenant stops serving.
//!
//! Connections are cleaned between requests so that no session state outlives the
//! request that set it:
//! - PostgreSQL: every request's statement is followed, in the same write, by
//!   `RESET ALL; CLOSE ALL; ...` (what `DISCARD ALL` does, minus dropping the
//!   connection's prepared statements), and the connection goes back to its pool only
//!   once that has been answered (`postgres_connection`); transaction control is refused
//!   in tenant statements.
//! - SQLite: an authorizer refuses `ATTACH`, `DETACH`, temporary objects, PRAGMA
//!   settings, `load_extension()` and transaction control (only Batch's own BEGIN and
//!   COMMIT/ROLLBACK pass), and extension loading is switched off, so no statement can
//!   leave state on the connection (`sqlite_connection`).

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tenantry_proto::dataplane::v1 as pb;
use tenantry_shared::TenantId;

use crate::connection_pool::{
    ConnectionPool, PoolFigures, PoolOptions as ConnectionPoolOptions, ServerBudget,
};
use crate::postgres_connection::{PgBackend, PgConnectOptions, postgres_connected, reset_session};
use crate::router::{Route, RouteState, Router, Target};
use crate::sqlite_connection::{SqliteBackend, SqliteConnectOptions, harden_connection};

/// A PostgreSQL tenant's pool.
pub type PgTenantPool = ConnectionPool<PgBackend>;
/// A SQLite tenant's pool.
pub type SqliteTenantPool = ConnectionPool<SqliteBackend>;

#[derive(Clone)]
pub enum TenantPool {
    Postgres(PgTenantPool),
    Sqlite(SqliteTenantPool),
}

impl TenantPool {
    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }

    fn mark_closed(&self) {
        match self {
            Self::Postgres(pool) => pool.mark_closed(),
            Self::Sqlite(pool) => pool.mark_closed(),
        }
    }

    pub fn figures(&self) -> PoolFigures {
        match self {
            Self::Postgres(pool) => pool.figures(),
            Self::Sqlite(pool) => pool.figures(),
        }
    }

    /// Statements that went out in one write with another request's (PostgreSQL).
    fn pipelined(&self) -> u64 {
        match self {
            Self::Postgres(pool) => pool.shared().pipelined(),
            Self::Sqlite(_) => 0,
        }
    }

    fn max_connections(&self) -> u32 {
        match self {
            Self::Postgres(pool) => pool.max_connections(),
            Self::Sqlite(pool) => pool.max_connections(),
        }
    }

    fn touch(&self) {
        match self {
            Self::Postgres(pool) => pool.touch(),
            Self::Sqlite(pool) => pool.touch(),
        }
    }

    fn is_unused_for(&self, idle_for: Duration) -> bool {
        match self {
            Self::Postgres(pool) => pool.is_unused_for(idle_for),
            Self::Sqlite(pool) => pool.is_unused_for(idle_for),
        }
    }

    async fn close_expired_idle(&self) {
        match self {
            Self::Postgres(pool) => pool.close_expired_idle().await,
            Self::Sqlite(pool) => pool.close_expired_idle().await,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub max_connections_per_tenant: u32,
    pub acquire_timeout: Duration,
    pub idle_timeout: Duration,
    /// See `DataPlaneConfig::postgres_session_reset`.
    pub postgres_session_reset: bool,
    /// See `DataPlaneConfig::postgres_pipelining`.
    pub postgres_pipelining: bool,
    /// Most connections to one PostgreSQL server, over all its tenants' pools.
    pub postgres_connection_budget: u32,
}

/// Pool figures of one tenant.
#[derive(Clone, Debug)]
pub struct TenantPoolStats {
    pub tenant_id: TenantId,
    pub server: String,
    pub max_connections: u32,
    pub connections: PoolFigures,
    /// Statements that went out in one write with another request's, since the pool
    /// opened (PostgreSQL; see `sql::Waiting`).
    pub pipelined_statements: u64,
}

/// Pool figures of one PostgreSQL server.
#[derive(Clone, Debug)]
pub struct ServerPoolStats {
    pub server: String,
    pub budget: u32,
    pub connections: PoolFigures,
    pub pools: u32,
    pub evictions: u64,
}

struct PoolEntry {
    target: Target,
    /// Version of the route the pool was opened for (for a retired entry: of the route
    /// that retired it).
    route_version: i64,
    pool: TenantPool,
    /// The pool was closed because a newer route made its details wrong. Kept for a
    /// moment so that a request still holding an older route cannot open a new pool
    /// with the old details; the sweep removes it.
    retired: Option<std::time::Instant>,
}

pub struct PoolManager {
    pools: DashMap<TenantId, Arc<PoolEntry>>,
    /// Connection budgets of PostgreSQL servers, by `host:port`.
    budgets: DashMap<String, Arc<ServerBudget<PgBackend>>>,
    options: PoolOptions,
}

impl PoolManager {
    pub fn new(options: PoolOptions) -> Self {
        Self {
            pools: DashMap::new(),
            budgets: DashMap::new(),
            options,
        }
    }

    /// Applies a route the data plane just learned: if the tenant's pool was opened for
    /// other connection details, or the tenant no longer serves, the pool stops lending
    /// connections at once and is closed (awaited in the background). `force` (a
    /// snapshot from another registry, whose versions may be lower) compares details
    /// whatever the versions.
    pub fn route_changed(&self, tenant_id: &TenantId, route: &Route, force: bool) {
        let Entry::Occupied(mut occupied) = self.pools.entry(tenant_id.clone()) else {
            return;
        };
        let current = occupied.get();
        let stale = current.retired.is_none()
            && (force || current.route_version < route.version)
            && (route.state != RouteState::Active
                || route.target.as_ref() != Some(&current.target));
        if !stale {
            return;
        }
        let retired = Arc::new(PoolEntry {
            target: current.target.clone(),
            route_version: route.version,
            pool: current.pool.clone(),
            retired: Some(std::time::Instant::now()),
        });
        let old = occupied.insert(retired);
        tracing::info!(tenant.id = %tenant_id, "tenant route changed; closing its pool");
        old.pool.mark_closed();
        tokio::spawn(async move { old.pool.close().await });
    }

    /// Closes the pool of a tenant whose route was dropped.
    pub fn close_unrouted(&self, tenant_id: &TenantId) {
        if let Some((_, entry)) = self.pools.remove(tenant_id) {
            entry.pool.mark_closed();
            tokio::spawn(async move { entry.pool.close().await });
        }
    }

    /// The tenant's pool for `target` (from a route of `route_version`), opened lazily if
    /// there is none or if a newer route changed the connection details; a replaced pool
    /// is closed in the background. A request still holding an older route than the pool
    /// was opened for gets the newer pool, and one holding a route older than the change
    /// that closed the tenant's pool gets None: it never brings old details back.
    pub fn pool(
        &self,
        tenant_id: &TenantId,
        target: &Target,
        route_version: i64,
        max_connections: u32,
    ) -> Option<TenantPool> {
        if let Some(entry) = self.pools.get(tenant_id)
            && entry.retired.is_none()
            && (entry.target == *target || entry.route_version >= route_version)
        {
            // Under the map's read lock: the sweep's check runs under its write lock.
            entry.pool.touch();
            return Some(entry.pool.clone());
        }
        match self.pools.entry(tenant_id.clone()) {
            Entry::Occupied(mut occupied) => {
                let current = occupied.get();
                if current.retired.is_some() {
                    if route_version < current.route_version {
                        return None;
                    }
                } else if current.target == *target || current.route_version >= route_version {
                    current.pool.touch();
                    return Some(current.pool.clone());
                }
                let fresh = Arc::new(self.open(target, route_version, max_connections));
                let pool = fresh.pool.clone();
                let replaced = occupied.insert(fresh);
                if replaced.retired.is_none() {
                    tracing::info!(tenant.id = %tenant_id, "tenant connection details changed; closing the old pool");
                    replaced.pool.mark_closed();
                    tokio::spawn(async move { replaced.pool.close().await });
                }
                Some(pool)
            }
            Entry::Vacant(vacant) => {
                let fresh = Arc::new(self.open(target, route_version, max_connections));
                let pool = fresh.pool.clone();
                vacant.insert(fresh);
                Some(pool)
            }
        }
    }

    fn connection_pool_options(&self, max_connections: u32) -> ConnectionPoolOptions {
        ConnectionPoolOptions {
            max_connections: if max_connections == 0 {
                self.options.max_connections_per_tenant
            } else {
                max_connections
            }
            .max(1),
            acquire_timeout: self.options.acquire_timeout,
            idle_timeout: self.options.idle_timeout,
        }
    }

    fn budget(&self, host: &str, port: u16) -> Arc<ServerBudget<PgBackend>> {
        let server = format!("{host}:{port}");
        self.budgets
            .entry(server.clone())
            .or_insert_with(|| ServerBudget::new(server, self.options.postgres_connection_budget))
            .clone()
    }

    fn open(&self, target: &Target, route_version: i64, max_connections: u32) -> PoolEntry {
        let pool = match target {
            Target::Postgres {
                host,
                port,
                database,
                username,
                password,
            } => {
                let mut connect = PgConnectOptions::new(host, *port, database, username, password);
                connect.session_reset = self.options.postgres_session_reset;
                connect.pipelining = self.options.postgres_pipelining;
                let reset: Option<crate::connection_pool::Clean<PgBackend>> =
                    if self.options.postgres_session_reset {
                        Some(reset_session)
                    } else {
                        None
                    };
                TenantPool::Postgres(PgTenantPool::new_lazy(
                    connect,
                    self.connection_pool_options(max_connections),
                    postgres_connected,
                    reset,
                    Some(self.budget(host, *port)),
                ))
            }
            Target::Sqlite { path, .. } => {
                let connect = SqliteConnectOptions {
                    path: path.into(),
                    busy_timeout: Duration::from_secs(5),
                };
                TenantPool::Sqlite(SqliteTenantPool::new_lazy(
                    connect,
                    self.connection_pool_options(max_connections),
                    harden_connection,
                    None,
                    None,
                ))
            }
        };
        PoolEntry {
            target: target.clone(),
            route_version,
            pool,
            retired: None,
        }
    }

    /// Closes idle connections past the idle timeout, the pools of tenants whose route
    /// is gone, no longer serving, or points elsewhere, and pools unused (no connection
    /// open, none handed out) for the idle timeout. Called periodically.
    pub async fn close_stale(&self, router: &Router) {
        let pools: Vec<TenantPool> = self
            .pools
            .iter()
            .map(|entry| entry.value().pool.clone())
            .collect();
        for pool in pools {
            pool.close_expired_idle().await;
        }
        let idle_timeout = self.options.idle_timeout;
        // A pool is swept if its tenant no longer serves here or points elsewhere, if it is
        // a retired tombstone, or if it has been unused for the idle timeout. The last is
        // checked again under the map's lock, where `pool` marks a pool used as it hands
        // it out: a pool a request has just been given is never closed under it.
        let stale_route = |tenant_id: &TenantId, entry: &PoolEntry| {
            entry
                .retired
                .is_some_and(|since| since.elapsed() > Duration::from_secs(1))
                || router.cached(tenant_id).is_none_or(|route| {
                    route.state != RouteState::Active
                        || route.target.as_ref() != Some(&entry.target)
                })
        };
        let candidates: Vec<(TenantId, Arc<PoolEntry>)> = self
            .pools
            .iter()
            .filter(|entry| {
                stale_route(entry.key(), entry.value())
                    || entry.value().pool.is_unused_for(idle_timeout)
            })
            .map(|entry| (entry.key().clone(), entry.value().clone()))
            .collect();
        for (tenant_id, candidate) in candidates {
            // Only the entry that was found: a fresh pool put in meanwhile stays.
            let removed = self.pools.remove_if(&tenant_id, |tenant_id, current| {
                Arc::ptr_eq(current, &candidate)
                    && (stale_route(tenant_id, current) || current.pool.is_unused_for(idle_timeout))
            });
            if let Some((_, entry)) = removed {
                tracing::debug!(tenant.id = %tenant_id, "closing an unused pool, or one of a tenant that no longer serves here");
                entry.pool.mark_closed();
                // Closing waits for connections in use; never hold up the sweep for that.
                tokio::spawn(async move { entry.pool.close().await });
            }
        }
    }

    /// Figures per PostgreSQL server and per tenant pool, sorted.
    pub fn stats(&self) -> (Vec<ServerPoolStats>, Vec<TenantPoolStats>) {
        let mut tenants: Vec<TenantPoolStats> = self
            .pools
            .iter()
            .filter(|entry| entry.value().retired.is_none())
            .map(|entry| TenantPoolStats {
                tenant_id: entry.key().clone(),
                server: match &entry.value().target {
                    Target::Postgres { host, port, .. } => format!("{host}:{port}"),
                    Target::Sqlite { path, .. } => path.clone(),
                },
                max_connections: entry.value().pool.max_connections(),
                connections: entry.value().pool.figures(),
                pipelined_statements: entry.value().pool.pipelined(),
            })
            .collect();
        tenants.sort_by(|a, b| a.tenant_id.as_str().cmp(b.tenant_id.as_str()));
        let mut servers: Vec<ServerPoolStats> = self
            .budgets
            .iter()
            .map(|budget| {
                let mut connections = PoolFigures::default();
                for tenant in tenants.iter().filter(|t| t.server == budget.server()) {
                    connections.idle += tenant.connections.idle;
                    connections.waiting += tenant.connections.waiting;
                }
                // Open counts slots, which also covers connections of closed pools that
                // are still closing.
                connections.open = budget.open();
                connections.idle = connections.idle.min(connections.open);
                connections.in_use = connections.open - connections.idle;
                ServerPoolStats {
                    server: budget.server().to_owned(),
                    budget: budget.budget(),
                    connections,
                    pools: u32::try_from(budget.live_pools()).unwrap_or(u32::MAX),
                    evictions: budget.evictions(),
                }
            })
            .collect();
        servers.sort_by(|a, b| a.server.cmp(&b.server));
        (servers, tenants)
    }

    pub async fn close_all(&self) {
        let tenant_ids: Vec<TenantId> =
            self.pools.iter().map(|entry| entry.key().clone()).collect();
        for tenant_id in tenant_ids {
            if let Some((_, entry)) = self.pools.remove(&tenant_id) {
                entry.pool.close().await;
            }
        }
    }

    pub fn open_pools(&self) -> usize {
        self.pools.len()
    }
}

/// `PoolService`: the pool figures of this data plane.
pub struct PoolApi {
    pub pools: Arc<PoolManager>,
    pub router: Arc<Router>,
    pub route_stream: Arc<crate::route_stream::StreamStatus>,
}

fn figures_to_proto(figures: PoolFigures) -> pb::PoolFigures {
    pb::PoolFigures {
        open: figures.open,
        idle: figures.idle,
        in_use: figures.in_use,
        waiting: figures.waiting,
    }
}

#[tonic::async_trait]
impl pb::pool_service_server::PoolService for PoolApi {
    async fn get_pool_stats(
        &self,
        _request: tonic::Request<pb::GetPoolStatsRequest>,
    ) -> Result<tonic::Response<pb::GetPoolStatsResponse>, tonic::Status> {
        let (servers, tenants) = self.pools.stats();
        Ok(tonic::Response::new(pb::GetPoolStatsResponse {
            servers: servers
                .into_iter()
                .map(|server| pb::ServerPoolStats {
                    server: server.server,
                    budget: server.budget,
                    connections: Some(figures_to_proto(server.connections)),
                    pools: server.pools,
                    evictions: server.evictions,
                })
                .collect(),
            tenants: tenants
                .into_iter()
                .map(|tenant| pb::TenantPoolStats {
                    tenant_id: tenant.tenant_id.to_string(),
                    server: tenant.server,
                    max_connections: tenant.max_connections,
                    connections: Some(figures_to_proto(tenant.connections)),
                    pipelined_statements: tenant.pipelined_statements,
                })
                .collect(),
            routes: self.router.len() as u64,
            route_stream_live: *self.route_stream.live().borrow(),
            route_version: *self.route_stream.applied().borrow(),
        }))
    }
}
