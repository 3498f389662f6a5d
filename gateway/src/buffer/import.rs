//! `outpost buffer import FILE`: merges the events of another buffer file (one moved aside as
//! corrupt, or taken from another gateway) into this data dir's buffer.
//!
//! # Invariants
//! - The source file is never written: it is opened read-only, and a source left unclean is
//!   repaired in a temporary copy.
//! - An event is added at most once per buffer: each imported event's [`Record::fingerprint`]
//!   is kept in the buffer's `imported` table, so importing the same file again adds nothing.
//! - Per priority, imported events keep their order and their event ids, and queue behind
//!   everything the buffer already holds (new sequence numbers, in source order).
//! - Without a daemon the store is opened directly and each chunk is one transaction (events
//!   and fingerprints together). With a daemon running, the chunk goes to the relay as if
//!   routed just now (see [`crate::admin`]): it is committed or relayed like any other event,
//!   and its fingerprints are stored once the relay has made it safe.
//! - What cannot be read from the source (undecodable records, a damaged part of the tree) is
//!   counted and reported; everything readable is imported.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use redb::ReadableDatabase;
use serde::{Deserialize, Serialize};

use super::inspect::hex;
use super::store::{
    BufferError, EVENTS, FORMAT_VERSION, ImportSeqs, N_PRIORITIES, Record, Store, decode, file_path,
    format_version, is_content_error,
};

/// Records read from the source, and handed on, per step.
pub const CHUNK: usize = 1000;

/// Why an import could not run.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}: {error}; {hint}", path.display())]
    SourceAccess { path: PathBuf, error: std::io::Error, hint: String },
    #[error("{} cannot be opened as a buffer file ({error}); nothing in it can be imported", path.display())]
    SourceUnreadable { path: PathBuf, error: redb::Error },
    #[error(
        "{} has buffer format version {found}, but this outpost reads versions up to {supported}: import it with the release that wrote it, or a newer one",
        path.display()
    )]
    SourceNewer { path: PathBuf, found: u64, supported: u64 },
    #[error(
        "{} is open in a running outpost (it is that gateway's buffer); import into that gateway instead, or stop it first",
        path.display()
    )]
    SourceInUse { path: PathBuf },
    #[error("{} is this data dir's own buffer; give the path of the other file", path.display())]
    SameFile { path: PathBuf },
    #[error(transparent)]
    Target(#[from] BufferError),
    #[error("the running outpost refused the import: {0}")]
    Daemon(String),
    #[error("talking to the running outpost over {}: {error}", socket.display())]
    Socket { socket: PathBuf, error: std::io::Error },
    #[error("cannot copy {} to repair it: {error}", path.display())]
    Copy { path: PathBuf, error: std::io::Error },
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSummary {
    pub imported: u64,
    pub already_imported: u64,
    /// Refused by the running gateway's full buffer (`overflow = "reject_new"`).
    pub refused: u64,
    /// Records in the source that could not be decoded.
    pub unreadable: u64,
    /// Parts of the source that could not be read at all.
    pub problems: Vec<String>,
}

/// One event on the admin socket: a JSON line, the payload in hex.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireRecord {
    pub priority: u8,
    pub event_id: u64,
    pub enqueued_ms: u64,
    pub expires_ms: Option<u64>,
    pub topic: String,
    pub qos: u8,
    pub payload: String,
}

impl WireRecord {
    pub fn new(record: &Record) -> WireRecord {
        WireRecord {
            priority: record.priority,
            event_id: record.event_id,
            enqueued_ms: record.enqueued_ms,
            expires_ms: record.expires_ms,
            topic: record.topic.clone(),
            qos: record.qos,
            payload: hex(&record.payload),
        }
    }

    /// The record (without a sequence number: the importing side assigns it).
    pub fn into_record(self) -> Result<Record, String> {
        let payload = unhex(&self.payload).ok_or("payload is not hex")?;
        Ok(Record {
            priority: self.priority.min(N_PRIORITIES as u8 - 1),
            seq: 0,
            event_id: self.event_id,
            enqueued_ms: self.enqueued_ms,
            expires_ms: self.expires_ms,
            topic: self.topic,
            qos: self.qos,
            payload: Bytes::from(payload),
        })
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The source file, opened without writing to it.
pub struct Source {
    path: PathBuf,
    db: SourceDb,
    /// The repaired copy of an unclean source, removed on drop.
    _copy: Option<TempCopy>,
}

/// A file removed when dropped.
struct TempCopy(PathBuf);

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

enum SourceDb {
    ReadOnly(redb::ReadOnlyDatabase),
    Repaired(redb::Database),
}

impl Source {
    pub fn open(path: &Path) -> Result<Source, ImportError> {
        let err = |error: redb::DatabaseError| -> ImportError {
            match error.into() {
                redb::Error::Io(error) if !is_content_error(&error) => {
                    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                    let hint = super::access::hint(path, dir, &error);
                    ImportError::SourceAccess { path: path.to_owned(), error, hint }
                }
                redb::Error::DatabaseAlreadyOpen => ImportError::SourceInUse { path: path.to_owned() },
                error => ImportError::SourceUnreadable { path: path.to_owned(), error },
            }
        };
        // A missing file is an access problem, not an unreadable one.
        if let Err(error) = std::fs::metadata(path) {
            return Err(err(redb::DatabaseError::Storage(redb::StorageError::Io(error))));
        }
        let source = match redb::ReadOnlyDatabase::open(path) {
            Ok(db) => Source { path: path.to_owned(), db: SourceDb::ReadOnly(db), _copy: None },
            // Left unclean (a crash): redb must repair it before reading, which writes. Repair
            // a copy so the file handed to us stays exactly as it was.
            Err(redb::DatabaseError::RepairAborted) => {
                let copy_err = |error| ImportError::Copy { path: path.to_owned(), error };
                let copy = TempCopy(std::env::temp_dir().join(format!(
                    "outpost-import-{}-{}.redb",
                    std::process::id(),
                    crate::event::now_ms()
                )));
                std::fs::copy(path, &copy.0).map_err(copy_err)?;
                let db = redb::Database::open(&copy.0).map_err(err)?;
                Source { path: path.to_owned(), db: SourceDb::Repaired(db), _copy: Some(copy) }
            }
            Err(e) => return Err(err(e)),
        };
        // A newer release may encode records differently: refuse rather than count every
        // record as undecodable.
        let found = match &source.db {
            SourceDb::ReadOnly(db) => format_version(db, path),
            SourceDb::Repaired(db) => format_version(db, path),
        };
        match found {
            Ok(found) if found > FORMAT_VERSION => {
                Err(ImportError::SourceNewer { path: path.to_owned(), found, supported: FORMAT_VERSION })
            }
            _ => Ok(source),
        }
    }

    /// Hands the readable records to `f` in chunks, priority 0 first, in key order within a
    /// priority. Undecodable records are counted and skipped; a part of a priority redb cannot
    /// read ends that priority (noted in `summary.problems`), the others are still read.
    pub fn for_each_chunk(
        &self,
        summary: &mut ImportSummary,
        mut f: impl FnMut(Vec<Record>) -> Result<(), ImportError>,
    ) -> Result<(), ImportError> {
        for priority in 0..N_PRIORITIES as u8 {
            let mut from = 0;
            loop {
                let chunk = match &self.db {
                    SourceDb::ReadOnly(db) => lane_chunk(db, &self.path, priority, from),
                    SourceDb::Repaired(db) => lane_chunk(db, &self.path, priority, from),
                };
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(error) => {
                        Chunk { records: Vec::new(), unreadable: 0, next: None, error: Some(error) }
                    }
                };
                summary.unreadable += chunk.unreadable;
                if !chunk.records.is_empty() {
                    f(chunk.records)?;
                }
                if let Some(error) = chunk.error {
                    summary.problems.push(format!(
                        "priority {priority}: {error}; the rest of this priority could not be read"
                    ));
                    break;
                }
                match chunk.next {
                    Some(next) => from = next,
                    None => break,
                }
            }
        }
        Ok(())
    }
}

struct Chunk {
    records: Vec<Record>,
    unreadable: u64,
    /// Where the next chunk of this priority starts; `None` when the priority is done.
    next: Option<u64>,
    /// redb failed part-way: the records before the failure are in `records`.
    error: Option<BufferError>,
}

fn lane_chunk(
    db: &impl ReadableDatabase,
    path: &Path,
    priority: u8,
    from: u64,
) -> Result<Chunk, BufferError> {
    let e = |e: redb::Error| BufferError::Database { path: path.to_owned(), error: e };
    let txn = db.begin_read().map_err(|x| e(x.into()))?;
    let events = match txn.open_table(EVENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Ok(Chunk { records: vec![], unreadable: 0, next: None, error: None });
        }
        Err(x) => return Err(e(x.into())),
    };
    let mut chunk = Chunk { records: Vec::new(), unreadable: 0, next: None, error: None };
    for entry in events.range((priority, from)..=(priority, u64::MAX)).map_err(|x| e(x.into()))? {
        let (k, v) = match entry {
            Ok(entry) => entry,
            Err(x) => {
                chunk.error = Some(e(x.into()));
                break;
            }
        };
        let key = k.value();
        if chunk.records.len() + chunk.unreadable as usize >= CHUNK {
            chunk.next = Some(key.1);
            break;
        }
        match decode(key, v.value()) {
            Ok(record) => chunk.records.push(record),
            Err(_) => chunk.unreadable += 1,
        }
    }
    Ok(chunk)
}

/// The whole command: imports `file` into the buffer in `data_dir`, directly or through the
/// running daemon, and says what it did.
pub fn command(file: &Path, data_dir: &Path) -> Result<String, ImportError> {
    let target = file_path(data_dir);
    if let (Ok(a), Ok(b)) = (file.canonicalize(), target.canonicalize()) {
        if a == b {
            return Err(ImportError::SameFile { path: file.to_owned() });
        }
    }
    let source = Source::open(file)?;
    let mut summary = ImportSummary::default();
    let mut notes = Vec::new();
    let how = match Store::open(data_dir) {
        Ok((mut store, report)) => {
            if let Some((aside, reason)) = report.moved_aside {
                notes.push(format!(
                    "note: this data dir's own buffer was corrupt ({reason}) and was moved to {}; import it too",
                    aside.display()
                ));
            }
            let mut seqs = ImportSeqs::default();
            let mut added = 0;
            let mut skipped = 0;
            source.for_each_chunk(&mut summary, |records| {
                let (a, s) = store.import(&mut seqs, &records)?;
                added += a;
                skipped += s;
                Ok(())
            })?;
            summary.imported = added;
            summary.already_imported = skipped;
            format!("into {}", store.path().display())
        }
        Err(BufferError::Locked { .. }) => {
            let socket = crate::admin::socket_path(data_dir);
            let answer = through_daemon(&socket, &source, &mut summary)?;
            summary.imported = answer.imported;
            summary.already_imported = answer.already_imported;
            summary.refused = answer.refused;
            format!("into the running outpost's buffer ({})", target.display())
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = format!(
        "imported {} events from {} {how}; {} were already imported",
        summary.imported,
        file.display(),
        summary.already_imported
    );
    if summary.refused > 0 {
        out += &format!(
            "; {} refused: the buffer is full (overflow = reject_new), run the import again once it drains",
            summary.refused
        );
    }
    if summary.unreadable > 0 {
        out += &format!("; {} records in the file could not be decoded and were skipped", summary.unreadable);
    }
    for problem in summary.problems.iter().chain(&notes) {
        out += &format!("\n{problem}");
    }
    Ok(out)
}

/// Streams the source's records to the daemon's admin socket (`import`, then one JSON line
/// per record, then end of input) and returns its answer.
fn through_daemon(
    socket: &Path,
    source: &Source,
    summary: &mut ImportSummary,
) -> Result<ImportSummary, ImportError> {
    let io = |error| ImportError::Socket { socket: socket.to_owned(), error };
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(io)?;
    let mut writer = std::io::BufWriter::new(stream.try_clone().map_err(io)?);
    let sent = writer.write_all(b"import\n").map_err(io).and_then(|()| {
        source.for_each_chunk(summary, |records| {
            for record in &records {
                let line = serde_json::to_string(&WireRecord::new(record)).unwrap_or_default();
                writer.write_all(line.as_bytes()).and_then(|()| writer.write_all(b"\n")).map_err(io)?;
            }
            Ok(())
        })?;
        writer.flush().map_err(io)
    });
    // The daemon may have stopped reading to answer with an error: read it either way.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let read = BufReader::new(&stream).take(1 << 20).read_line(&mut answer);
    if let Some(error) = answer.strip_prefix("error: ") {
        return Err(ImportError::Daemon(error.trim().to_owned()));
    }
    sent?;
    read.map_err(io)?;
    serde_json::from_str(answer.trim())
        .map_err(|e| ImportError::Daemon(format!("unexpected answer {answer:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Batch;

    fn record(priority: u8, seq: u64, event_id: u64, payload: &[u8]) -> Record {
        Record {
            priority,
            seq,
            event_id,
            enqueued_ms: 1_700_000_000_000 + seq,
            expires_ms: None,
            topic: format!("sensors/{seq}"),
            qos: 1,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn all(store: &mut Store) -> Vec<Record> {
        (0..N_PRIORITIES as u8).flat_map(|p| store.read(p, 0, usize::MAX).expect("read")).collect()
    }

    #[test]
    fn import_appends_in_order_and_twice_is_a_no_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
        {
            let (mut src, _) = Store::open(&src_dir).expect("source");
            let inserts = vec![
                record(5, 1, 11, b"a"),
                record(5, 2, 12, &[0xff, 0]),
                record(0, 3, 13, b"c"),
                record(5, 9, 14, b"d"),
            ];
            src.apply(&Batch { inserts, ..Batch::default() }).expect("fill source");
            let (mut dst, _) = Store::open(&dst_dir).expect("target");
            // The target's own events share an id with a source event but not its content:
            // the id alone must not make the source event count as imported.
            dst.apply(&Batch { inserts: vec![record(5, 100, 11, b"other")], ..Batch::default() })
                .expect("fill");
        }
        let file = file_path(&src_dir);
        let first = command(&file, &dst_dir).expect("import");
        assert!(first.starts_with("imported 4 events from"), "{first}");
        let second = command(&file, &dst_dir).expect("import again");
        assert!(second.starts_with("imported 0 events from"), "{second}");
        assert!(second.contains("4 were already imported"), "{second}");

        let (mut dst, _) = Store::open(&dst_dir).expect("reopen");
        let got: Vec<(u8, u64, Bytes)> =
            all(&mut dst).into_iter().map(|r| (r.priority, r.event_id, r.payload)).collect();
        let want: Vec<(u8, u64, Bytes)> = vec![
            (0, 13, Bytes::from_static(b"c")),
            (5, 11, Bytes::from_static(b"other")),
            (5, 11, Bytes::from_static(b"a")),
            (5, 12, Bytes::from_static(&[0xff, 0])),
            (5, 14, Bytes::from_static(b"d")),
        ];
        assert_eq!(got, want, "imported events queue behind the target's own, in source order");
        assert_eq!(dst.total().events, 5);
    }

    #[test]
    fn a_missing_or_foreign_source_is_refused_precisely() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.redb");
        let err = command(&missing, &dir.path().join("data")).expect_err("missing").to_string();
        assert!(err.starts_with(&format!("cannot read {}: No such file", missing.display())), "{err}");
        let garbage = dir.path().join("garbage.redb");
        std::fs::write(&garbage, vec![7u8; 4096]).expect("write");
        let err = command(&garbage, &dir.path().join("data")).expect_err("garbage").to_string();
        assert!(err.contains("cannot be opened as a buffer file"), "{err}");
        let data = dir.path().join("data");
        drop(Store::open(&data).expect("create"));
        let err = command(&file_path(&data), &data).expect_err("itself").to_string();
        assert!(err.contains("this data dir's own buffer"), "{err}");
    }

    #[test]
    fn undecodable_records_are_counted_and_the_rest_imported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        {
            let (mut store, _) = Store::open(&src).expect("source");
            let inserts = vec![record(5, 1, 1, b"a"), record(5, 3, 3, b"c")];
            store.apply(&Batch { inserts, ..Batch::default() }).expect("fill");
        }
        {
            let db = redb::Database::open(file_path(&src)).expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(EVENTS)
                .expect("events")
                .insert((5, 2), b"\xff not CBOR".as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        let out = command(&file_path(&src), &dir.path().join("dst")).expect("import");
        assert!(out.starts_with("imported 2 events"), "{out}");
        assert!(out.ends_with("; 1 records in the file could not be decoded and were skipped"), "{out}");
    }

    #[test]
    fn a_source_from_a_newer_release_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        drop(Store::open(&src).expect("source"));
        {
            let db = redb::Database::open(file_path(&src)).expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(crate::buffer::store::META)
                .expect("meta")
                .insert("format_version", 9)
                .expect("insert");
            txn.commit().expect("commit");
        }
        let err = command(&file_path(&src), &dir.path().join("dst")).expect_err("newer").to_string();
        assert!(
            err.contains(&format!(
                "has buffer format version 9, but this outpost reads versions up to {FORMAT_VERSION}"
            )),
            "{err}"
        );
    }

    #[test]
    fn wire_records_round_trip() {
        let r = record(3, 7, 99, &[0, 1, 0xfe, b'x']);
        let line = serde_json::to_string(&WireRecord::new(&r)).expect("json");
        let back: WireRecord = serde_json::from_str(&line).expect("parse");
        let back = back.into_record().expect("valid");
        assert_eq!(back.fingerprint(), r.fingerprint());
        assert_eq!((back.enqueued_ms, back.payload), (r.enqueued_ms, r.payload));
        assert!(unhex("abc").is_none() && unhex("zz").is_none());
    }
}
