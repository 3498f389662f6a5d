//! The gateway as a transparent bridge: what a sensor publishes arrives upstream, exactly.

use std::time::Duration;

use outpost::Gateway;
use outpost::config::{GatewayConfig, UpstreamConfig};
use outpost::metrics::Metrics;
use outpost_e2e::gateway::{GatewaySpec, buffered_events};
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::process::run_to_completion;
use outpost_e2e::upstream::{MOSQUITTO_PUB, Mosquitto, RumqttdUpstream};
use outpost_e2e::{free_addr, require_mosquitto, require_tool};

/// Generous bound for anything in these tests; they take well under a second when healthy.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `(topic, payload as text)` pairs, so a failed comparison prints readably.
fn readable(messages: Vec<(String, Vec<u8>)>) -> Vec<(String, String)> {
    messages
        .into_iter()
        .map(|(topic, payload)| (topic, String::from_utf8_lossy(&payload).into_owned()))
        .collect()
}

/// Starts mosquitto and a gateway on `config(upstream url)`, publishes `count` readings from
/// `device` at QoS 1, stops the gateway with SIGTERM, and checks that every reading arrived
/// upstream on `upstream_topic`, in order, and that the stop was clean.
async fn relays_in_order_and_stops_cleanly(
    config: impl FnOnce(&str) -> String,
    device: &str,
    count: u64,
    upstream_topic: &str,
) {
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml(config(&upstream.url()))
        .start()
        .await
        .expect("start the gateway");

    let payloads: Vec<String> =
        (1..=count).map(|n| format!("{{\"device\":\"{device}\",\"n\":{n}}}")).collect();
    let bytes = payloads.iter().map(|p| p.clone().into_bytes());
    publish_qos1(gateway.listen(), device, &format!("sensors/{device}/temp"), bytes, TIMEOUT)
        .await
        .expect("the gateway acks");
    subscriber.wait_for_count(count, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let expected: Vec<(String, String)> =
        payloads.into_iter().map(|p| (upstream_topic.to_owned(), p)).collect();
    assert_eq!(readable(subscriber.messages()), expected, "topics, payloads and order are exact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_publishes_arrive_at_mosquitto_with_the_topic_prefix() {
    if !require_mosquitto() {
        return;
    }
    let config = |url: &str| format!("[upstream]\nurl = \"{url}\"\ntopic_prefix = \"site-7/\"\n");
    relays_in_order_and_stops_cleanly(config, "s-1", 100, "site-7/sensors/s-1/temp").await;
}

/// `wakeup_coalescing` holds the runtime thread before it sleeps while events come often: the
/// events still all arrive, in order, each acknowledged, and SIGTERM still stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wakeup_coalescing_every_event_arrives_in_order_and_a_stop_is_clean() {
    if !require_mosquitto() {
        return;
    }
    let config = |url: &str| format!("wakeup_coalescing = \"10ms\"\n[upstream]\nurl = \"{url}\"\n");
    relays_in_order_and_stops_cleanly(config, "s-2", 300, "sensors/s-2/temp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_reaches_a_rumqttd_upstream() {
    if !require_tool(MOSQUITTO_PUB, "mosquitto-clients") {
        return;
    }
    let upstream = RumqttdUpstream::start().await.expect("start outpost-sim broker");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).upstream(upstream.url()).start().await.expect("start the gateway");

    let sent = [
        ("plant/line-1/temp", "21.5"),
        ("plant/line-1/status", "{\"state\":\"running\"}"),
        ("plant/line-2/temp", "19.0"),
    ];
    let port = gateway.listen().port().to_string();
    for (topic, message) in sent {
        // mosquitto_pub -q 1 exits 0 only after the gateway's PUBACK.
        let mut command = std::process::Command::new(MOSQUITTO_PUB);
        command.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-i",
            "e2e-mosquitto-pub",
            "-t",
            topic,
            "-m",
            message,
        ]);
        let output = run_to_completion(command).expect("run mosquitto_pub");
        assert!(output.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    subscriber
        .wait_for_count(sent.len() as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", gateway.tail(), upstream.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let expected: Vec<(String, String)> =
        sent.iter().map(|(t, m)| ((*t).to_owned(), (*m).to_owned())).collect();
    assert_eq!(readable(subscriber.messages()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_gateway_relays_and_shuts_down_cleanly() {
    if !require_mosquitto() {
        return;
    }
    const N: u64 = 200;
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let mut config = GatewayConfig::default();
    config.broker.listen = free_addr();
    config.data_dir = data.path().to_path_buf();
    config.upstream = Some(UpstreamConfig::with_url(upstream.url().parse().expect("a valid upstream url")));
    let listen = config.broker.listen;
    let gateway = Gateway::start(config).await.expect("the gateway starts");
    let metrics = gateway.metrics().clone();

    let payloads = (1..=N).map(|n| format!("reading {n}").into_bytes());
    publish_qos1(listen, "in-process-1", "sensors/in-process-1/temp", payloads, TIMEOUT).await.expect("acks");
    subscriber.wait_for_count(N, TIMEOUT).await.expect("every reading arrives upstream");

    assert!(gateway.shutdown().await, "shutdown finished within shutdown_timeout");
    let counters = metrics.counters();
    let (ingested, accepted, acked) = (
        Metrics::get(&counters.ingested),
        Metrics::get(&counters.accepted),
        Metrics::get(&counters.upstream_acked),
    );
    assert_eq!(
        (ingested, accepted, acked),
        (N, N, N),
        "ingested, accepted, upstream_acked: {:?}",
        counters.snapshot()
    );
    assert_eq!(subscriber.count(), N, "no duplicates without a reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_upstream_events_are_buffered() {
    const N: u64 = 50;
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("start the gateway");

    let payloads = (1..=N).map(|n| format!("reading {n}").into_bytes());
    publish_qos1(gateway.listen(), "lonely-1", "sensors/lonely-1/temp", payloads, TIMEOUT)
        .await
        .expect("acks");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let warnings = gateway.messages("no upstream configured");
    assert_eq!(warnings.len(), 1, "the missing upstream is reported exactly once: {warnings:?}");
    assert_eq!(warnings[0]["level"], "WARN", "{}", warnings[0]);
    let buffered = buffered_events(data.path()).expect("buffer stats");
    assert_eq!(buffered, N, "every acknowledged event is in the buffer\n{}", gateway.tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_acks_keeps_every_acknowledged_event() {
    // Enough events that some are still inside the embedded broker when SIGTERM arrives.
    const N: u64 = 10_000;
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("start the gateway");

    let payloads = (1..=N).map(|n| format!("reading {n}").into_bytes());
    publish_qos1(gateway.listen(), "burst-1", "sensors/burst-1/temp", payloads, TIMEOUT).await.expect("acks");
    // Every event is acknowledged to the sensor; a graceful stop must keep all of them.
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());

    let counters = gateway.final_counters().expect("final counters");
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    assert_eq!((count("ingested"), count("accepted")), (N, N), "ingested and accepted: {counters:?}");
    let buffered = buffered_events(data.path()).expect("buffer stats");
    assert_eq!(buffered, N, "every acknowledged event is in the buffer: {counters:?}");
}
