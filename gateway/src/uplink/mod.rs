//! The upstream connection: connecting ([`connect`]), the byte pipe ([`Link`]) and the
//! protocol state of one connection ([`session::Session`]). It carries no event of its own:
//! the relay task owns each link from its CONNACK on and drives both the socket and the
//! session, so no channel sits between the relay's policy and the socket.
//!
//! - [`connect::run`] connects (TCP, TLS, CONNECT, CONNACK), with capped exponential backoff
//!   between attempts, and hands each established connection to the relay as a [`Link`]. When
//!   the relay drops the link — lost, refused, or at shutdown — it learns why and reconnects.
//! - [`transport`] turns a URL into a connected [`transport::Stream`], plain TCP or TLS (with
//!   the certificate files read at each attempt), and tells a failed handshake's reason;
//!   [`pem`] reads the PEM files.
//! - [`Link`] is the socket half, generic over the byte stream (`AsyncRead + AsyncWrite +
//!   Unpin`; [`transport::Stream`] in the gateway, so TLS needs nothing of the relay). It writes
//!   what the relay encoded with one `write` per loop turn — over TLS, one vectored write of
//!   the turn's records — and reads into a buffer; it knows no packet.
//! - [`endpoints::Endpoints`] is the failover policy over `upstream.urls`, pure: which
//!   endpoint next, when to back off, when to return to the preferred one.
//! - [`session::Session`] is the protocol half, sans I/O: packet ids, keepalive, what the
//!   upstream's packets mean. It reads from and writes to byte buffers and *returns* what
//!   happened (an acknowledged publish, a dead link); it never calls into the relay.
//! - [`inbound::run`] is the other direction: commands from the cloud
//!   (`[[upstream.subscribe]]`) over a second connection with a persistent session, delivered
//!   into the local broker and the rules through `broker::Commands`. It shares no state with
//!   the relay's connection.
//! - The wire format itself (`encode_publish`, `parse_incoming`, CONNECT, CONNACK) is
//!   [`crate::mqtt::upstream`].
//!
//! Why not rumqttc's event loop: it flushes the socket once per publish (one `send()` per
//! event, measured at ~5–7 µs of CPU per event at 10,000 events/s on the 2-core target), hands
//! every publish through a channel and back as an event, and does not say which packet id a
//! publish got. Killing and restarting the upstream mosquitto while publishing QoS 1 through
//! plain rumqttc lost ~20 events per run: a reconnect without a session clears the publishes
//! still pending in it. The relay, which treats its buffer as the truth, needs only a byte
//! pipe with acks.
//!
//! # Invariants
//! - Every connection of the relay starts a clean session: nothing from an old connection can reach a new
//!   one, and the relay resends everything unacknowledged from its buffer.
//! - A packet id is in use from the moment its publish is encoded until its PUBACK, and only
//!   in the session that encoded it.

pub mod connect;
pub mod endpoints;
pub mod inbound;
pub mod pem;
pub mod session;
pub mod transport;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::info;

pub use crate::mqtt::upstream::LinkParams;
pub use connect::{Backoff, run};
pub use session::{Received, Session};
pub use transport::Stream;

/// Encoding stops while this much is waiting for the socket. The send window bounds QoS 1
/// publishes, but not QoS 0 ones (no PUBACK) nor a window of large payloads; this bounds the
/// memory and what a lost connection takes with it.
pub const OUT_HIGH_WATER: usize = 256 * 1024;

/// Why a connection ended, as far as blaming an event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLoss {
    /// The upstream ended it: EOF, a reset, a failed write, or its DISCONNECT.
    PeerClosed,
    /// We ended it: keepalive verdict, a garbled packet, a newer connection, shutdown.
    Local,
}

/// Why the link cannot go on, and who ended it.
pub type Lost = (LinkLoss, String);

/// The upstream ended the connection.
pub fn peer(reason: String) -> Lost {
    (LinkLoss::PeerClosed, reason)
}

/// An established upstream connection's socket half, owned by the relay.
#[derive(Debug)]
pub struct Link<S = Stream> {
    pub generation: u64,
    pub params: LinkParams,
    stream: S,
    /// Bytes read and not yet parsed (the CONNACK's leftovers first).
    pub inbuf: BytesMut,
    /// Bytes encoded and not yet written.
    pub out: BytesMut,
    ended: Option<oneshot::Sender<String>>,
    /// Fires when the uplink task wants this connection given back (failback to the preferred
    /// endpoint): the link then reports itself lost by us, and the relay resends what it had
    /// in flight on the next connection.
    retire: Option<oneshot::Receiver<()>>,
}

/// Why a retired link ended: the uplink task knows it asked for it.
pub const RETIRED: &str = "leaving this endpoint for the preferred one (upstream.failback_after)";

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// Tells the uplink task the connection failed and why; it reconnects after its backoff.
    /// Dropping a link without calling this means a deliberate close.
    pub fn lost(mut self, reason: String) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(reason);
        }
    }

    /// Writes as much of `out` as the socket takes without waiting: one `send()` for
    /// everything a loop turn encoded. Whatever is left is written by [`Link::poll_io`].
    pub fn flush(&mut self) -> Result<(), Lost> {
        // A no-op waker: this only tries. `poll_io`, polled with the task's real context in
        // the relay's `select!`, registers for writability when bytes are left over.
        self.write_out(&mut Context::from_waker(Waker::noop()))
    }

    /// Writes `out` until it is empty or the socket would block.
    fn write_out(&mut self, cx: &mut Context<'_>) -> Result<(), Lost> {
        while !self.out.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => return Err(peer("the upstream connection closed".to_owned())),
                Poll::Ready(Ok(n)) => self.out.advance(n),
                Poll::Ready(Err(e)) => return Err(peer(format!("writing to the upstream failed: {e}"))),
                Poll::Pending => return Ok(()),
            }
        }
        // A TLS stream takes bytes into its records before the socket has them all; what
        // the socket refused waits there, and only a flush writes it (and registers for
        // writability). For TCP this does nothing.
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(Err(e)) => Err(peer(format!("writing to the upstream failed: {e}"))),
            Poll::Ready(Ok(())) | Poll::Pending => Ok(()),
        }
    }

    /// Ready once bytes arrived, or the unwritten output fell below [`OUT_HIGH_WATER`];
    /// meanwhile writes what the socket did not take before.
    /// Cancel-safe: whatever is read or written within a poll is recorded in a buffer.
    pub fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Lost>> {
        if let Some(retire) = &mut self.retire {
            match Pin::new(retire).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Err((LinkLoss::Local, RETIRED.to_owned()))),
                // The uplink task is gone (shutdown): nothing will ask any more.
                Poll::Ready(Err(_)) => self.retire = None,
                Poll::Pending => {}
            }
        }
        let was_full = self.out.len() >= OUT_HIGH_WATER;
        if let Err(lost) = self.write_out(cx) {
            return Poll::Ready(Err(lost));
        }
        if was_full && self.out.len() < OUT_HIGH_WATER {
            // Room again: the relay may encode more.
            return Poll::Ready(Ok(()));
        }
        let inbuf = &mut self.inbuf;
        if inbuf.capacity() - inbuf.len() < 1024 {
            inbuf.reserve(16 * 1024);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, inbuf) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(peer("the upstream closed the connection".to_owned()))),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(peer(format!("reading from the upstream failed: {e}")))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes what is left in `out` (the session's DISCONNECT last) and gives the socket a
    /// moment to take it.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            self.stream.write_all(&self.out).await?;
            // Writes what TLS still holds, then its close_notify.
            self.stream.shutdown().await
        })
        .await;
        info!(message = "upstream connection closed", generation = self.generation);
    }
}
