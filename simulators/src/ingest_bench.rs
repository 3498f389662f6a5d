//! `ingest-bench`: what the gateway's sensor side costs (issue #5): CPU per event and PUBACK
//! latency with `broker.ack` = `after_commit` and `on_receipt` at a fixed rate, the sustained
//! rate at saturation, and memory per idle connection.
//!
//! One upstream Mosquitto serves the whole run; every phase gets a fresh `outpost` process and
//! data directory, all started through [`Gateway`]:
//!
//! 1. **Idle connections** (first, on a quiet machine). The gateway's RSS with no client, then
//!    with `idle_connections` MQTT clients that connected (CONNECT, keepalive 60 s, CONNACK)
//!    and then stay silent; the difference divided by the count is the memory per connection.
//! 2. **Fixed rate**, once per ack mode. The fleet (100 sensors, QoS 1, 200-byte JSON) offers
//!    `rate` events/s. After `warmup`, one window of `duration` is measured: events acknowledged
//!    (PUBACK) in it, the gateway's CPU time (`utime + stime`, all threads) over it, and the
//!    PUBACK latency of the acks in it (publish written → PUBACK seen, `fleet` module docs).
//! 3. **Saturation**, ack mode `after_commit`. The fleet runs closed loop: each sensor keeps up
//!    to `window` readings unacknowledged and publishes whenever one is acknowledged, so the
//!    gateway sets the pace; measured like 2.
//!
//! 4. **WAN** (`wan`, `wan_outage`), ack mode `after_commit` at `rate`: the gateway's upstream
//!    is an in-process [`crate::flaky`] link in front of the Mosquitto, adding a one-way latency
//!    to every chunk (a 25 ms one way is a 50 ms round trip, a good cellular link), or held down
//!    for the whole phase (an outage; brought up after the window so the verifier can check that
//!    nothing acknowledged was lost). Besides 2's figures, per acknowledged event and as a
//!    multiple of the mean payload: the bytes redb handed the kernel (the `outpost-store`
//!    thread's `wchar`, [`crate::storage_calls`]) and the buffer's fsyncs per second
//!    (`outpost_buffer_fsyncs_total` from the gateway's `/metrics`: one fsync per commit); next
//!    to them the bytes the gateway caused to be written to storage by `/proc/PID/io`
//!    `write_bytes`, which large folios inflate (same module's doc). With `perf` (off by
//!    default: attaching it stalls the gateway, so it spoils the PUBACK latencies) also the
//!    bytes in its `pwrite64` calls and its `fdatasync`/`fsync` calls per second, a
//!    cross-check; the table says why they are missing when they are.
//!
//! In 2, 3 and 4 a verifier subscribed at the upstream (unless `verify` is off) counts what
//! arrived in the window and, after the fleet stopped, checks that every acknowledged event
//! arrived. A gateway that acknowledges before it has the event (the one before issue #5) can
//! ack faster than it forwards and drop the rest; only `lost` and `delivered/s` show that.
//!
//! **Invariant:** the `broker.ack` key is written into the gateway's config unless
//! `--no-ack-key` is given (gateways from before issue #5 refuse the key); without it every
//! phase runs the gateway's default and the table says so.
//!
//! The load generator, the verifier and Mosquitto share the machine with the gateway; the table
//! shows their CPU use too, so a saturated machine is visible.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::QoS;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::compare::{cpu_per_event, machine_description, wait_delivered};
use crate::fleet::{FleetConfig, FleetProgress, run_fleet_with_progress};
use crate::harness::free_addr;
use crate::process::{ChildProcess, ProcessStats};
use crate::storage_calls::{Recording, STORE_THREAD, monotonic_now, thread_writes};
use crate::systems::{Gateway, GatewayKind, GatewaySpec, outpost_config, start_upstream_mosquitto};
use crate::verify::{Subscriber, start_subscriber};

/// When the gateway sends a sensor's PUBACK (`broker.ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// Once the event is committed to the buffer or acknowledged upstream (the default).
    AfterCommit,
    /// At once.
    OnReceipt,
}

impl AckMode {
    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            AckMode::AfterCommit => "after_commit",
            AckMode::OnReceipt => "on_receipt",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct IngestBenchConfig {
    /// The command line, printed with the table.
    pub command: String,
    /// The `outpost` executable.
    pub outpost: PathBuf,
    /// The `mosquitto` executable (the upstream).
    pub mosquitto: PathBuf,
    /// One fixed-rate phase per mode, in order.
    pub modes: Vec<AckMode>,
    /// Write `broker.ack` into the gateway's config.
    pub set_ack_key: bool,
    /// Sensors (MQTT connections) of the fleet.
    pub sensors: usize,
    /// Payload size in bytes (JSON).
    pub payload_size: usize,
    /// Total offered rate of the fixed-rate phases, events/s.
    pub rate: u32,
    /// Publishing before the measured window.
    pub warmup: Duration,
    /// The measured window of each load phase.
    pub duration: Duration,
    /// Run the saturation phase.
    pub saturation: bool,
    /// Saturation: readings each sensor may have unacknowledged.
    pub window: usize,
    /// Idle clients of the memory phase; 0 skips it.
    pub idle_connections: usize,
    /// Count deliveries and check for lost events with a verifier on the upstream.
    pub verify: bool,
    /// How long to wait for every acknowledged event at the upstream.
    pub drain_timeout: Duration,
    /// Where logs, configs and data go; a temporary directory if unset.
    pub work_dir: Option<PathBuf>,
    /// One WAN phase per one-way latency of the gateway's upstream link.
    pub wan: Vec<Duration>,
    /// A WAN phase with the upstream link down throughout.
    pub wan_outage: bool,
    /// The `perf` executable that records the storage system calls of the WAN phases, or
    /// `None` to leave them out (attaching perf disturbs the latencies, `storage_calls`).
    pub perf: Option<PathBuf>,
}

/// The upstream link of a WAN phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wan {
    /// Up, adding this one-way latency, ms.
    Latency(u64),
    /// Down for the whole window.
    Outage,
}

/// The outcome of one load phase.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// `after_commit`, `on_receipt` or `saturation`.
    pub phase: String,
    /// The `broker.ack` written into the config; `None` if the key was not set.
    pub ack: Option<AckMode>,
    /// The offered rate, events/s; `None` for the closed loop.
    pub target_rate: Option<u32>,
    /// Readings handed to the fleet's MQTT clients in the window, per second.
    pub offered_per_s: f64,
    /// Readings the gateway acknowledged in the window, per second.
    pub acked_per_s: f64,
    /// Distinct readings that reached the verifier at the upstream in the window, per second;
    /// `None` without the verifier.
    pub delivered_per_s: Option<f64>,
    /// Gateway CPU time per acknowledged reading in the window, µs.
    pub cpu_us_per_event: Option<f64>,
    /// CPU use in the window, % of one core: the gateway, this process (fleet and verifier),
    /// the upstream Mosquitto.
    pub gateway_cpu_percent: f64,
    pub sim_cpu_percent: f64,
    pub upstream_cpu_percent: f64,
    /// PUBACK latency of the acks in the window, ms.
    pub puback_ms_p50: Option<f64>,
    pub puback_ms_p99: Option<f64>,
    pub puback_ms_max: Option<f64>,
    /// Readings acknowledged over the whole phase.
    pub acked_total: u64,
    /// Acknowledged readings that never reached the upstream; `None` if not checked.
    pub lost: Option<u64>,
    /// Gateway resident memory at the end of the window, KiB.
    pub rss_kib: u64,
    /// WAN phases: the upstream link.
    pub wan: Option<Wan>,
    /// WAN phases: bytes the gateway caused to be written to storage in the window, per
    /// acknowledged reading (`/proc/PID/io` `write_bytes`).
    pub write_bytes_per_event: Option<f64>,
    /// The mean payload of the readings sent in the window: `--payload-size` pads a reading
    /// up to it, but a reading whose fields alone are longer (~126 bytes with the WAN phases'
    /// device names) is sent as it is. The "× payload" figures divide by this.
    pub payload_mean_bytes: Option<f64>,
    /// WAN phases: buffer fsyncs (commits) per second in the window.
    pub fsyncs_per_s: Option<f64>,
    /// WAN phases: bytes the gateway's store thread passed to write system calls in the
    /// window (its `wchar`: redb's `pwrite64`s, read without perf), per acknowledged reading.
    pub store_write_bytes_per_event: Option<f64>,
    /// WAN phases, with `perf`: bytes in the gateway's `pwrite64` calls in the window, per
    /// acknowledged reading.
    pub pwrite_bytes_per_event: Option<f64>,
    /// WAN phases, with `perf`: the gateway's `fdatasync` and `fsync` calls per second.
    pub syncs_per_s: Option<f64>,
}

/// The outcome of the idle-connection phase.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub connections: usize,
    /// Gateway RSS without clients and with all idle clients connected, KiB.
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

impl IdleResult {
    /// The RSS growth per connection, KiB.
    pub fn per_connection_kib(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.connections.max(1) as f64
    }
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct IngestBenchReport {
    pub command: String,
    pub machine: String,
    pub outpost: String,
    pub ack_key_set: bool,
    pub sensors: usize,
    pub payload_size: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub window: usize,
    pub idle: Option<IdleResult>,
    pub loads: Vec<LoadResult>,
    /// Why the WAN phases have no system-call figures, when they have none.
    pub perf_note: Option<String>,
}

/// Publishing continues this long after the measured window, so the window never sees the
/// fleet stop.
const TAIL: Duration = Duration::from_secs(1);
/// How long the gateway's memory gets to settle before RSS is read.
const SETTLE: Duration = Duration::from_secs(2);
/// Idle clients connecting at once.
const CONNECT_CONCURRENCY: usize = 50;
/// How long an idle client waits for its CONNACK.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the benchmark, printing progress to stderr.
pub async fn run_ingest_bench(
    cfg: IngestBenchConfig,
    cancel: CancellationToken,
) -> anyhow::Result<IngestBenchReport> {
    if cfg.sensors == 0 || cfg.rate == 0 || cfg.window == 0 || cfg.duration.is_zero() {
        anyhow::bail!("`sensors`, `rate`, `window` and `duration` must be above 0");
    }
    let temp;
    let work_dir = match &cfg.work_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("outpost-ingest-bench-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&work_dir).with_context(|| format!("cannot create {}", work_dir.display()))?;
    let run = run_phases(&cfg, &work_dir);
    tokio::select! {
        () = cancel.cancelled() => anyhow::bail!("interrupted"),
        report = run => report.with_context(|| format!("ingest-bench failed (logs in {})", work_dir.display())),
    }
}

async fn run_phases(cfg: &IngestBenchConfig, work_dir: &Path) -> anyhow::Result<IngestBenchReport> {
    let upstream_addr = free_addr()?;
    let upstream = start_upstream_mosquitto(&cfg.mosquitto, upstream_addr, work_dir).await?;
    let mut report = IngestBenchReport {
        command: cfg.command.clone(),
        machine: machine_description(),
        outpost: cfg.outpost.display().to_string(),
        ack_key_set: cfg.set_ack_key,
        sensors: cfg.sensors,
        payload_size: cfg.payload_size,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: cfg.duration.as_secs_f64(),
        window: cfg.window,
        idle: None,
        loads: Vec::new(),
        perf_note: None,
    };

    if cfg.idle_connections > 0 {
        eprintln!("== idle connections: {}", cfg.idle_connections);
        let ack = cfg.set_ack_key.then_some(AckMode::AfterCommit);
        let gateway = start_gateway(cfg, work_dir, "idle", upstream_addr, ack).await?;
        let idle = run_idle(&gateway, cfg.idle_connections).await?;
        eprintln!(
            "   RSS {:.1} MiB without clients, {:.1} MiB with {}: {:.1} KiB per connection",
            idle.rss_before_kib as f64 / 1024.0,
            idle.rss_after_kib as f64 / 1024.0,
            idle.connections,
            idle.per_connection_kib()
        );
        report.idle = Some(idle);
    }

    let mut phases: Vec<(String, AckMode, Option<u32>)> =
        cfg.modes.iter().map(|&mode| (mode.name().to_string(), mode, Some(cfg.rate))).collect();
    if cfg.saturation {
        phases.push(("saturation".to_string(), AckMode::AfterCommit, None));
    }
    let mut wans: Vec<Wan> = cfg.wan.iter().map(|d| Wan::Latency(d.as_millis() as u64)).collect();
    if cfg.wan_outage {
        wans.push(Wan::Outage);
    }
    let perf = match &cfg.perf {
        _ if wans.is_empty() => None,
        None => {
            report.perf_note = Some("not asked for (--perf PATH)".to_string());
            None
        }
        Some(perf) => match crate::storage_calls::perf_works(perf).await {
            Ok(()) => Some(perf.as_path()),
            Err(error) => {
                report.perf_note = Some(format!("{error:#}"));
                None
            }
        },
    };
    for (phase, mode, rate) in phases {
        eprintln!(
            "== {phase}: {}",
            rate.map_or_else(
                || format!("closed loop, {} in flight per sensor", cfg.window),
                |r| format!("{r} events/s")
            )
        );
        let ack = cfg.set_ack_key.then_some(mode);
        let mut gateway = start_gateway(cfg, work_dir, &phase, upstream_addr, ack).await?;
        let load = run_load(cfg, &mut gateway, &upstream, upstream_addr, &phase, ack, rate).await?;
        eprintln!(
            "   offered {:.0}/s acked {:.0}/s, {} µs/event, CPU % core gateway {:.0} sim {:.0} upstream {:.0}, PUBACK p50 {} p99 {} max {} ms, lost {}",
            load.offered_per_s,
            load.acked_per_s,
            fmt(load.cpu_us_per_event, 1),
            load.gateway_cpu_percent,
            load.sim_cpu_percent,
            load.upstream_cpu_percent,
            fmt(load.puback_ms_p50, 2),
            fmt(load.puback_ms_p99, 2),
            fmt(load.puback_ms_max, 1),
            load.lost.map_or_else(|| "not checked".to_string(), |lost| lost.to_string()),
        );
        report.loads.push(load);
    }
    for wan in wans {
        let phase = match wan {
            Wan::Latency(ms) => format!("wan-{ms}ms"),
            Wan::Outage => "wan-outage".to_string(),
        };
        eprintln!("== {phase}: {} events/s, after_commit", cfg.rate);
        let load = run_wan(cfg, work_dir, &upstream, upstream_addr, &phase, wan, perf).await?;
        if perf.is_some() && load.pwrite_bytes_per_event.is_none() && report.perf_note.is_none() {
            report.perf_note = Some(format!("perf failed in {phase} (its error is above)"));
        }
        let times_payload =
            |bytes: Option<f64>| fmt(bytes.zip(load.payload_mean_bytes).map(|(b, p)| b / p), 2);
        eprintln!(
            "   acked {:.0}/s, {} µs/event, PUBACK p50 {} p99 {} ms, store thread {} B/event ({}×), pwrite {} B/event ({}× the {} B mean payload), {} syncs/s; write_bytes {} B/event ({}×), {} buffer fsyncs/s, lost {}",
            load.acked_per_s,
            fmt(load.cpu_us_per_event, 1),
            fmt(load.puback_ms_p50, 2),
            fmt(load.puback_ms_p99, 2),
            fmt(load.store_write_bytes_per_event, 0),
            times_payload(load.store_write_bytes_per_event),
            fmt(load.pwrite_bytes_per_event, 0),
            times_payload(load.pwrite_bytes_per_event),
            fmt(load.payload_mean_bytes, 1),
            fmt(load.syncs_per_s, 1),
            fmt(load.write_bytes_per_event, 0),
            times_payload(load.write_bytes_per_event),
            fmt(load.fsyncs_per_s, 1),
            load.lost.map_or_else(|| "not checked".to_string(), |lost| lost.to_string()),
        );
        report.loads.push(load);
    }
    Ok(report)
}

/// One WAN phase: a fresh gateway whose upstream is a shaped (or downed) link to `upstream`.
async fn run_wan(
    cfg: &IngestBenchConfig,
    work_dir: &Path,
    upstream: &ChildProcess,
    upstream_addr: SocketAddr,
    phase: &str,
    wan: Wan,
    perf: Option<&Path>,
) -> anyhow::Result<LoadResult> {
    let link_addr = free_addr()?;
    let listener = tokio::net::TcpListener::bind(link_addr)
        .await
        .with_context(|| format!("cannot listen on {link_addr} for the WAN link"))?;
    let (switch, up) = tokio::sync::watch::channel(wan != Wan::Outage);
    let extra_latency = match wan {
        Wan::Latency(ms) => Duration::from_millis(ms),
        Wan::Outage => Duration::ZERO,
    };
    let shaping = crate::flaky::LinkShaping { extra_latency, bytes_per_sec: None };
    let link_cancel = CancellationToken::new();
    let link = tokio::spawn(crate::flaky::run_switched_link(
        listener,
        upstream_addr,
        up,
        shaping,
        link_cancel.clone(),
    ));
    let _stop_link = link_cancel.clone().drop_guard();

    let metrics = free_addr()?;
    let ack = cfg.set_ack_key.then_some(AckMode::AfterCommit);
    let mut gateway = start_gateway_with(cfg, work_dir, phase, link_addr, ack, Some(metrics)).await?;
    let probe = WanProbe { metrics, switch: &switch, wan, perf };
    let mut load =
        run_load_with(cfg, &mut gateway, upstream, upstream_addr, phase, ack, Some(cfg.rate), Some(probe))
            .await?;
    load.wan = Some(wan);
    link_cancel.cancel();
    link.await.context("the WAN link task panicked")?;
    Ok(load)
}

/// What a WAN phase measures besides a load phase's figures.
struct WanProbe<'a> {
    /// The gateway's `[http]` listener.
    metrics: SocketAddr,
    /// Brings a downed link up after the window.
    switch: &'a tokio::sync::watch::Sender<bool>,
    wan: Wan,
    /// Records the gateway's storage system calls in the window.
    perf: Option<&'a Path>,
}

/// `write_bytes` from `/proc/PID/io`: bytes this process caused to be sent to storage.
pub(crate) fn write_bytes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("cannot read /proc/{pid}/io"))?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("no write_bytes in /proc/{pid}/io: {io}"))
}

/// One counter from the gateway's `/metrics` (an HTTP/1.0 GET, the whole body read).
pub(crate) async fn scrape_counter(addr: SocketAddr, name: &str) -> anyhow::Result<u64> {
    let body = scrape_metrics(addr).await?;
    parse_counter(&body, name).with_context(|| format!("no `{name}` in the metrics from {addr}"))
}

/// The histogram `name` (its `_bucket`, `_sum` and `_count` samples) at `addr`'s `/metrics`.
pub(crate) async fn scrape_histogram(addr: SocketAddr, name: &str) -> anyhow::Result<Histogram> {
    let body = scrape_metrics(addr).await?;
    Histogram::parse(&body, name).with_context(|| format!("no histogram `{name}` in the metrics from {addr}"))
}

/// A Prometheus histogram as exposed: cumulative counts per upper bound (`le`), in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn parse(body: &str, name: &str) -> Option<Histogram> {
        let bucket = format!("{name}_bucket{{le=\"");
        let mut buckets = Vec::new();
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(&bucket) else { continue };
            let (le, value) = rest.split_once("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            buckets.push((le, value.trim().parse::<f64>().ok()? as u64));
        }
        let sample = |suffix: &str| {
            let prefix = format!("{name}_{suffix} ");
            body.lines().find_map(|line| line.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
        };
        (!buckets.is_empty()).then_some(())?;
        Some(Histogram { buckets, sum: sample("sum")?, count: sample("count")? as u64 })
    }

    /// What was observed after `earlier` (a scrape of the same histogram before this one).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(&(le, now), &(_, before))| (le, now.saturating_sub(before)))
            .collect();
        Histogram { buckets, sum: self.sum - earlier.sum, count: self.count.saturating_sub(earlier.count) }
    }

    /// The mean observation; `None` without any.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The smallest bucket bound that at least the share `q` of the observations is under:
    /// the `q` quantile, rounded up to the bucket it falls in.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let need = (q * self.count as f64).ceil() as u64;
        (self.count > 0).then_some(())?;
        self.buckets.iter().find(|(_, n)| *n >= need).map(|(le, _)| *le)
    }
}

/// The body of `addr`'s `/metrics`.
async fn scrape_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let get = async {
        let mut stream =
            TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .context("cannot send the request")?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.context("cannot read the response")?;
        anyhow::Ok(body)
    };
    tokio::time::timeout(CONNACK_TIMEOUT, get)
        .await
        .with_context(|| format!("no answer from {addr}/metrics within {CONNACK_TIMEOUT:?}"))?
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
fn parse_counter(body: &str, name: &str) -> Option<u64> {
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse::<f64>().ok().map(|v| v as u64)
    })
}

/// Starts a fresh gateway in `<work_dir>/<phase>` with the benchmark config.
async fn start_gateway(
    cfg: &IngestBenchConfig,
    work_dir: &Path,
    phase: &str,
    upstream: SocketAddr,
    ack: Option<AckMode>,
) -> anyhow::Result<Gateway> {
    start_gateway_with(cfg, work_dir, phase, upstream, ack, None).await
}

/// Like [`start_gateway`], with the `[http]` endpoint on `metrics` if given.
async fn start_gateway_with(
    cfg: &IngestBenchConfig,
    work_dir: &Path,
    phase: &str,
    upstream: SocketAddr,
    ack: Option<AckMode>,
    metrics: Option<SocketAddr>,
) -> anyhow::Result<Gateway> {
    let dir = work_dir.join(phase);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config_path = dir.join("outpost.toml");
    let mut config = gateway_config(upstream, ack, cfg.idle_connections.max(cfg.sensors));
    if let Some(metrics) = metrics {
        config.push_str(&format!("\n[http]\nlisten = \"{metrics}\"\n"));
    }
    std::fs::write(&config_path, config)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let spec = GatewaySpec {
        kind: GatewayKind::Outpost,
        binary: cfg.outpost.clone(),
        listen: free_addr()?,
        upstream,
        dir,
        outpost_config: Some(config_path),
        rules: None,
        tls_ca: None,
        autosave: Duration::from_secs(1),
    };
    let hint = if ack.is_some() {
        " (a gateway from before issue #5 refuses `broker.ack`: pass --no-ack-key)"
    } else {
        ""
    };
    Gateway::start(spec).await.with_context(|| format!("cannot start the gateway for {phase}{hint}"))
}

/// The benchmark's gateway config: `compare`'s (defaults, 1 s reconnect cap), room for
/// `clients` connections, and `broker.ack` if given.
pub fn gateway_config(upstream: SocketAddr, ack: Option<AckMode>, clients: usize) -> String {
    let mut config = outpost_config(upstream);
    config.push_str("\n[broker]\n");
    // The default (1000) counts every connection; leave room for the verifier and stragglers.
    config.push_str(&format!("max_connections = {}\n", (clients + 100).max(1000)));
    if let Some(ack) = ack {
        config.push_str(&format!("ack = \"{}\"\n", ack.name()));
    }
    config
}

/// One load phase on a running gateway.
async fn run_load(
    cfg: &IngestBenchConfig,
    gateway: &mut Gateway,
    upstream: &ChildProcess,
    upstream_addr: SocketAddr,
    phase: &str,
    ack: Option<AckMode>,
    rate: Option<u32>,
) -> anyhow::Result<LoadResult> {
    run_load_with(cfg, gateway, upstream, upstream_addr, phase, ack, rate, None).await
}

/// One load phase; with `wan`, also the bytes written and the fsyncs in the window.
#[allow(clippy::too_many_arguments)]
async fn run_load_with(
    cfg: &IngestBenchConfig,
    gateway: &mut Gateway,
    upstream: &ChildProcess,
    upstream_addr: SocketAddr,
    phase: &str,
    ack: Option<AckMode>,
    rate: Option<u32>,
    wan: Option<WanProbe<'_>>,
) -> anyhow::Result<LoadResult> {
    let mut subscriber =
        if cfg.verify { Some(start_subscriber(&upstream_addr.to_string(), "#").await?) } else { None };
    let fleet = FleetConfig {
        broker: gateway.spec().listen.to_string(),
        sensors: cfg.sensors,
        rate_per_sensor: f64::from(rate.unwrap_or(1)) / cfg.sensors as f64,
        duration: Some(cfg.warmup + cfg.duration + TAIL),
        qos: QoS::AtLeastOnce,
        client_prefix: format!("{phase}-"),
        payload_size: cfg.payload_size,
        max_outstanding: rate.is_none().then_some(cfg.window),
        ..FleetConfig::default()
    };
    let progress = Arc::new(FleetProgress::default());
    // Before the load: attaching perf stalls the gateway (`storage_calls` module docs).
    let recording = match wan.as_ref().and_then(|probe| probe.perf) {
        Some(perf) => {
            let mut recording = Recording::start(perf, gateway.pid()?, &gateway.spec().dir)?;
            recording.ready().await?;
            Some(recording)
        }
        None => None,
    };
    let fleet = tokio::spawn(run_fleet_with_progress(fleet, CancellationToken::new(), Arc::clone(&progress)));

    // Pacing the measurement window, not waiting for an event.
    tokio::time::sleep(cfg.warmup).await;
    let disk = |gateway: &Gateway| {
        let metrics = wan.as_ref().map(|probe| probe.metrics);
        let pid = gateway.pid();
        async move {
            match metrics {
                Some(metrics) => {
                    let pid = pid?;
                    anyhow::Ok(Some((
                        write_bytes(pid)?,
                        scrape_counter(metrics, "outpost_buffer_fsyncs_total").await?,
                        thread_writes(pid, STORE_THREAD)?,
                    )))
                }
                None => Ok(None),
            }
        }
    };
    let disk_start = disk(gateway).await?;
    let start = Snapshot::take(gateway, upstream, &progress, subscriber.as_ref())?;
    let window_start = monotonic_now();
    tokio::time::sleep(cfg.duration).await;
    let end = Snapshot::take(gateway, upstream, &progress, subscriber.as_ref())?;
    let window_end = monotonic_now();
    let disk_end = disk(gateway).await?;
    let calls = match recording {
        Some(recording) => match recording.finish(window_start..window_end).await {
            Ok(counts) => Some(counts),
            Err(error) => {
                eprintln!("   perf: {error:#}");
                None
            }
        },
        None => None,
    };

    let summary = fleet.await.context("the fleet task panicked")??;
    gateway.check_running()?;
    if let Some(probe) = &wan {
        if probe.wan == Wan::Outage {
            // Up again, so the verifier can see that every acknowledged event survived.
            probe.switch.send_replace(true);
        }
    }
    let lost = match &mut subscriber {
        Some(subscriber) => {
            Some(wait_delivered(subscriber, &summary, cfg.drain_timeout).await.report.missing)
        }
        None => None,
    };

    let secs = end.at.duration_since(start.at).as_secs_f64();
    let percent = |before: &ProcessStats, after: &ProcessStats| {
        after.cpu.saturating_sub(before.cpu).as_secs_f64() / secs * 100.0
    };
    let acked = end.acked - start.acked;
    let latency = end.latency.since(&start.latency);
    Ok(LoadResult {
        phase: phase.to_string(),
        ack,
        target_rate: rate,
        offered_per_s: (end.sent - start.sent) as f64 / secs,
        acked_per_s: acked as f64 / secs,
        delivered_per_s: end.delivered.zip(start.delivered).map(|(end, start)| (end - start) as f64 / secs),
        cpu_us_per_event: cpu_per_event(&start.gateway, &end.gateway, acked),
        gateway_cpu_percent: percent(&start.gateway, &end.gateway),
        sim_cpu_percent: percent(&start.sim, &end.sim),
        upstream_cpu_percent: percent(&start.upstream, &end.upstream),
        puback_ms_p50: latency.percentile_ms(0.50),
        puback_ms_p99: latency.percentile_ms(0.99),
        puback_ms_max: latency.max_ms(),
        acked_total: summary.acked,
        lost,
        rss_kib: end.gateway.rss_kib,
        wan: None,
        write_bytes_per_event: disk_start
            .zip(disk_end)
            .filter(|_| acked > 0)
            .map(|((bytes, _, _), (bytes_end, _, _))| bytes_end.saturating_sub(bytes) as f64 / acked as f64),
        store_write_bytes_per_event: disk_start.zip(disk_end).filter(|_| acked > 0).map(
            |((_, _, store), (_, _, store_end))| {
                store_end.bytes.saturating_sub(store.bytes) as f64 / acked as f64
            },
        ),
        payload_mean_bytes: (end.sent > start.sent).then(|| {
            (end.sent_payload_bytes - start.sent_payload_bytes) as f64 / (end.sent - start.sent) as f64
        }),
        fsyncs_per_s: disk_start
            .zip(disk_end)
            .map(|((_, f, _), (_, f_end, _))| f_end.saturating_sub(f) as f64 / secs),
        pwrite_bytes_per_event: calls.filter(|_| acked > 0).map(|c| c.pwrite_bytes as f64 / acked as f64),
        syncs_per_s: calls.map(|c| c.per_second(secs).syncs),
    })
}

/// The counters at one edge of the measured window.
struct Snapshot {
    at: Instant,
    sent: u64,
    sent_payload_bytes: u64,
    acked: u64,
    /// Distinct readings at the verifier, if there is one.
    delivered: Option<u64>,
    latency: crate::latency::Histogram,
    gateway: ProcessStats,
    sim: ProcessStats,
    upstream: ProcessStats,
}

impl Snapshot {
    fn take(
        gateway: &Gateway,
        upstream: &ChildProcess,
        progress: &FleetProgress,
        subscriber: Option<&Subscriber>,
    ) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            at: Instant::now(),
            sent: progress.sent(),
            sent_payload_bytes: progress.sent_payload_bytes(),
            acked: progress.acked(),
            delivered: subscriber.map(Subscriber::unique_count),
            latency: progress.ack_latency(),
            gateway: gateway.stats()?,
            sim: ProcessStats::read(std::process::id())?,
            upstream: upstream.stats()?,
        })
    }
}

/// RSS without clients, then with `count` idle clients connected.
async fn run_idle(gateway: &Gateway, count: usize) -> anyhow::Result<IdleResult> {
    tokio::time::sleep(SETTLE).await;
    let rss_before_kib = gateway.stats()?.rss_kib;
    let listen = gateway.spec().listen;
    let mut clients = Vec::with_capacity(count);
    let mut next = 0;
    while next < count {
        let mut batch = JoinSet::new();
        for index in next..(next + CONNECT_CONCURRENCY).min(count) {
            batch.spawn(connect_idle(listen, format!("idle-{:05}", index + 1)));
        }
        next = (next + CONNECT_CONCURRENCY).min(count);
        while let Some(joined) = batch.join_next().await {
            clients.push(joined.context("an idle client task panicked")??);
        }
    }
    // A poll of RSS after the connections' buffers were allocated, not a synchronisation.
    tokio::time::sleep(SETTLE).await;
    let rss_after_kib = gateway.stats()?.rss_kib;
    // Every client must still be connected: a broker that closed them would look cheap.
    let mut probe = [0_u8; 1];
    for stream in &clients {
        if let Ok(0) = stream.try_read(&mut probe) {
            anyhow::bail!("the gateway closed an idle connection during the measurement");
        }
    }
    drop(clients);
    Ok(IdleResult { connections: count, rss_before_kib, rss_after_kib })
}

/// Connects one MQTT 3.1.1 client (clean session, keepalive 60 s) and returns its socket once
/// the broker accepted it.
async fn connect_idle(addr: SocketAddr, client_id: String) -> anyhow::Result<TcpStream> {
    let connect = async {
        let mut stream =
            TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
        stream.write_all(&connect_packet(&client_id, 60)).await.context("cannot send CONNECT")?;
        let mut connack = [0_u8; 4];
        stream.read_exact(&mut connack).await.context("no CONNACK")?;
        if connack[0] != 0x20 || connack[1] != 0x02 || connack[3] != 0x00 {
            anyhow::bail!("the gateway refused {client_id}: CONNACK {connack:02x?}");
        }
        Ok(stream)
    };
    tokio::time::timeout(CONNACK_TIMEOUT, connect)
        .await
        .with_context(|| format!("no CONNACK for {client_id} within {CONNACK_TIMEOUT:?}"))?
}

/// An MQTT 3.1.1 CONNECT packet: clean session, no will, no credentials.
pub fn connect_packet(client_id: &str, keepalive_s: u16) -> Vec<u8> {
    let id = client_id.as_bytes();
    // Protocol name, level, flags, keepalive; then the client id with its length.
    let remaining = 10 + 2 + id.len();
    let mut packet = vec![0x10];
    let mut length = remaining;
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if length == 0 {
            break;
        }
    }
    packet.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02]);
    packet.extend_from_slice(&keepalive_s.to_be_bytes());
    packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
    packet.extend_from_slice(id);
    packet
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

impl IngestBenchReport {
    /// The header lines and one two-column table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        if let Some(idle) = &self.idle {
            rows.push((
                format!("idle: gateway RSS MiB, no clients / {} clients", idle.connections),
                format!(
                    "{:.1} / {:.1}",
                    idle.rss_before_kib as f64 / 1024.0,
                    idle.rss_after_kib as f64 / 1024.0
                ),
            ));
            rows.push((
                "idle: RSS per connection KiB".to_string(),
                format!("{:.1}", idle.per_connection_kib()),
            ));
        }
        for load in &self.loads {
            let label = match (load.target_rate, self.ack_key_set) {
                (Some(rate), _) if load.wan.is_some() => {
                    let link = match load.wan {
                        Some(Wan::Latency(ms)) => format!("{} ms RTT", 2 * ms),
                        _ => "upstream down".to_string(),
                    };
                    format!("{} ({link}) at {rate}/s", load.phase)
                }
                (Some(rate), _) => format!("{} at {rate}/s", load.phase),
                (None, true) => format!("saturation (after_commit, {} in flight/sensor)", self.window),
                (None, false) => format!("saturation ({} in flight/sensor)", self.window),
            };
            rows.push((
                format!("{label}: acked/s (offered)"),
                format!("{:.0} ({:.0})", load.acked_per_s, load.offered_per_s),
            ));
            rows.push((
                format!("{label}: delivered/s at the upstream"),
                load.delivered_per_s.map_or_else(|| "not checked".to_string(), |per_s| format!("{per_s:.0}")),
            ));
            rows.push((
                format!("{label}: gateway CPU µs/event (% core)"),
                format!("{} ({:.0} %)", fmt(load.cpu_us_per_event, 1), load.gateway_cpu_percent),
            ));
            rows.push((
                format!("{label}: PUBACK p50 / p99 / max ms"),
                format!(
                    "{} / {} / {}",
                    fmt(load.puback_ms_p50, 2),
                    fmt(load.puback_ms_p99, 2),
                    fmt(load.puback_ms_max, 1)
                ),
            ));
            rows.push((
                format!("{label}: lost (of acked)"),
                match load.lost {
                    Some(lost) => format!("{lost} (of {})", load.acked_total),
                    None => "not checked".to_string(),
                },
            ));
            let payload = load.payload_mean_bytes.unwrap_or(self.payload_size as f64);
            let bytes =
                |per_event: f64| format!("{per_event:.0} ({:.2}× {payload:.1} B)", per_event / payload);
            if let Some(per_event) = load.store_write_bytes_per_event {
                rows.push((
                    format!("{label}: redb bytes/event, store thread wchar (× mean payload)"),
                    bytes(per_event),
                ));
            }
            if let Some(per_event) = load.pwrite_bytes_per_event {
                rows.push((
                    format!("{label}: redb pwrite bytes/event, perf (× mean payload)"),
                    bytes(per_event),
                ));
            }
            if let Some(syncs) = load.syncs_per_s {
                rows.push((format!("{label}: fdatasync+fsync calls/s"), format!("{syncs:.1}")));
            }
            if let Some(per_event) = load.write_bytes_per_event {
                rows.push((
                    format!("{label}: /proc write_bytes/event, folio-inflated (× mean payload)"),
                    bytes(per_event),
                ));
            }
            if let Some(fsyncs) = load.fsyncs_per_s {
                rows.push((format!("{label}: buffer fsyncs/s (its counter)"), format!("{fsyncs:.1}")));
            }
            rows.push((format!("{label}: gateway RSS MiB"), format!("{:.1}", load.rss_kib as f64 / 1024.0)));
            rows.push((
                format!("{label}: CPU % core sim / upstream"),
                format!("{:.0} / {:.0}", load.sim_cpu_percent, load.upstream_cpu_percent),
            ));
        }

        let mut out = format!("command: {}\nmachine: {}\n", self.command, self.machine);
        out.push_str(&format!(
            "gateway: {}; broker.ack {}\n",
            self.outpost,
            if self.ack_key_set {
                "set per phase"
            } else {
                "not set (every phase runs the gateway's default; the mode names are labels only)"
            }
        ));
        out.push_str(&format!(
            "load: {} sensors, QoS 1, {}-byte JSON; each phase measured over {:.0} s after {:.0} s of warm-up\n",
            self.sensors, self.payload_size, self.duration_s, self.warmup_s
        ));
        if let Some(note) = &self.perf_note {
            out.push_str(&format!("storage system calls not recorded: {note}\n"));
        }
        let label_width = rows.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0);
        let value_width = rows.iter().map(|(_, value)| value.chars().count()).max().unwrap_or(0).max(5);
        let pad_left =
            |text: &str, width: usize| format!("{}{text}", " ".repeat(width - text.chars().count()));
        let pad_right =
            |text: &str, width: usize| format!("{text}{}", " ".repeat(width - text.chars().count()));
        out.push_str(&format!("| {} | {} |\n", pad_right("", label_width), pad_left("value", value_width)));
        out.push_str(&format!("| {} | {}: |\n", "-".repeat(label_width), "-".repeat(value_width - 1)));
        for (label, value) in &rows {
            out.push_str(&format!(
                "| {} | {} |\n",
                pad_right(label, label_width),
                pad_left(value, value_width)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway's exposition of a histogram, as `/metrics` writes it.
    fn exposition(buckets: &[(&str, u64)], sum: f64, count: u64) -> String {
        let mut body =
            "# HELP outpost_puback_hold_seconds x\n# TYPE outpost_puback_hold_seconds histogram\n".to_owned();
        for (le, n) in buckets {
            body.push_str(&format!("outpost_puback_hold_seconds_bucket{{le=\"{le}\"}} {n}\n"));
        }
        body.push_str(&format!(
            "outpost_puback_hold_seconds_sum {sum}\noutpost_puback_hold_seconds_count {count}\n"
        ));
        body.push_str("outpost_other_total 7\n");
        body
    }

    #[test]
    fn a_histogram_difference_gives_mean_and_quantile_bounds() {
        let name = "outpost_puback_hold_seconds";
        let before = Histogram::parse(&exposition(&[("0.1", 5), ("0.25", 10), ("+Inf", 10)], 1.0, 10), name)
            .expect("parses");
        let after =
            Histogram::parse(&exposition(&[("0.1", 45), ("0.25", 108), ("+Inf", 110)], 13.0, 110), name)
                .expect("parses");
        assert_eq!(after.buckets.last(), Some(&(f64::INFINITY, 110)));
        let window = after.since(&before);
        assert_eq!(window.count, 100);
        assert_eq!(window.buckets, vec![(0.1, 40), (0.25, 98), (f64::INFINITY, 100)]);
        assert_eq!(window.mean(), Some(0.12));
        assert_eq!(window.quantile_bound(0.4), Some(0.1));
        assert_eq!(window.quantile_bound(0.5), Some(0.25));
        assert_eq!(window.quantile_bound(0.99), Some(f64::INFINITY));
        assert_eq!(before.since(&before).mean(), None);
        assert!(Histogram::parse("outpost_other_total 7\n", name).is_none());
    }

    #[test]
    fn encodes_connect() {
        let packet = connect_packet("idle-00001", 60);
        assert_eq!(packet[0], 0x10);
        assert_eq!(usize::from(packet[1]), packet.len() - 2);
        assert_eq!(&packet[2..12], &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 60]);
        assert_eq!(&packet[12..14], &[0x00, 10]);
        assert_eq!(&packet[14..], b"idle-00001");
        let long = connect_packet(&"x".repeat(200), 60);
        assert_eq!(&long[1..3], &[(212 % 128) as u8 | 0x80, 1]);
    }

    #[test]
    fn writes_the_ack_key_only_when_asked() {
        let upstream: SocketAddr = "127.0.0.1:1884".parse().expect("addr");
        let without = gateway_config(upstream, None, 1000);
        assert!(!without.contains("ack ="), "{without}");
        assert!(without.contains("max_connections = 1100"), "{without}");
        let with = gateway_config(upstream, Some(AckMode::OnReceipt), 100);
        assert!(with.lines().any(|line| line == "ack = \"on_receipt\""), "{with}");
        assert!(with.contains("max_connections = 1000"), "{with}");
        assert_eq!(with.matches("[broker]").count(), 1);
    }

    #[test]
    fn table_rows_line_up() {
        let load = LoadResult {
            phase: "after_commit".to_string(),
            ack: None,
            target_rate: Some(10_000),
            offered_per_s: 10_000.0,
            acked_per_s: 9_990.0,
            delivered_per_s: Some(9_990.0),
            cpu_us_per_event: Some(50.0),
            gateway_cpu_percent: 50.0,
            sim_cpu_percent: 30.0,
            upstream_cpu_percent: 10.0,
            puback_ms_p50: Some(0.4),
            puback_ms_p99: Some(3.0),
            puback_ms_max: Some(12.0),
            acked_total: 220_000,
            lost: Some(0),
            rss_kib: 30_000,
            wan: None,
            write_bytes_per_event: None,
            payload_mean_bytes: None,
            fsyncs_per_s: None,
            pwrite_bytes_per_event: None,
            store_write_bytes_per_event: None,
            syncs_per_s: None,
        };
        let report = IngestBenchReport {
            command: "outpost-sim ingest-bench".to_string(),
            machine: "test".to_string(),
            outpost: "outpost".to_string(),
            ack_key_set: false,
            sensors: 100,
            payload_size: 200,
            warmup_s: 2.0,
            duration_s: 20.0,
            window: 100,
            idle: Some(IdleResult { connections: 1000, rss_before_kib: 20_480, rss_after_kib: 28_672 }),
            loads: vec![
                load.clone(),
                LoadResult { target_rate: None, lost: None, delivered_per_s: None, ..load.clone() },
                LoadResult {
                    phase: "wan-25ms".to_string(),
                    wan: Some(Wan::Latency(25)),
                    write_bytes_per_event: Some(1311.0),
                    payload_mean_bytes: Some(126.0),
                    fsyncs_per_s: Some(40.0),
                    pwrite_bytes_per_event: Some(63.0),
                    store_write_bytes_per_event: Some(64.0),
                    syncs_per_s: Some(4.0),
                    ..load
                },
            ],
            perf_note: None,
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().filter(|line| line.starts_with('|')).collect();
        assert!(lines.iter().all(|line| line.chars().count() == lines[0].chars().count()), "{table}");
        assert!(table.contains("| idle: RSS per connection KiB"), "{table}");
        assert!(table.contains("8.2 |"), "{table}");
        assert!(table.contains("saturation (100 in flight/sensor): lost (of acked)"), "{table}");
        assert!(table.contains("not checked |"), "{table}");
        assert!(
            table.contains(
                "wan-25ms (50 ms RTT) at 10000/s: /proc write_bytes/event, folio-inflated (× mean payload)"
            ),
            "{table}"
        );
        // Divided by the payloads actually sent, not by `payload_size`.
        assert!(table.contains("1311 (10.40× 126.0 B) |"), "{table}");
        assert!(
            table.contains("wan-25ms (50 ms RTT) at 10000/s: redb pwrite bytes/event, perf (× mean payload)"),
            "{table}"
        );
        assert!(table.contains("redb bytes/event, store thread wchar (× mean payload) "), "{table}");
        assert!(table.contains("64 (0.51× 126.0 B) |"), "{table}");
        assert!(table.contains("63 (0.50× 126.0 B) |"), "{table}");
        assert!(table.contains("wan-25ms (50 ms RTT) at 10000/s: fdatasync+fsync calls/s "), "{table}");
        assert!(!table.contains("not recorded"), "{table}");
        let without =
            IngestBenchReport { perf_note: Some("not asked for (--perf PATH)".to_string()), ..report };
        assert!(without.table().contains("storage system calls not recorded: not asked for (--perf PATH)\n"));
    }

    #[test]
    fn reads_an_unlabelled_counter() {
        let body = "HTTP/1.0 200 OK\r\n\r\n# TYPE outpost_buffer_fsyncs_total counter\n\
                    outpost_buffer_fsyncs_total_x 9\noutpost_buffer_fsyncs_total 1234\n";
        assert_eq!(parse_counter(body, "outpost_buffer_fsyncs_total"), Some(1234));
        assert_eq!(parse_counter(body, "outpost_buffer_committed_total"), None);
    }
}
