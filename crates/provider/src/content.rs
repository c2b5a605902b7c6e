//! Content a provider on a shared database lacks: fetched from another provider of the same
//! database, which every provider advertises there (`member_loop`), and checked against its
//! content hash before it is served. Providers may then keep their content locations per host:
//! an upload through one reaches the others on first demand.
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use updraft_proto::v1::replication_client::ReplicationClient;
use updraft_proto::v1::{BlobRequest, PairMember};

use crate::error::{ProviderError, Result};
use crate::{Shared, now_ms};

/// Marks a fetch between providers of one database: the provider asked answers from what it
/// has and never asks on (two providers lacking a blob would otherwise ask each other).
pub const MEMBER_FETCH: &str = "updraft-member-fetch";

/// How often a provider on a database says it is alive, and how long after its last word it
/// is taken for gone.
pub const BEAT: Duration = Duration::from_secs(2);
pub const GONE_AFTER: Duration = Duration::from_secs(10);

/// How long the database may take to take this provider's beat before the provider counts
/// itself cut off (and reports NOT_SERVING until a beat is taken again).
pub const CUT_OFF_AFTER: Duration = Duration::from_secs(3);

/// Advertises this provider (name, URL) in the database until `stop`; each beat also tells
/// whether the database answers ([`Shared::database_ok`]).
pub async fn member_loop(shared: Arc<Shared>, url: String, stop: CancellationToken) {
    let since = now_ms();
    loop {
        let me = PairMember {
            name: shared.config.name.clone(),
            url: url.clone(),
            role: "active".into(),
            pid: std::process::id(),
            last_seen_unix_ms: now_ms(),
            since_unix_ms: since,
            ..Default::default()
        };
        let store = shared.store.clone();
        let beat = tokio::task::spawn_blocking(move || store.put_member(&me));
        tokio::pin!(beat);
        let taken = match tokio::time::timeout(CUT_OFF_AFTER, &mut beat).await {
            Ok(taken) => taken,
            Err(_) => {
                reachable(&shared, false, &format!("the database has not answered for {CUT_OFF_AFTER:?}"));
                beat.await
            }
        };
        match taken {
            Ok(Ok(())) => reachable(&shared, true, ""),
            Ok(Err(e)) => reachable(&shared, false, &e.to_string()),
            Err(e) => tracing::warn!(error = %e, "advertising this provider failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
}

/// Records whether the database answers, logging each change once.
fn reachable(shared: &Shared, ok: bool, why: &str) {
    if shared.database_ok.send_replace(ok) != ok {
        match ok {
            true => tracing::info!("the database answers again: serving"),
            false => tracing::error!(error = %why, "cut off from the database: NOT_SERVING until it answers"),
        }
    }
}

/// The other providers of the database heard from lately, most recent first.
pub fn others(shared: &Shared) -> Result<Vec<PairMember>> {
    let fresh = now_ms() - GONE_AFTER.as_millis() as i64;
    let mut members: Vec<PairMember> = shared
        .store
        .list_members()?
        .into_iter()
        .filter(|m| m.name != shared.config.name && m.last_seen_unix_ms >= fresh)
        .collect();
    members.sort_by_key(|m| std::cmp::Reverse(m.last_seen_unix_ms));
    Ok(members)
}

/// Makes sure `content_hash` is in this provider's blob store, fetching it from another
/// provider of the database if need be (one fetch at a time; a second asker waits for it).
pub async fn fetch(shared: &Shared, content_hash: &str) -> Result<()> {
    let _one = shared.member_fetches.lock().await;
    if shared.blobs.has(content_hash) {
        return Ok(());
    }
    let mut why = Vec::new();
    for m in others(shared)? {
        match fetch_from(shared, &m.url, content_hash).await {
            Ok(()) => {
                tracing::info!(%content_hash, from = %m.name, "fetched content from another provider of the database");
                return Ok(());
            }
            Err(e) => why.push(format!("{}: {e}", m.name)),
        }
    }
    if why.is_empty() {
        return Err(ProviderError::BlobMissing(content_hash.into()));
    }
    Err(ProviderError::Upstream(format!("content {content_hash} from the other providers: {}", why.join("; "))))
}

async fn fetch_from(shared: &Shared, url: &str, content_hash: &str) -> Result<()> {
    let transport = &shared.config.transport;
    // A member that stops sending mid-stream is given up on when its pings go unanswered: the
    // fetch holds `member_fetches`, which every later fetch waits for.
    let endpoint = transport
        .endpoint(url)
        .map_err(|e| ProviderError::Upstream(e.to_string()))?
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(10));
    let channel = updraft_runtime::tls::connect_within(endpoint, std::time::Duration::from_secs(10))
        .await
        .map_err(|e| ProviderError::Upstream(format!("{url}: {e}")))?;
    let mut client = ReplicationClient::new(channel).max_decoding_message_size(crate::MAX_MESSAGE_BYTES);
    let mut request = tonic::Request::new(BlobRequest { content_hash: content_hash.to_string(), offset: 0 });
    request.metadata_mut().insert(MEMBER_FETCH, tonic::metadata::MetadataValue::from_static("1"));
    let mut stream =
        client.fetch_blob(request).await.map_err(|e| ProviderError::Upstream(e.message().to_string()))?.into_inner();
    let tmp = shared.blobs.incoming()?;
    let mut file = tokio::fs::File::create(tmp.path()).await.map_err(|e| ProviderError::Io(e.to_string()))?;
    let mut received = 0u64;
    while let Some(chunk) = stream.message().await.map_err(|e| ProviderError::Upstream(e.message().to_string()))? {
        if received == 0 {
            updraft_runtime::ensure_room(
                &shared.config.content_dir(),
                chunk.total_size,
                shared.config.disk_reserve_bytes,
            )
            .map_err(ProviderError::LimitReached)?;
        }
        received += chunk.data.len() as u64;
        if received > shared.config.max_upload_bytes {
            return Err(ProviderError::LimitReached(format!(
                "content {content_hash} from {url} is larger than the {} bytes a package may be",
                shared.config.max_upload_bytes
            )));
        }
        crate::blobs::append(&mut file, &chunk.data).await?;
    }
    file.sync_all().await.map_err(|e| ProviderError::Io(e.to_string()))?;
    // The bytes are checked against the hash they were asked for before anyone is served them.
    shared.blobs.commit_checked(tmp.path(), content_hash).await?;
    Ok(())
}
