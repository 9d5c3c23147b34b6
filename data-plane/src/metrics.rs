//! Data-plane metrics (Prometheus text format, served by the binary's metrics endpoint):
//!
//! - `tenantry_dataplane_requests_total{tenant,method,code}`: SqlService calls by tenant,
//!   method and gRPC status code;
//! - `tenantry_dataplane_request_duration_seconds{tenant,method}`: their latency;
//! - `tenantry_dataplane_pool_connections{tenant,state}` (`open`, `idle`, `in_use`) and
//!   `tenantry_dataplane_pool_waiting{tenant}`: tenant pools;
//! - `tenantry_dataplane_server_connections{server,state}`,
//!   `tenantry_dataplane_server_budget{server}`: per PostgreSQL server, the budget and how
//!   much of it is used;
//! - `tenantry_dataplane_routes`, `tenantry_dataplane_route_stream_up`.
//!
//! The `tenant` label is bounded (see `tenantry_shared::metrics::TenantLabels`): the
//! busiest `metrics_tenant_limit` tenants get their own value, the rest count as
//! `other`; calls without a valid `x-tenant-id` count as `invalid`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tenantry_shared::metrics::{
    CounterFamily, HistogramFamily, MetricsSource, OTHER_TENANTS, TenantLabels, header, labels,
};
use tenantry_shared::{TenantId, metadata};
use tower::{Layer, Service};

use crate::pools::PoolManager;
use crate::route_stream::StreamStatus;
use crate::router::Router;

const SQL_SERVICE_PREFIX: &str = "/tenantry.dataplane.v1.SqlService/";
const INVALID_TENANT: &str = "invalid";

pub struct DataPlaneMetrics {
    labels: TenantLabels,
    requests: CounterFamily,
    latency: HistogramFamily,
    pools: Arc<PoolManager>,
    router: Arc<Router>,
    route_stream: Arc<StreamStatus>,
}

impl DataPlaneMetrics {
    pub fn new(
        tenant_limit: usize,
        pools: Arc<PoolManager>,
        router: Arc<Router>,
        route_stream: Arc<StreamStatus>,
    ) -> Self {
        Self {
            labels: TenantLabels::new(tenant_limit),
            requests: CounterFamily::default(),
            latency: HistogramFamily::default(),
            pools,
            router,
            route_stream,
        }
    }

    fn record(&self, tenant: Option<&str>, method: &str, code: i64, elapsed: Duration) {
        let tenant = match tenant {
            Some(tenant) => self.labels.label(tenant),
            None => INVALID_TENANT.to_owned(),
        };
        let code = code.to_string();
        self.requests.inc(labels(&[
            ("tenant", &tenant),
            ("method", method),
            ("code", &code),
        ]));
        self.latency
            .observe(labels(&[("tenant", &tenant), ("method", method)]), elapsed);
    }

    /// Ends a ranking window (see `TenantLabels`) and drops the series of tenants that
    /// lost their label.
    pub fn end_window(&self) {
        let dropped = self.labels.end_window();
        if dropped.is_empty() {
            return;
        }
        let prefixes: Vec<String> = dropped
            .iter()
            .map(|tenant| format!("{},", labels(&[("tenant", tenant)])))
            .collect();
        let keep = |series: &str| !prefixes.iter().any(|prefix| series.starts_with(prefix));
        self.requests.retain(keep);
        self.latency.retain(keep);
    }

    fn render_pools(&self, out: &mut String) {
        let (servers, tenants) = self.pools.stats();
        // tenant label -> (open, idle, in_use, waiting)
        let mut by_label: BTreeMap<String, [u64; 4]> = BTreeMap::new();
        for tenant in tenants {
            let label = if self.labels.is_labelled(tenant.tenant_id.as_str()) {
                tenant.tenant_id.to_string()
            } else {
                OTHER_TENANTS.to_owned()
            };
            let sums = by_label.entry(label).or_default();
            sums[0] += u64::from(tenant.connections.open);
            sums[1] += u64::from(tenant.connections.idle);
            sums[2] += u64::from(tenant.connections.in_use);
            sums[3] += u64::from(tenant.connections.waiting);
        }
        header(
            out,
            "tenantry_dataplane_pool_connections",
            "gauge",
            "Connections of tenant pools, by state.",
        );
        for (tenant, sums) in &by_label {
            for (state, value) in [("open", sums[0]), ("idle", sums[1]), ("in_use", sums[2])] {
                let _ = writeln!(
                    out,
                    "tenantry_dataplane_pool_connections{{{}}} {value}",
                    labels(&[("tenant", tenant), ("state", state)])
                );
            }
        }
        header(
            out,
            "tenantry_dataplane_pool_waiting",
            "gauge",
            "Requests waiting for a connection of their tenant's pool.",
        );
        for (tenant, sums) in &by_label {
            let _ = writeln!(
                out,
                "tenantry_dataplane_pool_waiting{{{}}} {}",
                labels(&[("tenant", tenant)]),
                sums[3]
            );
        }
        header(
            out,
            "tenantry_dataplane_server_budget",
            "gauge",
            "Connection budget of each PostgreSQL server.",
        );
        for server in &servers {
            let _ = writeln!(
                out,
                "tenantry_dataplane_server_budget{{{}}} {}",
                labels(&[("server", &server.server)]),
                server.budget
            );
        }
        header(
            out,
            "tenantry_dataplane_server_connections",
            "gauge",
            "Connections held to each PostgreSQL server (budget used), by state.",
        );
        for server in &servers {
            for (state, value) in [
                ("open", server.connections.open),
                ("idle", server.connections.idle),
                ("in_use", server.connections.in_use),
                ("waiting", server.connections.waiting),
            ] {
                let _ = writeln!(
                    out,
                    "tenantry_dataplane_server_connections{{{}}} {value}",
                    labels(&[("server", &server.server), ("state", state)])
                );
            }
        }
    }
}

impl MetricsSource for DataPlaneMetrics {
    fn render<'a>(&'a self, out: &'a mut String) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            header(
                out,
                "tenantry_dataplane_requests_total",
                "counter",
                "SqlService calls by tenant, method and gRPC status code.",
            );
            self.requests
                .render(out, "tenantry_dataplane_requests_total");
            header(
                out,
                "tenantry_dataplane_request_duration_seconds",
                "histogram",
                "SqlService call latency by tenant and method.",
            );
            self.latency
                .render(out, "tenantry_dataplane_request_duration_seconds");
            self.render_pools(out);
            header(
                out,
                "tenantry_dataplane_routes",
                "gauge",
                "Routes this data plane holds.",
            );
            let _ = writeln!(out, "tenantry_dataplane_routes {}", self.router.len());
            header(
                out,
                "tenantry_dataplane_route_stream_up",
                "gauge",
                "1 while the route stream to the control plane is connected and caught up.",
            );
            let _ = writeln!(
                out,
                "tenantry_dataplane_route_stream_up {}",
                u8::from(*self.route_stream.live().borrow())
            );
        })
    }
}

/// Counts SqlService calls (outermost layer, so refused calls count too).
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<DataPlaneMetrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<DataPlaneMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<DataPlaneMetrics>,
}

impl<S, B, R> Service<http::Request<B>> for MetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(method) = request
            .uri()
            .path()
            .strip_prefix(SQL_SERVICE_PREFIX)
            .map(str::to_owned)
        else {
            return Box::pin(inner.call(request));
        };
        let tenant = request
            .headers()
            .get(metadata::TENANT_ID)
            .and_then(|value| TenantId::parse_bytes(value.as_bytes()).ok());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        Box::pin(async move {
            let result = inner.call(request).await;
            let code = match &result {
                Ok(response) => tenantry_shared::grpc_trace::status_code(response),
                // UNKNOWN: the service failed below gRPC.
                Err(_) => 2,
            };
            metrics.record(
                tenant.as_ref().map(TenantId::as_str),
                &method,
                code,
                started.elapsed(),
            );
            result
        })
    }
}
