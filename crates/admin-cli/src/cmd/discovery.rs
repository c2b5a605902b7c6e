//! `admin-cli discovery`: whether providers announce themselves on mDNS, and with which key.
use serde::Serialize;
use updraft_proto::v1::{Discovery, GetDiscoveryRequest};

use crate::cli::DiscoveryCmd;
use crate::ctx::Ctx;

#[derive(Serialize)]
struct View {
    enabled: bool,
    key: String,
}

pub async fn run(ctx: &Ctx, cmd: DiscoveryCmd) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    let d = match cmd {
        DiscoveryCmd::On { key } => c.set_discovery(Discovery { enabled: true, key }).await,
        DiscoveryCmd::Off => c.set_discovery(Discovery { enabled: false, key: String::new() }).await,
        DiscoveryCmd::Status => c.get_discovery(GetDiscoveryRequest {}).await,
    }
    .map_err(ctx.failed())?
    .into_inner();
    ctx.show(&View { enabled: d.enabled, key: d.key }, |d| {
        if d.enabled {
            println!("discovery on, key {}", d.key);
        } else {
            println!("discovery off");
        }
    });
    Ok(())
}
