//! `outpost tap` and `outpost status` against the real binary, upstream Debian's mosquitto:
//! one event followed through ingest, every rule (one of which fails on it) and the relay,
//! joined by the event id the upstream's envelope and the dead letters carry; a viewer that
//! stops reading costs the pipeline nothing and is told what it missed; `outpost status`
//! over the `[http]` endpoint and over the admin socket.
//!
//! Conditions the gateway reaches asynchronously are waited for on output lines, the upstream
//! subscriber or a polled metric with a deadline, never with a sleep.

use std::cell::RefCell;
use std::io::{BufRead as _, BufReader, Write as _};
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec, outpost};
use outpost_e2e::http::{Scrape, sample, scrape};
use outpost_e2e::mqtt::{Message, Session, Subscriber, publish_qos1, unique_client_id};
use outpost_e2e::upstream::Mosquitto;
use outpost_e2e::{free_addr, require_mosquitto};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// `copy` forwards every raw reading; `parse` needs a JSON payload and fails on anything else;
/// `elsewhere` never matches the test's topic.
const RULES: &str = r#"
[[rule]]
name = "copy"
sql = 'SELECT topic(2) AS device FROM "sensors/+/raw"'
[[rule.action]]
type = "forward"
topic = "copy/${device}"

[[rule]]
name = "parse"
payload = "json"
sql = 'SELECT payload.temp AS temp FROM "sensors/+/raw"'
[[rule.action]]
type = "forward"

[[rule]]
name = "elsewhere"
sql = 'SELECT 1 AS one FROM "elsewhere/#"'
[[rule.action]]
type = "forward"
"#;

/// Polls `/metrics` until `condition` holds, and returns that scrape.
async fn scrape_until(http: std::net::SocketAddr, what: &str, condition: impl Fn(&Scrape) -> bool) -> Scrape {
    outpost_e2e::http::scrape_until(http, what, TIMEOUT, condition).await.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The tap's JSON records so far (its stderr lines and anything else left out).
fn records(tap: &outpost_e2e::process::ChildProcess) -> Vec<Value> {
    tap.lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("stage").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_follows_one_event_through_ingest_each_rule_and_the_relay() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "copy/#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).expect("write rules");
    let http = free_addr();
    let config = format!(
        "rules = {:?}\n[http]\nlisten = \"{http}\"\n[upstream]\nurl = \"{}\"\nevent_id = \"envelope\"\n",
        rules.to_str().expect("utf-8 path"),
        upstream.url()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    let tap = gateway.tap(&[]).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let client = unique_client_id("tap-s");
    publish_qos1(gateway.listen(), &client, "sensors/d1/raw", [b"not json".to_vec()], TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("publish: {e:#}\n{}", gateway.tail()));
    subscriber.wait_for_count(1, TIMEOUT).await.expect("the copy upstream");
    tap.wait_for_line("the upstream's acknowledgement", TIMEOUT, |l| {
        l.contains(r#""action":"acknowledged""#)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let all = records(&tap);
    let ingest =
        all.iter().find(|r| r["stage"] == "ingest").unwrap_or_else(|| panic!("no ingest in {all:#?}"));
    assert_eq!(
        (&ingest["client_id"], &ingest["topic"], &ingest["qos"]),
        (&Value::from(client.as_str()), &Value::from("sensors/d1/raw"), &Value::from(1))
    );
    let id = ingest["event_id"].as_str().expect("an event id").to_owned();
    let path: Vec<&Value> = all.iter().filter(|r| r["event_id"] == id.as_str()).collect();

    let rule = |name: &str| {
        path.iter()
            .find(|r| r["stage"] == "rules" && r["rule"] == name)
            .unwrap_or_else(|| panic!("no verdict of {name} in {path:#?}"))
    };
    assert_eq!(rule("copy")["result"], "matched");
    assert_eq!(rule("copy")["outputs"], serde_json::json!(["forward copy/d1"]));
    assert_eq!(rule("parse")["result"], "failed");
    assert!(rule("parse")["error"].as_str().is_some_and(|e| !e.is_empty()), "{path:#?}");
    assert!(
        !path.iter().any(|r| r["rule"] == "elsewhere"),
        "a rule whose FROM does not match has no verdict"
    );
    // A commit may come in between when the PUBACK takes longer than the commit window.
    let relay: Vec<&str> = path
        .iter()
        .filter(|r| r["stage"] == "relay")
        .filter_map(|r| r["action"].as_str())
        .filter(|action| *action != "committed")
        .collect();
    assert_eq!(relay, ["accepted", "sent", "acknowledged"], "{path:#?}");
    assert!(path.iter().filter(|r| r["stage"] == "relay").all(|r| r["topic"] == "copy/d1"), "{path:#?}");

    // The same id upstream (the envelope) and in the dead letters (the rule that failed).
    let upstream_id = RefCell::new(None);
    subscriber
        .wait_for_messages("the copy", TIMEOUT, |messages: &[Message]| {
            let id = messages.first().and_then(|m| serde_json::from_slice::<Value>(&m.payload).ok());
            *upstream_id.borrow_mut() = id.and_then(|v| v["id"].as_str().map(str::to_owned));
            upstream_id.borrow().is_some()
        })
        .await
        .expect("the enveloped copy");
    assert_eq!(upstream_id.into_inner().as_deref(), Some(id.as_str()));
    let dead_letter_id = poll_dead_letter(&gateway).await;
    assert_eq!(format!("{dead_letter_id:016x}"), id);

    // The rule and traffic split metrics, read with a Prometheus text parser.
    let metrics = scrape_until(http, "the rule counters", |s| {
        sample(s, "outpost_rule_errors_total", &[("rule", "parse")]) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&metrics, "outpost_rule_matched_total", &[("rule", "copy")]), Some(1.0));
    assert_eq!(sample(&metrics, "outpost_rule_outputs_total", &[("rule", "copy")]), Some(1.0));
    assert_eq!(sample(&metrics, "outpost_rule_matched_total", &[("rule", "parse")]), Some(0.0));
    assert_eq!(sample(&metrics, "outpost_messages_received_by_qos_total", &[("qos", "1")]), Some(1.0));
    assert_eq!(sample(&metrics, "outpost_messages_received_by_qos_total", &[("qos", "0")]), Some(0.0));
    let accepted = sample(&metrics, "outpost_connections_accepted_total", &[("listener", "broker.listen")]);
    assert!(accepted.is_some_and(|n| n >= 1.0), "{accepted:?}");
    assert_eq!(sample(&metrics, "outpost_tap_viewers", &[]), Some(1.0));
    assert_eq!(sample(&metrics, "outpost_tap_missed_total", &[]), Some(0.0));
}

/// The first dead letter's event id, read with `outpost rules dead-letters` while the gateway
/// runs (the writer stores it a moment after the event was routed).
async fn poll_dead_letter(gateway: &GatewayProcess) -> u64 {
    let dir = gateway.data_dir().to_str().expect("utf-8 path").to_owned();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let out = outpost(&["rules", "dead-letters", "--data-dir", &dir]).expect("run outpost");
        let first = out.stdout.lines().next().and_then(|l| serde_json::from_str::<Value>(l).ok());
        if let Some(id) = first.and_then(|letter| letter["event_id"].as_u64()) {
            return id;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter: {}{}", out.stdout, out.stderr);
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_stops_reading_costs_nothing_and_is_told_what_it_missed() {
    if !require_mosquitto() {
        return;
    }
    const N: u64 = 3_000;
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "slow/#", Session::Clean).await.expect("subscribe upstream");
    let http = free_addr();
    let config = format!("[http]\nlisten = \"{http}\"\n[upstream]\nurl = \"{}\"\n", upstream.url());
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    // A viewer on the admin socket that reads its first line and then nothing.
    let socket = data.path().join("outpost.sock");
    let mut viewer = std::os::unix::net::UnixStream::connect(&socket).expect("connect the admin socket");
    viewer.write_all(b"tap {}\n").expect("ask for a tap");
    let mut reader = BufReader::new(viewer.try_clone().expect("clone"));
    let mut hello = String::new();
    reader.read_line(&mut hello).expect("the tap's first line");
    assert!(hello.starts_with(r#"{"attached":["ingest","rules","relay"]"#), "{hello}");

    // Every event goes through and is acknowledged while the viewer sleeps.
    let payloads = (0..N).map(|i| format!("reading {i}").into_bytes());
    publish_qos1(gateway.listen(), &unique_client_id("slow"), "slow/t", payloads, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("publish: {e:#}\n{}", gateway.tail()));
    subscriber.wait_for_count(N, TIMEOUT).await.expect("every event upstream");
    let metrics = scrape_until(http, "misses counted", |s| {
        sample(s, "outpost_tap_missed_total", &[]).is_some_and(|n| n > 0.0)
    })
    .await;
    assert_eq!(sample(&metrics, "outpost_tap_viewers", &[]), Some(1.0));
    let missed_total = sample(&metrics, "outpost_tap_missed_total", &[]).expect("missed");

    // Reading again, the viewer is told how many records it missed.
    let mut told = 0.0;
    let mut line = String::new();
    viewer.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    while told < missed_total {
        line.clear();
        let n = reader.read_line(&mut line).unwrap_or_else(|e| panic!("told {told} of {missed_total}: {e}"));
        assert!(n > 0, "the tap ended after telling {told} of {missed_total} missed");
        if let Ok(missed) = serde_json::from_str::<Value>(&line) {
            told += missed["missed"].as_f64().unwrap_or(0.0);
        }
    }
    // Never told more than was counted (what was counted after the scrape may be told too).
    let counted = scrape(http, None).await.map(|(_, s)| sample(&s, "outpost_tap_missed_total", &[]));
    assert!(counted.as_ref().is_ok_and(|n| n.is_some_and(|n| told <= n)), "told {told}, counted {counted:?}");

    // A viewer that goes away is detached.
    drop(reader);
    drop(viewer);
    scrape_until(http, "the viewer detached", |s| sample(s, "outpost_tap_viewers", &[]) == Some(0.0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_http_endpoint_or_the_admin_socket_for_a_person() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "st/#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let http = free_addr();
    let config_path = dir.path().join("outpost.toml");
    let config = format!(
        "data_dir = {:?}\n[http]\nlisten = \"{http}\"\n[upstream]\nurl = \"{}\"\n",
        data.path().to_str().expect("utf-8 path"),
        upstream.url()
    );
    std::fs::write(&config_path, config).expect("write the config");
    let gateway = GatewaySpec::new(data.path()).config_file(&config_path).start().await.expect("start");
    publish_qos1(gateway.listen(), &unique_client_id("st"), "st/t", [b"1".to_vec(), b"2".to_vec()], TIMEOUT)
        .await
        .expect("acks");
    subscriber.wait_for_count(2, TIMEOUT).await.expect("both upstream");

    let config_arg = config_path.to_str().expect("utf-8 path");
    let over_http = outpost(&["status", "-c", config_arg]).expect("run outpost status");
    assert_eq!(over_http.code, Some(0), "{}", over_http.stderr);
    let text = over_http.stdout;
    assert!(text.starts_with(&format!("outpost {}, up ", env!("CARGO_PKG_VERSION"))), "{text}");
    let upstream_line = format!("upstream     {}: connected", upstream.url());
    assert!(text.lines().any(|l| l.starts_with(&upstream_line)), "{text}");
    assert!(text.lines().any(|l| l.starts_with("backlog      ") && l.contains("events held")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("rates        over ")), "{text}");
    assert!(text.lines().any(|l| l == "last errors  none"), "{text}");
    let json = outpost(&["status", "-c", config_arg, "--json"]).expect("run outpost status --json");
    let value: Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(value["upstream"]["connected"], true);

    let dir_arg = data.path().to_str().expect("utf-8 path");
    let over_socket = outpost(&["status", "--data-dir", dir_arg]).expect("run outpost status");
    assert_eq!(over_socket.code, Some(0), "{}", over_socket.stderr);
    let text = over_socket.stdout;
    assert!(text.lines().any(|l| l.starts_with("upstream     (configured upstream): connected")), "{text}");
    assert!(text.lines().any(|l| l == "  ingested 2"), "{text}");

    drop(gateway);
    let stopped = outpost(&["status", "--data-dir", dir_arg]).expect("run outpost status");
    assert_eq!(stopped.code, Some(2));
    assert!(stopped.stderr.contains("outpost.sock"), "{}", stopped.stderr);
}
