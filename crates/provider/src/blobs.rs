//! Content-addressed blob directory: `<root>/sha256/<hex>`. A blob appears under its name only
//! once complete, synced and verified, so a name is a promise about its content. Once there, a
//! file is never written again: it leaves by rename (quarantine) or removal, both of which the
//! mappings it is sent from outlive (`chunks`).
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use updraft_core::hash;

use crate::error::{ProviderError, Result};

#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the directory. Called only by the holder of the store, so it also
    /// removes what crashed imports and uploads left in `incoming/` (their temporary files);
    /// partial upstream fetches (`*.part`) stay, to be resumed.
    pub fn open(root: &Path) -> Result<Self> {
        let incoming = root.join("incoming");
        for d in [&root.join("sha256"), &incoming] {
            std::fs::create_dir_all(d).map_err(|e| ProviderError::Io(format!("{}: {e}", d.display())))?;
        }
        let entries =
            std::fs::read_dir(&incoming).map_err(|e| ProviderError::Io(format!("{}: {e}", incoming.display())))?;
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp") && e.file_type().is_ok_and(|t| t.is_file()) {
                tracing::info!(file = %e.path().display(), "removed a temporary file a crashed import left");
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn path_of(&self, content_hash: &str) -> Result<PathBuf> {
        hash::validate(content_hash)?;
        Ok(self.root.join("sha256").join(&content_hash[hash::PREFIX.len()..]))
    }

    pub fn has(&self, content_hash: &str) -> bool {
        self.path_of(content_hash).is_ok_and(|p| p.is_file())
    }

    /// A temporary file in the same filesystem, for content on its way in.
    pub fn incoming(&self) -> Result<tempfile::NamedTempFile> {
        tempfile::NamedTempFile::new_in(self.root.join("incoming")).map_err(|e| ProviderError::Io(e.to_string()))
    }

    /// Where a partial upstream fetch of `content_hash` is kept, so a cut transfer resumes.
    pub fn partial_path(&self, content_hash: &str) -> Result<PathBuf> {
        hash::validate(content_hash)?;
        Ok(self.root.join("incoming").join(format!("{}.part", &content_hash[hash::PREFIX.len()..])))
    }

    /// Publishes a complete file (in the incoming directory) under its content hash, after
    /// reading it back to check it really has that hash; a file with the wrong content is
    /// deleted. For content that arrived in pieces (a resumed upstream fetch).
    pub async fn commit_checked(&self, src: &Path, content_hash: &str) -> Result<PathBuf> {
        let expected = content_hash.to_string();
        let file = src.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let actual = hash::hash_file(&file).map_err(|e| ProviderError::Io(e.to_string()))?;
            if actual != expected {
                let _ = std::fs::remove_file(&file);
                return Err(ProviderError::InvalidArgument(format!(
                    "content hash mismatch: expected {expected}, got {actual}"
                )));
            }
            std::fs::File::open(&file).and_then(|f| f.sync_all()).map_err(|e| ProviderError::Io(e.to_string()))
        })
        .await
        .map_err(|e| ProviderError::Io(e.to_string()))??;
        self.commit_hashed(src, content_hash).await
    }

    /// Publishes a complete, synced file whose hash the caller computed over exactly the bytes
    /// it wrote (an upload), so reading it back would only repeat that work. Idempotent: an
    /// existing blob with that name is kept.
    pub async fn commit_hashed(&self, src: &Path, content_hash: &str) -> Result<PathBuf> {
        let dest = self.path_of(content_hash)?;
        let (src, dest2) = (src.to_path_buf(), dest.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            if !dest2.exists() {
                std::fs::rename(&src, &dest2).map_err(|e| ProviderError::Io(e.to_string()))?;
                updraft_core::package::sync_dir(dest2.parent().expect("blob path has a parent"))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ProviderError::Io(e.to_string()))??;
        Ok(dest)
    }

    /// Copies `content_hash` from another blob store, checking its content on the way.
    /// Returns false when this store already had it.
    pub async fn copy_from(&self, other: &BlobStore, content_hash: &str) -> Result<bool> {
        if self.has(content_hash) {
            return Ok(false);
        }
        let src = other.path_of(content_hash)?;
        let tmp = self.incoming()?;
        let tmp_path = tmp.path().to_path_buf();
        tokio::fs::copy(&src, &tmp_path).await.map_err(|e| ProviderError::Io(format!("{}: {e}", src.display())))?;
        self.commit_checked(&tmp_path, content_hash).await?;
        Ok(true)
    }

    /// Every content hash stored here.
    pub fn list(&self) -> Result<Vec<String>> {
        let dir = self.root.join("sha256");
        let entries = std::fs::read_dir(&dir).map_err(|e| ProviderError::Io(format!("{}: {e}", dir.display())))?;
        Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(|n| format!("{}{n}", hash::PREFIX)))
            .filter(|h| hash::validate(h).is_ok())
            .collect())
    }

    /// Reads a stored blob back and checks it still has its content hash. A blob that does not
    /// (the disk or someone changed it) is moved to `quarantine/` — out of service, kept for
    /// inspection — and `Ok(false)` returned; a missing blob is `Ok(true)` (nothing to serve).
    pub async fn scrub(&self, content_hash: &str) -> Result<bool> {
        let path = self.path_of(content_hash)?;
        let quarantine = self.root.join("quarantine");
        let expected = content_hash.to_string();
        tokio::task::spawn_blocking(move || -> Result<bool> {
            let actual = match hash::hash_file(&path) {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
                Err(e) => return Err(ProviderError::Io(format!("{}: {e}", path.display()))),
            };
            if actual == expected {
                return Ok(true);
            }
            std::fs::create_dir_all(&quarantine)
                .map_err(|e| ProviderError::Io(format!("{}: {e}", quarantine.display())))?;
            let to = quarantine.join(path.file_name().expect("a blob has a file name"));
            std::fs::rename(&path, &to).map_err(|e| ProviderError::Io(format!("{}: {e}", path.display())))?;
            updraft_core::package::sync_dir(path.parent().expect("blob path has a parent"))?;
            Ok(false)
        })
        .await
        .map_err(|e| ProviderError::Io(e.to_string()))?
    }

    /// Size of a stored blob.
    pub async fn size(&self, content_hash: &str) -> Result<u64> {
        let p = self.path_of(content_hash)?;
        tokio::fs::metadata(&p).await.map(|m| m.len()).map_err(|_| ProviderError::BlobMissing(content_hash.to_string()))
    }
}

/// Appends bytes to an open temp file (used by uploads and upstream fetches).
pub async fn append(file: &mut tokio::fs::File, data: &[u8]) -> Result<()> {
    file.write_all(data).await.map_err(|e| ProviderError::Io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_removes_what_crashed_imports_left_and_keeps_partial_fetches() {
        let d = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(d.path()).unwrap();
        let left = blobs.incoming().unwrap().keep().unwrap().1;
        let part = blobs.partial_path(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        std::fs::write(&part, b"half").unwrap();
        BlobStore::open(d.path()).unwrap();
        assert!(!left.exists(), "the crashed import's temp file is gone");
        assert!(part.exists(), "a partial fetch stays to be resumed");
    }
}
