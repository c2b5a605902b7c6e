//! A process's TLS identity and trust as they are *now*: loaded from its three files, and
//! replaced without a restart when they change — a renewed certificate, a new CA bundle from
//! the centre, an administrator's new files and SIGHUP — and the revocation lists that close a
//! revoked holder's connections.
//!
//! Servers take every connection through [`Tls::accept`]: a rustls configuration whose
//! certificate and client verifier are read from the current state at each handshake, so a
//! reload takes effect for the next connection. Clients build tonic endpoints from the current
//! state ([`super::Transport::endpoint`]); a long-lived client compares [`Tls::generation`] to
//! rebuild its channel after a reload.
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::stream::ServerTls;
use super::{HANDSHAKE_TIMEOUT, Peer, TlsError, file_err, peer_of};

/// One loaded set of credentials: the CAs trusted (a bundle: during a CA rotation, the old and
/// the new), our certificate chain and key, and what our certificate says.
pub struct Credentials {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    /// The name and role in our own certificate.
    pub me: Peer,
    /// Our certificate's serial number (hex) and validity (Unix seconds).
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// The CA certificates' expiry, earliest first.
    ca_not_after: Vec<i64>,
    roots: Arc<rustls::RootCertStore>,
    certified: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("me", &self.me).field("serial", &self.serial).finish_non_exhaustive()
    }
}

impl Credentials {
    /// Parses and checks a set: the bundle holds at least one CA, the certificate is ours (the
    /// key matches it) and names a holder and role.
    pub fn parse(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>, where_: &Paths) -> Result<Self, TlsError> {
        let cas = super::pem_ders(&ca_pem);
        if cas.is_empty() {
            return Err(file_err(&where_.ca, "holds no PEM certificate"));
        }
        let mut roots = rustls::RootCertStore::empty();
        let mut ca_not_after = Vec::new();
        for der in &cas {
            roots.add(CertificateDer::from(der.clone())).map_err(|e| file_err(&where_.ca, e))?;
            if let Ok((_, c)) = x509_parser::parse_x509_certificate(der) {
                ca_not_after.push(c.validity().not_after.timestamp());
            }
        }
        ca_not_after.sort_unstable();
        let chain: Vec<CertificateDer<'static>> =
            super::pem_ders(&cert_pem).into_iter().map(CertificateDer::from).collect();
        let leaf = chain.first().ok_or_else(|| file_err(&where_.cert, "holds no PEM certificate"))?;
        let me = peer_of(leaf).map_err(|e| file_err(&where_.cert, e))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| file_err(&where_.cert, e))?;
        let key_pair =
            rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|e| file_err(&where_.key, e))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
            return Err(file_err(
                &where_.key,
                format!("is not the key of the certificate in {}", where_.cert.display()),
            ));
        }
        let key_der = PrivateKeyDer::try_from(key_pair.serialize_der()).map_err(|e| file_err(&where_.key, e))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| file_err(&where_.key, e))?;
        Ok(Self {
            serial: hex::encode(parsed.raw_serial()),
            not_before: parsed.validity().not_before.timestamp(),
            not_after: parsed.validity().not_after.timestamp(),
            ca_not_after,
            me,
            roots: Arc::new(roots),
            certified: Arc::new(CertifiedKey::new(chain, signer)),
            ca: ca_pem,
            cert: cert_pem,
            key: key_pem,
        })
    }

    /// Parses a set and checks that the certificate verifies against the bundle: what an
    /// enrolled host's new credentials must pass before they are written.
    pub fn check(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8], paths: &Paths) -> Result<Credentials, TlsError> {
        let c = Credentials::parse(ca_pem.to_vec(), cert_pem.to_vec(), key_pem.to_vec(), paths)?;
        c.verify_own_chain()?;
        Ok(c)
    }

    /// Our certificate chain and private key (PEM).
    pub fn identity_pem(&self) -> (&[u8], &[u8]) {
        (&self.cert, &self.key)
    }

    /// The CA bundle (PEM).
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca
    }

    /// Client side: trust our CAs; present our certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
    }

    /// Whether `cert_pem`'s first certificate was issued by one of our CAs, for `me`'s name and
    /// role, and holds `key_pem`'s key: what a renewed certificate must be before it replaces
    /// ours.
    fn accepts_renewal(&self, ca_pem: &[u8], cert_pem: &[u8], paths: &Paths) -> Result<Credentials, TlsError> {
        let next = Credentials::check(ca_pem, cert_pem, &self.key, paths)?;
        if next.me != self.me {
            return Err(TlsError::Config(format!(
                "the renewed certificate is for {} ({}), not {} ({})",
                next.me.name, next.me.role, self.me.name, self.me.role
            )));
        }
        Ok(next)
    }

    /// The subject names of the CAs we trust.
    fn ca_subjects(&self) -> Vec<String> {
        super::pem_ders(&self.ca)
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c.subject().to_string()))
            .collect()
    }

    /// Whether a revocation list (DER) is signed by one of our CAs.
    fn check_crl(&self, crl_der: &[u8]) -> Result<(), TlsError> {
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl_der)
            .map_err(|e| TlsError::Config(format!("unreadable revocation list: {e}")))?;
        for der in super::pem_ders(&self.ca) {
            let Ok((_, ca)) = x509_parser::parse_x509_certificate(&der) else { continue };
            if ca.subject() == crl.issuer() && crl.verify_signature(ca.public_key()).is_ok() {
                return Ok(());
            }
        }
        Err(TlsError::Config(format!("a revocation list from {} is not signed by a trusted CA", crl.issuer())))
    }

    /// Our certificate verifies against our own bundle (as a client certificate: every
    /// Updraft certificate is one).
    fn verify_own_chain(&self) -> Result<(), TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), crypto())
            .build()
            .map_err(|e| TlsError::Config(format!("CA bundle: {e}")))?;
        let chain = &self.certified.cert;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| TlsError::Config(format!("the certificate does not verify against the CA bundle: {e}")))?;
        Ok(())
    }
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a server asks of its clients' certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// One from our CAs, not revoked.
    Required,
    /// As `Required` when one is presented; a client without one is let through the handshake
    /// (to enroll: every other call refuses it).
    Optional,
    /// None asked for (the web console: users sign in with a password).
    None,
}

/// Where a process's credentials live.
#[derive(Debug, Clone)]
pub struct Paths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Paths {
    /// Where enrollment writes a host's credentials, and where a program started without TLS
    /// flags looks for them: `DIR/ca.crt`, `DIR/identity.crt`, `DIR/identity.key`.
    pub fn enrolled(dir: &Path) -> Self {
        Self { ca: dir.join("ca.crt"), cert: dir.join("identity.crt"), key: dir.join("identity.key") }
    }

    /// The three files' contents: CA bundle, certificate, key.
    fn read(&self) -> Result<[Vec<u8>; 3], TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| file_err(p, e));
        Ok([read(&self.ca)?, read(&self.cert)?, read(&self.key)?])
    }
}

/// The live TLS state of a process (see the module's header).
pub struct Tls {
    paths: Paths,
    current: RwLock<Arc<Credentials>>,
    /// Revocation lists (DER) in force, and the verifier built from them and the current CAs.
    crls: RwLock<Vec<Vec<u8>>>,
    /// The serials those lists name.
    revoked: RwLock<std::collections::HashSet<String>>,
    verifier: RwLock<Arc<dyn ClientCertVerifier>>,
    /// Moves at every change of credentials or trust.
    generation: AtomicU64,
    /// Open server-side connections by the serial of their client's certificate.
    open: Arc<OpenConnections>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("paths", &self.paths).field("current", &self.current()).finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the credentials at `paths`.
    pub fn load(paths: Paths) -> Result<Arc<Self>, TlsError> {
        let [ca, cert, key] = paths.read()?;
        let creds = Credentials::parse(ca, cert, key, &paths)?;
        let verifier = build_verifier(&creds.roots, &[])?;
        Ok(Arc::new(Self {
            paths,
            current: RwLock::new(Arc::new(creds)),
            crls: RwLock::new(vec![]),
            revoked: Default::default(),
            verifier: RwLock::new(verifier),
            generation: AtomicU64::new(0),
            open: Default::default(),
        }))
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.current.read().expect("tls state").clone()
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Moves at every reload that changed something: a client holding a channel built from an
    /// earlier generation builds a new one.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the files again; returns whether anything changed. On error the credentials in
    /// use stay.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let [ca, cert, key] = self.paths.read()?;
        {
            let now = self.current();
            if now.ca == ca && now.cert == cert && now.key == key {
                return Ok(false);
            }
        }
        let creds = Credentials::parse(ca, cert, key, &self.paths)?;
        self.replace(creds)?;
        Ok(true)
    }

    fn replace(&self, creds: Credentials) -> Result<(), TlsError> {
        let verifier = build_verifier(&creds.roots, &self.crls.read().expect("crls"))?;
        tracing::info!(name = %creds.me.name, role = %creds.me.role, serial = %creds.serial,
            not_after = creds.not_after, cas = creds.ca_not_after.len(), "TLS credentials loaded");
        let trusted = creds.ca_subjects();
        *self.verifier.write().expect("verifier") = verifier;
        *self.current.write().expect("tls state") = Arc::new(creds);
        self.generation.fetch_add(1, Ordering::AcqRel);
        // A CA dropped from the bundle (a rotation's retirement): its holders' connections end.
        self.open.close_untrusted(&trusted);
        Ok(())
    }

    /// Replaces our certificate (and the CA bundle) with a renewed one for the same key, name
    /// and role: checked first, written atomically (certificate last, so a crash leaves a
    /// matching pair), then loaded.
    pub fn install_renewal(&self, ca_bundle_pem: &[u8], cert_pem: &[u8]) -> Result<(), TlsError> {
        let next = self.current().accepts_renewal(ca_bundle_pem, cert_pem, &self.paths)?;
        write_file(&self.paths.ca, ca_bundle_pem)?;
        write_file(&self.paths.cert, cert_pem)?;
        self.replace(next)
    }

    /// Trusts exactly the CAs in `ca_bundle_pem` from now on (written to our CA file), keeping
    /// our certificate, which must verify against them.
    pub fn install_bundle(&self, ca_bundle_pem: &[u8]) -> Result<bool, TlsError> {
        let now = self.current();
        if now.ca == ca_bundle_pem {
            return Ok(false);
        }
        let next = now.accepts_renewal(ca_bundle_pem, &now.cert, &self.paths)?;
        write_file(&self.paths.ca, ca_bundle_pem)?;
        self.replace(next)?;
        Ok(true)
    }

    /// Puts revocation lists (DER, one per CA, each signed by its CA) in force: a certificate
    /// on one is refused at the handshake from now on, and open connections that presented one
    /// are closed. Lists not signed by a CA of ours are refused, not applied.
    pub fn set_crls(&self, crls: Vec<Vec<u8>>) -> Result<usize, TlsError> {
        if *self.crls.read().expect("crls") == crls {
            return Ok(0);
        }
        let creds = self.current();
        for crl in &crls {
            creds.check_crl(crl)?;
        }
        let verifier = build_verifier(&creds.roots, &crls)?;
        let revoked: Vec<String> = crls.iter().flat_map(|c| revoked_serials(c)).collect();
        *self.verifier.write().expect("verifier") = verifier;
        *self.crls.write().expect("crls") = crls;
        *self.revoked.write().expect("revoked") = revoked.iter().cloned().collect();
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(self.open.close(&revoked))
    }

    /// Whether the serial (hex) is on a revocation list in force.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.read().expect("revoked").contains(serial)
    }

    /// The server side: our current certificate, and client certificates verified against our
    /// current CAs and revocation lists (see [`ClientAuth`]). ALPN is the caller's to set.
    pub fn server_config(self: &Arc<Self>, clients: ClientAuth) -> rustls::ServerConfig {
        let builder = rustls::ServerConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match clients {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Required | ClientAuth::Optional => builder.with_client_cert_verifier(Arc::new(LiveVerifier {
                tls: self.clone(),
                optional: clients == ClientAuth::Optional,
            })),
        };
        builder.with_cert_resolver(Arc::new(LiveCert(self.clone())))
    }

    /// Completes the TLS handshake of every connection `incoming` yields (each in its own task,
    /// bounded by [`HANDSHAKE_TIMEOUT`]), and yields those that succeeded; a connection is
    /// closed when its client certificate is revoked later. For gRPC (HTTP/2 only).
    pub fn accept<IO, S>(
        self: &Arc<Self>,
        incoming: S,
        clients: ClientAuth,
    ) -> impl Stream<Item = io::Result<Coalesced<ServerTls<Revocable<IO>>>>> + Send + 'static
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Stream<Item = io::Result<IO>> + Send + 'static,
    {
        let mut config = self.server_config(clients);
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let open = self.open.clone();
        tokio::spawn(async move {
            let mut incoming = std::pin::pin!(incoming);
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => break,
                    next = std::future::poll_fn(|cx| incoming.as_mut().poll_next(cx)) => next,
                };
                let io = match next {
                    None => break,
                    Some(Ok(io)) => io,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "accept failed");
                        continue;
                    }
                };
                let (config, tx, open) = (config.clone(), tx.clone(), open.clone());
                tokio::spawn(async move {
                    let token = CancellationToken::new();
                    let handshake = ServerTls::accept(Revocable::new(io, token.clone()), config);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(mut stream)) => {
                            let client = stream.peer_certificates().and_then(|c| c.first()).and_then(|leaf| {
                                x509_parser::parse_x509_certificate(leaf)
                                    .ok()
                                    .map(|(_, c)| (hex::encode(c.raw_serial()), c.issuer().to_string()))
                            });
                            if let Some((serial, issuer)) = client {
                                stream.get_mut().registration = Some(open.register(serial, issuer, token));
                            }
                            let _ = tx.send(Ok(Coalesced::new(stream))).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Reloads on every SIGHUP, for as long as the process runs.
    pub fn reload_on_sighup(self: &Arc<Self>) {
        let tls = self.clone();
        tokio::spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                match tls.reload() {
                    Ok(true) => tracing::info!("SIGHUP: TLS credentials reloaded"),
                    Ok(false) => tracing::info!("SIGHUP: TLS credentials unchanged"),
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: TLS credentials not reloaded; the previous stay in use")
                    }
                }
            }
        });
    }

    /// Seconds until our certificate and our CAs expire, as the gauge
    /// `updraft.tls.certificate.expiry` (`certificate` = `own` or `ca`, the earliest CA), read
    /// from the credentials in use at each collection.
    pub fn register_expiry_metric(self: &Arc<Self>) {
        let tls = Arc::downgrade(self);
        crate::metrics::meter()
            .i64_observable_gauge("updraft.tls.certificate.expiry")
            .with_unit("s")
            .with_description("Seconds until the certificate expires (negative once it has)")
            .with_callback(move |o| {
                let Some(tls) = tls.upgrade() else { return };
                let c = tls.current();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let certs = [("own", Some(c.not_after)), ("ca", c.ca_not_after.first().copied())];
                for (which, at) in certs {
                    let Some(at) = at else { continue };
                    o.observe(
                        at - now,
                        &[
                            opentelemetry::KeyValue::new("certificate", which),
                            opentelemetry::KeyValue::new("name", c.me.name.clone()),
                            opentelemetry::KeyValue::new("role", c.me.role.as_str()),
                        ],
                    );
                }
            })
            .build();
    }
}

/// Replaces a credentials file atomically (see `updraft_core::package::write_atomic`).
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| file_err(path, "not a file name"))?;
    updraft_core::package::write_atomic(dir, &name.to_string_lossy(), bytes).map_err(|e| file_err(path, e))
}

fn build_verifier(
    roots: &Arc<rustls::RootCertStore>,
    crls: &[Vec<u8>],
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), crypto())
        .with_crls(crls.iter().map(|c| CertificateRevocationListDer::from(c.clone())))
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))
}

/// The serials (hex) a revocation list names.
pub fn revoked_serials(crl_der: &[u8]) -> Vec<String> {
    match x509_parser::revocation_list::CertificateRevocationList::from_der(crl_der) {
        Ok((_, crl)) => crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect(),
        Err(_) => vec![],
    }
}
use x509_parser::prelude::FromDer;

/// Presents the certificate in use at each handshake.
#[derive(Debug)]
struct LiveCert(Arc<Tls>);

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

/// Verifies client certificates with the verifier in force at each handshake.
#[derive(Debug)]
struct LiveVerifier {
    tls: Arc<Tls>,
    optional: bool,
}

impl LiveVerifier {
    fn now(&self) -> Arc<dyn ClientCertVerifier> {
        self.tls.verifier.read().expect("verifier").clone()
    }
}

impl ClientCertVerifier for LiveVerifier {
    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.now().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.now().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.now().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.now().supported_verify_schemes()
    }
}

/// One open connection: what closes it, and the issuer of the certificate it presented.
type OpenConnection = (CancellationToken, String);

/// Server-side connections by client certificate serial, to close those of a revoked one.
#[derive(Default)]
struct OpenConnections {
    /// serial -> connection id -> (its token, its certificate's issuer).
    by_serial: Mutex<HashMap<String, HashMap<u64, OpenConnection>>>,
    next: AtomicU64,
}

impl OpenConnections {
    fn register(self: &Arc<Self>, serial: String, issuer: String, token: CancellationToken) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_serial.lock().expect("open connections").entry(serial.clone()).or_default().insert(id, (token, issuer));
        Registration { open: self.clone(), serial, id }
    }

    /// Closes every connection whose certificate's issuer is not among `trusted` (CA subject
    /// names): what a retired CA's certificates get. Returns how many.
    fn close_untrusted(&self, trusted: &[String]) -> usize {
        let map = self.by_serial.lock().expect("open connections");
        let mut n = 0;
        for (token, _) in map.values().flat_map(|m| m.values()).filter(|(_, issuer)| !trusted.contains(issuer)) {
            token.cancel();
            n += 1;
        }
        if n > 0 {
            tracing::warn!(connections = n, "closed the connections of certificates from a CA no longer trusted");
        }
        n
    }

    /// Closes every connection of the given serials; returns how many.
    fn close(&self, serials: &[String]) -> usize {
        let map = self.by_serial.lock().expect("open connections");
        let mut n = 0;
        for s in serials {
            for (token, _) in map.get(s).into_iter().flat_map(|m| m.values()) {
                token.cancel();
                n += 1;
            }
        }
        if n > 0 {
            tracing::warn!(connections = n, "closed the connections of revoked certificates");
        }
        n
    }
}

/// A connection's place in [`OpenConnections`], left when the connection drops.
struct Registration {
    open: Arc<OpenConnections>,
    serial: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.open.by_serial.lock().expect("open connections");
        if let Some(m) = map.get_mut(&self.serial) {
            m.remove(&self.id);
            if m.is_empty() {
                map.remove(&self.serial);
            }
        }
    }
}

/// A server-side connection that ends (every read and write fails) once its token is
/// cancelled: how a revoked certificate's open connections are closed.
pub struct Revocable<IO> {
    io: IO,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    registration: Option<Registration>,
}

impl<IO> Revocable<IO> {
    fn new(io: IO, token: CancellationToken) -> Self {
        Self { io, cancelled: Box::pin(token.cancelled_owned()), registration: None }
    }

    fn revoked(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.cancelled
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| io::Error::new(io::ErrorKind::ConnectionAborted, "the peer's certificate was revoked"))
    }
}

impl<IO: Connected> Connected for Revocable<IO> {
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Revocable<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.revoked(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Revocable<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.revoked(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A server's TLS stream as HTTP/2 sees it: one that does not write vectored. h2 then copies a
/// frame's payload of up to 1 KiB into its write buffer instead of chaining it (256 bytes when
/// the stream writes vectored), so a check's answer — headers, data and trailers — is one TLS
/// record and one `write`; chained, the data had to be flushed before the trailers could be
/// queued, two records and two system calls per answer. Larger payloads (downloads) are still
/// chained, and the TLS layer below ([`ServerTls`]) writes the records of each batch it
/// encrypts in one `write`.
///
/// The stream is boxed. tonic moves it into the connection's task, whose future keeps the value
/// it was started with beside the HTTP/2 connection that took it over: two copies of a TLS
/// stream (most of it rustls's connection state) per connected agent, where a box makes
/// the two a pointer each and one copy on the heap.
pub struct Coalesced<S>(Box<S>);

impl<S> Coalesced<S> {
    fn new(stream: S) -> Self {
        Self(Box::new(stream))
    }
}

impl<S: Connected> Connected for Coalesced<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_coalesced_stream_hides_vectored_writes_and_passes_bytes_through() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let revocable = Revocable::new(server, CancellationToken::new());
        let mut coalesced = Coalesced::new(revocable);
        assert!(!coalesced.is_write_vectored(), "h2 must copy small payloads, not chain them");
        coalesced.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
    }
}
