//! Rollouts in waves (issue #21), end to end with real agents at the centre and behind a site:
//! the preview; a healthy update walking its waves to 100 % (each machine installing only once
//! its wave opened, on whichever tier it checks); a wave that fails halting the rollout by
//! itself with the rest untouched; resume with accepted failures; revert through the removal
//! path; an install that fails inside its verification window swapped back.
use std::path::PathBuf;

use updraft_core::rollout::{Waves, pct, position};
use updraft_tests::{World, stderr, wait_until};

use super::T;

/// A package of `editor` `version` whose health check fails on a machine whose install root
/// has a `.fail` sibling (`ROOT.fail`) naming that version, verified over `window`.
fn editor(w: &World, version: &str, window: &str) -> PathBuf {
    let src = w.path(&format!("src-editor-{version}"));
    std::fs::create_dir_all(src.join("hooks")).unwrap();
    std::fs::write(src.join("VERSION"), version).unwrap();
    let health = src.join("hooks/health");
    std::fs::write(&health, "#!/bin/sh\n! grep -qx \"$UPDRAFT_VERSION\" \"$UPDRAFT_ROOT.fail\" 2>/dev/null\n").unwrap();
    let mut perm = std::fs::metadata(&health).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&health, perm).unwrap();
    w.build_package(&src, "editor", version, &w.key, &["--health-check", "hooks/health", "--verify-window", window])
}

/// Makes `machine`'s health check of `version` fail (or, with `None`, every version pass).
fn fail_health(w: &World, machine: &str, version: Option<&str>) {
    let marker = PathBuf::from(format!("{}.fail", w.root(machine).display()));
    match version {
        Some(v) => std::fs::write(marker, format!("{v}\n")).unwrap(),
        None => {
            let _ = std::fs::remove_file(marker);
        }
    }
}

/// The activity entries of `kind` about `update`, as (machine, time, detail).
fn entries(w: &World, url: &str, update: &str, kind: &str) -> Vec<(String, i64, String)> {
    let acts = w.admin_json(url, &["activity", "--update", update, "--limit", "1000"]);
    acts.as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind)
        .map(|a| {
            (
                a["machine"].as_str().unwrap_or_default().to_string(),
                a["at_unix_ms"].as_i64().unwrap(),
                a["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_rollout_preview_counts_machines_per_wave_and_site_and_the_wan_bytes() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let (_s, surl) = w.remote("site-r", &url);
    let v1 = w.publish(&url, &w.package("editor", "1.0.0.0", &w.key));
    w.wait_site_has(&surl, &v1);
    let direct = ["a-1", "a-2", "a-3"];
    let behind = ["b-1", "b-2", "b-3"];
    let mut agents = Vec::new();
    for n in direct {
        agents.push(w.agent(n, &url));
    }
    for n in behind {
        agents.push(w.agent(n, &surl));
    }
    wait_until("every machine on v1, known at the centre", T, || {
        let ms = w.admin_json(&url, &["machine", "list"]);
        direct.iter().chain(behind.iter()).all(|n| {
            w.installed(n, "editor").as_deref() == Some("1.0.0.0")
                && ms
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["name"] == *n && m["installed"].to_string().contains("1.0.0.0"))
        })
    });
    w.admin_ok(&url, &["group", "create", "lab"]);
    w.admin_ok(&url, &["deploy", "editor", "--group", "lab"]);
    w.admin_ok(&url, &["group", "assign", "lab", "a-1"]);
    w.admin_ok(&url, &["group", "assign", "lab", "b-1"]);
    // v2 imported, not approved: nothing happens, but the preview tells who would take it.
    let v2 = w.admin_ok(&url, &["update", "add", w.package("editor", "2.0.0.0", &w.key).to_str().unwrap()]);
    let v2 = v2.trim();
    let waves = "20%,50%,100%";
    let p = w.admin_json(&url, &["rollout", "preview", v2, "--waves", waves]);
    assert_eq!(p["machines"], 6, "{p}");
    // The waves are the cohorts every tier computes for itself.
    let ws: Waves = waves.parse().unwrap();
    let mut expected = [0u64; 3];
    for n in direct.iter().chain(behind.iter()) {
        expected[ws.wave_of(v2, n)] += 1;
    }
    let got: Vec<u64> = p["per_wave"].as_array().unwrap().iter().map(|w| w["machines"].as_u64().unwrap()).collect();
    assert_eq!(got, expected.to_vec(), "{p}");
    assert_eq!(p["per_wave"][2]["cumulative"], 6);
    // Per site: the centre's own machines fetch nothing across the WAN; the site fetches the
    // package once, in the first wave one of its machines is in.
    let site = |name: &str| p["sites"].as_array().unwrap().iter().find(|s| s["site"] == name).cloned().unwrap();
    let (d, r) = (site("direct"), site("site-r"));
    assert_eq!(d["wan_bytes"], 0);
    let counts = |s: &serde_json::Value| {
        s["machines_per_wave"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum::<u64>()
    };
    assert_eq!((counts(&d), counts(&r)), (3, 3), "{p}");
    assert_eq!(r["wan_bytes"], p["size"], "{p}");
    let first = behind.iter().map(|n| ws.wave_of(v2, n)).min().unwrap() as u64 + 1;
    assert_eq!(r["first_wave"].as_u64().unwrap(), first);
    // One group only.
    let lab = w.admin_json(&url, &["rollout", "preview", v2, "--group", "lab"]);
    assert_eq!(lab["machines"], 2, "{lab}");
    // Bad input says what is wrong and where.
    let out = w.admin(&url, &["rollout", "preview", v2, "--waves", "50%,10%,100%"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("larger than the one before"), "{}", stderr(&out));
    let out = w.admin(&url, &["rollout", "preview", v2, "--group", "nosuch"]);
    assert!(stderr(&out).contains("no group \"nosuch\""), "{}", stderr(&out));
    let out = w.admin(&url, &["rollout", "preview", "nosuch-1.0.0.0-000000000000"]);
    assert_eq!(out.status.code(), Some(4), "not found: {}", stderr(&out));
    // And nothing happened: v2 is still not approved and no machine took it.
    assert!(direct.iter().chain(behind.iter()).all(|n| w.installed(n, "editor").as_deref() == Some("1.0.0.0")));
}

#[test]
fn a_healthy_update_walks_its_waves_and_each_machine_takes_it_only_once_its_wave_is_open() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let (_s, surl) = w.remote("site-r", &url);
    let v1 = w.publish(&url, &editor(&w, "1.0.0.0", "0s"));
    w.wait_site_has(&surl, &v1);
    let direct = ["a-1", "a-2", "a-3"];
    let behind = ["b-1", "b-2", "b-3"];
    let all: Vec<&str> = direct.iter().chain(behind.iter()).copied().collect();
    let mut agents = Vec::new();
    for n in direct {
        agents.push(w.agent(n, &url));
    }
    for n in behind {
        agents.push(w.agent(n, &surl));
    }
    wait_until("every machine on v1", T, || all.iter().all(|n| w.installed(n, "editor").as_deref() == Some("1.0.0.0")));
    // Every machine verified v1 (a window of 0 s) and said so.
    wait_until("v1 verified everywhere", T, || entries(&w, &url, &v1, "verified").len() == all.len());

    let v2 = w.admin_ok(&url, &["update", "add", editor(&w, "2.0.0.0", "2s").to_str().unwrap()]);
    let v2 = v2.trim().to_string();
    let waves = "20%,50%,80%,100%";
    let out = w.admin_ok(
        &url,
        &[
            "rollout",
            "start",
            &v2,
            "--waves",
            waves,
            "--wave-wait",
            "0s",
            "--min-verified",
            "100%",
            "--max-failed",
            "0%",
        ],
    );
    assert!(out.contains("running in waves 20%,50%,80%,100%"), "{out}");
    wait_until("every wave open and every machine verified on v2", T * 3, || {
        let s = w.admin_json(&url, &["rollout", "status", &v2]);
        s["open"] == 4
            && s["per_wave"].as_array().unwrap().iter().map(|x| x["verified"].as_u64().unwrap()).sum::<u64>() == 6
    });
    assert!(all.iter().all(|n| w.installed(n, "editor").as_deref() == Some("2.0.0.0")));
    // Each machine installed only after its wave opened — at the centre and behind the site,
    // each tier admitting from its own copy of the rollout — and the waves opened in order.
    let ws: Waves = waves.parse().unwrap();
    let rollout = entries(&w, &url, &v2, "rollout");
    let opened = |wave: usize| -> i64 {
        if wave == 0 {
            return rollout.iter().find(|e| e.2.contains("rollout started")).map(|e| e.1).unwrap();
        }
        let text = format!("wave {} of 4 opened", wave + 1);
        rollout.iter().find(|e| e.2.contains(&text)).unwrap_or_else(|| panic!("{text}: {rollout:?}")).1
    };
    for wave in 1..4 {
        assert!(opened(wave) >= opened(wave - 1), "waves open in order: {rollout:?}");
    }
    let installed = entries(&w, &url, &v2, "installed");
    for n in &all {
        let wave = ws.wave_of(&v2, n);
        let at = installed.iter().find(|e| e.0 == *n).unwrap_or_else(|| panic!("{n} installed v2: {installed:?}")).1;
        assert!(
            at >= opened(wave),
            "{n} (wave {}) installed at {at}, before its wave opened at {}",
            wave + 1,
            opened(wave)
        );
        // And a wave opened only once every machine of the waves before it had verified.
        if wave > 0 {
            let verified = entries(&w, &url, &v2, "verified");
            for m in all.iter().filter(|m| ws.wave_of(&v2, m) < wave) {
                let v = verified.iter().find(|e| e.0 == *m).unwrap().1;
                assert!(v <= opened(wave), "{m} verified at {v}, after wave {} opened", wave + 1);
            }
        }
    }
    // `update show` counts what the machines did.
    let shown = w.admin_json(&url, &["update", "show", &v2]);
    assert_eq!(shown["status"]["verified_count"], 6, "{shown}");
    assert_eq!(shown["status"]["failed_count"], 0, "{shown}");
    // And so does the fleet report, per update.
    let report = w.admin_ok(&url, &["report"]);
    let row: Vec<&str> =
        report.lines().find(|l| l.starts_with(v2.as_str())).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row, [v2.as_str(), "0", "6", "0", "0"], "{report}");

    // An install that fails inside its verification window goes back, and says so.
    let v3 = w.admin_ok(&url, &["update", "add", editor(&w, "3.0.0.0", "60s").to_str().unwrap()]);
    let v3 = v3.trim().to_string();
    w.admin_ok(&url, &["rollout", "start", &v3, "--waves", "100%", "--wave-wait", "0s"]);
    // Installed means its health check passed and its verification window began (the VERSION
    // file changes at the swap, before that check).
    wait_until("a-1 installed v3, its health check passed", T, || {
        entries(&w, &url, &v3, "installed").iter().any(|e| e.0 == "a-1")
    });
    fail_health(&w, "a-1", Some("3.0.0.0"));
    wait_until("a-1 failed verification and is back on v2", T * 2, || {
        w.installed("a-1", "editor").as_deref() == Some("2.0.0.0")
            && entries(&w, &url, &v3, "failed-verification").iter().any(|e| e.0 == "a-1")
    });
    let failed = entries(&w, &url, &v3, "failed-verification");
    assert!(failed[0].2.contains("health") && failed[0].2.contains("restored editor 2.0.0.0"), "{failed:?}");
    let shown = w.admin_json(&url, &["update", "show", &v3]);
    assert!(shown["status"]["failed_count"].as_u64().unwrap() >= 1, "{shown}");
    // It is held: another check does not install it again.
    fail_health(&w, "a-1", None);
    w.agent_cmd("a-1", &["check"]);
    assert_eq!(w.installed("a-1", "editor").as_deref(), Some("2.0.0.0"));
    drop(agents);
}

#[test]
fn a_failing_wave_halts_the_rollout_and_resume_and_revert_follow_a_human_decision() {
    let w = World::new();
    let (mut _p, url) = w.provider("centre", true);
    let (_s, surl) = w.remote("site-r", &url);
    let v1 = w.publish(&url, &editor(&w, "1.0.0.0", "0s"));
    w.wait_site_has(&surl, &v1);
    let names = ["m-1", "m-2", "m-3", "m-4", "m-5", "m-6"];
    let mut agents = Vec::new();
    for (i, n) in names.iter().enumerate() {
        agents.push(w.agent(n, if i % 2 == 0 { &url } else { &surl }));
    }
    wait_until("every machine on v1", T, || {
        names.iter().all(|n| w.installed(n, "editor").as_deref() == Some("1.0.0.0"))
    });
    let v2 = w.admin_ok(&url, &["update", "add", editor(&w, "2.0.0.0", "1s").to_str().unwrap()]);
    let v2 = v2.trim().to_string();
    // The first wave: exactly the two machines placed first for this update; one of them fails.
    let mut by_place: Vec<(u32, &str)> = names.iter().map(|n| (position(&v2, n), *n)).collect();
    by_place.sort();
    let (bad, good) = (by_place[0].1, by_place[1].1);
    let first = (by_place[1].0 + 1).max(1);
    assert!(first < by_place[2].0 + 1, "two machines cannot share a place");
    let waves = format!("{},100%", pct(first));
    let rest: Vec<&str> = by_place[2..].iter().map(|p| p.1).collect();
    fail_health(&w, bad, Some("2.0.0.0"));
    w.admin_ok(
        &url,
        &[
            "rollout",
            "start",
            &v2,
            "--waves",
            &waves,
            "--wave-wait",
            "0s",
            "--min-verified",
            "50%",
            "--max-failed",
            "10%",
        ],
    );
    wait_until("the rollout halted by itself", T * 2, || {
        w.admin_json(&url, &["rollout", "status", &v2])["state"] == "halted"
    });
    let s = w.admin_json(&url, &["rollout", "status", &v2]);
    assert_eq!(s["open"], 1, "halted in wave 1: {s}");
    assert!(s["reason"].as_str().unwrap().contains("failed"), "{s}");
    assert!(s["failed_machines"][0].as_str().unwrap().starts_with(bad), "{s}");
    // The bad machine is back on v1 (its health check failed); the rest never got v2, even
    // when they check — at the centre or through the site.
    assert_eq!(w.installed(bad, "editor").as_deref(), Some("1.0.0.0"));
    for n in &rest {
        w.agent_cmd(n, &["check"]);
        assert_eq!(w.installed(n, "editor").as_deref(), Some("1.0.0.0"), "{n} untouched");
    }
    let shown = w.admin_json(&url, &["machine", "show", rest[0]]).to_string();
    assert!(shown.contains("rollout halted"), "{shown}");
    // Audited, and in the activity log, by the provider itself.
    let audit = w.admin_ok(&url, &["audit", "list"]);
    assert!(audit.contains("rollout halted"), "{audit}");
    assert!(entries(&w, &url, &v2, "rollout").iter().any(|e| e.2.contains("halted in wave 1")));
    // Resuming as it stands would halt again at once: it says how to go on.
    let out = w.admin(&url, &["rollout", "resume", &v2]);
    assert!(!out.status.success() && stderr(&out).contains("--ack-failures"), "{}", stderr(&out));
    // The console shows the same, and refuses the same resume with the same reason.
    super::console::passwd(&w, &url, updraft_tests::ADMIN, "admin password 1");
    let base = format!("https://{}", _p.web_addr());
    let jar = w.path("cookies");
    let login = super::console::curl(
        &jar,
        &["-d", &format!("user={}", updraft_tests::ADMIN), "-d", "password=admin password 1", &format!("{base}/login")],
    );
    assert_eq!(login.0, "303");
    let (code, page) = super::console::curl(&jar, &[&format!("{base}/rollouts")]);
    assert_eq!(code, "200");
    assert!(page.contains(&v2) && page.contains("halted") && page.contains("Resume, accepting the failures"), "{page}");
    assert!(page.contains(&format!("failed: {bad}")), "{page}");
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
    let resume = super::console::curl(
        &jar,
        &["-d", &format!("csrf={csrf}"), "-d", &format!("id={v2}"), "-L", &format!("{base}/rollouts/resume")],
    );
    assert!(resume.1.contains("--ack-failures"), "{}", resume.1);
    assert_eq!(w.admin_json(&url, &["rollout", "status", &v2])["state"], "halted");
    // A human accepts the failure: the next wave opens and the rest take v2.
    let out = w.admin_ok(&url, &["rollout", "resume", &v2, "--ack-failures"]);
    assert!(out.contains(&format!("failures accepted: {bad}")), "{out}");
    wait_until("the rest on v2", T * 2, || rest.iter().all(|n| w.installed(n, "editor").as_deref() == Some("2.0.0.0")));
    wait_until("every wave open", T, || w.admin_json(&url, &["rollout", "status", &v2])["open"] == 2);
    assert_eq!(w.installed(good, "editor").as_deref(), Some("2.0.0.0"));
    // Revert: every machine that took v2 goes back to v1 through the removal path.
    w.admin_ok(&url, &["rollout", "revert", &v2]);
    wait_until("every machine back on v1", T * 2, || {
        names.iter().all(|n| w.installed(n, "editor").as_deref() == Some("1.0.0.0"))
    });
    let s = w.admin_json(&url, &["rollout", "status", &v2]);
    assert_eq!(s["state"], "reverted", "{s}");
    wait_until("the removals reported", T, || {
        let s = w.admin_json(&url, &["rollout", "status", &v2]);
        s["per_wave"].as_array().unwrap().iter().map(|x| x["rolled_back"].as_u64().unwrap()).sum::<u64>() == 5
    });
    // Bad input changes nothing and says what is wrong.
    let out = w.admin(&url, &["rollout", "start", &v1, "--waves", "10%,5%,100%"]);
    assert!(stderr(&out).contains("larger than the one before"), "{}", stderr(&out));
    let out = w.admin(&url, &["rollout", "start", &v1, "--max-failed", "two"]);
    assert!(stderr(&out).contains("--max-failed"), "{}", stderr(&out));
    let out = w.admin(&url, &["rollout", "status", &v1]);
    assert_eq!(out.status.code(), Some(4), "no rollout of v1: {}", stderr(&out));
    drop(agents);
}
