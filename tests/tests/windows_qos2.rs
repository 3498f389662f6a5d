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
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Message, Subscriber, SubscriberOptions};
use outpost_e2e::raw::{connect_v311_persistent, publish_v311, publish_v311_dup, pubrel, read_packet};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SENSORS: usize = 20;
const PERIOD: Duration = Duration::from_millis(100);
const WINDOW_MS: u64 = 2_000;
const TIMEOUT: Duration = Duration::from_secs(60);
/// The checkpoint after which the first gateway aborts: with 200 readings/s and a checkpoint
/// every 25 ms, each holds readings not yet acknowledged.
const ABORT_AFTER_CHECKPOINT: u64 = 40;

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

#[derive(Debug, Default, Clone)]
struct SensorLog {
    /// Seqs acknowledged (PUBACK; QoS 2: PUBREC), in order.
    acked: Vec<u64>,
    /// Seqs whose PUBLISH was sent again with DUP.
    resent: Vec<u64>,
    /// PUBRELs sent again after a reconnect.
    pubrels_resent: u64,
}

/// Connects with a persistent session (again and again while the gateway is down, up to a
/// deadline) and waits for a CONNACK that accepts.
async fn connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<TcpStream> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(&connect_v311_persistent(client_id, 60)).await?;
            let (first, body) = read_packet(&mut stream).await?;
            anyhow::ensure!(first == 0x20 && body.get(1) == Some(&0), "CONNACK {first:#x} {body:?}");
            Ok(stream)
        };
        match attempt.await {
            Ok(stream) => return Ok(stream),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e).context(format!("{client_id} cannot connect to {addr}"));
            }
            // A back-off between connect attempts while the gateway restarts: a refused
            // connect has no readiness event to wait on.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Writes `packet` and waits for the answer of type `answer` (the first byte's high nibble)
/// to `pkid`.
async fn exchange(stream: &mut TcpStream, packet: &[u8], answer: u8, pkid: u16) -> anyhow::Result<()> {
    stream.write_all(packet).await?;
    loop {
        let (first, body) = tokio::time::timeout(TIMEOUT, read_packet(&mut *stream)).await??;
        if first >> 4 == answer && body.get(..2) == Some(&pkid.to_be_bytes()[..]) {
            return Ok(());
        }
    }
}

/// Where a sensor's flow stands.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// PUBLISH sent (again with DUP after a reconnect), waiting for PUBACK/PUBREC.
    Publish,
    /// QoS 2: PUBREC came, PUBREL sent (again after a reconnect), waiting for PUBCOMP.
    Release,
}

/// One sensor: a reading every [`PERIOD`], the next only once the previous flow completed;
/// after a lost connection it reconnects and resends as MQTT says.
async fn sensor(
    addr: SocketAddr,
    qos: u8,
    idx: usize,
    stop: CancellationToken,
    log: Arc<Mutex<SensorLog>>,
) -> anyhow::Result<()> {
    let name = sensor_name(idx);
    let topic = format!("q/{name}");
    let client_id = format!("qos{qos}-{name}");
    // Spread over the period, so that a checkpoint holds some sensors' readings and others'
    // PUBRELs, and the crash leaves both kinds of flow to complete.
    let offset = PERIOD * u32::try_from(idx).unwrap_or(0) / SENSORS as u32;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<TcpStream> = None;
    // One in flight: one packet id, as clients with a single slot use.
    let pkid = 1;
    for seq in 1.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let payload = format!(r#"{{"seq":{seq},"v":{}}}"#, value(idx, seq));
        let mut phase = Phase::Publish;
        let mut reconnected = false;
        loop {
            let stream = match conn.as_mut() {
                Some(stream) => stream,
                None => conn.insert(connect(addr, &client_id).await?),
            };
            let sent = match (phase, reconnected) {
                (Phase::Publish, false) => {
                    exchange(
                        stream,
                        &publish_v311(&topic, qos, pkid, false, payload.as_bytes()),
                        4 + qos - 1,
                        pkid,
                    )
                    .await
                }
                (Phase::Publish, true) => {
                    log.lock().unwrap_or_else(PoisonError::into_inner).resent.push(seq);
                    exchange(
                        stream,
                        &publish_v311_dup(&topic, qos, pkid, payload.as_bytes()),
                        4 + qos - 1,
                        pkid,
                    )
                    .await
                }
                (Phase::Release, resend) => {
                    if resend {
                        log.lock().unwrap_or_else(PoisonError::into_inner).pubrels_resent += 1;
                    }
                    exchange(stream, &pubrel(pkid), 7, pkid).await
                }
            };
            match sent {
                Err(_) => {
                    conn = None;
                    reconnected = true;
                }
                Ok(()) if phase == Phase::Publish => {
                    log.lock().unwrap_or_else(PoisonError::into_inner).acked.push(seq);
                    if qos == 1 {
                        break;
                    }
                    phase = Phase::Release;
                    reconnected = false;
                }
                Ok(()) => break,
            }
        }
    }
    Ok(())
}

struct Fleet {
    logs: Vec<Arc<Mutex<SensorLog>>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Fleet {
    fn start(addr: SocketAddr, qos: u8) -> Fleet {
        let stop = CancellationToken::new();
        let logs: Vec<_> = (0..SENSORS).map(|_| Arc::new(Mutex::new(SensorLog::default()))).collect();
        let tasks = logs
            .iter()
            .enumerate()
            .map(|(idx, log)| tokio::spawn(sensor(addr, qos, idx, stop.clone(), Arc::clone(log))))
            .collect();
        Fleet { logs, stop, tasks }
    }

    /// Stops every sensor after its current flow and returns what each saw.
    async fn stop(self) -> Vec<SensorLog> {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("sensor task").expect("the sensor ran");
        }
        self.logs.iter().map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
struct WindowOut {
    id: String,
    sensor: String,
    ws: u64,
    n: u64,
    lo: u64,
    hi: u64,
    total: f64,
}

fn parse(message: &Message) -> anyhow::Result<WindowOut> {
    let envelope: Value = serde_json::from_slice(&message.payload)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&message.payload)))?;
    let p = &envelope["payload"];
    let num = |k: &str| p[k].as_u64().with_context(|| format!("`{k}` in {envelope}"));
    Ok(WindowOut {
        id: envelope["id"].as_str().context("an id")?.to_owned(),
        sensor: p["sensor"].as_str().context("a sensor")?.to_owned(),
        ws: num("ws")?,
        n: num("n")?,
        lo: num("lo")?,
        hi: num("hi")?,
        total: p["total"].as_f64().context("a total")?,
    })
}

/// Whether every sensor's last acknowledged reading is in a window that arrived.
fn all_arrived(messages: &[Message], last_acked: &BTreeMap<String, u64>) -> bool {
    let mut highest: BTreeMap<String, u64> = BTreeMap::new();
    for out in messages.iter().filter_map(|m| parse(m).ok()) {
        let h = highest.entry(out.sensor).or_default();
        *h = (*h).max(out.hi);
    }
    last_acked.iter().all(|(sensor, last)| highest.get(sensor).is_some_and(|h| h >= last))
}

#[derive(Debug, Default)]
struct Verdict {
    windows: usize,
    readings: u64,
    /// Readings counted twice (each one sent again after the crash).
    double_counted: usize,
    /// The most readings of one sensor counted twice.
    most_of_one: usize,
    resent: usize,
    pubrels_resent: u64,
}

/// Checks the windows (one per id; copies by id must be equal) against what the sensors saw
/// acknowledged: every acknowledged reading counted once, or twice if it was resent.
fn verify(messages: &[Message], logs: &[SensorLog]) -> anyhow::Result<Verdict> {
    let mut by_id: BTreeMap<String, WindowOut> = BTreeMap::new();
    for message in messages {
        let out = parse(message)?;
        if let Some(first) = by_id.get(&out.id) {
            anyhow::ensure!(*first == out, "two copies of window {} differ: {first:?} and {out:?}", out.id);
        }
        by_id.insert(out.id.clone(), out);
    }
    let mut verdict = Verdict { windows: by_id.len(), ..Verdict::default() };
    for (idx, log) in logs.iter().enumerate() {
        let name = sensor_name(idx);
        verdict.resent += log.resent.len();
        verdict.pubrels_resent += log.pubrels_resent;
        let mut ws: Vec<&WindowOut> = by_id.values().filter(|w| w.sensor == name).collect();
        ws.sort_by_key(|w| (w.ws, w.lo));
        let last = log.acked.last().copied().unwrap_or(0);
        anyhow::ensure!(last > 0, "{name} got no acknowledgement");
        let mut counted: BTreeMap<u64, u32> = BTreeMap::new();
        for w in &ws {
            anyhow::ensure!(w.ws % WINDOW_MS == 0 && w.lo <= w.hi, "{name}: {w:?}");
            let run = w.hi - w.lo + 1;
            let mut sum: f64 = (w.lo..=w.hi).map(|s| value(idx, s)).sum();
            if w.n != run {
                // One seq counted twice inside the window: it must be one sent again.
                let twice: Vec<u64> =
                    log.resent.iter().copied().filter(|s| (w.lo..=w.hi).contains(s)).collect();
                anyhow::ensure!(
                    w.n == run + 1 && twice.len() == 1,
                    "{name}: window {w:?} counts {} readings for seqs {}..={} (resent: {twice:?})",
                    w.n,
                    w.lo,
                    w.hi
                );
                *counted.entry(twice[0]).or_default() += 1;
                sum += value(idx, twice[0]);
            }
            anyhow::ensure!(
                (w.total - sum).abs() < 1e-9,
                "{name}: window {w:?}: total {} but its readings sum to {sum}",
                w.total
            );
            for s in w.lo..=w.hi {
                *counted.entry(s).or_default() += 1;
            }
            verdict.readings += w.n;
        }
        let mut twice = 0;
        for seq in 1..=last {
            match (counted.get(&seq).copied().unwrap_or(0), log.resent.contains(&seq)) {
                (1, _) => {}
                (2, true) => twice += 1,
                (n, resent) => anyhow::bail!(
                    "{name}: acknowledged reading {seq} counted {n} times (resent: {resent}); windows: {ws:?}"
                ),
            }
        }
        anyhow::ensure!(
            counted.keys().all(|&s| s <= last),
            "{name}: a window counts a reading after the last acknowledged one ({last}): {ws:?}"
        );
        verdict.double_counted += twice;
        verdict.most_of_one = verdict.most_of_one.max(twice);
    }
    Ok(verdict)
}

/// The crash run at `qos`: returns the verdict and the restarted gateway's final counters.
async fn crash_run(qos: u8) -> (Verdict, BTreeMap<String, u64>) {
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let options = SubscriberOptions { verify: false, ..SubscriberOptions::default() };
    let mut subscriber =
        Subscriber::start_with(upstream.addr(), "total/#", options).await.expect("subscribe upstream");
    let rules_dir = tempfile::tempdir().expect("tempdir");
    let rules = rules_dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).expect("write rules");
    let config = format!(
        "rules = {:?}\n[upstream]\nurl = \"{}\"\nevent_id = \"envelope\"\nreconnect_max = \"1s\"\n",
        rules.to_str().expect("utf-8 path"),
        upstream.url(),
    );
    let data = tempfile::tempdir().expect("tempdir");
    let mut first = GatewaySpec::new(data.path())
        .config_toml(config.clone())
        .env("OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT", ABORT_AFTER_CHECKPOINT.to_string())
        .start()
        .await
        .expect("start the gateway");
    let listen = first.listen();
    let fleet = Fleet::start(listen, qos);
    let status = first.wait_exit(TIMEOUT).await.unwrap_or_else(|e| panic!("the fault hook aborts it: {e:#}"));
    assert!(!status.success(), "aborted, not stopped: {status}");
    let aborted =
        first.messages("fault injection: aborting").pop().unwrap_or_else(|| panic!("{}", first.tail()));
    let held = aborted["held"].as_u64().unwrap_or(0);
    let mut spec = GatewaySpec::new(data.path()).config_toml(config);
    spec.listen = listen;
    let mut gateway = spec.start().await.expect("restart the gateway");
    // Two windows after the restart.
    let arrived = subscriber.count();
    subscriber
        .wait_for_count(arrived + 2 * SENSORS as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let logs = fleet.stop().await;
    let last: BTreeMap<String, u64> = logs
        .iter()
        .enumerate()
        .map(|(idx, l)| (sensor_name(idx), l.acked.last().copied().unwrap_or(0)))
        .collect();
    subscriber
        .wait_for_messages("the windows of every acknowledged reading", TIMEOUT, |m| all_arrived(m, &last))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let verdict = verify(&subscriber.full_messages(), &logs).unwrap_or_else(|e| panic!("{e:#}"));
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
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
