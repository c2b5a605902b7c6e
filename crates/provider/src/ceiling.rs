//! Role ceilings (seed 001: "it is not possible to update clients to higher versions than the
//! server"). A product line capped with `--follow-role server` is held, for every machine of
//! another role, at the lowest version of it installed on any `server`. The centre keeps that
//! version in the cap record as machines report, so it travels to sites like any cap change
//! and every tier's engine reads it from there.
use std::collections::{BTreeMap, BTreeSet};

use updraft_core::Version;
use updraft_core::model::Role;
use updraft_proto::v1::{MachineInfo, ProductLineCap};

use crate::Shared;
use crate::error::Result;
use crate::policy::role_of;

/// Machines that counted in the last computation: when one of them changes role or version,
/// the ceilings are computed again even if it no longer has a followed role.
#[derive(Default)]
pub struct Sources(tokio::sync::Mutex<BTreeSet<String>>);

/// After `machine` reported: recomputes the ceilings if it has (or had) a role some cap follows.
/// Runs on every check at the centre: it reads the caps from the catalog snapshot.
pub async fn after_report(shared: &Shared, machine: &MachineInfo) -> Result<()> {
    let catalog = shared.catalog()?;
    let followed: BTreeSet<Role> = catalog
        .caps
        .iter()
        .filter(|c| !c.follow_role.is_empty())
        .filter_map(|c| Role::from_wire(&c.follow_role).ok())
        .collect();
    if followed.is_empty() {
        return Ok(());
    }
    let role = role_of(&catalog.decided, machine)?;
    let counted = shared.ceiling_sources.0.lock().await.contains(&machine.name);
    if followed.contains(&role) || counted { refresh(shared).await } else { Ok(()) }
}

/// Recomputes every role ceiling from the machines' inventories; writes (and publishes) only
/// the ones that changed. One at a time, so a slower computation never overwrites a newer one.
pub async fn refresh(shared: &Shared) -> Result<()> {
    let mut sources = shared.ceiling_sources.0.lock().await;
    let store = &shared.store;
    let catalog = shared.catalog()?;
    let caps: Vec<ProductLineCap> = catalog.caps.iter().filter(|c| !c.follow_role.is_empty()).cloned().collect();
    if caps.is_empty() {
        sources.clear();
        return Ok(());
    }
    let line_of: BTreeMap<&str, &str> =
        catalog.updates.iter().map(|u| (u.product.as_str(), u.product_line.as_str())).collect();
    let mut lowest: BTreeMap<(Role, String), Version> = BTreeMap::new();
    let mut counted = BTreeSet::new();
    for info in store.list_agents()? {
        let Ok(role) = role_of(&catalog.decided, &info) else { continue };
        if !caps.iter().any(|c| c.follow_role == role.as_str()) {
            continue;
        }
        counted.insert(info.name.clone());
        for p in &info.installed {
            let (Some(line), Ok(v)) = (line_of.get(p.product.as_str()), p.version.parse::<Version>()) else { continue };
            lowest.entry((role, line.to_string())).and_modify(|low| *low = (*low).min(v)).or_insert(v);
        }
    }
    *sources = counted;
    for mut cap in caps {
        let Ok(role) = Role::from_wire(&cap.follow_role) else { continue };
        let ceiling = lowest.get(&(role, cap.product_line.clone())).map(|v| v.to_string()).unwrap_or_default();
        if ceiling != cap.ceiling {
            tracing::info!(line = %cap.product_line, role = %role, from = %cap.ceiling, to = %ceiling, "role ceiling moved");
            cap.ceiling = ceiling;
            store.set_cap(&cap).await?;
        }
    }
    Ok(())
}
