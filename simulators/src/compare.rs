//! `compare`: the same workload through Outpost and through a Mosquitto bridge, side by side.
//!
//! For each gateway kind the harness starts a fresh upstream Mosquitto, subscribes a verifier to
//! it and runs three phases, each on a fresh gateway:
//!
//! 1. **Rate steps**, each the steady state at one rate. The step's fleet connects first (it
//!    starts publishing at the rate as its sensors connect); once every sensor is connected
//!    and `STEP_SETTLE` has passed, the step is measured for `step`: offered/s and delivered/s
//!    (distinct readings at the verifier) over those `step` seconds; then publishing stops,
//!    the fleet stays connected, and the step's catch-up lasts until every reading sent was
//!    acknowledged and as many distinct readings arrived. CPU per event is the gateway
//!    process's CPU time (`/proc/<pid>/stat`, all threads) from the start of the measurement
//!    to the end of the catch-up, divided by the readings delivered in that span. Connecting
//!    and disconnecting the fleet fall outside it (at 1,000 sensors and 1k events/s they
//!    cost several µs per event), and so do the latencies of the readings that arrived while
//!    it connected (queued in the clients, they waited for their connection); the
//!    percentiles are over the readings delivered in the measured span. The lost count covers
//!    the whole step.
//! 2. **Outage.** The gateway reaches the upstream through a switched TCP link
//!    (`flaky::run_switched_link`). The fleet publishes steadily for `lead_in`, the link goes
//!    down for `outage`, the fleet stops, the link comes back: lost = acknowledged readings that
//!    never arrive within `drain_timeout`; drain time = link up → the last of them arrived.
//! 3. **Crash.** As 2, but halfway through the outage the gateway is SIGKILLed and started
//!    again on the same data directory.
//!
//! **Invariant:** a reading counts as lost only if the gateway acknowledged it to its sensor
//! (PUBACK) and it never reached the upstream; the fleet drops unacknowledged readings from
//! its books (`fleet` module docs), and the upstream never goes away, so every loss is the
//! gateway's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::QoS;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::flaky::{LinkShaping, run_switched_link};
use crate::fleet::{FleetConfig, FleetProgress, FleetSummary, run_fleet_held, run_fleet_with_progress};
use crate::harness::pki::{Leaf, TestCa, mosquitto_tls_listener};
use crate::harness::{free_addr, wait_until};
use crate::process::ProcessStats;
use crate::systems::{Gateway, GatewayKind, GatewaySpec, start_upstream_mosquitto_with};
use crate::verify::{Subscriber, VerifyReport, start_subscriber};

/// What to compare and how hard.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// The gateways to run, in order.
    pub kinds: Vec<GatewayKind>,
    /// The `outpost` executable.
    pub outpost: PathBuf,
    /// The `mosquitto` executable (edge bridge and upstream).
    pub mosquitto: PathBuf,
    /// A config file for Outpost instead of the generated one.
    pub outpost_config: Option<PathBuf>,
    /// Sensors (MQTT connections) of the fleet.
    pub sensors: usize,
    /// Payload size in bytes (JSON).
    pub payload_size: usize,
    /// Phase 1: total rates in events/s.
    pub rates: Vec<u32>,
    /// Phase 1: how long each rate runs.
    pub step: Duration,
    /// Phases 2 and 3: the steady rate, in events/s.
    pub outage_rate: u32,
    /// Phases 2 and 3: publishing before the link goes down.
    pub lead_in: Duration,
    /// Phases 2 and 3: how long the link stays down.
    pub outage: Duration,
    /// How long to wait for every acknowledged reading after publishing stopped.
    pub drain_timeout: Duration,
    /// Mosquitto's `autosave_interval`.
    pub autosave: Duration,
    /// Run phases 2 and 3.
    pub outage_phases: bool,
    /// Run each gateway twice: over plain TCP to the upstream, then over TLS (a test CA
    /// made for the run, the upstream mosquitto with a TLS listener).
    pub tls: bool,
    /// Where logs, configs and data go; a temporary directory if unset.
    pub work_dir: Option<PathBuf>,
}

/// The outcome of one rate step.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// The rate asked of the fleet, events/s.
    pub target_rate: u32,
    /// What the fleet handed to its MQTT clients, per second of the step.
    pub offered_per_s: f64,
    /// Distinct readings that reached the upstream within the step, per second.
    pub delivered_per_s: f64,
    /// Readings the gateway acknowledged.
    pub acked: u64,
    /// Acknowledged readings that never arrived (within the drain timeout).
    pub missing: u64,
    /// How long after the step the last reading arrived, in s.
    pub catch_up_s: f64,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    /// Gateway CPU time per delivered reading, in µs (step plus catch-up).
    pub cpu_us_per_event: Option<f64>,
    /// The kernel's part of `cpu_us_per_event`, in µs.
    pub sys_us_per_event: Option<f64>,
    /// Gateway CPU use during the step, in % of one core.
    pub cpu_percent: f64,
    /// Gateway resident memory at the end of the step, in KiB.
    pub rss_kib: u64,
}

impl StepResult {
    /// Sustained: at least 95 % of the target delivered within the step, nothing lost, caught up
    /// within a second.
    pub fn sustained(&self) -> bool {
        self.delivered_per_s >= 0.95 * f64::from(self.target_rate)
            && self.missing == 0
            && self.catch_up_s <= 1.0
    }
}

/// The outcome of an outage (or crash) phase.
#[derive(Debug, Clone, Serialize)]
pub struct OutageResult {
    /// Readings the gateway acknowledged.
    pub acked: u64,
    /// Acknowledged readings that never arrived within the drain timeout.
    pub lost: u64,
    /// Readings that arrived more than once.
    pub duplicates: u64,
    /// Link up → the first reading arrived (reconnect delay), in s.
    pub first_after_s: Option<f64>,
    /// Link up → the last reading arrived, in s; `None` if none arrived after the link came up.
    pub drain_s: Option<f64>,
    /// Whether every acknowledged reading arrived (else the drain ended in silence or timeout).
    pub complete: bool,
    /// The gateway's peak resident memory during the phase (the restarted process's, after a
    /// crash), in KiB.
    pub peak_rss_kib: u64,
}

/// Everything measured for one gateway.
#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    pub gateway: &'static str,
    pub steps: Vec<StepResult>,
    pub outage: Option<OutageResult>,
    pub crash: Option<OutageResult>,
}

impl SystemResult {
    /// The highest target rate that was sustained.
    pub fn highest_sustained(&self) -> Option<u32> {
        self.steps.iter().filter(|step| step.sustained()).map(|step| step.target_rate).max()
    }
}

/// The full comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub machine: String,
    pub sensors: usize,
    pub payload_size: usize,
    pub outage_rate: u32,
    pub outage_s: f64,
    pub systems: Vec<SystemResult>,
}

/// Runs the comparison, printing progress to stderr.
pub async fn run_compare(cfg: CompareConfig, cancel: CancellationToken) -> anyhow::Result<CompareReport> {
    if cfg.sensors == 0 || cfg.rates.iter().chain([&cfg.outage_rate]).any(|&rate| rate == 0) {
        anyhow::bail!("`sensors` and every rate must be above 0");
    }
    let temp;
    let work_dir = match &cfg.work_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("outpost-compare-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let mut systems = Vec::new();
    let transports: &[bool] = if cfg.tls { &[false, true] } else { &[false] };
    for &kind in &cfg.kinds {
        for &tls in transports {
            let name = system_name(kind, tls);
            let system_dir = work_dir.join(name);
            let run = run_system(&cfg, kind, tls, &system_dir);
            let result = tokio::select! {
                () = cancel.cancelled() => anyhow::bail!("interrupted"),
                result = run => result.with_context(|| format!("the {name} run failed (logs in {})", work_dir.display()))?,
            };
            systems.push(result);
        }
    }
    Ok(CompareReport {
        machine: machine_description(),
        sensors: cfg.sensors,
        payload_size: cfg.payload_size,
        outage_rate: cfg.outage_rate,
        outage_s: cfg.outage.as_secs_f64(),
        systems,
    })
}

/// A system's name in the table: the gateway, and `+tls` when its upstream link is TLS.
fn system_name(kind: GatewayKind, tls: bool) -> &'static str {
    match (kind, tls) {
        (GatewayKind::Outpost, false) => "outpost",
        (GatewayKind::Outpost, true) => "outpost+tls",
        (GatewayKind::MosquittoBridge, false) => "mosquitto-bridge",
        (GatewayKind::MosquittoBridge, true) => "mosquitto-bridge+tls",
    }
}

/// All phases for one gateway kind. With `tls` the upstream mosquitto gets a TLS listener
/// (a certificate for localhost from a CA made here) and the gateway is pointed at it; the
/// verifier still reads the plain listener.
async fn run_system(
    cfg: &CompareConfig,
    kind: GatewayKind,
    tls: bool,
    dir: &std::path::Path,
) -> anyhow::Result<SystemResult> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let upstream_addr = free_addr()?;
    let (gateway_upstream, tls_ca, extra) = if tls {
        let ca = TestCa::new("outpost-sim compare CA")?;
        let ca_file = dir.join("upstream-ca.pem");
        ca.write_cert(&ca_file)?;
        let server = ca.issue(&Leaf::server())?.write(dir, "upstream-server")?;
        let tls_addr = free_addr()?;
        let listener = mosquitto_tls_listener(tls_addr.port(), &ca_file, &server, false);
        (tls_addr, Some(ca_file), listener)
    } else {
        (upstream_addr, None, String::new())
    };
    let _upstream = start_upstream_mosquitto_with(&cfg.mosquitto, upstream_addr, dir, &extra).await?;
    let name = system_name(kind, tls);
    let spec = |phase: &str, upstream: SocketAddr| -> anyhow::Result<GatewaySpec> {
        Ok(GatewaySpec {
            kind,
            binary: match kind {
                GatewayKind::Outpost => cfg.outpost.clone(),
                GatewayKind::MosquittoBridge => cfg.mosquitto.clone(),
            },
            listen: free_addr()?,
            upstream,
            dir: dir.join(phase),
            outpost_config: cfg.outpost_config.clone(),
            rules: None,
            autosave: cfg.autosave,
            tls_ca: tls_ca.clone(),
        })
    };

    eprintln!("== {name}: rate steps");
    let mut gateway = Gateway::start(spec("steps", gateway_upstream)?).await?;
    let mut steps = Vec::new();
    for &rate in &cfg.rates {
        let step = run_step(cfg, &mut gateway, upstream_addr, rate).await?;
        eprintln!(
            "   {:>6}/s: offered {:.0}/s delivered {:.0}/s, p50 {} p99 {} ms, {} µs/event ({} in the kernel), CPU {:.0} %, RSS {:.1} MiB, missing {}",
            rate,
            step.offered_per_s,
            step.delivered_per_s,
            fmt_ms(step.latency_ms_p50),
            fmt_ms(step.latency_ms_p99),
            step.cpu_us_per_event.map_or("-".to_string(), |us| format!("{us:.1}")),
            step.sys_us_per_event.map_or("-".to_string(), |us| format!("{us:.1}")),
            step.cpu_percent,
            step.rss_kib as f64 / 1024.0,
            step.missing,
        );
        steps.push(step);
    }
    drop(gateway);

    let (mut outage, mut crash) = (None, None);
    if cfg.outage_phases {
        for crash_it in [false, true] {
            let phase = if crash_it { "crash" } else { "outage" };
            eprintln!("== {name}: {phase}");
            let result = run_outage(cfg, upstream_addr, spec(phase, gateway_upstream)?, crash_it).await?;
            eprintln!(
                "   acked {} lost {} duplicates {} first after {} drain {} peak RSS {:.1} MiB",
                result.acked,
                result.lost,
                result.duplicates,
                result.first_after_s.map_or("-".to_string(), |s| format!("{s:.2} s")),
                result.drain_s.map_or("-".to_string(), |s| format!("{s:.2} s")),
                result.peak_rss_kib as f64 / 1024.0
            );
            if crash_it {
                crash = Some(result);
            } else {
                outage = Some(result);
            }
        }
    }
    Ok(SystemResult { gateway: name, steps, outage, crash })
}

/// How long a step's fleet may take to connect.
const STEP_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// From the last sensor's CONNACK to the start of a step's measurement: the readings the fleet
/// queued while it connected are flushed and the gateway's per-connection start-up is done.
const STEP_SETTLE: Duration = Duration::from_secs(2);

/// One rate step on a running gateway (the module's doc says what it measures).
async fn run_step(
    cfg: &CompareConfig,
    gateway: &mut Gateway,
    upstream: SocketAddr,
    rate: u32,
) -> anyhow::Result<StepResult> {
    let mut subscriber = start_subscriber(&upstream.to_string(), "#").await?;
    // The duration only bounds a fleet whose step went wrong; the step stops it by token.
    let longest = STEP_CONNECT_TIMEOUT + STEP_SETTLE + cfg.step + cfg.drain_timeout;
    let fleet = fleet_config(cfg, gateway.spec().listen, rate, longest, &format!("r{rate}-"));
    let progress = Arc::new(FleetProgress::default());
    let (stop_fleet, stop_publishing) = (CancellationToken::new(), CancellationToken::new());
    // Dropped on an early return: the sensors then leave.
    let _stop_fleet = stop_fleet.clone().drop_guard();
    let fleet = tokio::spawn(run_fleet_held(
        fleet,
        stop_fleet.clone(),
        Arc::clone(&progress),
        stop_publishing.clone(),
    ));
    let sensors = cfg.sensors as u64;
    wait_until(&format!("all {sensors} sensors connected"), STEP_CONNECT_TIMEOUT, || {
        progress.connected() >= sensors
    })
    .await?;
    // Pacing the start of the measurement, not waiting for an event.
    tokio::time::sleep(STEP_SETTLE).await;
    let edge = |gateway: &Gateway, subscriber: &Subscriber| -> anyhow::Result<StepEdge> {
        let stats = gateway.stats()?;
        Ok(StepEdge {
            at: Instant::now(),
            cpu: stats.cpu,
            sys: stats.sys,
            sent: progress.sent(),
            delivered: subscriber.unique_count(),
        })
    };
    let start = edge(gateway, &subscriber)?;
    // Pacing the measurement window, not waiting for an event.
    tokio::time::sleep(cfg.step).await;
    stop_publishing.cancel();
    let window_end = edge(gateway, &subscriber)?;
    let rss_kib = gateway.stats()?.rss_kib;
    let caught_up = wait_until("the step's readings acknowledged and delivered", cfg.drain_timeout, || {
        let acked = progress.acked();
        acked >= progress.sent() && subscriber.unique_count() >= acked
    })
    .await;
    let end = edge(gateway, &subscriber)?;
    if let Err(error) = caught_up {
        eprintln!("   {error:#}; the step's figures end there");
    }
    stop_fleet.cancel();
    let summary = fleet.await.context("the fleet task panicked")??;
    gateway.check_running()?;
    let report = wait_delivered(&mut subscriber, &summary, cfg.drain_timeout).await.report;
    let figures = step_figures(&start, &window_end, &end);
    let latency = subscriber.latency_ms_of(start.delivered..end.delivered);
    Ok(StepResult {
        target_rate: rate,
        offered_per_s: figures.offered_per_s,
        delivered_per_s: figures.delivered_per_s,
        acked: summary.acked,
        missing: report.missing,
        catch_up_s: figures.catch_up_s,
        latency_ms_p50: latency.0,
        latency_ms_p99: latency.1,
        cpu_us_per_event: figures.cpu_us_per_event,
        sys_us_per_event: figures.sys_us_per_event,
        cpu_percent: figures.cpu_percent,
        rss_kib,
    })
}

/// The counters at one edge of a step's measurement.
#[derive(Debug, Clone, Copy)]
struct StepEdge {
    at: Instant,
    /// The gateway's CPU time, and its kernel part.
    cpu: Duration,
    sys: Duration,
    /// Readings the fleet handed to its clients.
    sent: u64,
    /// Distinct readings at the verifier.
    delivered: u64,
}

/// A step's figures from its edges: the measurement's start, the end of its `step` seconds
/// and the end of the catch-up.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StepFigures {
    offered_per_s: f64,
    delivered_per_s: f64,
    /// From the start to the end of the catch-up, per reading delivered in that span.
    cpu_us_per_event: Option<f64>,
    sys_us_per_event: Option<f64>,
    /// Over the `step` seconds, % of one core.
    cpu_percent: f64,
    catch_up_s: f64,
}

fn step_figures(start: &StepEdge, window_end: &StepEdge, end: &StepEdge) -> StepFigures {
    let window = window_end.at.saturating_duration_since(start.at).as_secs_f64();
    let delivered = end.delivered.saturating_sub(start.delivered);
    let per_event = |from: Duration, to: Duration| {
        (delivered > 0).then(|| to.saturating_sub(from).as_secs_f64() * 1e6 / delivered as f64)
    };
    StepFigures {
        offered_per_s: window_end.sent.saturating_sub(start.sent) as f64 / window,
        delivered_per_s: window_end.delivered.saturating_sub(start.delivered) as f64 / window,
        cpu_us_per_event: per_event(start.cpu, end.cpu),
        sys_us_per_event: per_event(start.sys, end.sys),
        cpu_percent: window_end.cpu.saturating_sub(start.cpu).as_secs_f64() / window * 100.0,
        catch_up_s: end.at.saturating_duration_since(window_end.at).as_secs_f64(),
    }
}

/// An outage phase on a fresh gateway behind a switched link; with `crash`, the gateway is
/// SIGKILLed halfway through the outage and started again.
/// `upstream` is where the verifier subscribes; the link leads to `spec.upstream` (the same
/// broker, its TLS listener with `--tls`).
async fn run_outage(
    cfg: &CompareConfig,
    upstream: SocketAddr,
    mut spec: GatewaySpec,
    crash: bool,
) -> anyhow::Result<OutageResult> {
    let link_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind the link")?;
    let link_addr = link_listener.local_addr().context("cannot read the link's address")?;
    let (switch, up) = watch::channel(true);
    let stop_link = CancellationToken::new();
    let _stop_link = stop_link.clone().drop_guard();
    tokio::spawn(run_switched_link(link_listener, spec.upstream, up, LinkShaping::default(), stop_link));
    spec.upstream = link_addr;
    let mut gateway = Gateway::start(spec).await?;

    let mut subscriber = start_subscriber(&upstream.to_string(), "#").await?;
    let prefix = if crash { "crash-" } else { "outage-" };
    let fleet = fleet_config(cfg, gateway.spec().listen, cfg.outage_rate, cfg.lead_in + cfg.outage, prefix);
    let fleet = tokio::spawn(run_fleet_with_progress(fleet, CancellationToken::new(), Arc::default()));
    let mut peak_rss_kib = 0;

    tokio::time::sleep(cfg.lead_in).await;
    switch.send_replace(false);
    let down_at = Instant::now();
    let kill_at = down_at + cfg.outage / 2;
    let mut killed = false;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    while down_at.elapsed() < cfg.outage {
        ticker.tick().await;
        if crash && !killed && Instant::now() >= kill_at {
            eprintln!("   SIGKILL {} and restart", gateway.spec().kind.name());
            gateway.kill()?;
            gateway.restart().await?;
            killed = true;
        }
        if let Ok(stats) = gateway.stats() {
            peak_rss_kib = peak_rss_kib.max(stats.peak_rss_kib);
        }
    }
    // The fleet stops publishing when the outage ends; its books close before the link is back,
    // so the drain time below starts from a known set of acknowledged readings.
    let summary = fleet.await.context("the fleet task panicked")??;
    gateway.check_running()?;
    switch.send_replace(true);
    let up_at = Instant::now();
    let delivered = wait_delivered(&mut subscriber, &summary, cfg.drain_timeout).await;
    if let Ok(stats) = gateway.stats() {
        peak_rss_kib = peak_rss_kib.max(stats.peak_rss_kib);
    }
    Ok(OutageResult {
        acked: summary.acked,
        lost: delivered.report.missing,
        duplicates: delivered.report.duplicates,
        first_after_s: delivered.first_arrival.map(|at| at.saturating_duration_since(up_at).as_secs_f64()),
        drain_s: delivered.last_arrival.map(|at| at.saturating_duration_since(up_at).as_secs_f64()),
        complete: delivered.complete,
        peak_rss_kib,
    })
}

/// Readings still missing after this long without a new arrival are taken as lost. Both
/// gateways are configured to retry the upstream every second at most; a Mosquitto restarted
/// with a large persisted queue was seen taking several seconds more, so this is generous.
const QUIET_PERIOD: Duration = Duration::from_secs(15);

/// How a wait for the acknowledged readings ended.
pub(crate) struct Delivered {
    pub(crate) report: VerifyReport,
    /// When the first and the last new reading arrived (to within the 20 ms poll), if any did.
    first_arrival: Option<Instant>,
    last_arrival: Option<Instant>,
    /// Whether every acknowledged reading arrived.
    complete: bool,
}

/// Waits until every reading `expected` acknowledged arrived, or nothing new arrived for
/// `QUIET_PERIOD`, or `timeout` passed.
pub(crate) async fn wait_delivered(
    subscriber: &mut Subscriber,
    expected: &FleetSummary,
    timeout: Duration,
) -> Delivered {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut unique = subscriber.unique_count();
    let mut last_change = started;
    let (mut first_arrival, mut last_arrival) = (None, None);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let unique_now = subscriber.unique_count();
        if unique_now != unique {
            (unique, last_change, last_arrival) = (unique_now, now, Some(now));
            first_arrival.get_or_insert(now);
        }
        // Cheap test first; the full report only once enough distinct readings arrived.
        if unique >= expected.acked {
            let report = subscriber.report(Some(expected));
            if report.missing == 0 {
                let last_arrival = Some(last_arrival.unwrap_or(now));
                return Delivered { report, first_arrival, last_arrival, complete: true };
            }
        }
        if now >= deadline || now.saturating_duration_since(last_change) >= QUIET_PERIOD {
            let report = subscriber.report(Some(expected));
            return Delivered { report, first_arrival, last_arrival, complete: false };
        }
    }
}

fn fleet_config(
    cfg: &CompareConfig,
    broker: SocketAddr,
    rate: u32,
    duration: Duration,
    prefix: &str,
) -> FleetConfig {
    FleetConfig {
        broker: broker.to_string(),
        sensors: cfg.sensors,
        rate_per_sensor: f64::from(rate) / cfg.sensors as f64,
        duration: Some(duration),
        qos: QoS::AtLeastOnce,
        client_prefix: prefix.to_string(),
        payload_size: cfg.payload_size,
        ..FleetConfig::default()
    }
}

pub(crate) fn cpu_per_event(before: &ProcessStats, after: &ProcessStats, events: u64) -> Option<f64> {
    (events > 0).then(|| after.cpu.saturating_sub(before.cpu).as_secs_f64() * 1e6 / events as f64)
}

/// "first / last" arrival after the link came back; "never" when a time is unknown, and the
/// last marked "(incomplete)" when some acknowledged readings never arrived.
fn drain_cell(outage: &OutageResult) -> String {
    let secs = |value: Option<f64>| value.map_or_else(|| "never".to_string(), |s| format!("{s:.2}"));
    let suffix = if outage.complete { "" } else { " (incomplete)" };
    format!("{} / {}{suffix}", secs(outage.first_after_s), secs(outage.drain_s))
}

fn fmt_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}"))
}

/// CPU model, core count and kernel, for the table's header.
pub fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim())
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {model}, Linux {}", kernel.trim())
}

impl CompareReport {
    /// The side-by-side table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        let cell = |system: &SystemResult, f: &dyn Fn(&SystemResult) -> Option<String>| {
            f(system).unwrap_or_else(|| "-".to_string())
        };
        let mut row = |label: String, f: &dyn Fn(&SystemResult) -> Option<String>| {
            rows.push((label, self.systems.iter().map(|system| cell(system, f)).collect()));
        };
        let rates: Vec<u32> = self
            .systems
            .first()
            .map(|s| s.steps.iter().map(|step| step.target_rate).collect())
            .unwrap_or_default();
        for rate in rates {
            let step = move |system: &SystemResult| {
                system.steps.iter().find(|step| step.target_rate == rate).cloned()
            };
            row(format!("{rate}/s: delivered/s (offered)"), &|s| {
                step(s).map(|st| format!("{:.0} ({:.0})", st.delivered_per_s, st.offered_per_s))
            });
            row(format!("{rate}/s: latency p50 / p99 ms"), &|s| {
                step(s).map(|st| format!("{} / {}", fmt_ms(st.latency_ms_p50), fmt_ms(st.latency_ms_p99)))
            });
            row(format!("{rate}/s: CPU µs/event (% core)"), &|s| {
                step(s).map(|st| {
                    format!(
                        "{} ({:.0} %)",
                        st.cpu_us_per_event.map_or("-".to_string(), |us| format!("{us:.1}")),
                        st.cpu_percent
                    )
                })
            });
            row(format!("{rate}/s: of which kernel µs/event"), &|s| {
                step(s).map(|st| st.sys_us_per_event.map_or("-".to_string(), |us| format!("{us:.1}")))
            });
            row(format!("{rate}/s: RSS MiB"), &|s| {
                step(s).map(|st| format!("{:.1}", st.rss_kib as f64 / 1024.0))
            });
            row(format!("{rate}/s: missing"), &|s| step(s).map(|st| st.missing.to_string()));
        }
        row("highest sustained rate/s".to_string(), &|s| {
            let highest_tested = s.steps.iter().map(|step| step.target_rate).max();
            Some(match s.highest_sustained() {
                None => "none".to_string(),
                Some(rate) if Some(rate) == highest_tested => format!("≥ {rate}"),
                Some(rate) => rate.to_string(),
            })
        });
        let outage = format!("{:.0} s outage at {}/s", self.outage_s, self.outage_rate);
        row(format!("{outage}: lost (of acked)"), &|s| {
            s.outage.as_ref().map(|o| format!("{} (of {})", o.lost, o.acked))
        });
        row(format!("{outage}: first / all delivered s"), &|s| s.outage.as_ref().map(drain_cell));
        row(format!("{outage}: duplicates"), &|s| s.outage.as_ref().map(|o| o.duplicates.to_string()));
        row(format!("{outage}: peak RSS MiB"), &|s| {
            s.outage.as_ref().map(|o| format!("{:.1}", o.peak_rss_kib as f64 / 1024.0))
        });
        row("SIGKILL mid-outage: lost (of acked)".to_string(), &|s| {
            s.crash.as_ref().map(|o| format!("{} (of {})", o.lost, o.acked))
        });
        row("SIGKILL mid-outage: first / all delivered s".to_string(), &|s| s.crash.as_ref().map(drain_cell));

        let label_width = rows.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..self.systems.len())
            .map(|i| {
                rows.iter()
                    .map(|(_, cells)| cells.get(i).map_or(0, |c| c.chars().count()))
                    .chain([self.systems[i].gateway.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = format!(
            "{} sensors, QoS 1, {}-byte JSON; machine: {}\n",
            self.sensors, self.payload_size, self.machine
        );
        let pad = |text: &str, width: usize| {
            format!("{}{text}", " ".repeat(width.saturating_sub(text.chars().count())))
        };
        out.push_str(&format!("| {} |", pad("", label_width)));
        for (system, width) in self.systems.iter().zip(&widths) {
            out.push_str(&format!(" {} |", pad(system.gateway, *width)));
        }
        out.push('\n');
        out.push_str(&format!("| {} |", "-".repeat(label_width)));
        for width in &widths {
            out.push_str(&format!(" {}: |", "-".repeat(width.saturating_sub(1))));
        }
        out.push('\n');
        for (label, cells) in &rows {
            out.push_str(&format!("| {label}{} |", " ".repeat(label_width - label.chars().count())));
            for (cell, width) in cells.iter().zip(&widths) {
                out.push_str(&format!(" {} |", pad(cell, *width)));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(target_rate: u32, delivered_per_s: f64) -> StepResult {
        StepResult {
            target_rate,
            offered_per_s: f64::from(target_rate),
            delivered_per_s,
            acked: 100,
            missing: 0,
            catch_up_s: 0.1,
            latency_ms_p50: Some(0.5),
            latency_ms_p99: Some(1.5),
            cpu_us_per_event: Some(10.0),
            sys_us_per_event: Some(6.0),
            cpu_percent: 20.0,
            rss_kib: 20_480,
        }
    }

    #[test]
    fn a_step_counts_cpu_and_events_from_its_start_to_the_end_of_the_catch_up() {
        let at = Instant::now();
        let edge = |secs: f64, cpu_ms: u64, sys_ms: u64, sent: u64, delivered: u64| StepEdge {
            at: at + Duration::from_secs_f64(secs),
            cpu: Duration::from_millis(cpu_ms),
            sys: Duration::from_millis(sys_ms),
            sent,
            delivered,
        };
        // Connecting cost 5 s of CPU and 3,000 readings before the start: neither counts.
        let start = edge(0.0, 5_000, 3_000, 3_000, 2_990);
        let window_end = edge(10.0, 5_400, 3_200, 13_000, 12_790);
        let end = edge(10.5, 5_440, 3_220, 13_000, 13_000);
        let figures = step_figures(&start, &window_end, &end);
        assert_eq!(figures.offered_per_s, 1_000.0);
        assert_eq!(figures.delivered_per_s, 980.0);
        // 440 ms over the 10,010 readings delivered from the start to the catch-up's end.
        assert!((figures.cpu_us_per_event.expect("delivered") - 440_000.0 / 10_010.0).abs() < 1e-9);
        assert!((figures.sys_us_per_event.expect("delivered") - 220_000.0 / 10_010.0).abs() < 1e-9);
        assert!((figures.cpu_percent - 4.0).abs() < 1e-9);
        assert!((figures.catch_up_s - 0.5).abs() < 1e-9);
        let nothing = step_figures(&start, &start, &start);
        assert_eq!((nothing.cpu_us_per_event, nothing.sys_us_per_event), (None, None));
    }

    #[test]
    fn highest_sustained_rate_needs_95_percent_delivered() {
        let system = SystemResult {
            gateway: "x",
            steps: vec![step(1000, 1000.0), step(2000, 1960.0), step(4000, 3000.0)],
            outage: None,
            crash: None,
        };
        assert_eq!(system.highest_sustained(), Some(2000));
    }

    #[test]
    fn table_has_one_column_per_system() {
        let report = CompareReport {
            machine: "test".to_string(),
            sensors: 100,
            payload_size: 200,
            outage_rate: 2000,
            outage_s: 30.0,
            systems: vec![
                SystemResult {
                    gateway: "outpost",
                    steps: vec![step(1000, 1000.0)],
                    outage: None,
                    crash: None,
                },
                SystemResult {
                    gateway: "mosquitto-bridge",
                    steps: vec![step(1000, 990.0)],
                    outage: None,
                    crash: None,
                },
            ],
        };
        let table = report.table();
        let header: Vec<&str> = table.lines().nth(1).unwrap_or_default().split('|').map(str::trim).collect();
        assert_eq!(header, ["", "", "outpost", "mosquitto-bridge", ""], "{table}");
        assert!(table.contains("1000/s: latency p50 / p99 ms"), "{table}");
        assert!(table.lines().skip(1).all(|line| line.starts_with('|') && line.ends_with('|')), "{table}");
    }
}
