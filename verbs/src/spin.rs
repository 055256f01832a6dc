//! Busy-wait helpers that keep clock reads off the polling loop.
//!
//! Reading the clock on every empty poll costs more than the poll itself where the clock
//! source is not the TSC (as in a TCG-emulated guest, where `clock_gettime` becomes a
//! system call), and that cost lands straight on the measured latency. These helpers
//! read it once per [`CLOCK_EVERY`] spins.

use std::time::{Duration, Instant};

/// Empty spins between two clock reads.
pub const CLOCK_EVERY: u32 = 1024;

/// A deadline for a busy-wait loop.
pub struct SpinDeadline {
    deadline: Instant,
    spins: u32,
}

impl SpinDeadline {
    pub fn new(timeout: Duration) -> Self {
        Self {
            deadline: Instant::now() + timeout,
            spins: 0,
        }
    }

    /// Call once per empty spin; true once the deadline has passed.
    #[inline]
    pub fn expired(&mut self) -> bool {
        self.spins = self.spins.wrapping_add(1);
        self.spins.is_multiple_of(CLOCK_EVERY) && Instant::now() >= self.deadline
    }
}

/// Spins while work flows; once idle for a while, yields and then sleeps briefly, so that
/// an idle server thread does not hold a core.
#[derive(Default)]
pub struct IdleBackoff {
    idle_since: Option<Instant>,
    spins: u32,
}

impl IdleBackoff {
    /// Call when the loop found work.
    #[inline]
    pub fn busy(&mut self) {
        self.idle_since = None;
        self.spins = 0;
    }

    /// Call when the loop found nothing. Returns true at most about once per 100 ms of
    /// idleness (or per sleep, once sleeping): the moment to check slow things such as a
    /// peer disconnect.
    #[inline]
    pub fn idle(&mut self) -> bool {
        self.spins = self.spins.wrapping_add(1);
        if !self.spins.is_multiple_of(CLOCK_EVERY) {
            return false;
        }
        let idle = self.idle_since.get_or_insert_with(Instant::now).elapsed();
        if idle > Duration::from_millis(100) {
            std::thread::sleep(Duration::from_micros(200));
            self.spins = CLOCK_EVERY - 1;
            true
        } else {
            if idle > Duration::from_millis(1) {
                std::thread::yield_now();
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_expires_only_after_its_time() {
        let mut d = SpinDeadline::new(Duration::from_millis(20));
        let start = Instant::now();
        while !d.expired() {}
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn backoff_reports_idleness_then_resets() {
        let mut b = IdleBackoff::default();
        let start = Instant::now();
        while !b.idle() {
            assert!(start.elapsed() < Duration::from_secs(5));
        }
        assert!(start.elapsed() >= Duration::from_millis(100));
        b.busy();
        assert!(!b.idle(), "a fresh idle period does not report at once");
    }
}
