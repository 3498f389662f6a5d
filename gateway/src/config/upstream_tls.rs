//! The `[upstream.tls]` table: how an `mqtts://` upstream is verified and how the gateway
//! proves who it is.
//!
//! An `mqtts://` URL without the table verifies the server against the system's roots
//! (Debian's ca-certificates). The table names a private CA instead (`ca_file`), the name the
//! certificate must carry when it differs from the URL's host (`server_name`), a client
//! certificate and key for mutual TLS, and ALPN protocols. No key turns verification off: a
//! gateway that relays everything it holds to whoever answers is worse than one that waits.
//!
//! The files are read at every connect (`uplink::transport`), so a renewed certificate or a
//! new CA needs no restart; here they are only checked to be readable, once at start-up and
//! by `outpost check` (which also parses them).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A problem found in the table: `(key, value, reason)`, for `ConfigError::Invalid`.
pub type Problem = (String, String, String);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CA certificate(s) the server's chain must end in, instead of the
    /// system's roots. Relative paths are resolved from the config file.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the gateway's client certificate (its chain after it), for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key: PKCS#8, RSA (PKCS#1) or EC (SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must be valid for, when the URL's host is not it
    /// (an IP address, or a load balancer's name). Default: the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Application protocols offered in the handshake, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT
    /// Core on port 443. Empty: no ALPN.
    #[serde(default)]
    pub alpn: Vec<String>,
}

impl UpstreamTlsConfig {
    /// Every problem with the table that does not need the files parsed. `url_is_tls` is
    /// whether the upstream's URL is `mqtts://`.
    pub fn problems(&self, url_is_tls: bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, value: String, reason: &str| {
            problems.push((format!("upstream.tls{key}"), value, reason.to_owned()))
        };
        if !url_is_tls {
            problem(
                "",
                "[upstream.tls]".to_owned(),
                "the table is set but no upstream endpoint is mqtts:// (all are plain TCP): use mqtts://host:8883 to connect over TLS, or delete [upstream.tls]",
            );
        }
        match (&self.cert_file, &self.key_file) {
            (Some(cert), None) => problem(
                ".cert_file",
                cert.display().to_string(),
                "a client certificate needs its private key: set upstream.tls.key_file too",
            ),
            (None, Some(key)) => problem(
                ".key_file",
                key.display().to_string(),
                "a private key needs its certificate: set upstream.tls.cert_file too",
            ),
            _ => {}
        }
        for (key, path) in
            [(".ca_file", &self.ca_file), (".cert_file", &self.cert_file), (".key_file", &self.key_file)]
        {
            if let Some(path) = path {
                if let Err(reason) = readable(path) {
                    problem(key, path.display().to_string(), &reason);
                }
            }
        }
        if let Some(name) = &self.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                problem(
                    ".server_name",
                    name.clone(),
                    "is neither a DNS name nor an IP address: give the name the server's certificate is issued for, e.g. \"broker.example.com\"",
                );
            }
        }
        for protocol in &self.alpn {
            if protocol.is_empty() || protocol.len() > 255 {
                problem(
                    ".alpn",
                    protocol.clone(),
                    "each protocol must be 1 to 255 bytes, e.g. \"x-amzn-mqtt-ca\" (AWS IoT Core on port 443) or \"mqtt\"",
                );
            }
        }
        problems
    }

    /// Paths written in the config file are resolved from its directory.
    pub fn resolve(&mut self, resolve: impl Fn(&Path) -> PathBuf) {
        for path in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file] {
            *path = path.as_deref().map(&resolve);
        }
    }
}

/// Whether `path` can be opened for reading, and if not, what to do about it.
pub fn readable(path: &Path) -> Result<(), String> {
    match std::fs::File::open(path) {
        Ok(file) => match file.metadata() {
            Ok(meta) if meta.is_file() => Ok(()),
            Ok(_) => Err("is not a file: give the path of a PEM file".to_owned()),
            Err(e) => Err(format!("cannot read it: {e}")),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("no such file: give the path of an existing PEM file".to_owned())
        }
        Err(e) => Err(format!("cannot read it: {e} (the gateway's user must be able to read it)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_table_needs_mqtts_a_key_needs_a_cert_and_names_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "x").expect("write");
        let tls = UpstreamTlsConfig {
            cert_file: Some(cert),
            server_name: Some("not a name!".to_owned()),
            alpn: vec![String::new()],
            ..UpstreamTlsConfig::default()
        };
        let problems = tls.problems(false);
        let keys: Vec<&str> = problems.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            keys,
            ["upstream.tls", "upstream.tls.cert_file", "upstream.tls.server_name", "upstream.tls.alpn"]
        );
        assert!(problems[0].2.contains("mqtts://"), "{problems:?}");
        assert!(problems[1].2.contains("key_file"), "{problems:?}");

        let missing =
            UpstreamTlsConfig { ca_file: Some(dir.path().join("nope.pem")), ..UpstreamTlsConfig::default() };
        let problems = missing.problems(true);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].2.contains("no such file"), "{problems:?}");
        assert!(UpstreamTlsConfig::default().problems(true).is_empty());
        let ip =
            UpstreamTlsConfig { server_name: Some("10.0.0.5".to_owned()), ..UpstreamTlsConfig::default() };
        assert!(ip.problems(true).is_empty());
    }
}
