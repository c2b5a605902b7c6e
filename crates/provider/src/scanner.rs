//! The content scanner: watched folders whose packages are imported into the catalog, in the
//! background (auto folders, after a start delay and then at an interval) or on request.
//! Imported files are removed; refused ones go to `rejected/` with a `.reason` file beside
//! them; a file modified within the quiet period is taken to be still being written.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use updraft_proto::v1::{ImportResult, PendingFile, WatchFolder};

use crate::Shared;
use crate::error::{ProviderError, Result};
use crate::import;

pub const REJECTED: &str = "rejected";

#[derive(Clone, Copy, Debug)]
pub struct ScanConfig {
    pub start_delay: Duration,
    pub interval: Duration,
    /// A file modified less than this long ago is still being written.
    pub quiet: Duration,
}

impl Default for ScanConfig {
    fn default() -> Self {
        Self { start_delay: Duration::from_secs(90), interval: Duration::from_secs(60), quiet: Duration::from_secs(5) }
    }
}

/// Checks and normalises a folder to watch: absolute, existing, a directory.
pub fn normalise_folder(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(ProviderError::InvalidArgument(format!("watch folder {path:?} must be an absolute path")));
    }
    let canon = p.canonicalize().map_err(|e| ProviderError::InvalidArgument(format!("watch folder {path:?}: {e}")))?;
    if !canon.is_dir() {
        return Err(ProviderError::InvalidArgument(format!("watch folder {path:?} is not a directory")));
    }
    Ok(canon)
}

/// A watched folder may not be the provider's data directory (the store and the blobs), lie
/// inside it, or contain it: an automatic import would move the provider's own files away.
pub fn check_not_data(folder: &Path, data_dir: &Path) -> Result<()> {
    let data = data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf());
    if folder.starts_with(&data) || data.starts_with(folder) {
        return Err(ProviderError::InvalidArgument(format!(
            "watch folder {} overlaps the provider's data directory {} (store and content)",
            folder.display(),
            data.display()
        )));
    }
    Ok(())
}

/// A watched folder must be writable by the provider: it removes what it imported and moves
/// what it rejected. Checked by creating (and dropping) a hidden file there, so a read-only
/// mount — a systemd unit's `ProtectSystem=strict` without `ReadWritePaths=` — is refused when
/// the folder is added, instead of every import leaving its file behind.
pub fn check_writable(folder: &Path) -> Result<()> {
    match tempfile::Builder::new().prefix(".updraft-write-check").tempfile_in(folder) {
        Ok(_) => Ok(()),
        Err(e) => Err(ProviderError::InvalidArgument(format!(
            "the provider cannot write to watch folder {} ({e}): it removes imported files and moves rejected \
             ones aside; give it write access (under systemd: ReadWritePaths={} in a drop-in, see deploy/README.md)",
            folder.display(),
            folder.display()
        ))),
    }
}

fn is_candidate(name: &str) -> bool {
    !name.starts_with('.') && !name.ends_with(".part") && !name.ends_with(".tmp") && !name.ends_with(".reason")
}

/// Files waiting in one folder (regular files only; hidden and partial names skipped).
pub fn pending_in(folder: &WatchFolder) -> Result<Vec<PendingFile>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(&folder.path).map_err(|e| ProviderError::Io(format!("{}: {e}", folder.path)))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else { continue };
        if !meta.is_file() || !is_candidate(&name) {
            continue;
        }
        let modified = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
        out.push(PendingFile {
            path: e.path().to_string_lossy().into_owned(),
            folder: folder.path.clone(),
            size: meta.len(),
            modified_unix: modified.unwrap_or(0),
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Resolves a file named by an administrator to a pending file of a watched folder; anything
/// outside the watched folders is refused.
pub fn resolve(shared: &Shared, file: &str) -> Result<(WatchFolder, PathBuf)> {
    let canon = Path::new(file).canonicalize().map_err(|e| ProviderError::InvalidArgument(format!("{file:?}: {e}")))?;
    let parent = canon.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let folder =
        shared.store.list_watches()?.into_iter().find(|w| w.path == parent).ok_or_else(|| {
            ProviderError::InvalidArgument(format!("{file:?} is not directly inside a watched folder"))
        })?;
    Ok((folder, canon))
}

/// Imports one file; removes it on success, moves it to `rejected/` when the package is bad,
/// leaves it in place when the failure is the provider's own (disk, store).
pub async fn import_one(shared: &Shared, folder: &Path, file: &Path, quiet: Duration, who: &str) -> ImportResult {
    let name = file.to_string_lossy().into_owned();
    let fail = |error: String| ImportResult { file: name.clone(), update_id: String::new(), error };
    match std::fs::metadata(file).and_then(|m| m.modified()) {
        Ok(m) => {
            let age = SystemTime::now().duration_since(m).unwrap_or_default();
            if age < quiet {
                return fail(format!(
                    "still being written (modified {:.1}s ago); try again shortly",
                    age.as_secs_f32()
                ));
            }
        }
        Err(e) => return fail(e.to_string()),
    }
    let result = match import::stage_file(shared, file).await {
        Ok(staged) => import::commit(shared, staged, &name, who).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(u) => {
            if let Err(e) = std::fs::remove_file(file) {
                tracing::warn!(file = %name, error = %e, "imported but could not remove from the watched folder");
            }
            ImportResult { file: name, update_id: u.id, error: String::new() }
        }
        Err(e @ (ProviderError::Io(_) | ProviderError::Store(_))) => fail(e.to_string()),
        Err(e) => {
            let reason = e.to_string();
            if let Err(m) = reject(folder, file, &reason) {
                return fail(format!("{reason} (and moving it to {REJECTED}/ failed: {m})"));
            }
            tracing::warn!(file = %name, %reason, "package rejected");
            fail(reason)
        }
    }
}

fn reject(folder: &Path, file: &Path, reason: &str) -> std::io::Result<()> {
    let dir = folder.join(REJECTED);
    std::fs::create_dir_all(&dir)?;
    let base = file.file_name().unwrap_or_default();
    let dest = dir.join(base);
    std::fs::rename(file, &dest)?;
    let mut reason_path = dest.into_os_string();
    reason_path.push(".reason");
    std::fs::write(reason_path, format!("{reason}\n"))
}

/// Scans auto folders after `start_delay`, then every `interval`, until shutdown.
pub async fn scan_loop(shared: Arc<Shared>, cfg: ScanConfig, shutdown: CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(cfg.start_delay) => {}
    }
    loop {
        match shared.store.list_watches() {
            Ok(folders) => {
                for w in folders.into_iter().filter(|w| w.auto) {
                    match pending_in(&w) {
                        Ok(files) => {
                            for f in files {
                                let r =
                                    import_one(&shared, Path::new(&w.path), Path::new(&f.path), cfg.quiet, "scanner")
                                        .await;
                                if r.error.is_empty() {
                                    tracing::info!(file = %r.file, id = %r.update_id, "scanner imported");
                                }
                            }
                        }
                        Err(e) => tracing::warn!(folder = %w.path, error = %e, "cannot scan watched folder"),
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list watched folders"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_folder_cannot_overlap_the_data_directory() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let other = d.path().join("incoming");
        std::fs::create_dir_all(data.join("db")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let canon = |p: &Path| p.canonicalize().unwrap();
        assert!(check_not_data(&canon(&data.join("db")), &data).is_err(), "inside the store");
        assert!(check_not_data(&canon(&data), &data).is_err(), "the data directory itself");
        assert!(check_not_data(&canon(d.path()), &data).is_err(), "a folder holding it");
        assert!(check_not_data(&canon(&other), &data).is_ok());
    }

    #[test]
    fn a_watch_folder_must_be_writable() {
        let d = tempfile::tempdir().unwrap();
        check_writable(d.path()).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "the check leaves nothing behind");
        // Read-only even for root, as a folder under ProtectSystem=strict is.
        let e = check_writable(Path::new("/proc/self")).unwrap_err().to_string();
        assert!(
            e.contains("cannot write to watch folder /proc/self") && e.contains("ReadWritePaths=/proc/self"),
            "{e}"
        );
    }
}
