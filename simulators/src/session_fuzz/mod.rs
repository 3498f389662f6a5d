//! `outpost-sim session-fuzz`: a grammar-based fuzzer of the MQTT session over real TCP
//! against the real `outpost` binary, with Debian's mosquitto as its upstream.
//!
//! Each round starts a fresh upstream and a fresh gateway (its own data directory), then twice
//! runs `clients` concurrent fuzzed sessions ([`grammar`]) for half of `round_duration` and
//! lets the gateway settle with no fuzzed client connected. Throughout, it watches for three
//! kinds of finding:
//! - **crash**: the gateway process exited (the report carries the end of its output, where a
//!   panic message is);
//! - **stall**: the [`canary`] publisher's PUBACK did not come within `ack_bound`, or an
//!   acknowledged canary did not reach the upstream subscriber within `relay_bound`;
//! - **memory**: the gateway's `VmRSS` after the second settle phase exceeds the one after the
//!   first by more than `rss_growth_limit` (the first half takes the allocator to its
//!   high-water mark, so what the second adds and keeps is state the gateway does not free).
//!   Each settle phase first releases the state the fuzzed clients were allowed to leave
//!   (retained topics, persistent sessions: [`cleanup`]), so that state, bounded only by the
//!   broker's limits, is not mistaken for a leak.
//!
//! A finding names its round's seed and the packets that led to it: for a crash, the recorded
//! sessions of the connections active last, replayed against a fresh gateway alone and then
//! together (with the open and persistent subscribers) and, if that makes it panic at the same
//! place, cut down to a minimal sequence ([`replay`]); for a stall, the publishes sent around
//! the time of the canary that stuck, hostile and acknowledged ones first.
//!
//! # Invariants
//! - Round `n` of a run with seed `s` has seed `s + n`, and every byte a round's sessions send
//!   depends only on that seed (`--seed s+n --rounds 1` sends the same sessions again; the
//!   interleaving of concurrent sessions is up to the scheduler).
//! - Every process a round starts is killed when the round ends, finding or not.
//! - Nothing here knows the gateway's internals: findings come from the process's exit, its
//!   `/proc` status and what the canaries see over MQTT.

pub mod canary;
pub mod cleanup;
pub mod client;
pub mod grammar;
pub mod replay;
pub mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::harness::free_addr;
use crate::process::ChildProcess;
use crate::systems::{Gateway, GatewayKind, GatewaySpec, start_upstream_mosquitto};
use canary::Canary;
use client::{ConnectionLog, Recorder};

/// Everything a fuzzing run needs.
#[derive(Debug, Clone)]
pub struct FuzzConfig {
    /// The `outpost` executable.
    pub outpost: PathBuf,
    /// The `mosquitto` executable (the upstream).
    pub mosquitto: PathBuf,
    /// The first round's seed; round `n` uses `seed + n`.
    pub seed: u64,
    /// Stop after this many rounds (with `duration` unset and this unset: one round).
    pub rounds: Option<u32>,
    /// Start no round after this much time has passed.
    pub duration: Option<Duration>,
    /// How long the fuzzed clients run in each round.
    pub round_duration: Duration,
    /// Concurrent fuzzed clients (each runs one session after another).
    pub clients: u32,
    /// The pause after each packet a client's script writes.
    pub pacing: Duration,
    /// How often the canary publishes (one publish in flight at a time).
    pub canary_interval: Duration,
    /// The longest a canary may wait for its PUBACK.
    pub ack_bound: Duration,
    /// The longest an acknowledged canary may take to reach the upstream.
    pub relay_bound: Duration,
    /// How long the gateway runs without fuzzed clients before the end of a round is measured.
    pub settle: Duration,
    /// The largest allowed growth of `VmRSS` from after the first half's settle phase to after
    /// the second's, in KiB.
    pub rss_growth_limit_kib: u64,
    /// Kinds of input to leave out (to look past a known bug).
    pub without: Vec<grammar::Class>,
    /// Replay a crash's suspect sessions alone to confirm and minimise the reproducer.
    pub replay: bool,
    /// Logs, configs and data; a temporary directory if unset.
    pub work_dir: Option<PathBuf>,
}

impl FuzzConfig {
    /// The defaults of the short mode: 45 clients, 20 s rounds, one round.
    pub fn new(outpost: PathBuf, mosquitto: PathBuf, seed: u64) -> FuzzConfig {
        FuzzConfig {
            outpost,
            mosquitto,
            seed,
            rounds: None,
            duration: None,
            round_duration: Duration::from_secs(20),
            clients: 45,
            pacing: Duration::from_millis(20),
            canary_interval: Duration::from_millis(50),
            ack_bound: Duration::from_secs(5),
            relay_bound: Duration::from_secs(10),
            settle: Duration::from_secs(3),
            rss_growth_limit_kib: 8 * 1024,
            without: Vec::new(),
            replay: true,
            work_dir: None,
        }
    }
}

/// What kind of finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    Crash,
    Stall,
    Memory,
}

/// One packet of a reproducer.
#[derive(Debug, Clone, Serialize)]
pub struct ReproPacket {
    pub what: String,
    /// The bytes as hex pairs, the first [`HEX_SHOWN`] of them (`len` has the full length).
    pub hex: String,
    pub len: usize,
}

/// Bytes of a packet shown in a report.
const HEX_SHOWN: usize = 512;

impl From<&client::SentPacket> for ReproPacket {
    fn from(packet: &client::SentPacket) -> ReproPacket {
        let shown = &packet.bytes[..packet.bytes.len().min(HEX_SHOWN)];
        let mut hex = wire::hex(shown);
        if packet.len > shown.len() {
            hex.push_str(&format!(" … ({} bytes in all)", packet.len));
        }
        ReproPacket { what: packet.what.clone(), hex, len: packet.len }
    }
}

/// A connection's packets that may have led to a finding.
#[derive(Debug, Clone, Serialize)]
pub struct Suspect {
    pub client_id: String,
    pub version: wire::Version,
    pub packets: Vec<ReproPacket>,
    /// Replayed against a fresh gateway (with the other confirmed suspects of the finding), these
    /// packets reproduced it.
    pub confirmed: bool,
}

/// Something the fuzzer found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub round: u32,
    /// Reproduce with `--seed <round_seed> --rounds 1` and the same clients and duration.
    pub round_seed: u64,
    /// Seconds into the round.
    pub at_s: f64,
    pub detail: String,
    /// The command line that runs this round again.
    pub reproduce: String,
    pub suspects: Vec<Suspect>,
    /// The end of the gateway's output (and for a stall, the upstream's).
    pub log_tail: String,
}

impl Finding {
    /// The finding as text for a terminal.
    pub fn report(&self) -> String {
        let kind = match self.kind {
            FindingKind::Crash => "CRASH",
            FindingKind::Stall => "STALL",
            FindingKind::Memory => "MEMORY",
        };
        let mut text = format!(
            "{kind} in round {} (seed {}) after {:.1}s: {}\n",
            self.round, self.round_seed, self.at_s, self.detail
        );
        text.push_str(&format!("  reproduce: {}\n", self.reproduce));
        for suspect in &self.suspects {
            text.push_str(&format!(
                "  {} client {:?} (MQTT {}):\n",
                if suspect.confirmed { "reproducer (confirmed by replay)" } else { "suspect" },
                wire::shorten(&suspect.client_id),
                match suspect.version {
                    wire::Version::V311 => "3.1.1",
                    wire::Version::V5 => "5",
                }
            ));
            for packet in &suspect.packets {
                text.push_str(&format!("    {}\n      {}\n", packet.what, packet.hex));
            }
        }
        if !self.log_tail.is_empty() {
            text.push_str(&self.log_tail);
            text.push('\n');
        }
        text
    }
}

/// What one round did and found.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub seed: u64,
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub closed_by_gateway: u64,
    pub connect_failures: u64,
    /// `VmRSS` before any fuzzed client.
    pub rss_start_kib: u64,
    /// The highest `VmRSS` seen (and `VmHWM`); null in a round that crashed.
    pub rss_peak_kib: Option<u64>,
    /// `VmRSS` after the first half and its settle phase (null if the round ended before).
    pub rss_mid_kib: Option<u64>,
    /// `VmRSS` at the end, after the second half and its settle phase.
    pub rss_end_kib: Option<u64>,
    /// What each settle phase released before its measurement.
    pub released: Vec<cleanup::Released>,
    pub canary_sent: u64,
    pub canary_acked: u64,
    pub canary_relayed: u64,
    pub canary_max_ack_ms: u64,
    pub canary_reconnects: u64,
    pub elapsed_s: f64,
    pub findings: Vec<Finding>,
}

/// What the whole run did and found: the JSON summary line.
#[derive(Debug, Clone, Serialize)]
pub struct FuzzSummary {
    pub seed: u64,
    /// Kinds of input left out.
    pub without: Vec<grammar::Class>,
    pub rounds: u32,
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub findings: usize,
    pub elapsed_s: f64,
    pub per_round: Vec<RoundReport>,
}

/// Runs rounds until `rounds` or `duration` (or `cancel`), printing each round's findings to
/// stderr as they come.
pub async fn run(cfg: &FuzzConfig, cancel: CancellationToken) -> anyhow::Result<FuzzSummary> {
    let temp;
    let work_dir = match &cfg.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let max_rounds = match (cfg.rounds, cfg.duration) {
        (Some(rounds), _) => rounds,
        (None, Some(_)) => u32::MAX,
        (None, None) => 1,
    };
    let started = Instant::now();
    let mut per_round = Vec::new();
    for round in 0..max_rounds {
        if cancel.is_cancelled() || cfg.duration.is_some_and(|limit| started.elapsed() >= limit) {
            break;
        }
        let seed = cfg.seed.wrapping_add(u64::from(round));
        let dir = work_dir.join(format!("round-{round}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let report = run_round(cfg, round, seed, &dir, &cancel).await?;
        for finding in &report.findings {
            eprint!("{}", finding.report());
        }
        let kib = |value: Option<u64>| value.map_or("-".to_string(), |v| v.to_string());
        eprintln!(
            "round {round} (seed {seed}): {} connections, {} packets, RSS {} → {} → {} KiB (peak {}), canary {}/{} relayed, {} finding(s)",
            report.connections,
            report.packets,
            report.rss_start_kib,
            kib(report.rss_mid_kib),
            kib(report.rss_end_kib),
            kib(report.rss_peak_kib),
            report.canary_relayed,
            report.canary_acked,
            report.findings.len()
        );
        per_round.push(report);
    }
    Ok(FuzzSummary {
        seed: cfg.seed,
        without: cfg.without.clone(),
        rounds: per_round.len() as u32,
        connections: per_round.iter().map(|r| r.connections).sum(),
        packets: per_round.iter().map(|r| r.packets).sum(),
        bytes: per_round.iter().map(|r| r.bytes).sum(),
        findings: per_round.iter().map(|r| r.findings.len()).sum(),
        elapsed_s: started.elapsed().as_secs_f64(),
        per_round,
    })
}

/// How often the monitor checks the gateway and the canaries.
const MONITOR_TICK: Duration = Duration::from_millis(100);
/// How long fuzzed sessions get to end after the round cancels them.
const CLIENT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a settle phase waits past its end for the canary to drain.
const SETTLE_DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Publishes written this long before or after a stuck canary are stall suspects.
const STALL_WINDOW: Duration = Duration::from_secs(3);
/// Suspects listed per finding.
const MAX_SUSPECTS: usize = 5;

/// The processes and canaries of one round.
struct RoundSystem {
    upstream: ChildProcess,
    gateway: Gateway,
    listen: SocketAddr,
    canary: Canary,
    /// Stops the canaries.
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

async fn start_system(cfg: &FuzzConfig, dir: &Path, nonce: u64) -> anyhow::Result<RoundSystem> {
    let upstream_addr = free_addr()?;
    let upstream = start_upstream_mosquitto(&cfg.mosquitto, upstream_addr, dir).await?;
    let canary = Canary::default();
    let subscriber = canary::Subscriber::subscribe(upstream_addr).await?;
    let listen = free_addr()?;
    let gateway = Gateway::start(GatewaySpec {
        kind: GatewayKind::Outpost,
        binary: cfg.outpost.clone(),
        listen,
        upstream: upstream_addr,
        dir: dir.to_path_buf(),
        outpost_config: None,
        rules: None,
        tls_ca: None,
        autosave: Duration::ZERO,
    })
    .await?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(subscriber.record(nonce, canary.clone(), stop.clone()));
    tasks.spawn(canary::publish(listen, nonce, cfg.canary_interval, canary.clone(), stop.clone()));
    Ok(RoundSystem { upstream, gateway, listen, canary, stop, tasks })
}

/// The gateway's `VmRSS` now, in KiB; 0 once it exited.
fn rss_now(system: &RoundSystem) -> u64 {
    system.gateway.stats().map(|stats| stats.rss_kib).unwrap_or(0)
}

/// A crash or a stall, if there is one now.
fn check(system: &mut RoundSystem, cfg: &FuzzConfig) -> Option<(FindingKind, String, Option<Instant>)> {
    if let Err(error) = system.gateway.check_running() {
        // The tail of the output is added to the finding separately.
        let first_line = format!("{error:#}").lines().next().unwrap_or_default().to_string();
        let panic = panic_message(&system.gateway.spec().dir).unwrap_or_default();
        return Some((FindingKind::Crash, format!("{first_line}{panic}"), None));
    }
    let state = system.canary.state();
    if let Some((seq, sent)) = state.outstanding
        && sent.elapsed() > cfg.ack_bound
    {
        let detail = format!(
            "canary {seq} has had no PUBACK for {:.1}s (bound {:?}); the gateway stopped acknowledging",
            sent.elapsed().as_secs_f64(),
            cfg.ack_bound
        );
        return Some((FindingKind::Stall, detail, Some(sent)));
    }
    if let Some((&seq, &acked)) = state.unrelayed.first_key_value()
        && acked.elapsed() > cfg.relay_bound
    {
        let detail = format!(
            "canary {seq} was acknowledged {:.1}s ago and has not reached the upstream (bound {:?}); {} acknowledged canaries are stuck",
            acked.elapsed().as_secs_f64(),
            cfg.relay_bound,
            state.unrelayed.len()
        );
        return Some((FindingKind::Stall, detail, state.sent_at.get(&seq).copied()));
    }
    None
}

async fn run_round(
    cfg: &FuzzConfig,
    round: u32,
    seed: u64,
    dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<RoundReport> {
    let round_start = Instant::now();
    let nonce = seed ^ crate::now_us();
    let mut system = start_system(cfg, dir, nonce).await?;
    let mut findings = Vec::new();
    let recorder = Arc::new(Recorder::default());
    // The sessions that may have crashed the gateway, for the replay.
    let mut suspect_logs = Vec::new();
    let mut finding = |kind, detail: String, stalled_since: Option<Instant>, system: &RoundSystem| Finding {
        kind,
        round,
        round_seed: seed,
        at_s: round_start.elapsed().as_secs_f64(),
        suspects: match kind {
            FindingKind::Crash => {
                suspect_logs = crash_logs(recorder.logs());
                suspect_logs.iter().take(MAX_SUSPECTS).map(suspect).collect()
            }
            FindingKind::Stall => {
                stalled_since.map(|since| stall_suspects(&recorder.logs(), since)).unwrap_or_default()
            }
            FindingKind::Memory => Vec::new(),
        },
        reproduce: reproduce_command(cfg, seed),
        log_tail: shorten_lines(&match kind {
            FindingKind::Stall => format!("{}\n{}", system.gateway.log_tail(), system.upstream.tail()),
            _ => system.gateway.log_tail(),
        }),
        detail,
    };

    // Warm-up: the first canary must go all the way before anything is measured.
    let warm_deadline = Instant::now() + cfg.ack_bound + cfg.relay_bound;
    loop {
        if let Some((kind, detail, since)) = check(&mut system, cfg) {
            findings.push(finding(kind, detail, since, &system));
            break;
        }
        if system.canary.state().relayed > 0 {
            break;
        }
        if Instant::now() >= warm_deadline {
            let detail = format!(
                "no canary reached the upstream within {:?} of start",
                cfg.ack_bound + cfg.relay_bound
            );
            findings.push(finding(FindingKind::Stall, detail, None, &system));
            break;
        }
        tokio::time::sleep(MONITOR_TICK).await;
    }
    let rss_start_kib = rss_now(&system);
    // `VmRSS` after each half of the fuzzing, once its clients are gone; `None` if not reached.
    let mut rss_after: [Option<u64>; 2] = [None, None];
    let mut rss_peak_kib = rss_start_kib;
    let mut released = Vec::new();

    // Two halves, each followed by a settle phase: the first takes the allocator to its
    // high-water mark, so growth that stays after the second is state the gateway keeps.
    for half in 0..2u64 {
        if !findings.is_empty() || cancel.is_cancelled() {
            break;
        }
        let clients_stop = CancellationToken::new();
        let mut clients = JoinSet::new();
        for slot in 0..cfg.clients {
            let recorder = Arc::clone(&recorder);
            let stop = clients_stop.clone();
            let listen = system.listen;
            let without = cfg.without.clone();
            let pacing = cfg.pacing;
            clients.spawn(async move {
                // Session indexes of the second half start at 2^32, so both halves are fixed
                // by the round's seed.
                let mut index = half << 32;
                while !stop.is_cancelled() {
                    let session =
                        grammar::session_without(grammar::session_seed(seed, slot, index), &without);
                    client::run_session(listen, &session, pacing, &recorder, &stop).await;
                    index += 1;
                }
            });
        }
        let fuzz_end = Instant::now() + cfg.round_duration / 2;
        while Instant::now() < fuzz_end && !cancel.is_cancelled() {
            if let Some((kind, detail, since)) = check(&mut system, cfg) {
                findings.push(finding(kind, detail, since, &system));
                break;
            }
            rss_peak_kib = rss_peak_kib.max(rss_now(&system));
            tokio::time::sleep(MONITOR_TICK).await;
        }
        clients_stop.cancel();
        if tokio::time::timeout(CLIENT_STOP_TIMEOUT, async { while clients.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            clients.abort_all();
        }
        if !findings.is_empty() {
            break;
        }
        // Settle: no fuzzed client is connected; the canary keeps going and every acknowledged
        // one must arrive. Meanwhile the retained topics and persistent sessions the clients
        // left are released, and the measurement waits until the broker has answered for all.
        let settle_end = Instant::now() + cfg.settle;
        let mut release = Some(tokio::spawn(cleanup::release(system.listen, recorder.leftovers.take())));
        loop {
            if let Some((kind, detail, since)) = check(&mut system, cfg) {
                findings.push(finding(kind, detail, since, &system));
                break;
            }
            // With the stall bounds raised (to measure memory past a known stall), the canary
            // may never drain; the settle phase then ends anyway.
            let drained = system.canary.state().unrelayed.is_empty();
            if let Some(task) = release.take_if(|task| task.is_finished()) {
                released.push(task.await.unwrap_or_default());
            }
            if release.is_none()
                && Instant::now() >= settle_end
                && (drained || Instant::now() >= settle_end + SETTLE_DRAIN_LIMIT)
            {
                rss_after[half as usize] = Some(rss_now(&system));
                break;
            }
            tokio::time::sleep(MONITOR_TICK).await;
        }
        // A finding ended the settle phase: the round is over, the release with it.
        if let Some(task) = release {
            task.abort();
        }
    }
    if let [Some(mid), Some(end)] = rss_after {
        let growth = end.saturating_sub(mid);
        if growth > cfg.rss_growth_limit_kib {
            let detail = format!(
                "VmRSS grew by {growth} KiB during the second half of the round ({mid} → {end} KiB, {rss_start_kib} KiB before any client) and stayed after every fuzzed client was gone and their retained topics and persistent sessions were released (bound {} KiB; released {:?})",
                cfg.rss_growth_limit_kib, released
            );
            findings.push(finding(FindingKind::Memory, detail, None, &system));
        }
    }
    if let Ok(stats) = system.gateway.stats() {
        rss_peak_kib = rss_peak_kib.max(stats.peak_rss_kib);
    }
    // A gateway that panics prints a backtrace first, and resolving its symbols takes far
    // more memory than the gateway ever used: no peak is reported for a crashed round.
    let rss_peak_kib = (!findings.iter().any(|f| f.kind == FindingKind::Crash)).then_some(rss_peak_kib);

    system.stop.cancel();
    while system.tasks.join_next().await.is_some() {}
    let _ = system.gateway.kill();
    drop(system.upstream);

    if cfg.replay
        && let Some(finding) = findings.iter_mut().find(|f| f.kind == FindingKind::Crash)
        && let Some(confirmed) =
            replay::confirm_crash(cfg, &dir.join("replay"), &suspect_logs, panic_place(&finding.detail))
                .await?
    {
        // The confirmed reproducer replaces the guesses.
        finding.suspects = confirmed;
    }

    let state = system.canary.state();
    Ok(RoundReport {
        round,
        seed,
        connections: recorder.connections.load(Ordering::Relaxed),
        packets: recorder.packets.load(Ordering::Relaxed),
        bytes: recorder.bytes.load(Ordering::Relaxed),
        closed_by_gateway: recorder.closed_by_broker.load(Ordering::Relaxed),
        connect_failures: recorder.connect_failures.load(Ordering::Relaxed),
        rss_start_kib,
        rss_peak_kib,
        rss_mid_kib: rss_after[0],
        rss_end_kib: rss_after[1],
        released,
        canary_sent: state.sent,
        canary_acked: state.acked,
        canary_relayed: state.relayed,
        canary_max_ack_ms: state.max_ack.as_millis() as u64,
        canary_reconnects: state.reconnects,
        elapsed_s: round_start.elapsed().as_secs_f64(),
        findings,
    })
}

/// The connections that wrote or closed last before a crash, most recent first, then the
/// connections still open, or persistent, with a subscription (a delivery may be what crashed
/// the gateway),
/// [`MAX_REPLAYED`] in all.
fn crash_logs(logs: Vec<ConnectionLog>) -> Vec<ConnectionLog> {
    let mut logs: Vec<ConnectionLog> = logs.into_iter().filter(|log| !log.packets.is_empty()).collect();
    logs.sort_by_key(|log| std::cmp::Reverse(log.last_event()));
    let rest = logs.split_off(MAX_SUSPECTS.min(logs.len()));
    // Open connections, and persistent sessions whose subscriptions outlive them.
    let persistent = |log: &ConnectionLog| log.packets.first().is_some_and(|p| p.what.contains(" clean 0 "));
    let subscribers = rest.into_iter().filter(|log| {
        (log.closed_at.is_none() || persistent(log))
            && log.packets.iter().any(|p| p.what.starts_with("SUBSCRIBE"))
    });
    logs.extend(subscribers.take(MAX_REPLAYED - MAX_SUSPECTS));
    logs
}

/// Connections a crash replay may include.
const MAX_REPLAYED: usize = 16;

/// The `outpost-sim` command line that runs the round with `seed` again.
fn reproduce_command(cfg: &FuzzConfig, seed: u64) -> String {
    let mut command = format!(
        "outpost-sim session-fuzz --seed {seed} --rounds 1 --clients {} --round-duration {} --pacing {}",
        cfg.clients,
        humantime::format_duration(cfg.round_duration),
        humantime::format_duration(cfg.pacing)
    );
    if !cfg.without.is_empty() {
        let classes: Vec<String> = cfg
            .without
            .iter()
            .map(|class| {
                serde_json::to_value(class)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .collect();
        command.push_str(&format!(" --without {}", classes.join(",")));
    }
    command
}

/// Where a panic quoted in `detail` happened: `file:line:column` after "panicked at ".
fn panic_place(detail: &str) -> Option<&str> {
    let (_, rest) = detail.split_once("panicked at ")?;
    rest.split_whitespace().next().map(|place| place.trim_end_matches(':'))
}

/// The panic message in the gateway's output in `dir` (the line naming the thread and place,
/// and the message after it), which the backtrace pushes out of the log's tail.
pub(crate) fn panic_message(dir: &Path) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("outpost.") && name.ends_with(".log")) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).ok()?;
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.contains("panicked at") {
                let message = lines.next().unwrap_or_default();
                return Some(format!(": {} {}", line.trim(), message.trim()));
            }
        }
    }
    None
}

/// Packets of an unconfirmed crash suspect shown: its first (the CONNECT) and the latest.
const SUSPECT_PACKETS_SHOWN: usize = 16;

fn suspect(log: &ConnectionLog) -> Suspect {
    let skip = log.packets.len().saturating_sub(SUSPECT_PACKETS_SHOWN).saturating_sub(1);
    let mut packets: Vec<ReproPacket> = log.packets.first().map(ReproPacket::from).into_iter().collect();
    if skip > 0 {
        packets.push(ReproPacket { what: format!("({skip} packets left out)"), hex: String::new(), len: 0 });
    }
    packets.extend(log.packets.iter().skip(1 + skip).map(ReproPacket::from));
    Suspect { client_id: log.client_id.clone(), version: log.version, packets, confirmed: false }
}

/// A process's output tail with each line cut to [`LOG_LINE_SHOWN`] characters (a client id
/// of 2,000 characters in a log line says nothing more than its first 200).
fn shorten_lines(text: &str) -> String {
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.chars().count() <= LOG_LINE_SHOWN {
                line.to_string()
            } else {
                let head: String = line.chars().take(LOG_LINE_SHOWN).collect();
                format!("{head}…")
            }
        })
        .collect();
    lines.join("\n")
}

const LOG_LINE_SHOWN: usize = 300;

/// Publishes written, and connections with a will closed, within [`STALL_WINDOW`] of `since`
/// (when the stuck canary was sent; the event that blocks the uplink may have reached the
/// relay's send window after it), each with its connection's first packet: hostile ones first,
/// of those the ones the gateway acknowledged (an accepted event is what can block the
/// uplink), most recent first.
fn stall_suspects(logs: &[ConnectionLog], since: Instant) -> Vec<Suspect> {
    let from = since.checked_sub(STALL_WINDOW).unwrap_or(since);
    let to = since + STALL_WINDOW;
    let mut found: Vec<((bool, bool, Instant), Suspect)> = Vec::new();
    for log in logs {
        let Some(first) = log.packets.first() else { continue };
        // A connection with a will that closed in the window: the gateway may have published
        // the will.
        if first.will
            && let Some(closed) = log.closed_at
            && closed >= from
            && closed <= to
        {
            let note = ReproPacket {
                what: "(the connection closed; unless it sent DISCONNECT, its will is published)".to_string(),
                hex: String::new(),
                len: 0,
            };
            found.push((
                (first.hostile, false, closed),
                Suspect {
                    client_id: log.client_id.clone(),
                    version: log.version,
                    packets: vec![ReproPacket::from(first), note],
                    confirmed: false,
                },
            ));
        }
        for packet in log.packets.iter().skip(1) {
            if packet.publish.is_some() && packet.at >= from && packet.at <= to {
                let mut publish = ReproPacket::from(packet);
                if packet.acked {
                    publish.what.push_str(", acknowledged");
                }
                let packets = vec![ReproPacket::from(first), publish];
                found.push((
                    (packet.hostile, packet.acked, packet.at),
                    Suspect {
                        client_id: log.client_id.clone(),
                        version: log.version,
                        packets,
                        confirmed: false,
                    },
                ));
            }
        }
    }
    found.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
    found.into_iter().take(MAX_SUSPECTS).map(|(_, suspect)| suspect).collect()
}
