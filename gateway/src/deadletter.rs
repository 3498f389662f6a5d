//! The dead-letter store: events rules could not process (or sent here with a
//! `dead_letter` action), one record per event with every rule and its reason.
//!
//! A JSON-lines file, `<data_dir>/dead-letters.jsonl`, rotated to `dead-letters.jsonl.1` at
//! [`MAX_FILE_BYTES`], read with `outpost rules dead-letters`. It is a diagnostic record, not
//! part of the delivery guarantee: writes are batched and not fsynced, and when the store
//! cannot keep up, letters are counted (`dead_letters_unsaved`) instead of slowing routing.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;

use crate::telemetry::LogThrottle;

pub const MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Letters waiting to be written; beyond this, new ones are counted and not kept.
pub const CHANNEL_CAPACITY: usize = 1024;

pub fn file_path(data_dir: &Path) -> PathBuf {
    data_dir.join("dead-letters.jsonl")
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
        Err(_) => s.serialize_str(&payload.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}

fn append(path: &Path, lines: &[u8]) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() + lines.len() as u64 > MAX_FILE_BYTES) {
        std::fs::rename(path, path.with_extension("jsonl.1"))?;
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(lines)
}

/// Writes letters until every sender is gone.
pub async fn run(data_dir: PathBuf, mut letters: mpsc::Receiver<DeadLetter>) {
    let path = file_path(&data_dir);
    let mut log = LogThrottle::default();
    while let Some(first) = letters.recv().await {
        let mut lines = Vec::new();
        let mut next = Some(first);
        while let Some(letter) = next {
            if let Ok(line) = serde_json::to_vec(&letter) {
                lines.extend_from_slice(&line);
                lines.push(b'\n');
            }
            next = if lines.len() < 256 * 1024 { letters.try_recv().ok() } else { None };
        }
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || append(&target, &lines)).await;
        if let Some(error) = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        } {
            if let Some(folded) = log.ready(tokio::time::Instant::now()) {
                warn!(message = "cannot write the dead-letter file", path = %path.display(), %error, similar_since_last_log = folded);
            }
        }
    }
}

/// The last `n` letters, oldest first (for the CLI).
pub fn tail(data_dir: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let path = file_path(data_dir);
    let mut lines: Vec<String> = Vec::new();
    for p in [path.with_extension("jsonl.1"), path] {
        match std::fs::read_to_string(&p) {
            Ok(text) => lines.extend(text.lines().map(str::to_owned)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn letters_are_appended_and_tailed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel(8);
        let writer = tokio::spawn(run(dir.path().to_owned(), rx));
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
        writer.await.expect("writer");
        let tail = tail(dir.path(), 2).expect("tail");
        assert_eq!(tail.len(), 2);
        let last: serde_json::Value = serde_json::from_str(&tail[1]).expect("json");
        assert_eq!(last["payload"], "ff02");
        assert_eq!(last["event_id"], 2);
        assert_eq!(last["rules"], serde_json::json!([{"rule": "r", "reason": "bad", "deliberate": true}]));
    }
}
