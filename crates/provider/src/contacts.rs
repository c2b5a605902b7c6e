//! Machines' last contacts, gathered in memory and written together. Every check records when
//! its machine was last heard from and what it said about itself; written one by one, that was a
//! read and a write of the machine's record per check — two round trips on a database server, and
//! a read-modify-write outside any transaction. Here a check only updates a map; the store's
//! commit thread writes the whole map in one transaction before each flush (within
//! `commit::FLUSH_EVERY`), each record read, merged and written inside it.
//!
//! The invariants: every contact is in the store within one commit, merged so that the newest
//! contact time wins whoever wrote last (a machine new here is reported as such, and its caller
//! waits for that commit before answering: machines arriving together share one transaction);
//! a failed write keeps the contacts for the next commit and fails the writers waiting on it;
//! and reads of machine records see pending contacts, so nothing the provider shows lags behind
//! what it was told.
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prost::Message;
use updraft_proto::v1::{Machine, MachineInfo};

use crate::db::{Db, Tx};
use crate::error::{ProviderError, Result};
use crate::table::Table;

/// One contact: what a machine said, through whom, and when.
#[derive(Clone, Debug)]
pub struct Contact {
    pub info: MachineInfo,
    pub via: String,
    pub at_ms: i64,
    pub remote_provider: bool,
}

impl Contact {
    /// Folds this contact into a machine's record, keeping the fields a contact does not carry
    /// and the newest contact time.
    pub fn apply(&self, m: &mut Machine) {
        m.info = Some(self.info.clone());
        m.last_contact_unix_ms = self.at_ms.max(m.last_contact_unix_ms);
        m.via = self.via.clone();
        m.is_remote_provider |= self.remote_provider;
    }

    /// A newer contact replaces an older one; the flag for a remote provider sticks.
    fn merge(&mut self, newer: Contact) {
        let remote = self.remote_provider || newer.remote_provider;
        if newer.at_ms >= self.at_ms {
            *self = newer;
        }
        self.remote_provider = remote;
    }
}

/// Contacts not yet written, and the machines known to have a record.
pub struct Contacts {
    machines: Table<Machine>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Contact>,
    /// Names with a record in the store (read once at open; a record written by another
    /// provider of a shared database is learnt at its first contact here).
    known: HashSet<String>,
}

fn poisoned() -> ProviderError {
    ProviderError::Store("the contact buffer is poisoned".into())
}

impl Contacts {
    /// Knows every machine that has a record in `machines`.
    pub fn open(machines: Table<Machine>) -> Result<Self> {
        let mut known = HashSet::new();
        for kv in machines.iter()? {
            let (k, _) = kv?;
            known.insert(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(Self { machines, state: Mutex::new(State { known, ..Default::default() }) })
    }

    /// Records `contact` for machine `name`, to be written with the next commit. Whether the
    /// machine is new here (its caller makes the first record durable at once).
    pub fn record(&self, name: &str, contact: Contact) -> Result<bool> {
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        let new = state.known.insert(name.to_string());
        match state.pending.get_mut(name) {
            Some(held) => held.merge(contact),
            None => drop(state.pending.insert(name.to_string(), contact)),
        }
        Ok(new)
    }

    fn write(&self, tx: &Tx<'_>, name: &str, contact: &Contact) -> Result<()> {
        let mut m: Machine = match tx.get(&self.machines, name)? {
            Some(v) => crate::table::decode(&v)?,
            None => Machine::default(),
        };
        contact.apply(&mut m);
        tx.insert(&self.machines, name, m.encode_to_vec())?;
        Ok(())
    }

    /// Writes every pending contact in one transaction. On failure they stay pending (newer
    /// contacts that arrived meanwhile win) for the next commit to try again.
    pub fn write_pending(&self, db: &Db) -> Result<usize> {
        let batch = std::mem::take(&mut self.state.lock().map_err(|_| poisoned())?.pending);
        if batch.is_empty() {
            return Ok(0);
        }
        let written = db.transaction(|tx| {
            for (name, contact) in &batch {
                self.write(tx, name, contact)?;
            }
            Ok::<_, ProviderError>(batch.len())
        });
        if written.is_err() {
            let mut state = self.state.lock().map_err(|_| poisoned())?;
            for (name, contact) in batch {
                match state.pending.remove(&name) {
                    Some(newer) => {
                        let mut kept = contact;
                        kept.merge(newer);
                        state.pending.insert(name, kept);
                    }
                    None => drop(state.pending.insert(name, contact)),
                }
            }
        }
        written
    }

    /// `m` as it will be once its pending contact is written.
    pub fn overlay(&self, name: &str, m: &mut Machine) {
        if let Ok(state) = self.state.lock()
            && let Some(c) = state.pending.get(name)
        {
            c.apply(m);
        }
    }

    /// Forgets machine `name` (its record was deleted): a pending contact is dropped, and its
    /// next contact makes a new record.
    pub fn forget(&self, name: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.pending.remove(name);
            state.known.remove(name);
        }
    }

    /// Contacts waiting for the next commit.
    pub fn pending(&self) -> usize {
        self.state.lock().map(|s| s.pending.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(at_ms: i64, via: &str, remote: bool) -> Contact {
        Contact {
            info: MachineInfo { name: "m".into(), ..Default::default() },
            via: via.into(),
            at_ms,
            remote_provider: remote,
        }
    }

    #[test]
    fn the_newest_contact_wins_and_a_remote_flag_sticks() {
        let mut c = contact(10, "a", true);
        c.merge(contact(5, "b", false));
        assert_eq!((c.at_ms, c.via.as_str(), c.remote_provider), (10, "a", true));
        c.merge(contact(20, "c", false));
        assert_eq!((c.at_ms, c.via.as_str(), c.remote_provider), (20, "c", true));
        let mut m = Machine { last_contact_unix_ms: 30, ..Default::default() };
        c.apply(&mut m);
        assert_eq!(m.last_contact_unix_ms, 30, "an older contact never moves the time back");
    }

    #[test]
    fn contacts_are_written_together_and_seen_before_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_embedded(dir.path()).unwrap();
        let machines: Table<Machine> = Table::open(&db, "machines").unwrap();
        let contacts = Contacts::open(machines.clone()).unwrap();
        assert!(contacts.record("m", contact(1, "direct", false)).unwrap(), "new here");
        assert!(!contacts.record("m", contact(2, "site", false)).unwrap(), "known from now on");
        assert!(contacts.record("n", contact(1, "direct", false)).unwrap());
        assert_eq!(machines.get("m").unwrap(), None, "nothing written before the commit");
        let mut seen = Machine::default();
        contacts.overlay("m", &mut seen);
        assert_eq!((seen.last_contact_unix_ms, seen.via.as_str()), (2, "site"));
        assert_eq!(contacts.write_pending(&db).unwrap(), 2, "both machines in one transaction");
        let stored = machines.get("m").unwrap().unwrap();
        assert_eq!((stored.last_contact_unix_ms, stored.via.as_str(), contacts.pending()), (2, "site", 0));
        // A store opened again knows the machines; one forgotten is new again.
        let again = Contacts::open(machines.clone()).unwrap();
        assert!(!again.record("m", contact(3, "direct", false)).unwrap());
        again.forget("m");
        assert_eq!(again.pending(), 0);
        assert!(again.record("m", contact(4, "direct", false)).unwrap());
    }
}
