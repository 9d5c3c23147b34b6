//! Finds the PostgreSQL server the tests and benches use: `TENANTRY_TEST_POSTGRES_URL` if
//! set, else a server on 127.0.0.1:5432 (user postgres, trust auth), else a throwaway
//! server started from locally installed binaries (stopped and removed when the test
//! process exits), else a panic that says how to get one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::sync::OnceCell;

static ADMIN_URL: OnceCell<String> = OnceCell::const_new();

const LOCAL_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Admin URL (superuser) of the PostgreSQL server the tests use.
pub async fn admin_url() -> String {
    ADMIN_URL.get_or_init(find_or_start).await.clone()
}

async fn can_connect(url: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(url)).await,
        Ok(Ok(_))
    )
}

async fn find_or_start() -> String {
    if let Ok(url) = std::env::var("TENANTRY_TEST_POSTGRES_URL") {
        assert!(
            can_connect(&url).await,
            "TENANTRY_TEST_POSTGRES_URL is set but no PostgreSQL answers there; fix or unset it"
        );
        return url;
    }
    let forced = std::env::var("TENANTRY_TEST_POSTGRES_START").is_ok_and(|v| v == "1");
    if !forced && can_connect(LOCAL_URL).await {
        return LOCAL_URL.to_owned();
    }
    match tokio::task::spawn_blocking(start_throwaway).await {
        Ok(Ok(url)) => url,
        Ok(Err(message)) => panic!(
            "no PostgreSQL server for the tests: {message}.\n\
             Fix one of: set TENANTRY_TEST_POSTGRES_URL=postgres://USER@HOST:PORT/postgres (a superuser); \
             run PostgreSQL on 127.0.0.1:5432 with user postgres and trust auth; or install the \
             PostgreSQL server binaries (Debian/Ubuntu: apt-get install postgresql) so the tests can \
             start a throwaway server"
        ),
        Err(error) => panic!("starting a throwaway PostgreSQL panicked: {error}"),
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|dir| dir.join("initdb").exists())
        .collect();
    candidates.sort();
    candidates.pop()
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Runs `program args` as `user` (when root) or as ourselves.
fn run_as(user: Option<&str>, program: &Path, args: &[&str]) -> Result<(), String> {
    let output = match user {
        Some(user) => Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(program)
            .args(args)
            .output(),
        None => Command::new(program).args(args).output(),
    }
    .map_err(|error| format!("cannot run {}: {error}", program.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

fn start_throwaway() -> Result<String, String> {
    let server = start_server(&ServerSetup::default())?;
    Ok(format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        server.port
    ))
}

/// How a throwaway server is set up beyond the defaults (trust on 127.0.0.1).
#[derive(Default)]
pub struct ServerSetup {
    /// Server certificate and key (PEM): `ssl = on` with them.
    pub tls: Option<(String, String)>,
    /// The whole pg_hba.conf (a `local all all trust` line is always first).
    pub hba: Option<String>,
    /// Password of the `postgres` superuser (set over the Unix socket).
    pub superuser_password: Option<String>,
    /// More SQL run as the superuser once the server is up (over the Unix socket).
    pub setup_sql: Option<String>,
}

/// A throwaway server started by `start_server`: removed when the test process exits.
pub struct ThrowawayServer {
    pub port: u16,
    /// Its Unix socket directory.
    pub socket_dir: PathBuf,
}

/// Starts a throwaway PostgreSQL from the locally installed binaries (initdb, pg_ctl), set
/// up as `setup` says; it is stopped and removed when this test process exits. The error
/// says what is missing.
pub fn start_server(setup: &ServerSetup) -> Result<ThrowawayServer, String> {
    let bin =
        find_bin_dir().ok_or("no initdb found (PostgreSQL server binaries are not installed)")?;
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    // initdb refuses to run as root: use the postgres system user, or nobody.
    let user = if is_root {
        let has_postgres = Command::new("id")
            .arg("postgres")
            .output()
            .is_ok_and(|o| o.status.success());
        Some(if has_postgres { "postgres" } else { "nobody" })
    } else {
        None
    };
    static SERVERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tenantry-test-pg-{}-{}",
        std::process::id(),
        SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    if let Some(user) = user {
        let status = Command::new("chown")
            .args(["-R", user, &dir.display().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("cannot chown {} to {user}", dir.display()));
        }
    }
    let data = dir.join("data");
    let data_arg = data.display().to_string();
    run_as(
        user,
        &bin.join("initdb"),
        &[
            "-D",
            &data_arg,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
    )?;
    if let Some(hba) = &setup.hba {
        write_owned(
            user,
            &data.join("pg_hba.conf"),
            &format!("local all all trust\n{hba}\n"),
        )?;
    }
    let mut tls_options = String::new();
    if let Some((cert, key)) = &setup.tls {
        let (cert_path, key_path) = (data.join("server.crt"), data.join("server.key"));
        write_owned(user, &cert_path, cert)?;
        write_owned(user, &key_path, key)?;
        tls_options = format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            cert_path.display(),
            key_path.display()
        );
    }
    let port = free_port()?;
    let options = format!(
        "-p {port} -h 127.0.0.1 -k {} -c fsync=off -c max_connections=300 \
         -c password_encryption=scram-sha-256{tls_options}",
        dir.display()
    );
    let log = dir.join("log").display().to_string();
    run_as(
        user,
        &bin.join("pg_ctl"),
        &["-D", &data_arg, "-o", &options, "-l", &log, "-w", "start"],
    )?;
    // Stop and remove it when this test process exits.
    let stop = match user {
        Some(user) => format!(
            "runuser -u {user} -- {} -D {data_arg} -m immediate stop",
            bin.join("pg_ctl").display()
        ),
        None => format!(
            "{} -D {data_arg} -m immediate stop",
            bin.join("pg_ctl").display()
        ),
    };
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    Command::new("setsid")
        .args(["sh", "-c", &watchdog])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the cleanup watchdog: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            return Err("the throwaway PostgreSQL did not start listening within 30 s".to_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut sql = String::new();
    if let Some(password) = &setup.superuser_password {
        sql = format!(
            "ALTER ROLE postgres PASSWORD '{}'; ",
            password.replace('\'', "''")
        );
    }
    sql.push_str(setup.setup_sql.as_deref().unwrap_or_default());
    if !sql.is_empty() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let over_socket = sqlx::postgres::PgConnectOptions::new_without_pgpass()
            .socket(&dir)
            .port(port)
            .username("postgres")
            .database("postgres");
        runtime.block_on(async {
            let mut connection = sqlx::PgConnection::connect_with(&over_socket)
                .await
                .map_err(|e| format!("cannot reach the throwaway server's socket: {e}"))?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut connection)
                .await
                .map_err(|e| format!("cannot set up the throwaway server: {e}"))?;
            Ok::<_, String>(())
        })?;
    }
    Ok(ThrowawayServer {
        port,
        socket_dir: dir,
    })
}

/// Writes `contents` to `path`, readable by the server's user alone.
fn write_owned(user: Option<&str>, path: &Path, contents: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    if let Some(user) = user {
        let status = Command::new("chown")
            .args([user, &path.display().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("cannot chown {} to {user}", path.display()));
        }
    }
    Ok(())
}
