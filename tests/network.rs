//! Multi-host cases in network namespaces: a switchover pair losing its active under load, an
//! active cut off from the agents' network, and mDNS discovery with keys. Every process runs
//! inside a namespace the test creates; nothing touches the machine's own network. (The
//! fencing case needs only one host and runs on loopback.)
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use updraft_tests::netns::{Host, Lab, command_in};
use updraft_tests::{Proc, World, run_ok, wait_until};

const T: Duration = Duration::from_secs(40);
const PORT: u16 = 8092;

fn url(addr: &str) -> String {
    format!("https://{addr}:{PORT}")
}

fn admin_cmd(w: &World, host: &Host, provider: &str, args: &[&str]) -> std::process::Command {
    let mut c = command_in(host, "admin-cli");
    c.envs(w.tls_env(updraft_tests::ADMIN, "admin", &[])).arg("--provider").arg(provider).args(args);
    c
}

fn admin_in_ok(w: &World, host: &Host, provider: &str, args: &[&str]) -> String {
    run_ok(&mut admin_cmd(w, host, provider, args))
}

fn admin_in_json(w: &World, host: &Host, provider: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&admin_in_ok(w, host, provider, &all)).expect("admin-cli --json prints JSON")
}

/// Imports and approves a package through `provider`, from inside `host`, and deploys its
/// product to the default group (like [`World::publish`]).
fn publish_in(w: &World, host: &Host, provider: &str, pkg: &std::path::Path) -> String {
    let id = admin_in_ok(w, host, provider, &["update", "add", pkg.to_str().unwrap()]).trim().to_string();
    admin_in_ok(w, host, provider, &["update", "state", &id, "ga"]);
    admin_in_ok(w, host, provider, &["deploy", updraft_tests::product_of_id(&id), "--group", "default"]);
    id
}

/// A provider on `host` listening on every address, reachable by its pair peer at its back
/// address.
fn provider_on(w: &World, lab: &Lab, host: &Host, name: &str, store: &str, extra: &[&str]) -> Proc {
    let advertise = url(host.back.as_deref().unwrap_or(&host.lan));
    let listen = format!("0.0.0.0:{PORT}");
    let pubkey = w.pubkey.to_str().unwrap();
    let mut args = vec!["--store", store, "--listen", &listen, "--name", name, "--advertise", &advertise];
    args.extend(["--trust-key", pubkey, "--bootstrap-admin", updraft_tests::ADMIN]);
    args.extend(["--catalog-key", w.catalog_key.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let mut sans = vec![host.lan.as_str()];
    sans.extend(host.back.as_deref());
    let mut cmd = command_in(host, "provider");
    cmd.args(&args).envs(w.env_for(name, "provider", &sans));
    let p = Proc::spawn(w.dir.path(), name, cmd);
    lab.wait_port(host, &host.lan, PORT);
    p
}

fn agent_on(w: &World, host: &Host, name: &str, extra: &[&str]) -> Proc {
    let mut cmd = command_in(host, "agent");
    cmd.args(w.agent_args(name, extra)).envs(w.env_for(name, "agent", &[]));
    Proc::spawn(w.dir.path(), name, cmd)
}

fn agent_json(w: &World, agent: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = w.agent_cmd(agent, &all);
    assert!(out.status.success(), "agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("agent --json prints JSON")
}

fn last_provider(w: &World, agent: &str) -> String {
    agent_json(w, agent, &["status"])["last_provider"].as_str().unwrap_or_default().to_string()
}

fn pair_roles(w: &World, host: &Host, provider: &str) -> Vec<(String, String)> {
    let p = admin_in_json(w, host, provider, &["provider", "pair"]);
    p["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().into(), m["role"].as_str().unwrap().into()))
        .collect()
}

/// How the active member of a pair goes away.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loss {
    /// A crash or power loss.
    Kill9,
    /// A planned stop (systemd's): it must be no worse than a crash.
    Term,
}

#[test]
fn the_pair_survives_kill_9_of_its_active_under_admin_writes_and_agent_checks() {
    pair_survives_the_loss_of_its_active(Loss::Kill9);
}

/// A planned stop hands over faster than a crash: the active ends its push streams, lets
/// requests in flight finish, lets go of the store and exits within its grace (2 s), and the
/// standby takes over within 3 s of the signal.
#[test]
fn a_sigterm_on_the_active_hands_the_pair_to_the_standby_within_seconds() {
    pair_survives_the_loss_of_its_active(Loss::Term);
}

fn pair_survives_the_loss_of_its_active(how: Loss) {
    let w = World::new();
    let mut lab = Lab::new();
    let (ha, hb, ops) = (lab.host("pa", true), lab.host("pb", true), lab.host("ops", false));
    let (m1, m2) = (lab.host("m1", false), lab.host("m2", false));
    let store = w.path("shared-store");
    let store = store.to_str().unwrap();
    let mut a = provider_on(&w, &lab, &ha, "centre-a", store, &[]);
    let _b = provider_on(&w, &lab, &hb, "centre-b", store, &[]);
    let (aurl, burl) = (url(&ha.lan), url(&hb.lan));
    wait_until("B to be standby", T, || pair_roles(&w, &ops, &burl).contains(&("centre-b".into(), "standby".into())));
    assert!(pair_roles(&w, &ops, &aurl).contains(&("centre-a".into(), "active".into())));

    let v1 = publish_in(&w, &ops, &burl, &w.package("editor", "1.0.0.0", &w.key));
    let both = format!("{aurl},{burl}");
    let _a1 = agent_on(&w, &m1, "m1", &["--provider", &both, "--min-interval", "1"]);
    let _a2 = agent_on(&w, &m2, "m2", &["--provider", &both, "--min-interval", "1"]);
    wait_until("both agents on v1", T, || {
        w.installed("m1", "editor").as_deref() == Some("1.0.0.0")
            && w.installed("m2", "editor").as_deref() == Some("1.0.0.0")
    });

    // A steady stream of admin writes, alternating between the two members' addresses.
    // Each acknowledged write, with when it was sent.
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, ops, urls) = (acked.clone(), stop.clone(), ops.clone(), [aurl.clone(), burl.clone()]);
        let env = w.tls_env(updraft_tests::ADMIN, "admin", &[]);
        std::thread::spawn(move || {
            let mut refused = 0;
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    return refused;
                }
                let name = format!("w{i}");
                let started = Instant::now();
                let mut cmd = command_in(&ops, "admin-cli");
                cmd.envs(env.clone()).args(["--provider", &urls[i % 2], "group", "create", &name]);
                let out = cmd.output().unwrap();
                if out.status.success() {
                    acked.lock().unwrap().push((name, started));
                } else {
                    refused += 1;
                }
            }
            refused
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let before = acked.lock().unwrap().len();
    let killed = Instant::now();
    match how {
        Loss::Kill9 => a.kill9(),
        Loss::Term => {
            a.term();
            assert!(a.wait_exit(Duration::from_secs(3)), "the active did not exit within its grace\n{}", a.log_text());
            eprintln!("pair: the active exited {:?} after SIGTERM", killed.elapsed());
        }
    }
    wait_until("a write sent after the kill to be acknowledged", T, || {
        acked.lock().unwrap().iter().any(|(_, t)| *t > killed)
    });
    // An upper bound on the takeover: the first write sent after the kill that was acknowledged
    // was sent this long after it.
    let takeover = acked.lock().unwrap().iter().find(|(_, t)| *t > killed).map(|(_, t)| *t - killed).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let refused = writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "pair ({how:?}): {} writes acknowledged ({before} before the loss), {refused} refused; first acknowledged write sent {takeover:?} after it",
        acked.len()
    );
    let bound = if how == Loss::Term { Duration::from_secs(3) } else { Duration::from_secs(10) };
    assert!(takeover < bound, "{how:?}: the standby took {takeover:?} to take over");

    // Every acknowledged write is in the store the standby now holds.
    let groups = admin_in_json(&w, &ops, &burl, &["group", "list"]);
    let names: Vec<&str> = groups.as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    for (g, _) in &acked {
        assert!(names.contains(&g.as_str()), "acknowledged group {g} was lost");
    }
    assert_eq!(admin_in_json(&w, &ops, &burl, &["provider", "pair"])["active"], "centre-b");

    // Agents carry on through B: a new version reaches both.
    let v2 = publish_in(&w, &ops, &burl, &w.package("editor", "2.0.0.0", &w.key));
    // A version is live on disk a moment before the check that installed it records its
    // provider: wait for both.
    wait_until("both agents on v2 through B", T, || {
        w.installed("m1", "editor").as_deref() == Some("2.0.0.0")
            && w.installed("m2", "editor").as_deref() == Some("2.0.0.0")
            && last_provider(&w, "m1") == burl
    });
    assert_ne!(v1, v2);

    // The former active comes back as standby: the store stays with B, at a higher epoch.
    let _a_again = provider_on(&w, &lab, &ha, "centre-a", store, &[]);
    wait_until("A back as standby", T, || pair_roles(&w, &ops, &burl).contains(&("centre-a".into(), "standby".into())));
    let pair = admin_in_json(&w, &ops, &aurl, &["provider", "pair"]);
    assert_eq!(pair["active"], "centre-b", "{pair}");
    assert_eq!(pair["epoch"], 2, "{pair}");
}

#[test]
fn agents_move_to_the_standby_when_the_active_is_cut_off_their_network() {
    let w = World::new();
    let mut lab = Lab::new();
    let (ha, hb, ops) = (lab.host("pa", true), lab.host("pb", true), lab.host("ops", false));
    let m1 = lab.host("m1", false);
    let store = w.path("shared-store");
    let store = store.to_str().unwrap();
    let _a = provider_on(&w, &lab, &ha, "centre-a", store, &[]);
    let _b = provider_on(&w, &lab, &hb, "centre-b", store, &[]);
    let (aurl, burl) = (url(&ha.lan), url(&hb.lan));
    wait_until("B to be standby", T, || pair_roles(&w, &ops, &burl).contains(&("centre-b".into(), "standby".into())));
    publish_in(&w, &ops, &aurl, &w.package("editor", "1.0.0.0", &w.key));
    let both = format!("{aurl},{burl}");
    let _agent = agent_on(&w, &m1, "m1", &["--provider", &both, "--min-interval", "1"]);
    wait_until("v1 through A", T, || {
        w.installed("m1", "editor").as_deref() == Some("1.0.0.0") && last_provider(&w, "m1") == aurl
    });

    lab.cut_lan(&ha);
    // Settings entered on the standby reach the active over the back network.
    publish_in(&w, &ops, &burl, &w.package("editor", "2.0.0.0", &w.key));
    wait_until("v2 through B", T, || {
        w.installed("m1", "editor").as_deref() == Some("2.0.0.0") && last_provider(&w, "m1") == burl
    });
    let pair = admin_in_json(&w, &ops, &burl, &["provider", "pair"]);
    assert_eq!(pair["active"], "centre-a", "A still holds the store: {pair}");
    let providers = agent_json(&w, "m1", &["providers"]);
    let a_entry = providers.as_array().unwrap().iter().find(|p| p["url"] == aurl.as_str()).unwrap().clone();
    assert!(a_entry["last_error"].is_string(), "A should be backing off: {providers}");
}

#[test]
fn agents_discover_providers_with_their_key_and_ignore_the_others() {
    let w = World::new();
    let mut lab = Lab::new();
    let (hp, hl, hs, ops) =
        (lab.host("prod", false), lab.host("lab", false), lab.host("site", false), lab.host("ops", false));
    let (m1, m2) = (lab.host("m1", false), lab.host("m2", false));
    let (prod_store, lab_store) = (w.path("prod"), w.path("labstore"));
    let _prod = provider_on(&w, &lab, &hp, "centre", prod_store.to_str().unwrap(), &[]);
    let _labp = provider_on(&w, &lab, &hl, "lab-centre", lab_store.to_str().unwrap(), &[]);
    let (purl, lurl) = (url(&hp.lan), url(&hl.lan));
    let site_store = w.path("site-store");
    let listen = format!("0.0.0.0:{PORT}");
    let mut site = command_in(&hs, "remote-provider");
    site.args(["--upstream", &purl, "--store", site_store.to_str().unwrap(), "--listen", &listen, "--name", "site-a"])
        .envs(w.env_for("site-a", "remote-provider", &[&hs.lan]));
    let _site = Proc::spawn(w.dir.path(), "site-a", site);
    lab.wait_port(&hs, &hs.lan, PORT);
    publish_in(&w, &ops, &purl, &w.package("editor", "1.0.0.0", &w.key));
    publish_in(&w, &ops, &lurl, &w.package("editor", "9.0.0.0", &w.key));

    let _a1 = agent_on(&w, &m1, "m1", &["--discover", "--min-interval", "2"]);
    let _a2 = agent_on(&w, &m2, "m2", &["--discovery-key", "Lab", "--min-interval", "2"]);
    // Discovery is off until an admin turns it on: nothing is announced, nothing found.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent_json(&w, "m1", &["providers"]).as_array().unwrap().len(), 0);
    assert_eq!(admin_in_ok(&w, &ops, &purl, &["discovery", "status"]).trim(), "discovery off");

    admin_in_ok(&w, &ops, &purl, &["discovery", "on"]);
    admin_in_ok(&w, &ops, &lurl, &["discovery", "on", "--key", "Lab"]);
    let names = |agent: &str| -> Vec<String> {
        let list = agent_json(&w, agent, &["providers"]);
        list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect()
    };
    // The site learns the setting from the centre's change log and announces itself too.
    wait_until("m1 to discover the centre and its site", T, || {
        let n = names("m1");
        n.contains(&"centre".to_string()) && n.contains(&"site-a".to_string())
    });
    wait_until("m2 to discover the lab provider", T, || names("m2").contains(&"lab-centre".to_string()));
    wait_until("both agents to install from their own providers", T, || {
        w.installed("m1", "editor").as_deref() == Some("1.0.0.0")
            && w.installed("m2", "editor").as_deref() == Some("9.0.0.0")
    });
    let m1_list = agent_json(&w, "m1", &["providers"]);
    assert!(!names("m1").contains(&"lab-centre".to_string()), "m1 took a provider with another key: {m1_list}");
    assert!(!names("m2").contains(&"centre".to_string()));
    // A site's provider comes before the centre.
    assert_eq!(m1_list[0]["name"], "site-a", "{m1_list}");
    assert_eq!(m1_list[0]["source"], "discovered");
    assert_eq!(m1_list[0]["role"], "remote");
    let tested = agent_json(&w, "m1", &["providers", "test", "centre"]);
    assert_eq!(tested["served_by"], "centre", "{tested}");
    let unknown = w.agent_cmd("m1", &["providers", "test", "lab-centre"]);
    assert!(!unknown.status.success());

    // Turned off, the announcements are withdrawn and the agents forget them.
    admin_in_ok(&w, &ops, &purl, &["discovery", "off"]);
    wait_until("m1 to forget the withdrawn providers", T, || names("m1").is_empty());
}

/// The fencing epoch, on loopback: a provider whose store was taken over behind its back (as a
/// shared file system that loses locks would allow) acknowledges nothing more and stops.
#[test]
fn a_superseded_active_cannot_commit_and_steps_down() {
    let w = World::new();
    let (mut p, url) = w.provider("centre", true);
    w.admin_ok(&url, &["group", "create", "before"]);
    let epoch_file = w.path("centre/pair/epoch");
    assert_eq!(std::fs::read_to_string(&epoch_file).unwrap().trim(), "1");
    // Another provider took over: the epoch in the store moved on.
    std::fs::write(&epoch_file, "2").unwrap();
    let out = w.admin(&url, &["group", "create", "after"]);
    assert!(!out.status.success(), "a superseded provider acknowledged a write");
    let err = updraft_tests::stderr(&out);
    assert!(err.contains("superseded") && err.contains("epoch 1"), "{err}");
    assert!(p.wait_exit(Duration::from_secs(10)), "the superseded provider kept running");
    assert!(p.log_text().contains("superseded"), "{}", p.log_text());

    let _again = p.again();
    let groups = w.admin_json(&url, &["group", "list"]);
    let names: Vec<&str> = groups.as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"before") && !names.contains(&"after"), "{names:?}");
    assert_eq!(std::fs::read_to_string(&epoch_file).unwrap().trim(), "3");
}

/// Store management with the provider binary: a store moved to a new location keeps its
/// catalog, groups and machines, and the old location refuses to start; a separate store
/// merged into it brings its machines along.
#[test]
fn stores_move_and_merge_with_the_provider_binary() {
    let w = World::new();
    let (mut one, url, id, mut m1) = w.provider_with_a_store("one");
    let (mut other, other_url) = w.provider("other", true);
    let mut m2 = w.agent("m2", &other_url);
    wait_until("m2 known to the other provider", T, || {
        w.admin_json(&other_url, &["machine", "list"]).as_array().unwrap().iter().any(|m| m["name"] == "m2")
    });
    for p in [&mut m1, &mut m2, &mut one, &mut other] {
        p.kill9();
    }

    let provider = updraft_tests::provider_cmd;
    let (from, to, sep) = (w.path("one"), w.path("two"), w.path("other"));
    let (ok, text) = provider(&["store", "move", "--from", from.to_str().unwrap(), "--to", to.to_str().unwrap()]);
    assert!(ok, "{text}");
    let (ok, text) = provider(&["store", "merge", "--from", sep.to_str().unwrap(), "--into", to.to_str().unwrap()]);
    assert!(ok && text.contains("\"machines_added\": 1"), "{text}");
    let (ok, text) = provider(&["--store", from.to_str().unwrap(), "--listen", "127.0.0.1:0", "--insecure"]);
    assert!(!ok && text.contains("was moved to"), "{text}");

    let _two = w.restart_provider("two", &url);
    assert_eq!(w.admin_json(&url, &["update", "show", &id])["id"], id.as_str());
    let groups = w.admin_json(&url, &["group", "list"]);
    assert!(groups.as_array().unwrap().iter().any(|g| g["name"] == "lab"), "{groups}");
    let machines = w.admin_json(&url, &["machine", "list"]);
    let names: Vec<&str> = machines.as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"m1") && names.contains(&"m2"), "{names:?}");
}

/// A provider server behind a reverse proxy (a real nginx, passing `/updraft/...` to the
/// provider): a group assigned to it sends its machines' checks and downloads through it.
#[test]
fn a_group_assigned_to_a_provider_behind_a_reverse_proxy_goes_through_it() {
    // nginx here proxies plaintext HTTP/2; a proxy that terminates TLS would present its own
    // certificate to the provider, so with mutual TLS a proxy passes TLS through instead.
    let w = World::insecure();
    let (_p, url) = w.provider("centre", true);
    let port = url.rsplit(':').next().unwrap();
    let proxy_port = updraft_tests::free_port();
    let _nginx = nginx(&w, proxy_port, port);
    let proxy_port = proxy_port.to_string();
    w.admin_ok(
        &url,
        &["provider", "add", "proxy", "--address", "127.0.0.1", "--port", &proxy_port, "--path", "/updraft"],
    );
    let listed = w.admin_json(&url, &["provider", "list"]);
    assert_eq!(listed[0]["path"], "/updraft", "{listed}");
    let bad = w.admin(&url, &["group", "create", "lab", "--providers", "nosuch"]);
    assert!(updraft_tests::stderr(&bad).contains("neither a URL nor a provider server"));
    w.admin_ok(&url, &["group", "create", "lab", "--providers", "proxy"]);
    let removed = w.admin(&url, &["provider", "remove", "proxy"]);
    assert!(updraft_tests::stderr(&removed).contains("assigned to group(s) lab"));

    let _m1 = w.agent("m1", &url);
    wait_until("m1 known", T, || {
        w.admin_json(&url, &["machine", "list"]).as_array().unwrap().iter().any(|m| m["name"] == "m1")
    });
    w.admin_ok(&url, &["group", "assign", "lab", "m1"]);
    let via_proxy = format!("http://127.0.0.1:{proxy_port}/updraft");
    wait_until("m1 to learn its assigned provider", T, || {
        w.agent_cmd("m1", &["check"]).status.success() && last_provider(&w, "m1") == via_proxy
    });
    w.publish(&url, &w.package("editor", "1.0.0.0", &w.key));
    w.admin_ok(&url, &["deploy", "editor", "--group", "lab"]);
    let out = w.agent_cmd("m1", &["check"]);
    assert!(out.status.success(), "{}", updraft_tests::stderr(&out));
    assert_eq!(w.installed("m1", "editor").as_deref(), Some("1.0.0.0"));
    let log = std::fs::read_to_string(w.path("nginx/access.log")).unwrap();
    assert!(log.contains("/updraft/updraft.v1.AgentApi/Check"), "{log}");
    assert!(log.contains("/updraft/updraft.v1.AgentApi/Download"), "{log}");
}

/// nginx as a gRPC reverse proxy on `port`: `/updraft/X` goes to `127.0.0.1:upstream/X`.
fn nginx(w: &World, port: u16, upstream: &str) -> Proc {
    let dir = w.path("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen 127.0.0.1:{port} http2;\n    location /updraft/ {{\n\
               rewrite ^/updraft/(.*)$ /$1 break;\n      grpc_pass grpc://127.0.0.1:{upstream};\n    }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| std::path::Path::new(p).exists());
    let nginx = nginx.expect("nginx is needed for the reverse-proxy test (apt-get install nginx-light; .ci/run does)");
    let mut cmd = std::process::Command::new(nginx);
    cmd.arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(&dir);
    let p = Proc::spawn(w.dir.path(), "nginx", cmd);
    updraft_tests::wait_port(port);
    p
}
