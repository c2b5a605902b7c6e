//! `admin-cli report`: the fleet by status, and one machine's report.
use serde::Serialize;
use updraft_proto::v1::{GetMachineRequest, ReportRequest2};

use crate::cli::{ReportCmd, Since};
use crate::ctx::Ctx;
use crate::render::{age, list, safe, table};
use crate::views::{MachineView, machines};

#[derive(Serialize)]
struct StatusGroup {
    status: String,
    count: usize,
    machines: Vec<MachineView>,
}

pub async fn run(ctx: &Ctx, cmd: Option<ReportCmd>, since: Since) -> anyhow::Result<()> {
    let since_unix_ms = since.unix_ms()?;
    let mut c = ctx.admin().await?;
    if let Some(ReportCmd::Show { name }) = cmd {
        let d = c.get_machine(GetMachineRequest { name }).await.map_err(ctx.failed())?.into_inner();
        let m = MachineView::from(&d.machine.unwrap_or_default());
        ctx.show(&m, |m| {
            println!("machine       {}", safe(&m.name));
            println!("status        {}", m.status);
            for n in &m.notes {
                println!("note          {}", safe(n));
            }
            println!("last contact  {}", age(m.last_contact_unix_ms));
            for p in &m.installed {
                println!("installed     {} {}", p.product, p.version);
            }
        });
        return Ok(());
    }
    let r = c.report(ReportRequest2 { since_unix_ms }).await.map_err(ctx.failed())?.into_inner();
    let groups: Vec<StatusGroup> = r
        .groups
        .iter()
        .map(|g| StatusGroup { status: g.status.clone(), count: g.machines.len(), machines: machines(&g.machines) })
        .collect();
    ctx.show(&groups, |groups| {
        let counts: Vec<String> = groups.iter().map(|g| format!("{} {}", g.status, g.count)).collect();
        println!("{}", counts.join(" | "));
        for g in groups.iter().filter(|g| g.count > 0) {
            println!();
            println!("{} ({})", g.status, g.count);
            let rows: Vec<Vec<String>> = g
                .machines
                .iter()
                .map(|m| vec![m.name.clone(), age(m.last_contact_unix_ms), list(&m.notes, "; ")])
                .collect();
            table(&["MACHINE", "LAST CONTACT", "NOTES"], &rows);
        }
        // What the machines did with each update (in JSON: `update show`, `rollout status`).
        if !r.updates.is_empty() {
            println!();
            let rows: Vec<Vec<String>> = r
                .updates
                .iter()
                .map(|u| {
                    vec![
                        u.id.clone(),
                        u.installed.to_string(),
                        u.verified.to_string(),
                        u.failed.to_string(),
                        u.rolled_back.to_string(),
                    ]
                })
                .collect();
            table(&["UPDATE", "INSTALLED", "VERIFIED", "FAILED", "ROLLED BACK"], &rows);
        }
    });
    Ok(())
}
