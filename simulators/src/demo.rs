//! `demo`: store-and-forward, watched live in one command.
//!
//! It starts an upstream broker (an in-process rumqttd), a switched TCP link in front of it, the
//! `outpost` gateway pointed at the link, a verifier subscribed at the upstream and a sensor
//! fleet. The link goes down for `outage` and comes back; every second a line shows what the
//! fleet had acknowledged, what reached the upstream and the gateway's on-disk backlog (from
//! `outpost buffer stats`, which asks the running daemon over its admin socket). It ends with
//! the verifier's table, which should say 0 missing.
//!
//! **Invariant:** every child process and task ends with the demo: the gateway is a
//! `ChildProcess` (killed on drop), the link and the fleet follow the demo's cancellation.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::QoS;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::flaky::{LinkShaping, run_switched_link};
use crate::fleet::{FleetConfig, FleetProgress, FleetSummary, run_fleet_with_progress};
use crate::harness::free_addr;
use crate::systems::{Gateway, GatewayKind, GatewaySpec};
use crate::verify::{Subscriber, VerifyReport, start_subscriber};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The `outpost` executable.
    pub outpost: PathBuf,
    /// The gateway's config file (`--listen`, `--upstream` and `--data-dir` are overridden).
    pub config: Option<PathBuf>,
    /// Passed to the gateway as `--rules`.
    pub rules: Option<PathBuf>,
    pub sensors: usize,
    /// Readings per second per sensor.
    pub rate_per_sensor: f64,
    /// Publishing with the link up before the outage.
    pub before: Duration,
    /// How long the link is down.
    pub outage: Duration,
    /// Publishing with the link up after the outage.
    pub after: Duration,
    /// The longest wait for the backlog to drain once publishing stopped.
    pub drain_timeout: Duration,
}

/// Runs the demo, printing a status line every second; returns the verifier's final report.
/// The temporary directory (the gateway's log and data) is removed when the demo succeeds and
/// kept, with its path printed, when it fails or misses readings.
pub async fn run_demo(cfg: DemoConfig, cancel: CancellationToken) -> anyhow::Result<VerifyReport> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let result = demo_in(cfg, &dir, cancel).await;
    if result.as_ref().map_or(true, |report| report.missing > 0) {
        println!("kept the gateway's log and data for inspection in {}", dir.keep().display());
    }
    result
}

async fn demo_in(
    cfg: DemoConfig,
    dir: &tempfile::TempDir,
    cancel: CancellationToken,
) -> anyhow::Result<VerifyReport> {
    let upstream = free_addr()?;
    // rumqttd runs on its own threads until the process exits; it has no stop API.
    crate::broker::spawn_broker(upstream, None).context("cannot start the upstream broker")?;
    println!("upstream broker (rumqttd) on {upstream}");

    let link_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind the link")?;
    let link = link_listener.local_addr().context("cannot read the link's address")?;
    let (switch, up) = watch::channel(true);
    let stop = cancel.child_token();
    let _stop_on_exit = stop.clone().drop_guard();
    tokio::spawn(run_switched_link(link_listener, upstream, up, LinkShaping::default(), stop.clone()));
    println!("flaky link on {link} → {upstream}");

    let spec = GatewaySpec {
        kind: GatewayKind::Outpost,
        binary: cfg.outpost.clone(),
        listen: free_addr()?,
        upstream: link,
        dir: dir.path().to_path_buf(),
        outpost_config: cfg.config.clone(),
        rules: cfg.rules.clone(),
        tls_ca: None,
        autosave: Duration::ZERO,
    };
    let gateway = Gateway::start(spec).await?;
    println!(
        "outpost on {} (config {}, data and log in {}, removed at the end unless the demo fails)",
        gateway.spec().listen,
        cfg.config.as_ref().map_or("generated".to_string(), |path| path.display().to_string()),
        dir.path().display()
    );

    let subscriber = start_subscriber(&upstream.to_string(), "#").await?;
    let fleet = FleetConfig {
        broker: gateway.spec().listen.to_string(),
        sensors: cfg.sensors,
        rate_per_sensor: cfg.rate_per_sensor,
        duration: Some(cfg.before + cfg.outage + cfg.after),
        qos: QoS::AtLeastOnce,
        client_prefix: "demo-".to_string(),
        ..FleetConfig::default()
    };
    println!(
        "fleet: {} sensors × {}/s for {:?}; the link goes down at {:?} for {:?}\n",
        cfg.sensors,
        cfg.rate_per_sensor,
        cfg.before + cfg.outage + cfg.after,
        cfg.before,
        cfg.outage
    );
    let progress = Arc::new(FleetProgress::default());
    let mut fleet = tokio::spawn(run_fleet_with_progress(fleet, stop.clone(), Arc::clone(&progress)));

    let started = Instant::now();
    let down_at = started + cfg.before;
    let up_at = down_at + cfg.outage;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut summary: Option<FleetSummary> = None;
    let mut drain_deadline = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => anyhow::bail!("interrupted"),
            _ = ticker.tick() => {}
            joined = &mut fleet, if summary.is_none() => {
                summary = Some(joined.context("the fleet task panicked")??);
                drain_deadline = Some(Instant::now() + cfg.drain_timeout);
                continue;
            }
        }
        let now = Instant::now();
        let link_up = now < down_at || now >= up_at;
        if *switch.borrow() != link_up {
            switch.send_replace(link_up);
        }
        status_line(&gateway, &subscriber, &progress, started, link_up).await;
        if let Some(summary) = &summary {
            let arrived =
                subscriber.unique_count() >= summary.acked && subscriber.report(Some(summary)).missing == 0;
            if arrived || drain_deadline.is_some_and(|deadline| now >= deadline) {
                break;
            }
        }
    }
    let summary = summary.unwrap_or_default();
    let report = subscriber.report(Some(&summary));
    println!("\nfleet: sent {} acknowledged {}\n{}", summary.sent, summary.acked, report.table());
    Ok(report)
}

/// One line of live status: time, link, acknowledged, delivered, backlog.
async fn status_line(
    gateway: &Gateway,
    subscriber: &Subscriber,
    progress: &FleetProgress,
    started: Instant,
    link_up: bool,
) {
    let backlog =
        buffered_events(gateway).await.map_or_else(|error| format!("? ({error:#})"), |n| n.to_string());
    let acked = progress.acked();
    let delivered = subscriber.unique_count();
    println!(
        "t={:>3}s  link {:<4}  acked by gateway {:>7}  at upstream {:>7}  not yet upstream {:>6}  on disk {:>6}",
        started.elapsed().as_secs(),
        if link_up { "up" } else { "DOWN" },
        acked,
        delivered,
        acked.saturating_sub(delivered),
        backlog
    );
}

/// The gateway's buffered events, from `outpost buffer stats --data-dir DIR`.
async fn buffered_events(gateway: &Gateway) -> anyhow::Result<u64> {
    let mut command = tokio::process::Command::from(Command::new(&gateway.spec().binary));
    command.arg("buffer").arg("stats").arg("--data-dir").arg(gateway.data_dir()).kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(2), command.output())
        .await
        .context("`outpost buffer stats` timed out")?
        .context("cannot run `outpost buffer stats`")?;
    if !output.status.success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let stats: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("`outpost buffer stats` printed no JSON")?;
    stats.get("events").and_then(serde_json::Value::as_u64).context("no `events` in `outpost buffer stats`")
}

/// The example config, if it can be found: `examples/outpost.toml` under the working directory,
/// else in the source tree this binary was built from.
pub fn example_config() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from("examples/outpost.toml"),
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/outpost.toml")),
    ];
    candidates.into_iter().find(|path| path.is_file())
}
