//! Control-plane metrics (Prometheus text format, served by the binary's endpoint):
//!
//! - `tenantry_controlplane_tenants{state}`: tenants by state, read from the registry at
//!   each scrape;
//! - `tenantry_controlplane_provisioning_duration_seconds{outcome}`: CreateTenant's
//!   provisioning, `outcome` `active` or `failed`;
//! - `tenantry_controlplane_watch_streams`: route streams (data planes) connected.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use sea_orm::Iterable;
use tenantry_shared::metrics::{HistogramFamily, MetricsSource, header, labels};

use crate::registry::{Registry, TenantState};

pub(crate) struct ControlPlaneMetrics {
    registry: Registry,
    provisioning: HistogramFamily,
    watch_streams: Arc<AtomicUsize>,
}

impl ControlPlaneMetrics {
    pub(crate) fn new(registry: Registry, watch_streams: Arc<AtomicUsize>) -> Self {
        Self {
            registry,
            provisioning: HistogramFamily::default(),
            watch_streams,
        }
    }

    pub(crate) fn provisioned(&self, outcome: &str, took: Duration) {
        self.provisioning
            .observe(labels(&[("outcome", outcome)]), took);
    }
}

impl MetricsSource for ControlPlaneMetrics {
    fn render<'a>(&'a self, out: &'a mut String) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            header(
                out,
                "tenantry_controlplane_tenants",
                "gauge",
                "Tenants in the registry by state.",
            );
            let counts = self.registry.tenant_states().await.unwrap_or_default();
            for state in TenantState::iter() {
                let count = counts.get(&state).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "tenantry_controlplane_tenants{{{}}} {count}",
                    labels(&[("state", &state.to_string())])
                );
            }
            header(
                out,
                "tenantry_controlplane_provisioning_duration_seconds",
                "histogram",
                "Time CreateTenant took to provision a tenant, by outcome.",
            );
            self.provisioning
                .render(out, "tenantry_controlplane_provisioning_duration_seconds");
            header(
                out,
                "tenantry_controlplane_watch_streams",
                "gauge",
                "Route streams (data planes) connected.",
            );
            let _ = writeln!(
                out,
                "tenantry_controlplane_watch_streams {}",
                self.watch_streams.load(Ordering::Acquire)
            );
        })
    }
}
