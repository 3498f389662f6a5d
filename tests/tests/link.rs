//! A bad upstream link never costs an acknowledged event: an upstream that is down at boot, a
//! link that flaps, and a host that accepts TCP but never answers MQTT.

use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::{FlakyLink, Mosquitto, SilentUpstream};
use outpost_sim::fleet::{FleetConfig, run_fleet};
use rumqttc::QoS;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Whether a log line is a failed upstream connection attempt whose error contains `needle`.
fn connect_failure(log: &Value, needle: &str) -> bool {
    log["message"].as_str().is_some_and(|m| m.starts_with("cannot connect upstream"))
        && log["error"].as_str().is_some_and(|e| e.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_at_boot_gets_everything_once_it_starts() {
    if !require_mosquitto() {
        return;
    }
    const N: usize = 500;
    // The upstream's port is reserved, but nothing listens: the gateway starts with it down.
    let mut upstream = Mosquitto::not_started().expect("prepare mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let config = format!("[upstream]\nurl = \"{}\"\nreconnect_max = \"1s\"\n", upstream.url());
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    gateway
        .wait_for_log("a refused upstream connection", TIMEOUT, |log| {
            connect_failure(log, "connection refused")
        })
        .await
        .expect("the gateway reports the refused connection");

    let payloads: Vec<String> = (1..=N).map(|n| format!("boot reading {n}")).collect();
    let bytes = payloads.iter().map(|p| p.clone().into_bytes());
    publish_qos1(gateway.listen(), "boot-1", "sensors/boot-1/temp", bytes, TIMEOUT).await.expect("acked");

    // Freeze the gateway while the upstream comes up and the subscriber connects, so the
    // subscriber is certainly there before the gateway's next reconnect attempt.
    gateway.signal(libc::SIGSTOP).expect("stop the gateway");
    upstream.start_again().await.expect("start mosquitto");
    let subscribed = Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await;
    gateway.signal(libc::SIGCONT).expect("resume the gateway");
    let mut subscriber = subscribed.expect("subscribe");
    subscriber
        .wait_for_count(N as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", gateway.tail(), upstream.tail()));
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());

    let received: Vec<String> =
        subscriber.messages().into_iter().map(|(_, p)| String::from_utf8_lossy(&p).into_owned()).collect();
    assert_eq!(received, payloads, "every reading, once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_link_loses_nothing() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await.expect("subscribe");
    // Up 2 s, down 2 s, for the 30 s the fleet runs (the flapping scenario); the
    // subscriber connects to the upstream directly.
    let link = FlakyLink::start(upstream.addr(), Duration::from_secs(2), Duration::from_secs(2))
        .await
        .expect("start the flaky link");
    let data = tempfile::tempdir().expect("tempdir");
    let config = format!("[upstream]\nurl = \"{}\"\nreconnect_max = \"500ms\"\n", link.url());
    // Each connection's end is logged at debug level only (the log follows the upstream's
    // state, not every connection): turned on here to count the cuts.
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml(config)
        .env("RUST_LOG", "info,outpost::uplink=debug")
        .start()
        .await
        .expect("start the gateway");

    let fleet_config = FleetConfig {
        broker: gateway.listen().to_string(),
        sensors: 10,
        rate_per_sensor: 50.0,
        duration: Some(Duration::from_secs(30)),
        qos: QoS::AtLeastOnce,
        client_prefix: "flap-".to_owned(),
        ..FleetConfig::default()
    };
    let summary = run_fleet(fleet_config, CancellationToken::new()).await.expect("the fleet runs");
    assert!(summary.acked > 5_000, "{} acked of {} sent", summary.acked, summary.sent);
    let report = subscriber
        .wait_for_expected(&summary, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let cuts = gateway.messages("upstream connection ended").len();
    // Connections that last 2 s never prove the upstream healthy: one outage, one warning.
    let warnings = gateway.messages("upstream connection lost").len();
    println!(
        "flapping link: {cuts} connections cut; fleet acked {}; upstream received {} (unique {}, duplicates {}, reordered {})",
        summary.acked, report.received, report.unique, report.duplicates, report.reordered
    );
    assert!(cuts >= 5, "the link really flapped: {cuts} cut connections");
    assert_eq!(warnings, 1, "a flapping link is one state change, not one warning per cut");
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(
        report.reordered, 0,
        "resends after a reconnect start at the oldest unacknowledged: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_answers_is_reported_and_events_are_kept() {
    const N: u64 = 100;
    let silent = SilentUpstream::start().await.expect("start the silent upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let config =
        format!("[upstream]\nurl = \"{}\"\nconnect_timeout = \"1s\"\nreconnect_max = \"1s\"\n", silent.url());
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    let payloads = (1..=N).map(|n| format!("reading {n}").into_bytes());
    publish_qos1(gateway.listen(), "silent-1", "sensors/silent-1/temp", payloads, TIMEOUT)
        .await
        .expect("the gateway keeps accepting while the upstream hangs");
    let failure = gateway
        .wait_for_log("a `no CONNACK` connection failure", TIMEOUT, |log| connect_failure(log, "no CONNACK"))
        .await
        .expect("the log says what failed");
    println!("reported: {failure}");
    assert!(silent.accepted() >= 1, "the gateway reached the host");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    assert!(count("upstream_failures") >= 1, "{counters:?}");
    assert_eq!(count("upstream_connects"), 0, "{counters:?}");
    assert!(count("committed") >= N, "every event went to disk: {counters:?}");
    let stopped = gateway.messages("relay stopped").pop().expect("a `relay stopped` line");
    assert_eq!(stopped["buffered_events"], N, "all {N} events stay buffered: {stopped}");
}

/// An MQTT 3.1.1 upstream cannot refuse one event; mosquitto closes the connection over a
/// packet above its `max_packet_size`, and that event would come first again after every
/// reconnect. With the limit stated in `upstream.max_packet_size`, the oversize event is
/// counted and skipped, and the link never drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_stated_upstream_limit_is_skipped_not_resent_forever() {
    if !require_mosquitto() {
        return;
    }
    const N: usize = 200;
    let upstream = Mosquitto::start_with("max_packet_size 2000\n").await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let config = format!("[upstream]\nurl = \"{}\"\nmax_packet_size = \"2000B\"\n", upstream.url());
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    gateway.wait_for_message("connected upstream", TIMEOUT).await.expect("the uplink connects");
    let payloads: Vec<Vec<u8>> = (0..N)
        .map(|n| if n == N / 2 { vec![b'x'; 5000] } else { format!("reading {n}").into_bytes() })
        .collect();
    publish_qos1(gateway.listen(), "big-1", "sensors/big-1/temp", payloads.clone(), TIMEOUT)
        .await
        .expect("acked");
    subscriber
        .wait_for_count(N as u64 - 1, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", gateway.tail(), upstream.tail()));
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());

    let received: Vec<Vec<u8>> = subscriber.messages().into_iter().map(|(_, payload)| payload).collect();
    let expected: Vec<Vec<u8>> = payloads.into_iter().filter(|p| p.len() < 5000).collect();
    assert!(received == expected, "every small event once, in order: got {} messages", received.len());
    let counters = gateway.final_counters().expect("final counters");
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    assert_eq!(
        (count("upstream_rejected"), count("upstream_failures"), count("upstream_connects")),
        (1, 0, 1),
        "the oversize event was skipped and the link never dropped: {counters:?}"
    );
    assert!(!gateway.messages("an event is larger than the upstream accepts").is_empty());
}
