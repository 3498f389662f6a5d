//! The send side: per-priority lanes, smooth weighted round robin between them, rate limits,
//! TTL at send time, read-ahead from the file, and resending from the buffer after a
//! reconnect. Publishes are encoded through the connection's [`Session`], straight into the
//! link's output buffer.
//!
//! # Invariants
//! - Per priority, events are sent in sequence order; after a reconnect every lane's cursor is
//!   back at its oldest unacknowledged event and its read-ahead is forgotten.
//! - Encoding stops while [`OUT_HIGH_WATER`] bytes wait for the socket, and while the send
//!   window (`upstream.inflight`, or the upstream's receive maximum) is full.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::{Pending, Relay, RelaySettings};
use crate::buffer::worker::Command;
use crate::buffer::{BufferError, N_PRIORITIES, Record};
use crate::config::EventIdMode;
use crate::event::{format_event_id, now_ms};
use crate::metrics::Metrics;
use crate::mqtt::upstream::Message;
use crate::tap::{DropReason, RelayAction};
use crate::uplink::{LinkLoss, LinkParams, OUT_HIGH_WATER, Session};

/// How many records one disk read fetches for the send window.
pub(super) const READ_BATCH: usize = 1024;

/// Per-priority send state.
#[derive(Debug, Default)]
pub(super) struct Lane {
    /// Next sequence number to send: everything below it is in flight, acked or discarded.
    pub(super) cursor: u64,
    /// The file may hold records at or above `cursor` that are not in `prefetched`.
    pub(super) disk_unread: bool,
    pub(super) prefetched: VecDeque<Arc<Record>>,
    pub(super) reading: bool,
    /// Where the outstanding read started; `None` once a reconnect made it stale.
    read_from: Option<u64>,
    /// Smooth weighted round robin state.
    current_weight: i64,
    /// Highest sequence ever sent, to count resends.
    sent_high: u64,
    /// Accepted, not acked, not on disk, not being committed.
    pub(super) unsaved: BTreeMap<u64, Pending>,
    /// Handed to the store thread in the commit now running.
    pub(super) committing: BTreeMap<u64, Pending>,
}

impl Lane {
    fn weight(priority: usize) -> i64 {
        (N_PRIORITIES - priority) as i64
    }
}

/// A QoS 1 publish encoded on this connection and awaiting its PUBACK (tracked by the
/// session under its packet id).
#[derive(Debug)]
pub(super) struct Sent {
    pub(super) record: Arc<Record>,
    /// Position in the connection's publishes, to find the first one written.
    pub(super) order: u64,
    pub(super) at: Instant,
}

/// The live upstream connection, as the relay sees it (the socket itself is in [`super::run`]).
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) session: Session<Sent>,
    /// QoS 1 publishes written on this connection.
    sent: u64,
    /// This connection isolates the suspect (see the module docs).
    pub(super) isolating: bool,
}

impl Conn {
    /// The first publish written on this connection that is still unacknowledged.
    pub(super) fn first_unacked(&self) -> Option<&Sent> {
        self.session.in_flight().min_by_key(|s| s.order)
    }
}

/// A token bucket for one limit.
#[derive(Debug)]
pub(super) struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(super) fn new(rate: f64) -> Bucket {
        Bucket { rate, tokens: rate, at: Instant::now() }
    }

    /// Takes `n` tokens, or says when enough will be there. A single item larger than the
    /// bucket may pass once the bucket is full, so huge events cannot block the link forever.
    pub(super) fn take(&mut self, n: f64, now: Instant) -> Result<(), Instant> {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        let need = n.min(self.rate);
        if self.tokens >= need {
            self.tokens -= n;
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((need - self.tokens) / self.rate))
        }
    }
}

/// Rate limits, and the "not before" times for sending and for reading the file.
#[derive(Debug)]
pub(super) struct Pacing {
    event_bucket: Option<Bucket>,
    byte_bucket: Option<Bucket>,
    pub(super) rate_wait: Option<Instant>,
    pub(super) read_retry_at: Option<Instant>,
}

impl Pacing {
    pub(super) fn new(settings: &RelaySettings) -> Pacing {
        Pacing {
            event_bucket: settings.max_events_per_sec.map(|r| Bucket::new(f64::from(r))),
            byte_bucket: settings.max_bytes_per_sec.map(|r| Bucket::new(r as f64)),
            rate_wait: None,
            read_retry_at: None,
        }
    }

    fn take(&mut self, record: &Record, now: Instant) -> Result<(), Instant> {
        if let Some(b) = &mut self.event_bucket {
            b.take(1.0, now)?;
        }
        if let Some(b) = &mut self.byte_bucket {
            if let Err(at) = b.take(record.payload.len() as f64, now) {
                if let Some(e) = &mut self.event_bucket {
                    e.tokens += 1.0;
                }
                return Err(at);
            }
        }
        Ok(())
    }

    /// Forgets "not before" times that have passed. Left in place, a past one would be a
    /// deadline that is always due: the loop would spin (a rate limit hit just before the link
    /// dropped, a failed disk read).
    pub(super) fn clear_elapsed(&mut self, now: Instant) {
        if self.rate_wait.is_some_and(|t| t <= now) {
            self.rate_wait = None;
        }
        if self.read_retry_at.is_some_and(|t| t <= now) {
            self.read_retry_at = None;
        }
    }
}

impl Relay {
    /// A new upstream connection: sending starts from the oldest unacknowledged event. If it
    /// isolates the suspect, its PINGREQ probe goes into `out` first.
    pub fn on_connected(&mut self, generation: u64, params: LinkParams, now: Instant, out: &mut BytesMut) {
        let stored = self.stored();
        // Debug: a flapping upstream would write it per connection (the uplink logs the
        // upstream's state changes, with the backlog).
        debug!(
            message = "relay resuming from the buffer",
            generation,
            buffered_events = stored.events,
            buffered_bytes = stored.bytes
        );
        let mut session = Session::new(params, now);
        let isolating = self.isolation.suspect.is_some();
        if isolating {
            session.probe(out);
        }
        self.conn = Some(Conn { session, sent: 0, isolating });
    }

    /// Shutdown: the connection's session ends with a DISCONNECT into `out`.
    pub(super) fn end_session(&mut self, out: &mut BytesMut) {
        if let Some(conn) = self.conn.take() {
            conn.session.close(out);
        }
    }

    /// Whether the connection must prove itself with a PINGRESP before the suspect is sent.
    pub fn wants_probe(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.isolating)
    }

    /// The connection's session, for the run loop to drive.
    pub(super) fn session_mut(&mut self) -> Option<&mut Session<Sent>> {
        self.conn.as_mut().map(|c| &mut c.session)
    }

    pub(super) fn session(&self) -> Option<&Session<Sent>> {
        self.conn.as_ref().map(|c| &c.session)
    }

    /// The upstream acknowledged `sent`; `rejected`: it refused it (MQTT 5 reason).
    pub(super) fn on_puback(&mut self, sent: Sent, rejected: Option<String>, now: Instant) {
        let key = sent.record.key();
        self.isolation_passed(key);
        // Written (encoded into the link's buffer, sent the same turn) → its PUBACK read.
        let round_trip = now.duration_since(sent.at);
        self.metrics.histograms().upstream_round_trip.observe_duration(round_trip);
        self.commits.rtt.observe(round_trip);
        let counters = self.metrics.counters();
        match rejected {
            None => {
                Metrics::add(&counters.upstream_acked, 1);
                self.tap(&sent.record, RelayAction::Acknowledged, None);
            }
            Some(reason) => {
                self.tap(&sent.record, RelayAction::Dropped, Some(DropReason::RejectedUpstream));
                // Resending what the upstream refused (not authorised, quota, invalid topic)
                // would block the queue forever: count, log, move on.
                Metrics::add(&counters.upstream_rejected, 1);
                if let Some(folded) = self.logs.reject.ready(now) {
                    warn!(message = "the upstream refused an event (MQTT 5 PUBACK reason); it is discarded, check the upstream's ACLs and quotas", %reason, similar_since_last_log = folded, rejected_total = Metrics::get(&counters.upstream_rejected));
                }
            }
        }
        self.on_acked(key, now);
    }

    /// The connection is gone: everything unacknowledged is sent again from the buffer, in
    /// order, on the next one. If the upstream closed it right after an isolated suspect, that
    /// is a strike against the suspect (see the module docs).
    pub fn on_link_lost(&mut self, loss: LinkLoss, reason: &str, now: Instant) {
        let Some(conn) = self.conn.take() else { return };
        if loss == LinkLoss::PeerClosed {
            self.blame(&conn, reason, now);
        }
        for sent in conn.session.in_flight() {
            let lane = &mut self.lanes[usize::from(sent.record.priority)];
            lane.cursor = lane.cursor.min(sent.record.seq);
        }
        self.rewind_all();
    }

    /// Forgets what was read ahead: sending resumes at each lane's cursor, from the file.
    pub(super) fn rewind_all(&mut self) {
        for (p, lane) in self.lanes.iter_mut().enumerate() {
            lane.prefetched.clear();
            lane.read_from = None;
            lane.disk_unread = self.commits.disk[p].events > 0 || lane.reading;
        }
    }

    /// The send window of the current connection: one publish while isolating the suspect,
    /// none before the upstream proved the connection working.
    pub(super) fn window(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| match (c.isolating, c.session.answered()) {
            (true, true) => 1,
            (true, false) => 0,
            (false, _) => self.settings.window.min(usize::from(c.session.params().receive_max)),
        })
    }

    /// Whether the send window is full: nothing more goes upstream until PUBACKs arrive.
    pub(super) fn window_full(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.session.outstanding() >= self.window())
    }

    /// Fills the send window: encodes publishes into `out`, which the run loop writes to the
    /// socket.
    pub(super) fn pump(&mut self, commands: &mpsc::Sender<Command>, now: Instant, out: &mut BytesMut) {
        if self.pacing.rate_wait.is_some_and(|t| now < t) {
            return;
        }
        self.pacing.rate_wait = None;
        let window = self.window();
        while self.conn.as_ref().is_some_and(|c| c.session.outstanding() < window)
            && out.len() < OUT_HIGH_WATER
        {
            let Some(p) = self.next_lane(commands) else { break };
            let Some(record) = self.next_record(p, now) else { continue };
            if let Err(at) = self.pacing.take(&record, now) {
                // Not sent: rewind so it goes first once the bucket refills.
                self.lanes[p].cursor = record.seq;
                self.lanes[p].prefetched.push_front(record);
                self.pacing.rate_wait = Some(at);
                break;
            }
            self.send(p, record, now, out);
        }
    }

    /// The lane to send from next: the suspect's alone while isolating it, otherwise by
    /// weighted round robin. `None`: nothing can be sent now.
    fn next_lane(&mut self, commands: &mpsc::Sender<Command>) -> Option<usize> {
        if let Some((p, _)) = self.isolated_suspect() {
            let p = usize::from(p);
            if self.lane_ready(p, commands) {
                return Some(p);
            }
            let lane = &self.lanes[p];
            if lane.reading || lane.disk_unread {
                return None;
            }
            // Nothing left in its lane (acknowledged, expired, dropped): nothing to isolate
            // any more.
            self.end_isolation();
        }
        self.pick_lane(commands)
    }

    /// Encodes one publish into `out` and records it as in flight (QoS 1) or done (QoS 0).
    fn send(&mut self, p: usize, record: Arc<Record>, now: Instant, out: &mut BytesMut) {
        let envelope;
        let payload: &[u8] = match self.settings.event_id {
            EventIdMode::None => &record.payload,
            EventIdMode::Envelope => {
                envelope = self::envelope(&record);
                &envelope
            }
        };
        let Some(conn) = self.conn.as_mut() else { return };
        let order = conn.sent + 1;
        let message = Message {
            topic: &record.topic,
            payload,
            event_id: record.event_id,
            props: record.props.as_deref(),
            // Read only for a message expiry: most events have none, and this is the hot path.
            now_ms: if record.props.is_some() { now_ms() } else { 0 },
        };
        let encoded = conn.session.publish(out, record.qos, &message, || Sent {
            record: Arc::clone(&record),
            order,
            at: now,
        });
        if let Err(too_large) = encoded {
            // The upstream would drop the connection over it, and it would come first
            // again after every reconnect: count it as refused, like a PUBACK refusal.
            let counters = self.metrics.counters();
            Metrics::add(&counters.upstream_rejected, 1);
            self.tap(&record, RelayAction::Dropped, Some(DropReason::TooLarge));
            if let Some(folded) = self.logs.size.ready(now) {
                warn!(message = "an event is larger than the upstream accepts (its maximum packet size); it is discarded, raise the upstream's limit or lower broker.max_payload", topic = %record.topic, size = too_large.size, max = too_large.max, similar_since_last_log = folded, rejected_total = Metrics::get(&counters.upstream_rejected));
            }
            self.on_acked(record.key(), now);
            return;
        }
        let qos0 = record.qos == 0;
        if !qos0 {
            conn.sent = order;
        }
        let counters = self.metrics.counters();
        Metrics::add(&counters.upstream_sent, 1);
        let lane = &mut self.lanes[p];
        let action = if record.seq < lane.sent_high {
            Metrics::add(&counters.upstream_resent, 1);
            RelayAction::Resent
        } else {
            lane.sent_high = record.seq + 1;
            RelayAction::Sent
        };
        self.tap(&record, action, None);
        if qos0 {
            // QoS 0 routes get no PUBACK; handing the publish over is all there is.
            self.tap(&record, RelayAction::Acknowledged, None);
            self.on_acked(record.key(), now);
        }
    }

    /// Smooth weighted round robin over the lanes that can send now.
    fn pick_lane(&mut self, commands: &mpsc::Sender<Command>) -> Option<usize> {
        let mut total = 0;
        let mut best: Option<usize> = None;
        for p in 0..N_PRIORITIES {
            if !self.lane_ready(p, commands) {
                continue;
            }
            let lane = &mut self.lanes[p];
            lane.current_weight += Lane::weight(p);
            total += Lane::weight(p);
            if best.is_none_or(|b| self.lanes[b].current_weight < self.lanes[p].current_weight) {
                best = Some(p);
            }
        }
        let best = best?;
        self.lanes[best].current_weight -= total;
        Some(best)
    }

    /// Whether lane `p` has a record to send now. Starts a disk read when its read-ahead is
    /// half used up, so the send window does not wait for the disk while draining.
    fn lane_ready(&mut self, p: usize, commands: &mpsc::Sender<Command>) -> bool {
        let lane = &mut self.lanes[p];
        if lane.disk_unread && !lane.reading && lane.prefetched.len() < READ_BATCH / 2 {
            let retry_wait = self.pacing.read_retry_at.is_some_and(|t| Instant::now() < t);
            if !retry_wait {
                let from_seq = lane.prefetched.back().map_or(lane.cursor, |r| r.seq + 1);
                let command = Command::Read { priority: p as u8, from_seq, limit: READ_BATCH };
                if commands.try_send(command).is_ok() {
                    lane.reading = true;
                    lane.read_from = Some(from_seq);
                }
            }
        }
        if !lane.prefetched.is_empty() {
            return true;
        }
        if lane.disk_unread {
            return false;
        }
        lane.unsaved.range(lane.cursor..).next().is_some()
            || lane.committing.range(lane.cursor..).next().is_some()
    }

    /// The next record of lane `p` in sequence order, skipping acked and expired ones.
    fn next_record(&mut self, p: usize, now: Instant) -> Option<Arc<Record>> {
        loop {
            let lane = &mut self.lanes[p];
            let record = if let Some(r) = lane.prefetched.pop_front() {
                r
            } else if lane.disk_unread {
                return None;
            } else {
                let a = lane.unsaved.range(lane.cursor..).next().map(|(_, p)| &p.record);
                let b = lane.committing.range(lane.cursor..).next().map(|(_, p)| &p.record);
                match (a, b) {
                    (Some(a), Some(b)) => Arc::clone(if a.seq < b.seq { a } else { b }),
                    (Some(r), None) | (None, Some(r)) => Arc::clone(r),
                    (None, None) => return None,
                }
            };
            if record.seq < lane.cursor {
                continue;
            }
            lane.cursor = record.seq + 1;
            let key = record.key();
            if self.commits.is_leaving(&key) || self.isolation.quarantined.contains(&key) {
                continue;
            }
            if record.is_expired(now_ms()) {
                self.expire(&record, now);
                continue;
            }
            return Some(record);
        }
    }

    /// The route's TTL or the message expiry passed before the event could be sent: it is
    /// counted and discarded.
    fn expire(&mut self, record: &Record, now: Instant) {
        let counters = self.metrics.counters();
        Metrics::add(&counters.expired, 1);
        self.tap(record, RelayAction::Dropped, Some(DropReason::Ttl));
        if let Some(folded) = self.logs.expiry.ready(now) {
            warn!(message = "discarding events whose route TTL or MQTT 5 message expiry passed before they could be sent; if they are needed upstream, raise the route's ttl or have the sensors publish with a longer message expiry", topic = %record.topic, similar_since_last_log = folded, expired_total = Metrics::get(&counters.expired));
        }
        self.on_acked(record.key(), now);
    }

    /// A read-ahead from the file came back.
    pub(super) fn on_read(
        &mut self,
        priority: u8,
        from_seq: u64,
        result: Result<Vec<Record>, BufferError>,
        now: Instant,
    ) {
        let lane = &mut self.lanes[usize::from(priority)];
        lane.reading = false;
        let current = lane.read_from.take() == Some(from_seq);
        match result {
            // A reconnect rewound the cursor while this read ran: its records start
            // too late. Read again from the cursor.
            Ok(_) if !current => lane.disk_unread = true,
            Ok(records) => {
                if records.len() < READ_BATCH {
                    lane.disk_unread = false;
                }
                let cursor = lane.cursor;
                let last = lane.prefetched.back().map(|r| r.seq);
                lane.prefetched.extend(
                    records
                        .into_iter()
                        .filter(|r| r.seq >= cursor && last.is_none_or(|l| r.seq > l))
                        .map(Arc::new),
                );
            }
            Err(error) => {
                if let Some(folded) = self.logs.read_failed.ready(now) {
                    error!(message = "reading the buffer failed; retrying every second", %error, similar_since_last_log = folded);
                }
                self.pacing.read_retry_at = Some(now + Duration::from_secs(1));
            }
        }
    }
}

/// Wraps the payload with its event id so upstream consumers can drop resends.
fn envelope(record: &Record) -> Vec<u8> {
    let payload = match serde_json::from_slice::<serde_json::Value>(&record.payload) {
        Ok(value) => value,
        Err(_) => match std::str::from_utf8(&record.payload) {
            Ok(s) => serde_json::Value::String(s.to_owned()),
            Err(_) => serde_json::Value::String(hex::encode(&record.payload)),
        },
    };
    let body = serde_json::json!({
        "id": format_event_id(record.event_id),
        "ts": record.enqueued_ms,
        "payload": payload,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}
