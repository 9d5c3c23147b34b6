//! Data-plane metrics (Prometheus text format, served by the binary's metrics endpoint;
//! the metrics layer, `layers::metrics`, records the calls):
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
use std::time::Duration;

use futures::future::BoxFuture;
use tenantry_shared::TenantId;
use tenantry_shared::metrics::{
    CounterFamily, HistogramFamily, MetricsSource, OTHER_TENANTS, TenantLabels, header, labels,
};

use crate::layers::RecordRequest;
use crate::pool::PoolManager;
use crate::routing::{Router, StreamProgress};
const INVALID_TENANT: &str = "invalid";

pub struct DataPlaneMetrics {
    labels: TenantLabels,
    requests: CounterFamily,
    latency: HistogramFamily,
    pools: Arc<PoolManager>,
    router: Arc<Router>,
    route_stream: Arc<StreamProgress>,
}

impl DataPlaneMetrics {
    pub fn new(
        tenant_limit: usize,
        pools: Arc<PoolManager>,
        router: Arc<Router>,
        route_stream: Arc<StreamProgress>,
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

    fn record_request(
        &self,
        tenant: Option<&TenantId>,
        method: &str,
        code: i64,
        elapsed: Duration,
    ) {
        let tenant = match tenant {
            Some(tenant) => self.labels.label(tenant.as_str()),
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

impl RecordRequest for DataPlaneMetrics {
    fn record(&self, tenant: Option<&TenantId>, method: &str, code: i64, elapsed: Duration) {
        self.record_request(tenant, method, code, elapsed);
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
