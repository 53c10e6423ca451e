//! The index of kv's keys: an insertion-ordered hash map built for fast
//! bulk imports.
//!
//! A plain hash map (IndexMap, hashbrown) of a million keys is one table of
//! several megabytes; building it on import touches a random cache line per
//! key, and that (not parsing, not copying) was most of a swap's pause. This
//! map keeps the entries in one vector in insertion order (the order an
//! export writes and an import restores) and splits the hash index into 256
//! shards by the hash's top bits. An import hashes every key, sorts the
//! entries into shards with one counting pass and builds each shard's
//! table on its own, small enough to stay in cache. A growing map resizes
//! one shard at a time, so no single insert rehashes every key either.
//!
//! Removal is `swap_remove`, as IndexMap's: the last entry takes the
//! removed one's place.

use std::hash::BuildHasher;

use bytes::Bytes;
use hashbrown::HashTable;

const SHARD_BITS: u32 = 8;
const SHARDS: usize = 1 << SHARD_BITS;

/// foldhash: several times faster than SipHash in wasm, seeded per
/// instance so clients cannot predict collisions.
pub type Hasher = foldhash::fast::RandomState;

/// An entry. Its hash is not kept (8 bytes a key): the tables ask for it
/// only when a shard grows or an entry moves, and hashing a key is cheap.
struct Slot<V> {
    key: Bytes,
    value: V,
}

pub struct Keyspace<V> {
    /// Every entry, in insertion order.
    slots: Vec<Slot<V>>,
    /// Per shard: indices into `slots` of the keys whose hash falls in it.
    shards: Box<[HashTable<u32>]>,
    hasher: Hasher,
}

/// Bits 32 to 39 of the hash: hashbrown's tables use the low bits (the
/// bucket) and the top 7 bits of the low machine word (a tag compared
/// before the keys), so a shard chosen by either would put keys with the
/// same bucket or the same tag together.
fn shard_of(hash: u64) -> usize {
    ((hash >> 32) as usize) & (SHARDS - 1)
}

impl<V> Default for Keyspace<V> {
    fn default() -> Self {
        Keyspace::with_capacity(0)
    }
}

impl<V> Keyspace<V> {
    pub fn with_capacity(n: usize) -> Keyspace<V> {
        Keyspace {
            slots: Vec::with_capacity(n),
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
            hasher: Hasher::default(),
        }
    }

    /// Starts a bulk build of about `n` entries: [`Building::push`] them
    /// in order, then [`Building::finish`] indexes them.
    pub fn building(n: usize) -> Building<V> {
        Building {
            map: Keyspace::with_capacity(n),
            hashes: Vec::with_capacity(n),
            counts: vec![0; SHARDS + 1],
        }
    }
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    fn find(&self, key: &[u8]) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        self.shards[shard_of(hash)]
            .find(hash, |&i| slots[i as usize].key == key)
            .map(|&i| i as usize)
    }

    pub fn get(&self, key: &[u8]) -> Option<&V> {
        self.find(key).map(|i| &self.slots[i].value)
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        self.find(key).map(|i| &mut self.slots[i].value)
    }

    /// Inserts or replaces; a replaced key keeps its position (and its
    /// original key bytes) and the old value is returned.
    pub fn insert(&mut self, key: Bytes, value: V) -> Option<V> {
        let hash = self.hasher.hash_one(&key[..]);
        let Keyspace {
            slots,
            shards,
            hasher,
        } = self;
        let table = &mut shards[shard_of(hash)];
        let same = |&i: &u32| slots[i as usize].key == key;
        if let Some(&i) = table.find(hash, same) {
            return Some(std::mem::replace(&mut slots[i as usize].value, value));
        }
        let i = u32::try_from(slots.len()).expect("more than 4 billion keys");
        table.insert_unique(hash, i, |&j| hasher.hash_one(&slots[j as usize].key[..]));
        slots.push(Slot { key, value });
        None
    }

    /// Removes `key`; the last entry moves into its place.
    pub fn swap_remove(&mut self, key: &[u8]) -> Option<V> {
        let hash = self.hasher.hash_one(key);
        let Keyspace {
            slots,
            shards,
            hasher,
        } = self;
        let found = shards[shard_of(hash)]
            .find_entry(hash, |&i| slots[i as usize].key == key)
            .ok()?;
        let (i, _) = found.remove();
        let last = slots.len() - 1;
        if i as usize != last {
            let moved = hasher.hash_one(&slots[last].key[..]);
            let index = shards[shard_of(moved)]
                .find_mut(moved, |&j| j as usize == last)
                .expect("every slot is indexed");
            *index = i;
        }
        Some(slots.swap_remove(i as usize).value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &V)> {
        self.slots.iter().map(|s| (&s.key, &s.value))
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.shards.iter_mut().for_each(HashTable::clear);
    }
}

/// A map being built from entries in order (an import).
pub struct Building<V> {
    map: Keyspace<V>,
    /// Each entry's hash and index, in entry order.
    hashes: Vec<(u64, u32)>,
    /// `counts[s + 1]`: how many entries fall in shard `s`.
    counts: Vec<u32>,
}

impl<V> Building<V> {
    pub fn push(&mut self, key: Bytes, value: V) {
        let hash = self.map.hasher.hash_one(&key[..]);
        self.counts[shard_of(hash) + 1] += 1;
        let i = u32::try_from(self.map.slots.len()).expect("more than 4 billion keys");
        self.hashes.push((hash, i));
        self.map.slots.push(Slot { key, value });
    }

    /// Indexes the entries: sorts their hashes by shard (a counting sort,
    /// so each shard's are together) and builds each shard's table from
    /// them, without touching the entries unless two hashes look alike.
    pub fn finish(self) -> Keyspace<V> {
        let Building {
            mut map,
            hashes,
            mut counts,
        } = self;
        for s in 1..=SHARDS {
            counts[s] += counts[s - 1];
        }
        let mut sorted = vec![(0u64, 0u32); hashes.len()];
        let mut next = counts.clone();
        for &(hash, i) in &hashes {
            let s = shard_of(hash);
            sorted[next[s] as usize] = (hash, i);
            next[s] += 1;
        }
        drop(hashes);
        let mut duplicates = false;
        let Keyspace {
            slots,
            shards,
            hasher,
        } = &mut map;
        for (s, table) in shards.iter_mut().enumerate() {
            let members = &sorted[counts[s] as usize..counts[s + 1] as usize];
            *table = HashTable::with_capacity(members.len());
            for &(hash, i) in members {
                let key = &slots[i as usize].key;
                if table
                    .find(hash, |&j| slots[j as usize].key == key)
                    .is_some()
                {
                    duplicates = true;
                    continue;
                }
                table.insert_unique(hash, i, |&j| hasher.hash_one(&slots[j as usize].key[..]));
            }
        }
        if duplicates {
            // No writer writes a key twice; rebuild the slow way, which
            // keeps the first position and the last value.
            let slots = std::mem::take(&mut map.slots);
            let mut again = Keyspace::with_capacity(slots.len());
            again.hasher = map.hasher;
            for slot in slots {
                again.insert(slot.key, slot.value);
            }
            return again;
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> Bytes {
        Bytes::from(format!("key:{i}"))
    }

    #[test]
    fn behaves_like_an_ordered_map() {
        let mut map = Keyspace::default();
        for i in 0..2000 {
            assert_eq!(map.insert(key(i), i), None);
        }
        assert_eq!(map.insert(key(5), 55), Some(5));
        assert_eq!(map.get(b"key:5"), Some(&55));
        // Removing moves the last entry into the hole, as IndexMap does.
        assert_eq!(map.swap_remove(b"key:3"), Some(3));
        assert_eq!(map.swap_remove(b"key:3"), None);
        assert_eq!(map.len(), 1999);
        let order: Vec<_> = map.iter().take(5).map(|(_, v)| *v).collect();
        assert_eq!(order, [0, 1, 2, 1999, 4]);
        assert_eq!(map.get(b"key:1999"), Some(&1999));
        *map.get_mut(b"key:1999").unwrap() = 7;
        assert_eq!(map.get(b"key:1999"), Some(&7));
        for i in (0..2000).filter(|&i| i != 3) {
            assert!(map.swap_remove(&key(i)).is_some(), "key {i}");
        }
        assert_eq!(map.len(), 0);
        map.insert(key(1), 1);
        map.clear();
        assert_eq!(map.get(b"key:1"), None);
    }

    fn built<V>(entries: impl IntoIterator<Item = (Bytes, V)>) -> Keyspace<V> {
        let mut building = Keyspace::building(0);
        entries.into_iter().for_each(|(k, v)| building.push(k, v));
        building.finish()
    }

    #[test]
    fn bulk_build_keeps_order_and_the_last_duplicate() {
        let map = built((0..5000).map(|i| (key(i), i)));
        assert!(map.iter().map(|(_, v)| *v).eq(0..5000));
        assert!((0..5000).all(|i| map.get(&key(i)) == Some(&i)));
        let dup = [(key(1), 1), (key(2), 2), (key(1), 3)];
        let map = built(dup);
        assert_eq!(map.len(), 2);
        let order: Vec<_> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(order, [(key(1), 3), (key(2), 2)]);
    }
}
