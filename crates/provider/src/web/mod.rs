//! The provider's web console: server-rendered pages over HTTPS for the authorized users,
//! signed in with a password (`admin-cli user passwd`). It is a second adapter on the admin
//! operations (`ops`), beside the gRPC Admin service: every page reads through them and every
//! form changes through them, passing the same access check (`ops::check_user`, per request,
//! so a removed user loses access at once) and landing in the same audit log with the web
//! user's name.
//!
//! - `session`: sessions (cookie tokens, CSRF tokens, idle timeout) and sign-in throttling;
//! - `layout`: the page shell and shared pieces;
//! - `pages`: one function per page (GET);
//! - `actions`: one function per form (POST), each checked for its CSRF token first;
//! - `standby`: a standby's console, which passes every request to the active's.
//!
//! Served by [`serve`] on its own listener with the provider's certificate (a self-signed one
//! on an `--insecure` provider), bounded in connections overall and per address.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use updraft_runtime::tls::{Role, Transport};

use crate::auth::{Caller, RefusalLog, audit, audit_refusal};
use crate::error::{ProviderError, Result};
use crate::ops::{Access, Op, Ops, check_user};

pub mod actions;
pub mod layout;
pub mod pages;
pub mod session;
pub mod standby;

use session::{COOKIE, Session, Sessions, SignInLimiter};

/// Connections served at once, in all and per client address.
pub const MAX_CONNECTIONS: usize = 512;
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// Default idle time after which a session ends.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30 * 60);

/// What the console's handlers share.
pub struct Console {
    pub ops: Arc<Ops>,
    pub sessions: Sessions,
    limiter: SignInLimiter,
    refusals: RefusalLog,
    /// Each user's last report range (the report opens on it next time).
    ranges: Mutex<HashMap<String, String>>,
    started: std::time::Instant,
    /// Where the console itself listens (for the About page).
    pub address: SocketAddr,
    /// Shown by a standby passing on a browser's request, so its address is believed.
    pub forward_key: String,
    /// Users with a package upload in progress (one each, [`MAX_UPLOADS`] in all).
    uploading: Mutex<std::collections::HashSet<String>>,
}

impl Console {
    pub fn new(ops: Arc<Ops>, idle: Duration, address: SocketAddr) -> Self {
        Self {
            ops,
            sessions: Sessions::new(idle),
            limiter: SignInLimiter::default(),
            refusals: RefusalLog::default(),
            ranges: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            address,
            forward_key: session::token(),
            uploading: Mutex::default(),
        }
    }

    /// The report range `user` asked for now (remembered), or the one they chose last.
    pub fn remembered_range(&self, user: &str, asked: Option<&str>) -> String {
        let mut m = self.ranges.lock().expect("report ranges");
        match asked {
            Some(r) if r.len() <= 16 => {
                if m.len() >= session::TOTAL {
                    m.clear();
                }
                m.insert(user.to_string(), r.to_string());
                r.to_string()
            }
            _ => m.get(user).cloned().unwrap_or_else(|| "2w".into()),
        }
    }

    /// A slot for one package upload by `user`: one at a time per user, [`MAX_UPLOADS`] in all.
    pub fn upload_slot(self: &Arc<Self>, user: &str) -> Result<UploadSlot> {
        let mut up = self.uploading.lock().expect("uploads");
        if up.contains(user) {
            return Err(ProviderError::LimitReached(format!("{user} is already uploading a package; wait for it")));
        }
        if up.len() >= MAX_UPLOADS {
            return Err(ProviderError::LimitReached(format!(
                "{MAX_UPLOADS} packages are being uploaded through the console; try again shortly"
            )));
        }
        up.insert(user.to_string());
        Ok(UploadSlot(self.clone(), user.to_string()))
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs a change for the signed-in user: refused (and the refusal audited, within the
    /// caller's allowance) unless their role allows `op`; otherwise run, and its outcome
    /// audited under `op`'s action, exactly as the gRPC service does.
    pub async fn change<T>(&self, s: &Signed, op: Op, run: impl AsyncFnOnce(&Ops, String) -> Result<T>) -> Result<T> {
        let caller = s.caller();
        let shared = self.ops.shared();
        if let Err(e) = check_user(shared, &s.session.user, op.access()) {
            audit_refusal(shared, &self.refusals, &caller, &op.action(), &e.to_string()).await;
            return Err(e);
        }
        let result = run(&self.ops, caller.describe()).await;
        if op.access() == Access::Write {
            let outcome = match &result {
                Ok(_) => "ok".to_string(),
                Err(e @ ProviderError::Denied(_)) => format!("refused: {e}"),
                Err(e) => format!("failed: {e}"),
            };
            audit(shared, &caller, &op.action(), outcome).await;
        }
        result
    }
}

/// Package uploads through the console at once, in all.
pub const MAX_UPLOADS: usize = 4;

/// An upload in progress; its user may start another once this is dropped.
pub struct UploadSlot(Arc<Console>, String);

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.0.uploading.lock().expect("uploads").remove(&self.1);
    }
}

/// The remote address of the connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// A request from a signed-in user who may read (every page needs that much).
pub struct Signed {
    pub session: Session,
    pub addr: Option<SocketAddr>,
}

impl Signed {
    /// The caller as the audit log and the operations name it.
    pub fn caller(&self) -> Caller {
        Caller {
            name: self.session.user.clone(),
            role: Some(Role::Admin),
            via: Some("the web console".into()),
            addr: self.addr,
            serial: String::new(),
        }
    }

    pub fn user(&self) -> &str {
        &self.session.user
    }

    pub fn csrf(&self) -> &str {
        &self.session.csrf
    }

    /// Refuses a form that does not carry this session's CSRF token.
    fn check_csrf(&self, form: &Fields) -> Result<()> {
        self.check_csrf_token(form.get("csrf"))
    }

    /// Refuses a request whose CSRF token (a form field, or the upload's header) is not this
    /// session's.
    pub fn check_csrf_token(&self, token: Option<&str>) -> Result<()> {
        match token {
            Some(t) if session::same(t, &self.session.csrf) => Ok(()),
            _ => Err(ProviderError::Denied(
                "the form did not carry this session's CSRF token; reload the page and try again".into(),
            )),
        }
    }
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Why a request did not get its page: not signed in (to the sign-in form) or not allowed.
pub enum Refusal {
    SignIn,
    Error(ProviderError),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::SignIn => Redirect::to("/login").into_response(),
            Refusal::Error(e) => error_page(&e),
        }
    }
}

impl From<ProviderError> for Refusal {
    fn from(e: ProviderError) -> Self {
        Refusal::Error(e)
    }
}

impl FromRequestParts<Arc<Console>> for Signed {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, console: &Arc<Console>) -> std::result::Result<Self, Refusal> {
        let token = cookie_token(&parts.headers).ok_or(Refusal::SignIn)?;
        let session = console.sessions.get(&token).ok_or(Refusal::SignIn)?;
        // Asked of the store on every request: a user removed since signing in is out.
        if let Err(e) = check_user(console.ops.shared(), &session.user, Access::Read) {
            if matches!(e, ProviderError::Denied(_)) {
                console.sessions.end(&token);
            }
            return Err(e.into());
        }
        let addr = parts.extensions.get::<ClientAddr>().map(|a| a.0);
        Ok(Signed { session, addr })
    }
}

/// A form posted by a signed-in user, its CSRF token already checked: a handler that takes
/// this cannot act on a forged form, and reads no field before the check.
pub struct Posted {
    pub signed: Signed,
    pub fields: Fields,
}

impl axum::extract::FromRequest<Arc<Console>> for Posted {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, console: &Arc<Console>) -> std::result::Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let signed = Signed::from_request_parts(&mut parts, console).await.map_err(IntoResponse::into_response)?;
        let req = axum::extract::Request::from_parts(parts, body);
        let Form(fields) =
            Form::<Vec<(String, String)>>::from_request(req, console).await.map_err(IntoResponse::into_response)?;
        let fields = Fields(fields);
        signed.check_csrf(&fields).map_err(|e| error_page(&e))?;
        Ok(Posted { signed, fields })
    }
}

/// A posted form's fields, in order (a name may repeat: the update ids of a multi-select).
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A comma-separated field as its items, trimmed, empty ones dropped.
    pub fn list(&self, name: &str) -> Vec<String> {
        let items = self.get(name).unwrap_or_default().split(',').map(str::trim);
        items.filter(|p| !p.is_empty()).map(String::from).collect()
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }

    /// A field that must be there.
    pub fn need(&self, name: &str) -> Result<&str> {
        self.get(name).ok_or_else(|| ProviderError::InvalidArgument(format!("the form lacks its {name:?} field")))
    }
}

fn error_page(e: &ProviderError) -> Response {
    let body = maud::html! {
        (maud::DOCTYPE)
        html { head { title { "Updraft console" } } body style="font-family:system-ui;margin:2rem" {
            h1 { (e.http_status().canonical_reason().unwrap_or("Error")) }
            p { (e.to_string()) }
            p { a href="/about" { "Back to the console" } }
        } }
    };
    (e.http_status(), Html(body.into_string())).into_response()
}

/// Where a change returns: the page it came from, with its outcome to show.
pub fn back(to: &str, outcome: Result<String>) -> Response {
    let (key, msg) = match outcome {
        Ok(m) => ("ok", m),
        Err(e @ ProviderError::Denied(_)) => return error_page(&e),
        Err(e) => ("err", e.to_string()),
    };
    let sep = if to.contains('?') { '&' } else { '?' };
    let msg: String = msg.chars().take(500).collect();
    Redirect::to(&format!("{to}{sep}{key}={}", encode(&msg))).into_response()
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string's fields.
pub type Query = axum::extract::Query<HashMap<String, String>>;

async fn login_form() -> Html<String> {
    Html(layout::login(None).into_string())
}

async fn login(
    State(console): State<Arc<Console>>,
    axum::Extension(ClientAddr(addr)): axum::Extension<ClientAddr>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let form = Fields(form);
    let (user, password) = (form.get("user").unwrap_or_default().trim(), form.get("password").unwrap_or_default());
    let refuse = |status: StatusCode, msg: &str| (status, Html(layout::login(Some(msg)).into_string())).into_response();
    if user.is_empty() || user.len() > 64 {
        return refuse(StatusCode::BAD_REQUEST, "Give your user name and password.");
    }
    if let Some(wait) = console.limiter.blocked(user, Some(addr.ip())) {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("Too many failed sign-ins; try again in {} minutes.", wait.as_secs().div_ceil(60)),
        );
    }
    let shared = console.ops.shared();
    let ok = match console.ops.check_password(user, password).await {
        Ok(ok) => ok,
        Err(e) => return error_page(&e),
    };
    let caller = Caller {
        name: user.to_string(),
        role: Some(Role::Admin),
        via: Some("the web console".into()),
        addr: Some(addr),
        serial: String::new(),
    };
    if !ok {
        console.limiter.failed(user, Some(addr.ip()));
        audit_refusal(shared, &console.refusals, &caller, "web sign-in", "wrong user name or password").await;
        return refuse(StatusCode::UNAUTHORIZED, "Wrong user name or password.");
    }
    if let Err(e) = check_user(shared, user, Access::Read) {
        return refuse(StatusCode::FORBIDDEN, &e.to_string());
    }
    console.limiter.succeeded(user);
    audit(shared, &caller, "web sign-in", "ok".into()).await;
    let token = console.sessions.start(user);
    let mut resp = Redirect::to("/about").into_response();
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        console.sessions.idle().as_secs()
    );
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("a plain cookie"));
    resp
}

async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap, _checked: Posted) -> Response {
    if let Some(t) = cookie_token(&headers) {
        console.sessions.end(&t);
    }
    let mut resp = Redirect::to("/login").into_response();
    let gone = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&gone).expect("a plain cookie"));
    resp
}

/// Every route of the console.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/about") }))
        .route("/login", get(login_form).post(login))
        .route("/console.js", get(script))
        .route("/logout", post(logout))
        .route("/about", get(pages::about))
        .route("/activity", get(pages::activity))
        .route("/report", get(pages::report))
        .route("/machines", get(pages::machines))
        .route("/machines/{name}", get(pages::machine))
        .route("/groups", get(pages::groups))
        .route("/updates", get(pages::updates))
        .route("/configuration", get(pages::configuration))
        .route("/sites", get(pages::sites))
        .route("/rollouts", get(pages::rollouts))
        .route("/rollouts/resume", post(actions::rollout_resume))
        .route("/rollouts/revert", post(actions::rollout_revert))
        .route("/updates/state", post(actions::update_state))
        .route("/updates/priority", post(actions::update_priority))
        .route("/groups/create", post(actions::group_create))
        .route("/groups/assign", post(actions::group_assign))
        .route("/machines/{name}/pin", post(actions::machine_pin))
        .route("/activity/clear", post(actions::activity_clear))
        .route("/updates/delete", post(actions::update_delete))
        .route("/updates/prestage", post(actions::update_prestage))
        .route("/groups/edit", post(actions::group_edit))
        .route("/groups/deploy", post(actions::deploy))
        .route("/configuration/users", post(actions::user_put))
        .route("/configuration/users/remove", post(actions::user_remove))
        .route("/configuration/certificates/revoke", post(actions::certificate_revoke))
        .route("/configuration/certificates/approve", post(actions::certificate_approve))
        .route("/configuration/users/password", post(actions::user_password))
        .route("/configuration/discovery", post(actions::discovery))
        .route("/configuration/providers", post(actions::peer_put))
        .route("/configuration/providers/remove", post(actions::peer_remove))
        .route("/configuration/watches", post(actions::watch_add))
        .route("/configuration/watches/remove", post(actions::watch_remove))
        .route("/updates/upload", post(actions::upload))
        .route("/updates/related", post(actions::update_related))
        .route("/updates/caps", post(actions::cap_put))
        .route("/machines/{name}/role", post(actions::machine_role))
        .route("/groups/remove", post(actions::group_remove))
        .layer(axum::middleware::map_response(secure_headers))
        .layer(axum::middleware::from_fn_with_state(console.clone(), forwarded_client))
        .with_state(console)
}

/// A request a standby passed on carries the browser's address under the forwarding key: the
/// browser's address is then the client's. Without the key, both headers are dropped.
async fn forwarded_client(
    State(console): State<Arc<Console>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let h = req.headers_mut();
    let key = h.remove(standby::KEY_HEADER);
    let client = h.remove(standby::CLIENT_HEADER);
    if let (Some(key), Some(client)) = (key, client)
        && key.to_str().is_ok_and(|k| session::same(k, &console.forward_key))
        && let Some(addr) = client.to_str().ok().and_then(|c| c.parse::<SocketAddr>().ok())
    {
        req.extensions_mut().insert(ClientAddr(addr));
    }
    next.run(req).await
}

/// The console's one script: the package upload with a progress bar (every other page works
/// without script).
async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("console.js")).into_response()
}

/// Headers every answer carries: no framing, no sniffing, no caching of pages with fleet data.
async fn secure_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    resp
}

/// The console's TLS settings, and the certificate it presents (PEM).
pub struct ConsoleTls {
    pub server: Arc<rustls::ServerConfig>,
    pub cert_pem: String,
}

/// The console's TLS settings: the provider's own certificate as it is at each handshake (no
/// client certificate asked for: users sign in with a password), or a self-signed one on an
/// `--insecure` provider. `cert_pem` is the one presented now.
pub fn tls_config(transport: &Transport, name: &str) -> Result<ConsoleTls> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: String| ProviderError::InvalidArgument(format!("web console certificate: {e}"));
    let (mut config, cert_pem) = match transport {
        Transport::Tls(t) => {
            let cert = String::from_utf8_lossy(t.current().identity_pem().0).into_owned();
            (t.server_config(updraft_runtime::tls::ClientAuth::None), cert)
        }
        Transport::Insecure => {
            let (c, k) = updraft_runtime::tls::self_signed(&[name.to_string(), "localhost".into(), "127.0.0.1".into()])
                .map_err(|e| bad(e.to_string()))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(c.as_bytes())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(k.as_bytes()).map_err(|e| bad(e.to_string()))?;
            let config =
                rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| bad(e.to_string()))?
                    .with_no_client_auth()
                    .with_single_cert(certs, key)
                    .map_err(|e| bad(e.to_string()))?;
            (config, c)
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ConsoleTls { server: Arc::new(config), cert_pem })
}

/// Connections open per client address.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

struct AddressSlot(Arc<PerAddress>, IpAddr);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.0.0.lock().expect("connection counts");
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut m = self.0.lock().expect("connection counts");
        let n = m.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }
}

/// Serves `app` (the console's [`router`], or a standby's [`standby::router`]) on `listener`
/// until `stop`.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router, stop: CancellationToken) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(PerAddress::default());
    loop {
        let (tcp, addr) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "web console: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (Ok(slot), Some(mine)) = (slots.clone().try_acquire_owned(), per_address.take(addr.ip())) else {
            tracing::warn!(%addr, "web console: connection limit reached; connection closed");
            continue;
        };
        let (acceptor, app, stop) = (acceptor.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            let _held = (slot, mine);
            let tls = match tokio::time::timeout(updraft_runtime::tls::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                _ => return,
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ClientAddr(addr));
                let app = app.clone();
                async move { tower::ServiceExt::oneshot(app, req).await }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
