//! A small connection pool for tenant databases (SQLite and PostgreSQL).
//!
//! sqlx's pool checks every connection it gets back with a ping: a round trip to the
//! server (PostgreSQL) or to the connection's worker thread (SQLite) on every request.
//! This pool instead runs the backend's own clean-up when a connection comes back (the
//! PostgreSQL session reset, which doubles as the liveness check; nothing for SQLite,
//! which is in-process) and then hands it out again. It keeps what the data plane needs
//! of a pool: a maximum size, a bounded wait for a free connection, idle connections
//! closed after a while, hardening of every new connection, and an awaitable `close()`.
//!
//! Pools of tenants on one PostgreSQL server share that server's `ServerBudget`
//! (`pool::budget`). The pool names no backend: a backend plugs in by implementing
//! `Backend`.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tenantry_shared::TenantId;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::budget::ServerBudget;
use crate::error::DataPlaneError;

static CLOCK_EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `at` as microseconds since a process-wide epoch, for instants kept in atomics.
pub(crate) fn micros_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*CLOCK_EPOCH).as_micros()).unwrap_or(u64::MAX)
}

/// Longest a connection's clean-up (the PostgreSQL session reset) may take before the
/// connection is closed instead.
const CLEAN_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest closing a pool waits for its lent-out connections to come back and close.
/// (Above the longest a connection can take to close: 5 s of clean-up, then a 2 s cancel
/// and 10 s for its statement to end.)
const CLOSE_WAIT: Duration = Duration::from_secs(20);

/// Longest a request waits for a connection that is being cleaned before it opens one.
const CLEANING_WAIT: Duration = Duration::from_millis(20);

/// What the pool needs of a database driver: open a connection, close one.
pub(crate) trait Backend: Sized + Send + Sync + 'static {
    type Connection: Send + 'static;
    type ConnectOptions: Send + Sync + 'static;
    /// What the pool's requests share besides connections (see `ConnectionPool::shared`).
    type Shared: Default + Send + Sync + 'static;
    /// Per-connection switches the backend reads while a statement runs (a deadline, what
    /// its authorizer lets through), set from the request's task. One per connection,
    /// made when it opens and kept with it.
    type Controls: Default + Send + Sync + 'static;
    /// Why a connection could not be opened or set up.
    type Error: Send + 'static;
    fn connect(
        options: &Self::ConnectOptions,
    ) -> BoxFuture<'_, Result<Self::Connection, Self::Error>>;
    /// A connection's request has ended: put its controls back as a new request expects
    /// them. `reused`: the connection goes back to the pool (else it is being closed, and
    /// whatever still runs on it must stay stoppable).
    fn returned(_controls: &Self::Controls, _reused: bool) {}
    /// Whether a connection coming back from a request is already clean (its clean-up
    /// ran as part of the request), so that it skips the pool's clean-up. Consumes that.
    fn take_clean(_connection: &mut Self::Connection) -> bool {
        false
    }
    /// False once the connection is known to be unusable (the server closed it, a call on
    /// it broke off): it is closed instead of going back to the pool.
    fn is_open(_connection: &Self::Connection) -> bool {
        true
    }
    /// Whether an idle connection is still usable, checked without waiting just before
    /// it is lent out: the server may have closed it while it sat in the pool (a restart,
    /// `pg_terminate_backend`, `idle_session_timeout`). One that is not is closed instead
    /// and the request gets another.
    fn check_idle(_connection: &mut Self::Connection) -> bool {
        true
    }
    /// Closes the connection (gracefully where the protocol has a goodbye).
    fn close(connection: Self::Connection) -> BoxFuture<'static, ()>;
}

/// Sets up a new connection with its controls (authorizer, progress handler, limits).
pub(crate) type Harden<B> = for<'c> fn(
    &'c mut <B as Backend>::Connection,
    Arc<<B as Backend>::Controls>,
) -> BoxFuture<'c, Result<(), <B as Backend>::Error>>;

/// Cleans a connection that comes back from a request; false closes it instead.
pub(crate) type Clean<B> = for<'c> fn(
    &'c mut <B as Backend>::Connection,
    &'c <B as Backend>::Controls,
) -> BoxFuture<'c, bool>;

pub(crate) struct PoolOptions {
    pub(crate) max_connections: u32,
    /// How long `acquire` waits for a connection (free slot, budget, connect) in all.
    pub(crate) acquire_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

/// Why `acquire` gave no connection (`E`: the backend's connect error).
#[derive(Debug)]
pub(crate) enum AcquireError<E> {
    /// The pool was closed (its tenant's route changed or the plane is stopping).
    Closed,
    /// The tenant's own maximum of connections stayed in use for the whole wait.
    TenantLimit {
        max_connections: u32,
        waited: Duration,
    },
    /// The server's connection budget stayed in use (by every tenant on it) for the wait.
    Budget {
        server: String,
        budget: u32,
        waited: Duration,
    },
    /// Connecting took longer than what was left of the wait.
    ConnectTimeout {
        waited: Duration,
        connecting: Duration,
    },
    /// Connecting or setting up the connection failed.
    Connect(E),
}

impl<E> AcquireError<E> {
    /// The error a request of `tenant` gets. All are UNAVAILABLE: the request did not
    /// reach the database and may be retried. `connect_error` maps the backend's own.
    pub(crate) fn into_error(
        self,
        tenant: &TenantId,
        connect_error: impl FnOnce(E, &TenantId) -> DataPlaneError,
    ) -> DataPlaneError {
        match self {
            Self::Closed => DataPlaneError::Unavailable(format!(
                "the connection pool of tenant {tenant} was closed (its route changed or the data plane is stopping); retry"
            )),
            Self::TenantLimit {
                max_connections,
                waited,
            } => DataPlaneError::Unavailable(format!(
                "tenant {tenant} already uses all of its {max_connections} connections and none came back within {} ms; \
                 retry later, send fewer concurrent requests, or raise the tenant's max_connections",
                waited.as_millis()
            )),
            Self::Budget {
                server,
                budget,
                waited,
            } => DataPlaneError::Unavailable(format!(
                "the connection budget of database server {server} ({budget} connections, shared by its tenants) \
                 stayed in use for {} ms; retry later, or raise postgres_connection_budget",
                waited.as_millis()
            )),
            Self::ConnectTimeout { waited, connecting } => DataPlaneError::Unavailable(format!(
                "the database of tenant {tenant} did not accept a connection within {} ms \
             ({} ms waited in all, pool_acquire_timeout_ms); its server may be down or overloaded",
                connecting.as_millis(),
                waited.as_millis()
            )),
            Self::Connect(error) => connect_error(error, tenant),
        }
    }
}

/// What an open connection holds: its place in the pool's count and, for a pool under a
/// server budget, one of the budget's slots. Both free when the connection is closed.
pub(super) struct Slot<B: Backend> {
    pool: Arc<Inner<B>>,
    pub(super) server: Option<OwnedSemaphorePermit>,
}

impl<B: Backend> Drop for Slot<B> {
    fn drop(&mut self) {
        self.pool.open.fetch_sub(1, Ordering::AcqRel);
        self.pool.returned.notify_waiters();
        if let Some(budget) = &self.pool.budget {
            // Release the server slot before waking waiters.
            drop(self.server.take());
            budget.changed.notify_waiters();
        }
    }
}

pub(super) struct Idle<B: Backend> {
    pub(super) connection: B::Connection,
    controls: Arc<B::Controls>,
    pub(super) since: Instant,
    pub(super) slot: Slot<B>,
}

pub(super) struct Inner<B: Backend> {
    connect: B::ConnectOptions,
    options: PoolOptions,
    harden: Harden<B>,
    clean: Option<Clean<B>>,
    pub(super) idle: Mutex<Vec<Idle<B>>>,
    permits: Arc<Semaphore>,
    pub(super) closed: AtomicBool,
    budget: Option<Arc<ServerBudget<B>>>,
    /// Connections open (idle, lent, or being cleaned).
    open: AtomicU32,
    /// Requests waiting in `acquire`.
    waiting: AtomicU32,
    /// Connections being cleaned after a request, and a wake-up when one comes back.
    cleaning: AtomicU32,
    returned: Notify,
    /// When a connection was last handed out (micros since `CLOCK_EPOCH`).
    last_used: AtomicU64,
    shared: B::Shared,
}

/// Connection figures of one pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolFigures {
    pub open: u32,
    pub idle: u32,
    pub in_use: u32,
    pub waiting: u32,
}

/// Cheap to clone; every clone is the same pool.
pub(crate) struct ConnectionPool<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for ConnectionPool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// A connection lent to one request. Dropping it gives the connection back, unless
/// `close_on_drop` was called (the request was abandoned half-way) or the pool is closed.
pub(crate) struct PooledConnection<B: Backend> {
    /// Taken out exactly once, in `drop`.
    connection: ManuallyDrop<B::Connection>,
    controls: Arc<B::Controls>,
    pool: Arc<Inner<B>>,
    close: bool,
    /// Held while the connection is lent (and while it is cleaned afterwards).
    permit: Option<OwnedSemaphorePermit>,
    slot: Option<Slot<B>>,
}

impl<B: Backend> ConnectionPool<B> {
    /// A pool that opens connections on first use; `harden` runs on each new connection,
    /// `clean` on each one that comes back. With a `budget`, every connection takes one
    /// of the server's slots.
    pub(crate) fn new_lazy(
        connect: B::ConnectOptions,
        options: PoolOptions,
        harden: Harden<B>,
        clean: Option<Clean<B>>,
        budget: Option<Arc<ServerBudget<B>>>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(options.max_connections.max(1) as usize));
        let inner = Arc::new(Inner {
            connect,
            options,
            harden,
            clean,
            idle: Mutex::new(Vec::new()),
            permits,
            closed: AtomicBool::new(false),
            budget,
            open: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            cleaning: AtomicU32::new(0),
            returned: Notify::new(),
            last_used: AtomicU64::new(micros_since_epoch(Instant::now())),
            shared: B::Shared::default(),
        });
        if let Some(budget) = &inner.budget {
            budget.register(&inner);
        }
        Self { inner }
    }

    /// A free connection: an idle one, or a new one while under the tenant's maximum and
    /// the server's budget. Waits at most the acquire timeout in all.
    pub(crate) async fn acquire(&self) -> Result<PooledConnection<B>, AcquireError<B::Error>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(AcquireError::Closed);
        }
        let started = Instant::now();
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(self.inner.options.acquire_timeout)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        self.inner.waiting.fetch_add(1, Ordering::AcqRel);
        let waited = Waiting(&self.inner.waiting);
        let permit = tokio::time::timeout_at(deadline, self.inner.permits.clone().acquire_owned())
            .await
            .map_err(|_| AcquireError::TenantLimit {
                max_connections: self.inner.options.max_connections,
                waited: started.elapsed(),
            })?
            .map_err(|_| AcquireError::Closed)?;
        self.inner
            .last_used
            .store(micros_since_epoch(Instant::now()), Ordering::Relaxed);
        let (mut reused, expired) = self.take_idle();
        for stale in expired {
            tokio::spawn(async move {
                B::close(stale.connection).await;
                drop(stale.slot);
            });
        }
        if reused.is_none() && self.inner.cleaning.load(Ordering::Acquire) > 0 {
            // A connection is being cleaned (one round trip): waiting for it is far
            // cheaper than opening another one.
            let returned = self.inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            reused = self.take_idle().0;
            if reused.is_none() && self.inner.cleaning.load(Ordering::Acquire) > 0 {
                let wait_until = deadline.min(tokio::time::Instant::now() + CLEANING_WAIT);
                let _ = tokio::time::timeout_at(wait_until, returned).await;
                reused = self.take_idle().0;
            }
        }
        let (connection, controls, slot) = match reused {
            Some(idle) => (idle.connection, idle.controls, idle.slot),
            None => match self.connection_or_slot(deadline, started).await? {
                Ok(idle) => (idle.connection, idle.controls, idle.slot),
                Err(server) => {
                    self.inner.open.fetch_add(1, Ordering::AcqRel);
                    let slot = Slot {
                        pool: self.inner.clone(),
                        server,
                    };
                    let connecting = Instant::now();
                    let connected = tokio::time::timeout_at(deadline, async {
                        let mut connection = B::connect(&self.inner.connect).await?;
                        let controls = Arc::new(B::Controls::default());
                        (self.inner.harden)(&mut connection, controls.clone()).await?;
                        Ok::<_, B::Error>((connection, controls))
                    })
                    .await
                    .map_err(|_| AcquireError::ConnectTimeout {
                        waited: started.elapsed(),
                        connecting: connecting.elapsed(),
                    })?
                    .map_err(AcquireError::Connect)?;
                    if self.inner.closed.load(Ordering::Acquire) {
                        // The route changed while this connected: never use it.
                        let (connection, _) = connected;
                        tokio::spawn(async move {
                            B::close(connection).await;
                            drop(slot);
                        });
                        return Err(AcquireError::Closed);
                    }
                    (connected.0, connected.1, slot)
                }
            },
        };
        drop(waited);
        Ok(PooledConnection {
            connection: ManuallyDrop::new(connection),
            controls,
            pool: self.inner.clone(),
            close: false,
            permit: Some(permit),
            slot: Some(slot),
        })
    }

    /// With no idle connection at hand: an idle one that comes back (Ok), or room to open
    /// a new one (Err, with the server slot if the pool is under a budget). When the
    /// budget is full, a pool that has connections waits for one of its own to come back
    /// rather than take another tenant's; a pool with none evicts the server's least
    /// recently used idle connection.
    async fn connection_or_slot(
        &self,
        deadline: tokio::time::Instant,
        started: Instant,
    ) -> Result<Result<Idle<B>, Option<OwnedSemaphorePermit>>, AcquireError<B::Error>> {
        let Some(budget) = &self.inner.budget else {
            return Ok(Err(None));
        };
        let over_budget = || AcquireError::Budget {
            server: budget.server.clone(),
            budget: budget.budget,
            waited: started.elapsed(),
        };
        loop {
            let returned = self.inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            let changed = budget.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(AcquireError::Closed);
            }
            if let Some(idle) = self.take_idle().0 {
                return Ok(Ok(idle));
            }
            let has_connections = self.inner.open.load(Ordering::Acquire) > 0;
            if (!has_connections || budget.starving.load(Ordering::Acquire) == 0)
                && let Some(slot) = budget.try_slot()
            {
                return Ok(Err(Some(slot)));
            }
            if !has_connections {
                return budget
                    .slot(deadline)
                    .await
                    .map(|slot| Err(Some(slot)))
                    .map_err(|()| over_budget());
            }
            tokio::select! {
                _ = &mut returned => {}
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline) => return Err(over_budget()),
            }
        }
    }

    /// Whether every connection the pool may have is lent out (or being cleaned), so that
    /// `acquire` would wait.
    pub(crate) fn is_saturated(&self) -> bool {
        self.inner.permits.available_permits() == 0
    }

    /// How the pool connects (and what else its backend was told).
    pub(crate) fn connect_options(&self) -> &B::ConnectOptions {
        &self.inner.connect
    }

    /// What the pool's requests share besides connections (the backend's `Shared`).
    pub(crate) fn shared(&self) -> &B::Shared {
        &self.inner.shared
    }

    /// This pool's connection figures.
    pub(crate) fn figures(&self) -> PoolFigures {
        let open = self.inner.open.load(Ordering::Acquire);
        let idle = self
            .inner
            .idle
            .lock()
            .map_or(0, |idle| u32::try_from(idle.len()).unwrap_or(u32::MAX));
        PoolFigures {
            open,
            idle: idle.min(open),
            in_use: open.saturating_sub(idle),
            waiting: self.inner.waiting.load(Ordering::Acquire),
        }
    }

    pub(crate) fn max_connections(&self) -> u32 {
        self.inner.options.max_connections
    }

    /// Marks the pool used now (a request is about to ask it for a connection).
    pub(crate) fn touch(&self) {
        self.inner
            .last_used
            .store(micros_since_epoch(Instant::now()), Ordering::Relaxed);
    }

    /// No connection open and none handed out for `idle_for`.
    pub(crate) fn is_unused_for(&self, idle_for: Duration) -> bool {
        let last_used = self.inner.last_used.load(Ordering::Relaxed);
        self.inner.open.load(Ordering::Acquire) == 0
            && self.inner.waiting.load(Ordering::Acquire) == 0
            && micros_since_epoch(Instant::now()).saturating_sub(last_used)
                > u64::try_from(idle_for.as_micros()).unwrap_or(u64::MAX)
    }

    /// The most recently used idle connection that is still open, and the idle ones to
    /// close: past the idle timeout, or closed by the server (`Backend::check_idle`).
    fn take_idle(&self) -> (Option<Idle<B>>, Vec<Idle<B>>) {
        let mut expired = Vec::new();
        let mut candidate = {
            let Ok(mut idle) = self.inner.idle.lock() else {
                return (None, expired);
            };
            if self.inner.closed.load(Ordering::Acquire) {
                return (None, expired);
            }
            let now = Instant::now();
            let idle_timeout = self.inner.options.idle_timeout;
            let mut index = 0;
            while index < idle.len() {
                if now.duration_since(idle[index].since) > idle_timeout {
                    expired.push(idle.remove(index));
                } else {
                    index += 1;
                }
            }
            idle.pop()
        };
        // Checked outside the lock (the check may make a system call and log).
        while let Some(mut idle) = candidate {
            if B::check_idle(&mut idle.connection) {
                return (Some(idle), expired);
            }
            expired.push(idle);
            candidate = match self.inner.idle.lock() {
                Ok(mut idle) if !self.inner.closed.load(Ordering::Acquire) => idle.pop(),
                _ => None,
            };
        }
        (None, expired)
    }

    /// Closes idle connections past the idle timeout (called periodically).
    pub(crate) async fn close_expired_idle(&self) {
        let expired: Vec<Idle<B>> = match self.inner.idle.lock() {
            Ok(mut idle) => {
                let now = Instant::now();
                let idle_timeout = self.inner.options.idle_timeout;
                let (expired, kept): (Vec<Idle<B>>, Vec<Idle<B>>) = idle
                    .drain(..)
                    .partition(|entry| now.duration_since(entry.since) > idle_timeout);
                *idle = kept;
                expired
            }
            Err(_) => Vec::new(),
        };
        for entry in expired {
            B::close(entry.connection).await;
            drop(entry.slot);
        }
    }

    /// Closes every idle connection now and every lent one when it comes back.
    pub(crate) async fn close(&self) {
        for Idle {
            connection, slot, ..
        } in self.shut()
        {
            B::close(connection).await;
            drop(slot);
        }
        // Connections still lent out close when their requests end, and those whose
        // request was abandoned once their statement is cancelled: wait for them (a
        // shutdown must not leave statements running on the servers), within a bound.
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        loop {
            let returned = self.inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if self.inner.open.load(Ordering::Acquire) == 0
                || tokio::time::timeout_at(deadline, returned).await.is_err()
            {
                return;
            }
        }
    }

    /// From now on nobody gets a connection from this pool (the first, synchronous part of
    /// `close`); idle connections are closed in the background.
    pub(crate) fn mark_closed(&self) {
        let idle = self.shut();
        if !idle.is_empty() {
            tokio::spawn(async move {
                for Idle {
                    connection, slot, ..
                } in idle
                {
                    B::close(connection).await;
                    drop(slot);
                }
            });
        }
    }

    /// Marks the pool closed and takes its idle connections out, under the idle lock so
    /// that none is handed out or put back meanwhile.
    fn shut(&self) -> Vec<Idle<B>> {
        let idle: Vec<Idle<B>> = match self.inner.idle.lock() {
            Ok(mut idle) => {
                self.inner.closed.store(true, Ordering::Release);
                idle.drain(..).collect()
            }
            Err(_) => {
                self.inner.closed.store(true, Ordering::Release);
                Vec::new()
            }
        };
        self.inner.permits.close();
        self.inner.returned.notify_waiters();
        if let Some(budget) = &self.inner.budget {
            budget.forget_closed();
        }
        idle
    }
}

impl<B: Backend> PooledConnection<B> {
    /// Close the connection instead of giving it back (its state is unknown).
    pub(crate) fn close_on_drop(&mut self) {
        self.close = true;
    }

    pub(crate) fn controls(&self) -> &B::Controls {
        &self.controls
    }

    fn take_permit(&mut self) -> Option<OwnedSemaphorePermit> {
        self.permit.take()
    }

    /// The controls, for use while the connection itself is borrowed (a transaction).
    pub(crate) fn shared_controls(&self) -> Arc<B::Controls> {
        self.controls.clone()
    }
}

impl<B: Backend> std::ops::Deref for PooledConnection<B> {
    type Target = B::Connection;
    fn deref(&self) -> &B::Connection {
        &self.connection
    }
}

impl<B: Backend> std::ops::DerefMut for PooledConnection<B> {
    fn deref_mut(&mut self) -> &mut B::Connection {
        &mut self.connection
    }
}

impl<B: Backend> Drop for PooledConnection<B> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and nothing uses `self.connection` after this.
        let mut connection = unsafe { ManuallyDrop::take(&mut self.connection) };
        let controls = self.controls.clone();
        let pool = self.pool.clone();
        let Some(slot) = self.slot.take() else {
            B::returned(&controls, false);
            return;
        };
        // The tenant's permit goes with the connection until it is closed or idle again:
        // nobody opens another connection of the tenant while this one's backend lives.
        let permit = self.take_permit();
        if self.close || pool.closed.load(Ordering::Acquire) || !B::is_open(&connection) {
            B::returned(&controls, false);
            tokio::spawn(async move {
                B::close(connection).await;
                drop(slot);
                drop(permit);
            });
            return;
        }
        B::returned(&controls, true);
        match pool.clean {
            None => give_back(&pool, connection, controls, slot, permit),
            Some(_) if B::take_clean(&mut connection) => {
                give_back(&pool, connection, controls, slot, permit);
            }
            Some(clean) => {
                // The permit goes with the task: nobody gets a connection slot before
                // this one is clean again (or closed).
                pool.cleaning.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    // A server that stopped answering must not keep the connection (and
                    // its slots) forever.
                    let cleaned =
                        tokio::time::timeout(CLEAN_TIMEOUT, clean(&mut connection, &controls))
                            .await
                            .unwrap_or(false);
                    if cleaned {
                        give_back(&pool, connection, controls, slot, permit);
                    } else {
                        B::close(connection).await;
                        drop(slot);
                        drop(permit);
                    }
                    pool.cleaning.fetch_sub(1, Ordering::AcqRel);
                    pool.returned.notify_waiters();
                });
            }
        }
    }
}

/// Puts a clean connection back among the idle ones (or closes it if the pool closed),
/// then frees the tenant's `permit` (after the close, if it is closed).
fn give_back<B: Backend>(
    pool: &Arc<Inner<B>>,
    connection: B::Connection,
    controls: Arc<B::Controls>,
    slot: Slot<B>,
    permit: Option<OwnedSemaphorePermit>,
) {
    // A tenant with no connection waits for a slot: free this one's, unless it is the
    // pool's last.
    if let Some(budget) = &pool.budget
        && budget.starving.load(Ordering::Acquire) > 0
        && pool.open.load(Ordering::Acquire) > 1
    {
        tokio::spawn(async move {
            B::close(connection).await;
            drop(slot);
            drop(permit);
        });
        return;
    }
    // Checked under the lock: `close` marks the pool closed before it drains the idle
    // list, so a connection pushed here is either drained by it or not pushed at all.
    if let Ok(mut idle) = pool.idle.lock()
        && !pool.closed.load(Ordering::Acquire)
    {
        idle.push(Idle {
            connection,
            controls,
            since: Instant::now(),
            slot,
        });
        drop(idle);
        drop(permit);
        pool.returned.notify_waiters();
        if let Some(budget) = &pool.budget {
            // A waiter on this server may evict it.
            budget.changed.notify_waiters();
        }
        return;
    }
    tokio::spawn(async move {
        B::close(connection).await;
        drop(slot);
        drop(permit);
    });
}

/// Counts a request as waiting while it lives.
pub(super) struct Waiting<'a>(pub(super) &'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the pool manager does with any tenant's pool, whatever its backend.
pub(crate) trait ManagedPool: Send + Sync {
    fn figures(&self) -> PoolFigures;
    fn max_connections(&self) -> u32;
    /// Marks the pool used now (a request is about to ask it for a connection).
    fn touch(&self);
    /// No connection open and none handed out for `idle_for`.
    fn is_unused_for(&self, idle_for: Duration) -> bool;
    /// Closes idle connections past the idle timeout.
    fn close_expired_idle(&self) -> BoxFuture<'_, ()>;
    /// From now on nobody gets a connection; idle ones close in the background.
    fn mark_closed(&self);
    /// Closes every idle connection now and every lent one when it comes back.
    fn close(&self) -> BoxFuture<'_, ()>;
}

impl<B: Backend> ManagedPool for ConnectionPool<B> {
    fn figures(&self) -> PoolFigures {
        ConnectionPool::figures(self)
    }

    fn max_connections(&self) -> u32 {
        ConnectionPool::max_connections(self)
    }

    fn touch(&self) {
        ConnectionPool::touch(self);
    }

    fn is_unused_for(&self, idle_for: Duration) -> bool {
        ConnectionPool::is_unused_for(self, idle_for)
    }

    fn close_expired_idle(&self) -> BoxFuture<'_, ()> {
        Box::pin(ConnectionPool::close_expired_idle(self))
    }

    fn mark_closed(&self) {
        ConnectionPool::mark_closed(self);
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(ConnectionPool::close(self))
    }
}
