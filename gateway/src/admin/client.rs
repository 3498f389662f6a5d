//! The operator's end of `outpost buffer …`: answers from the buffer file itself when no
//! daemon holds it ([`FileView`], [`import::into_store`]), and from the daemon over its admin
//! socket when one does (protocol: [`super`]). The `outpost` command only prints what this
//! returns.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::{ERROR_PREFIX, Request, WireRecord, socket_path};
use crate::buffer::BufferError;
use crate::buffer::import::{self, ImportError, ImportSummary, Source};
use crate::buffer::inspect::{FileView, OpenError, Opened, StatsReport, export_line};
use crate::event::now_ms;

/// Records per read of the file while printing them.
const FILE_CHUNK: usize = 1000;

/// Why `outpost buffer stats|peek|export` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(
        "the buffer is locked by a running outpost, but its admin socket {} does not answer: {error}",
        socket.display()
    )]
    NoAnswer { socket: PathBuf, error: std::io::Error },
    #[error(
        "no running outpost answers on {}: {error}; is the gateway running with this data dir (--data-dir or the config's data_dir)?",
        socket.display()
    )]
    NotRunning { socket: PathBuf, error: std::io::Error },
    #[error("the gateway's [http] endpoint {addr} (`http.listen`): {error}")]
    Http { addr: std::net::SocketAddr, error: String },
    #[error("the daemon answered: {0}")]
    Daemon(String),
    #[error("the daemon's answer is not valid JSON: {0}")]
    BadStats(serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Where a data dir's buffer is read from.
pub enum Reader {
    File(FileView),
    /// The running daemon's admin socket.
    Daemon(PathBuf),
}

impl Reader {
    pub fn open(data_dir: &Path) -> Result<Reader, ClientError> {
        Ok(match FileView::open(data_dir)? {
            Opened::File(view) => Reader::File(view),
            Opened::HeldByDaemon => Reader::Daemon(socket_path(data_dir)),
        })
    }

    pub fn stats(&self) -> Result<StatsReport, ClientError> {
        match self {
            Reader::File(view) => Ok(view.stats(now_ms())?),
            Reader::Daemon(socket) => {
                serde_json::from_str(ask(socket, Request::Stats)?.trim()).map_err(ClientError::BadStats)
            }
        }
    }

    /// Hands `line` the first `limit` records in send order as JSON lines (every record
    /// without a limit), and returns how many.
    pub fn records(
        &self,
        limit: Option<usize>,
        mut line: impl FnMut(&str) -> std::io::Result<()>,
    ) -> Result<u64, ClientError> {
        let mut n = 0;
        match self {
            Reader::File(view) => {
                let mut after = None;
                let mut left = limit.unwrap_or(usize::MAX);
                while left > 0 {
                    let records = view.records_after(after, left.min(FILE_CHUNK))?;
                    let Some(last) = records.last() else { break };
                    after = Some(last.key());
                    left -= records.len();
                    for record in &records {
                        line(&export_line(record))?;
                        n += 1;
                    }
                }
            }
            Reader::Daemon(socket) => {
                let request = limit.map_or(Request::Export, Request::Peek);
                for text in ask(socket, request)?.lines() {
                    line(text)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// `status` over the admin socket: the daemon's state as JSON (`outpost status` without
/// `[http]`).
pub fn status(data_dir: &Path) -> Result<serde_json::Value, ClientError> {
    let socket = socket_path(data_dir);
    let answer = ask(&socket, Request::Status).map_err(not_running)?;
    serde_json::from_str(answer.trim()).map_err(ClientError::BadStats)
}

/// `GET /status` from the gateway's `[http]` endpoint at `addr` (an unspecified address is
/// asked on loopback), with the bearer token when one is configured.
pub fn status_over_http(
    addr: std::net::SocketAddr,
    authorization: Option<String>,
) -> Result<serde_json::Value, ClientError> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let http = |e: String| ClientError::Http { addr, error: e };
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| http(e.to_string()))?;
    stream.set_read_timeout(Some(timeout))?;
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(stream, "GET /status HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.take(4 << 20).read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(|| http("no HTTP answer".to_owned()))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(http(format!("answered {status_line:?}: {}", body.trim())));
    }
    // hyper answers a small body with Content-Length; a chunked one would carry chunk sizes.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    serde_json::from_str(body.trim()).map_err(ClientError::BadStats)
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Without a buffer lock to go by, a socket that does not answer means no daemon.
fn not_running(e: ClientError) -> ClientError {
    match e {
        ClientError::NoAnswer { socket, error } => ClientError::NotRunning { socket, error },
        other => other,
    }
}

/// `outpost tap`: attaches to the daemon's tap and hands `record` each record line (and
/// `{"missed": N}` lines) until the daemon closes the connection or `record` fails. `attached`
/// is called once the daemon confirmed, with the stages it taps.
pub fn tap(
    data_dir: &Path,
    request: &super::TapRequest,
    attached: impl FnOnce(&[crate::tap::TapStage]),
    mut record: impl FnMut(&str) -> std::io::Result<()>,
) -> Result<(), ClientError> {
    let socket = socket_path(data_dir);
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)
        .map_err(|error| ClientError::NotRunning { socket: socket.clone(), error })?;
    stream.write_all(request.line_of_tap().as_bytes())?;
    let mut lines = BufReader::new(stream).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    if let Some(error) = first.strip_prefix(ERROR_PREFIX) {
        return Err(ClientError::Daemon(error.trim().to_owned()));
    }
    let hello: super::Attached = serde_json::from_str(&first)
        .map_err(|e| ClientError::Daemon(format!("unexpected answer {first:?}: {e}")))?;
    attached(&hello.attached);
    for line in lines {
        record(&line?)?;
    }
    Ok(())
}

/// Sends one request to the daemon and returns its answer.
fn ask(socket: &Path, request: Request) -> Result<String, ClientError> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|error| ClientError::NoAnswer { socket: socket.to_owned(), error })?;
    stream.write_all(request.line().as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if let Some(error) = answer.strip_prefix(ERROR_PREFIX) {
        return Err(ClientError::Daemon(error.trim().to_owned()));
    }
    Ok(answer)
}

/// `outpost buffer import FILE`: merges `file` into the buffer in `data_dir`, directly or
/// through the running daemon, and says what it did.
pub fn import(file: &Path, data_dir: &Path) -> Result<String, ImportError> {
    if import::is_own_buffer(file, data_dir) {
        return Err(ImportError::SameFile { path: file.to_owned() });
    }
    let source = Source::open(file)?;
    let mut summary = ImportSummary::default();
    let how = match import::into_store(&source, data_dir, &mut summary) {
        Ok(path) => format!("into {}", path.display()),
        Err(ImportError::Target(BufferError::Locked { path })) => {
            let answer = import_through_daemon(&socket_path(data_dir), &source, &mut summary)?;
            summary.imported = answer.imported;
            summary.already_imported = answer.already_imported;
            summary.refused = answer.refused;
            format!("into the running outpost's buffer ({})", path.display())
        }
        Err(e) => return Err(e),
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
    for problem in &summary.problems {
        out += &format!("\n{problem}");
    }
    Ok(out)
}

/// Streams the source's records to the daemon's admin socket (`import`, then one JSON line
/// per record, then end of input) and returns its answer.
fn import_through_daemon(
    socket: &Path,
    source: &Source,
    summary: &mut ImportSummary,
) -> Result<ImportSummary, ImportError> {
    let io = |error| ImportError::Socket { socket: socket.to_owned(), error };
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(io)?;
    let mut writer = std::io::BufWriter::new(stream.try_clone().map_err(io)?);
    let sent = writer.write_all(Request::Import.line().as_bytes()).map_err(io).and_then(|()| {
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
    if let Some(error) = answer.strip_prefix(ERROR_PREFIX) {
        return Err(ImportError::Daemon(error.trim().to_owned()));
    }
    sent?;
    read.map_err(io)?;
    serde_json::from_str(answer.trim())
        .map_err(|e| ImportError::Daemon(format!("unexpected answer {answer:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::buffer::store::file_path;
    use crate::buffer::{Batch, Record, Store};

    #[test]
    fn an_offline_import_says_what_it_did_and_refuses_the_buffer_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        {
            let (mut store, _) = Store::open(&src).expect("source");
            let inserts = (1..=4)
                .map(|seq| Record {
                    priority: 5,
                    seq,
                    event_id: seq,
                    enqueued_ms: 1_700_000_000_000,
                    expires_ms: None,
                    topic: format!("sensors/{seq}"),
                    qos: 1,
                    payload: Bytes::from_static(b"x"),
                    props: None,
                })
                .collect();
            store.apply(&Batch { inserts, ..Batch::default() }).expect("fill");
        }
        let file = file_path(&src);
        let first = import(&file, &dst).expect("import");
        assert_eq!(
            first,
            format!(
                "imported 4 events from {} into {}; 0 were already imported",
                file.display(),
                file_path(&dst).display()
            )
        );
        let second = import(&file, &dst).expect("import again");
        assert!(second.starts_with("imported 0 events from"), "{second}");
        assert!(second.ends_with("4 were already imported"), "{second}");
        let err = import(&file_path(&dst), &dst).expect_err("itself").to_string();
        assert!(err.contains("this data dir's own buffer"), "{err}");
    }
}
