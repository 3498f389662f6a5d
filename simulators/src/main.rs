//! The `outpost-sim` command line: parses arguments, sets up logging and signals, and calls the
//! library. Errors are printed with their whole chain and exit with code 2; `verify` exits with
//! code 1 when acknowledged readings are missing.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use outpost_sim::fleet::{FleetConfig, FleetProgress, FleetSummary};
use outpost_sim::verify::VerifyReport;
use outpost_sim::{broker, flaky, fleet, verify};
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "outpost-sim",
    version,
    about = "Sensor fleets, a test broker, a flaky link and a loss verifier"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run simulated sensors, one MQTT connection each, and print what the broker acknowledged.
    Fleet(FleetArgs),
    /// Subscribe, record for a while and report losses, duplicates, reordering and latency.
    Verify(VerifyArgs),
    /// Run a plain rumqttd broker until killed.
    Broker(BrokerArgs),
    /// Proxy TCP to an upstream, taking the link down on a schedule.
    FlakyLink(FlakyLinkArgs),
}

#[derive(Args)]
struct FleetArgs {
    /// Broker address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Number of sensors (MQTT connections).
    #[arg(long, default_value_t = 10)]
    sensors: usize,
    /// Readings per second per sensor.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Readings per sensor, then stop.
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Publish for this long (e.g. 30s, 5m), then stop.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// QoS of every publish: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Topic of each reading; {id} is the device id, {metric} the metric.
    #[arg(long, default_value = "sensors/{id}/{metric}")]
    topic_template: String,
    /// Metric name.
    #[arg(long, default_value = "temp")]
    metric: String,
    /// Client id prefix; ids look like sim-0001.
    #[arg(long, default_value = "sim-")]
    client_prefix: String,
    /// Target payload size in bytes.
    #[arg(long, default_value_t = 200)]
    payload_size: usize,
    /// Seed of the value generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the full summary (with acknowledged seqs) to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyArgs {
    /// Broker address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Topic filter to subscribe to.
    #[arg(long, default_value = "#")]
    filter: String,
    /// A fleet summary file; read when recording ends, so the fleet may still be running at start.
    #[arg(long)]
    expect: Option<PathBuf>,
    /// How long to record (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Args)]
struct BrokerArgs {
    /// Address of the MQTT 3.1.1 listener.
    #[arg(long, default_value = "127.0.0.1:1884")]
    listen: SocketAddr,
    /// Address of an MQTT 5 listener.
    #[arg(long)]
    listen_v5: Option<SocketAddr>,
}

#[derive(Args)]
struct FlakyLinkArgs {
    /// Address to accept connections on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address to forward them to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Length of each up phase (e.g. 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    up: Duration,
    /// Length of each down phase (e.g. 2s); 0s keeps the link up.
    #[arg(long, value_parser = humantime::parse_duration)]
    down: Duration,
    /// Extra one-way latency (e.g. 20ms).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Broker(args) = &cli.command {
        // Blocks for good; rumqttd runs its own threads and runtimes.
        broker::run_broker(args.listen, args.listen_v5)?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(cancel_on_signal(cancel.clone()));
        match cli.command {
            Command::Fleet(args) => run_fleet(args, cancel).await,
            Command::Verify(args) => run_verify(args, cancel).await,
            Command::FlakyLink(args) => run_flaky_link(args, cancel).await,
            Command::Broker(_) => Ok(ExitCode::SUCCESS),
        }
    })
}

async fn run_fleet(args: FleetArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let cfg = FleetConfig {
        broker: args.broker,
        sensors: args.sensors,
        rate_per_sensor: args.rate,
        count_per_sensor: args.count,
        duration: args.duration,
        qos,
        topic_template: args.topic_template,
        metric: args.metric,
        client_prefix: args.client_prefix,
        payload_size: args.payload_size,
        seed: args.seed,
    };
    let progress = Arc::new(FleetProgress::default());
    let done = CancellationToken::new();
    let reporter = tokio::spawn(report_progress(Arc::clone(&progress), done.clone()));
    let summary = fleet::run_fleet_with_progress(cfg, cancel, progress).await;
    done.cancel();
    let _ = reporter.await;
    let summary = summary?;

    if let Some(path) = &args.summary {
        let json = serde_json::to_vec(&summary).context("cannot encode the summary")?;
        std::fs::write(path, json)
            .with_context(|| format!("cannot write the summary to {}", path.display()))?;
    }
    print_json(&counts_only(&summary))?;
    Ok(ExitCode::SUCCESS)
}

/// The summary without the acknowledged seqs, which can be large.
fn counts_only(summary: &FleetSummary) -> serde_json::Value {
    let per_device: serde_json::Map<String, serde_json::Value> = summary
        .per_device
        .iter()
        .map(|(device, counts)| {
            (device.clone(), serde_json::json!({ "sent": counts.sent, "acked": counts.acked }))
        })
        .collect();
    serde_json::json!({ "sent": summary.sent, "acked": summary.acked, "per_device": per_device })
}

/// Prints sent and acknowledged readings per second to stderr until `done`.
async fn report_progress(progress: Arc<FleetProgress>, done: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let (mut last_sent, mut last_acked) = (0, 0);
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            _ = ticker.tick() => {
                let (sent, acked) = (progress.sent(), progress.acked());
                eprintln!(
                    "sent {}/s acked {}/s (total sent {sent}, acked {acked})",
                    sent - last_sent,
                    acked - last_acked
                );
                (last_sent, last_acked) = (sent, acked);
            }
        }
    }
}

async fn run_verify(args: VerifyArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let verifier = verify::verify_for(&args.broker, &args.filter, args.duration, cancel).await?;
    let expected: Option<FleetSummary> = match &args.expect {
        Some(path) => {
            let json = std::fs::read(path)
                .with_context(|| format!("cannot read the fleet summary {}", path.display()))?;
            let summary = serde_json::from_slice(&json).with_context(|| {
                format!("{} is not a fleet summary (write one with `fleet --summary`)", path.display())
            })?;
            Some(summary)
        }
        None => None,
    };
    let report = verifier.report(expected.as_ref());
    print_json(&report)?;
    print_table(&report);
    Ok(if expected.is_some() && report.missing > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Prints the report's counts as a small table on stderr.
fn print_table(report: &VerifyReport) {
    let latency = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |ms| format!("{ms:.0}"));
    eprintln!(
        "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "received", "unique", "duplicate", "reordered", "missing", "malformed", "p50 ms", "p99 ms", "max ms"
    );
    eprintln!(
        "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
        report.received,
        report.unique,
        report.duplicates,
        report.reordered,
        report.missing,
        report.malformed,
        latency(report.latency_ms_p50),
        latency(report.latency_ms_p99),
        latency(report.latency_ms_max)
    );
    for (device, seqs) in &report.missing_by_device {
        eprintln!("missing from {device}: {seqs:?}");
    }
}

async fn run_flaky_link(args: FlakyLinkArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("cannot read the listening address")?;
    println!("listening on {local}");
    let schedule = flaky::FlakySchedule { up_for: args.up, down_for: args.down, extra_latency: args.latency };
    flaky::run_flaky_link(listener, args.upstream, schedule, cancel).await;
    Ok(ExitCode::SUCCESS)
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value).context("cannot write to stdout")?;
    writeln!(stdout).context("cannot write to stdout")?;
    Ok(())
}

/// Cancels on Ctrl-C or SIGTERM (systemd and test harnesses stop processes with SIGTERM).
async fn cancel_on_signal(cancel: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("stopping");
    cancel.cancel();
}
