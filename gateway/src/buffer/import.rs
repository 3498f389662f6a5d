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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::chunk;
use super::file::{BufferError, EVENTS, N_PRIORITIES, ReadDb, Record, is_content_error};
use super::store::{FORMAT_VERSION, ImportSeqs, Store, file_path, format_version};

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

/// The source file, opened without writing to it.
pub struct Source {
    path: PathBuf,
    db: ReadDb,
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
            Ok(db) => Source { path: path.to_owned(), db: ReadDb::ReadOnly(db), _copy: None },
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
                Source { path: path.to_owned(), db: ReadDb::Repaired(db), _copy: Some(copy) }
            }
            Err(e) => return Err(err(e)),
        };
        // A newer release may encode records differently: refuse rather than count every
        // record as undecodable.
        let found = source.db.begin_read(path).and_then(|txn| format_version(&txn, path));
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
                let chunk = match lane_chunk(&self.db, &self.path, priority, from) {
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

fn lane_chunk(db: &ReadDb, path: &Path, priority: u8, from: u64) -> Result<Chunk, BufferError> {
    let e = |e: redb::Error| BufferError::Database { path: path.to_owned(), error: e };
    let txn = db.begin_read(path)?;
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
        // A row that does not decode counts as one unreadable event: how many it held is
        // part of what is lost.
        match chunk::decode(key, v.value()) {
            Ok(records) => chunk.records.extend(records),
            Err(_) => chunk.unreadable += 1,
        }
    }
    Ok(chunk)
}

/// Imports `source` into the buffer in `data_dir`, opening the store itself: each chunk one
/// transaction. Returns the buffer file's path, or [`BufferError::Locked`] (as
/// [`ImportError::Target`]) when a running gateway holds it: then the import goes through its
/// admin socket ([`crate::admin::client::import`]).
pub fn into_store(
    source: &Source,
    data_dir: &Path,
    summary: &mut ImportSummary,
) -> Result<PathBuf, ImportError> {
    let (mut store, report) = Store::open(data_dir)?;
    let mut seqs = ImportSeqs::default();
    let (mut added, mut skipped) = (0, 0);
    source.for_each_chunk(summary, |records| {
        let (a, s) = store.import(&mut seqs, &records)?;
        added += a;
        skipped += s;
        Ok(())
    })?;
    summary.imported = added;
    summary.already_imported = skipped;
    if let Some((aside, reason)) = report.moved_aside {
        summary.problems.push(format!(
            "note: this data dir's own buffer was corrupt ({reason}) and was moved to {}; import it too",
            aside.display()
        ));
    }
    Ok(store.path().to_owned())
}

/// Whether `source` is the buffer file of `data_dir` itself.
pub fn is_own_buffer(source: &Path, data_dir: &Path) -> bool {
    matches!(
        (source.canonicalize(), file_path(data_dir).canonicalize()),
        (Ok(a), Ok(b)) if a == b
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

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
            props: None,
        }
    }

    fn all(store: &mut Store) -> Vec<Record> {
        (0..N_PRIORITIES as u8).flat_map(|p| store.read(p, 0, usize::MAX).expect("read")).collect()
    }

    /// The offline import of `file` into `data_dir`.
    fn import(file: &Path, data_dir: &Path) -> Result<ImportSummary, ImportError> {
        let source = Source::open(file)?;
        let mut summary = ImportSummary::default();
        into_store(&source, data_dir, &mut summary)?;
        Ok(summary)
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
        let first = import(&file, &dst_dir).expect("import");
        assert_eq!((first.imported, first.already_imported), (4, 0));
        let second = import(&file, &dst_dir).expect("import again");
        assert_eq!((second.imported, second.already_imported), (0, 4));

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
        let err = import(&missing, &dir.path().join("data")).expect_err("missing").to_string();
        assert!(err.starts_with(&format!("cannot read {}: No such file", missing.display())), "{err}");
        let garbage = dir.path().join("garbage.redb");
        std::fs::write(&garbage, vec![7u8; 4096]).expect("write");
        let err = import(&garbage, &dir.path().join("data")).expect_err("garbage").to_string();
        assert!(err.contains("cannot be opened as a buffer file"), "{err}");
        let data = dir.path().join("data");
        drop(Store::open(&data).expect("create"));
        assert!(is_own_buffer(&file_path(&data), &data));
        assert!(!is_own_buffer(&garbage, &data));
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
        let summary = import(&file_path(&src), &dir.path().join("dst")).expect("import");
        assert_eq!((summary.imported, summary.unreadable), (2, 1));
        assert!(summary.problems.is_empty(), "{:?}", summary.problems);
    }

    #[test]
    fn a_source_from_a_newer_release_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        drop(Store::open(&src).expect("source"));
        {
            let db = redb::Database::open(file_path(&src)).expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(crate::buffer::file::META)
                .expect("meta")
                .insert("format_version", FORMAT_VERSION + 1)
                .expect("insert");
            txn.commit().expect("commit");
        }
        let err = import(&file_path(&src), &dir.path().join("dst")).expect_err("newer").to_string();
        assert!(
            err.contains(&format!(
                "has buffer format version {}, but this outpost reads versions up to {FORMAT_VERSION}",
                FORMAT_VERSION + 1
            )),
            "{err}"
        );
    }
}
