//! Errors of the PostgreSQL wire client (`PgError`: what the server said, or why the
//! connection failed), and their one mapping into the data plane's error model, by
//! SQLSTATE class (`from_postgres`).

use std::fmt;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorResponseBody;
use tenantry_shared::TenantId;

use crate::error::DataPlaneError;

/// An error the server reported.
#[derive(Debug)]
pub(crate) struct DbError {
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
}

impl DbError {
    pub(super) fn parse(body: &ErrorResponseBody) -> Self {
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

impl DbError {
    /// The error says the connection's prepared statement no longer fits the server:
    /// dropped (26000: DEALLOCATE from a function), or its result type changed with the
    /// schema (0A000 "cached plan must not change result type", after an ALTER TABLE).
    /// Nothing ran; the statement is prepared again.
    pub(crate) fn means_stale_statement(&self) -> bool {
        self.code == "26000"
            || (self.code == "0A000"
                && self
                    .message
                    .contains("cached plan must not change result type"))
    }
}

#[derive(Debug)]
pub(crate) enum PgError {
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
    /// TLS could not be set up as the server's `sslmode` demands.
    Tls(String),
    /// A message of the server's answer declared more bytes than the connection reads
    /// (`PgConnectOptions::max_message_bytes`); its body was not read.
    TooLarge {
        declared: usize,
        limit: usize,
    },
    /// The connection broke (the cause) after the statement was sent and before its
    /// answer was read: it may have run, and committed.
    OutcomeUnknown(Box<PgError>),
}

impl PgError {
    /// This error, met after a statement was sent: a broken connection there leaves the
    /// statement's outcome unknown.
    pub(super) fn after_sending(self) -> Self {
        match self {
            Self::Closed | Self::Io(_) | Self::Protocol(_) => Self::OutcomeUnknown(Box::new(self)),
            other => other,
        }
    }
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
            Self::Protocol(message)
            | Self::Unsupported(message)
            | Self::Parameter(message)
            | Self::Tls(message) => f.write_str(message),
            Self::OutcomeUnknown(cause) => write!(f, "outcome unknown: {cause}"),
            Self::TooLarge { declared, limit } => write!(
                f,
                "a message of {declared} bytes from the server, over the limit of {limit}"
            ),
        }
    }
}

impl std::error::Error for PgError {}

/// A statement's error, or the error of the caller's row handler.
pub(crate) enum RunError<E> {
    Postgres(PgError),
    Row(E),
}

pub(super) fn encode_error(error: std::io::Error) -> PgError {
    PgError::Parameter(format!("cannot encode a message: {error}"))
}

pub(super) fn protocol(error: impl fmt::Display) -> PgError {
    PgError::Protocol(format!("cannot read the server's answer: {error}"))
}

pub(super) fn unexpected(during: &str) -> PgError {
    PgError::Protocol(format!(
        "unexpected message from the server during {during}"
    ))
}

/// Maps an error from a PostgreSQL tenant database (the data plane's own connections;
/// see `backend::postgres`).
pub(crate) fn from_postgres(error: PgError, tenant: &TenantId) -> DataPlaneError {
    match error {
        PgError::Db(db) => from_sqlstate(&db.code, &db.message, db.detail.as_deref(), tenant),
        PgError::Parameter(message) | PgError::Unsupported(message) => {
            DataPlaneError::InvalidArgument(message)
        }
        PgError::TooLarge { declared, limit } => DataPlaneError::ResourceExhausted(format!(
            "one value (or row) of the result is {declared} bytes, larger than the response \
             limit of {} bytes (max_response_bytes); the statement was stopped. Select less of \
             it (substr, length) or raise max_response_bytes",
            limit.saturating_sub(crate::backend::answer::VALUE_MARGIN)
        )),
        PgError::OutcomeUnknown(cause) => {
            tracing::warn!(tenant.id = %tenant, %cause,
                "tenant database connection broke after a statement was sent");
            outcome_unknown(tenant, &cause.to_string())
        }
        PgError::Closed => {
            tracing::warn!(tenant.id = %tenant, "tenant database connection closed");
            DataPlaneError::Unavailable(format!(
                "the connection to the database of tenant {tenant} closed; retry"
            ))
        }
        PgError::Reset(db) => {
            tracing::warn!(tenant.id = %tenant, sqlstate = %db.code, message = %db.message,
                "tenant connection's session reset failed");
            DataPlaneError::Unavailable(format!(
                "the session reset of a connection to the database of tenant {tenant} failed \
                 (SQLSTATE {}: {}); the statement did not run; retry",
                db.code, db.message
            ))
        }
        // The connection or the protocol (I/O, unexpected messages, authentication the
        // client cannot do): not the statement's fault.
        PgError::Tls(message) => {
            tracing::warn!(tenant.id = %tenant, %message, "TLS to the tenant database failed");
            DataPlaneError::Unavailable(format!(
                "the database of tenant {tenant} is unreachable: {message}"
            ))
        }
        PgError::Io(_) | PgError::Protocol(_) => {
            tracing::warn!(tenant.id = %tenant, %error, "tenant database unreachable");
            DataPlaneError::Unavailable(format!("the database of tenant {tenant} is unreachable"))
        }
    }
}

/// The answer to a statement whose connection broke after it was sent.
pub(super) fn outcome_unknown(tenant: &TenantId, cause: &str) -> DataPlaneError {
    DataPlaneError::OutcomeUnknown(format!(
        "outcome unknown: the connection to the database of tenant {tenant} broke after the \
         statement was sent ({cause}); it may have run and committed. Check whether its \
         effect is there before sending it again"
    ))
}

fn from_sqlstate(
    code: &str,
    message: &str,
    detail: Option<&str>,
    tenant: &TenantId,
) -> DataPlaneError {
    let class = code.get(..2).unwrap_or("");
    let full = match detail {
        Some(detail) => format!("SQLSTATE {code}: {message} ({detail})"),
        None => format!("SQLSTATE {code}: {message}"),
    };
    match (class, code) {
        (_, "57014") => DataPlaneError::DeadlineExceeded(format!(
            "the statement was cancelled at its deadline (the request's grpc-timeout, or the \
             data plane's default_statement_timeout_ms for a request without one) ({full})"
        )),
        (_, "40001") | (_, "40P01") => DataPlaneError::Aborted(full),
        (_, "42501") if message.contains("advisory_lock") => {
            DataPlaneError::InvalidArgument(format!(
                "{full}; session-level advisory locks are not available to tenants (a \
                 connection serves one request after another): take \
                 pg_advisory_xact_lock() inside a Batch, which holds it until the Batch ends"
            ))
        }
        // connection exceptions, insufficient resources, operator intervention, auth,
        // database missing: not the statement's fault.
        ("08", _) | ("53", _) | ("57", _) | ("28", _) | ("3D", _) | ("58", _) | ("XX", _) => {
            tracing::warn!(tenant.id = %tenant, sqlstate = code, "tenant database unavailable");
            DataPlaneError::Unavailable(format!(
                "the database of tenant {tenant} is unavailable ({full})"
            ))
        }
        _ => DataPlaneError::InvalidArgument(full),
    }
}
