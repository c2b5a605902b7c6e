//! `admin-cli rollout`: rollouts in waves (`preview`: who would take an update, wave by wave
//! and site by site, before anything happens).
use serde::Serialize;
use updraft_proto::v1::PreviewRolloutRequest;

use crate::cli::RolloutCmd;
use crate::ctx::Ctx;
use crate::render::table;

#[derive(Serialize)]
struct Wave {
    wave: u32,
    share: String,
    machines: u32,
    cumulative: u32,
}

#[derive(Serialize)]
struct Site {
    site: String,
    machines_per_wave: Vec<u32>,
    wan_bytes: u64,
    first_wave: u32,
}

#[derive(Serialize)]
struct Preview {
    update: String,
    waves: String,
    size: u64,
    machines: u32,
    per_wave: Vec<Wave>,
    sites: Vec<Site>,
}

pub async fn run(ctx: &Ctx, cmd: RolloutCmd) -> anyhow::Result<()> {
    match cmd {
        RolloutCmd::Preview { id, group, waves } => {
            let p = ctx
                .admin()
                .await?
                .preview_rollout(PreviewRolloutRequest { update_id: id, group: group.unwrap_or_default(), waves })
                .await
                .map_err(ctx.failed())?
                .into_inner();
            let view = Preview {
                update: p.update_id,
                waves: p.waves,
                size: p.size,
                machines: p.machines,
                per_wave: p
                    .per_wave
                    .into_iter()
                    .map(|w| Wave { wave: w.wave, share: w.share, machines: w.machines, cumulative: w.cumulative })
                    .collect(),
                sites: p
                    .sites
                    .into_iter()
                    .map(|s| Site {
                        site: s.site,
                        machines_per_wave: s.machines_per_wave,
                        wan_bytes: s.wan_bytes,
                        first_wave: s.first_wave,
                    })
                    .collect(),
            };
            ctx.show(&view, |v| {
                println!("{} in waves {}: {} machine(s) would take it", v.update, v.waves, v.machines);
                let rows: Vec<Vec<String>> = v
                    .per_wave
                    .iter()
                    .map(|w| {
                        vec![w.wave.to_string(), w.share.clone(), w.machines.to_string(), w.cumulative.to_string()]
                    })
                    .collect();
                table(&["WAVE", "SHARE", "MACHINES", "CUMULATIVE"], &rows);
                println!();
                let mut headers = vec!["SITE".to_string()];
                headers.extend(v.per_wave.iter().map(|w| format!("WAVE {}", w.wave)));
                headers.push("WAN BYTES".into());
                let rows: Vec<Vec<String>> = v
                    .sites
                    .iter()
                    .map(|s| {
                        let mut row = vec![s.site.clone()];
                        row.extend(s.machines_per_wave.iter().map(|n| n.to_string()));
                        row.push(if s.wan_bytes == 0 {
                            "-".into()
                        } else {
                            format!("{} (wave {})", s.wan_bytes, s.first_wave)
                        });
                        row
                    })
                    .collect();
                let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
                table(&headers, &rows);
            });
        }
    }
    Ok(())
}
