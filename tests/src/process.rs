//! Spawned programs: output captured line by line, waits on lines and on exit, signals, and
//! their resident memory.
//!
//! # Invariants
//! - A [`ChildProcess`] never outlives its value: dropping it sends SIGKILL and reaps the
//!   process, unless it was already reaped.
//! - Signals are only sent to a process that has not been reaped, so its pid cannot have been
//!   reused by another process (an exited but unreaped child keeps its pid as a zombie).
//! - Exit is observed as an event: both output pipes reaching end-of-file. Only then does
//!   [`ChildProcess::wait_exit`] call the blocking `wait`, which then returns at once.

use std::io::{BufRead as _, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::time::Instant;

/// How many of the last output lines a failure message includes.
const TAIL_LINES: usize = 40;

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
struct Output {
    lines: Mutex<Vec<String>>,
    state: watch::Sender<OutputState>,
}

impl Output {
    fn lines(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A reader thread only pushes while holding the lock; a poisoned vector is still whole.
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A program started by a test. Dropping it kills it.
#[derive(Debug)]
pub struct ChildProcess {
    /// Names the process in messages, e.g. `outpost` or `mosquitto :41234`.
    name: String,
    child: Child,
    output: Arc<Output>,
    /// Set once the process was reaped; afterwards it is never signalled.
    exit: Option<ExitStatus>,
}

/// Whether captured lines are also echoed to the test's stderr as they arrive (`E2E_ECHO=1`).
fn echo_enabled() -> bool {
    std::env::var_os("E2E_ECHO").is_some_and(|v| v == "1")
}

impl ChildProcess {
    /// Spawns `command` with stdout and stderr captured and stdin closed.
    pub fn spawn(name: impl Into<String>, mut command: Command) -> anyhow::Result<ChildProcess> {
        let name = name.into();
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("cannot start {name}: {command:?}"))?;
        let (state, _) = watch::channel(OutputState { lines: 0, open_streams: 2 });
        let output = Arc::new(Output { lines: Mutex::new(Vec::new()), state });
        let stdout = child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        for (stream, label) in [(stdout, "stdout"), (stderr, "stderr")] {
            let Some(stream) = stream else { continue };
            let output = Arc::clone(&output);
            let prefix = format!("[{name} {label}] ");
            std::thread::Builder::new()
                .name(format!("e2e-{label}"))
                .spawn(move || read_lines(stream, &output, &prefix))
                .with_context(|| format!("cannot start the {label} reader of {name}"))?;
        }
        Ok(ChildProcess { name, child, output, exit: None })
    }

    /// The process name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every line captured so far, stdout and stderr interleaved in arrival order.
    pub fn lines(&self) -> Vec<String> {
        self.output.lines().clone()
    }

    /// The last captured lines, for failure messages.
    pub fn tail(&self) -> String {
        let lines = self.output.lines();
        let start = lines.len().saturating_sub(TAIL_LINES);
        let mut tail = format!("--- last {} output lines of {} ---\n", lines.len() - start, self.name);
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
        let deadline = Instant::now() + timeout;
        let mut changes = self.output.state.subscribe();
        let mut checked = 0;
        loop {
            // Mark the state seen before scanning, so a line pushed after the scan wakes us.
            let state = *changes.borrow_and_update();
            if state.lines > checked {
                let lines = self.output.lines();
                if let Some(line) = lines[checked..].iter().find(|line| predicate(line)) {
                    return Ok(line.clone());
                }
                checked = lines.len();
            }
            if state.open_streams == 0 {
                anyhow::bail!("{} exited before writing {what}\n{}", self.name, self.tail());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(_) => {}
                Err(_) => {
                    anyhow::bail!("{} did not write {what} within {timeout:?}\n{}", self.name, self.tail())
                }
            }
        }
    }

    /// The operating-system process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`). Fails if the process was already reaped.
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        anyhow::ensure!(self.exit.is_none(), "{} already exited; not signalling it", self.name);
        send_signal(self.child.id(), signal).with_context(|| format!("cannot signal {}", self.name))
    }

    /// Waits until the process exits (both output pipes closed), reaps it and returns its
    /// status. Fails if that takes longer than `timeout`; the process then keeps running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let mut changes = self.output.state.subscribe();
        let closed = tokio::time::timeout(timeout, changes.wait_for(|state| state.open_streams == 0)).await;
        if closed.is_err() {
            anyhow::bail!("{} did not exit within {timeout:?}\n{}", self.name, self.tail());
        }
        // Both pipes are closed, so the process has exited or is exiting: this wait is short.
        let status = self.child.wait().with_context(|| format!("cannot reap {}", self.name))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit(timeout).await
    }

    /// Sends SIGKILL and reaps the process (SIGKILL cannot be caught, so this is immediate).
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        self.child.kill().with_context(|| format!("cannot kill {}", self.name))?;
        let status = self.child.wait().with_context(|| format!("cannot reap {}", self.name))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Whether the process has been reaped by [`wait_exit`](Self::wait_exit) or
    /// [`kill`](Self::kill).
    pub fn has_exited(&self) -> bool {
        self.exit.is_some()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // Errors mean the process is already gone; there is nothing left to clean up.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `stream` line by line into `output` until end-of-file, then marks the stream closed.
fn read_lines(stream: Box<dyn Read + Send>, output: &Output, echo_prefix: &str) {
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
                output.lines().push(line);
                output.state.send_modify(|state| state.lines += 1);
            }
        }
    }
    output.state.send_modify(|state| state.open_streams -= 1);
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

/// The resident memory (`VmRSS` in `/proc/<pid>/status`) of process `pid`, in KiB.
///
/// A free function rather than a [`ChildProcess`] method so that a sampler task can poll it
/// while the test owns the process; the caller stops sampling before it reaps the process.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .with_context(|| format!("no `VmRSS` line in {path}"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("bad `VmRSS` line in {path}: {line}"))
}

/// Runs a command to completion and returns its output; for short one-shot commands.
pub fn run_to_completion(mut command: Command) -> anyhow::Result<std::process::Output> {
    command.stdin(Stdio::null());
    command.output().with_context(|| format!("cannot run {command:?}"))
}
