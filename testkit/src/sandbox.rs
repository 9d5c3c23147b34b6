//! The sandbox: a control plane and a data plane started in-process on 127.0.0.1:0 and
//! reached over real gRPC, with the registry and tenant databases on SQLite or
//! PostgreSQL. Every sandbox has a run id that all its names carry, and removes what it
//! created when dropped.

use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;
use tenantry_control_plane::ControlPlaneConfig;
use tenantry_control_plane::testing::FaultInjection;
use tenantry_data_plane::{DataPlane, DataPlaneConfig};
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::controlplane::v1::database_server_service_client::DatabaseServerServiceClient;
use tenantry_proto::controlplane::v1::routing_service_client::RoutingServiceClient;
use tenantry_proto::controlplane::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::sql_service_client::SqlServiceClient;
use tenantry_shared::grpc::ServerHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::backend::Backend;
use crate::postgres;
use crate::proxy::Proxy;
use crate::requests::{connect, with_tenant};
use crate::wait::{Patience, wait_until_ok};

/// What a test changes in its sandbox's planes; `None` keeps the sandbox's default.
#[derive(Clone, Default)]
pub struct SandboxOptions {
    pub faults: FaultInjection,
    pub tenant_migrations: Option<PathBuf>,
    pub max_response_bytes: Option<usize>,
    pub max_connections_per_tenant: Option<u32>,
    pub provision_attempts: Option<u32>,
    pub postgres_connection_budget: Option<u32>,
    pub pool_idle_timeout_ms: Option<u64>,
    pub pool_acquire_timeout_ms: Option<u64>,
    pub unknown_tenant_ttl_ms: Option<u64>,
    pub metrics_tenant_limit: Option<usize>,
    pub postgres_session_reset: Option<bool>,
    pub postgres_pipelining: Option<bool>,
    pub default_statement_timeout_ms: Option<u64>,
    pub postgres_ssl_root_cert: Option<PathBuf>,
}

/// A running control plane and data plane (see the module comment).
pub struct Sandbox {
    pub backend: Backend,
    pub run_id: String,
    pub temp: tempfile::TempDir,
    pub pg_admin_url: Option<String>,
    pub control_plane_config: ControlPlaneConfig,
    pub data_plane_config: DataPlaneConfig,
    pub control_plane: Option<ServerHandle>,
    pub data_plane: Option<DataPlane>,
    pub control_plane_channel: Channel,
    pub data_plane_channel: Channel,
}

/// `postgres://...` with another database name.
pub fn with_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("bad admin URL: {e}"));
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

fn run_id() -> String {
    let mut rng = rand::rng();
    let first = char::from(b'a' + rng.random_range(0..26u8));
    let rest: String = (0..7)
        .map(|_| {
            let n = rng.random_range(0..36u8);
            char::from(if n < 26 { b'a' + n } else { b'0' + n - 26 })
        })
        .collect();
    format!("{first}{rest}")
}

async fn admin_execute(url: &str, sql: &str) {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

impl Sandbox {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, SandboxOptions::default()).await
    }

    pub async fn start_with(backend: Backend, options: SandboxOptions) -> Self {
        let run_id = run_id();
        let temp = tempfile::Builder::new()
            .prefix(&format!("tenantry-test-{run_id}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let pg_admin_url = match backend {
            Backend::Postgres => Some(postgres::admin_url().await),
            Backend::Sqlite => None,
        };
        let registry_url = match &pg_admin_url {
            Some(admin) => {
                let name = format!("tenantry_reg_{run_id}");
                admin_execute(admin, &format!("CREATE DATABASE {name}")).await;
                with_database(admin, &name)
            }
            None => temp.path().join("registry.db").display().to_string(),
        };
        let control_plane_config = ControlPlaneConfig {
            listen_addr: "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            registry_url,
            tenant_migrations_dir: options.tenant_migrations.clone(),
            sqlite_directory: None,
            provision_attempts: options.provision_attempts.unwrap_or(2),
            provision_retry_delay_ms: 10,
            shutdown_grace_ms: 0,
            ..ControlPlaneConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let control_plane = tenantry_control_plane::start_with_faults(
            &control_plane_config,
            listener,
            options.faults.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("control plane: {e:#}"));
        let mut control_plane_config = control_plane_config;
        control_plane_config.listen_addr = control_plane.local_addr;

        let defaults = DataPlaneConfig::default();
        let data_plane_config = DataPlaneConfig {
            listen_addr: "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            control_plane_url: control_plane.url(),
            shutdown_grace_ms: 0,
            postgres_connection_budget: options
                .postgres_connection_budget
                .unwrap_or(defaults.postgres_connection_budget),
            pool_idle_timeout_ms: options
                .pool_idle_timeout_ms
                .unwrap_or(defaults.pool_idle_timeout_ms),
            pool_acquire_timeout_ms: options
                .pool_acquire_timeout_ms
                .unwrap_or(defaults.pool_acquire_timeout_ms),
            max_response_bytes: options
                .max_response_bytes
                .unwrap_or(defaults.max_response_bytes),
            postgres_session_reset: options
                .postgres_session_reset
                .unwrap_or(defaults.postgres_session_reset),
            postgres_pipelining: options
                .postgres_pipelining
                .unwrap_or(defaults.postgres_pipelining),
            max_connections_per_tenant: options
                .max_connections_per_tenant
                .unwrap_or(defaults.max_connections_per_tenant),
            unknown_tenant_ttl_ms: options.unknown_tenant_ttl_ms.unwrap_or(500),
            default_statement_timeout_ms: options
                .default_statement_timeout_ms
                .unwrap_or(defaults.default_statement_timeout_ms),
            postgres_ssl_root_cert: options.postgres_ssl_root_cert.clone(),
            metrics_tenant_limit: options
                .metrics_tenant_limit
                .unwrap_or(defaults.metrics_tenant_limit),
            ..defaults
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let data_plane = tenantry_data_plane::start(&data_plane_config, listener)
            .await
            .unwrap_or_else(|e| panic!("data plane: {e:#}"));
        let control_plane_channel = connect(&control_plane.url()).await;
        let data_plane_channel = connect(&data_plane.server.url()).await;
        let sandbox = Self {
            backend,
            run_id,
            temp,
            pg_admin_url,
            control_plane_config,
            data_plane_config,
            control_plane: Some(control_plane),
            data_plane: Some(data_plane),
            control_plane_channel,
            data_plane_channel,
        };
        sandbox.register_server("main").await;
        sandbox
    }

    /// Registers a database server on this sandbox's backend.
    pub async fn register_server(&self, name: &str) -> cp::DatabaseServer {
        use cp::register_database_server_request::Location;
        let location = match &self.pg_admin_url {
            Some(admin) => Location::PostgresAdminUrl(admin.clone()),
            None => Location::SqliteDirectory(
                self.temp
                    .path()
                    .join(format!("tenants-{name}"))
                    .display()
                    .to_string(),
            ),
        };
        self.servers()
            .register_database_server(cp::RegisterDatabaseServerRequest {
                name: name.to_owned(),
                location: Some(location),
            })
            .await
            .unwrap_or_else(|e| panic!("register server: {e}"))
            .into_inner()
    }

    /// Registers the sandbox's PostgreSQL again as server `name`, reached through a TCP
    /// proxy the test can cut (`Proxy::black_hole`). PostgreSQL sandboxes only.
    pub async fn register_behind_proxy(&self, name: &str) -> Proxy {
        use cp::register_database_server_request::Location;
        let admin = self
            .pg_admin_url
            .clone()
            .unwrap_or_else(|| panic!("register_behind_proxy needs a PostgreSQL sandbox"));
        let upstream = url::Url::parse(&admin).unwrap_or_else(|e| panic!("{e}"));
        let proxy = Proxy::start(format!(
            "{}:{}",
            upstream.host_str().unwrap_or("127.0.0.1"),
            upstream.port().unwrap_or(5432)
        ))
        .await;
        let mut via_proxy = upstream;
        via_proxy
            .set_port(Some(proxy.port()))
            .unwrap_or_else(|()| panic!("cannot set port"));
        self.servers()
            .register_database_server(cp::RegisterDatabaseServerRequest {
                name: name.to_owned(),
                location: Some(Location::PostgresAdminUrl(via_proxy.to_string())),
            })
            .await
            .unwrap_or_else(|e| panic!("register server {name}: {e}"));
        proxy
    }

    /// Starts another data plane on the same control plane (its own port and pools).
    pub async fn start_data_plane(&self) -> DataPlane {
        self.start_data_plane_with(&self.data_plane_config).await
    }

    pub async fn start_data_plane_with(&self, config: &DataPlaneConfig) -> DataPlane {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        tenantry_data_plane::start(config, listener)
            .await
            .unwrap_or_else(|e| panic!("data plane: {e:#}"))
    }

    /// Stops the control plane (gracefully).
    pub async fn stop_control_plane(&mut self) {
        if let Some(control_plane) = self.control_plane.take() {
            control_plane
                .shutdown()
                .await
                .unwrap_or_else(|e| panic!("control plane shutdown: {e:#}"));
        }
    }

    /// Stops the control plane and starts a new one on the same registry and port.
    pub async fn restart_control_plane(&mut self, faults: FaultInjection) {
        self.stop_control_plane().await;
        self.start_control_plane(faults).await;
    }

    /// Starts a control plane on the same registry and port (after `stop_control_plane`).
    pub async fn start_control_plane(&mut self, faults: FaultInjection) {
        let listener =
            tenantry_shared::grpc::bind(self.control_plane_config.listen_addr, "control plane")
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
        let control_plane =
            tenantry_control_plane::start_with_faults(&self.control_plane_config, listener, faults)
                .await
                .unwrap_or_else(|e| panic!("control plane: {e:#}"));
        self.control_plane = Some(control_plane);
        self.control_plane_channel =
            connect(&format!("http://{}", self.control_plane_config.listen_addr)).await;
    }

    /// A tenant id unique to this run.
    pub fn tid(&self, name: &str) -> String {
        format!("{name}-{}", self.run_id)
    }

    pub fn tenants(&self) -> TenantServiceClient<Channel> {
        TenantServiceClient::new(self.control_plane_channel.clone())
    }

    pub fn servers(&self) -> DatabaseServerServiceClient<Channel> {
        DatabaseServerServiceClient::new(self.control_plane_channel.clone())
    }

    pub fn routing(&self) -> RoutingServiceClient<Channel> {
        RoutingServiceClient::new(self.control_plane_channel.clone())
    }

    pub fn sql(&self) -> SqlServiceClient<Channel> {
        SqlServiceClient::new(self.data_plane_channel.clone())
    }

    pub fn data_plane(&self) -> &DataPlane {
        self.data_plane
            .as_ref()
            .unwrap_or_else(|| panic!("data plane stopped"))
    }

    pub async fn create(&self, tenant_id: &str) -> cp::Tenant {
        self.tenants()
            .create_tenant(cp::CreateTenantRequest {
                tenant_id: tenant_id.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create {tenant_id}: {e}"))
            .into_inner()
    }

    pub async fn get(&self, tenant_id: &str) -> Result<cp::Tenant, Status> {
        self.tenants()
            .get_tenant(cp::GetTenantRequest {
                tenant_id: tenant_id.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn query(
        &self,
        tenant_id: &str,
        sql: &str,
        params: Vec<dp::Value>,
    ) -> Result<dp::QueryResponse, Status> {
        let request = with_tenant(
            dp::QueryRequest {
                statement: Some(dp::Statement {
                    sql: sql.to_owned(),
                    params,
                }),
            },
            tenant_id,
        );
        self.sql()
            .query(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn execute(
        &self,
        tenant_id: &str,
        sql: &str,
        params: Vec<dp::Value>,
    ) -> Result<dp::ExecuteResponse, Status> {
        let request = with_tenant(
            dp::ExecuteRequest {
                statement: Some(dp::Statement {
                    sql: sql.to_owned(),
                    params,
                }),
            },
            tenant_id,
        );
        self.sql()
            .execute(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn batch(
        &self,
        tenant_id: &str,
        statements: &[(&str, Vec<dp::Value>)],
    ) -> Result<dp::BatchResponse, Status> {
        let request = with_tenant(
            dp::BatchRequest {
                statements: statements
                    .iter()
                    .map(|(sql, params)| dp::Statement {
                        sql: (*sql).to_owned(),
                        params: params.clone(),
                    })
                    .collect(),
            },
            tenant_id,
        );
        self.sql()
            .batch(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until `query` on the tenant gives `code` (Ok counts as Code::Ok).
    pub async fn wait_for_code(&self, tenant_id: &str, code: Code) {
        let patience = Patience::new(Duration::from_secs(15), Duration::from_millis(50));
        wait_until_ok(patience, || async move {
            let got = match self.query(tenant_id, "SELECT 1", vec![]).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            };
            if got == code {
                Ok(())
            } else {
                Err(format!(
                    "tenant {tenant_id} still answers {got:?}, expected {code:?}"
                ))
            }
        })
        .await;
    }

    /// Waits until the registry shows the tenant in `state`, and returns it.
    pub async fn wait_for_state(&self, tenant_id: &str, state: cp::TenantState) -> cp::Tenant {
        let patience = Patience::new(Duration::from_secs(20), Duration::from_millis(50));
        wait_until_ok(patience, || async move {
            let tenant = self.get(tenant_id).await.unwrap_or_else(|e| panic!("{e}"));
            if tenant.state == state as i32 {
                Ok(tenant)
            } else {
                Err(format!("{tenant_id} never became {state:?}: {tenant:?}"))
            }
        })
        .await
    }

    /// Does the tenant's database still exist (PostgreSQL database or SQLite file)?
    pub async fn database_exists(&self, tenant: &cp::Tenant) -> bool {
        match &self.pg_admin_url {
            Some(admin) => {
                use sqlx::Connection;
                let mut connection = sqlx::PgConnection::connect(admin)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(&tenant.database_name)
                    .fetch_one(&mut connection)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
            None => self
                .temp
                .path()
                .join(format!("tenants-{}", tenant.database_server))
                .join(&tenant.database_name)
                .exists(),
        }
    }

    /// Does a PostgreSQL role of that name exist?
    pub async fn role_exists(&self, role: &str) -> bool {
        let Some(admin) = &self.pg_admin_url else {
            return false;
        };
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(admin)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Sandbox {
    /// Removes every PostgreSQL database and role this run created (by its run id), even
    /// when the test failed half-way. SQLite files go with the temp dir.
    fn drop(&mut self) {
        let Some(admin) = self.pg_admin_url.clone() else {
            return;
        };
        let run_id = self.run_id.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                use sqlx::Connection;
                let Ok(mut connection) = sqlx::PgConnection::connect(&admin).await else {
                    return;
                };
                let pattern = format!("tenantry\\_%{run_id}");
                let databases: Vec<String> =
                    sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
                        .bind(&pattern)
                        .fetch_all(&mut connection)
                        .await
                        .unwrap_or_default();
                for database in databases {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                    )))
                    .execute(&mut connection)
                    .await;
                }
                let roles: Vec<String> =
                    sqlx::query_scalar("SELECT rolname FROM pg_roles WHERE rolname LIKE $1")
                        .bind(&pattern)
                        .fetch_all(&mut connection)
                        .await
                        .unwrap_or_default();
                for role in roles {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP ROLE IF EXISTS \"{role}\""
                    )))
                    .execute(&mut connection)
                    .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}
