//! Busy-wait helpers that keep clock reads off the polling loop.
//!
//! Reading the clock on every empty poll costs more than the poll itself where the clock
//! source is not the TSC (as in a TCG-emulated guest, where `clock_gettime` becomes a
//! system call), and that cost lands straight on the measured latency. These helpers
//! read it once per [`CLOCK_EVERY`] spins.

use std::time::{Duration, Instant};

/// Empty spins between two clock reads.
pub const CLOCK_EVERY: u32 = 1024;

/// A deadline for a busy-wait loop. Creating one reads no clock either: the clock is
/// first read after [`CLOCK_EVERY`] spins, and the timeout counts from then, so a wait
/// that ends within those spins (the common case on a datapath) never touches the clock.
pub struct SpinDeadline {
    timeout: Duration,
    started: Option<Instant>,
    spins: u32,
}

impl SpinDeadline {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            started: None,
            spins: 0,
        }
    }

    /// Call once per empty spin; true once the timeout has passed.
    #[inline]
    pub fn expired(&mut self) -> bool {
        self.spins = self.spins.wrapping_add(1);
        if !self.spins.is_multiple_of(CLOCK_EVERY) {
            return false;
        }
        self.started.get_or_insert_with(Instant::now).elapsed() >= self.timeout
    }
}

/// Spins while work flows; once idle for a while, yields, then sleeps for doubling
/// intervals (up to [`MAX_IDLE_SLEEP`]), so that an idle server thread neither holds a core
/// nor wakes it thousands of times a second (which, on a 2-vCPU emulated guest, steals
/// time from the threads that are doing work).
#[derive(Default)]
pub struct IdleBackoff {
    idle_since: Option<Instant>,
    sleep: Duration,
    spins: u32,
}

/// The longest nap of an idle loop; it bounds how late an idle loop notices new work.
pub const MAX_IDLE_SLEEP: Duration = Duration::from_millis(10);

impl IdleBackoff {
    /// Call when the loop found work.
    #[inline]
    pub fn busy(&mut self) {
        self.idle_since = None;
        self.sleep = Duration::ZERO;
        self.spins = 0;
    }

    /// Call when the loop found nothing. Returns true once the loop has been idle for
    /// 100 ms, and after every nap from then on: the moment to check slow things such as a
    /// peer disconnect.
    #[inline]
    pub fn idle(&mut self) -> bool {
        if self.sleep.is_zero() {
            self.spins = self.spins.wrapping_add(1);
            if !self.spins.is_multiple_of(CLOCK_EVERY) {
                return false;
            }
            let idle = self.idle_since.get_or_insert_with(Instant::now).elapsed();
            if idle <= Duration::from_millis(100) {
                if idle > Duration::from_millis(1) {
                    std::thread::yield_now();
                }
                return false;
            }
            self.sleep = Duration::from_micros(100);
        }
        std::thread::sleep(self.sleep);
        self.sleep = (self.sleep * 2).min(MAX_IDLE_SLEEP);
        true
    }
}

/// How long a control-plane loop spins on empty polls before it sleeps in
/// [`crate::wait`] (`PMGAS_SPIN_US` overrides; 0 sleeps at once).
pub const DEFAULT_SPIN_US: u64 = 50;

fn spin_budget() -> Duration {
    static BUDGET: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let us = std::env::var("PMGAS_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_SPIN_US);
        Duration::from_micros(us)
    })
}

/// Tracks a loop's empty passes: it spins for the spin budget while work may be about to
/// arrive, then says to sleep until a descriptor wakes it. Reads the clock once per
/// [`CLOCK_EVERY`] empty passes.
pub struct SpinThenSleep {
    deadline: SpinDeadline,
    budget: Duration,
}

impl Default for SpinThenSleep {
    fn default() -> Self {
        let budget = spin_budget();
        Self {
            deadline: SpinDeadline::new(budget),
            budget,
        }
    }
}

impl SpinThenSleep {
    #[inline]
    pub fn busy(&mut self) {
        self.deadline = SpinDeadline::new(self.budget);
    }

    /// Call on an empty pass; true when the loop should arm and sleep now.
    #[inline]
    pub fn should_sleep(&mut self) -> bool {
        self.budget.is_zero() || self.deadline.expired()
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
        // Once idle, every call naps and reports.
        assert!(b.idle());
        b.busy();
        assert!(!b.idle(), "a fresh idle period does not report at once");
    }
}
