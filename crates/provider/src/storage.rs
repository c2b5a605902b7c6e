//! Store management, with no provider running on the stores involved: moving a store to a new
//! location (a full copy; the old one is marked so no provider starts on it again), and
//! merging a provider's separate store into a shared one (the most recent record of each
//! machine wins; one record per machine name).
use std::path::Path;

use serde::Serialize;

use crate::blobs::BlobStore;
use crate::error::{ProviderError, Result};
use crate::pair::PairDir;
use crate::store::{MOVED_TO, Store};

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct MoveReport {
    pub blobs: usize,
    pub machines: usize,
    pub updates: usize,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct MergeReport {
    pub updates_added: usize,
    pub blobs_copied: usize,
    pub groups_added: usize,
    pub caps_added: usize,
    pub peers_added: usize,
    pub watches_added: usize,
    pub deployments_added: usize,
    /// Machines only the source knew.
    pub machines_added: usize,
    /// Machines both knew, where the source had the more recent contact.
    pub machines_replaced: usize,
    /// Machines both knew, where the target's record was kept.
    pub duplicates_dropped: usize,
    pub activity_copied: usize,
}

fn io(path: &Path, e: std::io::Error) -> ProviderError {
    ProviderError::Io(format!("{}: {e}", path.display()))
}

/// Copies the store at `from` to `to` (which must not hold a store yet) and marks `from` as
/// moved. Start the provider (both members of a pair) with `--store TO` afterwards.
pub async fn move_store(from: &Path, to: &Path) -> Result<MoveReport> {
    if !from.join("db").exists() {
        return Err(ProviderError::InvalidArgument(format!("{} holds no store", from.display())));
    }
    if to.join("db").exists() {
        return Err(ProviderError::InvalidArgument(format!("{} already holds a store", to.display())));
    }
    let src = Store::open(from)?;
    let dest = src.copy_to(to).await?;
    let (src_blobs, dest_blobs) = (BlobStore::open(&from.join("blobs"))?, BlobStore::open(&to.join("blobs"))?);
    let mut report =
        MoveReport { machines: dest.list_machines()?.len(), updates: dest.list_updates()?.len(), blobs: 0 };
    for h in src_blobs.list()? {
        dest_blobs.copy_from(&src_blobs, &h).await?;
        report.blobs += 1;
    }
    PairDir::open(to)?.raise_epoch_to(PairDir::open(from)?.epoch()?)?;
    // Last, once the copy is whole: from now on the old location refuses to open.
    updraft_core::package::write_atomic(from, MOVED_TO, to.display().to_string().as_bytes())?;
    Ok(report)
}

/// Copies the store at `from` into the PostgreSQL database at `url` (which must hold no store
/// yet) and marks `from` as moved. The blobs stay where they are: `from` becomes the content
/// location of the providers started with `--store URL --content FROM`.
pub async fn move_store_to_database(from: &Path, url: &str) -> Result<MoveReport> {
    if !from.join("db").exists() {
        return Err(ProviderError::InvalidArgument(format!("{} holds no store", from.display())));
    }
    let src = Store::open(from)?;
    let dest = Store::on(crate::db::Db::open_postgres(url)?, "the PostgreSQL database")?;
    src.copy_into(&dest, "the PostgreSQL database").await?;
    let report = MoveReport {
        machines: dest.list_machines()?.len(),
        updates: dest.list_updates()?.len(),
        blobs: BlobStore::open(&from.join("blobs"))?.list()?.len(),
    };
    updraft_core::package::write_atomic(from, MOVED_TO, crate::db::redacted(url).as_bytes())?;
    Ok(report)
}

/// Merges the store at `from` into the store at `into`. What `into` already has wins, except
/// machines: each machine's most recent record (and its group, pins and role) wins.
pub async fn merge_store(from: &Path, into: &Path) -> Result<MergeReport> {
    if std::fs::canonicalize(from).map_err(|e| io(from, e))? == std::fs::canonicalize(into).map_err(|e| io(into, e))? {
        return Err(ProviderError::InvalidArgument("cannot merge a store into itself".into()));
    }
    let (src, dst) = (Store::open(from)?, Store::open(into)?);
    let (src_blobs, dst_blobs) = (BlobStore::open(&from.join("blobs"))?, BlobStore::open(&into.join("blobs"))?);
    let r = merge(&src, &src_blobs, &dst, &dst_blobs).await?;
    PairDir::open(into)?.raise_epoch_to(PairDir::open(from)?.epoch()?)?;
    Ok(r)
}

/// Merges the store at `from` into the store in the PostgreSQL database at `url`, as
/// [`merge_store`] does; the blobs of the updates it brings are copied into the content
/// location `content` (a provider of the database started with `--content CONTENT` serves
/// them; the others fetch them from it).
pub async fn merge_store_into_database(from: &Path, url: &str, content: &Path) -> Result<MergeReport> {
    if !from.join("db").exists() {
        return Err(ProviderError::InvalidArgument(format!("{} holds no store", from.display())));
    }
    let src = Store::open(from)?;
    let dst = Store::on(crate::db::Db::open_postgres(url)?, "the PostgreSQL database")?;
    let (src_blobs, dst_blobs) = (BlobStore::open(&from.join("blobs"))?, BlobStore::open(&content.join("blobs"))?);
    merge(&src, &src_blobs, &dst, &dst_blobs).await
}

/// The merge itself, between stores of any engines.
async fn merge(src: &Store, src_blobs: &BlobStore, dst: &Store, dst_blobs: &BlobStore) -> Result<MergeReport> {
    let mut r = MergeReport::default();

    for u in src.list_updates()? {
        let dup = dst.list_updates()?.into_iter().any(|d| d.product == u.product && d.version == u.version);
        if dst.get_update(&u.id).is_ok() || dup {
            continue;
        }
        if src_blobs.has(&u.content_hash) && dst_blobs.copy_from(src_blobs, &u.content_hash).await? {
            r.blobs_copied += 1;
        }
        dst.change_update(&u.id, Some(u.clone()), |_| Ok(())).await?;
        r.updates_added += 1;
    }
    let caps = dst.list_caps()?;
    for c in src.list_caps()? {
        if !caps.iter().any(|d| d.product_line == c.product_line) {
            dst.set_cap(&c).await?;
            r.caps_added += 1;
        }
    }
    for g in src.list_groups()? {
        if dst.get_group(&g.name)?.is_none() {
            dst.put_group(&g).await?;
            r.groups_added += 1;
        }
    }
    for p in src.list_peers()? {
        if dst.get_peer(&p.name)?.is_none() {
            dst.put_peer(&p).await?;
            r.peers_added += 1;
        }
    }
    let watches = dst.list_watches()?;
    for w in src.list_watches()? {
        if !watches.iter().any(|d| d.path == w.path) {
            dst.add_watch(&w).await?;
            r.watches_added += 1;
        }
    }
    let deployments = dst.list_deployments()?;
    for d in src.list_deployments()? {
        if !deployments.contains(&d) {
            dst.deploy(&d, false).await?;
            r.deployments_added += 1;
        }
    }
    if !dst.discovery()?.enabled && src.discovery()?.enabled {
        dst.set_discovery(&src.discovery()?).await?;
    }

    // Machines: the most recent contact wins, and brings its group and pins along.
    let src_groups = src.list_assignments()?;
    for m in src.list_machines()? {
        let name = m.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let take = match dst.get_machine(&name)? {
            None => {
                r.machines_added += 1;
                true
            }
            Some(d) if m.last_contact_unix_ms > d.last_contact_unix_ms => {
                r.machines_replaced += 1;
                true
            }
            Some(_) => {
                r.duplicates_dropped += 1;
                false
            }
        };
        if take {
            dst.put_machine(&m).await?;
            let group = src_groups.iter().find(|a| a.machine == name).map(|a| a.group.clone()).unwrap_or_default();
            if !group.is_empty() && dst.get_group(&group)?.is_none() {
                // The group came from the source but the target has no such group: keep the
                // machine in the default group rather than point it at nothing.
                tracing::warn!(machine = %name, %group, "group missing after merge; machine stays in the default group");
            } else {
                dst.assign(&updraft_proto::v1::Assignment { machine: name.clone(), group }).await?;
            }
            dst.set_pins(&src.pins_of(&name)?).await?;
            let role = src.role_of(&name)?.unwrap_or_default();
            dst.set_role(&updraft_proto::v1::MachineRole { machine: name.clone(), role }).await?;
        }
    }
    let activity = src.list_activity("", "", 0, crate::store::MAX_ACTIVITY)?;
    r.activity_copied = activity.len();
    dst.append_activity(&activity).await?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_proto::v1::{Assignment, Group, Machine, MachineInfo, Update};

    fn machine(name: &str, at: i64, version: &str) -> Machine {
        Machine {
            info: Some(MachineInfo { name: name.into(), agent_version: version.into(), ..Default::default() }),
            last_contact_unix_ms: at,
            ..Default::default()
        }
    }

    async fn reopen(dir: &Path) -> Store {
        // sled releases its lock from a background thread shortly after the last handle goes.
        for _ in 0..100 {
            if let Ok(s) = Store::open(dir) {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Store::open(dir).unwrap()
    }

    #[tokio::test]
    async fn merge_keeps_the_latest_record_of_each_machine_once() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        {
            let src = Store::open(a.path()).unwrap();
            src.put_machine(&machine("pc-1", 200, "new")).await.unwrap();
            src.put_machine(&machine("pc-2", 100, "old")).await.unwrap();
            src.put_machine(&machine("pc-3", 100, "only-src")).await.unwrap();
            src.put_group(&Group { name: "lab".into(), settings: None }).await.unwrap();
            src.assign(&Assignment { machine: "pc-1".into(), group: "lab".into() }).await.unwrap();
            let u = Update { id: "u1".into(), product: "p".into(), version: "1.0.0.0".into(), ..Default::default() };
            src.change_update("u1", Some(u), |_| Ok(())).await.unwrap();
            let dst = Store::open(b.path()).unwrap();
            dst.put_machine(&machine("pc-1", 100, "stale")).await.unwrap();
            dst.put_machine(&machine("pc-2", 300, "kept")).await.unwrap();
        }
        let _ = (reopen(a.path()).await, reopen(b.path()).await);
        let r = merge_store(a.path(), b.path()).await.unwrap();
        assert_eq!((r.machines_added, r.machines_replaced, r.duplicates_dropped), (1, 1, 1), "{r:?}");
        assert_eq!((r.updates_added, r.groups_added), (1, 1));
        let dst = reopen(b.path()).await;
        let v = |n: &str| dst.get_machine(n).unwrap().unwrap().info.unwrap().agent_version;
        assert_eq!((v("pc-1"), v("pc-2"), v("pc-3")), ("new".into(), "kept".into(), "only-src".into()));
        assert_eq!(dst.list_machines().unwrap().len(), 3);
        assert_eq!(dst.group_of("pc-1").unwrap(), "lab");
        assert!(dst.get_update("u1").is_ok());
    }

    #[tokio::test]
    async fn a_moved_store_refuses_to_open_where_it_was() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let to = b.path().join("new");
        {
            let s = Store::open(a.path()).unwrap();
            s.put_machine(&machine("pc-1", 1, "v")).await.unwrap();
        }
        let _ = reopen(a.path()).await;
        let r = move_store(a.path(), &to).await.unwrap();
        assert_eq!(r.machines, 1);
        let e = Store::open(a.path()).err().unwrap().to_string();
        assert!(e.contains("was moved to") && e.contains("new"), "{e}");
        assert!(reopen(&to).await.get_machine("pc-1").unwrap().is_some());
        assert!(move_store(a.path(), &to).await.is_err());
    }
}
