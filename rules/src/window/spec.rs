//! The window functions a rule names in `GROUP BY`, in eKuiper's syntax:
//! `TUMBLINGWINDOW(ss, 10)`, `HOPPINGWINDOW(ss, 10, 5)`, `SLIDINGWINDOW(ss, 10)`,
//! `SESSIONWINDOW(mi, 2, 1)` (maximum duration 2, timeout 1, as eKuiper orders them),
//! `COUNTWINDOW(5)` and `COUNTWINDOW(5, 2)`; units `ms`, `ss`, `mi`, `hh`, `dd`.
//!
//! **Invariant:** a [`WindowSpec`] is valid once built ([`WindowSpec::parse`] is the only
//! way): sizes are positive, a hop divides nothing it must not, and the number of window
//! instances an event can belong to is bounded ([`MAX_OVERLAP`]).

use serde::{Deserialize, Serialize};

/// The most hopping windows one event may belong to (`size / hop`): each is a state per group.
pub const MAX_OVERLAP: u64 = 64;
/// The most events a sliding or overlapping count window keeps per group.
pub const MAX_RETAINED: usize = 10_000;
/// The longest window: 31 days.
pub const MAX_WINDOW_MS: u64 = 31 * 86_400_000;

/// A window, its sizes in milliseconds (or events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowSpec {
    /// `[k·size, (k+1)·size)`, aligned to the Unix epoch (UTC): a 10 s window ends at :10, :20 …
    Tumbling { size_ms: u64 },
    /// Windows of `size_ms` starting every `hop_ms`, aligned to the epoch.
    Hopping { size_ms: u64, hop_ms: u64 },
    /// On every event, the window `(t − size_ms, t]` ending at it.
    Sliding { size_ms: u64 },
    /// Opens on an event; closes `timeout_ms` after the last event, or at the first multiple
    /// of `max_ms` (epoch-aligned) after it opened, whichever comes first.
    Session { max_ms: u64, timeout_ms: u64 },
    /// Every `step` events, the last `size` events (`step == size`: disjoint windows).
    Count { size: u64, step: u64 },
}

/// The window function names, for parsing and did-you-mean.
pub const WINDOW_NAMES: &[&str] =
    &["tumblingwindow", "hoppingwindow", "slidingwindow", "sessionwindow", "countwindow"];

/// Milliseconds in one of eKuiper's time units.
pub fn unit_ms(unit: &str) -> Option<u64> {
    match unit.to_ascii_lowercase().as_str() {
        "ms" => Some(1),
        "ss" => Some(1_000),
        "mi" => Some(60_000),
        "hh" => Some(3_600_000),
        "dd" => Some(86_400_000),
        _ => None,
    }
}

impl WindowSpec {
    /// Builds a window from its function name (any case) and arguments as written: the unit
    /// first for time windows, then integers. Errors say what to write instead.
    pub fn parse(name: &str, args: &[&str]) -> Result<WindowSpec, String> {
        let lower = name.to_ascii_lowercase();
        let ints = |from: usize, want: &str| -> Result<Vec<u64>, String> {
            args[from..]
                .iter()
                .map(|a| match a.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{name}: `{a}` is not a positive integer; write {want}")),
                })
                .collect()
        };
        if lower == "countwindow" {
            let usage = "COUNTWINDOW(size) or COUNTWINDOW(size, step)";
            let n = ints(0, usage)?;
            let (size, step) = match n.as_slice() {
                [size] => (*size, *size),
                [size, step] => (*size, *step),
                _ => return Err(format!("expected {usage}")),
            };
            if step > size {
                return Err(format!("COUNTWINDOW({size}, {step}): the step must not exceed the size"));
            }
            if size > MAX_RETAINED as u64 && step != size {
                return Err(format!(
                    "COUNTWINDOW({size}, {step}): an overlapping count window keeps its events; at most {MAX_RETAINED}"
                ));
            }
            return Ok(WindowSpec::Count { size, step });
        }
        let usage = match lower.as_str() {
            "tumblingwindow" => "TUMBLINGWINDOW(unit, size), e.g. TUMBLINGWINDOW(ss, 10)",
            "hoppingwindow" => "HOPPINGWINDOW(unit, size, hop), e.g. HOPPINGWINDOW(ss, 10, 5)",
            "slidingwindow" => "SLIDINGWINDOW(unit, size), e.g. SLIDINGWINDOW(ss, 10)",
            "sessionwindow" => "SESSIONWINDOW(unit, max_duration, timeout), e.g. SESSIONWINDOW(mi, 2, 1)",
            _ => return Err(format!("`{name}` is not a window function")),
        };
        let Some((unit, _)) = args.split_first() else { return Err(format!("expected {usage}")) };
        let Some(unit_ms) = unit_ms(unit.trim()) else {
            return Err(format!("{name}: `{unit}` is not a time unit; use ms, ss, mi, hh or dd ({usage})"));
        };
        let n = ints(1, usage)?;
        let ms = |v: u64| -> Result<u64, String> {
            v.checked_mul(unit_ms)
                .filter(|ms| *ms <= MAX_WINDOW_MS)
                .ok_or_else(|| format!("{name}: {v} {unit} is longer than the 31 days a window may span"))
        };
        let spec = match (lower.as_str(), n.as_slice()) {
            ("tumblingwindow", [size]) => WindowSpec::Tumbling { size_ms: ms(*size)? },
            ("hoppingwindow", [size, hop]) => {
                let (size_ms, hop_ms) = (ms(*size)?, ms(*hop)?);
                if hop_ms > size_ms {
                    return Err(format!("{name}: the hop ({hop}) must not exceed the size ({size})"));
                }
                if size_ms.div_ceil(hop_ms) > MAX_OVERLAP {
                    return Err(format!(
                        "{name}: size / hop = {} windows per event; at most {MAX_OVERLAP}",
                        size_ms.div_ceil(hop_ms)
                    ));
                }
                WindowSpec::Hopping { size_ms, hop_ms }
            }
            ("slidingwindow", [size]) => WindowSpec::Sliding { size_ms: ms(*size)? },
            ("slidingwindow", [_, _]) => {
                return Err(format!(
                    "{name}: the delayed sliding window (a third argument) is not supported"
                ));
            }
            ("sessionwindow", [max, timeout]) => {
                let (max_ms, timeout_ms) = (ms(*max)?, ms(*timeout)?);
                if timeout_ms > max_ms {
                    return Err(format!(
                        "{name}: the timeout ({timeout}) must not exceed the maximum duration ({max}); eKuiper's order is (unit, max_duration, timeout)"
                    ));
                }
                WindowSpec::Session { max_ms, timeout_ms }
            }
            _ => return Err(format!("expected {usage}")),
        };
        Ok(spec)
    }

    /// Whether each event is in exactly one emitted window (no overlap, nothing kept twice).
    pub fn is_partition(&self) -> bool {
        match self {
            WindowSpec::Tumbling { .. } | WindowSpec::Session { .. } => true,
            WindowSpec::Count { size, step } => size == step,
            WindowSpec::Hopping { size_ms, hop_ms } => size_ms == hop_ms,
            WindowSpec::Sliding { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ekuiper_syntax_in_any_case() {
        assert_eq!(
            WindowSpec::parse("TUMBLINGWINDOW", &["ss", "10"]),
            Ok(WindowSpec::Tumbling { size_ms: 10_000 })
        );
        assert_eq!(
            WindowSpec::parse("HoppingWindow", &["mi", "10", "5"]),
            Ok(WindowSpec::Hopping { size_ms: 600_000, hop_ms: 300_000 })
        );
        assert_eq!(
            WindowSpec::parse("slidingwindow", &["MS", "250"]),
            Ok(WindowSpec::Sliding { size_ms: 250 })
        );
        assert_eq!(
            WindowSpec::parse("SESSIONWINDOW", &["mi", "2", "1"]),
            Ok(WindowSpec::Session { max_ms: 120_000, timeout_ms: 60_000 })
        );
        assert_eq!(WindowSpec::parse("COUNTWINDOW", &["5"]), Ok(WindowSpec::Count { size: 5, step: 5 }));
        assert_eq!(WindowSpec::parse("COUNTWINDOW", &["5", "2"]), Ok(WindowSpec::Count { size: 5, step: 2 }));
        assert_eq!(
            WindowSpec::parse("TUMBLINGWINDOW", &["dd", "1"]),
            Ok(WindowSpec::Tumbling { size_ms: 86_400_000 })
        );
    }

    #[test]
    fn bad_windows_say_what_to_write() {
        let err = |name: &str, args: &[&str]| WindowSpec::parse(name, args).unwrap_err();
        assert!(err("TUMBLINGWINDOW", &["sec", "10"]).contains("use ms, ss, mi, hh or dd"));
        assert!(err("TUMBLINGWINDOW", &["ss", "0"]).contains("not a positive integer"));
        assert!(err("TUMBLINGWINDOW", &["ss"]).contains("TUMBLINGWINDOW(unit, size)"));
        assert!(err("HOPPINGWINDOW", &["ss", "5", "10"]).contains("must not exceed"));
        assert!(err("HOPPINGWINDOW", &["ms", "1000", "1"]).contains("at most 64"));
        assert!(err("COUNTWINDOW", &["2", "5"]).contains("step must not exceed"));
        assert!(err("SESSIONWINDOW", &["mi", "1", "2"]).contains("(unit, max_duration, timeout)"));
        assert!(err("TUMBLINGWINDOW", &["dd", "32"]).contains("31 days"));
        assert!(err("SLIDINGWINDOW", &["ss", "5", "5"]).contains("delayed"));
    }
}
