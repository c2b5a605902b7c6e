//! End-to-end tests of what each machine gets: only the products it has (receipts, adoption),
//! the ones deployed to it and their related installs; a hand-made directory is never touched;
//! high priority reaches only the machines with the product; the server version ceiling holds
//! workstations back until their server moves; a site fetches only what its machines need.
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use updraft_tests::{World, stderr, wait_until};

const T: Duration = Duration::from_secs(40);
/// Agents that never check on their own during a test: every check here is asked for.
const QUIET: &[&str] = &["--min-interval", "3600", "--max-interval", "3600"];

fn status(w: &World, agent: &str) -> Value {
    serde_json::from_slice(&w.agent_cmd(agent, &["status", "--json"]).stdout).unwrap()
}

/// Runs `agent check` and returns (succeeded, stdout + stderr).
fn check(w: &World, agent: &str) -> (bool, String) {
    let out = w.agent_cmd(agent, &["check"]);
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out)))
}

fn products_under(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn machine_show(w: &World, provider: &str, name: &str) -> Value {
    w.admin_json(provider, &["machine", "show", name])
}

fn product<'a>(detail: &'a Value, name: &str) -> Option<&'a Value> {
    detail["products"].as_array().unwrap().iter().find(|p| p["product"] == name)
}

#[test]
fn machines_get_only_what_they_have_or_are_given() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    // client (upgrade code UC-CLIENT, brings helper along), its patch, helper, serveronly.
    let code = ["--upgrade-code", "UC-CLIENT", "--product-line", "suite"];
    let client =
        w.approve(&purl, &w.package_with("client", "1.0.0.0", &w.key, &[&code[..], &["--related", "helper"]].concat()));
    w.approve(&purl, &w.package("helper", "2.0.0.0", &w.key));
    w.approve(&purl, &w.package("serveronly", "3.0.0.0", &w.key));

    // Three machines: an empty one, one with a hand-made ROOT/client, one with an older client
    // installed by other means (to be adopted).
    for (name, tree) in [("handmade", Some("settings")), ("old", Some("0.9.0.0"))] {
        let dir = w.root(name).join("client");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("settings.ini"), tree.unwrap()).unwrap();
    }
    let _agents: Vec<_> = ["empty", "handmade", "old", "srv"].iter().map(|n| w.agent_with(n, &purl, QUIET)).collect();
    for name in ["empty", "handmade", "old", "srv"] {
        let (ok, out) = check(&w, name);
        assert!(ok && out.contains("up to date"), "{name}: {out}");
    }
    assert!(products_under(&w.root("empty")).is_empty(), "an empty machine gets nothing");
    assert_eq!(products_under(&w.root("handmade")), ["client"]);
    assert_eq!(std::fs::read_to_string(w.root("handmade").join("client/settings.ini")).unwrap(), "settings");
    // Nobody has or is given any of it: the report counts nothing as waiting.
    let upd = w.admin_json(&purl, &["update", "show", &client]);
    assert_eq!(
        (upd["status"]["applicable_count"].as_u64(), upd["status"]["offered_count"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(machine_show(&w, &purl, "empty")["products"].as_array().unwrap().is_empty());

    // Adopting declares the existing tree; its first update keeps it as client_old.
    let bad = w.agent_cmd("old", &["adopt", "client", "--version", "not-a-version"]);
    assert!(!bad.status.success() && stderr(&bad).contains("version"), "{}", stderr(&bad));
    let bad = w.agent_cmd("old", &["adopt", "nothing-here", "--version", "1.0.0.0"]);
    assert!(!bad.status.success(), "adopting a product that is not under the root is refused");
    let out = w.agent_cmd("old", &["adopt", "client", "--version", "0.9.0.0", "--upgrade-code", "UC-CLIENT"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status(&w, "old")["installed"][0]["adopted"], true);
    let (ok, out) = check(&w, "old");
    assert!(ok, "{out}");
    assert_eq!(w.installed("old", "client").as_deref(), Some("1.0.0.0"));
    assert_eq!(w.installed("old", "helper").as_deref(), Some("2.0.0.0"), "and the related helper");
    assert_eq!(std::fs::read_to_string(w.root("old").join("client_old/settings.ini")).unwrap(), "0.9.0.0");
    assert_eq!(products_under(&w.root("old")), ["client", "client_old", "helper"], "and nothing else");
    // A machine with client gets its patches.
    w.approve(&purl, &w.package_with("client", "1.0.1.0", &w.key, &[&code[..], &["--install-type", "patch"]].concat()));
    assert!(check(&w, "old").0);
    assert_eq!(w.installed("old", "client").as_deref(), Some("1.0.1.0"));
    let again = w.agent_cmd("old", &["adopt", "client", "--version", "0.9.0.0"]);
    assert!(!again.status.success() && stderr(&again).contains("installed by Updraft"), "{}", stderr(&again));

    // A deployment to a group gives the product to its machines that lack it: exactly client
    // (release and patch) and helper.
    w.admin_ok(&purl, &["group", "create", "lab"]);
    w.admin_ok(&purl, &["group", "assign", "lab", "empty"]);
    let out = w.admin(&purl, &["deploy", "client", "--group", "no-such-group"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown group"), "{}", stderr(&out));
    w.admin_ok(&purl, &["deploy", "client", "--group", "lab"]);
    let listed = w.admin_json(&purl, &["deploy", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["group"], "lab");
    let (ok, out) = check(&w, "empty");
    assert!(ok, "{out}");
    // (client_old: the release, kept for rolling the patch back.)
    assert_eq!(products_under(&w.root("empty")), ["client", "client_old", "helper"]);
    assert_eq!(w.installed("empty", "client").as_deref(), Some("1.0.1.0"));
    let recs = status(&w, "empty")["installed"].clone();
    let rec = recs.as_array().unwrap().iter().find(|r| r["product"] == "client").unwrap().clone();
    assert_eq!((rec["upgrade_code"].as_str(), rec["adopted"].as_bool()), (Some("UC-CLIENT"), Some(false)), "{rec}");

    // A directory under the root that has no receipt is never overwritten or moved, and says so.
    w.admin_ok(&purl, &["deploy", "client", "--machine", "handmade"]);
    let (ok, out) = check(&w, "handmade");
    assert!(!ok && out.contains("was not installed by Updraft: adopt it"), "{out}");
    assert_eq!(products_under(&w.root("handmade")), ["client"], "no client_old, no helper through it");
    assert_eq!(std::fs::read_to_string(w.root("handmade").join("client/settings.ini")).unwrap(), "settings");
    let problems = status(&w, "handmade")["problems"].clone();
    assert!(problems.to_string().contains("was not installed by Updraft"), "{problems}");
    let shown = machine_show(&w, &purl, "handmade");
    assert!(shown["problems"].to_string().contains("was not installed by Updraft"), "{shown}");
    assert_eq!(shown["status"], "error", "{shown}");

    // A high-priority fix of serveronly reaches the one machine that has it, and no other.
    w.admin_ok(&purl, &["deploy", "serveronly", "--machine", "srv"]);
    assert!(check(&w, "srv").0);
    assert_eq!(w.installed("srv", "serveronly").as_deref(), Some("3.0.0.0"));
    let fix = w.approve(&purl, &w.package_with("serveronly", "3.0.1.0", &w.key, &["--install-type", "patch"]));
    w.admin_ok(&purl, &["update", "priority", &fix, "high"]);
    let seq = w.admin_json(&purl, &["update", "show", &fix])["catalog_seq"].as_u64().unwrap();
    wait_until("the fix on srv", T, || w.installed("srv", "serveronly").as_deref() == Some("3.0.1.0"));
    // Every agent was pushed and checked at (or after) the push; none else took it.
    for name in ["empty", "handmade", "old"] {
        wait_until(&format!("{name} checked after the push"), T, || {
            status(&w, name)["catalog_seq"].as_u64().unwrap_or(0) >= seq
        });
        assert!(w.installed(name, "serveronly").is_none(), "{name} took serveronly");
    }
    // srv's report of the install reaches the provider after the files are in place: wait for it.
    let fix_status = || w.admin_json(&purl, &["update", "show", &fix])["status"].clone();
    wait_until("the provider to count srv's install of the fix", T, || fix_status()["installed_count"] == 1);
    let st = fix_status();
    assert_eq!((st["applicable_count"].as_u64(), st["installed_count"].as_u64()), (Some(1), Some(1)), "{st}");
    let st = w.admin_json(&purl, &["update", "show", &client])["status"].clone();
    assert_eq!(st["applicable_count"].as_u64(), Some(3), "old, empty and handmade have or are given client: {st}");

    // Undeploying stops giving, uninstalls nothing.
    w.admin_ok(&purl, &["undeploy", "client", "--group", "lab"]);
    assert!(check(&w, "empty").0);
    assert_eq!(w.installed("empty", "client").as_deref(), Some("1.0.1.0"));
    let out = w.admin(&purl, &["undeploy", "client", "--group", "lab"]);
    assert!(!out.status.success() && stderr(&out).contains("is not deployed to group lab"), "{}", stderr(&out));
}

#[test]
fn workstations_never_run_ahead_of_their_server() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let line = ["--product-line", "suite"];
    w.publish(&purl, &w.package_with("app", "1.0.0.0", &w.key, &line));
    let _srv = w.agent_with("srv", &purl, &[QUIET, &["--role", "server"]].concat());
    let _ws = w.agent_with("ws", &purl, QUIET);
    for name in ["srv", "ws"] {
        assert!(check(&w, name).0);
        assert_eq!(w.installed(name, "app").as_deref(), Some("1.0.0.0"));
    }
    let out = w.admin(&purl, &["product-line", "cap", "suite", "--follow-role", "boss"]);
    assert!(!out.status.success() && stderr(&out).contains("machine role"), "{}", stderr(&out));
    w.admin_ok(&purl, &["product-line", "cap", "suite", "--follow-role", "server"]);
    let caps = w.admin_json(&purl, &["product-line", "list"]);
    assert_eq!(
        (caps[0]["follow_role"].as_str(), caps[0]["ceiling"].as_str()),
        (Some("server"), Some("1.0.0.0")),
        "{caps}"
    );

    let v11 = w.approve(&purl, &w.package_with("app", "1.1.0.0", &w.key, &line));
    // The workstation is held, and both machine show and update show say by what.
    let (ok, out) = check(&w, "ws");
    assert!(ok && out.contains("up to date"), "{out}");
    assert_eq!(w.installed("ws", "app").as_deref(), Some("1.0.0.0"));
    let shown = machine_show(&w, &purl, "ws");
    let app = product(&shown, "app").unwrap();
    assert_eq!(app["status"], "held", "{shown}");
    assert!(app["held"].to_string().contains("follows role server: no server runs above 1.0.0.0"), "{app}");
    assert_eq!(shown["role"], "workstation");
    let st = w.admin_json(&purl, &["update", "show", &v11])["status"].clone();
    assert!(st["held"].to_string().contains("follows role server"), "{st}");
    assert_eq!(st["offered_count"].as_u64(), Some(1), "offered to the server only: {st}");

    // The server moves first; the ceiling follows its report; the workstation is released at
    // its next check.
    assert!(check(&w, "srv").0);
    assert_eq!(w.installed("srv", "app").as_deref(), Some("1.1.0.0"));
    wait_until("the ceiling follows the server", T, || {
        w.admin_json(&purl, &["product-line", "list"])[0]["ceiling"] == "1.1.0.0"
    });
    assert!(check(&w, "ws").0);
    assert_eq!(w.installed("ws", "app").as_deref(), Some("1.1.0.0"));

    // An administrator's role wins over the agent's: with the server made a workstation, no
    // server runs the line, so nothing newer is offered to anyone.
    let out = w.admin(&purl, &["machine", "role", "srv", "manager"]);
    assert!(!out.status.success() && stderr(&out).contains("machine role"), "{}", stderr(&out));
    w.admin_ok(&purl, &["machine", "role", "srv", "workstation"]);
    assert_eq!(machine_show(&w, &purl, "srv")["role"], "workstation");
    let caps = w.admin_json(&purl, &["product-line", "list"]);
    assert_eq!(caps[0]["ceiling"], "", "no server runs the line now: {caps}");
    let v12 = w.approve(&purl, &w.package_with("app", "1.2.0.0", &w.key, &line));
    assert!(check(&w, "srv").0);
    assert_eq!(w.installed("srv", "app").as_deref(), Some("1.1.0.0"));
    let st = w.admin_json(&purl, &["update", "show", &v12])["status"].clone();
    assert!(st["held"].to_string().contains("no server runs it yet"), "{st}");
    w.admin_ok(&purl, &["machine", "role", "srv", "agent"]);
    assert_eq!(machine_show(&w, &purl, "srv")["role"], "server", "back to what its agent says");
}

fn site_status(w: &World, site: &str) -> Value {
    w.admin_json(site, &["site", "status"])
}

/// Waits until every prefetch pass that began before now has finished: a harmless catalog
/// change starts one more pass, and passes run one after another.
fn settle(w: &World, provider: &str, site: &str, tag: &str) -> Value {
    let before = site_status(w, site)["prefetch_passes"].as_u64().unwrap_or(0);
    w.admin_ok(provider, &["group", "create", &format!("settle-{tag}")]);
    wait_until("a prefetch pass after the change", T, || {
        site_status(w, site)["prefetch_passes"].as_u64().unwrap_or(0) > before
    });
    site_status(w, site)
}

#[test]
fn a_site_fetches_only_what_its_machines_need() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (_r, rurl) = w.remote("branch", &purl);
    let mut ids = Vec::new();
    for p in ["ga-a", "ga-b", "ga-c", "ga-d", "ga-e"] {
        ids.push(w.approve(&purl, &w.package(p, "1.0.0.0", &w.key)));
    }
    let _a = w.agent_with("pc", &rurl, QUIET);
    for id in &ids {
        w.wait_site_has(&rurl, id);
    }
    let (ok, out) = check(&w, "pc");
    assert!(ok && out.contains("up to date"), "{out}");
    // Prestaging one product is a change the site acts on: once the pass that fetched it has
    // finished, the site holds that product and none of the other four.
    let size = |id: &str| w.admin_json(&purl, &["update", "show", id])["size"].as_u64().unwrap();
    w.admin_ok(&purl, &["update", "prestage", &ids[0]]);
    wait_until("the prestaged product at the site", T, || {
        site_status(&w, &rurl)["wan_bytes"].as_u64().unwrap_or(0) >= size(&ids[0])
    });
    let st = settle(&w, &purl, &rurl, "1");
    assert_eq!(st["prefetch_failed"].as_u64(), Some(0), "{st}");
    assert_eq!(st["wan_bytes"].as_u64(), Some(size(&ids[0])), "only the prestaged product crossed the WAN: {st}");

    // Deployed to the machine: the site fetches it once, the machine installs it.
    w.admin_ok(&purl, &["deploy", "ga-b", "--machine", "pc"]);
    wait_until("pc has ga-b", T, || {
        check(&w, "pc");
        w.installed("pc", "ga-b").is_some()
    });
    let st = site_status(&w, &rurl);
    assert_eq!(st["wan_bytes"].as_u64(), Some(size(&ids[0]) + size(&ids[1])), "{st}");
    assert_eq!(products_under(&w.root("pc")), ["ga-b"]);
}
