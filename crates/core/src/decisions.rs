//! Signed decisions: everything that decides what a machine does, in a form the agent checks
//! against the centre's catalog key and then computes its own plan from, with the same engine
//! every tier uses. A provider between the centre and the agent (a site, or anything holding a
//! provider certificate) can then only withhold or delay: it cannot make a machine install,
//! remove, roll back, hurry, move or stop checking.
//!
//! What is signed, and where:
//! - **Fleet-wide** (in the [`Statement`](crate::freshness::Statement), sent with every answer):
//!   each update's content and state, priority, related installs, prestage and install
//!   properties; every cap and role ceiling; every group with its settings, assigned providers
//!   (as URLs) and deployments; the bounds on the check interval.
//! - **Per machine** ([`MachineRecord`]: group, administrator's role, pins, own deployments):
//!   one leaf per machine that has any, in a Merkle tree sorted by name whose root and size the
//!   statement carries. An answer carries its machine's proof: the leaf with its inclusion
//!   proof, or — for a machine with no record — the two neighbouring leaves that show there is
//!   none. Every answer stays small however large the fleet (about 32 bytes per level).
//!
//! The tree is hashed with domain separation (leaves `0x00 ‖ record`, nodes `0x01 ‖ l ‖ r`) and
//! built with `rs_merkle`; a lone node at the end of a level is carried up unchanged.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::CoreError;
use crate::freshness::{GroupEntry, IntervalBounds, Statement};
use crate::model::{InstallType, Role, UpdateState};
use crate::plan::{self, CatalogItem, Ceiling, InstalledItem, MachineView, Plan};
use crate::policy::Mode;
use crate::version::Version;

/// The group every machine is in unless assigned elsewhere.
pub const DEFAULT_GROUP: &str = "default";

/// What administrators decided for one machine. A machine with none of these has no record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineRecord {
    pub name: String,
    /// Empty: the default group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// An administrator's choice of role (empty: what the agent's configuration says).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// product -> the exact version this machine must run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pins: BTreeMap<String, String>,
    /// Products deployed to this machine itself (its group's are in the group's entry).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deployed: BTreeSet<String>,
}

impl MachineRecord {
    /// Whether the record says nothing a machine without one would not do.
    pub fn is_default(&self) -> bool {
        (self.group.is_empty() || self.group == DEFAULT_GROUP)
            && self.role.is_empty()
            && self.pins.is_empty()
            && self.deployed.is_empty()
    }

    fn leaf(&self) -> [u8; 32] {
        let body = serde_json::to_vec(self).expect("a machine record serialises");
        let mut h = Sha256::new();
        h.update([0u8]);
        h.update(&body);
        h.finalize().into()
    }
}

#[derive(Clone)]
struct NodeHash;

impl rs_merkle::Hasher for NodeHash {
    type Hash = [u8; 32];

    fn hash(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    fn concat_and_hash(left: &[u8; 32], right: Option<&[u8; 32]>) -> [u8; 32] {
        match right {
            Some(r) => {
                let mut h = Sha256::new();
                h.update([1u8]);
                h.update(left);
                h.update(r);
                h.finalize().into()
            }
            None => *left,
        }
    }
}

/// The root of the machine tree, as the statement carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachinesRoot {
    /// Hex; empty when no machine has a record.
    pub root: String,
    pub count: u64,
}

/// A machine's record with its inclusion proof, or the neighbours that prove it has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineProof {
    /// One leaf (the machine's, or the first or last when the name sorts outside), or two
    /// neighbouring leaves whose names bracket the machine's.
    pub leaves: Vec<(u64, MachineRecord)>,
    /// The sibling hashes (hex) that lead from those leaves to the root.
    pub hashes: Vec<String>,
}

/// The most sibling hashes a proof may carry (two leaves of a tree of 2^64 need at most 128).
const MAX_PROOF_HASHES: usize = 128;

/// Every machine record, sorted by name, and the tree over them.
pub struct MachineTree {
    records: Vec<MachineRecord>,
    tree: rs_merkle::MerkleTree<NodeHash>,
}

impl MachineTree {
    /// The tree over `records`; default records are left out (they say nothing).
    pub fn build(records: impl IntoIterator<Item = MachineRecord>) -> Self {
        let mut records: Vec<MachineRecord> = records.into_iter().filter(|r| !r.is_default()).collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records.dedup_by(|a, b| a.name == b.name);
        let leaves: Vec<[u8; 32]> = records.iter().map(MachineRecord::leaf).collect();
        Self { tree: rs_merkle::MerkleTree::from_leaves(&leaves), records }
    }

    pub fn root(&self) -> MachinesRoot {
        MachinesRoot { root: self.tree.root().map(hex::encode).unwrap_or_default(), count: self.records.len() as u64 }
    }

    /// The proof for machine `name`: its record, or its absence.
    pub fn proof(&self, name: &str) -> MachineProof {
        let n = self.records.len();
        if n == 0 {
            return MachineProof::default();
        }
        let indices = match self.records.binary_search_by(|r| r.name.as_str().cmp(name)) {
            Ok(i) => vec![i],
            Err(0) => vec![0],
            Err(i) if i == n => vec![n - 1],
            Err(i) => vec![i - 1, i],
        };
        let proof = self.tree.proof(&indices);
        MachineProof {
            leaves: indices.iter().map(|&i| (i as u64, self.records[i].clone())).collect(),
            hashes: proof.proof_hashes().iter().map(hex::encode).collect(),
        }
    }
}

fn refuse(reason: String) -> CoreError {
    CoreError::Freshness(format!("machine record: {reason}"))
}

/// Checks `proof` for machine `name` against the signed `root`; returns the machine's record
/// (a default one when the proof shows it has none).
pub fn verify_machine(root: &MachinesRoot, name: &str, proof: &MachineProof) -> Result<MachineRecord, CoreError> {
    let none = MachineRecord { name: name.to_string(), ..Default::default() };
    if root.count == 0 {
        return if root.root.is_empty() && proof.leaves.is_empty() {
            Ok(none)
        } else {
            Err(refuse("the proof does not match an empty tree".into()))
        };
    }
    if proof.leaves.is_empty() || proof.leaves.len() > 2 || proof.hashes.len() > MAX_PROOF_HASHES {
        return Err(refuse(format!("a proof of {} leaves and {} hashes", proof.leaves.len(), proof.hashes.len())));
    }
    let count = root.count;
    let want: [u8; 32] = hex::decode(&root.root)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| refuse("unreadable signed root".into()))?;
    let mut hashes = Vec::with_capacity(proof.hashes.len());
    for h in &proof.hashes {
        let h: [u8; 32] = hex::decode(h)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| refuse("unreadable proof hash".into()))?;
        hashes.push(h);
    }
    let indices: Vec<usize> = proof.leaves.iter().map(|(i, _)| *i as usize).collect();
    if indices.iter().any(|&i| i as u64 >= count) || (indices.len() == 2 && indices[1] != indices[0] + 1) {
        return Err(refuse(format!("leaf positions {indices:?} do not fit a tree of {count}")));
    }
    let leaves: Vec<[u8; 32]> = proof.leaves.iter().map(|(_, r)| r.leaf()).collect();
    let usize_count = usize::try_from(count).map_err(|_| refuse("tree too large".into()))?;
    if !rs_merkle::MerkleProof::<NodeHash>::new(hashes).verify(want, &indices, &leaves, usize_count) {
        return Err(refuse("the proof does not lead to the signed root".into()));
    }
    let recs: Vec<&MachineRecord> = proof.leaves.iter().map(|(_, r)| r).collect();
    if let Some(r) = recs.iter().find(|r| r.name == name) {
        return Ok((*r).clone());
    }
    let absent = match (indices.as_slice(), recs.as_slice()) {
        ([_, _], [l, r]) => l.name.as_str() < name && name < r.name.as_str(),
        ([0], [r]) if name < r.name.as_str() => true,
        ([i], [l]) => *i as u64 == count - 1 && l.name.as_str() < name,
        _ => false,
    };
    if absent { Ok(none) } else { Err(refuse(format!("the leaves shown neither are nor bracket {name:?}"))) }
}

/// What the agent knows of itself: its receipts, its configured role, its own product and the
/// settings it chose for itself (which count only in the default group).
#[derive(Debug, Clone, Default)]
pub struct MachineInput {
    pub installed: Vec<InstalledItem>,
    pub role: Role,
    pub self_product: Option<String>,
    pub local_mode: Option<Mode>,
    pub local_day: Option<i32>,
    pub local_hour: Option<i32>,
}

/// The effective settings a machine follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub group: String,
    /// In a group other than the default: the machine's own choices are ignored.
    pub managed: bool,
    pub mode: Mode,
    pub install_day: i32,
    pub install_hour: i32,
    /// Outside the install window, automatic machines download ahead.
    pub download_early: bool,
    pub providers: Vec<String>,
}

/// Everything the centre decided for one machine, as the agent computed it from signed input.
#[derive(Debug, Clone)]
pub struct Decided {
    pub plan: Plan,
    pub settings: Settings,
    /// The machine's pins (an offer of a pinned product is marked so).
    pub pins: BTreeMap<String, Version>,
    pub interval: Option<IntervalBounds>,
}

/// The default group's settings before anyone changes them: automatic, any time.
pub fn builtin_default(name: &str) -> GroupEntry {
    GroupEntry {
        name: name.to_string(),
        mode: Mode::Automatic.to_wire(),
        install_day: -1,
        install_hour: -1,
        download_early: false,
        providers: vec![],
        deployed: BTreeSet::new(),
    }
}

/// The engine's view of a signed entry; entries with an unreadable version or state are left
/// out (nothing is offered from them).
pub fn item_of(e: &crate::freshness::Entry) -> Option<CatalogItem> {
    Some(CatalogItem {
        id: e.id.clone(),
        product: e.product.clone(),
        product_line: e.product_line.clone(),
        version: e.version.parse().ok()?,
        install_type: InstallType::from_wire(e.install_type).unwrap_or_default(),
        product_code: e.product_code.clone(),
        upgrade_code: e.upgrade_code.clone(),
        requires: e.requires.parse().ok(),
        state: UpdateState::from_wire(e.state)?,
        related_installs: e.related_installs.clone(),
    })
}

/// The machine's plan and settings from the signed statement and its verified record: the
/// same engine, fed the same inputs, as the tier that answered.
pub fn decide(st: &Statement, record: &MachineRecord, m: &MachineInput) -> Result<Decided, CoreError> {
    if !st.decides {
        return Err(CoreError::Freshness(format!("the statement for catalog version {} decides nothing", st.version)));
    }
    let group_name = if record.group.is_empty() { DEFAULT_GROUP } else { record.group.as_str() };
    let group = st.groups.iter().find(|g| g.name == group_name).cloned().unwrap_or_else(|| builtin_default(group_name));
    let managed = group_name != DEFAULT_GROUP;
    let mut settings = Settings {
        group: group_name.to_string(),
        managed,
        mode: Mode::from_wire(group.mode).unwrap_or_default(),
        install_day: group.install_day,
        install_hour: group.install_hour,
        download_early: group.download_early,
        providers: group.providers.clone(),
    };
    if !managed {
        if let Some(mode) = m.local_mode {
            settings.mode = mode;
        }
        if let Some(d) = m.local_day {
            settings.install_day = d;
        }
        if let Some(h) = m.local_hour {
            settings.install_hour = h;
        }
    }
    let role = if record.role.is_empty() { m.role } else { Role::from_wire(&record.role)? };
    let pins: BTreeMap<String, Version> =
        record.pins.iter().filter_map(|(p, v)| Some((p.clone(), v.parse().ok()?))).collect();
    let view = MachineView {
        installed: m.installed.clone(),
        deployed: group.deployed.iter().chain(&record.deployed).cloned().collect(),
        pins: pins.clone(),
        caps: st.caps.iter().filter_map(|c| Some((c.product_line.clone(), c.version.parse().ok()?))).collect(),
        ceilings: st
            .caps
            .iter()
            .filter(|c| !c.follow_role.is_empty())
            .filter_map(|c| {
                let role = Role::from_wire(&c.follow_role).ok()?;
                Some((c.product_line.clone(), Ceiling { role, version: c.ceiling.parse().ok() }))
            })
            .collect(),
        role,
        self_product: m.self_product.clone(),
        rollout: crate::rollout::holds(
            &st.rollouts,
            |id| st.entries.iter().any(|e| e.id == id && e.high_priority),
            &record.name,
            group_name,
        ),
    };
    let items: Vec<CatalogItem> = st.entries.iter().filter_map(item_of).collect();
    Ok(Decided { plan: plan::plan(&items, &view), settings, pins, interval: st.check_interval })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(name: &str, group: &str) -> MachineRecord {
        MachineRecord { name: name.into(), group: group.into(), ..Default::default() }
    }

    #[test]
    fn an_empty_tree_proves_every_machine_has_no_record() {
        let t = MachineTree::build(vec![rec("a", "default")]);
        assert_eq!(t.root(), MachinesRoot::default());
        assert_eq!(verify_machine(&t.root(), "a", &t.proof("a")).unwrap(), rec("a", ""));
        let forged = MachineProof { leaves: vec![(0, rec("a", "lab"))], hashes: vec![] };
        assert!(verify_machine(&t.root(), "a", &forged).is_err());
    }

    #[test]
    fn a_record_cannot_be_changed_hidden_or_borrowed() {
        let t = MachineTree::build(["b", "d", "f", "h", "j"].map(|n| rec(n, "lab")));
        let root = t.root();
        let p = t.proof("f");
        assert_eq!(verify_machine(&root, "f", &p).unwrap().group, "lab");
        // Changed: another group in the leaf.
        let mut changed = p.clone();
        changed.leaves[0].1.group = "default".into();
        assert!(verify_machine(&root, "f", &changed).is_err());
        // Hidden: f's neighbours shown as if f had no record.
        let hide = t.proof("e"); // d and f
        assert!(verify_machine(&root, "f", &hide).is_ok_and(|r| r.group == "lab"), "f is among the leaves");
        let gap = t.proof("g"); // f and h: proves g has none, not that f has none
        assert!(verify_machine(&root, "g", &gap).unwrap().is_default());
        let mut skip = t.proof("c"); // b and d, relabelled to claim they bracket f
        skip.leaves[0].0 = 2;
        skip.leaves[1].0 = 3;
        assert!(verify_machine(&root, "f", &skip).is_err());
        // Borrowed: another machine's proof.
        assert!(verify_machine(&root, "h", &p).is_err());
        // Outside the ends.
        assert!(verify_machine(&root, "a", &t.proof("a")).unwrap().is_default());
        assert!(verify_machine(&root, "z", &t.proof("z")).unwrap().is_default());
        // A last leaf passed off as a first one, and vice versa.
        let mut first = t.proof("z");
        first.leaves[0].0 = 0;
        assert!(verify_machine(&root, "z", &first).is_err());
        assert!(verify_machine(&root, "c", &t.proof("z")).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]
        /// Every machine's proof verifies to exactly its record (or none), in trees of any size.
        #[test]
        fn every_proof_verifies_to_the_truth(names in proptest::collection::btree_set("[a-m]{1,3}", 0..40), probe in "[a-m]{1,3}") {
            let t = MachineTree::build(names.iter().map(|n| rec(n, "lab")));
            let root = t.root();
            for n in names.iter().chain(std::iter::once(&probe)) {
                let got = verify_machine(&root, n, &t.proof(n)).unwrap();
                prop_assert_eq!(got.group.is_empty(), !names.contains(n));
            }
        }
    }
}
