//! The Updraft remote (site) provider: follows its upstream's catalog over a resumable stream,
//! fetches each blob across the WAN once (concurrent requests share one transfer), serves the
//! site's agents the same agent API as a local provider, and forwards their reports upstream in
//! batches through a durable outbox.
pub mod site;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use updraft_provider::error::{ProviderError, Result};
use updraft_provider::{Probe, Shared};

pub use site::SiteTier;

#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// The site provider's own settings (name = site name, data directory, check intervals).
    pub provider: updraft_provider::Config,
    /// URLs of the provider this site follows (a local provider, both members of a switchover
    /// pair, or another site).
    pub upstream: Vec<String>,
}

/// Serves the site until `shutdown` is cancelled; follows the upstream meanwhile.
///
/// `probe` learns the site's state: not ready until its catalog has caught up with the upstream
/// once (it would answer checks from an old catalog), ready from then on, working alone
/// included; stopping.
pub async fn run(cfg: RemoteConfig, listener: TcpListener, probe: Probe, shutdown: CancellationToken) -> Result<()> {
    let shared = Shared::open(cfg.provider.clone())?;
    let tier = Arc::new(SiteTier::new(shared.clone(), &cfg.upstream, probe.clone())?);
    tier.register_metrics();
    // The trust record as last received: revocations stay in force across a restart.
    if let Some(trust) = shared.store.trust()? {
        updraft_provider::certs::apply_trust(&shared.config.transport, &trust);
    }
    let upstream = cfg.upstream.join(",");
    let addr = listener.local_addr().map_err(|e| ProviderError::Io(e.to_string()))?;
    tracing::info!(%addr, %upstream, site = %shared.config.name, seq = shared.store.catalog_seq()?, "remote provider listening");
    // Up (listening, store open) before the follow loop starts: its first catch-up, however
    // soon, then says ready after this, never before.
    probe.started(false, "catching up with the upstream catalog");
    tokio::spawn(
        site::follow_loop(tier.clone(), shutdown.clone())
            .instrument(updraft_runtime::telemetry::task("catalog_follow", &upstream)),
    );
    tokio::spawn(
        site::prefetch_loop(tier.clone(), shutdown.clone())
            .instrument(updraft_runtime::telemetry::task("prefetch", "")),
    );
    tokio::spawn(
        updraft_provider::scrub::scrub_loop(shared.clone(), shared.config.scrub_interval, shutdown.clone())
            .instrument(updraft_runtime::telemetry::task("blob_scrub", "")),
    );
    tokio::spawn(
        site::forward_loop(tier.clone(), shutdown.clone())
            .instrument(updraft_runtime::telemetry::task("report_forwarder", &upstream)),
    );
    if let updraft_runtime::tls::Transport::Tls(tls) = &shared.config.transport {
        // Renewed at the upstream, keeping the host names agents reach the site at.
        let sans = updraft_runtime::tls::pki::CertInfo::of_pem(tls.current().identity_pem().0)
            .map(|i| i.sans)
            .unwrap_or_default();
        let renewing = tier.clone();
        tokio::spawn(
            updraft_runtime::enroll::renew_loop(
                tls.clone(),
                sans,
                vec![], // its upstream is the centre, or a site it was told to follow
                move || std::future::ready(Ok(renewing.channel())),
                shutdown.clone(),
            )
            .instrument(updraft_runtime::telemetry::task("certificate_renewal", "")),
        );
    }
    let site = shared.config.name.clone();
    tokio::spawn(
        updraft_provider::announce::announce_loop(shared.clone(), "remote", site, addr, shutdown.clone())
            .instrument(updraft_runtime::telemetry::task("mdns_announce", "")),
    );
    // Sites keep no users: no admin API here (`site status` is on the replication API).
    updraft_provider::serve(shared, tier, false, listener, &probe, shutdown.cancelled()).await
}
