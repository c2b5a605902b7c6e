//! The agent's durable state (`STATE_DIR/state.json`): what is installed, the last catalog
//! version seen, and activity not yet delivered to a provider. Written atomically (temp file,
//! fsync, rename, fsync of the directory) so a crash leaves the old or the new state whole.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// Identical failures in a row after which an update stops being retried automatically.
pub const GIVE_UP_AFTER: u32 = 3;
/// How a hold by `agent restore` begins (see [`AgentState::hold`]).
pub const HELD: &str = "held back";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailureRec {
    pub error: String,
    pub count: u32,
}

/// Undelivered activity kept at most; the oldest is dropped beyond it.
pub const MAX_PENDING_ACTIVITY: usize = 1000;

/// The receipt for `ROOT/P`: written by the agent with each install (or by `agent adopt`, for a
/// product installed by other means). A directory under the install root without one is never
/// overwritten or moved. Receipts written before upgrade codes existed read with empty codes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstalledRec {
    pub version: String,
    /// Empty for an adopted product.
    pub update_id: String,
    /// The version kept in `ROOT/P_old`, if any.
    #[serde(default)]
    pub previous: Option<PreviousRec>,
    pub installed_unix: i64,
    #[serde(default)]
    pub upgrade_code: String,
    #[serde(default)]
    pub product_code: String,
    /// Installed by other means and declared with `agent adopt`.
    #[serde(default)]
    pub adopted: bool,
    /// The installed package's hooks and process gate: a removal stops it and waits for its
    /// gate as an install would.
    #[serde(default)]
    pub lifecycle: updraft_core::package::Lifecycle,
    /// Earlier versions kept besides `previous` (`ROOT/P_backups/VERSION`), newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<PreviousRec>,
}

impl InstalledRec {
    /// `P_old` is gone: the newest backup takes its place (see `install::promote_backup`).
    /// Returns it.
    pub fn promote_backup(&mut self) -> Option<PreviousRec> {
        self.previous = (!self.backups.is_empty()).then(|| self.backups.remove(0));
        self.previous.clone()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct PreviousRec {
    pub version: String,
    pub update_id: String,
    /// Its package's hooks (its start hook runs when a removal brings it back).
    #[serde(default)]
    pub lifecycle: updraft_core::package::Lifecycle,
}

/// An install being verified (see `daemon::Agent::verify_round`): live and healthy, watched
/// until `until_ms`; at the end the agent reports it verified, and a failure before swaps the
/// previous version back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyingRec {
    pub update_id: String,
    pub version: String,
    pub until_ms: i64,
    /// When the next look is due.
    pub next_look_ms: i64,
    /// The health process's pids at the last look, and how often they changed (a restart).
    #[serde(default)]
    pub pids: Vec<String>,
    #[serde(default)]
    pub restarts: u32,
}

/// Restarts of the health process inside the verification window that make a crash loop.
pub const CRASH_LOOP_RESTARTS: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActivityRec {
    pub at_unix_ms: i64,
    pub kind: i32,
    pub update_id: String,
    pub product: String,
    pub version: String,
    pub detail: String,
}

/// Settings a machine in the default group chose for itself; unset fields follow the group.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct LocalSettings {
    pub mode: Option<String>,
    pub install_day: Option<i32>,
    pub install_hour: Option<i32>,
}

/// The policy the provider gave with the last successful check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyRec {
    pub group: String,
    pub mode: String,
    pub install_day: i32,
    pub install_hour: i32,
    pub providers: Vec<String>,
    pub managed: bool,
    pub served_by: String,
}

/// An update the policy holds back: downloaded (download/automatic modes) or only known
/// (notify/manual), until someone applies it or the install window opens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WaitingRec {
    pub update_id: String,
    /// Names the downloaded file, which the cache limit must not evict.
    #[serde(default)]
    pub content_hash: String,
    pub product: String,
    pub version: String,
    pub downloaded: bool,
    pub high_priority: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct AgentState {
    /// The last signed statement acted on (kept in memory only: a restarted agent is sent it
    /// again with its first answer).
    #[serde(skip)]
    pub statement: Option<updraft_proto::v1::SignedStatement>,
    #[serde(default)]
    pub local: LocalSettings,
    #[serde(default)]
    pub policy: Option<PolicyRec>,
    /// Providers that could not be reached, since when (unix seconds).
    #[serde(default)]
    pub unreachable: BTreeMap<String, i64>,
    /// The last failed install per product, until that product installs again.
    #[serde(default)]
    pub install_errors: BTreeMap<String, String>,
    /// Products offered to this machine whose directory under the install root has no
    /// receipt, and what to do about it (as of the last check).
    #[serde(default)]
    pub foreign: BTreeMap<String, String>,
    /// High-priority updates someone chose to leave for the next install window.
    #[serde(default)]
    pub deferred: Vec<String>,
    #[serde(default)]
    pub waiting: Vec<WaitingRec>,
    /// Consecutive identical failures per update id; at [`GIVE_UP_AFTER`] it is not retried.
    #[serde(default)]
    pub failures: BTreeMap<String, FailureRec>,
    /// Boot id when an installed update asked for a restart; cleared by a reboot.
    #[serde(default)]
    pub restart_boot_id: Option<String>,
    #[serde(default)]
    pub installed: BTreeMap<String, InstalledRec>,
    /// Installs in their verification window, by product.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub verifying: BTreeMap<String, VerifyingRec>,
    #[serde(default)]
    pub last_seen_seq: u64,
    /// The highest signed catalog version accepted: anything older is a rollback.
    #[serde(default)]
    pub catalog_version: u64,
    /// Providers whose last answer was refused, and why (reported until one of theirs passes).
    #[serde(default)]
    pub refused_answers: BTreeMap<String, String>,
    #[serde(default)]
    pub pending_activity: Vec<ActivityRec>,
    #[serde(default)]
    pub last_check_unix: i64,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_provider: Option<String>,
}

/// Replaces `dir/name` so that a crash leaves the old or the new content, never a mix: write a
/// temp file, sync it, rename it over, sync the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    Ok(updraft_core::package::write_atomic(dir, name, bytes)?)
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.json")
}

impl AgentState {
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| AgentError::State { path, reason: format!("unreadable ({e}); fix or remove it") }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(AgentError::io(path, e)),
        }
    }

    pub fn save(&self, state_dir: &Path) -> Result<()> {
        write_atomic(state_dir, "state.json", &serde_json::to_vec_pretty(self).expect("state serialises"))
    }

    /// The receipt after `ROOT/P_old` became `ROOT/P` again (a removal, a failed self-update):
    /// the previous version, with the product's codes; adopted if that version was.
    pub fn back_to_previous(&mut self, product: &str, prev: &PreviousRec, now_unix: i64) {
        let mut codes = self.installed.get(product).cloned().unwrap_or_default();
        codes.promote_backup();
        let (previous, backups) = (codes.previous, codes.backups);
        self.installed.insert(
            product.to_string(),
            InstalledRec {
                version: prev.version.clone(),
                update_id: prev.update_id.clone(),
                previous,
                backups,
                installed_unix: now_unix,
                upgrade_code: codes.upgrade_code,
                product_code: codes.product_code,
                adopted: prev.update_id.is_empty(),
                lifecycle: prev.lifecycle.clone(),
            },
        );
    }

    /// The problem with offering `product` to this machine, if `ROOT/product` is a directory the
    /// agent has no receipt for: it was put there by someone else and is never touched.
    pub fn not_ours(&self, root: &Path, product: &str) -> Option<String> {
        let live = root.join(product);
        let exists = std::fs::symlink_metadata(&live).is_ok();
        (exists && !self.installed.contains_key(product)).then(|| {
            format!(
                "{} was not installed by Updraft: adopt it (`agent adopt {product} --version V`) or move it",
                live.display()
            )
        })
    }

    /// What the agent knows is wrong, in words for the report.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .unreachable
            .iter()
            .map(|(url, since)| format!("cannot reach provider {url} (since unix time {since})"))
            .collect();
        out.extend(self.refused_answers.iter().map(|(url, why)| format!("refused the answer of {url}: {why}")));
        out.extend(self.install_errors.values().cloned());
        out.extend(self.foreign.values().cloned());
        out
    }

    /// Counts a failure of `update_id`; returns true when it has now failed the same way
    /// [`GIVE_UP_AFTER`] times in a row.
    pub fn count_failure(&mut self, update_id: &str, error: &str) -> bool {
        let rec = self.failures.entry(update_id.to_string()).or_insert(FailureRec { error: error.into(), count: 0 });
        if rec.error == error {
            rec.count += 1;
        } else {
            *rec = FailureRec { error: error.into(), count: 1 };
        }
        rec.count >= GIVE_UP_AFTER
    }

    /// Holds `update_id` back as if it had failed too often: it is not installed again by
    /// itself (`agent restore` went back from it); `why` is what the agent says about it.
    pub fn hold(&mut self, update_id: &str, why: &str) {
        self.failures.insert(update_id.to_string(), FailureRec { error: why.to_string(), count: GIVE_UP_AFTER });
    }

    /// Why `update_id` is held back by `agent restore`, if it is.
    pub fn held(&self, update_id: &str) -> Option<&str> {
        self.failures.get(update_id).map(|f| f.error.as_str()).filter(|e| e.starts_with(HELD))
    }

    pub fn given_up(&self, update_id: &str) -> bool {
        self.failures.get(update_id).is_some_and(|f| f.count >= GIVE_UP_AFTER)
    }

    pub fn record(&mut self, a: ActivityRec) {
        self.pending_activity.push(a);
        let excess = self.pending_activity.len().saturating_sub(MAX_PENDING_ACTIVITY);
        self.pending_activity.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_from_before_upgrade_codes_still_count() {
        // A state file an older agent wrote: receipts without codes or the adopted mark.
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"installed": {"editor": {"version": "1.0.0.0", "update_id": "editor-1.0.0.0-abc",
            "previous": null, "installed_unix": 5}}, "last_seen_seq": 7}"#;
        std::fs::write(state_path(dir.path()), old).unwrap();
        let st = AgentState::load(dir.path()).unwrap();
        let rec = &st.installed["editor"];
        assert_eq!((rec.version.as_str(), rec.upgrade_code.as_str(), rec.adopted), ("1.0.0.0", "", false));
        // The product is ours: its directory is not foreign; another one without a receipt is.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("editor")).unwrap();
        std::fs::create_dir(root.path().join("client")).unwrap();
        assert_eq!(st.not_ours(root.path(), "editor"), None);
        assert!(st.not_ours(root.path(), "client").unwrap().contains("was not installed by Updraft"));
        assert_eq!(st.not_ours(root.path(), "absent"), None, "nothing there: nothing to protect");
    }

    #[test]
    fn back_to_previous_keeps_the_products_codes() {
        let mut st = AgentState::default();
        st.installed.insert(
            "app".into(),
            InstalledRec { version: "2.0.0.0".into(), upgrade_code: "UC".into(), ..Default::default() },
        );
        st.back_to_previous("app", &PreviousRec { version: "1.0.0.0".into(), ..Default::default() }, 9);
        let rec = &st.installed["app"];
        assert_eq!((rec.version.as_str(), rec.upgrade_code.as_str(), rec.adopted), ("1.0.0.0", "UC", true));
    }

    #[test]
    fn save_load_round_trip_and_bounded_activity() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), AgentState::default());
        let mut s = AgentState::default();
        for i in 0..MAX_PENDING_ACTIVITY + 5 {
            s.record(ActivityRec {
                at_unix_ms: i as i64,
                kind: 1,
                update_id: String::new(),
                product: String::new(),
                version: String::new(),
                detail: String::new(),
            });
        }
        assert_eq!(s.pending_activity.len(), MAX_PENDING_ACTIVITY);
        assert_eq!(s.pending_activity[0].at_unix_ms, 5);
        s.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), s);
        std::fs::write(state_path(dir.path()), b"{garbage").unwrap();
        assert!(AgentState::load(dir.path()).unwrap_err().to_string().contains("unreadable"));
    }
}
