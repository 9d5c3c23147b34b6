//! The route stream: the data plane holds one `WatchRoutes` stream to the control plane
//! and applies every route it brings to the router, then tells whoever listens
//! (`RouteListener`: the pool manager, which closes a pool whose connection details are
//! no longer right). Routing never names the pool. After a reconnect it resumes from
//! the last version it applied; the control plane sends a snapshot instead when it cannot
//! serve the gap. Reconnects back off exponentially with full jitter.
//!
//! While the stream is down the data plane serves every route it holds. The health
//! service `tenantry.dataplane.v1.RouteStream` reports the stream: SERVING once it has
//! caught up, NOT_SERVING while it is lost (the data plane's overall health stays
//! SERVING: it still serves the tenants it knows).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tenantry_proto::controlplane::v1 as pb;
use tenantry_shared::TenantId;
use tokio::sync::watch;
use tonic_health::ServingStatus as Health;
use tonic_health::server::HealthReporter;

use super::route::Route;
use super::router::Router;

/// Health service name that reports the route stream.
pub const ROUTE_STREAM_HEALTH_SERVICE: &str = "tenantry.dataplane.v1.RouteStream";

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Hears of every route the stream applies to the router (the pool manager does).
pub(crate) trait RouteListener: Send + Sync {
    /// The router now holds `route` for `tenant_id` (`force`: from a snapshot, which
    /// replaces whatever was held, whatever the versions).
    fn route_changed(&self, tenant_id: &TenantId, route: &Route, force: bool);
    /// The control plane sent a route this data plane cannot use; the router forgot the
    /// tenant's route.
    fn route_dropped(&self, tenant_id: &TenantId);
}

/// What the stream has done, for health, tests and stats.
pub struct StreamProgress {
    /// The route version applied last (0: nothing yet).
    applied: watch::Sender<i64>,
    /// Whether the stream is connected and caught up.
    live: watch::Sender<bool>,
}

impl Default for StreamProgress {
    fn default() -> Self {
        Self {
            applied: watch::Sender::new(0),
            live: watch::Sender::new(false),
        }
    }
}

impl StreamProgress {
    /// Follows the last applied route version.
    pub fn applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Follows whether the stream is connected and caught up.
    pub fn live(&self) -> watch::Receiver<bool> {
        self.live.subscribe()
    }
}

/// Follows the control plane's routes until `stop` fires.
pub(crate) async fn run(
    router: Arc<Router>,
    listener: Arc<dyn RouteListener>,
    health: HealthReporter,
    status: Arc<StreamProgress>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut lost_since: Option<std::time::Instant> = None;
    loop {
        let mut caught_up = false;
        let ended = tokio::select! {
            ended = follow(&router, listener.as_ref(), &health, &status, &mut caught_up) => ended,
            _ = stop.changed() => return,
        };
        status.live.send_replace(false);
        health
            .set_service_status(ROUTE_STREAM_HEALTH_SERVICE, Health::NotServing)
            .await;
        if caught_up {
            backoff = MIN_BACKOFF;
        }
        let reason = match ended {
            Ok(()) => String::new(),
            Err(ended) => ended.to_string(),
        };
        if lost_since.is_none() {
            lost_since = Some(std::time::Instant::now());
            tracing::warn!(%reason, "route stream to the control plane lost; serving the routes held, reconnecting");
        } else {
            tracing::debug!(%reason, "route stream reconnect failed");
        }
        let pause = rand::rng().random_range(Duration::ZERO..=backoff);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if caught_up {
            // Reset the outage clock only after a stream that worked.
            lost_since = None;
        }
    }
}

/// Why a route stream ended (for the log).
#[derive(Debug, thiserror::Error)]
enum StreamEnded {
    #[error("the control plane ended the stream")]
    ByControlPlane,
    #[error("{:?}: {}", .0.code(), .0.message())]
    Failed(tonic::Status),
}

/// One stream, from connect to its end. Err says why it ended.
async fn follow(
    router: &Router,
    listener: &dyn RouteListener,
    health: &HealthReporter,
    status: &StreamProgress,
    caught_up: &mut bool,
) -> Result<(), StreamEnded> {
    let after_version = *status.applied.borrow();
    let mut stream = router
        .stream_client()
        .watch_routes(pb::WatchRoutesRequest { after_version })
        .await
        .map_err(StreamEnded::Failed)?
        .into_inner();
    let mut snapshot_ids: Option<HashSet<TenantId>> = None;
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Err(StreamEnded::ByControlPlane),
            Err(status) => return Err(StreamEnded::Failed(status)),
        };
        if message.snapshot && snapshot_ids.is_none() {
            snapshot_ids = Some(HashSet::new());
        }
        for proto in message.routes {
            let Ok(tenant_id) = TenantId::parse(&proto.tenant_id) else {
                tracing::warn!(tenant_id = %proto.tenant_id, "control plane sent a route with an invalid tenant id; ignored");
                continue;
            };
            let route = match Route::from_proto(proto) {
                Ok(route) => Arc::new(route),
                Err(error) => {
                    // Fail closed: the tenant is looked up again on its next request
                    // rather than served from an older route.
                    tracing::warn!(tenant.id = %tenant_id, %error, "control plane sent a route this data plane cannot use; route dropped");
                    router.forget(&tenant_id);
                    listener.route_dropped(&tenant_id);
                    continue;
                }
            };
            // A snapshot may come from another registry whose versions are lower: it
            // replaces what is held whatever the versions.
            let force = snapshot_ids.is_some();
            let held = router.apply(tenant_id.clone(), route, force);
            listener.route_changed(&tenant_id, &held, force);
            if let Some(ids) = &mut snapshot_ids {
                ids.insert(tenant_id);
            }
        }
        if message.caught_up {
            if let Some(ids) = snapshot_ids.take() {
                for gone in router.retain_only(&ids) {
                    tracing::info!(tenant.id = %gone, "tenant no longer in the registry; route forgotten");
                }
            }
            if !*caught_up {
                *caught_up = true;
                status.live.send_replace(true);
                health
                    .set_service_status(ROUTE_STREAM_HEALTH_SERVICE, Health::Serving)
                    .await;
                tracing::info!(version = message.version, "route stream caught up");
            }
        }
        status.applied.send_if_modified(|applied| {
            // A snapshot may come from another registry whose versions are lower.
            let moved =
                message.version > *applied || (message.snapshot && message.version != *applied);
            if moved {
                *applied = message.version;
            }
            moved
        });
    }
}
