//! The control plane's error type: the closed set of codes every domain error carries,
//! and the one place they become gRPC statuses (`From<ControlPlaneError> for Status`).
//!
//! Nothing else in the crate builds a `tonic::Status`: handlers return
//! `ControlPlaneError`s and convert them with `?`. Database errors reach this type
//! through `registry::error`, which reads their SQLSTATE; provisioning errors through
//! `provisioner::error`.

use tonic::Status;

pub(crate) type Result<T, E = ControlPlaneError> = std::result::Result<T, E>;

/// Every message here is safe to show a caller: no passwords, no connection URLs.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlPlaneError {
    /// The caller's request is wrong; the message says how to fix it.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is fine but the tenant or server is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A concurrent change got in the way; retrying the call helps.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    /// The registry database failed (built by `registry::error`). The caller sees a
    /// generic message; the log has the error.
    #[error("registry error: {0}")]
    Registry(sea_orm::DbErr),
    #[error("{0}")]
    Internal(String),
}

impl ControlPlaneError {
    /// The one answer for a tenant id the registry does not hold.
    pub(crate) fn tenant_not_found(tenant_id: &tenantry_shared::TenantId) -> Self {
        Self::NotFound(format!("tenant {tenant_id} does not exist"))
    }
}

// The one conversion to gRPC statuses; the crate's clippy.toml forbids the
// constructors everywhere else.
#[allow(clippy::disallowed_methods)]
impl From<ControlPlaneError> for Status {
    fn from(error: ControlPlaneError) -> Self {
        match error {
            ControlPlaneError::InvalidArgument(message) => Status::invalid_argument(message),
            ControlPlaneError::NotFound(message) => Status::not_found(message),
            ControlPlaneError::AlreadyExists(message) => Status::already_exists(message),
            ControlPlaneError::FailedPrecondition(message) => Status::failed_precondition(message),
            ControlPlaneError::Aborted(message) => Status::aborted(message),
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

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn every_code_keeps_its_grpc_code_and_message() {
        let cases = [
            (
                ControlPlaneError::InvalidArgument("a".into()),
                Code::InvalidArgument,
                "a",
            ),
            (ControlPlaneError::NotFound("b".into()), Code::NotFound, "b"),
            (
                ControlPlaneError::AlreadyExists("c".into()),
                Code::AlreadyExists,
                "c",
            ),
            (
                ControlPlaneError::FailedPrecondition("d".into()),
                Code::FailedPrecondition,
                "d",
            ),
            (ControlPlaneError::Aborted("e".into()), Code::Aborted, "e"),
            (
                ControlPlaneError::Unavailable("f".into()),
                Code::Unavailable,
                "f",
            ),
            (ControlPlaneError::Internal("g".into()), Code::Internal, "g"),
            (
                ControlPlaneError::Registry(sea_orm::DbErr::Custom("secret dsn".into())),
                Code::Internal,
                "the tenant registry failed; see the control plane's log",
            ),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
