//! A sensor that sends more than `broker.max_payload`: its connection is closed, the event is
//! counted and logged with what to do, and every other sensor carries on.

use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_publish_is_refused_counted_and_logged_and_others_carry_on() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber = Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .upstream(upstream.url())
        .config_toml("[broker]\nmax_payload = \"1KiB\"\n")
        .start()
        .await
        .expect("start the gateway");

    // 4 KiB against a 1 KiB limit: the broker closes the connection instead of acknowledging.
    let refused = publish_qos1(
        gateway.listen(),
        "oversize-sensor",
        "sensors/big/blob",
        [vec![b'x'; 4096]],
        Duration::from_secs(5),
    )
    .await;
    assert!(refused.is_err(), "an oversize publish must not be acknowledged");
    let warning = gateway
        .wait_for_message("a sensor sent a packet larger than broker.max_payload", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert!(warning.to_string().contains("raise broker.max_payload or fix the sensor"), "{warning}");

    // Everyone else carries on.
    publish_qos1(gateway.listen(), "ordinary-sensor", "sensors/ok/temp", [b"{\"t\":1}".to_vec()], TIMEOUT)
        .await
        .expect("an ordinary publish is acknowledged");
    subscriber.wait_for_count(1, TIMEOUT).await.expect("the ordinary event arrives upstream");
    assert_eq!(subscriber.messages(), vec![("sensors/ok/temp".to_owned(), b"{\"t\":1}".to_vec())]);

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("oversize_disconnects"), Some(&1), "{counters:?}");
}
