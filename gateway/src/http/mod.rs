//! The operations endpoint (`[http]`): `/metrics` (Prometheus), `/health/live`,
//! `/health/ready` and `/status` (JSON).
//!
//! It reads what the stages already share — the [`Metrics`] atomics and the store thread's
//! read-only `Inspect` command — and changes nothing: no stage knows it exists. Served with
//! hyper 1 (HTTP/1.1 only) on the gateway's current-thread runtime; the accept loop is ours,
//! as the broker's is, so its limits are explicit.
//!
//! # Invariants
//! - Bounded: at most [`MAX_CONNECTIONS`] connections (beyond it a new one is closed at once,
//!   counted `outpost_http_connections_refused_total`); request headers must arrive within
//!   [`HEADER_TIMEOUT`]; a connection lives at most [`CONNECTION_LIFETIME`] (keep-alive
//!   scrapers reconnect). So neither a scraper nor an attacker can hold the gateway.
//! - Cheap for the pipeline: a scrape reads atomics and, at most once per second, asks the
//!   store thread for its statistics (one read transaction, ordered with commits). Only
//!   `/health/ready` and `/status` open a probe connection to the broker, at most once per
//!   second (`health`).
//! - With a bearer token, every path but `/health/*` needs `Authorization: Bearer <token>`;
//!   the token is never logged. Supervisors probe `/health/*` without it.
//! - Every task stops on the gateway's cancellation token; open connections are dropped.
//!
//! # Where the histograms are observed
//! `metrics::Histograms` is exposed here and observed by the stages, wait-free:
//! `puback_hold` when a sensor's timed `Ticket` loses its last copy (`ack.rs`: the publish read
//! → the event safe); `commit_duration` when the relay gets `Reply::Applied { took, .. }`
//! (`relay/commit.rs`; `took` is measured on the store thread around the transaction);
//! `upstream_round_trip` when the relay matches an upstream PUBACK to its in-flight publish
//! (`relay/lanes.rs`: the turn it was written → the turn its PUBACK was read).

pub mod exposition;
pub mod health;
pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use self::health::Checker;
use self::status::Sampler;
use crate::buffer::worker::Command;
use crate::config::GatewayConfig;
use crate::config::http::BearerToken;
pub use crate::config::http::HttpConfig;
use crate::metrics::Metrics;
use crate::telemetry::LogThrottle;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open (then it is closed after its current request).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (`http.listen`): {source}; pick a free address or stop what holds it")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("`http.bearer_token_file` {}: {reason}", path.display())]
    Token { path: std::path::PathBuf, reason: String },
}

/// What the endpoint reads from the running gateway.
pub struct Handles {
    pub metrics: Metrics,
    /// The store thread's queue (read-only `Inspect` requests).
    pub store: mpsc::Sender<Command>,
    /// The preferred upstream endpoint, `mqtt://host:port` (the uplink names them all in
    /// `Metrics::endpoints`).
    pub upstream_endpoint: Option<String>,
    /// `buffer.max_events`, `buffer.max_bytes`.
    pub capacity: (u64, u64),
    /// Where `dead-letters-upstream.jsonl` is, for its size.
    pub data_dir: std::path::PathBuf,
    /// The sensor listeners the readiness probe connects to.
    pub listeners: Vec<health::Listener>,
    /// A configured sensor user for the probe (the first, by name).
    pub credentials: Option<(String, String)>,
}

impl Handles {
    pub fn new(config: &GatewayConfig, metrics: Metrics, store: mpsc::Sender<Command>) -> Handles {
        Handles {
            metrics,
            store,
            upstream_endpoint: config
                .upstream
                .as_ref()
                .and_then(|u| u.endpoints().first().map(ToString::to_string)),
            capacity: (config.buffer.max_events, config.buffer.max_bytes.as_u64()),
            data_dir: config.data_dir.clone(),
            listeners: std::iter::once(config.broker.listen)
                .chain(config.broker.listen_v5)
                .map(|addr| health::Listener { addr, tls: health::ListenerTls::Plain })
                .chain(config.broker.tls.as_ref().map(|tls| health::Listener {
                    addr: tls.listen,
                    tls: health::ListenerTls::Tls { client_certificate_required: tls.require_certificate() },
                }))
                .collect(),
            credentials: config.broker.users.iter().next().map(|(u, p)| (u.clone(), p.clone())),
        }
    }
}

struct State {
    metrics: Metrics,
    token: Option<BearerToken>,
    checker: Checker,
    sampler: Sampler,
    started: Instant,
    upstream_endpoint: Option<String>,
    capacity: (u64, u64),
    data_dir: std::path::PathBuf,
    /// Refused connections and requests are logged the first time, then at most every
    /// `telemetry::reminder_every` (10 min).
    refused_log: Mutex<LogThrottle>,
    unauthorized_log: Mutex<LogThrottle>,
    dead_letters_log: Mutex<LogThrottle>,
}

/// Binds `cfg.listen` and serves until `cancel`. Returns the bound address.
pub async fn start(
    cfg: &HttpConfig,
    handles: Handles,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, HttpError> {
    let token = cfg.read_token().map_err(|reason| HttpError::Token {
        path: cfg.bearer_token_file.clone().unwrap_or_default(),
        reason,
    })?;
    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|source| HttpError::Bind { addr: cfg.listen, source })?;
    let addr = listener.local_addr().unwrap_or(cfg.listen);
    let credentials = handles.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    let state = Arc::new(State {
        metrics: handles.metrics.clone(),
        checker: Checker::new(handles.store, handles.listeners.clone(), credentials),
        token,
        sampler: Sampler::default(),
        started: Instant::now(),
        upstream_endpoint: handles.upstream_endpoint,
        capacity: handles.capacity,
        data_dir: handles.data_dir,
        refused_log: Mutex::new(LogThrottle::default()),
        unauthorized_log: Mutex::new(LogThrottle::default()),
        dead_letters_log: Mutex::new(LogThrottle::default()),
    });
    info!(
        message = "http endpoint listening: /metrics, /health/live, /health/ready, /status",
        %addr,
        auth = if state.token.is_some() { "bearer token (not for /health/*)" } else { "none" }
    );
    {
        let (state, cancel) = (Arc::clone(&state), cancel.clone());
        tracker.spawn(async move { state.sampler.run(state.metrics.clone(), cancel).await });
    }
    tracker.spawn(accept(listener, state, cancel, tracker.clone()));
    Ok(addr)
}

async fn accept(listener: TcpListener, state: Arc<State>, cancel: CancellationToken, tracker: TaskTracker) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and friends: keep the listener, back off briefly so the loop does
                    // not spin while descriptors are exhausted.
                    if let Some(folded) = log_ready(&state.refused_log) {
                        warn!(message = "http endpoint: accepting a connection failed; check the process's file descriptor limit (LimitNOFILE)", %error, similar_since_last_log = folded);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            Metrics::add(&state.metrics.http().connections_refused, 1);
            if let Some(folded) = log_ready(&state.refused_log) {
                warn!(
                    message = "http endpoint: connection limit reached, closing new connections; is a scraper or a client misbehaving?",
                    limit = MAX_CONNECTIONS,
                    peer = ?stream.peer_addr().ok(),
                    similar_since_last_log = folded
                );
            }
            continue;
        };
        tracker.spawn(serve(stream, Arc::clone(&state), permit, cancel.clone()));
    }
    info!(message = "http endpoint closed");
}

fn log_ready(throttle: &Mutex<LogThrottle>) -> Option<u64> {
    throttle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).ready(tokio::time::Instant::now())
}

async fn serve(
    stream: TcpStream,
    state: Arc<State>,
    _permit: OwnedSemaphorePermit,
    cancel: CancellationToken,
) {
    let service = hyper::service::service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(respond(&state, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(message = "http connection ended with an error", %error);
            }
        }
        () = cancel.cancelled() => {}
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HEADER_TIMEOUT, connection).await;
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => reply(status, "application/json", body),
        Err(error) => {
            reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("cannot encode JSON: {error}\n"))
        }
    }
}

async fn respond(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    Metrics::add(&state.metrics.http().requests, 1);
    if request.method() != Method::GET {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET is served\n");
        response.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let path = request.uri().path();
    if let Some(token) = &state.token {
        if !path.starts_with("/health/")
            && !token.admits(request.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes))
        {
            Metrics::add(&state.metrics.http().unauthorized, 1);
            if let Some(folded) = log_ready(&state.unauthorized_log) {
                warn!(
                    message = "http endpoint: request without the bearer token refused (401); give the scraper the token from http.bearer_token_file",
                    path,
                    similar_since_last_log = folded
                );
            }
            let mut response = reply(StatusCode::UNAUTHORIZED, "text/plain", "a bearer token is required\n");
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"outpost\""));
            return response;
        }
    }
    match path {
        "/health/live" => json(StatusCode::OK, &serde_json::json!({ "live": true })),
        "/health/ready" => ready(state).await,
        "/status" => status(state).await,
        "/metrics" => metrics(state).await,
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /health/live, /health/ready or /status\n",
        ),
    }
}

fn upstream_json(state: &State) -> serde_json::Value {
    let current = state.metrics.endpoints().current().map(|c| c.url.clone());
    serde_json::json!({
        "endpoint": current.or_else(|| state.upstream_endpoint.clone()),
        "connected": Metrics::get(&state.metrics.gauges().upstream_connected) == 1,
    })
}

async fn ready(state: &State) -> Response<Full<Bytes>> {
    let check = state.checker.check().await;
    let ready = check.ready();
    let body = serde_json::json!({
        "ready": ready,
        "store": match &check.store {
            Ok(_) => serde_json::json!({ "ok": true }),
            Err(error) => serde_json::json!({ "ok": false, "error": error }),
        },
        "listeners": check.listeners,
        // Not part of readiness: buffering through an outage is the gateway's job.
        "upstream": upstream_json(state),
    });
    json(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

async fn status(state: &State) -> Response<Full<Bytes>> {
    let check = state.checker.check().await;
    let status = state.sampler.status(status::Inputs {
        metrics: &state.metrics,
        started: state.started,
        ready: check.ready(),
        endpoint: state.upstream_endpoint.clone(),
        store: check.store,
        capacity: state.capacity,
    });
    json(StatusCode::OK, &status)
}

async fn metrics(state: &State) -> Response<Full<Bytes>> {
    let store = state.checker.store().await.ok();
    // A stat of a file the gateway owns, off the runtime thread all the same (an SD card can
    // stall metadata reads); unreadable, the gauge is left out and the failure is in the log.
    let data_dir = state.data_dir.clone();
    let dead_letters = match tokio::task::spawn_blocking(move || {
        crate::deadletter::durable_file_bytes(&data_dir)
    })
    .await
    {
        Ok(Ok(bytes)) => Some(bytes),
        Ok(Err(error)) => {
            if let Some(folded) = log_ready(&state.dead_letters_log) {
                warn!(message = "cannot read the size of dead-letters-upstream.jsonl; outpost_dead_letters_upstream_bytes is left out of /metrics. Check the data directory's permissions", %error, similar_since_last_log = folded);
            }
            None
        }
        Err(_) => None,
    };
    let scrape = exposition::Scrape::read(&state.metrics, store, state.capacity, dead_letters);
    match exposition::encode(scrape) {
        Ok(text) => reply(StatusCode::OK, exposition::CONTENT_TYPE, text),
        Err(error) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot encode metrics: {error}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An endpoint whose store never answers and that probes no listener.
    async fn endpoint(
        metrics: &Metrics,
    ) -> (SocketAddr, CancellationToken, TaskTracker, mpsc::Receiver<Command>) {
        let (store, store_rx) = mpsc::channel(8);
        let handles = Handles {
            metrics: metrics.clone(),
            store,
            upstream_endpoint: None,
            capacity: (1, 1),
            // No such directory: the dead letters' gauge reads 0.
            data_dir: std::path::PathBuf::from("/nonexistent/outpost-http-test"),
            listeners: Vec::new(),
            credentials: None,
        };
        let cfg = HttpConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            bearer_token_file: None,
            allow_unauthenticated: false,
        };
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let addr = start(&cfg, handles, cancel.clone(), &tracker).await.expect("start");
        (addr, cancel, tracker, store_rx)
    }

    /// Sends one keep-alive GET and reads the whole response (no body beyond Content-Length).
    async fn get_live(stream: &mut TcpStream) -> String {
        stream.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut response = Vec::new();
        let mut chunk = [0u8; 512];
        while !response.ends_with(b"{\"live\":true}") {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&response));
            response.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&response).into_owned()
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once_and_counted() {
        let metrics = Metrics::default();
        let (addr, cancel, tracker, _store) = endpoint(&metrics).await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            // An answer proves the connection was accepted and holds a permit.
            assert!(get_live(&mut stream).await.starts_with("HTTP/1.1 200 OK"));
            held.push(stream);
        }
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 64];
        assert_eq!(extra.read(&mut buf).await.expect("read"), 0, "closed without an answer");
        assert_eq!(Metrics::get(&metrics.http().connections_refused), 1);
        assert_eq!(Metrics::get(&metrics.http().requests), MAX_CONNECTIONS as u64);
        // Cancellation ends every task, open connections included.
        cancel.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.expect("every task stops");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_headers_is_dropped_after_the_header_timeout() {
        let metrics = Metrics::default();
        let (addr, _cancel, _tracker, _store) = endpoint(&metrics).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let started = tokio::time::Instant::now();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        let mut rest = Vec::new();
        // hyper may answer 408 before closing; either way the connection ends.
        let _ = stream.read_to_end(&mut rest).await;
        let waited = started.elapsed();
        // hyper's own default is 30 s, the connection lifetime 60 s: only ours ends it here.
        assert!(waited >= HEADER_TIMEOUT && waited < 2 * HEADER_TIMEOUT, "closed after {waited:?}");
        assert!(rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&rest));
    }
}
