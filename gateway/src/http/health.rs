//! What `/health/ready` checks, and the buffer figures `/metrics` and `/status` share.
//!
//! Ready means a sensor could connect and its events would be kept: the store thread answers
//! a read, and every sensor listener answers a real MQTT CONNECT with a CONNACK that accepts
//! sensors (a bound port is not enough: a wedged accept loop or a full
//! `broker.max_connections` still holds the port). An upstream outage is not unreadiness:
//! buffering through it is the gateway's job, so the upstream state only goes in the body.
//!
//! # Invariants
//! - At most one check runs at a time, and its answer is reused for [`CHECK_TTL`]: however
//!   often probes and scrapes come, the broker sees at most one probe connection and the
//!   store thread one read per second. Each part of a check is bounded by [`CHECK_TIMEOUT`].
//! - The store is asked through its command queue like the admin socket does, so the read is
//!   ordered with commits and never races them; one such request is outstanding at most.
//! - The `[broker.tls]` listener is probed like the plain ones, through a TLS handshake first.
//!   The probe does not verify the server's certificate (it connects to its own process on
//!   loopback to see the listener answer; authenticating it would prove nothing and would fail
//!   for certificates made for other names), but the handshake's signatures are checked. When
//!   the listener requires client certificates the probe has none: a completed handshake is
//!   its answer (the listener's certificate check then counts one refused handshake per probe,
//!   at most one a second), and the body says so.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::buffer::inspect::StatsReport;
use crate::buffer::worker::{Command, InspectRequest, Inspected};

/// How long a check's answer is reused.
pub const CHECK_TTL: Duration = Duration::from_secs(1);
/// How long the store and each listener may take to answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// One listener's answer to the probe.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ListenerCheck {
    pub addr: SocketAddr,
    /// The `[broker.tls]` listener (probed through a TLS handshake).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the probe could not try, when it is ready anyway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A sensor listener the probe connects to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: ListenerTls,
}

/// How a listener is reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ListenerTls {
    Plain,
    /// `[broker.tls]`; `client_certificate_required`: `broker.tls.require_certificate`.
    Tls {
        client_certificate_required: bool,
    },
}

/// One readiness check.
#[derive(Debug, Clone)]
pub struct Check {
    /// The committed buffer, or why the store thread did not answer.
    pub store: Result<StatsReport, String>,
    pub listeners: Vec<ListenerCheck>,
}

impl Check {
    pub fn ready(&self) -> bool {
        self.store.is_ok() && self.listeners.iter().all(|l| l.ok)
    }
}

/// What the checks need: the store's queue and the listeners with the credentials a sensor
/// would use; the last answer of each part.
pub struct Checker {
    store: mpsc::Sender<Command>,
    listeners: Vec<Listener>,
    connect: Vec<u8>,
    tls: Result<Arc<rustls::ClientConfig>, String>,
    last_store: Mutex<Option<(Instant, Result<StatsReport, String>)>>,
    last_listeners: Mutex<Option<(Instant, Vec<ListenerCheck>)>>,
}

impl Checker {
    /// `credentials`: a configured sensor user, so the probe connects as a sensor would
    /// instead of being counted as refused.
    pub fn new(
        store: mpsc::Sender<Command>,
        listeners: Vec<Listener>,
        credentials: Option<(&str, &str)>,
    ) -> Checker {
        Checker {
            store,
            listeners,
            connect: connect_packet(credentials),
            tls: probe_tls_config(),
            last_store: Mutex::new(None),
            last_listeners: Mutex::new(None),
        }
    }

    /// The store's statistics, at most [`CHECK_TTL`] old (`/metrics` needs only these, so a
    /// scraper never opens sensor connections).
    pub async fn store(&self) -> Result<StatsReport, String> {
        let mut last = self.last_store.lock().await;
        if let Some((_, answer)) = last.as_ref().filter(|(at, _)| at.elapsed() < CHECK_TTL) {
            return answer.clone();
        }
        let answer = store_stats(&self.store).await;
        *last = Some((Instant::now(), answer.clone()));
        answer
    }

    /// Every listener's probe, at most [`CHECK_TTL`] old.
    pub async fn listeners(&self) -> Vec<ListenerCheck> {
        let mut last = self.last_listeners.lock().await;
        if let Some((_, answer)) = last.as_ref().filter(|(at, _)| at.elapsed() < CHECK_TTL) {
            return answer.clone();
        }
        let answer =
            probe_all(self.listeners.iter().map(|listener| probe(*listener, &self.connect, &self.tls))).await;
        *last = Some((Instant::now(), answer.clone()));
        answer
    }

    /// Both, concurrently.
    pub async fn check(&self) -> Check {
        let (store, listeners) = tokio::join!(self.store(), self.listeners());
        Check { store, listeners }
    }
}

/// Runs the probes one after the other: there are one or two listeners, each bounded by
/// [`CHECK_TIMEOUT`], and this keeps the crate free of a futures dependency.
async fn probe_all<F: std::future::Future<Output = ListenerCheck>>(
    probes: impl Iterator<Item = F>,
) -> Vec<ListenerCheck> {
    let mut out = Vec::new();
    for probe in probes {
        out.push(probe.await);
    }
    out
}

/// The committed buffer's statistics from the store thread, within [`CHECK_TIMEOUT`].
pub async fn store_stats(store: &mpsc::Sender<Command>) -> Result<StatsReport, String> {
    let ask = async {
        let (reply, answer) = oneshot::channel();
        store
            .send(Command::Inspect { request: InspectRequest::Stats, reply })
            .await
            .map_err(|_| "the store thread has stopped".to_owned())?;
        match answer.await.map_err(|_| "the store thread has stopped".to_owned())?? {
            Inspected::Stats(stats) => Ok(stats),
            Inspected::Records(_) => Err("the store thread answered another question".to_owned()),
        }
    };
    match tokio::time::timeout(CHECK_TIMEOUT, ask).await {
        Ok(answer) => answer.map_err(|e| format!("buffer store: {e}")),
        Err(_) => Err(format!(
            "buffer store: no answer within {CHECK_TIMEOUT:?}; the disk may be stalled (see outpost_buffer_commit_duration_seconds)"
        )),
    }
}

/// An MQTT 3.1.1 CONNECT: clean session, empty client id (the broker assigns one), keepalive
/// 10 s, and the credentials if given. Encoded here because it is constant per gateway and the
/// probe must not depend on the broker's own codec being healthy.
fn connect_packet(credentials: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    let flags = if credentials.is_some() { 0xC2 } else { 0x02 };
    body.extend([flags, 0, 10, 0, 0]);
    if let Some((user, password)) = credentials {
        for field in [user.as_bytes(), password.as_bytes()] {
            // Config strings longer than 65,535 bytes cannot be MQTT credentials anyway.
            let len = field.len().min(usize::from(u16::MAX));
            body.extend((len as u16).to_be_bytes());
            body.extend(&field[..len]);
        }
    }
    let mut packet = vec![0x10];
    // Remaining length: 7 bits a byte, least significant first.
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

/// Where to reach a listener from this host: an unspecified address means loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Connects to the listener (through a TLS handshake for `[broker.tls]`), sends the CONNECT,
/// reads the CONNACK, disconnects.
pub async fn probe(
    listener: Listener,
    connect: &[u8],
    tls: &Result<Arc<rustls::ClientConfig>, String>,
) -> ListenerCheck {
    let target = reachable(listener.addr);
    let attempt = async {
        let stream = TcpStream::connect(target).await.map_err(|e| format!("cannot connect: {e}"))?;
        match listener.tls {
            ListenerTls::Plain => mqtt_connect(stream, connect).await.map(|()| None),
            ListenerTls::Tls { client_certificate_required } => {
                let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
                let mut stream = tokio_rustls::TlsConnector::from(tls.clone()?)
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                if client_certificate_required {
                    let _ = stream.shutdown().await;
                    return Ok(Some(
                        "TLS handshake completed; broker.tls.require_certificate is set and the probe has \
                         no client certificate, so no CONNECT was tried"
                            .to_owned(),
                    ));
                }
                mqtt_connect(stream, connect).await.map(|()| None)
            }
        }
    };
    let tls = listener.tls != ListenerTls::Plain;
    let addr = listener.addr;
    match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
        Ok(Ok(note)) => ListenerCheck { addr, tls, ok: true, error: None, note },
        Ok(Err(error)) => ListenerCheck { addr, tls, ok: false, error: Some(error), note: None },
        Err(_) => ListenerCheck {
            addr,
            tls,
            ok: false,
            error: Some(format!(
                "no CONNACK within {CHECK_TIMEOUT:?}: the port is bound but the broker does not answer"
            )),
            note: None,
        },
    }
}

/// The CONNECT, its CONNACK and a DISCONNECT on an open stream.
async fn mqtt_connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    connect: &[u8],
) -> Result<(), String> {
    stream.write_all(connect).await.map_err(|e| format!("cannot send CONNECT: {e}"))?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.map_err(|e| format!("no CONNACK: {e}"))?;
    if connack[..2] != [0x20, 0x02] {
        return Err(format!("answered CONNECT with {connack:02x?}, not a CONNACK"));
    }
    // Best effort: the broker ends the session on close anyway.
    let _ = stream.write_all(&[0xE0, 0x00]).await;
    let _ = stream.shutdown().await;
    match connack[3] {
        // Refused credentials still prove the listener accepts and speaks MQTT; the probe
        // uses a configured user, so this means the config changed under it.
        0 | 4 | 5 => Ok(()),
        3 => {
            Err("CONNACK 3 (server unavailable): broker.max_connections is reached, new sensors are refused"
                .to_owned())
        }
        code => Err(format!("CONNACK return code {code}")),
    }
}

/// The probe's TLS client: ring, TLS 1.2 and 1.3 like the listener, any server certificate
/// (see the module's invariants). An error fails the TLS listener's probe with its reason.
fn probe_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(OwnListener(provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("cannot set up the probe's TLS client: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts the certificate the probe's own listener presents; checks the handshake signatures.
#[derive(Debug)]
struct OwnListener(Arc<CryptoProvider>);

impl ServerCertVerifier for OwnListener {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(addr: SocketAddr) -> Listener {
        Listener { addr, tls: ListenerTls::Plain }
    }

    #[test]
    fn connect_packets_are_well_formed() {
        assert_eq!(connect_packet(None), [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 0]);
        let with = connect_packet(Some(("u", "pw")));
        assert_eq!(with[1] as usize, with.len() - 2);
        assert_eq!(&with[9..10], &[0xC2]);
        assert_eq!(&with[14..], &[0, 1, b'u', 0, 2, b'p', b'w']);
        let long = "x".repeat(200);
        let with = connect_packet(Some((&long, "")));
        // 12 + 2 + 200 + 2 = 216 = 0xD8 → [0xD8, 0x01].
        assert_eq!(&with[1..3], &[0xD8, 0x01]);
        assert_eq!(with.len(), 3 + 216);
    }

    #[tokio::test]
    async fn a_bound_port_that_never_answers_is_not_ready() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // The kernel completes the handshake from the backlog; nobody reads the CONNECT.
        let check = probe(plain(addr), &connect_packet(None), &probe_tls_config()).await;
        assert!(!check.ok);
        assert!(check.error.as_deref().is_some_and(|e| e.contains("no CONNACK within")), "{check:?}");
        drop(listener);
        let check = probe(plain(addr), &connect_packet(None), &probe_tls_config()).await;
        assert!(check.error.as_deref().is_some_and(|e| e.starts_with("cannot connect")), "{check:?}");
    }

    #[tokio::test]
    async fn a_connack_is_read_and_a_busy_broker_is_not_ready() {
        for (code, ok) in [(0u8, true), (5, true), (3, false)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut connect = [0u8; 14];
                socket.read_exact(&mut connect).await.expect("CONNECT");
                socket.write_all(&[0x20, 0x02, 0, code]).await.expect("CONNACK");
                let mut disconnect = [0u8; 2];
                socket.read_exact(&mut disconnect).await.expect("DISCONNECT");
                (connect, disconnect)
            });
            let check = probe(plain(addr), &connect_packet(None), &probe_tls_config()).await;
            assert_eq!(check.ok, ok, "code {code}: {check:?}");
            let (connect, disconnect) = server.await.expect("server");
            assert_eq!(connect[0], 0x10);
            assert_eq!(disconnect, [0xE0, 0]);
        }
    }

    #[test]
    fn unspecified_listeners_are_probed_on_loopback() {
        assert_eq!(reachable("0.0.0.0:1883".parse().expect("addr")), "127.0.0.1:1883".parse().expect("addr"));
        assert_eq!(reachable("[::]:1883".parse().expect("addr")), "[::1]:1883".parse().expect("addr"));
        assert_eq!(reachable("10.1.2.3:1883".parse().expect("addr")), "10.1.2.3:1883".parse().expect("addr"));
    }
}
