//! Telemetry of both planes and the CLI: `tracing` logs (human-readable or JSON) and,
//! when switched on, OpenTelemetry traces exported over OTLP/gRPC.
//!
//! Tracing is configured by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (setting
//! it switches tracing on), `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG` (the default sampler), `OTEL_RESOURCE_ATTRIBUTES`; or by the
//! `TelemetryConfig` a plane's config file fills in. A tenant under investigation can get
//! its own sampling ratio (`set_tenant_tracing`), which overrides the default for spans
//! that carry its `tenant.id` until it expires.

use std::sync::LazyLock;
use std::time::SystemTime;

use dashmap::DashMap;
use opentelemetry::trace::{Link, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingResult, SdkTracerProvider, ShouldSample};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The span attribute (and tracing field) that names a request's tenant.
pub const TENANT_ATTRIBUTE: &str = "tenant.id";

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with `tenant_id` (and `trace_id` when tracing) on every
    /// line of a tenant's path.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?}: use text or json")),
        }
    }
}

/// Trace export settings; the `OTEL_*` variables fill what is left unset.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`. Unset: `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// if that is unset too, no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// Default share of traces kept (0.0 to 1.0), for traces that start here. Unset:
    /// `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, else 1.0.
    pub sample_ratio: Option<f64>,
}

/// Per-tenant sampling overrides, set from routes (data plane) or the registry (control
/// plane). Read by `TenantSampler` for every new span.
static TENANT_OVERRIDES: LazyLock<DashMap<String, TenantTracing>> = LazyLock::new(DashMap::new);

#[derive(Clone, Copy, Debug)]
struct TenantTracing {
    ratio: f64,
    /// Log lines of the tenant's path down to this level are written too.
    level: Option<tracing::Level>,
    until: SystemTime,
}

/// `error`, `warn`, `info`, `debug` or `trace`.
pub fn parse_level(raw: &str) -> Option<tracing::Level> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "error" => Some(tracing::Level::ERROR),
        "warn" => Some(tracing::Level::WARN),
        "info" => Some(tracing::Level::INFO),
        "debug" => Some(tracing::Level::DEBUG),
        "trace" => Some(tracing::Level::TRACE),
        _ => None,
    }
}

/// Samples spans of `tenant` at `ratio`, and writes its log lines down to `log_level`
/// (empty: no change), until `until` (then the defaults again).
pub fn set_tenant_tracing(tenant: &str, ratio: f64, log_level: &str, until: SystemTime) {
    if until <= SystemTime::now() {
        TENANT_OVERRIDES.remove(tenant);
        return;
    }
    TENANT_OVERRIDES.insert(
        tenant.to_owned(),
        TenantTracing {
            ratio: ratio.clamp(0.0, 1.0),
            level: parse_level(log_level),
            until,
        },
    );
}

/// The log level override of `tenant`, while it lasts.
pub(crate) fn tenant_log_level(tenant: &str) -> Option<tracing::Level> {
    let tracing = *TENANT_OVERRIDES.get(tenant)?;
    (tracing.until > SystemTime::now())
        .then_some(tracing.level)
        .flatten()
}

/// The one filter in front of logs and traces: `RUST_LOG` (or the default level); for a
/// tenant with a log level override, Tenantry's own lines on that tenant's path down to
/// that level; and, when traces are exported, Tenantry's own spans (`own_span`).
///
/// Logs and the trace layer sit behind this single filter on purpose: every per-layer
/// filter costs a lookup on each span enter and exit (each poll) and a check on each
/// event, and a second one made tracing cost 8% of a point select's CPU.
struct TelemetryFilter {
    env: EnvFilter,
    own_spans: bool,
}

impl<S> tracing_subscriber::layer::Filter<S> for TelemetryFilter
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if self.own_spans && own_span(metadata) {
            return true;
        }
        if tracing_subscriber::layer::Filter::<S>::enabled(&self.env, metadata, cx) {
            return true;
        }
        if !metadata.is_event() || !metadata.target().starts_with("tenantry") {
            return false;
        }
        let Some(tenant) = crate::json_log::current_tenant(cx) else {
            return false;
        };
        tenant_log_level(&tenant).is_some_and(|level| metadata.level() <= &level)
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if self.own_spans && own_span(metadata) {
            return tracing::subscriber::Interest::always();
        }
        let interest =
            tracing_subscriber::layer::Filter::<S>::callsite_enabled(&self.env, metadata);
        if interest.is_never() && metadata.is_event() && metadata.target().starts_with("tenantry") {
            // A tenant's override may switch it on: ask every time.
            tracing::subscriber::Interest::sometimes()
        } else {
            interest
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        // Overrides can enable any level at any time.
        None
    }
}

/// The spans exported as traces: Tenantry's own, at INFO and above. Library internals
/// (h2, tower, sqlx) would cost on every call and tell an SRE nothing about a tenant.
/// Decided from a callsite's metadata alone, so each callsite is asked once.
fn own_span(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.is_span()
        && metadata.level() <= &tracing::Level::INFO
        && metadata.target().starts_with("tenantry")
}

/// The log layer, given only the spans logs may show: a span more verbose than any
/// `RUST_LOG` directive (let through the shared filter for traces only) is not formatted
/// for log lines that could never print it.
struct LogSpans<L> {
    inner: L,
    most_verbose: tracing::level_filters::LevelFilter,
}

impl<S, L> tracing_subscriber::Layer<S> for LogSpans<L>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: tracing_subscriber::Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber);
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if self.most_verbose >= *attrs.metadata().level() {
            self.inner.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if ctx
            .metadata(span)
            .is_some_and(|metadata| self.most_verbose >= *metadata.level())
        {
            self.inner.on_record(span, values, ctx);
        }
    }

    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.inner.on_follows_from(span, follows, ctx);
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.inner.on_event(event, ctx);
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.inner.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.inner.on_exit(id, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.inner.on_close(id, ctx);
    }

    fn on_id_change(
        &self,
        old: &tracing::span::Id,
        new: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.inner.on_id_change(old, new, ctx);
    }

    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded as is; the inner layer answers for its own types.
        unsafe { self.inner.downcast_raw(id) }
    }
}

/// The OpenTelemetry layer, given only Tenantry's own spans (`own_span`; the log lines
/// and other spans the shared filter lets through are not its business) and none of its
/// work on every poll: a span's end is taken when it closes rather than when it was last
/// left, which is the same moment for Tenantry's spans (each is dropped as soon as its
/// future completes).
struct OwnSpans<L>(L);

impl<S, L> tracing_subscriber::Layer<S> for OwnSpans<L>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: tracing_subscriber::Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if own_span(attrs.metadata()) {
            self.0.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_record(span, values, ctx);
    }

    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_follows_from(span, follows, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_close(id, ctx);
    }

    fn on_id_change(
        &self,
        old: &tracing::span::Id,
        new: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_id_change(old, new, ctx);
    }

    // `Span::context()` finds the OpenTelemetry layer through this.
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded as is; the inner layer answers for its own types.
        unsafe { self.0.downcast_raw(id) }
    }
}

/// Drops a tenant's override.
pub fn clear_tenant_tracing(tenant: &str) {
    TENANT_OVERRIDES.remove(tenant);
}

/// The default sampler, plus per-tenant overrides for spans with a `tenant.id`.
#[derive(Clone, Debug)]
pub struct TenantSampler {
    default: Sampler,
}

impl ShouldSample for TenantSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let tenant = attributes
            .iter()
            .find(|attribute| attribute.key.as_str() == TENANT_ATTRIBUTE)
            .map(|attribute| attribute.value.as_str());
        if let Some(tenant) = tenant
            && let Some(tenant_tracing) = TENANT_OVERRIDES.get(tenant.as_ref()).map(|t| *t)
        {
            if tenant_tracing.until > SystemTime::now() {
                // By trace id, so every span of one trace gets the same answer.
                return Sampler::TraceIdRatioBased(tenant_tracing.ratio).should_sample(
                    parent_context,
                    trace_id,
                    name,
                    span_kind,
                    attributes,
                    links,
                );
            }
            TENANT_OVERRIDES.remove(tenant.as_ref());
        }
        self.default
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// The default sampler from config, else `OTEL_TRACES_SAMPLER`/`_ARG`, else always on;
/// always parent-based, so a caller's sampling decision is followed.
fn default_sampler(config: &TracingConfig) -> Sampler {
    let ratio = config.sample_ratio.or_else(|| {
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
            .ok()
            .and_then(|arg| arg.trim().parse::<f64>().ok());
        match std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref() {
            Some("always_off" | "parentbased_always_off") => Some(0.0),
            Some("traceidratio" | "parentbased_traceidratio") => Some(arg.unwrap_or(1.0)),
            _ => None,
        }
    });
    let root = match ratio {
        Some(ratio) => Sampler::TraceIdRatioBased(ratio.clamp(0.0, 1.0)),
        None => Sampler::AlwaysOn,
    };
    Sampler::ParentBased(Box::new(root))
}

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Sends the spans finished so far (tests call it before they look at a collector).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Whether traces are exported with this config (and the environment).
pub fn tracing_endpoint(config: &TracingConfig) -> Option<String> {
    config
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|endpoint| !endpoint.trim().is_empty())
}

/// Sets the process's subscriber: logs in `format` filtered by `RUST_LOG` (default
/// `info`), and traces to the OTLP endpoint if one is configured. `service_name` is used
/// unless `OTEL_SERVICE_NAME` says otherwise. Call once per process, inside a Tokio
/// runtime.
pub fn init(
    service_name: &str,
    format: LogFormat,
    config: &TracingConfig,
    default_level: &str,
) -> anyhow::Result<TelemetryGuard> {
    let (dispatch, guard) = dispatch(service_name, format, config, default_level)?;
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(|error| anyhow::anyhow!("cannot set up logging: {error}"))?;
    if let Some(endpoint) = tracing_endpoint(config) {
        tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
    }
    Ok(guard)
}

/// The subscriber `init` installs, without installing it (benches compare two).
pub fn dispatch(
    service_name: &str,
    format: LogFormat,
    config: &TracingConfig,
    default_level: &str,
) -> anyhow::Result<(tracing::Dispatch, TelemetryGuard)> {
    let (traces, provider) = match tracing_endpoint(config) {
        Some(endpoint) => {
            let provider = tracer_provider(service_name, &endpoint, config)?;
            let tracer = provider.tracer("tenantry");
            let layer = OwnSpans(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    // Per-span extras that cost on every poll or every span and tell an
                    // SRE little: busy/idle timing, thread and source-location
                    // attributes, and making each span the current OpenTelemetry context
                    // on every poll (Tenantry reads a span's context from the span).
                    .with_tracked_inactivity(false)
                    .with_context_activation(false)
                    .with_threads(false)
                    .with_location(false),
            );
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    // The OpenTelemetry SDK's own logs would repeat every failed export; the exporter
    // wrapper below says it once instead.
    let env = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_level))
        .add_directive("opentelemetry=off".parse().unwrap_or_default())
        .add_directive("opentelemetry_sdk=off".parse().unwrap_or_default())
        .add_directive("opentelemetry_otlp=off".parse().unwrap_or_default());
    let most_verbose =
        tracing_subscriber::Layer::<tracing_subscriber::Registry>::max_level_hint(&env)
            .unwrap_or(tracing::level_filters::LevelFilter::TRACE);
    let filter = TelemetryFilter {
        env,
        own_spans: traces.is_some(),
    };
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(crate::json_log::JsonFormat)
            .boxed(),
    };
    let subscriber = tracing_subscriber::registry()
        .with(crate::json_log::TenantFieldLayer)
        .with(
            LogSpans {
                inner: logs,
                most_verbose,
            }
            .and_then(traces)
            .with_filter(filter),
        );
    Ok((
        tracing::Dispatch::new(subscriber),
        TelemetryGuard { provider },
    ))
}

/// Wraps the OTLP exporter so that a collector that is down is reported once (and its
/// return once), not on every batch.
#[derive(Debug)]
struct SayOnce<E> {
    inner: E,
    endpoint: String,
    failing: std::sync::atomic::AtomicBool,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for SayOnce<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        use std::sync::atomic::Ordering;
        let result = self.inner.export(batch).await;
        match &result {
            Err(error) if !self.failing.swap(true, Ordering::AcqRel) => {
                tracing::warn!(endpoint = %self.endpoint, %error, "cannot export traces; spans are dropped until the collector answers (said once)");
            }
            Ok(()) if self.failing.swap(false, Ordering::AcqRel) => {
                tracing::info!(endpoint = %self.endpoint, "trace export works again");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// A tracer provider exporting to `endpoint` with the tenant-aware sampler.
pub fn tracer_provider(
    service_name: &str,
    endpoint: &str,
    config: &TracingConfig,
) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let service_name =
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service_name.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(SayOnce {
            inner: exporter,
            endpoint: endpoint.to_owned(),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
        .with_sampler(TenantSampler {
            default: default_sampler(config),
        })
        .with_resource(resource)
        .build())
}
