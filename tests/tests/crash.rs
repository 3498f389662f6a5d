//! A gateway killed (SIGKILL) while holding a large backlog loses at most its documented crash
//! window, and a restarted gateway relays the rest and drains its buffer.

use std::time::Duration;

use outpost_e2e::gateway::{GatewaySpec, buffered_events};
use outpost_e2e::mqtt::{Session, Subscriber};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use outpost_sim::fleet::{FleetConfig, run_fleet};
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

const SENSORS: usize = 50;
const READINGS_PER_SENSOR: u64 = 2_100;
/// Per sensor: 3,000 readings/s in all, about what an unoptimised (debug) gateway sustains next
/// to the fleet on two cores. Faster, and ingest falls behind rumqttd's ring, which drops
/// acknowledged events before the gateway ever sees them (counted as `ingest_lost`; rumqttd
/// acknowledges a publish as soon as it is in memory). That loss is not the crash window.
const RATE_PER_SENSOR: f64 = 60.0;
/// The gateway's default `buffer.commit_max_events`.
const COMMIT_MAX_EVENTS: u64 = 1_000;
/// Capacity of each channel between the gateway's stages (`outpost::STAGE_CHANNEL_CAPACITY`).
const STAGE_CHANNEL: u64 = 1_024;
/// Events rumqttd hands the ingest link in one batch (`max_outgoing_packet_count`).
const BROKER_BATCH: u64 = 200;
/// The most acknowledged events a SIGKILL may lose: two commit batches in the relay (one being
/// written, one filling), the two bounded channels before it (ingest → route → relay), and one
/// batch rumqttd has handed to the ingest link.
const CRASH_WINDOW: u64 = 2 * COMMIT_MAX_EVENTS + 2 * STAGE_CHANNEL + BROKER_BATCH;
const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_at_most_the_crash_window_and_restart_drains_the_rest() {
    if !require_mosquitto() {
        return;
    }
    assert_eq!(STAGE_CHANNEL as usize, outpost::STAGE_CHANNEL_CAPACITY, "the bound follows the gateway");
    // The upstream's port is reserved, but nothing listens yet: the gateway buffers everything.
    let mut upstream = Mosquitto::not_started().expect("prepare mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).upstream(upstream.url()).start().await.expect("start the gateway");

    let fleet_config = FleetConfig {
        broker: gateway.listen().to_string(),
        sensors: SENSORS,
        rate_per_sensor: RATE_PER_SENSOR,
        count_per_sensor: Some(READINGS_PER_SENSOR),
        qos: QoS::AtLeastOnce,
        client_prefix: "crash-".to_owned(),
        ..FleetConfig::default()
    };
    let started = std::time::Instant::now();
    let summary = run_fleet(fleet_config, CancellationToken::new()).await.expect("the fleet runs");
    let took = started.elapsed();
    assert!(
        summary.acked >= 100_000,
        "the gateway acknowledged {} of {} readings",
        summary.acked,
        summary.sent
    );

    // The crash: every reading is acknowledged, the gateway gets no chance to flush.
    gateway.kill().expect("SIGKILL the gateway");
    // Loss the gateway detected and counted before the crash: ingest fell behind rumqttd's ring.
    let ingest_lost =
        gateway.messages("ingest fell behind").last().and_then(|log| log["lost_total"].as_u64()).unwrap_or(0);
    println!(
        "fleet: {} sent, {} acked in {took:?} ({:.0}/s); ingest_lost before the crash: {ingest_lost}",
        summary.sent,
        summary.acked,
        summary.acked as f64 / took.as_secs_f64(),
    );

    upstream.start_again().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await.expect("subscribe");
    let mut gateway =
        GatewaySpec::new(data.path()).upstream(upstream.url()).start().await.expect("restart the gateway");
    let opened = gateway.wait_for_message("buffer opened", TIMEOUT).await.expect("the buffer log line");
    let recovered = opened["buffered_events"].as_u64().expect("buffered_events in the `buffer opened` line");
    subscriber
        .wait_for_unique(recovered, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("the restarted gateway relays its buffer: {e:#}\n{}", gateway.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let report = subscriber.report(Some(&summary));
    let lost = report.missing;
    println!(
        "after the restart: {recovered} events recovered from the buffer, {} arrived upstream ({} unique, {} duplicates); \
         lost in the crash: {lost} of {} acknowledged (bound {CRASH_WINDOW})",
        report.received, report.unique, report.duplicates, summary.acked
    );
    assert_eq!(report.malformed, 0, "{report:?}");
    assert_eq!(
        ingest_lost, 0,
        "ingest fell behind the broker's ring before the crash and acknowledged events were dropped; \
         the machine could not sustain {RATE_PER_SENSOR} readings/s per sensor"
    );
    assert!(
        lost <= CRASH_WINDOW,
        "lost {lost} acknowledged readings, more than the crash window: {report:?}"
    );
    let left = buffered_events(data.path()).expect("buffer stats after the final stop");
    assert_eq!(left, 0, "the buffer drained");
}
