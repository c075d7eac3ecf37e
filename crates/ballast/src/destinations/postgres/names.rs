//! Column names without a string per value: a row's columns ([`Cols`]) and the names a
//! thread has made lately ([`Names`]), so a key seen before costs two hash lookups, not a
//! snake-casing, a join and a check that each allocate, and rows of one table share
//! their names (the encoder recognises a column by its name's address).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::schema::{name_part, safe_name, Val};

/// A column name, shared by every row that has the column.
pub type Name = Arc<str>;

pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// A row's columns in the order they were set, each once.
#[derive(Debug, Clone, Default)]
pub struct Cols(Vec<(Name, Val)>);

impl Cols {
    fn position(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|(k, _)| **k == *name)
    }

    pub fn get(&self, name: &str) -> Option<&Val> {
        self.position(name).map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Sets `name` (replacing its value when it is there); returns the old value.
    pub fn insert(&mut self, name: impl Into<Name>, v: Val) -> Option<Val> {
        let name = name.into();
        match self.position(&name) {
            Some(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            None => {
                self.0.push((name, v));
                None
            }
        }
    }

    /// Adds a column the caller knows the row does not have yet.
    pub(crate) fn push_new(&mut self, name: Name, v: Val) {
        debug_assert!(!self.contains_key(&name), "{name} twice");
        self.0.push((name, v));
    }

    /// These columns in a vector of their own size; `self` is left empty, its room kept.
    pub(crate) fn take_exact(&mut self) -> Cols {
        Cols(self.0.drain(..).collect())
    }

    /// Sets every column of `other`: replacing the value there when `replace`, else only
    /// adding what is missing. One hash per column (rows can have many).
    pub(crate) fn merge(&mut self, other: Cols, replace: bool) {
        let mut at: FastMap<Name, usize> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        for (k, v) in other.0 {
            match at.get(&k) {
                Some(&i) => {
                    if replace {
                        self.0[i].1 = v;
                    }
                }
                None => {
                    at.insert(k.clone(), self.0.len());
                    self.0.push((k, v));
                }
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Val> {
        self.position(name).map(|i| self.0.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Name, &Val)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &Name> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &Val> {
        self.0.iter().map(|(_, v)| v)
    }
}

/// Same columns with the same values, in any order.
impl PartialEq for Cols {
    fn eq(&self, other: &Cols) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl std::ops::Index<&str> for Cols {
    type Output = Val;

    /// Panics when the row has no such column (as a map's index does).
    fn index(&self, name: &str) -> &Val {
        match self.get(name) {
            Some(v) => v,
            None => panic!("no column {name:?}"),
        }
    }
}

/// Later values of a name replace earlier ones (as a map's would).
impl<K: Into<Name>> FromIterator<(K, Val)> for Cols {
    fn from_iter<I: IntoIterator<Item = (K, Val)>>(iter: I) -> Cols {
        let mut c = Cols::default();
        for (k, v) in iter {
            c.insert(k, v);
        }
        c
    }
}

impl IntoIterator for Cols {
    type Item = (Name, Val);
    type IntoIter = std::vec::IntoIter<(Name, Val)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Cols {
    type Item = (&'a Name, &'a Val);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Name, Val)>,
        fn(&'a (Name, Val)) -> (&'a Name, &'a Val),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// What a key under a prefix becomes.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    /// The named path (`context_page_path`): the prefix of nested keys.
    pub path: Name,
    /// The path as a column name ([`safe_name`]).
    pub column: Name,
}

/// Keeps at most about this many names and key bytes; past it, starts afresh.
const MAX_ENTRIES: usize = 100_000;
const MAX_BYTES: usize = 16 << 20;

/// The names one thread has made: keys under a prefix → path and column name, exact
/// names, event names → table names. Bounded: past [`MAX_ENTRIES`] entries or
/// [`MAX_BYTES`] of keys it forgets everything (only between events: names from one
/// event are all from the same generation).
#[derive(Debug, Default)]
pub struct Names {
    /// Prefix (`""`, `context`, `context_page`) → key as sent → what it becomes.
    keys: FastMap<Name, FastMap<Box<str>, Key>>,
    exact: FastSet<Name>,
    tables: FastMap<Box<str>, Option<Name>>,
    /// An empty set and an empty row to build a row with (their room kept between rows).
    set: FastSet<Name>,
    cols: Cols,
    entries: usize,
    bytes: usize,
}

impl Names {
    /// Forgets everything when over its bounds. Called between events.
    pub fn trim(&mut self) {
        if self.entries > MAX_ENTRIES || self.bytes > MAX_BYTES {
            *self = Names::default();
        }
    }

    /// An empty set of names (give it back with [`Self::give_set`]).
    pub(crate) fn take_set(&mut self) -> FastSet<Name> {
        std::mem::take(&mut self.set)
    }

    pub(crate) fn give_set(&mut self, mut set: FastSet<Name>) {
        set.clear();
        if set.capacity() <= 1024 {
            self.set = set;
        }
    }

    /// An empty row to build (give it back with [`Self::give_cols`]).
    pub(crate) fn take_cols(&mut self) -> Cols {
        std::mem::take(&mut self.cols)
    }

    /// The columns built in `cols`, in a vector of their own size; `cols` is kept.
    pub(crate) fn give_cols(&mut self, mut cols: Cols) -> Cols {
        let exact = cols.take_exact();
        if cols.0.capacity() <= 1024 {
            self.cols = cols;
        }
        exact
    }

    fn count(&mut self, bytes: usize) {
        self.entries += 1;
        self.bytes += bytes;
    }

    /// `name` itself, shared.
    pub fn exact(&mut self, name: &str) -> Name {
        if let Some(n) = self.exact.get(name) {
            return n.clone();
        }
        let n: Name = Arc::from(name);
        self.count(name.len());
        self.exact.insert(n.clone());
        n
    }

    /// What `key` of an object flattened under `prefix` becomes.
    pub(crate) fn key(&mut self, prefix: &str, key: &str) -> Key {
        if let Some(k) = self.keys.get(prefix).and_then(|m| m.get(key)) {
            return k.clone();
        }
        let part = name_part(key);
        let path = if prefix.is_empty() {
            part
        } else {
            format!("{prefix}_{part}")
        };
        let column = safe_name(&path);
        let k = Key {
            column: self.exact(&column),
            path: self.exact(&path),
        };
        self.count(prefix.len() + key.len());
        let prefix = self.exact(prefix);
        self.keys
            .entry(prefix)
            .or_default()
            .insert(key.into(), k.clone());
        k
    }

    /// The table of track events called `event` ([`super::schema::event_table`]).
    pub fn event_table(&mut self, event: &str) -> Option<Name> {
        if let Some(t) = self.tables.get(event) {
            return t.clone();
        }
        let t = super::schema::event_table(event).map(|t| self.exact(&t));
        self.count(event.len());
        self.tables.insert(event.into(), t.clone());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_made_once() {
        let mut n = Names::default();
        let a = n.exact("plan");
        let b = n.exact("plan");
        assert!(Arc::ptr_eq(&a, &b));
        let k = n.key("context", "userAgent");
        assert_eq!(&*k.path, "context_user_agent");
        assert_eq!(&*k.column, "context_user_agent");
        let again = n.key("context", "userAgent");
        assert!(Arc::ptr_eq(&k.column, &again.column));
        // The same column from another key is the same name.
        let other = n.key("context", "user_agent");
        assert!(Arc::ptr_eq(&k.column, &other.column));
    }

    #[test]
    fn keys_become_what_the_rules_say() {
        let mut n = Names::default();
        for (prefix, key) in [
            ("", "productID"),
            ("", "1st"),
            ("", "order"),
            ("", "!!!"),
            ("", ""),
            ("", "\0"),
            ("", "注文完了"),
            ("context", "Order"),
            ("context", "😀"),
            ("context_page", "x y"),
            ("", &"k".repeat(100)),
        ] {
            let k = n.key(prefix, key);
            let part = name_part(key);
            assert!(!part.is_empty());
            let path = if prefix.is_empty() {
                part
            } else {
                format!("{prefix}_{part}")
            };
            assert_eq!(&*k.path, path, "{prefix:?} {key:?}");
            assert_eq!(&*k.column, safe_name(&path), "{prefix:?} {key:?}");
        }
        assert_eq!(&*n.key("", "order").column, "_order");
        assert_eq!(&*n.key("", "注文完了").column, "zhu_wen_wan_liao");
        // Nothing left of the key: `_` and a hash of it, different keys apart.
        let bang = n.key("", "!!!").column;
        let nul = n.key("", "\0").column;
        assert!(bang.starts_with('_') && bang.len() == 9, "{bang}");
        assert_ne!(bang, nul);
        assert_eq!(
            n.event_table("Order Completed").as_deref(),
            Some("order_completed")
        );
        assert_eq!(n.event_table("users").as_deref(), Some("_users"));
        assert_eq!(n.event_table("!!!").as_deref(), Some(&*bang));
        assert_eq!(n.event_table(""), None);
    }

    #[test]
    fn forgets_past_its_bounds() {
        let mut n = Names::default();
        let first = n.exact("first");
        for i in 0..=MAX_ENTRIES {
            n.key("", &format!("k{i}"));
        }
        n.trim();
        assert_eq!(n.entries, 0);
        let again = n.exact("first");
        assert_eq!(first, again);
        assert!(!Arc::ptr_eq(&first, &again));
        let mut n = Names::default();
        n.key("", &"x".repeat(MAX_BYTES + 1));
        n.trim();
        assert_eq!(n.bytes, 0);
    }

    #[test]
    fn cols_behave_like_a_map() {
        let mut c: Cols = [("b", Val::Int(1)), ("a", Val::Int(2)), ("b", Val::Int(3))]
            .into_iter()
            .collect();
        assert_eq!(c.len(), 2);
        assert_eq!(c["b"], Val::Int(3));
        assert_eq!(c.insert("a", Val::Int(4)), Some(Val::Int(2)));
        assert_eq!(c.insert("c", Val::Bool(true)), None);
        assert_eq!(c.remove("b"), Some(Val::Int(3)));
        assert!(!c.contains_key("b"));
        assert_eq!(c.keys().map(|k| &**k).collect::<Vec<_>>(), ["a", "c"]);
        let same: Cols = [("c", Val::Bool(true)), ("a", Val::Int(4))]
            .into_iter()
            .collect();
        assert_eq!(c, same);
        assert_ne!(c, Cols::default());
        assert_eq!(c.get("z"), None);
    }

    #[test]
    fn merging_replaces_or_fills() {
        let cols = |kv: &[(&str, i64)]| -> Cols {
            kv.iter()
                .map(|(k, v)| (k.to_string(), Val::Int(*v)))
                .collect()
        };
        let mut a = cols(&[("x", 1), ("y", 2)]);
        a.merge(cols(&[("y", 20), ("z", 30)]), false);
        assert_eq!(a, cols(&[("x", 1), ("y", 2), ("z", 30)]));
        a.merge(cols(&[("x", 10), ("w", 40)]), true);
        assert_eq!(a, cols(&[("x", 10), ("y", 2), ("z", 30), ("w", 40)]));
        assert_eq!(a.len(), 4);
    }
}
