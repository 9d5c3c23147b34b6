//! Registry schema migrations, named by timestamp, applied in order by one `Migrator`.

use sea_orm_migration::prelude::*;

pub(crate) struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(M20261127000001CreateRegistry),
            Box::new(M20261128000001RouteWatch),
            Box::new(M20261128000002TenantTracing),
            Box::new(M20261128000003TenantLogLevel),
        ]
    }
}

#[derive(DeriveIden)]
enum Tenants {
    Table,
    TenantId,
    DisplayName,
    State,
    Reason,
    RequestedServer,
    DatabaseServer,
    Backend,
    DatabaseName,
    DbUsername,
    DbPassword,
    RouteVersion,
    SchemaVersion,
    CreateTime,
    UpdateTime,
    MaxConnections,
    TraceRatio,
    TraceUntil,
    LogLevel,
}

#[derive(DeriveIden)]
enum DatabaseServers {
    Table,
    Name,
    Backend,
    Location,
    CreateTime,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    TenantId,
    DatabaseServer,
    Actor,
    Action,
    FromState,
    ToState,
    Detail,
    Time,
}

struct M20261127000001CreateRegistry;

impl MigrationName for M20261127000001CreateRegistry {
    fn name(&self) -> &str {
        "m20261127_000001_create_registry"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261127000001CreateRegistry {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(DatabaseServers::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(DatabaseServers::Name)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(DatabaseServers::Backend).string().not_null())
                    .col(ColumnDef::new(DatabaseServers::Location).text().not_null())
                    .col(
                        ColumnDef::new(DatabaseServers::CreateTime)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Tenants::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Tenants::TenantId)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Tenants::DisplayName).text().not_null())
                    .col(ColumnDef::new(Tenants::State).string().not_null())
                    .col(ColumnDef::new(Tenants::Reason).text().not_null())
                    .col(ColumnDef::new(Tenants::RequestedServer).string().not_null())
                    .col(ColumnDef::new(Tenants::DatabaseServer).string().null())
                    .col(ColumnDef::new(Tenants::Backend).string().null())
                    .col(ColumnDef::new(Tenants::DatabaseName).text().null())
                    .col(ColumnDef::new(Tenants::DbUsername).text().null())
                    .col(ColumnDef::new(Tenants::DbPassword).text().null())
                    .col(
                        ColumnDef::new(Tenants::RouteVersion)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Tenants::SchemaVersion)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Tenants::CreateTime)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Tenants::UpdateTime)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(Tenants::Table, Tenants::DatabaseServer)
                            .to(DatabaseServers::Table, DatabaseServers::Name),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("tenants_by_state")
                    .table(Tenants::Table)
                    .col(Tenants::State)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditEvents::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(AuditEvents::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(AuditEvents::TenantId).string().null())
                    .col(ColumnDef::new(AuditEvents::DatabaseServer).string().null())
                    .col(ColumnDef::new(AuditEvents::Actor).text().not_null())
                    .col(ColumnDef::new(AuditEvents::Action).text().not_null())
                    .col(ColumnDef::new(AuditEvents::FromState).string().null())
                    .col(ColumnDef::new(AuditEvents::ToState).string().null())
                    .col(ColumnDef::new(AuditEvents::Detail).text().not_null())
                    .col(
                        ColumnDef::new(AuditEvents::Time)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("audit_events_by_tenant")
                    .table(AuditEvents::Table)
                    .col(AuditEvents::TenantId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }
}

/// Per-tenant connection maximum, and an index for route streams (`route_version > N`).
struct M20261128000001RouteWatch;

impl MigrationName for M20261128000001RouteWatch {
    fn name(&self) -> &str {
        "m20261128_000001_route_watch"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261128000001RouteWatch {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(
                        ColumnDef::new(Tenants::MaxConnections)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("tenants_route_version")
                    .table(Tenants::Table)
                    .col(Tenants::RouteVersion)
                    .to_owned(),
            )
            .await
    }
}

/// Per-tenant tracing override.
struct M20261128000002TenantTracing;

impl MigrationName for M20261128000002TenantTracing {
    fn name(&self) -> &str {
        "m20261128_000002_tenant_tracing"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261128000002TenantTracing {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(ColumnDef::new(Tenants::TraceRatio).double().null())
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(
                        ColumnDef::new(Tenants::TraceUntil)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }
}

/// Per-tenant log level, part of the tracing override.
struct M20261128000003TenantLogLevel;

impl MigrationName for M20261128000003TenantLogLevel {
    fn name(&self) -> &str {
        "m20261128_000003_tenant_log_level"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261128000003TenantLogLevel {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(ColumnDef::new(Tenants::LogLevel).string().null())
                    .to_owned(),
            )
            .await
    }
}
