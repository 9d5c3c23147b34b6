//! Statements on a PostgreSQL tenant database.
//!
//! Statements are prepared with the parameter types of the request's values and cached
//! per connection under their text plus that type signature, so the same SQL sent with
//! other value kinds gets its own prepared statement instead of a binary-format error.
//! The statement goes out in one write with the session reset and the request's
//! statement timeout ahead of it (`PgConnection::run`). While all of a tenant's
//! connections are lent out, requests waiting for one are sent together by the next
//! request that gets one (`Waiting`, `PgConnection::run_pipelined`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres_protocol::message::backend::DataRowBody;
use postgres_types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::value::Kind;
use tokio::sync::oneshot;
use tracing::Instrument;

use super::{
    Call, at_statement, comment_end, leading_words, null_value, parameter_count_error, push_row,
    refuse_transaction_control, unsupported_column,
};
use crate::connection_pool::{ConnectionControls, PooledConnection};
use crate::error::{DataPlaneError, Result, from_acquire, from_postgres};
use crate::pools::PgTenantPool;
use crate::postgres_connection::{
    Bound, Column, PgBackend, PgConnection, Piped, Prepared, RunError,
};

/// A pooled connection for one request. If the request is abandoned (deadline, client
/// gone) before it finishes, the connection is closed instead of reused: its statement
/// may still be running and the reset behind it unanswered.
struct Session {
    connection: PooledConnection<PgBackend>,
    controls: Arc<ConnectionControls>,
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
    let connection = pool
        .acquire()
        .await
        .map_err(|error| from_acquire(error, call.tenant))?;
    let controls = connection.shared_controls();
    Ok(Session {
        connection,
        controls,
        finished: false,
    })
}

/// The type a parameter is prepared with; None lets PostgreSQL infer the type of a NULL
/// from its context.
fn type_of(value: &pb::Value) -> Option<Type> {
    match &value.kind {
        Some(Kind::Int64(_)) => Some(Type::INT8),
        Some(Kind::Double(_)) => Some(Type::FLOAT8),
        Some(Kind::Text(_)) => Some(Type::TEXT),
        Some(Kind::Bytes(_)) => Some(Type::BYTEA),
        Some(Kind::Bool(_)) => Some(Type::BOOL),
        Some(Kind::Null(_)) | None => None,
    }
}

/// The key a prepared statement is cached under: the request's text plus its parameter
/// type signature.
fn cache_key(statement: &pb::Statement) -> String {
    const MARK: &str = "\n-- tenantry params: ";
    if statement.params.is_empty() {
        return statement.sql.clone();
    }
    let mut key = String::with_capacity(statement.sql.len() + MARK.len() + statement.params.len());
    key.push_str(&statement.sql);
    key.push_str(MARK);
    key.extend(statement.params.iter().map(|value| match &value.kind {
        Some(Kind::Int64(_)) => 'i',
        Some(Kind::Double(_)) => 'd',
        Some(Kind::Text(_)) => 't',
        Some(Kind::Bytes(_)) => 'b',
        Some(Kind::Bool(_)) => 'o',
        Some(Kind::Null(_)) | None => 'n',
    }));
    key
}

/// A request value as a statement parameter, in the binary format of the type it was
/// prepared with (`type_of`).
#[derive(Debug)]
struct Param<'a>(&'a pb::Value);

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0.kind {
            Some(Kind::Int64(v)) => v.to_sql(ty, out),
            Some(Kind::Double(v)) => v.to_sql(ty, out),
            Some(Kind::Text(v)) => v.as_str().to_sql(ty, out),
            Some(Kind::Bytes(v)) => v.as_slice().to_sql(ty, out),
            Some(Kind::Bool(v)) => v.to_sql(ty, out),
            Some(Kind::Null(_)) | None => Ok(IsNull::Yes),
        }
    }

    /// The statement was prepared with this value's own type (or, for a NULL, any).
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn params(statement: &pb::Statement) -> impl ExactSizeIterator<Item = Param<'_>> {
    statement.params.iter().map(Param)
}

async fn prepare(
    connection: &mut PgConnection,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<Arc<Prepared>> {
    let key = cache_key(statement);
    let prepared = match connection.cached(&key) {
        // Transaction control is never prepared, nor a statement that drops others.
        Some(prepared) => prepared,
        None => prepare_new(connection, statement, &key, call).await?,
    };
    check_params(&prepared, statement)?;
    Ok(prepared)
}

/// PostgreSQL accepts more declared parameter types than the text uses: count the
/// placeholders to refuse extra parameters too.
fn check_params(prepared: &Prepared, statement: &pb::Statement) -> Result<()> {
    let expected = prepared.params().len().min(max_placeholder(&statement.sql));
    if expected != statement.params.len() {
        return Err(parameter_count_error(expected, statement.params.len()));
    }
    Ok(())
}

async fn prepare_new(
    connection: &mut PgConnection,
    statement: &pb::Statement,
    key: &str,
    call: &Call<'_>,
) -> Result<Arc<Prepared>> {
    refuse_transaction_control(&statement.sql)?;
    let types: Vec<Option<Type>> = statement.params.iter().map(type_of).collect();
    // DEALLOCATE and DISCARD ALL/PLANS drop the connection's prepared statements on the
    // server (and this one with them).
    let drops_statements = matches!(
        leading_words(&statement.sql, 1).first().map(String::as_str),
        Some("DEALLOCATE" | "DISCARD")
    );
    if drops_statements {
        connection.forget_statements();
    }
    connection
        .prepare(key, &statement.sql, &types, !drops_statements)
        .await
        .map_err(|error| from_postgres(error, call.tenant))
}

/// Statements whose requests may share a write with other requests' (`Waiting`): the
/// ones that read and write rows. Not VACUUM and the like, which cannot run in a
/// pipeline, nor anything that changes what later statements see of the session.
const PIPELINED_WORDS: [&str; 7] = [
    "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "TABLE",
];

/// Most requests sent in one write.
const MAX_PIPELINE: usize = 16;

fn may_pipeline(sql: &str) -> bool {
    leading_words(sql, 1)
        .first()
        .is_some_and(|word| PIPELINED_WORDS.contains(&word.as_str()))
}

/// What a one-statement request asks for.
#[derive(Clone, Copy)]
enum Wanted {
    /// Its rows (Query), in at most this many response bytes.
    Rows { max_response_bytes: usize },
    /// The count of rows it affected (Execute).
    Count,
}

enum Answer {
    Rows(pb::QueryResponse),
    Count(pb::ExecuteResponse),
}

/// A one-statement request to run in a write shared with others, and where its answer
/// goes.
struct Request {
    statement: pb::Statement,
    wanted: Wanted,
    deadline: Option<std::time::Instant>,
    tenant: String,
    answer: oneshot::Sender<Result<Answer>>,
}

impl Request {
    fn new(
        statement: &pb::Statement,
        call: &Call<'_>,
        wanted: Wanted,
    ) -> (Self, oneshot::Receiver<Result<Answer>>) {
        let (answer, answered) = oneshot::channel();
        let request = Self {
            statement: statement.clone(),
            wanted,
            deadline: call.deadline,
            tenant: call.tenant.to_owned(),
            answer,
        };
        (request, answered)
    }
}

/// A request waiting for a connection while all of its tenant's are lent out.
struct Job {
    id: u64,
    /// Its statement's cache key (`cache_key`).
    key: String,
    request: Request,
}

/// A request taken by a connection that has its statement prepared.
struct Taken {
    request: Request,
    prepared: Arc<Prepared>,
    decoders: Vec<Decoder>,
}

impl Taken {
    /// Checks `request` against the statement prepared for it: parameter count, and for
    /// rows a Value mapping for every column. A request that fails gets its error now.
    fn check(request: Request, prepared: Arc<Prepared>) -> Option<Self> {
        let decoders =
            check_params(&prepared, &request.statement).and_then(|()| match request.wanted {
                Wanted::Rows { .. } => decoders_of(&prepared),
                Wanted::Count => Ok(Vec::new()),
            });
        match decoders {
            Ok(decoders) => Some(Self {
                request,
                prepared,
                decoders,
            }),
            Err(error) => {
                let _ = request.answer.send(Err(error));
                None
            }
        }
    }
}

/// Requests of one tenant waiting for a connection (the pool's `Shared`). A request that
/// gets a connection takes the waiting requests whose statement that connection has
/// prepared and sends them in the same write as its own (`PgConnection::run_pipelined`).
/// Each still runs in an implicit transaction of its own with the session reset ahead of
/// it, so the server does exactly what it would one request after the other, but reads
/// and answers them in one go: less work per request for the server and the data plane.
#[derive(Default)]
pub struct Waiting {
    jobs: Mutex<VecDeque<Job>>,
    count: AtomicUsize,
    next_id: AtomicU64,
    /// Statements that went out in one write with another request's.
    pipelined: AtomicU64,
}

impl Waiting {
    /// Statements that went out in one write with another request's, since the pool
    /// opened.
    pub fn pipelined(&self) -> u64 {
        self.pipelined.load(Ordering::Relaxed)
    }

    fn has_jobs(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        // Nothing panics while holding the lock; if something did, the queue is intact.
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `statement`; its answer comes on the receiver if a connection takes it.
    fn push(
        &self,
        statement: &pb::Statement,
        call: &Call<'_>,
        wanted: Wanted,
    ) -> (Queued<'_>, oneshot::Receiver<Result<Answer>>) {
        let (request, answered) = Request::new(statement, call, wanted);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            id,
            key: cache_key(statement),
            request,
        };
        let mut jobs = self.jobs();
        jobs.push_back(job);
        self.count.store(jobs.len(), Ordering::Release);
        drop(jobs);
        (
            Queued {
                waiting: self,
                id,
                queued: true,
            },
            answered,
        )
    }

    /// Takes the job back if no connection took it.
    fn take_back(&self, id: u64) -> bool {
        let mut jobs = self.jobs();
        let Some(position) = jobs.iter().position(|job| job.id == id) else {
            return false;
        };
        jobs.remove(position);
        self.count.store(jobs.len(), Ordering::Release);
        true
    }

    /// Takes up to `room` waiting jobs whose statement `connection` has prepared, oldest
    /// first; drops those whose request is gone.
    fn take_for(&self, connection: &PgConnection, room: usize) -> Vec<Taken> {
        let mut taken = Vec::new();
        if !self.has_jobs() {
            return taken;
        }
        let mut jobs = self.jobs();
        let mut kept = VecDeque::with_capacity(jobs.len());
        while let Some(job) = jobs.pop_front() {
            if job.request.answer.is_closed() {
                continue;
            }
            if taken.len() < room
                && let Some(prepared) = connection.cached(&job.key)
            {
                taken.extend(Taken::check(job.request, prepared));
            } else {
                kept.push_back(job);
            }
        }
        *jobs = kept;
        self.count.store(jobs.len(), Ordering::Release);
        taken
    }
}

/// A job in the queue, taken back when its request ends (answered or abandoned).
struct Queued<'a> {
    waiting: &'a Waiting,
    id: u64,
    queued: bool,
}

impl Queued<'_> {
    fn take_back(&mut self) -> bool {
        self.queued = false;
        self.waiting.take_back(self.id)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.queued {
            self.waiting.take_back(self.id);
        }
    }
}

fn lost(tenant: &str) -> DataPlaneError {
    DataPlaneError::Unavailable(format!(
        "the connection running a statement of tenant {tenant} was lost before it answered; \
         the statement may or may not have run"
    ))
}

pub async fn execute(
    pool: &PgTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::ExecuteResponse> {
    match single(pool, statement, call, Wanted::Count).await? {
        Answer::Count(response) => Ok(response),
        Answer::Rows(_) => Err(DataPlaneError::Internal(
            "an Execute was answered with rows".to_owned(),
        )),
    }
}

pub async fn query(
    pool: &PgTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
) -> Result<pb::QueryResponse> {
    let wanted = Wanted::Rows {
        max_response_bytes: call.limits.max_response_bytes,
    };
    match single(pool, statement, call, wanted).await? {
        Answer::Rows(response) => Ok(response),
        Answer::Count(_) => Err(DataPlaneError::Internal(
            "a Query was answered with a count".to_owned(),
        )),
    }
}

/// Runs one statement. While every connection of the tenant's pool is lent out, the
/// request queues itself (`Waiting`) as well as waiting for a connection: whichever
/// comes first runs it.
async fn single(
    pool: &PgTenantPool,
    statement: &pb::Statement,
    call: &Call<'_>,
    wanted: Wanted,
) -> Result<Answer> {
    let queues =
        pool.is_saturated() && pool.connect_options().pipelining && may_pipeline(&statement.sql);
    let mut session = if queues {
        let (mut queued, mut answered) = pool.shared().push(statement, call, wanted);
        tokio::select! {
            biased;
            answer = &mut answered => return answer.unwrap_or_else(|_| Err(lost(call.tenant))),
            acquired = session(pool, call) => {
                if !queued.take_back() {
                    // Another request's connection took it: the answer is on its way.
                    if let Ok(mut unused) = acquired {
                        unused.finished = true;
                    }
                    return answered.await.unwrap_or_else(|_| Err(lost(call.tenant)));
                }
                acquired?
            }
        }
    } else {
        session(pool, call).await?
    };
    let controls = session.controls.clone();
    let connection = &mut *session.connection;
    let prepared = prepare(connection, statement, call).await;
    let others = match &prepared {
        Ok(prepared)
            if pool.shared().has_jobs()
                && prepared.is_kept()
                && connection.can_pipeline()
                && may_pipeline(&statement.sql) =>
        {
            pool.shared().take_for(connection, MAX_PIPELINE - 1)
        }
        _ => Vec::new(),
    };
    if others.is_empty() {
        let answer = async {
            let prepared = prepared?;
            let (mut state, decoders) = match wanted {
                Wanted::Rows { .. } => (Rows::new(&prepared), decoders_of(&prepared)?),
                Wanted::Count => (Rows::default(), Vec::new()),
            };
            let rows_affected = connection
                .run(
                    &prepared,
                    params(statement),
                    call.remaining(),
                    Some(&controls),
                    |row| state.push(row, &prepared, &decoders, wanted),
                )
                .await
                .map_err(|error| run_error(error, call.tenant))?;
            Ok(state.answer(rows_affected, wanted))
        }
        .await;
        connection.finish_reset(&controls).await;
        // Failed or not, the statement has run to its end (and an implicit transaction
        // with it): the connection goes back to be reset.
        session.finished = true;
        return answer;
    }
    // Run in a task of its own: the others' answers must not depend on this request
    // staying (its deadline, its client).
    let prepared = prepared?;
    let (own, answered) = Request::new(statement, call, wanted);
    let mut batch = Vec::with_capacity(others.len() + 1);
    batch.extend(Taken::check(own, prepared));
    batch.extend(others);
    pool.shared()
        .pipelined
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    tokio::spawn(run_batch(session, batch).in_current_span());
    answered.await.unwrap_or_else(|_| Err(lost(call.tenant)))
}

/// The rows of one statement as they come in.
#[derive(Default)]
struct Rows {
    response: pb::QueryResponse,
    size: usize,
}

impl Rows {
    fn new(prepared: &Prepared) -> Self {
        Self {
            response: pb::QueryResponse {
                columns: prepared
                    .columns()
                    .iter()
                    .map(|column| column.name().to_owned())
                    .collect(),
                rows: Vec::new(),
            },
            size: 0,
        }
    }

    fn push(
        &mut self,
        row: &DataRowBody,
        prepared: &Prepared,
        decoders: &[Decoder],
        wanted: Wanted,
    ) -> Result<()> {
        match wanted {
            Wanted::Count => Ok(()),
            Wanted::Rows { max_response_bytes } => push_row(
                &mut self.response,
                &mut self.size,
                decode_row(row, prepared.columns(), decoders)?,
                max_response_bytes,
            ),
        }
    }

    fn answer(self, rows_affected: u64, wanted: Wanted) -> Answer {
        match wanted {
            Wanted::Rows { .. } => Answer::Rows(self.response),
            Wanted::Count => Answer::Count(pb::ExecuteResponse {
                rows_affected,
                last_insert_id: None,
            }),
        }
    }
}

/// Runs `batch` on `session`'s connection in one write and answers each request as soon
/// as its answers are read.
async fn run_batch(mut session: Session, batch: Vec<Taken>) {
    let controls = session.controls.clone();
    let connection = &mut *session.connection;
    let now = std::time::Instant::now();
    let mut prepared = Vec::with_capacity(batch.len());
    let mut bounds = Vec::with_capacity(batch.len());
    let mut decoders = Vec::with_capacity(batch.len());
    let mut wanted = Vec::with_capacity(batch.len());
    let mut tenants = Vec::with_capacity(batch.len());
    let mut answers = Vec::with_capacity(batch.len());
    for taken in batch {
        let Taken {
            request,
            prepared: statement,
            decoders: columns,
        } = taken;
        let timeout = request
            .deadline
            .map(|deadline| deadline.saturating_duration_since(now));
        if timeout == Some(Duration::ZERO) {
            // Its request has ended (or is about to) with DEADLINE_EXCEEDED.
            continue;
        }
        match Bound::new(&statement, params(&request.statement), timeout) {
            Ok(bound) => {
                bounds.push(bound);
                prepared.push(statement);
                decoders.push(columns);
                wanted.push(request.wanted);
                tenants.push(request.tenant);
                answers.push(Some(request.answer));
            }
            Err(error) => {
                let _ = request
                    .answer
                    .send(Err(from_postgres(error, &request.tenant)));
            }
        }
    }
    let mut rows: Vec<Rows> = prepared
        .iter()
        .zip(&wanted)
        .map(|(statement, wanted)| match wanted {
            Wanted::Rows { .. } => Rows::new(statement),
            Wanted::Count => Rows::default(),
        })
        .collect();
    let runs: Vec<(&Prepared, Bound)> = prepared
        .iter()
        .map(|statement| &**statement)
        .zip(bounds)
        .collect();
    connection
        .run_pipelined(&runs, |event| match event {
            Piped::Row(n, row) => rows[n].push(row, &prepared[n], &decoders[n], wanted[n]),
            Piped::Done(n, result) => {
                let answer = result
                    .map(|rows_affected| {
                        std::mem::take(&mut rows[n]).answer(rows_affected, wanted[n])
                    })
                    .map_err(|error| run_error(error, &tenants[n]));
                if let Some(sender) = answers[n].take() {
                    let _ = sender.send(answer);
                }
                Ok(())
            }
        })
        .await;
    tracing::debug!(statements = runs.len(), "statements sent in one write");
    drop(runs);
    connection.finish_reset(&controls).await;
    session.finished = true;
}

fn run_error(error: RunError<DataPlaneError>, tenant: &str) -> DataPlaneError {
    match error {
        RunError::Postgres(error) => from_postgres(error, tenant),
        RunError::Row(error) => error,
    }
}

/// A Value decoder for every column of `prepared`, or the error naming the first
/// column that has no Value mapping (refused before anything runs).
fn decoders_of(prepared: &Prepared) -> Result<Vec<Decoder>> {
    prepared
        .columns()
        .iter()
        .map(|column| {
            decoder_for(column.type_())
                .ok_or_else(|| unsupported_column(column.name(), column.type_().name()))
        })
        .collect()
}

pub async fn batch(
    pool: &PgTenantPool,
    statements: &[pb::Statement],
    call: &Call<'_>,
) -> Result<Vec<pb::ExecuteResponse>> {
    let mut session = session(pool, call).await?;
    let controls = session.controls.clone();
    let connection = &mut *session.connection;
    // SET LOCAL: the timeout ends with the transaction.
    let begin = match call.remaining() {
        Some(remaining) => format!(
            "BEGIN; SET LOCAL statement_timeout = {}",
            remaining.as_millis().clamp(1, i32::MAX as u128)
        ),
        None => "BEGIN".to_owned(),
    };
    connection
        .simple(&begin, None)
        .await
        .map_err(|error| from_postgres(error, call.tenant))?;
    let mut results = Vec::with_capacity(statements.len());
    for (position, statement) in statements.iter().enumerate() {
        let executed = async {
            let prepared = prepare(connection, statement, call).await?;
            connection
                .run(&prepared, params(statement), None, None, |_| Ok(()))
                .await
                .map_err(|error| run_error(error, call.tenant))
        }
        .await
        .map_err(at_statement(position));
        match executed {
            Ok(rows_affected) => results.push(pb::ExecuteResponse {
                rows_affected,
                last_insert_id: None,
            }),
            Err(error) => {
                // All or nothing. A connection that cannot roll back is closed.
                let rolled_back = connection.simple("ROLLBACK", Some(&controls)).await;
                connection.finish_reset(&controls).await;
                session.finished = rolled_back.is_ok();
                return Err(error);
            }
        }
    }
    // A failed COMMIT ends the transaction too (rolled back).
    let committed = connection.simple("COMMIT", Some(&controls)).await;
    connection.finish_reset(&controls).await;
    session.finished = true;
    committed.map_err(|error| from_postgres(error, call.tenant))?;
    Ok(results)
}

/// How a column's binary values become `Value`s.
#[derive(Clone, Copy, Debug)]
enum Decoder {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Text,
    Char,
    Bytea,
    Numeric,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    Interval,
    Uuid,
    Json,
    Jsonb,
    /// A function that returns nothing (`SELECT pg_sleep(1)`): NULL.
    Void,
}

const DECODERS: [(Type, Decoder); 24] = [
    (Type::BOOL, Decoder::Bool),
    (Type::INT2, Decoder::Int2),
    (Type::INT4, Decoder::Int4),
    (Type::INT8, Decoder::Int8),
    (Type::OID, Decoder::Oid),
    (Type::FLOAT4, Decoder::Float4),
    (Type::FLOAT8, Decoder::Float8),
    (Type::TEXT, Decoder::Text),
    (Type::VARCHAR, Decoder::Text),
    (Type::BPCHAR, Decoder::Text),
    (Type::NAME, Decoder::Text),
    (Type::UNKNOWN, Decoder::Text),
    (Type::CHAR, Decoder::Char),
    (Type::BYTEA, Decoder::Bytea),
    (Type::NUMERIC, Decoder::Numeric),
    (Type::DATE, Decoder::Date),
    (Type::TIME, Decoder::Time),
    (Type::TIMESTAMP, Decoder::Timestamp),
    (Type::TIMESTAMPTZ, Decoder::Timestamptz),
    (Type::INTERVAL, Decoder::Interval),
    (Type::UUID, Decoder::Uuid),
    (Type::JSON, Decoder::Json),
    (Type::JSONB, Decoder::Jsonb),
    (Type::VOID, Decoder::Void),
];

fn decoder_for(ty: &Type) -> Option<Decoder> {
    if let Some((_, decoder)) = DECODERS.iter().find(|(known, _)| known == ty) {
        return Some(*decoder);
    }
    // An extension type, found by name: its text is the value.
    (ty.name() == "citext").then_some(Decoder::Text)
}

fn decode_row(row: &DataRowBody, columns: &[Column], decoders: &[Decoder]) -> Result<pb::Row> {
    use fallible_iterator::FallibleIterator;
    let buffer = row.buffer();
    let mut ranges = row.ranges();
    let mut values = Vec::with_capacity(decoders.len());
    for (index, (column, decoder)) in columns.iter().zip(decoders).enumerate() {
        let range = ranges
            .next()
            .ok()
            .flatten()
            .ok_or_else(|| DataPlaneError::Internal(format!("cannot read column {index}")))?;
        let value = match range {
            None => null_value(),
            Some(range) => {
                decode_value(&buffer[range], *decoder, column.type_()).map_err(|error| {
                    DataPlaneError::Internal(format!(
                        "cannot decode column {:?} of type {}: {error}",
                        column.name(),
                        column.type_().name()
                    ))
                })?
            }
        };
        values.push(value);
    }
    Ok(pb::Row { values })
}

type DecodeResult<T> = std::result::Result<T, Box<dyn std::error::Error + Sync + Send>>;

fn decode_value(raw: &[u8], decoder: Decoder, ty: &Type) -> DecodeResult<pb::Value> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
    let kind = match decoder {
        Decoder::Bool => Kind::Bool(bool::from_sql(ty, raw)?),
        Decoder::Int2 => Kind::Int64(i64::from(i16::from_sql(ty, raw)?)),
        Decoder::Int4 => Kind::Int64(i64::from(i32::from_sql(ty, raw)?)),
        Decoder::Int8 => Kind::Int64(i64::from_sql(ty, raw)?),
        Decoder::Oid => Kind::Int64(i64::from(u32::from_sql(ty, raw)?)),
        Decoder::Float4 => Kind::Double(f64::from(f32::from_sql(ty, raw)?)),
        Decoder::Float8 => Kind::Double(f64::from_sql(ty, raw)?),
        Decoder::Text => Kind::Text(std::str::from_utf8(raw)?.to_owned()),
        Decoder::Char => Kind::Text((i8::from_sql(ty, raw)? as u8 as char).to_string()),
        Decoder::Bytea => Kind::Bytes(raw.to_vec()),
        Decoder::Numeric => Kind::Text(numeric_text(raw)?),
        Decoder::Date => Kind::Text(NaiveDate::from_sql(ty, raw)?.format("%Y-%m-%d").to_string()),
        Decoder::Time => Kind::Text(
            NaiveTime::from_sql(ty, raw)?
                .format("%H:%M:%S%.f")
                .to_string(),
        ),
        Decoder::Timestamp => Kind::Text(
            NaiveDateTime::from_sql(ty, raw)?
                .format("%Y-%m-%dT%H:%M:%S%.f")
                .to_string(),
        ),
        Decoder::Timestamptz => Kind::Text(
            DateTime::<Utc>::from_sql(ty, raw)?
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        ),
        Decoder::Interval => Kind::Text(interval_text(raw)?),
        Decoder::Uuid => Kind::Text(uuid_text(raw)?),
        Decoder::Json => Kind::Text(json_text(raw)?),
        Decoder::Jsonb => match raw.split_first() {
            Some((1, json)) => Kind::Text(json_text(json)?),
            _ => return Err("unsupported jsonb format version".into()),
        },
        Decoder::Void => return Ok(null_value()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

/// JSON in its compact form (object keys in their order).
fn json_text(raw: &[u8]) -> DecodeResult<String> {
    Ok(serde_json::from_slice::<serde_json::Value>(raw)?.to_string())
}

/// A binary `uuid` (16 bytes) as hyphenated lowercase hex.
fn uuid_text(raw: &[u8]) -> DecodeResult<String> {
    if raw.len() != 16 {
        return Err(format!("a uuid is 16 bytes, got {}", raw.len()).into());
    }
    let hex: String = raw.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// A binary `interval` (microseconds, days, months; big-endian) in ISO 8601.
fn interval_text(raw: &[u8]) -> DecodeResult<String> {
    let bytes: [u8; 16] = raw
        .try_into()
        .map_err(|_| format!("an interval is 16 bytes, got {}", raw.len()))?;
    let [
        m0,
        m1,
        m2,
        m3,
        m4,
        m5,
        m6,
        m7,
        d0,
        d1,
        d2,
        d3,
        n0,
        n1,
        n2,
        n3,
    ] = bytes;
    Ok(iso8601_interval(
        i32::from_be_bytes([n0, n1, n2, n3]),
        i32::from_be_bytes([d0, d1, d2, d3]),
        i64::from_be_bytes([m0, m1, m2, m3, m4, m5, m6, m7]),
    ))
}

/// PostgreSQL's own text for a binary `numeric` (exact, with its display scale):
/// ndigits, weight, sign, dscale, then base-10000 digits, all big-endian 16-bit.
fn numeric_text(bytes: &[u8]) -> DecodeResult<String> {
    let word = |i: usize| -> DecodeResult<i32> {
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
fn iso8601_interval(months: i32, days: i32, micros: i64) -> String {
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
    format!("P{months}M{days}DT{seconds_text}S")
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
    fn formats_numeric_like_postgres() -> DecodeResult<()> {
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
