//! The keyspace: values, expiry, and the bookkeeping for active expiry.
//!
//! Keys, strings and list items are [`Bytes`]: an imported state keeps its
//! keys and values where they are, in the imported buffer (no allocation
//! per key), and a write replaces a value with a buffer of its own. The
//! imported buffer is freed when the last key or value in it is.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use bytes::Bytes;
use indexmap::IndexMap;

use crate::keyspace::Keyspace;

/// The map kv-v2 keeps a hash's fields in: insertion-ordered, so an export
/// lists them in an order the import restores (a state exported, imported
/// and exported again is the same bytes).
pub type Map<V> = IndexMap<Bytes, V, crate::keyspace::Hasher>;

/// A stored value. Hashes exist only in kv-v2 (the `v2` feature); kv
/// never creates one.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(Bytes),
    List(VecDeque<Bytes>),
    Hash(Box<Map<Bytes>>),
}

fn is_hash(entry: &Entry) -> bool {
    matches!(entry.value, Value::Hash(_))
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub value: Value,
    /// Wall-clock deadline in Unix milliseconds.
    pub expires_at: Option<u64>,
}

/// All keys, with lazy expiry on access and a deadline heap for the
/// periodic sweep.
#[derive(Default)]
pub struct Db {
    map: Keyspace<Entry>,
    /// (deadline, key) for every deadline ever set; stale pairs (the key's
    /// deadline changed or it was deleted) are skipped when popped.
    deadlines: BinaryHeap<Reverse<(u64, Bytes)>>,
    /// How many keys hold a hash (kv-v2 can export `kv/1` only at zero).
    hashes: usize,
}

impl Db {
    /// The keyspace of an import, built by [`Keyspace::building`].
    pub fn from_keyspace(map: Keyspace<Entry>) -> Db {
        let mut deadlines = Vec::new();
        let mut hashes = 0;
        for (key, entry) in map.iter() {
            if let Some(t) = entry.expires_at {
                deadlines.push(Reverse((t, key.clone())));
            }
            hashes += usize::from(is_hash(entry));
        }
        Db {
            map,
            deadlines: BinaryHeap::from(deadlines),
            hashes,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// How many keys hold a hash (expired ones included until swept).
    pub fn hash_count(&self) -> usize {
        self.hashes
    }

    /// Counts a removed entry out.
    fn forget(&mut self, entry: &Entry) {
        if is_hash(entry) {
            self.hashes -= 1;
        }
    }

    /// Whether any key has a deadline (so the sweep timer is needed).
    pub fn has_deadlines(&self) -> bool {
        !self.deadlines.is_empty()
    }

    /// The live entry for `key`; an expired one is deleted first.
    pub fn get(&mut self, key: &[u8], now: u64) -> Option<&mut Entry> {
        let expired = match self.map.get(key) {
            None => return None,
            Some(e) => e.expires_at.is_some_and(|t| t <= now),
        };
        if expired {
            let entry = self.map.swap_remove(key).expect("present");
            self.forget(&entry);
            return None;
        }
        self.map.get_mut(key)
    }

    pub fn contains(&mut self, key: &[u8], now: u64) -> bool {
        self.get(key, now).is_some()
    }

    pub fn insert(&mut self, key: Bytes, entry: Entry) {
        if let Some(t) = entry.expires_at {
            self.deadlines.push(Reverse((t, key.clone())));
        }
        if is_hash(&entry) {
            self.hashes += 1;
        }
        if let Some(old) = self.map.insert(key, entry) {
            self.forget(&old);
        }
    }

    /// Sets `key` to `entry`, copying the key only when it is new (SET on
    /// an existing key allocates nothing for the key).
    pub fn put(&mut self, key: &[u8], entry: Entry) {
        match self.map.get_mut(key) {
            Some(slot) => {
                if let Some(t) = entry.expires_at {
                    self.deadlines
                        .push(Reverse((t, Bytes::copy_from_slice(key))));
                }
                if is_hash(&entry) {
                    self.hashes += 1;
                }
                let old = std::mem::replace(slot, entry);
                self.forget(&old);
            }
            None => self.insert(Bytes::copy_from_slice(key), entry),
        }
    }

    pub fn remove(&mut self, key: &[u8], now: u64) -> Option<Entry> {
        let entry = self.map.swap_remove(key)?;
        self.forget(&entry);
        entry.expires_at.is_none_or(|t| t > now).then_some(entry)
    }

    /// Sets or clears `key`'s deadline. The key must exist.
    pub fn set_expiry(&mut self, key: &[u8], at: Option<u64>) {
        if let Some(entry) = self.map.get_mut(key) {
            entry.expires_at = at;
            if let Some(t) = at {
                self.deadlines
                    .push(Reverse((t, Bytes::copy_from_slice(key))));
            }
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.deadlines.clear();
        self.hashes = 0;
    }

    /// Live keys, in the map's order.
    pub fn keys(&self, now: u64) -> impl Iterator<Item = &Bytes> {
        self.map
            .iter()
            .filter(move |(_, e)| e.expires_at.is_none_or(|t| t > now))
            .map(|(k, _)| k)
    }

    /// Every entry, expired or not, in the map's order (for export).
    pub fn entries(&self) -> impl Iterator<Item = (&Bytes, &Entry)> {
        self.map.iter()
    }

    /// Deletes up to `budget` keys whose deadline has passed.
    pub fn sweep(&mut self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        while removed < budget {
            match self.deadlines.peek() {
                Some(Reverse((t, _))) if *t <= now => {}
                _ => break,
            }
            let Reverse((t, key)) = self.deadlines.pop().expect("peeked");
            if self.map.get(&key).is_some_and(|e| e.expires_at == Some(t)) {
                let entry = self.map.swap_remove(&key).expect("present");
                self.forget(&entry);
                removed += 1;
            }
        }
        removed
    }
}

/// Redis-style glob matching for KEYS: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`,
/// and `\` to escape.
// Collapsing the escape arm's `if` into its guard would let an unmatched
// escape fall through to the literal arm.
#[allow(clippy::collapsible_match)]
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(pattern, p, text[t])
                        && matched
                    {
                        p = next;
                        t += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == text[t] {
                        p += 2;
                        t += 1;
                        continue;
                    }
                }
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pattern[open] == '['`;
/// returns whether it matched and the index after `]`.
fn class_match(pattern: &[u8], open: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = open + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    while i < pattern.len() && pattern[i] != b']' {
        if pattern[i] == b'\\' && i + 1 < pattern.len() {
            matched |= pattern[i + 1] == c;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (lo, hi) = (
                pattern[i].min(pattern[i + 2]),
                pattern[i].max(pattern[i + 2]),
            );
            matched |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            matched |= pattern[i] == c;
            i += 1;
        }
    }
    (i < pattern.len()).then_some((matched != negate, i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"*", b"anything"));
        assert!(glob_match(b"user:*", b"user:42"));
        assert!(!glob_match(b"user:*", b"session:1"));
        assert!(glob_match(b"h?llo", b"hello"));
        assert!(glob_match(b"h[ae]llo", b"hallo"));
        assert!(!glob_match(b"h[^e]llo", b"hello"));
        assert!(glob_match(b"h[a-c]llo", b"hbllo"));
        assert!(glob_match(b"a\\*b", b"a*b"));
        assert!(glob_match(b"*b*c", b"aabxxc"));
    }

    #[test]
    fn put_replaces_in_place_and_counts_hashes() {
        let entry = |value| Entry {
            value,
            expires_at: None,
        };
        let mut db = Db::default();
        db.put(b"a", entry(Value::Str(Bytes::from_static(b"1"))));
        db.put(b"b", entry(Value::Hash(Box::default())));
        db.put(b"a", entry(Value::Str(Bytes::from_static(b"2"))));
        assert_eq!(db.len(), 2);
        assert_eq!(db.hash_count(), 1);
        let keys: Vec<&[u8]> = db.keys(0).map(|k| &k[..]).collect();
        assert_eq!(keys, [&b"a"[..], b"b"], "a replaced key keeps its place");
        db.put(b"b", entry(Value::Str(Bytes::from_static(b"3"))));
        assert_eq!(db.hash_count(), 0, "the replaced hash is counted out");
        assert!(matches!(&db.get(b"a", 0).unwrap().value, Value::Str(v) if &v[..] == b"2"));
    }

    #[test]
    fn expiry_is_lazy_and_swept() {
        let mut db = Db::default();
        db.insert(
            Bytes::from_static(b"a"),
            Entry {
                value: Value::Str(Bytes::from_static(b"1")),
                expires_at: Some(100),
            },
        );
        db.insert(
            Bytes::from_static(b"b"),
            Entry {
                value: Value::Str(Bytes::from_static(b"2")),
                expires_at: None,
            },
        );
        assert!(db.contains(b"a", 99));
        assert_eq!(db.sweep(100, 10), 1);
        assert!(!db.contains(b"a", 50));
        assert_eq!(db.len(), 1);
    }
}
