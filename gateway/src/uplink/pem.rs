//! PEM files for TLS: certificates, a private key, and what the log says about them (a
//! certificate's expiry, a key file others can read). Read at every connect, so a renewed
//! certificate or a rotated key is picked up by the next connection without a restart.
//!
//! Errors are operator sentences that name the file; a key's bytes never reach a message.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Every certificate in a PEM file, in order. An empty list is an error: a file without a
/// `CERTIFICATE` block is the wrong file.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| describe(path, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| describe(path, &e))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in it (expected a \"-----BEGIN CERTIFICATE-----\" block)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file: PKCS#8, RSA (PKCS#1) or EC (SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{}: no private key in it (expected a \"-----BEGIN PRIVATE KEY-----\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block; an encrypted key must be decrypted first)",
            path.display()
        ),
        e => describe(path, &e),
    })
}

fn describe(path: &Path, e: &pem::Error) -> String {
    match e {
        pem::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
            format!("{}: no such file", path.display())
        }
        pem::Error::Io(io) => format!("{}: cannot read it: {io}", path.display()),
        // Never the decoded bytes: the file may be a key.
        _ => format!("{}: not a valid PEM file", path.display()),
    }
}

/// Whether a file's mode lets its group or others read it (a key or a password should not).
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

/// How long until a certificate expires (`Err` with how long ago it did), from its
/// `notAfter` (read by [`crate::tls::CertInfo`], as the listener's certificates are). `None`
/// when the DER cannot be parsed.
pub fn expires_in(cert: &CertificateDer<'_>, now: SystemTime) -> Option<Result<Duration, Duration>> {
    let not_after = crate::tls::CertInfo::of(cert)?.not_after;
    Some(match not_after.duration_since(now) {
        Ok(left) => Ok(left),
        Err(past) => Err(past.duration()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_valid_until(year: i32, month: u8, day: u8) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["gw".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn expiry_is_told_ahead_and_after() {
        let cert = CertificateDer::from(cert_valid_until(2030, 1, 1));
        // 2030-01-01T00:00:00Z.
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(expires_in(&cert, not_after - 30 * day), Some(Ok(30 * day)));
        assert_eq!(expires_in(&cert, not_after + 2 * day), Some(Err(2 * day)));
        assert_eq!(
            expires_in(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]), not_after),
            None,
            "truncated DER"
        );
    }

    #[test]
    fn keys_of_each_format_load_and_errors_name_the_file_not_the_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, alg) in [("ec.pem", &rcgen::PKCS_ECDSA_P256_SHA256), ("ed.pem", &rcgen::PKCS_ED25519)] {
            let key = rcgen::KeyPair::generate_for(alg).expect("key");
            let path = dir.path().join(name);
            std::fs::write(&path, key.serialize_pem()).expect("write");
            assert!(matches!(private_key(&path), Ok(PrivateKeyDer::Pkcs8(_))), "{name}");
        }
        // SEC1 ("EC PRIVATE KEY"), as `openssl ecparam -genkey` writes it.
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIObLW92AqkWunJXowVR2Z5/+yVPBaFHnEedDk5WJxk/BoAoGCCqGSM49\nAwEHoUQDQgAEQiVI+I+3gv+17KN0RFLhKpr6LORdHQkvcshnAv1tV+i3Aq1Od7IK\nYIXmBJLOIRzQG3p3mr9UFC9ivCOIH3W5XQ==\n-----END EC PRIVATE KEY-----\n";
        let path = dir.path().join("sec1.pem");
        std::fs::write(&path, sec1).expect("write");
        assert!(matches!(private_key(&path), Ok(PrivateKeyDer::Sec1(_))));

        let cert_path = dir.path().join("cert.pem");
        std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .expect("write");
        assert!(private_key(&cert_path).expect_err("a certificate is no key").contains("no private key"));
        let err = certificates(&path).expect_err("a key is no certificate");
        assert!(err.contains("no PEM certificate") && err.contains("sec1.pem"), "{err}");
        assert!(!err.contains("MHcC"), "{err}");
        let err = certificates(&dir.path().join("missing.pem")).expect_err("missing");
        assert!(err.ends_with("no such file"), "{err}");

        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(!readable_by_others(&path));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(readable_by_others(&path));
    }
}
