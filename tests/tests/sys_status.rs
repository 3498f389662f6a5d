//! `$SYS/outpost/upstream` follows the uplink when it changes, not only at the periodic
//! refresh (`broker.sys_interval`, here ten minutes so that only the change can explain a
//! prompt update). A dashboard showing the uplink state must not be up to a refresh late.

use std::time::Duration;

use outpost_e2e::conformance::{Received, Recorder};
use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use rumqttc::QoS;

const TOPIC: &str = "$SYS/outpost/upstream";
/// Far below `sys_interval`; the uplink notices a stopped broker at once (the socket closes)
/// and reconnects within its backoff (50–500 ms by default).
const PROMPT: Duration = Duration::from_secs(5);

/// The payload's first word is the state; "connected" names the endpoint after it.
fn last_is(messages: &[Received], state: &str) -> bool {
    messages.last().is_some_and(|m| m.payload.split(' ').next() == Some(state))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_status_topic_changes_when_the_uplink_does() {
    if !require_mosquitto() {
        return;
    }
    let mut upstream = Mosquitto::start().await.expect("start mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .upstream(upstream.url())
        .config_toml("[broker]\nsys_interval = \"10m\"\n")
        .start()
        .await
        .expect("start the gateway");
    let mut dashboard = Recorder::start(gateway.listen(), TOPIC, QoS::AtMostOnce).await.expect("subscribe");

    let seen = dashboard.wait_until(PROMPT, |m| last_is(m, "connected")).await;
    assert!(last_is(&seen, "connected"), "the uplink connected: {seen:?}\n{}", gateway.tail());
    let named = format!("connected {}", upstream.url());
    assert_eq!(seen.last().map(|m| m.payload.as_str()), Some(named.as_str()), "names the endpoint");

    upstream.stop().await.expect("stop mosquitto");
    let seen = dashboard.wait_until(PROMPT, |m| last_is(m, "disconnected")).await;
    assert!(last_is(&seen, "disconnected"), "within {PROMPT:?} of the uplink going down: {seen:?}");

    upstream.start_again().await.expect("start mosquitto again");
    let seen = dashboard.wait_until(PROMPT, |m| last_is(m, "connected")).await;
    assert!(last_is(&seen, "connected"), "within {PROMPT:?} of the uplink coming back: {seen:?}");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
}
