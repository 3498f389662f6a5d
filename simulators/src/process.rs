//! Child processes for the simulators and the test harness: output captured line by line (or
//! appended to a log file), waits on lines, on exit and on a listening port, signals, and
//! their CPU and memory through `/proc`. Dropped, they are killed.
//!
//! # Invariants
//! - A [`ChildProcess`] never outlives its value: dropping it sends SIGKILL and reaps the
//!   process, unless it was already reaped.
//! - A process is only signalled before it was reaped, so its pid cannot belong to another
//!   process by then (an exited but unreaped child keeps its pid as a zombie).
//! - Output goes to a file or to reader threads, never to a pipe nobody reads, so a chatty
//!   child cannot block.
//! - Captured output: exit is observed as an event, both output pipes reaching end-of-file.
//!   Only then does [`ChildProcess::wait_exit`] call the blocking `wait`, which then returns at
//!   once.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::time::Instant;

/// Progress of a process's captured output.
#[derive(Debug, Clone, Copy)]
struct OutputState {
    /// Lines captured so far (stdout and stderr together).
    lines: usize,
    /// Output streams not yet at end-of-file; 0 means the process has exited.
    open_streams: usize,
}

/// Lines a process wrote, shared with the threads that read its pipes.
#[derive(Debug)]
struct Captured {
    lines: Mutex<Vec<String>>,
    state: watch::Sender<OutputState>,
}

impl Captured {
    fn lines(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A reader thread only pushes while holding the lock; a poisoned vector is still whole.
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a process's stdout and stderr go.
#[derive(Debug)]
enum Output {
    /// Kept in memory, line by line: for tests, which wait on lines.
    Captured(Arc<Captured>),
    /// Appended to this file: for long simulator runs, whose logs the user reads afterwards.
    File(PathBuf),
}

/// A spawned program. Dropping it kills it.
#[derive(Debug)]
pub struct ChildProcess {
    /// Names the process in messages, e.g. `outpost` or `mosquitto :41234`.
    name: String,
    child: Child,
    output: Output,
    /// Set once the process was reaped; afterwards it is never signalled.
    exit: Option<ExitStatus>,
}

/// Whether captured lines are also echoed to stderr as they arrive (`E2E_ECHO=1`).
fn echo_enabled() -> bool {
    std::env::var_os("E2E_ECHO").is_some_and(|v| v == "1")
}

impl ChildProcess {
    /// Spawns `command` with stdin closed and stdout and stderr captured line by line.
    pub fn spawn(name: impl Into<String>, mut command: Command) -> anyhow::Result<ChildProcess> {
        let name = name.into();
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("cannot start {name}: {command:?}"))?;
        let (state, _) = watch::channel(OutputState { lines: 0, open_streams: 2 });
        let captured = Arc::new(Captured { lines: Mutex::new(Vec::new()), state });
        let stdout = child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        // Built before the threads start: if one cannot start, dropping this kills the child.
        let process =
            ChildProcess { name, child, output: Output::Captured(Arc::clone(&captured)), exit: None };
        for (stream, label) in [(stdout, "stdout"), (stderr, "stderr")] {
            let Some(stream) = stream else { continue };
            let captured = Arc::clone(&captured);
            let prefix = format!("[{} {label}] ", process.name);
            std::thread::Builder::new()
                .name(format!("child-{label}"))
                .spawn(move || read_lines(stream, &captured, &prefix))
                .with_context(|| format!("cannot start the {label} reader of {}", process.name))?;
        }
        Ok(process)
    }

    /// Spawns `command` with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn_logged(
        name: impl Into<String>,
        mut command: Command,
        log: &Path,
    ) -> anyhow::Result<ChildProcess> {
        let name = name.into();
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open the log file {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("cannot open the log file {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command.spawn().with_context(|| format!("cannot start {name}: {command:?}"))?;
        Ok(ChildProcess { name, child, output: Output::File(log.to_path_buf()), exit: None })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every line captured so far, stdout and stderr interleaved in arrival order; empty for a
    /// process whose output goes to a log file.
    pub fn lines(&self) -> Vec<String> {
        match &self.output {
            Output::Captured(captured) => captured.lines().clone(),
            Output::File(_) => Vec::new(),
        }
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

    /// Fails with the end of its output if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().with_context(|| format!("cannot check on {}", self.name))?;
        }
        match self.exit {
            None => Ok(()),
            Some(status) => anyhow::bail!("{} exited ({status})\n{}", self.name, self.tail()),
        }
    }

    /// Whether the process has been reaped.
    pub fn has_exited(&self) -> bool {
        self.exit.is_some()
    }

    /// CPU time and memory, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
    pub fn stats(&self) -> anyhow::Result<ProcessStats> {
        anyhow::ensure!(
            self.exit.is_none(),
            "{} already exited; its pid may name another process",
            self.name
        );
        ProcessStats::read(self.pid())
    }

    /// The last lines of the process's output, for error messages.
    pub fn tail(&self) -> String {
        let (lines, source) = match &self.output {
            Output::Captured(captured) => (captured.lines().clone(), "output".to_string()),
            Output::File(log) => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                (text.lines().map(str::to_owned).collect(), log.display().to_string())
            }
        };
        let start = lines.len().saturating_sub(TAIL_LINES);
        let mut tail = format!("--- last {} lines of {} ({source}) ---\n", lines.len() - start, self.name);
        for line in &lines[start..] {
            tail.push_str(line);
            tail.push('\n');
        }
        tail
    }

    /// Waits until a captured line (already written or still to come) satisfies `predicate`
    /// and returns it. Fails if `timeout` passes or the process exits first; `what` describes
    /// the awaited line in that message.
    pub async fn wait_for_line(
        &self,
        what: &str,
        timeout: Duration,
        mut predicate: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<String> {
        let Output::Captured(captured) = &self.output else {
            anyhow::bail!("the output of {} goes to a log file; it cannot be waited on", self.name)
        };
        let deadline = Instant::now() + timeout;
        let mut changes = captured.state.subscribe();
        let mut checked = 0;
        loop {
            // Mark the state seen before scanning, so a line pushed after the scan wakes us.
            let state = *changes.borrow_and_update();
            if state.lines > checked {
                let lines = captured.lines();
                if let Some(line) = lines[checked..].iter().find(|line| predicate(line)) {
                    return Ok(line.clone());
                }
                checked = lines.len();
            }
            if state.open_streams == 0 {
                anyhow::bail!("{} exited before writing {what}\n{}", self.name, self.tail());
            }
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                anyhow::bail!("{} did not write {what} within {timeout:?}\n{}", self.name, self.tail())
            }
        }
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
                    self.tail()
                );
            }
            // A poll interval while the child starts, not a synchronisation by sleeping.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`). Fails if the process was already reaped.
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        anyhow::ensure!(self.exit.is_none(), "{} already exited; not signalling it", self.name);
        send_signal(self.child.id(), signal).with_context(|| format!("cannot signal {}", self.name))
    }

    /// Waits until the process exits, reaps it and returns its status. Fails if that takes
    /// longer than `timeout`; the process then keeps running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        match &self.output {
            Output::Captured(captured) => {
                let mut changes = captured.state.subscribe();
                let closed =
                    tokio::time::timeout(timeout, changes.wait_for(|state| state.open_streams == 0)).await;
                if closed.is_err() {
                    anyhow::bail!("{} did not exit within {timeout:?}\n{}", self.name, self.tail());
                }
            }
            Output::File(_) => {
                // No pipe announces the exit: ask the kernel until it happened.
                let child = &mut self.child;
                let exited = crate::harness::wait_until("the process exited", timeout, || {
                    child.try_wait().is_ok_and(|status| status.is_some())
                })
                .await;
                if exited.is_err() {
                    anyhow::bail!("{} did not exit within {timeout:?}\n{}", self.name, self.tail());
                }
            }
        }
        // The process has exited (or is exiting, its pipes closed): this wait is short.
        let status = self.child.wait().with_context(|| format!("cannot reap {}", self.name))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit(timeout).await
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Errors mean the process is already gone; there is nothing left to clean up.
        let _ = self.kill();
    }
}

/// Reads `stream` line by line into `captured` until end-of-file, then marks the stream closed.
fn read_lines(stream: Box<dyn Read + Send>, captured: &Captured, echo_prefix: &str) {
    let echo = echo_enabled();
    let mut reader = BufReader::new(stream);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buffer).trim_end_matches(['\n', '\r']).to_owned();
                if echo {
                    eprintln!("{echo_prefix}{line}");
                }
                captured.lines().push(line);
                captured.state.send_modify(|state| state.lines += 1);
            }
        }
    }
    captured.state.send_modify(|state| state.open_streams -= 1);
}

/// Sends a signal to a process by id.
#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. Callers only pass the
    // pid of a child they have not reaped, so it still names that child.
    let result = unsafe { libc::kill(pid, signal) };
    if result == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Runs a command to completion and returns its output; for short one-shot commands.
pub fn run_to_completion(mut command: Command) -> anyhow::Result<std::process::Output> {
    command.stdin(Stdio::null());
    command.output().with_context(|| format!("cannot run {command:?}"))
}

/// The resident memory (`VmRSS`) of process `pid`, in KiB.
///
/// A free function rather than a [`ChildProcess`] method so that a sampler task can poll it
/// while the test owns the process; the caller stops sampling before it reaps the process.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_status_kib(&status, "VmRSS:").with_context(|| format!("no `VmRSS` line in {path}"))
}

/// How many of the last output lines an error message includes.
const TAIL_LINES: usize = 40;

/// What `/proc` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessStats {
    /// User plus system CPU time of all its threads, live and exited.
    pub cpu: Duration,
    /// The system (kernel) part of `cpu`: syscalls, the TCP stack, being woken.
    pub sys: Duration,
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
        let (user, sys) =
            parse_user_sys_ticks(&stat).with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))?;
        Ok(ProcessStats {
            cpu: ticks_to_duration(user + sys),
            sys: ticks_to_duration(sys),
            rss_kib: parse_status_kib(&status, "VmRSS:").unwrap_or(0),
            peak_rss_kib: parse_status_kib(&status, "VmHWM:").unwrap_or(0),
        })
    }
}

/// The CPU time of each thread of process `pid` so far, with its name (`comm`), from
/// `/proc/<pid>/task/*/stat`; for a process that measures its own threads apart (a bench whose
/// clients run next to the code under test). Threads that end while this reads are left out.
pub fn thread_cpu_times(pid: u32) -> anyhow::Result<Vec<(u32, String, Duration)>> {
    let dir = format!("/proc/{pid}/task");
    let mut threads = Vec::new();
    for task in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))?.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|name| name.parse().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let comm = stat.find('(').zip(stat.rfind(')')).and_then(|(open, close)| stat.get(open + 1..close));
        if let (Some(comm), Some(ticks)) = (comm, parse_cpu_ticks(&stat)) {
            threads.push((tid, comm.to_owned(), ticks_to_duration(ticks)));
        }
    }
    Ok(threads)
}

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64)
}

/// `utime + stime` from the text of `/proc/<pid>/stat`, in clock ticks.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    parse_user_sys_ticks(stat).map(|(user, sys)| user + sys)
}

/// `(utime, stime)` from the text of `/proc/<pid>/stat`, in clock ticks.
fn parse_user_sys_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name (field 2) is in parentheses and may contain spaces; fields after it are
    // numbered from 3, so utime (14) and stime (15) are the 12th and 13th after the ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The KiB value of a `/proc/<pid>/status` line such as `VmRSS:   1234 kB`.
fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The kernel's USER_HZ, asked of `getconf CLK_TCK` once; 100, its value on every mainstream
/// Linux architecture, if that fails. CPU times from `/proc` are multiples of its inverse.
pub fn clock_ticks_per_second() -> u64 {
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
        let threads = thread_cpu_times(std::process::id()).expect("read own threads");
        let pid = std::process::id();
        assert!(threads.iter().any(|(tid, _, _)| *tid == pid), "the main thread is listed: {threads:?}");
    }

    #[tokio::test]
    async fn captures_lines_and_observes_the_exit() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo starting; echo ready >&2; exit 3"]);
        let mut child = ChildProcess::spawn("sh", command).expect("spawn sh");
        let line = child
            .wait_for_line("`ready`", Duration::from_secs(10), |line| line == "ready")
            .await
            .expect("the line arrives");
        assert_eq!(line, "ready");
        let status = child.wait_exit(Duration::from_secs(10)).await.expect("exits");
        assert_eq!(status.code(), Some(3));
        assert!(
            child.has_exited() && child.signal(libc::SIGTERM).is_err(),
            "a reaped child is not signalled"
        );
        assert!(child.tail().contains("starting"), "{}", child.tail());
    }

    #[tokio::test]
    async fn kills_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new("sleep");
        command.arg("60");
        let child =
            ChildProcess::spawn_logged("sleep", command, &dir.path().join("sleep.log")).expect("spawn sleep");
        let pid = child.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(child);
        // Reaped, so the pid is gone (or, rarely, reused by an unrelated process).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!stat.contains("(sleep)"), "{stat}");
    }
}
