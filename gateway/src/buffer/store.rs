//! The redb file behind the buffer: synchronous, single-owner, one fsync per [`Batch`].
//!
//! Only the store thread ([`super::worker`]) and offline CLI commands touch a [`Store`]; the
//! async pipeline never calls into redb directly.

use std::path::{Path, PathBuf};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::Serialize;

use super::chunk::{self, Counted, Editor};
pub use super::file::file_path;
use super::file::{
    BufferError, EVENTS, IMPORTED, Key, META, N_PRIORITIES, RETAINED, Record, StoredRetained,
    WINDOW_FULL_TAG, WINDOW_LOG, WINDOWS, db_err, meta_key, window_row,
};
use super::inspect::{self, StatsReport};

/// The buffer file's format, kept in `meta` as `format_version`. 1: no such key (releases up
/// to commit 568ebea); 2: the key and the `imported` table; 3: the `retained` table; 4: packed
/// rows ([`super::chunk`]) and the `rows` counter; 5: the `sessions` and `session_queue`
/// tables ([`super::sessions`]); 6: the `windows` table ([`super::windows`]); 7: events
/// may carry MQTT 5 properties in their packed row (a flag bit that 6 did not know: a
/// release that reads 6 would take such a row for corrupt, so it must refuse the file); 8:
/// packed rows with a new tag whose topics are differences from the previous event's; 9: the
/// `window_log` table replaces `windows` ([`super::windows`]); 10: payloads too may be
/// differences from the previous event's (a flag bit 8 and 9 did not know); 11: a window
/// checkpoint may span several `window_log` rows (a row tag 9 and 10 did not know). A file
/// with a higher version was written by a newer release and is refused untouched.
pub const FORMAT_VERSION: u64 = 11;
const FORMAT_KEY: &str = "format_version";
/// Rows in `events`, kept with the records: since format 4 a row holds many events, so this,
/// not the event counters, is what the table's length proves at start.
const ROWS_KEY: &str = "rows";

/// A drained file larger than this is compacted so the disk space comes back.
const COMPACT_ABOVE_BYTES: u64 = 8 * 1024 * 1024;

/// Events and bytes stored for one priority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LaneStats {
    pub events: u64,
    pub bytes: u64,
}

/// Oldest-first removal: drop records until at least this many events and bytes are gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropRequest {
    pub events: u64,
    pub bytes: u64,
}

/// Everything one transaction does.
#[derive(Debug, Default)]
pub struct Batch {
    pub inserts: Vec<Record>,
    /// Keys acknowledged upstream; a key that is no longer stored is ignored.
    pub deletes: Vec<Key>,
    /// Overflow: drop the oldest records of the least urgent priority first.
    pub drop_oldest: DropRequest,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.deletes.is_empty() && self.drop_oldest == DropRequest::default()
    }
}

/// What a transaction did beyond its inserts and deletes.
#[derive(Debug, Default)]
pub struct Applied {
    /// Keys removed by the drop request.
    pub dropped: Vec<Key>,
    pub lanes: [LaneStats; N_PRIORITIES],
}

/// What happened when the file was opened.
#[derive(Debug)]
pub struct OpenReport {
    /// Set when the existing file's contents were corrupt and it was renamed to this path.
    pub moved_aside: Option<(PathBuf, String)>,
    pub epoch: u64,
    /// The format version the file had, when it was older and has been migrated.
    pub migrated_from: Option<u64>,
}

/// redb's page cache. Its default is 1 GiB: the gateway's memory then grew with the file
/// (measured: +52 MiB RSS for a 71 MB backlog, kept after the file was compacted). The relay
/// reads and writes sequentially per priority, so a small cache costs little.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The open buffer file.
pub struct Store {
    /// `None` after an I/O error: redb refuses all work with `PreviousIo` until the file is
    /// closed and reopened, so the next operation reopens it (see [`Store::database`]).
    db: Option<Database>,
    path: PathBuf,
    lanes: [LaneStats; N_PRIORITIES],
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("lanes", &self.lanes).finish()
    }
}

/// Writes the counters of the lanes that changed, inside the caller's transaction.
fn write_counters(
    meta: &mut redb::Table<&str, u64>,
    before: &[LaneStats; N_PRIORITIES],
    after: &[LaneStats; N_PRIORITIES],
    path: &Path,
) -> Result<(), BufferError> {
    for (p, lane) in after.iter().enumerate() {
        if lane != &before[p] {
            meta.insert(meta_key("events", p).as_str(), lane.events).map_err(|e| db_err(path, e))?;
            meta.insert(meta_key("bytes", p).as_str(), lane.bytes).map_err(|e| db_err(path, e))?;
        }
    }
    Ok(())
}

/// Applies what an [`Editor`] flush changed to the lane counters and the row count.
fn count(lanes: &mut [LaneStats; N_PRIORITIES], rows: &mut u64, counted: &Counted) {
    for &(p, events, bytes, events_before, bytes_before) in &counted.lanes {
        let lane = &mut lanes[usize::from(p)];
        lane.events = (lane.events + events).saturating_sub(events_before);
        lane.bytes = (lane.bytes + bytes).saturating_sub(bytes_before);
    }
    *rows = rows.saturating_add_signed(counted.rows);
}

fn read_rows(meta: &impl ReadableTable<&'static str, u64>, path: &Path) -> Result<u64, BufferError> {
    Ok(meta.get(ROWS_KEY).map_err(|e| db_err(path, e))?.map_or(0, |v| v.value()))
}

/// Older than 9: the `windows` table's one snapshot (formats 6–8) becomes the first, full
/// row of `window_log`, and `windows` goes, inside the start-up transaction. A file from
/// before 6 has an empty `windows` table by now (opened above), so it gains an empty log.
fn migrate_windows_to_log(txn: &redb::WriteTransaction, path: &Path) -> Result<(), BufferError> {
    let mut log = txn.open_table(WINDOW_LOG).map_err(|e| db_err(path, e))?;
    {
        let old = txn.open_table(WINDOWS).map_err(|e| db_err(path, e))?;
        if let Some(state) = old.get("state").map_err(|e| db_err(path, e))? {
            let row = window_row(WINDOW_FULL_TAG, state.value());
            log.insert(0, row.as_slice()).map_err(|e| db_err(path, e))?;
        }
    }
    txn.delete_table(WINDOWS).map_err(|e| db_err(path, e))?;
    Ok(())
}

/// What [`Store::load_retained`] found.
#[derive(Debug, Default)]
pub struct RetainedLoad {
    pub messages: Vec<(String, StoredRetained)>,
    /// Removed: their message expiry passed while the gateway was down.
    pub expired: usize,
    /// Removed: their stored value does not decode.
    pub undecodable: usize,
    /// Kept in the file but not loaded: over `broker.max_retained` or `max_retained_bytes`.
    pub not_loaded: usize,
}

/// The sequence numbers of one offline import (see [`Store::import`]).
#[derive(Debug, Default)]
pub struct ImportSeqs {
    next: Option<u64>,
}

impl Store {
    /// Opens (or creates) the buffer in `data_dir` and starts a new boot epoch.
    ///
    /// A file whose contents are proven corrupt ([`BufferError::proves_corruption`]) is
    /// renamed to `buffer.redb.corrupt-<unix seconds>` and replaced by an empty one. Every
    /// other failure — locked by another process, permissions, a read-only or full file
    /// system, a format newer than this build — is an error and leaves the file untouched.
    pub fn open(data_dir: &Path) -> Result<(Store, OpenReport), BufferError> {
        std::fs::create_dir_all(data_dir).map_err(|error| BufferError::DataDir {
            path: data_dir.to_owned(),
            hint: super::access::hint(data_dir, data_dir, &error),
            error,
        })?;
        let path = file_path(data_dir);
        check_format(&path)?;
        match Store::try_open(&path, 1) {
            Ok((store, epoch, migrated_from)) => {
                Ok((store, OpenReport { moved_aside: None, epoch, migrated_from }))
            }
            Err(e) if e.proves_corruption() => {
                let reason = e.to_string();
                let aside = path.with_extension(format!("redb.corrupt-{}", crate::event::now_ms() / 1000));
                std::fs::rename(&path, &aside)
                    .map_err(|error| BufferError::MoveAside { path: path.clone(), error })?;
                // The new file's ids must not repeat the old file's (an upstream deduplicates
                // by id, and `buffer import` may bring the old events back): start its epochs
                // at the hours since the Unix epoch, above any count of restarts so far.
                let (store, epoch, _) = Store::try_open(&path, crate::event::now_ms() / 3_600_000)
                    .map_err(|e| e.explained(data_dir))?;
                Ok((store, OpenReport { moved_aside: Some((aside, reason)), epoch, migrated_from: None }))
            }
            Err(e) => Err(e.explained(data_dir)),
        }
    }

    fn create(path: &Path) -> Result<Database, BufferError> {
        redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(|e| db_err(path, e))
    }

    fn try_open(path: &Path, min_epoch: u64) -> Result<(Store, u64, Option<u64>), BufferError> {
        let db = Store::create(path)?;
        let mut store = Store { db: Some(db), path: path.to_owned(), lanes: Default::default() };
        let (epoch, migrated_from) = store.start_epoch(min_epoch)?;
        Ok((store, epoch, migrated_from))
    }

    /// Reads the counters, migrates an older format and bumps the boot epoch in one durable
    /// transaction. Also proves the file is readable: a corrupt file fails here, not later in
    /// the pipeline.
    fn start_epoch(&mut self, min_epoch: u64) -> Result<(u64, Option<u64>), BufferError> {
        let path = self.path.clone();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        let epoch;
        let mut migrated_from = None;
        {
            let mut meta = txn.open_table(META).map_err(|e| db_err(&path, e))?;
            let version = meta.get(FORMAT_KEY).map_err(|e| db_err(&path, e))?.map_or(1, |v| v.value());
            if version > FORMAT_VERSION {
                // Reached only when the read-only check could not run (a file left unclean
                // needs redb's repair first); the transaction is dropped, not committed.
                return Err(BufferError::NewerFormat { path, found: version, supported: FORMAT_VERSION });
            }
            let events = txn.open_table(EVENTS).map_err(|e| db_err(&path, e))?;
            let rows = events.len().map_err(|e| db_err(&path, e))?;
            if version < FORMAT_VERSION {
                // 1 → 2: the `imported` table; 2 → 3: the `retained` table. Records are
                // unchanged; opening a table creates it. Older than 4 → 4: every row holds one
                // record in CBOR, read as a row of one ([`chunk::decode`]) and written back
                // packed when it changes; the row count starts as the event count (checked
                // below against the counters).
                txn.open_table(IMPORTED).map_err(|e| db_err(&path, e))?;
                txn.open_table(RETAINED).map_err(|e| db_err(&path, e))?;
                if version < 4 {
                    meta.insert(ROWS_KEY, rows).map_err(|e| db_err(&path, e))?;
                }
                if version < 6 {
                    // Older than 6: the `windows` table.
                    txn.open_table(WINDOWS).map_err(|e| db_err(&path, e))?;
                }
                // Older than 7: nothing to rewrite. No row written before 7 has the
                // properties flag, so every old row reads as events without properties;
                // the new version only keeps releases that know 6 away from new rows.
                // Older than 8: nothing to rewrite either. Rows written before 8 keep
                // `chunk::PACKED_TAG` and are read as they are; a row that changes is written
                // back in format 8 (`chunk::PACKED_TAG_8`), which releases that know 7
                // would not read: the new version keeps them away.
                if version < 9 {
                    migrate_windows_to_log(&txn, &path)?;
                }
                // Older than 10: nothing to rewrite. No row written before 10 has the
                // payload-difference flag, so every old row reads as it is; the new version
                // keeps releases that know 8 or 9 away from rows that have it.
                // Older than 11: nothing to rewrite either. Every `window_log` row of 9 and
                // 10 holds a whole snapshot or delta, which 11 reads as one of a single
                // piece; the new version keeps releases that know 9 or 10 away from "more"
                // rows, which they would take for an unknown kind and start without the
                // checkpoint (readings acknowledged to sensors, lost).
                meta.insert(FORMAT_KEY, FORMAT_VERSION).map_err(|e| db_err(&path, e))?;
                migrated_from = Some(version);
            }
            if version < 5 {
                // Older than 5: the persistent sessions' tables.
                txn.open_table(super::sessions::SESSIONS).map_err(|e| db_err(&path, e))?;
                txn.open_table(super::sessions::SESSION_QUEUE).map_err(|e| db_err(&path, e))?;
            }
            epoch = (meta.get("epoch").map_err(|e| db_err(&path, e))?.map_or(0, |v| v.value()) + 1)
                .max(min_epoch);
            meta.insert("epoch", epoch).map_err(|e| db_err(&path, e))?;
            let mut counted = 0;
            for (p, lane) in self.lanes.iter_mut().enumerate() {
                let get = |kind: &str| -> Result<u64, BufferError> {
                    Ok(meta
                        .get(meta_key(kind, p).as_str())
                        .map_err(|e| db_err(&path, e))?
                        .map_or(0, |v| v.value()))
                };
                lane.events = get("events")?;
                lane.bytes = get("bytes")?;
                counted += lane.events;
            }
            // The counters must agree with the rows, lane by lane: a file whose counters
            // were damaged is corrupt even when every row still decodes.
            let mut found = [0u64; N_PRIORITIES];
            for entry in events.iter().map_err(|e| db_err(&path, e))? {
                let (k, v) = entry.map_err(|e| db_err(&path, e))?;
                let key = k.value();
                let n = chunk::count(v.value()).ok_or_else(|| BufferError::Record {
                    key,
                    message: "packed row without a count".into(),
                })?;
                if let Some(lane) = found.get_mut(usize::from(key.0)) {
                    *lane += n;
                }
            }
            for (p, (lane, n)) in self.lanes.iter().zip(found).enumerate() {
                if lane.events != n {
                    return Err(BufferError::Record {
                        key: (p as u8, 0),
                        message: format!(
                            "counters say {} events of priority {p} but the rows hold {n}",
                            lane.events
                        ),
                    });
                }
            }
            let stored_rows = read_rows(&meta, &path)?;
            if migrated_from.is_some_and(|v| v < 4) && rows != counted {
                return Err(BufferError::Record {
                    key: (0, 0),
                    message: format!("counters say {counted} events but the table holds {rows}"),
                });
            }
            if rows != stored_rows || (rows == 0) != (counted == 0) {
                return Err(BufferError::Record {
                    key: (0, 0),
                    message: format!(
                        "counters say {stored_rows} rows of {counted} events but the table holds {rows} rows"
                    ),
                });
            }
        }
        txn.commit().map_err(|e| db_err(&path, e))?;
        Ok((epoch, migrated_from))
    }

    /// The open database, reopening it first if an I/O error closed it. Reopening runs redb's
    /// repair, which restores the last committed state; the counters are reloaded from it.
    pub(super) fn database(&mut self) -> Result<&Database, BufferError> {
        if self.db.is_none() {
            let db = Store::create(&self.path)?;
            let txn = db.begin_read().map_err(|e| db_err(&self.path, e))?;
            let meta = txn.open_table(META).map_err(|e| db_err(&self.path, e))?;
            let mut lanes = [LaneStats::default(); N_PRIORITIES];
            for (p, lane) in lanes.iter_mut().enumerate() {
                let get = |kind: &str| -> Result<u64, BufferError> {
                    Ok(meta
                        .get(meta_key(kind, p).as_str())
                        .map_err(|e| db_err(&self.path, e))?
                        .map_or(0, |v| v.value()))
                };
                lane.events = get("events")?;
                lane.bytes = get("bytes")?;
            }
            drop(meta);
            drop(txn);
            self.lanes = lanes;
            self.db = Some(db);
        }
        self.db.as_ref().ok_or_else(|| BufferError::Locked { path: self.path.clone() })
    }

    /// Closes the file after an I/O error so the next operation reopens it.
    pub(super) fn forget_on_io_error<T>(&mut self, result: Result<T, BufferError>) -> Result<T, BufferError> {
        if result.as_ref().is_err_and(BufferError::is_io) {
            self.db = None;
        }
        result
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn lanes(&self) -> [LaneStats; N_PRIORITIES] {
        self.lanes
    }

    pub fn total(&self) -> LaneStats {
        self.lanes.iter().fold(LaneStats::default(), |acc, l| LaneStats {
            events: acc.events + l.events,
            bytes: acc.bytes + l.bytes,
        })
    }

    /// Applies one batch in one durable transaction (one fsync). On error nothing of the
    /// batch is applied and the counters are unchanged.
    pub fn apply(&mut self, batch: &Batch) -> Result<Applied, BufferError> {
        let result = self.apply_inner(batch);
        self.forget_on_io_error(result)
    }

    fn apply_inner(&mut self, batch: &Batch) -> Result<Applied, BufferError> {
        let path = self.path.clone();
        let mut applied = Applied::default();
        // redb's default durability is Immediate: the commit below is one fdatasync.
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        let mut lanes = self.lanes;
        {
            let mut events = txn.open_table(EVENTS).map_err(|e| db_err(&path, e))?;
            let mut meta = txn.open_table(META).map_err(|e| db_err(&path, e))?;
            let mut rows = read_rows(&meta, &path)?;
            let mut edit = Editor::new(&mut events, &path);
            for record in &batch.inserts {
                edit.insert(record.clone())?;
            }
            for key in &batch.deletes {
                edit.remove(*key)?;
            }
            count(&mut lanes, &mut rows, &edit.flush()?);
            let DropRequest { events: mut drop_events, bytes: mut drop_bytes } = batch.drop_oldest;
            'lanes: for p in (0..N_PRIORITIES as u8).rev() {
                while drop_events > 0 || drop_bytes > 0 {
                    let Some(key) = edit.first(p)? else {
                        continue 'lanes;
                    };
                    let size = edit.counted_size(key)?.unwrap_or(0);
                    edit.remove(key)?;
                    drop_events = drop_events.saturating_sub(1);
                    drop_bytes = drop_bytes.saturating_sub(size);
                    applied.dropped.push(key);
                }
                break;
            }
            count(&mut lanes, &mut rows, &edit.flush()?);
            write_counters(&mut meta, &self.lanes, &lanes, &path)?;
            meta.insert(ROWS_KEY, rows).map_err(|e| db_err(&path, e))?;
        }
        txn.commit().map_err(|e| db_err(&path, e))?;
        self.lanes = lanes;
        applied.lanes = lanes;
        Ok(applied)
    }

    /// Stores (`Some`) or removes (`None`) retained messages by topic, in one durable
    /// transaction, in the order given.
    pub fn apply_retained(&mut self, writes: &[(String, Option<StoredRetained>)]) -> Result<(), BufferError> {
        let result = self.apply_retained_inner(writes);
        self.forget_on_io_error(result)
    }

    fn apply_retained_inner(
        &mut self,
        writes: &[(String, Option<StoredRetained>)],
    ) -> Result<(), BufferError> {
        let path = self.path.clone();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        {
            let mut table = txn.open_table(RETAINED).map_err(|e| db_err(&path, e))?;
            for (topic, message) in writes {
                match message {
                    Some(message) => {
                        table
                            .insert(topic.as_str(), message.encode().as_slice())
                            .map_err(|e| db_err(&path, e))?;
                    }
                    None => {
                        table.remove(topic.as_str()).map_err(|e| db_err(&path, e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| db_err(&path, e))
    }

    /// The retained messages to load at start-up, at most `max_topics` topics and `max_bytes`
    /// bytes (topic plus payload) in topic order. Messages whose expiry passed before `now_ms`
    /// and values that do not decode are removed in the same transaction; messages beyond the
    /// bounds (which were lowered since they were stored) stay in the file, not loaded.
    pub fn load_retained(
        &mut self,
        now_ms: u64,
        max_topics: usize,
        max_bytes: u64,
    ) -> Result<RetainedLoad, BufferError> {
        let result = self.load_retained_inner(now_ms, max_topics, max_bytes);
        self.forget_on_io_error(result)
    }

    fn load_retained_inner(
        &mut self,
        now_ms: u64,
        max_topics: usize,
        max_bytes: u64,
    ) -> Result<RetainedLoad, BufferError> {
        let path = self.path.clone();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        let mut load = RetainedLoad::default();
        {
            let mut table = txn.open_table(RETAINED).map_err(|e| db_err(&path, e))?;
            let mut gone = Vec::new();
            let mut bytes = 0;
            for entry in table.iter().map_err(|e| db_err(&path, e))? {
                let (topic, value) = entry.map_err(|e| db_err(&path, e))?;
                let topic = topic.value();
                let message = match StoredRetained::decode(value.value()) {
                    Ok(m) => m,
                    Err(_) => {
                        load.undecodable += 1;
                        gone.push(topic.to_owned());
                        continue;
                    }
                };
                if message.expires_ms.is_some_and(|at| at <= now_ms) {
                    load.expired += 1;
                    gone.push(topic.to_owned());
                    continue;
                }
                let size = (topic.len() + message.payload.len()) as u64;
                if load.messages.len() >= max_topics || bytes + size > max_bytes {
                    load.not_loaded += 1;
                    continue;
                }
                bytes += size;
                load.messages.push((topic.to_owned(), message));
            }
            for topic in &gone {
                table.remove(topic.as_str()).map_err(|e| db_err(&path, e))?;
            }
        }
        txn.commit().map_err(|e| db_err(&path, e))?;
        Ok(load)
    }

    /// Fingerprints (see [`Record::fingerprint`]) of these events that an earlier import
    /// already brought in.
    pub fn already_imported(&mut self, prints: &[(u64, u64)]) -> Result<Vec<bool>, BufferError> {
        let result = self.already_imported_inner(prints);
        self.forget_on_io_error(result)
    }

    fn already_imported_inner(&mut self, prints: &[(u64, u64)]) -> Result<Vec<bool>, BufferError> {
        let path = self.path.clone();
        let txn = self.database()?.begin_read().map_err(|e| db_err(&path, e))?;
        let imported = match txn.open_table(IMPORTED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![false; prints.len()]),
            Err(e) => return Err(db_err(&path, e)),
        };
        prints.iter().map(|p| Ok(imported.get(*p).map_err(|e| db_err(&path, e))?.is_some())).collect()
    }

    /// Remembers events as imported (the daemon's path: the relay has made them safe).
    pub fn mark_imported(&mut self, prints: &[(u64, u64)]) -> Result<(), BufferError> {
        let result = self.mark_imported_inner(prints);
        self.forget_on_io_error(result)
    }

    fn mark_imported_inner(&mut self, prints: &[(u64, u64)]) -> Result<(), BufferError> {
        let path = self.path.clone();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        {
            let mut imported = txn.open_table(IMPORTED).map_err(|e| db_err(&path, e))?;
            for print in prints {
                imported.insert(*print, ()).map_err(|e| db_err(&path, e))?;
            }
        }
        txn.commit().map_err(|e| db_err(&path, e))
    }

    /// Offline import: appends the records not imported before behind everything stored, in
    /// the order given, and remembers them, in one durable transaction. Their sequence
    /// numbers come from a fresh boot epoch (taken by the first call with `seqs`), so they
    /// sort after every stored record and before everything the next start accepts. Returns
    /// how many were added and how many were already imported.
    pub fn import(&mut self, seqs: &mut ImportSeqs, records: &[Record]) -> Result<(u64, u64), BufferError> {
        let result = self.import_inner(seqs, records);
        self.forget_on_io_error(result)
    }

    fn import_inner(&mut self, seqs: &mut ImportSeqs, records: &[Record]) -> Result<(u64, u64), BufferError> {
        let path = self.path.clone();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        let mut lanes = self.lanes;
        let mut next = seqs.next;
        let (mut added, mut skipped) = (0, 0);
        {
            let mut meta = txn.open_table(META).map_err(|e| db_err(&path, e))?;
            if next.is_none() {
                let epoch = meta.get("epoch").map_err(|e| db_err(&path, e))?.map_or(0, |v| v.value()) + 1;
                meta.insert("epoch", epoch).map_err(|e| db_err(&path, e))?;
                next = Some(epoch << crate::event::EPOCH_SHIFT);
            }
            let mut imported = txn.open_table(IMPORTED).map_err(|e| db_err(&path, e))?;
            let mut events = txn.open_table(EVENTS).map_err(|e| db_err(&path, e))?;
            let mut rows = read_rows(&meta, &path)?;
            let mut edit = Editor::new(&mut events, &path);
            for record in records {
                if imported.insert(record.fingerprint(), ()).map_err(|e| db_err(&path, e))?.is_some() {
                    skipped += 1;
                    continue;
                }
                let seq = next.unwrap_or_default();
                next = Some(seq + 1);
                let priority = record.priority.min(N_PRIORITIES as u8 - 1);
                edit.insert(Record { priority, seq, ..record.clone() })?;
                added += 1;
            }
            count(&mut lanes, &mut rows, &edit.flush()?);
            write_counters(&mut meta, &self.lanes, &lanes, &path)?;
            meta.insert(ROWS_KEY, rows).map_err(|e| db_err(&path, e))?;
        }
        txn.commit().map_err(|e| db_err(&path, e))?;
        self.lanes = lanes;
        seqs.next = next;
        Ok((added, skipped))
    }

    /// Up to `limit` records of `priority` with `seq >= from_seq`, in order.
    pub fn read(&mut self, priority: u8, from_seq: u64, limit: usize) -> Result<Vec<Record>, BufferError> {
        let result = self.read_inner(priority, from_seq, limit);
        self.forget_on_io_error(result)
    }

    fn read_inner(&mut self, priority: u8, from_seq: u64, limit: usize) -> Result<Vec<Record>, BufferError> {
        let path = self.path.clone();
        let path = &path;
        let txn = self.database()?.begin_read().map_err(|e| db_err(path, e))?;
        let events = txn.open_table(EVENTS).map_err(|e| db_err(path, e))?;
        chunk::read_lane(&events, path, priority, from_seq, limit)
    }

    /// Returns the file's disk space once the queue is empty. redb keeps freed pages for
    /// reuse, so without this a file stays at its high-water mark after a large backlog.
    pub fn compact_if_drained(&mut self) -> Result<bool, BufferError> {
        if self.total().events != 0 {
            return Ok(false);
        }
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if size < COMPACT_ABOVE_BYTES {
            return Ok(false);
        }
        let path = self.path.clone();
        self.database()?;
        let result = match self.db.as_mut() {
            Some(db) => db.compact().map(|_| true).map_err(|e| db_err(&path, e)),
            None => Ok(false),
        };
        self.forget_on_io_error(result)
    }

    /// Statistics for `outpost buffer stats`.
    pub fn inspect_stats(&mut self) -> Result<StatsReport, BufferError> {
        let result =
            self.begin_read().and_then(|txn| inspect::stats(&txn, &self.path, crate::event::now_ms()));
        self.forget_on_io_error(result)
    }

    /// Records in send order after `after`, for `outpost buffer peek|export`.
    pub fn inspect_records(&mut self, after: Option<Key>, limit: usize) -> Result<Vec<Record>, BufferError> {
        let result = self.begin_read().and_then(|txn| inspect::records_after(&txn, &self.path, after, limit));
        self.forget_on_io_error(result)
    }

    fn begin_read(&mut self) -> Result<ReadTransaction, BufferError> {
        let path = self.path.clone();
        self.database()?.begin_read().map_err(|e| db_err(&path, e))
    }

    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

/// What `outpost run` needs of `data_dir`, for `outpost check`: a directory it can write (or
/// one it can create, in the nearest existing parent), and a buffer file it can open for
/// writing. Creates nothing but a probe file that it removes at once.
pub fn check_data_dir(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let fix = "set data_dir (or --data-dir) to a directory the user running outpost can write";
    let existing = dir.ancestors().find(|p| p.as_os_str().is_empty() || p.exists())?;
    let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
    if !existing.is_dir() {
        return Some(format!("data_dir {}: {} is not a directory; {fix}", dir.display(), existing.display()));
    }
    let probe = existing.join(format!(".outpost-check-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) => {
            let what = if existing == dir {
                format!("cannot write in {}", dir.display())
            } else {
                format!("{} does not exist and cannot be created in {}", dir.display(), existing.display())
            };
            return Some(format!("data_dir {what}: {e}; {fix}"));
        }
    }
    let buffer = file_path(dir);
    match std::fs::OpenOptions::new().read(true).write(true).open(&buffer) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            let owner = std::fs::metadata(&buffer)
                .map(|m| format!(" (owner uid {}, mode {:o})", m.uid(), m.mode() & 0o7777))
                .unwrap_or_default();
            Some(format!(
                "cannot open the buffer file {} for writing{owner}: {e}; run outpost as the file's owner, or give the file to the user running outpost (chown)",
                buffer.display()
            ))
        }
    }
}

/// Refuses, without writing to it, a file this build must not open for writing: one whose
/// format version is newer than [`FORMAT_VERSION`], or whose redb file format this redb
/// cannot read. Opening read-write would already change the file (redb marks it open and may
/// repair it), so this looks first through a read-only open. Anything this cannot check (no
/// file yet, a file left unclean, no read permission) is left to the read-write open.
fn check_format(path: &Path) -> Result<(), BufferError> {
    if !path.exists() {
        return Ok(());
    }
    let db = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(BufferError::Locked { path: path.to_owned() });
        }
        Err(redb::DatabaseError::UpgradeRequired(version)) => {
            return Err(BufferError::RedbFormat {
                path: path.to_owned(),
                detail: format!("redb file format {version} is older than this redb supports"),
            });
        }
        Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)))
            if detail.contains("file format version") =>
        {
            return Err(BufferError::RedbFormat { path: path.to_owned(), detail });
        }
        Err(_) => return Ok(()),
    };
    let txn = db.begin_read().map_err(|e| db_err(path, e))?;
    let found = format_version(&txn, path)?;
    if found > FORMAT_VERSION {
        return Err(BufferError::NewerFormat { path: path.to_owned(), found, supported: FORMAT_VERSION });
    }
    Ok(())
}

/// The `format_version` of an open file: 1 when the key (or the whole `meta` table) is absent.
pub(crate) fn format_version(txn: &ReadTransaction, path: &Path) -> Result<u64, BufferError> {
    match txn.open_table(META) {
        Ok(meta) => Ok(meta.get(FORMAT_KEY).map_err(|e| db_err(path, e))?.map_or(1, |v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(1),
        Err(e) => Err(db_err(path, e)),
    }
}

#[cfg(test)]
mod tests;
