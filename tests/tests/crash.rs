//! **Acknowledged means safe.** QoS 1 sensors publish through the gateway while the upstream
//! is down, so everything they are acknowledged for must be on disk; the gateway is SIGKILLed
//! mid-stream, while the sensors are still sending (and events sit in its commit batches),
//! then the upstream comes up and the gateway is restarted on the same address. The sensors
//! reconnect and carry on. Every reading a sensor saw acknowledged must arrive upstream: 0
//! lost. Duplicates (acknowledged upstream, not yet deleted from the buffer, or sent again by
//! a sensor whose PUBACK the crash swallowed) are counted, not lost.
//!
//! Run with `broker.ack = "on_receipt"` instead, this test fails: the readings acknowledged
//! from the last commit window before the kill are missing.
//!
//! The second test does the same with the upstream up behind a slow link (150 ms round trip):
//! events then wait up to `buffer.max_ack_delay` for their upstream PUBACK instead of being
//! committed, and each sensor's PUBACK is released by whichever comes first. The kill lands
//! with hundreds of events in flight upstream and in memory; every acknowledged one arrives.

use std::sync::Arc;
use std::time::Duration;

use outpost_e2e::gateway::{GatewaySpec, buffered_events};
use outpost_e2e::mqtt::{Session, Subscriber};
use outpost_e2e::upstream::{Mosquitto, SwitchedLink};
use outpost_e2e::{require_mosquitto, wait_until};
use outpost_sim::flaky::LinkShaping;
use outpost_sim::fleet::{FleetConfig, FleetProgress, run_fleet_with_progress};
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

const SENSORS: usize = 50;
const READINGS_PER_SENSOR: u64 = 1_200;
/// 3,000 readings/s in all: well within what a debug build sustains on two cores, so the
/// kill lands while every sensor is mid-stream.
const RATE_PER_SENSOR: f64 = 60.0;
/// The kill comes once this many readings are acknowledged (about a third of the run).
const KILL_AFTER_ACKED: u64 = 20_000;
const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_reading() {
    if !require_mosquitto() {
        return;
    }
    // The upstream's port is reserved, but nothing listens yet: the gateway buffers everything.
    let mut upstream = Mosquitto::not_started().expect("prepare mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).upstream(upstream.url()).start().await.expect("start the gateway");
    let listen = gateway.listen();

    let fleet_config = FleetConfig {
        broker: listen.to_string(),
        sensors: SENSORS,
        rate_per_sensor: RATE_PER_SENSOR,
        count_per_sensor: Some(READINGS_PER_SENSOR),
        qos: QoS::AtLeastOnce,
        client_prefix: "crash-".to_owned(),
        ..FleetConfig::default()
    };
    let progress = Arc::new(FleetProgress::default());
    let fleet =
        tokio::spawn(run_fleet_with_progress(fleet_config, CancellationToken::new(), Arc::clone(&progress)));

    // The fleet's progress is plain atomics (no notification on its hot path), and this only
    // picks the moment of the kill: the verdict does not depend on when exactly that is.
    wait_until("the sensors are mid-stream", TIMEOUT, || progress.acked() >= KILL_AFTER_ACKED)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    gateway.kill().expect("SIGKILL the gateway");
    let acked_at_kill = progress.acked();

    upstream.start_again().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await.expect("subscribe");
    let mut spec = GatewaySpec::new(data.path()).upstream(upstream.url());
    spec.listen = listen;
    let mut gateway = spec.start().await.expect("restart the gateway on the same address");
    let opened = gateway.wait_for_message("buffer opened", TIMEOUT).await.expect("the buffer log line");
    let recovered = opened["buffered_events"].as_u64().unwrap_or(0);

    let summary = tokio::time::timeout(TIMEOUT, fleet)
        .await
        .expect("the fleet finishes after the restart")
        .expect("fleet task")
        .expect("the fleet runs");
    assert!(summary.acked > acked_at_kill, "the sensors carried on after the restart: {summary:?}");
    let report = subscriber
        .wait_for_expected(&summary, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("every acknowledged reading arrives upstream: {e:#}\n{}", gateway.tail()));
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    println!(
        "killed after {acked_at_kill} acknowledged; {recovered} events recovered from the buffer; \
         fleet: {} sent, {} acknowledged; upstream: {} received, {} unique, {} duplicates, {} missing",
        summary.sent, summary.acked, report.received, report.unique, report.duplicates, report.missing
    );
    assert_eq!(report.malformed, 0, "{report:?}");
    assert_eq!(report.missing, 0, "acknowledged readings lost in the crash: {report:?}");
    assert!(recovered >= acked_at_kill, "the buffer held every acknowledged reading at the kill");
    let left = buffered_events(data.path()).expect("buffer stats after the final stop");
    assert_eq!(left, 0, "the buffer drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_behind_a_slow_link_loses_no_acknowledged_reading() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let shaping = LinkShaping { extra_latency: Duration::from_millis(75), bytes_per_sec: None };
    let link = SwitchedLink::start_shaped(upstream.addr(), shaping).await.expect("start the slow link");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).upstream(link.url()).start().await.expect("start the gateway");
    let listen = gateway.listen();

    let fleet_config = FleetConfig {
        broker: listen.to_string(),
        sensors: SENSORS,
        rate_per_sensor: RATE_PER_SENSOR,
        count_per_sensor: Some(READINGS_PER_SENSOR),
        qos: QoS::AtLeastOnce,
        client_prefix: "slow-".to_owned(),
        ..FleetConfig::default()
    };
    let progress = Arc::new(FleetProgress::default());
    let fleet =
        tokio::spawn(run_fleet_with_progress(fleet_config, CancellationToken::new(), Arc::clone(&progress)));
    // Only picks the moment of the kill (see the first test).
    wait_until("the sensors are mid-stream", TIMEOUT, || progress.acked() >= KILL_AFTER_ACKED)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    gateway.kill().expect("SIGKILL the gateway");
    let acked_at_kill = progress.acked();

    let mut spec = GatewaySpec::new(data.path()).upstream(link.url());
    spec.listen = listen;
    let mut gateway = spec.start().await.expect("restart the gateway on the same address");
    let summary = tokio::time::timeout(TIMEOUT, fleet)
        .await
        .expect("the fleet finishes after the restart")
        .expect("fleet task")
        .expect("the fleet runs");
    assert!(summary.acked > acked_at_kill, "the sensors carried on after the restart: {summary:?}");
    let report = subscriber
        .wait_for_expected(&summary, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("every acknowledged reading arrives upstream: {e:#}\n{}", gateway.tail()));
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    println!(
        "slow link: killed after {acked_at_kill} acknowledged; fleet: {} sent, {} acknowledged; \
         upstream: {} received, {} unique, {} duplicates, {} missing",
        summary.sent, summary.acked, report.received, report.unique, report.duplicates, report.missing
    );
    assert_eq!(report.malformed, 0, "{report:?}");
    assert_eq!(report.missing, 0, "acknowledged readings lost in the crash: {report:?}");
}
