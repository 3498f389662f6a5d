//! Aggregate functions over a window: their state, how an event's value updates it, and the
//! value it stands for when the window closes.
//!
//! **Invariant:** every state is bounded whatever the number of events: `collect` keeps at
//! most its cap (the rest is counted, not kept), and `percentile` keeps a sketch of at most
//! [`SKETCH_MAX_BUCKETS`] buckets (see [`Sketch`]). Values that are not numbers are ignored
//! by the numeric aggregates as NULL is, so a stray string never fails a window.

use serde::{Deserialize, Serialize};

use super::SnapshotError;
use super::codec::{Reader, Writer};
use crate::value::Value;

/// Which aggregate a column computes. Fixed at compile time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AggKind {
    /// `count(*)`: events in the window.
    CountAll,
    /// `count(expr)`: events where `expr` is not NULL.
    Count,
    Sum,
    Avg,
    Min,
    Max,
    /// The value of the window's first event where it is not NULL.
    First,
    /// The value of the window's last event where it is not NULL.
    Last,
    /// Population standard deviation (Welford's update, numerically stable).
    Stddev,
    /// `percentile(expr, p)`, `p` in `[0, 1]`; approximate, see [`Sketch`].
    Percentile(f64),
    /// `collect(expr[, cap])`: the values in arrival order, at most `cap` of them.
    Collect(usize),
}

/// `collect`'s cap when the rule gives none.
pub const DEFAULT_COLLECT_CAP: usize = 100;
/// The largest cap a rule may give `collect`.
pub const MAX_COLLECT_CAP: usize = 10_000;

impl AggKind {
    /// The function names a rule writes, for parsing and for did-you-mean.
    pub const NAMES: &'static [&'static str] =
        &["count", "sum", "avg", "min", "max", "first", "last", "stddev", "percentile", "collect"];

    pub(crate) fn new_state(&self) -> AggState {
        match self {
            AggKind::CountAll | AggKind::Count => AggState::Count(0),
            AggKind::Sum => AggState::Sum { int: 0, float: 0.0, is_float: false, n: 0 },
            AggKind::Avg => AggState::Avg { sum: 0.0, n: 0 },
            AggKind::Min | AggKind::Max | AggKind::First | AggKind::Last => AggState::One(None),
            AggKind::Stddev => AggState::Stddev { n: 0, mean: 0.0, m2: 0.0 },
            AggKind::Percentile(_) => AggState::Percentile(Box::default()),
            AggKind::Collect(_) => AggState::Collect { items: Vec::new(), dropped: 0 },
        }
    }
}

/// The running state of one aggregate in one window instance. Written in format 2
/// ([`AggState::encode`]); `Deserialize` reads format 1.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub enum AggState {
    Count(u64),
    /// Integers add exactly while they fit in an `i64`; the first float (or an overflow)
    /// makes the sum a float.
    Sum {
        int: i64,
        float: f64,
        is_float: bool,
        n: u64,
    },
    Avg {
        sum: f64,
        n: u64,
    },
    One(Option<Value>),
    Stddev {
        n: u64,
        mean: f64,
        m2: f64,
    },
    /// Boxed: the sketch is large, and every other state would pay for the largest variant.
    Percentile(Box<Sketch>),
    Collect {
        items: Vec<Value>,
        dropped: u64,
    },
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) if f.is_finite() => Some(*f),
        _ => None,
    }
}

fn is_number(value: &Value) -> bool {
    number(value).is_some()
}

/// Orders two numbers for min/max; `None` when either is not a number.
fn less(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(a), Value::Int(b)) => a < b,
        _ => match (number(a), number(b)) {
            (Some(a), Some(b)) => a < b,
            _ => false,
        },
    }
}

impl AggState {
    /// Takes one event's value for this aggregate.
    pub(crate) fn add(&mut self, kind: &AggKind, value: &Value) {
        match (self, kind) {
            (AggState::Count(n), AggKind::CountAll) => *n += 1,
            (AggState::Count(n), _) => {
                if !value.is_null_var() {
                    *n += 1;
                }
            }
            (AggState::Sum { int, float, is_float, n }, _) => match value {
                Value::Int(i) if !*is_float => match int.checked_add(*i) {
                    Some(sum) => {
                        *int = sum;
                        *n += 1;
                    }
                    None => {
                        *is_float = true;
                        *float = *int as f64 + *i as f64;
                        *n += 1;
                    }
                },
                other => {
                    if let Some(x) = number(other) {
                        if !*is_float {
                            *is_float = true;
                            *float = *int as f64;
                        }
                        *float += x;
                        *n += 1;
                    }
                }
            },
            (AggState::Avg { sum, n }, _) => {
                if let Some(x) = number(value) {
                    *sum += x;
                    *n += 1;
                }
            }
            (AggState::One(slot), kind) => {
                if value.is_null_var() {
                    return;
                }
                let replace = match (kind, &*slot) {
                    (AggKind::First, None) | (AggKind::Last, _) => true,
                    (AggKind::First, Some(_)) => false,
                    (AggKind::Min, current) => {
                        is_number(value) && current.as_ref().is_none_or(|c| less(value, c))
                    }
                    (AggKind::Max, current) => {
                        is_number(value) && current.as_ref().is_none_or(|c| less(c, value))
                    }
                    _ => false,
                };
                if replace {
                    *slot = Some(value.clone());
                }
            }
            (AggState::Stddev { n, mean, m2 }, _) => {
                if let Some(x) = number(value) {
                    *n += 1;
                    let delta = x - *mean;
                    *mean += delta / *n as f64;
                    *m2 += delta * (x - *mean);
                }
            }
            (AggState::Percentile(sketch), _) => {
                if let Some(x) = number(value) {
                    sketch.add(x);
                }
            }
            (AggState::Collect { items, dropped }, kind) => {
                let cap = match kind {
                    AggKind::Collect(cap) => *cap,
                    _ => DEFAULT_COLLECT_CAP,
                };
                if value.is_null_var() {
                    return;
                }
                if items.len() < cap {
                    items.push(value.clone());
                } else {
                    *dropped += 1;
                }
            }
        }
    }

    /// The aggregate's value. NULL where SQL gives NULL: a sum, average, minimum ... of no
    /// numbers.
    pub(crate) fn value(&self, kind: &AggKind) -> Value {
        match self {
            AggState::Count(n) => Value::Int(i64::try_from(*n).unwrap_or(i64::MAX)),
            AggState::Sum { n: 0, .. } | AggState::Avg { n: 0, .. } | AggState::Stddev { n: 0, .. } => {
                Value::Null
            }
            AggState::Sum { int, float, is_float, .. } => {
                if *is_float {
                    Value::Float(*float)
                } else {
                    Value::Int(*int)
                }
            }
            AggState::Avg { sum, n } => Value::Float(sum / *n as f64),
            AggState::One(slot) => slot.clone().unwrap_or(Value::Null),
            AggState::Stddev { n, m2, .. } => Value::Float((m2 / *n as f64).max(0.0).sqrt()),
            AggState::Percentile(sketch) => match kind {
                AggKind::Percentile(p) => sketch.quantile(*p).map_or(Value::Null, Value::Float),
                _ => Value::Null,
            },
            AggState::Collect { items, .. } => Value::Array(items.clone()),
        }
    }
}

/// Format 2's tags of the states (`window::codec`): each state is an array, its tag first.
mod tag {
    pub const COUNT: u64 = 0;
    pub const SUM: u64 = 1;
    pub const AVG: u64 = 2;
    pub const ONE: u64 = 3;
    pub const STDDEV: u64 = 4;
    pub const PERCENTILE: u64 = 5;
    pub const COLLECT: u64 = 6;
}

impl AggState {
    /// Format 2: `[tag, fields…]`, positional.
    pub(super) fn encode(&self, w: &mut Writer) {
        match self {
            AggState::Count(n) => {
                w.array(2);
                w.uint(tag::COUNT);
                w.uint(*n);
            }
            AggState::Sum { int, float, is_float, n } => {
                w.array(5);
                w.uint(tag::SUM);
                w.int(*int);
                w.float(*float);
                w.bool(*is_float);
                w.uint(*n);
            }
            AggState::Avg { sum, n } => {
                w.array(3);
                w.uint(tag::AVG);
                w.float(*sum);
                w.uint(*n);
            }
            AggState::One(slot) => {
                w.array(if slot.is_some() { 2 } else { 1 });
                w.uint(tag::ONE);
                if let Some(value) = slot {
                    w.value(value);
                }
            }
            AggState::Stddev { n, mean, m2 } => {
                w.array(4);
                w.uint(tag::STDDEV);
                w.uint(*n);
                w.float(*mean);
                w.float(*m2);
            }
            AggState::Percentile(sketch) => {
                w.array(7);
                w.uint(tag::PERCENTILE);
                for buckets in [&sketch.positive, &sketch.negative] {
                    // Flat: index, count, index, count …
                    w.array(buckets.len() * 2);
                    for (index, count) in buckets {
                        w.int(i64::from(*index));
                        w.uint(*count);
                    }
                }
                w.uint(sketch.zeros);
                w.uint(sketch.n);
                w.float(sketch.min);
                w.float(sketch.max);
            }
            AggState::Collect { items, dropped } => {
                w.array(3);
                w.uint(tag::COLLECT);
                w.values(items);
                w.uint(*dropped);
            }
        }
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<AggState, SnapshotError> {
        let len = r.array()?;
        let bad = || SnapshotError::Decode(format!("an aggregate state of {len} fields"));
        let state = match (r.uint()?, len) {
            (tag::COUNT, 2) => AggState::Count(r.uint()?),
            (tag::SUM, 5) => {
                AggState::Sum { int: r.int()?, float: r.float()?, is_float: r.bool()?, n: r.uint()? }
            }
            (tag::AVG, 3) => AggState::Avg { sum: r.float()?, n: r.uint()? },
            (tag::ONE, 1) => AggState::One(None),
            (tag::ONE, 2) => AggState::One(Some(r.value()?)),
            (tag::STDDEV, 4) => AggState::Stddev { n: r.uint()?, mean: r.float()?, m2: r.float()? },
            (tag::PERCENTILE, 7) => {
                let mut sides = [Vec::new(), Vec::new()];
                for buckets in &mut sides {
                    let n = r.array()?;
                    if n % 2 != 0 || n / 2 > SKETCH_MAX_BUCKETS {
                        return Err(SnapshotError::Decode(format!("a sketch side of {n} items")));
                    }
                    buckets.reserve(n / 2);
                    for _ in 0..n / 2 {
                        let index =
                            i32::try_from(r.int()?).map_err(|e| SnapshotError::Decode(e.to_string()))?;
                        buckets.push((index, r.uint()?));
                    }
                }
                let [positive, negative] = sides;
                AggState::Percentile(Box::new(Sketch {
                    positive,
                    negative,
                    zeros: r.uint()?,
                    n: r.uint()?,
                    min: r.float()?,
                    max: r.float()?,
                }))
            }
            (tag::COLLECT, 3) => AggState::Collect { items: r.values()?, dropped: r.uint()? },
            _ => return Err(bad()),
        };
        Ok(state)
    }
}

/// The relative accuracy of [`Sketch`]: a percentile it returns is within 1 % of the value
/// of the rank it stands for (for values of magnitude at least [`SKETCH_MIN_VALUE`]).
pub const SKETCH_RELATIVE_ACCURACY: f64 = 0.01;
/// Buckets per sign before the smallest magnitudes are merged.
pub const SKETCH_MAX_BUCKETS: usize = 1024;
/// Magnitudes below this count as zero.
pub const SKETCH_MIN_VALUE: f64 = 1e-9;

/// A quantile sketch with logarithmic buckets (the DDSketch algorithm, Masson, Rim and Lee,
/// VLDB 2019): a value `x > 0` goes to bucket `ceil(log_γ x)` with
/// `γ = (1 + α) / (1 − α)`, α = [`SKETCH_RELATIVE_ACCURACY`], and a bucket stands for
/// `2γ^i / (γ + 1)`, which is within α of every value in it. Negative values have buckets
/// of their own, near-zero values a counter. With more than [`SKETCH_MAX_BUCKETS`] buckets
/// on one side the buckets of the smallest magnitudes are merged, so only the lowest
/// quantiles of a range wider than γ^1024 (about 10^8.7) lose their accuracy. The extremes
/// are exact: `percentile(x, 0)` is the minimum and `percentile(x, 1)` the maximum.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub struct Sketch {
    /// (bucket index, count), sorted by index: values > 0.
    positive: Vec<(i32, u64)>,
    /// (bucket index of |x|, count), sorted by index: values < 0.
    negative: Vec<(i32, u64)>,
    zeros: u64,
    n: u64,
    min: f64,
    max: f64,
}

fn gamma() -> f64 {
    (1.0 + SKETCH_RELATIVE_ACCURACY) / (1.0 - SKETCH_RELATIVE_ACCURACY)
}

fn bucket_of(magnitude: f64) -> i32 {
    // Finite and ≥ SKETCH_MIN_VALUE, so the index is within ±2,200: no overflow.
    (magnitude.ln() / gamma().ln()).ceil() as i32
}

fn bucket_value(index: i32) -> f64 {
    let g = gamma();
    2.0 * g.powi(index) / (g + 1.0)
}

fn add_bucket(buckets: &mut Vec<(i32, u64)>, index: i32) {
    match buckets.binary_search_by_key(&index, |(i, _)| *i) {
        Ok(at) => buckets[at].1 += 1,
        Err(at) => {
            buckets.insert(at, (index, 1));
            if buckets.len() > SKETCH_MAX_BUCKETS {
                // Merge the two smallest magnitudes into the larger one's bucket.
                let (_, count) = buckets.remove(0);
                buckets[0].1 += count;
            }
        }
    }
}

impl Sketch {
    pub(crate) fn add(&mut self, x: f64) {
        if self.n == 0 {
            self.min = x;
            self.max = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.n += 1;
        if x.abs() < SKETCH_MIN_VALUE {
            self.zeros += 1;
        } else if x > 0.0 {
            add_bucket(&mut self.positive, bucket_of(x));
        } else {
            add_bucket(&mut self.negative, bucket_of(-x));
        }
    }

    /// The value at rank `p × (n − 1)` (0-based, rounded down), within the sketch's accuracy;
    /// `None` for an empty sketch.
    pub(crate) fn quantile(&self, p: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((p.clamp(0.0, 1.0) * (self.n - 1) as f64).floor()) as u64;
        if rank == 0 {
            return Some(self.min);
        }
        if rank == self.n - 1 {
            return Some(self.max);
        }
        let mut seen = 0u64;
        // Ascending order: the most negative first, then zeros, then positives.
        for (index, count) in self.negative.iter().rev() {
            seen += count;
            if seen > rank {
                return Some((-bucket_value(*index)).clamp(self.min, self.max));
            }
        }
        seen += self.zeros;
        if seen > rank {
            return Some(0.0);
        }
        for (index, count) in &self.positive {
            seen += count;
            if seen > rank {
                return Some(bucket_value(*index).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: AggKind, values: &[Value]) -> Value {
        let mut state = kind.new_state();
        for v in values {
            state.add(&kind, v);
        }
        state.value(&kind)
    }

    #[test]
    fn basic_aggregates_follow_sql_null_rules() {
        let values = [Value::Int(3), Value::Null, Value::Float(1.5), Value::Str("x".into()), Value::Int(-2)];
        assert_eq!(run(AggKind::CountAll, &values), Value::Int(5));
        assert_eq!(run(AggKind::Count, &values), Value::Int(4));
        assert_eq!(run(AggKind::Sum, &values), Value::Float(2.5));
        assert_eq!(run(AggKind::Sum, &[Value::Int(2), Value::Int(3)]), Value::Int(5));
        assert_eq!(run(AggKind::Avg, &values), Value::Float(2.5 / 3.0));
        assert_eq!(run(AggKind::Min, &values), Value::Int(-2));
        assert_eq!(run(AggKind::Max, &values), Value::Int(3));
        assert_eq!(run(AggKind::First, &values), Value::Int(3));
        assert_eq!(run(AggKind::Last, &values), Value::Int(-2));
        assert_eq!(run(AggKind::Sum, &[Value::Null]), Value::Null);
        assert_eq!(run(AggKind::Avg, &[]), Value::Null);
        assert_eq!(run(AggKind::Min, &[]), Value::Null);
    }

    #[test]
    fn integer_sum_overflows_into_a_float_not_a_panic() {
        let sum = run(AggKind::Sum, &[Value::Int(i64::MAX), Value::Int(i64::MAX)]);
        assert_eq!(sum, Value::Float(i64::MAX as f64 * 2.0));
    }

    #[test]
    fn stddev_is_the_population_standard_deviation() {
        let values: Vec<Value> = [2, 4, 4, 4, 5, 5, 7, 9].iter().map(|i| Value::Int(*i)).collect();
        assert_eq!(run(AggKind::Stddev, &values), Value::Float(2.0));
    }

    #[test]
    fn collect_keeps_at_most_its_cap_in_arrival_order() {
        let values: Vec<Value> = (0..10).map(Value::Int).collect();
        assert_eq!(
            run(AggKind::Collect(3), &values),
            Value::Array(vec![Value::Int(0), Value::Int(1), Value::Int(2)])
        );
        let mut state = AggKind::Collect(3).new_state();
        for v in &values {
            state.add(&AggKind::Collect(3), v);
        }
        assert!(matches!(state, AggState::Collect { dropped: 7, .. }));
    }

    #[test]
    fn percentile_is_within_its_relative_accuracy_and_bounded() {
        // Values spread over 6 orders of magnitude, both signs.
        let mut exact: Vec<f64> = (0..20_000).map(|i| (i as f64 - 5_000.0) * 13.37).collect();
        let mut sketch = Sketch::default();
        for x in &exact {
            sketch.add(*x);
        }
        exact.sort_by(f64::total_cmp);
        for p in [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0] {
            let want = exact[(p * (exact.len() - 1) as f64).floor() as usize];
            let got = sketch.quantile(p).unwrap();
            assert!(
                (got - want).abs() <= SKETCH_RELATIVE_ACCURACY * want.abs() + 1e-9,
                "p={p}: got {got}, want {want}"
            );
        }
        assert!(sketch.positive.len() <= SKETCH_MAX_BUCKETS);
        // A range far wider than the buckets cover stays bounded.
        let mut wide = Sketch::default();
        for i in 0..5_000 {
            wide.add(1.001f64.powi(i * 10));
        }
        assert!(wide.positive.len() <= SKETCH_MAX_BUCKETS);
        assert_eq!(wide.quantile(1.0), Some(1.001f64.powi(49_990)));
    }
}
