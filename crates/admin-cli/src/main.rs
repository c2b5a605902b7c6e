//! `admin-cli`: the operator's tool. `main` parses the command line, builds the context and
//! hands over to the dispatcher.
//!
//! Code map: `cli` the grammar; the core every command uses — `ctx` (provider, transport,
//! output mode), `rpc` (channel, Admin client, failures and exit statuses), `render` (tables,
//! JSON, terminal-safe text), `views` (what is printed about each kind of record); `cmd` one
//! module per command group, depending only on that core.
mod cli;
mod cmd;
mod ctx;
mod render;
mod rpc;
mod views;

use clap::Parser;

#[tokio::main]
async fn main() {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`admin-cli machine list | head`). SIGPIPE stays ignored (a closed connection must be an
    // error, not a silent death), so a print to a closed pipe panics in `println!`: that one
    // panic ends the process with the status a shell shows for SIGPIPE, and no message.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.starts_with("failed printing to stdout") && m.contains("Broken pipe")) {
            std::process::exit(141);
        }
        default_hook(info)
    }));
    let cli = cli::Cli::parse();
    let ctx = ctx::Ctx::new(&cli);
    if let Err(e) = cmd::run(&ctx, cli.cmd).await {
        eprintln!("error: {e:#}");
        std::process::exit(rpc::exit_code(&e));
    }
}
