//! The replication API that site providers follow: the catalog as a resumable sequenced stream,
//! blobs by hash, and batches of reports from behind a site.
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use updraft_proto::v1::replication_server::Replication;
use updraft_proto::v1::{
    BlobRequest, CatalogEvent, FollowRequest, ForwardRequest, ForwardResponse, ForwardedReport, MachineInfo, SiteStats,
    SiteStatusRequest,
};

use crate::Shared;
use crate::agent_api::{ChunkStream, MAX_REPORT_ENTRIES, Tier, serve_blob, validate_inventory};
use crate::catalog::{to_event, validate_machine_name};
use crate::error::ProviderError;
use crate::store::Change;

pub struct ReplicationService<T: Tier> {
    shared: Arc<Shared>,
    tier: Arc<T>,
}

impl<T: Tier> ReplicationService<T> {
    pub fn new(shared: Arc<Shared>, tier: Arc<T>) -> Self {
        Self { shared, tier }
    }
}

#[tonic::async_trait]
impl<T: Tier> Replication for ReplicationService<T> {
    type FollowCatalogStream = Pin<Box<dyn Stream<Item = Result<CatalogEvent, Status>> + Send>>;

    async fn follow_catalog(
        &self,
        request: Request<FollowRequest>,
    ) -> Result<Response<Self::FollowCatalogStream>, Status> {
        let req = request.into_inner();
        // Subscribe before reading the backlog so no change falls between the two.
        let mut live = self.shared.hub.follow_catalog();
        let backlog = self.shared.store.changes_after(req.after_seq)?;
        let current = self.shared.store.catalog_seq()?;
        let statement = crate::statement::for_answer(&self.shared)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(
            async move {
                let mut last = req.after_seq;
                for change in backlog {
                    last = last.max(change.seq());
                    if tx.send(Ok(to_event(&change, false))).await.is_err() {
                        return;
                    }
                }
                if let Some(st) = statement {
                    let ev = to_event(&Change::Statement { statement: st, seq: last.max(current) }, false);
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                let marker = CatalogEvent { seq: last.max(current), change: None, caught_up: true };
                if tx.send(Ok(marker)).await.is_err() {
                    return;
                }
                loop {
                    tokio::select! {
                        ev = live.recv() => match ev {
                            Ok(change @ Change::Statement { .. }) => {
                                if tx.send(Ok(to_event(&change, true))).await.is_err() { return; }
                            }
                            Ok(change) if change.seq() > last => {
                                last = change.seq();
                                if tx.send(Ok(to_event(&change, true))).await.is_err() { return; }
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                // The follower resumes from `last` on reconnect; nothing is lost.
                                let _ = tx.send(Err(Status::aborted(format!("follower fell {n} changes behind; resume from {last}")))).await;
                                return;
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                        _ = tx.closed() => return,
                    }
                }
            }
            .instrument(tracing::info_span!("catalog_follower", site = %req.site, after = req.after_seq)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchBlobStream = ChunkStream;

    async fn fetch_blob(&self, request: Request<BlobRequest>) -> Result<Response<ChunkStream>, Status> {
        // Sites are few and each serves many machines: their fetches take no download slot.
        Ok(Response::new(serve_blob(&self.shared, &*self.tier, request.into_inner(), None).await?))
    }

    async fn site_status(&self, _request: Request<SiteStatusRequest>) -> Result<Response<SiteStats>, Status> {
        Ok(Response::new(self.tier.status()))
    }

    async fn forward_reports(&self, request: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
        let req = request.into_inner();
        validate_machine_name(&req.site)?;
        let entries: usize = req.reports.iter().map(|r| r.activities.len() + 1).sum();
        if entries > MAX_REPORT_ENTRIES * 10 {
            return Err(ProviderError::LimitReached(format!("batch of {entries} entries is too large")).into());
        }
        let store = &self.shared.store;
        let site_info =
            req.self_.clone().unwrap_or_else(|| MachineInfo { name: req.site.clone(), ..Default::default() });
        store.record_machine(&site_info, "direct", crate::now_ms(), true).await?;
        if let Some(stats) = req.stats.clone() {
            store.set_site_stats(&site_info.name, stats).await?;
        }
        let mut accepted = 0;
        let mut all_acts = Vec::new();
        for r in req.reports {
            let Some(machine) = r.machine else { continue };
            if validate_machine_name(&machine.name).is_err() || validate_inventory(&machine).is_err() {
                continue;
            }
            let acts: Vec<_> = r
                .activities
                .into_iter()
                .map(|mut a| {
                    a.machine = machine.name.clone();
                    a
                })
                .collect();
            store.record_machine(&machine, &req.site, r.at_unix_ms, false).await?;
            all_acts.extend(acts.iter().cloned());
            // A site in the middle of a chain passes its sites' reports further up.
            self.tier.relay(ForwardedReport { machine: Some(machine), activities: acts, ..r }).await?;
            accepted += 1;
        }
        // The site drops what we acknowledge from its outbox: all of it must be on disk, with
        // one commit for the whole batch.
        store.append_activity(&all_acts).await?;
        store.sync().await?;
        Ok(Response::new(ForwardResponse { accepted }))
    }
}
