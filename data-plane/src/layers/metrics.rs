//! The metrics layer: times and counts every SqlService call by tenant, method and gRPC
//! status code, refused calls too (it sits outside the tenant layer). What it records
//! goes to a `RecordRequest` (the metrics registry, `service::metrics`).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tenantry_shared::TenantId;
use tenantry_shared::metadata::CallTenant;
use tower::{Layer, Service};

use super::sql_service_method;

/// Where the metrics layer records each call.
pub(crate) trait RecordRequest: Send + Sync + 'static {
    /// One SqlService call: the tenant it named (None: no valid one), its method, its
    /// gRPC status code and how long it took.
    fn record(&self, tenant: Option<&TenantId>, method: &str, code: i64, elapsed: Duration);
}

/// Counts SqlService calls (outermost layer, so refused calls count too).
#[derive(Clone)]
pub(crate) struct MetricsLayer {
    metrics: Arc<dyn RecordRequest>,
}

impl MetricsLayer {
    pub(crate) fn new(metrics: Arc<dyn RecordRequest>) -> Self {
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
pub(crate) struct MetricsService<S> {
    inner: S,
    metrics: Arc<dyn RecordRequest>,
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
        let Some(method) = sql_service_method(request.uri().path()).map(str::to_owned) else {
            return Box::pin(inner.call(request));
        };
        let tenant = CallTenant::of(&request).named().cloned();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        Box::pin(async move {
            let result = inner.call(request).await;
            let code = match &result {
                Ok(response) => tenantry_shared::grpc_trace::status_code(response),
                // UNKNOWN: the service failed below gRPC.
                Err(_) => 2,
            };
            metrics.record(tenant.as_ref(), &method, code, started.elapsed());
            result
        })
    }
}
