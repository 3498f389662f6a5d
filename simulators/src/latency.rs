//! A fixed log-bucket latency histogram, cheap enough to record every acknowledgement of a fleet
//! at tens of thousands per second.
//!
//! Values are microseconds. Below 64 µs every value has its own bucket; above, each power of two
//! is split into 32 buckets, so a bucket is at most 1/32 of its lower bound wide and a reported
//! percentile (the bucket's midpoint) is within 1.6 % of the true value. Values from 2³² µs
//! (about 71 minutes) on share the last bucket. 896 buckets, 7 KiB, whatever the volume.
//!
//! [`AtomicHistogram`] is shared by many tasks (relaxed atomic adds, no lock); [`Histogram`] is
//! a snapshot of it, and two snapshots give the histogram of the time between them
//! ([`Histogram::since`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// Values below this have a bucket each.
const LINEAR: u64 = 64;
/// Buckets per power of two above `LINEAR`.
const PER_OCTAVE: u64 = LINEAR / 2;
/// Values are clamped below `1 << MAX_BITS`.
const MAX_BITS: u32 = 32;
/// `LINEAR.trailing_zeros()`: the first exponent with split buckets.
const LINEAR_BITS: u32 = 6;
const BUCKETS: usize = (LINEAR + (MAX_BITS - LINEAR_BITS) as u64 * PER_OCTAVE) as usize;

/// The bucket of a value.
fn bucket_of(value: u64) -> usize {
    let value = value.min((1 << MAX_BITS) - 1);
    if value < LINEAR {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros(); // LINEAR_BITS..MAX_BITS
    let shift = exponent + 1 - LINEAR_BITS; // the bucket width is 1 << shift
    let mantissa = value >> shift; // PER_OCTAVE..LINEAR
    (LINEAR + u64::from(shift - 1) * PER_OCTAVE + (mantissa - PER_OCTAVE)) as usize
}

/// The smallest and largest value of a bucket.
fn bucket_range(bucket: usize) -> (u64, u64) {
    let bucket = bucket as u64;
    if bucket < LINEAR {
        return (bucket, bucket);
    }
    let above = bucket - LINEAR;
    let shift = above / PER_OCTAVE + 1;
    let low = (PER_OCTAVE + above % PER_OCTAVE) << shift;
    (low, low + (1 << shift) - 1)
}

/// A histogram many tasks record into at once.
#[derive(Debug)]
pub struct AtomicHistogram {
    counts: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram { counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(), max: AtomicU64::new(0) }
    }
}

impl AtomicHistogram {
    /// Records one value, in µs.
    pub fn record(&self, value_us: u64) {
        self.counts[bucket_of(value_us)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(value_us, Ordering::Relaxed);
    }

    /// The counts so far. Records that race with the snapshot may or may not be in it.
    pub fn snapshot(&self) -> Histogram {
        Histogram {
            counts: self.counts.iter().map(|count| count.load(Ordering::Relaxed)).collect(),
            max_us: self.max.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of an [`AtomicHistogram`], or the difference of two.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    counts: Vec<u64>,
    /// The exact maximum of a full snapshot; for a difference, the upper end of its highest
    /// non-empty bucket (capped at the later snapshot's exact maximum).
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS], max_us: 0 }
    }
}

impl Histogram {
    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram) up to `self`.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let counts: Vec<u64> =
            self.counts.iter().zip(&earlier.counts).map(|(now, then)| now.saturating_sub(*then)).collect();
        let max_us = counts
            .iter()
            .rposition(|&count| count > 0)
            .map_or(0, |bucket| bucket_range(bucket).1.min(self.max_us));
        Histogram { counts, max_us }
    }

    /// The nearest-rank percentile (`fraction` in 0..=1), as its bucket's midpoint, in µs.
    pub fn percentile_us(&self, fraction: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((fraction * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (bucket, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_range(bucket);
                let mid = (low as f64 + high as f64) / 2.0;
                return Some(mid.min(self.max_us as f64));
            }
        }
        None
    }

    /// [`Histogram::percentile_us`] in ms.
    pub fn percentile_ms(&self, fraction: f64) -> Option<f64> {
        self.percentile_us(fraction).map(|us| us / 1000.0)
    }

    /// The largest value, in ms (see the field's doc for differences).
    pub fn max_ms(&self) -> Option<f64> {
        (self.count() > 0).then(|| self.max_us as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_narrow() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(63), 63);
        assert_eq!(bucket_of(64), 64);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        let mut next = 0;
        for bucket in 0..BUCKETS {
            let (low, high) = bucket_range(bucket);
            assert_eq!(low, next, "bucket {bucket}");
            assert_eq!((bucket_of(low), bucket_of(high)), (bucket, bucket));
            assert!((high - low) as f64 <= low as f64 / 32.0, "bucket {bucket}: {low}..={high}");
            next = high + 1;
        }
        assert_eq!(next, 1 << MAX_BITS);
    }

    #[test]
    fn percentiles_are_within_two_percent() {
        let histogram = AtomicHistogram::default();
        for us in 1..=100_000 {
            histogram.record(us);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count(), 100_000);
        for (fraction, exact) in [(0.5, 50_000.0), (0.99, 99_000.0)] {
            let got = snapshot.percentile_us(fraction).expect("values");
            assert!((got - exact).abs() / exact < 0.016, "p{fraction}: {got} vs {exact}");
        }
        assert_eq!(snapshot.max_ms(), Some(100.0));
        assert_eq!(Histogram::default().percentile_ms(0.5), None);
    }

    #[test]
    fn differences_count_only_the_later_values() {
        let histogram = AtomicHistogram::default();
        histogram.record(10_000);
        let before = histogram.snapshot();
        histogram.record(3);
        histogram.record(5);
        let window = histogram.snapshot().since(&before);
        assert_eq!(window.count(), 2);
        assert_eq!(window.percentile_us(0.5), Some(3.0));
        assert_eq!(window.max_ms(), Some(0.005));
    }
}
