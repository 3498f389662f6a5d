//! The fleet against Debian's Mosquitto, a broker that shares no code with rumqttc: MQTT 5 on a
//! plain listener (Mosquitto serves 3.1.1 and 5 on one listener), and MQTT 3.1.1 and 5 over TLS
//! with a CA and certificates made by the `openssl` CLI in a temporary directory. The verifier
//! always subscribes with MQTT 3.1.1 on a plain listener of the same broker.
//!
//! Brokers are the harness's `Mosquitto`: child processes that are killed when dropped, ready
//! once Mosquitto's own `running` notice is in their output.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use outpost_sim::fleet::{FleetConfig, FleetSummary, run_fleet};
use outpost_sim::harness::mosquitto::{MOSQUITTO, MosquittoConfig};
use outpost_sim::harness::{free_port, require_tool};
use outpost_sim::mqtt::{ClientAuth, MqttVersion, TlsOptions};
use outpost_sim::process::running_as_root;
use outpost_sim::verify::{Subscriber, VerifyReport, start_subscriber};
use rumqttc::QoS;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const OPENSSL: &str = "/usr/bin/openssl";
/// How long a fleet or verifier may take to finish.
const TIMEOUT: Duration = Duration::from_secs(30);

// ---- MQTT 5 ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_fleet_is_verified() {
    let Some(broker) = Mosquitto::start_plain().await else { return };
    let cfg = FleetConfig {
        sensors: 4,
        rate_per_sensor: 500.0,
        count_per_sensor: Some(100),
        client_prefix: "v5-".to_string(),
        ..broker.fleet(MqttVersion::V5)
    };
    let mut subscriber = broker.subscribe().await;
    let summary = run(cfg).await;
    assert_eq!((summary.sent, summary.acked, summary.refused), (400, 400, 0));
    for device in summary.per_device.values() {
        assert_eq!(device.acked_seqs, (1..=100).collect::<Vec<u64>>());
    }
    let (p50, p99, max) =
        (summary.ack_latency_ms_p50, summary.ack_latency_ms_p99, summary.ack_latency_ms_max);
    assert!(p50.is_some_and(|p50| p50 >= 0.0) && p50 <= p99 && p99 <= max, "{p50:?} {p99:?} {max:?}");

    let report = broker.verify(&mut subscriber, &summary).await;
    assert_eq!((report.unique, report.duplicates, report.reordered, report.malformed), (400, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_qos0_and_qos2() {
    let Some(broker) = Mosquitto::start_plain().await else { return };
    let qos0 = FleetConfig {
        sensors: 2,
        rate_per_sensor: 500.0,
        count_per_sensor: Some(20),
        qos: QoS::AtMostOnce,
        client_prefix: "v5-qos0-".to_string(),
        ..broker.fleet(MqttVersion::V5)
    };
    let summary = run(qos0).await;
    assert_eq!((summary.sent, summary.acked), (40, 40));
    assert_eq!(summary.ack_latency_ms_p50, None, "QoS 0 has no acks to time");

    let qos2 = FleetConfig {
        sensors: 2,
        rate_per_sensor: 500.0,
        count_per_sensor: Some(20),
        qos: QoS::ExactlyOnce,
        client_prefix: "v5-qos2-".to_string(),
        ..broker.fleet(MqttVersion::V5)
    };
    let mut subscriber = broker.subscribe().await;
    let summary = run(qos2).await;
    assert_eq!((summary.sent, summary.acked), (40, 40));
    assert!(summary.ack_latency_ms_p99.is_some(), "PUBCOMPs are timed");
    let report = broker.verify(&mut subscriber, &summary).await;
    assert_eq!((report.duplicates, report.malformed), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_closed_loop_and_churn() {
    let Some(broker) = Mosquitto::start_plain().await else { return };
    // A rate that alone would take 500 s: only the closed loop finishes within the timeout.
    let closed = FleetConfig {
        sensors: 2,
        rate_per_sensor: 1.0,
        count_per_sensor: Some(500),
        max_outstanding: Some(8),
        client_prefix: "v5-closed-".to_string(),
        ..broker.fleet(MqttVersion::V5)
    };
    let mut subscriber = broker.subscribe().await;
    let summary = run(closed).await;
    assert_eq!((summary.sent, summary.acked), (1000, 1000));
    let report = broker.verify(&mut subscriber, &summary).await;
    assert_eq!((report.unique, report.duplicates), (1000, 0));

    let churn = FleetConfig {
        sensors: 3,
        rate_per_sensor: 200.0,
        count_per_sensor: Some(200),
        churn: Some(Duration::from_millis(150)),
        client_prefix: "v5-churn-".to_string(),
        ..broker.fleet(MqttVersion::V5)
    };
    let mut subscriber = broker.subscribe().await;
    let summary = run(churn).await;
    assert!(summary.acked > 0 && summary.acked <= summary.sent, "{} of {}", summary.acked, summary.sent);
    let report = broker.verify(&mut subscriber, &summary).await;
    assert_eq!(report.malformed, 0);
}

// ---- TLS ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_over_tls_is_verified() {
    let Some(broker) = Mosquitto::start_tls().await else { return };
    let pki = broker.pki.as_ref().expect("a TLS broker has certificates");

    // MQTT 3.1.1, the broker's certificate checked against our CA.
    let server_auth = FleetConfig {
        broker: format!("127.0.0.1:{}", broker.tls_port),
        sensors: 3,
        rate_per_sensor: 500.0,
        count_per_sensor: Some(40),
        client_prefix: "tls-".to_string(),
        tls: Some(TlsOptions { ca_file: Some(pki.ca.clone()), client_auth: None }),
        ..broker.fleet(MqttVersion::V311)
    };
    let mut subscriber = broker.subscribe().await;
    let summary = run(server_auth).await;
    assert_eq!((summary.sent, summary.acked), (120, 120));
    assert!(summary.ack_latency_ms_p50.is_some());
    let report = broker.verify(&mut subscriber, &summary).await;
    assert_eq!((report.unique, report.duplicates, report.malformed), (120, 0, 0));

    // MQTT 5 with a client certificate, on the listener that requires one.
    let mutual = FleetConfig {
        broker: format!("127.0.0.1:{}", broker.mtls_port),
        sensors: 2,
        rate_per_sensor: 500.0,
        count_per_sensor: Some(40),
        client_prefix: "mtls-".to_string(),
        tls: Some(pki.client_tls()),
        ..broker.fleet(MqttVersion::V5)
    };
    let mut subscriber = broker.subscribe().await;
    let summary = run(mutual).await;
    assert_eq!((summary.sent, summary.acked), (80, 80));
    let report = broker.verify(&mut subscriber, &summary).await;
    assert_eq!((report.unique, report.duplicates, report.malformed), (80, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_certificate_is_a_clear_error() {
    let Some(broker) = Mosquitto::start_tls().await else { return };
    let pki = broker.pki.as_ref().expect("a TLS broker has certificates");
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let cfg = FleetConfig {
            broker: format!("127.0.0.1:{}", broker.tls_port),
            sensors: 3,
            count_per_sensor: Some(10),
            tls: Some(TlsOptions { ca_file: Some(pki.other_ca.clone()), client_auth: None }),
            ..broker.fleet(version)
        };
        let error = fleet_error(cfg).await;
        assert!(
            error.contains("over TLS") && error.contains("invalid peer certificate: UnknownIssuer"),
            "MQTT {version}: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_client_certificate_is_a_clear_error() {
    let Some(broker) = Mosquitto::start_tls().await else { return };
    let pki = broker.pki.as_ref().expect("a TLS broker has certificates");
    let cfg = FleetConfig {
        broker: format!("127.0.0.1:{}", broker.mtls_port),
        count_per_sensor: Some(10),
        tls: Some(TlsOptions { ca_file: Some(pki.ca.clone()), client_auth: None }),
        ..broker.fleet(MqttVersion::V5)
    };
    let error = fleet_error(cfg).await;
    assert!(error.contains("over TLS") && error.contains("CertificateRequired"), "{error}");
}

// ---- helpers ----

/// Runs a fleet that must finish within [`TIMEOUT`].
async fn run(cfg: FleetConfig) -> FleetSummary {
    tokio::time::timeout(TIMEOUT, run_fleet(cfg, CancellationToken::new()))
        .await
        .expect("the fleet finishes")
        .expect("run the fleet")
}

/// Runs a fleet that must fail, promptly: retrying until the fleet's own deadlines would take
/// over 10 s.
async fn fleet_error(cfg: FleetConfig) -> String {
    let outcome = tokio::time::timeout(Duration::from_secs(5), run_fleet(cfg, CancellationToken::new()))
        .await
        .expect("the fleet fails at once instead of retrying");
    format!("{:#}", outcome.expect_err("the connection must fail"))
}

/// The harness's Mosquitto with a plain listener (for the verifier and plain fleets) and, for
/// TLS tests, a TLS listener and a TLS listener that requires a client certificate.
struct Mosquitto {
    /// Killed on drop; declared before `_pki_dir`, which holds the files its TLS listeners read.
    broker: outpost_sim::harness::mosquitto::Mosquitto,
    tls_port: u16,
    mtls_port: u16,
    pki: Option<Pki>,
    _pki_dir: TempDir,
}

impl Mosquitto {
    /// A broker with a plain listener only, or `None` (after a notice) without Mosquitto.
    async fn start_plain() -> Option<Mosquitto> {
        if !require_tool(MOSQUITTO, "mosquitto") {
            return None;
        }
        Some(Mosquitto::start(false).await)
    }

    /// A broker with a plain and two TLS listeners, or `None` without Mosquitto or OpenSSL.
    async fn start_tls() -> Option<Mosquitto> {
        if !require_tool(MOSQUITTO, "mosquitto") || !require_tool(OPENSSL, "openssl") {
            return None;
        }
        Some(Mosquitto::start(true).await)
    }

    async fn start(tls: bool) -> Mosquitto {
        let pki_dir = tempfile::tempdir().expect("a temporary directory");
        let (tls_port, mtls_port) = (free_port().expect("a free port"), free_port().expect("a free port"));
        // The harness's default: no per-client queue limit, which would silently drop messages
        // queued for the verifier. As root, Mosquitto would switch to a user that cannot read
        // the temporary directories.
        let mut extra = String::from(if running_as_root() { "user root\n" } else { "" });
        let pki = if tls { Some(Pki::create(pki_dir.path()).await) } else { None };
        if let Some(pki) = &pki {
            let certificates = format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display()
            );
            extra.push_str(&format!("listener {tls_port} 127.0.0.1\n{certificates}"));
            extra.push_str(&format!(
                "listener {mtls_port} 127.0.0.1\n{certificates}require_certificate true\n"
            ));
        }
        let broker = outpost_sim::harness::mosquitto::Mosquitto::start_configured(&MosquittoConfig {
            extra,
            ..MosquittoConfig::default()
        })
        .await
        .unwrap_or_else(|error| panic!("mosquitto did not start: {error:#}"));
        Mosquitto { broker, tls_port, mtls_port, pki, _pki_dir: pki_dir }
    }

    /// The plain listener, as a fleet's or verifier's `HOST:PORT`.
    fn plain(&self) -> String {
        self.broker.addr().to_string()
    }

    /// A fleet config for the plain listener.
    fn fleet(&self, mqtt_version: MqttVersion) -> FleetConfig {
        FleetConfig { broker: self.plain(), mqtt_version, ..FleetConfig::default() }
    }

    /// A verifier subscribed to every reading, on the plain listener.
    async fn subscribe(&self) -> Subscriber {
        start_subscriber(&self.plain(), "sensors/#")
            .await
            .unwrap_or_else(|error| panic!("subscribe: {error:#}\n{}", self.output()))
    }

    /// Waits until every reading `summary` reports as acknowledged reached `subscriber`.
    async fn verify(&self, subscriber: &mut Subscriber, summary: &FleetSummary) -> VerifyReport {
        subscriber
            .wait_for_expected(summary, TIMEOUT)
            .await
            .unwrap_or_else(|error| panic!("acknowledged readings missing: {error:#}\n{}", self.output()))
    }

    /// Mosquitto's last lines of output, for failure messages.
    fn output(&self) -> String {
        self.broker.tail()
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a second,
/// unrelated CA; all PEM files made by the `openssl` CLI.
struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// Extensions for `openssl`: webpki rejects a CA certificate used as a leaf, a leaf without
/// the right extended key usage, and a server certificate that names the host only in its CN.
const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
";

impl Pki {
    async fn create(dir: &Path) -> Pki {
        let config = dir.join("openssl.cnf");
        std::fs::write(&config, OPENSSL_CONFIG).expect("write openssl.cnf");
        let file = |name: &str| dir.join(name);
        let pki = Pki {
            ca: file("ca.pem"),
            other_ca: file("other-ca.pem"),
            server_cert: file("server.pem"),
            server_key: file("server.key"),
            client_cert: file("client.pem"),
            client_key: file("client.key"),
        };
        for (name, cert) in [("Outpost test CA", &pki.ca), ("Unrelated test CA", &pki.other_ca)] {
            let subject = format!("/CN={name}");
            let key = cert.with_extension("key");
            let args = ["-x509", "-extensions", "ca_ext", "-days", "2", "-subj", &subject];
            openssl_req(&config, &args, &key, cert).await;
        }
        for (subject, extensions, cert, key) in [
            ("/CN=127.0.0.1", "server_ext", &pki.server_cert, &pki.server_key),
            ("/CN=outpost-sim", "client_ext", &pki.client_cert, &pki.client_key),
        ] {
            let request = cert.with_extension("csr");
            openssl_req(&config, &["-new", "-subj", subject], key, &request).await;
            let ca_key = pki.ca.with_extension("key");
            run_openssl(&[
                "x509",
                "-req",
                "-in",
                path_str(&request),
                "-CA",
                path_str(&pki.ca),
                "-CAkey",
                path_str(&ca_key),
                "-set_serial",
                if extensions == "server_ext" { "2" } else { "3" },
                "-days",
                "2",
                "-extfile",
                path_str(&config),
                "-extensions",
                extensions,
                "-out",
                path_str(cert),
            ])
            .await;
        }
        pki
    }

    /// TLS settings with the CA and the client certificate.
    fn client_tls(&self) -> TlsOptions {
        TlsOptions {
            ca_file: Some(self.ca.clone()),
            client_auth: Some(ClientAuth {
                cert_file: self.client_cert.clone(),
                key_file: self.client_key.clone(),
            }),
        }
    }
}

/// `openssl req` with `args` and a new P-256 key (fast to generate), unencrypted.
async fn openssl_req(config: &Path, args: &[&str], key: &Path, out: &Path) {
    let mut all = vec!["req", "-config", path_str(config), "-newkey", "ec"];
    all.extend(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", path_str(key)]);
    all.extend(["-out", path_str(out)]);
    all.extend(args);
    run_openssl(&all).await;
}

async fn run_openssl(args: &[&str]) {
    let output = tokio::process::Command::new(OPENSSL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {} failed ({}):\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}
