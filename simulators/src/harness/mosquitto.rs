//! Debian's mosquitto as a child process: the upstream of end-to-end tests and benches, the
//! reference broker of the conformance tests.
//!
//! # Invariants
//! - A [`Mosquitto`] owns its process and its temporary directory; dropping it kills the
//!   process before the directory is removed.
//! - A restarted broker listens on the same port as before, so a gateway's configured upstream
//!   URL stays valid.
//! - Readiness is an event: mosquitto logs `mosquitto version X running` once its listeners
//!   are open, and nothing is returned before that line.
//! - With [`MosquittoConfig::persistence`], a stop (SIGTERM) saves sessions and queued
//!   messages to its directory, and the next start restores them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;

use crate::process::{ChildProcess, run_to_completion};

/// Where Debian installs the broker.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Where Debian installs the command-line publisher.
pub const MOSQUITTO_PUB: &str = "/usr/bin/mosquitto_pub";
/// Where Debian installs the password-file tool.
pub const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";

/// How long a broker may take to start listening or to stop.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// What goes into a broker's `mosquitto.conf` besides its listener and logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoConfig {
    /// Sessions and queued messages saved to the broker's directory on stop.
    pub persistence: bool,
    /// `max_queued_messages`; `Some(0)` means no limit, `None` keeps mosquitto's default (1000).
    pub max_queued_messages: Option<u64>,
    /// `(username, password)` pairs. Empty: anonymous clients are allowed. Otherwise a password
    /// file holds them and anonymous clients are refused.
    pub users: Vec<(String, String)>,
    /// Let the broker's own user write its directory. Mosquitto started as root drops to the
    /// `mosquitto` user, which cannot write a root's temporary directory: without this its
    /// persistence file is never saved.
    pub directory_for_any_user: bool,
    /// Whole `mosquitto.conf` lines appended last (e.g. `"max_packet_size 2000\n"`, an
    /// `acl_file`, more listeners).
    pub extra: String,
}

impl Default for MosquittoConfig {
    /// The loss-free upstream of the end-to-end tests: persistent, no queue limit. The default
    /// limit (1000) silently drops messages queued for a slow or offline subscriber, which a
    /// test would count as lost.
    fn default() -> MosquittoConfig {
        MosquittoConfig {
            persistence: true,
            max_queued_messages: Some(0),
            users: Vec::new(),
            directory_for_any_user: false,
            extra: String::new(),
        }
    }
}

impl MosquittoConfig {
    /// The default with `extra` appended.
    pub fn with_extra(extra: &str) -> MosquittoConfig {
        MosquittoConfig { extra: extra.to_owned(), ..MosquittoConfig::default() }
    }

    /// The config file's text for a broker on `port` with its files in `dir`.
    fn render(&self, port: u16, dir: &Path) -> String {
        let mut config = format!("listener {port} 127.0.0.1\n");
        if self.users.is_empty() {
            config.push_str("allow_anonymous true\n");
        } else {
            config.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                dir.join("passwords").display()
            ));
        }
        if self.persistence {
            config.push_str(&format!("persistence true\npersistence_location {}/\n", dir.display()));
        } else {
            config.push_str("persistence false\n");
        }
        if let Some(max) = self.max_queued_messages {
            config.push_str(&format!("max_queued_messages {max}\n"));
        }
        config.push_str(
            "log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\n",
        );
        config.push_str(&self.extra);
        if !config.ends_with('\n') {
            config.push('\n');
        }
        config
    }
}

/// Debian's mosquitto on a free port of 127.0.0.1.
pub struct Mosquitto {
    port: u16,
    /// Declared before `dir`, so the broker is killed before its directory is removed.
    process: Option<ChildProcess>,
    /// Holds `mosquitto.conf`, the password file and the persistence file.
    dir: TempDir,
}

impl Mosquitto {
    /// Starts a broker with the default config and returns once it accepts connections.
    pub async fn start() -> anyhow::Result<Mosquitto> {
        Mosquitto::start_with("").await
    }

    /// Like [`start`](Self::start), with `extra_config` (whole `mosquitto.conf` lines)
    /// appended: how a test gives the upstream limits or an `acl_file`.
    pub async fn start_with(extra_config: &str) -> anyhow::Result<Mosquitto> {
        Mosquitto::start_configured(&MosquittoConfig::with_extra(extra_config)).await
    }

    /// Starts a broker configured by `config` and returns once it accepts connections.
    pub async fn start_configured(config: &MosquittoConfig) -> anyhow::Result<Mosquitto> {
        let mut broker = Mosquitto::prepare(config, None)?;
        broker.start_again().await?;
        Ok(broker)
    }

    /// Reserves a port and writes the config without starting the broker, for tests where the
    /// upstream is down at first. [`start_again`](Self::start_again) starts it.
    pub fn not_started() -> anyhow::Result<Mosquitto> {
        Mosquitto::not_started_with("")
    }

    /// Like [`not_started`](Self::not_started), with `extra_config` appended to the config.
    pub fn not_started_with(extra_config: &str) -> anyhow::Result<Mosquitto> {
        Mosquitto::prepare(&MosquittoConfig::with_extra(extra_config), None)
    }

    /// Writes the config for a broker on `port` (a free one if `None`) into a new directory
    /// under `parent` (the system's temporary directory if `None`), without starting it.
    pub fn prepare_in(config: &MosquittoConfig, parent: Option<&Path>) -> anyhow::Result<Mosquitto> {
        Mosquitto::prepare(config, parent)
    }

    fn prepare(config: &MosquittoConfig, parent: Option<&Path>) -> anyhow::Result<Mosquitto> {
        let port = crate::harness::free_port()?;
        let dir = match parent {
            Some(parent) => tempfile::Builder::new().prefix("mosquitto-").tempdir_in(parent),
            None => tempfile::tempdir(),
        }
        .context("cannot create a temporary directory")?;
        if config.directory_for_any_user {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .context("cannot open the broker's directory to its user")?;
        }
        write_password_file(&dir.path().join("passwords"), &config.users)?;
        std::fs::write(dir.path().join("mosquitto.conf"), config.render(port, dir.path()))
            .context("cannot write mosquitto.conf")?;
        Ok(Mosquitto { port, process: None, dir })
    }

    /// The listener address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The address as a gateway's `upstream.url`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    /// Starts the broker (again) on its port, with the sessions saved by the last
    /// [`stop`](Self::stop), and returns once it accepts connections.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.process.is_none(), "mosquitto on port {} is already running", self.port);
        let mut command = Command::new(MOSQUITTO);
        command.arg("-c").arg(self.config_path());
        let process = ChildProcess::spawn(format!("mosquitto :{}", self.port), command)?;
        process
            .wait_for_line("its `running` notice", BROKER_TIMEOUT, |line| {
                line.contains("mosquitto version") && line.ends_with(" running")
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// Stops the broker with SIGTERM, which makes it save its sessions and queued messages, and
    /// waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let mut process = self.process.take().context("mosquitto is not running")?;
        process.terminate(BROKER_TIMEOUT).await
    }

    /// Kills the broker with SIGKILL: whatever it held in memory is lost.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        let mut process = self.process.take().context("mosquitto is not running")?;
        process.kill()
    }

    /// The running broker's process, for what this wrapper does not measure itself (its CPU
    /// time through [`ChildProcess::stats`]).
    pub fn process(&self) -> Option<&ChildProcess> {
        self.process.as_ref()
    }

    /// The broker's recent output, for failure messages.
    pub fn tail(&self) -> String {
        self.process.as_ref().map_or_else(|| "mosquitto is not running".to_owned(), ChildProcess::tail)
    }
}

/// Writes `users` into a mosquitto password file at `path` with Debian's `mosquitto_passwd`
/// (`-c -b` for the first, `-b` for the others); nothing for no users. Tests give the same file
/// to mosquitto and to Outpost (`broker.password_file`).
pub fn write_password_file(path: &Path, users: &[(String, String)]) -> anyhow::Result<()> {
    for (index, (username, password)) in users.iter().enumerate() {
        let mut command = Command::new(MOSQUITTO_PASSWD);
        // `-c` creates the file for the first user; the others are added to it.
        command.args(if index == 0 { &["-c", "-b"][..] } else { &["-b"][..] });
        command.arg(path).args([username, password]);
        let output = run_to_completion(command)?;
        anyhow::ensure!(
            output.status.success(),
            "mosquitto_passwd failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_the_loss_free_upstream() {
        let config = MosquittoConfig::with_extra("max_packet_size 2000").render(1883, Path::new("/d"));
        assert_eq!(
            config,
            "listener 1883 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location /d/\n\
             max_queued_messages 0\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
             log_type information\nconnection_messages true\nmax_packet_size 2000\n"
        );
    }

    #[test]
    fn users_replace_anonymous_access() {
        let config = MosquittoConfig {
            persistence: false,
            max_queued_messages: None,
            users: vec![("u".to_owned(), "p".to_owned())],
            ..MosquittoConfig::default()
        };
        let text = config.render(1883, Path::new("/d"));
        for line in ["allow_anonymous false", "password_file /d/passwords", "persistence false"] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(!text.contains("max_queued_messages"), "{text}");
    }
}
