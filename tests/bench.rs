//! The benchmark harness for sites and pushes. It starts the real release binaries on loopback
//! and prints, measured in one run:
//! - WAN bytes fetched by a site ÷ package size, with 1, 10, 100 and 1,000 agents downloading
//!   the same package from the site at once (the goal is 1.00);
//! - time for a high-priority mark to reach 1,000 and 10,000 subscribed agents, through one
//!   tier (agents on the local provider) and two (agents on a site): median, p99, max;
//! - provider memory per subscribed agent;
//! - the check herd: 10,000 distinct machines, each on its own connection, checking at once
//!   (answered, failed, time to the last answer, p50/p99), and an admin call's latency meanwhile;
//! - check answers per second and download serving (MB/s, 64 MiB to 1, 10 and 100 clients, from
//!   the provider and from a site), each beside nginx serving a same-sized file to the same
//!   h2load (Debian `nghttp2-client`) run;
//! - one real agent's idle memory and CPU, after its start-up check and after an install;
//!   provider import of 1 GiB beside `sha256sum`; one real agent installing 1 GiB beside
//!   `curl | tee >(sha256sum) | tar x; sync` from nginx (`install1g`);
//! - over mutual TLS, every simulated machine with its own certificate and connection (`tls`):
//!   check answers per second and p99 with 10,000 machines in the store, memory per connected
//!   agent, downloads from the provider and a site, each beside nginx requiring client
//!   certificates;
//! - push to installed (`install`): 10,000 agents behind one site, each on its own mutual-TLS
//!   connection, take a 10 MiB high-priority update; the time until the last has every byte;
//! - the fleet by simulation (`fleet`): 1, 10 and 100 sites of 1,000 agents against one provider;
//! - a rollout's look at its waves beside `update show` (`rollout`);
//! - the provider's instructions per steady check and per first check (a machine's first, on
//!   its own connection: what a herd is made of) over mutual TLS, counted by callgrind (`cost`;
//!   needs valgrind): the figures to compare two builds by, since they do not swing;
//! - the store's engines (`store`): acknowledged admin writes and checks per second on sled and
//!   on PostgreSQL, beside `pgbench` upserting one row per transaction on the same cluster.
//!
//! Agents are simulated cheaply as gRPC clients (downloads and push subscriptions), many per
//! connection, except in the herd (one connection each). Run:
//! `cargo run --release -p updraft-tests --bin bench` (needs nginx and h2load for the baselines);
//! `UPDRAFT_BENCH=wan,push,herd,serving,agent,import,install1g,tls,cost,install,fleet,rollout,store`
//! picks sections (default: all); `tls-herd` runs the `tls` section only as far as its herd, to
//! repeat the herd quickly (its time swings by a third from run to run).
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use tokio_rustls::rustls;
use tonic::transport::{Channel, Endpoint};
use updraft_proto::v1::admin_client::AdminClient;
use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::replication_client::ReplicationClient;
use updraft_proto::v1::{
    BlobRequest, CheckRequest, ListUpdatesRequest, MachineInfo, PushKind, PutGroupRequest, SiteStatusRequest,
    SubscribeRequest,
};
use updraft_runtime::tls::{MAX_FRAME_BYTES, Role};
use updraft_tests::herdsim::check_all;
use updraft_tests::loadgen::{self, Identities, Req};
use updraft_tests::{Proc, World, free_port, wait_port, wait_until, write_noise};

/// Streams per connection: below the servers' limit of 1024 concurrent streams.
const PER_CONNECTION: usize = 500;

async fn channels(url: &str, n: usize) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..n.div_ceil(PER_CONNECTION).max(1) {
        out.push(Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap());
    }
    out
}

fn site_wan(w: &World, site: &str) -> u64 {
    w.admin_json(site, &["site", "status"])["wan_bytes"].as_u64().unwrap()
}

async fn wan_ratio(w: &World, purl: &str, surl: &str, n: usize) -> f64 {
    // A new package per round, approved (only approved content is served) but deployed to
    // nobody, so the site has no machine that needs it and has not prefetched it.
    let pkg = w.package(&format!("wan{n}"), "1.0.0.0", &w.key);
    let id = w.approve(purl, &pkg);
    w.wait_site_caught_up(surl, purl);
    let u = w.admin_json(purl, &["update", "show", &id]);
    let (hash, size) = (u["content_hash"].as_str().unwrap().to_string(), u["size"].as_u64().unwrap());
    let before = site_wan(w, surl);
    let chans = channels(surl, n).await;
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = AgentApiClient::new(chans[i / PER_CONNECTION].clone());
        let hash = hash.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = c.download(BlobRequest { content_hash: hash, offset: 0 }).await.unwrap().into_inner();
            let mut got = 0u64;
            while let Some(chunk) = s.next().await {
                got += chunk.unwrap().data.len() as u64;
            }
            got
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), size);
    }
    (site_wan(w, surl) - before) as f64 / size as f64
}

struct PushFigures {
    median: Duration,
    p99: Duration,
    max: Duration,
    kb_per_agent: f64,
}

async fn push_latency(
    w: &World,
    purl: &str,
    target: &str,
    target_proc: &updraft_tests::Proc,
    n: usize,
    round: usize,
) -> PushFigures {
    let chans = channels(target, n).await;
    let rss_before = target_proc.rss_kb().unwrap_or(0);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let mut tasks = Vec::new();
    let t0 = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    for i in 0..n {
        let mut c = AgentApiClient::new(chans[i / PER_CONNECTION].clone());
        let ready = ready_tx.clone();
        let t0 = t0.clone();
        tasks.push(tokio::spawn(async move {
            let req = SubscribeRequest { machine: format!("sim-{i}"), last_seen_seq: 0 };
            let mut s = c.subscribe(req).await.unwrap().into_inner();
            while let Some(ev) = s.next().await {
                let ev = ev.unwrap();
                if ev.kind == PushKind::Hello as i32 {
                    let _ = ready.send(()).await;
                } else if ev.kind == PushKind::HighPriority as i32 {
                    return t0.get().map(|t| t.elapsed()).unwrap_or_default();
                }
            }
            Duration::MAX
        }));
    }
    for _ in 0..n {
        ready_rx.recv().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = target_proc.rss_kb().unwrap_or(0);
    let id = w.publish(purl, &w.package(&format!("push{round}"), "1.0.0.0", &w.key));
    let _ = t0.set(Instant::now());
    w.admin_ok(purl, &["update", "priority", &id, "high"]);
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.unwrap());
    }
    times.sort();
    let pick = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    PushFigures {
        median: pick(0.5),
        p99: pick(0.99),
        max: *times.last().unwrap(),
        kb_per_agent: rss_after.saturating_sub(rss_before) as f64 / n as f64,
    }
}

fn pick(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// `n` distinct machines, each on its own connection, send one check at once. The admin call
/// made meanwhile goes to the same server (a site's status; the centre's catalog).
async fn check_herd(url: &str, n: usize, tier: &'static str) {
    let admin = async {
        let ch = Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
        let t = Instant::now();
        let ok = if tier == "site" {
            let mut client = ReplicationClient::new(ch);
            let call = client.site_status(SiteStatusRequest {});
            matches!(tokio::time::timeout(Duration::from_secs(60), call).await, Ok(Ok(_)))
        } else {
            let mut client = AdminClient::new(ch);
            let call = client.list_updates(ListUpdatesRequest::default());
            matches!(tokio::time::timeout(Duration::from_secs(60), call).await, Ok(Ok(_)))
        };
        (ok, t.elapsed())
    };
    let (answers, (admin_ok, admin_ms)) =
        check_all(url, n, &format!("herd-{tier}"), Duration::from_secs(60), admin).await;
    let mut times: Vec<Duration> = answers.iter().filter(|a| a.result.is_ok()).map(|a| a.took).collect();
    let failed = n - times.len();
    times.sort();
    // The checks start together (connections were made before): the slowest is the last answer.
    let total = times.last().copied().unwrap_or_default();
    let (p50, p99) =
        if times.is_empty() { (Duration::ZERO, Duration::ZERO) } else { (pick(&times, 0.5), pick(&times, 0.99)) };
    println!(
        "{n:>8}  {:>8}  {failed:>6}  {total:>10.2?}  {p50:>10.1?}  {p99:>10.1?}  {:>12}",
        times.len(),
        if admin_ok { format!("{admin_ms:.1?}") } else { "FAILED".into() }
    );
}

/// What one h2load run measured.
#[derive(Debug, Default, Clone, Copy)]
struct Load {
    req_per_s: f64,
    mb_per_s: f64,
    mean_ms: f64,
    succeeded: u64,
}

/// Runs h2load against `url` (POSTing `body` when given) with `clients` connections and
/// `requests` requests in all, one stream per connection at a time. Like an agent, h2load lets
/// the server send frames of up to [`MAX_FRAME_BYTES`] (HTTP/2's default is 16 KiB); nginx,
/// the baseline, sizes its frames by its own `http2_chunk_size`. Each answer must carry at
/// least `answer_bytes` of body: a gRPC error is an HTTP 200 too, and a run of them measures
/// nothing.
fn h2load(
    url: &str,
    body: Option<&std::path::Path>,
    clients: usize,
    requests: usize,
    answer_bytes: u64,
) -> Option<Load> {
    let mut cmd = std::process::Command::new("h2load");
    cmd.args(["-n", &requests.to_string(), "-c", &clients.to_string(), "-m", "1"]);
    cmd.arg("-f").arg(MAX_FRAME_BYTES.to_string());
    if let Some(b) = body {
        cmd.arg("-d").arg(b).args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    }
    let out = cmd.arg(url).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Only 2xx answers count as done; a run with any other answer measures nothing.
    let two_xx = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .and_then(|l| l.split_whitespace().nth(2).and_then(|n| n.parse::<u64>().ok()));
    let mut load = Load::default();
    let mut data = 0u64;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("traffic:") {
            // "traffic: … total, … headers (…), 64.00MB (67108864) data"
            let i = words.iter().position(|w| *w == "data")?;
            data = words[i - 1].trim_matches(|c| c == '(' || c == ')').parse().ok()?;
        } else if line.starts_with("finished in") && words.len() >= 6 {
            load.req_per_s = words[3].parse().ok()?;
            let rate = words[5];
            let (num, unit) = rate.split_at(rate.find(|c: char| c.is_ascii_alphabetic())?);
            let scale = match unit {
                "B/s" => 1e-6,
                "KB/s" => 1.0 / 1024.0,
                "MB/s" => 1.0,
                "GB/s" => 1024.0,
                _ => return None,
            };
            load.mb_per_s = num.parse::<f64>().ok()? * scale;
        } else if line.starts_with("requests:") {
            load.succeeded = words.iter().position(|w| *w == "succeeded,").and_then(|i| words[i - 1].parse().ok())?;
        } else if line.starts_with("time for request:") && words.len() >= 6 {
            let ms = |w: &str| -> Option<f64> {
                if let Some(v) = w.strip_suffix("us") {
                    v.parse::<f64>().ok().map(|v| v / 1000.0)
                } else if let Some(v) = w.strip_suffix("ms") {
                    v.parse().ok()
                } else {
                    w.strip_suffix('s')?.parse::<f64>().ok().map(|v| v * 1000.0)
                }
            };
            load.mean_ms = ms(words[5])?;
        }
    }
    if two_xx != Some(requests as u64) || load.succeeded != requests as u64 {
        eprintln!("h2load {url}: {} of {requests} answered 2xx:\n{text}", two_xx.unwrap_or(0));
        return None;
    }
    if data < answer_bytes * requests as u64 {
        eprintln!("h2load {url}: {data} bytes of answers, fewer than {requests} × {answer_bytes}:\n{text}");
        return None;
    }
    Some(load)
}

/// How many checks a checks-per-second figure is measured over: `UPDRAFT_BENCH_CHECKS`, by
/// default 100,000 (some seconds: fewer swing with the machine's moment).
fn check_count() -> usize {
    std::env::var("UPDRAFT_BENCH_CHECKS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

/// nginx serving `root` over cleartext HTTP/2 on loopback (the baseline), in its best setting
/// for this job: with `sendfile on`, small answers over HTTP/2 stall on delayed ACKs (43 ms
/// each, 2,300 req/s here) and one large download runs at 0.76 GB/s instead of 1.3; with
/// `http2_chunk_size 256k` (its default is 8k) it sends the frames h2load allows and serves
/// 64 MiB 5–15% faster than by default (1.84/2.52/2.64 GB/s to 1/10/100 clients by default,
/// 1.97/2.62/2.79 at 256k, 2.02/2.81/2.76 at 1m). Its connections stay open for any number of
/// requests, as an agent's does (by default it closes one after 1,000, failing a request caught
/// in the close).
fn nginx(w: &World, root: &std::path::Path) -> Option<(Proc, u16)> {
    nginx_with(w, root, None)
}

/// nginx's TLS: its certificate, key and the CA whose client certificates it requires.
struct NginxTls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

/// nginx serving `root` over mutual TLS 1.3 with a certificate of `ids`'s CA, requiring one of
/// its client certificates; with its URL (`https://127.0.0.1:PORT`).
fn nginx_mtls(w: &World, ids: &Identities, root: &std::path::Path) -> Option<(Proc, String)> {
    let (cert, key) = ids.issue("nginx", Role::Provider, &[]);
    let tls = NginxTls { cert: w.path("nginx.crt"), key: w.path("nginx.key"), ca: w.path("pki/ca.crt") };
    std::fs::write(&tls.cert, cert).unwrap();
    std::fs::write(&tls.key, key).unwrap();
    nginx_with(w, root, Some(&tls)).map(|(p, port)| (p, format!("https://127.0.0.1:{port}")))
}

/// nginx serving `root` over HTTP/2, in cleartext or (with `tls`) over mutual TLS 1.3.
fn nginx_with(w: &World, root: &std::path::Path, tls: Option<&NginxTls>) -> Option<(Proc, u16)> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| std::path::Path::new(p).exists())?;
    let dir = w.path(if tls.is_some() { "nginx-bench-tls" } else { "nginx-bench" });
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let (d, r) = (dir.display(), root.display());
    let (ssl, tls_conf) = match tls {
        Some(t) => (
            " ssl",
            format!(
                "    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_client_certificate {};\n    \
                 ssl_verify_client on;\n    ssl_protocols TLSv1.3;\n",
                t.cert.display(),
                t.key.display(),
                t.ca.display()
            ),
        ),
        None => ("", String::new()),
    };
    // As root, nginx's workers would run as nobody and could not read the test's files.
    let user = if running_as_root() { "user root;\n" } else { "" };
    let conf = format!(
        "daemon off;\n{user}worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  http2_chunk_size 256k;\n  sendfile off;\n  tcp_nodelay on;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen 127.0.0.1:{port}{ssl} http2;\n    root {r};\n{tls_conf}  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(&dir);
    let p = Proc::spawn_group(w.dir.path(), "nginx-bench", cmd);
    wait_port(port);
    Some((p, port))
}

/// The sections hold 10,000 connections and more, in this process and in the servers it starts
/// (which inherit its limits), where a login shell's soft limit on open files may be 1,024:
/// raised to the hard limit, as the deployed units' `LimitNOFILE` does for the servers.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: both calls only read or write the `rlimit` passed, which lives through the call.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
        }
    };
    if !raised || lim.rlim_cur < 12_000 {
        eprintln!(
            "bench: open files limited to {} (`ulimit -Hn`); the 10,000-connection sections need about 11,000",
            lim.rlim_cur
        );
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A gRPC request body on disk: the 5-byte frame header, then the message.
fn grpc_body(w: &World, name: &str, msg: &impl Message) -> std::path::PathBuf {
    let bytes = msg.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    framed.extend_from_slice(&bytes);
    let path = w.path(name);
    std::fs::write(&path, framed).unwrap();
    path
}

fn ratio_line(what: &str, ours: Option<Load>, base: Option<Load>, by: impl Fn(&Load) -> f64, unit: &str) {
    match (ours, base) {
        (Some(o), Some(b)) if by(&b) > 0.0 => println!(
            "{what:<40} {:>10.1} {unit:<6} nginx {:>10.1} {unit:<6} ratio {:>5.2}  (mean {:.2} ms vs {:.2} ms)",
            by(&o),
            by(&b),
            by(&o) / by(&b),
            o.mean_ms,
            b.mean_ms
        ),
        (o, b) => println!("{what:<40} not measured (ours {o:?}, nginx {b:?}: is h2load/nginx installed?)"),
    }
}

#[tokio::main]
async fn main() {
    raise_open_files_limit();
    // Plaintext: the subscribers below are raw streams, not agents with certificates.
    let w = World::insecure();
    // Every simulated machine connects from 127.0.0.1: no per-address connection limit here.
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    let (p, purl) = w.provider_with("centre", &["--trust-key", &pubkey, "--max-connections-per-peer", "100000"]);
    let (s, surl) = w.remote_with("site", &purl, &["--max-connections-per-peer", "100000"]);
    wait_until("site synchronised", Duration::from_secs(30), || {
        w.admin_json(&surl, &["site", "status"])["upstream_connected"] == true
    });

    let wanted = std::env::var("UPDRAFT_BENCH").unwrap_or_default();
    let section = |name: &str| wanted.is_empty() || wanted.split(',').any(|s| s.trim() == name);

    if section("wan") {
        println!("WAN bytes per site / package size (agents downloading from one site at once)");
        println!("{:>8}  {:>6}", "AGENTS", "RATIO");
        for n in [1, 10, 100, 1000] {
            println!("{n:>8}  {:>6.2}", wan_ratio(&w, &purl, &surl, n).await);
        }
        println!();
    }
    if section("push") {
        push_section(&w, &purl, &surl, &p, &s).await;
    }
    if section("herd") {
        herd_section(&w, &purl, &surl).await;
    }
    if section("serving") {
        serving_section(&w, (&p, &purl), (&s, &surl)).await;
    }
    if section("agent") {
        agent_section(&w, &purl).await;
    }
    if section("import") {
        import_section(&w, &purl);
    }
    if section("install1g") {
        install1g_section(&w, &purl, p.pid()).await;
    }
    if section("tls") {
        tls_section(false).await;
    } else if section("tls-herd") {
        tls_section(true).await;
    }
    if section("cost") {
        cost_section().await;
    }
    if section("install") {
        install_section().await;
    }
    if section("fleet") {
        fleet_section().await;
    }
    if section("rollout") {
        rollout_section(&w, &purl).await;
    }
    if section("store") {
        store_section(&w).await;
    }
}

/// Calls per second: `clients` tasks, each on its own connection, client `c` to
/// `urls[c % urls.len()]`, each making `each` calls of `call(channel, client, i)` one after
/// another, all at once.
async fn per_second<F, Fut>(urls: &[&str], clients: usize, each: usize, call: F) -> f64
where
    F: Fn(Channel, usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut chans = Vec::new();
    for c in 0..clients {
        chans.push(Endpoint::from_shared(urls[c % urls.len()].to_string()).unwrap().connect().await.unwrap());
    }
    let start = Instant::now();
    let tasks: Vec<_> = chans
        .into_iter()
        .enumerate()
        .map(|(c, ch)| {
            let call = call.clone();
            tokio::spawn(async move {
                for i in 0..each {
                    call(ch.clone(), c, i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (clients * each) as f64 / start.elapsed().as_secs_f64()
}

/// The store's two engines under the same load, one provider and two: acknowledged admin
/// writes (groups put by 16 clients at once) and check answers (16 clients, steady machines),
/// on sled (one provider; a switchover pair, clients split between the active and the standby,
/// which forwards) and on PostgreSQL (one provider; two on one database, clients split); and the
/// failover time when a provider is killed with `kill -9`. PostgreSQL's own `pgbench`, upserting
/// one row per transaction on the same cluster, is the baseline for writes.
async fn store_section(w: &World) {
    const CLIENTS: usize = 16;
    println!("The store's engines: sled and PostgreSQL, one provider and two ({CLIENTS} clients in all)");
    let cluster = updraft_pgtest::Cluster::start();
    let db = cluster.database("bench");
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    let (mut sled_a, sled_a_url) = w.provider_with("store-sled", &["--trust-key", &pubkey]);
    let (_sled_b, sled_b_url) = w.pair_member("store-sled-b", "store-sled");
    let (mut pg_a, pg_a_url) = w.provider_on_database("store-pg", &db, &w.path("store-pg"));
    let (mut pg_b, pg_b_url) = w.provider_on_database("store-pg-b", &db, &w.path("store-pg"));
    let setups: [(&str, Vec<&str>); 4] = [
        ("sled, one", vec![&sled_a_url]),
        ("sled, pair", vec![&sled_a_url, &sled_b_url]),
        ("postgresql, one", vec![&pg_a_url]),
        ("postgresql, two", vec![&pg_a_url, &pg_b_url]),
    ];
    let mut figures = Vec::new();
    for (n, (setup, urls)) in setups.iter().enumerate() {
        let writes = per_second(urls, CLIENTS, 40, move |ch, c, i| async move {
            let req = PutGroupRequest { name: format!("g-{n}-{c}-{i}"), create: true, ..Default::default() };
            AdminClient::new(ch).put_group(req).await.expect("group put");
        })
        .await;
        let checks = per_second(urls, CLIENTS, 200, |ch, c, _| async move {
            let machine = MachineInfo { name: format!("store-bench-{c}"), ..Default::default() };
            AgentApiClient::new(ch)
                .check(CheckRequest { machine: Some(machine), ..Default::default() })
                .await
                .expect("check");
        })
        .await;
        println!("{setup:<16} acknowledged writes {writes:>8.0}/s   checks {checks:>8.0}/s");
        figures.push((writes, checks));
    }
    let script = w.path("upsert.sql");
    std::fs::write(
        &script,
        "\\set k random(1, 1000000)\nINSERT INTO updraft_kv (tree, k, v) VALUES ('pgbench', int8send(:k), 'x') \
         ON CONFLICT (tree, k) DO UPDATE SET v = EXCLUDED.v;\n",
    )
    .unwrap();
    let clients = CLIENTS.to_string();
    let tps = cluster.pgbench("bench", &script, &["-c", &clients, "-j", "2", "-T", "5"]);
    let [(sled_w, sled_c), _, (pg_w, pg_c), (pg2_w, pg2_c)] = figures[..] else { unreachable!() };
    println!("pgbench, one upsert per transaction, same cluster, {CLIENTS} clients: {tps:.0} tps");
    println!(
        "ratios: writes postgresql/sled {:.2}, postgresql/pgbench {:.2}, two/one {:.2}; checks postgresql/sled {:.2}, two/one {:.2}",
        pg_w / sled_w,
        pg_w / tps,
        pg2_w / pg_w,
        pg_c / sled_c,
        pg2_c / pg_c
    );

    // Failover. sled: the active killed, until the standby acknowledges a write. PostgreSQL:
    // every provider is active (a client of the dead one goes to the next at once); the
    // watched-folder duty's holder killed, until the other holds it.
    let killed = Instant::now();
    sled_a.kill9();
    let mut admin = AdminClient::new(Endpoint::from_shared(sled_b_url.clone()).unwrap().connect().await.unwrap());
    let mut tries = 0;
    while admin
        .put_group(PutGroupRequest { name: format!("after-{tries}"), create: true, ..Default::default() })
        .await
        .is_err()
    {
        tries += 1;
        assert!(killed.elapsed() < Duration::from_secs(60), "the standby never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sled_failover = killed.elapsed();
    let holds = |p: &updraft_tests::Proc| p.holds_duty("content-scanner");
    wait_until("one provider holds the duty", Duration::from_secs(30), || holds(&pg_a) || holds(&pg_b));
    let (holder, other) = if holds(&pg_a) { (&mut pg_a, &pg_b) } else { (&mut pg_b, &pg_a) };
    let killed = Instant::now();
    holder.kill9();
    wait_until("the other takes the duty", Duration::from_secs(60), || holds(other));
    let pg_failover = killed.elapsed();
    println!(
        "failover after kill -9: sled pair, standby acknowledging writes after {:.2} s; postgresql, duty taken over after {:.2} s",
        sled_failover.as_secs_f64(),
        pg_failover.as_secs_f64()
    );
    println!();
}

/// CPU seconds a process has used so far (user + system, from /proc).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (rest.get(11)?.parse().ok()?, rest.get(12)?.parse().ok()?);
    Some((utime + stime) / clock_ticks()?)
}

/// Clock ticks per second, the unit of /proc's CPU times: asked of `getconf` once.
fn clock_ticks() -> Option<f64> {
    static HZ: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        let ticks = std::process::Command::new("getconf").arg("CLK_TCK").output().ok()?;
        String::from_utf8_lossy(&ticks.stdout).trim().parse().ok()
    })
}

/// One real agent idle, after its start-up check and again after installing one more update:
/// resident memory, and CPU over a quiet spell scaled to an hour (its push stream stays open;
/// it checks hourly).
async fn agent_section(w: &World, purl: &str) {
    println!("One real agent, idle (connected, push stream open, hourly checks)");
    let agent = w.agent("idle-1", purl);
    wait_until("the agent registered", Duration::from_secs(60), || {
        w.admin_json(purl, &["machine", "list"]).as_array().is_some_and(|l| l.iter().any(|m| m["name"] == "idle-1"))
    });
    idle_figures("after its start-up check", &agent).await;
    // A fleet's agents idle after installing what they were given: the code and memory an
    // install touched are part of what an idle agent holds.
    w.publish(purl, &w.package("idleapp", "1.0.0.0", &w.key));
    w.agent_cmd("idle-1", &["check"]);
    wait_until("the agent installed idleapp", Duration::from_secs(60), || w.installed("idle-1", "idleapp").is_some());
    idle_figures("after an install", &agent).await;
    println!();
}

/// An idle agent's resident memory and its CPU per idle hour, over a quiet spell.
async fn idle_figures(when: &str, agent: &Proc) {
    const QUIET: Duration = Duration::from_secs(30);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = agent.pid().unwrap();
    let (cpu0, t0) = (cpu_secs(pid), Instant::now());
    tokio::time::sleep(QUIET).await;
    let (cpu1, elapsed) = (cpu_secs(pid), t0.elapsed());
    let rss = agent.rss_kb().unwrap_or(0);
    // One clock tick (usually 10 ms) over the spell is the resolution.
    let scale = 3600.0 / elapsed.as_secs_f64();
    let per_hour = match (cpu0, cpu1) {
        (Some(a), Some(b)) => format!("{:.2} s (resolution {:.1} s)", (b - a) * scale, 0.01 * scale),
        _ => "unknown".into(),
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let part = |key: &str| -> f64 {
        let kb = status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1));
        kb.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
    };
    println!(
        "{when}: resident memory {:.1} MiB (target 10 MiB: heap and stacks {:.1}, program and libraries {:.1}); CPU {per_hour} per idle hour",
        rss as f64 / 1024.0,
        part("RssAnon:"),
        part("RssFile:")
    );
}

/// One real agent installing a 1 GiB package end to end (`agent check`: the check, download,
/// hash and signature checks, unpacking, swap, fsync and report), beside the least a careful
/// installer does by hand with the same files as a tar from nginx: `curl | tee >(sha256sum) |
/// tar x; sync`.
async fn install1g_section(w: &World, purl: &str, provider: Option<u32>) {
    println!("One real agent installing a 1 GiB package, beside curl | sha256sum | tar x; sync from nginx");
    let src = w.path("src-1g");
    write_noise(&src.join("data.bin"), 1024);
    let pkg = w.build_package(&src, "big1g", "1.0.0.0", &w.key, &[]);
    let www = w.path("www-1g");
    std::fs::create_dir_all(&www).unwrap();
    let tar =
        std::process::Command::new("tar").arg("-cf").arg(www.join("big.tar")).arg("-C").arg(&src).arg(".").status();
    std::fs::remove_dir_all(&src).unwrap();
    let agent = w.agent("inst-1", purl);
    wait_until("the agent registered", Duration::from_secs(60), || {
        w.admin_json(purl, &["machine", "list"]).as_array().is_some_and(|l| l.iter().any(|m| m["name"] == "inst-1"))
    });
    w.publish(purl, &pkg);
    std::fs::remove_file(&pkg).unwrap();
    // Each timed run starts with nothing waiting to be written back (an earlier section's
    // gigabyte would otherwise be flushed during whichever run comes first).
    settle_disk();
    let cpu = |pid: Option<u32>| pid.and_then(cpu_secs).unwrap_or(f64::NAN);
    let (pcpu0, acpu0) = (cpu(provider), cpu(agent.pid()));
    let started = seconds_of_day(std::time::SystemTime::now());
    let t = Instant::now();
    let out = w.agent_cmd("inst-1", &["check"]);
    let ours = t.elapsed();
    let (pcpu, acpu) = (cpu(provider) - pcpu0, cpu(agent.pid()) - acpu0);
    let installed = std::fs::metadata(w.root("inst-1").join("big1g/data.bin")).map(|m| m.len()).unwrap_or(0);
    assert_eq!(installed, 1 << 30, "{}", String::from_utf8_lossy(&out.stdout));
    // Where the agent's time went, from its own log: the check answered and planned, every
    // byte downloaded (hashed and unpacked as it came), then swapped, synced and live.
    let log = agent.log_text();
    let at = |kind: &str| {
        log.lines().find(|l| l.contains(kind) && l.contains("big1g")).and_then(log_seconds_of_day).map(|s| s - started)
    };
    if let (Some(a), Some(b), Some(c)) =
        (at("DOWNLOAD_STARTED"), at("DOWNLOAD_FINISHED"), at("ACTIVITY_KIND_INSTALLED"))
    {
        println!(
            "agent phases: check answered {a:.2} s, every byte downloaded and unpacked {:.2} s, swapped and live {:.2} s, reported {:.2} s; CPU: agent {acpu:.2} s, provider {pcpu:.2} s",
            b - a,
            c - b,
            ours.as_secs_f64() - c
        );
    }
    drop(agent);
    let base = match (tar, nginx(w, &www)) {
        (Ok(st), Some((_nginx, port))) if st.success() => {
            let out = w.path("by-hand");
            std::fs::create_dir_all(&out).unwrap();
            let script = format!(
                "set -o pipefail; curl -sf --http2-prior-knowledge http://127.0.0.1:{port}/big.tar | tee >(sha256sum >/dev/null) | tar -x -C {} && sync",
                out.display()
            );
            settle_disk();
            let t = Instant::now();
            let ok = std::process::Command::new("bash").arg("-c").arg(&script).status().is_ok_and(|s| s.success());
            ok.then(|| t.elapsed())
        }
        _ => None,
    };
    match base {
        Some(b) => println!(
            "agent {ours:.2?}  by hand {b:.2?}  ratio {:.2} (target 1.00 or less)",
            ours.as_secs_f64() / b.as_secs_f64()
        ),
        None => println!("agent {ours:.2?}  (no baseline: is nginx, curl or tar missing?)"),
    }
    println!();
}

/// Seconds since midnight UTC.
fn seconds_of_day(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() % 86_400.0).unwrap_or(0.0)
}

/// Seconds since midnight UTC of a log line that starts with an RFC 3339 time
/// (`2026-12-04T15:38:11.460885Z  INFO …`).
fn log_seconds_of_day(line: &str) -> Option<f64> {
    let clock = line.split_whitespace().next()?.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = clock.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Writes back every dirty page of the machine before a timed run.
fn settle_disk() {
    let _ = std::process::Command::new("sync").status();
}

/// A 1 GiB package imported by the provider, beside `sha256sum` of the same file (the least
/// an import must do: read and hash every byte).
fn import_section(w: &World, purl: &str) {
    println!("Provider import of a 1 GiB package, beside sha256sum of the same file");
    let src = w.path("src-import");
    write_noise(&src.join("data.bin"), 1024);
    let pkg = w.build_package(&src, "import1g", "1.0.0.0", &w.key, &[]);
    std::fs::remove_dir_all(&src).unwrap();
    let t = Instant::now();
    let hashed = std::process::Command::new("sha256sum").arg(&pkg).output().map(|o| o.status.success());
    let sha = t.elapsed();
    let t = Instant::now();
    w.admin_ok(purl, &["update", "add", pkg.to_str().unwrap()]);
    let import = t.elapsed();
    match hashed {
        Ok(true) => {
            println!("import {import:.2?}  sha256sum {sha:.2?}  ratio {:.2}", import.as_secs_f64() / sha.as_secs_f64())
        }
        _ => println!("import {import:.2?}  (sha256sum not available for the baseline)"),
    }
    println!();
}

async fn push_section(w: &World, purl: &str, surl: &str, p: &Proc, s: &Proc) {
    println!("High-priority push: mark -> event at every subscribed agent");
    println!("{:>6}  {:>7}  {:>10}  {:>10}  {:>10}  {:>16}", "TIERS", "AGENTS", "MEDIAN", "P99", "MAX", "MEMORY/AGENT");
    let mut round = 0;
    for (tiers, target, proc) in [(1, purl, p), (2, surl, s)] {
        for n in [1000, 10_000] {
            round += 1;
            let f = push_latency(w, purl, target, proc, n, round).await;
            let who = if tiers == 1 { "provider" } else { "site" };
            println!(
                "{tiers:>6}  {n:>7}  {:>10.1?}  {:>10.1?}  {:>10.1?}  {:>10.1} kB ({who})",
                f.median, f.p99, f.max, f.kb_per_agent
            );
        }
    }
    println!();
}

/// One look of the rollout loop — its tally: every machine's plan for the update, its wave and
/// its last outcome — timed as `rollout status` (the same computation), beside `update show`
/// (every machine's plan, what update statuses have always cost) on the same store.
async fn rollout_section(w: &World, purl: &str) {
    use updraft_proto::v1::{GetRolloutRequest, GetUpdateRequest, StartRolloutRequest};
    println!("Rollouts: one look of the rollout loop (rollout status) beside update show, same store");
    println!(
        "{:>8}  {:>14}  {:>14}  {:>14}  {:>6}",
        "MACHINES", "ROLLOUT LOOK", "UPDATE SHOW", "ROLLOUT START", "RATIO"
    );
    w.publish(purl, &w.package("rollapp", "1.0.0.0", &w.key));
    let v2 = w.admin_ok(purl, &["update", "add", w.package("rollapp", "2.0.0.0", &w.key).to_str().unwrap()]);
    let v2 = v2.trim().to_string();
    let mut admin = AdminClient::new(Endpoint::from_shared(purl.to_string()).unwrap().connect().await.unwrap());
    let mut registered = 0;
    let mut started = false;
    for n in [1_000, 10_000] {
        let (answers, ()) =
            check_all(purl, n - registered, &format!("roll{n}"), Duration::from_secs(120), async {}).await;
        registered = n;
        let failed = answers.iter().filter(|a| a.result.is_err()).count();
        let t = Instant::now();
        if !started {
            let req = StartRolloutRequest {
                update_id: v2.clone(),
                waves: "1%,10%,50%,100%".into(),
                wave_wait: "30m".into(),
                ..Default::default()
            };
            admin.start_rollout(req).await.unwrap();
            started = true;
        }
        let start = t.elapsed();
        let median = |times: &mut Vec<Duration>| {
            times.sort();
            times[times.len() / 2]
        };
        let (mut looks, mut shows) = (Vec::new(), Vec::new());
        let mut machines = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let r = admin.get_rollout(GetRolloutRequest { update_id: v2.clone() }).await.unwrap().into_inner();
            looks.push(t.elapsed());
            machines = r.waves.iter().map(|w| w.machines).sum::<u32>();
            let t = Instant::now();
            admin.get_update(GetUpdateRequest { id: v2.clone() }).await.unwrap();
            shows.push(t.elapsed());
        }
        let (look, show) = (median(&mut looks), median(&mut shows));
        println!(
            "{machines:>8}  {look:>14.1?}  {show:>14.1?}  {:>14}  {:>6.2}{}",
            if n == 1_000 { format!("{start:.1?}") } else { "-".into() },
            look.as_secs_f64() / show.as_secs_f64(),
            if failed > 0 { format!("  ({failed} checks failed)") } else { String::new() }
        );
    }
    println!();
}

async fn herd_section(w: &World, purl: &str, surl: &str) {
    println!("Check herd: distinct machines, one connection each, one check each, all at once");
    println!(
        "{:>8}  {:>8}  {:>8}  {:>6}  {:>10}  {:>10}  {:>10}  {:>12}",
        "TIER", "MACHINES", "ANSWERED", "FAILED", "LAST", "P50", "P99", "ADMIN CALL"
    );
    w.publish(purl, &w.package("herdapp", "1.0.0.0", &w.key));
    w.wait_site_caught_up(surl, purl);
    for (tier, url) in [("provider", purl), ("site", surl)] {
        for n in [1000, 10_000] {
            print!("{tier:>8}  ");
            check_herd(url, n, tier).await;
        }
    }
    println!();
}

/// Cleartext serving beside nginx: check answers per second, and downloads to 1, 10 and 100
/// clients from the provider `p` and the site `s` (each a process and its URL), as throughput and
/// as the server's CPU per gigabyte sent. The load generator shares the machine's two cores, so
/// throughput also measures how much CPU the server leaves it; CPU per gigabyte is the server's
/// own cost.
async fn serving_section(w: &World, (p, purl): (&Proc, &str), (s, surl): (&Proc, &str)) {
    println!("Serving, beside nginx (same h2load run shape, cleartext HTTP/2, one stream per client)");
    // A representative answer: one offer (and the signed statement listing the catalog).
    w.publish(purl, &w.package("serveapp", "1.0.0.0", &w.key));
    let www = w.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let check = CheckRequest {
        machine: Some(MachineInfo { name: "h2load".into(), ..Default::default() }),
        manual: false,
        statement_digest: vec![],
    };
    let check_body = grpc_body(w, "check.body", &check);
    // The baseline file is as large as the check's answer.
    let mut c = AgentApiClient::new(Endpoint::from_shared(purl.to_string()).unwrap().connect().await.unwrap());
    let answer = c.check(check).await.unwrap().into_inner().encode_to_vec();
    std::fs::write(www.join("answer"), &answer).unwrap();
    let big = w.noise_package("bigblob", "1.0.0.0", 64);
    // Approved: a provider serves only the content of approved updates.
    let id = w.approve(purl, &big);
    let u = w.admin_json(purl, &["update", "show", &id]);
    let (hash, size) = (u["content_hash"].as_str().unwrap().to_string(), u["size"].as_u64().unwrap());
    std::fs::copy(&big, www.join("big")).unwrap();
    let dl_body = grpc_body(w, "download.body", &BlobRequest { content_hash: hash, offset: 0 });
    let base = nginx(w, &www);
    let nurl = |f: &str| base.as_ref().map(|(_, port)| format!("http://127.0.0.1:{port}/{f}"));
    println!("(answer {} bytes; blob {:.0} MiB)", answer.len(), size as f64 / (1 << 20) as f64);
    let check_url = format!("{purl}/updraft.v1.AgentApi/Check");
    let n = answer.len() as u64;
    let checks = check_count();
    let ours = h2load(&check_url, Some(&check_body), 100, checks, n);
    let theirs = nurl("answer").and_then(|u| h2load(&u, None, 100, checks, n));
    ratio_line("checks/s, 100 clients", ours, theirs, |l| l.req_per_s, "req/s");
    let download = |url: &str| format!("{url}/updraft.v1.AgentApi/Download");
    // The site serves what it has fetched once from the provider: the first download fills it.
    h2load(&download(surl), Some(&dl_body), 1, 1, size);
    let nginx_pid = base.as_ref().and_then(|(n, _)| n.pid());
    for (tier, server, url) in [("provider", p, purl), ("site", s, surl)] {
        let dl_url = download(url);
        for clients in [1, 10, 100] {
            let requests = clients * downloads_each(clients);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let (mut ours_cpu, mut theirs_cpu) = (Spent::default(), Spent::default());
            for _ in 0..ROUNDS {
                ours.extend(ours_cpu.add(server.pid(), || h2load(&dl_url, Some(&dl_body), clients, requests, size)));
                theirs.extend(
                    theirs_cpu.add(nginx_pid, || nurl("big").and_then(|u| h2load(&u, None, clients, requests, size))),
                );
            }
            let (ours, theirs) = (median_by(ours, |l| l.mb_per_s), median_by(theirs, |l| l.mb_per_s));
            ratio_line(&format!("download MB/s, {clients} client(s), {tier}"), ours, theirs, |l| l.mb_per_s, "MB/s");
            let gb = (requests as u64 * size) as f64 / 1e9;
            if let (Some(o), Some(b)) = (ours_cpu.per_run(), theirs_cpu.per_run()) {
                println!(
                    "{:<40} {:>10.3} s/GB   nginx {:>10.3} s/GB   ratio {:>5.2}",
                    "  server CPU per GB sent",
                    o / gb,
                    b / gb,
                    o / b
                );
            }
        }
    }
}

/// CPU seconds a server (a process and its children: nginx's master and workers) spent over
/// the runs it served.
#[derive(Default)]
struct Spent {
    secs: f64,
    runs: u32,
}

impl Spent {
    /// Runs `run` (a load against the server `pid`) and adds what the server spent meanwhile
    /// when the run measured something.
    fn add(&mut self, pid: Option<u32>, run: impl FnOnce() -> Option<Load>) -> Option<Load> {
        let before = pid.and_then(group_cpu_secs);
        let load = run()?;
        if let (Some(before), Some(after)) = (before, pid.and_then(group_cpu_secs)) {
            self.secs += after - before;
            self.runs += 1;
        }
        Some(load)
    }

    /// CPU seconds per run, over the runs measured.
    fn per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.secs / self.runs as f64)
    }
}

/// CPU seconds used so far by a process and its children (nginx's master and its workers).
fn group_cpu_secs(pid: u32) -> Option<f64> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .try_fold(cpu_secs(pid)?, |sum, c| Some(sum + cpu_secs(c)?))
}

/// Download runs per figure, ours and the baseline's taken in turn so that both meet the same
/// moments of a busy machine; the median run is the figure.
const ROUNDS: usize = 3;

/// Downloads per client in one run: a run of a few tens of milliseconds (one 64 MiB download)
/// measures start-up and scheduling noise more than serving.
fn downloads_each(clients: usize) -> usize {
    match clients {
        1 => 8,
        2..=10 => 2,
        _ => 1,
    }
}

/// The run whose `by` is the median.
fn median_by<L>(mut runs: Vec<L>, by: impl Fn(&L) -> f64) -> Option<L> {
    runs.sort_by(|a, b| by(a).total_cmp(&by(b)));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

/// A provider's resident memory, in kB.
fn rss(p: &Proc) -> f64 {
    p.rss_kb().unwrap_or(0) as f64
}

/// A mutual-TLS world for the sections that give every simulated machine its own certificate:
/// a provider and a site that take any number of connections from loopback, and the CA.
struct TlsWorld {
    w: World,
    p: Proc,
    purl: String,
    s: Proc,
    surl: String,
    ids: Identities,
}

impl TlsWorld {
    fn new(prefix: &str) -> TlsWorld {
        let w = World::new();
        let pubkey = w.pubkey.to_str().unwrap().to_string();
        let many = ["--max-connections-per-peer", "100000"];
        let (p, purl) = w.provider_with(&format!("{prefix}centre"), &[&["--trust-key", &pubkey][..], &many].concat());
        let (s, surl) = w.remote_with(&format!("{prefix}site"), &purl, &many);
        let ids = Identities::new(&w.path("pki"));
        TlsWorld { w, p, purl, s, surl, ids }
    }
}

/// Serving over mutual TLS, every client a distinct machine with its own certificate and
/// connection, as a fleet is: provider memory per connected agent, the check herd, checks per
/// second and downloads from a provider and a site, beside nginx doing mutual TLS 1.3 with the
/// same load generator. `herd_only`: stop after the herd.
async fn tls_section(herd_only: bool) {
    const MACHINES: usize = 10_000;
    let TlsWorld { w, p, purl, s: _s, surl, ids } = TlsWorld::new("t");
    println!("Mutual TLS: {MACHINES} machines, each with its own certificate and connection");

    // Memory per connected agent: a connection (TLS done), then its push stream.
    let names: Vec<String> = (0..MACHINES).map(|i| format!("m-{i}")).collect();
    let configs: Vec<_> = names.iter().map(|n| Some(ids.client(n, Role::Agent))).collect();
    let rss0 = rss(&p);
    let t = Instant::now();
    let chans = loadgen::connect_many(&purl, configs.clone(), 64).await;
    let connect_time = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss(&p);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(MACHINES);
    let subs: Vec<_> = chans
        .iter()
        .zip(&names)
        .map(|(ch, name)| {
            let (mut c, ready) = (AgentApiClient::new(ch.clone()), ready_tx.clone());
            let req = SubscribeRequest { machine: name.clone(), last_seen_seq: 0 };
            tokio::spawn(async move {
                let mut s = c.subscribe(req).await.expect("subscribed").into_inner();
                while let Some(Ok(_)) = s.next().await {
                    let _ = ready.try_send(());
                }
            })
        })
        .collect();
    for _ in 0..MACHINES {
        ready_rx.recv().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss2 = rss(&p);
    println!(
        "{MACHINES} connections made in {connect_time:.2?}; provider memory {:.1} kB per connection, \
         {:.1} kB per connection with its push stream (target 16 kB)",
        (rss1 - rss0) / MACHINES as f64,
        (rss2 - rss0) / MACHINES as f64
    );

    // The check herd over mutual TLS: every machine checks at once (and is then in the store).
    w.publish(&purl, &w.package("tlsapp", "1.0.0.0", &w.key));
    let herd: Vec<_> = chans
        .iter()
        .zip(&names)
        .map(|(c, n)| (c.clone(), Req::grpc("/updraft.v1.AgentApi/Check", &check_request(n, &[]))))
        .collect();
    let t = Instant::now();
    // The provider's CPU per check: steadier than the time, which the load generator's own
    // share of the two cores swings by a third.
    let WithCpu { load: l, server_us: per_check, .. } = with_cpu(&p, MACHINES, loadgen::run(herd, MACHINES)).await;
    let elapsed = t.elapsed();
    println!(
        "check herd: {MACHINES} machines at once answered in {elapsed:.2?} ({} failed; p50 {:.1?}, p99 {:.1?}); \
         provider CPU {} per check",
        l.failed,
        l.p50,
        l.p99,
        per_check.map_or("not measured".into(), |us| format!("{us:.0} µs"))
    );
    let rss3 = rss(&p);
    println!("provider memory with {MACHINES} machines known and connected: {:.0} MiB", rss3 / 1024.0);
    for s in subs {
        s.abort();
    }
    if herd_only {
        println!();
        return;
    }

    // Checks per second, 100 clients, 10,000 machines in the store; nginx serves a file as
    // large as the answer to 100 mutual-TLS clients.
    let www = w.path("www-tls");
    std::fs::create_dir_all(&www).unwrap();
    // Given to every machine (agents may download only what they are offered).
    let big = w.noise_package("bigtls", "1.0.0.0", 64);
    let id = w.publish(&purl, &big);
    tokio::task::block_in_place(|| w.wait_site_has(&surl, &id));
    // Agents hold the signed statement after a check and send its digest, so a steady check's
    // answer leaves it out (the herd above got it, as agents do after a push).
    let mut c = AgentApiClient::new(chans[0].clone());
    let digest = held_digest(c.check(check_request(&names[0], &[])).await.unwrap().into_inner());
    let answer = c.check(check_request(&names[0], &digest)).await.unwrap().into_inner().encode_to_vec();
    std::fs::write(www.join("answer"), &answer).unwrap();
    let u = w.admin_json(&purl, &["update", "show", &id]);
    let (hash, size) = (u["content_hash"].as_str().unwrap().to_string(), u["size"].as_u64().unwrap());
    std::fs::copy(&big, www.join("big")).unwrap();
    let base = nginx_mtls(&w, &ids, &www);
    let nurl = base.as_ref().map(|(_, url)| url.clone());
    let clients = |n: usize| configs[..n].to_vec();

    // Each client twice: the agents' own stack (tonic's channel), then the h2 crate alone,
    // which costs the load generator about half as much and so leaves the server more of the
    // two cores; the second is the nearer to a server with the machine to itself.
    let checks = check_count();
    let check = |n: &String| Req::grpc("/updraft.v1.AgentApi/Check", &check_request(n, &digest));
    let bare_tls = || names[..100].iter().map(|n| Some(ids.bare_client(n, Role::Agent))).collect();
    let theirs = match &nurl {
        Some(u) => Some(loadgen::connect_many(u, clients(100), 16).await),
        None => None,
    };
    let ours = chans[..100].iter().zip(&names).map(|(c, n)| (c.clone(), check(n))).collect();
    let channel = checks_beside_nginx(&p, checks, AGENTS_CLIENT, ours, theirs).await;
    let theirs = match &nurl {
        Some(u) => Some(loadgen::connect_many_bare(u, bare_tls(), 16).await),
        None => None,
    };
    let ours = loadgen::connect_many_bare(&purl, bare_tls(), 16).await;
    let ours = ours.into_iter().zip(&names).map(|(c, n)| (c, check(n))).collect();
    let bare = checks_beside_nginx(&p, checks, BARE_CLIENT, ours, theirs).await;
    // Let the 10,000 connections close before measuring downloads.
    drop(chans);
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("(answer {} bytes; blob {:.0} MiB)", answer.len(), size as f64 / (1 << 20) as f64);
    for (client, (ours, theirs)) in [(AGENTS_CLIENT, channel), (BARE_CLIENT, bare)] {
        gen_line(&format!("checks/s, 100 clients, {client}"), Some(ours.load), theirs, |l| l.req_per_s, "req/s");
        let us = |v: Option<f64>| v.map_or("not measured".into(), |us| format!("{us:.1} µs"));
        println!(
            "  CPU per check (user + system): provider {}, load generator {}",
            us(ours.server_us),
            us(ours.client_us)
        );
    }

    let dl = Req::grpc("/updraft.v1.AgentApi/Download", &BlobRequest { content_hash: hash, offset: 0 });
    // The downloading machines check at the site first, as agents do, so it knows what they
    // are offered.
    for (c, n) in loadgen::connect_many(&surl, clients(100), 16).await.into_iter().zip(&names) {
        AgentApiClient::new(c).check(check_request(n, &[])).await.unwrap();
    }
    // The site fetches the blob on the first download; the measured ones find it there.
    let warm = loadgen::connect_many(&surl, clients(1), 1).await;
    loadgen::run(warm.into_iter().map(|c| (c, dl.clone())).collect(), 1).await;
    let big = Req::Get("/big".into());
    for n in [1, 10, 100] {
        let mut runs: [Vec<loadgen::Load>; 3] = Default::default();
        for _ in 0..ROUNDS {
            let targets = [(Some(&purl), &dl), (Some(&surl), &dl), (nurl.as_ref(), &big)];
            for ((url, req), runs) in targets.into_iter().zip(&mut runs) {
                let Some(url) = url else { continue };
                let conns = loadgen::connect_many(url, clients(n), 16).await;
                runs.push(
                    loadgen::run(conns.into_iter().map(|c| (c, req.clone())).collect(), n * downloads_each(n)).await,
                );
            }
        }
        let [p, s, base] = runs.map(|r| median_by(r, |l| l.mb_per_s));
        gen_line(&format!("download MB/s, {n} client(s), provider"), p, base, |l| l.mb_per_s, "MB/s");
        gen_line(&format!("download MB/s, {n} client(s), site"), s, base, |l| l.mb_per_s, "MB/s");
    }
    println!();
}

/// The two clients the load generator sends checks through (see `loadgen`).
const AGENTS_CLIENT: &str = "agents' client";
const BARE_CLIENT: &str = "bare h2 client";

/// `checks` checks over `ours` (connections to the provider `p`, each with its request), with
/// the CPU they cost; then as many GETs of the file as large as their answer over `theirs`
/// (connections to nginx).
async fn checks_beside_nginx<C: loadgen::Conn>(
    p: &Proc,
    checks: usize,
    client: &str,
    ours: Vec<(C, Req)>,
    theirs: Option<Vec<C>>,
) -> (WithCpu, Option<loadgen::Load>) {
    eprintln!("bench: measuring checks/s over mutual TLS, {client} (provider pid {:?})", p.pid());
    let ours = with_cpu(p, checks, loadgen::run(ours, checks)).await;
    eprintln!("bench: measured checks/s");
    let theirs = match theirs {
        Some(conns) => {
            Some(loadgen::run(conns.into_iter().map(|c| (c, Req::Get("/answer".into()))).collect(), checks).await)
        }
        None => None,
    };
    (ours, theirs)
}

/// A run's load, and what each of its requests cost in CPU (µs, user + system) to the server
/// and to this process, the load generator.
struct WithCpu {
    load: loadgen::Load,
    server_us: Option<f64>,
    client_us: Option<f64>,
}

/// `run`, of `requests` requests to `server`, with the CPU they cost.
async fn with_cpu(server: &Proc, requests: usize, run: impl std::future::Future<Output = loadgen::Load>) -> WithCpu {
    let cpu = || (server.pid().and_then(cpu_secs), cpu_secs(std::process::id()));
    let before = cpu();
    let load = run.await;
    let after = cpu();
    let per = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (a - b) / requests as f64 * 1e6);
    WithCpu { load, server_us: per(after.0, before.0), client_us: per(after.1, before.1) }
}

fn gen_line(
    what: &str,
    ours: Option<loadgen::Load>,
    base: Option<loadgen::Load>,
    by: impl Fn(&loadgen::Load) -> f64,
    unit: &str,
) {
    match (ours, base) {
        (Some(o), Some(b)) if by(&b) > 0.0 && o.failed == 0 && b.failed == 0 => println!(
            "{what:<40} {:>10.1} {unit:<6} nginx {:>10.1} {unit:<6} ratio {:>5.2}  (p50 {:.2?} vs {:.2?}, p99 {:.2?} vs {:.2?})",
            by(&o),
            by(&b),
            by(&o) / by(&b),
            o.p50,
            b.p50,
            o.p99,
            b.p99
        ),
        (o, b) => println!("{what:<40} not measured (ours {o:?}, nginx {b:?}: is nginx installed?)"),
    }
}

/// A scheduled check by machine `name` holding the statement whose digest is `digest` (empty:
/// none yet, so the answer carries it).
fn check_request(name: &str, digest: &[u8]) -> CheckRequest {
    let machine = MachineInfo { name: name.to_string(), ..Default::default() };
    CheckRequest { machine: Some(machine), manual: false, statement_digest: digest.to_vec() }
}

/// The digest an agent sends after `answer`: of the signed statement it carried.
fn held_digest(answer: updraft_proto::v1::CheckResponse) -> Vec<u8> {
    answer.statement.map(|s| updraft_core::freshness::digest(&s.body)).unwrap_or_default()
}

/// Checks measured under callgrind in the `cost` section, after as many unmeasured.
const COST_CHECKS: usize = 2_000;

/// Machines new to the provider in the `cost` section: each checks once, on its own connection.
const COST_HERD: usize = 200;

/// What a steady check and a first check (what a herd is made of) cost the provider in
/// instructions, counted by callgrind: within about 1 % run after run whatever else the machine
/// is doing (the provider's background tasks are counted too), where checks per second, the
/// herd's time and CPU time swing by a third. They compare two builds of the check path. Ten
/// machines, each on its own mutual-TLS connection, check `COST_CHECKS` times in all; then
/// `COST_HERD` machines new to the provider check once each, one after another, each on its
/// own connection. The provider runs under `valgrind --tool=callgrind` with counting switched
/// on only for those checks.
async fn cost_section() {
    if std::process::Command::new("callgrind_control").arg("--version").output().is_err() {
        println!("instructions per check: not measured (valgrind is not installed)\n");
        return;
    }
    let mut w = World::new();
    // Under callgrind the provider runs some fifty times slower: its TLS handshakes included.
    w.admin_env.push(("UPDRAFT_CONNECT_TIMEOUT".into(), "120".into()));
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    let out = w.path("callgrind.out");
    let out_flag = format!("--callgrind-out-file={}", out.display());
    let wrapper = ["valgrind", "--tool=callgrind", "--fair-sched=yes", "--instr-atstart=no", &out_flag];
    let (p, purl) = w.provider_under("cost", &wrapper, &["--trust-key", &pubkey]);
    let pid = p.pid().expect("running").to_string();
    let callgrind = |args: &[&str]| {
        let status = std::process::Command::new("callgrind_control").args(args).arg(&pid).output().unwrap();
        assert!(status.status.success(), "callgrind_control {args:?}: {status:?}");
    };
    w.publish(&purl, &w.package("costapp", "1.0.0.0", &w.key));
    let ids = Identities::new(&w.path("pki"));
    let names: Vec<String> = (0..10).map(|i| format!("cost-{i}")).collect();
    let chans =
        loadgen::connect_many(&purl, names.iter().map(|n| Some(ids.client(n, Role::Agent))).collect(), 10).await;
    // Each machine's first check records it; the steady ones send the statement's digest.
    let mut digest = vec![];
    for (c, n) in chans.iter().zip(&names) {
        digest = held_digest(AgentApiClient::new(c.clone()).check(check_request(n, &[])).await.unwrap().into_inner());
    }
    let steady: Vec<_> = chans
        .iter()
        .zip(&names)
        .map(|(c, n)| (c.clone(), Req::grpc("/updraft.v1.AgentApi/Check", &check_request(n, &digest))))
        .collect();
    let warm = loadgen::run(steady.clone(), COST_CHECKS).await;
    callgrind(&["--instr=on"]);
    let measured = loadgen::run(steady, COST_CHECKS).await;
    callgrind(&["--instr=off"]);
    callgrind(&["--dump"]);
    assert_eq!((warm.failed, measured.failed), (0, 0), "every check answered");

    // What a herd is made of: first checks, by machines the provider has not met, each on a
    // connection of its own holding its push stream, as agents' are; each answer carries the
    // signed statement. One at a time: at once, how the provider's tasks happen to interleave
    // moves the count by a quarter. Counting starts once every stream has its first message,
    // so no handshake is still being finished on the provider's side.
    let names: Vec<String> = (0..COST_HERD).map(|i| format!("herd-{i}")).collect();
    let chans =
        loadgen::connect_many(&purl, names.iter().map(|n| Some(ids.client(n, Role::Agent))).collect(), 10).await;
    let mut streams = Vec::new();
    for (c, n) in chans.iter().zip(&names) {
        let req = SubscribeRequest { machine: n.clone(), last_seen_seq: 0 };
        let mut s = AgentApiClient::new(c.clone()).subscribe(req).await.expect("subscribed").into_inner();
        s.next().await.expect("a first message").expect("a push message");
        streams.push(s);
    }
    callgrind(&["--instr=on"]);
    for (c, n) in chans.iter().zip(&names) {
        AgentApiClient::new(c.clone()).check(check_request(n, &[])).await.expect("a first check answered");
    }
    callgrind(&["--instr=off"]);
    callgrind(&["--dump"]);
    drop(streams);

    // Each dump goes to OUT.N, its `totals:` line the instructions counted; each is kept for
    // reading where they go: `callgrind_annotate --inclusive=yes PATH`.
    for (n, what, checks, kept) in [
        (1, "check", COST_CHECKS, "updraft-checks.callgrind"),
        (2, "first check", COST_HERD, "updraft-first-checks.callgrind"),
    ] {
        let dump = std::fs::read_to_string(w.path(&format!("callgrind.out.{n}"))).unwrap();
        let total: u64 = dump
            .lines()
            .find_map(|l| l.strip_prefix("totals: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a totals line");
        let kept = std::env::temp_dir().join(kept);
        std::fs::write(&kept, &dump).unwrap();
        println!(
            "provider instructions per {what} (callgrind): {:.0} ({checks} checks; profile in {})",
            total as f64 / checks as f64,
            kept.display()
        );
    }
    println!();
}

/// How long one simulated agent took from the high-priority mark to having every byte of what
/// it was offered, and how many times it was told to come back.
struct Installed {
    took: Duration,
    retries: u32,
}

/// One simulated agent after a push: check, download every offered install to its last byte;
/// anything refused (a busy site) is retried after a jittered pause, as the agent does.
async fn take_update(ch: Channel, name: String, t0: Instant) -> Installed {
    let mut retries = 0;
    loop {
        let mut c = AgentApiClient::new(ch.clone());
        let m = MachineInfo { name: name.clone(), ..Default::default() };
        let result = async {
            let answer =
                c.check(CheckRequest { machine: Some(m), manual: false, statement_digest: vec![] }).await?.into_inner();
            for offer in answer.offers {
                let Some(u) = offer.update else { continue };
                let mut s = c.download(BlobRequest { content_hash: u.content_hash, offset: 0 }).await?.into_inner();
                let mut got = 0;
                while let Some(chunk) = s.next().await {
                    got += chunk?.data.len() as u64;
                }
                if got != u.size {
                    return Err(tonic::Status::data_loss(format!("{got} of {} bytes", u.size)));
                }
            }
            Ok::<_, tonic::Status>(())
        }
        .await;
        match result {
            Ok(()) => return Installed { took: t0.elapsed(), retries },
            Err(_) => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(fastrand::u64(500..2000))).await;
            }
        }
    }
}

/// Push to installed: simulated agents behind one site, each with its own certificate,
/// mutual-TLS connection and push stream, take a 10 MiB update marked high priority: the
/// time from the mark until each has every byte, the site's WAN bytes for it, and the site's
/// memory per connected agent; beside it, nginx serving the same bytes to as many mutual-TLS
/// clients. `UPDRAFT_BENCH_AGENTS` sets how many (default 10,000).
async fn install_section() {
    let n: usize = std::env::var("UPDRAFT_BENCH_AGENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    const SIZE_MIB: usize = 10;
    let TlsWorld { w, p: _p, purl, s, surl, ids } = TlsWorld::new("i");
    println!("Push to installed: {n} simulated agents behind one site, mutual TLS, a {SIZE_MIB} MiB update");

    let names: Vec<String> = (0..n).map(|i| format!("a-{i}")).collect();
    let configs: Vec<_> = names.iter().map(|n| Some(ids.client(n, Role::Agent))).collect();
    let rss0 = rss(&s);
    let chans = loadgen::connect_many(&surl, configs.clone(), 64).await;
    // Each agent checks once (the site learns it) and holds its push stream.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let t0 = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let agents: Vec<_> = chans
        .iter()
        .zip(&names)
        .map(|(ch, name)| {
            let (ch, name, ready, t0) = (ch.clone(), name.clone(), ready_tx.clone(), t0.clone());
            tokio::spawn(async move {
                let mut c = AgentApiClient::new(ch.clone());
                let m = MachineInfo { name: name.clone(), ..Default::default() };
                c.check(CheckRequest { machine: Some(m), manual: false, statement_digest: vec![] })
                    .await
                    .expect("first check");
                let req = SubscribeRequest { machine: name.clone(), last_seen_seq: 0 };
                let mut events = c.subscribe(req).await.expect("subscribed").into_inner();
                while let Some(Ok(ev)) = events.next().await {
                    if ev.kind == PushKind::Hello as i32 {
                        let _ = ready.send(()).await;
                    } else if ev.kind == PushKind::HighPriority as i32 {
                        let t0 = *t0.get().expect("the mark's time");
                        return Some(take_update(ch, name, t0).await);
                    }
                }
                None
            })
        })
        .collect();
    for _ in 0..n {
        ready_rx.recv().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss(&s);
    println!(
        "site memory {:.1} kB per connected agent (connection, push stream, machine record)",
        (rss1 - rss0) / n as f64
    );

    let pkg = w.noise_package("fix", "1.0.0.0", SIZE_MIB);
    let wan0 = site_wan(&w, &surl);
    let id = w.publish(&purl, &pkg);
    let size = w.admin_json(&purl, &["update", "show", &id])["size"].as_u64().unwrap();
    let cpu0 = (s.pid().and_then(cpu_secs), cpu_secs(std::process::id()));
    let _ = t0.set(Instant::now());
    w.admin_ok(&purl, &["update", "priority", &id, "high"]);
    let mut done = Vec::new();
    let mut retries = 0;
    for a in agents {
        if let Some(i) = a.await.unwrap() {
            retries += i.retries;
            done.push(i.took);
        }
    }
    done.sort();
    let last = done.last().copied().unwrap_or_default();
    let wan = (site_wan(&w, &surl) - wan0) as f64 / size as f64;
    println!(
        "{} of {n} installed; first {:.2?}, median {:.2?}, p99 {:.2?}, last {last:.2?}; {retries} downloads told to retry",
        done.len(),
        done.first().copied().unwrap_or_default(),
        pick(&done, 0.5),
        pick(&done, 0.99),
    );
    println!(
        "site served {:.0} MB/s on average to the fleet; WAN bytes / package size {wan:.2}",
        (n as f64 * size as f64) / last.as_secs_f64().max(1e-9) / (1 << 20) as f64
    );
    // Whether the site had the machine's CPU to itself: what it and the simulated agents (this
    // process) spent over the push, beside what the machine's cores had.
    let cpu1 = (s.pid().and_then(cpu_secs), cpu_secs(std::process::id()));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let ((Some(s0), Some(b0)), (Some(s1), Some(b1))) = (cpu0, cpu1) {
        println!(
            "CPU over the push: site {:.1} s, simulated agents {:.1} s, of {:.1} s the {cores} cores had",
            s1 - s0,
            b1 - b0,
            last.as_secs_f64() * cores as f64
        );
    }

    // The baseline: nginx serving the same bytes to as many mutual-TLS clients (each its own
    // certificate and connection, all at once), one download each: the time the serving
    // alone takes on this machine, without a check, a push or a retry.
    drop(chans);
    let www = w.path("www-install");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::copy(&pkg, www.join("fix")).unwrap();
    let Some((nginx, url)) = nginx_mtls(&w, &ids, &www) else {
        println!("nginx serving the same bytes: not measured (is nginx installed?)\n");
        return;
    };
    let conns = loadgen::connect_many(&url, configs, 64).await;
    let nginx_cpu = || nginx.pid().and_then(group_cpu_secs);
    let ncpu0 = nginx_cpu();
    let theirs = loadgen::run(conns.into_iter().map(|c| (c, Req::Get("/fix".into()))).collect(), n).await;
    let ncpu = nginx_cpu().zip(ncpu0).map(|(after, before)| after - before);
    println!(
        "nginx serving the same bytes to {n} mutual-TLS clients at once: {:.0} MB/s, the last done at {:.1?} \
         ({} failed), using {} of CPU; push to installed / that: ratio {:.2}",
        theirs.mb_per_s,
        theirs.elapsed,
        theirs.failed,
        ncpu.map_or("an unmeasured amount".into(), |c| format!("{c:.1} s")),
        last.as_secs_f64() / theirs.elapsed.as_secs_f64()
    );

    // The floor under any server on this machine: every byte sealed into a TLS record by the
    // site and opened by an agent, at the rates the cipher suite these connections use runs on
    // one core here.
    let probe = loadgen::connect_bare(&surl, Some(ids.bare_client(&names[0], Role::Agent))).await;
    let suite = probe.ok().and_then(|b| b.suite());
    match suite.and_then(|s| record_rates(s).map(|rates| (s, rates))) {
        Some((suite, Rates { seal, open })) => {
            let (bytes, cores) = ((n as u64 * size) as f64, cores as f64);
            // Core-seconds per byte, both ends on this machine's cores.
            let both = 1.0 / seal + 1.0 / open;
            println!(
                "the floor on this machine: {:?} records of 16 KiB are sealed at {:.2} GB/s and opened at {:.2} GB/s \
                 on one core, so sealing the push's {:.1} GB takes {:.1} s on all {cores} cores doing nothing else, \
                 {:.1} s with the simulated agents opening it on the same cores; {SIZE_MIB} MiB to {n} agents in \
                 10 s needs {:.1} GB/s sealed and opened: {:.1} cores of cryptography at these rates",
                suite.suite(),
                seal / 1e9,
                open / 1e9,
                bytes / 1e9,
                bytes / seal / cores,
                bytes * both / cores,
                bytes / 10.0 / 1e9,
                bytes / 10.0 * both
            );
        }
        None => println!("the floor on this machine: not measured (suite {suite:?})"),
    }
    println!();
}

/// Bytes a second one core puts through a TLS cipher suite.
struct Rates {
    seal: f64,
    open: f64,
}

/// How fast one core seals and opens 16 KiB TLS records of `suite` (as a large body fills
/// them) through rustls's own record encrypter and decrypter: the least a TLS server and its
/// client on this machine spend on each byte. Opening includes copying the record out of the
/// way first, since it is opened in place, as a receiver copies it out of its socket. TLS 1.3
/// suites with 32-byte keys (the AES-256-GCM these connections negotiate, ChaCha20-Poly1305);
/// `None` for others.
fn record_rates(suite: rustls::SupportedCipherSuite) -> Option<Rates> {
    use rustls::crypto::cipher::{AeadKey, InboundOpaqueMessage, Iv, OutboundChunks, OutboundPlainMessage};
    let aead = suite.tls13()?.aead_alg;
    if aead.key_len() != 32 {
        return None;
    }
    const RECORD: usize = 16 * 1024;
    let (key, iv) = ([7; 32], [9; 12]);
    let (mut sealer, mut opener) =
        (aead.encrypter(AeadKey::from(key), Iv::new(iv)), aead.decrypter(AeadKey::from(key), Iv::new(iv)));
    let record = vec![0x5a_u8; RECORD];
    let seal_one = |sealer: &mut Box<dyn rustls::crypto::cipher::MessageEncrypter>, seq| {
        let payload = OutboundChunks::Single(&record);
        let typ = rustls::ContentType::ApplicationData;
        sealer.encrypt(OutboundPlainMessage { typ, version: rustls::ProtocolVersion::TLSv1_2, payload }, seq).ok()
    };
    // Each timed for half a second, 64 records at a time.
    fn rate(mut one: impl FnMut(u64) -> Option<()>) -> Option<f64> {
        let (start, mut seq) = (Instant::now(), 0u64);
        while start.elapsed() < Duration::from_millis(500) {
            for _ in 0..64 {
                one(seq)?;
                seq += 1;
            }
        }
        Some(seq as f64 * RECORD as f64 / start.elapsed().as_secs_f64())
    }
    let sealed = seal_one(&mut sealer, 0)?.encode();
    let seal = rate(|seq| seal_one(&mut sealer, seq).map(|m| _ = std::hint::black_box(m)))?;
    // The sealed record's body, after its 5-byte header, opened again and again (as record 0).
    let mut scratch = vec![0u8; sealed.len() - 5];
    let open = rate(|_| {
        scratch.copy_from_slice(&sealed[5..]);
        let typ = rustls::ContentType::ApplicationData;
        let msg = InboundOpaqueMessage::new(typ, rustls::ProtocolVersion::TLSv1_2, &mut scratch);
        opener.decrypt(msg, 0).ok().map(|m| _ = std::hint::black_box(m))
    })?;
    Some(Rates { seal, open })
}

/// What one simulated site saw after the high-priority mark.
struct SiteSaw {
    /// The mark reached the site (its catalog stream carried the update as high priority).
    marked: Duration,
    /// The site had every byte of the update (fetched once).
    fetched: Duration,
    wan_bytes: u64,
}

/// One simulated site of `machines` agents: follows the catalog, forwards one report per
/// machine (so the centre knows them all), then, on the mark, fetches the update's blob once,
/// as a remote provider does for its machines.
async fn sim_site(
    ch: Channel,
    name: String,
    machines: usize,
    ready: tokio::sync::mpsc::Sender<()>,
    t0: std::sync::Arc<std::sync::OnceLock<Instant>>,
) -> SiteSaw {
    use updraft_proto::v1::{FollowRequest, ForwardRequest, ForwardedReport, catalog_event::Change};
    let mut c = ReplicationClient::new(ch);
    let mut events = c.follow_catalog(FollowRequest { after_seq: 0, site: name.clone() }).await.unwrap().into_inner();
    while let Some(ev) = events.next().await {
        if ev.unwrap().caught_up {
            break;
        }
    }
    let reports = (0..machines)
        .map(|i| ForwardedReport {
            machine: Some(MachineInfo { name: format!("{name}-m{i}"), ..Default::default() }),
            at_unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64,
            is_check: true,
            ..Default::default()
        })
        .collect();
    c.forward_reports(ForwardRequest { site: name.clone(), reports, ..Default::default() }).await.unwrap();
    ready.send(()).await.unwrap();
    while let Some(ev) = events.next().await {
        let Some(Change::Upsert(u)) = ev.unwrap().change else { continue };
        if !u.high_priority {
            continue;
        }
        let marked = t0.get().expect("the mark's time").elapsed();
        let mut s = c.fetch_blob(BlobRequest { content_hash: u.content_hash, offset: 0 }).await.unwrap().into_inner();
        let mut wan_bytes = 0;
        while let Some(chunk) = s.next().await {
            wan_bytes += chunk.unwrap().data.len() as u64;
        }
        return SiteSaw { marked, fetched: t0.get().unwrap().elapsed(), wan_bytes };
    }
    panic!("{name}: the catalog stream ended before the mark");
}

/// Fleet scale by simulation: 1, 10 and 100 sites of 1,000 agents each against one provider,
/// every site over its own mutual-TLS connection (a remote-provider certificate), following the
/// catalog and forwarding its machines' reports; a 10 MiB update is marked high priority and
/// every site fetches it. Prints the time until every site has the mark and every byte, WAN
/// bytes per site ÷ package size, and the provider's memory and CPU.
async fn fleet_section() {
    const PER_SITE: usize = 1000;
    println!("Fleet by simulation: sites of {PER_SITE} agents each against one provider, mutual TLS");
    println!(
        "{:>7}  {:>7}  {:>10}  {:>10}  {:>10}  {:>9}  {:>12}  {:>10}",
        "SITES", "AGENTS", "REPORTED", "MARKED", "FETCHED", "WAN/SIZE", "PROVIDER RSS", "CPU"
    );
    let w = World::new();
    let pubkey = w.pubkey.to_str().unwrap().to_string();
    let ids = Identities::new(&w.path("pki"));
    let src = w.path("src-fleet");
    write_noise(&src.join("data.bin"), 10);
    for sites in [1usize, 10, 100] {
        // A fresh provider per row: the centre knows exactly this row's machines.
        let many = ["--max-connections-per-peer", "100000"];
        let (p, purl) = w.provider_with(&format!("fcentre{sites}"), &[&["--trust-key", &pubkey][..], &many].concat());
        let names: Vec<String> = (0..sites).map(|i| format!("s{sites}-{i}")).collect();
        let tls = names.iter().map(|n| Some(ids.client(n, Role::RemoteProvider))).collect();
        let chans = loadgen::connect_many(&purl, tls, 16).await;
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(sites);
        let t0 = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
        let cpu0 = p.pid().and_then(cpu_secs);
        let t_report = Instant::now();
        let tasks: Vec<_> = chans
            .into_iter()
            .zip(names)
            .map(|(ch, name)| tokio::spawn(sim_site(ch, name, PER_SITE, ready_tx.clone(), t0.clone())))
            .collect();
        for _ in 0..sites {
            ready_rx.recv().await.unwrap();
        }
        let reported = t_report.elapsed();
        let pkg = w.build_package(&src, &format!("fleetfix{sites}"), "1.0.0.0", &w.key, &[]);
        let id = w.publish(&purl, &pkg);
        let size = w.admin_json(&purl, &["update", "show", &id])["size"].as_u64().unwrap();
        let _ = t0.set(Instant::now());
        w.admin_ok(&purl, &["update", "priority", &id, "high"]);
        let mut saw = Vec::new();
        for t in tasks {
            saw.push(t.await.unwrap());
        }
        let cpu = match (cpu0, p.pid().and_then(cpu_secs)) {
            (Some(a), Some(b)) => format!("{:.1} s", b - a),
            _ => "?".into(),
        };
        let marked = saw.iter().map(|s| s.marked).max().unwrap_or_default();
        let fetched = saw.iter().map(|s| s.fetched).max().unwrap_or_default();
        let wan = saw.iter().map(|s| s.wan_bytes).max().unwrap_or_default() as f64 / size as f64;
        println!(
            "{:>7}  {:>7}  {:>10.2?}  {:>10.2?}  {:>10.2?}  {:>9.2}  {:>8.0} MiB  {:>10}",
            sites,
            sites * PER_SITE,
            reported,
            marked,
            fetched,
            wan,
            rss(&p) / 1024.0,
            cpu
        );
    }
    println!("(REPORTED: every site forwarded its machines; MARKED: every site has the mark; FETCHED: every site");
    println!(" has every byte; CPU: the provider's, for the row)");
    println!();
}
