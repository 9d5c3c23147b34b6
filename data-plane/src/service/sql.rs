//! `SqlService`: Execute, Query and Batch on the caller's tenant database. It checks the
//! request (refusing bad input before anything runs), finds the tenant's pool and runs
//! the call on it within the request's deadline; the backend behind the pool does the
//! rest (`backend::postgres`, `backend::sqlite`).
//!
//! The tenant comes from the `TenantContext` the tenant layer put in the request
//! extensions, never from the message. A request's gRPC deadline bounds its statement:
//! PostgreSQL gets a `statement_timeout`, SQLite is interrupted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::sql_service_server::SqlService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::backend::sql_text::leading_words;
use crate::error::{DataPlaneError, Result};
use crate::layers::TenantContext;
use crate::pool::{Call, PoolManager, SqlLimits, TenantPool};
use crate::routing::{Router, Target};

/// Longest SQL text accepted, in bytes.
const MAX_SQL_LEN: usize = 1 << 20;
/// Most statements in one Batch.
const MAX_BATCH_STATEMENTS: usize = 1000;

pub(crate) struct SqlApi {
    pub(crate) router: Arc<Router>,
    pub(crate) pools: Arc<PoolManager>,
    pub(crate) limits: SqlLimits,
}

fn tenant_context<T>(request: &Request<T>) -> Result<TenantContext> {
    request
        .extensions()
        .get::<TenantContext>()
        .cloned()
        .ok_or_else(|| {
            DataPlaneError::Internal(
                "tenant layer missing: the request carries no tenant context".to_owned(),
            )
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

impl SqlApi {
    /// The tenant's pool, for the route the request must use now (`Router::current`).
    fn pool_of(&self, context: &TenantContext) -> Result<Arc<dyn TenantPool>> {
        let route = self.router.current(&context.tenant_id, &context.route)?;
        let target = route.target.as_ref().ok_or_else(|| {
            DataPlaneError::Internal(format!(
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
                DataPlaneError::Unavailable(format!(
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
        let call = Call::new(&context.tenant_id, deadline, &self.limits);
        let pool = self.pool_of(&context)?;
        let response = call
            .within_deadline(pool.execute(&statement, &call))
            .instrument(sql_span(&context, &statement.sql))
            .await?;
        Ok(Response::new(response))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let context = tenant_context(&request)?;
        let deadline = deadline_of(&request);
        let statement = required_statement(request.into_inner().statement)?;
        let call = Call::new(&context.tenant_id, deadline, &self.limits);
        let pool = self.pool_of(&context)?;
        let response = call
            .within_deadline(pool.query(&statement, &call))
            .instrument(sql_span(&context, &statement.sql))
            .await?;
        Ok(Response::new(response))
    }

    async fn batch(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<Response<pb::BatchResponse>, Status> {
        let context = tenant_context(&request)?;
        let deadline = deadline_of(&request);
        let statements = request.into_inner().statements;
        check_batch(&statements)?;
        let call = Call::new(&context.tenant_id, deadline, &self.limits);
        let batch_text = statements
            .iter()
            .map(|statement| statement.sql.as_str())
            .collect::<Vec<_>>()
            .join(";\n");
        let span = sql_span(&context, &batch_text);
        span.record("db.operation.name", "BATCH");
        span.record("otel.name", format!("BATCH {}", database_of(&context)));
        let pool = self.pool_of(&context)?;
        let results = call
            .within_deadline(pool.batch(&statements, &call))
            .instrument(span)
            .await?;
        Ok(Response::new(pb::BatchResponse { results }))
    }
}

fn check_batch(statements: &[pb::Statement]) -> Result<()> {
    if statements.is_empty() {
        return Err(DataPlaneError::InvalidArgument(
            "statements is empty".to_owned(),
        ));
    }
    if statements.len() > MAX_BATCH_STATEMENTS {
        return Err(DataPlaneError::InvalidArgument(format!(
            "{} statements in one batch; the limit is {MAX_BATCH_STATEMENTS}",
            statements.len()
        )));
    }
    for (position, statement) in statements.iter().enumerate() {
        check_statement(statement, Some(position))?;
    }
    Ok(())
}

/// Longest statement text a span records.
const MAX_SPAN_SQL_BYTES: usize = 2048;

/// The tenant database's name: the PostgreSQL database, or the SQLite file name.
fn database_of(context: &TenantContext) -> &str {
    context.route.target.as_ref().map_or("", Target::database)
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
