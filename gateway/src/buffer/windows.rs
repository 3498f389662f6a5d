//! The route stage's checkpoint in the buffer file: the state of its stateful rules (open
//! windows and report-by-exception memory), so that a reading absorbed into a window and
//! acknowledged to its sensor survives a crash.
//!
//! The state is one CBOR snapshot (`outpost_rules::window::WindowState::snapshot`) in the
//! `windows` table under the key `state`, replaced whole by each checkpoint in one durable
//! transaction (one fsync), and read once at start. Nothing here decodes it: the rules crate
//! matches it to the rules by name and plan on restore.
//!
//! # Invariants
//! - A checkpoint is applied whole or not at all: after a crash the file holds the last
//!   committed snapshot, never a mix of two.
//! - The route stage acknowledges the readings a snapshot holds only after the transaction
//!   that wrote it has committed (`route::checkpoint`).

use super::file::{BufferError, WINDOWS, db_err};
use super::store::Store;

const STATE_KEY: &str = "state";

impl Store {
    /// Replaces the checkpoint with `state` (`None` removes it: no stateful rule is
    /// running), in one durable transaction.
    pub fn save_windows(&mut self, state: Option<&[u8]>) -> Result<(), BufferError> {
        let result = self.save_windows_inner(state);
        self.forget_on_io_error(result)
    }

    fn save_windows_inner(&mut self, state: Option<&[u8]>) -> Result<(), BufferError> {
        let path = self.path().to_owned();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        {
            let mut table = txn.open_table(WINDOWS).map_err(|e| db_err(&path, e))?;
            match state {
                Some(bytes) => {
                    table.insert(STATE_KEY, bytes).map_err(|e| db_err(&path, e))?;
                }
                None => {
                    table.remove(STATE_KEY).map_err(|e| db_err(&path, e))?;
                }
            }
        }
        txn.commit().map_err(|e| db_err(&path, e))
    }

    /// The last committed checkpoint, if any.
    pub fn load_windows(&mut self) -> Result<Option<Vec<u8>>, BufferError> {
        let result = self.load_windows_inner();
        self.forget_on_io_error(result)
    }

    fn load_windows_inner(&mut self) -> Result<Option<Vec<u8>>, BufferError> {
        use redb::ReadableDatabase as _;
        let path = self.path().to_owned();
        let txn = self.database()?.begin_read().map_err(|e| db_err(&path, e))?;
        let table = txn.open_table(WINDOWS).map_err(|e| db_err(&path, e))?;
        Ok(table.get(STATE_KEY).map_err(|e| db_err(&path, e))?.map(|v| v.value().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use redb::Database;

    use super::*;
    use crate::buffer::file::{META, file_path};
    use crate::buffer::store::FORMAT_VERSION;

    #[test]
    fn a_checkpoint_survives_a_reopen_and_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path()).expect("open");
        assert_eq!(store.load_windows().expect("load"), None);
        store.save_windows(Some(b"first")).expect("save");
        store.save_windows(Some(b"second")).expect("save");
        drop(store);
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.load_windows().expect("load").as_deref(), Some(&b"second"[..]));
        store.save_windows(None).expect("clear");
        assert_eq!(store.load_windows().expect("load"), None);
    }

    /// A file from before version 6 (here 3: `retained` but no `windows` table) gains the
    /// table in the start-up transaction, once.
    #[test]
    fn an_older_file_gains_the_windows_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        {
            let db = Database::open(file_path(dir.path())).expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(META).expect("meta").insert("format_version", 3).expect("version");
            assert!(txn.delete_table(WINDOWS).expect("delete"), "a new file has the table");
            txn.commit().expect("commit");
        }
        let (mut store, report) = Store::open(dir.path()).expect("reopen");
        assert_eq!(report.migrated_from, Some(3));
        assert_eq!(FORMAT_VERSION, 10);
        assert_eq!(store.load_windows().expect("load"), None);
        store.save_windows(Some(b"state")).expect("save");
        drop(store);
        let (mut store, report) = Store::open(dir.path()).expect("reopen");
        assert_eq!(report.migrated_from, None, "migrated once");
        assert_eq!(store.load_windows().expect("load").as_deref(), Some(&b"state"[..]));
    }
}
