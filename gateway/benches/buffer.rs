//! Benchmarks of the durable buffer and of the relay pipeline around it.
//!
//! ```text
//! cargo bench -p outpost --bench buffer               # every scenario
//! cargo bench -p outpost --bench buffer -- ingest     # one or more of: ingest drain live
//! ```
//!
//! Each scenario prints a table of measured figures next to the targets they are judged by:
//! - `ingest`: durable ingest through [`Store::apply`] at several events per commit (one fsync
//!   each), plus the whole in-memory relay path at full speed with a healthy uplink.
//! - `drain`: a prefilled buffer (1,000,000 records, then 200,000 per send window size) relayed
//!   by an in-process gateway to a real mosquitto; time to first delivery and drain rate.
//! - `drain-default`: a 1,000,000-record backlog drained to a mosquitto with no subscriber,
//!   twice with the default `upstream.inflight` and twice with the former default of 100
//!   (issue #18: ≥ 100k events/s with the default config).
//! - `retained`: the broker's retained store in the buffer file: 100,000 topics written, then
//!   the start-up path timed (open the file, `load_retained`, build the in-memory store), with
//!   the file size and the resident memory the loaded store takes; and the rate of single
//!   retained writes (one fsync each, as a retained publish costs).
//! - `live`: sensors publishing through the gateway at 10k events/s with a healthy uplink, then
//!   with the uplink down, then the uplink coming back.
//!
//! Bytes written are `write_bytes` deltas of `/proc/self/io` (the whole process: the store
//! thread is in-process; the bench's own MQTT clients write nothing to disk; mosquitto is a
//! separate process and not counted). CPU is `/proc/self/stat` utime+stime; "gateway CPU"
//! subtracts the bench's own threads (its MQTT clients and the main thread).
//!
//! Run without `--bench` (as `cargo test --all-targets` does), the binary does nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use outpost::buffer::{Batch, Record, Store};
use outpost::config::{BrokerConfig, GatewayConfig, UpstreamConfig, UpstreamUrl};
use outpost::metrics::{Counters, Metrics};
use outpost_sim::harness::free_port;
use outpost_sim::harness::mosquitto::{Mosquitto, MosquittoConfig};
use outpost_sim::process::{ProcessStats, clock_ticks_per_second, thread_cpu_times};
use outpost_sim::verify::{Message, Session, Subscriber, SubscriberOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Payload size of every benchmark event.
const PAYLOAD_LEN: usize = 200;
/// Priority of prefilled records (the default route's priority).
const PRIORITY: u8 = 5;
const EPOCH_SHIFT: u32 = outpost::event::EPOCH_SHIFT;

// Targets.
const TARGET_INGEST_EVS: f64 = 100_000.0;
const TARGET_DRAIN_EVS: f64 = 50_000.0;
const TARGET_FIRST_DELIVERY_S: f64 = 0.5;
const TARGET_HEALTHY_WRITE_X: f64 = 0.2;
const TARGET_OUTAGE_WRITE_X: f64 = 3.0;

const SCENARIOS: [&str; 6] = ["ingest", "drain", "drain-default", "live", "rules", "retained"];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "buffer bench: nothing to do outside `cargo bench -p outpost --bench buffer [-- ingest|drain|live]`"
        );
        return Ok(());
    }
    let picked: Vec<&str> = args.iter().filter(|a| !a.starts_with('-')).map(String::as_str).collect();
    for name in &picked {
        if !SCENARIOS.contains(name) {
            bail!("unknown scenario `{name}`; pick from {SCENARIOS:?}");
        }
    }
    let run = |name: &str| picked.is_empty() || picked.contains(&name);
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let bench = Bench::new()?;
    println!("outpost buffer bench");
    println!(
        "  data dirs under {} ({}), {} CPUs, payload {PAYLOAD_LEN} B, CLK_TCK {}",
        bench.root.display(),
        bench.root_fs,
        bench.ncpu,
        bench.clk_tck
    );
    let started = Instant::now();
    if run("ingest") {
        ingest(&bench)?;
    }
    if run("drain") {
        drain(&bench)?;
    }
    if run("drain-default") {
        drain_default(&bench)?;
    }
    if run("live") {
        live(&bench)?;
    }
    if run("rules") {
        rules(&bench)?;
    }
    if run("retained") {
        retained(&bench)?;
    }
    println!("\ntotal bench time {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Shared set-up
// ---------------------------------------------------------------------------------------------

struct Bench {
    /// Runs the bench's own MQTT clients; its threads are named `bench-client`.
    rt: Runtime,
    /// Where data dirs are created: on a real disk, never tmpfs.
    root: PathBuf,
    root_fs: String,
    clk_tck: f64,
    ncpu: usize,
}

impl Bench {
    fn new() -> anyhow::Result<Bench> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-client")
            .enable_all()
            .build()
            .context("bench runtime")?;
        let tmp = std::env::temp_dir();
        let tmp_fs = fs_type(&tmp);
        let (root, root_fs) = if let Some(dir) = std::env::var_os("OUTPOST_BENCH_DIR") {
            // Explicit choice (e.g. the SD card of a real device), used as given.
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).context("create OUTPOST_BENCH_DIR")?;
            let fs = fs_type(&dir);
            (dir, fs)
        } else if tmp_fs.starts_with("tmpfs") || tmp_fs.starts_with("ramfs") {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data");
            std::fs::create_dir_all(&dir).context("create target/bench-data")?;
            let fs = fs_type(&dir);
            (dir, fs)
        } else {
            (tmp, tmp_fs)
        };
        let clk_tck = clock_ticks_per_second() as f64;
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Bench { rt, root, root_fs, clk_tck, ncpu })
    }

    fn tempdir(&self, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
        tempfile::Builder::new().prefix(prefix).tempdir_in(&self.root).context("create a temp dir")
    }

    fn cpu(&self) -> CpuSnap {
        CpuSnap::take()
    }

    /// Waits (the harness's `wait_until`) until `done` holds or `timeout` passes; returns
    /// whether it held.
    fn wait_until(&self, what: &str, timeout: Duration, done: impl FnMut() -> bool) -> bool {
        self.rt.block_on(outpost_sim::harness::wait_until(what, timeout, done)).is_ok()
    }
}

/// File system type of the mount that holds `path` (longest matching mount point).
fn fs_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut parts = line.split_whitespace();
        let (Some(dev), Some(mnt), Some(fs)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if path.starts_with(mnt) && best.as_ref().is_none_or(|(len, _)| mnt.len() >= *len) {
            best = Some((mnt.len(), format!("{fs} on {dev}")));
        }
    }
    best.map_or_else(|| "unknown fs".to_owned(), |(_, fs)| fs)
}

/// `write_bytes` of `/proc/self/io`: bytes this process caused to be sent to the block layer.
fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("write_bytes:").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU time of the whole process, and of the bench's own threads (clients and main thread).
#[derive(Debug, Clone, Copy)]
struct CpuSnap {
    total: Duration,
    bench: Duration,
}

impl CpuSnap {
    fn take() -> CpuSnap {
        let pid = std::process::id();
        let total = ProcessStats::read(pid).map_or(Duration::ZERO, |stats| stats.cpu);
        let bench = thread_cpu_times(pid)
            .unwrap_or_default()
            .into_iter()
            .filter(|(tid, comm, _)| *tid == pid || comm.starts_with("bench-client"))
            .map(|(_, _, cpu)| cpu)
            .sum();
        CpuSnap { total, bench }
    }

    /// (process CPU, gateway CPU) in seconds since `earlier`.
    fn since(self, earlier: CpuSnap) -> (f64, f64) {
        let total = self.total.saturating_sub(earlier.total);
        let bench = self.bench.saturating_sub(earlier.bench);
        (total.as_secs_f64(), total.saturating_sub(bench).as_secs_f64())
    }
}

/// Microseconds since the bench started: the clock embedded in payloads.
fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A 200-byte JSON payload carrying its sequence number and send time.
fn payload(seq: u64, ts_us: u64) -> Vec<u8> {
    let mut s = format!("{{\"seq\":{seq},\"ts\":{ts_us},\"pad\":\"");
    let pad = PAYLOAD_LEN.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s.into_bytes()
}

/// The unsigned number after `name` in a payload made by [`payload`].
fn field(payload: &[u8], name: &[u8]) -> Option<u64> {
    let at = payload.windows(name.len()).position(|w| w == name)? + name.len();
    let digits: Vec<u8> = payload[at..].iter().copied().take_while(u8::is_ascii_digit).collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn ratio(n: u64, d: f64) -> f64 {
    if d > 0.0 { n as f64 / d } else { 0.0 }
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn verdict(ok: bool) -> String {
    if ok { "ok".into() } else { "MISS".into() }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A plain text table.
struct Table {
    title: String,
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    fn new(title: &str, head: &[&'static str]) -> Table {
        Table { title: title.to_owned(), head: head.to_vec(), rows: Vec::new(), notes: Vec::new() }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn print(&self) {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        let mut widths: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>| {
            let parts: Vec<String> =
                cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}", w = *w)).collect();
            println!("  {}", parts.join(" | "));
        };
        println!("\n== {} ==", self.title);
        line(self.head.clone());
        println!("  {}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-"));
        for row in &self.rows {
            line(row.iter().map(String::as_str).collect());
        }
        for note in &self.notes {
            println!("  * {note}");
        }
        println!("  * load average at the end (1/5/15 min): {}", load.join(" "));
    }
}

// ---------------------------------------------------------------------------------------------
// Store records
// ---------------------------------------------------------------------------------------------

fn record(epoch: u64, i: u64, payload: &Bytes) -> Record {
    Record {
        priority: PRIORITY,
        seq: (epoch << EPOCH_SHIFT) | i,
        event_id: (epoch << EPOCH_SHIFT) | i,
        enqueued_ms: outpost::event::now_ms(),
        expires_ms: None,
        topic: format!("sensors/{}/temp", i % 100),
        qos: 1,
        payload: payload.clone(),
        props: None,
    }
}

/// Appends `n` records in commits of `batch`, each carrying its index as `seq` in its payload
/// (when `distinct`) so a subscriber can count unique deliveries.
struct Fill {
    events: u64,
    secs: f64,
    commits: u64,
    written: u64,
}

fn fill(
    store: &mut Store,
    epoch: u64,
    n: u64,
    batch: u64,
    distinct: bool,
    max_time: Option<Duration>,
) -> anyhow::Result<Fill> {
    let shared = Bytes::from(payload(0, 0));
    let w0 = write_bytes();
    let t0 = Instant::now();
    let mut commits = 0;
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        let inserts = (i..end)
            .map(|k| {
                let p = if distinct { Bytes::from(payload(k, 0)) } else { shared.clone() };
                record(epoch, k, &p)
            })
            .collect();
        store.apply(&Batch { inserts, ..Batch::default() }).context("Store::apply")?;
        commits += 1;
        i = end;
        if max_time.is_some_and(|max| t0.elapsed() >= max) {
            break;
        }
    }
    Ok(Fill { events: i, secs: t0.elapsed().as_secs_f64(), commits, written: write_bytes() - w0 })
}

// ---------------------------------------------------------------------------------------------
// mosquitto, the upstream
// ---------------------------------------------------------------------------------------------

/// Starts the upstream mosquitto with its config and persistence in a new directory under the
/// bench's root. `persistent` keeps sessions across a graceful restart.
fn start_mosquitto(bench: &Bench, persistent: bool) -> anyhow::Result<Mosquitto> {
    let config = MosquittoConfig {
        persistence: persistent,
        // The bench subscriber must not lose messages to mosquitto's per-client limits.
        max_queued_messages: Some(10_000_000),
        users: Vec::new(),
        // As root, mosquitto drops to its own user, which must still write its persistence file.
        directory_for_any_user: true,
        extra: "max_inflight_messages 1000\n".to_owned(),
    };
    let mut mosquitto = Mosquitto::prepare_in(&config, Some(&bench.root))?;
    bench.rt.block_on(mosquitto.start_again()).context("mosquitto did not start")?;
    Ok(mosquitto)
}

/// The CPU time mosquitto has used so far (zero once it stopped).
fn mosquitto_cpu(mosquitto: &Mosquitto) -> Duration {
    mosquitto.process().and_then(|process| process.stats().ok()).map_or(Duration::ZERO, |stats| stats.cpu)
}

// ---------------------------------------------------------------------------------------------
// The subscriber on the upstream
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct SinkState {
    expected: u64,
    seen: Vec<u64>,
    received: u64,
    unique: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    latency: bool,
    latencies_us: Vec<u64>,
}

/// Counts what reaches the upstream: every message, unique sequence numbers below `expected`,
/// first/last arrival and (optionally) end-to-end latency.
#[derive(Default)]
struct Sink {
    state: Mutex<SinkState>,
}

#[derive(Debug, Clone, Copy)]
struct SinkView {
    received: u64,
    unique: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Sink {
    fn reset(&self, expected: u64, latency: bool) {
        let mut s = lock(&self.state);
        *s = SinkState {
            expected,
            seen: vec![0; usize::try_from(expected.div_ceil(64)).unwrap_or(0)],
            latency,
            ..SinkState::default()
        };
    }

    fn on_publish(&self, payload: &[u8]) {
        let now = Instant::now();
        let arrived_us = now_us();
        let mut s = lock(&self.state);
        s.received += 1;
        s.first.get_or_insert(now);
        s.last = Some(now);
        if let Some(seq) = field(payload, b"\"seq\":") {
            if seq < s.expected {
                let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                if s.seen[word] & bit == 0 {
                    s.seen[word] |= bit;
                    s.unique += 1;
                }
            }
        }
        if s.latency {
            if let Some(sent) = field(payload, b"\"ts\":") {
                s.latencies_us.push(arrived_us.saturating_sub(sent));
            }
        }
    }

    fn view(&self) -> SinkView {
        let s = lock(&self.state);
        SinkView { received: s.received, unique: s.unique, first: s.first, last: s.last }
    }

    /// (p50, p99, max) in milliseconds.
    fn latency_ms(&self) -> Option<(f64, f64, f64)> {
        let mut l = lock(&self.state).latencies_us.clone();
        if l.is_empty() {
            return None;
        }
        l.sort_unstable();
        let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Some((at(0.5), at(0.99), at(1.0)))
    }
}

/// The harness's subscriber to `#` at QoS 1 on the upstream, feeding a [`Sink`]; with
/// `persistent`, its session survives a graceful mosquitto restart. Dropping it stops it.
struct Subscription {
    sink: Arc<Sink>,
    _subscriber: Subscriber,
}

impl Subscription {
    fn start(bench: &Bench, upstream: SocketAddr, persistent: bool) -> anyhow::Result<Subscription> {
        let sink = Arc::new(Sink::default());
        let fed = Arc::clone(&sink);
        let options = SubscriberOptions {
            session: if persistent {
                Session::Persistent(format!("bench-sub-{}", upstream.port()))
            } else {
                Session::Clean
            },
            keep: 0,
            on_message: Some(Arc::new(move |message: &Message| fed.on_publish(&message.payload))),
            verify: false,
            ..SubscriberOptions::default()
        };
        let subscriber = bench
            .rt
            .block_on(Subscriber::start_with(upstream, "#", options))
            .context("the upstream subscriber got no SUBACK")?;
        Ok(Subscription { sink, _subscriber: subscriber })
    }
}

// ---------------------------------------------------------------------------------------------
// Sensors publishing to the gateway
// ---------------------------------------------------------------------------------------------

struct Publishers {
    clients: Vec<(AsyncClient, Arc<AtomicU64>)>,
    stop: CancellationToken,
}

impl Publishers {
    /// Connects `k` QoS 1 clients to the gateway's broker.
    fn connect(bench: &Bench, port: u16, k: usize) -> anyhow::Result<Publishers> {
        let stop = CancellationToken::new();
        let mut clients = Vec::new();
        for j in 0..k {
            let mut opts = MqttOptions::new(format!("bench-pub-{port}-{j}"), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = AsyncClient::new(opts, 256);
            let acked = Arc::new(AtomicU64::new(0));
            let connected = Arc::new(AtomicU64::new(0));
            let (a, c, s) = (Arc::clone(&acked), Arc::clone(&connected), stop.clone());
            bench.rt.spawn(async move {
                loop {
                    let polled = tokio::select! {
                        _ = s.cancelled() => break,
                        polled = eventloop.poll() => polled,
                    };
                    match polled {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            a.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
            if !bench
                .wait_until("a CONNACK", Duration::from_secs(5), || connected.load(Ordering::Relaxed) > 0)
            {
                bail!("publisher {j} got no CONNACK from the gateway");
            }
            clients.push((client, acked));
        }
        Ok(Publishers { clients, stop })
    }

    /// Publishes `n` events (sequence numbers 0..n) spread over the clients, at `rate` events/s
    /// in total (or as fast as the broker acks), and waits for every PUBACK. Returns the time
    /// until the last publish was handed to its client, and the PUBACKs received.
    fn run(&self, bench: &Bench, n: u64, rate: Option<f64>) -> anyhow::Result<(f64, u64)> {
        let k = self.clients.len() as u64;
        let acked0: u64 = self.clients.iter().map(|(_, a)| a.load(Ordering::Relaxed)).sum();
        let t0 = tokio::time::Instant::now();
        let started = Instant::now();
        let tasks: Vec<_> = self
            .clients
            .iter()
            .enumerate()
            .map(|(j, (client, _))| {
                let client = client.clone();
                bench.rt.spawn(async move {
                    for i in (j as u64..n).step_by(k as usize) {
                        if let Some(rate) = rate {
                            let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                            if due > tokio::time::Instant::now() {
                                tokio::time::sleep_until(due).await;
                            }
                        }
                        let topic = format!("sensors/{j}/{}/temp", i % 25);
                        client.publish(topic, QoS::AtLeastOnce, false, payload(i, now_us())).await?;
                    }
                    Ok::<(), rumqttc::ClientError>(())
                })
            })
            .collect();
        for task in tasks {
            bench.rt.block_on(task).context("publisher task")?.context("publish")?;
        }
        let sent = started.elapsed().as_secs_f64();
        let acked = || self.clients.iter().map(|(_, a)| a.load(Ordering::Relaxed)).sum::<u64>() - acked0;
        bench.wait_until("every PUBACK", Duration::from_secs(30), || acked() >= n);
        Ok((sent, acked()))
    }
}

impl Drop for Publishers {
    fn drop(&mut self) {
        for (client, _) in &self.clients {
            let _ = client.try_disconnect();
        }
        self.stop.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway, in-process on its own thread (a current-thread runtime, like the binary)
// ---------------------------------------------------------------------------------------------

struct Gw {
    metrics: Metrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

fn gw_config(data_dir: &Path, listen_port: u16, upstream_port: u16, inflight: u16) -> GatewayConfig {
    let mut upstream = UpstreamConfig::with_url(UpstreamUrl::plain("127.0.0.1", upstream_port));
    upstream.inflight = inflight;
    upstream.client_id = format!("outpost-bench-{listen_port}");
    GatewayConfig {
        data_dir: data_dir.to_owned(),
        broker: BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], listen_port)),
            ..BrokerConfig::default()
        },
        upstream: Some(upstream),
        ..GatewayConfig::default()
    }
}

impl Gw {
    /// Starts the gateway; returns once its broker accepts connections.
    fn start(config: GatewayConfig) -> anyhow::Result<Gw> {
        config.validate("bench config").context("bench config")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("outpost-gw".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return false;
                }
            };
            rt.block_on(async move {
                match outpost::Gateway::start(config).await {
                    Ok(gateway) => {
                        let _ = ready_tx.send(Ok(gateway.metrics().clone()));
                        let _ = stop_rx.await;
                        gateway.shutdown().await
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        false
                    }
                }
            })
        })?;
        match ready_rx.recv() {
            Ok(Ok(metrics)) => Ok(Gw { metrics, stop: Some(stop_tx), thread: Some(thread) }),
            Ok(Err(e)) => bail!("Gateway::start failed: {e}"),
            Err(_) => bail!("the gateway thread died while starting"),
        }
    }

    fn c(&self) -> &Counters {
        self.metrics.counters()
    }

    fn get(&self, f: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        Metrics::get(f(self.c()))
    }

    /// `Gateway::shutdown`; returns whether it finished within its timeout.
    fn shutdown(mut self) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread.take().is_some_and(|t| t.join().unwrap_or(false))
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counter values, to diff around a phase.
#[derive(Debug, Clone, Copy, Default)]
struct Snap {
    ingested: u64,
    accepted: u64,
    committed: u64,
    acked_before_commit: u64,
    commits: u64,
    upstream_acked: u64,
    upstream_sent: u64,
    upstream_resent: u64,
    upstream_connects: u64,
    upstream_failures: u64,
    dropped: u64,
}

impl Snap {
    fn take(gw: &Gw) -> Snap {
        Snap {
            ingested: gw.get(|c| &c.ingested),
            accepted: gw.get(|c| &c.accepted),
            committed: gw.get(|c| &c.committed),
            acked_before_commit: gw.get(|c| &c.acked_before_commit),
            commits: gw.get(|c| &c.commits),
            upstream_acked: gw.get(|c| &c.upstream_acked),
            upstream_sent: gw.get(|c| &c.upstream_sent),
            upstream_resent: gw.get(|c| &c.upstream_resent),
            upstream_connects: gw.get(|c| &c.upstream_connects),
            upstream_failures: gw.get(|c| &c.upstream_failures),
            dropped: gw.get(|c| &c.dropped_overflow) + gw.get(|c| &c.rejected_full) + gw.get(|c| &c.expired),
        }
    }

    fn minus(self, o: Snap) -> Snap {
        Snap {
            ingested: self.ingested - o.ingested,
            accepted: self.accepted - o.accepted,
            committed: self.committed - o.committed,
            acked_before_commit: self.acked_before_commit - o.acked_before_commit,
            commits: self.commits - o.commits,
            upstream_acked: self.upstream_acked - o.upstream_acked,
            upstream_sent: self.upstream_sent - o.upstream_sent,
            upstream_resent: self.upstream_resent - o.upstream_resent,
            upstream_connects: self.upstream_connects - o.upstream_connects,
            upstream_failures: self.upstream_failures - o.upstream_failures,
            dropped: self.dropped - o.dropped,
        }
    }
}

/// Waits until the gateway has made no commit for `quiet` (at most `max`): acked events still
/// on disk are deleted within the relay's 1 s delete interval, and that write belongs to the
/// phase that caused it.
fn settle(gw: &Gw, quiet: Duration, max: Duration) {
    let deadline = Instant::now() + max;
    let mut last = gw.get(|c| &c.commits);
    let mut since = Instant::now();
    while Instant::now() < deadline && since.elapsed() < quiet {
        std::thread::sleep(Duration::from_millis(20));
        let now = gw.get(|c| &c.commits);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

/// Counts the records left in a stopped gateway's buffer. `Gateway::shutdown` can return
/// before the store thread has closed the file, so a `Locked` error is retried for up to 5 s
/// and the wait is reported.
fn left_in_buffer(dir: &Path) -> String {
    let t0 = Instant::now();
    let mut locked = false;
    loop {
        let waited = t0.elapsed();
        match Store::open(dir) {
            Ok((store, _)) if !locked => return store.total().events.to_string(),
            Ok((store, _)) => {
                return format!(
                    "{} (file still locked {:.1} ms after shutdown)",
                    store.total().events,
                    waited.as_secs_f64() * 1e3
                );
            }
            Err(outpost::buffer::BufferError::Locked { .. }) if waited < Duration::from_secs(5) => {
                locked = true;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return format!("error: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A gateway between sensors and a mosquitto upstream
// ---------------------------------------------------------------------------------------------

struct Rig {
    // Field order is drop order: clients, then the gateway, then the upstream.
    publishers: Publishers,
    sub: Subscription,
    gw: Option<Gw>,
    mosquitto: Mosquitto,
    data_dir: tempfile::TempDir,
}

/// What one phase of sensor traffic measured.
struct PhaseResult {
    n: u64,
    send_secs: f64,
    pub_acked: u64,
    /// From the first publish to the last arrival upstream.
    deliver_secs: f64,
    view: SinkView,
    written: u64,
    /// CPU seconds of the whole process, and of the gateway alone.
    cpu_total: f64,
    cpu_gw: f64,
    d: Snap,
    latency: Option<(f64, f64, f64)>,
}

impl Rig {
    fn start(bench: &Bench, publishers: usize) -> anyhow::Result<Rig> {
        Rig::start_with_rules(bench, publishers, None)
    }

    fn start_with_rules(bench: &Bench, publishers: usize, rules: Option<PathBuf>) -> anyhow::Result<Rig> {
        let data_dir = bench.tempdir("outpost-bench-live-")?;
        let mosquitto = start_mosquitto(bench, true)?;
        let sub = Subscription::start(bench, mosquitto.addr(), true)?;
        let listen = free_port()?;
        let mut config = gw_config(data_dir.path(), listen, mosquitto.addr().port(), 100);
        config.rules = rules;
        let gw = Gw::start(config)?;
        if !bench.wait_until("the gateway connected upstream", Duration::from_secs(5), || {
            gw.get(|c| &c.upstream_connects) > 0
        }) {
            bail!("the gateway did not connect upstream");
        }
        let publishers = Publishers::connect(bench, listen, publishers)?;
        Ok(Rig { publishers, sub, gw: Some(gw), mosquitto, data_dir })
    }

    fn gw(&self) -> &Gw {
        self.gw.as_ref().expect("gateway running")
    }

    /// Sensors publish `n` events; with `delivered`, waits until they all reached the upstream,
    /// otherwise until they are all on disk.
    fn phase(
        &self,
        bench: &Bench,
        n: u64,
        rate: Option<f64>,
        delivered: bool,
    ) -> anyhow::Result<PhaseResult> {
        let gw = self.gw();
        self.sub.sink.reset(n, delivered);
        let s0 = Snap::take(gw);
        let (w0, c0) = (write_bytes(), bench.cpu());
        let t0 = Instant::now();
        let (send_secs, pub_acked) = self.publishers.run(bench, n, rate)?;
        let progress = |s: &Snap| s.minus(s0);
        if delivered {
            let mut last = (0, Instant::now());
            bench.wait_until("every event delivered", Duration::from_secs(60), || {
                let v = self.sub.sink.view();
                if v.unique != last.0 {
                    last = (v.unique, Instant::now());
                }
                v.unique >= n || last.1.elapsed() > Duration::from_secs(5)
            });
            settle(gw, Duration::from_millis(1500), Duration::from_secs(6));
        } else {
            bench.wait_until("every event committed", Duration::from_secs(30), || {
                let d = progress(&Snap::take(gw));
                d.ingested >= n && d.committed >= d.accepted
            });
        }
        let view = self.sub.sink.view();
        let (cpu_total, cpu_gw) = bench.cpu().since(c0);
        Ok(PhaseResult {
            n,
            send_secs,
            pub_acked,
            deliver_secs: view.last.map_or(0.0, |l| l.saturating_duration_since(t0).as_secs_f64()),
            view,
            written: write_bytes() - w0,
            cpu_total,
            cpu_gw,
            d: progress(&Snap::take(gw)),
            latency: if delivered { self.sub.sink.latency_ms() } else { None },
        })
    }

    fn shutdown(&mut self) -> (bool, String) {
        let finished = self.gw.take().is_some_and(Gw::shutdown);
        (finished, left_in_buffer(self.data_dir.path()))
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: ingest
// ---------------------------------------------------------------------------------------------

fn ingest(bench: &Bench) -> anyhow::Result<()> {
    let mut t = Table::new(
        "ingest: durable Store::apply, 200 B payloads, one fsync per commit",
        &[
            "events/commit",
            "events",
            "secs",
            "events/s",
            "fsyncs/s",
            "µs/commit",
            "written/event",
            "× payload",
            "target",
            "",
        ],
    );
    for (batch, n) in [(1u64, 3_000u64), (10, 20_000), (100, 200_000), (1000, 500_000), (5000, 500_000)] {
        let dir = bench.tempdir("outpost-bench-ingest-")?;
        let (mut store, report) = Store::open(dir.path()).context("Store::open")?;
        // A slow disk must not stretch the run: each row stops after ~2 s.
        let f = fill(&mut store, report.epoch, n, batch, false, Some(Duration::from_secs(2)))?;
        let n = f.events;
        let evs = ratio(n, f.secs);
        let per_event = f.written as f64 / n as f64;
        t.row(vec![
            batch.to_string(),
            n.to_string(),
            format!("{:.2}", f.secs),
            fmt_rate(evs),
            fmt_rate(ratio(f.commits, f.secs)),
            format!("{:.0}", f.secs * 1e6 / f.commits as f64),
            format!("{per_event:.0} B"),
            format!("{:.2}×", per_event / PAYLOAD_LEN as f64),
            format!("≥ {}/s", fmt_rate(TARGET_INGEST_EVS)),
            verdict(evs >= TARGET_INGEST_EVS),
        ]);
        drop(store);
    }
    t.note(
        "each row: a fresh buffer file; every commit is one redb write transaction, Durability::Immediate",
    );

    // The whole relay path with a healthy uplink: sensors → rumqttd → route → relay (forwarded
    // from memory, committed only if not acked within commit_interval) → mosquitto → subscriber.
    match (|| -> anyhow::Result<PhaseResult> {
        let mut rig = Rig::start(bench, 4)?;
        let r = rig.phase(bench, 50_000, None, true)?;
        rig.shutdown();
        Ok(r)
    })() {
        Ok(r) => {
            let evs = ratio(r.view.unique, r.deliver_secs);
            let per_event = r.written as f64 / r.n as f64;
            t.row(vec![
                "relay, in-memory".into(),
                r.n.to_string(),
                format!("{:.2}", r.deliver_secs),
                fmt_rate(evs),
                fmt_rate(ratio(r.d.commits, r.deliver_secs)),
                "-".into(),
                format!("{per_event:.0} B"),
                format!("{:.2}×", per_event / PAYLOAD_LEN as f64),
                format!("≥ {}/s", fmt_rate(TARGET_INGEST_EVS)),
                verdict(evs >= TARGET_INGEST_EVS),
            ]);
            t.note(format!(
                "relay row: 4 QoS 1 publishers unpaced → gateway → mosquitto → QoS 1 subscriber; events/s = unique arrivals upstream / (first publish → last arrival); {} of {} arrived ({} dup), committed {} in {} commits, acked_before_commit {}, publisher PUBACKs {}",
                r.view.unique,
                r.n,
                r.view.received - r.view.unique,
                r.d.committed,
                r.d.commits,
                r.d.acked_before_commit,
                r.pub_acked
            ));
        }
        Err(e) => t.note(format!("relay row skipped: {e:#}")),
    }
    t.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: drain
// ---------------------------------------------------------------------------------------------

struct DrainResult {
    backlog: u64,
    window: u16,
    prefill_evs: f64,
    start_secs: f64,
    connect_secs: Option<f64>,
    first_secs: Option<f64>,
    drain_evs: f64,
    view: SinkView,
    file_before: u64,
    file_drained: u64,
    file_after: u64,
    compact_secs: Option<f64>,
    written_per_event: f64,
    cpu_gw_us: f64,
    cpu_bench_us: f64,
    cpu_mosq_us: f64,
    /// Share of all CPUs used by this process and mosquitto together while draining.
    busy: f64,
    shutdown_ok: bool,
    left: String,
    d: Snap,
}

fn drain_once(bench: &Bench, backlog: u64, window: u16) -> anyhow::Result<DrainResult> {
    let data = bench.tempdir("outpost-bench-drain-")?;
    let (mut store, report) = Store::open(data.path()).context("Store::open")?;
    let f = fill(&mut store, report.epoch, backlog, 5000, true, None)?;
    let path = store.path().to_owned();
    drop(store);
    let file_before = std::fs::metadata(&path).map_or(0, |m| m.len());

    let mosquitto = start_mosquitto(bench, false)?;
    let sub = Subscription::start(bench, mosquitto.addr(), false)?;
    sub.sink.reset(backlog, false);
    let listen = free_port()?;

    let (w0, c0, m0) = (write_bytes(), bench.cpu(), mosquitto_cpu(&mosquitto));
    let t0 = Instant::now();
    let gw = Gw::start(gw_config(data.path(), listen, mosquitto.addr().port(), window))?;
    let start_secs = t0.elapsed().as_secs_f64();
    let mut connect_secs = None;
    let mut progress = (0, Instant::now());
    bench.wait_until("the backlog drained", Duration::from_secs(120), || {
        if connect_secs.is_none() && gw.get(|c| &c.upstream_connects) > 0 {
            connect_secs = Some(t0.elapsed().as_secs_f64());
        }
        let v = sub.sink.view();
        if v.unique != progress.0 {
            progress = (v.unique, Instant::now());
        }
        v.unique >= backlog || progress.1.elapsed() > Duration::from_secs(10)
    });
    let view = sub.sink.view();
    let (cpu_total, cpu_gw) = bench.cpu().since(c0);
    let busy_secs = t0.elapsed().as_secs_f64();
    let cpu_mosq = mosquitto_cpu(&mosquitto).saturating_sub(m0).as_secs_f64();
    let file_drained = std::fs::metadata(&path).map_or(0, |m| m.len());
    // The last deletes commit within the relay's 1 s delete interval; compaction follows it.
    let drained_at = Instant::now();
    let compacted = bench.wait_until("the file compacted", Duration::from_secs(5), || {
        std::fs::metadata(&path).map_or(0, |m| m.len()) < file_before / 2
    });
    let compact_secs = compacted.then(|| drained_at.elapsed().as_secs_f64());
    let d = Snap::take(&gw);
    let written = write_bytes() - w0;
    let shutdown_ok = gw.shutdown();
    let file_after = std::fs::metadata(&path).map_or(0, |m| m.len());
    drop(sub);
    drop(mosquitto);
    let drain_secs = match (view.first, view.last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    Ok(DrainResult {
        backlog,
        window,
        prefill_evs: ratio(backlog, f.secs),
        start_secs,
        connect_secs,
        first_secs: view.first.map(|f| f.duration_since(t0).as_secs_f64()),
        drain_evs: ratio(view.unique, drain_secs),
        view,
        file_before,
        file_drained,
        file_after,
        compact_secs,
        written_per_event: written as f64 / backlog as f64,
        cpu_gw_us: cpu_gw * 1e6 / view.unique.max(1) as f64,
        cpu_bench_us: (cpu_total - cpu_gw) * 1e6 / view.unique.max(1) as f64,
        cpu_mosq_us: cpu_mosq * 1e6 / view.unique.max(1) as f64,
        busy: (cpu_total + cpu_mosq) / (busy_secs * bench.ncpu as f64),
        shutdown_ok,
        left: left_in_buffer(data.path()),
        d,
    })
}

/// Drains a prefilled backlog to a mosquitto with no subscriber; returns upstream PUBACKs per
/// second (first to last), and gateway and mosquitto CPU per event.
fn drain_acked(bench: &Bench, backlog: u64, window: u16) -> anyhow::Result<(f64, f64, f64)> {
    let data = bench.tempdir("outpost-bench-drain-")?;
    let (mut store, report) = Store::open(data.path()).context("Store::open")?;
    fill(&mut store, report.epoch, backlog, 5000, true, None)?;
    drop(store);
    let mosquitto = start_mosquitto(bench, false)?;
    let (c0, m0) = (bench.cpu(), mosquitto_cpu(&mosquitto));
    let gw = Gw::start(gw_config(data.path(), free_port()?, mosquitto.addr().port(), window))?;
    let mut first: Option<Instant> = None;
    let done = bench.wait_until("every event acknowledged", Duration::from_secs(120), || {
        let acked = gw.get(|c| &c.upstream_acked);
        if first.is_none() && acked > 0 {
            first = Some(Instant::now());
        }
        acked >= backlog
    });
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    let (_, cpu_gw) = bench.cpu().since(c0);
    let cpu_mosq = mosquitto_cpu(&mosquitto).saturating_sub(m0).as_secs_f64();
    let acked = gw.get(|c| &c.upstream_acked);
    gw.shutdown();
    if !done {
        bail!("only {acked} of {backlog} acknowledged within 120 s");
    }
    Ok((ratio(backlog, secs), cpu_gw * 1e6 / backlog as f64, cpu_mosq * 1e6 / backlog as f64))
}

/// The no-subscriber drain of a 1M backlog with the default send window, against the former
/// default (100), two runs each, alternating so drift on a shared machine hits both.
fn drain_default(bench: &Bench) -> anyhow::Result<()> {
    let default = UpstreamConfig::with_url(UpstreamUrl::plain("127.0.0.1", 1)).inflight;
    let mut t = Table::new(
        "drain-default: 1M backlog → gateway → mosquitto (no subscriber), upstream PUBACKs/s",
        &["window", "run", "drain ev/s", "CPU µs/ev gw / mosq", "target", ""],
    );
    for run in 1..=2 {
        for (window, label) in
            [(default, format!("{default} (default)")), (100, "100 (former default)".into())]
        {
            match drain_acked(bench, 1_000_000, window) {
                Ok((evs, gw_us, mosq_us)) => t.row(vec![
                    label,
                    run.to_string(),
                    fmt_rate(evs),
                    format!("{gw_us:.1} / {mosq_us:.1}"),
                    if window == default { "≥ 100k/s".into() } else { "-".into() },
                    if window == default { verdict(evs >= 100_000.0) } else { String::new() },
                ]),
                Err(e) => t.note(format!("window {window} run {run}: failed: {e:#}")),
            }
        }
    }
    t.note("cargo bench -p outpost --bench buffer -- drain-default; rate = backlog / (first → last upstream PUBACK)");
    t.print();
    Ok(())
}

fn drain(bench: &Bench) -> anyhow::Result<()> {
    let mut t = Table::new(
        "drain: prefilled buffer → gateway → mosquitto → QoS 1 subscriber",
        &[
            "backlog",
            "window",
            "prefill/s",
            "start s",
            "connected s",
            "1st msg s",
            "drain ev/s",
            "arrived",
            "dups",
            "file before",
            "file drained",
            "file after",
            "left",
            "written/ev",
            "CPU µs/ev gw/sub/mosq",
            "CPU busy",
            "target",
            "",
        ],
    );
    let mut notes = Vec::new();
    for (backlog, window) in [(1_000_000u64, 100u16), (200_000, 10), (200_000, 100), (200_000, 1000)] {
        match drain_once(bench, backlog, window) {
            Ok(r) => {
                let ok = r.drain_evs >= TARGET_DRAIN_EVS
                    && r.first_secs.is_some_and(|s| s <= TARGET_FIRST_DELIVERY_S)
                    && r.view.unique == r.backlog;
                t.row(vec![
                    r.backlog.to_string(),
                    r.window.to_string(),
                    fmt_rate(r.prefill_evs),
                    format!("{:.3}", r.start_secs),
                    r.connect_secs.map_or("-".into(), |s| format!("{s:.3}")),
                    r.first_secs.map_or("never".into(), |s| format!("{s:.3}")),
                    fmt_rate(r.drain_evs),
                    r.view.unique.to_string(),
                    (r.view.received - r.view.unique).to_string(),
                    fmt_mib(r.file_before),
                    fmt_mib(r.file_drained),
                    fmt_mib(r.file_after),
                    r.left.clone(),
                    format!("{:.0} B", r.written_per_event),
                    format!("{:.1} / {:.1} / {:.1}", r.cpu_gw_us, r.cpu_bench_us, r.cpu_mosq_us),
                    format!("{:.0}%", r.busy * 100.0),
                    format!("≥ {}/s, 1st ≤ {TARGET_FIRST_DELIVERY_S} s", fmt_rate(TARGET_DRAIN_EVS)),
                    verdict(ok),
                ]);
                notes.push(format!(
                    "backlog {} window {}: upstream_sent {} (resent {}), upstream_acked {}, commits {}, compacted {} after the last arrival, shutdown {}",
                    r.backlog,
                    r.window,
                    r.d.upstream_sent,
                    r.d.upstream_resent,
                    r.d.upstream_acked,
                    r.d.commits,
                    r.compact_secs.map_or("not within 5 s".into(), |s| format!("{s:.2} s")),
                    if r.shutdown_ok { "clean" } else { "TIMED OUT" }
                ));
            }
            Err(e) => notes.push(format!("backlog {backlog} window {window}: failed: {e:#}")),
        }
    }
    // The subscriber makes mosquitto deliver every event a second time (QoS 1, acknowledged),
    // which costs more than the gateway's own work. Without it, the rate the gateway drains at
    // is what its upstream PUBACKs show.
    for (backlog, window) in [(1_000_000u64, 100u16), (200_000, 1000)] {
        match drain_acked(bench, backlog, window) {
            Ok((evs, gw_us, mosq_us)) => notes.push(format!(
                "no subscriber, backlog {backlog} window {window}: {} upstream PUBACKs/s ({}); CPU µs/ev gw {gw_us:.1}, mosquitto {mosq_us:.1}",
                fmt_rate(evs),
                if evs >= TARGET_DRAIN_EVS { "meets ≥ 50k/s" } else { "below 50k/s" }
            )),
            Err(e) => notes.push(format!("no subscriber, window {window}: failed: {e:#}")),
        }
    }
    for n in notes {
        t.note(n);
    }
    t.note("CPU µs/ev: gw = this process minus the bench's threads, sub = the bench's threads (the QoS 1 subscriber), mosq = the mosquitto process; CPU busy = all three / (wall time × CPUs)");
    t.note("window = upstream.inflight; times from the Gateway::start call; drain ev/s = unique arrivals / (first → last arrival)");
    t.note("file before = after the prefill; drained = when the last event arrived; after = after Gateway::shutdown; left = records in the file afterwards");
    t.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 3: live
// ---------------------------------------------------------------------------------------------

fn live(bench: &Bench) -> anyhow::Result<()> {
    const N: u64 = 100_000;
    const RATE: f64 = 10_000.0;
    let mut t = Table::new(
        "live: 4 QoS 1 sensors at 10k events/s → gateway → mosquitto → QoS 1 subscriber",
        &["phase", "metric", "measured", "target", ""],
    );
    let mut rig = Rig::start(bench, 4)?;
    let px = |bytes: f64| bytes / PAYLOAD_LEN as f64;

    // Healthy uplink.
    let h = rig.phase(bench, N, Some(RATE), true)?;
    let per_event = h.written as f64 / N as f64;
    let add = |t: &mut Table, phase: &str, metric: &str, value: String, target: &str, ok: Option<bool>| {
        t.row(vec![phase.into(), metric.into(), value, target.into(), ok.map_or(String::new(), verdict)]);
    };
    add(&mut t, "healthy", "events published / PUBACKed", format!("{} / {}", N, h.pub_acked), "", None);
    add(&mut t, "healthy", "publish rate", format!("{}/s", fmt_rate(ratio(N, h.send_secs))), "10k/s", None);
    add(
        &mut t,
        "healthy",
        "arrived upstream (unique / dups)",
        format!("{} / {}", h.view.unique, h.view.received - h.view.unique),
        "all",
        Some(h.view.unique == N),
    );
    add(
        &mut t,
        "healthy",
        "bytes written per event",
        format!("{per_event:.1} B = {:.3}× payload", px(per_event)),
        &format!("≤ {TARGET_HEALTHY_WRITE_X}× payload"),
        Some(px(per_event) <= TARGET_HEALTHY_WRITE_X),
    );
    add(
        &mut t,
        "healthy",
        "committed / acked_before_commit",
        format!(
            "{} ({:.1}%) / {} ({:.1}%)",
            h.d.committed,
            100.0 * h.d.committed as f64 / N as f64,
            h.d.acked_before_commit,
            100.0 * h.d.acked_before_commit as f64 / N as f64
        ),
        "",
        None,
    );
    add(
        &mut t,
        "healthy",
        "commits (fsyncs)",
        format!(
            "{} = {:.0}/s, {:.1} events/commit",
            h.d.commits,
            ratio(h.d.commits, h.deliver_secs),
            h.d.committed as f64 / h.d.commits.max(1) as f64
        ),
        "",
        None,
    );
    if let Some((p50, p99, max)) = h.latency {
        add(
            &mut t,
            "healthy",
            "end-to-end latency p50 / p99 / max",
            format!("{p50:.2} / {p99:.2} / {max:.1} ms"),
            "",
            None,
        );
    }
    add(
        &mut t,
        "healthy",
        "CPU per event: process / gateway",
        format!("{:.1} / {:.1} µs", h.cpu_total * 1e6 / N as f64, h.cpu_gw * 1e6 / N as f64),
        "",
        None,
    );
    add(&mut t, "healthy", "dropped", h.d.dropped.to_string(), "0", Some(h.d.dropped == 0));

    // Outage: the upstream is stopped; everything goes to disk.
    let failures0 = rig.gw().get(|c| &c.upstream_failures);
    // Graceful (SIGTERM), so the persistent mosquitto saves the subscriber's session.
    if let Err(e) = bench.rt.block_on(rig.mosquitto.stop()) {
        // The broker was killed instead; its sessions are lost, which the rows below show.
        t.note(format!("outage: mosquitto did not stop gracefully: {e:#}"));
    }
    let noticed = bench.wait_until("the gateway noticed", Duration::from_secs(5), || {
        rig.gw().get(|c| &c.upstream_failures) > failures0
    });
    if !noticed {
        t.note("outage: the gateway did not report the upstream loss within 5 s");
    }
    let o = rig.phase(bench, N, Some(RATE), false)?;
    let per_event = o.written as f64 / o.d.committed.max(1) as f64;
    add(&mut t, "outage", "events published / PUBACKed", format!("{} / {}", N, o.pub_acked), "", None);
    add(
        &mut t,
        "outage",
        "committed / commits (fsyncs)",
        format!(
            "{} / {} = {:.0}/s, {:.1} events/commit",
            o.d.committed,
            o.d.commits,
            ratio(o.d.commits, o.send_secs),
            o.d.committed as f64 / o.d.commits.max(1) as f64
        ),
        "all",
        Some(o.d.committed == N),
    );
    add(
        &mut t,
        "outage",
        "bytes written per event",
        format!("{per_event:.1} B = {:.2}× payload", px(per_event)),
        &format!("≤ {TARGET_OUTAGE_WRITE_X}× payload"),
        Some(px(per_event) <= TARGET_OUTAGE_WRITE_X),
    );
    add(
        &mut t,
        "outage",
        "CPU per event: process / gateway",
        format!("{:.1} / {:.1} µs", o.cpu_total * 1e6 / N as f64, o.cpu_gw * 1e6 / N as f64),
        "",
        None,
    );
    add(&mut t, "outage", "upstream connect attempts failed", o.d.upstream_failures.to_string(), "", None);

    // The upstream returns: time to first delivery and drain of the outage backlog.
    let backlog = o.d.accepted;
    rig.sub.sink.reset(backlog, false);
    let file_before = outpost::buffer::store::file_path(rig.data_dir.path());
    let file_before_len = std::fs::metadata(&file_before).map_or(0, |m| m.len());
    let s0 = Snap::take(rig.gw());
    let outage_len = o.send_secs;
    let (w0, c0) = (write_bytes(), bench.cpu());
    bench.rt.block_on(rig.mosquitto.start_again()).context("start mosquitto again")?;
    let back = Instant::now();
    let (mut connected, mut first_ack) = (None, None);
    let mut progress = (0, Instant::now());
    bench.wait_until("the backlog drained", Duration::from_secs(90), || {
        let s = Snap::take(rig.gw()).minus(s0);
        if connected.is_none() && s.upstream_connects > 0 {
            connected = Some(back.elapsed().as_secs_f64());
        }
        if first_ack.is_none() && s.upstream_acked > 0 {
            first_ack = Some(back.elapsed().as_secs_f64());
        }
        let v = rig.sub.sink.view();
        if v.unique != progress.0 {
            progress = (v.unique, Instant::now());
        }
        v.unique >= backlog || (v.unique > 0 && progress.1.elapsed() > Duration::from_secs(10))
    });
    let v = rig.sub.sink.view();
    let (_, cpu_gw) = bench.cpu().since(c0);
    settle(rig.gw(), Duration::from_millis(1500), Duration::from_secs(6));
    let written = write_bytes() - w0;
    let file_after_len = std::fs::metadata(&file_before).map_or(0, |m| m.len());
    let d = Snap::take(rig.gw()).minus(s0);
    let first = v.first.map(|f| f.duration_since(back).as_secs_f64());
    let drain_secs = match (v.first, v.last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let fmt_s = |s: Option<f64>| s.map_or("never".into(), |s| format!("{s:.3} s"));
    add(&mut t, "return", "uplink reconnected after", fmt_s(connected), "", None);
    add(&mut t, "return", "first upstream PUBACK after", fmt_s(first_ack), "", None);
    add(
        &mut t,
        "return",
        "first delivery after upstream returned",
        fmt_s(first),
        &format!("≤ {TARGET_FIRST_DELIVERY_S} s"),
        Some(first.is_some_and(|s| s <= TARGET_FIRST_DELIVERY_S)),
    );
    add(
        &mut t,
        "return",
        "backlog arrived (unique / dups)",
        format!("{} of {} / {}", v.unique, backlog, v.received - v.unique),
        "all",
        Some(v.unique == backlog),
    );
    add(
        &mut t,
        "return",
        "drain rate",
        format!("{}/s", fmt_rate(ratio(v.unique, drain_secs))),
        &format!("≥ {}/s", fmt_rate(TARGET_DRAIN_EVS)),
        Some(ratio(v.unique, drain_secs) >= TARGET_DRAIN_EVS),
    );
    add(
        &mut t,
        "return",
        "bytes written per drained event (deletes, compaction)",
        format!("{:.1} B", written as f64 / backlog.max(1) as f64),
        "",
        None,
    );
    add(
        &mut t,
        "return",
        "gateway CPU per drained event",
        format!("{:.1} µs", cpu_gw * 1e6 / v.unique.max(1) as f64),
        "",
        None,
    );
    add(
        &mut t,
        "return",
        "buffer file before / after drain",
        format!("{} / {}", fmt_mib(file_before_len), fmt_mib(file_after_len)),
        "shrinks",
        Some(file_after_len < file_before_len),
    );
    add(
        &mut t,
        "return",
        "upstream sent / resent / acked",
        format!("{} / {} / {}", d.upstream_sent, d.upstream_resent, d.upstream_acked),
        "",
        None,
    );
    let (finished, left) = rig.shutdown();
    add(
        &mut t,
        "end",
        "shutdown / events left in buffer",
        format!("{} / {left}", if finished { "clean" } else { "TIMED OUT" }),
        "clean / 0",
        Some(finished && left.starts_with("0")),
    );
    t.note(format!(
        "outage lasted {outage_len:.1} s of publishing (+ time to commit); the uplink reconnects with capped exponential backoff (reconnect_min 100 ms, reconnect_max 30 s, jitter 0.5–1.0)"
    ));
    t.note("latency: publish call (timestamp in payload) → arrival at the upstream subscriber; both clients in this process");
    t.note("process CPU includes the bench's MQTT clients; gateway CPU excludes the bench's threads (mosquitto is another process)");
    t.note("bytes written: /proc/self/io write_bytes delta over the phase, including the delete commits up to 1.5 s after the last arrival");
    t.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 4: rules
// ---------------------------------------------------------------------------------------------

/// A rules file with `n` rules: one typical rule that matches every event (filter + 3
/// projections + a table lookup, forwarded with a topic template), and `n - 1` rules on other
/// topic filters that the topic index must skip.
fn rules_file(dir: &Path, n: usize) -> anyhow::Result<PathBuf> {
    let mut text = String::from("[[table]]\nname = \"devices\"\nkey = \"device\"\n");
    for d in 0..25 {
        text.push_str(&format!("[table.rows.\"{d}\"]\nsite = \"site-{}\"\n", d % 3));
    }
    text.push_str(concat!(
        "[[rule]]\nname = \"typical\"\n",
        "sql = '''SELECT payload.seq AS seq, payload.ts AS ts, payload.pad AS pad, ",
        "lookup('devices', topic(3), 'site') AS site FROM \"sensors/+/+/temp\" WHERE payload.seq >= 0'''\n",
        "[[rule.action]]\ntype = \"forward\"\ntopic = \"up/${site}/temp\"\n",
    ));
    for i in 1..n {
        text.push_str(&format!(
            "[[rule]]\nname = \"other-{i}\"\nsql = 'SELECT payload.v AS v FROM \"other/{i}/+/temp\" WHERE payload.v > {i}'\n[[rule.action]]\ntype = \"forward\"\ntopic = \"o/{i}\"\n"
        ));
    }
    let path = dir.join("rules.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn rules(bench: &Bench) -> anyhow::Result<()> {
    const N: u64 = 50_000;
    const RATE: f64 = 10_000.0;
    let mut t = Table::new(
        "rules: 4 QoS 1 sensors at 10k events/s → gateway (bridge, or N rules) → mosquitto → subscriber",
        &["routing", "arrived", "delivered/s", "CPU µs/event gw", "latency p50 / p99 ms", ""],
    );
    for n_rules in [0, 1, 100, 1000] {
        let dir = bench.tempdir("outpost-bench-rules-")?;
        let rules = if n_rules == 0 { None } else { Some(rules_file(dir.path(), n_rules)?) };
        let mut rig = Rig::start_with_rules(bench, 4, rules)?;
        let r = rig.phase(bench, N, Some(RATE), true)?;
        let (finished, _) = rig.shutdown();
        let latency = r.latency.map_or("-".to_owned(), |(p50, p99, _)| format!("{p50:.2} / {p99:.2}"));
        t.row(vec![
            if n_rules == 0 { "bridge".to_owned() } else { format!("{n_rules} rules") },
            format!("{} / {N}", r.view.unique),
            fmt_rate(ratio(r.view.unique, r.deliver_secs)),
            format!("{:.1}", r.cpu_gw * 1e6 / N as f64),
            latency,
            verdict(r.view.unique == N && finished),
        ]);
    }
    t.note("delivered/s is paced by the 10k/s publishers; CPU per event shows what the rules cost");
    t.note("the rule engine alone: `cargo bench -p outpost-rules --bench rules`");
    t.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// retained: the broker's retained messages in the buffer file
// ---------------------------------------------------------------------------------------------

/// Resident memory of this process, in KiB (`/proc/self/statm`, pages of 4 KiB).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4)
}

fn retained(bench: &Bench) -> anyhow::Result<()> {
    use outpost::broker::retained::RetainedStore;
    use outpost::buffer::StoredRetained;
    const TOPICS: usize = 100_000;
    const PAYLOAD: usize = 64;
    let mut t = Table::new(
        "retained: 100,000 retained topics in the buffer file, start-up load",
        &["step", "topics", "secs", "rate", "detail"],
    );
    let dir = bench.tempdir("outpost-bench-retained-")?;
    {
        let (mut store, _) = Store::open(dir.path()).context("Store::open")?;
        let started = Instant::now();
        let mut batch = Vec::with_capacity(1_000);
        for i in 0..TOPICS {
            let mut message = StoredRetained {
                qos: 1,
                payload: Bytes::from(vec![b'x'; PAYLOAD]),
                ..StoredRetained::default()
            };
            if i % 10 == 0 {
                // One in ten with MQTT 5 properties and an expiry an hour away.
                message.content_type = Some("application/json".to_owned());
                message.user_properties = vec![("site".to_owned(), "north".to_owned())];
                message.expires_ms = Some(outpost::event::now_ms() + 3_600_000);
            }
            batch.push((
                format!("site/north/building-{}/floor-{}/device-{i}/state", i % 7, i % 13),
                Some(message),
            ));
            if batch.len() == 1_000 {
                store.apply_retained(&batch).context("apply_retained")?;
                batch.clear();
            }
        }
        let secs = started.elapsed().as_secs_f64();
        t.row(vec![
            "write, 1,000 per commit".into(),
            TOPICS.to_string(),
            format!("{secs:.2}"),
            format!("{}/s", fmt_rate(ratio(TOPICS as u64, secs))),
            format!("{PAYLOAD} B payloads, topics ~45 B"),
        ]);
        // What a retained publish costs: one commit of its own.
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs(2) {
            let message = StoredRetained {
                qos: 1,
                payload: Bytes::from(vec![b'y'; PAYLOAD]),
                ..StoredRetained::default()
            };
            store
                .apply_retained(&[(format!("single/{}", n % 100), Some(message))])
                .context("apply_retained")?;
            n += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        t.row(vec![
            "write, 1 per commit".into(),
            n.to_string(),
            format!("{secs:.2}"),
            format!("{}/s", fmt_rate(ratio(n, secs))),
            format!("{:.2} ms per retained publish (one fsync)", secs * 1e3 / n as f64),
        ]);
    }
    let file_bytes = std::fs::metadata(outpost::buffer::file::file_path(dir.path()))?.len();
    for round in 1..=3 {
        let rss_before = rss_kib();
        let started = Instant::now();
        let (mut store, _) = Store::open(dir.path()).context("Store::open")?;
        let opened = started.elapsed().as_secs_f64();
        let load =
            store.load_retained(outpost::event::now_ms(), 1_000_000, 1 << 30).context("load_retained")?;
        let loaded = started.elapsed().as_secs_f64();
        let n = load.messages.len();
        let (commands, _rx) = tokio::sync::mpsc::channel(1);
        let in_memory =
            RetainedStore::durable(1_000_000, 1 << 30, Metrics::default(), commands, load.messages);
        let secs = started.elapsed().as_secs_f64();
        let rss = rss_kib().saturating_sub(rss_before);
        t.row(vec![
            format!("start-up #{round}"),
            n.to_string(),
            format!("{secs:.3}"),
            format!("{}/s", fmt_rate(ratio(n as u64, secs))),
            format!(
                "open {:.0} ms, load_retained {:.0} ms, in-memory store {:.0} ms; RSS +{:.1} MiB",
                opened * 1e3,
                (loaded - opened) * 1e3,
                (secs - loaded) * 1e3,
                rss as f64 / 1024.0
            ),
        ]);
        drop(in_memory);
        drop(store);
    }
    t.note(format!(
        "file {:.1} MiB; start-up = Store::open (epoch bump, one fsync) + load_retained (one write transaction, reads every entry) + RetainedStore::durable; RSS deltas after the first round reuse freed memory",
        file_bytes as f64 / (1024.0 * 1024.0)
    ));
    t.print();
    Ok(())
}
