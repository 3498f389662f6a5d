//! Replays every committed fuzz input through the function its fuzz target calls
//! (`outpost::fuzz`): the seed corpus in `gateway/fuzz/corpus/<target>/` and each crash
//! reproducer in `gateway/fuzz/regressions/<target>/`. So what the fuzzers found stays fixed on
//! stable Rust, without cargo-fuzz.

use std::path::Path;

/// Replays `target`'s committed inputs through `entry`.
#[track_caller]
fn replay(target: &str, entry: fn(&[u8])) {
    outpost_rules::fuzz::replay_corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz"), target, entry);
}

#[test]
fn sensor_wire() {
    replay("sensor_wire", outpost::fuzz::sensor_wire);
}

#[test]
fn upstream_wire() {
    replay("upstream_wire", outpost::fuzz::upstream_wire);
}

#[test]
fn topic() {
    replay("topic", outpost::fuzz::topic);
}

#[test]
fn config() {
    replay("config", outpost::fuzz::config);
}

#[test]
fn acl_file() {
    replay("acl_file", outpost::fuzz::acl_file);
}

#[test]
fn password_file() {
    replay("password_file", outpost::fuzz::password_file);
}
