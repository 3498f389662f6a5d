//! Outpost: an IoT edge event gateway.
//!
//! Sensors publish to an embedded MQTT broker; Outpost routes their events and relays them to
//! an upstream broker through a durable store-and-forward buffer.
//!
//! # Layout
//! The pipeline is four stages, each one module and one task, joined by bounded channels:
//!
//! ```text
//! ingest ──Event──▶ route ──Outbound──▶ relay ──publish──▶ uplink ──▶ upstream broker
//!  (rumqttd link)    (bridge/rules)     │  ▲ (store thread: redb)  (rumqttc, per generation)
//!                                       └──┴── UplinkEvent (connected, pkid, ack, lost)
//! ```
//! - [`config`]: typed, validated configuration.
//! - [`event`]: the values passed between stages, and id generation.
//! - [`ingest`]: stage 1, the embedded broker and its drain link.
//! - [`route`]: stage 2, which events go upstream and how.
//! - [`relay`]: stage 3, store-and-forward: commit scheduling, send window, resend on reconnect.
//! - [`buffer`]: the redb file and the thread that owns it.
//! - [`uplink`]: stage 4, the upstream MQTT connection.
//! - [`admin`]: the admin socket that answers `outpost buffer …` while the daemon runs.
//! - [`metrics`]: counters.
//! - [`shutdown`]: signals to cancellation.
//! - [`telemetry`]: logging set-up.
//! - [`cli`]: the `outpost` command line (the binary only parses and calls in).

pub mod admin;
pub mod buffer;
pub mod cli;
pub mod config;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod relay;
pub mod route;
pub mod shutdown;
pub mod telemetry;
pub mod uplink;

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

/// Capacity of each channel between stages, in events.
pub const STAGE_CHANNEL_CAPACITY: usize = 1024;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Buffer(#[from] buffer::BufferError),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "a rules file was given ({0}), but the rule engine is not part of this build yet; remove `rules`/--rules to run as a transparent bridge"
    )]
    RulesUnsupported(std::path::PathBuf),
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
        if let Some(rules) = &config.rules {
            return Err(StartError::RulesUnsupported(rules.clone()));
        }
        let metrics = Metrics::default();
        let data_dir = config.data_dir.clone();
        let (store, report) = tokio::task::spawn_blocking(move || Store::open(&data_dir))
            .await
            .map_err(|e| StartError::Thread(std::io::Error::other(e)))??;
        if let Some((aside, reason)) = &report.moved_aside {
            Metrics::add(&metrics.counters().buffer_corrupt, 1);
            error!(
                message = "the buffer file could not be read and was moved aside; starting with an empty buffer. Events in the old file are not relayed: inspect it with `outpost buffer export --data-dir` after renaming it back, or delete it",
                moved_to = %aside.display(),
                reason = %reason
            );
        }
        let total = store.total();
        info!(message = "buffer opened", path = %store.path().display(), buffered_events = total.events, buffered_bytes = total.bytes, epoch = report.epoch);
        let lanes = store.lanes();
        let worker = Worker::spawn(store).map_err(StartError::Thread)?;

        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        if let Some(listener) = admin::bind(&config.data_dir) {
            tracker.spawn(admin::serve(listener, worker.commands.clone(), cancel.clone()));
        }
        let ids = IdGen::new(report.epoch);
        // Sequence numbers share the epoch scheme with event ids but count separately.
        let seqs = IdGen::new(report.epoch);

        let (event_tx, event_rx) = mpsc::channel(STAGE_CHANNEL_CAPACITY);
        let (outbound_tx, outbound_rx) = mpsc::channel(STAGE_CHANNEL_CAPACITY);
        let (uplink_tx, uplink_rx) = mpsc::channel(STAGE_CHANNEL_CAPACITY);
        let uplink_cancel = CancellationToken::new();

        let prefix = config.upstream.as_ref().map_or("", |u| u.topic_prefix.as_str());
        let bridge = route::Bridge::new(&config.routes, prefix);
        tracker.spawn(route::run(bridge, event_rx, outbound_tx, metrics.clone()));

        let settings =
            relay::RelaySettings::new(&config.buffer, config.upstream.as_ref(), config.shutdown_timeout / 2);
        let relay = relay::Relay::new(settings, metrics.clone(), seqs, lanes);
        tracker.spawn(relay::run(
            relay,
            outbound_rx,
            uplink_rx,
            worker,
            config.data_dir.clone(),
            uplink_cancel.clone(),
        ));

        match &config.upstream {
            Some(upstream) => {
                tracker.spawn(uplink::run(upstream.clone(), uplink_tx, metrics.clone(), uplink_cancel));
            }
            None => warn!(
                message = "no upstream configured: events are kept in the buffer until one is; set [upstream] url in the config or pass --upstream mqtt://host:port"
            ),
        }

        if let Err(e) =
            ingest::start(&config.broker, ids, event_tx, metrics.clone(), cancel.clone(), &tracker).await
        {
            cancel.cancel();
            return Err(e.into());
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
