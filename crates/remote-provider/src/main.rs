//! `remote-provider`: command-line entry of a site provider.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(name = "remote-provider", version, about = "Updraft site provider: caches an upstream provider for one site")]
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = updraft_runtime::telemetry::init("updraft-remote-provider", &args.logs);
    let data_dir = args.store.unwrap_or_else(|| updraft_runtime::default_data_dir("remote-provider"));
    let mut provider = updraft_provider::Config::new(args.name.unwrap_or_else(updraft_runtime::hostname), data_dir);
    provider.transport = args.tls.transport("remote-provider")?;
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
