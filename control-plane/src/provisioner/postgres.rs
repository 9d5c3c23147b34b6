//! Provisioning on a PostgreSQL server: one login role and one database per tenant.
//!
//! The role owns its database, is not a superuser, cannot create roles or databases,
//! and `CONNECT` on the database is revoked from PUBLIC, so a tenant's credentials open
//! its own database and no other tenant's. Statements that carry a password are never
//! logged (statement logging is off on admin connections) and errors never echo them.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions};

/// Admin access to one PostgreSQL database server.
pub struct PostgresServer {
    admin_pool: PgPool,
    admin_options: PgConnectOptions,
}

/// Where a PostgreSQL server listens, as tenants' data planes should reach it.
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

/// Host and port of an admin URL, for routes.
pub fn host_port(admin_url: &str) -> Result<HostPort, String> {
    let url = url::Url::parse(admin_url)
        .map_err(|error| format!("the PostgreSQL admin URL is not a valid URL: {error}"))?;
    Ok(HostPort {
        host: url.host_str().unwrap_or("localhost").to_owned(),
        port: url.port().unwrap_or(5432),
    })
}

/// The admin URL with its password replaced by `****`, for display.
pub fn mask_password(admin_url: &str) -> String {
    match url::Url::parse(admin_url) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            url.to_string()
        }
        Err(_) => "<invalid URL>".to_owned(),
    }
}

/// Quotes a PostgreSQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PostgresServer {
    /// Parses the admin URL; connects lazily.
    pub fn new(admin_url: &str) -> Result<Self, String> {
        let admin_options = PgConnectOptions::from_str(admin_url)
            .map_err(|error| format!("the PostgreSQL admin URL is not valid: {error}"))?
            .application_name("tenantry-control-plane")
            .disable_statement_logging();
        let admin_pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(admin_options.clone());
        Ok(Self {
            admin_pool,
            admin_options,
        })
    }

    /// Checks that the admin role can create roles and databases.
    pub async fn check_privileges(&self) -> Result<(), String> {
        let (superuser, create_role, create_db): (bool, bool, bool) = sqlx::query_as(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&self.admin_pool)
        .await
        .map_err(|error| format!("cannot use the PostgreSQL admin connection: {error}"))?;
        if !(superuser || (create_role && create_db)) {
            return Err(
                "the PostgreSQL admin role needs CREATEROLE and CREATEDB (or superuser)".to_owned(),
            );
        }
        Ok(())
    }

    /// Creates the tenant's login role, or resets its password and attributes if it
    /// exists (so the step can be re-run).
    pub async fn ensure_role(&self, role: &str, password: &str) -> Result<(), sqlx::Error> {
        debug_assert!(password.chars().all(|c| c.is_ascii_alphanumeric()));
        let attributes = format!(
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS \
             CONNECTION LIMIT -1 PASSWORD '{password}'"
        );
        let exists = self.role_exists(role).await?;
        if !exists {
            let create = format!("CREATE ROLE {} WITH {attributes}", quote_identifier(role));
            match sqlx::raw_sql(AssertSqlSafe(create))
                .execute(&self.admin_pool)
                .await
            {
                Ok(_) => return Ok(()),
                // duplicate_object: created concurrently; fall through to ALTER.
                Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42710") => {}
                Err(error) => return Err(error),
            }
        }
        let alter = format!("ALTER ROLE {} WITH {attributes}", quote_identifier(role));
        sqlx::raw_sql(AssertSqlSafe(alter))
            .execute(&self.admin_pool)
            .await?;
        Ok(())
    }

    pub async fn role_exists(&self, role: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(&self.admin_pool)
            .await
    }

    pub async fn database_exists(&self, database: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database)
            .fetch_one(&self.admin_pool)
            .await
    }

    /// Creates the tenant's database owned by its role (or makes an existing one so).
    pub async fn ensure_database(&self, database: &str, owner: &str) -> Result<(), sqlx::Error> {
        if !self.database_exists(database).await? {
            let create = format!(
                "CREATE DATABASE {} OWNER {}",
                quote_identifier(database),
                quote_identifier(owner)
            );
            match sqlx::raw_sql(AssertSqlSafe(create))
                .execute(&self.admin_pool)
                .await
            {
                Ok(_) => return Ok(()),
                // duplicate_database: created concurrently.
                Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P04") => {}
                Err(error) => return Err(error),
            }
        }
        let alter = format!(
            "ALTER DATABASE {} OWNER TO {}",
            quote_identifier(database),
            quote_identifier(owner)
        );
        sqlx::raw_sql(AssertSqlSafe(alter))
            .execute(&self.admin_pool)
            .await?;
        Ok(())
    }

    /// Revokes every database privilege from PUBLIC, so only the owner (and superusers)
    /// can connect.
    pub async fn lock_down(&self, database: &str, owner: &str) -> Result<(), sqlx::Error> {
        let statements = format!(
            "REVOKE ALL ON DATABASE {db} FROM PUBLIC; GRANT ALL ON DATABASE {db} TO {owner};",
            db = quote_identifier(database),
            owner = quote_identifier(owner)
        );
        sqlx::raw_sql(AssertSqlSafe(statements))
            .execute(&self.admin_pool)
            .await?;
        Ok(())
    }

    /// Drops the tenant's database, closing any connection to it.
    pub async fn drop_database(&self, database: &str) -> Result<(), sqlx::Error> {
        let drop = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_identifier(database)
        );
        sqlx::raw_sql(AssertSqlSafe(drop))
            .execute(&self.admin_pool)
            .await?;
        Ok(())
    }

    pub async fn drop_role(&self, role: &str) -> Result<(), sqlx::Error> {
        let drop = format!("DROP ROLE IF EXISTS {}", quote_identifier(role));
        sqlx::raw_sql(AssertSqlSafe(drop))
            .execute(&self.admin_pool)
            .await?;
        Ok(())
    }

    /// Connect options for the tenant's own role on its own database.
    pub fn tenant_options(&self, database: &str, role: &str, password: &str) -> PgConnectOptions {
        self.admin_options
            .clone()
            .database(database)
            .username(role)
            .password(password)
            .application_name("tenantry-control-plane")
    }

    pub async fn close(&self) {
        self.admin_pool.close().await;
    }
}
