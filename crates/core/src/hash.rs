//! Content hashes as Updraft writes them: `sha256:<64 hex digits>`.
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};

pub const PREFIX: &str = "sha256:";

/// How a download whose bytes do not have the listed hash is reported (the agent says it; the
/// provider that served it recognises it and re-checks its copy).
pub fn mismatch(actual: &str, listed: &str) -> String {
    format!("{MISMATCH} {actual}, the catalog says {listed}")
}

/// The words every [`mismatch`] report starts with.
pub const MISMATCH: &str = "content hash is";

/// An incremental hasher producing the canonical `sha256:<hex>` form.
#[derive(Default, Clone)]
pub struct ContentHasher(Sha256);

impl ContentHasher {
    pub fn new() -> Self {
        Self(Sha256::new())
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> String {
        format!("{PREFIX}{}", hex::encode(self.0.finalize()))
    }
    /// Bare hex digest, as the package manifest stores per-file hashes.
    pub fn finish_hex(self) -> String {
        hex::encode(self.0.finalize())
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Hashes a whole file in the canonical form.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<String> {
    Ok(hasher_over(path, u64::MAX)?.finish())
}

/// A hasher fed with the first `len` bytes of a file (all of it, if shorter): where a resumed
/// download picks up hashing.
pub fn hasher_over(path: &std::path::Path, len: u64) -> std::io::Result<ContentHasher> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?.take(len);
    let mut h = ContentHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h);
        }
        h.update(&buf[..n]);
    }
}

/// Checks that `s` is a well-formed content hash, so it can safely name a file on disk.
pub fn validate(s: &str) -> Result<()> {
    let ok = s
        .strip_prefix(PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(CoreError::Invalid {
            what: "content hash",
            input: s.chars().take(80).collect(),
            reason: "expected sha256: followed by 64 lowercase hex digits".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trip_and_validation() {
        let mut h = ContentHasher::new();
        h.update(b"abc");
        let s = h.finish();
        assert_eq!(s, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        validate(&s).unwrap();
        assert!(validate("sha256:../../etc/passwd").is_err());
        assert!(validate("md5:abc").is_err());
        assert!(validate(&s.to_uppercase()).is_err());
    }
}
