//! A small connection pool for SQLite tenant files.
//!
//! sqlx's pool checks every connection it gets back with a ping, which for SQLite is a
//! round trip to the connection's worker thread on every request. SQLite connections are
//! in-process: nothing can break them between requests, so this pool hands them back
//! without a check. It keeps what the data plane needs of a pool: a maximum size, a
//! bounded wait for a free connection, idle connections closed after a while, hardening
//! of every new connection, and an awaitable `close()`.

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct SqlitePoolOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub idle_timeout: Duration,
}

struct Idle {
    connection: SqliteConnection,
    since: Instant,
}

struct Inner {
    connect: SqliteConnectOptions,
    options: SqlitePoolOptions,
    harden: fn(&mut SqliteConnection) -> futures::future::BoxFuture<'_, Result<(), sqlx::Error>>,
    idle: Mutex<Vec<Idle>>,
    permits: Arc<Semaphore>,
    closed: AtomicBool,
}

/// Cheap to clone; every clone is the same pool.
#[derive(Clone)]
pub struct SqlitePool {
    inner: Arc<Inner>,
}

/// A connection lent to one request. Dropping it gives the connection back, unless
/// `close_on_drop` was called (the request was abandoned half-way) or the pool is closed.
pub struct PooledSqlite {
    /// Taken out exactly once, in `drop`.
    connection: ManuallyDrop<SqliteConnection>,
    pool: Arc<Inner>,
    close: bool,
    _permit: OwnedSemaphorePermit,
}

impl SqlitePool {
    /// A pool that opens connections on first use; `harden` runs on each new connection.
    pub fn new_lazy(
        connect: SqliteConnectOptions,
        options: SqlitePoolOptions,
        harden: fn(
            &mut SqliteConnection,
        ) -> futures::future::BoxFuture<'_, Result<(), sqlx::Error>>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(options.max_connections.max(1) as usize));
        Self {
            inner: Arc::new(Inner {
                connect,
                options,
                harden,
                idle: Mutex::new(Vec::new()),
                permits,
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// A free connection: an idle one, or a new one while under the maximum. Waits at most
    /// the acquire timeout for one to come back.
    pub async fn acquire(&self) -> Result<PooledSqlite, sqlx::Error> {
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
        let connection = match reused {
            Some(connection) => connection,
            None => {
                let mut connection = SqliteConnection::connect_with(&self.inner.connect).await?;
                (self.inner.harden)(&mut connection).await?;
                connection
            }
        };
        Ok(PooledSqlite {
            connection: ManuallyDrop::new(connection),
            pool: self.inner.clone(),
            close: false,
            _permit: permit,
        })
    }

    /// The most recently used idle connection, and the idle ones past the idle timeout.
    fn take_idle(&self) -> (Option<SqliteConnection>, Vec<SqliteConnection>) {
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
        (idle.pop().map(|idle| idle.connection), expired)
    }

    /// Closes idle connections past the idle timeout (called periodically).
    pub async fn close_expired_idle(&self) {
        let expired: Vec<SqliteConnection> = match self.inner.idle.lock() {
            Ok(mut idle) => {
                let now = Instant::now();
                let idle_timeout = self.inner.options.idle_timeout;
                let (expired, kept): (Vec<Idle>, Vec<Idle>) = idle
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
        let idle: Vec<Idle> = match self.inner.idle.lock() {
            Ok(mut idle) => idle.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for Idle { connection, .. } in idle {
            let _ = connection.close().await;
        }
    }
}

impl PooledSqlite {
    /// Close the connection instead of giving it back (its state is unknown).
    pub fn close_on_drop(&mut self) {
        self.close = true;
    }
}

impl std::ops::Deref for PooledSqlite {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.connection
    }
}

impl std::ops::DerefMut for PooledSqlite {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.connection
    }
}

impl Drop for PooledSqlite {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and nothing uses `self.connection` after this.
        let connection = unsafe { ManuallyDrop::take(&mut self.connection) };
        if self.close || self.pool.closed.load(Ordering::Acquire) {
            tokio::spawn(async move {
                let _ = connection.close().await;
            });
            return;
        }
        if let Ok(mut idle) = self.pool.idle.lock() {
            idle.push(Idle {
                connection,
                since: Instant::now(),
            });
        }
        // The permit is released after this, when `_permit` drops.
    }
}
