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
use crate::policy::Silence;
use crate::store::Change;

pub struct ReplicationService<T: Tier> {
    shared: Arc<Shared>,
    tier: Arc<T>,
    /// Machines each site has brought in, counted from the store on a site's first batch.
    introduced: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl<T: Tier> ReplicationService<T> {
    pub fn new(shared: Arc<Shared>, tier: Arc<T>) -> Self {
        Self { shared, tier, introduced: Default::default() }
    }
}

/// Whether a site may speak for a machine the store holds as `known` (None: never seen): one it
/// brings in, one already behind it, or one that is silent on its own route (a machine that
/// moved); never another site or provider. A site certificate therefore cannot rewrite
/// machines that are alive elsewhere.
pub fn site_may_report(known: Option<&updraft_proto::v1::Machine>, site: &str, silence: &Silence) -> bool {
    match known {
        None => true,
        Some(m) if m.is_remote_provider => false,
        Some(m) if m.via == site => true,
        Some(m) => silence.is_silent(m),
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
        let statement = crate::statement::current(&self.shared)?;
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
        let caller = crate::auth::Caller::of(&request).cloned();
        let req = request.into_inner();
        validate_machine_name(&req.site)?;
        // A site speaks as the name in its certificate, and its own record carries that name.
        if let Some(c) = caller.as_ref().filter(|c| c.role == Some(updraft_runtime::tls::Role::RemoteProvider))
            && c.name != req.site
        {
            return Err(ProviderError::Denied(format!(
                "the certificate is for site {:?}, the batch speaks for {:?}",
                c.name, req.site
            ))
            .into());
        }
        if let Some(me) = &req.self_
            && me.name != req.site
        {
            return Err(ProviderError::Denied(format!(
                "site {:?} sent its own record under the name {:?}",
                req.site, me.name
            ))
            .into());
        }
        let entries: usize = req.reports.iter().map(|r| r.activities.len() + 1).sum();
        if entries > MAX_REPORT_ENTRIES * 10 {
            return Err(ProviderError::LimitReached(format!("batch of {entries} entries is too large")).into());
        }
        let store = &self.shared.store;
        // Times are the receiver's to vouch for: nothing is dated after its arrival.
        let now = crate::now_ms();
        let silence = self.shared.silence();
        let site_info =
            req.self_.clone().unwrap_or_else(|| MachineInfo { name: req.site.clone(), ..Default::default() });
        store.record_machine(&site_info, "direct", now, true).await?;
        if let Some(stats) = req.stats.clone() {
            store.set_site_stats(&site_info.name, stats).await?;
        }
        let mut accepted = 0;
        let mut all_acts = Vec::new();
        let max_machines = self.shared.config.max_machines_per_site;
        let mut introduced = match self.introduced.lock().expect("introduced").get(&req.site) {
            Some(n) => *n,
            None => store.list_machines()?.iter().filter(|m| m.via == req.site).count(),
        };
        for r in req.reports {
            let Some(machine) = r.machine else { continue };
            if validate_machine_name(&machine.name).is_err() || validate_inventory(&machine).is_err() {
                continue;
            }
            let known = store.get_machine(&machine.name)?;
            if !site_may_report(known.as_ref(), &req.site, &silence) {
                tracing::warn!(site = %req.site, machine = %machine.name, "refused a report for a machine that is not behind this site");
                continue;
            }
            if known.as_ref().is_none_or(|m| m.via != req.site) {
                if introduced >= max_machines {
                    tracing::warn!(site = %req.site, machine = %machine.name, limit = max_machines, "refused a machine: the site is at its limit");
                    continue;
                }
                introduced += 1;
            }
            let r = ForwardedReport { machine: None, at_unix_ms: r.at_unix_ms.clamp(0, now), ..r };
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
        self.introduced.lock().expect("introduced").insert(req.site.clone(), introduced);
        // The site drops what we acknowledge from its outbox: all of it must be on disk, with
        // one commit for the whole batch.
        store.append_activity(&all_acts).await?;
        store.sync().await?;
        if all_acts.iter().any(|a| crate::store::outcome_of(a.kind).is_some()) {
            self.shared.rollout_wake.notify_one();
        }
        Ok(Response::new(ForwardResponse { accepted }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_proto::v1::Machine;

    #[test]
    fn a_site_speaks_for_new_machines_its_own_and_those_silent_elsewhere() {
        let hour = 3_600_000;
        let silence = Silence { now_ms: 10 * hour, default_secs: 3600, grace_ms: 0 };
        let known = |via: &str, last: i64, site: bool| Machine {
            via: via.into(),
            last_contact_unix_ms: last,
            is_remote_provider: site,
            ..Default::default()
        };
        assert!(site_may_report(None, "branch", &silence), "a machine it brings in");
        assert!(site_may_report(Some(&known("branch", 10 * hour, false)), "branch", &silence), "one behind it");
        assert!(!site_may_report(Some(&known("direct", 9 * hour, false)), "branch", &silence), "alive elsewhere");
        assert!(site_may_report(Some(&known("other", 8 * hour, false)), "branch", &silence), "moved");
        assert!(!site_may_report(Some(&known("direct", 0, true)), "branch", &silence), "never a site");
    }
}
