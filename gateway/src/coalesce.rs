//! Interrupt moderation for the runtime thread (`wakeup_coalescing`), and when to use it.
//!
//! At a few thousand events a second each event otherwise gets wake-ups of its own (its
//! publish, then its upstream PUBACK), and a wake-up's fixed cost — the scheduler,
//! `epoll_wait`, the cold state of every task it touches — outweighs the event's own work
//! several times (README, "At low rates"). Waiting a few milliseconds before sleeping lets the
//! events of that interval share one wake-up, one upstream write and one PUBACK read. Only
//! while busy: a thread whose last sleep lasted two intervals or more sleeps at once, so an
//! idle fleet keeps its few wake-ups and the first event after a quiet spell its latency.
//!
//! Waiting is free for sensors that publish on their own clock (open loop: a reading every few
//! seconds arrives when it arrives) and ruinous for a client that publishes one message after
//! the PUBACK of the last (closed loop: one round trip per interval, ~50 messages a second).
//! Which kind drives the load is measured, not configured: [`Moderation`] runs in one mode and,
//! now and then, one epoch in the other, bracketed by epochs in its own mode. If the publishes
//! arrived markedly faster while the thread did not wait, waiting slows a client down and the
//! thread stops waiting; otherwise it waits. The probes back off while the answer stays the
//! same, so a steady fleet pays one epoch without waiting every `PROBE_MAX`. Below a few
//! hundred publishes a second a wait gathers too little to pay for itself (it is a wake-up
//! of its own), so the thread does not wait and does not probe.
//!
//! Pure: times and the publish count come in as arguments, so the tests drive it with a model
//! of each kind of client.

use std::time::{Duration, Instant};

/// The shortest epoch; an epoch also lasts at least ten intervals.
const EPOCH_MIN: Duration = Duration::from_millis(100);
/// The first probe after start-up or after the mode changed.
const PROBE_FIRST: Duration = Duration::from_secs(1);
/// The probes' interval doubles up to this while their answer stays the same.
const PROBE_MAX: Duration = Duration::from_secs(8);
/// Waiting throttles the clients if they published this many times faster without it. An
/// open-loop fleet publishes at the same rate either way; a closed-loop client tens of times
/// faster without the wait: the factor sits far from both, above the noise of a few dozen events.
const THROTTLE_FACTOR: f64 = 1.5;
/// Fewer publishes over a probe's three epochs (~330 a second) are too few to tell a rate from
/// noise, and too few for a wait to gather more than two or three: the thread does not wait.
const MIN_EVENTS: u64 = 100;

/// Where the next probe stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// In the mode, until `next_probe`.
    Steady,
    /// The epoch before the probe, in the mode.
    Before,
    /// The probe: one epoch in the other mode.
    Probe { before: f64 },
    /// The epoch after the probe, in the mode.
    After { before: f64, probe: f64 },
}

/// The moderation of one runtime thread: whether to wait before it sleeps.
#[derive(Debug)]
pub struct Moderation {
    interval: Duration,
    epoch: Duration,
    /// The mode: wait while busy.
    waits: bool,
    /// When the thread last went to sleep, and how long its last sleep lasted.
    parked_at: Instant,
    last_sleep: Duration,
    phase: Phase,
    /// When the current phase began, and the publish count then.
    phase_start: Instant,
    phase_count: u64,
    /// The publish count when the probe's first epoch began.
    probe_count: u64,
    probe_every: Duration,
    next_probe: Instant,
}

impl Moderation {
    /// Starts without waiting: a closed-loop client is never slowed before the first probe,
    /// and an open-loop fleet's first second costs what it did before moderation existed.
    pub fn new(interval: Duration, now: Instant) -> Moderation {
        Moderation {
            interval,
            epoch: EPOCH_MIN.max(interval.saturating_mul(10)),
            waits: false,
            parked_at: now,
            // As after a long sleep: nothing to coalesce yet.
            last_sleep: Duration::MAX,
            phase: Phase::Steady,
            phase_start: now,
            phase_count: 0,
            probe_count: 0,
            probe_every: PROBE_FIRST,
            next_probe: now + PROBE_FIRST,
        }
    }

    /// Whether the thread waits while busy (the mode, not a probe).
    pub fn waits(&self) -> bool {
        self.waits
    }

    /// The thread is about to sleep, `published` publishes read since start-up: how long to
    /// wait first. The caller waits, then calls [`Moderation::parked`]. Never while
    /// `window_full` (the relay's upstream send window is full): a relay that waits for
    /// PUBACKs to send more would only get them later, so a wait would cap a drain or a burst
    /// at one window per interval.
    pub fn before_park(&mut self, now: Instant, published: u64, window_full: bool) -> Option<Duration> {
        self.advance(now, published);
        let waiting = match self.phase {
            Phase::Probe { .. } => !self.waits,
            Phase::Steady | Phase::Before | Phase::After { .. } => self.waits,
        };
        (waiting && !window_full && self.last_sleep < self.interval.saturating_mul(2))
            .then_some(self.interval)
    }

    pub fn parked(&mut self, now: Instant) {
        self.parked_at = now;
    }

    pub fn woke(&mut self, now: Instant) {
        self.last_sleep = now.saturating_duration_since(self.parked_at);
    }

    /// Moves the probe on by the epochs that have ended.
    fn advance(&mut self, now: Instant, published: u64) {
        let elapsed = now.saturating_duration_since(self.phase_start);
        let rate = || published.saturating_sub(self.phase_count) as f64 / elapsed.as_secs_f64();
        let next = match self.phase {
            Phase::Steady if now >= self.next_probe => {
                self.probe_count = published;
                Phase::Before
            }
            Phase::Steady => return,
            _ if elapsed < self.epoch => return,
            // Not waiting and too quiet for waiting to be worth it: no probe, so a trickle or
            // an idle fleet never waits (each wait would be a wake-up of its own).
            Phase::Before if !self.waits && published.saturating_sub(self.phase_count) < MIN_EVENTS / 3 => {
                self.next_probe = now + self.probe_every;
                Phase::Steady
            }
            Phase::Before => Phase::Probe { before: rate() },
            Phase::Probe { before } => Phase::After { before, probe: rate() },
            Phase::After { before, probe } => {
                self.decide(now, before, probe, rate(), published.saturating_sub(self.probe_count));
                Phase::Steady
            }
        };
        self.phase = next;
        self.phase_start = now;
        self.phase_count = published;
    }

    /// Ends a probe: its epoch's rate against the mean of the two around it.
    fn decide(&mut self, now: Instant, before: f64, probe: f64, after: f64, events: u64) {
        let around = (before + after) / 2.0;
        let (waiting, not_waiting) = if self.waits { (around, probe) } else { (probe, around) };
        let waits = events >= MIN_EVENTS && not_waiting <= THROTTLE_FACTOR * waiting;
        if waits == self.waits {
            self.probe_every = self.probe_every.saturating_mul(2).min(PROBE_MAX);
        } else {
            self.waits = waits;
            self.probe_every = PROBE_FIRST;
        }
        self.next_probe = now + self.probe_every;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const INTERVAL: Duration = Duration::from_millis(10);

    /// Waits only while busy: after a sleep shorter than two intervals. After a long sleep
    /// (idle, or the first event after a quiet spell) the thread sleeps at once.
    #[test]
    fn waits_only_after_short_sleeps() {
        let t = Instant::now();
        let mut m = Moderation::new(INTERVAL, t);
        m.waits = true;
        assert_eq!(m.before_park(t, 0, false), None, "nothing to coalesce at start");
        m.parked(t);
        m.woke(t + Duration::from_millis(1));
        assert_eq!(
            m.before_park(t + Duration::from_millis(1), 0, false),
            Some(INTERVAL),
            "woken 1 ms after sleeping: busy"
        );
        assert_eq!(m.before_park(t + Duration::from_millis(1), 0, true), None, "the upstream window is full");
        m.parked(t + Duration::from_millis(2));
        m.woke(t + Duration::from_millis(2) + 2 * INTERVAL);
        assert_eq!(m.before_park(t + Duration::from_millis(30), 0, false), None, "slept two intervals: idle");
    }

    /// What drives the publishes, as a model: sensors on their own clock, or clients that
    /// each publish again one round trip after their PUBACK.
    #[derive(Debug, Clone, Copy)]
    enum Load {
        /// This many publishes a second, whatever the thread does.
        OpenLoop { per_second: u32 },
        /// This many clients, each with one publish outstanding.
        ClosedLoop { clients: u32 },
    }

    /// Runs the moderation against loads one after the other, each for its seconds: a turn
    /// per publish an open-loop load makes, or per 100 µs round trip of the closed-loop
    /// clients, and the wait the moderation asks for before each sleep. Returns the mode at
    /// the end, the publishes made in the last phase and the waits in it.
    fn simulate(phases: &[(Load, u64)]) -> (bool, u64, u64) {
        let start = Instant::now();
        let mut m = Moderation::new(INTERVAL, start);
        let (mut now, mut published) = (start, 0u64);
        // Turn cost (the work of a wake-up) and a closed-loop client's round trip.
        let (turn, round_trip) = (Duration::from_micros(20), Duration::from_micros(100));
        let (mut made, mut waits) = (0, 0);
        for &(load, seconds) in phases {
            let (phase_start, phase_published, end) = (now, published, now + Duration::from_secs(seconds));
            waits = 0;
            while now < end {
                let wait = m.before_park(now, published, false);
                waits += u64::from(wait.is_some());
                // While the thread waits, open-loop publishes keep arriving; a closed-loop
                // client's next publish needs the PUBACK this turn sent, one round trip after
                // the wait.
                let asleep_from = now + wait.unwrap_or_default();
                m.parked(asleep_from);
                let woken = match load {
                    Load::OpenLoop { per_second } => {
                        let made = published - phase_published;
                        asleep_from.max(phase_start + Duration::from_secs(made + 1) / per_second)
                    }
                    Load::ClosedLoop { .. } => asleep_from.max(now + round_trip),
                };
                m.woke(woken);
                published = match load {
                    Load::OpenLoop { per_second } => {
                        phase_published + ((woken - phase_start).as_secs_f64() * f64::from(per_second)) as u64
                    }
                    Load::ClosedLoop { clients } => published + u64::from(clients),
                };
                now = woken + turn;
            }
            made = published - phase_published;
        }
        (m.waits(), made, waits)
    }

    #[test]
    fn an_open_loop_fleet_gets_waits() {
        for per_second in [1_000, 2_000, 10_000] {
            let (waits, _, _) = simulate(&[(Load::OpenLoop { per_second }, 10)]);
            assert!(waits, "{per_second}/s from sensors on their own clock: waiting costs them nothing");
        }
    }

    #[test]
    fn a_closed_loop_client_is_not_throttled() {
        for clients in [1, 4] {
            let (waits, made, _) = simulate(&[(Load::ClosedLoop { clients }, 10)]);
            assert!(!waits, "{clients} closed-loop client(s): waiting would throttle them");
            // Without waiting ~8,300 round trips a second; one probe epoch in ~2 s waits.
            assert!(made > 60_000 * u64::from(clients), "{clients} clients made only {made}");
        }
    }

    /// A closed-loop client arriving while a fleet has the thread waiting turns it off at the
    /// next probe, and waiting comes back once the client is gone.
    #[test]
    fn the_mode_follows_the_load() {
        let fleet = (Load::OpenLoop { per_second: 2_000 }, 20);
        let (waits, made, _) = simulate(&[fleet, (Load::ClosedLoop { clients: 1 }, 30)]);
        assert!(!waits);
        assert!(made > 150_000, "throttled until a probe 8 s away at most, then free: {made}");
        let (waits, _, _) = simulate(&[fleet, (Load::ClosedLoop { clients: 1 }, 30), fleet]);
        assert!(waits);
    }

    /// Too few publishes to be worth a wait: a trickle never waits, and a fleet that goes
    /// quiet stops waiting.
    #[test]
    fn a_trickle_never_waits() {
        let (waits, made, waited) = simulate(&[(Load::OpenLoop { per_second: 100 }, 10)]);
        assert!(!waits);
        assert!(made >= 999);
        assert_eq!(waited, 0, "not even in a probe");
        let (waits, _, _) =
            simulate(&[(Load::OpenLoop { per_second: 2_000 }, 10), (Load::OpenLoop { per_second: 50 }, 40)]);
        assert!(!waits);
    }

    proptest! {
        /// Whatever the times and counts, a wait is the interval or nothing, and only a thread
        /// that last slept less than two intervals waits.
        #[test]
        fn waits_are_the_interval_and_only_while_busy(
            steps in proptest::collection::vec((0u64..50_000, 0u64..50_000, 0u64..100), 1..300)
        ) {
            let start = Instant::now();
            let mut m = Moderation::new(INTERVAL, start);
            let (mut now, mut published) = (start, 0u64);
            for (awake_us, asleep_us, arrived) in steps {
                now += Duration::from_micros(awake_us);
                published += arrived;
                let busy = m.last_sleep < 2 * INTERVAL;
                let wait = m.before_park(now, published, false);
                prop_assert!(wait.is_none() || (wait == Some(INTERVAL) && busy));
                now += wait.unwrap_or_default();
                m.parked(now);
                now += Duration::from_micros(asleep_us);
                m.woke(now);
            }
        }
    }
}
