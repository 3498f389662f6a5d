//! Turns SIGTERM (how systemd stops a service) and SIGINT (Ctrl-C) into one future.

use tracing::info;

/// Resolves on the first SIGTERM or SIGINT. If a handler cannot be installed, that signal is
/// simply not awaited (the other still works, and SIGKILL always does).
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let name = tokio::select! {
        Some(()) = async { term.as_mut()?.recv().await } => "SIGTERM",
        Some(()) = async { int.as_mut()?.recv().await } => "SIGINT",
    };
    info!(message = "received signal", signal = name);
}
