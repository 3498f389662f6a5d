//! The sensor side's TLS listener (`[broker.tls]`) on the real binary, with certificates made
//! in the test (rcgen) and real clients: Debian's `mosquitto_pub`/`mosquitto_sub` with
//! `--cafile`/`--cert`/`--key`, and the simulators' fleet over TLS. Covers publishing over
//! TLS on MQTT 3.1.1 and 5, mutual TLS whose certificate CN is the ACL's username, refused
//! client certificates, the expiry warnings, a SIGHUP certificate swap that keeps connected
//! sensors, and a slowloris handshake bounded by `broker.connection_timeout` and
//! `broker.tls.max_handshakes`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::process::{ChildProcess, run_to_completion};
use outpost_e2e::tls::{CertFiles, Pki, tls_table};
use outpost_e2e::{free_addr, require_tool};
use outpost_sim::fleet::{FleetConfig, run_fleet};
use outpost_sim::mqtt::{MqttVersion, TlsOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const PUB: &str = "/usr/bin/mosquitto_pub";
const SUB: &str = "/usr/bin/mosquitto_sub";
const WAIT: Duration = Duration::from_secs(15);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn have_clients() -> bool {
    require_tool(PUB, "mosquitto-clients") && require_tool(SUB, "mosquitto-clients")
}

/// `--cafile`, and `--cert`/`--key` when the client has a certificate.
fn tls_args(command: &mut Command, addr: SocketAddr, ca: &Path, client: Option<&CertFiles>) {
    command.args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "--cafile"]).arg(ca);
    if let Some(client) = client {
        command.arg("--cert").arg(&client.cert).arg("--key").arg(&client.key);
    }
}

/// `mosquitto_pub -q 1` over TLS: exits 0 only once the gateway acknowledged the publish.
fn publish(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&CertFiles>,
    version: &str,
    topic: &str,
    message: &str,
) -> std::process::Output {
    let mut command = Command::new(PUB);
    tls_args(&mut command, addr, ca, client);
    command.args(["-V", version, "-q", "1", "-t", topic, "-m", message, "-i", &format!("pub-{topic}")]);
    run_to_completion(command).expect("run mosquitto_pub")
}

#[track_caller]
fn assert_published(output: &std::process::Output, gateway: &GatewayProcess) {
    assert!(
        output.status.success(),
        "mosquitto_pub failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        gateway.tail()
    );
}

/// `mosquitto_sub -v` over TLS on `filter`, returned once its SUBACK came back.
async fn subscribe(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&CertFiles>,
    id: &str,
    filter: &str,
) -> ChildProcess {
    // Line-buffered: a pipe would hold the SUBACK line back.
    let mut command = Command::new("stdbuf");
    command.args(["-oL", SUB]);
    tls_args(&mut command, addr, ca, client);
    command.args(["-V", "mqttv311", "-q", "1", "-v", "-d", "-i", id, "-t", filter]);
    let sub = ChildProcess::spawn(format!("mosquitto_sub {id}"), command).expect("spawn mosquitto_sub");
    sub.wait_for_line("its SUBACK", WAIT, |l| l.contains("received SUBACK")).await.expect("subscribed");
    sub
}

async fn received(sub: &ChildProcess, line: &str) {
    sub.wait_for_line(&format!("`{line}`"), WAIT, |l| l == line).await.expect("the message arrives");
}

/// The messages received (`-v`: `topic payload`), without `-d`'s protocol lines.
fn deliveries(sub: &ChildProcess) -> Vec<String> {
    sub.lines().into_iter().filter(|l| l.starts_with("plant/")).collect()
}

fn field<'a>(log: &'a Value, name: &str) -> &'a Value {
    log.get(name).unwrap_or(&Value::Null)
}

/// A counter of the final `stopped` line (which leaves out zeros).
fn count(counters: &std::collections::BTreeMap<String, u64>, name: &str) -> u64 {
    counters.get(name).copied().unwrap_or(0)
}

async fn counters(mut gateway: GatewayProcess) -> std::collections::BTreeMap<String, u64> {
    gateway.terminate().await.expect("stops");
    gateway.final_counters().expect("the final counters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_over_tls_on_3_1_1_and_5_and_the_fleet_too() {
    if !have_clients() {
        return;
    }
    let mut pki = Pki::new("site").expect("pki");
    let server = pki.server(YEAR, false).expect("server cert");
    let tls = free_addr();
    let data = tempfile::tempdir().expect("tempdir");
    let gateway =
        GatewaySpec::new(data.path()).config_toml(tls_table(tls, &server, "")).start().await.expect("starts");
    let loaded = gateway.messages("TLS certificate");
    assert_eq!(loaded.len(), 1, "the certificate's expiry is logged at start-up\n{}", gateway.tail());
    assert!(
        field(&loaded[0], "days_left").as_u64().is_some_and(|d| (363..=365).contains(&d)),
        "{}",
        loaded[0]
    );

    let sub = subscribe(tls, pki.ca_file(), None, "tls-sub", "plant/#").await;
    assert_published(&publish(tls, pki.ca_file(), None, "mqttv311", "plant/v4", "over 3.1.1"), &gateway);
    assert_published(&publish(tls, pki.ca_file(), None, "mqttv5", "plant/v5", "over 5"), &gateway);
    received(&sub, "plant/v4 over 3.1.1").await;
    received(&sub, "plant/v5 over 5").await;

    // The simulators' fleet, MQTT 5 over TLS: every reading acknowledged.
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let fleet = FleetConfig {
            broker: tls.to_string(),
            mqtt_version: version,
            tls: Some(TlsOptions { ca_file: Some(pki.ca_file().to_owned()), client_auth: None }),
            sensors: 5,
            rate_per_sensor: 50.0,
            count_per_sensor: Some(20),
            client_prefix: format!("tls-fleet-{version:?}-"),
            ..FleetConfig::default()
        };
        let summary = run_fleet(fleet, CancellationToken::new()).await.expect("the fleet runs");
        assert_eq!((summary.sent, summary.acked), (100, 100), "{}", gateway.tail());
    }
    // Plain MQTT sent to the TLS port is no handshake: a TLS alert and a close, counted.
    let mut plain = tokio::net::TcpStream::connect(tls).await.expect("connect");
    plain.write_all(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 0]).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await.expect("closed in time");
    assert!(answer.is_empty() || answer[0] == 0x15, "an alert record at most: {answer:?}");

    let counters = counters(gateway).await;
    assert_eq!(count(&counters, "tls_handshakes"), 2 + 1 + 10, "{counters:?}");
    assert_eq!(count(&counters, "tls_handshakes_failed_protocol"), 1, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_over_mutual_tls_writes_only_where_its_certificate_name_may() {
    if !have_clients() {
        return;
    }
    let mut pki = Pki::new("site").expect("pki");
    let server = pki.server(YEAR, false).expect("server cert");
    let (line, reader) =
        (pki.client("line-1", None).expect("client"), pki.client("dashboard", None).expect("client"));
    let acl = pki.dir().join("acl");
    std::fs::write(&acl, "user dashboard\ntopic read plant/#\n\npattern write plant/%u/#\n").expect("acl");
    let tls = free_addr();
    let extra =
        format!("ca_file = \"{}\"\nuse_identity_as_username = \"common_name\"\n", pki.ca_file().display());
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path())
        .config_toml(format!(
            "[broker]\nacl_file = \"{}\"\n{}",
            acl.display(),
            tls_table(tls, &server, &extra)
        ))
        .start()
        .await
        .expect("starts");
    let sub = subscribe(tls, pki.ca_file(), Some(&reader), "fleet-dash", "plant/#").await;

    let fleet = |prefix: &str, template: &str, client: Option<&CertFiles>| FleetConfig {
        broker: tls.to_string(),
        mqtt_version: MqttVersion::V5,
        tls: Some(TlsOptions {
            ca_file: Some(pki.ca_file().to_owned()),
            client_auth: client.map(|c| outpost_sim::mqtt::ClientAuth {
                cert_file: c.cert.clone(),
                key_file: c.key.clone(),
            }),
        }),
        sensors: 5,
        rate_per_sensor: 50.0,
        count_per_sensor: Some(20),
        client_prefix: prefix.to_owned(),
        topic_template: template.to_owned(),
        ..FleetConfig::default()
    };
    // `%u` is the certificate's CN: line-1 writes under plant/line-1/ and nowhere else.
    let run = |config: FleetConfig| async move {
        tokio::time::timeout(Duration::from_secs(60), run_fleet(config, CancellationToken::new()))
            .await
            .expect("the fleet ends within a minute")
    };
    let own = run(fleet("own-", "plant/line-1/{id}", Some(&line))).await.expect("the fleet runs");
    assert_eq!((own.sent, own.acked, own.refused), (100, 100, 0), "{}", gateway.tail());
    let other = run(fleet("other-", "plant/line-2/{id}", Some(&line))).await.expect("the fleet runs");
    assert_eq!(
        (other.sent, other.acked, other.refused),
        (100, 0, 100),
        "PUBACK 0x87 each: {}",
        gateway.tail()
    );
    // Without a certificate the handshake is refused: the fleet stops with rustls's reason.
    let refused = run(fleet("none-", "plant/line-1/{id}", None)).await;
    assert!(refused.is_err(), "a fleet without a client certificate is refused");

    // Counted here: the predicate runs under the lock `deliveries` takes.
    let mut seen = 0;
    sub.wait_for_line("the 100th delivery", WAIT, |line| {
        seen += usize::from(line.starts_with("plant/"));
        seen >= 100
    })
    .await
    .expect("delivered");
    let delivered = deliveries(&sub);
    assert_eq!(delivered.len(), 100, "{delivered:?}");
    assert!(delivered.iter().all(|l| l.starts_with("plant/line-1/own-")), "{delivered:?}");
    let counters = counters(gateway).await;
    assert_eq!(count(&counters, "acl_publish_denied"), 100, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_the_user_the_acl_knows() {
    if !have_clients() {
        return;
    }
    let mut pki = Pki::new("site").expect("pki");
    let server = pki.server(YEAR, false).expect("server cert");
    let (sensor, reader) =
        (pki.client("sensor-a", None).expect("client"), pki.client("dashboard", None).expect("client"));
    let acl = pki.dir().join("acl");
    // As mosquitto: `%u` is the certificate's CN once it is the username.
    std::fs::write(&acl, "user dashboard\ntopic read plant/#\n\npattern write plant/%u/#\n").expect("acl");
    let tls = free_addr();
    let extra =
        format!("ca_file = \"{}\"\nuse_identity_as_username = \"common_name\"\n", pki.ca_file().display());
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path())
        .config_toml(format!(
            "[broker]\nacl_file = \"{}\"\n{}",
            acl.display(),
            tls_table(tls, &server, &extra)
        ))
        .start()
        .await
        .expect("starts");

    let sub = subscribe(tls, pki.ca_file(), Some(&reader), "dash", "plant/#").await;
    for (version, topic, message) in [
        ("mqttv5", "plant/sensor-a/t", "mine"),
        // Someone else's topic: MQTT 5 gets PUBACK 0x87, the publish goes nowhere.
        ("mqttv5", "plant/sensor-b/t", "not mine"),
        // 3.1.1 cannot say no: acknowledged and dropped, as mosquitto does.
        ("mqttv311", "plant/sensor-b/t", "not mine either"),
        ("mqttv311", "plant/sensor-a/t", "mine again"),
    ] {
        let _ = publish(tls, pki.ca_file(), Some(&sensor), version, topic, message);
    }
    received(&sub, "plant/sensor-a/t mine again").await;
    assert_eq!(deliveries(&sub), ["plant/sensor-a/t mine", "plant/sensor-a/t mine again"]);
    // The username in a CONNECT does not override the certificate's.
    let mut command = Command::new(PUB);
    tls_args(&mut command, tls, pki.ca_file(), Some(&sensor));
    command.args([
        "-q",
        "1",
        "-u",
        "dashboard",
        "-P",
        "x",
        "-t",
        "plant/sensor-c/t",
        "-m",
        "posing",
        "-i",
        "poser",
    ]);
    let _ = run_to_completion(command).expect("run mosquitto_pub");
    let counters = counters(gateway).await;
    assert_eq!(count(&counters, "acl_publish_denied"), 3, "{counters:?}");
    assert_eq!(
        count(&counters, "auth_failed"),
        0,
        "a certificate's user has no password to check: {counters:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_from_another_ca_or_none_are_refused() {
    if !have_clients() {
        return;
    }
    let mut pki = Pki::new("site").expect("pki");
    let mut other = Pki::new("rogue").expect("pki");
    let server = pki.server(YEAR, false).expect("server cert");
    let (good, rogue) =
        (pki.client("sensor-a", None).expect("client"), other.client("sensor-a", None).expect("client"));
    let tls = free_addr();
    let extra = format!("ca_file = \"{}\"\n", pki.ca_file().display());
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path())
        .config_toml(tls_table(tls, &server, &extra))
        .start()
        .await
        .expect("starts");

    assert!(!publish(tls, pki.ca_file(), Some(&rogue), "mqttv311", "t", "x").status.success());
    assert!(!publish(tls, pki.ca_file(), None, "mqttv5", "t", "x").status.success());
    assert_published(&publish(tls, pki.ca_file(), Some(&good), "mqttv5", "t", "x"), &gateway);
    let refused = gateway
        .wait_for_message("a client's TLS certificate was refused", WAIT)
        .await
        .expect("the refusal is logged");
    assert_eq!(field(&refused, "level"), "WARN", "{refused}");
    let counters = counters(gateway).await;
    assert_eq!(count(&counters, "tls_handshakes_failed_certificate"), 2, "{counters:?}");
    assert_eq!(count(&counters, "tls_handshakes"), 1, "{counters:?}");
    assert_eq!(count(&counters, "sensor_connects"), 1, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_and_keeps_connected_sensors_and_warns_of_expiry() {
    if !have_clients() {
        return;
    }
    let mut old = Pki::new("old").expect("pki");
    let mut new = Pki::new("new").expect("pki");
    // Expiring in 10 days: WARN at start-up.
    let soon = old.server(Duration::from_secs(10 * 24 * 3600), false).expect("server cert");
    let live = old.dir().join("live");
    std::fs::create_dir(&live).expect("mkdir");
    let served = CertFiles { cert: live.join("server.pem"), key: live.join("server.key") };
    std::fs::copy(&soon.cert, &served.cert).expect("copy");
    std::fs::copy(&soon.key, &served.key).expect("copy");
    let tls = free_addr();
    let data = tempfile::tempdir().expect("tempdir");
    let gateway =
        GatewaySpec::new(data.path()).config_toml(tls_table(tls, &served, "")).start().await.expect("starts");
    let warning = gateway.messages("the TLS listener's certificate expires soon");
    assert_eq!(warning.len(), 1, "{}", gateway.tail());
    assert_eq!(field(&warning[0], "level"), "WARN");
    assert!(
        field(&warning[0], "days_left").as_u64().is_some_and(|d| (9..=10).contains(&d)),
        "{}",
        warning[0]
    );

    // A sensor connected under the old certificate.
    let sub = subscribe(tls, old.ca_file(), None, "kept", "plant/#").await;

    // A broken key file: refused, the old certificate stays.
    std::fs::write(&served.key, "garbage\n").expect("write");
    gateway.signal(libc::SIGHUP).expect("SIGHUP");
    let refused = gateway.wait_for_message("TLS certificates not reloaded", WAIT).await.expect("refused");
    assert_eq!(field(&refused, "level"), "ERROR");
    assert_published(&publish(tls, old.ca_file(), None, "mqttv311", "plant/a", "still old"), &gateway);

    // The new CA's certificate, valid a year: swapped in, and logged with its expiry.
    let renewed = new.server(YEAR, false).expect("server cert");
    std::fs::copy(&renewed.cert, &served.cert).expect("copy");
    std::fs::copy(&renewed.key, &served.key).expect("copy");
    gateway.signal(libc::SIGHUP).expect("SIGHUP");
    gateway
        .wait_for_log("the reloaded certificate", WAIT, |l| {
            field(l, "message") == "TLS certificate" && field(l, "certificate") == "reloaded"
        })
        .await
        .expect("reloaded");
    assert!(
        !publish(tls, old.ca_file(), None, "mqttv311", "plant/b", "x").status.success(),
        "old CA refused now"
    );
    assert_published(&publish(tls, new.ca_file(), None, "mqttv5", "plant/c", "new"), &gateway);
    // The sensor connected before the swap never noticed.
    received(&sub, "plant/c new").await;
    assert_eq!(deliveries(&sub), ["plant/a still old", "plant/c new"]);

    // An expired certificate is an ERROR (the gateway serves it: the operator decides).
    let expired = new.server(Duration::from_secs(24 * 3600), true).expect("server cert");
    std::fs::copy(&expired.cert, &served.cert).expect("copy");
    std::fs::copy(&expired.key, &served.key).expect("copy");
    gateway.signal(libc::SIGHUP).expect("SIGHUP");
    let error =
        gateway.wait_for_message("the TLS listener's certificate has expired", WAIT).await.expect("logged");
    assert_eq!(field(&error, "level"), "ERROR");
    let counters = counters(gateway).await;
    assert_eq!(
        (count(&counters, "tls_reloads"), count(&counters, "tls_reload_failures")),
        (2, 1),
        "{counters:?}"
    );
    assert_eq!(count(&counters, "sensor_takeovers"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_handshake_is_bounded_and_established_sensors_go_on() {
    if !have_clients() {
        return;
    }
    let mut pki = Pki::new("site").expect("pki");
    let server = pki.server(YEAR, false).expect("server cert");
    let tls = free_addr();
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path())
        .config_toml(format!(
            "[broker]\nconnection_timeout = \"2s\"\n{}",
            tls_table(tls, &server, "max_handshakes = 4\n")
        ))
        .start()
        .await
        .expect("starts");
    let sub = subscribe(tls, pki.ca_file(), None, "established", "plant/#").await;

    // Ten clients open TCP and send one byte of a ClientHello, then nothing.
    let started = Instant::now();
    let mut lorises = Vec::new();
    for _ in 0..10 {
        let mut s = tokio::net::TcpStream::connect(tls).await.expect("connect");
        s.write_all(&[0x16]).await.expect("write");
        lorises.push(s);
    }
    // The established sensor is served meanwhile (published through the plain listener).
    let mut command = Command::new(PUB);
    command.args(["-h", "127.0.0.1", "-p", &gateway.listen().port().to_string(), "-q", "1"]);
    command.args(["-t", "plant/during", "-m", "flood", "-i", "plain-pub"]);
    assert!(run_to_completion(command).expect("mosquitto_pub").status.success(), "{}", gateway.tail());
    received(&sub, "plant/during flood").await;

    // Four hold a handshake slot until broker.connection_timeout; six were closed at once.
    let waits: Vec<_> = lorises
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
                assert!(matches!(r, Ok(Ok(0) | Err(_))), "closed without an answer: {r:?}");
                started.elapsed()
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for wait in waits {
        closed_at.push(wait.await.expect("the reader ends"));
    }
    closed_at.sort();
    assert!(
        closed_at[5] < Duration::from_millis(1500),
        "six closed at once: {closed_at:?}\n{}",
        gateway.tail()
    );
    assert!(
        closed_at[6] >= Duration::from_millis(1800) && closed_at[9] < Duration::from_secs(5),
        "four held until the 2 s timeout: {closed_at:?}"
    );
    // Once they are gone a real client gets a slot again.
    assert_published(&publish(tls, pki.ca_file(), None, "mqttv5", "plant/after", "x"), &gateway);
    let counters = counters(gateway).await;
    assert_eq!(count(&counters, "tls_handshakes_failed_busy"), 6, "{counters:?}");
    assert_eq!(count(&counters, "tls_handshakes_failed_timeout"), 4, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outpost_check_names_a_bad_tls_file_and_the_fix() {
    let mut pki = Pki::new("site").expect("pki");
    let server = pki.server(YEAR, false).expect("server cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("outpost.toml");
    let missing = CertFiles { cert: server.cert.clone(), key: dir.path().join("missing.key") };
    std::fs::write(
        &config,
        format!("{}use_identity_as_username = \"common_name\"\n", tls_table(free_addr(), &missing, "")),
    )
    .expect("write");
    let outcome = outpost_e2e::gateway::outpost(&["check", "--config", config.to_str().expect("utf-8")])
        .expect("outpost check runs");
    assert_ne!(outcome.code, Some(0));
    let text = format!("{}{}", outcome.stdout, outcome.stderr);
    assert!(text.contains("broker.tls.key_file") && text.contains("missing.key"), "{text}");
    assert!(text.contains("broker.tls.use_identity_as_username") && text.contains("ca_file"), "{text}");
}
