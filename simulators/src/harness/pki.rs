//! Certificates made on the spot with rcgen for TLS tests and benches: a CA, server and
//! client certificates it issues (valid, expired, for chosen names), written as PEM files,
//! and the `mosquitto.conf` lines of a TLS listener that uses them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority that issues test certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a certificate is for and how long it is valid.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Subject alternative names: IP addresses or DNS names (`"localhost"`, `"127.0.0.1"`).
    pub names: Vec<String>,
    /// A client certificate (extended key usage clientAuth) rather than a server one.
    pub client: bool,
    /// Expired: valid only in 2020, or, with `valid_for`, until that long ago.
    pub expired: bool,
    /// Valid from an hour ago until this long from now (or, when `expired`, until this long
    /// ago); `None`: until 4096 (or only in 2020).
    pub valid_for: Option<Duration>,
    /// The subject's CN; `None`: the first name.
    pub common_name: Option<String>,
}

impl Leaf {
    /// A server certificate for `localhost` and `127.0.0.1`, valid until 4096.
    pub fn server() -> Leaf {
        Leaf {
            names: vec!["localhost".to_owned(), Ipv4Addr::LOCALHOST.to_string()],
            client: false,
            expired: false,
            valid_for: None,
            common_name: None,
        }
    }

    /// A client certificate, valid until 4096.
    pub fn client() -> Leaf {
        Leaf {
            names: vec!["outpost-gateway".to_owned()],
            client: true,
            expired: false,
            valid_for: None,
            common_name: None,
        }
    }
}

/// A certificate and its private key (PKCS#8), as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where [`Issued::write`] put the files.
#[derive(Debug, Clone)]
pub struct PemFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA with its own key, named `name`.
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().context("CA key")?;
        let issuer = CertifiedIssuer::self_signed(params, key).context("CA certificate")?;
        Ok(TestCa { issuer })
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA's certificate to `path` (readable by all, as a CA file may be).
    pub fn write_cert(&self, path: &Path) -> anyhow::Result<()> {
        write(path, &self.cert_pem(), 0o644)
    }

    /// A certificate for `leaf`, signed by this CA.
    pub fn issue(&self, leaf: &Leaf) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(leaf.names.clone()).context("certificate parameters")?;
        let cn = leaf.common_name.as_deref().or(leaf.names.first().map(String::as_str)).unwrap_or("test");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![if leaf.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let now = time::OffsetDateTime::now_utc();
        match (leaf.valid_for, leaf.expired) {
            (None, false) => {}
            (None, true) => {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            (Some(d), false) => {
                params.not_before = now - time::Duration::hours(1);
                params.not_after = now + d;
            }
            (Some(d), true) => {
                params.not_before = now - time::Duration::days(60);
                params.not_after = now - d;
            }
        }
        let key = KeyPair::generate().context("certificate key")?;
        let cert = params.signed_by(&key, &self.issuer).context("signing the certificate")?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

impl Issued {
    /// Writes `<stem>.pem` and `<stem>.key` into `dir`, the key readable by its owner only.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<PemFiles> {
        let files = PemFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
        write(&files.cert, &self.cert_pem, 0o644)?;
        write(&files.key, &self.key_pem, 0o600)?;
        Ok(files)
    }
}

/// Writes through a temporary file and a rename, as an operator's deployment tool would, so
/// a reader never sees half a file.
fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}

/// The `mosquitto.conf` lines of a TLS listener on `port` of 127.0.0.1 with a server
/// certificate and key, the CA its clients' certificates are checked against, and whether a
/// client certificate is required. Mosquitto started as root reads these after dropping to
/// its own user: the files and their directory must be readable by others (as
/// [`Issued::write`] leaves the certificate, not the key: chmod the key for mosquitto).
pub fn mosquitto_tls_listener(port: u16, ca: &Path, server: &PemFiles, require_certificate: bool) -> String {
    format!(
        "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_certificate}\n",
        ca.display(),
        server.cert.display(),
        server.key.display()
    )
}

/// Lets mosquitto's own user read `files` and the directory holding them.
pub fn readable_by_mosquitto(dir: &Path, files: &PemFiles) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).context("chmod the directory")?;
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).context("chmod the key")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_issues_pem_files_with_a_private_key_kept_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("test CA").expect("ca");
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let files = ca.issue(&Leaf::server()).expect("issue").write(dir.path(), "server").expect("write");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&files.key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = std::fs::read_to_string(&files.key).expect("read");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        let conf = mosquitto_tls_listener(8883, &dir.path().join("ca.pem"), &files, true);
        assert!(conf.contains("require_certificate true\n") && conf.starts_with("listener 8883 127.0.0.1\n"));
    }
}
