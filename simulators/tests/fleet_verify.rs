//! End-to-end checks of the simulators against a real rumqttd: a fleet's acknowledged readings
//! all reach a subscriber, directly and through a flaky link.

use std::net::SocketAddr;
use std::time::Duration;

use outpost_sim::broker::spawn_broker;
use outpost_sim::flaky::{FlakySchedule, run_flaky_link};
use outpost_sim::fleet::{FleetConfig, ValueModel, run_fleet};
use outpost_sim::payload::PayloadFormat;
use outpost_sim::verify::start_subscriber;
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

/// Starts a broker on a free port and returns its address.
fn start_broker() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = probe.local_addr().expect("probe address");
    drop(probe);
    spawn_broker(addr, None).expect("start the broker");
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_reading_arrives() {
    let broker = start_broker();
    let mut subscriber = start_subscriber(&broker.to_string(), "sensors/#").await.expect("subscribe");

    let cfg = FleetConfig {
        broker: broker.to_string(),
        sensors: 3,
        rate_per_sensor: 500.0,
        count_per_sensor: Some(50),
        client_prefix: "direct-".to_string(),
        ..FleetConfig::default()
    };
    let summary = run_fleet(cfg, CancellationToken::new()).await.expect("run the fleet");
    assert_eq!(summary.sent, 150);
    assert_eq!(summary.acked, 150);
    for device in summary.per_device.values() {
        assert_eq!(device.acked_seqs, (1..=50).collect::<Vec<u64>>());
    }
    let (p50, p99, max) =
        (summary.ack_latency_ms_p50, summary.ack_latency_ms_p99, summary.ack_latency_ms_max);
    assert!(p50.is_some_and(|p50| p50 >= 0.0) && p50 <= p99 && p99 <= max, "{p50:?} {p99:?} {max:?}");

    let report = subscriber.wait_for_expected(&summary, Duration::from_secs(10)).await.expect("all arrive");
    assert_eq!((report.unique, report.duplicates, report.reordered, report.malformed), (150, 0, 0, 0));
    let messages = subscriber.messages();
    assert!(
        messages.iter().all(|(topic, _)| topic.starts_with("sensors/direct-0")),
        "{:?}",
        messages.first()
    );
    assert!(messages.iter().all(|(_, payload)| payload.len() == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_counts_written_publishes() {
    let broker = start_broker();
    let cfg = FleetConfig {
        broker: broker.to_string(),
        sensors: 2,
        rate_per_sensor: 500.0,
        count_per_sensor: Some(20),
        qos: QoS::AtMostOnce,
        client_prefix: "qos0-".to_string(),
        ..FleetConfig::default()
    };
    let summary = run_fleet(cfg, CancellationToken::new()).await.expect("run the fleet");
    assert_eq!((summary.sent, summary.acked), (40, 40));
    assert_eq!(summary.ack_latency_ms_p50, None, "QoS 0 has no acks to time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_publishes_as_fast_as_acks_return() {
    let broker = start_broker();
    let mut subscriber = start_subscriber(&broker.to_string(), "sensors/#").await.expect("subscribe");
    // A rate that alone would take 1000 s: only the closed loop can finish in time.
    let cfg = FleetConfig {
        broker: broker.to_string(),
        sensors: 2,
        rate_per_sensor: 1.0,
        count_per_sensor: Some(1000),
        max_outstanding: Some(8),
        client_prefix: "closed-".to_string(),
        ..FleetConfig::default()
    };
    let summary = tokio::time::timeout(Duration::from_secs(30), run_fleet(cfg, CancellationToken::new()))
        .await
        .expect("the closed loop is not paced by the rate")
        .expect("run the fleet");
    assert_eq!((summary.sent, summary.acked), (2000, 2000));
    assert!(summary.ack_latency_ms_p99.is_some());
    let report = subscriber.wait_for_expected(&summary, Duration::from_secs(10)).await.expect("all arrive");
    assert_eq!((report.unique, report.duplicates, report.reordered), (2000, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_readings_survive_a_flaky_link() {
    let broker = start_broker();
    let mut subscriber = start_subscriber(&broker.to_string(), "sensors/#").await.expect("subscribe");

    let cancel = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the link");
    let link = listener.local_addr().expect("link address");
    let schedule = FlakySchedule {
        up_for: Duration::from_millis(400),
        down_for: Duration::from_millis(150),
        extra_latency: Duration::from_millis(2),
    };
    let link_task = tokio::spawn(run_flaky_link(listener, broker, schedule, cancel.clone()));

    let cfg = FleetConfig {
        broker: link.to_string(),
        sensors: 4,
        rate_per_sensor: 200.0,
        duration: Some(Duration::from_secs(2)),
        client_prefix: "flaky-".to_string(),
        ..FleetConfig::default()
    };
    let summary = run_fleet(cfg, cancel.clone()).await.expect("run the fleet");
    cancel.cancel();
    link_task.await.expect("the link task ends");

    assert!(summary.acked > 0 && summary.acked <= summary.sent, "{} of {}", summary.acked, summary.sent);
    let report =
        subscriber.wait_for_expected(&summary, Duration::from_secs(10)).await.expect("all acked arrive");
    assert_eq!(report.malformed, 0);
    eprintln!("sent {} acked {} report {report:?}", summary.sent, summary.acked);
}

#[tokio::test]
async fn waiting_reports_how_many_arrived() {
    let broker = start_broker();
    let mut subscriber = start_subscriber(&broker.to_string(), "nothing/#").await.expect("subscribe");
    let error =
        subscriber.wait_for_count(1, Duration::from_millis(50)).await.expect_err("nothing is published");
    assert!(error.to_string().contains("0 arrived"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor_readings_with_mixed_values_are_verified() {
    let broker = start_broker();
    let mut subscriber = start_subscriber(&broker.to_string(), "sensors/#").await.expect("subscribe");
    let cfg = FleetConfig {
        broker: broker.to_string(),
        sensors: 5,
        rate_per_sensor: 500.0,
        count_per_sensor: Some(30),
        client_prefix: "cbor-".to_string(),
        format: PayloadFormat::Cbor,
        values: ValueModel::Mixed,
        ..FleetConfig::default()
    };
    let summary = run_fleet(cfg, CancellationToken::new()).await.expect("run the fleet");
    assert_eq!(summary.acked, 150);
    let report = subscriber.wait_for_expected(&summary, Duration::from_secs(10)).await.expect("all arrive");
    assert_eq!((report.unique, report.malformed), (150, 0));
    let messages = subscriber.messages();
    assert!(messages.iter().all(|(_, payload)| payload.first().is_some_and(|b| (0xa0..=0xbf).contains(b))));
    assert!(messages.iter().all(|(_, payload)| payload.len() <= 200 && payload.len() >= 196));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_readings_survive_connection_churn() {
    let broker = start_broker();
    let mut subscriber = start_subscriber(&broker.to_string(), "sensors/#").await.expect("subscribe");
    let cfg = FleetConfig {
        broker: broker.to_string(),
        sensors: 3,
        rate_per_sensor: 200.0,
        count_per_sensor: Some(300),
        client_prefix: "churn-".to_string(),
        churn: Some(Duration::from_millis(200)),
        ..FleetConfig::default()
    };
    let summary = run_fleet(cfg, CancellationToken::new()).await.expect("run the fleet");
    assert!(summary.acked > 0 && summary.acked <= summary.sent, "{} of {}", summary.acked, summary.sent);
    let report =
        subscriber.wait_for_expected(&summary, Duration::from_secs(10)).await.expect("all acked arrive");
    assert_eq!(report.malformed, 0);
}

/// A held fleet counts its connections, stops publishing on its token and stays connected
/// (all acknowledged, no more sent) until it is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_fleet_stays_connected_until_cancelled() {
    use std::sync::Arc;

    use outpost_sim::fleet::{FleetProgress, run_fleet_held};
    use outpost_sim::harness::wait_until;

    let broker = start_broker();
    let cfg = FleetConfig {
        broker: broker.to_string(),
        sensors: 4,
        rate_per_sensor: 100.0,
        client_prefix: "held-".to_string(),
        ..FleetConfig::default()
    };
    let progress = Arc::new(FleetProgress::default());
    let (cancel, stop_publishing) = (CancellationToken::new(), CancellationToken::new());
    let fleet =
        tokio::spawn(run_fleet_held(cfg, cancel.clone(), Arc::clone(&progress), stop_publishing.clone()));
    let timeout = Duration::from_secs(10);
    wait_until("4 sensors connected", timeout, || progress.connected() == 4).await.expect("connect");
    wait_until("some readings acknowledged", timeout, || progress.acked() >= 20).await.expect("publish");
    stop_publishing.cancel();
    wait_until("every reading acknowledged", timeout, || progress.acked() == progress.sent())
        .await
        .expect("acks");
    let sent = progress.sent();
    // An observation window, not a synchronisation: a sensor that is not held leaves as soon
    // as its last reading is acknowledged, which was already the case.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!fleet.is_finished(), "a held fleet ended before it was cancelled");
    assert_eq!((progress.sent(), progress.connected()), (sent, 4), "held sensors neither publish nor leave");
    cancel.cancel();
    let summary = fleet.await.expect("the fleet task").expect("run the fleet");
    assert_eq!((summary.sent, summary.acked), (sent, sent));
    assert_eq!(progress.connected(), 0);
}
