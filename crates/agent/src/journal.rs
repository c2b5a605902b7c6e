//! The install journal (`STATE_DIR/journal.json`): which step of which install the agent is
//! in, made durable at every boundary so that a crash at any instant can be finished or undone
//! on the next start. `ROOT/P` only ever changes by one atomic exchange, so it is always whole;
//! the journal decides whether the agent's records follow the new tree or the old.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::install;
use crate::state::{AgentState, InstalledRec, PreviousRec, write_atomic};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The package file is complete and hash-checked.
    Downloaded,
    /// Its signature and manifest are checked.
    Verified,
    /// `P_update_pending` holds the whole new tree, synced.
    Staged,
    /// `P` is the new tree (the exchange happened).
    Swapped,
    /// The new version's post-install and start hooks and health check passed.
    Healthy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub update_id: String,
    pub product: String,
    pub version: String,
    pub previous: Option<PreviousRec>,
    pub step: Step,
    /// Inode of the staged tree: after the exchange it is the inode of `P`.
    pub staged_inode: Option<u64>,
    /// The package has hooks or a health check to pass after the swap: until the journal says
    /// Healthy, a crash means the new version never proved itself, and recovery swaps back.
    #[serde(default)]
    pub needs_health: bool,
    /// The agent is replacing itself: the new binary is on trial until it reports in.
    #[serde(default)]
    pub self_update: bool,
    /// For the receipt.
    #[serde(default)]
    pub upgrade_code: String,
    #[serde(default)]
    pub product_code: String,
    /// The package's hooks and gate, for the receipt (known once verified).
    #[serde(default)]
    pub lifecycle: updraft_core::package::Lifecycle,
}

const FILE: &str = "journal.json";

pub fn load(state_dir: &Path) -> Result<Option<Op>> {
    let path = state_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| AgentError::State { path, reason: format!("unreadable journal ({e})") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(path, e)),
    }
}

pub fn save(state_dir: &Path, op: &Op) -> Result<()> {
    write_atomic(state_dir, FILE, &serde_json::to_vec_pretty(op).expect("journal serialises"))
}

pub fn clear(state_dir: &Path) -> Result<()> {
    match std::fs::remove_file(state_dir.join(FILE)) {
        Ok(()) => updraft_core::package::sync_dir(state_dir).map_err(Into::into),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(state_dir.join(FILE), e)),
    }
}

pub fn inode(p: &Path) -> Option<u64> {
    std::fs::symlink_metadata(p).ok().map(|m| m.ino())
}

/// Records a swapped-in install as what the machine runs.
pub fn record_install(state: &mut AgentState, op: &Op, now_unix: i64) {
    state.installed.insert(
        op.product.clone(),
        InstalledRec {
            version: op.version.clone(),
            update_id: op.update_id.clone(),
            previous: op.previous.clone(),
            installed_unix: now_unix,
            upgrade_code: op.upgrade_code.clone(),
            product_code: op.product_code.clone(),
            adopted: false,
            lifecycle: op.lifecycle.clone(),
        },
    );
    state.install_errors.remove(&op.product);
    state.waiting.retain(|w| w.update_id != op.update_id);
    state.failures.remove(&op.update_id);
}

/// What recovery decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new version is live; the records must say so.
    RolledForward,
    /// The old version is still live; the install will be tried again.
    Abandoned,
    /// The new version was live but never passed its health check: the old one is back.
    RolledBack,
}

/// Finishes or undoes an interrupted install on disk. Returns what the records must now say.
pub fn recover(root: &Path, op: &Op) -> Result<Outcome> {
    // First make `P` whole again if ordered renames were interrupted.
    install::finish_ordered(root)?;
    let live = install::live_dir(root, &op.product);
    let pending = install::pending_dir(root, &op.product);
    let exchanged = match op.step {
        Step::Downloaded | Step::Verified => false,
        // The exchange may have happened after the journal said Staged: the inode tells.
        Step::Staged => op.staged_inode.is_some() && inode(&live) == op.staged_inode,
        Step::Swapped | Step::Healthy => true,
    };
    if exchanged && op.needs_health && op.step != Step::Healthy {
        if pending.exists() {
            install::keep_old(root, &op.product)?;
        }
        if op.previous.is_some() && install::old_dir(root, &op.product).is_dir() {
            install::roll_back(root, &op.product)?;
        } else {
            install::uninstall(root, &op.product)?;
        }
        return Ok(Outcome::RolledBack);
    }
    if exchanged {
        // `pending` (if still there) holds the previous version: keep it as P_old.
        if pending.exists() {
            install::keep_old(root, &op.product)?;
        }
        Ok(Outcome::RolledForward)
    } else {
        install::recover(root)?; // drops the staged tree; P was never touched
        Ok(Outcome::Abandoned)
    }
}

/// A removal in progress (`STATE_DIR/removal.json`): what is being removed and what the
/// machine goes back to, written before `ROOT/P` changes so that a crash between the change
/// and the records can be finished on the next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removal {
    pub product: String,
    pub update_id: String,
    pub version: String,
    /// The version in `P_old` that becomes live again, if any (else the product is uninstalled).
    pub back: Option<PreviousRec>,
    /// Inode of `P_old` before the removal: once it is `P`'s, the roll-back happened.
    pub old_inode: Option<u64>,
}

const REMOVAL: &str = "removal.json";

pub fn save_removal(state_dir: &Path, r: &Removal) -> Result<()> {
    write_atomic(state_dir, REMOVAL, &serde_json::to_vec_pretty(r).expect("removal serialises"))
}

pub fn load_removal(state_dir: &Path) -> Result<Option<Removal>> {
    let path = state_dir.join(REMOVAL);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| AgentError::State { path, reason: format!("unreadable removal record ({e})") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(path, e)),
    }
}

pub fn clear_removal(state_dir: &Path) -> Result<()> {
    match std::fs::remove_file(state_dir.join(REMOVAL)) {
        Ok(()) => updraft_core::package::sync_dir(state_dir).map_err(Into::into),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(state_dir.join(REMOVAL), e)),
    }
}

/// Makes the records follow a removal a crash interrupted: if `ROOT/P` already changed, the
/// removal is finished (on disk and in `state`); otherwise nothing happened and the next check
/// asks again. Returns whether it had happened.
pub fn recover_removal(root: &Path, r: &Removal, state: &mut AgentState) -> Result<bool> {
    let live = install::live_dir(root, &r.product);
    let happened = match &r.back {
        Some(_) => r.old_inode.is_some() && inode(&live) == r.old_inode,
        None => !live.exists(),
    };
    if !happened {
        return Ok(false);
    }
    // Finish what the interrupted step left: the removed version's tree, removal leftovers.
    if r.back.is_some() {
        let old = install::old_dir(root, &r.product);
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| AgentError::io(&old, e))?;
        }
    }
    install::recover(root)?;
    match &r.back {
        Some(prev) => state.back_to_previous(&r.product, prev, 0),
        None => {
            state.installed.remove(&r.product);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with `app` at v1 and v2 staged, and the journal of that install at `step`, with
    /// the exchange done when `exchanged`.
    fn at(step: Step, exchanged: bool, needs_health: bool) -> (tempfile::TempDir, Op) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(install::live_dir(root, "app")).unwrap();
        std::fs::write(install::live_dir(root, "app").join("VERSION"), "1").unwrap();
        std::fs::create_dir_all(install::pending_dir(root, "app")).unwrap();
        std::fs::write(install::pending_dir(root, "app").join("VERSION"), "2").unwrap();
        let staged_inode = inode(&install::pending_dir(root, "app"));
        if exchanged {
            install::exchange_in(root, "app").unwrap();
        }
        let op = Op {
            update_id: "app-2".into(),
            product: "app".into(),
            version: "2".into(),
            previous: Some(PreviousRec { version: "1".into(), ..Default::default() }),
            step,
            staged_inode,
            needs_health,
            self_update: false,
            upgrade_code: String::new(),
            product_code: String::new(),
            lifecycle: Default::default(),
        };
        (dir, op)
    }

    fn live(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(install::live_dir(dir.path(), "app").join("VERSION")).unwrap()
    }

    #[test]
    fn recovery_undoes_what_never_swapped_and_keeps_what_did() {
        for step in [Step::Downloaded, Step::Verified, Step::Staged] {
            let (dir, op) = at(step, false, false);
            assert_eq!(recover(dir.path(), &op).unwrap(), Outcome::Abandoned, "{step:?}");
            assert_eq!(live(&dir), "1");
            assert!(!install::pending_dir(dir.path(), "app").exists(), "{step:?}: staging dropped");
        }
        // The journal still says Staged, but the inode shows the exchange happened.
        for step in [Step::Staged, Step::Swapped, Step::Healthy] {
            let (dir, op) = at(step, true, false);
            assert_eq!(recover(dir.path(), &op).unwrap(), Outcome::RolledForward, "{step:?}");
            assert_eq!(live(&dir), "2");
            let old = install::old_dir(dir.path(), "app").join("VERSION");
            assert_eq!(std::fs::read_to_string(old).unwrap(), "1", "{step:?}: the old version kept");
        }
    }

    #[test]
    fn an_install_that_never_proved_healthy_is_swapped_back() {
        let (dir, op) = at(Step::Swapped, true, true);
        assert_eq!(recover(dir.path(), &op).unwrap(), Outcome::RolledBack);
        assert_eq!(live(&dir), "1");
        let (dir, op) = at(Step::Healthy, true, true);
        assert_eq!(recover(dir.path(), &op).unwrap(), Outcome::RolledForward, "healthy stays");
        assert_eq!(live(&dir), "2");
    }

    #[test]
    fn a_recorded_install_names_its_version_and_previous_one() {
        let (_dir, op) = at(Step::Healthy, true, false);
        let mut st = AgentState::default();
        st.failures.insert("app-2".into(), crate::state::FailureRec { error: "x".into(), count: 2 });
        record_install(&mut st, &op, 7);
        let rec = &st.installed["app"];
        assert_eq!((rec.version.as_str(), rec.previous.as_ref().unwrap().version.as_str()), ("2", "1"));
        assert!(st.failures.is_empty(), "a success forgets the failures");
    }
}
