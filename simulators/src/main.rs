//! The `outpost-sim` command line: parses arguments, sets up logging and signals, and calls the
//! library. Errors are printed with their whole chain and exit with code 2; `verify` exits with
//! code 1 when acknowledged readings are missing.

use std::io::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use outpost_sim::fleet::{FleetConfig, FleetProgress, FleetSummary, ValueModel};
use outpost_sim::ingest_bench::AckMode;
use outpost_sim::mqtt::{ClientAuth, MqttVersion, TlsOptions};
use outpost_sim::payload::PayloadFormat;
use outpost_sim::systems::GatewayKind;
use outpost_sim::verify::VerifyReport;
use outpost_sim::{
    broker, compare, demo, flaky, fleet, floor_bench, idle_bench, ingest_bench, session_fuzz, systems,
    verify, window_bench,
};
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
    /// Run the same workload through Outpost and a Mosquitto bridge and print one table. The
    /// documented run (`--outage 30s`) has 3 min 40 s of publishing, about 4–7 minutes in all.
    Compare(CompareArgs),
    /// Upstream broker, outpost, fleet and a flaky link: watch the backlog grow during an
    /// outage and drain after it, then the verifier's table.
    Demo(DemoArgs),
    /// Measure the gateway's sensor side: CPU per event and PUBACK latency per ack mode at a
    /// fixed rate, the rate at saturation and memory per idle connection; print one table.
    IngestBench(IngestBenchArgs),
    /// What an idle fleet costs: CPU, wake-ups and memory per connection of Outpost and a
    /// Mosquitto bridge with the same idle clients connected; print one table.
    IdleBench(IdleBenchArgs),
    /// What a windowed rule costs in the real gateway: devices × 1 reading/s through a
    /// forward-all rule, a 10 s tumbling average and a deadband; CPU per event, bytes written,
    /// checkpoint bytes, memory per group and the reduction upstream, in one table.
    WindowBench(WindowBenchArgs),
    /// Local fan-out: one QoS 1 publisher at a fixed rate to N QoS 1 subscribers, Outpost and
    /// mosquitto in the same run: delivered rate, CPU per delivery, p99, loss.
    FanoutBench(FanoutBenchArgs),
    /// Fuzz MQTT sessions against the real gateway (upstream: mosquitto) and report crashes,
    /// stalls and memory growth with the seed and the packets that led to them.
    SessionFuzz(SessionFuzzArgs),
    /// Where the floor is: CPU per event of a bare tokio server that only answers each QoS 1
    /// publish with its PUBACK, next to Outpost and a Mosquitto bridge under the same fleet.
    FloorBench(FloorBenchArgs),
    /// The floor-bench's server: answers CONNECT, QoS 1 PUBLISH and PINGREQ, keeps nothing.
    #[command(hide = true)]
    PubackFloor(PubackFloorArgs),
}

#[derive(Args)]
struct FloorBenchArgs {
    /// The `outpost` executable; default: next to this one.
    #[arg(long)]
    outpost: Option<PathBuf>,
    /// The `mosquitto` executable (edge bridge and upstream).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Sensors (MQTT 3.1.1 connections), publishing evenly.
    #[arg(long, default_value_t = 1000)]
    sensors: usize,
    /// Publishes per second in all, one measurement each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2000,10000")]
    rates: Vec<u32>,
    /// Payload bytes per publish.
    #[arg(long, default_value_t = 100)]
    payload_size: usize,
    /// Length of each measured window.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Runs per system; the order reverses between runs.
    #[arg(long, default_value_t = 2)]
    runs: usize,
}

#[derive(Args)]
struct PubackFloorArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
}

#[derive(Args)]
struct SessionFuzzArgs {
    /// The `outpost` executable; default: next to this one.
    #[arg(long)]
    outpost: Option<PathBuf>,
    /// The `mosquitto` executable (the upstream).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// The first round's seed; round n uses seed + n, so `--seed S --rounds 1` replays the
    /// round with seed S.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many rounds (default: 1, or unlimited with --duration).
    #[arg(long)]
    rounds: Option<u32>,
    /// Start no round after this long (the long mode, e.g. 30m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// How long the fuzzed clients run in each round (in two halves, each followed by --settle).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    round_duration: Duration,
    /// Concurrent fuzzed clients.
    #[arg(long, default_value_t = 45)]
    clients: u32,
    /// The pause after each packet a fuzzed client writes (its answers to deliveries go at once).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pacing: Duration,
    /// A stall: the canary's PUBACK takes longer than this.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ack_bound: Duration,
    /// A stall: an acknowledged canary takes longer than this to reach the upstream.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    relay_bound: Duration,
    /// How long the gateway runs without fuzzed clients before its memory is measured.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// A memory finding: VmRSS after the second half's settle phase exceeds the one after the
    /// first half's by more than this many MiB.
    #[arg(long, default_value_t = 8)]
    rss_growth_limit_mib: u64,
    /// Leave these kinds of input out, comma-separated (to look past a known bug):
    /// non-ascii, control-chars, shared-subscriptions.
    #[arg(long, value_delimiter = ',')]
    without: Vec<ClassArg>,
    /// Do not replay a crash's suspects to confirm and minimise the reproducer.
    #[arg(long)]
    no_replay: bool,
    /// Keep logs, configs and data here instead of a temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
struct FanoutBenchArgs {
    /// The `outpost` executable; default: next to this one.
    #[arg(long)]
    outpost: Option<PathBuf>,
    /// Systems to run, comma-separated, in this order.
    #[arg(long, value_delimiter = ',', default_value = "outpost,mosquitto")]
    systems: Vec<FanoutSystemArg>,
    /// Subscribers (each gets every message).
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Publishes per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 64)]
    payload_size: usize,
    /// Publishing before the measured window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// After publishing: how long every publish may take to be acknowledged and delivered.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Subscribers keep persistent sessions (clean session 0).
    #[arg(long)]
    persistent: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FanoutSystemArg {
    Outpost,
    Mosquitto,
}

#[derive(Args)]
struct IngestBenchArgs {
    /// The `outpost` executable; default: next to this one.
    #[arg(long)]
    outpost: Option<PathBuf>,
    /// The `mosquitto` executable (the upstream).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Ack modes of the fixed-rate phases, comma-separated: after_commit, on_receipt.
    #[arg(long, value_delimiter = ',', default_value = "after_commit,on_receipt")]
    ack_modes: Vec<AckModeArg>,
    /// Do not write `broker.ack` into the gateway's config (for a gateway from before the key
    /// existed); every phase then runs the gateway's default and the mode names are labels.
    #[arg(long)]
    no_ack_key: bool,
    /// Sensors (MQTT connections).
    #[arg(long, default_value_t = 100)]
    sensors: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    payload_size: usize,
    /// Total offered rate of the fixed-rate phases, events/s.
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// The measured window of each load phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Publishing before each measured window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Saturation: readings each sensor may have unacknowledged.
    #[arg(long, default_value_t = 100)]
    window: usize,
    /// Skip the saturation phase.
    #[arg(long)]
    no_saturation: bool,
    /// Idle clients of the memory phase; 0 skips it.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Do not check the fixed-rate phases for lost events.
    #[arg(long)]
    no_verify: bool,
    /// How long to wait for every acknowledged event at the upstream. Saturation acknowledges
    /// far faster than one upstream takes (everything is committed first): 20 s at ~100k/s
    /// leaves ~2M events to drain, which a shorter wait would report as lost.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Keep logs, configs and data here instead of a temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write the full report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// WAN phases (after_commit at `--rate`): one per one-way latency of the gateway's
    /// upstream link, comma-separated, e.g. `0ms,25ms,75ms`; bytes written and fsyncs measured.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration)]
    wan: Vec<Duration>,
    /// Also a WAN phase with the upstream link down for the whole window.
    #[arg(long)]
    wan_outage: bool,
    /// Run only the WAN phases: no idle, fixed-rate or saturation phase.
    #[arg(long)]
    only_wan: bool,
    /// Also record the gateway's pwrite64/fdatasync/fsync calls in the WAN phases' windows with
    /// this `perf` executable (a cross-check of the store thread's bytes). Off by default:
    /// attaching perf stalls the gateway and spoils the PUBACK latencies of those phases.
    #[arg(long)]
    perf: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ClassArg {
    NonAscii,
    ControlChars,
    SharedSubscriptions,
}

#[derive(Clone, Copy, ValueEnum)]
enum AckModeArg {
    #[value(name = "after_commit")]
    AfterCommit,
    #[value(name = "on_receipt")]
    OnReceipt,
}

#[derive(Args)]
struct DemoArgs {
    /// The `outpost` executable; default: next to this one.
    #[arg(long)]
    outpost: Option<PathBuf>,
    /// The gateway's config file; default: examples/outpost.toml (--listen, --upstream and
    /// --data-dir are overridden).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Rules file, passed to the gateway as --rules.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Number of sensors.
    #[arg(long, default_value_t = 20)]
    sensors: usize,
    /// Readings per second per sensor.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Publishing before the outage.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    before: Duration,
    /// How long the upstream link is down.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    outage: Duration,
    /// Publishing after the outage.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    after: Duration,
    /// The longest wait for the backlog to drain after publishing stopped.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

#[derive(Args)]
struct IdleBenchArgs {
    /// The `outpost` executable; default: next to this one.
    #[arg(long)]
    outpost: Option<PathBuf>,
    /// The `mosquitto` executable (edge bridge and upstream).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// A config file for Outpost instead of the generated one (as `compare --outpost-config`).
    #[arg(long)]
    outpost_config: Option<PathBuf>,
    /// Idle clients connected to each system.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The clients' keepalive in seconds; each sends one PINGREQ per keepalive.
    #[arg(long, default_value_t = 60)]
    keepalive: u16,
    /// Length of each measured window (alone, then with the clients).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Runs per system; the order alternates between runs.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Keep logs, configs and data here instead of a temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct WindowBenchArgs {
    /// The `outpost` executable; default: next to this one.
    #[arg(long)]
    outpost: Option<PathBuf>,
    /// The `mosquitto` executable (the upstream).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Devices (MQTT connections), one reading per second each.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    payload_size: usize,
    /// Publishing before each measured window: the fleet's 10,000 connections take 15–20 s on
    /// a 2-core machine, then at least one 10 s window, so every group is open and checkpointed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The measured window of each phase (whole 10 s windows keep the reduction exact).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Phases, comma-separated: no-rules, forward, sample (stateless, one reading in ten, as
    /// many messages upstream as window), window, deadband.
    #[arg(long, value_delimiter = ',', default_value = "no-rules,forward,window,deadband")]
    phases: Vec<WindowPhaseArg>,
    /// Run the phases this many times (even rounds in reverse order) and pair each phase with
    /// the same round's `forward`: the excess per round, its median and spread (1–99).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=99))]
    rounds: u8,
    /// The `perf` executable that records the gateway's pwrite64/fdatasync/fsync calls in the
    /// measured window (bytes redb writes, syncs); left out when it cannot record them.
    #[arg(long, default_value = "perf")]
    perf: PathBuf,
    /// Do not run `perf`.
    #[arg(long)]
    no_perf: bool,
    /// Keep logs, configs and data here instead of a temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The gateway's `buffer.commit_interval` (default: the gateway's, 25 ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    commit_interval: Option<Duration>,
    /// The gateway's `buffer.max_ack_delay`, which is also the least time between two
    /// checkpoints of the rules' state (default: the gateway's, 250 ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    max_ack_delay: Option<Duration>,
}

#[derive(Clone, Copy, ValueEnum)]
enum WindowPhaseArg {
    NoRules,
    Forward,
    Sample,
    Window,
    Deadband,
}

#[derive(Args)]
struct CompareArgs {
    /// The `outpost` executable; default: next to this one.
    #[arg(long)]
    outpost: Option<PathBuf>,
    /// The `mosquitto` executable (edge bridge and upstream).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// A config file for Outpost instead of the generated one (defaults, 1 s reconnect cap).
    #[arg(long)]
    outpost_config: Option<PathBuf>,
    /// Which gateways to run, comma-separated: outpost, bridge.
    #[arg(long, value_delimiter = ',', default_value = "outpost,bridge")]
    systems: Vec<SystemArg>,
    /// Sensors (MQTT connections).
    #[arg(long, default_value_t = 100)]
    sensors: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    payload_size: usize,
    /// Total rates of the rate steps, events/s, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2000,5000,10000,20000")]
    rates: Vec<u32>,
    /// Length of each rate step.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    step: Duration,
    /// Rate during the outage phases, events/s.
    #[arg(long, default_value_t = 2000)]
    outage_rate: u32,
    /// Steady publishing before the upstream link goes down.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    lead_in: Duration,
    /// How long the upstream link stays down (the documented run uses 30s).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    outage: Duration,
    /// How long to wait for every acknowledged reading after publishing stopped.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Mosquitto's autosave_interval (whole seconds).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    autosave: Duration,
    /// Skip the outage and crash phases.
    #[arg(long)]
    no_outage: bool,
    /// Run each system twice, over plain TCP and over TLS to the upstream (certificates made
    /// for the run; the bridge uses `bridge_cafile`).
    #[arg(long)]
    tls: bool,
    /// A smoke run: rates 2000,10000, 4 s steps, 2 s lead-in, 6 s outage; 48 s of publishing
    /// (both systems), plus start-ups and drains.
    #[arg(long)]
    quick: bool,
    /// Keep logs, configs and data here instead of a temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write the full report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SystemArg {
    Outpost,
    Bridge,
}

#[derive(Args)]
struct FleetArgs {
    /// Broker address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// MQTT version of every sensor: 3.1.1 or 5.
    #[arg(long, value_enum, default_value_t = MqttVersionArg::V311)]
    mqtt_version: MqttVersionArg,
    /// Connect over TLS; the broker's certificate must name the --broker host.
    #[arg(long)]
    tls: bool,
    /// With --tls: trust the CA certificates in this PEM file instead of the system roots.
    #[arg(long, requires = "tls")]
    ca_file: Option<PathBuf>,
    /// With --tls: a client certificate chain (PEM) for mutual TLS (with --client-key).
    #[arg(long, requires_all = ["tls", "client_key"])]
    client_cert: Option<PathBuf>,
    /// With --tls: the client certificate's private key (PEM; with --client-cert).
    #[arg(long, requires_all = ["tls", "client_cert"])]
    client_key: Option<PathBuf>,
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
    /// Payload encoding.
    #[arg(long, value_enum, default_value_t = FormatArg::Json)]
    format: FormatArg,
    /// How values evolve: constant, walk, sine (+ noise), spikes, stuck, or mixed (sensor i
    /// gets the i % 5-th model).
    #[arg(long, value_enum, default_value_t = ValuesArg::Walk)]
    values: ValuesArg,
    /// MQTT username (with --password).
    #[arg(long, requires = "password")]
    username: Option<String>,
    /// MQTT password (with --username).
    #[arg(long, requires = "username", env = "OUTPOST_SIM_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Each sensor reconnects after about this long (±50 %), again and again (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    churn: Option<Duration>,
    /// Closed loop: each sensor publishes whenever fewer than N of its readings are
    /// unacknowledged, as fast as the broker acks (--rate is ignored).
    #[arg(long)]
    max_outstanding: Option<usize>,
    /// Write the full summary (with acknowledged seqs) to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum MqttVersionArg {
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5")]
    V5,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Json,
    Cbor,
}

#[derive(Clone, Copy, ValueEnum)]
enum ValuesArg {
    Constant,
    Walk,
    Sine,
    Spikes,
    Stuck,
    Mixed,
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
    /// Bandwidth cap in bytes per second, each direction, over all connections.
    #[arg(long)]
    bandwidth: Option<NonZeroU64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `compare` and `demo` print their own progress; the sensors' reconnect warnings during a
    // crash would drown it.
    let default_level = if matches!(
        cli.command,
        Command::Compare(_)
            | Command::Demo(_)
            | Command::IngestBench(_)
            | Command::IdleBench(_)
            | Command::FloorBench(_)
            | Command::WindowBench(_)
            | Command::SessionFuzz(_)
    ) {
        "error,rumqttd=off"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
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
    if let Command::PubackFloor(args) = &cli.command {
        // One thread, as Outpost's broker runs its connections.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            let cancel = CancellationToken::new();
            tokio::spawn(cancel_on_signal(cancel.clone()));
            floor_bench::serve_floor(listener, cancel).await;
            anyhow::Ok(())
        })?;
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
            Command::Compare(args) => run_compare(args, cancel).await,
            Command::Demo(args) => run_demo(args, cancel).await,
            Command::IngestBench(args) => run_ingest_bench(args, cancel).await,
            Command::IdleBench(args) => run_idle_bench(args, cancel).await,
            Command::WindowBench(args) => run_window_bench(args, cancel).await,
            Command::FanoutBench(args) => run_fanout_bench(args).await,
            Command::SessionFuzz(args) => run_session_fuzz(args, cancel).await,
            Command::FloorBench(args) => run_floor_bench(args, cancel).await,
            Command::Broker(_) | Command::PubackFloor(_) => Ok(ExitCode::SUCCESS),
        }
    })
}

async fn run_fleet(args: FleetArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let tls = args.tls.then(|| TlsOptions {
        ca_file: args.ca_file,
        client_auth: args
            .client_cert
            .zip(args.client_key)
            .map(|(cert_file, key_file)| ClientAuth { cert_file, key_file }),
    });
    let cfg = FleetConfig {
        broker: args.broker,
        mqtt_version: match args.mqtt_version {
            MqttVersionArg::V311 => MqttVersion::V311,
            MqttVersionArg::V5 => MqttVersion::V5,
        },
        tls,
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
        format: match args.format {
            FormatArg::Json => PayloadFormat::Json,
            FormatArg::Cbor => PayloadFormat::Cbor,
        },
        values: match args.values {
            ValuesArg::Constant => ValueModel::Constant,
            ValuesArg::Walk => ValueModel::RandomWalk,
            ValuesArg::Sine => ValueModel::SineNoise,
            ValuesArg::Spikes => ValueModel::Spikes,
            ValuesArg::Stuck => ValueModel::Stuck,
            ValuesArg::Mixed => ValueModel::Mixed,
        },
        credentials: args.username.zip(args.password),
        churn: args.churn,
        max_outstanding: args.max_outstanding,
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
    serde_json::json!({
        "sent": summary.sent,
        "acked": summary.acked,
        "refused": summary.refused,
        "ack_latency_ms_p50": summary.ack_latency_ms_p50,
        "ack_latency_ms_p99": summary.ack_latency_ms_p99,
        "ack_latency_ms_max": summary.ack_latency_ms_max,
        "per_device": per_device,
    })
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
    eprint!("{}", report.table());
}

/// Prints each finding to stderr as it comes and the summary as one JSON line on stdout; exits
/// with code 1 if anything was found.
async fn run_session_fuzz(args: SessionFuzzArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let outpost = match args.outpost {
        Some(path) => path,
        None => systems::sibling_binary("outpost")?,
    };
    let cfg = session_fuzz::FuzzConfig {
        rounds: args.rounds,
        duration: args.duration,
        round_duration: args.round_duration,
        clients: args.clients,
        pacing: args.pacing,
        ack_bound: args.ack_bound,
        relay_bound: args.relay_bound,
        settle: args.settle,
        rss_growth_limit_kib: args.rss_growth_limit_mib.saturating_mul(1024),
        without: args
            .without
            .iter()
            .map(|class| match class {
                ClassArg::NonAscii => session_fuzz::grammar::Class::NonAscii,
                ClassArg::ControlChars => session_fuzz::grammar::Class::ControlChars,
                ClassArg::SharedSubscriptions => session_fuzz::grammar::Class::SharedSubscriptions,
            })
            .collect(),
        replay: !args.no_replay,
        work_dir: args.work_dir,
        ..session_fuzz::FuzzConfig::new(outpost, args.mosquitto, args.seed)
    };
    let summary = session_fuzz::run(&cfg, cancel).await?;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &summary).context("cannot write to stdout")?;
    writeln!(stdout).context("cannot write to stdout")?;
    Ok(if summary.findings > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

async fn run_flaky_link(args: FlakyLinkArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("cannot read the listening address")?;
    println!("listening on {local}");
    let schedule = flaky::FlakySchedule { up_for: args.up, down_for: args.down, extra_latency: args.latency };
    flaky::run_shaped_flaky_link(listener, args.upstream, schedule, args.bandwidth, cancel).await;
    Ok(ExitCode::SUCCESS)
}

async fn run_demo(args: DemoArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let outpost = match args.outpost {
        Some(path) => path,
        None => systems::sibling_binary("outpost")?,
    };
    let cfg = demo::DemoConfig {
        outpost,
        config: args.config.or_else(demo::example_config),
        rules: args.rules,
        sensors: args.sensors,
        rate_per_sensor: args.rate,
        before: args.before,
        outage: args.outage,
        after: args.after,
        drain_timeout: args.drain_timeout,
    };
    let report = demo::run_demo(cfg, cancel).await?;
    Ok(if report.missing > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

async fn run_compare(args: CompareArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let outpost = match args.outpost {
        Some(path) => path,
        None if args.systems.iter().any(|system| matches!(system, SystemArg::Outpost)) => {
            systems::sibling_binary("outpost")?
        }
        None => PathBuf::from("outpost"),
    };
    let mut cfg = compare::CompareConfig {
        kinds: args
            .systems
            .iter()
            .map(|system| match system {
                SystemArg::Outpost => GatewayKind::Outpost,
                SystemArg::Bridge => GatewayKind::MosquittoBridge,
            })
            .collect(),
        outpost,
        mosquitto: args.mosquitto,
        outpost_config: args.outpost_config,
        sensors: args.sensors,
        payload_size: args.payload_size,
        rates: args.rates,
        step: args.step,
        outage_rate: args.outage_rate,
        lead_in: args.lead_in,
        outage: args.outage,
        drain_timeout: args.drain_timeout,
        autosave: args.autosave,
        outage_phases: !args.no_outage,
        tls: args.tls,
        work_dir: args.work_dir,
    };
    if args.quick {
        cfg.rates = vec![2000, 10_000];
        cfg.step = Duration::from_secs(4);
        cfg.lead_in = Duration::from_secs(2);
        cfg.outage = Duration::from_secs(6);
        cfg.drain_timeout = Duration::from_secs(30);
    }
    let report = compare::run_compare(cfg, cancel).await?;
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("cannot encode the report")?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report.table());
    Ok(ExitCode::SUCCESS)
}

async fn run_window_bench(args: WindowBenchArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let outpost = match args.outpost {
        Some(path) => path,
        None => systems::sibling_binary("outpost")?,
    };
    let cfg = window_bench::WindowBenchConfig {
        command: command_line(),
        outpost,
        mosquitto: args.mosquitto,
        devices: args.devices,
        payload_size: args.payload_size,
        warmup: args.warmup,
        duration: args.duration,
        phases: args
            .phases
            .iter()
            .map(|p| match p {
                WindowPhaseArg::NoRules => window_bench::Phase::NoRules,
                WindowPhaseArg::Forward => window_bench::Phase::Forward,
                WindowPhaseArg::Sample => window_bench::Phase::Sample,
                WindowPhaseArg::Window => window_bench::Phase::Window,
                WindowPhaseArg::Deadband => window_bench::Phase::Deadband,
            })
            .collect(),
        rounds: usize::from(args.rounds),
        perf: (!args.no_perf).then_some(args.perf),
        work_dir: args.work_dir,
        commit_interval: args.commit_interval,
        max_ack_delay: args.max_ack_delay,
    };
    let report = window_bench::run_window_bench(cfg, cancel).await?;
    print!("{}", report.table());
    Ok(ExitCode::SUCCESS)
}

async fn run_floor_bench(args: FloorBenchArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let outpost = match args.outpost {
        Some(path) => path,
        None => systems::sibling_binary("outpost")?,
    };
    let cfg = floor_bench::FloorBenchConfig {
        outpost,
        mosquitto: args.mosquitto,
        sensors: args.sensors,
        rates: args.rates,
        payload_size: args.payload_size,
        window: args.window,
        runs: args.runs,
    };
    let rows = floor_bench::run_floor_bench(cfg.clone(), cancel).await?;
    print!("{}", floor_bench::table(&cfg, &rows));
    Ok(ExitCode::SUCCESS)
}

async fn run_idle_bench(args: IdleBenchArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let outpost = match args.outpost {
        Some(path) => path,
        None => systems::sibling_binary("outpost")?,
    };
    let cfg = idle_bench::IdleBenchConfig {
        outpost,
        mosquitto: args.mosquitto,
        outpost_config: args.outpost_config,
        connections: args.connections,
        keepalive_s: args.keepalive,
        window: args.window,
        runs: args.runs,
        work_dir: args.work_dir,
    };
    let report = idle_bench::run_idle_bench(cfg, cancel).await?;
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("cannot encode the report")?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report.table());
    Ok(ExitCode::SUCCESS)
}

async fn run_fanout_bench(args: FanoutBenchArgs) -> anyhow::Result<ExitCode> {
    use outpost_sim::fanout_bench::{FanoutConfig, System, run};
    let outpost = match args.outpost {
        Some(path) => path,
        None => systems::sibling_binary("outpost")?,
    };
    let cfg = FanoutConfig {
        outpost,
        systems: args
            .systems
            .iter()
            .map(|s| match s {
                FanoutSystemArg::Outpost => System::Outpost,
                FanoutSystemArg::Mosquitto => System::Mosquitto,
            })
            .collect(),
        subscribers: args.subscribers,
        rate: args.rate,
        payload_size: args.payload_size,
        warmup: args.warmup,
        duration: args.duration,
        drain: args.drain,
        persistent: args.persistent,
    };
    println!("{}", run(&cfg).await?);
    Ok(ExitCode::SUCCESS)
}

async fn run_ingest_bench(args: IngestBenchArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let outpost = match args.outpost {
        Some(path) => path,
        None => systems::sibling_binary("outpost")?,
    };
    let cfg = ingest_bench::IngestBenchConfig {
        command: command_line(),
        outpost,
        mosquitto: args.mosquitto,
        modes: (!args.only_wan)
            .then_some(args.ack_modes.iter())
            .into_iter()
            .flatten()
            .map(|mode| match mode {
                AckModeArg::AfterCommit => AckMode::AfterCommit,
                AckModeArg::OnReceipt => AckMode::OnReceipt,
            })
            .collect(),
        set_ack_key: !args.no_ack_key,
        sensors: args.sensors,
        payload_size: args.payload_size,
        rate: args.rate,
        warmup: args.warmup,
        duration: args.duration,
        saturation: !args.no_saturation && !args.only_wan,
        window: args.window,
        idle_connections: if args.only_wan { 0 } else { args.idle_connections },
        verify: !args.no_verify,
        drain_timeout: args.drain_timeout,
        work_dir: args.work_dir,
        wan: args.wan,
        wan_outage: args.wan_outage,
        perf: args.perf,
    };
    let report = ingest_bench::run_ingest_bench(cfg, cancel).await?;
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("cannot encode the report")?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report.table());
    Ok(ExitCode::SUCCESS)
}

/// This process's command line, with arguments that need it quoted, for reports.
fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c)) {
                arg
            } else {
                format!("'{}'", arg.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
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
