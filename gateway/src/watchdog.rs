//! The systemd watchdog, fed only while the pipeline makes progress, and the `STATUS=` line.
//!
//! A ping from a timer proves only that the timer runs. Here every stage reports a heartbeat
//! from its own loop — the broker's accept loop and hand-over, the route stage, the relay task,
//! the store thread — and the supervisor ([`run`]) sends `WATCHDOG=1` only while no stage is
//! stuck. A stage is *stuck* when it holds work (it began a turn and has not ended it) and has
//! not come round for [`Supervisor`]'s limit (half the watchdog interval), or when its task or
//! thread ended before shutdown. Then the pings stop, the log says which stage and what to
//! check (once), and systemd restarts the gateway after `WatchdogSec=`; the buffer file is the
//! source of truth, so the restart resends what was committed and sensors resend the rest.
//!
//! # Invariants
//! - A stage that waits for input, or for the stage below it (a full channel, the store
//!   thread's reply), has ended its turn: it is idle, not stuck. So a slow disk shows as the
//!   store thread stuck, never as the relay or the route stage waiting on it.
//! - The hot path costs one `fetch_add` (release ordering) per turn boundary on an `Arc`'d
//!   atomic: no lock, no allocation, no clock read. The supervisor remembers when it last saw
//!   each stage's counts move; the stages keep no time.
//! - The pinger runs on the gateway's runtime: a runtime that stops turning (a blocking call,
//!   a busy loop) stops the pings by itself.
//! - `OUTPOST_FAULT_WEDGE=<stage>[@<n>]` (fault injection for tests, logged loudly) makes that
//!   stage stop turning at its n-th turn (1 by default) while holding work, as a hung disk or a
//!   dead task would.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;

/// The parts of the pipeline that report a heartbeat, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The broker's accept loops and the hand-over of publishes to the route stage.
    Broker,
    Route,
    Relay,
    /// The store thread (redb).
    Store,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Broker, Stage::Route, Stage::Relay, Stage::Store];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Broker => "broker",
            Stage::Route => "route",
            Stage::Relay => "relay",
            Stage::Store => "store",
        }
    }

    /// What an operator should look at when this stage is stuck.
    fn hint(self) -> &'static str {
        match self {
            Stage::Broker => "the broker stopped accepting or handing over publishes",
            Stage::Route => {
                "the route stage stopped taking events (a rule or a republish that never finishes)"
            }
            Stage::Relay => {
                "the relay task stopped turning (a bug); its events are on disk or unacknowledged to sensors, which resend them"
            }
            Stage::Store => {
                "the store thread is inside one buffer operation for too long: the disk may be hung or failing (check dmesg and outpost_buffer_commit_duration_seconds)"
            }
        }
    }
}

#[derive(Debug, Default)]
struct Beat {
    /// Turns begun and ended; the stage holds work while they differ.
    begun: AtomicU64,
    ended: AtomicU64,
    /// Live [`Heartbeat`] handles: none left before shutdown means the stage is gone.
    holders: AtomicUsize,
    /// A handle was ever issued (a stage that was never started is not watched for ending).
    issued: AtomicBool,
}

/// A stage's end of its heartbeat. Cloning makes another holder (the broker's accept loops and
/// its intake share one); the stage counts as ended when the last clone is dropped.
#[derive(Debug)]
pub struct Heartbeat {
    beat: Arc<Beat>,
    /// The turn at which the fault injection wedges this stage.
    wedge_at: Option<u64>,
}

impl Clone for Heartbeat {
    fn clone(&self) -> Heartbeat {
        self.beat.holders.fetch_add(1, Ordering::Relaxed);
        Heartbeat { beat: Arc::clone(&self.beat), wedge_at: self.wedge_at }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.beat.holders.fetch_sub(1, Ordering::Release);
    }
}

impl Heartbeat {
    /// A heartbeat nobody watches (tests, benches, tools that run one stage).
    pub fn unwatched() -> Heartbeat {
        Heartbeat { beat: Arc::new(Beat { holders: AtomicUsize::new(1), ..Beat::default() }), wedge_at: None }
    }

    /// The stage took work in hand.
    pub fn begin(&self) {
        self.beat.begun.fetch_add(1, Ordering::Release);
    }

    /// The stage finished what it held and is about to wait (for input, or for a stage below).
    pub fn end(&self) {
        self.beat.ended.fetch_add(1, Ordering::Release);
    }

    /// Fault injection: whether this stage must stop turning now (see the module docs). Read
    /// right after [`Heartbeat::begin`].
    pub fn wedged(&self) -> bool {
        self.wedge_at.is_some_and(|at| self.beat.begun.load(Ordering::Relaxed) >= at)
    }

    /// Fault injection for an async stage: never returns once [`Heartbeat::wedged`].
    pub async fn wedge_if_asked(&self) {
        if self.wedged() {
            std::future::pending::<()>().await;
        }
    }
}

/// The stages' heartbeats, made once at start-up; [`Watchdog::heartbeat`] hands each stage
/// its end and [`run`] watches them.
#[derive(Debug)]
pub struct Watchdog {
    beats: Vec<(Stage, Arc<Beat>)>,
    wedge: Option<(Stage, u64)>,
}

/// The fault injection variable (see the module docs).
pub const WEDGE_ENV: &str = "OUTPOST_FAULT_WEDGE";

impl Default for Watchdog {
    fn default() -> Watchdog {
        Watchdog::new(fault_wedge())
    }
}

impl Watchdog {
    fn new(wedge: Option<(Stage, u64)>) -> Watchdog {
        Watchdog { beats: Stage::ALL.iter().map(|s| (*s, Arc::new(Beat::default()))).collect(), wedge }
    }

    /// The heartbeat handle for `stage` (one holder; clone it for more).
    pub fn heartbeat(&self, stage: Stage) -> Heartbeat {
        let beat = self.beat(stage);
        beat.holders.fetch_add(1, Ordering::Relaxed);
        beat.issued.store(true, Ordering::Release);
        Heartbeat { beat, wedge_at: self.wedge.filter(|(s, _)| *s == stage).map(|(_, at)| at) }
    }

    fn beat(&self, stage: Stage) -> Arc<Beat> {
        let found = self.beats.iter().find(|(s, _)| *s == stage).map(|(_, b)| Arc::clone(b));
        // Every stage has a beat from `new`.
        found.unwrap_or_default()
    }
}

/// `OUTPOST_FAULT_WEDGE=<stage>[@<n>]`; anything else is ignored (and said so).
fn fault_wedge() -> Option<(Stage, u64)> {
    let value = std::env::var(WEDGE_ENV).ok()?;
    let parsed = parse_wedge(&value);
    match parsed {
        Some((stage, at)) => warn!(
            message = "fault injection: a pipeline stage will stop turning (OUTPOST_FAULT_WEDGE); unset it outside tests",
            stage = stage.name(),
            at_turn = at
        ),
        None => warn!(
            message = "OUTPOST_FAULT_WEDGE ignored: expected broker, route, relay or store, optionally followed by @<turn>",
            value = %value
        ),
    }
    parsed
}

fn parse_wedge(value: &str) -> Option<(Stage, u64)> {
    let (name, at) = match value.split_once('@') {
        Some((name, at)) => (name, at.parse().ok().filter(|n| *n > 0)?),
        None => (value, 1),
    };
    let stage = Stage::ALL.into_iter().find(|s| s.name() == name.trim())?;
    Some((stage, at))
}

/// Why a stage is stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stuck {
    /// It held work and did not come round for this long.
    NoTurn(Duration),
    /// Its task or thread ended while the gateway runs.
    Ended,
}

/// What the supervisor remembers per stage.
#[derive(Debug)]
struct Watched {
    stage: Stage,
    beat: Arc<Beat>,
    /// The counts (`begun`, `ended`) last seen, and when they were first seen: a turn that
    /// began after a long idle time is timed from when the supervisor saw it begin.
    last: (u64, u64),
    since: Instant,
    /// Reported stuck, until it turns again.
    reported: bool,
}

/// The watchdog's verdicts, with the clock passed in (`check`), apart from any I/O.
#[derive(Debug)]
pub struct Supervisor {
    watched: Vec<Watched>,
    limit: Duration,
}

/// A change the supervisor reports, to log once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Stuck(Stage, Stuck),
    Recovered(Stage),
}

impl Supervisor {
    /// Watches every stage of `watchdog`; a stage holding work for `limit` without ending a
    /// turn is stuck.
    pub fn new(watchdog: &Watchdog, limit: Duration, now: Instant) -> Supervisor {
        let watched = watchdog
            .beats
            .iter()
            .map(|(stage, beat)| Watched {
                stage: *stage,
                beat: Arc::clone(beat),
                last: (beat.begun.load(Ordering::Acquire), beat.ended.load(Ordering::Acquire)),
                since: now,
                reported: false,
            })
            .collect();
        Supervisor { watched, limit }
    }

    /// Looks at every stage. Returns whether all are healthy, and what changed since the last
    /// look (each stuck stage is reported once, until it turns again).
    pub fn check(&mut self, now: Instant, changes: &mut Vec<Change>) -> bool {
        let mut healthy = true;
        for w in &mut self.watched {
            // `ended` before `begun`: a turn that ends in between cannot look like one held.
            let ended = w.beat.ended.load(Ordering::Acquire);
            let begun = w.beat.begun.load(Ordering::Acquire);
            let gone = w.beat.issued.load(Ordering::Acquire) && w.beat.holders.load(Ordering::Acquire) == 0;
            if (begun, ended) != w.last {
                w.last = (begun, ended);
                w.since = now;
            }
            let held = now.duration_since(w.since);
            let verdict = if gone {
                Some(Stuck::Ended)
            } else if begun != ended && held >= self.limit {
                Some(Stuck::NoTurn(held))
            } else {
                None
            };
            match verdict {
                Some(stuck) => {
                    healthy = false;
                    if !w.reported {
                        w.reported = true;
                        changes.push(Change::Stuck(w.stage, stuck));
                    }
                }
                None if w.reported => {
                    w.reported = false;
                    changes.push(Change::Recovered(w.stage));
                }
                None => {}
            }
        }
        healthy
    }
}

/// What the `STATUS=` line says: the upstream's state and the backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusLine {
    pub upstream: Option<bool>,
    pub backlog: u64,
}

impl StatusLine {
    fn read(metrics: &Metrics, has_upstream: bool) -> StatusLine {
        let gauges = metrics.gauges();
        StatusLine {
            upstream: has_upstream.then(|| Metrics::get(&gauges.upstream_connected) == 1),
            backlog: Metrics::get(&gauges.buffered_events),
        }
    }

    fn text(&self, endpoint: &str, since: &str) -> String {
        let upstream = match self.upstream {
            None => "no upstream configured".to_owned(),
            Some(true) => format!("upstream {endpoint} connected since {since}"),
            Some(false) => format!("upstream {endpoint} unreachable since {since}"),
        };
        format!("{upstream}; {} events buffered", self.backlog)
    }
}

/// `STATUS=` is sent when its text changed, at most this often: the backlog moves with every
/// event, and `systemctl status` needs no more than a glance's worth.
pub const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(2);

/// What [`run`] needs besides the heartbeats.
#[derive(Debug)]
pub struct Settings {
    /// `WATCHDOG_USEC`, if systemd asked for pings.
    pub interval: Option<Duration>,
    /// The upstream URL for `STATUS=`, if one is configured.
    pub upstream: Option<String>,
}

impl Settings {
    /// From the environment systemd sets (`WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env(upstream: Option<String>) -> Settings {
        Settings { interval: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()), upstream }
    }
}

/// Whether there is a service manager to notify (`NOTIFY_SOCKET`).
pub fn notify_socket_set() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The supervisor: every tick, checks the heartbeats and pings systemd if all stages are
/// healthy, and sends `STATUS=` when it changed. Stops on `cancel` (shutdown: systemd hears
/// STOPPING from the binary).
pub async fn run(watchdog: Arc<Watchdog>, settings: Settings, metrics: Metrics, cancel: CancellationToken) {
    // Pings at a quarter of the interval leave three chances before systemd's deadline; the
    // tick is at most a second so `STATUS=` follows the upstream promptly.
    let tick = settings.interval.map_or(Duration::from_secs(1), |i| (i / 4).min(Duration::from_secs(1)));
    let limit = settings.interval.map_or(Duration::MAX, |i| i / 2);
    let mut supervisor = Supervisor::new(&watchdog, limit, Instant::now());
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let endpoint = settings.upstream.clone().unwrap_or_default();
    let mut status: Option<(StatusLine, String)> = None;
    let mut status_sent: Option<Instant> = None;
    let mut changes = Vec::new();
    if let Some(interval) = settings.interval {
        info!(message = "systemd watchdog on: pings only while every pipeline stage makes progress", interval = ?interval, stuck_after = ?limit);
    }
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let healthy = supervisor.check(now, &mut changes);
        for change in changes.drain(..) {
            log_change(change, settings.interval);
        }
        if healthy && settings.interval.is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
        let line = StatusLine::read(&metrics, settings.upstream.is_some());
        let changed = status.as_ref().is_none_or(|(last, _)| *last != line);
        if changed && status_sent.is_none_or(|t| now.duration_since(t) >= STATUS_MIN_INTERVAL) {
            let since = match &status {
                Some((last, since)) if last.upstream == line.upstream => since.clone(),
                _ => humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            };
            let text = line.text(&endpoint, &since);
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
            status = Some((line, since));
            status_sent = Some(now);
        }
    }
}

fn log_change(change: Change, interval: Option<Duration>) {
    match change {
        Change::Stuck(stage, Stuck::NoTurn(held)) => error!(
            message = "watchdog: a pipeline stage holds work and stopped turning; pings to systemd stopped, so systemd restarts the gateway from its buffer",
            stage = stage.name(),
            stuck_for = ?held,
            restart_within = ?interval.unwrap_or_default(),
            hint = stage.hint()
        ),
        Change::Stuck(stage, Stuck::Ended) => error!(
            message = "watchdog: a pipeline stage ended while the gateway runs; pings to systemd stopped, so systemd restarts the gateway from its buffer",
            stage = stage.name(),
            hint = stage.hint()
        ),
        Change::Recovered(stage) => {
            info!(message = "watchdog: the stage turns again; pings to systemd resumed", stage = stage.name())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(500);

    fn check(s: &mut Supervisor, now: Instant) -> (bool, Vec<Change>) {
        let mut changes = Vec::new();
        let healthy = s.check(now, &mut changes);
        (healthy, changes)
    }

    #[test]
    fn an_idle_stage_is_never_stuck_and_a_busy_one_only_without_turns() {
        let start = Instant::now();
        let dog = Watchdog::new(None);
        let relay = dog.heartbeat(Stage::Relay);
        let mut s = Supervisor::new(&dog, LIMIT, start);
        // Idle for an hour: healthy.
        assert_eq!(check(&mut s, start + Duration::from_secs(3600)), (true, vec![]));
        // A turn that begins after an hour idle is timed from when it was seen beginning.
        relay.begin();
        assert_eq!(check(&mut s, start + Duration::from_secs(3600)), (true, vec![]));
        relay.end();
        // Busy, but turning: healthy however long.
        for i in 1..20u64 {
            relay.begin();
            relay.end();
            relay.begin();
            assert!(check(&mut s, start + Duration::from_secs(3600) + LIMIT * i as u32).0);
        }
        // Holding work without ending the turn: stuck once the limit passed, reported once.
        let held_from = start + Duration::from_secs(3600) + LIMIT * 19;
        assert!(check(&mut s, held_from + LIMIT / 2).0);
        let (healthy, changes) = check(&mut s, held_from + LIMIT);
        assert!(!healthy);
        assert_eq!(changes, vec![Change::Stuck(Stage::Relay, Stuck::NoTurn(LIMIT))]);
        assert_eq!(check(&mut s, held_from + LIMIT * 3), (false, vec![]));
        // It turns again: healthy, reported once.
        relay.end();
        assert_eq!(check(&mut s, held_from + LIMIT * 4), (true, vec![Change::Recovered(Stage::Relay)]));
    }

    #[test]
    fn a_stage_that_ended_is_stuck_at_once() {
        let start = Instant::now();
        let dog = Watchdog::new(None);
        let route = dog.heartbeat(Stage::Route);
        let second = route.clone();
        let mut s = Supervisor::new(&dog, LIMIT, start);
        drop(route);
        assert!(check(&mut s, start).0, "a holder is left");
        drop(second);
        assert_eq!(check(&mut s, start), (false, vec![Change::Stuck(Stage::Route, Stuck::Ended)]));
    }

    #[test]
    fn the_wedge_names_a_stage_and_a_turn() {
        assert_eq!(parse_wedge("store"), Some((Stage::Store, 1)));
        assert_eq!(parse_wedge("relay@40"), Some((Stage::Relay, 40)));
        assert_eq!(parse_wedge("relay@0"), None);
        assert_eq!(parse_wedge("disk"), None);
        let dog = Watchdog::new(Some((Stage::Store, 2)));
        let store = dog.heartbeat(Stage::Store);
        let relay = dog.heartbeat(Stage::Relay);
        store.begin();
        relay.begin();
        assert!(!store.wedged() && !relay.wedged());
        store.end();
        store.begin();
        assert!(store.wedged());
        assert!(!relay.wedged());
    }

    #[test]
    fn the_status_line_says_upstream_and_backlog() {
        let metrics = Metrics::default();
        Metrics::set(&metrics.gauges().buffered_events, 12);
        let line = StatusLine::read(&metrics, true);
        assert_eq!(line, StatusLine { upstream: Some(false), backlog: 12 });
        assert_eq!(
            line.text("mqtt://h:1883", "2026-12-03T16:00:00Z"),
            "upstream mqtt://h:1883 unreachable since 2026-12-03T16:00:00Z; 12 events buffered"
        );
        assert_eq!(
            StatusLine::read(&metrics, false).text("", ""),
            "no upstream configured; 12 events buffered"
        );
    }
}
