//! The upstream over TLS, against Debian's mosquitto with a TLS listener and certificates made
//! in the test (rcgen): events relayed over TLS and over mutual TLS; a wrong CA, an expired
//! server certificate, a wrong hostname, a refused or a missing client certificate each fail
//! with the message that says what to change, the events stay in the buffer, and they are
//! delivered once the file is fixed — the gateway's files swapped on disk (it reads them at
//! every connect), or the server's certificate replaced and mosquitto restarted — without
//! restarting the gateway. `outpost check --connect` reports each step.
//!
//! Mosquitto gets two listeners: its plain one, where the test's subscriber reads what
//! arrived, and the TLS one the gateway is pointed at.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec, buffered_events, outpost};
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1, unique_client_id};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::{Mosquitto, MosquittoConfig};
use outpost_e2e::wait_until;
use outpost_sim::harness::free_port;
use outpost_sim::harness::pki::{Leaf, PemFiles, TestCa, mosquitto_tls_listener, readable_by_mosquitto};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);
const EVENTS: usize = 20;

/// A mosquitto with a TLS listener, and the directory holding its certificate files.
struct TlsUpstream {
    broker: Mosquitto,
    tls_port: u16,
    /// The server certificate and key mosquitto reads at start.
    server: PemFiles,
    dir: tempfile::TempDir,
}

impl TlsUpstream {
    /// Mosquitto with a TLS listener serving a certificate for `server` issued by `ca`,
    /// checking client certificates against `ca`, requiring one if `require_certificate`.
    async fn start(ca: &TestCa, server: &Leaf, require_certificate: bool) -> TlsUpstream {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        ca.write_cert(&ca_file).expect("write the CA");
        let files = ca.issue(server).expect("issue").write(dir.path(), "server").expect("write");
        readable_by_mosquitto(dir.path(), &files).expect("chmod");
        let tls_port = free_port().expect("port");
        let config = MosquittoConfig {
            extra: mosquitto_tls_listener(tls_port, &ca_file, &files, require_certificate),
            ..MosquittoConfig::default()
        };
        let broker = Mosquitto::start_configured(&config).await.expect("start mosquitto with a TLS listener");
        TlsUpstream { broker, tls_port, server: files, dir }
    }

    /// Replaces the server's certificate with one for `leaf` and restarts mosquitto on the same
    /// ports: how the operator of the upstream fixes its side.
    async fn replace_server_certificate(&mut self, ca: &TestCa, leaf: &Leaf) {
        let issued = ca.issue(leaf).expect("issue");
        self.server = issued.write(self.dir.path(), "server").expect("write");
        readable_by_mosquitto(self.dir.path(), &self.server).expect("chmod");
        self.broker.stop().await.expect("stop mosquitto");
        self.broker.start_again().await.expect("restart mosquitto");
    }

    fn url(&self, host: &str) -> String {
        format!("mqtts://{host}:{}", self.tls_port)
    }
}

/// The gateway's own files (CA, client certificate) in a directory of their own.
struct GatewayFiles {
    dir: tempfile::TempDir,
}

impl GatewayFiles {
    fn new() -> GatewayFiles {
        GatewayFiles { dir: tempfile::tempdir().expect("tempdir") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[upstream]` for `url` with `ca.pem` as the CA file and, if `client`, `client.pem`
    /// and `client.key` as the client certificate.
    fn config(&self, url: &str, client: bool) -> String {
        let mut toml = format!(
            "data_dir = \"{}\"\n[upstream]\nurl = \"{url}\"\nclient_id = \"{}\"\n[upstream.tls]\nca_file = \"{}\"\n",
            self.path("data").display(),
            unique_client_id("tls-gw"),
            self.path("ca.pem").display()
        );
        if client {
            toml.push_str(&format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                self.path("client.pem").display(),
                self.path("client.key").display()
            ));
        }
        toml
    }

    fn write_config(&self, toml: &str) -> PathBuf {
        let path = self.path("outpost.toml");
        std::fs::write(&path, toml).expect("write the config");
        path
    }
}

fn payloads(tag: &str) -> Vec<Vec<u8>> {
    (0..EVENTS).map(|i| format!("{tag}-{i}").into_bytes()).collect()
}

/// Publishes [`EVENTS`] readings through the gateway (each acknowledged: safe in its buffer).
async fn publish(gateway: &GatewayProcess, tag: &str) {
    publish_qos1(
        gateway.listen(),
        &unique_client_id(tag),
        &format!("sensors/{tag}/t"),
        payloads(tag),
        TIMEOUT,
    )
    .await
    .unwrap_or_else(|e| panic!("publish: {e:#}\n{}", gateway.tail()));
}

/// The first outage line's `error`, once the gateway wrote it.
async fn outage_error(gateway: &GatewayProcess) -> String {
    let line = gateway
        .wait_for_message("cannot connect upstream", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    line.get("error").and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// The events stay in the buffer while the upstream is refused.
async fn assert_buffered(gateway: &GatewayProcess, data: &Path) {
    wait_until("every event is in the buffer", TIMEOUT, || {
        buffered_events(data).is_ok_and(|n| n == EVENTS as u64)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", buffered_events(data), gateway.tail()));
}

/// Everything published arrives upstream, and the buffer empties.
async fn assert_delivered(gateway: &GatewayProcess, subscriber: &mut Subscriber, data: &Path) {
    subscriber
        .wait_for_count(EVENTS as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    wait_until("the buffer is empty", TIMEOUT, || buffered_events(data).is_ok_and(|n| n == 0))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
}

/// Stops the gateway and returns its final counters.
async fn stop(mut gateway: GatewayProcess) -> std::collections::BTreeMap<String, u64> {
    let status = gateway.terminate().await.expect("the gateway stops");
    assert_eq!(status.code(), Some(0), "{}", gateway.tail());
    gateway.final_counters().expect("counters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_relayed_over_tls_and_check_connect_reports_each_step() {
    if !require_mosquitto() {
        return;
    }
    let ca = TestCa::new("upstream CA").expect("ca");
    let upstream = TlsUpstream::start(&ca, &Leaf::server(), false).await;
    let files = GatewayFiles::new();
    ca.write_cert(&files.path("ca.pem")).expect("write");
    let config = files.write_config(&files.config(&upstream.url("localhost"), false));

    let check =
        outpost(&["check", "--config", config.to_str().expect("utf-8"), "--connect"]).expect("run check");
    assert_eq!(check.code, Some(0), "{check:?}");
    let lines: Vec<&str> = check.stdout.lines().collect();
    assert!(
        lines[1].starts_with(&format!("tcp localhost:{}: ok (connected to 127.0.0.1:", upstream.tls_port)),
        "{check:?}"
    );
    assert!(lines[2].starts_with("tls: ok (TLS 1.3, server certificate verified"), "{check:?}");
    assert!(
        lines[3].starts_with("mqtt CONNECT as \"") && lines[3].contains(": ok (CONNACK accepted"),
        "{check:?}"
    );

    // The same check against a CA that did not issue the server's certificate.
    let other = TestCa::new("someone else's CA").expect("ca");
    other.write_cert(&files.path("ca.pem")).expect("write");
    let check =
        outpost(&["check", "--config", config.to_str().expect("utf-8"), "--connect"]).expect("run check");
    assert_eq!(check.code, Some(2), "{check:?}");
    assert!(check.stdout.contains("\ntls: FAILED: TLS handshake with localhost failed: the server's certificate is not issued by the CA in upstream.tls.ca_file"), "{check:?}");
    assert!(!check.stdout.contains("mqtt CONNECT"), "no step after the failed one: {check:?}");
    ca.write_cert(&files.path("ca.pem")).expect("write");

    let mut subscriber =
        Subscriber::start(upstream.broker.addr(), "sensors/#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway =
        GatewaySpec::new(data.path()).config_file(&config).start().await.expect("start the gateway");
    publish(&gateway, "tls").await;
    subscriber
        .wait_for_count(EVENTS as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let got: Vec<Vec<u8>> = subscriber.messages().into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, payloads("tls"), "in order, once each");
    let counters = stop(gateway).await;
    // Zero counters are left out of the `stopped` line.
    assert_eq!(counters.get("upstream_failures"), None, "{counters:?}");
    assert_eq!(counters.get("upstream_connects"), Some(&1), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_relays_once_a_refused_client_certificate_is_replaced() {
    if !require_mosquitto() {
        return;
    }
    let ca = TestCa::new("site CA").expect("ca");
    let upstream = TlsUpstream::start(&ca, &Leaf::server(), true).await;
    let files = GatewayFiles::new();
    ca.write_cert(&files.path("ca.pem")).expect("write");
    // A client certificate the server does not trust.
    let rogue = TestCa::new("rogue CA").expect("ca");
    rogue.issue(&Leaf::client()).expect("issue").write(files.dir.path(), "client").expect("write");
    // A key others may read: one WARN, not one per attempt.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(files.path("client.key"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let config = files.write_config(&files.config(&upstream.url("localhost"), true));

    let mut subscriber =
        Subscriber::start(upstream.broker.addr(), "sensors/#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway =
        GatewaySpec::new(data.path()).config_file(&config).start().await.expect("start the gateway");
    publish(&gateway, "mtls").await;
    let error = outage_error(&gateway).await;
    assert!(error.contains("the server refused our client certificate"), "{error}\n{}", gateway.tail());
    assert!(error.contains(&files.path("client.pem").display().to_string()), "names the file: {error}");
    assert_buffered(&gateway, data.path()).await;

    // The renewed certificate, from the right CA, replaces the files; no restart.
    ca.issue(&Leaf::client()).expect("issue").write(files.dir.path(), "client").expect("write");
    assert_delivered(&gateway, &mut subscriber, data.path()).await;
    let warnings = gateway.messages("a secret file is readable by other users");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["key"], "upstream.tls.key_file", "{warnings:?}");
    let expiry = gateway.messages("upstream client certificate");
    assert!(expiry.first().is_some_and(|line| line.get("expires_in").is_some()), "{expiry:?}");
    let logs = gateway.tail();
    assert!(!logs.contains("PRIVATE KEY"), "no key material in the log");
    let counters = stop(gateway).await;
    assert!(counters.get("upstream_tls_client_cert_refused").is_some_and(|&n| n > 0), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_client_certificate_is_named_and_events_wait() {
    if !require_mosquitto() {
        return;
    }
    let ca = TestCa::new("site CA").expect("ca");
    let upstream = TlsUpstream::start(&ca, &Leaf::server(), true).await;
    let files = GatewayFiles::new();
    ca.write_cert(&files.path("ca.pem")).expect("write");
    let config = files.write_config(&files.config(&upstream.url("localhost"), false));

    let check =
        outpost(&["check", "--config", config.to_str().expect("utf-8"), "--connect"]).expect("run check");
    assert_eq!(check.code, Some(2), "{check:?}");
    assert!(check.stdout.contains("set upstream.tls.cert_file and"), "{check:?}");

    let data = tempfile::tempdir().expect("tempdir");
    let gateway =
        GatewaySpec::new(data.path()).config_file(&config).start().await.expect("start the gateway");
    publish(&gateway, "nocert").await;
    let error = outage_error(&gateway).await;
    assert!(
        error.contains("requires a client certificate") || error.contains("set upstream.tls.cert_file and"),
        "{error}\n{}",
        gateway.tail()
    );
    assert_buffered(&gateway, data.path()).await;
    let counters = stop(gateway).await;
    assert!(counters.get("upstream_failures").is_some_and(|&n| n > 0), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_file_fails_until_the_right_one_is_put_in_its_place() {
    if !require_mosquitto() {
        return;
    }
    let ca = TestCa::new("upstream CA").expect("ca");
    let upstream = TlsUpstream::start(&ca, &Leaf::server(), false).await;
    let files = GatewayFiles::new();
    TestCa::new("stale CA").expect("ca").write_cert(&files.path("ca.pem")).expect("write");
    let config = files.write_config(&files.config(&upstream.url("localhost"), false));

    let mut subscriber =
        Subscriber::start(upstream.broker.addr(), "sensors/#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway =
        GatewaySpec::new(data.path()).config_file(&config).start().await.expect("start the gateway");
    publish(&gateway, "ca").await;
    let error = outage_error(&gateway).await;
    assert!(
        error.contains("the server's certificate is not issued by the CA in upstream.tls.ca_file")
            && error.contains(&files.path("ca.pem").display().to_string()),
        "{error}\n{}",
        gateway.tail()
    );
    assert_buffered(&gateway, data.path()).await;

    ca.write_cert(&files.path("ca.pem")).expect("swap the CA file");
    assert_delivered(&gateway, &mut subscriber, data.path()).await;
    let counters = stop(gateway).await;
    assert!(counters.get("upstream_tls_unknown_ca").is_some_and(|&n| n > 0), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_fails_until_the_server_renews_it() {
    if !require_mosquitto() {
        return;
    }
    let ca = TestCa::new("upstream CA").expect("ca");
    let expired = Leaf { expired: true, ..Leaf::server() };
    let mut upstream = TlsUpstream::start(&ca, &expired, false).await;
    let files = GatewayFiles::new();
    ca.write_cert(&files.path("ca.pem")).expect("write");
    let config = files.write_config(&files.config(&upstream.url("localhost"), false));

    // A persistent session: mosquitto keeps it, and what arrives for it, across its restart.
    let session = Session::Persistent(unique_client_id("tls-sub"));
    let mut subscriber =
        Subscriber::start(upstream.broker.addr(), "sensors/#", session).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway =
        GatewaySpec::new(data.path()).config_file(&config).start().await.expect("start the gateway");
    publish(&gateway, "expired").await;
    let error = outage_error(&gateway).await;
    assert!(error.contains("the server's certificate has expired"), "{error}\n{}", gateway.tail());
    assert!(error.contains("on the server side"), "says which side: {error}");
    assert_buffered(&gateway, data.path()).await;

    upstream.replace_server_certificate(&ca, &Leaf::server()).await;
    assert_delivered(&gateway, &mut subscriber, data.path()).await;
    let counters = stop(gateway).await;
    assert!(counters.get("upstream_tls_server_expired").is_some_and(|&n| n > 0), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostname_mismatch_fails_until_the_certificate_names_the_host() {
    if !require_mosquitto() {
        return;
    }
    let ca = TestCa::new("upstream CA").expect("ca");
    let elsewhere = Leaf { names: vec!["broker.elsewhere.example".to_owned()], ..Leaf::server() };
    let mut upstream = TlsUpstream::start(&ca, &elsewhere, false).await;
    let files = GatewayFiles::new();
    ca.write_cert(&files.path("ca.pem")).expect("write");
    let config = files.write_config(&files.config(&upstream.url("localhost"), false));

    let session = Session::Persistent(unique_client_id("tls-sub"));
    let mut subscriber =
        Subscriber::start(upstream.broker.addr(), "sensors/#", session).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway =
        GatewaySpec::new(data.path()).config_file(&config).start().await.expect("start the gateway");
    publish(&gateway, "hostname").await;
    let error = outage_error(&gateway).await;
    assert!(
        error.contains("the server's certificate is not valid for \"localhost\"")
            && error.contains("upstream.tls.server_name"),
        "{error}\n{}",
        gateway.tail()
    );
    assert_buffered(&gateway, data.path()).await;

    upstream.replace_server_certificate(&ca, &Leaf::server()).await;
    assert_delivered(&gateway, &mut subscriber, data.path()).await;
    let counters = stop(gateway).await;
    assert!(counters.get("upstream_tls_hostname").is_some_and(|&n| n > 0), "{counters:?}");
}
