//! The session reset. Session state set by one request (`SET search_path`, a temporary
//! table, `LISTEN`, a cursor WITH HOLD, `currval`) must not reach the next request on the
//! connection. A connection that has served a request is reset at the start of its next
//! one: the reset's statements go out in the same write and the same implicit
//! transaction as that request's first message (the `Parse` of a new statement, or the
//! `Bind` of a cached one), so the server runs them first, and if any of them fails
//! nothing after them runs. Where the tenant's role may hold session-level advisory
//! locks, which must not outlive their request, and for a connection's first reset
//! (which also asks whether the role may), the reset goes out right behind the request's
//! statement instead and is answered before the connection serves anyone else.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use futures::future::BoxFuture;
use postgres_protocol::message::backend::DataRowBody;
use postgres_protocol::message::frontend;

use super::connection::{PgConnection, Reading, text_row};
use super::error::{PgError, encode_error};
use super::statements::Preparing;

/// The session reset, one statement each, as sent ahead of a request's first message:
/// prepared once per connection (`RESET_NAMES`), then only bound and executed, which
/// costs the server about a third less than parsing them each time.
///
/// No ROLLBACK: tenant statements cannot open a transaction (transaction control is
/// refused, and an extended-protocol statement's implicit transaction ends at its Sync),
/// Batch ends its own, and a connection whose request was abandoned half-way is closed
/// instead of reset.
pub(super) const RESET_STATEMENTS: [&str; 5] = [
    "RESET ALL",
    "CLOSE ALL",
    "UNLISTEN *",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
];

/// The server-side names of `RESET_STATEMENTS`, in the same order.
const RESET_NAMES: [&str; 5] = [
    "tenantry_reset_0",
    "tenantry_reset_1",
    "tenantry_reset_2",
    "tenantry_reset_3",
    "tenantry_reset_4",
];

/// The same as one simple query, ahead of a Batch's BEGIN.
pub(super) const SESSION_RESET: &str =
    "RESET ALL; CLOSE ALL; UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES; ";

/// The reset sent behind a request's statement: the same plus releasing session-level
/// advisory locks, for a connection whose role may take them (a tenant provisioned
/// before they were revoked, or by an admin that could not revoke them).
const SESSION_RESET_WITH_ADVISORY_LOCKS: &str = "RESET ALL; CLOSE ALL; UNLISTEN *; \
     SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// Removes the statements the tenant prepared by SQL (`PREPARE`, also from a DO block or
/// a function: `from_sql` in `pg_prepared_statements`), leaving the data plane's own
/// (prepared over the protocol) alone. Part of the session reset only where the session
/// may hold some (see `PgConnection::note_preparing`): a DO block costs the server about
/// 0.1 ms.
const REMOVE_SQL_PREPARED: &str = "DO $tenantry$DECLARE n text; BEGIN \
     FOR n IN SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql LOOP \
     EXECUTE format('DEALLOCATE %I', n); END LOOP; END$tenantry$";

/// The server-side name of `REMOVE_SQL_PREPARED`.
const REMOVE_SQL_PREPARED_NAME: &str = "tenantry_reset_prepared";

/// The first reset's questions, one row: whether the connection's role may take a
/// session-level advisory lock (provisioning revokes these functions from PUBLIC in
/// every tenant database, `tenantry_control_plane::provisioner`; this tells per
/// connection whether that holds), and whether the database has functions or procedures
/// whose code may PREPARE (their calls would not show it).
const FIRST_RESET_QUESTIONS: &str = "SELECT \
     has_function_privilege('pg_catalog.pg_advisory_lock(bigint)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_advisory_lock(integer,integer)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_advisory_lock_shared(bigint)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_advisory_lock_shared(integer,integer)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_try_advisory_lock(bigint)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_try_advisory_lock(integer,integer)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_try_advisory_lock_shared(bigint)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_try_advisory_lock_shared(integer,integer)', 'EXECUTE'), \
     EXISTS (SELECT 1 FROM pg_catalog.pg_proc \
     WHERE pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) \
     AND prosrc ILIKE '%prepare%')";

/// What a PostgreSQL connection's session reset has found out about its role, kept with
/// the connection (`pool::Backend::Controls`).
#[derive(Default)]
pub(crate) struct PgControls {
    /// The connection's role cannot take session-level advisory locks (valid once
    /// `advisory_locks_checked`), so its session reset need not release any.
    advisory_locks_revoked: AtomicBool,
    /// `advisory_locks_revoked` has been found out (by the connection's first session
    /// reset, so that a cold request does not wait for it).
    advisory_locks_checked: AtomicBool,
}

impl PgConnection {
    /// Whether the next group of messages starts with the session reset.
    pub(super) fn resets_ahead(&self) -> bool {
        self.session_reset && self.dirty && self.status == b'I'
    }

    /// Queues the session reset if it is due. Returns how many statements it queued
    /// (each answers with one CommandComplete).
    pub(super) fn queue_reset_ahead(&mut self) -> Result<usize, PgError> {
        if !self.resets_ahead() {
            return Ok(0);
        }
        Ok(self.queue_reset())
    }

    /// Queues the session reset, preparing its statements first if this connection has
    /// not yet or may have dropped them (a failed reset closes the connection, so they
    /// are known prepared from here on). Returns how many statements it queued.
    pub(super) fn queue_reset(&mut self) -> usize {
        if self.reset_prepared {
            self.write.extend_from_slice(&RESET_MESSAGES.run);
        } else {
            self.write
                .extend_from_slice(&RESET_MESSAGES.prepare_and_run);
            self.reset_prepared = true;
        }
        if !self.removes_sql_prepared() {
            return RESET_STATEMENTS.len();
        }
        if !self.cleanup_prepared {
            let _ = frontend::close(b'S', REMOVE_SQL_PREPARED_NAME, &mut self.write);
            let _ = frontend::parse(
                REMOVE_SQL_PREPARED_NAME,
                REMOVE_SQL_PREPARED,
                [],
                &mut self.write,
            );
            self.cleanup_prepared = true;
        }
        let _ = queue_bound(REMOVE_SQL_PREPARED_NAME, &mut self.write);
        RESET_STATEMENTS.len() + 1
    }

    /// Whether the reset now being queued removes SQL-prepared statements (and, if so,
    /// counts them as removed).
    fn removes_sql_prepared(&mut self) -> bool {
        std::mem::take(&mut self.sql_prepared) || self.code_prepares.load(Ordering::Acquire)
    }

    /// The session reset as one simple query (ahead of a Batch's BEGIN), and how many
    /// statements it holds.
    pub(super) fn session_reset_text(&mut self) -> (String, usize) {
        if self.removes_sql_prepared() {
            (
                format!("{SESSION_RESET}{REMOVE_SQL_PREPARED}; "),
                RESET_STATEMENTS.len() + 1,
            )
        } else {
            (SESSION_RESET.to_owned(), RESET_STATEMENTS.len())
        }
    }

    /// Notes what a statement about to run may do to SQL-prepared statements, so that the
    /// next reset removes them.
    pub(super) fn note_preparing(&mut self, preparing: Preparing) {
        match preparing {
            Preparing::No => {}
            Preparing::Itself => self.sql_prepared = true,
            Preparing::InCode => {
                self.sql_prepared = true;
                self.code_prepares.store(true, Ordering::Release);
            }
        }
    }

    /// Queues the reset behind the request's last statement where it cannot wait for
    /// the next request: the connection's first reset, which asks whether its role may
    /// take session-level advisory locks, and every reset of a role that may.
    pub(super) fn queue_reset_behind(&mut self, last: Option<&PgControls>) {
        let Some(controls) = last else {
            return;
        };
        if !self.session_reset {
            return;
        }
        let checked = controls.advisory_locks_checked.load(Ordering::Acquire);
        let revoked = controls.advisory_locks_revoked.load(Ordering::Acquire);
        self.reset_ahead = checked && revoked;
        if self.reset_ahead {
            return;
        }
        let mut sql = SESSION_RESET_WITH_ADVISORY_LOCKS.to_owned();
        if self.removes_sql_prepared() {
            sql.push_str("; ");
            sql.push_str(REMOVE_SQL_PREPARED);
        }
        if !checked {
            sql.push_str("; ");
            sql.push_str(FIRST_RESET_QUESTIONS);
        }
        // The query text has no NUL: this cannot fail.
        if frontend::query(&sql, &mut self.write).is_ok() {
            self.reset_behind = Some(!checked);
        }
    }

    /// Collects the answer of the reset sent behind the request's statement, so that the
    /// connection can go straight back to its pool. The reset runs right after the
    /// statement on the server, so this is rarely a wait. Not the connection's first
    /// reset, whose advisory-lock question takes a fresh backend about 3 ms: a cold
    /// tenant's first request answers without it, and the pool's clean-up collects it.
    pub(crate) async fn finish_reset(&mut self, controls: &PgControls) {
        if self.reset_behind == Some(false) && self.usable() {
            let done = self.collect_reset_behind(controls).await;
            if !done {
                self.broken = true;
            }
        }
    }

    /// Reads the answer of the reset sent behind the last statement. False: it failed.
    pub(super) async fn collect_reset_behind(&mut self, controls: &PgControls) -> bool {
        let Some(asks) = self.reset_behind.take() else {
            return true;
        };
        self.in_flight = true;
        let mut last_row = None;
        let outcome = self
            .read_group(0, false, Reading::Shared, &mut |row: &DataRowBody| {
                last_row = Some(text_row(row)?);
                Ok::<_, PgError>(())
            })
            .await;
        let Ok(outcome) = outcome else {
            return false;
        };
        self.in_flight = false;
        if outcome.error.is_some() {
            return false;
        }
        self.dirty = false;
        if asks {
            // The last statement's one row; unanswered, the next reset asks again (and
            // releases locks meanwhile).
            if let Some([Some(can_take), Some(code_prepares)]) = last_row.as_deref() {
                if code_prepares == "t" {
                    self.code_prepares.store(true, Ordering::Release);
                }
                let revoked = can_take != "t";
                controls
                    .advisory_locks_revoked
                    .store(revoked, Ordering::Release);
                controls
                    .advisory_locks_checked
                    .store(true, Ordering::Release);
                self.reset_ahead = revoked;
            }
        }
        true
    }
}

/// `RESET_STATEMENTS` as extended-protocol messages.
struct ResetMessages {
    /// Close, Parse (named), Bind and Execute each: closing a statement that does not
    /// exist is no error.
    prepare_and_run: BytesMut,
    /// Bind and Execute each, once prepared.
    run: BytesMut,
}

static RESET_MESSAGES: std::sync::LazyLock<ResetMessages> = std::sync::LazyLock::new(|| {
    let mut messages = ResetMessages {
        prepare_and_run: BytesMut::new(),
        run: BytesMut::new(),
    };
    for (statement, name) in RESET_STATEMENTS.into_iter().zip(RESET_NAMES) {
        // Constant texts with no NUL: encoding cannot fail.
        let _ = frontend::close(b'S', name, &mut messages.prepare_and_run);
        let _ = frontend::parse(name, statement, [], &mut messages.prepare_and_run);
        let _ = queue_bound(name, &mut messages.prepare_and_run);
        let _ = queue_bound(name, &mut messages.run);
    }
    messages
});

pub(super) fn queue_unnamed(sql: &str, buf: &mut BytesMut) -> Result<(), PgError> {
    frontend::parse("", sql, std::iter::empty(), buf).map_err(encode_error)?;
    queue_bound("", buf)
}

/// Queues Bind and Execute of a prepared statement with no parameters and no result.
fn queue_bound(statement: &str, buf: &mut BytesMut) -> Result<(), PgError> {
    frontend::bind(
        "",
        statement,
        std::iter::empty(),
        std::iter::empty::<()>(),
        |(), _| Ok(postgres_protocol::IsNull::Yes),
        std::iter::empty(),
        buf,
    )
    .map_err(|_| PgError::Parameter("cannot encode a message".to_owned()))?;
    frontend::execute("", 0, buf).map_err(encode_error)
}

/// Cleans a connection that comes back from a request when it cannot go straight back
/// (`Backend::take_clean`): collects the reset sent behind its statement, or resets it
/// now. False: the connection is closed.
pub(crate) fn reset_session<'c>(
    connection: &'c mut PgConnection,
    controls: &'c PgControls,
) -> BoxFuture<'c, bool> {
    Box::pin(async move {
        if !connection.usable() {
            return false;
        }
        if connection.reset_behind.is_some() {
            return connection.collect_reset_behind(controls).await;
        }
        if connection.dirty && connection.status == b'I' {
            connection.queue_reset_behind(Some(controls));
            if connection.reset_behind.is_none() {
                // Reset ahead of the next request.
                return true;
            }
            if connection.flush().await.is_err() {
                return false;
            }
            return connection.collect_reset_behind(controls).await;
        }
        connection.status == b'I'
    })
}
