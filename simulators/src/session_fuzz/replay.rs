//! Confirms a crash's suspects and cuts a confirmed one down to a minimal reproducer.
//!
//! Each suspect connection's recorded packets (its answers to deliveries included) are written
//! again, alone, to a fresh gateway; if the gateway exits, the suspect is the reproducer, and
//! delta debugging removes packets for as long as the rest still crashes a fresh gateway.
//!
//! # Invariants
//! - Every replay starts its own gateway in its own directory, so replays cannot influence
//!   each other; the gateway is killed after each.
//! - At most [`MAX_REPLAYS`] gateways are started per crash, so a finding's report is bounded
//!   in time whatever the suspects look like.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use super::client::{ConnectionLog, SentPacket};
use super::{FuzzConfig, ReproPacket, Suspect};

use crate::process::free_addr;
use crate::systems::{Gateway, GatewayKind, GatewaySpec};

/// Gateways started per crash, confirmation and minimisation together.
pub const MAX_REPLAYS: usize = 60;
/// How long the replay reads after each packet (deliveries, acks), so the gateway acts on it
/// before the next one, as it did during the round.
const AFTER_PACKET: Duration = Duration::from_millis(30);
/// How long a replayed gateway may take to exit after the connection closed.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Replays each of `logs` alone; the first that crashes a fresh gateway is minimised and
/// returned as a confirmed suspect. `None` if none crashes alone (the crash needed several
/// connections or a timing the replay did not hit).
pub async fn confirm_crash(
    cfg: &FuzzConfig,
    dir: &Path,
    logs: &[ConnectionLog],
) -> anyhow::Result<Option<Suspect>> {
    let mut replayer = Replayer { cfg, dir, runs: 0 };
    for log in logs {
        if replayer.runs >= MAX_REPLAYS {
            break;
        }
        if !replayer.crashes(&log.packets).await? {
            continue;
        }
        let packets = replayer.minimise(log.packets.clone()).await?;
        return Ok(Some(Suspect {
            client_id: log.client_id.clone(),
            version: log.version,
            packets: packets.iter().map(ReproPacket::from).collect(),
            confirmed: true,
        }));
    }
    Ok(None)
}

struct Replayer<'a> {
    cfg: &'a FuzzConfig,
    dir: &'a Path,
    runs: usize,
}

impl Replayer<'_> {
    /// Whether writing `packets` on one connection to a fresh gateway makes it exit.
    async fn crashes(&mut self, packets: &[SentPacket]) -> anyhow::Result<bool> {
        self.runs += 1;
        let dir = self.dir.join(format!("replay-{}", self.runs));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let listen = free_addr()?;
        // Nothing listens there: the gateway keeps its events and retries, which is all a
        // crash replay needs.
        let upstream = free_addr()?;
        let mut gateway = Gateway::start(GatewaySpec {
            kind: GatewayKind::Outpost,
            binary: self.cfg.outpost.clone(),
            listen,
            upstream,
            dir: dir.clone(),
            outpost_config: None,
            rules: None,
            autosave: Duration::ZERO,
        })
        .await?;
        write_session(listen, packets).await;
        let deadline = Instant::now() + EXIT_WAIT;
        let crashed = loop {
            if gateway.check_running().is_err() {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            // Polls for the process's exit, which has no readiness event to wait on.
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = gateway.kill();
        Ok(crashed)
    }

    /// Delta debugging: removes chunks of packets, ever smaller, while the rest still crashes.
    async fn minimise(&mut self, mut packets: Vec<SentPacket>) -> anyhow::Result<Vec<SentPacket>> {
        let mut parts = 2usize;
        while packets.len() >= 2 && self.runs < MAX_REPLAYS {
            let chunk = packets.len().div_ceil(parts);
            let mut reduced = false;
            let mut start = 0;
            while start < packets.len() && self.runs < MAX_REPLAYS {
                let mut candidate = packets.clone();
                candidate.drain(start..(start + chunk).min(packets.len()));
                if !candidate.is_empty() && self.crashes(&candidate).await? {
                    packets = candidate;
                    parts = (parts - 1).max(2);
                    reduced = true;
                    break;
                }
                start += chunk;
            }
            if !reduced {
                if chunk == 1 {
                    break;
                }
                parts = (parts * 2).min(packets.len());
            }
        }
        Ok(packets)
    }
}

/// Writes `packets` on one connection, reading what comes back between them, then closes it
/// without a DISCONNECT (unless one was among the packets).
async fn write_session(addr: SocketAddr, packets: &[SentPacket]) {
    let Ok(Ok(mut stream)) = timeout(EXIT_WAIT, TcpStream::connect(addr)).await else { return };
    let _ = stream.set_nodelay(true);
    let mut sink = vec![0u8; 64 * 1024];
    for packet in packets {
        if stream.write_all(&packet.bytes).await.is_err() {
            return;
        }
        // Read whatever the gateway answers for a moment; the session then goes on, as the
        // recorded one did.
        let until = Instant::now() + AFTER_PACKET;
        while let Ok(Ok(n)) = tokio::time::timeout_at(until, stream.read(&mut sink)).await {
            if n == 0 {
                return;
            }
        }
    }
}
