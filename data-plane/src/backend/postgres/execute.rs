//! Statements on a PostgreSQL tenant pool: a request takes a connection (or, while every
//! connection is lent out, queues itself for one that takes it along: `waiting`),
//! prepares its statement (cached per connection under its text plus its parameter type
//! signature, so the same SQL sent with other value kinds gets its own prepared
//! statement), and runs it in one write with the session reset and the request's
//! statement timeout ahead of it (`PgConnection::run`). Batch runs its statements in one
//! transaction.

use std::sync::Arc;
use std::time::Duration;

use postgres_protocol::message::backend::DataRowBody;
use postgres_types::Type;
use tenantry_proto::dataplane::v1 as pb;
use tenantry_shared::TenantId;
use tracing::Instrument;

use super::connection::{PgBackend, PgConnection};
use super::decode::{Decoder, decode_row, decoders_of};
use super::error::{PgError, RunError, from_postgres, outcome_unknown};
use super::params::{cache_key, params, type_of};
use super::pipeline::Piped;
use super::reset::PgControls;
use super::run::Bound;
use super::statements::Prepared;
use super::waiting::{Answer, StatementRequest, Taken, Wanted, enqueue, take_for};
use crate::backend::answer::{at_statement, parameter_count_error, push_row};
use crate::backend::sql_text::{
    drops_prepared_statements, max_placeholder, may_pipeline, refuse_unavailable_statement,
};
use crate::error::{DataPlaneError, Result};
use crate::pool::{Call, ConnectionPool, PooledConnection};

/// A PostgreSQL tenant's pool.
pub(crate) type PgTenantPool = ConnectionPool<PgBackend>;

/// A pooled connection for one request. If the request is abandoned (deadline, client
/// gone) before it finishes, the connection is closed instead of reused: its statement
/// may still be running and the reset behind it unanswered.
struct Session {
    connection: PooledConnection<PgBackend>,
    controls: Arc<PgControls>,
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
        .map_err(|error| error.into_error(call.tenant, from_postgres))?;
    let controls = connection.shared_controls();
    Ok(Session {
        connection,
        controls,
        finished: false,
    })
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
pub(super) fn check_params(prepared: &Prepared, statement: &pb::Statement) -> Result<()> {
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
    refuse_unavailable_statement(&statement.sql)?;
    let types: Vec<Option<Type>> = statement.params.iter().map(type_of).collect();
    // DEALLOCATE and DISCARD ALL/PLANS drop the connection's prepared statements on the
    // server (and this one with them).
    let drops_statements = drops_prepared_statements(&statement.sql);
    if drops_statements {
        connection.forget_statements();
    }
    connection
        .prepare(key, &statement.sql, &types, !drops_statements)
        .await
        .map_err(|error| from_postgres(error, call.tenant))
}

/// Most requests sent in one write.
const MAX_PIPELINE: usize = 16;

/// The task running a request's statement ended without answering it.
fn lost(tenant: &TenantId) -> DataPlaneError {
    outcome_unknown(tenant, "the task running it ended")
}

pub(super) async fn execute(
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

pub(super) async fn query(
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
/// request queues itself (`waiting`) as well as waiting for a connection: whichever
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
        let (mut queued, mut answered) = enqueue(pool.shared(), statement, call, wanted);
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
            take_for(pool.shared(), connection, MAX_PIPELINE - 1)
        }
        _ => Vec::new(),
    };
    if others.is_empty() {
        let answer = async {
            let mut prepared = prepared?;
            let mut prepared_again = false;
            loop {
                let (mut state, decoders) = match wanted {
                    Wanted::Rows { .. } => (Rows::new(&prepared), decoders_of(&prepared)?),
                    Wanted::Count => (Rows::default(), Vec::new()),
                };
                let ran = connection
                    .run(
                        &prepared,
                        params(statement),
                        call.remaining(),
                        Some(&controls),
                        |row| state.push(row, &prepared, &decoders, wanted),
                    )
                    .await;
                match ran {
                    Ok(rows_affected) => return Ok(state.answer(rows_affected, wanted)),
                    // The cached statement no longer fits the schema (`run` forgot it) and
                    // nothing ran: prepare it again and run it once more.
                    Err(RunError::Postgres(PgError::Db(error)))
                        if !prepared_again && error.means_stale_statement() =>
                    {
                        prepared_again = true;
                        if !connection.collect_reset_behind(&controls).await {
                            return Err(run_error(
                                RunError::Postgres(PgError::Closed),
                                call.tenant,
                            ));
                        }
                        prepared = prepare(connection, statement, call).await?;
                    }
                    // Reading stopped at the response limit: cancel the statement and
                    // say whether it had completed first.
                    Err(RunError::Row(error))
                        if !connection.usable() && !connection.is_broken() =>
                    {
                        let stopped = connection.finish_stopped().await;
                        return Err(with_stop_outcome(error, stopped));
                    }
                    Err(error) => return Err(run_error(error, call.tenant)),
                }
            }
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
    let (own, answered) = StatementRequest::new(statement, call, wanted);
    let mut batch = Vec::with_capacity(others.len() + 1);
    batch.extend(Taken::check(own, prepared));
    batch.extend(others);
    pool.shared().count_pipelined(batch.len());
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
            // Its deadline has passed: it is not sent.
            let _ = request
                .answer
                .send(Err(DataPlaneError::DeadlineExceeded(format!(
                    "the request's deadline passed before the statement on tenant {} was \
                     sent; it did not run",
                    request.tenant
                ))));
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

/// A refusal at the response limit, with what became of the statement.
fn with_stop_outcome(error: DataPlaneError, stopped: Option<bool>) -> DataPlaneError {
    let DataPlaneError::ResourceExhausted(message) = error else {
        return error;
    };
    DataPlaneError::ResourceExhausted(match stopped {
        Some(false) => format!("{message}. The statement was cancelled: nothing it did was kept"),
        Some(true) => format!(
            "{message}. The statement had already completed when it was stopped: what it \
             did (a write's rows) was kept; only its result was not returned"
        ),
        None => format!(
            "{message}. The statement was cancelled; whether it had completed first could \
             not be found out"
        ),
    })
}

fn run_error(error: RunError<DataPlaneError>, tenant: &TenantId) -> DataPlaneError {
    match error {
        RunError::Postgres(error) => from_postgres(error, tenant),
        RunError::Row(error) => error,
    }
}

pub(super) async fn batch(
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
    // A failed COMMIT ends the transaction too (rolled back); a COMMIT whose connection
    // broke may have committed.
    let committed = connection
        .simple("COMMIT", Some(&controls))
        .await
        .map_err(PgError::after_sending);
    connection.finish_reset(&controls).await;
    session.finished = true;
    committed.map_err(|error| from_postgres(error, call.tenant))?;
    Ok(results)
}
