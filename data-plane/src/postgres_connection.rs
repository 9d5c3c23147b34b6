//! The data plane's PostgreSQL tenant connections: tokio-postgres clients.
//!
//! Every request's connection must be reset before the next request can use it (see
//! `pools`). sqlx waits for the server's answer to each message before it sends the
//! next one, so there the reset was a second round trip per request, which on a busy
//! server wakes the tenant's backend process a second time. tokio-postgres pipelines:
//! `PgConnection::pipelined` writes the request's statement timeout, its statement and
//! the session reset in one go, the backend runs them in one wake-up, and the request
//! answers its caller as soon as its own statement's results are in; the reset's answer
//! is collected when the connection goes back to its pool.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

use crate::connection_pool::{Backend, ConnectError, ConnectionControls};

/// What a PostgreSQL connection runs when it goes back to its pool (here: pipelined
/// right behind the request's statement).
///
/// No ROLLBACK: tenant statements cannot open a transaction (transaction control is
/// refused, and an extended-protocol statement's implicit transaction ends at its
/// Sync), Batch ends its own, and a connection whose request was abandoned half-way is
/// closed instead of reset.
const POSTGRES_SESSION_RESET: &str = "RESET ALL; CLOSE ALL; UNLISTEN *; \
     DISCARD TEMP; DISCARD SEQUENCES";

/// The same plus releasing session-level advisory locks, for a connection whose role may
/// take them (a tenant provisioned before they were revoked, or by an admin that could
/// not revoke them). The one statement of the reset that returns rows: it costs about a
/// sixth of a point select's throughput, so it runs only where it is needed.
const POSTGRES_SESSION_RESET_WITH_ADVISORY_LOCKS: &str = "RESET ALL; CLOSE ALL; UNLISTEN *; \
     SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// Whether the connection's role may take a session-level advisory lock. Provisioning
/// revokes these functions from PUBLIC in every tenant database
/// (`tenantry_control_plane::provisioner`); this tells per connection whether that holds.
const POSTGRES_CAN_TAKE_ADVISORY_LOCKS: &str = "SELECT \
     has_function_privilege('pg_catalog.pg_advisory_lock(bigint)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_advisory_lock(integer,integer)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_advisory_lock_shared(bigint)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_advisory_lock_shared(integer,integer)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_try_advisory_lock(bigint)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_try_advisory_lock(integer,integer)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_try_advisory_lock_shared(bigint)', 'EXECUTE') \
     OR has_function_privilege('pg_catalog.pg_try_advisory_lock_shared(integer,integer)', 'EXECUTE')";

/// Prepared statements kept per connection (as sqlx's default cache); the oldest is
/// closed on the server when a new one needs room.
const STATEMENT_CACHE_CAPACITY: usize = 100;

/// How long closing a connection waits for its goodbye to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// PostgreSQL tenant connections for `connection_pool`.
pub struct PgBackend;

#[derive(Clone)]
pub struct PgConnectOptions {
    pub config: tokio_postgres::Config,
    /// Reset every connection between requests (`DataPlaneConfig::postgres_session_reset`).
    pub session_reset: bool,
}

impl PgConnectOptions {
    pub fn new(host: &str, port: u16, database: &str, username: &str, password: &str) -> Self {
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(port)
            .dbname(database)
            .user(username)
            .password(password)
            .application_name("tenantry-data-plane")
            // Notices are not passed to callers: do not send them at all.
            .options("-c client_min_messages=error");
        Self {
            config,
            session_reset: true,
        }
    }
}

type Io = tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>;

pub struct PgConnection {
    client: Arc<Client>,
    /// The socket's side of the client: polled by whichever task is using the
    /// connection (`drive`), so that a statement's messages and answers do not pass
    /// through a task of their own. None once the connection has ended.
    io: Option<std::pin::Pin<Box<Io>>>,
    session_reset: bool,
    statements: HashMap<String, Statement>,
    /// Cache keys, oldest first.
    statement_order: VecDeque<String>,
    /// The session reset sent behind the request's statement, until it is answered.
    pending_reset: Option<BoxFuture<'static, bool>>,
    /// The reset behind the last statement succeeded: the connection can go back to its
    /// pool as it is.
    reset_done: bool,
}

impl Backend for PgBackend {
    type Connection = PgConnection;
    type ConnectOptions = PgConnectOptions;

    fn connect(
        options: &Self::ConnectOptions,
    ) -> BoxFuture<'_, Result<Self::Connection, ConnectError>> {
        Box::pin(async move {
            let (client, connection) = options
                .config
                .connect(NoTls)
                .await
                .map_err(ConnectError::Postgres)?;
            Ok(PgConnection {
                client: Arc::new(client),
                io: Some(Box::pin(connection)),
                session_reset: options.session_reset,
                statements: HashMap::new(),
                statement_order: VecDeque::new(),
                pending_reset: None,
                reset_done: false,
            })
        })
    }

    fn take_clean(connection: &mut Self::Connection) -> bool {
        std::mem::take(&mut connection.reset_done) && !connection.is_closed()
    }

    fn close(connection: Self::Connection) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let PgConnection {
                client,
                io,
                statements,
                pending_reset,
                ..
            } = connection;
            // Once the last handle to the client is gone, the socket's side says
            // goodbye (Terminate) to the server and ends.
            drop(pending_reset);
            drop(statements);
            drop(client);
            if let Some(io) = io {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, io).await;
            }
        })
    }
}

/// Runs `work` (calls on the connection's client) while polling the connection's
/// socket side in the same task. If the connection ends, `work`'s calls fail with
/// "connection closed".
async fn drive<F: Future>(io: &mut Option<std::pin::Pin<Box<Io>>>, work: F) -> F::Output {
    let mut work = std::pin::pin!(work);
    let output = std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = work.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        if poll_io(io, cx) {
            // Answers read just now are for `work`.
            return work.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await;
    // Leave no waker of this task with the socket side: the next request's messages
    // would otherwise wake this task (on another thread, for nothing) when they are
    // queued. The next user polls it again with its own.
    poll_io(
        io,
        &mut std::task::Context::from_waker(std::task::Waker::noop()),
    );
    output
}

/// Polls the socket side once (writes queued messages, reads answers). False if the
/// connection has ended.
fn poll_io(io: &mut Option<std::pin::Pin<Box<Io>>>, cx: &mut std::task::Context<'_>) -> bool {
    let Some(connection) = io.as_mut() else {
        return false;
    };
    if let Poll::Ready(ended) = connection.as_mut().poll(cx) {
        if let Err(error) = ended {
            tracing::debug!(%error, "PostgreSQL tenant connection ended");
        }
        *io = None;
    }
    true
}

impl PgConnection {
    /// Runs `work` on the connection's client (see `drive`).
    pub async fn run<'a, F: Future + 'a>(
        &'a mut self,
        work: impl FnOnce(&'a Client) -> F,
    ) -> F::Output {
        let client: &'a Client = &self.client;
        drive(&mut self.io, work(client)).await
    }

    /// Waits for the answer to the reset sent behind the request's statement, so that
    /// the connection can go straight back to its pool (no clean-up task). The reset
    /// runs right after the statement on the server, so this is rarely a wait. Not the
    /// connection's first reset, whose advisory-lock question takes a fresh backend
    /// about 3 ms: a cold tenant's first request answers without it, and the pool's
    /// clean-up collects it.
    pub async fn finish_reset(&mut self, controls: &ConnectionControls) {
        if !controls.advisory_locks_checked.load(Ordering::Acquire) {
            return;
        }
        if let Some(pending) = self.pending_reset.take() {
            self.reset_done = drive(&mut self.io, pending).await;
        }
    }

    fn is_closed(&self) -> bool {
        self.io.is_none() || self.client.is_closed()
    }

    /// The statement prepared for `key` on this connection, or a new one prepared from
    /// `sql` with the given parameter types (None: the server infers the type), kept for
    /// next time if `keep`.
    pub async fn prepare(
        &mut self,
        key: &str,
        sql: &str,
        types: &[Option<Type>],
        keep: bool,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(key) {
            return Ok(statement.clone());
        }
        let types: Vec<Type> = types
            .iter()
            .map(|ty| ty.clone().unwrap_or_else(unspecified_type))
            .collect();
        let client: &Client = &self.client;
        let statement = drive(&mut self.io, client.prepare_typed(sql, &types)).await?;
        if !keep {
            return Ok(statement);
        }
        if self.statements.len() >= STATEMENT_CACHE_CAPACITY
            && let Some(oldest) = self.statement_order.pop_front()
        {
            // Dropping the last handle closes it on the server.
            self.statements.remove(&oldest);
        }
        self.statements.insert(key.to_owned(), statement.clone());
        self.statement_order.push_back(key.to_owned());
        Ok(statement)
    }

    /// Forgets the prepared statements kept so far (a statement is about to drop them
    /// on the server).
    pub fn forget_statements(&mut self) {
        self.statements.clear();
        self.statement_order.clear();
    }

    /// Runs `work`, with the request's statement timeout (if any) sent just before it
    /// and the session reset just after it, all in one write. `work`'s first poll must
    /// send its one statement (as tokio-postgres's `query_raw`, `execute_raw` and
    /// `batch_execute` do, given a prepared statement). The reset's answer is collected
    /// when the connection is cleaned (`reset_session`). Err: the timeout could not be
    /// set (`work` ran without it).
    pub async fn pipelined<'a, F>(
        &'a mut self,
        controls: &Arc<ConnectionControls>,
        timeout: Option<Duration>,
        work: impl FnOnce(&'a Client) -> F,
    ) -> Result<F::Output, tokio_postgres::Error>
    where
        F: Future + 'a,
    {
        let mut set_timeout = timeout.map(|timeout| {
            // statement_timeout is an int of milliseconds; RESET ALL undoes it.
            let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
            let sql = format!("SET statement_timeout = {millis}");
            let client = self.client.clone();
            Box::pin(async move { client.batch_execute(&sql).await })
        });
        let mut timeout_set = match set_timeout.as_mut() {
            Some(set) => futures::poll!(set.as_mut()),
            None => Poll::Ready(Ok(())),
        };
        let client: &'a Client = &self.client;
        let mut work = std::pin::pin!(work(client));
        let first = futures::poll!(work.as_mut());
        if self.session_reset && self.pending_reset.is_none() {
            let mut reset = reset(self.client.clone(), controls.clone());
            if let Poll::Ready(done) = futures::poll!(reset.as_mut()) {
                reset = Box::pin(std::future::ready(done));
            }
            self.pending_reset = Some(reset);
        }
        let io = &mut self.io;
        drive(io, async move {
            if let (Poll::Pending, Some(set)) = (&timeout_set, set_timeout.as_mut()) {
                timeout_set = Poll::Ready(set.await);
            }
            let output = match first {
                Poll::Ready(output) => output,
                Poll::Pending => work.await,
            };
            match timeout_set {
                Poll::Ready(Err(error)) => Err(error),
                _ => Ok(output),
            }
        })
        .await
    }
}

/// A parameter type left for the server to infer (OID 0).
fn unspecified_type() -> Type {
    Type::new(
        "unspecified".to_owned(),
        0,
        tokio_postgres::types::Kind::Pseudo,
        "pg_catalog".to_owned(),
    )
}

/// Cleans a connection that comes back from a request: collects the answer of the reset
/// sent behind its statement, or resets it now. One round trip at most, which also tells
/// that the connection still works (a failing one is closed).
pub fn reset_session<'c>(
    connection: &'c mut PgConnection,
    controls: &'c ConnectionControls,
) -> BoxFuture<'c, bool> {
    Box::pin(async move {
        if connection.is_closed() {
            return false;
        }
        match connection.pending_reset.take() {
            Some(pending) => drive(&mut connection.io, pending).await,
            None => {
                let client: &Client = &connection.client;
                drive(&mut connection.io, reset_with(client, controls)).await
            }
        }
    })
}

fn reset(client: Arc<Client>, controls: Arc<ConnectionControls>) -> BoxFuture<'static, bool> {
    Box::pin(async move { reset_with(&client, &controls).await })
}

/// Resets the session. The first reset of a connection also asks whether its role can
/// take session-level advisory locks; later resets release them only if it can. The
/// question loads catalog entries on a fresh backend (about 3 ms), so it runs after the
/// first response rather than when the connection opens, on the way of a cold tenant's
/// first request.
async fn reset_with(client: &Client, controls: &ConnectionControls) -> bool {
    if controls.advisory_locks_checked.load(Ordering::Acquire) {
        let reset = if controls.advisory_locks_revoked.load(Ordering::Acquire) {
            POSTGRES_SESSION_RESET
        } else {
            POSTGRES_SESSION_RESET_WITH_ADVISORY_LOCKS
        };
        return client.batch_execute(reset).await.is_ok();
    }
    let first =
        format!("{POSTGRES_SESSION_RESET_WITH_ADVISORY_LOCKS}; {POSTGRES_CAN_TAKE_ADVISORY_LOCKS}");
    let Ok(messages) = client.simple_query(&first).await else {
        return false;
    };
    // The last statement's one row; unanswered, the next reset asks again (and releases
    // locks meanwhile).
    let can_take = messages.iter().rev().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    });
    if let Some(can_take) = can_take {
        controls
            .advisory_locks_revoked
            .store(can_take != "t", Ordering::Release);
        controls
            .advisory_locks_checked
            .store(true, Ordering::Release);
    }
    true
}

/// A new PostgreSQL tenant connection needs nothing before its first request: its
/// session reset finds out the rest (see `reset_with`).
pub fn postgres_connected(
    _connection: &mut PgConnection,
    _controls: Arc<ConnectionControls>,
) -> BoxFuture<'_, Result<(), ConnectError>> {
    Box::pin(std::future::ready(Ok(())))
}
