//! Switchover pairs: providers started on one store, of which the one holding the store's lock
//! is active and the others are standbys that forward to it. Owns the `pair/` directory beside
//! the sled store: the fencing epoch, who is active, and each member's heartbeat.
//!
//! The sled lock decides who is active. The epoch is the second line of defence, for shared
//! file systems whose locks can be lost: every takeover raises it, and the store refuses to
//! flush (acknowledge) anything once the epoch on disk is no longer the one its holder took
//! over with, so a former active that comes back cannot commit.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use updraft_proto::v1::{PairMember, PairReply};

use crate::error::{ProviderError, Result};
use crate::now_ms;

/// How often every member writes its heartbeat (and the active checks its fence).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A member not heard from for this long is shown as gone.
pub const STALE: Duration = Duration::from_secs(5);
/// How often a standby tries to take the store.
pub const TAKEOVER_POLL: Duration = Duration::from_millis(250);

const EPOCH: &str = "epoch";
const ACTIVE: &str = "active.json";
const CONSOLE: &str = "console.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Standby,
}

/// What a member says about itself in its heartbeat file (and the active in `active.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub url: String,
    pub role: Role,
    pub epoch: u64,
    pub pid: u32,
    pub seen_ms: i64,
    pub since_ms: i64,
}

impl Member {
    pub fn new(name: &str, url: &str, role: Role, epoch: u64) -> Self {
        let now = now_ms();
        Self { name: name.into(), url: url.into(), role, epoch, pid: std::process::id(), seen_ms: now, since_ms: now }
    }
}

/// Where the active member serves its web console, for a standby that forwards to it. Written
/// (owner-only) by the active each time it takes over; the pair directory is as trusted as the
/// store beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleRecord {
    /// The console's socket address.
    pub address: std::net::SocketAddr,
    /// The certificate it presents (PEM): the standby trusts exactly this one.
    pub cert_pem: String,
    /// A secret the standby shows to have the browser's address believed (sign-in limits are
    /// per address).
    pub forward_key: String,
    /// The active's fencing epoch when it wrote this.
    pub epoch: u64,
}

/// The `pair/` directory of one store.
#[derive(Debug, Clone)]
pub struct PairDir {
    dir: PathBuf,
}

fn io(path: &Path, e: std::io::Error) -> ProviderError {
    ProviderError::Io(format!("{}: {e}", path.display()))
}

fn read_epoch(path: &Path) -> Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().map_err(|_| {
            ProviderError::Store(format!("{} holds {:?}, not an epoch number; fix or remove it", path.display(), s))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(path, e)),
    }
}

impl PairDir {
    pub fn open(data_dir: &Path) -> Result<Self> {
        let dir = data_dir.join("pair");
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        Ok(Self { dir })
    }

    /// The store's fencing epoch now (0 before the first takeover).
    pub fn epoch(&self) -> Result<u64> {
        read_epoch(&self.dir.join(EPOCH))
    }

    /// Makes this store's epoch at least `epoch` (a moved or merged store keeps fencing
    /// everything that held its source).
    pub fn raise_epoch_to(&self, epoch: u64) -> Result<()> {
        if self.epoch()? < epoch {
            updraft_core::package::write_atomic(&self.dir, EPOCH, epoch.to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Called once the store's lock is held: raises the epoch and records `me` as active, both
    /// durably, before anything is served. Returns the new epoch.
    pub fn take_over(&self, name: &str, url: &str) -> Result<u64> {
        let epoch = self.epoch()? + 1;
        updraft_core::package::write_atomic(&self.dir, EPOCH, epoch.to_string().as_bytes())?;
        let me = Member::new(name, url, Role::Active, epoch);
        let json = serde_json::to_vec_pretty(&me).expect("member serialises");
        updraft_core::package::write_atomic(&self.dir, ACTIVE, &json)?;
        self.heartbeat(&me);
        Ok(epoch)
    }

    /// Who took over last, if anyone did and the record is readable.
    pub fn active(&self) -> Option<Member> {
        serde_json::from_slice(&std::fs::read(self.dir.join(ACTIVE)).ok()?).ok()
    }

    fn member_file(name: &str) -> String {
        // Hex, so any provider name is a safe file name.
        format!("member-{}.json", hex::encode(name))
    }

    /// Refreshes `me`'s heartbeat. Failures are logged, not fatal: a heartbeat only feeds
    /// `provider pair`.
    pub fn heartbeat(&self, me: &Member) {
        let mut me = me.clone();
        me.seen_ms = now_ms();
        let json = serde_json::to_vec(&me).expect("member serialises");
        if let Err(e) = updraft_core::package::write_atomic(&self.dir, &Self::member_file(&me.name), &json) {
            tracing::warn!(error = %e, "cannot write the pair heartbeat");
        }
    }

    /// Every member that ever wrote a heartbeat here, active first, then by name.
    pub fn members(&self) -> Vec<Member> {
        let mut out: Vec<Member> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("member-") && n.ends_with(".json")
            })
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a: &Member, b: &Member| (a.role != Role::Active, &a.name).cmp(&(b.role != Role::Active, &b.name)));
        out
    }

    /// The pair as `admin-cli provider pair` shows it.
    pub fn report(&self) -> Result<PairReply> {
        let epoch = self.epoch()?;
        let active = self.active().filter(|a| a.epoch == epoch);
        let now = now_ms();
        let members = self
            .members()
            .into_iter()
            .map(|m| {
                let fresh = now - m.seen_ms <= STALE.as_millis() as i64;
                let is_active = active.as_ref().is_some_and(|a| a.name == m.name && a.pid == m.pid);
                let role = match (fresh, is_active, m.role) {
                    (false, _, _) => "gone",
                    (true, true, Role::Active) => "active",
                    // An old active that lost the store and has not stepped down yet.
                    (true, false, Role::Active) => "fenced",
                    (true, _, Role::Standby) => "standby",
                };
                PairMember {
                    name: m.name,
                    url: m.url,
                    role: role.into(),
                    epoch: m.epoch,
                    pid: m.pid,
                    last_seen_unix_ms: m.seen_ms,
                    since_unix_ms: m.since_ms,
                }
            })
            .collect();
        Ok(PairReply { epoch, active: active.map(|a| a.name).unwrap_or_default(), members })
    }

    /// Records where the active serves its console (see [`ConsoleRecord`]).
    pub fn publish_console(&self, record: &ConsoleRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).expect("console record serialises");
        updraft_core::package::write_atomic(&self.dir, CONSOLE, &json)?;
        Ok(())
    }

    /// Where the current active serves its console, if it said so since it took over.
    pub fn console(&self) -> Option<ConsoleRecord> {
        let record: ConsoleRecord = serde_json::from_slice(&std::fs::read(self.dir.join(CONSOLE)).ok()?).ok()?;
        (record.epoch == self.epoch().ok()?).then_some(record)
    }

    /// The fence of a holder that took over with `epoch`.
    pub fn fence(&self, epoch: u64) -> Fence {
        Fence { path: self.dir.join(EPOCH), epoch }
    }
}

/// Checked by the store before it acknowledges a write.
#[derive(Debug, Clone)]
pub struct Fence {
    path: PathBuf,
    epoch: u64,
}

impl Fence {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Fails once another provider has taken over the store.
    pub fn check(&self) -> Result<()> {
        let current = read_epoch(&self.path)?;
        if current != self.epoch {
            return Err(ProviderError::Fenced { mine: self.epoch, current });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_raises_the_epoch_and_fences_the_previous_holder() {
        let dir = tempfile::tempdir().unwrap();
        let pair = PairDir::open(dir.path()).unwrap();
        assert_eq!(pair.epoch().unwrap(), 0);
        let a = pair.take_over("a", "http://a:1").unwrap();
        let fence_a = pair.fence(a);
        fence_a.check().unwrap();
        let b = pair.take_over("b", "http://b:1").unwrap();
        assert_eq!(b, a + 1);
        let err = fence_a.check().unwrap_err().to_string();
        assert!(err.contains("epoch 1") && err.contains("2"), "{err}");
        pair.fence(b).check().unwrap();
        assert_eq!(pair.active().unwrap().name, "b");
        let report = pair.report().unwrap();
        assert_eq!(report.active, "b");
        assert_eq!(report.members.len(), 2);
    }

    #[test]
    fn a_garbled_epoch_is_an_error_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        let pair = PairDir::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("pair/epoch"), "banana").unwrap();
        assert!(pair.take_over("a", "u").unwrap_err().to_string().contains("not an epoch number"));
    }
}
