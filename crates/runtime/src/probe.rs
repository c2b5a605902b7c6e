//! What a server tells the infrastructure around it: systemd (ready, status, stopping, the
//! watchdog) and, on the plain-HTTP probe port (`--metrics-listen`), load balancers and
//! orchestrators — `/healthz` (the process answers) and `/readyz` (it should get traffic now,
//! and if not, why) — and Prometheus, `/metrics`.
//!
//! One [`Probe`] per process is the single place its state is set; systemd and the probe port
//! both read it, so they cannot disagree.
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::held::Held;

/// Connections the probe port holds at once; more wait to be accepted.
pub const MAX_PROBE_CONNECTIONS: usize = 32;

/// Whether the process should get traffic, and why (or why not), in words an operator reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub ready: bool,
    pub why: String,
}

/// The process's state as its probes and systemd see it. Cheap to clone; every clone is the
/// same state.
#[derive(Clone)]
pub struct Probe {
    state: Arc<watch::Sender<State>>,
    started: Arc<std::sync::Once>,
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe {
    pub fn new() -> Probe {
        Probe {
            state: Arc::new(watch::Sender::new(State { ready: false, why: "starting".into() })),
            started: Arc::new(std::sync::Once::new()),
        }
    }

    /// The process is up (listening, its store open): systemd's `READY=1` under `Type=notify`,
    /// and the watchdog fed from now on when the unit asks for one. Later calls (a standby
    /// taking over) only change the state.
    pub fn started(&self, ready: bool, why: impl Into<String>) {
        self.set(ready, why);
        self.started.call_once(|| {
            notify(&[NotifyState::Ready]);
            if let Some(every) = sd_notify::watchdog_enabled() {
                tokio::spawn(feed_watchdog(every / 2));
            }
        });
    }

    /// Whether it should get traffic now, and why; systemd shows `why` as the unit's status.
    pub fn set(&self, ready: bool, why: impl Into<String>) {
        let state = State { ready, why: why.into() };
        notify(&[NotifyState::Status(&state.why)]);
        self.state.send_replace(state);
    }

    /// A stop has begun: not ready any more, and systemd's `STOPPING=1`.
    pub fn stopping(&self) {
        self.set(false, "stopping");
        notify(&[NotifyState::Stopping]);
    }

    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }
}

/// Tells systemd, when it supervises this process with a notify socket (a no-op otherwise).
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog from the async runtime: a runtime that stops scheduling tasks
/// stops the pings, and systemd restarts the process.
async fn feed_watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

/// The probe port's flag, shared by every server.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProbeArgs {
    /// Plain-HTTP address for probes and metrics: `/healthz`, `/readyz` and `/metrics`
    /// (Prometheus text; off by default). Unencrypted and unauthenticated: bind it to loopback
    /// or a management network.
    #[arg(long = "metrics-listen", env = "UPDRAFT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl ProbeArgs {
    /// Binds the probe port, when asked for, says where on standard output (`PROGRAM: probes
    /// on http://ADDR`: with port 0 the kernel picks it), and serves it until `shutdown`.
    pub async fn start(
        &self,
        program: &str,
        probe: &Probe,
        metrics: crate::metrics::Scrape,
        shutdown: &CancellationToken,
    ) -> io::Result<()> {
        let Some(addr) = self.metrics_listen else { return Ok(()) };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} (--metrics-listen): {e}")))?;
        println!("{program}: probes on http://{}", listener.local_addr()?);
        let (probe, shutdown) = (probe.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = serve(listener, probe, metrics, shutdown).await {
                tracing::error!(error = %e, "probe port failed");
            }
        });
        Ok(())
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `shutdown`. `/readyz`
/// answers 200 with the reason when ready, 503 with it when not; `/healthz` answers 200 while
/// the process runs; `/metrics` collects the process's metrics at each request.
pub async fn serve(
    listener: TcpListener,
    probe: Probe,
    metrics: crate::metrics::Scrape,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let ready = probe.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    let text = tokio::task::spawn_blocking(move || metrics.text()).await.unwrap_or_default();
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
                }
            }),
        )
        .route("/healthz", get(move || async move { format!("alive: {}\n", probe.state().why) }))
        .route(
            "/readyz",
            get(move || async move {
                let s = ready.state();
                let code = if s.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (code, format!("{}: {}\n", if s.ready { "ready" } else { "not ready" }, s.why))
            }),
        );
    let listener = Limited { listener, slots: Arc::new(Semaphore::new(MAX_PROBE_CONNECTIONS)) };
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// A listener that holds at most `slots` connections open.
struct Limited {
    listener: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Limited {
    type Io = Held<OwnedSemaphorePermit>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Held<OwnedSemaphorePermit>, std::net::SocketAddr) {
        let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((io, addr)) => return (Held::new(io, slot), addr),
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "probe port cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_is_one_for_every_clone_and_a_stop_is_not_ready() {
        let p = Probe::new();
        let q = p.clone();
        assert_eq!(q.state(), State { ready: false, why: "starting".into() });
        p.set(true, "active");
        assert_eq!(q.state(), State { ready: true, why: "active".into() });
        q.stopping();
        assert_eq!(p.state(), State { ready: false, why: "stopping".into() });
    }
}
