//! The standby's console: the same pages at the standby's address, served by the active.
//!
//! A standby holds no store, so it cannot render a page; it passes every request on its console
//! listener to the active's console, whose address and certificate the active published in the
//! pair directory ([`crate::pair::ConsoleRecord`]). The standby trusts exactly that certificate,
//! and tells the active the browser's address under the record's forwarding key, so sign-in
//! limits stay per browser rather than per standby. Sessions live in the active; after a
//! switchover users sign in again.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::ClientAddr;
use crate::pair::{ConsoleRecord, PairDir};

/// The headers that carry the browser's address from a standby, and the key that makes the
/// active believe it.
pub const CLIENT_HEADER: &str = "x-updraft-client";
pub const KEY_HEADER: &str = "x-updraft-forward-key";

/// How long connecting to the active's console may take.
const CONNECT: Duration = Duration::from_secs(5);

/// The standby's console: every request goes to the active's.
pub fn router(pair: PairDir) -> axum::Router {
    axum::Router::new().fallback(forward).with_state(Arc::new(pair))
}

async fn forward(State(pair): State<Arc<PairDir>>, req: Request) -> Response {
    let Some(active) = pair.console() else {
        return unavailable("no active provider has published its console yet; try again in a moment".into());
    };
    match pass(&active, req).await {
        Ok(resp) => resp,
        Err(e) => unavailable(format!("the active provider's console at {} cannot be reached: {e}", active.address)),
    }
}

fn unavailable(msg: String) -> Response {
    let body = maud::html! {
        (maud::DOCTYPE)
        html { head { title { "Updraft console" } } body style="font-family:system-ui;margin:2rem" {
            h1 { "Console unavailable" }
            p { "This provider is the standby of a switchover pair; its console is the active's. " (msg) }
        } }
    };
    (StatusCode::SERVICE_UNAVAILABLE, axum::response::Html(body.into_string())).into_response()
}

/// Sends `req` to the active's console over a connection of its own and returns its answer.
async fn pass(active: &ConsoleRecord, req: Request) -> Result<Response, String> {
    let client = req.extensions().get::<ClientAddr>().map(|a| a.0);
    let (mut parts, body) = req.into_parts();
    // Whatever a browser claims in these headers is dropped; only the standby sets them.
    parts.headers.remove(CLIENT_HEADER);
    parts.headers.remove(KEY_HEADER);
    if let Some(addr) = client {
        parts.headers.insert(CLIENT_HEADER, HeaderValue::from_str(&addr.to_string()).expect("an address"));
        parts.headers.insert(KEY_HEADER, HeaderValue::from_str(&active.forward_key).map_err(|e| e.to_string())?);
    }
    // HTTP/2 from the browser, HTTP/1.1 to the active: the authority becomes a Host header.
    if !parts.headers.contains_key(header::HOST)
        && let Some(host) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, host);
    }
    parts.uri =
        parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").parse::<Uri>().map_err(|e| e.to_string())?;
    parts.version = Version::HTTP_11;
    let stream = connect(active).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection to the active's console ended");
        }
    });
    let resp = sender.send_request(Request::from_parts(parts, body)).await.map_err(|e| e.to_string())?;
    let (mut parts, body) = resp.into_parts();
    for h in
        [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, header::HeaderName::from_static("keep-alive")]
    {
        parts.headers.remove(h);
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

async fn connect(active: &ConsoleRecord) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tls = client_config(&active.cert_pem)?;
    let addr: SocketAddr = active.address;
    let tcp = tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no connection within {CONNECT:?}"))?
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("updraft-console").expect("a valid name");
    tokio::time::timeout(CONNECT, tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| format!("no TLS handshake within {CONNECT:?}"))?
        .map_err(|e| e.to_string())
}

fn client_config(cert_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| format!("its certificate: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned { cert: cert.into_owned(), provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Trusts one certificate: the one the active published. Its signatures are checked as usual.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the certificate the active provider published".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
