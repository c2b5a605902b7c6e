//! Putting a verified package in place on disk. `ROOT/P` is the installed version; a new one
//! is unpacked into `ROOT/P_update_pending` and exchanged with `ROOT/P` in one atomic rename
//! (`renameat2(RENAME_EXCHANGE)`), after which the previous version sits in `ROOT/P_old`.
//! At no instant is `ROOT/P` missing or a mix of two versions.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use updraft_core::keys::PublicKey;
use updraft_core::package::{Package, sync_dir};

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
    pkg.verify(key).map_err(|e| fail(e.to_string()))?;
    if pkg.manifest.product != product || pkg.manifest.version.to_string() != version {
        return Err(fail(format!(
            "package is {} {} but was offered as {product} {version}",
            pkg.manifest.product, pkg.manifest.version
        )));
    }
    Ok(pkg)
}

/// Unpacks into a fresh `P_update_pending`, discarding any leftover from an earlier attempt.
pub fn stage(pkg: &Package, root: &Path, update_id: &str) -> Result<PathBuf> {
    let product = &pkg.manifest.product;
    let pending = pending_dir(root, product);
    remove_tree(&pending)?;
    let mut files = 0;
    let unpacked = pkg.unpack_with(&pending, |_| {
        files += 1;
        if files == 2 {
            let _ = crate::failpoint::hit("stage:mid"); // inside the unpacker: kill or delay only
        }
    });
    if let Err(e) = unpacked {
        let _ = remove_tree(&pending);
        return Err(AgentError::Install { update: update_id.to_string(), reason: e.to_string() });
    }
    Ok(pending)
}

/// Makes the staged tree the live one; the previous live tree becomes `P_old`.
pub fn swap_in(root: &Path, product: &str) -> Result<()> {
    if exchange_in(root, product)? {
        keep_old(root, product)?;
    }
    Ok(())
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

/// Moves the previous version (left in `P_update_pending` by the exchange) to `P_old`,
/// replacing any older one.
pub fn keep_old(root: &Path, product: &str) -> Result<()> {
    let pending = pending_dir(root, product);
    let old = old_dir(root, product);
    remove_tree(&old)?;
    std::fs::rename(&pending, &old).map_err(|e| AgentError::io(&old, e))?;
    sync_dir(root)?;
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
    remove_tree(&old_dir(root, product))
}

/// Clears what an interrupted run may have left: staging and removal leftovers. `P` itself
/// is always whole, because it only ever changes by atomic exchange.
pub fn recover(root: &Path) -> Result<Vec<String>> {
    let mut cleaned = finish_ordered(root)?;
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(cleaned) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with("_update_pending") || name.ends_with("_removing") {
            remove_tree(&e.path())?;
            cleaned.push(name);
        }
    }
    Ok(cleaned)
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
            swap_in(&root, "app").unwrap();
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
