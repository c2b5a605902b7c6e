//! Connection limits: at most so many open connections per peer address, so one machine (or
//! one misbehaving site) cannot take every socket a provider has. Beyond the limit a new
//! connection is closed at once and the refusal logged; the peer sees the connection reset.
use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::net::TcpListener;

/// The limits every server (provider and site) takes on its command line.
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Open connections allowed from one peer address (agents behind one NAT share one).
    #[arg(long, env = "UPDRAFT_MAX_CONNECTIONS_PER_PEER", default_value_t = 256)]
    pub max_connections_per_peer: usize,
    /// Longest a request may take to be answered, seconds (uploads excepted).
    #[arg(long, env = "UPDRAFT_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,
    /// Disk space always left free under the store; uploads and fetches that would eat into it
    /// are refused.
    #[arg(long, env = "UPDRAFT_DISK_RESERVE_BYTES", default_value_t = 1 << 30)]
    pub disk_reserve_bytes: u64,
    /// Downloads served to agents at once; more wait their turn (up to half the request
    /// timeout), then are told to retry. Bounds memory and file handles in a herd.
    #[arg(long, env = "UPDRAFT_MAX_DOWNLOADS", default_value_t = 256)]
    pub max_downloads: usize,
    /// Machines one site may bring in; reports for more are refused (a stolen site
    /// certificate cannot flood the fleet with ghosts).
    #[arg(long, env = "UPDRAFT_MAX_MACHINES_PER_SITE", default_value_t = 50_000)]
    pub max_machines_per_site: usize,
    /// Every this many seconds each stored blob is read back and re-hashed; one that lost its
    /// hash is quarantined (0: never; agents' failed downloads still trigger a scrub).
    #[arg(long, env = "UPDRAFT_SCRUB_INTERVAL_SECS", default_value_t = 86_400)]
    pub scrub_interval_secs: u64,
    /// On SIGTERM: push streams are ended at once (agents reconnect elsewhere), requests in
    /// flight get this many seconds to finish, then the process lets go of its store and exits.
    #[arg(long, env = "UPDRAFT_SHUTDOWN_GRACE_SECS", default_value_t = 2.0)]
    pub shutdown_grace_secs: f64,
}

impl LimitArgs {
    /// Checks the values and puts them in the server's configuration.
    pub fn apply(&self, config: &mut crate::Config) -> crate::error::Result<()> {
        if self.max_connections_per_peer == 0
            || self.max_downloads == 0
            || !(1..=3600).contains(&self.request_timeout_secs)
        {
            return Err(crate::error::ProviderError::InvalidArgument(
                "--max-connections-per-peer and --max-downloads must be at least 1 and --request-timeout-secs 1 to 3600"
                    .into(),
            ));
        }
        config.max_connections_per_peer = self.max_connections_per_peer;
        config.request_timeout = Duration::from_secs(self.request_timeout_secs);
        config.disk_reserve_bytes = self.disk_reserve_bytes;
        config.max_downloads = self.max_downloads;
        config.max_machines_per_site = self.max_machines_per_site;
        config.scrub_interval = Duration::from_secs(self.scrub_interval_secs);
        if !(0.0..=600.0).contains(&self.shutdown_grace_secs) {
            return Err(crate::error::ProviderError::InvalidArgument(format!(
                "--shutdown-grace-secs {}: must be 0 to 600",
                self.shutdown_grace_secs
            )));
        }
        config.shutdown_grace = Duration::from_secs_f64(self.shutdown_grace_secs);
        Ok(())
    }
}

/// Things held per key (connections per address, a machine's open downloads), each key
/// bounded on its own.
pub struct PerKey<K> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K> Default for PerKey<K> {
    fn default() -> Self {
        Self { counts: Arc::default() }
    }
}

impl<K: Hash + Eq + Clone> PerKey<K> {
    /// One more for `key`, unless it already holds `max`; released when the guard drops.
    pub fn try_take(&self, key: &K, max: usize) -> Option<KeyGuard<K>> {
        let mut c = self.counts.lock().expect("per-key counts");
        let n = c.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(KeyGuard { counts: self.counts.clone(), key: key.clone() })
    }
}

/// One of a key's holdings (see [`PerKey`]).
pub struct KeyGuard<K: Hash + Eq> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Hash + Eq> Drop for KeyGuard<K> {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("per-key counts");
        if let Some(n) = c.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.key);
            }
        }
    }
}

/// An accepted connection, counted against its peer's address until dropped.
pub type Limited = updraft_runtime::held::Held<KeyGuard<IpAddr>>;

/// The connections `listener` accepts, at most `per_peer` open at once from one address.
pub fn incoming(listener: TcpListener, per_peer: usize) -> impl Stream<Item = io::Result<Limited>> {
    let counts: PerKey<IpAddr> = PerKey::default();
    futures::stream::unfold((listener, counts), move |(listener, counts)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    let ip = addr.ip();
                    let Some(slot) = counts.try_take(&ip, per_peer) else {
                        tracing::warn!(peer = %ip, limit = per_peer, "refused a connection: too many open from this peer");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(Limited::new(stream, slot)), (listener, counts)));
                }
                Err(e) => {
                    // Out of descriptors and the like: keep serving the connections there are.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}
