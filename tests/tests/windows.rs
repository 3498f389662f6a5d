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

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::mqtt::{Message, Subscriber, SubscriberOptions};
use outpost_e2e::raw::{connect_v311, publish_v311, read_packet};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::{Mosquitto, SwitchedLink};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// What one sensor saw.
#[derive(Debug, Default, Clone)]
struct SensorLog {
    /// Seqs whose PUBACK arrived, in order.
    acked: Vec<u64>,
    /// Seqs sent more than once (the connection dropped before their PUBACK).
    resent: BTreeSet<u64>,
}

/// Connects (again and again while the gateway is down, up to a deadline) and waits for a
/// CONNACK that accepts.
async fn connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<TcpStream> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(&connect_v311(client_id, 60)).await?;
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

/// Publishes one reading at QoS 1 and waits for its PUBACK.
async fn publish(stream: &mut TcpStream, topic: &str, payload: &[u8], pkid: u16) -> anyhow::Result<()> {
    stream.write_all(&publish_v311(topic, 1, pkid, false, payload)).await?;
    loop {
        let (first, body) = tokio::time::timeout(TIMEOUT, read_packet(&mut *stream)).await??;
        if first == 0x40 && body.get(..2) == Some(&pkid.to_be_bytes()[..]) {
            return Ok(());
        }
    }
}

/// One sensor: a reading every [`PERIOD`], the next only once the previous one is
/// acknowledged; a reading whose connection dropped is sent again on a new connection.
async fn sensor(
    addr: SocketAddr,
    idx: usize,
    stop: CancellationToken,
    log: Arc<Mutex<SensorLog>>,
) -> anyhow::Result<()> {
    let name = sensor_name(idx);
    let topic = format!("w/{name}");
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<TcpStream> = None;
    let mut pkid: u16 = 0;
    for seq in 1.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let payload = format!(r#"{{"seq":{seq},"v":{}}}"#, value(idx, seq));
        let mut attempts = 0;
        loop {
            let stream = match conn.as_mut() {
                Some(stream) => stream,
                None => conn.insert(connect(addr, &format!("win-{name}")).await?),
            };
            attempts += 1;
            if attempts > 1 {
                log.lock().unwrap_or_else(PoisonError::into_inner).resent.insert(seq);
            }
            pkid = pkid % u16::MAX + 1;
            match publish(stream, &topic, payload.as_bytes(), pkid).await {
                Ok(()) => break,
                Err(_) => conn = None,
            }
        }
        log.lock().unwrap_or_else(PoisonError::into_inner).acked.push(seq);
    }
    Ok(())
}

struct Fleet {
    logs: Vec<Arc<Mutex<SensorLog>>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Fleet {
    fn start(addr: SocketAddr) -> Fleet {
        let stop = CancellationToken::new();
        let logs: Vec<_> = (0..SENSORS).map(|_| Arc::new(Mutex::new(SensorLog::default()))).collect();
        let tasks = logs
            .iter()
            .enumerate()
            .map(|(idx, log)| tokio::spawn(sensor(addr, idx, stop.clone(), Arc::clone(log))))
            .collect();
        Fleet { logs, stop, tasks }
    }

    fn acked(&self) -> usize {
        self.logs.iter().map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).acked.len()).sum()
    }

    /// Stops every sensor after its current reading and returns what each saw.
    async fn stop(self) -> Vec<SensorLog> {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("sensor task").expect("the sensor ran");
        }
        self.logs.iter().map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).clone()).collect()
    }
}

/// One window's output as it arrived upstream.
#[derive(Debug, Clone, PartialEq)]
struct WindowOut {
    id: String,
    sensor: String,
    ws: u64,
    n: u64,
    lo: u64,
    hi: u64,
    avg: f64,
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
        avg: p["avg"].as_f64().context("an avg")?,
    })
}

/// The windows that arrived, one per id, and how many copies by id came on top; fails if two
/// copies of one id differ.
fn unique_windows(messages: &[Message]) -> anyhow::Result<(Vec<WindowOut>, usize)> {
    let mut by_id: BTreeMap<String, WindowOut> = BTreeMap::new();
    let mut copies = 0;
    for message in messages {
        let out = parse(message)?;
        match by_id.get(&out.id) {
            Some(first) => {
                anyhow::ensure!(
                    *first == out,
                    "two copies of window {} differ: {first:?} and {out:?}",
                    out.id
                );
                copies += 1;
            }
            None => {
                by_id.insert(out.id.clone(), out);
            }
        }
    }
    Ok((by_id.into_values().collect(), copies))
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
    copies_by_id: usize,
    /// Readings counted twice, all of them sent again after the kill.
    double_counted: usize,
}

/// Checks the windows against the readings the sensors saw acknowledged (see the file's doc).
fn verify(messages: &[Message], logs: &[SensorLog]) -> anyhow::Result<Verdict> {
    let (windows, copies_by_id) = unique_windows(messages)?;
    let mut verdict = Verdict { windows: windows.len(), copies_by_id, ..Verdict::default() };
    let mut by_sensor: BTreeMap<&str, Vec<&WindowOut>> = BTreeMap::new();
    for w in &windows {
        by_sensor.entry(&w.sensor).or_default().push(w);
    }
    for (idx, log) in logs.iter().enumerate() {
        let name = sensor_name(idx);
        let mut ws = by_sensor.remove(name.as_str()).unwrap_or_default();
        ws.sort_by_key(|w| (w.ws, w.lo));
        let last = log.acked.last().copied().unwrap_or(0);
        anyhow::ensure!(last > 0, "{name} got no PUBACK");
        // How many windows counted each seq.
        let mut counted: BTreeMap<u64, u32> = BTreeMap::new();
        for pair in ws.windows(2) {
            anyhow::ensure!(pair[0].ws < pair[1].ws, "{name}: two windows start at {}: {pair:?}", pair[1].ws);
        }
        for w in &ws {
            anyhow::ensure!(w.ws % WINDOW_MS == 0, "{name}: window not aligned: {w:?}");
            anyhow::ensure!(w.lo <= w.hi, "{w:?}");
            let run = w.hi - w.lo + 1;
            let sum: f64 = (w.lo..=w.hi).map(|s| value(idx, s)).sum();
            let expected = if w.n == run {
                sum / run as f64
            } else {
                // One seq counted twice inside the window: it must be one sent again.
                let twice: Vec<u64> = log.resent.range(w.lo..=w.hi).copied().collect();
                anyhow::ensure!(
                    w.n == run + 1 && twice.len() == 1,
                    "{name}: window {w:?} counts {} readings for seqs {}..={} (resent: {twice:?})",
                    w.n,
                    w.lo,
                    w.hi
                );
                *counted.entry(twice[0]).or_default() += 1;
                (sum + value(idx, twice[0])) / w.n as f64
            };
            anyhow::ensure!(
                (w.avg - expected).abs() <= 1e-9 * expected.abs().max(1.0),
                "{name}: window {w:?}: avg {} but its readings average {expected}",
                w.avg
            );
            for s in w.lo..=w.hi {
                *counted.entry(s).or_default() += 1;
            }
            verdict.readings += w.n;
        }
        for seq in 1..=last {
            let n = counted.get(&seq).copied().unwrap_or(0);
            let resent = log.resent.contains(&seq);
            match n {
                1 => {}
                2 if resent => verdict.double_counted += 1,
                _ => anyhow::bail!(
                    "{name}: acknowledged reading {seq} counted {n} times (resent: {resent}); windows: {ws:?}"
                ),
            }
        }
        anyhow::ensure!(
            counted.keys().all(|&s| s <= last),
            "{name}: a window counts a reading after the last acknowledged one ({last}): {ws:?}"
        );
    }
    anyhow::ensure!(by_sensor.is_empty(), "windows of unknown sensors: {:?}", by_sensor.keys());
    Ok(verdict)
}

struct Setup {
    _rules_dir: tempfile::TempDir,
    data: tempfile::TempDir,
    config: String,
}

fn setup(upstream_url: &str) -> Setup {
    let rules_dir = tempfile::tempdir().expect("tempdir");
    let rules = rules_dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).expect("write rules");
    let config = format!(
        "rules = {:?}\n[upstream]\nurl = \"{upstream_url}\"\nevent_id = \"envelope\"\nreconnect_max = \"1s\"\n",
        rules.to_str().expect("utf-8 path"),
    );
    Setup { _rules_dir: rules_dir, data: tempfile::tempdir().expect("tempdir"), config }
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

async fn subscribe(upstream: SocketAddr) -> Subscriber {
    let options = SubscriberOptions { verify: false, ..SubscriberOptions::default() };
    Subscriber::start_with(upstream, "avg/#", options).await.expect("subscribe upstream")
}

/// Stops the fleet, waits for the windows holding every acknowledged reading, and checks them.
async fn finish(fleet: Fleet, subscriber: &mut Subscriber, gateway: &mut GatewayProcess) -> Verdict {
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
    verdict
}

/// Steady: a fleet through three windows at least, no crash, no outage.
async fn steady() {
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber = subscribe(upstream.addr()).await;
    let setup = setup(&upstream.url());
    let mut gateway = start(&setup, None, None).await;
    let fleet = Fleet::start(gateway.listen());
    // The first window is partial (the fleet starts inside it); the run is over once a third
    // window's outputs arrive, and `finish` waits for the fourth, which the fleet's stop cuts.
    subscriber
        .wait_for_messages("a third window", TIMEOUT, |m| {
            m.iter().filter_map(|m| parse(m).ok()).map(|w| w.ws).collect::<BTreeSet<_>>().len() >= 3
        })
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
    let mut subscriber = subscribe(upstream.addr()).await;
    let setup = setup(&upstream.url());
    let mut gateway = start(&setup, None, Some(SLOW_COMMIT_MS)).await;
    let listen = gateway.listen();
    let fleet = Fleet::start(listen);
    // The kill lands as the second window's outputs reach the upstream: the state holds the
    // next window's first readings, and the checkpoint after the close may not have committed.
    subscriber
        .wait_for_messages("a second window", TIMEOUT, |m| {
            m.iter().filter_map(|m| parse(m).ok()).map(|w| w.ws).collect::<BTreeSet<_>>().len() >= 2
        })
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
    let mut subscriber = subscribe(upstream.addr()).await;
    let setup = setup(&link.url());
    let mut gateway = start(&setup, None, None).await;
    let fleet = Fleet::start(gateway.listen());
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
