//! The TLS listener (`[broker.tls]`): handshakes, their bound, the client certificate's
//! identity, and the certificates' reload on SIGHUP. Files and rustls configuration are
//! [`crate::tls`]'s; what follows the handshake is an ordinary connection (`conn`).
//!
//! # Invariants
//! - A handshake finishes within `broker.connection_timeout` of the TCP accept, and the
//!   CONNECT must arrive by that same deadline: a client that opens TCP and says nothing holds
//!   its socket no longer than on the plain listener.
//! - At most `broker.tls.max_handshakes` handshakes run at once; beyond it a connection is
//!   closed unread (`tls_handshakes_failed_busy`). Established connections never wait for a
//!   handshake: each runs in its own task, and the runtime interleaves them.
//! - A reload swaps the configuration new handshakes use; connections already up keep theirs
//!   (rustls holds its own reference), so no sensor is dropped. A file that does not load
//!   changes nothing.
//! - The client certificate's name becomes the username only after rustls verified the
//!   certificate against `broker.tls.ca_file`.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::tls::TlsConfig;
use crate::metrics::Metrics;
use crate::telemetry::LogThrottles;
use crate::tls::{self, CertInfo, EXPIRY_WARNING, TlsError};

/// How often a running gateway looks at its certificate's expiry again (besides at start-up
/// and on every reload), so a gateway that runs for months still warns.
const EXPIRY_CHECK: Duration = Duration::from_secs(24 * 3600);

/// Why a handshake did not give a connection.
#[derive(Debug)]
pub(super) enum Failure {
    Timeout,
    Certificate(String),
    Identity,
    Protocol(String),
    Shutdown,
}

pub(super) struct TlsListener {
    cfg: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
    handshakes: Arc<Semaphore>,
    metrics: Metrics,
}

/// A handshake slot: counted in `tls_handshakes_in_progress` until dropped.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.gauges().tls_handshakes_in_progress.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl TlsListener {
    pub(super) fn load(cfg: &TlsConfig, metrics: Metrics) -> Result<TlsListener, TlsError> {
        let server = tls::server(cfg)?;
        log_expiry(server.cert.as_ref(), cfg, "loaded");
        Ok(TlsListener {
            cfg: cfg.clone(),
            current: RwLock::new(server.config),
            handshakes: Arc::new(Semaphore::new(cfg.max_handshakes.get())),
            metrics,
        })
    }

    pub(super) fn listen(&self) -> SocketAddr {
        self.cfg.listen
    }

    /// A slot for one more handshake; `None` (counted) at `broker.tls.max_handshakes`.
    pub(super) fn slot(&self) -> Option<Slot> {
        let Ok(permit) = Arc::clone(&self.handshakes).try_acquire_owned() else {
            Metrics::add(&self.metrics.counters().tls_handshakes_failed_busy, 1);
            return None;
        };
        Metrics::add(&self.metrics.gauges().tls_handshakes_in_progress, 1);
        Some(Slot { _permit: permit, metrics: self.metrics.clone() })
    }

    /// Runs the handshake by `deadline`; the connection and the username its certificate
    /// names (with `use_identity_as_username`), or why not (counted).
    pub(super) async fn handshake(
        &self,
        stream: TcpStream,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<(TlsStream<TcpStream>, Option<Arc<str>>), Failure> {
        let _ = stream.set_nodelay(true);
        let config = Arc::clone(&self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner));
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
        let counters = self.metrics.counters();
        let stream = tokio::select! {
            _ = cancel.cancelled() => return Err(Failure::Shutdown),
            done = tokio::time::timeout_at(deadline, accept) => match done {
                Err(_) => {
                    Metrics::add(&counters.tls_handshakes_failed_timeout, 1);
                    return Err(Failure::Timeout);
                }
                Ok(Err(e)) => {
                    let certificate = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some_and(|e| {
                        matches!(e, rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
                    });
                    if certificate {
                        Metrics::add(&counters.tls_handshakes_failed_certificate, 1);
                        return Err(Failure::Certificate(e.to_string()));
                    }
                    Metrics::add(&counters.tls_handshakes_failed_protocol, 1);
                    return Err(Failure::Protocol(e.to_string()));
                }
                Ok(Ok(stream)) => stream,
            },
        };
        let identity = match self.cfg.use_identity_as_username {
            None => None,
            Some(source) => match stream.get_ref().1.peer_certificates().and_then(|certs| certs.first()) {
                // No certificate where none is required: the password check decides.
                None => None,
                Some(cert) => match tls::identity(cert, source) {
                    Some(name) => Some(Arc::from(name)),
                    None => {
                        Metrics::add(&counters.tls_handshakes_failed_identity, 1);
                        return Err(Failure::Identity);
                    }
                },
            },
        };
        Metrics::add(&counters.tls_handshakes, 1);
        Ok((stream, identity))
    }

    /// Logs a failed handshake, at most once per kind per reminder period.
    pub(super) fn log_failure(&self, failure: &Failure, peer: SocketAddr, logs: &LogThrottles) {
        match failure {
            Failure::Certificate(why) => {
                if let Some(folded) = logs.ready("tls certificate") {
                    warn!(message = "a client's TLS certificate was refused; issue it from broker.tls.ca_file's CA (or set broker.tls.require_certificate = false to let clients without one log in with a password)", %peer, reason = %why, similar_since_last_log = folded);
                }
            }
            Failure::Identity => {
                if let Some(folded) = logs.ready("tls identity") {
                    warn!(message = "a client certificate has no name for broker.tls.use_identity_as_username; reissue it with that name, or pick another source", %peer, source = ?self.cfg.use_identity_as_username, similar_since_last_log = folded);
                }
            }
            Failure::Timeout => {
                if let Some(folded) = logs.ready("tls timeout") {
                    info!(message = "a TLS handshake did not finish within broker.connection_timeout; closed (a stalled or hostile client, or plain MQTT sent to the TLS port)", %peer, similar_since_last_log = folded);
                }
            }
            Failure::Protocol(why) => {
                if let Some(folded) = logs.ready("tls protocol") {
                    info!(message = "a TLS handshake failed; check the client's TLS settings (TLS 1.2 or newer, the CA that signed broker.tls.cert_file)", %peer, reason = %why, similar_since_last_log = folded);
                }
            }
            Failure::Shutdown => {}
        }
    }

    /// Re-reads the certificate, key and CA files; on failure the configuration in force stays.
    fn reload(&self) -> Result<(), TlsError> {
        let server = tls::server(&self.cfg)?;
        log_expiry(server.cert.as_ref(), &self.cfg, "reloaded");
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = server.config;
        Ok(())
    }

    fn check_expiry(&self) {
        if let Ok(certs) = tls::load_certs("broker.tls.cert_file", &self.cfg.cert_file) {
            let info = certs.first().and_then(CertInfo::of);
            if info
                .as_ref()
                .is_some_and(|i| i.left(SystemTime::now()).is_none_or(|left| left < EXPIRY_WARNING))
            {
                log_expiry(info.as_ref(), &self.cfg, "in force");
            }
        }
    }
}

/// Logs the certificate's expiry: INFO, WARN within [`EXPIRY_WARNING`], ERROR once expired.
fn log_expiry(cert: Option<&CertInfo>, cfg: &TlsConfig, what: &'static str) {
    let file = cfg.cert_file.display();
    let Some(cert) = cert else {
        warn!(message = "the TLS certificate's expiry cannot be read; check it by hand", %file);
        return;
    };
    let not_after = humantime::format_rfc3339_seconds(cert.not_after);
    match cert.left(SystemTime::now()) {
        None => {
            error!(message = "the TLS listener's certificate has expired: clients that check it refuse to connect; renew broker.tls.cert_file and send SIGHUP", %file, subject = %cert.subject, %not_after, certificate = what)
        }
        Some(left) if left < EXPIRY_WARNING => {
            let days_left = left.as_secs() / 86_400;
            warn!(message = "the TLS listener's certificate expires soon; renew broker.tls.cert_file and send SIGHUP", %file, subject = %cert.subject, %not_after, days_left, certificate = what);
        }
        Some(left) => {
            let days_left = left.as_secs() / 86_400;
            info!(message = "TLS certificate", %file, subject = %cert.subject, %not_after, days_left, certificate = what);
        }
    }
}

/// Reloads the certificates on SIGHUP, and looks at their expiry once a day.
pub(super) async fn reload_on_hangup(listener: Arc<TlsListener>, cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            error!(message = "cannot listen for SIGHUP; the TLS certificates will not be reloaded until a restart", %error);
            return;
        }
    };
    let mut daily = tokio::time::interval_at(Instant::now() + EXPIRY_CHECK, EXPIRY_CHECK);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = daily.tick() => {
                let listener = Arc::clone(&listener);
                let _ = tokio::task::spawn_blocking(move || listener.check_expiry()).await;
                continue;
            }
            received = hangup.recv() => if received.is_none() { break },
        }
        let reloaded = tokio::task::spawn_blocking({
            let listener = Arc::clone(&listener);
            move || listener.reload()
        })
        .await;
        let counters = listener.metrics.counters();
        match reloaded {
            Ok(Ok(())) => {
                Metrics::add(&counters.tls_reloads, 1);
                debug!(message = "TLS certificates reloaded");
            }
            Ok(Err(e)) => {
                Metrics::add(&counters.tls_reload_failures, 1);
                error!(message = "TLS certificates not reloaded; those loaded before stay in force. Fix the file and send SIGHUP again", error = %e);
            }
            Err(e) => error!(message = "the TLS reload task failed", error = %e),
        }
    }
}
