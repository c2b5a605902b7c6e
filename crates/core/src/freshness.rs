//! Signed catalog statements (the freshness half of The Update Framework's threat model): what
//! the centre says the catalog is, with a version that only grows and an expiry, signed with
//! its catalog key. An agent that pins that key refuses an older version than it has seen
//! (rollback), an expired statement (freeze), and any offer the statement does not list with
//! that exact hash and size (mix-and-match, endless data).
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::keys::{PublicKey, ReleaseKey};

/// The most entries a statement may list, and the largest body accepted.
pub const MAX_ENTRIES: usize = 100_000;
pub const MAX_BODY: usize = 32 << 20;

/// One update as the centre decided it: its content (id, hash, size) and every field that
/// decides what a machine does with it (the engine's view of the record, priority, prestage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    pub content_hash: String,
    pub size: u64,
    #[serde(default)]
    pub product: String,
    #[serde(default)]
    pub product_line: String,
    #[serde(default)]
    pub version: String,
    /// `updraft.v1.InstallType` number.
    #[serde(default)]
    pub install_type: i32,
    #[serde(default)]
    pub product_code: String,
    #[serde(default)]
    pub upgrade_code: String,
    /// For an ES: the patch it sits on (empty: the patch with its `MM.mm.PP`).
    #[serde(default)]
    pub requires: String,
    /// `updraft.v1.UpdateState` number (0: a statement that decides nothing).
    #[serde(default)]
    pub state: i32,
    #[serde(default)]
    pub high_priority: bool,
    #[serde(default)]
    pub related_installs: Vec<String>,
    #[serde(default)]
    pub prestage: bool,
    /// The package's install properties (`apply-at`, …): they decide when it is installed.
    #[serde(default)]
    pub install_properties: BTreeMap<String, String>,
}

/// A product line's cap and role ceiling, as the centre keeps them current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CapEntry {
    pub product_line: String,
    /// Highest version offered (empty: no plain cap).
    #[serde(default)]
    pub version: String,
    /// The role whose machines this line follows (empty: none).
    #[serde(default)]
    pub follow_role: String,
    /// The lowest version of the line on a machine of that role (empty: none runs it).
    #[serde(default)]
    pub ceiling: String,
}

/// A group as the centre decided it: its settings (providers as URLs) and what is deployed to
/// it. The default group is always listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    pub name: String,
    /// `updraft.v1.DownloadMode` number.
    pub mode: i32,
    pub install_day: i32,
    pub install_hour: i32,
    /// Outside the install window, automatic machines download ahead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub download_early: bool,
    #[serde(default)]
    pub providers: Vec<String>,
    #[serde(default)]
    pub deployed: BTreeSet<String>,
}

/// The bounds within which any provider may set an agent's check interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntervalBounds {
    pub min_secs: u32,
    pub max_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// The catalog's sequence number when signed: it only grows.
    pub version: u64,
    pub issued_unix_ms: i64,
    pub expires_unix_ms: i64,
    /// Every update in the catalog, by id.
    pub entries: Vec<Entry>,
    /// Every product line cap and role ceiling.
    #[serde(default)]
    pub caps: Vec<CapEntry>,
    /// Every group, the default one included.
    #[serde(default)]
    pub groups: Vec<GroupEntry>,
    #[serde(default)]
    pub check_interval: Option<IntervalBounds>,
    /// The root over every machine's own record (group, role, pins, deployments): a check
    /// answer proves its machine's record, or its absence, against it.
    #[serde(default)]
    pub machines: crate::decisions::MachinesRoot,
    /// Whether this statement carries the centre's decisions (groups, caps, machines, each
    /// update's state): agents that pin the catalog key act only on one that does.
    #[serde(default)]
    pub decides: bool,
    /// Rollouts in waves that still hold their update from some machines: an agent applies
    /// them as its provider does, so a wave not yet open is not taken for a withheld offer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<crate::rollout::Admitting>,
}

impl Statement {
    /// The signed body and its signature.
    pub fn sign(&self, key: &ReleaseKey) -> (Vec<u8>, [u8; 64]) {
        let body = serde_json::to_vec(self).expect("statement serialises");
        let sig = key.sign_statement(&body);
        (body, sig)
    }

    /// Whether the statement lists update `id` with exactly this content.
    pub fn lists(&self, id: &str, content_hash: &str, size: u64) -> bool {
        self.entry(id).is_some_and(|e| e.content_hash == content_hash && e.size == size)
    }

    pub fn entry(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }
}

/// The SHA-256 of a statement body: how an agent says which statement it already holds.
pub fn digest(body: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(body).to_vec()
}

/// The version a statement claims, unverified: for a site that only passes statements on and
/// orders what it forwards by them (agents verify).
pub fn claimed_version(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Statement>(body).ok().map(|s| s.version)
}

/// When a statement says it expires (ms since the epoch), unverified: for the metrics of a
/// server that holds it.
pub fn claimed_expiry(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<Statement>(body).ok().map(|s| s.expires_unix_ms)
}

/// Checks a statement: signed by one of `keys`, not older than `seen_version`, not expired at
/// `now_ms`. Returns it parsed.
pub fn verify(keys: &[PublicKey], body: &[u8], signature: &[u8], seen_version: u64, now_ms: i64) -> Result<Statement> {
    if body.len() > MAX_BODY {
        return Err(CoreError::Freshness(format!("{} bytes, more than the {MAX_BODY} allowed", body.len())));
    }
    let mut last = None;
    if !keys.iter().any(|k| match k.verify_statement(body, signature) {
        Ok(()) => true,
        Err(e) => {
            last = Some(e);
            false
        }
    }) {
        return Err(last.unwrap_or_else(|| CoreError::Freshness("no catalog key pinned".into())));
    }
    let st: Statement =
        serde_json::from_slice(body).map_err(|e| CoreError::Freshness(format!("unreadable statement: {e}")))?;
    if st.entries.len() > MAX_ENTRIES {
        return Err(CoreError::Freshness(format!("{} entries, more than {MAX_ENTRIES}", st.entries.len())));
    }
    if st.version < seen_version {
        return Err(CoreError::Freshness(format!(
            "rollback: catalog version {} is older than version {seen_version} already seen",
            st.version
        )));
    }
    if now_ms >= st.expires_unix_ms {
        return Err(CoreError::Freshness(format!(
            "expired: the statement for catalog version {} expired {} s ago (a frozen or replayed answer)",
            st.version,
            (now_ms - st.expires_unix_ms) / 1000
        )));
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(version: u64, expires: i64) -> Statement {
        Statement {
            version,
            issued_unix_ms: 0,
            expires_unix_ms: expires,
            entries: vec![Entry { id: "a-1".into(), content_hash: "sha256:00".into(), size: 10, ..Default::default() }],
            caps: vec![],
            groups: vec![],
            check_interval: None,
            machines: Default::default(),
            decides: false,
            rollouts: vec![],
        }
    }

    #[test]
    fn rollback_freeze_and_foreign_keys_are_refused() {
        let key = ReleaseKey::generate().unwrap();
        let other = ReleaseKey::generate().unwrap();
        let (body, sig) = statement(5, 1000).sign(&key);
        let st = verify(&[key.public()], &body, &sig, 5, 999).unwrap();
        assert!(st.lists("a-1", "sha256:00", 10));
        assert!(!st.lists("a-1", "sha256:00", 11), "a size that lies is not listed");
        let e = verify(&[key.public()], &body, &sig, 6, 999).unwrap_err().to_string();
        assert!(e.contains("rollback"), "{e}");
        let e = verify(&[key.public()], &body, &sig, 5, 1000).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
        let e = verify(&[other.public()], &body, &sig, 0, 0).unwrap_err().to_string();
        assert!(e.contains("not signed by the pinned catalog key"), "{e}");
        let mut tampered = body.clone();
        let n = tampered.len() - 3;
        tampered[n] ^= 1;
        assert!(verify(&[key.public()], &tampered, &sig, 0, 0).is_err());
        // A manifest signature is no statement signature.
        let manifest_sig = key.sign_manifest(&body);
        assert!(verify(&[key.public()], &body, &manifest_sig, 0, 0).is_err());
    }
}
