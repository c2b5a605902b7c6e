//! Metrics as an SRE reads them: a real Prometheus server (Debian's `prometheus`, which
//! `.ci/run` installs) scrapes a provider, a site and an agent during an install, and PromQL
//! through its HTTP API returns what happened.
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use updraft_tests::{World, free_port, http_get, wait_until};

const T: Duration = Duration::from_secs(60);

/// A Prometheus server on loopback scraping `targets` every second; killed when dropped.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(w: &World, targets: &[std::net::SocketAddr]) -> Prometheus {
        let dir = w.path("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: updraft\n    \
             static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the prometheus server (Debian package `prometheus`; .ci/run installs it)");
        let p = Prometheus { child, addr };
        wait_until("prometheus ready", T, || http_get(addr, "/-/ready").is_ok_and(|(code, _)| code == 200));
        p
    }

    /// An instant PromQL query: the HTTP status and the answer.
    fn query(&self, query: &str) -> (u16, String) {
        let encoded: String = query
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        http_get(self.addr, &format!("/api/v1/query?query={encoded}")).unwrap_or((0, String::new()))
    }

    /// The value of an instant PromQL query with one result, if it has one.
    fn value(&self, query: &str) -> Option<f64> {
        let (code, body) = self.query(query);
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query` has the value `want`, and says what it was otherwise.
    fn wait_for(&self, query: &str, want: f64) {
        let mut last = None;
        wait_until(&format!("{query} = {want}"), T, || {
            last = self.value(query);
            last == Some(want)
        });
        assert_eq!(last, Some(want), "{query}");
    }
}

#[test]
fn prometheus_scrapes_a_provider_a_site_and_an_agent_during_an_install() {
    let w = World::new();
    let (mut centre, curl) = w.provider("centre", true);
    let (mut site, surl) = w.remote("branch", &curl);
    let mut agent = w.agent_with("pc-1", &surl, &["--min-interval", "3600", "--metrics-listen", "127.0.0.1:0"]);
    let targets = [centre.probe_addr(), site.probe_addr(), agent.probe_addr()];
    let prom = Prometheus::start(&w, &targets);
    prom.wait_for("count(up == 1)", 3.0);

    let pkg = w.package("editor", "1.0.0.0", &w.key);
    let size = std::fs::metadata(&pkg).unwrap().len() as f64;
    let id = w.publish(&curl, &pkg);
    w.admin_ok(&curl, &["update", "priority", &id, "high"]);
    wait_until("pc-1 installs the update", T, || w.installed("pc-1", "editor").as_deref() == Some("1.0.0.0"));

    // What Prometheus now knows, through PromQL.
    prom.wait_for("sum(updraft_installs_total{outcome=\"installed\"})", 1.0);
    prom.wait_for("sum(updraft_site_wan_bytes_total)", size);
    prom.wait_for("sum(updraft_download_bytes_total)", size);
    // The centre sent the package once (to the site), the site once (to the agent).
    prom.wait_for("sum(updraft_served_bytes_total)", 2.0 * size);
    prom.wait_for("updraft_machines{status=\"up-to-date\"}", 1.0);
    prom.wait_for("sum(updraft_machines)", 1.0);
    prom.wait_for("updraft_pair_active", 1.0);
    // Checks answered (the site answers its agent's), by the RPC conventions' labels.
    let checks = "rpc_server_duration_milliseconds_count{rpc_system=\"grpc\",rpc_service=\"updraft.v1.AgentApi\",\
                  rpc_method=\"Check\",rpc_grpc_status_code=\"0\"}";
    prom.wait_for(&format!("clamp_max(sum({checks}), 1)"), 1.0);
    prom.wait_for("count(updraft_store_size_bytes > 0)", 2.0);
    prom.wait_for("updraft_site_catalog_lag{site=\"branch\"}", 0.0);
    // The high-priority mark was fanned out to the agent's push stream, and timed.
    prom.wait_for("clamp_max(sum(updraft_push_fan_out_milliseconds_count{kind=\"high_priority\"}), 1)", 1.0);
    // The centre and the site hold a signed catalog statement with a day or so left.
    prom.wait_for("count(updraft_catalog_statement_expiry_seconds > 3600)", 2.0);
    // Every program says how long its certificate and its CA have left (mutual TLS here).
    prom.wait_for("count(updraft_tls_certificate_expiry_seconds{certificate=\"own\"} > 86400)", 3.0);
    // Every query of the Grafana dashboard in deploy/ is one Prometheus accepts, and the
    // machines-by-status panel shows this fleet.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/grafana/updraft-fleet.json")).expect("the dashboard is JSON");
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let (code, body) = prom.query(expr);
            assert!(code == 200 && body.contains("\"status\":\"success\""), "{}: {expr}: {body}", panel["title"]);
        }
    }
    prom.wait_for("sum(sum by (status) (updraft_machines))", 1.0);
    prom.wait_for("count(target_info{service_name=~\"updraft-.*\",host_name!=\"\",service_version!=\"\"})", 3.0);
}

/// `UPDRAFT_LOG_FORMAT=json` (or `--log-format json`): every log line is one JSON object, and a
/// line written while answering an RPC carries that call's trace and span ids.
#[test]
fn json_log_lines_carry_their_trace() {
    let mut w = World::new();
    w.env = vec![("UPDRAFT_LOG_FORMAT".into(), "json".into())];
    let (p, purl) = w.provider("centre", true);
    w.approve(&purl, &w.package("logged", "1.0.0.0", &w.key));
    let mut imported = None;
    wait_until("the import logged", T, || {
        imported = p.log_text().lines().find(|l| l.contains("imported update")).map(str::to_string);
        imported.is_some()
    });
    let line: serde_json::Value = serde_json::from_str(imported.as_deref().unwrap()).expect("a JSON log line");
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["message"], "imported update", "{line}");
    assert_eq!(line["span"], "rpc", "{line}");
    assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{line}");
    assert_eq!(line["span_id"].as_str().map(str::len), Some(16), "{line}");
    // Every line the provider logged is JSON (its stdout lines say where it listens).
    for l in p.log_text().lines().filter(|l| !l.starts_with("provider: ")) {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
}

/// An `https://` collector is reached over TLS, trusting the CA `OTEL_EXPORTER_OTLP_CERTIFICATE`
/// names (the system's roots otherwise).
#[test]
fn spans_reach_an_https_collector_through_the_given_ca() {
    let collector = updraft_tests::collector::Collector::default();
    let mut w = World::new();
    let tls: std::collections::HashMap<String, String> =
        w.tls_env("otel-collector", "provider", &["localhost", "127.0.0.1"]).into_iter().collect();
    let endpoint = collector.spawn_tls(tls["UPDRAFT_TLS_CERT"].as_ref(), tls["UPDRAFT_TLS_KEY"].as_ref());
    w.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE".into(), tls["UPDRAFT_TLS_CA"].clone()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let (_p, purl) = w.provider("centre", true);
    w.admin_ok(&purl, &["group", "create", "lab"]);
    wait_until("the provider's span of the change at the https collector", T, || {
        collector.snapshot().iter().any(|s| s.service == "updraft-provider" && s.name == "updraft.v1.Admin/PutGroup")
    });
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`: spans go over HTTP to `/v1/traces`.
#[test]
fn spans_reach_an_http_protobuf_collector_when_asked() {
    let collector = updraft_tests::collector::Collector::default();
    let endpoint = collector.spawn_http();
    let mut w = World::new();
    w.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let (_p, purl) = w.provider("centre", true);
    w.admin_ok(&purl, &["group", "create", "lab"]);
    wait_until("the provider's span of the change at the HTTP collector", T, || {
        collector.snapshot().iter().any(|s| s.service == "updraft-provider" && s.name == "updraft.v1.Admin/PutGroup")
    });
}
