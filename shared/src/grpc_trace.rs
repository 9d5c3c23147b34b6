//! W3C trace context over gRPC. `TraceLayer` (servers) takes `traceparent`/`tracestate`
//! from each call's metadata and opens the call's span as their child, with the `rpc.*`
//! attributes and, when the call names one, `tenant.id`. `InjectTraceLayer` (clients) puts
//! the current span's context into every outgoing call.

use std::task::{Context as TaskContext, Poll};

use futures::future::BoxFuture;
use opentelemetry::propagation::{Extractor, Injector};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::TenantId;
use crate::metadata::CallTenant;

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The gRPC status code of a response as far as its headers tell: errors are
/// "trailers-only" responses with `grpc-status` in the headers; a response without it
/// carries OK (or its stream's final status, in trailers).
pub fn status_code<B>(response: &http::Response<B>) -> i64 {
    response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i64>().ok())
        .unwrap_or(0)
}

/// `/package.Service/Method` → (`package.Service`, `Method`).
fn service_and_method(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// Server side: extract the caller's trace context and open the call's span.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct TraceService<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for TraceService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !tracing::level_enabled!(tracing::Level::INFO) {
            // The span would be disabled: skip building its fields.
            return Box::pin(inner.call(request));
        }
        let path = request.uri().path().to_owned();
        let (service, method) = service_and_method(&path);
        if service.starts_with("grpc.") {
            // Health checks and reflection: no span of their own.
            return Box::pin(inner.call(request));
        }
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        // The tenant, when the call names a valid one in its metadata (the tenant layer
        // refuses bad ones). The sampler sees it at the span's start. Parsed once, by the
        // server's outermost layer where it has one (`CallTenant` in the extensions).
        let tenant = CallTenant::of(&request).named().map(TenantId::to_string);
        let span = tracing::info_span!(
            "grpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            tenant.id = tenant.as_deref(),
        );
        let _ = span.set_parent(parent);
        Box::pin(
            async move {
                let result = inner.call(request).await;
                if let Ok(response) = &result {
                    let code = status_code(response);
                    let span = tracing::Span::current();
                    span.record("rpc.grpc.status_code", code);
                    if code != 0 {
                        span.record("otel.status_code", "ERROR");
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Client side: send the current span's context with every call.
#[derive(Clone, Copy, Debug, Default)]
pub struct InjectTraceLayer;

impl<S> Layer<S> for InjectTraceLayer {
    type Service = InjectTraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectTraceService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct InjectTraceService<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for InjectTraceService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut HeaderInjector(request.headers_mut()));
        });
        self.inner.call(request)
    }
}
