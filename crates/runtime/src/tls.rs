//! Mutual TLS for every Updraft connection: the private CA and the certificates it issues
//! (`admin-cli pki`), a process's transport (TLS credentials, or plaintext only when asked for
//! with `--insecure`), tonic client and server configurations, and the name and role read
//! back out of a peer's certificate.
//!
//! A certificate says who its holder is: the subject's common name is the name (a machine, a
//! provider, an administrator) and its organisational unit the role. Only provider roles get
//! the server-auth key usage, so an agent's or admin's certificate cannot serve as a provider.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
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

    fn serves(self) -> bool {
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

/// A process's TLS credentials: the CA it trusts and its own certificate and key (PEM).
#[derive(Clone)]
pub struct Credentials {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    /// The name and role in our own certificate.
    pub me: Peer,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("me", &self.me).finish_non_exhaustive()
    }
}

/// Longest a client may take to complete its TLS handshake with a server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Credentials {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| file_err(p, e));
        let (ca_pem, cert_pem, key_pem) = (read(ca)?, read(cert)?, read(key)?);
        let der = pem_der(&cert_pem).ok_or_else(|| file_err(cert, "not a PEM certificate"))?;
        let me = peer_of(&der).map_err(|e| file_err(cert, e))?;
        KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|e| file_err(key, e))?;
        pem_der(&ca_pem).ok_or_else(|| file_err(ca, "not a PEM certificate"))?;
        Ok(Self { ca: ca_pem, cert: cert_pem, key: key_pem, me })
    }

    /// Server side: present our certificate, require one from every client, signed by our CA;
    /// a client that has not finished its handshake within [`HANDSHAKE_TIMEOUT`] is dropped
    /// (an idle socket must not hold a connection slot of its address for ever).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Our certificate chain and private key (PEM), for a server that presents the same identity
    /// to clients without certificates (the provider's web console).
    pub fn identity_pem(&self) -> (&[u8], &[u8]) {
        (&self.cert, &self.key)
    }

    /// Seconds until our certificate and our CA's expire, as the gauge
    /// `updraft.tls.certificate.expiry` (`certificate` = `own` or `ca`), read at each
    /// collection so the value counts down.
    pub fn register_expiry_metric(&self) {
        let not_after = |pem: &[u8]| -> Option<i64> {
            let der = pem_der(pem)?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            Some(cert.validity().not_after.timestamp())
        };
        let certs: Vec<(&'static str, i64)> = [("own", not_after(&self.cert)), ("ca", not_after(&self.ca))]
            .into_iter()
            .filter_map(|(which, at)| Some((which, at?)))
            .collect();
        let (name, role) = (self.me.name.clone(), self.me.role.as_str());
        crate::metrics::meter()
            .i64_observable_gauge("updraft.tls.certificate.expiry")
            .with_unit("s")
            .with_description("Seconds until the certificate expires (negative once it has)")
            .with_callback(move |o| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                for (which, at) in &certs {
                    o.observe(
                        at - now,
                        &[
                            opentelemetry::KeyValue::new("certificate", *which),
                            opentelemetry::KeyValue::new("name", name.clone()),
                            opentelemetry::KeyValue::new("role", role),
                        ],
                    );
                }
            })
            .build();
    }

    /// Client side: trust only our CA; present our certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
    }
}

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

/// The transport flags every Updraft program takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM) that peers' certificates must be signed by.
    #[arg(long = "tls-ca", env = "UPDRAFT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// This program's certificate (PEM), from `admin-cli pki issue`.
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
    Tls(Arc<Credentials>),
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
            (Some(ca), Some(cert), Some(key), false) => Ok(Transport::Tls(Arc::new(Credentials::load(ca, cert, key)?))),
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

    /// With TLS, exports the certificates' time to expiry (see
    /// [`Credentials::register_expiry_metric`]).
    pub fn register_expiry_metric(&self) {
        if let Transport::Tls(c) = self {
            c.register_expiry_metric();
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// An endpoint for `url` with this transport (https with TLS, http without).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| TlsError::Config(format!("provider URL {url:?} is not valid: {e}")))?;
        let scheme = ep.uri().scheme_str().unwrap_or_default().to_string();
        match (self, scheme.as_str()) {
            (Transport::Tls(c), "https") => {
                ep.tls_config(c.client_config()).map_err(|e| TlsError::Config(format!("TLS for {url}: {e}")))
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

/// What to say when a TLS 1.3 server dropped the connection right after the handshake: that is
/// how a refused client certificate looks from the client's side.
pub const REFUSED_HINT: &str = "the provider closed the connection: it may have refused this certificate \
     (signed by another CA, expired, or not yet valid; check --tls-cert and --tls-ca)";

/// The private CA and the certificates it issues.
pub mod pki {
    use super::*;

    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";

    fn write_secret(path: &Path, text: &str) -> Result<(), TlsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| file_err(path, e))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| file_err(path, e))
    }

    fn write_public(path: &Path, text: &str) -> Result<(), TlsError> {
        use std::io::Write;
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| file_err(path, e))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| file_err(path, e))
    }

    fn err(e: rcgen::Error) -> TlsError {
        TlsError::Config(e.to_string())
    }

    /// Creates a CA in `dir` (ca.crt, and ca.key readable by the owner only). Refuses to
    /// replace an existing one.
    pub fn init(dir: &Path, name: &str) -> Result<PathBuf, TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let (crt, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if crt.exists() || key_path.exists() {
            return Err(file_err(&crt, "a CA already exists here; it is not replaced"));
        }
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Updraft");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(err)?;
        write_secret(&key_path, &key.serialize_pem())?;
        write_public(&crt, &cert.pem())?;
        Ok(crt)
    }

    /// A CA loaded once, to issue many certificates (the provider signing requests, a test
    /// harness issuing thousands).
    pub struct Ca {
        issuer: Issuer<'static, KeyPair>,
    }

    impl Ca {
        /// The CA in `dir` (ca.crt and ca.key).
        pub fn load(dir: &Path) -> Result<Ca, TlsError> {
            let (crt, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
            let ca_pem = std::fs::read_to_string(&crt).map_err(|e| file_err(&crt, e))?;
            let ca_key_pem = std::fs::read_to_string(&key).map_err(|e| file_err(&key, e))?;
            let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| file_err(&key, e))?;
            let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| file_err(&crt, e))?;
            Ok(Ca { issuer })
        }

        /// A new key and a certificate for `name` with `role`, valid from `valid_from` for
        /// `valid_for`, as PEM (certificate, private key). Server roles get `sans` (host names
        /// or IP addresses; the name, localhost and 127.0.0.1 when none are given).
        pub fn issue_pem(
            &self,
            role: Role,
            name: &str,
            sans: &[String],
            valid_from: time::OffsetDateTime,
            valid_for: Duration,
        ) -> Result<(String, String), TlsError> {
            if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control() || c == '/') {
                return Err(TlsError::Config(format!("name {name:?} must be 1-64 printable characters, no '/'")));
            }
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, name);
            dn.push(DnType::OrganizationalUnitName, role.as_str());
            dn.push(DnType::OrganizationName, "Updraft");
            params.distinguished_name = dn;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            if role.serves() {
                params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
                let defaults = [name.to_string(), "localhost".into(), "127.0.0.1".into()];
                let sans: &[String] = if sans.is_empty() { &defaults } else { sans };
                for s in sans {
                    params.subject_alt_names.push(match s.parse::<std::net::IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(
                            s.clone().try_into().map_err(|_| TlsError::Config(format!("{s:?} is not a host name")))?,
                        ),
                    });
                }
            }
            params.not_before = valid_from;
            params.not_after = valid_from + time::Duration::seconds(valid_for.as_secs() as i64);
            let key = KeyPair::generate().map_err(err)?;
            let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
            Ok((cert.pem(), key.serialize_pem()))
        }
    }

    /// Issues a certificate for `name` with `role`, signed by the CA in `dir` (see
    /// [`Ca::issue_pem`]). Writes `out.crt` and `out.key` (owner-only); refuses to replace them.
    pub fn issue(
        dir: &Path,
        role: Role,
        name: &str,
        sans: &[String],
        valid_from: time::OffsetDateTime,
        valid_for: Duration,
        out: &Path,
    ) -> Result<(PathBuf, PathBuf), TlsError> {
        let (cert, key) = Ca::load(dir)?.issue_pem(role, name, sans, valid_from, valid_for)?;
        let (crt_path, key_path) = (out.with_extension("crt"), out.with_extension("key"));
        write_secret(&key_path, &key)?;
        write_public(&crt_path, &cert)?;
        Ok((crt_path, key_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let creds = Credentials::load(&dir.path().join(pki::CA_CERT), &crt, &key).unwrap();
        assert_eq!(creds.me, Peer { name: "pc-17".into(), role: Role::Agent });
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!("nobody".parse::<Role>().is_err());
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
