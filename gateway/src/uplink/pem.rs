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
/// `notAfter`. `None` when the DER cannot be read that far.
pub fn expires_in(cert: &CertificateDer<'_>, now: SystemTime) -> Option<Result<Duration, Duration>> {
    let not_after = not_after(cert.as_ref())?;
    Some(match not_after.duration_since(now) {
        Ok(left) => Ok(left),
        Err(past) => Err(past.duration()),
    })
}

/// A certificate's `notAfter`: Certificate → tbsCertificate → (version) serial, signature,
/// issuer → validity → notAfter. A dozen lines of DER against an X.509 parser crate for the
/// one field the log needs.
fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xA0 {
        tbs = rest; // explicit version
    }
    for _ in 0..3 {
        tbs = tlv(tbs)?.2; // serial, signature algorithm, issuer
    }
    let (_, validity, _) = tlv(tbs)?;
    let after = tlv(validity)?.2;
    let (tag, time, _) = tlv(after)?;
    asn1_time(tag, time)
}

/// One DER TLV: (tag, contents, what follows).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| acc << 8 | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn asn1_time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    fn not_after_is_read_from_utc_and_generalized_times() {
        // rcgen writes UTCTime up to 2049 and GeneralizedTime from 2050, as RFC 5280 says.
        for (y, m, d) in [(2031, 3, 4), (2049, 12, 31), (2050, 1, 1), (2101, 7, 15)] {
            let der = cert_valid_until(y, m, d);
            let expected = SystemTime::UNIX_EPOCH
                + Duration::from_secs(
                    u64::try_from(days_from_civil(y.into(), m.into(), d.into())).expect("after 1970")
                        * 86_400,
                );
            assert_eq!(not_after(&der), Some(expected), "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(not_after(b"\x30\x03\x02\x01"), None, "truncated DER");
    }

    #[test]
    fn expiry_is_told_ahead_and_after() {
        let cert = CertificateDer::from(cert_valid_until(2030, 1, 1));
        let at = |y, m, d| {
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(days_from_civil(y, m, d)).expect("pos") * 86_400)
        };
        assert_eq!(expires_in(&cert, at(2029, 12, 2)), Some(Ok(Duration::from_secs(30 * 86_400))));
        assert_eq!(expires_in(&cert, at(2030, 1, 3)), Some(Err(Duration::from_secs(2 * 86_400))));
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
