//! The site tier: where a missing blob comes from (the upstream, once), where reports go (the
//! outbox, then upstream), and the two background tasks that follow the catalog and drain the
//! outbox.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, Notify};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use updraft_core::plan::Action;
use updraft_proto::v1::enrollment_client::EnrollmentClient;
use updraft_proto::v1::replication_client::ReplicationClient;
use updraft_proto::v1::{BlobRequest, FollowRequest, ForwardRequest, ForwardedReport, MachineInfo, SiteStats};
use updraft_proto::v1::{CertificateReply, EnrollRequest, RenewRequest};
use updraft_provider::agent_api::Tier;
use updraft_provider::auth::Caller;
use updraft_provider::error::{ProviderError, Result};
use updraft_provider::store::Change;
use updraft_provider::{Shared, policy};
use updraft_runtime::TracedChannel;

/// Reports sent upstream in one batch at most, and their size: well within what the upstream
/// accepts (4 MiB messages, ten reports' worth of entries), and any one report fits.
pub const BATCH: usize = 200;
const BATCH_BYTES: usize = 2 << 20;
const BATCH_ENTRIES: usize = updraft_provider::agent_api::MAX_REPORT_ENTRIES * 10 - 1;
/// Attempts at one blob fetch (each resumes where the last stopped).
const FETCH_ATTEMPTS: u32 = 5;

pub struct SiteTier {
    shared: Arc<Shared>,
    /// The channel to the upstream, and the credentials generation it was built with: rebuilt
    /// after this site's certificate or trust changed (see [`SiteTier::channel`]).
    channel: std::sync::Mutex<(u64, TracedChannel)>,
    upstreams: Vec<String>,
    /// One lock per blob being fetched: concurrent requests wait for the single transfer.
    inflight: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    outbox_ready: Notify,
    upstream_url: String,
    /// Bytes fetched from upstream (WAN bytes) since start.
    pub wan_bytes: AtomicU64,
    served_bytes: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    upstream_connected: AtomicBool,
    upstream_since_ms: AtomicI64,
    /// Set once the catalog stream has caught up with the upstream.
    synced: AtomicBool,
    /// Ready for traffic once synchronised with the upstream; it stays so while working alone.
    probe: updraft_runtime::Probe,
    /// Signalled on a catalog change: the prefetch loop works out again what this site's
    /// machines need (a pass over all of them).
    needs_changed: Notify,
    /// Content a check was just offered that is not here yet: fetched without a full pass.
    to_fetch: std::sync::Mutex<BTreeSet<String>>,
    fetch_ready: Notify,
    prefetch_passes: AtomicU64,
    prefetch_failed: AtomicU64,
}

/// A channel to the upstream(s) with the credentials in use now.
fn connect_upstream(transport: &updraft_runtime::tls::Transport, upstreams: &[String]) -> Result<TracedChannel> {
    let mut endpoints = Vec::new();
    for u in upstreams {
        endpoints.push(
            transport
                .endpoint(u)
                .map_err(|e| ProviderError::InvalidArgument(format!("upstream: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10)),
        );
    }
    // A lazy channel reconnects by itself when the upstream comes back; a balanced one
    // sends each request to a member that is up.
    Ok(match endpoints.len() {
        1 => updraft_runtime::traced(endpoints.remove(0).connect_lazy()).with_server(&upstreams[0]),
        _ => updraft_runtime::traced(tonic::transport::Channel::balance_list(endpoints.into_iter())),
    })
}

impl SiteTier {
    /// The channel to the upstream: the one built with the credentials in use, or a new one
    /// once they changed (a renewed certificate, a new CA bundle), so a reconnection never
    /// presents a certificate that has been replaced.
    pub fn channel(&self) -> TracedChannel {
        let transport = &self.shared.config.transport;
        let mut slot = self.channel.lock().expect("upstream channel");
        let now = transport.generation();
        if slot.0 != now {
            match connect_upstream(transport, &self.upstreams) {
                Ok(ch) => *slot = (now, ch),
                Err(e) => tracing::error!(error = %e, "cannot rebuild the upstream channel; the previous stays"),
            }
        }
        slot.1.clone()
    }

    fn upstream(&self) -> ReplicationClient<TracedChannel> {
        ReplicationClient::new(self.channel()).max_decoding_message_size(updraft_provider::MAX_MESSAGE_BYTES)
    }

    /// `upstreams`: one provider, or several that serve the same catalog (both members of a
    /// switchover pair); requests go to whichever of them is reachable.
    pub fn new(shared: Arc<Shared>, upstreams: &[String], probe: updraft_runtime::Probe) -> Result<Self> {
        if upstreams.is_empty() {
            return Err(ProviderError::InvalidArgument("no upstream provider given (use --upstream URL)".into()));
        }
        let upstream_url = upstreams.join(",");
        let channel = connect_upstream(&shared.config.transport, upstreams)?;
        Ok(Self {
            channel: std::sync::Mutex::new((shared.config.transport.generation(), channel)),
            upstreams: upstreams.to_vec(),
            shared,
            inflight: Mutex::new(HashMap::new()),
            outbox_ready: Notify::new(),
            upstream_url,
            wan_bytes: AtomicU64::new(0),
            served_bytes: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            upstream_connected: AtomicBool::new(false),
            upstream_since_ms: AtomicI64::new(updraft_provider::now_ms()),
            synced: AtomicBool::new(false),
            probe,
            needs_changed: Notify::new(),
            to_fetch: Default::default(),
            fetch_ready: Notify::new(),
            prefetch_passes: AtomicU64::new(0),
            prefetch_failed: AtomicU64::new(0),
        })
    }

    async fn fetch(&self, content_hash: &str) -> Result<()> {
        let reserve = self.shared.config.disk_reserve_bytes;
        updraft_runtime::ensure_room(&self.shared.config.data_dir, 0, reserve).map_err(ProviderError::LimitReached)?;
        let part = self.shared.blobs.partial_path(content_hash)?;
        let mut last_err = String::new();
        for attempt in 0..FETCH_ATTEMPTS {
            let offset = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
            match self.fetch_from(content_hash, &part, offset).await {
                Ok(()) => {
                    self.shared.blobs.commit_checked(&part, content_hash).await?;
                    tracing::info!(%content_hash, "blob cached");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(%content_hash, attempt, offset, error = %e, "upstream fetch interrupted");
                    last_err = e.to_string();
                    tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
                }
            }
        }
        Err(ProviderError::Upstream(format!("fetching {content_hash}: {last_err}")))
    }

    async fn fetch_from(&self, content_hash: &str, part: &std::path::Path, offset: u64) -> Result<()> {
        let io = |e: std::io::Error| ProviderError::Io(format!("{}: {e}", part.display()));
        let mut file = tokio::fs::OpenOptions::new().create(true).append(true).open(part).await.map_err(io)?;
        let mut stream = self
            .upstream()
            .fetch_blob(BlobRequest { content_hash: content_hash.to_string(), offset })
            .await
            .map_err(|s| ProviderError::Upstream(s.message().to_string()))?
            .into_inner();
        let mut pos = offset;
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .map_err(|_| ProviderError::Upstream("upstream stalled for 60 s".into()))?
        {
            let chunk = chunk.map_err(|s| ProviderError::Upstream(s.message().to_string()))?;
            if chunk.offset != pos {
                return Err(ProviderError::Upstream(format!("chunk at {} but expected {pos}", chunk.offset)));
            }
            file.write_all(&chunk.data).await.map_err(io)?;
            pos += chunk.data.len() as u64;
            self.wan_bytes.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
        }
        file.sync_all().await.map_err(io)?;
        Ok(())
    }

    fn set_connected(&self, up: bool) {
        if self.upstream_connected.swap(up, Ordering::Relaxed) != up {
            self.upstream_since_ms.store(updraft_provider::now_ms(), Ordering::Relaxed);
            if !up {
                tracing::warn!(upstream = %self.upstream_url, "working alone: serving this site from cache and the last catalog");
                if self.synced.load(Ordering::Relaxed) {
                    self.probe.set(true, "working alone: the upstream is unreachable; serving from cache");
                }
            }
        }
    }

    /// Content that some machine behind this site would be offered now, or that is
    /// prestaged, and that is not here yet. Nothing else crosses the WAN ahead of demand.
    pub fn wanted(&self) -> Result<BTreeSet<String>> {
        let store = &self.shared.store;
        let catalog = self.shared.catalog()?;
        let hash_of: HashMap<&str, &str> =
            catalog.updates.iter().map(|u| (u.id.as_str(), u.content_hash.as_str())).collect();
        let mut out: BTreeSet<String> =
            catalog.updates.iter().filter(|u| u.prestage).map(|u| u.content_hash.clone()).collect();
        for m in policy::fleet_plans(store, &catalog)? {
            for a in &m.plan.actions {
                if let Action::Install { id } = a
                    && let Some(h) = hash_of.get(id.as_str())
                {
                    out.insert(h.to_string());
                }
            }
        }
        out.retain(|h| !self.shared.blobs.has(h));
        Ok(out)
    }
}

/// Fetches ahead what this site's machines will ask for: after a catalog change, what any of
/// them would be offered (see [`SiteTier::wanted`]); after a check, what it was offered.
pub async fn prefetch_loop(tier: Arc<SiteTier>, shutdown: CancellationToken) {
    loop {
        let full_pass = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tier.needs_changed.notified() => true,
            _ = tier.fetch_ready.notified() => false,
        };
        // Let a burst of changes or checks settle into one pass.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if !tier.synced.load(Ordering::Relaxed) {
            continue; // the catch-up's last event signals again
        }
        let mut wanted = std::mem::take(&mut *tier.to_fetch.lock().expect("prefetch queue"));
        if full_pass {
            match tier.wanted() {
                Ok(w) => wanted.extend(w),
                Err(e) => tracing::warn!(error = %e, "cannot work out what to prefetch"),
            }
        }
        wanted.retain(|h| !tier.shared.blobs.has(h));
        let mut failed = 0;
        for content_hash in wanted {
            let fetched =
                // Each fetch is a trace of its own (the loop runs for ever).
                tier.ensure_blob(&content_hash).instrument(tracing::info_span!(parent: None, "prefetch", %content_hash)).await;
            if let Err(e) = fetched {
                failed += 1;
                tracing::warn!(%content_hash, error = %e, "prefetch failed; will fetch on demand");
            }
        }
        tier.prefetch_failed.store(failed, Ordering::Relaxed);
        tier.prefetch_passes.fetch_add(1, Ordering::Relaxed);
    }
}

/// One number of a site's [`SiteStats`].
type ReadStat = fn(&SiteStats) -> u64;

impl SiteTier {
    /// The site's counters as metrics, read from it at each collection: WAN bytes (fetched
    /// from the upstream), bytes served, cache hits and misses, whether the upstream is
    /// connected, and the catalog version here (its lag is the centre's minus this).
    pub fn register_metrics(self: &Arc<Self>) {
        updraft_provider::metrics::statement_expiry(&self.shared);
        updraft_provider::metrics::store_size(&self.shared);
        use updraft_runtime::metrics::{AsyncInstrument, KeyValue};
        let meter = updraft_runtime::metrics::meter();
        // Reads one number of this site's status at each collection (none once it is gone).
        let observe = |read: ReadStat| {
            let site = Arc::downgrade(self);
            move |o: &dyn AsyncInstrument<u64>| {
                if let Some(site) = site.upgrade() {
                    let s = site.status();
                    o.observe(read(&s), &[KeyValue::new("site", s.site)]);
                }
            }
        };
        let counters: [(&str, &str, &'static str, ReadStat); 4] = [
            ("updraft.site.wan", "By", "Bytes fetched from the upstream", |s| s.wan_bytes),
            ("updraft.site.served", "By", "Bytes served to this site's agents and sites", |s| s.served_bytes),
            ("updraft.site.cache.hits", "{download}", "Downloads served from content already here", |s| s.cache_hits),
            ("updraft.site.cache.misses", "{download}", "Downloads that waited for an upstream fetch", |s| {
                s.cache_misses
            }),
        ];
        for (name, unit, description, read) in counters {
            meter
                .u64_observable_counter(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(observe(read))
                .build();
        }
        let gauges: [(&'static str, &'static str, ReadStat); 2] = [
            ("updraft.site.upstream.connected", "1 while the upstream answers, 0 while working alone", |s| {
                u64::from(s.upstream_connected)
            }),
            ("updraft.catalog.seq", "The catalog version this server has", |s| s.catalog_seq),
        ];
        for (name, description, read) in gauges {
            meter.u64_observable_gauge(name).with_description(description).with_callback(observe(read)).build();
        }
    }
}

impl Tier for SiteTier {
    /// A site signs nothing: the request goes upstream as it came.
    async fn enroll(&self, req: EnrollRequest, _from: Option<std::net::SocketAddr>) -> Result<CertificateReply> {
        let mut client = EnrollmentClient::new(self.channel());
        Ok(client.enroll(req).await.map_err(upstream_refusal)?.into_inner())
    }

    /// An agent's renewal goes upstream with the certificate the agent presented here, for the
    /// centre to check.
    async fn renew(&self, mut req: RenewRequest, caller: &Caller, leaf: Option<Vec<u8>>) -> Result<CertificateReply> {
        if caller.role != Some(updraft_runtime::tls::Role::Agent) {
            return Err(ProviderError::Denied(format!(
                "{}: a site renews its agents' certificates only",
                caller.describe()
            )));
        }
        req.on_behalf_of =
            leaf.ok_or_else(|| ProviderError::Denied("no client certificate on this connection".into()))?;
        let mut client = EnrollmentClient::new(self.channel());
        Ok(client.renew(req).await.map_err(upstream_refusal)?.into_inner())
    }

    async fn ensure_blob(&self, content_hash: &str) -> Result<()> {
        if self.shared.blobs.has(content_hash) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        let lock = self.inflight.lock().await.entry(content_hash.to_string()).or_default().clone();
        let _held = lock.lock().await;
        // Whoever held the lock before us may have fetched it already.
        let result = if self.shared.blobs.has(content_hash) { Ok(()) } else { self.fetch(content_hash).await };
        self.inflight.lock().await.remove(content_hash);
        result
    }

    async fn relay(&self, mut report: ForwardedReport) -> Result<()> {
        // The centre continues the agent's trace when it takes the report.
        report.traceparent = updraft_runtime::telemetry::current_traceparent();
        self.shared.store.outbox_push(&report).await?;
        self.outbox_ready.notify_one();
        Ok(())
    }

    fn offered(&self, offers: &[updraft_proto::v1::Offer]) {
        let missing: Vec<String> = offers
            .iter()
            .filter(|o| o.action == updraft_proto::v1::ActionKind::Install as i32)
            .filter_map(|o| o.update.as_ref())
            .map(|u| u.content_hash.clone())
            .filter(|h| !self.shared.blobs.has(h))
            .collect();
        if !missing.is_empty() {
            self.to_fetch.lock().expect("prefetch queue").extend(missing);
            self.fetch_ready.notify_one();
        }
    }

    fn served(&self, bytes: u64) {
        self.served_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn status(&self) -> SiteStats {
        SiteStats {
            site: self.shared.config.name.clone(),
            upstream: self.upstream_url.clone(),
            upstream_connected: self.upstream_connected.load(Ordering::Relaxed),
            upstream_since_unix_ms: self.upstream_since_ms.load(Ordering::Relaxed),
            catalog_seq: self.shared.store.catalog_seq().unwrap_or(0),
            wan_bytes: self.wan_bytes.load(Ordering::Relaxed),
            served_bytes: self.served_bytes.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
            prefetch_passes: self.prefetch_passes.load(Ordering::Relaxed),
            prefetch_failed: self.prefetch_failed.load(Ordering::Relaxed),
        }
    }

    /// A site with a catalog from earlier answers from it (working alone); a site that has
    /// never synchronised sends agents elsewhere until it has.
    fn ready(&self) -> Result<()> {
        if self.synced.load(Ordering::Relaxed) || self.shared.store.catalog_seq()? > 0 {
            Ok(())
        } else {
            Err(ProviderError::NotReady("this site has not synchronised its catalog with its upstream yet".into()))
        }
    }
}

/// Changes waiting for the statement that covers them. Once the upstream signs statements, a
/// change is passed on to this site's agents and sites only with (right after) a statement
/// that lists it, so a pushed agent's check never meets an offer its statement does not list.
struct Held {
    signed: bool,
    version: u64,
    changes: Vec<Change>,
    since: Option<std::time::Instant>,
}

/// How long a change waits for its statement before it is passed on anyway.
const HOLD_AT_MOST: Duration = Duration::from_secs(3);

fn statement_version(st: &updraft_proto::v1::SignedStatement) -> u64 {
    updraft_core::freshness::claimed_version(&st.body).unwrap_or(0)
}

/// An upstream's refusal, passed on with its code (a refused token stays a refusal, not an
/// unavailable upstream).
fn upstream_refusal(s: tonic::Status) -> ProviderError {
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => ProviderError::Denied(s.message().into()),
        tonic::Code::InvalidArgument => ProviderError::InvalidArgument(s.message().into()),
        tonic::Code::NotFound => ProviderError::NotFound(s.message().into()),
        tonic::Code::FailedPrecondition => ProviderError::Precondition(s.message().into()),
        tonic::Code::ResourceExhausted => ProviderError::LimitReached(s.message().into()),
        _ => ProviderError::Upstream(s.message().into()),
    }
}

impl Held {
    fn new(last: Option<&updraft_proto::v1::SignedStatement>) -> Self {
        Self { signed: last.is_some(), version: last.map(statement_version).unwrap_or(0), changes: vec![], since: None }
    }

    fn pass(&mut self, hub: &updraft_provider::hub::Hub, change: Change) {
        match change {
            Change::Statement { ref statement, .. } => {
                self.signed = true;
                self.version = self.version.max(statement_version(statement));
                let version = self.version;
                let (ready, wait): (Vec<Change>, Vec<Change>) =
                    self.changes.drain(..).partition(|c| c.seq() <= version);
                self.changes = wait;
                hub.publish(change);
                for c in ready {
                    hub.publish(c);
                }
            }
            c if self.signed && c.seq() > self.version => {
                self.since.get_or_insert_with(std::time::Instant::now);
                self.changes.push(c);
            }
            c => hub.publish(c),
        }
        if self.since.is_some_and(|t| t.elapsed() >= HOLD_AT_MOST) || self.changes.is_empty() {
            for c in self.changes.drain(..) {
                hub.publish(c);
            }
            self.since = None;
        }
    }
}

/// Follows the upstream catalog from the last sequence number stored, for ever.
pub async fn follow_loop(tier: Arc<SiteTier>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(250);
    while !shutdown.is_cancelled() {
        let after = tier.shared.store.catalog_seq().unwrap_or(0);
        let req = FollowRequest { after_seq: after, site: tier.shared.config.name.clone() };
        // Each connection is a trace of its own (the loop runs for ever).
        let span = tracing::info_span!(parent: None, "follow_catalog", after);
        match async { tier.upstream().follow_catalog(req).await }.instrument(span).await {
            Ok(resp) => {
                tier.set_connected(true);
                let mut stream = resp.into_inner();
                let mut held = Held::new(tier.shared.store.statement().ok().flatten().as_ref());
                loop {
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ev = stream.next() => ev,
                    };
                    match ev {
                        Some(Ok(ev)) => {
                            backoff = Duration::from_millis(250);
                            if ev.caught_up && ev.change.is_none() {
                                tier.synced.store(true, Ordering::Relaxed);
                                tier.probe.set(true, format!("synchronised with the upstream (catalog {})", ev.seq));
                                tier.needs_changed.notify_one();
                                tracing::info!(seq = ev.seq, "catalog caught up with upstream");
                            }
                            let Some(change) = updraft_provider::catalog::from_event(ev) else { continue };
                            if let Err(e) = tier.shared.store.apply_replicated(&change).await {
                                tracing::error!(error = %e, "cannot store replicated change");
                                break;
                            }
                            if let Change::Trust { trust, .. } = &change {
                                // In force here at once: a revoked agent is refused from now on.
                                updraft_provider::certs::apply_trust(&tier.shared.config.transport, trust);
                            }
                            if !matches!(change, Change::Statement { .. }) {
                                tier.needs_changed.notify_one();
                            }
                            held.pass(&tier.shared.hub, change);
                        }
                        Some(Err(s)) => {
                            tracing::warn!(error = %s.message(), "catalog stream broke");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(s) => tracing::warn!(error = %s.message(), "upstream unreachable; serving from cache"),
        }
        tier.set_connected(false);
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}

/// How long the site stays quiet upstream at most: with no reports to forward, it sends its
/// counters this often, and the centre counts it silent once that (and a grace) has passed.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Drains the outbox upstream in batches; a failed batch stays queued and is retried.
pub async fn forward_loop(tier: Arc<SiteTier>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let heartbeat = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tier.outbox_ready.notified() => false,
            _ = tokio::time::sleep(HEARTBEAT) => true,
        };
        let mut first = true;
        loop {
            // Counters travel with every batch; when nothing is queued, a heartbeat carries them.
            let batch = match tier.shared.store.outbox_peek(BATCH, BATCH_BYTES, BATCH_ENTRIES) {
                Ok(b) if !b.is_empty() => b,
                _ if heartbeat && first => vec![],
                _ => break,
            };
            first = false;
            // Each batch is a trace of its own (the loop runs for ever), or joins its first entry's.
            let span = tracing::info_span!(parent: None, "forward_reports", count = batch.len());
            // The batch joins the trace of its first entry, so one check can be followed
            // agent -> site -> centre.
            if let Some((_, r)) = batch.first() {
                updraft_runtime::telemetry::adopt_traceparent(&span, &r.traceparent);
            }
            let empty = batch.is_empty();
            let keys: Vec<Vec<u8>> = batch.iter().map(|(k, _)| k.clone()).collect();
            let req = ForwardRequest {
                site: tier.shared.config.name.clone(),
                via_address: String::new(),
                reports: batch.into_iter().map(|(_, r)| r).collect(),
                self_: Some(MachineInfo {
                    name: tier.shared.config.name.clone(),
                    hostname: updraft_runtime::hostname(),
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    contact_interval_secs: HEARTBEAT.as_secs() as u32,
                    ..Default::default()
                }),
                stats: Some(tier.status()),
            };
            let sent = async { tier.upstream().forward_reports(req).await }.instrument(span).await;
            match sent {
                Ok(_) => {
                    backoff = Duration::from_millis(250);
                    if let Err(e) = tier.shared.store.outbox_ack(&keys).await {
                        tracing::error!(error = %e, "cannot clear forwarded reports");
                        break;
                    }
                    if empty {
                        break;
                    }
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), queued = tier.shared.store.outbox_len(), "upstream did not take reports; will retry");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    break;
                }
            }
        }
    }
}
