//! Arbitrary bytes to what reads the upstream's socket (`mqtt::upstream::parse_incoming`).
//!
//! The body is `outpost::fuzz::upstream_wire`, which `gateway/tests/fuzz_corpus.rs` also runs on every file
//! in `gateway/fuzz/corpus/upstream_wire` and `gateway/fuzz/regressions/upstream_wire`. How to run it: ARCHITECTURE.md,
//! "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzz::upstream_wire(data));
