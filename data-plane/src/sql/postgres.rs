//! Statements on a PostgreSQL tenant database.
//!
//! Statements are prepared with the parameter types of the request's values, and the
//! text sqlx caches them under carries that type signature, so the same SQL sent with
//! other value kinds gets its own prepared statement instead of a binary-format error.

use futures::TryStreamExt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgPool, PgRow, PgTypeInfo, PgValueRef, Postgres};
use sqlx::query::Query;
use sqlx::types::chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use sqlx::{AssertSqlSafe, Column, Connection, Decode, Executor, Row, SqlSafeStr, Statement, TypeInfo, ValueRef};
use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::value::Kind;

use super::{Call, at_statement, null_value, parameter_count_error, push_row, unsupported_column};
use crate::error::{DataPlaneError, Result, from_sqlx};

/// A pooled connection for one request. If the request is abandoned (deadline, client
/// gone) before it finishes, the connection is closed instead of reused.
struct Session {
    connection: PoolConnection<Postgres>,
    finished: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.finished {
            self.connection.close_on_drop();
        }
    }
}

async fn session(pool: &PgPool, call: &Call<'_>) -> Result<Session> {
    let mut connection = pool.acquire().await.map_err(|error| from_sqlx(error, call.tenant))?;
    if let Some(remaining) = call.remaining() {
        // Reset with the rest of the session state when the connection is released.
        let millis = remaining.as_millis().max(1).to_string();
        sqlx::query("SELECT set_config('statement_timeout', $1, false)")
            .bind(millis)
            .execute(&mut *connection)
            .await
            .map_err(|error| from_sqlx(error, call.tenant))?;
    }
    Ok(Session {
        connection,
        finished: false,
    })
}

fn type_of(value: &pb::Value) -> PgTypeInfo {
    match &value.kind {
        Some(Kind::Int64(_)) => PgTypeInfo::with_name("INT8"),
        Some(Kind::Double(_)) => PgTypeInfo::with_name("FLOAT8"),
        Some(Kind::Text(_)) => PgTypeInfo::with_name("TEXT"),
        Some(Kind::Bytes(_)) => PgTypeInfo::with_name("BYTEA"),
        Some(Kind::Bool(_)) => PgTypeInfo::with_name("BOOL"),
        // Unspecified: PostgreSQL infers the type of a NULL from its context.
        Some(Kind::Null(_)) | None => PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0)),
    }
}

/// The SQL under which the statement is prepared and cached: the request's text plus
/// its parameter type signature in a trailing comment.
fn keyed_sql(statement: &pb::Statement) -> String {
    if statement.params.is_empty() {
        return statement.sql.clone();
    }
    let signature: String = statement
        .params
        .iter()
        .map(|value| match &value.kind {
            Some(Kind::Int64(_)) => 'i',
            Some(Kind::Double(_)) => 'd',
            Some(Kind::Text(_)) => 't',
            Some(Kind::Bytes(_)) => 'b',
            Some(Kind::Bool(_)) => 'o',
            Some(Kind::Null(_)) | None => 'n',
        })
        .collect();
    format!("{}\n-- tenantry params: {signature}", statement.sql)
}

fn bind<'q>(mut query: Query<'q, Postgres, PgArguments>, params: &'q [pb::Value]) -> Query<'q, Postgres, PgArguments> {
    for value in params {
        query = match &value.kind {
            Some(Kind::Int64(v)) => query.bind(*v),
            Some(Kind::Double(v)) => query.bind(*v),
            Some(Kind::Text(v)) => query.bind(v.as_str()),
            Some(Kind::Bytes(v)) => query.bind(v.as_slice()),
            Some(Kind::Bool(v)) => query.bind(*v),
            Some(Kind::Null(_)) | None => query.bind(None::<String>),
        };
    }
    query
}

async fn prepare<'c>(
    connection: &'c mut sqlx::PgConnection,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<sqlx::postgres::PgStatement> {
    let types: Vec<PgTypeInfo> = statement.params.iter().map(type_of).collect();
    let prepared = connection
        .prepare_with(AssertSqlSafe(keyed_sql(statement)).into_sql_str(), &types)
        .await
        .map_err(|error| from_sqlx(error, call.tenant))?;
    let expected = match prepared.parameters() {
        Some(sqlx::Either::Left(types)) => types.len(),
        Some(sqlx::Either::Right(count)) => count,
        None => statement.params.len(),
    };
    if expected != statement.params.len() {
        return Err(parameter_count_error(expected, statement.params.len()));
    }
    Ok(prepared)
}

async fn execute_on(
    connection: &mut sqlx::PgConnection,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::ExecuteResponse> {
    let prepared = prepare(connection, statement, call).await?;
    let result = bind(prepared.query(), &statement.params)
        .execute(&mut *connection)
        .await
        .map_err(|error| from_sqlx(error, call.tenant))?;
    Ok(pb::ExecuteResponse {
        rows_affected: result.rows_affected(),
        last_insert_id: None,
    })
}

pub async fn execute(pool: &PgPool, statement: &pb::Statement, call: &Call<'_>) -> Result<pb::ExecuteResponse> {
    let mut session = session(pool, call).await?;
    let response = execute_on(&mut session.connection, statement, call).await;
    session.finished = true;
    response
}

pub async fn query(pool: &PgPool, statement: &pb::Statement, call: &Call<'_>) -> Result<pb::QueryResponse> {
    let mut session = session(pool, call).await?;
    let connection = &mut *session.connection;
    let prepared = prepare(connection, statement, call).await?;
    let columns: Vec<String> = prepared.columns().iter().map(|c| c.name().to_owned()).collect();
    let mut response = pb::QueryResponse {
        columns,
        rows: Vec::new(),
    };
    let mut size = 0;
    {
        let mut rows = bind(prepared.query(), &statement.params).fetch(&mut *connection);
        while let Some(row) = rows.try_next().await.map_err(|error| from_sqlx(error, call.tenant))? {
            push_row(&mut response, &mut size, decode_row(&row)?, call)?;
        }
    }
    session.finished = true;
    Ok(response)
}

pub async fn batch(pool: &PgPool, statements: &[pb::Statement], call: &Call<'_>) -> Result<Vec<pb::ExecuteResponse>> {
    let mut session = session(pool, call).await?;
    let mut transaction = session
        .connection
        .begin()
        .await
        .map_err(|error| from_sqlx(error, call.tenant))?;
    let mut results = Vec::with_capacity(statements.len());
    for (position, statement) in statements.iter().enumerate() {
        let result = execute_on(&mut transaction, statement, call)
            .await
            .map_err(at_statement(position))?;
        results.push(result);
    }
    transaction.commit().await.map_err(|error| from_sqlx(error, call.tenant))?;
    session.finished = true;
    Ok(results)
}

fn decode_row(row: &PgRow) -> Result<pb::Row> {
    let mut values = Vec::with_capacity(row.len());
    for (index, column) in row.columns().iter().enumerate() {
        let raw = row
            .try_get_raw(index)
            .map_err(|error| DataPlaneError::Internal(format!("cannot read column {index}: {error}")))?;
        values.push(decode_value(raw, column.name(), column.type_info())?);
    }
    Ok(pb::Row { values })
}

fn decode_value(raw: PgValueRef<'_>, column: &str, type_info: &PgTypeInfo) -> Result<pb::Value> {
    if raw.is_null() {
        return Ok(null_value());
    }
    let type_name = type_info.name().to_ascii_uppercase();
    let failed = |error: sqlx::error::BoxDynError| {
        DataPlaneError::Internal(format!("cannot decode column {column:?} of type {type_name}: {error}"))
    };
    let kind = match type_name.as_str() {
        "BOOL" => Kind::Bool(<bool as Decode<Postgres>>::decode(raw).map_err(failed)?),
        "INT2" => Kind::Int64(i64::from(<i16 as Decode<Postgres>>::decode(raw).map_err(failed)?)),
        "INT4" => Kind::Int64(i64::from(<i32 as Decode<Postgres>>::decode(raw).map_err(failed)?)),
        "INT8" => Kind::Int64(<i64 as Decode<Postgres>>::decode(raw).map_err(failed)?),
        "OID" => Kind::Int64(i64::from(
            <sqlx::postgres::types::Oid as Decode<Postgres>>::decode(raw).map_err(failed)?.0,
        )),
        "FLOAT4" => Kind::Double(f64::from(<f32 as Decode<Postgres>>::decode(raw).map_err(failed)?)),
        "FLOAT8" => Kind::Double(<f64 as Decode<Postgres>>::decode(raw).map_err(failed)?),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CITEXT" | "UNKNOWN" => {
            Kind::Text(<String as Decode<Postgres>>::decode(raw).map_err(failed)?)
        }
        "\"CHAR\"" | "CHAR" => Kind::Text(
            (<i8 as Decode<Postgres>>::decode(raw).map_err(failed)? as u8 as char).to_string(),
        ),
        "BYTEA" => Kind::Bytes(<Vec<u8> as Decode<Postgres>>::decode(raw).map_err(failed)?),
        "NUMERIC" => Kind::Text(
            <sqlx::types::BigDecimal as Decode<Postgres>>::decode(raw)
                .map_err(failed)?
                .to_plain_string(),
        ),
        "DATE" => Kind::Text(
            <NaiveDate as Decode<Postgres>>::decode(raw)
                .map_err(failed)?
                .format("%Y-%m-%d")
                .to_string(),
        ),
        "TIME" => Kind::Text(
            <NaiveTime as Decode<Postgres>>::decode(raw)
                .map_err(failed)?
                .format("%H:%M:%S%.f")
                .to_string(),
        ),
        "TIMESTAMP" => Kind::Text(
            <NaiveDateTime as Decode<Postgres>>::decode(raw)
                .map_err(failed)?
                .format("%Y-%m-%dT%H:%M:%S%.f")
                .to_string(),
        ),
        "TIMESTAMPTZ" => Kind::Text(
            <DateTime<Utc> as Decode<Postgres>>::decode(raw)
                .map_err(failed)?
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        ),
        "INTERVAL" => {
            let interval = <sqlx::postgres::types::PgInterval as Decode<Postgres>>::decode(raw).map_err(failed)?;
            Kind::Text(iso8601_interval(&interval))
        }
        "UUID" => Kind::Text(
            <sqlx::types::Uuid as Decode<Postgres>>::decode(raw)
                .map_err(failed)?
                .hyphenated()
                .to_string(),
        ),
        "JSON" | "JSONB" => Kind::Text(
            <sqlx::types::JsonValue as Decode<Postgres>>::decode(raw)
                .map_err(failed)?
                .to_string(),
        ),
        _ => return Err(unsupported_column(column, type_info.name())),
    };
    Ok(pb::Value { kind: Some(kind) })
}

/// ISO 8601 duration: `P{months}M{days}DT{seconds}S`, e.g. `P1M2DT3.5S`.
fn iso8601_interval(interval: &sqlx::postgres::types::PgInterval) -> String {
    let micros = interval.microseconds;
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let seconds = abs / 1_000_000;
    let fraction = abs % 1_000_000;
    let seconds_text = if fraction == 0 {
        format!("{sign}{seconds}")
    } else {
        let fraction = format!("{fraction:06}");
        format!("{sign}{seconds}.{}", fraction.trim_end_matches('0'))
    };
    format!("P{}M{}DT{seconds_text}S", interval.months, interval.days)
}
