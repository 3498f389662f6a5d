//! A config file's text to a validated `GatewayConfig` (parse, then validate).
//!
//! The body is `outpost::fuzz::config`, which `gateway/tests/fuzz_corpus.rs` also runs on every file
//! in `gateway/fuzz/corpus/config` and `gateway/fuzz/regressions/config`. How to run it: ARCHITECTURE.md,
//! "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzz::config(data));
