//! Blob scrubbing: a blob is read back and re-hashed — every one, one at a time, every
//! `--scrub-interval-secs` (default a day), and one at once when an agent reports that what it
//! downloaded did not have the catalog's hash. A blob that no longer has its hash is
//! quarantined (`blobs/quarantine/`): a site fetches it again from upstream on the next
//! download; the centre stops serving it (re-import the package). Either way it is recorded as
//! activity (kind `verify-failed`, machine = this provider) for the report and `activity`.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use updraft_proto::v1::{Activity, ActivityKind};

use crate::error::Result;
use crate::{Shared, now_ms};

/// Least time between two on-demand scrubs of one blob: agents' reports cannot make the
/// provider re-read a large blob over and over.
const ON_DEMAND_EVERY: Duration = Duration::from_secs(30);

/// When each blob was last scrubbed on demand.
#[derive(Default)]
pub struct Recent(Mutex<HashMap<String, Instant>>);

/// Re-hashes one blob; quarantines and records it if it lost its hash. Returns whether it is
/// sound (or absent).
pub async fn check(shared: &Shared, content_hash: &str, why: &str) -> Result<bool> {
    if shared.blobs.scrub(content_hash).await? {
        return Ok(true);
    }
    let update = shared.catalog()?.updates.iter().find(|u| u.content_hash == content_hash).cloned();
    let (id, product, version) =
        update.map(|u| (u.id, u.product, u.version)).unwrap_or_else(|| (String::new(), String::new(), String::new()));
    let detail = format!(
        "blob {content_hash} no longer has its hash ({why}): quarantined under blobs/quarantine; \
         a site fetches it again from upstream on the next download, a centre serves it again \
         once the package is imported again"
    );
    tracing::error!(%content_hash, update = %id, "{detail}");
    let entry = Activity {
        at_unix_ms: now_ms(),
        machine: shared.config.name.clone(),
        kind: ActivityKind::VerifyFailed as i32,
        update_id: id,
        product,
        version,
        detail,
    };
    shared.store.append_activity(&[entry]).await?;
    Ok(false)
}

/// An agent said the content of update `update_id` it downloaded here failed its hash: scrub
/// that blob now (at most once per [`ON_DEMAND_EVERY`]).
pub fn on_report(shared: &Arc<Shared>, update_id: &str) {
    let Ok(catalog) = shared.catalog() else { return };
    let Some(hash) = catalog.updates.iter().find(|u| u.id == update_id).map(|u| u.content_hash.clone()) else {
        return;
    };
    {
        let mut recent = shared.scrubbed.0.lock().expect("scrub times");
        let now = Instant::now();
        recent.retain(|_, at| now.duration_since(*at) < ON_DEMAND_EVERY);
        if recent.contains_key(&hash) {
            return;
        }
        recent.insert(hash.clone(), now);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Err(e) = check(&shared, &hash, "an agent's download of it failed its hash check").await {
            tracing::warn!(error = %e, %hash, "cannot scrub blob");
        }
    });
}

/// Scrubs every blob, one at a time, every `every` (never when zero).
pub async fn scrub_loop(shared: Arc<Shared>, every: Duration, shutdown: CancellationToken) {
    if every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let blobs = match shared.blobs.list() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list blobs to scrub");
                continue;
            }
        };
        let (mut sound, mut bad) = (0usize, 0usize);
        for hash in blobs {
            if shutdown.is_cancelled() {
                return;
            }
            match check(&shared, &hash, "periodic scrub").await {
                Ok(true) => sound += 1,
                Ok(false) => bad += 1,
                Err(e) => tracing::warn!(error = %e, %hash, "cannot scrub blob"),
            }
        }
        tracing::info!(sound, quarantined = bad, "blob scrub finished");
    }
}
