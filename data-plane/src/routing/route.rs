//! A tenant's route as the data plane holds it (`Route`: state, version, where the
//! database is and with which credentials), made from the control plane's message, and
//! the rules that decide whether a route serves: `check_serving` (the status each state
//! answers with) and `serves` (whether a pool opened for some connection details may
//! still be used). Every freshness decision of the data plane goes through these.

use tenantry_proto::controlplane::v1 as pb;
use tenantry_shared::TenantId;

use crate::error::DataPlaneError;

/// Serving state of a tenant, as the data plane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteState {
    Provisioning,
    Active,
    Suspended,
    Failed,
    Deleting,
    Deleted,
}

/// How a connection to a PostgreSQL server uses TLS: the `sslmode` the server was
/// registered with (libpq's; `allow` is taken as `prefer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS if the server offers it, without checking its certificate; else plain TCP.
    Prefer,
    /// TLS, without checking the server's certificate.
    Require,
    /// TLS, with a certificate signed by a trusted authority (any name).
    VerifyCa,
    /// TLS, with a certificate signed by a trusted authority for the host's name.
    VerifyFull,
}

impl SslMode {
    /// Asks the server for TLS.
    pub(crate) fn wants_tls(self) -> bool {
        self != Self::Disable
    }

    /// Fails without TLS.
    pub(crate) fn needs_tls(self) -> bool {
        matches!(self, Self::Require | Self::VerifyCa | Self::VerifyFull)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn from_proto(mode: i32) -> Self {
        match pb::SslMode::try_from(mode) {
            Ok(pb::SslMode::Prefer) => Self::Prefer,
            Ok(pb::SslMode::Require) => Self::Require,
            Ok(pb::SslMode::VerifyCa) => Self::VerifyCa,
            Ok(pb::SslMode::VerifyFull) => Self::VerifyFull,
            // Unspecified: a control plane from before TLS. An unknown value (a newer
            // control plane): the strictest mode this data plane has.
            Ok(pb::SslMode::Unspecified | pb::SslMode::Disable) => Self::Disable,
            Err(_) => Self::VerifyFull,
        }
    }
}

/// Where a tenant's database is, with the tenant's own credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    Postgres {
        host: String,
        port: u16,
        database: String,
        username: String,
        password: String,
        ssl_mode: SslMode,
    },
    Sqlite {
        path: String,
        /// Changes when a new database replaces the old one at the same path.
        incarnation: i64,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Postgres {
                host,
                port,
                database,
                username,
                ssl_mode,
                ..
            } => write!(
                f,
                "Postgres({username}@{host}:{port}/{database}, sslmode={})",
                ssl_mode.as_str()
            ),
            Self::Sqlite { path, incarnation } => {
                write!(f, "Sqlite({path}, incarnation {incarnation})")
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Route {
    pub state: RouteState,
    pub reason: String,
    pub version: i64,
    pub target: Option<Target>,
    /// Most connections the tenant's pool opens (0: the data plane's default).
    pub max_connections: u32,
    /// Tracing override: share of traces kept, log level (may be empty), until when.
    pub tracing: Option<(f64, String, std::time::SystemTime)>,
}

impl Target {
    /// The database server the target is on, as metrics and pool figures name it
    /// (`host:port`, or the SQLite file's path).
    pub(crate) fn server(&self) -> String {
        match self {
            Self::Postgres { host, port, .. } => format!("{host}:{port}"),
            Self::Sqlite { path, .. } => path.clone(),
        }
    }

    /// The tenant database's name: the PostgreSQL database, or the SQLite file name.
    pub(crate) fn database(&self) -> &str {
        match self {
            Self::Postgres { database, .. } => database,
            Self::Sqlite { path, .. } => path.rsplit('/').next().unwrap_or(path),
        }
    }
}

impl Route {
    /// Whether a pool opened for `target` may still serve this route: the tenant is
    /// active and its connection details are still `target`.
    pub(crate) fn serves(&self, target: &Target) -> bool {
        self.state == RouteState::Active && self.target.as_ref() == Some(target)
    }

    pub(crate) fn from_proto(route: pb::Route) -> Result<Self, DataPlaneError> {
        let state = match pb::TenantState::try_from(route.state) {
            Ok(pb::TenantState::Provisioning) => RouteState::Provisioning,
            Ok(pb::TenantState::Active) => RouteState::Active,
            Ok(pb::TenantState::Suspended) => RouteState::Suspended,
            Ok(pb::TenantState::Failed) => RouteState::Failed,
            Ok(pb::TenantState::Deleting) => RouteState::Deleting,
            Ok(pb::TenantState::Deleted) => RouteState::Deleted,
            _ => {
                return Err(DataPlaneError::Internal(format!(
                    "control plane sent a route with unknown state {}",
                    route.state
                )));
            }
        };
        let target = match route.connection {
            Some(pb::route::Connection::Postgres(pg)) => Some(Target::Postgres {
                host: pg.host,
                port: u16::try_from(pg.port).map_err(|_| {
                    DataPlaneError::Internal(format!("control plane sent port {}", pg.port))
                })?,
                database: pg.database,
                username: pg.username,
                password: pg.password,
                ssl_mode: SslMode::from_proto(pg.ssl_mode),
            }),
            Some(pb::route::Connection::Sqlite(sqlite)) => Some(Target::Sqlite {
                path: sqlite.path,
                incarnation: route.incarnation,
            }),
            None => None,
        };
        Ok(Self {
            state,
            reason: route.reason,
            version: route.route_version,
            target,
            max_connections: u32::try_from(route.max_connections).unwrap_or(0),
            tracing: route.tracing.and_then(|tracing| {
                let until = tracing.until?;
                let until = std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(
                    u64::try_from(until.seconds).ok()?,
                    u32::try_from(until.nanos).ok()?,
                ))?;
                Some((tracing.ratio, tracing.log_level, until))
            }),
        })
    }

    /// Refuses requests unless the tenant serves, with the status the architecture's
    /// table gives for each state.
    pub(crate) fn check_serving(&self, tenant_id: &TenantId) -> Result<(), DataPlaneError> {
        match self.state {
            RouteState::Active if self.target.is_some() => Ok(()),
            RouteState::Active => Err(DataPlaneError::Internal(format!(
                "route of tenant {tenant_id} has no connection details"
            ))),
            RouteState::Suspended => Err(DataPlaneError::FailedPrecondition(format!(
                "tenant {tenant_id} is suspended: {}",
                self.reason
            ))),
            RouteState::Provisioning => Err(DataPlaneError::Unavailable(format!(
                "tenant {tenant_id} is still being provisioned; retry shortly"
            ))),
            RouteState::Failed => Err(DataPlaneError::Unavailable(format!(
                "tenant {tenant_id} is unavailable: {}",
                self.reason
            ))),
            RouteState::Deleting | RouteState::Deleted => Err(DataPlaneError::NotFound(format!(
                "tenant {tenant_id} does not exist (deleted)"
            ))),
        }
    }
}
