//! The relay task: one loop that selects on the store thread's replies, the upstream socket,
//! new connections, dead-letter answers, the input and one timer, and hands each to the
//! policy. It drives the socket ([`Link`]) and the connection's protocol session itself, so
//! no channel sits between the policy and the socket: every turn, what the policy encoded is
//! written with one `send()`.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Relay;
use crate::ack::Ticket;
use crate::buffer::Key;
use crate::buffer::worker::Worker;
use crate::deadletter::DurableLetter;
use crate::event::Outbound;
use crate::metrics::Metrics;
use crate::uplink::{Link, LinkLoss, Lost, Received};
use crate::watchdog::Heartbeat;

/// How many input events are taken per wake-up, to amortise the loop's overhead.
const ACCEPT_BATCH: usize = 256;

/// What a dead-letter write is for.
#[derive(Debug)]
enum Letter {
    /// A blamed event, by its key in the buffer.
    Poison(Key),
    /// A copy the full buffer refused and no sensor would resend, with the ticket it holds.
    Refused(Option<Ticket>),
}

/// Dead-letter writes awaiting their answer.
type Letters = Vec<(Letter, oneshot::Receiver<Result<(), String>>)>;

/// Runs the relay until its input closes and everything accepted is on disk or acknowledged
/// (or `drain_grace` passed), then closes the upstream connection and stops the uplink.
///
/// Each loop turn is a heartbeat turn (the watchdog): busy from waking until the `select!`,
/// where every branch is something the loop waits for (the store thread, the socket, input).
#[allow(clippy::too_many_arguments)]
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut relay: Relay,
    mut input: mpsc::Receiver<Outbound>,
    mut links: mpsc::Receiver<Link<S>>,
    mut worker: Worker,
    data_dir: PathBuf,
    dead_letters: mpsc::Sender<DurableLetter>,
    uplink_cancel: CancellationToken,
    heartbeat: Heartbeat,
) {
    let mut letters: Letters = Vec::new();
    let mut input_open = true;
    let mut grace_until: Option<Instant> = None;
    let mut link: Option<Link<S>> = None;
    let mut timer = Timer::new();
    loop {
        heartbeat.begin();
        heartbeat.wedge_if_asked().await;
        let now = Instant::now();
        work(&mut relay, &mut link, &worker, input_open, now);
        hand_letters(&mut relay, &dead_letters, &mut letters, now);
        relay.pacing.clear_elapsed(now);
        // A refused copy's ticket must not be released by stopping before its letter is written.
        if !input_open && !relay.refused_pending() && done(&relay, grace_until, now) {
            break;
        }
        Metrics::set(&relay.metrics.gauges().buffered_events, relay.stored().events);
        Metrics::set(&relay.metrics.gauges().upstream_window_full, u64::from(relay.window_full()));
        let ping = relay.session().and_then(|s| s.next_ping());
        // A grace period that ended while a commit still runs is waited out by the commit's
        // reply, not by a timer that is always due.
        let grace = grace_until.filter(|&t| t > now);
        timer.arm([relay.next_deadline(), grace, ping].into_iter().flatten().min());
        let accept = input_open && relay.can_accept();
        heartbeat.end();
        tokio::select! {
            biased;
            Some(reply) = worker.replies.recv() => relay.on_reply(reply, &data_dir, Instant::now()),
            io = std::future::poll_fn(|cx| link.as_mut().map_or(Poll::Pending, |l| l.poll_io(cx))), if link.is_some() => {
                let delivered = io.and_then(|()| match link.as_mut() {
                    Some(l) => deliver(&mut relay, &mut l.inbuf, Instant::now()),
                    None => Ok(()),
                });
                if let Err(lost) = delivered {
                    lose(&mut link, &mut relay, lost);
                }
            }
            Some(new) = links.recv() => connected(&mut link, &mut relay, new),
            (letter, result) = std::future::poll_fn(|cx| poll_letters(&mut letters, cx)), if !letters.is_empty() => {
                match letter {
                    Letter::Poison(key) => relay.on_dead_lettered(key, result, Instant::now()),
                    Letter::Refused(ticket) => relay.on_refused_lettered(ticket, result, Instant::now()),
                }
            }
            received = input.recv(), if accept => match received {
                Some(outbound) => accept_batch(&mut relay, &mut input, outbound),
                None => {
                    input_open = false;
                    grace_until = Some(Instant::now() + relay.settings.drain_grace);
                    info!(message = "relay flushing: committing everything not yet acknowledged");
                }
            },
            // Only wakes the loop: whatever fell due is handled at the top.
            () = timer.fired() => {}
        }
    }
    stop(relay, link, worker, uplink_cancel).await;
}

/// What is due at the top of every turn: encode into the send window, start a due commit,
/// keep the link alive, write what was encoded.
fn work<S: AsyncRead + AsyncWrite + Unpin>(
    relay: &mut Relay,
    link: &mut Option<Link<S>>,
    worker: &Worker,
    input_open: bool,
    now: Instant,
) {
    if let (true, Some(io)) = (input_open, link.as_mut()) {
        relay.pump(&worker.commands, now, &mut io.out);
    }
    relay.maybe_commit(&worker.commands, !input_open, now);
    // Checked every turn, not only when the timer fires: a busy input branch would
    // otherwise starve the timer branch, and with it the dead-link verdict.
    let keepalive = match (link.as_mut(), relay.session_mut()) {
        (Some(io), Some(session)) => session.keepalive(now, &mut io.out),
        _ => Ok(()),
    };
    if let Err(lost) = keepalive.and_then(|()| link.as_mut().map_or(Ok(()), Link::flush)) {
        lose(link, relay, lost);
    }
}

/// Hands the letters of newly blamed events, and of refused copies no sensor would resend,
/// to the dead-letter writer.
fn hand_letters(
    relay: &mut Relay,
    dead_letters: &mpsc::Sender<DurableLetter>,
    letters: &mut Letters,
    now: Instant,
) {
    for (key, letter) in relay.take_poisoned() {
        let (written, answer) = oneshot::channel();
        match dead_letters.try_send(DurableLetter { letter, written }) {
            Ok(()) => letters.push((Letter::Poison(key), answer)),
            Err(_) => {
                relay.on_dead_lettered(key, Err("the dead-letter writer is busy or stopped".to_owned()), now);
            }
        }
    }
    // A window's closing can refuse thousands at once: those beyond the writer's queue wait
    // for room, which the answers to the letters queued (each wakes this loop) make.
    while relay.has_refused() {
        match dead_letters.try_reserve() {
            Ok(permit) => {
                let Some((letter, ticket)) = relay.next_refused() else { break };
                let (written, answer) = oneshot::channel();
                permit.send(DurableLetter { letter, written });
                letters.push((Letter::Refused(ticket), answer));
            }
            Err(mpsc::error::TrySendError::Full(())) => break,
            Err(mpsc::error::TrySendError::Closed(())) => {
                while let Some((_, ticket)) = relay.next_refused() {
                    relay.on_refused_lettered(ticket, Err("the dead-letter writer stopped".to_owned()), now);
                }
            }
        }
    }
}

/// After the input closed: whether the relay may stop now.
fn done(relay: &Relay, grace_until: Option<Instant>, now: Instant) -> bool {
    if relay.idle_for_shutdown() {
        return true;
    }
    if relay.flushed() && grace_until.is_some_and(|t| now >= t) {
        warn!(
            message = "stopping before every in-flight publish was acknowledged; they are on disk and will be resent"
        );
        return true;
    }
    false
}

/// Takes `first` and whatever else the input holds, up to [`ACCEPT_BATCH`].
fn accept_batch(relay: &mut Relay, input: &mut mpsc::Receiver<Outbound>, first: Outbound) {
    let now = Instant::now();
    relay.accept(first, now);
    for _ in 1..ACCEPT_BATCH {
        if !relay.can_accept() {
            break;
        }
        match input.try_recv() {
            Ok(outbound) => relay.accept(outbound, now),
            Err(_) => break,
        }
    }
}

/// A new connection from the uplink task replaces the current one.
fn connected<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut Option<Link<S>>,
    relay: &mut Relay,
    mut new: Link<S>,
) {
    lose(link, relay, (LinkLoss::Local, "replaced by a new connection".to_owned()));
    let now = Instant::now();
    relay.on_connected(new.generation, new.params, now, &mut new.out);
    // The upstream may have sent more right behind its CONNACK (a DISCONNECT).
    let delivered = deliver(relay, &mut new.inbuf, now);
    *link = Some(new);
    if let Err(lost) = delivered {
        lose(link, relay, lost);
    }
}

/// Hands every complete packet read to the relay, through the connection's session.
pub(super) fn deliver(relay: &mut Relay, inbuf: &mut BytesMut, now: Instant) -> Result<(), Lost> {
    while let Some(session) = relay.session_mut() {
        match session.receive(inbuf)? {
            Some(Received::Acked { value, rejected }) => relay.on_puback(value, rejected, now),
            Some(Received::PingResp) => {}
            None => break,
        }
    }
    Ok(())
}

/// Drops the connection (the uplink task reconnects) and rewinds the relay.
fn lose<S: AsyncRead + AsyncWrite + Unpin>(
    link: &mut Option<Link<S>>,
    relay: &mut Relay,
    (loss, error): Lost,
) {
    if let Some(io) = link.take() {
        relay.on_link_lost(loss, &error, Instant::now());
        io.lost(error);
    }
}

/// The first dead-letter write that finished, if any.
fn poll_letters(pending: &mut Letters, cx: &mut Context<'_>) -> Poll<(Letter, Result<(), String>)> {
    for i in 0..pending.len() {
        if let Poll::Ready(result) = Pin::new(&mut pending[i].1).poll(cx) {
            let (letter, _) = pending.swap_remove(i);
            return Poll::Ready((
                letter,
                result.unwrap_or_else(|_| Err("the dead-letter writer stopped".to_owned())),
            ));
        }
    }
    Poll::Pending
}

/// Closes the upstream connection, stops the uplink task, and waits for the store thread.
async fn stop<S: AsyncRead + AsyncWrite + Unpin>(
    mut relay: Relay,
    link: Option<Link<S>>,
    worker: Worker,
    uplink_cancel: CancellationToken,
) {
    if let Some(mut io) = link {
        relay.end_session(&mut io.out);
        io.close().await;
    }
    uplink_cancel.cancel();
    let stored = relay.stored();
    info!(message = "relay stopped", buffered_events = stored.events);
    // Let the store thread finish anything queued and close the file before the process
    // exits: `Gateway::shutdown` returning means the buffer file is closed.
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
}

/// One timer for every deadline, moved only when a deadline comes earlier than the one armed:
/// resetting it on every turn (every ack moves the commit deadline) cost a timer-wheel update
/// per event. A timer that fires early just runs one more turn.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Timer {
    fn new() -> Timer {
        Timer { sleep: Box::pin(tokio::time::sleep_until(Instant::now())), armed: None }
    }

    fn arm(&mut self, deadline: Option<Instant>) {
        if let Some(d) = deadline {
            if self.armed.is_none_or(|a| d < a) {
                self.sleep.as_mut().reset(d);
                self.armed = Some(d);
            }
        }
    }

    /// Completes when the armed deadline passes; never while none is armed.
    async fn fired(&mut self) {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        (&mut self.sleep).await;
        self.armed = None;
    }
}
