//! **Windowed rules keep what a PUBACK means.** 100 QoS 1 sensors at 10 readings/s each go
//! through the real `outpost` binary and a per-sensor tumbling average to Debian's mosquitto:
//!
//! ```sql
//! SELECT topic(2) AS sensor, avg(payload.v) AS avg, count(*) AS n, min(payload.seq) AS lo,
//!        max(payload.seq) AS hi, window_start() AS ws FROM "w/+"
//! GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)
//! ```
//!
//! A window's readings are the ones the gateway received in it, a
//! time the test cannot know to the millisecond, so each sensor sends its readings in order
//! (one in flight: the next only after the previous one's PUBACK) with `seq` 1, 2, 3 … and
//! a value the test computes from `(sensor, seq)`. A window then holds a contiguous run of
//! seqs, which its `lo` and `hi` name, and the test checks that its `n` and `avg` are exactly
//! those of that run, that each sensor's runs tile its acknowledged readings (none missing,
//! none in two windows), one window per sensor per 10 s, and that every upstream copy of a
//! window carries the same id and the same content (copies by id are counted, not doubled).
//!
//! Three runs, side by side in one test (each with its own gateway, upstream and fleet, so
//! the suite waits for the slowest, not for their sum): steady; SIGKILL of the gateway just
//! as a window's outputs reach the upstream, and a restart on the same data dir; a 20 s
//! upstream outage. What is guaranteed across the
//! kill: every reading acknowledged before the kill, and every one sent only after it, is
//! counted exactly once. The one reading per sensor in flight at the kill is resent by its
//! sensor; it counts once, or twice when the checkpoint holding it committed and the kill came
//! before its PUBACK left (QoS 1 cannot tell that apart from a lost reading). The test counts
//! those and fails on any other double count.

use std::net::SocketAddr;
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::mqtt::Subscriber;
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::{Mosquitto, SwitchedLink};
use outpost_e2e::windows::{Aggregate, Fleet, Readings, SensorSpec, Setup, Verdict, WindowCheck, subscribe};

const SENSORS: usize = 100;
const PERIOD: Duration = Duration::from_millis(100);
const WINDOW_MS: u64 = 10_000;
const TIMEOUT: Duration = Duration::from_secs(60);
/// The crash test's first gateway commits as slowly as a worn SD card
/// (`OUTPOST_FAULT_COMMIT_DELAY_MS`), so the kill lands after a window's outputs reached the
/// upstream and before the checkpoint taken after its close committed.
const SLOW_COMMIT_MS: u64 = 300;

const RULES: &str = r#"
[[rule]]
name = "avg"
sql = '''
SELECT topic(2) AS sensor, avg(payload.v) AS avg, count(*) AS n,
       min(payload.seq) AS lo, max(payload.seq) AS hi, window_start() AS ws
FROM "w/+"
GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)
'''
[[rule.action]]
type = "forward"
topic = "avg/${sensor}"
"#;

/// The value of reading `seq` of sensor `sensor`: quarters, so every sum is exact in f64, and
/// not linear in `seq`, so a reading missing from a window and another counted twice do not
/// cancel out.
fn value(sensor: usize, seq: u64) -> f64 {
    ((sensor as u64 * 31 + seq * seq * 17) % 101) as f64 / 4.0
}

fn sensor_name(sensor: usize) -> String {
    format!("s{sensor:03}")
}

const READINGS: Readings = Readings { name: sensor_name, value };

const CHECK: WindowCheck =
    WindowCheck { readings: READINGS, window_ms: WINDOW_MS, field: "avg", aggregate: Aggregate::Avg };

/// QoS 1 sensors with clean sessions: a reading whose PUBACK a lost connection swallowed is
/// sent again as a new publish.
fn fleet(addr: SocketAddr) -> Fleet {
    let spec = SensorSpec {
        readings: READINGS,
        topic_prefix: "w".to_owned(),
        client_prefix: "win-".to_owned(),
        qos: 1,
        persistent: false,
        period: PERIOD,
        spread: false,
        timeout: TIMEOUT,
    };
    Fleet::start(addr, spec, SENSORS)
}

async fn start(setup: &Setup, listen: Option<SocketAddr>, commit_delay_ms: Option<u64>) -> GatewayProcess {
    let mut spec = GatewaySpec::new(setup.data.path()).config_toml(setup.config.clone());
    if let Some(ms) = commit_delay_ms {
        spec = spec.env("OUTPOST_FAULT_COMMIT_DELAY_MS", ms.to_string());
    }
    if let Some(listen) = listen {
        spec.listen = listen;
    }
    spec.start().await.expect("start the gateway")
}

async fn finish(fleet: Fleet, subscriber: &mut Subscriber, gateway: &mut GatewayProcess) -> Verdict {
    CHECK.finish(fleet, subscriber, gateway, TIMEOUT).await
}

/// Steady: a fleet through three windows at least, no crash, no outage.
async fn steady() {
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber = subscribe(upstream.addr(), "avg/#").await;
    let setup = Setup::new(RULES, &upstream.url());
    let mut gateway = start(&setup, None, None).await;
    let fleet = fleet(gateway.listen());
    // The first window is partial (the fleet starts inside it); the run is over once a third
    // window's outputs arrive, and `finish` waits for the fourth, which the fleet's stop cuts.
    subscriber
        .wait_for_messages("a third window", TIMEOUT, |m| CHECK.starts(m) >= 3)
        .await
        .unwrap_or_else(|e| panic!("steady: {e:#}\n{}", gateway.tail()));
    let verdict = finish(fleet, &mut subscriber, &mut gateway).await;
    println!("steady: {verdict:?}");
    assert_eq!(verdict.double_counted, 0, "steady: no crash, no reading sent twice: {verdict:?}");
    assert!(verdict.windows >= 3 * SENSORS, "steady: {verdict:?}");
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("window_late").copied().unwrap_or(0), 0, "steady: {counters:?}");
    assert!(counters.get("window_checkpoints").copied().unwrap_or(0) > 0, "steady: {counters:?}");
}

/// SIGKILL as a window's outputs reach the upstream, and a restart on the same data dir.
async fn sigkill() {
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber = subscribe(upstream.addr(), "avg/#").await;
    let setup = Setup::new(RULES, &upstream.url());
    let mut gateway = start(&setup, None, Some(SLOW_COMMIT_MS)).await;
    let listen = gateway.listen();
    let fleet = fleet(listen);
    // The kill lands as the second window's outputs reach the upstream: the state holds the
    // next window's first readings, and the checkpoint after the close may not have committed.
    subscriber
        .wait_for_messages("a second window", TIMEOUT, |m| CHECK.starts(m) >= 2)
        .await
        .unwrap_or_else(|e| panic!("sigkill: {e:#}\n{}", gateway.tail()));
    gateway.kill().expect("SIGKILL the gateway");
    let acked_at_kill = fleet.acked();
    let mut gateway = start(&setup, Some(listen), None).await;
    // A window more after the restart (the one open at the kill).
    let arrived = subscriber.count();
    subscriber
        .wait_for_count(arrived + SENSORS as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("sigkill: {e:#}\n{}", gateway.tail()));
    let verdict = finish(fleet, &mut subscriber, &mut gateway).await;
    println!("sigkill after {acked_at_kill} acknowledged: {verdict:?}");
    assert!(
        verdict.double_counted <= SENSORS,
        "sigkill: at most the one reading in flight per sensor: {verdict:?}"
    );
}

/// A 20 s upstream outage: the windows that close meanwhile arrive after it, once each.
async fn outage() {
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let link = SwitchedLink::start(upstream.addr()).await.expect("start the link");
    let mut subscriber = subscribe(upstream.addr(), "avg/#").await;
    let setup = Setup::new(RULES, &link.url());
    let mut gateway = start(&setup, None, None).await;
    let fleet = fleet(gateway.listen());
    subscriber
        .wait_for_count(SENSORS as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("outage: a first window: {e:#}\n{}", gateway.tail()));
    link.set_up(false);
    gateway
        .wait_for_message("upstream connection lost", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("outage: the gateway notices the outage: {e:#}"));
    let before = subscriber.count();
    // The outage's length is the scenario: the sensors go on meanwhile.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = subscriber.count() - before;
    link.set_up(true);
    // The two windows that closed during the outage, and the next one after it.
    subscriber
        .wait_for_count(before + 3 * SENSORS as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("outage: the windows of the outage: {e:#}\n{}", gateway.tail()));
    let verdict = finish(fleet, &mut subscriber, &mut gateway).await;
    println!("outage: {during} arrived during it; {verdict:?}; {} copies by id", verdict.copies_by_id);
    assert_eq!(during, 0, "outage: nothing passed the cut link");
    assert_eq!(verdict.double_counted, 0, "outage: {verdict:?}");
    assert!(verdict.windows >= 4 * SENSORS, "outage: {verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10s_tumbling_average_counts_every_acknowledged_reading_once_steady_after_sigkill_and_outage() {
    if !require_mosquitto() {
        return;
    }
    tokio::join!(steady(), sigkill(), outage());
}
