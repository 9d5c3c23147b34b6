//! JSON log lines: one object per event with `timestamp`, `level`, `target`, `message`,
//! the event's own fields, and `tenant_id` (from the nearest span that names a tenant)
//! plus `trace_id` and `span_id` when the line belongs to a sampled trace.

use std::fmt;

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::telemetry::TENANT_ATTRIBUTE;

/// The tenant a span was opened for (its `tenant.id` or `tenant_id` field).
struct SpanTenant(String);

/// The tenant of the innermost span (in `cx`'s current scope) that names one.
pub(crate) fn current_tenant<S>(cx: &Context<'_, S>) -> Option<String>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    cx.lookup_current()?
        .scope()
        .find_map(|span| span.extensions().get::<SpanTenant>().map(|t| t.0.clone()))
}

/// Remembers each span's tenant so log lines can name it.
pub struct TenantFieldLayer;

struct TenantVisitor(Option<String>);

impl Visit for TenantVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == TENANT_ATTRIBUTE || field.name() == "tenant_id" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == TENANT_ATTRIBUTE || field.name() == "tenant_id" {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for TenantFieldLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut visitor = TenantVisitor(None);
        attrs.record(&mut visitor);
        if let (Some(tenant), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().insert(SpanTenant(tenant));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        let mut visitor = TenantVisitor(None);
        values.record(&mut visitor);
        if let (Some(tenant), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().insert(SpanTenant(tenant));
        }
    }
}

struct FieldsVisitor(Map<String, Value>);

impl Visit for FieldsVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
}

/// The JSON event format (see the module doc).
pub struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = FieldsVisitor(Map::new());
        event.record(&mut fields);
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().to_owned()),
        );
        if let Some(message) = fields.0.remove("message") {
            line.insert("message".into(), message);
        }
        let tenant = fields
            .0
            .remove(TENANT_ATTRIBUTE)
            .or_else(|| fields.0.remove("tenant_id"))
            .or_else(|| {
                ctx.event_scope()?.find_map(|span| {
                    span.extensions()
                        .get::<SpanTenant>()
                        .map(|tenant| Value::String(tenant.0.clone()))
                })
            });
        if let Some(tenant) = tenant {
            line.insert("tenant_id".into(), tenant);
        }
        let span_context = tracing::Span::current()
            .context()
            .span()
            .span_context()
            .clone();
        if span_context.is_valid() {
            line.insert(
                "trace_id".into(),
                Value::String(span_context.trace_id().to_string()),
            );
            line.insert(
                "span_id".into(),
                Value::String(span_context.span_id().to_string()),
            );
        }
        if !fields.0.is_empty() {
            line.insert("fields".into(), Value::Object(fields.0));
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}
