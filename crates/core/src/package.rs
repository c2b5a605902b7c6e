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
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
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

/// Bytes before the manifest: the magic and the manifest's length.
const PREAMBLE: usize = 12;
/// The signature's length field and the signature, after the manifest.
const SIGNATURE_PART: usize = 2 + 64;
/// Bytes of the payload read or written at a time, and how far a file runs ahead of its
/// writeback (see [`TreeWriter`]).
const CHUNK: usize = 256 * 1024;
const WRITEBACK_EVERY: u64 = 8 << 20;

/// The signed head of a package: its manifest, checked for form, and the signature over it
/// (checked against a key only by [`Header::accept`] or [`Package::verify`]).
#[derive(Debug)]
pub struct Header {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub signature: Vec<u8>,
}

/// What [`Header::parse`] made of the first bytes of a package.
enum Parsed {
    /// At least this many bytes from the start are needed.
    Need(usize),
    /// The header, and where the payload begins.
    Done(Box<Header>, usize),
}

impl Header {
    /// Parses the header from `prefix`, the first bytes of a package (`origin` names it in
    /// errors). Refuses as soon as the bytes seen are wrong, and never asks for more than
    /// [`MAX_MANIFEST`] and a signature.
    fn parse(prefix: &[u8], origin: &Path) -> Result<Parsed> {
        let perr = |reason: String| CoreError::package(origin, reason);
        if prefix.len() < PREAMBLE {
            if !MAGIC.starts_with(&prefix[..prefix.len().min(MAGIC.len())]) {
                return Err(perr("not an Updraft package (bad magic)".into()));
            }
            return Ok(Parsed::Need(PREAMBLE));
        }
        if &prefix[..8] != MAGIC {
            return Err(perr("not an Updraft package (bad magic)".into()));
        }
        let mlen = u32::from_le_bytes(prefix[8..PREAMBLE].try_into().expect("4 bytes"));
        if mlen > MAX_MANIFEST {
            return Err(perr(format!("manifest is {mlen} bytes, at most {MAX_MANIFEST} allowed")));
        }
        let sig_at = PREAMBLE + mlen as usize;
        let end = sig_at + SIGNATURE_PART;
        if prefix.len() < end {
            return Ok(Parsed::Need(end));
        }
        let slen = u16::from_le_bytes(prefix[sig_at..sig_at + 2].try_into().expect("2 bytes"));
        if slen != 64 {
            return Err(perr(format!("signature is {slen} bytes, expected 64")));
        }
        let manifest_bytes = prefix[PREAMBLE..sig_at].to_vec();
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| CoreError::Manifest(format!("{}: {e}", origin.display())))?;
        manifest.validate()?;
        Ok(Parsed::Done(
            Box::new(Header { manifest, manifest_bytes, signature: prefix[sig_at + 2..end].to_vec() }),
            end,
        ))
    }

    /// The header from exactly its bytes (as [`Header::to_bytes`] gave them), checked for form;
    /// the signature is checked only by [`Header::accept`].
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Header> {
        match Header::parse(bytes, origin)? {
            Parsed::Done(h, end) if end == bytes.len() => Ok(*h),
            _ => Err(CoreError::package(origin, "not exactly a package header")),
        }
    }

    /// The header exactly as it opens a package (and as [`Unpacker::resume`] takes it back).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PREAMBLE + self.manifest_bytes.len() + SIGNATURE_PART);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.manifest_bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.manifest_bytes);
        out.extend_from_slice(&(self.signature.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Checks the signature against a pinned release key, and that the package is the product
    /// and version it was offered as (so a provider cannot pass off one signed package as
    /// another). The reason says which failed.
    pub fn accept(&self, key: &PublicKey, product: &str, version: &str) -> std::result::Result<(), String> {
        key.verify_manifest(&self.manifest_bytes, &self.signature).map_err(|e| e.to_string())?;
        if self.manifest.product != product || self.manifest.version.to_string() != version {
            return Err(format!(
                "package is {} {} but was offered as {product} {version}",
                self.manifest.product, self.manifest.version
            ));
        }
        Ok(())
    }
}

/// An opened package whose header and manifest have been checked; the payload is read only by
/// [`Package::unpack`].
#[derive(Debug)]
pub struct Package {
    pub path: PathBuf,
    pub header: Header,
    payload_offset: u64,
}

impl std::ops::Deref for Package {
    type Target = Header;
    fn deref(&self) -> &Header {
        &self.header
    }
}

impl Package {
    pub fn open(path: &Path) -> Result<Self> {
        let perr = |reason: String| CoreError::package(path, reason);
        let mut f = File::open(path).map_err(|e| CoreError::io(path, e))?;
        let file_len = f.metadata().map_err(|e| CoreError::io(path, e))?.len();
        let mut prefix = Vec::new();
        let (header, payload_offset) = loop {
            match Header::parse(&prefix, path)? {
                Parsed::Done(h, at) => break (*h, at as u64),
                Parsed::Need(n) if n as u64 > file_len => {
                    return Err(perr(format!("truncated: the header needs {n} bytes but the file has {file_len}")));
                }
                Parsed::Need(n) => {
                    let have = prefix.len();
                    prefix.resize(n, 0);
                    read_exact(&mut f, &mut prefix[have..], path, "header")?;
                }
            }
        };
        let payload = header.manifest.payload_size().ok_or_else(|| perr("file sizes overflow".into()))?;
        let expected = payload_offset.checked_add(payload).ok_or_else(|| perr("file sizes overflow".into()))?;
        if expected != file_len {
            return Err(perr(format!(
                "size mismatch: the manifest accounts for {expected} bytes but the file has {file_len} (truncated or padded)"
            )));
        }
        Ok(Self { path: path.to_path_buf(), header, payload_offset })
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
        let mut f = File::open(&self.path).map_err(|e| CoreError::io(&self.path, e))?;
        f.seek(SeekFrom::Start(self.payload_offset)).map_err(|e| CoreError::io(&self.path, e))?;
        let mut tree = TreeWriter::start(dest, &self.manifest)?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf).map_err(|e| CoreError::io(&self.path, e))?;
            if n == 0 {
                break;
            }
            tree.write(&self.manifest, &buf[..n], &self.path, &mut after_file)?;
        }
        tree.finish(&self.manifest, &self.path)
    }
}

/// Unpacks a package as its bytes arrive, so a download and its unpacking overlap: the header
/// is checked by `accept` (signature, and what the package was offered as) before anything is
/// written, then the payload goes through the same writer as [`Package::unpack`], every
/// file checked against the manifest's size and hash. On any error `dest` may hold a partial
/// tree, which the caller discards; after [`Unpacker::finish`] it holds the whole package,
/// synced.
pub struct Unpacker<A> {
    dest: PathBuf,
    /// Names the bytes' source in errors (the file they are also written to).
    origin: PathBuf,
    accept: A,
    prefix: Vec<u8>,
    body: Option<(Header, TreeWriter)>,
}

impl<A: FnMut(&Header) -> Result<()>> Unpacker<A> {
    pub fn new(dest: &Path, origin: &Path, accept: A) -> Self {
        Self { dest: dest.to_path_buf(), origin: origin.to_path_buf(), accept, prefix: Vec::new(), body: None }
    }

    /// Takes the next bytes of the package, calling `after_file` with each file's path once it
    /// is written.
    pub fn feed(&mut self, mut data: &[u8], after_file: &mut dyn FnMut(&str)) -> Result<()> {
        // The header is gathered no further than it reaches (never more than MAX_MANIFEST and a
        // signature), so what is left of `data` afterwards is payload.
        while self.body.is_none() {
            match Header::parse(&self.prefix, &self.origin)? {
                Parsed::Done(header, _) => {
                    (self.accept)(&header)?;
                    let tree = TreeWriter::start(&self.dest, &header.manifest)?;
                    self.prefix = Vec::new();
                    self.body = Some((*header, tree));
                }
                Parsed::Need(_) if data.is_empty() => return Ok(()),
                Parsed::Need(n) => {
                    let take = (n - self.prefix.len()).min(data.len());
                    self.prefix.extend_from_slice(&data[..take]);
                    data = &data[take..];
                }
            }
        }
        let (header, tree) = self.body.as_mut().expect("the header came first");
        tree.write(&header.manifest, data, &self.origin, after_file)
    }

    /// Picks up an unpacking that stopped part-way (a download cut short, a cancel, a killed
    /// agent): `head` is the package's header as [`Header::to_bytes`] gave it, and `dest` what
    /// an unpacker of that package had written when it stopped. The header is accepted again,
    /// and every byte already in `dest` is read back: each whole file must match its hash, at
    /// most one file (the last) may be short, and nothing else may be there. Returns the
    /// unpacker ready for the next byte, a content hasher over every package byte so far, and
    /// how many package bytes that is. Any mismatch is an error, and the caller starts afresh.
    pub fn resume(dest: &Path, origin: &Path, mut accept: A, head: &[u8]) -> Result<(Self, ContentHasher, u64)> {
        let header = Header::from_bytes(head, origin)?;
        accept(&header)?;
        let mut content = ContentHasher::new();
        content.update(head);
        let (tree, payload) = TreeWriter::resume(dest, &header.manifest, &mut content)?;
        let unpacker = Self {
            dest: dest.to_path_buf(),
            origin: origin.to_path_buf(),
            accept,
            prefix: Vec::new(),
            body: Some((header, tree)),
        };
        Ok((unpacker, content, head.len() as u64 + payload))
    }

    /// Whether every file of the package has been written whole (so the next byte would be one
    /// too many, and [`Unpacker::finish`] has only directories left to settle).
    pub fn is_complete(&self) -> bool {
        self.body.as_ref().is_some_and(|(h, t)| t.open.is_none() && t.next == h.manifest.files.len())
    }

    /// Ends the package: every file listed must have been written whole. Returns the header.
    pub fn finish(self) -> Result<Header> {
        let Some((header, tree)) = self.body else {
            return Err(CoreError::package(&self.origin, "truncated inside the header"));
        };
        tree.finish(&header.manifest, &self.origin)?;
        Ok(header)
    }
}

/// Writes a package's payload into a fresh directory in manifest order, whatever the sizes of
/// the pieces it is handed: the one writer behind [`Package::unpack`] and [`Unpacker`]. Only
/// directories and regular files are created, each file is checked against its size and hash
/// as it completes and then synced; writeback of a large file is started every
/// [`WRITEBACK_EVERY`] bytes so its final sync has little left to wait for.
struct TreeWriter {
    dest: PathBuf,
    /// Index in the manifest of the next file to open.
    next: usize,
    open: Option<OpenFile>,
    made_dirs: BTreeSet<PathBuf>,
}

struct OpenFile {
    index: usize,
    path: PathBuf,
    out: File,
    hasher: ContentHasher,
    left: u64,
    written: u64,
    flushed_to: u64,
}

impl TreeWriter {
    fn start(dest: &Path, m: &Manifest) -> Result<Self> {
        fs::create_dir(dest).map_err(|e| CoreError::io(dest, e))?;
        let mut w = Self { dest: dest.to_path_buf(), next: 0, open: None, made_dirs: make_dirs(dest, m)? };
        w.open_next(m, &mut |_| {})?;
        Ok(w)
    }

    /// Takes up a tree an earlier writer of the same manifest left in `dest`, feeding every
    /// byte found there to `content` in package order (see [`Unpacker::resume`]). Returns the
    /// writer and the payload bytes already written.
    fn resume(dest: &Path, m: &Manifest, content: &mut ContentHasher) -> Result<(Self, u64)> {
        let perr = |reason: String| CoreError::package(dest, reason);
        if !fs::symlink_metadata(dest).map_err(|e| CoreError::io(dest, e))?.is_dir() {
            return Err(perr("is not a directory".into()));
        }
        let mut present = BTreeSet::new();
        files_under(dest, &mut present)?;
        let mut w = Self { dest: dest.to_path_buf(), next: 0, open: None, made_dirs: make_dirs(dest, m)? };
        let (mut payload, mut buf) = (0u64, vec![0u8; CHUNK]);
        while w.next < m.files.len() {
            let (index, entry) = (w.next, &m.files[w.next]);
            let path = dest.join(&entry.path);
            if !present.remove(&path) {
                break; // not begun: the writer opens it next
            }
            w.next += 1;
            let mut out =
                fs::OpenOptions::new().read(true).write(true).open(&path).map_err(|e| CoreError::io(&path, e))?;
            let mut hasher = ContentHasher::new();
            let mut written = 0u64;
            loop {
                let n = out.read(&mut buf).map_err(|e| CoreError::io(&path, e))?;
                if n == 0 {
                    break;
                }
                written += n as u64;
                if written > entry.size {
                    return Err(CoreError::package(
                        &path,
                        format!("{:?} is longer than the manifest says", entry.path),
                    ));
                }
                hasher.update(&buf[..n]);
                content.update(&buf[..n]);
            }
            payload += written;
            if let Some(parent) = path.parent() {
                w.made_dirs.insert(parent.to_path_buf());
            }
            let file = OpenFile { index, path, out, hasher, left: entry.size - written, written, flushed_to: written };
            if file.left == 0 {
                Self::close(file, m, &mut |_| {})?;
            } else {
                w.open = Some(file);
                break;
            }
        }
        if let Some(extra) = present.first() {
            return Err(CoreError::package(extra, "is not the next file the package writes".to_string()));
        }
        if w.open.is_none() {
            w.open_next(m, &mut |_| {})?;
        }
        Ok((w, payload))
    }

    /// Opens the next file of the manifest; an empty one is completed at once.
    fn open_next(&mut self, m: &Manifest, after_file: &mut dyn FnMut(&str)) -> Result<()> {
        while self.open.is_none() && self.next < m.files.len() {
            let index = self.next;
            self.next += 1;
            let entry = &m.files[index];
            let path = self.dest.join(&entry.path);
            if let Some(parent) = path.parent()
                && !self.made_dirs.contains(parent)
            {
                fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
                self.made_dirs.insert(parent.to_path_buf());
            }
            let out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| CoreError::io(&path, e))?;
            let file = OpenFile {
                index,
                path,
                out,
                hasher: ContentHasher::new(),
                left: entry.size,
                written: 0,
                flushed_to: 0,
            };
            if entry.size == 0 {
                Self::close(file, m, after_file)?;
            } else {
                self.open = Some(file);
            }
        }
        Ok(())
    }

    fn write(&mut self, m: &Manifest, mut data: &[u8], origin: &Path, after_file: &mut dyn FnMut(&str)) -> Result<()> {
        while !data.is_empty() {
            let Some(f) = self.open.as_mut() else {
                return Err(CoreError::package(origin, "payload has bytes the manifest does not list"));
            };
            let n = (f.left.min(data.len() as u64)) as usize;
            let (piece, rest) = data.split_at(n);
            f.hasher.update(piece);
            f.out.write_all(piece).map_err(|e| CoreError::io(&f.path, e))?;
            f.left -= n as u64;
            f.written += n as u64;
            data = rest;
            if f.written - f.flushed_to >= WRITEBACK_EVERY {
                start_writeback(&f.out, f.flushed_to, f.written - f.flushed_to);
                f.flushed_to = f.written;
            }
            if f.left == 0 {
                let f = self.open.take().expect("open");
                Self::close(f, m, after_file)?;
                self.open_next(m, after_file)?;
            }
        }
        Ok(())
    }

    /// A file is whole: checks its hash, gives it its mode, makes it durable.
    fn close(f: OpenFile, m: &Manifest, after_file: &mut dyn FnMut(&str)) -> Result<()> {
        let entry = &m.files[f.index];
        if f.hasher.finish_hex() != entry.sha256 {
            return Err(CoreError::package(&f.path, format!("{:?} does not match its sha256", entry.path)));
        }
        f.out.set_permissions(fs::Permissions::from_mode(entry.mode)).map_err(|e| CoreError::io(&f.path, e))?;
        f.out.sync_all().map_err(|e| CoreError::io(&f.path, e))?;
        after_file(&entry.path);
        Ok(())
    }

    /// The payload has ended: every file must be whole. Gives directories their modes and
    /// makes their names durable.
    fn finish(mut self, m: &Manifest, origin: &Path) -> Result<()> {
        if let Some(f) = &self.open {
            return Err(CoreError::package(origin, format!("payload ends inside {:?}", m.files[f.index].path)));
        }
        for d in &m.dirs {
            let p = self.dest.join(&d.path);
            fs::set_permissions(&p, fs::Permissions::from_mode(d.mode)).map_err(|e| CoreError::io(&p, e))?;
        }
        self.made_dirs.insert(self.dest.clone());
        for d in self.made_dirs.iter().rev() {
            sync_dir(d)?;
        }
        Ok(())
    }
}

/// Creates (or finds) the manifest's directories under `dest`; returns them.
fn make_dirs(dest: &Path, m: &Manifest) -> Result<BTreeSet<PathBuf>> {
    let mut made_dirs = BTreeSet::new();
    for d in &m.dirs {
        let p = dest.join(&d.path);
        fs::create_dir_all(&p).map_err(|e| CoreError::io(&p, e))?;
        made_dirs.insert(p);
    }
    Ok(made_dirs)
}

/// Every regular file under `dir`; anything but directories and regular files is refused.
fn files_under(dir: &Path, out: &mut BTreeSet<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| CoreError::io(dir, e))? {
        let e = e.map_err(|e| CoreError::io(dir, e))?;
        let (path, kind) = (e.path(), e.file_type().map_err(|err| CoreError::io(e.path(), err))?);
        if kind.is_dir() {
            files_under(&path, out)?;
        } else if kind.is_file() {
            out.insert(path);
        } else {
            return Err(CoreError::package(&path, "is neither a file nor a directory"));
        }
    }
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` back to disk, without
/// waiting: a hint, so its failure is ignored (the file's final sync is what counts).
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for the
    // borrow's length.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
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

    /// Feeds `bytes` to an unpacker in pieces of `piece` bytes.
    fn stream(bytes: &[u8], piece: usize, dest: &Path, key: &PublicKey) -> Result<Header> {
        let origin = dest.with_extension("part");
        let mut u = Unpacker::new(dest, &origin, |h: &Header| {
            h.accept(key, "app", "1.0.0.0").map_err(|r| CoreError::package(&origin, r))
        });
        bytes.chunks(piece).try_for_each(|c| u.feed(c, &mut |_| {}))?;
        u.finish()
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            let name = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                out.push((format!("{name}/"), vec![], mode));
                out.extend(listing(&p).into_iter().map(|(n, c, m)| (format!("{name}/{n}"), c, m)));
            } else {
                out.push((name, fs::read(&p).unwrap(), mode));
            }
        }
        out.sort();
        out
    }

    /// The sample tree with an empty file and a file of `big` bytes, built into a package in
    /// a fresh directory `out` (`out/app.pkg`, whose bytes are `bytes`) and unpacked from the
    /// file into `out/file`.
    struct Built {
        out: tempfile::TempDir,
        key: ReleaseKey,
        pkg_path: PathBuf,
        bytes: Vec<u8>,
        from_file: PathBuf,
    }

    fn built(big: usize) -> Built {
        let src = sample_dir();
        fs::write(src.path().join("empty-file"), b"").unwrap();
        fs::write(src.path().join("big"), vec![7u8; big]).unwrap();
        let out = tempfile::tempdir().unwrap();
        let key = ReleaseKey::generate().unwrap();
        let pkg_path = out.path().join("app.pkg");
        build(src.path(), &meta(), &key, &pkg_path).unwrap();
        let from_file = out.path().join("file");
        Package::open(&pkg_path).unwrap().unpack(&from_file).unwrap();
        let bytes = fs::read(&pkg_path).unwrap();
        Built { out, key, pkg_path, bytes, from_file }
    }

    #[test]
    fn unpacking_as_bytes_arrive_gives_the_same_tree_whatever_the_pieces() {
        let Built { out, key, bytes, from_file, .. } = built(3 * CHUNK + 5);
        for piece in [1, 13, 4096, CHUNK + 1, bytes.len()] {
            let dest = out.path().join(format!("streamed-{piece}"));
            let header = stream(&bytes, piece, &dest, &key.public()).unwrap();
            assert_eq!(header.manifest.product, "app");
            assert_eq!(listing(&dest), listing(&from_file), "pieces of {piece} bytes");
        }
        // Cut short anywhere, it is refused: inside the header, or with a file unfinished.
        for cut in [3, 20, bytes.len() - 1] {
            let dest = out.path().join(format!("cut-{cut}"));
            let e = stream(&bytes[..cut], 4096, &dest, &key.public()).unwrap_err().to_string();
            assert!(e.contains("truncated inside the header") || e.contains("payload ends inside"), "{cut}: {e}");
        }
        // One byte too many is refused too.
        let e = stream(&[bytes.as_slice(), b"x"].concat(), 4096, &out.path().join("long"), &key.public());
        assert!(e.unwrap_err().to_string().contains("does not list"));
        // A header the caller does not accept (another key, another product) writes nothing.
        let other = ReleaseKey::generate().unwrap().public();
        let dest = out.path().join("unsigned");
        assert!(stream(&bytes, 4096, &dest, &other).unwrap_err().to_string().contains("not signed"));
        assert!(!dest.exists(), "nothing is written before the header is accepted");
    }

    #[test]
    fn an_unpacking_cut_anywhere_resumes_to_the_same_tree_and_content_hash() {
        let Built { out, key, pkg_path, bytes, from_file: whole } = built(2 * CHUNK + 5);
        let head = Package::open(&pkg_path).unwrap().header.to_bytes();
        assert_eq!(head, bytes[..head.len()], "to_bytes gives the header back exactly");
        let accept =
            |h: &Header| h.accept(&key.public(), "app", "1.0.0.0").map_err(|r| CoreError::package(&pkg_path, r));
        let cuts = [head.len(), head.len() + 1, head.len() + 7, head.len() + CHUNK, bytes.len() - 1, bytes.len()];
        for cut in cuts {
            let dest = out.path().join(format!("cut-{cut}"));
            let mut first = Unpacker::new(&dest, &pkg_path, accept);
            first.feed(&bytes[..cut], &mut |_| {}).unwrap();
            drop(first);
            let (mut u, mut content, at) = Unpacker::resume(&dest, &pkg_path, accept, &head).unwrap();
            assert_eq!(at, cut as u64, "resumes where it stopped");
            assert_eq!(u.is_complete(), cut == bytes.len());
            content.update(&bytes[cut..]);
            u.feed(&bytes[cut..], &mut |_| {}).unwrap();
            assert!(u.is_complete());
            u.finish().unwrap();
            assert_eq!(content.finish(), crate::hash::hash_file(&pkg_path).unwrap(), "cut at {cut}");
            assert_eq!(listing(&dest), listing(&whole), "cut at {cut}");
        }
        // What is found is checked: a whole file changed, a file the package does not write
        // (or not yet), a header of another key.
        let cut = head.len() + CHUNK;
        let tampered = |name: &str, change: &dyn Fn(&Path)| {
            let dest = out.path().join(name);
            Unpacker::new(&dest, &pkg_path, accept).feed(&bytes[..cut], &mut |_| {}).unwrap();
            change(&dest);
            Unpacker::resume(&dest, &pkg_path, accept, &head).map(|_| ()).unwrap_err().to_string()
        };
        let first_file = &Package::open(&pkg_path).unwrap().manifest.files[0].path.clone();
        let e = tampered("changed", &|d| {
            let mut b = fs::read(d.join(first_file)).unwrap();
            b[0] ^= 1;
            fs::write(d.join(first_file), b).unwrap()
        });
        assert!(e.contains("does not match its sha256"), "{e}");
        let e = tampered("shortened", &|d| fs::write(d.join(first_file), b"").unwrap());
        assert!(e.contains("not the next file"), "a short file must be the last one: {e}");
        let e = tampered("extra", &|d| fs::write(d.join("stray"), b"x").unwrap());
        assert!(e.contains("not the next file"), "{e}");
        let other = ReleaseKey::generate().unwrap().public();
        let dest = out.path().join("cut-other-key");
        Unpacker::new(&dest, &pkg_path, accept).feed(&bytes[..cut], &mut |_| {}).unwrap();
        let refuse = |h: &Header| h.accept(&other, "app", "1.0.0.0").map_err(|r| CoreError::package(&pkg_path, r));
        assert!(Unpacker::resume(&dest, &pkg_path, refuse, &head).is_err());
        assert!(Unpacker::resume(&dest, &pkg_path, accept, &head[..head.len() - 1]).is_err(), "a torn header");
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
