//! Pipelined execution: several requests' statements in one write, each with its own
//! Sync, session reset and statement timeout, answered one by one as they are read.

use postgres_protocol::message::backend::DataRowBody;

use super::connection::{GroupError, PgConnection, Reading};
use super::error::{PgError, RunError};
use super::run::Bound;
use super::statements::Prepared;

impl PgConnection {
    /// Whether other requests' statements may go out with this connection's next one
    /// (`run_pipelined`): the connection is idle and in its steady state, where every
    /// request's reset goes ahead of it (or the session reset is off).
    pub(crate) fn can_pipeline(&self) -> bool {
        self.usable()
            && self.reset_behind.is_none()
            && self.status == b'I'
            && !self.drops_statements
            && (!self.session_reset || self.reset_ahead)
    }

    /// Runs several requests' statements in one write, each with its own Sync, so each
    /// runs in an implicit transaction of its own with the session reset (if on) and its
    /// statement timeout ahead of it: on the server, exactly what `run` one after the
    /// other would do, without waiting for each answer before sending the next. A failed
    /// statement skips only the rest of its own group. `on` gets the rows of the `n`th
    /// statement, then its end, as soon as they are read, so an answer never waits for
    /// the statements behind it. Only when `can_pipeline`, for statements that may run
    /// in a pipeline (not VACUUM and the like).
    pub(crate) async fn run_pipelined<E>(
        &mut self,
        runs: &[(&Prepared, Bound)],
        mut on: impl FnMut(Piped<'_, E>) -> Result<(), E>,
    ) {
        /// Ends statement `from` with `first` and every later one as lost with it.
        fn lose<E>(
            on: &mut impl FnMut(Piped<'_, E>) -> Result<(), E>,
            from: usize,
            count: usize,
            first: PgError,
        ) {
            // Those behind `from` were sent too if `first` says its outcome is unknown.
            let behind = || match &first {
                PgError::OutcomeUnknown(_) => PgError::Closed.after_sending(),
                _ => PgError::Closed,
            };
            for n in from + 1..count {
                let _ = on(Piped::Done(n, Err(RunError::Postgres(behind()))));
            }
            let _ = on(Piped::Done(from, Err(RunError::Postgres(first))));
        }
        if let Err(error) = self.start() {
            lose(&mut on, 0, runs.len(), error);
            return;
        }
        self.write.clear();
        let mut aheads = Vec::with_capacity(runs.len());
        for (n, (prepared, bound)) in runs.iter().enumerate() {
            let mut ahead = if n == 0 {
                self.queue_reset_ahead().unwrap_or(0)
            } else if self.session_reset {
                self.queue_reset()
            } else {
                0
            };
            match self.queue_timeout(bound.timeout) {
                Ok(queued) => ahead += queued,
                Err(error) => {
                    self.write.clear();
                    lose(&mut on, 0, runs.len(), error);
                    return;
                }
            }
            self.write.extend_from_slice(&bound.messages);
            self.dirty = true;
            self.note_preparing(prepared.preparing);
            aheads.push(ahead);
        }
        self.in_flight = true;
        if let Err(error) = self.flush().await {
            lose(&mut on, 0, runs.len(), error.after_sending());
            return;
        }
        let mut reset_failed = false;
        for (n, ((prepared, _), ahead)) in runs.iter().zip(aheads).enumerate() {
            if self.broken {
                // The server ended the connection with an error (a FATAL) answering an
                // earlier statement: the backend is gone, so these never ran.
                lose(&mut on, n, runs.len(), PgError::Closed);
                return;
            }
            let outcome = match self
                .read_group(ahead, true, Reading::Shared, &mut |row: &DataRowBody| {
                    on(Piped::Row(n, row))
                })
                .await
            {
                Ok(outcome) => outcome,
                Err(error) => {
                    lose(&mut on, n, runs.len(), error.after_sending());
                    return;
                }
            };
            if self.status != b'I' {
                // Cannot happen (no pipelined statement controls transactions); if it
                // did, what follows ran inside that transaction: never use the
                // connection again.
                reset_failed = true;
            }
            let result = match outcome.error {
                None => Ok(outcome.rows_affected),
                Some(GroupError::Row(error)) => Err(RunError::Row(error)),
                Some(GroupError::TooLarge { declared, limit }) => {
                    Err(RunError::Postgres(PgError::TooLarge { declared, limit }))
                }
                Some(GroupError::Ahead(error)) => {
                    reset_failed = true;
                    Err(RunError::Postgres(PgError::Reset(error)))
                }
                Some(GroupError::Statement(error)) => {
                    if error.means_stale_statement() {
                        self.forget_statement(prepared);
                    }
                    Err(RunError::Postgres(PgError::Db(error)))
                }
            };
            let _ = on(Piped::Done(n, result));
        }
        self.in_flight = false;
        if reset_failed {
            self.broken = true;
        }
    }
}

/// What `PgConnection::run_pipelined` reports about its `n`th statement.
pub(crate) enum Piped<'a, E> {
    /// One of its rows.
    Row(usize, &'a DataRowBody),
    /// It has ended (its answers are all read): the rows it affected, or its error.
    Done(usize, Result<u64, RunError<E>>),
}
