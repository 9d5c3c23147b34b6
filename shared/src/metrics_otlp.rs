//! Metrics over OTLP/gRPC, for sites that collect with an OpenTelemetry Collector rather
//! than by scraping: every `interval` the planes' metrics (the same series `/metrics`
//! serves, same names and labels) are pushed to a collector's `MetricsService`.
//!
//! Counters go as cumulative monotonic sums, gauges as gauges, latency histograms as
//! cumulative explicit-bucket histograms, with the resource's `service.name` (and
//! `OTEL_RESOURCE_ATTRIBUTES`). Off unless asked for: by a configured endpoint,
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, or `OTEL_METRICS_EXPORTER=otlp` (which uses
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://localhost:4317`).
//! `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds, default 60000) sets the interval unless
//! the config does. A collector that does not answer is reported once, and again once
//! when it answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::metrics::MetricsSource;

/// Default push interval (the OpenTelemetry default for `OTEL_METRIC_EXPORT_INTERVAL`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// Shortest interval accepted, so a typo cannot make a plane push in a tight loop.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Longest a push may take before it counts as failed.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The OTLP/gRPC endpoint metrics go to, if any: `configured`, else
/// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, else (with `OTEL_METRICS_EXPORTER=otlp`)
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or `http://localhost:4317`. `OTEL_METRICS_EXPORTER=none`
/// turns it off whatever else is set.
pub fn endpoint(configured: Option<&str>) -> Option<String> {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    };
    let exporter = var("OTEL_METRICS_EXPORTER");
    if exporter.as_deref() == Some("none") {
        return None;
    }
    configured
        .map(|endpoint| endpoint.trim().to_owned())
        .filter(|endpoint| !endpoint.is_empty())
        .or_else(|| var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
        .or_else(|| {
            (exporter.as_deref() == Some("otlp")).then(|| {
                var("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .unwrap_or_else(|| "http://localhost:4317".to_owned())
            })
        })
}

/// The push interval: `configured_ms`, else `OTEL_METRIC_EXPORT_INTERVAL`, else 60 s;
/// never under 100 ms.
pub fn interval(configured_ms: Option<u64>) -> Duration {
    configured_ms
        .or_else(|| {
            std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
                .ok()
                .and_then(|raw| raw.trim().parse().ok())
        })
        .map_or(DEFAULT_INTERVAL, Duration::from_millis)
        .max(MIN_INTERVAL)
}

/// A running push: `stop` sends what was counted since the last push, then ends it.
pub struct MetricsPush {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsPush {
    /// Pushes `sources` to `endpoint` every `interval`, as `service_name` (unless
    /// `OTEL_SERVICE_NAME` says otherwise). Call inside a Tokio runtime.
    pub fn start(
        endpoint: &str,
        interval: Duration,
        service_name: &str,
        sources: Vec<Arc<dyn MetricsSource>>,
    ) -> anyhow::Result<Self> {
        let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())
            .map_err(|error| {
                anyhow::anyhow!(
                    "OTLP metrics endpoint {endpoint:?} is not a URL ({error}); \
                     use e.g. http://127.0.0.1:4317"
                )
            })?
            .connect_timeout(PUSH_TIMEOUT)
            .connect_lazy();
        let pusher = Pusher {
            client: MetricsServiceClient::new(channel),
            endpoint: endpoint.to_owned(),
            resource: resource(service_name),
            started: now_nanos(),
            sources,
            failing: false,
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(pusher.run(interval, stopped));
        tracing::info!(%endpoint, interval_ms = interval.as_millis() as u64, "pushing metrics over OTLP/gRPC");
        Ok(Self { stop, task })
    }

    /// Pushes once more, then stops.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Pusher {
    client: MetricsServiceClient<tonic::transport::Channel>,
    endpoint: String,
    resource: Resource,
    /// Start of every cumulative series: when this process began counting.
    started: u64,
    sources: Vec<Arc<dyn MetricsSource>>,
    failing: bool,
}

impl Pusher {
    async fn run(mut self, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = ticks.tick() => false,
                _ = stop.wait_for(|stop| *stop) => true,
            };
            self.push().await;
            if stopping {
                return;
            }
        }
    }

    async fn push(&mut self) {
        let mut text = String::new();
        for source in &self.sources {
            source.render(&mut text).await;
        }
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "tenantry".to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    metrics: to_otlp(&text, self.started, now_nanos()),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let sent = tokio::time::timeout(PUSH_TIMEOUT, self.client.export(request)).await;
        let error = match sent {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Some(format!("no answer in {} s", PUSH_TIMEOUT.as_secs())),
        };
        match error {
            Some(error) if !self.failing => {
                self.failing = true;
                tracing::warn!(endpoint = %self.endpoint, %error, "cannot push metrics over OTLP; trying again every interval (said once)");
            }
            None if self.failing => {
                self.failing = false;
                tracing::info!(endpoint = %self.endpoint, "metrics push works again");
            }
            _ => {}
        }
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

/// `service.name` plus what `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` add (the
/// same resource the trace exporter reports).
fn resource(service_name: &str) -> Resource {
    let service_name =
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service_name.to_owned());
    let sdk = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    Resource {
        attributes: sdk
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    opentelemetry::Value::Bool(value) => any_value::Value::BoolValue(*value),
                    opentelemetry::Value::I64(value) => any_value::Value::IntValue(*value),
                    opentelemetry::Value::F64(value) => any_value::Value::DoubleValue(*value),
                    other => any_value::Value::StringValue(other.to_string()),
                };
                KeyValue {
                    key: key.to_string(),
                    value: Some(AnyValue { value: Some(value) }),
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

/// Label pairs of one sample, in the order written.
type Labels = Vec<(String, String)>;

/// One sample line: its name (`x`, `x_bucket`, `x_sum`, `x_count`), labels and value.
type Sample = (String, Labels, f64);

/// One metric family read back from the Prometheus text the sources write.
#[derive(Default)]
struct Family {
    help: String,
    kind: String,
    samples: Vec<Sample>,
}

/// Turns the Prometheus text format the sources write (`# HELP`, `# TYPE`, then
/// `name{labels} value` lines) into OTLP metrics stamped `now`, cumulative from `start`.
fn to_otlp(text: &str, start: u64, now: u64) -> Vec<Metric> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_owned()).or_default().help = help.to_owned();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            families.entry(name.to_owned()).or_default().kind = kind.to_owned();
            current = name.to_owned();
        } else if !line.starts_with('#')
            && let Some((name, labels, value)) = parse_sample(line)
        {
            // Samples follow their family's `# TYPE`; a histogram's carry suffixes.
            let family = if name == current || name.starts_with(&format!("{current}_")) {
                current.clone()
            } else {
                name.clone()
            };
            families
                .entry(family)
                .or_default()
                .samples
                .push((name, labels, value));
        }
    }
    families
        .into_iter()
        .filter_map(|(name, family)| to_metric(name, family, start, now))
        .collect()
}

fn to_metric(name: String, family: Family, start: u64, now: u64) -> Option<Metric> {
    let attributes = |labels: &[(String, String)]| -> Vec<KeyValue> {
        labels
            .iter()
            .map(|(key, value)| KeyValue {
                key: key.clone(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(value.clone())),
                }),
                ..Default::default()
            })
            .collect()
    };
    let number = |labels: &[(String, String)], value: f64| NumberDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    };
    let data = match family.kind.as_str() {
        "counter" => metric::Data::Sum(Sum {
            data_points: family
                .samples
                .iter()
                .map(|(_, labels, value)| number(labels, *value))
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        "histogram" => metric::Data::Histogram(Histogram {
            data_points: histogram_points(&name, &family.samples)
                .into_iter()
                .map(|(labels, mut point)| {
                    point.attributes = attributes(&labels);
                    point.start_time_unix_nano = start;
                    point.time_unix_nano = now;
                    point
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        }),
        _ => metric::Data::Gauge(Gauge {
            data_points: family
                .samples
                .iter()
                .map(|(_, labels, value)| number(labels, *value))
                .collect(),
        }),
    };
    let unit = if name.ends_with("_seconds") { "s" } else { "" };
    Some(Metric {
        name,
        description: family.help,
        unit: unit.to_owned(),
        data: Some(data),
        ..Default::default()
    })
}

/// A histogram's series (labels without `le`) with per-bucket counts; Prometheus buckets
/// are cumulative, OTLP's are not.
fn histogram_points(name: &str, samples: &[Sample]) -> Vec<(Labels, HistogramDataPoint)> {
    #[derive(Default)]
    struct Series {
        buckets: Vec<(f64, f64)>,
        sum: f64,
        count: f64,
    }
    let mut series: BTreeMap<Labels, Series> = BTreeMap::new();
    for (sample, labels, value) in samples {
        let suffix = sample.strip_prefix(name).unwrap_or_default();
        let mut key = labels.clone();
        let bound = key
            .iter()
            .position(|(label, _)| label == "le")
            .map(|at| key.remove(at).1);
        let entry = series.entry(key).or_default();
        match (suffix, bound) {
            ("_bucket", Some(bound)) => {
                if let Ok(bound) = bound.parse::<f64>() {
                    entry.buckets.push((bound, *value));
                }
            }
            ("_sum", _) => entry.sum = *value,
            ("_count", _) => entry.count = *value,
            _ => {}
        }
    }
    series
        .into_iter()
        .map(|(labels, mut series)| {
            series.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let count = series.count.max(0.0) as u64;
            let mut explicit_bounds = Vec::new();
            let mut bucket_counts = Vec::new();
            let mut below = 0u64;
            for (bound, cumulative) in &series.buckets {
                if bound.is_infinite() {
                    continue;
                }
                let cumulative = (cumulative.max(0.0) as u64).max(below);
                explicit_bounds.push(*bound);
                bucket_counts.push(cumulative - below);
                below = cumulative;
            }
            bucket_counts.push(count.saturating_sub(below));
            let point = HistogramDataPoint {
                count,
                sum: Some(series.sum),
                bucket_counts,
                explicit_bounds,
                ..Default::default()
            };
            (labels, point)
        })
        .collect()
}

/// `name{key="value",...} value` (labels optional) as written by `metrics::labels`.
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let closed_at = loop {
            let (at, c) = chars.next()?;
            match c {
                '}' => break at,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        };
        rest = &body[closed_at + 1..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name.to_owned(), labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP demo_requests_total Requests.
# TYPE demo_requests_total counter
demo_requests_total{tenant=\"acme\",method=\"Query\",code=\"0\"} 3
demo_requests_total{tenant=\"we \\\"quote\\\"\",method=\"Query\",code=\"5\"} 1
# HELP demo_duration_seconds Latency.
# TYPE demo_duration_seconds histogram
demo_duration_seconds_bucket{tenant=\"acme\",le=\"0.001\"} 1
demo_duration_seconds_bucket{tenant=\"acme\",le=\"0.01\"} 3
demo_duration_seconds_bucket{tenant=\"acme\",le=\"+Inf\"} 4
demo_duration_seconds_sum{tenant=\"acme\"} 0.5
demo_duration_seconds_count{tenant=\"acme\"} 4
# HELP demo_routes Routes held.
# TYPE demo_routes gauge
demo_routes 7
";

    fn find<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
        metrics
            .iter()
            .find(|metric| metric.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn prometheus_text_becomes_otlp() {
        let metrics = to_otlp(TEXT, 1, 2);
        assert_eq!(metrics.len(), 3);

        let Some(metric::Data::Sum(sum)) = &find(&metrics, "demo_requests_total").data else {
            panic!("counter is not a sum");
        };
        assert!(sum.is_monotonic);
        assert_eq!(sum.data_points.len(), 2);
        let quoted = &sum.data_points[1].attributes[0];
        assert_eq!(
            quoted.value.as_ref().and_then(|v| v.value.clone()),
            Some(any_value::Value::StringValue("we \"quote\"".to_owned()))
        );
        assert_eq!(sum.data_points[0].start_time_unix_nano, 1);
        assert_eq!(sum.data_points[0].time_unix_nano, 2);

        let histogram_metric = find(&metrics, "demo_duration_seconds");
        assert_eq!(histogram_metric.unit, "s");
        let Some(metric::Data::Histogram(histogram)) = &histogram_metric.data else {
            panic!("histogram is not a histogram");
        };
        let point = &histogram.data_points[0];
        assert_eq!(point.explicit_bounds, vec![0.001, 0.01]);
        assert_eq!(point.bucket_counts, vec![1, 2, 1]);
        assert_eq!(point.count, 4);
        assert_eq!(point.sum, Some(0.5));
        assert_eq!(point.attributes.len(), 1, "le is not an attribute");

        let Some(metric::Data::Gauge(gauge)) = &find(&metrics, "demo_routes").data else {
            panic!("gauge is not a gauge");
        };
        assert_eq!(
            gauge.data_points[0].value,
            Some(number_data_point::Value::AsDouble(7.0))
        );
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for line in ["x{a=\"1\"", "x{a=1} 2", "x{} nope", "{a=\"1\"} 2", ""] {
            assert_eq!(parse_sample(line), None, "{line:?}");
        }
        assert_eq!(
            parse_sample("x{a=\"1\"} 2"),
            Some(("x".to_owned(), vec![("a".to_owned(), "1".to_owned())], 2.0))
        );
    }
}
