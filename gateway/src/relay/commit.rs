//! The commit scheduler: the books of where every accepted event is (in memory, being
//! written, on disk, acknowledged and to be deleted, to be dropped), when to commit, and what
//! a commit's reply changes.
//!
//! # When an event is committed
//! An unsaved event falls due once it has waited its *hold* ([`hold`]) without an upstream
//! PUBACK: `commit_interval` on a fast link, `commit_interval + 2 × smoothed RTT` on a slow one,
//! never more than `max_ack_delay`, and `max_ack_delay` while there is no connection (nothing
//! can be acknowledged, so the wait only makes the commit larger). Measured at 2k events/s over
//! a 50 ms round trip, a fixed 25 ms made every event outlive it: ~50 events to a commit, 12.7×
//! the payload written (README "Flash wear on a slow uplink").
//!
//! # Invariants
//! - An unsaved event is never held longer than `max_ack_delay` before its commit starts.
//! - At most one commit runs at a time; a failed one is put back whole and retried with
//!   exponential backoff.
//! - A commit takes a sequence prefix of each lane's unsaved events, so every on-disk record is
//!   older than every in-memory one of the same priority.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{Lane, Pending, Relay};
use crate::buffer::store::Applied;
use crate::buffer::worker::{Command, Reply};
use crate::buffer::{Batch, BufferError, DropRequest, Key, LaneStats, N_PRIORITIES, Record};
use crate::metrics::Metrics;
use crate::telemetry::{Failure, readable};

/// Acked events still in the file are deleted at least this often; after a crash, at most this
/// much acknowledged traffic is sent again (as duplicates the event id lets consumers drop).
const DELETE_INTERVAL: Duration = Duration::from_secs(1);

/// How many smoothed round trips (on top of `commit_interval`) an event waits for its PUBACK
/// on a connected link: one for the PUBACK itself, one for jitter and the wait to be sent.
const RTT_FACTOR: u32 = 2;

/// How long an unsaved event waits for its upstream PUBACK before it is due for a commit.
/// `max_ack_delay` ≥ `commit_interval` (checked with the config).
pub(super) fn hold(
    commit_interval: Duration,
    max_ack_delay: Duration,
    connected: bool,
    srtt: Option<Duration>,
) -> Duration {
    match (connected, srtt) {
        (false, _) => max_ack_delay,
        (true, None) => commit_interval,
        (true, Some(rtt)) => (commit_interval + rtt * RTT_FACTOR).min(max_ack_delay).max(commit_interval),
    }
}

/// The smoothed upstream round trip (publish written → PUBACK read), weighted 1/8 per sample
/// as TCP's SRTT: a few dozen acks follow a change of link, one slow ack does not.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Rtt {
    srtt: Option<Duration>,
}

impl Rtt {
    pub(super) fn observe(&mut self, sample: Duration) {
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(srtt) if sample >= srtt => srtt + (sample - srtt) / 8,
            Some(srtt) => srtt - (srtt - sample) / 8,
        });
    }

    pub(super) fn get(&self) -> Option<Duration> {
        self.srtt
    }
}

/// The books and the commit schedule.
#[derive(Debug)]
pub(super) struct Commits {
    /// Accepted, not acked, not on disk, not being committed (every lane's `unsaved`).
    pub(super) unsaved_len: usize,
    /// Events and bytes held in memory only (unsaved and committing).
    pub(super) mem: LaneStats,
    /// Stored per priority, as of the last commit.
    pub(super) disk: [LaneStats; N_PRIORITIES],
    pub(super) running: bool,
    retry_at: Option<Instant>,
    failures_in_row: u32,
    /// Acked while their commit ran: on disk once it finishes, then to be deleted.
    acked_while_committing: HashSet<Key>,
    /// Acked or expired records that are on disk and not yet deleted.
    to_delete: HashSet<Key>,
    to_delete_since: Option<Instant>,
    /// Deletes in the commit now running.
    deleting: HashSet<Key>,
    /// What the overflow policy asks the next commit to drop from the file.
    pub(super) pending_drop: DropRequest,
    /// Drops in the commit now running.
    dropping: DropRequest,
    /// The upstream round trip, which sets how long events wait for a PUBACK ([`hold`]).
    pub(super) rtt: Rtt,
}

impl Commits {
    pub(super) fn new(disk: [LaneStats; N_PRIORITIES]) -> Commits {
        Commits {
            unsaved_len: 0,
            mem: LaneStats::default(),
            disk,
            running: false,
            retry_at: None,
            failures_in_row: 0,
            acked_while_committing: HashSet::new(),
            to_delete: HashSet::new(),
            to_delete_since: None,
            deleting: HashSet::new(),
            pending_drop: DropRequest::default(),
            dropping: DropRequest::default(),
            rtt: Rtt::default(),
        }
    }

    /// Events on disk or in the running commit that are leaving the file (deletes, drops).
    fn leaving(&self) -> u64 {
        (self.to_delete.len() + self.deleting.len()) as u64 + self.pending_drop.events + self.dropping.events
    }

    /// Events stored or pending, as counted against the capacity limits.
    pub(super) fn stored(&self) -> LaneStats {
        let mut total = self.mem;
        for lane in &self.disk {
            total.events += lane.events;
            total.bytes += lane.bytes;
        }
        total.events = total.events.saturating_sub(self.leaving());
        total.bytes = total.bytes.saturating_sub(self.pending_drop.bytes + self.dropping.bytes);
        total
    }

    /// Events on disk that are not leaving it.
    pub(super) fn disk_live(&self) -> u64 {
        self.disk.iter().map(|l| l.events).sum::<u64>().saturating_sub(self.leaving())
    }

    /// The event is acknowledged (or expired) and on its way out of the file.
    pub(super) fn is_leaving(&self, key: &Key) -> bool {
        self.to_delete.contains(key)
            || self.deleting.contains(key)
            || self.acked_while_committing.contains(key)
    }

    /// An accepted event of `size` bytes is now held in memory, unsaved.
    pub(super) fn hold(&mut self, size: u64) {
        self.mem.events += 1;
        self.mem.bytes += size;
        self.unsaved_len += 1;
    }

    /// An unsaved event leaves memory without being written.
    pub(super) fn forget_unsaved(&mut self, pending: &Pending) {
        self.unsaved_len -= 1;
        self.mem.events -= 1;
        self.mem.bytes -= pending.record.size();
    }

    fn delete_later(&mut self, key: Key, now: Instant) {
        self.to_delete.insert(key);
        self.to_delete_since.get_or_insert(now);
    }

    pub(super) fn idle(&self) -> bool {
        self.unsaved_len == 0
            && !self.running
            && self.to_delete.is_empty()
            && self.acked_while_committing.is_empty()
    }

    pub(super) fn flushed(&self) -> bool {
        self.unsaved_len == 0 && !self.running
    }
}

impl Relay {
    /// An event is done with: acknowledged upstream, expired, refused for its size, or
    /// dead-lettered. Unsaved, it is never written; on disk, it is deleted by a later commit.
    pub(super) fn on_acked(&mut self, key: Key, now: Instant) {
        let (p, seq) = (usize::from(key.0), key.1);
        let lane = &mut self.lanes[p];
        if let Some(pending) = lane.unsaved.remove(&seq) {
            self.commits.forget_unsaved(&pending);
            Metrics::add(&self.metrics.counters().acked_before_commit, 1);
        } else if lane.committing.contains_key(&seq) {
            self.commits.acked_while_committing.insert(key);
        } else {
            self.commits.delete_later(key, now);
        }
    }

    fn oldest_unsaved(&self) -> Option<Instant> {
        self.lanes.iter().filter_map(|l| l.unsaved.first_key_value().map(|(_, p)| p.since)).min()
    }

    /// How long an unsaved event waits for its PUBACK now (see [`hold`]).
    pub(super) fn hold(&self) -> Duration {
        hold(
            self.settings.commit_interval,
            self.settings.max_ack_delay,
            self.conn.is_some(),
            self.commits.rtt.get(),
        )
    }

    /// When the next commit falls due, if nothing else happens; `None` while one runs.
    pub(super) fn next_commit_deadline(&self) -> Option<Instant> {
        let commits = &self.commits;
        if commits.running {
            return None;
        }
        let unsaved = self.oldest_unsaved().map(|t| t + self.hold());
        let deletes = commits.to_delete_since.map(|t| t + DELETE_INTERVAL);
        let due = [unsaved, deletes].into_iter().flatten().min();
        match (due, commits.retry_at) {
            (Some(d), Some(r)) => Some(d.max(r)),
            (d, None) => d,
            (None, Some(_)) => None,
        }
    }

    /// Starts a commit when one is due and none is running.
    pub(super) fn maybe_commit(&mut self, commands: &mpsc::Sender<Command>, force: bool, now: Instant) {
        if !self.commit_due(force, now) {
            return;
        }
        let batch = self.take_batch(force, now);
        if batch.is_empty() {
            return;
        }
        match commands.try_send(Command::Apply(batch)) {
            Ok(()) => self.commits.running = true,
            Err(
                mpsc::error::TrySendError::Full(Command::Apply(batch))
                | mpsc::error::TrySendError::Closed(Command::Apply(batch)),
            ) => {
                self.restore(batch);
            }
            Err(_) => {}
        }
    }

    fn commit_due(&self, force: bool, now: Instant) -> bool {
        let c = &self.commits;
        if c.running || c.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        let interval = self.hold();
        let max = self.settings.commit_max_events;
        c.unsaved_len >= max
            || self.oldest_unsaved().is_some_and(|t| now.duration_since(t) >= interval)
            || c.to_delete.len() >= max
            || c.to_delete_since.is_some_and(|t| now.duration_since(t) >= DELETE_INTERVAL)
            || c.pending_drop != DropRequest::default()
            || (force && (c.unsaved_len > 0 || !c.to_delete.is_empty()))
    }

    /// What to write, moved from "unsaved" / "to delete" / "to drop" to "in the commit".
    ///
    /// Everything when forced, full, or with no upstream connection (nothing can be
    /// acknowledged, so waiting saves no write). Otherwise, if an event is due, everything
    /// older than a quarter of the hold: events that young are likely to have their PUBACK on
    /// the way; if none is due, no insert at all. Taking more
    /// than just the events that are due keeps batches at about rate × interval; taking only the
    /// due ones made every commit start right after the previous one, with a batch of rate ×
    /// fsync time (measured: 16× the payload written). Either way a commit takes a sequence
    /// prefix of each lane, which keeps every on-disk record older than every in-memory one.
    fn take_batch(&mut self, force: bool, now: Instant) -> Batch {
        let take_all =
            force || self.commits.unsaved_len >= self.settings.commit_max_events || self.conn.is_none();
        let hold = self.hold();
        // A commit started for deletes or drops alone takes no inserts: taking the not-yet-due
        // events with it made each once-a-second delete commit write events whose PUBACKs
        // were on the way, to be deleted by the next one (measured at 150 ms RTT: one commit
        // every second forever, 0.41x the payload written).
        let inserts_due = take_all || self.oldest_unsaved().is_some_and(|t| now.duration_since(t) >= hold);
        let young = hold / 4;
        let mut batch = Batch::default();
        for lane in &mut self.lanes {
            let due = if take_all {
                std::mem::take(&mut lane.unsaved)
            } else if inserts_due {
                lane.take_older_than(young, now)
            } else {
                std::collections::BTreeMap::new()
            };
            self.commits.unsaved_len -= due.len();
            batch.inserts.extend(due.values().map(|p| Record::clone(&p.record)));
            lane.committing = due;
        }
        let c = &mut self.commits;
        c.deleting = std::mem::take(&mut c.to_delete);
        c.to_delete_since = None;
        batch.deletes = c.deleting.iter().copied().collect();
        batch.drop_oldest = std::mem::take(&mut c.pending_drop);
        c.dropping = batch.drop_oldest;
        batch
    }

    /// Puts a batch that could not be written back into memory, to be retried.
    fn restore(&mut self, batch: Batch) {
        let c = &mut self.commits;
        for lane in &mut self.lanes {
            let committing = std::mem::take(&mut lane.committing);
            c.unsaved_len += committing.len();
            lane.unsaved.extend(committing);
        }
        // Acked during the failed commit: never reached the disk, so nothing to delete.
        for key in std::mem::take(&mut c.acked_while_committing) {
            if let Some(pending) = self.lanes[usize::from(key.0)].unsaved.remove(&key.1) {
                c.forget_unsaved(&pending);
            }
        }
        c.to_delete.extend(batch.deletes);
        if !c.to_delete.is_empty() {
            c.to_delete_since.get_or_insert(Instant::now());
        }
        c.deleting.clear();
        c.pending_drop.events += batch.drop_oldest.events;
        c.pending_drop.bytes += batch.drop_oldest.bytes;
        c.dropping = DropRequest::default();
    }

    /// A reply from the store thread.
    pub fn on_reply(&mut self, reply: Reply, data_dir: &std::path::Path, now: Instant) {
        match reply {
            Reply::Applied { result: Ok(applied), inserted, took } => {
                self.on_committed(applied, inserted, took, now)
            }
            Reply::Applied { result: Err((error, batch)), .. } => {
                self.on_commit_failed(&error, batch, data_dir, now);
            }
            Reply::Read { priority, from_seq, result } => self.on_read(priority, from_seq, result, now),
        }
    }

    /// The commit is on disk: its events leave memory, acks that came meanwhile become
    /// deletes, and the overflow policy's drops are counted.
    fn on_committed(&mut self, applied: Applied, inserted: usize, took: Duration, now: Instant) {
        let counters = self.metrics.counters();
        Metrics::add(&counters.commits, 1);
        Metrics::add(&counters.committed, inserted as u64);
        // Measured on the store thread around the transaction (fsync included).
        self.metrics.histograms().commit_duration.observe_duration(took);
        if took > Duration::from_millis(500) {
            if let Some(folded) = self.logs.slow_commit.ready(now) {
                warn!(message = "buffer commit was slow; the disk may be failing or overloaded (see outpost_buffer_commit_duration_seconds)", took = ?took, similar_since_last_log = folded);
            }
        }
        if let Some((lasted, failed)) = self.logs.commits_failing.ended(now) {
            info!(message = "buffer commits work again; the events held in memory meanwhile are on disk", failing_for = %readable(lasted), failed_attempts = failed);
        }
        if self.tap.wants(crate::tap::TapStage::Relay) {
            for pending in self.lanes.iter().flat_map(|lane| lane.committing.values()) {
                self.tap(&pending.record, crate::tap::RelayAction::Committed, None);
            }
        }
        let c = &mut self.commits;
        c.running = false;
        c.failures_in_row = 0;
        c.retry_at = None;
        c.disk = applied.lanes;
        for lane in &mut self.lanes {
            let committing = std::mem::take(&mut lane.committing);
            if committing.range(lane.cursor..).next().is_some() {
                lane.disk_unread = true;
            }
            for pending in committing.values() {
                c.mem.events -= 1;
                c.mem.bytes -= pending.record.size();
            }
        }
        for key in std::mem::take(&mut c.acked_while_committing) {
            c.delete_later(key, now);
        }
        c.deleting.clear();
        c.dropping = DropRequest::default();
        if !applied.dropped.is_empty() {
            self.on_dropped_from_disk(applied.dropped, now);
        }
    }

    /// The overflow policy dropped these from the file: count them and stop sending them.
    fn on_dropped_from_disk(&mut self, dropped: Vec<Key>, now: Instant) {
        let counters = self.metrics.counters();
        Metrics::add(&counters.dropped_overflow, dropped.len() as u64);
        let dropped: HashSet<Key> = dropped.into_iter().collect();
        for lane in &mut self.lanes {
            lane.prefetched.retain(|r| !dropped.contains(&r.key()));
        }
        if let Some(folded) = self.logs.overflow.ready(now) {
            warn!(
                message = "buffer full: dropped the oldest events (overflow = drop_oldest); raise buffer.max_events/max_bytes or restore the uplink",
                similar_since_last_log = folded,
                dropped_total = Metrics::get(&counters.dropped_overflow)
            );
        }
    }

    /// The commit failed: everything goes back into memory, retried after a backoff.
    fn on_commit_failed(
        &mut self,
        error: &BufferError,
        batch: Batch,
        data_dir: &std::path::Path,
        now: Instant,
    ) {
        let c = &mut self.commits;
        c.running = false;
        c.failures_in_row += 1;
        Metrics::add(&self.metrics.counters().commit_failures, 1);
        let delay = Duration::from_millis(100 * 2u64.pow(c.failures_in_row.min(6)));
        c.retry_at = Some(now + delay);
        let hint = if error.is_io() {
            format!(
                "free disk space in {} or check the storage; events stay in memory, ingest slows once {} are waiting",
                data_dir.display(),
                self.settings.commit_max_events
            )
        } else {
            "stop outpost and move the buffer file aside if this repeats".to_owned()
        };
        let failures_in_row = c.failures_in_row;
        match self.logs.commits_failing.failed(now) {
            Failure::Started => {
                error!(message = "buffer commit failed; retrying with backoff (a reminder follows while it lasts)", %error, hint, retry_in = ?delay)
            }
            Failure::Remind { lasted, attempts } => {
                error!(message = "buffer commits still failing; retrying", %error, hint, failing_for = %readable(lasted), failed_attempts = attempts)
            }
            Failure::Quiet => {
                tracing::debug!(message = "buffer commit failed again", %error, failures_in_row)
            }
        }
        self.restore(batch);
    }
}

impl Lane {
    /// Takes the unsaved events accepted at least `age` ago: a sequence prefix, since events
    /// are accepted in sequence order.
    fn take_older_than(&mut self, age: Duration, now: Instant) -> std::collections::BTreeMap<u64, Pending> {
        let first_young =
            self.unsaved.iter().find(|(_, p)| now.duration_since(p.since) < age).map(|(seq, _)| *seq);
        match first_young {
            Some(seq) => {
                let young = self.unsaved.split_off(&seq);
                std::mem::replace(&mut self.unsaved, young)
            }
            None => std::mem::take(&mut self.unsaved),
        }
    }
}
