//! The `[http]` endpoint of the real binary: `/metrics` after known traffic (parsed with a
//! Prometheus text parser), `/health/ready` following whether the sensor listener accepts
//! connections, `/status` across an upstream outage, the bearer token, and `outpost check`
//! refusing an endpoint bound beyond loopback without one.
//!
//! Every request is a real HTTP/1.1 request (hyper's client) over TCP; the upstream is Debian's
//! mosquitto. Conditions the gateway reaches asynchronously (an acknowledgement counted, a
//! probe's cached answer expiring) are polled with a deadline, never waited for with a sleep.

use std::net::SocketAddr;
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec, outpost};
use outpost_e2e::http::{self, get};
use outpost_e2e::http::{Scrape, Value};
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1, unique_client_id};
use outpost_e2e::upstream::Mosquitto;
use outpost_e2e::{free_addr, raw, require_mosquitto};
use serde_json::Value as Json;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(30);
/// Between two polls of a condition that has no event to wait on (the endpoint caches probe
/// answers for 1 s, and the relay's gauges follow its loop).
const POLL: Duration = Duration::from_millis(100);

async fn get_json(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, Json) {
    let (status, body) = get(addr, path, token).await.unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"));
    (status, json)
}

/// `/metrics`, parsed.
async fn scrape(addr: SocketAddr, token: Option<&str>) -> Scrape {
    http::scrape(addr, token).await.unwrap_or_else(|e| panic!("GET /metrics: {e:#}")).1
}

/// The value of the sample `name{labels}`; `None` if absent. Panics on a sample of a type the
/// exposition does not use for it.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))?;
    match &sample.value {
        Value::Counter(v) => {
            assert!(name.ends_with("_total"), "{name} is a counter without `_total`");
            Some(*v)
        }
        Value::Gauge(v) => Some(*v),
        other => panic!("{name} is {other:?}, expected a counter or a gauge"),
    }
}

/// How many observations the histogram `name` holds (its `+Inf` bucket).
fn histogram_count(scrape: &Scrape, name: &str) -> f64 {
    let sample =
        scrape.samples.iter().find(|s| s.metric == name).unwrap_or_else(|| panic!("{name} is missing"));
    match &sample.value {
        Value::Histogram(buckets) => buckets
            .iter()
            .find(|b| b.less_than == f64::INFINITY)
            .map(|b| b.count)
            .unwrap_or_else(|| panic!("{name} has no +Inf bucket")),
        other => panic!("{name} is {other:?}, not a histogram"),
    }
}

/// Polls `condition` until it returns `Some`, or fails after [`TIMEOUT`] saying `what`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(found) = condition().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// A gateway with the endpoint on a free loopback port, plus `extra` config.
async fn gateway_with_http(data: &std::path::Path, extra: &str) -> (GatewayProcess, SocketAddr) {
    let http = free_addr();
    let config = format!("[http]\nlisten = \"{http}\"\n{extra}");
    let gateway = GatewaySpec::new(data).config_toml(config).start().await.expect("start the gateway");
    (gateway, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic() {
    if !require_mosquitto() {
        return;
    }
    const N: usize = 200;
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "http/#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let (gateway, http) =
        gateway_with_http(data.path(), &format!("[upstream]\nurl = \"{}\"\n", upstream.url())).await;

    let payloads = (0..N).map(|i| format!("reading {i}").into_bytes());
    publish_qos1(gateway.listen(), &unique_client_id("http-pub"), "http/metrics", payloads, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("publish: {e:#}\n{}", gateway.tail()));
    subscriber.wait_for_count(N as u64, TIMEOUT).await.expect("every reading upstream");

    // The last PUBACKs from mosquitto may be counted a moment after the subscriber has them.
    let n = N as f64;
    let metrics = eventually("outpost_upstream_acknowledged_total = N", || async {
        let metrics = scrape(http, None).await;
        (value(&metrics, "outpost_upstream_acknowledged_total", &[]) == Some(n)).then_some(metrics)
    })
    .await;
    let v = |name: &str, labels: &[(&str, &str)]| {
        value(&metrics, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} is missing"))
    };
    assert_eq!(v("outpost_messages_received_total", &[]), n);
    assert_eq!(v("outpost_buffer_accepted_total", &[]), n);
    assert!(v("outpost_upstream_sent_total", &[]) >= n);
    assert_eq!(v("outpost_upstream_connected", &[("endpoint", &upstream.url())]), 1.0);
    assert_eq!(v("outpost_upstream_connects_total", &[]), 1.0);
    for reason in ["ttl", "overflow", "rejected_upstream", "poison"] {
        assert_eq!(v("outpost_events_discarded_total", &[("reason", reason)]), 0.0, "{reason}");
    }
    assert_eq!(v("outpost_publishes_refused_total", &[("reason", "buffer_full")]), 0.0);
    assert_eq!(v("outpost_buffer_events", &[]), 0.0);
    assert_eq!(v("outpost_buffer_store_up", &[]), 1.0);
    assert_eq!(v("outpost_buffer_capacity_events", &[]), 10_000_000.0);
    assert_eq!(v("outpost_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    // The gateway's own process: megabytes resident, a handful of descriptors at least.
    assert!(v("outpost_process_resident_memory_bytes", &[]) > 1e6);
    assert!(v("outpost_process_open_fds", &[]) >= 5.0);
    let histogram = metrics
        .samples
        .iter()
        .find(|s| s.metric == "outpost_buffer_commit_duration_seconds")
        .expect("the commit duration histogram");
    match &histogram.value {
        Value::Histogram(buckets) => {
            assert_eq!(buckets.len(), 17, "{buckets:?}");
            assert_eq!(buckets.last().map(|b| b.less_than), Some(f64::INFINITY));
        }
        other => panic!("the commit duration is {other:?}, not a histogram"),
    }
    // Every publish held its PUBACK until safe (here: acknowledged upstream), and every
    // upstream PUBACK matched a publish written on the link.
    assert_eq!(histogram_count(&metrics, "outpost_puback_hold_seconds"), n);
    assert_eq!(histogram_count(&metrics, "outpost_upstream_round_trip_seconds"), n);
    assert_eq!(
        histogram_count(&metrics, "outpost_buffer_commit_duration_seconds"),
        v("outpost_buffer_fsyncs_total", &[])
    );
    assert!(
        !metrics
            .samples
            .iter()
            .any(|s| s.labels.get("topic").is_some() || s.labels.get("client_id").is_some()),
        "no per-topic or per-device labels"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_whether_the_listener_accepts_sensors() {
    let data = tempfile::tempdir().expect("tempdir");
    // One sensor at most: while it is connected the listener still holds its port and accepts
    // TCP, but refuses every new sensor (CONNACK 3). Only a real CONNECT sees the difference.
    let (gateway, http) = gateway_with_http(data.path(), "[broker]\nmax_connections = 1\n").await;
    let (status, live) = get_json(http, "/health/live", None).await;
    assert_eq!((status, &live["live"]), (200, &Json::Bool(true)));
    let (status, ready) = get_json(http, "/health/ready", None).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["listeners"][0]["addr"], gateway.listen().to_string());
    assert_eq!(ready["store"]["ok"], true);
    // No upstream configured: buffering is still ready.
    assert_eq!(ready["upstream"]["connected"], false);

    let mut sensor = TcpStream::connect(gateway.listen()).await.expect("connect a sensor");
    sensor.write_all(&raw::connect_v311(&unique_client_id("http-only-sensor"), 60)).await.expect("CONNECT");
    let (kind, connack) = tokio::time::timeout(TIMEOUT, raw::read_packet(&mut sensor))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!((kind >> 4, connack.get(1)), (2, Some(&0)), "the sensor is accepted");

    let not_ready = eventually("/health/ready = 503", || async {
        let (status, body) = get_json(http, "/health/ready", None).await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(not_ready["ready"], false);
    let error = not_ready["listeners"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("max_connections"), "{not_ready}");
    // Liveness is not readiness.
    assert_eq!(get_json(http, "/health/live", None).await.0, 200);

    drop(sensor);
    eventually("/health/ready = 200 again", || async {
        (get_json(http, "/health/ready", None).await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_across_an_upstream_outage() {
    if !require_mosquitto() {
        return;
    }
    const N: usize = 300;
    let mut upstream = Mosquitto::start().await.expect("start mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let (gateway, http) = gateway_with_http(
        data.path(),
        &format!("[upstream]\nurl = \"{}\"\nreconnect_max = \"1s\"\n", upstream.url()),
    )
    .await;
    // Connected, and sampled since (the sampler's `since_ms` has a 1 s resolution): an outage
    // within the first sample period would otherwise leave `since_ms` where it was.
    let connected = eventually("upstream connected", || async {
        let (_, status) = get_json(http, "/status", None).await;
        let sampled = status["uptime_s"].as_f64().is_some_and(|up| up >= 1.5);
        (status["upstream"]["connected"] == true && sampled).then_some(status)
    })
    .await;
    assert_eq!(connected["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(connected["upstream"]["endpoint"], upstream.url());
    assert_eq!(connected["ready"], true);
    let up_since = connected["upstream"]["since_ms"].as_u64().expect("since_ms");

    upstream.stop().await.expect("stop mosquitto");
    gateway.wait_for_message("upstream connection lost", TIMEOUT).await.expect("the gateway notices");
    let payloads = (0..N).map(|i| format!("kept {i}").into_bytes());
    // Acknowledged once committed: the upstream is down.
    publish_qos1(gateway.listen(), &unique_client_id("http-outage"), "http/outage", payloads, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("publish during the outage: {e:#}\n{}", gateway.tail()));
    let down = eventually("/status: upstream down, backlog of N", || async {
        let (_, status) = get_json(http, "/status", None).await;
        let backlog = &status["backlog"];
        (status["upstream"]["connected"] == false
            && backlog["events"].as_u64() == Some(N as u64)
            && backlog["committed"]["events"].as_u64() == Some(N as u64))
        .then_some(status)
    })
    .await;
    assert!(down["upstream"]["since_ms"].as_u64().expect("since_ms") > up_since, "{down}");
    assert_eq!(down["upstream"]["last_error"]["kind"], "upstream_failures", "{down}");
    assert!(down["backlog"]["oldest_age_s"].as_f64().is_some(), "{down}");
    assert!(down["rates"]["ingested"].as_f64().expect("rate") > 0.0, "{down}");
    // Buffering through an outage is the job: still ready, and the body says why it is quiet.
    let (status, ready) = get_json(http, "/health/ready", None).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["upstream"]["connected"], false);

    upstream.start_again().await.expect("start mosquitto again");
    let drained = eventually("/status: connected and drained", || async {
        let (_, status) = get_json(http, "/status", None).await;
        (status["upstream"]["connected"] == true
            && status["backlog"]["events"].as_u64() == Some(0)
            && status["backlog"]["committed"]["events"].as_u64() == Some(0))
        .then_some(status)
    })
    .await;
    assert!(
        drained["upstream"]["since_ms"].as_u64().expect("since_ms")
            >= down["upstream"]["since_ms"].as_u64().expect("since_ms"),
        "{drained}"
    );
    let metrics = scrape(http, None).await;
    assert_eq!(value(&metrics, "outpost_upstream_acknowledged_total", &[]), Some(N as f64));
    assert!(value(&metrics, "outpost_buffer_committed_total", &[]).unwrap_or(0.0) >= N as f64);
    // The outage's events were committed before they were acknowledged: each transaction is
    // one observation of the commit duration.
    let commits = value(&metrics, "outpost_buffer_fsyncs_total", &[]).expect("fsyncs");
    assert!(commits >= 1.0);
    assert_eq!(histogram_count(&metrics, "outpost_buffer_commit_duration_seconds"), commits);
    assert_eq!(histogram_count(&metrics, "outpost_puback_hold_seconds"), N as f64);
    assert_eq!(histogram_count(&metrics, "outpost_upstream_round_trip_seconds"), N as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_guards_everything_but_health() {
    let data = tempfile::tempdir().expect("tempdir");
    let secrets = tempfile::tempdir().expect("tempdir");
    let token_file = secrets.path().join("http-token");
    std::fs::write(&token_file, "7f3a9c0e2b\n").expect("write the token");
    let http = free_addr();
    // Bound beyond loopback (all addresses), which is allowed because a token is set.
    let listen = SocketAddr::from(([0, 0, 0, 0], http.port()));
    let config = format!("[http]\nlisten = \"{listen}\"\nbearer_token_file = \"{}\"\n", token_file.display());
    let gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");

    for path in ["/metrics", "/status"] {
        assert_eq!(get(http, path, None).await.expect("GET").0, 401, "{path} without a token");
        assert_eq!(
            get(http, path, Some("7f3a9c0e2")).await.expect("GET").0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(get(http, path, Some("7f3a9c0e2b")).await.expect("GET").0, 200, "{path} with the token");
    }
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(get(http, path, None).await.expect("GET").0, 200, "{path} needs no token");
    }
    assert_eq!(get(http, "/nothing", Some("7f3a9c0e2b")).await.expect("GET").0, 404);
    let metrics = scrape(http, Some("7f3a9c0e2b")).await;
    assert_eq!(value(&metrics, "outpost_http_unauthorized_total", &[]), Some(4.0));
    let logs = gateway.logs();
    assert!(!logs.iter().any(|l| l.to_string().contains("7f3a9c0e2b")), "the token is never logged");
    assert!(
        gateway.messages("http endpoint: request without the bearer token refused").len() == 1,
        "four refusals, one log line (rate-limited): {}",
        gateway.tail()
    );
}

#[test]
fn check_refuses_an_endpoint_beyond_loopback_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, "[http]\nlisten = \"0.0.0.0:9883\"\n").expect("write the config");
    let path = path.to_str().expect("utf-8 path");
    let outcome = outpost(&["check", "--config", path]).expect("run outpost check");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    let expected = format!(
        "outpost: {path}: line 2, column 10: `http.listen` = \"0.0.0.0:9883\" is invalid: it is reachable beyond this machine, and /metrics and /status would answer anyone without a token; set http.bearer_token_file"
    );
    assert!(outcome.stderr.starts_with(&expected), "{}", outcome.stderr);

    std::fs::write(
        dir.path().join("outpost.toml"),
        "[http]\nlisten = \"0.0.0.0:9883\"\nallow_unauthenticated = true\n",
    )
    .expect("write the config");
    let outcome = outpost(&["check", "--config", path]).expect("run outpost check");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_probes_the_tls_listener_through_a_handshake() {
    use outpost_e2e::tls::{Pki, tls_table};
    let mut pki = Pki::new("site").expect("pki");
    let server = pki.server(Duration::from_secs(365 * 24 * 3600), false).expect("server certificate");
    let tls = free_addr();
    let data = tempfile::tempdir().expect("tempdir");
    // One handshake at a time, each allowed 10 s: one silent TCP connection takes the slot.
    let extra =
        format!("[broker]\nconnection_timeout = \"10s\"\n{}", tls_table(tls, &server, "max_handshakes = 1"));
    let (gateway, http) = gateway_with_http(data.path(), &extra).await;
    let (status, ready) = get_json(http, "/health/ready", None).await;
    assert_eq!(status, 200, "{ready}\n{}", gateway.tail());
    assert_eq!(ready["listeners"][0]["addr"], gateway.listen().to_string());
    assert_eq!(ready["listeners"][0].get("tls"), None, "{ready}");
    assert_eq!(ready["listeners"][1]["addr"], tls.to_string());
    assert_eq!(
        (&ready["listeners"][1]["tls"], &ready["listeners"][1]["ok"]),
        (&Json::Bool(true), &Json::Bool(true))
    );

    let slowloris = TcpStream::connect(tls).await.expect("connect to the TLS port");
    let not_ready = eventually("/health/ready = 503", || async {
        let (status, body) = get_json(http, "/health/ready", None).await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(not_ready["listeners"][0]["ok"], true, "the plain listener still answers: {not_ready}");
    let error = not_ready["listeners"][1]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("TLS handshake failed"), "{not_ready}");
    drop(slowloris);
    eventually("/health/ready = 200 again", || async {
        (get_json(http, "/health/ready", None).await.0 == 200).then_some(())
    })
    .await;
    let metrics = scrape(http, None).await;
    let handshakes = value(&metrics, "outpost_tls_handshakes_total", &[("result", "ok")]).unwrap_or(0.0);
    assert!(handshakes >= 2.0, "the probe's handshakes are real ones: {handshakes}");
    let busy = value(&metrics, "outpost_tls_handshakes_total", &[("result", "busy")]).unwrap_or(0.0);
    assert!(busy >= 1.0, "the probe was refused while the slot was taken: {busy}");
    drop(gateway);

    // With client certificates required the probe (which has none) stops after the handshake.
    let tls = free_addr();
    let data = tempfile::tempdir().expect("tempdir");
    let extra = tls_table(tls, &server, &format!("ca_file = \"{}\"", pki.ca_file().display()));
    let (gateway, http) = gateway_with_http(data.path(), &extra).await;
    let (status, ready) = get_json(http, "/health/ready", None).await;
    assert_eq!(status, 200, "{ready}\n{}", gateway.tail());
    assert_eq!(ready["listeners"][1]["ok"], true, "{ready}");
    let note = ready["listeners"][1]["note"].as_str().unwrap_or_default();
    assert!(note.contains("require_certificate"), "{ready}");
}
