//! Confirms a crash's suspects and cuts what reproduces it down to a minimal reproducer.
//!
//! Each suspect connection's recorded packets (its answers to deliveries included) are written
//! again, alone, to a fresh gateway; if none crashes it alone, all suspects are replayed
//! together, each on its own connection, in the order they were written. Whatever makes the
//! gateway exit is then cut down by delta debugging for as long as the rest still crashes a
//! fresh gateway.
//!
//! # Invariants
//! - Every replay starts its own gateway in its own directory, so replays cannot influence
//!   each other; the gateway is killed after each.
//! - At most [`MAX_REPLAYS`] gateways are started per crash, so a finding's report is bounded
//!   in time whatever the suspects look like.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::client::{ConnectionLog, SentPacket};
use super::{FuzzConfig, ReproPacket, Suspect};

use crate::harness::{free_addr, wait_until};
use crate::systems::{Gateway, GatewayKind, GatewaySpec};

/// Gateways started per crash, confirmation and minimisation together.
pub const MAX_REPLAYS: usize = 60;
/// How long the replay waits after each packet, so the gateway acts on it (and the other
/// connections' packets) in the recorded order.
const AFTER_PACKET: Duration = Duration::from_millis(10);
/// How long a replayed gateway may take to exit after the connections closed.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// One packet of a replay and the connection (an index into the replayed logs) it goes on.
#[derive(Debug, Clone)]
struct Item {
    connection: usize,
    packet: SentPacket,
}

/// Replays each of `logs` alone, then, if none crashes a fresh gateway alone, all of them
/// together in the recorded order on their own connections. What crashes is minimised and
/// returned, one confirmed suspect per connection it still needs; `None` if nothing crashes
/// (the crash needed a connection not among `logs`, or a timing the replay did not hit).
///
/// A replay counts as a crash only if the gateway panics at the same place as in the round
/// (`panic_at`, e.g. `src/router/routing.rs:512:30`; with `None`, any exit counts), so a
/// reproducer is never one of a different bug.
pub async fn confirm_crash(
    cfg: &FuzzConfig,
    dir: &Path,
    logs: &[ConnectionLog],
    panic_at: Option<&str>,
) -> anyhow::Result<Option<Vec<Suspect>>> {
    let mut replayer = Replayer { cfg, dir, panic_at, runs: 0 };
    let alone = logs.iter().enumerate().map(|(index, log)| items(&[(index, log)]));
    let together = items(&logs.iter().enumerate().collect::<Vec<_>>());
    for candidate in alone.chain(std::iter::once(together)) {
        if replayer.runs >= MAX_REPLAYS {
            break;
        }
        if candidate.is_empty() || !replayer.crashes(&candidate).await? {
            continue;
        }
        let minimal = replayer.minimise(candidate).await?;
        let mut suspects: Vec<Suspect> = Vec::new();
        let mut order: Vec<usize> = Vec::new();
        for item in &minimal {
            if !order.contains(&item.connection) {
                order.push(item.connection);
            }
        }
        for connection in order {
            let log = &logs[connection];
            suspects.push(Suspect {
                client_id: log.client_id.clone(),
                version: log.version,
                packets: minimal
                    .iter()
                    .filter(|item| item.connection == connection)
                    .map(|item| ReproPacket::from(&item.packet))
                    .collect(),
                confirmed: true,
            });
        }
        return Ok(Some(suspects));
    }
    Ok(None)
}

/// The packets of `logs` in the order they were written.
fn items(logs: &[(usize, &ConnectionLog)]) -> Vec<Item> {
    let mut items: Vec<Item> = logs
        .iter()
        .flat_map(|(connection, log)| {
            log.packets.iter().map(|packet| Item { connection: *connection, packet: packet.clone() })
        })
        .collect();
    items.sort_by_key(|item| item.packet.at);
    items
}

struct Replayer<'a> {
    cfg: &'a FuzzConfig,
    dir: &'a Path,
    panic_at: Option<&'a str>,
    runs: usize,
}

impl Replayer<'_> {
    /// Whether writing `items` to a fresh gateway makes it exit.
    async fn crashes(&mut self, items: &[Item]) -> anyhow::Result<bool> {
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
            tls_ca: None,
            autosave: Duration::ZERO,
        })
        .await?;
        write_items(listen, items).await;
        // The process's exit has no readiness event to wait on: the harness polls for it.
        let exited =
            wait_until("the gateway exited", EXIT_WAIT, || gateway.check_running().is_err()).await.is_ok();
        let crashed = exited
            && match self.panic_at {
                Some(place) => super::panic_message(&dir).is_some_and(|message| message.contains(place)),
                None => true,
            };
        let _ = gateway.kill();
        Ok(crashed)
    }

    /// Removes whole connections, one at a time, while the rest still crashes; then delta
    /// debugging removes chunks of packets, ever smaller, while the rest still crashes.
    async fn minimise(&mut self, mut items: Vec<Item>) -> anyhow::Result<Vec<Item>> {
        let mut connections: Vec<usize> = items.iter().map(|item| item.connection).collect();
        connections.dedup();
        connections.sort_unstable();
        connections.dedup();
        if connections.len() > 1 {
            for connection in connections {
                if self.runs >= MAX_REPLAYS {
                    break;
                }
                let candidate: Vec<Item> =
                    items.iter().filter(|item| item.connection != connection).cloned().collect();
                if !candidate.is_empty() && self.crashes(&candidate).await? {
                    items = candidate;
                }
            }
        }
        let mut parts = 2usize;
        while items.len() >= 2 && self.runs < MAX_REPLAYS {
            let chunk = items.len().div_ceil(parts);
            let mut reduced = false;
            let mut start = 0;
            while start < items.len() && self.runs < MAX_REPLAYS {
                let mut candidate = items.clone();
                candidate.drain(start..(start + chunk).min(items.len()));
                if !candidate.is_empty() && self.crashes(&candidate).await? {
                    items = candidate;
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
                parts = (parts * 2).min(items.len());
            }
        }
        Ok(items)
    }
}

/// Writes `items`, each on its connection (opened at its first packet), [`AFTER_PACKET`]
/// apart, reading and discarding what comes back; then closes every connection without a
/// DISCONNECT (unless one was among the packets).
async fn write_items(addr: SocketAddr, items: &[Item]) {
    let mut writers: HashMap<usize, OwnedWriteHalf> = HashMap::new();
    // Readers drain the gateway's answers so it never blocks on a full socket; dropping the
    // set at the end stops them.
    let mut readers = JoinSet::new();
    for item in items {
        let writer = match writers.entry(item.connection) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let Ok(Ok(stream)) = timeout(EXIT_WAIT, TcpStream::connect(addr)).await else { return };
                let _ = stream.set_nodelay(true);
                let (mut reader, writer) = stream.into_split();
                readers.spawn(async move {
                    let mut sink = vec![0u8; 64 * 1024];
                    while let Ok(n) = reader.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
                entry.insert(writer)
            }
        };
        // A connection the gateway closed takes no more packets; the others go on.
        let _ = writer.write_all(&item.packet.bytes).await;
        tokio::time::sleep(AFTER_PACKET).await;
    }
}
