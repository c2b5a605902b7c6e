//! `admin-cli pki`: the private CA for mutual TLS and the certificates it issues.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use crate::cli::PkiCmd;
use crate::ctx::Ctx;

#[derive(Serialize)]
struct Ca {
    ca: PathBuf,
}

#[derive(Serialize)]
struct Issued {
    cert: PathBuf,
    key: PathBuf,
    role: &'static str,
    name: String,
}

pub fn run(ctx: &Ctx, cmd: PkiCmd) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init { dir, name } => {
            let ca = Ca { ca: updraft_runtime::tls::pki::init(&dir, &name)? };
            ctx.show(&ca, |c| {
                println!("created CA {} (its key, {}, stays with you)", c.ca.display(), dir.join("ca.key").display())
            });
        }
        PkiCmd::Issue { name, role, dir, san, days } => {
            let role: updraft_runtime::tls::Role = role.parse()?;
            if !(1..=3650).contains(&days) {
                bail!("--days must be 1-3650, got {days}");
            }
            let now = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
            let valid = Duration::from_secs(u64::from(days) * 86_400);
            let (cert, key) = updraft_runtime::tls::pki::issue(&dir, role, &name, &san, now, valid, &dir.join(&name))?;
            let issued = Issued { cert, key, role: role.as_str(), name };
            ctx.show(&issued, |i| {
                println!("issued {} and {} ({} {}, {days} days)", i.cert.display(), i.key.display(), i.role, i.name)
            });
        }
    }
    Ok(())
}
