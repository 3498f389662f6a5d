//! Child processes for `compare` and `demo`: spawned with their output in a log file, measured
//! through `/proc`, and killed when dropped.
//!
//! # Invariants
//! - A [`ChildProcess`] never outlives its value: dropping it sends SIGKILL and reaps the
//!   process, unless it was already reaped.
//! - A process is only signalled before it was reaped, so its pid cannot belong to another
//!   process by then.
//! - Output goes to a file, never to a pipe nobody reads, so a chatty child cannot block.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

/// A spawned program. Dropping it kills it.
#[derive(Debug)]
pub struct ChildProcess {
    /// Names the process in messages, e.g. `outpost` or `mosquitto (edge)`.
    name: String,
    child: Child,
    /// Where stdout and stderr go.
    log: PathBuf,
    /// Set once the process was reaped; afterwards it is never signalled.
    exit: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `command` with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn(name: impl Into<String>, mut command: Command, log: &Path) -> anyhow::Result<ChildProcess> {
        let name = name.into();
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open the log file {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("cannot open the log file {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command.spawn().with_context(|| format!("cannot start {name}: {command:?}"))?;
        Ok(ChildProcess { name, child, log: log.to_path_buf(), exit: None })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Kills the process with SIGKILL (a crash: no chance to flush) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        if self.child.try_wait().with_context(|| format!("cannot check on {}", self.name))?.is_none() {
            // Fails only if the process already exited, which `wait` then reports.
            let _ = self.child.kill();
        }
        let status = self.child.wait().with_context(|| format!("cannot reap {}", self.name))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Fails with the end of the log if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().with_context(|| format!("cannot check on {}", self.name))?;
        }
        match self.exit {
            None => Ok(()),
            Some(status) => anyhow::bail!("{} exited ({status})\n{}", self.name, self.log_tail()),
        }
    }

    /// CPU time and memory, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
    pub fn stats(&self) -> anyhow::Result<ProcessStats> {
        ProcessStats::read(self.pid())
    }

    /// The last lines of the process's output, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(LOG_TAIL_LINES);
        let tail = lines[start..].join("\n");
        format!("--- last lines of {} ({}) ---\n{tail}", self.name, self.log.display())
    }

    /// Waits until `addr` accepts TCP connections, failing if the process exits first or
    /// `timeout` passes.
    pub async fn wait_accepting(&mut self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} did not accept connections on {addr} within {timeout:?}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            // A poll interval while the child starts, not a synchronisation by sleeping.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// How many log lines an error message includes.
const LOG_TAIL_LINES: usize = 30;

/// What `/proc` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessStats {
    /// User plus system CPU time of all its threads, live and exited.
    pub cpu: Duration,
    /// Resident set size now, in KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size, in KiB (`VmHWM`).
    pub peak_rss_kib: u64,
}

impl ProcessStats {
    /// Reads the stats of process `pid`.
    pub fn read(pid: u32) -> anyhow::Result<ProcessStats> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let ticks = parse_cpu_ticks(&stat).with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))?;
        Ok(ProcessStats {
            cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64),
            rss_kib: parse_status_kib(&status, "VmRSS:").unwrap_or(0),
            peak_rss_kib: parse_status_kib(&status, "VmHWM:").unwrap_or(0),
        })
    }
}

/// `utime + stime` from the text of `/proc/<pid>/stat`, in clock ticks.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces; fields after it are
    // numbered from 3, so utime (14) and stime (15) are the 12th and 13th after the ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The KiB value of a `/proc/<pid>/status` line such as `VmRSS:   1234 kB`.
fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The kernel's USER_HZ, asked of `getconf CLK_TCK` once; 100, its value on every mainstream
/// Linux architecture, if that fails.
fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&ticks: &u64| ticks > 0)
            .unwrap_or(100)
    })
}

/// A loopback address with a port that was free a moment ago.
///
/// The port is released before the caller binds it, so another process could take it in
/// between; on a test machine that is rare, and the caller's bind then fails loudly.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let probe = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    probe.local_addr().context("cannot read the probe's address")
}

/// Whether this process runs as root (uid 0), from `/proc/self/status`.
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("Uid:"))?.to_string();
            line.split_whitespace().nth(1).map(|uid| uid == "0")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = "4711 (my (odd) name) S 1 4711 4711 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_proc_status() {
        let status = "Name:\tx\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(parse_status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn measures_itself() {
        let stats = ProcessStats::read(std::process::id()).expect("read own stats");
        assert!(stats.rss_kib > 0 && stats.peak_rss_kib >= stats.rss_kib, "{stats:?}");
    }

    #[tokio::test]
    async fn kills_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new("sleep");
        command.arg("60");
        let child =
            ChildProcess::spawn("sleep", command, &dir.path().join("sleep.log")).expect("spawn sleep");
        let pid = child.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(child);
        // Reaped, so the pid is gone (or, rarely, reused by an unrelated process).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!stat.contains("(sleep)"), "{stat}");
    }
}
