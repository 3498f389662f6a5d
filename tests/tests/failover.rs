//! `upstream.urls` with two real mosquittos: the link leaves a stopped endpoint for the next,
//! returns to the preferred one once it has answered for `failback_after`, and loses nothing on
//! the way; with every endpoint down, events stay buffered, each endpoint's failure is logged
//! once, and everything is delivered when one comes back.
//!
//! The mosquittos are independent brokers (no cluster): each reading arrives at one of them,
//! so the check is over the union of what their persistent subscribers received.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Message, Session, Subscriber, SubscriberOptions, publish_qos1, unique_client_id};
use outpost_e2e::upstream::Mosquitto;
use outpost_e2e::{free_addr, require_mosquitto, wait_until};
use outpost_sim::fleet::{FleetConfig, run_fleet};
use outpost_sim::verify::Verifier;
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A persistent subscriber to `sensors/#` on `broker` whose readings go into `verifier` too.
async fn recording(broker: &Mosquitto, name: &str, verifier: &Arc<Mutex<Verifier>>) -> Subscriber {
    let verifier = Arc::clone(verifier);
    let options = SubscriberOptions {
        session: Session::Persistent(unique_client_id(name)),
        on_message: Some(Arc::new(move |m: &Message| {
            verifier.lock().expect("verifier").record(&m.topic, &m.payload, 0);
        })),
        ..SubscriberOptions::default()
    };
    Subscriber::start_with(broker.addr(), "sensors/#", options).await.expect("subscribe")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_fails_over_and_returns_to_the_preferred_endpoint_losing_nothing() {
    if !require_mosquitto() {
        return;
    }
    let mut preferred = Mosquitto::start().await.expect("start the preferred mosquitto");
    let second = Mosquitto::start().await.expect("start the second mosquitto");
    let verifier = Arc::new(Mutex::new(Verifier::new()));
    let mut at_preferred = recording(&preferred, "failover-a", &verifier).await;
    let mut at_second = recording(&second, "failover-b", &verifier).await;
    let data = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[upstream]\nurls = [\"{}\", \"{}\"]\nfailback_after = \"2s\"\nreconnect_max = \"1s\"\n",
        preferred.url(),
        second.url()
    );
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    let fleet_config = FleetConfig {
        broker: gateway.listen().to_string(),
        sensors: 10,
        rate_per_sensor: 20.0,
        duration: Some(Duration::from_secs(14)),
        qos: QoS::AtLeastOnce,
        client_prefix: "failover-".to_owned(),
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(run_fleet(fleet_config, CancellationToken::new()));
    at_preferred.wait_for_count(300, TIMEOUT).await.expect("traffic through the preferred endpoint");

    preferred.stop().await.expect("stop the preferred mosquitto");
    let before = at_second.count();
    at_second
        .wait_for_count(before + 200, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    // Freeze the gateway while the preferred broker restarts and its subscriber resumes its
    // session, so the return never races that reconnect.
    let connects = at_preferred.connects();
    gateway.signal(libc::SIGSTOP).expect("freeze the gateway");
    preferred.start_again().await.expect("start the preferred mosquitto again");
    let resumed = wait_until("the subscriber resumed", TIMEOUT, || at_preferred.connects() > connects).await;
    gateway.signal(libc::SIGCONT).expect("resume the gateway");
    resumed.expect("the subscriber reconnects");
    let returning = gateway
        .wait_for_message("returning to the preferred upstream endpoint", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(returning["to"], preferred.url().as_str(), "{returning}");
    assert_eq!(returning["from"], second.url().as_str(), "{returning}");
    let before = at_preferred.count();
    at_preferred
        .wait_for_count(before + 100, TIMEOUT)
        .await
        .expect("traffic through the preferred endpoint again");

    let summary = fleet.await.expect("the fleet task").expect("the fleet runs");
    let report = {
        let verifier = Arc::clone(&verifier);
        let mut last = None;
        let all = wait_until("every acknowledged reading at one of the brokers", TIMEOUT, || {
            let report = verifier.lock().expect("verifier").report(Some(&summary));
            let done = report.missing == 0;
            last = Some(report);
            done
        })
        .await;
        all.unwrap_or_else(|e| panic!("{e:#}: {last:?}\n{}", gateway.tail()));
        last.expect("a report")
    };
    println!(
        "fleet sent {} acked {}; received at both brokers {} (unique {}, duplicates {}, missing {}); \
         preferred {} second {}",
        summary.sent,
        summary.acked,
        report.received,
        report.unique,
        report.duplicates,
        report.missing,
        at_preferred.count(),
        at_second.count()
    );
    assert_eq!(report.missing, 0, "{report:?}");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("upstream_failbacks").copied(), Some(1), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_down_events_wait_and_each_failure_is_logged_once() {
    if !require_mosquitto() {
        return;
    }
    let first = Mosquitto::not_started().expect("prepare a mosquitto");
    let mut second = Mosquitto::not_started().expect("prepare another mosquitto");
    let http = free_addr();
    let config = format!(
        "[http]\nlisten = \"{http}\"\n[upstream]\nurls = [\"{}\", \"{}\"]\nreconnect_max = \"200ms\"\nfailback_after = \"1s\"\n",
        first.url(),
        second.url()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway =
        GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    let payloads: Vec<Vec<u8>> = (0..200).map(|i| format!("e-{i}").into_bytes()).collect();
    publish_qos1(gateway.listen(), &unique_client_id("all-down"), "sensors/all-down", payloads, TIMEOUT)
        .await
        .expect("the gateway acknowledges while every endpoint is down");
    // Several rounds over both endpoints, each attempt refused: read from /status, polled (it
    // has no event to wait on) against a deadline.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let last = loop {
        let (code, body) = outpost_e2e::http::get(http, "/status", None).await.expect("GET /status");
        assert_eq!(code, 200, "{body}");
        let status: serde_json::Value = serde_json::from_str(&body).expect("/status is JSON");
        let endpoints = status["upstream"]["endpoints"].as_array().cloned().unwrap_or_default();
        if endpoints.len() == 2 && endpoints.iter().all(|ep| ep["failures"].as_u64().unwrap_or(0) >= 5) {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "five failed attempts on each endpoint: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(last["upstream"]["connected"], false, "{last}");
    assert_eq!(last["backlog"]["events"], 200, "{last}");

    gateway.signal(libc::SIGSTOP).expect("freeze the gateway");
    second.start_again().await.expect("start the second mosquitto");
    let mut subscriber =
        Subscriber::start(second.addr(), "sensors/#", Session::Persistent(unique_client_id("all-down-sub")))
            .await
            .expect("subscribe");
    gateway.signal(libc::SIGCONT).expect("resume the gateway");
    subscriber
        .wait_for_messages("all 200 events", TIMEOUT, |messages| {
            let mut seen: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len() == 200
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let unreachable = |url: &str| {
        gateway.messages("upstream endpoint unreachable").iter().filter(|log| log["endpoint"] == url).count()
    };
    assert_eq!(
        unreachable(&first.url()),
        1,
        "one line for the first endpoint's failures\n{}",
        gateway.tail()
    );
    assert_eq!(
        unreachable(&second.url()),
        1,
        "one line for the second endpoint's failures\n{}",
        gateway.tail()
    );
    assert_eq!(gateway.messages("cannot connect upstream").len(), 1, "{}", gateway.tail());
    let back = gateway.messages("upstream endpoint reachable again");
    assert!(back.iter().any(|log| log["endpoint"] == second.url().as_str()), "{}", gateway.tail());

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
}
