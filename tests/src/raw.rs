//! Hand-encoded MQTT packets, for clients that must do what a client library will not: stop
//! reading on purpose (a stalled subscriber), write as fast as the socket takes with no window
//! of their own (publishers under backpressure), or send what rumqttc refuses to (an MQTT 5
//! keepalive of 0, a packet over the broker's maximum).
//!
//! Only the wire format those clients share lives here: strings, the remaining length, a whole
//! packet, the MQTT 3.1.1 CONNECT they all send, and reading one packet back. Each client builds
//! its other packets from these pieces.
//!
//! # Invariants
//! - Nothing here waits on the clock: a read waits on the socket, and the caller bounds it.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The CONNECT flags of a clean session (3.1.1) or clean start (5) with no will, username or
/// password.
const CLEAN_SESSION: u8 = 0b0000_0010;

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
    connect(4, client_id, keep_alive_secs, &[])
}

/// An MQTT 5 CONNECT with a clean start, no properties and no will or credentials.
pub fn connect_v5(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
    connect(5, client_id, keep_alive_secs, &[0])
}

/// A CONNECT for protocol `level`; `properties` is empty for 3.1.1 and the encoded property
/// block for 5.
fn connect(level: u8, client_id: &str, keep_alive_secs: u16, properties: &[u8]) -> Vec<u8> {
    let mut variable = Vec::with_capacity(client_id.len() + 16);
    put_str(&mut variable, "MQTT");
    variable.push(level);
    variable.push(CLEAN_SESSION);
    variable.extend_from_slice(&keep_alive_secs.to_be_bytes());
    variable.extend_from_slice(properties);
    put_str(&mut variable, client_id);
    packet(0x10, &variable)
}

/// Reads one whole packet: its first byte and the rest after the remaining length. End of file,
/// even before a packet starts, is an `UnexpectedEof` error, so a closed connection needs no
/// case of its own.
pub async fn read_packet(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<(u8, Vec<u8>)> {
    let first_byte = stream.read_u8().await?;
    let mut length = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = stream.read_u8().await?;
        length |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            let mut rest = vec![0u8; length];
            stream.read_exact(&mut rest).await?;
            return Ok((first_byte, rest));
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

    #[tokio::test]
    async fn read_packet_returns_what_packet_wrote() {
        let rest = vec![7u8; 300];
        let written = packet(0x32, &rest);
        assert_eq!(read_packet(&mut written.as_slice()).await.expect("a packet"), (0x32, rest));
        let closed = read_packet(&mut [].as_slice()).await.expect_err("end of file");
        assert_eq!(closed.kind(), io::ErrorKind::UnexpectedEof);
    }
}
