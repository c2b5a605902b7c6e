//! The provider-servers half of the admin API: the switchover pair's status, the peer
//! providers that groups assign machines to, and the discovery setting. Changes are validated
//! whole first, replicated to sites through the change log, and logged with who made them.
use updraft_proto::v1::{Discovery, ListPeersResponse, PairReply, Peer};

use super::Ops;
use crate::decided::Decided;
use crate::error::{ProviderError, Result};
use crate::import::record_catalog_activity;

/// The key agents accept when none is configured, as in the seed product.
pub const DEFAULT_DISCOVERY_KEY: &str = "Production";

fn bad(msg: String) -> ProviderError {
    ProviderError::InvalidArgument(msg)
}

/// Peer names are referenced from groups and shown everywhere: short and plain.
pub fn validate_peer(p: &Peer) -> Result<()> {
    let plain = |s: &str, extra: &[u8]| {
        s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') || extra.contains(&b))
    };
    if p.name.is_empty() || p.name.len() > 64 || !plain(&p.name, &[]) {
        return Err(bad(format!("provider name {:?} must be 1-64 of A-Z a-z 0-9 . _ -", p.name)));
    }
    if p.address.is_empty() || p.address.len() > 253 || !plain(&p.address, b":[]") {
        return Err(bad(format!(
            "provider {}: address {:?} must be a host name or IP address (no scheme, no path)",
            p.name, p.address
        )));
    }
    if !(1..=65535).contains(&p.port) {
        return Err(bad(format!("provider {}: port {} must be 1-65535", p.name, p.port)));
    }
    if !p.path.is_empty() && (!p.path.starts_with('/') || p.path.len() > 200 || !plain(&p.path, b"/~")) {
        return Err(bad(format!(
            "provider {}: path {:?} must start with / and hold only A-Z a-z 0-9 / . _ - ~",
            p.name, p.path
        )));
    }
    let url = peer_url(p);
    url.parse::<tonic::codegen::http::Uri>()
        .map_err(|e| bad(format!("provider {}: {url} is not a URL: {e}", p.name)))?;
    Ok(())
}

/// The URL agents use for a peer.
pub fn peer_url(p: &Peer) -> String {
    let scheme = if p.tls { "https" } else { "http" };
    let host = if p.address.contains(':') && !p.address.starts_with('[') {
        format!("[{}]", p.address)
    } else {
        p.address.clone()
    };
    format!("{scheme}://{host}:{}{}", p.port, p.path.trim_end_matches('/'))
}

/// A group's provider entry as agents get it: a peer's name becomes its URL; a URL stays.
/// Names of peers that no longer exist are dropped.
pub fn resolve_providers(decided: &Decided, entries: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for e in entries {
        if e.contains("://") {
            out.push(e.clone());
        } else if let Some(p) = decided.peer(e) {
            out.push(peer_url(p));
        }
    }
    out
}

/// Discovery keys travel in mDNS TXT records and agent configs: printable, no spaces.
pub fn validate_discovery_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 64 || !key.bytes().all(|b| b.is_ascii_graphic() && b != b'=') {
        return Err(bad(format!("discovery key {key:?} must be 1-64 printable characters, no spaces or '='")));
    }
    Ok(())
}

impl Ops {
    pub fn get_pair(&self) -> Result<PairReply> {
        if !self.shared.store.is_shared() {
            return self.shared.pair.report();
        }
        // On a database server every provider is active; one silent for a while is gone.
        let gone_before = crate::now_ms() - crate::content::GONE_AFTER.as_millis() as i64;
        let mut members = self.shared.store.list_members()?;
        for m in &mut members {
            if m.last_seen_unix_ms < gone_before {
                m.role = "gone".into();
            }
        }
        Ok(PairReply { epoch: 0, active: self.shared.config.name.clone(), members })
    }

    pub fn get_discovery(&self) -> Result<Discovery> {
        self.shared.store.discovery()
    }

    pub fn list_peers(&self) -> Result<ListPeersResponse> {
        Ok(ListPeersResponse { peers: self.shared.store.list_peers()? })
    }

    pub async fn put_peer(&self, who: &str, peer: Peer) -> Result<ListPeersResponse> {
        validate_peer(&peer)?;
        let store = &self.shared.store;
        let existed = store.get_peer(&peer.name)?.is_some();
        store.put_peer(&peer).await?;
        let what =
            format!("provider {} {} at {}", peer.name, if existed { "changed" } else { "added" }, peer_url(&peer));
        record_catalog_activity(&self.shared, who, None, what).await?;
        self.list_peers()
    }

    pub async fn remove_peer(&self, who: &str, name: String) -> Result<ListPeersResponse> {
        let store = &self.shared.store;
        if store.get_peer(&name)?.is_none() {
            return Err(bad(format!("unknown provider {name:?} (see `admin-cli provider list`)")));
        }
        let users: Vec<String> = store
            .list_groups()?
            .into_iter()
            .filter(|g| g.settings.as_ref().is_some_and(|s| s.providers.contains(&name)))
            .map(|g| g.name)
            .collect();
        if !users.is_empty() {
            return Err(bad(format!(
                "provider {name} is assigned to group(s) {}; change their --providers first",
                users.join(", ")
            )));
        }
        store.remove_peer(&name).await?;
        record_catalog_activity(&self.shared, who, None, format!("provider {name} removed")).await?;
        self.list_peers()
    }

    pub async fn set_discovery(&self, who: &str, mut d: Discovery) -> Result<Discovery> {
        if d.enabled {
            if d.key.is_empty() {
                d.key = DEFAULT_DISCOVERY_KEY.into();
            }
            validate_discovery_key(&d.key)?;
        } else {
            // Keep the key, so turning discovery on again without one reuses it.
            d.key = self.shared.store.discovery()?.key;
        }
        self.shared.store.set_discovery(&d).await?;
        let what = if d.enabled { format!("discovery on, key {}", d.key) } else { "discovery off".into() };
        record_catalog_activity(&self.shared, who, None, what).await?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, address: &str, port: u32, path: &str) -> Peer {
        Peer { name: name.into(), address: address.into(), port, tls: false, path: path.into() }
    }

    #[test]
    fn peers_are_checked_whole() {
        validate_peer(&peer("centre-b", "10.0.0.2", 8092, "")).unwrap();
        validate_peer(&peer("proxy", "gw.example.org", 443, "/updraft")).unwrap();
        for (p, what) in [
            (peer("", "h", 1, ""), "name"),
            (peer("a/b", "h", 1, ""), "name"),
            (peer("a", "http://h", 1, ""), "address"),
            (peer("a", "h", 0, ""), "port"),
            (peer("a", "h", 70000, ""), "port"),
            (peer("a", "h", 1, "nope"), "path"),
            (peer("a", "h", 1, "/a b"), "path"),
        ] {
            let e = validate_peer(&p).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
        assert_eq!(peer_url(&peer("p", "gw", 443, "/updraft/")), "http://gw:443/updraft");
        assert_eq!(peer_url(&peer("p", "::1", 8092, "")), "http://[::1]:8092");
    }

    #[test]
    fn discovery_keys() {
        validate_discovery_key("Production").unwrap();
        assert!(validate_discovery_key("a b").is_err());
        assert!(validate_discovery_key("").is_err());
        assert!(validate_discovery_key("k=v").is_err());
    }
}
