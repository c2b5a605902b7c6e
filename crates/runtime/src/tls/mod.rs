//! Mutual TLS for every Updraft connection: the private CA and the certificates it issues
//! (`pki`), a process's live credentials and the server side of its connections (`live`:
//! reloaded without a restart, revocation lists in force), a process's transport (TLS, or
//! plaintext only when asked for with `--insecure`), and the name and role read back out of a
//! peer's certificate.
//!
//! A certificate says who its holder is: the subject's common name is the name (a machine, a
//! provider, an administrator) and its organisational unit the role. Only provider roles get
//! the server-auth key usage, so an agent's or admin's certificate cannot serve as a provider.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use tonic::transport::Endpoint;

mod live;
pub mod pki;
mod stream;

pub(crate) use live::write_file;
pub use live::{ClientAuth, Coalesced, Credentials, Paths, Revocable, Tls, revoked_serials};
pub use stream::{ServerTls, TlsConnectInfo};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

pub(crate) fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), message: e.to_string() }
}

/// What a certificate allows its holder to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Provider,
    RemoteProvider,
    Agent,
    Admin,
}

impl Role {
    pub const ALL: &'static str = "provider, remote-provider, agent or admin";

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Provider => "provider",
            Role::RemoteProvider => "remote-provider",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }

    pub fn serves(self) -> bool {
        matches!(self, Role::Provider | Role::RemoteProvider)
    }
}

impl std::str::FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        Ok(match s {
            "provider" => Role::Provider,
            "remote-provider" => Role::RemoteProvider,
            "agent" => Role::Agent,
            "admin" => Role::Admin,
            _ => return Err(TlsError::Config(format!("unknown role {s:?}; expected {}", Role::ALL))),
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is at the other end of a connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub role: Role,
}

/// The name and role in a peer's (already verified) leaf certificate.
pub fn peer_of(leaf_der: &[u8]) -> Result<Peer, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| TlsError::Config(format!("unreadable peer certificate: {e}")))?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next().and_then(|a| a.as_str().ok());
    let ou = subject.iter_organizational_unit().next().and_then(|a| a.as_str().ok());
    match (cn, ou) {
        (Some(name), Some(role)) => Ok(Peer { name: name.to_string(), role: role.parse()? }),
        _ => Err(TlsError::Config("peer certificate names no Updraft name (CN) and role (OU)".into())),
    }
}

/// Longest a client may take to complete its TLS handshake with a server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest HTTP/2 frame a client lets its provider send (RFC 9113 §6.5.2, at most 16 MiB).
/// HTTP/2's default is 16 KiB, which cuts each 256 KiB download chunk into 17 frames and costs
/// the provider a frame header, a TLS record and a wake-up for each; at 1 MiB a chunk and its
/// gRPC framing travel as one frame. The receiver's buffer grows only when such a frame comes.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// A self-signed certificate and key (PEM) for `names`, for a server that has no certificate
/// of its own (a plaintext `--insecure` provider's web console: still HTTPS, so its session
/// cookies stay `Secure`; browsers ask once to accept it).
pub fn self_signed(names: &[String]) -> Result<(String, String), TlsError> {
    let err = |e: rcgen::Error| TlsError::Config(format!("cannot make a self-signed certificate: {e}"));
    let key = KeyPair::generate().map_err(err)?;
    let cert = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The first certificate in a PEM file, as DER.
pub fn pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem).next()?.ok().map(|p| p.contents)
}

/// The certificate blocks of a PEM text, each as written (with a final newline).
pub fn pem_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else { break };
        out.push(format!("{}\n", &rest[start..start + len + END.len()]));
        rest = &rest[start + len + END.len()..];
    }
    out
}

/// Every certificate in a PEM file (a CA bundle, a chain), as DER.
pub fn pem_ders(pem: &[u8]) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(|p| p.ok())
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

/// The transport flags every Updraft program takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM) that peers' certificates must be signed by.
    #[arg(long = "tls-ca", env = "UPDRAFT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// This program's certificate (PEM), from enrollment (`agent enroll`, `remote-provider
    /// enroll`) or `admin-cli pki issue`.
    #[arg(long = "tls-cert", env = "UPDRAFT_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// This program's private key (PEM).
    #[arg(long = "tls-key", env = "UPDRAFT_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Plaintext and unauthenticated, for tests only: no certificates needed or checked.
    #[arg(long, env = "UPDRAFT_INSECURE", global = true)]
    pub insecure: bool,
}

impl TlsArgs {
    pub fn transport(&self, program: &str) -> Result<Transport, TlsError> {
        self.transport_or_enrolled(program, None)
    }

    /// As [`TlsArgs::transport`]; without any flag, the credentials enrollment wrote to
    /// `enrolled` (see [`Paths::enrolled`]) when they are there.
    pub fn transport_or_enrolled(&self, program: &str, enrolled: Option<&Path>) -> Result<Transport, TlsError> {
        if let (None, None, None, false, Some(dir)) =
            (&self.tls_ca, &self.tls_cert, &self.tls_key, self.insecure, enrolled)
        {
            let paths = Paths::enrolled(dir);
            if paths.cert.exists() {
                return Ok(Transport::Tls(Tls::load(paths)?));
            }
        }
        Transport::from_flags(
            program,
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.insecure,
        )
    }
}

/// How a process talks: mutual TLS, or plaintext that someone asked for explicitly.
#[derive(Clone, Debug)]
pub enum Transport {
    Tls(Arc<Tls>),
    Insecure,
}

impl Transport {
    /// From a program's `--tls-ca/--tls-cert/--tls-key` and `--insecure` flags. Refuses to guess: no
    /// credentials and no `--insecure` is an error, and plaintext is warned about.
    pub fn from_flags(
        program: &str,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        insecure: bool,
    ) -> Result<Self, TlsError> {
        match (ca, cert, key, insecure) {
            (Some(_), _, _, true) | (_, Some(_), _, true) | (_, _, Some(_), true) => {
                Err(TlsError::Config("--insecure cannot be combined with --tls-ca, --tls-cert or --tls-key".into()))
            }
            (Some(ca), Some(cert), Some(key), false) => {
                Ok(Transport::Tls(Tls::load(Paths { ca: ca.into(), cert: cert.into(), key: key.into() })?))
            }
            (None, None, None, true) => {
                tracing::warn!("{program}: --insecure: plaintext, unauthenticated connections; use only for tests");
                eprintln!("warning: {program} --insecure: connections are plaintext and unauthenticated");
                Ok(Transport::Insecure)
            }
            (None, None, None, false) => Err(TlsError::Config(format!(
                "{program}: no TLS credentials: give --tls-ca, --tls-cert and --tls-key (see `admin-cli pki`), or --insecure for plaintext"
            ))),
            _ => Err(TlsError::Config(format!(
                "{program}: --tls-ca, --tls-cert and --tls-key go together; one is missing"
            ))),
        }
    }

    /// With TLS, exports the certificates' time to expiry (see [`Tls::register_expiry_metric`])
    /// and reloads the credentials on SIGHUP.
    pub fn register_expiry_metric(&self) {
        if let Transport::Tls(t) = self {
            t.register_expiry_metric();
            t.reload_on_sighup();
        }
    }

    /// Moves whenever the credentials change (0 without TLS): see [`Tls::generation`].
    pub fn generation(&self) -> u64 {
        match self {
            Transport::Tls(t) => t.generation(),
            Transport::Insecure => 0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// An endpoint for `url` with this transport (https with TLS, http without).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| TlsError::Config(format!("provider URL {url:?} is not valid: {e}")))?
            .max_frame_size(MAX_FRAME_BYTES);
        let scheme = ep.uri().scheme_str().unwrap_or_default().to_string();
        match (self, scheme.as_str()) {
            (Transport::Tls(t), "https") => {
                ep.tls_config(t.current().client_config()).map_err(|e| TlsError::Config(format!("TLS for {url}: {e}")))
            }
            (Transport::Insecure, "http") => Ok(ep),
            (Transport::Tls(_), _) => {
                Err(TlsError::Config(format!("{url}: with TLS credentials, provider URLs start with https://")))
            }
            (Transport::Insecure, _) => {
                Err(TlsError::Config(format!("{url}: with --insecure, provider URLs start with http://")))
            }
        }
    }

    /// The URL scheme of this transport.
    pub fn scheme(&self) -> &'static str {
        if self.is_tls() { "https" } else { "http" }
    }
}

/// A transport error with its causes: tonic's own message is often just "transport error",
/// and the reason (an unknown CA, an expired certificate) is further down the chain.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

/// Connects to `endpoint` within `within`, the TLS and HTTP/2 handshakes included. tonic's own
/// `connect_timeout` bounds only the TCP connect, so a server that accepts a connection and then
/// says nothing (frozen, overloaded, or hostile) would hold the caller for ever. The error says
/// why, causes included.
pub async fn connect_within(endpoint: Endpoint, within: Duration) -> Result<tonic::transport::Channel, String> {
    match tokio::time::timeout(within, endpoint.connect_timeout(within).connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!("no connection within {within:?}")),
    }
}

/// What to say when a TLS 1.3 server dropped the connection right after the handshake: that is
/// how a refused client certificate looks from the client's side.
pub const REFUSED_HINT: &str = "the provider closed the connection: it may have refused this certificate \
     (signed by another CA, expired, or not yet valid; check --tls-cert and --tls-ca)";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_accepts_and_says_nothing_is_given_up_on() {
        // Accepted by the kernel's backlog and never answered: the TCP connect succeeds, the
        // TLS handshake never does.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", silent.local_addr().unwrap());
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), "test CA").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let (cert, key) =
            pki::issue(dir.path(), Role::Agent, "pc-1", &[], now, Duration::from_secs(86400), &dir.path().join("pc-1"))
                .unwrap();
        let tls = Transport::Tls(Tls::load(Paths { ca: dir.path().join(pki::CA_CERT), cert, key }).unwrap());
        let started = std::time::Instant::now();
        let err = connect_within(tls.endpoint(&url).unwrap(), Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(err, "no connection within 300ms");
        // tonic's connect_timeout alone would wait for ever here (it bounds only the TCP
        // connect); the bound is generous for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(5), "gave up only after {:?}", started.elapsed());
        drop(silent);
    }

    #[test]
    fn issued_certificates_carry_name_and_role() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), "test CA").unwrap();
        assert!(pki::init(dir.path(), "again").is_err());
        let now = time::OffsetDateTime::now_utc();
        let (crt, key) = pki::issue(
            dir.path(),
            Role::Agent,
            "pc-17",
            &[],
            now,
            Duration::from_secs(86400),
            &dir.path().join("pc-17"),
        )
        .unwrap();
        let tls = Tls::load(Paths { ca: dir.path().join(pki::CA_CERT), cert: crt, key: key.clone() }).unwrap();
        assert_eq!(tls.current().me, Peer { name: "pc-17".into(), role: Role::Agent });
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!("nobody".parse::<Role>().is_err());
    }

    #[test]
    fn a_request_is_signed_for_its_key_and_a_renewal_replaces_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), "test CA").unwrap();
        let ca = pki::Ca::load(dir.path()).unwrap();
        let now = time::OffsetDateTime::now_utc();
        // The host makes its key and request; the CA signs it for the name it decides.
        let (csr, key) = pki::request("asked-name").unwrap();
        let req = pki::Request::parse(&csr).unwrap();
        let signed = ca.sign(&req, Role::Agent, "pc-9", &[], now, Duration::from_secs(3600)).unwrap();
        let host = dir.path().join("host");
        let paths = Paths::enrolled(&host);
        pki::write_new_key(&paths.key, &key).unwrap();
        std::fs::write(&paths.cert, &signed.pem).unwrap();
        std::fs::write(&paths.ca, ca.cert_pem()).unwrap();
        let tls = Tls::load(paths.clone()).unwrap();
        let first = tls.current();
        assert_eq!((first.me.name.as_str(), first.serial.as_str()), ("pc-9", signed.serial.as_str()));
        // A renewal with the same key replaces the certificate and moves the generation.
        let again = pki::Request::parse(&pki::request_with_key(key.as_bytes(), "pc-9").unwrap()).unwrap();
        assert_eq!(again.key_sha256, req.key_sha256);
        let renewed = ca.sign(&again, Role::Agent, "pc-9", &[], now, Duration::from_secs(7200)).unwrap();
        let generation = tls.generation();
        tls.install_renewal(ca.cert_pem().as_bytes(), renewed.pem.as_bytes()).unwrap();
        assert_eq!(tls.current().serial, renewed.serial);
        assert!(tls.generation() > generation);
        assert_eq!(std::fs::read_to_string(&paths.cert).unwrap(), renewed.pem);
        // Another holder's certificate, or one from another CA, is refused and changes nothing.
        let other = ca.sign(&again, Role::Agent, "pc-10", &[], now, Duration::from_secs(60)).unwrap();
        assert!(tls.install_renewal(ca.cert_pem().as_bytes(), other.pem.as_bytes()).is_err());
        let elsewhere = tempfile::tempdir().unwrap();
        pki::init(elsewhere.path(), "another CA").unwrap();
        let foreign = pki::Ca::load(elsewhere.path()).unwrap();
        let forged = foreign.sign(&again, Role::Agent, "pc-9", &[], now, Duration::from_secs(60)).unwrap();
        assert!(tls.install_renewal(ca.cert_pem().as_bytes(), forged.pem.as_bytes()).is_err());
        assert_eq!(tls.current().serial, renewed.serial);
        // A revocation list names what it revokes, and is refused unless its CA is trusted.
        let crl = ca.revocation_list(&[(renewed.serial.clone(), 0)], 1).unwrap();
        assert_eq!(revoked_serials(&crl), vec![renewed.serial.clone()]);
        tls.set_crls(vec![crl]).unwrap();
        assert!(tls.is_revoked(&renewed.serial));
        assert!(!tls.is_revoked(&signed.serial));
        let forged_crl = foreign.revocation_list(&[(signed.serial.clone(), 0)], 2).unwrap();
        assert!(tls.set_crls(vec![forged_crl]).is_err());
        assert!(!tls.is_revoked(&signed.serial));
    }

    #[test]
    fn plaintext_must_be_asked_for() {
        let e = Transport::from_flags("x", None, None, None, false).unwrap_err().to_string();
        assert!(e.contains("--insecure"), "{e}");
        assert!(Transport::from_flags("x", Some(Path::new("a")), None, None, false).is_err());
        let t = Transport::from_flags("x", None, None, None, true).unwrap();
        assert!(t.endpoint("https://h:1").is_err());
        assert!(t.endpoint("http://h:1").is_ok());
    }
}
