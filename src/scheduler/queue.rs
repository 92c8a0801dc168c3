//! The queue between request handlers and a version's worker threads.
//!
//! Its length is bounded by admission (a job exists only for an admitted request), so the
//! queue itself never refuses work. It closes when its version's last handle is dropped (every
//! submitter holds one), so nothing is pushed after close; workers drain it, then exit.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

use super::{Job, JobEvent, SchedulerError};

#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    ready: Condvar,
}

#[derive(Default)]
struct Inner {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl Queue {
    /// Add a job; on a closed queue (which no submitter should see) the job fails at once.
    pub fn push(&self, job: Job) {
        let mut inner = self.lock();
        if inner.closed {
            let _ = job.events.send(JobEvent::Failed(SchedulerError::WorkerGone));
            return;
        }
        inner.jobs.push_back(job);
        drop(inner);
        self.ready.notify_one();
    }

    /// The next job, waiting for one; `None` once closed and drained.
    pub fn pop(&self) -> Option<Job> {
        let mut inner = self.lock();
        loop {
            if let Some(job) = inner.jobs.pop_front() {
                return Some(job);
            }
            if inner.closed {
                return None;
            }
            inner = self.ready.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The next job if there is one and `fits` accepts it; never waits. The queue stays in
    /// order: a job that does not fit holds back the ones behind it.
    pub fn pop_if(&self, fits: impl FnOnce(&Job) -> bool) -> Option<Job> {
        let mut inner = self.lock();
        if inner.jobs.front().is_some_and(fits) { inner.jobs.pop_front() } else { None }
    }

    /// A panic while the lock was held left whole jobs in the queue, so a poisoned lock is
    /// still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fail every job waiting, with `error`.
    pub fn refuse_waiting(&self, error: impl Fn() -> SchedulerError) {
        let waiting: Vec<Job> = self.lock().jobs.drain(..).collect();
        for job in waiting {
            let _ = job.events.send(JobEvent::Failed(error()));
        }
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}
