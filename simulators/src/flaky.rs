//! A TCP proxy that takes the link down on a schedule or on command, to test reconnects and
//! store-and-forward, and that can add latency and cap bandwidth.
//!
//! The link is either up or down. Entering a down phase closes every proxied connection; while
//! down, new connections are accepted and closed at once, as an unreachable upstream behind a
//! NAT would look. While up, bytes are forwarded both ways. `run_flaky_link` alternates between
//! up (`up_for`) and down (`down_for`), starting up; `run_switched_link` follows a
//! `watch::Receiver<bool>` (true = up) that the caller sets.
//!
//! Shaping: each chunk read is delivered `extra_latency` after it left the sender, and, with a
//! bandwidth cap, no sooner than the cap allows. The cap is one token bucket per direction,
//! shared by all connections, as on a real metered link.
//!
//! **Invariant:** every connection task belongs to the up phase it was accepted in and ends when
//! that phase (or the proxy) ends, so no connection outlives a down phase.

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// When the link is up and down, and how slow it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlakySchedule {
    /// How long each up phase lasts.
    pub up_for: Duration,
    /// How long each down phase lasts; zero means the link never goes down.
    pub down_for: Duration,
    /// Added to every chunk's one-way delivery time.
    pub extra_latency: Duration,
}

/// How the link treats the bytes it forwards while up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkShaping {
    /// Added to every chunk's one-way delivery time.
    pub extra_latency: Duration,
    /// The most bytes per second forwarded in each direction, over all connections.
    pub bytes_per_sec: Option<NonZeroU64>,
}

/// Chunks in flight per direction; a full channel stops reading from the sender's socket.
const CHUNKS_IN_FLIGHT: usize = 64;
/// The read buffer size per direction.
const CHUNK_SIZE: usize = 16 * 1024;
/// With a bandwidth cap, a chunk holds at most this fraction of a second's worth of bytes, so
/// a slow link paces in small steps instead of bursts.
const CHUNKS_PER_SECOND: u64 = 20;

/// Proxies connections from `listen` to `upstream` following `schedule` until `cancel` fires,
/// then waits for its connection tasks to end.
pub async fn run_flaky_link(
    listen: TcpListener,
    upstream: SocketAddr,
    schedule: FlakySchedule,
    cancel: CancellationToken,
) {
    run_shaped_flaky_link(listen, upstream, schedule, None, cancel).await;
}

/// Like [`run_flaky_link`], with at most `bytes_per_sec` forwarded in each direction.
pub async fn run_shaped_flaky_link(
    listen: TcpListener,
    upstream: SocketAddr,
    schedule: FlakySchedule,
    bytes_per_sec: Option<NonZeroU64>,
    cancel: CancellationToken,
) {
    let (switch, up) = watch::channel(true);
    let shaping = LinkShaping { extra_latency: schedule.extra_latency, bytes_per_sec };
    let flip = async move {
        if schedule.down_for.is_zero() {
            return std::future::pending().await;
        }
        let mut phase_ends = Instant::now() + schedule.up_for;
        loop {
            tokio::time::sleep_until(phase_ends).await;
            let now_up = !*switch.borrow();
            phase_ends += if now_up { schedule.up_for } else { schedule.down_for };
            switch.send_replace(now_up);
        }
    };
    tokio::select! {
        () = flip => {}
        () = run_switched_link(listen, upstream, up, shaping, cancel) => {}
    }
}

/// Proxies connections from `listen` to `upstream` while `up` holds true, until `cancel` fires,
/// then waits for its connection tasks to end. If the sender of `up` is dropped, the link stays
/// in its last state.
pub async fn run_switched_link(
    listen: TcpListener,
    upstream: SocketAddr,
    mut up: watch::Receiver<bool>,
    shaping: LinkShaping,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let buckets = (Bucket::new(shaping.bytes_per_sec), Bucket::new(shaping.bytes_per_sec));
    let mut is_up = *up.borrow_and_update();
    let mut switch_alive = true;
    let mut phase = cancel.child_token();
    if !is_up {
        phase.cancel();
    }
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            changed = up.changed(), if switch_alive => {
                if changed.is_err() {
                    switch_alive = false;
                    continue;
                }
                let now_up = *up.borrow_and_update();
                if now_up != is_up {
                    if now_up {
                        info!("link up");
                        phase = cancel.child_token();
                    } else {
                        info!("link down");
                        phase.cancel();
                    }
                    is_up = now_up;
                }
            }
            accepted = listen.accept() => match accepted {
                Ok((client, peer)) if is_up => {
                    debug!(%peer, "proxying");
                    let buckets = (Arc::clone(&buckets.0), Arc::clone(&buckets.1));
                    tracker.spawn(proxy(client, upstream, shaping.extra_latency, buckets, phase.clone()));
                }
                Ok((client, peer)) => {
                    debug!(%peer, "link down; refusing");
                    drop(client);
                }
                Err(error) => {
                    // E.g. out of file descriptors; wait a little instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(10)) => {}
                    }
                }
            },
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// A bandwidth cap for one direction: the time the link is busy until, advanced by each chunk.
#[derive(Debug)]
struct Bucket {
    bytes_per_sec: Option<NonZeroU64>,
    busy_until: Mutex<Option<Instant>>,
}

impl Bucket {
    fn new(bytes_per_sec: Option<NonZeroU64>) -> Arc<Bucket> {
        Arc::new(Bucket { bytes_per_sec, busy_until: Mutex::new(None) })
    }

    /// The largest chunk to read at once.
    fn chunk_size(&self) -> usize {
        let per_step = self.bytes_per_sec.map_or(u64::MAX, |rate| (rate.get() / CHUNKS_PER_SECOND).max(1));
        usize::try_from(per_step).unwrap_or(usize::MAX).min(CHUNK_SIZE)
    }

    /// Reserves the link for `len` bytes read at `now`; returns when the last of them has left.
    fn reserve(&self, now: Instant, len: usize) -> Instant {
        let Some(rate) = self.bytes_per_sec else { return now };
        let mut busy_until = self.busy_until.lock().unwrap_or_else(PoisonError::into_inner);
        let start = busy_until.map_or(now, |busy| busy.max(now));
        let done = start + Duration::from_secs_f64(len as f64 / rate.get() as f64);
        *busy_until = Some(done);
        done
    }
}

/// Forwards one connection until both directions finish or `phase` ends.
async fn proxy(
    client: TcpStream,
    upstream: SocketAddr,
    latency: Duration,
    (to_upstream, to_client): (Arc<Bucket>, Arc<Bucket>),
    phase: CancellationToken,
) {
    let server = tokio::select! {
        () = phase.cancelled() => return,
        connected = TcpStream::connect(upstream) => match connected {
            Ok(server) => server,
            Err(error) => {
                debug!(%upstream, %error, "upstream unreachable; closing the client");
                return;
            }
        },
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let forward = async {
        tokio::join!(
            pipe(client_read, server_write, latency, &to_upstream),
            pipe(server_read, client_write, latency, &to_client)
        )
    };
    tokio::select! {
        () = phase.cancelled() => {}
        _ = forward => {}
    }
}

/// Copies one direction, delivering each chunk `latency` after it left the bandwidth cap. At
/// end of input it delivers what is left, then shuts the write side down.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, latency: Duration, bucket: &Bucket) {
    let (chunks_tx, mut chunks_rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let read = async move {
        let mut buffer = vec![0; bucket.chunk_size()];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = bucket.reserve(Instant::now(), n) + latency;
                    if chunks_tx.send((due, buffer[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = chunks_rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo server");
        let addr = listener.local_addr().expect("echo server address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn start_link(schedule: FlakySchedule, cancel: &CancellationToken) -> SocketAddr {
        let upstream = echo_server().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        tokio::spawn(run_flaky_link(listener, upstream, schedule, cancel.clone()));
        addr
    }

    #[tokio::test]
    async fn forwards_both_ways_while_up() {
        let cancel = CancellationToken::new();
        let schedule = FlakySchedule {
            up_for: Duration::from_secs(3600),
            down_for: Duration::ZERO,
            extra_latency: Duration::from_millis(5),
        };
        let proxy = start_link(schedule, &cancel).await;
        let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
        let message = vec![7u8; 100_000];
        stream.write_all(&message).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.expect("read echo");
        assert_eq!(echoed, message);
        cancel.cancel();
    }

    #[tokio::test]
    async fn closes_connections_when_down_and_refuses_new_ones() {
        let cancel = CancellationToken::new();
        let schedule = FlakySchedule {
            up_for: Duration::from_millis(500),
            down_for: Duration::from_secs(3600),
            extra_latency: Duration::ZERO,
        };
        let proxy = start_link(schedule, &cancel).await;
        let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
        stream.write_all(b"ping").await.expect("write");
        let mut echoed = [0u8; 4];
        stream.read_exact(&mut echoed).await.expect("read echo");
        assert_eq!(&echoed, b"ping");

        // The read ends when the down phase begins.
        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest).await;
        assert!(!matches!(read, Ok(n) if n > 0), "the link closed the connection");

        let mut refused = TcpStream::connect(proxy).await.expect("the proxy still accepts");
        let _ = refused.write_all(b"ping").await;
        let mut buffer = [0u8; 4];
        let read = refused.read(&mut buffer).await;
        assert!(!matches!(read, Ok(n) if n > 0), "a new connection is closed at once");
        cancel.cancel();
    }

    async fn start_switched(
        shaping: LinkShaping,
        cancel: &CancellationToken,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let upstream = echo_server().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (switch, up) = watch::channel(true);
        tokio::spawn(run_switched_link(listener, upstream, up, shaping, cancel.clone()));
        (addr, switch)
    }

    async fn round_trip(proxy: SocketAddr, message: &[u8]) -> Duration {
        let started = Instant::now();
        let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
        stream.write_all(message).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.expect("read echo");
        assert_eq!(echoed, message);
        started.elapsed()
    }

    #[tokio::test]
    async fn adds_latency_each_way() {
        let cancel = CancellationToken::new();
        let shaping = LinkShaping { extra_latency: Duration::from_millis(50), bytes_per_sec: None };
        let (proxy, _switch) = start_switched(shaping, &cancel).await;
        let elapsed = round_trip(proxy, b"ping").await;
        assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
        cancel.cancel();
    }

    #[tokio::test]
    async fn caps_bandwidth() {
        let cancel = CancellationToken::new();
        let rate = NonZeroU64::new(100_000).expect("non-zero");
        let shaping = LinkShaping { extra_latency: Duration::ZERO, bytes_per_sec: Some(rate) };
        let (proxy, _switch) = start_switched(shaping, &cancel).await;
        // 30 kB each way at 100 kB/s: at least 0.3 s, the two directions overlapping.
        let elapsed = round_trip(proxy, &vec![1u8; 30_000]).await;
        assert!(elapsed >= Duration::from_millis(290), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        cancel.cancel();
    }

    #[test]
    fn bucket_paces_chunks_back_to_back() {
        let bucket = Bucket::new(NonZeroU64::new(1_000));
        let now = Instant::now();
        assert_eq!(bucket.reserve(now, 500), now + Duration::from_millis(500));
        assert_eq!(bucket.reserve(now, 500), now + Duration::from_secs(1));
        let later = now + Duration::from_secs(5);
        assert_eq!(bucket.reserve(later, 100), later + Duration::from_millis(100));
        assert_eq!(bucket.chunk_size(), 50);
        assert_eq!(Bucket::new(None).reserve(now, 1_000_000), now);
    }

    #[tokio::test]
    async fn switch_takes_the_link_down_and_up() {
        let cancel = CancellationToken::new();
        let (proxy, switch) = start_switched(LinkShaping::default(), &cancel).await;
        let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
        stream.write_all(b"ping").await.expect("write");
        let mut echoed = [0u8; 4];
        stream.read_exact(&mut echoed).await.expect("read echo");

        switch.send_replace(false);
        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest).await;
        assert!(!matches!(read, Ok(n) if n > 0), "the link closed the connection");

        switch.send_replace(true);
        // The switch is applied by the proxy task; a connection accepted before it sees the
        // change is refused, so retry until one is proxied.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
            let _ = stream.write_all(b"pong").await;
            let mut echoed = [0u8; 4];
            if stream.read_exact(&mut echoed).await.is_ok() {
                assert_eq!(&echoed, b"pong");
                break;
            }
            assert!(attempts < 100, "the link never came back up");
        }
        cancel.cancel();
    }
}
