//! `admin-cli deploy` and `undeploy`: which products go to which groups and machines.
use serde::Serialize;
use updraft_proto::v1::{DeployRequest, ListDeploymentsRequest, ListDeploymentsResponse};

use crate::cli::{DeployCmd, DeployTarget};
use crate::ctx::Ctx;
use crate::render::table;

#[derive(Serialize)]
struct Deployment {
    product: String,
    group: String,
    machine: String,
}

pub async fn run(ctx: &Ctx, cmd: Option<DeployCmd>, target: DeployTarget) -> anyhow::Result<()> {
    match cmd {
        Some(DeployCmd::List { product }) => {
            let req = ListDeploymentsRequest { product: product.unwrap_or_default() };
            let resp = ctx.admin().await?.list_deployments(req).await.map_err(ctx.failed())?.into_inner();
            show(ctx, &resp);
            Ok(())
        }
        None => change(ctx, target, false).await,
    }
}

pub async fn undeploy(ctx: &Ctx, target: DeployTarget) -> anyhow::Result<()> {
    change(ctx, target, true).await
}

async fn change(ctx: &Ctx, target: DeployTarget, remove: bool) -> anyhow::Result<()> {
    let req = DeployRequest {
        product: target.product.unwrap_or_default(),
        group: target.group.unwrap_or_default(),
        machine: target.machine.unwrap_or_default(),
        remove,
    };
    let resp = ctx.admin().await?.deploy(req).await.map_err(ctx.failed())?.into_inner();
    show(ctx, &resp);
    Ok(())
}

fn show(ctx: &Ctx, resp: &ListDeploymentsResponse) {
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    let ds: Vec<Deployment> = resp
        .deployments
        .iter()
        .map(|d| Deployment { product: d.product.clone(), group: d.group.clone(), machine: d.machine.clone() })
        .collect();
    ctx.show(&ds, |ds| {
        let rows: Vec<Vec<String>> = ds
            .iter()
            .map(|d| {
                let to =
                    if d.machine.is_empty() { format!("group {}", d.group) } else { format!("machine {}", d.machine) };
                vec![d.product.clone(), to]
            })
            .collect();
        table(&["PRODUCT", "DEPLOYED TO"], &rows);
    });
}
