//! The malicious-package corpus: hand-crafted packages that try to escape their folder, smuggle
//! special files or privileges, lie about sizes, or break the signature. Each goes through the
//! same path as an agent's install (open, verify against the pinned key, unpack into a fresh
//! staging directory) and must be refused, with nothing written outside the staging directory.
use std::fs;
use std::path::Path;

use serde_json::{Value, json};

use crate::hash::sha256_hex;
use crate::keys::ReleaseKey;
use crate::package::{Header, MAGIC, MAX_MANIFEST, Package, Unpacker};

/// Writes a package from raw parts: any manifest JSON (valid or not), any payload, a signature
/// made by `key` over the manifest bytes (or garbage when `key` is None).
fn craft(path: &Path, manifest: &[u8], payload: &[u8], key: Option<&ReleaseKey>) {
    let sig = key.map(|k| k.sign_manifest(manifest)).unwrap_or([7u8; 64]);
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    bytes.extend_from_slice(manifest);
    bytes.extend_from_slice(&64u16.to_le_bytes());
    bytes.extend_from_slice(&sig);
    bytes.extend_from_slice(payload);
    fs::write(path, bytes).unwrap();
}

fn file(path: &str, content: &[u8]) -> Value {
    json!({"path": path, "mode": 0o644, "size": content.len(), "sha256": sha256_hex(content)})
}

fn manifest(files: Vec<Value>) -> Value {
    json!({"format": 1, "product": "app", "version": "1.0.0.0", "key_id": "", "files": files})
}

/// Runs the agent's install path; returns the refusal, and checks nothing escaped.
fn attempt(case: &str, build: impl FnOnce(&Path, &ReleaseKey)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    let root = outside.join("root");
    fs::create_dir_all(&root).unwrap();
    let key = ReleaseKey::generate().unwrap();
    let pkg_path = tmp.path().join("evil.pkg");
    build(&pkg_path, &key);
    let staging = root.join("app_update_pending");
    let result = Package::open(&pkg_path).and_then(|p| {
        p.verify(&key.public())?;
        p.unpack(&staging)
    });
    let err = match result {
        Ok(()) => panic!("{case}: the package was accepted"),
        Err(e) => e.to_string(),
    };
    // The same bytes unpacked as they would arrive over the network, a few at a time, into a
    // staging directory of their own: refused too.
    let streamed = root.join("app_streamed_pending");
    let bytes = fs::read(&pkg_path).unwrap();
    let public = key.public();
    let mut unpacker = Unpacker::new(&streamed, &pkg_path, |h: &Header| {
        h.accept(&public, "app", "1.0.0.0").map_err(|r| crate::error::CoreError::package(&pkg_path, r))
    });
    let fed = bytes.chunks(7).try_for_each(|c| unpacker.feed(c, &mut |_| {}));
    if let Ok(header) = fed.and_then(|_| unpacker.finish()) {
        panic!("{case}: the streamed package was accepted: {:?}", header.manifest.files);
    }
    // Nothing may exist outside the staging directory (which the caller discards).
    let mut found = Vec::new();
    for entry in walk(&outside) {
        if !entry.starts_with(&staging) && !entry.starts_with(&streamed) && entry != root {
            found.push(entry.display().to_string());
        }
    }
    assert!(found.is_empty(), "{case}: wrote outside staging: {found:?}");
    err
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if fs::symlink_metadata(&p).map(|m| m.is_dir()).unwrap_or(false) {
                out.extend(walk(&p));
            }
        }
    }
    out
}

fn signed(files: Vec<Value>, payload: &[u8]) -> impl FnOnce(&Path, &ReleaseKey) + use<> {
    let m = serde_json::to_vec(&manifest(files)).unwrap();
    let payload = payload.to_vec();
    move |p, k| craft(p, &m, &payload, Some(k))
}

/// Writes one crafted package.
type Builder = Box<dyn FnOnce(&Path, &ReleaseKey)>;

#[test]
fn every_malicious_package_is_refused_before_anything_escapes() {
    let ok = b"payload".as_slice();
    let cases: Vec<(&str, Builder, &str)> = vec![
        ("dot-dot path", Box::new(signed(vec![file("../escaped", ok)], ok)), "escapes its folder"),
        ("dot-dot inside a path", Box::new(signed(vec![file("a/../../escaped", ok)], ok)), "escapes its folder"),
        ("absolute path", Box::new(signed(vec![file("/tmp/escaped", ok)], ok)), "is absolute"),
        ("dot component", Box::new(signed(vec![file("./a", ok)], ok)), "escapes its folder"),
        ("empty component", Box::new(signed(vec![file("a//b", ok)], ok)), "empty component"),
        ("backslash path", Box::new(signed(vec![file("..\\escaped", ok)], ok)), "backslash"),
        ("NUL in path", Box::new(signed(vec![file("a\u{0}b", ok)], ok)), "NUL"),
        (
            "symlink by mode",
            Box::new(signed(
                vec![json!({"path": "link", "mode": 0o120777, "size": ok.len(), "sha256": sha256_hex(ok)})],
                ok,
            )),
            "file-type bits",
        ),
        (
            "device file by mode",
            Box::new(signed(
                vec![json!({"path": "dev", "mode": 0o020644, "size": ok.len(), "sha256": sha256_hex(ok)})],
                ok,
            )),
            "file-type bits",
        ),
        (
            "setuid bit",
            Box::new(signed(
                vec![json!({"path": "su", "mode": 0o4755, "size": ok.len(), "sha256": sha256_hex(ok)})],
                ok,
            )),
            "setuid",
        ),
        (
            "setgid directory",
            Box::new({
                let m = serde_json::to_vec(&json!({"format": 1, "product": "app", "version": "1.0.0.0", "key_id": "", "dirs": [{"path": "d", "mode": 0o2755}], "files": []})).unwrap();
                move |p: &Path, k: &ReleaseKey| craft(p, &m, b"", Some(k))
            }),
            "setgid",
        ),
        ("duplicate entries", Box::new(signed(vec![file("a", ok), file("a", ok)], &[ok, ok].concat())), "listed twice"),
        (
            "file used as a directory",
            Box::new(signed(vec![file("a", ok), file("a/b", ok)], &[ok, ok].concat())),
            "inside it",
        ),
        (
            "bytes not in the manifest",
            Box::new(signed(vec![file("a", ok)], &[ok, b"smuggled"].concat())),
            "size mismatch",
        ),
        ("manifest names a missing file", Box::new(signed(vec![file("a", ok), file("b", ok)], ok)), "size mismatch"),
        (
            "sizes that lie",
            Box::new(signed(
                vec![
                    json!({"path": "a", "mode": 0o644, "size": 3, "sha256": sha256_hex(ok)}),
                    json!({"path": "b", "mode": 0o644, "size": 4, "sha256": sha256_hex(b"")}),
                ],
                ok,
            )),
            "does not match its sha256",
        ),
        (
            "content swapped after signing",
            Box::new(signed(vec![file("a", ok)], b"PAYLOAD")),
            "does not match its sha256",
        ),
        (
            "oversized manifest",
            Box::new(|p: &Path, _k: &ReleaseKey| {
                let mut bytes = MAGIC.to_vec();
                bytes.extend_from_slice(&(MAX_MANIFEST + 1).to_le_bytes());
                bytes.extend_from_slice(&[b' '; 64]);
                fs::write(p, bytes).unwrap();
            }),
            "at most",
        ),
        (
            "too many entries",
            Box::new({
                let files: Vec<Value> = (0..100_001).map(|i| file(&format!("f{i}"), b"")).collect();
                signed(files, b"")
            }),
            "at most 100000",
        ),
        (
            "unknown manifest field",
            Box::new({
                let mut m = manifest(vec![file("a", ok)]);
                m["run_as_root"] = json!(true);
                let m = serde_json::to_vec(&m).unwrap();
                move |p: &Path, k: &ReleaseKey| craft(p, &m, ok, Some(k))
            }),
            "unknown field",
        ),
        (
            "product name that escapes",
            Box::new({
                let mut m = manifest(vec![file("a", ok)]);
                m["product"] = json!("../etc");
                let m = serde_json::to_vec(&m).unwrap();
                move |p: &Path, k: &ReleaseKey| craft(p, &m, ok, Some(k))
            }),
            "product name",
        ),
        (
            "signed by another key",
            Box::new({
                let m = serde_json::to_vec(&manifest(vec![file("a", ok)])).unwrap();
                move |p: &Path, _k: &ReleaseKey| craft(p, &m, ok, Some(&ReleaseKey::generate().unwrap()))
            }),
            "not signed by the trusted release key",
        ),
        (
            "manifest edited after signing",
            Box::new({
                let m = serde_json::to_vec(&manifest(vec![file("a", ok)])).unwrap();
                move |p: &Path, k: &ReleaseKey| {
                    craft(p, &m, ok, Some(k));
                    let mut bytes = fs::read(p).unwrap();
                    let at = bytes.windows(7).position(|w| w == b"1.0.0.0").unwrap();
                    bytes[at] = b'9'; // same length, still valid JSON, now "9.0.0.0"
                    fs::write(p, bytes).unwrap();
                }
            }),
            "not signed by the trusted release key",
        ),
        (
            "unsigned (garbage signature)",
            Box::new({
                let m = serde_json::to_vec(&manifest(vec![file("a", ok)])).unwrap();
                move |p: &Path, _k: &ReleaseKey| craft(p, &m, ok, None)
            }),
            "not signed by the trusted release key",
        ),
        (
            "not a package at all",
            Box::new(|p: &Path, _k: &ReleaseKey| fs::write(p, b"#!/bin/sh\nrm -rf /\n").unwrap()),
            "bad magic",
        ),
    ];
    let count = cases.len();
    assert!(count >= 15);
    for (case, build, expected) in cases {
        let err = attempt(case, build);
        assert!(err.contains(expected), "{case}: expected {expected:?} in {err:?}");
    }
    eprintln!("{count} malicious packages refused");
}
