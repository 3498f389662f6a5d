//! The route stage's checkpoint in the buffer file: the state of its stateful rules (open
//! windows and report-by-exception memory), so that a reading absorbed into a window and
//! acknowledged to its sensor survives a crash.
//!
//! Since format 9 the state is a log in the `window_log` table, by sequence number: one
//! full snapshot (`outpost_rules::window::WindowState::snapshot`), then the deltas taken
//! after it (`WindowState::take_delta`), each row a kind tag byte and the rules crate's
//! bytes. Since format 11 a snapshot or delta longer than `file::WINDOW_ROW_BYTES` takes
//! several rows: the first with its kind's tag, the rest tagged "more", in order, so that
//! every row fits one of redb's 4 KiB pages instead of a power-of-two page of its own. A
//! checkpoint is one durable transaction (one fsync) of [`LogWrite`]s: a delta
//! appends its rows; a full snapshot deletes every row and writes itself, which is also how
//! the log is compacted (the route stage's checkpointer decides when, so the log stays
//! within about five times the state: `route::checkpoint::COMPACT_AFTER`). The log is read
//! once at start: the last full row and the deltas after it, in order. Nothing here decodes the state: the rules crate matches it to
//! the rules by name and plan on restore.
//!
//! Formats 6–8 kept one snapshot in the `windows` table; the start-up transaction that
//! migrates such a file makes it the log's first full row (`store::Store::open`).
//!
//! # Invariants
//! - A checkpoint is applied whole or not at all: after a crash the file holds the rows of
//!   the last committed checkpoint and those before it, never part of one (nor part of one
//!   of its snapshot's or delta's pieces).
//! - A "more" row follows a full, delta or "more" row; the load appends it to the one being
//!   read. One that follows nothing makes the log unusable, as an unknown tag does.
//! - A delta is appended only to a log whose first row is a full snapshot: a full write
//!   removes every row before it, so the first row is the base whenever there is one. A
//!   delta offered to a log without one is refused (the checkpoint fails, and the next one
//!   is full).
//! - The route stage acknowledges the readings a checkpoint holds only after the
//!   transaction that wrote it has committed (`route::checkpoint`).

use redb::{ReadableTable as _, ReadableTableMetadata as _};

use super::file::{
    BufferError, WINDOW_DELTA_TAG as DELTA_TAG, WINDOW_FULL_TAG as FULL_TAG, WINDOW_LOG,
    WINDOW_MORE_TAG as MORE_TAG, WINDOW_ROW_BYTES, db_err, window_row as row,
};
pub use super::file::{LogWrite, WindowLoad};
use super::store::Store;

impl Store {
    /// Applies `writes` in order, in one durable transaction.
    pub fn save_windows(&mut self, writes: &[LogWrite]) -> Result<(), BufferError> {
        let result = self.save_windows_inner(writes);
        self.forget_on_io_error(result)
    }

    fn save_windows_inner(&mut self, writes: &[LogWrite]) -> Result<(), BufferError> {
        let path = self.path().to_owned();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        {
            let mut table = txn.open_table(WINDOW_LOG).map_err(|e| db_err(&path, e))?;
            for write in writes {
                let next = table.last().map_err(|e| db_err(&path, e))?.map_or(0, |(k, _)| k.value() + 1);
                match write {
                    LogWrite::Clear => {
                        table.retain(|_, _| false).map_err(|e| db_err(&path, e))?;
                    }
                    LogWrite::Full(bytes) => {
                        table.retain(|_, _| false).map_err(|e| db_err(&path, e))?;
                        insert_pieces(&mut table, next, FULL_TAG, bytes).map_err(|e| db_err(&path, e))?;
                    }
                    LogWrite::Delta(bytes) => {
                        let based = table
                            .first()
                            .map_err(|e| db_err(&path, e))?
                            .is_some_and(|(_, v)| v.value().first() == Some(&FULL_TAG));
                        if !based {
                            // Dropping the transaction commits nothing of this checkpoint.
                            return Err(BufferError::DeltaWithoutBase { path });
                        }
                        insert_pieces(&mut table, next, DELTA_TAG, bytes).map_err(|e| db_err(&path, e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| db_err(&path, e))
    }

    /// The last committed checkpoint: its full snapshot and the deltas after it, each put
    /// back together from its pieces.
    pub fn load_windows(&mut self) -> Result<WindowLoad, BufferError> {
        let result = self.load_windows_inner();
        self.forget_on_io_error(result)
    }

    fn load_windows_inner(&mut self) -> Result<WindowLoad, BufferError> {
        use redb::ReadableDatabase as _;
        let path = self.path().to_owned();
        let txn = self.database()?.begin_read().map_err(|e| db_err(&path, e))?;
        let table = txn.open_table(WINDOW_LOG).map_err(|e| db_err(&path, e))?;
        if table.is_empty().map_err(|e| db_err(&path, e))? {
            return Ok(WindowLoad::Empty);
        }
        let mut base: Option<Vec<u8>> = None;
        let mut deltas: Vec<Vec<u8>> = Vec::new();
        let mut orphans = 0;
        // The kind of the row a "more" row continues: none before the first row.
        let mut open = None;
        for entry in table.iter().map_err(|e| db_err(&path, e))? {
            let (key, value) = entry.map_err(|e| db_err(&path, e))?;
            match value.value().split_first() {
                Some((&FULL_TAG, bytes)) => {
                    // Only the last full row counts: rows before it are already in it.
                    base = Some(bytes.to_vec());
                    deltas.clear();
                    open = Some(FULL_TAG);
                }
                Some((&DELTA_TAG, bytes)) if base.is_some() => {
                    deltas.push(bytes.to_vec());
                    open = Some(DELTA_TAG);
                }
                Some((&DELTA_TAG, _)) => {
                    orphans += 1;
                    open = Some(DELTA_TAG);
                }
                Some((&MORE_TAG, bytes)) if open.is_some() => {
                    // The next piece of the last full or delta row (or of an orphan delta).
                    if let Some(base) = base.as_mut() {
                        deltas.last_mut().unwrap_or(base).extend_from_slice(bytes);
                    }
                }
                Some((&MORE_TAG, _)) => {
                    return Ok(WindowLoad::Unusable(format!(
                        "row {} of the window-state log continues a row that is not there",
                        key.value()
                    )));
                }
                other => {
                    let tag = other.map_or("none".to_owned(), |(t, _)| format!("{t:#04x}"));
                    return Ok(WindowLoad::Unusable(format!(
                        "row {} of the window-state log has an unknown kind (tag {tag})",
                        key.value()
                    )));
                }
            }
        }
        Ok(match base {
            Some(base) => WindowLoad::Log { base, deltas },
            None => WindowLoad::Unusable(format!(
                "the window-state log holds {orphans} deltas but no full snapshot to apply them to"
            )),
        })
    }
}

/// Writes `bytes` as rows from key `first`: its kind's `tag` on the first, "more" on the
/// rest, each at most [`WINDOW_ROW_BYTES`] of state (one row when `bytes` is empty).
fn insert_pieces(
    table: &mut redb::Table<u64, &[u8]>,
    first: u64,
    tag: u8,
    bytes: &[u8],
) -> Result<(), redb::StorageError> {
    let mut pieces = bytes.chunks(WINDOW_ROW_BYTES);
    table.insert(first, row(tag, pieces.next().unwrap_or_default()).as_slice())?;
    for (key, piece) in (first + 1..).zip(pieces) {
        table.insert(key, row(MORE_TAG, piece).as_slice())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase as _, TableHandle as _};

    use super::*;
    use crate::buffer::file::{META, WINDOWS, file_path};
    use crate::buffer::store::FORMAT_VERSION;
    use crate::buffer::store::Store;

    fn full(bytes: &[u8]) -> LogWrite {
        LogWrite::Full(bytes.to_vec())
    }

    fn delta(bytes: &[u8]) -> LogWrite {
        LogWrite::Delta(bytes.to_vec())
    }

    fn log(base: &[u8], deltas: &[&[u8]]) -> WindowLoad {
        WindowLoad::Log { base: base.to_vec(), deltas: deltas.iter().map(|d| d.to_vec()).collect() }
    }

    /// The keys and tags in the table, as the file holds them.
    fn rows(dir: &std::path::Path) -> Vec<(u64, u8)> {
        let db = Database::open(file_path(dir)).expect("open");
        let txn = db.begin_read().expect("txn");
        let table = txn.open_table(WINDOW_LOG).expect("table");
        table
            .iter()
            .expect("iter")
            .map(|e| {
                let (k, v) = e.expect("row");
                (k.value(), v.value()[0])
            })
            .collect()
    }

    #[test]
    fn deltas_append_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path()).expect("open");
        assert_eq!(store.load_windows().expect("load"), WindowLoad::Empty);
        store.save_windows(&[full(b"base")]).expect("save");
        store.save_windows(&[delta(b"d1")]).expect("save");
        store.save_windows(&[delta(b"d2"), delta(b"d3")]).expect("save");
        assert_eq!(store.load_windows().expect("load"), log(b"base", &[b"d1", b"d2", b"d3"]));
        drop(store);
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.load_windows().expect("load"), log(b"base", &[b"d1", b"d2", b"d3"]));
        drop(store);
        assert_eq!(rows(dir.path()), vec![(0, FULL_TAG), (1, DELTA_TAG), (2, DELTA_TAG), (3, DELTA_TAG)]);
    }

    #[test]
    fn a_full_snapshot_compacts_the_log_and_clear_empties_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path()).expect("open");
        store.save_windows(&[full(b"old"), delta(b"d1"), delta(b"d2")]).expect("save");
        // A full and the delta after it in one transaction (a newer write that waited).
        store.save_windows(&[delta(b"d3"), full(b"new"), delta(b"d4")]).expect("save");
        assert_eq!(store.load_windows().expect("load"), log(b"new", &[b"d4"]));
        drop(store);
        assert_eq!(
            rows(dir.path()),
            vec![(4, FULL_TAG), (5, DELTA_TAG)],
            "every row before the full is gone"
        );
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        store.save_windows(&[LogWrite::Clear]).expect("clear");
        assert_eq!(store.load_windows().expect("load"), WindowLoad::Empty);
        drop(store);
        assert!(rows(dir.path()).is_empty());
    }

    #[test]
    fn a_delta_without_a_base_is_refused_and_commits_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path()).expect("open");
        let err = store.save_windows(&[delta(b"d")]).expect_err("no base");
        assert!(err.to_string().contains("without a full snapshot"), "{err}");
        store.save_windows(&[full(b"base"), delta(b"d1")]).expect("save");
        // The whole transaction is refused, its full write with it.
        store.save_windows(&[LogWrite::Clear, delta(b"d2")]).expect_err("cleared, then no base");
        assert_eq!(store.load_windows().expect("load"), log(b"base", &[b"d1"]));
    }

    /// A file holding deltas and no base (never written by this release: a damaged or
    /// hand-edited file) loads as unusable, and the gateway starts with empty state.
    #[test]
    fn a_log_without_a_base_is_unusable() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        {
            let db = Database::open(file_path(dir.path())).expect("open");
            let txn = db.begin_write().expect("txn");
            let mut table = txn.open_table(WINDOW_LOG).expect("table");
            table.insert(7, row(DELTA_TAG, b"d").as_slice()).expect("insert");
            table.insert(8, row(DELTA_TAG, b"d").as_slice()).expect("insert");
            drop(table);
            txn.commit().expect("commit");
        }
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        match store.load_windows().expect("load") {
            WindowLoad::Unusable(why) => assert!(why.contains("2 deltas but no full snapshot"), "{why}"),
            other => panic!("expected unusable, got {other:?}"),
        }
        // A full write replaces it: the log is usable again.
        store.save_windows(&[full(b"base")]).expect("save");
        assert_eq!(store.load_windows().expect("load"), log(b"base", &[]));
    }

    #[test]
    fn a_row_of_an_unknown_kind_is_unusable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path()).expect("open");
        store.save_windows(&[full(b"base")]).expect("save");
        drop(store);
        {
            let db = Database::open(file_path(dir.path())).expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(WINDOW_LOG).expect("table").insert(1, &b"Xjunk"[..]).expect("insert");
            txn.commit().expect("commit");
        }
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        match store.load_windows().expect("load") {
            WindowLoad::Unusable(why) => assert!(why.contains("row 1") && why.contains("0x58"), "{why}"),
            other => panic!("expected unusable, got {other:?}"),
        }
    }

    /// The rows' tags and lengths (tag included), as the file holds them.
    fn row_sizes(dir: &std::path::Path) -> Vec<(u8, usize)> {
        let db = Database::open(file_path(dir)).expect("open");
        let txn = db.begin_read().expect("txn");
        let table = txn.open_table(WINDOW_LOG).expect("table");
        table
            .iter()
            .expect("iter")
            .map(|e| {
                let (_, v) = e.expect("row");
                (v.value()[0], v.value().len())
            })
            .collect()
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// A snapshot or delta larger than a row's share of a page is written in pieces and
    /// read back whole, in order, across a reopen; an empty one is still one row.
    #[test]
    fn a_checkpoint_longer_than_a_row_is_written_in_pieces_and_read_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path()).expect("open");
        let base = bytes(2 * WINDOW_ROW_BYTES + 1, 1);
        let d1 = bytes(WINDOW_ROW_BYTES, 2);
        let d2 = bytes(WINDOW_ROW_BYTES + 7, 3);
        store.save_windows(&[LogWrite::Full(base.clone()), LogWrite::Delta(d1.clone())]).expect("save");
        store.save_windows(&[LogWrite::Delta(Vec::new()), LogWrite::Delta(d2.clone())]).expect("save");
        let want = WindowLoad::Log { base: base.clone(), deltas: vec![d1.clone(), Vec::new(), d2.clone()] };
        assert_eq!(store.load_windows().expect("load"), want);
        drop(store);
        let n = WINDOW_ROW_BYTES + 1;
        assert_eq!(
            row_sizes(dir.path()),
            vec![
                (FULL_TAG, n),
                (MORE_TAG, n),
                (MORE_TAG, 2),
                (DELTA_TAG, n),
                (DELTA_TAG, 1),
                (DELTA_TAG, n),
                (MORE_TAG, 8),
            ]
        );
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.load_windows().expect("load"), want);
        // A full one in pieces replaces every row, pieces included.
        let new = bytes(WINDOW_ROW_BYTES + 1, 4);
        store.save_windows(&[LogWrite::Full(new.clone())]).expect("save");
        assert_eq!(store.load_windows().expect("load"), log(&new, &[]));
        drop(store);
        assert_eq!(row_sizes(dir.path()), vec![(FULL_TAG, n), (MORE_TAG, 2)]);
    }

    /// A "more" row with no row before it to continue (never written: a damaged file) makes
    /// the log unusable; one after an orphan delta is part of that orphan.
    #[test]
    fn a_piece_that_continues_nothing_is_unusable() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        let put = |rows: &[(u64, u8)]| {
            let db = Database::open(file_path(dir.path())).expect("open");
            let txn = db.begin_write().expect("txn");
            let mut table = txn.open_table(WINDOW_LOG).expect("table");
            table.retain(|_, _| false).expect("clear");
            for &(key, tag) in rows {
                table.insert(key, row(tag, b"x").as_slice()).expect("insert");
            }
            drop(table);
            txn.commit().expect("commit");
        };
        put(&[(3, MORE_TAG), (4, FULL_TAG)]);
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        match store.load_windows().expect("load") {
            WindowLoad::Unusable(why) => assert!(why.contains("row 3") && why.contains("continues"), "{why}"),
            other => panic!("expected unusable, got {other:?}"),
        }
        drop(store);
        put(&[(3, DELTA_TAG), (4, MORE_TAG), (5, FULL_TAG), (6, MORE_TAG)]);
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store.load_windows().expect("load"),
            log(b"xx", &[]),
            "the orphan and its piece are before the base"
        );
    }

    /// Format 10 wrote every snapshot and delta as one row, whatever its size: such a log
    /// reads the same after the migration to 11, and pieces append to it.
    #[test]
    fn a_format_10_log_reads_the_same_and_takes_pieces_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = bytes(3 * WINDOW_ROW_BYTES, 5);
        let d1 = bytes(WINDOW_ROW_BYTES * 2, 6);
        drop(Store::open(dir.path()).expect("open"));
        {
            let db = Database::open(file_path(dir.path())).expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(META).expect("meta").insert("format_version", 10).expect("version");
            let mut table = txn.open_table(WINDOW_LOG).expect("table");
            table.insert(0, row(FULL_TAG, &big).as_slice()).expect("insert");
            table.insert(1, row(DELTA_TAG, &d1).as_slice()).expect("insert");
            drop(table);
            txn.commit().expect("commit");
        }
        let (mut store, report) = Store::open(dir.path()).expect("reopen");
        assert_eq!(report.migrated_from, Some(10));
        assert_eq!(store.load_windows().expect("load"), log(&big, &[&d1]));
        let d2 = bytes(WINDOW_ROW_BYTES + 1, 7);
        store.save_windows(&[LogWrite::Delta(d2.clone())]).expect("a delta in pieces");
        assert_eq!(store.load_windows().expect("load"), log(&big, &[&d1, &d2]));
        drop(store);
        assert_eq!(
            row_sizes(dir.path()).iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![FULL_TAG, DELTA_TAG, DELTA_TAG, MORE_TAG]
        );
        let (_, report) = Store::open(dir.path()).expect("reopen");
        assert_eq!(report.migrated_from, None, "migrated once");
    }

    /// Makes the file in `dir` look as format `version` wrote it: the version key, the
    /// `windows` table holding `state` (when given), and no `window_log` table.
    fn make_old(dir: &std::path::Path, version: u64, state: Option<&[u8]>) {
        drop(Store::open(dir).expect("open"));
        let db = Database::open(file_path(dir)).expect("open");
        let txn = db.begin_write().expect("txn");
        txn.open_table(META).expect("meta").insert("format_version", version).expect("version");
        assert!(txn.delete_table(WINDOW_LOG).expect("delete"), "a new file has the log");
        if let Some(state) = state {
            txn.open_table(WINDOWS).expect("windows").insert("state", state).expect("state");
        }
        txn.commit().expect("commit");
    }

    fn has_table(dir: &std::path::Path, name: &str) -> bool {
        let db = Database::open(file_path(dir)).expect("open");
        let txn = db.begin_read().expect("txn");
        txn.list_tables().expect("tables").any(|t| t.name() == name)
    }

    /// Format 8 kept one snapshot in `windows`: the start-up transaction makes it the log's
    /// base, and the old table goes.
    #[test]
    fn a_format_8_snapshot_becomes_the_logs_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        make_old(dir.path(), 8, Some(b"snapshot of 8"));
        let (mut store, report) = Store::open(dir.path()).expect("reopen");
        assert_eq!(report.migrated_from, Some(8));
        assert_eq!(FORMAT_VERSION, 11);
        assert_eq!(store.load_windows().expect("load"), log(b"snapshot of 8", &[]));
        store.save_windows(&[delta(b"d1")]).expect("a delta onto the migrated base");
        drop(store);
        assert!(!has_table(dir.path(), "windows"), "the format-8 table is gone");
        let (mut store, report) = Store::open(dir.path()).expect("reopen");
        assert_eq!(report.migrated_from, None, "migrated once");
        assert_eq!(store.load_windows().expect("load"), log(b"snapshot of 8", &[b"d1"]));
    }

    /// A format-8 file without a checkpoint, and one from before 6 (here 3: no `windows`
    /// table at all), gain an empty log.
    #[test]
    fn older_files_without_a_snapshot_gain_an_empty_log() {
        for version in [8, 3] {
            let dir = tempfile::tempdir().expect("tempdir");
            make_old(dir.path(), version, None);
            if version < 6 {
                let db = Database::open(file_path(dir.path())).expect("open");
                let txn = db.begin_write().expect("txn");
                txn.delete_table(WINDOWS).expect("delete");
                txn.commit().expect("commit");
            }
            let (mut store, report) = Store::open(dir.path()).expect("reopen");
            assert_eq!(report.migrated_from, Some(version));
            assert_eq!(store.load_windows().expect("load"), WindowLoad::Empty, "from {version}");
            store.save_windows(&[full(b"state")]).expect("save");
            drop(store);
            assert!(!has_table(dir.path(), "windows"), "from {version}");
            let (mut store, report) = Store::open(dir.path()).expect("reopen");
            assert_eq!(report.migrated_from, None, "migrated once");
            assert_eq!(store.load_windows().expect("load"), log(b"state", &[]));
        }
    }
}
