//! Stage 3: the relay — store-and-forward between the routes and the upstream connection.
//!
//! The relay owns every buffered event's state. It forwards an event upstream as soon as it is
//! accepted **and** schedules it for the disk; whichever finishes first decides:
//! - upstream PUBACK before the event was due for a commit → it is never written (no flash
//!   wear, no fsync on the latency path);
//! - the event waited `commit_interval` without a PUBACK (or `commit_max_events` are waiting)
//!   → it is committed, and deleted from the file once the PUBACK arrives.
//!
//! The buffer file is the source of truth for everything older than the commit window: after a
//! reconnect or a restart the relay resends from it, in order.
//!
//! # Invariants
//! - An event is removed from the buffer only after the upstream acknowledged it, its TTL
//!   passed, or the overflow policy dropped it; each is counted.
//! - **Crash window:** at most `2 × commit_max_events` accepted events are in memory and not
//!   on disk (one batch being written, at most one batch filling), and none of them has been
//!   waiting longer than `commit_interval` plus one fsync. When both batches are full, the
//!   relay stops taking input; the bounded channels before it (2 × 1024 events) then fill and
//!   ingest stops reading the broker link.
//! - All on-disk records have lower sequence numbers than all in-memory ones of the same
//!   priority, because a commit always takes *every* unsaved event.
//! - Per priority, events are sent in sequence order; after a reconnect, sending restarts at
//!   the oldest unacknowledged event. Priorities share the link by smooth weighted round robin
//!   (weight `10 − priority`): urgent events go first, but no priority starves.
//! - Packet ids are the relay's, per connection: a lost connection takes its packet ids with it
//!   and everything it had in flight is sent again (see [`crate::uplink`]).
//! - **No single event stalls the link.** An upstream that refuses an event by closing the
//!   connection would get it first again after every reconnect. After the upstream closed a
//!   connection (EOF, reset, DISCONNECT) with QoS 1 publishes unacknowledged, the next
//!   connections *isolate* the first of them written (the suspect): a PINGREQ first, and only
//!   once its PINGRESP proved the connection working, the suspect alone, nothing after it until
//!   its PUBACK. A strike is counted when such a connection is then closed by the upstream
//!   within [`POISON_CLOSE_WITHIN`] of the suspect being written, with no PUBACK for it.
//!   `upstream.poison_after` strikes in a row for the same event, and it is written to the
//!   dead-letter store (fdatasync'd), then deleted from the buffer like an acknowledged one,
//!   counted `upstream_poison`. A PUBACK for the suspect ends the isolation and clears its
//!   strikes; a loss we caused (keepalive verdict, a garbled packet) neither adds nor clears.
//!   Every other event keeps at-least-once: only the blamed event leaves the buffer without a
//!   PUBACK, and it leaves only once its letter is on disk.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::ack::Ticket;
use crate::buffer::worker::{Command, Reply, Worker};
use crate::buffer::{Batch, DropRequest, Key, LaneStats, N_PRIORITIES, Record};
use crate::config::{BufferConfig, EventIdMode, OverflowPolicy, UpstreamConfig};
use crate::deadletter::{DeadLetter, DurableLetter};
use crate::event::{IdGen, Outbound, escape_topic, format_event_id, now_ms};
use crate::metrics::Metrics;
use crate::telemetry::LogThrottle;
use crate::uplink::{Incoming, Link, LinkParams, encode_pingreq, encode_publish, parse_incoming};

/// Acked events still in the file are deleted at least this often; after a crash, at most this
/// much acknowledged traffic is sent again (as duplicates the event id lets consumers drop).
const DELETE_INTERVAL: Duration = Duration::from_secs(1);
/// How many records one disk read fetches for the send window.
const READ_BATCH: usize = 1024;
/// Encoding stops while this much is waiting for the socket. The send window bounds QoS 1
/// publishes, but not QoS 0 ones (no PUBACK) nor a window of large payloads; this bounds the
/// memory and what a lost connection takes with it.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// How many input events are taken per wake-up, to amortise the loop's overhead.
const ACCEPT_BATCH: usize = 256;
/// A close counts against the isolated suspect only this soon after it was written. Brokers
/// close over a packet they refuse at once (mosquitto: within milliseconds); a cluster that
/// holds a publish while it elects a leader and then drops the connection (NATS: ~4 s,
/// FIELD-NOTES) is not refusing the event.
pub const POISON_CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// The relay's settings, derived from the config once.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub window: usize,
    pub commit_interval: Duration,
    pub commit_max_events: usize,
    pub max_events: u64,
    pub max_bytes: u64,
    pub overflow: OverflowPolicy,
    pub event_id: EventIdMode,
    pub max_events_per_sec: Option<u32>,
    pub max_bytes_per_sec: Option<u64>,
    /// How long, after input closed, to wait for in-flight acks before stopping.
    pub drain_grace: Duration,
    /// Strikes in a row that move an event the upstream closes the link over to the dead letters.
    pub poison_after: u32,
}

impl RelaySettings {
    pub fn new(
        buffer: &BufferConfig,
        upstream: Option<&UpstreamConfig>,
        drain_grace: Duration,
    ) -> RelaySettings {
        RelaySettings {
            window: upstream.map_or(100, |u| usize::from(u.inflight)),
            commit_interval: buffer.commit_interval,
            commit_max_events: buffer.commit_max_events.get(),
            max_events: buffer.max_events,
            max_bytes: buffer.max_bytes.as_u64(),
            overflow: buffer.overflow,
            event_id: upstream.map_or(EventIdMode::None, |u| u.event_id),
            max_events_per_sec: upstream.and_then(|u| u.max_events_per_sec.map(|n| n.get())),
            max_bytes_per_sec: upstream.and_then(|u| u.max_bytes_per_sec.map(|b| b.as_u64())),
            drain_grace,
            poison_after: upstream.map_or(3, |u| u.poison_after),
        }
    }
}

/// An event accepted but not yet on disk.
#[derive(Debug, Clone)]
struct Pending {
    record: Arc<Record>,
    since: Instant,
    /// The sensor's held acknowledgement: released when this is dropped — once the event is
    /// acknowledged upstream or its commit finished (or a stated policy dropped it).
    _ticket: Option<Ticket>,
}

/// Per-priority send state.
#[derive(Debug, Default)]
struct Lane {
    /// Next sequence number to send: everything below it is in flight, acked or discarded.
    cursor: u64,
    /// The file may hold records at or above `cursor` that are not in `prefetched`.
    disk_unread: bool,
    prefetched: VecDeque<Arc<Record>>,
    reading: bool,
    /// Where the outstanding read started; `None` once a reconnect made it stale.
    read_from: Option<u64>,
    /// Smooth weighted round robin state.
    current_weight: i64,
    /// Highest sequence ever sent, to count resends.
    sent_high: u64,
    /// Accepted, not acked, not on disk, not being committed.
    unsaved: BTreeMap<u64, Pending>,
    /// Handed to the store thread in the commit now running.
    committing: BTreeMap<u64, Pending>,
}

impl Lane {
    fn weight(priority: usize) -> i64 {
        (N_PRIORITIES - priority) as i64
    }
}

/// Why a connection ended, as far as blaming an event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLoss {
    /// The upstream ended it: EOF, a reset, a failed write, or its DISCONNECT.
    PeerClosed,
    /// We ended it: keepalive verdict, a garbled packet, a newer connection, shutdown.
    Local,
}

/// A QoS 1 publish encoded on this connection and awaiting its PUBACK.
#[derive(Debug)]
struct Sent {
    record: Arc<Record>,
    /// Position in the connection's publishes, to find the first one written.
    order: u64,
    at: Instant,
}

/// The relay's view of the live upstream connection (the socket itself is in [`run`]).
#[derive(Debug)]
struct Conn {
    params: LinkParams,
    /// Encoded and awaiting their PUBACK, by packet id.
    inflight: HashMap<u16, Sent>,
    next_pkid: u16,
    sent: u64,
    /// This connection isolates the suspect (see the module docs).
    isolating: bool,
    /// The upstream answered something (a PINGRESP or a PUBACK) on this connection.
    answered: bool,
}

impl Conn {
    fn outstanding(&self) -> usize {
        self.inflight.len()
    }

    /// The first publish written on this connection that is still unacknowledged.
    fn first_unacked(&self) -> Option<&Sent> {
        self.inflight.values().min_by_key(|s| s.order)
    }

    /// The next packet id not awaiting a PUBACK. One exists: fewer than 65,535 are in flight.
    fn next_free_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid % u16::MAX + 1;
            if !self.inflight.contains_key(&pkid) {
                return pkid;
            }
        }
    }
}

/// A token bucket for one limit.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        Bucket { rate, tokens: rate, at: Instant::now() }
    }

    /// Takes `n` tokens, or says when enough will be there. A single item larger than the
    /// bucket may pass once the bucket is full, so huge events cannot block the link forever.
    fn take(&mut self, n: f64, now: Instant) -> Result<(), Instant> {
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

/// The relay's whole state. Owned by one task; nothing in it is shared.
pub struct Relay {
    settings: RelaySettings,
    metrics: Metrics,
    seqs: IdGen,
    lanes: [Lane; N_PRIORITIES],
    unsaved_len: usize,
    /// Events and bytes held in memory only (unsaved and committing).
    mem: LaneStats,
    commit_running: bool,
    commit_retry_at: Option<Instant>,
    commit_failures_in_row: u32,
    /// Acked while their commit ran: on disk once it finishes, then to be deleted.
    acked_while_committing: HashSet<Key>,
    /// Acked or expired records that are on disk and not yet deleted.
    to_delete: HashSet<Key>,
    to_delete_since: Option<Instant>,
    /// Deletes in the commit now running.
    deleting: HashSet<Key>,
    pending_drop: DropRequest,
    dropping: DropRequest,
    /// Stored per priority, as of the last commit.
    disk: [LaneStats; N_PRIORITIES],
    conn: Option<Conn>,
    event_bucket: Option<Bucket>,
    byte_bucket: Option<Bucket>,
    rate_wait: Option<Instant>,
    read_retry_at: Option<Instant>,
    overflow_log: LogThrottle,
    expiry_log: LogThrottle,
    reject_log: LogThrottle,
    size_log: LogThrottle,
    /// The event the next connections isolate (see the module docs).
    suspect: Option<Key>,
    /// Consecutive strikes against one event.
    strikes: Option<(Key, u32)>,
    /// Blamed events whose letters are being written: never sent, still in the buffer.
    quarantined: HashSet<Key>,
    /// Letters for [`run`] to hand to the dead-letter writer.
    poisoned: Vec<(Key, DeadLetter)>,
    poison_log: LogThrottle,
}

impl Relay {
    pub fn new(
        settings: RelaySettings,
        metrics: Metrics,
        seqs: IdGen,
        disk: [LaneStats; N_PRIORITIES],
    ) -> Relay {
        let mut lanes: [Lane; N_PRIORITIES] = Default::default();
        for (p, lane) in lanes.iter_mut().enumerate() {
            lane.disk_unread = disk[p].events > 0;
        }
        Relay {
            event_bucket: settings.max_events_per_sec.map(|r| Bucket::new(f64::from(r))),
            byte_bucket: settings.max_bytes_per_sec.map(|r| Bucket::new(r as f64)),
            settings,
            metrics,
            seqs,
            lanes,
            unsaved_len: 0,
            mem: LaneStats::default(),
            commit_running: false,
            commit_retry_at: None,
            commit_failures_in_row: 0,
            acked_while_committing: HashSet::new(),
            to_delete: HashSet::new(),
            to_delete_since: None,
            deleting: HashSet::new(),
            pending_drop: DropRequest::default(),
            dropping: DropRequest::default(),
            disk,
            conn: None,
            rate_wait: None,
            read_retry_at: None,
            overflow_log: LogThrottle::default(),
            expiry_log: LogThrottle::default(),
            reject_log: LogThrottle::default(),
            size_log: LogThrottle::default(),
            suspect: None,
            strikes: None,
            quarantined: HashSet::new(),
            poisoned: Vec::new(),
            poison_log: LogThrottle::default(),
        }
    }

    /// Events stored or pending, as counted against the capacity limits.
    fn stored(&self) -> LaneStats {
        let mut total = self.mem;
        for lane in &self.disk {
            total.events += lane.events;
            total.bytes += lane.bytes;
        }
        let gone = (self.to_delete.len() + self.deleting.len()) as u64
            + self.pending_drop.events
            + self.dropping.events;
        total.events = total.events.saturating_sub(gone);
        total.bytes = total.bytes.saturating_sub(self.pending_drop.bytes + self.dropping.bytes);
        total
    }

    fn can_accept(&self) -> bool {
        self.unsaved_len < self.settings.commit_max_events
    }

    /// Takes one routed event into the buffer.
    pub fn accept(&mut self, mut outbound: Outbound, now: Instant) {
        let metrics = self.metrics.clone();
        let counters = metrics.counters();
        let ticket = outbound.ticket.take();
        let record = Record {
            priority: outbound.priority.min(N_PRIORITIES as u8 - 1),
            seq: self.seqs.next_id(),
            event_id: outbound.event_id,
            enqueued_ms: now_ms(),
            expires_ms: outbound.expires_ms,
            topic: outbound.topic,
            qos: outbound.qos,
            payload: outbound.payload,
        };
        let size = record.size();
        let stored = self.stored();
        let over_events = (stored.events + 1).saturating_sub(self.settings.max_events);
        let over_bytes = (stored.bytes + size).saturating_sub(self.settings.max_bytes);
        if over_events > 0 || over_bytes > 0 {
            match self.settings.overflow {
                OverflowPolicy::RejectNew => {
                    if let Some(ticket) = &ticket {
                        ticket.reject();
                    }
                    Metrics::add(&counters.rejected_full, 1);
                    if let Some(folded) = self.overflow_log.ready(now) {
                        warn!(
                            message = "buffer full: refusing new events (overflow = reject_new); raise buffer.max_events/max_bytes or restore the uplink",
                            stored_events = stored.events,
                            stored_bytes = stored.bytes,
                            similar_since_last_log = folded,
                            rejected_total = Metrics::get(&counters.rejected_full)
                        );
                    }
                    return;
                }
                OverflowPolicy::DropOldest => self.make_room(over_events, over_bytes, now),
            }
        }
        Metrics::add(&counters.accepted, 1);
        self.mem.events += 1;
        self.mem.bytes += size;
        let lane = &mut self.lanes[usize::from(record.priority)];
        lane.unsaved.insert(record.seq, Pending { record: Arc::new(record), since: now, _ticket: ticket });
        self.unsaved_len += 1;
    }

    /// Frees space for the overflow policy: oldest records of the least urgent priority go
    /// first. Records on disk are dropped by the next commit; otherwise unsaved ones now.
    fn make_room(&mut self, mut events: u64, mut bytes: u64, now: Instant) {
        let metrics = self.metrics.clone();
        let counters = metrics.counters();
        let disk_live: u64 = self.disk.iter().map(|l| l.events).sum::<u64>().saturating_sub(
            (self.to_delete.len() + self.deleting.len()) as u64
                + self.pending_drop.events
                + self.dropping.events,
        );
        if disk_live > 0 {
            self.pending_drop.events += events;
            self.pending_drop.bytes += bytes;
            return;
        }
        for p in (0..N_PRIORITIES).rev() {
            while events > 0 || bytes > 0 {
                let Some((_, pending)) = self.lanes[p].unsaved.pop_first() else { break };
                self.forget_unsaved(&pending);
                events = events.saturating_sub(1);
                bytes = bytes.saturating_sub(pending.record.size());
                Metrics::add(&counters.dropped_overflow, 1);
            }
        }
        if let Some(folded) = self.overflow_log.ready(now) {
            warn!(
                message = "buffer full: dropping the oldest events (overflow = drop_oldest); raise buffer.max_events/max_bytes or restore the uplink",
                similar_since_last_log = folded,
                dropped_total = Metrics::get(&counters.dropped_overflow)
            );
        }
    }

    fn forget_unsaved(&mut self, pending: &Pending) {
        self.unsaved_len -= 1;
        self.mem.events -= 1;
        self.mem.bytes -= pending.record.size();
    }

    fn on_acked(&mut self, key: Key, now: Instant) {
        let (p, seq) = (usize::from(key.0), key.1);
        let lane = &mut self.lanes[p];
        if let Some(pending) = lane.unsaved.remove(&seq) {
            self.forget_unsaved(&pending);
            Metrics::add(&self.metrics.counters().acked_before_commit, 1);
        } else if lane.committing.contains_key(&seq) {
            self.acked_while_committing.insert(key);
        } else {
            self.to_delete.insert(key);
            self.to_delete_since.get_or_insert(now);
        }
    }

    /// A new upstream connection: sending starts from the oldest unacknowledged event.
    pub fn on_connected(&mut self, generation: u64, params: LinkParams) {
        let stored = self.stored();
        info!(
            message = "relay resuming from the buffer",
            generation,
            buffered_events = stored.events,
            buffered_bytes = stored.bytes
        );
        self.conn = Some(Conn {
            params,
            inflight: HashMap::new(),
            next_pkid: 1,
            sent: 0,
            isolating: self.suspect.is_some(),
            answered: false,
        });
    }

    /// Whether the new connection must prove itself with a PINGREQ before the suspect is sent.
    pub fn wants_probe(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.isolating)
    }

    /// A PINGRESP: the connection works.
    pub fn on_pingresp(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.answered = true;
        }
    }

    /// A PUBACK from the upstream.
    pub fn on_puback(&mut self, pkid: u16, rejected: Option<String>, now: Instant) {
        let metrics = self.metrics.clone();
        let counters = metrics.counters();
        let Some(conn) = self.conn.as_mut() else { return };
        let Some(sent) = conn.inflight.remove(&pkid) else { return };
        conn.answered = true;
        let key = sent.record.key();
        if conn.isolating || self.strikes.is_some_and(|(k, _)| k == key) {
            // The isolated publish (the suspect, or what replaced it at the head of its lane)
            // went through: whatever closed the link before, it was not this.
            conn.isolating = false;
            self.suspect = None;
            self.strikes = None;
        }
        match rejected {
            None => Metrics::add(&counters.upstream_acked, 1),
            Some(reason) => {
                // Resending what the upstream refused (not authorised, quota, invalid topic)
                // would block the queue forever: count, log, move on.
                Metrics::add(&counters.upstream_rejected, 1);
                if let Some(folded) = self.reject_log.ready(now) {
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
            if let Some(first) = conn.first_unacked() {
                let key = first.record.key();
                let blamed = conn.isolating
                    && conn.answered
                    && conn.inflight.len() == 1
                    && now.saturating_duration_since(first.at) <= POISON_CLOSE_WITHIN;
                if blamed {
                    self.strike(&first.record, reason, now);
                }
                if !self.quarantined.contains(&key) {
                    self.suspect = Some(key);
                }
            }
        }
        for sent in conn.inflight.values() {
            let lane = &mut self.lanes[usize::from(sent.record.priority)];
            lane.cursor = lane.cursor.min(sent.record.seq);
        }
        self.rewind_all();
    }

    /// Forgets what was read ahead: sending resumes at each lane's cursor, from the file.
    fn rewind_all(&mut self) {
        for (p, lane) in self.lanes.iter_mut().enumerate() {
            lane.prefetched.clear();
            lane.read_from = None;
            lane.disk_unread = self.disk[p].events > 0 || lane.reading;
        }
    }

    /// One more close right after `record`; at `poison_after` in a row it is quarantined and
    /// its letter queued for the dead-letter store.
    fn strike(&mut self, record: &Arc<Record>, reason: &str, now: Instant) {
        let key = record.key();
        let n = match self.strikes {
            Some((k, n)) if k == key => n + 1,
            _ => 1,
        };
        if n < self.settings.poison_after {
            self.strikes = Some((key, n));
            return;
        }
        self.strikes = None;
        self.suspect = None;
        self.quarantined.insert(key);
        if let Some(folded) = self.poison_log.ready(now) {
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
        self.poisoned.push((
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
        std::mem::take(&mut self.poisoned)
    }

    /// The dead-letter writer's answer for a blamed event. Written: the event leaves the buffer
    /// like an acknowledged one. Not written: it is sent again (and blamed again if it must).
    pub fn on_dead_lettered(&mut self, key: Key, result: Result<(), String>, now: Instant) {
        if !self.quarantined.remove(&key) {
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
            let retry_wait = self.read_retry_at.is_some_and(|t| Instant::now() < t);
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
            if self.to_delete.contains(&key)
                || self.deleting.contains(&key)
                || self.acked_while_committing.contains(&key)
                || self.quarantined.contains(&key)
            {
                continue;
            }
            if record.is_expired(now_ms()) {
                let metrics = self.metrics.clone();
                let counters = metrics.counters();
                Metrics::add(&counters.expired, 1);
                if let Some(folded) = self.expiry_log.ready(now) {
                    warn!(message = "discarding events whose route TTL passed before they could be sent", topic = %record.topic, similar_since_last_log = folded, expired_total = Metrics::get(&counters.expired));
                }
                self.on_acked(key, now);
                continue;
            }
            return Some(record);
        }
    }

    /// The send window of the current connection: one publish while isolating the suspect,
    /// none before the upstream proved the connection working.
    fn window(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| match (c.isolating, c.answered) {
            (true, true) => 1,
            (true, false) => 0,
            (false, _) => self.settings.window.min(usize::from(c.params.receive_max)),
        })
    }

    /// Fills the send window: encodes publishes into `out`, which [`run`] writes to the socket.
    fn pump(&mut self, commands: &mpsc::Sender<Command>, now: Instant, out: &mut BytesMut) {
        if self.rate_wait.is_some_and(|t| now < t) {
            return;
        }
        self.rate_wait = None;
        let metrics = self.metrics.clone();
        let counters = metrics.counters();
        let window = self.window();
        while self.conn.as_ref().is_some_and(|c| c.outstanding() < window) && out.len() < OUT_HIGH_WATER {
            let isolated = self.suspect.filter(|_| self.conn.as_ref().is_some_and(|c| c.isolating));
            let p = match isolated {
                Some((p, _)) => {
                    let p = usize::from(p);
                    if !self.lane_ready(p, commands) {
                        let lane = &self.lanes[p];
                        if lane.reading || lane.disk_unread {
                            break;
                        }
                        // Nothing left in its lane (acknowledged, expired, dropped): nothing
                        // to isolate any more.
                        self.suspect = None;
                        if let Some(c) = self.conn.as_mut() {
                            c.isolating = false;
                        }
                        continue;
                    }
                    p
                }
                None => match self.pick_lane(commands) {
                    Some(p) => p,
                    None => break,
                },
            };
            let Some(record) = self.next_record(p, now) else { continue };
            if let Err(at) = self.rate_limit(&record, now) {
                // Not sent: rewind so it goes first once the bucket refills.
                self.lanes[p].cursor = record.seq;
                self.lanes[p].prefetched.push_front(record);
                self.rate_wait = Some(at);
                break;
            }
            let envelope;
            let payload: &[u8] = match self.settings.event_id {
                EventIdMode::None => &record.payload,
                EventIdMode::Envelope => {
                    envelope = self::envelope(&record);
                    &envelope
                }
            };
            let Some(conn) = self.conn.as_mut() else { break };
            let pkid = if record.qos == 0 { 0 } else { conn.next_free_pkid() };
            let encoded =
                encode_publish(out, &conn.params, &record.topic, record.qos, pkid, payload, record.event_id);
            if let Err(too_large) = encoded {
                // The upstream would drop the connection over it, and it would come first
                // again after every reconnect: count it as refused, like a PUBACK refusal.
                Metrics::add(&counters.upstream_rejected, 1);
                if let Some(folded) = self.size_log.ready(now) {
                    warn!(message = "an event is larger than the upstream accepts (its maximum packet size); it is discarded, raise the upstream's limit or lower broker.max_payload", topic = %record.topic, size = too_large.size, max = too_large.max, similar_since_last_log = folded, rejected_total = Metrics::get(&counters.upstream_rejected));
                }
                self.on_acked(record.key(), now);
                continue;
            }
            if record.qos == 0 {
                // QoS 0 routes get no PUBACK; handing the publish over is all there is.
                self.on_acked(record.key(), now);
            } else {
                conn.sent += 1;
                let order = conn.sent;
                conn.inflight.insert(pkid, Sent { record: Arc::clone(&record), order, at: now });
            }
            Metrics::add(&counters.upstream_sent, 1);
            let lane = &mut self.lanes[p];
            if record.seq < lane.sent_high {
                Metrics::add(&counters.upstream_resent, 1);
            } else {
                lane.sent_high = record.seq + 1;
            }
        }
    }

    fn rate_limit(&mut self, record: &Record, now: Instant) -> Result<(), Instant> {
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

    fn oldest_unsaved(&self) -> Option<Instant> {
        self.lanes.iter().filter_map(|l| l.unsaved.first_key_value().map(|(_, p)| p.since)).min()
    }

    /// Starts a commit when one is due and none is running.
    fn maybe_commit(&mut self, commands: &mpsc::Sender<Command>, force: bool, now: Instant) {
        if self.commit_running || self.commit_retry_at.is_some_and(|t| now < t) {
            return;
        }
        let interval = self.settings.commit_interval;
        let max = self.settings.commit_max_events;
        let due = self.unsaved_len >= max
            || self.oldest_unsaved().is_some_and(|t| now.duration_since(t) >= interval)
            || self.to_delete.len() >= max
            || self.to_delete_since.is_some_and(|t| now.duration_since(t) >= DELETE_INTERVAL)
            || self.pending_drop != DropRequest::default()
            || (force && (self.unsaved_len > 0 || !self.to_delete.is_empty()));
        if !due {
            return;
        }
        // What to write. Everything when forced, full, or with no upstream connection (nothing
        // can be acknowledged, so waiting saves no write). Otherwise everything older than a
        // quarter of the interval: events that young are likely to have their PUBACK on the
        // way. Taking more than just the events that are due keeps batches at about
        // rate × interval; taking only the due ones made every commit start right after the
        // previous one, with a batch of rate × fsync time (measured: 16× the payload written).
        // Either way a commit takes a sequence prefix of each lane, which keeps every on-disk
        // record older than every in-memory one.
        let take_all = force || self.unsaved_len >= max || self.conn.is_none();
        let young = interval / 4;
        let mut batch = Batch::default();
        for lane in &mut self.lanes {
            let due = if take_all {
                std::mem::take(&mut lane.unsaved)
            } else {
                let first_young = lane
                    .unsaved
                    .iter()
                    .find(|(_, p)| now.duration_since(p.since) < young)
                    .map(|(seq, _)| *seq);
                match first_young {
                    Some(seq) => {
                        let young = lane.unsaved.split_off(&seq);
                        std::mem::replace(&mut lane.unsaved, young)
                    }
                    None => std::mem::take(&mut lane.unsaved),
                }
            };
            self.unsaved_len -= due.len();
            batch.inserts.extend(due.values().map(|p| Record::clone(&p.record)));
            lane.committing = due;
        }
        self.deleting = std::mem::take(&mut self.to_delete);
        self.to_delete_since = None;
        batch.deletes = self.deleting.iter().copied().collect();
        batch.drop_oldest = std::mem::take(&mut self.pending_drop);
        self.dropping = batch.drop_oldest;
        if batch.is_empty() {
            return;
        }
        match commands.try_send(Command::Apply(batch)) {
            Ok(()) => self.commit_running = true,
            Err(
                mpsc::error::TrySendError::Full(Command::Apply(batch))
                | mpsc::error::TrySendError::Closed(Command::Apply(batch)),
            ) => {
                self.restore(batch, now);
            }
            Err(_) => {}
        }
    }

    /// Puts a batch that could not be written back into memory, to be retried.
    fn restore(&mut self, batch: Batch, _now: Instant) {
        for lane in &mut self.lanes {
            let committing = std::mem::take(&mut lane.committing);
            self.unsaved_len += committing.len();
            lane.unsaved.extend(committing);
        }
        // Acked during the failed commit: never reached the disk, so nothing to delete.
        for key in std::mem::take(&mut self.acked_while_committing) {
            if let Some(pending) = self.lanes[usize::from(key.0)].unsaved.remove(&key.1) {
                self.forget_unsaved(&pending);
            }
        }
        self.to_delete.extend(batch.deletes);
        if !self.to_delete.is_empty() {
            self.to_delete_since.get_or_insert(Instant::now());
        }
        self.deleting.clear();
        self.pending_drop.events += batch.drop_oldest.events;
        self.pending_drop.bytes += batch.drop_oldest.bytes;
        self.dropping = DropRequest::default();
    }

    pub fn on_reply(&mut self, reply: Reply, data_dir: &std::path::Path, now: Instant) {
        let metrics = self.metrics.clone();
        let counters = metrics.counters();
        match reply {
            Reply::Applied { result: Ok(applied), inserted, took } => {
                self.commit_running = false;
                self.commit_failures_in_row = 0;
                self.commit_retry_at = None;
                Metrics::add(&counters.commits, 1);
                Metrics::add(&counters.committed, inserted as u64);
                if took > Duration::from_millis(500) {
                    warn!(message = "buffer commit was slow; the disk may be failing or overloaded", took = ?took);
                }
                self.disk = applied.lanes;
                for lane in &mut self.lanes {
                    let committing = std::mem::take(&mut lane.committing);
                    if committing.range(lane.cursor..).next().is_some() {
                        lane.disk_unread = true;
                    }
                    for pending in committing.values() {
                        self.mem.events -= 1;
                        self.mem.bytes -= pending.record.size();
                    }
                }
                for key in std::mem::take(&mut self.acked_while_committing) {
                    self.to_delete.insert(key);
                    self.to_delete_since.get_or_insert(now);
                }
                self.deleting.clear();
                self.dropping = DropRequest::default();
                if !applied.dropped.is_empty() {
                    Metrics::add(&counters.dropped_overflow, applied.dropped.len() as u64);
                    let dropped: HashSet<Key> = applied.dropped.into_iter().collect();
                    for lane in &mut self.lanes {
                        lane.prefetched.retain(|r| !dropped.contains(&r.key()));
                    }
                    if let Some(folded) = self.overflow_log.ready(now) {
                        warn!(
                            message = "buffer full: dropped the oldest events (overflow = drop_oldest); raise buffer.max_events/max_bytes or restore the uplink",
                            similar_since_last_log = folded,
                            dropped_total = Metrics::get(&counters.dropped_overflow)
                        );
                    }
                }
            }
            Reply::Applied { result: Err((error, batch)), .. } => {
                self.commit_running = false;
                self.commit_failures_in_row += 1;
                Metrics::add(&counters.commit_failures, 1);
                let delay = Duration::from_millis(100 * 2u64.pow(self.commit_failures_in_row.min(6)));
                self.commit_retry_at = Some(now + delay);
                let hint = if error.is_io() {
                    format!(
                        "free disk space in {} or check the storage; events stay in memory, ingest slows once {} are waiting",
                        data_dir.display(),
                        self.settings.commit_max_events
                    )
                } else {
                    "stop outpost and move the buffer file aside if this repeats".to_owned()
                };
                error!(message = "buffer commit failed; retrying", %error, hint, retry_in = ?delay, failures_in_row = self.commit_failures_in_row);
                self.restore(batch, now);
            }
            Reply::Read { priority, from_seq, result } => {
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
                        error!(message = "reading the buffer failed; retrying in 1s", %error);
                        self.read_retry_at = Some(now + Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Forgets "not before" times that have passed. Left in place, a past one would be a
    /// deadline that is always due: the loop would spin (a rate limit hit just before the link
    /// dropped, a failed disk read).
    fn clear_elapsed_waits(&mut self, now: Instant) {
        if self.rate_wait.is_some_and(|t| t <= now) {
            self.rate_wait = None;
        }
        if self.read_retry_at.is_some_and(|t| t <= now) {
            self.read_retry_at = None;
        }
    }

    /// The next time something is due without any input.
    fn next_deadline(&self) -> Option<Instant> {
        let commit = if self.commit_running {
            None
        } else {
            let unsaved = self.oldest_unsaved().map(|t| t + self.settings.commit_interval);
            let deletes = self.to_delete_since.map(|t| t + DELETE_INTERVAL);
            let due = [unsaved, deletes].into_iter().flatten().min();
            match (due, self.commit_retry_at) {
                (Some(d), Some(r)) => Some(d.max(r)),
                (d, None) => d,
                (None, Some(_)) => None,
            }
        };
        [commit, self.rate_wait, self.read_retry_at].into_iter().flatten().min()
    }

    fn idle_for_shutdown(&self) -> bool {
        self.unsaved_len == 0
            && !self.commit_running
            && self.to_delete.is_empty()
            && self.acked_while_committing.is_empty()
            && self.conn.as_ref().is_none_or(|c| c.outstanding() == 0)
    }

    fn flushed(&self) -> bool {
        self.unsaved_len == 0 && !self.commit_running && self.lanes.iter().all(|l| l.committing.is_empty())
    }
}

/// Wraps the payload with its event id so upstream consumers can drop resends.
fn envelope(record: &Record) -> Vec<u8> {
    let payload = match serde_json::from_slice::<serde_json::Value>(&record.payload) {
        Ok(value) => value,
        Err(_) => match std::str::from_utf8(&record.payload) {
            Ok(s) => serde_json::Value::String(s.to_owned()),
            Err(_) => serde_json::Value::String(record.payload.iter().map(|b| format!("{b:02x}")).collect()),
        },
    };
    let body = serde_json::json!({
        "id": format_event_id(record.event_id),
        "ts": record.enqueued_ms,
        "payload": payload,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The socket side of the upstream connection: the relay encodes into `out`, this writes it
/// and reads what comes back.
struct LinkIo {
    link: Link,
    out: BytesMut,
    next_ping: Option<Instant>,
    ping_outstanding: bool,
}

/// Why the link cannot go on.
type Lost = (LinkLoss, String);

fn peer(reason: String) -> Lost {
    (LinkLoss::PeerClosed, reason)
}

impl LinkIo {
    /// `probe`: the relay isolates a suspect on this connection and needs a PINGRESP first.
    fn new(link: Link, now: Instant, probe: bool) -> LinkIo {
        let keepalive = link.params.keepalive;
        let mut out = BytesMut::new();
        if probe {
            encode_pingreq(&mut out);
        }
        LinkIo {
            link,
            out,
            next_ping: (!keepalive.is_zero()).then(|| now + keepalive),
            ping_outstanding: probe,
        }
    }

    /// Writes as much of `out` as the socket takes without waiting: one `send()` for
    /// everything a loop turn encoded.
    fn flush(&mut self) -> Result<(), Lost> {
        while !self.out.is_empty() {
            match self.link.stream.try_write(&self.out) {
                Ok(0) => return Err(peer("the upstream connection closed".to_owned())),
                Ok(n) => self.out.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(peer(format!("writing to the upstream failed: {e}"))),
            }
        }
        Ok(())
    }

    /// Ready once bytes arrived, or the unwritten output fell below [`OUT_HIGH_WATER`];
    /// meanwhile writes what the socket did not take before.
    /// Cancel-safe: whatever is read or written within a poll is recorded in a buffer.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Lost>> {
        let was_full = self.out.len() >= OUT_HIGH_WATER;
        while !self.out.is_empty() {
            match Pin::new(&mut self.link.stream).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(peer("the upstream connection closed".to_owned())));
                }
                Poll::Ready(Ok(n)) => self.out.advance(n),
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(peer(format!("writing to the upstream failed: {e}"))));
                }
                Poll::Pending => break,
            }
        }
        if was_full && self.out.len() < OUT_HIGH_WATER {
            // Room again: the relay may encode more.
            return Poll::Ready(Ok(()));
        }
        let inbuf = &mut self.link.inbuf;
        if inbuf.capacity() - inbuf.len() < 1024 {
            inbuf.reserve(16 * 1024);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.link.stream), cx, inbuf) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(peer("the upstream closed the connection".to_owned()))),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(peer(format!("reading from the upstream failed: {e}")))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Hands every complete packet read to the relay.
    fn deliver(&mut self, relay: &mut Relay, now: Instant) -> Result<(), Lost> {
        let version = self.link.params.version;
        while let Some(incoming) =
            parse_incoming(&mut self.link.inbuf, version).map_err(|e| (LinkLoss::Local, e))?
        {
            // Any packet proves the link alive: a PINGREQ queued behind a slow link's backlog
            // may be answered long after the acks that came before it.
            self.ping_outstanding = false;
            match incoming {
                Incoming::PubAck { pkid, rejected } => relay.on_puback(pkid, rejected, now),
                Incoming::PingResp => relay.on_pingresp(),
                Incoming::Disconnect(reason) => return Err(peer(reason)),
            }
        }
        Ok(())
    }

    /// At `next_ping`: a PINGREQ, or the verdict that the last one went unanswered. Pings go
    /// out regardless of traffic, so a silently dead (half-open) link is noticed while
    /// publishes are still being written into it.
    fn keepalive(&mut self, now: Instant) -> Result<(), Lost> {
        if self.next_ping.is_none_or(|t| now < t) {
            return Ok(());
        }
        if self.ping_outstanding {
            return Err((
                LinkLoss::Local,
                "no PINGRESP within upstream.keepalive: the link is dead".to_owned(),
            ));
        }
        encode_pingreq(&mut self.out);
        self.ping_outstanding = true;
        self.next_ping = Some(now + self.link.params.keepalive);
        Ok(())
    }

    /// Sends DISCONNECT and gives the socket a moment to take it.
    async fn close(mut self) {
        use tokio::io::AsyncWriteExt;
        self.out.extend_from_slice(&[0xE0, 0x00]);
        let _ = tokio::time::timeout(Duration::from_millis(500), self.link.stream.write_all(&self.out)).await;
        info!(message = "upstream connection closed", generation = self.link.generation);
    }
}

/// Drops the connection (the uplink task reconnects) and rewinds the relay.
fn lose(link: &mut Option<LinkIo>, relay: &mut Relay, (loss, error): Lost) {
    if let Some(io) = link.take() {
        relay.on_link_lost(loss, &error, Instant::now());
        io.link.lost(error);
    }
}

/// The first dead-letter write that finished, if any.
fn poll_letters(
    pending: &mut Vec<(Key, oneshot::Receiver<Result<(), String>>)>,
    cx: &mut Context<'_>,
) -> Poll<(Key, Result<(), String>)> {
    for i in 0..pending.len() {
        if let Poll::Ready(result) = Pin::new(&mut pending[i].1).poll(cx) {
            let (key, _) = pending.swap_remove(i);
            return Poll::Ready((
                key,
                result.unwrap_or_else(|_| Err("the dead-letter writer stopped".to_owned())),
            ));
        }
    }
    Poll::Pending
}

/// Runs the relay until its input closes and everything accepted is on disk or acknowledged
/// (or `drain_grace` passed), then closes the upstream connection and stops the uplink.
pub async fn run(
    mut relay: Relay,
    mut input: mpsc::Receiver<Outbound>,
    mut links: mpsc::Receiver<Link>,
    mut worker: Worker,
    data_dir: std::path::PathBuf,
    dead_letters: mpsc::Sender<DurableLetter>,
    uplink_cancel: tokio_util::sync::CancellationToken,
) {
    let mut letters: Vec<(Key, oneshot::Receiver<Result<(), String>>)> = Vec::new();
    let mut input_open = true;
    let mut grace_until: Option<Instant> = None;
    let mut link: Option<LinkIo> = None;
    // One timer, moved only when a deadline comes earlier than the one armed: resetting it
    // on every turn (every ack moves the commit deadline) cost a timer-wheel update per event.
    // A timer that fires early just runs one more turn.
    let mut timer = Box::pin(tokio::time::sleep_until(Instant::now()));
    let mut armed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if let (true, Some(io)) = (input_open, &mut link) {
            relay.pump(&worker.commands, now, &mut io.out);
        }
        relay.maybe_commit(&worker.commands, !input_open, now);
        // Checked every turn, not only when the timer fires: a busy input branch would
        // otherwise starve the timer branch, and with it the dead-link verdict.
        if let Some(Err(error)) = link.as_mut().map(|l| l.keepalive(now)) {
            lose(&mut link, &mut relay, error);
        }
        if let Some(Err(error)) = link.as_mut().map(LinkIo::flush) {
            lose(&mut link, &mut relay, error);
        }
        for (key, letter) in relay.take_poisoned() {
            let (written, answer) = oneshot::channel();
            match dead_letters.try_send(DurableLetter { letter, written }) {
                Ok(()) => letters.push((key, answer)),
                Err(_) => relay.on_dead_lettered(
                    key,
                    Err("the dead-letter writer is busy or stopped".to_owned()),
                    now,
                ),
            }
        }
        relay.clear_elapsed_waits(now);
        if !input_open {
            if relay.idle_for_shutdown() {
                break;
            }
            if relay.flushed() && grace_until.is_some_and(|t| now >= t) {
                warn!(
                    message = "stopping before every in-flight publish was acknowledged; they are on disk and will be resent"
                );
                break;
            }
        }
        Metrics::set(&relay.metrics.gauges().buffered_events, relay.stored().events);
        let ping = link.as_ref().and_then(|l| l.next_ping);
        // A grace period that ended while a commit still runs is waited out by the commit's
        // reply, not by a timer that is always due.
        let grace = grace_until.filter(|&t| t > now);
        let deadline = [relay.next_deadline(), grace, ping].into_iter().flatten().min();
        if let Some(d) = deadline {
            if armed.is_none_or(|a| d < a) {
                timer.as_mut().reset(d);
                armed = Some(d);
            }
        }
        let accept = input_open && relay.can_accept();
        tokio::select! {
            biased;
            Some(reply) = worker.replies.recv() => relay.on_reply(reply, &data_dir, Instant::now()),
            io = std::future::poll_fn(|cx| link.as_mut().map_or(Poll::Pending, |l| l.poll_io(cx))), if link.is_some() => {
                let delivered = io.and_then(|()| match link.as_mut() {
                    Some(l) => l.deliver(&mut relay, Instant::now()),
                    None => Ok(()),
                });
                if let Err(error) = delivered {
                    lose(&mut link, &mut relay, error);
                }
            }
            Some(new) = links.recv() => {
                lose(&mut link, &mut relay, (LinkLoss::Local, "replaced by a new connection".to_owned()));
                relay.on_connected(new.generation, new.params);
                let mut io = LinkIo::new(new, Instant::now(), relay.wants_probe());
                // The upstream may have sent more right behind its CONNACK (a DISCONNECT).
                match io.deliver(&mut relay, Instant::now()) {
                    Ok(()) => link = Some(io),
                    Err((loss, error)) => {
                        relay.on_link_lost(loss, &error, Instant::now());
                        io.link.lost(error);
                    }
                }
            }
            (key, result) = std::future::poll_fn(|cx| poll_letters(&mut letters, cx)), if !letters.is_empty() => {
                relay.on_dead_lettered(key, result, Instant::now());
            }
            received = input.recv(), if accept => match received {
                Some(outbound) => {
                    let now = Instant::now();
                    relay.accept(outbound, now);
                    for _ in 1..ACCEPT_BATCH {
                        if !relay.can_accept() {
                            break;
                        }
                        match input.try_recv() {
                            Ok(outbound) => relay.accept(outbound, now),
                            Err(_) => break,
                        }
                    }
                }
                None => {
                    input_open = false;
                    grace_until = Some(Instant::now() + relay.settings.drain_grace);
                    info!(message = "relay flushing: committing everything not yet acknowledged");
                }
            },
            // Only wakes the loop: whatever fell due is handled at the top.
            () = &mut timer, if armed.is_some() => armed = None,
        }
    }
    if let Some(io) = link.take() {
        io.close().await;
    }
    uplink_cancel.cancel();
    let stored = relay.stored();
    info!(message = "relay stopped", buffered_events = stored.events);
    // Let the store thread finish anything queued and close the file before the process
    // exits: `Gateway::shutdown` returning means the buffer file is closed.
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
}

#[cfg(test)]
mod tests;
