//! Several providers on one PostgreSQL database (a cluster of the test's own, on a Unix
//! socket): all of them active, a change made on one reaching the push streams of another, and
//! the watched-folder duty moving when its holder is killed.
use std::time::Duration;

use updraft_tests::{World, wait_until};

const T: Duration = Duration::from_secs(40);

fn ids(w: &World, url: &str) -> Vec<String> {
    let list = w.admin_json(url, &["update", "list"]);
    list.as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn providers_on_one_database_all_serve_and_hand_over_duties() {
    let cluster = updraft_pgtest::Cluster::start();
    let db = cluster.database("updraft");
    let w = World::new();
    // One content location for both: what one imports, the other serves.
    let content = w.path("content");
    let (mut a, aurl) = w.provider_on_database("pg-a", &db, &content);
    let (mut b, burl) = w.provider_on_database("pg-b", &db, &content);

    // Both are active: an update published through one is in the other's catalog.
    let v1 = w.publish(&aurl, &w.package("viewer", "1.0.0.0", &w.key));
    assert_eq!(ids(&w, &burl), vec![v1.clone()]);

    // An agent of the second takes it, then waits with its push stream open.
    let pin = ["--catalog-key", w.catalog_pub.to_str().unwrap(), "--min-interval", "3600"];
    let agent = w.agent_with("m1", &burl, &pin);
    wait_until("v1 installed from pg-b", T, || w.installed("m1", "viewer").as_deref() == Some("1.0.0.0"));
    wait_until("push stream open", T, || {
        let log = agent.log_text();
        log.contains("push stream open") && log.matches("check finished").count() >= 1
    });

    // A fix published and marked high priority through the first reaches it through the
    // second's push stream (the second learns of it from the database).
    let v2 = w.publish(&aurl, &w.package("viewer", "2.0.0.0", &w.key));
    let marked = w.admin_json(&aurl, &["update", "priority", &v2, "high"]);
    assert_eq!(marked[0]["high_priority"], true);
    let start = std::time::Instant::now();
    wait_until("pushed v2 installed from pg-b", Duration::from_secs(15), || {
        w.installed("m1", "viewer").as_deref() == Some("2.0.0.0")
    });
    eprintln!("a mark on pg-a reached pg-b's agent in {:?}", start.elapsed());

    // One provider scans the watched folders; kill it, and the other takes the duty over.
    let drop_dir = w.path("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    w.admin_ok(&burl, &["watch", "add", drop_dir.to_str().unwrap(), "--auto"]);
    let holds = |p: &updraft_tests::Proc| p.holds_duty("content-scanner");
    wait_until("one provider holds the scanner duty", T, || holds(&a) || holds(&b));
    assert!(!(holds(&a) && holds(&b)), "two providers hold one duty");
    let (survivor, survivor_url) = if holds(&a) {
        a.kill9();
        (&b, &burl)
    } else {
        b.kill9();
        (&a, &aurl)
    };
    wait_until("the survivor takes the duty", T, || holds(survivor));
    std::fs::copy(w.package("editor", "1.0.0.0", &w.key), drop_dir.join("editor.pkg")).unwrap();
    wait_until("the dropped package imported by the survivor", T, || !drop_dir.join("editor.pkg").exists());
    let updates = w.admin_json(survivor_url, &["update", "list"]);
    let editors = updates.as_array().unwrap().iter().filter(|u| u["product"] == "editor").count();
    assert_eq!(editors, 1, "imported once: {updates}");
}

/// `provider store move --to postgres://…`: everything a directory store held — catalog,
/// groups, machines, users, the audit chain — is in the database, the blobs stay as the
/// content location, and the directory refuses to start a provider again; `store merge
/// --into postgres://… --content DIR` brings a second store's updates and blobs in.
#[test]
fn a_directory_store_moves_into_a_database() {
    let cluster = updraft_pgtest::Cluster::start();
    let db = cluster.database("moved");
    let w = World::new();
    let (mut one, url, id, mut m1) = w.provider_with_a_store("one");
    let audited = w.admin_json(&url, &["audit", "list"]).as_array().unwrap().len();
    m1.kill9();
    one.term();
    assert!(one.wait_exit(T), "the provider stops");

    let provider = updraft_tests::provider_cmd;
    let from = w.path("one");
    let (ok, text) = provider(&["store", "move", "--from", from.to_str().unwrap(), "--to", &db]);
    assert!(ok && text.contains("1 updates, 1 machines"), "{text}");
    let (ok, text) = provider(&["--store", from.to_str().unwrap(), "--listen", "127.0.0.1:0", "--insecure"]);
    assert!(!ok && text.contains("was moved to postgres://"), "{text}");
    // Moving into a database that holds a store already is refused, and changes nothing;
    // merging into it brings the other store's updates, and their blobs into the content
    // location named.
    let (mut other, other_url) = w.provider("other-store", true);
    let viewer = w.publish(&other_url, &w.package("viewer", "1.0.0.0", &w.key));
    other.term();
    assert!(other.wait_exit(T), "the other provider stops");
    let other = w.path("other-store");
    let (ok, text) = provider(&["store", "move", "--from", other.to_str().unwrap(), "--to", &db]);
    assert!(!ok && text.contains("already holds a store"), "{text}");
    let (ok, text) = provider(&["store", "merge", "--from", other.to_str().unwrap(), "--into", &db]);
    assert!(!ok && text.contains("needs --content"), "{text}");
    let merge =
        ["store", "merge", "--from", other.to_str().unwrap(), "--into", &db, "--content", from.to_str().unwrap()];
    let (ok, text) = provider(&merge);
    assert!(ok && text.contains("\"updates_added\": 1") && text.contains("\"blobs_copied\": 1"), "{text}");

    let (_two, url) = w.provider_on_database("two", &db, &from);
    assert_eq!(w.admin_json(&url, &["update", "show", &id])["id"], id.as_str());
    assert_eq!(w.admin_json(&url, &["update", "show", &viewer])["product"], "viewer");
    let groups = w.admin_json(&url, &["group", "list"]);
    assert!(groups.as_array().unwrap().iter().any(|g| g["name"] == "lab"), "{groups}");
    let machines = w.admin_json(&url, &["machine", "list"]);
    assert!(machines.as_array().unwrap().iter().any(|m| m["name"] == "m1"), "{machines}");
    // The audit chain came along whole, and goes on.
    let audit = w.admin_json(&url, &["audit", "list"]);
    assert!(audit.as_array().unwrap().len() >= audited, "{audit}");
    w.admin_ok(&url, &["audit", "verify"]);
    // The blobs stayed where they were, and the merged ones joined them: an agent gets both
    // packages from them.
    let _m2 = w.agent("m2", &url);
    wait_until("m2 on editor and viewer from the database's provider", T, || {
        w.installed("m2", "editor").as_deref() == Some("1.0.0.0")
            && w.installed("m2", "viewer").as_deref() == Some("1.0.0.0")
    });
}

/// Providers of one database with content locations of their own: a package uploaded through
/// one is fetched by another on first demand (and checked against its hash) to serve an agent;
/// `provider pair` lists every provider of the database as active.
#[test]
fn a_provider_fetches_content_it_lacks_from_another_of_the_database() {
    let cluster = updraft_pgtest::Cluster::start();
    let db = cluster.database("content");
    let w = World::new();
    let (_a, aurl) = w.provider_on_database("pg-a", &db, &w.path("content-a"));
    let (_b, burl) = w.provider_on_database("pg-b", &db, &w.path("content-b"));
    let v1 = w.publish(&aurl, &w.package("viewer", "1.0.0.0", &w.key));
    let hash = w.admin_json(&aurl, &["update", "show", &v1])["content_hash"].as_str().unwrap().to_string();
    let blob = |dir: &str| {
        let hex = hash.split_once(':').map_or(hash.as_str(), |(_, h)| h).to_string();
        walk(&w.path(dir)).into_iter().any(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(&hex)))
    };
    assert!(blob("content-a") && !blob("content-b"), "the upload went to pg-a's content only");
    wait_until("both providers advertise themselves", T, || {
        let pair = w.admin_json(&burl, &["provider", "pair"]);
        pair["members"].as_array().is_some_and(|m| m.iter().filter(|m| m["role"] == "active").count() == 2)
    });

    let _agent = w.agent("m1", &burl);
    wait_until("v1 installed from pg-b", T, || w.installed("m1", "viewer").as_deref() == Some("1.0.0.0"));
    assert!(blob("content-b"), "pg-b keeps what it fetched");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A PostgreSQL failover: the provider's URL names the primary and its standby with
/// `target_session_attrs=read-write`. The primary crashes and the standby is promoted; the
/// provider follows — its writes are acknowledged again, and the one it acknowledged before
/// (commits wait for the standby) is there.
#[test]
fn a_provider_follows_a_postgresql_failover() {
    let primary = updraft_pgtest::Cluster::start();
    primary.database("updraft");
    let standby = primary.standby();
    primary.synchronous();
    let url = primary.url_with(&standby, "updraft");
    let w = World::new();
    let (_p, purl) = w.provider_on_database("pg-f", &url, &w.path("content"));
    w.admin_ok(&purl, &["group", "create", "before"]);

    primary.crash();
    standby.promote();
    let failed_over = std::time::Instant::now();
    wait_until("a write acknowledged after the failover", T, || {
        w.admin(&purl, &["group", "create", "after"]).status.success()
    });
    eprintln!("failover: writes acknowledged again {:?} after the promotion", failed_over.elapsed());
    let groups = w.admin_json(&purl, &["group", "list"]);
    for g in ["before", "after"] {
        assert!(groups.as_array().unwrap().iter().any(|x| x["name"] == g), "{g} missing: {groups}");
    }
}
