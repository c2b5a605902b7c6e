//! The audit log's hash chain: each entry's hash covers its own fields and the previous
//! entry's hash, so changing, removing or reordering any entry breaks every hash after it.
//! Providers compute it when appending; `admin-cli audit verify` recomputes it independently.
use sha2::{Digest, Sha256};

/// The fields of one audit entry that the chain covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields<'a> {
    pub seq: u64,
    pub at_unix_ms: i64,
    pub who: &'a str,
    pub role: &'a str,
    pub action: &'a str,
    pub outcome: &'a str,
    pub prev_hash: &'a str,
}

/// `sha256:<hex>` over the length-prefixed fields, so no two different entries can be
/// serialised alike.
pub fn chain_hash(f: &Fields<'_>) -> String {
    let mut h = Sha256::new();
    h.update(b"updraft-audit-v1\0");
    h.update(f.seq.to_be_bytes());
    h.update(f.at_unix_ms.to_be_bytes());
    for s in [f.who, f.role, f.action, f.outcome, f.prev_hash] {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Checks a whole chain given as (fields, stored hash) in order; returns the sequence number
/// of the first entry that does not verify, with why.
pub fn verify<'a>(entries: impl IntoIterator<Item = (Fields<'a>, &'a str)>) -> Result<usize, (u64, String)> {
    let mut v = Verifier::default();
    for (f, stored) in entries {
        v.push(&f, stored)?;
    }
    Ok(v.count())
}

/// Checks a chain entry by entry, so a log of any length is verified a page at a time.
#[derive(Debug, Default)]
pub struct Verifier {
    prev: String,
    n: u64,
}

impl Verifier {
    /// Checks the next entry: in sequence, linked to the previous one, with its own hash.
    pub fn push(&mut self, f: &Fields<'_>, stored: &str) -> Result<(), (u64, String)> {
        let expected_seq = self.n + 1;
        if f.seq != expected_seq {
            return Err((f.seq, format!("entry {expected_seq} is missing (found {} next)", f.seq)));
        }
        if f.prev_hash != self.prev {
            return Err((f.seq, "its link to the previous entry is broken".into()));
        }
        let actual = chain_hash(f);
        if actual != stored {
            return Err((f.seq, "its content does not match its hash (edited)".into()));
        }
        self.prev = actual;
        self.n += 1;
        Ok(())
    }

    /// Entries checked so far.
    pub fn count(&self) -> usize {
        self.n as usize
    }

    /// The hash of the last entry checked (the chain's head).
    pub fn head(&self) -> &str {
        &self.prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edited_entry_breaks_the_chain() {
        let mut prev = String::new();
        let mut chain = Vec::new();
        for seq in 1..=3u64 {
            let f =
                Fields { seq, at_unix_ms: 10, who: "ops", role: "admin", action: "a", outcome: "ok", prev_hash: "" };
            let owned = (seq, prev.clone());
            let f = Fields { prev_hash: &owned.1, ..f };
            let h = chain_hash(&f);
            chain.push((seq, owned.1.clone(), h.clone()));
            prev = h;
        }
        let fields = |c: &(u64, String, String), who: &'static str| Fields {
            seq: c.0,
            at_unix_ms: 10,
            who,
            role: "admin",
            action: "a",
            outcome: "ok",
            prev_hash: Box::leak(c.1.clone().into_boxed_str()),
        };
        let good: Vec<_> = chain.iter().map(|c| (fields(c, "ops"), c.2.as_str())).collect();
        assert_eq!(verify(good), Ok(3));
        let edited: Vec<_> =
            chain.iter().map(|c| (fields(c, if c.0 == 2 { "mallory" } else { "ops" }), c.2.as_str())).collect();
        assert_eq!(verify(edited).unwrap_err().0, 2);
        let dropped: Vec<_> = chain.iter().filter(|c| c.0 != 2).map(|c| (fields(c, "ops"), c.2.as_str())).collect();
        assert_eq!(verify(dropped).unwrap_err().0, 3);
    }
}
