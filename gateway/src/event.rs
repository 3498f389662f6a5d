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

use crate::ack::Ticket;
use crate::metrics::Metrics;

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

/// What a topic name must satisfy besides MQTT's own rules: the limits of the upstream
/// brokers it will be relayed to (`broker.max_topic_levels`, `broker.max_topic_length`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicPolicy {
    pub max_levels: usize,
    pub max_length: usize,
}

impl TopicPolicy {
    /// MQTT's own limits only: any level count, 65,535 bytes.
    pub const MQTT: TopicPolicy = TopicPolicy { max_levels: usize::MAX, max_length: u16::MAX as usize };
}

/// Why a topic name is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    Wildcard,
    Nul,
    /// U+0001–U+001F or U+007F–U+009F.
    Control,
    /// U+FDD0–U+FDEF or U+xFFFE/U+xFFFF.
    NonCharacter,
    TooManyLevels,
    TooLong,
}

impl TopicError {
    /// Whether MQTT itself forbids it (a protocol violation) rather than the upstream brokers'
    /// limits: the former closes the connection, the latter is refused per publish (MQTT 5).
    pub fn is_protocol_violation(self) -> bool {
        matches!(self, TopicError::Empty | TopicError::Wildcard | TopicError::Nul)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TopicError::Empty => "empty (topic aliases are not offered)",
            TopicError::Wildcard => "wildcards are not allowed in a topic name",
            TopicError::Nul => "U+0000 is not allowed in a topic name",
            TopicError::Control => "a control character (U+0001–U+001F, U+007F–U+009F)",
            TopicError::NonCharacter => "a Unicode non-character (U+FDD0–U+FDEF, U+xFFFE, U+xFFFF)",
            TopicError::TooManyLevels => "more levels than broker.max_topic_levels",
            TopicError::TooLong => "longer than broker.max_topic_length",
        }
    }

    /// Counts one refusal of this kind; protocol violations are counted where the connection
    /// is closed (`protocol_errors`).
    pub fn count(self, metrics: &Metrics) {
        let c = metrics.counters();
        let counter = match self {
            TopicError::Control => &c.topics_refused_control,
            TopicError::NonCharacter => &c.topics_refused_noncharacter,
            TopicError::TooManyLevels => &c.topics_refused_levels,
            TopicError::TooLong => &c.topics_refused_length,
            TopicError::Empty | TopicError::Wildcard | TopicError::Nul => return,
        };
        Metrics::add(counter, 1);
    }
}

impl std::fmt::Display for TopicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_refused_char(c: char) -> Option<TopicError> {
    let n = u32::from(c);
    if n == 0 {
        Some(TopicError::Nul)
    } else if n < 0x20 || (0x7F..=0x9F).contains(&n) {
        Some(TopicError::Control)
    } else if (0xFDD0..=0xFDEF).contains(&n) || n & 0xFFFE == 0xFFFE {
        Some(TopicError::NonCharacter)
    } else {
        None
    }
}

/// Why `topic` cannot be published to, if it cannot. MQTT forbids an empty topic (no aliases
/// are offered), wildcards, U+0000 and more than 65,535 bytes; common upstream brokers also
/// refuse control characters and Unicode non-characters (mosquitto 2.0.11 closes the
/// connection over either, measured) and limit the levels (mosquitto: 201, EMQX: 128 by
/// default). An upstream that closes the link over an event gets it again first after every
/// reconnect, so whatever the policy lets through must be what the upstream accepts.
pub fn invalid_topic(topic: &str, policy: &TopicPolicy) -> Option<TopicError> {
    if topic.is_empty() {
        return Some(TopicError::Empty);
    }
    let mut levels = 1usize;
    let mut refused = None;
    for c in topic.chars() {
        match c {
            '+' | '#' => return Some(TopicError::Wildcard),
            '/' => levels += 1,
            _ => {
                if let Some(e) = is_refused_char(c) {
                    // U+0000 breaks the encoding itself: it wins over the softer refusals.
                    if e == TopicError::Nul {
                        return Some(e);
                    }
                    refused.get_or_insert(e);
                }
            }
        }
    }
    if refused.is_some() {
        refused
    } else if topic.len() > usize::from(u16::MAX) || topic.len() > policy.max_length {
        Some(TopicError::TooLong)
    } else if levels > policy.max_levels {
        Some(TopicError::TooManyLevels)
    } else {
        None
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: TopicPolicy = TopicPolicy { max_levels: 128, max_length: 65_535 };

    /// Each case mosquitto 2.0.11 closes the connection over (probed with raw publishes over
    /// TCP, MQTT 3.1.1 and 5), and the nearest ones it accepts.
    #[test]
    fn refuses_what_mosquitto_refuses() {
        let mosquitto = TopicPolicy { max_levels: 201, max_length: 65_535 };
        let levels = |n: usize| vec!["a"; n].join("/");
        for (topic, expected) in [
            ("a\u{1}b".to_owned(), Some(TopicError::Control)),
            ("a\tb".to_owned(), Some(TopicError::Control)),
            ("a\u{7f}b".to_owned(), Some(TopicError::Control)),
            ("a\u{85}b".to_owned(), Some(TopicError::Control)),
            ("a\u{9f}b".to_owned(), Some(TopicError::Control)),
            ("a\u{a0}b".to_owned(), None),
            ("a\u{fdd0}b".to_owned(), Some(TopicError::NonCharacter)),
            ("a\u{fdef}b".to_owned(), Some(TopicError::NonCharacter)),
            ("a\u{fdf0}b".to_owned(), None),
            ("a\u{fffd}b".to_owned(), None),
            ("a\u{ffff}b".to_owned(), Some(TopicError::NonCharacter)),
            ("a\u{1fffe}b".to_owned(), Some(TopicError::NonCharacter)),
            ("a\u{10ffff}b".to_owned(), Some(TopicError::NonCharacter)),
            ("température/温度".to_owned(), None),
            (levels(201), None),
            (levels(202), Some(TopicError::TooManyLevels)),
            ("/".repeat(200), None),
            ("/".repeat(201), Some(TopicError::TooManyLevels)),
            ("a".repeat(65_535), None),
        ] {
            assert_eq!(invalid_topic(&topic, &mosquitto), expected, "{}", escape_topic(&topic));
        }
    }

    #[test]
    fn mqtt_rules_and_configured_limits() {
        assert_eq!(invalid_topic("", &DEFAULT), Some(TopicError::Empty));
        assert_eq!(invalid_topic("a/+/b", &DEFAULT), Some(TopicError::Wildcard));
        assert_eq!(invalid_topic("a/#", &DEFAULT), Some(TopicError::Wildcard));
        assert_eq!(invalid_topic("a\0\u{1}", &DEFAULT), Some(TopicError::Nul), "U+0000 wins");
        assert_eq!(invalid_topic(&"a".repeat(65_536), &TopicPolicy::MQTT), Some(TopicError::TooLong));
        let tight = TopicPolicy { max_levels: 3, max_length: 8 };
        assert_eq!(invalid_topic("a/b/c", &tight), None);
        assert_eq!(invalid_topic("a/b/c/d", &tight), Some(TopicError::TooManyLevels));
        assert_eq!(invalid_topic("abcdefghi", &tight), Some(TopicError::TooLong));
        assert!(TopicError::Wildcard.is_protocol_violation());
        assert!(!TopicError::Control.is_protocol_violation());
    }

    #[test]
    fn log_form_is_escaped_and_short() {
        assert_eq!(escape_topic("a\u{1}b\tc"), "a\\u{1}b\\tc");
        let long = escape_topic(&"x".repeat(1000));
        assert!(long.ends_with("… (1000 bytes)") && long.len() < 300, "{long}");
    }
}
