//! Metrics end to end: both planes' metrics scraped over HTTP from a metrics endpoint,
//! on SQLite and PostgreSQL.

use std::collections::HashSet;

use tenantry_shared::metrics::MetricsEndpoint;
use tenantry_testkit::{Backend, Sandbox, SandboxOptions, backend_tests};

backend_tests!(metrics_count_tenants_and_stay_bounded);

async fn scrape(endpoint: &MetricsEndpoint) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(endpoint.local_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: tenantry\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The `tenant` label values of one metric.
fn tenant_labels(scraped: &str, metric: &str) -> HashSet<String> {
    scraped
        .lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter_map(|line| {
            let start = line.find("tenant=\"")? + "tenant=\"".len();
            let end = line[start..].find('"')? + start;
            Some(line[start..end].to_owned())
        })
        .collect()
}

async fn metrics_count_tenants_and_stay_bounded(backend: Backend) {
    const LIMIT: usize = 3;
    let sandbox = Sandbox::start_with(
        backend,
        SandboxOptions {
            metrics_tenant_limit: Some(LIMIT),
            ..Default::default()
        },
    )
    .await;
    let endpoint = MetricsEndpoint::start("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    endpoint.add(sandbox.data_plane().metrics.clone());
    if let Some(control_plane) = sandbox
        .control_plane
        .as_ref()
        .and_then(|cp| cp.metrics.clone())
    {
        endpoint.add(control_plane);
    }

    // Per-tenant counters move.
    let busy = sandbox.tid("busy");
    sandbox.create(&busy).await;
    for _ in 0..3 {
        sandbox
            .query(&busy, "SELECT 1 AS one", vec![])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let refused = sandbox.query(&busy, "SELEC nonsense", vec![]).await;
    assert!(refused.is_err());
    let scraped = scrape(&endpoint).await;
    for expected in [
        format!(
            "tenantry_dataplane_requests_total{{tenant=\"{busy}\",method=\"Query\",code=\"0\"}} 3"
        ),
        format!(
            "tenantry_dataplane_requests_total{{tenant=\"{busy}\",method=\"Query\",code=\"3\"}} 1"
        ),
        format!(
            "tenantry_dataplane_request_duration_seconds_count{{tenant=\"{busy}\",method=\"Query\"}} 4"
        ),
        format!("tenantry_dataplane_pool_connections{{tenant=\"{busy}\",state=\"open\"}}"),
        "tenantry_controlplane_tenants{state=\"ACTIVE\"} 1".to_owned(),
        "tenantry_controlplane_watch_streams 1".to_owned(),
    ] {
        assert!(
            scraped.contains(&expected),
            "no {expected:?} in:\n{scraped}"
        );
    }

    // More tenants than the label limit: at most LIMIT tenant values plus `other`.
    let mut others = Vec::new();
    for n in 0..(LIMIT + 3) {
        let id = sandbox.tid(&format!("many{n}"));
        sandbox.create(&id).await;
        for _ in 0..=n {
            sandbox
                .query(&id, "SELECT 1 AS one", vec![])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        others.push(id);
    }
    let scraped = scrape(&endpoint).await;
    let values = tenant_labels(&scraped, "tenantry_dataplane_requests_total");
    assert!(values.contains("other"), "{values:?}");
    assert!(
        values.len() <= LIMIT + 1,
        "{} tenant values: {values:?}",
        values.len()
    );
    let latency = tenant_labels(
        &scraped,
        "tenantry_dataplane_request_duration_seconds_count",
    );
    assert!(latency.len() <= LIMIT + 1, "{latency:?}");
    let pools = tenant_labels(&scraped, "tenantry_dataplane_pool_connections");
    assert!(pools.len() <= LIMIT + 1, "{pools:?}");

    // A new window: the busiest tenants of the last one keep (or get) a label.
    sandbox.data_plane().metrics.end_window();
    for _ in 0..20 {
        sandbox
            .query(&others[0], "SELECT 1 AS one", vec![])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    sandbox.data_plane().metrics.end_window();
    let scraped = scrape(&endpoint).await;
    let values = tenant_labels(&scraped, "tenantry_dataplane_requests_total");
    assert!(values.len() <= LIMIT + 1, "{values:?}");
    sandbox
        .query(&others[0], "SELECT 1 AS one", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let scraped = scrape(&endpoint).await;
    assert!(
        tenant_labels(&scraped, "tenantry_dataplane_requests_total").contains(&others[0]),
        "the busiest tenant of the last window has no label of its own:\n{scraped}"
    );
    endpoint.stop();
}
