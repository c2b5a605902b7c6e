//! A load generator for HTTP/2 over the client stack the agents themselves use (tonic's
//! channel: hyper and rustls), so that one program measures a provider's gRPC calls and
//! nginx's GETs alike, over cleartext or over mutual TLS. h2load cannot present client
//! certificates; this can, one per connection, as a fleet of machines would.
//!
//! The shape is h2load's `-m 1`: many connections, each sending one request at a time until
//! the run's total is reached; every answer is read to its end and checked (a 2xx status, and
//! `grpc-status: 0` for gRPC).
//!
//! Two clients send: [`Channel`], the agents' own stack, and [`Bare`], the h2 crate alone,
//! driven by the task that sends (no tower buffer, no hyper, no connection task). On this
//! 2-core machine the load generator shares the cores with the server it measures, so what a
//! request costs the client is taken from the server: `Bare` costs about half what `Channel`
//! does (`UPDRAFT_BENCH=tls` prints both); h2load is built the same way.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::body::Body;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tower::{Service, ServiceExt};
use updraft_runtime::tls::{MAX_FRAME_BYTES, Role, pem_ders, pki};

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

    /// The same as [`Identities::client`], for a [`Bare`] connection.
    pub fn bare_client(&self, name: &str, role: Role) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let (cert, key) = self.issue(name, role, &[]);
        let mut roots = rustls::RootCertStore::empty();
        for der in pem_ders(self.ca_pem.as_bytes()) {
            roots.add(CertificateDer::from(der)).expect("the CA certificate");
        }
        let chain = pem_ders(cert.as_bytes()).into_iter().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("the key");
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .expect("a client certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
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
    updraft_runtime::tls::connect_within(ep, CONNECT_WITHIN).await.map_err(|e| format!("{url}: {e}"))
}

/// How long a connection, its TLS handshake included, may take to be made.
const CONNECT_WITHIN: Duration = Duration::from_secs(60);

/// What a run sends its requests over.
pub trait Conn: Send + 'static {
    /// Sends `req` once; the number of body bytes the answer carried.
    fn send(&mut self, req: &Req) -> impl Future<Output = Result<u64, String>> + Send;
}

impl Conn for Channel {
    async fn send(&mut self, req: &Req) -> Result<u64, String> {
        let request = head(req, "")?.map(|()| match req {
            Req::Get(_) => Body::empty(),
            Req::Grpc { body, .. } => Body::new(http_body_util::Full::new(body.clone())),
        });
        let svc = self.ready().await.map_err(|e| e.to_string())?;
        let answer = svc.call(request).await.map_err(|e| e.to_string())?;
        let mut grpc_status = grpc_status_of(&answer)?;
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
        answered(req, grpc_status.as_deref(), bytes)
    }
}

/// `req`'s request line and headers; its URI is `base` (empty, or `scheme://authority`) and
/// then its path.
fn head(req: &Req, base: &str) -> Result<http::Request<()>, String> {
    let request = match req {
        Req::Get(path) => http::Request::get(format!("{base}{path}")),
        Req::Grpc { path, .. } => http::Request::post(format!("{base}{path}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers"),
    };
    request.body(()).map_err(|e| e.to_string())
}

/// An answer's `grpc-status` header, if it has one; an error unless its HTTP status is 2xx.
fn grpc_status_of<B>(answer: &http::Response<B>) -> Result<Option<Vec<u8>>, String> {
    if !answer.status().is_success() {
        return Err(format!("HTTP {}", answer.status()));
    }
    Ok(answer.headers().get("grpc-status").map(|v| v.as_bytes().to_vec()))
}

/// Whether an answer to `req` that ended with `grpc_status` succeeded: every GET with a 2xx
/// status does (checked before), a gRPC call only with status 0.
fn answered(req: &Req, grpc_status: Option<&[u8]>, bytes: u64) -> Result<u64, String> {
    match (req, grpc_status) {
        (Req::Get(_), _) | (Req::Grpc { .. }, Some(b"0")) => Ok(bytes),
        (Req::Grpc { .. }, s) => Err(format!("grpc-status {:?}", s.map(String::from_utf8_lossy))),
    }
}

/// Bytes a [`Bare`] connection runs over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Driver = Pin<Box<dyn Future<Output = Result<(), h2::Error>> + Send>>;

/// An HTTP/2 connection through the h2 crate alone. Its connection is driven by the task that
/// sends, while a request is out, so a request wakes no other task.
pub struct Bare {
    requests: h2::client::SendRequest<Bytes>,
    driver: Driver,
    /// `scheme://authority`, which every request's URI starts with.
    base: String,
    /// Why the connection ended, once it has (its driver is not polled again).
    ended: Option<String>,
    /// The TLS cipher suite the server chose, over TLS.
    suite: Option<rustls::SupportedCipherSuite>,
}

/// A [`Bare`] connection to `url` (`http://` or `https://`), with `tls` when given, and the
/// flow-control windows and frame size [`connect`] asks for.
pub async fn connect_bare(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Bare, String> {
    match tokio::time::timeout(CONNECT_WITHIN, connect_bare_now(url, tls)).await {
        Ok(connected) => connected,
        Err(_) => Err(format!("{url}: no connection within {CONNECT_WITHIN:?}")),
    }
}

async fn connect_bare_now(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Bare, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!("{url}: not scheme://host:port"));
    };
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = authority.port_u16().ok_or_else(|| format!("{url}: no port"))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("{url}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("{url}: {e}"))?;
    let (io, suite): (Box<dyn Io>, _) = match tls {
        Some(config) => {
            let name = ServerName::try_from(host).map_err(|e| format!("{url}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
            let tls = tls.await.map_err(|e| format!("{url}: {e}"))?;
            let suite = tls.get_ref().1.negotiated_cipher_suite();
            (Box::new(tls), suite)
        }
        None => (Box::new(tcp), None),
    };
    let (requests, connection) = h2::client::Builder::new()
        .initial_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(MAX_FRAME_BYTES)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(Bare { requests, driver: Box::pin(connection), base: format!("{scheme}://{authority}"), ended: None, suite })
}

/// Connects [`Bare`] connections to `url`, one per TLS configuration, `concurrency` at a time.
pub async fn connect_many_bare(
    url: &str,
    tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    concurrency: usize,
) -> Vec<Bare> {
    connect_all(tls, concurrency, |t| connect_bare(url, t)).await
}

/// `connect` called on each of `tls`, `concurrency` at a time; every connection made.
async fn connect_all<T, C, F>(tls: Vec<T>, concurrency: usize, connect: impl Fn(T) -> F) -> Vec<C>
where
    F: Future<Output = Result<C, String>>,
{
    use futures::StreamExt;
    futures::stream::iter(tls)
        .map(|t| async { connect(t).await.expect("a connection") })
        .buffered(concurrency)
        .collect()
        .await
}

impl Bare {
    /// The TLS cipher suite the server chose (none in cleartext).
    pub fn suite(&self) -> Option<rustls::SupportedCipherSuite> {
        self.suite
    }
}

impl Conn for Bare {
    async fn send(&mut self, req: &Req) -> Result<u64, String> {
        if let Some(why) = &self.ended {
            return Err(why.clone());
        }
        let Bare { requests, driver, base, ended, .. } = self;
        let exchange = exchange(requests, base, req);
        tokio::pin!(exchange);
        match futures::future::select(exchange, driver.as_mut()).await {
            futures::future::Either::Left((answer, _)) => answer,
            futures::future::Either::Right((end, _)) => {
                let why = format!("the connection ended: {}", end.err().map_or("closed".into(), |e| e.to_string()));
                *ended = Some(why.clone());
                Err(why)
            }
        }
    }
}

/// One request and its whole answer over `requests`.
async fn exchange(requests: &mut h2::client::SendRequest<Bytes>, base: &str, req: &Req) -> Result<u64, String> {
    let e = |e: h2::Error| e.to_string();
    let request = head(req, base)?;
    let body = match req {
        Req::Get(_) => None,
        Req::Grpc { body, .. } => Some(body),
    };
    std::future::poll_fn(|cx| requests.poll_ready(cx)).await.map_err(e)?;
    let (answer, mut stream) = requests.send_request(request, body.is_none()).map_err(e)?;
    if let Some(body) = body {
        stream.send_data(body.clone(), true).map_err(e)?;
    }
    let answer = answer.await.map_err(e)?;
    let mut grpc_status = grpc_status_of(&answer)?;
    let mut body = answer.into_body();
    let mut bytes = 0u64;
    while let Some(data) = body.data().await {
        let data = data.map_err(e)?;
        bytes += data.len() as u64;
        body.flow_control().release_capacity(data.len()).map_err(e)?;
    }
    if let Some(trailers) = body.trailers().await.map_err(e)? {
        grpc_status = trailers.get("grpc-status").map(|v| v.as_bytes().to_vec());
    }
    answered(req, grpc_status.as_deref(), bytes)
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
    connect_all(tls, concurrency, |t| connect(url, t)).await
}

/// Requests over `conns`, each connection sending its own request one at a time, all
/// connections busy at once, until `requests` have been sent in all; the clock runs from the
/// first request to the last answer.
pub async fn run<C: Conn>(conns: Vec<(C, Req)>, requests: usize) -> Load {
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
                    match ch.send(&req).await {
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
