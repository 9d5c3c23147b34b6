//! The client commands: `tenants`, `servers` and `sql` call the planes over gRPC and
//! print what they answer. Errors print the status code and message and exit non-zero.

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::controlplane::v1::database_server_service_client::DatabaseServerServiceClient;
use tenantry_proto::controlplane::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::sql_service_client::SqlServiceClient;
use tenantry_proto::dataplane::v1::value::Kind;
use tonic::transport::Channel;

#[derive(Args)]
pub struct ControlPlaneEndpoint {
    /// Control plane URL.
    #[arg(
        long,
        global = true,
        env = "TENANTRY_CONTROL_PLANE",
        default_value = "http://127.0.0.1:50051"
    )]
    control_plane: String,
    /// `table`, or `json`: one JSON document (an object for one tenant or server, an
    /// array for a list).
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant and its database; returns once it is ACTIVE.
    Create {
        tenant_id: String,
        #[arg(long, default_value = "")]
        display_name: String,
        /// Put the tenant on this database server (default: the least used one).
        #[arg(long, default_value = "")]
        server: String,
        /// Reuse the id of a DELETED tenant on purpose.
        #[arg(long)]
        reuse_deleted_id: bool,
        /// Most connections one data plane opens to the tenant's database (default: the
        /// data plane's max_connections_per_tenant).
        #[arg(long, default_value_t = 0)]
        max_connections: i32,
    },
    Get {
        tenant_id: String,
    },
    /// List tenants (all pages).
    List {
        /// Only tenants in this state (active, suspended, ...).
        #[arg(long)]
        state: Option<String>,
    },
    Suspend {
        tenant_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    Resume {
        tenant_id: String,
    },
    /// Drop the tenant's database and role; the id stays reserved.
    Delete {
        tenant_id: String,
    },
    /// Trace one tenant at its own sampling ratio for a while; it expires by itself.
    Trace {
        tenant_id: String,
        /// Share of the tenant's traces to keep, 0.0 to 1.0.
        #[arg(long, default_value_t = 1.0)]
        ratio: f64,
        /// How long: a number with s, m, h or d (e.g. 90s, 30m, 2h), at most 7d.
        #[arg(long = "for", default_value = "30m")]
        duration: String,
        /// Also log the tenant's lines down to this level (error, warn, info, debug, trace).
        #[arg(long, default_value = "")]
        log_level: String,
        /// Clear the override now instead.
        #[arg(long)]
        off: bool,
    },
}

/// `90s`, `30m`, `2h`, `1d` → a duration.
fn parse_duration(raw: &str) -> anyhow::Result<prost_types::Duration> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .with_context(|| format!("duration {raw:?} has no unit; use s, m, h or d (e.g. 30m)"))?;
    let (number, unit) = raw.split_at(split);
    let number: i64 = number
        .parse()
        .with_context(|| format!("duration {raw:?} does not start with a number"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number.saturating_mul(60),
        "h" => number.saturating_mul(3600),
        "d" => number.saturating_mul(86_400),
        other => anyhow::bail!("duration unit {other:?}: use s, m, h or d (e.g. 30m)"),
    };
    Ok(prost_types::Duration { seconds, nanos: 0 })
}

#[derive(Subcommand)]
pub enum ServersCommand {
    /// Register a PostgreSQL server (--postgres URL) or a SQLite directory (--sqlite-dir).
    Register {
        name: String,
        #[arg(
            long,
            conflicts_with = "sqlite_dir",
            required_unless_present = "sqlite_dir"
        )]
        postgres: Option<String>,
        #[arg(long)]
        sqlite_dir: Option<String>,
    },
    List,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args)]
pub struct SqlArgs {
    /// The tenant to act for (sent as x-tenant-id).
    #[arg(long)]
    tenant: String,
    /// One SQL statement.
    sql: String,
    /// A parameter, in order: int:42, float:1.5, text:hello, bool:true, bytes:CAFE (hex), null.
    #[arg(long = "param")]
    params: Vec<String>,
    /// Run with Execute (rows affected) instead of Query. Default: Query for statements
    /// that start with SELECT, WITH, VALUES, PRAGMA, EXPLAIN, SHOW or contain RETURNING.
    #[arg(long, conflicts_with = "query")]
    execute: bool,
    /// Run with Query even if the statement does not look like one.
    #[arg(long)]
    query: bool,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
    /// Data plane URL.
    #[arg(
        long,
        env = "TENANTRY_DATA_PLANE",
        default_value = "http://127.0.0.1:50052"
    )]
    data_plane: String,
}

/// A channel whose calls carry the current trace context.
type TracedChannel = tenantry_shared::grpc_trace::InjectTraceService<Channel>;

async fn channel(url: &str, what: &str) -> anyhow::Result<TracedChannel> {
    let channel = Channel::from_shared(url.to_owned())
        .with_context(|| format!("{url:?} is not a valid {what} URL"))?
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the {what} at {url}; is it running (`tenantry dev`)?")
        })?;
    Ok(tower::ServiceBuilder::new()
        .layer(tenantry_shared::grpc_trace::InjectTraceLayer)
        .service(channel))
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn state_name(state: i32) -> String {
    cp::TenantState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TENANT_STATE_")
                .to_owned()
        })
        .unwrap_or_else(|_| state.to_string())
}

fn time(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        })
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// RFC 3339 (UTC), or null.
fn time_json(ts: &Option<prost_types::Timestamp>) -> serde_json::Value {
    ts.as_ref()
        .and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        })
        .map_or(serde_json::Value::Null, |t| {
            serde_json::json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        })
}

fn backend_name(backend: i32) -> String {
    cp::Backend::try_from(backend)
        .map(|b| {
            b.as_str_name()
                .trim_start_matches("BACKEND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn tenant_json(t: &cp::Tenant) -> serde_json::Value {
    serde_json::json!({
        "tenant_id": t.tenant_id,
        "display_name": t.display_name,
        "state": state_name(t.state),
        "reason": t.reason,
        "database_server": t.database_server,
        "backend": backend_name(t.backend),
        "database_name": t.database_name,
        "route_version": t.route_version,
        "schema_version": t.schema_version,
        "max_connections": t.max_connections,
        "create_time": time_json(&t.create_time),
        "update_time": time_json(&t.update_time),
        "tracing": t.tracing.as_ref().map(|tracing| serde_json::json!({
            "ratio": tracing.ratio,
            "log_level": tracing.log_level,
            "until": time_json(&tracing.until),
        })),
    })
}

/// How many records a command prints: one (JSON: an object) or a list (an array).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    One,
    List,
}

fn print_json(values: Vec<serde_json::Value>, shape: Shape) {
    let document = match (shape, <[serde_json::Value; 1]>::try_from(values)) {
        (Shape::One, Ok([value])) => value,
        (_, Ok(values)) => serde_json::Value::Array(values.into()),
        (_, Err(values)) => serde_json::Value::Array(values),
    };
    println!("{document}");
}

fn print_tenants(tenants: &[cp::Tenant], output: Output, shape: Shape) {
    if let Output::Json = output {
        print_json(tenants.iter().map(tenant_json).collect(), shape);
        return;
    }
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            vec![
                t.tenant_id.clone(),
                state_name(t.state),
                t.database_server.clone(),
                t.database_name.clone(),
                t.route_version.to_string(),
                time(&t.update_time),
                t.tracing
                    .as_ref()
                    .map(|tracing| {
                        let level = if tracing.log_level.is_empty() {
                            String::new()
                        } else {
                            format!(" log {}", tracing.log_level)
                        };
                        format!("{}{level} until {}", tracing.ratio, time(&tracing.until))
                    })
                    .unwrap_or_default(),
                t.reason.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "TENANT",
            "STATE",
            "SERVER",
            "DATABASE",
            "ROUTE_VERSION",
            "UPDATED",
            "TRACING",
            "REASON",
        ],
        &rows,
    );
}

pub async fn tenants(
    endpoint: &ControlPlaneEndpoint,
    command: TenantsCommand,
) -> anyhow::Result<()> {
    let mut client =
        TenantServiceClient::new(channel(&endpoint.control_plane, "control plane").await?);
    let tenant = match command {
        TenantsCommand::Create {
            tenant_id,
            display_name,
            server,
            reuse_deleted_id,
            max_connections,
        } => client
            .create_tenant(cp::CreateTenantRequest {
                tenant_id,
                display_name,
                database_server: server,
                reuse_deleted_id,
                max_connections,
            })
            .await,
        TenantsCommand::Get { tenant_id } => client.get_tenant(cp::GetTenantRequest { tenant_id }).await,
        TenantsCommand::Suspend { tenant_id, reason } => {
            client.suspend_tenant(cp::SuspendTenantRequest { tenant_id, reason }).await
        }
        TenantsCommand::Resume { tenant_id } => client.resume_tenant(cp::ResumeTenantRequest { tenant_id }).await,
        TenantsCommand::Delete { tenant_id } => client.delete_tenant(cp::DeleteTenantRequest { tenant_id }).await,
        TenantsCommand::Trace {
            tenant_id,
            ratio,
            duration,
            log_level,
            off,
        } => {
            let duration = if off {
                prost_types::Duration::default()
            } else {
                parse_duration(&duration)?
            };
            client
                .set_tenant_tracing(cp::SetTenantTracingRequest {
                    tenant_id,
                    ratio,
                    duration: Some(duration),
                    log_level,
                })
                .await
        }
        TenantsCommand::List { state } => {
            let state = match state {
                None => cp::TenantState::Unspecified,
                Some(name) => cp::TenantState::from_str_name(&format!("TENANT_STATE_{}", name.to_ascii_uppercase()))
                    .with_context(|| format!("unknown state {name:?}; use active, suspended, provisioning, failed, deleting or deleted"))?,
            };
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_tenants(cp::ListTenantsRequest {
                        page_size: 1000,
                        page_token,
                        state: state.into(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                all.extend(page.tenants);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_tenants(&all, endpoint.output, Shape::List);
            return Ok(());
        }
    }
    .map_err(status_error)?
    .into_inner();
    print_tenants(&[tenant], endpoint.output, Shape::One);
    Ok(())
}

pub async fn servers(
    endpoint: &ControlPlaneEndpoint,
    command: ServersCommand,
) -> anyhow::Result<()> {
    let mut client =
        DatabaseServerServiceClient::new(channel(&endpoint.control_plane, "control plane").await?);
    let shape = match command {
        ServersCommand::Register { .. } => Shape::One,
        ServersCommand::List => Shape::List,
    };
    let servers = match command {
        ServersCommand::Register {
            name,
            postgres,
            sqlite_dir,
        } => {
            use cp::register_database_server_request::Location;
            let location = match (postgres, sqlite_dir) {
                (Some(url), _) => Location::PostgresAdminUrl(url),
                (None, Some(dir)) => Location::SqliteDirectory(dir),
                (None, None) => bail!("give --postgres URL or --sqlite-dir DIR"),
            };
            vec![
                client
                    .register_database_server(cp::RegisterDatabaseServerRequest {
                        name,
                        location: Some(location),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner(),
            ]
        }
        ServersCommand::List => {
            client
                .list_database_servers(cp::ListDatabaseServersRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .servers
        }
    };
    if let Output::Json = endpoint.output {
        let servers = servers
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "backend": backend_name(s.backend),
                    "tenant_count": s.tenant_count,
                    "location": s.location,
                    "create_time": time_json(&s.create_time),
                })
            })
            .collect();
        print_json(servers, shape);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = servers
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                backend_name(s.backend),
                s.tenant_count.to_string(),
                s.location.clone(),
            ]
        })
        .collect();
    print_table(&["SERVER", "BACKEND", "TENANTS", "LOCATION"], &rows);
    Ok(())
}

/// Parses `--param TYPE:VALUE`.
fn parse_param(raw: &str) -> anyhow::Result<dp::Value> {
    if raw == "null" {
        return Ok(dp::Value {
            kind: Some(Kind::Null(true)),
        });
    }
    let (kind, value) = raw.split_once(':').with_context(|| {
        format!("--param {raw:?}: write TYPE:VALUE (int, float, text, bool, bytes) or null")
    })?;
    let kind = match kind {
        "int" => Kind::Int64(
            value
                .parse()
                .with_context(|| format!("--param {raw:?}: not an integer"))?,
        ),
        "float" => Kind::Double(
            value
                .parse()
                .with_context(|| format!("--param {raw:?}: not a number"))?,
        ),
        "text" => Kind::Text(value.to_owned()),
        "bool" => Kind::Bool(
            value
                .parse()
                .with_context(|| format!("--param {raw:?}: write true or false"))?,
        ),
        "bytes" => Kind::Bytes(
            decode_hex(value).with_context(|| format!("--param {raw:?}: bytes are hex digits"))?,
        ),
        other => bail!(
            "--param {raw:?}: unknown type {other:?}; use int, float, text, bool, bytes or null"
        ),
    };
    Ok(dp::Value { kind: Some(kind) })
}

fn decode_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        bail!("odd number of hex digits");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("not a hex digit"))
        .collect()
}

fn looks_like_query(sql: &str) -> bool {
    let lower = sql.trim_start().to_ascii_lowercase();
    [
        "select", "with", "values", "pragma", "explain", "show", "table",
    ]
    .iter()
    .any(|keyword| lower.starts_with(keyword))
        || lower.contains("returning")
}

fn cell_text(value: &dp::Value) -> String {
    match &value.kind {
        None | Some(Kind::Null(_)) => "NULL".to_owned(),
        Some(Kind::Int64(v)) => v.to_string(),
        Some(Kind::Double(v)) => v.to_string(),
        Some(Kind::Text(v)) => v.clone(),
        Some(Kind::Bool(v)) => v.to_string(),
        Some(Kind::Bytes(v)) => format!(
            "\\x{}",
            v.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

fn cell_json(value: &dp::Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::Null(_)) => serde_json::Value::Null,
        Some(Kind::Int64(v)) => serde_json::json!(v),
        Some(Kind::Double(v)) => serde_json::json!(v),
        Some(Kind::Text(v)) => serde_json::json!(v),
        Some(Kind::Bool(v)) => serde_json::json!(v),
        Some(Kind::Bytes(v)) => {
            serde_json::json!(v.iter().map(|b| format!("{b:02x}")).collect::<String>())
        }
    }
}

pub async fn sql(args: SqlArgs) -> anyhow::Result<()> {
    let params = args
        .params
        .iter()
        .map(|p| parse_param(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut client = SqlServiceClient::new(channel(&args.data_plane, "data plane").await?)
        .max_decoding_message_size(64 * 1024 * 1024);
    let statement = Some(dp::Statement {
        sql: args.sql.clone(),
        params,
    });
    let tenant = tonic::metadata::MetadataValue::try_from(args.tenant.as_str())
        .with_context(|| format!("--tenant {:?} cannot be sent as metadata", args.tenant))?;
    let use_query = args.query || (!args.execute && looks_like_query(&args.sql));
    if use_query {
        let mut request = tonic::Request::new(dp::QueryRequest { statement });
        request
            .metadata_mut()
            .insert(tenantry_shared::metadata::TENANT_ID, tenant);
        let response = client
            .query(request)
            .await
            .map_err(status_error)?
            .into_inner();
        match args.output {
            Output::Json => {
                let rows: Vec<serde_json::Value> = response
                    .rows
                    .iter()
                    .map(|row| {
                        serde_json::Value::Object(
                            response
                                .columns
                                .iter()
                                .cloned()
                                .zip(row.values.iter().map(cell_json))
                                .collect(),
                        )
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "columns": response.columns, "rows": rows })
                );
            }
            Output::Table => {
                let headers: Vec<&str> = response.columns.iter().map(String::as_str).collect();
                let rows: Vec<Vec<String>> = response
                    .rows
                    .iter()
                    .map(|row| row.values.iter().map(cell_text).collect())
                    .collect();
                print_table(&headers, &rows);
                println!(
                    "({} row{})",
                    rows.len(),
                    if rows.len() == 1 { "" } else { "s" }
                );
            }
        }
    } else {
        let mut request = tonic::Request::new(dp::ExecuteRequest { statement });
        request
            .metadata_mut()
            .insert(tenantry_shared::metadata::TENANT_ID, tenant);
        let response = client
            .execute(request)
            .await
            .map_err(status_error)?
            .into_inner();
        match args.output {
            Output::Json => println!(
                "{}",
                serde_json::json!({ "rows_affected": response.rows_affected, "last_insert_id": response.last_insert_id })
            ),
            Output::Table => match response.last_insert_id {
                Some(id) => println!(
                    "{} row(s) affected, last insert id {id}",
                    response.rows_affected
                ),
                None => println!("{} row(s) affected", response.rows_affected),
            },
        }
    }
    Ok(())
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                format!(
                    "{cell:<width$}",
                    width = widths.get(i).copied().unwrap_or(0)
                )
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
