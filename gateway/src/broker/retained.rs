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

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use rumqttd::protocol::{Publish, PublishProperties};
use tokio::time::Instant;
use tracing::warn;

use crate::metrics::Metrics;
use crate::mqtt::topic;
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
}

#[derive(Debug, Default)]
struct Held {
    by_topic: HashMap<String, Retained>,
    /// Bytes `by_topic` holds, as [`Retained::size`] counts them.
    bytes: u64,
    refused_log: LogThrottle,
}

/// The retained messages of the broker.
#[derive(Debug)]
pub struct RetainedStore {
    max_topics: usize,
    max_bytes: u64,
    metrics: Metrics,
    held: Mutex<Held>,
}

impl RetainedStore {
    /// At most `max_topics` topics and `max_bytes` bytes (`broker.max_retained`,
    /// `broker.max_retained_bytes`).
    pub fn new(max_topics: usize, max_bytes: u64, metrics: Metrics) -> RetainedStore {
        RetainedStore { max_topics, max_bytes, metrics, held: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores, replaces or clears (empty payload) a retained message.
    pub fn retain(&self, topic: &str, message: Retained) {
        let mut held = self.lock();
        let freed = held.by_topic.get(topic).map_or(0, |old| Retained::size(topic, &old.publish));
        if message.publish.payload.is_empty() {
            held.by_topic.remove(topic);
            held.bytes -= freed;
            return;
        }
        let size = Retained::size(topic, &message.publish);
        let fits_count = held.by_topic.len() < self.max_topics || freed > 0;
        let fits_bytes = held.bytes - freed + size <= self.max_bytes;
        if fits_count && fits_bytes {
            held.by_topic.insert(topic.to_owned(), message);
            held.bytes = held.bytes - freed + size;
            return;
        }
        let log = held.refused_log.ready(tokio::time::Instant::now());
        drop(held);
        Metrics::add(&self.metrics.counters().retained_refused, 1);
        if let Some(folded) = log {
            warn!(message = "retained message not kept: broker.max_retained topics or broker.max_retained_bytes are held already; raise them or clear retained topics with an empty retained publish", %topic, similar_since_last_log = folded);
        }
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

    #[test]
    fn the_bounds_refuse_new_topics_but_never_a_replacement_or_a_clear() {
        // Two topics, 12 bytes (topic + payload) at most.
        let store = RetainedStore::new(2, 12, Metrics::default());
        store.retain("a", retained("a", "1234"));
        store.retain("b", retained("b", "1"));
        store.retain("c", retained("c", "1"));
        assert_eq!(payloads(&store, "#"), ["1", "1234"], "a third topic is refused");
        store.retain("a", retained("a", "12345678"));
        assert_eq!(payloads(&store, "a"), ["12345678"], "a replacement frees what it replaces");
        store.retain("b", retained("b", "123"));
        assert_eq!(payloads(&store, "b"), ["1"], "13 bytes do not fit");
        store.retain("a", retained("a", ""));
        store.retain("c", retained("c", "12345678"));
        assert_eq!(payloads(&store, "+"), ["1", "12345678"], "clearing frees a topic and its bytes");
        assert_eq!(Metrics::get(&store.metrics.counters().retained_refused), 2);
    }

    #[test]
    fn a_shared_subscription_matches_without_its_group() {
        let store = RetainedStore::new(10, 1_000, Metrics::default());
        store.retain("s/1", retained("s/1", "x"));
        assert_eq!(payloads(&store, "$share/g/s/+"), ["x"]);
        assert!(payloads(&store, "$share/g/t").is_empty());
    }
}
