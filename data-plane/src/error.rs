//! The data plane's error type, its mapping from database errors (by SQLSTATE or SQLite
//! result code), and its one mapping to gRPC status codes.

use crate::connection_pool::{AcquireError, ConnectError};
use crate::postgres_connection::PgError;
use tonic::Status;

pub type Result<T, E = DataPlaneError> = std::result::Result<T, E>;

/// Every message is safe to show the caller: no credentials, no connection strings.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DataPlaneError> for Status {
    fn from(error: DataPlaneError) -> Self {
        match error {
            DataPlaneError::InvalidArgument(message) => Status::invalid_argument(message),
            DataPlaneError::NotFound(message) => Status::not_found(message),
            DataPlaneError::FailedPrecondition(message) => Status::failed_precondition(message),
            DataPlaneError::Unavailable(message) => Status::unavailable(message),
            DataPlaneError::DeadlineExceeded(message) => Status::deadline_exceeded(message),
            DataPlaneError::ResourceExhausted(message) => Status::resource_exhausted(message),
            DataPlaneError::Aborted(message) => Status::aborted(message),
            DataPlaneError::Internal(message) => {
                tracing::error!(%message, "internal error");
                Status::internal(message)
            }
        }
    }
}

/// SQLite primary result codes that are not the statement's fault.
const SQLITE_PERM: i32 = 3;
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_NOMEM: i32 = 7;
const SQLITE_READONLY: i32 = 8;
const SQLITE_INTERRUPT: i32 = 9;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_PROTOCOL: i32 = 15;
const SQLITE_AUTH: i32 = 23;
const SQLITE_NOTADB: i32 = 26;

/// Maps a failure to get a connection for a tenant. All are UNAVAILABLE: the request
/// did not reach the database and may be retried.
pub fn from_acquire(error: AcquireError, tenant: &str) -> DataPlaneError {
    match error {
        AcquireError::Closed => DataPlaneError::Unavailable(format!(
            "the connection pool of tenant {tenant} was closed (its route changed or the data plane is stopping); retry"
        )),
        AcquireError::TenantLimit {
            max_connections,
            waited,
        } => DataPlaneError::Unavailable(format!(
            "tenant {tenant} already uses all of its {max_connections} connections and none came back within {} ms; \
             retry later, send fewer concurrent requests, or raise the tenant's max_connections",
            waited.as_millis()
        )),
        AcquireError::Budget {
            server,
            budget,
            waited,
        } => DataPlaneError::Unavailable(format!(
            "the connection budget of database server {server} ({budget} connections, shared by its tenants) \
             stayed in use for {} ms; retry later, or raise postgres_connection_budget",
            waited.as_millis()
        )),
        AcquireError::ConnectTimeout { waited, connecting } => {
            DataPlaneError::Unavailable(format!(
                "the database of tenant {tenant} did not accept a connection within {} ms \
             ({} ms waited in all, pool_acquire_timeout_ms); its server may be down or overloaded",
                connecting.as_millis(),
                waited.as_millis()
            ))
        }
        AcquireError::Connect(ConnectError::Postgres(error)) => from_postgres(error, tenant),
        AcquireError::Connect(ConnectError::Sqlite(error)) => from_sqlite(error, tenant),
        AcquireError::Connect(ConnectError::WorkerPanicked) => DataPlaneError::Internal(format!(
            "opening a connection to the database of tenant {tenant} failed inside the data plane"
        )),
    }
}

/// Maps an error from a SQLite tenant database (the data plane's own SQLite
/// connections; see `sqlite_connection`).
pub fn from_sqlite(error: rusqlite::Error, tenant: &str) -> DataPlaneError {
    match error {
        rusqlite::Error::SqliteFailure(failure, message) => {
            let message = message.unwrap_or_else(|| failure.to_string());
            from_sqlite_code(failure.extended_code, &message, tenant)
        }
        rusqlite::Error::InvalidParameterCount(given, expected) => {
            crate::sql::parameter_count_error(expected, given)
        }
        rusqlite::Error::Utf8Error(_) | rusqlite::Error::NulError(_) => {
            DataPlaneError::InvalidArgument(format!(
                "the statement cannot be passed to SQLite: {error}"
            ))
        }
        other => {
            tracing::error!(tenant.id = %tenant, error = %other, "unexpected SQLite error");
            DataPlaneError::Internal(format!("unexpected database error for tenant {tenant}"))
        }
    }
}

/// Maps an error from a PostgreSQL tenant database (the data plane's own connections;
/// see `postgres_connection`).
pub fn from_postgres(error: PgError, tenant: &str) -> DataPlaneError {
    match error {
        PgError::Db(db) => from_sqlstate(&db.code, &db.message, db.detail.as_deref(), tenant),
        PgError::Parameter(message) | PgError::Unsupported(message) => {
            DataPlaneError::InvalidArgument(message)
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
        PgError::Io(_) | PgError::Protocol(_) => {
            tracing::warn!(tenant.id = %tenant, %error, "tenant database unreachable");
            DataPlaneError::Unavailable(format!("the database of tenant {tenant} is unreachable"))
        }
    }
}

fn from_sqlstate(code: &str, message: &str, detail: Option<&str>, tenant: &str) -> DataPlaneError {
    let class = code.get(..2).unwrap_or("");
    let full = match detail {
        Some(detail) => format!("SQLSTATE {code}: {message} ({detail})"),
        None => format!("SQLSTATE {code}: {message}"),
    };
    match (class, code) {
        (_, "57014") => DataPlaneError::DeadlineExceeded(format!(
            "the statement was cancelled at the request's deadline ({full})"
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

fn from_sqlite_code(extended: i32, message: &str, tenant: &str) -> DataPlaneError {
    let primary = extended & 0xff;
    let full = format!("SQLite error {extended}: {message}");
    match primary {
        SQLITE_INTERRUPT => DataPlaneError::DeadlineExceeded(format!(
            "the statement was interrupted at the request's deadline ({full})"
        )),
        SQLITE_AUTH => DataPlaneError::InvalidArgument(format!(
            "{full}: statements on a tenant database may not ATTACH or DETACH databases, \
             load extensions, change PRAGMA settings, create temporary objects or control \
             transactions (Batch runs its statements in one transaction)"
        )),
        SQLITE_BUSY | SQLITE_LOCKED => DataPlaneError::Unavailable(format!(
            "the database of tenant {tenant} is busy; retry ({full})"
        )),
        // The file or the machine, not the statement.
        SQLITE_PERM | SQLITE_NOMEM | SQLITE_READONLY | SQLITE_IOERR | SQLITE_CORRUPT
        | SQLITE_FULL | SQLITE_CANTOPEN | SQLITE_PROTOCOL | SQLITE_NOTADB => {
            tracing::warn!(tenant.id = %tenant, code = extended, "tenant database unavailable");
            DataPlaneError::Unavailable(format!(
                "the database of tenant {tenant} is unavailable ({full})"
            ))
        }
        _ => DataPlaneError::InvalidArgument(full),
    }
}
