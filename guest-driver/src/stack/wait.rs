//! Leaf: bounded queues that shard threads fill and application threads
//! wait on, and the sleep slice every blocking call uses.

use std::{
    collections::VecDeque,
    io,
    sync::{Condvar, Mutex},
    time::{Duration, Instant},
};

use super::poll::Readiness;

/// How long to sleep before looking again: at most 100 ms, never past
/// `deadline`; None once it has passed.
pub(crate) fn wait_slice(deadline: Option<Instant>) -> Option<Duration> {
    const STEP: Duration = Duration::from_millis(100);
    match deadline {
        Some(d) => {
            let now = Instant::now();
            (now < d).then(|| (d - now).min(STEP))
        }
        None => Some(STEP),
    }
}

/// The error of a call that found a stack lock poisoned.
pub(crate) fn lock_err() -> io::Error {
    io::Error::other("stack lock poisoned")
}

/// A bounded queue the shards fill and an application thread waits on:
/// accepted connections of a listener, datagrams of a UDP socket.
#[derive(Debug)]
pub(crate) struct WaitQueue<T> {
    q: Mutex<VecDeque<T>>,
    cond: Condvar,
    limit: usize,
}

impl<T> WaitQueue<T> {
    pub fn new(limit: usize) -> WaitQueue<T> {
        WaitQueue {
            q: Mutex::new(VecDeque::new()),
            cond: Condvar::new(),
            limit,
        }
    }

    /// Queues `item` and wakes the waiters; false when the queue is full.
    pub fn push(&self, item: T) -> bool {
        let Ok(mut q) = self.q.lock() else {
            return false;
        };
        if q.len() >= self.limit {
            return false;
        }
        q.push_back(item);
        drop(q);
        self.cond.notify_all();
        true
    }

    /// The oldest item, waiting until `deadline` (None: forever); None
    /// when the deadline passed first.
    pub fn pop(&self, deadline: Option<Instant>) -> io::Result<Option<T>> {
        let mut g = self.q.lock().map_err(|_| lock_err())?;
        loop {
            if let Some(item) = g.pop_front() {
                return Ok(Some(item));
            }
            let Some(wait) = wait_slice(deadline) else {
                return Ok(None);
            };
            g = self.cond.wait_timeout(g, wait).map_err(|_| lock_err())?.0;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.q.lock().map(|q| q.is_empty()).unwrap_or(true)
    }

    /// Readable while something waits in it.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            readable: !self.is_empty(),
            ..Readiness::default()
        }
    }
}
