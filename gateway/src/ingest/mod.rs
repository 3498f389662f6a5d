//! Stage 1: sensor connections.
//!
//! Outpost accepts sensor TCP connections itself and speaks MQTT 3.1.1 and 5 with rumqttd's
//! codecs ([`codec`]); rumqttd's router is used only for local fan-out (subscriptions between
//! sensors and actuators). Each connection (`conn`) hands its publishes straight to the route
//! stage through a bounded channel, and holds the sensor's PUBACK until the event is safe —
//! committed to the buffer or acknowledged upstream ([`acks`]). rumqttd's listener is not used:
//! it acknowledges publishes from RAM before anyone read them, loses events for a reader that
//! falls behind its ring, and a client id with `/` connecting twice breaks its accept loop.
//!
//! # Invariants
//! - **A PUBACK (or PUBREC) means the event is safe** (`broker.ack = "after_commit"`, the
//!   default): sent only once every copy of the event is committed or acknowledged upstream,
//!   in the order the publishes arrived on that connection.
//! - **Backpressure, not loss:** a connection that cannot hand an event to the route stage
//!   stops reading its socket; TCP then slows the sensor. Nothing is dropped on the way in.
//! - The router sees a publish only if some local subscription matches it ([`SubIndex`]), so
//!   sensor traffic nobody local subscribes to costs no router work and no ring memory.
//! - Retained messages and `$SYS/outpost/…` status are served here, not by the router
//!   (rumqttd clears a retained message on any empty publish and has no `$SYS`).
//! - Wills are published here, only when a connection ends without a DISCONNECT (or with
//!   MQTT 5 reason 0x04); rumqttd would also publish them after a normal DISCONNECT.
//! - One connection per client id: a second CONNECT with the same id closes the first
//!   (session takeover) and waits for it to finish before the new one proceeds.

pub mod acks;
pub mod codec;
mod conn;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::{Notification, Router, RouterConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{AckMode, BrokerConfig};
use crate::event::{Event, IdGen, now_ms};
use crate::metrics::Metrics;
use crate::telemetry::LogThrottle;

/// Bound of the channel into the local publisher task.
const LOCAL_CHANNEL: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot listen on {addr} (`{key}`): {source}; pick a free address or stop what holds it")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("the embedded broker refused an internal link: {0}")]
    Link(String),
}

type LinkParts = (LinkTx, LinkRx, Notification);
type LinkFactory = dyn Fn(&str, bool) -> Result<LinkParts, String> + Send + Sync;
/// The current `$SYS/outpost/…` topics and their payloads.
pub type Status = Arc<Vec<(String, Bytes)>>;

/// Filters some local client subscribes to, counted; decides whether the router sees a
/// publish at all.
#[derive(Debug, Default)]
pub struct SubIndex {
    filters: RwLock<HashMap<String, usize>>,
    total: AtomicUsize,
}

impl SubIndex {
    /// The part of a filter that topics are matched against (`$share/group/` stripped).
    fn matching_part(filter: &str) -> &str {
        match filter.strip_prefix("$share/").and_then(|rest| rest.split_once('/')) {
            Some((_, f)) => f,
            None => filter,
        }
    }

    pub fn add(&self, filter: &str) {
        let mut f = self.filters.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *f.entry(SubIndex::matching_part(filter).to_owned()).or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn remove(&self, filter: &str) {
        let mut f = self.filters.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = SubIndex::matching_part(filter);
        if let Some(n) = f.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                f.remove(key);
            }
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn matches(&self, topic: &str) -> bool {
        if self.total.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let f = self.filters.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.keys().any(|filter| topic_matches(topic, filter))
    }
}

/// MQTT topic matching. (rumqttd's `matches` never matches a `$` topic, not even with
/// `$SYS/#`; the spec only keeps leading wildcards away from them.)
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('#') || filter.starts_with('+')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(level) if f == "+" || f == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// A retained message as stored: the publish (its QoS inside) and its MQTT 5 properties.
#[derive(Debug, Clone)]
pub struct Retained {
    pub publish: Publish,
    pub qos: u8,
    pub properties: Option<PublishProperties>,
}

/// Retained messages by topic, and the bytes they hold (bounded by `broker.max_retained` and
/// `broker.max_retained_bytes`).
#[derive(Debug, Default)]
struct RetainedStore {
    by_topic: HashMap<String, Retained>,
    bytes: u64,
}

impl RetainedStore {
    fn size(topic: &str, r: &Retained) -> u64 {
        (topic.len() + r.publish.payload.len()) as u64
    }
}

/// A client id's live connection, for takeover.
struct Live {
    serial: u64,
    stop: CancellationToken,
    taken: Arc<std::sync::atomic::AtomicBool>,
    finished: CancellationToken,
}

/// State all connections share.
pub struct Shared {
    pub cfg: BrokerConfig,
    pub metrics: Metrics,
    pub ids: IdGen,
    pub events: mpsc::Sender<Event>,
    pub subs: Arc<SubIndex>,
    retained: Mutex<RetainedStore>,
    live: Mutex<HashMap<String, Live>>,
    /// Filters of persistent (clean session = false) sessions whose client is offline; the
    /// router keeps queueing for them, so they stay in [`SubIndex`].
    offline: Mutex<HashMap<String, HashSet<String>>>,
    serial: AtomicU64,
    connections: AtomicUsize,
    local: mpsc::Sender<Packet>,
    links: Box<LinkFactory>,
    pub status: watch::Receiver<Status>,
    logs: Mutex<BTreeMap<&'static str, LogThrottle>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub fn ack_after_commit(&self) -> bool {
        self.cfg.ack == AckMode::AfterCommit
    }

    /// Logging gate for warnings that can repeat per packet: at most one per kind per 10 s.
    pub fn log_ready(&self, kind: &'static str) -> Option<u64> {
        lock(&self.logs).entry(kind).or_default().ready(tokio::time::Instant::now())
    }

    /// Builds a router link for a client (blocking: it waits for the router's answer).
    async fn link(self: &Arc<Self>, client_id: &str, clean: bool) -> Result<LinkParts, String> {
        let shared = Arc::clone(self);
        let id = codec::router_id(client_id);
        tokio::task::spawn_blocking(move || (shared.links)(&id, clean)).await.map_err(|e| e.to_string())?
    }

    /// Hands a publish to the router for local subscribers, if any subscription matches.
    /// Waits when the router is behind (backpressure on the publishing connection).
    pub async fn fan_out(&self, topic: &str, packet: impl FnOnce() -> Packet) {
        if self.subs.matches(topic) && self.local.send(packet()).await.is_err() {
            warn!(message = "local broker stopped; publish not delivered to local subscribers", %topic);
        }
    }

    /// Stores, replaces or clears (empty payload) a retained message.
    pub fn retain(&self, topic: &str, message: Retained) {
        let mut store = lock(&self.retained);
        let freed = store.by_topic.get(topic).map_or(0, |old| RetainedStore::size(topic, old));
        if message.publish.payload.is_empty() {
            store.by_topic.remove(topic);
            store.bytes -= freed;
            return;
        }
        let size = RetainedStore::size(topic, &message);
        let fits_count = store.by_topic.len() < self.cfg.max_retained || freed > 0;
        let fits_bytes = store.bytes - freed + size <= self.cfg.max_retained_bytes.as_u64();
        if fits_count && fits_bytes {
            store.by_topic.insert(topic.to_owned(), message);
            store.bytes = store.bytes - freed + size;
        } else {
            drop(store);
            Metrics::add(&self.metrics.counters().retained_refused, 1);
            if let Some(folded) = self.log_ready("retained") {
                warn!(message = "retained message not kept: broker.max_retained topics or broker.max_retained_bytes are held already; raise them or clear retained topics with an empty retained publish", %topic, similar_since_last_log = folded);
            }
        }
    }

    /// Retained messages matching `filter`.
    pub fn retained_for(&self, filter: &str) -> Vec<(String, Retained)> {
        let filter = SubIndex::matching_part(filter);
        lock(&self.retained)
            .by_topic
            .iter()
            .filter(|(topic, _)| topic_matches(topic, filter))
            .map(|(t, r)| (t.clone(), r.clone()))
            .collect()
    }

    /// Hands an event to the route stage; waits while it is full, which is what slows the
    /// sensor down (its socket is not read meanwhile). Waiting is counted and logged, so an
    /// operator sees sensors being throttled.
    pub async fn ingest(&self, event: Event) -> bool {
        let counters = self.metrics.counters();
        Metrics::add(&counters.ingested, 1);
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(event)) => {
                Metrics::add(&counters.ingest_throttled, 1);
                if let Some(folded) = self.log_ready("throttled") {
                    warn!(
                        message = "sensors are being slowed down: the pipeline is full because the buffer cannot commit fast enough (slow or full disk, see commit warnings) or the rules are too slow",
                        similar_since_last_log = folded,
                        throttled_total = Metrics::get(&counters.ingest_throttled)
                    );
                }
                self.events.send(event).await.is_ok()
            }
        }
    }

    pub fn new_event(&self, topic: String, payload: Bytes, qos: u8, client_id: &Arc<str>) -> Event {
        Event {
            id: self.ids.next_id(),
            topic,
            payload,
            qos: Some(qos),
            received_ms: now_ms(),
            client_id: Some(Arc::clone(client_id)),
            ticket: None,
        }
    }
}

/// Publishes into the local broker for rules' `republish` actions (actuators). It holds no
/// sender of events: the route stage owns it and must see its input close at shutdown.
pub struct Republisher {
    local: mpsc::Sender<Packet>,
    subs: Arc<SubIndex>,
}

impl Republisher {
    /// Hands the publish to local subscribers without waiting; refuses when the link is full.
    pub fn try_publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        if !self.subs.matches(topic) {
            return Ok(());
        }
        let publish =
            Publish::new(Bytes::copy_from_slice(topic.as_bytes()), Bytes::copy_from_slice(payload), false);
        self.local.try_send(conn::tag_qos0(publish, None)).map_err(|e| format!("local broker link: {e}"))
    }
}

/// Maps our typed broker config onto rumqttd's router config, in this one place.
fn router_config(cfg: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        // Room for the internal link and for takeovers that overlap briefly.
        max_connections: cfg.max_connections.get() + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: usize::try_from(cfg.ring_segment_size.as_u64()).unwrap_or(usize::MAX),
        max_segment_count: cfg.ring_segments.get(),
        ..RouterConfig::default()
    }
}

/// Starts the router, the local publisher and the listeners. Returns once the listeners are
/// bound, so callers (and tests) can connect sensors right away.
pub async fn start(
    cfg: &BrokerConfig,
    ids: IdGen,
    out: mpsc::Sender<Event>,
    metrics: Metrics,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Republisher, IngestError> {
    let mut listeners = vec![bind("broker.listen", cfg.listen).await?];
    if let Some(addr) = cfg.listen_v5 {
        listeners.push(bind("broker.listen_v5", addr).await?);
    }
    let router_tx = Router::new(0, router_config(cfg)).spawn();
    let links: Box<LinkFactory> = Box::new(move |id: &str, clean: bool| {
        LinkBuilder::new(id, router_tx.clone())
            .clean_session(clean)
            .dynamic_filters(true)
            .build()
            .map_err(|e| e.to_string())
    });
    // The internal link every fan-out publish goes through. Dynamic filters: a publish that
    // races an unsubscribe and matches nothing must not get the link disconnected.
    let internal_id = format!("outpost-local-{:016x}", rand::random::<u64>());
    let (link_tx, link_rx, _) = links(&internal_id, true).map_err(IngestError::Link)?;
    let (local_tx, local_rx) = mpsc::channel(LOCAL_CHANNEL);
    let (status_tx, status_rx) = watch::channel(Arc::new(Vec::new()));
    let subs = Arc::new(SubIndex::default());
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        ids,
        events: out,
        subs: Arc::clone(&subs),
        retained: Mutex::default(),
        live: Mutex::default(),
        offline: Mutex::default(),
        serial: AtomicU64::new(0),
        connections: AtomicUsize::new(0),
        local: local_tx.clone(),
        links,
        status: status_rx,
        logs: Mutex::default(),
    });
    tracker.spawn(local_publisher(link_tx, link_rx, local_rx));
    tracker.spawn(status(Arc::clone(&shared), status_tx, cancel.clone()));
    for listener in listeners {
        let addr = listener.local_addr().unwrap_or(cfg.listen);
        info!(message = "embedded broker listening", %addr, protocols = "MQTT 3.1.1 and 5");
        tracker.spawn(accept(listener, Arc::clone(&shared), cancel.clone(), tracker.clone()));
    }
    Ok(Republisher { local: local_tx, subs })
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, IngestError> {
    TcpListener::bind(addr).await.map_err(|source| IngestError::Bind { key, addr, source })
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(conn::serve(stream, peer, Arc::clone(&shared), cancel.clone()));
            }
            Err(error) => {
                // EMFILE and friends: keep the listener, back off briefly so the loop does not
                // spin while descriptors are exhausted.
                if let Some(folded) = shared.log_ready("accept") {
                    error!(message = "accepting a sensor connection failed; check the process's file descriptor limit (LimitNOFILE)", %error, similar_since_last_log = folded);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // The route stage ends when every sender of events is gone; the listener holds one
    // through `shared` until here.
    drop(shared);
}

/// Owns the internal router link: forwards fan-out publishes, and services the link
/// (answers `Unschedule`, discards the router's acks for those publishes).
async fn local_publisher(mut tx: LinkTx, mut rx: LinkRx, mut input: mpsc::Receiver<Packet>) {
    loop {
        tokio::select! {
            packet = input.recv() => match packet {
                Some(packet) => {
                    if let Err(error) = tx.send(packet).await {
                        error!(message = "local broker link failed; local subscribers stop receiving", %error);
                        break;
                    }
                }
                None => break,
            },
            n = rx.next() => match n {
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            },
        }
    }
}

/// Refreshes the `$SYS/outpost/…` topics every `broker.sys_interval`.
async fn status(shared: Arc<Shared>, tx: watch::Sender<Status>, cancel: CancellationToken) {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(shared.cfg.sys_interval);
    loop {
        let g = shared.metrics.gauges();
        let c = shared.metrics.counters();
        let upstream = if Metrics::get(&g.upstream_connected) > 0 { "connected" } else { "disconnected" };
        let topics = vec![
            ("$SYS/outpost/version".to_owned(), Bytes::from_static(env!("CARGO_PKG_VERSION").as_bytes())),
            ("$SYS/outpost/uptime".to_owned(), Bytes::from(started.elapsed().as_secs().to_string())),
            ("$SYS/outpost/clients".to_owned(), Bytes::from(Metrics::get(&g.sensors_connected).to_string())),
            ("$SYS/outpost/backlog".to_owned(), Bytes::from(Metrics::get(&g.buffered_events).to_string())),
            ("$SYS/outpost/upstream".to_owned(), Bytes::from_static(upstream.as_bytes())),
            ("$SYS/outpost/ingested".to_owned(), Bytes::from(Metrics::get(&c.ingested).to_string())),
        ];
        tx.send_replace(Arc::new(topics));
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
    }
    drop(shared);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_counts_subscriptions_and_matches_like_mqtt() {
        let idx = SubIndex::default();
        assert!(!idx.matches("a/b"));
        idx.add("a/+");
        idx.add("$share/g/c/#");
        idx.add("a/+");
        assert!(idx.matches("a/b"));
        assert!(idx.matches("c/d/e"));
        assert!(!idx.matches("b/a"));
        idx.remove("a/+");
        assert!(idx.matches("a/b"), "one subscription left");
        idx.remove("a/+");
        assert!(!idx.matches("a/b"));
        idx.add("#");
        assert!(!idx.matches("$SYS/x"), "leading wildcards skip $ topics");
        for (topic, filter, want) in [
            ("$SYS/outpost/clients", "$SYS/#", true),
            ("$SYS/outpost/clients", "$SYS/+/clients", true),
            ("a/b/c", "a/b/c/#", true),
            ("a/b", "a/+/c", false),
            ("a//b", "a/+/b", true),
            ("a/b/c", "a/b", false),
        ] {
            assert_eq!(topic_matches(topic, filter), want, "{topic} vs {filter}");
        }
    }
}
