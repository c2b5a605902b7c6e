//! `admin-cli site`: remote (site) providers — their counters and upstream connection.
use serde::Serialize;
use updraft_proto::v1::{ListMachinesRequest, SiteStats, SiteStatusRequest, replication_client::ReplicationClient};

use crate::cli::SiteCmd;
use crate::ctx::Ctx;
use crate::render::{age, table};
use crate::views::MachineView;

#[derive(Serialize)]
struct Stats {
    site: String,
    upstream: String,
    upstream_connected: bool,
    upstream_since_unix_ms: i64,
    catalog_seq: u64,
    wan_bytes: u64,
    served_bytes: u64,
    cache_hits: u64,
    cache_misses: u64,
    cache_hit_ratio: Option<f64>,
    prefetch_passes: u64,
    prefetch_failed: u64,
}

impl From<&SiteStats> for Stats {
    fn from(s: &SiteStats) -> Self {
        let total = s.cache_hits + s.cache_misses;
        Self {
            site: s.site.clone(),
            upstream: s.upstream.clone(),
            upstream_connected: s.upstream_connected,
            upstream_since_unix_ms: s.upstream_since_unix_ms,
            catalog_seq: s.catalog_seq,
            wan_bytes: s.wan_bytes,
            served_bytes: s.served_bytes,
            cache_hits: s.cache_hits,
            cache_misses: s.cache_misses,
            cache_hit_ratio: (total > 0).then(|| s.cache_hits as f64 / total as f64),
            prefetch_passes: s.prefetch_passes,
            prefetch_failed: s.prefetch_failed,
        }
    }
}

impl Stats {
    fn ratio(&self) -> String {
        self.cache_hit_ratio.map_or("-".into(), |r| format!("{r:.2}"))
    }
}

/// A site as the centre last heard from it.
#[derive(Serialize)]
struct Site {
    #[serde(flatten)]
    stats: Stats,
    last_contact_unix_ms: i64,
    silent: bool,
    contact_due_unix_ms: i64,
    #[serde(skip)]
    status: String,
}

pub async fn run(ctx: &Ctx, cmd: SiteCmd) -> anyhow::Result<()> {
    match cmd {
        SiteCmd::List => {
            let mut c = ctx.admin().await?;
            let ms = c.list_machines(ListMachinesRequest::default()).await.map_err(ctx.failed())?.into_inner().machines;
            let sites: Vec<Site> = ms
                .iter()
                .filter(|m| m.is_remote_provider)
                .map(|m| {
                    let view = MachineView::from(m);
                    let mut stats = Stats::from(&m.site_stats.clone().unwrap_or_default());
                    stats.site = view.name.clone();
                    Site {
                        stats,
                        last_contact_unix_ms: m.last_contact_unix_ms,
                        silent: m.silent,
                        contact_due_unix_ms: m.contact_due_unix_ms,
                        status: view.status_text(),
                    }
                })
                .collect();
            ctx.show(&sites, |sites| {
                let rows: Vec<Vec<String>> = sites
                    .iter()
                    .map(|s| {
                        vec![
                            s.stats.site.clone(),
                            age(s.last_contact_unix_ms),
                            if s.silent {
                                s.status.clone()
                            } else if s.stats.upstream_connected {
                                "connected".into()
                            } else {
                                "working alone".into()
                            },
                            s.stats.wan_bytes.to_string(),
                            s.stats.served_bytes.to_string(),
                            s.stats.ratio(),
                        ]
                    })
                    .collect();
                table(&["SITE", "LAST CONTACT", "UPSTREAM", "WAN BYTES", "SERVED BYTES", "CACHE HIT RATIO"], &rows);
            });
        }
        SiteCmd::Status => {
            let mut r = ReplicationClient::new(ctx.channel().await?);
            let s = Stats::from(&r.site_status(SiteStatusRequest {}).await.map_err(ctx.failed())?.into_inner());
            ctx.show(&s, print_status);
        }
    }
    Ok(())
}

fn print_status(s: &Stats) {
    println!("site          {}", s.site);
    if s.upstream.is_empty() {
        println!("upstream      - (a local provider)");
    } else {
        let state = if s.upstream_connected {
            "connected"
        } else {
            "unreachable: working alone from cache and the last catalog"
        };
        println!("upstream      {} ({state} since {})", s.upstream, age(s.upstream_since_unix_ms));
    }
    println!("catalog       {}", s.catalog_seq);
    println!("wan bytes     {}", s.wan_bytes);
    println!("served bytes  {}", s.served_bytes);
    println!("cache         {} hits, {} misses (hit ratio {})", s.cache_hits, s.cache_misses, s.ratio());
    println!(
        "prefetch      {} passes{}",
        s.prefetch_passes,
        if s.prefetch_failed == 0 { String::new() } else { format!(", {} failed in the last", s.prefetch_failed) }
    );
}
