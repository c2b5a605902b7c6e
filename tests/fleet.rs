//! End-to-end tests of groups and policy: agents in groups with different modes and windows,
//! manual checks and applies, default-group self-configuration, high priority overriding
//! everything, pins up and down, and the fleet report's three states.
use std::time::Duration;

use serde_json::Value;
use updraft_tests::{World, stderr, wait_until};

const T: Duration = Duration::from_secs(40);
const FAST: &[&str] = &["--min-interval", "1", "--max-interval", "1"];

fn status(w: &World, agent: &str) -> Value {
    serde_json::from_slice(&w.agent_cmd(agent, &["status", "--json"]).stdout).unwrap()
}

fn machine<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array().unwrap().iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name} not in {list}"))
}

fn local_hour() -> i32 {
    let out = std::process::Command::new("date").arg("+%H").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn agents_obey_their_groups_modes_and_windows() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let names = ["auto", "dl", "notify", "manual", "window", "early", "self"];
    let _agents: Vec<_> = names.iter().map(|n| w.agent_with(n, &purl, FAST)).collect();
    wait_until("all machines registered", T, || {
        w.admin_json(&purl, &["machine", "list"]).as_array().unwrap().len() == names.len()
    });

    let far_hour = ((local_hour() + 12) % 24).to_string();
    for (group, flags) in [
        ("g-auto", vec!["--mode", "automatic"]),
        ("g-dl", vec!["--mode", "download"]),
        ("g-notify", vec!["--mode", "notify"]),
        ("g-manual", vec!["--mode", "manual"]),
        ("g-window", vec!["--mode", "automatic", "--day", "every-day", "--hour", &far_hour]),
        ("g-early", vec!["--mode", "automatic", "--hour", &far_hour, "--download-early", "true"]),
    ] {
        let mut args = vec!["group", "create", group];
        args.extend(flags);
        w.admin_ok(&purl, &args);
    }
    for (g, m) in [
        ("g-auto", "auto"),
        ("g-dl", "dl"),
        ("g-notify", "notify"),
        ("g-manual", "manual"),
        ("g-window", "window"),
        ("g-early", "early"),
    ] {
        w.admin_ok(&purl, &["group", "assign", g, m]);
    }
    // Bad input changes nothing.
    let out = w.admin(&purl, &["group", "assign", "no-such-group", "auto"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown group"), "{}", stderr(&out));
    let out = w.admin(&purl, &["group", "assign", "g-auto", "auto", "ghost"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown machine(s): ghost"), "{}", stderr(&out));
    let out = w.admin(&purl, &["group", "create", "g-x", "--mode", "sometimes"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown download mode"), "{}", stderr(&out));
    assert_eq!(w.admin_json(&purl, &["machine", "list", "--group", "g-auto"]).as_array().unwrap().len(), 1);

    // A default-group machine may choose its own mode; a managed one may not.
    wait_until("dl knows it is managed", T, || status(&w, "dl")["managed"] == true);
    let out = w.agent_cmd("dl", &["config", "--mode", "automatic"]);
    assert!(!out.status.success() && stderr(&out).contains("managed by group \"g-dl\""), "{}", stderr(&out));
    let out = w.agent_cmd("self", &["config", "--mode", "notify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mode notify"));

    for g in ["g-auto", "g-dl", "g-notify", "g-manual", "g-window", "g-early"] {
        w.admin_ok(&purl, &["deploy", "app", "--group", g]);
    }
    let v1 = w.publish(&purl, &w.package("app", "1.0.0.0", &w.key));
    wait_until("automatic installs at once", T, || w.installed("auto", "app").as_deref() == Some("1.0.0.0"));
    wait_until("download mode downloads and waits", T, || status(&w, "dl")["waiting"][0]["downloaded"] == true);
    // The provider says why an offered update is not installed yet.
    let shown = w.admin_json(&purl, &["machine", "show", "dl"]);
    assert!(shown["products"].to_string().contains("group g-dl downloads, then waits for `agent apply`"), "{shown}");
    // The install time is when machines download and install; a group may download early.
    wait_until("automatic outside its window waits, not even downloading", T, || {
        status(&w, "window")["waiting"][0]["update_id"] == v1.as_str()
    });
    assert_eq!(status(&w, "window")["waiting"][0]["downloaded"], false);
    wait_until("a group that downloads early downloads and waits for its hour", T, || {
        status(&w, "early")["waiting"][0]["downloaded"] == true
    });
    let groups = w.admin_json(&purl, &["group", "list"]);
    assert!(groups.to_string().contains("\"download_early\":true"), "{groups}");
    wait_until("notify mode only reports", T, || status(&w, "notify")["waiting"][0]["update_id"] == v1.as_str());
    wait_until("self-configured notify", T, || status(&w, "self")["waiting"][0]["update_id"] == v1.as_str());
    assert_eq!(status(&w, "notify")["waiting"][0]["downloaded"], false);
    for m in ["dl", "window", "early", "notify", "manual", "self"] {
        assert!(w.installed(m, "app").is_none(), "{m} must not install yet");
    }

    // The report shows who waits.
    wait_until("report classifies waiting machines", T, || {
        let r = w.admin_json(&purl, &["report"]);
        let needs = r.as_array().unwrap().iter().find(|g| g["status"] == "needs-attention").unwrap();
        needs["count"].as_u64().unwrap() >= 4
    });

    // Someone applies, or checks by hand; the window opens.
    assert!(w.agent_cmd("dl", &["apply"]).status.success());
    assert_eq!(w.installed("dl", "app").as_deref(), Some("1.0.0.0"));
    let out = w.agent_cmd("notify", &["apply", "--select", &v1]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.installed("notify", "app").as_deref(), Some("1.0.0.0"));
    let out = w.agent_cmd("manual", &["check"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("installed app 1.0.0.0"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    w.admin_ok(&purl, &["group", "set", "g-window", "--hour", "any"]);
    wait_until("window opened", T, || w.installed("window", "app").as_deref() == Some("1.0.0.0"));

    // High priority ignores mode and window.
    w.admin_ok(&purl, &["group", "set", "g-window", "--hour", &far_hour]);
    let v2 =
        w.admin_ok(&purl, &["update", "add", w.package("app", "2.0.0.0", &w.key).to_str().unwrap()]).trim().to_string();
    w.admin_ok(&purl, &["update", "priority", &v2, "high"]);
    w.admin_ok(&purl, &["update", "state", &v2, "ga"]);
    wait_until("high priority everywhere", T, || {
        names.iter().all(|m| w.installed(m, "app").as_deref() == Some("2.0.0.0"))
    });

    // Removing a group returns its machines to the default group.
    w.admin_ok(&purl, &["group", "remove", "g-dl"]);
    assert_eq!(machine(&w.admin_json(&purl, &["machine", "list"]), "dl")["group"], "default");
    let out = w.admin(&purl, &["group", "remove", "default"]);
    assert!(!out.status.success() && stderr(&out).contains("cannot be removed"), "{}", stderr(&out));
    let groups = w.admin_json(&purl, &["group", "list"]);
    assert_eq!(groups[0]["name"], "default");
}

#[test]
fn a_pin_moves_a_machine_down_and_unpinning_brings_it_back() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    w.publish(&purl, &w.package("db", "1.0.0.0", &w.key));
    w.publish(&purl, &w.package("db", "2.0.0.0", &w.key));
    let _a = w.agent_with("pinned", &purl, FAST);
    let _b = w.agent_with("free", &purl, FAST);
    wait_until("both on 2", T, || {
        w.installed("pinned", "db").as_deref() == Some("2.0.0.0")
            && w.installed("free", "db").as_deref() == Some("2.0.0.0")
    });
    let out = w.admin(&purl, &["machine", "pin", "pinned", "--product", "db", "--version", "one"]);
    assert!(!out.status.success() && stderr(&out).contains("malformed version"), "{}", stderr(&out));
    w.admin_ok(&purl, &["machine", "pin", "pinned", "--product", "db", "--version", "1.0.0.0"]);
    wait_until("pinned machine goes down to 1", T, || w.installed("pinned", "db").as_deref() == Some("1.0.0.0"));
    let show = w.admin_json(&purl, &["machine", "show", "pinned"]);
    assert_eq!(show["pins"]["db"], "1.0.0.0");
    assert_eq!(show["products"][0]["pinned_version"], "1.0.0.0");
    // A newer GA release does not move it.
    w.publish(&purl, &w.package("db", "3.0.0.0", &w.key));
    wait_until("free machine takes 3", T, || w.installed("free", "db").as_deref() == Some("3.0.0.0"));
    assert_eq!(w.installed("pinned", "db").as_deref(), Some("1.0.0.0"));
    w.admin_ok(&purl, &["machine", "unpin", "pinned", "--product", "db"]);
    wait_until("unpinned machine follows GA again", T, || w.installed("pinned", "db").as_deref() == Some("3.0.0.0"));
}

#[test]
fn report_classifies_error_attention_and_up_to_date() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    w.publish(&purl, &w.package("tool", "1.0.0.0", &w.key));
    let dead = format!("{}://127.0.0.1:{}", w.scheme(), updraft_tests::free_port());
    let _ok = w.agent_with("fine", &purl, FAST);
    let _bad = w.agent_with("broken", &format!("{dead},{purl}"), FAST);
    let _wait = w.agent_with("waiting", &purl, FAST);
    wait_until("fine installed", T, || w.installed("fine", "tool").is_some());
    wait_until("waiting registered", T, || w.installed("waiting", "tool").is_some());
    w.admin_ok(&purl, &["group", "create", "slow", "--mode", "notify"]);
    w.admin_ok(&purl, &["group", "assign", "slow", "waiting"]);
    w.publish(&purl, &w.package("tool", "1.1.0.0", &w.key));
    w.admin_ok(&purl, &["group", "create", "hold", "--mode", "manual"]);
    w.admin_ok(&purl, &["group", "assign", "hold", "fine"]);
    // `fine` took 1.1 before the move, or holds still at 1.0 in manual mode; either way the
    // report must say so.
    wait_until("three states", T, || {
        let r = w.admin_json(&purl, &["report", "--last", "1h"]);
        let of = |s: &str| -> Vec<String> {
            r.as_array().unwrap().iter().find(|g| g["status"] == s).unwrap()["machines"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["name"].as_str().unwrap().to_string())
                .collect()
        };
        of("error") == ["broken"] && of("needs-attention").contains(&"waiting".to_string())
    });
    let broken = w.admin_json(&purl, &["report", "show", "broken"]);
    assert!(broken["notes"][0].as_str().unwrap().contains(&format!("cannot reach provider {dead}")), "{broken}");
    let text = w.admin_ok(&purl, &["report"]);
    assert!(text.starts_with("error 1 | needs-attention"), "{text}");
    // Bring `fine` up to date by hand: then all three states are populated.
    w.agent_cmd("fine", &["check"]);
    wait_until("fine up to date", T, || {
        let r = w.admin_json(&purl, &["report"]);
        r.as_array().unwrap().iter().find(|g| g["status"] == "up-to-date").unwrap()["machines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "fine")
    });
    let acts = w.admin_json(&purl, &["activity", "--machine", "fine", "--last", "1h"]);
    assert!(!acts.as_array().unwrap().is_empty());
    assert!(w.admin_ok(&purl, &["activity", "clear", "--machine", "fine"]).contains("removed"));
    assert!(w.admin_json(&purl, &["activity", "--machine", "fine"]).as_array().unwrap().is_empty());
    let out = w.admin(&purl, &["report", "--since", "yesterday"]);
    assert!(!out.status.success() && stderr(&out).contains("expected YYYY-MM-DD"), "{}", stderr(&out));
}

#[test]
fn an_update_that_needs_a_restart_asks_for_attention() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    w.publish(&purl, &w.package_with("kernel-mod", "1.0.0.0", &w.key, &["--property", "restart=required"]));
    let _a = w.agent_with("box", &purl, FAST);
    wait_until("installed", T, || w.installed("box", "kernel-mod").is_some());
    wait_until("restart needed reported", T, || {
        let m = w.admin_json(&purl, &["machine", "show", "box"]);
        m["status"] == "needs-attention" && m["notes"][0] == "restart needed"
    });
    assert_eq!(status(&w, "box")["restart_needed"], true);
}

/// The report's JSON as status -> machine names.
fn report_names(r: &Value) -> std::collections::BTreeMap<String, Vec<String>> {
    r.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let names = g["machines"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string());
            (g["status"].as_str().unwrap().to_string(), names.collect())
        })
        .collect()
}

#[test]
fn silent_machines_and_sites_are_errors_until_they_report_and_forgotten_machines_are_gone() {
    let w = World::new();
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    let (_p, purl) = w.provider_with("centre", &["--trust-key", &pubkey, "--silence-grace-secs", "1"]);
    let (mut site, surl) = w.remote("site", &purl);
    let fast = &["--min-interval", "1", "--max-interval", "2"];
    let mut direct = w.agent_with("direct", &purl, fast);
    let _branch = w.agent_with("branch", &surl, fast);
    let mut old = w.agent_with("old", &purl, fast);
    let list = |w: &World| w.admin_json(&purl, &["machine", "list"]);
    let silent = |l: &Value, name: &str| -> bool {
        let m = machine(l, name);
        m["silent"] == true
            && m["status"] == "error"
            && m["notes"][0].as_str().unwrap().starts_with("silent since ")
            && m["contact_due_unix_ms"].as_i64().unwrap() > m["last_contact_unix_ms"].as_i64().unwrap()
    };
    let fine = |l: &Value, name: &str| l.as_array().unwrap().iter().any(|m| m["name"] == name && m["silent"] == false);
    wait_until("every machine and the site heard from", T, || {
        let l = list(&w);
        ["direct", "branch", "old", "site"].iter().all(|n| fine(&l, n))
    });

    // A machine that stops checking is silent once its own interval and the grace have passed.
    direct.kill9();
    wait_until("direct silent", T, || silent(&list(&w), "direct"));
    let l = list(&w);
    assert!(fine(&l, "branch") && fine(&l, "old") && fine(&l, "site"), "only direct is silent: {l}");
    let shown = w.admin_ok(&purl, &["machine", "show", "direct"]);
    assert!(shown.contains("status        error: silent since "), "{shown}");
    let table = w.admin_ok(&purl, &["machine", "list"]);
    assert!(table.contains("error (silent since "), "{table}");
    // A report of a span that starts after its last contact still lists it: silence is the error.
    let tomorrow = {
        let out = std::process::Command::new("date").args(["-u", "-d", "tomorrow", "+%F"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let r = report_names(&w.admin_json(&purl, &["report", "--since", &tomorrow]));
    assert_eq!(r["error"], vec!["direct".to_string()], "{r:?}");
    assert!(r["up-to-date"].is_empty() && r["needs-attention"].is_empty(), "{r:?}");

    // A site that stops is silent after its heartbeat and the grace; the machines behind it too.
    site.kill9();
    wait_until("site and branch silent", T, || {
        let l = list(&w);
        silent(&l, "site") && silent(&l, "branch")
    });
    let sites = w.admin_ok(&purl, &["site", "list"]);
    assert!(sites.contains("error (silent since ") && !sites.contains("connected"), "{sites}");

    // Each comes back when it reports again.
    let _direct = direct.again();
    let _site = site.again();
    wait_until("direct, site and branch back", T, || {
        let l = list(&w);
        ["direct", "branch", "site"].iter().all(|n| fine(&l, n) && machine(&l, n)["status"] != "error")
    });

    // Forgetting a machine takes its record and everything administrators gave it.
    w.admin_ok(&purl, &["group", "create", "lab"]);
    w.admin_ok(&purl, &["group", "assign", "lab", "old"]);
    w.publish(&purl, &w.package("tool", "1.0.0.0", &w.key));
    w.admin_ok(&purl, &["machine", "pin", "old", "--product", "tool", "--version", "1.0.0.0"]);
    w.admin_ok(&purl, &["machine", "role", "old", "server"]);
    w.admin_ok(&purl, &["deploy", "tool", "--machine", "old"]);
    old.kill9();
    let out = w.admin(&purl, &["machine", "forget", "nobody"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown machine \"nobody\""), "{}", stderr(&out));
    let text = w.admin_ok(&purl, &["machine", "forget", "old"]);
    for removed in ["pins: tool 1.0.0.0", "group: lab", "role: server", "deployment: tool"] {
        assert!(text.contains(&format!("removed {removed}")), "{removed}: {text}");
    }
    let l = list(&w);
    assert!(!l.as_array().unwrap().iter().any(|m| m["name"] == "old"), "{l}");
    let out = w.admin(&purl, &["machine", "show", "old"]);
    assert!(!out.status.success(), "a forgotten machine has no detail");
    let deployments = w.admin_ok(&purl, &["deploy", "list"]);
    assert!(!deployments.contains("old"), "{deployments}");
    let group = w.admin_json(&purl, &["group", "show", "lab"]);
    assert_eq!(group["members"], serde_json::json!([]), "{group}");
    let activity = w.admin_ok(&purl, &["activity"]);
    assert!(
        activity.contains("forgot machine old (pins: tool 1.0.0.0; group: lab; role: server; deployment: tool)"),
        "{activity}"
    );
    let audit = w.admin_json(&purl, &["audit", "list"]);
    assert!(
        audit.as_array().unwrap().iter().any(|e| e["action"].as_str().unwrap_or_default().contains("ForgetMachine")),
        "{audit}"
    );
    // Forgetting is refused for what is not there any more, and changes nothing.
    let out = w.admin(&purl, &["machine", "forget", "old"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown machine \"old\""), "{}", stderr(&out));
}
