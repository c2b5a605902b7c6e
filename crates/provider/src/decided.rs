//! What administrators decided besides the catalog, as of one catalog sequence number: groups
//! and their settings, which machine is in which group, pins, deployments, roles and the peer
//! providers groups name. Every one of these is a logged write that moves the catalog
//! sequence, so it is read once per change into the catalog [`Snapshot`](crate::catalog::Snapshot)
//! and a check reads it from memory, not from the store.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use updraft_proto::v1::{GroupSettings, MachinePins, Peer};

use crate::error::Result;
use crate::store::{DEFAULT_GROUP, Store};

#[derive(Debug, Default)]
pub struct Decided {
    /// Groups with stored settings, by name (the default group only once someone changed it).
    groups: BTreeMap<String, GroupSettings>,
    /// Machines moved out of the default group.
    assignments: HashMap<String, String>,
    pins: HashMap<String, MachinePins>,
    /// Products deployed to each group, and to each machine by name.
    to_group: HashMap<String, BTreeSet<String>>,
    to_machine: HashMap<String, BTreeSet<String>>,
    /// Administrators' choices of machines' roles.
    roles: HashMap<String, String>,
    peers: HashMap<String, Peer>,
    /// Rollouts that still hold their update from some machines (reverted ones hold nothing).
    pub rollouts: Vec<updraft_core::rollout::Admitting>,
}

/// The default group's settings before anyone changes them: install whatever is approved, at
/// any time, from whichever provider answers.
pub fn builtin_default() -> GroupSettings {
    let g = updraft_core::decisions::builtin_default(DEFAULT_GROUP);
    GroupSettings {
        mode: g.mode,
        install_day: g.install_day,
        install_hour: g.install_hour,
        providers: g.providers,
        download_early: g.download_early,
    }
}

impl Decided {
    pub fn read(store: &Store) -> Result<Self> {
        let mut d = Decided {
            groups: store
                .list_groups()?
                .into_iter()
                .map(|g| (g.name, g.settings.unwrap_or_else(builtin_default)))
                .collect(),
            assignments: store.list_assignments()?.into_iter().map(|a| (a.machine, a.group)).collect(),
            pins: store.list_pins()?.into_iter().map(|p| (p.machine.clone(), p)).collect(),
            roles: store.list_roles()?.into_iter().map(|r| (r.machine, r.role)).collect(),
            peers: store.list_peers()?.into_iter().map(|p| (p.name.clone(), p)).collect(),
            rollouts: store.list_rollouts()?.iter().filter_map(crate::rollouts::admitting).collect(),
            ..Default::default()
        };
        for dep in store.list_deployments()? {
            let (by, target) =
                if dep.machine.is_empty() { (&mut d.to_group, dep.group) } else { (&mut d.to_machine, dep.machine) };
            by.entry(target).or_default().insert(dep.product);
        }
        Ok(d)
    }

    /// The group a machine is in.
    pub fn group_of(&self, machine: &str) -> &str {
        self.assignments.get(machine).map_or(DEFAULT_GROUP, String::as_str)
    }

    /// Every group's name, the default group first.
    pub fn group_names(&self) -> Vec<String> {
        let mut names = vec![DEFAULT_GROUP.to_string()];
        names.extend(self.groups.keys().filter(|n| *n != DEFAULT_GROUP).cloned());
        names
    }

    /// The settings a group's machines follow.
    pub fn settings(&self, group: &str) -> GroupSettings {
        self.groups.get(group).cloned().unwrap_or_else(builtin_default)
    }

    pub fn pins_of(&self, machine: &str) -> MachinePins {
        self.pins
            .get(machine)
            .cloned()
            .unwrap_or_else(|| MachinePins { machine: machine.to_string(), ..Default::default() })
    }

    /// The products deployed to `machine`, directly or through its group.
    pub fn deployed_to(&self, machine: &str) -> BTreeSet<String> {
        let group = self.to_group.get(self.group_of(machine)).into_iter();
        group.chain(self.to_machine.get(machine)).flatten().cloned().collect()
    }

    /// An administrator's choice of `machine`'s role, if any.
    pub fn role_of(&self, machine: &str) -> Option<&str> {
        self.roles.get(machine).map(String::as_str)
    }

    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.get(name)
    }
}
