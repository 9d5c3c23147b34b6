//! OTLP collectors standing in for a tracing or metrics backend: tonic servers on
//! 127.0.0.1:0 that receive what a plane exports, for a test to look at or a bench to
//! count. [`TraceCollector`] takes spans (the telemetry test keeps them, the tracing bench
//! only counts them); [`MetricsCollector`] takes pushed metrics (the CLI's `dev` test).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

/// An OTLP trace collector: counts the spans it receives and, when made with
/// [`TraceCollector::keeping_spans`], keeps them. Clones share what was received.
#[derive(Clone, Default)]
pub struct TraceCollector {
    keep: bool,
    received: Arc<AtomicU64>,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl TraceCollector {
    /// A collector that keeps every span, for a test to look at.
    pub fn keeping_spans() -> Self {
        Self {
            keep: true,
            ..Self::default()
        }
    }

    /// A collector that only counts spans: a bench's exporter costs the same, and the
    /// collector's own work stays small.
    pub fn counting_spans() -> Self {
        Self::default()
    }

    /// Spans received so far.
    pub fn span_count(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The spans kept so far (none unless made with `keeping_spans`).
    pub fn snapshot(&self) -> Vec<Span> {
        self.spans
            .lock()
            .map(|spans| spans.clone())
            .unwrap_or_default()
    }

    /// Serves this collector on 127.0.0.1:0 from the current runtime; its `http://` URL,
    /// to use as the OTLP endpoint.
    pub async fn serve(&self) -> std::io::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(format!("http://{address}"))
    }
}

#[tonic::async_trait]
impl TraceService for TraceCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        if self.keep {
            let spans: Vec<Span> = request
                .resource_spans
                .into_iter()
                .flat_map(|resource| resource.scope_spans)
                .flat_map(|scope| scope.spans)
                .collect();
            self.received
                .fetch_add(spans.len() as u64, Ordering::Relaxed);
            if let Ok(mut held) = self.spans.lock() {
                held.extend(spans);
            }
        } else {
            let spans: usize = request
                .resource_spans
                .iter()
                .flat_map(|resource| &resource.scope_spans)
                .map(|scope| scope.spans.len())
                .sum();
            self.received.fetch_add(spans as u64, Ordering::Relaxed);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP metrics collector on a thread of its own (so a plain `#[test]` can use it):
/// keeps every export request it receives.
#[derive(Clone, Default)]
pub struct MetricsCollector {
    received: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl MetricsService for MetricsCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        if let Ok(mut received) = self.received.lock() {
            received.push(request.into_inner());
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

impl MetricsCollector {
    /// Starts one on 127.0.0.1; its `http://` URL.
    pub fn start(&self) -> String {
        let collector = self.clone();
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let _ = address_tx.send(listener.local_addr().map(|a| a.to_string()));
                let _ = tonic::transport::Server::builder()
                    .add_service(MetricsServiceServer::new(collector))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await;
            });
        });
        let address = address_rx
            .recv()
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        format!("http://{address}")
    }

    /// The newest value pushed for `name` with all of `attributes`: a counter's value or
    /// a histogram's count, with the pushing service's name.
    pub fn latest(&self, name: &str, attributes: &[(&str, &str)]) -> Option<(f64, String)> {
        use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
        use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
        let matches = |point_attributes: &[KeyValue]| {
            attributes.iter().all(|(key, value)| {
                point_attributes.iter().any(|attribute| {
                    attribute.key == *key
                        && attribute.value.as_ref().and_then(|v| v.value.as_ref())
                            == Some(&any_value::Value::StringValue((*value).to_owned()))
                })
            })
        };
        let received = self.received.lock().ok()?;
        let mut latest = None;
        for resource in received
            .iter()
            .flat_map(|request| &request.resource_metrics)
        {
            let service = resource
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
                .map(|value| format!("{value:?}"))
                .unwrap_or_default();
            for metric in resource
                .scope_metrics
                .iter()
                .flat_map(|scope| &scope.metrics)
                .filter(|metric| metric.name == name)
            {
                let value = match &metric.data {
                    Some(metric::Data::Sum(sum)) => sum
                        .data_points
                        .iter()
                        .filter(|point| matches(&point.attributes))
                        .find_map(|point| match point.value {
                            Some(number_data_point::Value::AsDouble(value)) => Some(value),
                            Some(number_data_point::Value::AsInt(value)) => Some(value as f64),
                            None => None,
                        }),
                    Some(metric::Data::Histogram(histogram)) => histogram
                        .data_points
                        .iter()
                        .find(|point| matches(&point.attributes))
                        .map(|point| point.count as f64),
                    _ => None,
                };
                if let Some(value) = value {
                    latest = Some((value, service.clone()));
                }
            }
        }
        latest
    }
}
