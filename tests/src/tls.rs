//! Certificates made in the test (rcgen): a CA, server certificates for `127.0.0.1` and
//! `localhost` (valid, expiring soon, expired), client certificates with a chosen CN, and a
//! second CA whose clients the gateway must refuse. Written as PEM files in a tempdir owned by
//! the [`Pki`], for the gateway's `[broker.tls]` and for clients' `--cafile`/`--cert`/`--key`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One CA and the files it issued.
pub struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
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
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_file = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem())?;
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
    /// (a negative age: already expired by that much, when `expired`).
    pub fn server(&mut self, valid_for: Duration, expired: bool) -> anyhow::Result<CertFiles> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, "outpost test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - time::Duration::days(60);
            params.not_after = now - valid_for;
        } else {
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + valid_for;
        }
        self.issue("server", params)
    }

    /// A client certificate whose subject CN is `cn` (and, if given, a DNS SAN).
    pub fn client(&mut self, cn: &str, san_dns: Option<&str>) -> anyhow::Result<CertFiles> {
        let mut params = CertificateParams::new(san_dns.map(str::to_owned).into_iter().collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue("client", params)
    }

    fn issue(&mut self, kind: &str, params: CertificateParams) -> anyhow::Result<CertFiles> {
        self.issued += 1;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let files = CertFiles {
            cert: self.dir.path().join(format!("{kind}-{}.pem", self.issued)),
            key: self.dir.path().join(format!("{kind}-{}.key", self.issued)),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
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
