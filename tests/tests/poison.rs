//! Issue #20 §3, the poison event: one event the upstream refuses by closing the connection
//! must not stall the uplink, nor the acknowledged events behind it.
//!
//! - Topics Debian's mosquitto 2.0.11 closes the connection over (control characters,
//!   non-characters, too many levels) are refused at ingest: MQTT 5 gets PUBACK 0x90 and keeps
//!   its connection, MQTT 3.1.1 is disconnected exactly as mosquitto disconnects it.
//! - An event that passes ingest (validation relaxed in the config) but that mosquitto closes
//!   the uplink over ends in the dead letters, while every event behind it arrives upstream —
//!   live, and from the buffer after a restart of the gateway.
//! - An upstream link that is cut again and again while events flow dead-letters nothing.

use std::net::SocketAddr;
use std::time::Duration;

use outpost_e2e::gateway::{GatewaySpec, buffered_events, message_starts_with};
use outpost_e2e::http::{Scrape, sample, scrape_until};
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::raw::{connect_v5, connect_v311, publish_v5, publish_v311, read_packet};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use outpost_sim::flaky::{LinkShaping, run_switched_link};
use outpost_sim::fleet::{FleetConfig, run_fleet};
use rumqttc::QoS;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Topics mosquitto 2.0.11 closes the connection over, with the counter Outpost counts each in.
fn refused_topics() -> Vec<(String, &'static str)> {
    vec![
        ("a\u{1}b".to_owned(), "topics_refused_control"),
        ("a\tb".to_owned(), "topics_refused_control"),
        ("a\u{7f}b".to_owned(), "topics_refused_control"),
        ("a\u{85}b".to_owned(), "topics_refused_control"),
        ("a\u{ffff}b".to_owned(), "topics_refused_noncharacter"),
        ("a\u{fdd0}b".to_owned(), "topics_refused_noncharacter"),
        (vec!["l"; 202].join("/"), "topics_refused_levels"),
    ]
}

/// A 202-level topic: mosquitto closes the connection over it (it takes at most 201).
fn too_deep() -> String {
    format!("deep/{}", vec!["l"; 201].join("/"))
}

async fn connected(addr: SocketAddr, connect: Vec<u8>) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&connect).await.expect("write CONNECT");
    let (kind, body) = tokio::time::timeout(TIMEOUT, read_packet(&mut stream))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(kind, 0x20, "a CONNACK");
    assert_eq!(body.get(1), Some(&0), "connection accepted");
    stream
}

/// What a broker does with a QoS 1 publish to `topic` from an MQTT 3.1.1 client: its
/// PUBACK's first byte, or `None` when it closes the connection.
async fn v311_answer(addr: SocketAddr, topic: &str) -> Option<u8> {
    let mut stream = connected(addr, connect_v311("probe-311", 30)).await;
    stream.write_all(&publish_v311(topic, 1, 1, false, b"x")).await.expect("write PUBLISH");
    match tokio::time::timeout(TIMEOUT, read_packet(&mut stream)).await.expect("an answer or a close") {
        Ok((kind, _)) => Some(kind),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_the_upstream_refuses_are_refused_at_ingest_per_protocol() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber = Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .upstream(upstream.url())
        .config_toml("[broker]\nmax_topic_levels = 201\n")
        .start()
        .await
        .expect("start the gateway");

    let mut expected: std::collections::BTreeMap<&str, u64> = Default::default();
    for (topic, counter) in refused_topics() {
        // MQTT 3.1.1 has no refusal code: Outpost closes the connection, as mosquitto does.
        assert_eq!(v311_answer(upstream.addr(), &topic).await, None, "mosquitto closes over {topic:?}");
        assert_eq!(v311_answer(gateway.listen(), &topic).await, None, "Outpost closes over {topic:?}");

        // MQTT 5: PUBACK 0x90 (Topic Name invalid), and the connection goes on.
        let mut stream = connected(gateway.listen(), connect_v5("probe-5", 30)).await;
        let mut both = publish_v5(&topic, 1, 7, &[], b"bad");
        both.extend(publish_v5("ok/after-refusal", 1, 8, &[], b"good"));
        stream.write_all(&both).await.expect("write PUBLISHes");
        for (pkid, reason) in [(7u8, 0x90u8), (8, 0x00)] {
            let (kind, body) = tokio::time::timeout(TIMEOUT, read_packet(&mut stream))
                .await
                .expect("in time")
                .expect("PUBACK");
            assert_eq!(kind, 0x40, "a PUBACK for {topic:?}");
            assert_eq!(body[..2], [0, pkid], "in arrival order");
            assert_eq!(body.get(2).copied().unwrap_or(0), reason, "packet {pkid} after {topic:?}");
        }
        *expected.entry(counter).or_default() += 2;
    }
    // A QoS 0 publish to such a topic is discarded; the connection goes on.
    let mut stream = connected(gateway.listen(), connect_v5("probe-5-qos0", 30)).await;
    let mut both = publish_v5("a\u{1}qos0", 0, 0, &[], b"bad");
    both.extend(publish_v5("ok/after-qos0", 1, 9, &[], b"good"));
    stream.write_all(&both).await.expect("write PUBLISHes");
    let (kind, body) =
        tokio::time::timeout(TIMEOUT, read_packet(&mut stream)).await.expect("in time").expect("PUBACK");
    assert_eq!((kind, &body[..2], body.get(2).copied().unwrap_or(0)), (0x40, &[0u8, 9][..], 0));
    *expected.entry("topics_refused_control").or_default() += 1;

    let good = refused_topics().len() as u64 + 1;
    subscriber.wait_for_count(good, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert!(
        subscriber.messages().iter().all(|(topic, _)| topic.starts_with("ok/")),
        "only the good events went upstream: {:?}",
        subscriber.messages()
    );
    let warning = gateway
        .wait_for_message("refused a publish whose topic the upstream brokers refuse", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(warning["client_id"], "probe-5", "{warning}");
    assert_eq!(warning["topic"], "a\\u{1}b", "the topic is escaped: {warning}");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    for (name, n) in expected {
        assert_eq!(counters.get(name), Some(&n), "{name}: {counters:?}");
    }
    assert_eq!(
        counters.get("upstream_failures"),
        None,
        "nothing reached the upstream to upset it: {counters:?}"
    );
}

/// Reads the dead-letter file.
fn dead_letters(data_dir: &std::path::Path) -> Vec<Value> {
    outpost_e2e::gateway::upstream_dead_letters(data_dir).unwrap_or_else(|e| panic!("{e:#}"))
}

fn assert_the_poison_letter(data_dir: &std::path::Path, topic: &str) {
    let letters = dead_letters(data_dir);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["topic"], topic);
    assert_eq!(letter["payload"], "poison", "the payload is kept: {letter}");
    assert!(letter["event_id"].as_u64().is_some_and(|id| id > 0), "{letter}");
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("closed the connection right after this event 3 times in a row"), "{letter}");
}

/// A 202-level topic passes ingest with `max_topic_levels` relaxed; mosquitto closes the uplink
/// every time it arrives. Acknowledged good events queued behind it all arrive upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_and_every_event_behind_it_arrives() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "good/#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let http = outpost_e2e::free_addr();
    let config = format!(
        "[broker]\nmax_topic_levels = 1000\n[http]\nlisten = \"{http}\"\n[upstream]\nurl = \"{}\"\nreconnect_max = \"200ms\"\n",
        upstream.url()
    );
    let mut gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start");
    let gauge = |scrape: &Scrape| sample(scrape, "outpost_dead_letters_upstream_bytes", &[]);
    let before = scrape_until(http, "the dead letters' gauge", TIMEOUT, |s| gauge(s).is_some())
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(gauge(&before), Some(0.0), "no file yet");

    let poison = too_deep();
    publish_qos1(gateway.listen(), "poisoner", &poison, [b"poison".to_vec()], TIMEOUT)
        .await
        .expect("the gateway acknowledges the poison event (committed)");
    let good: Vec<Vec<u8>> = (0..50).map(|i| format!("{{\"n\":{i}}}").into_bytes()).collect();
    publish_qos1(gateway.listen(), "good-sensor", "good/temp", good.clone(), TIMEOUT)
        .await
        .expect("good events are acknowledged");
    subscriber.wait_for_count(50, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let payloads: Vec<Vec<u8>> = subscriber.messages().into_iter().map(|(_, p)| p).collect();
    for payload in &good {
        assert!(payloads.contains(payload), "{} arrived", String::from_utf8_lossy(payload));
    }
    let warning = gateway
        .wait_for_message("the upstream closed the connection right after the same event", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(warning["closes_in_row"], 3, "{warning}");
    // The letter is the event's only copy, and the file is never shrunk by the gateway: its
    // size is served for the fleet to alert on, and follows the operator deleting it.
    let path = data.path().join("dead-letters-upstream.jsonl");
    let held = scrape_until(http, "the letter's bytes", TIMEOUT, |s| gauge(s).is_some_and(|b| b > 0.0))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let on_disk = std::fs::metadata(&path).expect("the durable dead-letter file").len();
    assert_eq!(gauge(&held), Some(on_disk as f64), "the gauge is the file's size");
    let kept = std::fs::read(&path).expect("read the letters");
    std::fs::remove_file(&path).expect("the operator deletes the file");
    scrape_until(http, "the gauge back at 0", TIMEOUT, |s| gauge(s) == Some(0.0))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    std::fs::write(&path, kept).expect("put the letters back for the checks below");
    println!(
        "poison dead-lettered after {} upstream outage warnings (quick losses fold into one); {} good events arrived",
        gateway.messages("upstream connection lost").len(),
        subscriber.count()
    );
    // Live traffic still flows after the poison left.
    publish_qos1(gateway.listen(), "good-sensor", "good/late", [b"late".to_vec()], TIMEOUT)
        .await
        .expect("ack");
    subscriber.wait_for_count(51, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("upstream_poison"), Some(&1), "{counters:?}");
    assert_the_poison_letter(data.path(), &poison);
    assert_eq!(buffered_events(data.path()).expect("buffer stats"), 0, "the poison left the buffer");
}

/// The poison and the good events are in the buffer when the gateway restarts (the upstream
/// was down): after the restart the poison is dead-lettered and the good events arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_in_the_buffer_is_dead_lettered_after_a_restart() {
    if !require_mosquitto() {
        return;
    }
    let mut upstream = Mosquitto::not_started().expect("mosquitto config");
    let data = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[broker]\nmax_topic_levels = 1000\n[upstream]\nurl = \"{}\"\nreconnect_max = \"200ms\"\n",
        upstream.url()
    );
    let spec = GatewaySpec::new(data.path()).config_toml(config);
    let mut gateway = spec.clone().start().await.expect("start");
    let poison = too_deep();
    publish_qos1(gateway.listen(), "poisoner", &poison, [b"poison".to_vec()], TIMEOUT).await.expect("ack");
    let good: Vec<Vec<u8>> = (0..30).map(|i| format!("{{\"n\":{i}}}").into_bytes()).collect();
    publish_qos1(gateway.listen(), "good-sensor", "good/temp", good, TIMEOUT).await.expect("acks");
    gateway.terminate().await.expect("the gateway stops");
    assert_eq!(buffered_events(data.path()).expect("stats"), 31, "all in the buffer, poison first");

    upstream.start_again().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "good/#", Session::Clean).await.expect("subscribe");
    let mut gateway = spec.start().await.expect("restart on the same buffer");
    subscriber.wait_for_count(30, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    gateway
        .wait_for_message("the upstream closed the connection right after the same event", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    assert_eq!(gateway.final_counters().expect("counters").get("upstream_poison"), Some(&1));
    assert_the_poison_letter(data.path(), &poison);
    assert_eq!(buffered_events(data.path()).expect("stats"), 0);
}

/// The link to mosquitto is cut five times while a fleet publishes, through a proxy with 20 ms
/// of latency each way, so every cut finds publishes in flight: each loss is an upstream close
/// with events unacknowledged, and none of them may be blamed. mosquitto stays up, so its
/// subscriber can account for every acknowledged reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_upstream_dead_letters_nothing() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await.expect("subscribe");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
    let proxy = listener.local_addr().expect("proxy address");
    let (switch, up) = tokio::sync::watch::channel(true);
    let cancel = CancellationToken::new();
    let shaping = LinkShaping { extra_latency: Duration::from_millis(20), bytes_per_sec: None };
    tokio::spawn(run_switched_link(listener, upstream.addr(), up, shaping, cancel.clone()));
    let _stop_proxy = cancel.drop_guard();

    let data = tempfile::tempdir().expect("tempdir");
    let config = format!("[upstream]\nurl = \"mqtt://{proxy}\"\nreconnect_max = \"200ms\"\n");
    // Each connection's end is logged at debug level only (the log follows the upstream's
    // state); turned on here to see each cut noticed.
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml(config)
        .env("RUST_LOG", "info,outpost::uplink=debug")
        .start()
        .await
        .expect("start");
    let fleet = tokio::spawn(run_fleet(
        FleetConfig {
            broker: gateway.listen().to_string(),
            sensors: 10,
            rate_per_sensor: 50.0,
            duration: Some(Duration::from_secs(12)),
            qos: QoS::AtLeastOnce,
            client_prefix: "flap-".to_owned(),
            ..FleetConfig::default()
        },
        CancellationToken::new(),
    ));
    for round in 1..=5u64 {
        // Traffic flows on this connection before it is cut.
        subscriber
            .wait_for_count(round * 800, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("traffic before cut {round}: {e:#}\n{}", gateway.tail()));
        switch.send_replace(false);
        let mut losses = 0;
        gateway
            .wait_for_log("the cut noticed", TIMEOUT, |log| {
                losses += u64::from(message_starts_with(log, "upstream connection ended"));
                losses == round
            })
            .await
            .unwrap_or_else(|e| {
                let lost = gateway.messages("upstream connection ended").len();
                let connected = gateway.messages("upstream connection made").len();
                panic!("cut {round}: {e:#}\nlosses {lost}, connections {connected}")
            });
        switch.send_replace(true);
    }
    let summary = fleet.await.expect("fleet task").expect("fleet");
    let report = subscriber
        .wait_for_expected(&summary, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(report.missing, 0, "every acknowledged reading arrived: {report:?}");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("counters");
    println!(
        "flapping upstream: fleet sent {} acked {}, upstream received {} (duplicates {}); gateway counters: {counters:?}",
        summary.sent, summary.acked, report.received, report.duplicates
    );
    assert!(counters.get("upstream_failures").copied().unwrap_or(0) >= 5, "{counters:?}");
    // The cuts found publishes in flight (they were sent again): the case the blame rule must
    // not mistake for a poison.
    assert!(counters.get("upstream_resent").copied().unwrap_or(0) >= 5, "{counters:?}");
    assert_eq!(counters.get("upstream_poison"), None, "nothing blamed: {counters:?}");
    assert!(dead_letters(data.path()).is_empty(), "no dead letters");
    assert_eq!(buffered_events(data.path()).expect("stats"), 0, "everything was acknowledged upstream");
}
