//! `SqlService`: Execute, Query and Batch on the caller's tenant database.
//!
//! The tenant comes from the `TenantContext` the tenant layer put in the request
//! extensions, never from the message. A request's gRPC deadline bounds its statement:
//! PostgreSQL gets a `statement_timeout`, SQLite is interrupted.

mod postgres;
mod sqlite;

pub use postgres::Waiting;

use crate::router::Target;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::sql_service_server::SqlService;
use tonic::{Request, Response, Status};

use crate::context::TenantContext;
use crate::error::{DataPlaneError, Result};
use crate::pools::{PoolManager, TenantPool};

/// Longest SQL text accepted, in bytes.
const MAX_SQL_LEN: usize = 1 << 20;
/// Most statements in one Batch.
const MAX_BATCH_STATEMENTS: usize = 1000;

#[derive(Clone, Debug)]
pub struct SqlLimits {
    /// Largest Query response, in encoded bytes.
    pub max_response_bytes: usize,
}

pub struct SqlApi {
    pub router: Arc<crate::router::Router>,
    pub pools: Arc<PoolManager>,
    pub limits: SqlLimits,
}

/// What a statement runs with: the tenant (for messages) and the request's deadline.
pub struct Call<'a> {
    pub tenant: &'a str,
    pub deadline: Option<Instant>,
    pub limits: &'a SqlLimits,
}

impl Call<'_> {
    fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// Runs `work` within the request's deadline (if any). A plain function, not an
    /// `async fn`, so the returned future holds `work` once rather than twice (an async
    /// fn keeps its argument beside what it awaits); `work` is about 2 KB.
    fn within_deadline<T, F>(&self, work: F) -> impl Future<Output = Result<T>> + use<'_, T, F>
    where
        F: Future<Output = Result<T>>,
    {
        use futures::FutureExt;
        use futures::future::Either;
        let started = Instant::now();
        let bounded = match self.remaining() {
            None => Either::Left(work.map(Ok)),
            Some(remaining) => Either::Right(tokio::time::timeout(remaining, work)),
        };
        bounded.map(move |outcome| {
            let result = outcome.unwrap_or_else(|_| {
                Err(DataPlaneError::DeadlineExceeded(format!(
                    "the request's deadline passed before the statement on tenant {} finished",
                    self.tenant
                )))
            });
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            match &result {
                Ok(_) => tracing::debug!(micros, "statement finished"),
                Err(error) => tracing::debug!(micros, %error, "statement failed"),
            }
            result
        })
    }
}

fn tenant_context<T>(request: &Request<T>) -> Result<TenantContext, Status> {
    request
        .extensions()
        .get::<TenantContext>()
        .cloned()
        .ok_or_else(|| {
            Status::internal("tenant layer missing: the request carries no tenant context")
        })
}

/// Parses the `grpc-timeout` metadata entry into a deadline.
fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    let raw = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

fn check_statement(statement: &pb::Statement, position: Option<usize>) -> Result<()> {
    let at = position
        .map(|i| format!("statement {i}: "))
        .unwrap_or_default();
    if statement.sql.trim().is_empty() {
        return Err(DataPlaneError::InvalidArgument(format!("{at}sql is empty")));
    }
    if statement.sql.len() > MAX_SQL_LEN {
        return Err(DataPlaneError::InvalidArgument(format!(
            "{at}sql is {} bytes long; the limit is {MAX_SQL_LEN}",
            statement.sql.len()
        )));
    }
    if statement.sql.contains('\0') {
        return Err(DataPlaneError::InvalidArgument(format!(
            "{at}sql contains a NUL byte"
        )));
    }
    Ok(())
}

fn required_statement(statement: Option<pb::Statement>) -> Result<pb::Statement> {
    let statement = statement
        .ok_or_else(|| DataPlaneError::InvalidArgument("statement is missing".to_owned()))?;
    check_statement(&statement, None)?;
    Ok(statement)
}

/// If a SQL comment (`-- ...` to the end of the line, or a nested `/* ... */`) starts at
/// byte `i`, the index just after it.
pub(crate) fn comment_end(bytes: &[u8], i: usize) -> Option<usize> {
    match (bytes.get(i), bytes.get(i + 1)) {
        (Some(b'-'), Some(b'-')) => {
            let mut end = i;
            while end < bytes.len() && bytes[end] != b'\n' {
                end += 1;
            }
            Some(end)
        }
        (Some(b'/'), Some(b'*')) => {
            let mut depth = 1;
            let mut end = i + 2;
            while end < bytes.len() && depth > 0 {
                if bytes[end] == b'/' && bytes.get(end + 1) == Some(&b'*') {
                    depth += 1;
                    end += 2;
                } else if bytes[end] == b'*' && bytes.get(end + 1) == Some(&b'/') {
                    depth -= 1;
                    end += 2;
                } else {
                    end += 1;
                }
            }
            Some(end)
        }
        _ => None,
    }
}

/// Leading words of a statement, skipping whitespace and comments (upper-cased).
fn leading_words(sql: &str, count: usize) -> Vec<String> {
    let bytes = sql.as_bytes();
    let mut words = Vec::new();
    let mut i = 0;
    while i < bytes.len() && words.len() < count {
        match bytes[i] {
            b'-' | b'/' if comment_end(bytes, i).is_some() => {
                i = comment_end(bytes, i).unwrap_or(bytes.len());
            }
            byte if byte.is_ascii_alphabetic() => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                words.push(sql[start..i].to_ascii_uppercase());
            }
            byte if byte.is_ascii_whitespace() => i += 1,
            _ => break,
        }
    }
    words
}

/// Refuses transaction control in a tenant statement: every call is its own session,
/// and Batch is the one way to run statements in a transaction. (On PostgreSQL such a
/// statement is always a top-level command, so its first words tell.)
pub fn refuse_transaction_control(sql: &str) -> Result<()> {
    let words = leading_words(sql, 2);
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    let controls_transaction = matches!(
        first,
        "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE"
    ) || (first == "PREPARE" && second == "TRANSACTION");
    if controls_transaction {
        return Err(DataPlaneError::InvalidArgument(format!(
            "{first} is refused: each call runs on its own; use Batch to run several \
             statements in one transaction"
        )));
    }
    Ok(())
}

/// The refusal for a wrong number of parameters.
pub fn parameter_count_error(expected: usize, given: usize) -> DataPlaneError {
    DataPlaneError::InvalidArgument(format!(
        "the statement takes {expected} parameter(s) but the request gave {given}"
    ))
}

/// The refusal for a column whose type has no `Value` mapping.
pub fn unsupported_column(column: &str, type_name: &str) -> DataPlaneError {
    DataPlaneError::InvalidArgument(format!(
        "column {column:?} has type {type_name}, which Tenantry cannot return; cast it in SQL \
         (for example `{column}::text`)"
    ))
}

/// Adds a row to a response, refusing once the response would pass the limit.
pub fn push_row(
    response: &mut pb::QueryResponse,
    size: &mut usize,
    row: pb::Row,
    max_response_bytes: usize,
) -> Result<()> {
    *size += prost::Message::encoded_len(&row) + 4;
    if *size > max_response_bytes {
        return Err(DataPlaneError::ResourceExhausted(format!(
            "the result is larger than the response limit of {} bytes (stopped after {} rows); \
             add a LIMIT or fetch it in pages",
            max_response_bytes,
            response.rows.len()
        )));
    }
    response.rows.push(row);
    Ok(())
}

fn value(kind: pb::value::Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

pub fn null_value() -> pb::Value {
    value(pb::value::Kind::Null(true))
}

impl SqlApi {
    /// The tenant's pool. If the route changed since the tenant layer resolved it, the
    /// newer route decides: no request uses connection details the data plane has
    /// already replaced.
    fn pool_of(&self, context: &TenantContext) -> Result<TenantPool, Status> {
        let mut route = context.route.clone();
        if let Some(newer) = self.router.cached(&context.tenant_id)
            && newer.version > route.version
        {
            newer
                .check_serving(&context.tenant_id)
                .map_err(Status::from)?;
            route = newer;
        }
        let target = route.target.as_ref().ok_or_else(|| {
            Status::internal(format!(
                "route of tenant {} has no connection details",
                context.tenant_id
            ))
        })?;
        self.pools
            .pool(
                &context.tenant_id,
                target,
                route.version,
                route.max_connections,
            )
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "the route of tenant {} changed while this request started; retry",
                    context.tenant_id
                ))
            })
    }
}

#[tonic::async_trait]
impl SqlService for SqlApi {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let context = tenant_context(&request)?;
        let deadline = deadline_of(&request);
        let statement = required_statement(request.into_inner().statement)?;
        let call = Call {
            tenant: context.tenant_id.as_str(),
            deadline,
            limits: &self.limits,
        };
        let response = match self.pool_of(&context)? {
            TenantPool::Postgres(pool) => {
                call.within_deadline(postgres::execute(&pool, &statement, &call))
                    .instrument(sql_span(&context, &statement.sql))
                    .await
            }
            TenantPool::Sqlite(pool) => {
                call.within_deadline(sqlite::execute(&pool, &statement, &call))
                    .instrument(sql_span(&context, &statement.sql))
                    .await
            }
        }?;
        Ok(Response::new(response))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let context = tenant_context(&request)?;
        let deadline = deadline_of(&request);
        let statement = required_statement(request.into_inner().statement)?;
        let call = Call {
            tenant: context.tenant_id.as_str(),
            deadline,
            limits: &self.limits,
        };
        let response = match self.pool_of(&context)? {
            TenantPool::Postgres(pool) => {
                call.within_deadline(postgres::query(&pool, &statement, &call))
                    .instrument(sql_span(&context, &statement.sql))
                    .await
            }
            TenantPool::Sqlite(pool) => {
                call.within_deadline(sqlite::query(&pool, &statement, &call))
                    .instrument(sql_span(&context, &statement.sql))
                    .await
            }
        }?;
        Ok(Response::new(response))
    }

    async fn batch(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<Response<pb::BatchResponse>, Status> {
        let context = tenant_context(&request)?;
        let deadline = deadline_of(&request);
        let statements = request.into_inner().statements;
        if statements.is_empty() {
            return Err(Status::invalid_argument("statements is empty"));
        }
        if statements.len() > MAX_BATCH_STATEMENTS {
            return Err(Status::invalid_argument(format!(
                "{} statements in one batch; the limit is {MAX_BATCH_STATEMENTS}",
                statements.len()
            )));
        }
        for (position, statement) in statements.iter().enumerate() {
            check_statement(statement, Some(position))?;
        }
        let call = Call {
            tenant: context.tenant_id.as_str(),
            deadline,
            limits: &self.limits,
        };
        let batch_text = statements
            .iter()
            .map(|statement| statement.sql.as_str())
            .collect::<Vec<_>>()
            .join(";\n");
        let span = sql_span(&context, &batch_text);
        span.record("db.operation.name", "BATCH");
        span.record("otel.name", format!("BATCH {}", database_of(&context)));
        let results = match self.pool_of(&context)? {
            TenantPool::Postgres(pool) => {
                call.within_deadline(postgres::batch(&pool, &statements, &call))
                    .instrument(span)
                    .await
            }
            TenantPool::Sqlite(pool) => {
                call.within_deadline(sqlite::batch(&pool, &statements, &call))
                    .instrument(span)
                    .await
            }
        }?;
        Ok(Response::new(pb::BatchResponse { results }))
    }
}

/// Longest statement text a span records.
const MAX_SPAN_SQL_BYTES: usize = 2048;

/// The tenant database's name: the PostgreSQL database, or the SQLite file name.
fn database_of(context: &TenantContext) -> &str {
    match &context.route.target {
        Some(Target::Postgres { database, .. }) => database,
        Some(Target::Sqlite { path, .. }) => path.rsplit('/').next().unwrap_or(path),
        None => "",
    }
}

/// The span of one statement (or batch) on the tenant's database, named by its operation.
/// The statement text is recorded as sent (cut at 2 KiB); parameter values are never
/// recorded, so pass values as parameters, not as literals in the text.
fn sql_span(context: &TenantContext, sql: &str) -> tracing::Span {
    if !tracing::level_enabled!(tracing::Level::INFO) {
        // The span would be disabled: skip building its fields.
        return tracing::Span::none();
    }
    let system = match &context.route.target {
        Some(Target::Postgres { .. }) => "postgresql",
        Some(Target::Sqlite { .. }) => "sqlite",
        None => "",
    };
    let operation = leading_words(sql, 1)
        .into_iter()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    let mut end = sql.len().min(MAX_SPAN_SQL_BYTES);
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    let database = database_of(context);
    let name = format!("{operation} {database}");
    tracing::info_span!(
        "sql",
        otel.name = name.as_str(),
        otel.kind = "client",
        db.system.name = system,
        db.namespace = database,
        db.operation.name = operation.as_str(),
        db.query.text = &sql[..end],
        tenant.id = context.tenant_id.as_str(),
    )
}

/// Prefixes an error with the position of the batch statement that caused it.
pub fn at_statement(position: usize) -> impl FnOnce(DataPlaneError) -> DataPlaneError {
    move |error| match error {
        DataPlaneError::InvalidArgument(message) => {
            DataPlaneError::InvalidArgument(format!("statement {position}: {message}"))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_transaction_control_behind_comments() {
        for sql in [
            "BEGIN",
            "  begin;",
            "-- x\nCOMMIT",
            "/* a /* b */ */ rollback to s",
            "PREPARE TRANSACTION 'x'",
            "start transaction",
            "end",
        ] {
            assert!(refuse_transaction_control(sql).is_err(), "{sql:?}");
        }
        for sql in [
            "SELECT 'BEGIN'",
            "INSERT INTO t VALUES (1)",
            "PREPARE q AS SELECT 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "",
            "(SELECT 1)",
        ] {
            assert!(refuse_transaction_control(sql).is_ok(), "{sql:?}");
        }
    }
}
