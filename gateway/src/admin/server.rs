//! The daemon's end of the admin socket (protocol: [`super`]).
//!
//! Reads go through the store thread's command queue, so an operator's read never races a
//! commit. The socket is created with the data dir's permissions; anyone who can read the
//! buffer file can ask. Only root and the daemon's own user may import (checked with the
//! peer's credentials): it adds events that go upstream. Imported events enter the relay's
//! input as if just routed, each with a ticket, so the relay commits or relays them under its
//! usual invariants; their fingerprints are stored (store thread) once every ticket of a chunk
//! is released.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{ERROR_PREFIX, Request, WireRecord, socket_path};
use crate::ack::{AckQueue, Outcome};
use crate::buffer::Record;
use crate::buffer::import::{CHUNK as IMPORT_CHUNK, ImportSummary};
use crate::buffer::inspect::export_line;
use crate::buffer::worker::{Command, ImportRequest, InspectRequest, Inspected};
use crate::event::Outbound;
use crate::metrics::Metrics;

/// Records per store-thread request while exporting, so a large export never holds the
/// store thread for long.
const EXPORT_CHUNK: usize = 1000;
/// Longest import line accepted: a record with the largest MQTT payload (256 MiB) in hex.
const MAX_IMPORT_LINE: u64 = 600 * 1024 * 1024;

/// What the admin socket needs from the running gateway.
pub struct Handles {
    /// The store thread's queue.
    pub commands: mpsc::Sender<Command>,
    /// The relay's input, for imported events.
    pub relay_input: mpsc::Sender<Outbound>,
    pub metrics: Metrics,
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

pub async fn serve(listener: UnixListener, handles: Handles, cancel: CancellationToken) {
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
        if let Err(error) = handle(stream, &handles, &cancel).await {
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

/// Sends the command `make` builds around a reply channel to the store thread, and awaits
/// the answer.
async fn ask_store<T>(
    commands: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
) -> Result<T, String> {
    let (reply, answer) = oneshot::channel();
    commands.send(make(reply)).await.map_err(|_| "the store thread has stopped".to_owned())?;
    answer.await.map_err(|_| "the store thread has stopped".to_owned())?
}

async fn ask(commands: &mpsc::Sender<Command>, request: InspectRequest) -> Result<Inspected, String> {
    ask_store(commands, |reply| Command::Inspect { request, reply }).await
}

async fn handle(stream: UnixStream, handles: &Handles, cancel: &CancellationToken) -> std::io::Result<()> {
    let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    (&mut reader).take(256).read_line(&mut line).await?;
    let answer = match Request::parse(&line) {
        Ok(Request::Import) => match import(&mut reader, peer_uid, handles, cancel).await {
            Ok(summary) => Ok(serde_json::to_string(&summary).unwrap_or_default() + "\n"),
            Err(e) => Err(e),
        },
        Ok(Request::Stats) => match ask(&handles.commands, InspectRequest::Stats).await {
            Ok(Inspected::Stats(stats)) => Ok(serde_json::to_string(&stats).unwrap_or_default() + "\n"),
            Ok(_) => Err("unexpected answer".to_owned()),
            Err(e) => Err(e),
        },
        Ok(Request::Peek(n)) => records(&mut write, &handles.commands, n).await?,
        Ok(Request::Export) => records(&mut write, &handles.commands, usize::MAX).await?,
        Err(expected) => Err(expected.to_owned()),
    };
    let out = answer.unwrap_or_else(|e| format!("{ERROR_PREFIX}{e}\n"));
    write.write_all(out.as_bytes()).await?;
    write.shutdown().await
}

/// Writes up to `limit` records as JSON lines, a chunk per store-thread request. Returns what
/// is left to answer: nothing, or the error that cut the records short.
async fn records(
    write: &mut OwnedWriteHalf,
    commands: &mpsc::Sender<Command>,
    limit: usize,
) -> std::io::Result<Result<String, String>> {
    let mut left = limit;
    let mut after = None;
    while left > 0 {
        let limit = left.min(EXPORT_CHUNK);
        let records = match ask(commands, InspectRequest::Records { after, limit }).await {
            Ok(Inspected::Records(records)) => records,
            Ok(_) => break,
            Err(e) => return Ok(Err(e)),
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
    Ok(Ok(String::new()))
}

async fn ask_import(commands: &mpsc::Sender<Command>, request: ImportRequest) -> Result<Vec<bool>, String> {
    ask_store(commands, |reply| Command::Import { request, reply }).await
}

const STOPPING: &str =
    "the gateway is stopping; run the import again once it runs (events already imported are skipped)";

/// Reads an import's records in chunks and merges each (see the module docs).
async fn import(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    peer_uid: Option<u32>,
    handles: &Handles,
    cancel: &CancellationToken,
) -> Result<ImportSummary, String> {
    let me = crate::buffer::access::running_as().map(|id| id.uid);
    if !peer_uid.is_some_and(|uid| uid == 0 || Some(uid) == me) {
        return Err(format!(
            "only root or the gateway's own user ({}) may import; run the command as one of them",
            me.map_or("unknown".to_owned(), crate::buffer::access::user_label)
        ));
    }
    let mut summary = ImportSummary::default();
    let mut line = String::new();
    let mut line_no = 1;
    loop {
        let mut records = Vec::new();
        let mut end = false;
        while records.len() < IMPORT_CHUNK {
            line.clear();
            let mut limited = (&mut *reader).take(MAX_IMPORT_LINE);
            let read = tokio::select! {
                read = limited.read_line(&mut line) => read.map_err(|e| e.to_string())?,
                () = cancel.cancelled() => return Err(STOPPING.to_owned()),
            };
            if read == 0 {
                end = true;
                break;
            }
            line_no += 1;
            let wire: WireRecord =
                serde_json::from_str(line.trim()).map_err(|e| format!("import line {line_no}: {e}"))?;
            records.push(wire.into_record().map_err(|e| format!("import line {line_no}: {e}"))?);
        }
        if !records.is_empty() {
            import_chunk(records, handles, cancel, &mut summary).await?;
        }
        if end {
            break;
        }
    }
    info!(
        message = "events imported into the buffer (outpost buffer import)",
        imported = summary.imported,
        already_imported = summary.already_imported,
        refused = summary.refused
    );
    Ok(summary)
}

async fn import_chunk(
    records: Vec<Record>,
    handles: &Handles,
    cancel: &CancellationToken,
    summary: &mut ImportSummary,
) -> Result<(), String> {
    let prints: Vec<(u64, u64)> = records.iter().map(Record::fingerprint).collect();
    let seen = ask_import(&handles.commands, ImportRequest::AlreadyImported(prints.clone())).await?;
    let queue = AckQueue::new();
    let mut sent = Vec::new();
    for ((record, print), seen) in records.into_iter().zip(prints).zip(seen) {
        if seen {
            summary.already_imported += 1;
            continue;
        }
        let outbound = Outbound {
            event_id: record.event_id,
            topic: record.topic,
            payload: record.payload,
            qos: record.qos,
            priority: record.priority,
            expires_ms: record.expires_ms,
            received_ms: record.enqueued_ms,
            ticket: Some(queue.ticket()),
        };
        tokio::select! {
            sent = handles.relay_input.send(outbound) => sent.map_err(|_| STOPPING.to_owned())?,
            () = cancel.cancelled() => return Err(STOPPING.to_owned()),
        }
        sent.push(print);
    }
    // Each ticket is released once the relay committed its event or the upstream acked it.
    let mut outcomes = Vec::with_capacity(sent.len());
    loop {
        queue.take_ready(&mut outcomes);
        if outcomes.len() >= sent.len() {
            break;
        }
        tokio::select! {
            () = queue.ready() => {}
            () = cancel.cancelled() => return Err(STOPPING.to_owned()),
        }
    }
    let safe: Vec<(u64, u64)> =
        sent.iter().zip(&outcomes).filter(|(_, o)| **o == Outcome::Safe).map(|(p, _)| *p).collect();
    summary.refused += (sent.len() - safe.len()) as u64;
    summary.imported += safe.len() as u64;
    Metrics::add(&handles.metrics.counters().buffer_imported, safe.len() as u64);
    ask_import(&handles.commands, ImportRequest::MarkImported(safe)).await?;
    Ok(())
}
