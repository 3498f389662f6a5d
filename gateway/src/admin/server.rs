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
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Attached, DaemonBacklog, DaemonStatus, DaemonUpstream, ERROR_PREFIX, Request, TapRequest, WireRecord,
    socket_path,
};
use crate::ack::{AckQueue, Outcome};
use crate::buffer::Record;
use crate::buffer::import::{CHUNK as IMPORT_CHUNK, ImportSummary};
use crate::buffer::inspect::export_line;
use crate::buffer::worker::{Command, ImportRequest, InspectRequest, Inspected};
use crate::event::Outbound;
use crate::metrics::Metrics;
use crate::mqtt::topic::TopicFilter;
use crate::tap::{Tap, TapRecord, TapStage, VIEWER_QUEUE, What};

/// Records per store-thread request while exporting, so a large export never holds the
/// store thread for long.
const EXPORT_CHUNK: usize = 1000;
/// Longest import line accepted: a record with the largest MQTT payload (256 MiB) in hex.
const MAX_IMPORT_LINE: u64 = 600 * 1024 * 1024;
/// Longest request line (a tap's filters included).
const MAX_REQUEST_LINE: u64 = 8 * 1024;
/// Requests served at once. Beyond it a connection is answered "busy" and closed, so a
/// client that connects and never speaks cannot lock operators out.
const CONCURRENT_REQUESTS: usize = 4;
/// How long a connection may take to send its request line.
const REQUEST_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Event ids a tap with filters follows from ingest and the rules to the relay.
const FOLLOWED: usize = 16 * 1024;

/// What the admin socket needs from the running gateway.
pub struct Handles {
    /// The store thread's queue.
    pub commands: mpsc::Sender<Command>,
    /// The relay's input, for imported events.
    pub relay_input: mpsc::Sender<Outbound>,
    pub metrics: Metrics,
    /// The hub `outpost tap`'s viewers attach to.
    pub tap: Tap,
    /// A tap lasts as long as its viewer watches: it runs as a task of its own.
    pub tracker: tokio_util::task::TaskTracker,
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
    let tracker = handles.tracker.clone();
    let handles = Arc::new(handles);
    let slots = Arc::new(Semaphore::new(CONCURRENT_REQUESTS));
    // Two imports of the same file at once would both find its events new.
    let import_turn = Arc::new(Mutex::new(()));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // A short line fits any socket buffer: this never waits on the client.
            let busy = format!(
                "{ERROR_PREFIX}the gateway is serving {CONCURRENT_REQUESTS} admin requests; try again\n"
            );
            let _ = stream.try_write(busy.as_bytes());
            continue;
        };
        let (handles, cancel, import_turn) = (handles.clone(), cancel.clone(), import_turn.clone());
        tracker.spawn(async move {
            if let Err(error) = handle(stream, &handles, &import_turn, &cancel).await {
                debug!(message = "admin request failed", %error);
            }
            drop(slot);
        });
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

async fn handle(
    stream: UnixStream,
    handles: &Handles,
    import_turn: &Mutex<()>,
    cancel: &CancellationToken,
) -> std::io::Result<()> {
    let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let mut limited = (&mut reader).take(MAX_REQUEST_LINE);
    let request = limited.read_line(&mut line);
    let read = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        read = tokio::time::timeout(REQUEST_LINE_TIMEOUT, request) => read,
    };
    let Ok(read) = read else {
        let late = format!(
            "{ERROR_PREFIX}no request line within {} s; send one line such as `stats`\n",
            REQUEST_LINE_TIMEOUT.as_secs()
        );
        write.write_all(late.as_bytes()).await?;
        return write.shutdown().await;
    };
    read?;
    let answer = match Request::parse(&line) {
        Ok(Request::Tap(request)) => {
            handles.tracker.spawn(tap(reader, write, request, handles.tap.clone(), cancel.clone()));
            return Ok(());
        }
        Ok(Request::Status) => {
            status(handles).await.map(|s| serde_json::to_string(&s).unwrap_or_default() + "\n")
        }
        Ok(Request::Import) => match import(&mut reader, peer_uid, handles, import_turn, cancel).await {
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
    import_turn: &Mutex<()>,
    cancel: &CancellationToken,
) -> Result<ImportSummary, String> {
    let me = crate::buffer::access::running_as().map(|id| id.uid);
    if !peer_uid.is_some_and(|uid| uid == 0 || Some(uid) == me) {
        return Err(format!(
            "only root or the gateway's own user ({}) may import; run the command as one of them",
            me.map_or("unknown".to_owned(), crate::buffer::access::user_label)
        ));
    }
    let _turn = tokio::select! {
        turn = import_turn.lock() => turn,
        () = cancel.cancelled() => return Err(STOPPING.to_owned()),
    };
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
            props: record.props,
            dead_letter_if_refused: false,
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

/// `status`: the counters, gauges and the store's statistics.
async fn status(handles: &Handles) -> Result<DaemonStatus, String> {
    let committed = match ask(&handles.commands, InspectRequest::Stats).await {
        Ok(Inspected::Stats(stats)) => Some(stats),
        _ => None,
    };
    let metrics = &handles.metrics;
    let counters = metrics.counters();
    Ok(DaemonStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        upstream: DaemonUpstream {
            connected: Metrics::get(&metrics.gauges().upstream_connected) == 1,
            connects: Metrics::get(&counters.upstream_connects),
            failures: Metrics::get(&counters.upstream_failures),
        },
        backlog: DaemonBacklog { events: Metrics::get(&metrics.gauges().buffered_events), committed },
        sensors_connected: Metrics::get(&metrics.gauges().sensors_connected),
        counters: counters
            .snapshot()
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    })
}

/// Which tap records a viewer is shown (see [`TapRequest`]). With a topic filter, a rule or
/// sampling, an event is picked where its topic is known (ingest, the rules) and its id is
/// then followed to the relay, whose records carry the upstream topic.
struct Follow {
    topic: Option<TopicFilter>,
    rule: Option<String>,
    sample: u64,
    followed: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Follow {
    fn new(request: &TapRequest) -> Result<Follow, String> {
        let topic = match &request.topic {
            Some(filter) => {
                Some(TopicFilter::new(filter.as_str()).map_err(|e| format!("--topic {filter:?}: {e}"))?)
            }
            None => None,
        };
        Ok(Follow {
            topic,
            rule: request.rule.clone(),
            sample: request.sample.unwrap_or(1).max(1),
            followed: Default::default(),
            order: Default::default(),
        })
    }

    fn filtered(&self) -> bool {
        self.topic.is_some() || self.rule.is_some() || self.sample > 1
    }

    fn picked(&self, record: &TapRecord) -> bool {
        let sampled = u64::from_str_radix(&record.event_id, 16).ok().is_none_or(|id| id % self.sample == 0);
        sampled && self.topic.as_ref().is_none_or(|f| f.matches(record.topic()))
    }

    fn follow(&mut self, event_id: &str) {
        if self.followed.insert(event_id.to_owned()) {
            self.order.push_back(event_id.to_owned());
            if self.order.len() > FOLLOWED {
                if let Some(oldest) = self.order.pop_front() {
                    self.followed.remove(&oldest);
                }
            }
        }
    }

    fn pass(&mut self, record: &TapRecord) -> bool {
        if !self.filtered() {
            return true;
        }
        let followed = self.followed.contains(&record.event_id);
        match &record.what {
            What::Ingest { .. } => {
                let pass = self.rule.is_none() && self.picked(record);
                if pass {
                    self.follow(&record.event_id);
                }
                pass
            }
            What::Rules { rule, .. } => {
                if self.rule.is_some() && rule != &self.rule {
                    return false;
                }
                let pass = followed || self.picked(record);
                if pass {
                    self.follow(&record.event_id);
                }
                pass
            }
            What::Relay { .. } => followed || (self.rule.is_none() && self.picked(record)),
        }
    }
}

/// One `outpost tap`: attaches a viewer, writes what passes its filters, and what it missed,
/// until the operator goes away or the gateway stops.
async fn tap(
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: OwnedWriteHalf,
    request: TapRequest,
    hub: Tap,
    cancel: CancellationToken,
) {
    let stages: Vec<TapStage> = match (request.stage, &request.rule) {
        (Some(stage), _) => vec![stage],
        // A rule's verdict comes after ingest: only what follows it can be attributed to it.
        (None, Some(_)) => vec![TapStage::Rules, TapStage::Relay],
        (None, None) => vec![TapStage::Ingest, TapStage::Rules, TapStage::Relay],
    };
    let refused = |e: String| format!("{ERROR_PREFIX}{e}\n");
    let mut follow = match Follow::new(&request) {
        Ok(follow) => follow,
        Err(e) => {
            let _ = write.write_all(refused(e).as_bytes()).await;
            return;
        }
    };
    let bits = stages.iter().fold(0, |acc, s| acc | s.bit());
    let Some(mut viewer) = hub.attach(bits, VIEWER_QUEUE) else {
        let full = format!(
            "{} taps are attached already, the most the gateway serves; stop one and try again",
            crate::tap::MAX_VIEWERS
        );
        let _ = write.write_all(refused(full).as_bytes()).await;
        return;
    };
    info!(message = "tap attached", stages = ?stages);
    let hello = serde_json::to_string(&Attached { attached: stages }).unwrap_or_default() + "\n";
    if write.write_all(hello.as_bytes()).await.is_err() {
        return;
    }
    let mut shown_missed = 0;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut gone = [0u8; 64];
    loop {
        let mut out = String::new();
        tokio::select! {
            () = cancel.cancelled() => break,
            read = reader.read(&mut gone) => {
                // The operator closed the tap (or wrote something, which ends it too).
                let _ = read;
                break;
            }
            record = viewer.records.recv() => {
                let Some(record) = record else { break };
                if follow.pass(&record) {
                    out = serde_json::to_string(&record).unwrap_or_default() + "\n";
                }
                // Whatever else is queued, in one write.
                while out.len() < 64 * 1024 {
                    let Ok(record) = viewer.records.try_recv() else { break };
                    if follow.pass(&record) {
                        out += &(serde_json::to_string(&record).unwrap_or_default() + "\n");
                    }
                }
            }
            _ = tick.tick() => {}
        }
        let missed = viewer.missed();
        if missed > shown_missed {
            out += &format!("{{\"missed\":{}}}\n", missed - shown_missed);
            shown_missed = missed;
        }
        if out.is_empty() {
            continue;
        }
        // A slow reader holds up only this task; the stages meanwhile fill its queue, and
        // what does not fit is counted as missed.
        let written = tokio::select! {
            () = cancel.cancelled() => break,
            written = write.write_all(out.as_bytes()) => written,
        };
        if written.is_err() {
            break;
        }
    }
    info!(message = "tap detached", missed = viewer.missed());
}
