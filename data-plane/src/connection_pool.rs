//! A small connection pool for tenant databases (SQLite and PostgreSQL).
//!
//! sqlx's pool checks every connection it gets back with a ping: a round trip to the
//! server (PostgreSQL) or to the connection's worker thread (SQLite) on every request.
//! This pool instead runs the backend's own clean-up when a connection comes back (the
//! PostgreSQL session reset, which doubles as the liveness check; nothing for SQLite,
//! which is in-process) and then hands it out again. It keeps what the data plane needs
//! of a pool: a maximum size, a bounded wait for a free connection, idle connections
//! closed after a while, hardening of every new connection, and an awaitable `close()`.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use sqlx::{ConnectOptions, Connection, Database};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Per-connection switches that the connection's SQLite callbacks (authorizer, progress
/// handler) read. Set from the request's task without a trip to the worker thread.
#[derive(Default)]
pub struct ConnectionControls {
    /// Lets BEGIN/COMMIT/ROLLBACK/SAVEPOINT through the authorizer (Batch sets it around
    /// its own transaction statements; tenant statements never get it).
    pub allow_transaction_control: AtomicBool,
    /// Statements running past this instant (microseconds since `CLOCK_EPOCH`; 0 = no
    /// deadline) are interrupted.
    deadline_micros: AtomicU64,
}

static CLOCK_EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn micros_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*CLOCK_EPOCH).as_micros()).unwrap_or(u64::MAX)
}

impl ConnectionControls {
    /// Interrupt statements still running at `deadline` (None: never).
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        let micros = deadline.map_or(0, |at| micros_since_epoch(at).max(1));
        self.deadline_micros.store(micros, Ordering::Release);
    }

    /// Interrupt whatever runs now.
    pub fn interrupt_now(&self) {
        self.deadline_micros.store(1, Ordering::Release);
    }

    /// For the progress handler: may the running statement go on?
    pub fn may_continue(&self) -> bool {
        let deadline = self.deadline_micros.load(Ordering::Acquire);
        deadline == 0 || micros_since_epoch(Instant::now()) < deadline
    }

    pub fn transaction_control_allowed(&self) -> bool {
        self.allow_transaction_control.load(Ordering::Acquire)
    }
}

/// Sets up a new connection with its controls (authorizer, progress handler, limits).
pub type Harden<DB> = for<'c> fn(
    &'c mut <DB as Database>::Connection,
    Arc<ConnectionControls>,
) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>;

/// Cleans a connection that comes back from a request; false closes it instead.
pub type Clean<DB> =
    for<'c> fn(&'c mut <DB as Database>::Connection) -> futures::future::BoxFuture<'c, bool>;

pub struct PoolOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub idle_timeout: Duration,
}

struct Idle<DB: Database> {
    connection: DB::Connection,
    controls: Arc<ConnectionControls>,
    since: Instant,
}

struct Inner<DB: Database> {
    connect: <DB::Connection as Connection>::Options,
    options: PoolOptions,
    harden: Harden<DB>,
    clean: Option<Clean<DB>>,
    idle: Mutex<Vec<Idle<DB>>>,
    permits: Arc<Semaphore>,
    closed: AtomicBool,
}

/// Cheap to clone; every clone is the same pool.
pub struct ConnectionPool<DB: Database> {
    inner: Arc<Inner<DB>>,
}

impl<DB: Database> Clone for ConnectionPool<DB> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// A connection lent to one request. Dropping it gives the connection back, unless
/// `close_on_drop` was called (the request was abandoned half-way) or the pool is closed.
pub struct PooledConnection<DB: Database> {
    /// Taken out exactly once, in `drop`.
    connection: ManuallyDrop<DB::Connection>,
    controls: Arc<ConnectionControls>,
    pool: Arc<Inner<DB>>,
    close: bool,
    /// Held while the connection is lent (and while it is cleaned afterwards).
    permit: Option<OwnedSemaphorePermit>,
}

impl<DB: Database> ConnectionPool<DB> {
    /// A pool that opens connections on first use; `harden` runs on each new connection,
    /// `clean` on each one that comes back.
    pub fn new_lazy(
        connect: <DB::Connection as Connection>::Options,
        options: PoolOptions,
        harden: Harden<DB>,
        clean: Option<Clean<DB>>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(options.max_connections.max(1) as usize));
        Self {
            inner: Arc::new(Inner {
                connect,
                options,
                harden,
                clean,
                idle: Mutex::new(Vec::new()),
                permits,
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// A free connection: an idle one, or a new one while under the maximum. Waits at most
    /// the acquire timeout for one to come back.
    pub async fn acquire(&self) -> Result<PooledConnection<DB>, sqlx::Error> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(sqlx::Error::PoolClosed);
        }
        let permit = tokio::time::timeout(
            self.inner.options.acquire_timeout,
            self.inner.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
        .map_err(|_| sqlx::Error::PoolClosed)?;
        let (reused, expired) = self.take_idle();
        for stale in expired {
            tokio::spawn(async move {
                let _ = stale.close().await;
            });
        }
        let (connection, controls) = match reused {
            Some(idle) => (idle.connection, idle.controls),
            None => {
                let mut connection = self.inner.connect.connect().await?;
                let controls = Arc::new(ConnectionControls::default());
                (self.inner.harden)(&mut connection, controls.clone()).await?;
                (connection, controls)
            }
        };
        Ok(PooledConnection {
            connection: ManuallyDrop::new(connection),
            controls,
            pool: self.inner.clone(),
            close: false,
            permit: Some(permit),
        })
    }

    /// The most recently used idle connection, and the idle ones past the idle timeout.
    fn take_idle(&self) -> (Option<Idle<DB>>, Vec<DB::Connection>) {
        let Ok(mut idle) = self.inner.idle.lock() else {
            return (None, Vec::new());
        };
        let now = Instant::now();
        let idle_timeout = self.inner.options.idle_timeout;
        let mut expired = Vec::new();
        let mut index = 0;
        while index < idle.len() {
            if now.duration_since(idle[index].since) > idle_timeout {
                expired.push(idle.swap_remove(index).connection);
            } else {
                index += 1;
            }
        }
        (idle.pop(), expired)
    }

    /// Closes idle connections past the idle timeout (called periodically).
    pub async fn close_expired_idle(&self) {
        let expired: Vec<DB::Connection> = match self.inner.idle.lock() {
            Ok(mut idle) => {
                let now = Instant::now();
                let idle_timeout = self.inner.options.idle_timeout;
                let (expired, kept): (Vec<Idle<DB>>, Vec<Idle<DB>>) = idle
                    .drain(..)
                    .partition(|entry| now.duration_since(entry.since) > idle_timeout);
                *idle = kept;
                expired.into_iter().map(|entry| entry.connection).collect()
            }
            Err(_) => Vec::new(),
        };
        for connection in expired {
            let _ = connection.close().await;
        }
    }

    /// Closes every idle connection now and every lent one when it comes back.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.permits.close();
        let idle: Vec<Idle<DB>> = match self.inner.idle.lock() {
            Ok(mut idle) => idle.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for Idle { connection, .. } in idle {
            let _ = connection.close().await;
        }
    }
}

impl<DB: Database> PooledConnection<DB> {
    /// Close the connection instead of giving it back (its state is unknown).
    pub fn close_on_drop(&mut self) {
        self.close = true;
    }

    pub fn controls(&self) -> &ConnectionControls {
        &self.controls
    }

    fn take_permit(&mut self) -> Option<OwnedSemaphorePermit> {
        self.permit.take()
    }

    /// The controls, for use while the connection itself is borrowed (a transaction).
    pub fn shared_controls(&self) -> Arc<ConnectionControls> {
        self.controls.clone()
    }
}

impl<DB: Database> std::ops::Deref for PooledConnection<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.connection
    }
}

impl<DB: Database> std::ops::DerefMut for PooledConnection<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.connection
    }
}

impl<DB: Database> Drop for PooledConnection<DB> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and nothing uses `self.connection` after this.
        let mut connection = unsafe { ManuallyDrop::take(&mut self.connection) };
        let controls = self.controls.clone();
        controls
            .allow_transaction_control
            .store(false, Ordering::Release);
        let pool = self.pool.clone();
        if self.close || pool.closed.load(Ordering::Acquire) {
            tokio::spawn(async move {
                let _ = connection.close().await;
            });
            return;
        }
        controls.set_deadline(None);
        match pool.clean {
            None => give_back(&pool, connection, controls),
            Some(clean) => {
                // The permit goes with the task: nobody gets a connection slot before
                // this one is clean again (or closed).
                let permit = self.take_permit();
                tokio::spawn(async move {
                    if clean(&mut connection).await {
                        give_back(&pool, connection, controls);
                    } else {
                        let _ = connection.close().await;
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Puts a clean connection back among the idle ones (or closes it if the pool closed).
fn give_back<DB: Database>(
    pool: &Arc<Inner<DB>>,
    connection: DB::Connection,
    controls: Arc<ConnectionControls>,
) {
    if let Ok(mut idle) = pool.idle.lock()
        && !pool.closed.load(Ordering::Acquire)
    {
        idle.push(Idle {
            connection,
            controls,
            since: Instant::now(),
        });
        return;
    }
    tokio::spawn(async move {
        let _ = connection.close().await;
    });
}
