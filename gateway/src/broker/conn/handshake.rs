//! From an accepted socket to a running connection: the CONNECT, Outpost's policy on it,
//! registration (the connection limit, takeover), the session's restore, the CONNACK.
//!
//! # Invariants
//! - A refused client gets the protocol's refusal (a CONNACK code; 3.1.1 without a code for
//!   it: the connection is closed) and holds nothing: no registration, no session.
//! - A connection that takes over another proceeds only once the other finished (or the
//!   takeover's wait passed), so the session it restores holds everything the other handed
//!   back.

use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill, Login, Packet,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::deliver_out::Outbound;
use super::io::{Io, Stream};
use super::publish_in::{self, Inbound};
use super::{Accepted, Client, Connection, End, events, rate};
use crate::broker::Shared;
use crate::broker::access::Refusal;
use crate::broker::live::{Full, Registration};
use crate::metrics::Metrics;
use crate::mqtt::topic::{NameError, invalid_topic};
use crate::mqtt::wire;

/// Headroom over `broker.max_payload` for the topic and properties of one packet.
const HEADER_ROOM: usize = 4096;

/// Runs the handshake. `None`: the connection ended in it (refused, gone, shut down).
pub(super) async fn connect(
    stream: Stream,
    accepted: Accepted,
    shared: Arc<Shared>,
    cancel: &CancellationToken,
) -> Option<Connection> {
    let Accepted { peer, deadline, identity } = accepted;
    let sockname = match &stream {
        Stream::Plain(tcp) => tcp.local_addr().ok(),
        Stream::Tls(tls) => tls.get_ref().0.local_addr().ok(),
    };
    let mut io = Io::new(stream, peer);
    let max = usize::try_from(shared.cfg.max_payload.as_u64()).unwrap_or(usize::MAX) + HEADER_ROOM;
    let Packet::Connect(connect, props, will, will_props, login) =
        read_connect_in_time(&mut io, deadline, cancel, max).await?
    else {
        debug!(message = "first packet is not CONNECT; closing", %peer);
        return None;
    };
    let username = admit(&mut io, &shared, &connect, login.as_ref(), will.as_ref(), identity).await?;
    let terms = Terms::of(&connect, props.as_ref(), io.v5());
    let client_id = if terms.assigned {
        format!("outpost-{:016x}", rand::random::<u64>())
    } else {
        connect.client_id.clone()
    };
    let registration = register(&mut io, &shared, &client_id).await?;
    let id: Arc<str> = Arc::from(client_id);
    let permissions = || shared.access.permissions(username.clone(), Arc::clone(&id));
    let (inbound_permissions, outbound_permissions) = (permissions(), permissions());
    let attached =
        shared.local.attach(&id, registration.serial(), terms.clean_start, !terms.clean, terms.expiry);
    // MQTT 5: a keepalive above `broker.max_keepalive` (or none) is replaced by it, and the
    // CONNACK says so (server keep alive); the client must use it.
    let server_keep_alive = shared
        .cfg
        .max_keepalive
        .map(std::num::NonZeroU16::get)
        .filter(|max| io.v5() && (connect.keep_alive == 0 || connect.keep_alive > *max));
    let keep_alive = server_keep_alive.unwrap_or(connect.keep_alive);
    io.write(connack(&terms, &id, attached.present, max, io.v5(), server_keep_alive));
    let keepalive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let rate = rate::RateLimit::new(
        shared.cfg.max_publish_rate.map(|r| u64::from(r.get())),
        shared.cfg.max_publish_bytes_rate.map(|r| r.as_u64()),
        Instant::now(),
    );
    let io_v5 = io.v5();
    let mut connection = Connection {
        io,
        inbound: Inbound::new(will, will_props, inbound_permissions),
        outbound: Outbound::new(
            attached,
            outbound_permissions,
            props.as_ref().and_then(|p| p.receive_maximum),
            props.as_ref().and_then(|p| p.max_packet_size),
            props.as_ref().and_then(|p| p.topic_alias_max),
        ),
        client: Client {
            shared,
            id,
            peer,
            peerhost: peer.ip().to_canonical().to_string().into(),
            registration,
            about: events::About {
                // The name the ACL knows the client by; else the one it sent, as EMQX shows it.
                username: username.clone().or_else(|| {
                    login.as_ref().filter(|l| !l.username.is_empty()).map(|l| Arc::from(l.username.as_str()))
                }),
                sockname,
                proto_ver: if io_v5 { 5 } else { 4 },
                connected_at: crate::event::now_ms(),
            },
        },
        max,
        keepalive,
        rate,
        expiry_zero: io_v5 && terms.expiry == Some(Duration::ZERO),
    };
    if connection.io.flush().await.is_err() {
        connection.close(End::Eof).await;
        return None;
    }
    Metrics::add(&connection.client.shared.metrics.counters().sensor_connects, 1);
    let asked = events::Asked {
        keepalive: keep_alive,
        clean_start: terms.clean_start,
        expiry_interval: props.as_ref().and_then(|p| p.session_expiry_interval).unwrap_or(0),
        receive_maximum: props.as_ref().and_then(|p| p.receive_maximum),
    };
    events::connected(&connection.client, &asked);
    debug!(message = "sensor connected", client_id = %connection.client.id, %peer, version = ?connection.io.version(), clean = terms.clean);
    Some(connection)
}

/// Applies the CONNECT policy: the username the ACL knows the client by (`Some(None)`:
/// anonymous); `None`: refused (answered, counted, logged). `identity`: the name a verified
/// client certificate gave; it is the username, and no password is checked (mosquitto's
/// `use_identity_as_username`).
async fn admit(
    io: &mut Io,
    shared: &Shared,
    connect: &Connect,
    login: Option<&Login>,
    will: Option<&LastWill>,
    identity: Option<Arc<str>>,
) -> Option<Option<Arc<str>>> {
    let verdict = match (policy(shared, connect, will, io.v5()), identity) {
        (Verdict::Accept, Some(name)) => Verdict::User(name),
        // Under the same bound as reading the CONNECT: a flood of logins with expensive hashes
        // waits for the password checks' permits, and none waits longer than this.
        (Verdict::Accept, None) => tokio::time::timeout(shared.cfg.connection_timeout, credentials(shared, login))
            .await
            .unwrap_or_else(|_| {
                // 3.1.1 has no "busy"; its "server unavailable" is the closest code.
                let code =
                    if io.v5() { ConnectReturnCode::ServerBusy } else { ConnectReturnCode::ServiceUnavailable };
                Verdict::Refuse(
                    code,
                    "password checks backed up past broker.connection_timeout (a CONNECT flood, or a password file with many PBKDF2 iterations on a slow device); the client may retry",
                )
            }),
        (refused, _) => refused,
    };
    match verdict {
        Verdict::Accept => Some(None),
        Verdict::User(username) => Some(Some(username)),
        Verdict::Refuse(code, why) => {
            let username = login.map(|l| l.username.as_str()).filter(|u| !u.is_empty());
            events::refused(shared, io.peer(), io.v5(), &connect.client_id, username, code);
            refuse(io, shared, code, why).await;
            None
        }
        Verdict::Close(why) => {
            debug!(message = "CONNECT with an invalid will topic; closing", peer = %io.peer(), reason = why);
            Metrics::add(&shared.metrics.counters().protocol_errors, 1);
            None
        }
    }
}

/// The credentials part of the policy: `broker.allow_anonymous`, the password check.
async fn credentials(shared: &Shared, login: Option<&Login>) -> Verdict {
    let login = login.map(|l| (l.username.as_str(), l.password.as_str()));
    let counters = shared.metrics.counters();
    match shared.access.authenticate(login).await {
        Ok(None) => Verdict::Accept,
        Ok(Some(username)) => Verdict::User(username),
        Err(Refusal::BadCredentials) => {
            Metrics::add(&counters.auth_failed, 1);
            // Mosquitto says "not authorized" (5 / 0x87); Outpost names the cause, so an
            // operator looking at a sensor's log knows what to fix.
            Verdict::Refuse(
                ConnectReturnCode::BadUserNamePassword,
                "bad username or password: check the sensor's credentials, or add the user with `outpost passwd FILE USER` and send SIGHUP",
            )
        }
        Err(Refusal::Anonymous) => {
            Metrics::add(&counters.auth_anonymous_refused, 1);
            Verdict::Refuse(
                ConnectReturnCode::NotAuthorized,
                "no username and broker.allow_anonymous is false: give the sensor credentials, or set broker.allow_anonymous = true",
            )
        }
    }
}

/// Registers the connection as `client_id`'s live one, once the connection it takes over (if
/// any) finished; `None`: refused at `broker.max_connections`.
async fn register(io: &mut Io, shared: &Shared, client_id: &str) -> Option<Registration> {
    let (registration, previous) = match shared.live.register(client_id, io.peer().ip()) {
        Ok(registered) => registered,
        Err(full) => {
            let (code_v5, why) = match full {
                Full::Broker => (ConnectReturnCode::ServerBusy, "broker.max_connections reached"),
                Full::Address => {
                    Metrics::add(&shared.metrics.counters().sensor_refused_per_address, 1);
                    (
                        ConnectReturnCode::QuotaExceeded,
                        "broker.max_connections_per_address reached for this address: find what on that host opens so many connections, or raise the limit",
                    )
                }
            };
            // 3.1.1 has no "busy"; its "server unavailable" is the closest code.
            let code = if io.v5() { code_v5 } else { ConnectReturnCode::ServiceUnavailable };
            events::refused(shared, io.peer(), io.v5(), client_id, None, code);
            refuse(io, shared, code, why).await;
            return None;
        }
    };
    if let Some(previous) = previous {
        previous.take_over(client_id, &shared.metrics).await;
    }
    Some(registration)
}

/// The CONNECT by `deadline` (`broker.connection_timeout` after the accept), unless the
/// gateway stops first.
async fn read_connect_in_time(
    io: &mut Io,
    deadline: Instant,
    cancel: &CancellationToken,
    max: usize,
) -> Option<Packet> {
    let peer = io.peer();
    let handshake = tokio::time::timeout_at(deadline, read_connect(io, max));
    let connect = tokio::select! {
        _ = cancel.cancelled() => return None,
        r = handshake => r,
    };
    match connect {
        Ok(Ok(packet)) => Some(packet),
        Ok(Err(end)) => {
            debug!(message = "connection closed before CONNECT", %peer, reason = ?end);
            None
        }
        Err(_) => {
            debug!(message = "no CONNECT within broker.connection_timeout; closing", %peer);
            None
        }
    }
}

/// Reads the CONNECT: picks the codec from its protocol level.
async fn read_connect(io: &mut Io, max: usize) -> Result<Packet, End> {
    let version = loop {
        match wire::connect_version(&io.inbuf) {
            Ok(Some(v)) => break v,
            Ok(None) => io.read_more().await?,
            Err(level) => {
                if level > 0 {
                    // 3.1.1's "unacceptable protocol version": understood by 3.1 clients too.
                    io.outbuf.extend_from_slice(&[0x20, 2, 0, 1]);
                    io.flush().await?;
                }
                return Err(End::Protocol(format!(
                    "not an MQTT 3.1.1 or 5 CONNECT (protocol level {level})"
                )));
            }
        }
    };
    io.set_version(version);
    loop {
        match io.decode(max) {
            Ok(packet) => return Ok(packet),
            Err(protocol::Error::InsufficientBytes(_)) => io.read_more().await?,
            Err(protocol::Error::PayloadSizeLimitExceeded(n)) => return Err(End::Oversize(n)),
            Err(e) => return Err(End::Protocol(format!("malformed CONNECT: {e:?}"))),
        }
    }
}

/// What Outpost's policy says to a CONNECT.
enum Verdict {
    /// Anonymous.
    Accept,
    /// Its username proved by its password.
    User(Arc<str>),
    /// A CONNACK with this code, then close.
    Refuse(ConnectReturnCode, &'static str),
    /// Close without a CONNACK: 3.1.1 has no code for it.
    Close(&'static str),
}

/// The CONNECT policy but credentials: the will's topic, the client id.
fn policy(shared: &Shared, connect: &Connect, will: Option<&LastWill>, v5: bool) -> Verdict {
    let bad_will = will.and_then(|w| match std::str::from_utf8(&w.topic) {
        Ok(t) => invalid_topic(t, &shared.cfg.topic_policy()).map(NameError::as_str),
        Err(_) => Some("not UTF-8"),
    });
    if let Some(why) = bad_will {
        if !v5 {
            // 3.1.1 has no code for it: the spec says close the connection.
            return Verdict::Close(why);
        }
        Verdict::Refuse(ConnectReturnCode::TopicNameInvalid, "invalid will topic")
    } else if connect.client_id.is_empty() && !connect.clean_session && !v5 {
        Verdict::Refuse(ConnectReturnCode::ClientIdentifierNotValid, "an empty client id needs clean session")
    } else {
        Verdict::Accept
    }
}

async fn refuse(io: &mut Io, shared: &Shared, code: ConnectReturnCode, why: &str) {
    Metrics::add(&shared.metrics.counters().sensor_refused, 1);
    // Each kind its own throttle: a sensor with a stale password must not hide the others.
    let kind = match code {
        ConnectReturnCode::BadUserNamePassword => "refused credentials",
        ConnectReturnCode::NotAuthorized => "refused anonymous",
        _ => "refused",
    };
    if let Some(folded) = shared.logs.ready(kind) {
        info!(message = "sensor connection refused", reason = why, peer = %io.peer(), similar_since_last_log = folded);
    }
    io.write(Packet::ConnAck(ConnAck { session_present: false, code }, None));
    let _ = tokio::time::timeout(Duration::from_secs(1), io.flush()).await;
}

/// The session a CONNECT asks for.
struct Terms {
    /// The client sent no id: Outpost assigns one.
    assigned: bool,
    /// The session ends with the connection.
    clean: bool,
    /// Whatever session the id had is discarded first.
    clean_start: bool,
    /// How long the session outlives the connection (`None`: until evicted).
    expiry: Option<Duration>,
}

impl Terms {
    fn of(connect: &Connect, props: Option<&ConnectProperties>, v5: bool) -> Terms {
        let assigned = connect.client_id.is_empty();
        // A session outlives its connection only when asked to: 3.1.1 clean session = false;
        // MQTT 5 a session expiry above 0 (absent means 0), whatever clean start says (clean
        // start only discards what was there before). An id Outpost assigned cannot be resumed
        // by anyone, so its session would only leak.
        let expiry = props.and_then(|p| p.session_expiry_interval).unwrap_or(0);
        Terms {
            assigned,
            clean: assigned || if v5 { expiry == 0 } else { connect.clean_session },
            clean_start: connect.clean_session || assigned,
            // MQTT 5: 0xFFFFFFFF means the session never expires.
            expiry: if v5 && expiry != u32::MAX {
                Some(Duration::from_secs(u64::from(expiry)))
            } else {
                None
            },
        }
    }
}

/// The CONNACK: what Outpost offers an MQTT 5 client is in its properties.
fn connack(
    terms: &Terms,
    id: &str,
    session_present: bool,
    max: usize,
    v5: bool,
    server_keep_alive: Option<u16>,
) -> Packet {
    // No Maximum QoS: its absence means QoS 2 (MQTT 5, 3.2.2.3.4 allows only 0 or 1 in it).
    let props = v5.then(|| ConnAckProperties {
        receive_max: Some(publish_in::RECEIVE_MAXIMUM),
        retain_available: Some(1),
        max_packet_size: u32::try_from(max).ok(),
        assigned_client_identifier: terms.assigned.then(|| id.to_owned()),
        topic_alias_max: Some(0),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(1),
        server_keep_alive,
        ..ConnAckProperties::default()
    });
    Packet::ConnAck(ConnAck { session_present, code: ConnectReturnCode::Success }, props)
}
