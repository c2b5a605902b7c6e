//! `agent`: the daemon (`agent run`) and its local control commands.
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use updraft_agent::config::{self, FileConfig};
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
    #[arg(long, env = "UPDRAFT_AGENT_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
}

impl StateDir {
    fn path(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| updraft_runtime::default_data_dir("agent"))
    }
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML); flags and environment variables override it.
    #[arg(long, env = "UPDRAFT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Provider URL, e.g. http://127.0.0.1:8092 (repeat for fallbacks, in order).
    #[arg(long = "provider", env = "UPDRAFT_AGENT_PROVIDERS", value_delimiter = ',')]
    providers: Vec<String>,
    /// Directory the products are installed under (ROOT/PRODUCT).
    #[arg(long, env = "UPDRAFT_AGENT_INSTALL_ROOT")]
    install_root: Option<PathBuf>,
    /// Agent state directory.
    #[arg(long, env = "UPDRAFT_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Pinned release public key; packages not signed by it are refused.
    #[arg(long, env = "UPDRAFT_AGENT_TRUST_KEY")]
    trust_key: Option<PathBuf>,
    /// Machine name (default: host name); several hosts may share one.
    #[arg(long, env = "UPDRAFT_AGENT_NAME")]
    name: Option<String>,
    /// Shortest wait between scheduled checks, seconds (default: what the provider says, 30 min).
    #[arg(long, env = "UPDRAFT_AGENT_MIN_INTERVAL")]
    min_interval: Option<u64>,
    /// Longest wait between scheduled checks, seconds (default 60 min).
    #[arg(long, env = "UPDRAFT_AGENT_MAX_INTERVAL")]
    max_interval: Option<u64>,
    /// Timeout of each request to a provider, seconds (default 60, at most 600).
    #[arg(long, env = "UPDRAFT_AGENT_REQUEST_TIMEOUT")]
    request_timeout: Option<u64>,
    /// Largest message accepted from a provider, bytes (default 4 MiB).
    #[arg(long, env = "UPDRAFT_AGENT_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Most bytes the download cache may hold (default 8 GiB).
    #[arg(long, env = "UPDRAFT_AGENT_DOWNLOAD_CACHE_BYTES")]
    download_cache_bytes: Option<u64>,
    /// Find providers on the local network (mDNS) announced with this machine's discovery key.
    #[arg(long, env = "UPDRAFT_AGENT_DISCOVER")]
    discover: bool,
    /// The discovery key to accept (default Production); implies --discover.
    #[arg(long, env = "UPDRAFT_AGENT_DISCOVERY_KEY")]
    discovery_key: Option<String>,
    /// Disk space always left free (default 256 MiB); downloads that would eat into it wait.
    #[arg(long, env = "UPDRAFT_AGENT_DISK_RESERVE_BYTES")]
    disk_reserve_bytes: Option<u64>,
    /// The product that is this agent: its updates replace this binary (default updraft-agent).
    #[arg(long, env = "UPDRAFT_AGENT_SELF_PRODUCT")]
    self_product: Option<String>,
    /// Seconds a new agent has to report in before the previous one comes back (default 120).
    #[arg(long, env = "UPDRAFT_AGENT_SELF_UPDATE_DEADLINE_SECS")]
    self_update_deadline_secs: Option<u64>,
    /// What this machine is: workstation (default), server or site. Product lines that follow
    /// the server role keep workstations at or below their servers' version.
    #[arg(long, env = "UPDRAFT_AGENT_ROLE")]
    role: Option<String>,
    /// Pinned catalog key(s) (.pub): answers must carry a fresh statement signed by one.
    /// Required, unless --allow-unsigned-catalog.
    #[arg(long = "catalog-key", env = "UPDRAFT_AGENT_CATALOG_KEYS", value_delimiter = ',')]
    catalog_keys: Vec<PathBuf>,
    /// Act on answers no pinned catalog key vouches for (tests and first experiments only: then
    /// whoever answers decides what this machine installs, within the release signature).
    #[arg(long, env = "UPDRAFT_AGENT_ALLOW_UNSIGNED_CATALOG")]
    allow_unsigned_catalog: bool,
    #[command(flatten)]
    tls: updraft_runtime::tls::TlsArgs,
    #[command(flatten)]
    probes: updraft_runtime::probe::ProbeArgs,
    #[command(flatten)]
    logs: updraft_runtime::logs::LogArgs,
}

/// Where `agent enroll` writes the machine's key and certificate, under the state directory.
const ENROLLED: &str = "tls";

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Run(Box<RunArgs>),
    /// Get this machine's certificate: a key made here (it never leaves the machine), signed by
    /// the provider's CA for a join token (`admin-cli pki token`) or, without one, once an
    /// administrator approves (`admin-cli pki approve NAME`). Written to STATE_DIR/tls, where
    /// `agent run` finds it; renewed by the agent before it expires.
    Enroll {
        #[command(flatten)]
        state: StateDir,
        /// The provider (or site) URL, https://HOST:PORT.
        #[arg(long)]
        provider: String,
        /// The CA certificate the provider's must be signed by (ca.crt from the administrator).
        #[arg(long)]
        ca: PathBuf,
        /// The join token; without one, the request waits for an administrator's approval.
        #[arg(long, env = "UPDRAFT_JOIN_TOKEN")]
        token: Option<String>,
        /// The machine name to ask for (default: host name; a token naming one decides).
        #[arg(long)]
        name: Option<String>,
        /// How long to wait for an approval before giving up (run again to go on waiting).
        #[arg(long, default_value = "10m", value_parser = updraft_core::when::parse_span)]
        wait: std::time::Duration,
    },
    /// Show installed products, waiting updates, problems and the daemon's view.
    Status(StateDir),
    /// Make the running daemon check now, and show what it did.
    Check {
        #[command(flatten)]
        state: StateDir,
        /// Leave high-priority updates for the next install window instead of installing now.
        #[arg(long)]
        later: bool,
    },
    /// Stop the running check: its downloads now (they resume later), and what it has not
    /// begun; an install already swapping finishes or rolls back, never stops half-way.
    Cancel {
        #[command(flatten)]
        state: StateDir,
    },
    /// Go back to an earlier version kept on this machine: `P_old` (the version before the
    /// live one), or a backup the package asked for (`--backup N`) named with --version. The
    /// update it leaves is held back until `agent apply --select ID`.
    Restore {
        #[command(flatten)]
        state: StateDir,
        product: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Install the updates that wait (downloaded or not) now.
    Apply {
        #[command(flatten)]
        state: StateDir,
        /// Only these update ids.
        #[arg(long = "select")]
        select: Vec<String>,
    },
    /// The providers this agent knows (assigned, discovered, configured) and how each is doing.
    Providers {
        #[command(flatten)]
        state: StateDir,
        #[command(subcommand)]
        cmd: Option<ProvidersCmd>,
    },
    /// (internal) Watches a new agent on trial; started by the agent itself.
    #[command(hide = true, name = "self-update-watch")]
    SelfUpdateWatch {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        install_root: PathBuf,
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        deadline_secs: u64,
        #[arg(last = true)]
        argv: Vec<std::ffi::OsString>,
    },
    /// What an update's hooks printed (pre-install, stop, post-install, start, health).
    Log {
        #[command(flatten)]
        state: StateDir,
        /// The update id (as `agent status` shows it).
        update: String,
    },
    /// Declare a product installed by other means under the install root, so Updraft updates it
    /// (files untouched; its first update keeps the existing tree as PRODUCT_old).
    Adopt {
        #[command(flatten)]
        state: StateDir,
        /// The directory name under the install root.
        product: String,
        /// The version installed there (MM.mm.PP.BB).
        #[arg(long)]
        version: String,
        /// The product's upgrade code, when it has one.
        #[arg(long, default_value = "")]
        upgrade_code: String,
    },
    /// Change this machine's own settings (machines in the default group only).
    Config {
        #[command(flatten)]
        state: StateDir,
        /// automatic, download, notify or manual.
        #[arg(long)]
        mode: Option<String>,
        /// every-day or sunday..saturday.
        #[arg(long)]
        day: Option<String>,
        /// 0-23, or any.
        #[arg(long)]
        hour: Option<String>,
        /// Forget this machine's own settings and follow the default group again.
        #[arg(long)]
        reset: bool,
    },
}

#[derive(Subcommand)]
enum ProvidersCmd {
    /// Try one provider now with a check (by the name `agent providers` shows, or a URL).
    Test { target: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(args) => run(*args).await,
        Cmd::Status(state) => status(&state).await,
        Cmd::Enroll { state, provider, ca, token, name, wait } => {
            let e = updraft_runtime::enroll::Enrollment {
                provider,
                ca,
                token,
                name: name.unwrap_or_else(updraft_runtime::hostname),
                role: updraft_runtime::tls::Role::Agent,
                sans: vec![],
                dir: state.path().join(ENROLLED),
                wait,
            };
            Ok(updraft_runtime::enroll::enroll_command(&e, state.json).await?)
        }
        Cmd::Check { state, later } => act(&state, Request::Check { later }).await,
        Cmd::Apply { state, select } => act(&state, Request::Apply { select }).await,
        Cmd::Cancel { state } => act(&state, Request::Cancel).await,
        Cmd::Restore { state, product, version } => {
            updraft_core::model::validate_product(&product)?;
            if let Some(v) = &version {
                v.parse::<updraft_core::Version>()?;
            }
            act(&state, Request::Restore { product, version }).await
        }
        Cmd::Providers { state, cmd: None } => act(&state, Request::Providers).await,
        Cmd::Log { state, update } => show_log(&state, &update),
        Cmd::SelfUpdateWatch { state_dir, install_root, pid, deadline_secs, argv } => {
            Ok(updraft_agent::selfupdate::watch(
                &state_dir,
                &install_root,
                pid,
                std::time::Duration::from_secs(deadline_secs),
                &argv,
            )?)
        }
        Cmd::Providers { state, cmd: Some(ProvidersCmd::Test { target }) } => {
            act(&state, Request::TestProvider { target }).await
        }
        Cmd::Adopt { state, product, version, upgrade_code } => {
            updraft_core::model::validate_product(&product)?;
            version.parse::<updraft_core::Version>()?;
            act(&state, Request::Adopt { product, version, upgrade_code }).await
        }
        Cmd::Config { state, mode, day, hour, reset } => {
            let install_day = day.map(|d| updraft_core::policy::parse_day(&d)).transpose()?;
            let install_hour = hour.map(|h| updraft_core::policy::parse_hour(&h)).transpose()?;
            if let Some(m) = &mode {
                m.parse::<updraft_core::policy::Mode>()?;
            }
            act(&state, Request::Config { mode, install_day, install_hour, reset }).await
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let telemetry = updraft_runtime::telemetry::init("updraft-agent", &a.logs);
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let providers = if a.providers.is_empty() { file.providers.unwrap_or_default() } else { a.providers };
    let install_root = a
        .install_root
        .or(file.install_root)
        .context("no install root: use --install-root or install_root in the config file")?;
    let trust_key =
        a.trust_key.or(file.trust_key).context("no release key: use --trust-key or trust_key in the config file")?;
    let state_dir = a.state_dir.or(file.state_dir).unwrap_or_else(|| updraft_runtime::default_data_dir("agent"));
    let enrolled = state_dir.join(ENROLLED);
    let cfg = updraft_agent::AgentConfig {
        name: a.name.or(file.name).unwrap_or_else(updraft_runtime::hostname),
        providers,
        install_root,
        state_dir,
        trust_key: PublicKey::load(&trust_key)?,
        interval: config::interval(a.min_interval.or(file.min_interval), a.max_interval.or(file.max_interval))?,
        request_timeout: config::request_timeout(a.request_timeout.or(file.request_timeout))?,
        max_message_bytes: config::max_message_bytes(a.max_message_bytes.or(file.max_message_bytes))?,
        download_cache_bytes: config::download_cache_bytes(a.download_cache_bytes.or(file.download_cache_bytes))?,
        transport: updraft_runtime::tls::TlsArgs {
            tls_ca: a.tls.tls_ca.or(file.tls_ca),
            tls_cert: a.tls.tls_cert.or(file.tls_cert),
            tls_key: a.tls.tls_key.or(file.tls_key),
            insecure: a.tls.insecure || file.insecure.unwrap_or(false),
        }
        .transport_or_enrolled("agent", Some(&enrolled))?,
        self_product: a.self_product.unwrap_or_else(|| "updraft-agent".into()),
        self_update_deadline: std::time::Duration::from_secs(a.self_update_deadline_secs.unwrap_or(120).clamp(1, 3600)),
        argv: std::env::args_os().collect(),
        disk_reserve_bytes: a.disk_reserve_bytes.or(file.disk_reserve_bytes).unwrap_or(256 << 20),
        catalog_keys: {
            let paths = if a.catalog_keys.is_empty() { file.catalog_keys.unwrap_or_default() } else { a.catalog_keys };
            if paths.is_empty() {
                if !(a.allow_unsigned_catalog || file.allow_unsigned_catalog.unwrap_or(false)) {
                    anyhow::bail!(
                        "no catalog key is pinned: start the agent with --catalog-key FILE (the centre's catalog.pub, \
                         made with `admin-cli key generate --out catalog`; `catalog_keys` in agent.toml), or with \
                         --allow-unsigned-catalog to act on any answer (tests only)"
                    );
                }
                eprintln!(
                    "warning: agent --allow-unsigned-catalog: answers are not checked against the centre's signed \
                     catalog; any provider that answers decides what is offered"
                );
                tracing::warn!("--allow-unsigned-catalog: answers are not checked against a signed catalog");
            }
            paths.iter().map(|p| PublicKey::load(p)).collect::<Result<_, _>>()?
        },
        role: updraft_core::model::Role::from_wire(a.role.or(file.role).as_deref().unwrap_or(""))?,
        discovery_key: config::discovery_key(
            a.discover || file.discover.unwrap_or(false),
            a.discovery_key.or(file.discovery_key),
        )?,
    };
    cfg.transport.register_expiry_metric();
    let (probe, shutdown) = (updraft_runtime::Probe::new(), updraft_runtime::shutdown_on_signals());
    let probes = updraft_runtime::probe::ProbeArgs { metrics_listen: a.probes.metrics_listen.or(file.metrics_listen) };
    probes.start("agent", &probe, telemetry.scrape(), &shutdown).await?;
    let result = updraft_agent::run(cfg, probe, shutdown).await;
    telemetry.shutdown().await;
    Ok(result?)
}

fn show_log(state: &StateDir, update: &str) -> anyhow::Result<()> {
    if update.is_empty() || update.contains('/') || update.starts_with('.') {
        bail!("{update:?} is not an update id");
    }
    let path = updraft_agent::lifecycle::log_path(&state.path(), update);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            print!("{text}");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().expect("log dir");
            let known: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log").map(str::to_string))
                .collect();
            bail!(
                "no hook output for {update} (updates with hook output: {})",
                if known.is_empty() { "none".into() } else { known.join(", ") }
            )
        }
        Err(e) => Err(e).with_context(|| path.display().to_string()),
    }
}

/// `agent status`: the daemon's view, or — when no daemon answers — the saved state, with exit
/// status 3 (as `systemctl status` says "not running"), so scripts and probes can tell.
async fn status(state: &StateDir) -> anyhow::Result<()> {
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
    if state.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    if !report.daemon_running {
        std::process::exit(NOT_RUNNING);
    }
    Ok(())
}

/// The exit status of `agent status` when no daemon answers.
const NOT_RUNNING: i32 = 3;

/// Sends a request that makes the daemon act, and prints what it did.
async fn act(state: &StateDir, req: Request) -> anyhow::Result<()> {
    let dir = state.path();
    let resp = control::call(&dir, &req)
        .await
        .with_context(|| format!("no agent daemon answered at {}", control::socket_path(&dir).display()))?;
    match resp {
        Response::Check(r) => {
            if state.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("checked with {} (catalog {})", r.provider, r.catalog_seq);
                for d in &r.done {
                    println!("  {d}");
                }
                for w in &r.waiting {
                    println!("  waiting: {w}");
                }
                if r.done.is_empty() && r.errors.is_empty() && r.waiting.is_empty() {
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
        Response::Config(c) => {
            if state.json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                if let Some(w) = &c.waited {
                    println!("{w}");
                }
                println!(
                    "group {}: mode {}, install day {}, install hour {}",
                    c.group, c.mode, c.install_day, c.install_hour
                );
            }
            Ok(())
        }
        Response::Providers { providers: list } => {
            if state.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<3}{:<24} {:<11} {:<32} STATE", "", "NAME", "SOURCE", "URL");
                for p in &list {
                    let source = serde_json::to_value(p.known.source)?.as_str().unwrap_or_default().to_string();
                    let how = match (&p.backoff_secs, &p.last_error) {
                        (Some(s), Some(e)) => format!("failed, retried in {s:.0} s: {e}"),
                        _ if p.current => "in use".into(),
                        _ => "ok".into(),
                    };
                    let name = match p.known.site.as_str() {
                        "" => p.known.name.clone(),
                        site => format!("{} ({site})", p.known.name),
                    };
                    let mark = if p.current { "*" } else { "" };
                    println!("{mark:<3}{name:<24} {source:<11} {:<32} {how}", p.known.url);
                }
            }
            Ok(())
        }
        Response::Done { message } => {
            if state.json {
                println!("{}", serde_json::json!({ "message": message }));
            } else {
                println!("{message}");
            }
            Ok(())
        }
        Response::Tested(t) => {
            if state.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!(
                    "{} ({}) answered in {} ms: served by {}, catalog {}, {} offer(s)",
                    t.name, t.url, t.millis, t.served_by, t.catalog_seq, t.offers
                );
            }
            Ok(())
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("agent daemon answered out of turn: {other:?}"),
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
    if let Some(g) = &s.group {
        let managed =
            if s.managed { " (managed by the provider)" } else { " (this machine may change its own settings)" };
        println!("group     {g}{managed}, mode {}", s.mode.as_deref().unwrap_or("-"));
    }
    println!("catalog   {}", s.catalog_seq);
    if let Some(e) = &s.last_error {
        println!("error     {e}");
    }
    for p in &s.problems {
        println!("problem   {p}");
    }
    if s.restart_needed {
        println!("restart   needed");
    }
    println!();
    println!("{:<24} {:<16} {:<24} UPDATE", "PRODUCT", "VERSION", "KEPT (agent restore)");
    for i in &s.installed {
        println!(
            "{:<24} {:<16} {:<24} {}",
            i.product,
            i.version,
            if i.kept.is_empty() { "-".to_string() } else { i.kept.join(",") },
            if i.adopted { "(adopted)" } else { i.update_id.as_str() }
        );
    }
    for w in &s.waiting {
        let how = if w.downloaded { "downloaded" } else { "not downloaded" };
        println!("waiting   {} {} ({how}) {}", w.product, w.version, w.update_id);
    }
}
