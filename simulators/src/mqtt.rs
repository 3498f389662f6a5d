//! One sensor's MQTT client, for MQTT 3.1.1 or 5, over TCP or TLS, reduced to what a sensor
//! needs: queue a publish, queue a DISCONNECT, and poll for a few kinds of `ClientEvent`. The
//! public part is the configuration: [`MqttVersion`] and [`TlsOptions`].
//!
//! rumqttc has two clients with parallel but distinct types (`rumqttc` and `rumqttc::v5`).
//! `Publisher` and `Connection` wrap either, so the sensor loop in `fleet` is written once.
//!
//! # Invariants
//! - Every rumqttc event becomes exactly one `ClientEvent` (`Other` for what a sensor ignores),
//!   in rumqttc's order: the fleet matches publishes to packet ids by that order.
//! - An acknowledgement carries whether the broker accepted the publish. MQTT 3.1.1 acks always
//!   do; an MQTT 5 ack with a failure reason code (≥ 0x80) does not, and must never be counted
//!   as acknowledged.
//! - TLS is rustls with the `ring` provider, passed to each `ClientConfig` explicitly (never the
//!   process-wide default provider), trusting either the given CA file or the system roots.
//! - A connection failure is `ConnectionFailure::tls_rejected` only if rustls itself reported
//!   it (a certificate that does not verify, an alert from the broker): retrying cannot help.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{Outgoing, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The MQTT protocol version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    V311,
    /// MQTT 5.
    V5,
}

impl fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        })
    }
}

/// How to connect over TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// A PEM file of CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key, for brokers that require mutual TLS.
    pub client_auth: Option<ClientAuth>,
}

/// A client certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl TlsOptions {
    /// Reads the files and builds the rustls configuration every connection shares.
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let roots = match &self.ca_file {
            Some(path) => ca_roots(path)?,
            None => system_roots()?,
        };
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .context("rustls's ring provider supports no TLS version")?
                .with_root_certificates(roots);
        let config = match &self.client_auth {
            Some(auth) => {
                let chain = certificates("client certificate", &auth.cert_file)?;
                let key = PrivateKeyDer::from_pem_file(&auth.key_file).map_err(|error| {
                    anyhow::anyhow!(
                        "cannot read a private key from the client key {}: {error}",
                        auth.key_file.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, key).with_context(|| {
                    format!(
                        "the client key {} does not fit the client certificate {}",
                        auth.key_file.display(),
                        auth.cert_file.display()
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// The certificates in a PEM file; at least one. `role` names the file in messages.
fn certificates(role: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| anyhow::anyhow!("cannot read the {role} {}: {error}", path.display()))?;
    if certificates.is_empty() {
        anyhow::bail!("the {role} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display());
    }
    Ok(certificates)
}

fn ca_roots(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates("CA file", path)? {
        roots
            .add(certificate)
            .with_context(|| format!("a certificate in the CA file {} is not a usable CA", path.display()))?;
    }
    Ok(roots)
}

fn system_roots() -> anyhow::Result<rustls::RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "found no system CA certificates ({}); install ca-certificates or pass a CA file",
            if errors.is_empty() { "none installed".to_string() } else { errors.join("; ") }
        );
    }
    Ok(roots)
}

/// Everything needed to open, and after a churn reopen, one client connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientOptions {
    pub version: MqttVersion,
    /// The client id, also the sensor's device id.
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
    /// TLS if set, else plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub keep_alive: Duration,
    /// The largest packet sent or accepted, in bytes.
    pub max_packet_size: usize,
    /// Requests rumqttc queues before `Publisher::try_publish` refuses.
    pub request_capacity: usize,
    /// Publishes in flight (sent, not yet acknowledged) at most; MQTT 5 brokers may lower it.
    pub max_inflight: u16,
}

impl ClientOptions {
    /// A new client and its not yet connected event loop; connecting starts with the first poll.
    pub fn connect(&self) -> (Publisher, Connection) {
        let transport = match &self.tls {
            Some(config) => Transport::Tls(TlsConfiguration::Rustls(Arc::clone(config))),
            None => Transport::Tcp,
        };
        match self.version {
            MqttVersion::V311 => {
                let mut options = rumqttc::MqttOptions::new(self.client_id.clone(), &self.host, self.port);
                options
                    .set_keep_alive(self.keep_alive)
                    .set_clean_session(true)
                    .set_inflight(self.max_inflight)
                    .set_max_packet_size(self.max_packet_size, self.max_packet_size)
                    .set_transport(transport);
                if let Some((username, password)) = &self.credentials {
                    options.set_credentials(username.clone(), password.clone());
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(options, self.request_capacity);
                (Publisher::V311(client), Connection::V311(Box::new(eventloop)))
            }
            MqttVersion::V5 => {
                let mut options =
                    rumqttc::v5::MqttOptions::new(self.client_id.clone(), &self.host, self.port);
                options
                    .set_keep_alive(self.keep_alive)
                    .set_clean_start(true)
                    // Without a limit rumqttc sizes its in-flight table for 65535 packets.
                    .set_outgoing_inflight_upper_limit(self.max_inflight)
                    .set_max_packet_size(Some(u32::try_from(self.max_packet_size).unwrap_or(u32::MAX)))
                    .set_transport(transport);
                if let Some((username, password)) = &self.credentials {
                    options.set_credentials(username.clone(), password.clone());
                }
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, self.request_capacity);
                (Publisher::V5(client), Connection::V5(Box::new(eventloop)))
            }
        }
    }
}

/// The sending half: hands requests to the event loop without waiting.
pub(crate) enum Publisher {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A request rumqttc did not take: its queue is full, or the event loop is gone.
#[derive(Debug)]
pub(crate) struct NotQueued(String);

impl fmt::Display for NotQueued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Publisher {
    /// Queues a publish, unless rumqttc's request queue is full.
    pub fn try_publish(&self, topic: &str, qos: QoS, payload: Vec<u8>) -> Result<(), NotQueued> {
        let queued = match self {
            Publisher::V311(client) => {
                client.try_publish(topic, qos, false, payload).map_err(|error| error.to_string())
            }
            Publisher::V5(client) => {
                client.try_publish(topic, v5_qos(qos), false, payload).map_err(|error| error.to_string())
            }
        };
        queued.map_err(NotQueued)
    }

    /// Queues a DISCONNECT, unless rumqttc's request queue is full.
    pub fn try_disconnect(&self) -> Result<(), NotQueued> {
        let queued = match self {
            Publisher::V311(client) => client.try_disconnect().map_err(|error| error.to_string()),
            Publisher::V5(client) => client.try_disconnect().map_err(|error| error.to_string()),
        };
        queued.map_err(NotQueued)
    }
}

fn v5_qos(qos: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// The receiving half: rumqttc's event loop, which connects, reconnects and does all I/O.
pub(crate) enum Connection {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// What a sensor learns from its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientEvent {
    /// The broker accepted the connection (CONNACK with success).
    Connected,
    /// A publish was written and flushed; its packet id (0 for QoS 0).
    PublishWritten(u16),
    /// The broker answered a publish.
    Ack {
        pkid: u16,
        kind: AckKind,
        /// False for an MQTT 5 reason code ≥ 0x80: the broker refused the publish.
        accepted: bool,
    },
    /// The DISCONNECT packet was written.
    DisconnectWritten,
    /// Anything else: pings, PUBREL, …
    Other,
}

/// Which acknowledgement packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[expect(clippy::enum_variant_names, reason = "the MQTT packet names")]
pub(crate) enum AckKind {
    /// QoS 1: the only ack.
    PubAck,
    /// QoS 2: the first ack (a refusal ends the exchange).
    PubRec,
    /// QoS 2: the final ack.
    PubComp,
}

/// A failed poll: the connection attempt failed or an established connection broke.
#[derive(Debug)]
pub(crate) struct ConnectionFailure {
    /// rumqttc's error message, which already quotes the errors it wraps.
    pub message: String,
    /// Rustls refused the handshake or the broker sent a TLS alert (an untrusted certificate, a
    /// missing client certificate): the same settings will fail again.
    pub tls_rejected: bool,
}

impl ConnectionFailure {
    fn new<E: StdError + Send + Sync + 'static>(error: E) -> ConnectionFailure {
        let tls_rejected = reported_by_rustls(&error);
        ConnectionFailure { message: error.to_string(), tls_rejected }
    }
}

/// Whether a `rustls::Error` is somewhere in the chain. Two links are followed by hand:
/// tokio-rustls wraps it in an `io::Error`, whose `source()` skips the wrapped error, and
/// rumqttc's v5 `StateError::Deserialization` (how a TLS alert after the handshake arrives,
/// e.g. for a missing client certificate) declares no source.
fn reported_by_rustls(error: &(dyn StdError + 'static)) -> bool {
    use rumqttc::v5::{StateError, mqttbytes::Error as MqttError};
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<rustls::Error>() {
            return true;
        }
        next = if let Some(io) = error.downcast_ref::<std::io::Error>() {
            io.get_ref().map(|inner| inner as &(dyn StdError + 'static))
        } else if let Some(StateError::Deserialization(MqttError::Io(io))) = error.downcast_ref() {
            Some(io as &(dyn StdError + 'static))
        } else {
            error.source()
        };
    }
    false
}

impl Connection {
    /// The next event; connects first if not connected. Never block between polls: rumqttc
    /// makes no progress meanwhile.
    pub async fn poll(&mut self) -> Result<ClientEvent, ConnectionFailure> {
        match self {
            Connection::V311(eventloop) => {
                eventloop.poll().await.map(from_v311).map_err(ConnectionFailure::new)
            }
            Connection::V5(eventloop) => eventloop.poll().await.map(from_v5).map_err(ConnectionFailure::new),
        }
    }

    /// Takes the events rumqttc read or wrote before a failure but had not yet returned.
    pub fn take_buffered(&mut self) -> Vec<ClientEvent> {
        match self {
            Connection::V311(eventloop) => eventloop.state.events.drain(..).map(from_v311).collect(),
            Connection::V5(eventloop) => eventloop.state.events.drain(..).map(from_v5).collect(),
        }
    }
}

fn from_v311(event: rumqttc::Event) -> ClientEvent {
    use rumqttc::{Event, Packet};
    let ack = |pkid, kind| ClientEvent::Ack { pkid, kind, accepted: true };
    match event {
        Event::Incoming(Packet::ConnAck(_)) => ClientEvent::Connected,
        Event::Outgoing(Outgoing::Publish(pkid)) => ClientEvent::PublishWritten(pkid),
        Event::Incoming(Packet::PubAck(puback)) => ack(puback.pkid, AckKind::PubAck),
        Event::Incoming(Packet::PubRec(pubrec)) => ack(pubrec.pkid, AckKind::PubRec),
        Event::Incoming(Packet::PubComp(pubcomp)) => ack(pubcomp.pkid, AckKind::PubComp),
        Event::Outgoing(Outgoing::Disconnect) => ClientEvent::DisconnectWritten,
        _ => ClientEvent::Other,
    }
}

fn from_v5(event: rumqttc::v5::Event) -> ClientEvent {
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubCompReason, PubRecReason};
    match event {
        Event::Incoming(Packet::ConnAck(_)) => ClientEvent::Connected,
        Event::Outgoing(Outgoing::Publish(pkid)) => ClientEvent::PublishWritten(pkid),
        Event::Incoming(Packet::PubAck(puback)) => ClientEvent::Ack {
            pkid: puback.pkid,
            kind: AckKind::PubAck,
            accepted: matches!(puback.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers),
        },
        Event::Incoming(Packet::PubRec(pubrec)) => ClientEvent::Ack {
            pkid: pubrec.pkid,
            kind: AckKind::PubRec,
            accepted: matches!(pubrec.reason, PubRecReason::Success | PubRecReason::NoMatchingSubscribers),
        },
        Event::Incoming(Packet::PubComp(pubcomp)) => ClientEvent::Ack {
            pkid: pubcomp.pkid,
            kind: AckKind::PubComp,
            accepted: pubcomp.reason == PubCompReason::Success,
        },
        Event::Outgoing(Outgoing::Disconnect) => ClientEvent::DisconnectWritten,
        _ => ClientEvent::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rustls_errors_inside_io_errors() {
        let certificate = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, certificate);
        assert!(ConnectionFailure::new(rumqttc::ConnectionError::Io(io)).tls_rejected);
        let tls = rumqttc::TlsError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        ));
        assert!(ConnectionFailure::new(rumqttc::v5::ConnectionError::Tls(tls)).tls_rejected);
        // A TLS alert after the handshake, as the v5 client reports it.
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        );
        let read = rumqttc::v5::StateError::Deserialization(rumqttc::v5::mqttbytes::Error::Io(alert));
        assert!(ConnectionFailure::new(rumqttc::v5::ConnectionError::MqttState(read)).tls_rejected);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!ConnectionFailure::new(rumqttc::ConnectionError::Io(refused)).tls_rejected);
    }

    #[test]
    fn v5_refusals_are_not_accepted() {
        use rumqttc::v5::mqttbytes::v5::{Packet, PubAck, PubAckReason};
        let puback = |reason| {
            from_v5(rumqttc::v5::Event::Incoming(Packet::PubAck(PubAck {
                pkid: 7,
                reason,
                properties: None,
            })))
        };
        let ack = |accepted| ClientEvent::Ack { pkid: 7, kind: AckKind::PubAck, accepted };
        assert_eq!(puback(PubAckReason::Success), ack(true));
        assert_eq!(puback(PubAckReason::NoMatchingSubscribers), ack(true));
        assert_eq!(puback(PubAckReason::QuotaExceeded), ack(false));
    }

    #[test]
    fn reports_unreadable_tls_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let options = TlsOptions { ca_file: Some(empty.clone()), client_auth: None };
        let error = format!("{:#}", options.client_config().expect_err("no certificate"));
        assert!(
            error.contains("the CA file") && error.contains("empty.pem holds no PEM certificate"),
            "{error}"
        );
        let missing = TlsOptions { ca_file: Some(dir.path().join("missing.pem")), client_auth: None };
        let error = format!("{:#}", missing.client_config().expect_err("no file"));
        assert!(error.contains("missing.pem"), "{error}");
    }
}
