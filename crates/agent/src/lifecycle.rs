//! A package's lifecycle on the machine: the process gate (named processes, a lock file), the
//! hooks with a timeout and captured output, and the health check. Each hook's output is
//! appended to `STATE_DIR/logs/UPDATE.log`, which `agent log UPDATE` prints.
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use updraft_core::package::Lifecycle;

/// Output kept per hook run, so a chatty hook cannot fill the disk.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// Where the output of an update's hooks is kept: `STATE/logs/ID.log`.
///
/// The id comes from a provider's offer, so it is made a plain file name first: anything but
/// letters, digits, `-`, `_`, `+` and a non-leading `.` becomes `_`, so no id can name a path
/// outside `logs/` (`../x`, `/etc/x`) or a hidden file.
pub fn log_path(state_dir: &Path, update_id: &str) -> PathBuf {
    let mut safe: String = update_id
        .chars()
        .take(200)
        .enumerate()
        .map(|(i, c)| if c.is_ascii_alphanumeric() || "-_+".contains(c) || (c == '.' && i > 0) { c } else { '_' })
        .collect();
    if safe.is_empty() {
        safe.push('_');
    }
    state_dir.join("logs").join(format!("{safe}.log"))
}

/// Whether the process at `/proc/PID` (given as that directory) has exited and only waits for
/// its parent to collect it: a zombie is not running.
pub fn is_zombie(proc_dir: &Path) -> bool {
    std::fs::read_to_string(proc_dir.join("stat"))
        .is_ok_and(|st| st.rsplit(')').next().and_then(|r| r.split_whitespace().next()) == Some("Z"))
}

/// What keeps the install from going ahead now: running processes the package names, or its
/// lock file.
pub fn blockers(lc: &Lifecycle) -> Vec<String> {
    let mut out = Vec::new();
    if !lc.processes.is_empty()
        && let Ok(procs) = std::fs::read_dir("/proc")
    {
        for p in procs.flatten() {
            let name = p.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let Ok(comm) = std::fs::read_to_string(p.path().join("comm")) else { continue };
            let comm = comm.trim();
            if !is_zombie(&p.path()) && lc.processes.iter().any(|w| w == comm) {
                out.push(format!("process {comm} (pid {pid}) is running"));
            }
        }
    }
    if let Some(l) = &lc.lock_file
        && Path::new(l).exists()
    {
        out.push(format!("lock file {l} exists"));
    }
    out
}

/// Pids of running processes called `name`.
fn running(name: &str) -> Vec<String> {
    let lc = Lifecycle { processes: vec![name.to_string()], ..Default::default() };
    blockers(&lc)
}

/// One look inside the verification window, from the live tree: the health check again, and
/// the health process running. Returns the health process's pids (none without one), for the
/// caller to see it restart.
pub fn verify_look(lc: &Lifecycle, live: &Path, env: &[(&str, String)], log: &Path) -> Result<Vec<String>, String> {
    if let Some(rel) = &lc.health {
        run_hook("health (verification)", rel, live, env, lc.hook_timeout(), log, &never)?;
    }
    let Some(name) = &lc.health_process else { return Ok(vec![]) };
    let pids = running(name);
    if pids.is_empty() {
        let msg = format!("verification: health process {name} is not running");
        append_log(log, &format!("== {msg}\n"));
        return Err(msg);
    }
    Ok(pids)
}

/// The health process must be running now and at every look for `window`.
pub fn watch_process(name: &str, window: Duration, log: &Path) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if running(name).is_empty() {
            let msg = format!(
                "health: process {name} is not running ({:.1} s into the {} s window)",
                start.elapsed().as_secs_f64(),
                window.as_secs()
            );
            append_log(log, &format!("== {msg}\n"));
            return Err(msg);
        }
        if start.elapsed() >= window {
            append_log(log, &format!("== health: process {name} stayed up for {} s\n", window.as_secs()));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits up to `max` for the gate to open, or until `stop()` (a cancel or a stop of the
/// agent); returns what still blocks it otherwise.
pub fn wait_gate(lc: &Lifecycle, max: Duration, stop: &dyn Fn() -> bool) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let b = blockers(lc);
        if b.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= max || stop() {
            return Err(b.join("; "));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = MAX_OUTPUT.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        kept
    })
}

/// Appends to an update's hook log; a log that cannot be written must not fail the install.
fn append_log(log: &Path, text: &str) {
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::OpenOptions::new().create(true).append(true).open(log) {
        Ok(mut f) => {
            let _ = f.write_all(text.as_bytes());
        }
        Err(e) => tracing::warn!(log = %log.display(), error = %e, "cannot write the hook log"),
    }
}

/// Never interrupt a hook (those that run after the swap: they finish or time out).
pub fn never() -> bool {
    false
}

/// Runs hook `name` (`rel`, a file of the package) in `tree` with `env`, for at most
/// `timeout`, or until `stop()` (a cancel or a stop of the agent: only hooks before the swap
/// pass one); appends its output to `log`. Fails on a non-zero exit, the timeout or a stop,
/// with the end of its output. A hook is killed with everything it started.
pub fn run_hook(
    name: &str,
    rel: &str,
    tree: &Path,
    env: &[(&str, String)],
    timeout: Duration,
    log: &Path,
    stop: &dyn Fn() -> bool,
) -> Result<(), String> {
    // Absolute: the hook runs with the tree as its working directory.
    let tree = std::path::absolute(tree).map_err(|e| format!("{name} hook {rel}: {}: {e}", tree.display()))?;
    let program = tree.join(rel);
    let start = Instant::now();
    let mut child = Command::new(&program)
        .current_dir(&tree)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills whatever it started too.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            let msg = format!("{name} hook {rel}: cannot start: {e}");
            append_log(log, &format!("== {msg}\n"));
            msg
        })?;
    let (out, err) = (drain(child.stdout.take().expect("piped")), drain(child.stderr.take().expect("piped")));
    let (status, stopped) = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break (Some(s), false);
        }
        let stopped = stop();
        if stopped || start.elapsed() >= timeout {
            // SAFETY: kill(2) on our child's process group; no memory is involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break (None, stopped);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = out.join().unwrap_or_default();
    output.extend(err.join().unwrap_or_default());
    let text = String::from_utf8_lossy(&output).into_owned();
    let verdict = match status {
        Some(s) if s.success() => "exit 0".to_string(),
        Some(s) => format!("exit {}", s.code().map(|c| c.to_string()).unwrap_or_else(|| "by signal".into())),
        None if stopped => "killed: the agent was asked to stop".to_string(),
        None => format!("killed after the {} s timeout", timeout.as_secs()),
    };
    let mut entry = format!("== {name} hook {rel}: {verdict} after {:.1} s\n{text}", start.elapsed().as_secs_f64());
    if !entry.ends_with('\n') {
        entry.push('\n');
    }
    append_log(log, &entry);
    if status.is_some_and(|s| s.success()) {
        return Ok(());
    }
    let tail: String = text.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
    Err(format!(
        "{name} hook {rel} failed ({verdict}){}",
        if tail.is_empty() { String::new() } else { format!(": {tail}") }
    ))
}

/// The variables every hook gets: the product, the version it concerns, the one before (or
/// returned to), the update id and the install root.
pub fn hook_vars(
    product: &str,
    version: &str,
    previous: &str,
    update_id: &str,
    root: &Path,
) -> Vec<(&'static str, String)> {
    vec![
        ("UPDRAFT_PRODUCT", product.to_string()),
        ("UPDRAFT_VERSION", version.to_string()),
        ("UPDRAFT_PREVIOUS_VERSION", previous.to_string()),
        ("UPDRAFT_UPDATE_ID", update_id.to_string()),
        ("UPDRAFT_ROOT", root.display().to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hook_logs_stay_in_their_directory() {
        let state = Path::new("/var/lib/updraft");
        let logs = state.join("logs");
        assert_eq!(log_path(state, "app-1.0.0.0-0123456789ab"), logs.join("app-1.0.0.0-0123456789ab.log"));
        for hostile in ["../../etc/passwd", "/etc/shadow", ".hidden", "a/b", "x\0y", ""] {
            let p = log_path(state, hostile);
            assert_eq!(p.parent(), Some(logs.as_path()), "{hostile:?} -> {}", p.display());
            assert!(!p.file_name().unwrap().to_string_lossy().starts_with('.'), "{hostile:?}");
        }
    }

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn hooks_are_bounded_and_their_output_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/u.log");
        script(dir.path(), "ok", "echo hello from $UPDRAFT_VERSION");
        script(dir.path(), "bad", "echo broken >&2; exit 3");
        script(dir.path(), "slow", "sleep 30");
        let env = [("UPDRAFT_VERSION", "2.0.0.0".to_string())];
        run_hook("post-install", "ok", dir.path(), &env, Duration::from_secs(5), &log, &never).unwrap();
        let e = run_hook("health", "bad", dir.path(), &env, Duration::from_secs(5), &log, &never).unwrap_err();
        assert!(e.contains("exit 3") && e.contains("broken"), "{e}");
        let start = Instant::now();
        let e = run_hook("stop", "slow", dir.path(), &env, Duration::from_millis(300), &log, &never).unwrap_err();
        assert!(e.contains("timeout") && start.elapsed() < Duration::from_secs(5), "{e}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("hello from 2.0.0.0") && text.contains("== health hook bad: exit 3"), "{text}");
    }

    #[test]
    fn the_gate_waits_for_a_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("app.lock");
        std::fs::write(&lock, "").unwrap();
        let lc = Lifecycle { lock_file: Some(lock.display().to_string()), ..Default::default() };
        let never = || false;
        assert!(wait_gate(&lc, Duration::from_millis(300), &never).unwrap_err().contains("exists"));
        // A stop ends the wait at once, whatever the time left.
        let start = Instant::now();
        assert!(wait_gate(&lc, Duration::from_secs(60), &|| true).unwrap_err().contains("exists"));
        assert!(start.elapsed() < Duration::from_secs(5));
        std::fs::remove_file(&lock).unwrap();
        wait_gate(&lc, Duration::from_millis(300), &never).unwrap();
    }
}
