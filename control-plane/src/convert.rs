//! Registry rows to API messages.

use prost_types::Timestamp;
use tenantry_proto::controlplane::v1 as pb;

use crate::error::Result;
use crate::provisioner::postgres;
use crate::registry::{Backend, TenantState, database_server, tenant};

pub fn timestamp(time: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn state_to_proto(state: TenantState) -> pb::TenantState {
    match state {
        TenantState::Provisioning => pb::TenantState::Provisioning,
        TenantState::Active => pb::TenantState::Active,
        TenantState::Suspended => pb::TenantState::Suspended,
        TenantState::Failed => pb::TenantState::Failed,
        TenantState::Deleting => pb::TenantState::Deleting,
        TenantState::Deleted => pb::TenantState::Deleted,
    }
}

pub fn state_from_proto(state: pb::TenantState) -> Option<TenantState> {
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

pub fn backend_to_proto(backend: Option<&str>) -> pb::Backend {
    match backend.map(Backend::parse) {
        Some(Ok(Backend::Postgres)) => pb::Backend::Postgres,
        Some(Ok(Backend::Sqlite)) => pb::Backend::Sqlite,
        _ => pb::Backend::Unspecified,
    }
}

pub fn tenant_to_proto(row: &tenant::Model) -> Result<pb::Tenant> {
    Ok(pb::Tenant {
        tenant_id: row.tenant_id.clone(),
        display_name: row.display_name.clone(),
        state: state_to_proto(TenantState::parse(&row.state)?).into(),
        reason: row.reason.clone(),
        database_server: row.database_server.clone().unwrap_or_default(),
        backend: backend_to_proto(row.backend.as_deref()).into(),
        database_name: row.database_name.clone().unwrap_or_default(),
        route_version: row.route_version,
        schema_version: row.schema_version,
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
        max_connections: row.max_connections,
        tracing: tracing_to_proto(row),
    })
}

/// The tenant's tracing override, if it has one that has not expired.
pub fn tracing_to_proto(row: &tenant::Model) -> Option<pb::TenantTracing> {
    match (row.trace_ratio, row.trace_until) {
        (Some(ratio), Some(until)) if until > chrono::Utc::now() => Some(pb::TenantTracing {
            ratio,
            until: Some(timestamp(until)),
            log_level: row.log_level.clone().unwrap_or_default(),
        }),
        _ => None,
    }
}

pub fn server_to_proto(row: &database_server::Model, tenant_count: i64) -> pb::DatabaseServer {
    let location = match Backend::parse(&row.backend) {
        Ok(Backend::Postgres) => postgres::mask_password(&row.location),
        _ => row.location.clone(),
    };
    pb::DatabaseServer {
        name: row.name.clone(),
        backend: backend_to_proto(Some(&row.backend)).into(),
        location,
        tenant_count,
        create_time: Some(timestamp(row.create_time)),
    }
}
