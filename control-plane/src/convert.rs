//! Registry types to API messages: the one conversion of each (tenant state, backend,
//! tenant, server, tracing override) to its protobuf form, shared by the gRPC services
//! and the routes.

use prost_types::Timestamp;
use tenantry_proto::controlplane::v1 as pb;

use crate::location;
use crate::registry::{Backend, DatabaseServer, Tenant, TenantState};

pub(crate) fn timestamp(time: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

impl From<TenantState> for pb::TenantState {
    fn from(state: TenantState) -> Self {
        match state {
            TenantState::Provisioning => Self::Provisioning,
            TenantState::Active => Self::Active,
            TenantState::Suspended => Self::Suspended,
            TenantState::Failed => Self::Failed,
            TenantState::Deleting => Self::Deleting,
            TenantState::Deleted => Self::Deleted,
        }
    }
}

/// A state filter from the API: `Unspecified` is no filter.
pub(crate) fn state_filter(state: pb::TenantState) -> Option<TenantState> {
    match state {
        pb::TenantState::Unspecified => None,
        pb::TenantState::Provisioning => Some(TenantState::Provisioning),
        pb::TenantState::Active => Some(TenantState::Active),
        pb::TenantState::Suspended => Some(TenantState::Suspended),
        pb::TenantState::Failed => Some(TenantState::Failed),
        pb::TenantState::Deleting => Some(TenantState::Deleting),
        pb::TenantState::Deleted => Some(TenantState::Deleted),
    }
}

/// A backend, or `Unspecified` for a tenant not placed yet.
pub(crate) fn backend_to_proto(backend: Option<Backend>) -> pb::Backend {
    match backend {
        Some(Backend::Postgres) => pb::Backend::Postgres,
        Some(Backend::Sqlite) => pb::Backend::Sqlite,
        None => pb::Backend::Unspecified,
    }
}

pub(crate) fn tenant_to_proto(row: &Tenant) -> pb::Tenant {
    pb::Tenant {
        tenant_id: row.tenant_id.clone(),
        display_name: row.display_name.clone(),
        state: pb::TenantState::from(row.state).into(),
        reason: row.reason.clone(),
        database_server: row.database_server.clone().unwrap_or_default(),
        backend: backend_to_proto(row.backend).into(),
        database_name: row.database_name.clone().unwrap_or_default(),
        route_version: row.route_version,
        schema_version: row.schema_version,
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
        max_connections: row.max_connections,
        tracing: tracing_to_proto(row),
    }
}

/// The tenant's tracing override, if it has one that has not expired.
pub(crate) fn tracing_to_proto(row: &Tenant) -> Option<pb::TenantTracing> {
    match (row.trace_ratio, row.trace_until) {
        (Some(ratio), Some(until)) if until > chrono::Utc::now() => Some(pb::TenantTracing {
            ratio,
            until: Some(timestamp(until)),
            log_level: row.log_level.clone().unwrap_or_default(),
        }),
        _ => None,
    }
}

/// A server as callers see it: the admin URL's password masked.
pub(crate) fn server_to_proto(row: &DatabaseServer, tenant_count: i64) -> pb::DatabaseServer {
    let location = match row.backend {
        Backend::Postgres => location::mask_password(&row.location),
        Backend::Sqlite => row.location.clone(),
    };
    pb::DatabaseServer {
        name: row.name.clone(),
        backend: backend_to_proto(Some(row.backend)).into(),
        location,
        tenant_count,
        create_time: Some(timestamp(row.create_time)),
    }
}
