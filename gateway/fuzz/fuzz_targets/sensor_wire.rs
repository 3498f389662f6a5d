//! Feeds arbitrary bytes to what reads a sensor's socket: the fixed header and its variable
//! byte integer, the CONNECT version sniffing and the PUBLISH header peek (`mqtt::wire`), and
//! rumqttd's MQTT 3.1.1 and 5 decoders behind `mqtt::codec::Codec`. Anything a sensor sends
//! must decode, ask for more, or fail: the daemon aborts on any panic (a dropped ticket would
//! acknowledge an event, see `cli::abort_on_panic`), so a panic here would let one sensor stop
//! the gateway.
//!
//! Run: `cd gateway/fuzz && cargo +nightly fuzz run sensor_wire`

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use outpost::mqtt::codec::Codec;
use outpost::mqtt::wire::{self, Version};

fuzz_target!(|data: &[u8]| {
    let _ = wire::connect_version(data);
    let _ = wire::fixed_header(data);
    // A variable byte integer read back re-encodes to the same value, in at most the bytes it
    // took (a sensor may pad one; we never do).
    if let Ok(Some((value, used))) = wire::read_varint(data) {
        let mut out = BytesMut::new();
        wire::put_varint(&mut out, value);
        assert!(out.len() <= used && out.len() == wire::varint_len(value), "{value} in {used} bytes");
        assert_eq!(wire::read_varint(&out), Ok(Some((value, out.len()))));
    }
    for version in [Version::V4, Version::V5] {
        let mut codec = Codec::new(version);
        let mut buf = BytesMut::from(data);
        // Each packet is peeked before it is decoded, as the connection does.
        while !buf.is_empty() {
            let _ = wire::peek_publish(&buf);
            if codec.read(&mut buf, 64 * 1024).is_err() {
                break;
            }
        }
    }
});
