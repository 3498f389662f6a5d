//! Hostile clients: one sensor (or actuator) that misbehaves on purpose must cost only its own
//! connection, never the gateway's uplink, its local fan-out or its ability to stop.
//!
//! These are Outpost-only, not conformance scenarios against mosquitto: what they check lives
//! behind the broker (the store-and-forward uplink and its counters, the local fan-out every
//! delivery goes through, the gateway's single pipeline thread and its shutdown, its log), which
//! mosquitto has no counterpart of. What a client can see of the same misbehaviour — the broker
//! closing the connection of a client that publishes to a topic with U+0000, QoS 0 publishes
//! reaching a QoS 1 subscriber past 100 in-flight deliveries — is compared with mosquitto in
//! `conformance.rs`. The reproducers of issue #20's crashes (rumqttd's router, since replaced)
//! are here byte for byte.
//!
//! The misbehaving clients are hand-written ([`RawClient`], `outpost_e2e::raw`): rumqttc will
//! not publish to a wildcard or U+0000 topic, use a topic alias the broker did not offer, put a
//! subscription identifier in a PUBLISH, or withhold every PUBACK.
//!
//! Every wait is on an event (a packet, the connection closing, a message arriving, a log
//! line, the process exiting) and bounded; a healthy run of each test takes one to two seconds.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use outpost_e2e::conformance::{
    Answer, CONNACK_TIMEOUT, Client4, Code, ConnectOutcome, PublishOutcome, RawClient, Received, Recorder,
    options4, packet_type, raw_connect_outcome,
};
use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::raw;
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use rumqttc::QoS;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;

/// Bound for anything a healthy gateway does in well under a second.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A topic with U+0000 in the middle: valid UTF-8, forbidden in every MQTT string.
const NUL_TOPIC: &str = "sensors/bad\u{0}topic";

// ---------------------------------------------------------------------------------------------
// A poison topic never reaches the uplink.

/// Events published after the poison attempts; all of them must arrive upstream.
const AFTER_POISON: usize = 50;

/// How a broker refused a publish, its reason code left out (`conformance.rs` compares that
/// with mosquitto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The connection closed (MQTT 3.1.1 has no other way).
    Closed,
    /// An MQTT 5 DISCONNECT with an error code (0x80 or above), then the connection closed.
    ErrorDisconnect,
    /// Anything else, e.g. a PUBACK: not refused.
    Not(Answer),
}

impl From<Answer> for Refusal {
    fn from(answer: Answer) -> Refusal {
        match answer {
            Answer::Closed => Refusal::Closed,
            Answer::Disconnect { reason: Code(0x80..), then_closed: true } => Refusal::ErrorDisconnect,
            other => Refusal::Not(other),
        }
    }
}

/// What [`a_poison_topic_never_reaches_the_uplink`] observed.
#[derive(Debug, PartialEq)]
struct Poisoned {
    /// A QoS 1 publish to [`NUL_TOPIC`], over MQTT 3.1.1 and 5.
    publish_v311: Refusal,
    publish_v5: Refusal,
    /// A CONNECT with a will on `w/#`, over MQTT 3.1.1 and 5.
    will_v311: ConnectOutcome,
    will_v5: ConnectOutcome,
    /// Packets only a server sends, from an MQTT 5 client: an UNSUBACK (the six bytes the
    /// `sensor_wire` fuzzer found; rumqttd's decoder panicked on them, which aborted the
    /// gateway) and a CONNACK.
    unsuback_v5: Refusal,
    connack_v5: Refusal,
    /// Whether every well-formed event published afterwards was acknowledged.
    after_acked: bool,
    /// What arrived upstream, as `(topic, payload)`.
    upstream: Vec<(String, String)>,
    /// Whether the gateway exited 0 after SIGTERM.
    clean_exit: bool,
    /// Final counters: publishes and wills that entered the pipeline, wills published, uplink
    /// connections and their failures.
    ingested: u64,
    wills_published: u64,
    upstream_connects: u64,
    upstream_failures: u64,
}

/// A publish to a topic with U+0000 and a will on a wildcard topic would, once in the buffer,
/// be sent upstream, where the broker closes the uplink for it — again after every reconnect,
/// so nothing behind it would ever be delivered. The gateway refuses both at the door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_topic_never_reaches_the_uplink() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).upstream(upstream.url()).start().await.expect("start the gateway");
    gateway.wait_for_message("connected upstream", TIMEOUT).await.expect("the uplink connects");
    let listen = gateway.listen();

    let publish_v311 = poison(
        listen,
        &raw::connect_v311("poisoner-311", 30),
        &raw::publish_v311(NUL_TOPIC, 1, 1, false, b"p"),
    )
    .await;
    let publish_v5 =
        poison(listen, &raw::connect_v5("poisoner-5", 30), &raw::publish_v5(NUL_TOPIC, 1, 1, &[], b"p"))
            .await;
    // Each will client goes away without a DISCONNECT (the raw client is dropped), which is
    // when an accepted will would be published.
    let will_v311 =
        raw_connect_outcome(listen, "will-311", &raw::connect_v311_with_will("will-311", 30, "w/#", b"gone"))
            .await;
    let will_v5 =
        raw_connect_outcome(listen, "will-5", &raw::connect_v5_with_will("will-5", 30, "w/#", b"gone")).await;

    let unsuback_v5 =
        poison(listen, &raw::connect_v5("unsuback-5", 30), &[0xB2, 0x02, 0x17, 0xC7, 0x0A, 0x02]).await;
    let connack_v5 = poison(listen, &raw::connect_v5("connack-5", 30), &[0x20, 0x03, 0x00, 0x00, 0x00]).await;

    let payloads: Vec<String> = (0..AFTER_POISON).map(|n| format!("{{\"n\":{n}}}")).collect();
    let bytes = payloads.iter().map(|p| p.clone().into_bytes());
    let after = publish_qos1(listen, "sensor-after", "sensors/after", bytes, TIMEOUT).await;
    if let Err(error) = &after {
        eprintln!("the events after the poison: {error:#}");
    }
    // Ends as soon as they all arrived; a failure shows in the comparison below.
    if let Err(error) = subscriber.wait_for_count(AFTER_POISON as u64, TIMEOUT).await {
        eprintln!("upstream: {error:#}\n{}", upstream.tail());
    }

    let exit = gateway.terminate().await;
    let counters = gateway.final_counters().unwrap_or_default();
    // The `stopped` line lists the counters that are not 0.
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0);
    let observed = Poisoned {
        publish_v311: publish_v311.into(),
        publish_v5: publish_v5.into(),
        will_v311,
        will_v5,
        unsuback_v5: unsuback_v5.into(),
        connack_v5: connack_v5.into(),
        after_acked: after.is_ok(),
        upstream: subscriber
            .messages()
            .into_iter()
            .map(|(topic, payload)| (topic, String::from_utf8_lossy(&payload).into_owned()))
            .collect(),
        clean_exit: exit.is_ok_and(|status| status.success()),
        ingested: counter("ingested"),
        wills_published: counter("wills_published"),
        upstream_connects: counter("upstream_connects"),
        upstream_failures: counter("upstream_failures"),
    };
    let expected = Poisoned {
        publish_v311: Refusal::Closed,
        publish_v5: Refusal::ErrorDisconnect,
        // MQTT 3.1.1 has no CONNACK code for an invalid will topic: the connection is closed.
        will_v311: ConnectOutcome::Closed,
        // MQTT 5: 0x90 "topic name invalid".
        will_v5: ConnectOutcome::Refused(Code(0x90)),
        unsuback_v5: Refusal::ErrorDisconnect,
        connack_v5: Refusal::ErrorDisconnect,
        after_acked: true,
        // Exactly the well-formed events, in order.
        upstream: payloads.into_iter().map(|p| ("sensors/after".to_owned(), p)).collect(),
        clean_exit: true,
        // Nothing poisoned entered the pipeline.
        ingested: AFTER_POISON as u64,
        wills_published: 0,
        // One uplink connection, never lost: no reconnect loop.
        upstream_connects: 1,
        upstream_failures: 0,
    };
    assert_eq!(observed, expected, "final counters: {counters:?}\n{}", gateway.tail());
    // At least the two refused publishes (the refused wills may be counted too).
    assert!(counter("protocol_errors") >= 2, "the refused publishes are counted: {counters:?}");
}

/// Connects a raw client with `connect`, sends `publish` and returns the gateway's answer.
async fn poison(addr: SocketAddr, connect: &[u8], publish: &[u8]) -> Answer {
    let mut client = RawClient::connect(addr, "poisoner", connect).await.expect("the poisoner is accepted");
    // A failed write (the gateway may close early) still leaves its answer to be read.
    let _ = client.send(publish).await;
    client.answer().await
}

// ---------------------------------------------------------------------------------------------
// Packet-id exhaustion cannot hang the gateway.

/// SUBSCRIBE packets the hoarder sends. Each one makes the broker send the retained message
/// again (MQTT-3.8.4-3), at QoS 1 while it can: more than the 65,535 packet ids there are,
/// none of them ever acknowledged.
const SUBSCRIBES: usize = 70_000;
/// QoS 1 publishes the second client sends while the hoarder holds its deliveries.
const BYSTANDER_PUBLISHES: usize = 10;

/// What the hoarder's reader has seen so far.
#[derive(Debug, Clone, Default)]
struct Hoard {
    subacks: usize,
    qos0: usize,
    qos1: usize,
    /// QoS 1 deliveries that reused a packet id still unacknowledged (all of them are).
    reused_ids: usize,
    /// Packets other than SUBACK and well-formed PUBLISH, by first byte.
    other: Vec<u8>,
    closed: bool,
}

/// Reads everything the gateway sends the hoarder and never acknowledges any of it.
async fn read_hoard(mut read: tokio::net::tcp::OwnedReadHalf, hoard: watch::Sender<Hoard>) {
    let mut unacked = HashSet::new();
    loop {
        let Ok((first_byte, body)) = raw::read_packet(&mut read).await else {
            hoard.send_modify(|hoard| hoard.closed = true);
            return;
        };
        hoard.send_modify(|hoard| match first_byte >> 4 {
            packet_type::SUBACK => hoard.subacks += 1,
            packet_type::PUBLISH if (first_byte >> 1) & 0b11 == 0 => hoard.qos0 += 1,
            packet_type::PUBLISH => match packet_id(&body) {
                Some(id) => {
                    hoard.qos1 += 1;
                    if !unacked.insert(id) {
                        hoard.reused_ids += 1;
                    }
                }
                None => hoard.other.push(first_byte),
            },
            _ => hoard.other.push(first_byte),
        });
    }
}

/// The packet id of a QoS 1 or 2 PUBLISH `body`; `None` if it is too short to hold one.
fn packet_id(body: &[u8]) -> Option<u16> {
    let topic_length = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let id = body.get(2 + topic_length..4 + topic_length)?;
    Some(u16::from_be_bytes([id[0], id[1]]))
}

/// A client that subscribes to a retained QoS 1 message over and over and never sends a
/// PUBACK must not be able to exhaust its packet ids into a hang: the gateway keeps serving
/// others, and stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_id_exhaustion_cannot_hang_the_gateway() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("start the gateway");
    let listen = gateway.listen();

    let mut retainer = Client4::connect(options4(listen, "retainer")).await.expect("the retainer connects");
    let retained = retainer.publish("r/x", QoS::AtLeastOnce, true, b"kept").await;
    assert_eq!(retained, PublishOutcome::Acked, "the retained publish\n{}", gateway.tail());
    retainer.disconnect().await;

    let hoarder = RawClient::connect(listen, "hoarder", &raw::connect_v311("hoarder", 0))
        .await
        .unwrap_or_else(|outcome| panic!("the hoarder is accepted: {outcome:?}\n{}", gateway.tail()));
    let (read, mut write) = hoarder.into_split();
    let (hoard_tx, mut hoard) = watch::channel(Hoard::default());
    let reader = tokio::spawn(read_hoard(read, hoard_tx));
    let flood: Vec<u8> = (0..SUBSCRIBES)
        .flat_map(|n| raw::subscribe_v311(u16::try_from(n % 65_535 + 1).expect("below 65,536"), "r/#", 1))
        .collect();
    let started = Instant::now();
    // Written from a task of its own: the reader must keep reading while the flood goes out.
    let writer = tokio::spawn(async move {
        write.write_all(&flood).await?;
        write.flush().await?;
        // Kept open (no FIN) until the test ends: the hoarder just stops talking.
        std::future::pending::<std::io::Result<()>>().await
    });

    // The gateway answers every SUBSCRIBE and sends the retained message for each.
    let flooded =
        tokio::time::timeout(TIMEOUT, hoard.wait_for(|h| h.closed || h.qos0 + h.qos1 >= SUBSCRIBES))
            .await
            .is_ok_and(|waited| waited.is_ok());
    let seen = hoard.borrow().clone();
    assert!(
        flooded && !seen.closed,
        "the hoarder got {} SUBACKs and {} retained deliveries of {SUBSCRIBES} within {TIMEOUT:?} (closed: {})\n{}",
        seen.subacks,
        seen.qos0 + seen.qos1,
        seen.closed,
        gateway.tail()
    );
    println!(
        "hoarder: {SUBSCRIBES} SUBSCRIBEs answered in {:?}: {} retained deliveries at QoS 1, {} at QoS 0",
        started.elapsed(),
        seen.qos1,
        seen.qos0
    );
    assert_eq!(seen.subacks, SUBSCRIBES, "one SUBACK per SUBSCRIBE: {seen:?}");
    assert_eq!(seen.reused_ids, 0, "no packet id reused while its delivery is unacknowledged: {seen:?}");
    assert!(seen.other.is_empty(), "only SUBACKs and PUBLISHes: {seen:?}");

    // Someone else connects, publishes and is acknowledged while the hoarder holds everything.
    let connecting = Instant::now();
    let mut bystander = Client4::connect(options4(listen, "bystander")).await.unwrap_or_else(|outcome| {
        panic!("the bystander gets a CONNACK within {CONNACK_TIMEOUT:?}: {outcome:?}\n{}", gateway.tail())
    });
    for n in 0..BYSTANDER_PUBLISHES {
        let published =
            bystander.publish("sensors/bystander", QoS::AtLeastOnce, false, n.to_string().as_bytes()).await;
        assert_eq!(published, PublishOutcome::Acked, "bystander publish {n}\n{}", gateway.tail());
    }
    println!("bystander: connected and {BYSTANDER_PUBLISHES} PUBACKs in {:?}", connecting.elapsed());
    bystander.disconnect().await;

    // SIGTERM with the hoarder still connected and still owed every PUBACK.
    let stopping = Instant::now();
    let status = gateway.terminate().await.unwrap_or_else(|e| panic!("the gateway stops on SIGTERM: {e:#}"));
    println!("gateway: stopped in {:?}", stopping.elapsed());
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    writer.abort();
    reader.abort();
}

// ---------------------------------------------------------------------------------------------
// A topic alias or a subscription identifier in a PUBLISH costs only the sender's connection.

/// Messages the well-behaved client publishes afterwards.
const AFTER_REFUSED: usize = 10;

/// What [`a_v5_publish_with_topic_alias_or_subscription_identifier_is_refused_and_fan_out_goes_on`]
/// observed.
#[derive(Debug, PartialEq)]
struct FanOut {
    /// The answers to a PUBLISH with a topic alias, and to one with a subscription identifier.
    aliased: Answer,
    identified: Answer,
    /// Whether the well-behaved client's publishes were all acknowledged.
    after_acked: bool,
    /// What a local subscriber from before and one from after received.
    before: Vec<Received>,
    after: Vec<Received>,
    /// Whether the gateway exited 0 after SIGTERM.
    clean_exit: bool,
    protocol_errors: u64,
}

/// A PUBLISH with a topic alias the CONNACK did not offer, or with a subscription identifier
/// (only a server may send one), is a protocol error: the sender's connection is closed, and
/// delivery keeps working for everyone else. (rumqttd's router, which Outpost used for local
/// fan-out until issue #20, disconnected the one internal link all deliveries shared for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_publish_with_topic_alias_or_subscription_identifier_is_refused_and_fan_out_goes_on() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("start the gateway");
    let listen = gateway.listen();
    let mut before = Recorder::start(listen, "a/#", QoS::AtLeastOnce).await.expect("the local subscriber");

    // Topic alias 1 (QoS 1), although the CONNACK offered none.
    let mut aliaser = RawClient::connect(listen, "aliaser", &raw::connect_v5("aliaser", 30))
        .await
        .unwrap_or_else(|outcome| panic!("the aliaser is accepted: {outcome:?}\n{}", gateway.tail()));
    let properties = raw::connack_properties(aliaser.connack()).expect("well-formed CONNACK properties");
    let alias_maximum = properties.iter().find(|(id, _)| *id == raw::property::TOPIC_ALIAS_MAXIMUM);
    assert!(
        alias_maximum.is_none_or(|(_, value)| value == &[0, 0]),
        "the CONNACK offers no topic aliases (maximum absent or 0): {properties:?}"
    );
    let _ = aliaser.send(&raw::publish_v5("a/b", 1, 1, &raw::topic_alias(1), b"aliased")).await;
    let aliased = aliaser.answer().await;

    // A subscription identifier, which only a server may put in a PUBLISH (QoS 0 this time).
    let mut identifier = RawClient::connect(listen, "identifier", &raw::connect_v5("identifier", 30))
        .await
        .unwrap_or_else(|outcome| panic!("the second client is accepted: {outcome:?}\n{}", gateway.tail()));
    let _ =
        identifier.send(&raw::publish_v5("a/b", 0, 0, &raw::subscription_identifier(1), b"identified")).await;
    let identified = identifier.answer().await;

    // Local fan-out goes on, for a subscriber from before and one from after.
    let mut after = Recorder::start(listen, "a/#", QoS::AtLeastOnce).await.expect("a new local subscriber");
    let payloads: Vec<String> = (0..AFTER_REFUSED).map(|n| n.to_string()).collect();
    let bytes = payloads.iter().map(|p| p.clone().into_bytes());
    let published = publish_qos1(listen, "well-behaved", "a/c", bytes, TIMEOUT).await;
    if let Err(error) = &published {
        eprintln!("the well-behaved client: {error:#}");
    }
    let all = |messages: &[Received]| messages.len() >= AFTER_REFUSED;
    let (before_received, after_received) =
        tokio::join!(before.wait_until(TIMEOUT, all), after.wait_until(TIMEOUT, all));

    let exit = gateway.terminate().await;
    let counters = gateway.final_counters().unwrap_or_default();
    let observed = FanOut {
        aliased,
        identified,
        after_acked: published.is_ok(),
        before: before_received,
        after: after_received,
        clean_exit: exit.is_ok_and(|status| status.success()),
        protocol_errors: counters.get("protocol_errors").copied().unwrap_or(0),
    };
    let refused = Answer::Disconnect { reason: Code(0x82), then_closed: true };
    let delivered: Vec<Received> = payloads.iter().map(|p| Received::new("a/c", p, 1, false)).collect();
    let expected = FanOut {
        aliased: refused,
        identified: refused,
        after_acked: true,
        // Every message to a/c, and nothing else.
        before: delivered.clone(),
        after: delivered,
        clean_exit: true,
        protocol_errors: 2,
    };
    assert_eq!(observed, expected, "final counters: {counters:?}\n{}", gateway.tail());
}

// ---------------------------------------------------------------------------------------------
// A subscriber that stops reading, and sends nothing, is dropped after its keepalive — also
// while the gateway is blocked writing to it.

/// QoS 0 publishes of [`FLOOD_PAYLOAD`] bytes sent at the stalled subscriber: far more than the
/// socket buffers between the gateway and it hold, so the gateway's write to it blocks.
const FLOOD: usize = 2_000;
const FLOOD_PAYLOAD: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_dropped_after_its_keepalive() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml("[broker]\nsys_interval = \"1s\"\n")
        .start()
        .await
        .expect("start the gateway");
    let listen = gateway.listen();
    let mut monitor = Recorder::start(listen, "$SYS/outpost/clients", QoS::AtMostOnce)
        .await
        .expect("the monitor subscribes");

    // Keepalive 1 s: the gateway drops it 1.5 s after the last byte it read from it.
    let mut stalled =
        RawClient::connect(listen, "stalled", &raw::connect_v311("stalled", 1)).await.expect("accepted");
    stalled.send(&raw::subscribe_v311(1, "flood/#", 0)).await.expect("subscribe");
    assert_eq!(stalled.answer().await, Answer::Packet { packet_type: packet_type::SUBACK });
    // From here on it reads nothing and sends nothing.
    let (_stalled_read, _stalled_write) = stalled.into_split();

    let mut flooder =
        RawClient::connect(listen, "flooder", &raw::connect_v311("flooder", 30)).await.expect("accepted");
    let publish = raw::publish_v311("flood/x", 0, 0, false, &vec![b'x'; FLOOD_PAYLOAD]);
    for _ in 0..FLOOD {
        flooder.send(&publish).await.expect("the gateway reads the flood");
    }
    drop(flooder);

    // The monitor is the only client left once the stalled one is dropped: a count of 1 after
    // one that included the stalled client.
    let dropped = |messages: &[Received]| {
        let count = |m: &Received| m.payload.parse::<u64>().unwrap_or(0);
        messages.iter().skip_while(|m| count(m) < 2).any(|m| count(m) == 1)
    };
    let seen = monitor.wait_until(Duration::from_secs(15), dropped).await;
    let counts: Vec<&str> = seen.iter().map(|m| m.payload.as_str()).collect();
    assert!(dropped(&seen), "the stalled subscriber is still connected: clients {counts:?}");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("keepalive_timeouts").copied(), Some(1), "{counters:?}");
}

// ---------------------------------------------------------------------------------------------
// Issue #20's crashes: each reproducer, byte for byte, then the gateway must still acknowledge
// and relay, and stop cleanly. (With rumqttd's router, each aborted the gateway.)

/// Events published after a reproducer; all must be acknowledged and arrive upstream.
const AFTER_CRASH: usize = 20;

/// CONNECT 3.1.1, clean session, keepalive 60 s, client id "r".
const CONNECT_R: [u8; 15] =
    [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'r'];
/// SUBSCRIBE packet id 1, "#" at QoS 0.
const SUBSCRIBE_ALL: [u8; 8] = [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x00];
/// PUBLISH QoS 0 to "ü" (U+00FC, two bytes in UTF-8), empty payload.
const PUBLISH_U_UMLAUT: [u8; 6] = [0x30, 0x04, 0x00, 0x02, 0xc3, 0xbc];
/// CONNECT 3.1.1, clean session 0 (persistent), keepalive 60 s, client id "p".
const CONNECT_P: [u8; 15] =
    [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x00, 0x00, 0x3c, 0x00, 0x01, b'p'];
/// SUBSCRIBE packet id 1, "$share/g/t" at QoS 1.
const SUBSCRIBE_SHARED: [u8; 17] =
    [0x82, 0x0f, 0x00, 0x01, 0x00, 0x0a, b'$', b's', b'h', b'a', b'r', b'e', b'/', b'g', b'/', b't', 0x01];
/// PUBLISH QoS 1, packet id 1, topic "t", empty payload.
const PUBLISH_T_QOS1: [u8; 7] = [0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x01];

/// A PUBLISH as a raw client read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawPublish {
    topic: String,
    qos: u8,
    dup: bool,
    packet_id: Option<u16>,
    payload: Vec<u8>,
}

impl RawPublish {
    fn parse(first_byte: u8, body: &[u8]) -> Option<RawPublish> {
        if first_byte >> 4 != packet_type::PUBLISH {
            return None;
        }
        let qos = (first_byte >> 1) & 0b11;
        let topic_length = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
        let topic = String::from_utf8(body.get(2..2 + topic_length)?.to_vec()).ok()?;
        let (packet_id, rest) =
            if qos > 0 { (packet_id(body), 4 + topic_length) } else { (None, 2 + topic_length) };
        Some(RawPublish {
            topic,
            qos,
            dup: first_byte & 0x08 != 0,
            packet_id,
            payload: body.get(rest..)?.to_vec(),
        })
    }
}

/// Reads until a PUBLISH arrives (other packets, e.g. PUBACKs, are skipped); `None` if the
/// connection closed or nothing came within [`TIMEOUT`].
async fn next_publish(client: &mut RawClient) -> Option<RawPublish> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match client.read(deadline.saturating_duration_since(Instant::now())).await {
            outpost_e2e::conformance::RawRead::Packet { first_byte, body } => {
                if let Some(publish) = RawPublish::parse(first_byte, &body) {
                    return Some(publish);
                }
            }
            _ => return None,
        }
    }
}

/// After a reproducer: a fresh sensor's QoS 1 events are all acknowledged and arrive upstream
/// in order, and the gateway exits 0 on SIGTERM. Returns what failed, if anything.
async fn still_serving(
    gateway: &mut outpost_e2e::gateway::GatewayProcess,
    upstream: &mut Subscriber,
    topic: &str,
) -> Result<(), String> {
    let payloads: Vec<String> = (0..AFTER_CRASH).map(|n| format!("{{\"n\":{n}}}")).collect();
    let bytes = payloads.iter().map(|p| p.clone().into_bytes());
    publish_qos1(gateway.listen(), "after-crash", topic, bytes, TIMEOUT)
        .await
        .map_err(|e| format!("the events after the reproducer: {e:#}"))?;
    upstream.wait_for_count(AFTER_CRASH as u64, TIMEOUT).await.map_err(|e| format!("upstream: {e:#}"))?;
    let arrived: Vec<(String, String)> =
        upstream.messages().into_iter().map(|(t, p)| (t, String::from_utf8_lossy(&p).into_owned())).collect();
    let expected: Vec<(String, String)> = payloads.into_iter().map(|p| (topic.to_owned(), p)).collect();
    if arrived != expected {
        return Err(format!("upstream got {arrived:?}, expected {expected:?}"));
    }
    let status = gateway.terminate().await.map_err(|e| format!("SIGTERM: {e:#}"))?;
    if !status.success() {
        return Err(format!("exit status {status}"));
    }
    Ok(())
}

/// Issue #20, crash 1: rumqttd's `matches()` sliced `topic[..1]`, which panics on a topic whose
/// first character is not ASCII, as soon as a `#` subscription existed. Non-ASCII topics under
/// every kind of wildcard are delivered like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_ascii_topic_under_a_wildcard_subscription_is_delivered_and_the_gateway_stays_up() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut upstream_sub =
        Subscriber::start(upstream.addr(), "after/#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).upstream(upstream.url()).start().await.expect("start the gateway");
    gateway.wait_for_message("connected upstream", TIMEOUT).await.expect("the uplink connects");
    let listen = gateway.listen();

    let mut plus = Recorder::start(listen, "+/salon", QoS::AtLeastOnce).await.expect("subscribe +/salon");
    let mut deep = Recorder::start(listen, "site/+/#", QoS::AtMostOnce).await.expect("subscribe site/+/#");
    let mut client = RawClient::connect(listen, "r", &CONNECT_R)
        .await
        .unwrap_or_else(|outcome| panic!("r is accepted: {outcome:?}\n{}", gateway.tail()));
    client.send(&SUBSCRIBE_ALL).await.expect("SUBSCRIBE #");
    assert_eq!(client.answer().await, Answer::Packet { packet_type: packet_type::SUBACK });
    client.send(&PUBLISH_U_UMLAUT).await.expect("PUBLISH ü");
    let echoed = next_publish(&mut client).await;
    assert_eq!(
        echoed,
        Some(RawPublish { topic: "ü".to_owned(), qos: 0, dup: false, packet_id: None, payload: Vec::new() }),
        "the `#` subscriber gets its own publish to ü\n{}",
        gateway.tail()
    );
    for (topic, payload) in [("température/salon", "21.5"), ("site/温度/1", "22"), ("€", "x")] {
        publish_qos1(listen, "non-ascii", topic, [payload.as_bytes().to_vec()], TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("publish to {topic}: {e:#}\n{}", gateway.tail()));
    }
    let mut under_all = Vec::new();
    while under_all.len() < 3 {
        match next_publish(&mut client).await {
            Some(p) => under_all.push(p.topic),
            None => break,
        }
    }
    assert_eq!(under_all, ["température/salon", "site/温度/1", "€"], "`#` matches non-ASCII topics");
    let got = plus.wait_until(TIMEOUT, |m| !m.is_empty()).await;
    assert_eq!(got, [Received::new("température/salon", "21.5", 1, false)]);
    let got = deep.wait_until(TIMEOUT, |m| !m.is_empty()).await;
    assert_eq!(got, [Received::new("site/温度/1", "22", 0, false)]);

    if let Err(failure) = still_serving(&mut gateway, &mut upstream_sub, "after/umlaut").await {
        panic!("{failure}\n{}", gateway.tail());
    }
}

/// Issue #20, crash 2: a persistent session alone in a shared-subscription group that left
/// with a delivery unacknowledged made rumqttd's router panic ("group must exists"). Its
/// session is kept: on reconnect the delivery comes again (DUP), and the group goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_shared_subscriber_leaving_a_delivery_unacknowledged_gets_it_again() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut upstream_sub =
        Subscriber::start(upstream.addr(), "after/#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).upstream(upstream.url()).start().await.expect("start the gateway");
    gateway.wait_for_message("connected upstream", TIMEOUT).await.expect("the uplink connects");
    let listen = gateway.listen();

    let mut client = RawClient::connect(listen, "p", &CONNECT_P)
        .await
        .unwrap_or_else(|outcome| panic!("p is accepted: {outcome:?}\n{}", gateway.tail()));
    client.send(&SUBSCRIBE_SHARED).await.expect("SUBSCRIBE $share/g/t");
    assert_eq!(client.answer().await, Answer::Packet { packet_type: packet_type::SUBACK });
    client.send(&PUBLISH_T_QOS1).await.expect("PUBLISH t");
    let first = next_publish(&mut client).await.expect("the delivery to the group's one member");
    assert_eq!((first.topic.as_str(), first.qos, first.dup), ("t", 1, false), "{first:?}");
    // Never acknowledged: the socket closes with the delivery in flight.
    drop(client);

    // The router's abort happened here; the gateway now keeps the session.
    let mut client = RawClient::connect(listen, "p", &CONNECT_P)
        .await
        .unwrap_or_else(|outcome| panic!("p reconnects: {outcome:?}\n{}", gateway.tail()));
    assert_eq!(client.connack().first(), Some(&1), "session present\n{}", gateway.tail());
    let again = next_publish(&mut client).await.expect("the unacknowledged delivery again");
    assert_eq!(
        (again.topic.as_str(), again.qos, again.dup, again.packet_id),
        ("t", 1, true, first.packet_id),
        "redelivered with DUP and its packet id: {again:?}"
    );
    let mut puback = vec![0x40, 0x02];
    puback.extend_from_slice(&again.packet_id.unwrap_or(0).to_be_bytes());
    client.send(&puback).await.expect("PUBACK");
    // The group still has its member: a publish from someone else reaches it.
    publish_qos1(listen, "group-feeder", "t", [b"next".to_vec()], TIMEOUT).await.expect("publish to t");
    let next = next_publish(&mut client).await.expect("the next delivery to the group");
    assert_eq!((next.topic.as_str(), next.payload.as_slice(), next.dup), ("t", &b"next"[..], false));
    drop(client);

    if let Err(failure) = still_serving(&mut gateway, &mut upstream_sub, "after/shared").await {
        panic!("{failure}\n{}", gateway.tail());
    }
}

// ---------------------------------------------------------------------------------------------
// A sensor disconnected for a protocol error is named in the log: client id, peer and reason,
// once per reminder period (10 min) however often it happens (issue #19 §4; mosquitto logs the same facts).

const PROTOCOL_LOG: &str = "a sensor broke the MQTT protocol";

/// Connects as `client_id`, publishes to `topic` (an invalid one) and waits until the gateway
/// closes the connection. Returns the client's address, as the gateway sees it.
async fn break_the_protocol(addr: SocketAddr, client_id: &str, topic: &str) -> SocketAddr {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let local = stream.local_addr().expect("local address");
    stream.write_all(&raw::connect_v311(client_id, 30)).await.expect("CONNECT");
    stream.write_all(&raw::publish_v311(topic, 0, 0, false, b"x")).await.expect("PUBLISH");
    let closed =
        tokio::time::timeout(TIMEOUT, async { while raw::read_packet(&mut stream).await.is_ok() {} }).await;
    assert!(closed.is_ok(), "the gateway closes {client_id}'s connection");
    local
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_error_is_logged_once_with_client_id_peer_and_reason() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("start the gateway");
    let listen = gateway.listen();

    let peer = break_the_protocol(listen, "plant-3/sensor-7", "plant-3/+/temperature").await;
    let logged = gateway.wait_for_message(PROTOCOL_LOG, TIMEOUT).await.expect("the protocol error is logged");
    let field = |name: &str| logged.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    assert_eq!(field("client_id"), "plant-3/sensor-7", "{logged}");
    assert_eq!(field("peer"), peer.to_string(), "{logged}");
    assert!(field("reason").contains("wildcards are not allowed"), "{logged}");
    assert_eq!(field("level"), "WARN", "{logged}");

    // Again, and with an empty topic: counted, folded into the next line rather than logged.
    break_the_protocol(listen, "plant-3/sensor-8", "plant-3/#").await;
    break_the_protocol(listen, "plant-3/sensor-9", "").await;
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    assert_eq!(gateway.messages(PROTOCOL_LOG).len(), 1, "rate-limited to one line per reminder period");
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("protocol_errors").copied(), Some(3), "{counters:?}");
}
