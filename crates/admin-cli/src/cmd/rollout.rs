//! `admin-cli rollout`: rollouts in waves — `preview` (who would take an update, wave by wave
//! and site by site, before anything happens), `start`, `status`, `resume`, `revert`.
use serde::Serialize;
use updraft_proto::v1::{
    GetRolloutRequest, ListRolloutsRequest, PreviewRolloutRequest, ResumeRolloutRequest, RolloutReport, RolloutState,
    StartRolloutRequest,
};

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

#[derive(Serialize)]
struct WaveView {
    wave: u32,
    share: String,
    open: bool,
    machines: u32,
    installed: u32,
    verified: u32,
    failed: u32,
    rolled_back: u32,
    waiting: u32,
}

#[derive(Serialize)]
struct Status {
    update: String,
    state: String,
    waves: String,
    group: String,
    open: u32,
    min_verified: String,
    max_failed: String,
    wave_wait_secs: i64,
    reason: String,
    next: String,
    acknowledged: Vec<String>,
    per_wave: Vec<WaveView>,
    failed_machines: Vec<String>,
}

fn status_of(r: RolloutReport) -> Status {
    let ro = r.rollout.unwrap_or_default();
    let state = RolloutState::try_from(ro.state)
        .map(|s| s.as_str_name().trim_start_matches("ROLLOUT_STATE_").to_lowercase())
        .unwrap_or_default();
    Status {
        update: ro.update_id,
        state,
        waves: ro.waves,
        group: ro.group,
        open: ro.open + 1,
        min_verified: updraft_core::rollout::pct(ro.min_verified_bp),
        max_failed: updraft_core::rollout::pct(ro.max_failed_bp),
        wave_wait_secs: ro.wave_wait_ms / 1000,
        reason: ro.reason,
        next: r.next,
        acknowledged: ro.acknowledged,
        per_wave: r
            .waves
            .into_iter()
            .map(|w| WaveView {
                wave: w.wave,
                share: w.share,
                open: w.open,
                machines: w.machines,
                installed: w.installed,
                verified: w.verified,
                failed: w.failed,
                rolled_back: w.rolled_back,
                waiting: w.waiting,
            })
            .collect(),
        failed_machines: r.failed_machines,
    }
}

fn print_status(s: &Status) {
    let scope = if s.group.is_empty() { "every group".to_string() } else { format!("group {}", s.group) };
    println!(
        "{}: {} in waves {} ({scope}); waves 1-{} open; next wave at {} verified, halts above {} failed, {} s per wave",
        s.update, s.state, s.waves, s.open, s.min_verified, s.max_failed, s.wave_wait_secs
    );
    let rows: Vec<Vec<String>> = s
        .per_wave
        .iter()
        .map(|w| {
            vec![
                w.wave.to_string(),
                w.share.clone(),
                if w.open { "open".into() } else { "-".into() },
                w.machines.to_string(),
                w.installed.to_string(),
                w.verified.to_string(),
                w.failed.to_string(),
                w.rolled_back.to_string(),
                w.waiting.to_string(),
            ]
        })
        .collect();
    table(&["WAVE", "SHARE", "OPEN", "MACHINES", "INSTALLED", "VERIFIED", "FAILED", "ROLLED BACK", "WAITING"], &rows);
    println!("next: {}", s.next);
    if !s.acknowledged.is_empty() {
        println!("failures accepted: {}", s.acknowledged.join(", "));
    }
    for f in &s.failed_machines {
        println!("failed: {f}");
    }
}

pub async fn run(ctx: &Ctx, cmd: RolloutCmd) -> anyhow::Result<()> {
    let show = |r: RolloutReport| {
        let s = status_of(r);
        ctx.show(&s, print_status);
    };
    match cmd {
        RolloutCmd::Start { id, waves, group, min_verified, max_failed, wave_wait } => {
            let req = StartRolloutRequest {
                update_id: id,
                waves,
                group: group.unwrap_or_default(),
                min_verified,
                max_failed,
                wave_wait,
            };
            show(ctx.admin().await?.start_rollout(req).await.map_err(ctx.failed())?.into_inner());
        }
        RolloutCmd::Status { id: Some(id) } => {
            let req = GetRolloutRequest { update_id: id };
            show(ctx.admin().await?.get_rollout(req).await.map_err(ctx.failed())?.into_inner());
        }
        RolloutCmd::Status { id: None } => {
            let all =
                ctx.admin().await?.list_rollouts(ListRolloutsRequest {}).await.map_err(ctx.failed())?.into_inner();
            let all: Vec<Status> = all.rollouts.into_iter().map(status_of).collect();
            ctx.show(&all, |all| {
                if all.is_empty() {
                    println!("no rollouts");
                }
                for s in all {
                    print_status(s);
                    println!();
                }
            });
        }
        RolloutCmd::Resume { id, ack_failures } => {
            let req = ResumeRolloutRequest { update_id: id, ack_failures };
            show(ctx.admin().await?.resume_rollout(req).await.map_err(ctx.failed())?.into_inner());
        }
        RolloutCmd::Revert { id } => {
            let req = GetRolloutRequest { update_id: id };
            show(ctx.admin().await?.revert_rollout(req).await.map_err(ctx.failed())?.into_inner());
        }
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
