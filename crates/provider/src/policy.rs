//! Who gets what and when: a machine's group and effective settings, the offers its check gets
//! (catalog, caps and pins through the engine), and its status for the fleet report.
use std::collections::{BTreeMap, BTreeSet};

use updraft_core::policy::{Health, Mode, classify};
use updraft_proto::v1::{
    ActionKind, GroupSettings, Machine, MachineInfo, MachinePins, Offer, Policy, ProductLineCap, ProductState, Update,
};

use crate::catalog::offers_for;
use crate::error::Result;
use crate::store::{DEFAULT_GROUP, Store};

/// The default group's settings before anyone changes them: install whatever is approved, at
/// any time, from whichever provider answers.
pub fn builtin_default() -> GroupSettings {
    GroupSettings { mode: Mode::Automatic.to_wire(), install_day: -1, install_hour: -1, providers: vec![] }
}

/// The settings a group's machines follow.
pub fn group_settings(store: &Store, group: &str) -> Result<GroupSettings> {
    Ok(match store.get_group(group)? {
        Some(g) => g.settings.unwrap_or_else(builtin_default),
        None => builtin_default(),
    })
}

/// A machine's effective policy: its group's settings; in the default group, overlaid with the
/// settings the machine chose for itself.
pub fn effective(store: &Store, machine: &MachineInfo) -> Result<Policy> {
    let group = store.group_of(&machine.name)?;
    let mut settings = group_settings(store, &group)?;
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
    settings.providers = crate::servers::resolve_providers(store, &settings.providers)?;
    Ok(Policy { group, settings: Some(settings), managed })
}

/// The offers and policy for one machine's check.
pub fn answer(
    store: &Store,
    catalog: &[Update],
    caps: &[ProductLineCap],
    machine: &MachineInfo,
) -> Result<(Vec<Offer>, Policy)> {
    let pins = store.pins_of(&machine.name)?;
    let offers = offers_for(catalog, caps, &pins, machine)?;
    Ok((offers, effective(store, machine)?))
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

/// Status, reasons and per-product state of a machine, as the report and `machine show` give.
pub fn assess(
    store: &Store,
    catalog: &[Update],
    caps: &[ProductLineCap],
    m: &Machine,
) -> Result<(Health, Vec<String>, Vec<ProductState>, MachinePins)> {
    let info = m.info.clone().unwrap_or_default();
    let pins = store.pins_of(&info.name)?;
    let offers = offers_for(catalog, caps, &pins, &info).unwrap_or_default();
    let mut problems = info.problems.clone();
    problems.extend(provider_problems(catalog, &pins));
    let mut waiting: Vec<String> = offers.iter().filter_map(|o| o.update.as_ref().map(|u| u.id.clone())).collect();
    for w in &info.waiting {
        if !waiting.contains(w) {
            waiting.push(w.clone());
        }
    }
    let (health, notes) = if m.is_remote_provider {
        (Health::UpToDate, vec!["remote provider".into()])
    } else {
        classify(&problems, &waiting, info.restart_needed)
    };

    let installed: BTreeMap<&str, &str> =
        info.installed.iter().map(|p| (p.product.as_str(), p.version.as_str())).collect();
    let mut products: BTreeSet<String> = installed.keys().map(|p| p.to_string()).collect();
    let mut target: BTreeMap<String, (String, &'static str)> = BTreeMap::new();
    for o in &offers {
        let Some(u) = &o.update else { continue };
        products.insert(u.product.clone());
        if o.action == ActionKind::Remove as i32 {
            target.insert(u.product.clone(), (o.rollback_to_version.clone(), "removal-waiting"));
        } else {
            target.insert(u.product.clone(), (u.version.clone(), "update-waiting"));
        }
    }
    let states = products
        .into_iter()
        .map(|p| {
            let inst = installed.get(p.as_str()).map(|s| s.to_string()).unwrap_or_default();
            let pinned = pins.pins.get(&p).cloned().unwrap_or_default();
            let (available, status) = match target.get(&p) {
                Some((v, s)) => (v.clone(), *s),
                None if !pinned.is_empty() => (inst.clone(), "pinned"),
                None => (inst.clone(), "up-to-date"),
            };
            ProductState {
                product: p,
                installed_version: inst,
                available_version: available,
                pinned_version: pinned,
                status: status.into(),
            }
        })
        .collect();
    Ok((health, notes, states, pins))
}
