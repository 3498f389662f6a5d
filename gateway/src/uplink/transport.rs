//! How an upstream URL becomes a connected byte stream: TCP for `mqtt://`, TCP then TLS for
//! `mqtts://`. One dialer for every upstream connection (the relay's link, `outpost check
//! --connect`), called once per attempt and per endpoint.
//!
//! TLS is rustls with the ring provider, TLS 1.2 and 1.3 only. The server is verified
//! against `upstream.tls.ca_file`, or the system's roots (rustls-native-certs: Debian's
//! ca-certificates, kept current by the OS and where a site installs its own CA, rather than
//! a list compiled into a binary that an edge device rarely replaces), for the URL's host or
//! `upstream.tls.server_name`. Nothing turns verification off.
//!
//! The CA, the client certificate and key and `upstream.password_file` are read at every
//! connect: rotating them needs no restart. What the log says about them — the client
//! certificate's expiry (a WARN inside [`EXPIRY_WARNING`]), a key or password file others
//! can read — is said once per certificate or file, not per attempt. Their contents never
//! reach a message.
//!
//! A failed handshake becomes a [`TlsFailure`] that says what to change; its
//! [`TlsReason`] is what the counters count. In TLS 1.3 the server checks the client's
//! certificate after the client considers the handshake done, so its refusal arrives as the
//! first read's error: [`classify_io`] reads those too.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

use super::pem;
use crate::config::{UpstreamConfig, UpstreamUrl};
use crate::telemetry::readable;

/// A client certificate that expires sooner than this gets a WARN at connect.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// rustls holds at most this many bytes of TLS records not yet written. Above the link's
/// high-water mark, so one loop turn's batch is encrypted and handed to the socket in one
/// vectored write instead of in 64 KiB pieces (rustls's default).
const TLS_BUFFER_LIMIT: usize = super::OUT_HIGH_WATER + 64 * 1024;

/// A connected upstream stream: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// What was negotiated, for `outpost check --connect`: "TLS 1.3, ALPN x-amzn-mqtt-ca".
    pub fn describe(&self) -> String {
        match self {
            Stream::Plain(_) => "plain TCP".to_owned(),
            Stream::Tls(s) => {
                let conn = &s.get_ref().1;
                let version = match conn.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
                    other => format!("{other:?}"),
                };
                match conn.alpn_protocol() {
                    Some(alpn) => format!("{version}, ALPN {}", String::from_utf8_lossy(alpn)),
                    None => version,
                }
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why a handshake failed, as counted (`upstream_tls_<label>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsReason {
    /// The server's chain does not end in a trusted CA.
    UnknownCa,
    /// The server's certificate is expired or not yet valid.
    ServerExpired,
    /// The server refused our client certificate as expired.
    ClientExpired,
    /// The server's certificate is not valid for the name we connect to.
    Hostname,
    /// The server requires a client certificate and we sent none.
    ClientCertRequired,
    /// The server refused our client certificate.
    ClientCertRefused,
    /// No TLS version (or cipher suite) in common.
    Protocol,
    /// Anything else: not a TLS server, a broken record, a reset mid-handshake.
    Other,
}

impl TlsReason {
    pub fn label(self) -> &'static str {
        match self {
            TlsReason::UnknownCa => "unknown_ca",
            TlsReason::ServerExpired => "server_expired",
            TlsReason::ClientExpired => "client_expired",
            TlsReason::Hostname => "hostname",
            TlsReason::ClientCertRequired => "client_cert_required",
            TlsReason::ClientCertRefused => "client_cert_refused",
            TlsReason::Protocol => "protocol",
            TlsReason::Other => "other",
        }
    }
}

/// A failed TLS handshake (or the server's refusal right after it): why, and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TLS handshake with {server} failed: {advice}")]
pub struct TlsFailure {
    pub reason: TlsReason,
    /// The name the certificate was checked against.
    pub server: String,
    pub advice: String,
}

/// Why an attempt to reach the upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// DNS, TCP connect, a reset: the host or the network.
    #[error("{0}")]
    Network(String),
    /// A file the connection needs (CA, client certificate or key, password) cannot be used.
    #[error("{0}")]
    Files(String),
    #[error(transparent)]
    Tls(#[from] TlsFailure),
    /// The MQTT exchange after the connection: CONNACK refused, garbled, or missing.
    #[error("{0}")]
    Mqtt(String),
}

impl ConnectError {
    /// The handshake failure's reason, for the counters.
    pub fn tls_reason(&self) -> Option<TlsReason> {
        match self {
            ConnectError::Tls(failure) => Some(failure.reason),
            _ => None,
        }
    }
}

/// TCP, then TLS for `mqtts://`.
pub async fn open(cfg: &UpstreamConfig, url: &UpstreamUrl) -> Result<Stream, ConnectError> {
    let tcp = tcp(url).await?;
    if url.tls { tls(cfg, url, tcp).await } else { Ok(Stream::Plain(tcp)) }
}

/// The TCP connection, with Nagle off: publishes are written in batches already, and Nagle
/// would only add a round trip of delay.
pub async fn tcp(url: &UpstreamUrl) -> Result<TcpStream, ConnectError> {
    let stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| ConnectError::Network(describe_io(&e, None)))?;
    stream.set_nodelay(true).map_err(|e| ConnectError::Network(describe_io(&e, None)))?;
    Ok(stream)
}

/// The TLS handshake over `tcp`, with the files read now.
pub async fn tls(cfg: &UpstreamConfig, url: &UpstreamUrl, tcp: TcpStream) -> Result<Stream, ConnectError> {
    let tls = cfg.tls.clone().unwrap_or_default();
    let name = tls.server_name.clone().unwrap_or_else(|| url.host.clone());
    let server_name = ServerName::try_from(name.clone()).map_err(|_| {
        ConnectError::Files(format!(
            "{name:?} is not a name a certificate can be checked against: set upstream.tls.server_name"
        ))
    })?;
    let config = client_config(cfg)?;
    let has_client_cert = tls.cert_file.is_some();
    match TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await {
        Ok(mut stream) => {
            stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
            Ok(Stream::Tls(Box::new(stream)))
        }
        Err(e) => Err(match classify_io(&e, cfg, &name) {
            Some(failure) => ConnectError::Tls(failure),
            None if has_client_cert || e.kind() != io::ErrorKind::UnexpectedEof => {
                ConnectError::Tls(failure(TlsReason::Other, &name, describe_io(&e, None)))
            }
            // OpenSSL with TLS 1.2 closes a handshake without a certificate it requires.
            None => ConnectError::Tls(failure(
                TlsReason::Other,
                &name,
                "the server closed the connection during the handshake: if it requires a client certificate, set upstream.tls.cert_file and key_file; is the port a TLS listener?".to_owned(),
            )),
        }),
    }
}

fn failure(reason: TlsReason, server: &str, advice: String) -> TlsFailure {
    TlsFailure { reason, server: server.to_owned(), advice }
}

/// The rustls configuration for one attempt, from the files as they are now.
fn client_config(cfg: &UpstreamConfig) -> Result<ClientConfig, ConnectError> {
    let tls = cfg.tls.clone().unwrap_or_default();
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in pem::certificates(path).map_err(|e| files("upstream.tls.ca_file", &e))? {
                roots.add(cert).map_err(|e| {
                    files(
                        "upstream.tls.ca_file",
                        &format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(ConnectError::Files(
                    "no system root certificates found: install Debian's ca-certificates, or set upstream.tls.ca_file to the CA that issued the upstream's certificate".to_owned(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConnectError::Files(format!("cannot set up TLS: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let chain = pem::certificates(cert_path).map_err(|e| files("upstream.tls.cert_file", &e))?;
            note_client_certificate(cert_path, &chain[0], SystemTime::now());
            note_secret_file("upstream.tls.key_file", key_path);
            let key = pem::private_key(key_path).map_err(|e| files("upstream.tls.key_file", &e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                files(
                    "upstream.tls.key_file",
                    &format!(
                        "{}: cannot be used with the certificate in {}: {e} (is it the certificate's own key?)",
                        key_path.display(),
                        cert_path.display()
                    ),
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

fn files(key: &str, error: &str) -> ConnectError {
    ConnectError::Files(format!("{key}: {error}"))
}

/// The password for this attempt: `upstream.password`, or the first line of
/// `upstream.password_file` as it is now.
pub fn password(cfg: &UpstreamConfig) -> Result<Option<String>, ConnectError> {
    let Some(path) = &cfg.password_file else { return Ok(cfg.password.clone()) };
    note_secret_file("upstream.password_file", path);
    let text = std::fs::read_to_string(path)
        .map_err(|e| files("upstream.password_file", &format!("{}: cannot read it: {e}", path.display())))?;
    Ok(Some(text.lines().next().unwrap_or_default().to_owned()))
}

/// What was said already: `(what, file, detail)`, so each note is logged once per file and
/// certificate, not at every reconnect. Bounded by the files and certificates a config names.
static NOTED: Mutex<BTreeSet<(&'static str, PathBuf, u64)>> = Mutex::new(BTreeSet::new());

/// Whether this note is new (and remembers it).
fn first_time(what: &'static str, path: &Path, detail: u64) -> bool {
    NOTED.lock().unwrap_or_else(PoisonError::into_inner).insert((what, path.to_owned(), detail))
}

/// A key or password file its group or others can read: WARN, once per file.
fn note_secret_file(key: &'static str, path: &Path) {
    if pem::readable_by_others(path) && first_time(key, path, 0) {
        warn!(
            message = "a secret file is readable by other users; make it readable by the gateway's user only (chmod 600, or 640 with a group of its own)",
            key,
            file = %path.display()
        );
    }
}

/// The client certificate's expiry, once per certificate (a renewed one is logged anew).
fn note_client_certificate(path: &Path, cert: &rustls::pki_types::CertificateDer<'_>, now: SystemTime) {
    let Some(expiry) = pem::expires_in(cert, now) else { return };
    // The certificate's expiry identifies it well enough to log a renewed one again.
    let fingerprint = match expiry {
        Ok(left) => now.checked_add(left),
        Err(ago) => now.checked_sub(ago),
    }
    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
    .map_or(0, |d| d.as_secs());
    if !first_time("upstream.tls.cert_file", path, fingerprint) {
        return;
    }
    let file = path.display();
    match expiry {
        Err(ago) => warn!(
            message = "the upstream client certificate has expired; the upstream will refuse it: renew upstream.tls.cert_file (check this device's clock too)",
            %file,
            expired_ago = %readable(ago)
        ),
        Ok(left) if left < EXPIRY_WARNING => warn!(
            message = "the upstream client certificate expires soon: renew upstream.tls.cert_file (the gateway reads it at every connect, no restart needed)",
            %file,
            expires_in = %readable(left)
        ),
        Ok(left) => info!(message = "upstream client certificate", %file, expires_in = %readable(left)),
    }
}

/// An I/O error for the log: a refused connection says what to check; a TLS error says what
/// failed.
pub fn describe_io(error: &io::Error, cfg: Option<(&UpstreamConfig, &UpstreamUrl)>) -> String {
    if let Some(failure) = cfg.and_then(|(cfg, url)| {
        let name = cfg.tls.as_ref().and_then(|t| t.server_name.clone()).unwrap_or_else(|| url.host.clone());
        classify_io(error, cfg, &name)
    }) {
        return failure.to_string();
    }
    match error.kind() {
        io::ErrorKind::ConnectionRefused => {
            "connection refused: is the upstream broker running and is its address in upstream.url (or upstream.urls) right?".to_owned()
        }
        _ => error.to_string(),
    }
}

/// The TLS failure inside an I/O error from a TLS stream, if it is one.
pub fn classify_io(error: &io::Error, cfg: &UpstreamConfig, server: &str) -> Option<TlsFailure> {
    let tls_error = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(classify(tls_error, cfg, server))
}

/// What a rustls error means for the operator.
pub fn classify(error: &rustls::Error, cfg: &UpstreamConfig, server: &str) -> TlsFailure {
    let tls = cfg.tls.clone().unwrap_or_default();
    let path = |p: &Option<PathBuf>| p.as_ref().map_or_else(String::new, |p| p.display().to_string());
    let (reason, advice) = match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => (
                TlsReason::UnknownCa,
                match &tls.ca_file {
                    Some(_) => format!(
                        "the server's certificate is not issued by the CA in upstream.tls.ca_file ({}): put the CA that issued the server's certificate in that file",
                        path(&tls.ca_file)
                    ),
                    None => "the server's certificate is not issued by a CA in the system's roots: set upstream.tls.ca_file to the CA that issued it".to_owned(),
                },
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                TlsReason::ServerExpired,
                format!("the server's certificate has expired ({cert}): the upstream broker's certificate must be renewed (on the server side); check this device's clock too"),
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                TlsReason::ServerExpired,
                format!("the server's certificate is not valid yet ({cert}): check this device's clock (NTP)"),
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
                TlsReason::Hostname,
                format!("the server's certificate is not valid for {server:?} ({cert}): connect to the name the certificate is issued for, or set upstream.tls.server_name to it"),
            ),
            other => (TlsReason::Other, format!("the server's certificate was refused: {other}")),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => (TlsReason::ClientCertRequired, required_advice(&tls)),
            AlertDescription::HandshakeFailure if tls.cert_file.is_none() => {
                (TlsReason::ClientCertRequired, required_advice(&tls))
            }
            AlertDescription::CertificateExpired => (
                TlsReason::ClientExpired,
                format!(
                    "the server refused our client certificate as expired: renew the certificate in upstream.tls.cert_file ({}); check this device's clock too",
                    path(&tls.cert_file)
                ),
            ),
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError => (
                TlsReason::ClientCertRefused,
                format!(
                    "the server refused our client certificate (alert {alert:?}) from upstream.tls.cert_file ({}): it must be issued by a CA the server trusts, and registered and active there (AWS IoT: attached to the thing, status active)",
                    path(&tls.cert_file)
                ),
            ),
            AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity => (
                TlsReason::Protocol,
                format!("no TLS version in common (alert {alert:?}): Outpost speaks TLS 1.2 and 1.3; the server must allow one of them"),
            ),
            other => (TlsReason::Other, format!("the server ended the handshake with alert {other:?}")),
        },
        rustls::Error::PeerIncompatible(why) => (
            TlsReason::Protocol,
            format!("no TLS version or cipher suite in common ({why:?}): Outpost speaks TLS 1.2 and 1.3 with modern suites; the server must allow them"),
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } | rustls::Error::InappropriateHandshakeMessage { .. } => (
            TlsReason::Other,
            format!("the server did not answer TLS ({error}): is the port a TLS listener (mqtts:// is usually 8883), or should upstream.url be mqtt://?"),
        ),
        other => (TlsReason::Other, other.to_string()),
    };
    TlsFailure { reason, server: server.to_owned(), advice }
}

fn required_advice(tls: &crate::config::upstream_tls::UpstreamTlsConfig) -> String {
    match &tls.cert_file {
        None => "the server requires a client certificate (mutual TLS): set upstream.tls.cert_file and upstream.tls.key_file".to_owned(),
        Some(path) => format!(
            "the server requires a client certificate and did not accept the one in upstream.tls.cert_file ({}): check it is issued by a CA the server trusts",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tls: Option<crate::config::upstream_tls::UpstreamTlsConfig>) -> UpstreamConfig {
        let mut cfg = UpstreamConfig::with_url("mqtts://broker.example:8883".parse().expect("url"));
        cfg.tls = tls;
        cfg
    }

    #[test]
    fn each_handshake_failure_says_what_to_change() {
        let plain = cfg(None);
        let mutual = cfg(Some(crate::config::upstream_tls::UpstreamTlsConfig {
            ca_file: Some("/etc/outpost/ca.pem".into()),
            cert_file: Some("/etc/outpost/gw.pem".into()),
            key_file: Some("/etc/outpost/gw.key".into()),
            ..Default::default()
        }));
        let cases: [(&UpstreamConfig, rustls::Error, TlsReason, &str); 9] = [
            (
                &plain,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsReason::UnknownCa,
                "set upstream.tls.ca_file",
            ),
            (
                &mutual,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsReason::UnknownCa,
                "/etc/outpost/ca.pem",
            ),
            (
                &plain,
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                TlsReason::ServerExpired,
                "server's certificate has expired",
            ),
            (
                &plain,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                TlsReason::Hostname,
                "upstream.tls.server_name",
            ),
            (
                &plain,
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                TlsReason::ClientCertRequired,
                "set upstream.tls.cert_file and upstream.tls.key_file",
            ),
            (
                &plain,
                rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
                TlsReason::ClientCertRequired,
                "requires a client certificate",
            ),
            (
                &mutual,
                rustls::Error::AlertReceived(AlertDescription::CertificateExpired),
                TlsReason::ClientExpired,
                "renew the certificate in upstream.tls.cert_file (/etc/outpost/gw.pem)",
            ),
            (
                &mutual,
                rustls::Error::AlertReceived(AlertDescription::UnknownCA),
                TlsReason::ClientCertRefused,
                "refused our client certificate",
            ),
            (
                &plain,
                rustls::Error::AlertReceived(AlertDescription::ProtocolVersion),
                TlsReason::Protocol,
                "TLS 1.2 and 1.3",
            ),
        ];
        for (cfg, error, reason, advice) in cases {
            let failure = classify(&error, cfg, "broker.example");
            assert_eq!(failure.reason, reason, "{error:?}");
            assert!(failure.to_string().contains(advice), "{error:?}: {failure}");
            assert!(
                failure.to_string().starts_with("TLS handshake with broker.example failed: "),
                "{failure}"
            );
        }
        // The same, wrapped in the I/O error a TLS stream's read returns.
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        );
        assert_eq!(classify_io(&io, &plain, "b").map(|f| f.reason), Some(TlsReason::ClientCertRequired));
        assert!(
            describe_io(&io, Some((&plain, &plain.endpoints()[0]))).contains("requires a client certificate")
        );
        assert_eq!(classify_io(&io::Error::other("x"), &plain, "b"), None);
    }

    #[test]
    fn the_password_file_is_read_at_each_call() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("password");
        std::fs::write(&path, "first\n").expect("write");
        let mut cfg = cfg(None);
        cfg.username = Some("gw".to_owned());
        cfg.password_file = Some(path.clone());
        assert_eq!(password(&cfg).expect("read").as_deref(), Some("first"));
        std::fs::write(&path, "second\r\nignored\n").expect("write");
        assert_eq!(password(&cfg).expect("read").as_deref(), Some("second"));
        std::fs::remove_file(&path).expect("rm");
        let err = password(&cfg).expect_err("the file is gone").to_string();
        assert!(err.starts_with("upstream.password_file: ") && err.contains("cannot read"), "{err}");
    }
}
