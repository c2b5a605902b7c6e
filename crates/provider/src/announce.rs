//! Announces this provider on mDNS while the discovery setting (kept in the store, replicated
//! to sites through the change log) is on, and says goodbye when it is turned off or the
//! provider stops.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use updraft_proto::v1::Discovery;
use updraft_runtime::mdns::{Announcement, Announcer};

use crate::Shared;

/// How often the setting is re-read.
const POLL: Duration = Duration::from_secs(1);
/// How long before a failed announcement is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// `role` is `local` or `remote`; `site` names a remote provider's site.
pub async fn announce_loop(
    shared: Arc<Shared>,
    role: &'static str,
    site: String,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut current: Option<(Discovery, Announcer)> = None;
    let mut failed: Option<(Discovery, Instant)> = None;
    loop {
        let wanted = match shared.store.discovery() {
            Ok(d) => Some(d).filter(|d| d.enabled),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the discovery setting");
                current.as_ref().map(|(d, _)| d.clone())
            }
        };
        if current.as_ref().map(|(d, _)| d) != wanted.as_ref() {
            if let Some((_, a)) = current.take() {
                let _ = tokio::task::spawn_blocking(move || a.stop()).await;
                tracing::info!("stopped announcing on mDNS");
            }
            let retry_due = failed.as_ref().is_none_or(|(d, at)| Some(d) != wanted.as_ref() || at.elapsed() >= RETRY);
            if let Some(d) = wanted.filter(|_| retry_due) {
                let a = Announcement {
                    name: shared.config.name.clone(),
                    key: d.key.clone(),
                    role: role.into(),
                    site: site.clone(),
                    port: addr.port(),
                    ip: Some(addr.ip()).filter(|ip| !ip.is_unspecified()),
                    tls: shared.config.transport.is_tls(),
                };
                match Announcer::start(&a) {
                    Ok(announcer) => {
                        tracing::info!(key = %d.key, role, "announcing on mDNS");
                        failed = None;
                        current = Some((d, announcer));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot announce on mDNS; retrying in {RETRY:?}");
                        failed = Some((d, Instant::now()));
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    if let Some((_, a)) = current {
        let _ = tokio::task::spawn_blocking(move || a.stop()).await;
    }
}
