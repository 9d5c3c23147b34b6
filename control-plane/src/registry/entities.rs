//! sea-orm entities of the registry tables, and the enums stored in their columns.
//!
//! `TenantState` and `Backend` are stored as the strings they always were ("ACTIVE",
//! "postgres", ...), so registries written before these enums existed read unchanged.

use std::fmt;

use sea_orm::entity::prelude::*;

/// Lifecycle state of a tenant: the one state enum of the control plane (the API's
/// `TenantState` is converted from it in `convert`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum TenantState {
    #[sea_orm(string_value = "PROVISIONING")]
    Provisioning,
    #[sea_orm(string_value = "ACTIVE")]
    Active,
    #[sea_orm(string_value = "SUSPENDED")]
    Suspended,
    #[sea_orm(string_value = "FAILED")]
    Failed,
    #[sea_orm(string_value = "DELETING")]
    Deleting,
    #[sea_orm(string_value = "DELETED")]
    Deleted,
}

/// The stored name ("ACTIVE", ...), as messages and metric labels show it.
impl fmt::Display for TenantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_value())
    }
}

/// Which kind of database a server provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum Backend {
    #[sea_orm(string_value = "postgres")]
    Postgres,
    #[sea_orm(string_value = "sqlite")]
    Sqlite,
}

/// The stored name ("postgres" or "sqlite").
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_value())
    }
}

/// One row per tenant, tombstones included.
pub(crate) mod tenant {
    use sea_orm::entity::prelude::*;

    use super::{Backend, TenantState};

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        pub display_name: String,
        pub state: TenantState,
        pub reason: String,
        /// The server the request pinned ("" if none): part of the request, for
        /// idempotent retries.
        pub requested_server: String,
        /// The server the tenant lives on, once placed.
        pub database_server: Option<String>,
        /// Once placed.
        pub backend: Option<Backend>,
        pub database_name: Option<String>,
        pub db_username: Option<String>,
        /// The tenant role's password (PostgreSQL). Handed only to data planes through
        /// RoutingService; cleared when the tenant is deleted.
        pub db_password: Option<String>,
        pub route_version: i64,
        pub schema_version: i64,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
        /// Most connections one data plane opens to the tenant's database (0: the data
        /// plane's default).
        pub max_connections: i32,
        /// Tracing override: share of the tenant's traces kept, until `trace_until`.
        #[sea_orm(column_type = "Double", nullable)]
        pub trace_ratio: Option<f64>,
        pub trace_until: Option<DateTimeUtc>,
        /// Log level override (error ... trace), with the tracing override.
        pub log_level: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Places tenants can live: PostgreSQL servers and SQLite directories.
pub(crate) mod database_server {
    use sea_orm::entity::prelude::*;

    use super::Backend;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "database_servers")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub backend: Backend,
        /// Admin connection URL (PostgreSQL) or directory (SQLite).
        pub location: String,
        pub create_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Every change of a tenant's state or route, and every server registration: who did
/// what, when. A row's id is the route version the change produced.
pub(crate) mod audit_event {
    use sea_orm::entity::prelude::*;

    use super::TenantState;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub tenant_id: Option<String>,
        pub database_server: Option<String>,
        /// Who: "api:<peer address>", "reconciler", ...
        pub actor: String,
        /// What, e.g. "create", "placed", "suspend", "provisioning failed".
        pub action: String,
        pub from_state: Option<TenantState>,
        pub to_state: Option<TenantState>,
        pub detail: String,
        pub time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
