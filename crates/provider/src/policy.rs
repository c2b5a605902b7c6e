//! Who gets what and when: a machine's group and effective settings, what administrators gave
//! it (pins, deployments, role), the offers its check gets (through the engine), and its
//! status for the fleet report.
use std::collections::{BTreeMap, BTreeSet};

use updraft_core::model::Role;
use updraft_core::policy::{Health, Mode, classify};
use updraft_proto::v1::{
    ActionKind, GroupSettings, InstalledProduct, Machine, MachineInfo, MachinePins, Offer, Policy, ProductState, Update,
};

use crate::catalog::{Given, MachinePlan, Snapshot, plan_for};
use crate::decided::Decided;
use crate::error::Result;
use crate::store::{DEFAULT_GROUP, Store};

/// A machine's effective policy: its group's settings; in the default group, overlaid with the
/// settings the machine chose for itself.
pub fn effective(decided: &Decided, machine: &MachineInfo) -> Policy {
    let group = decided.group_of(&machine.name);
    let mut settings = decided.settings(group);
    let managed = group != DEFAULT_GROUP;
    if !managed && let Some(local) = &machine.local {
        if Mode::from_wire(local.mode).is_some() {
            settings.mode = local.mode;
        }
        if let Some(d) = local.install_day {
            settings.install_day = d;
        }
        if let Some(h) = local.install_hour {
            settings.install_hour = h;
        }
    }
    // Groups may name provider servers; agents get their URLs.
    settings.providers = crate::ops::servers::resolve_providers(decided, &settings.providers);
    Policy { group: group.to_string(), settings: Some(settings), managed }
}

/// A machine's effective role: an administrator's choice, else what its agent's configuration
/// says (workstation when it says nothing).
pub fn role_of(decided: &Decided, machine: &MachineInfo) -> Result<Role> {
    Ok(Role::from_wire(decided.role_of(&machine.name).unwrap_or(&machine.role))?)
}

/// What administrators decided for `machine`: pins, deployments (its own and its group's), role.
pub fn given(decided: &Decided, machine: &MachineInfo) -> Result<Given> {
    Ok(Given {
        pins: decided.pins_of(&machine.name),
        deployed: decided.deployed_to(&machine.name),
        role: role_of(decided, machine)?,
    })
}

/// The offers and policy for one machine's check: from the snapshot alone, no store read.
pub fn answer(catalog: &Snapshot, machine: &MachineInfo) -> Result<(Vec<Offer>, Policy)> {
    let (offers, _) = plan_for(catalog, &given(&catalog.decided, machine)?, machine)?;
    Ok((offers, effective(&catalog.decided, machine)))
}

/// Every known machine's plan, for update statuses.
pub fn fleet_plans(store: &Store, catalog: &Snapshot) -> Result<Vec<MachinePlan>> {
    let mut out = Vec::new();
    for info in store.list_agents()? {
        // One unreadable record must not hide the rest of the fleet.
        let Ok(given) = given(&catalog.decided, &info) else { continue };
        let Ok((_, plan)) = plan_for(catalog, &given, &info) else { continue };
        out.push(MachinePlan { info, plan });
    }
    Ok(out)
}

/// Every known agent (of `group`, when given) that would be offered `update` to install were it
/// approved now, with the site it comes through (`via`). Machines whose record does not read
/// are left out, as in update statuses.
pub fn takers(
    store: &Store,
    catalog: &Snapshot,
    update: &Update,
    group: Option<&str>,
) -> Result<Vec<(String, String)>> {
    let mut approved = update.clone();
    approved.state = updraft_core::model::UpdateState::Ga.to_wire();
    let items: Vec<_> = catalog
        .updates
        .iter()
        .map(|u| if u.id == update.id { &approved } else { u })
        .filter_map(crate::catalog::item_of)
        .collect();
    let mut out = Vec::new();
    for m in store.list_machines()? {
        let Some(info) = m.info.as_ref() else { continue };
        if m.is_remote_provider || group.is_some_and(|g| catalog.decided.group_of(&info.name) != g) {
            continue;
        }
        let Ok(given) = given(&catalog.decided, info) else { continue };
        let Ok(view) = crate::catalog::view_of(&catalog.caps, &given, info) else { continue };
        let plan = updraft_core::plan::plan(&items, &view);
        if plan.actions.iter().any(|a| matches!(a, updraft_core::plan::Action::Install { id } if *id == update.id)) {
            out.push((info.name.clone(), m.via.clone()));
        }
    }
    Ok(out)
}

/// Problems the provider sees that the agent cannot: pins the catalog cannot meet.
fn provider_problems(catalog: &[Update], pins: &MachinePins) -> Vec<String> {
    pins.pins
        .iter()
        .filter(|(product, version)| {
            !catalog.iter().any(|u| &u.product == *product && &u.version == *version && matches!(u.state, 2 | 3))
        })
        .map(|(p, v)| format!("pinned to {p} {v}, which the catalog does not offer (GA or inactive)"))
        .collect()
}

/// When a group's machines install what they are offered, if not at once: its download mode
/// or install window.
fn when_offered(group: &str, s: &GroupSettings) -> Option<String> {
    let mode = Mode::from_wire(s.mode).unwrap_or_default();
    let why = match mode {
        Mode::Automatic if s.install_day == -1 && s.install_hour == -1 => return None,
        Mode::Automatic => format!(
            "installs in group {group}'s window ({}, hour {}, the machine's local time)",
            updraft_core::policy::day_name(s.install_day),
            updraft_core::policy::hour_name(s.install_hour)
        ),
        Mode::Download => format!("group {group} downloads, then waits for `agent apply`"),
        Mode::Notify => format!("group {group} only notifies: `agent apply` installs"),
        Mode::Manual => format!("group {group} is manual: `agent check` installs"),
    };
    Some(why)
}

/// When a machine is silent: past its due contact (see [`updraft_core::policy::contact_due`]),
/// as of `now_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    pub now_ms: i64,
    /// The contact interval of a machine that says none: the provider's longest check interval.
    pub default_secs: u32,
    pub grace_ms: i64,
}

impl Silence {
    /// When `m` must make contact again at the latest.
    pub fn due(&self, m: &Machine) -> i64 {
        let interval = m.info.as_ref().map_or(0, |i| i.contact_interval_secs);
        updraft_core::policy::contact_due(m.last_contact_unix_ms, interval, self.default_secs, self.grace_ms)
    }

    pub fn is_silent(&self, m: &Machine) -> bool {
        self.now_ms > self.due(m)
    }
}

/// Fills in a listed machine's group, role, status and notes, its due contact and whether it
/// is silent; returns its per-product state and pins.
pub fn fill(catalog: &Snapshot, silence: &Silence, m: &mut Machine) -> Result<(Vec<ProductState>, MachinePins)> {
    m.contact_due_unix_ms = silence.due(m);
    m.silent = silence.now_ms > m.contact_due_unix_ms;
    let (health, notes, products, pins) = assess(catalog, m)?;
    let info = m.info.clone().unwrap_or_default();
    m.group = catalog.decided.group_of(&info.name).to_string();
    m.status = health.as_str().into();
    m.notes = notes;
    m.role = role_of(&catalog.decided, &info)?.to_string();
    Ok((products, pins))
}

/// Status, reasons and per-product state of a machine, as the report and `machine show` give:
/// only the products it has or is given, each with the rules that hold approved updates back.
/// A silent machine (as [`fill`] found it) is an error whatever it last said: that is all it
/// may say now.
fn assess(catalog: &Snapshot, m: &Machine) -> Result<(Health, Vec<String>, Vec<ProductState>, MachinePins)> {
    let info = m.info.clone().unwrap_or_default();
    let given = given(&catalog.decided, &info)?;
    let (offers, plan) = plan_for(catalog, &given, &info).unwrap_or_default();
    let pins = given.pins;
    let mut problems = info.problems.clone();
    problems.extend(provider_problems(&catalog.updates, &pins));
    let mut waiting: Vec<String> = offers.iter().filter_map(|o| o.update.as_ref().map(|u| u.id.clone())).collect();
    for w in &info.waiting {
        if !waiting.contains(w) {
            waiting.push(w.clone());
        }
    }
    let (health, mut notes) = if m.is_remote_provider {
        (Health::UpToDate, vec!["remote provider".into()])
    } else {
        classify(&problems, &waiting, info.restart_needed)
    };
    let health = if m.silent {
        let due = updraft_runtime::utc_text(m.contact_due_unix_ms);
        let since = updraft_runtime::utc_text(m.last_contact_unix_ms);
        notes.insert(0, format!("silent since {since} (contact was due by {due})"));
        Health::Error
    } else {
        health
    };

    let installed: BTreeMap<&str, &InstalledProduct> = info.installed.iter().map(|p| (p.product.as_str(), p)).collect();
    let mut products: BTreeSet<String> = installed.keys().map(|p| p.to_string()).collect();
    products.extend(plan.products.iter().filter(|p| catalog.updates.iter().any(|u| &u.product == *p)).cloned());
    let mut target: BTreeMap<String, (String, &'static str)> = BTreeMap::new();
    for o in &offers {
        let Some(u) = &o.update else { continue };
        if o.action == ActionKind::Remove as i32 {
            target.insert(u.product.clone(), (o.rollback_to_version.clone(), "removal-waiting"));
        } else {
            target.insert(u.product.clone(), (u.version.clone(), "update-waiting"));
        }
    }
    // Offered, but the group's mode or install window decides when (high priority excepted).
    let pol = effective(&catalog.decided, &info);
    let waits = pol.settings.as_ref().and_then(|s| when_offered(&pol.group, s));
    let states = products
        .into_iter()
        .map(|p| {
            let inst = installed.get(p.as_str());
            let inst_v = inst.map(|i| i.version.clone()).unwrap_or_default();
            let pinned = pins.pins.get(&p).cloned().unwrap_or_default();
            let mut held: Vec<String> =
                plan.held.iter().filter(|h| h.product == p).map(|h| format!("{}: {}", h.id, h.hold)).collect();
            if let Some(w) = &waits {
                let offered = offers.iter().filter_map(|o| o.update.as_ref()).filter(|u| u.product == p);
                held.extend(offered.filter(|u| !u.high_priority).map(|u| format!("{}: offered; {w}", u.id)));
            }
            let (available, status) = match target.get(&p) {
                Some((v, s)) => (v.clone(), *s),
                None if !pinned.is_empty() => (inst_v.clone(), "pinned"),
                None if !held.is_empty() => (inst_v.clone(), "held"),
                None => (inst_v.clone(), "up-to-date"),
            };
            ProductState {
                product: p,
                installed_version: inst_v,
                available_version: available,
                pinned_version: pinned,
                status: status.into(),
                held,
                adopted: inst.is_some_and(|i| i.adopted),
            }
        })
        .collect();
    Ok((health, notes, states, pins))
}
