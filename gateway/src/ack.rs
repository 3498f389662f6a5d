//! Holding a sensor's PUBACK until its event is safe.
//!
//! Every QoS 1/2 publish a connection reads gets a [`Ticket`]. The ticket travels with the
//! event through the route stage (cloned into each upstream copy a rule makes) into the relay,
//! which drops its copy once the event is committed to the buffer or acknowledged upstream.
//! When the last copy is gone the event is safe, and the ticket marks its slot in the
//! connection's [`AckQueue`]; the connection sends acknowledgements strictly in the order the
//! publishes arrived, as MQTT requires, so a slot waits for every slot before it.
//!
//! Dropping is the success path on purpose: every way an event can leave the pipeline — sent
//! and acknowledged, committed, filtered out by a rule, dropped by a stated policy (TTL,
//! `drop_oldest`) — is a decision the gateway made about an event it holds, and the sensor must
//! not resend it. The one refusal, a full buffer under `reject_new`, calls [`Ticket::reject`]
//! first, so the sensor is told (MQTT 5 reason code) or disconnected (3.1.1) instead.
//!
//! A sensor's ticket ([`AckQueue::timed_ticket`]) also measures how long the PUBACK was held:
//! from the publish read to its last copy dropped, observed into `outpost_puback_hold_seconds`
//! (wait-free: two clock reads and the histogram's atomics, no lock). A checkpoint's commit
//! releases its tickets with [`release_all`]: one clock read for the whole batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// What became of one held publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Safe: committed, acknowledged upstream, or deliberately not forwarded.
    Safe,
    /// Refused by the buffer's `reject_new` policy: not stored, the sensor must resend.
    Rejected,
    /// Refused at ingest for its topic (MQTT 5 PUBACK 0x90): never entered the pipeline.
    TopicInvalid,
}

#[derive(Debug, Default)]
struct Slots {
    /// Ticket number of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<Outcome>>,
}

/// One connection's held acknowledgements, in arrival order.
#[derive(Debug, Default)]
pub struct AckQueue {
    slots: Mutex<Slots>,
    ready: Notify,
    /// Where timed tickets observe their hold time; set by the first one.
    metrics: OnceLock<Metrics>,
}

impl AckQueue {
    pub fn new() -> Arc<AckQueue> {
        Arc::new(AckQueue::default())
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Issues the ticket for the next held publish.
    pub fn ticket(self: &Arc<AckQueue>) -> Ticket {
        self.issue(None)
    }

    /// Issues the ticket for a sensor's publish read just now: when its last copy drops, the
    /// time it was held is observed into `metrics`' `puback_hold` histogram.
    pub fn timed_ticket(self: &Arc<AckQueue>, metrics: &Metrics) -> Ticket {
        self.metrics.get_or_init(|| metrics.clone());
        self.issue(Some(Instant::now()))
    }

    fn issue(self: &Arc<AckQueue>, received: Option<Instant>) -> Ticket {
        let n = {
            let mut s = self.lock();
            s.slots.push_back(None);
            s.base + s.slots.len() as u64 - 1
        };
        Ticket(Arc::new(TicketInner {
            queue: Arc::clone(self),
            n,
            rejected: AtomicBool::new(false),
            received,
        }))
    }

    /// A publish answered without entering the pipeline: its answer waits behind the ones
    /// still held, so acknowledgements keep their arrival order.
    pub fn answered(&self, outcome: Outcome) {
        let wake = {
            let mut s = self.lock();
            s.slots.push_back(Some(outcome));
            s.slots.len() == 1
        };
        if wake {
            self.ready.notify_one();
        }
    }

    fn complete(&self, n: u64, outcome: Outcome) {
        let wake = {
            let mut s = self.lock();
            let Some(i) = n.checked_sub(s.base) else { return };
            let Some(slot) = s.slots.get_mut(i as usize) else { return };
            *slot = Some(outcome);
            i == 0
        };
        if wake {
            self.ready.notify_one();
        }
    }

    /// Resolves once the oldest held publish has an outcome.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Takes the outcomes that can be acknowledged now: the completed prefix, in order.
    pub fn take_ready(&self, out: &mut Vec<Outcome>) {
        let mut s = self.lock();
        while let Some(Some(outcome)) = s.slots.front() {
            out.push(*outcome);
            s.slots.pop_front();
            s.base += 1;
        }
    }

    /// Publishes still waiting to be acknowledged.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().slots.len()
    }
}

#[derive(Debug)]
struct TicketInner {
    queue: Arc<AckQueue>,
    n: u64,
    rejected: AtomicBool,
    /// When the publish was read, for a timed ticket.
    received: Option<Instant>,
}

impl Drop for TicketInner {
    fn drop(&mut self) {
        let outcome = if self.rejected.load(Ordering::Relaxed) { Outcome::Rejected } else { Outcome::Safe };
        self.queue.complete(self.n, outcome);
        if let (Some(received), Some(metrics)) = (self.received, self.queue.metrics.get()) {
            metrics.histograms().puback_hold.observe_duration(received.elapsed());
        }
    }
}

/// A held acknowledgement; the publish is acknowledged when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Ticket(Arc<TicketInner>);

/// Drops a batch of tickets made safe at one instant `now` (a checkpoint's commit: some
/// hundreds at a time), each as a drop would, but with one clock read for the batch
/// instead of one per ticket: a timed ticket whose last copy this is observes its own hold,
/// `now` minus its receive time. A ticket with copies held elsewhere is only dropped here.
pub fn release_all(tickets: Vec<Ticket>, now: Instant) {
    for ticket in tickets {
        if let Some(mut inner) = Arc::into_inner(ticket.0) {
            if let (Some(received), Some(metrics)) = (inner.received.take(), inner.queue.metrics.get()) {
                metrics.histograms().puback_hold.observe_duration(now.saturating_duration_since(received));
            }
            // Its drop completes the slot (and, its receive time taken, reads no clock).
            drop(inner);
        }
    }
}

impl Ticket {
    /// Marks the publish as refused: the sensor gets a failure instead of a PUBACK.
    pub fn reject(&self) {
        self.0.rejected.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(q: &AckQueue) -> Vec<Outcome> {
        let mut out = Vec::new();
        q.take_ready(&mut out);
        out
    }

    #[test]
    fn acknowledgements_leave_in_arrival_order() {
        let q = AckQueue::new();
        let a = q.ticket();
        let b = q.ticket();
        let c = q.ticket();
        drop(c);
        assert!(ready(&q).is_empty(), "c waits for a and b");
        drop(a);
        assert_eq!(ready(&q), vec![Outcome::Safe]);
        b.reject();
        drop(b);
        assert_eq!(ready(&q), vec![Outcome::Rejected, Outcome::Safe]);
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn an_answered_publish_waits_behind_held_ones() {
        let q = AckQueue::new();
        let a = q.ticket();
        q.answered(Outcome::TopicInvalid);
        assert!(ready(&q).is_empty(), "the refusal waits for a");
        drop(a);
        assert_eq!(ready(&q), vec![Outcome::Safe, Outcome::TopicInvalid]);
        q.answered(Outcome::TopicInvalid);
        assert_eq!(ready(&q), vec![Outcome::TopicInvalid]);
    }

    #[test]
    fn a_publish_is_safe_only_when_every_copy_is() {
        let q = AckQueue::new();
        let t = q.ticket();
        let copy = t.clone();
        drop(t);
        assert!(ready(&q).is_empty());
        drop(copy);
        assert_eq!(ready(&q), vec![Outcome::Safe]);
    }

    #[test]
    fn a_timed_ticket_observes_its_hold_time_when_its_last_copy_drops() {
        let metrics = Metrics::default();
        let q = AckQueue::new();
        let t = q.timed_ticket(&metrics);
        let copy = t.clone();
        drop(t);
        assert_eq!(metrics.histograms().puback_hold.snapshot().count, 0, "a copy is still held");
        drop(copy);
        assert_eq!(metrics.histograms().puback_hold.snapshot().count, 1);
        drop(q.ticket());
        assert_eq!(metrics.histograms().puback_hold.snapshot().count, 1, "untimed tickets are not observed");
        assert_eq!(ready(&q), vec![Outcome::Safe, Outcome::Safe]);
    }

    #[test]
    fn a_batch_release_acknowledges_in_order_and_observes_each_last_copy_once() {
        let metrics = Metrics::default();
        let q = AckQueue::new();
        let held_elsewhere = q.timed_ticket(&metrics);
        let copy = held_elsewhere.clone();
        let batch = vec![held_elsewhere, q.timed_ticket(&metrics), q.timed_ticket(&metrics)];
        let now = Instant::now();
        release_all(batch, now);
        assert_eq!(metrics.histograms().puback_hold.snapshot().count, 2, "the two last copies");
        assert!(ready(&q).is_empty(), "the first publish has a copy held elsewhere: all wait for it");
        drop(copy);
        assert_eq!(metrics.histograms().puback_hold.snapshot().count, 3, "observed once, at its last drop");
        assert_eq!(ready(&q), vec![Outcome::Safe, Outcome::Safe, Outcome::Safe]);
    }

    #[tokio::test]
    async fn the_connection_is_woken_when_the_oldest_completes() {
        let q = AckQueue::new();
        let t = q.ticket();
        let waiter = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.ready().await })
        };
        drop(t);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken").expect("task");
        assert_eq!(ready(&q), vec![Outcome::Safe]);
    }
}
