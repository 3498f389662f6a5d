//! Replays every committed fuzz input through the function its fuzz target calls
//! (`outpost_rules::fuzz`): the seed corpus in `rules/fuzz/corpus/<target>/` and each crash
//! reproducer in `rules/fuzz/regressions/<target>/`. So what the fuzzers found stays fixed on
//! stable Rust, without cargo-fuzz.

use std::path::Path;

/// Replays `target`'s committed inputs through `entry`.
#[track_caller]
fn replay(target: &str, entry: fn(&[u8])) {
    outpost_rules::fuzz::replay_corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz"), target, entry);
}

#[test]
fn parse_rules() {
    replay("parse_rules", outpost_rules::fuzz::parse_rules);
}

#[test]
fn payload_json() {
    replay("payload_json", outpost_rules::fuzz::payload_json);
}

#[test]
fn payload_cbor() {
    replay("payload_cbor", outpost_rules::fuzz::payload_cbor);
}
