//! End-to-end tests: the real provider, remote-provider, agent and admin-cli binaries as
//! separate processes talking gRPC over loopback, with real sled stores and real installs.
use std::time::Duration;

use updraft_core::keys::ReleaseKey;
use updraft_core::package::{FileEntry, Manifest, write_package};
use updraft_tests::rogue::Rogue;
use updraft_tests::{World, stderr, wait_until};

mod applicability;
mod catalog;
mod certificates;
mod console;
mod database;
mod docs;
mod fleet;
mod herd;
mod insiders;
mod install;
mod lifecycle;
mod network;
mod observability;
mod rollouts;
mod security;
mod sites;

const T: Duration = Duration::from_secs(30);

fn machines(w: &World, provider: &str) -> Vec<serde_json::Value> {
    w.admin_json(provider, &["machine", "list"]).as_array().unwrap().clone()
}

fn machine<'a>(ms: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    ms.iter().find(|m| m["name"] == name)
}

#[test]
fn v1_through_the_provider_then_v2_through_a_remote_provider() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (_r, rurl) = w.remote("site-a", &purl);
    let v1 = w.publish(&purl, &w.package("editor", "1.0.0.0", &w.key));

    let _a = w.agent("direct-1", &purl);
    wait_until("v1 installed directly", T, || w.installed("direct-1", "editor").as_deref() == Some("1.0.0.0"));
    assert!(w.root("direct-1").join("editor/bin/run").is_file());

    w.wait_site_has(&rurl, &v1);
    let _b = w.agent("site-1", &rurl);
    wait_until("v1 installed through the site", T, || w.installed("site-1", "editor").as_deref() == Some("1.0.0.0"));

    // v2 is approved without priority: agents take it when they next check (here: by hand).
    let v2 = w.publish(&purl, &w.package("editor", "2.0.0.0", &w.key));
    // The site serves no admin API: it refuses rather than pretends.
    let out = w.admin(&rurl, &["update", "list"]);
    assert!(!out.status.success());
    // `agent check` makes the daemon check now; the site may need a moment to follow the catalog.
    // The state waited for is v2 installed, whichever check installed it: a check the agent had
    // queued (for its push stream's hello on subscribing) may run after v2 is published and take it.
    wait_until("v2 installed through the site, a manual check asked for", T, || {
        let out = w.agent_cmd("site-1", &["check"]);
        assert!(out.status.success(), "agent check failed: {}", stderr(&out));
        w.installed("site-1", "editor").as_deref() == Some("2.0.0.0")
    });
    assert_eq!(w.installed("site-1", "editor").as_deref(), Some("2.0.0.0"));
    assert_eq!(std::fs::read_to_string(w.root("site-1").join("editor_old/VERSION")).unwrap(), "1.0.0.0");
    assert!(!w.root("site-1").join("editor_update_pending").exists());

    // agent status asks the daemon and shows the new version with its predecessor.
    let st: serde_json::Value = serde_json::from_slice(&w.agent_cmd("site-1", &["status", "--json"]).stdout).unwrap();
    assert_eq!(st["daemon_running"], true);
    assert_eq!(st["installed"][0]["version"], "2.0.0.0");
    assert_eq!(st["installed"][0]["previous_version"], "1.0.0.0");

    // The centre sees both machines, the site one through the site, and the site itself.
    wait_until("site report reaches the centre", T, || {
        let ms = machines(&w, &purl);
        machine(&ms, "site-1").is_some_and(|m| m["via"] == "site-a" && m["installed"][0]["version"] == "2.0.0.0")
            && machine(&ms, "site-a").is_some_and(|m| m["is_remote_provider"] == true)
            && machine(&ms, "direct-1").is_some_and(|m| m["via"] == "direct")
    });
    let acts = w.admin_json(&purl, &["activity", "--machine", "site-1"]);
    assert!(
        acts.as_array().unwrap().iter().any(|a| a["kind"] == "installed" && a["update_id"] == v2.as_str()),
        "{acts}"
    );
    assert!(
        acts.as_array().unwrap().iter().any(|a| a["kind"] == "installed" && a["update_id"] == v1.as_str()),
        "{acts}"
    );
}

#[test]
fn high_priority_push_reaches_direct_and_site_agents_at_once() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let (_r, rurl) = w.remote("site-b", &purl);
    let v1 = w.publish(&purl, &w.package("viewer", "1.0.0.0", &w.key));
    w.wait_site_has(&rurl, &v1);
    // Both agents pin the centre's catalog key: the site passes on the centre's signed
    // statement, and a push must not outrun it.
    let pin = ["--catalog-key", w.catalog_pub.to_str().unwrap(), "--min-interval", "3600"];
    let _a = w.agent_with("d1", &purl, &pin);
    let _b = w.agent_with("s1", &rurl, &pin);
    wait_until("v1 everywhere", T, || {
        w.installed("d1", "viewer").as_deref() == Some("1.0.0.0")
            && w.installed("s1", "viewer").as_deref() == Some("1.0.0.0")
    });
    // Both push streams must be open first: a stream that opens after v2 exists reports the
    // newer catalog, and the agent rightly checks at once.
    wait_until("push streams open", T, || {
        [&_a, &_b].iter().all(|p| p.log_text().contains("push stream open"))
            && [&_a, &_b].iter().all(|p| p.log_text().matches("check finished").count() >= 1)
    });
    std::thread::sleep(Duration::from_millis(300));
    let v2 = w.publish(&purl, &w.package("viewer", "2.0.0.0", &w.key));
    // Agents check hourly: without a push nothing moves.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.installed("d1", "viewer").as_deref(), Some("1.0.0.0"));
    assert_eq!(w.installed("s1", "viewer").as_deref(), Some("1.0.0.0"));

    let marked = w.admin_json(&purl, &["update", "priority", &v2, "high"]);
    assert_eq!(marked[0]["high_priority"], true);
    let start = std::time::Instant::now();
    wait_until("pushed v2 everywhere", Duration::from_secs(15), || {
        w.installed("d1", "viewer").as_deref() == Some("2.0.0.0")
            && w.installed("s1", "viewer").as_deref() == Some("2.0.0.0")
    });
    eprintln!("push reached both agents in {:?}", start.elapsed());
    for agent in [&_a, &_b] {
        assert!(!agent.log_text().contains("answer refused"), "{}", agent.log_text());
    }
}

#[test]
fn package_signed_by_another_key_is_refused_and_reported() {
    let w = World::new();
    // The provider trusts no key, so it stores the package; the agent pins its own key.
    let (_p, purl) = w.provider("centre", false);
    let intruder = ReleaseKey::generate().unwrap();
    let ikey = w.path("intruder");
    intruder.save(&ikey).unwrap();
    let id = w.publish(&purl, &w.package("tool", "1.0.0.0", &ikey.with_extension("key")));
    let _a = w.agent("m", &purl);
    wait_until("refusal reported", T, || {
        let acts = w.admin_json(&purl, &["activity", "--machine", "m"]);
        acts.as_array().unwrap().iter().any(|a| {
            a["kind"] == "verify-failed"
                && a["update_id"] == id.as_str()
                && a["detail"].as_str().unwrap().contains("not signed by the trusted release key")
        })
    });
    assert!(w.installed("m", "tool").is_none());
    let entries: Vec<_> = std::fs::read_dir(w.root("m")).unwrap().collect();
    assert!(entries.is_empty(), "nothing may be staged or installed: {entries:?}");
    let st: serde_json::Value = serde_json::from_slice(&w.agent_cmd("m", &["status", "--json"]).stdout).unwrap();
    assert!(st["last_error"].as_str().unwrap().contains("not signed"), "{st}");
    // The failed install puts the machine in the report's error group, with the reason.
    wait_until("machine reported in error", T, || {
        let m = w.admin_json(&purl, &["machine", "show", "m"]);
        m["status"] == "error" && m["notes"][0].as_str().unwrap_or("").contains("install of tool 1.0.0.0 failed")
    });
}

/// A correctly signed package whose manifest names a path outside its folder.
fn escaping_package(w: &World, path: &str) -> Vec<u8> {
    let payload = b"owned\n".to_vec();
    let mut manifest = Manifest::new("evil", "1.0.0.0".parse().unwrap());
    manifest.files.push(FileEntry {
        path: path.into(),
        mode: 0o644,
        size: payload.len() as u64,
        sha256: updraft_core::hash::sha256_hex(&payload),
    });
    let out = w.path("evil.pkg");
    let key = ReleaseKey::load(&w.key).unwrap();
    write_package(&out, &manifest, &key, |wr, _| {
        wr.write_all(&payload).map_err(|e| updraft_core::CoreError::io("payload", e))
    })
    .unwrap();
    std::fs::read(out).unwrap()
}

#[test]
fn manifest_path_outside_its_folder_is_refused_everywhere() {
    let w = World::new();
    let bytes = escaping_package(&w, "../escaped.txt");

    // admin-cli refuses it before uploading; the provider would refuse it too.
    let (_p, purl) = w.provider("centre", true);
    let out = w.admin(&purl, &["update", "add", w.path("evil.pkg").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("escapes its folder"), "{}", stderr(&out));
    assert!(w.admin_json(&purl, &["update", "list"]).as_array().unwrap().is_empty(), "nothing imported");

    // A rogue provider offers it anyway: the agent refuses and reports, writing nothing outside staging.
    let rogue = Rogue::new("evil", "1.0.0.0", bytes);
    let reports = rogue.reports.clone();
    let url = rogue.spawn(&w);
    // No catalog pinned: this is the release signature's turn (the layer under the catalog's).
    let _a = w.agent_with("victim", &url, &["--allow-unsigned-catalog", "--min-interval", "3600"]);
    wait_until("refusal reported to the rogue", T, || {
        reports.lock().unwrap().iter().any(|a| a.kind == 5 && a.detail.contains("escapes its folder"))
    });
    assert!(!w.root("victim").join("escaped.txt").exists());
    assert!(!w.path("escaped.txt").exists());
    assert!(w.installed("victim", "evil").is_none());
    assert!(!w.root("victim").join("evil_update_pending").exists());
}

#[test]
fn swapped_content_from_a_rogue_provider_is_refused() {
    let w = World::new();
    // Genuine v1 bytes offered as v2: signature is fine, the label is not.
    let genuine = std::fs::read(w.package("app", "1.0.0.0", &w.key)).unwrap();
    let rogue = Rogue::new("app", "2.0.0.0", genuine);
    let reports = rogue.reports.clone();
    let url = rogue.spawn(&w);
    // No catalog pinned: this is the package check's turn (the layer under the catalog's).
    let _a = w.agent_with("m", &url, &["--allow-unsigned-catalog", "--min-interval", "3600"]);
    wait_until("mislabel refusal", T, || {
        reports.lock().unwrap().iter().any(|a| a.kind == 5 && a.detail.contains("offered as app 2.0.0.0"))
    });
    assert!(w.installed("m", "app").is_none());
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let src = w.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let key = w.key.to_str().unwrap();

    let out = w.admin(
        &purl,
        &[
            "package",
            "build",
            "--product",
            "x",
            "--version",
            "1.2.x.4",
            "--from",
            src.to_str().unwrap(),
            "--key",
            key,
            "--out",
            "/tmp/never",
        ],
    );
    assert!(!out.status.success() && stderr(&out).contains("malformed version \"1.2.x.4\""), "{}", stderr(&out));

    let pkg = w.package("x", "1.0.0.0", &w.key);
    let id = w.admin_ok(&purl, &["update", "add", pkg.to_str().unwrap()]).trim().to_string();

    let out = w.admin(&purl, &["update", "state", &id, "no-such-id", "ga"]);
    assert!(!out.status.success() && stderr(&out).contains("no update with id \"no-such-id\""), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(4), "not found has its own exit status");
    let list = w.admin_json(&purl, &["update", "list"]);
    assert_eq!(list[0]["state"], "pre-approval", "a failed multi-id change must change nothing");

    let out = w.admin(&purl, &["update", "state", &id, "approved"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown update state"), "{}", stderr(&out));

    let bytes = std::fs::read(&pkg).unwrap();
    let cut = w.path("truncated.pkg");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let out = w.admin(&purl, &["update", "add", cut.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("truncated.pkg"), "{}", stderr(&out));

    let out = w.admin(&purl, &["update", "add", pkg.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("already in the catalog"), "{}", stderr(&out));
    assert_eq!(w.admin_json(&purl, &["update", "list"]).as_array().unwrap().len(), 1);

    let dead = format!("{}://127.0.0.1:{}", w.scheme(), updraft_tests::free_port());
    let out = w.admin(&dead, &["update", "list"]);
    assert!(!out.status.success() && stderr(&out).contains("cannot reach provider"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(6), "an unreachable provider has its own exit status");

    // A provider that takes the connection and then says nothing is given up on after
    // --connect-timeout, with the same status; the flag is checked first.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute = format!("{}://{}", w.scheme(), silent.local_addr().unwrap());
    let out = w.admin(&mute, &["--connect-timeout", "1", "group", "list"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot reach provider") && (w.insecure || err.contains("within 1s")), "{err}");
    let out = w.admin(&purl, &["--connect-timeout", "0", "group", "list"]);
    assert!(!out.status.success() && stderr(&out).contains("--connect-timeout"), "{}", stderr(&out));

    // A reader that goes away (`| head`) ends admin-cli quietly, as it does any Unix tool.
    let mut piped = std::process::Command::new("bash");
    piped.arg("-c").arg("\"$0\" --provider \"$1\" update list | true").arg(updraft_tests::bin("admin-cli")).arg(&purl);
    piped.envs(w.tls_env(updraft_tests::ADMIN, "admin", &[]));
    let out = updraft_tests::output(&mut piped);
    assert!(!stderr(&out).contains("panicked") && !stderr(&out).contains("Broken pipe"), "{}", stderr(&out));

    let out = w.agent_cmd("nobody", &["check"]);
    assert!(!out.status.success() && stderr(&out).contains("no agent daemon"), "{}", stderr(&out));
}

/// admin-cli prints what it is asked for: `update show` field by field (and its JSON, from the
/// same view, with every field of the record), spans read like other tools (`2m` is two
/// minutes), and completions and man pages come from the grammar.
#[test]
fn admin_cli_shows_records_reads_spans_and_documents_itself() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    let pkg = w.package("viewer", "2.0.1.0", &w.key);
    let id = w.publish(&purl, &pkg);
    w.admin_ok(&purl, &["update", "prestage", &id]);

    let u = w.admin_json(&purl, &["update", "show", &id]);
    assert_eq!(u["prestage"], true, "{u}");
    assert_eq!(u["state"], "ga");
    assert!(u["status"]["notes"].is_array(), "{u}");
    let text = w.admin_ok(&purl, &["update", "show", &id]);
    let line = |key: &str| {
        text.lines().find(|l| l.starts_with(&format!("{key:<20} "))).unwrap_or_else(|| panic!("no {key}: {text}"))[21..]
            .to_string()
    };
    assert_eq!(line("prestage"), "yes");
    assert_eq!(line("install properties"), "-", "properties, not status notes, on that line");
    assert_eq!(line("version"), "2.0.1.0");
    assert!(line("fleet").starts_with("installed on 0"), "{text}");

    w.admin_ok(&purl, &["activity", "--last", "2m"]);
    w.admin_ok(&purl, &["report", "--last", "6mo"]);
    let out = w.admin(&purl, &["activity", "--last", "2x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--last: invalid time span \"2x\""), "{}", stderr(&out));
    let out = w.admin(&purl, &["activity", "--since", "2026-02-30"]);
    assert!(stderr(&out).contains("--since: invalid date \"2026-02-30\""), "{}", stderr(&out));

    let completions = w.admin_ok(&purl, &["completions", "bash"]);
    assert!(completions.contains("complete -F _admin__cli") && completions.contains("update"), "{completions}");
    let man = w.path("man");
    w.admin_ok(&purl, &["man", "--out", man.to_str().unwrap()]);
    for page in ["admin-cli.1", "admin-cli-update.1", "admin-cli-update-show.1", "admin-cli-group-assign.1"] {
        let text = std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}: {text}");
    }
}

#[test]
fn acknowledged_admin_writes_survive_kill_9() {
    let w = World::new();
    let (mut p, purl) = w.provider("centre", true);
    let pkg = w.package("db", "3.1.0.7", &w.key);
    let id = w.publish(&purl, &pkg);
    w.admin_ok(&purl, &["update", "priority", &id, "high"]);
    p.kill9();
    // Same store, same port.
    let _p2 = p.again();
    let u = w.admin_json(&purl, &["update", "show", &id]);
    assert_eq!(u["state"], "ga");
    assert_eq!(u["high_priority"], true);
    assert_eq!(u["version"], "3.1.0.7");
}

/// Traces by the OpenTelemetry conventions: one check is one trace agent → site → centre,
/// each call a client span whose server span is its child, named `updraft.v1.AgentApi/Check`
/// with the RPC attributes; a failed call has status Error; every span's resource names the
/// service, its version, the instance and the host.
#[test]
fn one_check_is_one_trace_from_agent_through_site_to_centre() {
    use updraft_tests::collector::SpanSeen;
    let collector = updraft_tests::collector::Collector::default();
    let endpoint = collector.spawn();
    let mut w = World::new();
    w.env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint), ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())];
    let (_p, purl) = w.provider("centre", true);
    let (_r, rurl) = w.remote("site-t", &purl);
    let id = w.publish(&purl, &w.package("traced", "1.0.0.0", &w.key));
    w.wait_site_has(&rurl, &id);
    let _a = w.agent("t1", &rurl);
    wait_until("install", T, || w.installed("t1", "traced").is_some());
    // A call the centre refuses: NOT_FOUND.
    let out = w.admin(&purl, &["update", "show", "no-such-update-1.0.0.0-000000000000"]);
    assert_eq!(out.status.code(), Some(4));

    // client span (service, name) -> its server span's service, each the parent of the next
    let child_of = |spans: &[SpanSeen], parent: &SpanSeen, service: &str, name: &str, kind: &str| -> Option<SpanSeen> {
        spans
            .iter()
            .find(|s| {
                s.trace_id == parent.trace_id
                    && s.parent_span_id == parent.span_id
                    && s.service == service
                    && s.name == name
                    && s.kind == kind
            })
            .cloned()
    };
    let joined = |spans: &[SpanSeen]| -> Option<Vec<SpanSeen>> {
        spans.iter().filter(|s| s.service == "updraft-agent" && s.name == "check").find_map(|check| {
            let call = spans.iter().find(|s| {
                s.trace_id == check.trace_id
                    && s.service == "updraft-agent"
                    && s.name == "updraft.v1.AgentApi/Check"
                    && s.kind == "SPAN_KIND_CLIENT"
            })?;
            let served =
                child_of(spans, call, "updraft-remote-provider", "updraft.v1.AgentApi/Check", "SPAN_KIND_SERVER")?;
            let forward = spans.iter().find(|s| {
                s.trace_id == check.trace_id
                    && s.service == "updraft-remote-provider"
                    && s.name == "updraft.v1.Replication/ForwardReports"
                    && s.kind == "SPAN_KIND_CLIENT"
            })?;
            let centre = child_of(
                spans,
                forward,
                "updraft-provider",
                "updraft.v1.Replication/ForwardReports",
                "SPAN_KIND_SERVER",
            )?;
            Some(vec![call.clone(), served, forward.clone(), centre])
        })
    };
    let refused = |spans: &[SpanSeen]| {
        spans.iter().find(|s| s.service == "updraft-provider" && s.name == "updraft.v1.Admin/GetUpdate").cloned()
    };
    let start = std::time::Instant::now();
    let (chain, refusal) = loop {
        let spans = collector.snapshot();
        if let (Some(chain), Some(refusal)) = (joined(&spans), refused(&spans)) {
            break (chain, refusal);
        }
        if start.elapsed() > T {
            let seen: Vec<String> = spans
                .iter()
                .map(|s| {
                    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
                    format!(
                        "{} {} {} {} parent {}",
                        s.service,
                        s.kind,
                        s.name,
                        hex(&s.trace_id),
                        hex(&s.parent_span_id)
                    )
                })
                .collect();
            panic!("no trace joins agent, site and centre; spans seen:\n{}", seen.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for s in &chain {
        let (service, method) = s.name.split_once('/').unwrap();
        assert_eq!(s.attributes.get("rpc.system").map(String::as_str), Some("grpc"), "{s:?}");
        assert_eq!(s.attributes.get("rpc.service").map(String::as_str), Some(service), "{s:?}");
        assert_eq!(s.attributes.get("rpc.method").map(String::as_str), Some(method), "{s:?}");
        assert_eq!(s.attributes.get("rpc.grpc.status_code").map(String::as_str), Some("0"), "{s:?}");
        assert!(s.attributes.get("server.address").is_some_and(|a| !a.is_empty()), "{s:?}");
        assert_ne!(s.status, 2, "{s:?}");
        for key in ["service.name", "service.version", "service.instance.id", "host.name"] {
            assert!(s.resource.get(key).is_some_and(|v| !v.is_empty()), "{key} missing: {s:?}");
        }
    }
    assert!(chain[1].attributes.get("network.peer.address").is_some_and(|a| a == "127.0.0.1"), "{:?}", chain[1]);
    assert_eq!(refusal.attributes.get("rpc.grpc.status_code").map(String::as_str), Some("5"), "{refusal:?}");
    assert_eq!(refusal.status, 2, "NOT_FOUND is an error: {refusal:?}");
    // A loop's work is not one trace that grows for ever: the site's report forwarder sends a
    // heartbeat (an empty batch) every few seconds, each in a trace of its own.
    let forwards = |spans: &[SpanSeen]| -> Vec<Vec<u8>> {
        spans
            .iter()
            .filter(|s| s.service == "updraft-remote-provider" && s.name == "forward_reports")
            .filter(|s| s.attributes.get("count").map(String::as_str) == Some("0"))
            .map(|s| s.trace_id.clone())
            .collect()
    };
    wait_until("two heartbeats traced", T, || forwards(&collector.snapshot()).len() >= 2);
    let traces = forwards(&collector.snapshot());
    let distinct: std::collections::BTreeSet<&Vec<u8>> = traces.iter().collect();
    assert_eq!(distinct.len(), traces.len(), "heartbeats share a trace: {traces:?}");
}

#[test]
fn agent_falls_back_when_its_site_has_never_synchronised() {
    let w = World::new();
    let (_p, purl) = w.provider("centre", true);
    w.publish(&purl, &w.package("fallback", "1.0.0.0", &w.key));
    // A site whose upstream does not exist: it has no catalog and must not pretend otherwise.
    let nowhere = format!("{}://127.0.0.1:{}", w.scheme(), updraft_tests::free_port());
    let (_r, rurl) = w.remote("lonely-site", &nowhere);
    let _a = w.agent("f1", &format!("{rurl},{purl}"));
    // Installed from the second provider, which recorded it: the version is live on disk a
    // moment before the check records its provider and reports, so wait for all three.
    wait_until("installed from the second provider", T, || {
        let st: serde_json::Value =
            serde_json::from_slice(&w.agent_cmd("f1", &["status", "--json"]).stdout).unwrap_or_default();
        let acts = w.admin_json(&purl, &["activity", "--machine", "f1"]);
        w.installed("f1", "fallback").as_deref() == Some("1.0.0.0")
            && st["last_provider"] == purl.as_str()
            && acts.as_array().is_some_and(|a| a.iter().any(|a| a["kind"] == "installed"))
    });
}

#[test]
fn an_install_that_keeps_failing_the_same_way_stops_being_retried() {
    let w = World::new();
    let genuine = std::fs::read(w.package("app", "1.0.0.0", &w.key)).unwrap();
    let rogue = Rogue::new("app", "2.0.0.0", genuine);
    let id = rogue.update.id.clone();
    let reports = rogue.reports.clone();
    let url = rogue.spawn(&w);
    let _a = w.agent_with("m", &url, &["--allow-unsigned-catalog", "--min-interval", "1", "--max-interval", "1"]);
    let failures = || reports.lock().unwrap().iter().filter(|a| a.kind == 5 && a.update_id == id).count();
    wait_until("three identical failures", T, || failures() == 3);
    std::thread::sleep(Duration::from_secs(4)); // several more checks
    assert_eq!(failures(), 3, "the agent must stop retrying");
    let st: serde_json::Value = serde_json::from_slice(&w.agent_cmd("m", &["status", "--json"]).stdout).unwrap();
    assert!(st["problems"][0].as_str().unwrap().contains("gave up on app 2.0.0.0 after 3 identical failures"), "{st}");
    assert!(w.installed("m", "app").is_none());
    // Asking for it by id tries again.
    let out = w.agent_cmd("m", &["apply", "--select", &id]);
    assert!(!out.status.success(), "the retry fails the same way");
    wait_until("a fourth attempt", T, || failures() == 4);
}
