//! `admin-cli activity`: the activity log, and clearing it.
use anyhow::Context;
use serde::Serialize;
use updraft_proto::v1::{ClearActivityRequest, ListActivityRequest};

use crate::cli::{ActivityCmd, ActivityFilter};
use crate::ctx::Ctx;
use crate::render::{age, dash, table};
use crate::views::ActivityView;

#[derive(Serialize)]
struct Cleared {
    removed: u32,
}

pub async fn run(ctx: &Ctx, cmd: Option<ActivityCmd>, f: ActivityFilter) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    if let Some(ActivityCmd::Clear { machine }) = cmd {
        let req = ClearActivityRequest { machine: machine.unwrap_or_default() };
        let removed = c.clear_activity(req).await.map_err(ctx.failed())?.into_inner().removed;
        ctx.show(&Cleared { removed }, |c| println!("removed {} activity entries", c.removed));
        return Ok(());
    }
    let req = ListActivityRequest {
        machine: f.machine.unwrap_or_default(),
        update_id: f.update.unwrap_or_default(),
        limit: f.limit,
        since_unix_ms: f.since.unix_ms().context("reading the time span")?,
    };
    let acts = c.list_activity(req).await.map_err(ctx.failed())?.into_inner().activities;
    let acts: Vec<ActivityView> = acts.iter().map(ActivityView::from).collect();
    ctx.show(&acts, |acts| {
        let rows: Vec<Vec<String>> = acts
            .iter()
            .map(|a| vec![age(a.at_unix_ms), dash(&a.machine), a.kind.clone(), a.update_id.clone(), a.detail.clone()])
            .collect();
        table(&["WHEN", "MACHINE", "EVENT", "UPDATE", "DETAIL"], &rows);
    });
    Ok(())
}
