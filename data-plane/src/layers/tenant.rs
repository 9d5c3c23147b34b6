//! The tenant layer: takes the tenant id the outermost layer parsed (`CallTenant`),
//! resolves the tenant's route, checks that the tenant serves, and puts a
//! `TenantContext` into the request's extensions. Calls to other services (health,
//! reflection, pool figures) pass through untouched.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tenantry_shared::TenantId;
use tenantry_shared::metadata::CallTenant;
use tonic::body::Body;
use tower::{Layer, Service};

use super::context::TenantContext;
use super::sql_service_method;
use crate::error::DataPlaneError;
use crate::routing::Router;

#[derive(Clone)]
pub struct TenantLayer {
    router: Arc<Router>,
}

impl TenantLayer {
    pub fn new(router: Arc<Router>) -> Self {
        Self { router }
    }
}

impl<S> Layer<S> for TenantLayer {
    type Service = TenantRouteService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantRouteService {
            inner,
            router: self.router.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TenantRouteService<S> {
    inner: S,
    router: Arc<Router>,
}

/// The tenant the call acts for, from the `CallTenant` the outermost layer parsed (or
/// from the headers, if that layer is not in the stack).
fn tenant_of(request: &http::Request<Body>) -> Result<TenantId, DataPlaneError> {
    CallTenant::of(request)
        .require()
        .cloned()
        .map_err(|error| DataPlaneError::InvalidArgument(error.to_string()))
}

impl<S> Service<http::Request<Body>> for TenantRouteService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone is the one that is ready; keep it for this call (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if sql_service_method(request.uri().path()).is_none() {
            return Box::pin(inner.call(request));
        }
        let router = self.router.clone();
        let tenant_id = tenant_of(&request);
        Box::pin(async move {
            let resolved = async {
                let tenant_id = tenant_id?;
                let route = router.resolve(&tenant_id).await?;
                route.check_serving(&tenant_id)?;
                Ok::<_, DataPlaneError>(TenantContext { tenant_id, route })
            }
            .await;
            match resolved {
                Ok(context) => {
                    request.extensions_mut().insert(context);
                    inner.call(request).await
                }
                Err(error) => Ok(error.into_http()),
            }
        })
    }
}
