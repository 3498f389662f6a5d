//! Certificates made in the test (rcgen, through the harness's `pki`): a CA, server certificates for `127.0.0.1` and
//! `localhost` (valid, expiring soon, expired), client certificates with a chosen CN, and a
//! second CA whose clients the gateway must refuse. Written as PEM files in a tempdir owned by
//! the [`Pki`], for the gateway's `[broker.tls]` and for clients' `--cafile`/`--cert`/`--key`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use outpost_sim::harness::pki::{Leaf, TestCa};
use tempfile::TempDir;

/// A certificate and its key, as PEM files.
pub type CertFiles = outpost_sim::harness::pki::PemFiles;

/// One CA (the harness's [`TestCa`]) and the files it issued, in a tempdir of its own.
pub struct Pki {
    dir: TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    issued: usize,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir.path()).finish_non_exhaustive()
    }
}

impl Pki {
    /// A new CA named `name`, its certificate in `<name>-ca.pem`.
    pub fn new(name: &str) -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir().context("tempdir for certificates")?;
        let ca = TestCa::new(&format!("{name} test CA"))?;
        let ca_file = dir.path().join(format!("{name}-ca.pem"));
        ca.write_cert(&ca_file)?;
        Ok(Pki { dir, ca, ca_file, issued: 0 })
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `127.0.0.1` and `localhost`, valid until `valid_for` from now
    /// (or, when `expired`, expired that long ago).
    pub fn server(&mut self, valid_for: Duration, expired: bool) -> anyhow::Result<CertFiles> {
        let leaf = Leaf {
            valid_for: Some(valid_for),
            expired,
            common_name: Some("outpost test server".to_owned()),
            ..Leaf::server()
        };
        self.issue("server", &leaf)
    }

    /// A client certificate whose subject CN is `cn` (and, if given, a DNS SAN).
    pub fn client(&mut self, cn: &str, san_dns: Option<&str>) -> anyhow::Result<CertFiles> {
        let leaf = Leaf {
            names: san_dns.map(str::to_owned).into_iter().collect(),
            common_name: Some(cn.to_owned()),
            ..Leaf::client()
        };
        self.issue("client", &leaf)
    }

    fn issue(&mut self, kind: &str, leaf: &Leaf) -> anyhow::Result<CertFiles> {
        self.issued += 1;
        self.ca.issue(leaf)?.write(self.dir.path(), &format!("{kind}-{}", self.issued))
    }
}

/// The `[broker.tls]` table for a listener on `listen` with `server`'s files; `extra` lines
/// (e.g. `ca_file = …`) are appended.
pub fn tls_table(listen: SocketAddr, server: &CertFiles, extra: &str) -> String {
    format!(
        "[broker.tls]\nlisten = \"{listen}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}\n",
        server.cert.display(),
        server.key.display()
    )
}
