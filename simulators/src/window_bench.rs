//! `window-bench`: what a windowed rule costs in the real gateway (issue #15): `devices`
//! sensors × 1 reading/s (QoS 1, `broker.ack` = `after_commit`) through one rule per phase,
//! each phase on a fresh `outpost` process and data directory, one upstream Mosquitto:
//!
//! - `no-rules`: no rules file, every reading forwarded by the routes;
//! - `forward`: `SELECT * FROM "sensors/+/temp"`, forwarded: every reading upstream, the
//!   baseline;
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
use crate::ingest_bench::{AckMode, gateway_config, scrape_counter, write_bytes};
use crate::process::{ChildProcess, ProcessStats};
use crate::systems::{Gateway, GatewayKind, GatewaySpec, start_upstream_mosquitto};
use crate::verify::{Message, Subscriber, SubscriberOptions};

/// One phase's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No rules file: the gateway forwards every reading by its routes.
    NoRules,
    Forward,
    Window,
    Deadband,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Phase::NoRules, Phase::Forward, Phase::Window, Phase::Deadband];

    pub fn name(self) -> &'static str {
        match self {
            Phase::NoRules => "no-rules",
            Phase::Forward => "forward",
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
    pub work_dir: Option<PathBuf>,
}

/// One measured phase.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub phase: Phase,
    pub acked_per_s: f64,
    pub cpu_us_per_event: Option<f64>,
    pub gateway_cpu_percent: f64,
    pub sim_cpu_percent: f64,
    pub upstream_cpu_percent: f64,
    /// `/proc/PID/io` `write_bytes` per second.
    pub written_per_s: f64,
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
}

pub struct WindowBenchReport {
    pub command: String,
    pub machine: String,
    pub devices: usize,
    pub duration: Duration,
    pub phases: Vec<PhaseResult>,
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
    if cfg.devices == 0 || cfg.phases.is_empty() {
        anyhow::bail!("--devices and --phases must not be empty");
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
    let mut phases = Vec::new();
    for &phase in &cfg.phases {
        eprintln!(
            "== {}: {} devices × 1/s, warm-up {:?}, measured {:?}",
            phase.name(),
            cfg.devices,
            cfg.warmup,
            cfg.duration
        );
        let result = tokio::select! {
            () = cancel.cancelled() => anyhow::bail!("cancelled"),
            result = measure(&cfg, phase, &dir, &upstream, upstream_addr) => result?,
        };
        eprintln!(
            "   {:.0} acked/s, {} µs CPU per event, {:.0} B/s written ({:.0} B/s checkpoints), {:.1} msgs/s upstream",
            result.acked_per_s,
            fmt(result.cpu_us_per_event, 2),
            result.written_per_s,
            result.checkpoint_bytes_per_s,
            result.upstream_msgs_per_s
        );
        phases.push(result);
    }
    Ok(WindowBenchReport {
        command: cfg.command.clone(),
        machine: machine_description(),
        devices: cfg.devices,
        duration: cfg.duration,
        phases,
    })
}

async fn measure(
    cfg: &WindowBenchConfig,
    phase: Phase,
    dir: &Path,
    upstream: &ChildProcess,
    upstream_addr: SocketAddr,
) -> anyhow::Result<PhaseResult> {
    let dir = dir.join(phase.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let metrics = free_addr()?;
    let mut config = gateway_config(upstream_addr, Some(AckMode::AfterCommit), cfg.devices);
    config.push_str(&format!("\n[http]\nlisten = \"{metrics}\"\n"));
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
        dir,
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
        client_prefix: format!("{}-", phase.name()),
        payload_size: cfg.payload_size,
        ..FleetConfig::default()
    };
    let progress = Arc::new(FleetProgress::default());
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
    let pid = gateway.pid()?;
    let (written0, ck_bytes0, cks0, full0) = (
        write_bytes(pid)?,
        scrape_counter(metrics, "outpost_window_checkpoint_bytes_total").await?,
        scrape_counter(metrics, "outpost_window_checkpoints_total").await?,
        scrape_counter(metrics, "outpost_window_checkpoints_full_total").await.ok(),
    );
    let start = take()?;
    tokio::time::sleep(cfg.duration).await;
    let end = take()?;
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
    let topic_len = "sensors//temp".len() + phase.name().len() + 1 + 4;
    Ok(PhaseResult {
        phase,
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
    pub fn table(&self) -> String {
        let mut out = format!(
            "window-bench: {} devices × 1 reading/s, QoS 1, after_commit; measured {:?} per phase\n{}\n`{}`\n\n",
            self.devices, self.duration, self.machine, self.command
        );
        out.push_str("| phase | acked/s | gateway µs CPU/event | + over forward | written B/s | checkpoint B/s (checkpoints/s, of them full) | B per checkpoint | RSS MiB | RSS over forward per device | upstream msgs/s | reduction msgs / bytes | CPU % gateway / sim / mosquitto |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        let base = self.phases.iter().find(|p| p.phase == Phase::Forward);
        for p in &self.phases {
            let extra = base.and_then(|b| Some(p.cpu_us_per_event? - b.cpu_us_per_event?));
            let per_device =
                base.map(|b| (p.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / self.devices as f64);
            let per_checkpoint =
                (p.checkpoints_per_s > 0.0).then(|| p.checkpoint_bytes_per_s / p.checkpoints_per_s);
            let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.1}×", a / b) } else { "∞".to_string() };
            out.push_str(&format!(
                "| {} | {:.0} | {} | {} | {:.0} | {:.0} ({:.1}, {}) | {} | {:.1} | {} | {:.1} | {} / {} | {:.0} / {:.0} / {:.0} |\n",
                p.phase.name(),
                p.acked_per_s,
                fmt(p.cpu_us_per_event, 2),
                fmt(extra.filter(|_| p.phase != Phase::Forward), 2),
                p.written_per_s,
                p.checkpoint_bytes_per_s,
                p.checkpoints_per_s,
                fmt(p.full_checkpoints_per_s, 1),
                fmt(per_checkpoint, 0),
                p.rss_kib as f64 / 1024.0,
                fmt(per_device.filter(|_| p.phase != Phase::Forward), 0),
                p.upstream_msgs_per_s,
                ratio(p.acked_per_s, p.upstream_msgs_per_s),
                ratio(p.offered_bytes_per_s, p.upstream_bytes_per_s),
                p.gateway_cpu_percent,
                p.sim_cpu_percent,
                p.upstream_cpu_percent,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(phase: Phase, cpu: f64, rss_kib: u64, msgs: f64, bytes: f64) -> PhaseResult {
        PhaseResult {
            phase,
            acked_per_s: 10_000.0,
            cpu_us_per_event: Some(cpu),
            gateway_cpu_percent: 30.0,
            sim_cpu_percent: 20.0,
            upstream_cpu_percent: 5.0,
            written_per_s: 2_000_000.0,
            checkpoint_bytes_per_s: 1_000_000.0,
            checkpoints_per_s: 25.0,
            full_checkpoints_per_s: Some(0.5),
            rss_kib,
            upstream_msgs_per_s: msgs,
            upstream_bytes_per_s: bytes,
            offered_bytes_per_s: 2_250_000.0,
        }
    }

    #[test]
    fn the_table_shows_the_excess_over_forward_per_event_and_per_device_and_the_reductions() {
        let report = WindowBenchReport {
            command: "outpost-sim window-bench".into(),
            machine: "test".into(),
            devices: 10_000,
            duration: Duration::from_secs(30),
            phases: vec![
                result(Phase::Forward, 26.0, 40_000, 10_000.0, 2_250_000.0),
                result(Phase::Window, 27.5, 42_500, 1_000.0, 90_000.0),
            ],
        };
        let table = report.table();
        let rows: Vec<&str> =
            table.lines().filter(|l| l.starts_with("| forward") || l.starts_with("| window")).collect();
        assert_eq!(rows.len(), 2, "{table}");
        assert!(rows[0].starts_with("| forward | 10000 | 26.00 | - |"), "{}", rows[0]);
        // 2,500 KiB over 10,000 devices: 256 bytes each; 10,000 readings/s to 1,000 messages/s.
        assert!(rows[1].starts_with("| window | 10000 | 27.50 | 1.50 |"), "{}", rows[1]);
        assert!(rows[1].contains("| 256 | 1000.0 | 10.0× / 25.0× |"), "{}", rows[1]);
        // 1,000,000 B/s in 25 checkpoints/s, one of them full every 2 s.
        assert!(rows[1].contains("| 1000000 (25.0, 0.5) | 40000 |"), "{}", rows[1]);
    }
}
