//! The domain error type: every failure names what was wrong and where.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("malformed version {input:?}: {reason} (expected MM.mm.PP.BB, four numbers)")]
    Version { input: String, reason: String },
    #[error("unknown {what} {input:?}; expected one of: {expected}")]
    UnknownName { what: &'static str, input: String, expected: &'static str },
    #[error("invalid {what} {input:?}: {reason}")]
    Invalid { what: &'static str, input: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("package {path}: {reason}")]
    Package { path: PathBuf, reason: String },
    #[error("package manifest: {0}")]
    Manifest(String),
    #[error("signature check failed: {0}")]
    Signature(String),
    #[error("catalog statement refused: {0}")]
    Freshness(String),
}

impl CoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io { path: path.into(), source }
    }
    pub fn package(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        CoreError::Package { path: path.into(), reason: reason.into() }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
