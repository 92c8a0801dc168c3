//! A memory budget shared by every request of a server, such as the memory for decoding
//! images: a request reserves what its images' headers say decoding will take before any pixel
//! is decoded, waits while others hold the budget, and gives it back when its prompt is
//! prepared. A few kilobytes of PNG can claim hundreds of megabytes of pixels; without a bound,
//! a handful of such requests at once exhaust the machine.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::PreprocessError;

/// The budget, in bytes.
#[derive(Debug)]
pub struct MemoryBudget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes held until dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

/// Why bytes were not reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// More than the whole budget.
    Never { bytes: u64, budget: u64 },
    /// Not free within the wait.
    NotNow { bytes: u64, budget: u64 },
}

impl From<Shortfall> for PreprocessError {
    fn from(shortfall: Shortfall) -> Self {
        match shortfall {
            Shortfall::Never { bytes, budget } => PreprocessError::DecodeTooLarge { bytes, budget },
            Shortfall::NotNow { bytes, budget } => PreprocessError::DecodeBusy { bytes, budget },
        }
    }
}

impl MemoryBudget {
    pub fn new(total: u64) -> Self {
        Self { total, used: Mutex::new(0), freed: Condvar::new() }
    }

    /// Reserve `bytes`, waiting up to `wait` for others to give some back (not at all for
    /// zero, so it may be called on an async thread).
    pub fn reserve(&self, bytes: u64, wait: Duration) -> Result<Reservation<'_>, Shortfall> {
        if bytes > self.total {
            return Err(Shortfall::Never { bytes, budget: self.total });
        }
        let deadline = Instant::now() + wait;
        // A poisoned lock still holds a count: every change is one addition or subtraction.
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + bytes > self.total {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Shortfall::NotNow { bytes, budget: self.total });
            }
            used = self.freed.wait_timeout(used, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        *used += bytes;
        Ok(Reservation { budget: self, bytes })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.budget.used.lock().unwrap_or_else(|e| e.into_inner()) -= self.bytes;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_wait_for_each_other_and_never_exceed_the_budget() {
        let budget = MemoryBudget::new(1000);
        let first = budget.reserve(600, Duration::ZERO).unwrap();
        let busy = budget.reserve(600, Duration::from_millis(20)).unwrap_err();
        assert_eq!(busy, Shortfall::NotNow { bytes: 600, budget: 1000 });
        assert!(matches!(budget.reserve(1001, Duration::ZERO), Err(Shortfall::Never { .. })));
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| budget.reserve(600, Duration::from_secs(10)).map(|r| r.bytes));
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(budget.used(), 600, "the second waits while the first holds its bytes");
            drop(first);
            assert_eq!(waiter.join().unwrap().unwrap(), 600);
        });
        assert_eq!(budget.used(), 0, "every reservation gave its bytes back");
    }
}
