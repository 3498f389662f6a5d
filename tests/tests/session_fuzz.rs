//! A bounded, seeded run of `outpost-sim session-fuzz` against the real `outpost` binary, with
//! Debian's mosquitto as the upstream: 40 concurrent fuzzed sessions for 20 seconds (both
//! protocol versions, hostile topics, `$share`, takeovers, wrong and missing acks, garbage)
//! must leave the gateway running, acknowledging and relaying the canary, and its memory back
//! within bounds once the clients are gone.
//!
//! The round is the library's (`outpost_sim::session_fuzz`), so a failure prints exactly what
//! the command prints: the finding, its seed and the packets that led to it. Reproduce one with
//! `outpost-sim session-fuzz --seed <seed> --rounds 1 --clients 40 --round-duration 20s`.

use std::time::Duration;

use outpost_e2e::{binary, require_mosquitto, upstream};
use outpost_sim::session_fuzz::{FuzzConfig, run};
use tokio_util::sync::CancellationToken;

/// The seed of the suite's round; any seed must pass, this one is simply fixed.
const SEED: u64 = 20_261_203;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fuzzed_round_finds_nothing() {
    if !require_mosquitto() {
        return;
    }
    let outpost = binary("outpost").expect("the outpost binary");
    let cfg = FuzzConfig {
        rounds: Some(1),
        clients: 40,
        round_duration: Duration::from_secs(20),
        ..FuzzConfig::new(outpost, upstream::MOSQUITTO.into(), SEED)
    };
    let summary = run(&cfg, CancellationToken::new()).await.expect("the fuzzing round ran");
    let reports: Vec<String> = summary
        .per_round
        .iter()
        .flat_map(|round| round.findings.iter().map(|finding| finding.report()))
        .collect();
    assert!(
        reports.is_empty(),
        "the session fuzzer found {} problem(s):\n{}",
        reports.len(),
        reports.join("\n")
    );

    // The round did what it claims, so "no findings" means something.
    let round = &summary.per_round[0];
    assert!(round.connections >= 200 && round.packets >= 5_000, "too little fuzzing: {round:?}");
    assert!(round.canary_acked >= 20, "the canary barely ran: {round:?}");
    assert_eq!(round.canary_relayed, round.canary_acked, "every acknowledged canary arrives upstream");
    // Both memory measurements came after the clients' retained topics and persistent sessions
    // were released, and the gateway answered for every one of them.
    assert_eq!(round.released.len(), 2, "a release before each measurement: {round:?}");
    assert!(
        round.released.iter().all(|r| r.unanswered == 0 && r.retained_cleared > 0 && r.sessions_ended > 0),
        "the releases cleared retained topics and ended sessions: {:?}",
        round.released
    );
}
