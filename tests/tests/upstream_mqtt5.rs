//! The MQTT 5 upstream path against Debian's mosquitto: the event id travels as a user
//! property, the sensor's MQTT 5 properties travel with its event (through the buffer, with
//! what remains of its message expiry), the upstream's receive maximum and maximum packet size
//! from its CONNACK are honoured, and a publish the upstream refuses (PUBACK reason ≥ 0x80) is
//! counted and discarded instead of resent forever.
//!
//! What mosquitto 2.0.11 (Debian) does, checked by hand with a raw MQTT 5 client and
//! `mosquitto_pub -V mqttv5 -q 1 -d`, and again on the wire by [`WireProbe`] in every run:
//! - `max_inflight_messages 5` makes it announce receive maximum 5 in its CONNACK to MQTT 5
//!   clients (the man page only describes the option for outgoing messages), and
//!   `max_packet_size 2000` makes it announce maximum packet size 2000.
//! - It does **not** enforce the receive maximum for QoS 1: it answers every PUBLISH with its
//!   PUBACK as it reads it, and 2,000 QoS 1 publishes written at once with receive maximum 5
//!   were all acknowledged, no DISCONNECT. So mosquitto alone cannot tell whether the gateway
//!   honours the limit; [`WireProbe`] counts the publishes awaiting their PUBACK instead.
//! - It does enforce the maximum packet size: a larger PUBLISH closes the connection ("Client
//!   … disconnected due to oversize packet", no DISCONNECT packet).
//! - A QoS 1 publish an ACL denies gets PUBACK reason 0x87 (NotAuthorized) over MQTT 5, and the
//!   connection stays up. (Over MQTT 3.1.1 it gets an ordinary PUBACK, reason 0, and the
//!   message is silently dropped.)
//! - Unless `max_queued_messages` is 0, as the harness configures it: then mosquitto closes
//!   the connection right after that PUBACK 0x87, for MQTT 5 and 3.1.1 alike (its log says
//!   "Bad socket read/write on client …: Unknown error"; no DISCONNECT is sent). When the
//!   client had more publishes on the way, the close is a TCP reset, which often destroys the
//!   PUBACK before the client reads it, so the client sends the denied publish again.
//!   [`refusals_followed_by_a_dropped_link_are_discarded_once_and_nothing_is_lost`] keeps
//!   that behaviour; the other tests set a finite `max_queued_messages`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::mqtt::{Subscriber, SubscriberOptions, publish_each_qos1, publish_qos1, unique_client_id};
use outpost_e2e::raw::{MalformedHeader, fixed_header};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::{Mosquitto, SwitchedLink};
use outpost_sim::mqtt::MqttVersion;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Generous bound for every wait; each test takes a few seconds when healthy.
const TIMEOUT: Duration = Duration::from_secs(20);
/// The MQTT 5 user property the gateway puts the event id in.
const EVENT_ID_PROPERTY: &str = "outpost-event-id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_upstream_gets_event_ids_and_its_limits_are_honoured() {
    if !require_mosquitto() {
        return;
    }
    const RECEIVE_MAX: usize = 5;
    const MAX_PACKET: usize = 2000;
    /// Events per batch; the first batch is sent from the buffer, the second live.
    const PER_BATCH: usize = 150;
    /// The position of the one oversized event in each batch.
    const BIG_AT: usize = 75;
    const TOPIC: &str = "sensors/mqtt5-1/temp";

    let upstream = Mosquitto::start_with(&format!(
        "max_inflight_messages {RECEIVE_MAX}\nmax_packet_size {MAX_PACKET}\n"
    ))
    .await
    .expect("start mosquitto");
    let mut subscriber = subscribe_v5(upstream.addr(), "sensors/#").await.expect("subscribe upstream");
    let probe = WireProbe::start(upstream.addr()).await.expect("start the wire probe");
    let data = tempfile::tempdir().expect("tempdir");
    // The probe holds the gateway's first connection until released; connect_timeout is long
    // so that holding it never counts as a failed attempt.
    let config =
        format!("[upstream]\nurl = \"{}\"\nmqtt_version = \"5\"\nconnect_timeout = \"60s\"\n", probe.url());
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    // Each batch: small readings, one ~5,000-byte event in the middle.
    let batch = |name: &str| -> Vec<Vec<u8>> {
        (0..PER_BATCH)
            .map(|i| {
                if i == BIG_AT {
                    let mut big = format!("{name} big {i} ").into_bytes();
                    big.resize(5000, b'x');
                    big
                } else {
                    format!("{name} reading {i}").into_bytes()
                }
            })
            .collect()
    };
    let (first, second) = (batch("buffered"), batch("live"));
    let expected: Vec<Vec<u8>> =
        first.iter().chain(&second).filter(|payload| payload.len() < MAX_PACKET).cloned().collect();
    let expected_first = PER_BATCH as u64 - 1;

    // First batch while the link is held: every event is acknowledged from the buffer, and
    // the relay starts the link with a full backlog, so it fills its whole send window at once.
    publish_qos1(gateway.listen(), "mqtt5-buffered", TOPIC, first, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    probe.release();
    let connected = gateway
        .wait_for_message("connected upstream", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", upstream.tail()));
    assert_eq!(
        connected["receive_max"], RECEIVE_MAX,
        "the gateway took the receive maximum from mosquitto's CONNACK: {connected}"
    );
    subscriber
        .wait_for_count(expected_first, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", gateway.tail(), upstream.tail()));

    // Second batch over the live link.
    publish_qos1(gateway.listen(), "mqtt5-live", TOPIC, second, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    subscriber
        .wait_for_count(expected.len() as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", gateway.tail(), upstream.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());

    // What arrived: every small event once, in order, each with a unique 16-hex-digit id.
    let received = subscriber.full_messages();
    let payloads: Vec<Vec<u8>> = received.iter().map(|m| m.payload.clone()).collect();
    assert!(
        payloads == expected,
        "every small event exactly once and in order, no large one: got {} messages, expected {}\n{}",
        payloads.len(),
        expected.len(),
        first_difference(&payloads, &expected)
    );
    assert!(received.iter().all(|m| m.topic == TOPIC), "topics are unchanged");
    let ids: Vec<String> = received
        .iter()
        .map(|m| {
            let values: Vec<&String> =
                m.user_properties.iter().filter(|(k, _)| k == EVENT_ID_PROPERTY).map(|(_, v)| v).collect();
            assert_eq!(
                values.len(),
                1,
                "exactly one `{EVENT_ID_PROPERTY}` property: {:?}",
                m.user_properties
            );
            values[0].clone()
        })
        .collect();
    for id in &ids {
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "`{EVENT_ID_PROPERTY}` is 16 hex digits: {id:?}"
        );
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "event ids are unique");
    let numeric: Vec<u64> =
        ids.iter().map(|id| u64::from_str_radix(id, 16).expect("hex, checked above")).collect();
    assert!(numeric.windows(2).all(|w| w[0] < w[1]), "one sensor's event ids increase: {ids:?}");
    assert_eq!(subscriber.connects(), 1, "the subscriber never reconnected, so it missed nothing");

    // The oversized events: counted, logged, never sent; the link was never dropped.
    let counters = gateway.final_counters().expect("final counters");
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    let small = expected.len() as u64;
    assert_eq!(count("upstream_rejected"), 2, "both oversized events were refused: {counters:?}");
    assert_eq!(count("upstream_failures"), 0, "the link was never dropped: {counters:?}");
    assert_eq!(count("upstream_connects"), 1, "{counters:?}");
    assert_eq!(
        (count("upstream_sent"), count("upstream_acked"), count("upstream_resent")),
        (small, small, 0),
        "upstream_sent, upstream_acked, upstream_resent: {counters:?}"
    );
    let warnings = gateway.messages("an event is larger than the upstream accepts");
    let warning = warnings.first().unwrap_or_else(|| panic!("no oversize warning\n{}", gateway.tail()));
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["max"], MAX_PACKET, "the limit came from mosquitto's CONNACK: {warning}");
    assert!(warning["size"].as_u64().is_some_and(|size| size > 5000), "{warning}");
    assert_eq!(buffered_at_stop(&gateway), 0, "nothing is left behind");

    // On the wire: the window never exceeded the receive maximum (and was used fully), no
    // publish was larger than the maximum packet size, mosquitto never disconnected us.
    let wire = probe.wire();
    println!("mqtt5 upstream: {wire:?}; gateway counters: {counters:?}");
    assert_eq!(wire.connections, 1, "{wire:?}");
    assert_eq!(
        wire.max_awaiting, RECEIVE_MAX,
        "publishes awaiting their PUBACK peaked at the receive maximum, never above: {wire:?}"
    );
    assert_eq!(wire.pkid_reused, 0, "no packet id was reused while in flight: {wire:?}");
    assert_eq!(wire.publishes, small, "{wire:?}");
    assert!(wire.largest_publish <= MAX_PACKET, "{wire:?}");
    assert!(wire.upstream_disconnects.is_empty(), "{wire:?}");
    assert_eq!(wire.malformed, 0, "{wire:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_an_acl_denies_are_counted_discarded_and_the_link_stays_up() {
    if !require_mosquitto() {
        return;
    }
    // The harness sets `max_queued_messages 0` (no queue limit); with it, mosquitto 2.0.11
    // closes the connection right after every PUBACK 0x87 (see the next test). A finite limit
    // far above anything queued here keeps the link up, as with mosquitto's default of 1000.
    let outcome = run_acl_scenario("max_queued_messages 1000000\n", "").await;
    let (each, ok) = (ACL_EACH as u64, ACL_EACH as u64 + 1);
    let count = |name: &str| outcome.counters.get(name).copied().unwrap_or(0);
    assert!(
        outcome.received == outcome.expected,
        "every `ok` event exactly once, in order, no `denied` one: got {} messages\n{}",
        outcome.received.len(),
        first_difference(&outcome.received, &outcome.expected)
    );
    assert_eq!(
        count("upstream_rejected"),
        each,
        "each denied event was refused once: {:?}",
        outcome.counters
    );
    assert_eq!(count("upstream_failures"), 0, "the link stayed up: {:?}", outcome.counters);
    assert_eq!(count("upstream_connects"), 1, "{:?}", outcome.counters);
    assert_eq!(
        (count("upstream_sent"), count("upstream_acked"), count("upstream_resent")),
        (ok + each, ok, 0),
        "upstream_sent, upstream_acked, upstream_resent: each event sent once, never again: {:?}",
        outcome.counters
    );
    // On the wire: mosquitto answered each denied publish with PUBACK 0x87 and each allowed one
    // with success (0x00: the subscriber matched).
    let wire = &outcome.wire;
    assert_eq!(wire.puback_reasons.get(&0x87).copied(), Some(each), "{wire:?}");
    assert_eq!(wire.puback_reasons.get(&0x00).copied(), Some(ok), "{wire:?}");
    assert_eq!(wire.puback_reasons.len(), 2, "{wire:?}");
    assert_eq!((wire.publishes, wire.connections), (ok + each, 1), "{wire:?}");
    assert!(wire.upstream_disconnects.is_empty(), "{wire:?}");
    assert_eq!(wire.malformed, 0, "{wire:?}");
}

/// mosquitto 2.0.11 with `max_queued_messages 0` (documented as "no maximum", and what the
/// harness configures) sends PUBACK 0x87 for a publish its ACL denies and then closes the
/// connection; the publishes after the denied one are never processed, and the reset often
/// destroys the PUBACK on its way (see the module docs). So each denied event costs one or
/// more connections, a varying number. The gateway must still discard each refused event once
/// it reads the refusal (not resend it into every next connection), resend what a closed
/// connection left unacknowledged, and drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_followed_by_a_dropped_link_are_discarded_once_and_nothing_is_lost() {
    if !require_mosquitto() {
        return;
    }
    // Every lost connection is a short one, so the gateway's backoff grows (an upstream that
    // drops us right after connecting is not hammered); short bounds keep the test quick.
    let outcome = run_acl_scenario("", "reconnect_min = \"5ms\"\nreconnect_max = \"20ms\"\n").await;
    let each = ACL_EACH as u64;
    let count = |name: &str| outcome.counters.get(name).copied().unwrap_or(0);
    // Resends after a lost link may duplicate (at least once); first arrivals must be complete
    // and in order.
    let mut seen = HashSet::new();
    let first_arrivals: Vec<(String, Vec<u8>)> =
        outcome.received.iter().filter(|message| seen.insert((*message).clone())).cloned().collect();
    assert!(
        first_arrivals == outcome.expected,
        "every `ok` event, in order, no `denied` one: got {} distinct\n{}",
        first_arrivals.len(),
        first_difference(&first_arrivals, &outcome.expected)
    );
    assert_eq!(
        count("upstream_rejected"),
        each,
        "each denied event was refused once: {:?}",
        outcome.counters
    );
    println!(
        "refusal then disconnect: {} link losses, {} duplicates upstream, {} resends",
        count("upstream_failures"),
        outcome.received.len() - first_arrivals.len(),
        count("upstream_resent")
    );
}

/// An upstream that allows only QoS 0 (its CONNACK's Maximum QoS) cannot give the
/// at-least-once delivery Outpost promises: the gateway refuses to use it, says why, and keeps
/// every event in the buffer. (Before, it published at QoS 1 anyway, mosquitto answered with
/// DISCONNECT 0x9B, and the gateway reconnected in a tight loop.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_allows_only_qos0_is_refused_and_events_stay_buffered() {
    if !require_mosquitto() {
        return;
    }
    const N: usize = 20;
    let upstream = Mosquitto::start_with("max_qos 0\n").await.expect("start mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let config = format!("[upstream]\nurl = \"{}\"\nmqtt_version = \"5\"\n", upstream.url());
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    let events: Vec<(String, Vec<u8>)> =
        (0..N).map(|i| ("sensors/q/x".to_owned(), format!("reading {i}").into_bytes())).collect();
    publish_each_qos1(gateway.listen(), &unique_client_id("qos0-sensor"), &events, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let failure = gateway
        .wait_for_log("a refused QoS 0 upstream", TIMEOUT, |log| {
            log["message"].as_str().is_some_and(|m| m.starts_with("cannot connect upstream"))
                && log["error"].as_str().is_some_and(|e| e.contains("Maximum QoS"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    println!("reported: {failure}");
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    assert_eq!(buffered_at_stop(&gateway), N as u64, "every event stays buffered");
    let counters = gateway.final_counters().expect("final counters");
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    assert_eq!((count("upstream_connects"), count("upstream_sent")), (0, 0), "{counters:?}");
    assert!(count("upstream_failures") >= 1, "{counters:?}");
}

/// The MQTT 5 properties a sensor sets travel with its event to an MQTT 5 upstream: over a
/// live link, after an outage (from the buffer) and after a SIGKILL and restart (from the
/// buffer file). The message expiry bounds the event's life in the buffer: one whose 2 s ran
/// out while the link was down never arrives and is counted `expired`; one with 60 s arrives
/// with what remains of it (MQTT 5 §3.3.2.3.3), not the 60 s it was published with.
///
/// The upstream side is `mosquitto_sub -V mqttv5` with a format that prints every property,
/// so what is checked is what an MQTT 5 application upstream reads, through mosquitto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_properties_reach_the_upstream_live_after_an_outage_and_across_a_sigkill() {
    if !require_mosquitto() || !outpost_e2e::require_tool(MOSQUITTO_SUB, "mosquitto-clients") {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let subscriber = PropsSubscriber::start(upstream.addr(), "sensors/#").await.expect("subscribe upstream");
    let link = SwitchedLink::start(upstream.addr()).await.expect("start the link");
    let data = tempfile::tempdir().expect("tempdir");
    let config = format!("[upstream]\nurl = \"{}\"\nmqtt_version = \"5\"\n", link.url());
    let spec = GatewaySpec::new(data.path()).config_toml(config);
    let mut gateway = spec.clone().start().await.expect("start the gateway");
    gateway.wait_for_message("connected upstream", TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}"));

    // Live.
    sensor_publish(gateway.listen(), "live", Some(60)).expect("publish");
    let live =
        subscriber.wait_for("live", TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    live.assert_sensor_properties();
    assert!(live.expiry.is_some_and(|e| (59..=60).contains(&e)), "{live:?}");

    // Across an outage: acknowledged to the sensor from the buffer, sent after the reconnect.
    link.set_up(false);
    gateway
        .wait_for_message("upstream connection lost", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    sensor_publish(gateway.listen(), "after-outage", None).expect("publish");
    link.set_up(true);
    let after_outage = subscriber
        .wait_for("after-outage", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    after_outage.assert_sensor_properties();
    assert_eq!(after_outage.expiry, None, "no expiry was published, none is invented: {after_outage:?}");

    // Across a SIGKILL: with the link down nothing can be acknowledged upstream, so each
    // PUBACK came after its event's commit and the restarted gateway reads them from the file.
    // (No wait for the loss here: a second loss soon after a reconnect is not logged again.)
    link.set_up(false);
    let short_published = tokio::time::Instant::now();
    sensor_publish(gateway.listen(), "short-expiry", Some(2)).expect("publish");
    sensor_publish(gateway.listen(), "long-expiry", Some(60)).expect("publish");
    let long_acked = tokio::time::Instant::now();
    sensor_publish(gateway.listen(), "after-crash", None).expect("publish");
    gateway.kill().expect("SIGKILL the gateway");
    // What is tested here is the passing of time itself: the outage must outlast the 2 s
    // expiry. No event in the system marks that moment, so the test waits for the clock.
    let outage_ends = short_published + Duration::from_secs(3);
    tokio::time::sleep_until(outage_ends).await;
    link.set_up(true);
    let mut gateway = spec.start().await.expect("restart the gateway on the same buffer");
    let long = subscriber
        .wait_for("long-expiry", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let after_crash = subscriber
        .wait_for("after-crash", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    long.assert_sensor_properties();
    after_crash.assert_sensor_properties();
    // The gateway had `long-expiry` before its PUBACK and sent it after the restart, so at
    // least `waited` of its 60 s had passed: the upstream gets what remained, rounded up.
    let waited = outage_ends.duration_since(long_acked).as_secs_f64();
    let at_most = (60.0 - waited).ceil() as u32;
    assert!(at_most < 60, "the outage outlasted a second: {waited} s");
    assert!(
        long.expiry.is_some_and(|e| (1..=at_most).contains(&e)),
        "the remaining expiry (at most {at_most} s) was sent: {long:?}"
    );
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    // Events of one priority go out in order: once `long-expiry` arrived, `short-expiry`
    // (published before it) had been dealt with, and it never arrived.
    // At least once: an event acknowledged upstream shortly before the SIGKILL may come again
    // after the restart (its delete was not committed yet); first arrivals are exact.
    assert!(subscriber.messages().iter().all(|m| m.topic == "sensors/props/x"), "topics are unchanged");
    let payloads: Vec<String> = subscriber.messages().into_iter().map(|m| m.payload).collect();
    let mut seen = HashSet::new();
    let first_arrivals: Vec<&String> = payloads.iter().filter(|p| seen.insert(*p)).collect();
    assert_eq!(
        first_arrivals,
        ["live", "after-outage", "long-expiry", "after-crash"],
        "what arrived upstream, in order (all: {payloads:?})"
    );
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("expired").copied(), Some(1), "the expired event was counted: {counters:?}");
    let warning = gateway
        .messages("discarding events whose")
        .pop()
        .unwrap_or_else(|| panic!("no expiry warning\n{}", gateway.tail()));
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(buffered_at_stop(&gateway), 0, "nothing is left behind");
}

/// A rule's forward carries its source event's properties whatever the rule selects: here a
/// narrow `SELECT` and a new topic and payload (EMQX's republish would drop them unless the
/// rule selected `pub_props`; README "MQTT 5 properties and the upstream" says why not here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_forward_carries_the_sensors_properties_upstream() {
    if !require_mosquitto() || !outpost_e2e::require_tool(MOSQUITTO_SUB, "mosquitto-clients") {
        return;
    }
    const RULES: &str = r#"
[[rule]]
name = "readings"
sql = '''SELECT payload AS reading FROM "sensors/#"'''
[[rule.action]]
type = "forward"
topic = "sites/a/reading"
"#;
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let subscriber = PropsSubscriber::start(upstream.addr(), "sites/#").await.expect("subscribe upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).expect("write rules");
    let config = format!(
        "rules = {:?}\n[upstream]\nurl = \"{}\"\nmqtt_version = \"5\"\n",
        rules.to_str().expect("utf-8 path"),
        upstream.url()
    );
    let mut gateway =
        GatewaySpec::new(dir.path()).config_toml(config).start().await.expect("start the gateway");
    sensor_publish(gateway.listen(), "ruled", Some(60)).expect("publish");
    let forwarded = subscriber
        .wait_for_with("the rule's forward", TIMEOUT, |m| m.topic == "sites/a/reading")
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(forwarded.payload, r#"{"reading":"ruled"}"#, "the rule's own payload: {forwarded:?}");
    // The correlation data names the sensor's payload, not the rule's.
    let as_sent = PropsMessage { payload: "ruled".to_owned(), ..forwarded.clone() };
    as_sent.assert_sensor_properties();
    assert!(forwarded.expiry.is_some_and(|e| (59..=60).contains(&e)), "{forwarded:?}");
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
}

const MOSQUITTO_SUB: &str = "/usr/bin/mosquitto_sub";

/// What every sensor publish in the properties test carries, besides its message expiry.
const USER_PROPERTIES: [(&str, &str); 3] = [("site", "plant-a"), ("unit", "C"), ("site", "plant-b")];
const CONTENT_TYPE: &str = "text/plain; charset=utf-8";
const RESPONSE_TOPIC: &str = "replies/props-sensor";

/// An MQTT 5 QoS 1 publish with every property a message carries (`mosquitto_pub -D`), the
/// payload also naming its correlation data; returns after its PUBACK.
fn sensor_publish(listen: SocketAddr, payload: &str, expiry_secs: Option<u32>) -> anyhow::Result<()> {
    let correlation = format!("corr-{payload}");
    let expiry = expiry_secs.map(|s| s.to_string());
    let mut args = vec!["-V", "mqttv5", "-i", "props-sensor"];
    for (name, value) in USER_PROPERTIES {
        args.extend(["-D", "publish", "user-property", name, value]);
    }
    args.extend(["-D", "publish", "content-type", CONTENT_TYPE]);
    args.extend(["-D", "publish", "payload-format-indicator", "1"]);
    args.extend(["-D", "publish", "response-topic", RESPONSE_TOPIC]);
    args.extend(["-D", "publish", "correlation-data", &correlation]);
    if let Some(expiry) = &expiry {
        args.extend(["-D", "publish", "message-expiry-interval", expiry]);
    }
    outpost_e2e::upstream::mosquitto_pub_with(listen, "sensors/props/x", payload, 1, false, &args)
}

/// One message as `mosquitto_sub` printed it (see [`PropsSubscriber`]).
#[derive(Debug, Clone)]
struct PropsMessage {
    topic: String,
    payload: String,
    content_type: String,
    payload_format: String,
    response_topic: String,
    correlation: String,
    expiry: Option<u32>,
    /// `key:value` pairs in the order received.
    user_properties: Vec<String>,
}

impl PropsMessage {
    fn parse(line: &str) -> Option<PropsMessage> {
        let line = line.strip_prefix(PropsSubscriber::MARK)?;
        let fields: Vec<&str> = line.splitn(8, '|').collect();
        let [topic, payload, content_type, payload_format, response_topic, correlation, expiry, user] =
            fields[..]
        else {
            return None;
        };
        Some(PropsMessage {
            topic: topic.to_owned(),
            payload: payload.to_owned(),
            content_type: content_type.to_owned(),
            payload_format: payload_format.to_owned(),
            response_topic: response_topic.to_owned(),
            correlation: correlation.to_owned(),
            expiry: expiry.parse().ok(),
            // The values here have no spaces, so mosquitto_sub's space-separated list splits.
            user_properties: user.split(' ').filter(|p| !p.is_empty()).map(str::to_owned).collect(),
        })
    }

    /// Everything [`sensor_publish`] set arrived, user properties in order and ahead of the
    /// gateway's own `outpost-event-id`.
    #[track_caller]
    fn assert_sensor_properties(&self) {
        assert_eq!(
            (self.content_type.as_str(), self.payload_format.as_str(), self.response_topic.as_str()),
            (CONTENT_TYPE, "1", RESPONSE_TOPIC),
            "{self:?}"
        );
        assert_eq!(self.correlation, format!("corr-{}", self.payload), "{self:?}");
        let sent: Vec<String> = USER_PROPERTIES.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        assert_eq!(self.user_properties.len(), sent.len() + 1, "{self:?}");
        assert_eq!(self.user_properties[..sent.len()], sent[..], "{self:?}");
        assert!(self.user_properties[sent.len()].starts_with(&format!("{EVENT_ID_PROPERTY}:")), "{self:?}");
    }
}

/// `mosquitto_sub -V mqttv5 -q 1` on the upstream, printing each message's topic, payload and
/// MQTT 5 properties on one line. Killed when dropped.
struct PropsSubscriber {
    process: outpost_e2e::process::ChildProcess,
}

impl PropsSubscriber {
    /// Starts each message's line, so a debug line (`-d`) is never taken for a message.
    const MARK: &'static str = "MSG|";

    async fn start(broker: SocketAddr, filter: &str) -> anyhow::Result<PropsSubscriber> {
        // mosquitto_sub does not flush a piped stdout per message; stdbuf (coreutils) makes
        // it line-buffered, then execs it, so the child is mosquitto_sub itself.
        let mut command = std::process::Command::new("stdbuf");
        let port = broker.port().to_string();
        let host = broker.ip().to_string();
        let format = format!("{}%t|%p|%C|%F|%R|%D|%E|%P", PropsSubscriber::MARK);
        command.args([
            "-oL",
            MOSQUITTO_SUB,
            "-d",
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-h",
            &host,
            "-p",
            &port,
            "-t",
            filter,
            "-F",
            &format,
        ]);
        let process = outpost_e2e::process::ChildProcess::spawn("mosquitto_sub", command)?;
        process.wait_for_line("its SUBACK", TIMEOUT, |line| line.contains("received SUBACK")).await?;
        Ok(PropsSubscriber { process })
    }

    async fn wait_for(&self, payload: &str, timeout: Duration) -> anyhow::Result<PropsMessage> {
        self.wait_for_with(&format!("the message {payload:?}"), timeout, |m| m.payload == payload).await
    }

    async fn wait_for_with(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&PropsMessage) -> bool,
    ) -> anyhow::Result<PropsMessage> {
        let line = self
            .process
            .wait_for_line(what, timeout, |line| PropsMessage::parse(line).is_some_and(|m| predicate(&m)))
            .await?;
        PropsMessage::parse(&line).context("parsed above")
    }

    fn messages(&self) -> Vec<PropsMessage> {
        self.process.lines().iter().filter_map(|line| PropsMessage::parse(line)).collect()
    }
}

/// Events of each kind in the ACL scenario.
const ACL_EACH: usize = 50;

/// What one run of [`run_acl_scenario`] observed, after the gateway stopped.
struct AclOutcome {
    /// The `ok` events in publish order.
    expected: Vec<(String, Vec<u8>)>,
    /// What the upstream subscriber received, in arrival order.
    received: Vec<(String, Vec<u8>)>,
    counters: BTreeMap<String, u64>,
    wire: Wire,
}

/// Relays [`ACL_EACH`] events to `sensors/ok/x` and as many to `sensors/denied/x`, interleaved
/// and followed by one last `ok` event, through a gateway speaking MQTT 5 to a mosquitto whose
/// ACL lets anonymous clients write only `sensors/ok/#` (and read everything). Returns once the
/// gateway stopped; asserts what holds in every variant: the refusals were logged, and the
/// gateway drained its buffer.
async fn run_acl_scenario(extra_mosquitto_config: &str, extra_upstream_config: &str) -> AclOutcome {
    // Topic lines before any `user` line apply to anonymous clients.
    let acl_dir = tempfile::tempdir().expect("tempdir");
    let acl = acl_dir.path().join("acl");
    std::fs::write(&acl, "topic write sensors/ok/#\ntopic read #\n").expect("write the ACL file");
    let upstream = Mosquitto::start_with(&format!("acl_file {}\n{extra_mosquitto_config}", acl.display()))
        .await
        .expect("start mosquitto");
    let mut subscriber = subscribe_v5(upstream.addr(), "sensors/#").await.expect("subscribe upstream");
    let probe = WireProbe::start(upstream.addr()).await.expect("start the wire probe");
    probe.release();
    let data = tempfile::tempdir().expect("tempdir");
    let config =
        format!("[upstream]\nurl = \"{}\"\nmqtt_version = \"5\"\n{extra_upstream_config}", probe.url());
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    let mut events: Vec<(String, Vec<u8>)> = (0..ACL_EACH)
        .flat_map(|i| {
            [
                ("sensors/ok/x".to_owned(), format!("ok {i}").into_bytes()),
                ("sensors/denied/x".to_owned(), format!("denied {i}").into_bytes()),
            ]
        })
        .collect();
    // Sent after every denied event (one priority, sequence order, and a lost connection
    // resends from the oldest unacknowledged): once it arrived, each denied event was refused.
    let last = ("sensors/ok/x".to_owned(), b"ok last".to_vec());
    events.push(last.clone());
    let expected: Vec<(String, Vec<u8>)> =
        events.iter().filter(|(topic, _)| topic == "sensors/ok/x").cloned().collect();
    publish_each_qos1(gateway.listen(), &unique_client_id("acl-sensor"), &events, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    subscriber
        .wait_for_messages("the last `ok` event", TIMEOUT, |messages| {
            messages.iter().any(|m| (&m.topic, &m.payload) == (&last.0, &last.1))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", gateway.tail(), upstream.tail()));

    // SIGTERM: the relay waits for the PUBACKs still in flight, then stops.
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    assert_eq!(buffered_at_stop(&gateway), 0, "the refused events left the buffer, the rest was acked");
    let warnings = gateway.messages("the upstream refused an event");
    let warning = warnings.first().unwrap_or_else(|| panic!("no refusal warning\n{}", gateway.tail()));
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["reason"], "NotAuthorized (0x87)", "{warning}");

    let counters = gateway.final_counters().expect("final counters");
    let received = subscriber.messages();
    let wire = probe.wire();
    println!("acl upstream: {wire:?}; gateway counters: {counters:?}");
    AclOutcome { expected, received, counters, wire }
}

/// `buffered_events` of the gateway's final `relay stopped` line.
fn buffered_at_stop(gateway: &GatewayProcess) -> u64 {
    let stopped = gateway
        .messages("relay stopped")
        .pop()
        .unwrap_or_else(|| panic!("no `relay stopped` line\n{}", gateway.tail()));
    stopped["buffered_events"].as_u64().unwrap_or_else(|| panic!("no buffered_events: {stopped}"))
}

/// Where two sequences first differ, for a failure message that does not print hundreds of
/// payloads.
fn first_difference<T: std::fmt::Debug + PartialEq>(got: &[T], expected: &[T]) -> String {
    match got.iter().zip(expected).position(|(g, e)| g != e) {
        Some(i) => format!("first difference at #{i}: got {:?}, expected {:?}", got[i], expected[i]),
        None if got.len() != expected.len() => {
            format!("one is a prefix of the other (lengths {} and {})", got.len(), expected.len())
        }
        None => "equal".to_owned(),
    }
}

/// The harness's recorder over MQTT 5 with a clean start: it keeps each message's user
/// properties (3.1.1 has none), and returns once the broker granted `filter` at QoS 1.
async fn subscribe_v5(broker: SocketAddr, filter: &str) -> anyhow::Result<Subscriber> {
    let options = SubscriberOptions { version: MqttVersion::V5, ..SubscriberOptions::default() };
    Subscriber::start_with(broker, filter, options).await
}

/// What [`WireProbe`] saw on the MQTT stream between the gateway and the upstream.
#[derive(Debug, Clone, Default)]
struct Wire {
    /// Connections piped through to the upstream.
    connections: u64,
    /// PUBLISH packets from the gateway (any QoS).
    publishes: u64,
    /// The largest PUBLISH packet from the gateway, in bytes (fixed header included).
    largest_publish: usize,
    /// Packet ids of the current connection's QoS 1/2 publishes that no PUBACK answered yet.
    awaiting: HashSet<u16>,
    /// The most publishes ever awaiting their PUBACK at once.
    max_awaiting: usize,
    /// Publishes that reused a packet id still awaiting its PUBACK.
    pkid_reused: u64,
    /// PUBACKs from the upstream by reason code (0x00 when the packet carries none).
    puback_reasons: BTreeMap<u8, u64>,
    /// Reason codes of DISCONNECTs from the upstream.
    upstream_disconnects: Vec<u8>,
    /// Packets that could not be parsed (either direction).
    malformed: u64,
}

/// A TCP proxy between the gateway and the upstream that decodes the MQTT framing both ways
/// and counts what passes (see [`Wire`]). It holds every connection, unanswered, until
/// [`release`](Self::release)d. It runs on the test's runtime: it is part of the set-up.
///
/// Why it can judge the receive maximum: it counts a publish before forwarding it to the
/// upstream and a PUBACK before forwarding it to the gateway. So its count of publishes
/// awaiting a PUBACK is never above the gateway's own: a gateway that keeps within the limit
/// never shows more than the limit here, and one that writes more publishes at once than the
/// limit shows them all, because mosquitto cannot acknowledge what it has not been sent yet.
struct WireProbe {
    addr: SocketAddr,
    release: watch::Sender<bool>,
    wire: Arc<Mutex<Wire>>,
    _stop: DropGuard,
}

impl WireProbe {
    async fn start(upstream: SocketAddr) -> anyhow::Result<WireProbe> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("cannot bind the wire probe")?;
        let addr = listener.local_addr()?;
        let (release, released) = watch::channel(false);
        let wire = Arc::new(Mutex::new(Wire::default()));
        let cancel = CancellationToken::new();
        let (stop, wire_for_task) = (cancel.clone(), Arc::clone(&wire));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((gateway_side, _)) = accepted else { continue };
                tokio::spawn(probe_connection(
                    gateway_side,
                    upstream,
                    released.clone(),
                    Arc::clone(&wire_for_task),
                    stop.clone(),
                ));
            }
        });
        Ok(WireProbe { addr, release, wire, _stop: cancel.drop_guard() })
    }

    /// The address as the gateway's `upstream.url`.
    fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// Lets held and future connections through to the upstream.
    fn release(&self) {
        self.release.send_replace(true);
    }

    fn wire(&self) -> Wire {
        self.wire.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// One proxied connection: held until released, then piped both ways until either side closes.
async fn probe_connection(
    gateway_side: TcpStream,
    upstream: SocketAddr,
    mut released: watch::Receiver<bool>,
    wire: Arc<Mutex<Wire>>,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => return,
        released = released.wait_for(|&released| released) => if released.is_err() { return },
    }
    // Failing to reach the upstream drops the gateway's connection: it sees the link fail.
    let Ok(upstream_side) = TcpStream::connect(upstream).await else { return };
    {
        let mut wire = wire.lock().unwrap_or_else(PoisonError::into_inner);
        wire.connections += 1;
        // A new connection starts with no packet ids in use.
        wire.awaiting.clear();
    }
    let (from_gateway, to_gateway) = gateway_side.into_split();
    let (from_upstream, to_upstream) = upstream_side.into_split();
    let up = forward(from_gateway, to_upstream, true, Arc::clone(&wire));
    let down = forward(from_upstream, to_gateway, false, wire);
    tokio::select! {
        () = stop.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

/// Copies `from` to `to`, recording each complete MQTT packet in `wire` before forwarding it.
async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, to_upstream: bool, wire: Arc<Mutex<Wire>>) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        {
            let mut wire = wire.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                match fixed_header(&pending) {
                    Ok(Some((byte1, header, remaining))) if pending.len() >= header + remaining => {
                        let body = &pending[header..header + remaining];
                        if to_upstream {
                            observe_from_gateway(&mut wire, byte1, header + remaining, body);
                        } else {
                            observe_from_upstream(&mut wire, byte1, body);
                        }
                        pending.drain(..header + remaining);
                    }
                    Ok(_) => break,
                    Err(MalformedHeader) => {
                        wire.malformed += 1;
                        pending.clear();
                        break;
                    }
                }
            }
        }
        if to.write_all(&chunk[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn observe_from_gateway(wire: &mut Wire, byte1: u8, size: usize, body: &[u8]) {
    if byte1 >> 4 != 3 {
        return;
    }
    wire.publishes += 1;
    wire.largest_publish = wire.largest_publish.max(size);
    if (byte1 >> 1) & 3 == 0 {
        return;
    }
    let Some(topic_len) = body.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
        wire.malformed += 1;
        return;
    };
    let Some(pkid) = body.get(2 + topic_len..4 + topic_len).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        wire.malformed += 1;
        return;
    };
    if !wire.awaiting.insert(pkid) {
        wire.pkid_reused += 1;
    }
    wire.max_awaiting = wire.max_awaiting.max(wire.awaiting.len());
}

fn observe_from_upstream(wire: &mut Wire, byte1: u8, body: &[u8]) {
    match byte1 {
        0x40 if body.len() >= 2 => {
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            *wire.puback_reasons.entry(body.get(2).copied().unwrap_or(0)).or_default() += 1;
            wire.awaiting.remove(&pkid);
        }
        0xE0 => wire.upstream_disconnects.push(body.first().copied().unwrap_or(0)),
        _ => {}
    }
}
