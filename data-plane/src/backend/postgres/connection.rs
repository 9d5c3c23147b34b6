//! A PostgreSQL tenant connection: a small client of PostgreSQL's wire protocol
//! (messages from `postgres-protocol`, values from `postgres-types`). The request that
//! holds a connection drives it: a call writes all of its messages in one write and
//! reads the answers in the request's own task, with no channel or task in between.
//!
//! This file owns the connection itself: opening it, its protocol I/O (writing what is
//! queued, reading and grouping the server's messages), and the idle check. What a
//! connection does lives beside it: `auth`, `statements` (the statement cache), `reset`
//! (the session reset), `run` and `pipeline` (running statements).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use futures::future::BoxFuture;
use postgres_protocol::message::backend::{DataRowBody, Message};
use postgres_protocol::message::frontend;
use postgres_types::Type;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::{DbError, PgError, encode_error, protocol, unexpected};
use super::reset::{PgControls, queue_unnamed};
use super::statements::Prepared;
use super::tls::{PgStream, TlsConfigs};
use super::waiting::Job;
use crate::pool::{Backend, WaitQueue};
use crate::routing::SslMode;

/// How long closing an idle connection waits for the server to end its backend.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long closing a connection whose statement was abandoned waits for the cancelled
/// statement (and whatever else was sent) to end and the backend to go; past it the
/// socket is dropped.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(10);

/// How long reading the rest of an answer stopped at the response limit may take, once
/// its statement is cancelled, before the connection is closed instead.
const STOPPED_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long sending a CancelRequest may take (connect, write, the server's close).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// PostgreSQL tenant connections for `connection_pool`.
pub(crate) struct PgBackend;

#[derive(Clone)]
pub(crate) struct PgConnectOptions {
    host: String,
    port: u16,
    database: String,
    pub(super) user: String,
    pub(super) password: String,
    /// Reset every connection between requests (`DataPlaneConfig::postgres_session_reset`).
    pub(crate) session_reset: bool,
    /// Requests waiting for a connection go out together
    /// (`DataPlaneConfig::postgres_pipelining`).
    pub(crate) pipelining: bool,
    /// Largest server message read: a message that declares more is refused before its
    /// body is read (`PgError::TooLarge`).
    pub(crate) max_message_bytes: usize,
    /// TLS as the server was registered with (`sslmode` of its admin URL).
    pub(crate) ssl_mode: SslMode,
    /// The data plane's TLS configurations (None: TLS could not be set up).
    pub(crate) tls: Option<Arc<TlsConfigs>>,
    /// The tenant's database has code (a function or procedure) that may PREPARE: every
    /// session reset of the pool's connections removes SQL-prepared statements. Shared
    /// by the pool's connections, set by any of them.
    pub(super) code_prepares: Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for PgConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnectOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

impl PgConnectOptions {
    pub(crate) fn new(
        host: &str,
        port: u16,
        database: &str,
        username: &str,
        password: &str,
    ) -> Self {
        Self {
            host: host.to_owned(),
            port,
            database: database.to_owned(),
            user: username.to_owned(),
            password: password.to_owned(),
            session_reset: true,
            pipelining: true,
            max_message_bytes: 4 * 1024 * 1024,
            ssl_mode: SslMode::Disable,
            tls: None,
            code_prepares: Arc::default(),
        }
    }
}

/// What cancels the statement a connection's backend runs (from its BackendKeyData):
/// a CancelRequest on a new connection to the same server address.
#[derive(Clone, Copy)]
pub(super) struct CancelKey {
    address: std::net::SocketAddr,
    process_id: i32,
    secret_key: i32,
}

impl CancelKey {
    /// Asks the server to cancel what the backend runs now. Best effort, as in libpq: the
    /// server answers nothing, and a backend that is idle by then ignores it.
    pub(super) async fn cancel(self) {
        let mut message = BytesMut::with_capacity(16);
        frontend::cancel_request(self.process_id, self.secret_key, &mut message);
        let sent = tokio::time::timeout(CANCEL_TIMEOUT, async {
            let mut socket = TcpStream::connect(self.address).await?;
            socket.write_all(&message).await?;
            // The server closes the connection once it has read the request.
            let mut rest = [0u8; 64];
            while socket.read(&mut rest).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
        match sent {
            Ok(Ok(())) => tracing::debug!(pid = self.process_id, "cancel request sent"),
            Ok(Err(error)) => tracing::warn!(%error, "a cancel request could not be sent"),
            Err(_) => tracing::warn!("a cancel request timed out"),
        }
    }
}

pub(crate) struct PgConnection {
    pub(super) socket: PgStream,
    /// Cancels the backend's running statement (None until the server sent its key).
    pub(super) cancel: Option<CancelKey>,
    /// `PgConnectOptions::max_message_bytes`.
    max_message: usize,
    /// The session may hold statements the tenant prepared by SQL: the next reset
    /// removes them.
    pub(super) sql_prepared: bool,
    /// `PgConnectOptions::code_prepares`.
    pub(super) code_prepares: Arc<std::sync::atomic::AtomicBool>,
    /// The reset's clean-up of SQL-prepared statements is prepared on the server.
    pub(super) cleanup_prepared: bool,
    /// Part of this connection's statement names, drawn at random, so that a tenant
    /// cannot name one of them ahead of time.
    pub(super) statement_prefix: u32,
    pub(super) read: BytesMut,
    pub(super) write: BytesMut,
    /// A call's messages are out and its answers not all read. A connection left so (its
    /// call was dropped half-way) is closed, never used again.
    pub(super) in_flight: bool,
    /// The connection broke or the server closed it.
    pub(super) broken: bool,
    pub(super) session_reset: bool,
    /// The session has run something since it was last reset.
    pub(super) dirty: bool,
    /// The transaction status of the last ReadyForQuery (`I`dle, in a `T`ransaction,
    /// `E`rror in a transaction).
    pub(super) status: u8,
    /// A reset was sent behind the last statement and is not answered yet (true: it
    /// also asks whether the role may take advisory locks).
    pub(super) reset_behind: Option<bool>,
    /// The role cannot take session-level advisory locks (known from the connection's
    /// first reset): its connections are reset ahead of their next request.
    pub(super) reset_ahead: bool,
    /// `RESET_STATEMENTS` are prepared on the server (under `RESET_NAMES`).
    pub(super) reset_prepared: bool,
    /// The next statement run drops the connection's prepared statements (DEALLOCATE,
    /// DISCARD ALL), the reset's among them.
    pub(super) drops_statements: bool,
    pub(super) statements: HashMap<String, Arc<Prepared>>,
    /// Cache keys, oldest first.
    pub(super) statement_order: VecDeque<String>,
    /// Bytes of the keys in `statements` (`statements::STATEMENT_CACHE_BYTES`).
    pub(super) statement_bytes: usize,
    pub(super) next_statement: u64,
    /// Names of types that are not built in (extensions, enums, domains), by OID.
    pub(super) types: HashMap<u32, Type>,
}

impl Backend for PgBackend {
    type Connection = PgConnection;
    type ConnectOptions = PgConnectOptions;
    type Shared = WaitQueue<Job>;
    type Controls = PgControls;
    type Error = PgError;

    fn connect(options: &Self::ConnectOptions) -> BoxFuture<'_, Result<Self::Connection, PgError>> {
        Box::pin(PgConnection::connect(options))
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

    /// Closes the connection and returns once its backend is gone, so that the pool
    /// frees the connection's slots (the tenant's count, the server budget's) only then.
    /// A connection whose request was abandoned in flight (deadline, client gone, a
    /// response over its limit, shutdown) first has its statement cancelled; whatever the
    /// server still sends is read and dropped, never kept, until it closes the socket
    /// after the Terminate (a backend leaves `pg_stat_activity` before it closes its
    /// socket).
    fn close(mut connection: Self::Connection) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let abandoned = connection.in_flight || connection.reset_behind.is_some();
            if connection.in_flight
                && let Some(key) = connection.cancel
            {
                key.cancel().await;
            }
            if connection.broken {
                // The socket is gone: a cancelled backend ends when it next writes to it.
                return;
            }
            let mut goodbye = BytesMut::new();
            frontend::terminate(&mut goodbye);
            let bound = if abandoned {
                ABANDON_TIMEOUT
            } else {
                CLOSE_TIMEOUT
            };
            let gone = tokio::time::timeout(bound, async {
                connection.socket.write_all(&goodbye).await?;
                connection.socket.flush().await?;
                let mut sink = vec![0u8; 16 * 1024];
                while connection.socket.read(&mut sink).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await;
            if gone.is_err() && abandoned {
                tracing::warn!(
                    "a connection whose statement was cancelled did not end within {} s; \
                     dropping it",
                    bound.as_secs()
                );
            }
        })
    }
}

/// What a group of messages (up to one Sync) came back with.
pub(super) struct Outcome<E> {
    pub(super) rows_affected: u64,
    pub(super) error: Option<GroupError<E>>,
    /// Reading stopped at the error, before the group's end: the connection stays in
    /// flight, to be cancelled and closed (`PgBackend::close`).
    pub(super) stopped: bool,
}

pub(super) enum GroupError<E> {
    /// One of the statements sent ahead of the request's own failed.
    Ahead(DbError),
    Statement(DbError),
    Row(E),
    /// A message of the answer was larger than the connection reads (skipped unread).
    TooLarge {
        declared: usize,
        limit: usize,
    },
}

impl PgConnection {
    pub(super) async fn connect(options: &PgConnectOptions) -> Result<Self, PgError> {
        if options.host.starts_with('/') {
            return Err(PgError::Protocol(format!(
                "the database server's host {:?} is a Unix socket directory; data planes reach \
                 PostgreSQL over TCP: register the server with a host name or address",
                options.host
            )));
        }
        let tcp = TcpStream::connect((options.host.as_str(), options.port))
            .await
            .map_err(PgError::Io)?;
        tcp.set_nodelay(true).map_err(PgError::Io)?;
        let address = tcp.peer_addr().map_err(PgError::Io)?;
        let socket = match &options.tls {
            Some(configs) => PgStream::open(tcp, &options.host, options.ssl_mode, configs).await?,
            None if options.ssl_mode == SslMode::Disable => PgStream::Plain(tcp),
            None => {
                return Err(PgError::Tls(format!(
                    "sslmode={} needs TLS, which this data plane could not set up (see its \
                     start-up log)",
                    options.ssl_mode.as_str()
                )));
            }
        };
        let mut connection = PgConnection {
            socket,
            cancel: None,
            max_message: options.max_message_bytes,
            sql_prepared: false,
            code_prepares: options.code_prepares.clone(),
            cleanup_prepared: false,
            statement_prefix: rand::random(),
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
            statement_bytes: 0,
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
                Message::BackendKeyData(body) => {
                    connection.cancel = Some(CancelKey {
                        address,
                        process_id: body.process_id(),
                        secret_key: body.secret_key(),
                    });
                }
                Message::ReadyForQuery(body) => {
                    connection.status = body.status();
                    return Ok(connection);
                }
                Message::ErrorResponse(body) => return Err(PgError::Db(DbError::parse(&body))),
                _ => return Err(unexpected("connection start")),
            }
        }
    }

    /// Bytes the read buffer holds room for (what reading an answer has taken).
    #[cfg(test)]
    pub(super) fn read_capacity(&self) -> usize {
        self.read.capacity()
    }

    pub(super) fn is_broken(&self) -> bool {
        self.broken
    }

    pub(super) fn usable(&self) -> bool {
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
    pub(super) fn check_idle(&mut self) -> bool {
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
            if self.socket.is_tls() {
                // TLS records cannot be taken out of the socket beside rustls: look without
                // reading. Anything there (the server's goodbye, end of stream) closes it.
                let mut peek = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                return match socket2::SockRef::from(self.socket.tcp()).peek(&mut peek) {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => true,
                    _ => {
                        tracing::info!(
                            "an idle TLS connection got data or was closed by the server; \
                             the request gets another"
                        );
                        self.broken = true;
                        false
                    }
                };
            }
            // The socket is non-blocking (tokio's): an empty one answers WouldBlock at once.
            match std::io::Read::read(&mut &*socket2::SockRef::from(self.socket.tcp()), &mut chunk)
            {
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
    pub(super) async fn flush(&mut self) -> Result<(), PgError> {
        let mut written = self.socket.write_all(&self.write).await;
        if written.is_ok() && self.socket.is_tls() {
            written = self.socket.flush().await;
        }
        self.write.clear();
        written.map_err(|error| {
            self.broken = true;
            PgError::Io(error)
        })
    }

    /// The next whole message in the read buffer, skipping those the server may send at
    /// any time (notices, parameter changes, notifications).
    pub(super) fn buffered_message(&mut self) -> Result<Option<Message>, PgError> {
        loop {
            // A message's length is checked before its body is read (`parse` would make
            // room for all of it).
            if let Some(&[_, a, b, c, d]) = self.read.get(..5) {
                let declared = u32::from_be_bytes([a, b, c, d]) as usize + 1;
                if declared > self.max_message {
                    return Err(PgError::TooLarge {
                        declared,
                        limit: self.max_message,
                    });
                }
            }
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
    pub(super) async fn next_message(&mut self) -> Result<Message, PgError> {
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
    pub(super) fn start(&self) -> Result<(), PgError> {
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

    /// Queues one statement with no parameters and no result, as the unnamed statement.
    pub(super) fn queue_unnamed(&mut self, sql: &str) -> Result<(), PgError> {
        queue_unnamed(sql, &mut self.write)
    }

    /// After reading stopped at a refused row (`Outcome::stopped`: the response limit):
    /// cancels the statement and reads the rest of its group, dropping it, up to its
    /// ReadyForQuery, so that the connection is clean again and the answer can say
    /// whether the statement had completed (a write that committed before the cancel
    /// arrived: `Some(true)`) or was cancelled (`Some(false)`). None: that could not be
    /// found out in time; the connection stays in flight and is closed.
    pub(super) async fn finish_stopped(&mut self) -> Option<bool> {
        if let Some(key) = self.cancel {
            key.cancel().await;
        }
        let finished = tokio::time::timeout(STOPPED_DRAIN_TIMEOUT, async {
            // The statement's end comes first: its CommandComplete, or the error that
            // cancelled it (after which the server skips to the Sync).
            let mut completed = None;
            loop {
                match self.next_message().await {
                    Ok(Message::CommandComplete(_)) => {
                        completed.get_or_insert(true);
                    }
                    Ok(Message::ErrorResponse(_)) => {
                        completed.get_or_insert(false);
                    }
                    Ok(Message::ReadyForQuery(body)) => {
                        self.status = body.status();
                        return completed;
                    }
                    Ok(_) => {}
                    Err(PgError::TooLarge { declared, .. }) => self.skip(declared).await.ok()?,
                    Err(_) => return None,
                }
            }
        })
        .await
        .ok()
        .flatten();
        if finished.is_some() {
            self.in_flight = false;
        }
        finished
    }

    /// Drops the next `count` bytes of the server's answer (a message too large to
    /// keep) without holding them: what is buffered, then the socket's, a chunk at a time.
    async fn skip(&mut self, count: usize) -> Result<(), PgError> {
        let buffered = self.read.len().min(count);
        bytes::Buf::advance(&mut self.read, buffered);
        let mut left = count - buffered;
        let mut sink = [0u8; 8192];
        while left > 0 {
            let want = left.min(sink.len());
            match self.socket.read(&mut sink[..want]).await {
                Ok(0) => {
                    self.broken = true;
                    return Err(PgError::Closed);
                }
                Ok(read) => left -= read,
                Err(error) => {
                    self.broken = true;
                    return Err(PgError::Io(error));
                }
            }
        }
        Ok(())
    }

    /// Reads a group's answers up to its ReadyForQuery. The first `ahead` completions
    /// answer statements sent ahead of the request's own; then come its rows (for
    /// `on_row`) and its completion.
    ///
    /// `Reading::Alone`: nothing else's answers follow on the connection, so at the first
    /// row `on_row` refuses (a response over its limit) or the first message too large
    /// to read, reading stops there (`Outcome::stopped`, or `PgError::TooLarge`); the
    /// connection is then closed, its statement cancelled. `Reading::Shared`: other
    /// requests' answers follow, so the rest of the group is read (a message too large is
    /// dropped unread, `GroupError::TooLarge`) and nothing is cancelled.
    pub(super) async fn read_group<E>(
        &mut self,
        mut ahead: usize,
        only_first: bool,
        reading: Reading,
        on_row: &mut impl FnMut(&DataRowBody) -> Result<(), E>,
    ) -> Result<Outcome<E>, PgError> {
        let mut outcome = Outcome {
            rows_affected: 0,
            error: None,
            stopped: false,
        };
        // With `only_first`, the request's statement is the first after those ahead; what
        // follows it (the end of its statement timeout) has no rows and no count to give.
        let mut done = false;
        loop {
            let message = match self.next_message().await {
                Ok(message) => message,
                Err(PgError::TooLarge { declared, limit }) if reading == Reading::Shared => {
                    self.skip(declared).await?;
                    if outcome.error.is_none() {
                        outcome.error = Some(GroupError::TooLarge { declared, limit });
                    }
                    continue;
                }
                // The server reported an error and then closed the connection (a FATAL
                // error: the backend was terminated, the server shuts down): the
                // statement failed, its transaction with it; that is its answer.
                Err(PgError::Closed | PgError::Io(_))
                    if matches!(
                        outcome.error,
                        Some(GroupError::Statement(_) | GroupError::Ahead(_))
                    ) =>
                {
                    self.broken = true;
                    return Ok(outcome);
                }
                Err(error) => return Err(error),
            };
            match message {
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
                        if reading == Reading::Alone {
                            outcome.stopped = true;
                            return Ok(outcome);
                        }
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
    pub(super) async fn round_trip<E>(
        &mut self,
        ahead: usize,
        only_first: bool,
        on_row: &mut impl FnMut(&DataRowBody) -> Result<(), E>,
    ) -> Result<Outcome<E>, PgError> {
        self.in_flight = true;
        self.flush().await?;
        let outcome = self
            .read_group(ahead, only_first, Reading::Alone, on_row)
            .await?;
        self.in_flight = outcome.stopped;
        Ok(outcome)
    }
}

/// Whether other answers follow a group's on the connection (see `read_group`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reading {
    Alone,
    Shared,
}

/// A simple query's row (text format).
pub(super) fn text_row(row: &DataRowBody) -> Result<Vec<Option<String>>, PgError> {
    let buffer = row.buffer();
    row.ranges()
        .map(|range| Ok(range.map(|range| String::from_utf8_lossy(&buffer[range]).into_owned())))
        .collect()
        .map_err(protocol)
}

/// The rows a command tag reports (`INSERT 0 5`, `UPDATE 3`, `SELECT 2`); 0 for others.
pub(super) fn rows_affected(tag: &str) -> u64 {
    tag.rsplit(' ')
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
}

/// A new PostgreSQL tenant connection needs nothing before its first request: its
/// session reset finds out the rest (see `queue_reset_behind`).
pub(crate) fn postgres_connected(
    _connection: &mut PgConnection,
    _controls: Arc<PgControls>,
) -> BoxFuture<'_, Result<(), PgError>> {
    Box::pin(std::future::ready(Ok(())))
}
