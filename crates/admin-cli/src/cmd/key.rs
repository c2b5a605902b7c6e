//! `admin-cli key`: release signing keys.
use serde::Serialize;
use updraft_core::keys::ReleaseKey;

use crate::cli::KeyCmd;
use crate::ctx::Ctx;

#[derive(Serialize)]
struct Generated {
    key: std::path::PathBuf,
    #[serde(rename = "pub")]
    public: std::path::PathBuf,
    key_id: String,
}

pub fn run(ctx: &Ctx, cmd: KeyCmd) -> anyhow::Result<()> {
    let KeyCmd::Generate { out } = cmd;
    let key = ReleaseKey::generate()?;
    let (k, p) = key.save(&out)?;
    let g = Generated { key: k, public: p, key_id: key.public().key_id() };
    ctx.show(&g, |g| println!("wrote {} and {} (key id {})", g.key.display(), g.public.display(), g.key_id));
    Ok(())
}
