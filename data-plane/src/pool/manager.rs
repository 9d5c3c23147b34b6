//! The pool manager: one pool per tenant (`TenantPool`, opened through the backends'
//! `PoolFactory`), opened lazily with the tenant's own credentials, replaced (and the old
//! one closed) when the tenant's connection details change, closed when the tenant stops
//! serving. It hears of route changes as the route stream's `RouteListener`, and asks
//! the routing rules (`Route::serves`) whether a pool may still serve.
//!
//! Connections are cleaned between requests so that no session state outlives the
//! request that set it; how is each backend's business (`backend::postgres::reset`,
//! `backend::sqlite::connection`).

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tenantry_shared::TenantId;

use super::connection_pool::{PoolFigures, PoolOptions};
use super::tenant::{PoolFactory, TenantPool};
use crate::routing::{Route, RouteListener, Router, Target};

/// How the pool manager sizes and ages tenant pools.
#[derive(Clone, Debug)]
pub(crate) struct PoolManagerOptions {
    /// Most connections of a tenant's pool unless its route says otherwise.
    pub(crate) max_connections_per_tenant: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

/// Pool figures of one tenant.
#[derive(Clone, Debug)]
pub struct TenantPoolStats {
    pub tenant_id: TenantId,
    pub server: String,
    pub max_connections: u32,
    pub connections: PoolFigures,
    /// Statements that went out in one write with another request's, since the pool
    /// opened (PostgreSQL; see `pool::queue`).
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
    pool: Arc<dyn TenantPool>,
    /// The pool was closed because a newer route made its details wrong. Kept for a
    /// moment so that a request still holding an older route cannot open a new pool
    /// with the old details; the sweep removes it.
    retired: Option<std::time::Instant>,
}

pub struct PoolManager {
    pools: DashMap<TenantId, Arc<PoolEntry>>,
    /// Opens pools for a target (the backends).
    factory: Arc<dyn PoolFactory>,
    options: PoolManagerOptions,
}

impl RouteListener for PoolManager {
    fn route_changed(&self, tenant_id: &TenantId, route: &Route, force: bool) {
        PoolManager::route_changed(self, tenant_id, route, force);
    }

    fn route_dropped(&self, tenant_id: &TenantId) {
        self.close_unrouted(tenant_id);
    }
}

impl PoolManager {
    pub(crate) fn new(options: PoolManagerOptions, factory: Arc<dyn PoolFactory>) -> Self {
        Self {
            pools: DashMap::new(),
            factory,
            options,
        }
    }

    /// Applies a route the data plane just learned: if the tenant's pool was opened for
    /// other connection details, or the tenant no longer serves, the pool stops lending
    /// connections at once and is closed (awaited in the background). `force` (a
    /// snapshot from another registry, whose versions may be lower) compares details
    /// whatever the versions.
    pub(crate) fn route_changed(&self, tenant_id: &TenantId, route: &Route, force: bool) {
        let Entry::Occupied(mut occupied) = self.pools.entry(tenant_id.clone()) else {
            return;
        };
        let current = occupied.get();
        let stale = current.retired.is_none()
            && (force || current.route_version < route.version)
            && !route.serves(&current.target);
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
    pub(crate) fn close_unrouted(&self, tenant_id: &TenantId) {
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
    pub(crate) fn pool(
        &self,
        tenant_id: &TenantId,
        target: &Target,
        route_version: i64,
        max_connections: u32,
    ) -> Option<Arc<dyn TenantPool>> {
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

    fn open(&self, target: &Target, route_version: i64, max_connections: u32) -> PoolEntry {
        let options = PoolOptions {
            max_connections: if max_connections == 0 {
                self.options.max_connections_per_tenant
            } else {
                max_connections
            }
            .max(1),
            acquire_timeout: self.options.acquire_timeout,
            idle_timeout: self.options.idle_timeout,
        };
        PoolEntry {
            target: target.clone(),
            route_version,
            pool: self.factory.open(target, options),
            retired: None,
        }
    }

    /// Closes idle connections past the idle timeout, the pools of tenants whose route
    /// is gone, no longer serving, or points elsewhere, and pools unused (no connection
    /// open, none handed out) for the idle timeout. Called periodically.
    pub(crate) async fn close_stale(&self, router: &Router) {
        let pools: Vec<Arc<dyn TenantPool>> = self
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
                || !router.serves(tenant_id, &entry.target)
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
                server: entry.value().target.server(),
                max_connections: entry.value().pool.max_connections(),
                connections: entry.value().pool.figures(),
                pipelined_statements: entry.value().pool.pipelined(),
            })
            .collect();
        tenants.sort_by(|a, b| a.tenant_id.as_str().cmp(b.tenant_id.as_str()));
        let mut servers: Vec<ServerPoolStats> = self
            .factory
            .budgets()
            .into_iter()
            .map(|budget| {
                let mut connections = PoolFigures::default();
                for tenant in tenants.iter().filter(|t| t.server == budget.server) {
                    connections.idle += tenant.connections.idle;
                    connections.waiting += tenant.connections.waiting;
                }
                // Open counts slots, which also covers connections of closed pools that
                // are still closing.
                connections.open = budget.open;
                connections.idle = connections.idle.min(connections.open);
                connections.in_use = connections.open - connections.idle;
                ServerPoolStats {
                    server: budget.server,
                    budget: budget.budget,
                    connections,
                    pools: u32::try_from(budget.pools).unwrap_or(u32::MAX),
                    evictions: budget.evictions,
                }
            })
            .collect();
        servers.sort_by(|a, b| a.server.cmp(&b.server));
        (servers, tenants)
    }

    pub(crate) async fn close_all(&self) {
        let tenant_ids: Vec<TenantId> =
            self.pools.iter().map(|entry| entry.key().clone()).collect();
        let closing = tenant_ids.iter().filter_map(|tenant_id| {
            let (_, entry) = self.pools.remove(tenant_id)?;
            Some(async move { entry.pool.close().await })
        });
        futures::future::join_all(closing).await;
    }
}

#[cfg(test)]
mod tests {
    //! The pool manager's bookkeeping of which pool serves which route, on pools that
    //! only count what is done to them (the backends' own behaviour is tested end to end
    //! against real databases).

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use futures::future::BoxFuture;
    use tenantry_proto::dataplane::v1 as pb;

    use super::*;
    use crate::error::{DataPlaneError, Result};
    use crate::pool::connection_pool::ManagedPool;
    use crate::pool::tenant::{BudgetFigures, Call};
    use crate::routing::{RouteState, RouterOptions};

    #[derive(Default)]
    struct CountingPool {
        marked_closed: AtomicBool,
        closed: AtomicUsize,
        unused: AtomicBool,
    }

    impl ManagedPool for CountingPool {
        fn figures(&self) -> PoolFigures {
            PoolFigures::default()
        }
        fn max_connections(&self) -> u32 {
            1
        }
        fn touch(&self) {
            self.unused.store(false, Ordering::Release);
        }
        fn is_unused_for(&self, _: Duration) -> bool {
            self.unused.load(Ordering::Acquire)
        }
        fn close_expired_idle(&self) -> BoxFuture<'_, ()> {
            Box::pin(std::future::ready(()))
        }
        fn mark_closed(&self) {
            self.marked_closed.store(true, Ordering::Release);
        }
        fn close(&self) -> BoxFuture<'_, ()> {
            self.closed.fetch_add(1, Ordering::AcqRel);
            Box::pin(std::future::ready(()))
        }
    }

    fn refused<T: Send + 'static>() -> BoxFuture<'static, Result<T>> {
        Box::pin(std::future::ready(Err(DataPlaneError::Internal(
            "a counting pool runs nothing".to_owned(),
        ))))
    }

    impl TenantPool for CountingPool {
        fn execute<'a>(
            &'a self,
            _: &'a pb::Statement,
            _: &'a Call<'a>,
        ) -> BoxFuture<'a, Result<pb::ExecuteResponse>> {
            refused()
        }
        fn query<'a>(
            &'a self,
            _: &'a pb::Statement,
            _: &'a Call<'a>,
        ) -> BoxFuture<'a, Result<pb::QueryResponse>> {
            refused()
        }
        fn batch<'a>(
            &'a self,
            _: &'a [pb::Statement],
            _: &'a Call<'a>,
        ) -> BoxFuture<'a, Result<Vec<pb::ExecuteResponse>>> {
            refused()
        }
    }

    /// Remembers every pool it opened, with the options it was given.
    #[derive(Default)]
    struct Opened(Mutex<Vec<(Target, u32, Arc<CountingPool>)>>);

    impl PoolFactory for Opened {
        fn open(&self, target: &Target, options: PoolOptions) -> Arc<dyn TenantPool> {
            let pool = Arc::new(CountingPool::default());
            if let Ok(mut opened) = self.0.lock() {
                opened.push((target.clone(), options.max_connections, pool.clone()));
            }
            pool
        }
        fn budgets(&self) -> Vec<BudgetFigures> {
            Vec::new()
        }
    }

    impl Opened {
        fn pool(&self, index: usize) -> Arc<CountingPool> {
            let opened = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            opened[index].2.clone()
        }
        fn count(&self) -> usize {
            self.0.lock().map_or(0, |opened| opened.len())
        }
    }

    fn sqlite(path: &str) -> Target {
        Target::Sqlite {
            path: path.to_owned(),
            incarnation: 1,
        }
    }

    fn route(state: RouteState, version: i64, target: &Target) -> Route {
        Route {
            state,
            reason: String::new(),
            version,
            target: Some(target.clone()),
            max_connections: 0,
            tracing: None,
        }
    }

    fn new_manager() -> (PoolManager, Arc<Opened>) {
        let opened = Arc::new(Opened::default());
        let manager = PoolManager::new(
            PoolManagerOptions {
                max_connections_per_tenant: 4,
                acquire_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(60),
            },
            opened.clone(),
        );
        (manager, opened)
    }

    fn acme() -> TenantId {
        TenantId::parse("acme").unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test(start_paused = true)]
    async fn one_pool_per_target_and_the_tenants_own_size() {
        let (manager, opened) = new_manager();
        let a = sqlite("/a.db");
        assert!(manager.pool(&acme(), &a, 1, 0).is_some());
        assert!(manager.pool(&acme(), &a, 1, 0).is_some());
        assert_eq!(opened.count(), 1, "the same target opened twice");
        assert!(manager.pool(&acme(), &sqlite("/b.db"), 2, 9).is_some());
        assert_eq!(opened.count(), 2);
        assert!(
            opened.pool(0).marked_closed.load(Ordering::Acquire),
            "the replaced pool lends on"
        );
        let sizes: Vec<u32> = opened
            .0
            .lock()
            .map(|o| o.iter().map(|e| e.1).collect())
            .unwrap_or_default();
        assert_eq!(sizes, vec![4, 9], "0 means the data plane's default");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_with_an_older_route_never_reopens_old_details() {
        let (manager, opened) = new_manager();
        let (a, b) = (sqlite("/a.db"), sqlite("/b.db"));
        assert!(manager.pool(&acme(), &a, 1, 0).is_some());
        // The stream brings version 2 with other details: the pool stops lending at once.
        manager.route_changed(&acme(), &route(RouteState::Active, 2, &b), false);
        assert!(opened.pool(0).marked_closed.load(Ordering::Acquire));
        // A request that resolved version 1 before the change gets nothing.
        assert!(manager.pool(&acme(), &a, 1, 0).is_none());
        assert_eq!(opened.count(), 1);
        // One with version 2 opens the new details.
        assert!(manager.pool(&acme(), &b, 2, 0).is_some());
        assert_eq!(opened.count(), 2);
        // An older route than the pool's is served the newer pool, not its own details.
        assert!(manager.pool(&acme(), &a, 1, 0).is_some());
        assert_eq!(opened.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspension_or_a_dropped_route_closes_the_pool() {
        let (manager, opened) = new_manager();
        let a = sqlite("/a.db");
        assert!(manager.pool(&acme(), &a, 1, 0).is_some());
        manager.route_changed(&acme(), &route(RouteState::Active, 1, &a), false);
        assert!(
            !opened.pool(0).marked_closed.load(Ordering::Acquire),
            "same route closed it"
        );
        manager.route_changed(&acme(), &route(RouteState::Suspended, 2, &a), false);
        assert!(opened.pool(0).marked_closed.load(Ordering::Acquire));

        let (manager, opened) = new_manager();
        assert!(manager.pool(&acme(), &a, 1, 0).is_some());
        RouteListener::route_dropped(&manager, &acme());
        assert!(opened.pool(0).marked_closed.load(Ordering::Acquire));
        assert!(manager.stats().1.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_closes_pools_that_no_longer_serve_or_sit_unused() {
        let (manager, opened) = new_manager();
        let router = Router::new(
            "http://127.0.0.1:9",
            RouterOptions {
                unknown_tenant_ttl: Duration::from_secs(1),
                control_plane_timeout: Duration::from_secs(1),
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (a, globex) = (
            sqlite("/a.db"),
            TenantId::parse("globex").unwrap_or_else(|e| panic!("{e}")),
        );
        router.apply(acme(), Arc::new(route(RouteState::Active, 1, &a)), false);
        router.apply(
            globex.clone(),
            Arc::new(route(RouteState::Active, 1, &a)),
            false,
        );
        assert!(manager.pool(&acme(), &a, 1, 0).is_some());
        assert!(manager.pool(&globex, &a, 1, 0).is_some());
        manager.close_stale(&router).await;
        assert_eq!(manager.stats().1.len(), 2, "serving, used pools were swept");
        // acme stops serving; globex's pool sits unused.
        router.apply(acme(), Arc::new(route(RouteState::Suspended, 2, &a)), false);
        opened.pool(1).unused.store(true, Ordering::Release);
        manager.close_stale(&router).await;
        tokio::task::yield_now().await;
        assert!(manager.stats().1.is_empty());
        assert_eq!(opened.pool(0).closed.load(Ordering::Acquire), 1);
        assert_eq!(opened.pool(1).closed.load(Ordering::Acquire), 1);
    }
}
