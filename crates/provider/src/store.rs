//! The provider's embedded store: the only module that touches sled. Holds the catalog (with
//! its change log and sequence number), machines, activity and the site outbox. Every write
//! that a caller acknowledges is flushed to disk before the method returns.
//!
//! Values are protobuf-encoded `updraft.v1` messages: the API is already the versioned schema,
//! and prost decoding tolerates fields added later.
use std::path::Path;

use prost::Message;
use sled::Transactional;
use updraft_proto::v1::{Activity, ForwardedReport, Machine, MachineInfo, Update};

use crate::error::{ProviderError, Result};

const CATALOG_SEQ: &[u8] = b"catalog_seq";

/// Bounds on what the store keeps, so a chatty fleet cannot fill the disk.
pub const MAX_ACTIVITY: usize = 100_000;
pub const MAX_OUTBOX: usize = 100_000;

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    updates: sled::Tree,
    log: sled::Tree,
    meta: sled::Tree,
    machines: sled::Tree,
    activity: sled::Tree,
    outbox: sled::Tree,
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| ProviderError::Store(format!("corrupt record: {e}")))
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn read_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl Store {
    /// Opens (or creates) the store at `dir`. Fails at once if another process holds it.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| ProviderError::Io(format!("{}: {e}", dir.display())))?;
        let db = sled::Config::new().path(dir.join("db")).open().map_err(|e| {
            let text = e.to_string();
            if text.contains("could not acquire lock") {
                ProviderError::Store(format!("store {} is in use by another process", dir.display()))
            } else {
                ProviderError::Store(format!("cannot open store {}: {text}", dir.display()))
            }
        })?;
        Ok(Self {
            updates: db.open_tree("updates")?,
            log: db.open_tree("catalog_log")?,
            meta: db.open_tree("meta")?,
            machines: db.open_tree("machines")?,
            activity: db.open_tree("activity")?,
            outbox: db.open_tree("outbox")?,
            db,
        })
    }

    async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }

    pub fn catalog_seq(&self) -> Result<u64> {
        Ok(self.meta.get(CATALOG_SEQ)?.map(|v| read_u64(&v)).unwrap_or(0))
    }

    pub fn get_update(&self, id: &str) -> Result<Update> {
        match self.updates.get(id.as_bytes())? {
            Some(v) => decode(&v),
            None => Err(ProviderError::UnknownUpdate(id.to_string())),
        }
    }

    pub fn list_updates(&self) -> Result<Vec<Update>> {
        self.updates.iter().values().map(|v| decode(&v?)).collect()
    }

    /// Applies `change` to the update `id` (or inserts `fresh` when it does not exist yet),
    /// gives it the next catalog sequence number and logs the change, atomically. Returns the
    /// stored record.
    pub async fn change_update(
        &self,
        id: &str,
        fresh: Option<Update>,
        change: impl Fn(&mut Update) -> Result<()>,
    ) -> Result<Update> {
        let out = (&self.updates, &self.log, &self.meta).transaction(|(u, l, m)| {
            let mut rec: Update = match (u.get(id.as_bytes())?, &fresh) {
                (Some(v), _) => decode(&v).map_err(sled::transaction::ConflictableTransactionError::Abort)?,
                (None, Some(f)) => f.clone(),
                (None, None) => {
                    return Err(sled::transaction::ConflictableTransactionError::Abort(ProviderError::UnknownUpdate(
                        id.to_string(),
                    )));
                }
            };
            change(&mut rec).map_err(sled::transaction::ConflictableTransactionError::Abort)?;
            let seq = m.get(CATALOG_SEQ)?.map(|v| read_u64(&v)).unwrap_or(0) + 1;
            if rec.catalog_seq != 0 {
                l.remove(&be(rec.catalog_seq))?;
            }
            rec.catalog_seq = seq;
            m.insert(CATALOG_SEQ, &be(seq))?;
            l.insert(&be(seq), id.as_bytes())?;
            u.insert(id.as_bytes(), rec.encode_to_vec())?;
            Ok(rec)
        })?;
        self.flush().await?;
        Ok(out)
    }

    /// Stores a record exactly as an upstream sent it (a site replica keeps the upstream's
    /// sequence numbers, so every tier speaks of the same catalog version).
    pub async fn apply_replicated(&self, rec: &Update) -> Result<()> {
        let id = rec.id.clone();
        (&self.updates, &self.log, &self.meta).transaction(|(u, l, m)| {
            if let Some(old) = u.get(id.as_bytes())? {
                let old: Update = decode(&old).map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                l.remove(&be(old.catalog_seq))?;
            }
            l.insert(&be(rec.catalog_seq), id.as_bytes())?;
            u.insert(id.as_bytes(), rec.encode_to_vec())?;
            let cur = m.get(CATALOG_SEQ)?.map(|v| read_u64(&v)).unwrap_or(0);
            m.insert(CATALOG_SEQ, &be(cur.max(rec.catalog_seq)))?;
            Ok(())
        })?;
        self.flush().await
    }

    /// Catalog records changed after `after_seq`, oldest change first (one entry per update).
    pub fn changes_after(&self, after_seq: u64) -> Result<Vec<Update>> {
        let mut out = Vec::new();
        for kv in self.log.range(be(after_seq + 1)..) {
            let (_, id) = kv?;
            if let Some(v) = self.updates.get(&id)? {
                out.push(decode(&v)?);
            }
        }
        Ok(out)
    }

    /// Records a machine's contact; keeps fields the report does not carry.
    pub async fn record_machine(&self, info: &MachineInfo, via: &str, at_ms: i64, remote_provider: bool) -> Result<()> {
        let key = info.name.as_bytes();
        let mut m: Machine = match self.machines.get(key)? {
            Some(v) => decode(&v)?,
            None => Machine::default(),
        };
        m.info = Some(info.clone());
        m.last_contact_unix_ms = at_ms.max(m.last_contact_unix_ms);
        m.via = via.to_string();
        m.is_remote_provider |= remote_provider;
        self.machines.insert(key, m.encode_to_vec())?;
        self.flush().await
    }

    pub fn list_machines(&self) -> Result<Vec<Machine>> {
        self.machines.iter().values().map(|v| decode(&v?)).collect()
    }

    /// Appends activity entries; the oldest are dropped past [`MAX_ACTIVITY`].
    pub async fn append_activity(&self, entries: &[Activity]) -> Result<()> {
        for a in entries {
            let id = self.db.generate_id()?;
            let mut key = be(a.at_unix_ms.max(0) as u64).to_vec();
            key.extend_from_slice(&be(id));
            self.activity.insert(key, a.encode_to_vec())?;
        }
        while self.activity.len() > MAX_ACTIVITY {
            self.activity.pop_min()?;
        }
        self.flush().await
    }

    /// Newest first.
    pub fn list_activity(&self, machine: &str, update_id: &str, limit: usize) -> Result<Vec<Activity>> {
        let mut out = Vec::new();
        for v in self.activity.iter().values().rev() {
            let a: Activity = decode(&v?)?;
            if (machine.is_empty() || a.machine == machine) && (update_id.is_empty() || a.update_id == update_id) {
                out.push(a);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Queues a report for the upstream (site providers). Durable before it returns.
    pub async fn outbox_push(&self, report: &ForwardedReport) -> Result<()> {
        if self.outbox.len() >= MAX_OUTBOX {
            // Drop the oldest: the newest inventory matters more than stale ones.
            self.outbox.pop_min()?;
        }
        let id = self.db.generate_id()?;
        self.outbox.insert(be(id), report.encode_to_vec())?;
        self.flush().await
    }

    /// Up to `max` queued reports with their keys, oldest first.
    pub fn outbox_peek(&self, max: usize) -> Result<Vec<(Vec<u8>, ForwardedReport)>> {
        self.outbox
            .iter()
            .take(max)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), decode(&v)?))
            })
            .collect()
    }

    pub async fn outbox_ack(&self, keys: &[Vec<u8>]) -> Result<()> {
        for k in keys {
            self.outbox.remove(k)?;
        }
        self.flush().await
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn catalog_changes_are_sequenced_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let fresh = Update { id: "a".into(), ..Default::default() };
            s.change_update("a", Some(fresh.clone()), |_| Ok(())).await.unwrap();
            s.change_update("b", Some(Update { id: "b".into(), ..Default::default() }), |_| Ok(())).await.unwrap();
            s.change_update("a", None, |u| {
                u.high_priority = true;
                Ok(())
            })
            .await
            .unwrap();
            assert!(matches!(s.change_update("zz", None, |_| Ok(())).await, Err(ProviderError::UnknownUpdate(_))));
            let second = Store::open(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(second.contains("in use"), "{second}");
        }
        // sled drops its file lock from a background thread a moment after the last handle
        // goes, so a reopen within the same process may have to wait briefly.
        let mut reopened = Store::open(dir.path());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            reopened = Store::open(dir.path());
        }
        let s = reopened.unwrap_or_else(|e| panic!("reopen: {e}"));
        assert_eq!(s.catalog_seq().unwrap(), 3);
        let ids: Vec<_> = s.changes_after(0).unwrap().into_iter().map(|u| (u.id, u.catalog_seq)).collect();
        assert_eq!(ids, vec![("b".to_string(), 2), ("a".to_string(), 3)]);
        assert_eq!(s.changes_after(2).unwrap().len(), 1);
    }
}
