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

/// PostgreSQL `serialization_failure` and `deadlock_detected`.
const PG_RETRY: [&str; 2] = ["40001", "40P01"];
/// SQLite `SQLITE_BUSY` and `SQLITE_LOCKED` (primary codes; their extended codes, such as
/// `SQLITE_BUSY_SNAPSHOT`, keep them in the low byte).
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;

/// What a failed registry query means to its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DbFailure {
    /// The row's key is taken: a concurrent insert of the same id or name won.
    UniqueViolation,
    /// Another writer held the database (SQLite busy or locked, a PostgreSQL
    /// serialization failure or deadlock): the whole transaction may be run again.
    Busy,
    /// Anything else: the registry failed.
    Other,
}

/// The database's own error: its code (SQLSTATE on PostgreSQL, extended result code on
/// SQLite) and whether it is SQLite's.
fn database_code(error: &DbErr) -> Option<(String, bool)> {
    let (DbErr::Exec(RuntimeErr::SqlxError(error))
    | DbErr::Query(RuntimeErr::SqlxError(error))
    | DbErr::Conn(RuntimeErr::SqlxError(error))) = error
    else {
        return None;
    };
    match &**error {
        sea_orm::sqlx::Error::Database(database_error) => {
            let sqlite = database_error
                .try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
                .is_some();
            database_error
                .code()
                .map(|code| (code.into_owned(), sqlite))
        }
        _ => None,
    }
}

pub(crate) fn classify(error: &DbErr) -> DbFailure {
    let Some((code, sqlite)) = database_code(error) else {
        return DbFailure::Other;
    };
    match (code.as_str(), sqlite) {
        (PG_UNIQUE_VIOLATION, false)
        | (SQLITE_CONSTRAINT_UNIQUE | SQLITE_CONSTRAINT_PRIMARYKEY, true) => {
            DbFailure::UniqueViolation
        }
        (code, false) if PG_RETRY.contains(&code) => DbFailure::Busy,
        (code, true) => match code.parse::<i64>() {
            Ok(code) if matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED) => DbFailure::Busy,
            _ => DbFailure::Other,
        },
        _ => DbFailure::Other,
    }
}

impl From<DbErr> for ControlPlaneError {
    fn from(error: DbErr) -> Self {
        Self::Registry(error)
    }
}
