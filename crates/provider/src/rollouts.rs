//! Rollouts in waves at the centre (issue #21; the pure rules are `updraft_core::rollout`).
//!
//! A rollout is a logged record per update ([`Rollout`]): every tier admits a machine's offer
//! from its own copy (`catalog::Snapshot::rollout_holds`), and the signed statement carries it
//! so agents do the same. Only the centre moves it: [`rollout_loop`] (one provider at a time,
//! a duty) tallies each running rollout's open waves from the outcomes machines reported
//! (`Store::outcomes_of`) and applies [`next`]: it opens the next wave, waits, or halts by
//! itself — written as a change (so every tier stops offering it at once), an activity entry,
//! an audit entry and the `updraft.rollout.halts` counter. Administrators start, resume and
//! revert through [`Ops`]; a revert withdraws the update (state `remove`), so the machines that
//! took it go back through the removal path.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use updraft_core::model::UpdateState;
use updraft_core::rollout::{self, Admitting, Gate, Outcome, Phase, Step, Waves, parse_share, pct};
use updraft_proto::v1::{
    Activity, ActivityKind, AuditEntry, GetRolloutRequest, ListRolloutsResponse, ResumeRolloutRequest, Rollout,
    RolloutReport, RolloutState, StartRolloutRequest, Update, WaveStatus,
};

use crate::Shared;
use crate::error::{ProviderError, Result};
use crate::ops::Ops;
use crate::{now_ms, policy};

/// What `rollout start` takes when it is not told.
pub const DEFAULT_WAVES: &str = "1%,10%,50%,100%";
pub const DEFAULT_MIN_VERIFIED: &str = "95%";
pub const DEFAULT_MAX_FAILED: &str = "2%";
pub const DEFAULT_WAVE_WAIT: &str = "30m";
/// Machines whose failures one rollout can have accepted.
pub const MAX_ACKNOWLEDGED: usize = 10_000;
/// Failed machines a report lists by name.
const FAILED_LISTED: usize = 50;
/// How often the loop looks without being woken by a report, and at least how long it leaves
/// between two looks (reports arriving all the time do not make it spin).
const LOOK_EVERY: Duration = Duration::from_secs(5);
const LOOK_SPACING: Duration = Duration::from_millis(500);
/// A rollout with every wave open is watched for a breach this long after its last wave
/// opened; then it is finished and the loop no longer tallies it.
const WATCH_AFTER_LAST_WAVE_MS: i64 = 7 * 86_400 * 1000;

pub fn phase(r: &Rollout) -> Option<Phase> {
    match RolloutState::try_from(r.state).ok()? {
        RolloutState::Running => Some(Phase::Running),
        RolloutState::Halted => Some(Phase::Halted),
        RolloutState::Reverted => Some(Phase::Reverted),
        RolloutState::Unspecified => None,
    }
}

/// The part of a rollout every tier admits by; none for one that holds nothing any more.
pub fn admitting(r: &Rollout) -> Option<Admitting> {
    let phase = phase(r).filter(|p| *p != Phase::Reverted)?;
    Some(Admitting {
        update_id: r.update_id.clone(),
        waves: r.waves.clone(),
        open: r.open,
        phase,
        group: r.group.clone(),
    })
}

fn waves_of(r: &Rollout) -> Result<Waves> {
    r.waves.parse::<Waves>().map_err(|e| ProviderError::Store(format!("rollout of {}: {e}", r.update_id)))
}

fn gate_of(r: &Rollout) -> Gate {
    Gate { min_verified: r.min_verified_bp, max_failed: r.max_failed_bp, wait_ms: r.wave_wait_ms }
}

/// A rollout's machines: each that takes part (of its group; has the product or is given it,
/// runs the update, or reported an outcome with it), with its wave and outcome.
struct Cohort {
    waves: Waves,
    machines: Vec<Member>,
}

struct Member {
    wave: usize,
    outcome: Option<(Outcome, Activity)>,
    acknowledged: bool,
}

fn cohort(shared: &Shared, r: &Rollout, u: &Update) -> Result<Cohort> {
    let waves = waves_of(r)?;
    let catalog = shared.catalog()?;
    let group = (!r.group.is_empty()).then_some(r.group.as_str());
    // A failure or a removal before this rollout started (an earlier one, reverted) is history;
    // what a machine runs, verified or not, is its state whenever it said so.
    let mut outcomes: HashMap<String, (Outcome, Activity)> = shared
        .store
        .outcomes_of(&u.id)?
        .into_iter()
        .filter(|(_, o, a)| matches!(o, Outcome::Installed | Outcome::Verified) || a.at_unix_ms >= r.started_at_unix_ms)
        .map(|(m, o, a)| (m, (o, a)))
        .collect();
    let mut names: BTreeSet<String> =
        policy::takers(&shared.store, &catalog, u, group)?.into_iter().map(|t| t.0).collect();
    for info in shared.store.list_agents()? {
        let runs = info.installed.iter().any(|p| p.product == u.product && p.version == u.version);
        let in_group = group.is_none_or(|g| catalog.decided.group_of(&info.name) == g);
        if in_group && (runs || outcomes.contains_key(&info.name)) {
            names.insert(info.name);
        }
    }
    let machines = names
        .into_iter()
        .map(|name| Member {
            wave: waves.wave_of(&u.id, &name),
            acknowledged: r.acknowledged.contains(&name),
            outcome: outcomes.remove(&name),
        })
        .collect();
    Ok(Cohort { waves, machines })
}

impl Cohort {
    fn tally(&self, open: usize) -> rollout::Tally {
        rollout::tally(open, self.machines.iter().map(|m| (m.wave, m.outcome.as_ref().map(|o| o.0), m.acknowledged)))
    }
}

/// What the rollout does next, in words, and the step itself.
fn next_step(r: &Rollout, c: &Cohort, now: i64) -> Step {
    rollout::next(&c.waves, r.open as usize, r.opened_at_unix_ms, now, c.tally(r.open as usize), gate_of(r))
}

/// Each wave's machines and what they did, and what comes next.
pub fn report(shared: &Shared, r: &Rollout) -> Result<RolloutReport> {
    let u = shared.store.get_update(&r.update_id)?;
    let c = cohort(shared, r, &u)?;
    let mut waves: Vec<WaveStatus> = (0..c.waves.len())
        .map(|i| WaveStatus {
            wave: i as u32 + 1,
            share: pct(c.waves.share(i)),
            open: i <= r.open as usize,
            ..Default::default()
        })
        .collect();
    let mut failed: Vec<&Activity> = Vec::new();
    for m in &c.machines {
        let w = &mut waves[m.wave];
        w.machines += 1;
        match &m.outcome {
            None => w.waiting += 1,
            Some((Outcome::Installed, _)) => w.installed += 1,
            Some((Outcome::Verified, _)) => w.verified += 1,
            Some((Outcome::RolledBack, _)) => w.rolled_back += 1,
            Some((Outcome::Failed, a)) => {
                w.failed += 1;
                failed.push(a);
            }
        }
    }
    failed.sort_by_key(|a| std::cmp::Reverse(a.at_unix_ms));
    let next = match phase(r) {
        Some(Phase::Running) if u.high_priority => {
            "high priority: every machine is offered it now (waves skipped, still counted)".into()
        }
        Some(Phase::Running) => match next_step(r, &c, now_ms()) {
            Step::Open(n) => format!("wave {} opens at the next look", n + 1),
            Step::Wait(why) => why,
            Step::Halt(why) => format!("halts at the next look: {why}"),
            Step::AllOpen => "every wave is open".into(),
        },
        Some(Phase::Halted) => format!(
            "halted: {}; `admin-cli rollout resume {id} [--ack-failures]` continues, `admin-cli rollout revert {id}` withdraws it",
            r.reason,
            id = r.update_id
        ),
        Some(Phase::Reverted) => "reverted: the machines that took it go back to their previous version".into(),
        None => "unknown state".into(),
    };
    Ok(RolloutReport {
        rollout: Some(r.clone()),
        waves,
        next,
        failed_machines: failed
            .iter()
            .take(FAILED_LISTED)
            .map(|a| format!("{} ({}): {}", a.machine, updraft_runtime::utc_text(a.at_unix_ms), a.detail))
            .collect(),
    })
}

async fn record(shared: &Shared, u: &Update, who: &str, what: String) -> Result<()> {
    let a = Activity {
        at_unix_ms: now_ms(),
        machine: String::new(),
        kind: ActivityKind::Rollout as i32,
        update_id: u.id.clone(),
        product: u.product.clone(),
        version: u.version.clone(),
        detail: format!("{who}: {what}"),
    };
    shared.store.append_activity(&[a]).await
}

/// One look at every running rollout: open, halt, or leave it (see the module's header).
pub async fn look(shared: &Shared) -> Result<()> {
    for mut r in shared.store.list_rollouts()? {
        if phase(&r) != Some(Phase::Running) {
            continue;
        }
        let Ok(u) = shared.store.get_update(&r.update_id) else { continue };
        let now = now_ms();
        let last_open = waves_of(&r).is_ok_and(|w| r.open as usize + 1 >= w.len());
        if last_open && now - r.opened_at_unix_ms > WATCH_AFTER_LAST_WAVE_MS {
            continue;
        }
        let c = cohort(shared, &r, &u)?;
        match next_step(&r, &c, now) {
            Step::Open(n) => {
                r.from_share_bp = c.waves.share(r.open as usize);
                r.open = n as u32;
                r.opened_at_unix_ms = now;
                r.reason.clear();
                shared.store.put_rollout(&r).await?;
                let what =
                    format!("wave {} of {} opened ({} of machines)", n + 1, c.waves.len(), pct(c.waves.share(n)));
                tracing::info!(update = %u.id, "{what}");
                record(shared, &u, "rollout", what).await?;
            }
            Step::Halt(why) => {
                r.state = RolloutState::Halted as i32;
                r.reason = why.clone();
                shared.store.put_rollout(&r).await?;
                tracing::warn!(update = %u.id, reason = %why, "rollout halted");
                record(shared, &u, "rollout", format!("halted in wave {}: {why}", r.open + 1)).await?;
                let entry = AuditEntry {
                    at_unix_ms: now,
                    who: shared.config.name.clone(),
                    role: "provider".into(),
                    action: format!("rollout halted: {}", u.id),
                    outcome: why,
                    ..Default::default()
                };
                shared.store.append_audit(entry).await?;
                updraft_runtime::metrics::count(
                    "updraft.rollout.halts",
                    "Rollouts halted by their own gate (a wave failed more than it may)",
                    &[],
                );
            }
            Step::Wait(_) | Step::AllOpen => {}
        }
    }
    Ok(())
}

/// Looks at the running rollouts whenever a report brings an outcome, and every few seconds
/// (a wave's wait passing), until `stop`.
pub async fn rollout_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        if let Err(e) = look(&shared).await {
            tracing::warn!(error = %e, "rollouts: cannot look");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.rollout_wake.notified() => {}
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LOOK_SPACING) => {}
        }
    }
}

fn share_arg(what: &str, s: &str, default: &str) -> Result<u32> {
    let s = if s.trim().is_empty() { default } else { s };
    parse_share(s).map_err(|e| ProviderError::InvalidArgument(format!("{what}: {e}")))
}

impl Ops {
    fn rollout_of(&self, update_id: &str) -> Result<Rollout> {
        self.shared.store.get_rollout(update_id)?.ok_or_else(|| {
            ProviderError::NotFound(format!(
                "no rollout of {update_id:?} (`admin-cli rollout start {update_id}` starts one)"
            ))
        })
    }

    /// Starts a rollout in waves (approving the update), or replaces one that is reverted or has
    /// every wave open.
    pub async fn start_rollout(&self, who: &str, req: StartRolloutRequest) -> Result<RolloutReport> {
        let u = self.shared.store.get_update(&req.update_id)?;
        let waves: Waves = (if req.waves.trim().is_empty() { DEFAULT_WAVES } else { req.waves.as_str() })
            .parse()
            .map_err(|e| ProviderError::InvalidArgument(format!("--waves: {e}")))?;
        let min_verified = share_arg("--min-verified", &req.min_verified, DEFAULT_MIN_VERIFIED)?;
        let max_failed = share_arg("--max-failed", &req.max_failed, DEFAULT_MAX_FAILED)?;
        let wait_text = if req.wave_wait.trim().is_empty() { DEFAULT_WAVE_WAIT } else { req.wave_wait.as_str() };
        let wait = updraft_core::when::parse_span(wait_text)
            .map_err(|e| ProviderError::InvalidArgument(format!("--wave-wait {wait_text:?}: {e}")))?;
        if wait > Duration::from_secs(30 * 86_400) {
            return Err(ProviderError::InvalidArgument(format!("--wave-wait {wait_text}: at most 30 days")));
        }
        if !req.group.is_empty()
            && req.group != crate::store::DEFAULT_GROUP
            && self.shared.store.get_group(&req.group)?.is_none()
        {
            return Err(ProviderError::NotFound(format!("no group {:?}", req.group)));
        }
        if !matches!(
            crate::catalog::state_of(&u),
            Some(UpdateState::PreApproval | UpdateState::Ga | UpdateState::Remove)
        ) {
            return Err(ProviderError::Precondition(format!(
                "{} is {}: a rollout approves an update that is pre-approval (or one reverted)",
                u.id,
                crate::catalog::state_of(&u).map(|s| s.to_string()).unwrap_or_default()
            )));
        }
        if let Some(old) = self.shared.store.get_rollout(&u.id)? {
            let finished = phase(&old) == Some(Phase::Reverted)
                || (phase(&old) == Some(Phase::Running) && old.open as usize + 1 >= waves_of(&old)?.len());
            if !finished {
                return Err(ProviderError::Precondition(format!(
                    "a rollout of {} is already {} in wave {}: resume, revert or let it finish first",
                    u.id,
                    if phase(&old) == Some(Phase::Halted) { "halted" } else { "running" },
                    old.open + 1
                )));
            }
        }
        let now = now_ms();
        let r = Rollout {
            update_id: u.id.clone(),
            waves: waves.to_string(),
            group: req.group.clone(),
            min_verified_bp: min_verified,
            max_failed_bp: max_failed,
            wave_wait_ms: wait.as_millis().min(i64::MAX as u128) as i64,
            open: 0,
            opened_at_unix_ms: now,
            state: RolloutState::Running as i32,
            reason: String::new(),
            from_share_bp: 0,
            acknowledged: vec![],
            started_at_unix_ms: now,
            started_by: who.to_string(),
        };
        // The rollout and the approval together (see `Store::start_rollout`).
        self.shared.store.start_rollout(&r).await?;
        let scope = if r.group.is_empty() { "every group".to_string() } else { format!("group {}", r.group) };
        let what = format!(
            "rollout started in waves {} ({scope}; next wave at {} verified, halt above {} failed, {wait_text} per wave)",
            r.waves,
            pct(min_verified),
            pct(max_failed)
        );
        record(&self.shared, &u, who, what).await?;
        self.shared.rollout_wake.notify_one();
        report(&self.shared, &r)
    }

    pub async fn get_rollout(&self, req: GetRolloutRequest) -> Result<RolloutReport> {
        report(&self.shared, &self.rollout_of(&req.update_id)?)
    }

    pub async fn list_rollouts(&self) -> Result<ListRolloutsResponse> {
        let mut out = Vec::new();
        for r in self.shared.store.list_rollouts()? {
            // An update deleted since: its rollout is nothing to show.
            if self.shared.store.get_update(&r.update_id).is_ok() {
                out.push(report(&self.shared, &r)?);
            }
        }
        Ok(ListRolloutsResponse { rollouts: out })
    }

    /// Continues a halted rollout. Without `ack_failures` only if its gate no longer halts it;
    /// with it, the machines that failed so far no longer count.
    pub async fn resume_rollout(&self, who: &str, req: ResumeRolloutRequest) -> Result<RolloutReport> {
        let mut r = self.rollout_of(&req.update_id)?;
        if phase(&r) != Some(Phase::Halted) {
            return Err(ProviderError::Precondition(format!("the rollout of {} is not halted", r.update_id)));
        }
        let u = self.shared.store.get_update(&r.update_id)?;
        let c = cohort(&self.shared, &r, &u)?;
        let open = r.open as usize;
        if req.ack_failures {
            let failed = c
                .machines
                .iter()
                .filter(|m| m.wave <= open && matches!(m.outcome, Some((Outcome::Failed, _))))
                .filter_map(|m| m.outcome.as_ref().map(|o| o.1.machine.clone()));
            for name in failed {
                if !r.acknowledged.contains(&name) {
                    r.acknowledged.push(name);
                }
            }
            if r.acknowledged.len() > MAX_ACKNOWLEDGED {
                return Err(ProviderError::LimitReached(format!(
                    "{} failed machines accepted; at most {MAX_ACKNOWLEDGED} (revert this rollout instead)",
                    r.acknowledged.len()
                )));
            }
        }
        r.state = RolloutState::Running as i32;
        if let Step::Halt(why) =
            next_step(&r, &Cohort { waves: c.waves.clone(), machines: acked(c.machines, &r) }, now_ms())
        {
            return Err(ProviderError::Precondition(format!(
                "{why}: `--ack-failures` accepts these failures, `rollout revert` withdraws the update"
            )));
        }
        r.reason.clear();
        r.from_share_bp = 0;
        r.opened_at_unix_ms = now_ms();
        self.shared.store.put_rollout(&r).await?;
        let what = if req.ack_failures {
            format!("rollout resumed in wave {}, {} failed machine(s) accepted", r.open + 1, r.acknowledged.len())
        } else {
            format!("rollout resumed in wave {}", r.open + 1)
        };
        record(&self.shared, &u, who, what).await?;
        self.shared.rollout_wake.notify_one();
        report(&self.shared, &r)
    }

    /// Withdraws the update (state `remove`): the machines that took it go back to their
    /// previous version by the removal path; no machine is offered it any more.
    pub async fn revert_rollout(&self, who: &str, req: GetRolloutRequest) -> Result<RolloutReport> {
        let mut r = self.rollout_of(&req.update_id)?;
        if phase(&r) == Some(Phase::Reverted) {
            return Err(ProviderError::Precondition(format!("the rollout of {} is reverted already", r.update_id)));
        }
        let u = self.shared.store.get_update(&r.update_id)?;
        // The withdrawal first; the rollout's change then tells the machines of its open waves
        // to check (see `hub`), and they find the removal.
        self.shared
            .store
            .change_update(&u.id, None, |x: &mut Update| {
                x.state = UpdateState::Remove.to_wire();
                Ok(())
            })
            .await?;
        r.state = RolloutState::Reverted as i32;
        r.from_share_bp = 0;
        r.reason = format!("reverted by {who}");
        self.shared.store.put_rollout(&r).await?;
        record(&self.shared, &u, who, "rollout reverted: the update is withdrawn (state remove)".into()).await?;
        report(&self.shared, &r)
    }
}

/// The cohort with the rollout's accepted machines marked.
fn acked(machines: Vec<Member>, r: &Rollout) -> Vec<Member> {
    machines
        .into_iter()
        .map(|mut m| {
            if let Some((_, a)) = &m.outcome {
                m.acknowledged = r.acknowledged.contains(&a.machine);
            }
            m
        })
        .collect()
}
