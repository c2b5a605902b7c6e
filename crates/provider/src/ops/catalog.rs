//! The catalog half of the admin operations: importing packages, the updates' states,
//! priorities, prestaging, relations, caps and deletions, and the watched folders. Each change
//! validates all of its input before it changes anything and is logged with who made it.
use std::path::Path;

use updraft_core::model::{InstallType, UpdateState, validate_product};
use updraft_core::plan::release_key;
use updraft_proto::v1::{
    DeleteUpdatesRequest, GetUpdateRequest, ImportPendingRequest, ImportPendingResponse, ListCapsResponse,
    ListPendingRequest, ListPendingResponse, ListUpdatesRequest, ListUpdatesResponse, ListWatchesResponse,
    PrestageRequest, ProductLineCap, RelatedInstallsRequest, RemoveWatchRequest, SetPriorityRequest,
    SetUpdateStateRequest, Update, UpdateDetail, UploadHeader, WatchFolder,
};
use updraft_proto::v1::{PreviewRolloutRequest, RolloutPreview, SitePreview, WavePreview};

use super::Ops;
use crate::catalog::{caps_map, dependents, ga_patch_warnings, install_type_of, item_of, status_of};
use crate::error::{ProviderError, Result};
use crate::import::{self, Receiver, record_catalog_activity};
use crate::policy;
use crate::scanner;

fn sort_updates(us: &mut [Update]) {
    us.sort_by(|a, b| {
        let va = a.version.parse::<updraft_core::Version>().ok();
        let vb = b.version.parse::<updraft_core::Version>().ok();
        (&a.product, va).cmp(&(&b.product, vb))
    });
}

impl Ops {
    /// Accepts the start of an upload of `header.size` bytes, within the upload limit and the
    /// room on disk; the caller feeds the bytes to the receiver and then calls
    /// [`Ops::finish_upload`].
    pub fn start_upload(&self, header: &UploadHeader) -> Result<Receiver> {
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
        Receiver::new(&self.shared)
    }

    /// Adds `data` to an upload, refusing more than its header announced.
    pub async fn upload_data(&self, header: &UploadHeader, rx: &mut Receiver, data: &[u8]) -> Result<()> {
        if rx.received() + data.len() as u64 > header.size {
            return Err(ProviderError::InvalidArgument(format!(
                "{}: more data than the {} bytes announced",
                header.file_name, header.size
            )));
        }
        rx.push(data).await
    }

    /// Checks the received package and adds it to the catalog.
    pub async fn finish_upload(&self, who: &str, header: &UploadHeader, rx: Receiver) -> Result<Update> {
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
        let statuses =
            updates.iter().map(|u| Ok(status_of(u, &fleet, &caps, &self.outcomes(u)?))).collect::<Result<_>>()?;
        let warnings = ga_patch_warnings(&catalog.updates);
        Ok(ListUpdatesResponse { updates, statuses, warnings })
    }

    /// What the machines that reported on `u` last did with it.
    fn outcomes(&self, u: &Update) -> Result<Vec<updraft_core::rollout::Outcome>> {
        Ok(self.shared.store.outcomes_of(&u.id)?.into_iter().map(|(_, o, _)| o).collect())
    }

    fn watches(&self) -> Result<ListWatchesResponse> {
        Ok(ListWatchesResponse { folders: self.shared.store.list_watches()? })
    }

    pub async fn list_updates(&self, req: ListUpdatesRequest) -> Result<ListUpdatesResponse> {
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
        self.listing(updates)
    }

    /// Who would take an update in each wave of a rollout, and what each site would fetch (see
    /// `updraft_core::rollout`): read-only, for before anything happens.
    pub async fn preview_rollout(&self, req: PreviewRolloutRequest) -> Result<RolloutPreview> {
        use updraft_core::rollout::{Waves, pct};
        let waves: Waves = if req.waves.trim().is_empty() { "1%,10%,50%,100%".parse()? } else { req.waves.parse()? };
        let u = self.shared.store.get_update(&req.update_id)?;
        let catalog = self.shared.catalog()?;
        let group = (!req.group.is_empty()).then_some(req.group.as_str());
        if let Some(g) = group
            && g != crate::store::DEFAULT_GROUP
            && self.shared.store.get_group(g)?.is_none()
        {
            return Err(ProviderError::NotFound(format!("no group {g:?}")));
        }
        let takers = policy::takers(&self.shared.store, &catalog, &u, group)?;
        let mut per_wave = vec![0u32; waves.len()];
        let mut sites: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
        for (name, via) in &takers {
            let wave = waves.wave_of(&u.id, name);
            per_wave[wave] += 1;
            let site = if via.is_empty() { "direct".to_string() } else { via.clone() };
            sites.entry(site).or_insert_with(|| vec![0; waves.len()])[wave] += 1;
        }
        let mut cumulative = 0;
        let per_wave = per_wave
            .iter()
            .enumerate()
            .map(|(i, n)| {
                cumulative += n;
                WavePreview { wave: i as u32 + 1, share: pct(waves.share(i)), machines: *n, cumulative }
            })
            .collect();
        let sites = sites
            .into_iter()
            .map(|(site, counts)| {
                let first = counts.iter().position(|n| *n > 0).map_or(0, |i| i as u32 + 1);
                // The centre serves its own machines; a site fetches the package once.
                let wan_bytes = if site == "direct" || first == 0 { 0 } else { u.size };
                SitePreview { site, machines_per_wave: counts, wan_bytes, first_wave: first }
            })
            .collect();
        Ok(RolloutPreview {
            update_id: u.id.clone(),
            waves: waves.to_string(),
            size: u.size,
            machines: takers.len() as u32,
            per_wave,
            sites,
        })
    }

    pub async fn get_update(&self, req: GetUpdateRequest) -> Result<UpdateDetail> {
        let u = self.shared.store.get_update(&req.id)?;
        let catalog = self.shared.catalog()?;
        let fleet = policy::fleet_plans(&self.shared.store, &catalog)?;
        let status = status_of(&u, &fleet, &caps_map(&catalog.caps), &self.outcomes(&u)?);
        Ok(UpdateDetail { update: Some(u), status: Some(status) })
    }

    pub async fn set_update_state(&self, who: &str, req: SetUpdateStateRequest) -> Result<ListUpdatesResponse> {
        let state = UpdateState::from_wire(req.state).ok_or_else(|| {
            ProviderError::InvalidArgument(format!("unknown state number {}; expected {}", req.state, UpdateState::ALL))
        })?;
        let mut changed = self
            .change_many(&req.ids, |u| {
                u.state = state.to_wire();
                Ok(())
            })
            .await?;
        self.log_each(who, &changed, |_| format!("state set to {state}")).await?;
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
                self.log_each(who, &retired, |_| "retired to inactive by a newer GA patch".into()).await?;
                changed.extend(retired);
            }
        }
        tracing::info!(ids = ?req.ids, %state, %who, "state changed");
        self.listing(changed)
    }

    pub async fn set_priority(&self, who: &str, req: SetPriorityRequest) -> Result<ListUpdatesResponse> {
        let updates = self
            .change_many(&req.ids, |u| {
                u.high_priority = req.high;
                Ok(())
            })
            .await?;
        self.log_each(who, &updates, |_| {
            if req.high { "marked high priority".into() } else { "priority back to normal".into() }
        })
        .await?;
        tracing::info!(ids = ?req.ids, high = req.high, subscribers = self.shared.hub.push_subscribers(), "priority changed");
        self.listing(updates)
    }

    pub async fn prestage(&self, who: &str, req: PrestageRequest) -> Result<ListUpdatesResponse> {
        let updates = self
            .change_many(&req.ids, |u| {
                u.prestage = !req.off;
                Ok(())
            })
            .await?;
        self.log_each(who, &updates, |_| if req.off { "prestage off".into() } else { "prestaged to sites".into() })
            .await?;
        self.listing(updates)
    }

    pub async fn delete_updates(&self, who: &str, req: DeleteUpdatesRequest) -> Result<ListUpdatesResponse> {
        if req.ids.is_empty() {
            return Err(ProviderError::InvalidArgument("no update ids given".into()));
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
                )));
            }
            doomed.push(u);
        }
        for u in &doomed {
            self.shared.store.delete_update(&u.id).await?;
            record_catalog_activity(
                &self.shared,
                who,
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
        Ok(ListUpdatesResponse { updates: doomed, statuses: vec![], warnings: vec![] })
    }

    pub async fn set_related_installs(&self, who: &str, req: RelatedInstallsRequest) -> Result<ListUpdatesResponse> {
        for p in &req.products {
            validate_product(p).map_err(ProviderError::from)?;
        }
        if !req.remove && req.products.is_empty() {
            return Err(ProviderError::InvalidArgument("name at least one product to install alongside".into()));
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
        self.log_each(who, &updates, |u| format!("related installs now [{}]", u.related_installs.join(", "))).await?;
        self.listing(updates)
    }

    pub async fn set_cap(&self, who: &str, req: ProductLineCap) -> Result<ListCapsResponse> {
        let mut cap = req;
        if cap.product_line.is_empty() {
            return Err(ProviderError::InvalidArgument("a product line is required".into()));
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
        record_catalog_activity(&self.shared, who, None, what).await?;
        Ok(ListCapsResponse { caps: self.shared.store.list_caps()? })
    }

    pub async fn list_caps(&self) -> Result<ListCapsResponse> {
        Ok(ListCapsResponse { caps: self.shared.store.list_caps()? })
    }

    pub async fn add_watch(&self, who: &str, req: WatchFolder) -> Result<ListWatchesResponse> {
        let path = scanner::normalise_folder(&req.path)?;
        scanner::check_not_data(&path, &self.shared.config.data_dir)?;
        scanner::check_not_data(&path, &self.shared.config.content_dir())?;
        scanner::check_writable(&path)?;
        let folder = WatchFolder { path: path.to_string_lossy().into_owned(), auto: req.auto };
        self.shared.store.add_watch(&folder).await?;
        let mode = if folder.auto { "auto" } else { "manual" };
        record_catalog_activity(&self.shared, who, None, format!("watching {} ({mode})", folder.path)).await?;
        self.watches()
    }

    pub async fn remove_watch(&self, who: &str, req: RemoveWatchRequest) -> Result<ListWatchesResponse> {
        let path = req.path;
        // Accept the path as given or as it normalises, so a relative spelling still matches.
        let canon = scanner::normalise_folder(&path).map(|p| p.to_string_lossy().into_owned()).unwrap_or(path.clone());
        let removed = self.shared.store.remove_watch(&canon).await? || self.shared.store.remove_watch(&path).await?;
        if !removed {
            return Err(ProviderError::InvalidArgument(format!("{path:?} is not a watched folder")));
        }
        record_catalog_activity(&self.shared, who, None, format!("stopped watching {canon}")).await?;
        self.watches()
    }

    pub async fn list_watches(&self) -> Result<ListWatchesResponse> {
        self.watches()
    }

    pub async fn list_pending(&self, req: ListPendingRequest) -> Result<ListPendingResponse> {
        let path = req.path;
        let mut files = Vec::new();
        let folders = self.shared.store.list_watches()?;
        let wanted =
            if path.is_empty() { None } else { Some(scanner::normalise_folder(&path)?.to_string_lossy().into_owned()) };
        if let Some(w) = &wanted
            && !folders.iter().any(|f| &f.path == w)
        {
            return Err(ProviderError::InvalidArgument(format!("{path:?} is not a watched folder")));
        }
        for f in folders.iter().filter(|f| wanted.as_ref().is_none_or(|w| &f.path == w)) {
            files.extend(scanner::pending_in(f)?);
        }
        Ok(ListPendingResponse { files })
    }

    pub async fn import_pending(&self, who: &str, req: ImportPendingRequest) -> Result<ImportPendingResponse> {
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
                scanner::import_one(&self.shared, Path::new(&folder), Path::new(&file), self.scan.quiet, who).await,
            );
        }
        Ok(ImportPendingResponse { results })
    }
}
