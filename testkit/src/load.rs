//! The load generator the tests and benches share: `workers` tasks send Query calls
//! over a set of channels to a set of tenants until stopped (or until a number of calls
//! has gone out), and tally every call: the latency of each one answered, the failures.
//! The routing tests use it to keep traffic going through an outage; the benches measure
//! with it (a ramp before the counted calls, Zipf-distributed tenants, ...).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tenantry_proto::dataplane::v1 as dp;
use tenantry_proto::dataplane::v1::sql_service_client::SqlServiceClient;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Failures kept as text in a [`Tally`] (all are counted).
pub const FAILURES_KEPT: usize = 100;

/// Which tenant each call goes to.
pub enum Pick {
    /// Any tenant, uniformly at random.
    Uniform,
    /// Tenants in turn, over all workers together.
    RoundRobin,
    /// Tenants ranked by their position, drawn from a Zipf distribution.
    Zipf(Zipf),
}

/// Zipf(s) ranks 0..n by inverse CDF.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let mut cdf = Vec::with_capacity(n);
        for rank in 1..=n {
            total += 1.0 / (rank as f64).powf(s);
            cdf.push(total);
        }
        for value in &mut cdf {
            *value /= total;
        }
        Self { cdf }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|p| *p < u).min(self.cdf.len() - 1)
    }
}

/// The statement of a worker's `n`th call (from 0).
type StatementFor = dyn Fn(u64) -> dp::Statement + Send + Sync;

/// A load to start: where it goes, what it sends, how it counts. Built with `new`, then
/// adjusted; defaults: 8 workers, tenants picked uniformly, every call counted, no
/// deadline on a call, no limit on the calls.
pub struct Load {
    channels: Vec<Channel>,
    tenants: Arc<Vec<String>>,
    statement: Arc<StatementFor>,
    pick: Pick,
    workers: usize,
    ramp: Duration,
    count_answers_after_stop: bool,
    call_timeout: Option<Duration>,
    max_calls: Option<u64>,
    latency_capacity: usize,
}

impl Load {
    /// Query calls to `tenants` over `channels` (worker `w` uses channel `w % len`),
    /// each with the statement `statement(n)` for the worker's `n`th call.
    pub fn new(
        channels: &[Channel],
        tenants: Arc<Vec<String>>,
        statement: impl Fn(u64) -> dp::Statement + Send + Sync + 'static,
    ) -> Self {
        assert!(!channels.is_empty(), "a load needs a channel");
        assert!(!tenants.is_empty(), "a load needs a tenant");
        Self {
            channels: channels.to_vec(),
            tenants,
            statement: Arc::new(statement),
            pick: Pick::Uniform,
            workers: 8,
            ramp: Duration::ZERO,
            count_answers_after_stop: true,
            call_timeout: None,
            max_calls: None,
            latency_capacity: 0,
        }
    }

    /// Concurrent callers.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    pub fn pick(mut self, pick: Pick) -> Self {
        self.pick = pick;
        self
    }

    /// Calls sent within `ramp` of the start are made but not counted (while caches,
    /// threads and connections warm up).
    pub fn ramp(mut self, ramp: Duration) -> Self {
        self.ramp = ramp;
        self
    }

    /// Calls answered once the load was told to stop are not counted either: only what
    /// happened inside the measured window counts.
    pub fn only_answers_before_stop(mut self) -> Self {
        self.count_answers_after_stop = false;
        self
    }

    /// A gRPC deadline on every call.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// The workers end by themselves once this many calls have gone out, all together.
    pub fn max_calls(mut self, calls: u64) -> Self {
        self.max_calls = Some(calls);
        self
    }

    /// Room for this many latencies per worker, reserved before the first call (so that
    /// a measured round does not grow vectors).
    pub fn latency_capacity(mut self, latencies: usize) -> Self {
        self.latency_capacity = latencies;
        self
    }

    /// Starts the workers on the current runtime.
    pub fn start(self) -> RunningLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let counted_from = started + self.ramp;
        let issued = Arc::new(AtomicU64::new(0));
        let pick = Arc::new(self.pick);
        let workers = (0..self.workers)
            .map(|worker| {
                let client =
                    SqlServiceClient::new(self.channels[worker % self.channels.len()].clone());
                let caller = Caller {
                    tenants: self.tenants.clone(),
                    statement: self.statement.clone(),
                    pick: pick.clone(),
                    issued: issued.clone(),
                    stop: stop.clone(),
                    counted_from,
                    count_answers_after_stop: self.count_answers_after_stop,
                    call_timeout: self.call_timeout,
                    max_calls: self.max_calls,
                    latency_capacity: self.latency_capacity,
                };
                tokio::spawn(caller.run(client))
            })
            .collect();
        RunningLoad {
            stop,
            started,
            counted_from,
            workers,
        }
    }
}

/// One worker's share of a load.
struct Caller {
    tenants: Arc<Vec<String>>,
    statement: Arc<StatementFor>,
    pick: Arc<Pick>,
    /// Calls sent by all workers, when round-robin or a limit needs the count.
    issued: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    counted_from: Instant,
    count_answers_after_stop: bool,
    call_timeout: Option<Duration>,
    max_calls: Option<u64>,
    latency_capacity: usize,
}

impl Caller {
    async fn run(self, mut client: SqlServiceClient<Channel>) -> Tally {
        let mut tally = Tally {
            latencies: Vec::with_capacity(self.latency_capacity),
            ..Tally::default()
        };
        let shared_count = matches!(*self.pick, Pick::RoundRobin) || self.max_calls.is_some();
        let mut sent: u64 = 0;
        while !self.stop.load(Ordering::Acquire) {
            let issued = if shared_count {
                let issued = self.issued.fetch_add(1, Ordering::AcqRel);
                if self.max_calls.is_some_and(|max| issued >= max) {
                    break;
                }
                issued
            } else {
                0
            };
            let tenant = &self.tenants[self.tenant_index(issued)];
            let mut request = tonic::Request::new(dp::QueryRequest {
                statement: Some((self.statement)(sent)),
            });
            sent += 1;
            if let Ok(value) = tenant.parse() {
                request.metadata_mut().insert("x-tenant-id", value);
            }
            if let Some(timeout) = self.call_timeout {
                request.set_timeout(timeout);
            }
            tally.calls += 1;
            let started = Instant::now();
            let result = client.query(request).await;
            if started < self.counted_from
                || (!self.count_answers_after_stop && self.stop.load(Ordering::Acquire))
            {
                continue;
            }
            match result {
                Ok(_) => tally.latencies.push(started.elapsed()),
                Err(status) => {
                    tally.errors += 1;
                    if tally.failures.len() < FAILURES_KEPT {
                        tally.failures.push(format!("{tenant}: {status}"));
                    }
                }
            }
        }
        tally
    }

    fn tenant_index(&self, issued: u64) -> usize {
        let count = self.tenants.len();
        if count == 1 {
            return 0;
        }
        match &*self.pick {
            Pick::Uniform => rand::rng().random_range(0..count),
            Pick::RoundRobin => usize::try_from(issued % count as u64).unwrap_or(0),
            Pick::Zipf(zipf) => zipf.sample(&mut rand::rng()).min(count - 1),
        }
    }
}

/// A load under way.
pub struct RunningLoad {
    stop: Arc<AtomicBool>,
    started: Instant,
    counted_from: Instant,
    workers: Vec<JoinHandle<Tally>>,
}

impl RunningLoad {
    /// When the ramp ends: calls sent from then on are counted.
    pub fn counted_from(&self) -> Instant {
        self.counted_from
    }

    /// Tells the workers to stop, waits for their calls in flight, and sums up.
    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Release);
        self.wait().await
    }

    /// Waits for the workers to end by themselves (after `max_calls`), and sums up.
    pub async fn wait(self) -> Tally {
        let mut total = Tally::default();
        for worker in self.workers {
            let tally = worker
                .await
                .unwrap_or_else(|e| panic!("a load worker failed: {e}"));
            total.latencies.extend(tally.latencies);
            total.errors += tally.errors;
            total.calls += tally.calls;
            let room = FAILURES_KEPT.saturating_sub(total.failures.len());
            total.failures.extend(tally.failures.into_iter().take(room));
        }
        total.elapsed = self.started.elapsed();
        total.latencies.sort();
        total
    }
}

/// What a load did.
#[derive(Debug, Default)]
pub struct Tally {
    /// Latencies of the counted calls that were answered, sorted.
    pub latencies: Vec<Duration>,
    /// Counted calls that failed.
    pub errors: u64,
    /// `tenant: status` of the first failures ([`FAILURES_KEPT`] at most).
    pub failures: Vec<String>,
    /// Every call sent, counted or not.
    pub calls: u64,
    /// From the start until every worker had ended.
    pub elapsed: Duration,
}
