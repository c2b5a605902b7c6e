//! In-process fan-out of catalog changes: to catalog followers (remote providers) and, as push
//! events, to subscribed agents.
use tokio::sync::broadcast;
use updraft_core::model::UpdateState;
use updraft_proto::v1::{PushEvent, PushKind};

use crate::store::Change;

/// How many events a slow subscriber may fall behind before it is told to resynchronise.
const CAPACITY: usize = 4096;

/// Whom a rollout's change concerns: the machines whose position is in `[from, to)` — a wave
/// just opened (or every open wave, after a resume or a revert) — which check at once. None
/// for a halt: no machine has anything new to take.
fn rollout_push(r: &updraft_proto::v1::Rollout) -> Option<(u32, u32)> {
    use updraft_proto::v1::RolloutState;
    let running = r.state == RolloutState::Running as i32 || r.state == RolloutState::Reverted as i32;
    let waves: updraft_core::rollout::Waves = r.waves.parse().ok()?;
    running.then(|| (r.from_share_bp, waves.share(r.open as usize)))
}

#[derive(Clone)]
pub struct Hub {
    catalog: broadcast::Sender<Change>,
    push: broadcast::Sender<Published>,
}

/// A push event and when it was published, so each stream can measure its fan-out delay.
#[derive(Clone, Debug)]
pub struct Published {
    pub event: PushEvent,
    pub at: std::time::Instant,
}

impl Default for Hub {
    fn default() -> Self {
        Self { catalog: broadcast::channel(CAPACITY).0, push: broadcast::channel(CAPACITY).0 }
    }
}

impl Hub {
    /// Announces a committed catalog change. A GA update marked high priority becomes an
    /// urgent push; anything else a plain "catalog changed" hint.
    pub fn publish(&self, change: Change) {
        if matches!(change, Change::Statement { .. }) {
            // For followers only: agents get the statement with their next answer.
            let _ = self.catalog.send(change);
            return;
        }
        let mut ev =
            PushEvent { kind: PushKind::CatalogChanged as i32, catalog_seq: change.seq(), ..Default::default() };
        if let Change::Rollout { rollout, .. } = &change
            && let Some((from, to)) = rollout_push(rollout)
        {
            ev.kind = PushKind::Rollout as i32;
            ev.update_id = rollout.update_id.clone();
            (ev.wave_from_bp, ev.wave_to_bp) = (from, to);
        }
        if let Change::Upsert(u) = &change {
            if u.high_priority && u.state == UpdateState::Ga.to_wire() {
                ev.kind = PushKind::HighPriority as i32;
            }
            ev.update_id = u.id.clone();
            ev.product = u.product.clone();
        }
        let _ = self.catalog.send(change);
        let _ = self.push.send(Published { event: ev, at: std::time::Instant::now() });
    }

    pub fn follow_catalog(&self) -> broadcast::Receiver<Change> {
        self.catalog.subscribe()
    }

    pub fn subscribe_push(&self) -> broadcast::Receiver<Published> {
        self.push.subscribe()
    }

    pub fn push_subscribers(&self) -> usize {
        self.push.receiver_count()
    }
}
