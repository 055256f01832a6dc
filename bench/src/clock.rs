//! A cheap cycle clock for latency samples.
//!
//! `Instant::now()` is `clock_gettime`, which is a vDSO read of the TSC on most hosts but a
//! real system call plus an HPET read where the kernel does not trust the TSC — as in the
//! TCG-emulated rig guest, where each call costs microseconds and would sit inside every
//! sample. perftest times with the raw cycle counter for the same reason; so does this,
//! calibrated against the monotonic clock at start-up rather than taken from
//! /proc/cpuinfo (which need not match the counter's rate in a VM).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct CycleClock {
    ns_per_cycle: f64,
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn cycles() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64 (user-mode TSC reads are not disabled
    // by Linux).
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub fn cycles() -> u64 {
    use std::sync::OnceLock;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl CycleClock {
    /// Measures the counter's rate over `window` against the monotonic clock.
    pub fn calibrate(window: Duration) -> Self {
        let (t0, c0) = (Instant::now(), cycles());
        while t0.elapsed() < window {
            std::hint::spin_loop();
        }
        let (ns, c) = (
            t0.elapsed().as_nanos() as f64,
            cycles().wrapping_sub(c0) as f64,
        );
        Self {
            ns_per_cycle: if c > 0.0 { ns / c } else { 1.0 },
        }
    }

    #[inline]
    pub fn ns_between(&self, start: u64, end: u64) -> u64 {
        (end.wrapping_sub(start) as f64 * self.ns_per_cycle) as u64
    }

    pub fn ghz(&self) -> f64 {
        1.0 / self.ns_per_cycle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_clock_measures_a_sleep() {
        let clock = CycleClock::calibrate(Duration::from_millis(50));
        assert!(
            clock.ghz() > 0.01 && clock.ghz() < 100.0,
            "{} GHz",
            clock.ghz()
        );
        let c0 = cycles();
        std::thread::sleep(Duration::from_millis(30));
        let ns = clock.ns_between(c0, cycles());
        assert!(
            (25_000_000..200_000_000).contains(&ns),
            "{ns} ns for a 30 ms sleep"
        );
    }
}
