//! Self-update: the agent installs a new version of itself through the same pipeline as any
//! product (downloaded, verified, staged, swapped, journaled), then becomes it. The new binary
//! must first answer `--version` from the staged tree; after the swap the running agent starts
//! a watchdog (the previous binary) and replaces itself with the new one, on trial. The new
//! agent confirms itself by completing a check and reporting in; if it dies first or stays
//! silent past the deadline, the watchdog kills it, swaps the previous version back, records
//! why, and starts the previous agent again (or leaves that to systemd when run under it).
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{AgentError, Result};
use crate::journal;
use crate::state::AgentState;

/// Set on the new agent's environment: the update it is on trial for.
pub const TRIAL_ENV: &str = "UPDRAFT_SELF_UPDATE";

/// The agent binary inside a product tree.
pub fn binary_in(tree: &Path) -> PathBuf {
    tree.join("bin").join("agent")
}

/// The staged binary must start and say it is an agent before anything is swapped.
pub fn self_test(tree: &Path) -> std::result::Result<(), String> {
    let bin = binary_in(tree);
    let mut child = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("the new agent binary {} does not start: {e}", bin.display()))?;
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the new agent binary did not answer --version within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    if !status.success() || !out.starts_with("agent") {
        return Err(format!("the new agent binary fails its self-test (--version: {status}, said {:?})", out.trim()));
    }
    Ok(())
}

/// Starts the watchdog (from `watchdog_bin`, a binary known to work) and then replaces this
/// process with the new agent in `live`. Returns only if the exec fails.
pub fn become_new(
    watchdog_bin: &Path,
    live: &Path,
    state_dir: &Path,
    root: &Path,
    deadline: Duration,
    argv: &[OsString],
    update_id: &str,
) -> AgentError {
    let log = state_dir.join("self-update.log");
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log);
    let mut watchdog = Command::new(watchdog_bin);
    watchdog
        .arg("self-update-watch")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--install-root")
        .arg(root)
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg("--deadline-secs")
        .arg(deadline.as_secs().to_string())
        .arg("--")
        .args(argv)
        .stdin(Stdio::null())
        // Its own process group: it must outlive the agent it watches.
        .process_group(0);
    if let Ok(f) = out {
        if let Ok(f2) = f.try_clone() {
            watchdog.stdout(f2);
        }
        watchdog.stderr(f);
    }
    if let Err(e) = watchdog.spawn() {
        return AgentError::Install { update: update_id.into(), reason: format!("cannot start the watchdog: {e}") };
    }
    let new_bin = binary_in(live);
    tracing::warn!(binary = %new_bin.display(), "becoming the new agent (on trial until it reports in)");
    let err = Command::new(&new_bin).args(argv.iter().skip(1)).env(TRIAL_ENV, update_id).exec();
    AgentError::Install {
        update: update_id.into(),
        reason: format!("cannot run the new agent {}: {err}", new_bin.display()),
    }
}

fn alive(pid: u32) -> bool {
    // A killed child of someone else's lingers as a zombie until reaped: that is not alive.
    let dir = PathBuf::from(format!("/proc/{pid}"));
    dir.exists() && !crate::lifecycle::is_zombie(&dir)
}

/// The watchdog's life: wait for the new agent (`pid`) to confirm itself; otherwise undo.
/// `argv` is the agent's original command line, to start it again with.
pub fn watch(state_dir: &Path, root: &Path, pid: u32, deadline: Duration, argv: &[OsString]) -> Result<()> {
    let start = Instant::now();
    let why = loop {
        match journal::load(state_dir)? {
            Some(op) if op.self_update && op.step != journal::Step::Healthy => {}
            _ => {
                eprintln!("self-update watchdog: the new agent reported in");
                return Ok(());
            }
        }
        if !alive(pid) {
            break "the new agent exited before it reported in".to_string();
        }
        if start.elapsed() >= deadline {
            break format!("the new agent did not report in within {} s", deadline.as_secs());
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    // SAFETY: kill(2) with a plain pid and signal.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let gone = Instant::now();
    while alive(pid) && gone.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(op) = journal::load(state_dir)? else { return Ok(()) };
    journal::recover(root, &op)?;
    let mut st = AgentState::load(state_dir)?;
    let back = op.previous.as_ref().map(|p| p.version.clone()).unwrap_or_else(|| "the agent it started as".into());
    let msg = format!("self-update to {} {} failed: {why}; back on {back}", op.product, op.version);
    eprintln!("self-update watchdog: {msg}");
    // An agent that cannot stay up is not retried by itself: someone must ask for it again
    // (`agent apply --select ID`), or the machine could keep replacing its own agent.
    st.failures.insert(
        op.update_id.clone(),
        crate::state::FailureRec { error: msg.clone(), count: crate::state::GIVE_UP_AFTER },
    );
    // The new agent recorded itself as installed when it started: put the previous one back.
    match &op.previous {
        Some(p) => st.back_to_previous(&op.product, p, 0),
        None => {
            st.installed.remove(&op.product);
        }
    }
    st.install_errors.insert(op.product.clone(), msg);
    st.save(state_dir)?;
    journal::clear(state_dir)?;
    if std::env::var_os("INVOCATION_ID").is_some() {
        return Ok(()); // systemd starts the unit again, from the restored tree
    }
    let live = binary_in(&crate::install::live_dir(root, &op.product));
    let program = if live.is_file() { live } else { PathBuf::from(&argv[0]) };
    let err = Command::new(&program).args(argv.iter().skip(1)).env_remove(TRIAL_ENV).exec();
    Err(AgentError::Install {
        update: op.update_id,
        reason: format!("cannot restart the agent {}: {err}", program.display()),
    })
}
