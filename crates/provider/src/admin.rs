//! The administration API: importing packages, listing and changing the catalog, machines and
//! activity. Every change validates all of its input before it changes anything.
use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use updraft_core::hash::ContentHasher;
use updraft_core::model::UpdateState;
use updraft_core::package::Package;
use updraft_proto::v1::admin_server::Admin;
use updraft_proto::v1::{
    GetUpdateRequest, ListActivityRequest, ListActivityResponse, ListMachinesRequest, ListMachinesResponse,
    ListUpdatesRequest, ListUpdatesResponse, SetPriorityRequest, SetUpdateStateRequest, Update, UploadChunk,
    upload_chunk,
};

use crate::Shared;
use crate::blobs::append;
use crate::catalog::record_from_manifest;
use crate::error::{ProviderError, Result};

pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    async fn import(&self, mut stream: Streaming<UploadChunk>) -> Result<Update> {
        let limit = self.shared.config.max_upload_bytes;
        let header = match stream.next().await {
            Some(Ok(UploadChunk { part: Some(upload_chunk::Part::Header(h)) })) => h,
            Some(Err(e)) => return Err(ProviderError::InvalidArgument(format!("upload failed: {}", e.message()))),
            _ => return Err(ProviderError::InvalidArgument("upload must start with a header".into())),
        };
        if header.size > limit {
            return Err(ProviderError::LimitReached(format!(
                "{}: {} bytes exceeds the upload limit of {limit} bytes",
                header.file_name, header.size
            )));
        }
        let tmp = self.shared.blobs.incoming()?;
        let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(|e| ProviderError::Io(e.to_string()))?);
        let mut hasher = ContentHasher::new();
        let mut received = 0u64;
        while let Some(msg) = stream.next().await {
            let msg =
                msg.map_err(|e| ProviderError::InvalidArgument(format!("upload interrupted: {}", e.message())))?;
            let Some(upload_chunk::Part::Data(data)) = msg.part else {
                return Err(ProviderError::InvalidArgument("a second header in one upload".into()));
            };
            received += data.len() as u64;
            if received > header.size {
                return Err(ProviderError::InvalidArgument(format!(
                    "{}: more data than the {} bytes announced",
                    header.file_name, header.size
                )));
            }
            hasher.update(&data);
            append(&mut file, &data).await?;
        }
        if received != header.size {
            return Err(ProviderError::InvalidArgument(format!(
                "{}: upload ended after {received} of {} bytes",
                header.file_name, header.size
            )));
        }
        file.sync_all().await.map_err(|e| ProviderError::Io(e.to_string()))?;
        drop(file);
        let content_hash = hasher.finish();

        // Parse and check the package on the blocking pool: it reads the whole manifest.
        let path = tmp.path().to_path_buf();
        let name = header.file_name.clone();
        let trusted = self.shared.config.trusted_keys.clone();
        let (manifest, verified) = tokio::task::spawn_blocking(move || -> Result<_> {
            let pkg = Package::open(&path).map_err(|e| ProviderError::InvalidArgument(format!("{name}: {e}")))?;
            let verified = if trusted.is_empty() {
                false
            } else if trusted.iter().any(|k| pkg.verify(k).is_ok()) {
                true
            } else {
                return Err(ProviderError::InvalidArgument(format!(
                    "{name}: signed by key {} which this provider does not trust",
                    pkg.manifest.key_id
                )));
            };
            Ok((pkg.manifest, verified))
        })
        .await
        .map_err(|e| ProviderError::Io(e.to_string()))??;

        let existing = self.shared.store.list_updates()?;
        let version = manifest.version.to_string();
        if let Some(dup) = existing.iter().find(|u| u.product == manifest.product && u.version == version) {
            return Err(ProviderError::Duplicate { product: dup.product.clone(), version, id: dup.id.clone() });
        }
        let now = crate::now_ms() / 1000;
        let rec = record_from_manifest(&manifest, &content_hash, received, verified, now);
        self.shared.blobs.commit(tmp.path(), &content_hash).await?;
        let stored = self.shared.store.change_update(&rec.id.clone(), Some(rec), |_| Ok(())).await?;
        self.shared.hub.publish(&stored);
        tracing::info!(id = %stored.id, size = received, verified, "imported update");
        Ok(stored)
    }

    /// Applies `change` to every id, after checking that all of them exist.
    async fn change_many(&self, ids: &[String], change: impl Fn(&mut Update) -> Result<()>) -> Result<Vec<Update>> {
        if ids.is_empty() {
            return Err(ProviderError::InvalidArgument("no update ids given".into()));
        }
        for id in ids {
            self.shared.store.get_update(id)?;
        }
        let mut out = Vec::new();
        for id in ids {
            let u = self.shared.store.change_update(id, None, &change).await?;
            self.shared.hub.publish(&u);
            out.push(u);
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_update(&self, request: Request<Streaming<UploadChunk>>) -> Result<Response<Update>, Status> {
        Ok(Response::new(self.import(request.into_inner()).await?))
    }

    async fn list_updates(
        &self,
        request: Request<ListUpdatesRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let req = request.into_inner();
        let mut updates: Vec<Update> = self
            .shared
            .store
            .list_updates()?
            .into_iter()
            .filter(|u| req.product.is_empty() || u.product == req.product)
            .filter(|u| req.state == 0 || u.state == req.state)
            .collect();
        updates.sort_by(|a, b| {
            let va = a.version.parse::<updraft_core::Version>().ok();
            let vb = b.version.parse::<updraft_core::Version>().ok();
            (&a.product, va).cmp(&(&b.product, vb))
        });
        Ok(Response::new(ListUpdatesResponse { updates }))
    }

    async fn get_update(&self, request: Request<GetUpdateRequest>) -> Result<Response<Update>, Status> {
        Ok(Response::new(self.shared.store.get_update(&request.into_inner().id)?))
    }

    async fn set_update_state(
        &self,
        request: Request<SetUpdateStateRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let req = request.into_inner();
        let state = UpdateState::from_wire(req.state).ok_or_else(|| {
            ProviderError::InvalidArgument(format!("unknown state number {}; expected {}", req.state, UpdateState::ALL))
        })?;
        let updates = self
            .change_many(&req.ids, |u| {
                u.state = state.to_wire();
                Ok(())
            })
            .await?;
        tracing::info!(ids = ?req.ids, %state, "state changed");
        Ok(Response::new(ListUpdatesResponse { updates }))
    }

    async fn set_priority(
        &self,
        request: Request<SetPriorityRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let req = request.into_inner();
        let updates = self
            .change_many(&req.ids, |u| {
                u.high_priority = req.high;
                Ok(())
            })
            .await?;
        tracing::info!(ids = ?req.ids, high = req.high, subscribers = self.shared.hub.push_subscribers(), "priority changed");
        Ok(Response::new(ListUpdatesResponse { updates }))
    }

    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        let f = request.into_inner().filter.to_lowercase();
        let machines = self
            .shared
            .store
            .list_machines()?
            .into_iter()
            .filter(|m| {
                f.is_empty()
                    || m.info.as_ref().is_some_and(|i| {
                        i.name.to_lowercase().contains(&f) || i.addresses.iter().any(|a| a.contains(&f))
                    })
            })
            .collect();
        Ok(Response::new(ListMachinesResponse { machines }))
    }

    async fn list_activity(
        &self,
        request: Request<ListActivityRequest>,
    ) -> Result<Response<ListActivityResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 { 100 } else { req.limit.min(10_000) } as usize;
        let activities = self.shared.store.list_activity(&req.machine, &req.update_id, limit)?;
        Ok(Response::new(ListActivityResponse { activities }))
    }
}
