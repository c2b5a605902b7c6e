//! `admin-cli product-line`: version caps per product line, fixed or following a role (checked
//! by the provider, as every value admin-cli passes on).
use serde::Serialize;
use updraft_proto::v1::{ListCapsRequest, ProductLineCap};

use crate::cli::ProductLineCmd;
use crate::ctx::Ctx;
use crate::render::{dash, table};

#[derive(Serialize)]
struct Cap {
    product_line: String,
    cap: String,
    follow_role: String,
    ceiling: String,
}

pub async fn run(ctx: &Ctx, cmd: ProductLineCmd) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    let caps = match cmd {
        ProductLineCmd::Cap { line, version, follow_role } => {
            let (version, follow_role) = (version.unwrap_or_default(), follow_role.unwrap_or_default());
            c.set_cap(ProductLineCap { product_line: line, version, follow_role, ceiling: String::new() }).await
        }
        ProductLineCmd::Uncap { line } => c.set_cap(ProductLineCap { product_line: line, ..Default::default() }).await,
        ProductLineCmd::List => c.list_caps(ListCapsRequest {}).await,
    }
    .map_err(ctx.failed())?
    .into_inner()
    .caps;
    let caps: Vec<Cap> = caps
        .into_iter()
        .map(|c| Cap { product_line: c.product_line, cap: c.version, follow_role: c.follow_role, ceiling: c.ceiling })
        .collect();
    ctx.show(&caps, |caps| {
        let rows: Vec<Vec<String>> = caps
            .iter()
            .map(|c| {
                let ceiling = match (c.follow_role.as_str(), c.ceiling.as_str()) {
                    ("", _) => "-".to_string(),
                    (role, "") => format!("none yet (no {role} runs it)"),
                    (_, v) => v.to_string(),
                };
                vec![c.product_line.clone(), dash(&c.cap), dash(&c.follow_role), ceiling]
            })
            .collect();
        table(&["PRODUCT LINE", "CAP", "FOLLOWS ROLE", "CEILING"], &rows);
    });
    Ok(())
}
