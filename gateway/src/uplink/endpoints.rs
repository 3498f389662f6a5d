//! Which upstream endpoint to try next, when to back off, and when to return to the preferred
//! one: the failover policy over `upstream.urls`, pure (the clock is passed in, it returns
//! decisions; [`super::connect::run`] does the I/O and the logging).
//!
//! - **Rounds.** A round tries each endpoint once, in order; only when a whole round failed does
//!   the uplink wait its backoff (`upstream.reconnect_min`..`reconnect_max`). A round starts at
//!   the preferred endpoint (the first), except after a connection that proved healthy was
//!   lost: then at the endpoint after the lost one, which comes last. So a dead node costs one
//!   failed attempt, not a backoff, and with one endpoint nothing changes from before.
//! - **A connection lost before it proved healthy** counts as a failed attempt of the round: an
//!   endpoint (or a whole cluster) that accepts and drops every connection still meets the
//!   backoff once per round instead of being dialled in a tight loop.
//! - **Failback.** While the link is on another endpoint, the preferred one is probed every
//!   [`Endpoints::probe_every`] with a real MQTT handshake (TCP, CONNECT with the client id and
//!   `-probe` appended, CONNACK, DISCONNECT). Once its probes have answered for
//!   `upstream.failback_after` without a failure, the link leaves the current endpoint for it.
//!   Why a probe and not "on the next reconnect only": a healthy secondary may stay up for
//!   months, and the preferred endpoint is usually preferred for a reason (the nearer region,
//!   the cheaper link). Why a full handshake and not a TCP connect: a restarting broker opens
//!   its port before it can take sessions (NATS answers TCP before JetStream is ready). Why
//!   another client id: the gateway's own would take over its live session on a cluster that
//!   shares client ids between nodes, closing the connection the events are flowing on.
//!
//! # Invariants
//! - Every endpoint is tried once per round before the uplink backs off.
//! - The link leaves a working endpoint only for the preferred one, and only after its probes
//!   answered for `failback_after` in a row.

use std::time::Duration;

use tokio::time::Instant;

use crate::telemetry::{Episode, Failure};

/// How often the preferred endpoint is probed while the link is on another one: a quarter of
/// `failback_after`, so the return comes within about a probe of it, between 1 s and 30 s.
fn probe_interval(failback_after: Duration) -> Duration {
    (failback_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// What to do after an attempt failed or a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try this endpoint now.
    Try(usize),
    /// Every endpoint of the round failed: wait the backoff, then start a round at the
    /// preferred endpoint.
    Backoff,
}

/// The failover state of one uplink (see the module docs).
#[derive(Debug)]
pub struct Endpoints {
    count: usize,
    /// Each endpoint's failures, for its log lines: the first, reminders, its end.
    health: Vec<Episode>,
    /// The endpoint the round tries next.
    next: usize,
    /// Attempts left in this round before the backoff.
    left: usize,
    failback_after: Duration,
    /// Since when every probe of the preferred endpoint answered.
    preferred_answering: Option<Instant>,
}

impl Endpoints {
    pub fn new(count: usize, failback_after: Duration, reminder_every: Duration) -> Endpoints {
        let count = count.max(1);
        Endpoints {
            count,
            health: (0..count).map(|_| Episode::every(reminder_every)).collect(),
            next: 0,
            left: count,
            failback_after,
            preferred_answering: None,
        }
    }

    /// The endpoint to try now.
    pub fn current(&self) -> usize {
        self.next
    }

    /// A new round starting at the preferred endpoint (after the backoff).
    pub fn start_round(&mut self) {
        self.start_round_at(0);
    }

    fn start_round_at(&mut self, idx: usize) {
        self.next = idx % self.count;
        self.left = self.count;
    }

    /// An attempt on the current endpoint failed: the next one, or the backoff.
    pub fn attempt_failed(&mut self, idx: usize, now: Instant) -> (Failure, Next) {
        let note = self.health[idx].failed(now);
        self.left = self.left.saturating_sub(1);
        if self.left == 0 {
            return (note, Next::Backoff);
        }
        self.next = (idx + 1) % self.count;
        (note, Next::Try(self.next))
    }

    /// A connection to `idx` was made: its failures, if any, ended (how long, how many).
    pub fn connected(&mut self, idx: usize, now: Instant) -> Option<(Duration, u64)> {
        self.next = idx;
        if idx == 0 {
            self.preferred_answering = None;
        }
        self.health[idx].ended(now)
    }

    /// The connection to `idx` ended after `healthy` (it lasted long enough to count as
    /// working). A healthy one starts a new round at the next endpoint, without a backoff; one
    /// that was not counts as a failed attempt of the round it belonged to.
    pub fn lost(&mut self, idx: usize, healthy: bool, now: Instant) -> (Failure, Next) {
        if healthy {
            let note = self.health[idx].failed(now);
            if self.count == 1 {
                // One endpoint: nothing else to try; wait the backoff as before failover existed.
                self.start_round();
                return (note, Next::Backoff);
            }
            self.start_round_at(idx + 1);
            return (note, Next::Try(self.next));
        }
        self.attempt_failed(idx, now)
    }

    /// The link left `idx` on purpose, for the preferred endpoint.
    pub fn failing_back(&mut self) {
        self.preferred_answering = None;
        self.start_round();
    }

    /// How often to probe the preferred endpoint while on another.
    pub fn probe_every(&self) -> Duration {
        probe_interval(self.failback_after)
    }

    /// Whether the link, on `idx`, should probe the preferred endpoint at all.
    pub fn probes(&self, idx: usize) -> bool {
        idx != 0
    }

    /// A probe of the preferred endpoint answered (`Ok`) or failed at `now`. Returns whether the
    /// link should go back to it now, and on a failure what to log about it.
    pub fn probed(
        &mut self,
        answered: bool,
        now: Instant,
    ) -> (bool, Option<Failure>, Option<(Duration, u64)>) {
        if answered {
            let since = *self.preferred_answering.get_or_insert(now);
            let back = self.health[0].ended(now);
            (now.duration_since(since) >= self.failback_after, None, back)
        } else {
            self.preferred_answering = None;
            (false, Some(self.health[0].failed(now)), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(600);

    #[test]
    fn a_round_tries_every_endpoint_in_order_then_backs_off() {
        let now = Instant::now();
        let mut e = Endpoints::new(3, Duration::from_secs(60), MIN);
        assert_eq!(e.current(), 0);
        assert_eq!(e.attempt_failed(0, now), (Failure::Started, Next::Try(1)));
        assert_eq!(e.attempt_failed(1, now), (Failure::Started, Next::Try(2)));
        assert_eq!(e.attempt_failed(2, now), (Failure::Started, Next::Backoff));
        e.start_round();
        assert_eq!(e.current(), 0);
        // The second round's failures are not news: each endpoint's first was logged.
        assert_eq!(e.attempt_failed(0, now), (Failure::Quiet, Next::Try(1)));
        assert_eq!(e.connected(1, now + Duration::from_secs(3)), Some((Duration::from_secs(3), 1)));
        assert_eq!(e.connected(1, now), None, "no failure to end");
    }

    #[test]
    fn a_lost_healthy_connection_moves_on_at_once_and_tries_the_lost_endpoint_last() {
        let now = Instant::now();
        let mut e = Endpoints::new(3, Duration::from_secs(60), MIN);
        e.connected(1, now);
        assert_eq!(e.lost(1, true, now), (Failure::Started, Next::Try(2)));
        assert_eq!(e.attempt_failed(2, now), (Failure::Started, Next::Try(0)));
        assert_eq!(e.attempt_failed(0, now), (Failure::Started, Next::Try(1)));
        assert_eq!(e.attempt_failed(1, now), (Failure::Quiet, Next::Backoff));
    }

    #[test]
    fn connections_dropped_before_they_proved_healthy_meet_the_backoff() {
        let now = Instant::now();
        let mut e = Endpoints::new(2, Duration::from_secs(60), MIN);
        e.connected(0, now);
        assert_eq!(e.lost(0, false, now).1, Next::Try(1));
        e.connected(1, now);
        assert_eq!(e.lost(1, false, now).1, Next::Backoff);
    }

    #[test]
    fn one_endpoint_backs_off_between_connections_as_before() {
        let now = Instant::now();
        let mut e = Endpoints::new(1, Duration::from_secs(60), MIN);
        e.connected(0, now);
        assert_eq!(e.lost(0, true, now), (Failure::Started, Next::Backoff));
        assert_eq!(e.current(), 0);
        assert_eq!(e.attempt_failed(0, now), (Failure::Quiet, Next::Backoff));
        assert!(!e.probes(0));
    }

    #[test]
    fn failback_waits_for_failback_after_of_answered_probes_in_a_row() {
        let start = Instant::now();
        let mut e = Endpoints::new(2, Duration::from_secs(8), MIN);
        assert_eq!(e.probe_every(), Duration::from_secs(2));
        assert_eq!(e.attempt_failed(0, start).1, Next::Try(1));
        e.connected(1, start);
        assert!(e.probes(1));
        let at = |s: u64| start + Duration::from_secs(s);
        let (back, _, ended) = e.probed(true, at(2));
        assert!(!back);
        assert_eq!(ended, Some((Duration::from_secs(2), 1)), "the preferred endpoint answers again");
        assert!(!e.probed(true, at(6)).0);
        // A failure restarts the count.
        assert_eq!(e.probed(false, at(8)), (false, Some(Failure::Started), None));
        assert!(!e.probed(true, at(10)).0);
        assert!(!e.probed(true, at(16)).0);
        assert!(e.probed(true, at(18)).0, "8 s of answers");
        e.failing_back();
        assert_eq!(e.current(), 0);
        assert_eq!(Endpoints::new(2, Duration::from_secs(600), MIN).probe_every(), Duration::from_secs(30));
        assert_eq!(Endpoints::new(2, Duration::from_secs(1), MIN).probe_every(), Duration::from_secs(1));
    }
}
