//! `outpost-sim floor-bench`: what answering a sensor costs at the least, next to Outpost and
//! the Mosquitto bridge under the same fleet.
//!
//! The floor is `outpost-sim puback-floor` ([`serve_floor`]): one current-thread tokio
//! runtime, a task per connection, TCP_NODELAY, rumqttc's 3.1.1 codec; it answers CONNECT,
//! each QoS 1 PUBLISH (its PUBACK written in the turn that read it) and PINGREQ, and keeps and
//! forwards nothing. It is the shape of Outpost's ingest with everything after the read taken
//! away, so what Outpost costs above it is what the rest (rules, the route stage, the relay, the
//! upstream, holding the PUBACK) costs, and what a target relative to the bridge leaves for it.
//!
//! For each system, run and rate: the system starts (Outpost and the bridge each with a
//! Mosquitto upstream of their own, as in `compare`), the fleet connects and publishes evenly
//! at the rate, and after a settling period the system's CPU time over a window
//! (`/proc/PID/stat`, user and kernel) is divided by the publishes acknowledged in it. The
//! systems' order alternates between runs, so a machine that gets busier during the run does
//! not favour one of them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PingResp, PubAck};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use std::process::Command;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::compare::cpu_per_event;
use crate::fleet::{FleetConfig, FleetProgress, run_fleet_with_progress};
use crate::harness::{free_addr, wait_until};
use crate::process::{ChildProcess, ProcessStats};
use crate::systems::{Gateway, GatewayKind, GatewaySpec, start_upstream_mosquitto};

/// The largest packet the floor takes: far above any reading.
const MAX_PACKET: usize = 1024 * 1024;
/// Time for a system to settle after the fleet connected, before the window: a measured
/// quiet period, not a synchronisation.
const SETTLE: Duration = Duration::from_secs(3);
/// How long the fleet may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Answers MQTT 3.1.1 clients on `listener` until `cancel` fires: CONNACK, PUBACK for each QoS 1
/// PUBLISH, PINGRESP; nothing is kept or forwarded.
pub async fn serve_floor(listener: TcpListener, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A connection reset before it was taken: the next one is unaffected.
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(answer(stream, cancel.clone()));
    }
}

/// One connection: reads, answers what it read in the same turn, until the client leaves.
async fn answer(mut stream: TcpStream, cancel: CancellationToken) {
    let mut inbuf = BytesMut::with_capacity(4096);
    let mut outbuf = BytesMut::with_capacity(64);
    loop {
        let read = tokio::select! {
            () = cancel.cancelled() => return,
            read = stream.read_buf(&mut inbuf) => read,
        };
        if !matches!(read, Ok(n) if n > 0) {
            return;
        }
        loop {
            let answered = match Packet::read(&mut inbuf, MAX_PACKET) {
                Ok(Packet::Connect(_)) => ConnAck::new(ConnectReturnCode::Success, false).write(&mut outbuf),
                Ok(Packet::Publish(publish)) if publish.qos == QoS::AtLeastOnce => {
                    PubAck::new(publish.pkid).write(&mut outbuf)
                }
                Ok(Packet::PingReq) => PingResp.write(&mut outbuf),
                Ok(Packet::Disconnect) => return,
                Ok(_) => Ok(0),
                Err(CodecError::InsufficientBytes(_)) => break,
                // Not a client this bench runs: close.
                Err(_) => return,
            };
            if answered.is_err() {
                return;
            }
        }
        if !outbuf.is_empty() {
            if stream.write_all(&outbuf).await.is_err() {
                return;
            }
            outbuf.clear();
        }
    }
}

/// One system measured at one rate in one run.
#[derive(Debug, Clone)]
pub struct FloorRow {
    pub system: &'static str,
    pub run: usize,
    /// Publishes per second offered by the fleet.
    pub rate: u32,
    /// Publishes acknowledged per second in the window.
    pub acked_per_s: f64,
    /// The system's CPU time per acknowledged publish, µs, and its kernel part.
    pub cpu_us: Option<f64>,
    pub kernel_us: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct FloorBenchConfig {
    pub outpost: PathBuf,
    pub mosquitto: PathBuf,
    pub sensors: usize,
    pub rates: Vec<u32>,
    pub payload_size: usize,
    pub window: Duration,
    pub runs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Floor,
    Outpost,
    Bridge,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Floor => "floor",
            System::Outpost => "outpost",
            System::Bridge => "mosquitto-bridge",
        }
    }
}

/// What keeps a system running while it is measured; dropping it stops it.
enum Running {
    Floor(ChildProcess),
    Gateway { gateway: Box<Gateway>, _upstream: ChildProcess },
}

impl Running {
    fn pid(&self) -> anyhow::Result<u32> {
        match self {
            Running::Floor(child) => Ok(child.pid()),
            Running::Gateway { gateway, .. } => gateway.pid(),
        }
    }
}

pub async fn run_floor_bench(
    cfg: FloorBenchConfig,
    cancel: CancellationToken,
) -> anyhow::Result<Vec<FloorRow>> {
    if cfg.sensors == 0 || cfg.runs == 0 || cfg.rates.is_empty() || cfg.rates.contains(&0) {
        anyhow::bail!("--sensors, --runs and every rate must be above 0");
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut rows = Vec::new();
    for run in 1..=cfg.runs {
        let mut order = [System::Floor, System::Outpost, System::Bridge];
        if run % 2 == 0 {
            order.reverse();
        }
        for system in order {
            let work = dir.path().join(format!("{}-{run}", system.name()));
            std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
            let (running, listen) = start(&cfg, system, &work).await?;
            let pid = running.pid()?;
            for &rate in &cfg.rates {
                let row = tokio::select! {
                    () = cancel.cancelled() => anyhow::bail!("cancelled"),
                    row = measure(&cfg, system, run, rate, listen, pid) => row?,
                };
                eprintln!(
                    "   {} run {run}, {rate}/s: {} µs/event ({} in the kernel), {:.0} acknowledged/s",
                    system.name(),
                    fmt_us(row.cpu_us),
                    fmt_us(row.kernel_us),
                    row.acked_per_s
                );
                rows.push(row);
            }
            drop(running);
        }
    }
    Ok(rows)
}

async fn start(
    cfg: &FloorBenchConfig,
    system: System,
    dir: &std::path::Path,
) -> anyhow::Result<(Running, SocketAddr)> {
    let listen = free_addr()?;
    if system == System::Floor {
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let mut command = Command::new(exe);
        command.arg("puback-floor").arg("--listen").arg(listen.to_string());
        let mut child = ChildProcess::spawn("puback-floor", command)?;
        child.wait_accepting(listen, Duration::from_secs(10)).await?;
        return Ok((Running::Floor(child), listen));
    }
    let kind = if system == System::Outpost { GatewayKind::Outpost } else { GatewayKind::MosquittoBridge };
    let upstream_addr = free_addr()?;
    let upstream = start_upstream_mosquitto(&cfg.mosquitto, upstream_addr, dir).await?;
    let gateway = Gateway::start(GatewaySpec {
        kind,
        binary: if system == System::Outpost { cfg.outpost.clone() } else { cfg.mosquitto.clone() },
        listen,
        upstream: upstream_addr,
        dir: dir.join("gateway"),
        outpost_config: None,
        rules: None,
        tls_ca: None,
        autosave: Duration::from_secs(1),
    })
    .await?;
    Ok((Running::Gateway { gateway: Box::new(gateway), _upstream: upstream }, listen))
}

async fn measure(
    cfg: &FloorBenchConfig,
    system: System,
    run: usize,
    rate: u32,
    listen: SocketAddr,
    pid: u32,
) -> anyhow::Result<FloorRow> {
    let progress = Arc::new(FleetProgress::default());
    let stop = CancellationToken::new();
    let _stop_fleet = stop.clone().drop_guard();
    let fleet = FleetConfig {
        broker: listen.to_string(),
        sensors: cfg.sensors,
        rate_per_sensor: f64::from(rate) / cfg.sensors as f64,
        duration: Some(CONNECT_TIMEOUT + SETTLE + cfg.window),
        qos: rumqttc::QoS::AtLeastOnce,
        client_prefix: format!("floor-{rate}-"),
        payload_size: cfg.payload_size,
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(run_fleet_with_progress(fleet, stop.clone(), Arc::clone(&progress)));
    let sensors = cfg.sensors as u64;
    let connected = wait_until("the fleet connected", CONNECT_TIMEOUT, || {
        progress.connected() >= sensors || fleet.is_finished()
    })
    .await;
    if connected.is_err() || progress.connected() < sensors {
        anyhow::bail!("{}: {} of {sensors} sensors connected", system.name(), progress.connected());
    }
    tokio::time::sleep(SETTLE).await;
    let (before, acked_before, started) = (ProcessStats::read(pid)?, progress.acked(), Instant::now());
    // The measured window itself.
    tokio::time::sleep(cfg.window).await;
    let (after, acked_after, elapsed) = (ProcessStats::read(pid)?, progress.acked(), started.elapsed());
    stop.cancel();
    let _ = fleet.await;
    let acked = acked_after.saturating_sub(acked_before);
    // `compare`'s measure; its kernel part is the same over the `sys` times.
    let kernel = |stats: ProcessStats| ProcessStats { cpu: stats.sys, ..stats };
    Ok(FloorRow {
        system: system.name(),
        run,
        rate,
        acked_per_s: acked as f64 / elapsed.as_secs_f64(),
        cpu_us: cpu_per_event(&before, &after, acked),
        kernel_us: cpu_per_event(&kernel(before), &kernel(after), acked),
    })
}

fn fmt_us(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |us| format!("{us:.1}"))
}

/// The rows as a Markdown table, one line per system, run and rate.
pub fn table(cfg: &FloorBenchConfig, rows: &[FloorRow]) -> String {
    let mut out = format!(
        "floor bench: {} sensors, QoS 1, {} B payloads, {} s windows\n\n\
         | system | run | offered/s | acknowledged/s | CPU µs/event | of which kernel |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
        cfg.sensors,
        cfg.payload_size,
        cfg.window.as_secs_f64()
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} |\n",
            row.system,
            row.run,
            row.rate,
            row.acked_per_s,
            fmt_us(row.cpu_us),
            fmt_us(row.kernel_us)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::run_fleet;

    #[tokio::test]
    async fn the_floor_acknowledges_every_qos1_publish() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        tokio::spawn(serve_floor(listener, cancel.clone()));
        let summary = run_fleet(
            FleetConfig {
                broker: addr.to_string(),
                sensors: 3,
                rate_per_sensor: 200.0,
                count_per_sensor: Some(20),
                qos: rumqttc::QoS::AtLeastOnce,
                payload_size: 100,
                ..FleetConfig::default()
            },
            cancel.clone(),
        )
        .await
        .expect("the fleet runs");
        assert_eq!((summary.sent, summary.acked, summary.refused), (60, 60, 0), "{summary:?}");
    }
}
