//! The fleet half of the admin API: groups, assignments, pins, machine detail, the status
//! report and activity clearing. Each refuses bad input before changing anything, publishes
//! its change to sites, and is logged with who made it.
use updraft_core::model::{Role, validate_product};
use updraft_core::policy::{Health, Mode};
use updraft_core::rollout::Outcome;
use updraft_proto::v1::{
    AssignRequest, Assignment, ClearActivityRequest, ClearActivityResponse, DeployRequest, Deployment, FleetReport,
    ForgetMachineRequest, ForgetMachineResponse, GetGroupRequest, GetMachineRequest, Group, GroupDetail, GroupSummary,
    ListDeploymentsRequest, ListDeploymentsResponse, ListGroupsResponse, ListMachinesRequest, ListMachinesResponse,
    Machine, MachineDetail, MachinePins, MachineRole, PinRequest, PutGroupRequest, RemoveGroupRequest, ReportGroup,
    ReportRequest2, SetRoleRequest, UpdateOutcomes,
};

use super::Ops;
use crate::error::{ProviderError, Result};
use crate::import::record_catalog_activity;
use crate::policy;
use crate::store::DEFAULT_GROUP;

/// Group names are shown everywhere and stored as keys: keep them short and plain.
fn validate_group_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProviderError::InvalidArgument(format!("group name {name:?} must be 1-64 of A-Z a-z 0-9 . _ -")))
    }
}

fn bad(msg: String) -> ProviderError {
    ProviderError::InvalidArgument(msg)
}

impl Ops {
    /// Every machine with its group, status and the reasons for it.
    fn assessed(&self) -> Result<Vec<Machine>> {
        let store = &self.shared.store;
        let catalog = self.shared.catalog()?;
        let silence = self.shared.silence();
        let certs = crate::certs::newest_by_name(&self.shared)?;
        let mut out = Vec::new();
        for mut m in store.list_machines()? {
            policy::fill(&catalog, &silence, &mut m)?;
            let newest = m.info.as_ref().and_then(|i| certs.get(&i.name));
            crate::certs::flag(&mut m, newest, silence.now_ms);
            out.push(m);
        }
        out.sort_by(|a, b| a.info.as_ref().map(|i| &i.name).cmp(&b.info.as_ref().map(|i| &i.name)));
        Ok(out)
    }

    fn assessed_named(&self, names: &[String]) -> Result<Vec<Machine>> {
        Ok(self.assessed()?.into_iter().filter(|m| m.info.as_ref().is_some_and(|i| names.contains(&i.name))).collect())
    }

    /// Every machine's group, read once: group -> member names.
    fn membership(&self) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
        let decided = &self.shared.catalog()?.decided;
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for m in self.shared.store.list_machines()? {
            let Some(info) = m.info else { continue };
            out.entry(decided.group_of(&info.name).to_string()).or_default().push(info.name);
        }
        Ok(out)
    }

    fn members(&self, group: &str) -> Result<Vec<String>> {
        Ok(self.membership()?.remove(group).unwrap_or_default())
    }

    fn group_detail(&self, name: &str) -> Result<GroupDetail> {
        let settings = self.shared.catalog()?.decided.settings(name);
        Ok(GroupDetail {
            group: Some(Group { name: name.to_string(), settings: Some(settings) }),
            members: self.members(name)?,
        })
    }

    fn groups(&self) -> Result<ListGroupsResponse> {
        let decided = &self.shared.catalog()?.decided;
        let membership = self.membership()?;
        let mut groups = Vec::new();
        for name in decided.group_names() {
            let settings = decided.settings(&name);
            let members = membership.get(&name).map_or(0, Vec::len) as u32;
            groups.push(GroupSummary { group: Some(Group { name, settings: Some(settings) }), members });
        }
        Ok(ListGroupsResponse { groups })
    }

    /// Every named machine must be known; otherwise nothing changes.
    fn check_machines(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Err(ProviderError::InvalidArgument("name at least one machine".into()));
        }
        let known: Vec<String> =
            self.shared.store.list_machines()?.into_iter().filter_map(|m| m.info.map(|i| i.name)).collect();
        let unknown: Vec<&str> = names.iter().filter(|n| !known.contains(n)).map(String::as_str).collect();
        if !unknown.is_empty() {
            return Err(ProviderError::InvalidArgument(format!("unknown machine(s): {}", unknown.join(", "))));
        }
        Ok(())
    }

    pub async fn list_machines(&self, req: ListMachinesRequest) -> Result<ListMachinesResponse> {
        let f = req.filter.to_lowercase();
        let machines = self
            .assessed()?
            .into_iter()
            .filter(|m| {
                f.is_empty()
                    || m.info.as_ref().is_some_and(|i| {
                        i.name.to_lowercase().contains(&f) || i.addresses.iter().any(|a| a.contains(&f))
                    })
            })
            .filter(|m| req.group.is_empty() || m.group == req.group)
            .collect();
        Ok(ListMachinesResponse { machines })
    }

    pub async fn get_machine(&self, req: GetMachineRequest) -> Result<MachineDetail> {
        let name = req.name;
        let store = &self.shared.store;
        let Some(mut m) = store.list_machines()?.into_iter().find(|m| m.info.as_ref().is_some_and(|i| i.name == name))
        else {
            return Err(bad(format!("unknown machine {name:?}")));
        };
        let catalog = self.shared.catalog()?;
        let (products, pins) = policy::fill(&catalog, &self.shared.silence(), &mut m)?;
        crate::certs::flag(&mut m, crate::certs::newest_by_name(&self.shared)?.get(&name), crate::now_ms());
        let pol = policy::effective(&catalog.decided, m.info.as_ref().expect("found by its info"));
        let recent = store.list_activity(&name, "", 0, 20)?;
        Ok(MachineDetail { machine: Some(m), policy: Some(pol), products, recent, pins: pins.pins })
    }

    pub async fn put_group(&self, who: &str, req: PutGroupRequest) -> Result<GroupDetail> {
        validate_group_name(&req.name)?;
        let store = &self.shared.store;
        let exists = req.name == DEFAULT_GROUP || store.get_group(&req.name)?.is_some();
        if req.create && exists {
            return Err(bad(format!("group {:?} already exists", req.name)));
        }
        if !req.create && !exists {
            return Err(bad(format!("unknown group {:?}", req.name)));
        }
        let mut settings = self.shared.catalog()?.decided.settings(&req.name);
        let new = req.settings.unwrap_or_default();
        if req.set_mode {
            Mode::from_wire(new.mode)
                .ok_or_else(|| bad(format!("unknown download mode {}; expected {}", new.mode, Mode::ALL)))?;
            settings.mode = new.mode;
        }
        if req.set_day {
            if !(-1..=6).contains(&new.install_day) {
                return Err(bad(format!("install day {} must be -1 (every day) or 0-6", new.install_day)));
            }
            settings.install_day = new.install_day;
        }
        if req.set_hour {
            if !(-1..=23).contains(&new.install_hour) {
                return Err(bad(format!("install hour {} must be -1 (any) or 0-23", new.install_hour)));
            }
            settings.install_hour = new.install_hour;
        }
        if req.set_providers {
            for p in &new.providers {
                if p.contains("://") {
                    p.parse::<tonic::codegen::http::Uri>()
                        .ok()
                        .filter(|u| u.scheme().is_some() && u.host().is_some())
                        .ok_or_else(|| bad(format!("provider {p:?} is not a URL like http://host:8092")))?;
                } else if store.get_peer(p)?.is_none() {
                    return Err(bad(format!(
                        "provider {p:?} is neither a URL nor a provider server (see `admin-cli provider list`)"
                    )));
                }
            }
            settings.providers = new.providers.clone();
        }
        if req.set_download_early {
            settings.download_early = new.download_early;
        }
        let group = Group { name: req.name.clone(), settings: Some(settings.clone()) };
        store.put_group(&group).await?;
        let what = format!(
            "group {} {}: mode {}{}, day {}, hour {}, providers [{}]",
            req.name,
            if req.create { "created" } else { "changed" },
            Mode::from_wire(settings.mode).unwrap_or_default(),
            if settings.download_early { " (downloads early)" } else { "" },
            updraft_core::policy::day_name(settings.install_day),
            updraft_core::policy::hour_name(settings.install_hour),
            settings.providers.join(", ")
        );
        record_catalog_activity(&self.shared, who, None, what).await?;
        self.group_detail(&req.name)
    }

    pub async fn remove_group(
        &self,
        who: &str,
        RemoveGroupRequest { name }: RemoveGroupRequest,
    ) -> Result<ListGroupsResponse> {
        if name == DEFAULT_GROUP {
            return Err(bad("the default group cannot be removed".into()));
        }
        let store = &self.shared.store;
        if store.get_group(&name)?.is_none() {
            return Err(bad(format!("unknown group {name:?}")));
        }
        // Its machines go back to the default group first, so none is left in a missing group.
        for member in self.members(&name)? {
            let assignment = Assignment { machine: member, group: String::new() };
            store.assign(&assignment).await?;
        }
        // Its deployments go with it.
        for deployment in store.list_deployments()?.into_iter().filter(|d| d.group == name) {
            store.deploy(&deployment, true).await?;
        }
        store.delete_group(&name).await?;
        record_catalog_activity(&self.shared, who, None, format!("group {name} removed")).await?;
        self.groups()
    }

    pub async fn list_groups(&self) -> Result<ListGroupsResponse> {
        self.groups()
    }

    pub async fn get_group(&self, req: GetGroupRequest) -> Result<GroupDetail> {
        if req.name != DEFAULT_GROUP && self.shared.store.get_group(&req.name)?.is_none() {
            return Err(bad(format!("unknown group {:?}", req.name)));
        }
        self.group_detail(&req.name)
    }

    pub async fn assign(&self, who: &str, req: AssignRequest) -> Result<ListMachinesResponse> {
        let store = &self.shared.store;
        let group = if req.group == DEFAULT_GROUP { String::new() } else { req.group.clone() };
        if !group.is_empty() && store.get_group(&group)?.is_none() {
            return Err(bad(format!("unknown group {:?}", req.group)));
        }
        self.check_machines(&req.machines)?;
        for m in &req.machines {
            let assignment = Assignment { machine: m.clone(), group: group.clone() };
            store.assign(&assignment).await?;
        }
        let target = if group.is_empty() { DEFAULT_GROUP } else { group.as_str() };
        record_catalog_activity(
            &self.shared,
            who,
            None,
            format!("{} moved to group {target}", req.machines.join(", ")),
        )
        .await?;
        Ok(ListMachinesResponse { machines: self.assessed_named(&req.machines)? })
    }

    pub async fn pin(&self, who: &str, req: PinRequest) -> Result<ListMachinesResponse> {
        validate_product(&req.product).map_err(ProviderError::from)?;
        if !req.version.is_empty() {
            req.version.parse::<updraft_core::Version>().map_err(ProviderError::from)?;
        }
        self.check_machines(&req.machines)?;
        let store = &self.shared.store;
        for m in &req.machines {
            let mut pins = store.pins_of(m)?;
            if req.version.is_empty() {
                pins.pins.remove(&req.product);
            } else {
                pins.pins.insert(req.product.clone(), req.version.clone());
            }
            store.set_pins(&pins).await?;
        }
        let what = if req.version.is_empty() {
            format!("{} unpinned from {}", req.machines.join(", "), req.product)
        } else {
            format!("{} pinned to {} {}", req.machines.join(", "), req.product, req.version)
        };
        record_catalog_activity(&self.shared, who, None, what).await?;
        Ok(ListMachinesResponse { machines: self.assessed_named(&req.machines)? })
    }

    pub async fn list_deployments(&self, req: ListDeploymentsRequest) -> Result<ListDeploymentsResponse> {
        self.deployments(&req.product)
    }

    fn deployments(&self, product: &str) -> Result<ListDeploymentsResponse> {
        let store = &self.shared.store;
        let catalog = store.list_updates()?;
        let mut deployments: Vec<Deployment> =
            store.list_deployments()?.into_iter().filter(|d| product.is_empty() || d.product == product).collect();
        deployments.sort_by(|a, b| (&a.product, &a.group, &a.machine).cmp(&(&b.product, &b.group, &b.machine)));
        let mut warnings = Vec::new();
        for d in &deployments {
            if !catalog.iter().any(|u| u.product == d.product && u.state == 2) {
                warnings
                    .push(format!("{} has no GA update yet: nothing is installed until one is approved", d.product));
            }
        }
        warnings.dedup();
        Ok(ListDeploymentsResponse { deployments, warnings })
    }

    /// Gives a product to a group's or a machine's machines that lack it (or stops giving it).
    /// Undeploying uninstalls nothing: machines that took it keep it and get its updates.
    pub async fn deploy(&self, who: &str, req: DeployRequest) -> Result<ListDeploymentsResponse> {
        validate_product(&req.product).map_err(ProviderError::from)?;
        let store = &self.shared.store;
        let (target, deployment) = match (req.group.is_empty(), req.machine.is_empty()) {
            (false, true) => {
                if req.group != DEFAULT_GROUP && store.get_group(&req.group)?.is_none() {
                    return Err(bad(format!("unknown group {:?}", req.group)));
                }
                (
                    format!("group {}", req.group),
                    Deployment { product: req.product.clone(), group: req.group, machine: String::new() },
                )
            }
            (true, false) => {
                crate::catalog::validate_machine_name(&req.machine)?;
                if !req.remove {
                    self.check_machines(std::slice::from_ref(&req.machine))?;
                }
                (
                    format!("machine {}", req.machine),
                    Deployment { product: req.product.clone(), group: String::new(), machine: req.machine },
                )
            }
            _ => return Err(bad("name exactly one of --group and --machine".into())),
        };
        let exists = store.list_deployments()?.contains(&deployment);
        if req.remove && !exists {
            return Err(bad(format!("{} is not deployed to {target}", req.product)));
        }
        if !req.remove && exists {
            return self.deployments("");
        }
        store.deploy(&deployment, req.remove).await?;
        let what = if req.remove {
            format!("{} no longer deployed to {target}", req.product)
        } else {
            format!("{} deployed to {target}", req.product)
        };
        record_catalog_activity(&self.shared, who, None, what).await?;
        self.deployments("")
    }

    /// Sets (or clears) the role of machines; role ceilings follow at once.
    pub async fn set_role(&self, who: &str, req: SetRoleRequest) -> Result<ListMachinesResponse> {
        let role = if req.role.is_empty() {
            String::new()
        } else {
            req.role.parse::<Role>().map_err(ProviderError::from)?.as_str().to_string()
        };
        self.check_machines(&req.machines)?;
        let store = &self.shared.store;
        for m in &req.machines {
            let r = MachineRole { machine: m.clone(), role: role.clone() };
            store.set_role(&r).await?;
        }
        crate::ceiling::refresh(&self.shared).await?;
        let what = if role.is_empty() {
            format!("{}: role back to what the agent says", req.machines.join(", "))
        } else {
            format!("{}: role {role}", req.machines.join(", "))
        };
        record_catalog_activity(&self.shared, who, None, what).await?;
        Ok(ListMachinesResponse { machines: self.assessed_named(&req.machines)? })
    }

    /// Decommissions a machine: pins, group, role and the deployments naming it are undone
    /// through the logged writes sites follow, then its record goes; its activity stays as
    /// history. Each step is repeatable, the record last, so a forget cut short by a crash is
    /// finished by asking again.
    pub async fn forget_machine(
        &self,
        who: &str,
        ForgetMachineRequest { name }: ForgetMachineRequest,
    ) -> Result<ForgetMachineResponse> {
        crate::catalog::validate_machine_name(&name)?;
        let store = &self.shared.store;
        if store.get_machine(&name)?.is_none() {
            return Err(bad(format!("unknown machine {name:?}")));
        }
        let mut removed = Vec::new();
        let pins = store.pins_of(&name)?;
        if !pins.pins.is_empty() {
            let list: Vec<String> = pins.pins.iter().map(|(p, v)| format!("{p} {v}")).collect();
            removed.push(format!("pins: {}", list.join(", ")));
            let pins = MachinePins { machine: name.clone(), ..Default::default() };
            store.set_pins(&pins).await?;
        }
        let group = store.group_of(&name)?;
        if group != DEFAULT_GROUP {
            removed.push(format!("group: {group}"));
            let assignment = Assignment { machine: name.clone(), group: String::new() };
            store.assign(&assignment).await?;
        }
        if let Some(role) = store.role_of(&name)? {
            removed.push(format!("role: {role}"));
            let role = MachineRole { machine: name.clone(), role: String::new() };
            store.set_role(&role).await?;
        }
        for deployment in store.list_deployments()?.into_iter().filter(|d| d.machine == name) {
            removed.push(format!("deployment: {}", deployment.product));
            store.deploy(&deployment, true).await?;
        }
        store.remove_machine(&name).await?;
        crate::ceiling::refresh(&self.shared).await?;
        let what = if removed.is_empty() { String::new() } else { format!(" ({})", removed.join("; ")) };
        record_catalog_activity(&self.shared, who, None, format!("forgot machine {name}{what}")).await?;
        Ok(ForgetMachineResponse { name, removed })
    }

    /// Managed machines (sites excluded) by status, a silent one as `silent` whatever it last
    /// said; every status present, with 0 when none has it.
    pub fn machines_by_status(&self) -> Result<std::collections::BTreeMap<&'static str, u64>> {
        let mut counts: std::collections::BTreeMap<&'static str, u64> =
            [Health::Error, Health::NeedsAttention, Health::UpToDate].iter().map(|h| (h.as_str(), 0)).collect();
        counts.insert("silent", 0);
        for m in self.assessed()?.iter().filter(|m| !m.is_remote_provider) {
            let status = if m.silent {
                "silent"
            } else {
                match counts.keys().find(|k| **k == m.status) {
                    Some(k) => *k,
                    None => continue,
                }
            };
            *counts.entry(status).or_default() += 1;
        }
        Ok(counts)
    }

    pub async fn report(&self, req: ReportRequest2) -> Result<FleetReport> {
        let mut groups: Vec<ReportGroup> = [Health::Error, Health::NeedsAttention, Health::UpToDate]
            .iter()
            .map(|h| ReportGroup { status: h.as_str().into(), machines: vec![] })
            .collect();
        for m in self.assessed()? {
            // A span filters out machines quiet for long, except those that should not be:
            // silence is the error to report.
            if m.is_remote_provider || (m.last_contact_unix_ms < req.since_unix_ms && !m.silent) {
                continue;
            }
            if let Some(g) = groups.iter_mut().find(|g| g.status == m.status) {
                g.machines.push(m);
            }
        }
        let mut updates = Vec::new();
        for u in self.shared.store.list_updates()? {
            let outcomes = self.shared.store.outcomes_of(&u.id)?;
            if outcomes.is_empty() {
                continue;
            }
            let count = |o: Outcome| outcomes.iter().filter(|x| x.1 == o).count() as u32;
            updates.push(UpdateOutcomes {
                id: u.id,
                installed: count(Outcome::Installed),
                verified: count(Outcome::Verified),
                failed: count(Outcome::Failed),
                rolled_back: count(Outcome::RolledBack),
            });
        }
        Ok(FleetReport { groups, updates })
    }

    pub async fn clear_activity(
        &self,
        who: &str,
        ClearActivityRequest { machine }: ClearActivityRequest,
    ) -> Result<ClearActivityResponse> {
        let removed = self.shared.store.clear_activity(&machine).await?;
        let scope = if machine.is_empty() { "all activity".to_string() } else { format!("activity of {machine}") };
        record_catalog_activity(&self.shared, who, None, format!("cleared {scope} ({removed} entries)")).await?;
        Ok(ClearActivityResponse { removed })
    }
}
