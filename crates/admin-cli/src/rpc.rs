//! Talking to a provider: the channel, the Admin client with the caller's name and trace
//! context on every call, and what a failed call becomes (a message and an exit status).
use std::time::Duration;

use tonic::transport::Channel;
use updraft_proto::v1::admin_client::AdminClient;
use updraft_runtime::tls::Transport;

/// Adds the caller's trace context and who is calling to every request. The provider logs the
/// latter with each change until callers are authenticated by certificate.
#[derive(Clone)]
pub struct Caller(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Caller {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut req = updraft_runtime::telemetry::inject(req)?;
        req.metadata_mut().insert("x-updraft-user", self.0.clone());
        Ok(req)
    }
}

pub type Admin = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Caller>>;

/// A channel to the provider at `url` over `transport`, connected (handshakes included)
/// `within` the caller's `--connect-timeout`. A provider that stops answering on it (frozen, or
/// cut off) is given up on after HTTP/2 pings go unanswered for ten seconds, however long the
/// call: an upload may take minutes, a dead peer may not.
pub async fn channel(transport: &Transport, url: &str, within: Duration) -> anyhow::Result<Channel> {
    let endpoint = transport
        .endpoint(url)?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    updraft_runtime::tls::connect_within(endpoint, within).await.map_err(|e| {
        anyhow::Error::new(RpcFailure {
            code: tonic::Code::Unavailable,
            message: format!("cannot reach provider {url}: {e}"),
        })
    })
}

/// The Admin client on `channel`, naming this user and host as the caller.
pub fn admin(channel: Channel) -> Admin {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let caller = format!("{user}@{}", updraft_runtime::hostname()).replace(|c: char| !c.is_ascii_graphic(), "_");
    let caller = Caller(caller.parse().unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("unknown")));
    AdminClient::with_interceptor(channel, caller).max_decoding_message_size(64 << 20)
}

/// A call the provider answered with a failure (or could not be made): what to tell the user,
/// and the gRPC code, which decides admin-cli's exit status (see [`RpcFailure::exit_code`]).
#[derive(Debug)]
pub struct RpcFailure {
    pub code: tonic::Code,
    pub message: String,
}

impl std::fmt::Display for RpcFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RpcFailure {}

/// admin-cli's exit statuses: 0 done, 1 failed (bad input included), 2 usage error (the
/// command line itself, from clap), 3 a provider not serving (`provider health`), 4 not found,
/// 5 refused (not allowed), 6 provider unavailable; 141 when the reader of its output went away.
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_NOT_SERVING: i32 = 3;
pub const EXIT_NOT_FOUND: i32 = 4;
pub const EXIT_REFUSED: i32 = 5;
pub const EXIT_UNAVAILABLE: i32 = 6;

impl RpcFailure {
    pub fn exit_code(&self) -> i32 {
        use tonic::Code;
        match self.code {
            Code::NotFound => EXIT_NOT_FOUND,
            Code::PermissionDenied | Code::Unauthenticated => EXIT_REFUSED,
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => EXIT_UNAVAILABLE,
            _ => EXIT_FAILED,
        }
    }
}

/// The exit status for an error: an RPC failure's own, else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    e.chain().find_map(|c| c.downcast_ref::<RpcFailure>()).map_or(EXIT_FAILED, RpcFailure::exit_code)
}

/// Turns a gRPC status from the provider at `url` into the provider's own message (or, for a
/// connection that failed, the reason and the address).
pub fn failure(url: &str) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |s| {
        let message = match s.code() {
            // A refused certificate surfaces as a bare "transport error": the reason is in its causes.
            tonic::Code::Cancelled => format!(
                "cannot reach provider {url}: {} ({})",
                updraft_runtime::tls::describe(&s),
                updraft_runtime::tls::REFUSED_HINT
            ),
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                format!("cannot reach provider {url}: {}", updraft_runtime::tls::describe(&s))
            }
            _ => s.message().to_string(),
        };
        anyhow::Error::new(RpcFailure { code: s.code(), message })
    }
}
