//! What a database server's stored location means, for whoever needs to read it (routes,
//! the API's server view, the provisioner): the host and port a PostgreSQL admin URL names
//! (what data planes connect to) and its TLS mode, the URL with its password masked (for
//! display), and
//! the path of a tenant's file in a SQLite server's directory. Names nothing else in the
//! crate.

use std::path::{Path, PathBuf};

use tenantry_proto::controlplane::v1 as pb;

/// Where a PostgreSQL server listens, as tenants' data planes should reach it.
pub(crate) struct HostPort {
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// Host and port of an admin URL, for routes.
pub(crate) fn host_port(admin_url: &str) -> Result<HostPort, url::ParseError> {
    let url = url::Url::parse(admin_url)?;
    Ok(HostPort {
        host: url.host_str().unwrap_or("localhost").to_owned(),
        port: url.port().unwrap_or(5432),
    })
}

/// The TLS mode data planes use for the server: the admin URL's `sslmode` (or
/// PGSSLMODE, as sqlx reads it; libpq's default, prefer, when neither says).
pub(crate) fn ssl_mode(admin_url: &str) -> Result<pb::SslMode, sqlx::Error> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    use std::str::FromStr;
    Ok(
        match PgConnectOptions::from_str(admin_url)?.get_ssl_mode() {
            PgSslMode::Disable => pb::SslMode::Disable,
            PgSslMode::Allow | PgSslMode::Prefer => pb::SslMode::Prefer,
            PgSslMode::Require => pb::SslMode::Require,
            PgSslMode::VerifyCa => pb::SslMode::VerifyCa,
            PgSslMode::VerifyFull => pb::SslMode::VerifyFull,
        },
    )
}

/// The admin URL with its password (in the user part or a `password=` parameter)
/// replaced by `****`, for display.
pub(crate) fn mask_password(admin_url: &str) -> String {
    match url::Url::parse(admin_url) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            let masked_query: Vec<(String, String)> = url
                .query_pairs()
                .map(|(key, value)| {
                    let value = if key.eq_ignore_ascii_case("password") {
                        "****".to_owned()
                    } else {
                        value.into_owned()
                    };
                    (key.into_owned(), value)
                })
                .collect();
            if !masked_query.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(masked_query);
            }
            url.to_string()
        }
        Err(_) => "<invalid URL>".to_owned(),
    }
}

/// Path of a tenant's database file in a SQLite server's directory.
pub(crate) fn database_path(directory: &str, database_name: &str) -> PathBuf {
    Path::new(directory).join(database_name)
}
