//! `provider`: command-line entry of the local provider.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use updraft_core::keys::PublicKey;

/// jemalloc rather than the C library's allocator: with 100 agents checking over mutual TLS a
/// provider answers 20–40% more checks per second with it (`UPDRAFT_BENCH=tls`), its memory per
/// connection the same.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "provider",
    version,
    about = "Updraft local provider: catalog, machines and the gRPC APIs",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    tls: updraft_runtime::tls::TlsArgs,
    #[command(flatten)]
    probes: updraft_runtime::probe::ProbeArgs,
    #[command(flatten)]
    logs: updraft_runtime::logs::LogArgs,
    /// The store: a directory (the embedded sled store, with the blobs and the pair directory),
    /// or a PostgreSQL database, `postgres://USER@HOST[,HOST2…]/DB[?target_session_attrs=read-write]`,
    /// which every provider started on it shares, all of them active.
    #[arg(long, env = "UPDRAFT_PROVIDER_STORE")]
    store: Option<String>,
    /// The content location: the directory whose blobs/ holds the packages (default: the store
    /// directory; with a database, the default data directory). Providers on one database may
    /// share it or each keep their own.
    #[arg(long, env = "UPDRAFT_PROVIDER_CONTENT")]
    content: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "UPDRAFT_PROVIDER_LISTEN", default_value = "127.0.0.1:8092")]
    listen: SocketAddr,
    /// Provider name shown to agents (default: host name).
    #[arg(long, env = "UPDRAFT_PROVIDER_NAME")]
    name: Option<String>,
    /// Release public key(s) accepted on import (repeat or comma-separate).
    #[arg(long = "trust-key", env = "UPDRAFT_PROVIDER_TRUST_KEYS", value_delimiter = ',')]
    trust_keys: Vec<PathBuf>,
    /// Accept packages that no trusted key verifies (recorded as unverified). Off by default.
    #[arg(long, env = "UPDRAFT_PROVIDER_ALLOW_UNVERIFIED")]
    allow_unverified: bool,
    /// Seconds after start before watched auto folders are first scanned.
    #[arg(long, env = "UPDRAFT_SCAN_DELAY_SECS", default_value_t = 90)]
    scan_delay_secs: u64,
    /// Seconds between scans of watched auto folders.
    #[arg(long, env = "UPDRAFT_SCAN_INTERVAL_SECS", default_value_t = 60)]
    scan_interval_secs: u64,
    /// A file modified within this many seconds is taken to be still being written.
    #[arg(long, env = "UPDRAFT_SCAN_QUIET_SECS", default_value_t = 5)]
    scan_quiet_secs: u64,
    /// Shortest interval agents wait between checks, in seconds.
    #[arg(long, env = "UPDRAFT_MIN_CHECK_SECS", default_value_t = 1800)]
    min_check_secs: u32,
    /// Longest interval agents wait between checks, in seconds.
    #[arg(long, env = "UPDRAFT_MAX_CHECK_SECS", default_value_t = 3600)]
    max_check_secs: u32,
    /// How long past its expected next contact (its check interval; a site's heartbeat) a
    /// machine may stay quiet before it is reported as silent, an error.
    #[arg(long, env = "UPDRAFT_SILENCE_GRACE_SECS", default_value_t = 300)]
    silence_grace_secs: u64,
    /// Make this admin-certificate name an admin user at start (bootstrapping the first user,
    /// or recovering access); repeatable.
    #[arg(long = "bootstrap-admin", env = "UPDRAFT_BOOTSTRAP_ADMIN", value_delimiter = ',')]
    bootstrap_admins: Vec<String>,
    /// Key to sign catalog statements with (`admin-cli key generate`); agents pin its .pub with
    /// --catalog-key. Both members of a pair use the same one.
    #[arg(long, env = "UPDRAFT_CATALOG_KEY")]
    catalog_key: Option<PathBuf>,
    /// How long a signed catalog statement stays valid; agents refuse older ones as frozen.
    #[arg(long, env = "UPDRAFT_CATALOG_EXPIRY_SECS", default_value_t = 86_400)]
    catalog_expiry_secs: u64,
    #[command(flatten)]
    limits: updraft_provider::limits::LimitArgs,
    /// URL the other member of a switchover pair reaches this one at (default: from --listen).
    #[arg(long, env = "UPDRAFT_PROVIDER_ADVERTISE")]
    advertise: Option<String>,
    /// Where the web console listens (HTTPS). Default: 127.0.0.1:8443 (any free loopback port
    /// when --listen's port is 0).
    #[arg(long, env = "UPDRAFT_WEB_LISTEN")]
    web_listen: Option<SocketAddr>,
    /// Serve no web console.
    #[arg(long, env = "UPDRAFT_NO_WEB", conflicts_with = "web_listen")]
    no_web: bool,
    /// Minutes a web console session lasts without a request.
    #[arg(long, env = "UPDRAFT_WEB_IDLE_MINS", default_value_t = 30)]
    web_idle_mins: u64,
    /// Largest package accepted by `update add`, in bytes.
    #[arg(long, env = "UPDRAFT_MAX_UPLOAD_BYTES", default_value_t = 16 << 30)]
    max_upload_bytes: u64,
    /// The CA directory (`admin-cli pki init`): this provider signs the certificates agents and
    /// sites enroll for and renew, and keeps the revocation list every tier enforces.
    #[arg(long, env = "UPDRAFT_PKI_DIR")]
    pki_dir: Option<PathBuf>,
    /// How long an agent's or site's certificate lasts (`30d`, `12h`, `90s`); renewed after
    /// two thirds of it.
    #[arg(long, env = "UPDRAFT_CERT_LIFETIME", default_value = "30d", value_parser = updraft_core::when::parse_span)]
    cert_lifetime: std::time::Duration,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage stores (with no provider running on them).
    #[command(subcommand)]
    Store(StoreCmd),
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Copy the store to a new location — a directory, or a PostgreSQL database
    /// (`postgres://…`, keeping the blobs in FROM as the content location); the old one then
    /// refuses to start.
    Move {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: String,
    },
    /// Merge a provider's separate store into a shared one — a directory, or a PostgreSQL
    /// database with `--content` (most recent machine records win).
    Merge {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        into: String,
        /// With a database: the content location that receives the merged updates' blobs
        /// (a provider of the database started with `--content` there serves them).
        #[arg(long)]
        content: Option<PathBuf>,
    },
}

/// Whether a `--store`/`--to` value names a PostgreSQL database rather than a directory.
fn is_database(store: &str) -> bool {
    store.starts_with("postgres://") || store.starts_with("postgresql://")
}

async fn store_cmd(cmd: StoreCmd) -> anyhow::Result<()> {
    match cmd {
        StoreCmd::Move { from, to } if is_database(&to) => {
            let r = updraft_provider::storage::move_store_to_database(&from, &to).await?;
            println!(
                "moved {} into the database: {} updates, {} machines; its {} blobs stay: start the provider(s) with --store URL --content {}",
                from.display(),
                r.updates,
                r.machines,
                r.blobs,
                from.display()
            );
        }
        StoreCmd::Move { from, to } => {
            let to = PathBuf::from(to);
            let r = updraft_provider::storage::move_store(&from, &to).await?;
            println!(
                "moved {} to {}: {} updates, {} blobs, {} machines; start the provider(s) with --store {}",
                from.display(),
                to.display(),
                r.updates,
                r.blobs,
                r.machines,
                to.display()
            );
        }
        StoreCmd::Merge { from, into, content } if is_database(&into) => {
            let Some(content) = content else {
                anyhow::bail!(
                    "store merge into a database needs --content DIR: the content location that receives the merged blobs"
                );
            };
            let r = updraft_provider::storage::merge_store_into_database(&from, &into, &content).await?;
            println!("merged {} into the database (blobs into {}):", from.display(), content.display());
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        StoreCmd::Merge { content: Some(_), .. } => {
            anyhow::bail!("--content is for a merge into a database: a directory store keeps its blobs inside it");
        }
        StoreCmd::Merge { from, into, content: None } => {
            let into = PathBuf::from(into);
            let r = updraft_provider::storage::merge_store(&from, &into).await?;
            println!("merged {} into {}:", from.display(), into.display());
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
    }
    Ok(())
}

/// The web console's port when --web-listen is not given (HTTPS's usual alternative; not the
/// port after --listen's, which is a site's by convention).
const DEFAULT_WEB_PORT: u16 = 8443;

/// Binds the web console's listener: `--web-listen` (an error when taken), or by default
/// [`DEFAULT_WEB_PORT`] on the loopback address (a warning when taken: the console is then off,
/// the provider serves on). A provider asked to listen on port 0 (`asked`, as given) takes any
/// free loopback port for its console too.
async fn web_listener(
    no_web: bool,
    web_listen: Option<SocketAddr>,
    asked: SocketAddr,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if no_web {
        return Ok(None);
    }
    let listener = match web_listen {
        Some(at) => {
            tokio::net::TcpListener::bind(at).await.with_context(|| format!("cannot listen on {at} (--web-listen)"))?
        }
        None => {
            let port = if asked.port() == 0 { 0 } else { DEFAULT_WEB_PORT };
            let at = SocketAddr::from(([127, 0, 0, 1], port));
            match tokio::net::TcpListener::bind(at).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%at, error = %e, "no web console: its default address is taken (see --web-listen)");
                    eprintln!("provider: no web console: {at} is taken ({e}); give --web-listen ADDR or --no-web");
                    return Ok(None);
                }
            }
        }
    };
    println!("provider: web console on https://{}", listener.local_addr()?);
    Ok(Some(listener))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Cmd::Store(cmd)) = args.cmd {
        return store_cmd(cmd).await;
    }
    let telemetry = updraft_runtime::telemetry::init("updraft-provider", &args.logs);
    // With a database, the provider's own directory is its content location.
    let (data_dir, database, content) = match args.store {
        Some(url) if is_database(&url) => {
            (args.content.unwrap_or_else(|| updraft_runtime::default_data_dir("provider")), Some(url), None)
        }
        Some(dir) => (PathBuf::from(dir), None, args.content),
        None => (updraft_runtime::default_data_dir("provider"), None, args.content),
    };
    let mut config = updraft_provider::Config::new(args.name.unwrap_or_else(updraft_runtime::hostname), data_dir);
    config.database = database;
    config.content = content;
    for k in &args.trust_keys {
        config.trusted_keys.push(PublicKey::load(k)?);
    }
    config.allow_unverified = args.allow_unverified;
    if args.scan_interval_secs == 0 {
        anyhow::bail!("--scan-interval-secs must be at least 1");
    }
    config.scan = updraft_provider::scanner::ScanConfig {
        start_delay: Duration::from_secs(args.scan_delay_secs),
        interval: Duration::from_secs(args.scan_interval_secs),
        quiet: Duration::from_secs(args.scan_quiet_secs),
    };
    config.min_check_secs = args.min_check_secs;
    config.max_check_secs = args.max_check_secs;
    config.silence_grace = Duration::from_secs(args.silence_grace_secs);
    config.max_upload_bytes = args.max_upload_bytes;
    config.advertise = args.advertise;
    config.transport = args.tls.transport("provider")?;
    config.transport.register_expiry_metric();
    config.bootstrap_admins = args.bootstrap_admins;
    if let Some(k) = &args.catalog_key {
        config.catalog_key = Some(std::sync::Arc::new(updraft_core::keys::ReleaseKey::load(k)?));
    }
    if !(2..=30 * 86_400).contains(&args.catalog_expiry_secs) {
        anyhow::bail!("--catalog-expiry-secs must be 2 to 2592000 (30 days)");
    }
    config.statement_ttl = Duration::from_secs(args.catalog_expiry_secs);
    if let Some(dir) = args.pki_dir {
        if args.cert_lifetime < Duration::from_secs(2) || args.cert_lifetime > Duration::from_secs(3650 * 86_400) {
            anyhow::bail!("--cert-lifetime must be 2 s to 10 years");
        }
        // Refuse to start with a CA that cannot sign, rather than fail every enrollment.
        updraft_runtime::tls::pki::Ca::load(&dir)?;
        config.pki = Some(updraft_provider::certs::PkiConfig { dir, lifetime: args.cert_lifetime });
    }
    args.limits.apply(&mut config)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    updraft_runtime::report_listening("provider", listener.local_addr()?);
    if !(1..=7 * 24 * 60).contains(&args.web_idle_mins) {
        anyhow::bail!("--web-idle-mins must be 1 to 10080 (a week)");
    }
    config.web_idle = Duration::from_secs(args.web_idle_mins * 60);
    let web = web_listener(args.no_web, args.web_listen, args.listen).await?;
    let (probe, shutdown) = (updraft_runtime::Probe::new(), updraft_runtime::shutdown_on_signals());
    args.probes.start("provider", &probe, telemetry.scrape(), &shutdown).await?;
    let result = updraft_provider::run(config, listener, web, probe, shutdown).await;
    telemetry.shutdown().await;
    Ok(result?)
}
