//! Who may call what. A tower layer in front of every service identifies the caller from its
//! certificate (with `--insecure`, from what it claims), applies the role rules — agents call
//! the agent API, sites and providers the replication API, admins the admin API, and of those
//! only authorized users, viewers read-only — and records every admin change and every
//! refusal in the audit log. Handlers find the [`Caller`] in the request's extensions.
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http::HeaderName;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::transport::server::TcpConnectInfo;
use tonic::{Code, Status};
use updraft_proto::v1::AuditEntry;
use updraft_runtime::tls::{Peer, Role, TlsConnectInfo, Transport, peer_of};

use crate::ops::{self, Op};
use crate::{Shared, health, now_ms};

/// Set by a standby on what it forwards: who the original caller is. Believed only from a
/// peer whose certificate says it is a provider.
pub const FORWARDED_NAME: HeaderName = HeaderName::from_static("x-updraft-forwarded-name");
pub const FORWARDED_ROLE: HeaderName = HeaderName::from_static("x-updraft-forwarded-role");
/// The serial of the original caller's certificate, so the active refuses a revoked one that
/// came through a standby.
pub const FORWARDED_SERIAL: HeaderName = HeaderName::from_static("x-updraft-forwarded-serial");
/// What admin-cli says about its user; the only identity there is with `--insecure`.
pub const CLAIMED_USER: HeaderName = HeaderName::from_static("x-updraft-user");

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    /// None: unauthenticated (the server runs with `--insecure`).
    pub role: Option<Role>,
    /// The standby provider that forwarded the call, if any.
    pub via: Option<String>,
    pub addr: Option<SocketAddr>,
    /// The serial (hex) of the certificate it presented (empty without TLS).
    pub serial: String,
}

impl Caller {
    pub fn describe(&self) -> String {
        let mut s = match self.role {
            Some(r) => format!("{} ({r})", self.name),
            None => format!("{} (unauthenticated)", self.name),
        };
        if let Some(v) = &self.via {
            s.push_str(&format!(" via {v}"));
        }
        if let Some(a) = self.addr {
            s.push_str(&format!(" from {a}"));
        }
        s
    }

    /// The caller of a request that went through the layer.
    pub fn of<T>(req: &tonic::Request<T>) -> Option<&Caller> {
        req.extensions().get::<Caller>()
    }
}

/// An agent may only speak for the machine its certificate names.
pub fn ensure_machine(caller: Option<&Caller>, machine: &str) -> Result<(), Status> {
    match caller {
        Some(c) if c.role == Some(Role::Agent) && c.name != machine => Err(Status::permission_denied(format!(
            "the certificate is for machine {:?}, the request speaks for {machine:?}",
            c.name
        ))),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Agent,
    Site,
    /// A site's own status: admins may read it too (sites keep no users).
    Status,
    Read,
    Write,
    /// Health and reflection.
    Infra,
    /// A first certificate: no client certificate needed (a join token or an administrator's
    /// approval decides).
    Enroll,
    /// A renewal: any holder of a certificate of ours (the tier decides what it gets).
    Renew,
}

fn access_of(path: &str) -> Option<Access> {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next()?, parts.next()?);
    Some(match service {
        health::AGENT_API => Access::Agent,
        health::REPLICATION if method == "SiteStatus" => Access::Status,
        health::REPLICATION => Access::Site,
        // The operations table says what each admin method needs (one it lacks counts as a
        // change: admins only, audited).
        health::ADMIN => match Op::from_name(method).map(Op::access) {
            Some(ops::Access::Read) => Access::Read,
            Some(ops::Access::Write) | None => Access::Write,
        },
        health::ENROLLMENT if method == "Enroll" => Access::Enroll,
        health::ENROLLMENT => Access::Renew,
        // For load balancers, probes and tools: any certificate of ours.
        "grpc.health.v1.Health" | "grpc.reflection.v1.ServerReflection" => Access::Infra,
        _ => return None,
    })
}

fn header(req: &http::Request<Body>, name: HeaderName) -> Option<String> {
    req.headers().get(name).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(128).collect())
}

/// The client certificate (DER) of the connection a request came on, if it presented one.
pub(crate) fn client_leaf<T>(req: &tonic::Request<T>) -> Option<Vec<u8>> {
    let certs = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    certs.first().map(|c| c.to_vec())
}

/// The address a request came from, over TLS or not.
fn remote_addr(req: &http::Request<Body>) -> Option<SocketAddr> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| req.extensions().get::<TcpConnectInfo>().and_then(|i| i.remote_addr()))
}

/// The identity in each open connection's certificate, read once per connection instead of
/// parsed again for every request (a check spent a fifth of its handler time there).
///
/// Keyed by the address of the connection's certificate chain, which tonic allocates once per
/// connection. The entry's `Weak` keeps that allocation (not the certificates) from being freed,
/// so no other connection's chain can have the same address while the entry exists: a key found
/// is always this connection's. Entries of closed connections are swept whenever the map has
/// doubled since the last sweep, so it holds at most twice the open connections.
#[derive(Default)]
struct Peers(std::sync::Mutex<PeerMap>);

type Chain = Vec<tonic::transport::CertificateDer<'static>>;

#[derive(Default)]
struct PeerMap {
    by_chain: std::collections::HashMap<usize, (std::sync::Weak<Chain>, Peer, String)>,
    sweep_at: usize,
}

impl Peers {
    /// Least size at which the map is swept.
    const SWEEP_FLOOR: usize = 1024;

    /// The peer of a connection; on its first request, the certificate's use is noted (see
    /// `Shared::cert_uses`).
    fn of(&self, chain: &Arc<Chain>, shared: Option<&Shared>) -> Result<(Peer, String), Status> {
        let key = Arc::as_ptr(chain) as usize;
        if let Some((_, peer, serial)) = self.0.lock().expect("peer cache").by_chain.get(&key) {
            return Ok((peer.clone(), serial.clone()));
        }
        let leaf = chain.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let peer = peer_of(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let serial = updraft_runtime::tls::pki::CertInfo::of_der(leaf).map(|i| i.serial).unwrap_or_default();
        if let Some(shared) = shared {
            let mut uses = shared.cert_uses.lock().expect("certificate uses");
            if uses.len() >= 100_000 {
                uses.clear(); // bounded; the next connection of each notes it again
            }
            uses.insert(serial.clone(), now_ms());
        }
        let mut m = self.0.lock().expect("peer cache");
        if m.by_chain.len() >= m.sweep_at.max(Self::SWEEP_FLOOR) {
            m.by_chain.retain(|_, (chain, _, _)| chain.strong_count() > 0);
            m.sweep_at = 2 * m.by_chain.len();
        }
        m.by_chain.insert(key, (Arc::downgrade(chain), peer.clone(), serial.clone()));
        Ok((peer, serial))
    }
}

/// Who is calling, from the connection's certificate (or the claim, without TLS).
fn identify(
    transport: &Transport,
    peers: &Peers,
    req: &http::Request<Body>,
    shared: Option<&Shared>,
) -> Result<Caller, Status> {
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
    let addr = remote_addr(req);
    let Transport::Tls(_) = transport else {
        let name = header(req, CLAIMED_USER).unwrap_or_else(|| "anonymous".into());
        return Ok(Caller { name, role: None, via: None, addr, serial: String::new() });
    };
    let certs = info.and_then(|i| i.peer_certs()).ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let (peer, serial) = peers.of(&certs, shared)?;
    if peer.role == Role::Provider
        && let (Some(name), Some(role)) = (header(req, FORWARDED_NAME), header(req, FORWARDED_ROLE))
    {
        let role = role.parse().map_err(|_| Status::unauthenticated(format!("forwarded role {role:?}")))?;
        // The standby's handshake checked the caller against its own lists; ours may be newer.
        let forwarded = header(req, FORWARDED_SERIAL).unwrap_or_default();
        if let Transport::Tls(tls) = transport
            && tls.is_revoked(&forwarded)
        {
            return Err(Status::unauthenticated(format!("the certificate of {name} ({forwarded}) is revoked")));
        }
        return Ok(Caller { name, role: Some(role), via: Some(peer.name), addr, serial: forwarded });
    }
    Ok(Caller { name: peer.name, role: Some(peer.role), via: None, addr, serial })
}

/// The role rules, and (on the provider that holds the store) the admin users.
fn authorize(caller: &Caller, access: Access, shared: Option<&Shared>) -> Result<(), Status> {
    let Some(role) = caller.role else { return Ok(()) };
    let ok = match access {
        Access::Agent => role == Role::Agent,
        Access::Site => matches!(role, Role::RemoteProvider | Role::Provider),
        Access::Status => matches!(role, Role::RemoteProvider | Role::Provider | Role::Admin),
        Access::Read | Access::Write => role == Role::Admin,
        Access::Infra | Access::Enroll | Access::Renew => true,
    };
    if !ok {
        let what = match access {
            Access::Agent => "the agent API",
            Access::Site | Access::Status => "the replication API",
            Access::Read | Access::Write => "the admin API",
            Access::Infra | Access::Enroll | Access::Renew => "health and reflection",
        };
        return Err(Status::permission_denied(format!("a {role} certificate ({}) may not call {what}", caller.name)));
    }
    if let (Some(shared), Access::Read | Access::Write) = (shared, access) {
        let access = if access == Access::Read { ops::Access::Read } else { ops::Access::Write };
        ops::check_user(shared, &caller.name, access).map_err(Status::from)?;
    }
    Ok(())
}

pub(crate) async fn audit(shared: &Shared, caller: &Caller, action: &str, outcome: String) {
    let entry = AuditEntry {
        at_unix_ms: now_ms(),
        who: caller.name.clone(),
        role: caller.role.map(|r| r.to_string()).unwrap_or_else(|| "unauthenticated".into()),
        action: action.to_string(),
        outcome,
        ..Default::default()
    };
    if let Err(e) = shared.store.append_audit(entry).await {
        tracing::error!(error = %e, %action, "cannot write the audit log");
    }
}

/// Refusals written to the audit log singly per caller (name and address) per minute; beyond
/// that they are counted, and the count is written with that caller's next refusal after the
/// minute. A caller hammering the provider with refused calls cannot grow the log without
/// bound, and nothing is hidden: the summary says how many were not written singly.
pub const AUDITED_REFUSALS_PER_MINUTE: u32 = 10;

#[derive(Default)]
pub(crate) struct RefusalLog {
    by_caller: std::sync::Mutex<std::collections::HashMap<String, RefusalWindow>>,
}

struct RefusalWindow {
    start: std::time::Instant,
    written: u32,
    suppressed: u32,
}

impl RefusalLog {
    /// Whether one more refusal by `key` is written: `Some(n)` with the `n` refusals of this
    /// caller not written singly since the last summary, or `None` (counted, not written).
    fn admit(&self, key: &str) -> Option<u32> {
        let mut m = self.by_caller.lock().expect("refusal log");
        if m.len() > 10_000 {
            m.clear(); // bounded memory; at worst a few more entries are written singly
        }
        let now = std::time::Instant::now();
        let w = m.entry(key.to_string()).or_insert(RefusalWindow { start: now, written: 0, suppressed: 0 });
        if now.duration_since(w.start) >= Duration::from_secs(60) {
            let earlier = w.suppressed;
            *w = RefusalWindow { start: now, written: 1, suppressed: 0 };
            return Some(earlier);
        }
        if w.written < AUDITED_REFUSALS_PER_MINUTE {
            w.written += 1;
            Some(0)
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Audits a refusal, within the caller's allowance (see [`RefusalLog`]).
pub(crate) async fn audit_refusal(shared: &Shared, log: &RefusalLog, caller: &Caller, action: &str, reason: &str) {
    let key = format!("{}@{}", caller.name, caller.addr.map(|a| a.ip().to_string()).unwrap_or_default());
    match log.admit(&key) {
        None => {}
        Some(0) => audit(shared, caller, action, format!("refused: {reason}")).await,
        Some(n) => {
            let outcome = format!("refused: {reason} (and {n} earlier refusals of this caller, not written singly)");
            audit(shared, caller, action, outcome).await
        }
    }
}

/// `shared` is the store of the provider that holds it; None on a standby (which checks roles,
/// then forwards with the caller's identity) .
#[derive(Clone)]
pub struct AuthLayer {
    transport: Transport,
    shared: Option<Arc<Shared>>,
    timeout: Duration,
    refusals: Arc<RefusalLog>,
    peers: Arc<Peers>,
}

impl AuthLayer {
    /// `timeout` bounds how long any request but an upload may take to be answered.
    pub fn new(transport: Transport, shared: Option<Arc<Shared>>, timeout: Duration) -> Self {
        Self { transport, shared, timeout, refusals: Default::default(), peers: Default::default() }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            transport: self.transport.clone(),
            shared: self.shared.clone(),
            timeout: self.timeout,
            refusals: self.refusals.clone(),
            peers: self.peers.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    transport: Transport,
    shared: Option<Arc<Shared>>,
    timeout: Duration,
    refusals: Arc<RefusalLog>,
    peers: Arc<Peers>,
}

/// Client-streamed uploads last as long as the package takes to send.
const UNTIMED: [&str; 1] = ["/updraft.v1.Admin/AddUpdate"];

impl<S> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone is not ready; the one that was polled is (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (transport, shared, timeout) = (self.transport.clone(), self.shared.clone(), self.timeout);
        let (refusals, peers) = (self.refusals.clone(), self.peers.clone());
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let Some(access) = access_of(&path) else { return inner.call(req).await };
            let caller = match identify(&transport, &peers, &req, shared.as_deref()) {
                Ok(c) => c,
                // Enrolling is how a host without a certificate gets one.
                Err(_) if access == Access::Enroll => {
                    Caller { name: "enrolling host".into(), addr: remote_addr(&req), ..Default::default() }
                }
                Err(status) => {
                    tracing::warn!(%path, reason = %status.message(), "refused an unidentified caller");
                    if let Some(s) = &shared {
                        let nobody = Caller { name: "unknown".into(), addr: remote_addr(&req), ..Default::default() };
                        audit_refusal(s, &refusals, &nobody, &path, status.message()).await;
                    }
                    return Ok(status.into_http());
                }
            };
            if let Err(status) = authorize(&caller, access, shared.as_deref()) {
                tracing::warn!(%path, caller = %caller.describe(), reason = %status.message(), "refused");
                if let Some(s) = &shared {
                    audit_refusal(s, &refusals, &caller, &path, status.message()).await;
                }
                return Ok(status.into_http());
            }
            // Only a standby's own forwarding may carry these; never a client's.
            req.headers_mut().remove(FORWARDED_NAME);
            req.headers_mut().remove(FORWARDED_ROLE);
            req.headers_mut().remove(FORWARDED_SERIAL);
            if shared.is_none()
                && let Some(role) = caller.role
                && let (Ok(n), Ok(r)) = (caller.name.parse(), role.as_str().parse())
            {
                req.headers_mut().insert(FORWARDED_NAME, n);
                req.headers_mut().insert(FORWARDED_ROLE, r);
                if let Ok(s) = caller.serial.parse() {
                    req.headers_mut().insert(FORWARDED_SERIAL, s);
                }
            }
            req.extensions_mut().insert(caller.clone());
            let resp = if UNTIMED.contains(&path.as_str()) {
                inner.call(req).await?
            } else {
                match tokio::time::timeout(timeout, inner.call(req)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        tracing::warn!(%path, ?timeout, "request timed out");
                        Status::deadline_exceeded(format!("{path} was not answered within {timeout:?}")).into_http()
                    }
                }
            };
            if access == Access::Write
                && let Some(s) = &shared
            {
                // Failures the handler returns travel in the headers (a trailers-only reply).
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(Code::from_i32)
                    .unwrap_or(Code::Ok);
                let outcome = match code {
                    Code::Ok => "ok".to_string(),
                    c => {
                        let msg = resp.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
                        let msg = percent_decode(msg);
                        if c == Code::PermissionDenied { format!("refused: {msg}") } else { format!("failed: {msg}") }
                    }
                };
                audit(s, &caller, &path, outcome).await;
            }
            Ok(resp)
        })
    }
}

/// grpc-message is percent-encoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_written_singly_up_to_the_allowance_then_counted() {
        let log = RefusalLog::default();
        for _ in 0..AUDITED_REFUSALS_PER_MINUTE {
            assert_eq!(log.admit("pc-1@10.0.0.1"), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(log.admit("pc-1@10.0.0.1"), None);
        }
        assert_eq!(log.admit("pc-2@10.0.0.2"), Some(0), "each caller has its own allowance");
        // A minute later, the next refusal carries the count of those not written.
        log.by_caller.lock().unwrap().get_mut("pc-1@10.0.0.1").unwrap().start -= Duration::from_secs(61);
        assert_eq!(log.admit("pc-1@10.0.0.1"), Some(5));
        assert_eq!(log.admit("pc-1@10.0.0.1"), Some(0));
    }

    #[test]
    fn a_connections_identity_is_read_once_and_closed_connections_are_swept() {
        use updraft_runtime::tls::pki;
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), "test CA").unwrap();
        let ca = pki::Ca::load(dir.path()).unwrap();
        let from = time::OffsetDateTime::now_utc();
        let chain = |name: &str| {
            let (pem, _) = ca.issue_pem(Role::Agent, name, &[], from, Duration::from_secs(3600)).unwrap();
            Arc::new(vec![updraft_runtime::tls::pem_der(pem.as_bytes()).unwrap().into()])
        };
        let peers = Peers::default();
        let (a, b) = (chain("pc-1"), chain("pc-2"));
        assert_eq!(peers.of(&a, None).unwrap().0.name, "pc-1");
        assert_eq!(peers.of(&b, None).unwrap().0.name, "pc-2");
        // Found again, by the connection's chain, not by parsing it.
        assert_eq!(peers.of(&a, None).unwrap().0, Peer { name: "pc-1".into(), role: Role::Agent });
        assert_eq!(peers.0.lock().unwrap().by_chain.len(), 2);
        assert!(peers.of(&Arc::new(vec![]), None).is_err(), "no certificate, no identity");
        // Many connections come and go: the map stays within twice the open ones.
        drop(b);
        for _ in 0..3 * Peers::SWEEP_FLOOR {
            let c: Arc<Chain> = Arc::new(vec![a[0].clone()]);
            peers.of(&c, None).unwrap();
        }
        let held = peers.0.lock().unwrap().by_chain.len();
        assert!(held <= 2 * Peers::SWEEP_FLOOR, "{held} entries held for one open connection");
        assert_eq!(peers.of(&a, None).unwrap().0.name, "pc-1", "the open connection's entry survives sweeps");
    }

    #[test]
    fn methods_map_to_access() {
        assert_eq!(access_of("/updraft.v1.AgentApi/Check"), Some(Access::Agent));
        assert_eq!(access_of("/updraft.v1.Replication/FetchBlob"), Some(Access::Site));
        assert_eq!(access_of("/updraft.v1.Admin/ListUpdates"), Some(Access::Read));
        assert_eq!(access_of("/updraft.v1.Admin/GetPair"), Some(Access::Read));
        assert_eq!(access_of("/updraft.v1.Admin/SetUpdateState"), Some(Access::Write));
        assert_eq!(access_of("/updraft.v1.Admin/PutUser"), Some(Access::Write));
        assert_eq!(access_of("/grpc.health.v1.Health/Check"), Some(Access::Infra));
        assert_eq!(access_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Some(Access::Infra));
        assert_eq!(access_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"), None);
        assert_eq!(percent_decode("a%20b%3A"), "a b:");
    }

    #[test]
    fn roles_meet_services() {
        let c = |role| Caller { name: "x".into(), role: Some(role), ..Default::default() };
        assert!(authorize(&c(Role::Agent), Access::Agent, None).is_ok());
        assert!(authorize(&c(Role::Agent), Access::Read, None).is_err());
        assert!(authorize(&c(Role::Agent), Access::Site, None).is_err());
        assert!(authorize(&c(Role::RemoteProvider), Access::Site, None).is_ok());
        assert!(authorize(&c(Role::Admin), Access::Write, None).is_ok());
        assert!(authorize(&c(Role::Admin), Access::Agent, None).is_err());
    }
}
