//! **QoS 2 sensors are counted exactly once in windows, across a crash.** The one crash a
//! QoS 1 sensor cannot be protected from is the gateway dying after the checkpoint holding
//! its reading committed and before the PUBACK left: the sensor resends, and the reading is
//! counted twice. With QoS 2 the gateway keeps a marker of each reading the windows took in
//! (in the same checkpoint), so the resend (DUP) is recognised after the restart and skipped.
//!
//! 20 sensors (raw MQTT 3.1.1 clients with persistent sessions, one flow in flight each, a
//! reading every 100 ms with `seq` 1, 2, 3 … and a value computed from `(sensor, seq)`) go
//! through the real `outpost` binary and a per-sensor tumbling count and sum to Debian's
//! mosquitto. `OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT` aborts the gateway right after a window
//! checkpoint commits and before the acknowledgements it holds are sent: exactly the crash in
//! question. The gateway restarts on the same data dir; each sensor reconnects and resends
//! what MQTT says it must (its PUBLISH with DUP if no PUBREC/PUBACK came, its PUBREL if no
//! PUBCOMP came). A window holds a contiguous run of seqs (`lo`..`hi`); the test checks each
//! window's `n` and `total` against that run and that every acknowledged reading is in
//! exactly one window.
//!
//! QoS 2: no reading counted twice, and at least one resend skipped as a duplicate
//! (`qos2_duplicates`), so the run did exercise the crash it is about. QoS 1, the same run:
//! at most the one reading in flight per sensor counted twice (printed: how many).

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use outpost_e2e::windows::{Aggregate, Fleet, Readings, SensorSpec, Setup, Verdict, WindowCheck, subscribe};

const SENSORS: usize = 20;
const PERIOD: Duration = Duration::from_millis(100);
const WINDOW_MS: u64 = 2_000;
const TIMEOUT: Duration = Duration::from_secs(60);
/// The checkpoint after which the first gateway aborts: with 200 readings/s and a checkpoint
/// every 25 ms, each holds readings not yet acknowledged.
const ABORT_AFTER_CHECKPOINT: u64 = 40;
/// Checkpoints every 25 ms (`buffer.max_ack_delay`; 250 ms by default). One flow in flight
/// per sensor, and a checkpoint releases the PUBRECs and PUBCOMPs it holds together: at 250
/// ms, two and a half times the sensors' 100 ms period, the sensors fall into step (all
/// waiting for a PUBREC at one checkpoint, all for a PUBCOMP at the next), and the crash then
/// leaves only one kind of flow to complete. At 25 ms their spread keeps both kinds in every
/// checkpoint.
const CHECKPOINT_EVERY: &str = "[buffer]\nmax_ack_delay = \"25ms\"\n";

const RULES: &str = r#"
[[rule]]
name = "total"
sql = '''
SELECT topic(2) AS sensor, count(*) AS n, sum(payload.v) AS total,
       min(payload.seq) AS lo, max(payload.seq) AS hi, window_start() AS ws
FROM "q/+"
GROUP BY topic(2), TUMBLINGWINDOW(ss, 2)
'''
[[rule.action]]
type = "forward"
topic = "total/${sensor}"
"#;

/// Quarters, so sums are exact; not linear in `seq`, so a reading missing and another
/// counted twice do not cancel out.
fn value(sensor: usize, seq: u64) -> f64 {
    ((sensor as u64 * 37 + seq * seq * 13) % 97) as f64 / 4.0
}

fn sensor_name(sensor: usize) -> String {
    format!("q{sensor:02}")
}

const READINGS: Readings = Readings { name: sensor_name, value };

const CHECK: WindowCheck =
    WindowCheck { readings: READINGS, window_ms: WINDOW_MS, field: "total", aggregate: Aggregate::Sum };

/// The crash run at `qos`: returns the verdict and the restarted gateway's final counters.
async fn crash_run(qos: u8) -> (Verdict, BTreeMap<String, u64>) {
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber = subscribe(upstream.addr(), "total/#").await;
    let mut setup = Setup::new(RULES, &upstream.url());
    setup.config.push_str(CHECKPOINT_EVERY);
    let mut first = GatewaySpec::new(setup.data.path())
        .config_toml(setup.config.clone())
        .env("OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT", ABORT_AFTER_CHECKPOINT.to_string())
        .start()
        .await
        .expect("start the gateway");
    let listen = first.listen();
    // Persistent sessions, one flow in flight each; spread over the period, so that a
    // checkpoint holds some sensors' readings and others' PUBRELs, and the crash leaves both
    // kinds of flow to complete.
    let spec = SensorSpec {
        readings: READINGS,
        topic_prefix: "q".to_owned(),
        client_prefix: format!("qos{qos}-"),
        qos,
        persistent: true,
        period: PERIOD,
        spread: true,
        timeout: TIMEOUT,
    };
    let fleet = Fleet::start(listen, spec, SENSORS);
    let status = first.wait_exit(TIMEOUT).await.unwrap_or_else(|e| panic!("the fault hook aborts it: {e:#}"));
    assert!(!status.success(), "aborted, not stopped: {status}");
    let aborted =
        first.messages("fault injection: aborting").pop().unwrap_or_else(|| panic!("{}", first.tail()));
    let held = aborted["held"].as_u64().unwrap_or(0);
    let mut spec = GatewaySpec::new(setup.data.path()).config_toml(setup.config.clone());
    spec.listen = listen;
    let mut gateway = spec.start().await.expect("restart the gateway");
    // Two windows after the restart.
    let arrived = subscriber.count();
    subscriber
        .wait_for_count(arrived + 2 * SENSORS as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let verdict = CHECK.finish(fleet, &mut subscriber, &mut gateway, TIMEOUT).await;
    let counters = gateway.final_counters().expect("final counters");
    println!("QoS {qos}: aborted holding {held} acknowledgements; {verdict:?}");
    (verdict, counters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_readings_are_counted_once_across_a_crash_after_their_checkpoint() {
    if !require_mosquitto() {
        return;
    }
    let (verdict, counters) = crash_run(2).await;
    let duplicates = counters.get("qos2_duplicates").copied().unwrap_or(0);
    println!("QoS 2: {duplicates} resends skipped as duplicates");
    assert!(
        verdict.resent > 0 && verdict.pubrels_resent > 0,
        "the crash left both kinds of flow: {verdict:?}"
    );
    assert!(duplicates > 0, "a resend of a reading whose checkpoint committed was recognised: {counters:?}");
    assert_eq!(verdict.double_counted, 0, "{verdict:?}");
    assert!(verdict.windows >= 2 * SENSORS, "{verdict:?}");
    assert_eq!(counters.get("qos2_marks_dropped").copied().unwrap_or(0), 0, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_readings_may_be_counted_twice_in_the_same_crash() {
    if !require_mosquitto() {
        return;
    }
    let (verdict, counters) = crash_run(1).await;
    println!("QoS 1: {} readings counted twice", verdict.double_counted);
    assert!(verdict.resent > 0, "the crash left readings to resend: {verdict:?}");
    assert!(verdict.most_of_one <= 1, "at most the one reading in flight per sensor: {verdict:?}");
    assert_eq!(counters.get("qos2_duplicates").copied().unwrap_or(0), 0, "QoS 1 has no markers");
}
