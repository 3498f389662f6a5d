//! Outpost: an IoT edge event gateway.
//!
//! Sensors publish to Outpost's own MQTT server; Outpost routes their events and relays them to
//! an upstream broker through a durable store-and-forward buffer, and acknowledges a sensor's
//! publish only once its event is safe.
//!
//! # Layout
//! The pipeline is three stages joined by bounded channels: the broker (one task per sensor
//! connection, plus its accept loop, `$SYS` status and session expiry), the route stage and the
//! relay (one task each). The relay drives the upstream connection the uplink task opens; the
//! store thread owns the buffer file. ARCHITECTURE.md has the codemap and the stage order.
//!
//! ```text
//! broker ──Event──▶ route ──Outbound──▶ relay ══ PUBLISH ⇄ PUBACK ══▶ upstream broker
//! (sensor conns,    (bridge/rules)     │  ▲ (store thread: redb)
//!  one task each)                      │  └── Link ── uplink (connects, reconnects)
//!    ▲                                    │
//!    └──── PUBACK once the event's Ticket drops (committed or acknowledged upstream)
//! ```
//! - [`mqtt`] — the MQTT wire apart from any policy: topics, codecs for both directions.
//! - [`ack`] — the ticket contract every stage shares: a publish is acknowledged once every
//!   copy of its event is safe.
//! - [`event`] — the values passed between stages, and id generation.
//! - [`config`] — typed, validated configuration.
//! - [`auth`] — Mosquitto's password and ACL files: parsed, hashes checked, topics decided.
//! - [`broker`] — stage 1, the sensor side: connections (MQTT 3.1.1/5), sessions, local
//!   fan-out, retained messages, `$SYS`.
//! - [`route`] — stage 2, bridge routes or the rule engine: forward, republish, drop, dead-letter.
//! - [`rules`] — loading the rules file and its tables; hot reload on SIGHUP and file change.
//! - [`deadletter`] — the dead-letter store (events a rule failed on, the relay's poison events).
//! - [`relay`] — stage 3, store-and-forward: commit scheduling, send window, resend on reconnect.
//! - [`buffer`] — every access to the redb file: the store thread, operators' read-only views,
//!   import.
//! - [`uplink`] — the upstream MQTT connection: connect and reconnect; the relay drives it.
//! - [`admin`] — the admin socket, both ends: the daemon answers `outpost buffer …` through it.
//! - [`metrics`] — counters, gauges and histograms.
//! - [`http`] — `[http]`: `/metrics`, `/health/live`, `/health/ready`, `/status`.
//! - [`shutdown`] — signals to cancellation.
//! - [`telemetry`] — logging set-up; the cadence of repeating warnings.
//! - [`watchdog`] — the stages' heartbeats, the systemd watchdog and `STATUS=` line.
//! - [`tap`] — the live view of events through the stages (`outpost tap`).
//! - [`cli`] — the `outpost` command line (the binary only parses and calls in).
//! - [`fuzz`] — the fuzz targets' entry functions, which the test suite replays on their corpus.

pub mod ack;
pub mod admin;
#[cfg(test)]
mod architecture;
pub mod auth;
pub mod broker;
pub mod buffer;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod deadletter;
pub mod event;
pub mod fuzz;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod relay;
pub mod route;
pub mod rules;
pub mod shutdown;
pub mod tap;
pub mod telemetry;
pub mod tls;
pub mod uplink;
pub mod watchdog;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::buffer::Store;
use crate::buffer::worker::Worker;
use crate::config::GatewayConfig;
use crate::event::IdGen;
use crate::metrics::Metrics;
use crate::watchdog::{Stage, Watchdog};

/// Capacity of each channel between stages, in events.
pub const STAGE_CHANNEL_CAPACITY: usize = 1024;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Buffer(#[from] buffer::BufferError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Rules(#[from] rules::LoadError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
}

/// A running gateway: its counters, and the handle that stops it.
pub struct Gateway {
    metrics: Metrics,
    cancel: CancellationToken,
    tracker: TaskTracker,
    shutdown_timeout: Duration,
}

impl Gateway {
    /// Starts every stage. Returns once the broker accepts connections.
    pub async fn start(config: GatewayConfig) -> Result<Gateway, StartError> {
        let routing = match &config.rules {
            Some(path) => {
                let path = path.clone();
                let rules = tokio::task::spawn_blocking(move || rules::load(&path))
                    .await
                    .map_err(|e| StartError::Thread(std::io::Error::other(e)))??;
                if !config.routes.is_empty() {
                    warn!(message = "[[route]] sections are ignored while a rules file is loaded");
                }
                info!(message = "rules loaded", rules = rules.len());
                route::Routing::Rules(rules)
            }
            None => route::Routing::Bridge(route::Bridge::new(&config.routes)),
        };
        let metrics = Metrics::default();
        let data_dir = config.data_dir.clone();
        let (max_retained, max_retained_bytes) =
            (config.broker.max_retained, config.broker.max_retained_bytes.as_u64());
        let (max_offline, max_queued) =
            (config.broker.max_offline_sessions, config.broker.max_queued_messages.get());
        // The retained messages are read here, before the store thread takes the file: one
        // read transaction, bounded by the broker's limits (measured in `benches/buffer.rs`,
        // scenario `retained`).
        // The persistent sessions too, in a transaction of their own.
        let (store, report, retained, sessions, windows) = tokio::task::spawn_blocking(move || {
            let (mut store, report) = Store::open(&data_dir)?;
            let started = std::time::Instant::now();
            let retained = store.load_retained(event::now_ms(), max_retained, max_retained_bytes)?;
            let took = started.elapsed();
            let sessions = store.load_sessions(event::now_ms(), max_offline, max_queued)?;
            // The stateful rules' checkpoint log (its last full snapshot and the deltas after
            // it), restored by the route stage.
            let windows = store.load_windows()?;
            Ok::<_, buffer::BufferError>((store, report, (retained, took), sessions, windows))
        })
        .await
        .map_err(|e| StartError::Thread(std::io::Error::other(e)))??;
        let (retained, took) = retained;
        if sessions.expired + sessions.evicted + sessions.deliveries_dropped + sessions.undecodable > 0 {
            warn!(
                message = "persistent sessions in the buffer file were not restored whole: expired while the gateway was down, beyond broker.max_offline_sessions or broker.max_queued_messages, or undecodable",
                sessions_expired = sessions.expired,
                sessions_evicted = sessions.evicted,
                deliveries_dropped = sessions.deliveries_dropped,
                undecodable = sessions.undecodable
            );
        }
        let sessions = broker::persist::Restored { sessions: sessions.sessions, max_seq: sessions.max_seq };
        info!(
            message = "retained messages loaded",
            retained = retained.messages.len(),
            expired_while_down = retained.expired,
            took_ms = took.as_millis() as u64
        );
        if retained.undecodable > 0 {
            warn!(
                message = "retained messages in the buffer file did not decode and were removed; their topics have no retained value until published again",
                removed = retained.undecodable
            );
        }
        if retained.not_loaded > 0 {
            warn!(
                message = "retained messages in the buffer file exceed broker.max_retained or broker.max_retained_bytes and were not loaded (they stay in the file); raise the limits to serve them",
                not_loaded = retained.not_loaded
            );
        }
        if let Some((aside, reason)) = &report.moved_aside {
            Metrics::add(&metrics.counters().buffer_corrupt, 1);
            error!(
                message = format!(
                    "the buffer file's contents are corrupt; it was moved aside and a new, empty buffer started. Its readable events are not relayed until you import them (also while the gateway runs): `outpost buffer import {} --data-dir {}`",
                    aside.display(),
                    config.data_dir.display()
                ),
                moved_to = %aside.display(),
                reason = %reason
            );
        }
        if let Some(from) = report.migrated_from {
            info!(message = "buffer file format migrated", from, to = buffer::store::FORMAT_VERSION);
        }
        let total = store.total();
        info!(message = "buffer opened", path = %store.path().display(), buffered_events = total.events, buffered_bytes = total.bytes, epoch = report.epoch);
        let lanes = store.lanes();
        // Every stage reports a heartbeat; the supervisor (below) pings systemd only while
        // none of them is stuck.
        let watchdog = std::sync::Arc::new(Watchdog::default());
        let worker = Worker::spawn(store, watchdog.heartbeat(Stage::Store)).map_err(StartError::Thread)?;
        let retained_commands = worker.commands.clone();
        let checkpoint_commands = worker.commands.clone();

        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ids = IdGen::new(report.epoch);
        // Sequence numbers share the epoch scheme with event ids but count separately.
        let seqs = IdGen::new(report.epoch);

        let (event_tx, event_rx) = mpsc::channel(STAGE_CHANNEL_CAPACITY);
        let (outbound_tx, outbound_rx) = mpsc::channel(STAGE_CHANNEL_CAPACITY);
        // Every stage publishes into it; the admin socket attaches `outpost tap`'s viewers.
        let tap = tap::Tap::new(metrics.clone());
        if let Some(listener) = admin::server::bind(&config.data_dir) {
            let handles = admin::server::Handles {
                commands: worker.commands.clone(),
                relay_input: outbound_tx.clone(),
                metrics: metrics.clone(),
                tap: tap.clone(),
                tracker: tracker.clone(),
            };
            tracker.spawn(admin::server::serve(listener, handles, cancel.clone()));
        }
        // Before the broker, so probes see "not ready" until its listeners answer.
        if let Some(http_config) = &config.http {
            let handles = http::Handles::new(&config, metrics.clone(), worker.commands.clone());
            if let Err(e) = http::start(http_config, handles, cancel.clone(), &tracker).await {
                cancel.cancel();
                return Err(e.into());
            }
        }
        let (link_tx, link_rx) = mpsc::channel(1);
        let uplink_cancel = CancellationToken::new();

        // Which client events (`$events/...`) the broker reports: those the rules read.
        let events_wanted = event::EventsWanted::default();
        if let route::Routing::Rules(rules) = &routing {
            events_wanted.set(rules.event_kinds());
        }
        let (routing_tx, routing_rx) = tokio::sync::watch::channel(std::sync::Arc::new(routing));
        if let Some(path) = &config.rules {
            let watch = rules::watch(
                path.clone(),
                routing_tx,
                events_wanted.clone(),
                metrics.clone(),
                cancel.clone(),
            );
            tracker.spawn(watch);
        }
        let (dead_tx, dead_rx) = mpsc::channel(deadletter::CHANNEL_CAPACITY);
        let (durable_tx, durable_rx) = mpsc::channel(deadletter::CHANNEL_CAPACITY);
        tracker.spawn(deadletter::run(config.data_dir.clone(), dead_rx, durable_rx));

        let settings =
            relay::RelaySettings::new(&config.buffer, config.upstream.as_ref(), config.shutdown_timeout / 2);
        let relay = relay::Relay::new(settings, metrics.clone(), seqs, lanes).with_tap(tap.clone());
        tracker.spawn(relay::run(
            relay,
            outbound_rx,
            link_rx,
            worker,
            config.data_dir.clone(),
            durable_tx,
            uplink_cancel.clone(),
            watchdog.heartbeat(Stage::Relay),
        ));

        match &config.upstream {
            Some(upstream) => {
                tracker.spawn(uplink::run(upstream.clone(), link_tx, metrics.clone(), uplink_cancel));
            }
            None => warn!(
                message = "no upstream configured: events are kept in the buffer until one is; set [upstream] url in the config or pass --upstream mqtt://host:port"
            ),
        }

        let started = match broker::start(
            &config.broker,
            ids.clone(),
            event_tx,
            metrics.clone(),
            cancel.clone(),
            &tracker,
            watchdog.heartbeat(Stage::Broker),
            tap.clone(),
            broker::retained::Durable { commands: retained_commands, loaded: retained.messages },
            events_wanted,
            sessions,
        )
        .await
        {
            Ok(started) => started,
            Err(e) => {
                cancel.cancel();
                return Err(e.into());
            }
        };
        // Commands from the cloud: their own connection and task, stopped by `cancel` with
        // the broker (it holds a sender of the route stage's input, like a connection).
        if let Some(upstream) = config.upstream.as_ref().filter(|u| !u.subscribe.is_empty()) {
            let door = started.commands(&upstream.inbound_acl_user, &upstream.inbound_client_id());
            let settings = uplink::inbound::settings(upstream, config.broker.max_payload.as_u64());
            tracker.spawn(uplink::inbound::run(settings, door, metrics.clone(), cancel.clone()));
        }
        let republisher = started.republisher;
        let stage = route::RouteStage {
            routing: routing_rx,
            topic_prefix: config.upstream.as_ref().map_or(String::new(), |u| u.topic_prefix.clone()),
            republisher: Some(republisher),
            dead_letters: dead_tx,
            topic_policy: config.broker.topic_policy(),
            ids,
            metrics: metrics.clone(),
            heartbeat: watchdog.heartbeat(Stage::Route),
            tap,
            clock: route::Clock::System,
            durable: Some(route::Durable {
                commands: checkpoint_commands,
                interval: config.buffer.max_ack_delay(),
                restored: windows,
            }),
        };
        tracker.spawn(route::run(stage, event_rx, outbound_tx));
        // Under systemd (Type=notify): `WATCHDOG=1` while the stages turn, `STATUS=` lines.
        if watchdog::notify_socket_set() {
            let settings = watchdog::Settings::from_env(config.upstream.as_ref().map(|u| u.endpoint_list()));
            tracker.spawn(watchdog::run(watchdog, settings, metrics.clone(), cancel.clone()));
        }
        tracker.close();
        Ok(Gateway { metrics, cancel, tracker, shutdown_timeout: config.shutdown_timeout })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops ingest, lets every stage finish what it holds, closes the uplink. Returns `false`
    /// if that took longer than `shutdown_timeout` (committed events are safe either way).
    pub async fn shutdown(self) -> bool {
        info!(message = "stopping: ingest first, then flush the buffer, then close the uplink");
        self.cancel.cancel();
        let finished = tokio::time::timeout(self.shutdown_timeout, self.tracker.wait()).await.is_ok();
        if !finished {
            warn!(message = "shutdown timed out; exiting anyway", timeout = ?self.shutdown_timeout);
        }
        let counters: Vec<String> = self
            .metrics
            .counters()
            .snapshot()
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        info!(message = "stopped", counters = %counters.join(" "));
        finished
    }

    /// Runs until `stop` resolves, then shuts down.
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()>) -> bool {
        let metrics = self.metrics.clone();
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        ticker.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = ticker.tick() => {
                    let counters: Vec<String> = metrics.counters().snapshot().into_iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{k}={v}")).collect();
                    info!(message = "counters", counters = %counters.join(" "));
                }
            }
        }
        self.shutdown().await
    }
}
