//! The signed package format: building one from a directory, opening and checking one, and
//! unpacking it into a fresh staging directory without trusting anything it says.
//!
//! Layout of a package file (all integers little-endian):
//!
//! ```text
//! "UPDRAFT1"                 8-byte magic
//! u32 manifest_len           at most MAX_MANIFEST
//! manifest                   JSON, see [`Manifest`]; these exact bytes are signed
//! u16 signature_len          64
//! signature                  ed25519 over "updraft-manifest-v1\0" ++ manifest
//! payload                    the files' contents, concatenated in manifest order
//! ```
//!
//! The manifest lists every file with its path, mode, size and SHA-256, so the signature over
//! the manifest covers the whole payload. Paths are validated as plain relative paths and only
//! directories and regular files are ever created, so a package cannot write outside the
//! directory it is unpacked into.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::hash::ContentHasher;
use crate::keys::{PublicKey, ReleaseKey};
use crate::model::{InstallType, validate_product};
use crate::version::Version;

pub const MAGIC: &[u8; 8] = b"UPDRAFT1";
pub const FORMAT: u32 = 1;
pub const MAX_MANIFEST: u32 = 16 << 20;
pub const MAX_FILES: usize = 100_000;
pub const MAX_PATH: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub mode: u32,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    pub path: String,
    pub mode: u32,
}

/// What a package says about itself. Everything but `files`/`dirs` is catalog metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub product: String,
    pub version: Version,
    #[serde(default)]
    pub install_type: InstallType,
    #[serde(default)]
    pub product_line: String,
    #[serde(default)]
    pub upgrade_code: String,
    #[serde(default)]
    pub product_code: String,
    #[serde(default)]
    pub release_label: String,
    #[serde(default)]
    pub patch_label: String,
    #[serde(default)]
    pub doc_url: String,
    #[serde(default)]
    pub install_properties: BTreeMap<String, String>,
    #[serde(default)]
    pub related_installs: Vec<String>,
    /// For an ES: the patch version it sits on. Absent from manifests that do not set it, so
    /// they read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<Version>,
    /// Id of the release key that signed this manifest (informational; the agent checks
    /// against the key it pins, whatever this says).
    pub key_id: String,
    #[serde(default)]
    pub dirs: Vec<DirEntry>,
    pub files: Vec<FileEntry>,
    /// Hooks, health check and process gate, signed with the rest.
    #[serde(default, skip_serializing_if = "Lifecycle::is_empty")]
    pub lifecycle: Lifecycle,
}

/// Install property saying when an install may happen: `restart` means at the agent's next
/// start only (for software that cannot be replaced while the machine is in use).
pub const APPLY_AT: &str = "apply-at";

/// How an install of this package is run on the machine. Hook paths are files of the package
/// (run from the installed tree, or the staged one before the swap); each hook is bounded by
/// `hook_timeout_secs` and its output kept for `agent log UPDATE`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// Runs from the staged tree before anything is stopped; failing aborts the install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_install: Option<String>,
    /// Stops the running application before the swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
    /// Runs from the new tree right after the swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_install: Option<String>,
    /// Starts the application after the swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// Must exit 0 once the new version runs; otherwise the machine swaps back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Seconds each hook may take (default 60).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hook_timeout_secs: u32,
    /// Health as a process: one with this name must be running, and stay running for
    /// `health_window_secs`, after the start hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_process: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub health_window_secs: u32,
    /// After the health check passed, how long the agent keeps watching (the health check
    /// repeated, the health process still up and not restarting) before it reports the update
    /// verified; a failure inside it swaps the previous version back. `None`: 10 minutes;
    /// `Some(0)`: verified as soon as it is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_window_secs: Option<u32>,
    /// The install waits while a process with one of these names runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// The install waits while this file (an absolute path on the machine) exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_file: Option<String>,
    /// The application's data (paths relative to the product's directory, files or
    /// directories): never in the package, carried from the live tree into every new one
    /// after the application stopped and before the swap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<String>,
    /// Files the machine may change (a configuration): the package's copy is the default for a
    /// first install; afterwards the machine's copy is carried over and never overwritten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
    /// How many earlier versions the machine keeps to go back to: `P_old` is the newest of
    /// them, the rest wait in `P_backups/VERSION` for `agent restore` (0 means 1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub backups: u32,
}

/// Paths a package may declare as data or kept files, each.
pub const MAX_DATA_PATHS: usize = 64;
/// The verification window of a package that names none (10 minutes), and the longest one.
pub const DEFAULT_VERIFY_WINDOW_SECS: u32 = 600;
pub const MAX_VERIFY_WINDOW_SECS: u32 = 86_400;
/// Earlier versions a package may ask the machine to keep.
pub const MAX_BACKUPS: u32 = 10;

/// Whether `path` is `under` or inside it (both relative, `/`-separated).
pub fn is_within(path: &str, under: &str) -> bool {
    path == under || path.strip_prefix(under).is_some_and(|rest| rest.starts_with('/'))
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Lifecycle {
    pub fn is_empty(&self) -> bool {
        *self == Lifecycle::default()
    }

    pub fn hook_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(if self.hook_timeout_secs == 0 { 60 } else { self.hook_timeout_secs.into() })
    }

    /// Whether anything runs after the swap that the new version must pass (post-install or
    /// start hook, health check or process): until it has, the swap can be undone.
    pub fn after_swap(&self) -> bool {
        self.post_install.is_some() || self.start.is_some() || self.health.is_some() || self.health_process.is_some()
    }

    /// How long the agent watches a healthy install before it counts as verified.
    pub fn verify_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.verify_window_secs.unwrap_or(DEFAULT_VERIFY_WINDOW_SECS).into())
    }

    /// Earlier versions kept on the machine (at least one: `P_old`).
    pub fn versions_kept(&self) -> u32 {
        self.backups.clamp(1, MAX_BACKUPS)
    }

    /// Every path carried from the live tree into a new one: data first, then kept files.
    pub fn carried(&self) -> impl Iterator<Item = &str> {
        self.data.iter().chain(&self.keep).map(String::as_str)
    }

    /// The hooks in the order an install runs them, with their names.
    pub fn hooks(&self) -> [(&'static str, Option<&str>); 5] {
        [
            ("pre-install", self.pre_install.as_deref()),
            ("stop", self.stop.as_deref()),
            ("post-install", self.post_install.as_deref()),
            ("start", self.start.as_deref()),
            ("health", self.health.as_deref()),
        ]
    }

    fn validate(&self, files: &[FileEntry]) -> Result<()> {
        let bad = |m: String| Err(CoreError::Manifest(m));
        for (name, path) in self.hooks() {
            let Some(path) = path else { continue };
            match files.iter().find(|f| f.path == path) {
                Some(f) if f.mode & 0o100 != 0 => {}
                Some(_) => return bad(format!("{name} hook {path:?} is not executable")),
                None => return bad(format!("{name} hook {path:?} is not a file of the package")),
            }
        }
        if self.hook_timeout_secs > 3600 {
            return bad(format!("hook timeout {} s is over the 3600 s allowed", self.hook_timeout_secs));
        }
        if let Some(p) = &self.health_process
            && (p.is_empty() || p.len() > 15 || p.contains('/'))
        {
            return bad(format!("health process {p:?} must be a process name of 1-15 characters"));
        }
        if self.health_window_secs > 3600 {
            return bad(format!("health window {} s is over the 3600 s allowed", self.health_window_secs));
        }
        if let Some(w) = self.verify_window_secs.filter(|w| *w > MAX_VERIFY_WINDOW_SECS) {
            return bad(format!("verify window {w} s is over the {MAX_VERIFY_WINDOW_SECS} s (a day) allowed"));
        }
        if self.processes.len() > 16
            || self.processes.iter().any(|p| p.is_empty() || p.len() > 15 || p.contains('/') || p.contains('\0'))
        {
            return bad("processes: at most 16 names of 1-15 characters, no '/'".into());
        }
        if let Some(l) = &self.lock_file
            && (!l.starts_with('/') || l.contains('\0') || l.len() > 4096 || l.split('/').any(|c| c == ".."))
        {
            return bad(format!("lock file {l:?} must be an absolute path without '..'"));
        }
        for (what, paths) in [("data path", &self.data), ("kept file", &self.keep)] {
            if paths.len() > MAX_DATA_PATHS {
                return bad(format!("{} {what}s, at most {MAX_DATA_PATHS}", paths.len()));
            }
            for p in paths {
                validate_path(p).map_err(|e| CoreError::Manifest(format!("{what}: {e}")))?;
            }
        }
        // Data is the machine's alone: the package never brings any, nor hooks from it.
        for d in &self.data {
            if let Some(f) = files.iter().find(|f| is_within(&f.path, d)) {
                return bad(format!("{:?} lies in the data path {d:?}: data is never shipped", f.path));
            }
            if let Some((name, h)) =
                self.hooks().into_iter().find_map(|(n, h)| h.filter(|h| is_within(h, d)).map(|h| (n, h)))
            {
                return bad(format!("{name} hook {h:?} lies in the data path {d:?}"));
            }
        }
        if self.backups > MAX_BACKUPS {
            return bad(format!("{} backups asked for, at most {MAX_BACKUPS}", self.backups));
        }
        Ok(())
    }
}

/// Catalog metadata given to [`build`]; the file list comes from the directory.
#[derive(Debug, Clone, Default)]
pub struct PackageMeta {
    pub product: String,
    pub version: Option<Version>,
    pub install_type: InstallType,
    pub product_line: String,
    pub upgrade_code: String,
    pub product_code: String,
    pub release_label: String,
    pub patch_label: String,
    pub doc_url: String,
    pub install_properties: BTreeMap<String, String>,
    pub related_installs: Vec<String>,
    /// For an ES: the patch version it sits on.
    pub requires: Option<Version>,
    pub lifecycle: Lifecycle,
}

impl Manifest {
    /// A manifest for `product` `version` with no files and empty catalog metadata.
    pub fn new(product: &str, version: Version) -> Self {
        Self {
            format: FORMAT,
            product: product.to_string(),
            version,
            install_type: InstallType::Install,
            product_line: String::new(),
            upgrade_code: String::new(),
            product_code: String::new(),
            release_label: String::new(),
            patch_label: String::new(),
            doc_url: String::new(),
            install_properties: BTreeMap::new(),
            related_installs: vec![],
            requires: None,
            key_id: String::new(),
            dirs: vec![],
            files: vec![],
            lifecycle: Lifecycle::default(),
        }
    }

    /// Every rule a manifest must meet before anything in it is used.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::Manifest(m));
        if self.format != FORMAT {
            return bad(format!("format {} is not supported (this build reads format {FORMAT})", self.format));
        }
        validate_product(&self.product).map_err(|e| CoreError::Manifest(e.to_string()))?;
        if let Some(r) = self.requires {
            if self.install_type != InstallType::Es {
                return bad(format!("requires {r}: only an ES names the patch it sits on"));
            }
            if r >= self.version || (r.major, r.minor) != (self.version.major, self.version.minor) {
                return bad(format!(
                    "requires {r}: an ES sits on an earlier patch of its own release ({}.{}.x.x, below {})",
                    self.version.major, self.version.minor, self.version
                ));
            }
        }
        if self.files.len() + self.dirs.len() > MAX_FILES {
            return bad(format!("{} entries, at most {MAX_FILES} allowed", self.files.len() + self.dirs.len()));
        }
        let mut seen = BTreeSet::new();
        for (path, mode) in
            self.dirs.iter().map(|d| (&d.path, d.mode)).chain(self.files.iter().map(|f| (&f.path, f.mode)))
        {
            validate_path(path)?;
            if mode & !0o777 != 0 {
                return bad(format!(
                    "{path:?} has mode {mode:o}: setuid, setgid, sticky and file-type bits are not allowed"
                ));
            }
            if !seen.insert(path.as_str()) {
                return bad(format!("{path:?} is listed twice"));
            }
        }
        // A file must not also be used as a directory by another entry ("a" and "a/b").
        for f in &self.files {
            let prefix = format!("{}/", f.path);
            if let Some(other) = seen.range(prefix.as_str()..).next().filter(|o| o.starts_with(&prefix)) {
                return bad(format!("{:?} is a file but {other:?} is inside it", f.path));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("{:?} has a malformed sha256", f.path));
            }
        }
        self.lifecycle.validate(&self.files)
    }

    pub fn payload_size(&self) -> Option<u64> {
        self.files.iter().try_fold(0u64, |acc, f| acc.checked_add(f.size))
    }
}

/// A path from a manifest must be a plain relative path: no root, no `.`/`..`, no empty
/// components, no NUL or backslash, bounded length.
pub fn validate_path(path: &str) -> Result<()> {
    let bad =
        |why: &str| Err(CoreError::Manifest(format!("path {:?} {why}", path.chars().take(200).collect::<String>())));
    if path.is_empty() {
        return bad("is empty");
    }
    if path.len() > MAX_PATH {
        return bad("is too long");
    }
    if path.starts_with('/') {
        return bad("is absolute; paths must be relative to the package root");
    }
    if path.contains('\0') || path.contains('\\') {
        return bad("contains a NUL or backslash");
    }
    for comp in path.split('/') {
        match comp {
            "" => return bad("has an empty component"),
            "." | ".." => return bad("escapes its folder (contains . or ..)"),
            c if c.len() > 255 => return bad("has a component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// Packs `from` into a signed package at `out`. Symlinks and special files are refused:
/// a package carries directories and regular files only.
pub fn build(from: &Path, meta: &PackageMeta, key: &ReleaseKey, out: &Path) -> Result<Manifest> {
    validate_product(&meta.product)?;
    let version = meta.version.ok_or_else(|| CoreError::Manifest("a version is required".into()))?;
    let root_meta = fs::metadata(from).map_err(|e| CoreError::io(from, e))?;
    if !root_meta.is_dir() {
        return Err(CoreError::package(from, "is not a directory"));
    }
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    walk(from, from, &meta.lifecycle.data, &mut dirs, &mut files)?;
    let manifest = Manifest {
        install_type: meta.install_type,
        product_line: meta.product_line.clone(),
        upgrade_code: meta.upgrade_code.clone(),
        product_code: meta.product_code.clone(),
        release_label: meta.release_label.clone(),
        patch_label: meta.patch_label.clone(),
        doc_url: meta.doc_url.clone(),
        install_properties: meta.install_properties.clone(),
        related_installs: meta.related_installs.clone(),
        requires: meta.requires,
        key_id: key.public().key_id(),
        dirs,
        files,
        lifecycle: meta.lifecycle.clone(),
        ..Manifest::new(&meta.product, version)
    };
    manifest.validate()?;
    write_package(out, &manifest, key, |w, entry| {
        // Copy while hashing again, so a file changed since the first pass is caught.
        let src = from.join(&entry.path);
        let mut f = File::open(&src).map_err(|e| CoreError::io(&src, e))?;
        let mut hasher = ContentHasher::new();
        let n = copy_hashing(&mut (&mut f).take(entry.size + 1), w, &mut hasher).map_err(|e| CoreError::io(&src, e))?;
        if n != entry.size || hasher.finish_hex() != entry.sha256 {
            return Err(CoreError::package(&src, "changed while the package was being built"));
        }
        Ok(())
    })?;
    Ok(manifest)
}

/// Writes a package from a manifest and a payload writer; the writer is called per file entry
/// in order. The file appears at `out` only once complete and synced.
pub fn write_package(
    out: &Path,
    manifest: &Manifest,
    key: &ReleaseKey,
    mut payload: impl FnMut(&mut dyn Write, &FileEntry) -> Result<()>,
) -> Result<()> {
    let manifest_bytes = serde_json::to_vec(manifest).map_err(|e| CoreError::Manifest(e.to_string()))?;
    if manifest_bytes.len() > MAX_MANIFEST as usize {
        return Err(CoreError::Manifest(format!("{} bytes, at most {MAX_MANIFEST}", manifest_bytes.len())));
    }
    let sig = key.sign_manifest(&manifest_bytes);
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| CoreError::io(dir, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        let io = |e| CoreError::io(out, e);
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(&(manifest_bytes.len() as u32).to_le_bytes()).map_err(io)?;
        w.write_all(&manifest_bytes).map_err(io)?;
        w.write_all(&(sig.len() as u16).to_le_bytes()).map_err(io)?;
        w.write_all(&sig).map_err(io)?;
        for entry in &manifest.files {
            payload(&mut w, entry)?;
        }
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(|e| CoreError::io(out, e))?;
    tmp.persist(out).map_err(|e| CoreError::io(out, e.error))?;
    Ok(())
}

/// Lists `dir` under `root`, leaving out the data paths `skip` (the machine's, never shipped).
fn walk(root: &Path, dir: &Path, skip: &[String], dirs: &mut Vec<DirEntry>, files: &mut Vec<FileEntry>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| CoreError::io(dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| CoreError::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| CoreError::io(&path, e))?;
        let rel = path
            .strip_prefix(root)
            .ok()
            .and_then(|p| p.to_str())
            .ok_or_else(|| CoreError::package(&path, "path is not valid UTF-8"))?
            .to_string();
        if skip.iter().any(|d| is_within(&rel, d)) {
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            dirs.push(DirEntry { path: rel, mode });
            walk(root, &path, skip, dirs, files)?;
        } else if meta.is_file() {
            let mut f = File::open(&path).map_err(|e| CoreError::io(&path, e))?;
            let mut hasher = ContentHasher::new();
            let size = copy_hashing(&mut f, &mut std::io::sink(), &mut hasher).map_err(|e| CoreError::io(&path, e))?;
            files.push(FileEntry { path: rel, mode, size, sha256: hasher.finish_hex() });
        } else {
            return Err(CoreError::package(
                &path,
                "is a symlink or special file; packages hold only directories and regular files",
            ));
        }
    }
    Ok(())
}

fn copy_hashing(r: &mut dyn Read, w: &mut dyn Write, hasher: &mut ContentHasher) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// An opened package whose header and manifest have been checked; the payload is read only by
/// [`Package::unpack`].
#[derive(Debug)]
pub struct Package {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub signature: Vec<u8>,
    payload_offset: u64,
}

impl Package {
    pub fn open(path: &Path) -> Result<Self> {
        let perr = |reason: String| CoreError::package(path, reason);
        let mut f = File::open(path).map_err(|e| CoreError::io(path, e))?;
        let file_len = f.metadata().map_err(|e| CoreError::io(path, e))?.len();
        let mut r = BufReader::new(&mut f);
        let mut magic = [0u8; 8];
        read_exact(&mut r, &mut magic, path, "magic")?;
        if &magic != MAGIC {
            return Err(perr("not an Updraft package (bad magic)".into()));
        }
        let mut len4 = [0u8; 4];
        read_exact(&mut r, &mut len4, path, "manifest length")?;
        let mlen = u32::from_le_bytes(len4);
        if mlen > MAX_MANIFEST {
            return Err(perr(format!("manifest is {mlen} bytes, at most {MAX_MANIFEST} allowed")));
        }
        if u64::from(mlen) + 14 > file_len {
            return Err(perr(format!("truncated: manifest claims {mlen} bytes but the file has {file_len}")));
        }
        let mut manifest_bytes = vec![0u8; mlen as usize];
        read_exact(&mut r, &mut manifest_bytes, path, "manifest")?;
        let mut len2 = [0u8; 2];
        read_exact(&mut r, &mut len2, path, "signature length")?;
        let slen = u16::from_le_bytes(len2);
        if slen != 64 {
            return Err(perr(format!("signature is {slen} bytes, expected 64")));
        }
        let mut signature = vec![0u8; 64];
        read_exact(&mut r, &mut signature, path, "signature")?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| CoreError::Manifest(format!("{}: {e}", path.display())))?;
        manifest.validate()?;
        let payload_offset = 8 + 4 + u64::from(mlen) + 2 + 64;
        let payload = manifest.payload_size().ok_or_else(|| perr("file sizes overflow".into()))?;
        let expected = payload_offset.checked_add(payload).ok_or_else(|| perr("file sizes overflow".into()))?;
        if expected != file_len {
            return Err(perr(format!(
                "size mismatch: the manifest accounts for {expected} bytes but the file has {file_len} (truncated or padded)"
            )));
        }
        Ok(Self { path: path.to_path_buf(), manifest, manifest_bytes, signature, payload_offset })
    }

    /// Checks the manifest signature against a pinned release key.
    pub fn verify(&self, key: &PublicKey) -> Result<()> {
        key.verify_manifest(&self.manifest_bytes, &self.signature)
    }

    /// Unpacks into `dest`, which must not exist yet. Every file's size and hash are checked as
    /// it is written; on any error `dest` may hold a partial tree, which the caller discards.
    /// Files and directories are synced so that a later rename publishes complete content.
    pub fn unpack(&self, dest: &Path) -> Result<()> {
        self.unpack_with(dest, |_| {})
    }

    /// [`Package::unpack`], calling `after_file` with each file's path once it is written.
    pub fn unpack_with(&self, dest: &Path, mut after_file: impl FnMut(&str)) -> Result<()> {
        fs::create_dir(dest).map_err(|e| CoreError::io(dest, e))?;
        let mut f = File::open(&self.path).map_err(|e| CoreError::io(&self.path, e))?;
        f.seek(SeekFrom::Start(self.payload_offset)).map_err(|e| CoreError::io(&self.path, e))?;
        let mut r = BufReader::with_capacity(256 * 1024, f);
        let mut made_dirs: BTreeSet<PathBuf> = BTreeSet::new();
        for d in &self.manifest.dirs {
            let p = dest.join(&d.path);
            fs::create_dir_all(&p).map_err(|e| CoreError::io(&p, e))?;
            made_dirs.insert(p);
        }
        for entry in &self.manifest.files {
            let target = dest.join(&entry.path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
                made_dirs.insert(parent.to_path_buf());
            }
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)
                .map_err(|e| CoreError::io(&target, e))?;
            let mut hasher = ContentHasher::new();
            let n = copy_hashing(&mut (&mut r).take(entry.size), &mut out, &mut hasher)
                .map_err(|e| CoreError::io(&target, e))?;
            if n != entry.size {
                return Err(CoreError::package(&self.path, format!("payload ends inside {:?}", entry.path)));
            }
            if hasher.finish_hex() != entry.sha256 {
                return Err(CoreError::package(&self.path, format!("{:?} does not match its sha256", entry.path)));
            }
            out.set_permissions(fs::Permissions::from_mode(entry.mode)).map_err(|e| CoreError::io(&target, e))?;
            out.sync_all().map_err(|e| CoreError::io(&target, e))?;
            after_file(&entry.path);
        }
        let mut extra = [0u8; 1];
        if r.read(&mut extra).map_err(|e| CoreError::io(&self.path, e))? != 0 {
            return Err(CoreError::package(&self.path, "payload has bytes the manifest does not list"));
        }
        for d in &self.manifest.dirs {
            let p = dest.join(&d.path);
            fs::set_permissions(&p, fs::Permissions::from_mode(d.mode)).map_err(|e| CoreError::io(&p, e))?;
        }
        made_dirs.insert(dest.to_path_buf());
        for d in made_dirs.iter().rev() {
            sync_dir(d)?;
        }
        Ok(())
    }
}

/// fsync a directory so the names in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CoreError::io(dir, e))
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old file or the new one:
/// written to a temp file (readable by its owner only: these are state files), fsynced,
/// renamed over, then the directory fsynced.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    // A temp name of its own per write: two tasks of one process may save at the same time.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.{}.{n}.tmp", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| CoreError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| CoreError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| CoreError::io(&path, e))?;
    sync_dir(dir)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CoreError::package(path, format!("truncated while reading the {what}"))
        } else {
            CoreError::io(path, e)
        }
    })
}

#[cfg(test)]
#[path = "corpus_tests.rs"]
mod corpus_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("bin")).unwrap();
        fs::write(d.path().join("bin/app"), b"#!/bin/sh\necho v1\n").unwrap();
        fs::set_permissions(d.path().join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(d.path().join("VERSION"), b"1.0.0.0\n").unwrap();
        fs::create_dir(d.path().join("empty")).unwrap();
        d
    }

    fn meta() -> PackageMeta {
        PackageMeta { product: "app".into(), version: Some("1.0.0.0".parse().unwrap()), ..Default::default() }
    }

    #[test]
    fn build_open_verify_unpack() {
        let src = sample_dir();
        let out = tempfile::tempdir().unwrap();
        let key = ReleaseKey::generate().unwrap();
        let pkg_path = out.path().join("app.pkg");
        let m = build(src.path(), &meta(), &key, &pkg_path).unwrap();
        assert_eq!(m.files.len(), 2);
        let pkg = Package::open(&pkg_path).unwrap();
        pkg.verify(&key.public()).unwrap();
        assert!(pkg.verify(&ReleaseKey::generate().unwrap().public()).is_err());
        let dest = out.path().join("staged");
        pkg.unpack(&dest).unwrap();
        assert_eq!(fs::read(dest.join("bin/app")).unwrap(), b"#!/bin/sh\necho v1\n");
        assert_eq!(fs::metadata(dest.join("bin/app")).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(dest.join("empty").is_dir());
    }

    #[test]
    fn data_paths_are_left_out_and_never_shipped() {
        let src = sample_dir();
        fs::create_dir_all(src.path().join("var/db")).unwrap();
        fs::write(src.path().join("var/db/rows"), b"the builder's own data").unwrap();
        fs::write(src.path().join("variant"), b"not data: only a common prefix").unwrap();
        let out = tempfile::tempdir().unwrap();
        let key = ReleaseKey::generate().unwrap();
        let mut m = meta();
        m.lifecycle.data = vec!["var".into()];
        m.lifecycle.keep = vec!["VERSION".into()];
        let built = build(src.path(), &m, &key, &out.path().join("p")).unwrap();
        assert!(built.files.iter().all(|f| !f.path.starts_with("var/")), "{:?}", built.files);
        assert!(built.dirs.iter().all(|d| d.path != "var"));
        assert!(built.files.iter().any(|f| f.path == "variant") && built.files.iter().any(|f| f.path == "VERSION"));
        // A manifest that ships data, declares a bad path or asks too much is refused.
        let mut bad = built.clone();
        bad.files.push(FileEntry { path: "var/db/rows".into(), mode: 0o644, size: 1, sha256: "0".repeat(64) });
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("data is never shipped"), "{e}");
        for (data, backups, why) in [("../etc", 0, "escapes"), ("/var", 0, "absolute"), ("var", 11, "at most 10")] {
            let mut bad = built.clone();
            bad.lifecycle.data = vec![data.into()];
            bad.lifecycle.backups = backups;
            assert!(bad.validate().unwrap_err().to_string().contains(why), "{data} {backups}");
        }
        assert_eq!(built.lifecycle.versions_kept(), 1);
    }

    #[test]
    fn refuses_symlinks_when_building() {
        let src = sample_dir();
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("link")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let e = build(src.path(), &meta(), &ReleaseKey::generate().unwrap(), &out.path().join("p")).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }

    #[test]
    fn truncated_package_is_refused() {
        let src = sample_dir();
        let out = tempfile::tempdir().unwrap();
        let p = out.path().join("app.pkg");
        build(src.path(), &meta(), &ReleaseKey::generate().unwrap(), &p).unwrap();
        let bytes = fs::read(&p).unwrap();
        for cut in [3, 20, bytes.len() - 1] {
            fs::write(&p, &bytes[..cut]).unwrap();
            let e = Package::open(&p).unwrap_err().to_string();
            assert!(e.contains("truncated") || e.contains("size mismatch"), "{cut}: {e}");
        }
    }

    #[test]
    fn path_rules() {
        for good in ["a", "a/b.txt", "x..y/z"] {
            validate_path(good).unwrap();
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", "a\0b"] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn manifest_rules() {
        let file = |p: &str, mode| FileEntry { path: p.into(), mode, size: 0, sha256: "0".repeat(64) };
        let mut m = Manifest::new("app", "1.0.0.0".parse().unwrap());
        m.files.push(file("a", 0o644));
        m.validate().unwrap();
        m.files.push(file("a", 0o644));
        assert!(m.validate().unwrap_err().to_string().contains("twice"));
        m.files[1] = file("a/b", 0o644);
        assert!(m.validate().unwrap_err().to_string().contains("inside it"));
        m.files[1] = file("suid", 0o4755);
        assert!(m.validate().unwrap_err().to_string().contains("setuid"));
    }
}
