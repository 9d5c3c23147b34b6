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
//! their request's deadline (see `controls`).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use libsqlite3_sys as ffi;
use rusqlite::OpenFlags;

use super::controls::SqliteControls;
use super::error::SqliteConnectError;
use crate::pool::Backend;

/// Statements a connection keeps prepared (as many as sqlx's default).
const STATEMENT_CACHE_CAPACITY: usize = 100;

/// SQLite VM instructions between deadline checks (a few microseconds' worth).
const PROGRESS_CHECK_EVERY_OPS: c_int = 1_000;

/// Where and how to open a tenant's SQLite file.
#[derive(Clone, Debug)]
pub(crate) struct SqliteConnectOptions {
    pub(crate) path: PathBuf,
    /// How long a statement waits for another connection's write lock.
    pub(crate) busy_timeout: Duration,
    /// Longest string or blob a statement may read or make (SQLITE_LIMIT_LENGTH): a
    /// larger one fails with SQLITE_TOOBIG before SQLite allocates it.
    pub(crate) max_value_bytes: usize,
}

/// The pool backend for SQLite tenant files.
pub(crate) struct SqliteBackend;

/// One open SQLite handle. Cheap to move; statements run on it through `run`.
pub(crate) struct SqliteConnection {
    shared: Arc<Shared>,
}

struct Shared {
    /// Declared first so that it closes before `controls` go: the authorizer holds a
    /// pointer to them.
    connection: Mutex<rusqlite::Connection>,
    controls: OnceLock<Arc<SqliteControls>>,
    busy_timeout: Duration,
}

/// The blocking task running a statement panicked.
#[derive(Debug)]
pub(crate) struct WorkerPanicked;

impl SqliteConnection {
    /// Runs `work` on the connection on one of tokio's blocking threads. If the caller
    /// stops waiting, the work still ends on its own (interrupted through the
    /// connection's controls), and the handle closes once both are done with it.
    pub(crate) async fn run<T, F>(&self, work: F) -> Result<T, WorkerPanicked>
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
    /// (see `backend::sqlite::execute`). Meanwhile:
    /// - the connection does not wait for locks: a database locked by a writer fails at
    ///   once with SQLITE_BUSY instead of sleeping on an async worker thread;
    /// - strings and blobs over `RUN_HERE_MAX_LENGTH` bytes (read or made) and LIKE/GLOB
    ///   patterns over `RUN_HERE_MAX_PATTERN` fail with SQLITE_TOOBIG, so that no single
    ///   function call (which the progress handler cannot stop) works on large values;
    /// - the watchdog interrupts the work if it runs past `WATCHDOG_LIMIT`, for the few
    ///   steps that run long without calling the progress handler (`count(*)` of a
    ///   large table).
    ///
    /// The caller runs the work again on a blocking thread when it fails for these.
    pub(crate) fn run_here<T>(&self, work: impl FnOnce(&rusqlite::Connection) -> T) -> T {
        let connection = self
            .shared
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // SAFETY: the handle is open, and used by this thread alone while the lock is
        // held; the watchdog forgets it (under its own lock) before the lock is released.
        let handle = unsafe { connection.handle() };
        let _ = connection.busy_timeout(Duration::ZERO);
        // SAFETY: as above.
        let (length, pattern) = unsafe {
            (
                ffi::sqlite3_limit(handle, ffi::SQLITE_LIMIT_LENGTH, RUN_HERE_MAX_LENGTH),
                ffi::sqlite3_limit(
                    handle,
                    ffi::SQLITE_LIMIT_LIKE_PATTERN_LENGTH,
                    RUN_HERE_MAX_PATTERN,
                ),
            )
        };
        let watched = WATCHDOG.watch(handle);
        let result = work(&connection);
        drop(watched);
        // SAFETY: as above.
        unsafe {
            ffi::sqlite3_limit(handle, ffi::SQLITE_LIMIT_LENGTH, length);
            ffi::sqlite3_limit(handle, ffi::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, pattern);
        }
        let _ = connection.busy_timeout(self.shared.busy_timeout);
        result
    }
}

/// Longest string or blob a statement running on an async thread may read or make.
const RUN_HERE_MAX_LENGTH: c_int = 16 * 1024;
/// Longest LIKE or GLOB pattern there.
const RUN_HERE_MAX_PATTERN: c_int = 64;
/// The watchdog interrupts work on an async thread that runs longer than this.
const WATCHDOG_LIMIT: Duration = Duration::from_millis(5);
/// How often the watchdog looks, while anything runs on an async thread.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(2);

/// Interrupts statements that run on an async thread for longer than `WATCHDOG_LIMIT`.
/// One thread for the process, started on first use; it sleeps while nothing runs there.
struct Watchdog {
    running: Mutex<Running>,
    work: std::sync::Condvar,
}

#[derive(Default)]
struct Running {
    /// Handles running on async threads (by address), and since when.
    handles: std::collections::HashMap<usize, std::time::Instant>,
    /// The watchdog waits for work (and must be woken for it).
    idle: bool,
}

static WATCHDOG: std::sync::LazyLock<&'static Watchdog> = std::sync::LazyLock::new(|| {
    let watchdog: &'static Watchdog = Box::leak(Box::new(Watchdog {
        running: Mutex::new(Running::default()),
        work: std::sync::Condvar::new(),
    }));
    let spawned = std::thread::Builder::new()
        .name("sqlite-watchdog".into())
        .spawn(move || watchdog.patrol());
    if let Err(error) = spawned {
        // Without it, statements are still bounded by the progress handler and the
        // limits above; only the rare long single step goes unchecked.
        tracing::error!(%error, "cannot start the SQLite watchdog thread");
    }
    watchdog
});

/// Watched while it lives.
struct Watched {
    watchdog: &'static Watchdog,
    handle: usize,
}

impl Watchdog {
    fn watch(&'static self, handle: *mut ffi::sqlite3) -> Watched {
        let handle = handle as usize;
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.handles.insert(handle, std::time::Instant::now());
        if running.idle {
            running.idle = false;
            self.work.notify_one();
        }
        Watched {
            watchdog: self,
            handle,
        }
    }

    fn patrol(&self) {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            while running.handles.is_empty() {
                running.idle = true;
                running = self
                    .work
                    .wait(running)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            running.idle = false;
            for (&handle, since) in running.handles.iter() {
                if since.elapsed() > WATCHDOG_LIMIT {
                    // SAFETY: a handle stays in `running` only while `run_here` holds
                    // its connection open (it is removed under this lock first), and
                    // sqlite3_interrupt may be called from any thread.
                    unsafe { ffi::sqlite3_interrupt(handle as *mut ffi::sqlite3) };
                }
            }
            drop(running);
            std::thread::sleep(WATCHDOG_PERIOD);
            running = self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.watchdog
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .handles
            .remove(&self.handle);
    }
}

impl Backend for SqliteBackend {
    type Connection = SqliteConnection;
    type Shared = ();
    type ConnectOptions = SqliteConnectOptions;
    type Controls = SqliteControls;
    type Error = SqliteConnectError;

    fn connect(
        options: &Self::ConnectOptions,
    ) -> BoxFuture<'_, Result<Self::Connection, SqliteConnectError>> {
        let options = options.clone();
        let busy_timeout = options.busy_timeout;
        Box::pin(async move {
            let connection = tokio::task::spawn_blocking(move || open(&options))
                .await
                .map_err(|_| SqliteConnectError::WorkerPanicked)??;
            Ok(SqliteConnection {
                shared: Arc::new(Shared {
                    connection: Mutex::new(connection),
                    controls: OnceLock::new(),
                    busy_timeout,
                }),
            })
        })
    }

    /// Transaction control is Batch's alone, and a request's deadline ends with it; a
    /// connection being closed keeps its deadline, so that what still runs on it stops.
    fn returned(controls: &SqliteControls, reused: bool) {
        controls
            .allow_transaction_control
            .store(false, std::sync::atomic::Ordering::Release);
        if reused {
            controls.set_deadline(None);
        }
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
    let max_length = c_int::try_from(options.max_value_bytes).unwrap_or(c_int::MAX);
    // SAFETY: the handle is open and not shared with another thread yet.
    unsafe {
        ffi::sqlite3_limit(connection.handle(), ffi::SQLITE_LIMIT_LENGTH, max_length);
    }
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    connection.execute_batch("PRAGMA foreign_keys = ON")?;
    connection.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    Ok(connection)
}

/// Runs on every new SQLite tenant connection: the progress handler interrupts statements
/// past their request's deadline, the authorizer reads the same controls.
pub(crate) fn harden_connection(
    connection: &mut SqliteConnection,
    controls: Arc<SqliteControls>,
) -> BoxFuture<'_, Result<(), SqliteConnectError>> {
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
            .map_err(|WorkerPanicked| SqliteConnectError::WorkerPanicked)
    })
}

/// # Safety
/// `db` must be an open handle not used by another thread meanwhile, and `controls`
/// must stay valid for as long as the handle can prepare statements.
unsafe fn harden_sqlite(db: *mut ffi::sqlite3, controls: *const SqliteControls) {
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
            let controls = unsafe { &*(user_data as *const SqliteControls) };
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

/// How many statements a SQL text holds, as far as running it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Statements {
    /// Only comments, blanks or semicolons.
    None,
    One,
    /// More than one. SQLite prepares the first statement of a text and leaves the rest,
    /// which would then be silently skipped.
    Several,
}

/// Counts the statements of `sql` by preparing the first and then the rest (comments,
/// blanks and semicolons prepare to nothing). An error if the first statement does not
/// prepare (call it once that has succeeded).
pub(crate) fn count_statements(
    db: &rusqlite::Connection,
    sql: &str,
) -> rusqlite::Result<Statements> {
    let Ok(length) = c_int::try_from(sql.len()) else {
        return Ok(Statements::Several);
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
        let empty = statement.is_null();
        ffi::sqlite3_finalize(statement);
        if rc != ffi::SQLITE_OK {
            return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None));
        }
        if empty {
            return Ok(Statements::None);
        }
        if tail.is_null() {
            return Ok(Statements::One);
        }
        let consumed = c_int::try_from(tail.offset_from(start)).unwrap_or(length);
        if consumed >= length {
            return Ok(Statements::One);
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
        Ok(if found {
            Statements::Several
        } else {
            Statements::One
        })
    }
}
