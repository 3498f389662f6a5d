//! Local fan-out: sessions, their subscriptions and their bounded delivery queues.
//!
//! Every session (one per client id) has a [`Mailbox`]; a publish is matched against the
//! [`SubTrie`] once, and a copy (sharing topic and payload bytes) is queued in each matching
//! session's mailbox at `min(publish QoS, subscription QoS)`. The connection that owns a session
//! takes from its mailbox as its QoS 1 window allows and writes to its socket.
//!
//! # Invariants
//! - **Every piece of state a client can create is bounded and released.** Per session:
//!   `broker.max_queued_messages` queued deliveries, `broker.max_subscriptions` filters. Sessions:
//!   one per connection, plus at most `broker.max_offline_sessions` persistent ones offline
//!   (beyond it the one offline longest is ended, counted and logged). A clean session's
//!   subscriptions and queue go with its connection; a persistent one's with its expiry. The
//!   trie prunes what unsubscribes leave empty; nothing is kept per published topic.
//! - **No silent gap.** A delivery is queued, or dropped and counted (`local_dropped`) and
//!   logged (rate-limited): a connected subscriber whose queue is full makes the publisher wait
//!   up to [`FULL_QUEUE_WAIT`], once per episode (until its queue drains to half), then its
//!   deliveries are dropped; an offline session's QoS ≥ 1 deliveries beyond its queue are
//!   dropped. QoS 0 to an offline session is not queued (MQTT allows either; mosquitto's default).
//! - Deliveries to one session leave in the order they were queued; QoS 1 deliveries left
//!   unacknowledged when a persistent session's connection ends go back to the front of its
//!   queue and are sent again with DUP and their packet id.
//! - The publisher never holds a lock while it waits, and no lock is held across an `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttd::protocol::{Publish, PublishProperties};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use super::subs::SubTrie;
use crate::metrics::Metrics;
use crate::telemetry::LogThrottles;

/// How long a publisher waits for room in a connected subscriber's full queue before the
/// delivery is dropped (once per episode: see the module invariants).
pub const FULL_QUEUE_WAIT: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One delivery waiting in a mailbox or in flight to a subscriber.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic and payload (its QoS and packet id are set when it is written).
    pub publish: Publish,
    /// `min(publish QoS, subscription QoS)`.
    pub qos: u8,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
    /// A redelivery after a reconnect: the packet id it was first sent with (sent with DUP).
    pub resend: Option<u16>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Message>,
    online: bool,
    /// A wait for room timed out: further deliveries are dropped at once until the queue has
    /// drained to half, so a stalled reader costs each publisher one wait, not one per message.
    lagging: bool,
}

/// A session's bounded delivery queue.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Queue>,
    cap: usize,
    /// Wakes the connection: something was queued.
    ready: Notify,
    /// Wakes waiting publishers: something was taken.
    space: Notify,
}

enum Offer {
    Queued,
    /// QoS 0 for an offline session: not kept, by design.
    NotKept,
    /// Full. `wait`: the publisher may wait for room (connected and not lagging).
    Full {
        message: Box<Message>,
        wait: bool,
    },
}

impl Mailbox {
    fn new(cap: usize, online: bool) -> Mailbox {
        Mailbox {
            queue: Mutex::new(Queue { items: VecDeque::new(), online, lagging: false }),
            cap,
            ready: Notify::new(),
            space: Notify::new(),
        }
    }

    fn offer(&self, message: Message) -> Offer {
        let mut q = lock(&self.queue);
        if !q.online && message.qos == 0 {
            return Offer::NotKept;
        }
        if q.items.len() < self.cap {
            q.items.push_back(message);
            drop(q);
            self.ready.notify_one();
            return Offer::Queued;
        }
        Offer::Full { wait: q.online && !q.lagging, message: Box::new(message) }
    }

    /// Resolves when something may have been queued.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Takes deliveries from the front while `take` accepts them, in order.
    pub fn take(&self, mut take: impl FnMut(&Message) -> bool, out: &mut Vec<Message>) {
        let mut q = lock(&self.queue);
        let before = q.items.len();
        while let Some(front) = q.items.front() {
            if !take(front) {
                break;
            }
            if let Some(m) = q.items.pop_front() {
                out.push(m);
            }
        }
        if q.items.len() <= self.cap / 2 {
            q.lagging = false;
        }
        let took = q.items.len() < before;
        drop(q);
        if took {
            self.space.notify_waiters();
        }
    }

    /// Queued deliveries (tests and memory checks).
    pub fn len(&self) -> usize {
        lock(&self.queue).items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set_online(&self, online: bool, mut resend: Vec<Message>) {
        let mut q = lock(&self.queue);
        q.online = online;
        q.lagging = false;
        // In the order they were first sent, ahead of everything queued after them.
        resend.reverse();
        for m in resend {
            q.items.push_front(m);
        }
        let any = !q.items.is_empty();
        drop(q);
        if any {
            self.ready.notify_one();
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    /// The session holds `broker.max_subscriptions` filters already.
    TooMany,
}

struct SessionState {
    mailbox: Arc<Mailbox>,
    filters: HashSet<String>,
    /// Serial of the connection holding the session; `None` while offline.
    owner: Option<u64>,
    persistent: bool,
    /// How long the session outlives its connection; `None`: until evicted.
    expiry: Option<Duration>,
    offline_since: Option<Instant>,
}

#[derive(Default)]
struct State {
    trie: SubTrie<Arc<str>>,
    sessions: HashMap<Arc<str>, SessionState>,
    offline: usize,
}

impl State {
    fn end_session(&mut self, id: &Arc<str>) {
        if let Some(s) = self.sessions.remove(id) {
            for f in &s.filters {
                self.trie.unsubscribe(id, f);
            }
            if s.owner.is_none() {
                self.offline -= 1;
            }
        }
    }
}

/// A connection's claim on its session.
pub struct Attached {
    pub mailbox: Arc<Mailbox>,
    /// A persistent session was resumed.
    pub present: bool,
    /// Its filters (resumed sessions only).
    pub filters: Vec<String>,
}

/// Limits of the local fan-out, from `[broker]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_queued: usize,
    pub max_offline: usize,
    pub max_filters: usize,
}

/// All local sessions: the subscription trie and the mailboxes.
pub struct Local {
    limits: Limits,
    metrics: Metrics,
    state: Mutex<State>,
    /// Subscriptions held, readable without the lock (the no-subscriber fast path).
    subscriptions: AtomicUsize,
    logs: LogThrottles,
}

impl Local {
    pub fn new(limits: Limits, metrics: Metrics) -> Local {
        Local {
            limits,
            metrics,
            state: Mutex::default(),
            subscriptions: AtomicUsize::new(0),
            logs: LogThrottles::default(),
        }
    }

    fn publish_gauges(&self, state: &State) {
        self.subscriptions.store(state.trie.len(), Ordering::Relaxed);
        let g = self.metrics.gauges();
        Metrics::set(&g.local_subscriptions, state.trie.len() as u64);
        Metrics::set(&g.offline_sessions, state.offline as u64);
    }

    /// Claims `id`'s session for the connection `serial`: a clean start ends whatever was
    /// there; otherwise the session is resumed if there is one (with its queue and its
    /// unacknowledged deliveries first). `persistent`: it outlives the connection.
    pub fn attach(
        &self,
        id: &Arc<str>,
        serial: u64,
        clean_start: bool,
        persistent: bool,
        expiry: Option<Duration>,
    ) -> Attached {
        let mut state = lock(&self.state);
        if clean_start {
            state.end_session(id);
        }
        if let Some(s) = state.sessions.get_mut(id) {
            let was_offline = s.owner.is_none();
            s.owner = Some(serial);
            s.persistent = persistent;
            s.expiry = expiry;
            s.offline_since = None;
            s.mailbox.set_online(true, Vec::new());
            let attached = Attached {
                mailbox: Arc::clone(&s.mailbox),
                present: true,
                filters: s.filters.iter().cloned().collect(),
            };
            if was_offline {
                state.offline -= 1;
            }
            self.publish_gauges(&state);
            return attached;
        }
        let mailbox = Arc::new(Mailbox::new(self.limits.max_queued, true));
        state.sessions.insert(
            Arc::clone(id),
            SessionState {
                mailbox: Arc::clone(&mailbox),
                filters: HashSet::new(),
                owner: Some(serial),
                persistent,
                expiry,
                offline_since: None,
            },
        );
        self.publish_gauges(&state);
        Attached { mailbox, present: false, filters: Vec::new() }
    }

    /// The connection `serial` ends. A clean session ends with it; a persistent one goes
    /// offline with `inflight` (QoS 1 deliveries not acknowledged, in the order they were sent)
    /// back at the front of its queue. A connection that was taken over changes nothing but
    /// hands its unacknowledged deliveries to the session, if it is still the same one.
    pub fn detach(&self, id: &Arc<str>, serial: u64, mailbox: &Arc<Mailbox>, inflight: Vec<Message>) {
        let mut state = lock(&self.state);
        let Some(s) = state.sessions.get_mut(id) else { return };
        if s.owner != Some(serial) {
            if s.persistent && Arc::ptr_eq(&s.mailbox, mailbox) && !inflight.is_empty() {
                s.mailbox.set_online(s.owner.is_some(), inflight);
            }
            return;
        }
        if !s.persistent {
            state.end_session(id);
            self.publish_gauges(&state);
            return;
        }
        s.owner = None;
        s.offline_since = Some(Instant::now());
        s.mailbox.set_online(false, inflight);
        state.offline += 1;
        if state.offline > self.limits.max_offline {
            let oldest = state
                .sessions
                .iter()
                .filter_map(|(k, s)| s.offline_since.map(|t| (t, Arc::clone(k))))
                .min()
                .map(|(_, k)| k);
            if let Some(victim) = oldest {
                state.end_session(&victim);
                Metrics::add(&self.metrics.counters().sessions_evicted, 1);
                if let Some(folded) = self.logs.ready("evicted") {
                    warn!(message = "a persistent session was ended: broker.max_offline_sessions offline sessions are kept already; raise it, or have clients that do not return use clean sessions", client_id = %victim, similar_since_last_log = folded);
                }
            }
        }
        self.publish_gauges(&state);
    }

    /// Ends offline sessions whose expiry has passed. Returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut state = lock(&self.state);
        let due: Vec<Arc<str>> = state
            .sessions
            .iter()
            .filter(|(_, s)| match (s.offline_since, s.expiry) {
                (Some(since), Some(expiry)) => now.saturating_duration_since(since) >= expiry,
                _ => false,
            })
            .map(|(k, _)| Arc::clone(k))
            .collect();
        for id in &due {
            state.end_session(id);
        }
        if !due.is_empty() {
            Metrics::add(&self.metrics.counters().sessions_expired, due.len() as u64);
            self.publish_gauges(&state);
        }
        due.len()
    }

    /// Adds (or updates the QoS of) a subscription of `id`'s session.
    pub fn subscribe(&self, id: &Arc<str>, filter: &str, qos: u8) -> Result<(), SubscribeError> {
        let mut state = lock(&self.state);
        let State { trie, sessions, .. } = &mut *state;
        let Some(s) = sessions.get_mut(id) else { return Ok(()) };
        if !s.filters.contains(filter) {
            if s.filters.len() >= self.limits.max_filters {
                return Err(SubscribeError::TooMany);
            }
            s.filters.insert(filter.to_owned());
        }
        trie.subscribe(id, filter, qos);
        self.publish_gauges(&state);
        Ok(())
    }

    /// Removes a subscription; returns whether there was one.
    pub fn unsubscribe(&self, id: &Arc<str>, filter: &str) -> bool {
        let mut state = lock(&self.state);
        let State { trie, sessions, .. } = &mut *state;
        let Some(s) = sessions.get_mut(id) else { return false };
        if !s.filters.remove(filter) {
            return false;
        }
        trie.unsubscribe(id, filter);
        self.publish_gauges(&state);
        true
    }

    /// Filters of `id`'s session, sorted (tests).
    #[cfg(test)]
    fn filters(&self, id: &str) -> Vec<String> {
        let state = lock(&self.state);
        let mut f: Vec<String> =
            state.sessions.get(id).map(|s| s.filters.iter().cloned().collect()).unwrap_or_default();
        f.sort();
        f
    }

    /// The mailboxes `topic` goes to, with the QoS of each delivery.
    fn targets(&self, topic: &str, qos: u8) -> Vec<(Arc<str>, Arc<Mailbox>, u8)> {
        if self.subscriptions.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let state = lock(&self.state);
        let State { trie, sessions, .. } = &*state;
        let mut matched = Vec::new();
        trie.matches(topic, |k| sessions.get(k).is_some_and(|s| s.owner.is_some()), &mut matched);
        matched
            .into_iter()
            .filter_map(|(k, sub_qos)| {
                let mailbox = Arc::clone(&sessions.get(&k)?.mailbox);
                Some((k, mailbox, qos.min(sub_qos)))
            })
            .collect()
    }

    /// Queues `publish` for every matching session. `wait`: a publisher that may be slowed
    /// down (a sensor connection) waits up to [`FULL_QUEUE_WAIT`] for room in a full queue;
    /// one that must not (rules' republish) drops at once. Returns deliveries queued.
    pub async fn publish(
        &self,
        topic: &str,
        publish: &Publish,
        qos: u8,
        properties: Option<&PublishProperties>,
        wait: bool,
    ) -> usize {
        let mut queued = 0;
        for (id, mailbox, qos) in self.targets(topic, qos) {
            let mut message = Message {
                publish: publish.clone(),
                qos,
                retain: false,
                properties: properties.cloned(),
                resend: None,
            };
            let deadline = Instant::now() + FULL_QUEUE_WAIT;
            loop {
                // Registered before the offer, so room made in between is not missed.
                let space = mailbox.space.notified();
                tokio::pin!(space);
                space.as_mut().enable();
                match mailbox.offer(message) {
                    Offer::Queued => {
                        queued += 1;
                        break;
                    }
                    Offer::NotKept => break,
                    Offer::Full { message: m, wait: may_wait } => {
                        if wait && may_wait && tokio::time::timeout_at(deadline, space).await.is_ok() {
                            message = *m;
                            continue;
                        }
                        if may_wait {
                            lock(&mailbox.queue).lagging = true;
                        }
                        self.dropped(&id, topic);
                        break;
                    }
                }
            }
        }
        queued
    }

    /// Like [`Local::publish`] without waiting: for callers that must not be slowed down.
    pub fn publish_now(
        &self,
        topic: &str,
        publish: &Publish,
        properties: Option<&PublishProperties>,
    ) -> usize {
        let mut queued = 0;
        for (id, mailbox, qos) in self.targets(topic, 0) {
            let message = Message {
                publish: publish.clone(),
                qos,
                retain: false,
                properties: properties.cloned(),
                resend: None,
            };
            match mailbox.offer(message) {
                Offer::Queued => queued += 1,
                Offer::NotKept => {}
                Offer::Full { .. } => self.dropped(&id, topic),
            }
        }
        queued
    }

    fn dropped(&self, id: &str, topic: &str) {
        Metrics::add(&self.metrics.counters().local_dropped, 1);
        if let Some(folded) = self.logs.ready("local-dropped") {
            warn!(message = "a local subscriber's queue is full (broker.max_queued_messages): a delivery to it was dropped and counted (local_dropped); it reads too slowly or is offline — fix or reconnect it, or raise broker.max_queued_messages", client_id = %id, %topic, similar_since_last_log = folded);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(max_queued: usize, max_offline: usize) -> Local {
        Local::new(Limits { max_queued, max_offline, max_filters: 10 }, Metrics::default())
    }

    fn publish(topic: &str, payload: &str) -> Publish {
        Publish::new(topic.to_owned(), payload.to_owned(), false)
    }

    fn drain(mailbox: &Mailbox) -> Vec<(String, u8, Option<u16>)> {
        let mut out = Vec::new();
        mailbox.take(|_| true, &mut out);
        out.into_iter()
            .map(|m| (String::from_utf8_lossy(&m.publish.payload).into_owned(), m.qos, m.resend))
            .collect()
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_publisher_wait_once_then_drops_and_counts() {
        let l = local(2, 10);
        let id: Arc<str> = Arc::from("s");
        let a = l.attach(&id, 1, true, false, None);
        l.subscribe(&id, "t", 1).expect("subscribe");
        for n in 0..2 {
            assert_eq!(l.publish("t", &publish("t", &n.to_string()), 1, None, true).await, 1);
        }
        let started = Instant::now();
        assert_eq!(l.publish("t", &publish("t", "2"), 1, None, true).await, 0);
        assert!(started.elapsed() >= FULL_QUEUE_WAIT, "waited the bound, then dropped");
        let started = Instant::now();
        assert_eq!(l.publish("t", &publish("t", "3"), 1, None, true).await, 0);
        assert!(started.elapsed() < FULL_QUEUE_WAIT, "lagging: no second wait");
        assert_eq!(Metrics::get(&l.metrics.counters().local_dropped), 2);
        assert_eq!(drain(&a.mailbox), [("0".to_owned(), 1, None), ("1".to_owned(), 1, None)]);
        assert_eq!(l.publish("t", &publish("t", "4"), 0, None, true).await, 1, "drained: queued again");
        assert_eq!(drain(&a.mailbox), [("4".to_owned(), 0, None)], "min(publish, subscription) QoS");
    }

    #[tokio::test]
    async fn a_waiting_publisher_goes_on_when_the_reader_takes() {
        let l = Arc::new(local(1, 10));
        let id: Arc<str> = Arc::from("s");
        let a = l.attach(&id, 1, true, false, None);
        l.subscribe(&id, "t", 1).expect("subscribe");
        l.publish("t", &publish("t", "0"), 1, None, true).await;
        let publisher = {
            let l = Arc::clone(&l);
            tokio::spawn(async move { l.publish("t", &publish("t", "1"), 1, None, true).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(drain(&a.mailbox), [("0".to_owned(), 1, None)]);
        assert_eq!(publisher.await.expect("publisher"), 1, "queued after the wait");
        assert_eq!(drain(&a.mailbox), [("1".to_owned(), 1, None)]);
        assert_eq!(Metrics::get(&l.metrics.counters().local_dropped), 0);
    }

    #[tokio::test]
    async fn a_persistent_session_keeps_its_subscriptions_and_qos1_queue_and_resends_first() {
        let l = local(10, 10);
        let id: Arc<str> = Arc::from("p");
        let a = l.attach(&id, 1, false, true, None);
        l.subscribe(&id, "$share/g/t", 1).expect("subscribe");
        l.publish("t", &publish("t", "sent"), 1, None, true).await;
        let mut inflight = Vec::new();
        a.mailbox.take(|_| true, &mut inflight);
        inflight[0].resend = Some(7);
        l.detach(&id, 1, &a.mailbox, inflight);
        assert_eq!(l.publish("t", &publish("t", "q1"), 1, None, true).await, 1, "queued while offline");
        assert_eq!(l.publish("t", &publish("t", "q0"), 0, None, true).await, 0, "QoS 0 is not kept offline");
        let b = l.attach(&id, 2, false, true, None);
        assert!(b.present);
        assert_eq!(b.filters, ["$share/g/t"]);
        assert_eq!(drain(&b.mailbox), [("sent".to_owned(), 1, Some(7)), ("q1".to_owned(), 1, None)]);
        // A clean connect ends it: subscriptions and queue.
        let c = l.attach(&id, 3, true, false, None);
        assert!(!c.present);
        assert!(l.filters("p").is_empty());
        assert_eq!(l.publish("t", &publish("t", "x"), 1, None, true).await, 0);
        l.detach(&id, 3, &c.mailbox, Vec::new());
        assert_eq!(lock(&l.state).sessions.len(), 0, "a clean session leaves nothing behind");
        assert_eq!(lock(&l.state).trie.nodes(), 0);
    }

    #[tokio::test]
    async fn a_clean_start_discards_the_old_session_but_may_start_a_persistent_one() {
        let l = local(10, 10);
        let id: Arc<str> = Arc::from("p");
        let a = l.attach(&id, 1, false, true, None);
        l.subscribe(&id, "old", 1).expect("subscribe");
        l.detach(&id, 1, &a.mailbox, Vec::new());
        // MQTT 5 clean start 1 with a session expiry: a new session that outlives the connection.
        let b = l.attach(&id, 2, true, true, Some(Duration::from_secs(60)));
        assert!(!b.present);
        assert!(l.filters("p").is_empty(), "the old session's subscriptions are gone");
        l.subscribe(&id, "new", 1).expect("subscribe");
        l.detach(&id, 2, &b.mailbox, Vec::new());
        let c = l.attach(&id, 3, false, false, None);
        assert!(c.present);
        assert_eq!(c.filters, ["new"]);
        // Resumed with session expiry 0: it ends with this connection.
        l.detach(&id, 3, &c.mailbox, Vec::new());
        assert!(l.filters("p").is_empty());
        assert_eq!(lock(&l.state).offline, 0);
    }

    #[tokio::test]
    async fn offline_sessions_are_bounded_and_expire() {
        let l = local(10, 2);
        for (n, expiry) in [(1, None), (2, Some(Duration::from_secs(5))), (3, None)] {
            let id: Arc<str> = Arc::from(format!("p{n}"));
            let a = l.attach(&id, n, false, true, expiry);
            l.subscribe(&id, "t", 1).expect("subscribe");
            l.detach(&id, n, &a.mailbox, Vec::new());
        }
        assert_eq!(Metrics::get(&l.metrics.counters().sessions_evicted), 1, "p1, offline longest, ended");
        assert!(l.filters("p1").is_empty());
        assert_eq!(l.expire(Instant::now()), 0);
        assert_eq!(l.expire(Instant::now() + Duration::from_secs(5)), 1, "p2 expired");
        assert_eq!(l.filters("p3"), ["t"]);
        assert_eq!(lock(&l.state).offline, 1);
    }

    #[tokio::test]
    async fn a_shared_group_prefers_connected_members() {
        let l = local(10, 10);
        let on: Arc<str> = Arc::from("on");
        let off: Arc<str> = Arc::from("off");
        let a = l.attach(&on, 1, true, false, None);
        let b = l.attach(&off, 2, false, true, None);
        l.subscribe(&on, "$share/g/t", 1).expect("subscribe");
        l.subscribe(&off, "$share/g/t", 1).expect("subscribe");
        l.detach(&off, 2, &b.mailbox, Vec::new());
        for n in 0..4 {
            l.publish("t", &publish("t", &n.to_string()), 1, None, true).await;
        }
        assert_eq!(drain(&a.mailbox).len(), 4, "the connected member gets every message");
        assert!(b.mailbox.is_empty());
    }

    #[test]
    fn a_session_holds_at_most_max_filters() {
        let l = local(10, 10);
        let id: Arc<str> = Arc::from("s");
        l.attach(&id, 1, true, false, None);
        for n in 0..10 {
            l.subscribe(&id, &format!("f/{n}"), 0).expect("within the limit");
        }
        assert_eq!(l.subscribe(&id, "f/x", 0), Err(SubscribeError::TooMany));
        assert_eq!(l.subscribe(&id, "f/3", 1), Ok(()), "an existing filter may change its QoS");
    }
}
