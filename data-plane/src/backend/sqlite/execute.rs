//! Statements on a SQLite tenant database.
//!
//! Values map by storage class. A request's deadline is enforced by the connection's
//! progress handler (see `controls`), and the connection's
//! authorizer refuses transaction control from tenant statements, so no request can
//! leave a transaction open for the next one. Batch alone opens and ends transactions.
//!
//! Where statements run. A read-only Query first runs on the request's own thread, for
//! at most `RUN_HERE_BUDGET`: a point select takes microseconds, less than handing it to
//! another thread and back. A statement that runs longer is interrupted there and run
//! again, from the start, on one of tokio's blocking threads, like every statement that
//! writes (`SqliteConnection::run`). A read that meets a locked database goes there too:
//! only blocking threads wait for locks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rusqlite::ErrorCode;
use rusqlite::types::{Null, ValueRef};
use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::value::Kind;

use tenantry_shared::TenantId;

use super::connection::{SqliteBackend, Statements, WorkerPanicked, count_statements};
use super::controls::SqliteControls;
use super::error::{from_connect, from_sqlite};
use crate::backend::answer::{at_statement, null_value, parameter_count_error, push_row};
use crate::error::{DataPlaneError, Result};
use crate::pool::{Call, ConnectionPool, PooledConnection};

/// A SQLite tenant's pool.
pub(crate) type SqliteTenantPool = ConnectionPool<SqliteBackend>;

/// A pooled connection for one request. If the request is abandoned before it finishes,
/// the running statement is interrupted and the connection is closed, not reused.
struct Session {
    connection: PooledConnection<SqliteBackend>,
    finished: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.finished {
            self.connection.controls().interrupt_now();
            self.connection.close_on_drop();
        }
    }
}

impl Session {
    async fn open(pool: &SqliteTenantPool, call: &Call<'_>) -> Result<Self> {
        let connection = pool
            .acquire()
            .await
            .map_err(|error| error.into_error(call.tenant, from_connect))?;
        connection.controls().set_deadline(call.deadline);
        Ok(Self {
            connection,
            finished: false,
        })
    }

    /// Runs `work` on the connection. The connection goes back to the pool if the work
    /// ran to its end (`reusable` says whether it left the connection clean).
    async fn run<T, F>(mut self, tenant: &TenantId, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> (Result<T>, bool) + Send + 'static,
    {
        match self.connection.run(work).await {
            Ok((result, reusable)) => {
                self.finished = reusable;
                result
            }
            Err(WorkerPanicked) => Err(DataPlaneError::Internal(format!(
                "a statement on tenant {tenant} failed inside the data plane; the connection was closed"
            ))),
        }
    }
}

/// Text a statement runs with, owned so that it can move to a blocking thread.
struct Owned {
    tenant: TenantId,
    max_response_bytes: usize,
}

impl Owned {
    fn of(call: &Call<'_>) -> Self {
        Self {
            tenant: call.tenant.clone(),
            max_response_bytes: call.limits.max_response_bytes,
        }
    }
}

pub(super) async fn execute(
    pool: &SqliteTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::ExecuteResponse> {
    let session = Session::open(pool, call).await?;
    let statement = statement.clone();
    let owned = Owned::of(call);
    session
        .run(call.tenant, move |db| {
            (execute_on(db, &statement, &owned.tenant), true)
        })
        .await
}

pub(super) async fn query(
    pool: &SqliteTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::QueryResponse> {
    let mut session = Session::open(pool, call).await?;
    let owned = Owned::of(call);
    if let Some(result) = session.query_here(statement, &owned) {
        session.finished = true;
        return result;
    }
    let statement = statement.clone();
    session
        .run(call.tenant, move |db| {
            (query_on(db, &statement, &owned), true)
        })
        .await
}

/// Longest a read-only statement runs on the request's own thread before it moves to a
/// blocking thread.
const RUN_HERE_BUDGET: Duration = Duration::from_micros(200);

impl Session {
    /// Runs a read-only statement on this thread within `RUN_HERE_BUDGET`. None if it
    /// writes, does not prepare, runs past the budget (or the watchdog's limit), meets a
    /// locked database or a large value (`SqliteConnection::run_here`): it then runs on a
    /// blocking thread (from the start: it changed nothing), which also reports any
    /// error.
    fn query_here(
        &self,
        statement: &pb::Statement,
        owned: &Owned,
    ) -> Option<Result<pb::QueryResponse>> {
        let controls = self.connection.controls();
        self.connection.run_here(|db| {
            let mut prepared = prepare(db, statement, &owned.tenant).ok()?;
            if !prepared.readonly() {
                return None;
            }
            controls.set_time_budget(Some(RUN_HERE_BUDGET));
            let read = read_rows(&mut prepared, owned);
            controls.set_time_budget(None);
            match read {
                Err(Stop::Sqlite(error))
                    if matches!(
                        error.sqlite_error_code(),
                        Some(
                            ErrorCode::OperationInterrupted
                                | ErrorCode::DatabaseBusy
                                | ErrorCode::DatabaseLocked
                                | ErrorCode::TooBig
                        )
                    ) && !controls.deadline_passed() =>
                {
                    None
                }
                other => Some(other.map_err(|stop| stop.into_error(&owned.tenant))),
            }
        })
    }
}

pub(super) async fn batch(
    pool: &SqliteTenantPool,
    statements: &[pb::Statement],
    call: &Call<'_>,
) -> Result<Vec<pb::ExecuteResponse>> {
    let session = Session::open(pool, call).await?;
    let controls = session.connection.shared_controls();
    let statements = statements.to_vec();
    let owned = Owned::of(call);
    session
        .run(call.tenant, move |db| {
            batch_on(db, &controls, &statements, &owned.tenant)
        })
        .await
}

/// Runs a Batch in one transaction. The flag says whether the transaction was ended
/// (committed or rolled back): a connection left inside one is closed, never reused.
fn batch_on(
    db: &rusqlite::Connection,
    controls: &SqliteControls,
    statements: &[pb::Statement],
    tenant: &TenantId,
) -> (Result<Vec<pb::ExecuteResponse>>, bool) {
    let transaction_control = |sql: &str| {
        controls
            .allow_transaction_control
            .store(true, Ordering::Release);
        let result = db.execute_batch(sql);
        controls
            .allow_transaction_control
            .store(false, Ordering::Release);
        result.map_err(|error| from_sqlite(error, tenant))
    };
    // IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a
    // batch that reads before it writes cannot fail on a concurrent writer.
    if let Err(error) = transaction_control("BEGIN IMMEDIATE") {
        return (Err(error), false);
    }
    let mut results = Vec::with_capacity(statements.len());
    let mut failure = None;
    for (position, statement) in statements.iter().enumerate() {
        match execute_on(db, statement, tenant) {
            Ok(result) => results.push(result),
            Err(error) => {
                failure = Some(at_statement(position)(error));
                break;
            }
        }
    }
    let ended = transaction_control(match failure {
        None => "COMMIT",
        Some(_) => "ROLLBACK",
    });
    let reusable = ended.is_ok();
    let result = match (failure, ended) {
        (Some(error), _) | (None, Err(error)) => Err(error),
        (None, Ok(())) => Ok(results),
    };
    (result, reusable)
}

/// SQL texts known to hold a single statement, so that the check runs once per text.
static SINGLE_STATEMENTS: std::sync::LazyLock<dashmap::DashSet<Arc<str>>> =
    std::sync::LazyLock::new(dashmap::DashSet::new);
const MAX_REMEMBERED_STATEMENTS: usize = 10_000;
/// Longest SQL text remembered (at most 10,000 x 4 KiB = 40 MiB in all).
const MAX_REMEMBERED_SQL_LEN: usize = 4096;

/// Statement texts longer than this are prepared for their one use, never kept in the
/// connection's statement cache: the cache is bounded by count (100 statements), this
/// bounds its bytes (at most 100 x 64 KiB of text), as on PostgreSQL.
const MAX_KEPT_SQL_LEN: usize = 64 * 1024;

/// A statement prepared for one request: kept in the connection's cache afterwards, or
/// (a long text) not.
enum Prepared<'c> {
    Kept(rusqlite::CachedStatement<'c>),
    Once(rusqlite::Statement<'c>),
}

impl<'c> std::ops::Deref for Prepared<'c> {
    type Target = rusqlite::Statement<'c>;
    fn deref(&self) -> &Self::Target {
        match self {
            Self::Kept(statement) => statement,
            Self::Once(statement) => statement,
        }
    }
}

impl std::ops::DerefMut for Prepared<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Self::Kept(statement) => statement,
            Self::Once(statement) => statement,
        }
    }
}

/// The statement, prepared (from the connection's cache when it ran before) and bound.
fn prepare<'c>(
    db: &'c rusqlite::Connection,
    statement: &pb::Statement,
    tenant: &TenantId,
) -> Result<Prepared<'c>> {
    let sql = statement.sql.as_str();
    let prepared = if sql.len() <= MAX_KEPT_SQL_LEN {
        db.prepare_cached(sql).map(Prepared::Kept)
    } else {
        db.prepare(sql).map(Prepared::Once)
    };
    let mut prepared = prepared.map_err(|error| from_sqlite(error, tenant))?;
    if !SINGLE_STATEMENTS.contains(sql) {
        match count_statements(db, sql).map_err(|error| from_sqlite(error, tenant))? {
            Statements::One => {}
            Statements::None => {
                return Err(DataPlaneError::InvalidArgument(
                    "the SQL holds no statement, only comments or semicolons".to_owned(),
                ));
            }
            Statements::Several => {
                return Err(DataPlaneError::InvalidArgument(
                    "the SQL holds more than one statement; Execute and Query run one \
                     statement each: send several as a Batch"
                        .to_owned(),
                ));
            }
        }
        // Long texts are not remembered, so the set stays small whatever callers send.
        if sql.len() <= MAX_REMEMBERED_SQL_LEN {
            if SINGLE_STATEMENTS.len() >= MAX_REMEMBERED_STATEMENTS {
                SINGLE_STATEMENTS.clear();
            }
            SINGLE_STATEMENTS.insert(Arc::from(sql));
        }
    }
    bind(&mut prepared, &statement.params)?;
    Ok(prepared)
}

/// Which request parameter (1-based) a statement parameter takes: `?` and `?NNN` by
/// their position, `$NNN` by its number. Named parameters are refused.
fn parameter_number(statement: &rusqlite::Statement<'_>, index: usize) -> Result<usize> {
    let Some(name) = statement.parameter_name(index) else {
        return Ok(index);
    };
    if let Some(number) = name.strip_prefix('?') {
        return Ok(number.parse().unwrap_or(index));
    }
    match name.strip_prefix('$').map(str::parse::<usize>) {
        Some(Ok(number)) if number > 0 => Ok(number),
        _ => Err(DataPlaneError::InvalidArgument(format!(
            "named parameter {name} is not supported; SQLite statements take ?, ?NNN or $NNN \
             placeholders"
        ))),
    }
}

/// Binds the request's parameters, refusing a request whose parameter count does not
/// match the statement's (SQLite itself would bind missing parameters as NULL).
fn bind(statement: &mut rusqlite::Statement<'_>, params: &[pb::Value]) -> Result<()> {
    let count = statement.parameter_count();
    let mut numbers = Vec::with_capacity(count);
    for index in 1..=count {
        numbers.push(parameter_number(statement, index)?);
    }
    let expected = numbers.iter().copied().max().unwrap_or(0);
    if expected != params.len() {
        return Err(parameter_count_error(expected, params.len()));
    }
    for (index, number) in (1..=count).zip(numbers) {
        let value = number.checked_sub(1).and_then(|at| params.get(at));
        let bound = match value.and_then(|value| value.kind.as_ref()) {
            Some(Kind::Int64(v)) => statement.raw_bind_parameter(index, v),
            Some(Kind::Double(v)) => statement.raw_bind_parameter(index, v),
            Some(Kind::Text(v)) => statement.raw_bind_parameter(index, v.as_str()),
            Some(Kind::Bytes(v)) => statement.raw_bind_parameter(index, v.as_slice()),
            Some(Kind::Bool(v)) => statement.raw_bind_parameter(index, v),
            Some(Kind::Null(_)) | None => statement.raw_bind_parameter(index, Null),
        };
        bound.map_err(|error| {
            DataPlaneError::InvalidArgument(format!("cannot bind parameter {number}: {error}"))
        })?;
    }
    Ok(())
}

fn execute_on(
    db: &rusqlite::Connection,
    statement: &pb::Statement,
    tenant: &TenantId,
) -> Result<pb::ExecuteResponse> {
    let mut prepared = prepare(db, statement, tenant)?;
    // sqlite3_changes() and last_insert_rowid() keep the values of the last statement that
    // changed something, on this connection; compare counters so that a statement that
    // changed nothing reports 0 and no insert id.
    let (changes_before, rowid_before) = (db.total_changes(), db.last_insert_rowid());
    let mut rows = prepared.raw_query();
    // Rows a statement returns (say, INSERT ... RETURNING) are read and dropped.
    while rows
        .next()
        .map_err(|error| from_sqlite(error, tenant))?
        .is_some()
    {}
    drop(rows);
    let changed = db.total_changes() != changes_before;
    let rowid_after = db.last_insert_rowid();
    Ok(pb::ExecuteResponse {
        rows_affected: if changed { db.changes() } else { 0 },
        last_insert_id: (rowid_after != rowid_before).then_some(rowid_after),
    })
}

fn query_on(
    db: &rusqlite::Connection,
    statement: &pb::Statement,
    owned: &Owned,
) -> Result<pb::QueryResponse> {
    let mut prepared = prepare(db, statement, &owned.tenant)?;
    read_rows(&mut prepared, owned).map_err(|stop| stop.into_error(&owned.tenant))
}

/// Why reading rows stopped early.
enum Stop {
    /// SQLite failed (kept as is: the caller may retry elsewhere).
    Sqlite(rusqlite::Error),
    /// The rows cannot be returned (too large, undecodable).
    Refused(DataPlaneError),
}

impl Stop {
    fn into_error(self, tenant: &TenantId) -> DataPlaneError {
        match self {
            Self::Sqlite(error) => from_sqlite(error, tenant),
            Self::Refused(error) => error,
        }
    }
}

/// Runs a prepared, bound statement and reads its rows into a response.
fn read_rows(
    prepared: &mut rusqlite::Statement<'_>,
    owned: &Owned,
) -> std::result::Result<pb::QueryResponse, Stop> {
    let mut response = pb::QueryResponse::default();
    let mut size = 0;
    let mut rows = prepared.raw_query();
    while let Some(row) = rows.next().map_err(Stop::Sqlite)? {
        // The columns as the statement has them now: SQLite prepares a cached statement
        // again at its first step after a schema change (`SELECT *` after ALTER TABLE).
        let statement: &rusqlite::Statement<'_> = row.as_ref();
        let count = statement.column_count();
        let mut values = Vec::with_capacity(count);
        for index in 0..count {
            let column = || statement.column_name(index).unwrap_or("?").to_owned();
            let value = row.get_ref(index).map_err(|error| {
                Stop::Refused(DataPlaneError::Internal(format!(
                    "cannot read column {:?}: {error}",
                    column()
                )))
            })?;
            values.push(decode_value(value, column).map_err(Stop::Refused)?);
        }
        push_row(
            &mut response,
            &mut size,
            pb::Row { values },
            owned.max_response_bytes,
        )
        .map_err(Stop::Refused)?;
    }
    drop(rows);
    // Read after stepping, for the same reason (also when no row came back).
    response.columns = prepared
        .column_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    Ok(response)
}

/// `column` names the column, for an error.
fn decode_value(value: ValueRef<'_>, column: impl FnOnce() -> String) -> Result<pb::Value> {
    let kind = match value {
        ValueRef::Null => return Ok(null_value()),
        ValueRef::Integer(v) => Kind::Int64(v),
        ValueRef::Real(v) => Kind::Double(v),
        ValueRef::Blob(v) => Kind::Bytes(v.to_vec()),
        ValueRef::Text(v) => Kind::Text(String::from_utf8(v.to_vec()).map_err(|error| {
            DataPlaneError::Internal(format!(
                "cannot decode column {:?} (TEXT): {error}",
                column()
            ))
        })?),
    };
    Ok(pb::Value { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statements the connection holds prepared (SQLite's own list: cached ones stay
    /// prepared after use).
    fn prepared_on(db: &rusqlite::Connection) -> usize {
        let mut count = 0;
        // SAFETY: the handle is open and used by this thread alone; the loop only walks
        // SQLite's list of the connection's statements.
        unsafe {
            let handle = db.handle();
            let mut statement = rusqlite::ffi::sqlite3_next_stmt(handle, std::ptr::null_mut());
            while !statement.is_null() {
                count += 1;
                statement = rusqlite::ffi::sqlite3_next_stmt(handle, statement);
            }
        }
        count
    }

    #[test]
    fn long_statements_are_not_kept_prepared() -> rusqlite::Result<()> {
        let db = rusqlite::Connection::open_in_memory()?;
        db.set_prepared_statement_cache_capacity(100);
        let tenant = TenantId::parse("acme").unwrap_or_else(|e| panic!("{e}"));
        let run = |sql: String| {
            let statement = pb::Statement {
                sql,
                params: vec![],
            };
            let prepared = prepare(&db, &statement, &tenant);
            assert!(prepared.is_ok());
        };
        run("SELECT 1".to_owned());
        assert_eq!(prepared_on(&db), 1, "a short statement is kept");
        run(format!("SELECT 2 /* {} */", "x".repeat(MAX_KEPT_SQL_LEN)));
        assert_eq!(prepared_on(&db), 1, "a long statement was kept prepared");
        Ok(())
    }
}
