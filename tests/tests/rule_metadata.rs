//! EMQX's message metadata in rules, through the real `outpost` binary to Debian's
//! mosquitto: a sensor's MQTT 5 publish (mosquitto_pub, with a username, a user property and
//! the retain flag) reaches a rule that reads `peerhost`, `username`, `flags.retain` and
//! `pub_props.'User-Property'`, and the rule's forward arrives upstream with them.

use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::{Mosquitto, mosquitto_pub_with};
use serde_json::{Value, json};

/// Generous bound for anything in this test; it takes about a second when healthy.
const TIMEOUT: Duration = Duration::from_secs(30);

const RULES: &str = r#"
[[rule]]
name = "by-site"
sql = '''SELECT peerhost, username, flags.retain AS retain, pub_props.'User-Property'.site AS site, payload.temp AS temp
         FROM "sensors/#" WHERE pub_props.'User-Property'.site IS NOT NULL'''
[[rule.action]]
type = "forward"
topic = "sites/${site}/temp"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_reads_peerhost_username_flags_and_a_user_property() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sites/#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).expect("write rules");
    let config = format!(
        "rules = {:?}\n[upstream]\nurl = \"{}\"\n",
        rules.to_str().expect("utf-8 path"),
        upstream.url()
    );
    let mut gateway =
        GatewaySpec::new(dir.path()).config_toml(config).start().await.expect("start the gateway");

    let listen = gateway.listen();
    // Without the property first: the rule's WHERE must turn it away.
    let v5 = ["-V", "mqttv5"];
    mosquitto_pub_with(listen, "sensors/d0/temp", r#"{"temp":20}"#, 1, false, &v5).expect("publish");
    // No password file: the broker takes the name the client sends, and rules read it.
    let with_site = ["-V", "mqttv5", "-u", "plc-7", "-D", "publish", "user-property", "site", "plant-a"];
    mosquitto_pub_with(listen, "sensors/d1/temp", r#"{"temp":21.5}"#, 1, true, &with_site).expect("publish");
    subscriber.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let received: Vec<(String, Value)> = subscriber
        .messages()
        .into_iter()
        .map(|(topic, payload)| (topic, serde_json::from_slice(&payload).expect("the rule wrote JSON")))
        .collect();
    let peer = listen.ip().to_string();
    assert_eq!(
        received,
        [(
            "sites/plant-a/temp".to_owned(),
            json!({"peerhost": peer, "username": "plc-7", "retain": true, "site": "plant-a", "temp": 21.5})
        )]
    );
}

/// A will is its client's last publish: rules see the connection's `peerhost` in it as in
/// any other publish of that client (it used to be NULL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_reads_the_peerhost_of_a_will() {
    use outpost_e2e::raw::connect_v311_with_will;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "gone/#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"wills\"\nsql = '''SELECT peerhost, clientid FROM \"lwt/#\"'''\n\
         [[rule.action]]\ntype = \"forward\"\ntopic = \"gone/${clientid}\"\n",
    )
    .expect("write rules");
    let config = format!(
        "rules = {:?}\n[upstream]\nurl = \"{}\"\n",
        rules.to_str().expect("utf-8 path"),
        upstream.url()
    );
    let mut gateway =
        GatewaySpec::new(dir.path()).config_toml(config).start().await.expect("start the gateway");
    let listen = gateway.listen();

    let mut sensor = tokio::net::TcpStream::connect(listen).await.expect("connect");
    sensor.write_all(&connect_v311_with_will("pump-3", 30, "lwt/pump-3", b"offline")).await.expect("CONNECT");
    let mut connack = [0u8; 4];
    tokio::time::timeout(TIMEOUT, sensor.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "accepted");
    // Gone without DISCONNECT: the will is published.
    drop(sensor);
    subscriber.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let received: Vec<(String, Value)> = subscriber
        .messages()
        .into_iter()
        .map(|(topic, payload)| (topic, serde_json::from_slice(&payload).expect("the rule wrote JSON")))
        .collect();
    assert_eq!(
        received,
        [("gone/pump-3".to_owned(), json!({"peerhost": listen.ip().to_string(), "clientid": "pump-3"}))]
    );
}
