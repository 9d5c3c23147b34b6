//! Registry database errors, read in one place: by SQLSTATE on PostgreSQL and by
//! extended result code on SQLite, next to the queries that raise them.
//!
//! A unique violation means "that id or name is taken" and the registry's inserts turn
//! it into their `Ok(None)`; every other database error is the registry failing, which
//! callers see as INTERNAL (the log has the error, the caller a generic message).

use sea_orm::{DbErr, RuntimeErr};

use crate::error::ControlPlaneError;

/// PostgreSQL `unique_violation`.
const PG_UNIQUE_VIOLATION: &str = "23505";
/// SQLite `SQLITE_CONSTRAINT_UNIQUE`.
const SQLITE_CONSTRAINT_UNIQUE: &str = "2067";
/// SQLite `SQLITE_CONSTRAINT_PRIMARYKEY`.
const SQLITE_CONSTRAINT_PRIMARYKEY: &str = "1555";

/// What a failed registry query means to its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DbFailure {
    /// The row's key is taken: a concurrent insert of the same id or name won.
    UniqueViolation,
    /// Anything else: the registry failed.
    Other,
}

/// The database's own error code: SQLSTATE (PostgreSQL) or extended result code (SQLite).
fn database_code(error: &DbErr) -> Option<String> {
    let (DbErr::Exec(RuntimeErr::SqlxError(error)) | DbErr::Query(RuntimeErr::SqlxError(error))) =
        error
    else {
        return None;
    };
    match &**error {
        sea_orm::sqlx::Error::Database(database_error) => {
            database_error.code().map(|code| code.into_owned())
        }
        _ => None,
    }
}

pub(crate) fn classify(error: &DbErr) -> DbFailure {
    match database_code(error).as_deref() {
        Some(PG_UNIQUE_VIOLATION | SQLITE_CONSTRAINT_UNIQUE | SQLITE_CONSTRAINT_PRIMARYKEY) => {
            DbFailure::UniqueViolation
        }
        _ => DbFailure::Other,
    }
}

impl From<DbErr> for ControlPlaneError {
    fn from(error: DbErr) -> Self {
        Self::Registry(error)
    }
}
