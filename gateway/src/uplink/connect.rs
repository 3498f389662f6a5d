//! Connecting to the upstream broker: TCP, CONNECT, CONNACK with the upstream's limits,
//! capped exponential backoff between attempts, and the task that reconnects whenever the
//! relay drops a [`Link`].

use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Link;
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::mqtt::upstream::{LinkParams, encode_connect, parse_connack};

fn describe_io(error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::ConnectionRefused {
        "connection refused: is the upstream broker running and is upstream.url right?".to_owned()
    } else {
        error.to_string()
    }
}

/// One connection attempt: TCP, CONNECT, CONNACK, all within `connect_timeout`.
async fn connect(cfg: &UpstreamConfig) -> Result<(TcpStream, LinkParams, BytesMut), String> {
    let attempt = async {
        let mut stream =
            TcpStream::connect((cfg.url.host.as_str(), cfg.url.port)).await.map_err(|e| describe_io(&e))?;
        // Publishes are written in batches already; Nagle would only add a round trip of delay.
        stream.set_nodelay(true).map_err(|e| describe_io(&e))?;
        let mut out = BytesMut::new();
        encode_connect(cfg, &mut out)?;
        stream.write_all(&out).await.map_err(|e| describe_io(&e))?;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            if let Some(params) = parse_connack(&mut buf, cfg)? {
                return Ok((stream, params, buf));
            }
            use tokio::io::AsyncReadExt;
            if stream.read_buf(&mut buf).await.map_err(|e| describe_io(&e))? == 0 {
                return Err("the upstream closed the connection before its CONNACK".to_owned());
            }
        }
    };
    match tokio::time::timeout(cfg.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => {
            Err("no CONNACK within upstream.connect_timeout: the host accepts TCP but does not answer MQTT"
                .to_owned())
        }
    }
}

/// A connection that lasted this long was healthy: the next attempt starts from
/// `reconnect_min` again. One that dropped sooner (an upstream that closes right after its
/// CONNACK, or refuses what we publish by disconnecting) keeps the backoff growing, so it is
/// not hammered with a connection every `reconnect_min`.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(5);

/// Capped exponential backoff with full jitter over the upper half, so a fleet of gateways
/// does not reconnect in lockstep after an upstream restart.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, current: min }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.5..=1.0);
        base.mul_f64(jitter)
    }
}

/// Runs until `cancel`: connects, hands each connection to the relay over `links`, waits for
/// the relay to drop it, reconnects after a backoff. When the relay is gone, stops.
pub async fn run(
    cfg: UpstreamConfig,
    links: mpsc::Sender<Link>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let counters = metrics.counters();
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    for generation in 1.. {
        info!(message = "connecting upstream", upstream = %cfg.url, version = ?cfg.mqtt_version, generation);
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            attempt = connect(&cfg) => attempt,
        };
        match attempt {
            Ok((stream, params, inbuf)) => {
                let since = tokio::time::Instant::now();
                Metrics::add(&counters.upstream_connects, 1);
                metrics.set_upstream_connected(true);
                info!(message = "connected upstream", upstream = %cfg.url, generation, receive_max = params.receive_max);
                let lost = lend(generation, stream, params, inbuf, &links, &cancel).await;
                metrics.set_upstream_connected(false);
                let Some(error) = lost else { return };
                if since.elapsed() >= HEALTHY_CONNECTION {
                    backoff.reset();
                }
                Metrics::add(&counters.upstream_failures, 1);
                warn!(message = "upstream connection lost; events are kept in the buffer and resent after reconnecting", upstream = %cfg.url, generation, %error);
            }
            Err(error) => {
                Metrics::add(&counters.upstream_failures, 1);
                warn!(message = "cannot connect upstream; events are kept in the buffer", upstream = %cfg.url, generation, %error);
            }
        }
        let delay = backoff.next_delay();
        info!(message = "reconnecting upstream after backoff", delay = ?delay);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Hands one connection to the relay and waits until the relay drops it. `Some`: it was lost,
/// and why; `None`: stop (cancelled, the relay is gone, or it closed the link to stop).
async fn lend(
    generation: u64,
    stream: TcpStream,
    params: LinkParams,
    inbuf: BytesMut,
    links: &mpsc::Sender<Link>,
    cancel: &CancellationToken,
) -> Option<String> {
    let (ended, end) = oneshot::channel();
    let link = Link { generation, stream, params, inbuf, out: BytesMut::new(), ended: Some(ended) };
    links.send(link).await.ok()?;
    tokio::select! {
        biased;
        // Dropped without a reason: the relay is stopping.
        end = end => end.ok(),
        _ = cancel.cancelled() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100), "{d1:?}");
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        assert!(b.next_delay() >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
