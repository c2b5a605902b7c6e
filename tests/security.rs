//! Security end to end: the mutual-TLS negative matrix (no certificate, another CA, an
//! expired certificate, an agent certificate calling the admin API, a viewer changing state,
//! an agent speaking for another machine), authorized users, and the audit log recording
//! every change and every refusal in a hash chain that admin-cli verifies.
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::{CheckRequest, MachineInfo};
use updraft_runtime::tls::{Role, pki};
use updraft_tests::{World, stderr};

/// admin-cli against `url` with the certificate `name` from `dir` (and `ca` to trust).
fn admin_as(ca: &Path, dir: &Path, name: &str, url: &str, args: &[&str]) -> std::process::Output {
    updraft_tests::output(
        std::process::Command::new(updraft_tests::bin("admin-cli"))
            .env("UPDRAFT_TLS_CA", ca)
            .env("UPDRAFT_TLS_CERT", dir.join(format!("{name}.crt")))
            .env("UPDRAFT_TLS_KEY", dir.join(format!("{name}.key")))
            .arg("--provider")
            .arg(url)
            .args(args),
    )
}

fn refused(out: &std::process::Output, why: &str) {
    assert!(!out.status.success(), "should have been refused ({why})");
    let err = stderr(out);
    assert!(err.contains(why), "expected {why:?} in: {err}");
}

fn issue(pki_dir: &Path, role: Role, name: &str, from_days_ago: i64, valid: Duration) -> PathBuf {
    let from = time::OffsetDateTime::now_utc() - time::Duration::days(from_days_ago);
    pki::issue(pki_dir, role, name, &[], from, valid, &pki_dir.join(name)).unwrap();
    pki_dir.to_path_buf()
}

#[test]
fn mutual_tls_refuses_every_wrong_caller_and_the_audit_log_shows_it() {
    let w = World::new();
    let (_p, url) = w.provider("centre", true);
    let pki_dir = w.path("pki");
    let ca = pki_dir.join("ca.crt");
    w.admin_ok(&url, &["group", "create", "lab"]);

    // A client with no certificate: the handshake succeeds, the first RPC does not.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let no_cert = rt.block_on(async {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()));
        let ch = updraft_tests::channel(Endpoint::from_shared(url.clone()).unwrap().tls_config(tls).unwrap()).await;
        match ch {
            Err(e) => e,
            Ok(ch) => {
                let req = CheckRequest {
                    machine: Some(MachineInfo { name: "x".into(), ..Default::default() }),
                    ..Default::default()
                };
                match AgentApiClient::new(ch).check(req).await {
                    Ok(_) => "accepted".to_string(),
                    Err(s) => format!("{} {}", s.code(), updraft_runtime::tls::describe(&s)),
                }
            }
        }
    });
    assert_ne!(no_cert, "accepted", "a client without a certificate got an answer");

    // A certificate from another CA.
    let other = w.path("other-pki");
    pki::init(&other, "Mallory CA").unwrap();
    issue(&other, Role::Admin, "ops", 1, Duration::from_secs(7 * 86400));
    refused(&admin_as(&ca, &other, "ops", &url, &["group", "list"]), "cannot reach provider");

    // An expired certificate from the right CA (valid for a day, ten days ago).
    issue(&pki_dir, Role::Admin, "old-ops", 10, Duration::from_secs(86400));
    let expired = admin_as(&ca, &pki_dir, "old-ops", &url, &["group", "list"]);
    refused(&expired, "cannot reach provider");
    eprintln!("expired certificate: {}", stderr(&expired).trim());

    // An agent certificate calling the admin API.
    issue(&pki_dir, Role::Agent, "pc-1", 1, Duration::from_secs(7 * 86400));
    refused(
        &admin_as(&ca, &pki_dir, "pc-1", &url, &["group", "list"]),
        "agent certificate (pc-1) may not call the admin API",
    );

    // An admin certificate whose holder is not an authorized user, then a viewer.
    issue(&pki_dir, Role::Admin, "val", 1, Duration::from_secs(7 * 86400));
    refused(&admin_as(&ca, &pki_dir, "val", &url, &["group", "list"]), "val is not an authorized user");
    w.admin_ok(&url, &["user", "add", "val", "--role", "viewer"]);
    let listed = admin_as(&ca, &pki_dir, "val", &url, &["group", "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let viewer = admin_as(&ca, &pki_dir, "val", &url, &["group", "create", "mine"]);
    refused(&viewer, "val is a viewer");
    assert_eq!(viewer.status.code(), Some(5), "a refusal has its own exit status");
    refused(&admin_as(&ca, &pki_dir, "val", &url, &["user", "add", "val", "--role", "admin"]), "val is a viewer");
    // The last admin stays.
    refused(&w.admin(&url, &["user", "remove", "ops"]), "last admin");

    // An agent speaking for another machine.
    let spoof = rt.block_on(async {
        let t = updraft_runtime::tls::Transport::from_flags(
            "t",
            Some(&ca),
            Some(&pki_dir.join("pc-1.crt")),
            Some(&pki_dir.join("pc-1.key")),
            false,
        )
        .unwrap();
        let ch = updraft_tests::channel(t.endpoint(&url).unwrap()).await.unwrap();
        let req = CheckRequest {
            machine: Some(MachineInfo { name: "pc-2".into(), ..Default::default() }),
            manual: false,
            statement_digest: vec![],
        };
        AgentApiClient::new(ch).check(req).await.map(|_| ()).map_err(|s| s.message().to_string())
    });
    let err = spoof.unwrap_err();
    assert!(err.contains("certificate is for machine \"pc-1\""), "{err}");

    // Plaintext against a TLS provider gets nowhere.
    let plain = url.replace("https://", "http://");
    let out = updraft_tests::output(std::process::Command::new(updraft_tests::bin("admin-cli")).args([
        "--insecure",
        "--provider",
        &plain,
        "group",
        "list",
    ]));
    assert!(!out.status.success());
    // A provider with neither credentials nor --insecure does not start.
    let out = updraft_tests::output(std::process::Command::new(updraft_tests::bin("provider")).args([
        "--store",
        w.path("nostart").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]));
    refused(&out, "no TLS credentials");

    // The audit log holds the changes and the refusals, and its chain verifies.
    let audit = w.admin_json(&url, &["audit", "list"]);
    let entries = audit.as_array().unwrap();
    let has = |who: &str, outcome: &str| {
        entries.iter().any(|e| e["who"] == who && e["outcome"].as_str().unwrap().starts_with(outcome))
    };
    assert!(has("ops", "ok"), "{audit}");
    assert!(has("pc-1", "refused"), "{audit}");
    assert!(has("val", "refused"), "{audit}");
    assert!(entries.iter().any(|e| e["action"].as_str().unwrap().ends_with("/PutGroup") && e["who"] == "ops"));
    let verified = w.admin_json(&url, &["audit", "verify"]);
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["entries"].as_u64().unwrap() as usize, entries.len());
}

/// A genuine answer from `url`, as machine `name` (an agent certificate) would get it.
fn genuine_answer(w: &World, url: &str, name: &str) -> updraft_proto::v1::CheckResponse {
    let ep = w.transport(name, "agent").endpoint(url).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let req = CheckRequest {
            machine: Some(MachineInfo { name: name.into(), ..Default::default() }),
            manual: false,
            statement_digest: vec![],
        };
        AgentApiClient::new(updraft_tests::channel(ep).await.unwrap()).check(req).await.unwrap().into_inner()
    })
}

#[test]
fn a_pinned_agent_refuses_lying_providers_reports_why_and_moves_on() {
    use updraft_tests::rogue::Rogue;
    let w = World::new();
    // Statements live 3 s here, so a captured one can be replayed after it expired.
    let (_p, url) =
        w.provider_with("centre", &["--trust-key", w.pubkey.to_str().unwrap(), "--catalog-expiry-secs", "3"]);
    let pkg1 = w.package("app", "1.0.0.0", &w.key);
    let v1 = w.publish(&url, &pkg1);
    let old = genuine_answer(&w, &url, "spy");
    let old_statement = old.statement.clone().expect("the centre signs its answers");
    let v1_record = old.offers[0].update.clone().unwrap();
    assert_eq!(v1_record.id, v1);
    let pin = ["--catalog-key", w.catalog_pub.to_str().unwrap(), "--min-interval", "3600"];

    // 1. Mix-and-match: a fresh genuine statement, but the offered package's bytes are not the
    //    ones it lists. The agent refuses the answer, says why, and installs from the centre.
    let swapped = Rogue::new("app", "1.0.0.0", b"not the real package".to_vec())
        .replaying(genuine_answer(&w, &url, "spy").statement.unwrap());
    let swapped_url = swapped.spawn(&w);
    let mut m1 = w.agent_with("m1", &format!("{swapped_url},{url}"), &pin);
    // The version is live a moment before the check that installed it records its provider:
    // wait for both.
    let status = |w: &World| -> serde_json::Value {
        serde_json::from_slice(&w.agent_cmd("m1", &["status", "--json"]).stdout).unwrap_or_default()
    };
    updraft_tests::wait_until("m1 on v1 from the centre", Duration::from_secs(30), || {
        w.installed("m1", "app").as_deref() == Some("1.0.0.0") && status(&w)["last_provider"] == url.as_str()
    });
    let st = status(&w);
    let problems = st["problems"].to_string();
    assert!(problems.contains("does not list") && problems.contains(&swapped_url), "{problems}");
    assert!(
        std::fs::read(w.root("m1").join("app/VERSION")).unwrap() == b"1.0.0.0",
        "the swapped content must never be installed"
    );

    // 2. Rollback: after v2, the v1-era statement is older than what m1 has seen.
    w.publish(&url, &w.package("app", "2.0.0.0", &w.key));
    assert!(w.agent_cmd("m1", &["check"]).status.success());
    assert_eq!(w.installed("m1", "app").as_deref(), Some("2.0.0.0"));
    let replay = Rogue::new("app", "1.0.0.0", std::fs::read(&pkg1).unwrap()).offering(v1_record.clone());
    let rollback_url = replay.clone().replaying(old_statement.clone()).spawn(&w);
    let out = w.agent_cmd("m1", &["providers", "test", &rollback_url]);
    refused(&out, "rollback");

    // 3. Freeze: the same replay to an agent that has seen nothing newer, once the statement
    //    has expired.
    std::thread::sleep(Duration::from_secs(4));
    let frozen_url = replay.clone().replaying(old_statement).spawn(&w);
    let _m2 = w.agent_with("m2", &frozen_url, &pin);
    updraft_tests::wait_until("m2's control socket", Duration::from_secs(10), || {
        w.state("m2").join("agent.sock").exists()
    });
    refused(&w.agent_cmd("m2", &["providers", "test", &frozen_url]), "expired");

    // 4. No statement at all.
    let bare_url = replay.clone().spawn(&w);
    refused(&w.agent_cmd("m2", &["providers", "test", &bare_url]), "carries no signed catalog statement");

    // 5. Endless data for a listed update: never more than the catalog's size is accepted.
    let fresh = genuine_answer(&w, &url, "spy");
    let v2_record = fresh.offers.iter().filter_map(|o| o.update.clone()).find(|u| u.version == "2.0.0.0").unwrap();
    let endless_url = Rogue::new("app", "2.0.0.0", vec![])
        .offering(v2_record)
        .replaying(fresh.statement.unwrap())
        .endless()
        .spawn(&w);
    m1.kill9();
    let _m3 = w.agent_with("m3", &endless_url, &pin);
    updraft_tests::wait_until("m3 to give up on the endless download", Duration::from_secs(30), || {
        let st: serde_json::Value =
            serde_json::from_slice(&w.agent_cmd("m3", &["status", "--json"]).stdout).unwrap_or_default();
        st["last_error"].as_str().is_some_and(|e| e.contains("more than the"))
    });
    assert_eq!(w.installed("m3", "app"), None);
}

#[test]
fn limits_refuse_with_clear_errors_and_change_nothing() {
    let w = World::new();
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    // Disk reserve: a provider that must keep a petabyte free refuses every upload.
    let (_p, url) = w.provider_with(
        "centre",
        &["--trust-key", &pubkey, "--disk-reserve-bytes", "1000000000000000", "--max-connections-per-peer", "4"],
    );
    let pkg = w.package("tool", "1.0.0.0", &w.key);
    refused(&w.admin(&url, &["update", "add", pkg.to_str().unwrap()]), "not enough disk space");
    assert_eq!(w.admin_json(&url, &["update", "list"]).as_array().unwrap().len(), 0);

    // Connections per peer: with four held open, a fifth is turned away; freed, it gets in.
    // The four are whole connections (TLS done): a bare TCP connection is dropped after the
    // 10 s handshake timeout, which a loaded machine can outlast before the fifth is tried.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let held: Vec<tonic::transport::Channel> = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(w.connect_as(&url, updraft_tests::ADMIN, "admin").await);
        }
        held
    });
    updraft_tests::wait_until("a fifth connection turned away", Duration::from_secs(20), || {
        let out = w.admin(&url, &["update", "list"]);
        !out.status.success() && stderr(&out).contains("cannot reach provider")
    });
    drop(held);
    drop(rt);
    updraft_tests::wait_until("a connection to be let in again", Duration::from_secs(10), || {
        w.admin(&url, &["update", "list"]).status.success()
    });
    assert!(_p.log_text().contains("too many open from this peer"), "{}", _p.log_text());

    // An agent that must keep a petabyte free does not download, and says why.
    let (_p2, url2) = w.provider("second", true);
    w.publish(&url2, &pkg);
    let _a = w.agent_with("m1", &url2, &["--disk-reserve-bytes", "1000000000000000", "--min-interval", "3600"]);
    updraft_tests::wait_until("the agent to report the disk guard", Duration::from_secs(20), || {
        let out = w.agent_cmd("m1", &["status", "--json"]);
        String::from_utf8_lossy(&out.stdout).contains("not enough disk space")
    });
    assert_eq!(w.installed("m1", "tool"), None);
}

/// For load balancers, probes and tools: every server answers `grpc.health.v1` and server
/// reflection, to any certificate of this deployment. The active provider is SERVING; its
/// standby is NOT_SERVING as a server and for the admin API (it only forwards) but serves the
/// agent API; a site is SERVING; reflection lists the updraft.v1 services.
#[test]
fn health_and_reflection_tell_the_active_from_the_standby() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let w = World::new();
    let (mut a, aurl) = w.provider("centre-a", true);
    let (mut b, burl) = w.pair_member("centre-b", "centre-a");
    let (mut s, surl) = w.remote("site", &aurl);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let status = |url: String, service: &'static str| {
            let w = &w;
            async move {
                let mut c = HealthClient::new(w.connect_as(&url, "lb", "agent").await);
                c.check(HealthCheckRequest { service: service.into() }).await.map(|r| r.into_inner().status())
            }
        };
        let (agent_api, admin) = ("updraft.v1.AgentApi", "updraft.v1.Admin");
        for (url, service, want) in [
            (&aurl, "", ServingStatus::Serving),
            (&aurl, admin, ServingStatus::Serving),
            (&burl, "", ServingStatus::NotServing),
            (&burl, admin, ServingStatus::NotServing),
            (&burl, agent_api, ServingStatus::Serving),
            (&surl, "", ServingStatus::Serving),
            (&surl, agent_api, ServingStatus::Serving),
        ] {
            assert_eq!(status(url.clone(), service).await.unwrap(), want, "{url} {service:?}");
        }
        let unknown = status(aurl.clone(), "no.such.Service").await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);

        let mut r = ServerReflectionClient::new(w.connect_as(&aurl, "grpcurl", "admin").await);
        let ask = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = r.server_reflection_info(tokio_stream::iter([ask])).await.unwrap().into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("no list of services")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for s in [agent_api, admin, "updraft.v1.Replication", "grpc.health.v1.Health"] {
            assert!(names.iter().any(|n| n == s), "{s} not in {names:?}");
        }
    });

    // The same on the plain-HTTP probe port, for load balancers and orchestrators.
    let probe = |p: &mut updraft_tests::Proc, path: &str| updraft_tests::http_get(p.probe_addr(), path).unwrap();
    let t = Duration::from_secs(30);
    updraft_tests::wait_until("the site synchronised", t, || probe(&mut s, "/readyz").0 == 200);
    assert!(probe(&mut s, "/readyz").1.starts_with("ready: synchronised with the upstream (catalog "));
    let (code, body) = probe(&mut a, "/readyz");
    assert!(code == 200 && body.starts_with("ready: active (epoch "), "{code} {body}");
    let (code, body) = probe(&mut b, "/readyz");
    assert!(code == 503 && body.starts_with("not ready: standby"), "{code} {body}");
    for p in [&mut a, &mut b, &mut s] {
        let (code, body) = probe(p, "/healthz");
        assert!(code == 200 && body.starts_with("alive: "), "{code} {body}");
    }
    assert_eq!(probe(&mut a, "/nothing").0, 404);
    let mut agent = w.agent_with("pc", &aurl, &["--metrics-listen", "127.0.0.1:0"]);
    updraft_tests::wait_until("the agent ready after its first check", t, || {
        let (code, body) = probe(&mut agent, "/readyz");
        code == 200 && body == format!("ready: last check answered by {aurl}\n")
    });

    // A planned stop of the active: the standby becomes the ready one; the site, cut off from
    // its only upstream, stays ready, serving from cache.
    a.term();
    updraft_tests::wait_until("the standby ready as the active", t, || {
        let (code, body) = probe(&mut b, "/readyz");
        code == 200 && body.starts_with("ready: active (epoch ")
    });
    updraft_tests::wait_until("the site working alone", t, || {
        let (code, body) = probe(&mut s, "/readyz");
        code == 200 && body.starts_with("ready: working alone")
    });
}

/// What a process sent systemd's notify socket, as one string per datagram.
fn notifications(sock: &std::os::unix::net::UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string());
    }
    out
}

#[test]
fn systemd_hears_readiness_status_the_watchdog_and_the_stop() {
    let w = World::new();
    let path = w.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let env = [("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")];
    let (mut p, _url) = w.provider_env("centre", &[], &env);
    let mut seen: Vec<String> = Vec::new();
    let t = Duration::from_secs(30);
    // Ready only once it serves (the listener bound, the store open, active), with the role as
    // the unit's status; then the watchdog, fed at half its period.
    updraft_tests::wait_until("READY=1 and two watchdog pings", t, || {
        seen.extend(notifications(&sock));
        seen.iter().any(|m| m == "READY=1") && seen.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
    });
    let ready = seen.iter().position(|m| m == "READY=1").unwrap();
    assert!(
        seen[..ready].last().is_some_and(|m| m.starts_with("STATUS=active (epoch ")),
        "the status before READY says what it is: {seen:?}"
    );
    p.term();
    assert!(p.wait_exit(Duration::from_secs(5)), "{}", p.log_text());
    seen.extend(notifications(&sock));
    assert!(seen.iter().any(|m| m == "STOPPING=1") && seen.iter().any(|m| m == "STATUS=stopping"), "{seen:?}");
}

#[test]
fn the_systemd_units_pass_review() {
    // `systemd-analyze verify` checks that ExecStart names a program: build them first.
    updraft_tests::bin("provider");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/check-units.sh");
    let out =
        updraft_tests::output(std::process::Command::new(script).env("UPDRAFT_BIN_DIR", updraft_tests::bin_dir()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "deploy/check-units.sh:\n{text}");
    assert_eq!(text.matches("Overall exposure level").count(), 3, "{text}");
}
