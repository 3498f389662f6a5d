//! Feeds arbitrary bytes to what reads a sensor's socket: the CONNECT version sniffing, the
//! PUBLISH header peek, and rumqttd's MQTT 3.1.1 and 5 decoders behind `Codec`. Anything a
//! sensor sends must decode, ask for more, or fail: the daemon aborts on any panic (a dropped
//! ticket would acknowledge an event, see `cli::abort_on_panic`), so a panic here would let
//! one sensor stop the gateway.
//!
//! Run: `cd gateway/fuzz && cargo +nightly fuzz run sensor_wire`

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use outpost::mqtt::codec::{self, Codec, Version};

fuzz_target!(|data: &[u8]| {
    let _ = codec::connect_version(data);
    for version in [Version::V4, Version::V5] {
        let mut codec = Codec::new(version);
        let mut buf = BytesMut::from(data);
        // Each packet is peeked before it is decoded, as the connection does.
        while !buf.is_empty() {
            let _ = codec::peek_publish(&buf);
            if codec.read(&mut buf, 64 * 1024).is_err() {
                break;
            }
        }
    }
});
