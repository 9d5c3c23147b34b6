//! Provisioning on a SQLite "server": a directory with one database file per tenant.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// Connect options for a tenant file, creating it if missing.
fn tenant_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10))
}

/// Creates the tenant's database file (WAL mode) if it does not exist yet.
pub(crate) async fn ensure_database(path: &Path) -> Result<(), sqlx::Error> {
    let pool = open(path).await?;
    sqlx::query("SELECT 1").execute(&pool).await?;
    pool.close().await;
    Ok(())
}

/// A one-connection pool on the tenant file, for migrations.
pub(crate) async fn open(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(tenant_options(path))
        .await
}

/// Removes the tenant's database file and its WAL and shared-memory files.
pub(crate) fn remove_database(path: &Path) -> std::io::Result<()> {
    for candidate in [
        path.to_path_buf(),
        suffixed(path, "-wal"),
        suffixed(path, "-shm"),
        suffixed(path, "-journal"),
    ] {
        match std::fs::remove_file(&candidate) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}
