//! `admin-cli machine`: managed machines — list, detail, pins, roles, forget.
use std::collections::BTreeMap;

use serde::Serialize;
use updraft_proto::v1::{ForgetMachineRequest, GetMachineRequest, ListMachinesRequest, PinRequest, SetRoleRequest};

use crate::cli::MachineCmd;
use crate::ctx::Ctx;
use crate::render::{age, dash, list, safe, table};
use crate::views::{ActivityView, MachineView, SettingsView, machines, machines_table};

pub async fn run(ctx: &Ctx, cmd: MachineCmd) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    let ms = match cmd {
        MachineCmd::List { filter, group } => {
            let req = ListMachinesRequest { filter: filter.unwrap_or_default(), group: group.unwrap_or_default() };
            c.list_machines(req).await.map_err(ctx.failed())?.into_inner().machines
        }
        MachineCmd::Show { name } => return show(ctx, c.get_machine(GetMachineRequest { name }).await),
        MachineCmd::Pin { machines, product, version } => {
            c.pin(PinRequest { machines, product, version }).await.map_err(ctx.failed())?.into_inner().machines
        }
        MachineCmd::Unpin { machines, product } => {
            let req = PinRequest { machines, product, version: String::new() };
            c.pin(req).await.map_err(ctx.failed())?.into_inner().machines
        }
        MachineCmd::Role { machine, role } => {
            // `agent` is the grammar's word for no administrator's role (the provider checks the rest).
            let role = if role == "agent" { String::new() } else { role };
            let req = SetRoleRequest { machines: vec![machine], role };
            c.set_role(req).await.map_err(ctx.failed())?.into_inner().machines
        }
        MachineCmd::Forget { machine } => {
            let r = c.forget_machine(ForgetMachineRequest { name: machine }).await.map_err(ctx.failed())?.into_inner();
            let forgot = Forgot { forgot: r.name, removed: r.removed };
            ctx.show(&forgot, |f| {
                println!("forgot {}", f.forgot);
                for what in &f.removed {
                    println!("  removed {what}");
                }
            });
            return Ok(());
        }
    };
    ctx.show(&machines(&ms), |m| machines_table(m));
    Ok(())
}

#[derive(Serialize)]
struct Forgot {
    forgot: String,
    removed: Vec<String>,
}

#[derive(Serialize)]
struct Policy {
    group: String,
    managed: bool,
    settings: SettingsView,
}

#[derive(Serialize)]
struct ProductView {
    product: String,
    installed_version: String,
    available_version: String,
    pinned_version: String,
    status: String,
    held: Vec<String>,
    adopted: bool,
}

#[derive(Serialize)]
struct Detail {
    #[serde(flatten)]
    machine: MachineView,
    policy: Policy,
    products: Vec<ProductView>,
    pins: BTreeMap<String, String>,
    recent: Vec<ActivityView>,
}

fn show(
    ctx: &Ctx,
    answer: Result<tonic::Response<updraft_proto::v1::MachineDetail>, tonic::Status>,
) -> anyhow::Result<()> {
    let d = answer.map_err(ctx.failed())?.into_inner();
    let p = d.policy.clone().unwrap_or_default();
    let detail = Detail {
        machine: MachineView::from(&d.machine.clone().unwrap_or_default()),
        policy: Policy {
            group: p.group,
            managed: p.managed,
            settings: SettingsView::from(&p.settings.unwrap_or_default()),
        },
        products: d
            .products
            .iter()
            .map(|ps| ProductView {
                product: ps.product.clone(),
                installed_version: ps.installed_version.clone(),
                available_version: ps.available_version.clone(),
                pinned_version: ps.pinned_version.clone(),
                status: ps.status.clone(),
                held: ps.held.clone(),
                adopted: ps.adopted,
            })
            .collect(),
        pins: d.pins.into_iter().collect(),
        recent: d.recent.iter().map(ActivityView::from).collect(),
    };
    ctx.show(&detail, print_detail);
    Ok(())
}

fn print_detail(d: &Detail) {
    let m = &d.machine;
    // What a machine says about itself is shown escaped (see `render::safe`).
    println!("machine       {}", safe(&m.name));
    println!("host          {}", safe(&m.hostname));
    println!("addresses     {}", safe(&m.addresses.join(", ")));
    println!("agent         {}", safe(&m.agent_version));
    println!("role          {}", m.role);
    println!("via           {}", safe(&m.via));
    println!("last contact  {}", age(m.last_contact_unix_ms));
    println!(
        "group         {}{}",
        d.policy.group,
        if d.policy.managed { "" } else { " (machine may change its own settings)" }
    );
    let cells = d.policy.settings.cells();
    println!("settings      mode {}, day {}, hour {}, providers {}", cells[0], cells[1], cells[2], cells[3]);
    println!(
        "status        {}{}",
        m.status,
        if m.notes.is_empty() { String::new() } else { format!(": {}", safe(&m.notes.join("; "))) }
    );
    println!();
    let rows: Vec<Vec<String>> = d
        .products
        .iter()
        .map(|ps| {
            let installed =
                if ps.adopted { format!("{} (adopted)", ps.installed_version) } else { dash(&ps.installed_version) };
            vec![
                ps.product.clone(),
                installed,
                dash(&ps.available_version),
                dash(&ps.pinned_version),
                ps.status.clone(),
                list(&ps.held, "; "),
            ]
        })
        .collect();
    table(&["PRODUCT", "INSTALLED", "AVAILABLE", "PINNED", "STATUS", "HELD"], &rows);
    println!();
    let rows: Vec<Vec<String>> = d
        .recent
        .iter()
        .map(|a| vec![age(a.at_unix_ms), a.kind.clone(), a.update_id.clone(), a.detail.clone()])
        .collect();
    table(&["WHEN", "EVENT", "UPDATE", "DETAIL"], &rows);
}
