//! The agent daemon: checks on a jittered schedule and when pushed, installs what its provider
//! offers, reports activity, and answers the local control socket.
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use updraft_core::keys::PublicKey;
use updraft_proto::v1::{
    ActionKind, Activity, ActivityKind, CheckRequest, InstalledProduct, MachineInfo, Offer, PushKind, ReportRequest,
    SubscribeRequest, Update,
};

use crate::client::{self, Client, Providers};
use crate::control::{self, CheckReport, InstalledView, Request, Response, StatusReport};
use crate::error::{AgentError, Result};
use crate::install;
use crate::state::{ActivityRec, AgentState, InstalledRec, PreviousRec};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub providers: Vec<String>,
    pub install_root: PathBuf,
    pub state_dir: PathBuf,
    pub trust_key: PublicKey,
    /// Overrides the check interval the provider asks for.
    pub interval: Option<(Duration, Duration)>,
    pub request_timeout: Duration,
}

/// Why a check runs.
#[derive(Debug, Clone)]
pub enum Reason {
    Schedule,
    Manual,
    Push(String),
    Resync,
}

struct Trigger {
    reason: Reason,
    reply: Option<oneshot::Sender<std::result::Result<CheckReport, String>>>,
}

pub struct Agent {
    cfg: AgentConfig,
    state: Mutex<AgentState>,
    providers: Mutex<Providers>,
    /// Provider's interval wish from the last check.
    interval: Mutex<(Duration, Duration)>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Result<Arc<Self>> {
        for d in [&cfg.install_root, &cfg.state_dir, &cfg.state_dir.join("downloads")] {
            std::fs::create_dir_all(d).map_err(|e| AgentError::io(d, e))?;
        }
        let cleaned = install::recover(&cfg.install_root)?;
        if !cleaned.is_empty() {
            tracing::warn!(?cleaned, "removed leftovers of an interrupted install");
        }
        let state = AgentState::load(&cfg.state_dir)?;
        let providers = Providers::new(cfg.providers.clone())?;
        let interval = cfg.interval.unwrap_or((Duration::from_secs(1800), Duration::from_secs(3600)));
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            providers: Mutex::new(providers),
            interval: Mutex::new(interval),
            cfg,
        }))
    }

    async fn machine_info(&self) -> MachineInfo {
        let st = self.state.lock().await;
        MachineInfo {
            name: self.cfg.name.clone(),
            hostname: updraft_runtime::hostname(),
            addresses: vec![],
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            installed: st
                .installed
                .iter()
                .map(|(p, r)| InstalledProduct {
                    product: p.clone(),
                    version: r.version.clone(),
                    update_id: r.update_id.clone(),
                    previous_version: r.previous.as_ref().map(|x| x.version.clone()).unwrap_or_default(),
                })
                .collect(),
        }
    }

    async fn record(&self, kind: ActivityKind, u: &Update, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(kind = kind.as_str_name(), update = %u.id, %detail, "activity");
        let mut st = self.state.lock().await;
        st.record(ActivityRec {
            at_unix_ms: now_ms(),
            kind: kind as i32,
            update_id: u.id.clone(),
            product: u.product.clone(),
            version: u.version.clone(),
            detail,
        });
    }

    async fn save(&self) -> Result<()> {
        let st = self.state.lock().await.clone();
        st.save(&self.cfg.state_dir)
    }

    /// One full check: ask, apply, report. Removals are followed by another round so that a
    /// machine returns to the previous version in the same check.
    pub async fn check_once(&self, reason: Reason) -> Result<CheckReport> {
        let span = tracing::info_span!("check", machine = %self.cfg.name, ?reason);
        async {
            let mut report = CheckReport::default();
            for _round in 0..3 {
                let (url, mut client) = match self.providers.lock().await.connect().await {
                    Ok(c) => c,
                    Err(e) => {
                        self.state.lock().await.last_error = Some(e.to_string());
                        let _ = self.save().await;
                        return Err(e);
                    }
                };
                report.provider = url.clone();
                let machine = self.machine_info().await;
                let manual = matches!(reason, Reason::Manual);
                let resp = match client::bounded(
                    &url,
                    "check",
                    self.cfg.request_timeout,
                    client.check(CheckRequest { machine: Some(machine), manual }),
                )
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        self.providers.lock().await.rotate();
                        self.state.lock().await.last_error = Some(e.to_string());
                        let _ = self.save().await;
                        return Err(e);
                    }
                };
                if self.cfg.interval.is_none() && resp.min_check_interval_secs > 0 {
                    let min = resp.min_check_interval_secs;
                    let max = resp.max_check_interval_secs.max(min);
                    *self.interval.lock().await = (Duration::from_secs(min.into()), Duration::from_secs(max.into()));
                }
                report.catalog_seq = resp.catalog_seq;
                let had_removal = resp.offers.iter().any(|o| o.action == ActionKind::Remove as i32);
                for offer in resp.offers {
                    match self.apply(&mut client, offer).await {
                        Ok(line) => report.done.push(line),
                        Err(e) => report.errors.push(e.to_string()),
                    }
                }
                {
                    let mut st = self.state.lock().await;
                    st.last_seen_seq = resp.catalog_seq;
                    st.last_check_unix = now_ms() / 1000;
                    st.last_provider = Some(url.clone());
                    st.last_error = report.errors.last().cloned();
                }
                self.save().await?;
                self.flush_reports(&url, &mut client).await;
                if !had_removal {
                    break;
                }
            }
            Ok(report)
        }
        .instrument(span)
        .await
    }

    async fn apply(&self, client: &mut Client, offer: Offer) -> Result<String> {
        let u = offer.update.ok_or_else(|| AgentError::Config("provider sent an offer without an update".into()))?;
        if offer.action == ActionKind::Remove as i32 {
            self.remove(&u, &offer.rollback_to_version).await
        } else {
            self.install(client, &u).await
        }
    }

    async fn install(&self, client: &mut Client, u: &Update) -> Result<String> {
        self.record(ActivityKind::DownloadStarted, u, format!("{} bytes", u.size)).await;
        let dir = self.cfg.state_dir.join("downloads");
        let pkg_path = match client::download(client, u, &dir, self.cfg.request_timeout).await {
            Ok(p) => p,
            Err(e) => {
                let kind = if matches!(e, AgentError::Verify { .. }) {
                    ActivityKind::VerifyFailed
                } else {
                    ActivityKind::DownloadFailed
                };
                self.record(kind, u, e.to_string()).await;
                return Err(e);
            }
        };
        self.record(ActivityKind::DownloadFinished, u, "").await;
        let root = self.cfg.install_root.clone();
        let key = self.cfg.trust_key;
        let (id, product, version) = (u.id.clone(), u.product.clone(), u.version.clone());
        let pkg2 = pkg_path.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<()> {
            let pkg = install::verify(&pkg2, &key, &id, &product, &version)?;
            install::stage(&pkg, &root, &id)?;
            install::swap_in(&root, &product)
        })
        .await
        .map_err(|e| AgentError::Install { update: u.id.clone(), reason: e.to_string() })?;
        // Whatever happened, this package file is done with: a verified one is installed, a
        // bad one must be fetched afresh.
        let _ = tokio::fs::remove_file(&pkg_path).await;
        if let Err(e) = result {
            let kind = if matches!(e, AgentError::Verify { .. }) {
                ActivityKind::VerifyFailed
            } else {
                ActivityKind::InstallFailed
            };
            self.record(kind, u, e.to_string()).await;
            return Err(e);
        }
        {
            let mut st = self.state.lock().await;
            let previous = st
                .installed
                .get(&u.product)
                .map(|r| PreviousRec { version: r.version.clone(), update_id: r.update_id.clone() });
            st.installed.insert(
                u.product.clone(),
                InstalledRec {
                    version: u.version.clone(),
                    update_id: u.id.clone(),
                    previous,
                    installed_unix: now_ms() / 1000,
                },
            );
        }
        self.save().await?;
        self.record(ActivityKind::Installed, u, format!("{} {} is live", u.product, u.version)).await;
        Ok(format!("installed {} {}", u.product, u.version))
    }

    async fn remove(&self, u: &Update, rollback_to: &str) -> Result<String> {
        let rec = self.state.lock().await.installed.get(&u.product).cloned();
        let Some(rec) = rec else { return Ok(format!("{} is not installed", u.product)) };
        let root = self.cfg.install_root.clone();
        let product = u.product.clone();
        let back = rec.previous.clone().filter(|p| {
            !rollback_to.is_empty() && p.version == rollback_to && install::old_dir(&root, &product).is_dir()
        });
        let to_old = back.is_some();
        let result = tokio::task::spawn_blocking(move || {
            if to_old { install::roll_back(&root, &product) } else { install::uninstall(&root, &product) }
        })
        .await
        .map_err(|e| AgentError::Install { update: u.id.clone(), reason: e.to_string() })?;
        if let Err(e) = result {
            self.record(ActivityKind::InstallFailed, u, format!("removal failed: {e}")).await;
            return Err(e);
        }
        let line = {
            let mut st = self.state.lock().await;
            match back {
                Some(prev) => {
                    st.installed.insert(
                        u.product.clone(),
                        InstalledRec {
                            version: prev.version.clone(),
                            update_id: prev.update_id,
                            previous: None,
                            installed_unix: now_ms() / 1000,
                        },
                    );
                    format!("removed {} {}, back on {}", u.product, u.version, prev.version)
                }
                None => {
                    st.installed.remove(&u.product);
                    format!("removed {} {}", u.product, u.version)
                }
            }
        };
        self.save().await?;
        self.record(ActivityKind::Removed, u, line.clone()).await;
        Ok(line)
    }

    /// Delivers pending activity; on failure it stays queued for the next attempt.
    async fn flush_reports(&self, url: &str, client: &mut Client) {
        let pending = self.state.lock().await.pending_activity.clone();
        if pending.is_empty() {
            return;
        }
        let activities = pending
            .iter()
            .map(|a| Activity {
                at_unix_ms: a.at_unix_ms,
                machine: self.cfg.name.clone(),
                kind: a.kind,
                update_id: a.update_id.clone(),
                product: a.product.clone(),
                version: a.version.clone(),
                detail: a.detail.clone(),
            })
            .collect();
        let machine = Some(self.machine_info().await);
        match client::bounded(
            url,
            "report",
            self.cfg.request_timeout,
            client.report(ReportRequest { machine, activities }),
        )
        .await
        {
            Ok(_) => {
                let mut st = self.state.lock().await;
                let n = pending.len().min(st.pending_activity.len());
                st.pending_activity.drain(..n);
                drop(st);
                let _ = self.save().await;
            }
            Err(e) => tracing::warn!(error = %e, "report not delivered; kept for later"),
        }
    }

    pub async fn status(&self, daemon_running: bool) -> StatusReport {
        let st = self.state.lock().await;
        status_from_state(&self.cfg.name, &self.cfg.providers, &st, daemon_running)
    }

    async fn next_delay(&self) -> Duration {
        let (min, max) = *self.interval.lock().await;
        let span = max.saturating_sub(min).as_millis() as u64;
        min + Duration::from_millis(if span == 0 { 0 } else { fastrand::u64(0..=span) })
    }
}

pub fn status_from_state(name: &str, providers: &[String], st: &AgentState, daemon_running: bool) -> StatusReport {
    StatusReport {
        name: name.to_string(),
        daemon_running,
        providers: providers.to_vec(),
        last_provider: st.last_provider.clone(),
        last_check_unix: st.last_check_unix,
        last_error: st.last_error.clone(),
        catalog_seq: st.last_seen_seq,
        pending_reports: st.pending_activity.len(),
        installed: st
            .installed
            .iter()
            .map(|(p, r)| InstalledView {
                product: p.clone(),
                version: r.version.clone(),
                update_id: r.update_id.clone(),
                previous_version: r.previous.as_ref().map(|x| x.version.clone()),
            })
            .collect(),
    }
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    let agent = Agent::new(cfg)?;
    let (tx, mut rx) = mpsc::channel::<Trigger>(16);
    let sock = control::socket_path(&agent.cfg.state_dir);
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).map_err(|e| AgentError::io(&sock, e))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).map_err(|e| AgentError::io(&sock, e))?;
    tracing::info!(name = %agent.cfg.name, providers = ?agent.cfg.providers, socket = %sock.display(), "agent started");

    tokio::spawn(
        control_loop(agent.clone(), listener, tx.clone(), shutdown.clone())
            .instrument(tracing::info_span!("control_socket")),
    );
    tokio::spawn(
        push_loop(agent.clone(), tx.clone(), shutdown.clone()).instrument(tracing::info_span!("push_subscriber")),
    );

    let mut next = tokio::time::Instant::now();
    let mut failures = 0u32;
    loop {
        let trigger = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => Trigger { reason: Reason::Schedule, reply: None },
            Some(t) = rx.recv() => t,
        };
        let scheduled = matches!(trigger.reason, Reason::Schedule);
        let result = agent.check_once(trigger.reason).await;
        let result_ok = result.is_ok();
        match &result {
            Ok(r) => tracing::info!(provider = %r.provider, done = ?r.done, errors = ?r.errors, "check finished"),
            Err(e) => tracing::warn!(error = %e, "check failed"),
        }
        if let Some(reply) = trigger.reply {
            let _ = reply.send(result.map_err(|e| e.to_string()));
        }
        if scheduled || failures > 0 {
            // A failed check is retried soon (2 s doubling, jittered, capped by the normal
            // interval); a good one waits for the jittered interval.
            failures = if result_ok { 0 } else { failures + 1 };
            let normal = agent.next_delay().await;
            let delay = if failures == 0 {
                normal
            } else {
                let base = Duration::from_secs(2u64.saturating_pow(failures.min(10)));
                (base + Duration::from_millis(fastrand::u64(0..=base.as_millis() as u64 / 2))).min(normal)
            };
            next = tokio::time::Instant::now() + delay;
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

async fn control_loop(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    tx: mpsc::Sender<Trigger>,
    shutdown: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = listener.accept() => c,
        };
        let Ok((stream, _)) = conn else { continue };
        let agent = agent.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, w) = stream.into_split();
            let resp = match control::read_request(r).await {
                Ok(Request::Status) => Response::Status(agent.status(true).await),
                Ok(Request::Check) => {
                    let (reply, wait) = oneshot::channel();
                    if tx.send(Trigger { reason: Reason::Manual, reply: Some(reply) }).await.is_err() {
                        Response::Error { message: "agent is shutting down".into() }
                    } else {
                        match wait.await {
                            Ok(Ok(r)) => Response::Check(r),
                            Ok(Err(message)) => Response::Error { message },
                            Err(_) => Response::Error { message: "check was abandoned".into() },
                        }
                    }
                }
                Err(message) => Response::Error { message },
            };
            let _ = control::write_response(w, &resp).await;
        });
    }
}

/// Holds a push stream to a provider; a high-priority event, or a catalog version newer than
/// the one last seen, triggers a check at once.
async fn push_loop(agent: Arc<Agent>, tx: mpsc::Sender<Trigger>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let connected = agent.providers.lock().await.connect().await;
        if let Ok((url, mut client)) = connected {
            let last_seen_seq = agent.state.lock().await.last_seen_seq;
            let req = SubscribeRequest { machine: agent.cfg.name.clone(), last_seen_seq };
            if let Ok(Ok(resp)) = tokio::time::timeout(agent.cfg.request_timeout, client.subscribe(req)).await {
                tracing::info!(provider = %url, "push stream open");
                backoff = Duration::from_millis(500);
                let mut stream = resp.into_inner();
                loop {
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ev = stream.next() => ev,
                    };
                    let Some(Ok(ev)) = ev else { break };
                    let reason = match PushKind::try_from(ev.kind) {
                        Ok(PushKind::HighPriority) => Some(Reason::Push(ev.update_id.clone())),
                        Ok(PushKind::Hello) if ev.catalog_seq != agent.state.lock().await.last_seen_seq => {
                            Some(Reason::Resync)
                        }
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        tracing::info!(?reason, seq = ev.catalog_seq, "push received");
                        // A full queue already holds a check that will see this change.
                        let _ = tx.try_send(Trigger { reason, reply: None });
                    }
                }
                tracing::warn!(provider = %url, "push stream closed");
                agent.providers.lock().await.rotate();
            }
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
