//! Hostile insiders, each holding one genuine certificate: a site that speaks for machines not
//! behind it, under another name or with times from the future; an agent that hoards push
//! streams and downloads, fetches content still under review or dates its activity in 9999.
//! Each is refused or made harmless, and what it tried changes nothing it should not.
use std::time::Duration;

use futures::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::replication_client::ReplicationClient;
use updraft_proto::v1::{
    Activity, ActivityKind, BlobRequest, CheckRequest, ForwardRequest, ForwardedReport, InstalledProduct, MachineInfo,
    ReportRequest, SubscribeRequest,
};
use updraft_tests::{World, wait_until};

/// Year 9999, in unix milliseconds.
const FAR_FUTURE_MS: i64 = 253_402_300_799_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A connection to `url` presenting a certificate for `name` with `role`.
async fn connect_as(w: &World, url: &str, name: &str, role: &str) -> Channel {
    w.connect_as(url, name, role).await
}

fn machine(w: &World, purl: &str, name: &str) -> serde_json::Value {
    w.admin_json(purl, &["machine", "show", name])
}

#[test]
fn a_site_certificate_speaks_only_for_its_own_machines() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let _agent = w.agent("pc-1", &purl);
    wait_until("pc-1 registered", Duration::from_secs(60), || {
        w.admin_json(&purl, &["machine", "list"]).as_array().unwrap().iter().any(|m| m["name"] == "pc-1")
    });
    let before = machine(&w, &purl, "pc-1");
    let rt = runtime();
    rt.block_on(async {
        let mut site = ReplicationClient::new(connect_as(&w, &purl, "evil", "remote-provider").await);
        let report = |name: &str, at: i64, installed: Vec<InstalledProduct>| ForwardedReport {
            machine: Some(MachineInfo { name: name.into(), installed, ..Default::default() }),
            at_unix_ms: at,
            is_check: true,
            ..Default::default()
        };
        // Posing as another site.
        let e = site
            .forward_reports(ForwardRequest { site: "branch".into(), reports: vec![], ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        // Sending its own record under a real agent's name (which would mark pc-1 a site).
        let e = site
            .forward_reports(ForwardRequest {
                site: "evil".into(),
                self_: Some(MachineInfo { name: "pc-1".into(), ..Default::default() }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        // Forging the inventory of pc-1, which is alive and connected directly; and bringing
        // in a machine of its own, dated in the year 9999.
        let forged = vec![InstalledProduct { product: "app".into(), version: "9.9.9.9".into(), ..Default::default() }];
        let batch = ForwardRequest {
            site: "evil".into(),
            reports: vec![report("pc-1", now_ms(), forged), report("ghost-1", FAR_FUTURE_MS, vec![])],
            ..Default::default()
        };
        let accepted = site.forward_reports(batch).await.unwrap().into_inner().accepted;
        assert_eq!(accepted, 1, "only the site's own machine is accepted");
    });
    let after = machine(&w, &purl, "pc-1");
    assert_eq!(after["via"], before["via"], "pc-1 is still reached directly");
    assert_eq!(after["installed"], before["installed"], "pc-1's inventory is its own");
    let ghost = machine(&w, &purl, "ghost-1");
    assert_eq!(ghost["via"], "evil");
    assert!(ghost["last_contact_unix_ms"].as_i64().unwrap() <= now_ms(), "no contact dated in the future: {ghost}");
    assert_eq!(machine(&w, &purl, "evil")["is_remote_provider"], true);
    assert_eq!(machine(&w, &purl, "pc-1")["is_remote_provider"], false);
}

#[test]
fn an_agent_certificate_cannot_hoard_streams_fetch_unapproved_content_or_date_the_future() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    // Content under review (imported, not approved), and an approved package large enough that
    // an unread download of it stays open.
    let secret = w.admin_ok(&purl, &["update", "add", w.package("secret", "1.0.0.0", &w.key).to_str().unwrap()]);
    let secret_hash =
        w.admin_json(&purl, &["update", "show", secret.trim()])["content_hash"].as_str().unwrap().to_string();
    let tool = w.approve(&purl, &w.noise_package("tool", "1.0.0.0", 24));
    let tool_hash = w.admin_json(&purl, &["update", "show", &tool])["content_hash"].as_str().unwrap().to_string();

    let rt = runtime();
    rt.block_on(async {
        let mut agent = AgentApiClient::new(connect_as(&w, &purl, "pc-9", "agent").await);
        let mut downloader = AgentApiClient::new(connect_as(&w, &purl, "pc-9", "agent").await);
        // Content still under review is not an agent's to fetch; nor is approved content its
        // plan does not offer it (it has not checked in, so it is offered nothing).
        let e = downloader.download(BlobRequest { content_hash: secret_hash, offset: 0 }).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let e = downloader.download(BlobRequest { content_hash: tool_hash.clone(), offset: 0 }).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert!(e.message().contains("not the content of an update offered to pc-9"), "{e}");
        // Once it has checked in with tool 0.9 installed, tool 1.0 is its to fetch.
        let has_tool = MachineInfo {
            name: "pc-9".into(),
            installed: vec![InstalledProduct {
                product: "tool".into(),
                version: "0.9.0.0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        agent.check(CheckRequest { machine: Some(has_tool), manual: false, statement_digest: vec![] }).await.unwrap();
        // Four downloads held open (each on a connection of its own, as unread streams fill
        // their connection's window); the fifth is refused: the provider's slots are for everyone.
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut downloader = AgentApiClient::new(connect_as(&w, &purl, "pc-9", "agent").await);
            let mut s = downloader
                .download(BlobRequest { content_hash: tool_hash.clone(), offset: 0 })
                .await
                .unwrap()
                .into_inner();
            s.next().await.unwrap().unwrap();
            held.push(s);
        }
        let e = downloader.download(BlobRequest { content_hash: tool_hash.clone(), offset: 0 }).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("4 downloads open"), "{e}");
        // Abandoned downloads give their places back: once the provider has seen the four
        // streams reset, the machine may download again.
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match downloader.download(BlobRequest { content_hash: tool_hash.clone(), offset: 0 }).await {
                    Ok(s) => return s.into_inner(),
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await
        .expect("the abandoned downloads' places came back within 30 s");
        drop(again);
        drop(downloader);

        // One push stream per machine: a second subscription ends the first.
        let sub = || SubscribeRequest { machine: "pc-9".into(), last_seen_seq: 0 };
        let mut first = agent.subscribe(sub()).await.unwrap().into_inner();
        first.next().await.unwrap().unwrap(); // hello
        let mut second = agent.subscribe(sub()).await.unwrap().into_inner();
        second.next().await.unwrap().unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match first.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Some(e.code()),
                    None => return None,
                }
            }
        })
        .await
        .expect("the first stream ends once a second is opened");
        assert!(matches!(ended, None | Some(Code::Aborted)), "{ended:?}");

        // Activity dated in the year 9999 is stamped with the time it arrived.
        let report = ReportRequest {
            machine: Some(MachineInfo { name: "pc-9".into(), ..Default::default() }),
            activities: vec![Activity {
                at_unix_ms: FAR_FUTURE_MS,
                kind: ActivityKind::Installed as i32,
                update_id: tool.clone(),
                detail: "from the future".into(),
                ..Default::default()
            }],
        };
        agent.report(report).await.unwrap();
        let acts = w.admin_json(&purl, &["activity", "--machine", "pc-9"]);
        let entry = acts.as_array().unwrap().iter().find(|a| a["detail"] == "from the future").expect("the entry");
        assert!(entry["at_unix_ms"].as_i64().unwrap() <= now_ms(), "{entry}");

        // A flood of activity from one machine evicts its own oldest entries only: another
        // machine's entry, older than all of them, stays.
        let mut quiet = AgentApiClient::new(connect_as(&w, &purl, "pc-8", "agent").await);
        let one = |name: &str, detail: &str| Activity {
            kind: ActivityKind::Check as i32,
            detail: detail.into(),
            machine: name.into(),
            ..Default::default()
        };
        let pc8 = MachineInfo { name: "pc-8".into(), ..Default::default() };
        quiet.report(ReportRequest { machine: Some(pc8), activities: vec![one("pc-8", "quiet")] }).await.unwrap();
        for _ in 0..12 {
            let flood = ReportRequest {
                machine: Some(MachineInfo { name: "pc-9".into(), ..Default::default() }),
                activities: (0..100).map(|_| one("pc-9", "flood")).collect(),
            };
            agent.report(flood).await.unwrap();
        }
    });
    let quiet = w.admin_json(&purl, &["activity", "--machine", "pc-8"]);
    assert_eq!(quiet.as_array().unwrap().len(), 1, "{quiet}");
    let loud = w.admin_json(&purl, &["activity", "--machine", "pc-9", "--limit", "5000"]);
    assert_eq!(loud.as_array().unwrap().len(), 1000, "a machine keeps its newest 1,000 entries");
}

#[test]
fn a_watched_folder_cannot_be_the_store() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let db = w.path("centre").join("db");
    let out = w.admin(&purl, &["watch", "add", db.to_str().unwrap(), "--auto"]);
    assert!(!out.status.success());
    assert!(
        updraft_tests::stderr(&out).contains("overlaps the provider's data directory"),
        "{}",
        updraft_tests::stderr(&out)
    );
    assert_eq!(w.admin_json(&purl, &["watch", "list"]).as_array().map(|a| a.len()), Some(0));
}

#[test]
fn an_oversized_report_is_refused_at_the_site_and_its_outbox_keeps_draining() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (_s, surl) = w.remote("branch", &purl);
    w.wait_site_caught_up(&surl, &purl);
    let rt = runtime();
    rt.block_on(async {
        let mut agent = AgentApiClient::new(connect_as(&w, &surl, "pc-7", "agent").await);
        let entries = |tag: &str, n: usize, size: usize| ReportRequest {
            machine: Some(MachineInfo { name: "pc-7".into(), ..Default::default() }),
            activities: (0..n)
                .map(|i| Activity {
                    at_unix_ms: now_ms(),
                    kind: ActivityKind::Installed as i32,
                    detail: format!("{tag}:{i}:{}", "x".repeat(size)),
                    ..Default::default()
                })
                .collect(),
        };
        // 1,000 entries of 300 bytes: within the entry limit, over the size limit.
        let e = agent.report(entries("big", 1000, 300)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("at most 262144"), "{e}");
        // Twelve full reports queue at the site: more than one upstream batch may carry.
        for r in 0..12 {
            agent.report(entries(&format!("r{r}"), 1000, 100)).await.unwrap();
        }
    });
    // The last report reaches the centre behind the others (the outbox drains in order), and
    // the machine keeps its newest 1,000 entries there: exactly the last report's.
    let last_only = |acts: &serde_json::Value| {
        acts.as_array().is_some_and(|a| {
            a.len() == 1000 && a.iter().all(|e| e["detail"].as_str().is_some_and(|d| d.starts_with("r11:")))
        })
    };
    wait_until("pc-7's last report, and only it, at the centre", Duration::from_secs(60), || {
        last_only(&w.admin_json(&purl, &["activity", "--machine", "pc-7", "--limit", "10000"]))
    });
}

#[test]
fn refused_calls_cannot_grow_the_audit_log_without_bound() {
    use updraft_proto::v1::ListUpdatesRequest;
    use updraft_proto::v1::admin_client::AdminClient;
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let rt = runtime();
    rt.block_on(async {
        let mut admin = AdminClient::new(connect_as(&w, &purl, "pc-3", "agent").await);
        for _ in 0..50 {
            let e = admin.list_updates(ListUpdatesRequest::default()).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied);
        }
    });
    let audit = w.admin_json(&purl, &["audit", "list"]);
    let refusals = audit.as_array().unwrap().iter().filter(|e| e["who"] == "pc-3").count();
    assert_eq!(refusals, 10, "ten refusals written singly within the minute; the rest counted");
    assert_eq!(w.admin_json(&purl, &["audit", "verify"])["ok"], true);
}

#[test]
fn a_connection_that_never_completes_its_handshake_is_dropped() {
    use std::io::Read;
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let addr = purl.trim_start_matches("https://");
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    // The server closes it (EOF, or a reset) once the handshake deadline has passed.
    let closed = matches!(idle.read(&mut buf), Ok(0) | Err(_));
    assert!(closed && started.elapsed() < Duration::from_secs(60), "still open after {:?}", started.elapsed());
    assert!(started.elapsed() >= updraft_runtime::tls::HANDSHAKE_TIMEOUT - Duration::from_secs(1));
}

#[test]
fn one_package_uploaded_several_times_at_once_makes_one_record() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let pkg = w.package("dup", "1.0.0.0", &w.key);
    let uploads: Vec<_> = (0..3)
        .map(|_| {
            let mut cmd = w.admin_cli();
            cmd.arg("--provider").arg(&purl).args(["update", "add"]).arg(&pkg);
            cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap()
        })
        .collect();
    let ok = uploads.into_iter().filter_map(|c| c.wait_with_output().ok()).filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "one upload records the package; the others are told it is already there");
    let list = w.admin_json(&purl, &["update", "list"]);
    assert_eq!(list.as_array().unwrap().iter().filter(|u| u["product"] == "dup").count(), 1, "{list}");
}

/// A rogue site holding genuine credentials and passing on the centre's genuine statements
/// and machine proofs rewrites everything else in the answers to a pinned agent: a downgrade,
/// removal of another product, a package still in pre-approval, a forged high priority (and a
/// forged push), its own URL as the group's provider, and check intervals of 2³²−1 s. The agent
/// acts only on what the centre decided: nothing is installed or removed, the update its group
/// only notifies about keeps waiting, its providers and schedule stay the centre's, and every
/// refused offer is reported (to the rogue, and to the centre with the next check).
#[test]
fn a_rogue_site_with_genuine_statements_can_only_withhold() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use updraft_proto::v1::{ActionKind, CheckResponse, GroupSettings, Offer, Policy, Update};
    use updraft_tests::rogue::RogueSite;

    let w = World::new();
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    let (_centre, purl) =
        w.provider_with("centre", &["--trust-key", &pubkey, "--min-check-secs", "1", "--max-check-secs", "2"]);
    let hello1 = w.approve(&purl, &w.package("hello", "1.0.0.0", &w.key));
    w.approve(&purl, &w.package("hello", "3.0.0.0", &w.key));
    let tools1 = w.approve(&purl, &w.package("tools", "1.0.0.0", &w.key));
    let unapproved = w.admin_ok(&purl, &["update", "add", w.package("hello", "4.0.0.0", &w.key).to_str().unwrap()]);
    let unapproved = unapproved.trim().to_string();
    w.admin_ok(&purl, &["group", "create", "lab", "--providers", &purl]);
    w.admin_ok(&purl, &["deploy", "hello", "--group", "lab"]);
    w.admin_ok(&purl, &["deploy", "tools", "--group", "lab"]);
    let mut victim = w.agent_with("victim", &purl, &[]);
    wait_until("the victim known to the centre", Duration::from_secs(30), || {
        w.admin(&purl, &["machine", "show", "victim"]).status.success()
    });
    w.admin_ok(&purl, &["group", "assign", "lab", "victim"]);
    wait_until("the victim on hello 3.0 and tools 1.0", Duration::from_secs(60), || {
        w.installed("victim", "hello").as_deref() == Some("3.0.0.0")
            && w.installed("victim", "tools").as_deref() == Some("1.0.0.0")
    });
    victim.kill9();
    // The rogue takes the site's place: lab's assigned provider. Lab now only notifies, and
    // hello 3.1 is approved (not high priority).
    let forged: Arc<std::sync::Mutex<Vec<Offer>>> = Arc::default();
    let evil = "https://evil.example:1".to_string();
    let evil_policy = Policy {
        group: "default".into(),
        settings: Some(GroupSettings {
            mode: 1,
            install_day: -1,
            install_hour: -1,
            providers: vec![evil.clone()],
            download_early: false,
        }),
        managed: false,
    };
    let offers = forged.clone();
    let tamper = Arc::new(move |a: &mut CheckResponse| {
        a.offers = offers.lock().unwrap().clone();
        a.policy = Some(evil_policy.clone());
        a.min_check_interval_secs = u32::MAX;
        a.max_check_interval_secs = u32::MAX;
        a.catalog_seq = u64::MAX / 2;
    });
    let mut rogue = RogueSite::new(w.transport("victim", "agent").endpoint(&purl).unwrap(), tamper);
    let hello31 = w.approve(&purl, &w.package("hello", "3.1.0.0", &w.key));
    rogue.forged_push = Some(hello31.clone());
    let (checks, reports) = (rogue.checks.clone(), rogue.reports.clone());
    let rogue_url = rogue.spawn(&w);
    w.admin_ok(&purl, &["group", "set", "lab", "--mode", "notify", "--providers", &rogue_url]);

    // Genuine records, as the rogue has them from its replica.
    let list = w.admin_json(&purl, &["update", "list"]);
    let record = |id: &str| -> Update {
        let u = list.as_array().unwrap().iter().find(|u| u["id"] == id).unwrap_or_else(|| panic!("{id} in {list}"));
        Update {
            id: id.into(),
            product: u["product"].as_str().unwrap().into(),
            version: u["version"].as_str().unwrap().into(),
            content_hash: u["content_hash"].as_str().unwrap().into(),
            size: u["size"].as_u64().unwrap(),
            state: 2,
            install_type: 1,
            ..Default::default()
        }
    };
    let offer = |action: ActionKind, u: Update, rollback: &str| Offer {
        action: action as i32,
        update: Some(u),
        rollback_to_version: rollback.into(),
        ..Default::default()
    };
    *forged.lock().unwrap() = vec![
        offer(ActionKind::Install, record(&hello1), ""),
        offer(ActionKind::Remove, record(&tools1), "0.9.0.0"),
        offer(ActionKind::Install, Update { state: 1, ..record(&unapproved) }, ""),
        offer(ActionKind::Install, Update { high_priority: true, ..record(&hello31) }, ""),
    ];
    let _victim = w.agent_with("victim", &rogue_url, &[]);

    // Three answers from the rogue: the first two checks (the start-up one and the forged
    // push's, or a scheduled one) have been acted on, and the interval it sent did not stop
    // the schedule (the centre's bounds are 1-2 s).
    wait_until("three checks answered by the rogue", Duration::from_secs(60), || checks.load(Ordering::SeqCst) >= 3);
    assert_eq!(w.installed("victim", "hello").as_deref(), Some("3.0.0.0"), "no downgrade, no 4.0, no hurried 3.1");
    assert_eq!(w.installed("victim", "tools").as_deref(), Some("1.0.0.0"), "nothing removed");
    assert!(!w.root("victim").join("tools_old").exists() && !w.root("victim").join("hello_old").exists());
    let st: serde_json::Value = serde_json::from_slice(&w.agent_cmd("victim", &["status", "--json"]).stdout).unwrap();
    assert_eq!(st["group"], "lab", "{st}");
    assert_eq!(st["mode"], "notify", "{st}");
    assert!(!st["providers"].to_string().contains(&evil), "the rogue cannot assign providers: {st}");
    assert!(st["waiting"].to_string().contains(&hello31), "3.1 waits, as the group says: {st}");
    let problems = st["problems"].to_string();
    for id in [&hello1, &tools1, &unapproved] {
        assert!(problems.contains(&format!("{id} (")), "refusal of {id} reported: {problems}");
    }
    assert!(!problems.contains(&format!("{hello31} (")), "3.1 is what the centre decided: {problems}");
    let refusals = reports.lock().unwrap().iter().filter(|a| a.detail.contains("signed decisions")).count();
    assert!(refusals >= 3, "each refusal recorded as activity: {refusals}");
    // The centre hears of it with the checks the rogue passed on.
    wait_until("the centre sees the refusals", Duration::from_secs(30), || {
        machine(&w, &purl, "victim").to_string().contains(&format!("refused the removal of {tools1}"))
    });
}

/// Overwrites one byte in the middle of a file (same size: only a hash can tell).
fn corrupt(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// A blob that rotted on a site's disk is served once: the agent's download fails its hash,
/// the agent reports it, the site re-hashes that blob, quarantines it and fetches it again, and
/// the agent installs on its next try. At the centre, the periodic scrub finds a rotten blob
/// by itself, quarantines it and records it as activity.
#[test]
fn a_corrupt_blob_is_quarantined_reported_and_fetched_again() {
    let w = World::new();
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    let (_centre, purl) = w.provider_with("centre", &["--trust-key", &pubkey, "--scrub-interval-secs", "1"]);
    let (_site, surl) = w.remote("site", &purl);
    let id = w.publish(&purl, &w.package("app", "1.0.0.0", &w.key));
    w.admin_ok(&purl, &["update", "prestage", &id]);
    let shown = w.admin_json(&purl, &["update", "show", &id]);
    let hex = shown["content_hash"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let site_blob = w.path("site").join("blobs/sha256").join(&hex);
    wait_until("the site holds the blob", Duration::from_secs(30), || site_blob.is_file());
    corrupt(&site_blob);

    let _m = w.agent("m", &surl);
    wait_until("m installs app from the site", Duration::from_secs(60), || {
        w.installed("m", "app").as_deref() == Some("1.0.0.0")
    });
    assert!(w.path("site").join("blobs/quarantine").join(&hex).is_file(), "the rotten copy is kept aside");
    let acts = w.admin_json(&purl, &["activity", "--machine", "m", "--limit", "200"]).to_string();
    assert!(acts.contains("verify-failed") && acts.contains("content hash is"), "m reported the bad download: {acts}");

    // The centre's own copy rots: the next scrub pass quarantines it and says so.
    let centre_blob = w.path("centre").join("blobs/sha256").join(&hex);
    corrupt(&centre_blob);
    wait_until("the centre's scrub records the rotten blob", Duration::from_secs(30), || {
        w.admin_json(&purl, &["activity", "--machine", "centre"]).to_string().contains("quarantined")
    });
    assert!(!centre_blob.exists() && w.path("centre").join("blobs/quarantine").join(&hex).is_file());
}

/// What the provider and the agent keep on disk is their owner's alone, and a second agent
/// daemon cannot share a state directory with a running one.
#[test]
fn stores_and_agent_state_are_owner_only_and_one_daemon_holds_a_state_directory() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    w.publish(&purl, &w.package("app", "1.0.0.0", &w.key));
    let _a = w.agent("m", &purl);
    // The tree is live a moment before the receipt is saved: wait for the state file it asserts.
    wait_until("m installed app and saved its state", Duration::from_secs(30), || {
        w.installed("m", "app").is_some()
            && w.state("m").join("state.json").exists()
            && !w.state("m").join("journal.json").exists()
    });
    let mode = |p: std::path::PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(w.path("centre")), 0o700, "the provider's store directory");
    assert_eq!(mode(w.state("m")), 0o700, "the agent's state directory");
    assert_eq!(mode(w.state("m").join("state.json")), 0o600, "the agent's state file");

    let mut second = w.agent("m", &purl);
    assert!(second.wait_exit(Duration::from_secs(30)), "a second daemon on the same state directory must not run");
    assert!(second.log_text().contains("another agent daemon"), "{}", second.log_text());
    assert_eq!(w.installed("m", "app").as_deref(), Some("1.0.0.0"));
}
