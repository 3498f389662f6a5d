//! `/status`: one JSON object an operator (or `outpost status`) reads — version, uptime, the
//! upstream's state and since when, the backlog, rates over the last minute and the last
//! error seen per stage.
//!
//! The counters only say how many; the "since when" and "per second" come from a sampler
//! task that copies the counters every [`SAMPLE_EVERY`] into a ring of [`RING`] samples. So
//! the upstream's `since_ms` and a stage's last error time are accurate to one sample, and
//! rates cover the last minute (or the uptime, if shorter).
//!
//! A stage's "last error" is the error counter of that stage that most recently went up (its
//! name, when, its total): the text of each error is in the log, rate-limited.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::buffer::inspect::StatsReport;
use crate::event::now_ms;
use crate::metrics::Metrics;

/// How often the sampler copies the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept: one minute and the one before it.
const RING: usize = 61;

/// Error counters by stage (`metrics::Counters` field names).
const STAGE_ERRORS: &[(&str, &[&str])] = &[
    (
        "ingest",
        &[
            "protocol_errors",
            "oversize_disconnects",
            "keepalive_timeouts",
            "sensor_refused",
            "topics_refused_control",
            "topics_refused_noncharacter",
            "topics_refused_levels",
            "topics_refused_length",
            "retained_refused",
            "retained_unsaved",
        ],
    ),
    (
        "rules",
        &[
            "dead_letters",
            "dead_letters_unsaved",
            "republish_failed",
            "loops_prevented",
            "rules_reload_failures",
        ],
    ),
    (
        "buffer",
        &[
            "commit_failures",
            "rejected_full",
            "buffer_full_letters_failed",
            "dropped_overflow",
            "expired",
            "buffer_corrupt",
        ],
    ),
    ("upstream", &["upstream_failures", "upstream_rejected", "upstream_poison"]),
    ("local", &["local_dropped", "shared_dropped", "sessions_evicted", "sessions_unsaved"]),
];

fn is_error(counter: &str) -> bool {
    STAGE_ERRORS.iter().any(|(_, names)| names.contains(&counter))
}

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    at_ms: u64,
    counters: Vec<(&'static str, u64)>,
    upstream_connected: bool,
}

impl Sample {
    fn get(&self, name: &str) -> u64 {
        self.counters.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v)
    }
}

/// When an error counter last went up.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at_ms: u64,
    total: u64,
}

/// The sampler's memory: the ring, when the upstream last changed state, when each error
/// counter last went up.
#[derive(Debug, Default)]
struct History {
    ring: VecDeque<Sample>,
    upstream_since_ms: Option<u64>,
    errors: Vec<(&'static str, Seen)>,
}

impl History {
    fn push(&mut self, sample: Sample) {
        match self.ring.back() {
            None => {
                self.upstream_since_ms = Some(sample.at_ms);
                // Errors counted before the first sample (a corrupt file moved aside at start).
                for (name, v) in sample.counters.iter().filter(|(n, _)| is_error(n)) {
                    if *v > 0 {
                        self.errors.push((name, Seen { at_ms: sample.at_ms, total: *v }));
                    }
                }
            }
            Some(previous) => {
                if previous.upstream_connected != sample.upstream_connected {
                    self.upstream_since_ms = Some(sample.at_ms);
                }
                for (name, v) in sample.counters.iter().filter(|(n, _)| is_error(n)) {
                    if *v > previous.get(name) {
                        self.errors.retain(|(n, _)| n != name);
                        self.errors.push((name, Seen { at_ms: sample.at_ms, total: *v }));
                    }
                }
            }
        }
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back(sample);
    }

    /// Per-second rates between the oldest and newest samples.
    fn rates(&self) -> Rates {
        let (Some(first), Some(last)) = (self.ring.front(), self.ring.back()) else {
            return Rates::default();
        };
        let window = last.at.duration_since(first.at).as_secs_f64();
        let rate = |name: &str| {
            if window <= 0.0 { 0.0 } else { (last.get(name).saturating_sub(first.get(name))) as f64 / window }
        };
        Rates {
            window_s: window,
            ingested: rate("ingested"),
            forwarded: rate("upstream_sent"),
            acked: rate("upstream_acked"),
            committed: rate("committed"),
        }
    }

    fn last_errors(&self) -> Vec<StageError> {
        STAGE_ERRORS
            .iter()
            .filter_map(|(stage, names)| {
                let (kind, seen) = self
                    .errors
                    .iter()
                    .filter(|(n, _)| names.contains(n))
                    .max_by_key(|(_, seen)| seen.at_ms)?;
                Some(StageError { stage, kind, at_ms: seen.at_ms, total: seen.total })
            })
            .collect()
    }
}

/// Counter samples shared by the sampler task and the `/status` handler (same runtime
/// thread; the lock is held for a copy, never across an `.await`).
#[derive(Debug, Default)]
pub struct Sampler {
    history: Mutex<History>,
}

impl Sampler {
    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn sample(&self, metrics: &Metrics) {
        let sample = Sample {
            at: Instant::now(),
            at_ms: now_ms(),
            counters: metrics.counters().snapshot(),
            upstream_connected: Metrics::get(&metrics.gauges().upstream_connected) == 1,
        };
        self.lock().push(sample);
    }

    /// Samples every [`SAMPLE_EVERY`] until cancelled.
    pub async fn run(&self, metrics: Metrics, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(SAMPLE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = ticker.tick() => self.sample(&metrics),
            }
        }
    }
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Rates {
    /// Seconds the rates cover (60, or the uptime while it is shorter).
    pub window_s: f64,
    /// Publishes read from sensors per second.
    pub ingested: f64,
    /// Publishes written upstream per second (resends included).
    pub forwarded: f64,
    /// Upstream acknowledgements per second.
    pub acked: f64,
    /// Events written to the buffer file per second.
    pub committed: f64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct StageError {
    pub stage: &'static str,
    /// The counter that went up (its metric is in the README's table).
    pub kind: &'static str,
    /// When it was last seen going up (Unix ms, to within one sample).
    pub at_ms: u64,
    pub total: u64,
}

#[derive(Debug, Serialize)]
pub struct Upstream {
    /// `mqtt://host:port`: the endpoint the link is on, else the preferred one; `null` without
    /// an upstream.
    pub endpoint: Option<String>,
    /// Every configured endpoint, preferred first (issue #12).
    pub endpoints: Vec<EndpointStatus>,
    pub connected: bool,
    /// Since when it has been in this state (Unix ms, to within one sample).
    pub since_ms: Option<u64>,
    pub connects: u64,
    pub failures: u64,
    /// The upstream's last error (kind, when, total), if any.
    pub last_error: Option<StageError>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct EndpointStatus {
    pub url: String,
    /// The link is on this endpoint now.
    pub connected: bool,
    pub connects: u64,
    /// Failed attempts (failback probes included) and lost connections.
    pub failures: u64,
}

#[derive(Debug, Serialize)]
pub struct Backlog {
    /// Events the relay holds (memory and disk).
    pub events: u64,
    /// The buffer file, when the store answered: committed events and bytes, file size, the
    /// oldest event's age, per priority.
    pub committed: Option<StatsReport>,
    pub oldest_age_s: Option<f64>,
    pub capacity_events: u64,
    pub capacity_bytes: u64,
    /// Why `committed` is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_s: f64,
    pub ready: bool,
    pub upstream: Upstream,
    pub backlog: Backlog,
    pub rates: Rates,
    pub last_errors: Vec<StageError>,
}

/// What `/status` needs besides the sampler.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub metrics: &'a Metrics,
    pub started: Instant,
    pub ready: bool,
    pub endpoint: Option<String>,
    pub store: Result<StatsReport, String>,
    pub capacity: (u64, u64),
}

fn endpoints(metrics: &Metrics, connected: bool) -> Vec<EndpointStatus> {
    let current = metrics.endpoints().current().map(|c| c.url.as_str());
    metrics
        .endpoints()
        .list()
        .iter()
        .map(|ep| EndpointStatus {
            url: ep.url.clone(),
            connected: connected && current == Some(ep.url.as_str()),
            connects: Metrics::get(&ep.connects),
            failures: Metrics::get(&ep.failures),
        })
        .collect()
}

impl Sampler {
    pub fn status(&self, inputs: Inputs<'_>) -> Status {
        let connected = Metrics::get(&inputs.metrics.gauges().upstream_connected) == 1;
        // `connected` is read live but `since_ms` and the last errors come from samples: when
        // the state changed since the last one, sample now, so the answer does not pair the
        // new state with the old state's "since". Only then: a sample per request would shrink
        // the rates' one-minute window.
        let stale = self.lock().ring.back().is_some_and(|s| s.upstream_connected != connected);
        if stale {
            self.sample(inputs.metrics);
        }
        let history = self.lock();
        let counters = inputs.metrics.counters();
        let last_errors = history.last_errors();
        let upstream_error = last_errors.iter().find(|e| e.stage == "upstream").copied();
        let (committed, store_error) = match inputs.store {
            Ok(stats) => (Some(stats), None),
            Err(e) => (None, Some(e)),
        };
        let oldest_age_s = committed
            .as_ref()
            .and_then(|s| s.priorities.iter().filter_map(|p| p.oldest_age_s).reduce(f64::max));
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: inputs.started.elapsed().as_secs_f64(),
            ready: inputs.ready,
            upstream: Upstream {
                endpoint: (inputs.metrics.endpoints().current().filter(|_| connected).map(|c| c.url.clone()))
                    .or(inputs.endpoint),
                endpoints: endpoints(inputs.metrics, connected),
                connected,
                since_ms: history.upstream_since_ms,
                connects: Metrics::get(&counters.upstream_connects),
                failures: Metrics::get(&counters.upstream_failures),
                last_error: upstream_error,
            },
            backlog: Backlog {
                events: Metrics::get(&inputs.metrics.gauges().buffered_events),
                committed,
                oldest_age_s,
                capacity_events: inputs.capacity.0,
                capacity_bytes: inputs.capacity.1,
                store_error,
            },
            rates: history.rates(),
            last_errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, at_ms: u64, counters: &[(&'static str, u64)], connected: bool) -> Sample {
        Sample { at, at_ms, counters: counters.to_vec(), upstream_connected: connected }
    }

    #[test]
    fn rates_cover_the_ring_and_the_ring_keeps_a_minute() {
        let mut h = History::default();
        let t0 = Instant::now();
        for s in 0..=120u64 {
            let at = t0 + Duration::from_secs(s);
            h.push(sample(
                at,
                s * 1000,
                &[("ingested", s * 100), ("upstream_sent", s * 50), ("upstream_acked", s * 50)],
                true,
            ));
        }
        assert_eq!(h.ring.len(), RING);
        let rates = h.rates();
        assert_eq!(rates.window_s, 60.0);
        assert_eq!((rates.ingested, rates.forwarded, rates.acked), (100.0, 50.0, 50.0));
        assert_eq!(History::default().rates(), Rates::default());
    }

    #[test]
    fn upstream_since_follows_changes_and_last_errors_are_per_stage() {
        let mut h = History::default();
        let t0 = Instant::now();
        h.push(sample(
            t0,
            1_000,
            &[("buffer_corrupt", 1), ("upstream_failures", 0), ("protocol_errors", 0)],
            true,
        ));
        assert_eq!(h.upstream_since_ms, Some(1_000));
        h.push(sample(
            t0,
            2_000,
            &[("buffer_corrupt", 1), ("upstream_failures", 0), ("protocol_errors", 2)],
            true,
        ));
        h.push(sample(
            t0,
            3_000,
            &[("buffer_corrupt", 1), ("upstream_failures", 4), ("protocol_errors", 2)],
            false,
        ));
        h.push(sample(
            t0,
            4_000,
            &[("buffer_corrupt", 1), ("upstream_failures", 9), ("protocol_errors", 2)],
            false,
        ));
        assert_eq!(h.upstream_since_ms, Some(3_000));
        let errors = h.last_errors();
        let find = |stage| errors.iter().find(|e| e.stage == stage).copied();
        assert_eq!(
            find("ingest"),
            Some(StageError { stage: "ingest", kind: "protocol_errors", at_ms: 2_000, total: 2 })
        );
        assert_eq!(
            find("upstream"),
            Some(StageError { stage: "upstream", kind: "upstream_failures", at_ms: 4_000, total: 9 })
        );
        assert_eq!(
            find("buffer"),
            Some(StageError { stage: "buffer", kind: "buffer_corrupt", at_ms: 1_000, total: 1 })
        );
        assert_eq!(find("rules"), None);
    }

    #[test]
    fn an_answer_never_pairs_the_new_upstream_state_with_the_old_since() {
        let metrics = Metrics::default();
        let sampler = Sampler::default();
        metrics.set_upstream_connected(true);
        sampler.sample(&metrics);
        let inputs = |metrics| Inputs {
            metrics,
            started: Instant::now(),
            ready: true,
            endpoint: None,
            store: Err("not asked".to_owned()),
            capacity: (0, 0),
        };
        let up = sampler.status(inputs(&metrics)).upstream;
        assert!(up.connected);
        let up_since = up.since_ms.expect("since");
        // Lost between two samples: the next answer already reports it, with its own "since".
        std::thread::sleep(Duration::from_millis(2));
        metrics.set_upstream_connected(false);
        Metrics::add(&metrics.counters().upstream_failures, 1);
        let down = sampler.status(inputs(&metrics)).upstream;
        assert!(!down.connected);
        assert!(down.since_ms.expect("since") > up_since, "{down:?}");
        assert_eq!(down.last_error.map(|e| e.kind), Some("upstream_failures"));
        // Unchanged state: no extra sample (the rates' window is not shortened by requests).
        let samples = sampler.lock().ring.len();
        sampler.status(inputs(&metrics));
        assert_eq!(sampler.lock().ring.len(), samples);
    }

    #[test]
    fn every_stage_error_names_a_counter() {
        let metrics = Metrics::default();
        let fields: Vec<&str> = metrics.counters().snapshot().into_iter().map(|(n, _)| n).collect();
        for (_, names) in STAGE_ERRORS {
            for name in *names {
                assert!(fields.contains(name), "{name} is not a counter in metrics.rs");
            }
        }
    }
}
