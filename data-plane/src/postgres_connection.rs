//! The data plane's PostgreSQL tenant connections: a small client of PostgreSQL's wire
//! protocol (messages from `postgres-protocol`, values from `postgres-types`). The
//! request that holds a connection drives it: a call writes all of its messages in one
//! write and reads the answers in the request's own task, with no channel or task in
//! between. `run_pipelined` sends several requests' statements in one write, each with
//! its own Sync and its own reset ahead of it.
//!
//! Session reset. Session state set by one request (`SET search_path`, a temporary
//! table, `LISTEN`, a cursor WITH HOLD, `currval`) must not reach the next request on the
//! connection. A connection that has served a request is reset at the start of its next
//! one: the reset's statements go out in the same write and the same implicit
//! transaction as that request's first message (the `Parse` of a new statement, or the
//! `Bind` of a cached one), so the server runs them first, and if any of them fails
//! nothing after them runs. Where the tenant's role may hold session-level advisory
//! locks, which must not outlive their request, and for a connection's first reset
//! (which also asks whether the role may), the reset goes out right behind the request's
//! statement instead and is answered before the connection serves anyone else.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use futures::future::BoxFuture;
use postgres_protocol::authentication::{self, sasl};
use postgres_protocol::message::backend::{DataRowBody, ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use postgres_types::{Kind, ToSql, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connection_pool::{Backend, ConnectError, ConnectionControls};

/// The session reset, one statement each, as sent ahead of a request's first message:
/// prepared once per connection (`RESET_NAMES`), then only bound and executed, which
/// costs the server about a third less than parsing them each time.
///
/// No ROLLBACK: tenant statements cannot open a transaction (transaction control is
/// refused, and an extended-protocol statement's implicit transaction ends at its Sync),
/// Batch ends its own, and a connection whose request was abandoned half-way is closed
/// instead of reset.
const RESET_STATEMENTS: [&str; 5] = [
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
const SESSION_RESET: &str = "RESET ALL; CLOSE ALL; UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES; ";

/// The reset sent behind a request's statement: the same plus releasing session-level
/// advisory locks, for a connection whose role may take them (a tenant provisioned
/// before they were revoked, or by an admin that could not revoke them).
const SESSION_RESET_WITH_ADVISORY_LOCKS: &str = "RESET ALL; CLOSE ALL; UNLISTEN *; \
     SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// Whether the connection's role may take a session-level advisory lock. Provisioning
/// revokes these functions from PUBLIC in every tenant database
/// (`tenantry_control_plane::provisioner`); this tells per connection whether that holds.
const CAN_TAKE_ADVISORY_LOCKS: &str = "SELECT \
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

/// The server-side name of a statement prepared for one use (`prepare(.., keep: false)`).
const ONCE: &str = "tenantry_once";

/// How long closing a connection waits for its goodbye to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// SQLSTATE 25001 (active_sql_transaction): the statement cannot run in a transaction
/// block or a pipeline (VACUUM, DISCARD ALL, CREATE INDEX CONCURRENTLY, ...).
const ACTIVE_SQL_TRANSACTION: &str = "25001";

/// An error the server reported.
#[derive(Debug)]
pub struct DbError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

impl DbError {
    fn parse(body: &ErrorResponseBody) -> Self {
        let mut error = DbError {
            code: String::new(),
            message: String::new(),
            detail: None,
        };
        let mut fields = body.fields();
        while let Ok(Some(field)) = fields.next() {
            let value = || String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'C' => error.code = value(),
                b'M' => error.message = value(),
                b'D' => error.detail = Some(value()),
                _ => {}
            }
        }
        error
    }
}

#[derive(Debug)]
pub enum PgError {
    /// The server refused the statement.
    Db(DbError),
    /// The session reset ahead of the statement failed (the statement did not run); the
    /// connection is closed.
    Reset(DbError),
    /// The server closed the connection.
    Closed,
    Io(std::io::Error),
    /// An answer this client does not understand, or cannot give (authentication).
    Protocol(String),
    /// Something the data plane does not offer (COPY over the connection).
    Unsupported(String),
    /// A parameter could not be encoded.
    Parameter(String),
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Db(error) => write!(f, "SQLSTATE {}: {}", error.code, error.message),
            Self::Reset(error) => write!(
                f,
                "session reset failed: SQLSTATE {}: {}",
                error.code, error.message
            ),
            Self::Closed => f.write_str("connection closed"),
            Self::Io(error) => write!(f, "I/O error: {error}"),
            Self::Protocol(message) | Self::Unsupported(message) | Self::Parameter(message) => {
                f.write_str(message)
            }
        }
    }
}

impl std::error::Error for PgError {}

/// A statement's error, or the error of the caller's row handler.
pub enum RunError<E> {
    Postgres(PgError),
    Row(E),
}

/// PostgreSQL tenant connections for `connection_pool`.
pub struct PgBackend;

#[derive(Clone)]
pub struct PgConnectOptions {
    host: String,
    port: u16,
    database: String,
    user: String,
    password: String,
    /// Reset every connection between requests (`DataPlaneConfig::postgres_session_reset`).
    pub session_reset: bool,
    /// Requests waiting for a connection go out together
    /// (`DataPlaneConfig::postgres_pipelining`).
    pub pipelining: bool,
}

impl fmt::Debug for PgConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnectOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl PgConnectOptions {
    pub fn new(host: &str, port: u16, database: &str, username: &str, password: &str) -> Self {
        Self {
            host: host.to_owned(),
            port,
            database: database.to_owned(),
            user: username.to_owned(),
            password: password.to_owned(),
            session_reset: true,
            pipelining: true,
        }
    }
}

/// A statement prepared on a connection.
pub struct Prepared {
    name: String,
    params: Vec<Type>,
    columns: Vec<Column>,
}

impl Prepared {
    /// Kept in the connection's statement cache (not prepared for one use).
    pub fn is_kept(&self) -> bool {
        self.name != ONCE
    }

    pub fn params(&self) -> &[Type] {
        &self.params
    }

    pub fn columns(&self) -> &[Column] {
        &self.columns
    }
}

pub struct Column {
    name: String,
    type_: Type,
}

impl Column {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn type_(&self) -> &Type {
        &self.type_
    }
}

pub struct PgConnection {
    socket: TcpStream,
    read: BytesMut,
    write: BytesMut,
    /// A call's messages are out and its answers not all read. A connection left so (its
    /// call was dropped half-way) is closed, never used again.
    in_flight: bool,
    /// The connection broke or the server closed it.
    broken: bool,
    session_reset: bool,
    /// The session has run something since it was last reset.
    dirty: bool,
    /// The transaction status of the last ReadyForQuery (`I`dle, in a `T`ransaction,
    /// `E`rror in a transaction).
    status: u8,
    /// A reset was sent behind the last statement and is not answered yet (true: it
    /// also asks whether the role may take advisory locks).
    reset_behind: Option<bool>,
    /// The role cannot take session-level advisory locks (known from the connection's
    /// first reset): its connections are reset ahead of their next request.
    reset_ahead: bool,
    /// `RESET_STATEMENTS` are prepared on the server (under `RESET_NAMES`).
    reset_prepared: bool,
    /// The next statement run drops the connection's prepared statements (DEALLOCATE,
    /// DISCARD ALL), the reset's among them.
    drops_statements: bool,
    statements: HashMap<String, Arc<Prepared>>,
    /// Cache keys, oldest first.
    statement_order: VecDeque<String>,
    next_statement: u64,
    /// Names of types that are not built in (extensions, enums, domains), by OID.
    types: HashMap<u32, Type>,
}

impl Backend for PgBackend {
    type Connection = PgConnection;
    type ConnectOptions = PgConnectOptions;
    type Shared = crate::sql::Waiting;

    fn connect(
        options: &Self::ConnectOptions,
    ) -> BoxFuture<'_, Result<Self::Connection, ConnectError>> {
        Box::pin(async move {
            PgConnection::connect(options)
                .await
                .map_err(ConnectError::Postgres)
        })
    }

    fn take_clean(connection: &mut Self::Connection) -> bool {
        connection.usable()
            && connection.status == b'I'
            && connection.reset_behind.is_none()
            && (!connection.dirty || connection.reset_ahead)
    }

    fn is_open(connection: &Self::Connection) -> bool {
        connection.usable()
    }

    fn check_idle(connection: &mut Self::Connection) -> bool {
        connection.check_idle()
    }

    fn close(mut connection: Self::Connection) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if connection.broken {
                return;
            }
            let mut goodbye = BytesMut::new();
            frontend::terminate(&mut goodbye);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                connection.socket.write_all(&goodbye).await?;
                connection.socket.shutdown().await
            })
            .await;
        })
    }
}

/// What a group of messages (up to one Sync) came back with.
struct Outcome<E> {
    rows_affected: u64,
    error: Option<GroupError<E>>,
}

enum GroupError<E> {
    /// One of the statements sent ahead of the request's own failed.
    Ahead(DbError),
    Statement(DbError),
    Row(E),
}

fn encode_error(error: std::io::Error) -> PgError {
    PgError::Parameter(format!("cannot encode a message: {error}"))
}

impl PgConnection {
    async fn connect(options: &PgConnectOptions) -> Result<Self, PgError> {
        if options.host.starts_with('/') {
            return Err(PgError::Protocol(format!(
                "the database server's host {:?} is a Unix socket directory; data planes reach \
                 PostgreSQL over TCP: register the server with a host name or address",
                options.host
            )));
        }
        let socket = TcpStream::connect((options.host.as_str(), options.port))
            .await
            .map_err(PgError::Io)?;
        socket.set_nodelay(true).map_err(PgError::Io)?;
        let mut connection = PgConnection {
            socket,
            read: BytesMut::with_capacity(8192),
            write: BytesMut::with_capacity(8192),
            in_flight: false,
            broken: false,
            session_reset: options.session_reset,
            dirty: false,
            status: b'I',
            reset_behind: None,
            reset_ahead: false,
            reset_prepared: false,
            drops_statements: false,
            statements: HashMap::new(),
            statement_order: VecDeque::new(),
            next_statement: 0,
            types: HashMap::new(),
        };
        let parameters = [
            ("client_encoding", "UTF8"),
            ("user", options.user.as_str()),
            ("database", options.database.as_str()),
            ("application_name", "tenantry-data-plane"),
            // Notices are not passed to callers: do not send them at all.
            ("options", "-c client_min_messages=error"),
        ];
        frontend::startup_message(parameters, &mut connection.write).map_err(encode_error)?;
        connection.flush().await?;
        connection.authenticate(options).await?;
        loop {
            match connection.next_message().await? {
                Message::BackendKeyData(_) => {}
                Message::ReadyForQuery(body) => {
                    connection.status = body.status();
                    return Ok(connection);
                }
                Message::ErrorResponse(body) => return Err(PgError::Db(DbError::parse(&body))),
                _ => return Err(unexpected("connection start")),
            }
        }
    }

    async fn authenticate(&mut self, options: &PgConnectOptions) -> Result<(), PgError> {
        let password = options.password.as_bytes();
        match self.next_message().await? {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password, &mut self.write).map_err(encode_error)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = authentication::md5_hash(options.user.as_bytes(), password, body.salt());
                frontend::password_message(hash.as_bytes(), &mut self.write)
                    .map_err(encode_error)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut scram = false;
                while let Some(mechanism) = mechanisms.next().map_err(protocol)? {
                    scram |= mechanism == sasl::SCRAM_SHA_256;
                }
                if !scram {
                    return Err(PgError::Protocol(
                        "the server offers no SASL mechanism this client has (SCRAM-SHA-256)"
                            .to_owned(),
                    ));
                }
                let mut scram =
                    sasl::ScramSha256::new(password, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(
                    sasl::SCRAM_SHA_256,
                    scram.message(),
                    &mut self.write,
                )
                .map_err(encode_error)?;
                self.flush().await?;
                let body = match self.next_message().await? {
                    Message::AuthenticationSaslContinue(body) => body,
                    Message::ErrorResponse(body) => {
                        return Err(PgError::Db(DbError::parse(&body)));
                    }
                    _ => return Err(unexpected("SCRAM authentication")),
                };
                scram.update(body.data()).map_err(protocol)?;
                frontend::sasl_response(scram.message(), &mut self.write).map_err(encode_error)?;
                self.flush().await?;
                let body = match self.next_message().await? {
                    Message::AuthenticationSaslFinal(body) => body,
                    Message::ErrorResponse(body) => {
                        return Err(PgError::Db(DbError::parse(&body)));
                    }
                    _ => return Err(unexpected("SCRAM authentication")),
                };
                scram.finish(body.data()).map_err(protocol)?;
                return self.authenticated().await;
            }
            Message::ErrorResponse(body) => return Err(PgError::Db(DbError::parse(&body))),
            _ => {
                return Err(PgError::Protocol(
                    "the server asks for an authentication method this client does not have \
                     (it has password, md5 and SCRAM-SHA-256)"
                        .to_owned(),
                ));
            }
        }
        self.flush().await?;
        self.authenticated().await
    }

    async fn authenticated(&mut self) -> Result<(), PgError> {
        match self.next_message().await? {
            Message::AuthenticationOk => Ok(()),
            Message::ErrorResponse(body) => Err(PgError::Db(DbError::parse(&body))),
            _ => Err(unexpected("authentication")),
        }
    }

    fn usable(&self) -> bool {
        !self.broken && !self.in_flight
    }

    /// Whether an idle connection is still open, found out without waiting. An idle
    /// server sends nothing unless it ends the connection (a FATAL error such as
    /// `pg_terminate_backend`'s or a shutdown's, then end of stream), apart from notices,
    /// parameter changes and notifications, which are skipped. What it sent may already
    /// be in the read buffer (read together with the last answer) or still in the
    /// socket, which is asked directly (one non-blocking `recv`): tokio's readiness only
    /// shows what its I/O driver has collected, and a busy runtime may not have collected
    /// the server's goodbye yet.
    fn check_idle(&mut self) -> bool {
        if !self.usable() {
            return false;
        }
        let mut chunk = [0u8; 1024];
        loop {
            match self.buffered_message() {
                Ok(None) => {}
                Ok(Some(Message::ErrorResponse(body))) => {
                    let error = DbError::parse(&body);
                    tracing::info!(
                        sqlstate = %error.code,
                        message = %error.message,
                        "the server ended an idle connection; the request gets another"
                    );
                    self.broken = true;
                    return false;
                }
                Ok(Some(_)) | Err(_) => {
                    tracing::warn!(
                        "an idle connection got an unexpected or malformed message; closing it"
                    );
                    self.broken = true;
                    return false;
                }
            }
            // The socket is non-blocking (tokio's): an empty one answers WouldBlock at once.
            match std::io::Read::read(&mut &*socket2::SockRef::from(&self.socket), &mut chunk) {
                Ok(0) => break,
                Ok(read) => self.read.extend_from_slice(&chunk[..read]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        tracing::info!("an idle connection was closed by the server; the request gets another");
        self.broken = true;
        false
    }

    /// Writes what is queued.
    async fn flush(&mut self) -> Result<(), PgError> {
        let written = self.socket.write_all(&self.write).await;
        self.write.clear();
        written.map_err(|error| {
            self.broken = true;
            PgError::Io(error)
        })
    }

    /// The next whole message in the read buffer, skipping those the server may send at
    /// any time (notices, parameter changes, notifications).
    fn buffered_message(&mut self) -> Result<Option<Message>, PgError> {
        loop {
            match Message::parse(&mut self.read) {
                Ok(Some(
                    Message::NoticeResponse(_)
                    | Message::ParameterStatus(_)
                    | Message::NotificationResponse(_),
                )) => continue,
                Ok(message) => return Ok(message),
                Err(error) => {
                    self.broken = true;
                    return Err(protocol(error));
                }
            }
        }
    }

    /// The next message from the server, skipping those it may send at any time.
    async fn next_message(&mut self) -> Result<Message, PgError> {
        loop {
            if let Some(message) = self.buffered_message()? {
                return Ok(message);
            }
            self.read.reserve(4096);
            match self.socket.read_buf(&mut self.read).await {
                Ok(0) => {
                    self.broken = true;
                    return Err(PgError::Closed);
                }
                Ok(_) => {}
                Err(error) => {
                    self.broken = true;
                    return Err(PgError::Io(error));
                }
            }
        }
    }

    /// Checks that the connection can take a call.
    fn start(&self) -> Result<(), PgError> {
        if self.broken {
            return Err(PgError::Closed);
        }
        if self.in_flight || self.reset_behind.is_some() {
            return Err(PgError::Protocol(
                "the connection still has answers to read".to_owned(),
            ));
        }
        Ok(())
    }

    /// Whether the next group of messages starts with the session reset.
    fn resets_ahead(&self) -> bool {
        self.session_reset && self.dirty && self.status == b'I'
    }

    /// Queues one statement with no parameters and no result, as the unnamed statement.
    fn queue_unnamed(&mut self, sql: &str) -> Result<(), PgError> {
        queue_unnamed(sql, &mut self.write)
    }

    /// Queues the session reset if it is due. Returns how many statements it queued
    /// (each answers with one CommandComplete).
    fn queue_reset_ahead(&mut self) -> Result<usize, PgError> {
        if !self.resets_ahead() {
            return Ok(0);
        }
        self.queue_reset();
        Ok(RESET_STATEMENTS.len())
    }

    /// Queues the session reset, preparing its statements first if this connection has
    /// not yet or may have dropped them (a failed reset closes the connection, so they
    /// are known prepared from here on).
    fn queue_reset(&mut self) {
        if self.reset_prepared {
            self.write.extend_from_slice(&RESET_MESSAGES.run);
        } else {
            self.write
                .extend_from_slice(&RESET_MESSAGES.prepare_and_run);
            self.reset_prepared = true;
        }
    }

    /// Reads a group's answers up to its ReadyForQuery. The first `ahead` completions
    /// answer statements sent ahead of the request's own; then come its rows (for
    /// `on_row`) and its completion.
    async fn read_group<E>(
        &mut self,
        mut ahead: usize,
        only_first: bool,
        on_row: &mut impl FnMut(&DataRowBody) -> Result<(), E>,
    ) -> Result<Outcome<E>, PgError> {
        let mut outcome = Outcome {
            rows_affected: 0,
            error: None,
        };
        // With `only_first`, the request's statement is the first after those ahead; what
        // follows it (the end of its statement timeout) has no rows and no count to give.
        let mut done = false;
        loop {
            match self.next_message().await? {
                Message::ParseComplete
                | Message::BindComplete
                | Message::CloseComplete
                | Message::NoData
                | Message::ParameterDescription(_)
                | Message::RowDescription(_) => {}
                Message::CommandComplete(body) => {
                    if ahead > 0 {
                        ahead -= 1;
                    } else if !done {
                        outcome.rows_affected = rows_affected(body.tag().map_err(protocol)?);
                        done = only_first;
                    }
                }
                Message::EmptyQueryResponse => done = only_first,
                Message::DataRow(row) => {
                    if outcome.error.is_none()
                        && !done
                        && let Err(error) = on_row(&row)
                    {
                        outcome.error = Some(GroupError::Row(error));
                    }
                }
                Message::ErrorResponse(body) => {
                    let error = DbError::parse(&body);
                    outcome.error = Some(if ahead > 0 {
                        GroupError::Ahead(error)
                    } else {
                        GroupError::Statement(error)
                    });
                }
                Message::ReadyForQuery(body) => {
                    self.status = body.status();
                    return Ok(outcome);
                }
                Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                    // The connection is in the middle of a COPY: not worth unwinding.
                    self.broken = true;
                    return Err(PgError::Unsupported(
                        "COPY ... FROM STDIN and COPY ... TO STDOUT are not available through \
                         the data plane: insert rows with parameters (Execute, or Batch for \
                         many), and read them with Query"
                            .to_owned(),
                    ));
                }
                _ => {
                    self.broken = true;
                    return Err(unexpected("a statement's answer"));
                }
            }
        }
    }

    /// Sends what is queued and reads the answers of one group.
    async fn round_trip<E>(
        &mut self,
        ahead: usize,
        only_first: bool,
        on_row: &mut impl FnMut(&DataRowBody) -> Result<(), E>,
    ) -> Result<Outcome<E>, PgError> {
        self.in_flight = true;
        self.flush().await?;
        let outcome = self.read_group(ahead, only_first, on_row).await?;
        self.in_flight = false;
        Ok(outcome)
    }

    /// The statement kept for `key` on this connection, if any.
    pub fn cached(&self, key: &str) -> Option<Arc<Prepared>> {
        self.statements.get(key).cloned()
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
    ) -> Result<Arc<Prepared>, PgError> {
        if keep && let Some(statement) = self.statements.get(key) {
            return Ok(statement.clone());
        }
        self.start()?;
        self.write.clear();
        // Closes first: they take effect even if what follows fails.
        let name = if keep {
            if self.statements.len() >= STATEMENT_CACHE_CAPACITY
                && let Some(oldest) = self.statement_order.pop_front()
                && let Some(statement) = self.statements.remove(&oldest)
            {
                frontend::close(b'S', &statement.name, &mut self.write).map_err(encode_error)?;
            }
            self.next_statement += 1;
            format!("tenantry_{}", self.next_statement)
        } else {
            frontend::close(b'S', ONCE, &mut self.write).map_err(encode_error)?;
            ONCE.to_owned()
        };
        // Parse resolves names with the session's search_path: reset it first.
        let ahead = self.queue_reset_ahead()?;
        let oids = types.iter().map(|ty| ty.as_ref().map_or(0, Type::oid));
        frontend::parse(&name, sql, oids, &mut self.write).map_err(encode_error)?;
        frontend::describe(b'S', &name, &mut self.write).map_err(encode_error)?;
        frontend::sync(&mut self.write);
        self.in_flight = true;
        self.flush().await?;
        let mut params = Vec::new();
        let mut columns = Vec::new();
        let mut ahead_left = ahead;
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::ParseComplete
                | Message::BindComplete
                | Message::CloseComplete
                | Message::NoData => {}
                Message::CommandComplete(_) => ahead_left = ahead_left.saturating_sub(1),
                Message::ParameterDescription(body) => {
                    params = body.parameters().collect().map_err(protocol)?;
                }
                Message::RowDescription(body) => {
                    columns = body
                        .fields()
                        .map(|field| Ok((field.name().to_owned(), field.type_oid())))
                        .collect()
                        .map_err(protocol)?;
                }
                Message::ErrorResponse(body) => {
                    let db = DbError::parse(&body);
                    error = Some(if ahead_left > 0 {
                        PgError::Reset(db)
                    } else {
                        PgError::Db(db)
                    });
                }
                Message::ReadyForQuery(body) => {
                    self.status = body.status();
                    break;
                }
                _ => {
                    self.broken = true;
                    return Err(unexpected("a statement's preparation"));
                }
            }
        }
        self.in_flight = false;
        if let Some(error) = error {
            if matches!(error, PgError::Reset(_)) {
                self.broken = true;
            }
            return Err(error);
        }
        if ahead > 0 {
            self.dirty = false;
        }
        self.look_up_types(columns.iter().map(|(_, oid)| *oid))
            .await?;
        let prepared = Arc::new(Prepared {
            name,
            params: params.into_iter().map(|oid| self.type_of(oid)).collect(),
            columns: columns
                .into_iter()
                .map(|(name, oid)| Column {
                    name,
                    type_: self.type_of(oid),
                })
                .collect(),
        });
        if keep {
            self.statements.insert(key.to_owned(), prepared.clone());
            self.statement_order.push_back(key.to_owned());
        }
        Ok(prepared)
    }

    fn type_of(&self, oid: u32) -> Type {
        Type::from_oid(oid)
            .or_else(|| self.types.get(&oid).cloned())
            .unwrap_or_else(|| {
                Type::new(
                    format!("oid {oid}"),
                    oid,
                    Kind::Simple,
                    "pg_catalog".to_owned(),
                )
            })
    }

    /// Learns the names of types that are not built in (a column of an extension type
    /// such as citext, an enum or a domain).
    async fn look_up_types(&mut self, oids: impl Iterator<Item = u32>) -> Result<(), PgError> {
        let mut unknown: Vec<u32> = oids
            .filter(|oid| Type::from_oid(*oid).is_none() && !self.types.contains_key(oid))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        let list = unknown
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT t.oid, t.typname, n.nspname FROM pg_catalog.pg_type t \
             JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid IN ({list})"
        );
        let mut found = Vec::new();
        let rows = self.simple_rows(&sql).await?;
        for row in rows {
            if let [Some(oid), Some(name), Some(schema)] = row.as_slice()
                && let Ok(oid) = oid.parse::<u32>()
            {
                found.push(Type::new(name.clone(), oid, Kind::Simple, schema.clone()));
            }
        }
        for ty in found {
            self.types.insert(ty.oid(), ty);
        }
        Ok(())
    }

    /// Runs a simple query of the data plane's own and returns its rows as text.
    async fn simple_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        self.start()?;
        frontend::query(sql, &mut self.write).map_err(encode_error)?;
        let mut rows = Vec::new();
        let outcome = self
            .round_trip(0, false, &mut |row: &DataRowBody| {
                rows.push(text_row(row)?);
                Ok::<_, PgError>(())
            })
            .await?;
        match outcome.error {
            None => Ok(rows),
            Some(GroupError::Row(error)) => Err(error),
            Some(GroupError::Ahead(error) | GroupError::Statement(error)) => {
                Err(PgError::Db(error))
            }
        }
    }

    /// Forgets the prepared statements kept so far: the next statement run drops them on
    /// the server.
    pub fn forget_statements(&mut self) {
        self.reset_prepared = false;
        self.drops_statements = true;
        self.statements.clear();
        self.statement_order.clear();
    }

    /// Forgets one kept statement (the server no longer knows it).
    fn forget_statement(&mut self, prepared: &Prepared) {
        let key = self
            .statements
            .iter()
            .find(|(_, statement)| statement.name == prepared.name)
            .map(|(key, _)| key.clone());
        if let Some(key) = key {
            self.statements.remove(&key);
            self.statement_order.retain(|kept| *kept != key);
        }
    }

    /// Runs a prepared statement with `params` (in the types it was prepared with),
    /// passing its rows to `on_row`, and returns the rows it affected. The session reset
    /// (if due) and the statement timeout (if any) go out ahead of it in the same write.
    /// `last`: this is the request's last statement (the reset may follow it).
    pub async fn run<T: ToSql, E>(
        &mut self,
        prepared: &Prepared,
        params: impl ExactSizeIterator<Item = T>,
        timeout: Option<Duration>,
        last: Option<&ConnectionControls>,
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
        self.queue_reset_behind(last);
        if std::mem::take(&mut self.drops_statements) {
            // Prepared again (Close first) by the next reset.
            self.reset_prepared = false;
        }
        let outcome = self
            .round_trip(ahead, true, &mut on_row)
            .await
            .map_err(RunError::Postgres)?;
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
                    self.queue_reset();
                    RESET_STATEMENTS.len()
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
                    .map_err(RunError::Postgres)?;
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
            Some(GroupError::Ahead(error)) => {
                self.broken = true;
                Err(RunError::Postgres(PgError::Reset(error)))
            }
            Some(GroupError::Statement(error)) => {
                // 26000: the statement was dropped on the server (DEALLOCATE from a
                // function): prepare it again next time.
                if error.code == "26000" {
                    self.forget_statement(prepared);
                }
                Err(RunError::Postgres(PgError::Db(error)))
            }
        }
    }

    /// Whether other requests' statements may go out with this connection's next one
    /// (`run_pipelined`): the connection is idle and in its steady state, where every
    /// request's reset goes ahead of it (or the session reset is off).
    pub fn can_pipeline(&self) -> bool {
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
    pub async fn run_pipelined<E>(
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
            let _ = on(Piped::Done(from, Err(RunError::Postgres(first))));
            for n in from + 1..count {
                let _ = on(Piped::Done(n, Err(RunError::Postgres(PgError::Closed))));
            }
        }
        if let Err(error) = self.start() {
            lose(&mut on, 0, runs.len(), error);
            return;
        }
        self.write.clear();
        let mut aheads = Vec::with_capacity(runs.len());
        for (n, (_, bound)) in runs.iter().enumerate() {
            let mut ahead = if n == 0 {
                self.queue_reset_ahead().unwrap_or(0)
            } else if self.session_reset {
                self.queue_reset();
                RESET_STATEMENTS.len()
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
            aheads.push(ahead);
        }
        self.in_flight = true;
        if let Err(error) = self.flush().await {
            lose(&mut on, 0, runs.len(), error);
            return;
        }
        let mut reset_failed = false;
        for (n, ((prepared, _), ahead)) in runs.iter().zip(aheads).enumerate() {
            let outcome = match self
                .read_group(ahead, true, &mut |row: &DataRowBody| on(Piped::Row(n, row)))
                .await
            {
                Ok(outcome) => outcome,
                Err(error) => {
                    lose(&mut on, n, runs.len(), error);
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
                Some(GroupError::Ahead(error)) => {
                    reset_failed = true;
                    Err(RunError::Postgres(PgError::Reset(error)))
                }
                Some(GroupError::Statement(error)) => {
                    if error.code == "26000" {
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

    /// Queues `SET statement_timeout` for the request's deadline. Returns the statements
    /// queued (0 or 1).
    fn queue_timeout(&mut self, timeout: Option<Duration>) -> Result<usize, PgError> {
        let Some(timeout) = timeout else {
            return Ok(0);
        };
        // An int of milliseconds.
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
        self.queue_unnamed(&format!("SET statement_timeout = {millis}"))?;
        Ok(1)
    }

    /// Queues the reset behind the request's last statement where it cannot wait for
    /// the next request: the connection's first reset, which asks whether its role may
    /// take session-level advisory locks, and every reset of a role that may.
    fn queue_reset_behind(&mut self, last: Option<&ConnectionControls>) {
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
        let sql = if checked {
            SESSION_RESET_WITH_ADVISORY_LOCKS.to_owned()
        } else {
            format!("{SESSION_RESET_WITH_ADVISORY_LOCKS}; {CAN_TAKE_ADVISORY_LOCKS}")
        };
        // The query text has no NUL: this cannot fail.
        if frontend::query(&sql, &mut self.write).is_ok() {
            self.reset_behind = Some(!checked);
        }
    }

    /// Runs a simple query (Batch's BEGIN, COMMIT and ROLLBACK), with the session reset
    /// ahead of it if due. `last`: see `run`.
    pub async fn simple(
        &mut self,
        sql: &str,
        last: Option<&ConnectionControls>,
    ) -> Result<(), PgError> {
        self.start()?;
        self.write.clear();
        let (text, ahead) = if self.resets_ahead() {
            (format!("{SESSION_RESET}{sql}"), RESET_STATEMENTS.len())
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
            Some(GroupError::Ahead(error)) => {
                self.broken = true;
                Err(PgError::Reset(error))
            }
            Some(GroupError::Statement(error)) => Err(PgError::Db(error)),
        }
    }

    /// Collects the answer of the reset sent behind the request's statement, so that the
    /// connection can go straight back to its pool. The reset runs right after the
    /// statement on the server, so this is rarely a wait. Not the connection's first
    /// reset, whose advisory-lock question takes a fresh backend about 3 ms: a cold
    /// tenant's first request answers without it, and the pool's clean-up collects it.
    pub async fn finish_reset(&mut self, controls: &ConnectionControls) {
        if self.reset_behind == Some(false) && !self.broken {
            let done = self.collect_reset_behind(controls).await;
            if !done {
                self.broken = true;
            }
        }
    }

    /// Reads the answer of the reset sent behind the last statement. False: it failed.
    async fn collect_reset_behind(&mut self, controls: &ConnectionControls) -> bool {
        let Some(asks) = self.reset_behind.take() else {
            return true;
        };
        self.in_flight = true;
        let mut last_row = None;
        let outcome = self
            .read_group(0, false, &mut |row: &DataRowBody| {
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
            if let Some([Some(can_take)]) = last_row.as_deref() {
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

/// What `PgConnection::run_pipelined` reports about its `n`th statement.
pub enum Piped<'a, E> {
    /// One of its rows.
    Row(usize, &'a DataRowBody),
    /// It has ended (its answers are all read): the rows it affected, or its error.
    Done(usize, Result<u64, RunError<E>>),
}

/// A prepared statement bound to its parameters: the messages that run it, up to and
/// including its Sync (for `PgConnection::run` and `run_pipelined`).
pub struct Bound {
    messages: BytesMut,
    timeout: Option<Duration>,
}

impl Bound {
    /// Binds `params` (in the types `prepared` was prepared with). With a `timeout`, the
    /// statement timeout set ahead of the statement ends behind it: reset if the
    /// statement succeeded, rolled back with its transaction if it failed.
    pub fn new<T: ToSql>(
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

fn queue_unnamed(sql: &str, buf: &mut BytesMut) -> Result<(), PgError> {
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

/// A simple query's row (text format).
fn text_row(row: &DataRowBody) -> Result<Vec<Option<String>>, PgError> {
    let buffer = row.buffer();
    row.ranges()
        .map(|range| Ok(range.map(|range| String::from_utf8_lossy(&buffer[range]).into_owned())))
        .collect()
        .map_err(protocol)
}

/// The rows a command tag reports (`INSERT 0 5`, `UPDATE 3`, `SELECT 2`); 0 for others.
fn rows_affected(tag: &str) -> u64 {
    tag.rsplit(' ')
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
}

fn protocol(error: impl fmt::Display) -> PgError {
    PgError::Protocol(format!("cannot read the server's answer: {error}"))
}

fn unexpected(during: &str) -> PgError {
    PgError::Protocol(format!(
        "unexpected message from the server during {during}"
    ))
}

/// Cleans a connection that comes back from a request when it cannot go straight back
/// (`Backend::take_clean`): collects the reset sent behind its statement, or resets it
/// now. False: the connection is closed.
pub fn reset_session<'c>(
    connection: &'c mut PgConnection,
    controls: &'c ConnectionControls,
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

/// A new PostgreSQL tenant connection needs nothing before its first request: its
/// session reset finds out the rest (see `queue_reset_behind`).
pub fn postgres_connected(
    _connection: &mut PgConnection,
    _controls: Arc<ConnectionControls>,
) -> BoxFuture<'_, Result<(), ConnectError>> {
    Box::pin(std::future::ready(Ok(())))
}
