//! Stage 1: sensor connections and the local broker.
//!
//! Outpost accepts sensor TCP connections itself and speaks MQTT 3.1.1 and 5 with rumqttd's
//! codecs ([`crate::mqtt::codec`]; nothing else of rumqttd is used). Each connection (`conn`)
//! hands its publishes straight to the route stage through a bounded channel ([`intake`]), and
//! holds the sensor's PUBACK until the event is safe — committed to the buffer or acknowledged
//! upstream ([`crate::ack`]). Local fan-out (subscriptions between sensors, actuators and
//! dashboards) is Outpost's own too: a subscription trie ([`subs`]) and a bounded queue per
//! session ([`local`]). rumqttd's listener and router are not used: the listener acknowledged
//! publishes from RAM before anyone read them; the router lost deliveries for a reader that
//! fell behind its ring, aborted the gateway on a non-ASCII topic under `#` and on a shared
//! subscription of a persistent session, and kept memory for every filter and topic ever
//! seen (issue #20).
//!
//! # Parts
//! - `conn` — one task per connection: `handshake` (CONNECT policy, registration, takeover,
//!   session restore, CONNACK), `publish_in` (publishes from the client, held acknowledgements
//!   in order, the will) and `deliver_out` (mailbox → client: QoS 1 window, packet ids, DUP
//!   resends, retained and `$SYS` deliveries, subscriptions).
//! - [`live`] — live connections: the connection limit and takeover (one per client id).
//! - [`local`] — sessions (connected and offline), their mailboxes, the fan-out; [`subs`] the
//!   trie it matches with.
//! - [`retained`] — retained messages. [`sys`] — `$SYS/outpost/…` status.
//! - [`access`] — passwords, `allow_anonymous` and the ACL: who may connect, publish,
//!   subscribe and receive what; reloaded on SIGHUP.
//! - `tls` — the `[broker.tls]` listener: handshake slots, the handshake under the
//!   connection's deadline, the client certificate's identity, reloads on SIGHUP.
//! - [`intake`] — the channel into the route stage.
//! - [`Republisher`] — the route stage's way in (rules' `republish`).
//! - [`Commands`] — the inbound connection's way in (commands from the cloud): checked like
//!   a local client's publish, then fanned out, retained and routed like one.
//!
//! # Shared state
//! [`Shared`] is what every connection holds: each field is one part, and each part owns its
//! state behind its own methods; connections call those, never reach into a part's fields.
//! - Locks: `Local`'s (session table and trie) and one per `Mailbox`, taken in that order and
//!   never the other way; `RetainedStore`'s, `LiveConnections`', `Access`'s and the log
//!   throttles' are leaves (nothing is locked under them). None is held across an `.await`, and the runtime
//!   has one thread, so none is ever contended.
//! - A publish costs one trie walk under one lock (none while nobody subscribes), one mailbox
//!   lock per session it is queued for, and, only if retained, the retained store's lock.
//!   The intake's log throttle is locked only while the route stage's channel is full.
//! - `cfg` and `metrics` are read-only / atomics; `$SYS` status is a `watch` snapshot; the
//!   intake is a channel.
//! - Who calls what: connections call every part; the `Republisher` only
//!   `Local::publish_now`; `Commands` what a publishing connection calls (access, retained,
//!   `Local::publish`, the intake); the expiry task `Local::expire` and, for the delayed wills it
//!   returns, what a connection's will calls; the status task only writes
//!   the `watch`.
//!
//! # Invariants
//! - **A PUBACK (or PUBREC) means the event is safe** (`broker.ack = "after_commit"`, the
//!   default): sent only once every copy of the event is committed or acknowledged upstream,
//!   in the order the publishes arrived on that connection.
//! - **Backpressure, not loss:** a connection that cannot hand an event to the route stage
//!   stops reading its socket; TCP then slows the sensor. Nothing is dropped on the way in.
//! - Local deliveries are bounded per subscriber, and a delivery that does not fit is counted
//!   and logged, never skipped silently ([`local`]).
//! - Retained messages and `$SYS/outpost/…` status are served here, alongside the fan-out.
//! - Wills are published here, only when a connection ends without a DISCONNECT (or with
//!   MQTT 5 reason 0x04).
//! - One connection per client id: a second CONNECT with the same id closes the first
//!   (session takeover) and waits for it to finish before the new one proceeds ([`live`]).

pub mod access;
mod commands;
mod conn;
mod intake;
mod live;
pub mod local;
pub mod persist;
mod republisher;
pub mod retained;
pub mod subs;
mod sys;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use self::access::Access;
pub use self::commands::{Commands, Delivery};
use self::intake::Intake;
use self::live::LiveConnections;
use self::local::Local;
pub use self::republisher::Republisher;
use self::retained::RetainedStore;
use self::sys::Status;
use self::tls::TlsListener;
use crate::config::{AckMode, BrokerConfig};
use crate::event::{Event, IdGen};
use crate::metrics::Metrics;
use crate::telemetry::LogThrottles;
use crate::watchdog::Heartbeat;

/// `$SYS` filters one connection may hold (its other filters: `broker.max_subscriptions`).
pub const MAX_FILTERS: usize = 1_000;
/// How often offline sessions are checked for an expired MQTT 5 session expiry.
const EXPIRY_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr} (`{key}`): {source}; pick a free address or stop what holds it")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
    /// `broker.password_file` or `broker.acl_file` cannot be used.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthFileError),
    /// `[broker.tls]`'s certificate, key or CA file cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What all connections share: one field per part (see the module docs for its discipline).
struct Shared {
    /// `[broker]`, read-only.
    cfg: BrokerConfig,
    metrics: Metrics,
    intake: Intake,
    local: Arc<Local>,
    retained: RetainedStore,
    live: Arc<LiveConnections>,
    status: watch::Receiver<Status>,
    /// Passwords, `allow_anonymous` and the ACL.
    access: Arc<Access>,
    /// Gates for the connections' own warnings, which can repeat per packet.
    logs: LogThrottles,
}

impl Shared {
    fn ack_after_commit(&self) -> bool {
        self.cfg.ack == AckMode::AfterCommit
    }
}

/// What [`start`] hands the wiring: the route stage's way into the local broker, and what
/// makes the inbound connection's. Holding it holds a sender of the route stage's input.
pub struct Started {
    pub republisher: Republisher,
    shared: Arc<Shared>,
}

impl Started {
    /// The door for commands from the cloud, checked by the ACL as `acl_user` with client id
    /// `client_id` (see [`Commands`]).
    pub fn commands(&self, acl_user: &str, client_id: &str) -> Commands {
        Commands::new(Arc::clone(&self.shared), acl_user, client_id)
    }
}

/// Starts the local broker and the listeners. Returns once the listeners are bound, so
/// callers (and tests) can connect sensors right away. `heartbeat` is the broker's (the
/// watchdog): the accept loops and the hand-over to the route stage report on it.
// The stage's wiring, each a handle of its own (as `relay::run`'s).
#[allow(clippy::too_many_arguments)]
pub async fn start(
    cfg: &BrokerConfig,
    ids: IdGen,
    out: mpsc::Sender<Event>,
    metrics: Metrics,
    cancel: CancellationToken,
    tracker: &TaskTracker,
    heartbeat: Heartbeat,
    tap: crate::tap::Tap,
    retained: retained::Durable,
    events_wanted: crate::event::EventsWanted,
    sessions: persist::Restored,
) -> Result<Started, BrokerError> {
    let access = Arc::new(Access::load(cfg)?);
    let mut listeners = vec![(bind("broker.listen", cfg.listen).await?, Listener::Listen, None)];
    if let Some(addr) = cfg.listen_v5 {
        listeners.push((bind("broker.listen_v5", addr).await?, Listener::ListenV5, None));
    }
    if let Some(tls) = &cfg.tls {
        let tls = Arc::new(TlsListener::load(tls, metrics.clone())?);
        listeners.push((
            bind("broker.tls.listen", tls.listen()).await?,
            Listener::Tls,
            Some(Arc::clone(&tls)),
        ));
        tracker.spawn(tls::reload_on_hangup(tls, cancel.clone()));
    }
    let limits = local::Limits {
        max_queued: cfg.max_queued_messages.get(),
        max_offline: cfg.max_offline_sessions,
        max_filters: cfg.max_subscriptions.get(),
    };
    // Persistent sessions are written through the store thread's queue, as retained messages
    // are; the log's task commits them (see `persist`).
    let log = Arc::new(persist::SessionLog::new(sessions.max_seq));
    let local = Local::new(limits, metrics.clone()).with_log(Arc::clone(&log));
    let restored = local.restore(sessions.sessions);
    if restored > 0 {
        info!(message = "persistent sessions restored from the buffer file", sessions = restored);
    }
    let local = Arc::new(local);
    tracker.spawn(persist::run(log, retained.commands.clone(), metrics.clone(), cancel.clone()));
    let (status_tx, status_rx) = watch::channel(Arc::new(Vec::new()));
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        intake: Intake::new(ids, out, metrics.clone(), heartbeat, tap, events_wanted),
        local: Arc::clone(&local),
        retained: RetainedStore::durable(
            cfg.max_retained,
            cfg.max_retained_bytes.as_u64(),
            metrics.clone(),
            retained.commands,
            retained.loaded,
        ),
        live: Arc::new(LiveConnections::new(
            cfg.max_connections.get(),
            cfg.max_connections_per_address.map(std::num::NonZeroUsize::get),
            metrics.clone(),
        )),
        status: status_rx,
        access: Arc::clone(&access),
        logs: LogThrottles::default(),
    });
    if access.has_files() {
        tracker.spawn(access::reload_on_hangup(access, metrics.clone(), cancel.clone()));
    }
    tracker.spawn(sys::refresh(cfg.sys_interval, metrics, status_tx, cancel.clone()));
    tracker.spawn(expire_sessions(Arc::clone(&shared), cancel.clone()));
    tracker.spawn(Arc::clone(&shared.live).shut_down_on(cancel.clone()));
    for (listener, which, tls) in listeners {
        let addr = listener.local_addr().unwrap_or(cfg.listen);
        let transport = if tls.is_some() { "TLS" } else { "TCP" };
        info!(message = "embedded broker listening", %addr, transport, protocols = "MQTT 3.1.1 and 5");
        tracker.spawn(accept(listener, which, tls, Arc::clone(&shared), cancel.clone(), tracker.clone()));
    }
    Ok(Started { republisher: Republisher::new(local), shared })
}

/// Ends offline persistent sessions whose MQTT 5 session expiry has passed, and publishes the
/// delayed wills whose time came (MQTT 5 will delay), to within [`EXPIRY_CHECK`].
async fn expire_sessions(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                let (_, wills) = shared.local.expire(tokio::time::Instant::now());
                for will in wills {
                    conn::publish_will(&shared, will).await;
                }
            }
        }
    }
}

/// A TLS connection: its handshake (holding a handshake slot), then the MQTT connection.
async fn serve_tls(
    tls: Arc<TlsListener>,
    slot: tls::Slot,
    stream: tokio::net::TcpStream,
    mut accepted: conn::Accepted,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let handshake = tls.handshake(stream, accepted.deadline, &cancel).await;
    drop(slot);
    match handshake {
        Ok((stream, identity)) => {
            accepted.identity = identity;
            conn::serve(conn::Stream::Tls(Box::new(stream)), accepted, shared, cancel).await;
        }
        Err(failure) => tls.log_failure(&failure, accepted.peer, &shared.logs),
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(addr).await.map_err(|source| BrokerError::Bind { key, addr, source })
}

/// Which configured listener a connection came in on (`outpost_connections_accepted_total`'s
/// `listener` label).
#[derive(Debug, Clone, Copy)]
enum Listener {
    Listen,
    ListenV5,
    Tls,
}

async fn accept(
    listener: TcpListener,
    which: Listener,
    tls: Option<Arc<TlsListener>>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    // Taking a connection in hand is a turn; waiting for the next one is not.
    let heartbeat = shared.intake.heartbeat().clone();
    let counters = shared.metrics.counters();
    let accepted_here = match which {
        Listener::Listen => &counters.accepted_listen,
        Listener::ListenV5 => &counters.accepted_listen_v5,
        Listener::Tls => &counters.accepted_tls,
    };
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        heartbeat.begin();
        let turn = match accepted {
            Ok((stream, peer)) => {
                Metrics::add(accepted_here, 1);
                let accepted = conn::Accepted {
                    peer,
                    deadline: Instant::now() + shared.cfg.connection_timeout,
                    identity: None,
                };
                match &tls {
                    None => {
                        tracker.spawn(conn::serve(
                            conn::Stream::Plain(stream),
                            accepted,
                            Arc::clone(&shared),
                            cancel.clone(),
                        ));
                    }
                    // At the handshake limit the socket is closed unread (counted).
                    Some(tls) => match tls.slot() {
                        Some(slot) => {
                            tracker.spawn(serve_tls(
                                Arc::clone(tls),
                                slot,
                                stream,
                                accepted,
                                Arc::clone(&shared),
                                cancel.clone(),
                            ));
                        }
                        None => {
                            if let Some(folded) = shared.logs.ready("tls busy") {
                                warn!(message = "broker.tls.max_handshakes TLS handshakes in progress: closed a new connection unread (a reconnect storm or a handshake flood); clients retry", %peer, similar_since_last_log = folded);
                            }
                        }
                    },
                }
                None
            }
            Err(error) => {
                // EMFILE and friends: keep the listener, back off briefly so the loop does not
                // spin while descriptors are exhausted.
                if let Some(folded) = shared.logs.ready("accept") {
                    error!(message = "accepting a sensor connection failed; check the process's file descriptor limit (LimitNOFILE)", %error, similar_since_last_log = folded);
                }
                Some(Duration::from_millis(50))
            }
        };
        heartbeat.end();
        if let Some(pause) = turn {
            tokio::time::sleep(pause).await;
        }
    }
    // The route stage ends when every sender of events is gone; the listener holds one
    // through `shared` until here.
    drop(shared);
}
