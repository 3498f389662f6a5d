//! Retained messages: the last retained publish of each topic, replayed to new subscriptions.
//!
//! # Invariants
//! - Bounded: at most `broker.max_retained` topics and `broker.max_retained_bytes` bytes (topic
//!   plus payload). A message that does not fit is not kept, counted (`retained_refused`) and
//!   logged; replacing or clearing a topic always succeeds.
//! - A message whose MQTT 5 message expiry passed is never replayed, and is removed at the
//!   next replay.
//! - One lock, held only to read or change the map: nothing else is locked under it and it is
//!   never held across an `.await`. Callers get copies (sharing the payload bytes).
//! - Durable (when built [`RetainedStore::durable`]): every change that was kept is written to
//!   the buffer file's `retained` table by the store thread, and [`RetainedStore::retain`]
//!   returns only once that write is committed (or failed: counted in `retained_unsaved`,
//!   logged once per episode, kept in memory). The publisher's PUBACK comes after it, so a
//!   retained value a client saw acknowledged survives a SIGKILL. A second, async lock
//!   (`Disk::order`) spans "change the map, queue the write", so the file receives the
//!   writes in the map's order and ends with the same value per topic.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{Publish, PublishProperties};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

use crate::buffer::StoredRetained;
use crate::buffer::worker::Command;
use crate::metrics::Metrics;
use crate::mqtt::{codec, topic};
use crate::telemetry::LogThrottle;

/// A retained message as stored: the publish (its QoS inside) and its MQTT 5 properties.
#[derive(Debug, Clone)]
pub struct Retained {
    pub publish: Publish,
    pub qos: u8,
    pub properties: Option<PublishProperties>,
    /// When its message expiry passes (`None`: never).
    pub expires: Option<Instant>,
}

impl Retained {
    fn size(topic: &str, publish: &Publish) -> u64 {
        (topic.len() + publish.payload.len()) as u64
    }

    /// As the buffer file keeps it; `now` and `now_ms` are the same moment on both clocks.
    pub fn to_stored(&self, now: Instant, now_ms: u64) -> StoredRetained {
        let p = self.properties.clone().unwrap_or_default();
        let expires_ms = self.expires.map(|at| {
            now_ms.saturating_add(
                u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX),
            )
        });
        StoredRetained {
            qos: self.qos,
            payload: self.publish.payload.clone(),
            expires_ms,
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
        }
    }

    /// Back from the buffer file (see [`Retained::to_stored`]). Properties are `None` when
    /// the message had none a subscriber gets, as a publish without properties stores them.
    pub fn from_stored(topic: &str, stored: StoredRetained, now: Instant, now_ms: u64) -> Retained {
        let expires = stored.expires_ms.map(|at| now + Duration::from_millis(at.saturating_sub(now_ms)));
        let properties = PublishProperties {
            payload_format_indicator: stored.payload_format_indicator,
            // Replaced at delivery by what remains (see `deliver_out`).
            message_expiry_interval: expires.map(|_| 0),
            topic_alias: None,
            response_topic: stored.response_topic,
            correlation_data: stored.correlation_data,
            user_properties: stored.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: stored.content_type,
        };
        let properties = (properties != PublishProperties::default()).then_some(properties);
        // As `fan_out` stores a live one: its QoS, packet id 0, retain set.
        let publish = Publish::new(Bytes::copy_from_slice(topic.as_bytes()), stored.payload, false);
        let publish = codec::publish_with(&publish, stored.qos, 0, true);
        Retained { publish, qos: stored.qos, properties, expires }
    }
}

/// What makes the broker's retained messages durable: the store thread's command queue and
/// what was loaded from the buffer file at start-up.
pub struct Durable {
    pub commands: mpsc::Sender<Command>,
    pub loaded: Vec<(String, StoredRetained)>,
}

/// The way to the buffer file, for a durable store.
#[derive(Debug)]
struct Disk {
    commands: mpsc::Sender<Command>,
    order: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Held {
    by_topic: HashMap<String, Retained>,
    /// Bytes `by_topic` holds, as [`Retained::size`] counts them.
    bytes: u64,
    refused_log: LogThrottle,
    unsaved_log: LogThrottle,
}

/// The retained messages of the broker.
#[derive(Debug)]
pub struct RetainedStore {
    max_topics: usize,
    max_bytes: u64,
    metrics: Metrics,
    held: Mutex<Held>,
    disk: Option<Disk>,
}

impl RetainedStore {
    /// At most `max_topics` topics and `max_bytes` bytes (`broker.max_retained`,
    /// `broker.max_retained_bytes`).
    pub fn new(max_topics: usize, max_bytes: u64, metrics: Metrics) -> RetainedStore {
        RetainedStore { max_topics, max_bytes, metrics, held: Mutex::default(), disk: None }
    }

    /// A store whose changes are committed to the buffer file through the store thread's
    /// `commands`, starting with `loaded` (what [`crate::buffer::Store::load_retained`] read,
    /// already within the bounds).
    pub fn durable(
        max_topics: usize,
        max_bytes: u64,
        metrics: Metrics,
        commands: mpsc::Sender<Command>,
        loaded: Vec<(String, StoredRetained)>,
    ) -> RetainedStore {
        let mut store = RetainedStore::new(max_topics, max_bytes, metrics);
        let (now, now_ms) = (Instant::now(), crate::event::now_ms());
        {
            let held = store.held.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (topic, stored) in loaded {
                let message = Retained::from_stored(&topic, stored, now, now_ms);
                held.bytes += Retained::size(&topic, &message.publish);
                held.by_topic.insert(topic, message);
            }
        }
        store.disk = Some(Disk { commands, order: tokio::sync::Mutex::new(()) });
        store
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores, replaces or clears (empty payload) a retained message; when durable, returns
    /// once the change is committed to the buffer file (or that failed, counted and logged).
    pub async fn retain(&self, topic: &str, message: Retained) {
        let Some(disk) = &self.disk else {
            self.keep(topic, message);
            return;
        };
        let stored = (!message.publish.payload.is_empty())
            .then(|| message.to_stored(Instant::now(), crate::event::now_ms()));
        let committed = {
            let _order = disk.order.lock().await;
            if !self.keep(topic, message) {
                return;
            }
            let (reply, committed) = oneshot::channel();
            let writes = vec![(topic.to_owned(), stored)];
            if disk.commands.send(Command::Retain { writes, reply }).await.is_err() {
                // The store thread has stopped: the gateway is shutting down.
                self.unsaved(topic, "the buffer's store thread has stopped");
                return;
            }
            committed
        };
        match committed.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => self.unsaved(topic, &error),
            Err(_) => self.unsaved(topic, "the buffer's store thread has stopped"),
        }
    }

    fn unsaved(&self, topic: &str, error: &str) {
        Metrics::add(&self.metrics.counters().retained_unsaved, 1);
        let log = self.lock().unsaved_log.ready(Instant::now());
        if let Some(folded) = log {
            warn!(message = "retained message kept in memory only: writing it to the buffer file failed, so a restart forgets it; see the buffer's own errors (disk full, permissions) and publish it again once they are fixed", %topic, %error, similar_since_last_log = folded);
        }
    }

    /// Changes the map; `false` when the bounds refused the message.
    fn keep(&self, topic: &str, message: Retained) -> bool {
        let mut held = self.lock();
        let freed = held.by_topic.get(topic).map_or(0, |old| Retained::size(topic, &old.publish));
        if message.publish.payload.is_empty() {
            held.by_topic.remove(topic);
            held.bytes -= freed;
            return true;
        }
        let size = Retained::size(topic, &message.publish);
        let fits_count = held.by_topic.len() < self.max_topics || freed > 0;
        let fits_bytes = held.bytes - freed + size <= self.max_bytes;
        if fits_count && fits_bytes {
            held.by_topic.insert(topic.to_owned(), message);
            held.bytes = held.bytes - freed + size;
            return true;
        }
        let log = held.refused_log.ready(tokio::time::Instant::now());
        drop(held);
        Metrics::add(&self.metrics.counters().retained_refused, 1);
        if let Some(folded) = log {
            warn!(message = "retained message not kept: broker.max_retained topics or broker.max_retained_bytes are held already; raise them or clear retained topics with an empty retained publish", %topic, similar_since_last_log = folded);
        }
        false
    }

    /// Retained messages matching `filter` (a shared subscription's filter without its group).
    pub fn matching(&self, filter: &str) -> Vec<Retained> {
        let filter = topic::split_shared(filter).1;
        let now = Instant::now();
        let mut held = self.lock();
        let mut freed = 0;
        held.by_topic.retain(|name, r| {
            let live = r.expires.is_none_or(|at| at > now);
            if !live {
                freed += Retained::size(name, &r.publish);
            }
            live
        });
        held.bytes -= freed;
        held.by_topic
            .iter()
            .filter(|(name, _)| topic::filter_matches(filter, name))
            .map(|(_, r)| r.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retained(topic: &str, payload: &str) -> Retained {
        Retained {
            publish: Publish::new(topic.to_owned(), payload.to_owned(), true),
            qos: 0,
            properties: None,
            expires: None,
        }
    }

    fn payloads(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut p: Vec<String> = store
            .matching(filter)
            .into_iter()
            .map(|r| String::from_utf8_lossy(&r.publish.payload).into_owned())
            .collect();
        p.sort();
        p
    }

    #[tokio::test]
    async fn the_bounds_refuse_new_topics_but_never_a_replacement_or_a_clear() {
        // Two topics, 12 bytes (topic + payload) at most.
        let store = RetainedStore::new(2, 12, Metrics::default());
        store.retain("a", retained("a", "1234")).await;
        store.retain("b", retained("b", "1")).await;
        store.retain("c", retained("c", "1")).await;
        assert_eq!(payloads(&store, "#"), ["1", "1234"], "a third topic is refused");
        store.retain("a", retained("a", "12345678")).await;
        assert_eq!(payloads(&store, "a"), ["12345678"], "a replacement frees what it replaces");
        store.retain("b", retained("b", "123")).await;
        assert_eq!(payloads(&store, "b"), ["1"], "13 bytes do not fit");
        store.retain("a", retained("a", "")).await;
        store.retain("c", retained("c", "12345678")).await;
        assert_eq!(payloads(&store, "+"), ["1", "12345678"], "clearing frees a topic and its bytes");
        assert_eq!(Metrics::get(&store.metrics.counters().retained_refused), 2);
    }

    #[tokio::test]
    async fn a_shared_subscription_matches_without_its_group() {
        let store = RetainedStore::new(10, 1_000, Metrics::default());
        store.retain("s/1", retained("s/1", "x")).await;
        assert_eq!(payloads(&store, "$share/g/s/+"), ["x"]);
        assert!(payloads(&store, "$share/g/t").is_empty());
    }

    #[tokio::test]
    async fn a_durable_store_commits_before_returning_and_loads_properties_and_remaining_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = crate::buffer::Store::open(dir.path()).expect("open");
        let worker = crate::buffer::worker::Worker::spawn(store, crate::watchdog::Heartbeat::unwatched())
            .expect("worker");
        let retained_store =
            RetainedStore::durable(10, 1_000, Metrics::default(), worker.commands.clone(), Vec::new());
        let properties = PublishProperties {
            content_type: Some("text/plain".to_owned()),
            user_properties: vec![("k".to_owned(), "v".to_owned())],
            correlation_data: Some(Bytes::from_static(b"c")),
            response_topic: Some("r".to_owned()),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(100),
            ..PublishProperties::default()
        };
        let mut with_props = retained("p", "1");
        with_props.qos = 1;
        with_props.properties = Some(properties.clone());
        with_props.expires = Some(Instant::now() + Duration::from_secs(100));
        retained_store.retain("p", with_props).await;
        retained_store.retain("a", retained("a", "x")).await;
        retained_store.retain("b", retained("b", "y")).await;
        retained_store.retain("b", retained("b", "")).await;
        drop(retained_store);
        tokio::task::spawn_blocking(move || worker.join()).await.expect("join");

        let (mut store, _) = crate::buffer::Store::open(dir.path()).expect("reopen");
        let load = store.load_retained(crate::event::now_ms(), 10, 1_000).expect("load");
        let topics: Vec<&str> = load.messages.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(topics, ["a", "p"], "the clear removed b from the file");
        let loaded = RetainedStore::durable(10, 1_000, Metrics::default(), mpsc::channel(1).0, load.messages);
        let p = loaded.matching("p").pop().expect("p is retained");
        assert_eq!(p.qos, 1);
        assert_eq!(&p.publish.payload[..], b"1");
        let got = p.properties.expect("properties");
        assert_eq!(got.content_type, properties.content_type);
        assert_eq!(got.user_properties, properties.user_properties);
        assert_eq!(got.correlation_data, properties.correlation_data);
        assert_eq!(got.response_topic, properties.response_topic);
        assert_eq!(got.payload_format_indicator, Some(1));
        let left = p.expires.expect("expiry kept").saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(95) && left <= Duration::from_secs(100), "{left:?} remain");
        assert!(loaded.matching("a").pop().expect("a").properties.is_none(), "no properties stay none");
    }

    #[test]
    fn loading_removes_what_expired_while_down_and_stops_at_the_bounds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = crate::buffer::Store::open(dir.path()).expect("open");
        let (now, now_ms) = (Instant::now(), crate::event::now_ms());
        let mut expired = retained("e", "1").to_stored(now, now_ms);
        expired.expires_ms = Some(now_ms - 1);
        let writes = vec![
            ("e".to_owned(), Some(expired)),
            ("k1".to_owned(), Some(retained("k1", "1").to_stored(now, now_ms))),
            ("k2".to_owned(), Some(retained("k2", "1").to_stored(now, now_ms))),
            ("k3".to_owned(), Some(retained("k3", "1").to_stored(now, now_ms))),
        ];
        store.apply_retained(&writes).expect("write");
        let load = store.load_retained(now_ms, 2, 1_000).expect("load");
        assert_eq!((load.messages.len(), load.expired, load.not_loaded), (2, 1, 1));
        let load = store.load_retained(now_ms, 10, 1_000).expect("load again");
        assert_eq!((load.messages.len(), load.expired), (3, 0), "the expired one was removed, k3 kept");
        let load = store.load_retained(now_ms, 10, 7).expect("load by bytes");
        assert_eq!((load.messages.len(), load.not_loaded), (2, 1), "3 bytes each, 7 at most");
    }
}
