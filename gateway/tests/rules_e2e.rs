//! The rule engine inside the running gateway, over real TCP: a rules file filters, enriches
//! and routes events to a real upstream broker (a second rumqttd); a republish reaches an
//! actuator subscribed on the gateway's own broker; a broken rules file is rejected while the
//! running rules stay, and a fixed one is picked up without a restart. `outpost rules test` (the
//! dry run) prints what the route stage would do with each output.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost::config::{GatewayConfig, UpstreamConfig, UpstreamUrl};
use outpost::metrics::Metrics;
use outpost_sim::harness::{free_addr, wait_until};
use outpost_sim::verify::{Subscriber, start_subscriber};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const TIMEOUT: Duration = Duration::from_secs(20);

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

/// The upstream messages as (topic, JSON with the volatile `ts` removed), sorted.
fn upstream_messages(sub: &Subscriber) -> Vec<(String, serde_json::Value)> {
    let mut messages: Vec<(String, serde_json::Value)> = sub
        .messages()
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
    let upstream_addr = free_addr().expect("a free port");
    outpost_sim::broker::spawn_broker(upstream_addr, None).expect("upstream rumqttd");
    let upstream = start_subscriber(&upstream_addr.to_string(), "#").await.expect("upstream subscriber");
    let data = tempfile::tempdir().expect("tempdir");
    let listen = free_addr().expect("a free port");
    let mut config = GatewayConfig { data_dir: data.path().to_owned(), ..Default::default() };
    config.broker.listen = listen;
    config.rules = Some(rules);
    config.upstream = Some(UpstreamConfig::with_url(UpstreamUrl::plain("127.0.0.1", upstream_addr.port())));
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
    s.upstream.wait_for_count(3, TIMEOUT).await.expect("three upstream messages");
    actuator.wait_for_count(1, TIMEOUT).await.expect("the fan command");
    let counters = s.gateway.metrics().counters();
    wait_until("the debug event is dropped", TIMEOUT, || Metrics::get(&counters.rules_dropped) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

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
    let fan = actuator.messages();
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
    s.upstream.wait_for_count(1, TIMEOUT).await.expect("v1 output");

    std::fs::write(&rules, "[[rule]]\nname = \"fwd\"\nsql = 'SELECT FROM WHERE'\n").expect("break rules");
    wait_until("the broken file is rejected", TIMEOUT, || Metrics::get(&counters.rules_reload_failures) >= 1)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    publish(s.listen, &[("in/a", r#"{"v":2}"#)]).await;
    s.upstream.wait_for_count(2, TIMEOUT).await.expect("the running rules stayed");

    std::fs::write(&rules, version("out/v2")).expect("fix rules");
    wait_until("the fixed file is applied", TIMEOUT, || Metrics::get(&counters.rules_reloads) >= 1)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    publish(s.listen, &[("in/a", r#"{"v":3}"#)]).await;
    s.upstream.wait_for_count(3, TIMEOUT).await.expect("v2 output");

    let topics: Vec<String> = s.upstream.messages().into_iter().map(|(t, _)| t).collect();
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
    s.upstream.wait_for_count(1, TIMEOUT).await.expect("the other rule still ran");
    let counters = s.gateway.metrics().counters();
    wait_until("the failure is counted", TIMEOUT, || Metrics::get(&counters.dead_letters) == 1)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let received = s.upstream.messages();
    assert_eq!(received, vec![("out/raw".to_owned(), b"definitely { not json".to_vec())]);

    // Visible through the CLI while the gateway runs (the writer is asynchronous).
    let data_dir = s._data.path().to_str().expect("utf8").to_owned();
    let mut letters = String::new();
    wait_until("the dead letter is on disk", TIMEOUT, || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["rules", "dead-letters", "--data-dir", &data_dir])
            .output()
            .expect("run outpost");
        letters = String::from_utf8_lossy(&out.stdout).into_owned();
        !letters.is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let letter: serde_json::Value = serde_json::from_str(letters.trim()).expect("one JSON line");
    assert_eq!(letter["rule"], "strict-json");
    assert_eq!(letter["topic"], "in/a");
    assert_eq!(letter["payload"], "definitely { not json");
    assert!(letter["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(s.gateway.shutdown().await);
}

/// The rules of the dry-run tests: every kind of fate, a table, a republish chain.
const DRY_RUN_RULES: &str = r#"
max_hops = 1

[[table]]
name = "devices"
file = "devices.csv"

[[rule]]
name = "alerts"
sql = '''SELECT topic(2) AS device, lookup('devices', topic(2), 'site') AS site, payload.temp AS temp
         FROM "sensors/+/temp" WHERE payload.temp > 30'''
[[rule.action]]
type = "forward"
topic = "sites/${site}/alerts/${device}"
priority = 0
ttl = "1h"
[[rule.action]]
type = "republish"
topic = "actuators/${device}/fan"
payload = '{"cmd":"fan_on"}'

[[rule]]
name = "strict"
payload = "json"
sql = 'SELECT payload.temp AS temp FROM "sensors/#"'
[[rule.action]]
type = "forward"

[[rule]]
name = "no-temp"
sql = 'SELECT topic(2) AS device FROM "sensors/+/temp" WHERE payload.temp IS NULL'
[[rule.action]]
type = "dead_letter"
reason = "no temperature from ${device}"

[[rule]]
name = "fan-echo"
sql = 'SELECT payload.cmd AS cmd FROM "actuators/#"'
[[rule.action]]
type = "republish"
topic = "actuators/echo"
[[rule.action]]
type = "drop"
"#;

/// `outpost rules test ARGS…` in a directory holding `rules.toml` (with `devices.csv`),
/// `outpost.toml` (`topic_prefix = "site-7/"`) and `events.jsonl`: (exit code, stdout, stderr).
fn dry_run(events: &str, args: &[&str]) -> (Option<i32>, String, String) {
    dry_run_of(DRY_RUN_RULES, events, args)
}

/// [`dry_run`] of other rules.
fn dry_run_of(rules: &str, events: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rules.toml"), rules).expect("write rules");
    std::fs::write(dir.path().join("devices.csv"), "device,site,max_temp\nd1,plant-a,30\n")
        .expect("write table");
    std::fs::write(
        dir.path().join("outpost.toml"),
        "[upstream]\nurl = \"mqtt://127.0.0.1:1\"\ntopic_prefix = \"site-7/\"\n",
    )
    .expect("write config");
    std::fs::write(dir.path().join("events.jsonl"), events).expect("write events");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .current_dir(dir.path())
        .args(["rules", "test", "rules.toml"])
        .args(args)
        .output()
        .expect("run outpost");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_dry_run_shows_a_null_topic_template_as_the_dead_letter_the_gateway_writes() {
    let (code, stdout, stderr) =
        dry_run("", &["-c", "outpost.toml", "--topic", "sensors/d9/temp", "--payload", r#"{"temp":31.5}"#]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        r#"event sensors/d9/temp {"temp":31.5}
  rule alerts: selected {"device":"d9","site":null,"temp":31.5}
  rule strict: selected {"temp":31.5}
  rule no-temp: filtered out by WHERE
  => dead letter (one record for the event):
       rule alerts (failed): topic template: `${site}` is NULL
  => republish actuators/d9/fan qos=1 hops=1 (rule alerts): {"cmd":"fan_on"}
  => forward site-7/sensors/d9/temp qos=1 priority=5 (rule strict): {"temp":31.5}
event actuators/d9/fan {"cmd":"fan_on"} (republished by rule alerts, hop 1)
  rule fan-echo: selected {"cmd":"fan_on"}
  => republish actuators/echo refused: hop limit (max_hops) reached after 1 republish(es) (rule fan-echo)
  => drop (rule fan-echo)
"#
    );
}

#[test]
fn the_dry_run_replays_recorded_events_with_every_fate() {
    let events = concat!(
        r#"{"topic":"sensors/d1/temp","payload":{"temp":31.5}}"#,
        "\n",
        r#"{"topic":"sensors/d1/temp","payload":"not json","clientid":"c9"}"#,
        "\n\n",
        r#"{"topic":"other/x","payload":null}"#,
        "\n"
    );
    let (code, stdout, stderr) = dry_run(events, &["--events", "events.jsonl"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        r#"event sensors/d1/temp {"temp":31.5}
  rule alerts: selected {"device":"d1","site":"plant-a","temp":31.5}
  rule strict: selected {"temp":31.5}
  rule no-temp: filtered out by WHERE
  => forward sites/plant-a/alerts/d1 qos=1 priority=0 ttl=1h (rule alerts): {"device":"d1","site":"plant-a","temp":31.5}
  => republish actuators/d1/fan qos=1 hops=1 (rule alerts): {"cmd":"fan_on"}
  => forward sensors/d1/temp qos=1 priority=5 (rule strict): {"temp":31.5}
event actuators/d1/fan {"cmd":"fan_on"} (republished by rule alerts, hop 1)
  rule fan-echo: selected {"cmd":"fan_on"}
  => republish actuators/echo refused: hop limit (max_hops) reached after 1 republish(es) (rule fan-echo)
  => drop (rule fan-echo)
event sensors/d1/temp not json
  rule alerts: filtered out by WHERE
  rule strict: failed: payload is not valid JSON: expected ident at line 1 column 2
  rule no-temp: selected {"device":"d1"}
  => dead letter (one record for the event):
       rule strict (failed): payload is not valid JSON: expected ident at line 1 column 2
       rule no-temp (dead_letter action): no temperature from d1
event other/x (empty payload)
  no rule's FROM matches this topic
  => unrouted: nothing goes upstream (counted as unrouted)
"#
    );
}

#[test]
fn the_dry_run_refuses_a_topic_no_sensor_can_publish_to() {
    let (code, stdout, stderr) = dry_run("", &["--topic", "sensors/+/temp"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""));
    assert!(
        stderr.contains(r#"--topic "sensors/+/temp": wildcards are not allowed in a topic name"#),
        "{stderr}"
    );
    let (code, _, stderr) =
        dry_run("{\"topic\":\"ok\"}\n{\"topic\":\"a/#\"}\n", &["--events", "events.jsonl"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains(r#"events.jsonl:2: topic "a/#": wildcards are not allowed"#), "{stderr}");
}

/// Windows and report by exception in the dry run: the events' `ts_ms` is the time windows
/// see, a window closes when an event comes past its end (with its own step, before that
/// event), and what is still open at the end is shown closed.
#[test]
fn the_dry_run_closes_windows_at_the_recorded_times_and_shows_report_by_exception() {
    let rules = r#"
[[rule]]
name = "avg"
sql = '''
SELECT topic(2) AS device, avg(payload.temp) AS avg, count(*) AS n
FROM "sensors/+/temp"
GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)
'''
[[rule.action]]
type = "forward"
topic = "avg/${device}"

[[rule]]
name = "changes"
sql = "SELECT topic(2) AS device, payload.temp AS temp FROM \"sensors/+/temp\" WHERE deadband(payload.temp, 1)"
[[rule.action]]
type = "republish"
topic = "local/changes/${device}"
"#;
    // 2025-12-05 12:00:01, :04, :08.5 and :12 UTC.
    let events = concat!(
        r#"{"topic":"sensors/d1/temp","payload":{"temp":20.5},"ts_ms":1764936001000}"#,
        "\n",
        r#"{"topic":"sensors/d2/temp","payload":{"temp":18.0},"ts_ms":1764936004000}"#,
        "\n",
        r#"{"topic":"sensors/d1/temp","payload":{"temp":21.0},"ts_ms":1764936008500}"#,
        "\n",
        r#"{"topic":"sensors/d1/temp","payload":{"temp":23.0},"ts_ms":1764936012000}"#,
        "\n"
    );
    let (code, stdout, stderr) = dry_run_of(rules, events, &["--events", "events.jsonl"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        r#"event sensors/d1/temp {"temp":20.5}
  rule avg: stateful (a window, or report by exception), evaluated with its state
  rule changes: stateful (a window, or report by exception), evaluated with its state
  => republish local/changes/d1 qos=1 hops=1 (rule changes): {"device":"d1","temp":20.5}
event local/changes/d1 {"device":"d1","temp":20.5} (republished by rule changes, hop 1)
  no rule's FROM matches this topic
  => unrouted: nothing goes upstream (counted as unrouted)
event sensors/d2/temp {"temp":18.0}
  rule avg: stateful (a window, or report by exception), evaluated with its state
  rule changes: stateful (a window, or report by exception), evaluated with its state
  => republish local/changes/d2 qos=1 hops=1 (rule changes): {"device":"d2","temp":18.0}
event local/changes/d2 {"device":"d2","temp":18.0} (republished by rule changes, hop 1)
  no rule's FROM matches this topic
  => unrouted: nothing goes upstream (counted as unrouted)
event sensors/d1/temp {"temp":21.0}
  rule avg: stateful (a window, or report by exception), evaluated with its state
  rule changes: stateful (a window, or report by exception), evaluated with its state
  => nothing goes out now
window of rule avg closed for group ["d1"]: [2025-12-05T12:00:00.000Z, 2025-12-05T12:00:10.000Z)
  => forward avg/d1 qos=1 priority=5 (rule avg): {"device":"d1","avg":20.75,"n":2}
window of rule avg closed for group ["d2"]: [2025-12-05T12:00:00.000Z, 2025-12-05T12:00:10.000Z)
  => forward avg/d2 qos=1 priority=5 (rule avg): {"device":"d2","avg":18.0,"n":1}
event sensors/d1/temp {"temp":23.0}
  rule avg: stateful (a window, or report by exception), evaluated with its state
  rule changes: stateful (a window, or report by exception), evaluated with its state
  => republish local/changes/d1 qos=1 hops=1 (rule changes): {"device":"d1","temp":23.0}
event local/changes/d1 {"device":"d1","temp":23.0} (republished by rule changes, hop 1)
  no rule's FROM matches this topic
  => unrouted: nothing goes upstream (counted as unrouted)
end of the events: the windows still open are closed now to show what they hold (the gateway keeps them open until their end)
window of rule avg closed for group ["d1"]: [2025-12-05T12:00:10.000Z, 2025-12-05T12:00:20.000Z)
  => forward avg/d1 qos=1 priority=5 (rule avg): {"device":"d1","avg":23.0,"n":1}
"#
    );
}
