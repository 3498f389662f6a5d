//! Failover across the nodes of a real clustered upstream: three NATS servers (JetStream and
//! its MQTT listener) on loopback. Outpost is given all three URLs; a persistent QoS 1
//! subscriber sits on the last node. Mid-stream the node Outpost is connected to is SIGKILLed:
//! Outpost moves to another node and the subscriber receives every reading the gateway
//! acknowledged to its sensors, duplicates counted and printed. Commands come down the same
//! way (`[[upstream.subscribe]]`): one published at a surviving node while the gateway's
//! inbound connection was on the killed one reaches a local subscriber after it moved.
//!
//! Why NATS and not RabbitMQ (both Debian packages run a real three-node cluster on one
//! machine, FIELD-NOTES.md): three NATS nodes start in about 2 s with ~70 MB between them;
//! three RabbitMQ nodes take ~30 s and ~400 MB, too much for a test on a shared 2-core runner.
//!
//! What the test relies on from NATS (measured, FIELD-NOTES.md): its PUBACK comes only after
//! the message is stored in the replicated stream, so whatever Outpost saw acknowledged
//! survives the node; a killed stream leader can leave publishes unanswered for a few seconds
//! until the connection closes, which is what Outpost's resend from the buffer is for.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_e2e::conformance::{Received, Recorder};
use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Message, Session, Subscriber, SubscriberOptions, publish_qos1, unique_client_id};
use outpost_e2e::require_tool;
use outpost_e2e::upstream::{NATS_SERVER, NatsCluster};
use outpost_sim::fleet::{FleetConfig, run_fleet};
use outpost_sim::payload::SensorReading;
use rumqttc::QoS;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// 200 readings/s: what three JetStream nodes sharing two loaded cores with the gateway and
/// the fleet carry with room to spare (500/s built a backlog of tens of seconds in NATS).
const SENSORS: usize = 10;
const RATE_PER_SENSOR: f64 = 20.0;
/// How long the fleet publishes.
const TRAFFIC: Duration = Duration::from_secs(10);
/// The node goes down once this many readings (about 3 s of traffic) arrived.
const ARRIVED_BEFORE_KILL: u64 = 600;
const TIMEOUT: Duration = Duration::from_secs(40);

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_connected_node_loses_nothing_the_gateway_acknowledged() {
    if !require_tool(NATS_SERVER, "nats-server") {
        return;
    }
    let started = Instant::now();
    let mut cluster = NatsCluster::start().await.expect("start a three-node NATS cluster");
    let cluster_ready = started.elapsed();
    let subscriber_node = 2;
    // Arrival time and the reading's send time (Unix ms) of everything the subscriber gets.
    let arrivals: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let record = Arc::clone(&arrivals);
    let options = SubscriberOptions {
        session: Session::Persistent(unique_client_id("cluster-sub")),
        on_message: Some(Arc::new(move |m: &Message| {
            let sent_ms = SensorReading::decode(&m.payload).map_or(0, |r| r.ts_ms);
            record.lock().expect("arrivals").push((Instant::now(), sent_ms));
        })),
        ..SubscriberOptions::default()
    };
    let mut subscriber = Subscriber::start_with(cluster.nodes[subscriber_node].mqtt, "sensors/#", options)
        .await
        .unwrap_or_else(|e| {
            panic!("subscribe on {}: {e:#}\n{}", cluster.nodes[subscriber_node].name, cluster.tail())
        });

    let urls: Vec<String> = cluster.nodes.iter().map(|n| format!("\"{}\"", n.url())).collect();
    // NATS speaks MQTT 3.1.1 only. reconnect_max is lowered so that a round of failed
    // attempts (while the stream re-elects its leader) costs at most a second.
    let config = format!(
        "[upstream]\nurls = [{}]\nreconnect_max = \"1s\"\n\n[[upstream.subscribe]]\nfilter = \"cmd/#\"\n",
        urls.join(", ")
    );
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    let connected = gateway
        .wait_for_message("connected upstream", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("the gateway connects: {e:#}"));
    let first_url = connected["upstream"].as_str().unwrap_or_default().to_owned();
    let victim = cluster.node(&first_url).unwrap_or_else(|| panic!("connected to a node: {connected}"));
    assert_eq!(victim, 0, "the gateway starts on the preferred (first) endpoint");
    assert_ne!(victim, subscriber_node);
    // The inbound connection (its own persistent session) is on the first node too.
    gateway
        .wait_for_log("the inbound connection on the first node", TIMEOUT, |log| {
            log["message"] == "inbound connected" && log["upstream"] == first_url.as_str()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let actuator =
        SubscriberOptions { verify: false, session: Session::Clean, ..SubscriberOptions::default() };
    let mut actuator = Subscriber::start_with(gateway.listen(), "cmd/#", actuator)
        .await
        .expect("a local actuator subscribes");

    let fleet_config = FleetConfig {
        broker: gateway.listen().to_string(),
        sensors: SENSORS,
        rate_per_sensor: RATE_PER_SENSOR,
        duration: Some(TRAFFIC),
        qos: QoS::AtLeastOnce,
        client_prefix: "cluster-".to_owned(),
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(run_fleet(fleet_config, CancellationToken::new()));
    subscriber
        .wait_for_count(ARRIVED_BEFORE_KILL, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("traffic through {}: {e:#}\n{}", first_url, gateway.tail()));
    // `$SYS/outpost/upstream` names the endpoint in use: its change times the reconnection.
    let mut dashboard = Recorder::start(gateway.listen(), "$SYS/outpost/upstream", QoS::AtMostOnce)
        .await
        .expect("subscribe $SYS");
    let (killed_at, killed_at_ms) = (Instant::now(), unix_ms());
    cluster.kill(victim).expect("SIGKILL the node the gateway is connected to");
    // Sent at once, while the inbound connection is still on (or leaving) the dead node: it
    // waits in the inbound session the cluster replicates, and comes down once the connection
    // moved to a surviving node.
    // While the stream re-elects its leader a surviving node may close the connection without
    // a PUBACK (FIELD-NOTES.md); a cloud publisher then resends, and so does this one. At
    // least once: the actuator may see the command twice, and the test reads the first.
    let mut attempts = Vec::new();
    while attempts.len() < 5 {
        let sent = publish_qos1(
            cluster.nodes[subscriber_node].mqtt,
            &unique_client_id("cloud"),
            "cmd/valve/1",
            [b"open".to_vec()],
            TIMEOUT,
        )
        .await;
        match sent {
            Ok(()) => break,
            Err(e) => attempts.push(format!("{e:#}")),
        }
    }
    assert!(
        attempts.len() < 5,
        "a command published at a surviving node, five attempts: {attempts:?}\n{}",
        cluster.tail()
    );
    let on_another = |m: &[Received]| {
        m.last()
            .is_some_and(|m| m.payload.starts_with("connected ") && !m.payload.ends_with(first_url.as_str()))
    };
    let seen = dashboard.wait_until(TIMEOUT, on_another).await;
    assert!(on_another(&seen), "the gateway connected to another node: {seen:?}\n{}", gateway.tail());
    let reconnected = killed_at.elapsed();

    let moved = gateway
        .wait_for_log("the loss of the killed node", TIMEOUT, |log| {
            log["message"].as_str().is_some_and(|m| m.starts_with("upstream connection lost"))
                && log["upstream"] == first_url.as_str()
        })
        .await;
    moved.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    actuator
        .wait_for_count(1, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("the command through a surviving node: {e:#}\n{}", gateway.tail()));
    let command_after = killed_at.elapsed();
    let commands = actuator.messages();
    assert_eq!(commands[0].0, "cmd/valve/1");
    assert_eq!(commands[0].1.as_slice(), b"open");

    let summary = fleet.await.expect("the fleet task").expect("the fleet runs");
    let report = subscriber
        .wait_for_expected(&summary, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", gateway.tail(), cluster.tail()));

    // The first reading sent after the kill can only have gone through a surviving node.
    let first_after = arrivals
        .lock()
        .expect("arrivals")
        .iter()
        .find(|(at, sent_ms)| *at > killed_at && *sent_ms > killed_at_ms)
        .map(|(at, _)| at.duration_since(killed_at));
    let now_on =
        seen.last().map(|m| m.payload.trim_start_matches("connected ").to_owned()).unwrap_or_default();
    println!(
        "cluster ready in {cluster_ready:?}; killed {first_url} after {ARRIVED_BEFORE_KILL} arrivals; gateway now on {now_on}; \
         node loss to the gateway connected to another node: {reconnected:?}, to the first event through it: {first_after:?}, to the command sent at the kill arriving locally: {command_after:?}; fleet sent {} acked {}; subscriber received {} \
         (unique {}, duplicates {}, reordered {}, missing {}); test ran {:?}",
        summary.sent,
        summary.acked,
        report.received,
        report.unique,
        report.duplicates,
        report.reordered,
        report.missing,
        started.elapsed()
    );
    assert_eq!(report.missing, 0, "every reading the gateway acknowledged arrived: {report:?}");
    assert_eq!(report.malformed, 0, "{report:?}");
    assert!(first_after.is_some(), "readings sent after the kill arrived through another node");
    assert!(summary.acked > 1_500, "the fleet published steadily: {summary:?}");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    assert!(counters.get("upstream_failures").copied().unwrap_or(0) >= 1, "{counters:?}");
    assert!(counters.get("inbound_delivered").copied().unwrap_or(0) >= 1, "{counters:?}");
}
