//! Checkpoints of the route stage's stateful rules: what makes a PUBACK mean "safe" for a
//! reading a window or a report-by-exception function absorbed.
//!
//! An absorbed reading has no upstream copy whose commit or PUBACK could release its sensor's
//! acknowledgement; its only trace is the rules' state. So the stage holds the reading's
//! [`Ticket`] here and releases it once a snapshot of the state that includes the reading is
//! committed to the buffer file (`buffer::windows`, one durable transaction).
//!
//! # Invariants
//! - A held ticket is dropped (the sensor acknowledged) only after the transaction holding a
//!   snapshot taken after its reading was absorbed has committed. A failed checkpoint puts
//!   its tickets back; the next one, of a newer state, takes them.
//! - A snapshot is written only once every window output emitted before it was taken is
//!   safe (committed to the buffer or acknowledged upstream: their tickets, from this
//!   module's own [`AckQueue`], have dropped). A snapshot no longer holds a closed window's
//!   readings, so writing it before the window's output is safe could lose them in a crash.
//! - At most one checkpoint is written at a time, and a new one starts no sooner than
//!   `interval` after the previous one started: the checkpoint is a group commit.
//! - At most [`MAX_HELD`] tickets are held: the stage stops reading its input beyond that
//!   (sensors slow down, as with a slow buffer), so a failing disk cannot grow memory.
//!
//! - The route stage closes a time window only once a snapshot holding every reading in it
//!   has committed (`route::commit_now`, taken at once whatever the interval), and takes no
//!   input meanwhile: a window's output never holds a reading the file does not.
//!
//! # After a crash
//! The file holds the last committed snapshot. Readings absorbed after it were not yet
//! acknowledged and are resent by their sensors (counted in the window open at the resend);
//! windows closed after it are in it still, with exactly the readings they were sent with,
//! and close again with the same outputs and ids (the upstream sees a duplicate id at most).
//! Windows that close on events (count and sliding windows, an evicted group) are not held
//! back this way: resent readings may make them close again with other bounds, so other ids.
//! A QoS 1 reading can be counted twice in one case only: the snapshot holding it committed
//! and the crash came before its PUBACK reached the sensor, which then resends it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::ack::{AckQueue, Outcome, Ticket};
use crate::buffer::worker::Command;
use crate::metrics::Metrics;
use crate::telemetry::{Episode, Failure, readable};

/// Readings held for a checkpoint at most, before the stage stops reading input.
pub const MAX_HELD: usize = 10_000;

/// How long a failed checkpoint waits before the next attempt, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// While outputs are not yet safe, how often their queue is looked at even without a wake-up.
const OUTPUT_POLL: Duration = Duration::from_millis(50);

/// What [`Checkpointer::wait`] asks of the stage.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Take a snapshot now and hand it to [`Checkpointer::take`].
    Due,
    /// Something moved (a reply, outputs made safe, a write started); ask again.
    Progress,
}

struct Snapshot {
    state: Option<Vec<u8>>,
    held: Vec<Ticket>,
    /// Outputs issued when it was taken: all must be safe before it is written.
    outputs_upto: u64,
}

struct InFlight {
    reply: oneshot::Receiver<Result<(), String>>,
    held: Vec<Ticket>,
    started: Instant,
    bytes: usize,
}

pub struct Checkpointer {
    commands: mpsc::Sender<Command>,
    interval: Duration,
    /// The tickets of window outputs sent upstream.
    outputs: Arc<AckQueue>,
    issued: u64,
    safe: u64,
    /// Tickets of readings absorbed since the last snapshot was taken.
    held: Vec<Ticket>,
    /// The state changed since the last snapshot was taken.
    dirty: bool,
    waiting: Option<Snapshot>,
    in_flight: Option<InFlight>,
    /// No snapshot is taken before this.
    next_at: Instant,
    failures_in_row: u32,
    metrics: Metrics,
    episode: Episode,
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
            in_flight: None,
            next_at: Instant::now(),
            failures_in_row: 0,
            metrics,
            episode: Episode::default(),
        }
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

    /// The state changed without a reading (windows closed, a reload).
    pub fn changed(&mut self) {
        self.dirty = true;
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

    /// The snapshot [`Step::Due`] asked for (`None`: no stateful rule runs, clear it), or one
    /// taken sooner (a window is about to close, the stage stops). It replaces a snapshot
    /// still waiting to be written, and takes over that one's readings: the newer state
    /// holds them too.
    pub fn take(&mut self, state: Option<Vec<u8>>) {
        let mut held = std::mem::take(&mut self.held);
        if let Some(mut older) = self.waiting.take() {
            older.held.append(&mut held);
            held = older.held;
        }
        self.dirty = false;
        self.waiting = Some(Snapshot { state, held, outputs_upto: self.issued });
    }

    fn refresh(&mut self) {
        let mut done = Vec::new();
        self.outputs.take_ready(&mut done);
        // A refused output (`reject_new` on a full buffer) is not safe upstream; it is
        // counted by the relay, and the window's readings are in no later snapshot either
        // way, so waiting longer would not bring it back.
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
        if let Some(snapshot) = &self.waiting {
            if snapshot.outputs_upto > self.safe {
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
            let Some(snapshot) = self.waiting.take() else { return Step::Progress };
            let (reply, rx) = oneshot::channel();
            let bytes = snapshot.state.as_ref().map_or(0, Vec::len);
            permit.send(Command::Checkpoint { state: snapshot.state, reply });
            self.in_flight =
                Some(InFlight { reply: rx, held: snapshot.held, started: Instant::now(), bytes });
            return Step::Progress;
        }
        if self.dirty {
            tokio::time::sleep_until(self.next_at).await;
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
                // Committed: the readings it holds are safe, their sensors acknowledged.
                drop(flight.held);
                self.failures_in_row = 0;
                self.next_at = flight.started + self.interval;
                if let Some((lasted, attempts)) = self.episode.ended(now) {
                    info!(message = "window checkpoints are committed again; held acknowledgements released", lasted = %readable(lasted), attempts);
                }
            }
            Err(reason) => {
                Metrics::add(&counters.window_checkpoint_failures, 1);
                // Not durable: back to the held ones, for the next (newer) snapshot.
                let mut held = flight.held;
                held.append(&mut self.held);
                self.held = held;
                self.dirty = true;
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
    ) -> (Option<Vec<u8>>, oneshot::Sender<Result<(), String>>) {
        match rx.recv().await {
            Some(Command::Checkpoint { state, reply }) => (state, reply),
            _ => panic!("expected a checkpoint"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reading_is_acknowledged_only_after_its_snapshot_commits() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        let sensor = AckQueue::new();
        ck.hold(Some(sensor.ticket()));
        assert_eq!(ck.wait().await, Step::Due);
        ck.take(Some(b"s1".to_vec()));
        ck.hold(Some(sensor.ticket()));
        assert_eq!(ck.wait().await, Step::Progress, "the write started");
        let (state, reply) = next_write(&mut rx).await;
        assert_eq!(state.as_deref(), Some(&b"s1"[..]));
        assert!(ready(&sensor).is_empty(), "not before the commit");
        reply.send(Ok(())).expect("reply");
        assert_eq!(ck.wait().await, Step::Progress);
        assert_eq!(ready(&sensor), vec![Outcome::Safe], "the first reading, not the second");
        // The second is in the next snapshot, taken no sooner than the interval.
        let before = Instant::now();
        assert_eq!(ck.wait().await, Step::Due);
        assert!(Instant::now() >= before + Duration::from_millis(20));
        ck.take(Some(b"s2".to_vec()));
        ck.wait().await;
        let (_, reply) = next_write(&mut rx).await;
        reply.send(Ok(())).expect("reply");
        ck.wait().await;
        assert_eq!(ready(&sensor), vec![Outcome::Safe]);
        assert!(ck.idle());
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_waits_for_the_outputs_of_windows_closed_before_it() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut ck = Checkpointer::new(tx, Duration::from_millis(25), Metrics::default());
        let output = ck.output_ticket();
        ck.changed();
        assert_eq!(ck.wait().await, Step::Due);
        ck.take(Some(b"after the close".to_vec()));
        assert_eq!(ck.wait().await, Step::Progress);
        assert!(rx.try_recv().is_err(), "not written while the output is unsafe");
        drop(output);
        assert_eq!(ck.wait().await, Step::Progress, "the write started");
        let (state, reply) = next_write(&mut rx).await;
        assert_eq!(state.as_deref(), Some(&b"after the close"[..]));
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
        ck.take(Some(b"s".to_vec()));
        ck.wait().await;
        let (_, reply) = next_write(&mut rx).await;
        reply.send(Err("disk full".to_owned())).expect("reply");
        ck.wait().await;
        assert!(ready(&sensor).is_empty(), "a failed write acknowledges nothing");
        assert_eq!(Metrics::get(&metrics.counters().window_checkpoint_failures), 1);
        assert_eq!(ck.wait().await, Step::Due, "tried again");
        ck.take(Some(b"s".to_vec()));
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
        ck.take(Some(b"older".to_vec()));
        assert_eq!(ck.wait().await, Step::Progress, "waits for the output");
        ck.hold(Some(sensor.ticket()));
        ck.take(Some(b"newer".to_vec()));
        assert!(ready(&sensor).is_empty(), "the older snapshot's reading is still held");
        drop(output);
        ck.wait().await;
        let (state, reply) = next_write(&mut rx).await;
        assert_eq!(state.as_deref(), Some(&b"newer"[..]));
        reply.send(Ok(())).expect("reply");
        ck.wait().await;
        assert_eq!(ready(&sensor), vec![Outcome::Safe, Outcome::Safe]);
        assert!(ck.idle());
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
