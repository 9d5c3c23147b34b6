//! The control plane's gRPC services.

pub mod routing;
pub mod servers;
pub mod tenants;

/// Who made a call, for the audit log: the caller's address.
pub fn actor<T>(request: &tonic::Request<T>) -> String {
    match request.remote_addr() {
        Some(addr) => format!("api:{addr}"),
        None => "api".to_owned(),
    }
}
