//! Errors of SQLite tenant connections, and their one mapping into the data plane's error
//! model by SQLite result code (the codes from `libsqlite3-sys`).

use libsqlite3_sys as ffi;
use tenantry_shared::TenantId;

use crate::backend::answer::parameter_count_error;
use crate::error::DataPlaneError;

/// Why a SQLite connection could not be opened or set up.
#[derive(Debug)]
pub(crate) enum SqliteConnectError {
    Sqlite(rusqlite::Error),
    /// The blocking task opening or setting up the connection panicked.
    WorkerPanicked,
}

impl From<rusqlite::Error> for SqliteConnectError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sqlite(error)
    }
}

/// Maps a failure to open a tenant's SQLite connection.
pub(crate) fn from_connect(error: SqliteConnectError, tenant: &TenantId) -> DataPlaneError {
    match error {
        SqliteConnectError::Sqlite(error) => from_sqlite(error, tenant),
        SqliteConnectError::WorkerPanicked => DataPlaneError::Internal(format!(
            "opening a connection to the database of tenant {tenant} failed inside the data plane"
        )),
    }
}

/// Maps an error from a SQLite tenant database (the data plane's own SQLite
/// connections; see `backend::sqlite::connection`).
pub(crate) fn from_sqlite(error: rusqlite::Error, tenant: &TenantId) -> DataPlaneError {
    match error {
        rusqlite::Error::SqliteFailure(failure, message) => {
            let message = message.unwrap_or_else(|| failure.to_string());
            from_sqlite_code(failure.extended_code, &message, tenant)
        }
        rusqlite::Error::InvalidParameterCount(given, expected) => {
            parameter_count_error(expected, given)
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

fn from_sqlite_code(extended: i32, message: &str, tenant: &TenantId) -> DataPlaneError {
    let primary = extended & 0xff;
    let full = format!("SQLite error {extended}: {message}");
    match primary {
        ffi::SQLITE_INTERRUPT => DataPlaneError::DeadlineExceeded(format!(
            "the statement was interrupted at the request's deadline ({full})"
        )),
        ffi::SQLITE_AUTH => DataPlaneError::InvalidArgument(format!(
            "{full}: statements on a tenant database may not ATTACH or DETACH databases, \
             load extensions, change PRAGMA settings, create temporary objects or control \
             transactions (Batch runs its statements in one transaction)"
        )),
        ffi::SQLITE_TOOBIG => DataPlaneError::ResourceExhausted(format!(
            "a value the statement reads or makes is larger than the data plane's limit \
             (max_response_bytes, plus 64 KiB); read it in parts (substr) or raise \
             max_response_bytes ({full})"
        )),
        ffi::SQLITE_BUSY | ffi::SQLITE_LOCKED => DataPlaneError::Unavailable(format!(
            "the database of tenant {tenant} is busy; retry ({full})"
        )),
        // The file or the machine, not the statement.
        ffi::SQLITE_PERM
        | ffi::SQLITE_NOMEM
        | ffi::SQLITE_READONLY
        | ffi::SQLITE_IOERR
        | ffi::SQLITE_CORRUPT
        | ffi::SQLITE_FULL
        | ffi::SQLITE_CANTOPEN
        | ffi::SQLITE_PROTOCOL
        | ffi::SQLITE_NOTADB => {
            tracing::warn!(tenant.id = %tenant, code = extended, "tenant database unavailable");
            DataPlaneError::Unavailable(format!(
                "the database of tenant {tenant} is unavailable ({full})"
            ))
        }
        _ => DataPlaneError::InvalidArgument(full),
    }
}
