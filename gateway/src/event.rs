//! The values that flow between pipeline stages.
//!
//! An [`Event`] is what a sensor published, as ingest saw it. An [`Outbound`] is what a route
//! decided to send upstream; the relay turns it into a durable buffer record. Ids come from an
//! [`IdGen`] seeded with the buffer's boot epoch, so they increase across restarts and are
//! never reused, which is what lets an upstream deduplicate resends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::ingest::acks::Ticket;

/// Bits of an id that count within one boot; the boot epoch fills the rest.
pub const EPOCH_SHIFT: u32 = 40;

/// Hands out ids `epoch << 40 | n`: strictly increasing, unique across restarts as long as one
/// boot assigns fewer than 2^40 ids.
#[derive(Debug, Clone)]
pub struct IdGen {
    next: Arc<AtomicU64>,
}

impl IdGen {
    pub fn new(epoch: u64) -> IdGen {
        IdGen { next: Arc::new(AtomicU64::new(epoch << EPOCH_SHIFT)) }
    }

    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// Renders an event id the way it travels upstream: 16 lowercase hex digits.
pub fn format_event_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Why `topic` cannot be published to, if it cannot (MQTT: non-empty, no wildcards, no
/// U+0000, at most 65,535 bytes). Brokers drop the connection of a client that publishes such a
/// topic, so one of them in the buffer would block the upstream link for good.
pub fn invalid_topic(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("empty (topic aliases are not offered)")
    } else if topic.contains(['+', '#']) {
        Some("wildcards are not allowed in a topic name")
    } else if topic.contains('\0') {
        Some("U+0000 is not allowed in a topic name")
    } else if topic.len() > usize::from(u16::MAX) {
        Some("longer than 65,535 bytes")
    } else {
        None
    }
}

/// Milliseconds since the Unix epoch, the time unit used in records and envelopes.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// One publish from a sensor, as received by ingest.
#[derive(Debug, Clone)]
pub struct Event {
    /// Gateway-assigned, increasing, unique across restarts.
    pub id: u64,
    pub topic: String,
    pub payload: Bytes,
    /// The publisher's QoS (`None` for events the gateway made itself, such as rule chains).
    pub qos: Option<u8>,
    pub received_ms: u64,
    /// The publisher's client id (shared with its connection: no copy per event).
    pub client_id: Option<Arc<str>>,
    /// The sensor's held acknowledgement: dropped once the event is safe (see
    /// [`crate::ingest::acks`]). `None` for QoS 0 and for `broker.ack = "on_receipt"`.
    pub ticket: Option<Ticket>,
}

/// An event bound upstream, as decided by a route.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub event_id: u64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    /// 0 is the most urgent, 9 the least.
    pub priority: u8,
    /// Absolute expiry in Unix ms, if the route has a TTL.
    pub expires_ms: Option<u64>,
    pub received_ms: u64,
    /// The source event's held acknowledgement; every copy a rule makes carries a clone.
    pub ticket: Option<Ticket>,
}
