//! SIGHUP reloads the rules while a fleet publishes QoS 1 through the real binary: every
//! acknowledged reading still arrives upstream, in order per sensor, and each reload takes
//! effect (the new rules' topic shows up upstream). A rules file with an error, sent the same
//! way in the middle, is refused and the running rules keep relaying.
//!
//! Each generation of the rules forwards every reading unchanged (`format = "raw"`, so the
//! verifier can decode it) under a topic that names the generation, `gen-N/sensors/…`: a
//! reading's topic upstream says which rules the route stage applied to it. The upstream is
//! Debian's mosquitto; its subscriber is `outpost_sim::verify`'s, which accounts for every
//! acknowledged reading by device and sequence number.

use std::path::Path;
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::mqtt::{Session, Subscriber};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use outpost_sim::fleet::{FleetConfig, run_fleet};
use rumqttc::QoS;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SENSORS: usize = 20;
/// 20 × 50 = 1,000 readings/s: steady load, well within what a shared 2-core machine carries
/// alongside the other tests.
const RATE_PER_SENSOR: f64 = 50.0;
/// Rules generations loaded by SIGHUP after the first one (`rules(1)`, loaded at start).
const LAST_GENERATION: u32 = 5;
/// After this generation a broken file is sent; the rules of this generation must stay.
const BROKEN_AFTER: u32 = 3;
/// Readings that arrive upstream under each generation before the next reload (half a second
/// of load), so every reload happens in the middle of traffic.
const PER_GENERATION: u64 = 500;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until `n` more messages arrived upstream.
async fn wait_for_more(subscriber: &mut Subscriber, gateway: &GatewayProcess, n: u64) {
    let target = subscriber.count() + n;
    subscriber.wait_for_count(target, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
}

/// Generation `n` of the rules file: every sensor reading goes upstream as it came, under
/// `gen-<n>/`.
fn rules(generation: u32) -> String {
    format!(
        r#"# generation {generation}
[[rule]]
name = "relay"
sql = 'SELECT * FROM "sensors/#"'
[[rule.action]]
type = "forward"
topic = "gen-{generation}/${{topic}}"
format = "raw"
"#
    )
}

/// A rules file the compiler refuses (a misspelt keyword).
const BROKEN_RULES: &str = r#"[[rule]]
name = "relay"
sql = 'SELEC * FROM "sensors/#"'
[[rule.action]]
type = "forward"
"#;

/// Replaces the rules file the way an operator's deploy tool should: write a sibling, rename it
/// over the old one. The gateway also polls the file every 2 s and must never read half of it.
fn replace_rules(path: &Path, text: &str) {
    let staged = path.with_extension("toml.new");
    std::fs::write(&staged, text).expect("write the new rules");
    std::fs::rename(&staged, path).expect("move the new rules into place");
}

/// Whether a JSON log line is `message` with `reason = "SIGHUP"`.
fn by_sighup(log: &Value, message: &str) -> bool {
    log["message"].as_str().is_some_and(|m| m.starts_with(message)) && log["reason"] == "SIGHUP"
}

/// Sends SIGHUP and waits for the `nth` (1-based) line `message` caused by a SIGHUP. Every
/// line is looked at once, in order, so counting them finds the one this signal caused.
async fn sighup(gateway: &GatewayProcess, message: &str, nth: usize) -> Value {
    gateway.signal(libc::SIGHUP).expect("send SIGHUP");
    let mut seen = 0;
    gateway
        .wait_for_log(&format!("`{message}` #{nth} by SIGHUP"), TIMEOUT, |log| {
            seen += usize::from(by_sighup(log, message));
            seen == nth
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until a message under `gen-<generation>/` arrives upstream after the first `after`
/// messages: the route stage applies that generation now.
async fn wait_for_generation(subscriber: &mut Subscriber, generation: u32, after: usize) {
    let prefix = format!("gen-{generation}/sensors/");
    subscriber
        .wait_for_messages(&format!("a reading under {prefix} after message {after}"), TIMEOUT, |messages| {
            messages.get(after..).is_some_and(|new| new.iter().any(|m| m.topic.starts_with(&prefix)))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_under_load_lose_nothing_and_take_effect() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "+/sensors/#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules_path = dir.path().join("rules.toml");
    replace_rules(&rules_path, &rules(1));
    let config = format!(
        "rules = {:?}\n[upstream]\nurl = \"{}\"\n",
        rules_path.to_str().expect("utf-8 path"),
        upstream.url()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    let fleet_config = FleetConfig {
        broker: gateway.listen().to_string(),
        sensors: SENSORS,
        rate_per_sensor: RATE_PER_SENSOR,
        qos: QoS::AtLeastOnce,
        client_prefix: "reload-".to_owned(),
        ..FleetConfig::default()
    };
    let stop_fleet = CancellationToken::new();
    let fleet = tokio::spawn(run_fleet(fleet_config, stop_fleet.clone()));

    // Readings flowing upstream also prove the rules watcher has installed its SIGHUP handler
    // (the runtime ran it before it ran the route stage's first event), so no signal below can
    // meet the default action, which would end the process.
    wait_for_generation(&mut subscriber, 1, 0).await;
    wait_for_more(&mut subscriber, &gateway, PER_GENERATION).await;

    let mut reloads = 0;
    for generation in 2..=LAST_GENERATION {
        let before = subscriber.messages().len();
        replace_rules(&rules_path, &rules(generation));
        reloads += 1;
        let reloaded = sighup(&gateway, "rules reloaded", reloads).await;
        assert_eq!(reloaded["rules"], 1, "{reloaded}");
        wait_for_generation(&mut subscriber, generation, before).await;
        wait_for_more(&mut subscriber, &gateway, PER_GENERATION).await;

        if generation == BROKEN_AFTER {
            replace_rules(&rules_path, BROKEN_RULES);
            let rejected = sighup(&gateway, "rules file rejected", 1).await;
            let error = rejected["error"].as_str().unwrap_or_default();
            assert!(error.contains("SELEC"), "the rejection names the problem: {rejected}");
            // Still relaying, with the rules that were running.
            let after = subscriber.messages().len();
            wait_for_generation(&mut subscriber, generation, after).await;
            wait_for_more(&mut subscriber, &gateway, PER_GENERATION).await;
        }
    }
    stop_fleet.cancel();
    let summary = fleet.await.expect("the fleet task").expect("the fleet runs");
    assert!(
        summary.acked > PER_GENERATION * u64::from(LAST_GENERATION + 1),
        "the fleet published under load: {} acked of {} sent",
        summary.acked,
        summary.sent
    );

    let report = subscriber
        .wait_for_expected(&summary, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    println!(
        "{} SIGHUP reloads and one refused file under load: fleet sent {} acked {}; upstream received {} \
         (unique {}, duplicates {}, reordered {}, missing {})",
        reloads,
        summary.sent,
        summary.acked,
        report.received,
        report.unique,
        report.duplicates,
        report.reordered,
        report.missing
    );
    assert_eq!(report.missing, 0, "every acknowledged reading arrived: {report:?}");
    assert_eq!(report.malformed, 0, "format = \"raw\" forwards the readings unchanged: {report:?}");
    assert_eq!(report.reordered, 0, "a reload does not reorder a sensor's readings: {report:?}");
    // Every message upstream went through one of the generations, none through broken rules.
    let stray: Vec<String> = subscriber
        .messages()
        .into_iter()
        .map(|(topic, _)| topic)
        .filter(|topic| !(1..=LAST_GENERATION).any(|g| topic.starts_with(&format!("gen-{g}/sensors/"))))
        .take(5)
        .collect();
    assert!(stray.is_empty(), "topics from no generation of the rules: {stray:?}");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    // The 2 s file poll may reload a replaced file before its SIGHUP does, so at least.
    assert!(counters.get("rules_reloads").copied().unwrap_or(0) >= reloads as u64, "{counters:?}");
    assert!(counters.get("rules_reload_failures").copied().unwrap_or(0) >= 1, "{counters:?}");
    for zero in ["unrouted", "dead_letters", "dropped_overflow", "upstream_rejected"] {
        assert_eq!(counters.get(zero).copied().unwrap_or(0), 0, "{zero}: {counters:?}");
    }
}
