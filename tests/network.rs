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

/// A steady stream of admin writes (`group create wN`) from `ops`, alternating between
/// providers, each acknowledged one kept with when it was sent.
struct AdminWrites {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl AdminWrites {
    fn start(w: &World, ops: &Host, urls: [String; 2]) -> AdminWrites {
        let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (acked2, stop2, ops) = (acked.clone(), stop.clone(), ops.clone());
        let env = w.tls_env(updraft_tests::ADMIN, "admin", &[]);
        let thread = std::thread::spawn(move || {
            let mut refused = 0;
            for i in 0.. {
                if stop2.load(Ordering::SeqCst) {
                    return refused;
                }
                let name = format!("w{i}");
                let started = Instant::now();
                let mut cmd = command_in(&ops, "admin-cli");
                cmd.envs(env.clone()).args(["--provider", &urls[i % 2], "group", "create", &name]);
                if updraft_tests::output(&mut cmd).status.success() {
                    acked2.lock().unwrap().push((name, started));
                } else {
                    refused += 1;
                }
            }
            refused
        });
        AdminWrites { acked, stop, thread }
    }

    fn acked(&self) -> Vec<(String, Instant)> {
        self.acked.lock().unwrap().clone()
    }

    /// Waits for a write sent after `t` to be acknowledged; how long after `t` it was sent (an
    /// upper bound on the time to serve writes again).
    fn first_acked_after(&self, t: Instant) -> Duration {
        wait_until("a write sent after the loss to be acknowledged", T, || self.acked().iter().any(|(_, s)| *s > t));
        self.acked().iter().find(|(_, s)| *s > t).map(|(_, s)| *s - t).unwrap()
    }

    /// Stops the writes: every acknowledged one, and how many were refused.
    fn finish(self) -> (Vec<(String, Instant)>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let refused = self.thread.join().unwrap();
        let acked = self.acked.lock().unwrap().clone();
        (acked, refused)
    }
}

/// Every acknowledged write's group is listed by `provider`, once.
fn assert_each_once(w: &World, ops: &Host, provider: &str, acked: &[(String, Instant)]) {
    let groups = admin_in_json(w, ops, provider, &["group", "list"]);
    let names: Vec<&str> = groups.as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    for (g, _) in acked {
        assert_eq!(names.iter().filter(|n| **n == g).count(), 1, "acknowledged group {g} lost or doubled: {names:?}");
    }
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
    let writes = AdminWrites::start(&w, &ops, [aurl.clone(), burl.clone()]);
    std::thread::sleep(Duration::from_secs(3));
    let before = writes.acked().len();
    let killed = Instant::now();
    match how {
        Loss::Kill9 => a.kill9(),
        Loss::Term => {
            a.term();
            assert!(a.wait_exit(Duration::from_secs(3)), "the active did not exit within its grace\n{}", a.log_text());
            eprintln!("pair: the active exited {:?} after SIGTERM", killed.elapsed());
        }
    }
    let takeover = writes.first_acked_after(killed);
    std::thread::sleep(Duration::from_secs(3));
    let (acked, refused) = writes.finish();
    eprintln!(
        "pair ({how:?}): {} writes acknowledged ({before} before the loss), {refused} refused; first acknowledged write sent {takeover:?} after it",
        acked.len()
    );
    let bound = if how == Loss::Term { Duration::from_secs(3) } else { Duration::from_secs(10) };
    assert!(takeover < bound, "{how:?}: the standby took {takeover:?} to take over");

    // Every acknowledged write is in the store the standby now holds.
    assert_each_once(&w, &ops, &burl, &acked);
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
    let p = Proc::spawn_group(w.dir.path(), "nginx", cmd);
    updraft_tests::wait_port(port);
    p
}

/// Two providers on two hosts share a PostgreSQL database on a third (over the back network);
/// agents and a site use both. A mark made through one reaches an agent subscribed to the
/// other; `kill -9` of one under a steady stream of admin writes and checks loses no
/// acknowledged write and leaves every agent served by the other; a provider cut off from the
/// database stops acknowledging writes and reports NOT_SERVING within seconds.
#[test]
fn providers_on_two_hosts_share_a_database_on_a_third() {
    let w = World::new();
    let mut lab = Lab::new();
    let (hdb, ha, hb) = (lab.host("db", true), lab.host("pa", true), lab.host("pb", true));
    let (ops, hs) = (lab.host("ops", false), lab.host("site", false));
    let (m1, m2, m3) = (lab.host("m1", false), lab.host("m2", false), lab.host("m3", false));
    // Declared after the lab: dropped (stopped) before its namespaces go.
    let cluster = updraft_pgtest::Cluster::start_in(&hdb.ns, hdb.back.as_deref().unwrap());
    cluster.database("updraft");
    let db = cluster.tcp_url("updraft");
    // Content locations per host: what one imports, the other fetches on demand.
    let on_db = |host: &Host, name: &str| {
        let content = w.path(&format!("{name}-content"));
        let extra = ["--content", content.to_str().unwrap(), "--metrics-listen", "0.0.0.0:9093"];
        provider_on(&w, &lab, host, name, &db, &extra)
    };
    let mut a = on_db(&ha, "centre-a");
    let _b = on_db(&hb, "centre-b");
    let (aurl, burl) = (url(&ha.lan), url(&hb.lan));

    let v1 = publish_in(&w, &ops, &aurl, &w.package("editor", "1.0.0.0", &w.key));
    let site_store = w.path("site-store");
    let mut site = command_in(&hs, "remote-provider");
    let listen = format!("0.0.0.0:{PORT}");
    site.args(["--upstream", &format!("{aurl},{burl}"), "--store", site_store.to_str().unwrap()])
        .args(["--listen", &listen, "--name", "site-a"])
        .envs(w.env_for("site-a", "remote-provider", &[&hs.lan]));
    let _site = Proc::spawn(w.dir.path(), "site-a", site);
    lab.wait_port(&hs, &hs.lan, PORT);
    let (ab, ba) = (format!("{aurl},{burl}"), format!("{burl},{aurl}"));
    let _a1 = agent_on(&w, &m1, "m1", &["--provider", &ab, "--min-interval", "1"]);
    // m2 checks once an hour: what reaches it after its first check comes through its push stream.
    let a2 = agent_on(&w, &m2, "m2", &["--provider", &ba, "--min-interval", "3600"]);
    let _a3 = agent_on(&w, &m3, "m3", &["--provider", &url(&hs.lan), "--min-interval", "1"]);
    wait_until("three agents on v1, m2's push stream open", T, || {
        ["m1", "m2", "m3"].iter().all(|m| w.installed(m, "editor").as_deref() == Some("1.0.0.0"))
            && a2.log_text().contains("push stream open")
    });

    // A fix published and marked high priority through A reaches m2 through B's push stream.
    let v2 = publish_in(&w, &ops, &aurl, &w.package("editor", "2.0.0.0", &w.key));
    let marked = Instant::now();
    admin_in_ok(&w, &ops, &aurl, &["update", "priority", &v2, "high"]);
    wait_until("the fix pushed to m2 through B", Duration::from_secs(20), || {
        w.installed("m2", "editor").as_deref() == Some("2.0.0.0")
    });
    eprintln!("database: a mark made on A installed on B's agent {:?} later", marked.elapsed());
    assert_eq!(last_provider(&w, "m2"), burl);

    // kill -9 of A under a steady stream of admin writes to both and checks every second.
    let writes = AdminWrites::start(&w, &ops, [aurl.clone(), burl.clone()]);
    std::thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    a.kill9();
    let served = writes.first_acked_after(killed);
    std::thread::sleep(Duration::from_secs(2));
    let (acked, refused) = writes.finish();
    eprintln!(
        "database: {} writes acknowledged, {refused} refused; one acknowledged {served:?} after the kill",
        acked.len()
    );
    assert_each_once(&w, &ops, &burl, &acked);
    // Both providers appended to one audit chain, which holds.
    admin_in_ok(&w, &ops, &burl, &["audit", "verify"]);
    // Every agent carries on through B, the site's directly and through the site.
    let v3 = publish_in(&w, &ops, &burl, &w.package("editor", "3.0.0.0", &w.key));
    wait_until("m1 and m3 on v3 with A gone", T, || {
        ["m1", "m3"].iter().all(|m| w.installed(m, "editor").as_deref() == Some("3.0.0.0"))
            && last_provider(&w, "m1") == burl
    });
    assert!(v1 != v2 && v2 != v3);

    // A again, then cut off from the database: it reports NOT_SERVING (gRPC health and its
    // readiness probe) and refuses writes, within seconds; B acknowledges them.
    let _a_again = on_db(&ha, "centre-a");
    let health = |u: &str| updraft_tests::output(&mut admin_cmd(&w, &ops, u, &["provider", "health"])).status.code();
    wait_until("A serving again", T, || health(&aurl) == Some(0));
    let ready = || {
        let probe = format!("http://{}:9093/readyz", ha.lan);
        let out = updraft_tests::output(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &ops.ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &probe,
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(ready(), "200");
    let cut = Instant::now();
    lab.cut_back(&ha);
    wait_until("A to report NOT_SERVING", T, || health(&aurl) == Some(3));
    eprintln!("database: A reported NOT_SERVING {:?} after its cut", cut.elapsed());
    assert!(cut.elapsed() < Duration::from_secs(15), "NOT_SERVING took {:?}", cut.elapsed());
    assert_eq!(ready(), "503");
    let refused = updraft_tests::output(&mut admin_cmd(&w, &ops, &aurl, &["group", "create", "while-cut-off"]));
    assert!(!refused.status.success(), "a provider without its database acknowledged a write");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("database"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    admin_in_ok(&w, &ops, &burl, &["group", "create", "through-b"]);
    let groups = admin_in_json(&w, &ops, &burl, &["group", "list"]);
    assert!(!groups.as_array().unwrap().iter().any(|g| g["name"] == "while-cut-off"), "{groups}");
    assert_eq!(health(&burl), Some(0));
}
