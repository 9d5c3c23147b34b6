//! Statements on a PostgreSQL tenant database.
//!
//! Statements are prepared with the parameter types of the request's values, and the
//! text sqlx caches them under carries that type signature, so the same SQL sent with
//! other value kinds gets its own prepared statement instead of a binary-format error.

use futures::TryStreamExt;
use sqlx::postgres::{PgArguments, PgRow, PgTypeInfo, PgValueRef, Postgres};
use sqlx::query::Query;
use sqlx::types::chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use sqlx::{
    AssertSqlSafe, Column, Connection, Decode, Executor, Row, SqlSafeStr, Statement, TypeInfo,
    ValueRef,
};
use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::value::Kind;

use super::{
    Call, at_statement, comment_end, null_value, parameter_count_error, push_row,
    refuse_transaction_control, unsupported_column,
};
use crate::connection_pool::PooledConnection;
use crate::error::{DataPlaneError, Result, from_acquire, from_sqlx};
use crate::pools::PgTenantPool;

/// A pooled connection for one request. If the request is abandoned (deadline, client
/// gone) before it finishes, the connection is closed instead of reused.
struct Session {
    connection: PooledConnection<Postgres>,
    finished: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.finished {
            self.connection.close_on_drop();
        }
    }
}

async fn session(pool: &PgTenantPool, call: &Call<'_>) -> Result<Session> {
    let mut connection = pool
        .acquire()
        .await
        .map_err(|error| from_acquire(error, call.tenant))?;
    if let Some(remaining) = call.remaining() {
        // Reset with the rest of the session state when the connection is released.
        // statement_timeout is an int of milliseconds.
        let millis = remaining.as_millis().clamp(1, i32::MAX as u128).to_string();
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

fn bind<'q>(
    mut query: Query<'q, Postgres, PgArguments>,
    params: &'q [pb::Value],
) -> Query<'q, Postgres, PgArguments> {
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

async fn prepare(
    connection: &mut sqlx::PgConnection,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<sqlx::postgres::PgStatement> {
    refuse_transaction_control(&statement.sql)?;
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
    // PostgreSQL accepts more declared parameter types than the text uses: count the
    // placeholders to refuse extra parameters too.
    let expected = expected.min(max_placeholder(&statement.sql));
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

pub async fn execute(
    pool: &PgTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::ExecuteResponse> {
    let mut session = session(pool, call).await?;
    let response = execute_on(&mut session.connection, statement, call).await;
    // After an error sqlx may still owe the server's ReadyForQuery, and then the session
    // reset cannot be queued: close such connections rather than reuse them.
    session.finished = response.is_ok();
    response
}

pub async fn query(
    pool: &PgTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::QueryResponse> {
    let mut session = session(pool, call).await?;
    let connection = &mut *session.connection;
    let prepared = prepare(connection, statement, call).await?;
    let columns: Vec<String> = prepared
        .columns()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let mut response = pb::QueryResponse {
        columns,
        rows: Vec::new(),
    };
    let mut size = 0;
    {
        let mut rows = bind(prepared.query(), &statement.params).fetch(&mut *connection);
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(|error| from_sqlx(error, call.tenant))?
        {
            push_row(
                &mut response,
                &mut size,
                decode_row(&row)?,
                call.limits.max_response_bytes,
            )?;
        }
    }
    session.finished = true;
    Ok(response)
}

pub async fn batch(
    pool: &PgTenantPool,
    statements: &[pb::Statement],
    call: &Call<'_>,
) -> Result<Vec<pb::ExecuteResponse>> {
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
    transaction
        .commit()
        .await
        .map_err(|error| from_sqlx(error, call.tenant))?;
    session.finished = true;
    Ok(results)
}

fn decode_row(row: &PgRow) -> Result<pb::Row> {
    let mut values = Vec::with_capacity(row.len());
    for (index, column) in row.columns().iter().enumerate() {
        let raw = row.try_get_raw(index).map_err(|error| {
            DataPlaneError::Internal(format!("cannot read column {index}: {error}"))
        })?;
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
        DataPlaneError::Internal(format!(
            "cannot decode column {column:?} of type {type_name}: {error}"
        ))
    };
    let kind = match type_name.as_str() {
        "BOOL" => Kind::Bool(<bool as Decode<Postgres>>::decode(raw).map_err(failed)?),
        "INT2" => Kind::Int64(i64::from(
            <i16 as Decode<Postgres>>::decode(raw).map_err(failed)?,
        )),
        "INT4" => Kind::Int64(i64::from(
            <i32 as Decode<Postgres>>::decode(raw).map_err(failed)?,
        )),
        "INT8" => Kind::Int64(<i64 as Decode<Postgres>>::decode(raw).map_err(failed)?),
        "OID" => Kind::Int64(i64::from(
            <sqlx::postgres::types::Oid as Decode<Postgres>>::decode(raw)
                .map_err(failed)?
                .0,
        )),
        "FLOAT4" => Kind::Double(f64::from(
            <f32 as Decode<Postgres>>::decode(raw).map_err(failed)?,
        )),
        "FLOAT8" => Kind::Double(<f64 as Decode<Postgres>>::decode(raw).map_err(failed)?),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CITEXT" | "UNKNOWN" => {
            Kind::Text(<String as Decode<Postgres>>::decode(raw).map_err(failed)?)
        }
        "\"CHAR\"" | "CHAR" => Kind::Text(
            (<i8 as Decode<Postgres>>::decode(raw).map_err(failed)? as u8 as char).to_string(),
        ),
        "BYTEA" => Kind::Bytes(<Vec<u8> as Decode<Postgres>>::decode(raw).map_err(failed)?),
        "NUMERIC" => Kind::Text(numeric_text(raw.as_bytes().map_err(failed)?).map_err(failed)?),
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
            let interval = <sqlx::postgres::types::PgInterval as Decode<Postgres>>::decode(raw)
                .map_err(failed)?;
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

/// PostgreSQL's own text for a binary `numeric` (exact, with its display scale):
/// ndigits, weight, sign, dscale, then base-10000 digits, all big-endian 16-bit.
fn numeric_text(bytes: &[u8]) -> std::result::Result<String, sqlx::error::BoxDynError> {
    let word = |i: usize| -> std::result::Result<i32, sqlx::error::BoxDynError> {
        let pair = bytes
            .get(i * 2..i * 2 + 2)
            .ok_or("numeric value is truncated")?;
        Ok(i32::from(i16::from_be_bytes([pair[0], pair[1]])))
    };
    let ndigits = usize::try_from(word(0)?).map_err(|_| "negative digit count")?;
    let weight = word(1)?;
    let sign = word(2)? as u16;
    let dscale = usize::from(word(3)? as u16);
    let digits: Vec<i32> = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<std::result::Result<_, _>>()?;
    match sign {
        0xC000 => return Ok("NaN".to_owned()),
        0xD000 => return Ok("Infinity".to_owned()),
        0xF000 => return Ok("-Infinity".to_owned()),
        _ => {}
    }
    let digit_at = |index: i32| -> i32 {
        usize::try_from(index)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for index in 0..=weight {
            if index == 0 {
                text.push_str(&digit_at(index).to_string());
            } else {
                text.push_str(&format!("{:04}", digit_at(index)));
            }
        }
    }
    if dscale > 0 {
        let mut fraction = String::new();
        let mut k = 1;
        while fraction.len() < dscale {
            fraction.push_str(&format!("{:04}", digit_at(weight + k)));
            k += 1;
        }
        fraction.truncate(dscale);
        text.push('.');
        text.push_str(&fraction);
    }
    Ok(text)
}

/// Highest `$N` placeholder in PostgreSQL SQL text, skipping string literals, quoted
/// identifiers, dollar-quoted strings and comments.
fn max_placeholder(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => {
                // E'...' strings may escape quotes with a backslash.
                let escapes = i > 0 && matches!(bytes[i - 1], b'e' | b'E');
                i += 1;
                while i < bytes.len() {
                    if escapes && bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if bytes[i] == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'-' | b'/' if comment_end(bytes, i).is_some() => {
                i = comment_end(bytes, i).unwrap_or(bytes.len());
            }
            b'$' => {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len() && bytes[end].is_ascii_digit() {
                    end += 1;
                }
                let part_of_identifier =
                    i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
                if end > start && !part_of_identifier {
                    max = max.max(sql[start..end].parse().unwrap_or(0));
                    i = end;
                    continue;
                }
                // A dollar quote: $tag$ ... $tag$ (tag may be empty).
                let mut tag_end = start;
                while tag_end < bytes.len()
                    && (bytes[tag_end].is_ascii_alphanumeric() || bytes[tag_end] == b'_')
                {
                    tag_end += 1;
                }
                if !part_of_identifier && bytes.get(tag_end) == Some(&b'$') {
                    let tag = &sql[i..=tag_end];
                    match sql[tag_end + 1..].find(tag) {
                        Some(offset) => i = tag_end + 1 + offset + tag.len(),
                        None => i = bytes.len(),
                    }
                    continue;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    max
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_placeholders_outside_literals_and_comments() {
        assert_eq!(max_placeholder("SELECT 1"), 0);
        assert_eq!(max_placeholder("SELECT $1, $2"), 2);
        assert_eq!(max_placeholder("SELECT $2 -- $9"), 2);
        assert_eq!(
            max_placeholder("SELECT '$7', \"$8\", $1 /* $9 /* $9 */ */"),
            1
        );
        assert_eq!(max_placeholder("SELECT $$ $5 $$, $tag$ $6 $tag$, $3"), 3);
        assert_eq!(max_placeholder("SELECT E'it\\'s $4', 'it''s $5', $1"), 1);
        assert_eq!(max_placeholder("SELECT a$1 FROM t WHERE x = $10"), 10);
    }

    fn numeric_bytes(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [digits.len() as i16, weight, sign as i16, dscale as i16] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        for digit in digits {
            bytes.extend_from_slice(&digit.to_be_bytes());
        }
        bytes
    }

    #[test]
    fn formats_numeric_like_postgres() -> std::result::Result<(), sqlx::error::BoxDynError> {
        // 12345678901234567890.123
        let big = numeric_bytes(4, 0, 3, &[1234, 5678, 9012, 3456, 7890, 1230]);
        assert_eq!(numeric_text(&big)?, "12345678901234567890.123");
        assert_eq!(
            numeric_text(&numeric_bytes(-1, 0x4000, 4, &[5]))?,
            "-0.0005"
        );
        assert_eq!(numeric_text(&numeric_bytes(0, 0, 2, &[0]))?, "0.00");
        assert_eq!(numeric_text(&numeric_bytes(1, 0, 0, &[1]))?, "10000");
        assert_eq!(numeric_text(&numeric_bytes(0, 0xC000, 0, &[]))?, "NaN");
        Ok(())
    }
}
