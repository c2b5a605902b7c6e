//! The crash-point sweep: the agent is killed (SIGKILL from a fail point) at every boundary of
//! an upgrade, including part way through the download and through staging. After each kill
//! `ROOT/P` must be exactly the old or exactly the new tree, and a restarted agent must
//! converge to the new version with the old one kept for rollback and nothing left over.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use updraft_tests::{World, wait_until};

const T: Duration = Duration::from_secs(30);

/// The agent's fail points an upgrade reaches with the atomic exchange: every one it exports
/// but the removal's and the one only the ordered-rename fallback has.
fn install_points() -> Vec<&'static str> {
    updraft_agent::failpoint::POINTS
        .iter()
        .copied()
        .filter(|p| !REMOVAL_POINTS.contains(p) && !FALLBACK_ONLY.contains(p))
        .collect()
}

/// The points of a removal (rolling back to the kept previous version).
const REMOVAL_POINTS: &[&str] = &["remove:before", "remove:done"];

/// Points only the ordered-rename fallback reaches.
const FALLBACK_ONLY: &[&str] = &["swap:moved-out"];

#[test]
fn the_sweeps_cover_every_exported_fail_point() {
    let mut covered: Vec<&str> = install_points();
    covered.extend(FALLBACK_POINTS);
    covered.extend(REMOVAL_POINTS);
    covered.sort();
    covered.dedup();
    let mut all = updraft_agent::failpoint::POINTS.to_vec();
    all.sort();
    assert_eq!(covered, all);
}

/// Writes a product tree for `version`: several files, one large enough for several download
/// chunks, and contents that differ in every file between versions.
fn source(w: &World, version: &str) -> PathBuf {
    let dir = w.path(&format!("src-{version}"));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("VERSION"), version).unwrap();
    std::fs::write(dir.join("bin/run"), format!("#!/bin/sh\necho {version}\n")).unwrap();
    for i in 0..8 {
        std::fs::write(dir.join(format!("data/part{i}")), format!("{version} part {i}\n").repeat(100)).unwrap();
    }
    let big: Vec<u8> = (0..700_000u32).map(|i| (i as u8) ^ version.as_bytes()[0]).collect();
    std::fs::write(dir.join("data/big.bin"), big).unwrap();
    dir
}

fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        // A tree between two ordered renames reads as absent (empty), not as an error.
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                out.insert(format!("{rel}/"), vec![]);
                walk(base, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The boundaries of the ordered-rename fallback (used where the kernel has no exchange),
/// including the moment between its renames.
const FALLBACK_POINTS: &[&str] = &["swap:moved-out", "swap:exchanged", "swap:journaled", "swap:old-kept"];

#[test]
fn a_kill_at_any_step_leaves_a_whole_version_and_the_agent_converges() {
    let points = install_points();
    let broken = sweep(&points, &[]);
    eprintln!("crash-point sweep (atomic exchange): {} points x 1 run, {broken} broken installs", points.len());
    assert_eq!(broken, 0);
}

#[test]
fn the_ordered_rename_fallback_is_always_finished_or_undone() {
    let env = [("UPDRAFT_NO_EXCHANGE".to_string(), "1".to_string())];
    let broken = sweep(FALLBACK_POINTS, &env);
    eprintln!(
        "crash-point sweep (ordered renames): {} points x 1 run, {broken} broken installs",
        FALLBACK_POINTS.len()
    );
    assert_eq!(broken, 0);
}

/// A provider and machine `m` on app v1 (its agent stopped) with data of its own in `var/`, and
/// v2 built but not published.
struct OnV1 {
    w: World,
    _provider: updraft_tests::Proc,
    purl: String,
    pkg2: PathBuf,
    v1_tree: BTreeMap<String, Vec<u8>>,
    v2_tree: BTreeMap<String, Vec<u8>>,
    live: PathBuf,
}

/// [`OnV1`], its agents started with `env`.
fn on_v1(env: &[(String, String)]) -> OnV1 {
    let mut w = World::new();
    let (provider, purl) = w.provider("centre", true);
    let (s1, s2) = (source(&w, "1.0.0.0"), source(&w, "2.0.0.0"));
    // The application keeps data in its directory: every point must carry it or leave it.
    let build = |src: &Path, v: &str| w.build_package(src, "app", v, &w.key, &["--data-dir", "var", "--backup", "2"]);
    let (mut v1_tree, mut v2_tree) = (tree(&s1), tree(&s2));
    w.publish(&purl, &build(&s1, "1.0.0.0"));
    let pkg2 = build(&s2, "2.0.0.0");
    let live = w.root("m").join("app");
    w.env = env.to_vec();
    {
        let _a = w.agent("m", &purl);
        wait_until("v1 installed", T, || {
            w.installed("m", "app").as_deref() == Some("1.0.0.0")
                && w.state("m").join("state.json").exists()
                && !w.state("m").join("journal.json").exists()
        });
    }
    std::fs::create_dir(live.join("var")).unwrap();
    std::fs::write(live.join("var/rows"), "the machine's data").unwrap();
    for t in [&mut v1_tree, &mut v2_tree] {
        t.insert("var/".into(), vec![]);
        t.insert("var/rows".into(), b"the machine's data".to_vec());
    }
    OnV1 { w, _provider: provider, purl, pkg2, v1_tree, v2_tree, live }
}

/// Kills the agent at each point of an upgrade, restarts it, and returns how many times the
/// installed tree was broken (a mix of versions, or missing after the restart).
fn sweep(points: &[&str], env: &[(String, String)]) -> usize {
    let mut broken = 0;
    for point in points {
        let OnV1 { mut w, _provider, purl, pkg2, v1_tree, v2_tree, live } = on_v1(env);
        w.publish(&purl, &pkg2);

        // Upgrade with the fail point armed: the agent must die at that point.
        w.env.push(("UPDRAFT_FAILPOINT".into(), point.to_string()));
        let mut crashing = w.agent("m", &purl);
        w.env.pop();
        assert!(crashing.wait_exit(T), "{point}: the agent did not reach its fail point\n{}", crashing.log_text());
        // With ordered renames, ROOT/app is briefly absent between two renames; the restart
        // must put it back. With the exchange it is never absent.
        let missing = !live.exists();
        let after_kill = if missing { BTreeMap::new() } else { tree(&live) };
        let whole = after_kill == v1_tree || after_kill == v2_tree || (missing && !env.is_empty());
        if !whole {
            broken += 1;
            eprintln!("{point}: ROOT/app is neither v1 nor v2 after the kill");
        }

        // Restart: it must finish or undo, then converge to v2.
        let a = w.agent("m", &purl);
        wait_until(&format!("{point}: converged to v2"), T, || {
            tree(&live) == v2_tree && w.installed("m", "app").as_deref() == Some("2.0.0.0")
        });
        wait_until(&format!("{point}: records say v2"), T, || {
            let st: serde_json::Value =
                serde_json::from_slice(&w.agent_cmd("m", &["status", "--json"]).stdout).unwrap_or_default();
            // The receipt is saved a moment before the journal is cleared: wait for both.
            st["daemon_running"] == true
                && st["installed"][0]["version"] == "2.0.0.0"
                && st["installed"][0]["previous_version"] == "1.0.0.0"
                && !w.state("m").join("journal.json").exists()
        });
        assert_eq!(tree(&w.root("m").join("app_old")), v1_tree, "{point}: the old version is kept for rollback");
        assert!(!w.root("m").join("app_update_pending").exists(), "{point}: staging left behind");
        assert!(!w.state("m").join("journal.json").exists(), "{point}: journal left open");
        if *point == "download:mid" {
            let log = a.log_text();
            assert!(
                log.contains("offset=262144") || log.contains("offset=524288"),
                "{point}: the download did not resume\n{log}"
            );
        }
        let how = if missing {
            "absent between renames"
        } else if after_kill == v1_tree {
            "whole (old)"
        } else {
            "whole (new)"
        };
        eprintln!("{point}: {how} after the kill, converged after restart");
        w.env.clear();
    }
    broken
}

/// A removal killed at each of its points: after the restart the machine is back on the
/// previous version (from `P_old`), whole, with records that say so and nothing left over.
#[test]
fn a_kill_during_a_removal_leaves_a_whole_version_and_the_agent_converges() {
    for point in REMOVAL_POINTS {
        let OnV1 { mut w, _provider, purl, pkg2, v1_tree, v2_tree, live } = on_v1(&[]);
        let settled = |w: &World, v: &str| {
            w.installed("m", "app").as_deref() == Some(v) && !w.state("m").join("journal.json").exists()
        };
        let v2 = w.publish(&purl, &pkg2);
        {
            let _a = w.agent("m", &purl);
            wait_until("v2 installed", T, || settled(&w, "2.0.0.0") && tree(&live) == v2_tree);
        }
        w.admin_ok(&purl, &["update", "state", &v2, "remove"]);

        w.env.push(("UPDRAFT_FAILPOINT".into(), point.to_string()));
        let mut crashing = w.agent("m", &purl);
        w.env.pop();
        assert!(crashing.wait_exit(T), "{point}: the agent did not reach its fail point\n{}", crashing.log_text());
        let after_kill = tree(&live);
        assert!(
            after_kill == v1_tree || after_kill == v2_tree,
            "{point}: ROOT/app is neither v1 nor v2 after the kill"
        );

        let _a = w.agent("m", &purl);
        wait_until(&format!("{point}: back on v1"), T, || {
            let st: serde_json::Value =
                serde_json::from_slice(&w.agent_cmd("m", &["status", "--json"]).stdout).unwrap_or_default();
            tree(&live) == v1_tree
                && st["daemon_running"] == true
                && st["installed"][0]["version"] == "1.0.0.0"
                && !w.state("m").join("removal.json").exists()
        });
        assert!(!w.root("m").join("app_update_pending").exists(), "{point}: staging left behind");
        eprintln!("{point}: whole after the kill, back on v1 after the restart");
    }
}

/// An error (not a crash) at each step of an upgrade: the failed check settles what is on disk
/// as start-up would after a crash there, so `ROOT/app` and the receipts agree — the old version
/// untouched before the swap, the new one recorded once it is live.
#[test]
fn an_error_at_any_step_leaves_the_tree_and_the_records_in_agreement() {
    let steps = [
        "verified",
        "staged",
        "carried",
        "swap:exchanged",
        "swap:journaled",
        "swap:old-kept",
        "healthy",
        "state:saved",
    ];
    for point in steps {
        let OnV1 { mut w, _provider, purl, pkg2, v1_tree, v2_tree, live } = on_v1(&[]);
        w.publish(&purl, &pkg2);
        w.env.push(("UPDRAFT_FAILPOINT".into(), format!("{point}=error")));
        let a = w.agent("m", &purl);
        w.env.pop();
        let status = |w: &World| -> serde_json::Value {
            serde_json::from_slice(&w.agent_cmd("m", &["status", "--json"]).stdout).unwrap_or_default()
        };
        wait_until(&format!("{point}: the error reported"), T, || {
            a.log_text().contains(&format!("fail point {point}"))
        });
        wait_until(&format!("{point}: tree and records agree, nothing open"), T, || {
            let recorded = status(&w)["installed"][0]["version"].as_str().unwrap_or_default().to_string();
            let t = tree(&live);
            let on_disk = if t == v1_tree {
                "1.0.0.0"
            } else if t == v2_tree {
                "2.0.0.0"
            } else {
                "neither"
            };
            on_disk == recorded
                && !w.state("m").join("journal.json").exists()
                && !w.root("m").join("app_update_pending").exists()
        });
        let st = status(&w);
        eprintln!("{point}: after the error, tree and records agree on {}", st["installed"][0]["version"]);
    }
}
