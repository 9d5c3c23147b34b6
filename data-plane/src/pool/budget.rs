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
