//! Rollouts in waves, the pure rules (issue #21's foundation): which wave a machine is in, and
//! what a rollout does next — open its next wave, wait, halt, or nothing more to open.
//!
//! A machine's place in an update's rollout is a hash of the update and the machine
//! ([`position`]), so every tier — the centre and each site, from its own copy of the rollout —
//! puts it in the same wave without asking anyone, and it stays there as waves open. Shares are
//! cumulative: waves `1%,10%,50%,100%` admit the machines whose position is below 1 %, then
//! below 10 %, and so on; so the machines of the first waves are a fixed, growing set.
//!
//! A wave opens only when the waves open so far have at least the verified share and at most
//! the failed share, and the wave's wait has passed ([`next`]); a failed share over the limit
//! halts the rollout at any time, before anything else is considered.
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};
use crate::plan::Hold;

/// Shares are in basis points: 10,000 is all machines, 100 is 1 %.
pub const ALL: u32 = 10_000;

/// The cumulative share of each wave, ascending, the last all machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waves(Vec<u32>);

/// A share such as `10%` or `0.5%` (at most two decimals), in basis points.
pub fn parse_share(s: &str) -> Result<u32> {
    let bad = |reason: &str| CoreError::Invalid { what: "share", input: s.to_string(), reason: reason.into() };
    let t = s.trim();
    let n = t.strip_suffix('%').ok_or_else(|| bad("a percentage ends with %, e.g. 10%"))?;
    let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
    if whole.is_empty() || frac.len() > 2 || !whole.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return Err(bad("expected a number of percent with at most two decimals, e.g. 10% or 0.5%"));
    }
    let whole: u32 = whole.parse().map_err(|_| bad("too large"))?;
    let frac: u32 = format!("{frac:0<2}").parse().unwrap_or(0);
    let bp = whole.checked_mul(100).and_then(|w| w.checked_add(frac)).ok_or_else(|| bad("too large"))?;
    if bp > ALL {
        return Err(bad("more than 100%"));
    }
    Ok(bp)
}

impl FromStr for Waves {
    type Err = CoreError;

    /// `1%,10%,50%,100%`: at most 20 waves, each larger than the one before, the last 100%.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: String| CoreError::Invalid { what: "waves", input: s.to_string(), reason };
        let shares = s.split(',').map(parse_share).collect::<Result<Vec<u32>>>()?;
        if shares.is_empty() || shares.len() > 20 {
            return Err(bad("between 1 and 20 waves, e.g. 1%,10%,50%,100%".into()));
        }
        if shares[0] == 0 {
            return Err(bad("the first wave admits no machine (0%)".into()));
        }
        if let Some(w) = shares.windows(2).find(|w| w[1] <= w[0]) {
            return Err(bad(format!("each wave is larger than the one before ({} after {})", pct(w[1]), pct(w[0]))));
        }
        if shares.last() != Some(&ALL) {
            return Err(bad("the last wave is 100% (every machine)".into()));
        }
        Ok(Waves(shares))
    }
}

/// A share in basis points as people write it (`10%`, `0.5%`).
pub fn pct(bp: u32) -> String {
    match bp % 100 {
        0 => format!("{}%", bp / 100),
        r if r % 10 == 0 => format!("{}.{}%", bp / 100, r / 10),
        r => format!("{}.{r:02}%", bp / 100),
    }
}

impl std::fmt::Display for Waves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.iter().map(|s| pct(*s)).collect::<Vec<_>>().join(","))
    }
}

impl Waves {
    /// All machines at once: what a high-priority update does.
    pub fn at_once() -> Self {
        Waves(vec![ALL])
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The cumulative share of wave `i` (the last wave's for a larger `i`).
    pub fn share(&self, i: usize) -> u32 {
        self.0.get(i).or(self.0.last()).copied().unwrap_or(ALL)
    }

    /// The wave (from 0) whose machines include the one at `position`.
    pub fn wave_at(&self, position: u32) -> usize {
        self.0.iter().position(|&s| position < s).unwrap_or(self.0.len().saturating_sub(1))
    }

    /// The wave `machine` is in for `update_id`.
    pub fn wave_of(&self, update_id: &str, machine: &str) -> usize {
        self.wave_at(position(update_id, machine))
    }
}

/// A machine's place in an update's rollout, in `0..ALL`: from SHA-256 over the update id and
/// the machine name, so it is the same on every tier and independent of every other machine.
pub fn position(update_id: &str, machine: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(b"updraft-rollout-v1\0");
    h.update(update_id.as_bytes());
    h.update([0]);
    h.update(machine.as_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (n % u64::from(ALL)) as u32
}

/// Whether `machine` may be offered `update_id` while waves `0..=open` are open.
pub fn admitted(waves: &Waves, open: usize, update_id: &str, machine: &str) -> bool {
    waves.wave_of(update_id, machine) <= open
}

/// A rollout's limits: the verified share the waves open so far must reach, the failed share
/// they must stay within, and the least time a wave stays before the next opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    pub min_verified: u32,
    pub max_failed: u32,
    pub wait_ms: i64,
}

/// What the machines of the open waves did: how many there are (that have the product or are
/// given it), how many run the update verified, and how many failed with it (failed to install,
/// rolled back, failed verification).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub machines: u32,
    pub verified: u32,
    pub failed: u32,
}

/// What a rollout does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Open wave `n` (from 0).
    Open(usize),
    /// Stay: why.
    Wait(String),
    /// Stop offering the update to machines that have not taken it: why.
    Halt(String),
    /// Every wave is open.
    AllOpen,
}

/// The one rule of a rollout with waves `0..=open` open since `opened_at_ms` (see the module's
/// header). With no machine in the open waves there is nothing to wait for but the wait.
pub fn next(waves: &Waves, open: usize, opened_at_ms: i64, now_ms: i64, tally: Tally, gate: Gate) -> Step {
    let share = |n: u32| {
        if tally.machines == 0 { 0 } else { (u64::from(n) * u64::from(ALL) / u64::from(tally.machines)) as u32 }
    };
    if u64::from(tally.failed) * u64::from(ALL) > u64::from(gate.max_failed) * u64::from(tally.machines) {
        return Step::Halt(format!(
            "{} of {} machines failed ({}), more than the {} allowed",
            tally.failed,
            tally.machines,
            pct(share(tally.failed)),
            pct(gate.max_failed)
        ));
    }
    if open + 1 >= waves.len() {
        return Step::AllOpen;
    }
    if u64::from(tally.verified) * u64::from(ALL) < u64::from(gate.min_verified) * u64::from(tally.machines) {
        return Step::Wait(format!(
            "{} of {} machines verified ({}); wave {} opens at {}",
            tally.verified,
            tally.machines,
            pct(share(tally.verified)),
            open + 2,
            pct(gate.min_verified)
        ));
    }
    let at = opened_at_ms.saturating_add(gate.wait_ms);
    if now_ms < at {
        return Step::Wait(format!(
            "wave {} opens once wave {} has waited its time ({} s more)",
            open + 2,
            open + 1,
            (at - now_ms + 999) / 1000
        ));
    }
    Step::Open(open + 1)
}

/// Where a rollout stands, as every tier admits offers by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waves open as their gates pass.
    Running,
    /// Stopped: no machine that has not taken the update is offered it.
    Halted,
    /// The update is withdrawn (the catalog sends the machines that took it back): the rollout
    /// holds nothing any more.
    Reverted,
}

/// A rollout as admission needs it: its waves, how many are open, its phase and its group.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    pub waves: &'a Waves,
    pub open: usize,
    pub phase: Phase,
    /// Only this group's machines take part; `None`: every group.
    pub group: Option<&'a str>,
}

/// Why the rollout keeps `update_id` from `machine` (in group `machine_group`) for now, if it
/// does. The same on every tier: it reads only the rollout, the names and the hash.
pub fn hold(a: &Admission<'_>, update_id: &str, machine: &str, machine_group: &str) -> Option<Hold> {
    if a.phase == Phase::Reverted {
        return None;
    }
    if let Some(g) = a.group.filter(|g| *g != machine_group) {
        return Some(Hold::OutsideRollout { group: g.to_string() });
    }
    if a.phase == Phase::Halted {
        return Some(Hold::Halted);
    }
    let wave = a.waves.wave_of(update_id, machine);
    (wave > a.open).then_some(Hold::Wave { wave, open: a.open })
}

/// A rollout as the centre's signed statement carries it (and a provider reads its own copy
/// as): enough for any tier, and an agent checking an answer, to apply [`hold`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admitting {
    pub update_id: String,
    pub waves: String,
    pub open: u32,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

/// Every update `rollouts` keep from `machine` (in `machine_group`) for now, by id. A
/// high-priority update skips its waves (it is for emergencies); a rollout whose waves do not
/// read holds its update back (only the centre writes them, after checking them).
pub fn holds<'a>(
    rollouts: impl IntoIterator<Item = &'a Admitting>,
    high_priority: impl Fn(&str) -> bool,
    machine: &str,
    machine_group: &str,
) -> std::collections::BTreeMap<String, Hold> {
    let mut out = std::collections::BTreeMap::new();
    for r in rollouts {
        if high_priority(&r.update_id) {
            continue;
        }
        let hold_it = match r.waves.parse::<Waves>() {
            Ok(waves) => {
                let group = (!r.group.is_empty()).then_some(r.group.as_str());
                let a = Admission { waves: &waves, open: r.open as usize, phase: r.phase, group };
                hold(&a, &r.update_id, machine, machine_group)
            }
            Err(_) => Some(Hold::Halted),
        };
        if let Some(h) = hold_it {
            out.insert(r.update_id.clone(), h);
        }
    }
    out
}

/// What one machine last did with an update, as its reports say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Live after its health check; its verification window not over yet.
    Installed,
    /// Healthy through its verification window.
    Verified,
    /// Failed to install, was rolled back by its health check, or failed verification.
    Failed,
    /// Went back from it by the removal path (a revert).
    RolledBack,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Installed => "installed",
            Outcome::Verified => "verified",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled back",
        }
    }
}

/// The gate's view of the open waves `0..=open`: each machine with its wave, its outcome (if it
/// reported one) and whether an administrator accepted its failure (`resume --ack-failures`):
/// an accepted failure counts neither as a machine nor as a failure.
pub fn tally(open: usize, machines: impl IntoIterator<Item = (usize, Option<Outcome>, bool)>) -> Tally {
    let mut t = Tally::default();
    for (wave, outcome, acknowledged) in machines {
        if wave > open || (acknowledged && outcome == Some(Outcome::Failed)) {
            continue;
        }
        t.machines += 1;
        match outcome {
            Some(Outcome::Verified) => t.verified += 1,
            Some(Outcome::Failed) => t.failed += 1,
            _ => {}
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn waves(s: &str) -> Waves {
        s.parse().unwrap()
    }

    #[test]
    fn waves_read_like_people_write_them_and_bad_ones_say_why() {
        assert_eq!(waves("1%,10%,50%,100%").0, vec![100, 1_000, 5_000, 10_000]);
        assert_eq!(waves("0.5%, 2.25%,100%").0, vec![50, 225, 10_000]);
        assert_eq!(waves("100%"), Waves::at_once());
        assert_eq!(waves("1%,10%,50%,100%").to_string(), "1%,10%,50%,100%");
        assert_eq!(pct(50), "0.5%");
        for (bad, why) in [
            ("10%,5%,100%", "larger than the one before"),
            ("10%,50%", "the last wave is 100%"),
            ("0%,100%", "admits no machine"),
            ("10,100%", "ends with %"),
            ("1.234%,100%", "two decimals"),
            ("150%", "more than 100%"),
            ("", "ends with %"),
        ] {
            let e = bad.parse::<Waves>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_rollout_opens_waits_and_halts_by_its_one_rule() {
        let w = waves("1%,10%,100%");
        let gate = Gate { min_verified: 9_500, max_failed: 200, wait_ms: 1_000 };
        let t = |machines, verified, failed| Tally { machines, verified, failed };
        // All verified and the wait passed: the next wave opens.
        assert_eq!(next(&w, 0, 0, 1_000, t(100, 100, 0), gate), Step::Open(1));
        // Not before the wait.
        assert!(matches!(next(&w, 0, 0, 999, t(100, 100, 0), gate), Step::Wait(m) if m.contains("waited")));
        // Not below the verified share.
        assert!(matches!(next(&w, 0, 0, 5_000, t(100, 94, 0), gate), Step::Wait(m) if m.contains("94 of 100")));
        // A failed share over the limit halts, whatever else.
        assert!(
            matches!(next(&w, 0, 0, 5_000, t(100, 97, 3), gate), Step::Halt(m) if m.contains("3 of 100 machines failed (3%)"))
        );
        assert_eq!(next(&w, 0, 0, 5_000, t(100, 98, 2), gate), Step::Open(1), "at the limit is within it");
        // An empty first wave waits only for its time.
        assert_eq!(next(&w, 0, 0, 1_000, t(0, 0, 0), gate), Step::Open(1));
        // The last wave open: nothing more to open, but a breach still halts.
        assert_eq!(next(&w, 2, 0, 5_000, t(1_000, 10, 0), gate), Step::AllOpen);
        assert!(matches!(next(&w, 2, 0, 5_000, t(1_000, 900, 100), gate), Step::Halt(_)));
    }

    #[test]
    fn admission_holds_by_wave_group_and_phase() {
        let w = waves("10%,100%");
        let (first, later) =
            (0..1000).map(|i| format!("pc-{i}")).fold((None, None), |(f, l), m| match w.wave_of("u1", &m) {
                0 => (f.or(Some(m)), l),
                _ => (f, l.or(Some(m))),
            });
        let (first, later) = (first.unwrap(), later.unwrap());
        let mut a = Admission { waves: &w, open: 0, phase: Phase::Running, group: None };
        assert_eq!(hold(&a, "u1", &first, "default"), None);
        assert_eq!(hold(&a, "u1", &later, "default"), Some(Hold::Wave { wave: 1, open: 0 }));
        a.open = 1;
        assert_eq!(hold(&a, "u1", &later, "default"), None);
        a.group = Some("lab");
        assert_eq!(hold(&a, "u1", &later, "default"), Some(Hold::OutsideRollout { group: "lab".into() }));
        assert_eq!(hold(&a, "u1", &later, "lab"), None);
        a.phase = Phase::Halted;
        assert_eq!(hold(&a, "u1", &first, "lab"), Some(Hold::Halted));
        a.phase = Phase::Reverted;
        assert_eq!(hold(&a, "u1", &first, "other"), None, "a reverted rollout holds nothing");
    }

    #[test]
    fn high_priority_skips_waves_and_unreadable_waves_hold() {
        let r = |id: &str, waves: &str| Admitting {
            update_id: id.into(),
            waves: waves.into(),
            open: 0,
            phase: Phase::Running,
            group: String::new(),
        };
        // 0.01 % in the first wave: almost every machine waits.
        let all = [r("urgent", "0.01%,100%"), r("normal", "0.01%,100%"), r("broken", "nonsense")];
        let later = (0..100).map(|i| format!("pc-{i}")).find(|m| position("normal", m) >= 1).unwrap();
        let held = holds(&all, |id| id == "urgent", &later, "default");
        assert!(!held.contains_key("urgent"), "high priority is for emergencies: no waves");
        assert_eq!(held.get("normal"), Some(&Hold::Wave { wave: 1, open: 0 }));
        assert_eq!(held.get("broken"), Some(&Hold::Halted), "a rollout that does not read holds its update");
    }

    #[test]
    fn the_tally_counts_open_waves_and_leaves_out_accepted_failures() {
        use Outcome::*;
        let machines = [
            (0, Some(Verified), false),
            (0, Some(Failed), false),
            (0, Some(Failed), true),
            (0, Some(Installed), false),
            (0, None, false),
            (1, Some(Failed), false),
        ];
        assert_eq!(tally(0, machines), Tally { machines: 4, verified: 1, failed: 1 });
        assert_eq!(tally(1, machines), Tally { machines: 5, verified: 1, failed: 2 });
    }

    proptest! {
        /// A machine's wave is the same for the same update and name (every tier computes it
        /// alone), and waves only grow: a machine admitted stays admitted as more waves open,
        /// and as any wave's share grows.
        #[test]
        fn cohorts_are_stable_and_monotone(
            update in "[a-z0-9.-]{1,40}",
            machine in "[a-zA-Z0-9._-]{1,63}",
            shares in proptest::collection::btree_set(1u32..ALL, 0..6),
            grow in 0u32..ALL,
        ) {
            let mut cut: Vec<u32> = shares.into_iter().collect();
            cut.push(ALL);
            let w = Waves(cut.clone());
            let wave = w.wave_of(&update, &machine);
            prop_assert_eq!(wave, w.wave_of(&update, &machine));
            prop_assert!(wave < w.len());
            for open in 0..w.len() {
                prop_assert_eq!(admitted(&w, open, &update, &machine), open >= wave);
            }
            // Every share grown (kept ascending): the machine is in the same wave or an earlier one.
            let grown: Vec<u32> = cut.iter().map(|s| (*s + grow).min(ALL)).collect();
            let mut dedup = grown.clone();
            dedup.dedup();
            if dedup.len() == grown.len() {
                prop_assert!(Waves(grown).wave_of(&update, &machine) <= wave);
            }
        }

        /// The rule never opens a wave past a breach, before the wait, or below the verified share.
        #[test]
        fn a_wave_opens_only_within_the_limits(
            machines in 0u32..1_000, verified in 0u32..1_000, failed in 0u32..1_000,
            min_verified in 0u32..=ALL, max_failed in 0u32..=ALL, wait in 0i64..10_000, now in 0i64..20_000,
        ) {
            let (verified, failed) = (verified.min(machines), failed.min(machines - verified.min(machines)));
            let gate = Gate { min_verified, max_failed, wait_ms: wait };
            let tally = Tally { machines, verified, failed };
            if let Step::Open(n) = next(&Waves(vec![100, 1_000, ALL]), 0, 0, now, tally, gate) {
                prop_assert_eq!(n, 1);
                prop_assert!(now >= wait);
                prop_assert!(u64::from(failed) * u64::from(ALL) <= u64::from(max_failed) * u64::from(machines));
                prop_assert!(u64::from(verified) * u64::from(ALL) >= u64::from(min_verified) * u64::from(machines));
            }
        }
    }

    proptest! {
        // Each case hashes 20,000 names: fewer cases.
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Each wave holds its share of a large fleet, within what chance allows (20,000
        /// machines: a share is off by more than 2.5 points about once in 10^11).
        #[test]
        fn cohorts_are_proportional(update in "[a-z0-9-]{1,20}", share in 1u32..ALL) {
            let w = Waves(vec![share, ALL]);
            let n = 20_000u32;
            let first = (0..n).filter(|i| w.wave_of(&update, &format!("pc-{i}")) == 0).count() as f64;
            let expected = f64::from(n) * f64::from(share) / f64::from(ALL);
            prop_assert!((first - expected).abs() <= f64::from(n) * 0.025, "{first} in the first wave, expected {expected}");
        }
    }
}
