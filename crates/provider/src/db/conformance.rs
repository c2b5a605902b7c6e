//! The one test suite every engine passes: what `store` relies on, stated as tests. An engine's
//! test calls [`suite`] with a way to (re)open one database of its own.
use std::sync::Arc;

use super::{Db, Error};

/// Runs every check against the database `open` opens; `open` is called again, after every
/// handle is dropped, to see what survived.
pub fn suite(open: &dyn Fn() -> Db) {
    reads_and_writes(&open());
    ordered_ranges(&open());
    transactions_commit_whole_or_not_at_all(&open());
    concurrent_transactions_serialize(open());
    one_holder_per_duty(open);
    durable_after_flush_and_copyable(open);
}

fn reads_and_writes(db: &Db) {
    let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
    assert_eq!(a.insert("k", "1").unwrap(), None);
    assert_eq!(a.insert("k", "2").unwrap(), Some(b"1".to_vec()), "insert returns what it replaced");
    assert_eq!(a.get("k").unwrap(), Some(b"2".to_vec()));
    assert_eq!(b.get("k").unwrap(), None, "trees are separate");
    assert!(a.contains_key("k").unwrap());
    assert_eq!(a.remove("k").unwrap(), Some(b"2".to_vec()));
    assert_eq!(a.remove("k").unwrap(), None);
    assert!(a.is_empty().unwrap());
    let again = db.open_tree("a").unwrap();
    a.insert("x", "y").unwrap();
    assert_eq!(again.get("x").unwrap(), Some(b"y".to_vec()), "a name opens the same tree");
    let names = db.tree_names().unwrap();
    assert!(names.contains(&"a".to_string()) && names.contains(&"b".to_string()), "{names:?}");
}

fn ordered_ranges(db: &Db) {
    let t = db.open_tree("ranges").unwrap();
    for k in [&b"b"[..], b"a", b"ab", &[b'a', 0xff], &[0xff, 0xff], b"c"] {
        t.insert(k, k).unwrap();
    }
    let keys = |it: super::Iter<'_>| it.map(|kv| kv.unwrap().0).collect::<Vec<_>>();
    let all = keys(t.iter().unwrap());
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted, "bytewise order");
    assert_eq!(all.len(), 6);
    assert_eq!(keys(t.from("b", false).unwrap()), vec![b"b".to_vec(), b"c".to_vec(), vec![0xff, 0xff]]);
    assert_eq!(keys(t.from("b", true).unwrap()), vec![vec![0xff, 0xff], b"c".to_vec(), b"b".to_vec()]);
    assert_eq!(keys(t.scan_prefix("a").unwrap()), vec![b"a".to_vec(), b"ab".to_vec(), vec![b'a', 0xff]]);
    assert_eq!(keys(t.scan_prefix([0xff]).unwrap()), vec![vec![0xff, 0xff]], "a prefix of 0xff runs to the end");
    assert_eq!(t.first().unwrap().unwrap().0, b"a".to_vec());
    assert_eq!(t.last().unwrap().unwrap().0, vec![0xff, 0xff]);
    assert_eq!(t.len().unwrap(), 6);
    assert_eq!(t.pop_min().unwrap().unwrap().0, b"a".to_vec());
    assert_eq!(t.len().unwrap(), 5);
}

#[derive(Debug)]
enum Refused {
    No,
    Db(#[allow(dead_code, reason = "shown by Debug when a test fails")] Error),
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Refused::Db(e)
    }
}

fn transactions_commit_whole_or_not_at_all(db: &Db) {
    let (a, b) = (db.open_tree("tx-a").unwrap(), db.open_tree("tx-b").unwrap());
    let n = db
        .transaction(|tx| -> Result<u32, Refused> {
            tx.insert(&a, "k", "1")?;
            assert_eq!(tx.get(&a, "k")?, Some(b"1".to_vec()), "a transaction reads its own writes");
            tx.insert(&b, "k", "1")?;
            Ok(7)
        })
        .unwrap();
    assert_eq!(n, 7, "the closure's value is returned");
    assert_eq!((a.get("k").unwrap(), b.get("k").unwrap()), (Some(b"1".to_vec()), Some(b"1".to_vec())));
    let refused = db.transaction(|tx| -> Result<(), Refused> {
        tx.insert(&a, "k", "2")?;
        tx.remove(&b, "k")?;
        tx.insert(&b, "new", "x")?;
        Err(Refused::No)
    });
    assert!(matches!(refused, Err(Refused::No)), "the closure's error is returned: {refused:?}");
    assert_eq!(a.get("k").unwrap(), Some(b"1".to_vec()), "nothing of an aborted transaction lands");
    assert_eq!(b.get("k").unwrap(), Some(b"1".to_vec()));
    assert_eq!(b.get("new").unwrap(), None);
}

/// Read-modify-write transactions from several threads lose no update.
fn concurrent_transactions_serialize(db: Db) {
    let t = db.open_tree("counter").unwrap();
    let (threads, each) = (4, 50);
    let db = Arc::new(db);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (db, t) = (db.clone(), t.clone());
            std::thread::spawn(move || {
                for _ in 0..each {
                    db.transaction(|tx| -> Result<(), Error> {
                        let n = tx.get(&t, "n")?.map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
                        tx.insert(&t, "n", (n + 1).to_be_bytes())?;
                        Ok(())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let n = u64::from_be_bytes(t.get("n").unwrap().unwrap().try_into().unwrap());
    assert_eq!(n, threads * each, "no increment lost");
}

fn one_holder_per_duty(open: &dyn Fn() -> Db) {
    let db = open();
    let held = db.hold("scan").unwrap().expect("a free duty is taken");
    assert!(held.still_held());
    if !db.shared() {
        // The one process holding an embedded database holds every duty.
        return;
    }
    let other = open();
    assert!(other.hold("scan").unwrap().is_none(), "a held duty is refused to another");
    assert!(other.hold("sign").unwrap().is_some(), "duties are separate");
    drop(held);
    // The server lets go of the lock once it has seen the holder's session end: wait for that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let taken = loop {
        match other.hold("scan").unwrap() {
            Some(taken) => break taken,
            None if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
            None => panic!("a duty let go is taken by the next"),
        }
    };
    assert!(taken.still_held());
}

fn durable_after_flush_and_copyable(open: &dyn Fn() -> Db) {
    let first_id = {
        let db = open();
        let t = db.open_tree("durable").unwrap();
        t.insert("k", "v").unwrap();
        db.transaction(|tx| -> Result<(), Error> {
            tx.insert(&t, "tx", "v")?;
            Ok(())
        })
        .unwrap();
        let id = db.generate_id().unwrap();
        assert!(db.generate_id().unwrap() > id, "ids grow");
        db.flush().unwrap();
        id
    };
    let db = open();
    let t = db.open_tree("durable").unwrap();
    assert_eq!(t.get("k").unwrap(), Some(b"v".to_vec()), "a flushed write survives a reopen");
    assert_eq!(t.get("tx").unwrap(), Some(b"v".to_vec()));
    assert!(db.generate_id().unwrap() > first_id, "ids are never handed out twice");
    assert!(db.size_on_disk().unwrap() > 0, "a store with records takes room");

    let dir = tempfile::tempdir().unwrap();
    let copy = Db::open_embedded(dir.path()).unwrap();
    db.copy_into(&copy).unwrap();
    for name in db.tree_names().unwrap() {
        let (from, to) = (db.open_tree(&name).unwrap(), copy.open_tree(&name).unwrap());
        let entries = |t: &super::Tree| t.iter().unwrap().map(Result::unwrap).collect::<Vec<_>>();
        assert_eq!(entries(&from), entries(&to), "tree {name} copied whole");
    }
}

#[test]
fn sled_passes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    suite(&|| {
        // sled releases its lock from a background thread shortly after the last handle goes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match Db::open_embedded(&path) {
                Err(Error::InUse(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => return other.unwrap(),
            }
        }
    });
}

#[test]
fn postgres_passes() {
    let cluster = updraft_pgtest::Cluster::start();
    let url = cluster.url();
    suite(&|| Db::open_postgres(&url).unwrap());
}
