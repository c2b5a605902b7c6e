//! Certificates that never strand a fleet: hosts enroll with their own keys (join tokens, or an
//! administrator's approval), short-lived certificates renew themselves under load, and a
//! revocation takes effect at the provider at once and at a site within one catalog round.
use std::path::Path;
use std::time::Duration;

use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::{CheckRequest, MachineInfo, SubscribeRequest};
use updraft_runtime::tls::{Paths, Tls, Transport};
use updraft_tests::{World, stderr, wait_until};

use super::T;

/// A check sent straight to `url` with the credentials enrollment left in `dir`, as machine
/// `name`: Ok, or why it was refused.
fn check_with(dir: &Path, url: &str, name: &str) -> Result<(), String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Transport::Tls(Tls::load(Paths::enrolled(dir)).map_err(|e| e.to_string())?);
        let ch = updraft_tests::channel(t.endpoint(url).map_err(|e| e.to_string())?).await?;
        let req = CheckRequest {
            machine: Some(MachineInfo { name: name.into(), ..Default::default() }),
            ..Default::default()
        };
        AgentApiClient::new(ch).check(req).await.map(drop).map_err(|s| updraft_runtime::tls::describe(&s))
    })
}

/// A push stream held open with the credentials in `dir`, as machine `name`, once its first
/// event has arrived.
struct Push {
    rt: tokio::runtime::Runtime,
    stream: tonic::Streaming<updraft_proto::v1::PushEvent>,
}

impl Push {
    fn open(dir: &Path, url: &str, name: &str) -> Push {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stream = rt.block_on(async {
            let t = Transport::Tls(Tls::load(Paths::enrolled(dir)).unwrap());
            let ch = updraft_tests::channel(t.endpoint(url).unwrap()).await.unwrap();
            let req = SubscribeRequest { machine: name.into(), last_seen_seq: 0 };
            let opened = async {
                let mut s = AgentApiClient::new(ch).subscribe(req).await.unwrap().into_inner();
                s.message().await.unwrap().expect("the stream's first event");
                s
            };
            tokio::time::timeout(T, opened).await.expect("the push stream's first event within T")
        });
        Push { rt, stream }
    }

    /// Whether the stream ends (closed, or broken) within `within`.
    fn ends_within(mut self, within: Duration) -> bool {
        let stream = &mut self.stream;
        self.rt.block_on(async {
            tokio::time::timeout(within, async { while let Ok(Some(_)) = stream.message().await {} }).await.is_ok()
        })
    }
}

fn token(w: &World, url: &str, args: &[&str]) -> String {
    let mut all = vec!["pki", "token"];
    all.extend_from_slice(args);
    let t = w.admin_json(url, &all);
    t["token"].as_str().unwrap().to_string()
}

/// Certificates issued to `name`, as `pki list` shows them.
fn issued(w: &World, url: &str, name: &str) -> Vec<serde_json::Value> {
    let l = w.admin_json(url, &["pki", "list", "--expired"]);
    l["certificates"].as_array().unwrap().iter().filter(|c| c["name"] == name).cloned().collect()
}

#[test]
fn hosts_enroll_with_their_own_keys_renew_under_load_and_a_revocation_holds_everywhere() {
    let w = World::new();
    let pki = w.path("pki");
    // Certificates of ten seconds: each renewed after about five, twice within the test.
    let trust = w.pubkey.to_str().unwrap();
    let pki_args = ["--trust-key", trust, "--pki-dir", pki.to_str().unwrap(), "--cert-lifetime", "10s"];
    let (_p, url) = w.provider_with("centre", &pki_args);
    w.admin_ok(&url, &["group", "create", "lab"]);
    w.admin_ok(&url, &["deploy", "editor", "--group", "lab"]);

    // An agent enrolls with a token naming it; the token is then used up.
    let t1 = token(&w, &url, &["--role", "agent", "--name", "pc-1", "--group", "lab"]);
    let out = w.enroll_agent("pc-1", &url, &["--token", &t1]);
    assert!(out.status.success(), "enroll: {}", stderr(&out));
    let tls1 = w.state("pc-1").join("tls");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tls1.join("identity.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key stays the host's alone");
    let again = w.enroll_agent("pc-9", &url, &["--token", &t1, "--name", "pc-9"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("unknown, used up or expired"), "{}", stderr(&again));
    // An expired token is refused too.
    let short = token(&w, &url, &["--role", "agent", "--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let late = w.enroll_agent("pc-8", &url, &["--token", &short, "--name", "pc-8"]);
    assert!(stderr(&late).contains("unknown, used up or expired"), "{}", stderr(&late));

    // A site enrolls with a token for its role; an agent behind it enrolls through it.
    let ts = token(&w, &url, &["--role", "remote-provider"]);
    let out = w.enroll_remote("site-b", &url, &["--token", &ts, "--san", "localhost,127.0.0.1"]);
    assert!(out.status.success(), "site enroll: {}", stderr(&out));
    let (_site, surl) = w.enrolled_remote("site-b", &url);
    w.wait_site_caught_up(&surl, &url);
    let t2 = token(&w, &url, &["--role", "agent", "--uses", "2"]);
    let out = w.enroll_agent("pc-2", &surl, &["--token", &t2, "--name", "pc-2"]);
    assert!(out.status.success(), "enroll through the site: {}", stderr(&out));

    // Without a token, the request waits for an administrator.
    let waiting = w.enroll_agent("pc-3", &url, &["--name", "pc-3", "--wait", "0s"]);
    assert!(!waiting.status.success());
    assert!(stderr(&waiting).contains("pki approve pc-3"), "{}", stderr(&waiting));
    let l = w.admin_json(&url, &["pki", "list"]);
    assert_eq!(l["pending"][0]["name"], "pc-3", "{l}");
    w.admin_ok(&url, &["pki", "approve", "pc-3"]);
    let collected = w.enroll_agent("pc-3", &url, &["--name", "pc-3", "--wait", "0s"]);
    assert!(collected.status.success(), "{}", stderr(&collected));
    assert!(check_with(&w.state("pc-3").join("tls"), &url, "pc-3").is_ok());

    // The agents run on what enrollment wrote, and keep checking while every certificate of
    // theirs (and the site's) is renewed twice over: no check may fail.
    let v1 = w.publish(&url, &w.package("editor", "1.0.0.0", &w.key));
    let _a1 = w.enrolled_agent("pc-1", &url, &["--min-interval", "3600"]);
    w.wait_site_has(&surl, &v1);
    let a2 = w.enrolled_agent("pc-2", &surl, &["--min-interval", "3600"]);
    wait_until("both installed", T, || {
        w.installed("pc-1", "editor").as_deref() == Some("1.0.0.0")
            && w.installed("pc-2", "editor").as_deref() == Some("1.0.0.0")
    });
    // The token's group is the machine's.
    let lab = w.admin_json(&url, &["group", "show", "lab"]);
    assert!(lab["members"].to_string().contains("pc-1"), "{lab}");
    let mut checks = 0;
    wait_until("pc-1, pc-2 and site-b renewed twice over", Duration::from_secs(90), || {
        for agent in ["pc-1", "pc-2"] {
            let out = w.agent_cmd(agent, &["check"]);
            assert!(out.status.success(), "a check of {agent} failed during renewals: {}", stderr(&out));
            checks += 1;
        }
        ["pc-1", "pc-2", "site-b"].iter().all(|n| issued(&w, &url, n).len() >= 4)
    });
    eprintln!("{checks} checks, all answered, while certificates renewed");
    // What the agents hold now is the newest, and the first has expired by now.
    let newest = |name: &str| {
        let mut c = issued(&w, &url, name);
        c.sort_by_key(|c| c["not_after"].as_str().unwrap().to_string());
        c.last().unwrap()["serial"].as_str().unwrap().to_string()
    };
    let held = updraft_runtime::tls::Tls::load(Paths::enrolled(&tls1)).unwrap().current().serial.clone();
    assert_eq!(held, newest("pc-1"), "pc-1 holds its newest certificate");
    assert!(issued(&w, &url, "pc-1").iter().any(|c| c["expires_in_secs"].as_i64().unwrap() <= 0));
    // The site forwarded pc-2's reports with its renewed certificate all along.
    let ms = w.admin_json(&url, &["machine", "list"]);
    let pc2 = ms.as_array().unwrap().iter().find(|m| m["name"] == "pc-2").cloned();
    assert!(pc2.is_some(), "{ms}");

    // Revocation: pc-1 is refused at the provider at once; pc-2 at the site within one round,
    // and the push stream it holds open there is closed. (Its agent stops first: one push
    // stream per machine, and this test holds pc-2's.)
    let tls2 = w.state("pc-2").join("tls");
    assert!(check_with(&tls2, &surl, "pc-2").is_ok());
    drop(a2);
    let push = Push::open(&tls2, &surl, "pc-2");
    w.admin_ok(&url, &["pki", "revoke", "pc-1"]);
    let refused = check_with(&tls1, &url, "pc-1").unwrap_err();
    eprintln!("revoked pc-1 at the provider: {refused}");
    w.admin_ok(&url, &["pki", "revoke", "pc-2"]);
    assert!(push.ends_within(T), "the revoked agent's open push stream at the site was not closed");
    wait_until("the site refuses revoked pc-2", T, || check_with(&tls2, &surl, "pc-2").is_err());
    // Others are untouched: the site, on its renewed certificate, still follows the centre.
    let v2 = w.publish(&url, &w.package("editor", "2.0.0.0", &w.key));
    w.wait_site_has(&surl, &v2);
    let l = w.admin_json(&url, &["pki", "list"]);
    let revoked: Vec<&serde_json::Value> =
        l["certificates"].as_array().unwrap().iter().filter(|c| c["revoked"] != "").collect();
    assert!(revoked.iter().any(|c| c["name"] == "pc-1") && revoked.iter().any(|c| c["name"] == "pc-2"), "{l}");
    // The report calls out what certificates say: pc-1 revoked; pc-3, whose agent never ran to
    // renew it, expired.
    let pc1 = w.admin_json(&url, &["machine", "show", "pc-1"]).to_string();
    assert!(pc1.contains("its certificate was revoked"), "{pc1}");
    let pc3 = w.admin_json(&url, &["machine", "show", "pc-3"]).to_string();
    assert!(pc3.contains("its certificate has expired") && pc3.contains("\"error\""), "{pc3}");
}

/// CA certificates in a PEM file.
fn cas_in(path: &Path) -> usize {
    updraft_runtime::tls::pem_ders(&std::fs::read(path).unwrap_or_default()).len()
}

/// The CA (fingerprint) of `name`'s newest certificate.
fn newest_ca(w: &World, url: &str, name: &str) -> String {
    let mut c = issued(w, url, name);
    c.sort_by_key(|c| c["not_after"].as_str().unwrap().to_string());
    c.last().map(|c| c["ca"].as_str().unwrap().to_string()).unwrap_or_default()
}

#[test]
fn the_ca_rotates_with_agents_and_a_site_connected_throughout() {
    let w = World::new();
    let pki = w.path("pki");
    let trust = w.pubkey.to_str().unwrap();
    let pki_args = ["--trust-key", trust, "--pki-dir", pki.to_str().unwrap(), "--cert-lifetime", "10s"];
    let (_p, url) = w.provider_with("centre", &pki_args);
    let t = token(&w, &url, &["--role", "agent", "--uses", "2"]);
    let ts = token(&w, &url, &["--role", "remote-provider"]);
    assert!(w.enroll_remote("site-r", &url, &["--token", &ts]).status.success());
    let (_site, surl) = w.enrolled_remote("site-r", &url);
    w.wait_site_caught_up(&surl, &url);
    for (agent, at) in [("pc-a", &url), ("pc-b", &surl)] {
        let out = w.enroll_agent(agent, at, &["--token", &t, "--name", agent]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let _a = w.enrolled_agent("pc-a", &url, &["--min-interval", "3600"]);
    let _b = w.enrolled_agent("pc-b", &surl, &["--min-interval", "3600"]);
    let old_ca = newest_ca(&w, &url, "pc-a");
    // A machine on a certificate of the old CA, never renewed (issued by hand).
    let env = w.tls_env("pc-o", "agent", &[]);
    let old_machine = w.path("pc-o-tls");
    std::fs::create_dir_all(&old_machine).unwrap();
    for (var, file) in [("UPDRAFT_TLS_CERT", "identity.crt"), ("UPDRAFT_TLS_KEY", "identity.key")] {
        std::fs::copy(&env.iter().find(|(k, _)| k == var).unwrap().1, old_machine.join(file)).unwrap();
    }
    let ca_files =
        [w.state("pc-a").join("tls/ca.crt"), w.state("pc-b").join("tls/ca.crt"), w.path("site-r").join("tls/ca.crt")];
    // Every check of both agents, from here to the end, must be answered.
    let mut checks = 0;
    let mut check_all = |w: &World| {
        for agent in ["pc-a", "pc-b"] {
            let out = w.agent_cmd(agent, &["check"]);
            assert!(out.status.success(), "a check of {agent} failed during the rotation: {}", stderr(&out));
            checks += 1;
        }
    };
    let admin_dir = ["pki", "rotate", "--dir", pki.to_str().unwrap()];
    let rotate = |step: &str| {
        let mut args = admin_dir.to_vec();
        args.push(step);
        let out = updraft_tests::output(std::process::Command::new(updraft_tests::bin("admin-cli")).args(&args));
        assert!(out.status.success(), "rotate {step}: {}", stderr(&out));
    };

    // 1. A new CA is introduced: every host comes to trust both.
    rotate("--introduce");
    wait_until("every host trusts both CAs", Duration::from_secs(90), || {
        check_all(&w);
        ca_files.iter().all(|f| cas_in(f) == 2)
    });
    // 2. It is promoted: every certificate, the provider's own included, is re-issued by it.
    rotate("--promote");
    wait_until("every certificate re-issued by the new CA", Duration::from_secs(90), || {
        check_all(&w);
        ["pc-a", "pc-b", "site-r", "centre"].iter().all(|n| {
            let ca = newest_ca(&w, &url, n);
            !ca.is_empty() && ca != old_ca
        })
    });
    // Keep a certificate of the old CA: after retirement it must be refused.
    let old_admin = (pki.join("ops.crt"), pki.join("ops.key"));
    let kept = w.path("old-ops");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::copy(&old_admin.0, kept.join("identity.crt")).unwrap();
    std::fs::copy(&old_admin.1, kept.join("identity.key")).unwrap();
    std::fs::copy(pki.join("ca.crt"), kept.join("ca.crt")).unwrap();
    // The administrator's own certificate, from `pki issue`, is re-issued by the new CA too.
    std::fs::remove_file(&old_admin.0).unwrap();
    std::fs::remove_file(&old_admin.1).unwrap();
    w.tls_env(updraft_tests::ADMIN, "admin", &[]);
    w.admin_ok(&url, &["pki", "list"]);
    // pc-o holds a push stream open on its old-CA certificate (trusting both CAs, as hosts do by
    // now); retiring the old CA closes it.
    std::fs::copy(pki.join("ca.crt"), old_machine.join("ca.crt")).unwrap();
    let push = Push::open(&old_machine, &url, "pc-o");
    // 3. The old CA is retired: every host trusts the new one only.
    rotate("--retire");
    assert!(
        push.ends_within(Duration::from_secs(60)),
        "the open connection of an old-CA certificate outlived the CA's retirement"
    );
    wait_until("every host trusts the new CA only", Duration::from_secs(90), || {
        check_all(&w);
        ca_files.iter().all(|f| cas_in(f) == 1)
    });
    check_all(&w);
    eprintln!("{checks} checks answered through the rotation");
    let refused = check_with(&kept, &url, "ops");
    assert!(refused.is_err(), "a certificate of the retired CA is still accepted");
    // The site, too, only trusts the new CA, and still follows the centre.
    let v = w.publish(&url, &w.package("editor", "1.0.0.0", &w.key));
    w.wait_site_has(&surl, &v);
}

/// The value of the own-certificate expiry gauge in a server's `/metrics`.
fn own_expiry_secs(p: &mut updraft_tests::Proc) -> i64 {
    let (_, text) = updraft_tests::http_get(p.probe_addr(), "/metrics").unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("updraft_tls_certificate_expiry_seconds") && l.contains("certificate=\"own\""))
        .unwrap_or_else(|| panic!("no own-certificate expiry in {text}"));
    line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as i64
}

#[test]
fn a_provider_reloads_certificate_files_replaced_by_hand_on_sighup() {
    let w = World::new();
    let (mut p, url) = w.provider("centre", true);
    let before = own_expiry_secs(&mut p);
    assert!(before > 300 * 86_400, "a year's certificate: {before}");
    // The administrator issues a new certificate (2 days) and puts it in place of the old one.
    let pki = w.path("pki");
    let out = updraft_tests::output(std::process::Command::new(updraft_tests::bin("admin-cli")).args([
        "pki",
        "issue",
        "centre-2",
        "--role",
        "provider",
        "--days",
        "2",
        "--dir",
        pki.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::copy(pki.join("centre-2.crt"), pki.join("centre.crt")).unwrap();
    std::fs::copy(pki.join("centre-2.key"), pki.join("centre.key")).unwrap();
    // Nothing changes until it is told to reload.
    assert!(own_expiry_secs(&mut p) > 300 * 86_400);
    let pid = p.pid().unwrap();
    assert!(updraft_tests::signal(pid, libc::SIGHUP, false));
    wait_until("the new certificate in use", T, || own_expiry_secs(&mut p) < 3 * 86_400);
    // And it goes on serving with it.
    let ms = w.admin_json(&url, &["machine", "list"]);
    assert!(ms.is_array(), "{ms}");
    let log = p.log_text();
    assert!(log.contains("SIGHUP: TLS credentials reloaded"), "{log}");
}

#[test]
fn a_revoked_agent_is_refused_through_the_standby_too() {
    let w = World::new();
    let pki = w.path("pki");
    let (_p, url) = w.provider_with("centre", &["--pki-dir", pki.to_str().unwrap()]);
    let (_standby, surl) = w.pair_member("centre-b", "centre");
    let t = token(&w, &url, &["--role", "agent", "--name", "pc-s"]);
    let out = w.enroll_agent("pc-s", &url, &["--token", &t]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tls = w.state("pc-s").join("tls");
    // The standby knows no revocation list of its own; it forwards the caller's serial, and the
    // active refuses a revoked one.
    assert!(check_with(&tls, &surl, "pc-s").is_ok(), "through the standby");
    w.admin_ok(&url, &["pki", "revoke", "pc-s"]);
    let refused = check_with(&tls, &surl, "pc-s").unwrap_err();
    assert!(refused.contains("revoked"), "{refused}");
}

#[test]
fn a_standby_renews_its_own_certificate_at_the_active() {
    let w = World::new();
    let pki = w.path("pki");
    let (_p, url) = w.provider_with("centre", &["--pki-dir", pki.to_str().unwrap(), "--cert-lifetime", "10s"]);
    // The standby's certificate lasts 8 seconds: it goes on serving only if it renews.
    let out = updraft_tests::output(std::process::Command::new(updraft_tests::bin("admin-cli")).args([
        "pki",
        "issue",
        "centre-b",
        "--role",
        "provider",
        "--lifetime",
        "8s",
        "--dir",
        pki.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let (_standby, surl) = w.pair_member("centre-b", "centre");
    // An agent with a long-lived certificate, checking through the standby.
    let env = w.tls_env("pc-l", "agent", &[]);
    let dir = w.path("pc-l-tls");
    std::fs::create_dir_all(&dir).unwrap();
    for (var, file) in
        [("UPDRAFT_TLS_CA", "ca.crt"), ("UPDRAFT_TLS_CERT", "identity.crt"), ("UPDRAFT_TLS_KEY", "identity.key")]
    {
        let from = &env.iter().find(|(k, _)| k == var).unwrap().1;
        std::fs::copy(from, dir.join(file)).unwrap();
    }
    assert!(check_with(&dir, &surl, "pc-l").is_ok());
    wait_until("the standby renewed twice at the active", Duration::from_secs(60), || {
        issued(&w, &url, "centre-b").len() >= 2 && {
            let c = issued(&w, &url, "centre-b");
            c.iter().all(|c| c["how"] == "renewal")
        }
    });
    wait_until("the standby's renewals outlive its first certificate", Duration::from_secs(60), || {
        issued(&w, &url, "centre-b").iter().filter(|c| c["expires_in_secs"].as_i64().unwrap() <= 0).count() >= 1
    });
    // Its first certificate (never in the list: issued by hand) is long expired; it still serves.
    let r = check_with(&dir, &surl, "pc-l");
    assert!(r.is_ok(), "through the standby after its first certificate expired: {r:?}");
}
