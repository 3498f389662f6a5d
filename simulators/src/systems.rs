//! The systems under test, as child processes: the Outpost gateway, Debian's Mosquitto as an
//! edge broker that bridges to an upstream, and Mosquitto as that upstream.
//!
//! `compare` and `demo` treat both gateways the same way through [`Gateway`]: start it on a
//! listen address with an upstream, measure it, SIGKILL it, start it again on the same state.
//!
//! # Invariants
//! - Every process lives in a [`ChildProcess`], so it is killed when its owner is dropped.
//! - A gateway's durable state (Outpost's data dir, Mosquitto's persistence location) lives in
//!   a directory the [`Gateway`] was given, so a restarted gateway finds what the killed one
//!   left.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use crate::process::{ChildProcess, ProcessStats};

/// How long a gateway or broker may take to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Which gateway runs between the sensors and the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayKind {
    /// The `outpost` binary.
    Outpost,
    /// Mosquitto with persistence and a QoS 1 bridge of every topic.
    MosquittoBridge,
}

impl GatewayKind {
    /// A short name for tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            GatewayKind::Outpost => "outpost",
            GatewayKind::MosquittoBridge => "mosquitto-bridge",
        }
    }
}

/// Everything needed to start (and restart) a gateway.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    pub kind: GatewayKind,
    /// The `outpost` or `mosquitto` executable.
    pub binary: PathBuf,
    /// The sensors' MQTT listener.
    pub listen: SocketAddr,
    /// The upstream broker (or a link in front of it).
    pub upstream: SocketAddr,
    /// Durable state and generated config files; outlives restarts.
    pub dir: PathBuf,
    /// Outpost only: a config file passed as `--config` (else one is generated).
    pub outpost_config: Option<PathBuf>,
    /// Outpost only: passed as `--rules`.
    pub rules: Option<PathBuf>,
    /// TLS to the upstream (`upstream` is then its TLS listener): the CA file its certificate
    /// is verified against. Outpost gets `mqtts://localhost:PORT` and `upstream.tls.ca_file`,
    /// the bridge `bridge_cafile`.
    pub tls_ca: Option<PathBuf>,
    /// Mosquitto only: `autosave_interval`, in whole seconds (0 saves only on exit).
    pub autosave: Duration,
}

/// A gateway process that can be killed and started again on the same state.
#[derive(Debug)]
pub struct Gateway {
    spec: GatewaySpec,
    process: Option<ChildProcess>,
    starts: u32,
}

impl Gateway {
    /// Writes the gateway's config into `spec.dir`, starts it and waits until it accepts
    /// connections.
    pub async fn start(spec: GatewaySpec) -> anyhow::Result<Gateway> {
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("cannot create {}", spec.dir.display()))?;
        let mut gateway = Gateway { spec, process: None, starts: 0 };
        gateway.restart().await?;
        Ok(gateway)
    }

    pub fn spec(&self) -> &GatewaySpec {
        &self.spec
    }

    /// The data directory of an Outpost gateway (for `outpost buffer stats`).
    pub fn data_dir(&self) -> PathBuf {
        self.spec.dir.join("data")
    }

    /// Kills the gateway with SIGKILL, if it runs.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill()?;
        }
        Ok(())
    }

    /// Kills the gateway if it runs, starts it again and waits until it accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.starts += 1;
        let log = self.spec.dir.join(format!("{}.{}.log", self.spec.kind.name(), self.starts));
        let command = match self.spec.kind {
            GatewayKind::Outpost => self.outpost_command()?,
            GatewayKind::MosquittoBridge => {
                let persistence = self.spec.dir.join("persistence");
                std::fs::create_dir_all(&persistence)
                    .with_context(|| format!("cannot create {}", persistence.display()))?;
                let mut config =
                    bridge_config(self.spec.listen, self.spec.upstream, &persistence, self.spec.autosave);
                if let Some(ca) = &self.spec.tls_ca {
                    // The certificate names localhost; the bridge checks the name it dials.
                    config = config.replace(
                        &format!("address {}\n", self.spec.upstream),
                        &format!(
                            "address localhost:{}\nbridge_cafile {}\n",
                            self.spec.upstream.port(),
                            ca.display()
                        ),
                    );
                }
                let path = self.spec.dir.join("mosquitto-edge.conf");
                std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
                let mut command = Command::new(&self.spec.binary);
                command.arg("-c").arg(&path);
                command
            }
        };
        let mut process = ChildProcess::spawn_logged(self.spec.kind.name(), command, &log)?;
        process.wait_accepting(self.spec.listen, START_TIMEOUT).await?;
        self.process = Some(process);
        Ok(())
    }

    /// CPU time and memory of the running process.
    pub fn stats(&self) -> anyhow::Result<ProcessStats> {
        self.running()?.stats()
    }

    /// The process id of the running process.
    pub fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.running()?.pid())
    }

    /// Fails with the end of its log if the process exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match &mut self.process {
            Some(process) => process.check_running(),
            None => anyhow::bail!("{} is not running", self.spec.kind.name()),
        }
    }

    /// The last lines of the running (or last started) process's output.
    pub fn log_tail(&self) -> String {
        self.process.as_ref().map(ChildProcess::tail).unwrap_or_default()
    }

    fn running(&self) -> anyhow::Result<&ChildProcess> {
        self.process.as_ref().with_context(|| format!("{} is not running", self.spec.kind.name()))
    }

    fn outpost_command(&self) -> anyhow::Result<Command> {
        let config = match &self.spec.outpost_config {
            Some(path) => path.clone(),
            None => {
                let path = self.spec.dir.join("outpost.toml");
                let mut config = outpost_config(self.spec.upstream);
                if let Some(ca) = &self.spec.tls_ca {
                    config.push_str(&format!("\n[upstream.tls]\nca_file = \"{}\"\n", ca.display()));
                }
                std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
                path
            }
        };
        let mut command = Command::new(&self.spec.binary);
        for name in
            ["OUTPOST_CONFIG", "OUTPOST_LISTEN", "OUTPOST_UPSTREAM", "OUTPOST_DATA_DIR", "OUTPOST_RULES"]
        {
            command.env_remove(name);
        }
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(self.spec.listen.to_string())
            .arg("--upstream")
            .arg(match &self.spec.tls_ca {
                Some(_) => format!("mqtts://localhost:{}", self.spec.upstream.port()),
                None => format!("mqtt://{}", self.spec.upstream),
            })
            .arg("--data-dir")
            .arg(self.data_dir());
        if let Some(rules) = &self.spec.rules {
            command.arg("--rules").arg(rules);
        }
        Ok(command)
    }
}

/// An Outpost config for benchmarks: the defaults, except a reconnect backoff capped at 1 s
/// (the bridge gets the same), so the drain time measures draining, not waiting.
pub fn outpost_config(upstream: SocketAddr) -> String {
    format!(
        r#"# Generated by outpost-sim: defaults, except the reconnect backoff.
[upstream]
url = "mqtt://{upstream}"
client_id = "outpost-sim-gateway"
reconnect_min = "100ms"
reconnect_max = "1s"

[log]
level = "warn"
"#
    )
}

/// Mosquitto as an edge broker: persistence on, a QoS 1 bridge of every topic to `upstream`,
/// a queue of up to a million messages, a constant 1 s reconnect delay.
pub fn bridge_config(
    listen: SocketAddr,
    upstream: SocketAddr,
    persistence: &Path,
    autosave: Duration,
) -> String {
    let mut config = common_config(listen);
    let _ = write!(
        config,
        "persistence true\n\
         persistence_location {}/\n\
         autosave_interval {}\n\
         max_queued_messages 1000000\n\
         max_inflight_messages 100\n\
         \n\
         connection bridge\n\
         address {upstream}\n\
         topic # out 1\n\
         cleansession false\n\
         bridge_attempt_unsubscribe false\n\
         notifications false\n\
         restart_timeout 1\n\
         keepalive_interval 30\n",
        persistence.display(),
        autosave.as_secs(),
    );
    config
}

/// Mosquitto as the upstream: no persistence, unbounded queues so a slow verifier loses
/// nothing at the upstream.
pub fn upstream_config(listen: SocketAddr) -> String {
    let mut config = common_config(listen);
    config.push_str("persistence false\nmax_queued_messages 0\nmax_inflight_messages 100\n");
    config
}

fn common_config(listen: SocketAddr) -> String {
    let mut config = String::from("# Generated by outpost-sim.\n");
    if crate::process::running_as_root() {
        // Mosquitto started as root drops to the `mosquitto` user, which cannot write our files.
        config.push_str("user root\n");
    }
    let _ = write!(
        config,
        "listener {} {}\nallow_anonymous true\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n",
        listen.port(),
        listen.ip()
    );
    config
}

/// Starts Mosquitto as an upstream broker on `listen`, with its config and log in `dir`.
pub async fn start_upstream_mosquitto(
    binary: &Path,
    listen: SocketAddr,
    dir: &Path,
) -> anyhow::Result<ChildProcess> {
    start_upstream_mosquitto_with(binary, listen, dir, "").await
}

/// Like [`start_upstream_mosquitto`], with `extra` lines (another listener) at the end.
pub async fn start_upstream_mosquitto_with(
    binary: &Path,
    listen: SocketAddr,
    dir: &Path,
    extra: &str,
) -> anyhow::Result<ChildProcess> {
    let path = dir.join(format!("mosquitto-upstream-{}.conf", listen.port()));
    std::fs::write(&path, upstream_config(listen) + extra)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let mut command = Command::new(binary);
    command.arg("-c").arg(&path);
    let log = dir.join(format!("mosquitto-upstream-{}.log", listen.port()));
    let mut process = ChildProcess::spawn_logged("mosquitto (upstream)", command, &log)?;
    process.wait_accepting(listen, START_TIMEOUT).await?;
    Ok(process)
}

/// The `outpost` executable next to the running one (same target directory), if it exists.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe.parent().context("the running executable has no directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        anyhow::bail!(
            "no `{name}` next to {} (build it with `cargo build --release -p outpost`, or pass --outpost PATH)",
            exe.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_config_has_the_durability_settings() {
        let listen: SocketAddr = "127.0.0.1:1883".parse().expect("addr");
        let upstream: SocketAddr = "127.0.0.1:1884".parse().expect("addr");
        let config = bridge_config(listen, upstream, Path::new("/tmp/p"), Duration::from_secs(1));
        for line in [
            "listener 1883 127.0.0.1",
            "persistence true",
            "persistence_location /tmp/p/",
            "autosave_interval 1",
            "max_queued_messages 1000000",
            "address 127.0.0.1:1884",
            "topic # out 1",
            "cleansession false",
            "bridge_attempt_unsubscribe false",
        ] {
            assert!(config.lines().any(|l| l == line), "missing `{line}` in\n{config}");
        }
    }
}
