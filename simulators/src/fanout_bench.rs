//! `fanout-bench`: the local broker's fan-out (issue #17): one QoS 1 publisher at a fixed
//! rate, N QoS 1 subscribers to its topic, Outpost and Debian's mosquitto in the same run.
//!
//! Per system: a fresh broker (Outpost with no upstream: its buffer keeps the events, which is
//! its ingest cost, the same for every subscriber count; mosquitto with its defaults), N
//! subscribers that answer every delivery with a PUBACK, then the publisher (at most
//! [`PUBLISH_WINDOW`] publishes unacknowledged). After `warmup`, one window of `duration` is
//! measured: the broker's CPU time (`utime + stime`, all threads) over it, the deliveries in
//! it, and the latency (publish written → delivery read, one sample in 10) of the deliveries
//! in it. After the publisher stops, the subscribers get `drain` to receive the rest; then
//! every subscriber must have every acknowledged publish: what is missing is `lost`, what
//! came twice `duplicates`, what came out of order `reordered`.
//!
//! The clients are raw MQTT 3.1.1 over tokio sockets (no client library), so the bench process
//! costs little next to the brokers; its CPU is in the table. Everything shares one machine.
//! Mosquitto runs with `max_inflight_messages` 1,000, Outpost's window toward a subscriber
//! (its default, 20, caps it far below this rate). Subscribers with `--persistent` use clean session 0, so Outpost writes their deliveries to
//! its buffer file (the durable sessions' cost) and mosquitto keeps them in memory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;

use crate::harness::free_addr;
use crate::harness::mosquitto::{Mosquitto, MosquittoConfig};
use crate::harness::raw::{packet, put_str};
use crate::process::{ChildProcess, ProcessStats};

/// Publishes the publisher may have unacknowledged.
pub const PUBLISH_WINDOW: u64 = 1_000;
/// Mosquitto's `max_inflight_messages` in the bench: Outpost's window toward a subscriber.
pub const MOSQUITTO_INFLIGHT: u32 = 1_000;
const TOPIC: &str = "fanout/t";

/// Which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Outpost,
    Mosquitto,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Outpost => "outpost",
            System::Mosquitto => "mosquitto",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    pub outpost: PathBuf,
    pub systems: Vec<System>,
    pub subscribers: usize,
    /// Publishes per second.
    pub rate: u32,
    pub payload_size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub persistent: bool,
}

/// One system's figures.
#[derive(Debug, Clone)]
pub struct FanoutResult {
    pub system: System,
    pub published_per_s: f64,
    pub delivered_per_s: f64,
    pub cpu_us_per_delivery: f64,
    pub broker_cpu_share: f64,
    pub bench_cpu_share: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub published: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    received: AtomicU64,
    duplicates: AtomicU64,
    reordered: AtomicU64,
    /// Distinct sequence numbers received (for loss), as a bitmap grown on demand.
    bits: std::sync::Mutex<Vec<u64>>,
    /// Latency samples in µs, taken while `sampling` is set.
    samples: std::sync::Mutex<Vec<u32>>,
}

/// The publish's sequence number and when it was written (µs since the bench's epoch).
fn encode_payload(seq: u64, sent_us: u64, size: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(size.max(16));
    payload.extend_from_slice(&seq.to_be_bytes());
    payload.extend_from_slice(&sent_us.to_be_bytes());
    payload.resize(size.max(16), b'x');
    payload
}

fn connect_packet(client_id: &str, clean: bool) -> Vec<u8> {
    let mut rest = Vec::new();
    put_str(&mut rest, "MQTT");
    rest.push(4);
    rest.push(if clean { 0x02 } else { 0x00 });
    rest.extend_from_slice(&60u16.to_be_bytes());
    put_str(&mut rest, client_id);
    packet(0x10, &rest)
}

/// Reads one whole packet: its first byte and body; `None` at the end of the stream.
async fn read_packet(reader: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
    loop {
        if buf.len() >= 2 {
            let mut len = 0usize;
            let mut shift = 0;
            let mut i = 1;
            let mut complete = false;
            while i < buf.len() && i <= 4 {
                len |= usize::from(buf[i] & 0x7f) << shift;
                shift += 7;
                i += 1;
                if buf[i - 1] & 0x80 == 0 {
                    complete = true;
                    break;
                }
            }
            if complete && buf.len() >= i + len {
                let first = buf[0];
                let body = buf[i..i + len].to_vec();
                buf.drain(..i + len);
                return Ok(Some((first, body)));
            }
        }
        let mut chunk = [0u8; 64 * 1024];
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects and waits for a CONNACK that accepts.
async fn connect(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
) -> anyhow::Result<(OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf, Vec<u8>)> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(&connect_packet(client_id, clean)).await?;
    let mut buf = Vec::new();
    match read_packet(&mut reader, &mut buf).await? {
        Some((0x20, body)) if body.get(1) == Some(&0) => Ok((reader, writer, buf)),
        other => anyhow::bail!("{client_id}: no accepting CONNACK: {other:?}"),
    }
}

/// Connects, subscribes at QoS 1 and returns once the SUBACK granted it; then answers every
/// delivery with a PUBACK and records it, until the connection ends.
async fn subscriber(
    addr: SocketAddr,
    client_id: String,
    clean: bool,
    seen: Arc<Seen>,
    epoch: Instant,
    sampling: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (mut reader, mut writer, mut buf) = connect(addr, &client_id, clean).await?;
    let mut rest = vec![0, 1];
    put_str(&mut rest, TOPIC);
    rest.push(1);
    writer.write_all(&packet(0x82, &rest)).await?;
    match read_packet(&mut reader, &mut buf).await? {
        Some((0x90, body)) if body.get(2).is_some_and(|q| *q <= 2) => {}
        other => anyhow::bail!("{client_id}: no granting SUBACK: {other:?}"),
    }
    Ok(tokio::spawn(async move {
        let mut last: Option<u64> = None;
        let mut acks = Vec::new();
        while let Ok(Some((first, body))) = read_packet(&mut reader, &mut buf).await {
            if first >> 4 != 3 {
                continue;
            }
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let mut at = 2 + topic_len;
            if qos > 0 {
                acks.extend_from_slice(&[0x40, 2, body[at], body[at + 1]]);
                at += 2;
            }
            let payload = &body[at..];
            if payload.len() < 16 {
                continue;
            }
            let seq = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
            let sent_us = u64::from_be_bytes(payload[8..16].try_into().unwrap_or_default());
            seen.received.fetch_add(1, Ordering::Relaxed);
            {
                let mut bits = seen.bits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let (word, bit) = ((seq / 64) as usize, seq % 64);
                if bits.len() <= word {
                    bits.resize(word + 1, 0);
                }
                if bits[word] & (1 << bit) != 0 {
                    seen.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                bits[word] |= 1 << bit;
            }
            if last.is_some_and(|l| seq < l) {
                seen.reordered.fetch_add(1, Ordering::Relaxed);
            }
            last = Some(seq);
            if seq % 10 == 0 && sampling.load(Ordering::Relaxed) {
                let now_us = epoch.elapsed().as_micros() as u64;
                let latency = u32::try_from(now_us.saturating_sub(sent_us)).unwrap_or(u32::MAX);
                seen.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(latency);
            }
            // Answered once per read batch: one write for every PUBACK it owes.
            if buf.is_empty() && !acks.is_empty() {
                if writer.write_all(&acks).await.is_err() {
                    break;
                }
                acks.clear();
            }
        }
    }))
}

/// A running broker: its process and address.
enum Broker {
    Outpost { process: ChildProcess, _dir: tempfile::TempDir },
    Mosquitto(Mosquitto),
}

impl Broker {
    async fn start(
        system: System,
        cfg: &FanoutConfig,
        addr: SocketAddr,
    ) -> anyhow::Result<(Broker, SocketAddr)> {
        match system {
            System::Outpost => {
                let dir = tempfile::tempdir()?;
                let config = dir.path().join("outpost.toml");
                // Room for a persistent subscriber's whole run, as mosquitto gets.
                std::fs::write(&config, "[broker]\nmax_queued_messages = 100000\n")?;
                let mut command = std::process::Command::new(&cfg.outpost);
                command
                    .arg("run")
                    .arg("--config")
                    .arg(&config)
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--data-dir")
                    .arg(dir.path().join("data"));
                let mut process = ChildProcess::spawn("outpost", command)?;
                process.wait_accepting(addr, Duration::from_secs(20)).await?;
                Ok((Broker::Outpost { process, _dir: dir }, addr))
            }
            System::Mosquitto => {
                let config = MosquittoConfig {
                    persistence: false,
                    max_queued_messages: Some(100_000),
                    users: Vec::new(),
                    directory_for_any_user: false,
                    // Outpost's QoS 1/2 window toward a subscriber is 1,000; mosquitto's
                    // default of 20 would measure its window, not its fan-out.
                    extra: format!("max_inflight_messages {MOSQUITTO_INFLIGHT}\n"),
                };
                let broker = Mosquitto::start_configured(&config).await?;
                let addr = broker.addr();
                Ok((Broker::Mosquitto(broker), addr))
            }
        }
    }

    fn pid(&self) -> anyhow::Result<u32> {
        match self {
            Broker::Outpost { process, .. } => Ok(process.pid()),
            Broker::Mosquitto(m) => Ok(m.process().context("mosquitto is not running")?.pid()),
        }
    }
}

/// Runs the bench for one system.
pub async fn run_one(system: System, cfg: &FanoutConfig) -> anyhow::Result<FanoutResult> {
    let (broker, addr) = Broker::start(system, cfg, free_addr()?).await?;
    let epoch = Instant::now();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for n in 0..cfg.subscribers {
        let s = Arc::new(Seen::default());
        let id = format!("fanout-sub-{n}");
        tasks
            .push(subscriber(addr, id, !cfg.persistent, Arc::clone(&s), epoch, Arc::clone(&sampling)).await?);
        seen.push(s);
    }
    let (mut reader, mut writer, mut buf) = connect(addr, "fanout-pub", true).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let ack_task = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            while let Ok(Some((first, _))) = read_packet(&mut reader, &mut buf).await {
                if first >> 4 == 4 {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let pid = broker.pid()?;
    let me = std::process::id();
    let total: Duration = cfg.warmup + cfg.duration;
    let started = Instant::now();
    let mut next: u64 = 0;
    let mut window_start: Option<(Instant, ProcessStats, ProcessStats, u64, u64)> = None;
    let window_end;
    let delivered = |seen: &[Arc<Seen>]| seen.iter().map(|s| s.received.load(Ordering::Relaxed)).sum::<u64>();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut out = Vec::new();
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        if window_start.is_none() && elapsed >= cfg.warmup {
            sampling.store(true, Ordering::Relaxed);
            window_start = Some((
                Instant::now(),
                ProcessStats::read(pid)?,
                ProcessStats::read(me)?,
                delivered(&seen),
                acked.load(Ordering::Relaxed),
            ));
        }
        if elapsed >= total {
            sampling.store(false, Ordering::Relaxed);
            window_end = Some((
                Instant::now(),
                ProcessStats::read(pid)?,
                ProcessStats::read(me)?,
                delivered(&seen),
                acked.load(Ordering::Relaxed),
            ));
            break;
        }
        let due = (elapsed.as_secs_f64() * f64::from(cfg.rate)) as u64;
        let sent_us = epoch.elapsed().as_micros() as u64;
        while next < due && next < acked.load(Ordering::Relaxed) + PUBLISH_WINDOW {
            let mut rest = Vec::with_capacity(cfg.payload_size + 16);
            put_str(&mut rest, TOPIC);
            rest.extend_from_slice(&((next % 65_535) as u16 + 1).to_be_bytes());
            rest.extend_from_slice(&encode_payload(next, sent_us, cfg.payload_size));
            out.extend_from_slice(&packet(0x32, &rest));
            next += 1;
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
            out.clear();
        }
    }
    // Every publish acknowledged, then the subscribers drain.
    let deadline = Instant::now() + cfg.drain;
    while acked.load(Ordering::Relaxed) < next && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published = acked.load(Ordering::Relaxed);
    while seen.iter().any(|s| s.received.load(Ordering::Relaxed) < published) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (Some(a), Some(b)) = (window_start, window_end) else { anyhow::bail!("no measured window") };
    let secs = b.0.duration_since(a.0).as_secs_f64();
    let deliveries = b.3 - a.3;
    let broker_cpu = (b.1.cpu - a.1.cpu).as_secs_f64();
    let bench_cpu = (b.2.cpu - a.2.cpu).as_secs_f64();
    let mut lost = 0;
    for s in &seen {
        let bits = s.bits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let have: u64 = (0..published)
            .filter(|seq| bits.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0))
            .count() as u64;
        lost += published - have;
    }
    let mut samples: Vec<u32> = seen
        .iter()
        .flat_map(|s| s.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
        .collect();
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let i = ((samples.len() as f64 * p) as usize).min(samples.len() - 1);
        f64::from(samples[i]) / 1000.0
    };
    let result = FanoutResult {
        system,
        published_per_s: (b.4 - a.4) as f64 / secs,
        delivered_per_s: deliveries as f64 / secs,
        cpu_us_per_delivery: if deliveries > 0 { broker_cpu * 1e6 / deliveries as f64 } else { f64::NAN },
        broker_cpu_share: broker_cpu / secs,
        bench_cpu_share: bench_cpu / secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        published,
        lost,
        duplicates: seen.iter().map(|s| s.duplicates.load(Ordering::Relaxed)).sum(),
        reordered: seen.iter().map(|s| s.reordered.load(Ordering::Relaxed)).sum(),
    };
    ack_task.abort();
    for t in tasks {
        t.abort();
    }
    drop(broker);
    Ok(result)
}

/// Runs every system in turn and returns the table.
pub async fn run(cfg: &FanoutConfig) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    for system in &cfg.systems {
        rows.push(run_one(*system, cfg).await.with_context(|| format!("{} run failed", system.name()))?);
    }
    Ok(table(cfg, &rows))
}

fn table(cfg: &FanoutConfig, rows: &[FanoutResult]) -> String {
    let mut out = format!(
        "fan-out: 1 QoS 1 publisher at {} msg/s ({} B) -> {} QoS 1 subscribers ({} sessions), {:?} measured after {:?}\n\
         | system | published/s | delivered/s | broker CPU | CPU per delivery | p50 | p99 | bench CPU | published | lost | duplicates | reordered |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        cfg.rate,
        cfg.payload_size,
        cfg.subscribers,
        if cfg.persistent { "persistent" } else { "clean" },
        cfg.duration,
        cfg.warmup
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} % | {:.2} µs | {:.1} ms | {:.1} ms | {:.0} % | {} | {} | {} | {} |\n",
            r.system.name(),
            r.published_per_s,
            r.delivered_per_s,
            r.broker_cpu_share * 100.0,
            r.cpu_us_per_delivery,
            r.p50_ms,
            r.p99_ms,
            r.bench_cpu_share * 100.0,
            r.published,
            r.lost,
            r.duplicates,
            r.reordered
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_carries_its_sequence_and_send_time_and_has_the_asked_size() {
        let p = encode_payload(7, 99, 200);
        assert_eq!(p.len(), 200);
        assert_eq!(u64::from_be_bytes(p[..8].try_into().expect("8 bytes")), 7);
        assert_eq!(u64::from_be_bytes(p[8..16].try_into().expect("8 bytes")), 99);
        assert_eq!(encode_payload(1, 2, 4).len(), 16, "never shorter than its header");
    }

    #[test]
    fn a_connect_packet_says_clean_session_or_not() {
        let clean = connect_packet("c", true);
        let kept = connect_packet("c", false);
        assert_eq!(clean[0], 0x10);
        assert_eq!(clean[9], 0x02);
        assert_eq!(kept[9], 0x00);
    }
}
