//! A connection budget shared by every pool of tenants on one database server: every
//! open connection holds one of the budget's slots, so all pools together never hold
//! more connections than the budget. When the budget is full, a pool that needs a new
//! connection closes the server's least recently used idle connection (of any pool on the
//! server) to make room, or waits, bounded, for one to come back; while a pool with no
//! connection at all waits, pools that have some give theirs back (`starving`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::connection_pool::{Backend, Idle, Inner, Waiting};

/// A connection budget shared by every pool of tenants on one database server.
pub(crate) struct ServerBudget<B: Backend> {
    pub(super) server: String,
    pub(super) budget: u32,
    pub(super) slots: Arc<Semaphore>,
    /// Woken whenever a connection goes idle somewhere on the server (so it can be
    /// evicted) or a slot frees.
    pub(super) changed: Notify,
    pub(super) pools: Mutex<Vec<Weak<Inner<B>>>>,
    pub(super) evictions: AtomicU64,
    /// Requests of pools with no connection at all waiting for a slot. While there are
    /// any, pools that have connections do not take free slots, and a connection coming
    /// back to a pool that has others is closed to free its slot: no tenant starves
    /// while busy ones keep the whole budget.
    pub(super) starving: AtomicU32,
}

impl<B: Backend> ServerBudget<B> {
    pub(crate) fn new(server: String, budget: u32) -> Arc<Self> {
        Arc::new(Self {
            server,
            budget: budget.max(1),
            slots: Arc::new(Semaphore::new(budget.max(1) as usize)),
            changed: Notify::new(),
            pools: Mutex::new(Vec::new()),
            evictions: AtomicU64::new(0),
            starving: AtomicU32::new(0),
        })
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    pub(crate) fn budget(&self) -> u32 {
        self.budget
    }

    /// Connections open to the server now (slots taken).
    pub(crate) fn open(&self) -> u32 {
        self.budget
            .saturating_sub(u32::try_from(self.slots.available_permits()).unwrap_or(u32::MAX))
    }

    /// Idle connections closed to make room, since start.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Pools on this server that are still alive.
    pub(crate) fn live_pools(&self) -> usize {
        self.pools.lock().map_or(0, |pools| pools.len())
    }

    pub(super) fn register(&self, pool: &Arc<Inner<B>>) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.retain(|weak| weak.strong_count() > 0);
            pools.push(Arc::downgrade(pool));
        }
    }

    pub(super) fn forget_closed(&self) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.retain(|weak| {
                weak.upgrade()
                    .is_some_and(|pool| !pool.closed.load(Ordering::Acquire))
            });
        }
    }

    /// A free slot now, if the budget has one.
    pub(super) fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// A slot for a new connection, taken from the server's least recently used idle
    /// connection (closed for it) when the budget is full, or else waited for until
    /// `deadline`. The slot of an evicted connection goes to the request that evicted it.
    pub(super) async fn slot(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, ()> {
        self.starving.fetch_add(1, Ordering::AcqRel);
        let _starving = Waiting(&self.starving);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(slot) = self.try_slot() {
                return Ok(slot);
            }
            if let Some(evicted) = self.take_least_recently_used() {
                let Idle {
                    connection,
                    mut slot,
                    ..
                } = evicted;
                let _ = tokio::time::timeout_at(deadline, B::close(connection)).await;
                if let Some(server) = slot.server.take() {
                    return Ok(server);
                }
                continue;
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline) => return Err(()),
            }
        }
    }

    /// Takes out the idle connection (of any pool on this server) that has been idle
    /// longest, for the caller to close. None if no connection is idle.
    fn take_least_recently_used(&self) -> Option<Idle<B>> {
        // Another request may take the chosen connection first; then look again.
        for _ in 0..8 {
            let pools: Vec<Arc<Inner<B>>> = match self.pools.lock() {
                Ok(pools) => pools.iter().filter_map(Weak::upgrade).collect(),
                Err(_) => return None,
            };
            let oldest = pools
                .iter()
                .filter_map(|pool| {
                    let idle = pool.idle.lock().ok()?;
                    idle.first().map(|entry| (entry.since, pool.clone()))
                })
                .min_by_key(|(since, _)| *since);
            let (_, pool) = oldest?;
            let evicted = match pool.idle.lock() {
                Ok(mut idle) if !idle.is_empty() => idle.remove(0),
                _ => continue,
            };
            self.evictions.fetch_add(1, Ordering::Relaxed);
            return Some(evicted);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    //! The budget's races, on a backend whose connections are numbers (no database: this
    //! is the pool's own bookkeeping), with tokio's clock paused, so waits end when the
    //! runtime has nothing else to do rather than after real time.

    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use futures::future::BoxFuture;

    use super::*;
    use crate::pool::connection_pool::{AcquireError, ConnectionPool, PoolOptions};

    /// Connections are numbers; closing one records it.
    struct Numbers;

    #[derive(Default)]
    struct Counters {
        opened: AtomicU64,
        closed: Mutex<Vec<u64>>,
    }

    static COUNTERS: std::sync::LazyLock<Mutex<std::collections::HashMap<u64, Arc<Counters>>>> =
        std::sync::LazyLock::new(Default::default);

    impl Backend for Numbers {
        /// (test id, connection number)
        type Connection = (u64, u64);
        type ConnectOptions = u64;
        type Shared = ();
        type Controls = ();
        type Error = ();

        fn connect(test: &u64) -> BoxFuture<'_, Result<(u64, u64), ()>> {
            let counters = counters(*test);
            let number = counters.opened.fetch_add(1, Ordering::AcqRel);
            Box::pin(std::future::ready(Ok((*test, number))))
        }

        fn close(connection: (u64, u64)) -> BoxFuture<'static, ()> {
            if let Ok(mut closed) = counters(connection.0).closed.lock() {
                closed.push(connection.1);
            }
            Box::pin(std::future::ready(()))
        }
    }

    fn counters(test: u64) -> Arc<Counters> {
        let mut all = COUNTERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.entry(test).or_default().clone()
    }

    fn harden(_: &mut (u64, u64), _: Arc<()>) -> BoxFuture<'_, Result<(), ()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn pool(test: u64, budget: &Arc<ServerBudget<Numbers>>, max: u32) -> ConnectionPool<Numbers> {
        ConnectionPool::new_lazy(
            test,
            PoolOptions {
                max_connections: max,
                acquire_timeout: Duration::from_secs(3),
                idle_timeout: Duration::from_secs(60),
            },
            harden,
            None,
            Some(budget.clone()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_with_no_connection_evicts_the_oldest_idle_one_of_another() {
        let budget = ServerBudget::new("db:5432".to_owned(), 2);
        let older = pool(1, &budget, 2);
        let newer = pool(1, &budget, 2);
        let quiet = pool(1, &budget, 2);
        let first = older
            .acquire()
            .await
            .map_err(|_| "older")
            .unwrap_or_else(|e| panic!("{e}"));
        let oldest: (u64, u64) = *first;
        drop(first);
        tokio::time::advance(Duration::from_millis(5)).await;
        let second = newer
            .acquire()
            .await
            .map_err(|_| "newer")
            .unwrap_or_else(|e| panic!("{e}"));
        drop(second);
        assert_eq!(budget.open(), 2);
        let taken = quiet.acquire().await;
        assert!(taken.is_ok(), "the quiet pool got no connection");
        assert_eq!(budget.evictions(), 1);
        assert_eq!(budget.open(), 2, "the budget was exceeded");
        let closed = counters(1)
            .closed
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        assert_eq!(
            closed,
            vec![oldest.1],
            "not the least recently used connection"
        );
        assert_eq!((older.figures().open, newer.figures().open), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_fails_with_its_cause_after_the_wait() {
        let budget = ServerBudget::new("db:5432".to_owned(), 1);
        let holder = pool(2, &budget, 1);
        let waiter = pool(2, &budget, 1);
        let _held = holder
            .acquire()
            .await
            .map_err(|_| ())
            .unwrap_or_else(|()| panic!("held"));
        match waiter.acquire().await {
            // (`waited` is wall time, which a paused clock does not move.)
            Err(AcquireError::Budget {
                server, budget: 1, ..
            }) => assert_eq!(server, "db:5432"),
            Err(other) => panic!("expected the budget's error, got {other:?}"),
            Ok(_) => panic!("a second connection went past a budget of 1"),
        }
        assert_eq!(budget.open(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_starving_pool_gets_the_slot_of_a_connection_coming_back() {
        let budget = ServerBudget::new("db:5432".to_owned(), 2);
        let busy = pool(3, &budget, 2);
        let starving = pool(3, &budget, 1);
        let first = busy
            .acquire()
            .await
            .map_err(|_| ())
            .unwrap_or_else(|()| panic!("1"));
        let _second = busy
            .acquire()
            .await
            .map_err(|_| ())
            .unwrap_or_else(|()| panic!("2"));
        let waiting = tokio::spawn(async move { starving.acquire().await.map(|c| *c) });
        // Let the starving request register and wait.
        while budget.starving.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // The busy pool has another connection: this one closes to free its slot.
        drop(first);
        let got = waiting
            .await
            .map_err(|_| ())
            .unwrap_or_else(|()| panic!("task"));
        assert!(got.is_ok(), "the starving pool got no connection");
        assert_eq!(budget.open(), 2);
        assert_eq!(
            busy.figures().open,
            1,
            "the busy pool kept both connections"
        );
    }
}
