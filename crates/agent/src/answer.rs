//! A provider's answer, checked against what the centre decided. With a pinned catalog key the
//! agent does not take a provider's word for anything that decides what it does: it verifies
//! the signed statement (fresh, not older than one seen) and its machine's record against the
//! statement's machine root, computes its own plan with the engine every tier uses, and acts
//! only on that plan, in its order — an offer the answer withholds stops the plan there, an
//! offer the plan does not hold is refused and reported. The group's settings, assigned
//! providers and the check-interval bounds come from the statement too.
//!
//! Pure: [`check`] takes the answer and what the agent knows of itself and returns the answer
//! the agent acts on.
use updraft_core::decisions::{self, Decided, MachineInput, MachineProof};
use updraft_core::freshness::{self, Entry, Statement};
use updraft_core::keys::PublicKey;
use updraft_core::plan::Action;
use updraft_proto::v1::{ActionKind, CheckResponse, GroupSettings, Offer, Policy, SignedStatement, Update};

/// The longest check interval any answer can set, signed or not: a day.
pub const MAX_INTERVAL_SECS: u32 = 24 * 3600;

/// The answer to act on, and the offers refused from it (each a problem to report).
#[derive(Debug)]
pub struct Checked {
    pub resp: CheckResponse,
    /// The catalog version the decisions come from.
    pub version: u64,
    /// Each offer refused, with why.
    pub refused: Vec<(Update, String)>,
    /// The statement decided on (to send its digest next time instead of receiving it again).
    pub statement: SignedStatement,
}

/// Checks `resp` for machine `name` against the pinned `keys`. An answer without a statement
/// is checked against `held`, the one the agent holds (the provider leaves out a statement the
/// agent said it has; it is verified again all the same). An error refuses the whole answer
/// (the agent tries another provider).
pub fn check(
    keys: &[PublicKey],
    seen_version: u64,
    now_ms: i64,
    name: &str,
    me: &MachineInput,
    held: Option<&SignedStatement>,
    mut resp: CheckResponse,
) -> Result<Checked, String> {
    let Some(signed) = resp.statement.take().or_else(|| held.cloned()) else {
        return Err("it carries no signed catalog statement".into());
    };
    let st =
        freshness::verify(keys, &signed.body, &signed.signature, seen_version, now_ms).map_err(|e| e.to_string())?;
    for o in &resp.offers {
        if let Some(u) = &o.update
            && !st.lists(&u.id, &u.content_hash, u.size)
        {
            return Err(format!(
                "it offers {} ({} bytes, {}), which the signed catalog version {} does not list so",
                u.id, u.size, u.content_hash, st.version
            ));
        }
    }
    // No proof is the empty one: it stands only where no machine has a record.
    let proof: MachineProof = match resp.machine_proof.is_empty() {
        true => MachineProof::default(),
        false => serde_json::from_slice(&resp.machine_proof)
            .map_err(|e| format!("its proof of this machine's record is unreadable: {e}"))?,
    };
    let record = decisions::verify_machine(&st.machines, name, &proof).map_err(|e| e.to_string())?;
    let decided = decisions::decide(&st, &record, me).map_err(|e| e.to_string())?;
    let (offers, refused) = reconcile(&st, &decided, &resp.offers);
    resp.offers = offers;
    resp.policy = Some(policy_of(&decided));
    // Within the centre's bounds (and never longer than a day, signed or not).
    let bounds = decided.interval.unwrap_or(freshness::IntervalBounds { min_secs: 1, max_secs: MAX_INTERVAL_SECS });
    let max_b = bounds.max_secs.clamp(1, MAX_INTERVAL_SECS);
    let min_b = bounds.min_secs.clamp(1, max_b);
    resp.min_check_interval_secs = resp.min_check_interval_secs.clamp(min_b, max_b);
    resp.max_check_interval_secs = resp.max_check_interval_secs.clamp(resp.min_check_interval_secs, max_b);
    // The version decided on is the statement's: an answer cannot claim a newer one.
    resp.catalog_seq = resp.catalog_seq.min(st.version);
    Ok(Checked { resp, version: st.version, refused, statement: signed })
}

/// Bounds an unsigned answer's interval (agents started with `--allow-unsigned-catalog`).
pub fn bound_unsigned(resp: &mut CheckResponse) {
    resp.max_check_interval_secs = resp.max_check_interval_secs.min(MAX_INTERVAL_SECS);
    resp.min_check_interval_secs = resp.min_check_interval_secs.min(resp.max_check_interval_secs);
}

fn kind_of(a: &Action) -> ActionKind {
    match a {
        Action::Install { .. } => ActionKind::Install,
        Action::Remove { .. } => ActionKind::Remove,
    }
}

fn kind_name(kind: i32) -> &'static str {
    if kind == ActionKind::Remove as i32 { "removal" } else { "install" }
}

/// The plan's offers the answer carries, in the plan's order up to the first it withholds;
/// and every offer of the answer the plan does not hold, as a refusal.
fn reconcile(st: &Statement, decided: &Decided, answer: &[Offer]) -> (Vec<Offer>, Vec<(Update, String)>) {
    let mut out = Vec::new();
    let mut withheld = false;
    for action in &decided.plan.actions {
        let kind = kind_of(action) as i32;
        let given = answer.iter().find(|o| o.action == kind && o.update.as_ref().is_some_and(|u| u.id == action.id()));
        let (Some(given), Some(entry), false) = (given, st.entry(action.id()), withheld) else {
            // Withheld (or later than something withheld): the plan stops here.
            withheld = true;
            continue;
        };
        let update = update_of(entry, given.update.as_ref());
        let pinned = decided.pins.contains_key(&update.product) && kind == ActionKind::Install as i32;
        // A removal's way back, when the machine does not keep it, is from the statement too.
        let (rollback_to_version, rollback) = match action {
            Action::Remove { rollback_to: Some(v), .. } => {
                let items: Vec<_> = st.entries.iter().filter_map(decisions::item_of).collect();
                let back = updraft_core::plan::rollback_item(&items, &update.product, *v)
                    .and_then(|c| st.entry(&c.id))
                    .map(|e| update_of(e, given.rollback.as_ref()));
                (v.to_string(), back)
            }
            _ => (String::new(), None),
        };
        out.push(Offer { action: kind, update: Some(update), rollback_to_version, pinned, rollback });
    }
    let mut refused = Vec::new();
    for o in answer {
        let Some(u) = &o.update else { continue };
        let planned = decided.plan.actions.iter().any(|a| kind_of(a) as i32 == o.action && a.id() == u.id);
        // A site's replica may be a change ahead of the statement it carries: an offer from a
        // record newer than the statement waits for the statement that covers it.
        if planned || u.catalog_seq > st.version {
            continue;
        }
        let why = format!(
            "refused the {} of {} ({} {}): the centre's signed decisions (catalog version {}) do not give it to this machine",
            kind_name(o.action),
            u.id,
            u.product,
            u.version,
            st.version
        );
        refused.push((u.clone(), why));
    }
    (out, refused)
}

/// The update to act on: every deciding field from the signed entry; only descriptive ones
/// (labels, documentation, import time) from the answer.
fn update_of(e: &Entry, given: Option<&Update>) -> Update {
    let given = given.cloned().unwrap_or_default();
    Update {
        id: e.id.clone(),
        product_line: e.product_line.clone(),
        product: e.product.clone(),
        upgrade_code: e.upgrade_code.clone(),
        product_code: e.product_code.clone(),
        install_type: e.install_type,
        version: e.version.clone(),
        install_properties: e.install_properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        size: e.size,
        content_hash: e.content_hash.clone(),
        state: e.state,
        high_priority: e.high_priority,
        related_installs: e.related_installs.clone(),
        prestage: e.prestage,
        requires_version: e.requires.clone(),
        ..given
    }
}

fn policy_of(d: &Decided) -> Policy {
    let s = &d.settings;
    Policy {
        group: s.group.clone(),
        managed: s.managed,
        settings: Some(GroupSettings {
            mode: s.mode.to_wire(),
            install_day: s.install_day,
            install_hour: s.install_hour,
            providers: s.providers.clone(),
            download_early: s.download_early,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_core::decisions::{MachineRecord, MachineTree};
    use updraft_core::freshness::{GroupEntry, IntervalBounds};
    use updraft_core::keys::ReleaseKey;
    use updraft_core::plan::InstalledItem;

    fn entry(product: &str, version: &str, state: i32) -> Entry {
        Entry {
            id: format!("{product}-{version}"),
            content_hash: format!("sha256:{product}{version}"),
            size: 10,
            product: product.into(),
            product_line: product.into(),
            version: version.into(),
            install_type: 1,
            state,
            ..Default::default()
        }
    }

    struct Centre {
        key: ReleaseKey,
        st: Statement,
        tree: MachineTree,
    }

    impl Centre {
        fn new(records: Vec<MachineRecord>) -> Self {
            let tree = MachineTree::build(records);
            let st = Statement {
                version: 7,
                issued_unix_ms: 0,
                expires_unix_ms: i64::MAX,
                entries: vec![
                    entry("hello", "1.0.0.0", 2),
                    entry("hello", "3.0.0.0", 2),
                    entry("hello", "4.0.0.0", 1),
                    entry("tools", "1.0.0.0", 2),
                ],
                caps: vec![],
                groups: vec![GroupEntry {
                    name: "lab".into(),
                    mode: 3,
                    install_day: -1,
                    install_hour: -1,
                    providers: vec!["https://site.example:7443".into()],
                    download_early: false,
                    deployed: Default::default(),
                }],
                check_interval: Some(IntervalBounds { min_secs: 60, max_secs: 120 }),
                machines: tree.root(),
                decides: true,
                rollouts: vec![],
            };
            Centre { key: ReleaseKey::generate().unwrap(), st, tree }
        }

        /// The answer an honest provider gives `name`, before a rogue changes it.
        fn answer(&self, name: &str, offers: Vec<Offer>) -> CheckResponse {
            let (body, sig) = self.st.sign(&self.key);
            CheckResponse {
                catalog_seq: 7,
                offers,
                min_check_interval_secs: 60,
                max_check_interval_secs: 120,
                statement: Some(SignedStatement { body, signature: sig.to_vec(), key_id: String::new() }),
                machine_proof: serde_json::to_vec(&self.tree.proof(name)).unwrap(),
                ..Default::default()
            }
        }

        fn offer(&self, kind: ActionKind, id: &str) -> Offer {
            let e = self.st.entry(id).unwrap();
            Offer { action: kind as i32, update: Some(update_of(e, None)), ..Default::default() }
        }

        fn check(&self, name: &str, me: &MachineInput, resp: CheckResponse) -> Result<Checked, String> {
            check(&[self.key.public()], 0, 1, name, me, None, resp)
        }
    }

    fn has(product: &str, version: &str) -> MachineInput {
        MachineInput {
            installed: vec![InstalledItem {
                product: product.into(),
                version: version.parse().unwrap(),
                upgrade_code: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn an_honest_answer_is_acted_on_as_given() {
        let c = Centre::new(vec![]);
        let resp = c.answer("pc-1", vec![c.offer(ActionKind::Install, "hello-3.0.0.0")]);
        let got = c.check("pc-1", &has("hello", "1.0.0.0"), resp).unwrap();
        assert!(got.refused.is_empty(), "{:?}", got.refused);
        assert_eq!(got.resp.offers.len(), 1);
        assert_eq!(got.resp.offers[0].update.as_ref().unwrap().id, "hello-3.0.0.0");
    }

    #[test]
    fn a_rogue_cannot_downgrade_remove_install_unapproved_or_hurry() {
        let c = Centre::new(vec![]);
        let me = has("hello", "3.0.0.0");
        for (kind, id, what) in [
            (ActionKind::Install, "hello-1.0.0.0", "downgrade"),
            (ActionKind::Remove, "hello-3.0.0.0", "removal"),
            (ActionKind::Install, "hello-4.0.0.0", "pre-approval"),
            (ActionKind::Install, "tools-1.0.0.0", "a product the machine does not have"),
        ] {
            let got = c.check("pc-1", &me, c.answer("pc-1", vec![c.offer(kind, id)])).unwrap();
            assert!(got.resp.offers.is_empty(), "{what}: acted on {:?}", got.resp.offers);
            assert_eq!(got.refused.len(), 1, "{what}: refused and reported");
        }
        // Priority forged on a genuine offer: the signed entry's priority counts.
        let me = has("hello", "1.0.0.0");
        let mut forged = c.offer(ActionKind::Install, "hello-3.0.0.0");
        forged.update.as_mut().unwrap().high_priority = true;
        let got = c.check("pc-1", &me, c.answer("pc-1", vec![forged])).unwrap();
        assert!(!got.resp.offers[0].update.as_ref().unwrap().high_priority);
    }

    #[test]
    fn policy_providers_and_interval_come_from_the_centre() {
        let c = Centre::new(vec![MachineRecord { name: "pc-1".into(), group: "lab".into(), ..Default::default() }]);
        let mut resp = c.answer("pc-1", vec![]);
        resp.policy = Some(Policy {
            group: "default".into(),
            settings: Some(GroupSettings {
                mode: 1,
                install_day: -1,
                install_hour: -1,
                providers: vec!["https://evil".into()],
                download_early: false,
            }),
            managed: false,
        });
        resp.min_check_interval_secs = u32::MAX;
        resp.max_check_interval_secs = u32::MAX;
        let got = c.check("pc-1", &MachineInput::default(), resp).unwrap();
        let p = got.resp.policy.unwrap();
        assert_eq!(p.group, "lab");
        let s = p.settings.unwrap();
        assert_eq!((s.mode, s.providers.as_slice()), (3, ["https://site.example:7443".to_string()].as_slice()));
        assert_eq!((got.resp.min_check_interval_secs, got.resp.max_check_interval_secs), (120, 120));
    }

    #[test]
    fn a_machine_record_cannot_be_hidden_or_borrowed() {
        let pinned = MachineRecord {
            name: "pc-1".into(),
            pins: [("hello".to_string(), "1.0.0.0".to_string())].into(),
            ..Default::default()
        };
        let c =
            Centre::new(vec![pinned, MachineRecord { name: "pc-2".into(), group: "lab".into(), ..Default::default() }]);
        // pc-1 is pinned to 1.0: an answer carrying pc-2's proof, or none, is refused whole.
        let mut resp = c.answer("pc-1", vec![]);
        resp.machine_proof = serde_json::to_vec(&c.tree.proof("pc-2")).unwrap();
        assert!(c.check("pc-1", &has("hello", "1.0.0.0"), resp).is_err());
        let mut resp = c.answer("pc-1", vec![]);
        resp.machine_proof = serde_json::to_vec(&MachineProof::default()).unwrap();
        assert!(c.check("pc-1", &has("hello", "1.0.0.0"), resp).is_err());
        // With the genuine proof the pin holds: 3.0 is refused.
        let resp = c.answer("pc-1", vec![c.offer(ActionKind::Install, "hello-3.0.0.0")]);
        let got = c.check("pc-1", &has("hello", "1.0.0.0"), resp).unwrap();
        assert!(got.resp.offers.is_empty() && got.refused.len() == 1, "{got:?}");
    }

    #[test]
    fn an_answer_without_the_statement_is_checked_against_the_one_held() {
        let c = Centre::new(vec![]);
        let first = c.check("pc-1", &has("hello", "1.0.0.0"), c.answer("pc-1", vec![])).unwrap();
        let mut resp = c.answer("pc-1", vec![c.offer(ActionKind::Install, "hello-3.0.0.0")]);
        resp.statement = None;
        let keys = [c.key.public()];
        let got = check(&keys, 7, 1, "pc-1", &has("hello", "1.0.0.0"), Some(&first.statement), resp.clone()).unwrap();
        assert_eq!(got.resp.offers.len(), 1);
        // Holding none, the answer is refused; the held one expires like any other.
        assert!(check(&keys, 7, 1, "pc-1", &has("hello", "1.0.0.0"), None, resp.clone()).is_err());
        let e = check(&keys, 7, i64::MAX, "pc-1", &MachineInput::default(), Some(&first.statement), resp).unwrap_err();
        assert!(e.contains("expired"), "{e}");
    }

    #[test]
    fn a_withheld_offer_stops_the_plan_there() {
        let c = Centre::new(vec![MachineRecord {
            name: "pc-1".into(),
            deployed: ["tools".to_string()].into(),
            ..Default::default()
        }]);
        // The plan is hello 3.0, then tools 1.0: without hello, tools waits too.
        let resp = c.answer("pc-1", vec![c.offer(ActionKind::Install, "tools-1.0.0.0")]);
        let got = c.check("pc-1", &has("hello", "1.0.0.0"), resp).unwrap();
        assert!(got.resp.offers.is_empty() && got.refused.is_empty(), "{got:?}");
    }
}
