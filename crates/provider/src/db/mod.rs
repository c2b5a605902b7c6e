//! The store's engine seam: named trees of ordered byte keys and values, transactions over any
//! of them, and a flush that makes every write so far durable. `store` is written against this
//! and nothing else; each engine is one adapter file (`sled_adapter`), chosen when the store is
//! opened, and every engine passes the one conformance suite (`conformance`).
//!
//! The traits are object-safe (`Arc<dyn Engine>`), so the choice of engine is a value, not a
//! type parameter threaded through the provider. Trees are opened once, by name, and addressed
//! by index afterwards.
//!
//! The invariants an engine keeps:
//! - keys are ordered bytewise; `range` yields them in that order (or reversed);
//! - a transaction's writes become visible together or not at all, and a transaction that
//!   read a key sees no other writer's change to it before it commits (the engine retries or
//!   serializes; the closure may therefore run more than once and must not have side effects);
//! - after `flush` returns, every write that returned before it was called survives `kill -9`.
use std::cell::RefCell;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

mod postgres_adapter;
mod sled_adapter;

#[cfg(test)]
mod conformance;

pub type Value = Vec<u8>;
pub type Entry = (Value, Value);
pub type Iter<'a> = Box<dyn Iterator<Item = Result<Entry>> + Send + 'a>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the database.
    #[error("{0}")]
    InUse(String),
    /// The engine failed: I/O, corruption, a refused statement.
    #[error("{engine}: {message}")]
    Engine { engine: &'static str, message: String },
    /// The database server cannot be reached (connection refused, lost or timed out): another
    /// provider of the database may still serve.
    #[error("{engine} unreachable: {message}")]
    Unreachable { engine: &'static str, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One storage engine. Implemented once per engine; used only through [`Db`] and [`Tree`].
pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    /// Opens (creating if needed) the tree `name`; the same name gives the same index.
    fn open_tree(&self, name: &str) -> Result<usize>;
    /// Names of every tree the database holds, opened or not.
    fn tree_names(&self) -> Result<Vec<String>>;

    fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Value>>;
    /// Inserts, returning the value replaced.
    fn insert(&self, tree: usize, key: &[u8], value: &[u8]) -> Result<Option<Value>>;
    /// Removes, returning the value removed.
    fn remove(&self, tree: usize, key: &[u8]) -> Result<Option<Value>>;
    fn len(&self, tree: usize) -> Result<usize>;
    fn range(&self, tree: usize, from: Bound<&[u8]>, to: Bound<&[u8]>, rev: bool) -> Result<Iter<'_>>;

    /// Whether other processes may use this database at the same time (a database server), as
    /// opposed to this process holding it alone (an embedded engine's lock).
    fn shared(&self) -> bool;
    /// Takes duty `name` if no other process holds it: held until the returned handle is
    /// dropped or this process dies. An embedded engine's one process holds every duty.
    fn hold(&self, duty: &str) -> Result<Option<Box<dyn Held>>>;

    /// Runs `f` as one transaction over every open tree (see the module's invariants).
    fn transaction(&self, f: &dyn Fn(&dyn EngineTx) -> TxStep) -> Result<()>;
    /// Makes every write that returned before this call durable.
    fn flush(&self) -> Result<()>;
    /// A number never handed out before by this database, also after a restart.
    fn generate_id(&self) -> Result<u64>;
    /// Bytes the store takes where it is kept (files, or the database's tables).
    fn size_on_disk(&self) -> Result<u64>;
}

/// Inside a transaction: reads see the transaction's own writes.
pub trait EngineTx {
    fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Value>>;
    fn insert(&self, tree: usize, key: &[u8], value: &[u8]) -> Result<Option<Value>>;
    fn remove(&self, tree: usize, key: &[u8]) -> Result<Option<Value>>;
}

/// A duty held (see [`Engine::hold`]).
pub trait Held: Send + Sync {
    /// Whether the duty is still this process's (a database connection can be lost).
    fn still_held(&self) -> bool;
}

/// What a transaction's closure tells its engine: commit, or roll back.
pub enum TxStep {
    Commit,
    Abort,
}

/// A handle on an open database; cheap to clone.
#[derive(Clone)]
pub struct Db(Arc<dyn Engine>);

/// A handle on one tree of a database; cheap to clone.
#[derive(Clone)]
pub struct Tree {
    db: Arc<dyn Engine>,
    index: usize,
}

/// The transaction handed to [`Db::transaction`]'s closure.
pub struct Tx<'a>(&'a dyn EngineTx);

impl Db {
    /// Opens the database in `dir` with the embedded engine (sled), which holds a lock on it
    /// for as long as this process keeps a handle.
    pub fn open_embedded(dir: &Path) -> Result<Db> {
        Ok(Db(Arc::new(sled_adapter::SledEngine::open(dir)?)))
    }

    /// Connects to a PostgreSQL database (`postgres://…`), shared by every provider using it.
    pub fn open_postgres(url: &str) -> Result<Db> {
        Ok(Db(Arc::new(postgres_adapter::PgEngine::open(url)?)))
    }

    pub fn open_tree(&self, name: &str) -> Result<Tree> {
        Ok(Tree { db: self.0.clone(), index: self.0.open_tree(name)? })
    }

    pub fn tree_names(&self) -> Result<Vec<String>> {
        self.0.tree_names()
    }

    pub fn flush(&self) -> Result<()> {
        self.0.flush()
    }

    pub fn shared(&self) -> bool {
        self.0.shared()
    }

    pub fn hold(&self, duty: &str) -> Result<Option<Box<dyn Held>>> {
        self.0.hold(duty)
    }

    pub fn size_on_disk(&self) -> Result<u64> {
        self.0.size_on_disk()
    }

    pub fn generate_id(&self) -> Result<u64> {
        self.0.generate_id()
    }

    /// Runs `f` as one transaction: its writes land together if it returns `Ok`, and none of
    /// them if it returns `Err` (which is returned). `f` may run more than once.
    pub fn transaction<R, E: From<Error>>(&self, f: impl Fn(&Tx<'_>) -> Result<R, E>) -> Result<R, E> {
        let out: RefCell<Option<Result<R, E>>> = RefCell::new(None);
        self.0.transaction(&|tx| {
            let r = f(&Tx(tx));
            let step = if r.is_ok() { TxStep::Commit } else { TxStep::Abort };
            *out.borrow_mut() = Some(r);
            step
        })?;
        out.into_inner().unwrap_or_else(|| {
            Err(Error::Engine { engine: self.0.name(), message: "a transaction ran no closure".into() }.into())
        })
    }

    /// Copies every tree of this database into `dest`, which must be empty.
    pub fn copy_into(&self, dest: &Db) -> Result<()> {
        for name in self.tree_names()? {
            let (from, to) = (self.open_tree(&name)?, dest.open_tree(&name)?);
            for kv in from.iter()? {
                let (k, v) = kv?;
                to.insert(&k, &v)?;
            }
        }
        Ok(())
    }
}

/// A database's connection string with any password left out, for messages and files.
pub fn redacted(url: &str) -> String {
    postgres_adapter::redact(url)
}

/// The least key greater than every key starting with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl Tree {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.db.get(self.index, key.as_ref())
    }

    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.db.insert(self.index, key.as_ref(), value.as_ref())
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.db.remove(self.index, key.as_ref())
    }

    /// Counts the entries: may walk the whole tree.
    pub fn len(&self) -> Result<usize> {
        self.db.len(self.index)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.first()?.is_none())
    }

    pub fn iter(&self) -> Result<Iter<'_>> {
        self.db.range(self.index, Bound::Unbounded, Bound::Unbounded, false)
    }

    /// Entries with keys at or after `from`, in order (or reversed).
    pub fn from(&self, from: impl AsRef<[u8]>, rev: bool) -> Result<Iter<'_>> {
        self.db.range(self.index, Bound::Included(from.as_ref()), Bound::Unbounded, rev)
    }

    /// Entries whose keys start with `prefix`, in order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Iter<'_>> {
        let prefix = prefix.as_ref();
        let end = prefix_end(prefix);
        let to = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        self.db.range(self.index, Bound::Included(prefix), to, false)
    }

    pub fn first(&self) -> Result<Option<Entry>> {
        self.iter()?.next().transpose()
    }

    pub fn last(&self) -> Result<Option<Entry>> {
        self.db.range(self.index, Bound::Unbounded, Bound::Unbounded, true)?.next().transpose()
    }

    /// Removes and returns the entry with the least key; of two callers at once, each gets a
    /// different entry.
    pub fn pop_min(&self) -> Result<Option<Entry>> {
        loop {
            let Some((k, _)) = self.first()? else { return Ok(None) };
            if let Some(v) = self.remove(&k)? {
                return Ok(Some((k, v)));
            }
        }
    }
}

impl Tx<'_> {
    pub fn get(&self, tree: &Tree, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.0.get(tree.index, key.as_ref())
    }

    pub fn insert(&self, tree: &Tree, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.0.insert(tree.index, key.as_ref(), value.as_ref())
    }

    pub fn remove(&self, tree: &Tree, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.0.remove(tree.index, key.as_ref())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(super::prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(super::prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(super::prefix_end(&[0xff, 0xff]), None);
        assert_eq!(super::prefix_end(b""), None);
    }
}
