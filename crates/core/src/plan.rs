//! The applicability engine: from the catalog and a machine's inventory, what to install and
//! what to remove, in the order to apply it. Pure code, so every tier answers the same way.
use std::collections::{BTreeMap, BTreeSet};

use crate::model::UpdateState;
use crate::version::Version;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    pub id: String,
    pub product: String,
    pub version: Version,
    pub state: UpdateState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledItem {
    pub product: String,
    pub version: Version,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Install (or upgrade to) this update.
    Install { id: String },
    /// The installed update is marked `remove`: uninstall it, returning to `rollback_to` (the
    /// newest GA version below it) when there is one.
    Remove { id: String, rollback_to: Option<Version> },
}

/// Computes the actions for one machine, ordered by product name so answers are stable.
///
/// Rules: a product's target is its newest GA update; a machine below the target (or without
/// the product) installs it; otherwise a machine whose installed version is marked `remove`
/// removes it, returning to the newest GA version below;
/// nothing is ever offered from `pre-approval` or `inactive`, and no machine is downgraded
/// except by a removal.
pub fn plan(catalog: &[CatalogItem], installed: &[InstalledItem]) -> Vec<Action> {
    let have: BTreeMap<&str, Version> = installed.iter().map(|i| (i.product.as_str(), i.version)).collect();
    let products: BTreeSet<&str> = catalog.iter().map(|c| c.product.as_str()).collect();
    let mut actions = Vec::new();
    for product in products {
        let of_product = || catalog.iter().filter(move |c| c.product == product);
        let installed_version = have.get(product).copied();
        let target = of_product().filter(|c| c.state == UpdateState::Ga).max_by_key(|c| c.version);
        // A newer GA release moves a machine forward, off a removed version, in one step.
        if let Some(t) = target
            && installed_version.is_none_or(|v| t.version > v)
        {
            actions.push(Action::Install { id: t.id.clone() });
            continue;
        }
        if let Some(v) = installed_version
            && let Some(removed) = of_product().find(|c| c.version == v && c.state == UpdateState::Remove)
        {
            let rollback_to =
                of_product().filter(|c| c.state == UpdateState::Ga && c.version < v).map(|c| c.version).max();
            actions.push(Action::Remove { id: removed.id.clone(), rollback_to });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(id: &str, product: &str, v: &str, state: UpdateState) -> CatalogItem {
        CatalogItem { id: id.into(), product: product.into(), version: v.parse().unwrap(), state }
    }
    fn have(product: &str, v: &str) -> InstalledItem {
        InstalledItem { product: product.into(), version: v.parse().unwrap() }
    }

    #[test]
    fn newest_ga_is_installed_and_others_ignored() {
        let cat = vec![
            item("a1", "a", "1.0.0.0", UpdateState::Ga),
            item("a2", "a", "2.0.0.0", UpdateState::Ga),
            item("a3", "a", "3.0.0.0", UpdateState::PreApproval),
            item("b1", "b", "1.0.0.0", UpdateState::Inactive),
        ];
        assert_eq!(plan(&cat, &[]), vec![Action::Install { id: "a2".into() }]);
        assert_eq!(plan(&cat, &[have("a", "2.0.0.0")]), vec![]);
        assert_eq!(plan(&cat, &[have("a", "9.0.0.0")]), vec![], "never downgrades");
    }

    #[test]
    fn removal_rolls_back_to_previous_ga() {
        let cat = vec![item("a1", "a", "1.0.0.0", UpdateState::Ga), item("a2", "a", "2.0.0.0", UpdateState::Remove)];
        assert_eq!(
            plan(&cat, &[have("a", "2.0.0.0")]),
            vec![Action::Remove { id: "a2".into(), rollback_to: Some("1.0.0.0".parse().unwrap()) }]
        );
        assert_eq!(plan(&cat, &[have("a", "1.0.0.0")]), vec![]);
    }

    fn state() -> impl Strategy<Value = UpdateState> {
        prop_oneof![
            Just(UpdateState::PreApproval),
            Just(UpdateState::Ga),
            Just(UpdateState::Inactive),
            Just(UpdateState::Remove)
        ]
    }

    proptest! {
        #[test]
        fn plan_invariants(
            entries in proptest::collection::vec((0u8..3, 0u32..5, state()), 0..12),
            inst in proptest::collection::vec((0u8..3, 0u32..5), 0..3),
        ) {
            let mut cat: Vec<CatalogItem> = Vec::new();
            for (i, (p, v, s)) in entries.iter().enumerate() {
                let version = Version::new(*v, 0, 0, 0);
                // One catalog entry per product+version, as the provider guarantees.
                if cat.iter().any(|c| c.product == format!("p{p}") && c.version == version) { continue; }
                cat.push(CatalogItem { id: format!("u{i}"), product: format!("p{p}"), version, state: *s });
            }
            let mut installed: Vec<InstalledItem> = Vec::new();
            for (p, v) in inst {
                if installed.iter().any(|i| i.product == format!("p{p}")) { continue; }
                installed.push(InstalledItem { product: format!("p{p}"), version: Version::new(v, 0, 0, 0) });
            }
            let actions = plan(&cat, &installed);
            let mut products = BTreeSet::new();
            for a in &actions {
                let id = match a { Action::Install { id } | Action::Remove { id, .. } => id };
                let c = cat.iter().find(|c| &c.id == id).unwrap();
                prop_assert!(products.insert(c.product.clone()), "one action per product");
                let inst = installed.iter().find(|i| i.product == c.product);
                match a {
                    Action::Install { .. } => {
                        prop_assert_eq!(c.state, UpdateState::Ga);
                        prop_assert!(inst.is_none_or(|i| i.version < c.version));
                        prop_assert!(!cat.iter().any(|o| o.product == c.product && o.state == UpdateState::Ga && o.version > c.version));
                    }
                    Action::Remove { rollback_to, .. } => {
                        prop_assert_eq!(c.state, UpdateState::Remove);
                        prop_assert!(!cat.iter().any(|o| o.product == c.product && o.state == UpdateState::Ga && o.version > c.version));
                        prop_assert_eq!(inst.map(|i| i.version), Some(c.version));
                        if let Some(r) = rollback_to { prop_assert!(*r < c.version); }
                    }
                }
            }
            // Applying the plan converges: a machine on every target needs nothing more.
            let after: Vec<InstalledItem> = cat.iter()
                .map(|c| c.product.clone()).collect::<BTreeSet<_>>().into_iter()
                .filter_map(|p| {
                    let cur = installed.iter().find(|i| i.product == p).map(|i| i.version);
                    let act = actions.iter().find_map(|a| match a {
                        Action::Install { id } => cat.iter().find(|c| &c.id == id && c.product == p).map(|c| Some(c.version)),
                        Action::Remove { id, rollback_to } => cat.iter().find(|c| &c.id == id && c.product == p).map(|_| *rollback_to),
                    });
                    match act { Some(v) => v, None => cur }.map(|version| InstalledItem { product: p, version })
                })
                .collect();
            let again = plan(&cat, &after);
            prop_assert!(again.iter().all(|a| matches!(a, Action::Remove { .. })) || again.is_empty(),
                "after applying, only removals of a rolled-back-to version that is itself removed may remain: {:?}", again);
        }
    }
}
