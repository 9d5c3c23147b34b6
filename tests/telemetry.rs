//! Traces end to end: an OTLP collector started here (a tonic `TraceService` server)
//! receives the spans of real requests through both planes, on SQLite and PostgreSQL.
//!
//! The tracing subscriber is process-wide, so this file holds one test that sets it up
//! once and runs every scenario in turn.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, Sandbox, text, with_tenant};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_shared::telemetry::{self, LogFormat, TracingConfig};

/// Spans the collector received.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        if let Ok(mut held) = self.spans.lock() {
            held.extend(spans);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    fn snapshot(&self) -> Vec<Span> {
        self.spans
            .lock()
            .map(|spans| spans.clone())
            .unwrap_or_default()
    }
}

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
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let guard = telemetry::init(
            "tenantry-test",
            LogFormat::Text,
            &TracingConfig {
                otlp_endpoint: Some(format!("http://{address}")),
                sample_ratio: Some(1.0),
            },
            "warn",
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        for backend in [Backend::Sqlite, Backend::Postgres] {
            request_trace(backend, &collector, &guard).await;
        }
    });
}

async fn request_trace(backend: Backend, collector: &Collector, guard: &telemetry::TelemetryGuard) {
    let sandbox = Sandbox::start(backend).await;
    let id = sandbox.tid("traced");
    sandbox.create(&id).await;
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
        common::placeholder(backend, 1)
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
    let deadline = Instant::now() + Duration::from_secs(20);
    let (server, trace) = loop {
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
                break (server.clone(), trace);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{backend:?}: the request's spans never all arrived ({} spans received)",
            spans.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

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
