//! Traces end to end: the testkit's OTLP trace collector (a tonic `TraceService` server)
//! receives the spans of real requests through both planes, on SQLite and PostgreSQL.
//!
//! The default sampling ratio is 0: only tenants switched on with SetTenantTracing are
//! traced. The tracing subscriber is process-wide, so this file holds one test that sets it up
//! once and runs every scenario in turn.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_shared::telemetry::{self, LogFormat, TracingConfig};
use tenantry_testkit::otlp::TraceCollector;
use tenantry_testkit::{Backend, Patience, Sandbox, placeholder, text, wait_until_ok, with_tenant};

fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[test]
fn traces_follow_a_tenant_through_both_planes() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        let collector = TraceCollector::keeping_spans();
        let endpoint = collector.serve().await.unwrap_or_else(|e| panic!("{e}"));
        let guard = telemetry::init(
            "tenantry-test",
            LogFormat::Text,
            &TracingConfig {
                otlp_endpoint: Some(endpoint),
                // Nothing is traced unless a tenant is switched on.
                sample_ratio: Some(0.0),
            },
            "warn",
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        for backend in [Backend::Sqlite, Backend::Postgres] {
            request_trace(backend, &collector, &guard).await;
            per_tenant_switch(backend, &collector, &guard).await;
        }
    });
}

async fn request_trace(
    backend: Backend,
    collector: &TraceCollector,
    guard: &telemetry::TelemetryGuard,
) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("traced");
    sandbox.create(&id).await;
    trace_tenant(&sandbox, &id, 1.0, 600).await;
    sandbox
        .execute(&id, "CREATE TABLE notes (body TEXT)", vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Make the data plane look the route up again, inside the traced request.
    sandbox.data_plane().router.forget_route_for_tests(
        &tenantry_shared::TenantId::parse(&id).unwrap_or_else(|e| panic!("{e}")),
    );
    let secret = format!("secret-parameter-{}", sandbox.run_id);
    let sql = format!(
        "SELECT count(*) AS n FROM notes WHERE body = {}",
        placeholder(backend, 1)
    );
    sandbox
        .sql()
        .query(with_tenant(
            dp::QueryRequest {
                statement: Some(dp::Statement {
                    sql: sql.clone(),
                    params: vec![text(&secret)],
                }),
            },
            &id,
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Wait for the request's spans to arrive.
    let patience = Patience::new(Duration::from_secs(20), Duration::from_millis(100));
    let (server, trace) = wait_until_ok(patience, || async {
        guard.flush();
        let spans = collector.snapshot();
        let server = spans.iter().find(|span| {
            let attributes = attributes(span);
            attributes.get("rpc.method").map(String::as_str) == Some("Query")
                && attributes.get("tenant.id") == Some(&id)
        });
        if let Some(server) = server {
            let trace: Vec<Span> = spans
                .iter()
                .filter(|span| span.trace_id == server.trace_id)
                .cloned()
                .collect();
            let has_sql = trace
                .iter()
                .any(|span| attributes(span).contains_key("db.query.text"));
            let has_lookup = trace.iter().any(|span| {
                attributes(span).get("rpc.method").map(String::as_str) == Some("GetRoute")
            });
            if has_sql && has_lookup {
                return Ok((server.clone(), trace));
            }
        }
        Err(format!(
            "{backend:?}: the request's spans never all arrived ({} spans received)",
            spans.len()
        ))
    })
    .await;

    // The data plane's call span.
    let server_attributes = attributes(&server);
    assert_eq!(server_attributes["rpc.system"], "grpc");
    assert_eq!(
        server_attributes["rpc.service"],
        "tenantry.dataplane.v1.SqlService"
    );
    assert_eq!(server_attributes["rpc.grpc.status_code"], "0");

    // Every span of the request names the tenant.
    for span in &trace {
        assert_eq!(
            attributes(span).get("tenant.id"),
            Some(&id),
            "{backend:?}: span {:?} lacks tenant.id",
            span.name
        );
    }
    // The control plane's GetRoute is a child of the data plane's call, across processes'
    // worth of gRPC.
    let lookup = trace
        .iter()
        .find(|span| attributes(span).get("rpc.method").map(String::as_str) == Some("GetRoute"))
        .unwrap_or_else(|| panic!("no GetRoute span"));
    assert_eq!(lookup.parent_span_id, server.span_id, "GetRoute's parent");
    // The SQL span: named by operation, with the database and the text, no values.
    let statement = trace
        .iter()
        .find(|span| attributes(span).contains_key("db.query.text"))
        .unwrap_or_else(|| panic!("no SQL span"));
    let statement_attributes = attributes(statement);
    assert!(statement.name.starts_with("SELECT "), "{}", statement.name);
    assert_eq!(
        statement.parent_span_id, server.span_id,
        "SQL span's parent"
    );
    assert_eq!(
        statement_attributes["db.system.name"],
        match backend {
            Backend::Postgres => "postgresql",
            Backend::Sqlite => "sqlite",
        }
    );
    assert!(!statement_attributes["db.namespace"].is_empty());
    assert_eq!(statement_attributes["db.query.text"], sql);
    for span in collector.snapshot() {
        for (key, value) in attributes(&span) {
            assert!(
                !value.contains(&secret),
                "{backend:?}: a parameter value was exported in {key} of {}",
                span.name
            );
        }
    }
}

/// Sets a tenant's tracing override and waits until the data plane has it.
async fn trace_tenant(sandbox: &Sandbox, tenant_id: &str, ratio: f64, seconds: i64) {
    let tenant = sandbox
        .tenants()
        .set_tenant_tracing(cp::SetTenantTracingRequest {
            tenant_id: tenant_id.to_owned(),
            ratio,
            duration: Some(prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(tenant.tracing.map(|t| t.ratio), Some(ratio));
    let mut applied = sandbox.data_plane().route_stream.applied();
    tokio::time::timeout(
        Duration::from_secs(10),
        applied.wait_for(|version| *version >= tenant.route_version),
    )
    .await
    .unwrap_or_else(|_| panic!("the override never reached the data plane"))
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Runs a query whose text carries `marker`, so its spans can be found.
async fn marked_query(sandbox: &Sandbox, tenant_id: &str, marker: &str) {
    sandbox
        .query(
            tenant_id,
            &format!("SELECT 1 AS one /* {marker} */"),
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

fn spans_with(collector: &TraceCollector, key: &str, needle: &str) -> usize {
    collector
        .snapshot()
        .iter()
        .filter(|span| {
            attributes(span)
                .get(key)
                .is_some_and(|value| value.contains(needle))
        })
        .count()
}

/// With a default ratio of 0, only the tenant switched to 1.0 is traced, until the switch
/// expires.
async fn per_tenant_switch(
    backend: Backend,
    collector: &TraceCollector,
    guard: &telemetry::TelemetryGuard,
) {
    let sandbox = Sandbox::start(backend).await;
    let watched = sandbox.tid("watched");
    let quiet = sandbox.tid("quiet");
    sandbox.create(&watched).await;
    sandbox.create(&quiet).await;
    trace_tenant(&sandbox, &watched, 1.0, 3).await;
    let (first, other) = (
        format!("first-{}", sandbox.run_id),
        format!("other-{}", sandbox.run_id),
    );
    marked_query(&sandbox, &watched, &first).await;
    marked_query(&sandbox, &quiet, &other).await;
    let patience = Patience::new(Duration::from_secs(20), Duration::from_millis(100));
    wait_until_ok(patience, || async {
        if spans_with(collector, "db.query.text", &first) > 0 {
            return Ok(());
        }
        guard.flush();
        Err(format!(
            "{backend:?}: the traced tenant's spans never arrived"
        ))
    })
    .await;
    guard.flush();
    assert_eq!(
        spans_with(collector, "tenant.id", &quiet),
        0,
        "{backend:?}: untraced tenant exported spans"
    );
    assert_eq!(spans_with(collector, "db.query.text", &other), 0);

    // After expiry: nothing from the watched tenant either.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let after = format!("after-{}", sandbox.run_id);
    marked_query(&sandbox, &watched, &after).await;
    guard.flush();
    tokio::time::sleep(Duration::from_millis(500)).await;
    guard.flush();
    assert_eq!(
        spans_with(collector, "db.query.text", &after),
        0,
        "{backend:?}: traced after the switch expired"
    );
    let tenant = sandbox
        .get(&watched)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(tenant.tracing.is_none(), "expired override still shown");

    // Bad input.
    let refused = sandbox
        .tenants()
        .set_tenant_tracing(cp::SetTenantTracingRequest {
            tenant_id: watched.clone(),
            ratio: 1.5,
            duration: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(refused, Some(tonic::Code::InvalidArgument));
}
