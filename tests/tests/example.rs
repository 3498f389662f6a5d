//! The shipped `examples/outpost.toml` runs as documented, with the per-device overrides.

use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::upstream::RumqttdUpstream;
use outpost_e2e::workspace_root;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_runs_relays_and_stops_on_sigterm() {
    let example = workspace_root().join("examples/outpost.toml");
    assert!(example.exists(), "{} is missing", example.display());
    let upstream = RumqttdUpstream::start().await.expect("start outpost-sim broker");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    // --listen, --upstream and --data-dir override the file's values, as the example says.
    let mut gateway = GatewaySpec::new(data.path())
        .config_file(&example)
        .upstream(upstream.url())
        .start()
        .await
        .expect("the example config starts");

    let topic = "sensors/example-1/temp";
    publish_qos1(gateway.listen(), "example-1", topic, [b"21.5".to_vec()], TIMEOUT).await.expect("acked");
    subscriber.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let messages = subscriber.messages();
    // The example may set a topic prefix; the sensor's topic is kept after it.
    assert!(messages[0].0.ends_with(topic), "upstream topic {:?}", messages[0].0);
    assert_eq!(messages[0].1, b"21.5");

    let status = gateway.terminate().await.expect("the gateway stops");
    assert_eq!(status.code(), Some(0), "exit status {status}\n{}", gateway.tail());
    assert_eq!(gateway.messages("stopped").len(), 1, "one `stopped` line\n{}", gateway.tail());
    // Data went to --data-dir, not to the file's ./outpost-data.
    let files = std::fs::read_dir(data.path()).expect("read the data dir").count();
    assert!(files > 0, "the buffer is in --data-dir");
}
