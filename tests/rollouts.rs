//! Rollouts in waves (issue #21): what is built so far — the preview of who would take an
//! update, wave by wave and site by site, computed with the same cohorts every tier uses.
use updraft_core::rollout::Waves;
use updraft_tests::{World, stderr, wait_until};

use super::T;

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
