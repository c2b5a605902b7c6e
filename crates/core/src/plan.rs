//! The applicability engine: from the catalog, a machine's inventory, its pins and the product
//! lines' version caps, exactly what to install and remove, in the order to apply it. Pure
//! code, so every tier answers the same way and the rules can be property-tested.
//!
//! Vocabulary: a *release* is a full install (`install`) and the patches (`patch`, `es`) that
//! apply on top of it; they share a release key (the product code when the package sets one,
//! otherwise the version's `MM.mm`).
use std::collections::{BTreeMap, BTreeSet};

use crate::model::{InstallType, UpdateState};
use crate::version::Version;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    pub id: String,
    pub product: String,
    pub product_line: String,
    pub version: Version,
    pub install_type: InstallType,
    /// Product code; empty means "use the version's MM.mm".
    pub product_code: String,
    pub state: UpdateState,
    /// Products to install alongside this update when a machine does not have them.
    pub related_installs: Vec<String>,
}

impl CatalogItem {
    pub fn release_key(&self) -> String {
        release_key(&self.product_code, self.version)
    }
}

/// The release an item or an installed version belongs to.
pub fn release_key(product_code: &str, version: Version) -> String {
    if product_code.is_empty() { format!("{}.{}", version.major, version.minor) } else { product_code.to_string() }
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

impl Action {
    pub fn id(&self) -> &str {
        match self {
            Action::Install { id } | Action::Remove { id, .. } => id,
        }
    }
}

/// Everything the engine looks at besides the catalog.
#[derive(Debug, Clone, Default)]
pub struct MachineView {
    pub installed: Vec<InstalledItem>,
    /// product -> the exact version this machine must run.
    pub pins: BTreeMap<String, Version>,
    /// product line -> highest version offered.
    pub caps: BTreeMap<String, Version>,
}

/// Why an update is not offered although it is GA.
pub fn held_by_cap(item: &CatalogItem, caps: &BTreeMap<String, Version>) -> Option<Version> {
    caps.get(&item.product_line).copied().filter(|cap| item.version > *cap)
}

/// Computes the actions for one machine. Products are handled in name order; a related
/// install follows the product that brought it in.
///
/// Rules, per product:
/// - **Pinned** to V: converge to exactly V, up or down. If V is a patch, its release is
///   installed first when the machine is on another release or above V, then the patches of
///   that release up to V in ascending order.
/// - Otherwise the target release is the newest GA full install within the cap. A machine on
///   an older release (or without the product, when it was asked for) installs it, then that
///   release's GA patches above it, ascending. A machine on the target release takes the GA
///   patches above its version, ascending.
/// - A machine whose installed version is marked `remove`, and that nothing newer replaces,
///   removes it and returns to the newest GA version below.
/// - Nothing is offered from `pre-approval` or `inactive` (a pin may name an inactive
///   version), nothing above a cap, and no machine moves down except by a pin or a removal.
pub fn plan(catalog: &[CatalogItem], machine: &MachineView) -> Vec<Action> {
    let have: BTreeMap<&str, Version> = machine.installed.iter().map(|i| (i.product.as_str(), i.version)).collect();
    let mut products: BTreeSet<&str> = catalog.iter().map(|c| c.product.as_str()).collect();
    products.retain(|p| have.contains_key(p) || machine.pins.contains_key(*p) || wanted_everywhere(catalog, p));
    let mut actions = Vec::new();
    let mut planned: BTreeSet<String> = BTreeSet::new();
    for product in products {
        // Already brought in as a related install of an earlier product.
        if !planned.insert(product.to_string()) {
            continue;
        }
        let acts = plan_product(catalog, machine, product, have.get(product).copied());
        push_with_related(catalog, machine, &have, acts, &mut planned, &mut actions);
    }
    actions
}

/// Products with no installed base still reach machines that lack them: today every machine
/// gets every GA product (groups will narrow this).
fn wanted_everywhere(_catalog: &[CatalogItem], _product: &str) -> bool {
    true
}

fn push_with_related(
    catalog: &[CatalogItem],
    machine: &MachineView,
    have: &BTreeMap<&str, Version>,
    acts: Vec<Action>,
    planned: &mut BTreeSet<String>,
    out: &mut Vec<Action>,
) {
    let mut related = Vec::new();
    for a in &acts {
        if let Action::Install { id } = a
            && let Some(item) = catalog.iter().find(|c| &c.id == id)
        {
            for r in &item.related_installs {
                if !have.contains_key(r.as_str())
                    && !planned.contains(r)
                    && !out.iter().any(|o| product_of(catalog, o) == Some(r))
                {
                    related.push(r.clone());
                }
            }
        }
    }
    out.extend(acts);
    for r in related {
        if planned.insert(r.clone()) {
            let acts = plan_product(catalog, machine, &r, None);
            push_with_related(catalog, machine, have, acts, planned, out);
        }
    }
}

fn product_of<'a>(catalog: &'a [CatalogItem], a: &Action) -> Option<&'a String> {
    catalog.iter().find(|c| c.id == a.id()).map(|c| &c.product)
}

fn plan_product(catalog: &[CatalogItem], m: &MachineView, product: &str, installed: Option<Version>) -> Vec<Action> {
    let of_product: Vec<&CatalogItem> = catalog.iter().filter(|c| c.product == product).collect();
    let installed_release = installed.map(|v| {
        of_product.iter().find(|c| c.version == v).map(|c| c.release_key()).unwrap_or_else(|| release_key("", v))
    });

    if let Some(&pin) = m.pins.get(product) {
        return plan_pin(&of_product, installed, installed_release.as_deref(), pin);
    }

    let offered = |c: &&&CatalogItem| c.state == UpdateState::Ga && held_by_cap(c, &m.caps).is_none();
    let newest_release =
        of_product.iter().filter(offered).filter(|c| c.install_type == InstallType::Install).max_by_key(|c| c.version);
    let patches_above = |release: &str, above: Version| -> Vec<Action> {
        let mut ps: Vec<&&CatalogItem> = of_product
            .iter()
            .filter(offered)
            .filter(|c| c.install_type != InstallType::Install && c.release_key() == release && c.version > above)
            .collect();
        ps.sort_by_key(|c| c.version);
        ps.into_iter().map(|c| Action::Install { id: c.id.clone() }).collect()
    };

    let mut acts = Vec::new();
    match (installed, newest_release) {
        (None, Some(r)) => {
            acts.push(Action::Install { id: r.id.clone() });
            acts.extend(patches_above(&r.release_key(), r.version));
        }
        (Some(v), Some(r)) if r.version > v && Some(r.release_key()) != installed_release => {
            acts.push(Action::Install { id: r.id.clone() });
            acts.extend(patches_above(&r.release_key(), r.version));
        }
        (Some(v), _) => {
            acts.extend(patches_above(installed_release.as_deref().unwrap_or_default(), v));
        }
        (None, None) => {}
    }
    if acts.is_empty()
        && let Some(v) = installed
        && let Some(removed) = of_product.iter().find(|c| c.version == v && c.state == UpdateState::Remove)
    {
        let rollback_to =
            of_product.iter().filter(|c| c.state == UpdateState::Ga && c.version < v).map(|c| c.version).max();
        acts.push(Action::Remove { id: removed.id.clone(), rollback_to });
    }
    acts
}

fn plan_pin(
    of_product: &[&CatalogItem],
    installed: Option<Version>,
    installed_release: Option<&str>,
    pin: Version,
) -> Vec<Action> {
    if installed == Some(pin) {
        return vec![];
    }
    let usable = |c: &&&CatalogItem| matches!(c.state, UpdateState::Ga | UpdateState::Inactive);
    let Some(target) = of_product.iter().filter(usable).find(|c| c.version == pin) else {
        return vec![]; // pinned to a version the catalog cannot provide: hold still
    };
    if target.install_type == InstallType::Install {
        return vec![Action::Install { id: target.id.clone() }];
    }
    let release = target.release_key();
    let on_release_below = installed_release == Some(release.as_str()) && installed.is_some_and(|v| v < pin);
    let mut acts = Vec::new();
    let from = if on_release_below {
        installed.expect("checked above")
    } else {
        let Some(base) = of_product
            .iter()
            .filter(usable)
            .filter(|c| c.install_type == InstallType::Install && c.release_key() == release && c.version <= pin)
            .max_by_key(|c| c.version)
        else {
            return vec![]; // no full install for that release: cannot reach the pin
        };
        acts.push(Action::Install { id: base.id.clone() });
        base.version
    };
    let mut ps: Vec<&&CatalogItem> = of_product
        .iter()
        .filter(|c| c.install_type != InstallType::Install && c.release_key() == release)
        .filter(|c| c.version > from && c.version <= pin)
        .filter(|c| c.state == UpdateState::Ga || c.version == pin)
        .collect();
    ps.sort_by_key(|c| c.version);
    acts.extend(ps.into_iter().map(|c| Action::Install { id: c.id.clone() }));
    acts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(id: &str, product: &str, v: &str, t: InstallType, state: UpdateState) -> CatalogItem {
        CatalogItem {
            id: id.into(),
            product: product.into(),
            product_line: "line".into(),
            version: v.parse().unwrap(),
            install_type: t,
            product_code: String::new(),
            state,
            related_installs: vec![],
        }
    }
    fn ga(id: &str, product: &str, v: &str, t: InstallType) -> CatalogItem {
        item(id, product, v, t, UpdateState::Ga)
    }
    fn view(installed: &[(&str, &str)]) -> MachineView {
        MachineView {
            installed: installed
                .iter()
                .map(|(p, v)| InstalledItem { product: p.to_string(), version: v.parse().unwrap() })
                .collect(),
            ..Default::default()
        }
    }
    fn ids(a: &[Action]) -> Vec<&str> {
        a.iter().map(Action::id).collect()
    }
    use InstallType::{Es, Install, Patch};

    #[test]
    fn release_before_its_patches_in_ascending_order() {
        let cat = vec![
            ga("r1", "a", "15.1.0.0", Install),
            ga("p3", "a", "15.1.3.0", Patch),
            ga("p1", "a", "15.1.1.0", Patch),
            ga("e1", "a", "15.1.3.5", Es),
            item("p4", "a", "15.1.4.0", Patch, UpdateState::PreApproval),
            ga("old", "a", "14.2.9.0", Patch),
        ];
        assert_eq!(ids(&plan(&cat, &view(&[]))), ["r1", "p1", "p3", "e1"]);
        assert_eq!(ids(&plan(&cat, &view(&[("a", "15.1.1.0")]))), ["p3", "e1"]);
        assert_eq!(
            ids(&plan(&cat, &view(&[("a", "14.2.0.0")]))),
            ["r1", "p1", "p3", "e1"],
            "new release replaces an old one"
        );
        assert_eq!(ids(&plan(&cat, &view(&[("a", "15.1.3.5")]))), Vec::<&str>::new());
    }

    #[test]
    fn cap_holds_newer_updates_back() {
        let cat =
            vec![ga("r1", "a", "1.0.0.0", Install), ga("r2", "a", "2.0.0.0", Install), ga("p", "a", "1.0.1.0", Patch)];
        let mut m = view(&[]);
        m.caps.insert("line".into(), "1.9.9.9".parse().unwrap());
        assert_eq!(ids(&plan(&cat, &m)), ["r1", "p"]);
        assert_eq!(held_by_cap(&cat[1], &m.caps), Some("1.9.9.9".parse().unwrap()));
        assert_eq!(held_by_cap(&cat[0], &m.caps), None);
    }

    #[test]
    fn pins_converge_up_and_down() {
        let cat = vec![
            ga("r1", "a", "1.0.0.0", Install),
            ga("p1", "a", "1.0.1.0", Patch),
            item("p2", "a", "1.0.2.0", Patch, UpdateState::Inactive),
            ga("p3", "a", "1.0.3.0", Patch),
            ga("r2", "a", "2.0.0.0", Install),
        ];
        let mut m = view(&[("a", "2.0.0.0")]);
        m.pins.insert("a".into(), "1.0.2.0".parse().unwrap());
        assert_eq!(ids(&plan(&cat, &m)), ["r1", "p1", "p2"], "down to a patch: release, then patches up to the pin");
        m.installed[0].version = "1.0.1.0".parse().unwrap();
        assert_eq!(ids(&plan(&cat, &m)), ["p2"]);
        m.pins.insert("a".into(), "1.0.0.0".parse().unwrap());
        assert_eq!(ids(&plan(&cat, &m)), ["r1"]);
        m.pins.insert("a".into(), "9.9.9.9".parse().unwrap());
        assert!(plan(&cat, &m).is_empty(), "a pin the catalog cannot meet holds the machine still");
    }

    #[test]
    fn related_installs_follow_the_product_that_brings_them() {
        let mut a = ga("a1", "a", "1.0.0.0", Install);
        a.related_installs = vec!["c".into()];
        let cat = vec![
            a,
            ga("b1", "b", "1.0.0.0", Install),
            ga("c1", "c", "3.0.0.0", Install),
            ga("c2", "c", "3.0.1.0", Patch),
        ];
        assert_eq!(ids(&plan(&cat, &view(&[("b", "1.0.0.0")]))), ["a1", "c1", "c2"]);
        assert_eq!(ids(&plan(&cat, &view(&[("b", "1.0.0.0"), ("c", "3.0.1.0")]))), ["a1"]);
    }

    #[test]
    fn removal_rolls_back_to_previous_ga_unless_something_newer_replaces_it() {
        let cat = vec![ga("a1", "a", "1.0.0.0", Install), item("a2", "a", "2.0.0.0", Install, UpdateState::Remove)];
        assert_eq!(
            plan(&cat, &view(&[("a", "2.0.0.0")])),
            vec![Action::Remove { id: "a2".into(), rollback_to: Some("1.0.0.0".parse().unwrap()) }]
        );
        assert!(plan(&cat, &view(&[("a", "1.0.0.0")])).is_empty());
        let mut cat2 = cat.clone();
        cat2.push(ga("a3", "a", "3.0.0.0", Install));
        assert_eq!(ids(&plan(&cat2, &view(&[("a", "2.0.0.0")]))), ["a3"]);
    }

    fn state() -> impl Strategy<Value = UpdateState> {
        prop_oneof![
            Just(UpdateState::PreApproval),
            Just(UpdateState::Ga),
            Just(UpdateState::Inactive),
            Just(UpdateState::Remove)
        ]
    }
    fn itype() -> impl Strategy<Value = InstallType> {
        prop_oneof![Just(Install), Just(Patch), Just(Es)]
    }

    /// Applies a plan the way an agent does: each install sets the product's version; a removal
    /// goes to its rollback version (or uninstalls).
    fn apply(cat: &[CatalogItem], m: &MachineView, actions: &[Action]) -> MachineView {
        let mut have: BTreeMap<String, Version> = m.installed.iter().map(|i| (i.product.clone(), i.version)).collect();
        for a in actions {
            let c = cat.iter().find(|c| c.id == a.id()).unwrap();
            match a {
                Action::Install { .. } => {
                    have.insert(c.product.clone(), c.version);
                }
                Action::Remove { rollback_to: Some(v), .. } => {
                    have.insert(c.product.clone(), *v);
                }
                Action::Remove { rollback_to: None, .. } => {
                    have.remove(&c.product);
                }
            }
        }
        MachineView {
            installed: have.into_iter().map(|(product, version)| InstalledItem { product, version }).collect(),
            ..m.clone()
        }
    }

    proptest! {
        #[test]
        fn plan_invariants(
            entries in proptest::collection::vec((0u8..3, 0u32..3, 0u32..4, itype(), state()), 0..14),
            inst in proptest::collection::vec((0u8..3, 0u32..3, 0u32..4), 0..3),
            cap in proptest::option::of(0u32..3),
            pin in proptest::option::of((0u8..3, 0u32..3, 0u32..4)),
        ) {
            let mut cat: Vec<CatalogItem> = Vec::new();
            for (i, (p, minor, patch, t, s)) in entries.iter().enumerate() {
                let version = Version::new(1, *minor, if *t == Install { 0 } else { *patch }, 0);
                if cat.iter().any(|c| c.product == format!("p{p}") && c.version == version) { continue; }
                cat.push(CatalogItem { id: format!("u{i}"), product: format!("p{p}"), product_line: "l".into(), version,
                    install_type: if version.patch == 0 { Install } else { *t }, product_code: String::new(), state: *s, related_installs: vec![] });
            }
            let mut m = MachineView::default();
            for (p, minor, patch) in inst {
                if m.installed.iter().any(|i| i.product == format!("p{p}")) { continue; }
                m.installed.push(InstalledItem { product: format!("p{p}"), version: Version::new(1, minor, patch, 0) });
            }
            if let Some(c) = cap { m.caps.insert("l".into(), Version::new(1, c, 9, 0)); }
            if let Some((p, minor, patch)) = pin { m.pins.insert(format!("p{p}"), Version::new(1, minor, patch, 0)); }

            let actions = plan(&cat, &m);
            let mut seen_ids = BTreeSet::new();
            let mut last_version: BTreeMap<&str, Version> = BTreeMap::new();
            for a in &actions {
                prop_assert!(seen_ids.insert(a.id().to_string()), "no update twice");
                let c = cat.iter().find(|c| c.id == a.id()).unwrap();
                let pinned = m.pins.get(&c.product);
                if let Action::Install { .. } = a {
                    if pinned.is_none() {
                        prop_assert_eq!(c.state, UpdateState::Ga);
                        prop_assert!(held_by_cap(c, &m.caps).is_none(), "nothing above the cap");
                    } else {
                        prop_assert!(c.version <= *pinned.unwrap(), "nothing above a pin");
                        prop_assert!(matches!(c.state, UpdateState::Ga | UpdateState::Inactive));
                    }
                    // Within a product, versions only go up through the plan.
                    if let Some(prev) = last_version.get(c.product.as_str()) {
                        prop_assert!(c.version > *prev, "ascending within a product");
                        prop_assert!(c.install_type != Install, "one full install per product at most, first");
                    }
                    last_version.insert(&c.product, c.version);
                }
            }
            // Applying the plan converges: a second plan has nothing to install.
            let after = apply(&cat, &m, &actions);
            let again = plan(&cat, &after);
            prop_assert!(again.iter().all(|a| matches!(a, Action::Remove { .. })), "converged, got {:?} after {:?}", again, actions);
            // A pin that the catalog can meet is met.
            for (p, v) in &m.pins {
                let reachable = !plan_product(&cat, &m, p, m.installed.iter().find(|i| &i.product == p).map(|i| i.version)).is_empty();
                if reachable {
                    prop_assert_eq!(after.installed.iter().find(|i| &i.product == p).map(|i| i.version), Some(*v));
                }
            }
        }
    }
}
