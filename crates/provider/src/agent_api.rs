//! The agent API (check, download, report, subscribe), served by every tier. What differs
//! between a local and a site provider — where a missing blob comes from and whether reports
//! travel further — is the [`Tier`] it is given.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::Stream;
use tokio::sync::{Notify, OwnedSemaphorePermit, broadcast};
use tonic::{Request, Response, Status};
use updraft_proto::v1::agent_api_server::AgentApi;
use updraft_proto::v1::{
    ActivityKind, BlobRequest, CheckRequest, CheckResponse, Chunk, ForwardedReport, PushEvent, PushKind, ReportRequest,
    ReportResponse, SiteStats, SubscribeRequest,
};
use updraft_runtime::metrics::{Histogram, KeyValue};

use crate::auth::Caller;
use crate::catalog::validate_machine_name;
use crate::error::{ProviderError, Result};
use crate::policy;
use crate::{Shared, now_ms};

/// Bytes per download chunk: large enough to keep throughput high, far below message limits.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Most activity entries accepted in one report.
pub const MAX_REPORT_ENTRIES: usize = 1000;
/// Largest report accepted (inventory and activity), encoded: every report fits in a site's
/// upstream batch with room to spare, so no one report can block a site's outbox.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Largest machine description (name, addresses, inventory) accepted, encoded.
pub const MAX_MACHINE_INFO_BYTES: usize = 64 * 1024;

/// The tier-specific half of the agent API.
pub trait Tier: Send + Sync + 'static {
    /// Makes sure the blob is stored locally, fetching it if this tier can.
    fn ensure_blob(&self, content_hash: &str) -> impl Future<Output = Result<()>> + Send;
    /// What this tier does with a recorded check or report: a site queues it for its
    /// upstream, with the calling span's trace context; the centre keeps role ceilings current.
    /// Called inside the call's span; the report's `traceparent` is left for the tier to fill.
    fn relay(&self, report: ForwardedReport) -> impl Future<Output = Result<()>> + Send;
    /// Whether this tier can answer checks yet (a site that never synchronised its catalog
    /// cannot: an empty answer would look like "nothing to do").
    fn ready(&self) -> Result<()> {
        Ok(())
    }
    /// Counts bytes sent to this tier's agents (and sites).
    fn served(&self, _bytes: u64) {}
    /// What a check was just offered (a site fetches missing content ahead of the download).
    fn offered(&self, _offers: &[updraft_proto::v1::Offer]) {}
    /// This tier's own status: upstream, connection, counters.
    fn status(&self) -> SiteStats;
    /// A host's first certificate (see `certs`): the centre signs; a site passes it upstream.
    fn enroll(
        &self,
        req: updraft_proto::v1::EnrollRequest,
        from: Option<std::net::SocketAddr>,
    ) -> impl Future<Output = Result<updraft_proto::v1::CertificateReply>> + Send;
    /// A renewal by `caller`, who presented `leaf` (DER) on its connection.
    fn renew(
        &self,
        req: updraft_proto::v1::RenewRequest,
        caller: &crate::auth::Caller,
        leaf: Option<Vec<u8>>,
    ) -> impl Future<Output = Result<updraft_proto::v1::CertificateReply>> + Send;
}

/// The local provider's tier: blobs are only what was imported; nothing is relayed.
pub struct LocalTier {
    pub shared: Arc<Shared>,
}

impl Tier for LocalTier {
    async fn ensure_blob(&self, content_hash: &str) -> Result<()> {
        if self.shared.blobs.has(content_hash) {
            Ok(())
        } else if self.shared.store.is_shared() {
            // Another provider of the database may have it (per-host content locations).
            crate::content::fetch(&self.shared, content_hash).await
        } else {
            Err(ProviderError::BlobMissing(content_hash.into()))
        }
    }
    async fn relay(&self, report: ForwardedReport) -> Result<()> {
        match &report.machine {
            Some(m) => crate::ceiling::after_report(&self.shared, m).await,
            None => Ok(()),
        }
    }
    /// A provider cut off from its database sends agents and sites to another provider of it
    /// (its catalog in memory may already be behind theirs).
    fn ready(&self) -> Result<()> {
        self.shared.database_reachable()
    }
    async fn enroll(
        &self,
        req: updraft_proto::v1::EnrollRequest,
        from: Option<std::net::SocketAddr>,
    ) -> Result<updraft_proto::v1::CertificateReply> {
        crate::certs::enroll(&self.shared, req, from).await
    }
    async fn renew(
        &self,
        req: updraft_proto::v1::RenewRequest,
        caller: &crate::auth::Caller,
        _leaf: Option<Vec<u8>>,
    ) -> Result<updraft_proto::v1::CertificateReply> {
        crate::certs::renew(&self.shared, caller, req).await
    }
    fn status(&self) -> SiteStats {
        SiteStats {
            site: self.shared.config.name.clone(),
            upstream_connected: true,
            catalog_seq: self.shared.store.catalog_seq().unwrap_or(0),
            ..Default::default()
        }
    }
}

/// What an agent says about its machine must be readable before it is recorded or acted on:
/// its role, and every receipt's product name and version.
pub fn validate_inventory(m: &updraft_proto::v1::MachineInfo) -> Result<()> {
    use prost::Message;
    let size = m.encoded_len();
    if size > MAX_MACHINE_INFO_BYTES {
        return Err(ProviderError::LimitReached(format!(
            "machine {:?} describes itself in {size} bytes; at most {MAX_MACHINE_INFO_BYTES} are accepted",
            m.name.chars().take(80).collect::<String>()
        )));
    }
    updraft_core::model::Role::from_wire(&m.role)
        .map_err(|e| ProviderError::InvalidArgument(format!("machine {:?}: {e}", m.name)))?;
    for p in &m.installed {
        let bad = |e: updraft_core::CoreError| {
            ProviderError::InvalidArgument(format!("inventory of {:?}, product {:?}: {e}", m.name, p.product))
        };
        updraft_core::model::validate_product(&p.product).map_err(bad)?;
        p.version.parse::<updraft_core::Version>().map_err(bad)?;
    }
    Ok(())
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;
pub type PushStream = Pin<Box<dyn Stream<Item = Result<PushEvent, Status>> + Send>>;

pub struct AgentService<T: Tier> {
    shared: Arc<Shared>,
    tier: Arc<T>,
    subscribers: Arc<AtomicUsize>,
    streams: Arc<PushStreams>,
    /// `updraft.push.fan_out`: from a change's publication to its event handed to a stream.
    fan_out: Histogram<f64>,
}

impl<T: Tier> AgentService<T> {
    pub fn new(shared: Arc<Shared>, tier: Arc<T>) -> Self {
        let fan_out = updraft_runtime::metrics::meter()
            .f64_histogram("updraft.push.fan_out")
            .with_unit("ms")
            .with_description("Time from a catalog change's publication to its push event handed to each stream")
            .build();
        Self { shared, tier, subscribers: Arc::new(AtomicUsize::new(0)), streams: Default::default(), fan_out }
    }
}

/// Each machine's one push stream. An agent needs one; a new subscription of a machine ends
/// its previous stream (an agent that reconnected, or a stolen certificate that tries to hold
/// many), so one machine can never hold more than one.
#[derive(Default)]
struct PushStreams {
    by_machine: std::sync::Mutex<std::collections::HashMap<String, (u64, Arc<Notify>)>>,
    next: std::sync::atomic::AtomicU64,
}

impl PushStreams {
    /// Registers a new stream of `machine`, ending the one it had; returns the stream's
    /// generation and what tells it to end.
    fn open(&self, machine: &str) -> (u64, Arc<Notify>) {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let end = Arc::new(Notify::new());
        let previous =
            self.by_machine.lock().expect("push streams").insert(machine.to_string(), (generation, end.clone()));
        if let Some((_, old)) = previous {
            old.notify_one();
        }
        (generation, end)
    }

    /// Forgets `machine`'s stream if it is still generation `generation`.
    fn close(&self, machine: &str, generation: u64) {
        let mut m = self.by_machine.lock().expect("push streams");
        if m.get(machine).is_some_and(|(g, _)| *g == generation) {
            m.remove(machine);
        }
    }
}

/// Streams a stored blob from `offset` in [`CHUNK_SIZE`] pieces, holding `slot` (if any) until
/// the stream ends. Shared by agent downloads and upstream fetches.
pub async fn stream_blob(
    shared: &Shared,
    content_hash: &str,
    offset: u64,
    slot: Option<DownloadSlot>,
) -> Result<ChunkStream> {
    let path = shared.blobs.path_of(content_hash)?;
    let total = shared.blobs.size(content_hash).await?;
    if offset > total {
        return Err(ProviderError::InvalidArgument(format!(
            "offset {offset} is past the end of {content_hash} ({total} bytes)"
        )));
    }
    let reader = crate::chunks::ChunkReader::open(path.clone(), offset, total, &shared.blob_maps)
        .await
        .map_err(|e| ProviderError::Io(format!("{}: {e}", path.display())))?;
    // Each chunk is taken when the connection asks for it, that is when h2 has room for more of
    // this stream; h2's send buffer (more than a chunk) is the read-ahead. So a chunk's pages
    // are found in the page cache (or read into it) shortly before they are sent, and no task
    // or channel stands between the file and the connection.
    let served = updraft_runtime::metrics::meter()
        .u64_counter("updraft.served")
        .with_unit("By")
        .with_description("Package bytes this server sent to agents and sites")
        .build();
    // The slot goes with the stream: dropped at its end, at a read error, or when the
    // connection drops the stream.
    let chunks = futures::stream::try_unfold((reader, slot, served), move |(mut reader, slot, served)| async move {
        let read = reader.next().await.map_err(|e| Status::internal(format!("reading blob: {e}")))?;
        let Some((at, data)) = read else {
            tracing::debug!(offset, waited_for_disk = reader.waited(), "blob sent");
            return Ok(None);
        };
        served.add(data.len() as u64, &[]);
        Ok(Some((Chunk { offset: at, data, total_size: total }, (reader, slot, served))))
    });
    Ok(Box::pin(chunks))
}

/// Downloads one machine may hold open at once (an agent needs one; a few allow a retry to
/// overlap a stream the provider has not yet seen end).
pub const DOWNLOADS_PER_MACHINE: usize = 4;

/// A machine's place among the blob streams a provider serves to agents, held until its
/// stream ends: one of the provider's `--max-downloads` and one of the machine's
/// [`DOWNLOADS_PER_MACHINE`].
pub struct DownloadSlot {
    _provider: OwnedSemaphorePermit,
    _machine: Option<crate::limits::KeyGuard<String>>,
}

/// Admits an agent's download of `content_hash`, or says why not. Only content of an update
/// past pre-approval is served to agents (a package under review is not theirs to fetch).
/// Beyond the provider's limit a download waits its turn, first come first served, for up
/// to half the request timeout; then it is refused as exhausted and the agent retries
/// shortly. This is the provider's back-pressure on a herd: memory and file handles stay
/// bounded however many machines download at once, and no one machine takes them all.
/// Unauthenticated callers (`--insecure`, tests only) are counted only in the total. An agent
/// may download only content its plan offers it (from its last check here).
pub async fn download_slot(shared: &Shared, caller: Option<&Caller>, content_hash: &str) -> Result<DownloadSlot> {
    updraft_core::hash::validate(content_hash)?;
    let catalog = shared.catalog()?;
    let approved = catalog.updates.iter().any(|u| {
        u.content_hash == content_hash
            && !matches!(crate::catalog::state_of(u), Some(updraft_core::model::UpdateState::PreApproval) | None)
    });
    if !approved {
        return Err(ProviderError::Denied(format!(
            "{content_hash} is not the content of an approved update in this provider's catalog"
        )));
    }
    // An agent gets only what its own plan offers it, as of its last check here: not every
    // approved package in the catalog.
    if let Some(c) = caller.filter(|c| c.role == Some(updraft_runtime::tls::Role::Agent)) {
        let info = shared.store.get_machine(&c.name)?.and_then(|m| m.info);
        let offered = match info {
            Some(info) => policy::answer(&catalog, &info)?
                .0
                .iter()
                .any(|o| o.update.iter().chain(&o.rollback).any(|u| u.content_hash == content_hash)),
            None => false,
        };
        if !offered {
            return Err(ProviderError::Denied(format!(
                "{content_hash} is not the content of an update offered to {} (as of its last check here)",
                c.name
            )));
        }
    }
    let machine = match caller {
        Some(c) if c.role.is_some() => {
            Some(shared.machine_downloads.try_take(&c.name, DOWNLOADS_PER_MACHINE).ok_or_else(|| {
                ProviderError::LimitReached(format!(
                    "{} already has {DOWNLOADS_PER_MACHINE} downloads open; finish or close one first",
                    c.name
                ))
            })?)
        }
        _ => None,
    };
    let wait = shared.config.request_timeout / 2;
    match tokio::time::timeout(wait, shared.downloads.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(DownloadSlot { _provider: permit, _machine: machine }),
        _ => Err(ProviderError::LimitReached(format!(
            "all {} download slots stayed busy for {} s; retry shortly",
            shared.config.max_downloads,
            wait.as_secs()
        ))),
    }
}

/// Serves a blob download (to an agent, holding `slot`, or to a site): validated, fetched by
/// the tier if needed, counted as served.
pub async fn serve_blob<T: Tier>(
    shared: &Shared,
    tier: &T,
    req: BlobRequest,
    slot: Option<DownloadSlot>,
) -> Result<ChunkStream> {
    updraft_core::hash::validate(&req.content_hash)?;
    tier.ensure_blob(&req.content_hash).await?;
    let stream = stream_blob(shared, &req.content_hash, req.offset, slot).await?;
    let size = shared.blobs.size(&req.content_hash).await?;
    tier.served(size.saturating_sub(req.offset));
    Ok(stream)
}

#[tonic::async_trait]
impl<T: Tier> AgentApi for AgentService<T> {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        self.tier.ready()?;
        let remote_ip = request.remote_addr().map(|a| updraft_runtime::IpText(a.ip()).to_string());
        let caller = crate::auth::Caller::of(&request).cloned();
        let req = request.into_inner();
        let machine = req.machine.ok_or_else(|| ProviderError::InvalidArgument("check without machine info".into()))?;
        validate_machine_name(&machine.name)?;
        crate::auth::ensure_machine(caller.as_ref(), &machine.name)?;
        validate_inventory(&machine)?;
        // Routine: a fleet checks all day. A machine's first check is logged at info below.
        tracing::debug!(machine = %machine.name, manual = req.manual, "check");
        let now = now_ms();
        // Answer first: a malformed inventory is refused before anything is recorded.
        let mut machine = machine;
        // The address the provider sees is more trustworthy than what the agent could claim.
        if let Some(addr) = remote_ip {
            machine.addresses.retain(|a| a != &addr);
            machine.addresses.insert(0, addr);
        }
        let machine_name = machine.name.clone();
        let held_digest = req.statement_digest.clone();
        let catalog = self.shared.catalog()?;
        let (offers, policy) = policy::answer(&catalog, &machine)?;
        self.tier.offered(&offers);
        // A machine's first record is durable before its check is answered; later contact
        // times ride the next commit.
        if self.shared.store.record_machine(&machine, "direct", now, false).await? {
            self.shared.store.sync().await?;
            tracing::info!(machine = %machine.name, "a new machine checked in");
        }
        self.tier
            .relay(ForwardedReport {
                machine: Some(machine),
                activities: vec![],
                at_unix_ms: now,
                is_check: true,
                traceparent: String::new(),
            })
            .await?;
        let signed = crate::statement::for_answer(&self.shared)?;
        let machine_proof = signed.as_ref().map(|s| s.proof_for(&machine_name)).unwrap_or_default();
        Ok(Response::new(CheckResponse {
            // The sequence the offers were computed at: a change landing meanwhile stays
            // "unseen" for this agent, so its next push or resubscription catches it.
            catalog_seq: catalog.seq,
            offers,
            min_check_interval_secs: self.shared.config.min_check_secs,
            max_check_interval_secs: self.shared.config.max_check_secs,
            served_by: self.shared.config.name.clone(),
            policy: Some(policy),
            statement: signed.and_then(|s| s.for_agent(&held_digest)),
            machine_proof,
        }))
    }

    type DownloadStream = ChunkStream;

    async fn download(&self, request: Request<BlobRequest>) -> Result<Response<ChunkStream>, Status> {
        let caller = crate::auth::Caller::of(&request).cloned();
        let req = request.into_inner();
        let slot = download_slot(&self.shared, caller.as_ref(), &req.content_hash).await?;
        Ok(Response::new(serve_blob(&self.shared, &*self.tier, req, Some(slot)).await?))
    }

    async fn report(&self, request: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        let caller = crate::auth::Caller::of(&request).cloned();
        let req = request.into_inner();
        let size = prost::Message::encoded_len(&req);
        if size > MAX_REPORT_BYTES {
            return Err(ProviderError::LimitReached(format!(
                "report of {size} bytes; at most {MAX_REPORT_BYTES} are accepted (send fewer entries at a time)"
            ))
            .into());
        }
        let machine =
            req.machine.ok_or_else(|| ProviderError::InvalidArgument("report without machine info".into()))?;
        validate_machine_name(&machine.name)?;
        crate::auth::ensure_machine(caller.as_ref(), &machine.name)?;
        validate_inventory(&machine)?;
        if req.activities.len() > MAX_REPORT_ENTRIES {
            return Err(ProviderError::LimitReached(format!(
                "report has {} entries, at most {MAX_REPORT_ENTRIES} allowed",
                req.activities.len()
            ))
            .into());
        }
        // The reporting machine is who the entries are about, whatever they claim.
        let activities: Vec<_> = req
            .activities
            .into_iter()
            .map(|mut a| {
                a.machine = machine.name.clone();
                a
            })
            .collect();
        let now = now_ms();
        // Recorded before the activity, whose commit makes both durable.
        if self.shared.store.record_machine(&machine, "direct", now, false).await? && activities.is_empty() {
            self.shared.store.sync().await?;
        }
        self.shared.store.append_activity(&activities).await?;
        if activities.iter().any(|a| crate::store::outcome_of(a.kind).is_some()) {
            self.shared.rollout_wake.notify_one();
        }
        // Content that reached an agent with the wrong hash may be bad here: re-hash it now.
        for a in &activities {
            if a.kind == ActivityKind::VerifyFailed as i32 && a.detail.contains(updraft_core::hash::MISMATCH) {
                crate::scrub::on_report(&self.shared, &a.update_id);
            }
        }
        let accepted = activities.len() as u32;
        self.tier
            .relay(ForwardedReport {
                machine: Some(machine),
                activities,
                at_unix_ms: now,
                is_check: false,
                traceparent: String::new(),
            })
            .await?;
        Ok(Response::new(ReportResponse { accepted }))
    }

    type SubscribeStream = PushStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<PushStream>, Status> {
        self.tier.ready()?;
        let caller = crate::auth::Caller::of(&request).cloned();
        let req = request.into_inner();
        validate_machine_name(&req.machine)?;
        crate::auth::ensure_machine(caller.as_ref(), &req.machine)?;
        let max = self.shared.config.max_subscribers;
        if self.subscribers.fetch_add(1, Ordering::SeqCst) >= max {
            self.subscribers.fetch_sub(1, Ordering::SeqCst);
            return Err(
                ProviderError::LimitReached(format!("this provider holds its maximum of {max} push streams")).into()
            );
        }
        let _guard = SubscriberGuard(self.subscribers.clone());
        let (generation, superseded) = self.streams.open(&req.machine);
        // Subscribed before the hello reads the sequence: a change published in between is sent.
        let rx = self.shared.hub.subscribe_push();
        let state = PushState {
            hello: Some(hello(&self.shared)),
            rx,
            reachable: self.shared.database_ok.subscribe(),
            shared: self.shared.clone(),
            streams: self.streams.clone(),
            machine: req.machine,
            generation,
            superseded,
            fan_out: self.fan_out.clone(),
            _guard,
        };
        let stream = futures::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            match state.next().await? {
                Ok(event) => Some((Ok(event), Some(state))),
                // The error that ends the stream: the state, its slot and registration go with it.
                Err(ending) => Some((Err(ending), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A push stream's first event: the catalog sequence as this provider knows it.
fn hello(shared: &Shared) -> PushEvent {
    PushEvent {
        kind: PushKind::Hello as i32,
        catalog_seq: shared.store.catalog_seq().unwrap_or(0),
        ..Default::default()
    }
}

/// One push stream, polled as the response body itself: no task or channel of its own between
/// the change hub and the connection (that pair cost about 4 kB per connected agent). Dropped
/// when the stream ends or its agent goes away, it forgets the stream and frees its slot.
struct PushState {
    hello: Option<PushEvent>,
    rx: broadcast::Receiver<crate::hub::Published>,
    reachable: tokio::sync::watch::Receiver<bool>,
    shared: Arc<Shared>,
    streams: Arc<PushStreams>,
    machine: String,
    generation: u64,
    superseded: Arc<Notify>,
    fan_out: Histogram<f64>,
    _guard: SubscriberGuard,
}

impl PushState {
    /// The stream's next item: the hello, then each published change, or the error that ends it
    /// (superseded by a newer stream of the machine, the provider stopping, or cut off from its
    /// database, where it would hear no other provider's changes); nothing once the hub is gone.
    async fn next(&mut self) -> Option<Result<PushEvent, Status>> {
        if let Some(hello) = self.hello.take() {
            return Some(Ok(hello));
        }
        let Self { rx, reachable, shared, superseded, fan_out, .. } = self;
        let ending = tokio::select! {
            _ = superseded.notified() => Status::aborted("superseded by a newer push stream of this machine"),
            _ = shared.stopping.cancelled() => Status::unavailable("this provider is stopping: reconnect elsewhere"),
            _ = reachable.wait_for(|ok| !*ok) => {
                Status::unavailable("this provider cannot reach its database: reconnect elsewhere")
            }
            ev = rx.recv() => {
                let (ev, published) = match ev {
                    Ok(p) => (p.event, Some(p.at)),
                    // Fell behind: a fresh hello makes the agent check, so nothing is missed.
                    Err(broadcast::error::RecvError::Lagged(_)) => (hello(shared), None),
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                if let Some(at) = published {
                    let kind = PushKind::try_from(ev.kind).unwrap_or(PushKind::Unspecified);
                    let kind = KeyValue::new("kind", kind.as_str_name().trim_start_matches("PUSH_KIND_").to_lowercase());
                    fan_out.record(at.elapsed().as_secs_f64() * 1000.0, &[kind]);
                }
                return Some(Ok(ev));
            }
        };
        Some(Err(ending))
    }
}

impl Drop for PushState {
    fn drop(&mut self) {
        self.streams.close(&self.machine, self.generation);
    }
}

struct SubscriberGuard(Arc<AtomicUsize>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tonic::Code;

    use super::*;
    use crate::Config;
    use crate::store::Change;
    use updraft_core::model::UpdateState;
    use updraft_proto::v1::Update;

    fn subscribe_to(
        service: &AgentService<LocalTier>,
        machine: &str,
    ) -> impl Future<Output = std::result::Result<Response<PushStream>, Status>> {
        service.subscribe(Request::new(SubscribeRequest { machine: machine.into(), last_seen_seq: 0 }))
    }

    /// A push stream says hello, passes on each change, and ends with the reason it ends; a
    /// stream whose agent went away frees its slot and its machine's registration at once.
    #[tokio::test]
    async fn a_push_stream_lives_exactly_as_long_as_its_agent_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new("t", dir.path().to_path_buf());
        config.max_subscribers = 2;
        let shared = Shared::open(config).unwrap();
        let service = AgentService::new(shared.clone(), Arc::new(LocalTier { shared: shared.clone() }));
        let kind = |item: Option<std::result::Result<PushEvent, Status>>| item.unwrap().unwrap().kind;

        let mut first = subscribe_to(&service, "m1").await.unwrap().into_inner();
        let mut second = subscribe_to(&service, "m2").await.unwrap().into_inner();
        assert_eq!(kind(first.next().await), PushKind::Hello as i32);
        assert_eq!(kind(second.next().await), PushKind::Hello as i32);
        let full = subscribe_to(&service, "m3").await.map(|_| ()).unwrap_err();
        assert_eq!(full.code(), Code::ResourceExhausted, "{full}");

        // A change reaches every stream.
        let update =
            Update { id: "u".into(), high_priority: true, state: UpdateState::Ga.to_wire(), ..Default::default() };
        shared.hub.publish(Change::Upsert(Box::new(update)));
        for s in [&mut first, &mut second] {
            let ev = s.next().await.unwrap().unwrap();
            assert_eq!((ev.kind, ev.update_id.as_str()), (PushKind::HighPriority as i32, "u"));
        }

        // The agent went away: its slot and registration are freed with the stream.
        drop(first);
        assert!(!service.streams.by_machine.lock().unwrap().contains_key("m1"));
        let mut third = subscribe_to(&service, "m3").await.unwrap().into_inner();
        assert_eq!(kind(third.next().await), PushKind::Hello as i32);

        // A newer stream of the same machine ends the older, which then ends.
        let refused = subscribe_to(&service, "m3").await.map(|_| ()).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "two slots, both held");
        drop(second);
        let mut again = subscribe_to(&service, "m3").await.unwrap().into_inner();
        assert_eq!(third.next().await.unwrap().unwrap_err().code(), Code::Aborted);
        assert!(third.next().await.is_none());
        drop(third);
        assert!(service.streams.by_machine.lock().unwrap().contains_key("m3"), "the newer stream stays registered");

        // A stopping provider ends every stream, saying so.
        assert_eq!(kind(again.next().await), PushKind::Hello as i32);
        shared.stopping.cancel();
        assert_eq!(again.next().await.unwrap().unwrap_err().code(), Code::Unavailable);
        assert!(again.next().await.is_none());
    }
}
