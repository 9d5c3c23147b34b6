//! sea-orm entities of the registry tables.

/// One row per tenant, tombstones included.
pub mod tenant {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        pub display_name: String,
        /// One of `TenantState::as_str()`.
        pub state: String,
        pub reason: String,
        /// The server the request pinned ("" if none): part of the request, for
        /// idempotent retries.
        pub requested_server: String,
        /// The server the tenant lives on, once placed.
        pub database_server: Option<String>,
        /// "postgres" or "sqlite", once placed.
        pub backend: Option<String>,
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
pub mod database_server {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "database_servers")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        /// "postgres" or "sqlite".
        pub backend: String,
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
pub mod audit_event {
    use sea_orm::entity::prelude::*;

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
        pub from_state: Option<String>,
        pub to_state: Option<String>,
        pub detail: String,
        pub time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
