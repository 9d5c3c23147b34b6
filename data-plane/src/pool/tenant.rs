//! A tenant's pool as the rest of the data plane sees it: `TenantPool` runs a request's
//! statements on the tenant's own database and reports its figures, whatever the backend
//! behind it; `PoolFactory` opens one for a route's target. Backends implement both
//! (`backend::BackendFactory`); the pool manager and the services name only these.
//!
//! `Call` is what a statement runs with: the tenant (for messages), the request's
//! deadline and the response limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tenantry_proto::dataplane::v1 as pb;
use tenantry_shared::TenantId;

use super::connection_pool::{ManagedPool, PoolOptions};
use crate::error::{DataPlaneError, Result};
use crate::routing::Target;

/// Limits every SQL response keeps.
#[derive(Clone, Debug)]
pub(crate) struct SqlLimits {
    /// Largest Query response, in encoded bytes.
    pub(crate) max_response_bytes: usize,
    /// Deadline of a call that comes without one (`default_statement_timeout_ms`).
    pub(crate) default_timeout: Option<Duration>,
}

/// What a statement runs with: the tenant (for messages) and the request's deadline.
pub(crate) struct Call<'a> {
    pub(crate) tenant: &'a TenantId,
    /// The request's deadline, or the default one (`deadline_is_default`).
    pub(crate) deadline: Option<Instant>,
    pub(crate) deadline_is_default: bool,
    pub(crate) limits: &'a SqlLimits,
}

impl<'a> Call<'a> {
    /// A call of `tenant` with the request's own deadline, or else the default one.
    pub(crate) fn new(
        tenant: &'a TenantId,
        deadline: Option<Instant>,
        limits: &'a SqlLimits,
    ) -> Self {
        let default = limits
            .default_timeout
            .filter(|_| deadline.is_none())
            .map(|timeout| Instant::now() + timeout);
        Self {
            tenant,
            deadline: deadline.or(default),
            deadline_is_default: default.is_some(),
            limits,
        }
    }
}

impl Call<'_> {
    /// What is left of the request's deadline (None: no deadline).
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// Runs `work` within the request's deadline (if any), logging how long it took.
    pub(crate) fn within_deadline<T, F>(
        &self,
        work: F,
    ) -> impl Future<Output = Result<T>> + use<'_, T, F>
    where
        F: Future<Output = Result<T>>,
    {
        use futures::FutureExt;
        use futures::future::Either;
        let started = Instant::now();
        let bounded = match self.remaining() {
            None => Either::Left(work.map(Ok)),
            Some(remaining) => Either::Right(tokio::time::timeout(remaining, work)),
        };
        bounded.map(move |outcome| {
            let result = outcome.unwrap_or_else(|_| {
                Err(DataPlaneError::DeadlineExceeded(format!(
                    "the request's deadline passed before the statement on tenant {} \
                     finished; it was cancelled",
                    self.tenant
                )))
            });
            // A backend's own deadline error (PostgreSQL's statement_timeout, SQLite's
            // interrupt) at the default deadline says which deadline it was.
            let result = match result {
                Err(DataPlaneError::DeadlineExceeded(message)) if self.deadline_is_default => Err(
                    DataPlaneError::DeadlineExceeded(self.default_deadline_passed(&message)),
                ),
                other => other,
            };
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            match &result {
                Ok(_) => tracing::debug!(micros, "statement finished"),
                Err(error) => tracing::debug!(micros, %error, "statement failed"),
            }
            result
        })
    }
}

impl Call<'_> {
    /// The answer when the default deadline (not the request's own) has passed.
    fn default_deadline_passed(&self, detail: &str) -> String {
        format!(
            "the statement on tenant {} ran past the data plane's default statement timeout \
             ({} ms, default_statement_timeout_ms; the request had no deadline of its own) and \
             was cancelled; send a deadline (grpc-timeout) to give it longer ({detail})",
            self.tenant,
            self.limits
                .default_timeout
                .map_or(0, |timeout| timeout.as_millis())
        )
    }
}

/// One tenant's pool: runs statements on the tenant's database.
pub(crate) trait TenantPool: ManagedPool {
    fn execute<'a>(
        &'a self,
        statement: &'a pb::Statement,
        call: &'a Call<'a>,
    ) -> BoxFuture<'a, Result<pb::ExecuteResponse>>;

    fn query<'a>(
        &'a self,
        statement: &'a pb::Statement,
        call: &'a Call<'a>,
    ) -> BoxFuture<'a, Result<pb::QueryResponse>>;

    /// Runs `statements` in one transaction, all or nothing.
    fn batch<'a>(
        &'a self,
        statements: &'a [pb::Statement],
        call: &'a Call<'a>,
    ) -> BoxFuture<'a, Result<Vec<pb::ExecuteResponse>>>;

    /// Statements that went out in one write with another request's, since the pool
    /// opened (0 where the backend never does that).
    fn pipelined(&self) -> u64 {
        0
    }
}

/// Figures of one database server's connection budget.
#[derive(Clone, Debug)]
pub(crate) struct BudgetFigures {
    pub(crate) server: String,
    pub(crate) budget: u32,
    /// Connections open to the server now (slots taken).
    pub(crate) open: u32,
    /// Pools on the server that are still alive.
    pub(crate) pools: usize,
    /// Idle connections closed to make room, since start.
    pub(crate) evictions: u64,
}

/// Opens tenant pools: the backends' way in.
pub(crate) trait PoolFactory: Send + Sync {
    /// A pool (connecting lazily) for `target`.
    fn open(&self, target: &Target, options: PoolOptions) -> Arc<dyn TenantPool>;

    /// The connection budgets of the database servers pools were opened on.
    fn budgets(&self) -> Vec<BudgetFigures>;
}
