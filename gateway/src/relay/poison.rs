//! Poison isolation: the event an upstream keeps closing the connection over is isolated,
//! struck, and after `upstream.poison_after` strikes in a row moved to the dead-letter store,
//! so the events behind it can go on (the rule is stated in the relay's module docs).
//!
//! # Invariants
//! - Only the isolated suspect can be blamed, only for a close by the upstream, only once the
//!   connection proved itself working, and only within [`POISON_CLOSE_WITHIN`] of writing it.
//! - A blamed event leaves the buffer only once its letter is on disk; until then it is
//!   quarantined (never sent, still in the buffer).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, warn};

use super::Relay;
use super::lanes::Conn;
use crate::buffer::{Key, Record};
use crate::deadletter::DeadLetter;
use crate::event::{escape_topic, format_event_id, now_ms};
use crate::metrics::Metrics;
use crate::tap::{DropReason, RelayAction};

/// A close counts against the isolated suspect only this soon after it was written. Brokers
/// close over a packet they refuse at once (mosquitto: within milliseconds); a cluster that
/// holds a publish while it elects a leader and then drops the connection (a 3-node NATS
/// JetStream cluster whose stream leader was killed, measured: ~4 s) is not refusing the event.
pub const POISON_CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// The poison rule's state.
#[derive(Debug, Default)]
pub(super) struct Isolation {
    /// The event the next connections isolate.
    pub(super) suspect: Option<Key>,
    /// Consecutive strikes against one event.
    pub(super) strikes: Option<(Key, u32)>,
    /// Blamed events whose letters are being written: never sent, still in the buffer.
    pub(super) quarantined: HashSet<Key>,
    /// Letters for the run loop to hand to the dead-letter writer.
    poisoned: Vec<(Key, DeadLetter)>,
}

impl Relay {
    /// The suspect, if this connection isolates it.
    pub(super) fn isolated_suspect(&self) -> Option<Key> {
        self.isolation.suspect.filter(|_| self.conn.as_ref().is_some_and(|c| c.isolating))
    }

    /// Nothing to isolate any more: the connection gets its full window.
    pub(super) fn end_isolation(&mut self) {
        self.isolation.suspect = None;
        if let Some(c) = self.conn.as_mut() {
            c.isolating = false;
        }
    }

    /// The upstream acknowledged `key`. If it was the isolated publish (the suspect, or what
    /// replaced it at the head of its lane), whatever closed the link before, it was not this.
    pub(super) fn isolation_passed(&mut self, key: Key) {
        let isolating = self.conn.as_ref().is_some_and(|c| c.isolating);
        if isolating || self.isolation.strikes.is_some_and(|(k, _)| k == key) {
            self.end_isolation();
            self.isolation.strikes = None;
        }
    }

    /// The upstream closed `conn`: its first unacknowledged publish becomes the suspect, and a
    /// strike if it was isolated, alone, after a proven start, and closed over at once.
    pub(super) fn blame(&mut self, conn: &Conn, reason: &str, now: Instant) {
        let Some(first) = conn.first_unacked() else { return };
        let key = first.record.key();
        let blamed = conn.isolating
            && conn.session.answered()
            && conn.session.outstanding() == 1
            && now.saturating_duration_since(first.at) <= POISON_CLOSE_WITHIN;
        if blamed {
            self.strike(&first.record, reason, now);
        }
        if !self.isolation.quarantined.contains(&key) {
            self.isolation.suspect = Some(key);
        }
    }

    /// One more close right after `record`; at `poison_after` in a row it is quarantined and
    /// its letter queued for the dead-letter store.
    fn strike(&mut self, record: &Arc<Record>, reason: &str, now: Instant) {
        let key = record.key();
        let n = match self.isolation.strikes {
            Some((k, n)) if k == key => n + 1,
            _ => 1,
        };
        if n < self.settings.poison_after {
            self.isolation.strikes = Some((key, n));
            return;
        }
        self.isolation.strikes = None;
        self.isolation.suspect = None;
        self.isolation.quarantined.insert(key);
        self.tap(record, RelayAction::Dropped, Some(DropReason::Poison));
        if let Some(folded) = self.logs.poison.ready(now) {
            warn!(
                message = "the upstream closed the connection right after the same event several times in a row; it goes to the dead-letter store (`outpost rules dead-letters`) so the events behind it can go on. Check the upstream broker's log for why it refuses it (topic, size, ACL)",
                event_id = %format_event_id(record.event_id),
                topic = %escape_topic(&record.topic),
                size = record.payload.len(),
                closes_in_row = n,
                last_close = reason,
                similar_since_last_log = folded,
            );
        }
        self.isolation.poisoned.push((
            key,
            DeadLetter {
                ts_ms: now_ms(),
                event_id: record.event_id,
                rule: String::new(),
                reason: format!(
                    "the upstream closed the connection right after this event {n} times in a row (last: {reason})"
                ),
                topic: record.topic.clone(),
                payload: record.payload.to_vec(),
                rules: Vec::new(),
            },
        ));
    }

    /// Letters of blamed events, for the dead-letter writer.
    pub fn take_poisoned(&mut self) -> Vec<(Key, DeadLetter)> {
        std::mem::take(&mut self.isolation.poisoned)
    }

    /// The dead-letter writer's answer for a blamed event. Written: the event leaves the buffer
    /// like an acknowledged one. Not written: it is sent again (and blamed again if it must).
    pub fn on_dead_lettered(&mut self, key: Key, result: Result<(), String>, now: Instant) {
        if !self.isolation.quarantined.remove(&key) {
            return;
        }
        match result {
            Ok(()) => {
                Metrics::add(&self.metrics.counters().upstream_poison, 1);
                self.on_acked(key, now);
            }
            Err(error) => {
                error!(message = "cannot write a blamed event to the dead-letter store; it stays in the buffer and is sent again", %error);
                let lane = &mut self.lanes[usize::from(key.0)];
                lane.cursor = lane.cursor.min(key.1);
                self.rewind_all();
            }
        }
    }
}
