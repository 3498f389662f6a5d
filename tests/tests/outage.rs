//! An upstream outage in the middle of steady traffic: nothing acknowledged is lost, and what
//! arrives is in order per sensor.
//!
//! The upstream is a real mosquitto that is stopped (SIGTERM) and started again on the same
//! port. Its subscriber keeps a persistent session, which mosquitto saves on SIGTERM, so the
//! subscriber itself loses nothing across the restart: any missing reading was lost by the
//! gateway.

use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber, unique_client_id};
use outpost_e2e::upstream::Mosquitto;
use outpost_e2e::{require_mosquitto, wait_until};
use outpost_sim::fleet::{FleetConfig, run_fleet};
use rumqttc::QoS;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SENSORS: usize = 50;
const RATE_PER_SENSOR: f64 = 20.0;
/// How long the fleet publishes.
const TRAFFIC: Duration = Duration::from_secs(30);
/// The upstream goes down once this many readings (about 8 s of traffic) arrived upstream.
const ARRIVED_BEFORE_OUTAGE: u64 = 8 * 1000;
/// The upstream comes back this long after the fleet started (down for about 12 s).
const UPSTREAM_BACK_AT: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outage_loses_nothing_and_keeps_order() {
    if !require_mosquitto() {
        return;
    }
    let mut upstream = Mosquitto::start().await.expect("start mosquitto");
    let session = Session::Persistent(unique_client_id("outage-sub"));
    let mut subscriber = Subscriber::start(upstream.addr(), "sensors/#", session).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    // Commit settings stay at their defaults. reconnect_max is lowered so the gateway notices
    // the returning upstream within a second instead of up to 30 s.
    let config = format!("[upstream]\nurl = \"{}\"\nreconnect_max = \"1s\"\n", upstream.url());
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    let fleet_config = FleetConfig {
        broker: gateway.listen().to_string(),
        sensors: SENSORS,
        rate_per_sensor: RATE_PER_SENSOR,
        duration: Some(TRAFFIC),
        qos: QoS::AtLeastOnce,
        client_prefix: "outage-".to_owned(),
        ..FleetConfig::default()
    };
    let fleet_started = Instant::now();
    let fleet = tokio::spawn(run_fleet(fleet_config, CancellationToken::new()));

    subscriber
        .wait_for_count(ARRIVED_BEFORE_OUTAGE, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("traffic before the outage: {e:#}\n{}", gateway.tail()));
    let outage_at = fleet_started.elapsed();
    upstream.stop().await.expect("stop mosquitto");
    gateway
        .wait_for_message("upstream connection lost", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("the gateway notices the outage: {e:#}"));
    // The schedule is part of the scenario: the upstream stays down until this point of the
    // fleet's run, while the fleet keeps publishing.
    tokio::time::sleep_until(fleet_started + UPSTREAM_BACK_AT).await;
    // Freeze the gateway while the upstream restarts and the subscriber reconnects to its saved
    // session, so deliveries never race that reconnect (mosquitto's redelivery to a resuming
    // session is not what this test is about). The fleet just waits a moment for its acks.
    let connects_before = subscriber.connects();
    gateway.signal(libc::SIGSTOP).expect("freeze the gateway");
    upstream.start_again().await.expect("start mosquitto again on the same port");
    let reconnected =
        wait_until("the subscriber reconnected", TIMEOUT, || subscriber.connects() > connects_before).await;
    gateway.signal(libc::SIGCONT).expect("resume the gateway");
    reconnected.unwrap_or_else(|e| panic!("the subscriber reconnects to the returned upstream: {e:#}"));
    let back_at = fleet_started.elapsed();
    gateway
        .wait_for_log("a reconnect to the returned upstream", TIMEOUT, |log| {
            log["message"] == "connected upstream" && log["generation"].as_u64().is_some_and(|g| g > 1)
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

    let summary = fleet.await.expect("the fleet task").expect("the fleet runs");
    assert!(
        summary.acked > 25_000,
        "the fleet published steadily: {} acked of {} sent",
        summary.acked,
        summary.sent
    );
    let report = subscriber
        .wait_for_expected(&summary, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    println!(
        "outage from {outage_at:?} to {back_at:?}: fleet sent {} acked {}; upstream received {} \
         (unique {}, duplicates {}, reordered {}, missing {}), latency p50 {:?} ms p99 {:?} ms max {:?} ms",
        summary.sent,
        summary.acked,
        report.received,
        report.unique,
        report.duplicates,
        report.reordered,
        report.missing,
        report.latency_ms_p50,
        report.latency_ms_p99,
        report.latency_ms_max
    );
    assert_eq!(report.missing, 0, "every acknowledged reading arrived: {report:?}");
    assert_eq!(report.malformed, 0, "{report:?}");
    // The relay sends each priority in sequence order and, after a reconnect, starts again at
    // the oldest unacknowledged event: resends are duplicates, never a first arrival out of
    // order.
    assert_eq!(report.reordered, 0, "readings arrive in order per sensor: {report:?}");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    println!("gateway counters: {counters:?}");
    assert!(counters.get("upstream_failures").copied().unwrap_or(0) >= 1, "{counters:?}");
}
