//! The agent's configuration file (TOML). Every setting can also come from a flag or an
//! environment variable; those win over the file, and the file wins over the defaults.
//!
//! ```toml
//! providers = ["http://branch-1:8093", "http://centre:8092"]
//! install_root = "/opt/apps"
//! trust_key = "/etc/updraft/release.pub"
//! name = "pc-17"
//! min_interval = 1800      # seconds
//! max_interval = 3600
//! request_timeout = 60     # seconds, at most 600
//! max_message_bytes = 4194304
//! discover = true          # find providers on the local network (mDNS)
//! discovery_key = "Production"
//! role = "workstation"     # or server, site (the server version ceiling; admin-cli machine role overrides)
//! tls_ca = "/etc/updraft/ca.crt"       # mutual TLS (admin-cli pki issue --role agent NAME)
//! tls_cert = "/etc/updraft/agent.crt"
//! tls_key = "/etc/updraft/agent.key"
//! ```
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{AgentError, Result};

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub providers: Option<Vec<String>>,
    pub install_root: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub trust_key: Option<PathBuf>,
    pub name: Option<String>,
    pub min_interval: Option<u64>,
    pub max_interval: Option<u64>,
    pub request_timeout: Option<u64>,
    pub max_message_bytes: Option<usize>,
    pub download_cache_bytes: Option<u64>,
    pub discover: Option<bool>,
    pub discovery_key: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub catalog_keys: Option<Vec<PathBuf>>,
    /// Act on answers no pinned catalog key vouches for (tests only).
    pub allow_unsigned_catalog: Option<bool>,
    pub disk_reserve_bytes: Option<u64>,
    pub role: Option<String>,
    /// Plain-HTTP address for `/healthz` and `/readyz` (`--metrics-listen`).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::io(path, e))?;
        toml::from_str(&text).map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
    }
}

/// Check-interval bounds from the settings, if any were given: both, or one used for both.
pub fn interval(min: Option<u64>, max: Option<u64>) -> Result<Option<(Duration, Duration)>> {
    match (min, max) {
        (None, None) => Ok(None),
        (min, max) => {
            let min = min.or(max).unwrap_or(1);
            let max = max.unwrap_or(min);
            if min == 0 || max < min {
                return Err(AgentError::Config(format!(
                    "check interval: minimum {min} s must be at least 1 and not above the maximum {max} s"
                )));
            }
            Ok(Some((Duration::from_secs(min), Duration::from_secs(max))))
        }
    }
}

/// The request timeout: one minute by default, at most ten.
pub fn request_timeout(secs: Option<u64>) -> Result<Duration> {
    let secs = secs.unwrap_or(60);
    if !(1..=600).contains(&secs) {
        return Err(AgentError::Config(format!("request timeout must be between 1 and 600 seconds, got {secs}")));
    }
    Ok(Duration::from_secs(secs))
}

/// The download cache limit: 8 GiB by default, at least 1 MiB.
pub fn download_cache_bytes(n: Option<u64>) -> Result<u64> {
    let n = n.unwrap_or(8 << 30);
    if n < (1 << 20) {
        return Err(AgentError::Config(format!("download cache limit must be at least 1 MiB, got {n} bytes")));
    }
    Ok(n)
}

/// The discovery key to browse for: None unless discovery is asked for (a key implies it).
pub fn discovery_key(discover: bool, key: Option<String>) -> Result<Option<String>> {
    if !discover && key.is_none() {
        return Ok(None);
    }
    let key = key.unwrap_or_else(|| "Production".into());
    if key.is_empty() || key.len() > 64 || !key.bytes().all(|b| b.is_ascii_graphic() && b != b'=') {
        return Err(AgentError::Config(format!(
            "discovery key {key:?} must be 1-64 printable characters, no spaces or '='"
        )));
    }
    Ok(Some(key))
}

/// The largest message accepted from a provider: 4 MiB by default, between 1 MiB and 64 MiB.
pub fn max_message_bytes(n: Option<usize>) -> Result<usize> {
    let n = n.unwrap_or(crate::client::MAX_MESSAGE_BYTES);
    if !((1 << 20)..=(64 << 20)).contains(&n) {
        return Err(AgentError::Config(format!("max message size must be between 1 MiB and 64 MiB, got {n} bytes")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_parses_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "providers = [\"http://a:1\"]\nmin_interval = 10\n").unwrap();
        let c = FileConfig::load(&p).unwrap();
        assert_eq!(c.providers.unwrap(), vec!["http://a:1".to_string()]);
        assert_eq!(c.min_interval, Some(10));
        std::fs::write(&p, "providres = []\n").unwrap();
        assert!(FileConfig::load(&p).unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn limits() {
        assert_eq!(interval(Some(5), None).unwrap(), Some((Duration::from_secs(5), Duration::from_secs(5))));
        assert!(interval(Some(10), Some(5)).is_err());
        assert!(request_timeout(Some(601)).is_err());
        assert_eq!(request_timeout(None).unwrap(), Duration::from_secs(60));
        assert!(max_message_bytes(Some(10)).is_err());
    }
}
