//! Statements on a SQLite tenant database.
//!
//! Values map by storage class. A request's deadline is enforced by the connection's
//! progress handler (see `connection_pool::ConnectionControls`), and the connection's
//! authorizer refuses transaction control from tenant statements, so no request can
//! leave a transaction open for the next one. Batch alone opens and ends transactions.

use futures::TryStreamExt;
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteRow, SqliteValueRef};
use sqlx::{
    AssertSqlSafe, Column, Connection, Decode, Executor, Row, SqlSafeStr, Sqlite, Statement,
    TypeInfo, ValueRef,
};
use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::value::Kind;

use super::{Call, at_statement, null_value, parameter_count_error, push_row};
use crate::connection_pool::PooledConnection;
use crate::error::{DataPlaneError, Result, from_acquire, from_sqlx};
use crate::pools::SqliteTenantPool;

/// A pooled connection for one request. If the request is abandoned before it finishes,
/// the running statement is interrupted and the connection is closed, not reused.
struct Session {
    connection: PooledConnection<Sqlite>,
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

async fn session(pool: &SqliteTenantPool, call: &Call<'_>) -> Result<Session> {
    let connection = pool
        .acquire()
        .await
        .map_err(|error| from_acquire(error, call.tenant))?;
    connection.controls().set_deadline(call.deadline);
    Ok(Session {
        connection,
        finished: false,
    })
}

fn bind<'q>(
    mut query: Query<'q, Sqlite, SqliteArguments>,
    params: &'q [pb::Value],
) -> Query<'q, Sqlite, SqliteArguments> {
    for value in params {
        query = match &value.kind {
            Some(Kind::Int64(v)) => query.bind(*v),
            Some(Kind::Double(v)) => query.bind(*v),
            Some(Kind::Text(v)) => query.bind(v.as_str()),
            Some(Kind::Bytes(v)) => query.bind(v.as_slice()),
            Some(Kind::Bool(v)) => query.bind(*v),
            Some(Kind::Null(_)) | None => query.bind(None::<i64>),
        };
    }
    query
}

/// Parameter counts by SQL text. A statement's placeholders depend on its text alone, so
/// the count is learned once per text (one extra trip to the connection's worker
/// thread) and the statement then runs in a single trip like any sqlx query.
static PARAMETER_COUNTS: std::sync::LazyLock<dashmap::DashMap<String, usize>> =
    std::sync::LazyLock::new(dashmap::DashMap::new);
const MAX_REMEMBERED_STATEMENTS: usize = 10_000;
/// Longest SQL text remembered (at most 10,000 x 4 KiB = 40 MiB in all).
const MAX_REMEMBERED_SQL_LEN: usize = 4096;

/// Refuses a request whose parameter count does not match its statement (SQLite itself
/// would bind missing parameters as NULL).
async fn check_parameter_count(
    connection: &mut sqlx::SqliteConnection,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<()> {
    let expected = match PARAMETER_COUNTS.get(&statement.sql) {
        Some(count) => *count,
        None => {
            let prepared = prepare(connection, statement, call).await?;
            let count = match prepared.parameters() {
                Some(sqlx::Either::Left(types)) => types.len(),
                Some(sqlx::Either::Right(count)) => count,
                None => statement.params.len(),
            };
            // Long texts are not remembered, so the cache stays small whatever callers send.
            if statement.sql.len() <= MAX_REMEMBERED_SQL_LEN {
                if PARAMETER_COUNTS.len() >= MAX_REMEMBERED_STATEMENTS {
                    PARAMETER_COUNTS.clear();
                }
                PARAMETER_COUNTS.insert(statement.sql.clone(), count);
            }
            count
        }
    };
    if expected != statement.params.len() {
        return Err(parameter_count_error(expected, statement.params.len()));
    }
    Ok(())
}

async fn prepare(
    connection: &mut sqlx::SqliteConnection,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<sqlx::sqlite::SqliteStatement> {
    connection
        .prepare(AssertSqlSafe(statement.sql.clone()).into_sql_str())
        .await
        .map_err(|error| from_sqlx(error, call.tenant))
}

fn query_of(statement: &pb::Statement) -> Query<'_, Sqlite, SqliteArguments> {
    bind(
        sqlx::query(AssertSqlSafe(statement.sql.as_str())),
        &statement.params,
    )
}

/// SQLite's change counters of a connection: total changes and last inserted rowid.
async fn change_counters(
    connection: &mut sqlx::SqliteConnection,
    call: &Call<'_>,
) -> Result<(i64, i64)> {
    let mut handle = connection
        .lock_handle()
        .await
        .map_err(|error| from_sqlx(error, call.tenant))?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: the worker is locked out while `handle` lives.
    Ok(unsafe {
        (
            libsqlite3_sys::sqlite3_total_changes64(db),
            libsqlite3_sys::sqlite3_last_insert_rowid(db),
        )
    })
}

async fn execute_on(
    connection: &mut sqlx::SqliteConnection,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::ExecuteResponse> {
    check_parameter_count(connection, statement, call).await?;
    // sqlite3_changes() and last_insert_rowid() keep the values of the last statement that
    // changed something, on this connection; compare counters so that a statement that
    // changed nothing reports 0 and no insert id.
    let (changes_before, rowid_before) = change_counters(connection, call).await?;
    let result = query_of(statement)
        .execute(&mut *connection)
        .await
        .map_err(|error| from_sqlx(error, call.tenant))?;
    let (changes_after, rowid_after) = change_counters(connection, call).await?;
    Ok(pb::ExecuteResponse {
        rows_affected: if changes_after == changes_before {
            0
        } else {
            result.rows_affected()
        },
        last_insert_id: (rowid_after != rowid_before).then_some(rowid_after),
    })
}

pub async fn execute(
    pool: &SqliteTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::ExecuteResponse> {
    let mut session = session(pool, call).await?;
    let response = execute_on(&mut session.connection, statement, call).await;
    session.finished = true;
    response
}

pub async fn query(
    pool: &SqliteTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::QueryResponse> {
    let mut session = session(pool, call).await?;
    let response = query_on(&mut session.connection, statement, call).await;
    session.finished = true;
    response
}

async fn query_on(
    connection: &mut sqlx::SqliteConnection,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::QueryResponse> {
    check_parameter_count(connection, statement, call).await?;
    let mut response = pb::QueryResponse::default();
    let mut size = 0;
    {
        let mut rows = query_of(statement).fetch(&mut *connection);
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(|error| from_sqlx(error, call.tenant))?
        {
            if response.columns.is_empty() {
                response.columns = row.columns().iter().map(|c| c.name().to_owned()).collect();
            }
            push_row(&mut response, &mut size, decode_row(&row)?, call)?;
        }
    }
    if response.rows.is_empty() {
        // No row to read the column names from: ask the prepared statement.
        let prepared = prepare(connection, statement, call).await?;
        response.columns = prepared
            .columns()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
    }
    Ok(response)
}

pub async fn batch(
    pool: &SqliteTenantPool,
    statements: &[pb::Statement],
    call: &Call<'_>,
) -> Result<Vec<pb::ExecuteResponse>> {
    let mut session = session(pool, call).await?;
    let controls = session.connection.shared_controls();
    let allow = |allowed: bool| {
        controls
            .allow_transaction_control
            .store(allowed, std::sync::atomic::Ordering::Release)
    };
    // IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a
    // batch that reads before it writes cannot fail on a concurrent writer.
    allow(true);
    let begun = session.connection.begin_with("BEGIN IMMEDIATE").await;
    allow(false);
    let mut transaction = begun.map_err(|error| from_sqlx(error, call.tenant))?;
    let mut results = Vec::with_capacity(statements.len());
    let mut failure = None;
    for (position, statement) in statements.iter().enumerate() {
        match execute_on(&mut transaction, statement, call).await {
            Ok(result) => results.push(result),
            Err(error) => {
                failure = Some(at_statement(position)(error));
                break;
            }
        }
    }
    allow(true);
    let ended = match failure {
        None => transaction.commit().await,
        Some(_) => transaction.rollback().await,
    };
    allow(false);
    // A connection whose transaction could not be ended is closed, never reused.
    session.finished = ended.is_ok();
    if let Some(error) = failure {
        return Err(error);
    }
    ended.map_err(|error| from_sqlx(error, call.tenant))?;
    Ok(results)
}

fn decode_row(row: &SqliteRow) -> Result<pb::Row> {
    let mut values = Vec::with_capacity(row.len());
    for (index, column) in row.columns().iter().enumerate() {
        let raw = row.try_get_raw(index).map_err(|error| {
            DataPlaneError::Internal(format!("cannot read column {index}: {error}"))
        })?;
        values.push(decode_value(raw, column.name())?);
    }
    Ok(pb::Row { values })
}

fn decode_value(raw: SqliteValueRef<'_>, column: &str) -> Result<pb::Value> {
    if raw.is_null() {
        return Ok(null_value());
    }
    let storage_class = raw.type_info().name().to_owned();
    let failed = |error: sqlx::error::BoxDynError| {
        DataPlaneError::Internal(format!(
            "cannot decode column {column:?} ({storage_class}): {error}"
        ))
    };
    let kind = match storage_class.as_str() {
        "INTEGER" => Kind::Int64(<i64 as Decode<Sqlite>>::decode(raw).map_err(failed)?),
        "REAL" => Kind::Double(<f64 as Decode<Sqlite>>::decode(raw).map_err(failed)?),
        "BLOB" => Kind::Bytes(<Vec<u8> as Decode<Sqlite>>::decode(raw).map_err(failed)?),
        _ => Kind::Text(<String as Decode<Sqlite>>::decode(raw).map_err(failed)?),
    };
    Ok(pb::Value { kind: Some(kind) })
}
