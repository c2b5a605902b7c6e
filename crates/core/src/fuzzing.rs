//! Entry points for fuzzing the core's parsers of outside input. Each takes arbitrary bytes
//! and must return — an error is the expected outcome — without panicking, hanging or
//! allocating without bound. The cargo-fuzz targets in `fuzz/` call these, and the test suite
//! replays every saved corpus file through them (`fuzz_corpus` tests).
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::freshness;
use crate::keys::ReleaseKey;
use crate::package::{Header, Manifest, Package, Unpacker};
use crate::version::Version;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("updraft-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch directory");
        d
    })
}

/// A package file: header, manifest, signature check, and unpacking into a fresh directory,
/// from the file and as a stream.
pub fn package(data: &[u8]) {
    let dir = scratch();
    let file = dir.join("input.pkg");
    let mut f = std::fs::File::create(&file).expect("scratch file");
    f.write_all(data).expect("scratch write");
    drop(f);
    if let Ok(p) = Package::open(&file) {
        let key = ReleaseKey::generate().expect("key").public();
        let _ = p.verify(&key);
        let dest = dir.join("unpacked");
        let _ = std::fs::remove_dir_all(&dest);
        let _ = p.unpack(&dest);
        let _ = std::fs::remove_dir_all(&dest);
    }
    // The same bytes as a download hands them to the unpacker, a header accepted unsigned so
    // the payload writer is reached too.
    let dest = dir.join("streamed");
    let _ = std::fs::remove_dir_all(&dest);
    let mut u = Unpacker::new(&dest, &file, |_: &Header| Ok(()));
    if data.chunks(61).try_for_each(|c| u.feed(c, &mut |_| {})).is_ok() {
        let _ = u.finish();
    }
    let _ = std::fs::remove_dir_all(&dest);
}

/// A manifest (JSON) and its validation.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        let _ = m.validate();
        let _ = m.payload_size();
    }
}

/// A version string.
pub fn version(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(v) = s.parse::<Version>()
    {
        assert_eq!(v.to_string().parse::<Version>().ok(), Some(v), "a version must round-trip");
    }
}

/// A signed catalog statement as an agent receives it (body, then a 64-byte signature).
pub fn statement(data: &[u8]) {
    let (body, sig) = data.split_at(data.len().saturating_sub(64));
    let _ = freshness::claimed_version(body);
    static KEY: OnceLock<ReleaseKey> = OnceLock::new();
    let key = KEY.get_or_init(|| ReleaseKey::generate().expect("key")).public();
    let _ = freshness::verify(&[key], body, sig, 0, 0);
}

/// A fuzz target: its name (the corpus directory) and entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target by name, for the corpus replay.
pub const TARGETS: [Target; 4] =
    [("package", package), ("manifest", manifest), ("version", version), ("statement", statement)];

/// Runs every file of `fuzz/corpus/<target>/` through its entry point.
pub fn replay(targets: &[Target]) -> Vec<(String, usize)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    targets
        .iter()
        .map(|(name, run)| {
            let dir = root.join(name);
            let mut n = 0;
            for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
                let data = std::fs::read(e.path()).expect("corpus file");
                run(&data);
                n += 1;
            }
            (name.to_string(), n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// The saved corpora (seeds, and whatever `fuzz/run.sh` found worth keeping) replayed as an
    /// ordinary test, so a fixed crash stays fixed.
    #[test]
    fn fuzz_corpus() {
        for (target, n) in super::replay(&super::TARGETS) {
            assert!(n > 0, "fuzz/corpus/{target} is empty");
            eprintln!("fuzz corpus {target}: {n} inputs replayed");
        }
    }
}
