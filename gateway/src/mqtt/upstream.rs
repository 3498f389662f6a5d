//! The upstream direction of the MQTT wire: what Outpost writes to the upstream broker and
//! reads back, as pure functions over byte buffers (no sockets, no tokio, no policy).
//!
//! The hot path (PUBLISH out, PUBACK in) is encoded here without allocating; rumqttc's
//! `mqttbytes` encodes the CONNECT and decodes the CONNACK, which happen once per connection.
//!
//! # Invariants
//! - Nothing is written to `out` for a publish that does not fit the upstream's limits.
//! - A parser never consumes an incomplete packet: `Ok(None)` leaves the buffer as it was.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5 as mqtt5;

use super::wire::{FixedHeader, MAX_VARINT, describe_reason, fixed_header, put_varint, varint_len};
use crate::config::{MqttVersion, UpstreamConfig};
use crate::event::{MessageProps, format_event_id};

/// The MQTT 5 user property that carries the stable event id.
pub const EVENT_ID_PROPERTY: &str = "outpost-event-id";

/// The largest packet the upstream may send us. Only acks and DISCONNECTs are expected.
const MAX_INCOMING: usize = 64 * 1024;

/// What the relay needs to know about one established connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParams {
    pub version: MqttVersion,
    /// Publishes that may await their PUBACK: `upstream.inflight`, or less if an MQTT 5
    /// upstream's receive maximum says so.
    pub receive_max: u16,
    /// The largest packet the upstream accepts (its MQTT 5 maximum packet size).
    pub max_packet: usize,
    /// PINGREQ interval: `upstream.keepalive`, or the upstream's server keep alive. Zero: none.
    pub keepalive: Duration,
}

/// A packet from the upstream, as the relay needs it.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The upstream answered this packet id. `rejected` holds the MQTT 5 reason when the
    /// upstream refused the message (an MQTT 3.1.1 PUBACK always means accepted).
    PubAck {
        pkid: u16,
        rejected: Option<String>,
    },
    PingResp,
    /// The upstream ended the connection with a DISCONNECT (with its reason, if MQTT 5).
    Disconnect(String),
}

/// A publish the upstream's maximum packet size does not allow.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub size: usize,
    pub max: usize,
}

/// What one upstream PUBLISH carries besides its QoS and packet id.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub event_id: u64,
    /// The message's MQTT 5 properties: sent to an MQTT 5 upstream, dropped for 3.1.1, which
    /// has no way to carry them.
    pub props: Option<&'a MessageProps>,
    /// Unix ms at sending: what remains of the message expiry is counted from it.
    pub now_ms: u64,
}

impl<'a> Message<'a> {
    /// A message without properties.
    pub fn new(topic: &'a str, payload: &'a [u8], event_id: u64) -> Message<'a> {
        Message { topic, payload, event_id, props: None, now_ms: 0 }
    }
}

/// Appends one PUBLISH to `out`. `pkid` is ignored for QoS 0. With MQTT 5 the message's
/// properties go first, in their order, then the event id as the `outpost-event-id` user
/// property; the message expiry is what remains of it at `message.now_ms`. Nothing is
/// written when it is too large.
pub fn encode_publish(
    out: &mut BytesMut,
    params: &LinkParams,
    qos: u8,
    pkid: u16,
    message: &Message<'_>,
) -> Result<(), TooLarge> {
    let Message { topic, payload, event_id, .. } = *message;
    let v5 = params.version == MqttVersion::V5;
    let id = v5.then(|| format_event_id(event_id));
    let props = message.props.filter(|_| v5);
    let expiry = props.and_then(|p| p.remaining_expiry_secs(message.now_ms));
    let string = |s: &str| 2 + s.len();
    let mut properties = id.as_ref().map_or(0, |id| 1 + string(EVENT_ID_PROPERTY) + string(id));
    // Every string or binary property has a two-byte length: one longer cannot be sent.
    let mut too_long = false;
    if let Some(p) = props {
        let mut field = |len: usize| {
            too_long |= len > usize::from(u16::MAX);
            2 + len
        };
        properties += p.payload_format_indicator.map_or(0, |_| 2)
            + expiry.map_or(0, |_| 5)
            + p.content_type.as_ref().map_or(0, |t| 1 + field(t.len()))
            + p.response_topic.as_ref().map_or(0, |t| 1 + field(t.len()))
            + p.correlation_data.as_ref().map_or(0, |d| 1 + field(d.len()))
            + p.user_properties.iter().map(|(k, v)| 1 + field(k.len()) + field(v.len())).sum::<usize>();
    }
    let mut remaining = 2 + topic.len() + payload.len();
    if qos > 0 {
        remaining += 2;
    }
    if v5 {
        remaining += varint_len(properties) + properties;
    }
    let size = 1 + varint_len(remaining) + remaining;
    let max = params.max_packet.min(MAX_VARINT + 5);
    // A topic over 65,535 bytes cannot be encoded at all (its prefix made it too long).
    if remaining > MAX_VARINT || size > max || topic.len() > usize::from(u16::MAX) || too_long {
        return Err(TooLarge { size, max });
    }
    out.reserve(size);
    out.put_u8(0x30 | (qos.min(1) << 1));
    put_varint(out, remaining);
    put_str(out, topic);
    if qos > 0 {
        out.put_u16(pkid);
    }
    if let Some(id) = &id {
        put_varint(out, properties);
        if let Some(p) = props {
            if let Some(indicator) = p.payload_format_indicator {
                out.put_slice(&[0x01, indicator]);
            }
            if let Some(secs) = expiry {
                out.put_u8(0x02);
                out.put_u32(secs);
            }
            if let Some(t) = &p.content_type {
                out.put_u8(0x03);
                put_str(out, t);
            }
            if let Some(t) = &p.response_topic {
                out.put_u8(0x08);
                put_str(out, t);
            }
            if let Some(d) = &p.correlation_data {
                out.put_u8(0x09);
                out.put_u16(d.len() as u16);
                out.put_slice(d);
            }
            for (name, value) in &p.user_properties {
                out.put_u8(0x26);
                put_str(out, name);
                put_str(out, value);
            }
        }
        out.put_u8(0x26);
        put_str(out, EVENT_ID_PROPERTY);
        put_str(out, id);
    }
    out.put_slice(payload);
    Ok(())
}

/// A string with its two-byte length; the caller checked that it fits.
fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// Appends a PINGREQ.
pub fn encode_pingreq(out: &mut BytesMut) {
    out.put_slice(&[0xC0, 0x00]);
}

/// Takes the next complete packet off `buf`. `Ok(None)`: wait for more bytes. An error means
/// the connection cannot go on (a malformed or unexpected packet); so does a DISCONNECT, which
/// is returned as a packet because the relay needs to know that the upstream chose to end it.
pub fn parse_incoming(buf: &mut BytesMut, version: MqttVersion) -> Result<Option<Incoming>, String> {
    let Some(FixedHeader { byte1, header_len: header, remaining }) =
        fixed_header(buf).map_err(|_| "malformed remaining length from the upstream".to_owned())?
    else {
        return Ok(None);
    };
    if remaining > MAX_INCOMING {
        return Err(format!(
            "the upstream sent a {remaining}-byte packet; only acknowledgements are expected"
        ));
    }
    if buf.len() < header + remaining {
        return Ok(None);
    }
    let frame = buf.split_to(header + remaining);
    let body = &frame[header..];
    match byte1 {
        0x40 if remaining >= 2 => {
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            // 0x00 success, 0x10 no matching subscribers: accepted. Anything ≥ 0x80 refuses.
            let rejected = match body.get(2) {
                Some(&code) if code >= 0x80 && version == MqttVersion::V5 => Some(describe_reason(code)),
                _ => None,
            };
            Ok(Some(Incoming::PubAck { pkid, rejected }))
        }
        0xD0 if remaining == 0 => Ok(Some(Incoming::PingResp)),
        0xE0 => Ok(Some(Incoming::Disconnect(match body.first() {
            Some(&code) if version == MqttVersion::V5 => {
                format!("the upstream disconnected us: {}", describe_reason(code))
            }
            _ => "the upstream disconnected us".to_owned(),
        }))),
        _ => Err(format!("unexpected packet type {} from the upstream", byte1 >> 4)),
    }
}

/// A packet on the inbound connection, as the inbound task needs it.
#[derive(Debug, PartialEq, Eq)]
pub enum FromUpstream {
    /// A message for one of our subscriptions. `topic` is the wire bytes (not checked for
    /// UTF-8 here: a bad topic is the mapping's to refuse, and a QoS 1 one must still be
    /// acknowledged, or a persistent session would redeliver it forever).
    Publish {
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        retain: bool,
    },
    /// The answer to our SUBSCRIBE: one return code per filter (≥ 0x80 refused).
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    /// The upstream ended the connection (with its reason, if MQTT 5).
    Disconnect(String),
}

/// Takes the next complete packet of the inbound connection off `buf`; `Ok(None)`: wait for
/// more bytes. Packets over `max` bytes, malformed ones and those a subscriber never gets
/// (QoS 2, a PUBACK) end the connection.
pub fn parse_from_upstream(
    buf: &mut BytesMut,
    version: MqttVersion,
    max: usize,
) -> Result<Option<FromUpstream>, String> {
    let Some(FixedHeader { byte1, header_len: header, remaining }) =
        fixed_header(buf).map_err(|_| "malformed remaining length from the upstream".to_owned())?
    else {
        return Ok(None);
    };
    if header + remaining > max {
        return Err(format!(
            "the upstream sent a {}-byte packet, over the {max} bytes the inbound connection takes (broker.max_payload plus the topic); raise broker.max_payload or keep commands smaller",
            header + remaining
        ));
    }
    if buf.len() < header + remaining {
        return Ok(None);
    }
    let frame = buf.split_to(header + remaining).freeze();
    let body = frame.slice(header..);
    let truncated = || format!("a truncated packet (type {}) from the upstream", byte1 >> 4);
    match byte1 >> 4 {
        3 => {
            let qos = (byte1 >> 1) & 0x03;
            if qos > 1 {
                return Err(format!(
                    "a QoS {qos} PUBLISH from the upstream, which was granted at most QoS 1"
                ));
            }
            let topic_len = usize::from(u16::from_be_bytes([
                *body.first().ok_or_else(truncated)?,
                *body.get(1).ok_or_else(truncated)?,
            ]));
            let mut at = 2 + topic_len;
            let topic = body.get(2..at).map(|_| body.slice(2..at)).ok_or_else(truncated)?;
            let mut pkid = 0;
            if qos > 0 {
                let id = body.get(at..at + 2).ok_or_else(truncated)?;
                pkid = u16::from_be_bytes([id[0], id[1]]);
                at += 2;
            }
            if version == MqttVersion::V5 {
                let (len, used) = super::wire::read_varint(body.get(at..).unwrap_or_default())
                    .map_err(|_| truncated())?
                    .ok_or_else(truncated)?;
                at += used + len;
                if at > body.len() {
                    return Err(truncated());
                }
            }
            let payload = body.slice(at..);
            Ok(Some(FromUpstream::Publish { topic, payload, qos, pkid, retain: byte1 & 0x01 == 1 }))
        }
        9 if remaining >= 3 => {
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            let mut at = 2;
            if version == MqttVersion::V5 {
                let (len, used) =
                    super::wire::read_varint(&body[at..]).map_err(|_| truncated())?.ok_or_else(truncated)?;
                at += used + len;
            }
            let codes = body.get(at..).ok_or_else(truncated)?.to_vec();
            Ok(Some(FromUpstream::SubAck { pkid, codes }))
        }
        13 if remaining == 0 => Ok(Some(FromUpstream::PingResp)),
        14 => Ok(Some(FromUpstream::Disconnect(match body.first() {
            Some(&code) if version == MqttVersion::V5 => {
                format!("the upstream disconnected us: {}", describe_reason(code))
            }
            _ => "the upstream disconnected us".to_owned(),
        }))),
        kind => Err(format!("unexpected packet type {kind} on the inbound connection")),
    }
}

/// Appends a SUBSCRIBE for `filters` (filter, QoS). MQTT 5 asks for retain as published and
/// retained messages only for a subscription that is new, so a reconnect does not replay them.
pub fn encode_subscribe(out: &mut BytesMut, version: MqttVersion, pkid: u16, filters: &[(&str, u8)]) {
    let v5 = version == MqttVersion::V5;
    let mut remaining = 2 + usize::from(v5);
    for (filter, _) in filters {
        remaining += 2 + filter.len() + 1;
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(0x82);
    put_varint(out, remaining);
    out.put_u16(pkid);
    if v5 {
        out.put_u8(0);
    }
    for (filter, qos) in filters {
        out.put_u16(filter.len() as u16);
        out.put_slice(filter.as_bytes());
        // MQTT 5: retain as published (0x08), retained messages only if new (0x10).
        out.put_u8(if v5 { qos | 0x08 | 0x10 } else { *qos });
    }
}

/// Appends a PUBACK (success, for both protocol versions).
pub fn encode_puback(out: &mut BytesMut, pkid: u16) {
    out.put_u8(0x40);
    out.put_u8(0x02);
    out.put_u16(pkid);
}

/// Appends a DISCONNECT (reason: normal disconnection, for both protocol versions).
pub fn encode_disconnect(out: &mut BytesMut) {
    out.put_slice(&[0xE0, 0x00]);
}

/// The CONNECT for one attempt: a clean session, credentials if configured.
pub fn encode_connect(cfg: &UpstreamConfig, out: &mut BytesMut) -> Result<(), String> {
    encode_connect_as(cfg, &cfg.client_id, None, MAX_INCOMING, out)
}

/// The CONNECT of the inbound connection: `client_id`, a persistent session (3.1.1: clean
/// session 0; MQTT 5: clean start 0 and `session_expiry`), and `max_incoming` as the largest
/// packet we take (MQTT 5 announces it).
pub fn encode_inbound_connect(
    cfg: &UpstreamConfig,
    client_id: &str,
    session_expiry: Duration,
    max_incoming: usize,
    out: &mut BytesMut,
) -> Result<(), String> {
    encode_connect_as(cfg, client_id, Some(session_expiry), max_incoming, out)
}

/// A CONNECT: a clean session when `persistent` is `None`, else a persistent one that an MQTT
/// 5 upstream keeps for that long.
fn encode_connect_as(
    cfg: &UpstreamConfig,
    client_id: &str,
    persistent: Option<Duration>,
    max_incoming: usize,
    out: &mut BytesMut,
) -> Result<(), String> {
    let keep_alive = u16::try_from(cfg.keepalive.as_secs()).unwrap_or(u16::MAX);
    match cfg.mqtt_version {
        MqttVersion::V311 => {
            use rumqttc::mqttbytes::v4;
            let mut connect = v4::Connect::new(client_id.to_owned());
            connect.keep_alive = keep_alive;
            connect.clean_session = persistent.is_none();
            if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
                connect.set_login(user.clone(), pass.clone());
            }
            v4::Packet::Connect(connect)
                .write(out, MAX_VARINT)
                .map(drop)
                .map_err(|e| format!("cannot encode CONNECT: {e:?}"))
        }
        MqttVersion::V5 => {
            // Announcing our maximum lets a compliant upstream shorten what it sends us (reason
            // strings) instead of tripping the limit `parse_incoming` enforces.
            let properties = mqtt5::ConnectProperties {
                max_packet_size: Some(u32::try_from(max_incoming).unwrap_or(u32::MAX)),
                session_expiry_interval: persistent
                    .map(|expiry| u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX)),
                ..mqtt5::ConnectProperties::new()
            };
            let connect = mqtt5::Connect {
                keep_alive,
                client_id: client_id.to_owned(),
                clean_start: persistent.is_none(),
                properties: Some(properties),
            };
            let login = match (&cfg.username, &cfg.password) {
                (Some(user), Some(pass)) => Some(mqtt5::Login::new(user.clone(), pass.clone())),
                _ => None,
            };
            mqtt5::Packet::Connect(connect, None, login)
                .write(out, None)
                .map(drop)
                .map_err(|e| format!("cannot encode CONNECT: {e:?}"))
        }
    }
}

/// Reads the CONNACK off `buf`, if complete. `Err` is an operator-readable refusal.
pub fn parse_connack(buf: &mut BytesMut, cfg: &UpstreamConfig) -> Result<Option<LinkParams>, String> {
    Ok(parse_connack_session(buf, cfg)?.map(|(params, _)| params))
}

/// [`parse_connack`], with the CONNACK's session present flag.
pub fn parse_connack_session(
    buf: &mut BytesMut,
    cfg: &UpstreamConfig,
) -> Result<Option<(LinkParams, bool)>, String> {
    let refused = |code: &dyn std::fmt::Debug| {
        format!("the upstream refused the connection ({code:?}): check upstream.client_id and credentials")
    };
    let configured_max = cfg.max_packet_size.map_or(MAX_VARINT + 5, |b| b.as_u64() as usize);
    let mut params = LinkParams {
        version: cfg.mqtt_version,
        receive_max: cfg.inflight,
        max_packet: configured_max,
        keepalive: cfg.keepalive,
    };
    let malformed =
        |e: &dyn std::fmt::Debug| format!("the upstream did not answer with a valid CONNACK: {e:?}");
    // Only a complete frame is decoded: the decoders answer "need more bytes" also for a frame
    // that is complete but too short inside, which would then wait for the connect timeout.
    let header = fixed_header(buf).map_err(|e| malformed(&e))?;
    let Some(FixedHeader { header_len: header, remaining, .. }) = header else { return Ok(None) };
    if buf.len() < header + remaining {
        return Ok(None);
    }
    if cfg.mqtt_version == MqttVersion::V5 && remaining == 2 && buf[0] == 0x20 && buf[header + 1] != 0 {
        // A broker that speaks only MQTT 3.1.1 answers an MQTT 5 CONNECT with a 3.1.1 CONNACK,
        // return code 1: unacceptable protocol version.
        return Err(format!(
            "the upstream refused MQTT 5 (an MQTT 3.1.1 CONNACK, return code {}): it speaks only 3.1.1; set upstream.mqtt_version = \"3.1.1\"",
            buf[header + 1]
        ));
    }
    match cfg.mqtt_version {
        MqttVersion::V311 => {
            use rumqttc::mqttbytes::{Error, v4};
            match v4::Packet::read(buf, MAX_INCOMING) {
                Err(Error::InsufficientBytes(_)) => Ok(None),
                Ok(v4::Packet::ConnAck(ack)) if ack.code == v4::ConnectReturnCode::Success => {
                    Ok(Some((params, ack.session_present)))
                }
                Ok(v4::Packet::ConnAck(ack)) => Err(refused(&ack.code)),
                Ok(other) => Err(malformed(&other)),
                Err(e) => Err(malformed(&e)),
            }
        }
        MqttVersion::V5 => {
            use rumqttc::v5::mqttbytes::Error;
            match mqtt5::Packet::read(buf, Some(MAX_INCOMING as u32)) {
                Err(Error::InsufficientBytes(_)) => Ok(None),
                Ok(mqtt5::Packet::ConnAck(ack)) if ack.code == mqtt5::ConnectReturnCode::Success => {
                    if let Some(properties) = ack.properties {
                        apply_connack_limits(&properties, &mut params, configured_max)?;
                    }
                    Ok(Some((params, ack.session_present)))
                }
                Ok(mqtt5::Packet::ConnAck(ack)) => Err(refused(&ack.code)),
                Ok(other) => Err(malformed(&other)),
                Err(e) => Err(malformed(&e)),
            }
        }
    }
}

/// An MQTT 5 upstream's CONNACK limits, applied to `params`. `Err`: an operator-readable
/// refusal (it takes only QoS 0) or protocol error.
fn apply_connack_limits(
    p: &mqtt5::ConnAckProperties,
    params: &mut LinkParams,
    configured_max: usize,
) -> Result<(), String> {
    if p.max_qos == Some(0) {
        return Err(
            "the upstream accepts only QoS 0 (its CONNACK's Maximum QoS), and Outpost relays at QoS 1 \
                    so that nothing is lost: allow QoS 1 on the upstream broker (mosquitto: max_qos)"
                .to_owned(),
        );
    }
    if let Some(max) = p.receive_max {
        params.receive_max = params.receive_max.min(max.max(1));
    }
    if let Some(max) = p.max_packet_size {
        // 0 is a protocol error; taken at its word, every event would be "too large" and
        // discarded.
        if max == 0 {
            return Err(format!(
                "the upstream did not answer with a valid CONNACK: {:?}",
                "Maximum Packet Size 0"
            ));
        }
        params.max_packet = configured_max.min(max as usize);
    }
    if let Some(secs) = p.server_keep_alive {
        params.keepalive = Duration::from_secs(u64::from(secs));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(version: MqttVersion) -> LinkParams {
        LinkParams { version, receive_max: 100, max_packet: MAX_VARINT + 5, keepalive: Duration::ZERO }
    }

    /// Our encoder against rumqttc's decoder, both protocols, across the length boundaries.
    #[test]
    fn publishes_decode_with_rumqttc() {
        for len in [0usize, 1, 100, 127 - 9, 200, 16_383, 16_384, 70_000, 2_097_152] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for qos in [0u8, 1] {
                let mut out = BytesMut::new();
                encode_publish(
                    &mut out,
                    &params(MqttVersion::V311),
                    qos,
                    7,
                    &Message::new("a/b", &payload, 42),
                )
                .expect("fits");
                encode_publish(&mut out, &params(MqttVersion::V311), qos, 8, &Message::new("c", b"x", 43))
                    .expect("fits");
                use rumqttc::mqttbytes::v4;
                let Ok(v4::Packet::Publish(p)) = v4::Packet::read(&mut out, usize::MAX) else {
                    panic!("not a publish")
                };
                assert_eq!((p.topic.as_str(), p.qos as u8, &p.payload[..]), ("a/b", qos, &payload[..]));
                assert_eq!(p.pkid, if qos == 1 { 7 } else { 0 });
                let Ok(v4::Packet::Publish(p)) = v4::Packet::read(&mut out, usize::MAX) else {
                    panic!("second publish")
                };
                assert_eq!((p.topic.as_str(), &p.payload[..]), ("c", &b"x"[..]));
                assert!(out.is_empty());

                let mut out = BytesMut::new();
                encode_publish(
                    &mut out,
                    &params(MqttVersion::V5),
                    qos,
                    9,
                    &Message::new("a/b", &payload, 0xabc),
                )
                .expect("fits");
                let Ok(mqtt5::Packet::Publish(p)) = mqtt5::Packet::read(&mut out, None) else {
                    panic!("not a v5 publish")
                };
                assert_eq!((&p.topic[..], p.qos as u8, &p.payload[..]), (&b"a/b"[..], qos, &payload[..]));
                assert_eq!(p.pkid, if qos == 1 { 9 } else { 0 });
                let props = p.properties.expect("properties");
                assert_eq!(
                    props.user_properties,
                    vec![(EVENT_ID_PROPERTY.to_owned(), format_event_id(0xabc))]
                );
                assert!(out.is_empty());
            }
        }
    }

    fn all_props() -> MessageProps {
        MessageProps {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("replies/7".into()),
            correlation_data: Some(bytes::Bytes::from_static(&[0, 1, 0xff])),
            user_properties: vec![
                ("site".into(), "a".into()),
                ("unit".into(), "C".into()),
                ("site".into(), "b".into()),
            ],
            expires_ms: Some(1_000_060_000),
        }
    }

    /// An MQTT 5 upstream gets every property, user properties in order and before the
    /// event id, and the expiry that remains at sending; 3.1.1 gets the same bytes as a
    /// message without properties.
    #[test]
    fn properties_go_to_an_mqtt5_upstream_with_the_remaining_expiry() {
        let props = all_props();
        let message = Message {
            topic: "a/b",
            payload: b"21.5",
            event_id: 0xabc,
            props: Some(&props),
            now_ms: 1_000_002_500,
        };
        let mut out = BytesMut::new();
        encode_publish(&mut out, &params(MqttVersion::V5), 1, 3, &message).expect("fits");
        let Ok(mqtt5::Packet::Publish(p)) = mqtt5::Packet::read(&mut out, None) else {
            panic!("not a v5 publish")
        };
        assert!(out.is_empty());
        assert_eq!((&p.topic[..], &p.payload[..], p.pkid), (&b"a/b"[..], &b"21.5"[..], 3));
        let got = p.properties.expect("properties");
        assert_eq!(got.payload_format_indicator, Some(1));
        assert_eq!(got.message_expiry_interval, Some(58), "60 s less the 2.5 s waited, rounded up");
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        assert_eq!(got.response_topic.as_deref(), Some("replies/7"));
        assert_eq!(got.correlation_data.as_deref(), Some(&[0, 1, 0xff][..]));
        let mut expected = props.user_properties.clone();
        expected.push((EVENT_ID_PROPERTY.to_owned(), format_event_id(0xabc)));
        assert_eq!(got.user_properties, expected);

        let (mut with, mut without) = (BytesMut::new(), BytesMut::new());
        encode_publish(&mut with, &params(MqttVersion::V311), 1, 3, &message).expect("fits");
        encode_publish(&mut without, &params(MqttVersion::V311), 1, 3, &Message::new("a/b", b"21.5", 0xabc))
            .expect("fits");
        assert_eq!(with, without, "3.1.1 cannot carry properties: they are left out");
    }

    /// The properties count against the upstream's maximum packet size, and one longer than
    /// MQTT's two-byte length is refused, not cut.
    #[test]
    fn properties_count_toward_the_size_limits() {
        let props = all_props();
        let message = Message { topic: "t", payload: b"x", event_id: 1, props: Some(&props), now_ms: 0 };
        let mut exact = BytesMut::new();
        encode_publish(&mut exact, &params(MqttVersion::V5), 1, 1, &message).expect("fits");
        let mut p = params(MqttVersion::V5);
        p.max_packet = exact.len() - 1;
        let mut out = BytesMut::new();
        let err = encode_publish(&mut out, &p, 1, 1, &message).expect_err("one byte too large");
        assert_eq!((err.size, out.len()), (exact.len(), 0));
        let huge = MessageProps { content_type: Some("x".repeat(70_000)), ..MessageProps::default() };
        let message = Message { props: Some(&huge), ..message };
        assert!(encode_publish(&mut out, &params(MqttVersion::V5), 1, 1, &message).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn publishes_over_the_upstream_maximum_are_refused_unwritten() {
        let mut p = params(MqttVersion::V5);
        p.max_packet = 100;
        let mut out = BytesMut::new();
        let err =
            encode_publish(&mut out, &p, 1, 1, &Message::new("t", &[0; 200], 1)).expect_err("too large");
        assert!(err.size > 200 && err.max == 100, "{err:?}");
        assert!(out.is_empty());
        encode_publish(&mut out, &p, 1, 1, &Message::new("t", &[0; 10], 1)).expect("fits");
    }

    #[test]
    fn acks_parse_incrementally_and_refusals_carry_the_reason() {
        let mut wire = BytesMut::new();
        rumqttc::mqttbytes::v4::PubAck::new(513).write(&mut wire).expect("write");
        wire.put_slice(&[0xD0, 0x00]);
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(incoming) = parse_incoming(&mut buf, MqttVersion::V311).expect("valid") {
                seen.push(incoming);
            }
        }
        assert_eq!(seen, vec![Incoming::PubAck { pkid: 513, rejected: None }, Incoming::PingResp]);

        let mut buf = BytesMut::new();
        let mut ack = mqtt5::PubAck::new(9, None);
        ack.reason = mqtt5::PubAckReason::NotAuthorized;
        ack.write(&mut buf).expect("write");
        let mut ok = mqtt5::PubAck::new(10, None);
        ok.reason = mqtt5::PubAckReason::NoMatchingSubscribers;
        ok.write(&mut buf).expect("write");
        assert_eq!(
            parse_incoming(&mut buf, MqttVersion::V5).expect("valid"),
            Some(Incoming::PubAck { pkid: 9, rejected: Some("NotAuthorized (0x87)".to_owned()) })
        );
        assert_eq!(
            parse_incoming(&mut buf, MqttVersion::V5).expect("valid"),
            Some(Incoming::PubAck { pkid: 10, rejected: None })
        );
    }

    proptest::proptest! {
        /// Whatever an upstream sends, parsing returns packets, "need more" or an error; it
        /// never panics and never consumes an incomplete packet.
        #[test]
        fn arbitrary_upstream_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64), v5: bool) {
            let version = if v5 { MqttVersion::V5 } else { MqttVersion::V311 };
            let mut buf = BytesMut::from(&bytes[..]);
            loop {
                let before = buf.len();
                match parse_incoming(&mut buf, version) {
                    Ok(Some(_)) => proptest::prop_assert!(buf.len() < before),
                    Ok(None) => {
                        proptest::prop_assert_eq!(buf.len(), before);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }

        /// A stream of acks parses the same however TCP splits it.
        #[test]
        fn acks_parse_the_same_however_split(
            pkids in proptest::collection::vec(1u16.., 1..20),
            cuts in proptest::collection::vec(0usize..200, 0..10),
        ) {
            let mut wire = BytesMut::new();
            for pkid in &pkids {
                rumqttc::mqttbytes::v4::PubAck::new(*pkid).write(&mut wire).expect("write");
                wire.put_slice(&[0xD0, 0x00]);
            }
            let wire = wire.freeze();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            let (mut buf, mut seen, mut from) = (BytesMut::new(), Vec::new(), 0);
            for cut in cuts {
                buf.put_slice(&wire[from..cut]);
                from = cut;
                while let Some(incoming) = parse_incoming(&mut buf, MqttVersion::V5).expect("valid") {
                    seen.push(incoming);
                }
            }
            let expected: Vec<Incoming> = pkids
                .iter()
                .flat_map(|&pkid| [Incoming::PubAck { pkid, rejected: None }, Incoming::PingResp])
                .collect();
            proptest::prop_assert_eq!(seen, expected);
        }

        /// Any publish we encode is one rumqttc decodes back to what went in.
        #[test]
        fn any_publish_round_trips(
            topic in "[a-z/]{1,40}",
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            qos in 0u8..2,
            pkid in 1u16..,
            event_id: u64,
        ) {
            let mut out = BytesMut::new();
            encode_publish(&mut out, &params(MqttVersion::V5), qos, pkid, &Message::new(&topic, &payload, event_id)).expect("fits");
            let Ok(mqtt5::Packet::Publish(p)) = mqtt5::Packet::read(&mut out, None) else {
                return Err(proptest::test_runner::TestCaseError::fail("not a publish"));
            };
            proptest::prop_assert_eq!(&p.topic[..], topic.as_bytes());
            proptest::prop_assert_eq!(&p.payload[..], &payload[..]);
            proptest::prop_assert_eq!(p.pkid, if qos == 1 { pkid } else { 0 });
            proptest::prop_assert!(out.is_empty());
        }
    }

    fn v5_config() -> UpstreamConfig {
        let mut cfg = UpstreamConfig::with_url("mqtt://127.0.0.1:1883".parse().expect("url"));
        cfg.mqtt_version = MqttVersion::V5;
        cfg
    }

    /// A 3.1.1-only broker answers an MQTT 5 CONNECT with a 3.1.1 CONNACK (no properties):
    /// that is a refusal to name, not "more bytes to come" until the connect timeout.
    #[test]
    fn a_311_connack_to_an_mqtt5_connect_says_so() {
        let mut buf = BytesMut::from(&[0x20u8, 0x02, 0x00, 0x01][..]);
        let err = parse_connack(&mut buf, &v5_config()).expect_err("refused");
        assert!(err.contains("mqtt_version = \"3.1.1\""), "{err}");
        let mut buf = BytesMut::from(&[0x20u8, 0x03, 0x00][..]);
        assert_eq!(parse_connack(&mut buf, &v5_config()), Ok(None), "incomplete: wait");
    }

    /// The configured limit applies to MQTT 3.1.1 (whose CONNACK says nothing), and the lower
    /// of it and an MQTT 5 upstream's own applies to MQTT 5.
    #[test]
    fn the_configured_maximum_packet_size_applies() {
        let mut cfg = UpstreamConfig::with_url("mqtt://127.0.0.1:1883".parse().expect("url"));
        cfg.max_packet_size = Some(bytesize::ByteSize::b(2000));
        let mut buf = BytesMut::from(&[0x20u8, 0x02, 0x00, 0x00][..]);
        let params = parse_connack(&mut buf, &cfg).expect("valid").expect("complete");
        assert_eq!(params.max_packet, 2000);
        cfg.mqtt_version = MqttVersion::V5;
        // Maximum Packet Size 5000 from the upstream.
        let mut buf = BytesMut::from(&[0x20u8, 0x08, 0x00, 0x00, 0x05, 0x27, 0, 0, 0x13, 0x88][..]);
        let params = parse_connack(&mut buf, &cfg).expect("valid").expect("complete");
        assert_eq!(params.max_packet, 2000);
        cfg.max_packet_size = Some(bytesize::ByteSize::b(9000));
        let mut buf = BytesMut::from(&[0x20u8, 0x08, 0x00, 0x00, 0x05, 0x27, 0, 0, 0x13, 0x88][..]);
        let params = parse_connack(&mut buf, &cfg).expect("valid").expect("complete");
        assert_eq!(params.max_packet, 5000);
    }

    #[test]
    fn a_maximum_packet_size_of_zero_is_refused() {
        // CONNACK, success, properties: Maximum Packet Size (0x27) = 0.
        let mut buf = BytesMut::from(&[0x20u8, 0x08, 0x00, 0x00, 0x05, 0x27, 0, 0, 0, 0][..]);
        let err = parse_connack(&mut buf, &v5_config()).expect_err("protocol error");
        assert!(err.contains("Maximum Packet Size 0"), "{err}");
        let mut buf = BytesMut::from(&[0x20u8, 0x08, 0x00, 0x00, 0x05, 0x27, 0, 0, 0x07, 0xD0][..]);
        let params = parse_connack(&mut buf, &v5_config()).expect("valid").expect("complete");
        assert_eq!(params.max_packet, 2000);
    }

    /// What a subscriber gets, encoded by rumqttc, parsed by ours: publishes of both QoS and
    /// protocols (MQTT 5 properties skipped), SUBACKs, a QoS 2 publish refused, the size bound.
    #[test]
    fn inbound_packets_parse_as_rumqttc_encodes_them() {
        use rumqttc::mqttbytes::{QoS, v4};
        let mut buf = BytesMut::new();
        let mut p = v4::Publish::new("cloud/cmd/a", QoS::AtLeastOnce, "open");
        p.pkid = 7;
        p.retain = true;
        p.write(&mut buf).expect("write");
        v4::Publish::new("cloud/cmd/b", QoS::AtMostOnce, "x").write(&mut buf).expect("write");
        v4::SubAck::new(
            1,
            vec![v4::SubscribeReasonCode::Success(QoS::AtLeastOnce), v4::SubscribeReasonCode::Failure],
        )
        .write(&mut buf)
        .expect("write");
        let next = |buf: &mut BytesMut| parse_from_upstream(buf, MqttVersion::V311, 1024).expect("valid");
        assert_eq!(
            next(&mut buf),
            Some(FromUpstream::Publish {
                topic: Bytes::from_static(b"cloud/cmd/a"),
                payload: Bytes::from_static(b"open"),
                qos: 1,
                pkid: 7,
                retain: true
            })
        );
        assert!(matches!(next(&mut buf), Some(FromUpstream::Publish { qos: 0, pkid: 0, retain: false, .. })));
        assert_eq!(next(&mut buf), Some(FromUpstream::SubAck { pkid: 1, codes: vec![1, 0x80] }));
        assert_eq!(next(&mut buf), None);

        let mut p5 = mqtt5::Publish::new("t/x", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, "v5", None);
        p5.pkid = 3;
        p5.properties =
            Some(mqtt5::PublishProperties { content_type: Some("text/plain".into()), ..Default::default() });
        let mut buf = BytesMut::new();
        mqtt5::Packet::Publish(p5).write(&mut buf, None).expect("write");
        let Ok(Some(FromUpstream::Publish { topic, payload, pkid, .. })) =
            parse_from_upstream(&mut buf, MqttVersion::V5, 1024)
        else {
            panic!("a v5 publish")
        };
        assert_eq!((&topic[..], &payload[..], pkid), (&b"t/x"[..], &b"v5"[..], 3));

        let mut buf = BytesMut::new();
        let mut q2 = v4::Publish::new("t", QoS::ExactlyOnce, "x");
        q2.pkid = 1;
        q2.write(&mut buf).expect("write");
        assert!(parse_from_upstream(&mut buf.clone(), MqttVersion::V311, 1024).is_err(), "QoS 2");
        let mut buf = BytesMut::new();
        v4::Publish::new("t", QoS::AtMostOnce, vec![0u8; 2000]).write(&mut buf).expect("write");
        let err = parse_from_upstream(&mut buf, MqttVersion::V311, 1024).expect_err("too large");
        assert!(err.contains("broker.max_payload"), "{err}");
    }

    /// Our SUBSCRIBE, PUBACK and persistent CONNECT, decoded by rumqttc.
    #[test]
    fn inbound_subscribe_puback_and_connect_decode_with_rumqttc() {
        use rumqttc::mqttbytes::v4;
        let mut out = BytesMut::new();
        encode_subscribe(&mut out, MqttVersion::V311, 1, &[("a/#", 1), ("b/+", 0)]);
        encode_puback(&mut out, 9);
        let Ok(v4::Packet::Subscribe(sub)) = v4::Packet::read(&mut out, usize::MAX) else {
            panic!("subscribe")
        };
        let filters: Vec<(String, u8)> = sub.filters.iter().map(|f| (f.path.clone(), f.qos as u8)).collect();
        assert_eq!((sub.pkid, filters), (1, vec![("a/#".to_owned(), 1), ("b/+".to_owned(), 0)]));
        let Ok(v4::Packet::PubAck(ack)) = v4::Packet::read(&mut out, usize::MAX) else { panic!("puback") };
        assert_eq!(ack.pkid, 9);

        let mut out = BytesMut::new();
        encode_subscribe(&mut out, MqttVersion::V5, 1, &[("a/#", 1)]);
        let Ok(mqtt5::Packet::Subscribe(sub)) = mqtt5::Packet::read(&mut out, None) else {
            panic!("v5 subscribe")
        };
        let f = &sub.filters[0];
        assert!(
            f.preserve_retain && f.retain_forward_rule == mqtt5::RetainForwardRule::OnNewSubscribe,
            "{f:?}"
        );

        let cfg = UpstreamConfig::with_url("mqtt://127.0.0.1:1883".parse().expect("url"));
        let mut out = BytesMut::new();
        encode_inbound_connect(&cfg, "outpost-in", Duration::from_secs(60), 4096, &mut out).expect("encode");
        let Ok(v4::Packet::Connect(c)) = v4::Packet::read(&mut out, usize::MAX) else { panic!("connect") };
        assert!(!c.clean_session && c.client_id == "outpost-in");
        let mut v5 = cfg.clone();
        v5.mqtt_version = MqttVersion::V5;
        let mut out = BytesMut::new();
        encode_inbound_connect(&v5, "outpost-in", Duration::from_secs(60), 4096, &mut out).expect("encode");
        let Ok(mqtt5::Packet::Connect(c, _, _)) = mqtt5::Packet::read(&mut out, None) else {
            panic!("v5 connect")
        };
        let props = c.properties.expect("properties");
        assert!(!c.clean_start);
        assert_eq!((props.session_expiry_interval, props.max_packet_size), (Some(60), Some(4096)));
    }

    #[test]
    fn disconnects_and_garbage_end_the_link() {
        let mut buf = BytesMut::from(&[0xE0u8, 0x01, 0x97][..]);
        let Ok(Some(Incoming::Disconnect(reason))) = parse_incoming(&mut buf, MqttVersion::V5) else {
            panic!("a DISCONNECT")
        };
        assert!(reason.contains("QuotaExceeded"), "{reason}");
        let mut buf = BytesMut::from(&[0x30u8, 0x03, 0x00, 0x01, b't'][..]);
        assert!(parse_incoming(&mut buf, MqttVersion::V311).is_err());
        let mut buf = BytesMut::from(&[0x40u8, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert!(parse_incoming(&mut buf, MqttVersion::V311).is_err());
        let mut buf = BytesMut::from(&[0x40u8, 0x01, 0x00][..]);
        assert!(parse_incoming(&mut buf, MqttVersion::V5).is_err(), "a PUBACK without a packet id");
    }
}
