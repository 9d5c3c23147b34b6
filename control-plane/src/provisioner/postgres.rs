//! Provisioning on a PostgreSQL server: one login role and one database per tenant.
//!
//! The role owns its database, is not a superuser, cannot create roles or databases,
//! and `CONNECT` on the database is revoked from PUBLIC, so a tenant's credentials open
//! its own database and no other tenant's. Statements that carry a password are never
//! logged (statement logging is off on admin connections) and errors never echo them.
//! The SQLSTATEs these admin statements expect are read here, next to them.

use std::str::FromStr;
use std::time::Duration;

use hmac::digest::InvalidLength;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions};

use super::error::{ProvisionError, ProvisionResult};

/// SQLSTATE `duplicate_object`: a role created concurrently.
const DUPLICATE_OBJECT: &str = "42710";
/// SQLSTATE `duplicate_database`: a database created concurrently.
const DUPLICATE_DATABASE: &str = "42P04";

/// Whether a statement failed with this SQLSTATE.
fn has_sqlstate(error: &sqlx::Error, sqlstate: &str) -> bool {
    matches!(error, sqlx::Error::Database(database_error) if database_error.code().as_deref() == Some(sqlstate))
}

/// Session-level advisory lock functions, taken away from tenants (see `lock_down`).
const REVOKE_SESSION_ADVISORY_LOCKS: &str = "REVOKE EXECUTE ON FUNCTION \
     pg_catalog.pg_advisory_lock(bigint), \
     pg_catalog.pg_advisory_lock(integer, integer), \
     pg_catalog.pg_advisory_lock_shared(bigint), \
     pg_catalog.pg_advisory_lock_shared(integer, integer), \
     pg_catalog.pg_try_advisory_lock(bigint), \
     pg_catalog.pg_try_advisory_lock(integer, integer), \
     pg_catalog.pg_try_advisory_lock_shared(bigint), \
     pg_catalog.pg_try_advisory_lock_shared(integer, integer) \
     FROM PUBLIC";

/// Admin access to one PostgreSQL database server.
pub(crate) struct PostgresServer {
    admin_pool: PgPool,
    admin_options: PgConnectOptions,
}

/// Iterations of PBKDF2 in tenant password verifiers (PostgreSQL's default).
const SCRAM_ITERATIONS: u32 = 4096;

fn random_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut salt);
    salt
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Result<Vec<u8>, InvalidLength> {
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)?;
    mac.update(data);
    Ok(mac.finalize().into_bytes().to_vec())
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, RFC 7677):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. Passwords here are ASCII
/// letters and digits, which SASLprep leaves as they are.
pub fn scram_sha256_verifier(password: &str, salt: &[u8]) -> Result<String, InvalidLength> {
    use base64::Engine as _;
    use sha2::Digest as _;
    // SaltedPassword = Hi(password, salt, i), i.e. PBKDF2-HMAC-SHA-256 with one block.
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac_sha256(password.as_bytes(), &block)?;
    let mut salted = u.clone();
    for _ in 1..SCRAM_ITERATIONS {
        u = hmac_sha256(password.as_bytes(), &u)?;
        for (acc, byte) in salted.iter_mut().zip(&u) {
            *acc ^= byte;
        }
    }
    let client_key = hmac_sha256(&salted, b"Client Key")?;
    let stored_key = sha2::Sha256::digest(&client_key).to_vec();
    let server_key = hmac_sha256(&salted, b"Server Key")?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(format!(
        "SCRAM-SHA-256${SCRAM_ITERATIONS}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key),
        b64.encode(server_key)
    ))
}

/// Quotes a PostgreSQL identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PostgresServer {
    /// Parses the admin URL; connects lazily.
    pub(crate) fn new(admin_url: &str) -> ProvisionResult<Self> {
        let admin_options = PgConnectOptions::from_str(admin_url)
            .map_err(ProvisionError::AdminUrlInvalid)?
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
    pub(crate) async fn check_privileges(&self) -> ProvisionResult<()> {
        let (superuser, create_role, create_db): (bool, bool, bool) = sqlx::query_as(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&self.admin_pool)
        .await
        .map_err(ProvisionError::AdminConnection)?;
        if !(superuser || (create_role && create_db)) {
            return Err(ProvisionError::AdminPrivileges);
        }
        Ok(())
    }

    /// Creates the tenant's login role, or resets its password and attributes if it
    /// exists (so the step can be re-run). The server receives a SCRAM-SHA-256 verifier,
    /// never the password itself, so not even its own logs can show it.
    pub(crate) async fn ensure_role(&self, role: &str, password: &str) -> Result<(), sqlx::Error> {
        let verifier = scram_sha256_verifier(password, &random_salt()).map_err(|error| {
            sqlx::Error::Protocol(format!("cannot hash the tenant password: {error}"))
        })?;
        let attributes = format!(
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS \
             CONNECTION LIMIT -1 PASSWORD '{verifier}'"
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
                Err(error) if has_sqlstate(&error, DUPLICATE_OBJECT) => {}
                Err(error) => return Err(error),
            }
        }
        let alter = format!("ALTER ROLE {} WITH {attributes}", quote_identifier(role));
        sqlx::raw_sql(AssertSqlSafe(alter))
            .execute(&self.admin_pool)
            .await?;
        Ok(())
    }

    async fn role_exists(&self, role: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(&self.admin_pool)
            .await
    }

    async fn database_exists(&self, database: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database)
            .fetch_one(&self.admin_pool)
            .await
    }

    /// Creates the tenant's database owned by its role (or makes an existing one so).
    pub(crate) async fn ensure_database(
        &self,
        database: &str,
        owner: &str,
    ) -> Result<(), sqlx::Error> {
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
                Err(error) if has_sqlstate(&error, DUPLICATE_DATABASE) => {}
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
    pub(crate) async fn lock_down(&self, database: &str, owner: &str) -> Result<(), sqlx::Error> {
        let statements = format!(
            "REVOKE ALL ON DATABASE {db} FROM PUBLIC; GRANT ALL ON DATABASE {db} TO {owner};",
            db = quote_identifier(database),
            owner = quote_identifier(owner)
        );
        sqlx::raw_sql(AssertSqlSafe(statements))
            .execute(&self.admin_pool)
            .await?;
        // Inside the tenant's database: no session-level advisory locks. A data-plane
        // connection serves one request after another, so a lock that outlives its
        // request would only mislead; transaction-level ones (pg_advisory_xact_lock)
        // stay. Without this the data plane must release locks after every request.
        // An admin that is not a superuser cannot revoke these (PostgreSQL warns and
        // goes on); data planes check per connection, so nothing breaks either way.
        let mut connection = self
            .admin_options
            .clone()
            .database(database)
            .connect()
            .await?;
        let revoked = sqlx::raw_sql(REVOKE_SESSION_ADVISORY_LOCKS)
            .execute(&mut connection)
            .await;
        let _ = sqlx::Connection::close(connection).await;
        revoked?;
        Ok(())
    }

    /// Drops the tenant's database, closing any connection to it.
    pub(crate) async fn drop_database(&self, database: &str) -> Result<(), sqlx::Error> {
        let drop = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_identifier(database)
        );
        sqlx::raw_sql(AssertSqlSafe(drop))
            .execute(&self.admin_pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn drop_role(&self, role: &str) -> Result<(), sqlx::Error> {
        let drop = format!("DROP ROLE IF EXISTS {}", quote_identifier(role));
        sqlx::raw_sql(AssertSqlSafe(drop))
            .execute(&self.admin_pool)
            .await?;
        Ok(())
    }

    /// Connect options for the tenant's own role on its own database.
    pub(crate) fn tenant_options(
        &self,
        database: &str,
        role: &str,
        password: &str,
    ) -> PgConnectOptions {
        self.admin_options
            .clone()
            .database(database)
            .username(role)
            .password(password)
            .application_name("tenantry-control-plane")
    }

    pub(crate) async fn close(&self) {
        self.admin_pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_verifier_matches_rfc_7677_example() -> Result<(), Box<dyn std::error::Error>> {
        // Password "pencil", salt "W22ZaJ0SNY7soEsUEjb6gQ==", 4096 iterations (RFC 7677's
        // example); the expected keys were computed apart with Python's hashlib and hmac.
        use base64::Engine as _;
        let salt = base64::engine::general_purpose::STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==")?;
        let verifier = scram_sha256_verifier("pencil", &salt)?;
        assert_eq!(
            verifier,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
        Ok(())
    }

    #[test]
    fn masks_passwords_in_user_part_and_parameters() {
        assert_eq!(
            crate::location::mask_password(
                "postgres://admin:secret@db:5432/postgres?password=other&sslmode=require"
            ),
            "postgres://admin:****@db:5432/postgres?password=****&sslmode=require"
        );
    }
}
