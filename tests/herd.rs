//! The push herd: after a high-priority mark every agent checks at once. Every check must be
//! answered (none left waiting on a lost flush), admin calls must stay responsive meanwhile,
//! and a fleet behind a site must take the pushed update with the site fetching it once.
use std::time::{Duration, Instant};

use updraft_proto::v1::ListUpdatesRequest;
use updraft_proto::v1::admin_client::AdminClient;
use updraft_tests::herdsim::check_all;
use updraft_tests::{World, wait_until};

/// Distinct machines, each on its own connection, all checking at once.
const CHECKERS: usize = 400;

#[test]
fn a_herd_of_checks_is_all_answered_while_admin_calls_stay_responsive() {
    // Plaintext: one test process may speak for many machines (with TLS each agent's
    // certificate names its one machine). The herd's cost is the same.
    let w = World::insecure();
    // Every simulated machine connects from 127.0.0.1: lift the per-address limit for them.
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    let (_p, purl) = w.provider_with("centre", &["--trust-key", &pubkey, "--max-connections-per-peer", "1000"]);
    w.publish(&purl, &w.package("app", "1.0.0.0", &w.key));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let (answers, listed) = rt.block_on(async {
        // While the herd is being answered, an administrator is answered too.
        let admin = async {
            let ch =
                updraft_tests::channel(tonic::transport::Endpoint::from_shared(purl.clone()).unwrap()).await.unwrap();
            let call = AdminClient::new(ch).list_updates(ListUpdatesRequest::default()).await;
            call.map(|_| ()).map_err(|s| s.to_string())
        };
        check_all(
            &purl,
            CHECKERS,
            "herd",
            Duration::from_secs(60),
            tokio::time::timeout(Duration::from_secs(20), admin),
        )
        .await
    });
    assert!(matches!(listed, Ok(Ok(()))), "admin call during the herd: {listed:?}");
    for a in &answers {
        let offers = &a.result.as_ref().expect("every check answered: the herd must not stall").offers;
        assert_eq!(offers.len(), 1, "each machine of the default group is offered app");
    }
    assert_eq!(answers.len(), CHECKERS);
    let last = answers.iter().map(|a| a.took).max().unwrap_or_default();
    eprintln!("{CHECKERS} concurrent checks answered, the last after {last:?}");
    // Every checker is recorded (and reaches the disk with the next commit).
    wait_until("every checker in the machine list", Duration::from_secs(30), || {
        w.admin_json(&purl, &["machine", "list"]).as_array().unwrap().len() == CHECKERS
    });
}

#[test]
fn fifty_agents_behind_a_site_take_a_pushed_update() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (_r, rurl) = w.remote("branch", &purl);
    w.publish(&purl, &w.package("tool", "1.0.0.0", &w.key));
    w.wait_site_caught_up(&rurl, &purl);
    let names: Vec<String> = (0..50).map(|i| format!("pc-{i:02}")).collect();
    let _agents: Vec<_> = names.iter().map(|n| w.agent(n, &rurl)).collect();
    wait_until("every agent on 1.0", Duration::from_secs(120), || {
        names.iter().all(|n| w.installed(n, "tool").as_deref() == Some("1.0.0.0"))
    });
    let wan_before = w.admin_json(&rurl, &["site", "status"])["wan_bytes"].as_u64().unwrap();

    // The fix, marked high priority: every agent is pushed and checks at once.
    let pkg = w.package_with("tool", "1.0.1.0", &w.key, &["--install-type", "patch"]);
    let id = w.approve(&purl, &pkg);
    let size = w.admin_json(&purl, &["update", "show", &id])["size"].as_u64().unwrap();
    let pushed = Instant::now();
    w.admin_ok(&purl, &["update", "priority", &id, "high"]);
    wait_until("every agent on the fix", Duration::from_secs(120), || {
        names.iter().all(|n| w.installed(n, "tool").as_deref() == Some("1.0.1.0"))
    });
    eprintln!("50 agents behind a site on the fix {:?} after the push", pushed.elapsed());
    let wan = w.admin_json(&rurl, &["site", "status"])["wan_bytes"].as_u64().unwrap();
    assert_eq!(wan - wan_before, size, "the site fetched the fix once");
}

/// Back-pressure: a provider serving its limit of downloads makes the next wait its turn, then
/// tells it to come back; the agent, pushed, comes back by itself within seconds (not at its
/// next scheduled check) and installs once a slot is free.
#[test]
fn a_busy_provider_turns_downloads_away_and_a_pushed_agent_comes_back_by_itself() {
    use futures::StreamExt;
    use updraft_proto::v1::BlobRequest;
    use updraft_proto::v1::agent_api_client::AgentApiClient;

    let w = World::insecure();
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    // One download slot; a download waits for it at most 1 s (half the request timeout).
    let (_p, purl) =
        w.provider_with("centre", &["--trust-key", &pubkey, "--max-downloads", "1", "--request-timeout-secs", "2"]);
    // A package large enough that an unread download of it holds its slot (more than the
    // flow-control windows and read-ahead between provider and client).
    let hog = w.approve(&purl, &w.noise_package("hog", "1.0.0.0", 24));
    let hog_hash = w.admin_json(&purl, &["update", "show", &hog])["content_hash"].as_str().unwrap().to_string();
    let _agent = w.agent("pc-1", &purl);
    wait_until("the agent registered", Duration::from_secs(60), || {
        w.admin_json(&purl, &["machine", "list"]).as_array().unwrap().iter().any(|m| m["name"] == "pc-1")
    });

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // The slot is taken once the download is answered; the stream is then left unread.
    let held = rt.block_on(async {
        let ch = updraft_tests::channel(tonic::transport::Endpoint::from_shared(purl.clone()).unwrap()).await.unwrap();
        let mut c = AgentApiClient::new(ch);
        let mut s = c.download(BlobRequest { content_hash: hog_hash, offset: 0 }).await.unwrap().into_inner();
        s.next().await.unwrap().unwrap();
        s
    });

    let id = w.publish(&purl, &w.package("tool", "1.0.0.0", &w.key));
    w.admin_ok(&purl, &["update", "priority", &id, "high"]);
    // The pushed agent's download is turned away (the provider is at its limit)...
    wait_until("the agent told the download slots are busy", Duration::from_secs(60), || {
        let st: serde_json::Value =
            serde_json::from_slice(&w.agent_cmd("pc-1", &["status", "--json"]).stdout).unwrap_or_default();
        st["last_error"].as_str().is_some_and(|e| e.contains("download slots"))
    });
    assert_eq!(w.installed("pc-1", "tool"), None);
    // ...and once the slot is free it comes back by itself: no check is asked for, and its
    // scheduled one is an hour away.
    let freed = Instant::now();
    drop(held);
    wait_until("the agent on tool 1.0", Duration::from_secs(60), || {
        w.installed("pc-1", "tool").as_deref() == Some("1.0.0.0")
    });
    eprintln!("installed {:?} after the slot was freed", freed.elapsed());
}
