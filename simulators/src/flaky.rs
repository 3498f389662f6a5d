//! A TCP proxy that takes the link down on a schedule, to test reconnects and store-and-forward.
//!
//! The link alternates between up (`up_for`) and down (`down_for`), starting up. Entering a down
//! phase closes every proxied connection; while down, new connections are accepted and closed
//! at once, as an unreachable upstream behind a NAT would look. While up, bytes are forwarded
//! both ways, each chunk delayed by `extra_latency` without limiting throughput.
//!
//! **Invariant:** every connection task belongs to the up phase it was accepted in and ends when
//! that phase (or the proxy) ends, so no connection outlives a down phase.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
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

/// Chunks in flight per direction; a full channel stops reading from the sender's socket.
const CHUNKS_IN_FLIGHT: usize = 64;
/// The read buffer size per direction.
const CHUNK_SIZE: usize = 16 * 1024;

/// Proxies connections from `listen` to `upstream` following `schedule` until `cancel` fires,
/// then waits for its connection tasks to end.
pub async fn run_flaky_link(
    listen: TcpListener,
    upstream: SocketAddr,
    schedule: FlakySchedule,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let flapping = !schedule.down_for.is_zero();
    let mut up = true;
    let mut phase = cancel.child_token();
    let mut phase_ends = Instant::now() + schedule.up_for;
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(phase_ends), if flapping => {
                if up {
                    info!(down_for = ?schedule.down_for, "link down");
                    phase.cancel();
                    phase_ends += schedule.down_for;
                } else {
                    info!(up_for = ?schedule.up_for, "link up");
                    phase = cancel.child_token();
                    phase_ends += schedule.up_for;
                }
                up = !up;
            }
            accepted = listen.accept() => match accepted {
                Ok((client, peer)) if up => {
                    debug!(%peer, "proxying");
                    tracker.spawn(proxy(client, upstream, schedule.extra_latency, phase.clone()));
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

/// Forwards one connection until both directions finish or `phase` ends.
async fn proxy(client: TcpStream, upstream: SocketAddr, latency: Duration, phase: CancellationToken) {
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
        tokio::join!(pipe(client_read, server_write, latency), pipe(server_read, client_write, latency))
    };
    tokio::select! {
        () = phase.cancelled() => {}
        _ = forward => {}
    }
}

/// Copies one direction, delivering each chunk `latency` after it was read. At end of input it
/// delivers what is left, then shuts the write side down.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, latency: Duration) {
    let (chunks_tx, mut chunks_rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let read = async move {
        let mut buffer = vec![0; CHUNK_SIZE];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = (Instant::now() + latency, buffer[..n].to_vec());
                    if chunks_tx.send(chunk).await.is_err() {
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
}
