//! Admission: taking a routed event into the buffer, within `buffer.max_events` and
//! `buffer.max_bytes`, and the overflow policy when they are reached.
//!
//! # Invariants
//! - An event refused (`reject_new`) or dropped (`drop_oldest`) is counted and its sensor told
//!   (refused) or its ticket released by the stated policy; nothing leaves silently.
//! - While `commit_max_events` events wait for the disk, nothing is admitted: the bounded
//!   channels before the relay fill and ingest slows.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::warn;

use super::{Pending, Relay};
use crate::buffer::{N_PRIORITIES, Record};
use crate::config::OverflowPolicy;
use crate::event::{Outbound, now_ms};
use crate::metrics::Metrics;
use crate::tap::{DropReason, RelayAction};

impl Relay {
    /// Whether the relay takes input now: fewer than `commit_max_events` wait for the disk.
    pub(super) fn can_accept(&self) -> bool {
        self.commits.unsaved_len < self.settings.commit_max_events
    }

    /// Takes one routed event into the buffer.
    pub fn accept(&mut self, mut outbound: Outbound, now: Instant) {
        let ticket = outbound.ticket.take();
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
