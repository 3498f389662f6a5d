//! What the windowed-rule tests share: a fleet of raw MQTT 3.1.1 sensors that send numbered
//! readings, and the check that the windows arriving upstream count every acknowledged reading
//! exactly once.
//!
//! A window's readings are the ones the gateway received in it, a time a test cannot know to
//! the millisecond. So each [`Fleet`] sensor sends its readings in order, one flow in flight
//! (the next only once the previous one completed), with `seq` 1, 2, 3 … and a value the test
//! computes from `(sensor, seq)` ([`Readings`]). A window then holds a contiguous run of seqs,
//! which its `lo` and `hi` name, and [`WindowCheck::verify`] checks that its count and
//! aggregate are exactly those of that run, that each sensor's runs tile its acknowledged
//! readings (none missing, none in two windows, one window per window start), and that every
//! upstream copy of a window carries the same id and the same content (copies by id are
//! counted, not doubled). A reading counted twice must be one its sensor sent again after a
//! lost connection: the verdict counts those, the test decides how many it allows.
//!
//! The rules under test SELECT, per window: `sensor` (the topic's second level), `n`
//! (`count(*)`), `lo` and `hi` (`min`/`max` of `payload.seq`), `ws` (`window_start()`) and one
//! aggregate of `payload.v` ([`Aggregate`]), forwarded with `event_id = "envelope"`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::gateway::{GatewayProcess, RulesFile};
use crate::mqtt::{Message, Subscriber, SubscriberOptions};
use crate::raw::{
    connect_v311, connect_v311_persistent, publish_v311, publish_v311_dup, pubrel, read_packet,
};

/// How sensor `idx` is named, and the value of its reading `seq`. A value should not be
/// linear in `seq`, so that a reading missing from a window and another counted twice do not
/// cancel out, and should be exact in f64 (quarters), so that sums compare exactly.
#[derive(Debug, Clone, Copy)]
pub struct Readings {
    pub name: fn(usize) -> String,
    pub value: fn(usize, u64) -> f64,
}

/// How each sensor of a [`Fleet`] talks to the gateway.
#[derive(Debug, Clone)]
pub struct SensorSpec {
    pub readings: Readings,
    /// Sensor `s` publishes on `<topic_prefix>/<name>` as client `<client_prefix><name>`.
    pub topic_prefix: String,
    pub client_prefix: String,
    /// 1 or 2.
    pub qos: u8,
    /// A persistent session (clean session 0), resuming as MQTT says after a lost connection:
    /// the PUBLISH again with DUP and its packet id (one id in all, as single-slot clients
    /// do), or its PUBREL if the PUBREC came. Otherwise a clean session: the reading is sent
    /// again as a new publish with a new packet id.
    pub persistent: bool,
    /// A reading every `period`.
    pub period: Duration,
    /// The sensors' first readings spread over one period, rather than all at once.
    pub spread: bool,
    /// How long a connect (retried while the gateway restarts) or an answer may take.
    pub timeout: Duration,
}

/// What one sensor saw.
#[derive(Debug, Default, Clone)]
pub struct SensorLog {
    /// Seqs acknowledged (PUBACK; QoS 2: PUBREC), in order.
    pub acked: Vec<u64>,
    /// Seqs whose PUBLISH was sent again after a lost connection.
    pub resent: BTreeSet<u64>,
    /// PUBRELs sent again after a lost connection.
    pub pubrels_resent: u64,
}

/// Connects (again and again while the gateway is down, up to `timeout`) and waits for a
/// CONNACK that accepts.
async fn connect(
    addr: SocketAddr,
    client_id: &str,
    persistent: bool,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    let deadline = tokio::time::Instant::now() + timeout;
    let connect =
        if persistent { connect_v311_persistent(client_id, 60) } else { connect_v311(client_id, 60) };
    loop {
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(&connect).await?;
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
async fn exchange(
    stream: &mut TcpStream,
    packet: &[u8],
    answer: u8,
    pkid: u16,
    timeout: Duration,
) -> anyhow::Result<()> {
    stream.write_all(packet).await?;
    loop {
        let (first, body) = tokio::time::timeout(timeout, read_packet(&mut *stream)).await??;
        if first >> 4 == answer && body.get(..2) == Some(&pkid.to_be_bytes()[..]) {
            return Ok(());
        }
    }
}

/// Where a sensor's flow stands.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// PUBLISH sent, waiting for PUBACK/PUBREC.
    Publish,
    /// QoS 2: PUBREC came, PUBREL sent, waiting for PUBCOMP.
    Release,
}

/// One sensor: a reading every period, the next only once the previous flow completed; after
/// a lost connection it reconnects and resends (see [`SensorSpec::persistent`]).
async fn sensor(
    addr: SocketAddr,
    spec: Arc<SensorSpec>,
    idx: usize,
    sensors: usize,
    stop: CancellationToken,
    log: Arc<Mutex<SensorLog>>,
) -> anyhow::Result<()> {
    let name = (spec.readings.name)(idx);
    let topic = format!("{}/{name}", spec.topic_prefix);
    let client_id = format!("{}{name}", spec.client_prefix);
    let offset = match spec.spread {
        true => spec.period * u32::try_from(idx).unwrap_or(0) / u32::try_from(sensors).unwrap_or(1).max(1),
        false => Duration::ZERO,
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, spec.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let log = |f: &dyn Fn(&mut SensorLog)| f(&mut log.lock().unwrap_or_else(PoisonError::into_inner));
    let acknowledged = if spec.qos == 1 { 4 } else { 5 };
    let mut conn: Option<TcpStream> = None;
    let mut pkid: u16 = 0;
    for seq in 1.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let payload = format!(r#"{{"seq":{seq},"v":{}}}"#, (spec.readings.value)(idx, seq));
        if !spec.persistent || pkid == 0 {
            pkid = pkid % u16::MAX + 1;
        }
        let mut phase = Phase::Publish;
        let mut again = false;
        loop {
            let stream = match conn.as_mut() {
                Some(stream) => stream,
                None => conn.insert(connect(addr, &client_id, spec.persistent, spec.timeout).await?),
            };
            let packet = match phase {
                Phase::Publish => {
                    if again {
                        log(&|l| {
                            l.resent.insert(seq);
                        });
                    }
                    match again && spec.persistent {
                        true => publish_v311_dup(&topic, spec.qos, pkid, payload.as_bytes()),
                        false => publish_v311(&topic, spec.qos, pkid, false, payload.as_bytes()),
                    }
                }
                Phase::Release => {
                    if again {
                        log(&|l| l.pubrels_resent += 1);
                    }
                    pubrel(pkid)
                }
            };
            let answer = if phase == Phase::Publish { acknowledged } else { 7 };
            match exchange(stream, &packet, answer, pkid, spec.timeout).await {
                Err(_) => {
                    conn = None;
                    again = true;
                    if !spec.persistent {
                        pkid = pkid % u16::MAX + 1;
                    }
                }
                Ok(()) if phase == Phase::Publish => {
                    log(&|l| l.acked.push(seq));
                    if spec.qos == 1 {
                        break;
                    }
                    phase = Phase::Release;
                    again = false;
                }
                Ok(()) => break,
            }
        }
    }
    Ok(())
}

/// Sensors sending readings to a gateway until stopped.
pub struct Fleet {
    logs: Vec<Arc<Mutex<SensorLog>>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Fleet {
    /// Starts `sensors` sensors against `addr`.
    pub fn start(addr: SocketAddr, spec: SensorSpec, sensors: usize) -> Fleet {
        let spec = Arc::new(spec);
        let stop = CancellationToken::new();
        let logs: Vec<_> = (0..sensors).map(|_| Arc::new(Mutex::new(SensorLog::default()))).collect();
        let tasks = logs
            .iter()
            .enumerate()
            .map(|(idx, log)| {
                tokio::spawn(sensor(addr, Arc::clone(&spec), idx, sensors, stop.clone(), Arc::clone(log)))
            })
            .collect();
        Fleet { logs, stop, tasks }
    }

    /// Readings acknowledged so far, over all sensors.
    pub fn acked(&self) -> usize {
        self.logs.iter().map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).acked.len()).sum()
    }

    /// Stops every sensor after its current flow and returns what each saw.
    pub async fn stop(self) -> Vec<SensorLog> {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("sensor task").expect("the sensor ran");
        }
        self.logs.iter().map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).clone()).collect()
    }
}

/// The window's aggregate of `payload.v` the rule selects.
#[derive(Debug, Clone, Copy)]
pub enum Aggregate {
    /// `avg(payload.v)`: compared within a relative 1e-9.
    Avg,
    /// `sum(payload.v)`: exact (the values are quarters).
    Sum,
}

/// One window's output as it arrived upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowOut {
    pub id: String,
    pub sensor: String,
    pub ws: u64,
    pub n: u64,
    pub lo: u64,
    pub hi: u64,
    /// The [`Aggregate`].
    pub value: f64,
}

/// What the windows that arrived said, checked against what the sensors saw.
#[derive(Debug, Default)]
pub struct Verdict {
    pub windows: usize,
    pub readings: u64,
    pub copies_by_id: usize,
    /// Readings counted twice, all of them sent again after a lost connection.
    pub double_counted: usize,
    /// The most readings of one sensor counted twice.
    pub most_of_one: usize,
    /// PUBLISHes and PUBRELs the sensors sent again.
    pub resent: usize,
    pub pubrels_resent: u64,
}

/// How the windows of a test are read and checked.
#[derive(Debug, Clone, Copy)]
pub struct WindowCheck {
    pub readings: Readings,
    pub window_ms: u64,
    /// The name the rule gives the aggregate, and which it is.
    pub field: &'static str,
    pub aggregate: Aggregate,
}

impl WindowCheck {
    pub fn parse(&self, message: &Message) -> anyhow::Result<WindowOut> {
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
            value: p[self.field].as_f64().with_context(|| format!("`{}` in {envelope}", self.field))?,
        })
    }

    /// How many distinct window starts arrived.
    pub fn starts(&self, messages: &[Message]) -> usize {
        messages.iter().filter_map(|m| self.parse(m).ok()).map(|w| w.ws).collect::<BTreeSet<_>>().len()
    }

    /// Whether every sensor's last acknowledged reading is in a window that arrived.
    pub fn all_arrived(&self, messages: &[Message], logs: &[SensorLog]) -> bool {
        let mut highest: BTreeMap<String, u64> = BTreeMap::new();
        for out in messages.iter().filter_map(|m| self.parse(m).ok()) {
            let h = highest.entry(out.sensor).or_default();
            *h = (*h).max(out.hi);
        }
        logs.iter().enumerate().all(|(idx, log)| {
            let last = log.acked.last().copied().unwrap_or(0);
            highest.get(&(self.readings.name)(idx)).is_some_and(|h| *h >= last)
        })
    }

    /// The windows that arrived, one per id, and how many copies by id came on top; fails if
    /// two copies of one id differ.
    fn unique_windows(&self, messages: &[Message]) -> anyhow::Result<(Vec<WindowOut>, usize)> {
        let mut by_id: BTreeMap<String, WindowOut> = BTreeMap::new();
        let mut copies = 0;
        for message in messages {
            let out = self.parse(message)?;
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

    /// Checks the windows against the readings the sensors saw acknowledged (see the
    /// module's doc).
    pub fn verify(&self, messages: &[Message], logs: &[SensorLog]) -> anyhow::Result<Verdict> {
        let (windows, copies_by_id) = self.unique_windows(messages)?;
        let mut verdict = Verdict { windows: windows.len(), copies_by_id, ..Verdict::default() };
        let mut by_sensor: BTreeMap<&str, Vec<&WindowOut>> = BTreeMap::new();
        for w in &windows {
            by_sensor.entry(&w.sensor).or_default().push(w);
        }
        for (idx, log) in logs.iter().enumerate() {
            let name = (self.readings.name)(idx);
            let value = |seq: u64| (self.readings.value)(idx, seq);
            verdict.resent += log.resent.len();
            verdict.pubrels_resent += log.pubrels_resent;
            let mut ws = by_sensor.remove(name.as_str()).unwrap_or_default();
            ws.sort_by_key(|w| (w.ws, w.lo));
            let last = log.acked.last().copied().unwrap_or(0);
            anyhow::ensure!(last > 0, "{name} got no acknowledgement");
            for pair in ws.windows(2) {
                anyhow::ensure!(
                    pair[0].ws < pair[1].ws,
                    "{name}: two windows start at {}: {pair:?}",
                    pair[1].ws
                );
            }
            // How many windows counted each seq.
            let mut counted: BTreeMap<u64, u32> = BTreeMap::new();
            for w in &ws {
                anyhow::ensure!(w.ws % self.window_ms == 0 && w.lo <= w.hi, "{name}: {w:?}");
                let run = w.hi - w.lo + 1;
                let mut sum: f64 = (w.lo..=w.hi).map(value).sum();
                if w.n != run {
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
                    sum += value(twice[0]);
                }
                let (expected, tolerance) = match self.aggregate {
                    Aggregate::Avg => {
                        let avg = sum / w.n as f64;
                        (avg, 1e-9 * avg.abs().max(1.0))
                    }
                    Aggregate::Sum => (sum, 1e-9),
                };
                anyhow::ensure!(
                    (w.value - expected).abs() <= tolerance,
                    "{name}: window {w:?}: {} {} but its readings give {expected}",
                    self.field,
                    w.value
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
        anyhow::ensure!(by_sensor.is_empty(), "windows of unknown sensors: {:?}", by_sensor.keys());
        Ok(verdict)
    }

    /// Stops the fleet, waits (up to `timeout`) for the windows holding every acknowledged
    /// reading, checks them, and stops the gateway (which must exit cleanly).
    pub async fn finish(
        &self,
        fleet: Fleet,
        subscriber: &mut Subscriber,
        gateway: &mut GatewayProcess,
        timeout: Duration,
    ) -> Verdict {
        let logs = fleet.stop().await;
        subscriber
            .wait_for_messages("the windows of every acknowledged reading", timeout, |m| {
                self.all_arrived(m, &logs)
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
        let verdict = self.verify(&subscriber.full_messages(), &logs).unwrap_or_else(|e| panic!("{e:#}"));
        let status = gateway.terminate().await.expect("the gateway stops");
        assert!(status.success(), "exit status {status}\n{}", gateway.tail());
        verdict
    }
}

/// A rules file and a data directory for the gateway, and the config that names them and the
/// upstream (with the envelope that carries each window's id).
pub struct Setup {
    _rules: RulesFile,
    pub data: tempfile::TempDir,
    pub config: String,
}

impl Setup {
    pub fn new(rules: &str, upstream_url: &str) -> Setup {
        let rules = RulesFile::write(rules).expect("write rules");
        let config = format!(
            "{}[upstream]\nurl = \"{upstream_url}\"\nevent_id = \"envelope\"\nreconnect_max = \"1s\"\n",
            rules.config_line()
        );
        Setup { _rules: rules, data: tempfile::tempdir().expect("tempdir"), config }
    }
}

/// A subscriber at the upstream recording every window output on `filter` (not checked
/// as a fleet run: [`WindowCheck::verify`] does that).
pub async fn subscribe(upstream: SocketAddr, filter: &str) -> Subscriber {
    let options = SubscriberOptions { verify: false, ..SubscriberOptions::default() };
    Subscriber::start_with(upstream, filter, options).await.expect("subscribe upstream")
}
