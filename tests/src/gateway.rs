//! The `outpost` binary under test, and its one-shot commands.
//!
//! A [`GatewayProcess`] runs `outpost --log-format json run` with its own listen port, data
//! directory and (optionally) config file, and exposes its JSON log as the event stream tests
//! wait on: readiness is the `embedded broker listening` line, which the gateway writes only
//! once every listener accepts connections.
//!
//! # Invariants
//! - The child's environment carries no `OUTPOST_*` or `RUST_LOG` from the test's environment,
//!   so only what the test passes (arguments, a config file, [`GatewaySpec::env`]) configures the
//!   gateway.
//! - The data directory is owned by the caller (a `TempDir`), so it outlives a killed gateway
//!   and can be handed to the next one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tempfile::TempDir;

use crate::process::{ChildProcess, run_to_completion};

/// How long a gateway may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a gateway may take to stop after SIGTERM (its default `shutdown_timeout` is 10 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The readiness line: written after every broker listener accepts connections.
pub const READY_MESSAGE: &str = "embedded broker listening";

/// Environment variables the gateway reads; cleared so the test alone decides.
///
/// This includes the fault injection (`OUTPOST_FAULT_COMMIT_DELAY_MS`, `OUTPOST_FAULT_WEDGE`)
/// and the log reminder cadence: a value left in a developer's shell would otherwise slow or
/// wedge every gateway a test starts, and make unrelated tests fail on timeouts. The same goes
/// for systemd's `NOTIFY_SOCKET` and `WATCHDOG_USEC` when the tests themselves run under
/// systemd. A test that wants one sets it with [`GatewaySpec::env`].
const GATEWAY_ENV: [&str; 14] = [
    "OUTPOST_CONFIG",
    "OUTPOST_LISTEN",
    "OUTPOST_UPSTREAM",
    "OUTPOST_DATA_DIR",
    "OUTPOST_RULES",
    "OUTPOST_LOG_FORMAT",
    "OUTPOST_FAULT_COMMIT_DELAY_MS",
    "OUTPOST_FAULT_WEDGE",
    "OUTPOST_FAULT_EXIT_AFTER_CHECKPOINT",
    "OUTPOST_LOG_REMINDER_MS",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "RUST_LOG",
];

/// A `Command` for the `outpost` binary with a clean environment.
pub fn outpost_command() -> anyhow::Result<Command> {
    let mut command = Command::new(crate::binary("outpost")?);
    for name in GATEWAY_ENV {
        command.env_remove(name);
    }
    Ok(command)
}

/// How to start a gateway. Every field has a test-friendly default: a free listen port, no
/// config file, no upstream.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    /// Where the buffer lives; owned by the test so a restarted gateway can reuse it.
    pub data_dir: PathBuf,
    /// Passed as `--listen`.
    pub listen: SocketAddr,
    /// Passed as `--upstream`, when set.
    pub upstream: Option<String>,
    /// Written to a temporary `outpost.toml` and passed as `--config`, when set.
    pub config_toml: Option<String>,
    /// Passed as `--config` as is, when set (wins over `config_toml`).
    pub config_file: Option<PathBuf>,
    /// Extra environment variables for the child, set after the gateway's own were cleared:
    /// how a test turns on what only the environment controls (fault injection).
    pub env: Vec<(String, String)>,
}

impl GatewaySpec {
    pub fn new(data_dir: &Path) -> GatewaySpec {
        GatewaySpec {
            data_dir: data_dir.to_path_buf(),
            listen: crate::free_addr(),
            upstream: None,
            config_toml: None,
            config_file: None,
            env: Vec::new(),
        }
    }

    pub fn upstream(mut self, url: impl Into<String>) -> GatewaySpec {
        self.upstream = Some(url.into());
        self
    }

    pub fn config_toml(mut self, toml: impl Into<String>) -> GatewaySpec {
        self.config_toml = Some(toml.into());
        self
    }

    pub fn config_file(mut self, path: impl Into<PathBuf>) -> GatewaySpec {
        self.config_file = Some(path.into());
        self
    }

    /// Sets `name=value` in the child's environment (see the `env` field).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> GatewaySpec {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Starts the gateway and returns once it is ready.
    pub async fn start(self) -> anyhow::Result<GatewayProcess> {
        GatewayProcess::start(self).await
    }
}

/// A running `outpost` process. Dropping it kills it.
pub struct GatewayProcess {
    spec: GatewaySpec,
    process: ChildProcess,
    /// Holds the generated config file.
    _config_dir: Option<TempDir>,
}

impl GatewayProcess {
    /// Spawns `outpost --log-format json run …` and waits for the readiness line.
    pub async fn start(spec: GatewaySpec) -> anyhow::Result<GatewayProcess> {
        let mut command = outpost_command()?;
        // Set after `outpost_command` cleared the inherited variables, so that a test can set one
        // of those (the fault injection) and nothing else can.
        for (name, value) in &spec.env {
            command.env(name, value);
        }
        command.args(["--log-format", "json", "run", "--listen"]).arg(spec.listen.to_string());
        command.arg("--data-dir").arg(&spec.data_dir);
        if let Some(url) = &spec.upstream {
            command.args(["--upstream", url]);
        }
        let mut config_dir = None;
        if let Some(file) = &spec.config_file {
            command.arg("--config").arg(file);
        } else if let Some(toml) = &spec.config_toml {
            let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
            let path = dir.path().join("outpost.toml");
            std::fs::write(&path, toml).context("cannot write the gateway config")?;
            command.arg("--config").arg(&path);
            config_dir = Some(dir);
        }
        let process = ChildProcess::spawn(format!("outpost {}", spec.listen), command)?;
        let gateway = GatewayProcess { spec, process, _config_dir: config_dir };
        gateway.wait_for_message(READY_MESSAGE, START_TIMEOUT).await?;
        Ok(gateway)
    }

    /// Runs `outpost tap --format json --data-dir DIR ARGS…` against this gateway, killed on
    /// drop; returns once the daemon confirmed the tap (its stderr line), so what is published
    /// afterwards is tapped.
    pub async fn tap(&self, args: &[&str]) -> anyhow::Result<ChildProcess> {
        let mut command = outpost_command()?;
        command.args(["tap", "--format", "json", "--data-dir"]).arg(&self.spec.data_dir).args(args);
        let tap = ChildProcess::spawn(format!("outpost tap {}", self.spec.listen), command)?;
        tap.wait_for_line("that the tap attached", START_TIMEOUT, |line| line.starts_with("tapping "))
            .await?;
        Ok(tap)
    }

    /// The sensors' MQTT address.
    /// How it was started, to start it again on the same data dir and ports.
    pub fn spec(&self) -> &GatewaySpec {
        &self.spec
    }

    pub fn listen(&self) -> SocketAddr {
        self.spec.listen
    }

    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    /// The operating-system process id, for what the harness does not wrap (a sampler task
    /// reading [`rss_kib`](crate::process::rss_kib) while the test drives the gateway). It names
    /// this gateway only until [`kill`](Self::kill) or [`terminate`](Self::terminate) reaped it.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The gateway's resident memory (`VmRSS`), in KiB: what a test that bounds its memory
    /// measures. Fails once the gateway was reaped, as its pid may name another process then.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        anyhow::ensure!(!self.process.has_exited(), "{} already exited; no RSS to read", self.process.name());
        crate::process::rss_kib(self.pid())
    }

    /// Waits for a JSON log line for which `predicate` holds, and returns it parsed.
    pub async fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        mut predicate: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let line = self
            .process
            .wait_for_line(what, timeout, |line| parse_log(line).is_some_and(|log| predicate(&log)))
            .await?;
        parse_log(&line).context("the matched line is JSON")
    }

    /// Waits for a log line whose `message` starts with `prefix`.
    pub async fn wait_for_message(&self, prefix: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.wait_for_log(&format!("a log line \"{prefix}…\""), timeout, |log| {
            message_starts_with(log, prefix)
        })
        .await
    }

    /// Every JSON log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.process.lines().iter().filter_map(|line| parse_log(line)).collect()
    }

    /// Log lines so far whose `message` starts with `prefix`.
    pub fn messages(&self, prefix: &str) -> Vec<Value> {
        self.logs().into_iter().filter(|log| message_starts_with(log, prefix)).collect()
    }

    /// Sends a signal to the process (e.g. SIGSTOP/SIGCONT to freeze it while the test
    /// rearranges the world around it).
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        self.process.signal(signal)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.terminate(STOP_TIMEOUT).await
    }

    /// Waits until the gateway exits on its own (a fault injection that aborts it) and returns
    /// its status; fails after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.process.wait_exit(timeout).await
    }

    /// Kills the gateway with SIGKILL: a crash, with no chance to flush.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.kill()
    }

    /// The last output lines, for failure messages.
    pub fn tail(&self) -> String {
        self.process.tail()
    }

    /// The counters of the final `stopped` line, as name → value; fails if the gateway has not
    /// written it (yet).
    pub fn final_counters(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let stopped =
            self.messages("stopped").pop().with_context(|| format!("no `stopped` line\n{}", self.tail()))?;
        let counters = stopped.get("counters").and_then(Value::as_object).cloned().unwrap_or_default();
        counters
            .into_iter()
            .map(|(name, value)| {
                let n =
                    value.as_u64().with_context(|| format!("counter `{name}` is not a number: {value}"))?;
                Ok((name, n))
            })
            .collect()
    }
}

/// Parses one log line; `None` for lines that are not JSON objects (a panic message, say).
pub fn parse_log(line: &str) -> Option<Value> {
    serde_json::from_str::<Value>(line).ok().filter(Value::is_object)
}

/// Whether a log line's `message` starts with `prefix`.
pub fn message_starts_with(log: &Value, prefix: &str) -> bool {
    log.get("message").and_then(Value::as_str).is_some_and(|m| m.starts_with(prefix))
}

/// `outpost buffer stats --data-dir DIR`, parsed: `{"events", "bytes", "file_bytes", "priorities"}`.
pub fn buffer_stats(data_dir: &Path) -> anyhow::Result<Value> {
    let mut command = outpost_command()?;
    command.args(["buffer", "stats", "--data-dir"]).arg(data_dir);
    let output = run_to_completion(command)?;
    anyhow::ensure!(
        output.status.success(),
        "`outpost buffer stats` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!("`outpost buffer stats` printed no JSON: {}", String::from_utf8_lossy(&output.stdout))
    })
}

/// The number of buffered events according to `outpost buffer stats`.
pub fn buffered_events(data_dir: &Path) -> anyhow::Result<u64> {
    let stats = buffer_stats(data_dir)?;
    stats.get("events").and_then(Value::as_u64).with_context(|| format!("no `events` in {stats}"))
}

/// A rules file written for a test, in a temporary directory that lives as long as it does.
pub struct RulesFile {
    _dir: TempDir,
    path: PathBuf,
}

impl RulesFile {
    /// Writes `rules` (the rules file's TOML) to `rules.toml` in a new temporary directory.
    pub fn write(rules: &str) -> anyhow::Result<RulesFile> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rules).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(RulesFile { _dir: dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The gateway config's line that names it: `rules = "<path>"`.
    pub fn config_line(&self) -> String {
        format!("rules = {:?}\n", self.path.display().to_string())
    }
}

/// The letters in the gateway's durable dead-letter file (`dead-letters-upstream.jsonl`: the
/// relay's poison events and the copies a full buffer refused that no sensor would resend),
/// oldest first; none when the file does not exist yet. Fails on a line that is not JSON.
pub fn upstream_dead_letters(data_dir: &Path) -> anyhow::Result<Vec<Value>> {
    let path = data_dir.join("dead-letters-upstream.jsonl");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .map(|line| serde_json::from_str(line).with_context(|| format!("not a JSON letter: {line}")))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// What a one-shot `outpost` command did.
#[derive(Debug)]
pub struct CommandOutcome {
    /// The exit code; `None` if a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `outpost ARGS…` to completion.
pub fn outpost(args: &[&str]) -> anyhow::Result<CommandOutcome> {
    let mut command = outpost_command()?;
    command.args(args);
    let output = run_to_completion(command)?;
    Ok(CommandOutcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
