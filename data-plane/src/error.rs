//! The data plane's one error model: `DataPlaneError`, a closed set of codes whose
//! messages are safe to show the caller, and the one place that turns it into a gRPC
//! `tonic::Status` (or an HTTP response, for a tower layer that refuses a call).
//!
//! Mapping database errors into this model belongs next to the code that talks to the
//! database (`backend::postgres::error`, `backend::sqlite::error`); mapping a failure to
//! get a connection belongs to the pool (`pool::AcquireError`). This module names nothing
//! else in the crate.

use tonic::Status;
use tonic::body::Body;

pub(crate) type Result<T, E = DataPlaneError> = std::result::Result<T, E>;

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
    /// A statement was sent and its connection broke before it answered: it may have
    /// run. Never advises a retry.
    #[error("{0}")]
    OutcomeUnknown(String),
}

impl DataPlaneError {
    /// The response of a call a tower layer refuses before it reaches a service.
    pub(crate) fn into_http(self) -> http::Response<Body> {
        let status = Status::from(self);
        tracing::debug!(code = ?status.code(), message = status.message(), "request refused");
        status.into_http()
    }
}

#[allow(clippy::disallowed_methods)] // The one conversion to `tonic::Status`.
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
            DataPlaneError::OutcomeUnknown(message) => Status::unknown(message),
            DataPlaneError::Internal(message) => {
                tracing::error!(%message, "internal error");
                Status::internal(message)
            }
        }
    }
}
