//! Putting a verified package in place on disk. `ROOT/P` is the installed version; a new one
//! is unpacked into `ROOT/P_update_pending` and exchanged with `ROOT/P` in one atomic rename
//! (`renameat2(RENAME_EXCHANGE)`), after which the previous version sits in `ROOT/P_old`.
//! At no instant is `ROOT/P` missing or a mix of two versions.
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use updraft_core::error::CoreError;
use updraft_core::hash::ContentHasher;
use updraft_core::keys::PublicKey;
use updraft_core::package::{Header, Package, Unpacker, sync_dir, write_atomic};

use crate::error::{AgentError, Result};

pub fn live_dir(root: &Path, product: &str) -> PathBuf {
    root.join(product)
}
pub fn pending_dir(root: &Path, product: &str) -> PathBuf {
    root.join(format!("{product}_update_pending"))
}
pub fn old_dir(root: &Path, product: &str) -> PathBuf {
    root.join(format!("{product}_old"))
}

/// Opens a downloaded package and checks it against the pinned key and what the provider
/// offered (so a provider cannot pass off one signed package as another).
pub fn verify(pkg_path: &Path, key: &PublicKey, update_id: &str, product: &str, version: &str) -> Result<Package> {
    let fail = |reason: String| AgentError::Verify { update: update_id.to_string(), reason };
    let pkg = Package::open(pkg_path).map_err(|e| fail(e.to_string()))?;
    pkg.accept(key, product, version).map_err(fail)?;
    Ok(pkg)
}

/// Unpacks into a fresh `P_update_pending`, discarding any leftover from an earlier attempt.
pub fn stage(pkg: &Package, root: &Path, update_id: &str) -> Result<PathBuf> {
    let product = &pkg.manifest.product;
    let pending = pending_dir(root, product);
    remove_tree(&pending)?;
    let unpacked = pkg.unpack_with(&pending, stage_mid());
    if let Err(e) = unpacked {
        let _ = remove_tree(&pending);
        return Err(AgentError::Install { update: update_id.to_string(), reason: e.to_string() });
    }
    Ok(pending)
}

/// An unpacking fed by a download (see [`stage_while_downloading`]).
pub struct Streamed {
    /// Where the download hands each chunk; dropping it ends the bytes.
    pub tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// Package bytes an earlier attempt already unpacked: the download starts here.
    pub from: u64,
    /// The content hash over those bytes.
    pub hasher: ContentHasher,
    /// Set when the download failed: the unpacking stops at the next chunk, leaving the rest
    /// of what was handed over for the next attempt to fetch again.
    pub abandon: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Whole (with the accepted header) once the last file is staged, or stopped early with
    /// what came kept for the next attempt; an error if the package was wrong, and then
    /// nothing is kept.
    pub task: tokio::task::JoinHandle<Result<Ended>>,
}

/// How the bytes handed to an unpacking ended.
pub enum Ended {
    /// `P_update_pending` holds the whole package; its header was accepted.
    Whole(Box<Header>),
    /// They stopped before the end (a download cut short, a cancel): the header and the staged
    /// tree stay for the next attempt to resume.
    Stopped,
}

/// Unpacks a package into `P_update_pending` while it downloads, keeping no other copy of it:
/// the download hands every chunk to [`Streamed::tx`]. Before anything is written the header
/// is accepted as [`verify`] accepts it, then saved as `head`; every file is checked as
/// [`stage`] checks it. Invariant: while `head` exists, `P_update_pending` holds that package's
/// files in manifest order, all whole but the last, so an attempt that stopped is resumed by
/// reading them back ([`Unpacker::resume`]), which also rebuilds the content hash; a tree that
/// does not check out is discarded and the download starts from its first byte.
pub async fn stage_while_downloading(
    root: &Path,
    key: PublicKey,
    update_id: &str,
    product: &str,
    version: &str,
    head: PathBuf,
) -> Result<Streamed> {
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let pending = pending_dir(root, product);
    let (id, product, version) = (update_id.to_string(), product.to_string(), version.to_string());
    let abandon = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = abandon.clone();
    let task = tokio::task::spawn_blocking(move || {
        unpack_streamed(&pending, &head, &key, &product, &version, rx, ready_tx, &stop).map_err(|e| {
            let _ = remove_tree(&pending);
            let _ = std::fs::remove_file(&head);
            AgentError::Install { update: id, reason: e.to_string() }
        })
    });
    match ready_rx.await {
        Ok((hasher, from)) => Ok(Streamed { tx, from, hasher, abandon, task }),
        Err(_) => Err(match task.await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => {
                AgentError::Install { update: update_id.to_string(), reason: "the unpacker ended early".into() }
            }
            Err(e) => AgentError::Install { update: update_id.to_string(), reason: e.to_string() },
        }),
    }
}

/// The body of [`stage_while_downloading`]'s task: resumes or starts, says where the bytes
/// must start through `ready`, then unpacks what comes. The `download:mid` fail point is
/// passed after each chunk written short of the end (here, not in the download: so a kill
/// there leaves that chunk staged, as it leaves it in a package file).
#[allow(clippy::too_many_arguments)]
fn unpack_streamed(
    pending: &Path,
    head: &Path,
    key: &PublicKey,
    product: &str,
    version: &str,
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ready: tokio::sync::oneshot::Sender<(ContentHasher, u64)>,
    abandon: &std::sync::atomic::AtomicBool,
) -> std::result::Result<Ended, CoreError> {
    let (dir, name) = match (head.parent(), head.file_name().and_then(|n| n.to_str())) {
        (Some(d), Some(n)) => (d.to_path_buf(), n.to_string()),
        _ => return Err(CoreError::package(head, "not a file name")),
    };
    // Accepted, the header is kept (first, before any file) for a later attempt to resume.
    let accept = |h: &Header| {
        h.accept(key, product, version).map_err(|r| CoreError::package(head, r))?;
        write_atomic(&dir, &name, &h.to_bytes())
    };
    let resumed = match std::fs::read(head) {
        Ok(bytes) if pending.is_dir() => Unpacker::resume(pending, head, accept, &bytes)
            .inspect_err(|e| tracing::info!(error = %e, "not resuming the unpacking; starting afresh"))
            .ok(),
        _ => None,
    };
    let (mut unpacker, hasher, from) = match resumed {
        Some(r) => r,
        None => {
            let _ = std::fs::remove_file(head);
            remove_tree(pending).map_err(|e| CoreError::package(pending, e.to_string()))?;
            (Unpacker::new(pending, head, accept), ContentHasher::new(), 0)
        }
    };
    if ready.send((hasher, from)).is_err() {
        return Ok(Ended::Stopped);
    }
    let mut after_file = stage_mid();
    while let Some(chunk) = rx.blocking_recv() {
        if abandon.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Ended::Stopped);
        }
        unpacker.feed(&chunk, &mut after_file)?;
        if !unpacker.is_complete() {
            crate::failpoint::check("download:mid").map_err(|e| CoreError::package(head, e.to_string()))?;
        }
    }
    if !unpacker.is_complete() {
        return Ok(Ended::Stopped);
    }
    Ok(Ended::Whole(Box::new(unpacker.finish()?)))
}

/// Removes what an unpacking while downloading kept (its header and staged tree).
pub fn discard_streamed(root: &Path, product: &str, head: &Path) -> Result<()> {
    let _ = std::fs::remove_file(head);
    remove_tree(&pending_dir(root, product))
}

/// The callback after each file an unpacker writes: passes the `stage:mid` fail point after
/// the second (inside the unpacker a point can only kill or delay).
fn stage_mid() -> impl FnMut(&str) {
    let mut files = 0;
    move |_| {
        files += 1;
        if files == 2 {
            let _ = crate::failpoint::hit("stage:mid");
        }
    }
}

/// The one step that changes `ROOT/P`: an atomic exchange with the staged tree (or a rename,
/// for a first install). Returns whether there was a previous version, now in
/// `P_update_pending`.
pub fn exchange_in(root: &Path, product: &str) -> Result<bool> {
    let live = live_dir(root, product);
    let pending = pending_dir(root, product);
    let had_old = live.exists();
    if had_old {
        exchange(&pending, &live)?;
    } else {
        std::fs::rename(&pending, &live).map_err(|e| AgentError::io(&live, e))?;
    }
    sync_dir(root)?;
    Ok(had_old)
}

/// Where earlier versions beyond `P_old` wait, one directory per version.
pub fn backups_dir(root: &Path, product: &str) -> PathBuf {
    root.join(format!("{product}_backups"))
}

/// The backup of `version` (a version string, checked: it becomes a file name).
pub fn backup_dir(root: &Path, product: &str, version: &str) -> Result<PathBuf> {
    version
        .parse::<updraft_core::version::Version>()
        .map_err(|e| AgentError::Config(format!("backup version {version:?}: {e}")))?;
    Ok(backups_dir(root, product).join(version))
}

/// Moves the previous version (left in `P_update_pending` by the exchange) to `P_old`. The
/// `P_old` it replaces (of version `displaced`) waits as the backup `P_backups/VERSION` until
/// the install is healthy ([`prune_backups`] then keeps what the package asks for): a swap back
/// makes it `P_old` again. Repeatable after a crash at any point (each move is one rename), and
/// a no-op once done.
pub fn keep_old(root: &Path, product: &str, displaced: Option<&str>) -> Result<()> {
    let pending = pending_dir(root, product);
    let old = old_dir(root, product);
    if !pending.exists() {
        return Ok(()); // already kept
    }
    match displaced {
        Some(v) if old.is_dir() => {
            let (dir, to) = (backups_dir(root, product), backup_dir(root, product, v)?);
            std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
            remove_tree(&to)?;
            std::fs::rename(&old, &to).map_err(|e| AgentError::io(&to, e))?;
            sync_dir(&dir)?;
        }
        _ => remove_tree(&old)?,
    }
    std::fs::rename(&pending, &old).map_err(|e| AgentError::io(&old, e))?;
    sync_dir(root)?;
    Ok(())
}

/// Deletes the backups of versions not in `keep`.
pub fn prune_backups(root: &Path, product: &str, keep: &[&str]) -> Result<()> {
    let dir = backups_dir(root, product);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
    for e in entries.flatten() {
        if !keep.iter().any(|v| e.file_name() == *v) {
            remove_tree(&e.path())?;
        }
    }
    Ok(())
}

/// Copies a kept tree (`P_old` or a backup) into a fresh `P_update_pending`, to be swapped in
/// like a new install (the kept tree itself stays: the only copy of a version is never moved).
pub fn stage_copy(root: &Path, product: &str, from: &Path) -> Result<PathBuf> {
    let pending = pending_dir(root, product);
    remove_tree(&pending)?;
    copy_tree(from, &pending).and_then(|_| syncfs(&pending)).inspect_err(|_| {
        let _ = remove_tree(&pending);
    })?;
    Ok(pending)
}

/// Carries the machine's data and kept files (`paths`, relative) from the live tree into the
/// staged one, each replacing whatever the package put there. Copied, never linked: the
/// version swapped out keeps its own copy, as it was when it stopped, to go back to. Synced
/// before it returns. Returns how many paths were carried.
pub fn carry<'a>(live: &Path, staged: &Path, paths: impl IntoIterator<Item = &'a str>) -> Result<usize> {
    let mut carried = 0;
    for rel in paths {
        let from = live.join(rel);
        match std::fs::symlink_metadata(&from) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(AgentError::io(&from, e)),
        }
        // Never write through a link: a path carried earlier may have been one.
        let mut at = staged.to_path_buf();
        for comp in Path::new(rel).parent().into_iter().flat_map(Path::components) {
            at.push(comp);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(AgentError::Config(format!("cannot carry {rel}: {} is a symbolic link", at.display())));
            }
        }
        let to = staged.join(rel);
        remove_tree(&to)?;
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| AgentError::io(parent, e))?;
        }
        copy_tree(&from, &to)?;
        carried += 1;
    }
    if carried > 0 {
        syncfs(staged)?;
    }
    Ok(carried)
}

/// Copies a file, a symbolic link (as a link) or a directory tree with its modes. Sockets and
/// pipes are a running application's, not data: left out.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| AgentError::io(from, e))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(from).map_err(|e| AgentError::io(from, e))?;
        std::os::unix::fs::symlink(target, to).map_err(|e| AgentError::io(to, e))?;
    } else if ft.is_dir() {
        std::fs::create_dir(to).map_err(|e| AgentError::io(to, e))?;
        for e in std::fs::read_dir(from).map_err(|e| AgentError::io(from, e))? {
            let e = e.map_err(|e| AgentError::io(from, e))?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions()).map_err(|e| AgentError::io(to, e))?;
    } else if ft.is_file() {
        std::fs::copy(from, to).map_err(|e| AgentError::io(to, e))?;
    }
    Ok(())
}

/// Makes everything written under `dir` durable (one `syncfs` for the whole file system).
fn syncfs(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).map_err(|e| AgentError::io(dir, e))?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(AgentError::io(dir, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Puts `P_old` back as `P` and discards the version that was live.
pub fn roll_back(root: &Path, product: &str) -> Result<()> {
    let live = live_dir(root, product);
    let old = old_dir(root, product);
    if !old.is_dir() {
        return Err(AgentError::Install {
            update: product.to_string(),
            reason: format!("{} is missing", old.display()),
        });
    }
    exchange(&old, &live)?;
    sync_dir(root)?;
    remove_tree(&old)
}

/// Undoes a swap whose new version (the tree with inode `new_inode`) never proved itself,
/// from wherever a crash or a failure left it: the previous version (in `P_update_pending`
/// before the swap's bookkeeping, in `P_old` after) is made live again, the new tree is
/// deleted, and the backup of `displaced` (the `P_old` before the swap) is `P_old` again.
/// Repeatable: the inode tells at each point what is where.
pub fn swap_back(root: &Path, product: &str, new_inode: Option<u64>, displaced: Option<&str>) -> Result<()> {
    let (live, pending, old) = (live_dir(root, product), pending_dir(root, product), old_dir(root, product));
    let is_new = |p: &Path| new_inode.is_some() && inode(p) == new_inode;
    if is_new(&live) {
        match [&pending, &old].into_iter().find(|p| p.is_dir()) {
            Some(previous) => {
                exchange(previous, &live)?;
                sync_dir(root)?;
            }
            None => return uninstall(root, product), // a first install: nothing to go back to
        }
    }
    for p in [&pending, &old] {
        if is_new(p) {
            remove_tree(p)?;
        }
    }
    if let Some(v) = displaced
        && !old.exists()
    {
        promote_backup(root, product, v)?;
    }
    Ok(())
}

/// Makes the backup of `version`, if there is one, `P_old` again.
pub fn promote_backup(root: &Path, product: &str, version: &str) -> Result<()> {
    let (from, old) = (backup_dir(root, product, version)?, old_dir(root, product));
    if from.is_dir() && !old.exists() {
        std::fs::rename(&from, &old).map_err(|e| AgentError::io(&old, e))?;
        sync_dir(root)?;
    }
    Ok(())
}

/// Deletes `P_old` if it is the tree with inode `tree` (a removed version, not to be kept);
/// the newest backup, `next`, becomes `P_old`. Repeatable.
pub fn drop_old(root: &Path, product: &str, tree: Option<u64>, next: Option<&str>) -> Result<()> {
    let old = old_dir(root, product);
    if tree.is_some() && inode(&old) == tree {
        remove_tree(&old)?;
        sync_dir(root)?;
    }
    match next {
        Some(v) => promote_backup(root, product, v),
        None => Ok(()),
    }
}

pub fn inode(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| m.ino())
}

/// Uninstalls a product that has no earlier version to return to.
pub fn uninstall(root: &Path, product: &str) -> Result<()> {
    let live = live_dir(root, product);
    let doomed = root.join(format!("{product}_removing"));
    remove_tree(&doomed)?;
    if live.exists() {
        std::fs::rename(&live, &doomed).map_err(|e| AgentError::io(&live, e))?;
        sync_dir(root)?;
    }
    remove_tree(&doomed)?;
    remove_tree(&old_dir(root, product))?;
    remove_tree(&backups_dir(root, product))
}

/// Clears what an interrupted run may have left: staging and removal leftovers. `P` itself
/// is always whole, because it only ever changes by atomic exchange.
pub fn recover(root: &Path) -> Result<Vec<String>> {
    recover_keeping(root, &BTreeSet::new())
}

/// [`recover`], but the staging trees of the products in `streamed` stay: downloads unpacked
/// as they arrived, stopped before the end and kept to be resumed (see
/// [`stage_while_downloading`], which checks such a tree before it takes it up).
pub fn recover_keeping(root: &Path, streamed: &BTreeSet<String>) -> Result<Vec<String>> {
    let mut cleaned = finish_ordered(root)?;
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(cleaned) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let kept = name.strip_suffix("_update_pending").is_some_and(|p| streamed.contains(p));
        if !kept && (name.ends_with("_update_pending") || name.ends_with("_removing")) {
            remove_tree(&e.path())?;
            cleaned.push(name);
        }
    }
    Ok(cleaned)
}

/// The products whose downloads were being unpacked as they arrived when they stopped: those
/// with a header kept in the download cache `dir`.
pub fn streamed_products(dir: &Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeSet::new() };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "head"))
        .filter_map(|p| Some(Header::from_bytes(&std::fs::read(&p).ok()?, &p).ok()?.manifest.product))
        .collect()
}

fn remove_tree(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(|e| AgentError::io(p, e)),
        Ok(_) => std::fs::remove_file(p).map_err(|e| AgentError::io(p, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(p, e)),
    }
}

/// Whether the ordered-rename fallback is forced (test builds only: the crash-point sweep
/// runs it on kernels that do have the exchange).
fn fallback_forced() -> bool {
    cfg!(feature = "failpoints") && std::env::var("UPDRAFT_NO_EXCHANGE").is_ok_and(|v| v == "1")
}

/// Where `live` waits while ordered renames move the new tree in.
fn swapping_dir(live: &Path) -> PathBuf {
    let mut name = live.file_name().unwrap_or_default().to_os_string();
    name.push("_swapping");
    live.with_file_name(name)
}

/// The fallback where the kernel or file system has no exchange: `b` moves aside, `a` takes
/// its name, and the displaced `b` takes `a`'s. Each rename is synced; a crash between them
/// leaves `b` missing for a moment, and [`finish_ordered`] on the next start puts things
/// right from what is on disk.
fn ordered_exchange(a: &Path, b: &Path) -> Result<()> {
    let parent = b.parent().unwrap_or(Path::new("."));
    let mid = swapping_dir(b);
    std::fs::rename(b, &mid).map_err(|e| AgentError::io(b, e))?;
    sync_dir(parent)?;
    crate::failpoint::check("swap:moved-out")?;
    std::fs::rename(a, b).map_err(|e| AgentError::io(b, e))?;
    sync_dir(parent)?;
    std::fs::rename(&mid, a).map_err(|e| AgentError::io(a, e))?;
    sync_dir(parent)?;
    Ok(())
}

/// Finishes or undoes ordered renames a crash interrupted: a `P_swapping` tree goes back to
/// `P` when `P` is missing (the new tree never arrived), else on to `P_update_pending` (the
/// new tree is live; the journal decides what the displaced one becomes).
pub fn finish_ordered(root: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(done) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(product) = name.strip_suffix("_swapping") else { continue };
        let live = live_dir(root, product);
        let to = if live.exists() { pending_dir(root, product) } else { live };
        remove_tree(&to).ok();
        std::fs::rename(e.path(), &to).map_err(|err| AgentError::io(&to, err))?;
        sync_dir(root)?;
        done.push(format!("{name} -> {}", to.file_name().unwrap_or_default().to_string_lossy()));
    }
    Ok(done)
}

/// Exchanges two paths on the same file system: atomically where the kernel can, otherwise by
/// ordered renames.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    if fallback_forced() {
        return ordered_exchange(a, b);
    }
    let ca =
        CString::new(a.as_os_str().as_bytes()).map_err(|_| AgentError::Config(format!("{} has a NUL", a.display())))?;
    let cb =
        CString::new(b.as_os_str().as_bytes()).map_err(|_| AgentError::Config(format!("{} has a NUL", b.display())))?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            tracing::warn!(path = %b.display(), error = %err, "no atomic exchange here: using ordered renames");
            ordered_exchange(a, b)
        }
        _ => Err(AgentError::io(b, err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_core::keys::ReleaseKey;
    use updraft_core::package::{PackageMeta, build};

    fn package(dir: &Path, key: &ReleaseKey, version: &str) -> PathBuf {
        let src = dir.join(format!("src-{version}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("VERSION"), version).unwrap();
        let out = dir.join(format!("app-{version}.pkg"));
        let meta = PackageMeta { product: "app".into(), version: Some(version.parse().unwrap()), ..Default::default() };
        build(&src, &meta, key, &out).unwrap();
        out
    }

    #[test]
    fn install_upgrade_roll_back_uninstall() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let key = ReleaseKey::generate().unwrap();
        for v in ["1.0.0.0", "2.0.0.0"] {
            let p = package(tmp.path(), &key, v);
            let pkg = verify(&p, &key.public(), "id", "app", v).unwrap();
            stage(&pkg, &root, "id").unwrap();
            if exchange_in(&root, "app").unwrap() {
                keep_old(&root, "app", None).unwrap();
            }
            assert_eq!(std::fs::read_to_string(root.join("app/VERSION")).unwrap(), v);
        }
        assert_eq!(std::fs::read_to_string(root.join("app_old/VERSION")).unwrap(), "1.0.0.0");
        assert!(!pending_dir(&root, "app").exists());
        roll_back(&root, "app").unwrap();
        assert_eq!(std::fs::read_to_string(root.join("app/VERSION")).unwrap(), "1.0.0.0");
        assert!(!old_dir(&root, "app").exists());
        uninstall(&root, "app").unwrap();
        assert!(!root.join("app").exists());
    }

    fn tree(dir: &Path, files: &[(&str, &str)]) {
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn data_and_kept_files_are_copied_into_the_new_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let (live, staged) = (tmp.path().join("app"), tmp.path().join("app_update_pending"));
        tree(&live, &[("VERSION", "1"), ("var/db/rows", "the machine's rows"), ("etc/app.conf", "edited here")]);
        std::os::unix::fs::symlink("db/rows", live.join("var/latest")).unwrap();
        tree(&staged, &[("VERSION", "2"), ("etc/app.conf", "the package's default")]);
        let n = carry(&live, &staged, ["var", "etc/app.conf", "not/there"]).unwrap();
        assert_eq!(n, 2, "a path the live tree lacks is skipped");
        assert_eq!(read(staged.join("var/db/rows")), "the machine's rows");
        assert_eq!(read(staged.join("etc/app.conf")), "edited here", "the machine's copy wins");
        assert_eq!(std::fs::read_link(staged.join("var/latest")).unwrap(), Path::new("db/rows"));
        assert_eq!(read(staged.join("VERSION")), "2");
        // Copied, not linked: the old tree keeps its own data to go back to.
        std::fs::write(staged.join("var/db/rows"), "changed by v2").unwrap();
        assert_eq!(read(live.join("var/db/rows")), "the machine's rows");
        // Never written through a link carried earlier.
        std::fs::remove_dir_all(live.join("var")).unwrap();
        std::os::unix::fs::symlink("/etc", live.join("var")).unwrap();
        std::fs::write(tmp.path().join("x"), "").unwrap();
        let e = carry(&live, &staged, ["var", "var/passwd"]).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn earlier_versions_are_kept_as_asked_and_the_rest_go() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        tree(&live_dir(root, "app"), &[("VERSION", "1.0.0.0")]);
        // Installs 2, 3, 4 keeping two versions besides P_old.
        let mut kept: Vec<String> = vec![];
        let mut old: Option<String> = None;
        for v in ["2.0.0.0", "3.0.0.0", "4.0.0.0"] {
            tree(&pending_dir(root, "app"), &[("VERSION", v)]);
            assert!(exchange_in(root, "app").unwrap());
            keep_old(root, "app", old.as_deref()).unwrap();
            keep_old(root, "app", old.as_deref()).unwrap(); // done already: nothing changes
            if let Some(o) = &old {
                kept.insert(0, o.clone());
                kept.truncate(2);
            }
            prune_backups(root, "app", &kept.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
            old = Some(read(old_dir(root, "app").join("VERSION")));
        }
        assert_eq!(read(live_dir(root, "app").join("VERSION")), "4.0.0.0");
        assert_eq!(read(old_dir(root, "app").join("VERSION")), "3.0.0.0");
        assert_eq!(read(backup_dir(root, "app", "2.0.0.0").unwrap().join("VERSION")), "2.0.0.0");
        assert_eq!(read(backup_dir(root, "app", "1.0.0.0").unwrap().join("VERSION")), "1.0.0.0");
        // One fewer asked for: the oldest goes.
        tree(&pending_dir(root, "app"), &[("VERSION", "5.0.0.0")]);
        exchange_in(root, "app").unwrap();
        keep_old(root, "app", Some("3.0.0.0")).unwrap();
        prune_backups(root, "app", &["3.0.0.0"]).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(backups_dir(root, "app"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["3.0.0.0"]);
        // A restore copies the backup; the backup stays.
        stage_copy(root, "app", &backup_dir(root, "app", "3.0.0.0").unwrap()).unwrap();
        assert_eq!(read(pending_dir(root, "app").join("VERSION")), "3.0.0.0");
        assert!(backup_dir(root, "app", "3.0.0.0").unwrap().is_dir());
        assert!(backup_dir(root, "app", "../x").is_err(), "a backup is named by a version");
        uninstall(root, "app").unwrap();
        assert!(!backups_dir(root, "app").exists());
    }

    #[test]
    fn a_swap_back_can_be_repeated_at_any_point() {
        // After the exchange (previous in pending) and after P_old was kept (previous in P_old,
        // the displaced version in the backups): swapping back twice ends the same.
        for kept_old in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            tree(&live_dir(root, "app"), &[("VERSION", "2")]);
            tree(&old_dir(root, "app"), &[("VERSION", "1.0.0.0")]);
            tree(&pending_dir(root, "app"), &[("VERSION", "3")]);
            let new = inode(&pending_dir(root, "app"));
            exchange_in(root, "app").unwrap();
            if kept_old {
                keep_old(root, "app", Some("1.0.0.0")).unwrap();
            }
            for _ in 0..2 {
                swap_back(root, "app", new, Some("1.0.0.0")).unwrap();
                assert_eq!(read(live_dir(root, "app").join("VERSION")), "2", "kept_old {kept_old}");
                assert_eq!(read(old_dir(root, "app").join("VERSION")), "1.0.0.0", "kept_old {kept_old}");
                assert!(!pending_dir(root, "app").exists());
            }
        }
    }

    #[test]
    fn wrong_key_or_mislabelled_package_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let key = ReleaseKey::generate().unwrap();
        let p = package(tmp.path(), &key, "1.0.0.0");
        let other = ReleaseKey::generate().unwrap().public();
        assert!(verify(&p, &other, "id", "app", "1.0.0.0").unwrap_err().to_string().contains("not signed by"));
        assert!(verify(&p, &key.public(), "id", "app", "9.0.0.0").unwrap_err().to_string().contains("offered as"));
    }
}
