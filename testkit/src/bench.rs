//! What only the benches need: the length of a measured round, percentiles and their
//! printing, run ids for bench tenants, and deleting the tenants a bench created.

use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use tenantry_proto::controlplane::v1 as cp;
use tenantry_proto::controlplane::v1::tenant_service_client::TenantServiceClient;
use tonic::transport::Channel;

/// Length of one measured round: `TENANTRY_BENCH_SECONDS` (default 3).
pub fn seconds_per_round() -> Duration {
    let seconds = std::env::var("TENANTRY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(seconds)
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// A short random lowercase id for names unique to one run.
pub fn run_id() -> String {
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// Deletes tenants `ids` (their PostgreSQL databases and roles), `parallel` at a time;
/// one that was never created (NOT_FOUND) counts as deleted. The error names the
/// tenants left behind.
pub async fn delete_tenants(
    tenants: &TenantServiceClient<Channel>,
    ids: Vec<String>,
    parallel: usize,
) -> anyhow::Result<()> {
    let undeleted: Vec<String> = futures::stream::iter(ids)
        .map(|tenant_id| {
            let mut tenants = tenants.clone();
            async move {
                match tenants
                    .delete_tenant(cp::DeleteTenantRequest {
                        tenant_id: tenant_id.clone(),
                    })
                    .await
                {
                    Err(status) if status.code() != tonic::Code::NotFound => {
                        Some(format!("{tenant_id} ({})", status.message()))
                    }
                    _ => None,
                }
            }
        })
        .buffer_unordered(parallel.max(1))
        .filter_map(std::future::ready)
        .collect()
        .await;
    if undeleted.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "could not delete {} bench tenants: {}. The bench's registry is gone with its \
         temporary directory: on PostgreSQL, drop their databases and roles (named \
         tenantry_ and the tenant id, `-` as `_`) by hand",
        undeleted.len(),
        undeleted.join(", ")
    )
}
