//! Talking to providers: connecting with fallback across the configured list, bounded unary
//! calls, and resumable downloads that verify size and hash before anything uses the file.
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;
use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::{BlobRequest, Update};
use updraft_runtime::TracedChannel;

use crate::error::{AgentError, Result};

pub type Client = AgentApiClient<TracedChannel>;

/// Largest message the agent accepts from a provider, unless configured otherwise.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The providers an agent knows, in order of preference, and which one answered last.
#[derive(Debug, Clone)]
pub struct Providers {
    /// The group's assigned providers (from the last check), tried first.
    assigned: Vec<String>,
    /// The agent's own list (flags or config file).
    configured: Vec<String>,
    urls: Vec<String>,
    current: usize,
    /// When the most preferred provider was last tried while on a fallback.
    last_probe: Option<std::time::Instant>,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
}

/// How often an agent on a fallback provider tries its preferred one again.
pub const PREFERRED_PROBE: Duration = Duration::from_secs(10);

/// One connection attempt that failed: which provider, and why.
pub type Failure = (String, String);

impl Providers {
    pub fn new(urls: Vec<String>, max_message_bytes: usize) -> Result<Self> {
        if urls.is_empty() {
            return Err(AgentError::Config("no provider given (use --provider URL)".into()));
        }
        for u in &urls {
            Endpoint::from_shared(u.clone()).map_err(|e| AgentError::Config(format!("provider URL {u:?}: {e}")))?;
        }
        Ok(Self {
            assigned: vec![],
            urls: urls.clone(),
            configured: urls,
            current: 0,
            last_probe: None,
            connect_timeout: Duration::from_secs(5),
            max_message_bytes,
        })
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Puts the group's assigned providers first; the configured ones remain as fallbacks.
    pub fn set_assigned(&mut self, assigned: &[String]) {
        let assigned: Vec<String> =
            assigned.iter().filter(|u| Endpoint::from_shared((*u).clone()).is_ok()).cloned().collect();
        if assigned == self.assigned {
            return;
        }
        let current = self.urls.get(self.current).cloned();
        self.assigned = assigned;
        let mut urls = self.assigned.clone();
        for u in &self.configured {
            if !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        self.urls = urls;
        self.current = current.and_then(|c| self.urls.iter().position(|u| *u == c)).unwrap_or(0);
    }

    /// Connects to the provider that answered last, else the next ones in order. Also returns
    /// the providers that failed on the way, so they can be reported.
    pub async fn connect(&mut self) -> Result<(String, Client, Vec<Failure>)> {
        let mut failures = Vec::new();
        let mut last = String::new();
        // Stick to the provider that works, but go back to the preferred one once it recovers.
        if self.current != 0 && self.last_probe.is_none_or(|t| t.elapsed() >= PREFERRED_PROBE) {
            self.last_probe = Some(std::time::Instant::now());
            self.current = 0;
        }
        for i in 0..self.urls.len() {
            let idx = (self.current + i) % self.urls.len();
            let url = self.urls[idx].clone();
            let ep = Endpoint::from_shared(url.clone())
                .map_err(|e| AgentError::Config(e.to_string()))?
                .connect_timeout(self.connect_timeout)
                .tcp_keepalive(Some(Duration::from_secs(30)))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10));
            match ep.connect().await {
                Ok(ch) => {
                    self.current = idx;
                    let client = AgentApiClient::new(updraft_runtime::traced(ch))
                        .max_decoding_message_size(self.max_message_bytes);
                    return Ok((url, client, failures));
                }
                Err(e) => {
                    tracing::warn!(provider = %url, error = %e, "provider unreachable");
                    last = format!("{url}: {e}");
                    failures.push((url, e.to_string()));
                }
            }
        }
        Err(AgentError::Unreachable { tried: self.urls.join(", "), last })
    }

    /// Prefer the next provider on the following connect.
    pub fn rotate(&mut self) {
        self.current = (self.current + 1) % self.urls.len();
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
        Ok(Err(s)) => Err(AgentError::Rpc { provider: provider.into(), what, message: s.message().to_string() }),
        Err(_) => {
            Err(AgentError::Rpc { provider: provider.into(), what, message: format!("no answer within {timeout:?}") })
        }
    }
}

/// Downloads `update`'s package into `dir`, resuming a partial file, and returns the path of
/// the complete, hash-checked package. A chunk stalled for longer than `idle` fails it.
pub async fn download(client: &mut Client, update: &Update, dir: &Path, idle: Duration) -> Result<PathBuf> {
    let fail = |reason: String| AgentError::Download { update: update.id.clone(), reason };
    updraft_core::hash::validate(&update.content_hash)?;
    let hex = &update.content_hash[updraft_core::hash::PREFIX.len()..];
    let done = dir.join(format!("{hex}.pkg"));
    let part = dir.join(format!("{hex}.part"));
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
        loop {
            let next = tokio::time::timeout(idle, stream.next())
                .await
                .map_err(|_| fail(format!("stalled for {idle:?} at byte {pos}")))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|s| fail(s.message().to_string()))?;
            if chunk.offset != pos {
                return Err(fail(format!("chunk at offset {} but expected {pos}", chunk.offset)));
            }
            if pos + chunk.data.len() as u64 > update.size {
                return Err(fail(format!("provider sent more than the {} bytes the catalog lists", update.size)));
            }
            file.write_all(&chunk.data).await.map_err(|e| AgentError::io(&part, e))?;
            pos += chunk.data.len() as u64;
            // Whole chunks reach the file, so a crash re-fetches at most the one in flight.
            file.flush().await.map_err(|e| AgentError::io(&part, e))?;
            if pos < update.size {
                crate::failpoint::hit("download:mid");
            }
        }
    }
    file.flush().await.map_err(|e| AgentError::io(&part, e))?;
    file.get_ref().sync_all().await.map_err(|e| AgentError::io(&part, e))?;
    drop(file);
    if pos != update.size {
        return Err(fail(format!("stream ended at byte {pos} of {}", update.size)));
    }
    let part2 = part.clone();
    let actual = tokio::task::spawn_blocking(move || updraft_core::hash::hash_file(&part2))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| AgentError::io(&part, e))?;
    if actual != update.content_hash {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(AgentError::Verify {
            update: update.id.clone(),
            reason: format!("content hash is {actual}, the catalog says {}", update.content_hash),
        });
    }
    crate::failpoint::hit("download:done");
    tokio::fs::rename(&part, &done).await.map_err(|e| AgentError::io(&done, e))?;
    Ok(done)
}
