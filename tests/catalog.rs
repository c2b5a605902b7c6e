//! End-to-end tests of the catalog: the full record, states and their rules, priority and
//! related installs, caps, deletion, removal with rollback, the content scanner, and the
//! catalog's activity log.
use std::time::Duration;

use updraft_core::keys::ReleaseKey;
use updraft_tests::{World, stderr, wait_until};

const T: Duration = Duration::from_secs(30);

fn ids_in_activity(w: &World, provider: &str, machine: &str, kind: &str) -> Vec<String> {
    let acts = w.admin_json(provider, &["activity", "--machine", machine, "--limit", "200"]);
    let mut ids: Vec<String> = acts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind)
        .map(|a| a["update_id"].as_str().unwrap().to_string())
        .collect();
    ids.reverse(); // oldest first
    ids
}

#[test]
fn release_and_patches_with_full_records_retire_older_and_install_order() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let common = ["--product-line", "Suite", "--upgrade-code", "UC-1", "--product-code", "PC-15.1"];
    let rel = w.package_with(
        "client",
        "15.1.0.0",
        &w.key,
        &[
            &common[..],
            &["--release-label", "2015 R1", "--property", "MODE=quiet", "--doc-url", "https://docs.example/15.1"],
        ]
        .concat(),
    );
    let p1 = w.package_with(
        "client",
        "15.1.1.0",
        &w.key,
        &[&common[..], &["--install-type", "patch", "--patch-label", "Patch1", "--release-label", "2015 R1"]].concat(),
    );
    let p2 = w.package_with(
        "client",
        "15.1.2.0",
        &w.key,
        &[&common[..], &["--install-type", "patch", "--patch-label", "Patch2", "--release-label", "2015 R1"]].concat(),
    );
    let rel_id = w.publish(&purl, &rel);
    let p1_id = w.publish(&purl, &p1);
    let p2_id = w.admin_ok(&purl, &["update", "add", p2.to_str().unwrap()]).trim().to_string();

    // The whole record, as built.
    let show = w.admin_json(&purl, &["update", "show", &rel_id]);
    for (k, v) in [
        ("product_line", "Suite"),
        ("upgrade_code", "UC-1"),
        ("product_code", "PC-15.1"),
        ("install_type", "install"),
        ("release_label", "2015 R1"),
        ("doc_url", "https://docs.example/15.1"),
        ("state", "ga"),
    ] {
        assert_eq!(show[k], v, "{k} in {show}");
    }
    assert_eq!(show["install_properties"]["MODE"], "quiet");
    assert_eq!(show["signature_verified"], true);
    assert!(show["content_hash"].as_str().unwrap().starts_with("sha256:"));
    assert!(show["size"].as_u64().unwrap() > 0 && show["inserted_unix"].as_i64().unwrap() > 0);
    assert_eq!(w.admin_json(&purl, &["update", "show", &p1_id])["patch_label"], "Patch1");

    // Two GA patches of one release: the list warns; --retire-older fixes it.
    w.admin_ok(&purl, &["update", "state", &p2_id, "ga"]);
    let out = w.admin(&purl, &["update", "list"]);
    assert!(stderr(&out).contains("only the latest should be GA"), "{}", stderr(&out));
    let changed = w.admin_json(&purl, &["update", "state", &p2_id, "ga", "--retire-older"]);
    assert!(
        changed.as_array().unwrap().iter().any(|u| u["id"] == p1_id.as_str() && u["state"] == "inactive"),
        "{changed}"
    );
    let out = w.admin(&purl, &["update", "list"]);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));

    // A fresh machine installs the release, then the GA patch: in that order.
    let _a = w.agent("m1", &purl);
    wait_until("patched", T, || w.installed("m1", "client").as_deref() == Some("15.1.2.0"));
    wait_until("install activity reported", T, || ids_in_activity(&w, &purl, "m1", "installed").len() == 2);
    assert_eq!(ids_in_activity(&w, &purl, "m1", "installed"), vec![rel_id.clone(), p2_id.clone()]);

    // Status per update; filters; grouping.
    wait_until("status counts the install", T, || {
        w.admin_json(&purl, &["update", "show", &p2_id])["status"]["installed_count"] == 1
    });
    let listed = w.admin_json(&purl, &["update", "list", "--product-line", "Suite", "--state", "inactive"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], p1_id.as_str());
    let grouped = w.admin_ok(&purl, &["update", "list", "--group-by", "release"]);
    assert!(grouped.contains("release: client 2015 R1 (3 updates)"), "{grouped}");

    // Who did what is in the activity log.
    let acts = w.admin_json(&purl, &["activity", "--update", &p1_id]);
    let details: Vec<&str> = acts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "catalog")
        .map(|a| a["detail"].as_str().unwrap())
        .collect();
    assert!(details.iter().any(|d| d.contains("retired to inactive")), "{details:?}");
    assert!(details.iter().any(|d| d.contains("imported")), "{details:?}");
    // Who: the name and role in the caller's certificate, not what it claims.
    assert!(details.iter().all(|d| d.starts_with("ops (admin)")), "{details:?}");
}

#[test]
fn cap_holds_back_and_uncap_releases() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let line = ["--product-line", "Tools"];
    w.publish(&purl, &w.package_with("ed", "1.0.0.0", &w.key, &line));
    w.admin_ok(&purl, &["product-line", "cap", "Tools", "1.9.9.9"]);
    let v2 = w.publish(&purl, &w.package_with("ed", "2.0.0.0", &w.key, &line));
    let show = w.admin_json(&purl, &["update", "show", &v2]);
    assert_eq!(show["status"]["held_by_cap"], "1.9.9.9");
    assert!(show["status"]["notes"][0].as_str().unwrap().contains("capped at 1.9.9.9"), "{show}");
    let _a = w.agent("m", &purl);
    wait_until("v1 installed", T, || w.installed("m", "ed").as_deref() == Some("1.0.0.0"));
    let out = w.agent_cmd("m", &["check"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"), "capped: nothing to do");
    assert_eq!(w.admin_json(&purl, &["product-line", "list"])[0]["cap"], "1.9.9.9");

    let out = w.admin(&purl, &["product-line", "cap", "Tools", "2.x"]);
    assert!(!out.status.success() && stderr(&out).contains("malformed version"), "{}", stderr(&out));

    w.admin_ok(&purl, &["product-line", "uncap", "Tools"]);
    let out = w.agent_cmd("m", &["check"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("installed ed 2.0.0.0"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn related_installs_remove_with_rollback_and_guarded_delete() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (_r, rurl) = w.remote("site", &purl);
    let a1 = w.publish(&purl, &w.package("app", "1.0.0.0", &w.key));
    w.wait_site_has(&rurl, &a1);
    let _a = w.agent("m", &rurl);
    wait_until("app 1 via the site", T, || w.installed("m", "app").as_deref() == Some("1.0.0.0"));

    // app 2 brings helper along; helper exists only as a related install.
    let a2 =
        w.admin_ok(&purl, &["update", "add", w.package("app", "2.0.0.0", &w.key).to_str().unwrap()]).trim().to_string();
    let h = w
        .admin_ok(&purl, &["update", "add", w.package("helper", "5.0.0.0", &w.key).to_str().unwrap()])
        .trim()
        .to_string();
    let rel = w.admin_json(&purl, &["update", "relate", &a2, "--installs", "helper"]);
    assert_eq!(rel[0]["related_installs"][0], "helper");
    w.admin_ok(&purl, &["update", "state", &a2, &h, "ga"]);
    wait_until("both arrive through the site", T, || {
        w.agent_cmd("m", &["check"]);
        w.installed("m", "app").as_deref() == Some("2.0.0.0")
            && w.installed("m", "helper").as_deref() == Some("5.0.0.0")
    });
    let out = w.admin(&purl, &["update", "relate", &a2, "--installs", "app"]);
    assert!(!out.status.success() && stderr(&out).contains("related to itself"), "{}", stderr(&out));
    assert_eq!(w.admin_json(&purl, &["update", "unrelate", &a2])[0]["related_installs"].as_array().unwrap().len(), 0);

    // Deleting what a machine runs, or keeps for rollback, is refused.
    wait_until("inventory reaches the centre", T, || {
        w.admin_json(&purl, &["machine", "list"]).as_array().unwrap().iter().any(|m| {
            m["name"] == "m"
                && m["installed"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["version"] == "2.0.0.0" && p["previous_version"] == "1.0.0.0")
        })
    });
    let out = w.admin(&purl, &["update", "delete", &a1]);
    assert!(!out.status.success() && stderr(&out).contains("kept for rollback"), "{}", stderr(&out));

    // remove: the machine goes back to 1.0.0.0, from app_old.
    w.admin_ok(&purl, &["update", "state", &a2, "remove"]);
    wait_until("rolled back", T, || {
        w.agent_cmd("m", &["check"]);
        w.installed("m", "app").as_deref() == Some("1.0.0.0")
    });
    assert!(!w.root("m").join("app_old").exists());

    // A forced delete goes through, and the site forgets the update too.
    w.admin_ok(&purl, &["update", "delete", &h, "--force"]);
    let out = w.admin(&purl, &["update", "show", &h]);
    assert!(!out.status.success() && stderr(&out).contains("no update with id"), "{}", stderr(&out));
    wait_until("the site's catalog drops the deleted update", T, || {
        let ids = w.site_catalog(&rurl);
        !ids.contains(&h) && ids.contains(&a1)
    });
}

#[test]
fn content_scanner_imports_rejects_and_waits_for_writers() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let auto = w.path("drop-auto");
    let manual = w.path("drop-manual");
    std::fs::create_dir_all(&auto).unwrap();
    std::fs::create_dir_all(&manual).unwrap();
    w.admin_ok(&purl, &["watch", "add", auto.to_str().unwrap(), "--auto"]);
    w.admin_ok(&purl, &["watch", "add", manual.to_str().unwrap()]);
    let listed = w.admin_json(&purl, &["watch", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);

    // Auto: a good package is imported and removed; a corrupt one and a foreign-signed one
    // are rejected with a reason.
    std::fs::copy(w.package("good", "1.0.0.0", &w.key), auto.join("good.pkg")).unwrap();
    std::fs::write(auto.join("corrupt.pkg"), b"UPDRAFT1 this is not a package").unwrap();
    let intruder = w.path("intruder");
    ReleaseKey::generate().unwrap().save(&intruder).unwrap();
    std::fs::copy(w.package("foreign", "1.0.0.0", &intruder.with_extension("key")), auto.join("foreign.pkg")).unwrap();
    wait_until("auto folder processed", T, || {
        !auto.join("good.pkg").exists() && !auto.join("corrupt.pkg").exists() && !auto.join("foreign.pkg").exists()
    });
    let updates = w.admin_json(&purl, &["update", "list"]);
    assert_eq!(updates.as_array().unwrap().len(), 1, "{updates}");
    assert_eq!(updates[0]["product"], "good");
    assert_eq!(updates[0]["state"], "pre-approval");
    let reason = std::fs::read_to_string(auto.join("rejected/corrupt.pkg.reason")).unwrap();
    assert!(reason.contains("corrupt.pkg"), "{reason}");
    let reason = std::fs::read_to_string(auto.join("rejected/foreign.pkg.reason")).unwrap();
    assert!(reason.contains("does not trust"), "{reason}");

    // A file still being written is left alone until it has been quiet.
    let pkg = std::fs::read(w.package("slow", "1.0.0.0", &w.key)).unwrap();
    let slow = auto.join("slow.pkg");
    std::fs::write(&slow, &pkg[..pkg.len() / 2]).unwrap();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        // Keep "writing": rewrite the half file so it never looks finished.
        std::fs::write(&slow, &pkg[..pkg.len() / 2]).unwrap();
    }
    assert!(slow.exists(), "a file being written must not be imported or rejected");
    assert!(!auto.join("rejected/slow.pkg").exists());
    std::fs::write(&slow, &pkg).unwrap();
    wait_until("slow file imported once complete", T, || !slow.exists());
    assert_eq!(w.admin_json(&purl, &["update", "list", "--product", "slow"]).as_array().unwrap().len(), 1);

    // Manual: files wait until imported; names outside watched folders are refused.
    std::fs::copy(w.package("hand", "1.0.0.0", &w.key), manual.join("hand.pkg")).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(manual.join("hand.pkg").exists(), "manual folders are not scanned");
    let pending = w.admin_json(&purl, &["watch", "pending", manual.to_str().unwrap()]);
    assert_eq!(pending.as_array().unwrap().len(), 1);
    let outside = w.path("elsewhere.pkg");
    std::fs::copy(manual.join("hand.pkg"), &outside).unwrap();
    let out = w.admin(&purl, &["watch", "import", outside.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("not directly inside a watched folder"), "{}", stderr(&out));
    let escape = format!("{}/../elsewhere.pkg", manual.display());
    let out = w.admin(&purl, &["watch", "import", &escape]);
    assert!(!out.status.success() && stderr(&out).contains("not directly inside a watched folder"), "{}", stderr(&out));
    let out = w.admin_ok(&purl, &["watch", "import"]);
    assert!(out.contains("imported") && out.contains("hand-1.0.0.0-"), "{out}");
    assert!(!manual.join("hand.pkg").exists());

    let out = w.admin(&purl, &["watch", "add", w.path("no-such-dir").to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("no-such-dir"), "{}", stderr(&out));
    w.admin_ok(&purl, &["watch", "remove", manual.to_str().unwrap()]);
    assert_eq!(w.admin_json(&purl, &["watch", "list"]).as_array().unwrap().len(), 1);
}
