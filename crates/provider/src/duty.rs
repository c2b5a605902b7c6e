//! Duties only one provider may do at a time (scanning watched folders: two scanners would
//! import the same file twice). On an embedded store the one active provider holds them all;
//! on a shared database every provider serves, and a duty is held through the database
//! (`db::Engine::hold`) by one of them, moving to another within seconds when its holder dies
//! or loses its connection.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Shared;

/// How often a provider without the duty tries to take it, and its holder checks it still has it.
pub const RETRY: Duration = Duration::from_secs(1);

/// Runs `work` (until the token it is given is cancelled) whenever this provider holds `duty`,
/// until `shutdown`.
pub async fn hold_while<F, W>(shared: Arc<Shared>, duty: &'static str, shutdown: CancellationToken, work: W)
where
    W: Fn(CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        let db = shared.store.db().clone();
        let held = tokio::task::spawn_blocking(move || db.hold(duty)).await;
        match held {
            Ok(Ok(Some(held))) => {
                tracing::info!(duty, "holding the duty");
                let token = shutdown.child_token();
                let task = tokio::spawn(work(token.clone()));
                let held = Arc::new(held);
                // Until a stop (Break) or the duty is lost (Continue); either way the work ends.
                let after = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break std::ops::ControlFlow::Break(()),
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                    let still = held.clone();
                    if !tokio::task::spawn_blocking(move || still.still_held()).await.unwrap_or(false) {
                        tracing::warn!(duty, "lost the duty");
                        break std::ops::ControlFlow::Continue(());
                    }
                };
                token.cancel();
                let _ = task.await;
                if after.is_break() {
                    return;
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(duty, error = %e, "cannot ask for the duty"),
            Err(e) => tracing::warn!(duty, error = %e, "asking for the duty failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}
