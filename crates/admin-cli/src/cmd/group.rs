//! `admin-cli group`: groups of machines and their update policy.
use serde::Serialize;
use updraft_core::policy::{Mode, parse_day, parse_hour};
use updraft_proto::v1::{
    AssignRequest, GetGroupRequest, GroupSettings, ListGroupsRequest, PutGroupRequest, RemoveGroupRequest,
};

use crate::cli::{GroupCmd, GroupSettingsArgs};
use crate::ctx::Ctx;
use crate::render::{list, table};
use crate::views::{SettingsView, machines, machines_table};

/// A create or set request from the flags given: only those are changed (a new group gets
/// automatic mode, any day, any hour).
fn settings_request(name: String, create: bool, a: GroupSettingsArgs) -> anyhow::Result<PutGroupRequest> {
    let mut s = GroupSettings::default();
    let mut req = PutGroupRequest { name, create, ..Default::default() };
    if let Some(m) = &a.mode {
        s.mode = m.parse::<Mode>()?.to_wire();
        req.set_mode = true;
    } else if create {
        s.mode = Mode::Automatic.to_wire();
        req.set_mode = true;
    }
    if let Some(d) = &a.day {
        s.install_day = parse_day(d)?;
        req.set_day = true;
    } else if create {
        s.install_day = -1;
        req.set_day = true;
    }
    if let Some(h) = &a.hour {
        s.install_hour = parse_hour(h)?;
        req.set_hour = true;
    } else if create {
        s.install_hour = -1;
        req.set_hour = true;
    }
    if let Some(p) = a.providers {
        s.providers = p.into_iter().filter(|u| !u.is_empty()).collect();
        req.set_providers = true;
    }
    if let Some(early) = a.download_early {
        s.download_early = early;
        req.set_download_early = true;
    }
    req.settings = Some(s);
    Ok(req)
}

#[derive(Serialize)]
struct Summary {
    name: String,
    members: u32,
    settings: SettingsView,
}

#[derive(Serialize)]
struct Detail {
    name: String,
    settings: SettingsView,
    members: Vec<String>,
}

#[derive(Serialize)]
struct Removed {
    removed: String,
}

pub async fn run(ctx: &Ctx, cmd: GroupCmd) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    let detail = match cmd {
        GroupCmd::Create { name, settings } => c.put_group(settings_request(name, true, settings)?).await,
        GroupCmd::Set { name, settings } => c.put_group(settings_request(name, false, settings)?).await,
        GroupCmd::Show { name } => c.get_group(GetGroupRequest { name }).await,
        GroupCmd::Remove { name } => {
            c.remove_group(RemoveGroupRequest { name: name.clone() }).await.map_err(ctx.failed())?;
            ctx.show(&Removed { removed: name }, |r| {
                println!("removed group {}; its machines are in the default group", r.removed)
            });
            return Ok(());
        }
        GroupCmd::List => {
            let groups = c.list_groups(ListGroupsRequest {}).await.map_err(ctx.failed())?.into_inner().groups;
            let groups: Vec<Summary> = groups
                .into_iter()
                .map(|g| {
                    let grp = g.group.unwrap_or_default();
                    Summary {
                        name: grp.name,
                        members: g.members,
                        settings: SettingsView::from(&grp.settings.unwrap_or_default()),
                    }
                })
                .collect();
            ctx.show(&groups, |gs| {
                let rows: Vec<Vec<String>> = gs
                    .iter()
                    .map(|g| {
                        let mut row = vec![g.name.clone(), g.members.to_string()];
                        row.extend(g.settings.cells());
                        row
                    })
                    .collect();
                table(&["GROUP", "MACHINES", "MODE", "DAY", "HOUR", "PROVIDERS"], &rows);
            });
            return Ok(());
        }
        GroupCmd::Assign { group, machines: names } => {
            let ms = c.assign(AssignRequest { group, machines: names }).await.map_err(ctx.failed())?;
            ctx.show(&machines(&ms.into_inner().machines), |m| machines_table(m));
            return Ok(());
        }
        GroupCmd::Unassign { machines: names } => {
            let ms = c.assign(AssignRequest { group: String::new(), machines: names }).await.map_err(ctx.failed())?;
            ctx.show(&machines(&ms.into_inner().machines), |m| machines_table(m));
            return Ok(());
        }
    }
    .map_err(ctx.failed())?
    .into_inner();
    let g = detail.group.unwrap_or_default();
    let d =
        Detail { name: g.name, settings: SettingsView::from(&g.settings.unwrap_or_default()), members: detail.members };
    ctx.show(&d, |d| {
        let cells = d.settings.cells();
        println!("group      {}", d.name);
        println!("mode       {}", cells[0]);
        println!("day        {}", cells[1]);
        println!("hour       {}", cells[2]);
        println!("providers  {}", cells[3]);
        println!("machines   {}", list(&d.members, ", "));
    });
    Ok(())
}
