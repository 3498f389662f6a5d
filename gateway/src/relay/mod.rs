//! Stage 3: the relay — store-and-forward between the routes and the upstream connection.
//!
//! The relay owns every buffered event's state. It forwards an event upstream as soon as it is
//! accepted **and** schedules it for the disk; whichever finishes first decides:
//! - upstream PUBACK before the event was due for a commit → it is never written (no flash
//!   wear, no fsync on the latency path);
//! - the event waited its hold without a PUBACK (or `commit_max_events` are waiting) → it is
//!   committed, and deleted from the file once the PUBACK arrives. The hold is
//!   `commit_interval` on a fast link, follows the measured round trip on a slow one, and is
//!   `max_ack_delay` without a connection (see `commit.rs`).
//!
//! The buffer file is the source of truth for everything older than the commit window: after a
//! reconnect or a restart the relay resends from it, in order.
//!
//! # Invariants
//! - An event is removed from the buffer only after the upstream acknowledged it, its TTL
//!   passed, or the overflow policy dropped it; each is counted.
//! - **Crash window:** at most `2 × commit_max_events` accepted events are in memory and not
//!   on disk (one batch being written, at most one batch filling), and none of them has been
//!   waiting longer than `max_ack_delay` plus one fsync. When both batches are full, the
//!   relay stops taking input; the bounded channels before it (2 × 1024 events) then fill and
//!   ingest stops reading the broker link.
//! - All on-disk records have lower sequence numbers than all in-memory ones of the same
//!   priority, because a commit always takes a sequence prefix of each priority's unsaved
//!   events (all of them, or all but the youngest).
//! - Per priority, events are sent in sequence order; after a reconnect, sending restarts at
//!   the oldest unacknowledged event. Priorities share the link by smooth weighted round robin
//!   (weight `10 − priority`): urgent events go first, but no priority starves.
//! - Packet ids belong to the connection's session, which the relay owns: a lost connection
//!   takes its packet ids with it and everything it had in flight is sent again (see
//!   [`crate::uplink::session`]).
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
//!
//! # Layout
//! The relay is policy only; [`crate::uplink`] holds the socket and the protocol session, and
//! the relay task drives both. One job per file, each an `impl Relay` over the part it owns:
//! - `admission.rs` — taking an `Outbound` in: capacity limits and the overflow policy, and
//!   the dead letters of refused copies no sensor would resend.
//! - `commit.rs` — `Commits`: what is in memory, being written, on disk or to delete; when
//!   to commit (window, group commit, retries) and what a commit's reply changes.
//! - `lanes.rs` — the send side: per-priority `Lane`s, weighted round robin, rate limits,
//!   TTL at send time, reading back from the file, resending after a reconnect.
//! - `poison.rs` — `Isolation`: the suspect, its strikes and the dead letters.
//! - `run.rs` — the task: one loop that selects and dispatches.

mod admission;
mod commit;
mod lanes;
mod poison;
mod run;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::ack::Ticket;
use crate::buffer::{LaneStats, N_PRIORITIES, Record};
use crate::config::{BufferConfig, EventIdMode, OverflowPolicy, UpstreamConfig};
use crate::event::IdGen;
use crate::metrics::Metrics;
use crate::tap::{DropReason, RelayAction, Tap, TapRecord, TapStage, What};
use crate::telemetry::{Episode, LogThrottle};

use commit::Commits;
use lanes::{Conn, Lane, Pacing};
use poison::Isolation;
pub use poison::POISON_CLOSE_WITHIN;
pub use run::run;

/// The relay's settings, derived from the config once.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub window: usize,
    pub commit_interval: Duration,
    /// The longest an unsaved event waits for its PUBACK before it is committed.
    pub max_ack_delay: Duration,
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
            max_ack_delay: buffer.max_ack_delay(),
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

/// Warnings that could repeat per event or per retry, each logged when it starts and then at
/// the reminder cadence (`telemetry`'s "Log cadence").
#[derive(Debug, Default)]
struct Logs {
    overflow: LogThrottle,
    expiry: LogThrottle,
    reject: LogThrottle,
    size: LogThrottle,
    poison: LogThrottle,
    slow_commit: LogThrottle,
    read_failed: LogThrottle,
    /// Commits failing (a full disk): retried with backoff until one succeeds.
    commits_failing: Episode,
}

/// The relay's whole state. Owned by one task; nothing in it is shared.
pub struct Relay {
    settings: RelaySettings,
    metrics: Metrics,
    /// Sequence numbers for accepted events.
    seqs: IdGen,
    /// Per priority: the events held in memory and where sending stands.
    lanes: [Lane; N_PRIORITIES],
    /// The books (memory, committing, disk, deletes, drops) and the commit schedule.
    commits: Commits,
    /// The live upstream connection's session and its policy state.
    conn: Option<Conn>,
    /// Rate limits and "not before" times for sending and reading.
    pacing: Pacing,
    /// The poison rule's state (see the module docs).
    isolation: Isolation,
    /// Refused copies no sensor would resend, on their way to the dead-letter file.
    refused: admission::Refused,
    logs: Logs,
    /// Where `outpost tap` sees events accepted, sent, acknowledged, committed and dropped.
    tap: Tap,
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
        let metrics_for_tap = metrics.clone();
        Relay {
            pacing: Pacing::new(&settings),
            settings,
            metrics,
            seqs,
            lanes,
            commits: Commits::new(disk),
            conn: None,
            isolation: Isolation::default(),
            refused: admission::Refused::default(),
            logs: Logs::default(),
            tap: Tap::new(metrics_for_tap),
        }
    }

    /// Publishes what happens to events into `tap` (the gateway's hub).
    pub fn with_tap(mut self, tap: Tap) -> Relay {
        self.tap = tap;
        self
    }

    /// Tells the tap's relay viewers, if any, what happened to `record`.
    fn tap(&self, record: &Record, action: RelayAction, reason: Option<DropReason>) {
        if self.tap.wants(TapStage::Relay) {
            let what = What::Relay { topic: record.topic.clone(), action, reason, priority: record.priority };
            self.tap.publish(TapRecord::new(record.event_id, what));
        }
    }

    /// Events stored or pending, as counted against the capacity limits.
    fn stored(&self) -> LaneStats {
        self.commits.stored()
    }

    /// Nothing is left to do before stopping: everything accepted is on disk or acknowledged.
    fn idle_for_shutdown(&self) -> bool {
        self.commits.idle() && self.conn.as_ref().is_none_or(|c| c.session.outstanding() == 0)
    }

    /// Everything accepted is on disk: stopping now loses nothing.
    fn flushed(&self) -> bool {
        self.commits.flushed() && self.lanes.iter().all(|l| l.committing.is_empty())
    }

    /// The next time something is due without any input.
    fn next_deadline(&self) -> Option<Instant> {
        let commit = self.next_commit_deadline();
        [commit, self.pacing.rate_wait, self.pacing.read_retry_at].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests;
