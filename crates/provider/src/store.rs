//! The provider's store, over the engine seam in `db`. Holds the catalog (with
//! its change log and sequence number), machines, activity and the site outbox. Every write
//! that a caller acknowledges is on disk before the method returns (a group commit: see
//! `commit`); a machine's last contact, recorded on every check, is not worth its own fsync
//! and reaches the disk with the next commit.
//!
//! Values are protobuf-encoded `updraft.v1` messages: the API is already the versioned schema,
//! and prost decoding tolerates fields added later.
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message;
use updraft_proto::v1::{
    Activity, Assignment, AuditEntry, Deployment, Discovery, ForwardedReport, Group, IssuedCertificate, JoinToken,
    Machine, MachineInfo, MachinePins, MachineRole, PairMember, Password, Peer, PendingEnrollment, ProductLineCap,
    Rollout, SignedStatement, SiteStats, Trust, Update, User, WatchFolder,
};

use crate::commit::Committer;
use crate::contacts::{Contact, Contacts};
use crate::db::{Db, Tree, Tx};
use crate::error::{ProviderError, Result};
use crate::pair::Fence;
use crate::table::{Table, decode};

mod pki;
mod rollouts;
pub use rollouts::outcome_of;

const CATALOG_SEQ: &[u8] = b"catalog_seq";
const STATEMENT: &[u8] = b"statement";
const SCHEMA: &[u8] = b"schema";
/// The audit chain's last sequence number (meta), so an append is one transaction.
const AUDIT_SEQ: &[u8] = b"audit_seq";
/// The layout this code writes. 1: caps held bare version strings (before deployments and
/// role ceilings); 2: caps are `ProductLineCap` messages, deployments and roles have trees;
/// 3: activity has a per-machine index; 4: the audit chain's last sequence number is kept.
pub const SCHEMA_VERSION: u64 = 4;
/// Left in a store's directory once it has been moved: holds the new location.
pub const MOVED_TO: &str = "MOVED-TO";

/// Bounds on what the store keeps, so a chatty fleet cannot fill the disk.
pub const MAX_ACTIVITY: usize = 100_000;
/// Audit entries listed per call.
pub const MAX_AUDIT_PAGE: usize = 5_000;
/// Activity entries kept per machine: one machine's flood evicts its own oldest entries, never
/// other machines' (nor administrators').
pub const MAX_ACTIVITY_PER_MACHINE: usize = 1_000;
pub const MAX_OUTBOX: usize = 100_000;

/// One entry of the catalog change log, as followers receive it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Upsert(Box<Update>),
    Deleted {
        id: String,
        seq: u64,
    },
    Cap {
        cap: ProductLineCap,
        seq: u64,
    },
    Group {
        group: Group,
        seq: u64,
    },
    GroupDeleted {
        name: String,
        seq: u64,
    },
    Assign {
        assignment: Assignment,
        seq: u64,
    },
    Pins {
        pins: MachinePins,
        seq: u64,
    },
    Peer {
        peer: Peer,
        seq: u64,
    },
    PeerRemoved {
        name: String,
        seq: u64,
    },
    Discovery {
        discovery: Discovery,
        seq: u64,
    },
    Deployed {
        deployment: Deployment,
        seq: u64,
    },
    Undeployed {
        deployment: Deployment,
        seq: u64,
    },
    Role {
        role: MachineRole,
        seq: u64,
    },
    /// What every tier trusts: the CA bundle and the revocation lists.
    Trust {
        trust: Trust,
        seq: u64,
    },
    /// An update's rollout in waves: every tier admits offers by its own copy.
    Rollout {
        rollout: Rollout,
        seq: u64,
    },
    /// The centre's signed catalog statement: sent to followers, never in the log.
    Statement {
        statement: SignedStatement,
        seq: u64,
    },
}

impl Change {
    pub fn seq(&self) -> u64 {
        match self {
            Change::Upsert(u) => u.catalog_seq,
            Change::Deleted { seq, .. }
            | Change::Cap { seq, .. }
            | Change::Group { seq, .. }
            | Change::GroupDeleted { seq, .. }
            | Change::Assign { seq, .. }
            | Change::Pins { seq, .. }
            | Change::Peer { seq, .. }
            | Change::PeerRemoved { seq, .. }
            | Change::Discovery { seq, .. }
            | Change::Deployed { seq, .. }
            | Change::Undeployed { seq, .. }
            | Change::Role { seq, .. }
            | Change::Trust { seq, .. }
            | Change::Rollout { seq, .. }
            | Change::Statement { seq, .. } => *seq,
        }
    }
}

/// A machine's index key for the activity entry at `key`.
fn machine_activity_key(machine: &str, key: &[u8]) -> Vec<u8> {
    [machine.as_bytes(), b"\0", key].concat()
}

/// The name of the group every machine is in unless assigned elsewhere.
pub const DEFAULT_GROUP: &str = updraft_core::decisions::DEFAULT_GROUP;

/// Logical keys in the change log: one per update id and one per product line cap, so the log
/// holds the latest change of each thing once.
fn update_key(id: &str) -> Vec<u8> {
    [b"u".as_slice(), id.as_bytes()].concat()
}
fn cap_key(line: &str) -> Vec<u8> {
    [b"c".as_slice(), line.as_bytes()].concat()
}

/// Policy records kept in their own tree and logged under a one-letter kind.
#[derive(Clone, Copy)]
enum Policy {
    Group,
    Assignment,
    Pins,
    Peer,
    /// Provider-wide settings, by name (discovery).
    Setting,
    /// Products deployed to a group or machine, by [`deployment_name`].
    Deployment,
    /// An administrator's choice of a machine's role, by machine name.
    Role,
    /// The trust record (one, [`TRUST`]).
    Trust,
    /// Rollouts in waves, by update id.
    Rollout,
}

impl Policy {
    fn kind(self) -> &'static [u8] {
        match self {
            Policy::Group => b"g",
            Policy::Assignment => b"a",
            Policy::Pins => b"p",
            Policy::Peer => b"r",
            Policy::Setting => b"s",
            Policy::Deployment => b"d",
            Policy::Role => b"o",
            Policy::Trust => b"t",
            Policy::Rollout => b"w",
        }
    }
}

const DISCOVERY: &str = "discovery";
const TRUST: &str = "trust";

/// The record name of a deployment: its target and product, NUL-separated (names never hold
/// a NUL), so one product deployed to a group and to a machine are two records.
fn deployment_name(d: &Deployment) -> String {
    if d.machine.is_empty() {
        format!("g\0{}\0{}", d.group, d.product)
    } else {
        format!("m\0{}\0{}", d.machine, d.product)
    }
}

fn deployment_of_name(name: &str) -> Option<Deployment> {
    let mut parts = name.splitn(3, '\0');
    let (kind, target, product) = (parts.next()?, parts.next()?, parts.next()?);
    let mut d = Deployment { product: product.to_string(), ..Default::default() };
    match kind {
        "g" => d.group = target.to_string(),
        "m" => d.machine = target.to_string(),
        _ => return None,
    }
    Some(d)
}

/// Gives logical key `key` the next sequence number (or `seq`, for a replica), replacing its
/// previous log entry. Returns the sequence number used.
fn log_change(tx: &Tx<'_>, s: &Store, key: &[u8], seq: Option<u64>) -> Result<u64> {
    let current = tx.get(&s.meta, CATALOG_SEQ)?.map(|v| read_u64(&v)).unwrap_or(0);
    let seq = seq.unwrap_or(current + 1);
    if let Some(old) = tx.get(&s.log_index, key)? {
        tx.remove(&s.log, old)?;
    }
    tx.insert(&s.log, be(seq), key)?;
    tx.insert(&s.log_index, key, be(seq))?;
    tx.insert(&s.meta, CATALOG_SEQ, be(current.max(seq)))?;
    Ok(seq)
}

#[derive(Clone)]
pub struct Store {
    db: Db,
    updates: Table<Update>,
    log: Tree,
    log_index: Tree,
    caps: Table<ProductLineCap>,
    meta: Tree,
    machines: Table<Machine>,
    /// Machines' last contacts, written with the next commit.
    contacts: std::sync::Arc<Contacts>,
    activity: Table<Activity>,
    /// `machine \0 activity key` -> (): each machine's entries in time order.
    activity_by_machine: Tree,
    outbox: Table<ForwardedReport>,
    watches: Table<WatchFolder>,
    groups: Table<Group>,
    assignments: Tree,
    pins: Table<MachinePins>,
    peers: Table<Peer>,
    settings: Table<Discovery>,
    deployments: Table<Deployment>,
    roles: Tree,
    trust: Table<Trust>,
    rollouts: Table<Rollout>,
    /// Each machine's last outcome with each update (`update \0 machine` -> the activity entry
    /// that said it): what rollouts and update statuses count. Never replicated.
    outcomes: Table<Activity>,
    /// Certificates the centre issued, by serial; join tokens by id; enrollment requests
    /// waiting for approval, by name. The centre's alone: never replicated.
    certificates: Table<IssuedCertificate>,
    join_tokens: Table<JoinToken>,
    enrollments: Table<PendingEnrollment>,
    users: Table<User>,
    /// Users' web console passwords (Argon2 PHC strings); like users, never sent to sites.
    passwords: Table<Password>,
    audit: Table<AuditEntry>,
    /// Providers sharing a database server, by name: each says where it is and when it last did.
    members: Table<PairMember>,
    fence: std::sync::Arc<std::sync::OnceLock<Fence>>,
    commit: std::sync::Arc<Committer>,
    /// Entries in `activity` and `outbox`, counted once at open: a tree's `len()` may walk the whole
    /// tree, which made every report (and, at a site, every check) cost O(entries).
    activity_count: std::sync::Arc<AtomicUsize>,
    outbox_count: std::sync::Arc<AtomicUsize>,
    outcome_count: std::sync::Arc<AtomicUsize>,
    /// Where committed catalog changes are announced, at the centre.
    announce: std::sync::Arc<std::sync::OnceLock<Announce>>,
}

/// Announces catalog changes once they are durable, in sequence order, each once: the one
/// place a change is published (the centre's hub is the sink), whoever wrote it.
struct Announce {
    sink: Box<dyn Fn(Change) + Send + Sync>,
    /// The last sequence number announced.
    announced: std::sync::Mutex<u64>,
}

/// The chained fields of an audit entry.
pub fn audit_fields(e: &AuditEntry) -> updraft_core::audit::Fields<'_> {
    updraft_core::audit::Fields {
        seq: e.seq,
        at_unix_ms: e.at_unix_ms,
        who: &e.who,
        role: &e.role,
        action: &e.action,
        outcome: &e.outcome,
        prev_hash: &e.prev_hash,
    }
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn read_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl Store {
    /// Opens (or creates) the store at `dir`. Fails at once if another process holds it, or if
    /// the store was moved elsewhere (so no provider keeps using a stale copy).
    pub fn open(dir: &Path) -> Result<Self> {
        if let Ok(to) = std::fs::read_to_string(dir.join(MOVED_TO)) {
            return Err(ProviderError::InvalidArgument(format!(
                "store {} was moved to {}; start the provider with --store {}",
                dir.display(),
                to.trim(),
                to.trim()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| ProviderError::Io(format!("{}: {e}", dir.display())))?;
        // The store and content are the provider's alone (machine records, audit, keys' uses).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| ProviderError::Io(format!("{}: {e}", dir.display())))?;
        }
        // No background flushes: data reaches the disk only through `flush`, which checks the
        // fence first, so a provider that lost the store cannot commit anything.
        Self::on(Db::open_embedded(&dir.join("db"))?, &dir.display().to_string())
    }

    /// The store in database `db` (at `location`, for messages), brought to this provider's
    /// schema first.
    pub fn on(db: Db, location: &str) -> Result<Self> {
        let fence: std::sync::Arc<std::sync::OnceLock<Fence>> = Default::default();
        let machines = Table::open(&db, "machines")?;
        let contacts = std::sync::Arc::new(Contacts::open(machines.clone())?);
        let before = {
            let (db, contacts) = (db.clone(), contacts.clone());
            Box::new(move || {
                contacts.write_pending(&db).map(drop).inspect_err(|e| {
                    tracing::warn!(error = %e, pending = contacts.pending(), "cannot write machines' contacts yet");
                })
            })
        };
        let commit = std::sync::Arc::new(Committer::start(db.clone(), fence.clone(), before)?);
        let store = Self {
            updates: Table::open(&db, "updates")?,
            log: db.open_tree("catalog_log")?,
            log_index: db.open_tree("catalog_log_index")?,
            caps: Table::open(&db, "caps")?,
            meta: db.open_tree("meta")?,
            machines,
            contacts,
            activity: Table::open(&db, "activity")?,
            activity_by_machine: db.open_tree("activity_by_machine")?,
            outbox: Table::open(&db, "outbox")?,
            watches: Table::open(&db, "watches")?,
            groups: Table::open(&db, "groups")?,
            assignments: db.open_tree("assignments")?,
            pins: Table::open(&db, "pins")?,
            peers: Table::open(&db, "peers")?,
            settings: Table::open(&db, "settings")?,
            deployments: Table::open(&db, "deployments")?,
            roles: db.open_tree("roles")?,
            trust: Table::open(&db, "trust")?,
            rollouts: Table::open(&db, "rollouts")?,
            outcomes: Table::open(&db, "outcomes")?,
            certificates: Table::open(&db, "certificates")?,
            join_tokens: Table::open(&db, "join_tokens")?,
            enrollments: Table::open(&db, "enrollments")?,
            users: Table::open(&db, "users")?,
            passwords: Table::open(&db, "passwords")?,
            audit: Table::open(&db, "audit")?,
            members: Table::open(&db, "members")?,
            announce: Default::default(),
            activity_count: Default::default(),
            outbox_count: Default::default(),
            outcome_count: Default::default(),
            fence,
            commit,
            db,
        };
        store.activity_count.store(store.activity.len()?, Ordering::Relaxed);
        store.outcome_count.store(store.outcomes.len()?, Ordering::Relaxed);
        store.outbox_count.store(store.outbox.len()?, Ordering::Relaxed);
        store.migrate(location)?;
        Ok(store)
    }

    /// Brings a store written by an older provider to [`SCHEMA_VERSION`], durably, before
    /// anything reads it; refuses one written by a newer provider.
    fn migrate(&self, location: &str) -> Result<()> {
        let found = match self.meta.get(SCHEMA)? {
            Some(v) => read_u64(&v),
            // No schema mark: a new store, or one from before schema versions (1).
            None if self.updates.is_empty()? && self.caps.is_empty()? && self.machines.is_empty()? => SCHEMA_VERSION,
            None => 1,
        };
        if found > SCHEMA_VERSION {
            return Err(ProviderError::Store(format!(
                "store {location} has schema {found}, newer than this provider's {SCHEMA_VERSION}: run a newer provider"
            )));
        }
        if found < 2 {
            // Caps were bare version strings.
            for kv in self.caps.iter()? {
                let (k, v) = kv?;
                let cap = ProductLineCap {
                    product_line: String::from_utf8_lossy(&k).into_owned(),
                    version: String::from_utf8_lossy(&v).into_owned(),
                    ..Default::default()
                };
                self.caps.put(k, &cap)?;
            }
        }
        if found < 3 {
            // Activity gained a per-machine index.
            for kv in self.activity.iter()? {
                let (k, v) = kv?;
                let a: Activity = decode(&v)?;
                self.activity_by_machine.insert(machine_activity_key(&a.machine, &k), [])?;
            }
        }
        if found < 4 {
            // Audit appends read the chain's last entry outside any transaction: two providers
            // of one database could both append the same sequence number.
            let last = self.audit.last()?.map(|(_, v)| decode::<AuditEntry>(&v)).transpose()?;
            self.meta.insert(AUDIT_SEQ, be(last.map(|e| e.seq).unwrap_or(0)))?;
        }
        if found < SCHEMA_VERSION {
            tracing::info!(store = %location, from = found, to = SCHEMA_VERSION, "migrated the store");
        }
        if found != SCHEMA_VERSION || self.meta.get(SCHEMA)?.is_none() {
            self.meta.insert(SCHEMA, be(SCHEMA_VERSION))?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// Holds nothing but its schema mark (a store just created).
    fn is_blank(&self) -> Result<bool> {
        for name in self.db.tree_names()? {
            let tree = self.db.open_tree(&name)?;
            let only_mark = name == "meta" && tree.len()? == 1 && tree.contains_key(SCHEMA)?;
            if !tree.is_empty()? && !only_mark {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn schema_version(&self) -> Result<u64> {
        Ok(self.meta.get(SCHEMA)?.map(|v| read_u64(&v)).unwrap_or(0))
    }

    /// From now on, refuse to acknowledge writes once `fence` says another provider took over.
    pub fn set_fence(&self, fence: Fence) {
        let _ = self.fence.set(fence);
    }

    /// Runs `f` as one transaction of the engine — unless another provider has taken the store
    /// over (the fence), checked before anything is written: a superseded provider's write
    /// must not even reach the engine's memory, from which an engine may write it out with a
    /// later transaction of its own (sled seals its log buffers so), flush or no flush.
    fn transaction<R>(&self, f: impl Fn(&Tx<'_>) -> Result<R>) -> Result<R> {
        if let Some(fence) = self.fence.get() {
            fence.check()?;
        }
        self.db.transaction(f)
    }

    /// Waits until every write made so far is on disk (the fence permitting), then announces
    /// the catalog changes among them.
    async fn flush(&self) -> Result<()> {
        self.commit.durable().await?;
        self.announce_new()
    }

    /// From now on, every catalog change is passed to `sink` once it is durable: after the
    /// write that made it, or any later one (the centre; a site passes on what its upstream
    /// sends itself). Changes made before this call are not announced.
    pub fn announce_to(&self, sink: impl Fn(Change) + Send + Sync + 'static) -> Result<()> {
        let announced = std::sync::Mutex::new(self.catalog_seq()?);
        self.announce
            .set(Announce { sink: Box::new(sink), announced })
            .map_err(|_| ProviderError::Store("the store's changes are already announced".into()))
    }

    /// Whether other providers may write this store at the same time (a database server).
    pub fn is_shared(&self) -> bool {
        self.db.shared()
    }

    /// The database, for duties held through it (see `duty`).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The last catalog sequence number announced, when changes are announced: what this
    /// process knows of the catalog without asking the database.
    pub fn announced_seq(&self) -> Option<u64> {
        self.announce.get().and_then(|a| a.announced.lock().ok().map(|n| *n))
    }

    /// Announces the durable changes not announced yet, oldest first: after every commit of
    /// this process, and, on a shared database, regularly for the commits of others.
    pub fn announce_new(&self) -> Result<()> {
        let Some(a) = self.announce.get() else { return Ok(()) };
        let mut announced = a.announced.lock().map_err(|_| ProviderError::Store("announce lock poisoned".into()))?;
        let changes = self.changes_after(*announced)?;
        // The whole batch counts as announced before the first of it is passed on: a push for
        // one change (a rollout's wave) must not wake a machine whose check then reads the
        // catalog without the next one (its approval, written in the same transaction).
        *announced = changes.iter().map(Change::seq).fold(*announced, u64::max);
        for change in changes {
            (a.sink)(change);
        }
        Ok(())
    }

    /// Makes everything written so far durable: for callers that acknowledge a batch of
    /// writes that do not wait on their own (forwarded machine records).
    pub async fn sync(&self) -> Result<()> {
        self.flush().await
    }

    /// Bytes the store takes where it is kept.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    pub fn catalog_seq(&self) -> Result<u64> {
        Ok(self.meta.get(CATALOG_SEQ)?.map(|v| read_u64(&v)).unwrap_or(0))
    }

    pub fn get_update(&self, id: &str) -> Result<Update> {
        self.updates.get(id)?.ok_or_else(|| ProviderError::UnknownUpdate(id.to_string()))
    }

    pub fn list_updates(&self) -> Result<Vec<Update>> {
        self.updates.all()
    }

    /// Applies `change` to the update `id` (or inserts `fresh` when it does not exist yet),
    /// gives it the next catalog sequence number and logs the change, atomically. Returns the
    /// stored record.
    pub async fn change_update(
        &self,
        id: &str,
        fresh: Option<Update>,
        change: impl Fn(&mut Update) -> Result<()>,
    ) -> Result<Update> {
        let out = self.transaction(|tx| {
            let mut rec: Update = match (tx.get(&self.updates, id)?, &fresh) {
                (Some(v), _) => decode(&v)?,
                (None, Some(f)) => f.clone(),
                (None, None) => return Err(ProviderError::UnknownUpdate(id.to_string())),
            };
            change(&mut rec)?;
            rec.catalog_seq = log_change(tx, self, &update_key(id), None)?;
            tx.insert(&self.updates, id, rec.encode_to_vec())?;
            Ok(rec)
        })?;
        self.flush().await?;
        Ok(out)
    }

    /// Removes an update from the catalog; followers learn of it as a deletion.
    pub async fn delete_update(&self, id: &str) -> Result<u64> {
        let seq = self.transaction(|tx| {
            if tx.remove(&self.updates, id)?.is_none() {
                return Err(ProviderError::UnknownUpdate(id.to_string()));
            }
            log_change(tx, self, &update_key(id), None)
        })?;
        self.drop_outcomes(id)?;
        self.flush().await?;
        Ok(seq)
    }

    /// Sets (or, with an empty version, lifts) a product line's cap.
    pub async fn set_cap(&self, cap: &ProductLineCap) -> Result<u64> {
        self.apply_cap(cap, None).await
    }

    async fn apply_cap(&self, cap: &ProductLineCap, seq: Option<u64>) -> Result<u64> {
        let seq = self.transaction(|tx| {
            if cap.version.is_empty() && cap.follow_role.is_empty() {
                tx.remove(&self.caps, &cap.product_line)?;
            } else {
                tx.insert(&self.caps, &cap.product_line, cap.encode_to_vec())?;
            }
            log_change(tx, self, &cap_key(&cap.product_line), seq)
        })?;
        self.flush().await?;
        Ok(seq)
    }

    pub fn list_caps(&self) -> Result<Vec<ProductLineCap>> {
        self.caps.all()
    }

    pub fn get_cap(&self, line: &str) -> Result<Option<ProductLineCap>> {
        self.caps.get(line.as_bytes())
    }

    /// Stores a change exactly as an upstream sent it (a site replica keeps the upstream's
    /// sequence numbers, so every tier speaks of the same catalog version).
    pub async fn apply_replicated(&self, change: &Change) -> Result<()> {
        match change {
            Change::Upsert(rec) => {
                self.transaction(|tx| {
                    log_change(tx, self, &update_key(&rec.id), Some(rec.catalog_seq))?;
                    tx.insert(&self.updates, &rec.id, rec.encode_to_vec())?;
                    Ok::<_, ProviderError>(())
                })?;
            }
            Change::Deleted { id, seq } => {
                self.transaction(|tx| {
                    tx.remove(&self.updates, id)?;
                    log_change(tx, self, &update_key(id), Some(*seq))?;
                    Ok::<_, ProviderError>(())
                })?;
            }
            Change::Cap { cap, seq } => {
                self.apply_cap(cap, Some(*seq)).await?;
            }
            Change::Group { group, seq } => {
                self.put_policy(Policy::Group, &group.name, Some(group.encode_to_vec()), Some(*seq)).await?;
            }
            Change::GroupDeleted { name, seq } => {
                self.put_policy(Policy::Group, name, None, Some(*seq)).await?;
            }
            Change::Assign { assignment, seq } => {
                let value = (!assignment.group.is_empty()).then(|| assignment.group.as_bytes().to_vec());
                self.put_policy(Policy::Assignment, &assignment.machine, value, Some(*seq)).await?;
            }
            Change::Pins { pins, seq } => {
                let value = (!pins.pins.is_empty()).then(|| pins.encode_to_vec());
                self.put_policy(Policy::Pins, &pins.machine, value, Some(*seq)).await?;
            }
            Change::Peer { peer, seq } => {
                self.put_policy(Policy::Peer, &peer.name, Some(peer.encode_to_vec()), Some(*seq)).await?;
            }
            Change::PeerRemoved { name, seq } => {
                self.put_policy(Policy::Peer, name, None, Some(*seq)).await?;
            }
            Change::Discovery { discovery, seq } => {
                self.put_policy(Policy::Setting, DISCOVERY, Some(discovery.encode_to_vec()), Some(*seq)).await?;
            }
            Change::Deployed { deployment, seq } => {
                let name = deployment_name(deployment);
                self.put_policy(Policy::Deployment, &name, Some(deployment.encode_to_vec()), Some(*seq)).await?;
            }
            Change::Undeployed { deployment, seq } => {
                self.put_policy(Policy::Deployment, &deployment_name(deployment), None, Some(*seq)).await?;
            }
            Change::Role { role, seq } => {
                let value = (!role.role.is_empty()).then(|| role.role.as_bytes().to_vec());
                self.put_policy(Policy::Role, &role.machine, value, Some(*seq)).await?;
            }
            Change::Trust { trust, seq } => {
                self.put_policy(Policy::Trust, TRUST, Some(trust.encode_to_vec()), Some(*seq)).await?;
            }
            Change::Rollout { rollout, seq } => {
                let value = Some(rollout.encode_to_vec());
                self.put_policy(Policy::Rollout, &rollout.update_id, value, Some(*seq)).await?;
            }
            Change::Statement { statement, .. } => return self.put_statement(statement).await,
        }
        self.flush().await
    }

    /// Catalog changes after `after_seq`, oldest first (the latest change of each thing once).
    pub fn changes_after(&self, after_seq: u64) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        for kv in self.log.from(be(after_seq + 1), false)? {
            let (seq, key) = kv?;
            let seq = read_u64(&seq);
            let (kind, name) = key.split_at(1);
            let name = String::from_utf8_lossy(name).into_owned();
            out.push(match kind {
                b"u" => match self.updates.get(&name)? {
                    Some(u) => Change::Upsert(Box::new(u)),
                    None => Change::Deleted { id: name, seq },
                },
                b"g" => match self.get_group(&name)? {
                    Some(group) => Change::Group { group, seq },
                    None => Change::GroupDeleted { name, seq },
                },
                b"a" => Change::Assign {
                    assignment: Assignment {
                        group: self
                            .assignments
                            .get(name.as_bytes())?
                            .map(|v| String::from_utf8_lossy(&v).into_owned())
                            .unwrap_or_default(),
                        machine: name,
                    },
                    seq,
                },
                b"p" => Change::Pins { pins: self.pins_of(&name)?, seq },
                b"r" => match self.get_peer(&name)? {
                    Some(peer) => Change::Peer { peer, seq },
                    None => Change::PeerRemoved { name, seq },
                },
                b"s" => Change::Discovery { discovery: self.discovery()?, seq },
                b"t" => Change::Trust { trust: self.trust()?.unwrap_or_default(), seq },
                b"w" => match self.get_rollout(&name)? {
                    Some(rollout) => Change::Rollout { rollout, seq },
                    None => continue,
                },
                b"d" => {
                    let Some(deployment) = deployment_of_name(&name) else { continue };
                    if self.deployments.contains_key(name.as_bytes())? {
                        Change::Deployed { deployment, seq }
                    } else {
                        Change::Undeployed { deployment, seq }
                    }
                }
                b"o" => Change::Role {
                    role: MachineRole { role: self.role_of(&name)?.unwrap_or_default(), machine: name },
                    seq,
                },
                _ => Change::Cap {
                    cap: self
                        .get_cap(&name)?
                        .unwrap_or_else(|| ProductLineCap { product_line: name, ..Default::default() }),
                    seq,
                },
            });
        }
        Ok(out)
    }

    fn policy_tree(&self, p: Policy) -> &Tree {
        match p {
            Policy::Group => &self.groups,
            Policy::Assignment => &self.assignments,
            Policy::Pins => &self.pins,
            Policy::Peer => &self.peers,
            Policy::Setting => &self.settings,
            Policy::Deployment => &self.deployments,
            Policy::Role => &self.roles,
            Policy::Trust => &self.trust,
            Policy::Rollout => &self.rollouts,
        }
    }

    /// Writes (or, with `None`, removes) a policy record and logs the change.
    async fn put_policy(&self, p: Policy, name: &str, value: Option<Vec<u8>>, seq: Option<u64>) -> Result<u64> {
        let key = [p.kind(), name.as_bytes()].concat();
        let tree = self.policy_tree(p);
        let seq = self.transaction(|tx| {
            match &value {
                Some(v) => tx.insert(tree, name, v)?,
                None => tx.remove(tree, name)?,
            };
            log_change(tx, self, &key, seq)
        })?;
        self.flush().await?;
        Ok(seq)
    }

    pub async fn put_group(&self, g: &Group) -> Result<u64> {
        self.put_policy(Policy::Group, &g.name, Some(g.encode_to_vec()), None).await
    }

    pub async fn delete_group(&self, name: &str) -> Result<u64> {
        self.put_policy(Policy::Group, name, None, None).await
    }

    pub fn get_group(&self, name: &str) -> Result<Option<Group>> {
        self.groups.get(name.as_bytes())
    }

    pub fn list_groups(&self) -> Result<Vec<Group>> {
        self.groups.all()
    }

    /// Moves a machine to a group (the default group when `group` is empty).
    pub async fn assign(&self, a: &Assignment) -> Result<u64> {
        let value = (!a.group.is_empty() && a.group != DEFAULT_GROUP).then(|| a.group.as_bytes().to_vec());
        self.put_policy(Policy::Assignment, &a.machine, value, None).await
    }

    /// The group a machine is in.
    pub fn group_of(&self, machine: &str) -> Result<String> {
        Ok(self
            .assignments
            .get(machine.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_else(|| DEFAULT_GROUP.to_string()))
    }

    pub async fn set_pins(&self, p: &MachinePins) -> Result<u64> {
        let value = (!p.pins.is_empty()).then(|| p.encode_to_vec());
        self.put_policy(Policy::Pins, &p.machine, value, None).await
    }

    pub fn pins_of(&self, machine: &str) -> Result<MachinePins> {
        Ok(self
            .pins
            .get(machine)?
            .unwrap_or_else(|| MachinePins { machine: machine.to_string(), ..Default::default() }))
    }

    /// Deploys (or, with `remove`, undeploys) a product to a group or machine.
    pub async fn deploy(&self, d: &Deployment, remove: bool) -> Result<u64> {
        let value = (!remove).then(|| d.encode_to_vec());
        self.put_policy(Policy::Deployment, &deployment_name(d), value, None).await
    }

    pub fn list_deployments(&self) -> Result<Vec<Deployment>> {
        self.deployments.all()
    }

    /// Sets (or, with an empty role, clears) an administrator's choice of a machine's role.
    pub async fn set_role(&self, r: &MachineRole) -> Result<u64> {
        let value = (!r.role.is_empty()).then(|| r.role.as_bytes().to_vec());
        self.put_policy(Policy::Role, &r.machine, value, None).await
    }

    pub fn role_of(&self, machine: &str) -> Result<Option<String>> {
        Ok(self.roles.get(machine.as_bytes())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub async fn put_peer(&self, p: &Peer) -> Result<u64> {
        self.put_policy(Policy::Peer, &p.name, Some(p.encode_to_vec()), None).await
    }

    pub async fn remove_peer(&self, name: &str) -> Result<u64> {
        self.put_policy(Policy::Peer, name, None, None).await
    }

    pub fn get_peer(&self, name: &str) -> Result<Option<Peer>> {
        self.peers.get(name.as_bytes())
    }

    pub fn list_peers(&self) -> Result<Vec<Peer>> {
        self.peers.all()
    }

    /// Keeps the latest signed catalog statement (a site's copy of the centre's).
    pub async fn put_statement(&self, s: &SignedStatement) -> Result<()> {
        self.meta.insert(STATEMENT, s.encode_to_vec())?;
        self.flush().await
    }

    pub fn statement(&self) -> Result<Option<SignedStatement>> {
        self.meta.get(STATEMENT)?.map(|v| decode(&v)).transpose()
    }

    pub async fn set_discovery(&self, d: &Discovery) -> Result<u64> {
        self.put_policy(Policy::Setting, DISCOVERY, Some(d.encode_to_vec()), None).await
    }

    /// Whether providers announce themselves (off until an admin turns it on).
    pub fn discovery(&self) -> Result<Discovery> {
        Ok(self.settings.get(DISCOVERY.as_bytes())?.unwrap_or_default())
    }

    pub async fn put_user(&self, u: &User) -> Result<()> {
        self.users.put(u.name.as_bytes(), u)?;
        self.flush().await
    }

    pub async fn remove_user(&self, name: &str) -> Result<bool> {
        let removed = self.users.remove(name.as_bytes())?.is_some();
        self.passwords.remove(name.as_bytes())?;
        self.flush().await?;
        Ok(removed)
    }

    pub fn get_user(&self, name: &str) -> Result<Option<User>> {
        self.users.get(name.as_bytes())
    }

    pub fn list_users(&self) -> Result<Vec<User>> {
        self.users.all()
    }

    /// Sets (`Some`) or clears a user's password hash; durable before it returns.
    pub async fn set_password(&self, name: &str, phc: Option<&str>) -> Result<()> {
        match phc {
            Some(phc) => {
                let p = Password { name: name.to_string(), phc: phc.to_string(), set_unix_ms: crate::now_ms() };
                self.passwords.put(name.as_bytes(), &p)?;
            }
            None => {
                self.passwords.remove(name.as_bytes())?;
            }
        }
        self.flush().await
    }

    pub fn password_of(&self, name: &str) -> Result<Option<Password>> {
        self.passwords.get(name.as_bytes())
    }

    /// Appends to the audit log, chaining the entry to the last one (seq and hashes are
    /// filled in here). Durable before it returns.
    /// Appends `e` to the audit chain: its sequence number follows the chain's last and its
    /// hash covers the last one's, in one transaction (providers of one database append to
    /// one chain).
    pub async fn append_audit(&self, e: AuditEntry) -> Result<AuditEntry> {
        let (audit, meta) = (&self.audit, &self.meta);
        let e = self.transaction(|tx| {
            let mut e = e.clone();
            let last_seq = tx.get(meta, AUDIT_SEQ)?.map(|v| read_u64(&v)).unwrap_or(0);
            let last: Option<AuditEntry> = tx.get(audit, be(last_seq))?.map(|v| decode(&v)).transpose()?;
            e.seq = last_seq + 1;
            e.prev_hash = last.map(|l| l.hash).unwrap_or_default();
            e.hash = updraft_core::audit::chain_hash(&audit_fields(&e));
            tx.insert(audit, be(e.seq), e.encode_to_vec())?;
            tx.insert(meta, AUDIT_SEQ, be(e.seq))?;
            Ok::<_, ProviderError>(e)
        })?;
        self.flush().await?;
        Ok(e)
    }

    /// Audit entries after `after_seq`, oldest first, at most `limit` (0: all).
    /// Audit entries after `after_seq`, at most `limit` (and never more than
    /// [`MAX_AUDIT_PAGE`], so an answer always fits in a message: callers page).
    pub fn list_audit(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let limit = if limit == 0 { MAX_AUDIT_PAGE } else { limit.min(MAX_AUDIT_PAGE) };
        self.audit.from(be(after_seq + 1), false)?.take(limit).map(|kv| decode(&kv?.1)).collect()
    }

    pub async fn add_watch(&self, folder: &WatchFolder) -> Result<()> {
        self.watches.put(folder.path.as_bytes(), folder)?;
        self.flush().await
    }

    pub async fn remove_watch(&self, path: &str) -> Result<bool> {
        let removed = self.watches.remove(path.as_bytes())?.is_some();
        self.flush().await?;
        Ok(removed)
    }

    /// Records a provider of this database as alive; not waited on (said again within seconds).
    pub fn put_member(&self, m: &PairMember) -> Result<()> {
        self.members.put(&m.name, m)?;
        self.commit.soon();
        Ok(())
    }

    pub fn list_members(&self) -> Result<Vec<PairMember>> {
        self.members.all()
    }

    pub fn list_watches(&self) -> Result<Vec<WatchFolder>> {
        self.watches.all()
    }

    /// Records a machine's contact (see [`crate::contacts`]): it is written with the next commit
    /// (within `commit::FLUSH_EVERY`). Returns whether the machine is new here, so that callers
    /// can make its first record durable at once ([`Store::sync`]: a check does; a forwarded
    /// batch syncs once for all) — new machines arriving together share one transaction.
    pub async fn record_machine(
        &self,
        info: &MachineInfo,
        via: &str,
        at_ms: i64,
        remote_provider: bool,
    ) -> Result<bool> {
        let contact = Contact { info: info.clone(), via: via.to_string(), at_ms, remote_provider };
        let new = self.contacts.record(&info.name, contact)?;
        self.commit.soon();
        Ok(new)
    }

    /// Keeps a site's last reported counters on its machine record.
    pub async fn set_site_stats(&self, site: &str, stats: SiteStats) -> Result<()> {
        let machines = &self.machines;
        self.transaction(|tx| {
            let Some(v) = tx.get(machines, site)? else { return Ok(()) };
            let mut m: Machine = decode(&v)?;
            m.site_stats = Some(stats.clone());
            tx.insert(machines, site, m.encode_to_vec())?;
            Ok::<_, ProviderError>(())
        })?;
        self.flush().await
    }

    pub fn get_machine(&self, name: &str) -> Result<Option<Machine>> {
        let mut m: Option<Machine> = self.machines.get(name.as_bytes())?;
        if let Some(m) = &mut m {
            self.contacts.overlay(name, m);
        }
        Ok(m)
    }

    /// Deletes a machine's record (`machine forget`; its policy goes through the logged
    /// writes). Whether there was one.
    pub async fn remove_machine(&self, name: &str) -> Result<bool> {
        let had = self.machines.remove(name.as_bytes())?.is_some();
        self.contacts.forget(name);
        self.flush().await?;
        Ok(had)
    }

    /// Replaces a machine's record whole (store merges).
    pub async fn put_machine(&self, m: &Machine) -> Result<()> {
        let name = m.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        self.machines.put(name.as_bytes(), m)?;
        self.flush().await
    }

    /// Every machine moved out of the default group, with its group.
    pub fn list_assignments(&self) -> Result<Vec<Assignment>> {
        self.assignments
            .iter()?
            .map(|kv| {
                let (k, v) = kv?;
                Ok(Assignment {
                    machine: String::from_utf8_lossy(&k).into_owned(),
                    group: String::from_utf8_lossy(&v).into_owned(),
                })
            })
            .collect()
    }

    /// Every administrator's choice of a machine's role.
    pub fn list_roles(&self) -> Result<Vec<MachineRole>> {
        self.roles
            .iter()?
            .map(|kv| {
                let (k, v) = kv?;
                Ok(MachineRole {
                    machine: String::from_utf8_lossy(&k).into_owned(),
                    role: String::from_utf8_lossy(&v).into_owned(),
                })
            })
            .collect()
    }

    pub fn list_pins(&self) -> Result<Vec<MachinePins>> {
        self.pins.all()
    }

    /// Copies this whole store (every tree, as it is now) into a new, empty store at `dir`.
    pub async fn copy_to(&self, dir: &Path) -> Result<Store> {
        let dest = Store::open(dir)?;
        self.copy_into(&dest, &dir.display().to_string()).await?;
        Ok(dest)
    }

    /// Copies this whole store (every tree, as it is now: catalog and its log, machines,
    /// users, the audit chain, groups, pins, deployments…) into `dest`, a new, empty store of
    /// any engine (`location` names it in errors).
    pub async fn copy_into(&self, dest: &Store, location: &str) -> Result<()> {
        self.flush().await?;
        if !dest.is_blank()? {
            return Err(ProviderError::InvalidArgument(format!("{location} already holds a store")));
        }
        // The copy brings its own schema mark.
        dest.meta.remove(SCHEMA)?;
        self.db.copy_into(&dest.db)?;
        dest.flush().await
    }

    pub fn list_machines(&self) -> Result<Vec<Machine>> {
        let mut all: Vec<Machine> = self.machines.all()?;
        for m in &mut all {
            let name = m.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
            self.contacts.overlay(&name, m);
        }
        Ok(all)
    }

    /// What every machine with an agent last said about itself (remote providers left out).
    pub fn list_agents(&self) -> Result<Vec<MachineInfo>> {
        Ok(self.list_machines()?.into_iter().filter(|m| !m.is_remote_provider).filter_map(|m| m.info).collect())
    }

    /// Appends activity entries; the oldest are dropped past [`MAX_ACTIVITY`].
    pub async fn append_activity(&self, entries: &[Activity]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        // Times come from the reporting machine; none may lie in the future, where it would
        // outlive (and, at the limit, evict) every real entry.
        let now = crate::now_ms();
        for a in entries {
            let mut a = a.clone();
            a.at_unix_ms = a.at_unix_ms.clamp(0, now);
            let id = self.db.generate_id()?;
            let mut key = be(a.at_unix_ms as u64).to_vec();
            key.extend_from_slice(&be(id));
            self.activity_by_machine.insert(machine_activity_key(&a.machine, &key), [])?;
            self.note_outcome(&a)?;
            if self.activity.put(key, &a)? {
                self.activity_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Each machine's own oldest entries go first, then the oldest of all.
        let machines: std::collections::BTreeSet<&str> = entries.iter().map(|a| a.machine.as_str()).collect();
        for m in machines {
            let prefix = machine_activity_key(m, &[]);
            let held = self.activity_by_machine.scan_prefix(&prefix)?.count();
            for kv in self.activity_by_machine.scan_prefix(&prefix)?.take(held.saturating_sub(MAX_ACTIVITY_PER_MACHINE))
            {
                let (k, _) = kv?;
                self.activity_by_machine.remove(&k)?;
                if self.activity.remove(&k[prefix.len()..])?.is_some() {
                    self.activity_count.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        while self.activity_count.load(Ordering::Relaxed) > MAX_ACTIVITY {
            match self.activity.pop_min()? {
                Some((k, v)) => {
                    if let Ok(a) = decode::<Activity>(&v) {
                        self.activity_by_machine.remove(machine_activity_key(&a.machine, &k))?;
                    }
                    self.activity_count.fetch_sub(1, Ordering::Relaxed)
                }
                None => break,
            };
        }
        self.flush().await
    }

    /// Newest first; only entries at or after `since_ms`.
    pub fn list_activity(&self, machine: &str, update_id: &str, since_ms: i64, limit: usize) -> Result<Vec<Activity>> {
        let mut out = Vec::new();
        for kv in self.activity.from(be(since_ms.max(0) as u64), true)? {
            let a: Activity = decode(&kv?.1)?;
            if (machine.is_empty() || a.machine == machine) && (update_id.is_empty() || a.update_id == update_id) {
                out.push(a);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Removes activity entries (of one machine, or all). Returns how many.
    pub async fn clear_activity(&self, machine: &str) -> Result<u32> {
        let mut n = 0;
        for kv in self.activity.iter()? {
            let (k, v) = kv?;
            let a: Activity = decode(&v)?;
            if (machine.is_empty() || a.machine == machine) && self.activity.remove(&k)?.is_some() {
                self.activity_by_machine.remove(machine_activity_key(&a.machine, &k))?;
                self.activity_count.fetch_sub(1, Ordering::Relaxed);
                n += 1;
            }
        }
        self.flush().await?;
        Ok(n)
    }

    /// Queues a report for the upstream (site providers). Durable before it returns.
    pub async fn outbox_push(&self, report: &ForwardedReport) -> Result<()> {
        if self.outbox_count.load(Ordering::Relaxed) >= MAX_OUTBOX && self.outbox.pop_min()?.is_some() {
            // Dropped the oldest: the newest inventory matters more than stale ones.
            self.outbox_count.fetch_sub(1, Ordering::Relaxed);
        }
        let id = self.db.generate_id()?;
        if self.outbox.put(be(id), report)? {
            self.outbox_count.fetch_add(1, Ordering::Relaxed);
        }
        self.flush().await
    }

    /// The oldest queued reports with their keys, as many as fit in `max` reports, `max_bytes`
    /// encoded and `max_entries` (a report and each of its activities count one each); always
    /// at least one, so the outbox drains whatever its first report is.
    pub fn outbox_peek(
        &self,
        max: usize,
        max_bytes: usize,
        max_entries: usize,
    ) -> Result<Vec<(Vec<u8>, ForwardedReport)>> {
        let (mut out, mut bytes, mut entries) = (Vec::new(), 0, 0);
        for kv in self.outbox.iter()? {
            let (k, v) = kv?;
            let r: ForwardedReport = decode(&v)?;
            let n = r.activities.len() + 1;
            if !out.is_empty() && (out.len() >= max || bytes + v.len() > max_bytes || entries + n > max_entries) {
                break;
            }
            bytes += v.len();
            entries += n;
            out.push((k.to_vec(), r));
        }
        Ok(out)
    }

    pub async fn outbox_ack(&self, keys: &[Vec<u8>]) -> Result<()> {
        for k in keys {
            if self.outbox.remove(k)?.is_some() {
                self.outbox_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.flush().await
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox_count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_changes_are_announced_once_each_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_group(&Group { name: "before".into(), settings: None }).await.unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        s.announce_to(move |c| sink.lock().unwrap().push(c.seq())).unwrap();
        let writers: Vec<_> = (0..20)
            .map(|i| {
                let (s, seen) = (s.clone(), seen.clone());
                tokio::spawn(async move {
                    let seq = s.put_group(&Group { name: format!("g{i}"), settings: None }).await.unwrap();
                    assert!(seen.lock().unwrap().contains(&seq), "change {seq} acknowledged before it was announced");
                    seq
                })
            })
            .collect();
        let mut acknowledged: Vec<u64> =
            futures::future::join_all(writers).await.into_iter().map(Result::unwrap).collect();
        acknowledged.sort();
        // Every acknowledged change was announced by the time it was acknowledged, once, in
        // sequence order; the change made before `announce_to` was not.
        assert_eq!(*seen.lock().unwrap(), acknowledged);
        assert_eq!(acknowledged, (2..=21).collect::<Vec<_>>());
        // A write outside the catalog announces nothing.
        s.append_activity(&[Activity { machine: "pc".into(), ..Default::default() }]).await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 20);
        assert!(s.announce_to(|_| {}).is_err(), "one sink");
    }

    /// Rules every engine's store keeps, each run on a fresh store (`open` gives one by name).
    async fn rules(open: impl Fn(&str) -> Store) {
        one_machine_flooding_activity_evicts_only_its_own_entries(open("flood")).await;
        outbox_batches_are_bounded_and_always_hold_the_first_report(open("outbox")).await;
        deployments_and_roles_are_logged_and_replicate(open("deployments"), open("replica")).await;
        the_audit_chain_detects_an_edited_entry(open("audit")).await;
        rollouts_replicate_and_outcomes_follow_reports(open("rollouts"), open("rollout-replica")).await;
        a_rollout_start_approves_its_update_in_the_same_transaction(open("rollout-start")).await;
    }

    async fn a_rollout_start_approves_its_update_in_the_same_transaction(s: Store) {
        use updraft_core::model::UpdateState;
        use updraft_proto::v1::RolloutState;
        let r = |id: &str| Rollout {
            update_id: id.into(),
            waves: "100%".into(),
            state: RolloutState::Running as i32,
            ..Default::default()
        };
        // An update not known: an error, and no rollout written.
        let before = s.catalog_seq().unwrap();
        assert!(matches!(s.start_rollout(&r("nosuch")).await, Err(ProviderError::UnknownUpdate(_))));
        assert_eq!((s.catalog_seq().unwrap(), s.get_rollout("nosuch").unwrap()), (before, None));
        // Pre-approval: the rollout's change, then the approval's, one after the other.
        let u = Update { id: "u-3".into(), state: UpdateState::PreApproval.to_wire(), ..Default::default() };
        s.change_update("u-3", Some(u), |_| Ok(())).await.unwrap();
        let before = s.catalog_seq().unwrap();
        let seq = s.start_rollout(&r("u-3")).await.unwrap();
        assert_eq!(seq, before + 2);
        let changes = s.changes_after(before).unwrap();
        assert!(
            matches!(&changes[..], [Change::Rollout { rollout, seq: a }, Change::Upsert(u)]
            if *rollout == r("u-3") && *a == before + 1 && u.catalog_seq == seq && u.state == UpdateState::Ga.to_wire()),
            "{changes:?}"
        );
        // Already approved (a rollout started again): the rollout's change alone.
        let seq = s.start_rollout(&r("u-3")).await.unwrap();
        assert!(matches!(&s.changes_after(seq - 1).unwrap()[..], [Change::Rollout { seq: a, .. }] if *a == seq));
    }

    async fn rollouts_replicate_and_outcomes_follow_reports(s: Store, replica: Store) {
        use updraft_core::rollout::Outcome;
        use updraft_proto::v1::{ActivityKind, RolloutState};
        let u = Update { id: "u-2".into(), ..Default::default() };
        s.change_update("u-2", Some(u), |_| Ok(())).await.unwrap();
        let mut r = Rollout { update_id: "u-2".into(), waves: "10%,100%".into(), ..Default::default() };
        r.state = RolloutState::Running as i32;
        s.put_rollout(&r).await.unwrap();
        r.open = 1;
        let seq = s.put_rollout(&r).await.unwrap();
        // The latest state of the rollout once in the log, and a replica holds the same.
        let changes = s.changes_after(0).unwrap();
        assert!(changes.contains(&Change::Rollout { rollout: r.clone(), seq }), "{changes:?}");
        for c in &changes {
            replica.apply_replicated(c).await.unwrap();
        }
        assert_eq!(replica.list_rollouts().unwrap(), vec![r.clone()]);
        // Each machine's last outcome with the update, from its activity as it is stored; an
        // entry that is no outcome (a deferred install) changes nothing.
        let act = |m: &str, kind: ActivityKind| Activity {
            machine: m.into(),
            update_id: "u-2".into(),
            kind: kind as i32,
            ..Default::default()
        };
        s.append_activity(&[act("pc-1", ActivityKind::Installed), act("pc-2", ActivityKind::InstallFailed)])
            .await
            .unwrap();
        s.append_activity(&[act("pc-1", ActivityKind::Verified), act("pc-2", ActivityKind::Deferred)]).await.unwrap();
        let mut got: Vec<(String, Outcome)> =
            s.outcomes_of("u-2").unwrap().into_iter().map(|(m, o, _)| (m, o)).collect();
        got.sort();
        assert_eq!(got, [("pc-1".to_string(), Outcome::Verified), ("pc-2".to_string(), Outcome::Failed)]);
        assert!(s.outcomes_of("u-20").unwrap().is_empty(), "an update id that only starts alike");
        // Forgotten with the update.
        s.delete_update("u-2").await.unwrap();
        assert!(s.outcomes_of("u-2").unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_rules_hold_on_sled() {
        let dir = tempfile::tempdir().unwrap();
        rules(|name| Store::open(&dir.path().join(name)).unwrap()).await;
    }

    #[tokio::test]
    async fn the_rules_hold_on_postgres() {
        let cluster = updraft_pgtest::Cluster::start();
        rules(|name| Store::on(Db::open_postgres(&cluster.database(name)).unwrap(), name).unwrap()).await;
    }

    /// Two providers of one database append to one audit chain at once: every entry lands,
    /// each sequence number once, and the chain verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn providers_of_one_database_append_one_audit_chain() {
        let cluster = updraft_pgtest::Cluster::start();
        let url = cluster.database("audit");
        let stores = [0, 1].map(|_| Store::on(Db::open_postgres(&url).unwrap(), "audit").unwrap());
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let s = stores[i % 2].clone();
                let e = AuditEntry { who: format!("admin-{i}"), action: "Put".into(), ..Default::default() };
                tokio::spawn(async move { s.append_audit(e).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let chain = stores[0].list_audit(0, 0).unwrap();
        assert_eq!(chain.len(), 40, "every append landed once");
        let verified = updraft_core::audit::verify(chain.iter().map(|e| (audit_fields(e), e.hash.as_str())));
        assert_eq!(verified, Ok(40));
    }

    /// A store of schema 3 kept no audit sequence number: the chain goes on from its last entry.
    #[tokio::test]
    async fn an_audit_chain_from_schema_3_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = Store::open(dir.path()).unwrap();
            let first = s.append_audit(AuditEntry { who: "a".into(), ..Default::default() }).await.unwrap();
            s.meta.remove(AUDIT_SEQ).unwrap();
            s.meta.insert(SCHEMA, be(3)).unwrap();
            s.db.flush().unwrap();
            first
        };
        let s = reopen(dir.path()).await;
        let next = s.append_audit(AuditEntry { who: "b".into(), ..Default::default() }).await.unwrap();
        assert_eq!((next.seq, next.prev_hash), (2, first.hash));
    }

    async fn one_machine_flooding_activity_evicts_only_its_own_entries(s: Store) {
        let entry = |machine: &str, at: i64| Activity { machine: machine.into(), at_unix_ms: at, ..Default::default() };
        s.append_activity(&[entry("admin", 1), entry("quiet", 2)]).await.unwrap();
        let flood: Vec<Activity> = (0..MAX_ACTIVITY_PER_MACHINE as i64 + 500).map(|i| entry("loud", 10 + i)).collect();
        for chunk in flood.chunks(300) {
            s.append_activity(chunk).await.unwrap();
        }
        assert_eq!(s.list_activity("admin", "", 0, 10).unwrap().len(), 1, "the oldest entry of all stays");
        assert_eq!(s.list_activity("quiet", "", 0, 10).unwrap().len(), 1);
        let loud = s.list_activity("loud", "", 0, usize::MAX).unwrap();
        assert_eq!(loud.len(), MAX_ACTIVITY_PER_MACHINE, "the flood keeps only its newest");
        assert_eq!(loud.last().unwrap().at_unix_ms, 510, "its oldest went first");
        assert_eq!(s.clear_activity("loud").await.unwrap() as usize, MAX_ACTIVITY_PER_MACHINE);
        assert_eq!(s.activity_by_machine.len().unwrap(), 2, "the index follows the entries");
    }

    async fn outbox_batches_are_bounded_and_always_hold_the_first_report(s: Store) {
        let report = |name: &str, entries: usize| ForwardedReport {
            machine: Some(MachineInfo { name: name.into(), ..Default::default() }),
            activities: vec![Activity { detail: "x".repeat(100), ..Default::default() }; entries],
            ..Default::default()
        };
        s.outbox_push(&report("big", 50)).await.unwrap();
        for i in 0..10 {
            s.outbox_push(&report(&format!("m{i}"), 0)).await.unwrap();
        }
        // The first report alone is over every bound: it still goes, alone.
        let batch = s.outbox_peek(100, 1000, 10).unwrap();
        assert_eq!(batch.len(), 1);
        let name = |b: &[(Vec<u8>, ForwardedReport)], i: usize| b[i].1.machine.as_ref().unwrap().name.clone();
        assert_eq!(name(&batch, 0), "big");
        s.outbox_ack(&[batch[0].0.clone()]).await.unwrap();
        // Then by count, by entries, by bytes.
        assert_eq!(s.outbox_peek(3, 1 << 20, 1000).unwrap().len(), 3);
        assert_eq!(s.outbox_peek(100, 1 << 20, 4).unwrap().len(), 4);
        let one = report("m0", 0).encoded_len();
        assert_eq!(s.outbox_peek(100, 2 * one + 1, 1000).unwrap().len(), 2);
        assert_eq!(s.outbox_peek(100, 1 << 20, 1000).unwrap().len(), 10);
    }

    #[tokio::test]
    async fn catalog_changes_are_sequenced_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let fresh = Update { id: "a".into(), ..Default::default() };
            s.change_update("a", Some(fresh.clone()), |_| Ok(())).await.unwrap();
            s.change_update("b", Some(Update { id: "b".into(), ..Default::default() }), |_| Ok(())).await.unwrap();
            s.change_update("a", None, |u| {
                u.high_priority = true;
                Ok(())
            })
            .await
            .unwrap();
            assert!(matches!(s.change_update("zz", None, |_| Ok(())).await, Err(ProviderError::UnknownUpdate(_))));
            let second = Store::open(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(second.contains("in use"), "{second}");
        }
        // sled drops its file lock from a background thread a moment after the last handle
        // goes, so a reopen within the same process may have to wait briefly.
        let mut reopened = Store::open(dir.path());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            reopened = Store::open(dir.path());
        }
        let s = reopened.unwrap_or_else(|e| panic!("reopen: {e}"));
        assert_eq!(s.catalog_seq().unwrap(), 3);
        let ids: Vec<_> = s
            .changes_after(0)
            .unwrap()
            .into_iter()
            .map(|c| match c {
                Change::Upsert(u) => (u.id.clone(), u.catalog_seq),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![("b".to_string(), 2), ("a".to_string(), 3)]);
        assert_eq!(s.changes_after(2).unwrap().len(), 1);
        // Deletions and caps are changes too, with their own sequence numbers.
        assert_eq!(s.delete_update("b").await.unwrap(), 4);
        let cap = ProductLineCap { product_line: "suite".into(), version: "2.0.0.0".into(), ..Default::default() };
        assert_eq!(s.set_cap(&cap).await.unwrap(), 5);
        assert_eq!(
            s.changes_after(3).unwrap(),
            vec![Change::Deleted { id: "b".into(), seq: 4 }, Change::Cap { cap: cap.clone(), seq: 5 }]
        );
        assert_eq!(s.list_caps().unwrap(), vec![cap]);
        assert!(matches!(s.get_update("b"), Err(ProviderError::UnknownUpdate(_))));
    }

    /// Opens a store, retrying while sled's previous handle (same process) lets go of its lock.
    async fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            if let Ok(s) = Store::open(dir) {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Store::open(dir).unwrap_or_else(|e| panic!("reopen: {e}"))
    }

    #[tokio::test]
    async fn a_store_from_before_schema_versions_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What a provider before schema 2 wrote: caps as bare version strings, no mark.
            let db = Db::open_embedded(&dir.path().join("db")).unwrap();
            db.open_tree("caps").unwrap().insert("suite", "2.0.0.0").unwrap();
            db.open_tree("updates")
                .unwrap()
                .insert("x", Update { id: "x".into(), ..Default::default() }.encode_to_vec())
                .unwrap();
            db.flush().unwrap();
        }
        let s = reopen(dir.path()).await;
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(
            s.list_caps().unwrap(),
            vec![ProductLineCap { product_line: "suite".into(), version: "2.0.0.0".into(), ..Default::default() }]
        );
        assert_eq!(s.get_update("x").unwrap().id, "x", "records are kept");
        drop(s);
        // A store from a newer provider is refused, not misread.
        {
            let s = reopen(dir.path()).await;
            s.meta.insert(SCHEMA, be(SCHEMA_VERSION + 1)).unwrap();
            s.db.flush().unwrap();
        }
        let mut err = Store::open(dir.path()).err();
        for _ in 0..100 {
            if err.as_ref().is_some_and(|e| !e.to_string().contains("in use")) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            err = Store::open(dir.path()).err();
        }
        assert!(err.unwrap().to_string().contains("newer than this provider's"));
        // A fresh store starts at the current schema.
        let fresh = tempfile::tempdir().unwrap();
        assert_eq!(Store::open(fresh.path()).unwrap().schema_version().unwrap(), SCHEMA_VERSION);
    }

    async fn deployments_and_roles_are_logged_and_replicate(s: Store, replica: Store) {
        let to_lab = Deployment { product: "client".into(), group: "lab".into(), machine: String::new() };
        let to_pc = Deployment { product: "client".into(), group: String::new(), machine: "pc/1:odd".into() };
        s.deploy(&to_lab, false).await.unwrap();
        s.deploy(&to_pc, false).await.unwrap();
        s.set_role(&MachineRole { machine: "srv".into(), role: "server".into() }).await.unwrap();
        s.assign(&Assignment { machine: "other".into(), group: "lab".into() }).await.unwrap();
        let decided = crate::decided::Decided::read(&s).unwrap();
        assert_eq!(decided.deployed_to("pc/1:odd").into_iter().collect::<Vec<_>>(), ["client"]);
        assert_eq!(decided.deployed_to("other").len(), 1, "through its group");
        assert!(decided.deployed_to("third").is_empty());
        assert_eq!(decided.role_of("srv"), Some("server"));
        s.assign(&Assignment { machine: "other".into(), group: String::new() }).await.unwrap();
        let undeployed = s.deploy(&to_lab, true).await.unwrap();
        let changes = s.changes_after(0).unwrap();
        assert_eq!(changes.len(), 4, "two deployments, a role, an assignment: {changes:?}");
        assert!(changes.contains(&Change::Undeployed { deployment: to_lab.clone(), seq: undeployed }));
        // A replica fed the same changes answers the same.
        for c in &changes {
            replica.apply_replicated(c).await.unwrap();
        }
        assert_eq!(replica.list_deployments().unwrap(), vec![to_pc]);
        assert_eq!(replica.role_of("srv").unwrap().as_deref(), Some("server"));
        assert_eq!(replica.catalog_seq().unwrap(), s.catalog_seq().unwrap());
    }

    async fn the_audit_chain_detects_an_edited_entry(s: Store) {
        for (who, outcome) in [("ops", "ok"), ("pc-1", "refused: agent certificate"), ("ops", "ok")] {
            let e = AuditEntry { who: who.into(), outcome: outcome.into(), action: "a".into(), ..Default::default() };
            s.append_audit(e).await.unwrap();
        }
        let verify = |entries: &[AuditEntry]| {
            updraft_core::audit::verify(entries.iter().map(|e| (audit_fields(e), e.hash.as_str()))).map_err(|e| e.0)
        };
        let all = s.list_audit(0, 0).unwrap();
        assert_eq!(verify(&all), Ok(3));
        // Someone with the store edits the refusal away.
        let mut edited = all[1].clone();
        edited.outcome = "ok".into();
        s.audit.insert(be(2), edited.encode_to_vec()).unwrap();
        assert_eq!(verify(&s.list_audit(0, 0).unwrap()), Err(2));
    }
}
