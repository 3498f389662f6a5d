//! The dead-letter store: events rules could not process (or sent here with a
//! `dead_letter` action), one record per event with every rule and its reason; events the
//! upstream refused by closing the link (the relay's poison events, `rule` empty); and copies
//! a full buffer refused (`reject_new`) that no sensor would resend — window outputs, copies
//! of readings a stateful rule took in (reason `buffer_full`, `rule` empty).
//!
//! Two JSON-lines files, both read with `outpost rules dead-letters`:
//! - `<data_dir>/dead-letters.jsonl`, rules' letters, rotated to `dead-letters.jsonl.1` at
//!   [`MAX_FILE_BYTES`] (the older `.1` is then overwritten). A rule's letter is a diagnostic
//!   record, not part of the delivery guarantee: writes are batched and not fsynced, and when
//!   the store cannot keep up, letters are counted (`dead_letters_unsaved`) instead of slowing
//!   routing.
//! - `<data_dir>/dead-letters-upstream.jsonl`, the relay's [`DurableLetter`]s. Each replaces an
//!   acknowledged event's buffer record, so it is the event's only copy: answered only once
//!   written and `fdatasync`ed (and, when the file was just created, its directory synced), and
//!   this file is **never rotated or truncated** by Outpost. A poison event takes at least
//!   three upstream disconnects, so it grows slowly from those; refused copies make it grow
//!   with the windows that close while the buffer is full under `reject_new`. The operator
//!   removes it once the events are dealt with (the README says so); its size is served as
//!   `outpost_dead_letters_upstream_bytes` ([`durable_file_bytes`]) for a fleet to alert on.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::telemetry::LogThrottle;

pub const MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Letters waiting to be written; beyond this, new ones are counted and not kept.
pub const CHANNEL_CAPACITY: usize = 1024;

pub fn file_path(data_dir: &Path) -> PathBuf {
    data_dir.join("dead-letters.jsonl")
}

/// Where the relay's durable letters go (never rotated: see the module docs).
pub fn durable_file_path(data_dir: &Path) -> PathBuf {
    data_dir.join("dead-letters-upstream.jsonl")
}

/// The size of the durable letters' file, 0 when there is none: served as
/// `outpost_dead_letters_upstream_bytes`, since Outpost never shrinks the file and only the
/// operator (deleting it) does.
pub fn durable_file_bytes(data_dir: &Path) -> std::io::Result<u64> {
    match std::fs::metadata(durable_file_path(data_dir)) {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// One event that rules failed on or sent here on purpose: one record per event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub ts_ms: u64,
    pub event_id: u64,
    /// The first of `rules` (what a reader of one-rule records looks at).
    pub rule: String,
    /// The first rule's reason.
    pub reason: String,
    pub topic: String,
    /// The original payload, as UTF-8 text or hex when it is not.
    #[serde(serialize_with = "payload_text")]
    pub payload: Vec<u8>,
    /// Every rule that sent the event here, in rule order, with its reason.
    #[serde(default)]
    pub rules: Vec<RuleReason>,
}

/// One rule's reason for a dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleReason {
    pub rule: String,
    pub reason: String,
    /// A `dead_letter` action sent it (rather than a failure).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deliberate: bool,
}

fn payload_text<S: serde::Serializer>(payload: &[u8], s: S) -> Result<S::Ok, S::Error> {
    match std::str::from_utf8(payload) {
        Ok(text) => s.serialize_str(text),
        Err(_) => s.serialize_str(&hex::encode(payload)),
    }
}

/// A letter whose event is deleted from the buffer only once the letter is on disk: `written`
/// is answered after the write and its `fdatasync`, with the error if either failed.
#[derive(Debug)]
pub struct DurableLetter {
    pub letter: DeadLetter,
    pub written: oneshot::Sender<Result<(), String>>,
}

/// Appends rules' letters, rotating first when the file would pass [`MAX_FILE_BYTES`].
fn append(path: &Path, lines: &[u8]) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() + lines.len() as u64 > MAX_FILE_BYTES) {
        std::fs::rename(path, path.with_extension("jsonl.1"))?;
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(lines)
}

/// Appends durable letters and makes them survive a power cut before returning: the data is
/// `fdatasync`ed, and a file created by this call has its directory entry synced too (without
/// it a crash could leave a letter written into a file that no directory names).
fn append_durable(path: &Path, lines: &[u8]) -> std::io::Result<()> {
    let created = !path.exists();
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(lines)?;
    file.sync_data()?;
    if created {
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

fn push_line(lines: &mut Vec<u8>, letter: &DeadLetter) {
    if let Ok(line) = serde_json::to_vec(letter) {
        lines.extend_from_slice(&line);
        lines.push(b'\n');
    }
}

/// Writes letters until every sender of both kinds is gone. One writer for both, so the file
/// is appended to and rotated by one task only.
pub async fn run(
    data_dir: PathBuf,
    mut letters: mpsc::Receiver<DeadLetter>,
    mut durable: mpsc::Receiver<DurableLetter>,
) {
    let path = file_path(&data_dir);
    let durable_path = durable_file_path(&data_dir);
    let mut log = LogThrottle::default();
    let (mut letters_open, mut durable_open) = (true, true);
    while letters_open || durable_open {
        let mut lines = Vec::new();
        let mut answers = Vec::new();
        tokio::select! {
            biased;
            received = durable.recv(), if durable_open => match received {
                Some(d) => {
                    push_line(&mut lines, &d.letter);
                    answers.push(d.written);
                    while let Ok(d) = durable.try_recv() {
                        push_line(&mut lines, &d.letter);
                        answers.push(d.written);
                    }
                }
                None => durable_open = false,
            },
            received = letters.recv(), if letters_open => match received {
                Some(first) => {
                    let mut next = Some(first);
                    while let Some(letter) = next {
                        push_line(&mut lines, &letter);
                        next = if lines.len() < 256 * 1024 { letters.try_recv().ok() } else { None };
                    }
                }
                None => letters_open = false,
            },
        }
        if lines.is_empty() {
            continue;
        }
        let durable = !answers.is_empty();
        let target = if durable { durable_path.clone() } else { path.clone() };
        let written = tokio::task::spawn_blocking(move || {
            if durable { append_durable(&target, &lines) } else { append(&target, &lines) }
        })
        .await;
        let result = match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        for answer in answers {
            let _ = answer.send(result.clone());
        }
        if let Err(error) = result {
            if let Some(folded) = log.ready(tokio::time::Instant::now()) {
                let file = if durable { &durable_path } else { &path };
                warn!(message = "cannot write the dead-letter file; check the data directory's free space and permissions", path = %file.display(), %error, similar_since_last_log = folded);
            }
        }
    }
}

/// The last `n` letters of both files, oldest first by their time stamp (for the CLI).
pub fn tail(data_dir: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let path = file_path(data_dir);
    let mut lines: Vec<(u64, String)> = Vec::new();
    for p in [path.with_extension("jsonl.1"), path, durable_file_path(data_dir)] {
        match std::fs::read_to_string(&p) {
            Ok(text) => lines.extend(text.lines().map(|l| (time_stamp(l), l.to_owned()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // Stable: letters with equal time stamps keep their file order.
    lines.sort_by_key(|(ts, _)| *ts);
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip).into_iter().map(|(_, l)| l).collect())
}

/// A line's `ts_ms`, or 0 for a line that is not a letter (shown first rather than hidden).
fn time_stamp(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["ts_ms"].as_u64()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn letters_are_appended_and_tailed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel(8);
        let (_durable_tx, durable_rx) = mpsc::channel(1);
        let writer = tokio::spawn(run(dir.path().to_owned(), rx, durable_rx));
        for i in 0..3u8 {
            let letter = DeadLetter {
                ts_ms: 1,
                event_id: u64::from(i),
                rule: "r".into(),
                reason: "bad".into(),
                topic: "t".into(),
                payload: vec![0xff, i],
                rules: vec![RuleReason { rule: "r".into(), reason: "bad".into(), deliberate: i == 2 }],
            };
            tx.send(letter).await.expect("send");
        }
        drop(tx);
        drop(_durable_tx);
        writer.await.expect("writer");
        let tail = tail(dir.path(), 2).expect("tail");
        assert_eq!(tail.len(), 2);
        let last: serde_json::Value = serde_json::from_str(&tail[1]).expect("json");
        assert_eq!(last["payload"], "ff02");
        assert_eq!(last["event_id"], 2);
        assert_eq!(last["rules"], serde_json::json!([{"rule": "r", "reason": "bad", "deliberate": true}]));
    }
}

#[cfg(test)]
mod durable_tests {
    use super::*;

    /// A durable letter is answered only once it is in the file, and a write that fails is
    /// answered with the error (its event then stays in the buffer).
    #[tokio::test]
    async fn durable_letters_are_answered_after_the_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_tx, rx) = mpsc::channel(1);
        let (durable_tx, durable_rx) = mpsc::channel(4);
        let writer = tokio::spawn(run(dir.path().to_owned(), rx, durable_rx));
        let letter = DeadLetter {
            ts_ms: 1,
            event_id: 7,
            rule: String::new(),
            reason: "upstream".into(),
            topic: "a/b".into(),
            payload: b"{}".to_vec(),
            rules: Vec::new(),
        };
        assert_eq!(durable_file_bytes(dir.path()).expect("size"), 0, "no file yet: nothing held");
        let (written, answer) = oneshot::channel();
        durable_tx.send(DurableLetter { letter: letter.clone(), written }).await.expect("send");
        assert_eq!(answer.await.expect("answered"), Ok(()));
        let lines = tail(dir.path(), 5).expect("tail");
        assert_eq!(lines.len(), 1, "the letter is in the file when the answer comes");
        assert_eq!(
            durable_file_bytes(dir.path()).expect("size"),
            lines[0].len() as u64 + 1,
            "the gauge is the file's size: the letter and its newline"
        );
        // A data directory that is gone: the write fails and says so.
        std::fs::remove_dir_all(dir.path()).expect("rm");
        let (written, answer) = oneshot::channel();
        durable_tx.send(DurableLetter { letter, written }).await.expect("send");
        assert!(answer.await.expect("answered").is_err());
        drop((durable_tx, _tx));
        writer.await.expect("writer");
    }

    /// A durable letter is its event's only copy: rules' letters rotating their file any number
    /// of times never take it with them, and `tail` shows both kinds in time order.
    #[tokio::test]
    async fn durable_letters_outlive_any_number_of_rotations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel(8);
        let (durable_tx, durable_rx) = mpsc::channel(1);
        let writer = tokio::spawn(run(dir.path().to_owned(), rx, durable_rx));
        let letter = |ts_ms, event_id, payload: Vec<u8>| DeadLetter {
            ts_ms,
            event_id,
            rule: "r".into(),
            reason: "bad".into(),
            topic: "t".into(),
            payload,
            rules: Vec::new(),
        };
        let (written, answer) = oneshot::channel();
        durable_tx
            .send(DurableLetter { letter: letter(5, 1, b"poison".to_vec()), written })
            .await
            .expect("send");
        assert_eq!(answer.await.expect("answered"), Ok(()));
        // Three rotations' worth of rules' letters, each after the durable one.
        let big = vec![b'x'; 256 * 1024];
        let rounds = 3 * MAX_FILE_BYTES as usize / big.len() + 1;
        for i in 0..rounds {
            tx.send(letter(10 + i as u64, 100 + i as u64, big.clone())).await.expect("send");
        }
        drop((tx, durable_tx));
        writer.await.expect("writer");
        let durable = std::fs::read_to_string(durable_file_path(dir.path())).expect("durable file");
        assert_eq!(durable.lines().count(), 1);
        assert!(durable.contains("\"payload\":\"poison\""), "{durable}");
        assert!(std::fs::metadata(file_path(dir.path())).expect("rules' file").len() <= MAX_FILE_BYTES);
        let all = tail(dir.path(), usize::MAX).expect("tail");
        let first: serde_json::Value = serde_json::from_str(&all[0]).expect("json");
        assert_eq!(first["payload"], "poison", "oldest first, across both files");
    }
}
