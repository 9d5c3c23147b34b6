//! Tenantry's gRPC API: code generated from the `.proto` files beside this crate.

/// Control plane: tenants, database servers, routes.
pub mod controlplane {
    pub mod v1 {
        tonic::include_proto!("tenantry.controlplane.v1");
    }
}

/// Data plane: SQL on the caller's tenant database.
pub mod dataplane {
    pub mod v1 {
        tonic::include_proto!("tenantry.dataplane.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Tenantry service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tenantry_descriptor.bin"));
