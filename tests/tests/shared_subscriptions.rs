//! Shared subscriptions when a member's session ends with deliveries unfinished (issue #17).
//!
//! MQTT 5, 4.8.2: "If the Client's Session terminates before the Client reconnects, the Server
//! SHOULD send the Application Message to another Client that is subscribed to the same Shared
//! Subscription." Mosquitto 2.0.11 drops them (its side of the clean-disconnect case is in
//! `conformance.rs`, `unacknowledged_shared_deliveries_of_a_member_that_left`), so these
//! scenarios have no reference run: they check Outpost against the clause, its counters and
//! its log line.
//!
//! - **Session expiry:** a persistent member (session expiry 2 s) takes its half of six QoS 1
//!   messages without acknowledging them and loses its connection; its session keeps them
//!   (the server MAY wait for it) until it expires, then the other member gets them.
//! - **No member left:** the only member leaves with deliveries unacknowledged: they are
//!   dropped, counted `shared_dropped` and logged, and the gateway goes on serving the group's
//!   next member.
//!
//! Every wait is for a condition with a deadline: the messages arriving, a log line.

use std::time::Duration;

use outpost_e2e::conformance::{Client5, Received5, options5};
use outpost_e2e::gateway::{GatewaySpec, message_starts_with};
use rumqttc::v5::mqttbytes::QoS as QoS5;

const FILTER: &str = "$share/g/shared/t";
const TOPIC: &str = "shared/t";
/// Long enough for a 2 s session expiry (checked every second) on a loaded machine.
const WITHIN: Duration = Duration::from_secs(20);

/// A member of the group that never acknowledges (rumqttc's manual acks, never sent).
async fn quiet_member(listen: std::net::SocketAddr, name: &str, expiry: Option<u32>) -> Client5 {
    let mut options = options5(listen, name);
    options.set_manual_acks(true);
    if let Some(secs) = expiry {
        options.set_clean_start(false).set_session_expiry_interval(Some(secs));
    }
    let mut client = Client5::connect(options).await.unwrap_or_else(|e| panic!("{name} connects: {e:?}"));
    assert!(client.subscribe(FILTER, QoS5::AtLeastOnce).await.is_some(), "{name} subscribes");
    client
}

async fn publish(listen: std::net::SocketAddr, payloads: impl IntoIterator<Item = String>) {
    let mut publisher = Client5::connect(options5(listen, "shared-pub")).await.expect("publisher connects");
    for payload in payloads {
        publisher.publish(TOPIC, QoS5::AtLeastOnce, false, payload.as_bytes()).await;
    }
    publisher.disconnect().await;
}

fn payloads(received: &[Received5]) -> Vec<String> {
    let mut p: Vec<String> = received.iter().map(|m| m.payload.clone()).collect();
    p.sort();
    p.dedup();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_members_unacknowledged_deliveries_go_to_another_member() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("the gateway starts");
    let listen = gateway.listen();
    let mut quiet = quiet_member(listen, "shared-expiring", Some(2)).await;
    let mut other = Client5::connect(options5(listen, "shared-other")).await.expect("other connects");
    assert!(other.subscribe(FILTER, QoS5::AtLeastOnce).await.is_some());
    publish(listen, (0..6).map(|n| n.to_string())).await;
    let taken = quiet.receive(WITHIN, |m| m.len() >= 3).await;
    assert_eq!(taken.len(), 3, "round robin: the quiet member's half\n{}", gateway.tail());
    // Lost power: its persistent session keeps the three, unacknowledged, until it expires.
    quiet.drop_connection();
    let everything: Vec<String> = (0..6).map(|n| n.to_string()).collect();
    let got = other.receive(WITHIN, |m| payloads(m) == everything).await;
    assert_eq!(
        payloads(&got),
        everything,
        "after the quiet member's session expired, the other member has every message\n{}",
        gateway.tail()
    );
    assert!(got.iter().all(|m| m.qos == 1 && m.topic == TOPIC), "{got:?}");
    other.disconnect().await;
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(
        counters.get("shared_redelivered").copied().unwrap_or(0),
        3,
        "shared_redelivered: {counters:?}"
    );
    assert_eq!(counters.get("shared_dropped").copied().unwrap_or(0), 0, "shared_dropped: {counters:?}");
    assert_eq!(counters.get("sessions_expired").copied().unwrap_or(0), 1, "sessions_expired: {counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_member_leaving_drops_counts_and_logs_and_the_group_goes_on() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("the gateway starts");
    let listen = gateway.listen();
    let mut alone = quiet_member(listen, "shared-alone", None).await;
    publish(listen, (0..3).map(|n| n.to_string())).await;
    assert_eq!(alone.receive(WITHIN, |m| m.len() >= 3).await.len(), 3);
    // A clean session: it ends with the connection, and nobody is left in the group.
    alone.disconnect().await;
    gateway
        .wait_for_log("the shared_dropped warning", WITHIN, |log| {
            message_starts_with(log, "a shared-subscription member's session ended")
        })
        .await
        .expect("the drop is logged");
    // The group is served again by whoever joins next.
    let mut next = Client5::connect(options5(listen, "shared-next")).await.expect("next connects");
    assert!(next.subscribe(FILTER, QoS5::AtLeastOnce).await.is_some());
    publish(listen, ["after".to_owned()]).await;
    let got = next.receive(WITHIN, |m| !m.is_empty()).await;
    assert_eq!(payloads(&got), ["after"], "only what came after: the dropped ones are gone");
    next.disconnect().await;
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("shared_dropped").copied().unwrap_or(0), 3, "shared_dropped: {counters:?}");
    assert_eq!(
        counters.get("shared_redelivered").copied().unwrap_or(0),
        0,
        "shared_redelivered: {counters:?}"
    );
}
