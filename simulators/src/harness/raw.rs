//! Hand-encoded MQTT packets, for clients that must do what a client library will not: stop
//! reading on purpose (a stalled subscriber), write as fast as the socket takes with no window
//! of their own (publishers under backpressure), or send what rumqttc refuses to (an MQTT 5
//! keepalive of 0, a packet over the broker's maximum).
//!
//! Only the wire format those clients share lives here: strings, the remaining length, a whole
//! packet, CONNECT (with or without a will, clean or persistent), PUBLISH (DUP too), PUBREL,
//! SUBSCRIBE, the MQTT 5 properties hostile
//! clients send (topic alias, subscription identifier) and reading one packet back, or the
//! properties of a CONNACK. Each client builds any other packet from these pieces.
//!
//! This is the harness's one copy of MQTT's framing ([`read_varint`], [`fixed_header`]); the
//! gateway has its own in `outpost::mqtt`, which the harness does not depend on (it tests the
//! gateway as a black box).
//!
//! # Invariants
//! - Nothing here waits on the clock: a read waits on the socket, and the caller bounds it.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The CONNECT flags of a clean session (3.1.1) or clean start (5) with no will, username or
/// password.
const CLEAN_SESSION: u8 = 0b0000_0010;
/// The CONNECT flags of a will at QoS 1, not retained (added to [`CLEAN_SESSION`]).
const WILL_QOS1: u8 = 0b0000_1100;

/// MQTT 5 property identifiers used here.
pub mod property {
    /// Subscription Identifier (variable byte integer); only a server may put it in a PUBLISH.
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0b;
    /// Topic Alias Maximum (two-byte integer) in a CONNACK; absent means 0.
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    /// Topic Alias (two-byte integer) in a PUBLISH.
    pub const TOPIC_ALIAS: u8 = 0x23;
}

/// Appends an MQTT UTF-8 string: a two-byte length, then the bytes.
pub fn put_str(buffer: &mut Vec<u8>, text: &str) {
    let length = u16::try_from(text.len()).expect("test strings are short");
    buffer.extend_from_slice(&length.to_be_bytes());
    buffer.extend_from_slice(text.as_bytes());
}

/// Appends MQTT's variable-length "remaining length".
pub fn put_remaining_length(buffer: &mut Vec<u8>, mut length: usize) {
    loop {
        let byte = u8::try_from(length % 128).expect("below 128");
        length /= 128;
        if length == 0 {
            buffer.push(byte);
            return;
        }
        buffer.push(byte | 0x80);
    }
}

/// A whole packet: `first_byte` (type and flags), the remaining length, then `rest`.
pub fn packet(first_byte: u8, rest: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(rest.len() + 5);
    packet.push(first_byte);
    put_remaining_length(&mut packet, rest.len());
    packet.extend_from_slice(rest);
    packet
}

/// An MQTT 3.1.1 CONNECT with a clean session and no will or credentials.
pub fn connect_v311(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
    connect(4, client_id, keep_alive_secs, None)
}

/// An MQTT 5 CONNECT with a clean start, no properties and no will or credentials.
pub fn connect_v5(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
    connect(5, client_id, keep_alive_secs, None)
}

/// An MQTT 3.1.1 CONNECT with a clean session and a QoS 1, non-retained will on `will_topic`
/// (written as given, so it may be one no broker accepts).
pub fn connect_v311_with_will(
    client_id: &str,
    keep_alive_secs: u16,
    will_topic: &str,
    will: &[u8],
) -> Vec<u8> {
    connect(4, client_id, keep_alive_secs, Some((will_topic, will)))
}

/// An MQTT 5 CONNECT with a clean start, no properties, and a QoS 1, non-retained will without
/// properties on `will_topic` (written as given).
pub fn connect_v5_with_will(client_id: &str, keep_alive_secs: u16, will_topic: &str, will: &[u8]) -> Vec<u8> {
    connect(5, client_id, keep_alive_secs, Some((will_topic, will)))
}

/// A CONNECT for protocol `level` (4: 3.1.1, 5: 5) with an empty property block (5) and an
/// optional will `(topic, payload)`.
fn connect(level: u8, client_id: &str, keep_alive_secs: u16, will: Option<(&str, &[u8])>) -> Vec<u8> {
    let v5 = level == 5;
    let mut variable = Vec::with_capacity(client_id.len() + 32);
    put_str(&mut variable, "MQTT");
    variable.push(level);
    variable.push(if will.is_some() { CLEAN_SESSION | WILL_QOS1 } else { CLEAN_SESSION });
    variable.extend_from_slice(&keep_alive_secs.to_be_bytes());
    if v5 {
        variable.push(0); // No CONNECT properties.
    }
    put_str(&mut variable, client_id);
    if let Some((topic, payload)) = will {
        if v5 {
            variable.push(0); // No will properties.
        }
        put_str(&mut variable, topic);
        put_binary(&mut variable, payload);
    }
    packet(0x10, &variable)
}

/// Appends MQTT binary data: a two-byte length, then the bytes.
pub fn put_binary(buffer: &mut Vec<u8>, data: &[u8]) {
    let length = u16::try_from(data.len()).expect("test payloads are short");
    buffer.extend_from_slice(&length.to_be_bytes());
    buffer.extend_from_slice(data);
}

/// An MQTT 3.1.1 CONNECT with clean session 0 (a persistent session) and no will or
/// credentials: what a sensor that resends its unacknowledged QoS 1/2 flows after a reconnect
/// uses.
pub fn connect_v311_persistent(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
    let mut packet = connect(4, client_id, keep_alive_secs, None);
    // The flags follow the fixed header, then the protocol name (2 + 4 bytes) and level.
    let (_, length_bytes) = read_varint(&packet[1..]).expect("a CONNECT made here");
    packet[1 + length_bytes + 7] &= !CLEAN_SESSION;
    packet
}

/// An MQTT 3.1.1 PUBLISH sent again after a reconnect: the DUP flag set (3.3.1.1); QoS 1 or 2.
pub fn publish_v311_dup(topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    assert!(qos > 0, "only QoS 1 and 2 are sent again");
    let mut packet = publish(topic, qos, packet_id, false, None, payload);
    packet[0] |= 0x08;
    packet
}

/// A PUBREL (both protocol versions; MQTT 5 without a reason code means success).
pub fn pubrel(packet_id: u16) -> Vec<u8> {
    packet(0x62, &packet_id.to_be_bytes())
}

/// An MQTT 3.1.1 PUBLISH; `packet_id` is written only for QoS 1 and 2.
pub fn publish_v311(topic: &str, qos: u8, packet_id: u16, retain: bool, payload: &[u8]) -> Vec<u8> {
    publish(topic, qos, packet_id, retain, None, payload)
}

/// An MQTT 5 PUBLISH with the encoded `properties` (without their length, which this adds;
/// empty for none); `packet_id` is written only for QoS 1 and 2.
pub fn publish_v5(topic: &str, qos: u8, packet_id: u16, properties: &[u8], payload: &[u8]) -> Vec<u8> {
    publish(topic, qos, packet_id, false, Some(properties), payload)
}

fn publish(
    topic: &str,
    qos: u8,
    packet_id: u16,
    retain: bool,
    properties: Option<&[u8]>,
    payload: &[u8],
) -> Vec<u8> {
    assert!(qos <= 2, "QoS {qos} does not exist");
    let mut variable = Vec::with_capacity(topic.len() + payload.len() + 16);
    put_str(&mut variable, topic);
    if qos > 0 {
        variable.extend_from_slice(&packet_id.to_be_bytes());
    }
    if let Some(properties) = properties {
        put_remaining_length(&mut variable, properties.len());
        variable.extend_from_slice(properties);
    }
    variable.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &variable)
}

/// An MQTT 3.1.1 SUBSCRIBE to one `filter` at `qos`.
pub fn subscribe_v311(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut variable = Vec::with_capacity(filter.len() + 5);
    variable.extend_from_slice(&packet_id.to_be_bytes());
    put_str(&mut variable, filter);
    variable.push(qos);
    packet(0x82, &variable)
}

/// The MQTT 5 Topic Alias property.
pub fn topic_alias(alias: u16) -> Vec<u8> {
    let mut encoded = vec![property::TOPIC_ALIAS];
    encoded.extend_from_slice(&alias.to_be_bytes());
    encoded
}

/// The MQTT 5 Subscription Identifier property.
pub fn subscription_identifier(id: usize) -> Vec<u8> {
    let mut encoded = vec![property::SUBSCRIPTION_IDENTIFIER];
    put_remaining_length(&mut encoded, id);
    encoded
}

/// Reads a variable byte integer (the remaining length's encoding) at the start of `bytes`:
/// the value and how many bytes it took. `None` if `bytes` ends first or the integer runs over
/// four bytes.
pub fn read_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (index, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// A fixed header that cannot be one: its remaining length runs over four bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedHeader;

/// The fixed header at the start of `buf`: first byte, header length, remaining length.
/// `Ok(None)` until enough bytes are there.
pub fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, MalformedHeader> {
    let Some((&first_byte, rest)) = buf.split_first() else { return Ok(None) };
    match read_varint(rest) {
        Some((remaining, used)) => Ok(Some((first_byte, 1 + used, remaining))),
        None if rest.len() >= 4 => Err(MalformedHeader),
        None => Ok(None),
    }
}

/// The properties of an MQTT 5 CONNACK `body` (as [`read_packet`] returns it) as
/// `(identifier, value bytes)` pairs in order; `None` if they are malformed or the identifier
/// is not one the specification allows.
pub fn connack_properties(body: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    // Acknowledge flags and reason code, then the property length.
    let (length, used) = read_varint(body.get(2..)?)?;
    let mut rest = body.get(2 + used..2 + used + length)?;
    let mut properties = Vec::new();
    while let Some((&id, after_id)) = rest.split_first() {
        let size = match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            // Two-byte integer.
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            // Four-byte integer.
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            // UTF-8 string or binary data: a two-byte length, then the bytes.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => {
                2 + usize::from(u16::from_be_bytes([*after_id.first()?, *after_id.get(1)?]))
            }
            // User property: two strings.
            0x26 => {
                let key = 2 + usize::from(u16::from_be_bytes([*after_id.first()?, *after_id.get(1)?]));
                let value = after_id.get(key..key + 2)?;
                key + 2 + usize::from(u16::from_be_bytes([value[0], value[1]]))
            }
            // Subscription identifier: a variable byte integer.
            0x0b => read_varint(after_id)?.1,
            _ => return None,
        };
        properties.push((id, after_id.get(..size)?.to_vec()));
        rest = &after_id[size..];
    }
    Some(properties)
}

/// Reads one whole packet: its first byte and the rest after the remaining length. End of file,
/// even before a packet starts, is an `UnexpectedEof` error, so a closed connection needs no
/// case of its own.
pub async fn read_packet(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    header[0] = stream.read_u8().await?;
    for end in 2..=5 {
        header[end - 1] = stream.read_u8().await?;
        match fixed_header(&header[..end]) {
            Ok(Some((first_byte, _, remaining))) => {
                let mut rest = vec![0u8; remaining];
                stream.read_exact(&mut rest).await?;
                return Ok((first_byte, rest));
            }
            Ok(None) => {}
            Err(MalformedHeader) => break,
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "remaining length over 4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_uses_seven_bits_per_byte() {
        let encode = |length| {
            let mut buffer = Vec::new();
            put_remaining_length(&mut buffer, length);
            buffer
        };
        assert_eq!(encode(0), [0x00]);
        assert_eq!(encode(127), [0x7f]);
        assert_eq!(encode(128), [0x80, 0x01]);
        assert_eq!(encode(4106), [0x8a, 0x20]);
        assert_eq!(encode(16_384), [0x80, 0x80, 0x01]);
    }

    #[test]
    fn connect_v311_is_a_clean_session() {
        let expected =
            [0x10, 14, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 60, 0x00, 0x02, b'i', b'd'];
        assert_eq!(connect_v311("id", 60), expected);
    }

    #[test]
    fn a_v311_will_follows_the_client_id() {
        let expected = [
            0x10, 24, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x0e, 0x00, 60, 0x00, 0x02, b'i', b'd', 0x00,
            0x03, b'w', b'/', b'#', 0x00, 0x03, b'b', b'y', b'e',
        ];
        assert_eq!(connect_v311_with_will("id", 60, "w/#", b"bye"), expected);
    }

    #[test]
    fn a_v5_will_has_an_empty_property_block_before_its_topic() {
        let expected = [
            0x10, 22, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x0e, 0x00, 60, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x03, b'w', b'/', b'#', 0x00, 0x01, b'x',
        ];
        assert_eq!(connect_v5_with_will("", 60, "w/#", b"x"), expected);
    }

    #[test]
    fn publish_writes_a_packet_id_only_above_qos_0() {
        assert_eq!(publish_v311("a", 0, 7, true, b"p"), [0x31, 4, 0x00, 0x01, b'a', b'p']);
        assert_eq!(publish_v311("a", 1, 7, false, b"p"), [0x32, 6, 0x00, 0x01, b'a', 0x00, 0x07, b'p']);
        assert_eq!(
            publish_v5("a", 1, 7, &topic_alias(1), b"p"),
            [0x32, 10, 0x00, 0x01, b'a', 0x00, 0x07, 0x03, 0x23, 0x00, 0x01, b'p']
        );
        assert_eq!(subscription_identifier(200), [0x0b, 0xc8, 0x01]);
        assert_eq!(subscribe_v311(9, "r/#", 1), [0x82, 8, 0x00, 0x09, 0x00, 0x03, b'r', b'/', b'#', 0x01]);
    }

    #[test]
    fn connack_properties_are_split_by_type() {
        // Flags, reason, 11 bytes of properties: receive maximum 20, topic alias maximum 0,
        // assigned client id "ab".
        let body = [0x00, 0x00, 11, 0x21, 0x00, 20, 0x22, 0x00, 0x00, 0x12, 0x00, 0x02, b'a', b'b'];
        let expected = vec![(0x21, vec![0, 20]), (0x22, vec![0, 0]), (0x12, vec![0, 2, b'a', b'b'])];
        assert_eq!(connack_properties(&body), Some(expected));
        assert_eq!(connack_properties(&[0x00, 0x00, 3, 0x22, 0x00]), None, "truncated");
    }

    #[tokio::test]
    async fn read_packet_returns_what_packet_wrote() {
        let rest = vec![7u8; 300];
        let written = packet(0x32, &rest);
        assert_eq!(read_packet(&mut written.as_slice()).await.expect("a packet"), (0x32, rest));
        let closed = read_packet(&mut [].as_slice()).await.expect_err("end of file");
        assert_eq!(closed.kind(), io::ErrorKind::UnexpectedEof);
        let endless = [0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
        let malformed = read_packet(&mut endless.as_slice()).await.expect_err("too long");
        assert_eq!(malformed.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn fixed_header_waits_for_its_bytes_and_refuses_five_length_bytes() {
        assert_eq!(fixed_header(&[]), Ok(None));
        assert_eq!(fixed_header(&[0x32]), Ok(None));
        assert_eq!(fixed_header(&[0x32, 0x80]), Ok(None));
        assert_eq!(fixed_header(&[0x32, 0x8a, 0x20, 0xff]), Ok(Some((0x32, 3, 4106))));
        assert_eq!(fixed_header(&[0x32, 0xff, 0xff, 0xff, 0xff]), Err(MalformedHeader));
        assert_eq!(read_varint(&[0x80, 0x80, 0x01]), Some((16_384, 3)));
    }
}
