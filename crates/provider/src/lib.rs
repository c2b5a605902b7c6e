//! The Updraft local provider: the source of truth for the catalog, machines and activity, and
//! the gRPC services that agents, site providers and admins use. The remote provider reuses
//! its store, agent API and replication API with a different [`agent_api::Tier`].
pub mod admin;
pub mod agent_api;
pub mod blobs;
pub mod catalog;
pub mod error;
pub mod fleet;
pub mod hub;
pub mod import;
pub mod policy;
pub mod replication;
pub mod scanner;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use updraft_core::keys::PublicKey;
use updraft_proto::v1::admin_server::AdminServer;
use updraft_proto::v1::agent_api_server::AgentApiServer;
use updraft_proto::v1::replication_server::ReplicationServer;

use crate::agent_api::{AgentService, LocalTier};
use crate::blobs::BlobStore;
use crate::error::{ProviderError, Result};
use crate::hub::Hub;
use crate::replication::ReplicationService;
use crate::store::Store;

/// Largest gRPC message accepted, in either direction. Chunks are 256 KiB; the rest is slack.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct Config {
    /// Name reported to agents as `served_by`.
    pub name: String,
    /// Directory holding the sled store (`db/`) and the blobs (`blobs/`).
    pub data_dir: PathBuf,
    /// Release keys accepted on import.
    pub trusted_keys: Vec<PublicKey>,
    /// Accept packages no trusted key verifies (recorded as unverified). Off by default.
    pub allow_unverified: bool,
    /// When the content scanner runs, and how long a file must be quiet to be imported.
    pub scan: scanner::ScanConfig,
    pub min_check_secs: u32,
    pub max_check_secs: u32,
    pub max_upload_bytes: u64,
    pub max_subscribers: usize,
}

impl Config {
    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            data_dir: data_dir.into(),
            trusted_keys: Vec::new(),
            allow_unverified: false,
            scan: scanner::ScanConfig::default(),
            min_check_secs: 30 * 60,
            max_check_secs: 60 * 60,
            max_upload_bytes: 16 << 30,
            max_subscribers: 100_000,
        }
    }
}

/// What every service of one provider process shares.
pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub blobs: BlobStore,
    pub hub: Hub,
}

impl Shared {
    pub fn open(config: Config) -> Result<Arc<Self>> {
        if config.min_check_secs == 0 || config.min_check_secs > config.max_check_secs {
            return Err(ProviderError::InvalidArgument(format!(
                "check interval: minimum {} s must be positive and not above the maximum {} s",
                config.min_check_secs, config.max_check_secs
            )));
        }
        let store = Store::open(&config.data_dir)?;
        let blobs = BlobStore::open(&config.data_dir.join("blobs"))?;
        Ok(Arc::new(Self { config, store, blobs, hub: Hub::default() }))
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A gRPC server with Updraft's limits and a span per RPC.
pub fn grpc_server() -> tonic::transport::Server<tower_layer::Identity> {
    tonic::transport::Server::builder()
        .trace_fn(updraft_runtime::telemetry::server_span)
        .max_concurrent_streams(Some(1024))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Serves the agent, replication and admin APIs on `listener` until `shutdown` is cancelled.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let shared = Shared::open(config)?;
    let tier = Arc::new(LocalTier { shared: shared.clone() });
    let addr = listener.local_addr().map_err(|e| ProviderError::Io(e.to_string()))?;
    tokio::spawn(
        scanner::scan_loop(shared.clone(), shared.config.scan, shutdown.clone())
            .instrument(tracing::info_span!("content_scanner")),
    );
    tracing::info!(%addr, data_dir = %shared.config.data_dir.display(), seq = shared.store.catalog_seq()?, "provider listening");
    grpc_server()
        .add_service(
            AgentApiServer::new(AgentService::new(shared.clone(), tier.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ReplicationServer::new(ReplicationService::new(shared.clone(), tier))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServer::new(admin::AdminService::new(shared.clone(), shared.config.scan))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await
        .map_err(|e| ProviderError::Io(format!("server: {e}")))
}
