//! `outpost-sim`: the tools that exercise an Outpost gateway from the outside.
//!
//! The gateway promises at-least-once delivery of every reading it acknowledged. These tools
//! produce load, break the network and check that promise, so they must never be the reason a
//! run looks better or worse than it was: a reading counts as acknowledged only when the broker
//! really acknowledged it.
//!
//! # Layout
//!
//! - [`payload`]: `SensorReading`, the JSON or CBOR body every simulated sensor publishes.
//! - [`fleet`]: many sensors, one MQTT connection each, seeded and rate-limited; returns a
//!   `FleetSummary` of what was sent and what the broker acknowledged.
//! - [`mqtt`]: one sensor's MQTT client for MQTT 3.1.1 or 5, over TCP or TLS (rustls with
//!   `ring`), reduced to the events a sensor needs, so `fleet` has one loop for both versions.
//! - [`verify`]: a subscriber plus `Verifier`, which compares what arrived with a
//!   `FleetSummary` (missing, duplicates, reordering, latency).
//! - [`broker`]: a plain rumqttd broker, used as an independent upstream that tests can kill.
//! - [`flaky`]: a TCP proxy that cuts every connection on a schedule or on command, adds
//!   latency and caps bandwidth.
//! - [`process`]: child processes that die with their owner, their output captured or logged,
//!   measured through `/proc`.
//! - [`harness`]: what tests and benches share besides: Debian's mosquitto, raw MQTT packets,
//!   free ports, condition waits.
//! - [`systems`]: the gateways under test (Outpost, a Mosquitto bridge) and an upstream
//!   Mosquitto, as child processes.
//! - [`storage_calls`]: the bytes and syncs a gateway hands the kernel in a window, from
//!   `perf record` on its system calls (what flash wear is measured by).
//! - [`compare`]: the same workload through Outpost and a Mosquitto bridge, one table.
//! - [`ingest_bench`]: the gateway's sensor side alone: CPU per event and PUBACK latency per
//!   ack mode, saturation rate, memory per idle connection.
//! - [`latency`]: the fixed log-bucket histogram behind the fleet's ack latencies.
//! - [`demo`]: upstream, gateway, fleet and a flaky link in one command, with a live backlog.
//! - [`session_fuzz`]: a grammar-based fuzzer of MQTT sessions against the real gateway; finds
//!   crashes, stalls (canaries) and memory that is not given back.
//!
//! **Invariant:** nothing here depends on the gateway crate; the simulators speak only MQTT and
//! TCP, so they test the gateway as a black box.

pub mod broker;
pub mod compare;
pub mod demo;
pub mod fanout_bench;
pub mod flaky;
pub mod fleet;
pub mod floor_bench;
pub mod harness;
pub mod idle_bench;
pub mod ingest_bench;
pub mod latency;
pub mod mqtt;
pub mod payload;
pub mod process;
pub mod session_fuzz;
pub mod storage_calls;
pub mod systems;
pub mod verify;
pub mod window_bench;

/// Splits a `host:port` broker address into its parts.
///
/// Shared by `fleet` and `verify`, which both hand the parts to rumqttc.
pub(crate) fn parse_broker(broker: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = broker.rsplit_once(':').ok_or_else(|| {
        anyhow::anyhow!("invalid broker address '{broker}': expected HOST:PORT, e.g. 127.0.0.1:1883")
    })?;
    let port = port
        .parse::<u16>()
        .map_err(|error| anyhow::anyhow!("invalid port in broker address '{broker}': {error}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        anyhow::bail!("invalid broker address '{broker}': the host is empty");
    }
    Ok((host.to_string(), port))
}

/// Microseconds since the Unix epoch, by the wall clock (0 if the clock is before 1970).
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_addresses() {
        assert_eq!(parse_broker("127.0.0.1:1883").ok(), Some(("127.0.0.1".to_string(), 1883)));
        assert_eq!(parse_broker("[::1]:1884").ok(), Some(("::1".to_string(), 1884)));
        assert!(parse_broker("localhost").is_err());
        assert!(parse_broker("localhost:x").is_err());
        assert!(parse_broker(":1883").is_err());
    }
}
