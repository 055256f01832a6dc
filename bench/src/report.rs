//! Latency histograms and their reports: p50/p99/p999/max from hdrhistogram, never a bare mean.

use hdrhistogram::Histogram;
use serde::Serialize;

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

#[derive(Debug, Serialize)]
pub struct LatencyReport {
    pub op: String,
    pub size_bytes: usize,
    pub iters: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub min_ns: u64,
    pub device: String,
    pub peer_device: String,
    /// `round_trip` (READ, CAS: one operation) or `half_round_trip` (WRITE and SEND
    /// ping-pong, as ib_write_lat and ib_send_lat report).
    pub convention: &'static str,
}

impl LatencyReport {
    pub fn from_histogram(
        op: &str,
        size_bytes: usize,
        hist: &Histogram<u64>,
        device: &str,
        peer_device: &str,
        convention: &'static str,
    ) -> Self {
        Self {
            op: op.to_owned(),
            size_bytes,
            iters: hist.len(),
            p50_ns: hist.value_at_quantile(0.50),
            p99_ns: hist.value_at_quantile(0.99),
            p999_ns: hist.value_at_quantile(0.999),
            max_ns: hist.max(),
            min_ns: hist.min(),
            device: device.to_owned(),
            peer_device: peer_device.to_owned(),
            convention,
        }
    }

    pub fn human(&self) -> String {
        let us = |ns: u64| ns as f64 / 1000.0;
        format!(
            "{:<5} {:>7} B x {:>7} {}->{} ({}): p50 {:>8.2} us  p99 {:>8.2} us  p999 {:>8.2} us  max {:>9.2} us",
            self.op,
            self.size_bytes,
            self.iters,
            self.device,
            self.peer_device,
            self.convention,
            us(self.p50_ns),
            us(self.p99_ns),
            us(self.p999_ns),
            us(self.max_ns)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_quantiles_from_the_histogram() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let r = LatencyReport::from_histogram("read", 8, &h, "rxe1", "rxe2", "round_trip");
        assert_eq!(r.iters, 1000);
        assert!((499_000..=501_000).contains(&r.p50_ns), "{}", r.p50_ns);
        assert!((989_000..=991_000).contains(&r.p99_ns), "{}", r.p99_ns);
        assert!(r.max_ns >= 999_000 && r.max_ns <= 1_001_000);
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "op",
            "size_bytes",
            "iters",
            "p50_ns",
            "p99_ns",
            "p999_ns",
            "max_ns",
            "device",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }
}
