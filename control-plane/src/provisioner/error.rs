//! Why a provisioning action failed. A step's error becomes the FAILED tenant's reason
//! (its `Display` is what callers read), so messages say what went wrong and never carry
//! a password or a connection URL.

use crate::error::ControlPlaneError;

pub(crate) type ProvisionResult<T> = std::result::Result<T, ProvisionError>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProvisionError {
    #[error("the PostgreSQL admin URL is not valid: {0}")]
    AdminUrlInvalid(sqlx::Error),
    #[error("cannot use the PostgreSQL admin connection: {0}")]
    AdminConnection(sqlx::Error),
    #[error("the PostgreSQL admin role needs CREATEROLE and CREATEDB (or superuser)")]
    AdminPrivileges,
    #[error("no database server is registered")]
    NoServer,
    #[error("database server {0} is not registered")]
    UnknownServer(String),
    /// A statement on the tenant's database server (or its SQLite file) failed.
    #[error("{0}")]
    Sql(#[from] sqlx::Error),
    #[error("{0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The registry refused or failed a read or a change of the sequence.
    #[error("{0}")]
    Registry(#[from] ControlPlaneError),
    /// A test made this step fail (`FaultInjection::fail_step`).
    #[cfg(feature = "testing")]
    #[error("injected failure")]
    Injected,
}

impl ProvisionError {
    /// The error as a caller of `RegisterDatabaseServer` sees it: a URL that cannot be
    /// used is the caller's mistake; a server that refuses is a precondition.
    pub(crate) fn into_registration_error(self) -> ControlPlaneError {
        match self {
            Self::AdminUrlInvalid(_) => ControlPlaneError::InvalidArgument(self.to_string()),
            Self::Registry(error) => error,
            _ => ControlPlaneError::FailedPrecondition(self.to_string()),
        }
    }
}
