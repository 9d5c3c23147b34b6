//! SQLite tenant connections: a connection is a plain SQLite handle, and its statements
//! run on tokio's blocking threads.
//!
//! sqlx's SQLite driver gives every connection a thread of its own and hands it each
//! statement over a channel. With many tenants that means a thread per tenant
//! connection, and every request wakes a different, cold thread. Here any blocking
//! thread runs any tenant's statement, so the same few threads stay busy whatever the
//! number of tenants (`cargo bench --bench platform`, README "Benchmarks").
//!
//! Each connection is hardened once, when it opens: extension loading and ATTACH are
//! switched off, an authorizer refuses what would reach outside the tenant's file or
//! leave state on the connection, and a progress handler interrupts statements past
//! their request's deadline (see `ConnectionControls`).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use libsqlite3_sys as ffi;
use rusqlite::OpenFlags;

use crate::connection_pool::{Backend, ConnectError, ConnectionControls};

/// Statements a connection keeps prepared (as many as sqlx's default).
const STATEMENT_CACHE_CAPACITY: usize = 100;

/// SQLite VM instructions between deadline checks (a few microseconds' worth).
const PROGRESS_CHECK_EVERY_OPS: c_int = 1_000;

/// Where and how to open a tenant's SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteConnectOptions {
    pub path: PathBuf,
    /// How long a statement waits for another connection's write lock.
    pub busy_timeout: Duration,
}

/// The pool backend for SQLite tenant files.
pub struct SqliteBackend;

/// One open SQLite handle. Cheap to move; statements run on it through `run`.
pub struct SqliteConnection {
    shared: Arc<Shared>,
}

struct Shared {
    /// Declared first so that it closes before `controls` go: the authorizer holds a
    /// pointer to them.
    connection: Mutex<rusqlite::Connection>,
    controls: OnceLock<Arc<ConnectionControls>>,
    busy_timeout: Duration,
}

/// The blocking task running a statement panicked.
#[derive(Debug)]
pub struct WorkerPanicked;

impl SqliteConnection {
    /// Runs `work` on the connection on one of tokio's blocking threads. If the caller
    /// stops waiting, the work still ends on its own (interrupted through the
    /// connection's controls), and the handle closes once both are done with it.
    pub async fn run<T, F>(&self, work: F) -> Result<T, WorkerPanicked>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> T + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            // A panic mid-statement poisons the lock; that connection is closed by its
            // request (never given back), so whoever finds it poisoned may go on.
            let connection = shared
                .connection
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            work(&connection)
        })
        .await
        .map_err(|_| WorkerPanicked)
    }

    /// Runs `work` on the caller's own thread, for work expected to take microseconds
    /// (see `sql::sqlite`). Meanwhile the connection does not wait for locks: a database
    /// locked by a writer fails at once with SQLITE_BUSY instead of sleeping on an async
    /// worker thread.
    pub fn run_here<T>(&self, work: impl FnOnce(&rusqlite::Connection) -> T) -> T {
        let connection = self
            .shared
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = connection.busy_timeout(Duration::ZERO);
        let result = work(&connection);
        let _ = connection.busy_timeout(self.shared.busy_timeout);
        result
    }
}

impl Backend for SqliteBackend {
    type Connection = SqliteConnection;
    type ConnectOptions = SqliteConnectOptions;

    fn connect(
        options: &Self::ConnectOptions,
    ) -> BoxFuture<'_, Result<Self::Connection, ConnectError>> {
        let options = options.clone();
        let busy_timeout = options.busy_timeout;
        Box::pin(async move {
            let connection = tokio::task::spawn_blocking(move || open(&options))
                .await
                .map_err(|_| ConnectError::WorkerPanicked)??;
            Ok(SqliteConnection {
                shared: Arc::new(Shared {
                    connection: Mutex::new(connection),
                    controls: OnceLock::new(),
                    busy_timeout,
                }),
            })
        })
    }

    fn close(connection: Self::Connection) -> BoxFuture<'static, ()> {
        // The last handle to a file in WAL mode checkpoints as it closes: disk work.
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || drop(connection)).await;
        })
    }
}

/// Opens an existing tenant file (never creates one: a missing file is an error).
fn open(options: &SqliteConnectOptions) -> rusqlite::Result<rusqlite::Connection> {
    let connection = rusqlite::Connection::open_with_flags(
        &options.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(options.busy_timeout)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    connection.execute_batch("PRAGMA foreign_keys = ON")?;
    connection.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    Ok(connection)
}

/// Runs on every new SQLite tenant connection: the progress handler interrupts statements
/// past their request's deadline, the authorizer reads the same controls.
pub fn harden_connection(
    connection: &mut SqliteConnection,
    controls: Arc<ConnectionControls>,
) -> BoxFuture<'_, Result<(), ConnectError>> {
    Box::pin(async move {
        // Kept beside the handle for as long as it is open: the authorizer's pointer.
        let controls = connection.shared.controls.get_or_init(|| controls).clone();
        connection
            .run(move |db| {
                let for_progress = controls.clone();
                db.progress_handler(
                    PROGRESS_CHECK_EVERY_OPS,
                    Some(move || !for_progress.may_continue()),
                );
                // SAFETY: the handle is open and used by this thread alone while the
                // lock is held; `controls` outlive it (see `Shared`).
                unsafe { harden_sqlite(db.handle(), Arc::as_ptr(&controls)) };
            })
            .await
            .map_err(|WorkerPanicked| ConnectError::WorkerPanicked)
    })
}

/// # Safety
/// `db` must be an open handle not used by another thread meanwhile, and `controls`
/// must stay valid for as long as the handle can prepare statements.
unsafe fn harden_sqlite(db: *mut ffi::sqlite3, controls: *const ConnectionControls) {
    // SAFETY: as the caller promises.
    unsafe {
        ffi::sqlite3_db_config(
            db,
            ffi::SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION,
            0 as c_int,
            std::ptr::null_mut::<c_int>(),
        );
        ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_ATTACHED, 0);
        ffi::sqlite3_set_authorizer(db, Some(tenant_authorizer), controls as *mut c_void);
    }
}

/// Pragmas that take an argument but only read (e.g. `PRAGMA table_info(t)`).
const READ_ONLY_PRAGMAS_WITH_ARGUMENT: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
];

/// Refuses what would let a statement reach outside the tenant's file or leave state
/// behind on the connection.
unsafe extern "C" fn tenant_authorizer(
    user_data: *mut c_void,
    action: c_int,
    arg1: *const c_char,
    arg2: *const c_char,
    _database: *const c_char,
    _trigger: *const c_char,
) -> c_int {
    match action {
        ffi::SQLITE_TRANSACTION | ffi::SQLITE_SAVEPOINT => {
            // SAFETY: `user_data` points at the connection's controls, which outlive
            // the handle (see `Shared`).
            let controls = unsafe { &*(user_data as *const ConnectionControls) };
            if controls.transaction_control_allowed() {
                ffi::SQLITE_OK
            } else {
                ffi::SQLITE_DENY
            }
        }
        ffi::SQLITE_ATTACH
        | ffi::SQLITE_DETACH
        | ffi::SQLITE_CREATE_TEMP_INDEX
        | ffi::SQLITE_CREATE_TEMP_TABLE
        | ffi::SQLITE_CREATE_TEMP_TRIGGER
        | ffi::SQLITE_CREATE_TEMP_VIEW => ffi::SQLITE_DENY,
        ffi::SQLITE_PRAGMA => {
            if arg2.is_null() {
                return ffi::SQLITE_OK;
            }
            // SAFETY: SQLite passes NUL-terminated strings valid for this call.
            let name = unsafe { CStr::from_ptr(arg1) }
                .to_string_lossy()
                .to_ascii_lowercase();
            if READ_ONLY_PRAGMAS_WITH_ARGUMENT.contains(&name.as_str()) {
                ffi::SQLITE_OK
            } else {
                ffi::SQLITE_DENY
            }
        }
        ffi::SQLITE_FUNCTION => {
            if arg2.is_null() {
                return ffi::SQLITE_OK;
            }
            // SAFETY: as above.
            let name = unsafe { CStr::from_ptr(arg2) }.to_string_lossy();
            if name.eq_ignore_ascii_case("load_extension") {
                ffi::SQLITE_DENY
            } else {
                ffi::SQLITE_OK
            }
        }
        _ => ffi::SQLITE_OK,
    }
}

/// Whether `sql` holds a statement after its first one. SQLite prepares the first
/// statement of a text and leaves the rest, which would then be silently skipped; this
/// prepares the rest too (comments, blanks and semicolons prepare to nothing). An error
/// if the first statement does not prepare (call it once that has succeeded).
pub fn has_second_statement(db: &rusqlite::Connection, sql: &str) -> rusqlite::Result<bool> {
    let Ok(length) = c_int::try_from(sql.len()) else {
        return Ok(true);
    };
    // SAFETY: `db` is an open handle used by this thread alone (the caller holds its
    // lock); `sql` outlives both calls and SQLite reads at most `length` bytes of it;
    // every statement prepared here is finalized before return.
    unsafe {
        let handle = db.handle();
        let start = sql.as_ptr() as *const c_char;
        let mut statement = std::ptr::null_mut();
        let mut tail: *const c_char = std::ptr::null();
        let rc = ffi::sqlite3_prepare_v2(handle, start, length, &mut statement, &mut tail);
        ffi::sqlite3_finalize(statement);
        if rc != ffi::SQLITE_OK {
            return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None));
        }
        if tail.is_null() {
            return Ok(false);
        }
        let consumed = c_int::try_from(tail.offset_from(start)).unwrap_or(length);
        if consumed >= length {
            return Ok(false);
        }
        let mut second = std::ptr::null_mut();
        let rc = ffi::sqlite3_prepare_v2(
            handle,
            tail,
            length - consumed,
            &mut second,
            std::ptr::null_mut(),
        );
        // Something that does not prepare is still something.
        let found = rc != ffi::SQLITE_OK || !second.is_null();
        ffi::sqlite3_finalize(second);
        Ok(found)
    }
}
