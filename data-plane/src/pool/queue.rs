//! The waiting queue of one tenant's pool: requests that wait for a connection while
//! every connection of the pool is lent out, for a request that gets one to take along
//! (PostgreSQL sends them in the same write: `backend::postgres::execute`). The queue
//! knows nothing of what a job is; the backend decides which jobs a connection takes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What `WaitQueue::take` does with one job.
pub(crate) enum Pick<J, T> {
    /// Leave it queued.
    Keep(J),
    /// Take it out; `Some` counts against the room (None: it was answered already).
    Take(Option<T>),
    /// Drop it (its request is gone).
    Drop,
}

/// Jobs waiting for a connection, oldest first.
pub(crate) struct WaitQueue<J> {
    jobs: Mutex<VecDeque<(u64, J)>>,
    count: AtomicUsize,
    next_id: AtomicU64,
    /// Jobs that went out in one write with another request's.
    pipelined: AtomicU64,
}

impl<J> Default for WaitQueue<J> {
    fn default() -> Self {
        Self {
            jobs: Mutex::new(VecDeque::new()),
            count: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            pipelined: AtomicU64::new(0),
        }
    }
}

impl<J> WaitQueue<J> {
    /// Jobs that went out in one write with another request's, since the pool opened.
    pub(crate) fn pipelined(&self) -> u64 {
        self.pipelined.load(Ordering::Relaxed)
    }

    /// Counts `count` jobs as sent in one write with another request's.
    pub(crate) fn count_pipelined(&self, count: usize) {
        self.pipelined.fetch_add(count as u64, Ordering::Relaxed);
    }

    pub(crate) fn has_jobs(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, J)>> {
        // Nothing panics while holding the lock; if something did, the queue is intact.
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `job`; the returned guard takes it back when dropped, unless a connection
    /// took it first.
    pub(crate) fn push(&self, job: J) -> Queued<'_, J> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut jobs = self.jobs();
        jobs.push_back((id, job));
        self.count.store(jobs.len(), Ordering::Release);
        drop(jobs);
        Queued {
            queue: self,
            id,
            queued: true,
        }
    }

    /// Takes the job back if no connection took it.
    fn take_back(&self, id: u64) -> bool {
        let mut jobs = self.jobs();
        let Some(position) = jobs.iter().position(|(queued, _)| *queued == id) else {
            return false;
        };
        jobs.remove(position);
        self.count.store(jobs.len(), Ordering::Release);
        true
    }

    /// Goes through the jobs, oldest first, and lets `pick` decide for each (told
    /// whether fewer than `room` have been taken so far).
    pub(crate) fn take<T>(
        &self,
        room: usize,
        mut pick: impl FnMut(J, bool) -> Pick<J, T>,
    ) -> Vec<T> {
        let mut taken = Vec::new();
        if !self.has_jobs() {
            return taken;
        }
        let mut jobs = self.jobs();
        let mut kept = VecDeque::with_capacity(jobs.len());
        while let Some((id, job)) = jobs.pop_front() {
            match pick(job, taken.len() < room) {
                Pick::Keep(job) => kept.push_back((id, job)),
                Pick::Take(job) => taken.extend(job),
                Pick::Drop => {}
            }
        }
        *jobs = kept;
        self.count.store(jobs.len(), Ordering::Release);
        taken
    }
}

/// A job in the queue, taken back when its request ends (answered or abandoned).
pub(crate) struct Queued<'a, J> {
    queue: &'a WaitQueue<J>,
    id: u64,
    queued: bool,
}

impl<J> Queued<'_, J> {
    /// Takes the job back; false if a connection took it meanwhile.
    pub(crate) fn take_back(&mut self) -> bool {
        self.queued = false;
        self.queue.take_back(self.id)
    }
}

impl<J> Drop for Queued<'_, J> {
    fn drop(&mut self) {
        if self.queued {
            self.queue.take_back(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_taken_once_and_its_guard_knows() {
        let queue = WaitQueue::default();
        let mut first = queue.push(1);
        let mut second = queue.push(2);
        let _third = queue.push(3);
        let taken = queue.take(1, |job, room| match job {
            2 => Pick::Drop,
            job if room => Pick::Take(Some(job * 10)),
            job => Pick::Keep(job),
        });
        assert_eq!(taken, vec![10]);
        assert!(!first.take_back(), "a taken job cannot be taken back");
        assert!(!second.take_back(), "a dropped job is gone");
        assert!(queue.has_jobs());
        drop(_third);
        assert!(!queue.has_jobs(), "a guard dropped takes its job back");
    }
}
