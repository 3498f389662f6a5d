//! The admin socket, `<data_dir>/outpost.sock`: lets `outpost buffer stats|peek|export` read
//! the buffer while the daemon holds it (redb's writer lock keeps every other process out).
//!
//! Protocol: one request line (`stats`, `peek N`, `export`), answered with JSON lines, then the
//! daemon closes the connection. Requests go through the store thread's command queue, so an
//! operator's read never races a commit. The socket is created with the data dir's
//! permissions; anyone who can read the buffer file can ask.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::buffer::inspect::export_line;
use crate::buffer::worker::{Command, InspectRequest, Inspected};

/// Records per store-thread request while exporting, so a large export never holds the
/// store thread for long.
const EXPORT_CHUNK: usize = 1000;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("outpost.sock")
}

/// Binds the socket. A stale socket file from a crashed run is removed first: the buffer
/// file's lock, taken before this, proves no other daemon uses this data dir.
pub fn bind(data_dir: &Path) -> Option<UnixListener> {
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    match UnixListener::bind(&path) {
        Ok(listener) => Some(listener),
        Err(error) => {
            warn!(message = "cannot create the admin socket; `outpost buffer` commands will not work while the daemon runs", path = %path.display(), %error);
            None
        }
    }
}

pub async fn serve(listener: UnixListener, commands: mpsc::Sender<Command>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(message = "admin socket accept failed", %error);
                    continue;
                }
            },
        };
        // One request at a time: operator traffic is rare and must not compete with commits.
        if let Err(error) = handle(stream, &commands).await {
            debug!(message = "admin request failed", %error);
        }
    }
    if let Ok(addr) = listener.local_addr() {
        if let Some(path) = addr.as_pathname() {
            let _ = std::fs::remove_file(path);
        }
    }
    info!(message = "admin socket closed");
}

async fn ask(commands: &mpsc::Sender<Command>, request: InspectRequest) -> Result<Inspected, String> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Inspect { request, reply })
        .await
        .map_err(|_| "the store thread has stopped".to_owned())?;
    answer.await.map_err(|_| "the store thread has stopped".to_owned())?
}

async fn handle(stream: UnixStream, commands: &mpsc::Sender<Command>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(256)).read_line(&mut line).await?;
    let mut words = line.split_whitespace();
    let mut out = String::new();
    match (words.next(), words.next()) {
        (Some("stats"), None) => match ask(commands, InspectRequest::Stats).await {
            Ok(Inspected::Stats(stats)) => out = serde_json::to_string(&stats).unwrap_or_default() + "\n",
            Ok(_) => out = "error: unexpected answer\n".into(),
            Err(e) => out = format!("error: {e}\n"),
        },
        (Some(cmd @ ("peek" | "export")), n) => {
            let mut left = match (cmd, n.map(str::parse::<usize>)) {
                ("peek", Some(Ok(n))) => n,
                ("export", None) => usize::MAX,
                _ => {
                    write.write_all(b"error: expected `peek N` or `export`\n").await?;
                    return Ok(());
                }
            };
            let mut after = None;
            while left > 0 {
                let limit = left.min(EXPORT_CHUNK);
                let records = match ask(commands, InspectRequest::Records { after, limit }).await {
                    Ok(Inspected::Records(records)) => records,
                    Ok(_) => break,
                    Err(e) => {
                        write.write_all(format!("error: {e}\n").as_bytes()).await?;
                        return Ok(());
                    }
                };
                let Some(last) = records.last() else { break };
                after = Some(last.key());
                left -= records.len();
                let mut chunk = String::new();
                for record in &records {
                    chunk.push_str(&export_line(record));
                    chunk.push('\n');
                }
                write.write_all(chunk.as_bytes()).await?;
            }
        }
        _ => out = "error: expected `stats`, `peek N` or `export`\n".into(),
    }
    write.write_all(out.as_bytes()).await?;
    write.shutdown().await
}
