//! The rule engine inside the running gateway, over real TCP: a rules file filters, enriches
//! and routes events to a real upstream broker (a second rumqttd); a republish reaches an
//! actuator subscribed on the gateway's own broker; a broken rules file is rejected while the
//! running rules stay, and a fixed one is picked up without a restart.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost::config::{GatewayConfig, UpstreamConfig, UpstreamUrl};
use outpost::metrics::Metrics;
use outpost_sim::verify::{Subscriber, start_subscriber};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const TIMEOUT: Duration = Duration::from_secs(20);

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Publishes at QoS 1 and waits for every PUBACK.
async fn publish(addr: SocketAddr, messages: &[(&str, &str)]) {
    let mut opts = MqttOptions::new("rules-e2e-sensor", "127.0.0.1", addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    for (topic, payload) in messages {
        client.publish(*topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec()).await.expect("queue");
    }
    let mut acked = 0;
    while acked < messages.len() {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("sensor connection") {
            acked += 1;
        }
    }
}

/// Polls a condition on the gateway's counters, bounded by `timeout`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The upstream messages as (topic, JSON with the volatile `ts` removed), sorted.
fn upstream_messages(sub: &Subscriber) -> Vec<(String, serde_json::Value)> {
    let mut messages: Vec<(String, serde_json::Value)> = sub
        .received_messages()
        .into_iter()
        .map(|(topic, payload)| {
            let mut json: serde_json::Value = serde_json::from_slice(&payload).expect("JSON upstream");
            if let Some(obj) = json.as_object_mut() {
                obj.remove("ts");
            }
            (topic, json)
        })
        .collect();
    messages.sort_by(|a, b| a.0.cmp(&b.0));
    messages
}

struct Setup {
    gateway: outpost::Gateway,
    listen: SocketAddr,
    upstream: Subscriber,
    _data: tempfile::TempDir,
}

async fn start(rules: PathBuf) -> Setup {
    let upstream_addr = free_addr();
    outpost_sim::broker::spawn_broker(upstream_addr, None).expect("upstream rumqttd");
    let upstream = start_subscriber(&upstream_addr.to_string(), "#").await.expect("upstream subscriber");
    let data = tempfile::tempdir().expect("tempdir");
    let listen = free_addr();
    let mut config = GatewayConfig { data_dir: data.path().to_owned(), ..Default::default() };
    config.broker.listen = listen;
    config.rules = Some(rules);
    config.upstream =
        Some(UpstreamConfig::with_url(UpstreamUrl { host: "127.0.0.1".into(), port: upstream_addr.port() }));
    let gateway = outpost::Gateway::start(config).await.expect("gateway starts");
    Setup { gateway, listen, upstream, _data: data }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_filter_enrich_route_and_republish() {
    let mut s = start(examples().join("rules.toml")).await;
    let mut actuator = start_subscriber(&s.listen.to_string(), "actuators/#").await.expect("actuator");
    publish(
        s.listen,
        &[
            ("sensors/s-0001/temp", r#"{"temp":25}"#),    // telemetry only
            ("sensors/s-0001/temp", r#"{"temp":31.5}"#),  // over s-0001's limit of 30
            ("sensors/s-0003/temp", r#"{"humidity":3}"#), // no temp: filtered out
            ("debug/s-0001/trace", r#"{"x":1}"#),         // dropped by rule
        ],
    )
    .await;
    s.upstream.wait_for(3, TIMEOUT).await.expect("three upstream messages");
    actuator.wait_for(1, TIMEOUT).await.expect("the fan command");
    let counters = s.gateway.metrics().counters();
    wait_until("the debug event is dropped", || Metrics::get(&counters.rules_dropped) == 1).await;

    let site_a = |device: &str, temp: serde_json::Value| serde_json::json!({"device": device, "site": "plant-a", "line": "l1", "temp": temp});
    assert_eq!(
        upstream_messages(&s.upstream),
        vec![
            (
                "sites/plant-a/alerts/s-0001".to_owned(),
                serde_json::json!({"device": "s-0001", "site": "plant-a", "temp": 31.5, "max_temp": 30})
            ),
            ("sites/plant-a/telemetry/s-0001".to_owned(), site_a("s-0001", serde_json::json!(25))),
            ("sites/plant-a/telemetry/s-0001".to_owned(), site_a("s-0001", serde_json::json!(31.5))),
        ]
    );
    let fan = actuator.received_messages();
    assert_eq!(fan.len(), 1);
    assert_eq!(fan[0].0, "actuators/s-0001/fan");
    assert_eq!(Metrics::get(&counters.republished), 1);
    assert!(s.gateway.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_rules_file_is_rejected_and_a_fixed_one_is_applied_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    let version = |topic: &str| {
        format!(
            "[[rule]]\nname = \"fwd\"\nsql = 'SELECT payload.v AS v FROM \"in/#\"'\n[[rule.action]]\ntype = \"forward\"\ntopic = \"{topic}\"\n"
        )
    };
    std::fs::write(&rules, version("out/v1")).expect("write rules");
    let mut s = start(rules.clone()).await;
    let counters = s.gateway.metrics().counters();

    publish(s.listen, &[("in/a", r#"{"v":1}"#)]).await;
    s.upstream.wait_for(1, TIMEOUT).await.expect("v1 output");

    std::fs::write(&rules, "[[rule]]\nname = \"fwd\"\nsql = 'SELECT FROM WHERE'\n").expect("break rules");
    wait_until("the broken file is rejected", || Metrics::get(&counters.rules_reload_failures) >= 1).await;
    publish(s.listen, &[("in/a", r#"{"v":2}"#)]).await;
    s.upstream.wait_for(2, TIMEOUT).await.expect("the running rules stayed");

    std::fs::write(&rules, version("out/v2")).expect("fix rules");
    wait_until("the fixed file is applied", || Metrics::get(&counters.rules_reloads) >= 1).await;
    publish(s.listen, &[("in/a", r#"{"v":3}"#)]).await;
    s.upstream.wait_for(3, TIMEOUT).await.expect("v2 output");

    let topics: Vec<String> = s.upstream.received_messages().into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, vec!["out/v1", "out/v1", "out/v2"]);
    assert!(s.gateway.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_goes_to_the_dead_letter_store_and_other_rules_still_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[rule]]
name = "strict-json"
payload = "json"
sql = 'SELECT payload.v AS v FROM "in/#"'
[[rule.action]]
type = "forward"
topic = "out/json"

[[rule]]
name = "raw-copy"
sql = 'SELECT * FROM "in/#"'
[[rule.action]]
type = "forward"
topic = "out/raw"
format = "raw"
"#,
    )
    .expect("write rules");
    let mut s = start(rules).await;
    publish(s.listen, &[("in/a", "definitely { not json")]).await;
    s.upstream.wait_for(1, TIMEOUT).await.expect("the other rule still ran");
    let counters = s.gateway.metrics().counters();
    wait_until("the failure is counted", || Metrics::get(&counters.dead_letters) == 1).await;
    let received = s.upstream.received_messages();
    assert_eq!(received, vec![("out/raw".to_owned(), b"definitely { not json".to_vec())]);

    // Visible through the CLI while the gateway runs (the writer is asynchronous).
    let data_dir = s._data.path().to_str().expect("utf8").to_owned();
    let mut letters = String::new();
    wait_until("the dead letter is on disk", || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["rules", "dead-letters", "--data-dir", &data_dir])
            .output()
            .expect("run outpost");
        letters = String::from_utf8_lossy(&out.stdout).into_owned();
        !letters.is_empty()
    })
    .await;
    let letter: serde_json::Value = serde_json::from_str(letters.trim()).expect("one JSON line");
    assert_eq!(letter["rule"], "strict-json");
    assert_eq!(letter["topic"], "in/a");
    assert_eq!(letter["payload"], "definitely { not json");
    assert!(letter["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(s.gateway.shutdown().await);
}
