//! The `[http]` table: where the operations endpoint listens and who may read it.
//!
//! Absent table: no endpoint. Present: it listens on `listen` (loopback by default). Bound
//! beyond loopback it must have a bearer token (`bearer_token_file`) unless the operator says
//! `allow_unauthenticated = true`: `/metrics` and `/status` tell anyone who can reach the port
//! how the site is doing. The token is read from a file so it stays out of the config (which
//! `outpost check` prints from) and out of the process's arguments; it is never logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::BrokerConfig;

/// The longest token accepted; a longer file is more likely the wrong file than a token.
const MAX_TOKEN_BYTES: usize = 4096;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `/metrics`, `/health/*` and `/status` are served.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A file holding the bearer token every request but `/health/*` must present
    /// (`Authorization: Bearer <token>`). Relative paths are resolved from the config file.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Serve `/metrics` and `/status` without a token on an address beyond loopback.
    #[serde(default)]
    pub allow_unauthenticated: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9883))
}

/// The bearer token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(…)")
    }
}

impl BearerToken {
    /// The `Authorization` header value a client (`outpost status`) sends.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether an `Authorization` header value carries this token. Compares every byte
    /// whatever the first mismatch, so the answer's timing does not leak the token's prefix.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(given) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let expected = self.0.as_bytes();
        given.len() == expected.len()
            && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// A problem found in the `[http]` table: `(key, value, reason)`, for `ConfigError::Invalid`.
pub type Problem = (String, String, String);

impl HttpConfig {
    /// Reads the token file. `Ok(None)` without one.
    pub fn read_token(&self) -> Result<Option<BearerToken>, String> {
        let Some(path) = &self.bearer_token_file else { return Ok(None) };
        read_token(path).map(Some)
    }

    /// Every problem with the table, given the broker's addresses it must not share. Reads
    /// the token file (once at start-up, and in `outpost check`), never shows its contents.
    pub fn problems(&self, broker: &BrokerConfig) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem =
            |key: &str, value: String, reason: String| problems.push((format!("http.{key}"), value, reason));
        let beyond_loopback = !self.listen.ip().is_loopback();
        if beyond_loopback && self.bearer_token_file.is_none() && !self.allow_unauthenticated {
            problem(
                "listen",
                self.listen.to_string(),
                format!(
                    "it is reachable beyond this machine, and /metrics and /status would answer anyone without a token; set http.bearer_token_file = \"/etc/outpost/http-token\" (a file holding the token), or listen on 127.0.0.1:{}, or set http.allow_unauthenticated = true if the network is trusted",
                    self.listen.port()
                ),
            );
        }
        for (key, addr) in [("broker.listen", Some(broker.listen)), ("broker.listen_v5", broker.listen_v5)] {
            if addr.is_some_and(|addr| addr.port() == self.listen.port() && overlaps(addr, self.listen)) {
                problem(
                    "listen",
                    self.listen.to_string(),
                    format!(
                        "it is the address of {key}; the HTTP endpoint needs its own port, e.g. 127.0.0.1:9883"
                    ),
                );
            }
        }
        if let Some(path) = &self.bearer_token_file {
            if let Err(reason) = read_token(path) {
                problem("bearer_token_file", path.display().to_string(), reason);
            }
        }
        problems
    }
}

/// Whether two listeners on the same port would collide: equal, or either is unspecified.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

fn read_token(path: &Path) -> Result<BearerToken, String> {
    let text = std::fs::read(path).map_err(|e| {
        format!("cannot read it: {e}; create it with the token on one line (e.g. `openssl rand -hex 32 > FILE`), readable by the gateway's user")
    })?;
    if text.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "it holds {} bytes; a token is one line of at most {MAX_TOKEN_BYTES} bytes — is this the right file?",
            text.len()
        ));
    }
    let token = std::str::from_utf8(&text)
        .map_err(|_| "it is not UTF-8 text; write the token as one line of text".to_owned())?
        .trim();
    if token.is_empty() {
        return Err(
            "it is empty; write the token on one line (e.g. `openssl rand -hex 32 > FILE`)".to_owned()
        );
    }
    // HTTP header values cannot carry these, so no client could present such a token.
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            "the token contains whitespace or control characters; use one word, e.g. `openssl rand -hex 32`"
                .to_owned(),
        );
    }
    Ok(BearerToken(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{GatewayConfig, Overrides};

    /// `outpost check`'s view: every problem, one a line, with the file's name as given.
    #[track_caller]
    fn problems(text: &str, token: Option<&str>) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(token) = token {
            std::fs::write(dir.path().join("token"), token).expect("write token");
        }
        let path = dir.path().join("outpost.toml");
        std::fs::write(&path, text).expect("write config");
        let (_, problems) = GatewayConfig::load_all(Some(&path), &Overrides::default());
        let prefix = path.display().to_string();
        problems.iter().map(|p| p.to_string().replace(&prefix, "outpost.toml")).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn absent_table_means_no_endpoint_and_an_empty_one_listens_on_loopback() {
        let c = GatewayConfig::parse("", Path::new("x")).expect("parses");
        assert!(c.http.is_none());
        let c = GatewayConfig::parse("[http]\n", Path::new("x")).expect("parses");
        let http = c.http.expect("table present");
        assert_eq!(http.listen, "127.0.0.1:9883".parse().expect("addr"));
        assert_eq!(http.read_token(), Ok(None));
        assert_eq!(problems("[http]\n", None), "");
    }

    #[test]
    fn beyond_loopback_without_a_token_is_refused_with_the_fixes() {
        let err = problems("[http]\nlisten = \"0.0.0.0:9883\"\n", None);
        assert!(
            err.starts_with("outpost.toml: line 2, column 10: `http.listen` = \"0.0.0.0:9883\" is invalid: it is reachable beyond this machine"),
            "{err}"
        );
        for fix in ["http.bearer_token_file", "127.0.0.1:9883", "http.allow_unauthenticated = true"] {
            assert!(err.contains(fix), "{fix} missing: {err}");
        }
        assert_eq!(problems("[http]\nlisten = \"0.0.0.0:9883\"\nallow_unauthenticated = true\n", None), "");
        assert_eq!(problems("[http]\nlisten = \"[::1]:9883\"\n", None), "");
        assert_eq!(
            problems("[http]\nlisten = \"0.0.0.0:9883\"\nbearer_token_file = \"token\"\n", Some("s3cret\n")),
            ""
        );
    }

    #[test]
    fn the_token_file_is_resolved_from_the_config_and_checked_without_showing_it() {
        let err = problems("[http]\nbearer_token_file = \"missing\"\n", None);
        assert!(err.contains("`http.bearer_token_file` = "), "{err}");
        assert!(err.contains("missing\" is invalid: cannot read it: No such file"), "{err}");
        let err = problems("[http]\nbearer_token_file = \"token\"\n", Some(" \n"));
        assert!(err.contains("is invalid: it is empty"), "{err}");
        let err = problems("[http]\nbearer_token_file = \"token\"\n", Some("two words\n"));
        assert!(err.contains("whitespace or control characters"), "{err}");
        assert!(!err.contains("two words"), "the token is never shown: {err}");
    }

    #[test]
    fn the_broker_port_is_not_shared_and_unknown_keys_are_refused() {
        let err =
            problems("[broker]\nlisten = \"0.0.0.0:1883\"\n[http]\nlisten = \"127.0.0.1:1883\"\n", None);
        assert!(
            err.contains("`http.listen` = \"127.0.0.1:1883\" is invalid: it is the address of broker.listen"),
            "{err}"
        );
        let err = problems("[http]\nlisten_on = \"127.0.0.1:1\"\n", None);
        assert!(
            err.contains("`http.listen_on`: unknown field `listen_on`")
                && err.contains("did you mean `listen`?"),
            "{err}"
        );
    }

    #[test]
    fn a_token_admits_only_its_exact_bearer_header_and_never_prints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").expect("write");
        let token = super::read_token(&path).expect("valid token");
        assert!(token.admits(Some(b"Bearer abc123")));
        for wrong in [&b"Bearer abc12"[..], b"Bearer abc1234", b"bearer abc123", b"abc123", b"Bearer ABC123"]
        {
            assert!(!token.admits(Some(wrong)), "{}", String::from_utf8_lossy(wrong));
        }
        assert!(!token.admits(None));
        assert_eq!(format!("{token:?}"), "BearerToken(…)");
    }
}
