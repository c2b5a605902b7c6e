//! Catalog rules on top of the store: turning an imported package into a record, and answering
//! a machine's check with the applicability engine.
use std::collections::{BTreeMap, BTreeSet};

use updraft_core::Version;
use updraft_core::model::{InstallType, Role, UpdateState};
use updraft_core::package::Manifest;
use updraft_core::plan::{self, Action, CatalogItem, Ceiling, InstalledItem, MachineView, Plan};
use updraft_proto::v1::{
    ActionKind, CatalogEvent, Machine, MachineInfo, MachinePins, Offer, ProductLineCap, Update, UpdateStatus,
    catalog_event,
};

use crate::error::{ProviderError, Result};
use crate::store::Change;

/// The catalog id of a package: readable, and unique per content.
pub fn update_id(m: &Manifest, content_hash: &str) -> String {
    let hex = content_hash.strip_prefix(updraft_core::hash::PREFIX).unwrap_or(content_hash);
    format!("{}-{}-{}", m.product, m.version, &hex[..12.min(hex.len())])
}

pub fn record_from_manifest(m: &Manifest, content_hash: &str, size: u64, verified: bool, now_unix: i64) -> Update {
    Update {
        id: update_id(m, content_hash),
        product_line: m.product_line.clone(),
        product: m.product.clone(),
        upgrade_code: m.upgrade_code.clone(),
        product_code: m.product_code.clone(),
        install_type: m.install_type.to_wire(),
        version: m.version.to_string(),
        release_label: m.release_label.clone(),
        patch_label: m.patch_label.clone(),
        install_properties: m.install_properties.clone().into_iter().collect(),
        doc_url: m.doc_url.clone(),
        size,
        content_hash: content_hash.to_string(),
        signing_key_id: m.key_id.clone(),
        signature_verified: verified,
        state: UpdateState::PreApproval.to_wire(),
        high_priority: false,
        inserted_unix: now_unix,
        related_installs: m.related_installs.clone(),
        catalog_seq: 0,
        prestage: false,
        requires_version: m.requires.map(|v| v.to_string()).unwrap_or_default(),
    }
}

pub fn state_of(u: &Update) -> Option<UpdateState> {
    UpdateState::from_wire(u.state)
}

pub fn install_type_of(u: &Update) -> InstallType {
    InstallType::from_wire(u.install_type).unwrap_or_default()
}

/// The engine's view of a catalog record; records with an unreadable version are skipped.
pub fn item_of(u: &Update) -> Option<CatalogItem> {
    Some(CatalogItem {
        id: u.id.clone(),
        product: u.product.clone(),
        product_line: u.product_line.clone(),
        version: u.version.parse().ok()?,
        install_type: install_type_of(u),
        product_code: u.product_code.clone(),
        upgrade_code: u.upgrade_code.clone(),
        requires: u.requires_version.parse().ok(),
        state: state_of(u)?,
        related_installs: u.related_installs.clone(),
    })
}

/// Plain version caps (product line -> highest version offered).
pub fn caps_map(caps: &[ProductLineCap]) -> BTreeMap<String, Version> {
    caps.iter().filter_map(|c| Some((c.product_line.clone(), c.version.parse().ok()?))).collect()
}

/// Role ceilings (product line -> the role it follows and that role's lowest version).
pub fn ceilings_map(caps: &[ProductLineCap]) -> BTreeMap<String, Ceiling> {
    caps.iter()
        .filter_map(|c| {
            let role = Role::from_wire(&c.follow_role).ok().filter(|_| !c.follow_role.is_empty())?;
            Some((c.product_line.clone(), Ceiling { role, version: c.ceiling.parse().ok() }))
        })
        .collect()
}

/// The catalog and every administrator's decision as of one catalog sequence number, decoded
/// once: what every check and every fleet-wide computation reads instead of the store. [`crate::Shared::catalog`] keeps one
/// current; it is never older than its `seq` (changes made while it was read only make the
/// next call rebuild it).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub seq: u64,
    pub updates: Vec<Update>,
    /// The engine's view of `updates` (records with unreadable versions left out).
    pub items: Vec<CatalogItem>,
    pub caps: Vec<ProductLineCap>,
    /// What administrators decided besides the catalog (groups, pins, deployments, roles).
    pub decided: crate::decided::Decided,
}

impl Snapshot {
    pub fn read(store: &crate::store::Store) -> Result<Self> {
        let seq = store.catalog_seq()?;
        let updates = store.list_updates()?;
        let items = updates.iter().filter_map(item_of).collect();
        let decided = crate::decided::Decided::read(store)?;
        Ok(Self { seq, updates, items, caps: store.list_caps()?, decided })
    }

    /// The updates rollouts keep from `machine` for now (see [`updraft_core::rollout::holds`]).
    pub fn rollout_holds(&self, machine: &str) -> BTreeMap<String, plan::Hold> {
        let high = |id: &str| self.updates.iter().any(|u| u.id == id && u.high_priority);
        updraft_core::rollout::holds(&self.decided.rollouts, high, machine, self.decided.group_of(machine))
    }
}

/// What the fleet's administrators decided for one machine, besides the catalog: its pins,
/// the products deployed to it and its effective role.
#[derive(Debug, Clone, Default)]
pub struct Given {
    pub pins: MachinePins,
    pub deployed: BTreeSet<String>,
    pub role: Role,
}

/// The engine's view of one machine. A malformed inventory is refused with what is wrong.
pub fn view_of(caps: &[ProductLineCap], given: &Given, machine: &MachineInfo) -> Result<MachineView> {
    let mut view = MachineView {
        caps: caps_map(caps),
        ceilings: ceilings_map(caps),
        deployed: given.deployed.clone(),
        role: given.role,
        self_product: (!machine.agent_product.is_empty()).then(|| machine.agent_product.clone()),
        ..Default::default()
    };
    for (product, version) in &given.pins.pins {
        if let Ok(v) = version.parse() {
            view.pins.insert(product.clone(), v);
        }
    }
    for p in &machine.installed {
        let version = p.version.parse().map_err(|e: updraft_core::CoreError| {
            ProviderError::InvalidArgument(format!("inventory of {:?}, product {:?}: {e}", machine.name, p.product))
        })?;
        view.installed.push(InstalledItem {
            product: p.product.clone(),
            version,
            upgrade_code: p.upgrade_code.clone(),
        });
    }
    Ok(view)
}

/// The engine's plan for `machine`, and its offers in order.
pub fn plan_for(catalog: &Snapshot, given: &Given, machine: &MachineInfo) -> Result<(Vec<Offer>, Plan)> {
    let mut view = view_of(&catalog.caps, given, machine)?;
    view.rollout = catalog.rollout_holds(&machine.name);
    let plan = plan::plan(&catalog.items, &view);
    let find = |id: &str| catalog.updates.iter().find(|u| u.id == id).cloned();
    let offers = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::Install { id } => {
                let update = find(id);
                let pinned = update.as_ref().is_some_and(|u| view.pins.contains_key(&u.product));
                Offer { action: ActionKind::Install as i32, update, pinned, ..Default::default() }
            }
            Action::Remove { id, rollback_to } => {
                let update = find(id);
                let rollback = match (&update, rollback_to) {
                    (Some(u), Some(v)) => plan::rollback_item(&catalog.items, &u.product, *v).and_then(|c| find(&c.id)),
                    _ => None,
                };
                Offer {
                    action: ActionKind::Remove as i32,
                    update,
                    rollback_to_version: rollback_to.map(|v| v.to_string()).unwrap_or_default(),
                    pinned: false,
                    rollback,
                }
            }
        })
        .collect();
    Ok((offers, plan))
}

/// Machines that have `u` installed, or keep it as the version they would roll back to.
pub fn dependents<'a>(u: &Update, machines: &'a [Machine]) -> Vec<&'a str> {
    machines
        .iter()
        .filter_map(|m| m.info.as_ref())
        .filter(|i| {
            i.installed
                .iter()
                .any(|p| p.product == u.product && (p.version == u.version || p.previous_version == u.version))
        })
        .map(|i| i.name.as_str())
        .collect()
}

/// One machine's plan, as update statuses count it.
pub struct MachinePlan {
    pub info: MachineInfo,
    pub plan: Plan,
}

/// How an update is doing across the fleet: installs, machines it applies to, is offered to,
/// and the rules that hold it from the others; cap, priority, related installs.
pub fn status_of(
    u: &Update,
    fleet: &[MachinePlan],
    caps: &BTreeMap<String, Version>,
    outcomes: &[updraft_core::rollout::Outcome],
) -> UpdateStatus {
    use updraft_core::rollout::Outcome;
    let count = |o: Outcome| outcomes.iter().filter(|x| **x == o).count() as u32;
    let (verified_count, failed_count, rolled_back_count) =
        (count(Outcome::Verified), count(Outcome::Failed), count(Outcome::RolledBack));
    let installed_count = fleet
        .iter()
        .filter(|m| m.info.installed.iter().any(|p| p.product == u.product && p.version == u.version))
        .count() as u32;
    let applicable_count = fleet.iter().filter(|m| m.plan.products.contains(&u.product)).count() as u32;
    let offered_count = fleet.iter().filter(|m| m.plan.actions.iter().any(|a| a.id() == u.id)).count() as u32;
    let mut by_rule: BTreeMap<String, u32> = BTreeMap::new();
    for m in fleet {
        for h in m.plan.held.iter().filter(|h| h.id == u.id) {
            *by_rule.entry(h.hold.to_string()).or_default() += 1;
        }
    }
    let held_count = by_rule.values().sum();
    let held: Vec<String> = by_rule.into_iter().map(|(rule, n)| format!("{rule} ({n} machine(s))")).collect();
    let capped = item_of(u).and_then(|i| plan::held_by_cap(&i, caps));
    let mut notes = Vec::new();
    if let Some(cap) = capped {
        notes.push(format!("held back: product line {:?} is capped at {cap}", u.product_line));
    }
    if installed_count > 0 {
        notes.push(format!("installed on {installed_count} machine(s)"));
    }
    notes.push(format!("{applicable_count} machine(s) have or are given {}; offered to {offered_count}", u.product));
    notes.extend(held.iter().map(|h| format!("held: {h}")));
    if u.high_priority {
        notes.push("high priority".into());
    }
    if !u.related_installs.is_empty() {
        notes.push(format!("also installs {}", u.related_installs.join(", ")));
    }
    UpdateStatus {
        id: u.id.clone(),
        installed_count,
        held_by_cap: capped.map(|v| v.to_string()).unwrap_or_default(),
        notes,
        applicable_count,
        offered_count,
        held_count,
        held,
        verified_count,
        failed_count,
        rolled_back_count,
    }
}

/// Releases with more than one GA patch: only the latest should be GA.
pub fn ga_patch_warnings(updates: &[Update]) -> Vec<String> {
    let mut by_release: BTreeMap<(String, String), Vec<&Update>> = BTreeMap::new();
    for u in updates {
        if let Some(i) = item_of(u)
            && i.state == UpdateState::Ga
            && i.install_type != InstallType::Install
        {
            by_release.entry((u.product.clone(), i.release_key())).or_default().push(u);
        }
    }
    by_release
        .into_iter()
        .filter(|(_, us)| us.len() > 1)
        .map(|((product, release), us)| {
            let ids: Vec<&str> = us.iter().map(|u| u.id.as_str()).collect();
            format!(
                "{product} release {release} has {} GA patches ({}); only the latest should be GA (use --retire-older)",
                us.len(),
                ids.join(", ")
            )
        })
        .collect()
}

pub fn to_event(change: &Change, caught_up: bool) -> CatalogEvent {
    let seq = change.seq();
    let c = match change {
        Change::Upsert(u) => catalog_event::Change::Upsert((**u).clone()),
        Change::Deleted { id, .. } => catalog_event::Change::DeletedId(id.clone()),
        Change::Cap { cap, .. } => catalog_event::Change::Cap(cap.clone()),
        Change::Group { group, .. } => catalog_event::Change::Group(group.clone()),
        Change::GroupDeleted { name, .. } => catalog_event::Change::GroupDeleted(name.clone()),
        Change::Assign { assignment, .. } => catalog_event::Change::Assignment(assignment.clone()),
        Change::Pins { pins, .. } => catalog_event::Change::Pins(pins.clone()),
        Change::Peer { peer, .. } => catalog_event::Change::Peer(peer.clone()),
        Change::PeerRemoved { name, .. } => catalog_event::Change::PeerRemoved(name.clone()),
        Change::Discovery { discovery, .. } => catalog_event::Change::Discovery(discovery.clone()),
        Change::Deployed { deployment, .. } => catalog_event::Change::Deployed(deployment.clone()),
        Change::Undeployed { deployment, .. } => catalog_event::Change::Undeployed(deployment.clone()),
        Change::Role { role, .. } => catalog_event::Change::Role(role.clone()),
        Change::Trust { trust, .. } => catalog_event::Change::Trust(trust.clone()),
        Change::Rollout { rollout, .. } => catalog_event::Change::Rollout(rollout.clone()),
        Change::Statement { statement, .. } => catalog_event::Change::Statement(statement.clone()),
    };
    CatalogEvent { seq, change: Some(c), caught_up }
}

pub fn from_event(ev: CatalogEvent) -> Option<Change> {
    Some(match ev.change? {
        catalog_event::Change::Upsert(u) => Change::Upsert(Box::new(u)),
        catalog_event::Change::DeletedId(id) => Change::Deleted { id, seq: ev.seq },
        catalog_event::Change::Cap(cap) => Change::Cap { cap, seq: ev.seq },
        catalog_event::Change::Group(group) => Change::Group { group, seq: ev.seq },
        catalog_event::Change::GroupDeleted(name) => Change::GroupDeleted { name, seq: ev.seq },
        catalog_event::Change::Assignment(assignment) => Change::Assign { assignment, seq: ev.seq },
        catalog_event::Change::Pins(pins) => Change::Pins { pins, seq: ev.seq },
        catalog_event::Change::Peer(peer) => Change::Peer { peer, seq: ev.seq },
        catalog_event::Change::PeerRemoved(name) => Change::PeerRemoved { name, seq: ev.seq },
        catalog_event::Change::Discovery(discovery) => Change::Discovery { discovery, seq: ev.seq },
        catalog_event::Change::Deployed(deployment) => Change::Deployed { deployment, seq: ev.seq },
        catalog_event::Change::Undeployed(deployment) => Change::Undeployed { deployment, seq: ev.seq },
        catalog_event::Change::Role(role) => Change::Role { role, seq: ev.seq },
        catalog_event::Change::Trust(trust) => Change::Trust { trust, seq: ev.seq },
        catalog_event::Change::Rollout(rollout) => Change::Rollout { rollout, seq: ev.seq },
        catalog_event::Change::Statement(statement) => Change::Statement { statement, seq: ev.seq },
    })
}

/// Machine names become store keys and log fields: keep them printable and bounded.
/// Host-name characters only (ASCII letters, digits, `-`, `.`, `_`), so a name cannot carry
/// terminal escapes or look like another (a zero-width or look-alike character would make a
/// second "pc-1").
pub fn validate_machine_name(name: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if name.is_empty() || name.len() > 253 || !name.chars().all(ok) {
        return Err(ProviderError::InvalidArgument(format!(
            "machine name {:?} must be 1-253 characters of A-Z, a-z, 0-9, '-', '.' and '_'",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_are_plain_host_names() {
        for ok in ["pc-1", "PC_2.example.org", "a"] {
            assert!(validate_machine_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(254);
        for bad in ["", "pc\u{200b}-1", "pc-1\u{1b}[2J", "pc 1", "рс-1", "a/b", long.as_str()] {
            assert!(validate_machine_name(bad).is_err(), "{bad:?}");
        }
    }
}
