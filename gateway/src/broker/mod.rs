//! Stage 1: sensor connections and the local broker.
//!
//! Outpost accepts sensor TCP connections itself and speaks MQTT 3.1.1 and 5 with rumqttd's
//! codecs ([`codec`]; nothing else of rumqttd is used). Each connection (`conn`) hands its
//! publishes straight to the route stage through a bounded channel, and holds the sensor's
//! PUBACK until the event is safe — committed to the buffer or acknowledged upstream
//! ([`acks`]). Local fan-out (subscriptions between sensors, actuators and dashboards) is
//! Outpost's own too: a subscription trie ([`subs`]) and a bounded queue per session
//! ([`local`]). rumqttd's listener and router are not used: the listener acknowledged
//! publishes from RAM before anyone read them; the router lost deliveries for a reader that
//! fell behind its ring, aborted the gateway on a non-ASCII topic under `#` and on a shared
//! subscription of a persistent session, and kept memory for every filter and topic ever
//! seen (issue #20).
//!
//! # Invariants
//! - **A PUBACK (or PUBREC) means the event is safe** (`broker.ack = "after_commit"`, the
//!   default): sent only once every copy of the event is committed or acknowledged upstream,
//!   in the order the publishes arrived on that connection.
//! - **Backpressure, not loss:** a connection that cannot hand an event to the route stage
//!   stops reading its socket; TCP then slows the sensor. Nothing is dropped on the way in.
//! - Local deliveries are bounded per subscriber, and a delivery that does not fit is counted
//!   and logged, never skipped silently ([`local`]).
//! - Retained messages and `$SYS/outpost/…` status are served here, alongside the fan-out.
//! - Wills are published here, only when a connection ends without a DISCONNECT (or with
//!   MQTT 5 reason 0x04).
//! - One connection per client id: a second CONNECT with the same id closes the first
//!   (session takeover) and waits for it to finish before the new one proceeds.

mod conn;
pub mod local;
pub mod subs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{Publish, PublishProperties};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{AckMode, BrokerConfig};
use crate::event::{Event, IdGen, now_ms};
use crate::metrics::Metrics;
use crate::mqtt::topic;

/// Topic filters one session may hold.
pub const MAX_FILTERS: usize = 1_000;
/// How often offline sessions are checked for an expired MQTT 5 session expiry.
const EXPIRY_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr} (`{key}`): {source}; pick a free address or stop what holds it")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// The current `$SYS/outpost/…` topics and their payloads.
pub type Status = Arc<Vec<(String, Bytes)>>;

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
    pub local: Arc<local::Local>,
    retained: Mutex<RetainedStore>,
    live: Mutex<HashMap<String, Live>>,
    serial: AtomicU64,
    connections: AtomicUsize,
    pub status: watch::Receiver<Status>,
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
        self.local.log_ready(kind)
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
        let filter = topic::split_shared(filter).1;
        lock(&self.retained)
            .by_topic
            .iter()
            .filter(|(name, _)| topic::filter_matches(filter, name))
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
    local: Arc<local::Local>,
}

impl Republisher {
    /// Queues the publish (QoS 0) for local subscribers without waiting: a subscriber whose
    /// queue is full misses it, counted as `local_dropped`. Never fails.
    pub fn try_publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let publish =
            Publish::new(Bytes::copy_from_slice(topic.as_bytes()), Bytes::copy_from_slice(payload), false);
        self.local.publish_now(topic, &publish, None);
        Ok(())
    }
}

/// Starts the local broker and the listeners. Returns once the listeners are bound, so
/// callers (and tests) can connect sensors right away.
pub async fn start(
    cfg: &BrokerConfig,
    ids: IdGen,
    out: mpsc::Sender<Event>,
    metrics: Metrics,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Republisher, BrokerError> {
    let mut listeners = vec![bind("broker.listen", cfg.listen).await?];
    if let Some(addr) = cfg.listen_v5 {
        listeners.push(bind("broker.listen_v5", addr).await?);
    }
    let limits = local::Limits {
        max_queued: cfg.max_queued_messages.get(),
        max_offline: cfg.max_offline_sessions,
        max_filters: MAX_FILTERS,
    };
    let local = Arc::new(local::Local::new(limits, metrics.clone()));
    let (status_tx, status_rx) = watch::channel(Arc::new(Vec::new()));
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        ids,
        events: out,
        local: Arc::clone(&local),
        retained: Mutex::default(),
        live: Mutex::default(),
        serial: AtomicU64::new(0),
        connections: AtomicUsize::new(0),
        status: status_rx,
    });
    tracker.spawn(status(Arc::clone(&shared), status_tx, cancel.clone()));
    tracker.spawn(expire_sessions(Arc::clone(&local), cancel.clone()));
    for listener in listeners {
        let addr = listener.local_addr().unwrap_or(cfg.listen);
        info!(message = "embedded broker listening", %addr, protocols = "MQTT 3.1.1 and 5");
        tracker.spawn(accept(listener, Arc::clone(&shared), cancel.clone(), tracker.clone()));
    }
    Ok(Republisher { local })
}

/// Ends offline persistent sessions whose MQTT 5 session expiry has passed.
async fn expire_sessions(local: Arc<local::Local>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                local.expire(tokio::time::Instant::now());
            }
        }
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(addr).await.map_err(|source| BrokerError::Bind { key, addr, source })
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

/// Refreshes the `$SYS/outpost/…` topics every `broker.sys_interval`, and at once when the
/// uplink goes up or down.
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
            // The uplink went up or down: `$SYS/outpost/upstream` must not wait for the tick.
            () = g.upstream_changed.notified() => {}
        }
    }
    drop(shared);
}
