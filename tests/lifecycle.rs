//! A package's lifecycle on a real agent: hooks with captured output (`agent log`), a health
//! check that fails and swaps the previous version back, the process gate (a lock file), and
//! an update that may only be installed when the agent next starts.
use std::path::PathBuf;
use std::time::Duration;

use updraft_tests::{World, run_ok, stderr, wait_until};

const T: Duration = Duration::from_secs(30);

/// Builds `app` `version` with these hook scripts (name, shell body) and extra build flags.
fn package(w: &World, version: &str, hooks: &[(&str, &str)], flags: &[&str]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let src = w.path(&format!("lc-src-{version}"));
    std::fs::create_dir_all(src.join("hooks")).unwrap();
    std::fs::write(src.join("VERSION"), version).unwrap();
    for (name, body) in hooks {
        let p = src.join("hooks").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    w.build_package(&src, "app", version, &w.key, flags)
}

fn check(w: &World, agent: &str) -> std::process::Output {
    w.agent_cmd(agent, &["check"])
}

fn status(w: &World, agent: &str) -> serde_json::Value {
    serde_json::from_slice(&w.agent_cmd(agent, &["status", "--json"]).stdout).unwrap()
}

/// The version the agent records as installed (after its health check).
fn recorded(w: &World, agent: &str) -> String {
    let out = w.agent_cmd(agent, &["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    st["installed"][0]["version"].as_str().unwrap_or_default().to_string()
}

fn wait_socket(w: &World, agent: &str) {
    wait_until("the agent's control socket", T, || w.state(agent).join("agent.sock").exists());
}

#[test]
fn hooks_health_check_gate_and_apply_at_restart() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let marker = w.path("post-install-ran");
    let m = marker.display();

    // v1: hooks run and are logged; the health check passes.
    let v1 = w.publish(
        &url,
        &package(
            &w,
            "1.0.0.0",
            &[("post", &format!("echo post-install of $UPDRAFT_VERSION; touch {m}")), ("health", "echo healthy")],
            &["--post-install", "hooks/post", "--health-check", "hooks/health"],
        ),
    );
    let mut agent = w.agent_with("m1", &url, &["--min-interval", "3600", "--metrics-listen", "127.0.0.1:0"]);
    // Installed means swapped and healthy: the agent's records, not just the tree on disk.
    wait_until("v1 installed and healthy", T, || recorded(&w, "m1") == "1.0.0.0");
    assert!(marker.exists());
    let log = run_ok(
        std::process::Command::new(updraft_tests::bin("agent")).args(["log", &v1, "--state-dir"]).arg(w.state("m1")),
    );
    assert!(log.contains("post-install of 1.0.0.0") && log.contains("== health hook hooks/health: exit 0"), "{log}");

    // v2: the health check fails, so v1 goes back and the failure is reported.
    let v2 = w.publish(
        &url,
        &package(
            &w,
            "2.0.0.0",
            &[("health", "echo database unreachable >&2; exit 1")],
            &["--health-check", "hooks/health"],
        ),
    );
    let out = check(&w, "m1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("database unreachable") && err.contains("swapped back to 1.0.0.0"), "{err}");
    assert_eq!(w.installed("m1", "app").as_deref(), Some("1.0.0.0"));
    // Its metrics count one install and one rolled back.
    let (_, metrics) = updraft_tests::http_get(agent.probe_addr(), "/metrics").unwrap();
    for outcome in ["installed", "rolled back"] {
        let line = format!("updraft_installs_total{{outcome=\"{outcome}\",product=\"app\"}} 1");
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    assert!(!w.root("m1").join("app_update_pending").exists());
    let st = status(&w, "m1");
    assert_eq!(st["installed"][0]["version"], "1.0.0.0", "{st}");
    let log = run_ok(
        std::process::Command::new(updraft_tests::bin("agent")).args(["log", &v2, "--state-dir"]).arg(w.state("m1")),
    );
    assert!(log.contains("exit 1") && log.contains("database unreachable"), "{log}");
    w.admin_ok(&url, &["update", "state", &v2, "inactive"]);

    // v3: waits while the application's lock file exists; goes in once it is gone.
    let lock = w.path("app.lock");
    std::fs::write(&lock, "").unwrap();
    let lock_s = lock.display().to_string();
    w.publish(&url, &package(&w, "3.0.0.0", &[], &["--lock-file", &lock_s, "--hook-timeout", "1"]));
    let out = check(&w, "m1");
    assert!(stderr(&out).contains("deferred") && stderr(&out).contains("app.lock exists"), "{}", stderr(&out));
    assert_eq!(w.installed("m1", "app").as_deref(), Some("1.0.0.0"));
    std::fs::remove_file(&lock).unwrap();
    assert!(check(&w, "m1").status.success());
    assert_eq!(w.installed("m1", "app").as_deref(), Some("3.0.0.0"));

    // v4: only at the agent's next start. A check downloads it and says so; a restart installs.
    w.publish(&url, &package(&w, "4.0.0.0", &[], &["--apply-at", "restart"]));
    let out = check(&w, "m1");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("installs when the agent next starts"), "{text}");
    assert_eq!(w.installed("m1", "app").as_deref(), Some("3.0.0.0"));
    agent.kill9();
    let _again = w.agent("m1", &url);
    wait_socket(&w, "m1");
    wait_until("v4 installed at start", T, || recorded(&w, "m1") == "4.0.0.0");
}

/// A crash after the swap but before the health check passed: on restart the agent swaps the
/// previous version back (the new one never proved itself), then installs it again properly.
#[test]
fn a_crash_before_the_health_check_swaps_back_then_converges() {
    let mut w = World::new();
    let (_p, url) = w.provider("centre", true);
    w.publish(&url, &package(&w, "1.0.0.0", &[], &[]));
    {
        let _a = w.agent("m1", &url);
        wait_until("v1 recorded", T, || recorded(&w, "m1") == "1.0.0.0");
    }
    w.publish(&url, &package(&w, "2.0.0.0", &[("health", "echo ok")], &["--health-check", "hooks/health"]));
    w.env.push(("UPDRAFT_FAILPOINT".into(), "health:before".into()));
    let mut crashing = w.agent("m1", &url);
    w.env.pop();
    assert!(crashing.wait_exit(T), "the agent did not reach its fail point\n{}", crashing.log_text());
    assert_eq!(w.installed("m1", "app").as_deref(), Some("2.0.0.0"), "swapped, not yet healthy");
    let again = w.agent("m1", &url);
    // The receipt is saved a moment before the journal is cleared: wait for both.
    wait_until("v2 recorded after a healthy install, journal closed", T, || {
        recorded(&w, "m1") == "2.0.0.0" && !w.state("m1").join("journal.json").exists()
    });
    let log = again.log_text();
    assert!(log.contains("never passed") || log.contains("swapped back"), "{log}");
}

/// Builds an `updraft-agent` package whose bin/agent is `binary` (copied) or a shell script.
fn agent_package(w: &World, version: &str, binary: Result<&std::path::Path, &str>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let src = w.path(&format!("agent-src-{version}"));
    std::fs::create_dir_all(src.join("bin")).unwrap();
    let bin = src.join("bin/agent");
    match binary {
        Ok(real) => {
            std::fs::copy(real, &bin).unwrap();
        }
        Err(script) => std::fs::write(&bin, format!("#!/bin/sh\n{script}\n")).unwrap(),
    }
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    w.build_package(&src, "updraft-agent", version, &w.key, &[])
}

fn recorded_product(w: &World, agent: &str, product: &str) -> Option<String> {
    let out = w.agent_cmd(agent, &["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    st["installed"].as_array()?.iter().find(|i| i["product"] == product)?["version"].as_str().map(str::to_string)
}

/// The agent updates itself: v2 (a real agent) is staged, swapped in and exec'd in place of the
/// running process, and confirms itself by reporting in; v3 passes its self-test but never
/// reports in, so the watchdog swaps v2 back and restarts it; v4 does not even start, so it is
/// refused before the swap.
#[test]
fn the_agent_updates_itself_and_goes_back_when_the_new_one_does_not_report_in() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let mut agent = w.agent_with("m1", &url, &["--min-interval", "2", "--self-update-deadline-secs", "5"]);
    let pid = agent.pid().unwrap();
    wait_until("the agent's first check", T, || w.state("m1").join("state.json").exists());

    w.publish(&url, &agent_package(&w, "2.0.0.0", Ok(&updraft_tests::bin("agent"))));
    wait_until("v2 confirmed", T, || recorded_product(&w, "m1", "updraft-agent").as_deref() == Some("2.0.0.0"));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, w.root("m1").join("updraft-agent/bin/agent"), "the same process now runs the new binary");
    wait_until("the trial journal closed", T, || !w.state("m1").join("journal.json").exists());

    // v3 answers --version but then never reports in.
    let v3 = w.publish(
        &url,
        &agent_package(&w, "3.0.0.0", Err("[ \"$1\" = --version ] && { echo agent 3; exit 0; }; exec sleep 600")),
    );
    wait_until("the watchdog to bring v2 back", Duration::from_secs(60), || {
        let out = w.agent_cmd("m1", &["status", "--json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        st["daemon_running"] == true && st["problems"].to_string().contains("did not report in")
    });
    assert_eq!(recorded_product(&w, "m1", "updraft-agent").as_deref(), Some("2.0.0.0"));
    let tree = std::fs::read(w.root("m1").join("updraft-agent/bin/agent")).unwrap();
    assert!(tree.len() > 1_000_000, "ROOT/updraft-agent is the real v2 agent again");
    // It is not retried by itself.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(recorded_product(&w, "m1", "updraft-agent").as_deref(), Some("2.0.0.0"));
    w.admin_ok(&url, &["update", "state", &v3, "inactive"]);

    // v4 does not start at all: refused before anything is swapped.
    w.publish(&url, &agent_package(&w, "4.0.0.0", Err("exit 1")));
    let out = w.agent_cmd("m1", &["check"]);
    assert!(stderr(&out).contains("fails its self-test"), "{}", stderr(&out));
    assert_eq!(recorded_product(&w, "m1", "updraft-agent").as_deref(), Some("2.0.0.0"));

    // The agent now running was started by the watchdog: stop it by its pid.
    agent.kill9();
    if let Some(pid) = std::fs::read_to_string(w.state("m1").join("agent.pid")).ok().and_then(|p| p.trim().parse().ok())
    {
        updraft_tests::signal(pid, libc::SIGKILL, false);
    }
}

/// A removal is journaled: killed after `ROOT/P` went back to the previous version but before
/// the records followed, the agent finishes it on restart.
#[test]
fn a_removal_interrupted_by_a_crash_is_finished_on_restart() {
    let mut w = World::new();
    let (_p, url) = w.provider("centre", true);
    w.publish(&url, &package(&w, "1.0.0.0", &[], &[]));
    {
        let _a = w.agent("m1", &url);
        wait_until("v1 recorded", T, || recorded(&w, "m1") == "1.0.0.0");
    }
    let v2 = w.publish(&url, &package(&w, "2.0.0.0", &[], &[]));
    {
        let _a = w.agent("m1", &url);
        wait_until("v2 recorded", T, || recorded(&w, "m1") == "2.0.0.0");
    }
    w.admin_ok(&url, &["update", "state", &v2, "remove"]);
    w.env.push(("UPDRAFT_FAILPOINT".into(), "remove:done".into()));
    let mut crashing = w.agent("m1", &url);
    w.env.pop();
    assert!(crashing.wait_exit(T), "the agent did not reach its fail point\n{}", crashing.log_text());
    assert_eq!(w.installed("m1", "app").as_deref(), Some("1.0.0.0"), "ROOT/app is back on v1");
    assert!(w.state("m1").join("removal.json").exists(), "the removal is journaled");
    let again = w.agent("m1", &url);
    wait_until("records back on v1", T, || recorded(&w, "m1") == "1.0.0.0");
    assert!(again.log_text().contains("finished a removal interrupted by a crash"), "{}", again.log_text());
    assert!(!w.state("m1").join("removal.json").exists());
    assert!(!w.root("m1").join("app_old").exists(), "the removed version is gone");
}

/// Health as a process that must stay up: a start hook that launches a daemon which keeps
/// running passes; one whose daemon dies within the window is swapped back.
#[test]
fn a_health_process_must_stay_up_for_its_window() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let with_daemon = |version: &str, runs_for: &str| {
        let src = w.path(&format!("lc-src-{version}"));
        std::fs::create_dir_all(src.join("bin")).unwrap();
        // A process with a name of its own: a copy of sleep(1).
        std::fs::copy("/bin/sleep", src.join("bin/updraftdemo")).unwrap();
        package(
            &w,
            version,
            &[("start", &format!("nohup ./bin/updraftdemo {runs_for} >/dev/null 2>&1 &"))],
            &["--start-hook", "hooks/start", "--health-process", "updraftdemo", "--health-window", "2"],
        )
    };
    w.publish(&url, &with_daemon("1.0.0.0", "30"));
    let _a = w.agent("m1", &url);
    wait_until("v1 healthy", T, || recorded(&w, "m1") == "1.0.0.0");
    let _ = std::process::Command::new("pkill").args(["-x", "updraftdemo"]).status();

    w.publish(&url, &with_daemon("2.0.0.0", "0.5"));
    let out = check(&w, "m1");
    let err = stderr(&out);
    assert!(err.contains("process updraftdemo is not running") && err.contains("swapped back to 1.0.0.0"), "{err}");
    assert_eq!(w.installed("m1", "app").as_deref(), Some("1.0.0.0"));
    let _ = std::process::Command::new("pkill").args(["-x", "updraftdemo"]).status();
}

/// Settings never change while an install runs (seed 002): `agent config` waits for the
/// running install to finish, says it waited, and the change then takes effect.
#[test]
fn a_settings_change_waits_for_the_running_install_and_says_so() {
    let mut w = World::new();
    let (_p, url) = w.provider("centre", true);
    w.publish(&url, &package(&w, "1.0.0.0", &[], &[]));
    // The install holds for 5 s once its tree is staged.
    w.env.push(("UPDRAFT_FAILPOINT".into(), "staged=delay:5000".into()));
    let _a = w.agent("m1", &url);
    w.env.pop();
    wait_until("the install under way", T, || w.state("m1").join("journal.json").exists());
    let out = w.agent_cmd("m1", &["config", "--mode", "notify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("waited for the check or install that was running"), "{text}");
    assert_eq!(recorded(&w, "m1"), "1.0.0.0", "the install finished before the settings changed");
    assert!(text.contains("mode notify"), "{text}");
}

/// A provider offering a 2 MiB package `big`, and agent `m1` downloading it with a pause of
/// `pause_ms` after each chunk, its partial file already begun.
fn downloading(pause_ms: u64) -> (World, updraft_tests::Proc, String, updraft_tests::Proc) {
    let mut w = World::new();
    let (p, url) = w.provider("centre", true);
    w.publish(&url, &w.noise_package("big", "1.0.0.0", 2));
    w.env.push(("UPDRAFT_FAILPOINT".into(), format!("download:mid=delay:{pause_ms}")));
    let a = w.agent("m1", &url);
    w.env.pop();
    wait_until("the download under way", T, || {
        partial_download(&w, "m1").is_some_and(|p| p.metadata().is_ok_and(|m| m.len() > 0))
    });
    (w, p, url, a)
}

/// The agent's partial download, if one is there: a package file begun, or (for a package
/// unpacked as it arrives) the header kept beside the files staged so far.
fn partial_download(w: &World, agent: &str) -> Option<PathBuf> {
    std::fs::read_dir(w.state(agent).join("downloads"))
        .ok()
        .and_then(|d| d.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "part" || x == "head")))
}

/// `agent cancel` stops a running download at once (the partial file stays, and a later check
/// resumes it); with nothing running it says so.
#[test]
fn agent_cancel_stops_a_download_which_resumes_later() {
    let (w, _p, url, mut a) = downloading(3000);
    let partial = || partial_download(&w, "m1");
    let out = w.agent_cmd("m1", &["cancel"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelling"), "{}", String::from_utf8_lossy(&out.stdout));
    let status = |w: &World| -> serde_json::Value {
        serde_json::from_slice(&w.agent_cmd("m1", &["status", "--json"]).stdout).unwrap_or_default()
    };
    wait_until("the check ended, cancelled", T, || {
        status(&w)["last_error"].as_str().is_some_and(|e| e.contains("cancelled by `agent cancel`"))
    });
    assert_eq!(recorded_product(&w, "m1", "big"), None, "nothing installed");
    assert!(partial().is_some(), "the partial download is kept");
    assert!(!w.state("m1").join("journal.json").exists());
    // A cancelled check is not retried at once: the agent goes idle, and a cancel says so.
    wait_until("nothing left to cancel", T, || {
        String::from_utf8_lossy(&w.agent_cmd("m1", &["cancel"]).stdout).contains("nothing to cancel")
    });
    assert_eq!(recorded_product(&w, "m1", "big"), None, "and it did not start again");

    // Without the pause, the next run resumes where the download stopped.
    a.kill9();
    let again = w.agent("m1", &url);
    wait_until("installed after all", T, || recorded_product(&w, "m1", "big").as_deref() == Some("1.0.0.0"));
    let log = again.log_text();
    assert!(log.contains("downloading") && !log.contains("offset=0 "), "the download resumed: {log}");
}

/// SIGTERM (systemd's stop) in the middle of a download: the agent stops at the next chunk and
/// exits within 2 s, the partial download kept and nothing half-installed; the next start
/// resumes the download and installs.
#[test]
fn sigterm_stops_the_agent_within_seconds_and_the_next_start_resumes() {
    let (w, _p, url, mut a) = downloading(1000);
    let partial = || partial_download(&w, "m1");
    let asked = std::time::Instant::now();
    a.term();
    assert!(a.wait_exit(Duration::from_secs(2)), "the agent did not exit within 2 s of SIGTERM\n{}", a.log_text());
    eprintln!("agent exited {:?} after SIGTERM", asked.elapsed());
    assert_eq!(recorded_product(&w, "m1", "big"), None, "nothing installed");
    assert!(partial().is_some(), "the partial download is kept");
    // Nothing half-installed: no journal, no `ROOT/big`; what came is staged, to be resumed,
    // and no copy of the package is kept besides (only its signed header).
    assert!(!w.state("m1").join("journal.json").exists() && !w.root("m1").join("big").exists());
    assert!(w.root("m1").join("big_update_pending").is_dir(), "what came is staged");
    let cached: Vec<String> = std::fs::read_dir(w.state("m1").join("downloads"))
        .unwrap()
        .flatten()
        .map(|e| e.path().extension().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached, ["head"], "the download cache holds the header only");
    // With no daemon, `agent status` shows the saved state and says so with exit status 3.
    let out = w.agent_cmd("m1", &["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((out.status.code(), &st["daemon_running"]), (Some(3), &serde_json::json!(false)), "{st}");

    let again = w.agent("m1", &url);
    wait_until("installed after the restart", T, || recorded_product(&w, "m1", "big").as_deref() == Some("1.0.0.0"));
    let log = again.log_text();
    assert!(log.contains("downloading") && !log.contains("offset=0 "), "the download resumed: {log}");
}

/// A stop while a hook before the swap runs: the hook is killed with what it started, the agent
/// exits within 2 s, the version that stays is started again (its start hook), and the next
/// start installs the update.
#[test]
fn sigterm_during_a_stop_hook_kills_it_and_starts_the_version_that_stays() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let (started, stopping, hold) = (w.path("v1-started"), w.path("v2-stopping"), w.path("hold"));
    let (s, t, h) = (started.display(), stopping.display(), hold.display());
    w.publish(&url, &package(&w, "1.0.0.0", &[("start", &format!("touch {s}"))], &["--start-hook", "hooks/start"]));
    let fast = ["--min-interval", "1", "--max-interval", "1"];
    let a = w.agent_with("m1", &url, &fast);
    wait_until("v1 installed and started", T, || recorded(&w, "m1") == "1.0.0.0" && started.exists());
    std::fs::remove_file(&started).unwrap();
    std::fs::write(&hold, "").unwrap();
    let body = format!("touch {t}; while [ -e {h} ]; do sleep 0.1; done");
    let v2 = w.publish(
        &url,
        &package(&w, "2.0.0.0", &[("stop", &body)], &["--stop-hook", "hooks/stop", "--hook-timeout", "600"]),
    );
    wait_until("the stop hook running", T, || stopping.exists());

    let asked = std::time::Instant::now();
    a.term();
    let mut a = a;
    assert!(a.wait_exit(Duration::from_secs(2)), "the agent did not exit within 2 s of SIGTERM\n{}", a.log_text());
    eprintln!("agent exited {:?} after SIGTERM during a stop hook", asked.elapsed());
    assert_eq!(w.installed("m1", "app").as_deref(), Some("1.0.0.0"), "nothing swapped");
    assert_eq!(recorded(&w, "m1"), "1.0.0.0");
    assert!(started.exists(), "the version that stays was started again");
    let log = run_ok(
        std::process::Command::new(updraft_tests::bin("agent")).args(["log", &v2, "--state-dir"]).arg(w.state("m1")),
    );
    assert!(log.contains("stop hook hooks/stop: killed: the agent was asked to stop"), "{log}");

    std::fs::remove_file(&hold).unwrap();
    let _again = a.again();
    wait_until("v2 installed after the restart", T, || recorded(&w, "m1") == "2.0.0.0");
}

/// A removal is an install's equal: it runs the removed version's stop hook, waits while the
/// application's gate holds (deferred, tried again at the next check), then brings the kept
/// version back and runs that version's start hook.
#[test]
fn a_removal_stops_the_application_waits_for_its_gate_and_starts_the_previous_version() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let (started, stopped, lock) = (w.path("v1-started"), w.path("v2-stopped"), w.path("app.lock"));
    let (s, t, l) = (started.display().to_string(), stopped.display().to_string(), lock.display().to_string());
    w.publish(&url, &package(&w, "1.0.0.0", &[("start", &format!("touch {s}"))], &["--start-hook", "hooks/start"]));
    let _a = w.agent("m1", &url);
    wait_until("v1 installed", T, || recorded(&w, "m1") == "1.0.0.0");
    let v2 = w.publish(
        &url,
        &package(
            &w,
            "2.0.0.0",
            &[("stop", &format!("touch {t}"))],
            &["--stop-hook", "hooks/stop", "--lock-file", &l, "--hook-timeout", "1"],
        ),
    );
    assert!(check(&w, "m1").status.success());
    assert_eq!(recorded(&w, "m1"), "2.0.0.0");
    std::fs::remove_file(&started).unwrap();

    // The application holds its lock: the removal stops it, then waits, and nothing changes.
    std::fs::write(&lock, "").unwrap();
    w.admin_ok(&url, &["update", "state", &v2, "remove"]);
    let out = check(&w, "m1");
    assert!(!out.status.success() && stderr(&out).contains("app.lock exists"), "{}", stderr(&out));
    assert!(stopped.exists(), "the removed version's stop hook ran");
    assert_eq!(w.installed("m1", "app").as_deref(), Some("2.0.0.0"), "nothing removed while the gate holds");
    assert!(!started.exists());

    // Once it lets go, the kept version comes back and is started.
    std::fs::remove_file(&lock).unwrap();
    let out = check(&w, "m1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.installed("m1", "app").as_deref(), Some("1.0.0.0"));
    assert_eq!(recorded(&w, "m1"), "1.0.0.0");
    assert!(started.exists(), "the restored version's start hook ran");
}

/// An application keeps its data inside its own directory: the package declares it
/// (`--data-dir`, `--keep-file`), and it survives updates, an update swapped back for failing its
/// health check, and restores; `--backup N` keeps earlier versions that `agent restore` brings
/// back, and the update it goes back from is not reinstalled by itself.
#[test]
fn data_survives_updates_a_swap_back_and_restores_from_the_kept_versions() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let build = |version: &str, health: Option<&str>| {
        let src = w.path(&format!("data-src-{version}"));
        std::fs::create_dir_all(src.join("var")).unwrap();
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("VERSION"), version).unwrap();
        std::fs::write(src.join("var/left-on-the-build-host"), "never shipped").unwrap();
        std::fs::write(src.join("etc/app.conf"), "the package's default").unwrap();
        let mut flags = vec!["--data-dir", "var/", "--keep-file", "etc/app.conf", "--backup", "2"];
        if let Some(body) = health {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(src.join("health"), format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(src.join("health"), std::fs::Permissions::from_mode(0o755)).unwrap();
            flags.extend(["--health-check", "health"]);
        }
        w.build_package(&src, "app", version, &w.key, &flags)
    };
    w.publish(&url, &build("1.0.0.0", None));
    let _a = w.agent("m1", &url);
    wait_until("v1 installed", T, || recorded(&w, "m1") == "1.0.0.0");
    let app = w.root("m1").join("app");
    let read = |rel: &str| std::fs::read_to_string(app.join(rel)).unwrap_or_else(|e| format!("{rel}: {e}"));
    assert!(!app.join("var/left-on-the-build-host").exists(), "data is never shipped");
    assert_eq!(read("etc/app.conf"), "the package's default", "a kept file's default comes with a first install");
    // The application writes its data and its administrator edits its configuration.
    std::fs::create_dir_all(app.join("var/db")).unwrap();
    std::fs::write(app.join("var/db/rows"), "rows of v1").unwrap();
    std::fs::write(app.join("etc/app.conf"), "edited on the machine").unwrap();

    let mut ids = vec![];
    for (i, v) in ["2.0.0.0", "3.0.0.0", "4.0.0.0"].into_iter().enumerate() {
        ids.push(w.publish(&url, &build(v, None)));
        let out = check(&w, "m1");
        assert!(out.status.success(), "{v}: {}", stderr(&out));
        assert_eq!(read("VERSION"), v);
        assert_eq!(read("var/db/rows"), format!("rows of v{}", i + 1), "{v}: the data written before it");
        assert_eq!(read("etc/app.conf"), "edited on the machine", "{v}: never overwritten");
        std::fs::write(app.join("var/db/rows"), format!("rows of v{}", i + 2)).unwrap();
    }
    // Two earlier versions kept: 3 as P_old, 2 as a backup; version 1 went.
    let st = status(&w, "m1");
    assert_eq!(st["installed"][0]["kept"], serde_json::json!(["3.0.0.0", "2.0.0.0"]), "{st}");
    let backups = w.root("m1").join("app_backups");
    assert!(backups.join("2.0.0.0").is_dir() && !backups.join("1.0.0.0").exists());

    // An update that fails its health check goes back, with the data as it was at the swap.
    let bad = w.publish(&url, &build("5.0.0.0", Some("exit 1")));
    let out = check(&w, "m1");
    assert!(!out.status.success() && stderr(&out).contains("swapped back to 4.0.0.0"), "{}", stderr(&out));
    w.admin_ok(&url, &["update", "state", &bad, "inactive"]); // withdrawn: 4 is the newest again
    assert_eq!((read("VERSION"), read("var/db/rows")), ("4.0.0.0".to_string(), "rows of v4".to_string()));
    assert_eq!(status(&w, "m1")["installed"][0]["kept"], serde_json::json!(["3.0.0.0", "2.0.0.0"]));

    // A version the machine does not keep is refused, and nothing changes.
    let out = w.agent_cmd("m1", &["restore", "app", "--version", "1.0.0.0"]);
    assert!(
        !out.status.success() && stderr(&out).contains("not kept here; kept: 3.0.0.0, 2.0.0.0"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read("VERSION"), "4.0.0.0");
    // Restoring a backup carries the data along; the update left is held back.
    let out = w.agent_cmd("m1", &["restore", "app", "--version", "2.0.0.0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!((read("VERSION"), read("var/db/rows")), ("2.0.0.0".to_string(), "rows of v4".to_string()));
    assert_eq!(read("etc/app.conf"), "edited on the machine");
    let out = check(&w, "m1");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("held back") && said.contains(&ids[2]), "{said}");
    assert_eq!(read("VERSION"), "2.0.0.0", "not reinstalled by itself");
    assert_eq!(recorded(&w, "m1"), "2.0.0.0");
    // Without a version, the one before: the version restored from (4).
    let out = w.agent_cmd("m1", &["restore", "app"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!((read("VERSION"), read("var/db/rows")), ("4.0.0.0".to_string(), "rows of v4".to_string()));
    assert_eq!(recorded(&w, "m1"), "4.0.0.0");
}

/// A removal returns the machine to the newest GA version below the removed one. When the
/// machine does not keep that version (it went from 1 straight to 3), it installs it in place
/// of the removed one, which stays live until its replacement is.
#[test]
fn a_removal_installs_the_version_below_when_the_machine_does_not_keep_it() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    w.publish(&url, &package(&w, "1.0.0.0", &[], &[]));
    let _a = w.agent("m1", &url);
    wait_until("v1 installed", T, || recorded(&w, "m1") == "1.0.0.0");
    // 2 and 3 are approved together: the machine goes straight to 3, keeping 1.
    // Version 2 notes what it was installed over: the removed version, still live then.
    let over = w.path("installed-over");
    let note = format!("echo \"$UPDRAFT_PREVIOUS_VERSION\" > {}", over.display());
    let add = |v: &str| {
        let pkg = match v {
            "2.0.0.0" => package(&w, v, &[("post", &note)], &["--post-install", "hooks/post"]),
            _ => package(&w, v, &[], &[]),
        };
        w.admin_ok(&url, &["update", "add", pkg.to_str().unwrap()]).trim().to_string()
    };
    let (v2, v3) = (add("2.0.0.0"), add("3.0.0.0"));
    w.admin_ok(&url, &["update", "state", &v2, &v3, "ga"]);
    assert!(check(&w, "m1").status.success());
    assert_eq!(recorded(&w, "m1"), "3.0.0.0");
    assert_eq!(status(&w, "m1")["installed"][0]["kept"], serde_json::json!(["1.0.0.0"]));

    w.admin_ok(&url, &["update", "state", &v3, "remove"]);
    let out = check(&w, "m1");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && said.contains("back on 2.0.0.0 (installed"), "{said}{}", stderr(&out));
    assert_eq!(w.installed("m1", "app").as_deref(), Some("2.0.0.0"));
    assert_eq!(recorded(&w, "m1"), "2.0.0.0");
    assert!(!w.root("m1").join("app_old").exists(), "the removed version is not kept to go back to");
    let was = std::fs::read_to_string(&over).unwrap();
    assert_eq!(was.trim(), "3.0.0.0", "installed over the removed version, never after uninstalling it");
    wait_until("the removal reported", T, || {
        w.admin_json(&url, &["activity", "--machine", "m1"]).to_string().contains("did not keep it")
    });
}
