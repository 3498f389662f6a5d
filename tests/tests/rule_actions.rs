//! Rules a site writes on day one, through the real `outpost` binary to Debian's mosquitto:
//! a payload template with `${..}` expressions sends a command upstream exactly as written, a
//! `dead_letter` action parks events on purpose with its own reason, and one malformed
//! payload that fails three rules makes one dead-letter record naming all three.

use std::time::Duration;

use outpost_e2e::gateway::{GatewaySpec, outpost};
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use serde_json::{Value, json};

/// Generous bound for anything in this test; it takes about a second when healthy.
const TIMEOUT: Duration = Duration::from_secs(30);

const RULES: &str = r#"
[[rule]]
name = "fan"
sql = 'SELECT topic(2) AS device, payload.temp AS temp FROM "sensors/+/temp" WHERE payload.temp > 30'
[[rule.action]]
type = "forward"
topic = "cmd/${upper(device)}/fan"
payload = '''{"cmd":"fan_on","device":"${device}","fahrenheit":${temp * 1.8 + 32}}'''

[[rule]]
name = "quarantine"
sql = 'SELECT topic(2) AS device FROM "sensors/+/temp" WHERE payload.temp IS NULL'
[[rule.action]]
type = "dead_letter"
reason = "no temperature from ${device}"

[[rule]]
name = "strict-a"
payload = "json"
sql = 'SELECT payload.a AS a FROM "strict/#"'
[[rule.action]]
type = "forward"

[[rule]]
name = "strict-b"
payload = "json"
sql = 'SELECT payload.b AS b FROM "strict/#"'
[[rule.action]]
type = "forward"

[[rule]]
name = "strict-c"
payload = "json"
sql = 'SELECT payload.c AS c FROM "strict/#"'
[[rule.action]]
type = "forward"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_templates_and_dead_letter_actions_reach_mosquitto_and_the_store() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).expect("write rules");
    let config = format!(
        "rules = {:?}\n[upstream]\nurl = \"{}\"\ntopic_prefix = \"site-7/\"\n",
        rules.to_str().expect("utf-8 path"),
        upstream.url()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    let readings = [r#"{"temp":31.5}"#, r#"{"humidity":40}"#].map(|p| p.as_bytes().to_vec());
    publish_qos1(gateway.listen(), "s-1", "sensors/d1/temp", readings, TIMEOUT).await.expect("acks");
    publish_qos1(gateway.listen(), "s-2", "strict/x", [b"{broken".to_vec()], TIMEOUT).await.expect("ack");
    subscriber.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    // Stopping drains the dead-letter writer, so the file is complete afterwards.
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let received: Vec<(String, Value)> = subscriber
        .messages()
        .into_iter()
        .map(|(topic, payload)| (topic, serde_json::from_slice(&payload).expect("the template wrote JSON")))
        .collect();
    assert_eq!(
        received,
        [("site-7/cmd/D1/fan".to_owned(), json!({"cmd": "fan_on", "device": "d1", "fahrenheit": 88.7}))]
    );

    let letters = outpost(&["rules", "dead-letters", "--data-dir", data.path().to_str().expect("utf-8")])
        .expect("run outpost rules dead-letters");
    assert_eq!(letters.code, Some(0), "{}", letters.stderr);
    let letters: Vec<Value> =
        letters.stdout.lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect();
    let [parked, broken] = letters.as_slice() else { panic!("two records expected: {letters:#?}") };
    assert_eq!(
        (&parked["topic"], &parked["payload"]),
        (&json!("sensors/d1/temp"), &json!(r#"{"humidity":40}"#))
    );
    assert_eq!(
        parked["rules"],
        json!([{"rule": "quarantine", "reason": "no temperature from d1", "deliberate": true}])
    );
    assert_eq!(
        (&broken["topic"], &broken["payload"], &broken["rule"]),
        (&json!("strict/x"), &json!("{broken"), &json!("strict-a"))
    );
    let rules: Vec<&str> =
        broken["rules"].as_array().expect("rules").iter().filter_map(|r| r["rule"].as_str()).collect();
    assert_eq!(rules, ["strict-a", "strict-b", "strict-c"], "one record for the event, every rule in it");
    assert!(
        broken["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .all(|r| r["reason"].as_str().is_some_and(|reason| reason.contains("not valid JSON"))),
        "{broken}"
    );
}
