//! `admin-cli`: the operator's tool. Parses the command line and hands over to `commands`.
mod access;
mod cli;
mod commands;
mod fleet;
mod output;
mod servers;

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = cli::Cli::parse();
    if let Err(e) = commands::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
