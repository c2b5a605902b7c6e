//! The centre's signed catalog statement (see `updraft_core::freshness` and
//! `updraft_core::decisions`): what the centre decided — every update with its state and
//! priority, caps, groups with their settings and deployments, the check-interval bounds, and
//! the root over every machine's own record. Signed when first asked for, again right after
//! every catalog change (so sites receive it right behind the change) and before half its
//! lifetime has passed; stored, sent to followers, and attached to every check answer with the
//! answering machine's proof. Sites pass on the centre's statement; they cannot sign one, and
//! they prove a machine's record from their own replica only while it matches the signed root.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use updraft_core::decisions::{MachineRecord, MachineTree};
use updraft_core::freshness::{CapEntry, Entry, GroupEntry, IntervalBounds, Statement};
use updraft_core::keys::ReleaseKey;
use updraft_proto::v1::{Deployment, SignedStatement, Update};

use crate::decided::Decided;
use crate::error::Result;
use crate::store::{Change, Store};
use crate::{Shared, now_ms};

/// A statement and the machine tree whose root it carries: an answer's proof comes from the
/// same tree as the root its statement signs (None: no tree matches it yet, so no proof).
#[derive(Clone)]
pub struct Signed {
    pub statement: SignedStatement,
    pub machines: Option<Arc<MachineTree>>,
    /// SHA-256 of the statement's body (agents holding it are not sent it again).
    pub digest: Vec<u8>,
}

impl Signed {
    fn new(statement: SignedStatement, machines: Option<Arc<MachineTree>>) -> Self {
        let digest = updraft_core::freshness::digest(&statement.body);
        Self { statement, machines, digest }
    }

    /// The statement for an answer to an agent that holds the statement with `held` digest:
    /// none when it is this one.
    pub fn for_agent(&self, held: &[u8]) -> Option<SignedStatement> {
        (held != self.digest.as_slice()).then(|| self.statement.clone())
    }

    /// The machine's proof, as a check answer carries it (JSON of `MachineProof`).
    pub fn proof_for(&self, machine: &str) -> Vec<u8> {
        match &self.machines {
            Some(t) => serde_json::to_vec(&t.proof(machine)).expect("a proof serialises"),
            None => vec![],
        }
    }
}

pub struct Signer {
    key: Arc<ReleaseKey>,
    ttl: Duration,
    /// The last statement signed, with the catalog sequence and time it was signed at.
    last: Mutex<Option<(u64, i64, Signed)>>,
}

/// The decision fields of an update record.
pub fn entry_of(u: &Update) -> Entry {
    Entry {
        id: u.id.clone(),
        content_hash: u.content_hash.clone(),
        size: u.size,
        product: u.product.clone(),
        product_line: u.product_line.clone(),
        version: u.version.clone(),
        install_type: u.install_type,
        product_code: u.product_code.clone(),
        upgrade_code: u.upgrade_code.clone(),
        requires: u.requires_version.clone(),
        state: u.state,
        high_priority: u.high_priority,
        related_installs: u.related_installs.clone(),
        prestage: u.prestage,
        install_properties: u.install_properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// Every group (the default one always), with its settings, providers as URLs and deployments.
fn groups(decided: &Decided, deployments: &[Deployment]) -> Vec<GroupEntry> {
    let mut out: Vec<GroupEntry> = Vec::new();
    for name in decided.group_names() {
        let s = decided.settings(&name);
        out.push(GroupEntry {
            mode: s.mode,
            install_day: s.install_day,
            install_hour: s.install_hour,
            download_early: s.download_early,
            providers: crate::ops::servers::resolve_providers(decided, &s.providers),
            deployed: deployments.iter().filter(|d| d.group == name).map(|d| d.product.clone()).collect(),
            name,
        });
    }
    out
}

/// Every machine's own record: group, administrator's role, pins, own deployments.
pub fn machine_records(store: &Store, deployments: &[Deployment]) -> Result<Vec<MachineRecord>> {
    type Records = std::collections::BTreeMap<String, MachineRecord>;
    fn at<'a>(by_name: &'a mut Records, name: &str) -> &'a mut MachineRecord {
        by_name
            .entry(name.to_string())
            .or_insert_with(|| MachineRecord { name: name.to_string(), ..Default::default() })
    }
    let mut by_name = Records::new();
    for a in store.list_assignments()? {
        at(&mut by_name, &a.machine).group = a.group;
    }
    for p in store.list_pins()? {
        at(&mut by_name, &p.machine).pins = p.pins.into_iter().collect();
    }
    for r in store.list_roles()? {
        at(&mut by_name, &r.machine).role = r.role;
    }
    for d in deployments.iter().filter(|d| !d.machine.is_empty()) {
        at(&mut by_name, &d.machine).deployed.insert(d.product.clone());
    }
    Ok(by_name.into_values().collect())
}

impl Signer {
    pub fn new(key: Arc<ReleaseKey>, ttl: Duration) -> Self {
        Self { key, ttl, last: Mutex::new(None) }
    }

    /// The current statement for catalog sequence `seq`: the last one, unless the catalog
    /// moved or it is half-way to expiry.
    pub fn current(&self, store: &Store, seq: u64, interval: IntervalBounds) -> Result<Signed> {
        let now = now_ms();
        let ttl_ms = self.ttl.as_millis() as i64;
        let mut last = self.last.lock().expect("signer lock");
        if let Some((s, at, signed)) = last.as_ref()
            && *s == seq
            && now - at < ttl_ms / 2
        {
            return Ok(signed.clone());
        }
        let deployments = store.list_deployments()?;
        let tree = Arc::new(MachineTree::build(machine_records(store, &deployments)?));
        let caps = store
            .list_caps()?
            .into_iter()
            .map(|c| CapEntry {
                product_line: c.product_line,
                version: c.version,
                follow_role: c.follow_role,
                ceiling: c.ceiling,
            })
            .collect();
        let decided = Decided::read(store)?;
        let st = Statement {
            version: seq,
            issued_unix_ms: now,
            expires_unix_ms: now + ttl_ms,
            entries: store.list_updates()?.iter().map(entry_of).collect(),
            caps,
            groups: groups(&decided, &deployments),
            rollouts: decided.rollouts.clone(),
            check_interval: Some(interval),
            machines: tree.root(),
            decides: true,
        };
        let (body, sig) = st.sign(&self.key);
        let statement = SignedStatement { body, signature: sig.to_vec(), key_id: self.key.public().key_id() };
        let signed = Signed::new(statement, Some(tree));
        *last = Some((seq, now, signed.clone()));
        Ok(signed)
    }
}

/// A site's pairing of the stored statement with a machine tree built from its replica.
#[derive(Default)]
pub struct SiteProofs {
    /// The last statement whose root the replica matched, with its tree.
    matched: Option<Signed>,
    /// The statement body and replica sequence a build last failed to match (not retried
    /// until one of them moves).
    failed: Option<(Vec<u8>, u64)>,
}

fn claimed_root(body: &[u8]) -> Option<updraft_core::decisions::MachinesRoot> {
    serde_json::from_slice::<Statement>(body).ok().map(|s| s.machines)
}

impl SiteProofs {
    fn current(&mut self, store: &Store, stored: SignedStatement) -> Result<Signed> {
        if let Some(m) = &self.matched
            && m.statement.body == stored.body
        {
            return Ok(m.clone());
        }
        let seq = store.catalog_seq()?;
        if self.failed.as_ref().is_some_and(|(b, s)| *b == stored.body && *s == seq) {
            return Ok(self.matched.clone().unwrap_or_else(|| Signed::new(stored, None)));
        }
        let tree = MachineTree::build(machine_records(store, &store.list_deployments()?)?);
        if claimed_root(&stored.body).is_some_and(|r| r == tree.root()) {
            let signed = Signed::new(stored, Some(Arc::new(tree)));
            self.matched = Some(signed.clone());
            self.failed = None;
            return Ok(signed);
        }
        // The replica is ahead of or behind this statement (a change between two statements):
        // the last consistent pair keeps answering until the next one matches.
        tracing::debug!(seq, "replica does not match the statement's machine root yet");
        self.failed = Some((stored.body.clone(), seq));
        Ok(self.matched.clone().unwrap_or_else(|| Signed::new(stored, None)))
    }
}

/// The current statement alone (for followers): the centre's own, signed now if need be, or
/// the one a site last received from upstream.
pub fn current(shared: &Shared) -> Result<Option<SignedStatement>> {
    match &shared.signer {
        Some(s) => Ok(Some(s.current(&shared.store, shared.known_seq()?, interval(shared))?.statement)),
        None => shared.store.statement(),
    }
}

/// The statement a check answer carries: the centre's own (signed now if need be), or the one
/// a site last received from upstream, with the tree to prove machines from.
pub fn for_answer(shared: &Shared) -> Result<Option<Signed>> {
    match &shared.signer {
        Some(s) => Ok(Some(s.current(&shared.store, shared.known_seq()?, interval(shared))?)),
        None => match shared.store.statement()? {
            Some(stored) => Ok(Some(shared.site_proofs.lock().expect("site proofs").current(&shared.store, stored)?)),
            None => Ok(None),
        },
    }
}

fn interval(shared: &Shared) -> IntervalBounds {
    IntervalBounds { min_secs: shared.config.min_check_secs, max_secs: shared.config.max_check_secs }
}

/// Re-signs after every catalog change and before expiry, and sends the result to followers.
pub async fn statement_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let Some(signer) = &shared.signer else { return };
    let mut changes = shared.hub.follow_catalog();
    let refresh = (signer.ttl / 4).max(Duration::from_millis(500));
    // The digest of the statement last stored and sent. A check may have signed the current one
    // first (`for_answer`): it is still this loop's to store and send.
    let mut sent: Vec<u8> = vec![];
    loop {
        let current = shared.known_seq().and_then(|seq| signer.current(&shared.store, seq, interval(&shared)));
        match current {
            Ok(signed) if signed.digest != sent => {
                if let Err(e) = shared.store.put_statement(&signed.statement).await {
                    tracing::warn!(error = %e, "cannot store the catalog statement");
                }
                let seq = shared.store.catalog_seq().unwrap_or_default();
                sent = signed.digest;
                shared.hub.publish(Change::Statement { statement: signed.statement, seq });
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot sign the catalog statement"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(refresh) => {}
            ev = changes.recv() => match ev {
                Ok(Change::Statement { .. }) => {}
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
