//! The administration API: importing packages, the catalog's states, priorities, relations,
//! caps and deletions, watched folders, machines and activity. Every change validates all of
//! its input before it changes anything, and is logged with who made it.
use std::path::Path;
use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use updraft_core::model::{InstallType, UpdateState, validate_product};
use updraft_core::plan::release_key;
use updraft_proto::v1::admin_server::Admin;
use updraft_proto::v1::{
    AssignRequest, ClearActivityRequest, ClearActivityResponse, DeleteUpdatesRequest, Discovery, FleetReport,
    GetDiscoveryRequest, GetGroupRequest, GetMachineRequest, GetPairRequest, GetUpdateRequest, GroupDetail,
    ImportPendingRequest, ImportPendingResponse, ListActivityRequest, ListActivityResponse, ListCapsRequest,
    ListCapsResponse, ListGroupsRequest, ListGroupsResponse, ListMachinesRequest, ListMachinesResponse,
    ListPeersRequest, ListPeersResponse, ListPendingRequest, ListPendingResponse, ListUpdatesRequest,
    ListUpdatesResponse, ListWatchesRequest, ListWatchesResponse, MachineDetail, PairReply, Peer, PinRequest,
    PrestageRequest, ProductLineCap, PutGroupRequest, RelatedInstallsRequest, RemoveGroupRequest, RemovePeerRequest,
    RemoveWatchRequest, ReportRequest2, SetPriorityRequest, SetUpdateStateRequest, Update, UpdateDetail, UploadChunk,
    WatchFolder, upload_chunk,
};
use updraft_proto::v1::{
    DeployRequest, ForgetMachineRequest, ForgetMachineResponse, ListAuditRequest, ListAuditResponse,
    ListDeploymentsRequest, ListDeploymentsResponse, ListUsersRequest, ListUsersResponse, RemoveUserRequest,
    SetRoleRequest, User,
};

use crate::Shared;
use crate::catalog::{caps_map, dependents, ga_patch_warnings, install_type_of, item_of, status_of};
use crate::error::{ProviderError, Result};
use crate::import::{self, Receiver, record_catalog_activity};
use crate::policy;
use crate::scanner::{self, ScanConfig};

pub struct AdminService {
    pub(crate) shared: Arc<Shared>,
    scan: ScanConfig,
}

/// Who is asking: the name and role in the caller's certificate (see `auth`), or, on a
/// plaintext (`--insecure`) provider, what admin-cli claims.
pub(crate) fn who<T>(req: &Request<T>) -> String {
    if let Some(c) = crate::auth::Caller::of(req) {
        return c.describe();
    }
    let user = req
        .metadata()
        .get("x-updraft-user")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().filter(|c| !c.is_control()).take(64).collect::<String>())
        .unwrap_or_else(|| "unknown".into());
    match req.remote_addr() {
        Some(a) => format!("{user} ({a})"),
        None => user,
    }
}

impl AdminService {
    pub fn new(shared: Arc<Shared>, scan: ScanConfig) -> Self {
        Self { shared, scan }
    }

    /// Refuses a change that would leave no admin (no one could manage users any more short
    /// of restarting the provider with --bootstrap-admin).
    fn guard_last_admin(&self, name: &str, new_role: &str) -> Result<()> {
        let users = self.shared.store.list_users()?;
        let admins: Vec<&User> = users.iter().filter(|u| u.role == "admin").collect();
        if new_role != "admin" && admins.len() == 1 && admins[0].name == name {
            return Err(ProviderError::InvalidArgument(format!("{name} is the last admin; add another admin first")));
        }
        Ok(())
    }

    async fn upload(&self, mut stream: Streaming<UploadChunk>, who: &str) -> Result<Update> {
        let header = match stream.next().await {
            Some(Ok(UploadChunk { part: Some(upload_chunk::Part::Header(h)) })) => h,
            Some(Err(e)) => return Err(ProviderError::InvalidArgument(format!("upload failed: {}", e.message()))),
            _ => return Err(ProviderError::InvalidArgument("upload must start with a header".into())),
        };
        let limit = self.shared.config.max_upload_bytes;
        if header.size > limit {
            return Err(ProviderError::LimitReached(format!(
                "{}: {} bytes exceeds the upload limit of {limit} bytes",
                header.file_name, header.size
            )));
        }
        updraft_runtime::ensure_room(
            &self.shared.config.content_dir(),
            header.size,
            self.shared.config.disk_reserve_bytes,
        )
        .map_err(ProviderError::LimitReached)?;
        let mut rx = Receiver::new(&self.shared)?;
        while let Some(msg) = stream.next().await {
            let msg =
                msg.map_err(|e| ProviderError::InvalidArgument(format!("upload interrupted: {}", e.message())))?;
            let Some(upload_chunk::Part::Data(data)) = msg.part else {
                return Err(ProviderError::InvalidArgument("a second header in one upload".into()));
            };
            if rx.received() + data.len() as u64 > header.size {
                return Err(ProviderError::InvalidArgument(format!(
                    "{}: more data than the {} bytes announced",
                    header.file_name, header.size
                )));
            }
            rx.push(&data).await?;
        }
        if rx.received() != header.size {
            return Err(ProviderError::InvalidArgument(format!(
                "{}: upload ended after {} of {} bytes",
                header.file_name,
                rx.received(),
                header.size
            )));
        }
        import::commit(&self.shared, rx.finish().await?, &header.file_name, who).await
    }

    /// Checks that every id exists, then applies `change` to each and publishes it.
    async fn change_many(&self, ids: &[String], change: impl Fn(&mut Update) -> Result<()>) -> Result<Vec<Update>> {
        if ids.is_empty() {
            return Err(ProviderError::InvalidArgument("no update ids given".into()));
        }
        let mut probe = Vec::new();
        for id in ids {
            let mut u = self.shared.store.get_update(id)?;
            change(&mut u)?; // a change that would fail for one id fails before any is made
            probe.push(u);
        }
        let mut out = Vec::new();
        for id in ids {
            let u = self.shared.store.change_update(id, None, &change).await?;
            out.push(u);
        }
        Ok(out)
    }

    async fn log_each(&self, who: &str, updates: &[Update], what: impl Fn(&Update) -> String) -> Result<()> {
        for u in updates {
            record_catalog_activity(&self.shared, who, Some(u), what(u)).await?;
        }
        Ok(())
    }

    fn listing(&self, updates: Vec<Update>) -> Result<ListUpdatesResponse> {
        let catalog = self.shared.catalog()?;
        let fleet = policy::fleet_plans(&self.shared.store, &catalog)?;
        let caps = caps_map(&catalog.caps);
        let statuses = updates.iter().map(|u| status_of(u, &fleet, &caps)).collect();
        let warnings = ga_patch_warnings(&catalog.updates);
        Ok(ListUpdatesResponse { updates, statuses, warnings })
    }

    fn watches(&self) -> Result<ListWatchesResponse> {
        Ok(ListWatchesResponse { folders: self.shared.store.list_watches()? })
    }
}

fn sort_updates(us: &mut [Update]) {
    us.sort_by(|a, b| {
        let va = a.version.parse::<updraft_core::Version>().ok();
        let vb = b.version.parse::<updraft_core::Version>().ok();
        (&a.product, va).cmp(&(&b.product, vb))
    });
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_update(&self, request: Request<Streaming<UploadChunk>>) -> Result<Response<Update>, Status> {
        let who = who(&request);
        Ok(Response::new(self.upload(request.into_inner(), &who).await?))
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
            .filter(|u| req.product_line.is_empty() || u.product_line == req.product_line)
            .filter(|u| req.state == 0 || u.state == req.state)
            .collect();
        sort_updates(&mut updates);
        Ok(Response::new(self.listing(updates)?))
    }

    async fn get_update(&self, request: Request<GetUpdateRequest>) -> Result<Response<UpdateDetail>, Status> {
        let u = self.shared.store.get_update(&request.into_inner().id)?;
        let catalog = self.shared.catalog()?;
        let fleet = policy::fleet_plans(&self.shared.store, &catalog)?;
        let status = status_of(&u, &fleet, &caps_map(&catalog.caps));
        Ok(Response::new(UpdateDetail { update: Some(u), status: Some(status) }))
    }

    async fn set_update_state(
        &self,
        request: Request<SetUpdateStateRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let state = UpdateState::from_wire(req.state).ok_or_else(|| {
            ProviderError::InvalidArgument(format!("unknown state number {}; expected {}", req.state, UpdateState::ALL))
        })?;
        let mut changed = self
            .change_many(&req.ids, |u| {
                u.state = state.to_wire();
                Ok(())
            })
            .await?;
        self.log_each(&who, &changed, |_| format!("state set to {state}")).await?;
        if req.retire_older && state == UpdateState::Ga {
            // Older GA patches of the same release as each newly GA patch become inactive.
            let all = self.shared.store.list_updates()?;
            let mut retire = Vec::new();
            for u in changed.iter().filter(|u| install_type_of(u) != InstallType::Install) {
                let Some(item) = item_of(u) else { continue };
                for o in &all {
                    if let Some(oi) = item_of(o)
                        && o.product == u.product
                        && oi.install_type != InstallType::Install
                        && oi.state == UpdateState::Ga
                        && oi.version < item.version
                        && release_key(&o.product_code, oi.version) == item.release_key()
                        && !retire.contains(&o.id)
                    {
                        retire.push(o.id.clone());
                    }
                }
            }
            if !retire.is_empty() {
                let retired = self
                    .change_many(&retire, |u| {
                        u.state = UpdateState::Inactive.to_wire();
                        Ok(())
                    })
                    .await?;
                self.log_each(&who, &retired, |_| "retired to inactive by a newer GA patch".into()).await?;
                changed.extend(retired);
            }
        }
        tracing::info!(ids = ?req.ids, %state, %who, "state changed");
        Ok(Response::new(self.listing(changed)?))
    }

    async fn set_priority(
        &self,
        request: Request<SetPriorityRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let updates = self
            .change_many(&req.ids, |u| {
                u.high_priority = req.high;
                Ok(())
            })
            .await?;
        self.log_each(&who, &updates, |_| {
            if req.high { "marked high priority".into() } else { "priority back to normal".into() }
        })
        .await?;
        tracing::info!(ids = ?req.ids, high = req.high, subscribers = self.shared.hub.push_subscribers(), "priority changed");
        Ok(Response::new(self.listing(updates)?))
    }

    async fn prestage(&self, request: Request<PrestageRequest>) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let updates = self
            .change_many(&req.ids, |u| {
                u.prestage = !req.off;
                Ok(())
            })
            .await?;
        self.log_each(&who, &updates, |_| if req.off { "prestage off".into() } else { "prestaged to sites".into() })
            .await?;
        Ok(Response::new(self.listing(updates)?))
    }

    async fn delete_updates(
        &self,
        request: Request<DeleteUpdatesRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        if req.ids.is_empty() {
            return Err(ProviderError::InvalidArgument("no update ids given".into()).into());
        }
        let machines = self.shared.store.list_machines()?;
        let mut doomed = Vec::new();
        for id in &req.ids {
            let u = self.shared.store.get_update(id)?;
            let deps = dependents(&u, &machines);
            if !deps.is_empty() && !req.force {
                return Err(ProviderError::InvalidArgument(format!(
                    "{id} is installed on, or kept for rollback by, {} machine(s) ({}); mark it remove or inactive instead, or pass --force",
                    deps.len(),
                    deps.iter().take(5).copied().collect::<Vec<_>>().join(", ")
                ))
                .into());
            }
            doomed.push(u);
        }
        for u in &doomed {
            self.shared.store.delete_update(&u.id).await?;
            record_catalog_activity(
                &self.shared,
                &who,
                Some(u),
                if req.force { "deleted (forced)".into() } else { "deleted".into() },
            )
            .await?;
        }
        // A blob goes once no remaining update uses it.
        let remaining = self.shared.store.list_updates()?;
        for u in &doomed {
            if !remaining.iter().any(|r| r.content_hash == u.content_hash)
                && let Ok(p) = self.shared.blobs.path_of(&u.content_hash)
            {
                let _ = tokio::fs::remove_file(p).await;
            }
        }
        Ok(Response::new(ListUpdatesResponse { updates: doomed, statuses: vec![], warnings: vec![] }))
    }

    async fn set_related_installs(
        &self,
        request: Request<RelatedInstallsRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        for p in &req.products {
            validate_product(p).map_err(ProviderError::from)?;
        }
        if !req.remove && req.products.is_empty() {
            return Err(ProviderError::InvalidArgument("name at least one product to install alongside".into()).into());
        }
        let updates = self
            .change_many(&req.ids, |u| {
                if req.remove {
                    if req.products.is_empty() {
                        u.related_installs.clear();
                    } else {
                        u.related_installs.retain(|r| !req.products.contains(r));
                    }
                } else {
                    for p in &req.products {
                        if p == &u.product {
                            return Err(ProviderError::InvalidArgument(format!(
                                "{} cannot be related to itself",
                                u.id
                            )));
                        }
                        if !u.related_installs.contains(p) {
                            u.related_installs.push(p.clone());
                        }
                    }
                }
                Ok(())
            })
            .await?;
        self.log_each(&who, &updates, |u| format!("related installs now [{}]", u.related_installs.join(", "))).await?;
        Ok(Response::new(self.listing(updates)?))
    }

    async fn set_cap(&self, request: Request<ProductLineCap>) -> Result<Response<ListCapsResponse>, Status> {
        let who = who(&request);
        let mut cap = request.into_inner();
        if cap.product_line.is_empty() {
            return Err(ProviderError::InvalidArgument("a product line is required".into()).into());
        }
        if !cap.version.is_empty() {
            cap.version.parse::<updraft_core::Version>().map_err(ProviderError::from)?;
        }
        if !cap.follow_role.is_empty() {
            let role: updraft_core::model::Role = cap.follow_role.parse().map_err(ProviderError::from)?;
            cap.follow_role = role.as_str().to_string();
        }
        // The ceiling is the centre's to compute, never a caller's to set.
        cap.ceiling = String::new();
        self.shared.store.set_cap(&cap).await?;
        crate::ceiling::refresh(&self.shared).await?;
        let mut what = match (cap.version.is_empty(), cap.follow_role.is_empty()) {
            (true, true) => format!("product line {:?} uncapped", cap.product_line),
            (false, _) => format!("product line {:?} capped at {}", cap.product_line, cap.version),
            (true, false) => format!("product line {:?}", cap.product_line),
        };
        if !cap.follow_role.is_empty() {
            what.push_str(&format!(" follows role {}", cap.follow_role));
        }
        record_catalog_activity(&self.shared, &who, None, what).await?;
        Ok(Response::new(ListCapsResponse { caps: self.shared.store.list_caps()? }))
    }

    async fn list_caps(&self, _request: Request<ListCapsRequest>) -> Result<Response<ListCapsResponse>, Status> {
        Ok(Response::new(ListCapsResponse { caps: self.shared.store.list_caps()? }))
    }

    async fn add_watch(&self, request: Request<WatchFolder>) -> Result<Response<ListWatchesResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let path = scanner::normalise_folder(&req.path)?;
        scanner::check_not_data(&path, &self.shared.config.data_dir)?;
        scanner::check_not_data(&path, &self.shared.config.content_dir())?;
        scanner::check_writable(&path)?;
        let folder = WatchFolder { path: path.to_string_lossy().into_owned(), auto: req.auto };
        self.shared.store.add_watch(&folder).await?;
        let mode = if folder.auto { "auto" } else { "manual" };
        record_catalog_activity(&self.shared, &who, None, format!("watching {} ({mode})", folder.path)).await?;
        Ok(Response::new(self.watches()?))
    }

    async fn remove_watch(
        &self,
        request: Request<RemoveWatchRequest>,
    ) -> Result<Response<ListWatchesResponse>, Status> {
        let who = who(&request);
        let path = request.into_inner().path;
        // Accept the path as given or as it normalises, so a relative spelling still matches.
        let canon = scanner::normalise_folder(&path).map(|p| p.to_string_lossy().into_owned()).unwrap_or(path.clone());
        let removed = self.shared.store.remove_watch(&canon).await? || self.shared.store.remove_watch(&path).await?;
        if !removed {
            return Err(ProviderError::InvalidArgument(format!("{path:?} is not a watched folder")).into());
        }
        record_catalog_activity(&self.shared, &who, None, format!("stopped watching {canon}")).await?;
        Ok(Response::new(self.watches()?))
    }

    async fn list_watches(
        &self,
        _request: Request<ListWatchesRequest>,
    ) -> Result<Response<ListWatchesResponse>, Status> {
        Ok(Response::new(self.watches()?))
    }

    async fn list_pending(
        &self,
        request: Request<ListPendingRequest>,
    ) -> Result<Response<ListPendingResponse>, Status> {
        let path = request.into_inner().path;
        let mut files = Vec::new();
        let folders = self.shared.store.list_watches()?;
        let wanted =
            if path.is_empty() { None } else { Some(scanner::normalise_folder(&path)?.to_string_lossy().into_owned()) };
        if let Some(w) = &wanted
            && !folders.iter().any(|f| &f.path == w)
        {
            return Err(ProviderError::InvalidArgument(format!("{path:?} is not a watched folder")).into());
        }
        for f in folders.iter().filter(|f| wanted.as_ref().is_none_or(|w| &f.path == w)) {
            files.extend(scanner::pending_in(f)?);
        }
        Ok(Response::new(ListPendingResponse { files }))
    }

    async fn import_pending(
        &self,
        request: Request<ImportPendingRequest>,
    ) -> Result<Response<ImportPendingResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let mut targets = Vec::new();
        if req.files.is_empty() {
            for f in self.shared.store.list_watches()?.into_iter().filter(|f| !f.auto) {
                for p in scanner::pending_in(&f)? {
                    targets.push((f.path.clone(), p.path));
                }
            }
        } else {
            // Resolve every name first: one outside the watched folders refuses the request.
            for file in &req.files {
                let (folder, path) = scanner::resolve(&self.shared, file)?;
                targets.push((folder.path, path.to_string_lossy().into_owned()));
            }
        }
        let mut results = Vec::new();
        for (folder, file) in targets {
            results.push(
                scanner::import_one(&self.shared, Path::new(&folder), Path::new(&file), self.scan.quiet, &who).await,
            );
        }
        Ok(Response::new(ImportPendingResponse { results }))
    }

    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        Ok(Response::new(self.do_list_machines(request.into_inner()).await?))
    }

    async fn get_machine(&self, request: Request<GetMachineRequest>) -> Result<Response<MachineDetail>, Status> {
        Ok(Response::new(self.do_get_machine(request.into_inner()).await?))
    }

    async fn put_group(&self, request: Request<PutGroupRequest>) -> Result<Response<GroupDetail>, Status> {
        Ok(Response::new(self.do_put_group(request).await?))
    }

    async fn remove_group(&self, request: Request<RemoveGroupRequest>) -> Result<Response<ListGroupsResponse>, Status> {
        Ok(Response::new(self.do_remove_group(request).await?))
    }

    async fn list_groups(&self, _request: Request<ListGroupsRequest>) -> Result<Response<ListGroupsResponse>, Status> {
        Ok(Response::new(self.do_list_groups().await?))
    }

    async fn get_group(&self, request: Request<GetGroupRequest>) -> Result<Response<GroupDetail>, Status> {
        Ok(Response::new(self.do_get_group(request.into_inner()).await?))
    }

    async fn assign(&self, request: Request<AssignRequest>) -> Result<Response<ListMachinesResponse>, Status> {
        Ok(Response::new(self.do_assign(request).await?))
    }

    async fn pin(&self, request: Request<PinRequest>) -> Result<Response<ListMachinesResponse>, Status> {
        Ok(Response::new(self.do_pin(request).await?))
    }

    async fn report(&self, request: Request<ReportRequest2>) -> Result<Response<FleetReport>, Status> {
        Ok(Response::new(self.do_report(request.into_inner()).await?))
    }

    async fn deploy(&self, request: Request<DeployRequest>) -> Result<Response<ListDeploymentsResponse>, Status> {
        Ok(Response::new(self.do_deploy(request).await?))
    }

    async fn list_deployments(
        &self,
        request: Request<ListDeploymentsRequest>,
    ) -> Result<Response<ListDeploymentsResponse>, Status> {
        Ok(Response::new(self.deployments(&request.into_inner().product)?))
    }

    async fn set_role(&self, request: Request<SetRoleRequest>) -> Result<Response<ListMachinesResponse>, Status> {
        Ok(Response::new(self.do_set_role(request).await?))
    }

    async fn forget_machine(
        &self,
        request: Request<ForgetMachineRequest>,
    ) -> Result<Response<ForgetMachineResponse>, Status> {
        Ok(Response::new(self.do_forget_machine(request).await?))
    }

    async fn get_pair(&self, _request: Request<GetPairRequest>) -> Result<Response<PairReply>, Status> {
        Ok(Response::new(self.do_get_pair()?))
    }

    async fn put_peer(&self, request: Request<Peer>) -> Result<Response<ListPeersResponse>, Status> {
        Ok(Response::new(self.do_put_peer(request).await?))
    }

    async fn remove_peer(&self, request: Request<RemovePeerRequest>) -> Result<Response<ListPeersResponse>, Status> {
        let request = request.map(|r| r.name);
        Ok(Response::new(self.do_remove_peer(request).await?))
    }

    async fn list_peers(&self, _request: Request<ListPeersRequest>) -> Result<Response<ListPeersResponse>, Status> {
        Ok(Response::new(self.peers()?))
    }

    async fn set_discovery(&self, request: Request<Discovery>) -> Result<Response<Discovery>, Status> {
        Ok(Response::new(self.do_set_discovery(request).await?))
    }

    async fn get_discovery(&self, _request: Request<GetDiscoveryRequest>) -> Result<Response<Discovery>, Status> {
        Ok(Response::new(self.shared.store.discovery()?))
    }

    async fn put_user(&self, request: Request<User>) -> Result<Response<ListUsersResponse>, Status> {
        let who = who(&request);
        let u = request.into_inner();
        let plain = !u.name.is_empty()
            && u.name.len() <= 64
            && u.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
        if !plain {
            return Err(ProviderError::InvalidArgument(format!(
                "user name {:?} must be 1-64 of A-Z a-z 0-9 . _ - @ (the name in their admin certificate)",
                u.name
            ))
            .into());
        }
        if !crate::auth::USER_ROLES.contains(&u.role.as_str()) {
            return Err(ProviderError::InvalidArgument(format!("role {:?} must be admin or viewer", u.role)).into());
        }
        self.guard_last_admin(&u.name, &u.role)?;
        self.shared.store.put_user(&u).await?;
        record_catalog_activity(&self.shared, &who, None, format!("user {} is {}", u.name, u.role)).await?;
        Ok(Response::new(ListUsersResponse { users: self.shared.store.list_users()? }))
    }

    async fn remove_user(&self, request: Request<RemoveUserRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let who = who(&request);
        let name = request.into_inner().name;
        if self.shared.store.get_user(&name)?.is_none() {
            return Err(ProviderError::InvalidArgument(format!("no user {name:?}")).into());
        }
        self.guard_last_admin(&name, "")?;
        self.shared.store.remove_user(&name).await?;
        record_catalog_activity(&self.shared, &who, None, format!("user {name} removed")).await?;
        Ok(Response::new(ListUsersResponse { users: self.shared.store.list_users()? }))
    }

    async fn list_users(&self, _request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        Ok(Response::new(ListUsersResponse { users: self.shared.store.list_users()? }))
    }

    async fn list_audit(&self, request: Request<ListAuditRequest>) -> Result<Response<ListAuditResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(ListAuditResponse { entries: self.shared.store.list_audit(r.after_seq, r.limit as usize)? }))
    }

    async fn clear_activity(
        &self,
        request: Request<ClearActivityRequest>,
    ) -> Result<Response<ClearActivityResponse>, Status> {
        Ok(Response::new(self.do_clear_activity(request).await?))
    }

    async fn list_activity(
        &self,
        request: Request<ListActivityRequest>,
    ) -> Result<Response<ListActivityResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 { 100 } else { req.limit.min(10_000) } as usize;
        let activities = self.shared.store.list_activity(&req.machine, &req.update_id, req.since_unix_ms, limit)?;
        Ok(Response::new(ListActivityResponse { activities }))
    }
}
