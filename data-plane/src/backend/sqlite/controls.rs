//! The switches of one SQLite connection that its callbacks read while a statement runs
//! (the authorizer: may transaction control pass; the progress handler: has the
//! request's deadline or the time budget of a statement run on the request's own thread
//! passed), set from the request's task without a trip to the worker thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::pool::micros_since_epoch;

/// Per-connection switches that the connection's SQLite callbacks (authorizer, progress
/// handler) read. Set from the request's task without a trip to the worker thread.
#[derive(Default)]
pub(crate) struct SqliteControls {
    /// Lets BEGIN/COMMIT/ROLLBACK/SAVEPOINT through the authorizer (Batch sets it around
    /// its own transaction statements; tenant statements never get it).
    pub(crate) allow_transaction_control: AtomicBool,
    /// Statements running past this instant (`pool::micros_since_epoch`; 0 = no
    /// deadline) are interrupted.
    deadline_micros: AtomicU64,
    /// A statement running on the request's own thread is interrupted at this instant
    /// (`pool::micros_since_epoch`; 0 = not running there), to go on a blocking thread
    /// instead.
    here_until_micros: AtomicU64,
}

impl SqliteControls {
    /// Interrupt statements still running at `deadline` (None: never).
    pub(crate) fn set_deadline(&self, deadline: Option<Instant>) {
        let micros = deadline.map_or(0, |at| micros_since_epoch(at).max(1));
        self.deadline_micros.store(micros, Ordering::Release);
    }

    /// Interrupt whatever runs now.
    pub(crate) fn interrupt_now(&self) {
        self.deadline_micros.store(1, Ordering::Release);
    }

    /// For the progress handler: may the running statement go on?
    pub(crate) fn may_continue(&self) -> bool {
        let deadline = self.deadline_micros.load(Ordering::Acquire);
        let here_until = self.here_until_micros.load(Ordering::Acquire);
        if deadline == 0 && here_until == 0 {
            return true;
        }
        let now = micros_since_epoch(Instant::now());
        (deadline == 0 || now < deadline) && (here_until == 0 || now < here_until)
    }

    /// Whether the request's deadline has passed.
    pub(crate) fn deadline_passed(&self) -> bool {
        let deadline = self.deadline_micros.load(Ordering::Acquire);
        deadline != 0 && micros_since_epoch(Instant::now()) >= deadline
    }

    /// Interrupt the running statement once it has run for `budget` (None: no such
    /// limit; the request's deadline still holds).
    pub(crate) fn set_time_budget(&self, budget: Option<Duration>) {
        let micros = budget.map_or(0, |budget| {
            micros_since_epoch(Instant::now() + budget).max(1)
        });
        self.here_until_micros.store(micros, Ordering::Release);
    }

    pub(crate) fn transaction_control_allowed(&self) -> bool {
        self.allow_transaction_control.load(Ordering::Acquire)
    }
}
