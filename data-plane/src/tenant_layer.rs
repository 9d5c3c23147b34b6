//! The tenant layer: reads and validates `x-tenant-id`, resolves the tenant's route,
//! checks that the tenant serves, and puts a `TenantContext` into the request's
//! extensions. Calls to other services (health, reflection, pool figures) pass through
//! untouched.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tenantry_shared::{TenantId, metadata};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::context::TenantContext;
use crate::error::DataPlaneError;
use crate::router::Router;

/// Path prefix of the service that acts for a tenant.
const TENANT_SCOPED_PREFIX: &str = "/tenantry.dataplane.v1.SqlService/";

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
    type Service = TenantService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantService {
            inner,
            router: self.router.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TenantService<S> {
    inner: S,
    router: Arc<Router>,
}

/// Reads the tenant id from the request headers (gRPC metadata).
pub fn tenant_id_from_headers(headers: &http::HeaderMap) -> Result<TenantId, DataPlaneError> {
    let mut values = headers.get_all(metadata::TENANT_ID).iter();
    let value = values.next().ok_or_else(|| {
        DataPlaneError::InvalidArgument(format!(
            "missing {} metadata: say which tenant the call acts for",
            metadata::TENANT_ID
        ))
    })?;
    if values.next().is_some() {
        return Err(DataPlaneError::InvalidArgument(format!(
            "{} metadata is given more than once; give it once",
            metadata::TENANT_ID
        )));
    }
    TenantId::parse_bytes(value.as_bytes()).map_err(|error| {
        DataPlaneError::InvalidArgument(format!("{}: {error}", metadata::TENANT_ID))
    })
}

impl<S> Service<http::Request<Body>> for TenantService<S>
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
        if !request.uri().path().starts_with(TENANT_SCOPED_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let router = self.router.clone();
        let tenant_id = tenant_id_from_headers(request.headers());
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
                Err(error) => {
                    let status = Status::from(error);
                    tracing::debug!(code = ?status.code(), message = status.message(), "request refused");
                    Ok(status.into_http())
                }
            }
        })
    }
}
