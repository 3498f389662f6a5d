//! EMQX's event topics as rule sources, through the real `outpost` binary to Debian's
//! mosquitto: rules on `$events/client_connected`/`client_disconnected` (with `clientid`,
//! `peerhost`, `reason` and `metadata.rule_id`) and `$events/session_subscribed` forward
//! upstream what sensors did — one sensor that subscribes and then drops its socket
//! (`tcp_closed`), one (mosquitto_pub) that publishes and disconnects (`normal`) — while a
//! rule on `#` sees the publish only, and `/metrics` counts the events apart from `unrouted`.

use std::time::Duration;

use outpost_e2e::free_addr;
use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::http::{Scrape, Value as Sample, scrape};
use outpost_e2e::mqtt::{Session, Subscriber};
use outpost_e2e::raw::{connect_v311, read_packet, subscribe_v311};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::{Mosquitto, mosquitto_pub_with};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

/// Generous bound for anything in this test; it takes a few seconds when healthy.
const TIMEOUT: Duration = Duration::from_secs(30);

const RULES: &str = r##"
[[rule]]
name = "presence"
sql = '''SELECT event, clientid, peerhost, reason, metadata.rule_id AS rule
         FROM "$events/client_connected", "$events/client_disconnected"'''
[[rule.action]]
type = "forward"
topic = "gw/presence/${clientid}"

[[rule]]
name = "subscriptions"
sql = 'SELECT clientid, topic AS filter, qos FROM "$events/session_subscribed"'
[[rule.action]]
type = "forward"
topic = "gw/subs/${clientid}"

[[rule]]
name = "messages"
sql = 'SELECT clientid, topic FROM "#"'
[[rule.action]]
type = "forward"
topic = "gw/m/${clientid}"
"##;

fn counter(scrape: &Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .and_then(|s| match s.value {
            Sample::Counter(v) | Sample::Gauge(v) | Sample::Untyped(v) => Some(v),
            _ => None,
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_see_sensors_come_and_go() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "gw/#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).expect("write rules");
    let http = free_addr();
    let config = format!(
        "rules = {:?}\n[http]\nlisten = \"{http}\"\n[upstream]\nurl = \"{}\"\n",
        rules.to_str().expect("utf-8 path"),
        upstream.url()
    );
    let mut gateway =
        GatewaySpec::new(dir.path()).config_toml(config).start().await.expect("start the gateway");
    let listen = gateway.listen();
    let fail = |what: &str, e: anyhow::Error, gateway: &outpost_e2e::gateway::GatewayProcess| -> ! {
        panic!("{what}: {e:#}\n{}", gateway.tail())
    };

    // A sensor that subscribes, then goes away without a DISCONNECT.
    let mut socket = tokio::net::TcpStream::connect(listen).await.expect("connect");
    socket.write_all(&connect_v311("s-raw", 30)).await.expect("CONNECT");
    let (connack, _) = read_packet(&mut socket).await.expect("CONNACK");
    assert_eq!(connack >> 4, 2, "CONNACK");
    socket.write_all(&subscribe_v311(1, "alerts/#", 1)).await.expect("SUBSCRIBE");
    let (suback, _) = read_packet(&mut socket).await.expect("SUBACK");
    assert_eq!(suback >> 4, 9, "SUBACK");
    subscriber
        .wait_for_count(2, TIMEOUT)
        .await
        .unwrap_or_else(|e| fail("connected, subscribed", e, &gateway));
    drop(socket);
    subscriber.wait_for_count(3, TIMEOUT).await.unwrap_or_else(|e| fail("tcp_closed", e, &gateway));

    // A sensor that publishes and disconnects.
    mosquitto_pub_with(listen, "sensors/a", r#"{"t":1}"#, 1, false, &["-i", "s-pub"]).expect("publish");
    subscriber.wait_for_count(6, TIMEOUT).await.unwrap_or_else(|e| fail("s-pub", e, &gateway));

    let (_, metrics) = scrape(http, None).await.unwrap_or_else(|e| fail("scrape", e, &gateway));
    assert_eq!(
        counter(&metrics, "outpost_client_events_total"),
        5.0,
        "connected ×2, subscribed, disconnected ×2"
    );
    assert_eq!(counter(&metrics, "outpost_client_events_dropped_total"), 0.0);
    assert_eq!(counter(&metrics, "outpost_events_unrouted_total"), 0.0);

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let mut received: Vec<(String, Value)> = subscriber
        .messages()
        .into_iter()
        .map(|(topic, payload)| (topic, serde_json::from_slice(&payload).expect("the rule wrote JSON")))
        .collect();
    received.sort_by_key(|(topic, payload)| (topic.clone(), payload.to_string()));
    let host = listen.ip().to_string();
    let presence = |id: &str, event: &str, reason: Value| {
        (
            format!("gw/presence/{id}"),
            json!({"event": event, "clientid": id, "peerhost": host, "reason": reason, "rule": "presence"}),
        )
    };
    let mut expected = vec![
        presence("s-raw", "client.connected", Value::Null),
        presence("s-raw", "client.disconnected", json!("tcp_closed")),
        ("gw/subs/s-raw".to_owned(), json!({"clientid": "s-raw", "filter": "alerts/#", "qos": 1})),
        presence("s-pub", "client.connected", Value::Null),
        presence("s-pub", "client.disconnected", json!("normal")),
        ("gw/m/s-pub".to_owned(), json!({"clientid": "s-pub", "topic": "sensors/a"})),
    ];
    expected.sort_by_key(|(topic, payload)| (topic.clone(), payload.to_string()));
    assert_eq!(received, expected);
}

/// A publish the broker drops reaches a rule on `$events/message_dropped` with its topic,
/// payload and reason: here an MQTT 5 publish whose topic has more levels than
/// `broker.max_topic_levels` (refused alone with PUBACK 0x90, the connection kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_sees_a_dropped_publish() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "gw/#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    let rule = r#"
[[rule]]
name = "dropped"
sql = 'SELECT clientid, topic, payload, qos, reason FROM "$events/message_dropped"'
[[rule.action]]
type = "forward"
topic = "gw/dropped/${clientid}"
"#;
    std::fs::write(&rules, rule).expect("write rules");
    let config = format!(
        "rules = {:?}\n[broker]\nmax_topic_levels = 3\n[upstream]\nurl = \"{}\"\n",
        rules.to_str().expect("utf-8 path"),
        upstream.url()
    );
    let mut gateway =
        GatewaySpec::new(dir.path()).config_toml(config).start().await.expect("start the gateway");
    // mosquitto_pub reports the refusal; what matters here is what the rule saw.
    let _ = mosquitto_pub_with(
        gateway.listen(),
        "a/b/c/d",
        "too deep",
        1,
        false,
        &["-V", "mqttv5", "-i", "deep"],
    );
    subscriber
        .wait_for_count(1, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("the dropped event: {e:#}\n{}", gateway.tail()));
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let received: Vec<(String, Value)> = subscriber
        .messages()
        .into_iter()
        .map(|(topic, payload)| (topic, serde_json::from_slice(&payload).expect("the rule wrote JSON")))
        .collect();
    assert_eq!(
        received,
        [(
            "gw/dropped/deep".to_owned(),
            json!({"clientid": "deep", "topic": "a/b/c/d", "payload": "too deep", "qos": 1, "reason": "topic_name_invalid"})
        )]
    );
}
