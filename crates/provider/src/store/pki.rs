//! The store's part in certificates: what the centre issued, join tokens, enrollment requests
//! waiting for approval (the centre's alone), and the trust record every tier enforces (a
//! logged change, replicated to sites). Every write is durable before it returns.
use updraft_proto::v1::{IssuedCertificate, JoinToken, PendingEnrollment, Trust};

use super::{Policy, Store, TRUST};
use crate::error::{ProviderError, Result};
use crate::table::decode;

/// Join tokens kept at once; enrollment requests waiting at once.
pub const MAX_TOKENS: usize = 10_000;
pub const MAX_PENDING: usize = 1_000;

impl Store {
    /// Keeps a new join token (its secret only as a hash).
    pub async fn put_token(&self, t: &JoinToken) -> Result<()> {
        if self.join_tokens.len()? >= MAX_TOKENS {
            return Err(ProviderError::LimitReached(format!(
                "{MAX_TOKENS} join tokens are kept already; let some expire or be used first"
            )));
        }
        self.join_tokens.put(t.id.as_bytes(), t)?;
        self.flush().await
    }

    /// Every join token, expired ones dropped first.
    pub async fn tokens(&self, now_ms: i64) -> Result<Vec<JoinToken>> {
        let all = self.join_tokens.all()?;
        let (live, dead): (Vec<_>, Vec<_>) = all.into_iter().partition(|t| t.expires_unix_ms > now_ms);
        if !dead.is_empty() {
            for t in &dead {
                self.join_tokens.remove(t.id.as_bytes())?;
            }
            self.flush().await?;
        }
        Ok(live)
    }

    /// Takes one use of the token with id `id` whose secret hashes to `secret_sha256`, in one
    /// transaction (two hosts racing for the last use: one gets it). Returns the token as it
    /// was; a token used up is removed.
    pub async fn take_token(&self, id: &str, secret_sha256: &[u8], now_ms: i64) -> Result<JoinToken> {
        let refused = || ProviderError::Denied("the join token is unknown, used up or expired".into());
        let token = self.transaction(|tx| {
            let Some(t) = tx.get(&self.join_tokens, id)?.map(|v| decode::<JoinToken>(&v)).transpose()? else {
                return Err(refused());
            };
            if t.secret_sha256 != secret_sha256 || t.expires_unix_ms <= now_ms || t.uses_left == 0 {
                return Err(refused());
            }
            if t.uses_left == 1 {
                tx.remove(&self.join_tokens, id)?;
            } else {
                let left = JoinToken { uses_left: t.uses_left - 1, ..t.clone() };
                tx.insert(&self.join_tokens, id, prost::Message::encode_to_vec(&left))?;
            }
            Ok(t)
        })?;
        self.flush().await?;
        Ok(token)
    }

    pub async fn put_certificate(&self, c: &IssuedCertificate) -> Result<()> {
        self.certificates.put(c.serial.as_bytes(), c)?;
        self.flush().await
    }

    pub fn certificate(&self, serial: &str) -> Result<Option<IssuedCertificate>> {
        self.certificates.get(serial.as_bytes())
    }

    /// Every certificate on record, as it is (no pruning: for readers).
    pub fn all_certificates(&self) -> Result<Vec<IssuedCertificate>> {
        self.certificates.all()
    }

    /// Every certificate issued; those expired before `keep_after_ms` are dropped first (a
    /// revocation list only needs what has not expired).
    pub async fn certificates(&self, keep_after_ms: i64) -> Result<Vec<IssuedCertificate>> {
        let all = self.certificates.all()?;
        let (kept, dropped): (Vec<_>, Vec<_>) = all.into_iter().partition(|c| c.not_after_unix_ms > keep_after_ms);
        if !dropped.is_empty() {
            for c in &dropped {
                self.certificates.remove(c.serial.as_bytes())?;
            }
            self.flush().await?;
        }
        Ok(kept)
    }

    /// Keeps (or replaces) the enrollment request waiting under its name.
    pub async fn put_enrollment(&self, p: &PendingEnrollment) -> Result<()> {
        if self.enrollments.get(p.name.as_bytes())?.is_none() && self.enrollments.len()? >= MAX_PENDING {
            return Err(ProviderError::LimitReached(format!(
                "{MAX_PENDING} enrollment requests wait already; approve or clear some first"
            )));
        }
        self.enrollments.put(p.name.as_bytes(), p)?;
        self.flush().await
    }

    pub fn enrollment(&self, name: &str) -> Result<Option<PendingEnrollment>> {
        self.enrollments.get(name.as_bytes())
    }

    pub fn enrollments(&self) -> Result<Vec<PendingEnrollment>> {
        self.enrollments.all()
    }

    pub async fn remove_enrollment(&self, name: &str) -> Result<()> {
        self.enrollments.remove(name.as_bytes())?;
        self.flush().await
    }

    /// Replaces the trust record: a logged change, so sites receive it.
    pub async fn set_trust(&self, t: &Trust) -> Result<u64> {
        self.put_policy(Policy::Trust, TRUST, Some(prost::Message::encode_to_vec(t)), None).await
    }

    /// The trust record, once the centre has made one.
    pub fn trust(&self) -> Result<Option<Trust>> {
        self.trust.get(TRUST.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_gives_its_uses_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = JoinToken {
            id: "abc".into(),
            secret_sha256: vec![1; 32],
            uses_left: 2,
            expires_unix_ms: 10_000,
            role: "agent".into(),
            ..Default::default()
        };
        store.put_token(&t).await.unwrap();
        assert!(store.take_token("abc", &[2; 32], 0).await.is_err(), "another secret");
        assert!(store.take_token("abc", &[1; 32], 10_000).await.is_err(), "expired");
        assert_eq!(store.take_token("abc", &[1; 32], 0).await.unwrap().uses_left, 2);
        assert_eq!(store.take_token("abc", &[1; 32], 0).await.unwrap().uses_left, 1);
        assert!(store.take_token("abc", &[1; 32], 0).await.is_err(), "used up");
        assert!(store.tokens(0).await.unwrap().is_empty());
    }
}
