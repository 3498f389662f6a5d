//! PEM certificates and keys, and the rustls server configuration of the sensor side's TLS
//! listener (`[broker.tls]`). Pure but for reading files: the listener itself (handshakes,
//! their bound, reloads) is `broker::tls`.
//!
//! Written to be shared: the loaders (`load_certs`, `load_key`, `load_roots`) and
//! [`CertInfo`] know nothing of the broker, so the upstream side's TLS can use them too.
//!
//! # Invariants
//! - The ring provider only, TLS 1.2 and 1.3 only (rustls offers nothing older).
//! - A client certificate is verified by webpki against `ca_file` before anything reads it;
//!   [`identity`] only ever parses a certificate that verification accepted.
//! - Every error names the file, the key it came from and the fix; key material is never
//!   printed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::tls::{Identity, TlsConfig};

/// A certificate closer than this to its expiry is logged at WARN at start-up and reload.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} = {}: cannot read it: {why}; {fix}", path.display())]
    File { key: &'static str, path: PathBuf, why: String, fix: &'static str },
    #[error("{key} = {}: {why}", path.display())]
    Invalid { key: &'static str, path: PathBuf, why: String },
}

impl TlsError {
    /// The config key, the file and what is wrong with it (and the fix), for a config error.
    pub fn parts(&self) -> (&'static str, &Path, String) {
        match self {
            TlsError::File { key, path, why, fix } => (key, path, format!("cannot read it: {why}; {fix}")),
            TlsError::Invalid { key, path, why } => (key, path, why.clone()),
        }
    }
}

/// Reads every certificate of a PEM file, in order (the leaf first in a chain).
pub fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = std::fs::read(path).map_err(|e| TlsError::File {
        key,
        path: path.to_owned(),
        why: e.to_string(),
        fix: "point it at a readable PEM file (and check the service user may read it)",
    })?;
    let certs = CertificateDer::pem_slice_iter(&read).collect::<Result<Vec<_>, _>>().map_err(|e| {
        TlsError::Invalid { key, path: path.to_owned(), why: format!("not a PEM certificate file: {e}") }
    })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            key,
            path: path.to_owned(),
            why: "holds no `-----BEGIN CERTIFICATE-----` block; give the PEM certificate (chain)".to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read = std::fs::read(path).map_err(|e| TlsError::File {
        key,
        path: path.to_owned(),
        why: e.to_string(),
        fix: "point it at a readable PEM key file (mode 600, owned by the service user)",
    })?;
    PrivateKeyDer::from_pem_slice(&read).map_err(|e| TlsError::Invalid {
        key,
        path: path.to_owned(),
        // The error names the PEM section, never its contents.
        why: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })
}

/// Reads a CA file into a root store.
pub fn load_roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            key,
            path: path.to_owned(),
            why: format!("a certificate in it is not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// What the start-up and reload logs say about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub not_after: SystemTime,
}

impl CertInfo {
    pub fn of(der: &CertificateDer<'_>) -> Option<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let seconds = cert.validity().not_after.timestamp();
        let not_after = if seconds >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        };
        Some(CertInfo { subject: cert.subject().to_string(), not_after })
    }

    /// The time left at `now`; `None` once expired.
    pub fn left(&self, now: SystemTime) -> Option<Duration> {
        self.not_after.duration_since(now).ok()
    }
}

/// The listener's server configuration, and what its certificate says.
#[derive(Debug)]
pub struct Server {
    pub config: Arc<rustls::ServerConfig>,
    pub cert: Option<CertInfo>,
}

/// Builds the server configuration from the files `[broker.tls]` names.
pub fn server(cfg: &TlsConfig) -> Result<Server, TlsError> {
    let certs = load_certs("broker.tls.cert_file", &cfg.cert_file)?;
    let key = load_key("broker.tls.key_file", &cfg.key_file)?;
    let cert = CertInfo::of(&certs[0]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Invalid {
            key: "broker.tls",
            path: cfg.cert_file.clone(),
            why: format!("bug: the ring provider refused TLS 1.2/1.3: {e}"),
        })?;
    let builder = match &cfg.ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = Arc::new(load_roots("broker.tls.ca_file", ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier =
                if cfg.require_certificate() { verifier } else { verifier.allow_unauthenticated() };
            let verifier = verifier.build().map_err(|e| TlsError::Invalid {
                key: "broker.tls.ca_file",
                path: ca.clone(),
                why: format!("cannot verify client certificates with it: {e}"),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| TlsError::Invalid {
        key: "broker.tls.key_file",
        path: cfg.key_file.clone(),
        why: format!(
            "does not fit broker.tls.cert_file {} ({e}); give the key the certificate was issued for",
            cfg.cert_file.display()
        ),
    })?;
    Ok(Server { config: Arc::new(config), cert })
}

/// The username a verified client certificate stands for: its subject's first CN, or its
/// first SAN of the chosen kind. `None` if it has none (or is not UTF-8).
pub fn identity(der: &CertificateDer<'_>, source: Identity) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let found = match source {
        Identity::CommonName => cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned(),
        Identity::SanDns | Identity::SanEmail => {
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|name| match (source, name) {
                (Identity::SanDns, x509_parser::extensions::GeneralName::DNSName(n))
                | (Identity::SanEmail, x509_parser::extensions::GeneralName::RFC822Name(n)) => {
                    Some((*n).to_owned())
                }
                _ => None,
            })?
        }
    };
    // A username with a control character or an empty one would only confuse the ACL's
    // `%u` substitution and the logs.
    (!found.is_empty() && !found.chars().any(char::is_control)).then_some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(params: rcgen::CertificateParams) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("self-signed").der().clone()
    }

    #[test]
    fn identity_is_the_common_name_or_the_chosen_san() {
        let mut params = rcgen::CertificateParams::new(vec!["dns-name.example".to_owned()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "sensor-7");
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name("ops@example.com".try_into().expect("ia5")));
        let der = cert(params);
        assert_eq!(identity(&der, Identity::CommonName).as_deref(), Some("sensor-7"));
        assert_eq!(identity(&der, Identity::SanDns).as_deref(), Some("dns-name.example"));
        assert_eq!(identity(&der, Identity::SanEmail).as_deref(), Some("ops@example.com"));
    }

    #[test]
    fn a_certificate_without_the_chosen_name_has_no_identity() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "plant");
        let der = cert(params);
        assert_eq!(identity(&der, Identity::CommonName), None);
        assert_eq!(identity(&der, Identity::SanDns), None);
        assert_eq!(identity(&der, Identity::SanEmail), None);
        assert_eq!(identity(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]), Identity::CommonName), None);
    }

    #[test]
    fn expiry_is_read_from_the_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2030, 1, 2);
        let info = CertInfo::of(&cert(params)).expect("parses");
        let expected = SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_542_400);
        assert_eq!(info.not_after, expected);
        assert_eq!(info.left(expected + Duration::from_secs(1)), None);
        assert_eq!(info.left(expected - Duration::from_secs(60)), Some(Duration::from_secs(60)));
    }

    #[test]
    fn unreadable_and_empty_files_name_the_key_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let e = load_certs("broker.tls.cert_file", &missing).expect_err("missing").to_string();
        assert!(
            e.contains("broker.tls.cert_file") && e.contains("missing.pem") && e.contains("readable"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").expect("write");
        let e = load_certs("broker.tls.cert_file", &empty).expect_err("empty").to_string();
        assert!(e.contains("BEGIN CERTIFICATE"), "{e}");
        let e = load_key("broker.tls.key_file", &empty).expect_err("no key").to_string();
        assert!(e.contains("broker.tls.key_file") && e.contains("private key"), "{e}");
    }
}
