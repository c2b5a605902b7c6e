//! `remote-provider`: command-line entry of a site provider.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// jemalloc, as the provider has and for the same reason (more checks answered per second).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "remote-provider",
    version,
    about = "Updraft site provider: caches an upstream provider for one site",
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: Args,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Get this site's certificate: a key made here (it never leaves the host), signed by the
    /// upstream provider's CA for a join token (`admin-cli pki token --role remote-provider`)
    /// or, without one, once an administrator approves (`admin-cli pki approve NAME`). Written
    /// to STORE/tls, where the site finds it; renewed by the site before it expires.
    Enroll {
        /// The upstream provider's URL, https://HOST:PORT.
        #[arg(long, env = "UPDRAFT_REMOTE_UPSTREAM")]
        upstream: String,
        /// The CA certificate the provider's must be signed by (ca.crt from the administrator).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, env = "UPDRAFT_JOIN_TOKEN")]
        token: Option<String>,
        /// The site name to ask for (default: host name; a token naming one decides).
        #[arg(long, env = "UPDRAFT_REMOTE_NAME")]
        name: Option<String>,
        /// Host names and addresses agents reach this site at (default: the name, localhost,
        /// 127.0.0.1).
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
        /// Data directory (as for running the site).
        #[arg(long, env = "UPDRAFT_REMOTE_STORE")]
        store: Option<PathBuf>,
        /// How long to wait for an approval before giving up.
        #[arg(long, default_value = "10m", value_parser = updraft_core::when::parse_span)]
        wait: std::time::Duration,
    },
}

#[derive(clap::Args)]
struct Args {
    /// URL of the provider to follow, e.g. http://10.0.0.5:8092 (repeat or comma-separate for
    /// both members of a switchover pair).
    #[arg(long, env = "UPDRAFT_REMOTE_UPSTREAM", value_delimiter = ',', required = true)]
    upstream: Vec<String>,
    /// Data directory (sled store and blob cache).
    #[arg(long, env = "UPDRAFT_REMOTE_STORE")]
    store: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "UPDRAFT_REMOTE_LISTEN", default_value = "127.0.0.1:8093")]
    listen: SocketAddr,
    /// Site name, shown upstream in the machine list (default: host name).
    #[arg(long, env = "UPDRAFT_REMOTE_NAME")]
    name: Option<String>,
    #[command(flatten)]
    limits: updraft_provider::limits::LimitArgs,
    #[command(flatten)]
    tls: updraft_runtime::tls::TlsArgs,
    #[command(flatten)]
    probes: updraft_runtime::probe::ProbeArgs,
    #[command(flatten)]
    logs: updraft_runtime::logs::LogArgs,
}

/// Where enrollment writes the site's key and certificate, under its data directory.
const ENROLLED: &str = "tls";

fn data_dir(store: Option<PathBuf>) -> PathBuf {
    store.unwrap_or_else(|| updraft_runtime::default_data_dir("remote-provider"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.cmd {
        Some(Cmd::Enroll { upstream, ca, token, name, san, store, wait }) => {
            let e = updraft_runtime::enroll::Enrollment {
                provider: upstream,
                ca,
                token,
                name: name.unwrap_or_else(updraft_runtime::hostname),
                role: updraft_runtime::tls::Role::RemoteProvider,
                sans: san,
                dir: data_dir(store).join(ENROLLED),
                wait,
            };
            updraft_runtime::enroll::enroll_command(&e, false).await?;
            return Ok(());
        }
        None => cli.run,
    };
    let telemetry = updraft_runtime::telemetry::init("updraft-remote-provider", &args.logs);
    let data_dir = data_dir(args.store);
    let enrolled = data_dir.join(ENROLLED);
    let mut provider = updraft_provider::Config::new(args.name.unwrap_or_else(updraft_runtime::hostname), data_dir);
    provider.transport = args.tls.transport_or_enrolled("remote-provider", Some(&enrolled))?;
    provider.transport.register_expiry_metric();
    args.limits.apply(&mut provider)?;
    let cfg = updraft_remote_provider::RemoteConfig { provider, upstream: args.upstream };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    updraft_runtime::report_listening("remote-provider", listener.local_addr()?);
    let (probe, shutdown) = (updraft_runtime::Probe::new(), updraft_runtime::shutdown_on_signals());
    args.probes.start("remote-provider", &probe, telemetry.scrape(), &shutdown).await?;
    let result = updraft_remote_provider::run(cfg, listener, probe, shutdown).await;
    telemetry.shutdown().await;
    Ok(result?)
}
