//! `agent`: the daemon (`agent run`) and its local control commands.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use updraft_agent::control::{self, Request, Response, StatusReport};
use updraft_core::keys::PublicKey;

#[derive(Parser)]
#[command(
    name = "agent",
    version,
    about = "Updraft agent: keeps this machine on the versions its administrators approve"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct StateDir {
    /// Agent state directory (state file, downloads, control socket).
    #[arg(long, env = "UPDRAFT_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl StateDir {
    fn path(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| updraft_runtime::default_data_dir("agent"))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Run {
        /// Provider URL, e.g. http://127.0.0.1:8092 (repeat for fallbacks, in order).
        #[arg(long = "provider", env = "UPDRAFT_AGENT_PROVIDERS", value_delimiter = ',', required = true)]
        providers: Vec<String>,
        /// Directory the products are installed under (ROOT/PRODUCT).
        #[arg(long, env = "UPDRAFT_AGENT_INSTALL_ROOT")]
        install_root: PathBuf,
        #[command(flatten)]
        state: StateDir,
        /// Pinned release public key; packages not signed by it are refused.
        #[arg(long, env = "UPDRAFT_AGENT_TRUST_KEY")]
        trust_key: PathBuf,
        /// Machine name (default: host name); several hosts may share one.
        #[arg(long, env = "UPDRAFT_AGENT_NAME")]
        name: Option<String>,
        /// Shortest wait between scheduled checks, seconds (default: what the provider says).
        #[arg(long, env = "UPDRAFT_AGENT_MIN_INTERVAL")]
        min_interval: Option<u64>,
        /// Longest wait between scheduled checks, seconds.
        #[arg(long, env = "UPDRAFT_AGENT_MAX_INTERVAL")]
        max_interval: Option<u64>,
        /// Timeout of each request to a provider, seconds (at most 600).
        #[arg(long, env = "UPDRAFT_AGENT_REQUEST_TIMEOUT", default_value_t = 60)]
        request_timeout: u64,
    },
    /// Show installed products and the daemon's view.
    Status {
        #[command(flatten)]
        state: StateDir,
        #[arg(long)]
        json: bool,
    },
    /// Make the running daemon check now, and show what it did.
    Check {
        #[command(flatten)]
        state: StateDir,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { providers, install_root, state, trust_key, name, min_interval, max_interval, request_timeout } => {
            let telemetry = updraft_runtime::telemetry::init("updraft-agent");
            let interval = match (min_interval, max_interval) {
                (None, None) => None,
                (min, max) => {
                    let min = min.or(max).unwrap_or(1);
                    let max = max.unwrap_or(min).max(min);
                    if min == 0 {
                        bail!("--min-interval must be at least 1 second");
                    }
                    Some((Duration::from_secs(min), Duration::from_secs(max)))
                }
            };
            if !(1..=600).contains(&request_timeout) {
                bail!("--request-timeout must be between 1 and 600 seconds, got {request_timeout}");
            }
            let cfg = updraft_agent::AgentConfig {
                name: name.unwrap_or_else(updraft_runtime::hostname),
                providers,
                install_root,
                state_dir: state.path(),
                trust_key: PublicKey::load(&trust_key)?,
                interval,
                request_timeout: Duration::from_secs(request_timeout),
            };
            let result = updraft_agent::run(cfg, updraft_runtime::shutdown_on_signals()).await;
            telemetry.shutdown().await;
            Ok(result?)
        }
        Cmd::Status { state, json } => {
            let dir = state.path();
            let report = match control::call(&dir, &Request::Status).await {
                Ok(Response::Status(s)) => s,
                Ok(Response::Error { message }) => bail!("agent daemon: {message}"),
                Ok(other) => bail!("agent daemon answered out of turn: {other:?}"),
                Err(_) => {
                    // No daemon: the state file still says what is installed.
                    let st = updraft_agent::state::AgentState::load(&dir)
                        .with_context(|| format!("no agent daemon at {} and no readable state", dir.display()))?;
                    eprintln!(
                        "note: no agent daemon answered at {}; showing the saved state",
                        control::socket_path(&dir).display()
                    );
                    updraft_agent::daemon::status_from_state("", &[], &st, false)
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_status(&report);
            }
            Ok(())
        }
        Cmd::Check { state, json } => {
            let dir = state.path();
            let resp = control::call(&dir, &Request::Check)
                .await
                .with_context(|| format!("no agent daemon answered at {}", control::socket_path(&dir).display()))?;
            match resp {
                Response::Check(r) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                    } else {
                        println!("checked with {} (catalog {})", r.provider, r.catalog_seq);
                        for d in &r.done {
                            println!("  {d}");
                        }
                        if r.done.is_empty() && r.errors.is_empty() {
                            println!("  up to date");
                        }
                        for e in &r.errors {
                            eprintln!("  error: {e}");
                        }
                    }
                    if !r.errors.is_empty() {
                        std::process::exit(1);
                    }
                    Ok(())
                }
                Response::Error { message } => bail!("check failed: {message}"),
                other => bail!("agent daemon answered out of turn: {other:?}"),
            }
        }
    }
}

fn print_status(s: &StatusReport) {
    if !s.name.is_empty() {
        println!("machine   {}", s.name);
    }
    println!("daemon    {}", if s.daemon_running { "running" } else { "not running" });
    if let Some(p) = &s.last_provider {
        println!("provider  {p}");
    }
    println!("catalog   {}", s.catalog_seq);
    if let Some(e) = &s.last_error {
        println!("error     {e}");
    }
    println!();
    println!("{:<24} {:<16} {:<16} UPDATE", "PRODUCT", "VERSION", "PREVIOUS");
    for i in &s.installed {
        println!(
            "{:<24} {:<16} {:<16} {}",
            i.product,
            i.version,
            i.previous_version.as_deref().unwrap_or("-"),
            i.update_id
        );
    }
}
