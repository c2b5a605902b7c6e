//! One module per command group, each `run(ctx, command)`; they depend on the core (`ctx`,
//! `rpc`, `render`, `views`) and never on each other. [`run`] is the flat dispatcher.
mod activity;
mod audit;
mod deploy;
mod discovery;
mod docs;
mod group;
mod key;
mod machine;
mod package;
mod pki;
mod product_line;
mod provider;
mod report;
mod rollout;
mod site;
mod update;
mod user;
mod watch;

use crate::cli::Cmd;
use crate::ctx::Ctx;

pub async fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Key(c) => key::run(ctx, c),
        Cmd::Pki(c) => pki::run(ctx, c).await,
        Cmd::Package(c) => package::run(ctx, c),
        Cmd::Update(c) => update::run(ctx, c).await,
        Cmd::Machine(c) => machine::run(ctx, c).await,
        Cmd::Rollout(c) => rollout::run(ctx, c).await,
        Cmd::ProductLine(c) => product_line::run(ctx, c).await,
        Cmd::Deploy { cmd, target } => deploy::run(ctx, cmd, target).await,
        Cmd::Undeploy { target } => deploy::undeploy(ctx, target).await,
        Cmd::Watch(c) => watch::run(ctx, c).await,
        Cmd::Activity { cmd, filter } => activity::run(ctx, cmd, filter).await,
        Cmd::Site(c) => site::run(ctx, c).await,
        Cmd::Group(c) => group::run(ctx, c).await,
        Cmd::Provider(c) => provider::run(ctx, c).await,
        Cmd::Discovery(c) => discovery::run(ctx, c).await,
        Cmd::User(c) => user::run(ctx, c).await,
        Cmd::Audit(c) => audit::run(ctx, c).await,
        Cmd::Report { cmd, since } => report::run(ctx, cmd, since).await,
        Cmd::Completions { shell } => docs::completions(shell),
        Cmd::Man { out } => docs::man(ctx, &out),
    }
}
