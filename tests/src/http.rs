//! The gateway's `[http]` endpoint from the outside: one real HTTP/1.1 GET (hyper's client over
//! TCP) and `/metrics` parsed with a Prometheus text parser (`prometheus-parse`), for the tests
//! that read what an operator's scraper or probe would.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::header::{AUTHORIZATION, HOST};
use hyper_util::rt::TokioIo;
pub use prometheus_parse::{Sample, Scrape, Value};
use tokio::net::TcpStream;

/// How long one request may take, connect to last body byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One GET of `path` on `addr`, with `Authorization: Bearer <token>` when given; returns the
/// status and the body.
pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let request = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let mut request = hyper::Request::get(path).header(HOST, addr.to_string());
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = sender.send_request(request.body(Empty::<Bytes>::new())?).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        connection.abort();
        anyhow::Ok((status, String::from_utf8(body.to_vec())?))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| anyhow::anyhow!("GET {path} on {addr}: no answer within {REQUEST_TIMEOUT:?}"))?
}

/// `/metrics` as served (the text) and parsed; fails on any status but 200.
pub async fn scrape(addr: SocketAddr, token: Option<&str>) -> anyhow::Result<(String, Scrape)> {
    let (status, body) = get(addr, "/metrics", token).await?;
    anyhow::ensure!(status == 200, "GET /metrics on {addr}: status {status}: {body}");
    let parsed = Scrape::parse(body.lines().map(|line| Ok(line.to_owned())))
        .with_context(|| format!("the exposition from {addr} does not parse"))?;
    Ok((body, parsed))
}

/// Every series name a scrape holds, as PromQL selects them: a histogram `h` is also
/// `h_bucket`, `h_sum` and `h_count`, a summary `s` also `s_sum` and `s_count`.
pub fn series_names(scrape: &Scrape) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for sample in &scrape.samples {
        let suffixes: &[&str] = match sample.value {
            Value::Histogram(_) => &["", "_bucket", "_sum", "_count"],
            Value::Summary(_) => &["", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{}{suffix}", sample.metric)));
    }
    names
}

/// The value of the counter, gauge or untyped sample `name{labels}`; `None` if absent.
pub fn sample(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))?;
    match found.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
        _ => None,
    }
}

/// Scrapes `/metrics` (no token) until `condition` holds, and returns that scrape; fails after
/// `timeout`, naming `what` it waited for.
pub async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    timeout: Duration,
    condition: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (_, parsed) = scrape(addr, None).await?;
        if condition(&parsed) {
            return Ok(parsed);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no scrape of {addr} showed {what} within {timeout:?}"
        );
        // Polling what the gateway serves: there is nothing to be woken by.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
