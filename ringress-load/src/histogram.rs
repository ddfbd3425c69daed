//! Latency histogram of the load threads: quantiles of round trips (ns).

/// A log-linear latency histogram over nanoseconds: exact below 1024 ns, then 512
/// sub-buckets per power of two (relative error below 0.2 %).
#[derive(Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    /// The largest value recorded (ns).
    pub(crate) max: u64,
}

const SUB_BITS: u32 = 9;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    pub(crate) fn new() -> Histogram {
        Histogram {
            counts: vec![0; (2 * SUB + 64 * SUB) as usize],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let top = v >> shift; // in [SUB, 2*SUB)
        (2 * SUB + (shift as u64 - 1) * SUB + (top - SUB)) as usize
    }

    /// The middle of bucket `i`, in ns.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = (i - 2 * SUB) / SUB + 1;
        let top = (i - 2 * SUB) % SUB + SUB;
        (top << shift) + (1u64 << shift) / 2
    }

    pub(crate) fn record(&mut self, ns: u64) {
        self.counts[Histogram::index(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    pub(crate) fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
    }

    /// The `q` quantile (0..=1) in ns; 0 when empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Histogram::value(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_buckets_round_trip() {
        for v in [0u64, 1, 1023, 1024, 1025, 5000, 123_456, 10_000_000_000] {
            let i = Histogram::index(v);
            let back = Histogram::value(i);
            let err = (back as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.005, "{v} -> {i} -> {back}");
        }
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.01, "{p50}");
    }
}
