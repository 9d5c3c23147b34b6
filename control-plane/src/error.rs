//! The control plane's error type, and its one mapping to gRPC status codes.

use tonic::Status;

pub type Result<T, E = ControlPlaneError> = std::result::Result<T, E>;

/// Every message here is safe to show a caller: no passwords, no connection URLs.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("registry error: {0}")]
    Registry(#[from] sea_orm::DbErr),
    #[error("{0}")]
    Internal(String),
}

impl From<ControlPlaneError> for Status {
    fn from(error: ControlPlaneError) -> Self {
        match error {
            ControlPlaneError::InvalidArgument(message) => Status::invalid_argument(message),
            ControlPlaneError::NotFound(message) => Status::not_found(message),
            ControlPlaneError::AlreadyExists(message) => Status::already_exists(message),
            ControlPlaneError::FailedPrecondition(message) => Status::failed_precondition(message),
            ControlPlaneError::Unavailable(message) => Status::unavailable(message),
            ControlPlaneError::Registry(error) => {
                tracing::error!(%error, "registry error");
                Status::internal("the tenant registry failed; see the control plane's log")
            }
            ControlPlaneError::Internal(message) => {
                tracing::error!(%message, "internal error");
                Status::internal(message)
            }
        }
    }
}
