//! The benchmark harness for sites and pushes. It starts the real release binaries on loopback
//! and prints, measured in one run:
//! - WAN bytes fetched by a site ÷ package size, with 1, 10, 100 and 1,000 agents downloading
//!   the same package from the site at once (the goal is 1.00);
//! - time for a high-priority mark to reach 1,000 and 10,000 subscribed agents, through one
//!   tier (agents on the local provider) and two (agents on a site): median, p99, max;
//! - provider memory per subscribed agent.
//!
//! Agents are simulated cheaply as gRPC clients (downloads and push subscriptions), many per
//! connection. Run: `cargo run --release -p updraft-tests --bin bench`.
use std::time::{Duration, Instant};

use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};
use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::{BlobRequest, PushKind, SubscribeRequest};
use updraft_tests::{World, wait_until};

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
    // A new package per round, imported but not GA, so the site has not prefetched it.
    let pkg = w.package(&format!("wan{n}"), "1.0.0.0", &w.key);
    let id = w.admin_ok(purl, &["update", "add", pkg.to_str().unwrap()]).trim().to_string();
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

#[tokio::main]
async fn main() {
    // Plaintext: the subscribers below are raw streams, not agents with certificates.
    let w = World::insecure();
    let (p, purl) = w.provider("centre", true);
    let (s, surl) = w.remote("site", &purl);
    wait_until("site synchronised", Duration::from_secs(30), || {
        w.admin_json(&surl, &["site", "status"])["upstream_connected"] == true
    });

    println!("WAN bytes per site / package size (agents downloading from one site at once)");
    println!("{:>8}  {:>6}", "AGENTS", "RATIO");
    for n in [1, 10, 100, 1000] {
        println!("{n:>8}  {:>6.2}", wan_ratio(&w, &purl, &surl, n).await);
    }

    println!();
    println!("High-priority push: mark -> event at every subscribed agent");
    println!("{:>6}  {:>7}  {:>10}  {:>10}  {:>10}  {:>16}", "TIERS", "AGENTS", "MEDIAN", "P99", "MAX", "MEMORY/AGENT");
    let mut round = 0;
    for (tiers, target, proc) in [(1, &purl, &p), (2, &surl, &s)] {
        for n in [1000, 10_000] {
            round += 1;
            let f = push_latency(&w, &purl, target, proc, n, round).await;
            let who = if tiers == 1 { "provider" } else { "site" };
            println!(
                "{tiers:>6}  {n:>7}  {:>10.1?}  {:>10.1?}  {:>10.1?}  {:>10.1} kB ({who})",
                f.median, f.p99, f.max, f.kb_per_agent
            );
        }
    }
}
