//! Feeds arbitrary bytes to what reads the upstream's socket (`mqtt::upstream::parse_incoming`), for
//! MQTT 3.1.1 and 5. It must return a packet, ask for more, or fail; never panic, and never
//! consume a packet it did not return.
//!
//! Run: `cd gateway/fuzz && cargo +nightly fuzz run upstream_wire`

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use outpost::config::MqttVersion;
use outpost::mqtt::upstream::parse_incoming;

fuzz_target!(|data: &[u8]| {
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.len();
            match parse_incoming(&mut buf, version) {
                Ok(Some(_)) => assert!(buf.len() < before),
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(_) => break,
            }
        }
    }
});
