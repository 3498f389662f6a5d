//! A connection's socket and codec: bytes in, packets out, and writing that never stops
//! reading.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttd::protocol::{self, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::warn;

use super::End;
use crate::mqtt::codec::Codec;
use crate::mqtt::wire::Version;

/// Input read (and kept) while output waits for a client that is slow to read. Beyond it the
/// connection stops reading: TCP slows a client that sends without reading.
const READ_WHILE_WRITING: usize = 64 * 1024;

/// The most one read into an empty input buffer takes. Such a read goes through a buffer on
/// the stack, so a connection waiting for its next packet holds no input buffer at all.
const READ_CHUNK: usize = 4096;

/// An accepted socket: plain, or TLS after its handshake.
pub(in crate::broker) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

pub(super) struct Io {
    rd: Reader,
    wr: Writer,
    /// Bytes read and not decoded yet. Empty and unallocated while the connection waits with
    /// nothing partial in it ([`Io::release_idle`]): most of a fleet's connections are idle
    /// between publishes, and two 4 KiB buffers each were most of their memory.
    pub(super) inbuf: BytesMut,
    /// Packets encoded and not written yet; unallocated once written, as `inbuf`.
    pub(super) outbuf: BytesMut,
    /// Set from the CONNECT's protocol level; until then a 3.1.1 codec.
    codec: Codec,
    version: Version,
    peer: SocketAddr,
}

impl Io {
    pub(super) fn new(stream: Stream, peer: SocketAddr) -> Io {
        // One virtual call per read or write buys one connection loop for both kinds.
        let (rd, wr): (Reader, Writer) = match stream {
            Stream::Plain(stream) => {
                let _ = stream.set_nodelay(true);
                let (rd, wr) = stream.into_split();
                (Box::new(rd), Box::new(wr))
            }
            Stream::Tls(stream) => {
                let (rd, wr) = tokio::io::split(*stream);
                (Box::new(rd), Box::new(wr))
            }
        };
        Io {
            rd,
            wr,
            inbuf: BytesMut::new(),
            outbuf: BytesMut::new(),
            codec: Codec::new(Version::V4),
            version: Version::V4,
            peer,
        }
    }

    pub(super) fn set_version(&mut self, version: Version) {
        self.codec = Codec::new(version);
        self.version = version;
    }

    pub(super) fn version(&self) -> Version {
        self.version
    }

    pub(super) fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub(super) fn v5(&self) -> bool {
        self.version == Version::V5
    }

    /// The next complete packet in the input buffer (`InsufficientBytes`: none yet).
    pub(super) fn decode(&mut self, max: usize) -> Result<Packet, protocol::Error> {
        self.codec.read(&mut self.inbuf, max)
    }

    /// Encodes a packet into the output buffer.
    pub(super) fn write(&mut self, packet: Packet) {
        if let Err(error) = self.codec.write(packet, &mut self.outbuf) {
            warn!(message = "bug: a packet could not be encoded", ?error, peer = %self.peer);
        }
    }

    pub(super) async fn read_more(&mut self) -> Result<(), End> {
        let read = if self.inbuf.is_empty() {
            // Nothing partial: wait without a buffer, then copy what arrived into one just
            // its size (the decoded publishes share it, so it is allocated once per read as
            // before). The stack buffer lives only inside one poll, never in the future.
            let (rd, inbuf) = (&mut self.rd, &mut self.inbuf);
            std::future::poll_fn(|cx| {
                let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
                let mut buf = ReadBuf::uninit(&mut scratch);
                match Pin::new(&mut *rd).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        inbuf.extend_from_slice(buf.filled());
                        Poll::Ready(Ok(buf.filled().len()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        } else {
            self.rd.read_buf(&mut self.inbuf).await
        };
        match read {
            Ok(0) => Err(End::Eof),
            Ok(_) => Ok(()),
            Err(e) => Err(End::Io(e)),
        }
    }

    /// Frees the buffers if they hold nothing: called before the connection waits, so an idle
    /// connection costs its socket, its session and its task, not its buffers.
    pub(super) fn release_idle(&mut self) {
        if self.inbuf.is_empty() && self.inbuf.capacity() > 0 {
            self.inbuf = BytesMut::new();
        }
        if self.outbuf.is_empty() && self.outbuf.capacity() > 0 {
            self.outbuf = BytesMut::new();
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), End> {
        if !self.outbuf.is_empty() {
            self.wr.write_all(&self.outbuf).await.map_err(End::Io)?;
            self.outbuf.clear();
            // TLS keeps records it could not write yet; a plain socket's flush does nothing.
            self.wr.flush().await.map_err(End::Io)?;
        }
        Ok(())
    }

    /// Flushes what is left (bounded by `wait`) and closes the writing half.
    pub(super) async fn shut_down(&mut self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.flush()).await;
        let _ = self.wr.shutdown().await;
    }

    /// After `shut_down`: reads and discards what the client still sends, until it closes or
    /// `wait` passed. Closing a socket with unread input makes the kernel send a reset, which
    /// can destroy the DISCONNECT just written before the client reads it (a client still
    /// answering our PUBRECs gets "broken pipe" instead of our reason code).
    pub(super) async fn linger(&mut self, wait: Duration) {
        let _ = tokio::time::timeout(wait, async {
            loop {
                self.inbuf.clear();
                if self.read_more().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Writes all pending output, and meanwhile reads what the client sends (up to
    /// [`READ_WHILE_WRITING`] bytes, kept for later): a live client's PINGREQs still count
    /// while it is slow to read, and a client that sends nothing and reads nothing for its
    /// keepalive is dropped. Before, a half-open subscriber blocked its connection here until
    /// TCP gave up, minutes later.
    pub(super) async fn flush_reading(
        &mut self,
        mut idle: Pin<&mut tokio::time::Sleep>,
        keepalive: Option<Duration>,
        last_read: &mut Instant,
    ) -> Result<(), End> {
        if self.outbuf.is_empty() {
            return Ok(());
        }
        // After the last byte is taken, TLS may still hold records: flushed under the same
        // select, so a client that stops reading is still timed by its keepalive.
        let mut flushed = false;
        while !flushed {
            let can_read = self.inbuf.len() < READ_WHILE_WRITING;
            tokio::select! {
                biased;
                // `write`, `flush` and `read_buf` are cancel-safe: a branch that loses did
                // nothing.
                w = write_or_flush(&mut self.wr, &self.outbuf) => match w {
                    Ok(Some(0)) => return Err(End::Eof),
                    Ok(Some(n)) => self.outbuf.advance(n),
                    Ok(None) => flushed = true,
                    Err(e) => return Err(End::Io(e)),
                },
                r = self.rd.read_buf(&mut self.inbuf), if can_read => match r {
                    Ok(0) => return Err(End::Eof),
                    Ok(_) => *last_read = Instant::now(),
                    Err(e) => return Err(End::Io(e)),
                },
                () = idle.as_mut(), if keepalive.is_some() => {
                    if let Some(k) = keepalive {
                        if last_read.elapsed() >= k {
                            return Err(End::Keepalive);
                        }
                        idle.as_mut().reset(super::keepalive_check(*last_read + k));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes some of `buf`, or once it is empty flushes (`None`).
async fn write_or_flush(wr: &mut Writer, buf: &[u8]) -> std::io::Result<Option<usize>> {
    if buf.is_empty() { wr.flush().await.map(|()| None) } else { wr.write(buf).await.map(Some) }
}
