//! `agent cancel`: a request to stop the running check's downloads and the tasks it has not
//! started. An install that has begun its swap is never stopped half-way: cancellation is only
//! looked at before a download chunk, before each offer and before an install's swap.
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Cancel {
    requested: AtomicBool,
    wake: Notify,
}

impl Cancel {
    /// Asks the running check to stop.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Forgets a request (when a check ends: a cancel stops the check that runs, not the next).
    pub fn reset(&self) {
        self.requested.store(false, Ordering::SeqCst);
    }

    /// Resolves once a cancel is requested.
    pub async fn requested(&self) {
        loop {
            let notified = self.wake.notified();
            if self.is_requested() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_wakes_a_waiter_and_a_reset_forgets_it() {
        let c = std::sync::Arc::new(Cancel::default());
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.requested().await }
        });
        tokio::task::yield_now().await;
        c.request();
        waiter.await.unwrap();
        assert!(c.is_requested());
        c.reset();
        assert!(!c.is_requested());
    }
}
