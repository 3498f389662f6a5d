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
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

use bytes::BytesMut;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::mqtt::wire;

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

/// What a held slot answers on the wire, as its connection recorded it: the packet id, what
/// kind of answer (a connection's own numbering: QoS 1 is a PUBACK) and whether the ACL
/// denied the publish. Queues that are not a connection's leave it at the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answer {
    pub pkid: u16,
    pub kind: u8,
    pub denied: bool,
}

impl Answer {
    /// The answer a PUBACK with reason Success gives, written without the connection's task
    /// when it is the outcome.
    fn plain_puback(&self) -> bool {
        self.kind == 1 && !self.denied
    }
}

/// Where a connection's PUBACKs may be written while its task waits: a plain TCP socket
/// that takes bytes without blocking (`WouldBlock` when its send buffer is full).
pub trait DirectWrite: Send + Sync {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

#[derive(Debug)]
struct Slot {
    answer: Answer,
    outcome: Option<Outcome>,
}

/// The PUBACK fast path of one connection (see [`AckQueue::attach`]).
struct Direct {
    writer: Weak<dyn DirectWrite>,
    /// The connection's task is running a turn (it writes the socket itself), or bytes
    /// wait in `pending`: nothing is written directly.
    busy: bool,
    /// The tail of a direct write the socket did not take, for the task to write first.
    pending: Vec<u8>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").field("busy", &self.busy).field("pending", &self.pending.len()).finish()
    }
}

#[derive(Debug, Default)]
struct Slots {
    /// Ticket number of `slots[0]`.
    base: u64,
    slots: VecDeque<Slot>,
    /// Slots whose answer is a QoS 1 acknowledgement (the receive maximum counts them).
    qos1: usize,
    direct: Option<Direct>,
}

impl Slots {
    fn push(&mut self, answer: Answer, outcome: Option<Outcome>) -> u64 {
        if answer.kind == 1 {
            self.qos1 += 1;
        }
        self.slots.push_back(Slot { answer, outcome });
        self.base + self.slots.len() as u64 - 1
    }

    fn pop_front(&mut self) -> Option<(Answer, Outcome)> {
        let outcome = self.slots.front()?.outcome?;
        let slot = self.slots.pop_front()?;
        self.base += 1;
        if slot.answer.kind == 1 {
            self.qos1 -= 1;
        }
        Some((slot.answer, outcome))
    }

    /// Writes the plain PUBACKs at the front straight to the socket, if the connection's task
    /// is waiting. Returns whether the task must still be woken: an answer at the front only
    /// it can write (a refusal, a PUBREC, a denied publish), or bytes the socket did not take.
    fn write_direct(&mut self) -> bool {
        let front_ready = |s: &Slots| s.slots.front().is_some_and(|slot| slot.outcome.is_some());
        let Some(direct) = self.direct.as_ref().filter(|d| !d.busy) else { return front_ready(self) };
        let Some(writer) = direct.writer.upgrade() else {
            // The connection is gone; nobody reads these answers.
            self.direct = None;
            return front_ready(self);
        };
        // Up to 64 acknowledgements per write, on the stack: a waiting connection holds no
        // buffer.
        let mut buf = [0u8; 256];
        loop {
            let mut len = 0;
            while len < buf.len()
                && let Some(slot) = self.slots.front()
                && slot.outcome == Some(Outcome::Safe)
                && slot.answer.plain_puback()
            {
                buf[len..len + 4].copy_from_slice(&wire::puback_success(slot.answer.pkid));
                len += 4;
                let _ = self.pop_front();
            }
            if len == 0 {
                return front_ready(self);
            }
            let written = match writer.try_write(&buf[..len]) {
                Ok(n) => n.min(len),
                // The task's own write finds the error (or the room) again.
                Err(_) => 0,
            };
            if written < len {
                if let Some(direct) = self.direct.as_mut() {
                    direct.pending.extend_from_slice(&buf[written..len]);
                    direct.busy = true;
                }
                return true;
            }
        }
    }
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
        self.issue(Answer::default(), None)
    }

    /// Issues the ticket for the next held answer of a connection, `answer` its wire form.
    pub fn answer_ticket(self: &Arc<AckQueue>, answer: Answer) -> Ticket {
        self.issue(answer, None)
    }

    /// Issues the ticket for a sensor's publish read just now: when its last copy drops, the
    /// time it was held is observed into `metrics`' `puback_hold` histogram.
    pub fn timed_ticket(self: &Arc<AckQueue>, metrics: &Metrics, answer: Answer) -> Ticket {
        self.metrics.get_or_init(|| metrics.clone());
        self.issue(answer, Some(Instant::now()))
    }

    fn issue(self: &Arc<AckQueue>, answer: Answer, received: Option<Instant>) -> Ticket {
        let n = self.lock().push(answer, None);
        Ticket(Arc::new(TicketInner {
            queue: Arc::clone(self),
            n,
            rejected: AtomicBool::new(false),
            received,
        }))
    }

    /// A publish answered without entering the pipeline: its answer waits behind the ones
    /// still held, so acknowledgements keep their arrival order.
    pub fn answered(&self, outcome: Outcome, answer: Answer) {
        let wake = {
            let mut s = self.lock();
            s.push(answer, Some(outcome));
            s.slots.len() == 1 && s.write_direct()
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
            slot.outcome = Some(outcome);
            i == 0 && s.write_direct()
        };
        if wake {
            self.ready.notify_one();
        }
    }

    /// Resolves once the oldest held publish has an outcome the connection must write itself.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Takes the outcomes that can be acknowledged now: the completed prefix, in order.
    pub fn take_ready(&self, out: &mut Vec<Outcome>) {
        let mut s = self.lock();
        while let Some((_, outcome)) = s.pop_front() {
            out.push(outcome);
        }
    }

    /// Takes the answers that can be written now, with their outcomes: the completed prefix,
    /// in order.
    pub fn take_answers(&self, out: &mut Vec<(Answer, Outcome)>) {
        let mut s = self.lock();
        while let Some(ready) = s.pop_front() {
            out.push(ready);
        }
    }

    /// Whether no answer is held.
    pub fn is_empty(&self) -> bool {
        self.lock().slots.is_empty()
    }

    /// Held answers that are QoS 1 acknowledgements.
    pub fn held_qos1(&self) -> usize {
        self.lock().qos1
    }

    /// Whether an answer of `kind` for `pkid` is held.
    pub fn holds(&self, pkid: u16, kind: u8) -> bool {
        self.lock().slots.iter().any(|s| s.answer.pkid == pkid && s.answer.kind == kind)
    }

    /// Lets PUBACKs with reason Success be written to `writer` by whoever makes them ready
    /// (the relay, the route stage, the store's commit) while the connection's task waits
    /// between turns, instead of waking the task to write four bytes: at a thousand sensors
    /// a wake-up and a turn of a connection's task per event cost more than the event's
    /// own work. The order of the answers is the queue's either way. The connection starts
    /// inside a turn ([`AckQueue::end_turn`] opens the path); `writer` is weak so that a
    /// closed connection's socket is never written (its descriptor may be reused).
    pub fn attach(&self, writer: Weak<dyn DirectWrite>) {
        self.lock().direct = Some(Direct { writer, busy: true, pending: Vec::new() });
    }

    /// The connection's task starts a turn in which it writes the socket: nothing is
    /// written directly until it ends. What a direct write left over goes to the front of
    /// `out`, which is then written before anything the turn adds.
    pub fn begin_turn(&self, out: &mut BytesMut) {
        let mut s = self.lock();
        if let Some(direct) = s.direct.as_mut() {
            direct.busy = true;
            take_pending(direct, out);
        }
    }

    /// The connection's task has written everything and waits: PUBACKs ready from now on
    /// (or already) are written directly.
    pub fn end_turn(&self) {
        let wake = {
            let mut s = self.lock();
            match s.direct.as_mut() {
                Some(direct) if direct.pending.is_empty() => {
                    direct.busy = false;
                    s.write_direct()
                }
                _ => false,
            }
        };
        if wake {
            self.ready.notify_one();
        }
    }

    /// The connection closes: no more direct writes, and what one left over goes to the
    /// front of `out`.
    pub fn detach(&self, out: &mut BytesMut) {
        if let Some(mut direct) = self.lock().direct.take() {
            take_pending(&mut direct, out);
        }
    }
}

fn take_pending(direct: &mut Direct, out: &mut BytesMut) {
    if !direct.pending.is_empty() {
        let mut front = BytesMut::from(&direct.pending[..]);
        front.extend_from_slice(out);
        *out = front;
        direct.pending = Vec::new();
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
        assert!(q.is_empty());
    }

    #[test]
    fn an_answered_publish_waits_behind_held_ones() {
        let q = AckQueue::new();
        let a = q.ticket();
        q.answered(Outcome::TopicInvalid, Answer::default());
        assert!(ready(&q).is_empty(), "the refusal waits for a");
        drop(a);
        assert_eq!(ready(&q), vec![Outcome::Safe, Outcome::TopicInvalid]);
        q.answered(Outcome::TopicInvalid, Answer::default());
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
        let t = q.timed_ticket(&metrics, Answer::default());
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
        let held_elsewhere = q.timed_ticket(&metrics, Answer::default());
        let copy = held_elsewhere.clone();
        let batch = vec![
            held_elsewhere,
            q.timed_ticket(&metrics, Answer::default()),
            q.timed_ticket(&metrics, Answer::default()),
        ];
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

    /// A socket that takes `room` more bytes, then says `WouldBlock`.
    #[derive(Default)]
    struct Socket {
        bytes: Mutex<Vec<u8>>,
        room: Mutex<usize>,
    }

    impl Socket {
        fn with_room(room: usize) -> Arc<Socket> {
            Arc::new(Socket { bytes: Mutex::default(), room: Mutex::new(room) })
        }

        fn taken(&self) -> Vec<u8> {
            self.bytes.lock().expect("lock").clone()
        }

        /// What the connection's task writes: everything, as an awaited write does.
        fn write_all(&self, buf: &[u8]) {
            self.bytes.lock().expect("lock").extend_from_slice(buf);
        }
    }

    impl DirectWrite for Socket {
        fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
            let mut room = self.room.lock().expect("lock");
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(*room);
            *room -= n;
            self.bytes.lock().expect("lock").extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn attached(socket: &Arc<Socket>) -> Arc<AckQueue> {
        let q = AckQueue::new();
        let writer: Arc<dyn DirectWrite> = socket.clone();
        q.attach(Arc::downgrade(&writer));
        q
    }

    fn puback(pkid: u16) -> Answer {
        Answer { pkid, kind: 1, denied: false }
    }

    fn pubacks(pkids: &[u16]) -> Vec<u8> {
        pkids.iter().flat_map(|&p| wire::puback_success(p)).collect()
    }

    /// Whether the connection's task was woken (consumes the wake-up).
    fn woken(q: &AckQueue) -> bool {
        let mut ready = std::pin::pin!(q.ready());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        ready.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn pubacks_are_written_in_order_without_waking_a_waiting_connection() {
        let socket = Socket::with_room(usize::MAX);
        let q = attached(&socket);
        q.end_turn();
        let (a, b) = (q.answer_ticket(puback(1)), q.answer_ticket(puback(2)));
        drop(b);
        assert!(socket.taken().is_empty(), "2 waits for 1");
        drop(a);
        assert_eq!(socket.taken(), pubacks(&[1, 2]));
        assert!(!woken(&q), "nothing was left for the task");
        assert!(q.is_empty());
        assert_eq!(q.held_qos1(), 0);
    }

    #[test]
    fn inside_a_turn_the_task_writes_its_answers_itself() {
        let socket = Socket::with_room(usize::MAX);
        let q = attached(&socket);
        // Attached inside a turn: nothing is written before the first one ends.
        drop(q.answer_ticket(puback(1)));
        assert!(socket.taken().is_empty());
        assert!(woken(&q));
        let mut out = Vec::new();
        q.take_answers(&mut out);
        assert_eq!(out, vec![(puback(1), Outcome::Safe)]);
        q.end_turn();
        drop(q.answer_ticket(puback(2)));
        assert_eq!(socket.taken(), pubacks(&[2]));
        q.begin_turn(&mut BytesMut::new());
        drop(q.answer_ticket(puback(3)));
        assert_eq!(socket.taken(), pubacks(&[2]), "3 waits for the task");
        assert!(woken(&q));
    }

    #[test]
    fn a_turn_that_ends_with_answers_ready_writes_them() {
        let socket = Socket::with_room(usize::MAX);
        let q = attached(&socket);
        drop(q.answer_ticket(puback(7)));
        let _ = woken(&q);
        q.end_turn();
        assert_eq!(socket.taken(), pubacks(&[7]));
        assert!(!woken(&q));
    }

    #[test]
    fn what_the_socket_does_not_take_goes_first_in_the_next_turn() {
        let socket = Socket::with_room(6);
        let q = attached(&socket);
        q.end_turn();
        // One at a time, as the relay drops them: 1 whole, 2 in part, 3 left for the task.
        let tickets: Vec<Ticket> = (1..=3).map(|p| q.answer_ticket(puback(p))).collect();
        drop(tickets);
        assert_eq!(socket.taken(), pubacks(&[1, 2])[..6].to_vec());
        assert!(woken(&q), "the task writes the rest");
        drop(q.answer_ticket(puback(4)));
        assert_eq!(socket.taken().len(), 6, "nothing more is written directly meanwhile");
        let mut out = BytesMut::from(&b"PING"[..]);
        q.begin_turn(&mut out);
        let mut ready = Vec::new();
        q.take_answers(&mut ready);
        assert_eq!(ready, vec![(puback(3), Outcome::Safe), (puback(4), Outcome::Safe)]);
        assert_eq!(&out[..], [&pubacks(&[1, 2])[6..], b"PING"].concat());
        q.end_turn();
        *socket.room.lock().expect("lock") = usize::MAX;
        drop(q.answer_ticket(puback(5)));
        assert_eq!(&socket.taken()[6..], &pubacks(&[5])[..], "open again after a turn");
    }

    #[test]
    fn answers_only_the_task_can_write_wake_it_and_hold_back_the_ones_behind() {
        let socket = Socket::with_room(usize::MAX);
        let q = attached(&socket);
        q.end_turn();
        let denied = Answer { pkid: 1, kind: 1, denied: true };
        let pubrec = Answer { pkid: 2, kind: 2, denied: false };
        let (a, b, c, d) = (
            q.answer_ticket(puback(9)),
            q.answer_ticket(denied),
            q.answer_ticket(pubrec),
            q.answer_ticket(puback(3)),
        );
        drop(d);
        drop(c);
        drop(b);
        drop(a);
        assert_eq!(socket.taken(), pubacks(&[9]), "the plain one before them only");
        assert!(woken(&q));
        let mut out = Vec::new();
        q.take_answers(&mut out);
        assert_eq!(out.iter().map(|(a, _)| a.pkid).collect::<Vec<_>>(), vec![1, 2, 3]);
        let rejected = q.answer_ticket(puback(4));
        rejected.reject();
        drop(rejected);
        assert!(woken(&q), "a refusal is the task's to write");
        assert_eq!(socket.taken(), pubacks(&[9]));
    }

    #[test]
    fn a_closed_connection_is_never_written() {
        let socket = Socket::with_room(usize::MAX);
        let q = AckQueue::new();
        {
            let writer: Arc<dyn DirectWrite> = Arc::new(Socket::default());
            q.attach(Arc::downgrade(&writer));
        }
        q.end_turn();
        drop(q.answer_ticket(puback(1)));
        assert!(woken(&q));
        assert!(socket.taken().is_empty());
        let q = attached(&socket);
        q.end_turn();
        q.detach(&mut BytesMut::new());
        drop(q.answer_ticket(puback(2)));
        assert!(socket.taken().is_empty(), "detached");
        assert!(woken(&q));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A publish read: a plain PUBACK or an answer only the task writes.
        Issue { plain: bool },
        /// The last copy of the i-th held ticket (modulo) is dropped.
        Release(usize),
        /// A turn of the connection's task: it writes every ready answer itself.
        Turn,
        /// The socket's send buffer drains by this much.
        Drain(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any::<bool>().prop_map(|plain| Op::Issue { plain }),
            any::<usize>().prop_map(Op::Release),
            Just(Op::Turn),
            (0usize..20).prop_map(Op::Drain),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        /// Whoever writes them, the answers reach the socket exactly once each, whole and in
        /// arrival order, and a connection is woken whenever something is left for it.
        #[test]
        fn answers_reach_the_socket_once_and_in_order(ops in proptest::collection::vec(op(), 1..80)) {
            let socket = Socket::with_room(0);
            let q = attached(&socket);
            q.end_turn();
            let mut held: Vec<Ticket> = Vec::new();
            let mut issued: Vec<Answer> = Vec::new();
            let task_turn = |q: &AckQueue| {
                let mut out = BytesMut::new();
                q.begin_turn(&mut out);
                let mut ready = Vec::new();
                q.take_answers(&mut ready);
                for (answer, _) in ready {
                    let [hi, lo] = answer.pkid.to_be_bytes();
                    out.extend_from_slice(&[if answer.plain_puback() { 0x40 } else { 0x50 }, 2, hi, lo]);
                }
                socket.write_all(&out);
                q.end_turn();
            };
            for op in ops {
                match op {
                    Op::Issue { plain } => {
                        let answer = Answer { pkid: issued.len() as u16, kind: if plain { 1 } else { 2 }, denied: false };
                        issued.push(answer);
                        held.push(q.answer_ticket(answer));
                    }
                    Op::Release(i) if !held.is_empty() => drop(held.remove(i % held.len())),
                    Op::Release(_) => {}
                    Op::Turn => task_turn(&q),
                    Op::Drain(n) => *socket.room.lock().expect("lock") += n,
                }
                // The runtime runs a woken task.
                if woken(&q) {
                    task_turn(&q);
                }
            }
            drop(held);
            while woken(&q) {
                task_turn(&q);
            }
            let want: Vec<u8> = issued
                .iter()
                .flat_map(|a| {
                    let [hi, lo] = a.pkid.to_be_bytes();
                    [if a.plain_puback() { 0x40 } else { 0x50 }, 2, hi, lo]
                })
                .collect();
            prop_assert_eq!(socket.taken(), want);
            prop_assert!(q.is_empty());
        }
    }
}
