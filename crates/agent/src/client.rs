//! Talking to providers: the list the agent knows (assigned, discovered, configured) with
//! fallback, stickiness and backoff; bounded unary calls; and resumable downloads that verify
//! size and hash before anything uses the file.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::{BlobRequest, Update};
use updraft_runtime::TracedChannel;
use updraft_runtime::tls::Transport;

use crate::error::{AgentError, Result};

pub type Client = AgentApiClient<TracedChannel>;

/// Largest message the agent accepts from a provider, unless configured otherwise.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Where the agent learned of a provider; also the order it tries them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The machine's group names it (from the last check).
    Assigned,
    /// Announced on mDNS with this machine's discovery key.
    Discovered,
    /// The agent's own flags or config file.
    Configured,
}

/// One provider the agent knows of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub name: String,
    pub url: String,
    pub source: Source,
    /// For discovered providers: `local` or `remote`, and the site.
    pub role: String,
    pub site: String,
}

/// Providers found by mDNS, by announcement; filled by the browsing task.
pub type Discovered = Arc<std::sync::Mutex<BTreeMap<String, Known>>>;

#[derive(Debug, Clone)]
struct Backoff {
    failures: u32,
    until: Instant,
    last_error: String,
}

/// The providers an agent knows, in order of preference (assigned, discovered, configured),
/// which one answered last, and which are backing off after failures.
#[derive(Debug)]
pub struct Providers {
    assigned: Vec<String>,
    discovered: Discovered,
    configured: Vec<String>,
    /// The provider that answered last: stuck to until it fails.
    current: Option<String>,
    /// When the most preferred provider was last tried while on another.
    last_probe: Option<Instant>,
    backoff: HashMap<String, Backoff>,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
    /// The discovery key, when the agent browses.
    pub discovery_key: Option<String>,
    transport: Transport,
}

/// How often an agent on a fallback provider tries its preferred one again.
pub const PREFERRED_PROBE: Duration = Duration::from_secs(10);
/// A failing provider is skipped for 1 s, doubling per failure up to this, with jitter.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One connection attempt that failed: which provider, and why.
pub type Failure = (String, String);

impl Providers {
    /// `configured` may be empty when the agent discovers its providers.
    pub fn new(
        configured: Vec<String>,
        max_message_bytes: usize,
        discovery_key: Option<String>,
        transport: Transport,
    ) -> Result<Self> {
        if configured.is_empty() && discovery_key.is_none() {
            return Err(AgentError::Config(
                "no provider given: use --provider URL, or --discover to find providers on the network".into(),
            ));
        }
        for u in &configured {
            transport.endpoint(u).map_err(|e| AgentError::Config(e.to_string()))?;
        }
        Ok(Self {
            assigned: vec![],
            discovered: Discovered::default(),
            configured,
            current: None,
            last_probe: None,
            backoff: HashMap::new(),
            connect_timeout: Duration::from_secs(5),
            max_message_bytes,
            discovery_key,
            transport,
        })
    }

    /// The map the mDNS browser fills.
    pub fn discovered(&self) -> Discovered {
        self.discovered.clone()
    }

    /// Every provider known, in the order they are tried, each URL once.
    pub fn known(&self) -> Vec<Known> {
        let mut out: Vec<Known> = Vec::new();
        let mut push = |k: Known| {
            if !out.iter().any(|o| o.url == k.url) {
                out.push(k);
            }
        };
        for u in &self.assigned {
            push(Known { name: u.clone(), url: u.clone(), source: Source::Assigned, role: "".into(), site: "".into() });
        }
        let mut found: Vec<Known> = self.discovered.lock().expect("discovered lock").values().cloned().collect();
        // A site's own provider before the centre, then by name, so every machine agrees.
        found.sort_by(|a, b| (a.role != "remote", &a.name).cmp(&(b.role != "remote", &b.name)));
        for k in found {
            push(k);
        }
        for u in &self.configured {
            push(Known {
                name: u.clone(),
                url: u.clone(),
                source: Source::Configured,
                role: "".into(),
                site: "".into(),
            });
        }
        out
    }

    pub fn urls(&self) -> Vec<String> {
        self.known().into_iter().map(|k| k.url).collect()
    }

    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Why a provider is being skipped, and for how much longer.
    pub fn backing_off(&self, url: &str) -> Option<(Duration, String)> {
        let b = self.backoff.get(url)?;
        let left = b.until.checked_duration_since(Instant::now())?;
        Some((left, b.last_error.clone()))
    }

    /// The group's assigned providers (from the last check) go first.
    pub fn set_assigned(&mut self, assigned: &[String]) {
        self.assigned = assigned.iter().filter(|u| self.transport.endpoint(u).is_ok()).cloned().collect();
    }

    fn failed(&mut self, url: &str, error: String) {
        let b = self.backoff.entry(url.to_string()).or_insert(Backoff {
            failures: 0,
            until: Instant::now(),
            last_error: String::new(),
        });
        b.failures = b.failures.saturating_add(1);
        let base = Duration::from_secs(1u64 << (b.failures - 1).min(6)).min(MAX_BACKOFF);
        // Up to half again at random, so a fleet does not retry in step.
        let jitter = Duration::from_millis(fastrand::u64(0..=base.as_millis() as u64 / 2));
        b.until = Instant::now() + base + jitter;
        b.last_error = error;
        if self.current.as_deref() == Some(url) {
            self.current = None;
        }
    }

    /// The order to try providers in now: the sticky one first (or the preferred one when a
    /// probe is due), then the rest in preference order; providers backing off come last.
    fn attempt_order(&mut self) -> Vec<String> {
        let urls = self.urls();
        let preferred = urls.first().cloned();
        let mut first = self.current.clone().filter(|c| urls.contains(c));
        if first.is_some() && first != preferred && self.last_probe.is_none_or(|t| t.elapsed() >= PREFERRED_PROBE) {
            // Go back to the preferred one once it recovers.
            self.last_probe = Some(Instant::now());
            first = preferred;
        }
        let mut order: Vec<String> = first.into_iter().collect();
        let (ready, waiting): (Vec<String>, Vec<String>) =
            urls.into_iter().filter(|u| !order.contains(u)).partition(|u| self.backing_off(u).is_none());
        order.extend(ready);
        order.extend(waiting);
        order
    }

    /// Connects to the provider that answered last, else the next ones in order, each
    /// attempt bounded by the connect timeout. Also returns the providers that failed on the
    /// way, so they can be reported.
    pub async fn connect(&mut self) -> Result<(String, Client, Vec<Failure>)> {
        let mut failures = Vec::new();
        let order = self.attempt_order();
        if order.is_empty() {
            let key = self.discovery_key.as_deref().unwrap_or("-");
            return Err(AgentError::Unreachable {
                tried: "none".into(),
                last: format!("no provider known yet: none assigned or configured, none discovered with key {key}"),
            });
        }
        let mut last = String::new();
        for url in &order {
            match self.connect_to(url).await {
                Ok(client) => {
                    self.current = Some(url.clone());
                    self.backoff.remove(url);
                    return Ok((url.clone(), client, failures));
                }
                Err(e) => {
                    tracing::warn!(provider = %url, error = %e, "provider unreachable");
                    last = format!("{url}: {e}");
                    self.failed(url, e.clone());
                    failures.push((url.clone(), e));
                }
            }
        }
        Err(AgentError::Unreachable { tried: order.join(", "), last })
    }

    /// One connection attempt to `url`, bounded by the connect timeout.
    pub async fn connect_to(&self, url: &str) -> std::result::Result<Client, String> {
        let ep = self
            .transport
            .endpoint(url)
            .map_err(|e| e.to_string())?
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        let ch = updraft_runtime::tls::connect_within(ep, self.connect_timeout).await?;
        // A provider behind a reverse proxy is reached under the URL's path.
        let path = url.parse::<tonic::codegen::http::Uri>().map(|u| u.path().to_string()).unwrap_or_default();
        Ok(AgentApiClient::new(updraft_runtime::traced_under(ch, &path).with_server(url))
            .max_decoding_message_size(self.max_message_bytes))
    }

    /// The provider that answered last failed after connecting (refused a check, dropped the
    /// push stream): back off from it and prefer the next one.
    pub fn rotate(&mut self, why: &str) {
        if let Some(c) = self.current.clone() {
            self.failed(&c, why.to_string());
        }
    }
}

/// Runs a unary call with a deadline.
pub async fn bounded<T>(
    provider: &str,
    what: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) if s.code() == tonic::Code::Cancelled => Err(AgentError::Rpc {
            provider: provider.into(),
            what,
            message: format!("{} ({})", s.message(), updraft_runtime::tls::REFUSED_HINT),
        }),
        Ok(Err(s)) => Err(AgentError::Rpc { provider: provider.into(), what, message: s.message().to_string() }),
        Err(_) => {
            Err(AgentError::Rpc { provider: provider.into(), what, message: format!("no answer within {timeout:?}") })
        }
    }
}

/// The download cache under the agent's state directory.
pub fn downloads_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("downloads")
}

/// Where `update`'s package is kept in the download cache `dir`: the complete, hash-checked
/// file and the partial one a download writes (and resumes); or, for a package unpacked as it
/// arrives, only its header (the payload is the staged tree, see
/// [`crate::install::stage_while_downloading`]).
pub struct Cached {
    pub done: PathBuf,
    pub part: PathBuf,
    pub head: PathBuf,
}

impl Cached {
    pub fn of(dir: &Path, update: &Update) -> Result<Self> {
        updraft_core::hash::validate(&update.content_hash)?;
        let hex = &update.content_hash[updraft_core::hash::PREFIX.len()..];
        Ok(Self {
            done: dir.join(format!("{hex}.pkg")),
            part: dir.join(format!("{hex}.part")),
            head: dir.join(format!("{hex}.head")),
        })
    }

    /// No package file is here, whole or partial: the download unpacks as it arrives.
    pub fn is_empty(&self) -> bool {
        !self.done.exists() && !self.part.exists()
    }
}

/// Downloads `update`'s package into `dir`, resuming a partial file, and returns the path of
/// the complete, hash-checked package. A chunk stalled for longer than `idle` fails it; a
/// cancel stops it (the partial file stays, to be resumed).
pub async fn download(
    client: &mut Client,
    update: &Update,
    dir: &Path,
    idle: Duration,
    cancel: &crate::cancel::Cancel,
) -> Result<PathBuf> {
    let fail = |reason: String| AgentError::Download { update: update.id.clone(), reason };
    let Cached { done, part, .. } = Cached::of(dir, update)?;
    if done.is_file() {
        return Ok(done);
    }
    let mut pos = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
    if pos > update.size {
        pos = 0;
    }
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&part)
        .await
        .map_err(|e| AgentError::io(&part, e))?;
    file.set_len(pos).await.map_err(|e| AgentError::io(&part, e))?;
    let mut file = tokio::io::BufWriter::new(file);
    tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(pos))
        .await
        .map_err(|e| AgentError::io(&part, e))?;
    // The content hash is computed as the bytes arrive (a resumed download first hashes what
    // it already has), so no second pass over the file is needed before it is trusted.
    let hasher = if pos == 0 {
        updraft_core::hash::ContentHasher::new()
    } else {
        let part2 = part.clone();
        tokio::task::spawn_blocking(move || updraft_core::hash::hasher_over(&part2, pos))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| AgentError::io(&part, e))?
    };
    let fetched = fetch(client, update, pos, hasher, idle, cancel, Sink::File(&mut file, &part)).await;
    // Not fsynced: the package file is a cache, not a record. Everything installed from it is
    // checked against the signed manifest's per-file hashes while it is unpacked, so a file
    // torn by a crash fails that check and is deleted and fetched again; and a package deleted
    // right after its install is often never written back to disk at all.
    file.flush().await.map_err(|e| AgentError::io(&part, e))?;
    drop(file);
    if matches!(fetched, Err(AgentError::Verify { .. })) {
        let _ = tokio::fs::remove_file(&part).await;
    }
    fetched?;
    crate::failpoint::check("download:done")?;
    tokio::fs::rename(&part, &done).await.map_err(|e| AgentError::io(&done, e))?;
    Ok(done)
}

/// Downloads `update`'s package from byte `from` (the bytes before it, already hashed into
/// `hasher`, are with the receiver) and hands every chunk to `tee` only, keeping no copy: the
/// receiver unpacks them (see [`crate::install::stage_while_downloading`]). Returns once every
/// byte has come and the whole package matched its content hash.
pub async fn download_streamed(
    client: &mut Client,
    update: &Update,
    from: u64,
    hasher: updraft_core::hash::ContentHasher,
    tee: tokio::sync::mpsc::Sender<bytes::Bytes>,
    idle: Duration,
    cancel: &crate::cancel::Cancel,
) -> Result<()> {
    fetch(client, update, from, hasher, idle, cancel, Sink::Stream(tee)).await?;
    crate::failpoint::check("download:done")
}

/// Where a download puts the bytes it fetches.
enum Sink<'a> {
    /// The cache file (at the download's position), flushed after every chunk.
    File(&'a mut tokio::io::BufWriter<tokio::fs::File>, &'a Path),
    /// A receiver that unpacks them; when it has given up the download fails.
    Stream(tokio::sync::mpsc::Sender<bytes::Bytes>),
}

/// Fetches `update`'s package from byte `pos` into `sink`, hashing as the bytes come, and
/// checks that it is whole and matches its content hash.
async fn fetch(
    client: &mut Client,
    update: &Update,
    mut pos: u64,
    mut hasher: updraft_core::hash::ContentHasher,
    idle: Duration,
    cancel: &crate::cancel::Cancel,
    mut sink: Sink<'_>,
) -> Result<()> {
    let fail = |reason: String| AgentError::Download { update: update.id.clone(), reason };
    if pos < update.size {
        tracing::info!(update = %update.id, offset = pos, size = update.size, "downloading");
        let mut stream = match tokio::time::timeout(
            idle,
            client.download(BlobRequest { content_hash: update.content_hash.clone(), offset: pos }),
        )
        .await
        {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(fail(s.message().to_string())),
            Err(_) => return Err(fail(format!("no answer within {idle:?}"))),
        };
        let downloaded = updraft_runtime::metrics::meter()
            .u64_counter("updraft.download")
            .with_unit("By")
            .with_description("Package bytes this agent downloaded")
            .build();
        loop {
            let next = tokio::select! {
                biased;
                _ = cancel.requested() => return Err(AgentError::Cancelled),
                next = tokio::time::timeout(idle, stream.next()) => next,
            }
            .map_err(|_| fail(format!("stalled for {idle:?} at byte {pos}")))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|s| fail(s.message().to_string()))?;
            if chunk.offset != pos {
                return Err(fail(format!("chunk at offset {} but expected {pos}", chunk.offset)));
            }
            if pos + chunk.data.len() as u64 > update.size {
                return Err(fail(format!("provider sent more than the {} bytes the catalog lists", update.size)));
            }
            hasher.update(&chunk.data);
            let len = chunk.data.len() as u64;
            match &mut sink {
                // Whole chunks reach the file, so a crash re-fetches at most the one in flight.
                Sink::File(file, path) => {
                    file.write_all(&chunk.data).await.map_err(|e| AgentError::io(*path, e))?;
                    file.flush().await.map_err(|e| AgentError::io(*path, e))?;
                }
                // The chunk's bytes are shared, not copied.
                Sink::Stream(tee) => {
                    let sent = tokio::select! {
                        biased;
                        _ = cancel.requested() => return Err(AgentError::Cancelled),
                        sent = tee.send(chunk.data) => sent,
                    };
                    if sent.is_err() {
                        return Err(fail("the unpacker stopped".into()));
                    }
                }
            }
            pos += len;
            downloaded.add(len, &[]);
            // (A streamed download's receiver passes this point once it has the chunk.)
            if pos < update.size && matches!(sink, Sink::File(..)) {
                crate::failpoint::check("download:mid")?;
            }
        }
    }
    if pos != update.size {
        return Err(fail(format!("stream ended at byte {pos} of {}", update.size)));
    }
    let actual = hasher.finish();
    if actual != update.content_hash {
        return Err(AgentError::Verify {
            update: update.id.clone(),
            reason: updraft_core::hash::mismatch(&actual, &update.content_hash),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn providers(configured: &[&str]) -> Providers {
        let urls = configured.iter().map(|u| u.to_string()).collect();
        Providers::new(urls, 4 << 20, None, Transport::Insecure).unwrap()
    }

    #[test]
    fn assigned_first_then_configured_and_failing_ones_last() {
        let mut p = providers(&["http://centre:1", "http://fallback:1"]);
        assert_eq!(p.attempt_order(), ["http://centre:1", "http://fallback:1"]);
        p.set_assigned(&["http://site:1".to_string()]);
        assert_eq!(p.attempt_order(), ["http://site:1", "http://centre:1", "http://fallback:1"]);
        // A provider that failed waits its backoff out behind the others.
        p.failed("http://site:1", "refused".into());
        assert_eq!(p.attempt_order(), ["http://centre:1", "http://fallback:1", "http://site:1"]);
        let (left, why) = p.backing_off("http://site:1").unwrap();
        assert!(left <= Duration::from_millis(1500) && why == "refused", "{left:?} {why}");
        // Each failure in a row doubles the wait, up to the cap.
        for _ in 0..20 {
            p.failed("http://site:1", "refused".into());
        }
        assert!(p.backing_off("http://site:1").unwrap().0 <= MAX_BACKOFF + MAX_BACKOFF / 2);
    }

    #[test]
    fn the_one_that_answered_is_kept_and_the_preferred_one_probed_again() {
        let mut p = providers(&["http://centre:1", "http://fallback:1"]);
        p.current = Some("http://fallback:1".into());
        // The first time, the preferred one is probed; then the sticky one comes first.
        assert_eq!(p.attempt_order()[0], "http://centre:1");
        assert_eq!(p.attempt_order()[0], "http://fallback:1", "sticky until the next probe is due");
        // Providers with a URL the transport cannot reach are not assigned.
        p.set_assigned(&["not a url".to_string()]);
        assert_eq!(p.urls(), ["http://centre:1", "http://fallback:1"]);
    }
}
