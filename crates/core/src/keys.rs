//! Ed25519 release keys: generation, the on-disk key files, signing and verification.
//!
//! Files are one line of hex each: `PREFIX.key` holds the 32-byte secret seed (mode 0600),
//! `PREFIX.pub` the 32-byte public key. A key id is the first 16 hex digits of the SHA-256 of
//! the public key; it names the key in manifests and listings without revealing anything.
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::error::{CoreError, Result};
use crate::hash::sha256_hex;

/// Prefixed to every signed message so a signature over a manifest can never be replayed as a
/// signature over anything else Updraft signs later.
const MANIFEST_DOMAIN: &[u8] = b"updraft-manifest-v1\0";
/// Catalog statements are signed under their own domain, so a signature over one can never
/// pass for a signature over the other.
const CATALOG_DOMAIN: &[u8] = b"updraft-catalog-v1\0";
/// The CA bundle handed out with certificates, signed by the catalog key.
const CA_BUNDLE_DOMAIN: &[u8] = b"updraft-ca-bundle-v1\0";

pub struct ReleaseKey {
    signing: SigningKey,
}

impl std::fmt::Debug for ReleaseKey {
    /// Never the secret: only which key it is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReleaseKey({})", self.public().key_id())
    }
}

impl ReleaseKey {
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| CoreError::Signature(format!("no randomness: {e}")))?;
        Ok(Self { signing: SigningKey::from_bytes(&seed) })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    /// Writes `PREFIX.key` (0600, refusing to overwrite) and `PREFIX.pub`.
    pub fn save(&self, prefix: &Path) -> Result<(PathBuf, PathBuf)> {
        let key_path = with_suffix(prefix, "key");
        let pub_path = with_suffix(prefix, "pub");
        for p in [&key_path, &pub_path] {
            if p.exists() {
                return Err(CoreError::Key { path: p.clone(), reason: "already exists; refusing to overwrite".into() });
            }
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(|e| CoreError::io(&key_path, e))?;
        writeln!(f, "{}", hex::encode(self.signing.to_bytes()))
            .and_then(|_| f.sync_all())
            .map_err(|e| CoreError::io(&key_path, e))?;
        fs::write(&pub_path, format!("{}\n", hex::encode(self.public().0.to_bytes())))
            .map_err(|e| CoreError::io(&pub_path, e))?;
        Ok((key_path, pub_path))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = read_hex32(path)?;
        Ok(Self { signing: SigningKey::from_bytes(&bytes) })
    }

    pub fn sign_manifest(&self, manifest: &[u8]) -> [u8; 64] {
        self.sign_in(MANIFEST_DOMAIN, manifest)
    }

    pub fn sign_statement(&self, body: &[u8]) -> [u8; 64] {
        self.sign_in(CATALOG_DOMAIN, body)
    }

    /// The centre's word for the CA bundle it hands out with certificates (its catalog key).
    pub fn sign_ca_bundle(&self, bundle: &[u8]) -> [u8; 64] {
        self.sign_in(CA_BUNDLE_DOMAIN, bundle)
    }

    fn sign_in(&self, domain: &[u8], body: &[u8]) -> [u8; 64] {
        let mut msg = domain.to_vec();
        msg.extend_from_slice(body);
        self.signing.sign(&msg).to_bytes()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = read_hex32(path)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|e| CoreError::Key { path: path.into(), reason: format!("not an ed25519 public key: {e}") })
    }

    pub fn key_id(&self) -> String {
        sha256_hex(self.0.as_bytes())[..16].to_string()
    }

    pub fn verify_statement(&self, body: &[u8], signature: &[u8]) -> Result<()> {
        self.verify_in(CATALOG_DOMAIN, body, signature, "catalog statement is not signed by the pinned catalog key")
    }

    /// Whether the CA bundle was signed by this (catalog) key.
    pub fn verify_ca_bundle(&self, bundle: &[u8], signature: &[u8]) -> Result<()> {
        self.verify_in(CA_BUNDLE_DOMAIN, bundle, signature, "the CA bundle is not signed by the pinned catalog key")
    }

    pub fn verify_manifest(&self, manifest: &[u8], signature: &[u8]) -> Result<()> {
        self.verify_in(MANIFEST_DOMAIN, manifest, signature, "manifest is not signed by the trusted release key")
    }

    /// The counterpart of `ReleaseKey::sign_in`: `refused` names what failed (the key id follows).
    fn verify_in(&self, domain: &[u8], body: &[u8], signature: &[u8], refused: &str) -> Result<()> {
        let sig: [u8; 64] = signature
            .try_into()
            .map_err(|_| CoreError::Signature(format!("signature is {} bytes, expected 64", signature.len())))?;
        let mut msg = domain.to_vec();
        msg.extend_from_slice(body);
        self.0
            .verify_strict(&msg, &Signature::from_bytes(&sig))
            .map_err(|_| CoreError::Signature(format!("{refused} {}", self.key_id())))
    }
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn read_hex32(path: &Path) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    let raw =
        hex::decode(text.trim()).map_err(|e| CoreError::Key { path: path.into(), reason: format!("not hex: {e}") })?;
    raw.try_into()
        .map_err(|v: Vec<u8>| CoreError::Key { path: path.into(), reason: format!("{} bytes, expected 32", v.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_save_load_sign_verify() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("release");
        let key = ReleaseKey::generate().unwrap();
        let (kp, pp) = key.save(&prefix).unwrap();
        assert_eq!(fs::metadata(&kp).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(key.save(&prefix).is_err(), "must not overwrite");
        let key2 = ReleaseKey::load(&kp).unwrap();
        let public = PublicKey::load(&pp).unwrap();
        let sig = key2.sign_manifest(b"hello");
        public.verify_manifest(b"hello", &sig).unwrap();
        assert!(public.verify_manifest(b"hellO", &sig).is_err());
        let other = ReleaseKey::generate().unwrap().public();
        assert!(other.verify_manifest(b"hello", &sig).unwrap_err().to_string().contains(&other.key_id()));
    }
}
