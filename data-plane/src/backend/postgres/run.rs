//! Running one statement on a connection (`run`: the session reset and the statement
//! timeout ahead of it, the reset behind it where it must be, a statement that cannot run
//! in a pipeline sent again alone), Batch's simple queries (`simple`), and a statement
//! bound to its parameters (`Bound`).

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::backend::DataRowBody;
use postgres_protocol::message::frontend;
use postgres_types::ToSql;

use super::connection::{GroupError, PgConnection};
use super::error::{PgError, RunError, encode_error};
use super::reset::{PgControls, queue_unnamed};
use super::statements::{ONCE, Prepared};

/// SQLSTATE 25001 (active_sql_transaction): the statement cannot run in a transaction
/// block or a pipeline (VACUUM, DISCARD ALL, CREATE INDEX CONCURRENTLY, ...).
const ACTIVE_SQL_TRANSACTION: &str = "25001";

impl PgConnection {
    /// Runs a prepared statement with `params` (in the types it was prepared with),
    /// passing its rows to `on_row`, and returns the rows it affected. The session reset
    /// (if due) and the statement timeout (if any) go out ahead of it in the same write.
    /// `last`: this is the request's last statement (the reset may follow it).
    pub(crate) async fn run<T: ToSql, E>(
        &mut self,
        prepared: &Prepared,
        params: impl ExactSizeIterator<Item = T>,
        timeout: Option<Duration>,
        last: Option<&PgControls>,
        mut on_row: impl FnMut(&DataRowBody) -> Result<(), E>,
    ) -> Result<u64, RunError<E>> {
        self.start().map_err(RunError::Postgres)?;
        let bind = Bound::new(prepared, params, timeout)
            .map_err(RunError::Postgres)?
            .messages;

        self.write.clear();
        let mut ahead = self.queue_reset_ahead().map_err(RunError::Postgres)?;
        let sent_reset = ahead > 0;
        ahead += self.queue_timeout(timeout).map_err(RunError::Postgres)?;
        self.write.extend_from_slice(&bind);
        self.dirty = true;
        self.note_preparing(prepared.preparing);
        self.queue_reset_behind(last);
        if std::mem::take(&mut self.drops_statements) {
            // Prepared again (Close first) by the next reset.
            self.reset_prepared = false;
            self.cleanup_prepared = false;
        }
        let outcome = self
            .round_trip(ahead, true, &mut on_row)
            .await
            .map_err(|error| RunError::Postgres(error.after_sending()))?;
        let outcome = match outcome.error {
            // The statement cannot run behind others in one transaction (VACUUM, ...):
            // nothing ran, so send what goes ahead of it on its own, then the statement.
            Some(GroupError::Statement(error))
                if ahead > 0 && error.code == ACTIVE_SQL_TRANSACTION =>
            {
                // The reset queued behind the first attempt (if any) has run: collect it.
                if let Some(controls) = last
                    && !self.collect_reset_behind(controls).await
                {
                    self.broken = true;
                    return Err(RunError::Postgres(PgError::Closed));
                }
                self.write.clear();
                let mut ahead = if sent_reset {
                    // As the first attempt's: the tenant's statements it removed are gone.
                    self.queue_reset()
                } else {
                    0
                };
                ahead += self.queue_timeout(timeout).map_err(RunError::Postgres)?;
                frontend::sync(&mut self.write);
                let first = self
                    .round_trip(ahead, false, &mut |_: &DataRowBody| Ok::<_, E>(()))
                    .await
                    .map_err(RunError::Postgres)?;
                if let Some(GroupError::Ahead(error) | GroupError::Statement(error)) = first.error {
                    self.broken = true;
                    return Err(RunError::Postgres(PgError::Reset(error)));
                }
                self.write.clear();
                self.write.extend_from_slice(&bind);
                let alone = self
                    .round_trip(0, true, &mut on_row)
                    .await
                    .map_err(|error| RunError::Postgres(error.after_sending()))?;
                if timeout.is_some() && alone.error.is_some() {
                    // The timeout was set in a transaction of its own: end it now.
                    self.write.clear();
                    self.queue_unnamed("RESET statement_timeout")
                        .map_err(RunError::Postgres)?;
                    frontend::sync(&mut self.write);
                    let ended = self
                        .round_trip(0, false, &mut |_: &DataRowBody| Ok::<_, E>(()))
                        .await
                        .map_err(RunError::Postgres)?;
                    if ended.error.is_some() {
                        self.broken = true;
                    }
                }
                if self.session_reset && last.is_some() && !self.broken {
                    // The reset behind, as the first attempt would have sent it.
                    self.queue_reset_behind(last);
                    if self.reset_behind.is_some() {
                        self.flush().await.map_err(RunError::Postgres)?;
                    }
                }
                alone
            }
            _ => outcome,
        };
        match outcome.error {
            None => Ok(outcome.rows_affected),
            Some(GroupError::Row(error)) => Err(RunError::Row(error)),
            Some(GroupError::TooLarge { declared, limit }) => {
                Err(RunError::Postgres(PgError::TooLarge { declared, limit }))
            }
            Some(GroupError::Ahead(error)) => {
                self.broken = true;
                Err(RunError::Postgres(PgError::Reset(error)))
            }
            Some(GroupError::Statement(error)) => {
                // 26000: the statement was dropped on the server (DEALLOCATE from a
                // function): prepare it again next time.
                if error.means_stale_statement() {
                    self.forget_statement(prepared);
                }
                Err(RunError::Postgres(PgError::Db(error)))
            }
        }
    }

    /// Queues `SET statement_timeout` for the request's deadline. Returns the statements
    /// queued (0 or 1).
    pub(super) fn queue_timeout(&mut self, timeout: Option<Duration>) -> Result<usize, PgError> {
        let Some(timeout) = timeout else {
            return Ok(0);
        };
        // An int of milliseconds.
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
        self.queue_unnamed(&format!("SET statement_timeout = {millis}"))?;
        Ok(1)
    }

    /// Runs a simple query (Batch's BEGIN, COMMIT and ROLLBACK), with the session reset
    /// ahead of it if due. `last`: see `run`.
    pub(crate) async fn simple(
        &mut self,
        sql: &str,
        last: Option<&PgControls>,
    ) -> Result<(), PgError> {
        self.start()?;
        self.write.clear();
        let (text, ahead) = if self.resets_ahead() {
            let (reset, statements) = self.session_reset_text();
            (format!("{reset}{sql}"), statements)
        } else {
            (sql.to_owned(), 0)
        };
        frontend::query(&text, &mut self.write).map_err(encode_error)?;
        self.dirty = true;
        self.queue_reset_behind(last);
        let outcome = self
            .round_trip(ahead, false, &mut |_: &DataRowBody| Ok::<_, PgError>(()))
            .await?;
        match outcome.error {
            None => Ok(()),
            Some(GroupError::Row(error)) => Err(error),
            Some(GroupError::TooLarge { declared, limit }) => {
                Err(PgError::TooLarge { declared, limit })
            }
            Some(GroupError::Ahead(error)) => {
                self.broken = true;
                Err(PgError::Reset(error))
            }
            Some(GroupError::Statement(error)) => Err(PgError::Db(error)),
        }
    }
}

/// A prepared statement bound to its parameters: the messages that run it, up to and
/// including its Sync (for `PgConnection::run` and `run_pipelined`).
pub(crate) struct Bound {
    pub(super) messages: BytesMut,
    pub(super) timeout: Option<Duration>,
}

impl Bound {
    /// Binds `params` (in the types `prepared` was prepared with). With a `timeout`, the
    /// statement timeout set ahead of the statement ends behind it: reset if the
    /// statement succeeded, rolled back with its transaction if it failed.
    pub(crate) fn new<T: ToSql>(
        prepared: &Prepared,
        params: impl ExactSizeIterator<Item = T>,
        timeout: Option<Duration>,
    ) -> Result<Self, PgError> {
        let mut messages = BytesMut::with_capacity(256);
        let formats = std::iter::repeat_n(1, params.len());
        frontend::bind(
            "",
            &prepared.name,
            formats,
            params.zip(prepared.params.iter()),
            |(param, ty), buf| {
                param.to_sql_checked(ty, buf).map(|is_null| match is_null {
                    postgres_types::IsNull::Yes => postgres_protocol::IsNull::Yes,
                    postgres_types::IsNull::No => postgres_protocol::IsNull::No,
                })
            },
            std::iter::once(1),
            &mut messages,
        )
        .map_err(|error| {
            PgError::Parameter(match error {
                frontend::BindError::Conversion(error) => {
                    format!("a parameter cannot be sent: {error}")
                }
                frontend::BindError::Serialization(error) => {
                    format!("a parameter cannot be sent: {error}")
                }
            })
        })?;
        frontend::execute("", 0, &mut messages).map_err(encode_error)?;
        if prepared.name == ONCE {
            frontend::close(b'S', ONCE, &mut messages).map_err(encode_error)?;
        }
        if timeout.is_some() {
            queue_unnamed("RESET statement_timeout", &mut messages)?;
        }
        frontend::sync(&mut messages);
        Ok(Self { messages, timeout })
    }
}
