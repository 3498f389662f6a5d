//! The store thread: the only place redb runs while the gateway is up.
//!
//! redb calls block (fsync), so they run on this dedicated thread and never on the async
//! runtime. The relay sends [`Command`]s and receives [`Reply`]s in the same order, which is
//! what makes "a read sent after a commit sees it" hold without any locking.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::file::{BufferError, Key, LogWrite, Record, StoredRetained};
use super::inspect::StatsReport;
use super::sessions::SessionBatch;
use super::store::{Applied, Batch, Store};
use crate::watchdog::Heartbeat;

pub enum Command {
    Apply(Batch),
    Read {
        priority: u8,
        from_seq: u64,
        limit: usize,
    },
    /// An operator's read-only question (admin socket); answered on its own channel.
    Inspect {
        request: InspectRequest,
        reply: oneshot::Sender<Result<Inspected, String>>,
    },
    /// An operator's import (admin socket); answered on its own channel with, for
    /// `AlreadyImported`, one flag per fingerprint (empty for `MarkImported`).
    Import {
        request: ImportRequest,
        reply: oneshot::Sender<Result<Vec<bool>, String>>,
    },
    /// The broker's retained writes (`None` clears a topic), committed in one durable
    /// transaction before the reply; applied in the order the broker sent them.
    Retain {
        writes: Vec<(String, Option<StoredRetained>)>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The broker's persistent-session changes, committed in one durable transaction before
    /// the reply (see [`super::sessions`]).
    Sessions {
        batch: SessionBatch,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The route stage's checkpoint of its stateful rules: writes to its log (a full
    /// snapshot, deltas, or clearing it), applied in order and committed in one durable
    /// transaction before the reply (`buffer::windows`).
    Checkpoint {
        writes: Vec<LogWrite>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// `outpost buffer import` through the daemon: which events were imported before, and
/// remembering the ones the relay has made safe.
#[derive(Debug)]
pub enum ImportRequest {
    AlreadyImported(Vec<(u64, u64)>),
    MarkImported(Vec<(u64, u64)>),
}

#[derive(Debug, Clone, Copy)]
pub enum InspectRequest {
    Stats,
    Records { after: Option<Key>, limit: usize },
}

#[derive(Debug)]
pub enum Inspected {
    Stats(StatsReport),
    Records(Vec<Record>),
}

pub enum Reply {
    /// The batch comes back on failure so the relay can retry it.
    Applied {
        result: Result<Applied, (BufferError, Batch)>,
        took: Duration,
        inserted: usize,
    },
    Read {
        priority: u8,
        from_seq: u64,
        result: Result<Vec<Record>, BufferError>,
    },
}

/// Handle to the store thread. Dropping the command sender stops the thread after it has
/// finished what was queued.
pub struct Worker {
    pub commands: mpsc::Sender<Command>,
    pub replies: mpsc::Receiver<Reply>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Fault injection for tests and demos: `OUTPOST_FAULT_COMMIT_DELAY_MS` makes every commit
/// take that much longer, as a slow or worn flash card would. Logged loudly when set.
fn fault_commit_delay() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var("OUTPOST_FAULT_COMMIT_DELAY_MS").ok()?.parse().ok()?;
    tracing::warn!(
        message = "fault injection: every buffer commit is delayed (OUTPOST_FAULT_COMMIT_DELAY_MS); unset it outside tests",
        delay_ms = ms
    );
    Some(std::time::Duration::from_millis(ms))
}

impl Worker {
    /// Starts the store thread. It reports a turn per command on `heartbeat` (the watchdog):
    /// busy from taking a command until its reply is ready, idle while it waits for the next
    /// command or for room in the reply queue (the relay's to empty).
    pub fn spawn(store: Store, heartbeat: Heartbeat) -> std::io::Result<Worker> {
        // Two commands can be outstanding at once (one commit, one read); a little slack
        // keeps the relay from ever waiting on the channel itself.
        let (commands, mut rx) = mpsc::channel::<Command>(8);
        let (tx, replies) = mpsc::channel::<Reply>(8);
        let slow_commits = fault_commit_delay();
        let thread = std::thread::Builder::new().name("outpost-store".into()).spawn(move || {
            let mut store = store;
            while let Some(command) = rx.blocking_recv() {
                heartbeat.begin();
                if heartbeat.wedged() {
                    wedge(&rx);
                }
                let reply = execute(&mut store, command, slow_commits);
                heartbeat.end();
                if let Some(reply) = reply {
                    if tx.blocking_send(reply).is_err() {
                        break;
                    }
                }
            }
            // Close the file before the thread ends, so joining the thread means the file is
            // closed and its lock released.
            drop(store);
        })?;
        Ok(Worker { commands, replies, thread: Some(thread) })
    }

    /// Stops the thread once it has finished what was queued; when this returns, the file is
    /// closed. Blocks: call it from a blocking context.
    pub fn join(mut self) {
        drop(self.commands);
        drop(self.replies);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs one command; `Some` is the reply for the relay's queue (operators' commands answer
/// on their own channel).
fn execute(store: &mut Store, command: Command, slow_commits: Option<Duration>) -> Option<Reply> {
    match command {
        Command::Apply(batch) => {
            let started = Instant::now();
            if let Some(delay) = slow_commits {
                std::thread::sleep(delay);
            }
            let inserted = batch.inserts.len();
            let result = store.apply(&batch).map_err(|e| (e, batch));
            if result.is_ok() {
                compact(store);
            }
            Some(Reply::Applied { result, took: started.elapsed(), inserted })
        }
        Command::Inspect { request, reply } => {
            let answer = match request {
                InspectRequest::Stats => store.inspect_stats().map(Inspected::Stats),
                InspectRequest::Records { after, limit } => {
                    store.inspect_records(after, limit).map(Inspected::Records)
                }
            };
            let _ = reply.send(answer.map_err(|e| e.to_string()));
            None
        }
        Command::Import { request, reply } => {
            let answer = match request {
                ImportRequest::AlreadyImported(prints) => store.already_imported(&prints),
                ImportRequest::MarkImported(prints) => store.mark_imported(&prints).map(|()| Vec::new()),
            };
            let _ = reply.send(answer.map_err(|e| e.to_string()));
            None
        }
        Command::Retain { writes, reply } => {
            let _ = reply.send(store.apply_retained(&writes).map_err(|e| e.to_string()));
            None
        }
        Command::Sessions { batch, reply } => {
            let _ = reply.send(store.apply_sessions(&batch).map_err(|e| e.to_string()));
            None
        }
        Command::Checkpoint { writes, reply } => {
            if let Some(delay) = slow_commits {
                std::thread::sleep(delay);
            }
            let _ = reply.send(store.save_windows(&writes).map_err(|e| e.to_string()));
            None
        }
        Command::Read { priority, from_seq, limit } => {
            Some(Reply::Read { priority, from_seq, result: store.read(priority, from_seq, limit) })
        }
    }
}

/// Fault injection (`OUTPOST_FAULT_WEDGE=store`): holds the command in hand, as a hung disk
/// would, until the relay lets go of the thread at shutdown.
fn wedge(rx: &mpsc::Receiver<Command>) {
    while !rx.is_closed() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn compact(store: &mut Store) {
    let before = store.file_bytes();
    match store.compact_if_drained() {
        Ok(true) => info!(
            message = "buffer drained; compacted the file to return disk space",
            bytes_before = before,
            bytes_after = store.file_bytes()
        ),
        Ok(false) => {}
        Err(error) => {
            warn!(message = "compacting the drained buffer failed; will retry after the next drain", %error)
        }
    }
}
