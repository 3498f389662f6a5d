//! Arbitrary bytes to what reads a sensor's socket: `mqtt::wire` and rumqttd's MQTT 3.1.1 and 5
//! decoders behind `mqtt::codec::Codec`.
//!
//! The body is `outpost::fuzz::sensor_wire`, which `gateway/tests/fuzz_corpus.rs` also runs on every file
//! in `gateway/fuzz/corpus/sensor_wire` and `gateway/fuzz/regressions/sensor_wire`. How to run it: ARCHITECTURE.md,
//! "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzz::sensor_wire(data));
