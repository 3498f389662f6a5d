//! A plain rumqttd broker, run as the gateway's upstream in tests and demos.
//!
//! It is a separate process in end-to-end tests so that it can be killed and restarted: rumqttd
//! has no stop API and `Broker::start()` never returns. It persists nothing, so a restart loses
//! whatever it held; tests account for that by subscribing before they publish.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::error;

/// How long `spawn_broker` waits for the listeners to accept connections.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// The rumqttd configuration: generous limits, no authentication, no TLS.
pub fn broker_config(v4_listen: SocketAddr, v5_listen: Option<SocketAddr>) -> Config {
    let server = |name: &str, listen: SocketAddr| {
        let settings = ServerSettings {
            name: name.to_string(),
            listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 1024 * 1024,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        HashMap::from([(name.to_string(), settings)])
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(server("v4-1", v4_listen)),
        v5: v5_listen.map(|listen| server("v5-1", listen)),
        ..Config::default()
    }
}

/// Starts a broker on its own thread and returns once every listener accepts connections.
/// The readiness probe is a bare TCP connect, which rumqttd logs as a failed connection.
pub fn spawn_broker(v4_listen: SocketAddr, v5_listen: Option<SocketAddr>) -> anyhow::Result<JoinHandle<()>> {
    let listens: Vec<SocketAddr> = std::iter::once(v4_listen).chain(v5_listen).collect();
    // rumqttd binds inside its own threads and only logs a failure; check first.
    for &listen in &listens {
        if listen.port() == 0 {
            anyhow::bail!(
                "cannot listen on {listen}: rumqttd does not report the port it picks, so choose one"
            );
        }
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    }
    let mut broker = Broker::new(broker_config(v4_listen, v5_listen));
    let thread = std::thread::Builder::new()
        .name("rumqttd".to_string())
        .spawn(move || {
            if let Err(error) = broker.start() {
                error!(%error, "rumqttd stopped");
            }
        })
        .context("cannot start the broker thread")?;
    for &listen in &listens {
        wait_until_accepting(listen, &thread)?;
    }
    Ok(thread)
}

/// Runs a broker and blocks for good, printing `listening on ADDR` for each listener once it
/// accepts connections.
pub fn run_broker(v4_listen: SocketAddr, v5_listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let thread = spawn_broker(v4_listen, v5_listen)?;
    println!("listening on {v4_listen}");
    if let Some(v5_listen) = v5_listen {
        println!("listening on {v5_listen} (MQTT 5)");
    }
    thread.join().map_err(|_| anyhow::anyhow!("the broker thread panicked"))?;
    anyhow::bail!("the broker stopped")
}

/// Polls `listen` until a TCP connect succeeds (rumqttd binds asynchronously).
fn wait_until_accepting(listen: SocketAddr, thread: &JoinHandle<()>) -> anyhow::Result<()> {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    let mut target = listen;
    if target.ip().is_unspecified() {
        target.set_ip(match listen {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    loop {
        if TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if thread.is_finished() {
            anyhow::bail!("the broker stopped before listening on {listen}");
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the broker did not listen on {listen} within {LISTEN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
