//! The web console in a real headless Chromium: sign-in, every page with real data from a
//! provider, a site and an agent, an update approved and marked high priority in the browser
//! reaching the agent behind the site, a group
//! made and a machine moved, a viewer's change refused, a form without its CSRF token refused,
//! sign-out. One screenshot per page is saved (and checked not to be blank); with
//! `UPDRAFT_SCREENSHOTS=DIR` the About, Updates and Machines ones are also copied to DIR (how
//! `docs/` got its pictures).
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::Locator;
use updraft_tests::browser::Browser;
use updraft_tests::{ADMIN, World, wait_until};

const T: Duration = Duration::from_secs(60);

pub(crate) fn passwd(w: &World, url: &str, user: &str, password: &str) {
    let mut c = w.admin_cli();
    c.args(["--provider", url, "user", "passwd", user, "--password-stdin"]);
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "user passwd {user}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn sign_in(b: &Browser, base: &str, user: &str, password: &str) {
    b.client.goto(&format!("{base}/login")).await.unwrap();
    b.find("#user").await.send_keys(user).await.unwrap();
    b.find("#password").await.send_keys(password).await.unwrap();
    b.find("form[action='/login'] button").await.click().await.unwrap();
}

async fn path(b: &Browser) -> String {
    b.client.current_url().await.unwrap().path().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_the_fleet_and_its_changes_reach_it() {
    let w = World::new();
    let (mut p, purl) = w.provider("centre", true);
    let base = format!("https://{}", p.web_addr());
    let (_site, surl) = w.remote("branch", &purl);
    let _agent = w.agent("pc-1", &surl);
    passwd(&w, &purl, ADMIN, "admin password 1");
    let pkg = w.package("editor", "1.0.0.0", &w.key);
    let id = w.admin_ok(&purl, &["update", "add", pkg.to_str().unwrap()]).trim().to_string();
    w.admin_ok(&purl, &["deploy", "editor", "--group", "default"]);
    wait_until("pc-1 known at the centre", T, || {
        w.admin_json(&purl, &["machine", "list"]).as_array().unwrap().iter().any(|m| m["name"] == "pc-1")
    });

    let b = Browser::start(&w.path("chromedriver.log"), &[p.web_addr()]).await;
    // Not signed in: every page sends to the sign-in form; a wrong password is refused.
    b.client.goto(&format!("{base}/updates")).await.unwrap();
    assert_eq!(path(&b).await, "/login");
    sign_in(&b, &base, ADMIN, "not the password").await;
    b.wait_text("Wrong user name or password").await;
    sign_in(&b, &base, ADMIN, "admin password 1").await;
    b.wait_text(&format!("Signed in as {ADMIN}")).await;
    assert_eq!(path(&b).await, "/about");

    // Every page, with the fleet's real data.
    let expect: [(&str, &str); 8] = [
        ("/about", "centre"),
        ("/activity", "editor deployed to group default"),
        ("/report", "machine(s)"),
        ("/machines", "pc-1"),
        ("/groups", "default"),
        ("/updates", id.as_str()),
        ("/configuration", ADMIN),
        ("/sites", "branch"),
    ];
    let shots = std::env::var_os("UPDRAFT_SCREENSHOTS").map(std::path::PathBuf::from);
    for (page, shows) in expect {
        b.client.goto(&format!("{base}{page}")).await.unwrap();
        b.wait_text(shows).await;
        let name = format!("console{}.png", page.replace('/', "-"));
        let file = w.path(&name);
        b.screenshot(&file).await;
        if let Some(dir) = &shots
            && ["/about", "/updates", "/machines"].contains(&page)
        {
            std::fs::copy(&file, dir.join(&name)).unwrap();
        }
    }
    b.client.goto(&format!("{base}/machines/pc-1?tab=apps")).await.unwrap();
    b.wait_text("editor").await;
    // The report from a start date, remembered for this user; a bad one refused, not remembered.
    b.client.goto(&format!("{base}/report?range=2026-01-01")).await.unwrap();
    b.wait_text("since 2026-01-01").await;
    b.client.goto(&format!("{base}/report?range=soon")).await.unwrap();
    b.wait_text("invalid date \"soon\"").await;
    b.client.goto(&format!("{base}/report")).await.unwrap();
    b.wait_text("since 2026-01-01").await;
    // Activity grouped by product; an entry opened, then the next one.
    b.client.goto(&format!("{base}/activity?by=product")).await.unwrap();
    b.wait_text("(no product)").await;
    b.find("#activity tr:not(.group) td a").await.click().await.unwrap();
    b.wait_text("Entry 1 of").await;
    b.client.find(Locator::LinkText("next →")).await.unwrap().click().await.unwrap();
    b.wait_text("Entry 2 of").await;

    // Approve the update in the browser; the agent behind the site installs it.
    b.client.goto(&format!("{base}/updates")).await.unwrap();
    b.find(&format!("input[type=checkbox][value='{id}']")).await.click().await.unwrap();
    b.find("#updates-form select[name=state]").await.select_by_value("ga").await.unwrap();
    b.find("#updates-form button[type=submit]").await.click().await.unwrap();
    b.wait_text("1 update(s) set to ga").await;
    // High priority, from the browser too: the fleet is told at once (the agent checks hourly).
    b.find(&format!("input[type=checkbox][value='{id}']")).await.click().await.unwrap();
    b.find("#updates-form button[formaction='/updates/priority'][value='true']").await.click().await.unwrap();
    b.wait_text("1 update(s) marked high priority").await;
    wait_until("pc-1 installs what the browser approved", T, || {
        w.installed("pc-1", "editor").as_deref() == Some("1.0.0.0")
    });

    // Make a group and move the machine into it.
    b.client.goto(&format!("{base}/groups")).await.unwrap();
    b.find("form[action='/groups/create'] input[name=name]").await.send_keys("lab").await.unwrap();
    b.find("form[action='/groups/create'] button").await.click().await.unwrap();
    b.wait_text("group lab created").await;
    b.find("form[action='/groups/assign'] select[name=machine]").await.select_by_value("pc-1").await.unwrap();
    b.find("form[action='/groups/assign'] select[name=group]").await.select_by_value("lab").await.unwrap();
    b.find("form[action='/groups/assign'] button").await.click().await.unwrap();
    b.wait_text("pc-1 moved to group lab").await;
    let group_of = |m: &str| {
        w.admin_json(&purl, &["machine", "list"]).as_array().unwrap().iter().find(|x| x["name"] == m).unwrap()["group"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(group_of("pc-1"), "lab");
    // The audit log has the web user's changes, under the actions gRPC uses.
    let audit = w.admin_ok(&purl, &["audit", "list"]);
    for action in ["SetUpdateState", "PutGroup", "Assign", "web sign-in"] {
        assert!(audit.lines().any(|l| l.contains(ADMIN) && l.contains(action)), "{action} not audited:\n{audit}");
    }

    // Change the group's settings, and make a viewer with a password, all in the browser.
    b.client.goto(&format!("{base}/groups")).await.unwrap();
    b.find("#group-lab summary").await.click().await.unwrap();
    b.find("#group-lab select[name=mode]").await.select_by_value("manual").await.unwrap();
    b.find("#group-lab button").await.click().await.unwrap();
    b.wait_text("group lab changed").await;
    let lab = w.admin_json(&purl, &["group", "show", "lab"]);
    assert_eq!(lab["settings"]["mode"], "manual", "{lab}");

    // Upload a package (the page's script sends it with a progress bar), install a product
    // alongside it, cap a product line, set a machine's role, remove the group.
    let viewer = w.package("viewer", "2.0.0.0", &w.key);
    b.client.goto(&format!("{base}/updates")).await.unwrap();
    b.find("#upload-file").await.send_keys(viewer.to_str().unwrap()).await.unwrap();
    b.find("#upload-form button").await.click().await.unwrap();
    b.wait_text("imported viewer").await;
    b.client.goto(&format!("{base}/updates?state=remove")).await.unwrap();
    b.wait_text("0 update(s)").await;
    b.client.goto(&format!("{base}/updates")).await.unwrap();
    let updates = w.admin_json(&purl, &["update", "list", "--product", "viewer"]);
    let viewer_id = updates[0]["id"].as_str().unwrap().to_string();
    b.find(&format!("input[type=checkbox][value='{viewer_id}']")).await.click().await.unwrap();
    b.find("#related").await.send_keys("editor").await.unwrap();
    b.find("#updates-form button[formaction='/updates/related']").await.click().await.unwrap();
    b.wait_text("1 update(s) install editor alongside").await;
    assert_eq!(w.admin_json(&purl, &["update", "show", &viewer_id])["related_installs"][0], "editor");
    b.find("form.card[action='/updates/caps'] input[name=line]").await.send_keys("tools").await.unwrap();
    b.find("form.card[action='/updates/caps'] input[name=version]").await.send_keys("3.0.0.0").await.unwrap();
    b.find("form.card[action='/updates/caps'] button").await.click().await.unwrap();
    b.wait_text("product line tools capped").await;
    assert_eq!(w.admin_json(&purl, &["product-line", "list"])[0]["cap"], "3.0.0.0");
    b.client.goto(&format!("{base}/machines/pc-1")).await.unwrap();
    b.find("#role").await.select_by_value("server").await.unwrap();
    b.find("form[action='/machines/pc-1/role'] button").await.click().await.unwrap();
    b.wait_text("pc-1: role server").await;
    b.client.goto(&format!("{base}/groups")).await.unwrap();
    b.find("#group-lab summary").await.click().await.unwrap();
    b.find("form[action='/groups/remove'] button").await.click().await.unwrap();
    b.wait_text("group lab removed").await;
    assert_eq!(group_of("pc-1"), "default");
    let audit = w.admin_ok(&purl, &["audit", "list"]);
    for action in ["AddUpdate", "SetRelatedInstalls", "SetCap", "SetRole", "RemoveGroup"] {
        assert!(audit.lines().any(|l| l.contains(ADMIN) && l.contains(action)), "{action} not audited:\n{audit}");
    }
    b.client.goto(&format!("{base}/configuration")).await.unwrap();
    b.find("form[action='/configuration/users'] input[name=name]").await.send_keys("val").await.unwrap();
    b.find("form[action='/configuration/users'] select[name=role]").await.select_by_value("viewer").await.unwrap();
    b.find("form[action='/configuration/users'] button").await.click().await.unwrap();
    b.wait_text("user val is viewer").await;
    let pw = "form[action='/configuration/users/password']:has(input[value='val'])";
    b.find(&format!("{pw} input[name=password]")).await.send_keys("viewer password 1").await.unwrap();
    b.find(&format!("{pw} button")).await.click().await.unwrap();
    b.wait_text("password of val set").await;

    // A form posted without its CSRF token, with a live session cookie, is refused and changes nothing.
    let cookie = b.client.get_named_cookie("updraft_session").await.unwrap().value().to_string();
    let out = updraft_tests::output(
        std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-b", &format!("updraft_session={cookie}")])
            .args(["-d", "name=forged&mode=automatic", &format!("{base}/groups/create")]),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    let groups = w.admin_ok(&purl, &["group", "list"]);
    assert!(!groups.contains("forged"), "{groups}");

    // Sign out: the session is over.
    b.find("form[action='/logout'] button").await.click().await.unwrap();
    b.find("#user").await;
    b.client.goto(&format!("{base}/about")).await.unwrap();
    assert_eq!(path(&b).await, "/login");

    // A viewer sees everything and changes nothing.
    sign_in(&b, &base, "val", "viewer password 1").await;
    b.wait_text("Signed in as val").await;
    b.client.goto(&format!("{base}/updates")).await.unwrap();
    b.find(&format!("input[type=checkbox][value='{id}']")).await.click().await.unwrap();
    b.find("#updates-form select[name=state]").await.select_by_value("inactive").await.unwrap();
    b.find("#updates-form button[type=submit]").await.click().await.unwrap();
    b.wait_text("may look, not change").await;
    let state = w
        .admin_json(&purl, &["update", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == id.as_str())
        .unwrap()["state"]
        .clone();
    assert_eq!(state, "ga", "the viewer's change was refused");
    assert!(b.client.find(Locator::Css("header")).await.is_err(), "the refusal is a page of its own");
    b.client.close().await.unwrap();
}

/// `curl` with a cookie jar: the status code and the body.
pub(crate) fn curl(jar: &std::path::Path, args: &[&str]) -> (String, String) {
    let out = updraft_tests::output(
        std::process::Command::new("curl")
            .args(["-sk", "--max-time", "20", "-c", jar.to_str().unwrap(), "-b", jar.to_str().unwrap()])
            .args(["-w", "\n%{http_code}"])
            .args(args),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

/// A standby's console address serves the active's console (sign-in, pages, changes); after
/// `kill -9` of the active, the same address serves the new active's own console.
#[test]
fn a_standby_serves_the_actives_console_and_its_own_after_a_switchover() {
    let w = World::new();
    let (mut a, aurl) = w.provider("centre-a", true);
    let (mut b, _burl) = w.pair_member("centre-b", "centre-a");
    let base = format!("https://{}", b.web_addr());
    passwd(&w, &aurl, ADMIN, "admin password 1");
    let jar = w.path("cookies");
    let sign_in = |password: &str| {
        curl(&jar, &["-d", &format!("user={ADMIN}"), "-d", &format!("password={password}"), &format!("{base}/login")])
    };

    assert_eq!(sign_in("admin password 1").0, "303", "signed in through the standby");
    let (code, about) = curl(&jar, &[&format!("{base}/about")]);
    assert_eq!(code, "200");
    assert!(about.contains("<dt>Provider</dt><dd>centre-a</dd>"), "the active's page: {about}");
    // A change made through the standby is the active's change, in its audit log.
    let csrf = about.split("name=\"csrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
    let (code, _) =
        curl(&jar, &["-d", &format!("csrf={csrf}"), "-d", "name=through-standby", &format!("{base}/groups/create")]);
    assert_eq!(code, "303");
    assert!(w.admin_ok(&aurl, &["group", "list"]).contains("through-standby"));

    a.kill9();
    // The same address, now the new active's own console (sessions were the old active's).
    wait_until("centre-b's own console at its address", T, || {
        sign_in("admin password 1").0 == "303"
            && curl(&jar, &[&format!("{base}/about")]).1.contains("<dt>Provider</dt><dd>centre-b</dd>")
    });
    let (_, groups) = curl(&jar, &[&format!("{base}/groups")]);
    assert!(groups.contains("through-standby"), "the store the pair shares");
    assert!(!b.exited());
}

/// The Configuration page of a provider holding the CA lists the certificates it issued and the
/// enrollment requests waiting; approving and revoking there are the admin operations, audited
/// with the web user's name.
#[test]
fn the_console_approves_enrollments_and_revokes_certificates() {
    let w = World::new();
    let pki = w.path("pki");
    let trust = w.pubkey.to_str().unwrap();
    let (mut p, url) = w.provider_with("centre", &["--trust-key", trust, "--pki-dir", pki.to_str().unwrap()]);
    let base = format!("https://{}", p.web_addr());
    passwd(&w, &url, ADMIN, "admin password 1");
    let jar = w.path("cookies");
    let login =
        curl(&jar, &["-d", &format!("user={ADMIN}"), "-d", "password=admin password 1", &format!("{base}/login")]);
    assert_eq!(login.0, "303");
    // A host asks without a token: its request waits, and the page shows it.
    let ca = pki.join("ca.crt");
    let enroll = || {
        updraft_tests::output(
            std::process::Command::new(updraft_tests::bin("agent"))
                .args(["enroll", "--provider", &url, "--ca", ca.to_str().unwrap(), "--name", "pc-w", "--wait", "0s"])
                .arg("--state-dir")
                .arg(w.state("pc-w")),
        )
    };
    assert!(!enroll().status.success(), "waits for approval");
    let (code, page) = curl(&jar, &[&format!("{base}/configuration")]);
    assert_eq!(code, "200");
    assert!(page.contains("Waiting for approval") && page.contains("<td>pc-w</td>"), "{page}");
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
    let (code, _) = curl(
        &jar,
        &["-d", &format!("csrf={csrf}"), "-d", "name=pc-w", &format!("{base}/configuration/certificates/approve")],
    );
    assert_eq!(code, "303");
    let out = enroll();
    assert!(out.status.success(), "collected after the approval: {}", updraft_tests::stderr(&out));
    // The certificate is listed, and revoked from the page.
    let listed = w.admin_json(&url, &["pki", "list"]);
    let serial = listed["certificates"][0]["serial"].as_str().unwrap().to_string();
    let (_, page) = curl(&jar, &[&format!("{base}/configuration")]);
    assert!(page.contains(&serial[..16]) && page.contains("badge s-ok\">valid"), "{page}");
    let (code, _) = curl(
        &jar,
        &[
            "-d",
            &format!("csrf={csrf}"),
            "-d",
            &format!("what={serial}"),
            &format!("{base}/configuration/certificates/revoke"),
        ],
    );
    assert_eq!(code, "303");
    let listed = w.admin_json(&url, &["pki", "list"]);
    assert!(listed["certificates"][0]["revoked"].as_str().unwrap().contains(ADMIN), "{listed}");
    // Both changes are in the audit log under the web user's name.
    let audit = w.admin_json(&url, &["audit", "list"]).to_string();
    assert!(audit.contains("ApproveEnrollment") && audit.contains("RevokeCertificate"), "{audit}");
    // Without a token or form token, nothing changes.
    let (code, _) = curl(&jar, &["-d", "what=pc-w", &format!("{base}/configuration/certificates/revoke")]);
    assert_ne!(code, "303");
}
