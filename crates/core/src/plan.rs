//! The applicability engine: from the catalog and one machine's view of it (inventory,
//! deployments, pins, caps, role ceilings), exactly what to install and remove, in the order
//! to apply it — and, for every approved update it does not offer, the rule that held it.
//! Pure code, so every tier answers the same way and the rules can be property-tested.
//!
//! Vocabulary: a *release* is a full install (`install`) and the patches (`patch`, `es`) that
//! apply on top of it; they share a release key (the product code when the package sets one,
//! otherwise the version's `MM.mm`). An *ES* (engineering special) sits on one patch: the one
//! its package names, or else the patch with its `MM.mm.PP`.
//!
//! Rules:
//! - **Applicability.** A machine is offered updates only for the products it has (its
//!   inventory), the products deployed to it, the products it is pinned to, related installs of
//!   products it has or is being given, and the agent's own product where the agent has it.
//!   Nothing else, high priority included.
//! - **Identity.** An installed product and a catalog record are the same product when their
//!   names match and, where both carry an upgrade code, the codes match. A same-named record
//!   with another upgrade code is someone else's product and is never offered.
//! - **Order.** The agent's own product first; then products in name order, each followed by
//!   the related installs it brings in; within a product the release before its patches,
//!   patches ascending, ES last and only on the patch it belongs to.
//! - **Nothing skipped in silence.** Every GA update of an applicable product that is newer
//!   than where the plan leaves the machine, and not offered, comes back in [`Plan::held`] with
//!   the rule that held it.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::model::{InstallType, Role, UpdateState};
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
    /// Identifies the product across releases; empty when the package has none.
    pub upgrade_code: String,
    /// For an ES: the patch version it must sit on (None: the patch with its `MM.mm.PP`).
    pub requires: Option<Version>,
    pub state: UpdateState,
    /// Products to install alongside this update when a machine does not have them.
    pub related_installs: Vec<String>,
}

impl CatalogItem {
    pub fn release_key(&self) -> String {
        release_key(&self.product_code, self.version)
    }

    /// Whether this ES may sit on a machine whose patch level is `base`.
    fn fits_patch(&self, base: Version) -> bool {
        match self.requires {
            Some(r) => r == base,
            None => {
                (self.version.major, self.version.minor, self.version.patch) == (base.major, base.minor, base.patch)
            }
        }
    }

    /// The patch an ES belongs to.
    fn required_patch(&self) -> Version {
        self.requires.unwrap_or(Version::new(self.version.major, self.version.minor, self.version.patch, 0))
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
    /// From the install receipt; empty when unknown (adopted without one, older agents).
    pub upgrade_code: String,
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

/// A product line that machines of other roles may not run ahead of: the lowest version of it
/// installed on any machine of `role` (None: no such machine runs it yet, so nothing newer
/// than what they have is offered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ceiling {
    pub role: Role,
    pub version: Option<Version>,
}

/// Everything the engine looks at besides the catalog.
#[derive(Debug, Clone, Default)]
pub struct MachineView {
    pub installed: Vec<InstalledItem>,
    /// Products deployed to this machine (directly or through its group).
    pub deployed: BTreeSet<String>,
    /// product -> the exact version this machine must run.
    pub pins: BTreeMap<String, Version>,
    /// product line -> highest version offered.
    pub caps: BTreeMap<String, Version>,
    /// product line -> the role ceiling it follows.
    pub ceilings: BTreeMap<String, Ceiling>,
    pub role: Role,
    /// The agent's own product, installed first when the machine has it.
    pub self_product: Option<String>,
    /// Updates a rollout keeps from this machine for now, by id, and why (see
    /// [`crate::rollout::hold`]); like a cap, and like a cap ignored by a pin.
    pub rollout: BTreeMap<String, Hold>,
}

/// Why an approved (GA) update is not offered to a machine that has, or is given, its product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// Above the product line's cap.
    Cap { line: String, cap: Version },
    /// Above the version the machines of `role` run (or none of them runs the line yet).
    Ceiling { line: String, role: Role, version: Option<Version> },
    /// The machine is pinned to another version.
    Pinned { version: Version },
    /// An ES for a patch the machine is not on.
    OtherPatch { requires: Version, on: Version },
    /// Same name, another upgrade code: not the product the machine has.
    OtherProduct { upgrade_code: String, installed: String },
    /// Needs a release that is not approved (or itself held) for this machine.
    NoRelease { release: String },
    /// Its rollout has not reached the machine's wave (both from 0).
    Wave { wave: usize, open: usize },
    /// Its rollout halted: machines that have not taken it wait for an administrator.
    Halted,
    /// Its rollout is for another group's machines.
    OutsideRollout { group: String },
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Cap { line, cap } => write!(f, "product line {line} is capped at {cap}"),
            Hold::Ceiling { line, role, version: Some(v) } => {
                write!(f, "product line {line} follows role {role}: no {role} runs above {v}")
            }
            Hold::Ceiling { line, role, version: None } => {
                write!(f, "product line {line} follows role {role}: no {role} runs it yet")
            }
            Hold::Pinned { version } => write!(f, "the machine is pinned to {version}"),
            Hold::OtherPatch { requires, on } => write!(f, "ES for patch {requires}; the machine is on {on}"),
            Hold::OtherProduct { upgrade_code, installed } => write!(
                f,
                "upgrade code {upgrade_code} is not the installed product's ({})",
                if installed.is_empty() { "none" } else { installed }
            ),
            Hold::NoRelease { release } => write!(f, "its release {release} is not approved for this machine"),
            Hold::Wave { wave, open } => {
                write!(f, "rollout: the machine is in wave {}, waves 1-{} are open", wave + 1, open + 1)
            }
            Hold::Halted => write!(f, "rollout halted: waiting for an administrator (`admin-cli rollout status`)"),
            Hold::OutsideRollout { group } => write!(f, "rollout is for group {group} only"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub id: String,
    pub product: String,
    pub hold: Hold,
}

/// What the engine decided for one machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// In the order the agent must apply them.
    pub actions: Vec<Action>,
    /// Approved updates of the machine's products that are not offered, and why.
    pub held: Vec<Held>,
    /// Every product the plan considered: what the machine has or is given, with related
    /// installs.
    pub products: BTreeSet<String>,
}

/// Why an update is above a plain cap.
pub fn held_by_cap(item: &CatalogItem, caps: &BTreeMap<String, Version>) -> Option<Version> {
    caps.get(&item.product_line).copied().filter(|cap| item.version > *cap)
}

/// The rollout, cap or role ceiling that keeps `item` from a machine with this view, if any.
fn limit(item: &CatalogItem, m: &MachineView) -> Option<Hold> {
    if let Some(h) = m.rollout.get(&item.id) {
        return Some(h.clone());
    }
    if let Some(cap) = held_by_cap(item, &m.caps) {
        return Some(Hold::Cap { line: item.product_line.clone(), cap });
    }
    let c = m.ceilings.get(&item.product_line)?;
    let above = c.version.is_none_or(|v| item.version > v);
    (c.role != m.role && above).then(|| Hold::Ceiling {
        line: item.product_line.clone(),
        role: c.role,
        version: c.version,
    })
}

/// The products a machine is offered anything for, before related installs.
pub fn applicable(m: &MachineView) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = m.installed.iter().map(|i| i.product.clone()).collect();
    out.extend(m.deployed.iter().cloned());
    out.extend(m.pins.keys().cloned());
    out
}

/// Computes the plan for one machine (see the module's rules).
/// The update a removal of `product` returns to when the machine does not keep it: the GA
/// item of the version [`Action::Remove`] names.
pub fn rollback_item<'a>(catalog: &'a [CatalogItem], product: &str, to: Version) -> Option<&'a CatalogItem> {
    catalog.iter().find(|c| c.product == product && c.version == to && c.state == UpdateState::Ga)
}

pub fn plan(catalog: &[CatalogItem], machine: &MachineView) -> Plan {
    let mut products: Vec<String> = applicable(machine).into_iter().collect();
    // The agent's own product first (seed 004: the newest updater before anything else).
    if let Some(me) = &machine.self_product
        && let Some(pos) = products.iter().position(|p| p == me)
    {
        let me = products.remove(pos);
        products.insert(0, me);
    }
    let mut out = Plan::default();
    let mut planned: BTreeSet<String> = BTreeSet::new();
    for product in products {
        add_product(catalog, machine, &product, &mut planned, &mut out);
    }
    // However it came in (even as another product's related install), the updater goes first.
    if let Some(me) = &machine.self_product {
        let is_me = |a: &Action| catalog.iter().any(|c| c.id == a.id() && &c.product == me);
        let (mine, rest): (Vec<Action>, Vec<Action>) = out.actions.into_iter().partition(is_me);
        out.actions = mine.into_iter().chain(rest).collect();
    }
    out.products = planned;
    out
}

/// Plans `product` (once) and then the related installs it brings in.
fn add_product(
    catalog: &[CatalogItem],
    m: &MachineView,
    product: &str,
    planned: &mut BTreeSet<String>,
    out: &mut Plan,
) {
    if !planned.insert(product.to_string()) {
        return;
    }
    let installed = m.installed.iter().find(|i| i.product == product);
    let (acts, held) = plan_product(catalog, m, product, installed);
    // Related installs of what the machine has or is being given (an install, or the version
    // a removal returns it to).
    let mut related = Vec::new();
    let ids: BTreeSet<&str> = acts.iter().filter(|a| matches!(a, Action::Install { .. })).map(Action::id).collect();
    let back_to: Option<Version> = acts.iter().find_map(|a| match a {
        Action::Remove { rollback_to, .. } => *rollback_to,
        Action::Install { .. } => None,
    });
    for c in catalog.iter().filter(|c| c.product == product) {
        let has_it = installed.is_some_and(|i| i.version == c.version && same_product(i, c));
        if has_it || ids.contains(c.id.as_str()) || back_to == Some(c.version) {
            related.extend(c.related_installs.iter().cloned());
        }
    }
    out.actions.extend(acts);
    out.held.extend(held);
    for r in related {
        add_product(catalog, m, &r, planned, out);
    }
}

/// Whether a catalog record is the installed product (see "Identity").
fn same_product(i: &InstalledItem, c: &CatalogItem) -> bool {
    i.product == c.product
        && (i.upgrade_code.is_empty() || c.upgrade_code.is_empty() || i.upgrade_code == c.upgrade_code)
}

fn plan_product(
    catalog: &[CatalogItem],
    m: &MachineView,
    product: &str,
    installed: Option<&InstalledItem>,
) -> (Vec<Action>, Vec<Held>) {
    let mut held = Vec::new();
    let named = catalog.iter().filter(|c| c.product == product);
    let (of_product, strangers): (Vec<&CatalogItem>, Vec<&CatalogItem>) =
        named.partition(|c| installed.is_none_or(|i| same_product(i, c)));
    let installed_v = installed.map(|i| i.version);
    for c in strangers.iter().filter(|c| c.state == UpdateState::Ga && installed_v.is_none_or(|v| c.version > v)) {
        let installed_code = installed.map(|i| i.upgrade_code.clone()).unwrap_or_default();
        let hold = Hold::OtherProduct { upgrade_code: c.upgrade_code.clone(), installed: installed_code };
        held.push(Held { id: c.id.clone(), product: product.to_string(), hold });
    }
    let item_at = |v: Version| of_product.iter().find(|c| c.version == v).copied();
    let installed_release =
        installed_v.map(|v| item_at(v).map(|c| c.release_key()).unwrap_or_else(|| release_key("", v)));
    // The patch level a version stands for: an ES stands on its patch.
    let base_of = |v: Version| match item_at(v) {
        Some(c) if c.install_type == InstallType::Es => c.required_patch(),
        _ => v,
    };

    let acts = if let Some(&pin) = m.pins.get(product) {
        plan_pin(&of_product, installed_v, installed_release.as_deref(), pin)
    } else {
        plan_free(&of_product, m, installed_v, installed_release.as_deref(), base_of)
    };

    // Where the plan leaves the machine, and on which patch.
    let last_install = acts.iter().rev().find_map(|a| match a {
        Action::Install { id } => of_product.iter().find(|c| &c.id == id).copied(),
        Action::Remove { .. } => None,
    });
    let (final_v, final_base) = match last_install {
        Some(c) => (Some(c.version), if c.install_type == InstallType::Es { c.required_patch() } else { c.version }),
        None => (installed_v, installed_v.map(&base_of).unwrap_or(Version::new(0, 0, 0, 0))),
    };
    let offered: BTreeSet<&str> = acts.iter().map(Action::id).collect();
    for c in of_product.iter().filter(|c| c.state == UpdateState::Ga && !offered.contains(c.id.as_str())) {
        if final_v.is_some_and(|v| c.version <= v) {
            continue;
        }
        let hold = if let Some(&version) = m.pins.get(product) {
            Hold::Pinned { version }
        } else if let Some(h) = limit(c, m) {
            h
        } else if c.install_type == InstallType::Es && final_v.is_some() && !c.fits_patch(final_base) {
            Hold::OtherPatch { requires: c.required_patch(), on: final_base }
        } else {
            // A patch or ES of a release the machine is not on and is not given: every other
            // newer GA update of an applicable product is offered (the property test checks).
            Hold::NoRelease { release: c.release_key() }
        };
        held.push(Held { id: c.id.clone(), product: product.to_string(), hold });
    }
    (acts, held)
}

/// A product that is not pinned: the newest approved release within caps and ceilings, then its
/// patches ascending, then the ESs of the patch reached; or a removal back to the previous GA.
fn plan_free(
    of_product: &[&CatalogItem],
    m: &MachineView,
    installed: Option<Version>,
    installed_release: Option<&str>,
    base_of: impl Fn(Version) -> Version,
) -> Vec<Action> {
    let offered = |c: &&&CatalogItem| c.state == UpdateState::Ga && limit(c, m).is_none();
    let newest_release =
        of_product.iter().filter(offered).filter(|c| c.install_type == InstallType::Install).max_by_key(|c| c.version);

    let mut acts = Vec::new();
    // (release, version reached, patch level reached)
    let mut at: Option<(String, Version, Version)> =
        installed.map(|v| (installed_release.unwrap_or_default().to_string(), v, base_of(v)));
    match (installed, newest_release) {
        // Not installed, or a newer full install (another release, or a rebuilt one).
        (None, Some(r)) => {
            acts.push(Action::Install { id: r.id.clone() });
            at = Some((r.release_key(), r.version, r.version));
        }
        (Some(v), Some(r)) if r.version > v => {
            acts.push(Action::Install { id: r.id.clone() });
            at = Some((r.release_key(), r.version, r.version));
        }
        _ => {}
    }
    if let Some((release, from, mut base)) = at.clone() {
        let mut patches: Vec<&&CatalogItem> = of_product
            .iter()
            .filter(offered)
            .filter(|c| c.install_type == InstallType::Patch && c.release_key() == release && c.version > from)
            .collect();
        patches.sort_by_key(|c| c.version);
        let mut reached = from;
        for p in patches {
            acts.push(Action::Install { id: p.id.clone() });
            reached = p.version;
            base = p.version;
        }
        let mut es: Vec<&&CatalogItem> = of_product
            .iter()
            .filter(offered)
            .filter(|c| c.install_type == InstallType::Es && c.release_key() == release)
            .filter(|c| c.version > reached && c.fits_patch(base))
            .collect();
        es.sort_by_key(|c| c.version);
        acts.extend(es.into_iter().map(|c| Action::Install { id: c.id.clone() }));
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

/// Pinned to `pin`: converge to exactly it, up or down. If it is a patch, its release is
/// installed first when the machine is on another release or above it, then the patches of
/// that release up to it in ascending order. Pins ignore caps and ceilings (they are an
/// administrator's explicit choice) and may name an inactive version.
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
    // An ES pin goes through its own patch; any other pin through the patches up to it.
    let upto = if target.install_type == InstallType::Es { target.required_patch() } else { pin };
    let on_release_below = installed_release == Some(release.as_str()) && installed.is_some_and(|v| v <= upto);
    let mut acts = Vec::new();
    let from = if on_release_below {
        installed.expect("checked above")
    } else {
        let Some(base) = of_product
            .iter()
            .filter(usable)
            .filter(|c| c.install_type == InstallType::Install && c.release_key() == release && c.version <= upto)
            .max_by_key(|c| c.version)
        else {
            return vec![]; // no full install for that release: cannot reach the pin
        };
        acts.push(Action::Install { id: base.id.clone() });
        base.version
    };
    let mut ps: Vec<&&CatalogItem> = of_product
        .iter()
        .filter(usable)
        .filter(|c| c.install_type == InstallType::Patch && c.release_key() == release)
        .filter(|c| c.version > from && c.version <= upto)
        .filter(|c| c.state == UpdateState::Ga || c.version == upto)
        .collect();
    ps.sort_by_key(|c| c.version);
    let reached = ps.last().map(|c| c.version).unwrap_or(from);
    acts.extend(ps.into_iter().map(|c| Action::Install { id: c.id.clone() }));
    if target.install_type == InstallType::Es {
        if reached != upto {
            return vec![]; // the ES's patch is not in the catalog: cannot reach the pin
        }
        acts.push(Action::Install { id: target.id.clone() });
    }
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
            upgrade_code: String::new(),
            requires: None,
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
                .map(|(p, v)| InstalledItem {
                    product: p.to_string(),
                    version: v.parse().unwrap(),
                    upgrade_code: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }
    fn ids(p: &Plan) -> Vec<&str> {
        p.actions.iter().map(Action::id).collect()
    }
    fn holds(p: &Plan) -> Vec<(&str, String)> {
        p.held.iter().map(|h| (h.id.as_str(), h.hold.to_string())).collect()
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
        let mut fresh = view(&[]);
        fresh.deployed.insert("a".into());
        assert_eq!(ids(&plan(&cat, &fresh)), ["r1", "p1", "p3", "e1"]);
        assert_eq!(ids(&plan(&cat, &view(&[("a", "15.1.1.0")]))), ["p3", "e1"]);
        assert_eq!(
            ids(&plan(&cat, &view(&[("a", "14.2.0.0")]))),
            ["r1", "p1", "p3", "e1"],
            "new release replaces an old one"
        );
        assert_eq!(ids(&plan(&cat, &view(&[("a", "15.1.3.5")]))), Vec::<&str>::new());
    }

    #[test]
    fn only_products_the_machine_has_or_is_given() {
        let mut client = ga("c1", "client", "1.0.0.0", Install);
        client.related_installs = vec!["helper".into()];
        let cat = vec![
            client,
            ga("c2", "client", "1.0.1.0", Patch),
            ga("h1", "helper", "2.0.0.0", Install),
            ga("s1", "serveronly", "3.0.0.0", Install),
        ];
        assert!(plan(&cat, &view(&[])).actions.is_empty(), "an empty machine gets nothing");
        assert_eq!(
            ids(&plan(&cat, &view(&[("client", "1.0.0.0")]))),
            ["c2", "h1"],
            "its patches and the related helper"
        );
        let mut lab = view(&[]);
        lab.deployed.insert("client".into());
        assert_eq!(ids(&plan(&cat, &lab)), ["c1", "c2", "h1"]);
        let mut pinned = view(&[]);
        pinned.pins.insert("serveronly".into(), "3.0.0.0".parse().unwrap());
        assert_eq!(ids(&plan(&cat, &pinned)), ["s1"], "a pin on a product the machine lacks deploys it");
    }

    #[test]
    fn the_agent_itself_comes_first() {
        let cat = vec![ga("a2", "aaa", "2.0.0.0", Install), ga("u2", "updraft-agent", "2.0.0.0", Install)];
        let mut m = view(&[("aaa", "1.0.0.0"), ("updraft-agent", "1.0.0.0")]);
        assert_eq!(ids(&plan(&cat, &m)), ["a2", "u2"]);
        m.self_product = Some("updraft-agent".into());
        assert_eq!(ids(&plan(&cat, &m)), ["u2", "a2"]);
    }

    #[test]
    fn a_rebuilt_release_is_offered() {
        let cat = vec![ga("d1", "demo", "1.0.0.1", Install), ga("d2", "demo", "1.0.0.2", Install)];
        assert_eq!(ids(&plan(&cat, &view(&[("demo", "1.0.0.1")]))), ["d2"]);
    }

    #[test]
    fn an_es_only_on_its_own_patch() {
        let mut es_p1 = ga("e1", "a", "1.0.1.7", Es);
        es_p1.requires = Some("1.0.1.0".parse().unwrap());
        let cat = vec![ga("r", "a", "1.0.0.0", Install), ga("p1", "a", "1.0.1.0", Patch), es_p1.clone()];
        assert_eq!(ids(&plan(&cat, &view(&[("a", "1.0.0.0")]))), ["p1", "e1"], "the patch, then its ES");
        let mut cat2 = cat.clone();
        cat2.push(ga("p2", "a", "1.0.2.0", Patch));
        let p = plan(&cat2, &view(&[("a", "1.0.1.0")]));
        assert_eq!(ids(&p), ["p2"], "a newer patch leaves the ES of the old one behind");
        assert!(p.held.is_empty(), "the ES is older than where the machine goes: {:?}", p.held);
        // An ES for patch 1.0.1.0 that is numbered above patch 1.0.2.0 is held on a 1.0.2.0 machine.
        let mut odd = es_p1;
        odd.id = "e9".into();
        odd.version = "1.0.2.9".parse().unwrap();
        cat2.push(odd);
        let p = plan(&cat2, &view(&[("a", "1.0.2.0")]));
        assert!(p.actions.is_empty());
        assert_eq!(holds(&p), [("e9", "ES for patch 1.0.1.0; the machine is on 1.0.2.0".to_string())]);
    }

    #[test]
    fn cap_and_ceiling_hold_newer_updates_back_and_say_so() {
        let cat =
            vec![ga("r1", "a", "1.0.0.0", Install), ga("r2", "a", "2.0.0.0", Install), ga("p", "a", "1.0.1.0", Patch)];
        let mut m = view(&[("a", "1.0.0.0")]);
        m.caps.insert("line".into(), "1.9.9.9".parse().unwrap());
        let p = plan(&cat, &m);
        assert_eq!(ids(&p), ["p"]);
        assert_eq!(holds(&p), [("r2", "product line line is capped at 1.9.9.9".to_string())]);

        let mut w = view(&[("a", "1.0.0.0")]);
        w.ceilings.insert("line".into(), Ceiling { role: Role::Server, version: Some("1.0.0.0".parse().unwrap()) });
        let p = plan(&cat, &w);
        assert!(p.actions.is_empty(), "a workstation never runs ahead of its server");
        assert_eq!(p.held.len(), 2);
        assert!(holds(&p)[0].1.contains("follows role server: no server runs above 1.0.0.0"), "{:?}", p.held);
        w.role = Role::Server;
        assert_eq!(ids(&plan(&cat, &w)), ["r2"], "the server itself is not held by its own ceiling");
        w.role = Role::Workstation;
        w.ceilings.get_mut("line").unwrap().version = None;
        assert!(holds(&plan(&cat, &w))[0].1.contains("no server runs it yet"));
    }

    #[test]
    fn another_products_upgrade_code_is_not_offered() {
        let mut theirs = ga("x2", "client", "2.0.0.0", Install);
        theirs.upgrade_code = "THEIRS".into();
        let mut ours = ga("o2", "client", "1.5.0.0", Install);
        ours.upgrade_code = "OURS".into();
        let mut m = view(&[("client", "1.0.0.0")]);
        m.installed[0].upgrade_code = "OURS".into();
        let p = plan(&[theirs, ours], &m);
        assert_eq!(ids(&p), ["o2"]);
        assert_eq!(holds(&p), [("x2", "upgrade code THEIRS is not the installed product's (OURS)".to_string())]);
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
        let p = plan(&cat, &m);
        assert_eq!(ids(&p), ["p2"]);
        assert!(holds(&p).iter().all(|(_, h)| h == "the machine is pinned to 1.0.2.0"), "{:?}", p.held);
        m.pins.insert("a".into(), "1.0.0.0".parse().unwrap());
        assert_eq!(ids(&plan(&cat, &m)), ["r1"]);
        m.pins.insert("a".into(), "9.9.9.9".parse().unwrap());
        assert!(plan(&cat, &m).actions.is_empty(), "a pin the catalog cannot meet holds the machine still");
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
        let mut m = view(&[("b", "1.0.0.0")]);
        m.deployed.insert("a".into());
        assert_eq!(ids(&plan(&cat, &m)), ["a1", "c1", "c2"]);
        let mut m = view(&[("b", "1.0.0.0"), ("c", "3.0.1.0")]);
        m.deployed.insert("a".into());
        assert_eq!(ids(&plan(&cat, &m)), ["a1"]);
    }

    #[test]
    fn removal_rolls_back_to_previous_ga_unless_something_newer_replaces_it() {
        let cat = vec![ga("a1", "a", "1.0.0.0", Install), item("a2", "a", "2.0.0.0", Install, UpdateState::Remove)];
        assert_eq!(
            plan(&cat, &view(&[("a", "2.0.0.0")])).actions,
            vec![Action::Remove { id: "a2".into(), rollback_to: Some("1.0.0.0".parse().unwrap()) }]
        );
        assert!(plan(&cat, &view(&[("a", "1.0.0.0")])).actions.is_empty());
        // The update a machine that does not keep 1.0.0.0 installs instead.
        assert_eq!(rollback_item(&cat, "a", "1.0.0.0".parse().unwrap()).map(|c| c.id.as_str()), Some("a1"));
        assert!(rollback_item(&cat, "a", "2.0.0.0".parse().unwrap()).is_none(), "never a removed one");
        assert!(rollback_item(&cat, "b", "1.0.0.0".parse().unwrap()).is_none());
        let mut cat2 = cat.clone();
        cat2.push(ga("a3", "a", "3.0.0.0", Install));
        assert_eq!(ids(&plan(&cat2, &view(&[("a", "2.0.0.0")]))), ["a3"]);
    }

    fn state() -> impl Strategy<Value = UpdateState> {
        prop_oneof![
            Just(UpdateState::PreApproval),
            Just(UpdateState::Ga),
            Just(UpdateState::Ga),
            Just(UpdateState::Inactive),
            Just(UpdateState::Remove)
        ]
    }
    fn itype() -> impl Strategy<Value = InstallType> {
        prop_oneof![Just(Install), Just(Patch), Just(Es)]
    }
    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Workstation), Just(Role::Server)]
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
            installed: have
                .into_iter()
                .map(|(product, version)| InstalledItem { product, version, upgrade_code: String::new() })
                .collect(),
            ..m.clone()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn plan_invariants(
            entries in proptest::collection::vec((0u8..4, 0u32..3, 0u32..4, itype(), state(), 0u32..4, 0u8..5), 0..16),
            inst in proptest::collection::vec((0u8..4, 0u32..3, 0u32..4), 0..3),
            deployed in proptest::collection::btree_set(0u8..4, 0..2),
            cap in proptest::option::of(0u32..3),
            ceiling in proptest::option::of(proptest::option::of(0u32..3)),
            machine_role in role(),
            pin in proptest::option::of((0u8..4, 0u32..3, 0u32..4)),
            me in proptest::option::of(0u8..4),
        ) {
            let mut cat: Vec<CatalogItem> = Vec::new();
            for (i, (p, minor, patch, t, s, es_on, rel)) in entries.iter().enumerate() {
                let t = if *patch == 0 { Install } else { *t };
                let version = match t {
                    Install => Version::new(1, *minor, 0, 0),
                    Patch => Version::new(1, *minor, *patch, 0),
                    Es => Version::new(1, *minor, *patch, 1 + *es_on),
                };
                if cat.iter().any(|c| c.product == format!("p{p}") && c.version == version) { continue; }
                let requires = (t == Es && *es_on % 2 == 1).then(|| Version::new(1, *minor, *es_on, 0));
                let related_installs = if *rel < 4 && *rel != *p { vec![format!("p{rel}")] } else { vec![] };
                cat.push(CatalogItem { id: format!("u{i}"), product: format!("p{p}"), product_line: "l".into(), version,
                    install_type: t, product_code: String::new(), upgrade_code: String::new(), requires, state: *s, related_installs });
            }
            let mut m = MachineView { role: machine_role, ..Default::default() };
            for (p, minor, patch) in inst {
                if m.installed.iter().any(|i| i.product == format!("p{p}")) { continue; }
                m.installed.push(InstalledItem { product: format!("p{p}"), version: Version::new(1, minor, patch, 0), upgrade_code: String::new() });
            }
            m.deployed = deployed.iter().map(|p| format!("p{p}")).collect();
            if let Some(c) = cap { m.caps.insert("l".into(), Version::new(1, c, 9, 0)); }
            if let Some(c) = ceiling {
                m.ceilings.insert("l".into(), Ceiling { role: Role::Server, version: c.map(|c| Version::new(1, c, 2, 0)) });
            }
            if let Some((p, minor, patch)) = pin { m.pins.insert(format!("p{p}"), Version::new(1, minor, patch, 0)); }
            m.self_product = me.map(|p| format!("p{p}"));

            let result = plan(&cat, &m);
            let actions = &result.actions;

            // No offer outside inventory ∪ deployed ∪ pinned ∪ related installs of those.
            let mut allowed = applicable(&m);
            loop {
                let more: BTreeSet<String> = cat.iter().filter(|c| allowed.contains(&c.product))
                    .flat_map(|c| c.related_installs.iter().cloned()).collect();
                if more.is_subset(&allowed) { break; }
                allowed.extend(more);
            }
            let mut seen_ids = BTreeSet::new();
            let mut last_version: BTreeMap<&str, Version> = m.installed.iter().map(|i| (i.product.as_str(), i.version)).collect();
            let mut started: BTreeSet<&str> = BTreeSet::new();
            for (n, a) in actions.iter().enumerate() {
                prop_assert!(seen_ids.insert(a.id().to_string()), "no update twice");
                let c = cat.iter().find(|c| c.id == a.id()).unwrap();
                prop_assert!(allowed.contains(&c.product), "{} offered outside what the machine has or is given", c.product);
                // The agent's own product first.
                if let Some(me) = &m.self_product && c.product == *me {
                    prop_assert!(actions[..n].iter().all(|b| cat.iter().find(|x| x.id == b.id()).unwrap().product == *me));
                }
                let pinned = m.pins.get(&c.product);
                if let Action::Install { .. } = a {
                    if pinned.is_none() {
                        prop_assert_eq!(c.state, UpdateState::Ga);
                        prop_assert!(limit(c, &m).is_none(), "nothing above a cap or ceiling");
                    } else {
                        prop_assert!(c.version <= *pinned.unwrap(), "nothing above a pin");
                        prop_assert!(matches!(c.state, UpdateState::Ga | UpdateState::Inactive));
                    }
                    // An ES only on top of the patch it belongs to.
                    if c.install_type == Es {
                        let on = last_version.get(c.product.as_str()).copied();
                        prop_assert!(on.is_some(), "ES {} on a machine without its product", c.id);
                        let on = on.unwrap();
                        let base = cat.iter().find(|x| x.product == c.product && x.version == on)
                            .filter(|x| x.install_type == Es).map(|x| x.required_patch()).unwrap_or(on);
                        prop_assert!(c.fits_patch(base), "ES {} ({}) on {}", c.id, c.version, base);
                    }
                    // Within a product, versions only go up through the plan; a full install first.
                    if started.contains(c.product.as_str()) {
                        prop_assert!(c.version > last_version[c.product.as_str()], "ascending within a product");
                        prop_assert!(c.install_type != Install, "one full install per product at most, first");
                    }
                    started.insert(&c.product);
                    last_version.insert(&c.product, c.version);
                }
            }
            // Applying the plan converges: a second plan has nothing to install.
            let after = apply(&cat, &m, actions);
            let again = plan(&cat, &after);
            prop_assert!(again.actions.iter().all(|a| matches!(a, Action::Remove { .. })), "converged, got {:?} after {:?}", again.actions, actions);
            // Nothing approved is skipped in silence: after converging, every GA update newer
            // than what an applicable product runs is held with a reason.
            for i in &after.installed {
                for c in cat.iter().filter(|c| c.product == i.product && c.state == UpdateState::Ga && c.version > i.version) {
                    prop_assert!(again.held.iter().any(|h| h.id == c.id), "{} newer than {} {} but neither offered nor held", c.id, i.product, i.version);
                }
            }
            // A pin that the catalog can meet is met.
            for (p, v) in &m.pins {
                let inst = m.installed.iter().find(|i| &i.product == p);
                let reachable = inst.is_some_and(|i| i.version == *v) || !plan_product(&cat, &m, p, inst).0.is_empty();
                if reachable {
                    prop_assert_eq!(after.installed.iter().find(|i| &i.product == p).map(|i| i.version), Some(*v));
                }
            }
        }
    }
}
