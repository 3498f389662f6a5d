//! The service manager's end of `sd_notify`: a Unix datagram socket the test creates and names
//! in the gateway's `NOTIFY_SOCKET`, recording every notification (`READY=1`, `WATCHDOG=1`,
//! `STATUS=…`) with the time it arrived, as systemd would receive them.
//!
//! # Invariants
//! - The socket lives in its own `TempDir`, removed with the value; the reader task is aborted
//!   on drop.
//! - Every datagram is kept, one entry per line it holds (a datagram may carry several
//!   assignments), in arrival order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;
use tokio::net::UnixDatagram;
use tokio::time::Instant;

/// One assignment received, e.g. `WATCHDOG=1`, and when.
#[derive(Debug, Clone)]
pub struct Notification {
    pub at: Instant,
    pub line: String,
}

type Received = Arc<Mutex<Vec<Notification>>>;

/// A notify socket and what arrived on it.
pub struct NotifySocket {
    path: PathBuf,
    received: Received,
    reader: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl NotifySocket {
    /// Binds a fresh socket and starts recording. Call from inside a tokio runtime.
    pub fn bind() -> anyhow::Result<NotifySocket> {
        let dir = tempfile::tempdir().context("cannot create a directory for the notify socket")?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path)
            .with_context(|| format!("cannot bind the notify socket {}", path.display()))?;
        let received: Received = Arc::default();
        let sink = Arc::clone(&received);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
                sink.extend(
                    text.lines()
                        .filter(|l| !l.is_empty())
                        .map(|line| Notification { at, line: line.to_owned() }),
                );
            }
        });
        Ok(NotifySocket { path, received, reader, _dir: dir })
    }

    /// What to put in the gateway's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<Notification> {
        self.received.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The notifications so far that start with `prefix`.
    pub fn matching(&self, prefix: &str) -> Vec<Notification> {
        self.all().into_iter().filter(|n| n.line.starts_with(prefix)).collect()
    }

    /// Waits until `condition` holds for everything received so far.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&[Notification]) -> bool,
    ) -> anyhow::Result<()> {
        crate::wait_until(what, timeout, || condition(&self.all())).await.with_context(|| {
            let tail: Vec<String> = self.all().iter().rev().take(10).map(|n| n.line.clone()).collect();
            format!("the last notifications, newest first: {tail:?}")
        })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
