//! Persistent sessions across a restart of the broker, Outpost next to Debian's mosquitto with
//! `persistence true` (issue #17, "durable local state").
//!
//! Two scenarios, each after a graceful stop (SIGTERM) and after a SIGKILL:
//! - **Offline queue:** an MQTT 5 subscriber with a persistent session (clean start 0, session
//!   expiry 300 s) subscribes to `q/#` and leaves; 10,000 QoS 1 messages are published and
//!   every one acknowledged (`max_queued_messages` 10,000 in both brokers); the broker is
//!   restarted; the subscriber comes back with clean start 0, without subscribing again, and
//!   must get all 10,000, in order.
//! - **Subscriptions survive:** the subscriber's filters (a wildcard one with a subscription
//!   identifier, a plain one) are made before the restart and the messages published after
//!   it: only a subscription that came back from the disk can queue them. A message expiry set
//!   on one of them must count down, not restart.
//!
//! Every wait is for an event: after coming back the subscriber subscribes to a marker topic
//! and a second client publishes to it; a broker sends a session's queued messages before
//! anything queued later, so the marker's arrival means the queue was delivered.
//!
//! A third scenario, **session expiry across a restart**: two persistent sessions (expiry 2 s
//! and 300 s) with a QoS 1 message queued each; the broker is stopped, started again once the
//! wall clock is 2.5 s past the publish's acknowledgement, and both subscribers come back.
//! The short session must be gone (session present 0, nothing queued), the long one kept.
//! Mosquitto does not count expiry while stopped (it resumes both after a graceful stop) and
//! loses both on a SIGKILL; both are asserted as differences.
//!
//! Graceful: both brokers keep the sessions, and the observations must be equal. SIGKILL:
//! mosquitto writes its persistence file only on a stop or every `autosave_interval` (30 min by
//! default), so it loses the sessions; Outpost commits each queued delivery before the
//! publisher's PUBACK and each subscription as it is made, so it keeps them. That is the one
//! deliberate difference, asserted as such.

use std::time::Duration;

use outpost_e2e::conformance::{
    ACK_TIMEOUT, Addrs, BrokerSetup, Client5, ConnectOutcome, PublishOutcome, Received5, Restart, Target,
    options5,
};
use outpost_e2e::mqtt::publish_qos1;
use outpost_e2e::require_mosquitto;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties, SubscribeProperties};

/// Messages queued for the offline subscriber.
const QUEUED: usize = 10_000;
/// Published after the subscriber is back; see the module docs.
const MARKER: &str = "marker/done";
/// Long enough for 10,000 acknowledged publishes, and their delivery, on a loaded machine.
const BULK_TIMEOUT: Duration = Duration::from_secs(120);

/// A persistent MQTT 5 session: clean start 0, kept 300 s after the connection ends.
fn persistent(addr: std::net::SocketAddr, client_id: &str) -> rumqttc::v5::MqttOptions {
    let mut options = options5(addr, client_id);
    options.set_clean_start(false).set_session_expiry_interval(Some(300));
    options
}

/// The subscriber is back: subscribes to the marker, has it published, and returns everything
/// that came before it.
async fn come_back(
    addrs: Addrs,
    client_id: &str,
    within: Duration,
) -> Result<Vec<Received5>, ConnectOutcome> {
    let mut subscriber = Client5::connect(persistent(addrs.v5, client_id)).await?;
    subscriber.subscribe(MARKER, QoS5::AtLeastOnce).await;
    let mut marker = Client5::connect(options5(addrs.v5, &format!("{client_id}-marker"))).await?;
    marker.publish(MARKER, QoS5::AtLeastOnce, false, b"m").await;
    marker.disconnect().await;
    let mut received = subscriber.receive(within, |m| m.iter().any(|m| m.topic == MARKER)).await;
    let marked = received.iter().position(|m| m.topic == MARKER);
    received.truncate(marked.unwrap_or(received.len()));
    // Clean start 1 with expiry 0 ends the session, so a later scenario starts afresh.
    subscriber.disconnect().await;
    let _ = Client5::connect(options5(addrs.v5, client_id)).await.map(Client5::disconnect);
    if marked.is_none() {
        eprintln!("{client_id}: the marker did not come within {within:?}");
    }
    Ok(received)
}

#[derive(Debug, PartialEq)]
struct QueueObserved {
    subscribed: Result<Option<u8>, ConnectOutcome>,
    /// All publishes acknowledged.
    published: Result<(), String>,
    /// Payloads received after the restart, in arrival order, and whether each was QoS 1.
    received: Result<Vec<String>, ConnectOutcome>,
    all_qos1: bool,
}

async fn queue_scenario(target: &mut Target, how: Restart) -> QueueObserved {
    let addrs = target.addrs();
    let subscribed = async {
        let mut subscriber = Client5::connect(persistent(addrs.v5, "q-sub")).await?;
        let code = subscriber.subscribe("q/#", QoS5::AtLeastOnce).await.map(|c| c.0);
        subscriber.disconnect().await;
        Ok(code)
    }
    .await;
    let payloads = (0..QUEUED).map(|n| n.to_string().into_bytes());
    let published =
        publish_qos1(addrs.v4, "q-pub", "q/n", payloads, BULK_TIMEOUT).await.map_err(|e| format!("{e:#}"));
    if let Err(e) = target.restart(how).await {
        panic!("{} did not restart: {e:#}\n{}", target.name(), target.tail());
    }
    let received = come_back(target.addrs(), "q-sub", BULK_TIMEOUT).await;
    let all_qos1 = received.as_ref().is_ok_and(|r| r.iter().all(|m| m.qos == 1 && m.topic == "q/n"));
    QueueObserved {
        subscribed,
        published,
        received: received.map(|r| r.into_iter().map(|m| m.payload).collect()),
        all_qos1,
    }
}

fn every_queued() -> Vec<String> {
    (0..QUEUED).map(|n| n.to_string()).collect()
}

async fn run_queue(name: &str, how: Restart) -> (QueueObserved, QueueObserved) {
    let setup = BrokerSetup::anonymous().with_persistence().with_max_queued(QUEUED);
    let mut mosquitto = Target::mosquitto(&setup).await.expect("mosquitto starts");
    let reference = queue_scenario(&mut mosquitto, how).await;
    drop(mosquitto);
    let mut outpost = Target::outpost(&setup).await.expect("outpost starts");
    let observed = queue_scenario(&mut outpost, how).await;
    let brief = |o: &QueueObserved| {
        let received = o.received.as_ref().map(|r| (r.len(), r.first().cloned(), r.last().cloned()));
        format!("subscribed {:?}, published {:?}, received {received:?}", o.subscribed, o.published)
    };
    eprintln!("{name}: mosquitto {}\n{name}: outpost {}", brief(&reference), brief(&observed));
    (reference, observed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_queue_of_10000_survives_a_graceful_restart_like_mosquittos() {
    if !require_mosquitto() {
        return;
    }
    let (reference, observed) = run_queue("graceful", Restart::Graceful).await;
    let kept = QueueObserved {
        subscribed: Ok(Some(1)),
        published: Ok(()),
        received: Ok(every_queued()),
        all_qos1: true,
    };
    assert!(reference == kept, "mosquitto with persistence keeps the queue over a stop");
    assert!(observed == reference, "outpost must observe what mosquitto did");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_queue_of_10000_acknowledged_messages_survives_a_sigkill_which_mosquitto_loses() {
    if !require_mosquitto() {
        return;
    }
    let (reference, observed) = run_queue("sigkill", Restart::Kill).await;
    let lost = QueueObserved {
        subscribed: Ok(Some(1)),
        published: Ok(()),
        received: Ok(Vec::new()),
        all_qos1: true,
    };
    assert!(reference == lost, "mosquitto saves sessions only on a stop or an autosave");
    let kept = QueueObserved {
        subscribed: Ok(Some(1)),
        published: Ok(()),
        received: Ok(every_queued()),
        all_qos1: true,
    };
    assert!(observed == kept, "outpost committed every queued copy before its PUBACK: all 10,000, in order");
}

#[derive(Debug, PartialEq)]
struct SubsObserved {
    subscribed: Result<Vec<Option<u8>>, ConnectOutcome>,
    published: Result<Vec<PublishOutcome>, ConnectOutcome>,
    /// What the subscriber got, by topic, the message expiry taken out.
    received: Result<Vec<Received5>, ConnectOutcome>,
    /// Per message: the expiry published (300 s) came with at most 300 and at least 290 left,
    /// or none was published and none came.
    expiry_kept: Vec<bool>,
}

async fn subscriptions_scenario(target: &mut Target, how: Restart) -> SubsObserved {
    let addrs = target.addrs();
    let subscribed = async {
        let mut subscriber = Client5::connect(persistent(addrs.v5, "s-sub")).await?;
        let with_id = SubscribeProperties { id: Some(7), user_properties: Vec::new() };
        let codes = vec![
            subscriber
                .subscribe_with(Filter::new("keep/+/x", QoS5::AtLeastOnce), Some(with_id))
                .await
                .map(|c| c.0),
            subscriber.subscribe("keep/y", QoS5::AtLeastOnce).await.map(|c| c.0),
        ];
        subscriber.disconnect().await;
        Ok(codes)
    }
    .await;
    if let Err(e) = target.restart(how).await {
        panic!("{} did not restart: {e:#}\n{}", target.name(), target.tail());
    }
    let published = async {
        let mut publisher = Client5::connect(options5(addrs.v5, "s-pub")).await?;
        let expiring =
            PublishProperties { message_expiry_interval: Some(300), ..PublishProperties::default() };
        let outcomes = vec![
            publisher.publish_with("keep/a/x", QoS5::AtLeastOnce, false, b"wild", expiring).await,
            publisher.publish("keep/y", QoS5::AtLeastOnce, false, b"plain").await,
            publisher.publish("keep/z", QoS5::AtLeastOnce, false, b"not subscribed").await,
        ];
        publisher.disconnect().await;
        Ok(outcomes)
    }
    .await;
    let mut received = come_back(addrs, "s-sub", ACK_TIMEOUT).await;
    let mut expiry_kept = Vec::new();
    if let Ok(messages) = &mut received {
        messages.sort_by(|a, b| a.topic.cmp(&b.topic));
        for m in messages {
            let published_expiry = m.topic == "keep/a/x";
            expiry_kept.push(match (published_expiry, m.message_expiry) {
                (false, None) => true,
                (true, Some(left)) => (290..=300).contains(&left),
                _ => false,
            });
            m.message_expiry = None;
        }
    }
    SubsObserved { subscribed, published, received, expiry_kept }
}

fn message(topic: &str, payload: &str, ids: Vec<usize>) -> Received5 {
    Received5 {
        topic: topic.to_owned(),
        payload: payload.to_owned(),
        qos: 1,
        retain: false,
        user_properties: Vec::new(),
        content_type: None,
        payload_format: None,
        response_topic: None,
        correlation_data: None,
        subscription_ids: ids,
        message_expiry: None,
    }
}

async fn run_subscriptions(name: &str, how: Restart) -> (SubsObserved, SubsObserved) {
    let setup = BrokerSetup::anonymous().with_persistence();
    let mut mosquitto = Target::mosquitto(&setup).await.expect("mosquitto starts");
    let reference = subscriptions_scenario(&mut mosquitto, how).await;
    drop(mosquitto);
    let mut outpost = Target::outpost(&setup).await.expect("outpost starts");
    let observed = subscriptions_scenario(&mut outpost, how).await;
    eprintln!("{name}: mosquitto {reference:?}\n{name}: outpost {observed:?}");
    (reference, observed)
}

fn subscriptions_kept() -> SubsObserved {
    SubsObserved {
        subscribed: Ok(vec![Some(1), Some(1)]),
        published: Ok(vec![PublishOutcome::Acked; 3]),
        received: Ok(vec![message("keep/a/x", "wild", vec![7]), message("keep/y", "plain", Vec::new())]),
        expiry_kept: vec![true, true],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_of_a_persistent_session_survive_a_graceful_restart_like_mosquittos() {
    if !require_mosquitto() {
        return;
    }
    let (reference, observed) = run_subscriptions("graceful", Restart::Graceful).await;
    assert_eq!(reference, subscriptions_kept(), "mosquitto with persistence keeps subscriptions over a stop");
    assert_eq!(observed, reference, "outpost must observe what mosquitto did");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_of_a_persistent_session_survive_a_sigkill_which_mosquitto_loses() {
    if !require_mosquitto() {
        return;
    }
    let (reference, observed) = run_subscriptions("sigkill", Restart::Kill).await;
    let lost = SubsObserved {
        subscribed: Ok(vec![Some(1), Some(1)]),
        published: Ok(vec![PublishOutcome::Acked; 3]),
        received: Ok(Vec::new()),
        expiry_kept: Vec::new(),
    };
    assert_eq!(reference, lost, "mosquitto saves sessions only on a stop or an autosave");
    assert_eq!(observed, subscriptions_kept(), "outpost wrote the subscriptions as they were made");
}

// ---------------------------------------------------------------------------------------------
// Session expiry across a restart: a session whose expiry passes while the broker is down is
// gone when it comes back; one whose expiry has not passed survives.

/// Session expiry of the session that must be gone after the restart.
const SHORT_EXPIRY: u32 = 2;

#[derive(Debug, PartialEq)]
struct ExpiryObserved {
    /// Per subscriber (short expiry, then long): session present after the restart, and the
    /// payloads it got before the marker.
    short: Result<(bool, Vec<String>), ConnectOutcome>,
    long: Result<(bool, Vec<String>), ConnectOutcome>,
}

/// Like [`come_back`], with the CONNACK's session present flag and the session expiry the
/// subscriber first connected with.
async fn come_back_with(
    addrs: Addrs,
    client_id: &str,
    expiry: u32,
) -> Result<(bool, Vec<String>), ConnectOutcome> {
    let mut options = persistent(addrs.v5, client_id);
    options.set_session_expiry_interval(Some(expiry));
    let mut subscriber = Client5::connect(options).await?;
    let present = subscriber.session_present();
    subscriber.subscribe(MARKER, QoS5::AtLeastOnce).await;
    let mut marker = Client5::connect(options5(addrs.v5, &format!("{client_id}-marker"))).await?;
    marker.publish(MARKER, QoS5::AtLeastOnce, false, b"m").await;
    marker.disconnect().await;
    let received = subscriber.receive(ACK_TIMEOUT, |m| m.iter().any(|m| m.topic == MARKER)).await;
    let before: Vec<String> =
        received.into_iter().take_while(|m| m.topic != MARKER).map(|m| m.payload).collect();
    subscriber.disconnect().await;
    let _ = Client5::connect(options5(addrs.v5, client_id)).await.map(Client5::disconnect);
    Ok((present, before))
}

async fn expiry_scenario(target: &mut Target, how: Restart) -> ExpiryObserved {
    let addrs = target.addrs();
    for (client_id, expiry) in [("x-short", SHORT_EXPIRY), ("x-long", 300)] {
        let mut options = persistent(addrs.v5, client_id);
        options.set_session_expiry_interval(Some(expiry));
        let mut subscriber = Client5::connect(options).await.expect("the subscriber connects");
        assert_eq!(subscriber.subscribe("x/#", QoS5::AtLeastOnce).await.map(|c| c.0), Some(1));
        subscriber.disconnect().await;
    }
    // Both sessions are offline once their connections closed; the broker counts their expiry
    // from a moment before this publish's acknowledgement (which, in Outpost, also means the
    // queued copies and the sessions' offline time are on disk).
    let mut publisher = Client5::connect(options5(addrs.v5, "x-pub")).await.expect("the publisher connects");
    assert_eq!(publisher.publish("x/m", QoS5::AtLeastOnce, false, b"queued").await, PublishOutcome::Acked);
    publisher.disconnect().await;
    // Half a second past the short expiry, measured from after the acknowledgement.
    let expired_at =
        std::time::SystemTime::now() + Duration::from_millis(u64::from(SHORT_EXPIRY) * 1000 + 500);
    if let Err(e) = target.restart_at(how, expired_at).await {
        panic!("{} did not restart: {e:#}\n{}", target.name(), target.tail());
    }
    let addrs = target.addrs();
    ExpiryObserved {
        short: come_back_with(addrs, "x-short", SHORT_EXPIRY).await,
        long: come_back_with(addrs, "x-long", 300).await,
    }
}

async fn run_expiry(name: &str, how: Restart) -> (ExpiryObserved, ExpiryObserved) {
    let setup = BrokerSetup::anonymous().with_persistence();
    let mut mosquitto = Target::mosquitto(&setup).await.expect("mosquitto starts");
    let reference = expiry_scenario(&mut mosquitto, how).await;
    drop(mosquitto);
    let mut outpost = Target::outpost(&setup).await.expect("outpost starts");
    let observed = expiry_scenario(&mut outpost, how).await;
    eprintln!("{name}: mosquitto {reference:?}\n{name}: outpost {observed:?}");
    (reference, observed)
}

/// The short session expired while the broker was down; the long one kept its message.
fn expired_and_kept() -> ExpiryObserved {
    ExpiryObserved { short: Ok((false, Vec::new())), long: Ok((true, vec!["queued".to_owned()])) }
}

/// Mosquitto 2.0.11 with `persistence true` gives the short session back, its queue with it,
/// although its expiry passed while it was stopped: it does not count the time it was down.
/// MQTT 5 (3.1.2.11.2) has a session end when its expiry interval has passed since the
/// connection closed, so Outpost, which keeps that moment as a wall-clock time, ends it: a
/// deliberate difference, asserted as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_expires_while_the_gateway_is_stopped_is_gone_which_mosquitto_resumes() {
    if !require_mosquitto() {
        return;
    }
    let (reference, observed) = run_expiry("graceful", Restart::Graceful).await;
    let resumed = ExpiryObserved {
        short: Ok((true, vec!["queued".to_owned()])),
        long: Ok((true, vec!["queued".to_owned()])),
    };
    assert_eq!(reference, resumed, "mosquitto with persistence does not count expiry while stopped");
    assert_eq!(observed, expired_and_kept(), "outpost counts it from the stored offline time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_expires_while_the_gateway_is_killed_is_gone_and_the_other_survives() {
    if !require_mosquitto() {
        return;
    }
    let (reference, observed) = run_expiry("sigkill", Restart::Kill).await;
    let lost = ExpiryObserved { short: Ok((false, Vec::new())), long: Ok((false, Vec::new())) };
    assert_eq!(reference, lost, "mosquitto saves sessions only on a stop or an autosave");
    assert_eq!(observed, expired_and_kept(), "outpost kept both on disk with their offline time");
}
