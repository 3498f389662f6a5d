//! CBOR payloads as the rule engine decodes them (`payload = "cbor"`, auto-detection), and
//! their CBOR and JSON encodings.
//!
//! The body is `outpost_rules::fuzz::payload_cbor`, which `rules/tests/fuzz_corpus.rs` also runs on
//! every file in `rules/fuzz/corpus/payload_cbor` and `rules/fuzz/regressions/payload_cbor`. How to run it:
//! ARCHITECTURE.md, "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_rules::fuzz::payload_cbor(data));
