//! A load generator for HTTP/2 over the client stack the agents themselves use (tonic's
//! channel: hyper and rustls), so that one program measures a provider's gRPC calls and
//! nginx's GETs alike, over cleartext or over mutual TLS. h2load cannot present client
//! certificates; this can, one per connection, as a fleet of machines would.
//!
//! The shape is h2load's `-m 1`: many connections, each sending one request at a time until
//! the run's total is reached; every answer is read to its end and checked (a 2xx status, and
//! `grpc-status: 0` for gRPC).
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tower::{Service, ServiceExt};
use updraft_runtime::tls::{Role, pki};

/// One request, sent over and over.
#[derive(Clone)]
pub enum Req {
    /// An HTTP GET of a path (nginx).
    Get(String),
    /// A unary or server-streaming gRPC call: its path and framed request body.
    Grpc { path: String, body: Bytes },
}

impl Req {
    /// A gRPC call of `path` (`/pkg.Service/Method`) with message `msg`.
    pub fn grpc(path: &str, msg: &impl prost::Message) -> Req {
        Req::Grpc { path: path.into(), body: grpc_frame(msg) }
    }
}

/// A gRPC message as it travels: the 5-byte frame header, then the message.
pub fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let bytes = msg.encode_to_vec();
    let mut framed = Vec::with_capacity(bytes.len() + 5);
    framed.push(0u8);
    framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    framed.extend_from_slice(&bytes);
    framed.into()
}

/// Client certificates for many distinct machines, issued in memory by the world's CA.
pub struct Identities {
    ca: pki::Ca,
    ca_pem: String,
}

impl Identities {
    /// The CA in `pki_dir` (a World's `pki` directory).
    pub fn new(pki_dir: &std::path::Path) -> Identities {
        let ca_pem = std::fs::read_to_string(pki_dir.join(pki::CA_CERT)).expect("the CA certificate");
        Identities { ca: pki::Ca::load(pki_dir).expect("the CA"), ca_pem }
    }

    /// A TLS client configuration presenting a fresh certificate for `name` with `role`.
    pub fn client(&self, name: &str, role: Role) -> ClientTlsConfig {
        let (cert, key) = self.issue(name, role, &[]);
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(cert, key))
    }

    /// A certificate and key (PEM) for `name` with `role` (and `sans` when it serves).
    pub fn issue(&self, name: &str, role: Role, sans: &[String]) -> (String, String) {
        let now = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
        self.ca.issue_pem(role, name, sans, now, Duration::from_secs(86_400)).expect("a certificate")
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

/// A connection to `url` (`http://` or `https://`), with `tls` when given; large flow-control
/// windows, as the agent's downloads would want and h2load uses by default, and the frame size
/// agents allow.
pub async fn connect(url: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: {e}"))?
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(updraft_runtime::tls::MAX_FRAME_BYTES)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).map_err(|e| format!("{url}: {e}"))?;
    }
    updraft_runtime::tls::connect_within(ep, Duration::from_secs(60)).await.map_err(|e| format!("{url}: {e}"))
}

/// Sends `req` once on `ch`; the number of body bytes the answer carried.
pub async fn send(ch: &mut Channel, req: &Req) -> Result<u64, String> {
    let request = match req {
        Req::Get(path) => http::Request::get(path.as_str()).body(Body::empty()),
        Req::Grpc { path, body } => http::Request::post(path.as_str())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::new(http_body_util::Full::new(body.clone()))),
    }
    .map_err(|e| e.to_string())?;
    let svc = ch.ready().await.map_err(|e| e.to_string())?;
    let answer = svc.call(request).await.map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("HTTP {}", answer.status()));
    }
    let mut grpc_status = answer.headers().get("grpc-status").map(|v| v.as_bytes().to_vec());
    let mut body = answer.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            bytes += data.len() as u64;
        } else if let Some(trailers) = frame.trailers_ref() {
            grpc_status = trailers.get("grpc-status").map(|v| v.as_bytes().to_vec());
        }
    }
    match (req, grpc_status.as_deref()) {
        (Req::Get(_), _) | (Req::Grpc { .. }, Some(b"0")) => Ok(bytes),
        (Req::Grpc { .. }, s) => Err(format!("grpc-status {:?}", s.map(String::from_utf8_lossy))),
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// From the first request to the last answer.
    pub elapsed: Duration,
    pub req_per_s: f64,
    pub mb_per_s: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub failed: usize,
}

/// Connects to `url` once per TLS configuration (or `n` times in cleartext), `concurrency` at
/// a time; every connection is made (and its handshake done) before this returns.
pub async fn connect_many(url: &str, tls: Vec<Option<ClientTlsConfig>>, concurrency: usize) -> Vec<Channel> {
    use futures::StreamExt;
    futures::stream::iter(tls)
        .map(|t| async move { connect(url, t).await.expect("a connection") })
        .buffered(concurrency)
        .collect()
        .await
}

/// Requests over `conns`, each connection sending its own request one at a time, all
/// connections busy at once, until `requests` have been sent in all; the clock runs from the
/// first request to the last answer.
pub async fn run(conns: Vec<(Channel, Req)>, requests: usize) -> Load {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|(mut ch, req)| {
            let next = next.clone();
            tokio::spawn(async move {
                let (mut times, mut bytes, mut failed) = (Vec::new(), 0u64, 0usize);
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    let t = Instant::now();
                    match send(&mut ch, &req).await {
                        Ok(n) => {
                            bytes += n;
                            times.push(t.elapsed());
                        }
                        Err(e) => {
                            if failed == 0 {
                                eprintln!("load: {e}");
                            }
                            failed += 1;
                        }
                    }
                }
                (times, bytes, failed)
            })
        })
        .collect();
    let (mut times, mut bytes, mut failed) = (Vec::new(), 0u64, 0usize);
    for t in tasks {
        let (t, b, f) = t.await.expect("a load task");
        times.extend(t);
        bytes += b;
        failed += f;
    }
    let elapsed = start.elapsed();
    let secs = elapsed.as_secs_f64();
    times.sort();
    let pick = |q: f64| times.get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1))).copied();
    Load {
        elapsed,
        req_per_s: times.len() as f64 / secs,
        mb_per_s: bytes as f64 / secs / (1 << 20) as f64,
        p50: pick(0.5).unwrap_or_default(),
        p99: pick(0.99).unwrap_or_default(),
        failed,
    }
}
