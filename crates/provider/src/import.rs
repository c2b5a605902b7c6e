//! Bringing a package into the catalog, from an upload or a watched folder. The whole file is
//! staged, hashed, parsed and verified before the blob store or the catalog changes, so a bad
//! package changes nothing.
use std::path::Path;

use tokio::io::AsyncReadExt;
use updraft_core::hash::ContentHasher;
use updraft_core::package::Package;
use updraft_proto::v1::{Activity, ActivityKind, Update};

use crate::blobs::append;
use crate::catalog::record_from_manifest;
use crate::error::{ProviderError, Result};
use crate::{Shared, now_ms};

/// A complete file in the blob store's incoming directory, with its hash and size.
pub struct Staged {
    pub tmp: tempfile::NamedTempFile,
    pub content_hash: String,
    pub size: u64,
}

/// Receives content piece by piece into the incoming directory, hashing as it goes; memory
/// use does not depend on the package's size.
pub struct Receiver {
    tmp: tempfile::NamedTempFile,
    file: tokio::fs::File,
    hasher: ContentHasher,
    size: u64,
    limit: u64,
}

impl Receiver {
    pub fn new(shared: &Shared) -> Result<Self> {
        let tmp = shared.blobs.incoming()?;
        let file = tokio::fs::File::from_std(tmp.reopen().map_err(|e| ProviderError::Io(e.to_string()))?);
        Ok(Self { tmp, file, hasher: ContentHasher::new(), size: 0, limit: shared.config.max_upload_bytes })
    }

    pub async fn push(&mut self, data: &[u8]) -> Result<()> {
        self.size += data.len() as u64;
        if self.size > self.limit {
            return Err(ProviderError::LimitReached(format!(
                "package exceeds the upload limit of {} bytes",
                self.limit
            )));
        }
        self.hasher.update(data);
        append(&mut self.file, data).await
    }

    pub fn received(&self) -> u64 {
        self.size
    }

    pub async fn finish(self) -> Result<Staged> {
        self.file.sync_all().await.map_err(|e| ProviderError::Io(e.to_string()))?;
        Ok(Staged { tmp: self.tmp, content_hash: self.hasher.finish(), size: self.size })
    }
}

/// Stages a file from disk (a watched folder).
pub async fn stage_file(shared: &Shared, src: &Path) -> Result<Staged> {
    let mut f = tokio::fs::File::open(src).await.map_err(|e| ProviderError::Io(format!("{}: {e}", src.display())))?;
    let mut r = Receiver::new(shared)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).await.map_err(|e| ProviderError::Io(format!("{}: {e}", src.display())))?;
        if n == 0 {
            return r.finish().await;
        }
        r.push(&buf[..n]).await?;
    }
}

/// Checks a staged package and records it in `pre-approval`. `name` says where it came from
/// (in errors); `who` is recorded in the activity log.
pub async fn commit(shared: &Shared, staged: Staged, name: &str, who: &str) -> Result<Update> {
    let path = staged.tmp.path().to_path_buf();
    let label = name.to_string();
    let trusted = shared.config.trusted_keys.clone();
    let allow_unverified = shared.config.allow_unverified;
    let (manifest, verified) = tokio::task::spawn_blocking(move || -> Result<_> {
        let pkg = Package::open(&path).map_err(|e| ProviderError::InvalidArgument(format!("{label}: {e}")))?;
        let verified = if trusted.iter().any(|k| pkg.verify(k).is_ok()) {
            true
        } else if !trusted.is_empty() {
            return Err(ProviderError::InvalidArgument(format!(
                "{label}: signed by key {}, which this provider does not trust",
                pkg.manifest.key_id
            )));
        } else if allow_unverified {
            false
        } else {
            return Err(ProviderError::InvalidArgument(format!(
                "{label}: this provider requires signed packages but trusts no release key; \
                 start it with --trust-key FILE (or --allow-unverified)"
            )));
        };
        Ok((pkg.header.manifest, verified))
    })
    .await
    .map_err(|e| ProviderError::Io(e.to_string()))??;

    let version = manifest.version.to_string();
    // One import decides at a time: the duplicate check and the record it guards are one step,
    // so the same package arriving several times at once makes one record.
    let _one_at_a_time = shared.imports.lock().await;
    if let Some(dup) =
        shared.store.list_updates()?.into_iter().find(|u| u.product == manifest.product && u.version == version)
    {
        return Err(ProviderError::Duplicate { product: dup.product, version, id: dup.id });
    }
    let rec = record_from_manifest(&manifest, &staged.content_hash, staged.size, verified, now_ms() / 1000);
    shared.blobs.commit_hashed(staged.tmp.path(), &staged.content_hash).await?;
    let stored = shared.store.change_update(&rec.id.clone(), Some(rec), |_| Ok(())).await?;
    record_catalog_activity(shared, who, Some(&stored), format!("imported {name} ({} bytes)", staged.size)).await?;
    tracing::info!(id = %stored.id, size = staged.size, verified, %who, "imported update");
    Ok(stored)
}

/// Logs a catalog change: who did what to which update, and when.
pub async fn record_catalog_activity(shared: &Shared, who: &str, u: Option<&Update>, what: String) -> Result<()> {
    let a = Activity {
        at_unix_ms: now_ms(),
        machine: String::new(),
        kind: ActivityKind::Catalog as i32,
        update_id: u.map(|u| u.id.clone()).unwrap_or_default(),
        product: u.map(|u| u.product.clone()).unwrap_or_default(),
        version: u.map(|u| u.version.clone()).unwrap_or_default(),
        detail: format!("{who}: {what}"),
    };
    shared.store.append_activity(&[a]).await
}
