//! The store's part in rollouts: each update's rollout record (a logged change, replicated to
//! sites, which admit offers by it) and each machine's last outcome with each update, taken
//! from its reports as they are stored (the centre's tallies; never replicated).
use prost::Message;
use updraft_core::model::UpdateState;
use updraft_core::rollout::Outcome;
use updraft_proto::v1::{Activity, ActivityKind, Rollout, Update};

use std::sync::atomic::Ordering;

use super::{Policy, Store, log_change, update_key};
use crate::error::{ProviderError, Result};
use crate::table::decode;

/// Outcomes kept at once (machines × updates they reported on): past it, new pairs are not
/// recorded (a warning says so) until updates are deleted.
pub const MAX_OUTCOMES: usize = 2_000_000;

/// The outcome an activity entry stands for, if it is one: what rollouts and update statuses
/// count. A deferred install, a download or a check is none; a download that failed its hash is
/// the content's fault, not the update's.
pub fn outcome_of(kind: i32) -> Option<Outcome> {
    match ActivityKind::try_from(kind).ok()? {
        ActivityKind::Installed => Some(Outcome::Installed),
        ActivityKind::Verified => Some(Outcome::Verified),
        ActivityKind::InstallFailed | ActivityKind::RolledBack | ActivityKind::FailedVerification => {
            Some(Outcome::Failed)
        }
        ActivityKind::Removed => Some(Outcome::RolledBack),
        _ => None,
    }
}

fn outcome_key(update_id: &str, machine: &str) -> Vec<u8> {
    [update_id.as_bytes(), b"\0", machine.as_bytes()].concat()
}

impl Store {
    /// Replaces an update's rollout record: a logged change, so sites receive it.
    pub async fn put_rollout(&self, r: &Rollout) -> Result<u64> {
        self.put_policy(Policy::Rollout, &r.update_id, Some(prost::Message::encode_to_vec(r)), None).await
    }

    /// Starts a rollout: writes its record and approves its update (state GA) in one
    /// transaction, the rollout's change logged before the approval's. No tier ever sees the
    /// update approved without its rollout (sites apply the changes in order), and the push that
    /// wakes the first wave's machines (see `hub`) goes out with the approval announced in the
    /// same batch, so a machine it wakes finds the update offered. Returns the approval's
    /// sequence number (the rollout's when the update was approved already).
    pub async fn start_rollout(&self, r: &Rollout) -> Result<u64> {
        let key = [Policy::Rollout.kind(), r.update_id.as_bytes()].concat();
        let value = r.encode_to_vec();
        let seq = self.transaction(|tx| {
            let found = tx.get(&self.updates, &r.update_id)?;
            let mut u: Update = decode(&found.ok_or_else(|| ProviderError::UnknownUpdate(r.update_id.clone()))?)?;
            tx.insert(self.policy_tree(Policy::Rollout), &r.update_id, &value)?;
            let mut seq = log_change(tx, self, &key, None)?;
            if u.state != UpdateState::Ga.to_wire() {
                u.state = UpdateState::Ga.to_wire();
                seq = log_change(tx, self, &update_key(&u.id), None)?;
                u.catalog_seq = seq;
                tx.insert(&self.updates, &r.update_id, u.encode_to_vec())?;
            }
            Ok(seq)
        })?;
        self.flush().await?;
        Ok(seq)
    }

    pub fn get_rollout(&self, update_id: &str) -> Result<Option<Rollout>> {
        self.rollouts.get(update_id.as_bytes())
    }

    pub fn list_rollouts(&self) -> Result<Vec<Rollout>> {
        self.rollouts.all()
    }

    /// Keeps `a` as its machine's last outcome with its update, if it is one (written with the
    /// activity it came in, made durable by the same flush).
    pub(super) fn note_outcome(&self, a: &Activity) -> Result<()> {
        if a.update_id.is_empty() || a.machine.is_empty() || outcome_of(a.kind).is_none() {
            return Ok(());
        }
        let key = outcome_key(&a.update_id, &a.machine);
        let count = &self.outcome_count;
        if !self.outcomes.contains_key(&key)? && count.load(Ordering::Relaxed) >= MAX_OUTCOMES {
            tracing::warn!(update = %a.update_id, machine = %a.machine, "{MAX_OUTCOMES} outcomes kept: not recorded");
            return Ok(());
        }
        if self.outcomes.put(key, a)? {
            count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Every machine's last outcome with `update_id`: (machine, outcome, the entry that said it).
    pub fn outcomes_of(&self, update_id: &str) -> Result<Vec<(String, Outcome, Activity)>> {
        let prefix = outcome_key(update_id, "");
        let mut out = Vec::new();
        for kv in self.outcomes.scan_prefix(&prefix)? {
            let a: Activity = decode(&kv?.1)?;
            if let Some(o) = outcome_of(a.kind) {
                out.push((a.machine.clone(), o, a));
            }
        }
        Ok(out)
    }

    /// Forgets the outcomes with a deleted update.
    pub(super) fn drop_outcomes(&self, update_id: &str) -> Result<()> {
        let prefix = outcome_key(update_id, "");
        let keys: Vec<Vec<u8>> =
            self.outcomes.scan_prefix(&prefix)?.map(|kv| kv.map(|(k, _)| k)).collect::<std::result::Result<_, _>>()?;
        for k in keys {
            if self.outcomes.remove(&k)?.is_some() {
                self.outcome_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
