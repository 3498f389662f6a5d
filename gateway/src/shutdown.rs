//! Turns SIGTERM (how systemd stops a service) and SIGINT (Ctrl-C) into one future.
//!
//! Invariant: [`signal`] never panics and never resolves without a signal. A handler that
//! cannot be installed is logged and its signal is not awaited; if neither can be, the future
//! stays pending (SIGKILL still stops the process).

use std::future::pending;

use tokio::signal::unix::{Signal, SignalKind, signal as install};
use tracing::{error, info};

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    let term = installed(install(SignalKind::terminate()), "SIGTERM");
    let int = installed(install(SignalKind::interrupt()), "SIGINT");
    let name = first(term, int).await;
    info!(message = "received signal", signal = name);
}

fn installed(handler: std::io::Result<Signal>, name: &'static str) -> Option<Signal> {
    match handler {
        Ok(handler) => Some(handler),
        Err(error) => {
            error!(message = "cannot install a signal handler; this signal will not stop the gateway gracefully (the other one, or SIGKILL, still stops it)", signal = name, %error);
            None
        }
    }
}

/// The name of whichever signal arrives first. A missing handler never fires, so every
/// `select!` branch stays enabled: with both missing this waits forever instead of panicking
/// (a `select!` whose branches are all disabled panics).
async fn first(mut term: Option<Signal>, mut int: Option<Signal>) -> &'static str {
    tokio::select! {
        () = arrival(term.as_mut()) => "SIGTERM",
        () = arrival(int.as_mut()) => "SIGINT",
    }
}

/// Resolves when `handler` receives its signal; never, without a handler.
async fn arrival(handler: Option<&mut Signal>) {
    // `recv` yields `None` only once the handler can receive nothing more.
    if let Some(handler) = handler {
        if handler.recv().await.is_some() {
            return;
        }
    }
    pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_any_handler_the_future_waits_instead_of_panicking() {
        let waited = tokio::select! {
            biased;
            name = first(None, None) => Some(name),
            () = std::future::ready(()) => None,
        };
        assert_eq!(waited, None);
    }
}
