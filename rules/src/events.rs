//! EMQX's event topics as rule sources: `FROM "$events/client_connected"` and the others a
//! gateway's broker can report ([`EventKind`]), the fields each event gives a rule
//! ([`EventField`]) and the event itself ([`Lifecycle`]).
//!
//! **Invariants:** an event topic is never a topic filter. A rule's event sources are kept
//! apart from its filters ([`EventKinds`]) and never enter the [`crate::index::TopicIndex`],
//! so a rule on `$events/...` never sees a published message (not even one a client published
//! to a topic spelled `$events/...`), and a message rule never sees an event (`#` does not
//! match `$`-topics either). An event field is a name only in a rule with a source that gives
//! it; anywhere else it stays an unknown name, as before.
//!
//! Names and meanings are EMQX's (`apps/emqx_rule_engine/src/emqx_rule_events.erl`:
//! `event_name/1`, `eventmsg_connected/2`, `eventmsg_disconnected/3`, `eventmsg_connack/2`,
//! `eventmsg_sub_or_unsub/4`, `eventmsg_dropped/2`).

use crate::value::Value;

/// The event topics a rule can read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    ClientConnected,
    ClientDisconnected,
    ClientConnack,
    SessionSubscribed,
    SessionUnsubscribed,
    MessageDropped,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::ClientConnected,
        EventKind::ClientDisconnected,
        EventKind::ClientConnack,
        EventKind::SessionSubscribed,
        EventKind::SessionUnsubscribed,
        EventKind::MessageDropped,
    ];

    /// The topic EMQX 4 named it by (EMQX 5 still reads it), which is also the topic an
    /// event carries here.
    pub fn topic(self) -> &'static str {
        match self {
            EventKind::ClientConnected => "$events/client_connected",
            EventKind::ClientDisconnected => "$events/client_disconnected",
            EventKind::ClientConnack => "$events/client_connack",
            EventKind::SessionSubscribed => "$events/session_subscribed",
            EventKind::SessionUnsubscribed => "$events/session_unsubscribed",
            EventKind::MessageDropped => "$events/message_dropped",
        }
    }

    /// EMQX 5's namespaced topic for the same event.
    fn namespaced_topic(self) -> &'static str {
        match self {
            EventKind::ClientConnected => "$events/client/connected",
            EventKind::ClientDisconnected => "$events/client/disconnected",
            EventKind::ClientConnack => "$events/client/connack",
            EventKind::SessionSubscribed => "$events/session/subscribed",
            EventKind::SessionUnsubscribed => "$events/session/unsubscribed",
            EventKind::MessageDropped => "$events/message/dropped",
        }
    }

    /// The `event` field: EMQX's hook name.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::ClientConnected => "client.connected",
            EventKind::ClientDisconnected => "client.disconnected",
            EventKind::ClientConnack => "client.connack",
            EventKind::SessionSubscribed => "session.subscribed",
            EventKind::SessionUnsubscribed => "session.unsubscribed",
            EventKind::MessageDropped => "message.dropped",
        }
    }

    /// The kind an event topic names, in either spelling.
    pub fn from_topic(topic: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.topic() == topic || k.namespaced_topic() == topic)
    }

    /// Whether the event is about a client rather than a message or a subscription: then it
    /// has no `topic`, `qos` or `payload` (EMQX gives none).
    fn is_client_event(self) -> bool {
        matches!(self, EventKind::ClientConnected | EventKind::ClientDisconnected | EventKind::ClientConnack)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of [`EventKind`]s: the sources of a rule, or of a whole rule set (what the gateway's
/// broker must report at all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventKinds(u8);

impl EventKinds {
    pub const NONE: EventKinds = EventKinds(0);

    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn insert(&mut self, kind: EventKind) {
        self.0 |= kind.bit();
    }

    pub fn union(self, other: EventKinds) -> EventKinds {
        EventKinds(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The set as one byte, for an atomic shared with the code that reports events.
    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn from_bits(bits: u8) -> EventKinds {
        EventKinds(bits)
    }
}

/// What a client event carries beyond [`crate::EventContext`]'s fields (client id, user
/// name, peer host, receive time; a subscription's filter and QoS, a dropped message's topic,
/// payload, QoS, flags and properties go there too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    pub kind: EventKind,
    /// `client_disconnected`: why (EMQX's `normal`, `tcp_closed`, `keepalive_timeout`,
    /// `takenover`, ...); `message_dropped`: why (`not_authorized`, ...); `client_connack`:
    /// the reason code's name (`success`, `not_authorized`, ...).
    pub reason: Option<String>,
    /// The client's address and port, `192.0.2.7:51234` (EMQX's `peername`).
    pub peername: Option<String>,
    /// The listener's address and port (EMQX's `sockname`).
    pub sockname: Option<String>,
    /// `MQTT` (3.1.1 and 5) or `MQIsdp` (3.1).
    pub proto_name: Option<String>,
    /// 3, 4 or 5.
    pub proto_ver: Option<u8>,
    /// Seconds, as the client asked.
    pub keepalive: Option<u16>,
    pub clean_start: Option<bool>,
    /// MQTT 5's session expiry in seconds (0 for 3.1.1).
    pub expiry_interval: Option<u32>,
    /// MQTT 5's receive maximum the client announced.
    pub receive_maximum: Option<u16>,
    /// Unix milliseconds.
    pub connected_at: Option<u64>,
    pub disconnected_at: Option<u64>,
}

impl Lifecycle {
    /// An event of `kind` with nothing but its kind known.
    pub fn new(kind: EventKind) -> Lifecycle {
        Lifecycle {
            kind,
            reason: None,
            peername: None,
            sockname: None,
            proto_name: None,
            proto_ver: None,
            keepalive: None,
            clean_start: None,
            expiry_interval: None,
            receive_maximum: None,
            connected_at: None,
            disconnected_at: None,
        }
    }
}

/// A field only events have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventField {
    Event,
    Reason,
    ReasonCode,
    PeerName,
    SockName,
    ProtoName,
    ProtoVer,
    Keepalive,
    CleanStart,
    ExpiryInterval,
    ReceiveMaximum,
    ConnectedAt,
    DisconnectedAt,
}

/// The event fields by name, with the events that give each (EMQX's columns).
const FIELDS: &[(&str, EventField, &[EventKind])] = {
    use EventKind::*;
    const CLIENT: &[EventKind] = &[ClientConnected, ClientDisconnected, ClientConnack];
    const ALL: &[EventKind] = &EventKind::ALL;
    &[
        ("event", EventField::Event, ALL),
        ("reason", EventField::Reason, &[ClientDisconnected, MessageDropped]),
        ("reason_code", EventField::ReasonCode, &[ClientConnack]),
        ("peername", EventField::PeerName, ALL),
        ("sockname", EventField::SockName, CLIENT),
        ("proto_name", EventField::ProtoName, CLIENT),
        ("proto_ver", EventField::ProtoVer, CLIENT),
        ("keepalive", EventField::Keepalive, &[ClientConnected, ClientConnack]),
        ("clean_start", EventField::CleanStart, &[ClientConnected, ClientConnack]),
        ("expiry_interval", EventField::ExpiryInterval, &[ClientConnected, ClientConnack]),
        ("receive_maximum", EventField::ReceiveMaximum, &[ClientConnected]),
        ("connected_at", EventField::ConnectedAt, CLIENT),
        ("disconnected_at", EventField::DisconnectedAt, &[ClientDisconnected]),
    ]
};

/// The event field `name` names in a rule reading from `sources`, if one of them gives it.
pub(crate) fn field(name: &str, sources: EventKinds) -> Option<EventField> {
    FIELDS
        .iter()
        .find(|(n, _, kinds)| n.eq_ignore_ascii_case(name) && kinds.iter().any(|k| sources.contains(*k)))
        .map(|(_, field, _)| *field)
}

/// The event field names a rule reading from `sources` may use, for did-you-mean.
pub(crate) fn field_names(sources: EventKinds) -> impl Iterator<Item = &'static str> {
    FIELDS.iter().filter(move |(_, _, kinds)| kinds.iter().any(|k| sources.contains(*k))).map(|(n, _, _)| *n)
}

/// Every event topic, for did-you-mean on a misspelt one.
pub(crate) fn topics() -> impl Iterator<Item = &'static str> {
    EventKind::ALL.into_iter().flat_map(|k| [k.topic(), k.namespaced_topic()])
}

/// An event field's value; NULL for a message event and for what the event does not carry.
pub(crate) fn field_value(field: EventField, event: Option<&Lifecycle>) -> Value {
    let Some(event) = event else { return Value::Null };
    let text = |s: &Option<String>| s.as_ref().map_or(Value::Null, |s| Value::Str(s.clone()));
    let int = |n: Option<i64>| n.map_or(Value::Null, Value::Int);
    match field {
        EventField::Event => Value::Str(event.kind.name().to_owned()),
        EventField::Reason if event.kind != EventKind::ClientConnack => text(&event.reason),
        EventField::ReasonCode if event.kind == EventKind::ClientConnack => text(&event.reason),
        EventField::Reason | EventField::ReasonCode => Value::Null,
        EventField::PeerName => text(&event.peername),
        EventField::SockName => text(&event.sockname),
        EventField::ProtoName => text(&event.proto_name),
        EventField::ProtoVer => int(event.proto_ver.map(i64::from)),
        EventField::Keepalive => int(event.keepalive.map(i64::from)),
        EventField::CleanStart => event.clean_start.map_or(Value::Null, Value::Bool),
        EventField::ExpiryInterval => int(event.expiry_interval.map(i64::from)),
        EventField::ReceiveMaximum => int(event.receive_maximum.map(i64::from)),
        EventField::ConnectedAt => event.connected_at.map_or(Value::Null, Value::from_meta_u64),
        EventField::DisconnectedAt => event.disconnected_at.map_or(Value::Null, Value::from_meta_u64),
    }
}

/// Whether `topic`, `qos` and `payload` mean nothing for this event (a client event).
pub(crate) fn lacks_message(event: Option<&Lifecycle>) -> bool {
    event.is_some_and(|e| e.kind.is_client_event())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_name_one_kind() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_topic(kind.topic()), Some(kind));
            assert_eq!(EventKind::from_topic(kind.namespaced_topic()), Some(kind));
        }
        assert_eq!(EventKind::from_topic("$events/message_publish"), None);
        assert_eq!(EventKind::from_topic("$events/#"), None);
    }

    #[test]
    fn fields_belong_to_their_events() {
        let mut disconnected = EventKinds::NONE;
        disconnected.insert(EventKind::ClientDisconnected);
        assert_eq!(field("reason", disconnected), Some(EventField::Reason));
        assert_eq!(field("keepalive", disconnected), None);
        assert_eq!(field("reason", EventKinds::NONE), None);
        let mut connack = EventKinds::NONE;
        connack.insert(EventKind::ClientConnack);
        let mut event = Lifecycle::new(EventKind::ClientConnack);
        event.reason = Some("success".to_owned());
        assert_eq!(field_value(EventField::ReasonCode, Some(&event)), Value::Str("success".into()));
        assert_eq!(field_value(EventField::Reason, Some(&event)), Value::Null);
        assert_eq!(field_value(EventField::Event, None), Value::Null);
    }
}

#[cfg(test)]
mod rule_tests {
    use super::*;
    use crate::{EventContext, Output, RuleSet, TableSources};

    fn compile(sql: &str, topic: &str) -> Result<RuleSet, String> {
        let rules = format!(
            "[[rule]]\nname = \"ev\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"{topic}\"\n"
        );
        RuleSet::compile(&rules, &TableSources::new()).map_err(|e| e.to_string())
    }

    fn connected() -> Lifecycle {
        let mut event = Lifecycle::new(EventKind::ClientConnected);
        event.peername = Some("192.0.2.7:51234".to_owned());
        event.sockname = Some("127.0.0.1:1883".to_owned());
        event.proto_name = Some("MQTT".to_owned());
        event.proto_ver = Some(5);
        event.keepalive = Some(30);
        event.clean_start = Some(true);
        event.expiry_interval = Some(0);
        event.receive_maximum = Some(10);
        event.connected_at = Some(1_708_671_600_000);
        event
    }

    fn context<'a>(topic: &'a str, lifecycle: Option<&'a Lifecycle>) -> EventContext<'a> {
        EventContext {
            clientid: Some("s-1"),
            username: Some("u"),
            peerhost: Some("192.0.2.7"),
            timestamp_ms: 1_708_671_600_001,
            qos: 1,
            lifecycle,
            ..EventContext::new(topic, b"")
        }
    }

    /// The forwarded rows, as JSON text.
    fn rows(set: &RuleSet, event: &EventContext<'_>) -> Vec<String> {
        set.evaluate(event)
            .into_iter()
            .map(|o| match o {
                Output::Forward { topic, payload, .. } => {
                    format!("{topic} {}", String::from_utf8_lossy(&payload))
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_connected_rule_reads_emqx_fields() {
        let set = compile(
            "SELECT event, clientid, username, peerhost, peername, sockname, proto_name, proto_ver, keepalive, clean_start, expiry_interval, receive_maximum, connected_at, topic, metadata.rule_id AS rule FROM \"$events/client_connected\"",
            "gw/${clientid}",
        )
        .unwrap();
        let lifecycle = connected();
        let event = context(EventKind::ClientConnected.topic(), Some(&lifecycle));
        assert_eq!(
            rows(&set, &event),
            [
                r#"gw/s-1 {"event":"client.connected","clientid":"s-1","username":"u","peerhost":"192.0.2.7","peername":"192.0.2.7:51234","sockname":"127.0.0.1:1883","proto_name":"MQTT","proto_ver":5,"keepalive":30,"clean_start":true,"expiry_interval":0,"receive_maximum":10,"connected_at":1708671600000,"topic":null,"rule":"ev"}"#
            ]
        );
        assert!(set.event_kinds().contains(EventKind::ClientConnected));
        assert!(!set.event_kinds().contains(EventKind::ClientDisconnected));
    }

    #[test]
    fn events_and_messages_never_meet() {
        let set = RuleSet::compile(
            r##"
[[rule]]
name = "events"
sql = 'SELECT clientid FROM "$events/client/connected"'
[[rule.action]]
type = "forward"
topic = "e"
[[rule]]
name = "everything"
sql = 'SELECT clientid FROM "#"'
[[rule.action]]
type = "forward"
topic = "m"
[[rule]]
name = "dollar"
sql = 'SELECT clientid FROM "$events/+"'
[[rule.action]]
type = "forward"
topic = "d"
"##,
            &TableSources::new(),
        );
        // `$events/+` is an event topic nobody reports, not a filter.
        let message = set.unwrap_err().to_string();
        assert!(message.contains("`$events/+` is no event topic"), "{message}");
        let set = compile_two();
        let lifecycle = connected();
        // The event goes to the event rule only: `#` does not match it.
        assert_eq!(
            rows(&set, &context(EventKind::ClientConnected.topic(), Some(&lifecycle))),
            ["e {\"clientid\":\"s-1\"}"]
        );
        // A message published to the event's topic is a message: the event rule never sees it.
        assert_eq!(rows(&set, &context(EventKind::ClientConnected.topic(), None)), Vec::<String>::new());
        assert_eq!(rows(&set, &context("sensors/a", None)), ["m {\"clientid\":\"s-1\"}"]);
    }

    fn compile_two() -> RuleSet {
        RuleSet::compile(
            r##"
[[rule]]
name = "events"
sql = 'SELECT clientid FROM "$events/client/connected"'
[[rule.action]]
type = "forward"
topic = "e"
[[rule]]
name = "everything"
sql = 'SELECT clientid FROM "#"'
[[rule.action]]
type = "forward"
topic = "m"
"##,
            &TableSources::new(),
        )
        .unwrap()
    }

    #[test]
    fn subscribed_and_dropped_carry_their_message_fields() {
        let set = compile(
            "SELECT event, topic AS tp, qos, clientid FROM \"$events/session_subscribed\", \"$events/message_dropped\" WHERE event = 'session.subscribed' OR reason = 'not_authorized'",
            "x",
        )
        .unwrap();
        let subscribed = Lifecycle::new(EventKind::SessionSubscribed);
        let event = context("alerts/#", Some(&subscribed));
        assert_eq!(
            rows(&set, &event),
            [r#"x {"event":"session.subscribed","tp":"alerts/#","qos":1,"clientid":"s-1"}"#]
        );
        let mut dropped = Lifecycle::new(EventKind::MessageDropped);
        dropped.reason = Some("not_authorized".to_owned());
        let event = context("secret/t", Some(&dropped));
        assert_eq!(
            rows(&set, &event),
            [r#"x {"event":"message.dropped","tp":"secret/t","qos":1,"clientid":"s-1"}"#]
        );
        // Events of a kind the rule does not read do not reach it.
        let unsubscribed = Lifecycle::new(EventKind::SessionUnsubscribed);
        assert_eq!(rows(&set, &context("alerts/#", Some(&unsubscribed))), Vec::<String>::new());
    }

    #[test]
    fn event_fields_are_names_only_where_an_event_gives_them() {
        // Outside a source that gives it, an event field is an unknown name: NULL, as EMQX
        // reads it as `undefined`, with a warning.
        for (sql, field) in [
            ("SELECT reason FROM \"t/#\"", "reason"),
            ("SELECT keepalive FROM \"$events/client_disconnected\"", "keepalive"),
        ] {
            let set = compile(sql, "x").unwrap();
            let warnings: Vec<String> = set.warnings().map(|w| w.to_string()).collect();
            assert!(
                warnings.iter().any(|w| w.contains(&format!("unknown field `{field}`"))),
                "{sql}: {warnings:?}"
            );
        }
        let set = compile("SELECT reason FROM \"t/#\"", "x").unwrap();
        assert_eq!(rows(&set, &context("t/a", None)), [r#"x {"reason":null}"#]);
        let error = compile("SELECT clientid FROM \"$events/client_conected\"", "x").unwrap_err();
        assert!(error.contains("did you mean `$events/client_connected`"), "{error}");
        // A forward needs a topic of its own.
        let rules = "[[rule]]\nname = \"ev\"\nsql = 'SELECT clientid FROM \"$events/client_connected\"'\n[[rule.action]]\ntype = \"forward\"\n";
        let error = RuleSet::compile(rules, &TableSources::new()).unwrap_err().to_string();
        assert!(error.contains("needs a `topic` on its forward action"), "{error}");
        // A message rule reads `metadata` too.
        let set = compile("SELECT metadata FROM \"t/#\"", "x").unwrap();
        assert_eq!(rows(&set, &context("t/a", None)), [r#"x {"metadata":{"rule_id":"ev"}}"#]);
        assert!(set.event_kinds().is_empty());
    }

    #[test]
    fn a_disconnect_reason_filters() {
        let set = compile(
            "SELECT clientid, reason, disconnected_at - connected_at AS lasted FROM \"$events/client_disconnected\" WHERE reason <> 'normal'",
            "gone/${clientid}",
        )
        .unwrap();
        let mut gone = Lifecycle::new(EventKind::ClientDisconnected);
        gone.reason = Some("keepalive_timeout".to_owned());
        gone.connected_at = Some(1_000);
        gone.disconnected_at = Some(46_000);
        let event = context(EventKind::ClientDisconnected.topic(), Some(&gone));
        assert_eq!(
            rows(&set, &event),
            [r#"gone/s-1 {"clientid":"s-1","reason":"keepalive_timeout","lasted":45000}"#]
        );
        gone.reason = Some("normal".to_owned());
        let event = context(EventKind::ClientDisconnected.topic(), Some(&gone));
        assert_eq!(rows(&set, &event), Vec::<String>::new());
    }
}
