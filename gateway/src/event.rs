//! The values that flow between pipeline stages.
//!
//! An [`Event`] is what a sensor published, as ingest saw it. An [`Outbound`] is what a route
//! decided to send upstream; the relay turns it into a durable buffer record. Ids come from an
//! [`IdGen`] seeded with the buffer's boot epoch, so they increase across restarts and are
//! never reused, which is what lets an upstream deduplicate resends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::ack::Ticket;

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

/// A topic as it may appear in a log line: control and non-printable characters escaped,
/// cut after 200 characters.
pub fn escape_topic(topic: &str) -> String {
    const SHOWN: usize = 200;
    let mut out: String = topic.chars().take(SHOWN).flat_map(char::escape_debug).collect();
    if topic.chars().nth(SHOWN).is_some() {
        out.push_str(&format!("… ({} bytes)", topic.len()));
    }
    out
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
    /// [`crate::ack`]). `None` for QoS 0 and for `broker.ack = "on_receipt"`.
    pub ticket: Option<Ticket>,
    /// A command from the cloud (`[[upstream.subscribe]]`), or an event a rule republished
    /// from one: never sent back upstream, by a bridge route or a rule (no loops).
    pub from_upstream: bool,
    /// The publisher's IP address as text, shared with its connection (rules' `peerhost`).
    pub peerhost: Option<Arc<str>>,
    /// The name the publisher logged in with (the ACL's name for it, else the one it sent),
    /// shared with its connection (rules' `username`).
    pub username: Option<Arc<str>>,
    /// The PUBLISH's retain and DUP flags (rules' `flags`).
    pub retain: bool,
    pub dup: bool,
    /// The MQTT 5 properties rules can read (`pub_props`); `None` when there are none, so a
    /// 3.1.1 publish costs nothing here.
    pub pub_props: Option<Arc<outpost_rules::PubProps>>,
    /// Set for a client event the broker reported (`$events/client_connected`, ...): only
    /// rules reading that event see it, and it is never unrouted. `None` for a publish.
    pub lifecycle: Option<Box<ClientEvent>>,
    /// A QoS 2 publish's packet id, or a PUBREL (with acknowledgement held): what lets the
    /// route stage count a QoS 2 reading in its windows once, across a crash (`route`'s QoS 2
    /// markers). `None` for anything else, and with `broker.ack = "on_receipt"`.
    pub qos2: Option<Qos2>,
}

/// The QoS 2 flow an [`Event`] belongs to (`client_id` is its sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos2 {
    /// A QoS 2 publish with this packet id.
    Publish(u16),
    /// The PUBREL of this packet id: no reading, nothing to route. Its ticket holds the
    /// PUBCOMP until the removal of the reading's marker is durable.
    Release(u16),
}

/// A client event (connected, disconnected, subscribed, a publish dropped) as the broker
/// reports it to rules: what [`outpost_rules::Lifecycle`] holds.
#[derive(Debug, Clone)]
pub struct ClientEvent {
    pub info: outpost_rules::Lifecycle,
}

/// Which client events some rule reads: set where rules are loaded (start-up, each reload),
/// read by the broker at each event site, so an event no rule reads costs one atomic load.
#[derive(Debug, Clone, Default)]
pub struct EventsWanted(Arc<AtomicU8>);

impl EventsWanted {
    pub fn set(&self, kinds: outpost_rules::EventKinds) {
        self.0.store(kinds.bits(), Ordering::Relaxed);
    }

    pub fn wants(&self, kind: outpost_rules::EventKind) -> bool {
        outpost_rules::EventKinds::from_bits(self.0.load(Ordering::Relaxed)).contains(kind)
    }
}

impl Event {
    /// An event with nothing but its id, topic, payload and receive time: what the gateway
    /// makes itself (a closed window's, a republish's) before it sets what else applies.
    pub fn made(id: u64, topic: String, payload: Bytes, received_ms: u64) -> Event {
        Event {
            id,
            topic,
            payload,
            qos: None,
            received_ms,
            client_id: None,
            ticket: None,
            from_upstream: false,
            peerhost: None,
            username: None,
            retain: false,
            dup: false,
            pub_props: None,
            lifecycle: None,
            qos2: None,
        }
    }

    /// The properties this event's upstream copies carry ([`MessageProps`]); `None` for a
    /// publish without any (every 3.1.1 one).
    pub fn message_props(&self) -> Option<Arc<MessageProps>> {
        self.pub_props.as_deref().map(|props| Arc::new(MessageProps::from_publish(props, self.received_ms)))
    }
}

/// The MQTT 5 properties that describe a message rather than one hop of the wire, as they
/// travel upstream with it (through the buffer): user properties, content type, payload
/// format indicator, response topic, correlation data, and the message expiry as a deadline.
/// Topic aliases and subscription identifiers are per connection and never carried.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MessageProps {
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// In the order sent; a name may repeat.
    pub user_properties: Vec<(String, String)>,
    /// When the message expiry passes, in Unix ms: a deadline rather than the interval, so
    /// what remains of it can be sent after any time in the buffer, a restart included.
    pub expires_ms: Option<u64>,
}

impl MessageProps {
    /// A publish's properties, its message expiry counted from `received_ms`.
    pub fn from_publish(props: &outpost_rules::PubProps, received_ms: u64) -> MessageProps {
        MessageProps {
            payload_format_indicator: props.payload_format_indicator,
            content_type: props.content_type.clone(),
            response_topic: props.response_topic.clone(),
            correlation_data: props.correlation_data.as_deref().map(Bytes::copy_from_slice),
            user_properties: props.user_properties.clone(),
            expires_ms: props
                .message_expiry_interval
                .map(|secs| received_ms.saturating_add(u64::from(secs) * 1000)),
        }
    }

    /// The message expiry interval to send at `now_ms`: what remains, in whole seconds
    /// rounded up (MQTT 5 §3.3.2.3.3: a server sends the interval minus the time the message
    /// waited), never 0 — 0 would not be "expired" but a valid interval, and an expired
    /// message is dropped before it is sent.
    pub fn remaining_expiry_secs(&self, now_ms: u64) -> Option<u32> {
        self.expires_ms.map(|at| {
            let left = at.saturating_sub(now_ms).div_ceil(1000).max(1);
            u32::try_from(left).unwrap_or(u32::MAX)
        })
    }
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
    /// The source event's MQTT 5 properties, carried unchanged by every forward (see the
    /// README's upstream section); `None` when it had none.
    pub props: Option<Arc<MessageProps>>,
    /// No sensor can be asked to resend it if the buffer refuses it (`reject_new`): a closed
    /// window's output (nobody sends it again), or a copy of a reading a stateful rule took
    /// in (a resend would be counted again). The relay writes such a refused copy to the
    /// dead-letter file instead of refusing its ticket.
    pub dead_letter_if_refused: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remaining_expiry_counts_down_from_the_publish_and_never_reaches_zero() {
        let published = outpost_rules::PubProps {
            message_expiry_interval: Some(60),
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "0".into())],
            ..Default::default()
        };
        let props = MessageProps::from_publish(&published, 1_000_000);
        assert_eq!(props.expires_ms, Some(1_060_000));
        assert_eq!(props.user_properties, published.user_properties, "in order, repeats kept");
        assert_eq!(props.remaining_expiry_secs(1_000_000), Some(60));
        assert_eq!(props.remaining_expiry_secs(1_003_500), Some(57), "rounded up");
        assert_eq!(props.remaining_expiry_secs(1_059_999), Some(1));
        assert_eq!(props.remaining_expiry_secs(1_070_000), Some(1));
        let none = MessageProps::from_publish(&outpost_rules::PubProps::default(), 5);
        assert_eq!((none.expires_ms, none.remaining_expiry_secs(5)), (None, None));
    }

    #[test]
    fn log_form_is_escaped_and_short() {
        assert_eq!(escape_topic("a\u{1}b\tc"), "a\\u{1}b\\tc");
        let long = escape_topic(&"x".repeat(1000));
        assert!(long.ends_with("… (1000 bytes)") && long.len() < 300, "{long}");
    }
}
