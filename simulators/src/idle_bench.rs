//! `outpost-sim idle-bench`: what an idle fleet costs, Outpost next to a Mosquitto bridge.
//!
//! Real sites keep hundreds of sensors connected that publish every few seconds or less; between
//! their publishes the gateway should cost nothing. For each system and run this starts the
//! gateway with a Mosquitto upstream of its own, then measures two windows of equal length:
//! 1. **No clients**: the gateway alone — its timers (commit cycle, keepalive checks, metrics).
//! 2. **`connections` idle clients**: MQTT 3.1.1 clients that connected (clean session,
//!    keepalive `keepalive`), each sending PINGREQ once per keepalive as real clients do, and
//!    nothing else. Their pings are spread evenly over the keepalive, as those of a fleet that
//!    connected over time are (clients connected in one burst would otherwise all ping at once,
//!    and a window shorter than the keepalive might see none).
//!
//! In each window, from `/proc/PID/task/*/schedstat` summed over the process's threads: CPU
//! time (its first field, nanoseconds on a CPU — `/proc/PID/stat` counts in 10 ms ticks, too
//! coarse for a process that is nearly idle) and wake-ups (its third field, the times the
//! kernel scheduled the thread). Memory per idle connection is the RSS with the clients
//! minus the RSS before them, over their count.
//!
//! With `outpost_config` the gateway runs with that file as its config, as `compare
//! --outpost-config` does (the listener, upstream and data directory still come from the
//! command line, [`Gateway`]); the table's header names the file.
//!
//! The systems alternate per run (Outpost, bridge, bridge, Outpost, …) so that a machine that
//! gets busier during the run does not favour one of them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::harness::free_addr;
use crate::ingest_bench::connect_packet;
use crate::systems::{Gateway, GatewayKind, GatewaySpec, start_upstream_mosquitto};

/// What one `idle-bench` run measures.
#[derive(Debug, Clone)]
pub struct IdleBenchConfig {
    pub outpost: PathBuf,
    pub mosquitto: PathBuf,
    /// A config file for Outpost instead of the generated one.
    pub outpost_config: Option<PathBuf>,
    /// Idle clients per system.
    pub connections: usize,
    /// The clients' keepalive, in seconds; each sends PINGREQ this often.
    pub keepalive_s: u16,
    /// Length of each measured window.
    pub window: Duration,
    /// Runs per system.
    pub runs: usize,
    /// Logs and data; a temporary directory when `None`.
    pub work_dir: Option<PathBuf>,
}

/// One measured window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Window {
    /// CPU time per second of wall time, in ms.
    pub cpu_ms_per_s: f64,
    /// Wake-ups (threads scheduled) per second.
    pub wakeups_per_s: f64,
}

/// One system in one run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleRow {
    pub system: &'static str,
    pub run: usize,
    pub alone: Window,
    pub with_clients: Window,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub connections: usize,
}

impl IdleRow {
    pub fn per_connection_kib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.connections as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleBenchReport {
    /// Outpost's config file, when it was not the generated one.
    pub outpost_config: Option<PathBuf>,
    pub connections: usize,
    pub keepalive_s: u16,
    pub window_s: f64,
    pub rows: Vec<IdleRow>,
}

/// Clients connecting at once; more only makes the listen backlog overflow.
const CONNECT_CONCURRENCY: usize = 50;
/// How long a client waits for its CONNACK or PINGRESP.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a system to finish starting (or connecting clients) before a window begins: a
/// measured quiet period, not a synchronisation.
const SETTLE: Duration = Duration::from_secs(2);

pub async fn run_idle_bench(
    cfg: IdleBenchConfig,
    cancel: CancellationToken,
) -> anyhow::Result<IdleBenchReport> {
    if cfg.connections == 0 || cfg.runs == 0 || cfg.keepalive_s == 0 {
        anyhow::bail!("--connections, --runs and --keepalive must be above 0");
    }
    // Checked now rather than by the first gateway start, minutes into the run.
    let outpost_config = cfg
        .outpost_config
        .as_deref()
        .map(|path| {
            std::fs::canonicalize(path)
                .with_context(|| format!("--outpost-config {}: cannot read the file", path.display()))
        })
        .transpose()?;
    let cfg = IdleBenchConfig { outpost_config, ..cfg };
    let temp;
    let dir = match &cfg.work_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("cannot create a temporary directory")?;
            temp.path().to_owned()
        }
    };
    let mut rows = Vec::new();
    for run in 1..=cfg.runs {
        let order = if run % 2 == 1 {
            [GatewayKind::Outpost, GatewayKind::MosquittoBridge]
        } else {
            [GatewayKind::MosquittoBridge, GatewayKind::Outpost]
        };
        for kind in order {
            eprintln!("== run {run}: {}", kind.name());
            let work = dir.join(format!("{}-{run}", kind.name()));
            let row = tokio::select! {
                () = cancel.cancelled() => anyhow::bail!("cancelled"),
                row = measure(&cfg, kind, run, &work) => row?,
            };
            eprintln!(
                "   alone {:.2} ms/s CPU, {:.1} wake-ups/s; {} clients {:.2} ms/s, {:.1} wake-ups/s; {:.1} KiB per connection",
                row.alone.cpu_ms_per_s,
                row.alone.wakeups_per_s,
                row.connections,
                row.with_clients.cpu_ms_per_s,
                row.with_clients.wakeups_per_s,
                row.per_connection_kib()
            );
            rows.push(row);
        }
    }
    Ok(IdleBenchReport {
        outpost_config: cfg.outpost_config.clone(),
        connections: cfg.connections,
        keepalive_s: cfg.keepalive_s,
        window_s: cfg.window.as_secs_f64(),
        rows,
    })
}

async fn measure(
    cfg: &IdleBenchConfig,
    kind: GatewayKind,
    run: usize,
    dir: &Path,
) -> anyhow::Result<IdleRow> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let upstream_addr = free_addr()?;
    let _upstream = start_upstream_mosquitto(&cfg.mosquitto, upstream_addr, dir).await?;
    let gateway = Gateway::start(GatewaySpec {
        kind,
        binary: match kind {
            GatewayKind::Outpost => cfg.outpost.clone(),
            GatewayKind::MosquittoBridge => cfg.mosquitto.clone(),
        },
        listen: free_addr()?,
        upstream: upstream_addr,
        dir: dir.join("gateway"),
        outpost_config: cfg.outpost_config.clone(),
        rules: None,
        tls_ca: None,
        autosave: Duration::from_secs(1),
    })
    .await?;
    let pid = gateway.pid()?;
    tokio::time::sleep(SETTLE).await;
    let rss_before_kib = gateway.stats()?.rss_kib;
    let alone = window(pid, cfg.window).await?;

    let stop = CancellationToken::new();
    let _stop_clients = stop.clone().drop_guard();
    let clients = connect_all(gateway.spec().listen, cfg.connections, cfg.keepalive_s, &stop).await?;
    tokio::time::sleep(SETTLE).await;
    let with_clients = window(pid, cfg.window).await?;
    let rss_after_kib = gateway.stats()?.rss_kib;
    // A client whose connection was closed or whose ping went unanswered ends its task with an
    // error: a broker that dropped idle clients would look cheap.
    if let Some(failed) = clients.failed() {
        anyhow::bail!("{}: an idle client failed during the measurement: {failed:#}", kind.name());
    }
    stop.cancel();
    Ok(IdleRow {
        system: kind.name(),
        run,
        alone,
        with_clients,
        rss_before_kib,
        rss_after_kib,
        connections: cfg.connections,
    })
}

/// CPU and wake-ups of process `pid` over `length`.
async fn window(pid: u32, length: Duration) -> anyhow::Result<Window> {
    let before = schedstat(pid)?;
    let started = Instant::now();
    tokio::time::sleep(length).await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = schedstat(pid)?;
    let cpu_ns = after.cpu_ns.saturating_sub(before.cpu_ns);
    let woke = after.timeslices.saturating_sub(before.timeslices);
    Ok(Window { cpu_ms_per_s: cpu_ns as f64 / 1e6 / elapsed, wakeups_per_s: woke as f64 / elapsed })
}

/// One `schedstat` line: `<ns on a CPU> <ns waiting for one> <timeslices run>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SchedStat {
    cpu_ns: u64,
    timeslices: u64,
}

/// The sums over every live thread of `pid`. Threads that ended are not counted, so a system
/// that spawns short-lived threads would read low; neither Outpost nor Mosquitto does while
/// idle.
fn schedstat(pid: u32) -> anyhow::Result<SchedStat> {
    let dir = format!("/proc/{pid}/task");
    let mut total = SchedStat::default();
    for task in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))?.flatten() {
        let path = task.path().join("schedstat");
        // A thread that ended since the directory was read.
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let one =
            parse_schedstat(&text).with_context(|| format!("unexpected {}: {text:?}", path.display()))?;
        total.cpu_ns += one.cpu_ns;
        total.timeslices += one.timeslices;
    }
    Ok(total)
}

fn parse_schedstat(text: &str) -> Option<SchedStat> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let cpu_ns = fields.next()?.ok()?;
    let timeslices = fields.nth(1)?.ok()?;
    Some(SchedStat { cpu_ns, timeslices })
}

/// The idle clients' tasks; each ends only on an error or when `stop` is cancelled.
struct Clients {
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Clients {
    /// The first client that failed, if any has.
    fn failed(mut self) -> Option<anyhow::Error> {
        while let Some(joined) = self.tasks.try_join_next() {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Some(error),
                Err(panic) => return Some(anyhow::anyhow!("an idle client task panicked: {panic}")),
            }
        }
        None
    }
}

async fn connect_all(
    addr: SocketAddr,
    count: usize,
    keepalive_s: u16,
    stop: &CancellationToken,
) -> anyhow::Result<Clients> {
    let mut tasks = JoinSet::new();
    let mut next = 0;
    while next < count {
        let mut batch = JoinSet::new();
        for index in next..(next + CONNECT_CONCURRENCY).min(count) {
            batch.spawn(connect(addr, format!("idle-{:05}", index + 1), keepalive_s));
        }
        next = (next + CONNECT_CONCURRENCY).min(count);
        while let Some(joined) = batch.join_next().await {
            let stream = joined.context("an idle client task panicked")??;
            let period = Duration::from_secs(u64::from(keepalive_s));
            let first = period.mul_f64(tasks.len() as f64 / count as f64);
            tasks.spawn(keep_alive(stream, first, period, stop.clone()));
        }
    }
    Ok(Clients { tasks })
}

async fn connect(addr: SocketAddr, client_id: String, keepalive_s: u16) -> anyhow::Result<TcpStream> {
    let connect = async {
        let mut stream =
            TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
        stream.write_all(&connect_packet(&client_id, keepalive_s)).await.context("cannot send CONNECT")?;
        let mut connack = [0_u8; 4];
        stream.read_exact(&mut connack).await.context("no CONNACK")?;
        if connack[0] != 0x20 || connack[1] != 0x02 || connack[3] != 0x00 {
            anyhow::bail!("refused {client_id}: CONNACK {connack:02x?}");
        }
        Ok(stream)
    };
    tokio::time::timeout(ANSWER_TIMEOUT, connect)
        .await
        .with_context(|| format!("no CONNACK for {client_id} within {ANSWER_TIMEOUT:?}"))?
}

/// PINGREQ once per `period` (the first after `first`), as a client with nothing to publish does; fails if the broker
/// closes the connection or does not answer.
async fn keep_alive(
    mut stream: TcpStream,
    first: Duration,
    period: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
    let mut probe = [0_u8; 2];
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            read = stream.read(&mut probe) => match read {
                Ok(0) => anyhow::bail!("the broker closed an idle connection"),
                Ok(_) => anyhow::bail!("the broker sent {probe:02x?} to an idle client without a ping"),
                Err(error) => return Err(error).context("an idle connection failed"),
            },
            _ = ticks.tick() => {
                stream.write_all(&[0xc0, 0x00]).await.context("cannot send PINGREQ")?;
                let mut pingresp = [0_u8; 2];
                tokio::time::timeout(ANSWER_TIMEOUT, stream.read_exact(&mut pingresp))
                    .await
                    .context("no PINGRESP")?
                    .context("no PINGRESP")?;
                if pingresp != [0xd0, 0x00] {
                    anyhow::bail!("expected PINGRESP, got {pingresp:02x?}");
                }
            }
        }
    }
}

impl IdleBenchReport {
    /// One row per system and run, then each system's mean.
    pub fn table(&self) -> String {
        let mut out = format!(
            "idle fleet: {} MQTT 3.1.1 clients, keepalive {} s (one PINGREQ each per keepalive), {:.0} s windows\n\n",
            self.connections, self.keepalive_s, self.window_s
        );
        if let Some(path) = &self.outpost_config {
            out.insert_str(0, &format!("outpost config: {}\n", path.display()));
        }
        out.push_str("| system | run | CPU ms/s alone | wake-ups/s alone | CPU ms/s with clients | wake-ups/s with clients | RSS per connection KiB |\n");
        out.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for row in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {:.2} | {:.1} | {:.2} | {:.1} | {:.1} |\n",
                row.system,
                row.run,
                row.alone.cpu_ms_per_s,
                row.alone.wakeups_per_s,
                row.with_clients.cpu_ms_per_s,
                row.with_clients.wakeups_per_s,
                row.per_connection_kib()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_has_cpu_time_first_and_timeslices_third() {
        assert_eq!(parse_schedstat("123456 7890 42\n"), Some(SchedStat { cpu_ns: 123_456, timeslices: 42 }));
        assert_eq!(parse_schedstat("123456 7890\n"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn the_table_names_outposts_config_file() {
        let report = |outpost_config: Option<&str>| IdleBenchReport {
            outpost_config: outpost_config.map(PathBuf::from),
            connections: 1000,
            keepalive_s: 60,
            window_s: 30.0,
            rows: Vec::new(),
        };
        let with = report(Some("/tmp/coalescing.toml")).table();
        assert!(with.starts_with("outpost config: /tmp/coalescing.toml\nidle fleet: 1000"), "{with}");
        assert!(!report(None).table().contains("outpost config"));
    }

    #[test]
    fn this_process_has_run() {
        let stat = schedstat(std::process::id()).expect("this process has a /proc entry");
        assert!(stat.cpu_ns > 0 && stat.timeslices > 0, "{stat:?}");
    }
}
