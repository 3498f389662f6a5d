//! Mosquitto's ACL file (`auth::acl`) and what it allows clients; the input is
//! `file 0xFF probes` (client id, username, topic filters, a line each).
//!
//! The body is `outpost::fuzz::acl_file`, which `gateway/tests/fuzz_corpus.rs` also runs on every file
//! in `gateway/fuzz/corpus/acl_file` and `gateway/fuzz/regressions/acl_file`. How to run it: ARCHITECTURE.md,
//! "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzz::acl_file(data));
