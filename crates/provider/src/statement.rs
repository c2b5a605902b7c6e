//! The centre's signed catalog statement (see `updraft_core::freshness`): signed when first
//! asked for, again right after every catalog change (so sites receive it right behind the
//! change) and before half its lifetime has passed; stored, sent to followers, and attached
//! to every check answer. Sites pass on the centre's statement; they cannot sign one.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use updraft_core::freshness::{Entry, Statement};
use updraft_core::keys::ReleaseKey;
use updraft_proto::v1::SignedStatement;

use crate::error::Result;
use crate::store::{Change, Store};
use crate::{Shared, now_ms};

pub struct Signer {
    key: Arc<ReleaseKey>,
    ttl: Duration,
    /// The last statement signed, with the catalog sequence and time it was signed at.
    last: Mutex<Option<(u64, i64, SignedStatement)>>,
}

impl Signer {
    pub fn new(key: Arc<ReleaseKey>, ttl: Duration) -> Self {
        Self { key, ttl, last: Mutex::new(None) }
    }

    /// The current statement: the last one, unless the catalog changed or it is half-way to
    /// expiry. Returns it and whether it was just signed.
    pub fn current(&self, store: &Store) -> Result<(SignedStatement, bool)> {
        let seq = store.catalog_seq()?;
        let now = now_ms();
        let ttl_ms = self.ttl.as_millis() as i64;
        let mut last = self.last.lock().expect("signer lock");
        if let Some((s, at, st)) = last.as_ref()
            && *s == seq
            && now - at < ttl_ms / 2
        {
            return Ok((st.clone(), false));
        }
        let entries = store
            .list_updates()?
            .into_iter()
            .map(|u| Entry { id: u.id, content_hash: u.content_hash, size: u.size })
            .collect();
        let st = Statement { version: seq, issued_unix_ms: now, expires_unix_ms: now + ttl_ms, entries };
        let (body, sig) = st.sign(&self.key);
        let signed = SignedStatement { body, signature: sig.to_vec(), key_id: self.key.public().key_id() };
        *last = Some((seq, now, signed.clone()));
        Ok((signed, true))
    }
}

/// The statement a check answer carries: the centre's own (signed now if need be), or the one
/// a site last received from upstream.
pub fn for_answer(shared: &Shared) -> Result<Option<SignedStatement>> {
    match &shared.signer {
        Some(s) => Ok(Some(s.current(&shared.store)?.0)),
        None => shared.store.statement(),
    }
}

/// Re-signs after every catalog change and before expiry, and sends the result to followers.
pub async fn statement_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let Some(signer) = &shared.signer else { return };
    let mut changes = shared.hub.follow_catalog();
    let refresh = (signer.ttl / 4).max(Duration::from_millis(500));
    loop {
        match signer.current(&shared.store) {
            Ok((st, true)) => {
                if let Err(e) = shared.store.put_statement(&st).await {
                    tracing::warn!(error = %e, "cannot store the catalog statement");
                }
                let seq = shared.store.catalog_seq().unwrap_or_default();
                shared.hub.publish(Change::Statement { statement: st, seq });
            }
            Ok((_, false)) => {}
            Err(e) => tracing::warn!(error = %e, "cannot sign the catalog statement"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(refresh) => {}
            ev = changes.recv() => match ev {
                Ok(Change::Statement { .. }) => {}
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
