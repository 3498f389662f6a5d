//! Logging set-up: human-readable text on stderr by default, JSON lines on request.
//!
//! rumqttd 0.20.0 logs every ordinary client disconnect at ERROR level. Those events are recognised by their source line (the version is
//! pinned) and dropped, so an ERROR in Outpost's log always means something needs attention.
//! Listener failures from the same file are kept.

use tracing::Metadata;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Source lines in rumqttd 0.20.0 that report an ordinary client going away at ERROR level:
/// in `server/broker.rs` connect-packet errors, link errors, "connection-stop", "router-drop",
/// "disconnected"; in `router/routing.rs` "no-connection id … is already gone" and
/// "Connection is already disconnected".
const RUMQTTD_DISCONNECT_NOISE: [(&str, &[u32]); 2] = [
    ("rumqttd::server::broker", &[512, 566, 577, 581, 592]),
    ("rumqttd::router::routing", &[416, 436, 539, 1006]),
];

fn is_disconnect_noise(meta: &Metadata<'_>) -> bool {
    RUMQTTD_DISCONNECT_NOISE
        .iter()
        .any(|(target, lines)| meta.target() == *target && meta.line().is_some_and(|l| lines.contains(&l)))
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`. rumqttd's own
/// chatter is capped at WARN unless the filter names it.
pub fn init(format: LogFormat, level: &str) {
    let default = format!("{level},rumqttd=warn");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let noise = filter_fn(|meta| !is_disconnect_noise(meta));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(noise))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr)
                    .with_filter(noise),
            )
            .try_init(),
    };
    // A subscriber is already installed (tests): keep it.
    drop(result);
}
