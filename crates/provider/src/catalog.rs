//! Catalog rules on top of the store: turning an imported package into a record, and answering
//! a machine's check with the applicability engine.
use updraft_core::model::{InstallType, UpdateState};
use updraft_core::package::Manifest;
use updraft_core::plan::{self, Action, CatalogItem, InstalledItem};
use updraft_proto::v1::{ActionKind, MachineInfo, Offer, Update};

use crate::error::{ProviderError, Result};

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
    }
}

pub fn state_of(u: &Update) -> Option<UpdateState> {
    UpdateState::from_wire(u.state)
}

pub fn install_type_of(u: &Update) -> InstallType {
    InstallType::from_wire(u.install_type).unwrap_or_default()
}

/// What `machine` must install or remove, in order.
pub fn offers_for(catalog: &[Update], machine: &MachineInfo) -> Result<Vec<Offer>> {
    let items: Vec<CatalogItem> = catalog
        .iter()
        .filter_map(|u| {
            Some(CatalogItem {
                id: u.id.clone(),
                product: u.product.clone(),
                version: u.version.parse().ok()?,
                state: state_of(u)?,
            })
        })
        .collect();
    let mut installed = Vec::new();
    for p in &machine.installed {
        let version = p.version.parse().map_err(|e: updraft_core::CoreError| {
            ProviderError::InvalidArgument(format!("inventory of {:?}, product {:?}: {e}", machine.name, p.product))
        })?;
        installed.push(InstalledItem { product: p.product.clone(), version });
    }
    let find = |id: &str| catalog.iter().find(|u| u.id == id).cloned();
    Ok(plan::plan(&items, &installed)
        .into_iter()
        .map(|a| match a {
            Action::Install { id } => {
                Offer { action: ActionKind::Install as i32, update: find(&id), rollback_to_version: String::new() }
            }
            Action::Remove { id, rollback_to } => Offer {
                action: ActionKind::Remove as i32,
                update: find(&id),
                rollback_to_version: rollback_to.map(|v| v.to_string()).unwrap_or_default(),
            },
        })
        .collect())
}

/// Machine names become store keys and log fields: keep them printable and bounded.
pub fn validate_machine_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
        return Err(ProviderError::InvalidArgument(format!(
            "machine name {:?} must be 1-253 printable characters",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}
