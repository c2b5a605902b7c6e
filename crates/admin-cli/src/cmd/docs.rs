//! `admin-cli completions SHELL` and `admin-cli man --out DIR`: shell completions and man
//! pages, generated from the same grammar that parses the command line.
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use serde::Serialize;

use crate::cli::Cli;
use crate::ctx::Ctx;

pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    clap_complete::generate(shell, &mut Cli::command(), "admin-cli", &mut std::io::stdout());
    Ok(())
}

#[derive(Serialize)]
struct Written {
    pages: Vec<String>,
}

/// One page for admin-cli and one for each command (`admin-cli-update-list.1`, …).
pub fn man(ctx: &Ctx, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let mut pages = Vec::new();
    write_pages(Cli::command(), "admin-cli", out, &mut pages)?;
    ctx.show(&Written { pages }, |w| println!("wrote {} man pages to {}", w.pages.len(), out.display()));
    Ok(())
}

fn write_pages(cmd: clap::Command, name: &str, out: &Path, pages: &mut Vec<String>) -> anyhow::Result<()> {
    let cmd = cmd.name(name.to_string());
    let file = out.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(&file, buf).with_context(|| file.display().to_string())?;
    pages.push(file.display().to_string());
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(sub.clone(), &format!("{name}-{}", sub.get_name()), out, pages)?;
    }
    Ok(())
}
