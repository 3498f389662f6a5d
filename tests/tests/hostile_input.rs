//! Hostile input the other hostile-client tests do not cover: invalid UTF-8 where MQTT demands
//! UTF-8 (a topic, a client id, a username), refused (the connection closed, never accepted)
//! while the gateway goes on serving a well-behaved sensor; payloads and files aimed at the
//! rules: 100,000 levels of JSON nesting (dead-lettered with serde_json's reason, no stack
//! overflow), a catastrophic-backtracking regex on 50,000 bytes (linear time), an over-large
//! regex (a compile error), a 10,000-rule file (loads, timed), and enrichment tables that are
//! not UTF-8, ragged, with duplicate keys or an open quote (refused at reload with file and
//! line; the table in force stays); 10,000 distinct topics from one client (all acknowledged
//! and forwarded, RSS bounded, no per-topic metric labels); one client opening 1,000
//! connections (held to `broker.max_connections`, the rest refused with CONNACK 3, counted and
//! logged once, descriptors bounded, the slots back once it leaves).

use std::net::SocketAddr;
use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::raw;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// A 3.1.1 CONNECT with raw bytes for the client id and, if given, the username.
fn connect_raw(client_id: &[u8], username: Option<&[u8]>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(if username.is_some() { 0x82 } else { 0x02 });
    body.extend_from_slice(&[0, 30]);
    raw::put_binary(&mut body, client_id);
    if let Some(username) = username {
        raw::put_binary(&mut body, username);
    }
    raw::packet(0x10, &body)
}

/// A 3.1.1 QoS 1 PUBLISH with a raw topic.
fn publish_raw(topic: &[u8], packet_id: u16) -> Vec<u8> {
    let mut body = Vec::new();
    raw::put_binary(&mut body, topic);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(b"payload");
    raw::packet(0x32, &body)
}

/// Everything the gateway answers until it closes the connection.
async fn answer(addr: SocketAddr, packets: &[Vec<u8>]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    for packet in packets {
        // The gateway may close before the last write: that is an answer too.
        if stream.write_all(packet).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the gateway closed the connection within {WAIT:?}; it answered {answer:?}");
    answer
}

/// A well-behaved sensor still gets its PUBACK.
async fn still_serving(addr: SocketAddr, id: &str) {
    still_serving_from(addr, None, id).await;
}

/// [`still_serving`] from a given source address (anywhere in 127.0.0.0/8 on loopback).
async fn still_serving_from(addr: SocketAddr, source: Option<std::net::IpAddr>, id: &str) {
    let mut stream = match source {
        None => TcpStream::connect(addr).await.expect("connect"),
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind(SocketAddr::new(ip, 0)).expect("bind the source address");
            socket.connect(addr).await.expect("connect")
        }
    };
    stream.write_all(&raw::connect_v311(id, 30)).await.expect("CONNECT");
    let (kind, connack) = raw::read_packet(&mut stream).await.expect("CONNACK");
    assert_eq!((kind >> 4, connack), (2, vec![0, 0]), "accepted");
    stream.write_all(&raw::publish_v311("plant/ok", 1, 7, false, b"fine")).await.expect("PUBLISH");
    let (kind, puback) =
        tokio::time::timeout(WAIT, raw::read_packet(&mut stream)).await.expect("in time").expect("PUBACK");
    assert_eq!((kind >> 4, puback), (4, vec![0, 7]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_topic_a_client_id_or_a_username_is_refused_and_others_go_on() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("starts");
    let addr = gateway.listen();

    // A topic with a byte that is never UTF-8: closed before any PUBACK.
    let got = answer(addr, &[raw::connect_v311("bad-topic", 30), publish_raw(b"plant/\xff", 1)]).await;
    assert_eq!(got, [0x20, 2, 0, 0], "a CONNACK, then no PUBACK: the connection is closed");
    still_serving(addr, "ok-1").await;

    // An overlong encoding and a lone surrogate in the client id: never accepted.
    for id in [&b"dev\xc0\xaf"[..], &b"dev\xed\xa0\x80"[..]] {
        let got = answer(addr, &[connect_raw(id, None)]).await;
        assert!(!got.starts_with(&[0x20, 2, 0, 0]), "an invalid client id {id:?} was accepted: {got:?}");
    }
    still_serving(addr, "ok-2").await;

    // A username that is not UTF-8.
    let got = answer(addr, &[connect_raw(b"user-bad", Some(b"op\xfe"))]).await;
    assert!(!got.starts_with(&[0x20, 2, 0, 0]), "an invalid username was accepted: {got:?}");
    still_serving(addr, "ok-3").await;

    gateway.terminate().await.expect("stops");
    let counters = gateway.final_counters().expect("counters");
    assert_eq!(
        counters.get("sensor_connects").copied(),
        Some(4),
        "bad-topic and the three ok ones: {counters:?}"
    );
    assert!(counters.get("protocol_errors").copied().unwrap_or(0) >= 1, "{counters:?}");
}

/// Generous bound for the rule cases; they take about a second when healthy.
const RULE_WAIT: Duration = Duration::from_secs(30);

const HOSTILE_RULES: &str = r#"
[[rule]]
name = "deep"
payload = "json"
sql = 'SELECT payload.a AS a FROM "deep/#"'
[[rule.action]]
type = "forward"

[[rule]]
name = "pathological"
sql = "SELECT payload AS line FROM \"logs/#\" WHERE regex_match(payload, '^(a+)+$')"
[[rule.action]]
type = "forward"

[[rule]]
name = "plain"
sql = 'SELECT * FROM "ok/#"'
[[rule.action]]
type = "forward"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_and_a_catastrophic_regex_through_rules_cost_nothing_and_the_gateway_goes_on() {
    use outpost_e2e::gateway::outpost;
    use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
    use outpost_e2e::upstream::Mosquitto;
    if !outpost_e2e::require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, HOSTILE_RULES).expect("write rules");
    let config =
        format!("rules = {:?}\n[upstream]\nurl = \"{}\"\n", rules.to_str().expect("utf-8"), upstream.url());
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("starts");
    let addr = gateway.listen();

    // 100,000 levels of `[`: serde_json stops at 128 levels instead of recursing on.
    let deep = "[".repeat(100_000).into_bytes();
    publish_qos1(addr, "deep", "deep/1", [deep], RULE_WAIT).await.expect("acknowledged");

    // `^(a+)+$` against 50,000 `a`s and a `b`: a backtracking engine tries 2^n splits (n = 30
    // already takes seconds); the regex crate's automaton is linear in the input.
    let started = std::time::Instant::now();
    let mut no_match = "a".repeat(50_000).into_bytes();
    no_match.push(b'b');
    let matches = "a".repeat(50_000).into_bytes();
    publish_qos1(addr, "logs", "logs/1", [no_match, matches], RULE_WAIT).await.expect("acknowledged");
    let regex_time = started.elapsed();
    println!("two 50,000-byte payloads through `^(a+)+$`: acknowledged in {regex_time:?}");
    assert!(regex_time < Duration::from_secs(5), "linear time: {regex_time:?}");

    publish_qos1(addr, "ok", "ok/1", [b"fine".to_vec()], RULE_WAIT).await.expect("still serving");
    subscriber.wait_for_count(2, RULE_WAIT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let status = gateway.terminate().await.expect("stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let received: Vec<String> = subscriber.messages().into_iter().map(|(topic, _)| topic).collect();
    assert_eq!(received, ["logs/1", "ok/1"], "only the matching line and the plain event go upstream");

    let letters = outpost(&["rules", "dead-letters", "--data-dir", data.path().to_str().expect("utf-8")])
        .expect("run outpost rules dead-letters");
    let letters: Vec<serde_json::Value> =
        letters.stdout.lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect();
    let [letter] = letters.as_slice() else { panic!("one dead letter: {letters:#?}") };
    assert_eq!((&letter["topic"], &letter["rule"]), (&"deep/1".into(), &"deep".into()), "{letter}");
    let reason = letter["rules"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("recursion limit exceeded"), "the reason says why: {reason}");
}

#[test]
fn an_over_large_regex_is_a_compile_error_and_a_huge_rules_file_loads_within_a_bound() {
    use outpost_e2e::gateway::outpost;
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"huge\"\nsql = \"SELECT * FROM \\\"logs/#\\\" WHERE regex_match(payload, 'a{1000}{1000}')\"\n[[rule.action]]\ntype = \"forward\"\n",
    )
    .expect("write rules");
    let out = outpost(&["rules", "check", rules.to_str().expect("utf-8")]).expect("run outpost rules check");
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("rules.toml") && out.stderr.contains("size limit"), "{}", out.stderr);

    // 10,000 rules, 3.6 MB: each with its own filter, a WHERE clause and an action.
    let mut text = String::new();
    for i in 0..10_000 {
        text.push_str(&format!(
            "[[rule]]\nname = \"rule-{i}\"\nsql = 'SELECT payload.temp AS t, topic(2) AS device FROM \"site/{i}/+/temp\" WHERE payload.temp > {i} AND regex_match(topic, \"^site/[0-9]+/\")'\n[[rule.action]]\ntype = \"forward\"\ntopic = \"out/{i}/${{device}}\"\npayload = '{{\"t\": ${{t}}, \"note\": \"{}\"}}'\n\n",
            "x".repeat(150)
        ));
    }
    std::fs::write(&rules, &text).expect("write rules");
    let started = std::time::Instant::now();
    let out = outpost(&["rules", "check", rules.to_str().expect("utf-8")]).expect("run outpost rules check");
    let took = started.elapsed();
    println!("outpost rules check: {} bytes, 10,000 rules, {took:?}", text.len());
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_enrichment_table_at_reload_is_refused_with_its_line_and_the_old_one_stays() {
    use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
    use outpost_e2e::upstream::Mosquitto;
    if !outpost_e2e::require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let table = dir.path().join("devices.csv");
    std::fs::write(&table, "device,site\nd1,plant-a\n").expect("write the table");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n\n[[rule]]\nname = \"site\"\nsql = '''\nSELECT lookup('devices', topic(2), 'site') AS site FROM \"sensors/+/temp\"\n'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"by-site/${site}\"\n",
    )
    .expect("write the rules");
    let config =
        format!("rules = {:?}\n[upstream]\nurl = \"{}\"\n", rules.to_str().expect("utf-8"), upstream.url());
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("starts");
    let addr = gateway.listen();
    // Signals are handled once the uplink runs; a SIGHUP before that would end the process.
    gateway.wait_for_message("connected upstream", WAIT).await.expect("the uplink connects");

    let broken: [(&[u8], &str); 4] = [
        (
            b"device,site\nd1,plant-b\nd2,K\xf6ln\n",
            "devices.csv: line 3: not UTF-8 (byte 5 of the line); save the file as UTF-8",
        ),
        (b"device,site\nd1,plant-b\nd2\n", "devices.csv:3: 1 fields, but the header has 2"),
        (b"device,site\nd1,plant-b\nd1,plant-c\n", "duplicate key `d1`; every row needs its own key"),
        (b"device,site\nd1,\"plant-b\n", "devices.csv:3: unterminated quoted field"),
    ];
    for (nth, (text, expected)) in broken.iter().enumerate() {
        std::fs::write(&table, text).expect("write the broken table");
        gateway.signal(libc::SIGHUP).expect("SIGHUP");
        let mut seen = 0;
        let log = gateway
            .wait_for_log(&format!("rejection #{}", nth + 1), WAIT, |log| {
                seen += usize::from(
                    // The file watcher may reject the same file too; count the signal's answers.
                    log["message"].as_str().is_some_and(|m| m.starts_with("rules file rejected"))
                        && log["reason"] == "SIGHUP",
                );
                seen == nth + 1
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let error = log["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{expected:?} in {log}");
        // The table in force is still the first one: d1 is at plant-a.
        publish_qos1(addr, "d1", "sensors/d1/temp", [b"21".to_vec()], WAIT).await.expect("acknowledged");
        subscriber
            .wait_for_count(nth as u64 + 1, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    }
    let topics: Vec<String> = subscriber.messages().into_iter().map(|(topic, _)| topic).collect();
    assert_eq!(topics, ["by-site/plant-a"; 4]);
    gateway.terminate().await.expect("stops");
    let counters = gateway.final_counters().expect("counters");
    // Four by SIGHUP, and the file watcher's for any change it saw first.
    assert!(counters.get("rules_reload_failures").copied().unwrap_or(0) >= 4, "{counters:?}");
    assert_eq!(counters.get("rules_reloads").copied().unwrap_or(0), 0, "{counters:?}");
}

/// What the gateway's resident memory may grow by while one client publishes to 10,000
/// distinct topics (it keeps nothing per topic; the figure covers allocator arenas and buffers
/// that the first burst sizes).
const TOPICS_RSS_BOUND_KIB: u64 = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_distinct_topics_from_one_client_are_all_forwarded_with_bounded_memory() {
    use outpost_e2e::mqtt::{Session, Subscriber, publish_each_qos1};
    use outpost_e2e::upstream::Mosquitto;
    if !outpost_e2e::require_mosquitto() {
        return;
    }
    const N: usize = 10_000;
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "plant/#", Session::Clean).await.expect("subscribe upstream");
    let http = outpost_e2e::free_addr();
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path())
        .upstream(upstream.url())
        .config_toml(format!("[http]\nlisten = \"{http}\"\n"))
        .start()
        .await
        .expect("starts");
    gateway.wait_for_message("connected upstream", WAIT).await.expect("the uplink connects");
    let warm: Vec<(String, Vec<u8>)> = (0..100).map(|i| (format!("plant/warm/{i}"), b"1".to_vec())).collect();
    publish_each_qos1(gateway.listen(), "topics-warm", &warm, WAIT).await.expect("warm-up acknowledged");
    let start = gateway.rss_kib().expect("RSS");

    let events: Vec<(String, Vec<u8>)> =
        (0..N).map(|i| (format!("plant/line-{}/cell-{i}/temp", i % 7), b"21.5".to_vec())).collect();
    publish_each_qos1(gateway.listen(), "topics", &events, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("every publish is acknowledged: {e:#}\n{}", gateway.tail()));
    subscriber
        .wait_for_count(100 + N as u64, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("every publish is forwarded: {e:#}\n{}", gateway.tail()));
    let end = gateway.rss_kib().expect("RSS");
    println!("10,000 distinct topics: gateway RSS {start} KiB before, {end} KiB after");
    assert!(end <= start + TOPICS_RSS_BOUND_KIB, "RSS grew from {start} KiB to {end} KiB");
    let received: std::collections::BTreeSet<String> =
        subscriber.messages().into_iter().map(|(topic, _)| topic).collect();
    assert_eq!(received.len(), 100 + N, "each topic arrived");

    // The metrics keep one series per kind, never one per topic or client.
    let (_, scrape) = outpost_e2e::http::scrape(http, None).await.expect("GET /metrics");
    assert!(
        scrape
            .samples
            .iter()
            .all(|s| ["topic", "client_id", "device"].iter().all(|l| s.labels.get(l).is_none())),
        "no per-topic labels"
    );
    let series = scrape.samples.len();
    assert!(series < 1_000, "{series} series after 10,000 topics");
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_opening_a_thousand_connections_is_held_to_max_connections_counted_and_logged_once() {
    const LIMIT: usize = 200;
    const HOSTILE: usize = 1_000;
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml(format!("[broker]\nmax_connections = {LIMIT}\n"))
        .start()
        .await
        .expect("starts");
    let addr = gateway.listen();
    still_serving(addr, "before").await;
    let baseline = open_fds(gateway.pid());

    // One source opens 1,000 connections and keeps every one it can.
    let mut held = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..HOSTILE {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&raw::connect_v311(&format!("hog-{i}"), 60)).await.expect("CONNECT");
        let (kind, connack) = tokio::time::timeout(WAIT, raw::read_packet(&mut stream))
            .await
            .expect("in time")
            .expect("CONNACK");
        match (kind >> 4, connack.as_slice()) {
            (2, [0, 0]) => accepted += 1,
            // 3.1.1's "server unavailable", then the gateway closes the socket.
            (2, [0, 3]) => refused += 1,
            other => panic!("connection {i}: {other:?}"),
        }
        held.push(stream);
    }
    assert_eq!((accepted, refused), (LIMIT, HOSTILE - LIMIT), "held to broker.max_connections");
    // Refused sockets are closed by the gateway: its descriptors grow with what it accepted.
    let fds = open_fds(gateway.pid());
    println!("gateway fds: {baseline} before, {fds} with {HOSTILE} connections attempted, {LIMIT} held");
    assert!(fds <= baseline + LIMIT + 20, "{fds} fds (baseline {baseline})");

    drop(held);
    // Its slots come back as the gateway notices the closed sockets.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&raw::connect_v311("after", 30)).await.expect("CONNECT");
        let (_, connack) = raw::read_packet(&mut stream).await.expect("CONNACK");
        if connack == [0, 0] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slots never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_serving(addr, "after-2").await;

    gateway.terminate().await.expect("stops");
    let logged = gateway.messages("sensor connection refused");
    assert_eq!(logged.len(), 1, "logged once for the episode, the rest folded in: {logged:?}");
    let counters = gateway.final_counters().expect("counters");
    assert!(counters.get("sensor_refused").copied().unwrap_or(0) >= (HOSTILE - LIMIT) as u64, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_held_to_its_share_and_sensors_elsewhere_still_connect() {
    const PER_ADDRESS: usize = 50;
    const HOSTILE: usize = 300;
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml(format!(
            "[broker]\nmax_connections = 200\nmax_connections_per_address = {PER_ADDRESS}\n"
        ))
        .start()
        .await
        .expect("starts");
    let addr = gateway.listen();

    // 127.0.0.1 opens 300 connections and keeps every one it can.
    let mut held = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..HOSTILE {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&raw::connect_v311(&format!("hog-{i}"), 60)).await.expect("CONNECT");
        let (_, connack) = tokio::time::timeout(WAIT, raw::read_packet(&mut stream))
            .await
            .expect("in time")
            .expect("CONNACK");
        match connack.as_slice() {
            [0, 0] => accepted += 1,
            [0, 3] => refused += 1,
            other => panic!("connection {i}: {other:?}"),
        }
        held.push(stream);
    }
    assert_eq!((accepted, refused), (PER_ADDRESS, HOSTILE - PER_ADDRESS), "held to its share");
    // Without the per-address limit the hog would hold all 200 slots; other hosts still get in.
    for (i, source) in ["127.0.0.2", "127.0.0.3"].into_iter().enumerate() {
        let ip = source.parse().expect("an address");
        still_serving_from(addr, Some(ip), &format!("elsewhere-{i}")).await;
    }
    drop(held);

    gateway.terminate().await.expect("stops");
    let logged = gateway.messages("sensor connection refused");
    assert_eq!(logged.len(), 1, "logged once for the episode: {logged:?}");
    assert!(
        logged[0]["reason"].as_str().is_some_and(|r| r.contains("max_connections_per_address")),
        "{logged:?}"
    );
    let counters = gateway.final_counters().expect("counters");
    assert_eq!(counters.get("sensor_refused_per_address").copied(), Some((HOSTILE - PER_ADDRESS) as u64));
}
