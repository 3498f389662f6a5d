//! The systemd side of a running gateway, as systemd would see it: the test is the service
//! manager (a `NOTIFY_SOCKET` it created, `WATCHDOG_USEC` it chose) and the real binary
//! notifies it. An idle gateway keeps pinging and says its upstream's state in `STATUS=`; a
//! wedged stage (`OUTPOST_FAULT_WEDGE`) stops the pings and the log names it, once.

use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::mqtt::{publish_qos1, unique_client_id};
use outpost_e2e::notify::{Notification, NotifySocket};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(30);
/// `WATCHDOG_USEC` for these tests: pings every quarter (500 ms), a stage holding work for
/// half of it (1 s) is stuck. Long enough that a commit (an fsync) on a busy test machine is
/// not.
const WATCHDOG: Duration = Duration::from_secs(2);

const STUCK_LOG: &str = "watchdog: a pipeline stage holds work and stopped turning";

fn pings(notifications: &[Notification]) -> Vec<Instant> {
    notifications.iter().filter(|n| n.line == "WATCHDOG=1").map(|n| n.at).collect()
}

/// A gateway under the test's "systemd", with `config` and extra environment; the data
/// directory lives as long as the returned `TempDir`.
async fn start(
    notify: &NotifySocket,
    config: String,
    env: &[(&str, &str)],
) -> (GatewayProcess, tempfile::TempDir) {
    let data = tempfile::tempdir().expect("tempdir");
    let mut spec = GatewaySpec::new(data.path())
        .config_toml(config)
        .env("NOTIFY_SOCKET", notify.path().display().to_string())
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string());
    for (name, value) in env {
        spec = spec.env(*name, *value);
    }
    let gateway = spec.start().await.expect("start the gateway");
    (gateway, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_keeps_pinging_and_reports_its_upstream_in_status() {
    if !require_mosquitto() {
        return;
    }
    let notify = NotifySocket::bind().expect("notify socket");
    let mut upstream = Mosquitto::start().await.expect("start mosquitto");
    let config = format!("[upstream]\nurl = \"{}\"\nreconnect_max = \"200ms\"\n", upstream.url());
    let (mut gateway, _data) = start(&notify, config, &[]).await;

    notify.wait_for("READY=1", TIMEOUT, |all| all.iter().any(|n| n.line == "READY=1")).await.expect("ready");
    notify
        .wait_for("STATUS= says the upstream is connected", TIMEOUT, |all| {
            all.iter().any(|n| n.line.starts_with("STATUS=") && n.line.contains(" connected since "))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let connected = notify.matching("STATUS=").pop().expect("a status line");
    assert!(connected.line.contains(&upstream.url()), "{}", connected.line);
    assert!(connected.line.ends_with("; 0 events buffered"), "{}", connected.line);

    // The upstream goes away and comes back; the gateway has no work all along. Only the
    // STATUS= lines from here on count (the first one, at start, may say unreachable too).
    let before = notify.matching("STATUS=").len();
    upstream.stop().await.expect("stop mosquitto");
    let down_then_up = |back: bool| {
        move |all: &[Notification]| {
            let later: Vec<&Notification> =
                all.iter().filter(|n| n.line.starts_with("STATUS=")).skip(before).collect();
            let down = later.iter().position(|n| n.line.contains(" unreachable since "));
            down.is_some_and(|down| {
                !back || later[down..].iter().any(|n| n.line.contains(" connected since "))
            })
        }
    };
    notify
        .wait_for("STATUS= says the upstream is unreachable", TIMEOUT, down_then_up(false))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    upstream.start_again().await.expect("start mosquitto again");
    notify
        .wait_for("STATUS= says the upstream is back", TIMEOUT, down_then_up(true))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    // Idle all along: the pings go on, and never leave systemd's interval uncovered.
    let ready_at = notify.matching("READY=1")[0].at;
    let after_ready = |all: &[Notification]| pings(all).into_iter().filter(|at| *at >= ready_at).count();
    notify
        .wait_for("12 pings after READY", TIMEOUT, |all| after_ready(all) >= 12)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let pings: Vec<Instant> = pings(&notify.all()).into_iter().filter(|at| *at >= ready_at).collect();
    let longest_gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    assert!(longest_gap < WATCHDOG, "a gap of {longest_gap:?} between pings would let systemd kill it");
    // STATUS= only when it changed, at most one per 2 s.
    let statuses = notify.matching("STATUS=");
    assert!(statuses.windows(2).all(|w| w[0].line != w[1].line), "{statuses:?}");
    for w in statuses.windows(2) {
        let gap = w[1].at - w[0].at;
        // The socket's receive time, not the send time: allow for scheduling.
        assert!(gap >= Duration::from_millis(1900), "STATUS= lines {gap:?} apart: {statuses:?}");
    }
    assert!(gateway.messages(STUCK_LOG).is_empty(), "{}", gateway.tail());

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    notify
        .wait_for("STOPPING=1", TIMEOUT, |all| all.iter().any(|n| n.line == "STOPPING=1"))
        .await
        .expect("stopping");
}

/// Waits for one more ping than `seen`, and returns the new count.
async fn next_ping(notify: &NotifySocket, seen: usize, gateway: &GatewayProcess) -> usize {
    notify
        .wait_for("another WATCHDOG=1", TIMEOUT, |all| pings(all).len() > seen)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    pings(&notify.all()).len()
}

/// The store thread hangs inside its sixth command, as on a hung disk. Without an upstream
/// every QoS 1 publish is acknowledged only after its own commit, so the first five publishes
/// (one at a time) are its first five commands and the sixth wedges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_store_thread_stops_the_pings_and_is_named_once() {
    let notify = NotifySocket::bind().expect("notify socket");
    let (gateway, _data) = start(&notify, String::new(), &[("OUTPOST_FAULT_WEDGE", "store@6")]).await;
    gateway
        .wait_for_message("fault injection: a pipeline stage will stop turning", TIMEOUT)
        .await
        .expect("armed");
    notify.wait_for("READY=1", TIMEOUT, |all| all.iter().any(|n| n.line == "READY=1")).await.expect("ready");

    // With traffic: every publish is acknowledged (committed), and pings keep coming.
    let mut seen = pings(&notify.all()).len();
    for i in 1..=5 {
        publish_qos1(
            gateway.listen(),
            &unique_client_id("wd"),
            "sensors/wd/t",
            [format!("{i}").into_bytes()],
            TIMEOUT,
        )
        .await
        .unwrap_or_else(|e| panic!("publish {i}: {e:#}\n{}", gateway.tail()));
        seen = next_ping(&notify, seen, &gateway).await;
    }

    // The sixth commit never finishes: no PUBACK, and the watchdog gives up on the store.
    let listen = gateway.listen();
    let stuck_publish = tokio::spawn(async move {
        publish_qos1(
            listen,
            &unique_client_id("wd"),
            "sensors/wd/t",
            [b"6".to_vec()],
            Duration::from_secs(3600),
        )
        .await
    });
    let logged = gateway
        .wait_for_message(STUCK_LOG, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let logged_at = Instant::now();
    assert_eq!(logged["stage"], "store", "{logged}");
    assert_eq!(logged["level"], "ERROR", "{logged}");
    assert!(logged["hint"].as_str().is_some_and(|h| h.contains("disk")), "{logged}");

    // No ping for longer than systemd's interval: systemd would restart the gateway now.
    let after = pings(&notify.all()).len();
    let quiet = tokio::time::timeout(WATCHDOG * 2, next_ping(&notify, after, &gateway)).await;
    assert!(quiet.is_err(), "a ping came {:?} after the stuck stage was logged", logged_at.elapsed());
    assert!(!stuck_publish.is_finished(), "the wedged commit acknowledged nothing");
    assert_eq!(gateway.messages(STUCK_LOG).len(), 1, "named once:\n{}", gateway.tail());
    stuck_publish.abort();
}

/// The relay task stops turning at its first turn: a dead relay with the gateway otherwise
/// idle. Its heartbeat holds work it never finishes; the pings stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_task_stops_the_pings() {
    let notify = NotifySocket::bind().expect("notify socket");
    let (gateway, _data) = start(&notify, String::new(), &[("OUTPOST_FAULT_WEDGE", "relay")]).await;
    notify.wait_for("READY=1", TIMEOUT, |all| all.iter().any(|n| n.line == "READY=1")).await.expect("ready");
    let logged = gateway
        .wait_for_message(STUCK_LOG, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(logged["stage"], "relay", "{logged}");
    let after = pings(&notify.all()).len();
    let quiet = tokio::time::timeout(WATCHDOG * 2, next_ping(&notify, after, &gateway)).await;
    assert!(quiet.is_err(), "pings went on with the relay dead");
    assert_eq!(gateway.messages(STUCK_LOG).len(), 1, "named once:\n{}", gateway.tail());
}
