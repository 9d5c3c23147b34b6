//! The control plane's domain: the rules of the tenant lifecycle and of database-server
//! registration. The gRPC services translate protobuf to calls here and back; below sit
//! the registry (what is stored), the provisioner (what is done on database servers) and
//! the routes.

pub(crate) mod servers;
pub(crate) mod tenants;
