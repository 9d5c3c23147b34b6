//! The `tenantry` binary: `dev` starts and prints working endpoints, and the client
//! commands (`servers`, `tenants`, `sql`) print results, or the status code and message
//! with a non-zero exit.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tenantry_testkit::otlp::MetricsCollector;
use tenantry_testkit::{Backend, Patience, Sandbox, wait_until_ok_blocking};

const BIN: &str = env!("CARGO_BIN_EXE_tenantry");

struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

fn tenantry(args: &[&str], control_plane: &str, data_plane: &str) -> Output {
    let output = Command::new(BIN)
        .args(args)
        .env("TENANTRY_CONTROL_PLANE", control_plane)
        .env("TENANTRY_DATA_PLANE", data_plane)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    Output {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_print_results_and_errors() {
    let sandbox = Sandbox::start(Backend::Sqlite).await;
    let control_plane = format!("http://{}", sandbox.control_plane_config.listen_addr);
    let data_plane = sandbox.data_plane().server.url();
    let id = sandbox.tid("cli");
    let run = |args: &[&str]| {
        let control_plane = control_plane.clone();
        let data_plane = data_plane.clone();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tenantry(&args, &control_plane, &data_plane)
        })
    };

    let servers = run(&["servers", "list"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(servers.success, "{}", servers.stderr);
    assert!(servers.stdout.contains("main") && servers.stdout.contains("sqlite"));

    let created = run(&["tenants", "create", &id])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(created.success, "{}", created.stderr);
    assert!(created.stdout.contains("ACTIVE"), "{}", created.stdout);

    // Every control-plane command also prints one JSON document: an object for one
    // tenant or server, an array for a list.
    let parse = |printed: &Output| -> serde_json::Value {
        assert!(printed.success, "{}", printed.stderr);
        serde_json::from_str(printed.stdout.trim())
            .unwrap_or_else(|e| panic!("{e}: {}", printed.stdout))
    };
    let got = run(&["tenants", "get", &id, "--output", "json"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = parse(&got);
    assert_eq!(got["tenant_id"], serde_json::json!(id));
    assert_eq!(got["state"], "ACTIVE");
    assert_eq!(got["backend"], "sqlite");
    assert!(got["create_time"].is_string(), "{got}");
    let listed = run(&["tenants", "list", "--output", "json"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let listed = parse(&listed);
    assert!(
        listed.as_array().is_some_and(|tenants| tenants
            .iter()
            .any(|t| t["tenant_id"] == serde_json::json!(id))),
        "{listed}"
    );
    let servers = run(&["servers", "list", "--output", "json"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let servers = parse(&servers);
    assert_eq!(servers[0]["name"], "main", "{servers}");
    assert_eq!(servers[0]["tenant_count"], 1, "{servers}");

    let table = run(&[
        "sql",
        "--tenant",
        &id,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, n REAL, b BLOB)",
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(table.success, "{}", table.stderr);
    let inserted = run(&[
        "sql",
        "--tenant",
        &id,
        "INSERT INTO notes (body, n, b) VALUES (?, ?, ?)",
        "--param",
        "text:hello",
        "--param",
        "float:1.5",
        "--param",
        "bytes:CAFE",
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(inserted.success, "{}", inserted.stderr);
    assert!(
        inserted
            .stdout
            .contains("1 row(s) affected, last insert id 1"),
        "{}",
        inserted.stdout
    );

    let json = run(&[
        "sql",
        "--tenant",
        &id,
        "SELECT id, body, n, b FROM notes",
        "--output",
        "json",
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(json.success, "{}", json.stderr);
    let parsed: serde_json::Value =
        serde_json::from_str(json.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", json.stdout));
    assert_eq!(
        parsed["columns"],
        serde_json::json!(["id", "body", "n", "b"])
    );
    assert_eq!(parsed["rows"][0]["body"], "hello");
    assert_eq!(parsed["rows"][0]["n"], 1.5);
    assert_eq!(parsed["rows"][0]["b"], "cafe");

    let shown = run(&["sql", "--tenant", &id, "SELECT body FROM notes"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        shown.stdout.contains("hello") && shown.stdout.contains("(1 row)"),
        "{}",
        shown.stdout
    );

    // Errors: status code and message on stderr, non-zero exit.
    let syntax = run(&["sql", "--tenant", &id, "SELEC 1"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!syntax.success);
    assert!(
        syntax.stderr.contains("InvalidArgument") && syntax.stderr.contains("syntax error"),
        "{}",
        syntax.stderr
    );
    let unknown = run(&["sql", "--tenant", &sandbox.tid("nobody"), "SELECT 1"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!unknown.success);
    assert!(unknown.stderr.contains("NotFound"), "{}", unknown.stderr);
    let bad_param = run(&["sql", "--tenant", &id, "SELECT ?", "--param", "int:x"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!bad_param.success);
    assert!(
        bad_param.stderr.contains("not an integer"),
        "{}",
        bad_param.stderr
    );

    let suspended = run(&["tenants", "suspend", &id, "--reason", "audit"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        suspended.success && suspended.stdout.contains("SUSPENDED"),
        "{}",
        suspended.stdout
    );
    let listed = run(&["tenants", "list", "--state", "suspended"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(listed.stdout.contains(&id), "{}", listed.stdout);
    let deleted = run(&["tenants", "delete", &id])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        deleted.success && deleted.stdout.contains("DELETED"),
        "{}",
        deleted.stdout
    );
    let again = run(&["tenants", "create", &id])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !again.success && again.stderr.contains("AlreadyExists"),
        "{}",
        again.stderr
    );

    let unreachable = tokio::task::spawn_blocking(|| {
        tenantry(
            &["tenants", "list"],
            "http://127.0.0.1:9",
            "http://127.0.0.1:9",
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !unreachable.success
            && unreachable
                .stderr
                .contains("cannot reach the control plane"),
        "{}",
        unreachable.stderr
    );
}

/// `GET url` over plain HTTP/1.0; the response body.
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream =
        std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(response.starts_with("HTTP/1."), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// A child process killed when the test ends, whichever way it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `tenantry dev` comes up, prints its endpoints, serves them (metrics too, and pushes
/// them over OTLP with `--otlp-metrics`), logs JSON lines that name the tenant, and stops
/// on SIGTERM.
#[test]
fn dev_mode_serves_and_stops() {
    let data_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log_path = data_dir.path().join("dev.log");
    let log = std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("{e}"));
    let otlp_metrics = MetricsCollector::default();
    let otlp_metrics_url = otlp_metrics.start();
    let mut child = Command::new(BIN)
        .env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", &otlp_metrics_url)
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_METRICS_EXPORTER")
        .args([
            "--log-format",
            "json",
            "dev",
            "--otlp-metrics",
            "--control-plane-addr",
            "127.0.0.1:0",
            "--data-plane-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN} dev: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    // A failed assertion must not leave `dev` running.
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut endpoint = |label: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "dev printed no {label} line");
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("dev exited before printing {label}"))
                .unwrap_or_else(|e| panic!("{e}"));
            if let Some(rest) = line.trim().strip_prefix(label) {
                return rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        }
    };
    let control_plane = endpoint("control plane:");
    let data_plane = endpoint("data plane:");
    let metrics = endpoint("metrics:");
    let created = tenantry(
        &["tenants", "create", "devcheck"],
        &control_plane,
        &data_plane,
    );
    assert!(created.success, "{}", created.stderr);
    let queried = tenantry(
        &["sql", "--tenant", "devcheck", "SELECT 41 + 1 AS answer"],
        &control_plane,
        &data_plane,
    );
    assert!(
        queried.success && queried.stdout.contains("42"),
        "{} {}",
        queried.stdout,
        queried.stderr
    );
    assert!(
        data_dir
            .path()
            .join("tenants")
            .join("devcheck.sqlite3")
            .exists()
    );
    // A per-tenant log level: devcheck's debug lines are written, another tenant's not.
    let traced = tenantry(
        &[
            "tenants",
            "trace",
            "devcheck",
            "--ratio",
            "0",
            "--for",
            "10m",
            "--log-level",
            "debug",
        ],
        &control_plane,
        &data_plane,
    );
    assert!(traced.success, "{}", traced.stderr);
    let quiet = tenantry(
        &["tenants", "create", "devquiet"],
        &control_plane,
        &data_plane,
    );
    assert!(quiet.success, "{}", quiet.stderr);
    // The override reaches the data plane with the route (milliseconds); poll until a
    // debug line shows up rather than sleep.
    let patience = Patience::new(Duration::from_secs(20), Duration::from_millis(100));
    wait_until_ok_blocking(patience, || {
        for tenant in ["devcheck", "devquiet"] {
            let ran = tenantry(
                &["sql", "--tenant", tenant, "SELECT 1 AS one"],
                &control_plane,
                &data_plane,
            );
            assert!(ran.success, "{}", ran.stderr);
        }
        let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
        if logged.lines().any(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|line| line["tenant_id"] == "devcheck" && line["level"] == "DEBUG")
        }) {
            Ok(())
        } else {
            Err(format!("no DEBUG line for devcheck:\n{logged}"))
        }
    });
    // Both planes' metrics at one endpoint; the tenant's counter moved.
    let scraped = http_get(&metrics);
    for expected in [
        "tenantry_dataplane_requests_total{tenant=\"devcheck\",method=\"Query\",code=\"0\"} ",
        "tenantry_controlplane_tenants{state=\"ACTIVE\"} 2",
        "tenantry_controlplane_watch_streams 1",
        "tenantry_controlplane_provisioning_duration_seconds_count{outcome=\"active\"} 2",
    ] {
        assert!(scraped.contains(expected), "no {expected:?} in:\n{scraped}");
    }
    // The same series pushed over OTLP: the tenant's counter and latency histogram.
    let query = [("tenant", "devcheck"), ("method", "Query")];
    let patience = Patience::new(Duration::from_secs(20), Duration::from_millis(100));
    let service = wait_until_ok_blocking(patience, || {
        let requests = otlp_metrics.latest(
            "tenantry_dataplane_requests_total",
            &[("tenant", "devcheck"), ("method", "Query"), ("code", "0")],
        );
        let latency = otlp_metrics.latest("tenantry_dataplane_request_duration_seconds", &query);
        if let (Some((requests, service)), Some((latency_count, _))) = (&requests, latency)
            && *requests >= 2.0
            && latency_count >= 2.0
        {
            return Ok(service.clone());
        }
        Err(format!(
            "no pushed Query counter for devcheck over OTLP (latest {requests:?})"
        ))
    });
    assert!(service.contains("tenantry"), "service.name {service}");

    let pid = child.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()));
    let patience = Patience::new(Duration::from_secs(30), Duration::from_millis(50));
    let status = wait_until_ok_blocking(patience, || match child.0.try_wait() {
        Ok(Some(status)) => Ok(status),
        _ => Err("dev did not stop on SIGTERM".to_owned()),
    });
    assert!(status.success(), "dev exited with {status}");
    // --log-format json: every line is a JSON object; the tenant's lines name it.
    let logged = std::fs::read_to_string(&log_path).unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<serde_json::Value> = logged
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|line| line["tenant_id"] == "devcheck" && line["level"] == "INFO"),
        "no log line names tenant devcheck:\n{logged}"
    );
    assert!(
        !lines
            .iter()
            .any(|line| line["tenant_id"] == "devquiet" && line["level"] == "DEBUG"),
        "debug lines of a tenant without a log level override:\n{logged}"
    );
}
