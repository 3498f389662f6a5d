//! Conformance harness: one MQTT scenario, two brokers, observations compared with `assert_eq!`.
//!
//! The reference is Debian's mosquitto; the broker under test is Outpost's embedded broker (the
//! `outpost` binary). A [`Target`] is either one, started from the same [`BrokerSetup`] translated
//! into each one's own configuration. A scenario talks to a target's [`Addrs`] with real MQTT
//! clients over TCP ([`Client4`] and [`Client5`] wrap rumqttc 3.1.1 and 5 clients, [`RawV5`]
//! writes MQTT 5 packets by hand where rumqttc refuses to, and [`RawClient`] sends any packet
//! bytes, 3.1.1 or 5, for clients that misbehave on purpose) and returns a plain value.
//!
//! # Invariants
//! - Nothing a broker does makes a helper panic: a refused or dropped connection, a missing
//!   CONNACK, SUBACK or PUBACK is returned as a value ([`ConnectOutcome`], [`PublishOutcome`],
//!   [`SubscribeFailure`]), so a broker that misbehaves shows up as a difference between two
//!   observations, not as a panic halfway through a scenario. Harness failures (a port that cannot
//!   be bound, a broker that does not start) are errors.
//! - Every wait is on an MQTT event (a packet, or the connection closing) and bounded by a
//!   timeout; nothing sleeps.
//! - A rumqttc event loop is never polled after its connection failed: polling again would
//!   reconnect and hide the failure from the observation.
//! - A target owns its process and its temporary directory; dropping it kills the process.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{PublishProperties, SubscribeProperties};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use rumqttc::{SubscribeReasonCode, v5};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::gateway::{GatewayProcess, GatewaySpec, READY_MESSAGE, START_TIMEOUT, message_starts_with};
use crate::mqtt::unique_client_id;
use crate::raw;
use crate::upstream::Mosquitto;
pub use crate::upstream::MosquittoConfig;

/// The largest packet both brokers accept: mosquitto's `max_packet_size` and Outpost's
/// `broker.max_payload` ("1KiB"). Every scenario but the over-limit one stays far below it.
pub const MAX_PACKET_BYTES: usize = 1024;

/// How long a client waits for its CONNACK.
pub const CONNACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for a PUBACK or SUBACK, or a recorder for a message.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for the broker to close its connection (after a DISCONNECT, a
/// takeover, an over-limit packet).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What both targets are configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSetup {
    /// `(username, password)` pairs. Empty: anonymous clients are allowed. Otherwise mosquitto
    /// gets a password file (and refuses anonymous clients) and Outpost a `[broker.users]` table
    /// (with `allow_plaintext_passwords`), or with [`BrokerSetup::password_file`] the same
    /// password file.
    pub users: Vec<(String, String)>,
    /// Outpost reads the users from a password file made by Debian's `mosquitto_passwd`, like
    /// mosquitto, instead of `[broker.users]`.
    pub password_file: bool,
    /// An ACL file's text, given to both as `acl_file`.
    pub acl: Option<String>,
    /// `allow_anonymous` for both; `None`: each one's default for the rest of the setup
    /// (mosquitto's harness: true without users, false with them; Outpost's likewise).
    pub allow_anonymous: Option<bool>,
    /// Outpost's `broker.max_connections`; mosquitto is left unlimited (it would only close the
    /// socket of a client over the limit, with no CONNACK to compare).
    pub max_connections: usize,
    /// Mosquitto keeps its state in a persistence file (`persistence true`, saved on a
    /// SIGTERM), so [`Target::restart`] compares what each broker keeps. Outpost always keeps
    /// its retained messages in its buffer file.
    pub persistence: bool,
    /// Queued messages per client: Outpost's `broker.max_queued_messages`, mosquitto's
    /// `max_queued_messages`; `None`: each one's default (1,000 in both).
    pub max_queued: Option<usize>,
}

impl BrokerSetup {
    /// Anonymous clients, 1000 connections.
    pub fn anonymous() -> BrokerSetup {
        BrokerSetup {
            users: Vec::new(),
            password_file: false,
            acl: None,
            allow_anonymous: None,
            max_connections: 1000,
            persistence: false,
            max_queued: None,
        }
    }

    /// Both queue at most `max` messages per client (see [`BrokerSetup::max_queued`]).
    pub fn with_max_queued(mut self, max: usize) -> BrokerSetup {
        self.max_queued = Some(max);
        self
    }

    /// Mosquitto with `persistence true` (see [`BrokerSetup::persistence`]).
    pub fn with_persistence(mut self) -> BrokerSetup {
        self.persistence = true;
        self
    }

    /// Outpost gets the users in a `mosquitto_passwd` file too (see [`BrokerSetup::password_file`]).
    pub fn with_password_file(mut self) -> BrokerSetup {
        self.password_file = true;
        self
    }

    /// Both get this ACL file.
    pub fn with_acl(mut self, acl: &str) -> BrokerSetup {
        self.acl = Some(acl.to_owned());
        self
    }

    pub fn with_allow_anonymous(mut self, allow: bool) -> BrokerSetup {
        self.allow_anonymous = Some(allow);
        self
    }

    /// Adds a user; anonymous clients are then refused by mosquitto.
    pub fn with_user(mut self, username: &str, password: &str) -> BrokerSetup {
        self.users.push((username.to_owned(), password.to_owned()));
        self
    }

    pub fn with_max_connections(mut self, max_connections: usize) -> BrokerSetup {
        self.max_connections = max_connections;
        self
    }
}

/// Where a target listens. Mosquitto serves MQTT 3.1.1 and 5 on one port; Outpost has a
/// listener per protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    /// MQTT 3.1.1.
    pub v4: SocketAddr,
    /// MQTT 5.
    pub v5: SocketAddr,
}

/// A broker the scenarios run against. Dropping it kills it.
pub struct Target {
    name: &'static str,
    addrs: Addrs,
    running: Running,
    /// The ACL file (and Outpost's password file), removed after the broker is killed.
    _files: TempDir,
}

/// Writes the setup's ACL file (if any) into `dir`; its path.
fn write_acl(setup: &BrokerSetup, dir: &std::path::Path) -> anyhow::Result<Option<std::path::PathBuf>> {
    let Some(acl) = &setup.acl else { return Ok(None) };
    let path = dir.join("acl");
    std::fs::write(&path, acl).context("cannot write the ACL file")?;
    Ok(Some(path))
}

/// A directory mosquitto can read after it dropped root's privileges to its own user.
fn files_dir() -> anyhow::Result<TempDir> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .context("cannot open the directory to the broker's user")?;
    Ok(dir)
}

enum Running {
    Mosquitto(Mosquitto),
    Outpost { gateway: GatewayProcess, _data_dir: TempDir },
}

impl Target {
    /// Starts Debian's mosquitto on a free port with a config generated from `setup`, and returns
    /// once it accepts connections.
    pub async fn mosquitto(setup: &BrokerSetup) -> anyhow::Result<Target> {
        let files = files_dir()?;
        let mut extra = format!("max_packet_size {MAX_PACKET_BYTES}\n");
        if let Some(acl) = write_acl(setup, files.path())? {
            std::fs::set_permissions(
                &acl,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644),
            )
            .context("cannot open the ACL file to the broker's user")?;
            extra.push_str(&format!("acl_file {}\n", acl.display()));
        }
        if let Some(allow) = setup.allow_anonymous {
            // The last `allow_anonymous` line wins over the harness's own.
            extra.push_str(&format!("allow_anonymous {allow}\n"));
        }
        let config = MosquittoConfig {
            persistence: setup.persistence,
            max_queued_messages: setup.max_queued.map(|max| max as u64),
            users: setup.users.clone(),
            // Mosquitto writes its persistence file as its own user.
            directory_for_any_user: setup.persistence,
            extra,
        };
        let broker = Mosquitto::start_configured(&config).await?;
        let addr = broker.addr();
        Ok(Target {
            name: "mosquitto",
            addrs: Addrs { v4: addr, v5: addr },
            running: Running::Mosquitto(broker),
            _files: files,
        })
    }

    /// Starts the `outpost` binary with a 3.1.1 and a 5 listener on free ports, no upstream, and
    /// the limits and users of `setup`; returns once both listeners accept connections.
    pub async fn outpost(setup: &BrokerSetup) -> anyhow::Result<Target> {
        let addrs = Addrs { v4: crate::free_addr(), v5: crate::free_addr() };
        let mut config = format!(
            "[broker]\n\
             listen = \"{}\"\n\
             listen_v5 = \"{}\"\n\
             max_payload = \"1KiB\"\n\
             max_connections = {}\n",
            addrs.v4, addrs.v5, setup.max_connections
        );
        if let Some(max) = setup.max_queued {
            config.push_str(&format!("max_queued_messages = {max}\n"));
        }
        let files = files_dir()?;
        if let Some(acl) = write_acl(setup, files.path())? {
            config.push_str(&format!("acl_file = {}\n", toml_string(&acl.display().to_string())));
        }
        if let Some(allow) = setup.allow_anonymous {
            config.push_str(&format!("allow_anonymous = {allow}\n"));
        }
        if setup.password_file && !setup.users.is_empty() {
            let path = files.path().join("passwords");
            outpost_sim::harness::mosquitto::write_password_file(&path, &setup.users)?;
            config.push_str(&format!("password_file = {}\n", toml_string(&path.display().to_string())));
        } else if !setup.users.is_empty() {
            config.push_str("allow_plaintext_passwords = true\n[broker.users]\n");
            for (username, password) in &setup.users {
                config.push_str(&format!("{} = {}\n", toml_string(username), toml_string(password)));
            }
        }
        let data_dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let mut spec = GatewaySpec::new(data_dir.path()).config_toml(config);
        spec.listen = addrs.v4;
        let gateway = start_outpost(spec, addrs).await?;
        Ok(Target {
            name: "outpost",
            addrs,
            running: Running::Outpost { gateway, _data_dir: data_dir },
            _files: files,
        })
    }

    /// Stops the broker — gracefully (SIGTERM, mosquitto then saves its persistence file) or
    /// with SIGKILL — and starts it again on the same addresses with the same data (Outpost's
    /// data dir, mosquitto's persistence file); returns once it accepts connections.
    pub async fn restart(&mut self, how: Restart) -> anyhow::Result<()> {
        self.restart_at(how, std::time::UNIX_EPOCH).await
    }

    /// [`Target::restart`], starting again only once the wall clock reads `at` or later: for
    /// what must pass while the broker is down (a session's expiry).
    pub async fn restart_at(&mut self, how: Restart, at: std::time::SystemTime) -> anyhow::Result<()> {
        let addrs = self.addrs;
        match &mut self.running {
            Running::Mosquitto(broker) => {
                match how {
                    Restart::Graceful => drop(broker.stop().await?),
                    Restart::Kill => drop(broker.kill()?),
                }
                wall_clock_reaches(at).await;
                broker.start_again().await
            }
            Running::Outpost { gateway, .. } => {
                match how {
                    Restart::Graceful => drop(gateway.terminate().await?),
                    Restart::Kill => drop(gateway.kill()?),
                }
                wall_clock_reaches(at).await;
                *gateway = start_outpost(gateway.spec().clone(), addrs).await?;
                Ok(())
            }
        }
    }

    /// `mosquitto` or `outpost`, for messages.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// The broker's recent output, for failure messages.
    pub fn tail(&self) -> String {
        match &self.running {
            Running::Mosquitto(broker) => broker.tail(),
            Running::Outpost { gateway, .. } => gateway.tail(),
        }
    }
}

/// How [`Target::restart`] stops a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// SIGTERM: a clean stop.
    Graceful,
    /// SIGKILL: a crash, nothing flushed.
    Kill,
}

/// Returns once the wall clock reads `at` or later (the condition a broker that was down must
/// find passed; there is nothing else to observe while it is down).
async fn wall_clock_reaches(at: std::time::SystemTime) {
    while let Ok(left) = at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left.min(Duration::from_millis(100))).await;
    }
}

/// Starts the `outpost` binary and waits until both of its listeners accept connections.
async fn start_outpost(spec: GatewaySpec, addrs: Addrs) -> anyhow::Result<GatewayProcess> {
    let gateway = spec.start().await?;
    // The readiness line is written per listener; wait for the one naming the v5 address too.
    let v5 = addrs.v5.to_string();
    gateway
        .wait_for_log("the MQTT 5 listener's readiness line", START_TIMEOUT, |log| {
            message_starts_with(log, READY_MESSAGE) && log.to_string().contains(&v5)
        })
        .await?;
    Ok(gateway)
}

/// A TOML basic string holding `text`.
fn toml_string(text: &str) -> String {
    // JSON string escapes are valid TOML basic-string escapes.
    Value::String(text.to_owned()).to_string()
}

/// A CONNACK return code (3.1.1) or reason code (5), shown in hex as the specs list them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Code(pub u8);

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x}", self.0)
    }
}

/// What came back for a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConnectOutcome {
    /// A CONNACK with return/reason code 0.
    Accepted,
    /// A CONNACK with this code.
    Refused(Code),
    /// The connection closed (or failed) without a CONNACK.
    Closed,
    /// Nothing within [`CONNACK_TIMEOUT`].
    NoConnack,
}

/// What came back for a PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PublishOutcome {
    /// QoS 1: the PUBACK arrived.
    Acked,
    /// QoS 0: the packet was written (there is no acknowledgement to wait for).
    Sent,
    /// The connection closed before the acknowledgement.
    Closed,
    /// No PUBACK within [`ACK_TIMEOUT`].
    NoAck,
    /// MQTT 5: a PUBACK with this failure reason code (e.g. 0x87, not authorized).
    Refused(Code),
}

/// Why a [`Recorder`] has no subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeFailure {
    /// The connection was not accepted.
    Connect(ConnectOutcome),
    /// The connection closed before the SUBACK.
    ClosedBeforeSuback,
    /// No SUBACK within [`ACK_TIMEOUT`].
    NoSuback,
}

/// A message as a subscriber saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    /// The payload as text (every scenario publishes text).
    pub payload: String,
    pub qos: u8,
    pub retain: bool,
}

impl Received {
    pub fn new(topic: &str, payload: &str, qos: u8, retain: bool) -> Received {
        Received { topic: topic.to_owned(), payload: payload.to_owned(), qos, retain }
    }
}

/// The wire value of a QoS.
pub fn qos_number(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// MQTT 3.1.1 client options as a sensor uses them: clean session, 30 s keepalive.
pub fn options4(addr: SocketAddr, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30)).set_clean_session(true);
    options
}

/// MQTT 5 client options: clean start, 30 s keepalive.
pub fn options5(addr: SocketAddr, client_id: &str) -> v5::MqttOptions {
    let mut options = v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30)).set_clean_start(true);
    options
}

/// Maps a rumqttc 3.1.1 connection failure onto what the broker did.
fn connect_failure4(error: &ConnectionError) -> ConnectOutcome {
    match error {
        ConnectionError::ConnectionRefused(code) => ConnectOutcome::Refused(Code(*code as u8)),
        ConnectionError::NetworkTimeout => ConnectOutcome::NoConnack,
        _ => ConnectOutcome::Closed,
    }
}

/// An MQTT 3.1.1 client driven inline: each call polls the event loop until its answer arrives.
pub struct Client4 {
    /// Kept alive: dropping it ends the event loop with `RequestsDone`.
    client: AsyncClient,
    eventloop: EventLoop,
    /// Set once the connection failed; the event loop is not polled again.
    failed: bool,
}

impl Client4 {
    /// Connects and waits for the CONNACK.
    pub async fn connect(options: MqttOptions) -> Result<Client4, ConnectOutcome> {
        let client_id = options.client_id();
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        // The first poll connects: it yields the CONNACK or the reason there is none.
        match timeout(CONNACK_TIMEOUT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok(Client4 { client, eventloop, failed: false }),
            Ok(Ok(event)) => {
                eprintln!("client {client_id}: expected a CONNACK, got {event:?}");
                Err(ConnectOutcome::Closed)
            }
            Ok(Err(error)) => {
                eprintln!("client {client_id}: no connection: {error}");
                Err(connect_failure4(&error))
            }
            Err(_) => Err(ConnectOutcome::NoConnack),
        }
    }

    /// Publishes and waits for the PUBACK (QoS 1), the PUBCOMP (QoS 2) or until the packet is
    /// written (QoS 0).
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) -> PublishOutcome {
        if self.failed || self.client.try_publish(topic, qos, retain, payload.to_vec()).is_err() {
            return PublishOutcome::Closed;
        }
        let answered = timeout(ACK_TIMEOUT, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => {
                        return PublishOutcome::Acked;
                    }
                    Ok(Event::Incoming(Packet::PubComp(_))) if qos == QoS::ExactlyOnce => {
                        return PublishOutcome::Acked;
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                        return PublishOutcome::Sent;
                    }
                    Ok(_) => {}
                    Err(_) => return PublishOutcome::Closed,
                }
            }
        })
        .await
        .unwrap_or(PublishOutcome::NoAck);
        self.failed |= answered == PublishOutcome::Closed;
        answered
    }

    /// Waits until the broker closes the connection; `false` if it is still open after `within`.
    pub async fn wait_closed(&mut self, within: Duration) -> bool {
        if self.failed {
            return true;
        }
        let closed = timeout(within, async { while self.eventloop.poll().await.is_ok() {} }).await.is_ok();
        self.failed |= closed;
        closed
    }

    /// Sends DISCONNECT and waits (up to [`CLOSE_TIMEOUT`]) for the broker to close the
    /// connection; returns whether it did.
    pub async fn disconnect(mut self) -> bool {
        if self.failed || self.client.try_disconnect().is_err() {
            return self.failed;
        }
        self.wait_closed(CLOSE_TIMEOUT).await
    }
}

/// The wire value of an MQTT 5 CONNACK reason code (rumqttc keeps its own table private).
pub fn reason_code5(code: v5::mqttbytes::v5::ConnectReturnCode) -> u8 {
    use v5::mqttbytes::v5::ConnectReturnCode as C;
    match code {
        C::Success => 0x00,
        C::RefusedProtocolVersion => 0x01,
        C::BadClientId => 0x02,
        C::ServiceUnavailable => 0x03,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::UnsupportedProtocolVersion => 0x84,
        C::ClientIdentifierNotValid => 0x85,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerUnavailable => 0x88,
        C::ServerBusy => 0x89,
        C::Banned => 0x8a,
        C::BadAuthenticationMethod => 0x8c,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9a,
        C::QoSNotSupported => 0x9b,
        C::UseAnotherServer => 0x9c,
        C::ServerMoved => 0x9d,
        C::ConnectionRateExceeded => 0x9f,
    }
}

/// An MQTT 5 client driven inline, like [`Client4`].
pub struct Client5 {
    /// Kept alive: dropping it ends the event loop with `RequestsDone`.
    client: v5::AsyncClient,
    eventloop: v5::EventLoop,
    failed: bool,
    /// Messages received while waiting for something else, for [`Client5::receive`].
    received: Vec<Received5>,
    /// The CONNACK's session present flag.
    session_present: bool,
}

/// A message as an MQTT 5 subscriber saw it, with the properties the scenarios look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received5 {
    pub topic: String,
    pub payload: String,
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub payload_format: Option<u8>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    /// Sorted.
    pub subscription_ids: Vec<usize>,
    /// The message expiry interval that remained, as sent.
    pub message_expiry: Option<u32>,
}

fn received5(publish: &v5::mqttbytes::v5::Publish) -> Received5 {
    let p = publish.properties.clone().unwrap_or_default();
    let mut subscription_ids = p.subscription_identifiers;
    subscription_ids.sort_unstable();
    Received5 {
        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
        payload: String::from_utf8_lossy(&publish.payload).into_owned(),
        qos: match publish.qos {
            QoS5::AtMostOnce => 0,
            QoS5::AtLeastOnce => 1,
            QoS5::ExactlyOnce => 2,
        },
        retain: publish.retain,
        user_properties: p.user_properties,
        content_type: p.content_type,
        payload_format: p.payload_format_indicator,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data.map(|d| d.to_vec()),
        subscription_ids,
        message_expiry: p.message_expiry_interval,
    }
}

impl Client5 {
    /// Connects and waits for the CONNACK.
    pub async fn connect(options: v5::MqttOptions) -> Result<Client5, ConnectOutcome> {
        let client_id = options.client_id();
        let (client, mut eventloop) = v5::AsyncClient::new(options, 16);
        match timeout(CONNACK_TIMEOUT, eventloop.poll()).await {
            Ok(Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::ConnAck(ack)))) => Ok(Client5 {
                client,
                eventloop,
                failed: false,
                received: Vec::new(),
                session_present: ack.session_present,
            }),
            Ok(Ok(event)) => {
                eprintln!("client {client_id}: expected a CONNACK, got {event:?}");
                Err(ConnectOutcome::Closed)
            }
            Ok(Err(v5::ConnectionError::ConnectionRefused(code))) => {
                Err(ConnectOutcome::Refused(Code(reason_code5(code))))
            }
            Ok(Err(v5::ConnectionError::Timeout(_))) | Err(_) => Err(ConnectOutcome::NoConnack),
            Ok(Err(error)) => {
                eprintln!("client {client_id}: no connection: {error}");
                Err(ConnectOutcome::Closed)
            }
        }
    }

    /// Whether the broker's CONNACK said it resumed a session.
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    /// Sends DISCONNECT (reason 0x00, normal disconnection) and waits (up to
    /// [`CLOSE_TIMEOUT`]) for the broker to close the connection; returns whether it did.
    pub async fn disconnect(mut self) -> bool {
        if self.failed || self.client.try_disconnect().is_err() {
            return self.failed;
        }
        let closed =
            timeout(CLOSE_TIMEOUT, async { while self.eventloop.poll().await.is_ok() {} }).await.is_ok();
        self.failed |= closed;
        closed
    }

    /// Publishes and waits for the PUBACK (QoS 1: [`PublishOutcome::Refused`] for a failure
    /// reason code), the PUBCOMP (QoS 2) or until the packet is written (QoS 0).
    pub async fn publish(&mut self, topic: &str, qos: QoS5, retain: bool, payload: &[u8]) -> PublishOutcome {
        self.publish_with(topic, qos, retain, payload, PublishProperties::default()).await
    }

    /// [`Client5::publish`] with MQTT 5 properties. Messages that arrive meanwhile are kept
    /// for [`Client5::receive`].
    pub async fn publish_with(
        &mut self,
        topic: &str,
        qos: QoS5,
        retain: bool,
        payload: &[u8],
        properties: PublishProperties,
    ) -> PublishOutcome {
        use v5::mqttbytes::v5::{Packet as P5, PubAckReason};
        if self.failed
            || self
                .client
                .try_publish_with_properties(topic, qos, retain, payload.to_vec(), properties)
                .is_err()
        {
            return PublishOutcome::Closed;
        }
        let received = &mut self.received;
        let answered = timeout(ACK_TIMEOUT, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(v5::Event::Incoming(P5::PubAck(ack))) if qos == QoS5::AtLeastOnce => {
                        return match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                                PublishOutcome::Acked
                            }
                            PubAckReason::NotAuthorized => PublishOutcome::Refused(Code(0x87)),
                            PubAckReason::TopicNameInvalid => PublishOutcome::Refused(Code(0x90)),
                            PubAckReason::QuotaExceeded => PublishOutcome::Refused(Code(0x97)),
                            _ => PublishOutcome::Refused(Code(0x80)),
                        };
                    }
                    Ok(v5::Event::Incoming(P5::PubComp(_))) if qos == QoS5::ExactlyOnce => {
                        return PublishOutcome::Acked;
                    }
                    Ok(v5::Event::Outgoing(Outgoing::Publish(_))) if qos == QoS5::AtMostOnce => {
                        return PublishOutcome::Sent;
                    }
                    Ok(v5::Event::Incoming(P5::Publish(publish))) => received.push(received5(&publish)),
                    Ok(_) => {}
                    Err(_) => return PublishOutcome::Closed,
                }
            }
        })
        .await
        .unwrap_or(PublishOutcome::NoAck);
        self.failed |= answered == PublishOutcome::Closed;
        answered
    }

    /// Subscribes and waits for the SUBACK: its reason code (the granted QoS, or a failure such
    /// as 0x87), or `None` if the connection closed or nothing came within [`ACK_TIMEOUT`].
    /// Messages that arrive before it are kept for [`Client5::receive`].
    pub async fn subscribe(&mut self, filter: &str, qos: QoS5) -> Option<Code> {
        self.subscribe_with(v5::mqttbytes::v5::Filter::new(filter, qos), None).await
    }

    /// [`Client5::subscribe`] with MQTT 5 subscription options and properties (an identifier).
    pub async fn subscribe_with(
        &mut self,
        filter: v5::mqttbytes::v5::Filter,
        properties: Option<SubscribeProperties>,
    ) -> Option<Code> {
        use v5::mqttbytes::v5::{Packet as P5, SubscribeReasonCode as R};
        let sent = match properties {
            Some(p) => self.client.try_subscribe_many_with_properties([filter], p),
            None => self.client.try_subscribe_many([filter]),
        };
        if self.failed || sent.is_err() {
            return None;
        }
        let received = &mut self.received;
        let answered = timeout(ACK_TIMEOUT, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(v5::Event::Incoming(P5::SubAck(ack))) => {
                        return ack.return_codes.first().map(|code| {
                            Code(match code {
                                R::Success(qos) => match qos {
                                    QoS5::AtMostOnce => 0,
                                    QoS5::AtLeastOnce => 1,
                                    QoS5::ExactlyOnce => 2,
                                },
                                R::NotAuthorized => 0x87,
                                R::TopicFilterInvalid => 0x8f,
                                R::QuotaExceeded => 0x97,
                                _ => 0x80,
                            })
                        });
                    }
                    Ok(v5::Event::Incoming(P5::Publish(publish))) => received.push(received5(&publish)),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
        .await
        .unwrap_or(None);
        self.failed |= answered.is_none();
        answered
    }

    /// The messages received so far (acknowledged by rumqttc, QoS 2 included), and then
    /// more, until `done` holds for all of them, the connection ends or `within` passes.
    pub async fn receive(&mut self, within: Duration, done: impl Fn(&[Received5]) -> bool) -> Vec<Received5> {
        use v5::mqttbytes::v5::Packet as P5;
        let received = &mut self.received;
        let eventloop = &mut self.eventloop;
        let failed = &mut self.failed;
        let _ = timeout(within, async {
            while !*failed && !done(received) {
                match eventloop.poll().await {
                    Ok(v5::Event::Incoming(P5::Publish(publish))) => received.push(received5(&publish)),
                    Ok(_) => {}
                    Err(_) => *failed = true,
                }
            }
        })
        .await;
        std::mem::take(received)
    }

    /// Closes the TCP connection without a DISCONNECT, as a sensor that loses power does.
    pub fn drop_connection(self) {
        // Dropping the event loop drops its socket, which closes the connection.
        drop(self);
    }
}

/// What a [`Recorder`] has seen so far.
#[derive(Debug, Clone, Default)]
struct Seen {
    messages: Vec<Received>,
    /// The connection ended.
    closed: bool,
}

/// An MQTT 3.1.1 subscriber that records every message in a task of its own. It never
/// reconnects: a dropped subscription stays dropped. Dropping the recorder stops the task and
/// closes the connection.
pub struct Recorder {
    granted: Vec<SubscribeReasonCode>,
    seen: watch::Receiver<Seen>,
    _stop: DropGuard,
}

impl Recorder {
    /// Connects, subscribes to `filter` at `qos` and returns once the SUBACK arrived, with
    /// whatever codes it granted (a refusal is a granted code, not an error).
    pub async fn start(addr: SocketAddr, filter: &str, qos: QoS) -> Result<Recorder, SubscribeFailure> {
        Recorder::start_with(options4(addr, &unique_client_id("recorder")), filter, qos).await
    }

    /// [`Recorder::start`] with the client's own options (its client id, credentials).
    pub async fn start_with(
        options: MqttOptions,
        filter: &str,
        qos: QoS,
    ) -> Result<Recorder, SubscribeFailure> {
        let Client4 { client, mut eventloop, .. } =
            Client4::connect(options).await.map_err(SubscribeFailure::Connect)?;
        if client.try_subscribe(filter, qos).is_err() {
            return Err(SubscribeFailure::ClosedBeforeSuback);
        }
        // Messages may come before the SUBACK (nothing forbids it); they are kept.
        let mut early = Vec::new();
        let granted = timeout(ACK_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => return Ok(ack.return_codes),
                    Ok(Event::Incoming(Packet::Publish(publish))) => early.push(received4(&publish)),
                    Ok(_) => {}
                    Err(error) => {
                        eprintln!("recorder for `{filter}`: closed before the SUBACK: {error}");
                        return Err(SubscribeFailure::ClosedBeforeSuback);
                    }
                }
            }
        })
        .await
        .unwrap_or(Err(SubscribeFailure::NoSuback))?;
        let (seen_tx, seen) = watch::channel(Seen { messages: early, closed: false });
        let cancel = CancellationToken::new();
        tokio::spawn(record(client, eventloop, seen_tx, cancel.clone()));
        Ok(Recorder { granted, seen, _stop: cancel.drop_guard() })
    }

    /// The SUBACK's codes.
    pub fn granted(&self) -> &[SubscribeReasonCode] {
        &self.granted
    }

    /// Whether the SUBACK granted every filter (any QoS, no failure).
    pub fn all_granted(&self) -> bool {
        self.granted.iter().all(|code| matches!(code, SubscribeReasonCode::Success(_)))
    }

    /// Every message so far, in arrival order.
    pub fn messages(&self) -> Vec<Received> {
        self.seen.borrow().messages.clone()
    }

    /// Waits until `done` holds for the messages so far, the connection ends or `within`
    /// passes, and returns the messages at that point.
    pub async fn wait_until(
        &mut self,
        within: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let _ = timeout(within, self.seen.wait_for(|seen| seen.closed || done(&seen.messages))).await;
        self.messages()
    }
}

fn received4(publish: &rumqttc::Publish) -> Received {
    Received {
        topic: publish.topic.clone(),
        payload: String::from_utf8_lossy(&publish.payload).into_owned(),
        qos: qos_number(publish.qos),
        retain: publish.retain,
    }
}

/// The recorder's task: polls until cancelled or the connection ends, never reconnecting.
async fn record(
    _client: AsyncClient,
    mut eventloop: EventLoop,
    seen: watch::Sender<Seen>,
    cancel: CancellationToken,
) {
    loop {
        let polled = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                seen.send_modify(|seen| seen.messages.push(received4(&publish)));
            }
            Ok(_) => {}
            Err(_) => {
                seen.send_modify(|seen| seen.closed = true);
                break;
            }
        }
    }
}

/// MQTT control packet types (the high nibble of the first byte).
pub mod packet_type {
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const SUBACK: u8 = 9;
    pub const DISCONNECT: u8 = 14;
}

/// What a raw connection read next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawRead {
    /// A whole packet: its first byte and the rest after the remaining length.
    Packet { first_byte: u8, body: Vec<u8> },
    /// The connection closed (end of file, or reset).
    Closed,
    /// Nothing within the timeout.
    Silent,
}

/// How a broker answered a packet (the first thing it sent back afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Answer {
    /// An MQTT 5 DISCONNECT with this reason code; then whether the broker closed the
    /// connection.
    Disconnect { reason: Code, then_closed: bool },
    /// Another packet, by type (e.g. [`packet_type::PUBACK`]: the broker took the publish).
    Packet { packet_type: u8 },
    /// The connection closed without a packet.
    Closed,
    /// Nothing within the timeout.
    Silent,
}

/// A hand-written MQTT client, 3.1.1 or 5 alike: it sends whatever bytes it is given, for what
/// no client library sends on purpose (a topic with U+0000, a topic alias the broker did not
/// offer, a subscription identifier in a PUBLISH). Dropping it closes the connection.
pub struct RawClient {
    stream: TcpStream,
    /// The CONNACK's body (after the remaining length).
    connack: Vec<u8>,
}

impl RawClient {
    /// Connects, sends `connect` (a whole CONNECT packet, see [`raw`]) and waits for the
    /// CONNACK; `name` labels the client in messages. A CONNACK with a non-zero code is
    /// [`ConnectOutcome::Refused`].
    pub async fn connect(addr: SocketAddr, name: &str, connect: &[u8]) -> Result<RawClient, ConnectOutcome> {
        let stream = match timeout(CONNACK_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                eprintln!("raw client {name}: cannot connect to {addr}: {error}");
                return Err(ConnectOutcome::Closed);
            }
            Err(_) => return Err(ConnectOutcome::NoConnack),
        };
        let mut client = RawClient { stream, connack: Vec::new() };
        if client.send(connect).await.is_err() {
            return Err(ConnectOutcome::Closed);
        }
        match client.read(CONNACK_TIMEOUT).await {
            RawRead::Packet { first_byte, body } if first_byte >> 4 == packet_type::CONNACK => {
                match body.get(1) {
                    Some(0) => {
                        client.connack = body;
                        Ok(client)
                    }
                    Some(&code) => Err(ConnectOutcome::Refused(Code(code))),
                    None => Err(ConnectOutcome::Closed),
                }
            }
            RawRead::Packet { first_byte, .. } => {
                eprintln!("raw client {name}: expected a CONNACK, got packet {first_byte:#04x}");
                Err(ConnectOutcome::Closed)
            }
            RawRead::Closed => Err(ConnectOutcome::Closed),
            RawRead::Silent => Err(ConnectOutcome::NoConnack),
        }
    }

    /// The body of the CONNACK that accepted this client (flags, code and, in MQTT 5, its
    /// properties; see [`raw::connack_properties`]).
    pub fn connack(&self) -> &[u8] {
        &self.connack
    }

    /// Writes `packet` (or several packets back to back) and flushes.
    pub async fn send(&mut self, packet: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(packet).await?;
        self.stream.flush().await
    }

    /// Reads the next packet, waiting up to `within`.
    pub async fn read(&mut self, within: Duration) -> RawRead {
        match timeout(within, raw::read_packet(&mut self.stream)).await {
            Ok(Ok((first_byte, body))) => RawRead::Packet { first_byte, body },
            Ok(Err(_)) => RawRead::Closed,
            Err(_) => RawRead::Silent,
        }
    }

    /// Reads the broker's answer to what was just sent, waiting up to [`ACK_TIMEOUT`]; after a
    /// DISCONNECT, up to [`CLOSE_TIMEOUT`] more for the connection to close.
    pub async fn answer(&mut self) -> Answer {
        match self.read(ACK_TIMEOUT).await {
            RawRead::Packet { first_byte, body } if first_byte >> 4 == packet_type::DISCONNECT => {
                // A DISCONNECT without a body means reason 0x00.
                let reason = Code(body.first().copied().unwrap_or(0));
                let then_closed = self.read(CLOSE_TIMEOUT).await == RawRead::Closed;
                Answer::Disconnect { reason, then_closed }
            }
            RawRead::Packet { first_byte, .. } => Answer::Packet { packet_type: first_byte >> 4 },
            RawRead::Closed => Answer::Closed,
            RawRead::Silent => Answer::Silent,
        }
    }

    /// Splits the connection into halves that a reader task and a writer task can own.
    pub fn into_split(self) -> (tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf) {
        self.stream.into_split()
    }
}

/// Connects a raw client with the CONNECT `connect` and returns what the broker did: a CONNACK
/// code, or the connection closing (or staying silent) without one. The connection is closed
/// afterwards, without a DISCONNECT (a will, if accepted, is then due).
pub async fn raw_connect_outcome(addr: SocketAddr, name: &str, connect: &[u8]) -> ConnectOutcome {
    RawClient::connect(addr, name, connect).await.map_or_else(|outcome| outcome, |_| ConnectOutcome::Accepted)
}

/// A hand-written MQTT 5 client for what rumqttc will not send: a keepalive of 0 (its setter
/// insists on at least 5 s) and a packet over the broker's advertised maximum (its event loop
/// refuses to write one).
pub struct RawV5 {
    client: RawClient,
}

impl RawV5 {
    /// Connects with a clean start, no properties and no credentials, and waits for the
    /// CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        keep_alive_secs: u16,
    ) -> Result<RawV5, ConnectOutcome> {
        let connect = raw::connect_v5(client_id, keep_alive_secs);
        Ok(RawV5 { client: RawClient::connect(addr, client_id, &connect).await? })
    }

    /// Writes a QoS 1 PUBLISH (packet id 1, no properties); `Err` if the write failed.
    pub async fn publish_qos1(&mut self, topic: &str, payload: &[u8]) -> std::io::Result<()> {
        self.client.send(&raw::publish_v5(topic, 1, 1, &[], payload)).await
    }

    /// Reads the next packet, waiting up to `within`.
    pub async fn read(&mut self, within: Duration) -> RawRead {
        self.client.read(within).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_print_in_hex() {
        assert_eq!(format!("{:?}", ConnectOutcome::Refused(Code(0x86))), "Refused(0x86)");
    }
}
