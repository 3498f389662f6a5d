//! Admission: taking a routed event into the buffer, within `buffer.max_events` and
//! `buffer.max_bytes`, and the overflow policy when they are reached.
//!
//! # Invariants
//! - An event refused (`reject_new`) or dropped (`drop_oldest`) is counted and its sensor told
//!   (refused) or its ticket released by the stated policy; nothing leaves silently.
//! - A refused copy no sensor would resend ([`Outbound::dead_letter_if_refused`]: a window's
//!   output, a copy of a reading a stateful rule took in) is not refused to anyone: it goes to
//!   the dead-letter writer's durable file, and its ticket is held until the letter is
//!   written (then released, safe) or failed (then refused: the window output is lost, the
//!   reading's sensor is told to resend). Each outcome is counted and logged.
//! - While `commit_max_events` events wait for the disk, nothing is admitted: the bounded
//!   channels before the relay fill and ingest slows.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::{error, warn};

use super::{Pending, Relay};
use crate::ack::Ticket;
use crate::buffer::{N_PRIORITIES, Record};
use crate::config::OverflowPolicy;
use crate::deadletter::DeadLetter;
use crate::event::{Outbound, now_ms};
use crate::metrics::Metrics;
use crate::tap::{DropReason, RelayAction};
use crate::telemetry::LogThrottle;

/// The dead letter's reason for a copy the full buffer refused.
pub const BUFFER_FULL_REASON: &str = "buffer_full";

/// Refused copies no sensor would resend, on their way to the dead-letter file.
#[derive(Debug, Default)]
pub(super) struct Refused {
    /// Letters not yet handed to the writer (it takes a bounded number at a time), with the
    /// tickets they hold.
    waiting: VecDeque<(DeadLetter, Option<Ticket>)>,
    /// Letters handed to the writer and not yet answered.
    writing: usize,
    log: LogThrottle,
    failed_log: LogThrottle,
}

impl Relay {
    /// Whether the relay takes input now: fewer than `commit_max_events` wait for the disk.
    pub(super) fn can_accept(&self) -> bool {
        self.commits.unsaved_len < self.settings.commit_max_events
    }

    /// Takes one routed event into the buffer.
    pub fn accept(&mut self, mut outbound: Outbound, now: Instant) {
        let ticket = outbound.ticket.take();
        let dead_letter_if_refused = outbound.dead_letter_if_refused;
        // An event's life in the buffer ends at its route's TTL or its message expiry,
        // whichever comes first: after its message expiry no subscriber upstream may get it.
        let message_expiry = outbound.props.as_ref().and_then(|props| props.expires_ms);
        let expires_ms = match (outbound.expires_ms, message_expiry) {
            (Some(ttl), Some(message)) => Some(ttl.min(message)),
            (ttl, message) => ttl.or(message),
        };
        let record = Record {
            priority: outbound.priority.min(N_PRIORITIES as u8 - 1),
            seq: self.seqs.next_id(),
            event_id: outbound.event_id,
            enqueued_ms: now_ms(),
            expires_ms,
            topic: outbound.topic,
            qos: outbound.qos,
            payload: outbound.payload,
            props: outbound.props,
        };
        let size = record.size();
        let stored = self.stored();
        let over_events = (stored.events + 1).saturating_sub(self.settings.max_events);
        let over_bytes = (stored.bytes + size).saturating_sub(self.settings.max_bytes);
        if over_events > 0 || over_bytes > 0 {
            match self.settings.overflow {
                OverflowPolicy::RejectNew => {
                    self.tap(&record, RelayAction::Dropped, Some(DropReason::BufferFull));
                    if dead_letter_if_refused {
                        self.refuse_to_dead_letters(record, ticket, now);
                        return;
                    }
                    if let Some(ticket) = &ticket {
                        ticket.reject();
                    }
                    self.count_rejected_full(stored.events, stored.bytes, now);
                    return;
                }
                OverflowPolicy::DropOldest => self.make_room(over_events, over_bytes, now),
            }
        }
        Metrics::add(&self.metrics.counters().accepted, 1);
        self.tap(&record, RelayAction::Accepted, None);
        self.commits.hold(size);
        let lane = &mut self.lanes[usize::from(record.priority)];
        lane.unsaved.insert(record.seq, Pending { record: Arc::new(record), since: now, _ticket: ticket });
    }

    /// A copy the full buffer refuses and no sensor would resend: to the dead-letter file.
    fn refuse_to_dead_letters(&mut self, record: Record, ticket: Option<Ticket>, now: Instant) {
        if let Some(folded) = self.refused.log.ready(now) {
            warn!(
                message = "buffer full (overflow = reject_new): window outputs, and copies of readings a stateful rule took in, cannot be refused to a sensor (none would resend them), so they go to the dead-letter file dead-letters-upstream.jsonl instead (`outpost rules dead-letters`, reason buffer_full); raise buffer.max_events/max_bytes or restore the uplink, then republish them from the file",
                topic = %crate::event::escape_topic(&record.topic),
                similar_since_last_log = folded,
            );
        }
        let letter = DeadLetter {
            ts_ms: now_ms(),
            event_id: record.event_id,
            rule: String::new(),
            reason: BUFFER_FULL_REASON.to_owned(),
            topic: record.topic,
            payload: record.payload.to_vec(),
            rules: Vec::new(),
        };
        self.refused.waiting.push_back((letter, ticket));
    }

    /// The next refused copy's letter for the dead-letter writer, if any; its answer goes to
    /// [`Relay::on_refused_lettered`].
    pub(super) fn next_refused(&mut self) -> Option<(DeadLetter, Option<Ticket>)> {
        let next = self.refused.waiting.pop_front()?;
        self.refused.writing += 1;
        Some(next)
    }

    /// Refused copies whose letters are not yet written (or failed): stopping now would
    /// release their tickets as if they were safe.
    pub(super) fn refused_pending(&self) -> bool {
        !self.refused.waiting.is_empty() || self.refused.writing > 0
    }

    /// Whether refused copies wait to be handed to the dead-letter writer.
    pub(super) fn has_refused(&self) -> bool {
        !self.refused.waiting.is_empty()
    }

    /// The dead-letter writer's answer for a refused copy. Written: its ticket is released
    /// (what it holds is safe: the reading in the window state, the output in the file).
    /// Not written: its ticket is refused, so a reading's sensor is told to resend it; a
    /// window's output, whose ticket no sensor waits on, is lost.
    pub fn on_refused_lettered(&mut self, ticket: Option<Ticket>, result: Result<(), String>, now: Instant) {
        self.refused.writing = self.refused.writing.saturating_sub(1);
        let counters = self.metrics.counters();
        match result {
            Ok(()) => Metrics::add(&counters.buffer_full_dead_lettered, 1),
            Err(error) => {
                Metrics::add(&counters.buffer_full_letters_failed, 1);
                if let Some(ticket) = &ticket {
                    ticket.reject();
                }
                if let Some(folded) = self.refused.failed_log.ready(now) {
                    error!(
                        message = "the full buffer refused a window output (or a copy of a reading a stateful rule took in) and it could not be written to the dead-letter file either: a window output is lost, a reading's sensor is told to resend it (and a window may count it again); free space in the data directory, check its permissions, and raise buffer.max_events/max_bytes",
                        %error,
                        similar_since_last_log = folded,
                        failed_total = Metrics::get(&counters.buffer_full_letters_failed),
                    );
                }
            }
        }
        drop(ticket);
    }

    fn count_rejected_full(&mut self, stored_events: u64, stored_bytes: u64, now: Instant) {
        let counters = self.metrics.counters();
        Metrics::add(&counters.rejected_full, 1);
        if let Some(folded) = self.logs.overflow.ready(now) {
            warn!(
                message = "buffer full: refusing new events (overflow = reject_new); raise buffer.max_events/max_bytes or restore the uplink",
                stored_events,
                stored_bytes,
                similar_since_last_log = folded,
                rejected_total = Metrics::get(&counters.rejected_full)
            );
        }
    }

    /// Frees space for the overflow policy: oldest records of the least urgent priority go
    /// first. Records on disk are dropped by the next commit; otherwise unsaved ones now.
    fn make_room(&mut self, mut events: u64, mut bytes: u64, now: Instant) {
        if self.commits.disk_live() > 0 {
            self.commits.pending_drop.events += events;
            self.commits.pending_drop.bytes += bytes;
            return;
        }
        let counters = self.metrics.counters();
        for p in (0..N_PRIORITIES).rev() {
            while events > 0 || bytes > 0 {
                let Some((_, pending)) = self.lanes[p].unsaved.pop_first() else { break };
                self.commits.forget_unsaved(&pending);
                events = events.saturating_sub(1);
                bytes = bytes.saturating_sub(pending.record.size());
                Metrics::add(&counters.dropped_overflow, 1);
                self.tap(&pending.record, RelayAction::Dropped, Some(DropReason::Overflow));
            }
        }
        if let Some(folded) = self.logs.overflow.ready(now) {
            warn!(
                message = "buffer full: dropping the oldest events (overflow = drop_oldest); raise buffer.max_events/max_bytes or restore the uplink",
                similar_since_last_log = folded,
                dropped_total = Metrics::get(&counters.dropped_overflow)
            );
        }
    }
}
