//! The MQTT wire format's shared pieces, for both directions (MQTT 3.1.1 and 5): the fixed
//! header and its variable byte integer, MQTT 5 reason-code names, and the peeks the sensor
//! side needs before rumqttd's codecs consume a packet ([`connect_version`],
//! [`peek_publish`]).
//!
//! # Invariants
//! - Pure: bytes in, values out. No tokio, no pipeline policy, no allocation (except
//!   [`describe_reason`], for log lines).
//! - No input makes anything here panic: a sensor or an upstream controls these bytes
//!   (`gateway/fuzz` `sensor_wire` feeds them).
//! - A reader never consumes bytes: it says how many a value took, and `Ok(None)` means "not
//!   enough bytes yet" only while more bytes could still complete the value.

use bytes::{BufMut, BytesMut};

/// The largest value a variable byte integer holds (four bytes of seven bits).
pub const MAX_VARINT: usize = 268_435_455;

/// A variable byte integer whose fourth byte still says that more follow: no MQTT packet can
/// go on from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed variable byte integer (more than four bytes)")]
pub struct Malformed;

/// The bytes [`put_varint`] writes for `n` (`n` at most [`MAX_VARINT`]).
pub fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends `n` as a variable byte integer: seven bits per byte, least significant first, the
/// top bit set on every byte but the last. Callers check sizes first: an `n` over
/// [`MAX_VARINT`] would take more than four bytes, which readers refuse as [`Malformed`].
pub fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

/// Reads the variable byte integer at the start of `buf`: `(value, bytes used)`. `Ok(None)`:
/// `buf` ends before the integer does.
pub fn read_varint(buf: &[u8]) -> Result<Option<(usize, usize)>, Malformed> {
    let mut value = 0usize;
    for (i, byte) in buf.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 { Err(Malformed) } else { Ok(None) }
}

/// A packet's fixed header: its first byte (type and flags), its own length, and the length of
/// the rest of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub byte1: u8,
    pub header_len: usize,
    pub remaining: usize,
}

/// The fixed header at the start of `buf`. `Ok(None)` until enough bytes are there.
pub fn fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, Malformed> {
    let Some((&byte1, rest)) = buf.split_first() else { return Ok(None) };
    Ok(read_varint(rest)?.map(|(remaining, used)| FixedHeader { byte1, header_len: 1 + used, remaining }))
}

/// An MQTT 5 reason code's name as the specification gives it (§2.4), in the `CamelCase` the
/// logs use; `"Unknown"` for a code MQTT 5 does not define. 0x00 is named as a DISCONNECT
/// names it (`NormalDisconnection`): elsewhere it only means success, which is not logged.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "NormalDisconnection",
        0x01 => "GrantedQoS1",
        0x02 => "GrantedQoS2",
        0x04 => "DisconnectWithWillMessage",
        0x10 => "NoMatchingSubscribers",
        0x11 => "NoSubscriptionExisted",
        0x18 => "ContinueAuthentication",
        0x19 => "ReAuthenticate",
        0x80 => "UnspecifiedError",
        0x81 => "MalformedPacket",
        0x82 => "ProtocolError",
        0x83 => "ImplementationSpecificError",
        0x84 => "UnsupportedProtocolVersion",
        0x85 => "ClientIdentifierNotValid",
        0x86 => "BadUserNameOrPassword",
        0x87 => "NotAuthorized",
        0x88 => "ServerUnavailable",
        0x89 => "ServerBusy",
        0x8A => "Banned",
        0x8B => "ServerShuttingDown",
        0x8C => "BadAuthenticationMethod",
        0x8D => "KeepAliveTimeout",
        0x8E => "SessionTakenOver",
        0x8F => "TopicFilterInvalid",
        0x90 => "TopicNameInvalid",
        0x91 => "PacketIdentifierInUse",
        0x92 => "PacketIdentifierNotFound",
        0x93 => "ReceiveMaximumExceeded",
        0x94 => "TopicAliasInvalid",
        0x95 => "PacketTooLarge",
        0x96 => "MessageRateTooHigh",
        0x97 => "QuotaExceeded",
        0x98 => "AdministrativeAction",
        0x99 => "PayloadFormatInvalid",
        0x9A => "RetainNotSupported",
        0x9B => "QoSNotSupported",
        0x9C => "UseAnotherServer",
        0x9D => "ServerMoved",
        0x9E => "SharedSubscriptionsNotSupported",
        0x9F => "ConnectionRateExceeded",
        0xA0 => "MaximumConnectTime",
        0xA1 => "SubscriptionIdentifiersNotSupported",
        0xA2 => "WildcardSubscriptionsNotSupported",
        _ => "Unknown",
    }
}

/// A reason code as a log line shows it: `NotAuthorized (0x87)`, or `reason code 0x42` for a
/// code MQTT 5 does not define.
pub fn describe_reason(code: u8) -> String {
    match reason_name(code) {
        "Unknown" => format!("reason code 0x{code:02X}"),
        name => format!("{name} (0x{code:02X})"),
    }
}

/// The protocol a sensor's connection speaks, chosen from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// Whether `buf` holds the start of a CONNECT, and if so which protocol version it asks for.
/// `Ok(None)`: not enough bytes yet. `Err(level)`: a version Outpost does not speak (0: not a
/// CONNECT, or a malformed one).
pub fn connect_version(buf: &[u8]) -> Result<Option<Version>, u8> {
    let Some(&first) = buf.first() else { return Ok(None) };
    if first >> 4 != 1 {
        return Err(0);
    }
    let header = match fixed_header(buf) {
        Ok(Some(header)) => header,
        Ok(None) => return Ok(None),
        Err(Malformed) => return Err(0),
    };
    // Protocol name (u16 length + "MQTT"), then the level byte.
    let at = header.header_len;
    let Some(name_len) = buf.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
        return Ok(None);
    };
    match buf.get(at + 2 + name_len) {
        None => Ok(None),
        Some(4) => Ok(Some(Version::V4)),
        Some(5) => Ok(Some(Version::V5)),
        Some(&other) => Err(other),
    }
}

/// QoS and packet id of the PUBLISH at the start of `buf`, if it starts with a complete
/// PUBLISH header. QoS 0 publishes carry no packet id (0 is returned).
pub fn peek_publish(buf: &[u8]) -> Option<(u8, u16)> {
    let header = fixed_header(buf).ok()??;
    if header.byte1 >> 4 != 3 {
        return None;
    }
    let qos = (header.byte1 >> 1) & 0b11;
    let at = header.header_len;
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    if qos == 0 {
        return Some((0, 0));
    }
    let p = at + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(p)?, *buf.get(p + 1)?])))
}

/// Whether the PUBLISH at the start of `buf` carries the DUP flag (a resend).
pub fn publish_dup(buf: &[u8]) -> bool {
    buf.first().is_some_and(|b| b >> 4 == 3 && b & 0b1000 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::{Codec, publish_with};
    use rumqttd::protocol::{Packet, Publish};

    fn encode(n: usize) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_varint(&mut out, n);
        out.to_vec()
    }

    #[test]
    fn varints_use_seven_bits_per_byte_at_every_boundary() {
        for (n, bytes) in [
            (0, &[0x00][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (4106, &[0x8a, 0x20]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (MAX_VARINT, &[0xff, 0xff, 0xff, 0x7f]),
        ] {
            assert_eq!(encode(n), bytes, "{n}");
            assert_eq!(varint_len(n), bytes.len(), "{n}");
            assert_eq!(read_varint(bytes), Ok(Some((n, bytes.len()))), "{n}");
            assert_eq!(read_varint(&bytes[..bytes.len() - 1]), Ok(None), "{n} cut short");
        }
        assert_eq!(read_varint(&[0x80, 0x80, 0x80, 0x80]), Err(Malformed));
        assert_eq!(read_varint(&[0x80, 0x80, 0x80, 0x80, 0x01]), Err(Malformed));
        assert_eq!(read_varint(&[0x05, 0xff]), Ok(Some((5, 1))), "what follows is not read");
    }

    #[test]
    fn the_fixed_header_is_the_first_byte_and_the_remaining_length() {
        let header = |byte1, header_len, remaining| Ok(Some(FixedHeader { byte1, header_len, remaining }));
        assert_eq!(fixed_header(&[0x40, 0x02, 0x00, 0x01]), header(0x40, 2, 2));
        assert_eq!(fixed_header(&[0x30, 0x80, 0x01]), header(0x30, 3, 128));
        assert_eq!(fixed_header(&[0xE0, 0x00]), header(0xE0, 2, 0));
        assert_eq!(fixed_header(&[]), Ok(None));
        assert_eq!(fixed_header(&[0x30]), Ok(None));
        assert_eq!(fixed_header(&[0x30, 0x80]), Ok(None));
        assert_eq!(fixed_header(&[0x30, 0xff, 0xff, 0xff, 0xff]), Err(Malformed));
    }

    #[test]
    fn reason_codes_are_named_as_the_logs_show_them() {
        assert_eq!(reason_name(0x87), "NotAuthorized");
        assert_eq!(reason_name(0x00), "NormalDisconnection");
        assert_eq!(reason_name(0x42), "Unknown");
        assert_eq!(describe_reason(0x87), "NotAuthorized (0x87)");
        assert_eq!(describe_reason(0x97), "QuotaExceeded (0x97)");
        assert_eq!(describe_reason(0x9B), "QoSNotSupported (0x9B)");
        assert_eq!(describe_reason(0x42), "reason code 0x42");
        let named = (0..=u8::MAX).filter(|&code| reason_name(code) != "Unknown").count();
        assert_eq!(named, 43, "every code MQTT 5 defines, once");
    }

    #[test]
    fn peeks_qos_and_packet_id_in_both_versions() {
        for version in [Version::V4, Version::V5] {
            let encode = |packet| {
                let mut buf = BytesMut::new();
                Codec::new(version).write(packet, &mut buf).expect("encodes");
                buf
            };
            let p = publish_with(&Publish::new("a/b", "xyz", false), 1, 4242, false);
            let buf = encode(Packet::Publish(p, None));
            assert_eq!(peek_publish(&buf), Some((1, 4242)), "{version:?}");
            let buf = encode(Packet::Publish(Publish::new("a/b", "xyz", false), None));
            assert_eq!(peek_publish(&buf), Some((0, 0)));
            assert!(!publish_dup(&buf));
            assert_eq!(peek_publish(&buf[..2]), None, "incomplete header");
        }
    }

    #[test]
    fn connect_version_reads_the_protocol_level() {
        let connect = |level: u8| vec![0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', level, 2, 0, 60];
        assert_eq!(connect_version(&connect(4)), Ok(Some(Version::V4)));
        assert_eq!(connect_version(&connect(5)), Ok(Some(Version::V5)));
        assert_eq!(connect_version(&connect(3)), Err(3));
        assert_eq!(connect_version(&connect(4)[..5]), Ok(None));
        assert_eq!(connect_version(&[0x30, 0]), Err(0), "not a CONNECT");
        assert_eq!(connect_version(&[0x30]), Err(0), "known from the first byte");
        assert_eq!(connect_version(&[0x10, 0x80, 0x80]), Ok(None), "remaining length cut short");
        assert_eq!(connect_version(&[0x10, 0x80, 0x80, 0x80, 0x80]), Err(0), "malformed");
    }
}
