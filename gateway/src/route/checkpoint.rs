//! Checkpoints of the route stage's stateful rules: what makes a PUBACK mean "safe" for a
//! reading a window or a report-by-exception function absorbed.
//!
//! An absorbed reading has no upstream copy whose commit or PUBACK could release its sensor's
//! acknowledgement; its only trace is the rules' state. So the stage holds the reading's
//! [`Ticket`] here and releases it once a checkpoint of the state that includes the reading
//! is committed to the buffer file (`buffer::windows`, one durable transaction).
//!
//! # Full snapshots and deltas
//! The file keeps a log: a full snapshot, then deltas (what changed since the checkpoint
//! before). [`Checkpointer::wants`] says which the stage takes next, and the stage takes
//! that: a **full** one when none has been taken in this run (a start: the state was
//! restored or is new), after the state's shape changed (a reload), after a failed
//! checkpoint (its delta is lost, so deltas after it would not apply), and when the deltas
//! taken since the last full one add up to more than [`COMPACT_AFTER`] times its size, so
//! the log stays within about `1 + COMPACT_AFTER` times the state and rewriting it costs a
//! `1 / COMPACT_AFTER` share of the deltas' own bytes; otherwise a **delta**, whose cost
//! follows what changed rather than the number of groups.
//!
//! # Invariants
//! - A held ticket is dropped (the sensor acknowledged) only after the transaction holding a
//!   checkpoint taken after its reading was absorbed has committed. A failed checkpoint puts
//!   its tickets back, with those of any checkpoint waiting behind it (its deltas build on
//!   the lost one); the next one, full and of a newer state, takes them.
//! - A delta is written only on top of the full snapshot and every delta taken between
//!   them: a waiting delta is written in the same transaction as the writes before it, and
//!   a failure makes the next checkpoint full.
//! - A checkpoint is written only once every window output emitted before it was taken is
//!   safe (committed to the buffer or acknowledged upstream: their tickets, from this
//!   module's own [`AckQueue`], have dropped). A checkpoint no longer holds a closed window's
//!   readings, so writing it before the window's output is safe could lose them in a crash.
//! - At most one checkpoint is written at a time, and a new one starts no sooner than
//!   `interval` after the previous one started, unless [`EARLY_AT`] readings wait for it:
//!   the checkpoint is a group commit.
//! - At most [`MAX_HELD`] tickets are held: the stage stops reading its input beyond that
//!   (sensors slow down, as with a slow buffer), so a failing disk cannot grow memory.
//!
//! - The route stage closes a time window only once a snapshot holding every reading in it
//!   has committed (`route::commit_now`, taken at once whatever the interval), and takes no
//!   input meanwhile: a window's output never holds a reading the file does not.
//!
//! # After a crash
//! The file holds the state of the last committed checkpoint (its full snapshot and the
//! deltas up to it). Readings absorbed after it were not yet
//! acknowledged and are resent by their sensors (counted in the window open at the resend);
//! windows closed after it are in it still, with exactly the readings they were sent with,
//! and close again with the same outputs and ids (the upstream sees a duplicate id at most).
//! Windows that close on an event (count and sliding windows, an evicted group, an
//! event-time watermark a reading moved) are held in the state with their output computed
//! at the event, and handed to the relay only once a checkpoint holding them has committed
//! (`route::release_held`, after the regular checkpoint: no extra commit, no input stall):
//! a restart finds them held still and sends them again, the same, with the same ids, and a
//! resent reading cannot close them a second time with other bounds.
//! A QoS 1 reading can be counted twice in one case only: the snapshot holding it committed
//! and the crash came before its PUBACK reached the sensor, which then resends it (MQTT
//! gives the resend nothing that tells it from a reading never received). A QoS 2 reading
//! cannot: the checkpoint holding it holds its marker too (`outpost_rules::window::marks`),
//! so the resend (DUP) is recognised and the stage skips it in the stateful rules; its
//! PUBREL's PUBCOMP is held here like a reading's PUBREC, until the checkpoint without the
//! marker commits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::ack::{AckQueue, Outcome, Ticket};
use crate::buffer::windows::LogWrite;
use crate::buffer::worker::Command;
use crate::metrics::Metrics;
use crate::telemetry::{Episode, Failure, readable};

/// Readings held for a checkpoint at most, before the stage stops reading input.
pub const MAX_HELD: usize = 10_000;

/// A checkpoint is due at once, whatever the interval, when this many readings wait for it:
/// at the default interval (250 ms) from 20,000 readings a second. Without it the held
/// readings would reach [`MAX_HELD`] within one interval from 40,000 a second, and the
/// stage would stop reading until the interval ended.
pub const EARLY_AT: usize = MAX_HELD / 2;

/// A full snapshot replaces the log once the deltas after the last one exceed this many
/// times its size. Why 4 and not 1: where every group changes each second (window-bench's
/// 10,000 devices), the deltas outgrow the base within a second, and at 1 the full
/// snapshots were half of the checkpoint bytes; at 4 they are about a fifth (rules/README.md,
/// "What windows cost"), for a log read at start of at most about five times the state
/// (some 6 MB for 10,000 groups).
pub const COMPACT_AFTER: usize = 4;

/// How long a failed checkpoint waits before the next attempt, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// While outputs are not yet safe, how often their queue is looked at even without a wake-up.
const OUTPUT_POLL: Duration = Duration::from_millis(50);

/// What [`Checkpointer::wait`] asks of the stage.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Take a checkpoint now (of the [`Kind`] [`Checkpointer::wants`]) and hand it to
    /// [`Checkpointer::take`].
    Due,
    /// Something moved (a reply, outputs made safe, a write started); ask again.
    Progress,
}

/// The checkpoint the stage takes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The whole state (`WindowState::snapshot`, then `clear_changes`).
    Full,
    /// What changed since the last one taken (`WindowState::take_delta`).
    Delta,
}

/// Checkpoints taken and not yet handed to the store thread.
struct Pending {
    /// In the order they were taken: a full one (or a clear) first, if any, then deltas.
    writes: Vec<LogWrite>,
    held: Vec<Ticket>,
    /// Outputs issued when the last was taken: all must be safe before they are written.
    outputs_upto: u64,
    /// The number ([`Checkpointer::taken`]) of the last one taken.
    number: u64,
}

struct InFlight {
    reply: oneshot::Receiver<Result<(), String>>,
    held: Vec<Ticket>,
    started: Instant,
    bytes: usize,
    /// The bytes of the full snapshot among its writes, if there is one.
    full_bytes: Option<usize>,
    number: u64,
}

pub struct Checkpointer {
    commands: mpsc::Sender<Command>,
    interval: Duration,
    /// The tickets of window outputs sent upstream.
    outputs: Arc<AckQueue>,
    issued: u64,
    safe: u64,
    /// Tickets of readings absorbed since the last checkpoint was taken.
    held: Vec<Ticket>,
    /// The state changed since the last checkpoint was taken.
    dirty: bool,
    waiting: Option<Pending>,
    /// The next checkpoint must be full (see the module's doc).
    need_full: bool,
    /// The size of the last full snapshot taken, and of the deltas taken since.
    full_bytes: usize,
    delta_bytes: usize,
    in_flight: Option<InFlight>,
    /// No snapshot is taken before this.
    next_at: Instant,
    failures_in_row: u32,
    metrics: Metrics,
    episode: Episode,
    /// `OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT` (see [`fault_exit_after`]).
    exit_after: Option<u64>,
    /// Checkpoints taken in this run, and the number of the last one taken that committed
    /// (with every one taken before it: a failed one's changes are in the next).
    taken: u64,
    committed: u64,
}

/// Fault injection for tests: `OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT=<n>` aborts the process
/// right after the n-th window checkpoint of this run has committed, before the
/// acknowledgements it holds are released: the crash the QoS 1 double count and the QoS 2
/// markers are about. Logged loudly when set; ignored (and said so) when not a number.
pub const EXIT_AFTER_CHECKPOINT_ENV: &str = "OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT";

fn fault_exit_after() -> Option<u64> {
    let value = std::env::var(EXIT_AFTER_CHECKPOINT_ENV).ok()?;
    match value.parse::<u64>() {
        Ok(n) if n > 0 => {
            warn!(
                message = "fault injection: the process aborts right after this window checkpoint commits (OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT); unset it outside tests",
                checkpoint = n
            );
            Some(n)
        }
        _ => {
            warn!(message = "OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT ignored: expected a checkpoint number from 1", %value);
            None
        }
    }
}

impl Checkpointer {
    pub fn new(commands: mpsc::Sender<Command>, interval: Duration, metrics: Metrics) -> Checkpointer {
        Checkpointer {
            commands,
            interval,
            outputs: AckQueue::new(),
            issued: 0,
            safe: 0,
            held: Vec::new(),
            dirty: false,
            waiting: None,
            need_full: true,
            full_bytes: 0,
            delta_bytes: 0,
            in_flight: None,
            next_at: Instant::now(),
            failures_in_row: 0,
            metrics,
            episode: Episode::default(),
            exit_after: fault_exit_after(),
            taken: 0,
            committed: 0,
        }
    }

    /// Checkpoints taken so far in this run: the next one taken is number `taken() + 1`.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// The number of the last checkpoint committed: the state as it was when that one was
    /// taken is durable.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The ticket a closed window's outputs carry upstream (clones for every copy).
    pub fn output_ticket(&mut self) -> Ticket {
        self.issued += 1;
        self.outputs.ticket()
    }

    /// A reading the stateful rules took in: its acknowledgement waits for a checkpoint.
    pub fn hold(&mut self, ticket: Option<Ticket>) {
        self.held.extend(ticket);
        self.dirty = true;
    }

    /// The state changed without a reading (windows closed).
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    /// The state was replaced (a reload): the next checkpoint is a full one.
    pub fn reshaped(&mut self) {
        self.dirty = true;
        self.need_full = true;
    }

    /// The kind of checkpoint the stage must take next.
    pub fn wants(&self) -> Kind {
        if self.need_full || self.delta_bytes > self.full_bytes.saturating_mul(COMPACT_AFTER) {
            Kind::Full
        } else {
            Kind::Delta
        }
    }

    /// Whether the stage must stop reading input until a checkpoint commits.
    pub fn full(&self) -> bool {
        let waiting = self.waiting.as_ref().map_or(0, |s| s.held.len());
        let flying = self.in_flight.as_ref().map_or(0, |f| f.held.len());
        self.held.len() + waiting + flying >= MAX_HELD
    }

    /// Nothing changed since the last committed checkpoint, and nothing is being written.
    pub fn idle(&self) -> bool {
        !self.dirty && self.waiting.is_none() && self.in_flight.is_none()
    }

    /// The checkpoint [`Step::Due`] asked for, of the kind [`Checkpointer::wants`]
    /// ([`LogWrite::Clear`]: no stateful rule runs), or one taken sooner (a window is about
    /// to close, the stage stops). It joins the checkpoints still waiting to be written
    /// (a full one or a clear replaces them: it holds their changes) and takes over their
    /// readings: the newer state holds them too.
    pub fn take(&mut self, write: LogWrite) {
        match &write {
            LogWrite::Full(bytes) => {
                self.need_full = false;
                self.full_bytes = bytes.len();
                self.delta_bytes = 0;
            }
            LogWrite::Clear => {
                self.need_full = true;
                self.full_bytes = 0;
                self.delta_bytes = 0;
            }
            LogWrite::Delta(bytes) => {
                debug_assert!(!self.need_full, "a delta taken when a full checkpoint was due");
                self.delta_bytes += bytes.len();
            }
        }
        let mut held = std::mem::take(&mut self.held);
        let mut writes = Vec::new();
        if let Some(mut older) = self.waiting.take() {
            older.held.append(&mut held);
            held = older.held;
            writes = older.writes;
        }
        if !matches!(write, LogWrite::Delta(_)) {
            writes.clear();
        }
        writes.push(write);
        self.dirty = false;
        self.taken += 1;
        self.waiting = Some(Pending { writes, held, outputs_upto: self.issued, number: self.taken });
    }

    fn refresh(&mut self) {
        let mut done = Vec::new();
        self.outputs.take_ready(&mut done);
        // An output the full buffer refused (`reject_new`) comes back safe once the relay has
        // written it to the dead-letter file; `Rejected` means that write failed too (the
        // relay counted it, `buffer_full_letters_failed`, and logged it): the output is lost,
        // and as the window's readings are in no later snapshot, waiting would not bring
        // it back.
        self.safe += done.iter().filter(|o| matches!(o, Outcome::Safe | Outcome::Rejected)).count() as u64;
    }

    /// Waits for the next thing to do. Cancel-safe: every wait can be dropped and resumed.
    pub async fn wait(&mut self) -> Step {
        self.refresh();
        if let Some(flight) = self.in_flight.as_mut() {
            let result = (&mut flight.reply).await;
            self.finished(result.unwrap_or_else(|_| Err("the store thread stopped".to_owned())));
            return Step::Progress;
        }
        if let Some(pending) = &self.waiting {
            if pending.outputs_upto > self.safe {
                tokio::select! {
                    () = self.outputs.ready() => {}
                    () = tokio::time::sleep(OUTPUT_POLL) => {}
                }
                return Step::Progress;
            }
            let Ok(permit) = self.commands.reserve().await else {
                // The store thread is gone (shutdown): nothing can be made durable.
                return std::future::pending().await;
            };
            let Some(pending) = self.waiting.take() else { return Step::Progress };
            let (reply, rx) = oneshot::channel();
            let bytes = pending.writes.iter().map(LogWrite::len).sum();
            let full_bytes = pending.writes.iter().find_map(|w| match w {
                LogWrite::Full(b) => Some(b.len()),
                _ => None,
            });
            permit.send(Command::Checkpoint { writes: pending.writes, reply });
            self.in_flight = Some(InFlight {
                reply: rx,
                held: pending.held,
                started: Instant::now(),
                bytes,
                full_bytes,
                number: pending.number,
            });
            return Step::Progress;
        }
        if self.dirty {
            if self.held.len() < EARLY_AT {
                tokio::time::sleep_until(self.next_at).await;
            }
            return Step::Due;
        }
        std::future::pending().await
    }

    fn finished(&mut self, result: Result<(), String>) {
        let Some(flight) = self.in_flight.take() else { return };
        let now = Instant::now();
        let counters = self.metrics.counters();
        match result {
            Ok(()) => {
                Metrics::add(&counters.window_checkpoints, 1);
                Metrics::add(&counters.window_checkpoint_bytes, flight.bytes as u64);
                if let Some(full) = flight.full_bytes {
                    Metrics::add(&counters.window_checkpoints_full, 1);
                    Metrics::add(&counters.window_checkpoint_full_bytes, full as u64);
                }
                if self.exit_after.is_some_and(|n| Metrics::get(&counters.window_checkpoints) >= n) {
                    error!(
                        message = "fault injection: aborting after a committed window checkpoint, before its acknowledgements (OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT)",
                        held = flight.held.len()
                    );
                    std::process::abort();
                }
                // Committed: the readings it holds are safe, their sensors acknowledged.
                // One clock read for the batch (the std clock, as the tickets were stamped).
                crate::ack::release_all(flight.held, std::time::Instant::now());
                self.committed = flight.number;
                self.failures_in_row = 0;
                self.next_at = flight.started + self.interval;
                if let Some((lasted, attempts)) = self.episode.ended(now) {
                    info!(message = "window checkpoints are committed again; held acknowledgements released", lasted = %readable(lasted), attempts);
                }
            }
            Err(reason) => {
                Metrics::add(&counters.window_checkpoint_failures, 1);
                // Not durable: back to the held ones, for the next (newer) checkpoint. The
                // deltas waiting behind it build on what was lost: they go too, and the next
                // checkpoint is a full one, which holds their changes.
                let mut held = flight.held;
                if let Some(mut waiting) = self.waiting.take() {
                    held.append(&mut waiting.held);
                }
                held.append(&mut self.held);
                self.held = held;
                self.dirty = true;
                self.need_full = true;
                self.failures_in_row = self.failures_in_row.saturating_add(1);
                let backoff = self.interval.saturating_mul(1 << self.failures_in_row.min(8)).min(MAX_BACKOFF);
                self.next_at = now + backoff;
                match self.episode.failed(now) {
                    Failure::Started => {
                        error!(message = "cannot checkpoint the rules' window state to the buffer file; the sensors whose readings it holds are not acknowledged until it works (they slow down once 10,000 wait). Check the disk (space, permissions, errors in the kernel log)", %reason, held = self.held.len())
                    }
                    Failure::Remind { lasted, attempts } => {
                        warn!(message = "window checkpoints still failing", %reason, lasted = %readable(lasted), attempts, held = self.held.len())
                    }
                    Failure::Quiet => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(queue: &AckQueue) -> Vec<Outcome> {
        let mut out = Vec::new();
        queue.take_ready(&mut out);
        out
    }

    /// The store thread's side, by hand: the next checkpoint command.
    async fn next_write(
        rx: &mut mpsc::Receiver<Command>,
    ) -> (Vec<LogWrite>, oneshot::Sender<Result<(), String>>) {
        match rx.recv().await {
            Some(Command::Checkpoint { writes, reply }) => (writes, reply),
            _ => panic!("expected a checkpoint"),
        }
    }

    fn full(bytes: &[u8]) -> LogWrite {
        LogWrite::Full(bytes.to_vec())
    }

    fn delta(bytes: &[u8]) -> LogWrite {
        LogWrite::Delta(bytes.to_vec())
    }

    #[tokio::test(start_paused = true)]
    async fn a_reading_is_acknowledged_only_after_its_snapshot_commits() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        let sensor = AckQueue::new();
        ck.hold(Some(sensor.ticket()));
        assert_eq!(ck.wait().await, Step::Due);
        ck.take(full(b"s1"));
        ck.hold(Some(sensor.ticket()));
        assert_eq!(ck.wait().await, Step::Progress, "the write started");
        let (writes, reply) = next_write(&mut rx).await;
        assert_eq!(writes, vec![full(b"s1")]);
        assert!(ready(&sensor).is_empty(), "not before the commit");
        reply.send(Ok(())).expect("reply");
        assert_eq!(ck.wait().await, Step::Progress);
        assert_eq!(ready(&sensor), vec![Outcome::Safe], "the first reading, not the second");
        // The second is in the next snapshot, taken no sooner than the interval.
        let before = Instant::now();
        assert_eq!(ck.wait().await, Step::Due);
        assert!(Instant::now() >= before + Duration::from_millis(20));
        ck.take(full(b"s2"));
        ck.wait().await;
        let (_, reply) = next_write(&mut rx).await;
        reply.send(Ok(())).expect("reply");
        ck.wait().await;
        assert_eq!(ready(&sensor), vec![Outcome::Safe]);
        assert!(ck.idle());
    }

    #[tokio::test(start_paused = true)]
    async fn enough_waiting_readings_make_a_checkpoint_due_before_the_interval() {
        let (tx, mut rx) = mpsc::channel(8);
        let interval = Duration::from_millis(250);
        let mut ck = Checkpointer::new(tx, interval, Metrics::default());
        let sensor = AckQueue::new();
        ck.hold(Some(sensor.ticket()));
        assert_eq!(ck.wait().await, Step::Due);
        ck.take(full(b"s1"));
        ck.wait().await;
        let (_, reply) = next_write(&mut rx).await;
        reply.send(Ok(())).expect("reply");
        ck.wait().await;
        // A few readings wait for the interval; EARLY_AT of them do not.
        let started = Instant::now();
        for _ in 1..EARLY_AT {
            ck.hold(Some(sensor.ticket()));
        }
        let early = tokio::time::timeout(Duration::from_millis(10), ck.wait()).await;
        assert!(early.is_err(), "one reading short of EARLY_AT: the interval holds");
        ck.hold(Some(sensor.ticket()));
        assert_eq!(ck.wait().await, Step::Due);
        assert!(Instant::now() < started + interval, "due before the interval ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_waits_for_the_outputs_of_windows_closed_before_it() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        let output = ck.output_ticket();
        ck.changed();
        assert_eq!(ck.wait().await, Step::Due);
        ck.take(full(b"after the close"));
        assert_eq!(ck.wait().await, Step::Progress);
        assert!(rx.try_recv().is_err(), "not written while the output is unsafe");
        drop(output);
        assert_eq!(ck.wait().await, Step::Progress, "the write started");
        let (writes, reply) = next_write(&mut rx).await;
        assert_eq!(writes, vec![full(b"after the close")]);
        reply.send(Ok(())).expect("reply");
        ck.wait().await;
        assert!(ck.idle());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_checkpoint_keeps_its_readings_for_the_next_one() {
        let (tx, mut rx) = mpsc::channel(8);
        let metrics = Metrics::default();
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), metrics.clone());
        let sensor = AckQueue::new();
        ck.hold(Some(sensor.ticket()));
        ck.wait().await;
        ck.take(full(b"s"));
        ck.wait().await;
        let (_, reply) = next_write(&mut rx).await;
        reply.send(Err("disk full".to_owned())).expect("reply");
        ck.wait().await;
        assert!(ready(&sensor).is_empty(), "a failed write acknowledges nothing");
        assert_eq!(Metrics::get(&metrics.counters().window_checkpoint_failures), 1);
        assert_eq!(ck.wait().await, Step::Due, "tried again");
        ck.take(full(b"s"));
        ck.wait().await;
        let (_, reply) = next_write(&mut rx).await;
        reply.send(Ok(())).expect("reply");
        ck.wait().await;
        assert_eq!(ready(&sensor), vec![Outcome::Safe]);
        assert_eq!(Metrics::get(&metrics.counters().window_checkpoints), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_snapshot_replaces_a_waiting_one_and_keeps_its_readings() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        let sensor = AckQueue::new();
        let output = ck.output_ticket();
        ck.hold(Some(sensor.ticket()));
        assert_eq!(ck.wait().await, Step::Due);
        ck.take(full(b"older"));
        assert_eq!(ck.wait().await, Step::Progress, "waits for the output");
        ck.hold(Some(sensor.ticket()));
        ck.take(full(b"newer"));
        assert!(ready(&sensor).is_empty(), "the older snapshot's reading is still held");
        drop(output);
        ck.wait().await;
        let (writes, reply) = next_write(&mut rx).await;
        assert_eq!(writes, vec![full(b"newer")]);
        reply.send(Ok(())).expect("reply");
        ck.wait().await;
        assert_eq!(ready(&sensor), vec![Outcome::Safe, Outcome::Safe]);
        assert!(ck.idle());
    }

    /// Commits the next checkpoint command and returns what it wrote.
    async fn commit_next(ck: &mut Checkpointer, rx: &mut mpsc::Receiver<Command>) -> Vec<LogWrite> {
        assert_eq!(ck.wait().await, Step::Progress, "the write started");
        let (writes, reply) = next_write(rx).await;
        reply.send(Ok(())).expect("reply");
        assert_eq!(ck.wait().await, Step::Progress, "the reply");
        writes
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_is_full_then_deltas_until_they_outgrow_it() {
        let (tx, mut rx) = mpsc::channel(8);
        let metrics = Metrics::default();
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), metrics.clone());
        ck.changed();
        assert_eq!(ck.wants(), Kind::Full, "none in this run yet");
        assert_eq!(ck.wait().await, Step::Due);
        ck.take(full(b"0123456789"));
        assert_eq!(commit_next(&mut ck, &mut rx).await, vec![full(b"0123456789")]);
        // Deltas up to COMPACT_AFTER times the full one's size: 4 + 6 per round, so 10 ×
        // COMPACT_AFTER after the last round, is not more than that.
        let rounds: Vec<&[u8]> = [&b"abcd"[..], b"efghij"].repeat(COMPACT_AFTER);
        for d in rounds {
            ck.changed();
            assert_eq!(ck.wait().await, Step::Due);
            assert_eq!(ck.wants(), Kind::Delta);
            ck.take(delta(d));
            assert_eq!(commit_next(&mut ck, &mut rx).await, vec![delta(d)]);
        }
        ck.changed();
        assert_eq!(ck.wait().await, Step::Due);
        assert_eq!(ck.wants(), Kind::Delta);
        ck.take(delta(b"k"));
        commit_next(&mut ck, &mut rx).await;
        ck.changed();
        assert_eq!(ck.wait().await, Step::Due);
        assert_eq!(
            ck.wants(),
            Kind::Full,
            "one byte more outgrew COMPACT_AFTER times the 10-byte base: compact"
        );
        ck.take(full(b"012345"));
        assert_eq!(commit_next(&mut ck, &mut rx).await, vec![full(b"012345")]);
        assert_eq!(ck.wants(), Kind::Delta, "a new base, no deltas after it yet");
        let counters = metrics.counters();
        assert_eq!(Metrics::get(&counters.window_checkpoints), 2 * COMPACT_AFTER as u64 + 3);
        assert_eq!(Metrics::get(&counters.window_checkpoints_full), 2);
        assert_eq!(Metrics::get(&counters.window_checkpoint_bytes), 10 + 10 * COMPACT_AFTER as u64 + 1 + 6);
        assert_eq!(Metrics::get(&counters.window_checkpoint_full_bytes), 10 + 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_makes_the_next_one_full() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        ck.changed();
        ck.wait().await;
        ck.take(full(b"base"));
        commit_next(&mut ck, &mut rx).await;
        assert_eq!(ck.wants(), Kind::Delta);
        ck.reshaped();
        assert_eq!(ck.wants(), Kind::Full);
        assert_eq!(ck.wait().await, Step::Due, "a reload is a change");
        // A clear (no stateful rule left) leaves no base either.
        ck.take(LogWrite::Clear);
        assert_eq!(commit_next(&mut ck, &mut rx).await, vec![LogWrite::Clear]);
        assert_eq!(ck.wants(), Kind::Full);
    }

    /// A failed write loses its delta, and the deltas waiting behind it build on it: they
    /// are dropped, their readings kept, and the next checkpoint is a full one.
    #[tokio::test(start_paused = true)]
    async fn after_a_failure_the_next_one_is_full_and_takes_every_held_reading() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        let sensor = AckQueue::new();
        ck.changed();
        ck.wait().await;
        ck.take(full(b"base"));
        commit_next(&mut ck, &mut rx).await;
        ck.hold(Some(sensor.ticket()));
        ck.wait().await;
        ck.take(delta(b"d1"));
        assert_eq!(ck.wait().await, Step::Progress, "the write started");
        let (writes, reply) = next_write(&mut rx).await;
        assert_eq!(writes, vec![delta(b"d1")]);
        // Another reading and its delta wait behind the one in flight (a window is due).
        ck.hold(Some(sensor.ticket()));
        assert_eq!(ck.wants(), Kind::Delta);
        ck.take(delta(b"d2"));
        reply.send(Err("disk full".to_owned())).expect("reply");
        assert_eq!(ck.wait().await, Step::Progress);
        assert!(ready(&sensor).is_empty());
        assert_eq!(ck.wants(), Kind::Full, "the lost delta must be rewritten in full");
        assert_eq!(ck.wait().await, Step::Due, "the waiting delta was dropped, not written");
        ck.take(full(b"base+d1+d2"));
        assert_eq!(commit_next(&mut ck, &mut rx).await, vec![full(b"base+d1+d2")]);
        assert_eq!(ready(&sensor), vec![Outcome::Safe, Outcome::Safe]);
        assert!(ck.idle());
    }

    /// Checkpoints taken while others wait (on outputs) are written together: a delta after
    /// the ones before it, in one transaction; a full one in place of all of them.
    #[tokio::test(start_paused = true)]
    async fn waiting_deltas_are_written_together_and_a_full_one_replaces_them() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        ck.changed();
        ck.wait().await;
        ck.take(full(b"base....."));
        commit_next(&mut ck, &mut rx).await;
        let output = ck.output_ticket();
        ck.take(delta(b"d1"));
        ck.take(delta(b"d2"));
        assert_eq!(ck.wait().await, Step::Progress, "waits for the output");
        drop(output);
        assert_eq!(commit_next(&mut ck, &mut rx).await, vec![delta(b"d1"), delta(b"d2")]);
        let output = ck.output_ticket();
        ck.take(delta(b"d3"));
        ck.take(full(b"base2"));
        ck.take(delta(b"d4"));
        ck.wait().await;
        drop(output);
        assert_eq!(commit_next(&mut ck, &mut rx).await, vec![full(b"base2"), delta(b"d4")]);
    }

    #[test]
    fn it_is_full_at_the_bound() {
        let (tx, _rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        let sensor = AckQueue::new();
        for _ in 0..MAX_HELD - 1 {
            ck.hold(Some(sensor.ticket()));
        }
        assert!(!ck.full());
        ck.hold(Some(sensor.ticket()));
        assert!(ck.full());
    }
}
