//! The `[broker.tls]` table: the sensor side's TLS listener.
//!
//! A table of its own rather than `broker.tls_*` keys: the listener's address, its files and
//! its client-certificate policy belong together (as a `listener` block does in mosquitto's
//! config), its absence says "no TLS" in one place, and the plain listener's keys stay as they
//! were. Both MQTT versions are spoken on it, like on `broker.listen`.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use serde::Deserialize;

use super::BrokerConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Where MQTT over TLS is served (8883 is MQTT's TLS port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The server certificate (PEM; the chain after the leaf). Re-read on SIGHUP.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1). Re-read on SIGHUP.
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates are verified against. Without it no
    /// client certificate is asked for.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whether a client must present a certificate `ca_file` verifies. Default: true when
    /// `ca_file` is set (as mosquitto's `require_certificate` with a `cafile`); false lets
    /// clients without one in to the password check.
    #[serde(default)]
    pub require_certificate: Option<bool>,
    /// A verified client certificate's name becomes the client's username for the ACL (and
    /// its password is not checked), as mosquitto's `use_identity_as_username`:
    /// `"common_name"` (the subject's CN, mosquitto's choice), `"san_dns"` or `"san_email"`
    /// (the first subject alternative name of that kind).
    #[serde(default)]
    pub use_identity_as_username: Option<Identity>,
    /// TLS handshakes in progress at most; connections beyond it are closed at once (counted
    /// `tls_handshakes_failed{reason="busy"}`) so a handshake flood costs a bounded share of
    /// the CPU that established sensors need. Each handshake is also bounded by
    /// `broker.connection_timeout`.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: NonZeroUsize,
}

/// Which name of a client certificate is its username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    CommonName,
    SanDns,
    SanEmail,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8883))
}

/// Enough for a fleet reconnecting at once (each handshake takes a few milliseconds of CPU),
/// few enough that a flood of them leaves the runtime to the sensors already connected.
fn default_max_handshakes() -> NonZeroUsize {
    NonZeroUsize::new(32).expect("non-zero literal")
}

impl TlsConfig {
    /// `require_certificate` as given, or its default.
    pub fn require_certificate(&self) -> bool {
        self.require_certificate.unwrap_or(self.ca_file.is_some())
    }

    /// Every problem with the table: `(key, value, reason)`. Reads the files (once at
    /// start-up, and in `outpost check`); never shows a key's contents.
    pub fn problems(&self, broker: &BrokerConfig) -> Vec<(String, String, String)> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, value: String, reason: &str| {
            problems.push((format!("broker.tls.{key}"), value, reason.to_owned()))
        };
        if self.listen == broker.listen || Some(self.listen) == broker.listen_v5 {
            problem(
                "listen",
                self.listen.to_string(),
                "it is the address of another broker listener; TLS needs its own port, e.g. 0.0.0.0:8883",
            );
        }
        if self.ca_file.is_none() && self.require_certificate == Some(true) {
            problem(
                "require_certificate",
                "true".to_owned(),
                "client certificates need broker.tls.ca_file, the CA they are verified against",
            );
        }
        if self.ca_file.is_none() && self.use_identity_as_username.is_some() {
            problem(
                "use_identity_as_username",
                format!("{:?}", self.use_identity_as_username),
                "needs broker.tls.ca_file: only a certificate the CA verified may name a user",
            );
        }
        if self.max_handshakes.get() > 10_000 {
            problem(
                "max_handshakes",
                self.max_handshakes.to_string(),
                "must be between 1 and 10000; the default 32 keeps a handshake flood from starving connected sensors",
            );
        }
        if let Err(e) = crate::tls::server(self) {
            let (key, path, reason) = e.parts();
            problem(key.trim_start_matches("broker.tls."), path.display().to_string(), &reason);
        }
        problems
    }
}
