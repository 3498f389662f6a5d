//! Local fan-out: sessions, their subscriptions and their bounded delivery queues.
//!
//! Every session (one per client id) has a [`Mailbox`]; a publish is matched against the
//! [`SubTrie`] once, and a copy (sharing topic and payload bytes) is queued in each matching
//! session's mailbox at `min(publish QoS, subscription QoS)`, with the subscription's options
//! applied ([`SubOptions`]: no local, retain as published, subscription identifiers). The
//! connection that owns a session takes from its mailbox as its QoS 1/2 window allows and
//! writes to its socket.
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
//! - Deliveries to one session leave in the order they were queued; QoS 1 and 2 deliveries
//!   left unacknowledged when a persistent session's connection ends go back to the front of
//!   its queue and are sent again with DUP and their packet id (a QoS 2 delivery whose PUBREC
//!   came: its PUBREL).
//! - A shared-subscription delivery is never lost to its group by its session ending: what
//!   the session held unfinished goes to another member ([`Local::hand_over`]), or is counted
//!   (`shared_dropped`) when no member can take it. A persistent member that only
//!   disconnects keeps its own (MQTT 5 4.8.2 lets the server wait for it).
//! - A delivery carries its publish's MQTT 5 message expiry as a deadline; one that passed
//!   it while queued is never sent (see `deliver_out`).
//! - A will with an MQTT 5 will delay waits in its (persistent) session: published when the
//!   delay or the session ends, whichever comes first, and never if a connection resumes the
//!   session before.
//! - The publisher never holds a lock while it waits, and no lock is held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttd::protocol::{Publish, PublishProperties};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use rumqttd::protocol::LastWill;

use super::access::Permissions;
use super::persist::{self, SessionLog};
use super::subs::{Merge, SubTrie};
use crate::ack::Ticket;
use crate::buffer::sessions::{LoadedSession, StoredSession, StoredSubscription};
use crate::metrics::Metrics;
use crate::mqtt::topic::split_shared;
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
    /// When its MQTT 5 message expiry passes: not sent after that.
    pub expires: Option<Instant>,
    /// A redelivery after a reconnect: the packet id it was first sent with (sent with DUP).
    pub resend: Option<u16>,
    /// QoS 2: the client's PUBREC came and our PUBREL went; a resend is the PUBREL.
    pub released: bool,
    /// Its seq in the buffer file's `session_queue` (a persistent session's QoS 1/2
    /// delivery): deleted there when it completes (see [`Local::completed`]).
    pub stored: Option<u64>,
    /// The shared subscription (`$share/group/filter`) it was chosen for: if the session
    /// ends before it completes, another member of the group gets it (MQTT 5, 4.8.2).
    pub share: Option<Arc<str>>,
}

impl Message {
    /// A fresh delivery (not a resend).
    pub fn new(publish: Publish, qos: u8, retain: bool, properties: Option<PublishProperties>) -> Message {
        let expires = properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)));
        Message {
            publish,
            qos,
            retain,
            properties,
            expires,
            resend: None,
            released: false,
            stored: None,
            share: None,
        }
    }
}

/// A subscription's options: its QoS and, for MQTT 5, the rest of what SUBSCRIBE can ask.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: u8,
    /// Not delivered to the session that published it.
    pub no_local: bool,
    /// Deliveries keep the publish's retain flag (otherwise it is cleared).
    pub retain_as_published: bool,
    /// Subscription identifiers sent with each delivery (one per subscription; merged ones
    /// carry all of them, as MQTT 5 3.3.4 asks).
    pub ids: Vec<usize>,
    /// A shared subscription's whole filter (`$share/group/filter`), set by
    /// [`Local::subscribe`]: its deliveries say which group they belong to.
    pub share: Option<Arc<str>>,
}

/// Overlapping subscriptions of one session give one delivery: the highest QoS, the retain
/// flag kept if any asks, every identifier.
impl Merge for SubOptions {
    fn merge(&mut self, other: SubOptions) {
        self.qos = self.qos.max(other.qos);
        self.retain_as_published |= other.retain_as_published;
        for id in other.ids {
            if !self.ids.contains(&id) {
                self.ids.push(id);
            }
        }
    }
}

/// A will waiting for its MQTT 5 will delay, or ready to be published.
pub struct Will {
    pub client_id: Arc<str>,
    pub will: LastWill,
    pub properties: Option<PublishProperties>,
    /// The ACL of the connection that set it: checked when it is published.
    pub permissions: Permissions,
    /// Its connection's IP address and username, for rules (`peerhost`, `username`): a will
    /// is that client's last publish.
    pub peerhost: Arc<str>,
    pub username: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Message>,
    online: bool,
    /// A wait for room timed out: further deliveries are dropped at once until the queue has
    /// drained to half, so a stalled reader costs each publisher one wait, not one per message.
    lagging: bool,
    /// The session's client id while it is persistent and durable: its QoS 1/2 deliveries
    /// are written to the buffer file as they are queued.
    persist: Option<Arc<str>>,
    /// The session ended and its queue was handed over: a publisher that picked this
    /// mailbox before (or while waiting for room) must not queue into it, or the delivery
    /// would vanish with nobody counting it.
    ended: bool,
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
    /// The session ended after the publisher chose it.
    Ended(Box<Message>),
}

impl Mailbox {
    fn new(cap: usize, online: bool) -> Mailbox {
        Mailbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                online,
                lagging: false,
                persist: None,
                ended: false,
            }),
            cap,
            ready: Notify::new(),
            space: Notify::new(),
        }
    }

    /// Queues `message` if there is room; a persistent session's QoS 1/2 delivery is also
    /// handed to `log` (under this lock, so the file gets a session's deliveries in queue
    /// order), and `ticket` waits for its commit.
    fn offer(&self, mut message: Message, log: Option<&SessionLog>, ticket: Option<&Ticket>) -> Offer {
        let mut q = lock(&self.queue);
        if q.ended {
            return Offer::Ended(Box::new(message));
        }
        if !q.online && message.qos == 0 {
            return Offer::NotKept;
        }
        if q.items.len() < self.cap {
            if let (Some(id), Some(log)) = (&q.persist, log)
                && message.qos > 0
            {
                message.stored = Some(log.insert(id, &message, ticket));
            }
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

    fn set_persist(&self, id: Option<Arc<str>>) {
        lock(&self.queue).persist = id;
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
    filters: HashMap<String, SubOptions>,
    /// A row of it may be in the buffer file: ending it deletes that.
    on_disk: bool,
    /// Serial of the connection holding the session; `None` while offline.
    owner: Option<u64>,
    persistent: bool,
    /// How long the session outlives its connection; `None`: until evicted.
    expiry: Option<Duration>,
    offline_since: Option<Instant>,
    /// A delayed will and when it is due (offline only).
    will: Option<(Instant, Will)>,
}

#[derive(Default)]
struct State {
    trie: SubTrie<Arc<str>, SubOptions>,
    sessions: HashMap<Arc<str>, SessionState>,
    offline: usize,
}

impl State {
    /// Ends a session (in the buffer file too); returns its delayed will, now due, and what
    /// it held undelivered: `inflight` (sent, not completed: its connection's, in the order
    /// sent) then its queue.
    fn end_session(
        &mut self,
        id: &Arc<str>,
        log: Option<&SessionLog>,
        inflight: Vec<Message>,
    ) -> Option<(Option<Will>, Vec<Message>)> {
        let s = self.sessions.remove(id)?;
        for f in s.filters.keys() {
            self.trie.unsubscribe(id, f);
        }
        if let (true, Some(log)) = (s.on_disk, log) {
            log.end(id);
        }
        if s.owner.is_none() {
            self.offline -= 1;
        }
        let mut left = inflight;
        let mut q = lock(&s.mailbox.queue);
        q.ended = true;
        left.extend(q.items.drain(..));
        drop(q);
        // A publisher waiting for room here gives up now and hands its delivery on.
        s.mailbox.space.notify_waiters();
        Some((s.will.map(|(_, w)| w), left))
    }
}

/// A connection's claim on its session.
pub struct Attached {
    /// The session's client id.
    pub id: Arc<str>,
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
    /// Where persistent sessions are written (`None`: in memory only, as in unit tests).
    log: Option<Arc<SessionLog>>,
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
            log: None,
            state: Mutex::default(),
            subscriptions: AtomicUsize::new(0),
            logs: LogThrottles::default(),
        }
    }

    /// Persistent sessions are written to the buffer file through `log`.
    pub fn with_log(mut self, log: Arc<SessionLog>) -> Local {
        self.log = Some(log);
        self
    }

    /// Brings back the persistent sessions read from the buffer file at start-up, offline
    /// (already within `broker.max_offline_sessions` and `max_queued_messages`).
    pub fn restore(&self, loaded: Vec<LoadedSession>) -> usize {
        let mut state = lock(&self.state);
        let (now, now_ms) = (Instant::now(), crate::event::now_ms());
        let n = loaded.len();
        for session in loaded {
            let id: Arc<str> = Arc::from(session.client_id.as_str());
            let mailbox = Arc::new(Mailbox::new(self.limits.max_queued, false));
            mailbox.set_persist(self.log.as_ref().map(|_| Arc::clone(&id)));
            {
                let mut q = lock(&mailbox.queue);
                for (seq, stored) in session.queue {
                    q.items.push_back(persist::from_stored(seq, stored, now, now_ms));
                }
            }
            let mut filters = HashMap::new();
            for sub in session.session.subscriptions {
                let options = SubOptions {
                    qos: sub.qos,
                    no_local: sub.no_local,
                    retain_as_published: sub.retain_as_published,
                    ids: sub.ids,
                    share: share_of(&sub.filter),
                };
                state.trie.subscribe(&id, &sub.filter, options.clone());
                filters.insert(sub.filter, options);
            }
            let away = Duration::from_millis(
                now_ms.saturating_sub(session.session.offline_since_ms.unwrap_or(now_ms)),
            );
            let offline_since = now.checked_sub(away).unwrap_or(now);
            state.sessions.insert(
                id,
                SessionState {
                    mailbox,
                    filters,
                    on_disk: true,
                    owner: None,
                    persistent: true,
                    expiry: session.session.expiry_secs.map(|secs| Duration::from_secs(u64::from(secs))),
                    offline_since: Some(offline_since),
                    will: None,
                },
            );
            state.offline += 1;
        }
        Metrics::add(&self.metrics.counters().sessions_restored, n as u64);
        self.publish_gauges(&state);
        n
    }

    /// Writes a persistent session's row (subscriptions, expiry, offline since).
    fn save(log: Option<&SessionLog>, id: &Arc<str>, s: &mut SessionState) {
        let Some(log) = log.filter(|_| s.persistent) else { return };
        s.on_disk = true;
        let now_ms = crate::event::now_ms();
        let mut subscriptions: Vec<StoredSubscription> = s
            .filters
            .iter()
            .map(|(filter, o)| StoredSubscription {
                filter: filter.clone(),
                qos: o.qos,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                ids: o.ids.clone(),
            })
            .collect();
        subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
        log.row(
            id,
            StoredSession {
                expiry_secs: s.expiry.map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX - 1)),
                offline_since_ms: s.offline_since.map(|since| {
                    now_ms.saturating_sub(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX))
                }),
                subscriptions,
            },
        );
    }

    /// Resolves once `id`'s changes so far are in the buffer file, if it is a persistent
    /// session (a SUBACK or UNSUBACK waits for it).
    pub async fn flush(&self, id: &Arc<str>) {
        let Some(log) = &self.log else { return };
        let persistent = lock(&self.state).sessions.get(id).is_some_and(|s| s.persistent);
        if persistent {
            log.flush().await;
        }
    }

    /// Ends `id`'s session (see [`State::end_session`]) and hands its unfinished shared
    /// deliveries to other members of their groups; returns its delayed will, now due.
    fn end(&self, state: &mut State, id: &Arc<str>, inflight: Vec<Message>) -> Option<Will> {
        let (will, left) = state.end_session(id, self.log.as_deref(), inflight)?;
        self.hand_over(state, id, left);
        will
    }

    /// MQTT 5, 4.8.2: a shared-subscription delivery whose member's session ended before it
    /// completed goes to another member of the same group, so the group loses nothing when
    /// one of its consumers leaves. All of one group's leftovers go to one member, in their
    /// order, chosen like a message's member (round robin, connected first). A QoS 2 delivery
    /// the old member acknowledged with PUBREC is its own already (not sent twice); an
    /// expired one is dropped as it would have been. A QoS 1/2 delivery with no member left
    /// in its group, or no room in the chosen member's queue, is dropped, counted
    /// (`shared_dropped`) and logged; QoS 0 ones are redistributed too when a connected
    /// member takes them, and otherwise dropped uncounted, as QoS 0 to an offline session is.
    /// Returns how many were queued.
    fn hand_over(&self, state: &mut State, from: &Arc<str>, left: Vec<Message>) -> u64 {
        let now = Instant::now();
        let log = self.log.as_deref();
        let State { trie, sessions, .. } = &mut *state;
        let mut chosen: HashMap<Arc<str>, Option<(Arc<str>, SubOptions)>> = HashMap::new();
        let (mut moved, mut lost) = (0u64, 0u64);
        for message in left {
            let Some(share) = message.share.clone() else { continue };
            if message.released || message.expires.is_some_and(|at| at <= now) {
                continue;
            }
            let target = chosen
                .entry(Arc::clone(&share))
                .or_insert_with(|| trie.pick(&share, |k| sessions.get(k).is_some_and(|s| s.owner.is_some())));
            let qos = message.qos;
            let mailbox = target.as_ref().and_then(|(k, _)| sessions.get(k)).map(|s| &s.mailbox);
            let offer = match (target, mailbox) {
                (Some((_, options)), Some(mailbox)) => {
                    mailbox.offer(handed_over(message, options.clone()), log, None)
                }
                _ => Offer::NotKept,
            };
            match offer {
                Offer::Queued => moved += 1,
                _ if qos == 0 => {}
                Offer::NotKept | Offer::Full { .. } | Offer::Ended(_) => lost += 1,
            }
        }
        let counters = self.metrics.counters();
        Metrics::add(&counters.shared_redelivered, moved);
        if lost > 0 {
            Metrics::add(&counters.shared_dropped, lost);
            if let Some(folded) = self.logs.ready("shared-dropped") {
                warn!(message = "a shared-subscription member's session ended with QoS 1/2 deliveries unfinished, and no other member of its group could take them (none left, or its queue full): they were dropped and counted (shared_dropped); keep another member subscribed, or give members persistent sessions", client_id = %from, dropped = lost, similar_since_last_log = folded);
            }
        }
        moved
    }

    /// A persistent session's delivery completed (PUBACK, PUBCOMP) or was discarded (expired,
    /// too large, withheld): it leaves the buffer file.
    pub fn completed(&self, id: &Arc<str>, message: &Message) {
        if let (Some(seq), Some(log)) = (message.stored, &self.log) {
            log.delete(id, seq);
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
        let log = self.log.as_deref();
        if clean_start {
            // A will delayed in it is not published: a connection for the session came first
            // (MQTT 5, 3.1.2.5).
            self.end(&mut state, id, Vec::new());
        }
        if let Some(s) = state.sessions.get_mut(id) {
            let was_offline = s.owner.is_none();
            s.will = None;
            s.owner = Some(serial);
            s.persistent = persistent;
            s.expiry = expiry;
            s.offline_since = None;
            s.mailbox.set_online(true, Vec::new());
            s.mailbox.set_persist(log.filter(|_| persistent).map(|_| Arc::clone(id)));
            Local::save(log, id, s);
            let attached = Attached {
                id: Arc::clone(id),
                mailbox: Arc::clone(&s.mailbox),
                present: true,
                filters: s.filters.keys().cloned().collect(),
            };
            if was_offline {
                state.offline -= 1;
            }
            self.publish_gauges(&state);
            return attached;
        }
        let mailbox = Arc::new(Mailbox::new(self.limits.max_queued, true));
        mailbox.set_persist(log.filter(|_| persistent).map(|_| Arc::clone(id)));
        let mut session = SessionState {
            mailbox: Arc::clone(&mailbox),
            filters: HashMap::new(),
            on_disk: false,
            owner: Some(serial),
            persistent,
            expiry,
            offline_since: None,
            will: None,
        };
        Local::save(log, id, &mut session);
        state.sessions.insert(Arc::clone(id), session);
        self.publish_gauges(&state);
        Attached { id: Arc::clone(id), mailbox, present: false, filters: Vec::new() }
    }

    /// The connection `serial` ends. A clean session ends with it; a persistent one goes
    /// offline with `inflight` (QoS 1/2 deliveries not completed, in the order they were sent)
    /// back at the front of its queue. A connection that was taken over changes nothing but
    /// hands its unacknowledged deliveries to the session, if it is still the same one.
    ///
    /// `expiry`: an MQTT 5 DISCONNECT's session expiry, which replaces the CONNECT's (0 ends
    /// the session now; a session that was not persistent stays so). `will`: a will due after
    /// `delay`, kept in a persistent session until then. Returns the wills due now: a delayed
    /// will whose session ended, and the will of a session evicted to make room.
    pub fn detach(
        &self,
        id: &Arc<str>,
        serial: u64,
        mailbox: &Arc<Mailbox>,
        inflight: Vec<Message>,
        expiry: Option<u32>,
        will: Option<(Duration, Will)>,
    ) -> Vec<Will> {
        let mut due = Vec::new();
        let mut state = lock(&self.state);
        let Some(s) = state.sessions.get_mut(id) else {
            due.extend(will.map(|(_, w)| w));
            self.hand_over(&mut state, id, inflight);
            return due;
        };
        if s.owner != Some(serial) {
            if s.persistent && Arc::ptr_eq(&s.mailbox, mailbox) {
                if !inflight.is_empty() {
                    s.mailbox.set_online(s.owner.is_some(), inflight);
                }
            } else {
                // Its session ended while it was being taken over: another member of each
                // group gets what it left unfinished.
                self.hand_over(&mut state, id, inflight);
            }
            // Taken over: a connection to the session came within the will delay, so the
            // delayed will is not published (MQTT 5, 3.1.3.2.2). (A will without a delay was
            // published before this call.)
            return due;
        }
        match expiry {
            Some(0) => s.persistent = false,
            Some(u32::MAX) => s.expiry = None,
            Some(secs) => s.expiry = Some(Duration::from_secs(u64::from(secs))),
            None => {}
        }
        let log = self.log.as_deref();
        if !s.persistent {
            due.extend(will.map(|(_, w)| w));
            due.extend(self.end(&mut state, id, inflight));
            self.publish_gauges(&state);
            return due;
        }
        let now = Instant::now();
        s.owner = None;
        s.offline_since = Some(now);
        s.mailbox.set_online(false, inflight);
        Local::save(log, id, s);
        // Due at the delay or the session's end, whichever comes first (MQTT 5, 3.1.3.2.2).
        s.will = will.map(|(delay, w)| (now + s.expiry.map_or(delay, |e| e.min(delay)), w));
        state.offline += 1;
        if state.offline > self.limits.max_offline {
            let oldest = state
                .sessions
                .iter()
                .filter_map(|(k, s)| s.offline_since.map(|t| (t, Arc::clone(k))))
                .min()
                .map(|(_, k)| k);
            if let Some(victim) = oldest {
                due.extend(self.end(&mut state, &victim, Vec::new()));
                Metrics::add(&self.metrics.counters().sessions_evicted, 1);
                if let Some(folded) = self.logs.ready("evicted") {
                    warn!(message = "a persistent session was ended: broker.max_offline_sessions offline sessions are kept already; raise it, or have clients that do not return use clean sessions", client_id = %victim, similar_since_last_log = folded);
                }
            }
        }
        self.publish_gauges(&state);
        due
    }

    /// Ends offline sessions whose expiry has passed, and takes the delayed wills whose time
    /// came. Returns the sessions ended, and the wills to publish now.
    pub fn expire(&self, now: Instant) -> (usize, Vec<Will>) {
        let mut state = lock(&self.state);
        let mut wills = Vec::new();
        for s in state.sessions.values_mut() {
            if s.will.as_ref().is_some_and(|(at, _)| *at <= now) {
                wills.extend(s.will.take().map(|(_, w)| w));
            }
        }
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
            wills.extend(self.end(&mut state, id, Vec::new()));
        }
        if !due.is_empty() {
            Metrics::add(&self.metrics.counters().sessions_expired, due.len() as u64);
            self.publish_gauges(&state);
        }
        (due.len(), wills)
    }

    /// Adds (or updates the options of) a subscription of `id`'s session. Returns whether it
    /// is new (MQTT 5 retain handling 1 replays retained messages only then).
    pub fn subscribe(
        &self,
        id: &Arc<str>,
        filter: &str,
        mut options: SubOptions,
    ) -> Result<bool, SubscribeError> {
        options.share = share_of(filter);
        let mut state = lock(&self.state);
        let State { trie, sessions, .. } = &mut *state;
        let Some(s) = sessions.get_mut(id) else { return Ok(false) };
        let new = !s.filters.contains_key(filter);
        if new && s.filters.len() >= self.limits.max_filters {
            return Err(SubscribeError::TooMany);
        }
        s.filters.insert(filter.to_owned(), options.clone());
        Local::save(self.log.as_deref(), id, s);
        trie.subscribe(id, filter, options);
        self.publish_gauges(&state);
        Ok(new)
    }

    /// Removes a subscription; returns whether there was one.
    pub fn unsubscribe(&self, id: &Arc<str>, filter: &str) -> bool {
        let mut state = lock(&self.state);
        let State { trie, sessions, .. } = &mut *state;
        let Some(s) = sessions.get_mut(id) else { return false };
        if s.filters.remove(filter).is_none() {
            return false;
        }
        Local::save(self.log.as_deref(), id, s);
        trie.unsubscribe(id, filter);
        self.publish_gauges(&state);
        true
    }

    /// Filters of `id`'s session, sorted (tests).
    #[cfg(test)]
    fn filters(&self, id: &str) -> Vec<String> {
        let state = lock(&self.state);
        let mut f: Vec<String> =
            state.sessions.get(id).map(|s| s.filters.keys().cloned().collect()).unwrap_or_default();
        f.sort();
        f
    }

    /// The mailboxes `topic` goes to, with the options of each delivery. `from`: the
    /// publishing session (no local).
    fn targets(&self, topic: &str, from: Option<&str>) -> Vec<(Arc<str>, Arc<Mailbox>, SubOptions)> {
        if self.subscriptions.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let state = lock(&self.state);
        let State { trie, sessions, .. } = &*state;
        let mut matched = Vec::new();
        trie.matches(
            topic,
            |k| sessions.get(k).is_some_and(|s| s.owner.is_some()),
            |k, o| !(o.no_local && from == Some(&**k)),
            &mut matched,
        );
        matched
            .into_iter()
            .filter_map(|(k, options)| {
                let mailbox = Arc::clone(&sessions.get(&k)?.mailbox);
                Some((k, mailbox, options))
            })
            .collect()
    }

    /// Queues `publish` for every matching session. `wait`: a publisher that may be slowed
    /// down (a sensor connection) waits up to [`FULL_QUEUE_WAIT`] for room in a full queue;
    /// one that must not (rules' republish) drops at once. `from`: the publisher's session,
    /// if it has one. `ticket`: the publisher's acknowledgement, held until the copies queued
    /// for persistent sessions are committed. Returns deliveries queued.
    // The publish's parts, as a connection holds them: bundling them would copy per publish.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish(
        &self,
        topic: &str,
        publish: &Publish,
        qos: u8,
        properties: Option<&PublishProperties>,
        from: Option<&str>,
        wait: bool,
        ticket: Option<&Ticket>,
    ) -> usize {
        let mut queued = 0;
        let log = self.log.as_deref();
        let expires = expiry_of(properties);
        for (id, mailbox, options) in self.targets(topic, from) {
            let mut message = delivery(publish, qos, properties, expires, options);
            let deadline = Instant::now() + FULL_QUEUE_WAIT;
            loop {
                // Registered before the offer, so room made in between is not missed.
                let space = mailbox.space.notified();
                tokio::pin!(space);
                space.as_mut().enable();
                match mailbox.offer(message, log, ticket) {
                    Offer::Queued => {
                        queued += 1;
                        break;
                    }
                    Offer::NotKept => break,
                    Offer::Ended(m) => {
                        queued += usize::from(self.chosen_session_ended(&id, *m));
                        break;
                    }
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
        let expires = expiry_of(properties);
        for (id, mailbox, options) in self.targets(topic, None) {
            let message = delivery(publish, 0, properties, expires, options);
            match mailbox.offer(message, self.log.as_deref(), None) {
                Offer::Queued => queued += 1,
                Offer::NotKept => {}
                Offer::Ended(m) => queued += usize::from(self.chosen_session_ended(&id, *m)),
                Offer::Full { .. } => self.dropped(&id, topic),
            }
        }
        queued
    }

    /// A delivery whose session ended between the publisher choosing it and queueing it:
    /// a shared group's copy goes to another member as the session's own queue did
    /// ([`Local::hand_over`]); another copy ends with the session, as its queue did.
    /// Returns whether it was queued.
    fn chosen_session_ended(&self, id: &Arc<str>, message: Message) -> bool {
        if message.share.is_none() {
            return false;
        }
        let mut state = lock(&self.state);
        self.hand_over(&mut state, id, vec![message]) > 0
    }

    fn dropped(&self, id: &str, topic: &str) {
        Metrics::add(&self.metrics.counters().local_dropped, 1);
        if let Some(folded) = self.logs.ready("local-dropped") {
            warn!(message = "a local subscriber's queue is full (broker.max_queued_messages): a delivery to it was dropped and counted (local_dropped); it reads too slowly or is offline — fix or reconnect it, or raise broker.max_queued_messages", client_id = %id, %topic, similar_since_last_log = folded);
        }
    }
}

/// When a publish's MQTT 5 message expiry passes, counted from now.
fn expiry_of(properties: Option<&PublishProperties>) -> Option<Instant> {
    let secs = properties?.message_expiry_interval?;
    Some(Instant::now() + Duration::from_secs(u64::from(secs)))
}

/// One subscriber's copy of a publish, as its subscription's options make it.
fn delivery(
    publish: &Publish,
    qos: u8,
    properties: Option<&PublishProperties>,
    expires: Option<Instant>,
    options: SubOptions,
) -> Message {
    let mut properties = properties.cloned();
    if !options.ids.is_empty() {
        properties.get_or_insert_with(PublishProperties::default).subscription_identifiers = options.ids;
    }
    Message {
        publish: publish.clone(),
        qos: qos.min(options.qos),
        retain: options.retain_as_published && publish.retain,
        properties,
        expires,
        resend: None,
        released: false,
        stored: None,
        share: options.share,
    }
}

/// The shared subscription a filter is, if it is one (see [`SubOptions::share`]).
fn share_of(filter: &str) -> Option<Arc<str>> {
    split_shared(filter).0.map(|_| Arc::from(filter))
}

/// A leftover of an ended session, made the delivery `options` asks of another member of its
/// group: its QoS at most theirs, their retain-as-published and subscription identifiers,
/// and a fresh delivery (no packet id, not in the file).
fn handed_over(mut message: Message, options: SubOptions) -> Message {
    message.qos = message.qos.min(options.qos);
    // A restored delivery's publish has lost its flag; the delivery's own says it was retained.
    message.retain = options.retain_as_published && (message.retain || message.publish.retain);
    if let Some(p) = message.properties.as_mut() {
        p.subscription_identifiers.clear();
    }
    if !options.ids.is_empty() {
        message.properties.get_or_insert_with(PublishProperties::default).subscription_identifiers =
            options.ids;
    }
    message.resend = None;
    message.stored = None;
    message.share = options.share;
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(max_queued: usize, max_offline: usize) -> Local {
        Local::new(Limits { max_queued, max_offline, max_filters: 10 }, Metrics::default())
    }

    fn qos(qos: u8) -> SubOptions {
        SubOptions { qos, ..SubOptions::default() }
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
        l.subscribe(&id, "t", qos(1)).expect("subscribe");
        for n in 0..2 {
            assert_eq!(l.publish("t", &publish("t", &n.to_string()), 1, None, None, true, None).await, 1);
        }
        let started = Instant::now();
        assert_eq!(l.publish("t", &publish("t", "2"), 1, None, None, true, None).await, 0);
        assert!(started.elapsed() >= FULL_QUEUE_WAIT, "waited the bound, then dropped");
        let started = Instant::now();
        assert_eq!(l.publish("t", &publish("t", "3"), 1, None, None, true, None).await, 0);
        assert!(started.elapsed() < FULL_QUEUE_WAIT, "lagging: no second wait");
        assert_eq!(Metrics::get(&l.metrics.counters().local_dropped), 2);
        assert_eq!(drain(&a.mailbox), [("0".to_owned(), 1, None), ("1".to_owned(), 1, None)]);
        assert_eq!(
            l.publish("t", &publish("t", "4"), 0, None, None, true, None).await,
            1,
            "drained: queued again"
        );
        assert_eq!(drain(&a.mailbox), [("4".to_owned(), 0, None)], "min(publish, subscription) QoS");
    }

    #[tokio::test]
    async fn a_waiting_publisher_goes_on_when_the_reader_takes() {
        let l = Arc::new(local(1, 10));
        let id: Arc<str> = Arc::from("s");
        let a = l.attach(&id, 1, true, false, None);
        l.subscribe(&id, "t", qos(1)).expect("subscribe");
        l.publish("t", &publish("t", "0"), 1, None, None, true, None).await;
        let publisher = {
            let l = Arc::clone(&l);
            tokio::spawn(async move { l.publish("t", &publish("t", "1"), 1, None, None, true, None).await })
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
        l.subscribe(&id, "$share/g/t", qos(1)).expect("subscribe");
        l.publish("t", &publish("t", "sent"), 1, None, None, true, None).await;
        let mut inflight = Vec::new();
        a.mailbox.take(|_| true, &mut inflight);
        inflight[0].resend = Some(7);
        l.detach(&id, 1, &a.mailbox, inflight, None, None);
        assert_eq!(
            l.publish("t", &publish("t", "q1"), 1, None, None, true, None).await,
            1,
            "queued while offline"
        );
        assert_eq!(
            l.publish("t", &publish("t", "q0"), 0, None, None, true, None).await,
            0,
            "QoS 0 is not kept offline"
        );
        let b = l.attach(&id, 2, false, true, None);
        assert!(b.present);
        assert_eq!(b.filters, ["$share/g/t"]);
        assert_eq!(drain(&b.mailbox), [("sent".to_owned(), 1, Some(7)), ("q1".to_owned(), 1, None)]);
        // A clean connect ends it: subscriptions and queue.
        let c = l.attach(&id, 3, true, false, None);
        assert!(!c.present);
        assert!(l.filters("p").is_empty());
        assert_eq!(l.publish("t", &publish("t", "x"), 1, None, None, true, None).await, 0);
        l.detach(&id, 3, &c.mailbox, Vec::new(), None, None);
        assert_eq!(lock(&l.state).sessions.len(), 0, "a clean session leaves nothing behind");
        assert_eq!(lock(&l.state).trie.nodes(), 0);
    }

    #[tokio::test]
    async fn a_clean_start_discards_the_old_session_but_may_start_a_persistent_one() {
        let l = local(10, 10);
        let id: Arc<str> = Arc::from("p");
        let a = l.attach(&id, 1, false, true, None);
        l.subscribe(&id, "old", qos(1)).expect("subscribe");
        l.detach(&id, 1, &a.mailbox, Vec::new(), None, None);
        // MQTT 5 clean start 1 with a session expiry: a new session that outlives the connection.
        let b = l.attach(&id, 2, true, true, Some(Duration::from_secs(60)));
        assert!(!b.present);
        assert!(l.filters("p").is_empty(), "the old session's subscriptions are gone");
        l.subscribe(&id, "new", qos(1)).expect("subscribe");
        l.detach(&id, 2, &b.mailbox, Vec::new(), None, None);
        let c = l.attach(&id, 3, false, false, None);
        assert!(c.present);
        assert_eq!(c.filters, ["new"]);
        // Resumed with session expiry 0: it ends with this connection.
        l.detach(&id, 3, &c.mailbox, Vec::new(), None, None);
        assert!(l.filters("p").is_empty());
        assert_eq!(lock(&l.state).offline, 0);
    }

    #[tokio::test]
    async fn offline_sessions_are_bounded_and_expire() {
        let l = local(10, 2);
        for (n, expiry) in [(1, None), (2, Some(Duration::from_secs(5))), (3, None)] {
            let id: Arc<str> = Arc::from(format!("p{n}"));
            let a = l.attach(&id, n, false, true, expiry);
            l.subscribe(&id, "t", qos(1)).expect("subscribe");
            l.detach(&id, n, &a.mailbox, Vec::new(), None, None);
        }
        assert_eq!(Metrics::get(&l.metrics.counters().sessions_evicted), 1, "p1, offline longest, ended");
        assert!(l.filters("p1").is_empty());
        assert_eq!(l.expire(Instant::now()).0, 0);
        assert_eq!(l.expire(Instant::now() + Duration::from_secs(5)).0, 1, "p2 expired");
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
        l.subscribe(&on, "$share/g/t", qos(1)).expect("subscribe");
        l.subscribe(&off, "$share/g/t", qos(1)).expect("subscribe");
        l.detach(&off, 2, &b.mailbox, Vec::new(), None, None);
        for n in 0..4 {
            l.publish("t", &publish("t", &n.to_string()), 1, None, None, true, None).await;
        }
        assert_eq!(drain(&a.mailbox).len(), 4, "the connected member gets every message");
        assert!(b.mailbox.is_empty());
    }

    #[tokio::test]
    async fn no_local_skips_the_publisher_and_overlapping_subscriptions_merge_their_ids() {
        let l = local(10, 10);
        let id: Arc<str> = Arc::from("s");
        let a = l.attach(&id, 1, true, false, None);
        let opts = |qos, no_local, ids: Vec<usize>| SubOptions {
            qos,
            no_local,
            retain_as_published: false,
            ids,
            share: None,
        };
        l.subscribe(&id, "t/#", opts(1, true, vec![3])).expect("subscribe");
        l.subscribe(&id, "t/x", opts(2, false, vec![5])).expect("subscribe");
        l.publish("t/x", &publish("t/x", "others"), 2, None, None, true, None).await;
        l.publish("t/x", &publish("t/x", "own"), 2, None, Some("s"), true, None).await;
        let mut out = Vec::new();
        a.mailbox.take(|_| true, &mut out);
        let seen: Vec<(String, u8, Vec<usize>)> = out
            .into_iter()
            .map(|m| {
                let ids = m.properties.map(|p| p.subscription_identifiers).unwrap_or_default();
                (String::from_utf8_lossy(&m.publish.payload).into_owned(), m.qos, ids)
            })
            .collect();
        assert_eq!(
            seen,
            [("others".to_owned(), 2, vec![3, 5]), ("own".to_owned(), 2, vec![5])],
            "one copy with both ids; its own publish only through the subscription without no local"
        );
    }

    fn will(id: &Arc<str>) -> Will {
        let access =
            crate::broker::access::Access::load(&crate::config::BrokerConfig::default()).expect("no files");
        Will {
            client_id: Arc::clone(id),
            will: LastWill {
                topic: "w".into(),
                message: "gone".into(),
                qos: rumqttd::protocol::QoS::AtLeastOnce,
                retain: false,
            },
            properties: None,
            permissions: access.permissions(None, Arc::clone(id)),
            peerhost: "192.0.2.9".into(),
            username: None,
        }
    }

    #[tokio::test]
    async fn a_delayed_will_waits_for_the_delay_or_the_session_end_and_a_resume_cancels_it() {
        let l = local(10, 10);
        let id: Arc<str> = Arc::from("w");
        let a = l.attach(&id, 1, true, true, Some(Duration::from_secs(60)));
        let due = l.detach(&id, 1, &a.mailbox, Vec::new(), None, Some((Duration::from_secs(5), will(&id))));
        assert!(due.is_empty(), "delayed");
        assert!(l.expire(Instant::now()).1.is_empty());
        assert_eq!(l.expire(Instant::now() + Duration::from_secs(5)).1.len(), 1, "due at the delay");
        // Resumed before the delay: never published.
        let b = l.attach(&id, 2, false, true, Some(Duration::from_secs(60)));
        l.detach(&id, 2, &b.mailbox, Vec::new(), None, Some((Duration::from_secs(5), will(&id))));
        let c = l.attach(&id, 3, false, true, Some(Duration::from_secs(2)));
        assert!(l.expire(Instant::now() + Duration::from_secs(10)).1.is_empty(), "cancelled by the resume");
        // Session expiry shorter than the delay (2 s): due when the session ends.
        let due = l.detach(&id, 3, &c.mailbox, Vec::new(), None, Some((Duration::from_secs(30), will(&id))));
        assert!(due.is_empty());
        let (ended, wills) = l.expire(Instant::now() + Duration::from_secs(2));
        assert_eq!((ended, wills.len()), (1, 1));
        // A session that ends with its connection (DISCONNECT's session expiry 0) hands it back.
        let d = l.attach(&id, 4, true, true, Some(Duration::from_secs(60)));
        let due =
            l.detach(&id, 4, &d.mailbox, Vec::new(), Some(0), Some((Duration::from_secs(30), will(&id))));
        assert_eq!(due.len(), 1);
        assert_eq!(lock(&l.state).sessions.len(), 0);
    }

    #[tokio::test]
    async fn a_persistent_sessions_deliveries_and_subscriptions_go_to_the_log_and_completed_ones_leave() {
        let log = Arc::new(SessionLog::new(0));
        let l = local(10, 10).with_log(Arc::clone(&log));
        let p: Arc<str> = Arc::from("p");
        let c: Arc<str> = Arc::from("c");
        let a = l.attach(&p, 1, false, true, Some(Duration::from_secs(60)));
        let b = l.attach(&c, 2, true, false, None);
        l.subscribe(&p, "t", qos(2)).expect("subscribe");
        l.subscribe(&c, "t", qos(1)).expect("subscribe");
        let acks = crate::ack::AckQueue::new();
        let ticket = acks.ticket();
        assert_eq!(l.publish("t", &publish("t", "1"), 1, None, None, true, Some(&ticket)).await, 2);
        assert_eq!(l.publish("t", &publish("t", "0"), 0, None, None, true, None).await, 2);
        drop(ticket);
        let mut ready = Vec::new();
        acks.take_ready(&mut ready);
        assert!(ready.is_empty(), "the publisher's acknowledgement waits for the commit");
        let (batch, tickets, _) = log.take();
        drop(tickets);
        acks.take_ready(&mut ready);
        assert_eq!(ready.len(), 1, "released once its copies are committed");
        assert_eq!(
            batch.inserts.iter().map(|(k, d)| (k.clone(), d.qos)).collect::<Vec<_>>(),
            [(("p".to_owned(), 1), 1)],
            "only the persistent session's QoS 1 copy"
        );
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.rows[0].1.subscriptions[0].filter, "t");
        assert_eq!(batch.rows[0].1.expiry_secs, Some(60));
        let mut out = Vec::new();
        a.mailbox.take(|_| true, &mut out);
        assert_eq!(out.iter().map(|m| m.stored).collect::<Vec<_>>(), [Some(1), None]);
        assert!(drain(&b.mailbox).len() == 2);
        l.completed(&p, &out[0]);
        assert_eq!(log.take().0.deletes, [("p".to_owned(), 1)]);
        // Offline: the row says since when; a clean start ends it on disk too.
        l.detach(&p, 1, &a.mailbox, Vec::new(), None, None);
        assert!(log.take().0.rows[0].1.offline_since_ms.is_some());
        l.attach(&p, 3, true, false, None);
        assert_eq!(log.take().0.ends, ["p"]);
    }

    fn payloads(mailbox: &Mailbox) -> Vec<(String, u8, Vec<usize>)> {
        let mut out = Vec::new();
        mailbox.take(|_| true, &mut out);
        out.into_iter()
            .map(|m| {
                let ids = m.properties.map(|p| p.subscription_identifiers).unwrap_or_default();
                (String::from_utf8_lossy(&m.publish.payload).into_owned(), m.qos, ids)
            })
            .collect()
    }

    fn counter(l: &Local, pick: impl Fn(&crate::metrics::Counters) -> &std::sync::atomic::AtomicU64) -> u64 {
        Metrics::get(pick(l.metrics.counters()))
    }

    #[tokio::test]
    async fn a_shared_members_unfinished_deliveries_go_to_another_member_when_its_session_ends() {
        let l = local(10, 10);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        let ma = l.attach(&a, 1, true, false, None);
        let mb = l.attach(&b, 2, true, false, None);
        let mc = l.attach(&c, 3, true, false, None);
        let ids = |id| SubOptions { qos: 2, ids: vec![id], ..SubOptions::default() };
        l.subscribe(&a, "$share/g/t", ids(1)).expect("subscribe");
        l.subscribe(&b, "$share/g/t", ids(2)).expect("subscribe");
        l.subscribe(&c, "$share/other/t", ids(3)).expect("subscribe");
        for n in 0..6 {
            l.publish("t", &publish("t", &n.to_string()), 2, None, None, true, None).await;
        }
        assert_eq!(payloads(&mb.mailbox).len(), 3, "b took its half");
        assert_eq!(payloads(&mc.mailbox).len(), 6, "the other group is another consumer");
        // a sent 0 and 2 (2's PUBREC came: the client has it) and left 4 queued.
        let mut inflight = Vec::new();
        ma.mailbox.take(|m| m.publish.payload != "4", &mut inflight);
        assert_eq!(inflight.len(), 2);
        inflight[0].resend = Some(1);
        inflight[1].resend = Some(2);
        inflight[1].released = true;
        l.detach(&a, 1, &ma.mailbox, inflight, None, None);
        assert_eq!(
            payloads(&mb.mailbox),
            [("0".to_owned(), 2, vec![2]), ("4".to_owned(), 2, vec![2])],
            "in order, as b's deliveries (its identifier); the released one is not sent twice"
        );
        assert!(mc.mailbox.is_empty(), "another group gets nothing again");
        assert_eq!(counter(&l, |c| &c.shared_redelivered), 2);
        // The last member leaves: nobody to take them; QoS 1/2 counted, QoS 0 not.
        l.publish("t", &publish("t", "q2"), 2, None, None, true, None).await;
        l.publish("t", &publish("t", "q0"), 0, None, None, true, None).await;
        l.detach(&b, 2, &mb.mailbox, Vec::new(), None, None);
        assert_eq!(counter(&l, |c| &c.shared_dropped), 1);
        assert_eq!(counter(&l, |c| &c.shared_redelivered), 2);
    }

    #[tokio::test]
    async fn a_publisher_waiting_on_a_member_that_leaves_hands_its_delivery_on() {
        let l = local(1, 10);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let ma = l.attach(&a, 1, true, false, None);
        let mb = l.attach(&b, 2, true, false, None);
        l.subscribe(&a, "$share/g/t", qos(1)).expect("subscribe");
        l.subscribe(&b, "$share/g/t", qos(1)).expect("subscribe");
        assert_eq!(l.publish("t", &publish("t", "0"), 1, None, None, true, None).await, 1);
        // Round robin: the member that took "0" is chosen again for "2", its queue full.
        let (leaving, serial, lm, sm) =
            if ma.mailbox.len() == 1 { (&a, 1, &ma, &mb) } else { (&b, 2, &mb, &ma) };
        assert_eq!(l.publish("t", &publish("t", "1"), 1, None, None, true, None).await, 1);
        let two = publish("t", "2");
        let publisher = l.publish("t", &two, 1, None, None, true, None);
        let leave = async {
            // The publisher is waiting for room in the leaving member's queue now.
            tokio::task::yield_now().await;
            assert_eq!(payloads(&sm.mailbox).len(), 1, "the staying member delivers its own");
            l.detach(leaving, serial, &lm.mailbox, Vec::new(), None, None);
            // The leaving member's queued "0" came over; delivered, it makes room for "2".
            assert_eq!(payloads(&sm.mailbox), [("0".to_owned(), 1, vec![])]);
        };
        let (queued, ()) = tokio::join!(publisher, leave);
        assert_eq!(queued, 1, "queued with the other member, not into the ended session");
        assert_eq!(payloads(&sm.mailbox), [("2".to_owned(), 1, vec![])]);
        assert_eq!(counter(&l, |c| &c.shared_redelivered), 2);
        assert_eq!(counter(&l, |c| &c.shared_dropped), 0);
        assert_eq!(Metrics::get(&l.metrics.counters().local_dropped), 0);
    }

    #[tokio::test]
    async fn an_expired_or_cleaned_persistent_members_queue_goes_to_the_others() {
        let l = local(10, 10);
        let (p, q, on): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("p"), Arc::from("q"), Arc::from("on"));
        let mp = l.attach(&p, 1, false, true, Some(Duration::from_secs(5)));
        let mq = l.attach(&q, 2, false, true, None);
        l.subscribe(&p, "$share/g/t", qos(1)).expect("subscribe");
        l.subscribe(&q, "$share/g/t", qos(1)).expect("subscribe");
        l.detach(&p, 1, &mp.mailbox, Vec::new(), None, None);
        l.detach(&q, 2, &mq.mailbox, Vec::new(), None, None);
        // Both offline: the group queues in turn.
        for n in 0..4 {
            l.publish("t", &publish("t", &n.to_string()), 1, None, None, true, None).await;
        }
        let mo = l.attach(&on, 3, true, false, None);
        l.subscribe(&on, "$share/g/t", qos(1)).expect("subscribe");
        assert_eq!(l.expire(Instant::now() + Duration::from_secs(5)).0, 1, "p expired");
        assert_eq!(
            payloads(&mo.mailbox),
            [("0".to_owned(), 1, vec![]), ("2".to_owned(), 1, vec![])],
            "p's queue, to the connected member"
        );
        // q comes back with a clean start: its old session's queue goes to the others too.
        let back = l.attach(&q, 4, true, false, None);
        assert_eq!(payloads(&mo.mailbox), [("1".to_owned(), 1, vec![]), ("3".to_owned(), 1, vec![])]);
        assert!(back.mailbox.is_empty());
        assert_eq!(counter(&l, |c| &c.shared_redelivered), 4);
        assert_eq!(counter(&l, |c| &c.shared_dropped), 0);
    }

    #[test]
    fn a_session_holds_at_most_max_filters() {
        let l = local(10, 10);
        let id: Arc<str> = Arc::from("s");
        l.attach(&id, 1, true, false, None);
        for n in 0..10 {
            l.subscribe(&id, &format!("f/{n}"), qos(0)).expect("within the limit");
        }
        assert_eq!(l.subscribe(&id, "f/x", qos(0)), Err(SubscribeError::TooMany));
        assert_eq!(l.subscribe(&id, "f/3", qos(1)), Ok(false), "an existing filter may change its QoS");
    }
}
