//! The outermost layer: parses the call's `x-tenant-id` metadata once into a
//! `CallTenant` in the request's extensions. It refuses nothing; the tenant layer does,
//! with the parse's own message, and the trace and metrics layers read the tenant from
//! here.

use std::task::{Context, Poll};

use tenantry_shared::metadata::CallTenant;
use tower::{Layer, Service};

#[derive(Clone, Copy, Debug, Default)]
pub struct TenantIdLayer;

impl<S> Layer<S> for TenantIdLayer {
    type Service = TenantIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantIdService { inner }
    }
}

#[derive(Clone)]
pub struct TenantIdService<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for TenantIdService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let call_tenant = CallTenant::from_headers(request.headers());
        request.extensions_mut().insert(call_tenant);
        self.inner.call(request)
    }
}
