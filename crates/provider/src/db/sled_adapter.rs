//! The embedded engine: sled, with background flushes off so data reaches the disk only through
//! [`Engine::flush`] (the store's committer checks the pair's fence before each). The only file
//! in the provider that names sled.
use std::cell::Cell;
use std::ops::Bound;
use std::path::Path;
use std::sync::RwLock;

use sled::transaction::{ConflictableTransactionError, TransactionalTree, UnabortableTransactionError};
use sled::{IVec, Transactional};

use super::{Engine, EngineTx, Error, Held, Iter, Result, TxStep, Value};

const ENGINE: &str = "sled";
/// sled's own tree, which the store never uses: left out of [`Engine::tree_names`].
const DEFAULT_TREE: &[u8] = b"__sled__default";

pub struct SledEngine {
    db: sled::Db,
    trees: RwLock<Vec<(String, sled::Tree)>>,
}

fn err(e: sled::Error) -> Error {
    Error::Engine { engine: ENGINE, message: e.to_string() }
}

fn owned(v: Option<IVec>) -> Option<Value> {
    v.map(|v| v.to_vec())
}

impl SledEngine {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new().path(dir).flush_every_ms(None).open().map_err(|e| {
            let text = e.to_string();
            if text.contains("could not acquire lock") {
                Error::InUse(format!("store {} is in use by another process", dir.display()))
            } else {
                Error::Engine { engine: ENGINE, message: format!("cannot open {}: {text}", dir.display()) }
            }
        })?;
        Ok(Self { db, trees: RwLock::new(Vec::new()) })
    }

    fn tree(&self, index: usize) -> Result<sled::Tree> {
        let trees = self.trees.read().map_err(|_| poisoned())?;
        trees.get(index).map(|(_, t)| t.clone()).ok_or_else(|| unknown(index))
    }
}

fn poisoned() -> Error {
    Error::Engine { engine: ENGINE, message: "the tree table is poisoned".into() }
}

fn unknown(index: usize) -> Error {
    Error::Engine { engine: ENGINE, message: format!("no open tree {index}") }
}

impl Engine for SledEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn open_tree(&self, name: &str) -> Result<usize> {
        let mut trees = self.trees.write().map_err(|_| poisoned())?;
        if let Some(i) = trees.iter().position(|(n, _)| n == name) {
            return Ok(i);
        }
        trees.push((name.to_string(), self.db.open_tree(name).map_err(err)?));
        Ok(trees.len() - 1)
    }

    fn tree_names(&self) -> Result<Vec<String>> {
        Ok(self
            .db
            .tree_names()
            .into_iter()
            .filter(|n| n.as_ref() != DEFAULT_TREE)
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .collect())
    }

    fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        self.tree(tree)?.get(key).map(owned).map_err(err)
    }

    fn insert(&self, tree: usize, key: &[u8], value: &[u8]) -> Result<Option<Value>> {
        self.tree(tree)?.insert(key, value).map(owned).map_err(err)
    }

    fn remove(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        self.tree(tree)?.remove(key).map(owned).map_err(err)
    }

    fn len(&self, tree: usize) -> Result<usize> {
        Ok(self.tree(tree)?.len())
    }

    fn range(&self, tree: usize, from: Bound<&[u8]>, to: Bound<&[u8]>, rev: bool) -> Result<Iter<'_>> {
        let it = self.tree(tree)?.range::<&[u8], _>((from, to));
        let map = |kv: sled::Result<(IVec, IVec)>| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(err);
        Ok(if rev { Box::new(it.rev().map(map)) } else { Box::new(it.map(map)) })
    }

    fn shared(&self) -> bool {
        false
    }

    fn hold(&self, _duty: &str) -> Result<Option<Box<dyn Held>>> {
        Ok(Some(Box::new(Alone)))
    }

    fn transaction(&self, f: &dyn Fn(&dyn EngineTx) -> TxStep) -> Result<()> {
        let trees: Vec<sled::Tree> =
            self.trees.read().map_err(|_| poisoned())?.iter().map(|(_, t)| t.clone()).collect();
        let outcome = trees.as_slice().transaction(|view: &Vec<TransactionalTree>| {
            let tx = SledTx { trees: view, failed: Cell::new(None) };
            let step = f(&tx);
            // A conflict or storage failure inside the closure decides, whatever it returned:
            // sled retries a conflict with a fresh view.
            if let Some(e) = tx.failed.take() {
                return Err(e.into());
            }
            match step {
                TxStep::Commit => Ok(()),
                TxStep::Abort => Err(ConflictableTransactionError::Abort(())),
            }
        });
        match outcome {
            Ok(()) | Err(sled::transaction::TransactionError::Abort(())) => Ok(()),
            Err(sled::transaction::TransactionError::Storage(e)) => Err(err(e)),
        }
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(drop).map_err(err)
    }

    fn generate_id(&self) -> Result<u64> {
        self.db.generate_id().map_err(err)
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.db.size_on_disk().map_err(err)
    }
}

/// The process holding sled's lock holds every duty.
struct Alone;

impl Held for Alone {
    fn still_held(&self) -> bool {
        true
    }
}

/// A transaction's view; the first engine failure is kept for sled to act on.
struct SledTx<'a> {
    trees: &'a [TransactionalTree],
    failed: Cell<Option<UnabortableTransactionError>>,
}

impl SledTx<'_> {
    fn run<T>(
        &self,
        tree: usize,
        op: impl FnOnce(&TransactionalTree) -> std::result::Result<T, UnabortableTransactionError>,
    ) -> Result<T> {
        let t = self.trees.get(tree).ok_or_else(|| unknown(tree))?;
        op(t).map_err(|e| {
            let error = match &e {
                UnabortableTransactionError::Conflict => {
                    Error::Engine { engine: ENGINE, message: "transaction conflict (retried)".into() }
                }
                UnabortableTransactionError::Storage(s) => err(s.clone()),
            };
            let first = self.failed.take();
            self.failed.set(first.or(Some(e)));
            error
        })
    }
}

impl EngineTx for SledTx<'_> {
    fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        self.run(tree, |t| t.get(key)).map(owned)
    }

    fn insert(&self, tree: usize, key: &[u8], value: &[u8]) -> Result<Option<Value>> {
        self.run(tree, |t| t.insert(key, value)).map(owned)
    }

    fn remove(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        self.run(tree, |t| t.remove(key)).map(owned)
    }
}
