//! Connecting to the upstream broker: TCP and TLS ([`super::transport`]), CONNECT, CONNACK with
//! the upstream's limits,
//! capped exponential backoff between attempts, and the task that reconnects whenever the
//! relay drops a [`Link`].
//!
//! The log follows the upstream's *state*, not the attempts ([`Health`]): one line when it is
//! lost (or cannot be reached at start) with the reason, a reminder every
//! [`reminder_every`] with the attempts and the backlog, one line when it is back (after how
//! long, how much was buffered meanwhile). Back means a connection that lasted
//! [`HEALTHY_CONNECTION`]: an upstream that accepts and drops every connection is still down.
//! Every attempt and every connection is logged at debug level. With several endpoints
//! (`upstream.urls`), each endpoint's own failures are logged the same way (its first failure,
//! reminders, its return), and [`super::endpoints`] decides which one comes next.
//! Every attempt and every connection is logged at debug level. A TLS failure whose reason
//! changes during an outage (the CA was fixed, now the name does not match) is logged once
//! more, with what to change; every TLS failure is counted by reason.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::endpoints::{Endpoints, Next};
use super::transport::{self, ConnectError, Stream, TlsReason};
use super::{Link, RETIRED};
use crate::config::{UpstreamConfig, UpstreamUrl};
use crate::metrics::Metrics;
use crate::mqtt::upstream::{LinkParams, encode_connect, encode_disconnect, parse_connack};
use crate::telemetry::{Episode, Failure, readable, reminder_every};

/// One connection attempt to `endpoint`: TCP, TLS, CONNECT, CONNACK, all within
/// `connect_timeout`.
async fn connect(
    cfg: &UpstreamConfig,
    endpoint: &UpstreamUrl,
) -> Result<(Stream, LinkParams, BytesMut), ConnectError> {
    let attempt = async {
        let stream = transport::open(cfg, endpoint).await?;
        handshake(cfg, endpoint, stream).await
    };
    match tokio::time::timeout(cfg.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Network(
            "no CONNACK within upstream.connect_timeout: the host accepts TCP but does not answer MQTT (or TLS)"
                .to_owned(),
        )),
    }
}

/// CONNECT (with the password as the files say now) and the CONNACK, on a connected stream.
/// Also `outpost check --connect`'s last step.
pub async fn handshake(
    cfg: &UpstreamConfig,
    endpoint: &UpstreamUrl,
    mut stream: Stream,
) -> Result<(Stream, LinkParams, BytesMut), ConnectError> {
    let io_error = |e: std::io::Error| match transport::classify_io(&e, cfg, &server_name(cfg, endpoint)) {
        Some(failure) => ConnectError::Tls(failure),
        None => ConnectError::Network(transport::describe_io(&e, None)),
    };
    let mut out = BytesMut::new();
    if cfg.password_file.is_some() {
        let login = UpstreamConfig { password: transport::password(cfg)?, ..cfg.clone() };
        encode_connect(&login, &mut out).map_err(ConnectError::Mqtt)?;
    } else {
        encode_connect(cfg, &mut out).map_err(ConnectError::Mqtt)?;
    }
    stream.write_all(&out).await.map_err(io_error)?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if let Some(params) = parse_connack(&mut buf, cfg).map_err(ConnectError::Mqtt)? {
            return Ok((stream, params, buf));
        }
        if stream.read_buf(&mut buf).await.map_err(io_error)? == 0 {
            let hint = match (&stream, cfg.tls.as_ref().and_then(|t| t.cert_file.as_ref())) {
                (Stream::Tls(_), None) => {
                    " (if it requires a client certificate, set upstream.tls.cert_file and key_file)"
                }
                _ => "",
            };
            return Err(ConnectError::Mqtt(format!(
                "the upstream closed the connection before its CONNACK{hint}"
            )));
        }
    }
}

/// The name the server's certificate is checked against.
fn server_name(cfg: &UpstreamConfig, endpoint: &UpstreamUrl) -> String {
    cfg.tls.as_ref().and_then(|t| t.server_name.clone()).unwrap_or_else(|| endpoint.host.clone())
}

/// Counts a failed attempt's TLS reason.
fn count_tls(metrics: &Metrics, reason: TlsReason) {
    let c = metrics.counters();
    let counter = match reason {
        TlsReason::UnknownCa => &c.upstream_tls_unknown_ca,
        TlsReason::ServerExpired => &c.upstream_tls_server_expired,
        TlsReason::ClientExpired => &c.upstream_tls_client_expired,
        TlsReason::Hostname => &c.upstream_tls_hostname,
        TlsReason::ClientCertRequired => &c.upstream_tls_client_cert_required,
        TlsReason::ClientCertRefused => &c.upstream_tls_client_cert_refused,
        TlsReason::Protocol => &c.upstream_tls_protocol,
        TlsReason::Other => &c.upstream_tls_other,
    };
    Metrics::add(counter, 1);
}

/// A connection that lasted this long was healthy: the next attempt starts from
/// `reconnect_min` again. One that dropped sooner (an upstream that closes right after its
/// CONNACK, or refuses what we publish by disconnecting) keeps the backoff growing, so it is
/// not hammered with a connection every `reconnect_min`.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(5);

/// Capped exponential backoff with full jitter over the upper half, so a fleet of gateways
/// does not reconnect in lockstep after an upstream restart.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, current: min }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.5..=1.0);
        base.mul_f64(jitter)
    }
}

/// What the log says about the upstream, from the attempts and connections it is told about:
/// a line per change of state, reminders while it is down (see the module docs). Pure: the
/// clock is passed in, and it returns what to log.
#[derive(Debug, Default)]
struct Health {
    /// The upstream is down (lost, or never reached), since when, and how many attempts failed.
    outage: Episode,
    /// A connection was announced as up ("connected upstream") and not lost since.
    announced: bool,
}

/// A line [`Health`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Note {
    /// The first connection, or one that lasted through an outage's end: `back_after` holds
    /// the outage's length and failed attempts.
    Connected { back_after: Option<(Duration, u64)> },
    /// An announced connection was lost.
    Lost,
    /// No connection could be made, and none was up before.
    Unreachable,
    /// Still down.
    Reminder { down_for: Duration, attempts: u64 },
}

impl Health {
    /// A connection was made. Announced at once unless an outage holds: then only once it
    /// proved healthy ([`Health::healthy`]).
    fn connected(&mut self) -> Option<Note> {
        if self.outage.ongoing() {
            return None;
        }
        self.announced = true;
        Some(Note::Connected { back_after: None })
    }

    /// The connection lasted [`HEALTHY_CONNECTION`]: an outage ends here.
    fn healthy(&mut self, now: Instant) -> Option<Note> {
        let back_after = self.outage.ended(now)?;
        self.announced = true;
        Some(Note::Connected { back_after: Some(back_after) })
    }

    /// An attempt failed, or a connection was lost.
    fn failed(&mut self, now: Instant) -> Option<Note> {
        let lost = std::mem::take(&mut self.announced);
        match self.outage.failed(now) {
            Failure::Started if lost => Some(Note::Lost),
            Failure::Started => Some(Note::Unreachable),
            Failure::Remind { lasted, attempts } => Some(Note::Reminder { down_for: lasted, attempts }),
            Failure::Quiet => None,
        }
    }
}

/// Writes what [`Health`] asked for, with what the counters say about the buffer.
#[derive(Debug)]
struct HealthLog<'a> {
    metrics: &'a Metrics,
    /// Every endpoint, for the lines about the upstream as a whole while none is connected.
    all: String,
    /// `accepted` when the outage began: what came in meanwhile is buffered.
    accepted_at_outage: u64,
}

impl HealthLog<'_> {
    /// `endpoint`: the one connected, lost or just tried.
    fn write(&mut self, note: Option<Note>, generation: u64, endpoint: &str, error: &str, receive_max: u16) {
        let Some(note) = note else { return };
        let accepted = Metrics::get(&self.metrics.counters().accepted);
        let backlog = Metrics::get(&self.metrics.gauges().buffered_events);
        let upstream = endpoint;
        let all = self.all.as_str();
        let reminders = readable(reminder_every());
        match note {
            Note::Connected { back_after: None } => {
                info!(message = "connected upstream", %upstream, generation, receive_max);
            }
            Note::Connected { back_after: Some((down_for, attempts)) } => info!(
                message = "connected upstream",
                %upstream,
                generation,
                receive_max,
                down_for = %readable(down_for),
                failed_attempts = attempts,
                buffered_while_down = accepted.saturating_sub(self.accepted_at_outage),
                backlog_events = backlog
            ),
            Note::Lost => {
                self.accepted_at_outage = accepted;
                warn!(message = "upstream connection lost; events are kept in the buffer and resent after reconnecting (retrying with backoff; a reminder follows while it lasts)", %upstream, generation, %error, reminder_every = %reminders, backlog_events = backlog);
            }
            Note::Unreachable => {
                self.accepted_at_outage = accepted;
                warn!(message = "cannot connect upstream; events are kept in the buffer (retrying with backoff; a reminder follows while it lasts)", upstream = %all, generation, %error, reminder_every = %reminders, backlog_events = backlog);
            }
            Note::Reminder { down_for, attempts } => warn!(
                message = "upstream still unreachable; events are kept in the buffer",
                upstream = %all,
                down_for = %readable(down_for),
                failed_attempts = attempts,
                last_error = %error,
                buffered_while_down = accepted.saturating_sub(self.accepted_at_outage),
                backlog_events = backlog
            ),
        }
    }
}

/// What one endpoint's attempts mean for its own log lines (only with several endpoints: with
/// one, [`HealthLog`]'s lines say it all).
fn log_endpoint(note: Failure, endpoint: &str, error: &str) {
    match note {
        Failure::Started => warn!(
            message = "upstream endpoint unreachable; trying the next one (a reminder follows while it lasts)",
            %endpoint,
            %error
        ),
        Failure::Remind { lasted, attempts } => warn!(
            message = "upstream endpoint still unreachable",
            %endpoint,
            down_for = %readable(lasted),
            failed_attempts = attempts,
            last_error = %error
        ),
        Failure::Quiet => {}
    }
}

fn log_endpoint_back(back: Option<(Duration, u64)>, endpoint: &str) {
    if let Some((down_for, attempts)) = back {
        info!(message = "upstream endpoint reachable again", %endpoint, down_for = %readable(down_for), failed_attempts = attempts);
    }
}

/// A failback probe: the handshake a connection would make, under another client id (see
/// [`super::endpoints`] for why), closed at once with a DISCONNECT.
async fn probe(cfg: &UpstreamConfig, endpoint: &UpstreamUrl) -> Result<(), String> {
    let mut probe_cfg = cfg.clone();
    probe_cfg.client_id = format!("{}-probe", cfg.client_id);
    let (mut stream, _, _) = connect(&probe_cfg, endpoint).await.map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    encode_disconnect(&mut out);
    // The answer was the CONNACK; whether the DISCONNECT arrives changes nothing.
    let _ = tokio::time::timeout(cfg.connect_timeout, stream.write_all(&out)).await;
    Ok(())
}

/// A failback probe under way.
type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// How a connection handed to the relay ended.
enum Ended {
    /// Lost, with the reason.
    Lost(String),
    /// Given back on purpose, to return to the preferred endpoint.
    FailedBack,
}

/// Runs until `cancel`: connects to the endpoints in order ([`Endpoints`]), hands each
/// connection to the relay over `links`, waits for the relay to drop it (probing the preferred
/// endpoint meanwhile when on another), and reconnects — to the next endpoint at once, or
/// after a backoff once every endpoint failed. When the relay is gone, stops.
pub async fn run(
    cfg: UpstreamConfig,
    links: mpsc::Sender<Link>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let counters = metrics.counters();
    let urls = cfg.endpoints();
    if urls.is_empty() {
        return;
    }
    let names: Vec<String> = urls.iter().map(ToString::to_string).collect();
    metrics.endpoints().configure(names.iter().cloned());
    let stats = |idx: usize| metrics.endpoints().get(idx);
    let many = urls.len() > 1;
    let mut endpoints = Endpoints::new(urls.len(), cfg.failback_after, reminder_every());
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    let mut health = Health::default();
    let mut log = HealthLog { metrics: &metrics, all: cfg.endpoint_list(), accepted_at_outage: 0 };
    // The TLS reason of the outage's failures so far: a new one is logged even between
    // reminders, since it means something changed (a file was fixed, another one is wrong).
    let mut tls_reason: Option<TlsReason> = None;
    for generation in 1.. {
        let idx = endpoints.current();
        let endpoint = &names[idx];
        if generation == 1 {
            info!(message = "connecting upstream", upstream = %log.all, version = ?cfg.mqtt_version, generation);
        } else {
            debug!(message = "connecting upstream", upstream = %endpoint, generation);
        }
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            attempt = connect(&cfg, &urls[idx]) => attempt,
        };
        let next = match attempt {
            Ok((stream, params, inbuf)) => {
                tls_reason = None;
                let since = Instant::now();
                Metrics::add(&counters.upstream_connects, 1);
                stats(idx).inspect(|s| Metrics::add(&s.connects, 1));
                metrics.set_upstream_endpoint(Some(idx));
                debug!(message = "upstream connection made", upstream = %endpoint, generation, receive_max = params.receive_max);
                let back = endpoints.connected(idx, since);
                if many {
                    log_endpoint_back(back, endpoint);
                }
                log.write(health.connected(), generation, endpoint, "", params.receive_max);
                let receive_max = params.receive_max;
                let (ended, mut end) = oneshot::channel();
                let (retire, retired) = oneshot::channel();
                let link = Link {
                    generation,
                    stream,
                    params,
                    inbuf,
                    out: BytesMut::new(),
                    ended: Some(ended),
                    retire: Some(retired),
                };
                let outcome = match links.send(link).await {
                    Ok(()) => {
                        let healthy = tokio::time::sleep_until(since + HEALTHY_CONNECTION);
                        tokio::pin!(healthy);
                        let mut proven = false;
                        let probing = endpoints.probes(idx);
                        let every = endpoints.probe_every();
                        let mut probe_tick = tokio::time::interval_at(since + every, every);
                        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        let mut probe_now: Option<ProbeFuture<'_>> = None;
                        let mut retire = Some(retire);
                        loop {
                            tokio::select! {
                                biased;
                                // Dropped without a reason: the relay is stopping.
                                end = &mut end => break end.ok().map(|reason| {
                                    if retire.is_none() && reason == RETIRED { Ended::FailedBack } else { Ended::Lost(reason) }
                                }),
                                _ = cancel.cancelled() => break None,
                                () = &mut healthy, if !proven => {
                                    proven = true;
                                    log.write(health.healthy(Instant::now()), generation, endpoint, "", receive_max);
                                }
                                _ = probe_tick.tick(), if probing && probe_now.is_none() && retire.is_some() => {
                                    probe_now = Some(Box::pin(probe(&cfg, &urls[0])));
                                }
                                answer = std::future::poll_fn(|cx| probe_now.as_mut().map_or(Poll::Pending, |p| p.as_mut().poll(cx))), if probe_now.is_some() => {
                                    probe_now = None;
                                    let now = Instant::now();
                                    let preferred = &names[0];
                                    let (back, failed, answered_again) = endpoints.probed(answer.is_ok(), now);
                                    log_endpoint_back(answered_again, preferred);
                                    if let (Some(note), Err(error)) = (failed, &answer) {
                                        stats(0).inspect(|s| Metrics::add(&s.failures, 1));
                                        debug!(message = "failback probe failed", upstream = %preferred, %error);
                                        log_endpoint(note, preferred, error);
                                    }
                                    if back {
                                        info!(message = "returning to the preferred upstream endpoint: it answered for upstream.failback_after; what is in flight here is resent there", from = %endpoint, to = %preferred, failback_after = %readable(cfg.failback_after));
                                        if let Some(retire) = retire.take() {
                                            let _ = retire.send(());
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Err(_) => None,
                };
                metrics.set_upstream_endpoint(None);
                match outcome {
                    None => return,
                    Some(Ended::FailedBack) => {
                        Metrics::add(&counters.upstream_failbacks, 1);
                        endpoints.failing_back();
                        backoff.reset();
                        // Announce the connection to the preferred endpoint as a new one.
                        health = Health::default();
                        Next::Try(endpoints.current())
                    }
                    Some(Ended::Lost(error)) => {
                        let lasted = since.elapsed();
                        let proven = lasted >= HEALTHY_CONNECTION;
                        if proven {
                            backoff.reset();
                            tls_reason = None;
                        }
                        Metrics::add(&counters.upstream_failures, 1);
                        stats(idx).inspect(|s| Metrics::add(&s.failures, 1));
                        debug!(message = "upstream connection ended", upstream = %endpoint, generation, lasted = ?lasted, %error);
                        let now = Instant::now();
                        log.write(health.failed(now), generation, endpoint, &error, receive_max);
                        // The line above named this endpoint; its own episode starts quietly.
                        endpoints.lost(idx, proven, now).1
                    }
                }
            }
            Err(error) => {
                Metrics::add(&counters.upstream_failures, 1);
                stats(idx).inspect(|s| Metrics::add(&s.failures, 1));
                debug!(message = "upstream connection attempt failed", upstream = %endpoint, generation, %error);
                let reason = error.tls_reason();
                if let Some(reason) = reason {
                    count_tls(&metrics, reason);
                }
                let error = error.to_string();
                let now = Instant::now();
                let (note, next) = endpoints.attempt_failed(idx, now);
                if many {
                    log_endpoint(note, endpoint, &error);
                }
                let note = health.failed(now);
                if note.is_none() && reason.is_some() && reason != tls_reason {
                    warn!(message = "upstream TLS handshake fails for another reason now; events are kept in the buffer", upstream = %endpoint, %error);
                }
                tls_reason = reason;
                log.write(note, generation, endpoint, &error, 0);
                next
            }
        };
        if next == Next::Backoff {
            let delay = backoff.next_delay();
            debug!(message = "reconnecting upstream after backoff", delay = ?delay);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            endpoints.start_round();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An hour of an upstream that refuses connections, then one that accepts and drops each
    /// connection at once: the lines are the state changes and the reminders, not the
    /// thousands of attempts.
    #[test]
    fn health_logs_state_changes_and_reminders_not_attempts() {
        let start = Instant::now();
        let mut h = Health { outage: Episode::every(Duration::from_secs(600)), announced: false };
        assert_eq!(h.connected(), Some(Note::Connected { back_after: None }));
        assert_eq!(h.healthy(start + HEALTHY_CONNECTION), None, "no outage to end");
        let mut now = start + Duration::from_secs(60);
        let mut notes = vec![h.failed(now)];
        let mut attempts = 1;
        // An hour after the loss (at 60 s), short of the seventh reminder.
        while now < start + Duration::from_secs(3659) {
            now += Duration::from_millis(400);
            attempts += 1;
            notes.push(h.failed(now));
            // Every tenth attempt connects and is dropped before it proved healthy.
            if attempts % 10 == 0 {
                notes.push(h.connected());
                attempts += 1;
                notes.push(h.failed(now));
            }
        }
        let notes: Vec<Note> = notes.into_iter().flatten().collect();
        assert!(attempts > 8_000, "{attempts}");
        assert_eq!(notes[0], Note::Lost);
        assert_eq!(notes.len(), 6, "the loss and a reminder every 10 minutes: {notes:?}");
        assert!(notes[1..].iter().all(|n| matches!(n, Note::Reminder { .. })), "{notes:?}");
        // Back: a connection that lasts.
        assert_eq!(h.connected(), None, "not yet: it must last");
        let Some(Note::Connected { back_after: Some((down_for, failed)) }) = h.healthy(now) else {
            panic!("back")
        };
        assert!(down_for >= Duration::from_secs(3590), "{down_for:?}");
        assert_eq!(failed, attempts);
        // Lost again: a new outage, announced.
        assert_eq!(h.failed(now), Some(Note::Lost));
    }

    #[test]
    fn an_upstream_down_at_start_is_unreachable_until_a_connection_lasts() {
        let start = Instant::now();
        let mut h = Health { outage: Episode::every(Duration::from_secs(600)), announced: false };
        assert_eq!(h.failed(start), Some(Note::Unreachable));
        assert_eq!(h.failed(start + Duration::from_secs(1)), None);
        assert_eq!(h.connected(), None);
        let back = h.healthy(start + Duration::from_secs(7));
        assert_eq!(back, Some(Note::Connected { back_after: Some((Duration::from_secs(7), 2)) }));
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100), "{d1:?}");
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        assert!(b.next_delay() >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
