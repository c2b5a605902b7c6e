//! `admin-cli user`: who may administer (names in admin certificates, and console passwords).
use anyhow::bail;
use serde::Serialize;
use updraft_proto::v1::{ListUsersRequest, RemoveUserRequest, SetPasswordRequest, User};

use crate::cli::UserCmd;
use crate::ctx::Ctx;
use crate::render::table;

#[derive(Serialize)]
struct UserView {
    name: String,
    role: String,
}

#[derive(Serialize)]
struct Password {
    name: String,
    password: &'static str,
}

pub async fn run(ctx: &Ctx, cmd: UserCmd) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    let users = match cmd {
        UserCmd::Passwd { name, clear, .. } => {
            let password = if clear { String::new() } else { read_password()? };
            c.set_password(SetPasswordRequest { name: name.clone(), password }).await.map_err(ctx.failed())?;
            let p = Password { name, password: if clear { "cleared" } else { "set" } };
            ctx.show(&p, |p| println!("password of {} {}", p.name, p.password));
            return Ok(());
        }
        UserCmd::Add { name, role } => c.put_user(User { name, role }).await,
        UserCmd::Remove { name } => c.remove_user(RemoveUserRequest { name }).await,
        UserCmd::List => c.list_users(ListUsersRequest {}).await,
    }
    .map_err(ctx.failed())?
    .into_inner()
    .users;
    let users: Vec<UserView> = users.into_iter().map(|u| UserView { name: u.name, role: u.role }).collect();
    ctx.show(&users, |us| {
        table(&["USER", "ROLE"], &us.iter().map(|u| vec![u.name.clone(), u.role.clone()]).collect::<Vec<_>>())
    });
    Ok(())
}

/// The first line of standard input, without its line ending.
fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("no password on standard input (to clear one, use --clear)");
    }
    Ok(password)
}
