//! The standby's side of a switchover pair: every RPC it receives, of any service, is passed
//! untouched (headers, streams, trailers) to the active provider over one HTTP/2 channel, so
//! admins and agents can use either member's address.
use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::transport::Channel;
use updraft_runtime::tls::Transport;

use crate::pair::PairDir;

/// How long a request waits for a standby that has just started to learn the active's
/// address (the active writes it right after taking the store's lock).
const WAIT_FOR_ACTIVE: Duration = Duration::from_secs(3);

/// Where the active provider is, as the standby last read it from the pair directory.
#[derive(Clone)]
pub struct ActiveLink {
    pair: PairDir,
    transport: Transport,
    /// The active's URL, the credentials generation the channel was built with, the channel.
    inner: Arc<Mutex<Option<(String, u64, Channel)>>>,
}

impl ActiveLink {
    pub fn new(pair: PairDir, transport: Transport) -> Self {
        Self { pair, transport, inner: Arc::default() }
    }

    /// Re-reads who is active.
    pub fn refresh(&self) {
        if let Some(active) = self.pair.active() {
            self.point_at(&active.url);
        }
    }

    /// Points the link at `url`; keeps the open channel when it is already there and was built
    /// with the credentials in use (a renewed certificate gets a new channel).
    pub fn point_at(&self, url: &str) {
        let mut inner = self.inner.lock().expect("active link lock");
        let generation = self.transport.generation();
        if inner.as_ref().is_some_and(|(u, g, _)| u == url && *g == generation) {
            return;
        }
        match self.transport.endpoint(url) {
            Ok(ep) => {
                let ch = ep
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_keepalive(Some(Duration::from_secs(30)))
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_lazy();
                tracing::info!(active = %url, "forwarding to the active provider");
                *inner = Some((url.to_string(), generation, ch));
            }
            Err(e) => {
                tracing::warn!(active = %url, error = %e, "the active provider's address is unusable");
                *inner = None;
            }
        }
    }

    fn get(&self) -> Option<(String, Channel)> {
        self.inner.lock().expect("active link lock").as_ref().map(|(u, _, c)| (u.clone(), c.clone()))
    }

    /// A channel to the active, when one is known (the standby renews its certificate there).
    pub fn channel(&self) -> Option<updraft_runtime::TracedChannel> {
        self.refresh();
        self.get().map(|(url, ch)| updraft_runtime::traced(ch).with_server(&url))
    }
}

/// Forwards service `S`'s RPCs (routed by `S`'s name) to the active provider.
pub struct Forward<S> {
    link: ActiveLink,
    standby: Arc<str>,
    _service: PhantomData<fn() -> S>,
}

impl<S> Forward<S> {
    pub fn new(link: ActiveLink, standby: &str) -> Self {
        Self { link, standby: standby.into(), _service: PhantomData }
    }
}

impl<S> Clone for Forward<S> {
    fn clone(&self) -> Self {
        Self { link: self.link.clone(), standby: self.standby.clone(), _service: PhantomData }
    }
}

impl<S: NamedService> NamedService for Forward<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Forward<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let link = self.link.clone();
        let standby = self.standby.clone();
        Box::pin(async move {
            let start = tokio::time::Instant::now();
            let mut known = link.get();
            while known.is_none() && start.elapsed() < WAIT_FOR_ACTIVE {
                tokio::time::sleep(Duration::from_millis(100)).await;
                link.refresh();
                known = link.get();
            }
            let Some((url, mut channel)) = known else {
                return Ok(tonic::Status::unavailable(format!(
                    "{standby} is a standby and does not know the active provider yet"
                ))
                .into_http());
            };
            let result = async {
                std::future::poll_fn(|cx| Service::poll_ready(&mut channel, cx)).await?;
                Service::call(&mut channel, req).await
            }
            .await;
            Ok(result.unwrap_or_else(|e| {
                tonic::Status::unavailable(format!(
                    "{standby} is a standby; the active provider {url} is unreachable: {e}"
                ))
                .into_http()
            }))
        })
    }
}
