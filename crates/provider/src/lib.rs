//! The Updraft local provider: the source of truth for the catalog, machines and activity, and
//! the gRPC services that agents, site providers and admins use. The remote provider reuses
//! its store, agent API and replication API with a different [`agent_api::Tier`].
pub mod admin;
pub mod agent_api;
pub mod announce;
pub mod auth;
pub mod blobs;
pub mod catalog;
pub mod ceiling;
pub mod certs;
pub mod chunks;
pub mod commit;
pub mod contacts;
pub mod content;
pub mod db;
pub mod decided;
pub mod duty;
pub mod enrollment;
pub mod error;
pub mod forward;
pub mod health;
pub mod hub;
pub mod import;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod pair;
pub mod policy;
pub mod replication;
pub mod rollouts;
pub mod scanner;
pub mod scrub;
pub mod statement;
pub mod storage;
pub mod store;
pub mod table;
pub mod web;
pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use updraft_core::keys::PublicKey;
use updraft_proto::v1::admin_server::AdminServer;
use updraft_proto::v1::agent_api_server::AgentApiServer;
use updraft_proto::v1::enrollment_server::EnrollmentServer;
use updraft_proto::v1::replication_server::ReplicationServer;
pub use updraft_runtime::Probe;
pub use updraft_runtime::tls::Transport;

use crate::agent_api::{AgentService, LocalTier};
use crate::blobs::BlobStore;
use crate::error::{ProviderError, Result};
use crate::forward::{ActiveLink, Forward};
use crate::hub::Hub;
use crate::pair::{Member, PairDir, Role};
use crate::replication::ReplicationService;
use crate::store::Store;

/// Largest gRPC message accepted, in either direction. Chunks are 256 KiB; the rest is slack.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct Config {
    /// Name reported to agents as `served_by`.
    pub name: String,
    /// Directory holding the sled store (`db/`), the pair directory and, unless `content` says
    /// otherwise, the blobs (`blobs/`).
    pub data_dir: PathBuf,
    /// A PostgreSQL database (`postgres://…`) holding the store instead of sled in `data_dir`:
    /// shared by every provider started on it, all of them active.
    pub database: Option<String>,
    /// The content location, whose `blobs/` holds the packages (default `data_dir`); may be
    /// shared between providers.
    pub content: Option<PathBuf>,
    /// Release keys accepted on import.
    pub trusted_keys: Vec<PublicKey>,
    /// Accept packages no trusted key verifies (recorded as unverified). Off by default.
    pub allow_unverified: bool,
    /// When the content scanner runs, and how long a file must be quiet to be imported.
    pub scan: scanner::ScanConfig,
    pub min_check_secs: u32,
    pub max_check_secs: u32,
    /// How long past its due contact a machine may stay quiet before it is silent (see
    /// [`policy::Silence`]).
    pub silence_grace: Duration,
    pub max_upload_bytes: u64,
    pub max_subscribers: usize,
    /// The URL other members of a switchover pair use to reach this one (default: the
    /// listening address, with the host name for a wildcard address).
    pub advertise: Option<String>,
    /// Mutual TLS (or, when asked for, plaintext) for the server and for calls to peers.
    pub transport: Transport,
    /// Users made admins at start (the provider host's owner bootstrapping the first user, or
    /// recovering access).
    pub bootstrap_admins: Vec<String>,
    /// The key this provider signs catalog statements with (the centre; pair members share
    /// it). Sites have none: they pass on the centre's.
    pub catalog_key: Option<std::sync::Arc<updraft_core::keys::ReleaseKey>>,
    /// How long a signed statement stays valid.
    pub statement_ttl: Duration,
    /// Open connections allowed from one peer address.
    pub max_connections_per_peer: usize,
    /// Longest a request may take to be answered (uploads excepted: they take what they take).
    pub request_timeout: Duration,
    /// Disk space always left free under the store: uploads and fetches that would eat into it
    /// are refused.
    pub disk_reserve_bytes: u64,
    /// Blob streams served to agents at once; more wait their turn (see
    /// [`agent_api::download_slot`]).
    pub max_downloads: usize,
    /// Machines one site may bring in (see `replication::site_may_report`).
    pub max_machines_per_site: usize,
    /// How often every blob is re-hashed (see `scrub`; zero: never).
    pub scrub_interval: Duration,
    /// How long a web console session lasts without a request.
    pub web_idle: Duration,
    /// How long requests in flight may take to finish once a stop is asked for (see [`serve`]).
    pub shutdown_grace: Duration,
    /// The CA this provider signs hosts' certificate requests with (see `certs`); none: it
    /// signs nothing (a site passes requests upstream).
    pub pki: Option<certs::PkiConfig>,
}

impl Config {
    /// Where package blobs live.
    pub fn content_dir(&self) -> PathBuf {
        self.content.as_ref().unwrap_or(&self.data_dir).join("blobs")
    }

    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            data_dir: data_dir.into(),
            database: None,
            content: None,
            trusted_keys: Vec::new(),
            allow_unverified: false,
            scan: scanner::ScanConfig::default(),
            min_check_secs: 30 * 60,
            max_check_secs: 60 * 60,
            silence_grace: Duration::from_secs(5 * 60),
            max_upload_bytes: 16 << 30,
            max_subscribers: 100_000,
            advertise: None,
            transport: Transport::Insecure,
            bootstrap_admins: Vec::new(),
            catalog_key: None,
            statement_ttl: Duration::from_secs(24 * 3600),
            max_connections_per_peer: 256,
            request_timeout: Duration::from_secs(60),
            disk_reserve_bytes: 1 << 30,
            max_downloads: 256,
            max_machines_per_site: 50_000,
            scrub_interval: Duration::from_secs(24 * 3600),
            web_idle: web::DEFAULT_IDLE,
            shutdown_grace: Duration::from_secs(2),
            pki: None,
        }
    }
}

/// What every service of one provider process shares.
pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub blobs: BlobStore,
    pub hub: Hub,
    pub pair: PairDir,
    pub signer: Option<statement::Signer>,
    /// Blobs scrubbed on an agent's word lately (see `scrub::on_report`).
    pub scrubbed: scrub::Recent,
    /// A site's machine trees for the centre's statements (see `statement::SiteProofs`).
    pub site_proofs: std::sync::Mutex<statement::SiteProofs>,
    /// Machines the role ceilings were last computed from (see `ceiling`).
    pub ceiling_sources: ceiling::Sources,
    /// The catalog decoded once per catalog sequence number (see [`Shared::catalog`]).
    snapshot: std::sync::Mutex<Arc<catalog::Snapshot>>,
    /// Download slots: `config.max_downloads` of them.
    pub downloads: Arc<tokio::sync::Semaphore>,
    /// The blob files being sent, each mapped once (see `chunks`).
    pub blob_maps: chunks::BlobMaps,
    /// Downloads each machine holds open (see [`agent_api::DOWNLOADS_PER_MACHINE`]).
    pub machine_downloads: limits::PerKey<String>,
    /// Held while content is fetched from another provider of the database (see `content`).
    pub member_fetches: tokio::sync::Mutex<()>,
    /// Held while an import checks for a duplicate and records its update (see `import`).
    pub imports: tokio::sync::Mutex<()>,
    /// Cancelled when this server stops serving: push streams end at once (see [`serve`]).
    pub stopping: CancellationToken,
    /// Whether the store's database server answers (always, for an embedded store): a provider
    /// cut off from it reports NOT_SERVING and sends agents elsewhere (see `content::member_loop`).
    pub database_ok: tokio::sync::watch::Sender<bool>,
    /// When each client certificate (by serial) last opened a connection here, for
    /// `admin-cli pki list`; in memory, bounded.
    pub cert_uses: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// Woken when a report brings an outcome with an update: the rollouts look (`rollouts`).
    pub rollout_wake: tokio::sync::Notify,
}

impl Shared {
    pub fn open(config: Config) -> Result<Arc<Self>> {
        if config.min_check_secs == 0 || config.min_check_secs > config.max_check_secs {
            return Err(ProviderError::InvalidArgument(format!(
                "check interval: minimum {} s must be positive and not above the maximum {} s",
                config.min_check_secs, config.max_check_secs
            )));
        }
        let store = match &config.database {
            Some(url) => Store::on(db::Db::open_postgres(url)?, "the PostgreSQL database")?,
            None => Store::open(&config.data_dir)?,
        };
        let blobs = BlobStore::open(&config.content_dir())?;
        let pair = PairDir::open(&config.data_dir)?;
        let signer = config.catalog_key.clone().map(|k| statement::Signer::new(k, config.statement_ttl));
        let downloads = Arc::new(tokio::sync::Semaphore::new(config.max_downloads));
        Ok(Arc::new(Self {
            config,
            downloads,
            blob_maps: chunks::BlobMaps::new(agent_api::CHUNK_SIZE),
            machine_downloads: Default::default(),
            imports: Default::default(),
            member_fetches: Default::default(),
            stopping: CancellationToken::new(),
            database_ok: tokio::sync::watch::Sender::new(true),
            cert_uses: Default::default(),
            rollout_wake: Default::default(),
            store,
            blobs,
            hub: Hub::default(),
            pair,
            signer,
            site_proofs: Default::default(),
            scrubbed: Default::default(),
            ceiling_sources: Default::default(),
            snapshot: Default::default(),
        }))
    }
}

impl Shared {
    /// The rule that tells a silent machine, as of now.
    pub fn silence(&self) -> policy::Silence {
        policy::Silence {
            now_ms: now_ms(),
            default_secs: self.config.max_check_secs,
            grace_ms: self.config.silence_grace.as_millis().try_into().unwrap_or(i64::MAX),
        }
    }

    /// Fails while the store's database server cannot be reached (see `database_ok`): the one
    /// refusal that sends agents, sites and admins to another provider of the database.
    pub fn database_reachable(&self) -> Result<()> {
        match *self.database_ok.borrow() {
            true => Ok(()),
            false => Err(ProviderError::NotReady(
                "this provider cannot reach its database; ask another provider of it".into(),
            )),
        }
    }

    /// The catalog sequence number as this process knows it: where changes are announced, the
    /// last one announced, without a store read (a round trip, on a database server); else the
    /// store's.
    pub fn known_seq(&self) -> Result<u64> {
        match self.store.announced_seq() {
            Some(seq) => Ok(seq),
            None => self.store.catalog_seq(),
        }
    }

    /// The current catalog: decoded from the store only when the catalog sequence has moved
    /// since the last call, so a check costs no pass over every update record.
    pub fn catalog(&self) -> Result<Arc<catalog::Snapshot>> {
        let seq = self.known_seq()?;
        let current = self.snapshot.lock().expect("catalog snapshot").clone();
        if current.seq >= seq {
            return Ok(current);
        }
        let fresh = Arc::new(catalog::Snapshot::read(&self.store)?);
        let mut slot = self.snapshot.lock().expect("catalog snapshot");
        if fresh.seq >= slot.seq {
            *slot = fresh.clone();
        }
        Ok(fresh)
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A gRPC server with Updraft's limits, a span and an `rpc.server.duration` per RPC; served
/// by [`serve_on`], which does the TLS.
pub fn grpc_server()
-> tonic::transport::Server<tower_layer::Stack<updraft_runtime::metrics::RpcServerLayer, tower_layer::Identity>> {
    tonic::transport::Server::builder()
        .trace_fn(updraft_runtime::telemetry::server_span)
        .max_concurrent_streams(Some(1024))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(updraft_runtime::metrics::RpcServerLayer::default())
}

/// Serves `router` on the connections `incoming` yields until `signal`: each through the TLS
/// handshake of the process's live credentials (mutual, except that a client without a
/// certificate may enroll; a revoked one's connections close), or in plaintext when the
/// transport is explicitly insecure.
macro_rules! serve_on {
    ($router:expr, $transport:expr, $incoming:expr, $signal:expr) => {{
        let (router, incoming, signal) = ($router, $incoming, $signal);
        match $transport {
            Transport::Tls(t) => {
                router
                    .serve_with_incoming_shutdown(
                        t.accept(incoming, updraft_runtime::tls::ClientAuth::Optional),
                        signal,
                    )
                    .await
            }
            Transport::Insecure => router.serve_with_incoming_shutdown(incoming, signal).await,
        }
    }};
}

fn io(e: std::io::Error) -> ProviderError {
    ProviderError::Io(e.to_string())
}

/// The URL a member of a pair gives the others: the listening address, or the host name when
/// listening on every address.
pub fn advertised_url(config: &Config, addr: std::net::SocketAddr) -> String {
    let scheme = config.transport.scheme();
    config.advertise.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            format!("{scheme}://{}:{}", updraft_runtime::hostname(), addr.port())
        } else {
            format!("{scheme}://{addr}")
        }
    })
}

/// Serves the agent, replication and admin APIs on `listener` until `shutdown` is cancelled.
///
/// When another provider holds the store (the other member of a switchover pair), this one is
/// standby: it forwards every RPC to the active one and takes over the store as soon as its
/// lock is free.
///
/// `probe` learns the process's state: standby (not ready: a load balancer should prefer the
/// active), active (ready), stopping.
///
/// `web`, when given, is where the web console is served: by the active provider, and by a
/// standby passing every request on to the active's.
pub async fn run(
    config: Config,
    listener: TcpListener,
    mut web: Option<TcpListener>,
    probe: Probe,
    shutdown: CancellationToken,
) -> Result<()> {
    // The standby's server and the active's share the socket, so clients never see it close.
    let listener = listener.into_std().map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let url = advertised_url(&config, addr);
    if config.database.is_some() {
        // Every provider on a database server is active: nothing to stand by for.
        let shared = Shared::open(config)?;
        return active(shared, &url, TcpListener::from_std(listener).map_err(io)?, web, probe, shutdown).await;
    }
    let shared = match Shared::open(config.clone()) {
        Ok(s) => s,
        Err(ProviderError::StoreInUse(why)) => {
            tracing::info!(%addr, %why, "standby: another provider holds the store");
            let standby_listener = listener.try_clone().map_err(io)?;
            // The standby's console and the active's share the socket too.
            let web_std = web.map(|w| w.into_std()).transpose().map_err(io)?;
            let standby_web = web_std.as_ref().map(|w| w.try_clone()).transpose().map_err(io)?;
            web = web_std.map(TcpListener::from_std).transpose().map_err(io)?;
            match standby(&config, &url, standby_listener, standby_web, &probe, &shutdown).await? {
                Some(s) => s,
                None => {
                    probe.stopping();
                    return Ok(());
                }
            }
        }
        Err(e) => return Err(e),
    };
    active(shared, &url, TcpListener::from_std(listener).map_err(io)?, web, probe, shutdown).await
}

/// Forwards every RPC to the active member until this one can take the store (returned), or
/// until `shutdown` (None).
async fn standby(
    config: &Config,
    url: &str,
    listener: std::net::TcpListener,
    web: Option<std::net::TcpListener>,
    probe: &Probe,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<Shared>>> {
    let pair = PairDir::open(&config.data_dir)?;
    let link = ActiveLink::new(pair.clone(), config.transport.clone());
    let name = config.name.as_str();
    let stop = shutdown.child_token();
    // A standby forwards: the agent and replication APIs work through it, but it is not the
    // server a load balancer should prefer, nor the one that administers.
    let (health, health_service) = tonic_health::server::health_reporter();
    health::report(
        &health,
        &[(health::SERVER, false), (health::ADMIN, false), (health::AGENT_API, true), (health::REPLICATION, true)],
    )
    .await;
    let router = grpc_server()
        .layer(auth::AuthLayer::new(config.transport.clone(), None, config.request_timeout))
        .add_service(Forward::<AgentApiServer<()>>::new(link.clone(), name))
        .add_service(Forward::<ReplicationServer<()>>::new(link.clone(), name))
        .add_service(Forward::<AdminServer<()>>::new(link.clone(), name))
        .add_service(Forward::<EnrollmentServer<()>>::new(link.clone(), name))
        .add_service(health_service)
        .add_service(health::reflection()?);
    let incoming = limits::incoming(TcpListener::from_std(listener).map_err(io)?, config.max_connections_per_peer);
    let (transport, signal) = (config.transport.clone(), stop.clone().cancelled_owned());
    let server = async move { serve_on!(router, &transport, incoming, signal) };
    tokio::spawn(
        async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "standby server failed");
            }
        }
        .instrument(updraft_runtime::telemetry::task("standby_forwarder", "")),
    );
    if let Some(web) = web {
        let tls = web::tls_config(&config.transport, &config.name)?;
        let web = TcpListener::from_std(web).map_err(io)?;
        tokio::spawn(
            web::serve(web, tls.server, web::standby::router(pair.clone()), stop.clone())
                .instrument(updraft_runtime::telemetry::task("standby_console", "")),
        );
    }
    if let Transport::Tls(tls) = &config.transport {
        // The standby's own certificate is renewed at the active, over the link it forwards on.
        let sans = updraft_runtime::tls::pki::CertInfo::of_pem(tls.current().identity_pem().0)
            .map(|i| i.sans)
            .unwrap_or_default();
        let link = link.clone();
        let connect =
            move || std::future::ready(link.channel().ok_or_else(|| "no active provider known yet".to_string()));
        tokio::spawn(
            updraft_runtime::enroll::renew_loop(tls.clone(), sans, vec![], connect, stop.clone())
                .instrument(updraft_runtime::telemetry::task("certificate_renewal", "")),
        );
    }
    probe.started(false, "standby: forwarding to the active member");
    let me = Member::new(name, url, Role::Standby, 0);
    let mut last_beat = std::time::Instant::now() - pair::HEARTBEAT;
    let span = updraft_runtime::telemetry::task("standby_watch", "");
    loop {
        link.refresh();
        if last_beat.elapsed() >= pair::HEARTBEAT {
            pair.heartbeat(&me);
            last_beat = std::time::Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(pair::TAKEOVER_POLL) => {}
        }
        match Shared::open(config.clone()) {
            Ok(s) => {
                span.in_scope(|| tracing::info!("the store is free: taking over"));
                stop.cancel();
                return Ok(Some(s));
            }
            Err(ProviderError::StoreInUse(_)) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Serves from the store this process holds, after raising the fencing epoch.
async fn active(
    shared: Arc<Shared>,
    url: &str,
    listener: TcpListener,
    web: Option<TcpListener>,
    probe: Probe,
    shutdown: CancellationToken,
) -> Result<()> {
    let on_database = shared.store.is_shared();
    // A pair on one embedded store has one active at a time, fenced by epoch; providers on a
    // database server are all active, and the database keeps their writes apart.
    let epoch = if on_database { 0 } else { shared.pair.take_over(&shared.config.name, url)? };
    for name in &shared.config.bootstrap_admins {
        let u = updraft_proto::v1::User { name: name.clone(), role: "admin".into() };
        if shared.store.get_user(name)?.as_ref() != Some(&u) {
            shared.store.put_user(&u).await?;
            tracing::warn!(user = %name, "made an admin by --bootstrap-admin");
        }
    }
    let fence = shared.pair.fence(epoch);
    if !on_database {
        shared.store.set_fence(fence.clone());
    }
    let hub = shared.hub.clone();
    shared.store.announce_to(move |change| hub.publish(change))?;
    if shared.config.pki.is_some() {
        // The trust record every tier enforces, current before anyone connects.
        certs::refresh_trust(&shared).await?;
    }
    let tier = Arc::new(LocalTier { shared: shared.clone() });
    let addr = listener.local_addr().map_err(io)?;
    let fenced = shutdown.child_token();
    let scan = shared.config.scan;
    let first = std::sync::atomic::AtomicBool::new(true);
    tokio::spawn(
        duty::hold_while(shared.clone(), "content-scanner", shutdown.clone(), {
            let shared = shared.clone();
            move |stop| {
                // The start delay is for the provider's start, not for a duty taken over.
                let delay = if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    scan.start_delay
                } else {
                    Duration::ZERO
                };
                scanner::scan_loop(shared.clone(), scanner::ScanConfig { start_delay: delay, ..scan }, stop)
            }
        })
        .instrument(updraft_runtime::telemetry::task("content_scanner", "")),
    );
    tokio::spawn(
        duty::hold_while(shared.clone(), "rollouts", shutdown.clone(), {
            let shared = shared.clone();
            move |stop| rollouts::rollout_loop(shared.clone(), stop)
        })
        .instrument(updraft_runtime::telemetry::task("rollouts", "")),
    );
    if on_database {
        tokio::spawn(
            announce_loop(shared.clone(), fenced.clone())
                .instrument(updraft_runtime::telemetry::task("catalog_changes", "")),
        );
        tokio::spawn(
            content::member_loop(shared.clone(), url.to_string(), fenced.clone())
                .instrument(updraft_runtime::telemetry::task("database_member", "")),
        );
    }
    tokio::spawn(
        scrub::scrub_loop(shared.clone(), shared.config.scrub_interval, fenced.clone())
            .instrument(updraft_runtime::telemetry::task("blob_scrub", "")),
    );
    if shared.config.pki.is_some() {
        tokio::spawn(
            certs::trust_loop(shared.clone(), fenced.clone())
                .instrument(updraft_runtime::telemetry::task("certificates", "")),
        );
    }
    tokio::spawn(
        statement::statement_loop(shared.clone(), fenced.clone())
            .instrument(updraft_runtime::telemetry::task("catalog_statement", "")),
    );
    tokio::spawn(
        announce::announce_loop(shared.clone(), "local", String::new(), addr, fenced.clone())
            .instrument(updraft_runtime::telemetry::task("mdns_announce", "")),
    );
    if !on_database {
        tokio::spawn(
            heartbeat_loop(shared.clone(), Member::new(&shared.config.name, url, Role::Active, epoch), fenced.clone())
                .instrument(updraft_runtime::telemetry::task("pair_heartbeat", format!("epoch {epoch}"))),
        );
    }
    let ops = Arc::new(ops::Ops::new(shared.clone(), shared.config.scan));
    metrics::register(&shared, &ops, epoch);
    if let Some(web) = web {
        let tls = web::tls_config(&shared.config.transport, &shared.config.name)?;
        let at = web.local_addr().map_err(io)?;
        let console = Arc::new(web::Console::new(ops.clone(), shared.config.web_idle, at));
        if !on_database {
            let record = pair::ConsoleRecord {
                address: at,
                cert_pem: tls.cert_pem,
                forward_key: console.forward_key.clone(),
                epoch,
            };
            shared.pair.publish_console(&record)?;
            if let Transport::Tls(tls) = &shared.config.transport {
                // The standby trusts exactly the published certificate: publish the new one
                // whenever ours is renewed or replaced.
                tokio::spawn(
                    republish_console(shared.pair.clone(), record, tls.clone(), fenced.clone())
                        .instrument(updraft_runtime::telemetry::task("console_record", "")),
                );
            }
        }
        tokio::spawn(
            web::serve(web, tls.server, web::router(console), fenced.clone())
                .instrument(updraft_runtime::telemetry::task("web_console", "")),
        );
        tracing::info!(address = %at, "web console served");
    }
    tracing::info!(%addr, %url, epoch, data_dir = %shared.config.data_dir.display(), seq = shared.store.catalog_seq()?, "provider listening (active)");
    probe.started(
        true,
        if on_database { "active (shared database)".to_string() } else { format!("active (epoch {epoch})") },
    );
    serve(shared.clone(), tier, true, listener, &probe, fenced.cancelled()).await?;
    if !shutdown.is_cancelled()
        && let Err(e) = fence.check()
    {
        // Dropping the store would flush writes the fence refused to acknowledge; never drop it.
        std::mem::forget(shared);
        return Err(e);
    }
    Ok(())
}

/// How often a provider on a database server looks for catalog changes other providers made.
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);

/// Announces the changes other providers on the same database commit, within
/// [`ANNOUNCE_EVERY`] (this provider's own are announced as they commit).
async fn announce_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ANNOUNCE_EVERY) => {}
        }
        let store = shared.store.clone();
        match tokio::task::spawn_blocking(move || store.announce_new()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the catalog's changes"),
            Err(e) => tracing::warn!(error = %e, "reading the catalog's changes failed"),
        }
    }
}

/// Serves the agent and replication APIs (and, on a local provider, the admin API) from
/// `shared` on `listener`, behind the auth layer and the connection limits, until `stop`. The
/// one server set-up of every tier that holds a store.
///
/// Stopping is bounded: when `stop` fires, the listener closes, every push stream ends at once
/// with UNAVAILABLE (agents reconnect to their next provider), and requests in flight get
/// `config.shutdown_grace` to finish; whatever is still open then is dropped. The caller then
/// drops its store, which a standby is waiting to open.
pub async fn serve<T: agent_api::Tier>(
    shared: Arc<Shared>,
    tier: Arc<T>,
    with_admin: bool,
    listener: TcpListener,
    probe: &Probe,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let admin = with_admin.then(|| {
        AdminServer::new(admin::AdminService::new(Arc::new(ops::Ops::new(shared.clone(), shared.config.scan))))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    });
    let enrollment = EnrollmentServer::new(enrollment::EnrollmentService::new(tier.clone()));
    let limit = shared.config.max_connections_per_peer;
    let (stopping, grace) = (shared.stopping.clone(), shared.config.shutdown_grace);
    let mut services = vec![health::SERVER, health::AGENT_API, health::REPLICATION];
    if with_admin {
        services.push(health::ADMIN);
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health::report(&health, &services.iter().map(|s| (*s, true)).collect::<Vec<_>>()).await;
    // Serving while the store answers; NOT_SERVING while its database server cannot be reached.
    tokio::spawn({
        let (health, services, stopping, probe) = (health.clone(), services.clone(), stopping.clone(), probe.clone());
        let mut reachable = shared.database_ok.subscribe();
        async move {
            loop {
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    changed = reachable.changed() => if changed.is_err() { return },
                }
                let ok = *reachable.borrow_and_update();
                health::report(&health, &services.iter().map(|s| (*s, ok)).collect::<Vec<_>>()).await;
                probe.set(ok, if ok { "active (shared database)" } else { "cut off from the database" });
            }
        }
    });
    let signal = {
        let (stopping, probe) = (stopping.clone(), probe.clone());
        async move {
            stop.await;
            probe.stopping();
            tracing::info!(grace = ?grace, "stopping: push streams ended, requests in flight finishing");
            health::report(&health, &services.iter().map(|s| (*s, false)).collect::<Vec<_>>()).await;
            stopping.cancel();
        }
    };
    let transport = shared.config.transport.clone();
    let router = grpc_server()
        .layer(auth::AuthLayer::new(
            shared.config.transport.clone(),
            Some(shared.clone()),
            shared.config.request_timeout,
        ))
        .add_service(wire::BlobRoute::new(
            AgentApiServer::new(AgentService::new(shared.clone(), tier.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            shared.clone(),
            tier.clone(),
        ))
        .add_service(wire::BlobRoute::new(
            ReplicationServer::new(ReplicationService::new(shared.clone(), tier.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            shared,
            tier,
        ))
        .add_optional_service(admin)
        .add_service(enrollment)
        .add_service(health_service)
        .add_service(health::reflection()?);
    let server = async move { serve_on!(router, &transport, limits::incoming(listener, limit), signal) };
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.map_err(|e| ProviderError::Io(format!("server: {e}"))),
        _ = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "requests still open after the shutdown grace: dropped");
            Ok(())
        }
    }
}

/// Publishes the console record again with the certificate in use whenever it changes.
async fn republish_console(
    pair: PairDir,
    mut record: pair::ConsoleRecord,
    tls: Arc<updraft_runtime::tls::Tls>,
    stop: CancellationToken,
) {
    let mut seen = tls.generation();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pair::HEARTBEAT) => {}
        }
        if tls.generation() == seen {
            continue;
        }
        seen = tls.generation();
        record.cert_pem = String::from_utf8_lossy(tls.current().identity_pem().0).into_owned();
        if let Err(e) = pair.publish_console(&record) {
            tracing::warn!(error = %e, "cannot publish the console's new certificate; the standby's console may refuse it");
        }
    }
}

/// The active member's heartbeat, and its watch on the fence: once another provider has
/// taken over, stop serving (cancel `fenced`) so nothing more is acknowledged. Only a newer
/// epoch read from the store means that; an error reading it (no file descriptor left, a
/// transient I/O error) is logged and the fence read again at the next beat — meanwhile every
/// commit still checks the fence and refuses to acknowledge what it cannot vouch for.
async fn heartbeat_loop(shared: Arc<Shared>, me: Member, fenced: CancellationToken) {
    let fence = shared.pair.fence(me.epoch);
    loop {
        match fence.check() {
            Ok(()) => {}
            Err(e @ ProviderError::Fenced { .. }) => {
                tracing::error!(error = %e, "stepping down");
                fenced.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the fence; still active, reading it again shortly"),
        }
        shared.pair.heartbeat(&me);
        tokio::select! {
            _ = fenced.cancelled() => return,
            _ = tokio::time::sleep(pair::HEARTBEAT) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use updraft_proto::v1::{ProductLineCap, Update};

    use super::*;

    #[tokio::test]
    async fn the_catalog_snapshot_follows_every_change_and_only_then_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(Config::new("t", dir.path().to_path_buf())).unwrap();
        let empty = shared.catalog().unwrap();
        assert!(empty.updates.is_empty());
        assert!(Arc::ptr_eq(&empty, &shared.catalog().unwrap()), "no change, no rebuild");
        let u = Update { id: "u".into(), version: "1.0.0.0".into(), state: 2, ..Default::default() };
        shared.store.change_update("u", Some(u), |_| Ok(())).await.unwrap();
        let one = shared.catalog().unwrap();
        assert_eq!((one.updates.len(), one.items.len()), (1, 1));
        let cap = ProductLineCap { product_line: "l".into(), version: "1.0.0.0".into(), ..Default::default() };
        shared.store.set_cap(&cap).await.unwrap();
        assert_eq!(shared.catalog().unwrap().caps, vec![cap]);
        assert!(Arc::ptr_eq(&shared.catalog().unwrap(), &shared.catalog().unwrap()));
    }
}
