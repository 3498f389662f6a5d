//! Commands from the cloud: the inbound connection (`[[upstream.subscribe]]`).
//!
//! A second upstream connection, apart from the relay's, that only subscribes. Why a second
//! one: the relay's connection is a clean session by design (the buffer is the truth and is
//! resent after every reconnect), so a subscription on it would lose every command the cloud
//! sent while the link was down. This one has a **persistent session** — MQTT 3.1.1 clean
//! session 0, MQTT 5 clean start 0 with `upstream.inbound_session_expiry` — under its own
//! client id (`upstream.inbound_client_id`, default `<client_id>-in`), so the upstream
//! queues QoS 1 commands while it is away and delivers them when it is back. It subscribes on
//! the first connection of each run (the filters may have changed) and whenever the upstream
//! says it kept no session.
//!
//! Each message: its topic is mapped to a local one by the first `[[upstream.subscribe]]`
//! entry whose filter matches it (strip a prefix, put another in front), then handed to
//! [`Commands::deliver`] (topic policy, ACL, retained store, local subscribers, the rules).
//! A QoS 1 message is acknowledged upstream **only after** that returned, so a command is
//! either in the local broker or still in the upstream's session. A refused one (mapping,
//! ACL) is acknowledged too — a persistent session would otherwise redeliver it forever —
//! counted and logged (first time, then at most every 10 minutes with the count folded in).
//!
//! # Invariants
//! - The task stops on the cancellation signal, sending DISCONNECT (the session stays); it
//!   holds a sender of the route stage's input (through [`Commands`]) until then.
//! - Each message is delivered once per connection: PUBACK follows delivery, in order.
//!   Across connections, a command whose PUBACK was lost with the link comes again (DUP):
//!   at least once, as for events going up.
//! - The log follows the link's state: one line when it is lost or cannot be reached, a
//!   reminder every 10 minutes, one when it is back. Attempts are at debug level.
//! - How a URL becomes a connected stream (TCP, or TLS for `mqtts://`) is the outbound link's
//!   [`transport::open`]; the endpoints are tried in order.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::Backoff;
use super::transport::{self, Stream};
use crate::broker::{Commands, Delivery};
use crate::config::{SubscribeConfig, UpstreamConfig, UpstreamUrl};
use crate::event::escape_topic;
use crate::metrics::Metrics;
use crate::mqtt::upstream::{
    FromUpstream, LinkParams, encode_disconnect, encode_inbound_connect, encode_pingreq, encode_puback,
    encode_subscribe, parse_connack_session, parse_from_upstream,
};
use crate::telemetry::{Episode, Failure, LogThrottle, readable, reminder_every};

/// A connection that lasted this long ends an outage (one that is dropped at once does not).
const HEALTHY_CONNECTION: Duration = Duration::from_secs(5);

/// What the inbound task needs from the configuration.
#[derive(Debug, Clone)]
pub struct InboundSettings {
    /// `[upstream]`: credentials, protocol, keepalive, timeouts, backoff, the subscriptions.
    pub upstream: UpstreamConfig,
    /// Where to connect, in order of preference.
    pub endpoints: Vec<UpstreamUrl>,
    /// The largest packet taken from the upstream: `broker.max_payload` plus room for the
    /// topic and header.
    pub max_incoming: usize,
}

/// An established inbound connection.
struct Connection {
    stream: Stream,
    params: LinkParams,
    session_present: bool,
    inbuf: BytesMut,
    endpoint: UpstreamUrl,
}

/// One attempt at one endpoint: TCP (and TLS, as the outbound link: [`transport::open`]),
/// CONNECT with the persistent session, CONNACK.
async fn connect(settings: &InboundSettings, endpoint: &UpstreamUrl) -> Result<Connection, String> {
    let cfg = &settings.upstream;
    let attempt = async {
        let mut stream = transport::open(cfg, endpoint).await.map_err(|e| e.to_string())?;
        let describe_io = |e: std::io::Error| transport::describe_io(&e, Some((cfg, endpoint)));
        // The password as `upstream.password_file` says now, as for the outbound link.
        let login =
            UpstreamConfig { password: transport::password(cfg).map_err(|e| e.to_string())?, ..cfg.clone() };
        let mut out = BytesMut::new();
        encode_inbound_connect(
            &login,
            &cfg.inbound_client_id(),
            cfg.inbound_session_expiry,
            settings.max_incoming,
            &mut out,
        )?;
        stream.write_all(&out).await.map_err(describe_io)?;
        let mut inbuf = BytesMut::with_capacity(4096);
        loop {
            if let Some((params, session_present)) = parse_connack_session(&mut inbuf, cfg)? {
                return Ok(Connection { stream, params, session_present, inbuf, endpoint: endpoint.clone() });
            }
            if stream.read_buf(&mut inbuf).await.map_err(describe_io)? == 0 {
                return Err("the upstream closed the connection before its CONNACK".to_owned());
            }
        }
    };
    match tokio::time::timeout(cfg.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err("no CONNACK within upstream.connect_timeout".to_owned()),
    }
}

/// Tries each endpoint in order; the first that connects wins. The error names each one's.
async fn connect_any(settings: &InboundSettings) -> Result<Connection, String> {
    let mut failures = Vec::new();
    for endpoint in &settings.endpoints {
        match connect(settings, endpoint).await {
            Ok(connection) => return Ok(connection),
            Err(error) => {
                debug!(message = "inbound connection attempt failed", upstream = %endpoint, %error);
                failures.push(format!("{endpoint}: {error}"));
            }
        }
    }
    Err(failures.join("; "))
}

/// Why a connection ended.
enum End {
    /// The cancellation signal: stop.
    Stopping,
    /// Lost; reconnect after the backoff.
    Lost(String),
}

/// The rate-limited warnings of refused commands.
#[derive(Default)]
struct Refusals {
    mapping: LogThrottle,
    acl: LogThrottle,
    subscribe: LogThrottle,
}

/// Runs until `cancel`: connects, subscribes, delivers commands, reconnects after a backoff.
pub async fn run(settings: InboundSettings, mut door: Commands, metrics: Metrics, cancel: CancellationToken) {
    let cfg = &settings.upstream;
    let counters = metrics.counters();
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    let mut outage = Episode::default();
    let mut refusals = Refusals::default();
    let mut subscribed_once = false;
    let client_id = cfg.inbound_client_id();
    info!(message = "connecting the inbound connection (commands from the cloud)", upstream = %settings.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "), %client_id, subscriptions = cfg.subscribe.len());
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            attempt = connect_any(&settings) => attempt,
        };
        let error = match attempt {
            Ok(connection) => {
                Metrics::add(&counters.inbound_connects, 1);
                let subscribe = !subscribed_once || !connection.session_present;
                let since = Instant::now();
                debug!(message = "inbound connection made", upstream = %connection.endpoint, session_present = connection.session_present, subscribe);
                let end = serve(
                    &settings,
                    connection,
                    subscribe,
                    &mut door,
                    &metrics,
                    &mut refusals,
                    &mut outage,
                    &cancel,
                )
                .await;
                Metrics::set(&metrics.gauges().inbound_connected, 0);
                match end {
                    (End::Stopping, _) => return,
                    (End::Lost(error), subscribed) => {
                        subscribed_once |= subscribed;
                        if since.elapsed() >= HEALTHY_CONNECTION {
                            backoff.reset();
                        }
                        error
                    }
                }
            }
            Err(error) => error,
        };
        Metrics::add(&counters.inbound_failures, 1);
        match outage.failed(Instant::now()) {
            Failure::Started => {
                warn!(message = "inbound connection lost or unreachable; commands the cloud sends meanwhile wait in the upstream's persistent session (retrying with backoff; a reminder follows while it lasts)", %client_id, %error, reminder_every = %readable(reminder_every()))
            }
            Failure::Remind { lasted, attempts } => {
                warn!(message = "inbound connection still down; commands wait in the upstream's persistent session", %client_id, down_for = %readable(lasted), failed_attempts = attempts, last_error = %error)
            }
            Failure::Quiet => debug!(message = "inbound connection failed", %error),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Serves one connection until it ends. Returns why, and whether its subscription was
/// granted (so later reconnects that find the session kept need not subscribe again).
#[allow(clippy::too_many_arguments)]
async fn serve(
    settings: &InboundSettings,
    mut connection: Connection,
    subscribe: bool,
    door: &mut Commands,
    metrics: &Metrics,
    refusals: &mut Refusals,
    outage: &mut Episode,
    cancel: &CancellationToken,
) -> (End, bool) {
    let cfg = &settings.upstream;
    let version = connection.params.version;
    let keepalive = connection.params.keepalive;
    let mut out = BytesMut::new();
    let mut subscribed = !subscribe;
    if subscribe {
        let filters: Vec<(&str, u8)> = cfg.subscribe.iter().map(|s| (s.filter.as_str(), s.qos)).collect();
        encode_subscribe(&mut out, version, 1, &filters);
    } else {
        announce(&connection, outage, metrics, None);
    }
    let since = Instant::now();
    let healthy = tokio::time::sleep_until(since + HEALTHY_CONNECTION);
    tokio::pin!(healthy);
    let mut proven = false;
    let mut next_ping = (!keepalive.is_zero()).then(|| since + keepalive);
    let mut ping_outstanding = false;
    loop {
        // Everything complete in the buffer first, in order: PUBACKs follow deliveries.
        loop {
            let packet = match parse_from_upstream(&mut connection.inbuf, version, settings.max_incoming) {
                Ok(Some(packet)) => packet,
                Ok(None) => break,
                Err(error) => return (End::Lost(error), subscribed),
            };
            ping_outstanding = false;
            match packet {
                FromUpstream::Publish { topic, payload, qos, pkid, retain } => {
                    Metrics::add(&metrics.counters().inbound_received, 1);
                    let delivered = tokio::select! {
                        _ = cancel.cancelled() => None,
                        d = receive(cfg, door, &topic, payload, qos, retain, refusals) => Some(d),
                    };
                    match delivered {
                        None | Some(Delivery::Stopping) => {
                            return (close(connection, out).await, subscribed);
                        }
                        Some(_) if qos == 1 => encode_puback(&mut out, pkid),
                        Some(_) => {}
                    }
                }
                FromUpstream::SubAck { codes, .. } => {
                    granted(cfg, &codes, metrics, refusals, &connection.endpoint);
                    subscribed = true;
                    announce(&connection, outage, metrics, Some(&codes));
                }
                FromUpstream::PingResp => {}
                FromUpstream::Disconnect(reason) => return (End::Lost(reason), subscribed),
            }
        }
        if !out.is_empty() {
            let written = tokio::select! {
                _ = cancel.cancelled() => return (close(connection, out).await, subscribed),
                w = tokio::time::timeout(cfg.connect_timeout, connection.stream.write_all(&out)) => w,
            };
            match written {
                Ok(Ok(())) => out.clear(),
                Ok(Err(e)) => return (End::Lost(format!("writing to the upstream failed: {e}")), subscribed),
                Err(_) => {
                    return (
                        End::Lost("the upstream took nothing for upstream.connect_timeout".to_owned()),
                        subscribed,
                    );
                }
            }
        }
        let ping_at = next_ping.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = cancel.cancelled() => return (close(connection, out).await, subscribed),
            read = connection.stream.read_buf(&mut connection.inbuf) => match read {
                Ok(0) => return (End::Lost("the upstream closed the connection".to_owned()), subscribed),
                Ok(_) => {}
                Err(e) => return (End::Lost(format!("reading from the upstream failed: {e}")), subscribed),
            },
            () = tokio::time::sleep_until(ping_at), if next_ping.is_some() => {
                if ping_outstanding {
                    return (End::Lost("no PINGRESP within upstream.keepalive: the link is dead".to_owned()), subscribed);
                }
                encode_pingreq(&mut out);
                ping_outstanding = true;
                next_ping = Some(Instant::now() + keepalive);
            }
            () = &mut healthy, if !proven => {
                proven = true;
                if let Some((down_for, attempts)) = outage.ended(Instant::now()) {
                    info!(message = "inbound connection back; commands queued upstream meanwhile are delivered now", upstream = %connection.endpoint, down_for = %readable(down_for), failed_attempts = attempts);
                }
            }
        }
    }
}

/// The connection is up (and subscribed, when it had to be): the gauge, and the first
/// connection's log line (a reconnect after an outage is logged once it proved healthy).
fn announce(connection: &Connection, outage: &Episode, metrics: &Metrics, codes: Option<&[u8]>) {
    Metrics::set(&metrics.gauges().inbound_connected, 1);
    if !outage.ongoing() {
        info!(message = "inbound connected", upstream = %connection.endpoint, session_present = connection.session_present, subscribed = codes.is_some());
    }
}

/// Counts and logs the filters the upstream refused.
fn granted(
    cfg: &UpstreamConfig,
    codes: &[u8],
    metrics: &Metrics,
    refusals: &mut Refusals,
    endpoint: &UpstreamUrl,
) {
    for (entry, code) in cfg.subscribe.iter().zip(codes) {
        if *code >= 0x80 {
            Metrics::add(&metrics.counters().inbound_subscribe_refused, 1);
            if let Some(folded) = refusals.subscribe.ready(Instant::now()) {
                error!(message = "the upstream refused an [[upstream.subscribe]] filter; no command on it will arrive. Check the upstream's ACL for the inbound client id", filter = entry.filter.as_str(), code = format!("0x{code:02x}"), upstream = %endpoint, client_id = %cfg.inbound_client_id(), similar_since_last_log = folded);
            }
        }
    }
}

/// Maps one message and delivers it; logs a refusal (rate-limited).
async fn receive(
    cfg: &UpstreamConfig,
    door: &mut Commands,
    topic: &[u8],
    payload: bytes::Bytes,
    qos: u8,
    retain: bool,
    refusals: &mut Refusals,
) -> Delivery {
    let now = Instant::now();
    let mapped = match std::str::from_utf8(topic) {
        Ok(upstream) => map_topic(&cfg.subscribe, upstream).map_err(|why| (why, escape_topic(upstream))),
        Err(_) => Err(("is not UTF-8", escape_topic(&String::from_utf8_lossy(topic)))),
    };
    let local = match mapped {
        Ok(local) => local,
        Err((why, upstream)) => {
            Metrics::add(&door.metrics().counters().inbound_refused_mapping, 1);
            if let Some(folded) = refusals.mapping.ready(now) {
                warn!(message = "a command from upstream was refused by the topic mapping and not delivered (acknowledged upstream, counted inbound_refused_mapping); check [[upstream.subscribe]] strip_prefix and local_prefix", upstream_topic = %upstream, reason = why, similar_since_last_log = folded);
            }
            return Delivery::InvalidTopic(why);
        }
    };
    let delivery = door.deliver(&local, payload, qos, retain).await;
    match &delivery {
        Delivery::InvalidTopic(why) => {
            if let Some(folded) = refusals.mapping.ready(now) {
                warn!(message = "a command from upstream maps to a topic the local broker does not take; not delivered (acknowledged upstream, counted inbound_refused_mapping)", local_topic = %escape_topic(&local), reason = why, similar_since_last_log = folded);
            }
        }
        Delivery::Denied => {
            if let Some(folded) = refusals.acl.ready(now) {
                warn!(message = "a command from upstream was refused by the ACL and not delivered (acknowledged upstream, counted inbound_refused_acl); grant `upstream.inbound_acl_user` write access to it in broker.acl_file if it is meant to arrive", local_topic = %escape_topic(&local), acl_user = %cfg.inbound_acl_user, similar_since_last_log = folded);
            }
        }
        Delivery::Delivered { local: subscribers } => {
            debug!(message = "command delivered", local_topic = %escape_topic(&local), subscribers, qos, retain);
        }
        Delivery::Stopping => {}
    }
    delivery
}

/// The local topic for `upstream`, by the first entry whose filter matches it.
pub fn map_topic(entries: &[SubscribeConfig], upstream: &str) -> Result<String, &'static str> {
    let entry = entries
        .iter()
        .find(|entry| entry.filter.matches(upstream))
        .ok_or("matches no [[upstream.subscribe]] filter (a subscription the persistent session kept from an earlier configuration?)")?;
    entry.local_topic(upstream)
}

/// Ends the connection on purpose: the PUBACKs written so far, then DISCONNECT, which keeps
/// the session (and anything unacknowledged in it) upstream.
async fn close(mut connection: Connection, mut out: BytesMut) -> End {
    encode_disconnect(&mut out);
    let _ = tokio::time::timeout(Duration::from_millis(500), connection.stream.write_all(&out)).await;
    info!(message = "inbound connection closed; the upstream keeps its session", upstream = %connection.endpoint);
    End::Stopping
}

/// Shared by the unit tests and the wiring: the settings for `cfg`, every endpoint in order.
pub fn settings(cfg: &UpstreamConfig, max_payload: u64) -> InboundSettings {
    InboundSettings {
        upstream: cfg.clone(),
        endpoints: cfg.endpoints(),
        // The topic may take up to 64 KiB, the header and properties a few bytes more.
        max_incoming: usize::try_from(max_payload).unwrap_or(usize::MAX).saturating_add(66 * 1024),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::topic::TopicFilter;

    fn entry(filter: &str, strip: &str, local: &str) -> SubscribeConfig {
        SubscribeConfig {
            filter: TopicFilter::new(filter).expect("filter"),
            qos: 1,
            strip_prefix: strip.to_owned(),
            local_prefix: local.to_owned(),
        }
    }

    #[test]
    fn topics_map_by_the_first_matching_entry() {
        let entries = [
            entry("cloud/site-7/cmd/#", "cloud/site-7/", ""),
            entry("$aws/things/gw-7/shadow/#", "$aws/things/gw-7/", "aws/"),
            entry("cloud/#", "cloud/", "from-cloud/"),
        ];
        assert_eq!(map_topic(&entries, "cloud/site-7/cmd/valve/1"), Ok("cmd/valve/1".to_owned()));
        assert_eq!(map_topic(&entries, "$aws/things/gw-7/shadow/update"), Ok("aws/shadow/update".to_owned()));
        assert_eq!(map_topic(&entries, "cloud/other"), Ok("from-cloud/other".to_owned()));
        // `cloud/#` matches its parent level too, which does not start with `cloud/`.
        assert!(map_topic(&entries, "cloud").is_err());
        assert!(map_topic(&entries, "elsewhere/x").is_err());
        // Stripping everything leaves nothing to publish to.
        assert!(map_topic(&[entry("a/#", "a/", "")], "a/").is_err());
        assert!(map_topic(&[entry("#", "", "")], "$x/y").is_err());
    }

    #[test]
    fn settings_take_the_payload_limit_and_every_endpoint() {
        let cfg = UpstreamConfig::with_url("mqtt://127.0.0.1:1883".parse().expect("url"));
        let s = settings(&cfg, 1024);
        assert_eq!(s.endpoints, cfg.endpoints());
        assert_eq!(s.max_incoming, 1024 + 66 * 1024);
        assert_eq!(cfg.inbound_client_id(), "outpost-in");
    }
}
