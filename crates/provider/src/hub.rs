//! In-process fan-out of catalog changes: to catalog followers (remote providers) and, as push
//! events, to subscribed agents.
use tokio::sync::broadcast;
use updraft_core::model::UpdateState;
use updraft_proto::v1::{PushEvent, PushKind, Update};

/// How many events a slow subscriber may fall behind before it is told to resynchronise.
const CAPACITY: usize = 4096;

#[derive(Clone)]
pub struct Hub {
    catalog: broadcast::Sender<Update>,
    push: broadcast::Sender<PushEvent>,
}

impl Default for Hub {
    fn default() -> Self {
        Self { catalog: broadcast::channel(CAPACITY).0, push: broadcast::channel(CAPACITY).0 }
    }
}

impl Hub {
    /// Announces a committed catalog change. A GA update marked high priority becomes an
    /// urgent push; anything else a plain "catalog changed" hint.
    pub fn publish(&self, u: &Update) {
        let _ = self.catalog.send(u.clone());
        let urgent = u.high_priority && u.state == UpdateState::Ga.to_wire();
        let kind = if urgent { PushKind::HighPriority } else { PushKind::CatalogChanged };
        let _ = self.push.send(PushEvent {
            kind: kind as i32,
            catalog_seq: u.catalog_seq,
            update_id: u.id.clone(),
            product: u.product.clone(),
        });
    }

    pub fn follow_catalog(&self) -> broadcast::Receiver<Update> {
        self.catalog.subscribe()
    }

    pub fn subscribe_push(&self) -> broadcast::Receiver<PushEvent> {
        self.push.subscribe()
    }

    pub fn push_subscribers(&self) -> usize {
        self.push.receiver_count()
    }
}
