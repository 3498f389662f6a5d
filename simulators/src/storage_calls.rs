//! What a gateway hands the kernel for storage, counted from its system calls: the benches'
//! measure of flash wear (`window-bench`, `ingest-bench`'s WAN phases).
//!
//! # Why not `write_bytes`
//! On kernels whose page cache holds large folios (ext4 since Linux 6.16), `write_bytes` of
//! `/proc/PID/io` counts a whole folio (up to 2 MiB) each time a write makes a clean folio
//! dirty, however few bytes the write held: a 4 KiB `pwrite` into a file that was read with
//! readahead counted 2 MiB, 512 times what was written (measured, rules/README.md "What
//! windows cost"). So a [`Recording`] runs `perf record` on the gateway's `pwrite64`,
//! `fdatasync` and `fsync` tracepoints over a measured window and counts the bytes redb handed
//! the kernel (redb writes its pages with `pwrite64`, nothing else in the gateway does) and
//! the syncs (one per durable commit). Those bytes still reach the device through the page
//! cache and the file system (their journal and metadata come on top), but they are what the
//! gateway chose to write, and they do not depend on the folio size.
//!
//! `perf` needs root or `perf_event_paranoid` ≤ 1 with tracefs readable; [`perf_works`] checks
//! that once, so a bench can say why the columns are missing instead of failing.
//!
//! # Without perf: the store thread's own counters
//! The recording disturbs what it measures all the same: with it running, the outage
//! phase's PUBACK p99 was 0.36–4.2 s, without it 252 ms (back to back, same load). The
//! gateway confines redb to one thread, `outpost-store`, which does no other I/O, so that
//! thread's `wchar` and `syscw` (`/proc/PID/task/TID/io`: bytes passed to write system calls,
//! and their count) are the bytes redb handed the kernel, read at no cost to the gateway
//! ([`thread_writes`]). A bench reports those, and the perf figures where asked for.
//!
//! # Start early, count the window
//! Attaching costs: `perf record` takes about a second to start, and attaching the syscall
//! tracepoints to a running gateway stalled it for ~2 s (ingest-bench's outage phase: PUBACK
//! p99 2,130 ms with the recording started at the window, 252 ms without it). So a bench
//! starts the recording before its load, waits until perf is [`Recording::ready`], and counts
//! only the calls whose timestamps (`CLOCK_MONOTONIC`, [`monotonic_now`]) fall in the window.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::process::{ChildProcess, run_to_completion};

/// The gateway's storage system calls over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageCallCounts {
    pub pwrites: u64,
    /// Bytes in the `pwrite64` calls.
    pub pwrite_bytes: u64,
    /// `fdatasync` plus `fsync` calls.
    pub syncs: u64,
}

impl StorageCallCounts {
    /// Each count divided by `secs`.
    pub fn per_second(&self, secs: f64) -> StorageCalls {
        StorageCalls {
            pwrite_bytes: self.pwrite_bytes as f64 / secs,
            pwrites: self.pwrites as f64 / secs,
            syncs: self.syncs as f64 / secs,
        }
    }
}

/// The gateway's storage system calls in a measured window, per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StorageCalls {
    /// Bytes in `pwrite64` calls.
    pub pwrite_bytes: f64,
    pub pwrites: f64,
    /// `fdatasync` plus `fsync` calls: one per durable redb commit.
    pub syncs: f64,
}

/// Checks that `perf` runs and can record a syscall tracepoint, on a short `true`.
pub async fn perf_works(perf: &Path) -> anyhow::Result<()> {
    let mut command = std::process::Command::new(perf);
    command.args(["record", "-q", "-e", "syscalls:sys_enter_fdatasync", "-o", "/dev/null", "--", "true"]);
    let output =
        tokio::task::spawn_blocking(move || run_to_completion(command)).await.context("perf panicked")??;
    anyhow::ensure!(
        output.status.success(),
        "{} cannot record syscall tracepoints ({}): {}",
        perf.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// The tracepoints recorded during the measured window.
const TRACEPOINTS: &str = "syscalls:sys_enter_pwrite64,syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync";

/// The thread that holds redb in the gateway (`gateway/src/buffer/worker.rs`).
pub const STORE_THREAD: &str = "outpost-store";

/// What one thread passed to write system calls so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThreadWrites {
    /// `wchar`: bytes.
    pub bytes: u64,
    /// `syscw`: calls.
    pub calls: u64,
}

/// The writes of the thread of process `pid` named `name` (its `comm`), or an error naming
/// the threads there are.
pub fn thread_writes(pid: u32, name: &str) -> anyhow::Result<ThreadWrites> {
    let tasks = format!("/proc/{pid}/task");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        let path = entry.with_context(|| format!("cannot list {tasks}"))?.path();
        // A thread that exited between the listing and the read is skipped.
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else { continue };
        if comm.trim_end() == name {
            let io = path.join("io");
            let text =
                std::fs::read_to_string(&io).with_context(|| format!("cannot read {}", io.display()))?;
            return parse_io(&text).with_context(|| format!("no wchar/syscw in {}: {text}", io.display()));
        }
        names.push(comm.trim_end().to_string());
    }
    anyhow::bail!("process {pid} has no thread named {name} (its threads: {})", names.join(", "))
}

/// `wchar` and `syscw` of a `/proc/.../io` file.
fn parse_io(text: &str) -> Option<ThreadWrites> {
    let field = |key: &str| {
        text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(':')?.trim().parse::<u64>().ok())
    };
    Some(ThreadWrites { bytes: field("wchar")?, calls: field("syscw")? })
}

/// How long perf may take to start recording.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `CLOCK_MONOTONIC` now, in seconds: the clock of a [`Recording`]'s timestamps (std's
/// `Instant` reads the same clock but does not show it).
#[allow(unsafe_code)]
pub fn monotonic_now() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes one timespec into `now`, which lives across the call;
    // CLOCK_MONOTONIC exists on every Linux, so it cannot fail with EINVAL, and `now` is a
    // valid address, so not with EFAULT.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    debug_assert_eq!(result, 0);
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// A `perf record` of [`TRACEPOINTS`] in process `pid`, until [`Recording::finish`].
pub struct Recording {
    perf: PathBuf,
    child: ChildProcess,
    data: PathBuf,
}

impl Recording {
    /// Starts recording process `pid`; the data goes to `<dir>/storage-calls.perf.data`.
    pub fn start(perf: &Path, pid: u32, dir: &Path) -> anyhow::Result<Recording> {
        let data = dir.join("storage-calls.perf.data");
        let mut command = std::process::Command::new(perf);
        command
            .args(["record", "-q", "-k", "CLOCK_MONOTONIC", "-e", TRACEPOINTS, "-p", &pid.to_string(), "-o"])
            .arg(&data);
        let child = ChildProcess::spawn("perf record", command)?;
        Ok(Recording { perf: perf.to_owned(), child, data })
    }

    /// Waits until perf has attached: it writes its data file's header once the events are
    /// open.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let data = self.data.clone();
        crate::harness::wait_until("perf record wrote its header", READY_TIMEOUT, || {
            std::fs::metadata(&data).is_ok_and(|meta| meta.len() > 0)
        })
        .await?;
        self.child.check_running()
    }

    /// Stops the recording (SIGINT, as perf expects) and counts the calls made between the
    /// `CLOCK_MONOTONIC` times `window` ([`monotonic_now`]).
    pub async fn finish(mut self, window: std::ops::Range<f64>) -> anyhow::Result<StorageCallCounts> {
        self.child.signal(libc::SIGINT)?;
        let status = self.child.wait_exit(Duration::from_secs(30)).await?;
        // perf record writes its data on SIGINT, then raises the signal again to exit by it.
        use std::os::unix::process::ExitStatusExt as _;
        anyhow::ensure!(
            status.success() || status.signal() == Some(libc::SIGINT),
            "perf record failed ({status}): {}",
            self.child.tail()
        );
        let mut command = std::process::Command::new(&self.perf);
        command.args(["script", "-F", "time,event,trace", "-i"]).arg(&self.data);
        let script = tokio::task::spawn_blocking(move || run_to_completion(command))
            .await
            .context("perf script panicked")??;
        anyhow::ensure!(script.status.success(), "perf script failed ({})", script.status);
        // No calls at all is a figure too: a gateway whose upstream acknowledges in time
        // commits nothing.
        Ok(count_storage_calls(&String::from_utf8_lossy(&script.stdout), window))
    }
}

/// The calls in `window` in `perf script -F time,event,trace` output, whose lines read
/// `48859.726803: syscalls:sys_enter_pwrite64: fd: 0x00000009, buf: 0x…, count: 0x00001000,
/// pos: 0x…` (the time in seconds).
fn count_storage_calls(script: &str, window: std::ops::Range<f64>) -> StorageCallCounts {
    let mut counts = StorageCallCounts::default();
    for line in script.lines() {
        let time = line.split_once(':').and_then(|(time, _)| time.trim().parse::<f64>().ok());
        if !time.is_some_and(|time| window.contains(&time)) {
            continue;
        }
        if line.contains("sys_enter_pwrite64") {
            counts.pwrites += 1;
            let count = line
                .split_once("count: 0x")
                .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_hexdigit()).next())
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            counts.pwrite_bytes += count.unwrap_or(0);
        } else if line.contains("sys_enter_fdatasync") || line.contains("sys_enter_fsync") {
            counts.syncs += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines `perf script -F event,trace` prints for the three tracepoints.
    #[test]
    fn storage_calls_are_counted_from_perf_script() {
        let script = "\
            48858.000001: syscalls:sys_enter_pwrite64: fd: 0x00000009, buf: 0x7fcb840042d0, count: 0x00000200, pos: 0x00000000
            48859.726803: syscalls:sys_enter_pwrite64: fd: 0x00000009, buf: 0x7fcb840042d0, count: 0x00000140, pos: 0x00000000
            48859.726900:  syscalls:sys_enter_pwrite64: fd: 0x00000009, buf: 0x7fcb7c159e30, count: 0x00010000, pos: 0x00121000
            48860.000000: syscalls:sys_enter_fdatasync: fd: 0x00000009
            48861.5: syscalls:sys_enter_fsync: fd: 0x00000009
            48862.000000: syscalls:sys_enter_pwrite64: fd: 0x00000009, buf: 0x7fcb7c159e30, count: 0x00001000, pos: 0x00002000
            syscalls:sys_enter_fsync: fd: 0x00000009
        ";
        // The first and the last call fall outside the window; a line without a time is not
        // counted.
        let counts = count_storage_calls(script, 48859.0..48862.0);
        assert_eq!(counts, StorageCallCounts { pwrites: 2, pwrite_bytes: 0x140 + 0x10000, syncs: 2 });
        assert_eq!(count_storage_calls(script, 0.0..1e9).pwrites, 4);
        assert_eq!(count_storage_calls("", 0.0..1e9), StorageCallCounts::default());
    }

    #[test]
    fn the_monotonic_clock_counts_seconds_as_instant_does() {
        let (before, instant) = (monotonic_now(), std::time::Instant::now());
        // Some work between the two reads, so both clocks move by more than their resolution.
        let sum: u64 = (0..2_000_000_u64).map(|n| n % 7).sum();
        let (elapsed, after) = (instant.elapsed().as_secs_f64(), monotonic_now());
        assert!(sum > 0 && before > 0.0);
        assert!(((after - before) - elapsed).abs() < 0.001, "{before} {after} {elapsed}");
    }

    #[test]
    fn io_counters_are_read_by_name() {
        let text = "rchar: 4096\nwchar: 123456\nsyscr: 3\nsyscw: 42\nread_bytes: 0\nwrite_bytes: 2097152\n";
        assert_eq!(parse_io(text), Some(ThreadWrites { bytes: 123_456, calls: 42 }));
        assert_eq!(parse_io("rchar: 1\nwchar: 2\n"), None);
    }

    #[test]
    fn this_process_main_thread_is_found_by_name() {
        let pid = std::process::id();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/comm")).expect("comm");
        let writes = thread_writes(pid, comm.trim_end()).expect("the main thread");
        assert!(writes.bytes >= writes.calls, "{writes:?}");
        let error = thread_writes(pid, "no-such-thread").expect_err("no such thread").to_string();
        assert!(error.contains("has no thread named no-such-thread"), "{error}");
    }

    #[test]
    fn per_second_divides_every_count() {
        let counts = StorageCallCounts { pwrites: 30, pwrite_bytes: 120_000, syncs: 6 };
        assert_eq!(
            counts.per_second(3.0),
            StorageCalls { pwrite_bytes: 40_000.0, pwrites: 10.0, syncs: 2.0 }
        );
    }
}
