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

/// The cloud examples (`examples/aws-iot-core.toml`, `azure-iot-hub.toml`, `tls-password.toml`)
/// pass `outpost check` once the files they name exist next to them — certificates and keys
/// made here, as a site would download them — and fail it, naming the key, while one is
/// missing.
#[test]
fn cloud_examples_pass_check_with_their_files_in_place() {
    use outpost_e2e::gateway::outpost;
    use outpost_sim::harness::pki::{Leaf, TestCa};

    let ca = TestCa::new("example CA").expect("ca");
    let examples: [(&str, &[&str], &str, &str); 3] = [
        (
            "aws-iot-core.toml",
            &["AmazonRootCA1.pem", "device.pem.crt", "private.pem.key"],
            "mqtts://a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com:8883",
            "upstream.tls.key_file",
        ),
        (
            "azure-iot-hub.toml",
            &["device-cert.pem", "device-key.pem"],
            "mqtts://my-hub.azure-devices.net:8883",
            "upstream.tls.key_file",
        ),
        (
            "tls-password.toml",
            &["upstream-password"],
            "mqtts://0123456789abcdef.s1.eu.hivemq.cloud:8883",
            "upstream.password_file",
        ),
    ];
    for (name, files, url, last_key) in examples {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join(name);
        std::fs::copy(workspace_root().join("examples").join(name), &config).expect("copy the example");
        let issued = ca.issue(&Leaf::client()).expect("issue");
        for file in files {
            let text = if file.contains("key") {
                issued.key_pem.clone()
            } else if file.contains("password") {
                "s3cret\n".to_owned()
            } else if file.contains("Root") {
                ca.cert_pem()
            } else {
                issued.cert_pem.clone()
            };
            let path = dir.path().join(file);
            std::fs::write(&path, text).expect("write");
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let data = dir.path().join("data");
        let args = [
            "check",
            "--config",
            config.to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
        ];
        let outcome = outpost(&args).expect("run outpost check");
        assert_eq!(outcome.code, Some(0), "{name}: {outcome:?}");
        assert!(outcome.stdout.contains(&format!("upstream {url}")), "{name}: {outcome:?}");

        std::fs::remove_file(dir.path().join(files[files.len() - 1])).expect("remove");
        let outcome = outpost(&args).expect("run outpost check");
        assert_eq!(outcome.code, Some(1), "{name}: {outcome:?}");
        assert!(
            outcome.stderr.contains(&format!("`{last_key}`")) && outcome.stderr.contains("no such file"),
            "{name}: {outcome:?}"
        );
    }
}
