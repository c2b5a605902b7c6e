//! End-to-end tests of sites: two sites with agents at each, WAN bytes counted once per site,
//! an upstream cut in the middle of a transfer (the transfer resumes), a killed site (its agents
//! fall back, then return), the upstream down (the site still installs from cache and says it is
//! working alone), and a restarted site resuming its catalog where it stopped.
use std::time::Duration;

use serde_json::Value;
use updraft_tests::{Proc, World, wait_until};

const T: Duration = Duration::from_secs(60);

fn site_status(w: &World, url: &str) -> Value {
    w.admin_json(url, &["site", "status"])
}

/// A package with a large random payload, so a transfer takes a while and is easy to cut.
fn big_package(w: &World, product: &str, version: &str, mib: usize) -> std::path::PathBuf {
    let src = w.path(&format!("big-{product}-{version}"));
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ version.len() as u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(src.join("payload.bin"), data).unwrap();
    std::fs::write(src.join("VERSION"), version).unwrap();
    w.build_package(&src, product, version, &w.key, &[])
}

#[test]
fn two_sites_fetch_each_byte_once_and_account_for_it() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (_a, aurl) = w.remote("site-a", &purl);
    let (_b, burl) = w.remote("site-b", &purl);
    let id = w.publish(&purl, &w.package("app", "1.0.0.0", &w.key));
    w.wait_site_has(&aurl, &id);
    w.wait_site_has(&burl, &id);
    let size = w.admin_json(&purl, &["update", "show", &id])["size"].as_u64().unwrap();
    let agents: Vec<Proc> =
        (0..3).flat_map(|i| [w.agent(&format!("a{i}"), &aurl), w.agent(&format!("b{i}"), &burl)]).collect();
    wait_until("six agents installed", T, || {
        (0..3).all(|i| w.installed(&format!("a{i}"), "app").is_some() && w.installed(&format!("b{i}"), "app").is_some())
    });
    for url in [&aurl, &burl] {
        let s = site_status(&w, url);
        assert_eq!(s["wan_bytes"].as_u64().unwrap(), size, "each site fetched the package exactly once: {s}");
        assert_eq!(s["served_bytes"].as_u64().unwrap(), 3 * size, "{s}");
        assert_eq!(s["upstream_connected"], true);
    }
    // The centre's site list carries the same counters.
    wait_until("site counters reach the centre", T, || {
        let sites = w.admin_json(&purl, &["site", "list"]);
        sites.as_array().unwrap().len() == 2
            && sites
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["wan_bytes"].as_u64() == Some(size) && s["served_bytes"].as_u64() == Some(3 * size))
    });
    drop(agents);
}

#[test]
fn a_cut_upstream_resumes_the_transfer_and_a_down_upstream_leaves_the_site_working() {
    let w = World::new();
    let (mut p, purl) = w.provider("centre", true);
    let (_s, surl) = w.remote("site", &purl);
    let pkg = big_package(&w, "big", "1.0.0.0", 64);
    let id = w.admin_ok(&purl, &["update", "add", pkg.to_str().unwrap()]).trim().to_string();
    let size = std::fs::metadata(&pkg).unwrap().len();
    let hex = w.admin_json(&purl, &["update", "show", &id])["content_hash"].as_str().unwrap()[7..].to_string();
    let partial = w.path("site").join("blobs/incoming").join(format!("{hex}.part"));
    // Prestage: the site starts fetching before GA; cut the upstream in the middle.
    w.admin_ok(&purl, &["update", "prestage", &id]);
    wait_until("transfer under way", T, || std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0 && m.len() < size));
    p.kill9();
    let cut_at = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let _p2 = p.again();
    wait_until("the site finished the transfer", T, || w.path("site").join("blobs/sha256").join(&hex).is_file());
    let wan = site_status(&w, &surl)["wan_bytes"].as_u64().unwrap();
    assert!(wan < size + (1 << 20), "resumed, not restarted: {wan} WAN bytes for {size} (cut at {cut_at})");
    assert!(cut_at > 0, "the cut happened mid-transfer");

    // GA day moves no WAN bytes: the content is already there.
    w.admin_ok(&purl, &["deploy", "big", "--group", "default"]);
    w.admin_ok(&purl, &["update", "state", &id, "ga"]);
    w.wait_site_caught_up(&surl, &purl);
    let _a = w.agent("m1", &surl);
    wait_until("installed from the prestaged cache", T, || w.installed("m1", "big").as_deref() == Some("1.0.0.0"));
    assert_eq!(site_status(&w, &surl)["wan_bytes"].as_u64().unwrap(), wan);

    // Upstream down: the site says so, and still installs from cache for a new machine.
    drop(_p2);
    wait_until("site notices it is alone", T, || site_status(&w, &surl)["upstream_connected"] == false);
    let _b = w.agent("m2", &surl);
    wait_until("installed while the upstream is down", T, || w.installed("m2", "big").as_deref() == Some("1.0.0.0"));
    let text = w.admin_ok(&surl, &["site", "status"]);
    assert!(text.contains("working alone"), "{text}");
}

#[test]
fn agents_fall_back_when_their_site_dies_and_return_when_it_is_back() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (mut s, surl) = w.remote("site", &purl);
    let v1 = w.publish(&purl, &w.package("tool", "1.0.0.0", &w.key));
    w.wait_site_has(&surl, &v1);
    let _a = w.agent_with("m", &format!("{surl},{purl}"), &["--min-interval", "1", "--max-interval", "1"]);
    let last_provider = |w: &World| -> String {
        let st: Value = serde_json::from_slice(&w.agent_cmd("m", &["status", "--json"]).stdout).unwrap_or_default();
        st["last_provider"].as_str().unwrap_or_default().to_string()
    };
    wait_until("installed via the site", T, || w.installed("m", "tool").is_some() && last_provider(&w) == surl);

    // A planned stop (SIGTERM): the site ends its push streams, lets go of its store and exits
    // within its grace (a kill -9 leaves agents in the same place, sooner).
    s.term();
    assert!(s.wait_exit(Duration::from_secs(2)), "the site did not exit within 2 s of SIGTERM\n{}", s.log_text());
    w.publish(&purl, &w.package("tool", "2.0.0.0", &w.key));
    // The new version is live on disk a moment before the check that installed it records its
    // provider: wait for both.
    wait_until("v2 through the fallback", T, || {
        w.installed("m", "tool").as_deref() == Some("2.0.0.0") && last_provider(&w) == purl
    });

    // The site comes back (same store, same port): the agent returns to it.
    let _s2 = s.again();
    wait_until("back on the preferred site", T, || last_provider(&w) == surl);
    // It resumed its catalog where it stopped instead of reloading it.
    let log = std::fs::read_to_string(w.dir.path().join("site-again.log")).unwrap();
    assert!(!log.contains(" seq=0\n") && log.contains("remote provider listening"), "{log}");
}

#[test]
fn a_site_can_follow_another_site() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (_r1, r1) = w.remote("region", &purl);
    let (_r2, r2) = w.remote("branch", &r1);
    let id = w.publish(&purl, &w.package("chain", "1.0.0.0", &w.key));
    w.wait_site_has(&r2, &id);
    let _a = w.agent("leaf", &r2);
    wait_until("installed two tiers down", T, || w.installed("leaf", "chain").as_deref() == Some("1.0.0.0"));
    // The leaf's inventory climbs both tiers to the centre.
    wait_until("the centre sees the leaf", T, || {
        w.admin_json(&purl, &["machine", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "leaf" && m["installed"][0]["version"] == "1.0.0.0")
    });
    let size = w.admin_json(&purl, &["update", "show", &id])["size"].as_u64().unwrap();
    assert_eq!(site_status(&w, &r2)["wan_bytes"].as_u64().unwrap(), size);
    assert_eq!(site_status(&w, &r1)["wan_bytes"].as_u64().unwrap(), size);
}

#[test]
fn the_download_cache_has_a_limit() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let id = w.publish(&purl, &big_package(&w, "large", "1.0.0.0", 2));
    let _a = w.agent_with("small-disk", &purl, &["--min-interval", "3600", "--download-cache-bytes", "1048576"]);
    wait_until("refusal reported", T, || {
        w.admin_json(&purl, &["activity", "--machine", "small-disk"]).as_array().unwrap().iter().any(|a| {
            a["kind"] == "download-failed"
                && a["update_id"] == id.as_str()
                && a["detail"].as_str().unwrap().contains("download cache limit of 1048576 bytes")
        })
    });
    assert!(w.installed("small-disk", "large").is_none());
}

/// A branch agent configured with only the centre learns its site from its group. Restarted
/// while the centre is down, it goes to the site it remembered and keeps working from it.
#[test]
fn a_restarted_branch_agent_uses_its_remembered_site_while_the_centre_is_down() {
    let w = World::new();
    let (mut centre, purl) = w.provider("centre", true);
    let (_s, surl) = w.remote("site", &purl);
    w.admin_ok(&purl, &["group", "create", "branch", "--providers", &surl]);
    let v1 = w.approve(&purl, &w.package("tool", "1.0.0.0", &w.key));
    w.admin_ok(&purl, &["deploy", "tool", "--group", "branch"]);
    w.wait_site_caught_up(&surl, &purl);
    let fast = ["--min-interval", "1", "--max-interval", "1"];
    let mut a = w.agent_with("m", &purl, &fast);
    wait_until("m known to the centre", T, || w.admin(&purl, &["machine", "show", "m"]).status.success());
    w.admin_ok(&purl, &["group", "assign", "branch", "m"]);
    let last_provider = |w: &World| -> String {
        let st: Value = serde_json::from_slice(&w.agent_cmd("m", &["status", "--json"]).stdout).unwrap_or_default();
        st["last_provider"].as_str().unwrap_or_default().to_string()
    };
    wait_until("m installs from its assigned site", T, || {
        w.installed("m", "tool").as_deref() == Some("1.0.0.0") && last_provider(&w) == surl
    });
    let _ = v1;

    a.kill9();
    centre.kill9();
    let _a = w.agent_with("m", &purl, &fast);
    let out = w.agent_cmd("m", &["check"]);
    assert!(out.status.success(), "{}", updraft_tests::stderr(&out));
    assert_eq!(last_provider(&w), surl, "the restarted agent went to its site, not the dead centre");
}
