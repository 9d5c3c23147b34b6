//! Routing: which tenant lives where, and whether it serves. The router (a `DashMap`
//! filled on demand from the control plane's `GetRoute`), the route stream that keeps it
//! fresh (`WatchRoutes`), and the `Route` rules every freshness decision goes through.
//!
//! Routing is the lowest room of the data plane after `error`: it never names the pool,
//! the backends, the layers or the services. The pool hears of route changes through
//! `RouteListener`.

mod route;
mod router;
mod stream;

pub use route::{Route, RouteState, SslMode, Target};
pub use router::{Router, RouterOptions};
pub(crate) use stream::RouteListener;
pub(crate) use stream::run as run_route_stream;
pub use stream::{ROUTE_STREAM_HEALTH_SERVICE, StreamProgress};
