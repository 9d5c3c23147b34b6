//! The router: tenant id -> route, in a `DashMap`, filled from the control plane.
//!
//! On a miss it asks the control plane (`GetRoute`) once per tenant even when many
//! requests miss at the same time (single flight), and at most `MAX_CONCURRENT_MISSES`
//! tenants at a time. Ids the control plane does not know are remembered for a short
//! while, so a stream of requests for unknown ids does not turn into a stream of calls.
//! Routes are kept fresh by the route stream (`routing::stream`): every change the control
//! plane commits is applied here (`apply`) within milliseconds, and a route learned from
//! the stream also clears a remembered "unknown".

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tenantry_proto::controlplane::v1 as pb;
use tenantry_proto::controlplane::v1::routing_service_client::RoutingServiceClient;
use tenantry_shared::TenantId;
use tokio::sync::{Mutex, Semaphore};
use tonic::transport::Channel;

use super::route::{Route, RouteState, Target};
use crate::error::DataPlaneError;

const MAX_CONCURRENT_MISSES: usize = 32;
const MAX_REMEMBERED_UNKNOWN: usize = 100_000;

#[derive(Clone, Debug)]
pub struct RouterOptions {
    pub unknown_tenant_ttl: Duration,
    /// Deadline of one call to the control plane.
    pub control_plane_timeout: Duration,
}

pub struct Router {
    routes: DashMap<TenantId, Arc<Route>>,
    unknown_until: DashMap<TenantId, Instant>,
    inflight: DashMap<TenantId, Arc<Mutex<()>>>,
    miss_slots: Semaphore,
    client: RoutingServiceClient<TracedChannel>,
    /// For the route stream: same control plane, no per-call timeout (the stream lives
    /// for as long as the connection), HTTP/2 pings to notice a dead peer.
    stream_client: RoutingServiceClient<TracedChannel>,
    options: RouterOptions,
    /// `GetRoute` calls made so far (misses that reached the control plane).
    route_fetches: std::sync::atomic::AtomicU64,
}

impl Router {
    /// A router that reaches the control plane at `control_plane_url` (connects lazily).
    pub fn new(control_plane_url: &str, options: RouterOptions) -> Result<Self, DataPlaneError> {
        let endpoint = Channel::from_shared(control_plane_url.to_owned())
            .map_err(|error| {
                DataPlaneError::InvalidArgument(format!(
                    "control_plane_url {control_plane_url:?} is not a valid URL: {error}"
                ))
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let channel = endpoint
            .clone()
            .timeout(options.control_plane_timeout)
            .connect_lazy();
        let stream_channel = endpoint
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Self {
            routes: DashMap::new(),
            unknown_until: DashMap::new(),
            inflight: DashMap::new(),
            miss_slots: Semaphore::new(MAX_CONCURRENT_MISSES),
            client: RoutingServiceClient::new(traced(channel)),
            stream_client: RoutingServiceClient::new(traced(stream_channel))
                .max_decoding_message_size(64 * 1024 * 1024),
            options,
            route_fetches: Default::default(),
        })
    }

    /// The route a request resolved earlier (`resolved`) must use now: the cached one if
    /// the route changed since, checked again for serving. No request uses connection
    /// details the data plane has already replaced.
    pub(crate) fn current(
        &self,
        tenant_id: &TenantId,
        resolved: &Arc<Route>,
    ) -> Result<Arc<Route>, DataPlaneError> {
        match self.cached(tenant_id) {
            Some(newer) if newer.version > resolved.version => {
                newer.check_serving(tenant_id)?;
                Ok(newer)
            }
            _ => Ok(resolved.clone()),
        }
    }

    /// Whether the cached route of `tenant_id` still serves with `target` (see
    /// `Route::serves`); false when no route is cached.
    pub(crate) fn serves(&self, tenant_id: &TenantId, target: &Target) -> bool {
        self.routes
            .get(tenant_id)
            .is_some_and(|route| route.serves(target))
    }

    /// The cached route, if any.
    pub fn cached(&self, tenant_id: &TenantId) -> Option<Arc<Route>> {
        self.routes.get(tenant_id).map(|route| route.clone())
    }

    /// The tenant's route: from the cache, or from the control plane on a miss. A cached
    /// PROVISIONING route is also asked for again: CreateTenant returns once the tenant is
    /// ACTIVE, and a caller that goes straight to the data plane must not be refused
    /// because the stream's ACTIVE route is still a moment away.
    pub async fn resolve(&self, tenant_id: &TenantId) -> Result<Arc<Route>, DataPlaneError> {
        let seen = self.cached(tenant_id);
        if let Some(route) = &seen
            && route.state != RouteState::Provisioning
        {
            return Ok(route.clone());
        }
        if seen.is_none() {
            self.check_unknown(tenant_id)?;
        }
        let flight = self.inflight.entry(tenant_id.clone()).or_default().clone();
        let _flight_guard = flight.lock().await;
        // Another request may have fetched it while this one waited.
        if let Some(route) = self.cached(tenant_id)
            && (route.state != RouteState::Provisioning
                || seen
                    .as_ref()
                    .is_some_and(|seen| seen.version != route.version))
        {
            return Ok(route);
        }
        if seen.is_none() {
            self.check_unknown(tenant_id)?;
        }
        // Removed even if this request is cancelled half-way, so the map stays bounded.
        let _forget_flight = ForgetFlight {
            inflight: &self.inflight,
            tenant_id,
        };
        self.fetch(tenant_id).await
    }

    fn check_unknown(&self, tenant_id: &TenantId) -> Result<(), DataPlaneError> {
        if let Some(until) = self.unknown_until.get(tenant_id)
            && Instant::now() < *until
        {
            return Err(unknown_tenant(tenant_id));
        }
        Ok(())
    }

    async fn fetch(&self, tenant_id: &TenantId) -> Result<Arc<Route>, DataPlaneError> {
        let _slot =
            self.miss_slots.acquire().await.map_err(|_| {
                DataPlaneError::Unavailable("data plane is shutting down".to_owned())
            })?;
        self.route_fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut client = self.client.clone();
        let request = pb::GetRouteRequest {
            tenant_id: tenant_id.to_string(),
        };
        match client.get_route(request).await {
            Ok(response) => {
                let route = Arc::new(Route::from_proto(response.into_inner())?);
                // The stream may have brought a newer route meanwhile; the newest wins.
                Ok(self.apply(tenant_id.clone(), route, false))
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                self.remember_unknown(tenant_id);
                Err(unknown_tenant(tenant_id))
            }
            Err(status) => {
                tracing::warn!(tenant.id = %tenant_id, code = ?status.code(), message = status.message(), "route lookup failed");
                Err(DataPlaneError::Unavailable(format!(
                    "cannot look up tenant {tenant_id}: the control plane is unreachable or failing ({:?})",
                    status.code()
                )))
            }
        }
    }

    fn remember_unknown(&self, tenant_id: &TenantId) {
        if self.routes.contains_key(tenant_id) {
            // The stream brought the tenant while its lookup was on the way back.
            return;
        }
        if self.unknown_until.len() >= MAX_REMEMBERED_UNKNOWN {
            let now = Instant::now();
            self.unknown_until.retain(|_, until| *until > now);
            if self.unknown_until.len() >= MAX_REMEMBERED_UNKNOWN {
                self.unknown_until.clear();
            }
        }
        self.unknown_until.insert(
            tenant_id.clone(),
            Instant::now() + self.options.unknown_tenant_ttl,
        );
        // `apply` inserts the route before it clears this mark; check again so a route
        // applied meanwhile is never hidden behind it.
        if self.routes.contains_key(tenant_id) {
            self.unknown_until.remove(tenant_id);
        }
    }

    /// Puts `route` into the cache unless the cache already holds a newer one (or
    /// whatever it holds, with `force`: a snapshot), and forgets that the tenant was
    /// unknown. Returns the route the cache holds now.
    pub fn apply(&self, tenant_id: TenantId, route: Arc<Route>, force: bool) -> Arc<Route> {
        let held = match self.routes.entry(tenant_id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(mut occupied) => {
                if force || occupied.get().version <= route.version {
                    occupied.insert(route.clone());
                }
                occupied.get().clone()
            }
            dashmap::mapref::entry::Entry::Vacant(vacant) => vacant.insert(route).clone(),
        };
        self.unknown_until.remove(&tenant_id);
        match &held.tracing {
            Some((ratio, log_level, until)) => {
                tenantry_shared::telemetry::set_tenant_tracing(
                    tenant_id.as_str(),
                    *ratio,
                    log_level,
                    *until,
                );
            }
            None => tenantry_shared::telemetry::clear_tenant_tracing(tenant_id.as_str()),
        }
        held
    }

    /// Forgets every route not in `keep` (after a snapshot: the registry no longer knows
    /// them). Returns the ids forgotten.
    pub fn retain_only(&self, keep: &std::collections::HashSet<TenantId>) -> Vec<TenantId> {
        let gone: Vec<TenantId> = self
            .routes
            .iter()
            .filter(|entry| !keep.contains(entry.key()))
            .map(|entry| entry.key().clone())
            .collect();
        for tenant_id in &gone {
            self.routes.remove(tenant_id);
        }
        gone
    }

    /// Forgets a tenant's route (one the control plane sent but this data plane cannot
    /// use: it must not go on serving an older one).
    pub fn forget(&self, tenant_id: &TenantId) {
        self.routes.remove(tenant_id);
    }

    /// The client for the route stream.
    pub fn stream_client(&self) -> RoutingServiceClient<TracedChannel> {
        self.stream_client.clone()
    }

    /// Puts a route into the cache as if the control plane had sent it. For tests that
    /// must show a wrong route is caught; nothing in the data plane calls it.
    #[cfg(feature = "testing")]
    pub fn insert_route_for_tests(&self, tenant_id: TenantId, route: Arc<Route>) {
        self.routes.insert(tenant_id, route);
    }

    /// Drops a cached route, so the next request misses. For tests of the miss path;
    /// nothing in the data plane calls it.
    #[cfg(feature = "testing")]
    pub fn forget_route_for_tests(&self, tenant_id: &TenantId) {
        self.routes.remove(tenant_id);
    }

    /// How many `GetRoute` calls this router has made.
    pub fn route_fetches(&self) -> u64 {
        self.route_fetches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// A channel whose calls carry the current trace context (so a route lookup shows up in
/// the trace of the request that missed).
pub(super) type TracedChannel = tenantry_shared::grpc_trace::InjectTraceService<Channel>;

fn traced(channel: Channel) -> TracedChannel {
    tower::Layer::layer(&tenantry_shared::grpc_trace::InjectTraceLayer, channel)
}

/// Removes a tenant's single-flight entry when the fetching request ends, however it ends.
struct ForgetFlight<'a> {
    inflight: &'a DashMap<TenantId, Arc<Mutex<()>>>,
    tenant_id: &'a TenantId,
}

impl Drop for ForgetFlight<'_> {
    fn drop(&mut self) {
        self.inflight.remove(self.tenant_id);
    }
}

fn unknown_tenant(tenant_id: &TenantId) -> DataPlaneError {
    DataPlaneError::NotFound(format!("tenant {tenant_id} does not exist"))
}

#[cfg(test)]
mod tests {
    //! The router's cache rules, without a control plane (nothing here misses; the
    //! channel to it is made lazily, inside a runtime).

    use super::*;

    fn router() -> Router {
        Router::new(
            "http://127.0.0.1:9",
            RouterOptions {
                unknown_tenant_ttl: Duration::from_secs(1),
                control_plane_timeout: Duration::from_secs(1),
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn tenant(id: &str) -> TenantId {
        TenantId::parse(id).unwrap_or_else(|e| panic!("{e}"))
    }

    fn route(state: RouteState, version: i64, path: &str) -> Arc<Route> {
        Arc::new(Route {
            state,
            reason: "on request".to_owned(),
            version,
            target: Some(Target::Sqlite {
                path: path.to_owned(),
                incarnation: 1,
            }),
            max_connections: 0,
            tracing: None,
        })
    }

    #[tokio::test]
    async fn the_newest_route_wins_unless_a_snapshot_replaces_it() {
        let router = router();
        let acme = tenant("acme");
        router.apply(acme.clone(), route(RouteState::Active, 5, "/a"), false);
        let held = router.apply(acme.clone(), route(RouteState::Suspended, 3, "/a"), false);
        assert_eq!((held.version, held.state), (5, RouteState::Active));
        let held = router.apply(acme.clone(), route(RouteState::Suspended, 3, "/a"), true);
        assert_eq!((held.version, held.state), (3, RouteState::Suspended));
    }

    #[tokio::test]
    async fn a_request_uses_the_newer_route_and_its_refusal() {
        let router = router();
        let acme = tenant("acme");
        let resolved = route(RouteState::Active, 1, "/a");
        router.apply(acme.clone(), resolved.clone(), false);
        let current = router.current(&acme, &resolved).map_err(|e| e.to_string());
        assert_eq!(current.map(|r| r.version), Ok(1));
        router.apply(acme.clone(), route(RouteState::Active, 2, "/b"), false);
        let current = router.current(&acme, &resolved).map_err(|e| e.to_string());
        assert_eq!(current.map(|r| r.version), Ok(2));
        router.apply(acme.clone(), route(RouteState::Suspended, 3, "/b"), false);
        assert!(matches!(
            router.current(&acme, &resolved),
            Err(DataPlaneError::FailedPrecondition(_))
        ));
        // A cached ACTIVE route is served without asking the control plane.
        let globex = tenant("globex");
        router.apply(globex.clone(), route(RouteState::Active, 4, "/g"), false);
        assert!(router.resolve(&globex).await.is_ok());
        assert_eq!(router.route_fetches(), 0);
    }

    #[tokio::test]
    async fn a_pool_serves_only_its_own_active_target() {
        let router = router();
        let acme = tenant("acme");
        let a = Target::Sqlite {
            path: "/a".to_owned(),
            incarnation: 1,
        };
        assert!(!router.serves(&acme, &a), "no route, yet it serves");
        router.apply(acme.clone(), route(RouteState::Active, 1, "/a"), false);
        assert!(router.serves(&acme, &a));
        let moved = Target::Sqlite {
            path: "/a".to_owned(),
            incarnation: 2,
        };
        assert!(
            !router.serves(&acme, &moved),
            "a new incarnation is other details"
        );
        router.apply(acme.clone(), route(RouteState::Deleting, 2, "/a"), false);
        assert!(!router.serves(&acme, &a));
        assert_eq!(router.retain_only(&Default::default()), vec![acme.clone()]);
        assert!(router.cached(&acme).is_none());
    }
}
