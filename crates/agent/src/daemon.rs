//! The agent daemon: checks on a jittered schedule and when pushed, installs what its provider
//! offers, reports activity, and answers the local control socket.
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use updraft_core::keys::PublicKey;
use updraft_core::package::Header;
use updraft_core::policy::Mode;
use updraft_proto::v1::{
    ActionKind, Activity, ActivityKind, CheckRequest, CheckResponse, GroupSettings, InstalledProduct, LocalSettings,
    MachineInfo, Offer, PushKind, ReportRequest, SubscribeRequest, Update,
};

use crate::client::{self, Client, Providers};
use crate::control::{
    self, CheckReport, ConfigReport, InstalledView, ProviderView, Request, Response, StatusReport, TestReport,
};
use crate::error::{AgentError, Result};
use crate::install;
use crate::localtime;
use crate::state::{
    ActivityRec, AgentState, InstalledRec, LocalSettings as LocalRec, PolicyRec, PreviousRec, WaitingRec,
};
use crate::{failpoint, installer, journal, lifecycle, selfupdate};

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
    pub max_message_bytes: usize,
    /// Most bytes the download cache may hold.
    pub download_cache_bytes: u64,
    /// Browse mDNS for providers announced with this key (None: do not browse).
    pub discovery_key: Option<String>,
    /// Disk space always left free: downloads and installs that would eat into it are refused.
    pub disk_reserve_bytes: u64,
    /// Mutual TLS with providers, or plaintext when explicitly asked for.
    pub transport: updraft_runtime::tls::Transport,
    /// The product that is this agent (its own updates replace the running binary).
    pub self_product: String,
    /// How long a new agent has to report in before the previous one comes back.
    pub self_update_deadline: Duration,
    /// This process's command line, to start the new (or previous) agent with.
    pub argv: Vec<std::ffi::OsString>,
    /// Pinned catalog keys: when set, every answer must carry a fresh statement signed by one
    /// of them that lists every offer.
    pub catalog_keys: Vec<PublicKey>,
    /// What this machine is (for the server version ceiling); an administrator may override it.
    pub role: updraft_core::model::Role,
}

/// Why a check runs.
#[derive(Debug, Clone)]
pub enum Reason {
    Schedule,
    /// The first check after the agent starts: the one moment `apply-at restart` packages
    /// may be installed.
    Startup,
    /// Someone ran `agent check`; `later` leaves high-priority updates for the install window.
    Manual {
        later: bool,
    },
    Push(String),
    Resync,
    /// The push stream's hello: its provider's catalog is at this sequence, which the agent had
    /// not seen. Needless once a check since has seen it (see [`Reason::seen`]).
    Behind(u64),
    /// Someone ran `agent apply`: install what waits (these ids only, when given).
    Apply(Vec<String>),
    /// The install window opened while updates were waiting.
    Window,
}

impl Reason {
    /// Whether this check would look again at a catalog the agent has already seen: a hello
    /// queued behind the start-up check, which saw the same sequence, is dropped rather than
    /// make every restarting agent check twice.
    fn seen(&self, last_seen_seq: u64) -> bool {
        matches!(self, Reason::Behind(seq) if *seq == last_seen_seq)
    }
}

/// What to do with one offer, given the mode, the window and why this check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Apply,
    /// Download now, install later (automatic outside its window, download mode).
    Stage,
    /// Only note that it waits (notify and manual modes, deferred high priority).
    Note,
}

/// A package that may only be installed when the agent starts (`--apply-at restart`).
fn restart_only(u: &Update) -> bool {
    u.install_properties.get(updraft_core::package::APPLY_AT).is_some_and(|v| v == "restart")
}

/// When a check may act on updates: the group's mode, whether its install window is open now,
/// and whether automatic machines download ahead of the window.
#[derive(Debug, Clone, Copy)]
struct When {
    mode: Mode,
    in_window: bool,
    download_early: bool,
}

fn decide(when: When, reason: &Reason, offer: &Offer, deferred: &[String]) -> Decision {
    let When { mode, in_window, download_early } = when;
    let Some(u) = &offer.update else { return Decision::Note };
    if offer.action == ActionKind::Remove as i32 {
        return Decision::Apply; // a removal overrides local settings
    }
    if restart_only(u) && !matches!(reason, Reason::Startup) {
        return Decision::Stage; // downloaded now, installed when the agent next starts
    }
    let manual = matches!(reason, Reason::Manual { .. });
    if u.high_priority {
        if matches!(reason, Reason::Manual { later: true }) || (deferred.contains(&u.id) && !in_window) {
            return Decision::Note;
        }
        return Decision::Apply; // high priority ignores mode and window
    }
    match reason {
        Reason::Apply(ids) if ids.is_empty() || ids.contains(&u.id) => return Decision::Apply,
        Reason::Apply(_) => return Decision::Note,
        _ => {}
    }
    match mode {
        Mode::Automatic if in_window || manual => Decision::Apply,
        // The install time is when machines download and install (seed 002), unless the
        // group prestages: downloads ahead, installs in the window.
        Mode::Automatic if download_early => Decision::Stage,
        Mode::Automatic => Decision::Note,
        Mode::Download => Decision::Stage,
        Mode::Manual if manual => Decision::Apply,
        Mode::Notify | Mode::Manual => Decision::Note,
    }
}

/// Work that changes the machine. The main loop runs jobs one at a time, in the order they
/// come: nothing installs, adopts, restores or changes settings while another job runs.
#[derive(Debug)]
enum Job {
    Check(Reason),
    /// A look at the installs in their verification window.
    Verify,
    Adopt {
        product: String,
        version: String,
        upgrade_code: String,
    },
    Restore {
        product: String,
        version: Option<String>,
    },
    /// A check against one provider whose answer is not acted on.
    TestProvider {
        target: String,
    },
    Configure {
        mode: Option<String>,
        install_day: Option<i32>,
        install_hour: Option<i32>,
        reset: bool,
    },
}

/// A job asked for by the control socket, the push stream or discovery.
struct Queued {
    job: Job,
    /// Where the answer goes (the control socket's caller), if anyone waits for it.
    reply: Option<oneshot::Sender<Response>>,
    /// Another job was running when this one was asked for.
    waited: bool,
}

impl Queued {
    fn check(reason: Reason) -> Self {
        Queued { job: Job::Check(reason), reply: None, waited: false }
    }
}

/// What the main loop reacts to: a closed set.
enum Event {
    /// The schedule's timer: the first check after start, then the scheduled ones.
    Timer,
    /// The install window opened while updates wait for it.
    Window,
    /// A verification look is due.
    Verify,
    /// A queued job.
    Job(Queued),
    Shutdown,
}

/// The agent as the main loop owns it: its state, the interval and a self-update on trial are
/// changed only here, by one job at a time; the tasks beside the loop see [`Shared`].
pub struct Agent {
    cfg: Arc<AgentConfig>,
    state: AgentState,
    /// Provider's interval wish from the last check.
    interval: (Duration, Duration),
    /// Set while this process is a new agent on trial (see `selfupdate`).
    trial: Option<journal::Op>,
    shared: Arc<Shared>,
}

/// What the main loop shares with the control socket and the push stream: the state as last
/// saved (published, read-only), the providers (the push stream connects too), and two signals.
pub struct Shared {
    cfg: Arc<AgentConfig>,
    providers: Mutex<Providers>,
    /// The state as of its last save, for `agent status` and the push stream.
    saved: tokio::sync::watch::Sender<Arc<AgentState>>,
    /// A job runs in the main loop (`agent cancel` has something to stop; a settings change
    /// waits).
    busy: std::sync::atomic::AtomicBool,
    /// `agent cancel`: stops the running check's downloads and the tasks it has not begun.
    cancel: Arc<crate::cancel::Cancel>,
    /// The daemon is stopping (SIGTERM): the running job is cancelled as by `agent cancel`.
    stopping: CancellationToken,
}

/// How often an install in its verification window is looked at: ten looks a window, between
/// one second and a minute apart.
fn verify_step(window: Duration) -> Duration {
    (window / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Agent {
    /// The agent over what start-up recovery left ([`journal::start_up`]).
    fn new(cfg: AgentConfig, start_up: journal::Started) -> Result<Self> {
        let journal::Started { state, trial } = start_up;
        let mut providers = Providers::new(
            cfg.providers.clone(),
            cfg.max_message_bytes,
            cfg.discovery_key.clone(),
            cfg.transport.clone(),
        )?;
        // The providers the machine's group assigns, as last learned: a restarted branch agent
        // goes to its site first, and keeps working from it while the centre is down.
        if let Some(p) = &state.policy {
            providers.set_assigned(&p.providers);
        }
        let interval = cfg.interval.unwrap_or((Duration::from_secs(1800), Duration::from_secs(3600)));
        let cfg = Arc::new(cfg);
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            providers: Mutex::new(providers),
            saved: tokio::sync::watch::Sender::new(Arc::new(state.clone())),
            busy: Default::default(),
            cancel: Default::default(),
            stopping: CancellationToken::new(),
        });
        Ok(Self { cfg, state, interval, trial, shared })
    }

    /// A check: this machine, and the digest of the statement it holds (not sent again).
    async fn check_request(&mut self, manual: bool) -> CheckRequest {
        let statement_digest = match (self.cfg.catalog_keys.is_empty(), &self.state.statement) {
            (false, Some(s)) => updraft_core::freshness::digest(&s.body),
            _ => vec![],
        };
        CheckRequest { machine: Some(self.machine_info().await), manual, statement_digest }
    }

    async fn machine_info(&mut self) -> MachineInfo {
        let st = &self.state;
        let local = LocalSettings {
            mode: st.local.mode.as_deref().and_then(|m| m.parse::<Mode>().ok()).map(Mode::to_wire).unwrap_or(0),
            install_day: st.local.install_day,
            install_hour: st.local.install_hour,
        };
        MachineInfo {
            problems: st.problems(),
            restart_needed: st.restart_boot_id.as_deref().is_some_and(|b| b == localtime::boot_id()),
            local: Some(local),
            waiting: st.waiting.iter().map(|w| w.update_id.clone()).collect(),
            name: self.cfg.name.clone(),
            hostname: updraft_runtime::hostname(),
            addresses: vec![],
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            role: self.cfg.role.as_str().to_string(),
            agent_product: self.cfg.self_product.clone(),
            // The provider expects the next check within the longest wait; past it (and a grace)
            // the machine shows as silent.
            contact_interval_secs: self.interval.1.as_secs().try_into().unwrap_or(u32::MAX),
            installed: st
                .installed
                .iter()
                .map(|(p, r)| InstalledProduct {
                    product: p.clone(),
                    version: r.version.clone(),
                    update_id: r.update_id.clone(),
                    previous_version: r.previous.as_ref().map(|x| x.version.clone()).unwrap_or_default(),
                    upgrade_code: r.upgrade_code.clone(),
                    product_code: r.product_code.clone(),
                    adopted: r.adopted,
                    installed_unix: r.installed_unix,
                })
                .collect(),
        }
    }

    async fn record(&mut self, kind: ActivityKind, u: &Update, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(kind = kind.as_str_name(), update = %u.id, %detail, "activity");
        let st = &mut self.state;
        st.record(ActivityRec {
            at_unix_ms: now_ms(),
            kind: kind as i32,
            update_id: u.id.clone(),
            product: u.product.clone(),
            version: u.version.clone(),
            detail,
        });
    }

    async fn save(&mut self) -> Result<()> {
        self.state.save(&self.cfg.state_dir)?;
        self.shared.saved.send_replace(Arc::new(self.state.clone()));
        Ok(())
    }

    /// One full check: ask, act on each offer as the policy says, report. Removals are followed
    /// by another round so that a machine returns to the previous version in the same check.
    pub async fn check_once(&mut self, reason: Reason) -> Result<CheckReport> {
        let span = tracing::info_span!(parent: None, "check", machine = %self.cfg.name, ?reason);
        // A cancel stops the check that runs when it is asked for, not a later one; a stop
        // (SIGTERM) cancels whatever runs from then on.
        let reset = |a: &Self| {
            if !a.shared.stopping.is_cancelled() {
                a.shared.cancel.reset();
            }
        };
        reset(self);
        let result = self.check_rounds(reason).instrument(span).await;
        reset(self);
        result
    }

    async fn check_rounds(&mut self, reason: Reason) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        for _round in 0..3 {
            // Fall back within this check: a provider may accept the connection but refuse
            // the check (a site that has not synchronised), and the next one should answer.
            let attempts = self.shared.providers.lock().await.urls().len().max(1);
            let manual = matches!(reason, Reason::Manual { .. } | Reason::Apply(_));
            let mut answered = None;
            let mut last_err = None;
            for _ in 0..attempts {
                let (url, mut client) = match self.connect().await {
                    Ok(c) => c,
                    Err(e) => {
                        last_err = Some(e);
                        break; // connect already tried every provider
                    }
                };
                let req = self.check_request(manual).await;
                let answer = match client::bounded(&url, "check", self.cfg.request_timeout, client.check(req)).await {
                    Ok(r) => self.verify_answer(&url, r).await,
                    Err(e) => Err(e),
                };
                match answer {
                    Ok((r, refused)) => {
                        // Refused offers are a problem of this provider's until an answer
                        // of its has none; each new refusal is recorded once as activity.
                        let joined = refused.iter().map(|(_, why)| why.as_str()).collect::<Vec<_>>().join("; ");
                        let st = &mut self.state;
                        let new = st.refused_answers.get(&url) != Some(&joined);
                        match refused.is_empty() {
                            true => st.refused_answers.remove(&url),
                            false => st.refused_answers.insert(url.clone(), joined),
                        };
                        for (offered, why) in &refused {
                            tracing::warn!(provider = %url, "{why}");
                            if new {
                                self.record(ActivityKind::Error, offered, format!("from {url}: {why}")).await;
                            }
                            report.errors.push(why.clone());
                        }
                        answered = Some((url, client, r));
                        break;
                    }
                    Err(e @ AgentError::Verify { .. }) => {
                        tracing::warn!(provider = %url, error = %e, "answer refused; trying the next provider");
                        self.state.refused_answers.insert(url.clone(), e.to_string());
                        self.shared.providers.lock().await.rotate(&e.to_string());
                        last_err = Some(e);
                    }
                    Err(e) => {
                        tracing::warn!(provider = %url, error = %e, "check refused; trying the next provider");
                        self.shared.providers.lock().await.rotate(&e.to_string());
                        last_err = Some(e);
                    }
                }
            }
            let Some((url, mut client, resp)) = answered else {
                let e = last_err.unwrap_or_else(|| AgentError::Config("no provider configured".into()));
                self.state.last_error = Some(e.to_string());
                let _ = self.save().await;
                return Err(e);
            };
            report.provider = url.clone();
            if self.cfg.interval.is_none() && resp.min_check_interval_secs > 0 {
                let min = resp.min_check_interval_secs;
                let max = resp.max_check_interval_secs.max(min);
                self.interval = (Duration::from_secs(min.into()), Duration::from_secs(max.into()));
            }
            // A provider that states no policy gets the default group's: any time, automatic.
            let policy = resp.policy.clone().unwrap_or_default();
            let settings = policy.settings.clone().unwrap_or(GroupSettings {
                mode: Mode::Automatic.to_wire(),
                install_day: -1,
                install_hour: -1,
                providers: vec![],
                download_early: false,
            });
            let mode = Mode::from_wire(settings.mode).unwrap_or_default();
            let window = updraft_core::policy::in_window(settings.install_day, settings.install_hour, localtime::now());
            self.shared.providers.lock().await.set_assigned(&settings.providers);
            report.catalog_seq = resp.catalog_seq;
            let had_removal = resp.offers.iter().any(|o| o.action == ActionKind::Remove as i32);
            let deferred = self.state.deferred.clone();
            let mut waiting = Vec::new();
            let mut foreign = std::collections::BTreeMap::new();
            let mut held_with: std::collections::BTreeMap<String, String> = Default::default();
            for offer in resp.offers {
                if self.shared.cancel.is_requested() {
                    report.errors.push(AgentError::Cancelled.to_string());
                    break;
                }
                let Some(u) = offer.update.clone() else { continue };
                // A directory this agent has no receipt for is someone else's: never touched.
                // What it would have brought along waits with it.
                if offer.action == ActionKind::Install as i32 {
                    let refused = self.state.not_ours(&self.cfg.install_root, &u.product);
                    if let Some(problem) = refused {
                        tracing::warn!(product = %u.product, "{problem}");
                        // Once in the activity log (and so at once in the report), not every check.
                        if !self.state.foreign.contains_key(&u.product) {
                            self.record(ActivityKind::Error, &u, problem.clone()).await;
                        }
                        report.errors.push(problem.clone());
                        foreign.insert(u.product.clone(), problem);
                        held_with.extend(u.related_installs.iter().map(|r| (r.clone(), u.product.clone())));
                        continue;
                    }
                    if let Some(by) = held_with.get(&u.product) {
                        report.waiting.push(format!(
                            "{} {} (brought in by {by}, which cannot be installed here)",
                            u.product, u.version
                        ));
                        continue;
                    }
                }
                let when = When { mode, in_window: window, download_early: settings.download_early };
                let mut decision = decide(when, &reason, &offer, &deferred);
                // Crash-loop guard: an update that failed the same way too often waits for
                // someone to ask for it by id.
                let asked = matches!(&reason, Reason::Apply(ids) if ids.contains(&u.id));
                if matches!(decision, Decision::Apply | Decision::Stage) && offer.action == ActionKind::Install as i32 {
                    let st = &mut self.state;
                    if asked {
                        st.failures.remove(&u.id);
                    } else if st.given_up(&u.id) {
                        decision = Decision::Note;
                    }
                }
                let result = match decision {
                    Decision::Apply => self.apply(&mut client, offer).await.map(Some),
                    Decision::Stage => self.stage_download(&mut client, &u).await.map(|_| None),
                    Decision::Note => Ok(None),
                };
                match result {
                    Ok(Some(line)) => report.done.push(line),
                    Ok(None) => {
                        let downloaded = decision == Decision::Stage;
                        let (gave_up, held) = {
                            let st = &self.state;
                            (st.given_up(&u.id), st.held(&u.id).map(str::to_string))
                        };
                        let why = match (decision, u.high_priority) {
                            _ if held.is_some() => held.as_deref().unwrap_or_default(),
                            _ if gave_up => {
                                "stopped retrying after repeated identical failures; `agent apply --select ID` tries again"
                            }
                            (Decision::Stage, _) if restart_only(&u) => {
                                "downloaded; installs when the agent next starts (apply-at restart)"
                            }
                            (_, true) => "high priority, left for the next install window",
                            (Decision::Stage, _) if mode == Mode::Automatic => {
                                "downloaded; installs in the install window"
                            }
                            (Decision::Stage, _) => "downloaded; run `agent apply` to install",
                            _ if mode == Mode::Automatic => "downloads and installs in the install window",
                            _ if mode == Mode::Notify => "waiting; run `agent apply` to install",
                            _ => "waiting; run `agent check` or `agent apply`",
                        };
                        report.waiting.push(format!("{} {} ({why})", u.product, u.version));
                        waiting.push(WaitingRec {
                            update_id: u.id.clone(),
                            content_hash: u.content_hash.clone(),
                            product: u.product.clone(),
                            version: u.version.clone(),
                            downloaded,
                            high_priority: u.high_priority,
                        });
                    }
                    Err(e) => report.errors.push(e.to_string()),
                }
            }
            {
                let st = &mut self.state;
                if let Reason::Manual { later: true } = reason {
                    for w in waiting.iter().filter(|w| w.high_priority) {
                        if !st.deferred.contains(&w.update_id) {
                            st.deferred.push(w.update_id.clone());
                        }
                    }
                }
                // A deferral ends once its update is no longer waiting.
                st.deferred.retain(|d| waiting.iter().any(|w| &w.update_id == d));
                st.waiting = waiting;
                st.foreign = foreign;
                st.policy = Some(PolicyRec {
                    group: policy.group.clone(),
                    mode: mode.to_string(),
                    install_day: settings.install_day,
                    install_hour: settings.install_hour,
                    providers: settings.providers.clone(),
                    managed: policy.managed,
                    served_by: resp.served_by.clone(),
                });
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

    /// With pinned catalog keys, an answer counts only if it carries a statement signed by one
    /// of them, not older than what this agent has seen, not expired, and listing every
    /// offered update with exactly the offered hash and size; and then the agent acts only on
    /// its own plan from the centre's signed decisions (`answer`), reporting every offer it
    /// refused. Without pinned keys (an explicit opt-out) the answer is taken as given.
    async fn verify_answer(
        &mut self,
        url: &str,
        mut resp: CheckResponse,
    ) -> Result<(CheckResponse, Vec<(Update, String)>)> {
        if self.cfg.catalog_keys.is_empty() {
            crate::answer::bound_unsigned(&mut resp);
            return Ok((resp, vec![]));
        }
        let (seen, me, held) = {
            let st = &self.state;
            (st.catalog_version, self.machine_input(st), st.statement.clone())
        };
        let checked =
            crate::answer::check(&self.cfg.catalog_keys, seen, now_ms(), &self.cfg.name, &me, held.as_ref(), resp)
                .map_err(|reason| AgentError::Verify { update: format!("the answer of {url}"), reason })?;
        let s = &mut self.state;
        // Verified as not older than any seen, so never older than the one held.
        s.catalog_version = s.catalog_version.max(checked.version);
        s.statement = Some(checked.statement);
        Ok((checked.resp, checked.refused))
    }

    /// What the engine needs to know of this machine: its receipts, role, own product and the
    /// settings it chose for itself.
    fn machine_input(&self, st: &AgentState) -> updraft_core::decisions::MachineInput {
        updraft_core::decisions::MachineInput {
            installed: st
                .installed
                .iter()
                .filter_map(|(p, r)| {
                    Some(updraft_core::plan::InstalledItem {
                        product: p.clone(),
                        version: r.version.parse().ok()?,
                        upgrade_code: r.upgrade_code.clone(),
                    })
                })
                .collect(),
            role: self.cfg.role,
            self_product: (!self.cfg.self_product.is_empty()).then(|| self.cfg.self_product.clone()),
            local_mode: st.local.mode.as_deref().and_then(|m| m.parse::<Mode>().ok()),
            local_day: st.local.install_day,
            local_hour: st.local.install_hour,
        }
    }

    /// Connects to a provider, keeping track of the ones that could not be reached.
    async fn connect(&mut self) -> Result<(String, Client)> {
        let result = self.shared.providers.lock().await.connect().await;
        let urls = self.shared.providers.lock().await.urls().to_vec();
        let st = &mut self.state;
        let before = st.unreachable.clone();
        let now = now_ms() / 1000;
        let outcome = match result {
            Ok((url, client, failures)) => {
                for (failed, _) in failures {
                    st.unreachable.entry(failed).or_insert(now);
                }
                st.unreachable.remove(&url);
                Ok((url, client))
            }
            Err(e) => {
                for url in urls {
                    st.unreachable.entry(url).or_insert(now);
                }
                st.last_error = Some(e.to_string());
                Err(e)
            }
        };
        // Written only when reachability changed: connecting happens on every check.
        if st.unreachable != before
            && let Err(e) = self.save().await
        {
            tracing::warn!(error = %e, "could not save which providers are unreachable");
        }
        outcome
    }

    /// Downloads an update for later, so the install itself is quick when its time comes.
    async fn stage_download(&mut self, client: &mut Client, u: &Update) -> Result<()> {
        let dir = client::downloads_dir(&self.cfg.state_dir);
        let hex = u.content_hash.trim_start_matches(updraft_core::hash::PREFIX);
        if dir.join(format!("{hex}.pkg")).is_file() {
            return Ok(());
        }
        if let Err(e) = self.make_room(u).await {
            self.record(ActivityKind::DownloadFailed, u, e.to_string()).await;
            return Err(e);
        }
        self.record(ActivityKind::DownloadStarted, u, format!("{} bytes, for later", u.size)).await;
        let path = self.download(client, u).await?;
        // Check it now, so a bad package is refused when it arrives, not when it is due.
        let key = self.cfg.trust_key;
        let (id, product, version, p) = (u.id.clone(), u.product.clone(), u.version.clone(), path.clone());
        let verified =
            tokio::task::spawn_blocking(move || install::verify(&p, &key, &id, &product, &version).map(|_| ()))
                .await
                .map_err(|e| AgentError::Verify { update: u.id.clone(), reason: e.to_string() })?;
        if let Err(e) = verified {
            let _ = tokio::fs::remove_file(&path).await;
            self.record(ActivityKind::VerifyFailed, u, e.to_string()).await;
            return Err(e);
        }
        self.record(ActivityKind::DownloadFinished, u, "verified; waiting to be applied").await;
        Ok(())
    }

    /// Downloads `u` into the package cache, recording how it went.
    async fn download(&mut self, client: &mut Client, u: &Update) -> Result<PathBuf> {
        let dir = client::downloads_dir(&self.cfg.state_dir);
        let result = client::download(client, u, &dir, self.cfg.request_timeout, &self.shared.cancel).await;
        self.record_download(u, result).await
    }

    /// Downloads `u` and unpacks it into its staging tree as it arrives (resuming an earlier
    /// attempt), keeping only its header as `head`; returns the accepted header once the tree
    /// is the whole package. `None`: the unpacking found the package wrong (nothing is kept),
    /// so the caller downloads it as a file instead.
    async fn download_streamed(&mut self, client: &mut Client, u: &Update, head: &Path) -> Result<Option<Header>> {
        let (root, key) = (&self.cfg.install_root, self.cfg.trust_key);
        let s = match install::stage_while_downloading(root, key, &u.id, &u.product, &u.version, head.into()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(update = %u.id, error = %e, "could not unpack while downloading; downloading the file");
                return Ok(None);
            }
        };
        let (timeout, cancel) = (self.cfg.request_timeout, self.shared.cancel.clone());
        let fetched = client::download_streamed(client, u, s.from, s.hasher, s.tx, timeout, &cancel).await;
        // The unpacking may lag the download: a failed download or a cancel stops it at its
        // next chunk (what it has not written is fetched again next time).
        let abandon = || s.abandon.store(true, std::sync::atomic::Ordering::Relaxed);
        if fetched.is_err() {
            abandon();
        }
        let mut task = s.task;
        let ended = tokio::select! {
            biased;
            ended = &mut task => ended,
            _ = cancel.requested() => {
                abandon();
                task.await
            }
        }
        .map_err(|e| AgentError::Install { update: u.id.clone(), reason: e.to_string() });
        match (fetched, ended) {
            (Ok(()), Ok(Ok(install::Ended::Whole(header)))) => Ok(Some(*header)),
            (Ok(()), Ok(Ok(install::Ended::Stopped))) if cancel.is_requested() => {
                self.record_download(u, Err(AgentError::Cancelled)).await
            }
            // Every byte came and matched, but the package was wrong: the file's install says how.
            (Ok(()), _) | (_, Ok(Err(_))) => {
                self.discard_streamed(u, head).await;
                tracing::info!(update = %u.id, "the package was refused while unpacking; downloading the file to say why");
                Ok(None)
            }
            (Err(e), ended) => {
                // Content that is not what was promised is not kept; a download cut short is.
                if matches!(e, AgentError::Verify { .. }) || !matches!(ended, Ok(Ok(install::Ended::Stopped))) {
                    self.discard_streamed(u, head).await;
                }
                self.record_download(u, Err(e)).await
            }
        }
    }

    /// Drops what a streamed download of `u` kept (see [`install::discard_streamed`]).
    async fn discard_streamed(&self, u: &Update, head: &Path) {
        let (root, product, head) = (self.cfg.install_root.clone(), u.product.clone(), head.to_path_buf());
        let _ = tokio::task::spawn_blocking(move || install::discard_streamed(&root, &product, &head)).await;
    }

    /// Records how a download went. Content that fails its hash counts as a failure of the
    /// update (see [`Agent::count_failure`]).
    async fn record_download<T>(&mut self, u: &Update, result: Result<T>) -> Result<T> {
        match &result {
            Ok(_) => {}
            Err(e @ AgentError::Verify { .. }) => {
                self.record(ActivityKind::VerifyFailed, u, e.to_string()).await;
                self.count_failure(u, e).await;
            }
            Err(e) => self.record(ActivityKind::DownloadFailed, u, e.to_string()).await,
        }
        result
    }

    /// Declares `product` at `version`, installed under the install root by other means: a
    /// receipt is written and nothing on disk changes. Its first update keeps the tree as
    /// `P_old`, like any update. Refused for a product Updraft installed itself.
    pub async fn adopt(&mut self, product: &str, version: &str, upgrade_code: &str) -> Result<String> {
        updraft_core::model::validate_product(product)?;
        let v: updraft_core::Version = version.parse()?;
        let live = install::live_dir(&self.cfg.install_root, product);
        match std::fs::symlink_metadata(&live) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(AgentError::Config(format!("{} is not a directory", live.display()))),
            Err(e) => return Err(AgentError::io(&live, e)),
        }
        // (Never while an install runs: jobs run one at a time in the main loop.)
        {
            let st = &mut self.state;
            if let Some(r) = st.installed.get(product).filter(|r| !r.adopted) {
                return Err(AgentError::Config(format!(
                    "{product} {} was installed by Updraft ({}); there is nothing to adopt",
                    r.version, r.update_id
                )));
            }
            st.installed.insert(
                product.to_string(),
                InstalledRec {
                    version: v.to_string(),
                    installed_unix: now_ms() / 1000,
                    upgrade_code: upgrade_code.to_string(),
                    adopted: true,
                    ..Default::default()
                },
            );
            st.foreign.remove(product);
        }
        self.save().await?;
        tracing::info!(%product, version = %v, "adopted");
        Ok(format!(
            "adopted {product} {v} at {}: its updates come with the next check (`agent check` looks now)",
            live.display()
        ))
    }

    /// Changes a default-group machine's own settings; refused when a group manages it. A job
    /// of the main loop, so never while a check or install runs (seed 002); the loop then checks
    /// to tell the provider.
    pub async fn configure(
        &mut self,
        mode: Option<String>,
        day: Option<i32>,
        hour: Option<i32>,
        reset: bool,
    ) -> Result<()> {
        {
            let st = &mut self.state;
            if let Some(p) = st.policy.as_ref().filter(|p| p.managed) {
                return Err(AgentError::Config(format!(
                    "this machine is managed by group {:?} on provider {}; change its settings there (admin-cli group set)",
                    p.group, p.served_by
                )));
            }
            if let Some(m) = &mode {
                m.parse::<Mode>()?;
            }
            if day.is_some_and(|d| !(-1..=6).contains(&d)) || hour.is_some_and(|h| !(-1..=23).contains(&h)) {
                return Err(AgentError::Config("install day must be -1..6 and install hour -1..23".into()));
            }
            if reset {
                st.local = LocalRec::default();
            }
            if mode.is_some() {
                st.local.mode = mode;
            }
            if day.is_some() {
                st.local.install_day = day;
            }
            if hour.is_some() {
                st.local.install_hour = hour;
            }
        }
        self.save().await
    }

    /// The effective settings as of the last check, and the machine's own choices.
    pub async fn config_report(&mut self, waited: Option<String>) -> ConfigReport {
        let st = &self.state;
        let p = st.policy.clone();
        ConfigReport {
            group: p.as_ref().map(|p| p.group.clone()).unwrap_or_default(),
            mode: p.as_ref().map(|p| p.mode.clone()).unwrap_or_default(),
            install_day: updraft_core::policy::day_name(p.as_ref().map(|p| p.install_day).unwrap_or(-1)).into(),
            install_hour: updraft_core::policy::hour_name(p.as_ref().map(|p| p.install_hour).unwrap_or(-1)),
            local: st.local.clone(),
            waited,
        }
    }

    /// How long until the install window opens, if updates wait for it.
    async fn window_wait(&mut self) -> Option<Duration> {
        let st = &self.state;
        let p = st.policy.as_ref()?;
        if p.mode != Mode::Automatic.as_str() || st.waiting.is_empty() {
            return None;
        }
        let minutes = updraft_core::policy::minutes_until_window(p.install_day, p.install_hour, localtime::now());
        Some(Duration::from_secs(u64::from(minutes) * 60 + 5))
    }

    async fn apply(&mut self, client: &mut Client, offer: Offer) -> Result<String> {
        let u = offer.update.ok_or_else(|| AgentError::Config("provider sent an offer without an update".into()))?;
        if offer.action == ActionKind::Remove as i32 {
            self.remove(client, &u, &offer.rollback_to_version, offer.rollback).await
        } else {
            self.install(client, &u).await
        }
    }

    /// Frees room in the download cache for `u`: files no waiting update needs go first, oldest
    /// first. Fails when the package cannot fit under the limit.
    async fn make_room(&mut self, u: &Update) -> Result<()> {
        let dir = client::downloads_dir(&self.cfg.state_dir);
        let hex = u.content_hash.trim_start_matches(updraft_core::hash::PREFIX).to_string();
        let waiting_hashes: Vec<String> = {
            let st = &self.state;
            st.waiting
                .iter()
                .filter(|w| w.downloaded)
                .map(|w| w.content_hash.trim_start_matches(updraft_core::hash::PREFIX).to_string())
                .filter(|h| !h.is_empty())
                .collect()
        };
        let mut files: Vec<(std::time::SystemTime, u64, std::path::PathBuf, bool)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let Ok(m) = e.metadata() else { continue };
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = name.starts_with(&hex);
                let protected = ours || waiting_hashes.iter().any(|h| name.starts_with(h));
                files.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path(), protected));
            }
        }
        let have_of_this: u64 = files
            .iter()
            .filter(|f| f.2.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&hex)))
            .map(|f| f.1)
            .sum();
        let need = u.size.saturating_sub(have_of_this);
        let mut used: u64 = files.iter().map(|f| f.1).sum();
        files.sort_by_key(|f| f.0);
        for (_, len, path, protected) in &files {
            if used + need <= self.cfg.download_cache_bytes {
                break;
            }
            if !protected && std::fs::remove_file(path).is_ok() {
                used -= len;
            }
        }
        if used + need > self.cfg.download_cache_bytes {
            return Err(AgentError::Download {
                update: u.id.clone(),
                reason: format!(
                    "download cache limit of {} bytes reached: {need} more bytes needed, {used} in use by updates still waiting",
                    self.cfg.download_cache_bytes
                ),
            });
        }
        // The download, then the staged tree (about as big again) in the install root.
        let reserve = self.cfg.disk_reserve_bytes;
        updraft_runtime::ensure_room(&dir, need, reserve)
            .and_then(|_| updraft_runtime::ensure_room(&self.cfg.install_root, u.size, reserve))
            .map_err(|reason| AgentError::Download { update: u.id.clone(), reason })
    }

    /// After an install step failed, settles what is on disk exactly as start-up settles it
    /// after a crash at that point (the journal on disk decides: undo before the swap, swap
    /// back an install that never proved healthy, keep one that is live), so that `ROOT/P` and
    /// the receipts agree whatever step failed — an I/O error after the swap included.
    async fn settle_failed_install(&mut self) -> Result<()> {
        let Some(op) = journal::load(&self.cfg.state_dir)? else { return Ok(()) };
        let (root, op2) = (self.cfg.install_root.clone(), op.clone());
        let outcome = tokio::task::spawn_blocking(move || journal::recover(&root, &op2))
            .await
            .map_err(|e| AgentError::Install { update: op.update_id.clone(), reason: e.to_string() })??;
        if outcome == journal::Outcome::RolledForward {
            tracing::warn!(update = %op.update_id, "the new version is live although a later step failed: recorded");
            journal::record_install(&mut self.state, &op, now_ms() / 1000);
            self.save().await?;
        }
        journal::clear(&self.cfg.state_dir)
    }

    /// Counts a failed install (or a download that failed its hash) of `u` as a problem of its
    /// product; after [`crate::state::GIVE_UP_AFTER`] identical ones it is no longer retried
    /// by itself (a provider serving bad content is not asked for it again and again).
    async fn count_failure(&mut self, u: &Update, e: &AgentError) {
        let st = &mut self.state;
        let detail = e.to_string();
        let gave_up = st.count_failure(&u.id, &detail);
        let message = if gave_up {
            format!(
                "gave up on {} {} after {} identical failures: {detail}",
                u.product,
                u.version,
                crate::state::GIVE_UP_AFTER
            )
        } else {
            format!("install of {} {} failed: {detail}", u.product, u.version)
        };
        st.install_errors.insert(u.product.clone(), message);
    }

    async fn install(&mut self, client: &mut Client, u: &Update) -> Result<String> {
        if let Err(e) = self.make_room(u).await {
            self.record(ActivityKind::DownloadFailed, u, e.to_string()).await;
            return Err(e);
        }
        self.record(ActivityKind::DownloadStarted, u, format!("{} bytes", u.size)).await;
        // Unless a package file is already here (whole, or partial to resume), the package is
        // unpacked as it arrives and no copy of it is kept; if the unpacking finds the package
        // wrong, it is downloaded as a file, whose install then says what was wrong.
        let cached = client::Cached::of(&client::downloads_dir(&self.cfg.state_dir), u)?;
        let header = match cached.is_empty() {
            true => self.download_streamed(client, u, &cached.head).await?,
            false => None,
        };
        let pkg_path = match header {
            Some(_) => None,
            None => Some(self.download(client, u).await?),
        };
        self.record(ActivityKind::DownloadFinished, u, "").await;
        let rec = self.state.installed.get(&u.product).cloned();
        let op = journal::Op {
            update_id: u.id.clone(),
            product: u.product.clone(),
            version: u.version.clone(),
            step: journal::Step::Downloaded,
            upgrade_code: u.upgrade_code.clone(),
            product_code: u.product_code.clone(),
            ..journal::Op::replacing(rec.as_ref())
        };
        let restart = u.install_properties.get("restart").is_some_and(|v| v == "required");
        let result = self.run_install(u, op, pkg_path.clone(), header, restart).await;
        // Whatever happened, this package (file, and header of an earlier streamed attempt) is
        // done with: a verified one is installed, a bad one must be fetched afresh.
        let _ = tokio::fs::remove_file(&cached.head).await;
        if let Some(p) = &pkg_path {
            let _ = tokio::fs::remove_file(p).await;
        }
        result?;
        self.start_verifying(u).await;
        Ok(format!("installed {} {}", u.product, u.version))
    }

    /// Runs `op` through the installer (from the package at `pkg`, or unpacked already as it
    /// downloaded if `streamed`, or a tree already staged) and makes the outcome the machine's record: a
    /// failed step is settled as start-up recovery would settle a crash there, then recorded; a
    /// healthy install is committed.
    async fn run_install(
        &mut self,
        u: &Update,
        op: journal::Op,
        pkg: Option<PathBuf>,
        streamed: Option<Header>,
        restart: bool,
    ) -> Result<()> {
        let root = self.cfg.install_root.clone();
        let state_dir = self.cfg.state_dir.clone();
        let key = self.cfg.trust_key;
        let self_product = self.cfg.self_product.clone();
        let cancel = self.shared.cancel.clone();
        let result = tokio::task::spawn_blocking(move || {
            let ctx = installer::Ctx {
                root: &root,
                state_dir: &state_dir,
                key: &key,
                self_product: &self_product,
                cancel: &cancel,
                package: pkg.as_deref(),
                streamed: streamed.as_ref(),
            };
            installer::run(&ctx, op)
        })
        .await
        .map_err(|e| AgentError::Install { update: u.id.clone(), reason: e.to_string() })?;
        let op = match result {
            Ok(op) => op,
            Err(e) => {
                if let Err(e2) = self.settle_failed_install().await {
                    tracing::error!(error = %e2, "could not settle a failed install; start-up recovery will");
                }
                if matches!(e, AgentError::Cancelled | AgentError::Deferred { .. }) {
                    // Not a failure: someone asked to stop, or the application is in use; the
                    // next check tries again.
                    self.record(ActivityKind::Deferred, u, e.to_string()).await;
                    count_install(u, "deferred");
                    return Err(e);
                }
                count_install(u, if matches!(e, AgentError::RolledBack { .. }) { "rolled back" } else { "failed" });
                let kind = if matches!(e, AgentError::Verify { .. }) {
                    ActivityKind::VerifyFailed
                } else {
                    ActivityKind::InstallFailed
                };
                self.record(kind, u, e.to_string()).await;
                self.count_failure(u, &e).await;
                return Err(e);
            }
        };
        if op.product == self.cfg.self_product {
            return Err(self.become_new(op).await);
        }
        if let Err(e) = self.commit_install(&op, restart).await {
            if let Err(e2) = self.settle_failed_install().await {
                tracing::error!(error = %e2, "could not settle a failed install; start-up recovery will");
            }
            self.record(ActivityKind::InstallFailed, u, e.to_string()).await;
            count_install(u, "rolled back");
            return Err(e);
        }
        self.record(ActivityKind::Installed, u, format!("{} {} is live", u.product, u.version)).await;
        count_install(u, "installed");
        Ok(())
    }

    /// `agent restore`: makes an earlier version kept on this machine live again (the newest,
    /// `P_old`, unless `version` names a backup), as an install would — the stop hook, the
    /// gate, the data carried, one exchange, the start and health hooks — from a copy, so the
    /// kept tree stays. The update it replaces is held back: not installed again by itself
    /// until `agent apply --select ID` asks for it.
    pub async fn restore(&mut self, product: &str, version: Option<&str>) -> Result<String> {
        self.restore_because(product, version, "`agent restore`").await
    }

    /// [`Self::restore`], saying in the hold on the update it replaces who went back (`by`).
    async fn restore_because(&mut self, product: &str, version: Option<&str>, by: &str) -> Result<String> {
        let rec = self.state.installed.get(product).cloned();
        let Some(rec) = rec.filter(|r| !r.adopted) else {
            return Err(AgentError::Config(format!("{product} was not installed by Updraft here: nothing to restore")));
        };
        let root = self.cfg.install_root.clone();
        let old = install::old_dir(&root, product);
        let mut kept: Vec<(PreviousRec, PathBuf)> = Vec::new();
        if let Some(p) = rec.previous.clone().filter(|_| old.is_dir()) {
            kept.push((p, old));
        }
        for b in &rec.backups {
            let dir = install::backup_dir(&root, product, &b.version)?;
            if dir.is_dir() {
                kept.push((b.clone(), dir));
            }
        }
        let listed = || kept.iter().map(|(p, _)| p.version.clone()).collect::<Vec<_>>().join(", ");
        let Some((to, from)) = kept.iter().find(|(p, _)| version.is_none_or(|v| p.version == v)).cloned() else {
            return Err(AgentError::Config(match (version, kept.is_empty()) {
                (_, true) => format!("{product} {} has no earlier version kept on this machine", rec.version),
                (Some(v), false) => format!("{product} {v} is not kept here; kept: {}", listed()),
                (None, false) => unreachable!("a kept version matches when none is named"),
            }));
        };
        let (r2, p2) = (root.clone(), product.to_string());
        let staged = tokio::task::spawn_blocking(move || install::stage_copy(&r2, &p2, &from))
            .await
            .map_err(|e| AgentError::Install { update: to.update_id.clone(), reason: e.to_string() })??;
        let op = journal::Op {
            update_id: to.update_id.clone(),
            product: product.to_string(),
            version: to.version.clone(),
            step: journal::Step::Staged,
            staged_inode: install::inode(&staged),
            needs_health: to.lifecycle.after_swap(),
            upgrade_code: rec.upgrade_code.clone(),
            product_code: rec.product_code.clone(),
            lifecycle: to.lifecycle.clone(),
            ..journal::Op::replacing(Some(&rec))
        };
        let u = Update {
            id: to.update_id.clone(),
            product: product.to_string(),
            version: to.version.clone(),
            ..Default::default()
        };
        self.run_install(&u, op, None, None, false).await?;
        let held = format!(
            "{}: {by} went back to {} from it; `agent apply --select {}` installs it again",
            crate::state::HELD,
            to.version,
            rec.update_id
        );
        self.state.hold(&rec.update_id, &held);
        self.save().await?;
        Ok(format!("restored {product} {} (was {})", to.version, rec.version))
    }

    /// A new install is live and healthy: it is watched through its verification window (see
    /// [`Self::verify_round`]); with none, it is verified now.
    async fn start_verifying(&mut self, u: &Update) {
        let Some(rec) = self.state.installed.get(&u.product).filter(|r| r.update_id == u.id) else { return };
        let window = rec.lifecycle.verify_window();
        if window.is_zero() {
            self.record(ActivityKind::Verified, u, "verified: no verification window").await;
        } else {
            let now = now_ms();
            let v = crate::state::VerifyingRec {
                update_id: u.id.clone(),
                version: u.version.clone(),
                until_ms: now + window.as_millis() as i64,
                next_look_ms: now + verify_step(window).as_millis() as i64,
                pids: vec![],
                restarts: 0,
            };
            self.state.verifying.insert(u.product.clone(), v);
        }
        let _ = self.save().await;
    }

    /// When the next verification look is due, if any install is in its window.
    fn verify_due(&self) -> Option<tokio::time::Instant> {
        let at = self.state.verifying.values().map(|v| v.next_look_ms.min(v.until_ms)).min()?;
        let wait = Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64);
        Some(tokio::time::Instant::now() + wait)
    }

    /// Looks at every install whose look is due: the health check again, the health process
    /// up and not restarting ([`crate::state::CRASH_LOOP_RESTARTS`]). A failure swaps the
    /// previous version back (as a failed health check at install does) and holds the update;
    /// a window that ends with every look passed is verified. Both are reported at once.
    async fn verify_round(&mut self) {
        let now = now_ms();
        let due: Vec<String> = self
            .state
            .verifying
            .iter()
            .filter(|(_, v)| v.next_look_ms.min(v.until_ms) <= now)
            .map(|(p, _)| p.clone())
            .collect();
        let mut reported = false;
        for product in due {
            let Some(mut v) = self.state.verifying.remove(&product) else { continue };
            // Replaced or removed since: nothing of it left to verify.
            let Some(rec) = self.state.installed.get(&product).filter(|r| r.update_id == v.update_id).cloned() else {
                continue;
            };
            let u = Update {
                id: v.update_id.clone(),
                product: product.clone(),
                version: v.version.clone(),
                ..Default::default()
            };
            let root = self.cfg.install_root.clone();
            let live = install::live_dir(&root, &product);
            let previous = rec.previous.as_ref().map(|p| p.version.clone()).unwrap_or_default();
            let env = lifecycle::hook_vars(&product, &v.version, &previous, &v.update_id, &root);
            let log = lifecycle::log_path(&self.cfg.state_dir, &v.update_id);
            let lc = rec.lifecycle.clone();
            let looked = tokio::task::spawn_blocking(move || lifecycle::verify_look(&lc, &live, &env, &log))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            let failed = match looked {
                Err(reason) => Some(reason),
                Ok(pids) => {
                    if !v.pids.is_empty() && pids != v.pids {
                        v.restarts += 1;
                    }
                    v.pids = pids;
                    (v.restarts >= crate::state::CRASH_LOOP_RESTARTS).then(|| {
                        format!("verification: the health process restarted {} times (a crash loop)", v.restarts)
                    })
                }
            };
            reported = true;
            match failed {
                Some(reason) => self.failed_verification(&u, reason).await,
                None if now >= v.until_ms => {
                    let window = rec.lifecycle.verify_window().as_secs();
                    self.record(ActivityKind::Verified, &u, format!("verified: healthy for its {window} s window"))
                        .await;
                    count_install(&u, "verified");
                }
                None => {
                    let step = verify_step(rec.lifecycle.verify_window()).as_millis() as i64;
                    v.next_look_ms = now + step;
                    self.state.verifying.insert(product, v);
                    reported = false;
                }
            }
        }
        let _ = self.save().await;
        if reported && let Ok((url, mut client)) = self.connect().await {
            self.flush_reports(&url, &mut client).await;
        }
    }

    /// An install failed inside its verification window: the previous version goes back (from
    /// `P_old`, as `agent restore` would) and the update is held; reported as such.
    async fn failed_verification(&mut self, u: &Update, reason: String) {
        tracing::warn!(update = %u.id, %reason, "failed verification");
        count_install(u, "failed verification");
        let back = self.restore_because(&u.product, None, "a failed verification").await;
        let detail = match back {
            Ok(line) => format!("{reason}; {line}"),
            Err(e) => {
                self.state.hold(&u.id, &format!("{}: it failed verification ({reason})", crate::state::HELD));
                format!("{reason}; could not go back: {e}")
            }
        };
        self.record(ActivityKind::FailedVerification, u, detail).await;
    }

    /// The new agent is live on disk: start the watchdog and become it. Returns only on failure
    /// (then the previous version is swapped back).
    async fn become_new(&mut self, mut op: journal::Op) -> AgentError {
        op.self_update = true;
        op.needs_health = true;
        op.step = journal::Step::Swapped;
        if let Err(e) = journal::save(&self.cfg.state_dir, &op) {
            return e;
        }
        let _ = self.save().await;
        let root = &self.cfg.install_root;
        // The watchdog must be a binary known to work: the previous agent's.
        let old = selfupdate::binary_in(&install::old_dir(root, &op.product));
        let watchdog = if old.is_file() {
            old
        } else {
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from(&self.cfg.argv[0]))
        };
        let live = install::live_dir(root, &op.product);
        let err = selfupdate::become_new(
            &watchdog,
            &live,
            &self.cfg.state_dir,
            root,
            self.cfg.self_update_deadline,
            &self.cfg.argv,
            &op.update_id,
        );
        // Still here: the exec failed. Undo the swap.
        let _ = journal::recover(root, &op);
        let _ = journal::clear(&self.cfg.state_dir);
        err
    }

    /// A new agent on trial has reported in: it is the agent now.
    async fn confirm_self_update(&mut self) {
        let op = self.trial.take();
        if let Some(mut op) = op {
            op.step = journal::Step::Healthy;
            match self.commit_install(&op, false).await {
                Ok(()) => tracing::info!(update = %op.update_id, "self-update confirmed: this is the agent now"),
                Err(e) => tracing::error!(error = %e, "cannot confirm the self-update"),
            }
        }
    }

    /// Records a swapped-in, healthy install as the machine's state, then closes its journal
    /// entry.
    async fn commit_install(&mut self, op: &journal::Op, restart_required: bool) -> Result<()> {
        {
            let st = &mut self.state;
            journal::record_install(st, op, now_ms() / 1000);
            // A package can say the machine must restart before the update takes full effect.
            if restart_required {
                st.restart_boot_id = Some(localtime::boot_id());
            }
        }
        self.save().await?;
        failpoint::check("state:saved")?;
        journal::clear(&self.cfg.state_dir)
    }

    /// Removes `u`, returning to `rollback_to`: from `P_old` when that is it; otherwise by
    /// installing `rollback` (that version's update) in its place, so the removed version stays
    /// live until its replacement is; with no version to return to, the product is uninstalled.
    async fn remove(
        &mut self,
        client: &mut Client,
        u: &Update,
        rollback_to: &str,
        rollback: Option<Update>,
    ) -> Result<String> {
        let rec = self.state.installed.get(&u.product).cloned();
        let Some(rec) = rec else { return Ok(format!("{} is not installed", u.product)) };
        let root = self.cfg.install_root.clone();
        let product = u.product.clone();
        let back = rec.previous.clone().filter(|p| {
            !rollback_to.is_empty() && p.version == rollback_to && install::old_dir(&root, &product).is_dir()
        });
        let to_old = back.is_some();
        if let Some(r) = rollback.filter(|r| !to_old && !rollback_to.is_empty() && r.version == rollback_to) {
            return self.remove_by_install(client, u, &r).await;
        }
        // Journaled first: a crash between the change on disk and the records is finished on
        // the next start instead of leaving the records on the removed version.
        let removal = journal::Removal {
            product: u.product.clone(),
            update_id: u.id.clone(),
            version: u.version.clone(),
            back: back.clone(),
            old_inode: install::inode(&install::old_dir(&root, &product)),
            removed_inode: install::inode(&install::live_dir(&root, &product)),
        };
        // As an install would: the application's stop hook, then its process gate (a removal
        // waits while the application runs, and is tried again at the next check).
        let lc = rec.lifecycle.clone();
        let mut env = lifecycle::hook_vars(&u.product, &u.version, rollback_to, &u.id, &root);
        env.push(("UPDRAFT_REMOVAL", "1".to_string()));
        let log = lifecycle::log_path(&self.cfg.state_dir, &u.id);
        let (live, id) = (install::live_dir(&root, &product), u.id.clone());
        let (env2, log2, cancel) = (env.clone(), log.clone(), self.shared.cancel.clone());
        let gate = tokio::task::spawn_blocking(move || {
            installer::stop_application(&lc, &[("stop", &lc.stop)], &live, &env2, &log2, &cancel, &id)
        })
        .await
        .map_err(|e| AgentError::Install { update: u.id.clone(), reason: e.to_string() })?;
        if let Err(e) = gate {
            self.record(ActivityKind::InstallFailed, u, format!("removal: {e}")).await;
            return Err(e);
        }
        journal::save_removal(&self.cfg.state_dir, &removal)?;
        let result = tokio::task::spawn_blocking(move || {
            failpoint::check("remove:before")?;
            if to_old { install::roll_back(&root, &product) } else { install::uninstall(&root, &product) }
        })
        .await
        .map_err(|e| AgentError::Install { update: u.id.clone(), reason: e.to_string() })?;
        if let Err(e) = result {
            let _ = journal::clear_removal(&self.cfg.state_dir);
            self.record(ActivityKind::InstallFailed, u, format!("removal failed: {e}")).await;
            return Err(e);
        }
        // The version brought back starts as after its own install.
        if let Some(prev) = back.as_ref().filter(|p| p.lifecycle.start.is_some()) {
            let (lc, live) = (prev.lifecycle.clone(), install::live_dir(&self.cfg.install_root, &u.product));
            let started = tokio::task::spawn_blocking(move || {
                let rel = lc.start.clone().unwrap_or_default();
                lifecycle::run_hook("start", &rel, &live, &env, lc.hook_timeout(), &log, &lifecycle::never)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(reason) = started {
                self.record(
                    ActivityKind::InstallFailed,
                    u,
                    format!("removal: the restored version's start hook failed: {reason}"),
                )
                .await;
            }
        }
        failpoint::check("remove:done")?;
        // Finished as start-up finishes an interrupted removal: one rule for the records.
        let line = {
            let st = &mut self.state;
            let root = self.cfg.install_root.clone();
            journal::recover_removal(&root, &removal, st, now_ms() / 1000)?;
            match &back {
                Some(prev) => format!("removed {} {}, back on {}", u.product, u.version, prev.version),
                None => format!("removed {} {}", u.product, u.version),
            }
        };
        self.save().await?;
        journal::clear_removal(&self.cfg.state_dir)?;
        self.record(ActivityKind::Removed, u, line.clone()).await;
        Ok(line)
    }

    /// A removal whose version to return to the machine does not keep: that version is installed
    /// like any update (gate, hooks, data, one exchange, health; crash-safe), then the removed
    /// version, left as `P_old`, is deleted: it is not kept to go back to.
    async fn remove_by_install(&mut self, client: &mut Client, u: &Update, to: &Update) -> Result<String> {
        let removed = install::inode(&install::live_dir(&self.cfg.install_root, &u.product));
        self.install(client, to).await?;
        let next = {
            let st = &mut self.state;
            let Some(rec) = st.installed.get_mut(&u.product) else {
                return Err(AgentError::Config(format!("{} vanished from the records", u.product)));
            };
            rec.promote_backup()
        };
        let root = self.cfg.install_root.clone();
        let (p, v) = (u.product.clone(), next.map(|n| n.version));
        tokio::task::spawn_blocking(move || install::drop_old(&root, &p, removed, v.as_deref()))
            .await
            .map_err(|e| AgentError::Install { update: u.id.clone(), reason: e.to_string() })??;
        self.save().await?;
        let line = format!(
            "removed {} {}, back on {} (installed: this machine did not keep it)",
            u.product, u.version, to.version
        );
        self.record(ActivityKind::Removed, u, line.clone()).await;
        Ok(line)
    }

    /// Delivers pending activity; on failure it stays queued for the next attempt.
    async fn flush_reports(&mut self, url: &str, client: &mut Client) {
        let pending = self.state.pending_activity.clone();
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
                let st = &mut self.state;
                let n = pending.len().min(st.pending_activity.len());
                st.pending_activity.drain(..n);
                let _ = self.save().await;
            }
            Err(e) => tracing::warn!(error = %e, "report not delivered; kept for later"),
        }
    }

    /// Tries one provider (by name or URL) with a real check, without acting on the answer.
    pub async fn test_provider(&mut self, target: &str) -> Result<TestReport> {
        let (url, name) = {
            let p = self.shared.providers.lock().await;
            let known = p.known();
            match known.iter().find(|k| k.name == target || k.url == target) {
                Some(k) => (k.url.clone(), k.name.clone()),
                None if target.contains("://") => (target.to_string(), target.to_string()),
                None => {
                    let names: Vec<String> = known.iter().map(|k| k.name.clone()).collect();
                    return Err(AgentError::Config(format!(
                        "no provider {target:?} known (known: {}); give a URL to try any",
                        if names.is_empty() { "none".into() } else { names.join(", ") }
                    )));
                }
            }
        };
        let start = std::time::Instant::now();
        let client = self.shared.providers.lock().await.connect_to(&url).await;
        let mut client = client.map_err(|e| AgentError::Unreachable { tried: url.clone(), last: e })?;
        let req = self.check_request(false).await;
        let resp = client::bounded(&url, "check", self.cfg.request_timeout, client.check(req)).await?;
        let (resp, _) = self.verify_answer(&url, resp).await?;
        Ok(TestReport {
            name,
            url,
            served_by: resp.served_by,
            catalog_seq: resp.catalog_seq,
            offers: resp.offers.len(),
            millis: start.elapsed().as_millis() as u64,
        })
    }

    async fn next_delay(&mut self) -> Duration {
        let (min, max) = self.interval;
        crate::schedule::interval(min, max, &mut |n| fastrand::u64(0..=n))
    }
}

impl Shared {
    /// Asks the running check to stop its downloads and the tasks it has not begun; an
    /// install that has begun its swap finishes or rolls back. Says what it did.
    pub fn cancel(&self) -> String {
        if !self.busy.load(std::sync::atomic::Ordering::SeqCst) {
            return "nothing to cancel: no check or install is running".into();
        }
        self.cancel.request();
        "cancelling: downloads stop now, nothing new starts; an install already swapping finishes or rolls back".into()
    }

    /// The status as of the last save (what `agent status` shows while a job runs).
    pub async fn status(&self, daemon_running: bool) -> StatusReport {
        let providers = self.providers.lock().await.urls();
        let st = self.saved.borrow().clone();
        status_from_state(&self.cfg.name, &providers, &st, daemon_running)
    }

    /// Every provider the agent knows, where it came from, and how it is doing.
    pub async fn providers_view(&self) -> Vec<ProviderView> {
        let p = self.providers.lock().await;
        p.known()
            .into_iter()
            .map(|k| {
                let backoff = p.backing_off(&k.url);
                ProviderView {
                    current: p.current() == Some(k.url.as_str()),
                    backoff_secs: backoff.as_ref().map(|(d, _)| d.as_secs_f64()),
                    last_error: backoff.map(|(_, e)| e),
                    known: k,
                }
            })
            .collect()
    }
}

pub fn status_from_state(name: &str, providers: &[String], st: &AgentState, daemon_running: bool) -> StatusReport {
    StatusReport {
        name: name.to_string(),
        group: st.policy.as_ref().map(|p| p.group.clone()),
        mode: st.policy.as_ref().map(|p| p.mode.clone()),
        managed: st.policy.as_ref().is_some_and(|p| p.managed),
        waiting: st.waiting.clone(),
        problems: st.problems(),
        restart_needed: st.restart_boot_id.as_deref().is_some_and(|b| b == localtime::boot_id()),
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
                kept: r.previous.iter().chain(&r.backups).map(|x| x.version.clone()).collect(),
                upgrade_code: r.upgrade_code.clone(),
                adopted: r.adopted,
            })
            .collect(),
    }
}

/// One daemon per state directory: a second one would recover, install and save over the
/// first. The lock is held for the daemon's life (and released by the kernel if it dies).
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(state_dir).map_err(|e| AgentError::io(state_dir, e))?;
    let path = state_dir.join("agent.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| AgentError::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(state_dir.join("agent.pid")).unwrap_or_default();
            Err(AgentError::Config(format!(
                "another agent daemon (pid {}) is running with state directory {}",
                pid.trim(),
                state_dir.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(AgentError::io(&path, e)),
    }
}

/// Runs the daemon until `shutdown` is cancelled.
///
/// `probe` learns the agent's state: started once its control socket is up, ready while its
/// last check reached a provider, stopping.
pub async fn run(cfg: AgentConfig, probe: updraft_runtime::Probe, shutdown: CancellationToken) -> Result<()> {
    let _lock = lock_state_dir(&cfg.state_dir)?;
    for d in [&cfg.install_root, &cfg.state_dir, &client::downloads_dir(&cfg.state_dir)] {
        std::fs::create_dir_all(d).map_err(|e| AgentError::io(d, e))?;
    }
    // The state (receipts, journal, downloads, hook logs) is the agent's alone.
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| AgentError::io(&cfg.state_dir, e))?;
    // Finish or undo what a crash interrupted, before anything else looks at ROOT.
    let trial = std::env::var(selfupdate::TRIAL_ENV).ok();
    let started = journal::start_up(&cfg.install_root, &cfg.state_dir, trial.as_deref(), now_ms() / 1000)?;
    let mut agent = Agent::new(cfg, started)?;
    let shared = agent.shared.clone();
    // A stop cancels the running job at its next safe point (a download chunk, the next offer,
    // before a swap; a swap already begun finishes or rolls back), so the daemon exits quickly.
    {
        let (shared, shutdown, probe) = (shared.clone(), shutdown.clone(), probe.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            probe.stopping();
            shared.stopping.cancel();
            shared.cancel.request();
        });
    }
    let (tx, mut rx) = mpsc::channel::<Queued>(16);
    let sock = control::socket_path(&agent.cfg.state_dir);
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).map_err(|e| AgentError::io(&sock, e))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).map_err(|e| AgentError::io(&sock, e))?;
    // Which process is the agent (it changes when the agent updates itself or comes back).
    crate::state::write_atomic(&agent.cfg.state_dir, "agent.pid", std::process::id().to_string().as_bytes())?;
    tracing::info!(name = %agent.cfg.name, providers = ?agent.cfg.providers, socket = %sock.display(), "agent started");
    probe.started(false, "the first check is pending");

    tokio::spawn(
        control_loop(shared.clone(), listener, tx.clone(), shutdown.clone())
            .instrument(updraft_runtime::telemetry::task("control_socket", "")),
    );
    tokio::spawn(
        push_loop(shared.clone(), tx.clone(), shutdown.clone())
            .instrument(updraft_runtime::telemetry::task("push_subscriber", "")),
    );
    if let updraft_runtime::tls::Transport::Tls(tls) = &agent.cfg.transport {
        tokio::spawn(
            renew_loop(
                shared.clone(),
                tls.clone(),
                agent.cfg.transport.clone(),
                agent.cfg.catalog_keys.clone(),
                shutdown.clone(),
            )
            .instrument(updraft_runtime::telemetry::task("certificate_renewal", "")),
        );
    }
    if let Some(key) = agent.cfg.discovery_key.clone() {
        let found = shared.providers.lock().await.discovered();
        tokio::spawn(
            browse_loop(key.clone(), found, tx.clone(), shutdown.clone())
                .instrument(updraft_runtime::telemetry::task("mdns_browse", &key)),
        );
    }

    // The one loop that changes the machine: it waits for the next event, runs the job it
    // brings to the end, answers whoever asked, and reschedules.
    let mut next = tokio::time::Instant::now();
    let mut schedule = crate::schedule::Schedule::default();
    let mut starting = true;
    loop {
        // Updates waiting for the install window wake the agent when it opens.
        let window = match agent.window_wait().await {
            Some(d) => tokio::time::Instant::now() + d,
            None => next + Duration::from_secs(3600),
        };
        let verify = agent.verify_due();
        let event = tokio::select! {
            _ = shutdown.cancelled() => Event::Shutdown,
            _ = tokio::time::sleep_until(next) => Event::Timer,
            _ = tokio::time::sleep_until(window), if window < next => Event::Window,
            _ = tokio::time::sleep_until(verify.unwrap_or(next)), if verify.is_some() => Event::Verify,
            Some(q) = rx.recv() => Event::Job(q),
        };
        let Some(Queued { job, reply, waited }) = next_job(event, &mut starting) else { break };
        if shutdown.is_cancelled() {
            break; // a job queued as the stop came is not started
        }
        shared.busy.store(true, std::sync::atomic::Ordering::SeqCst);
        let answer = match job {
            Job::Check(reason) if reason.seen(shared.saved.borrow().last_seen_seq) => {
                tracing::debug!(?reason, "not checking: a check since has seen this catalog");
                Response::Done { message: "this catalog was already seen".into() }
            }
            Job::Check(reason) => {
                let scheduled = matches!(reason, Reason::Schedule | Reason::Startup);
                let result = agent.check_once(reason).await;
                if result.is_ok() {
                    agent.confirm_self_update().await;
                }
                // A check that answered but could not act on an offer is retried like a failed
                // one; a cancelled one is not retried soon: someone asked it to stop. (Repeated
                // identical install failures stop being retried: see `given_up`.)
                let cancelled = AgentError::Cancelled.to_string();
                let ok = result.as_ref().is_ok_and(|r| r.errors.iter().all(|e| *e == cancelled));
                match &result {
                    Ok(r) => {
                        tracing::info!(provider = %r.provider, done = ?r.done, errors = ?r.errors, "check finished");
                        probe.set(true, format!("last check answered by {}", r.provider));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "check failed");
                        probe.set(false, format!("last check failed: {e}"));
                    }
                }
                if scheduled || schedule.failing() || !ok {
                    let normal = agent.next_delay().await;
                    next = tokio::time::Instant::now() + schedule.after(ok, normal, &mut |n| fastrand::u64(0..=n));
                }
                match result {
                    Ok(r) => Response::Check(r),
                    Err(e) => Response::Error { message: e.to_string() },
                }
            }
            Job::Verify => {
                agent.verify_round().await;
                Response::Done { message: "verification looked".into() }
            }
            Job::Adopt { product, version, upgrade_code } => done(agent.adopt(&product, &version, &upgrade_code).await),
            Job::Restore { product, version } => done(agent.restore(&product, version.as_deref()).await),
            Job::TestProvider { target } => match agent.test_provider(&target).await {
                Ok(r) => Response::Tested(r),
                Err(e) => Response::Error { message: e.to_string() },
            },
            Job::Configure { mode, install_day, install_hour, reset } => {
                match agent.configure(mode, install_day, install_hour, reset).await {
                    Ok(()) => {
                        // Tell the provider, and take the effective settings that follow.
                        if let Err(e) = agent.check_once(Reason::Resync).await {
                            tracing::warn!(error = %e, "check after a settings change failed");
                        }
                        let note = waited.then(|| "waited for the check or install that was running to finish".into());
                        Response::Config(agent.config_report(note).await)
                    }
                    Err(e) => Response::Error { message: e.to_string() },
                }
            }
        };
        shared.busy.store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
        give_back_memory();
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// Hands the memory the last job used back to the system. An agent waits an hour between
/// checks, and glibc's malloc keeps what a thread freed (a check's answer, an install's
/// buffers) in that thread's arena until it is asked to let it go.
fn give_back_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The job an event brings, if any (none: shut down). The first timer after start is the
/// start-up check, the one moment `apply-at restart` packages install.
fn next_job(event: Event, starting: &mut bool) -> Option<Queued> {
    Some(match event {
        Event::Shutdown => return None,
        Event::Timer if std::mem::take(starting) => Queued::check(Reason::Startup),
        Event::Timer => Queued::check(Reason::Schedule),
        Event::Window => Queued::check(Reason::Window),
        Event::Verify => Queued { job: Job::Verify, reply: None, waited: false },
        Event::Job(q) => q,
    })
}

/// A job's outcome as the control socket says it.
fn done(r: Result<String>) -> Response {
    match r {
        Ok(message) => Response::Done { message },
        Err(e) => Response::Error { message: e.to_string() },
    }
}

/// Answers the control socket: what only reads (status, providers, a provider test) and
/// `agent cancel` at once; every job that changes the machine through the main loop.
async fn control_loop(
    agent: Arc<Shared>,
    listener: tokio::net::UnixListener,
    tx: mpsc::Sender<Queued>,
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
                Ok(Request::Providers) => Response::Providers { providers: agent.providers_view().await },
                Ok(Request::Cancel) => Response::Done { message: agent.cancel() },
                Ok(Request::TestProvider { target }) => run_job(&agent, &tx, Job::TestProvider { target }).await,
                Ok(Request::Check { later }) => run_job(&agent, &tx, Job::Check(Reason::Manual { later })).await,
                Ok(Request::Apply { select }) => run_job(&agent, &tx, Job::Check(Reason::Apply(select))).await,
                Ok(Request::Restore { product, version }) => {
                    run_job(&agent, &tx, Job::Restore { product, version }).await
                }
                Ok(Request::Adopt { product, version, upgrade_code }) => {
                    run_job(&agent, &tx, Job::Adopt { product, version, upgrade_code }).await
                }
                Ok(Request::Config { mode, install_day, install_hour, reset }) => {
                    run_job(&agent, &tx, Job::Configure { mode, install_day, install_hour, reset }).await
                }
                Err(message) => Response::Error { message },
            };
            let _ = control::write_response(w, &resp).await;
        });
    }
}

/// Queues a job for the main loop and waits for its outcome.
async fn run_job(agent: &Shared, tx: &mpsc::Sender<Queued>, job: Job) -> Response {
    let (reply, wait) = oneshot::channel();
    let waited = agent.busy.load(std::sync::atomic::Ordering::SeqCst);
    if tx.send(Queued { job, reply: Some(reply), waited }).await.is_err() {
        return Response::Error { message: "agent is shutting down".into() };
    }
    wait.await.unwrap_or_else(|_| Response::Error { message: "the job was abandoned".into() })
}

/// Browses mDNS for providers announced with this machine's key; the first one found while
/// the agent knows no provider at all triggers a check at once.
async fn browse_loop(key: String, found: client::Discovered, tx: mpsc::Sender<Queued>, shutdown: CancellationToken) {
    let browser = match updraft_runtime::mdns::Browser::start() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "discovery is configured but mDNS cannot start");
            return;
        }
    };
    loop {
        let seen = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = browser.next() => s,
        };
        match seen {
            None => return,
            Some(updraft_runtime::mdns::Seen::Up(f)) if f.key == key => {
                let known = client::Known {
                    name: f.name.clone(),
                    url: f.url.clone(),
                    source: client::Source::Discovered,
                    role: f.role.clone(),
                    site: f.site.clone(),
                };
                let was_empty = {
                    let mut map = found.lock().expect("discovered lock");
                    let was_empty = map.is_empty();
                    if map.insert(f.fullname.clone(), known.clone()).as_ref() != Some(&known) {
                        tracing::info!(provider = %f.name, url = %f.url, role = %f.role, "discovered a provider");
                    }
                    was_empty
                };
                if was_empty {
                    let _ = tx.try_send(Queued::check(Reason::Resync));
                }
            }
            Some(updraft_runtime::mdns::Seen::Up(f)) => {
                tracing::debug!(provider = %f.name, their_key = %f.key, "ignoring a provider with another discovery key");
            }
            Some(updraft_runtime::mdns::Seen::Gone { fullname }) => {
                if let Some(k) = found.lock().expect("discovered lock").remove(&fullname) {
                    tracing::info!(provider = %k.name, "a discovered provider went away");
                }
            }
        }
    }
}

/// Holds a push stream to a provider; a high-priority event, or a catalog version newer than
/// the one last seen, triggers a check at once.
/// Renews this machine's certificate before it expires (see `updraft_runtime::enroll`), at
/// whichever provider the agent reaches.
async fn renew_loop(
    agent: Arc<Shared>,
    tls: Arc<updraft_runtime::tls::Tls>,
    transport: updraft_runtime::tls::Transport,
    catalog_keys: Vec<updraft_core::keys::PublicKey>,
    shutdown: CancellationToken,
) {
    let connect = || async {
        let (url, _, _) = agent.providers.lock().await.connect().await.map_err(|e| e.to_string())?;
        let endpoint = transport.endpoint(&url).map_err(|e| e.to_string())?.timeout(Duration::from_secs(30));
        let channel = updraft_runtime::tls::connect_within(endpoint, Duration::from_secs(5))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        Ok(updraft_runtime::traced(channel).with_server(&url))
    };
    // A new CA bundle only with the centre's signature: the provider answering may be a site.
    updraft_runtime::enroll::renew_loop(tls, vec![], catalog_keys, connect, shutdown).await
}

async fn push_loop(agent: Arc<Shared>, tx: mpsc::Sender<Queued>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        // The providers' backoff is shared with the checks; which ones are unreachable is
        // recorded by the checks (the main loop owns the state).
        let connected = agent.providers.lock().await.connect().await.map(|(url, client, _)| (url, client));
        if let Ok((url, mut client)) = connected {
            let last_seen_seq = agent.saved.borrow().last_seen_seq;
            let req = SubscribeRequest { machine: agent.cfg.name.clone(), last_seen_seq };
            // Each subscription is a trace of its own (the loop runs for ever).
            let span = tracing::info_span!(parent: None, "push_subscribe", provider = %url);
            let subscribed = client.subscribe(req).instrument(span);
            if let Ok(Ok(resp)) = tokio::time::timeout(agent.cfg.request_timeout, subscribed).await {
                tracing::info!(provider = %url, "push stream open");
                backoff = Duration::from_millis(500);
                let mut stream = resp.into_inner();
                let mut moved = false;
                let mut probe = tokio::time::interval(client::PREFERRED_PROBE);
                probe.tick().await;
                loop {
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ev = stream.next() => ev,
                        _ = probe.tick() => {
                            // Checks went back to a preferred provider: follow them there.
                            if agent.providers.lock().await.current().is_some_and(|c| c != url) {
                                moved = true;
                                break;
                            }
                            continue;
                        }
                    };
                    let Some(Ok(ev)) = ev else { break };
                    let reason = match PushKind::try_from(ev.kind) {
                        Ok(PushKind::HighPriority) => Some(Reason::Push(ev.update_id.clone())),
                        Ok(PushKind::Hello) if ev.catalog_seq != agent.saved.borrow().last_seen_seq => {
                            Some(Reason::Behind(ev.catalog_seq))
                        }
                        // A rollout admits more machines: only those it names by position check.
                        Ok(PushKind::Rollout) => {
                            let at = updraft_core::rollout::position(&ev.update_id, &agent.cfg.name);
                            (ev.wave_from_bp..ev.wave_to_bp).contains(&at).then_some(Reason::Resync)
                        }
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        tracing::info!(?reason, seq = ev.catalog_seq, "push received");
                        // A full queue already holds a check that will see this change.
                        let _ = tx.try_send(Queued::check(reason));
                    }
                }
                if moved {
                    tracing::info!(provider = %url, "moving the push stream to the provider checks use");
                    continue;
                }
                tracing::warn!(provider = %url, "push stream closed");
                agent.providers.lock().await.rotate("push stream closed");
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

/// `updraft.installs` by outcome: installed; failed (the install stopped before the new
/// version went live — a bad package or a hook — and nothing changed); rolled back (the new
/// version went live but failed its health check or could not be committed, and the previous
/// one is back); deferred (stopped, or the application in use; tried again later).
fn count_install(u: &Update, outcome: &'static str) {
    use updraft_runtime::metrics::KeyValue;
    updraft_runtime::metrics::count(
        "updraft.installs",
        "Installs the agent finished, by outcome",
        &[KeyValue::new("outcome", outcome), KeyValue::new("product", u.product.clone())],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(action: ActionKind, high_priority: bool, apply_at_restart: bool) -> Offer {
        let mut u = Update { id: "app-2".into(), high_priority, ..Default::default() };
        if apply_at_restart {
            u.install_properties.insert(updraft_core::package::APPLY_AT.into(), "restart".into());
        }
        Offer { action: action as i32, update: Some(u), ..Default::default() }
    }

    #[test]
    fn each_event_brings_its_job_and_the_first_timer_is_the_start_up_check() {
        let reason = |q: Option<Queued>| match q.map(|q| q.job) {
            Some(Job::Check(r)) => format!("{r:?}"),
            other => format!("{other:?}"),
        };
        let mut starting = true;
        assert_eq!(reason(next_job(Event::Window, &mut starting)), "Window");
        assert!(starting, "only the timer ends the start");
        assert_eq!(reason(next_job(Event::Timer, &mut starting)), "Startup");
        assert_eq!(reason(next_job(Event::Timer, &mut starting)), "Schedule");
        let queued = Queued { job: Job::Restore { product: "app".into(), version: None }, reply: None, waited: true };
        let q = next_job(Event::Job(queued), &mut starting).unwrap();
        assert!(q.waited && matches!(q.job, Job::Restore { .. }));
        assert!(next_job(Event::Shutdown, &mut starting).is_none());
    }

    #[test]
    fn a_hello_is_needless_only_once_its_catalog_was_seen() {
        assert!(Reason::Behind(7).seen(7), "the start-up check saw sequence 7");
        assert!(!Reason::Behind(7).seen(6), "not yet seen: a check failed or saw an older catalog");
        assert!(!Reason::Behind(7).seen(8), "another provider's sequence: look again");
        for other in [Reason::Resync, Reason::Schedule, Reason::Startup, Reason::Push("app-2".into())] {
            assert!(!other.seen(7), "{other:?} checks whatever was seen");
        }
    }

    fn at(mode: Mode, in_window: bool) -> When {
        When { mode, in_window, download_early: false }
    }

    #[test]
    fn each_mode_window_and_reason_gives_its_decision() {
        let plain = offer(ActionKind::Install, false, false);
        let d = |mode, window, reason: &Reason| decide(at(mode, window), reason, &plain, &[]);
        assert_eq!(d(Mode::Automatic, true, &Reason::Schedule), Decision::Apply);
        assert_eq!(
            d(Mode::Automatic, false, &Reason::Schedule),
            Decision::Note,
            "outside the window: not even downloaded"
        );
        let early = When { download_early: true, ..at(Mode::Automatic, false) };
        assert_eq!(decide(early, &Reason::Schedule, &plain, &[]), Decision::Stage, "unless the group downloads early");
        assert_eq!(decide(When { in_window: true, ..early }, &Reason::Schedule, &plain, &[]), Decision::Apply);
        assert_eq!(d(Mode::Automatic, false, &Reason::Manual { later: false }), Decision::Apply);
        assert_eq!(d(Mode::Download, true, &Reason::Schedule), Decision::Stage);
        assert_eq!(d(Mode::Notify, true, &Reason::Schedule), Decision::Note);
        assert_eq!(d(Mode::Manual, true, &Reason::Schedule), Decision::Note);
        assert_eq!(d(Mode::Manual, false, &Reason::Manual { later: false }), Decision::Apply);
        assert_eq!(d(Mode::Notify, false, &Reason::Apply(vec![])), Decision::Apply, "agent apply installs");
        assert_eq!(d(Mode::Notify, false, &Reason::Apply(vec!["other".into()])), Decision::Note);
    }

    #[test]
    fn priority_removal_and_apply_at_restart_override_the_mode() {
        let urgent = offer(ActionKind::Install, true, false);
        assert_eq!(decide(at(Mode::Manual, false), &Reason::Push("app-2".into()), &urgent, &[]), Decision::Apply);
        assert_eq!(decide(at(Mode::Manual, false), &Reason::Manual { later: true }, &urgent, &[]), Decision::Note);
        let deferred = ["app-2".to_string()];
        assert_eq!(decide(at(Mode::Automatic, false), &Reason::Schedule, &urgent, &deferred), Decision::Note);
        assert_eq!(decide(at(Mode::Automatic, true), &Reason::Schedule, &urgent, &deferred), Decision::Apply);
        let removal = offer(ActionKind::Remove, false, false);
        assert_eq!(decide(at(Mode::Notify, false), &Reason::Schedule, &removal, &[]), Decision::Apply);
        let at_restart = offer(ActionKind::Install, false, true);
        assert_eq!(decide(at(Mode::Automatic, true), &Reason::Schedule, &at_restart, &[]), Decision::Stage);
        assert_eq!(decide(at(Mode::Automatic, true), &Reason::Startup, &at_restart, &[]), Decision::Apply);
    }
}
