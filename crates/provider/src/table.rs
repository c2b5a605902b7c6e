//! Typed tables: a tree of the store whose every value is one protobuf message type. The store
//! names each table's type once, where it opens it, and reads and writes records through it —
//! never bytes, never a decode at the call site. The tree underneath stays reachable (through
//! `Deref`) for transactions and ordered ranges.
use std::marker::PhantomData;
use std::ops::Deref;

use prost::Message;

use crate::db::{Db, Tree};
use crate::error::{ProviderError, Result};

/// Decodes a stored record of type `M`; a record that does not decode is corruption.
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| ProviderError::Store(format!("corrupt record: {e}")))
}

/// The records of type `M` in one tree, by key.
pub struct Table<M> {
    tree: Tree,
    record: PhantomData<fn() -> M>,
}

impl<M> Clone for Table<M> {
    fn clone(&self) -> Self {
        Self { tree: self.tree.clone(), record: PhantomData }
    }
}

impl<M> Deref for Table<M> {
    type Target = Tree;

    fn deref(&self) -> &Tree {
        &self.tree
    }
}

impl<M: Message + Default> Table<M> {
    /// Opens tree `name` of `db` as a table of `M`.
    pub fn open(db: &Db, name: &str) -> Result<Self> {
        Ok(Self { tree: db.open_tree(name)?, record: PhantomData })
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<M>> {
        self.tree.get(key)?.map(|v| decode(&v)).transpose()
    }

    /// Writes `record` at `key`; whether the key was new.
    pub fn put(&self, key: impl AsRef<[u8]>, record: &M) -> Result<bool> {
        Ok(self.tree.insert(key, record.encode_to_vec())?.is_none())
    }

    /// Every record, in key order.
    pub fn all(&self) -> Result<Vec<M>> {
        self.tree.iter()?.map(|kv| decode(&kv?.1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use updraft_proto::v1::Group;

    use super::*;

    #[test]
    fn records_go_in_and_come_out_typed_and_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_embedded(dir.path()).unwrap();
        let groups: Table<Group> = Table::open(&db, "groups").unwrap();
        let g = |name: &str| Group { name: name.into(), ..Default::default() };
        assert!(groups.put("b", &g("b")).unwrap());
        assert!(groups.put("a", &g("a")).unwrap());
        assert!(!groups.put("a", &g("a")).unwrap(), "a second write of a key is not new");
        assert_eq!(groups.get("a").unwrap(), Some(g("a")));
        assert_eq!(groups.all().unwrap(), vec![g("a"), g("b")]);
        // Bytes that are no record of the type are corruption, said as such.
        groups.insert("c", [0xff, 0xff]).unwrap();
        assert!(matches!(groups.get("c"), Err(ProviderError::Store(m)) if m.contains("corrupt record")));
    }
}
