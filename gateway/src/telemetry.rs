//! Logging set-up: human-readable text on stderr by default, JSON lines on request.

use std::time::Duration;

use tokio::time::Instant;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
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
