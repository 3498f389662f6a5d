//! The session fuzzer's MQTT packets: a model of what a client may send (both protocol versions,
//! every field a hostile client can choose) and an encoder that writes exactly what the model
//! says, including values a well-behaved client never sends (QoS 2 with packet id 0, a will
//! topic with control characters, properties in the wrong place).
//!
//! Malformed bytes (broken lengths, reserved types, cut packets) are not modelled here: the
//! grammar makes them from these encodings and sends them as [`Packet::Raw`].
//!
//! # Invariants
//! - [`encode`] is total: every [`Packet`] encodes, whatever its field values (strings longer
//!   than 65,535 bytes are cut, as the length prefix cannot say more).
//! - A packet that [`Packet::is_well_formed`] encodes to bytes a conforming decoder reads back
//!   field for field (checked against rumqttc's `mqttbytes` in the tests).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::harness::raw::read_varint;

/// The MQTT protocol version of a session; fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Version {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

impl Version {
    /// The protocol level byte of a CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

/// An MQTT 5 property. Which ones a packet may carry depends on the packet; the grammar keeps
/// to the allowed ones for well-formed packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Property {
    PayloadFormat(u8),
    MessageExpiry(u32),
    ContentType(String),
    ResponseTopic(String),
    CorrelationData(Vec<u8>),
    SubscriptionId(u32),
    SessionExpiry(u32),
    RequestProblemInfo(u8),
    WillDelay(u32),
    RequestResponseInfo(u8),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    UserProperty(String, String),
    MaximumPacketSize(u32),
    ReasonString(String),
}

/// A will message in a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 only.
    pub properties: Vec<Property>,
}

/// A CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// Clean session (3.1.1) or clean start (5).
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    pub username: Option<String>,
    /// Sent only with a username (3.1.1 forbids a password alone; rumqttc reads it as text).
    pub password: Option<String>,
    /// MQTT 5 only.
    pub properties: Vec<Property>,
}

/// One subscription of a SUBSCRIBE: the filter and its options byte (QoS in bits 0–1; MQTT 5
/// adds no-local, retain-as-published and retain handling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub options: u8,
}

/// A PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    /// Written only for QoS 1 and 2.
    pub pkid: u16,
    pub payload: Vec<u8>,
    /// MQTT 5 only.
    pub properties: Vec<Property>,
}

/// The four acknowledgements of QoS 1 and 2 flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

impl AckKind {
    /// The first byte: the packet type, and PUBREL's mandatory flags.
    fn first_byte(self) -> u8 {
        match self {
            AckKind::PubAck => 0x40,
            AckKind::PubRec => 0x50,
            AckKind::PubRel => 0x62,
            AckKind::PubComp => 0x70,
        }
    }

    /// Whether `reason` is an MQTT 5 reason code this acknowledgement may carry.
    pub fn allows_reason(self, reason: u8) -> bool {
        match self {
            AckKind::PubAck | AckKind::PubRec => {
                matches!(reason, 0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99)
            }
            AckKind::PubRel | AckKind::PubComp => matches!(reason, 0x00 | 0x92),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AckKind::PubAck => "PUBACK",
            AckKind::PubRec => "PUBREC",
            AckKind::PubRel => "PUBREL",
            AckKind::PubComp => "PUBCOMP",
        }
    }
}

/// A packet a fuzzed client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    Publish(Publish),
    /// An acknowledgement; MQTT 5 adds the reason code (always written, with an empty
    /// property block).
    Ack {
        kind: AckKind,
        pkid: u16,
        reason: u8,
    },
    Subscribe {
        pkid: u16,
        subscriptions: Vec<Subscription>,
        properties: Vec<Property>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
        properties: Vec<Property>,
    },
    PingReq,
    /// MQTT 5 writes the reason code and properties; 3.1.1 has neither.
    Disconnect {
        reason: u8,
        properties: Vec<Property>,
    },
    /// Bytes sent as they are: garbage, a cut or corrupted packet. `what` says how they were made.
    Raw {
        what: String,
        bytes: Vec<u8>,
    },
}

impl Packet {
    /// Whether the packet is valid MQTT framing with the field values a decoder accepts:
    /// what the spec forbids only in a topic's contents (control characters, wildcards, `$`)
    /// still counts as well-formed, because a decoder reads it and the broker must answer it.
    pub fn is_well_formed(&self) -> bool {
        match self {
            Packet::Connect(connect) => connect.will.as_ref().is_none_or(|will| will.qos <= 2),
            // A client must not send a Subscription Identifier in a PUBLISH (MQTT 5
            // [MQTT-3.3.4-6]); the grammar sends it to the gateway on purpose, but it is not
            // well formed (and rumqttc's decoder miscounts a multi-byte one, taking bytes of the
            // payload as properties).
            Packet::Publish(publish) => {
                publish.qos <= 2
                    && (publish.qos == 0 || publish.pkid != 0)
                    && !publish.properties.iter().any(|p| matches!(p, Property::SubscriptionId(_)))
            }
            Packet::Ack { kind, reason, .. } => kind.allows_reason(*reason),
            Packet::PingReq | Packet::Disconnect { .. } => true,
            Packet::Subscribe { pkid, subscriptions, .. } => {
                // Options: QoS ≤ 2, retain handling ≤ 2, reserved bits 6–7 clear.
                let valid =
                    |options: u8| options & 0b11 <= 2 && (options >> 4) & 0b11 <= 2 && options >> 6 == 0;
                *pkid != 0 && !subscriptions.is_empty() && subscriptions.iter().all(|s| valid(s.options))
            }
            Packet::Unsubscribe { pkid, filters, .. } => *pkid != 0 && !filters.is_empty(),
            Packet::Raw { .. } => false,
        }
    }

    /// A one-line description for reports.
    pub fn describe(&self) -> String {
        match self {
            Packet::Connect(c) => format!(
                "CONNECT {} id {:?} clean {} keepalive {}{}{}{}",
                match c.version {
                    Version::V311 => "3.1.1",
                    Version::V5 => "5",
                },
                shorten(&c.client_id),
                u8::from(c.clean),
                c.keep_alive,
                c.will.as_ref().map_or(String::new(), |w| format!(
                    " will {:?} QoS {}{}",
                    shorten(&w.topic),
                    w.qos,
                    if w.retain { " retained" } else { "" }
                )),
                if c.username.is_some() { " with credentials" } else { "" },
                if c.properties.is_empty() { String::new() } else { format!(" {:?}", c.properties) },
            ),
            Packet::Publish(p) => format!(
                "PUBLISH QoS {} id {} topic {:?}{}{} ({} bytes)",
                p.qos,
                p.pkid,
                shorten(&p.topic),
                if p.retain { " retained" } else { "" },
                if p.dup { " dup" } else { "" },
                p.payload.len()
            ),
            Packet::Ack { kind, pkid, reason } => format!("{} id {pkid} reason {reason:#04x}", kind.name()),
            Packet::Subscribe { pkid, subscriptions, .. } => {
                let filters: Vec<String> = subscriptions
                    .iter()
                    .map(|s| format!("{:?} options {:#04x}", shorten(&s.filter), s.options))
                    .collect();
                format!("SUBSCRIBE id {pkid} {}", filters.join(", "))
            }
            Packet::Unsubscribe { pkid, filters, .. } => {
                let filters: Vec<String> = filters.iter().map(|f| format!("{:?}", shorten(f))).collect();
                format!("UNSUBSCRIBE id {pkid} {}", filters.join(", "))
            }
            Packet::PingReq => "PINGREQ".to_string(),
            Packet::Disconnect { reason, .. } => format!("DISCONNECT reason {reason:#04x}"),
            Packet::Raw { what, bytes } => format!("{what} ({} bytes)", bytes.len()),
        }
    }
}

/// The first 60 characters of `text`, for one-line descriptions of long topics and ids.
pub fn shorten(text: &str) -> String {
    if text.chars().count() <= 60 {
        return text.to_string();
    }
    let head: String = text.chars().take(60).collect();
    format!("{head}…({} bytes)", text.len())
}

/// The bytes of `packet` in a session of `version`.
pub fn encode(packet: &Packet, version: Version) -> Vec<u8> {
    let v5 = version == Version::V5;
    let mut body = Vec::new();
    let first = match packet {
        Packet::Connect(connect) => {
            encode_connect(connect, &mut body);
            0x10
        }
        Packet::Publish(publish) => {
            put_str(&mut body, &publish.topic);
            if publish.qos > 0 {
                body.extend_from_slice(&publish.pkid.to_be_bytes());
            }
            if v5 {
                put_properties(&mut body, &publish.properties);
            }
            body.extend_from_slice(&publish.payload);
            0x30 | (u8::from(publish.dup) << 3) | ((publish.qos & 0b11) << 1) | u8::from(publish.retain)
        }
        Packet::Ack { kind, pkid, reason } => {
            body.extend_from_slice(&pkid.to_be_bytes());
            if v5 {
                body.push(*reason);
                put_properties(&mut body, &[]);
            }
            kind.first_byte()
        }
        Packet::Subscribe { pkid, subscriptions, properties } => {
            body.extend_from_slice(&pkid.to_be_bytes());
            if v5 {
                put_properties(&mut body, properties);
            }
            for subscription in subscriptions {
                put_str(&mut body, &subscription.filter);
                body.push(subscription.options);
            }
            0x82
        }
        Packet::Unsubscribe { pkid, filters, properties } => {
            body.extend_from_slice(&pkid.to_be_bytes());
            if v5 {
                put_properties(&mut body, properties);
            }
            for filter in filters {
                put_str(&mut body, filter);
            }
            0xa2
        }
        Packet::PingReq => 0xc0,
        Packet::Disconnect { reason, properties } => {
            if v5 {
                body.push(*reason);
                put_properties(&mut body, properties);
            }
            0xe0
        }
        Packet::Raw { bytes, .. } => return bytes.clone(),
    };
    frame(first, &body)
}

fn encode_connect(connect: &Connect, body: &mut Vec<u8>) {
    let v5 = connect.version == Version::V5;
    put_str(body, "MQTT");
    body.push(connect.version.level());
    let mut flags = u8::from(connect.clean) << 1;
    if let Some(will) = &connect.will {
        flags |= 0b100 | ((will.qos & 0b11) << 3) | (u8::from(will.retain) << 5);
    }
    if connect.username.is_some() {
        flags |= 0x80;
        if connect.password.is_some() {
            flags |= 0x40;
        }
    }
    body.push(flags);
    body.extend_from_slice(&connect.keep_alive.to_be_bytes());
    if v5 {
        put_properties(body, &connect.properties);
    }
    put_str(body, &connect.client_id);
    if let Some(will) = &connect.will {
        if v5 {
            put_properties(body, &will.properties);
        }
        put_str(body, &will.topic);
        put_bytes(body, &will.payload);
    }
    if let Some(username) = &connect.username {
        put_str(body, username);
        if let Some(password) = &connect.password {
            put_str(body, password);
        }
    }
}

/// A whole packet: the first byte, the remaining length, the body.
pub fn frame(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(body.len() + 5);
    packet.push(first_byte);
    put_varint(&mut packet, body.len());
    packet.extend_from_slice(body);
    packet
}

/// Appends a variable byte integer (the remaining length, property lengths, subscription ids).
/// Values above the 4-byte maximum are written as the maximum.
pub fn put_varint(buffer: &mut Vec<u8>, value: usize) {
    let mut value = value.min(268_435_455);
    loop {
        let byte = (value % 128) as u8;
        value /= 128;
        if value == 0 {
            buffer.push(byte);
            return;
        }
        buffer.push(byte | 0x80);
    }
}

/// Appends a UTF-8 string with its two-byte length, cut to 65,535 bytes.
pub fn put_str(buffer: &mut Vec<u8>, text: &str) {
    put_bytes(buffer, text.as_bytes());
}

/// Appends binary data with its two-byte length, cut to 65,535 bytes.
pub fn put_bytes(buffer: &mut Vec<u8>, data: &[u8]) {
    let data = &data[..data.len().min(usize::from(u16::MAX))];
    buffer.extend_from_slice(&(data.len() as u16).to_be_bytes());
    buffer.extend_from_slice(data);
}

/// Appends an MQTT 5 property block: its length, then each property.
fn put_properties(buffer: &mut Vec<u8>, properties: &[Property]) {
    let mut block = Vec::new();
    for property in properties {
        match property {
            Property::PayloadFormat(v) => block.extend_from_slice(&[0x01, *v]),
            Property::MessageExpiry(v) => put_u32(&mut block, 0x02, *v),
            Property::ContentType(s) => {
                block.push(0x03);
                put_str(&mut block, s);
            }
            Property::ResponseTopic(s) => {
                block.push(0x08);
                put_str(&mut block, s);
            }
            Property::CorrelationData(d) => {
                block.push(0x09);
                put_bytes(&mut block, d);
            }
            Property::SubscriptionId(v) => {
                block.push(0x0b);
                put_varint(&mut block, *v as usize);
            }
            Property::SessionExpiry(v) => put_u32(&mut block, 0x11, *v),
            Property::RequestProblemInfo(v) => block.extend_from_slice(&[0x17, *v]),
            Property::WillDelay(v) => put_u32(&mut block, 0x18, *v),
            Property::RequestResponseInfo(v) => block.extend_from_slice(&[0x19, *v]),
            Property::ReceiveMaximum(v) => put_u16(&mut block, 0x21, *v),
            Property::TopicAliasMaximum(v) => put_u16(&mut block, 0x22, *v),
            Property::TopicAlias(v) => put_u16(&mut block, 0x23, *v),
            Property::UserProperty(key, value) => {
                block.push(0x26);
                put_str(&mut block, key);
                put_str(&mut block, value);
            }
            Property::MaximumPacketSize(v) => put_u32(&mut block, 0x27, *v),
            Property::ReasonString(s) => {
                block.push(0x1f);
                put_str(&mut block, s);
            }
        }
    }
    put_varint(buffer, block.len());
    buffer.extend_from_slice(&block);
}

fn put_u16(buffer: &mut Vec<u8>, id: u8, value: u16) {
    buffer.push(id);
    buffer.extend_from_slice(&value.to_be_bytes());
}

fn put_u32(buffer: &mut Vec<u8>, id: u8, value: u32) {
    buffer.push(id);
    buffer.extend_from_slice(&value.to_be_bytes());
}

/// One packet read from a socket: the first byte and the body after the remaining length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub first_byte: u8,
    pub body: Vec<u8>,
}

impl Frame {
    /// The packet type (the high nibble of the first byte).
    pub fn packet_type(&self) -> u8 {
        self.first_byte >> 4
    }

    /// The packet id of a PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK or UNSUBACK.
    pub fn ack_pkid(&self) -> Option<u16> {
        Some(u16::from_be_bytes([*self.body.first()?, *self.body.get(1)?]))
    }

    /// A PUBLISH's QoS and packet id (0 for QoS 0).
    pub fn publish_qos_pkid(&self) -> Option<(u8, u16)> {
        let qos = (self.first_byte >> 1) & 0b11;
        if qos == 0 {
            return Some((0, 0));
        }
        let topic_len = usize::from(u16::from_be_bytes([*self.body.first()?, *self.body.get(1)?]));
        let at = 2 + topic_len;
        Some((qos, u16::from_be_bytes([*self.body.get(at)?, *self.body.get(at + 1)?])))
    }

    /// A PUBLISH's topic and payload, skipping MQTT 5 properties when `v5`.
    pub fn publish_topic_payload(&self, v5: bool) -> Option<(&[u8], &[u8])> {
        let topic_len = usize::from(u16::from_be_bytes([*self.body.first()?, *self.body.get(1)?]));
        let topic = self.body.get(2..2 + topic_len)?;
        let mut at = 2 + topic_len;
        if (self.first_byte >> 1) & 0b11 != 0 {
            at += 2;
        }
        if v5 {
            let (length, used) = read_varint(self.body.get(at..)?)?;
            at += used + length;
        }
        Some((topic, self.body.get(at..)?))
    }
}

/// Reads one packet; `Ok(None)` at a clean end of stream. A packet longer than `max` or a
/// broken remaining length is an `InvalidData` error.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> io::Result<Option<Frame>> {
    let mut first = [0u8; 1];
    if reader.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let mut length = 0usize;
    for index in 0..4 {
        let byte = reader.read_u8().await?;
        length |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            if length > max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a packet of {length} bytes, over the {max} accepted"),
                ));
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).await?;
            return Ok(Some(Frame { first_byte: first[0], body }));
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "a remaining length longer than 4 bytes"))
}

/// `bytes` as space-separated hex pairs, the form of the reproducers.
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 3);
    for (index, byte) in bytes.iter().enumerate() {
        if index > 0 {
            text.push(' ');
        }
        text.push_str(&format!("{byte:02x}"));
    }
    text
}
