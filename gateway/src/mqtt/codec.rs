//! The wire: rumqttd's MQTT 3.1.1 and 5 codecs, plus the few facts they keep private.
//!
//! rumqttd's `Publish` keeps its QoS and packet id crate-private, so the connection reads them
//! from the raw bytes ([`super::wire::peek_publish`]) before the codec consumes a packet, and builds
//! publishes with a chosen QoS and packet id through `Publish::deserialize`, the crate's own
//! MQTT-independent encoding ([`publish_with`]).

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::{self, Packet, Protocol, Publish, QoS};

use super::wire::Version;

/// Either codec.
pub enum Codec {
    V4(protocol::v4::V4),
    V5(protocol::v5::V5),
}

impl Codec {
    pub fn new(version: Version) -> Codec {
        match version {
            Version::V4 => Codec::V4(protocol::v4::V4),
            Version::V5 => Codec::V5(protocol::v5::V5),
        }
    }

    /// The next packet a client sent. Packets only a server sends are refused here, before
    /// the codecs see them: rumqttd's MQTT 5 decoder has no arm for CONNACK or UNSUBACK and
    /// panics on one (`unreachable!`, found by `gateway/fuzz` `sensor_wire`): any sensor
    /// could have stopped the gateway with six bytes.
    pub fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, protocol::Error> {
        if let Some(&first) = buf.first() {
            let kind = first >> 4;
            if SERVER_ONLY.contains(&kind) {
                return Err(protocol::Error::InvalidPacketType(kind));
            }
        }
        match self {
            Codec::V4(c) => c.read_mut(buf, max),
            Codec::V5(c) => c.read_mut(buf, max),
        }
    }

    pub fn write(&self, packet: Packet, buf: &mut BytesMut) -> Result<usize, protocol::Error> {
        match self {
            Codec::V4(c) => c.write(packet, buf),
            Codec::V5(c) => c.write(packet, buf),
        }
    }
}

/// CONNACK, SUBACK, UNSUBACK, PINGRESP: packet types a client never sends.
const SERVER_ONLY: [u8; 4] = [2, 9, 11, 13];

/// `publish` with its QoS, packet id and retain flag replaced.
pub fn publish_with(publish: &Publish, qos: u8, pkid: u16, retain: bool) -> Publish {
    publish_out(publish, qos, pkid, retain, false)
}

/// `publish` as it goes out: QoS, packet id, retain and DUP (a resend) set.
pub fn publish_out(publish: &Publish, qos: u8, pkid: u16, retain: bool, dup: bool) -> Publish {
    let mut raw = BytesMut::with_capacity(5 + publish.topic.len() + publish.payload.len());
    raw.put_u8(0b0011_0000 | u8::from(retain) | (qos.min(2) << 1) | (u8::from(dup) << 3));
    raw.put_u16(pkid);
    raw.put_u16(u16::try_from(publish.topic.len()).unwrap_or(u16::MAX));
    raw.extend_from_slice(&publish.topic);
    raw.extend_from_slice(&publish.payload);
    Publish::deserialize(raw.freeze())
}

/// A publish built from parts.
pub fn publish_from(topic: Bytes, payload: Bytes, qos: u8, retain: bool) -> Publish {
    publish_with(&Publish::new(topic, payload, false), qos, if qos > 0 { 1 } else { 0 }, retain)
}

pub fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::wire;

    fn encode(version: Version, packet: Packet) -> BytesMut {
        let mut buf = BytesMut::new();
        Codec::new(version).write(packet, &mut buf).expect("encodes");
        buf
    }

    /// Each found by the fuzzer; each made rumqttd's MQTT 5 decoder panic.
    #[test]
    fn server_only_packets_from_a_client_are_errors_not_panics() {
        for bytes in
            [&[0xB2u8, 0x02, 0x17, 0xC7, 0x0A, 0x02][..], &[0x20, 0x02, 0x00, 0x00], &[0x90, 0x03, 0, 1, 0]]
        {
            for version in [Version::V4, Version::V5] {
                let mut buf = BytesMut::from(bytes);
                assert!(
                    matches!(
                        Codec::new(version).read(&mut buf, 1024),
                        Err(protocol::Error::InvalidPacketType(_))
                    ),
                    "{version:?} {bytes:02x?}"
                );
            }
        }
    }

    #[test]
    fn a_resend_carries_the_dup_flag() {
        let p = publish_out(&Publish::new("t", "x", false), 1, 9, false, true);
        let buf = encode(Version::V4, Packet::Publish(p, None));
        assert_eq!(buf[0], 0x3a, "PUBLISH, DUP, QoS 1");
        assert_eq!(wire::peek_publish(&buf), Some((1, 9)));
        assert!(wire::publish_dup(&buf));
        // The same bit in another packet type (PUBREL's fixed flags) is no DUP.
        assert!(!wire::publish_dup(&[0x62, 2, 0, 9]));
    }

    #[test]
    fn rebuilt_publishes_round_trip_through_the_codec() {
        let p = publish_with(&Publish::new("t", "payload", false), 1, 7, true);
        let mut buf = encode(Version::V4, Packet::Publish(p.clone(), None));
        match Codec::new(Version::V4).read(&mut buf, 1024).expect("decodes") {
            Packet::Publish(back, _) => {
                assert_eq!(back, p);
                assert!(back.retain);
            }
            other => panic!("{other:?}"),
        }
    }
}
