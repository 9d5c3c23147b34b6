//! Prometheus metrics: the pieces both planes use (counters and histograms keyed by
//! labels, a bounded set of tenant label values) and the HTTP endpoint that serves
//! `GET /metrics` in the Prometheus text format.
//!
//! Tenant labels stay bounded: at most `limit` tenants get a `tenant` label value of
//! their own, the busiest ones, and every other tenant is counted under `other`.
//! "Busiest" is the number of requests in the last full window (`window`, default 60 s):
//! when a window ends, the `limit` tenants with the most requests in it keep or get
//! their own series, the series of the others are dropped (their later requests count
//! under `other`). Before the first window ends, tenants get a label first come, first
//! served.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;

/// The label value of tenants without one of their own.
pub const OTHER_TENANTS: &str = "other";

/// Latency bucket bounds, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Largest number of distinct tenants counted per window before new ones go straight to
/// `other` (so random ids cannot grow the window's map without bound).
const MAX_COUNTED_PER_WINDOW: usize = 100_000;

/// Decides which tenants get a label value of their own (see the module doc).
pub struct TenantLabels {
    limit: usize,
    labelled: RwLock<HashSet<String>>,
    /// `labelled.len()`, readable without the lock: once it reaches `limit`, requests of
    /// unlabelled tenants no longer take the write lock.
    labelled_count: AtomicUsize,
    /// Requests per tenant in the current window.
    window_counts: DashMap<String, AtomicU64>,
    /// Whether a window has ended yet (before that: first come, first served).
    ranked: std::sync::atomic::AtomicBool,
}

impl TenantLabels {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            labelled: RwLock::new(HashSet::new()),
            labelled_count: AtomicUsize::new(0),
            window_counts: DashMap::new(),
            ranked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counts a request of `tenant` and returns the label value to use for it.
    pub fn label(&self, tenant: &str) -> String {
        if let Some(count) = self.window_counts.get(tenant) {
            count.fetch_add(1, Ordering::Relaxed);
        } else if self.window_counts.len() < MAX_COUNTED_PER_WINDOW {
            self.window_counts
                .entry(tenant.to_owned())
                .or_insert_with(|| AtomicU64::new(0))
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(labelled) = self.labelled.read()
            && labelled.contains(tenant)
        {
            return tenant.to_owned();
        }
        if !self.ranked.load(Ordering::Acquire)
            && self.labelled_count.load(Ordering::Relaxed) < self.limit
            && let Ok(mut labelled) = self.labelled.write()
            && labelled.len() < self.limit
        {
            labelled.insert(tenant.to_owned());
            self.labelled_count.store(labelled.len(), Ordering::Relaxed);
            return tenant.to_owned();
        }
        OTHER_TENANTS.to_owned()
    }

    /// Whether `tenant` has a label value of its own now.
    pub fn is_labelled(&self, tenant: &str) -> bool {
        self.labelled
            .read()
            .is_ok_and(|labelled| labelled.contains(tenant))
    }

    /// Ends the window: the busiest `limit` tenants keep or get their own label. Returns
    /// the tenants that lost theirs (their series are to be dropped).
    pub fn end_window(&self) -> Vec<String> {
        let mut counts: Vec<(String, u64)> = self
            .window_counts
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().load(Ordering::Relaxed)))
            .collect();
        self.window_counts.clear();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let busiest: HashSet<String> = counts
            .into_iter()
            .take(self.limit)
            .map(|(tenant, _)| tenant)
            .collect();
        self.ranked.store(true, Ordering::Release);
        match self.labelled.write() {
            Ok(mut labelled) => {
                let dropped = labelled.difference(&busiest).cloned().collect();
                *labelled = busiest;
                self.labelled_count.store(labelled.len(), Ordering::Relaxed);
                dropped
            }
            Err(_) => Vec::new(),
        }
    }
}

/// A histogram with the `LATENCY_BUCKETS` bounds. Each observation adds to the one
/// bucket it falls in (a request touches three counters, not one per bound); rendering
/// sums them into Prometheus's cumulative buckets.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: LATENCY_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .and_then(|n| self.buckets.get(n))
        {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines of one series.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{bound}\"}} {cumulative}"
            );
        }
        // An observation racing this scrape may be in its bucket and not yet counted.
        let count = self.count.load(Ordering::Relaxed).max(cumulative);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// `key="value"` pairs, values escaped for the text format.
pub fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(
        pairs
            .iter()
            .map(|(key, value)| key.len() + value.len() + 4)
            .sum(),
    );
    for (n, (key, value)) in pairs.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

/// Writes `# HELP` and `# TYPE` for a metric.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Counters keyed by a label string, rendered sorted.
#[derive(Default)]
pub struct CounterFamily {
    series: DashMap<String, AtomicU64>,
}

impl CounterFamily {
    pub fn inc(&self, labels: String) {
        // A known series takes only a shard's read lock.
        if let Some(counter) = self.series.get(labels.as_str()) {
            counter.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.series
            .entry(labels)
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.series.retain(|labels, _| keep(labels));
    }

    pub fn render(&self, out: &mut String, name: &str) {
        let sorted: BTreeMap<String, u64> = self
            .series
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().load(Ordering::Relaxed)))
            .collect();
        for (labels, value) in sorted {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Histograms keyed by a label string, rendered sorted.
#[derive(Default)]
pub struct HistogramFamily {
    series: DashMap<String, Arc<Histogram>>,
}

impl HistogramFamily {
    pub fn observe(&self, labels: String, elapsed: Duration) {
        if let Some(histogram) = self.series.get(labels.as_str()) {
            histogram.observe(elapsed);
            return;
        }
        let histogram = self.series.entry(labels).or_default().clone();
        histogram.observe(elapsed);
    }

    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.series.retain(|labels, _| keep(labels));
    }

    pub fn render(&self, out: &mut String, name: &str) {
        let sorted: BTreeMap<String, Arc<Histogram>> = self
            .series
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().clone()))
            .collect();
        for (labels, histogram) in sorted {
            histogram.render(out, name, &labels);
        }
    }
}

/// Something that writes metrics into a scrape.
pub trait MetricsSource: Send + Sync {
    fn render<'a>(&'a self, out: &'a mut String) -> BoxFuture<'a, ()>;
}

/// Serves `GET /metrics` on `listener` with every source's metrics, until `stop` fires.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    sources: Arc<RwLock<Vec<Arc<dyn MetricsSource>>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let sources = sources.clone();
                async move {
                    if request.uri().path() != "/metrics" {
                        http::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(http_body_util::Full::new(bytes::Bytes::from(
                                "not found; metrics are at /metrics\n",
                            )))
                    } else {
                        let list: Vec<Arc<dyn MetricsSource>> =
                            sources.read().map(|s| s.clone()).unwrap_or_default();
                        let mut out = String::new();
                        for source in list {
                            source.render(&mut out).await;
                        }
                        http::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(http_body_util::Full::new(bytes::Bytes::from(out)))
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A metrics endpoint: its address and the sources it serves (planes add theirs).
#[derive(Clone)]
pub struct MetricsEndpoint {
    pub local_addr: SocketAddr,
    sources: Arc<RwLock<Vec<Arc<dyn MetricsSource>>>>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl MetricsEndpoint {
    /// Binds `addr` and serves `/metrics` there.
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = crate::grpc::bind(addr, "metrics endpoint").await?;
        let local_addr = listener.local_addr()?;
        let sources: Arc<RwLock<Vec<Arc<dyn MetricsSource>>>> = Arc::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(serve_metrics(listener, sources.clone(), stopped));
        Ok(Self {
            local_addr,
            sources,
            stop: Arc::new(stop),
        })
    }

    pub fn add(&self, source: Arc<dyn MetricsSource>) {
        if let Ok(mut sources) = self.sources.write() {
            sources.push(source);
        }
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.local_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_go_first_come_then_to_the_busiest() {
        let labels = TenantLabels::new(2);
        // Before the first window ends: the first two tenants seen, then `other`.
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), OTHER_TENANTS);
        assert_eq!(labels.label("a"), "a");
        for _ in 0..5 {
            labels.label("c");
        }
        // The window ends: c (6 requests) and a (2) are the busiest; b loses its label.
        assert_eq!(labels.end_window(), vec!["b".to_owned()]);
        assert!(labels.is_labelled("a") && labels.is_labelled("c"));
        assert_eq!(labels.label("b"), OTHER_TENANTS);
        assert_eq!(labels.label("d"), OTHER_TENANTS);
        // Between rankings, new tenants stay `other` even if busy; the next ranking
        // (b 1, c 2, d 10 requests) gives d a label and takes a's.
        for _ in 0..9 {
            assert_eq!(labels.label("d"), OTHER_TENANTS);
        }
        labels.label("c");
        labels.label("c");
        let mut dropped = labels.end_window();
        dropped.sort();
        assert_eq!(dropped, vec!["a".to_owned()]);
        assert_eq!(labels.label("d"), "d");
        assert_eq!(labels.label("c"), "c");
        assert_eq!(labels.label("e"), OTHER_TENANTS);
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(
            labels(&[("tenant", "acme"), ("note", "a\\b\"c\nd")]),
            r#"tenant="acme",note="a\\b\"c\nd""#
        );
        assert_eq!(labels(&[]), "");
    }

    #[test]
    fn histogram_buckets_render_cumulative() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(200));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let mut out = String::new();
        histogram.render(&mut out, "t", "m=\"q\"");
        let value = |le: &str| {
            out.lines()
                .find(|line| line.starts_with(&format!("t_bucket{{m=\"q\",le=\"{le}\"}}")))
                .and_then(|line| line.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(value("0.0005").as_deref(), Some("1"));
        assert_eq!(value("0.0025").as_deref(), Some("1"));
        assert_eq!(value("0.005").as_deref(), Some("2"));
        assert_eq!(value("10").as_deref(), Some("2"));
        assert_eq!(value("+Inf").as_deref(), Some("3"));
        assert!(out.contains("t_count{m=\"q\"} 3"));
    }
}
