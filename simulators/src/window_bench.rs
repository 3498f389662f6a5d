//! `window-bench`: what a windowed rule costs in the real gateway (issue #15): `devices`
//! sensors × 1 reading/s (QoS 1, `broker.ack` = `after_commit`) through one rule per phase,
//! each phase on a fresh `outpost` process and data directory, one upstream Mosquitto:
//!
//! - `no-rules`: no rules file, every reading forwarded by the routes;
//! - `forward`: `SELECT * FROM "sensors/+/temp"`, forwarded: every reading upstream, the
//!   baseline;
//! - `sample`: one reading in ten (`payload.seq % 10 = 0`) forwarded as a message shaped like
//!   the window's output, stateless: as many messages upstream as `window`, so the difference
//!   between the two is the window's state and checkpoints, not the relay's traffic;
//! - `window`: a per-device 10 s tumbling average (`GROUP BY topic(2), TUMBLINGWINDOW(ss,
//!   10)`);
//! - `deadband`: `WHERE deadband(payload.value, 0.5)` per device (report by exception on the
//!   fleet's random walk).
//!
//! After `warmup` (the fleet connected, then at least one whole window, so every group is
//! open and checkpointed), one
//! window of `duration` is measured: readings acknowledged (PUBACK) in it, the gateway's CPU
//! time (`utime + stime`, all threads), bytes it caused to be written to storage (`write_bytes`
//! of `/proc/PID/io`), its own `outpost_window_checkpoint_bytes_total`,
//! `outpost_window_checkpoints_total` and (since buffer format 9's deltas)
//! `outpost_window_checkpoints_full_total`, its RSS at the end, and the messages and bytes (topic +
//! payload) a subscriber at the upstream received. The gateway's RSS beyond the `forward`
//! phase's, divided by `devices`, is the memory per group (allocator slack included; the rules
//! crate's `window` bench counts the heap alone).
//!
//! The fleet, the subscriber and Mosquitto share the machine with the gateway, so the table
//! shows their CPU use too.
//!
//! # Rounds and paired differences
//! On a shared 2-core machine one phase's CPU per reading moves by several µs between runs
//! of the same build, more than the ≤ 1 µs a window may add. So `rounds` repeats the phases
//! (round 2 in the reverse order, round 3 in the given order again, …, which cancels a drift
//! that is linear in time) and the excess of each phase over `forward` is taken within a
//! round, where both ran minutes apart instead of tens of minutes; the report gives each
//! round's difference, their median and their spread.
//!
//! # Storage: `write_bytes` is not what reaches the disk
//! With `perf` at hand the bench also records the gateway's storage system calls during the
//! measured window ([`crate::storage_calls`], which says why `write_bytes` overstates) and
//! reports the bytes redb handed the kernel, the syncs (one per durable commit) and their
//! ratio: the bytes per commit. `perf stat`'s instruction count would be the least noisy
//! CPU figure, but virtual machines often have no hardware counters (this one reports `<not
//! supported>`), so the bench does not depend on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::QoS;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::compare::{cpu_per_event, machine_description};
use crate::fleet::{FleetConfig, FleetProgress, run_fleet_with_progress};
use crate::harness::free_addr;
use crate::ingest_bench::{AckMode, gateway_config, scrape_counter, scrape_histogram, write_bytes};
use crate::process::{ChildProcess, ProcessStats};
use crate::storage_calls::{Recording, StorageCalls, monotonic_now, perf_works};
use crate::systems::{Gateway, GatewayKind, GatewaySpec, start_upstream_mosquitto};
use crate::verify::{Message, Subscriber, SubscriberOptions};

/// One phase's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No rules file: the gateway forwards every reading by its routes.
    NoRules,
    Forward,
    /// Stateless, one reading in ten: the baseline with the window's upstream traffic.
    Sample,
    Window,
    Deadband,
}

impl Phase {
    pub const ALL: [Phase; 5] =
        [Phase::NoRules, Phase::Forward, Phase::Sample, Phase::Window, Phase::Deadband];

    /// The phases the others are paired with, in the report.
    const BASELINES: [Phase; 2] = [Phase::Forward, Phase::Sample];

    pub fn name(self) -> &'static str {
        match self {
            Phase::NoRules => "no-rules",
            Phase::Forward => "forward",
            Phase::Sample => "sample",
            Phase::Window => "window",
            Phase::Deadband => "deadband",
        }
    }

    /// The phase's rules file.
    fn rules(self) -> Option<&'static str> {
        Some(match self {
            Phase::NoRules => return None,
            Phase::Forward => {
                "[[rule]]\nname = \"all\"\nsql = '''SELECT * FROM \"sensors/+/temp\"'''\n[[rule.action]]\ntype = \"forward\"\n"
            }
            Phase::Sample => {
                "[[rule]]\nname = \"sample\"\nsql = '''\nSELECT topic(2) AS device, payload.value AS avg, 1 AS n, payload.ts_ms AS at\nFROM \"sensors/+/temp\"\nWHERE payload.seq % 10 = 0\n'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"avg/${device}\"\n"
            }
            Phase::Window => {
                "[[rule]]\nname = \"avg\"\nsql = '''\nSELECT topic(2) AS device, avg(payload.value) AS avg, count(*) AS n, window_end() AS at\nFROM \"sensors/+/temp\"\nGROUP BY topic(2), TUMBLINGWINDOW(ss, 10)\n'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"avg/${device}\"\n"
            }
            Phase::Deadband => {
                "[[rule]]\nname = \"db\"\nsql = '''SELECT * FROM \"sensors/+/temp\" WHERE deadband(payload.value, 0.5)'''\n[[rule.action]]\ntype = \"forward\"\n"
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct WindowBenchConfig {
    pub command: String,
    pub outpost: PathBuf,
    pub mosquitto: PathBuf,
    pub devices: usize,
    pub payload_size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub phases: Vec<Phase>,
    /// How many times the phases run (see the module's doc).
    pub rounds: usize,
    /// The `perf` executable for the storage system calls, or `None` to leave them out.
    pub perf: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
    /// The gateway's `buffer.commit_interval`, or `None` for its default.
    pub commit_interval: Option<Duration>,
    /// The gateway's `buffer.max_ack_delay` (the least time between two checkpoints), or
    /// `None` for its default.
    pub max_ack_delay: Option<Duration>,
}

/// One measured phase.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub phase: Phase,
    /// The round it ran in, from 1.
    pub round: usize,
    pub acked_per_s: f64,
    pub cpu_us_per_event: Option<f64>,
    pub gateway_cpu_percent: f64,
    pub sim_cpu_percent: f64,
    pub upstream_cpu_percent: f64,
    /// `/proc/PID/io` `write_bytes` per second.
    pub written_per_s: f64,
    /// The gateway's storage system calls, per second (`perf` only).
    pub syscalls: Option<StorageCalls>,
    /// The gateway's own `outpost_window_checkpoint_bytes_total`, per second.
    pub checkpoint_bytes_per_s: f64,
    pub checkpoints_per_s: f64,
    /// Of those, the ones that wrote a full snapshot; `None` from a gateway that writes
    /// nothing else (it has no such counter).
    pub full_checkpoints_per_s: Option<f64>,
    pub rss_kib: u64,
    /// Messages and bytes (topic + payload) that reached the upstream subscriber, per second.
    pub upstream_msgs_per_s: f64,
    pub upstream_bytes_per_s: f64,
    /// Readings (topic + payload bytes) the fleet offered, per second.
    pub offered_bytes_per_s: f64,
    /// How long the gateway held the PUBACKs it sent in the window, from its own histogram;
    /// `None` from a gateway without one.
    pub puback_hold: Option<Hold>,
}

/// PUBACK hold times in a measured window (`outpost_puback_hold_seconds`), in milliseconds.
/// The quantiles are bucket bounds: the bucket the quantile falls in (0.1, 0.25, 0.5 s …).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hold {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Hold {
    fn cell(hold: Option<Hold>) -> String {
        hold.map_or_else(
            || "-".to_owned(),
            |h| format!("{:.1} / ≤ {} / ≤ {}", h.mean_ms, bound(h.p50_ms), bound(h.p99_ms)),
        )
    }
}

/// A bucket bound in milliseconds: `+Inf` as `∞`.
fn bound(ms: f64) -> String {
    if ms.is_finite() { format!("{ms}") } else { "∞".to_owned() }
}

pub struct WindowBenchReport {
    pub command: String,
    pub machine: String,
    pub devices: usize,
    pub duration: Duration,
    pub rounds: usize,
    /// In the order they ran.
    pub phases: Vec<PhaseResult>,
    /// Why the storage system calls are missing, when they are.
    pub perf_note: Option<String>,
}

/// Counts what reaches the upstream subscriber.
#[derive(Default)]
struct Arrivals {
    messages: AtomicU64,
    bytes: AtomicU64,
}

pub async fn run_window_bench(
    cfg: WindowBenchConfig,
    cancel: CancellationToken,
) -> anyhow::Result<WindowBenchReport> {
    if cfg.devices == 0 || cfg.phases.is_empty() || cfg.rounds == 0 {
        anyhow::bail!("--devices, --phases and --rounds must not be empty or zero");
    }
    let temp;
    let dir = match &cfg.work_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("cannot create a temporary directory")?;
            temp.path().to_owned()
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let upstream_addr = free_addr()?;
    let upstream = start_upstream_mosquitto(&cfg.mosquitto, upstream_addr, &dir).await?;
    let mut perf_note = match &cfg.perf {
        None => Some("not asked for (--no-perf)".to_owned()),
        Some(perf) => perf_works(perf).await.err().map(|e| format!("{e:#}")),
    };
    let perf = if perf_note.is_none() { cfg.perf.as_deref() } else { None };
    let mut phases = Vec::new();
    for round in 1..=cfg.rounds {
        for phase in round_order(&cfg.phases, round) {
            eprintln!(
                "== round {round}/{}, {}: {} devices × 1/s, warm-up {:?}, measured {:?}",
                cfg.rounds,
                phase.name(),
                cfg.devices,
                cfg.warmup,
                cfg.duration
            );
            let result = tokio::select! {
                () = cancel.cancelled() => anyhow::bail!("cancelled"),
                result = measure(&cfg, phase, round, perf, &dir, &upstream, upstream_addr) => result?,
            };
            if perf.is_some() && result.syscalls.is_none() && perf_note.is_none() {
                perf_note =
                    Some(format!("perf failed in round {round}, {} (its error is above)", phase.name()));
            }
            eprintln!(
                "   {:.0} acked/s, {} µs CPU per event, {:.0} B/s write_bytes, {} B/s pwrite, {} syncs/s ({:.0} B/s checkpoints), {:.1} msgs/s upstream",
                result.acked_per_s,
                fmt(result.cpu_us_per_event, 2),
                result.written_per_s,
                fmt(result.syscalls.map(|c| c.pwrite_bytes), 0),
                fmt(result.syscalls.map(|c| c.syncs), 1),
                result.checkpoint_bytes_per_s,
                result.upstream_msgs_per_s
            );
            phases.push(result);
        }
    }
    Ok(WindowBenchReport {
        command: cfg.command.clone(),
        machine: machine_description(),
        devices: cfg.devices,
        duration: cfg.duration,
        rounds: cfg.rounds,
        phases,
        perf_note,
    })
}

/// The phases of round `round` (from 1): as given in odd rounds, reversed in even ones.
fn round_order(phases: &[Phase], round: usize) -> Vec<Phase> {
    let mut order = phases.to_vec();
    if round % 2 == 0 {
        order.reverse();
    }
    order
}

async fn measure(
    cfg: &WindowBenchConfig,
    phase: Phase,
    round: usize,
    perf: Option<&Path>,
    dir: &Path,
    upstream: &ChildProcess,
    upstream_addr: SocketAddr,
) -> anyhow::Result<PhaseResult> {
    let dir = dir.join(format!("{}-{round}", phase.name()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let metrics = free_addr()?;
    let mut config = gateway_config(upstream_addr, Some(AckMode::AfterCommit), cfg.devices);
    config.push_str(&format!("\n[http]\nlisten = \"{metrics}\"\n"));
    if cfg.commit_interval.is_some() || cfg.max_ack_delay.is_some() {
        config.push_str("\n[buffer]\n");
    }
    for (key, value) in [("commit_interval", cfg.commit_interval), ("max_ack_delay", cfg.max_ack_delay)] {
        if let Some(value) = value {
            config.push_str(&format!("{key} = \"{}ms\"\n", value.as_millis()));
        }
    }
    let config_path = dir.join("outpost.toml");
    std::fs::write(&config_path, config)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let rules_path = match phase.rules() {
        Some(rules) => {
            let path = dir.join("rules.toml");
            std::fs::write(&path, rules).with_context(|| format!("cannot write {}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    let spec = GatewaySpec {
        kind: GatewayKind::Outpost,
        binary: cfg.outpost.clone(),
        listen: free_addr()?,
        upstream: upstream_addr,
        dir: dir.clone(),
        outpost_config: Some(config_path),
        rules: rules_path,
        tls_ca: None,
        autosave: Duration::from_secs(1),
    };
    let mut gateway = Gateway::start(spec).await.context("cannot start the gateway")?;

    let arrivals = Arc::new(Arrivals::default());
    let counted = Arc::clone(&arrivals);
    let options = SubscriberOptions {
        keep: 0,
        verify: false,
        on_message: Some(Arc::new(move |m: &Message| {
            counted.messages.fetch_add(1, Ordering::Relaxed);
            counted.bytes.fetch_add((m.topic.len() + m.payload.len()) as u64, Ordering::Relaxed);
        })),
        ..SubscriberOptions::default()
    };
    let _subscriber = Subscriber::start_with(upstream_addr, "#", options).await?;
    let fleet = FleetConfig {
        broker: gateway.spec().listen.to_string(),
        sensors: cfg.devices,
        rate_per_sensor: 1.0,
        duration: Some(cfg.warmup + cfg.duration + Duration::from_secs(1)),
        qos: QoS::AtLeastOnce,
        // Four letters per phase and round, so the topics (and the bytes offered) have one length.
        client_prefix: format!("{}{round:02}-", &phase.name()[..2]),
        payload_size: cfg.payload_size,
        ..FleetConfig::default()
    };
    let progress = Arc::new(FleetProgress::default());
    let pid = gateway.pid()?;
    // Before the load: attaching perf stalls the gateway (`storage_calls` module docs).
    let recording = match perf {
        Some(perf) => {
            let mut recording = Recording::start(perf, pid, &dir)?;
            recording.ready().await?;
            Some(recording)
        }
        None => None,
    };
    let fleet = tokio::spawn(run_fleet_with_progress(fleet, CancellationToken::new(), Arc::clone(&progress)));

    // Pacing the measurement window, not waiting for an event.
    tokio::time::sleep(cfg.warmup).await;
    let take = || -> anyhow::Result<Edge> {
        Ok(Edge {
            at: Instant::now(),
            sent: progress.sent(),
            acked: progress.acked(),
            gateway: gateway.stats()?,
            sim: ProcessStats::read(std::process::id())?,
            upstream: upstream.stats()?,
            arrived: arrivals.messages.load(Ordering::Relaxed),
            arrived_bytes: arrivals.bytes.load(Ordering::Relaxed),
        })
    };
    const HOLD: &str = "outpost_puback_hold_seconds";
    let hold0 = scrape_histogram(metrics, HOLD).await.ok();
    let (written0, ck_bytes0, cks0, full0) = (
        write_bytes(pid)?,
        scrape_counter(metrics, "outpost_window_checkpoint_bytes_total").await?,
        scrape_counter(metrics, "outpost_window_checkpoints_total").await?,
        scrape_counter(metrics, "outpost_window_checkpoints_full_total").await.ok(),
    );
    let start = take()?;
    let window_start = monotonic_now();
    tokio::time::sleep(cfg.duration).await;
    let end = take()?;
    let window_end = monotonic_now();
    let syscalls = match recording {
        Some(recording) => match recording.finish(window_start..window_end).await {
            Ok(counts) => Some(counts.per_second(end.at.duration_since(start.at).as_secs_f64())),
            Err(error) => {
                eprintln!("   perf: {error:#}");
                None
            }
        },
        None => None,
    };
    let hold1 = scrape_histogram(metrics, HOLD).await.ok();
    let (written1, ck_bytes1, cks1, full1) = (
        write_bytes(pid)?,
        scrape_counter(metrics, "outpost_window_checkpoint_bytes_total").await?,
        scrape_counter(metrics, "outpost_window_checkpoints_total").await?,
        scrape_counter(metrics, "outpost_window_checkpoints_full_total").await.ok(),
    );
    fleet.await.context("the fleet task panicked")??;
    gateway.check_running()?;

    let secs = end.at.duration_since(start.at).as_secs_f64();
    let percent =
        |a: &ProcessStats, b: &ProcessStats| b.cpu.saturating_sub(a.cpu).as_secs_f64() / secs * 100.0;
    let acked = end.acked - start.acked;
    // Each reading: `sensors/<prefix><4 digits>/temp` and a payload padded to `payload_size`.
    let topic_len = "sensors//temp".len() + 5 + 4;
    Ok(PhaseResult {
        phase,
        round,
        syscalls,
        acked_per_s: acked as f64 / secs,
        cpu_us_per_event: cpu_per_event(&start.gateway, &end.gateway, acked),
        gateway_cpu_percent: percent(&start.gateway, &end.gateway),
        sim_cpu_percent: percent(&start.sim, &end.sim),
        upstream_cpu_percent: percent(&start.upstream, &end.upstream),
        written_per_s: written1.saturating_sub(written0) as f64 / secs,
        checkpoint_bytes_per_s: ck_bytes1.saturating_sub(ck_bytes0) as f64 / secs,
        checkpoints_per_s: cks1.saturating_sub(cks0) as f64 / secs,
        full_checkpoints_per_s: full0.zip(full1).map(|(a, b)| b.saturating_sub(a) as f64 / secs),
        rss_kib: end.gateway.rss_kib,
        upstream_msgs_per_s: (end.arrived - start.arrived) as f64 / secs,
        upstream_bytes_per_s: (end.arrived_bytes - start.arrived_bytes) as f64 / secs,
        offered_bytes_per_s: (end.sent - start.sent) as f64 * (topic_len + cfg.payload_size) as f64 / secs,
        puback_hold: hold0.zip(hold1).and_then(|(a, b)| {
            let window = b.since(&a);
            Some(Hold {
                mean_ms: window.mean()? * 1e3,
                p50_ms: window.quantile_bound(0.5)? * 1e3,
                p99_ms: window.quantile_bound(0.99)? * 1e3,
            })
        }),
    })
}

/// The counters at one edge of the measured window.
struct Edge {
    at: Instant,
    sent: u64,
    acked: u64,
    gateway: ProcessStats,
    sim: ProcessStats,
    upstream: ProcessStats,
    arrived: u64,
    arrived_bytes: u64,
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

impl WindowBenchReport {
    /// The `baseline` phase of `round`.
    fn baseline(&self, round: usize, baseline: Phase) -> Option<&PhaseResult> {
        self.phases.iter().find(|p| p.round == round && p.phase == baseline)
    }

    /// Each round's excess of `phase`'s CPU per reading over that round's `baseline`.
    pub fn paired_excess(&self, phase: Phase, baseline: Phase) -> Vec<f64> {
        self.phases
            .iter()
            .filter(|p| p.phase == phase)
            .filter_map(|p| Some(p.cpu_us_per_event? - self.baseline(p.round, baseline)?.cpu_us_per_event?))
            .collect()
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "window-bench: {} devices × 1 reading/s, QoS 1, after_commit; measured {:?} per phase, {} round(s)\n{}\n`{}`\n\n",
            self.devices, self.duration, self.rounds, self.machine, self.command
        );
        out.push_str("| round | phase | acked/s | gateway µs CPU/event | + over forward | write_bytes B/s | pwrite B/s | syncs/s | pwrite B per sync | checkpoint B/s (checkpoints/s, of them full) | B per checkpoint | RSS MiB | RSS over forward per device | upstream msgs/s | reduction msgs / bytes | CPU % gateway / sim / mosquitto | PUBACK hold ms mean / p50 / p99 |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for p in &self.phases {
            let base = self.baseline(p.round, Phase::Forward).filter(|_| p.phase != Phase::Forward);
            let extra = base.and_then(|b| Some(p.cpu_us_per_event? - b.cpu_us_per_event?));
            let per_device =
                base.map(|b| (p.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / self.devices as f64);
            let per_checkpoint =
                (p.checkpoints_per_s > 0.0).then(|| p.checkpoint_bytes_per_s / p.checkpoints_per_s);
            let per_sync = p.syscalls.filter(|c| c.syncs > 0.0).map(|c| c.pwrite_bytes / c.syncs);
            let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.1}×", a / b) } else { "∞".to_string() };
            out.push_str(&format!(
                "| {} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {} | {:.0} ({:.1}, {}) | {} | {:.1} | {} | {:.1} | {} / {} | {:.0} / {:.0} / {:.0} | {} |\n",
                p.round,
                p.phase.name(),
                p.acked_per_s,
                fmt(p.cpu_us_per_event, 2),
                fmt(extra, 2),
                p.written_per_s,
                fmt(p.syscalls.map(|c| c.pwrite_bytes), 0),
                fmt(p.syscalls.map(|c| c.syncs), 1),
                fmt(per_sync, 0),
                p.checkpoint_bytes_per_s,
                p.checkpoints_per_s,
                fmt(p.full_checkpoints_per_s, 1),
                fmt(per_checkpoint, 0),
                p.rss_kib as f64 / 1024.0,
                fmt(per_device, 0),
                p.upstream_msgs_per_s,
                ratio(p.acked_per_s, p.upstream_msgs_per_s),
                ratio(p.offered_bytes_per_s, p.upstream_bytes_per_s),
                p.gateway_cpu_percent,
                p.sim_cpu_percent,
                p.upstream_cpu_percent,
                Hold::cell(p.puback_hold),
            ));
        }
        if let Some(note) = &self.perf_note {
            out.push_str(&format!("\npwrite and syncs: not measured ({note})\n"));
        }
        for baseline in Phase::BASELINES {
            let mut phases: Vec<Phase> = Vec::new();
            for p in &self.phases {
                if p.phase != baseline && p.phase != Phase::NoRules && !phases.contains(&p.phase) {
                    phases.push(p.phase);
                }
            }
            let own: Vec<f64> = self
                .phases
                .iter()
                .filter(|p| p.phase == baseline)
                .filter_map(|p| p.cpu_us_per_event)
                .collect();
            if own.is_empty() || phases.is_empty() {
                continue;
            }
            let name = baseline.name();
            out.push_str(&format!("\nµs CPU per reading over `{name}` in the same round (paired):\n\n"));
            out.push_str("| phase | per round | median | spread (max − min) |\n| --- | --- | --- | --- |\n");
            let row = |label: &str, values: &[f64]| {
                let listed: Vec<String> = values.iter().map(|v| format!("{v:+.2}")).collect();
                format!(
                    "| {label} | {} | {} | {} |\n",
                    listed.join(", "),
                    fmt(median(values), 2),
                    fmt(spread(values), 2)
                )
            };
            for &phase in &phases {
                out.push_str(&row(phase.name(), &self.paired_excess(phase, baseline)));
            }
            // The baseline's own movement between rounds: the noise the pairing removes.
            out.push_str(&row(&format!("`{name}` itself (µs, not paired)"), &own).replace('+', ""));
        }
        out
    }
}

/// The median of `values`; `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The largest minus the smallest of `values`; `None` when empty.
fn spread(values: &[f64]) -> Option<f64> {
    let max = values.iter().copied().reduce(f64::max)?;
    let min = values.iter().copied().reduce(f64::min)?;
    Some(max - min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(phase: Phase, round: usize, cpu: f64, rss_kib: u64, msgs: f64, bytes: f64) -> PhaseResult {
        PhaseResult {
            phase,
            round,
            acked_per_s: 10_000.0,
            cpu_us_per_event: Some(cpu),
            gateway_cpu_percent: 30.0,
            sim_cpu_percent: 20.0,
            upstream_cpu_percent: 5.0,
            written_per_s: 2_000_000.0,
            syscalls: Some(StorageCalls { pwrite_bytes: 3_000_000.0, pwrites: 200.0, syncs: 40.0 }),
            checkpoint_bytes_per_s: 1_000_000.0,
            checkpoints_per_s: 25.0,
            full_checkpoints_per_s: Some(0.5),
            rss_kib,
            upstream_msgs_per_s: msgs,
            upstream_bytes_per_s: bytes,
            offered_bytes_per_s: 2_250_000.0,
            puback_hold: Some(Hold { mean_ms: 128.2, p50_ms: 250.0, p99_ms: 500.0 }),
        }
    }

    fn report(phases: Vec<PhaseResult>) -> WindowBenchReport {
        WindowBenchReport {
            command: "outpost-sim window-bench".into(),
            machine: "test".into(),
            devices: 10_000,
            duration: Duration::from_secs(30),
            rounds: 3,
            phases,
            perf_note: None,
        }
    }

    #[test]
    fn the_table_shows_the_excess_over_forward_per_event_and_per_device_and_the_reductions() {
        let report = report(vec![
            result(Phase::Forward, 1, 26.0, 40_000, 10_000.0, 2_250_000.0),
            result(Phase::Window, 1, 27.5, 42_500, 1_000.0, 90_000.0),
        ]);
        let table = report.table();
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| 1 | forward") || l.starts_with("| 1 | window"))
            .collect();
        assert_eq!(rows.len(), 2, "{table}");
        assert!(rows[0].starts_with("| 1 | forward | 10000 | 26.00 | - |"), "{}", rows[0]);
        // 2,500 KiB over 10,000 devices: 256 bytes each; 10,000 readings/s to 1,000 messages/s.
        assert!(rows[1].starts_with("| 1 | window | 10000 | 27.50 | 1.50 |"), "{}", rows[1]);
        assert!(rows[1].contains("| 256 | 1000.0 | 10.0× / 25.0× |"), "{}", rows[1]);
        // 1,000,000 B/s in 25 checkpoints/s, one of them full every 2 s; 3 MB/s of pwrite in
        // 40 syncs/s.
        assert!(
            rows[1].contains("| 2000000 | 3000000 | 40.0 | 75000 | 1000000 (25.0, 0.5) | 40000 |"),
            "{}",
            rows[1]
        );
        // The PUBACK hold: the mean, then the bucket bounds p50 and p99 fall under.
        assert!(rows[1].ends_with("| 30 / 20 / 5 | 128.2 / ≤ 250 / ≤ 500 |"), "{}", rows[1]);
        let mut no_histogram = result(Phase::Window, 1, 27.5, 42_500, 1_000.0, 90_000.0);
        no_histogram.puback_hold = None;
        let without = WindowBenchReport { phases: vec![no_histogram], ..report };
        assert!(without.table().contains("| 30 / 20 / 5 | - |"), "{}", without.table());
    }

    /// Each round's window is compared with that round's forward, not with another round's:
    /// a baseline that drifts by 6 µs between rounds leaves the paired excess alone.
    #[test]
    fn the_excess_is_paired_within_a_round_with_its_median_and_spread() {
        let report = report(vec![
            result(Phase::Forward, 1, 27.0, 40_000, 10_000.0, 2_250_000.0),
            result(Phase::Window, 1, 28.0, 42_500, 1_000.0, 90_000.0),
            result(Phase::Window, 2, 34.5, 42_500, 1_000.0, 90_000.0),
            result(Phase::Forward, 2, 33.0, 40_000, 10_000.0, 2_250_000.0),
            result(Phase::Forward, 3, 30.0, 40_000, 10_000.0, 2_250_000.0),
            result(Phase::Window, 3, 31.2, 42_500, 1_000.0, 90_000.0),
        ]);
        let excess = report.paired_excess(Phase::Window, Phase::Forward);
        assert_eq!(excess.len(), 3);
        for (got, want) in excess.iter().zip([1.0, 1.5, 1.2]) {
            assert!((got - want).abs() < 1e-9, "{excess:?}");
        }
        let table = report.table();
        assert!(table.contains("| window | +1.00, +1.50, +1.20 | 1.20 | 0.50 |"), "{table}");
        assert!(
            table.contains("| `forward` itself (µs, not paired) | 27.00, 33.00, 30.00 | 30.00 | 6.00 |"),
            "{table}"
        );
        assert!(table.contains("| 2 | window | 10000 | 34.50 | 1.50 |"), "{table}");
    }

    /// With `sample` in the rounds the window is paired with it too, and `sample` with
    /// `forward`; a phase is never paired with itself.
    #[test]
    fn each_baseline_present_gets_its_own_pairing() {
        let report = report(vec![
            result(Phase::Forward, 1, 27.0, 40_000, 10_000.0, 2_250_000.0),
            result(Phase::Sample, 1, 24.0, 40_000, 1_000.0, 90_000.0),
            result(Phase::Window, 1, 24.5, 42_500, 1_000.0, 90_000.0),
        ]);
        assert_eq!(report.paired_excess(Phase::Window, Phase::Sample), vec![0.5]);
        let table = report.table();
        assert!(table.contains("over `forward` in the same round"), "{table}");
        assert!(table.contains("| sample | -3.00 | -3.00 | 0.00 |"), "{table}");
        assert!(table.contains("over `sample` in the same round"), "{table}");
        assert!(table.contains("| window | +0.50 | 0.50 | 0.00 |"), "{table}");
        assert!(!table.contains("| sample | +0.00"), "{table}");
    }

    #[test]
    fn even_rounds_run_the_phases_in_reverse() {
        let phases = [Phase::Forward, Phase::Window, Phase::Deadband];
        assert_eq!(round_order(&phases, 1), phases.to_vec());
        assert_eq!(round_order(&phases, 2), vec![Phase::Deadband, Phase::Window, Phase::Forward]);
        assert_eq!(round_order(&phases, 3), phases.to_vec());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
