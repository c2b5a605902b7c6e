//! An install as a state machine over the journal's steps ([`Step`]). [`advance`] maps the
//! step an install is at to the next one, doing that step's work and nothing else; [`run`]
//! drives it and, after every step, saves the journal and passes the step's fail point — in
//! this one place. When a step fails, the caller settles the disk with [`journal::recover`],
//! exactly as start-up does after a crash at that step: errors and crashes follow one rule.
//!
//! The steps: check the package (Downloaded → Verified), unpack it beside the live tree
//! (→ Staged), stop the application, wait for its gate and carry its data into the new tree
//! (→ Carried), exchange the trees (→ Swapped), then keep the previous tree as `P_old` and
//! prove the new version healthy (→ Healthy). A restore starts at Staged, its tree copied from
//! a backup.
use std::path::{Path, PathBuf};
use std::time::Duration;

use updraft_core::keys::PublicKey;
use updraft_core::package::{Header, Lifecycle, Package};

use crate::cancel::Cancel;
use crate::error::{AgentError, Result};
use crate::journal::{self, Op, Step};
use crate::{failpoint, install, lifecycle, selfupdate};

/// What an install needs besides its journal entry.
pub struct Ctx<'a> {
    pub root: &'a Path,
    pub state_dir: &'a Path,
    pub key: &'a PublicKey,
    /// The agent's own product: its new version must pass a self-test before the swap.
    pub self_product: &'a str,
    pub cancel: &'a Cancel,
    /// The downloaded package; none for a restore, which starts with its tree staged.
    pub package: Option<&'a Path>,
    /// The package was unpacked into `P_update_pending` as it downloaded, by this process
    /// just now ([`install::stage_while_downloading`]), and need not be unpacked again: its
    /// header, accepted then (there is no package file).
    pub streamed: Option<&'a Header>,
}

/// The fail point passed once the journal says `step`.
fn point(step: Step) -> Option<&'static str> {
    match step {
        Step::Downloaded => None, // `download:done` came just before
        Step::Verified => Some("verified"),
        Step::Staged => Some("staged"),
        Step::Carried => Some("carried"),
        Step::Swapped => Some("swap:journaled"),
        Step::Healthy => Some("healthy"),
    }
}

/// What every hook is told about the install it runs in.
pub fn hook_env(op: &Op, root: &Path) -> Vec<(&'static str, String)> {
    let previous = op.previous.as_ref().map(|p| p.version.as_str()).unwrap_or_default();
    lifecycle::hook_vars(&op.product, &op.version, previous, &op.update_id, root)
}

/// Runs `op` from the step it is at to Healthy, saving the journal at every step.
pub fn run(ctx: &Ctx, mut op: Op) -> Result<Op> {
    let mut pkg = None;
    journal::save(ctx.state_dir, &op)?;
    while op.step != Step::Healthy {
        op.step = advance(ctx, &mut op, &mut pkg)?;
        journal::save(ctx.state_dir, &op)?;
        if let Some(p) = point(op.step) {
            failpoint::check(p)?;
        }
    }
    // Healthy: only now may earlier versions go (recovery does the same after a crash here).
    op.prune(ctx.root)?;
    Ok(op)
}

/// Does the work that takes `op` from its step to the next, and returns that next step.
pub fn advance(ctx: &Ctx, op: &mut Op, pkg: &mut Option<Package>) -> Result<Step> {
    let fail = |reason: String| AgentError::Install { update: op.update_id.clone(), reason };
    match op.step {
        Step::Downloaded => {
            if let Some(h) = ctx.streamed {
                op.lifecycle = h.manifest.lifecycle.clone();
                return Ok(Step::Verified);
            }
            let path = ctx.package.ok_or_else(|| fail("no package to install".into()))?;
            let p = install::verify(path, ctx.key, &op.update_id, &op.product, &op.version)?;
            op.lifecycle = p.manifest.lifecycle.clone();
            *pkg = Some(p);
            Ok(Step::Verified)
        }
        Step::Verified => {
            let pending = install::pending_dir(ctx.root, &op.product);
            let staged = match ctx.streamed.is_some() && pending.is_dir() {
                true => pending,
                false => {
                    let p = match pkg.take() {
                        Some(p) => p,
                        None => {
                            let path = ctx.package.ok_or_else(|| fail("no package to install".into()))?;
                            install::verify(path, ctx.key, &op.update_id, &op.product, &op.version)?
                        }
                    };
                    install::stage(&p, ctx.root, &op.update_id)?
                }
            };
            op.staged_inode = install::inode(&staged);
            op.needs_health = op.lifecycle.after_swap();
            Ok(Step::Staged)
        }
        Step::Staged => {
            // The last moment a cancel stops an install: `P` is untouched until the swap.
            if ctx.cancel.is_requested() {
                return Err(AgentError::Cancelled);
            }
            let staged = install::pending_dir(ctx.root, &op.product);
            if op.product == ctx.self_product {
                selfupdate::self_test(&staged).map_err(fail)?;
            }
            // Before the swap: pre-install and stop hooks from the staged tree, then the gate.
            let lc = op.lifecycle.clone();
            let (env, log) = (hook_env(op, ctx.root), lifecycle::log_path(ctx.state_dir, &op.update_id));
            let hooks = [("pre-install", &lc.pre_install), ("stop", &lc.stop)];
            if let Err(e) = stop_application(&lc, &hooks, &staged, &env, &log, ctx.cancel, &op.update_id) {
                // Not stopped after all (a hook failed or was cut short, the gate held, a
                // cancel): the version that stays is started again, as after its own install.
                restart_live(ctx, op, &env, &log);
                return Err(e);
            }
            // The exchange replaces only a tree a receipt describes: one that appeared under the
            // root since the check is someone else's.
            let live = install::live_dir(ctx.root, &op.product);
            match &op.previous {
                None if std::fs::symlink_metadata(&live).is_ok() => {
                    return Err(fail(format!(
                        "{} appeared during the install and was not installed by Updraft: left alone",
                        live.display()
                    )));
                }
                None => {}
                // The application has stopped: its data is final, and goes with it.
                Some(_) => {
                    install::carry(&live, &staged, lc.carried())?;
                }
            }
            Ok(Step::Carried)
        }
        Step::Carried => {
            install::exchange_in(ctx.root, &op.product)?;
            failpoint::check("swap:exchanged")?;
            Ok(Step::Swapped)
        }
        Step::Swapped => {
            op.keep_old(ctx.root)?;
            failpoint::check("swap:old-kept")?;
            failpoint::check("health:before")?;
            // After the swap: post-install and start hooks and the health check, from the new
            // tree. Only a healthy install counts; otherwise the previous version goes back.
            healthy(ctx, op).map_err(|reason| {
                let back = match &op.previous {
                    Some(p) => format!("swapped back to {}", p.version),
                    None => "removed it (there was no earlier version)".to_string(),
                };
                AgentError::RolledBack { update: op.update_id.clone(), reason: format!("{reason}; {back}") }
            })?;
            Ok(Step::Healthy)
        }
        Step::Healthy => Ok(Step::Healthy),
    }
}

/// Stops the application before anything on disk changes — one rule for installs and
/// removals: `hooks` run from `tree` in order (a failing one fails the step), then the process
/// gate is waited for; still held at the hook timeout, the step is deferred to the next check;
/// a cancel or a stop of the agent ends the wait.
pub fn stop_application(
    lc: &Lifecycle,
    hooks: &[(&str, &Option<String>)],
    tree: &Path,
    env: &[(&'static str, String)],
    log: &Path,
    cancel: &Cancel,
    update: &str,
) -> Result<()> {
    let stopped = || cancel.is_requested();
    for (name, hook) in hooks {
        if let Some(rel) = hook {
            lifecycle::run_hook(name, rel, tree, env, lc.hook_timeout(), log, &stopped).map_err(
                |reason| match stopped() {
                    true => AgentError::Cancelled,
                    false => AgentError::Install { update: update.to_string(), reason },
                },
            )?;
        }
    }
    lifecycle::wait_gate(lc, lc.hook_timeout(), &stopped).map_err(|reason| match stopped() {
        true => AgentError::Cancelled,
        false => AgentError::Deferred { update: update.to_string(), reason },
    })
}

/// Runs the live version's start hook, if its package has one, after an install that began to
/// stop the application did not go ahead. Its failure is logged: the install's own error is
/// what the caller reports.
fn restart_live(ctx: &Ctx, op: &Op, env: &[(&'static str, String)], log: &Path) {
    let Some(prev) = &op.previous else { return };
    let Some(rel) = &prev.lifecycle.start else { return };
    let live = install::live_dir(ctx.root, &op.product);
    if let Err(reason) =
        lifecycle::run_hook("start", rel, &live, env, prev.lifecycle.hook_timeout(), log, &lifecycle::never)
    {
        tracing::warn!(product = %op.product, version = %prev.version, %reason, "cannot start the version that stays");
    }
}

/// The new version's post-install and start hooks and its health check, from the live tree.
fn healthy(ctx: &Ctx, op: &Op) -> std::result::Result<(), String> {
    let lc = &op.lifecycle;
    let live = install::live_dir(ctx.root, &op.product);
    let (env, log): (_, PathBuf) = (hook_env(op, ctx.root), lifecycle::log_path(ctx.state_dir, &op.update_id));
    for (name, hook) in [("post-install", &lc.post_install), ("start", &lc.start), ("health", &lc.health)] {
        if let Some(rel) = hook {
            lifecycle::run_hook(name, rel, &live, &env, lc.hook_timeout(), &log, &lifecycle::never)?;
        }
    }
    match &lc.health_process {
        Some(name) => lifecycle::watch_process(name, Duration::from_secs(lc.health_window_secs.into()), &log),
        None => Ok(()),
    }
}
