//! The install journal (`STATE_DIR/journal.json`): which step of which install the agent is
//! in, made durable at every boundary so that a crash at any instant can be finished or undone
//! on the next start. `ROOT/P` only ever changes by one atomic exchange, so it is always whole;
//! the journal decides whether the agent's records follow the new tree or the old.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::install::{self, inode};
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
    /// The application stopped, its data and kept files are carried into the staged tree.
    Carried,
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
    /// What `P_old` held when the install began: it becomes a backup, or goes.
    #[serde(default)]
    pub displaced: Option<PreviousRec>,
    /// The machine's backups when the install began, newest first.
    #[serde(default)]
    pub backups: Vec<PreviousRec>,
}

impl Op {
    /// An install over the live version `live` describes (none for a first install): what it
    /// replaces, and the `P_old` and backups it inherits. The caller names what is installed.
    pub fn replacing(live: Option<&crate::state::InstalledRec>) -> Op {
        Op {
            update_id: String::new(),
            product: String::new(),
            version: String::new(),
            previous: live.map(|r| PreviousRec {
                version: r.version.clone(),
                update_id: r.update_id.clone(),
                lifecycle: r.lifecycle.clone(),
            }),
            step: Step::Downloaded,
            staged_inode: None,
            needs_health: false,
            self_update: false,
            upgrade_code: String::new(),
            product_code: String::new(),
            lifecycle: Default::default(),
            displaced: live.and_then(|r| r.previous.clone()),
            backups: live.map(|r| r.backups.clone()).unwrap_or_default(),
        }
    }

    /// The backups once this install is live, newest first: the displaced `P_old` and the
    /// earlier ones, as many as the new package keeps besides `P_old`, never the live version.
    pub fn kept(&self) -> Vec<PreviousRec> {
        let mut kept: Vec<PreviousRec> = Vec::new();
        for b in self.displaced.iter().chain(&self.backups) {
            let live_or_old =
                b.version == self.version || self.previous.as_ref().is_some_and(|p| p.version == b.version);
            if !live_or_old && !kept.iter().any(|k| k.version == b.version) {
                kept.push(b.clone());
            }
        }
        kept.truncate(self.lifecycle.versions_kept() as usize - 1);
        kept
    }

    /// Moves the previous version (in `P_update_pending` after the exchange) to `P_old`; the
    /// `P_old` it replaces waits as a backup until [`Op::prune`].
    pub fn keep_old(&self, root: &Path) -> Result<()> {
        install::keep_old(root, &self.product, self.displaced.as_ref().map(|d| d.version.as_str()))
    }

    /// Once the install is healthy: deletes the backups [`Op::kept`] does not name.
    pub fn prune(&self, root: &Path) -> Result<()> {
        let kept = self.kept();
        install::prune_backups(root, &self.product, &kept.iter().map(|b| b.version.as_str()).collect::<Vec<_>>())
    }
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
            backups: op.kept(),
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
    let exchanged = match op.step {
        Step::Downloaded | Step::Verified => false,
        // The exchange may have happened after the journal said Staged or Carried: the inode
        // tells.
        Step::Staged | Step::Carried => op.staged_inode.is_some() && inode(&live) == op.staged_inode,
        Step::Swapped | Step::Healthy => true,
    };
    if exchanged && op.needs_health && op.step != Step::Healthy {
        install::swap_back(root, &op.product, op.staged_inode, op.displaced.as_ref().map(|d| d.version.as_str()))?;
        return Ok(Outcome::RolledBack);
    }
    if exchanged {
        // `pending` (if still there) holds the previous version: keep it as P_old.
        op.keep_old(root)?;
        op.prune(root)?;
        Ok(Outcome::RolledForward)
    } else {
        install::recover(root)?; // drops the staged tree; P was never touched
        Ok(Outcome::Abandoned)
    }
}

/// What start-up recovery leaves for the agent to run with.
#[derive(Debug)]
pub struct Started {
    pub state: AgentState,
    /// The self-update this process is the new agent of, on trial until it reports in.
    pub trial: Option<Op>,
}

/// Start-up, before anything else looks at the install root: loads the state and finishes or
/// undoes whatever install or removal a crash interrupted, so that `ROOT` and the records agree.
/// `trial` is the update id this process was started to try as the new agent, if any.
pub fn start_up(root: &Path, state_dir: &Path, trial: Option<&str>, now_unix: i64) -> Result<Started> {
    let mut state = AgentState::load(state_dir)?;
    let mut on_trial = None;
    if let Some(op) = load(state_dir)? {
        if op.self_update && trial == Some(op.update_id.as_str()) {
            // This process is the new agent that op installed: it confirms itself by reporting in.
            tracing::warn!(update = %op.update_id, "running as the new agent, on trial until it reports in");
            // Its checks must say what runs now, or the provider would offer it again.
            record_install(&mut state, &op, now_unix);
            state.save(state_dir)?;
            on_trial = Some(op);
        } else {
            match recover(root, &op)? {
                Outcome::RolledForward => {
                    tracing::warn!(update = %op.update_id, step = ?op.step, "finished an install interrupted by a crash");
                    record_install(&mut state, &op, now_unix);
                }
                Outcome::Abandoned => {
                    tracing::warn!(update = %op.update_id, step = ?op.step, "undid an install interrupted by a crash; it will be retried");
                }
                Outcome::RolledBack => {
                    tracing::warn!(update = %op.update_id, "a crash came before the new version passed its health check: swapped back");
                }
            }
            state.save(state_dir)?;
            clear(state_dir)?;
        }
    }
    if let Some(r) = load_removal(state_dir)? {
        if recover_removal(root, &r, &mut state, now_unix)? {
            tracing::warn!(product = %r.product, version = %r.version, "finished a removal interrupted by a crash");
        }
        state.save(state_dir)?;
        clear_removal(state_dir)?;
    }
    let streamed = install::streamed_products(&crate::client::downloads_dir(state_dir));
    let cleaned = install::recover_keeping(root, &streamed)?;
    if !cleaned.is_empty() {
        tracing::warn!(?cleaned, "removed leftovers of an interrupted install");
    }
    Ok(Started { state, trial: on_trial })
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
    /// Inode of the removed version's tree (`P` before the removal).
    #[serde(default)]
    pub removed_inode: Option<u64>,
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
pub fn recover_removal(root: &Path, r: &Removal, state: &mut AgentState, now_unix: i64) -> Result<bool> {
    let live = install::live_dir(root, &r.product);
    let happened = match &r.back {
        Some(_) => r.old_inode.is_some() && inode(&live) == r.old_inode,
        None => !live.exists(),
    };
    if !happened {
        return Ok(false);
    }
    // Finish what the interrupted step left: the removed version's tree, removal leftovers;
    // the newest backup becomes `P_old`.
    let rec = state.installed.get(&r.product).cloned();
    if let Some(prev) = &r.back {
        // Records older than `removed_inode` name no tree: then whatever is in `P_old` goes.
        let removed = r.removed_inode.or_else(|| inode(&install::old_dir(root, &r.product)));
        let next = rec.as_ref().filter(|rec| rec.version != prev.version).and_then(|rec| rec.backups.first());
        install::drop_old(root, &r.product, removed, next.map(|b| b.version.as_str()))?;
    }
    install::recover(root)?;
    match &r.back {
        // Unless the records already say so (a crash after they were saved).
        Some(prev) if rec.is_some_and(|rec| rec.version == prev.version) => {}
        Some(prev) => state.back_to_previous(&r.product, prev, now_unix),
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
            displaced: None,
            backups: vec![],
        };
        (dir, op)
    }

    fn live(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(install::live_dir(dir.path(), "app").join("VERSION")).unwrap()
    }

    #[test]
    fn recovery_undoes_what_never_swapped_and_keeps_what_did() {
        for step in [Step::Downloaded, Step::Verified, Step::Staged, Step::Carried] {
            let (dir, op) = at(step, false, false);
            assert_eq!(recover(dir.path(), &op).unwrap(), Outcome::Abandoned, "{step:?}");
            assert_eq!(live(&dir), "1");
            assert!(!install::pending_dir(dir.path(), "app").exists(), "{step:?}: staging dropped");
        }
        // The journal still says Staged, but the inode shows the exchange happened.
        for step in [Step::Staged, Step::Carried, Step::Swapped, Step::Healthy] {
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
        // A crash during that recovery, or after it and before the journal was cleared: the
        // next start does it again and must end the same.
        assert_eq!(recover(dir.path(), &op).unwrap(), Outcome::RolledBack);
        assert_eq!(live(&dir), "1", "recovering twice never swaps the unhealthy version back in");
        // The same with the previous tree already moved to P_old.
        let (dir, op) = at(Step::Swapped, true, true);
        op.keep_old(dir.path()).unwrap();
        assert_eq!(recover(dir.path(), &op).unwrap(), Outcome::RolledBack);
        assert_eq!(live(&dir), "1");
        assert!(!install::old_dir(dir.path(), "app").exists(), "the unhealthy tree is gone");
        let (dir, op) = at(Step::Healthy, true, true);
        assert_eq!(recover(dir.path(), &op).unwrap(), Outcome::RolledForward, "healthy stays");
        assert_eq!(live(&dir), "2");
    }

    #[test]
    fn start_up_settles_the_disk_and_the_records_and_recognises_a_trial() {
        // Interrupted after the exchange: finished, recorded, journal closed.
        let (dir, op) = at(Step::Swapped, true, false);
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        save(&state_dir, &op).unwrap();
        let started = start_up(dir.path(), &state_dir, None, 5).unwrap();
        assert_eq!(started.state.installed["app"].version, "2");
        assert!(started.trial.is_none() && load(&state_dir).unwrap().is_none());
        assert_eq!(AgentState::load(&state_dir).unwrap().installed["app"].version, "2", "saved");
        // Interrupted before it: undone, nothing recorded.
        let (dir, op) = at(Step::Carried, false, false);
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        save(&state_dir, &op).unwrap();
        let started = start_up(dir.path(), &state_dir, None, 5).unwrap();
        assert!(started.state.installed.is_empty() && load(&state_dir).unwrap().is_none());
        assert_eq!(live(&dir), "1");
        // The new agent of a self-update, started to try it: on trial, its journal kept open.
        let (dir, mut op) = at(Step::Swapped, true, true);
        op.keep_old(dir.path()).unwrap(); // as the installer left it: the previous agent in P_old
        op.self_update = true;
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        save(&state_dir, &op).unwrap();
        let started = start_up(dir.path(), &state_dir, Some("app-2"), 5).unwrap();
        assert_eq!(started.trial.as_ref().map(|o| o.update_id.as_str()), Some("app-2"));
        assert!(load(&state_dir).unwrap().is_some(), "the watchdog still needs it");
        assert_eq!(live(&dir), "2");
        // Any other process finds the same journal unproven: swapped back.
        let started = start_up(dir.path(), &state_dir, Some("app-other"), 5).unwrap();
        assert!(started.trial.is_none());
        assert_eq!(live(&dir), "1");
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
