//! The `kv/1` and `kv/2` state formats: the whole keyspace and every
//! connection's unparsed bytes, in a simple binary layout any language can
//! read. `kv/2` (kv-v2) is `kv/1` plus hashes.
//!
//! All integers are little-endian. `bytes` is a `u32` length followed by
//! that many bytes.
//!
//! ```text
//! magic      4 bytes   "KV/1" (or "KV/2")
//! nkeys      u64
//! nkeys times:
//!   key      bytes
//!   expires  u64       deadline in Unix milliseconds (wall clock); 0 = none
//!   type     u8        0 = string, 1 = list, 2 = hash (kv/2)
//!   string:  bytes
//!   list:    u32 count, then count times: bytes   (head first)
//!   hash:    u32 count, then count times: field bytes, value bytes
//!            (type 2, kv/2 only)
//! nconns     u64
//! nconns times:
//!   conn     u64       the host's connection id
//!   pending  bytes     bytes received but not yet a whole command
//! ```
//!
//! A key whose deadline is at or before the current time (`expires <= now`)
//! is expired. Keys already past their deadline may be present; they count as absent.
//! An importer may drop them or keep them for its own expiry (kv keeps
//! them, so that importing a state and exporting it again gives the same
//! bytes).
//!
//! Keys are written in kv's map order, which the import restores: kv's
//! export of an imported state is byte for byte the state it imported.
//! Connections are written in increasing id order; every open connection
//! is listed, with an empty `pending` if it has no unparsed bytes (an open
//! connection missing from the list has none). A writer never writes a key
//! or a connection twice, nor an empty list (Redis deletes a list when its
//! last element goes); an importer keeps the last of duplicates.
//!
//! An importer rejects, with an error naming the byte offset: a magic that
//! is not the format's, a value type the format does not have (type 2 in
//! `kv/1`), a state that ends early, and bytes after the last connection.
//!
//! Timers move with the service: kv's expiry sweep is timer token 1, armed
//! while any key has a deadline, and it stays armed across a swap. An
//! importer must accept `on-timer(1)` (and should arm token 1 for its own
//! sweep if the imported keys have deadlines, as kv does).

use std::collections::VecDeque;

use bytes::Bytes;
use wasmhost_guest::state::{Formats, Pending, Reader, Writer};

use crate::Kv;
use crate::db::{Db, Entry, Map, Value};
use crate::keyspace::Keyspace;

pub const KV1: &str = "kv/1";
pub const KV2: &str = "kv/2";

/// The formats this build handles, most preferred first: kv-v2 imports
/// both and exports `kv/1` only while no key holds a hash, so a rollback to
/// kv stays possible until then.
pub fn formats() -> Formats<Kv> {
    let kv1 = Formats::<Kv>::new();
    let kv1 = if cfg!(feature = "v2") {
        kv1.format(KV2, |kv, p| export(&kv.db, p, KV2), |s| import(s, KV2))
    } else {
        kv1
    };
    kv1.format(KV1, |kv, p| export(&kv.db, p, KV1), |s| import(s, KV1))
        .offered_while(|kv| kv.db.hash_count() == 0)
}

fn magic(format: &str) -> &'static [u8; 4] {
    if format == KV2 { b"KV/2" } else { b"KV/1" }
}

pub fn export(db: &Db, pending: &Pending, format: &str) -> Result<Vec<u8>, String> {
    if format == KV1 && db.hash_count() > 0 {
        return Err(format!(
            "{} keys hold hashes, which kv/1 cannot carry",
            db.hash_count()
        ));
    }
    let mut w = Writer::with_capacity(exported_size(db, pending));
    w.raw(magic(format)).u64(db.len() as u64);
    for (key, entry) in db.entries() {
        w.bytes(key).u64(entry.expires_at.unwrap_or(0));
        match &entry.value {
            Value::Str(s) => w.u8(0).bytes(s),
            Value::List(items) => {
                w.u8(1).u32(items.len() as u32);
                items.iter().fold(&mut w, |w, item| w.bytes(item))
            }
            Value::Hash(fields) => {
                w.u8(2).u32(fields.len() as u32);
                fields.iter().fold(&mut w, |w, (f, v)| w.bytes(f).bytes(v))
            }
        };
    }
    w.u64(pending.len() as u64);
    for (conn, bytes) in pending {
        w.u64(*conn).bytes(bytes);
    }
    Ok(w.finish())
}

/// The exact length of [`export`]'s output, so it is written into one
/// buffer of the right size.
fn exported_size(db: &Db, pending: &Pending) -> usize {
    let values: usize = db
        .entries()
        .map(|(key, entry)| {
            4 + key.len()
                + 9
                + match &entry.value {
                    Value::Str(s) => 4 + s.len(),
                    Value::List(items) => 4 + items.iter().map(|i| 4 + i.len()).sum::<usize>(),
                    Value::Hash(fields) => {
                        4 + fields
                            .iter()
                            .map(|(f, v)| 8 + f.len() + v.len())
                            .sum::<usize>()
                    }
                }
        })
        .sum();
    let conns: usize = pending.values().map(|p| 12 + p.len()).sum();
    4 + 8 + values + 8 + conns
}

/// Decodes a state in `format`. Keys, strings, list items and hash fields
/// stay in `state`'s buffer (slices of it, no copy).
pub fn import(state: Vec<u8>, format: &str) -> Result<(Kv, Pending), String> {
    let state = Bytes::from(state);
    let mut r = Reader::new(&state);
    let slice = |b: &[u8]| state.slice_ref(b);
    r.magic(magic(format))?;
    // Every key takes at least 17 bytes (length, deadline, type).
    let nkeys = r.count(17)?;
    let mut keyspace = Keyspace::building(nkeys);
    for _ in 0..nkeys {
        let key = slice(r.bytes()?);
        let expires_at = Some(r.u64()?).filter(|&t| t != 0);
        let at = r.offset();
        let value = match r.u8()? {
            0 => Value::Str(slice(r.bytes()?)),
            1 => {
                let n = r.u32()?;
                let mut items = VecDeque::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push_back(slice(r.bytes()?));
                }
                Value::List(items)
            }
            2 if format == KV2 => {
                let n = r.u32()?;
                let mut fields =
                    Map::with_capacity_and_hasher(n.min(1 << 16) as usize, Default::default());
                for _ in 0..n {
                    let field = slice(r.bytes()?);
                    fields.insert(field, slice(r.bytes()?));
                }
                Value::Hash(Box::new(fields))
            }
            t => return Err(format!("unknown value type {t} at byte {at}")),
        };
        keyspace.push(key, Entry { value, expires_at });
    }
    let db = Db::from_keyspace(keyspace.finish());
    let mut pending = Pending::new();
    for _ in 0..r.count(12)? {
        let conn = r.u64()?;
        pending.insert(conn, r.bytes()?.to_vec());
    }
    r.finish()?;
    Ok((Kv::with_db(db), pending))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_byte_for_byte() {
        let mut db = Db::default();
        let entry = |value, expires_at| Entry { value, expires_at };
        let b = Bytes::from_static;
        db.insert(b(b"s"), entry(Value::Str(b(b"v")), Some(5000)));
        let list = VecDeque::from([b(b"a"), b(b"b")]);
        db.insert(b(b"l"), entry(Value::List(list), None));
        db.insert(b(b"old"), entry(Value::Str(b(b"x")), Some(10)));
        let pending = Pending::from([(7, b"*1\r\n$4\r\nPI".to_vec()), (9, Vec::new())]);
        let state = export(&db, &pending, KV1).unwrap();
        assert_eq!(
            state.capacity(),
            state.len(),
            "written into a buffer of the exact size"
        );
        let (back, back_pending) = import(state.clone(), KV1).unwrap();
        assert_eq!(back.db.len(), 3, "expired keys are kept until swept");
        assert_eq!(back_pending, pending);
        assert_eq!(export(&back.db, &back_pending, KV1).unwrap(), state);
        let err = import(state[..state.len() - 1].to_vec(), KV1)
            .err()
            .unwrap();
        assert!(err.contains("truncated"), "{err}");
    }

    /// A state written by hand from the layout above, as another language
    /// would write it.
    #[test]
    fn reads_the_documented_layout() {
        let mut s = b"KV/1".to_vec();
        s.extend(1u64.to_le_bytes());
        s.extend(1u32.to_le_bytes());
        s.extend(b"k");
        s.extend(0u64.to_le_bytes());
        s.push(1);
        s.extend(2u32.to_le_bytes());
        for item in [&b"x"[..], b"yz"] {
            s.extend((item.len() as u32).to_le_bytes());
            s.extend(item);
        }
        s.extend(1u64.to_le_bytes());
        s.extend(42u64.to_le_bytes());
        s.extend(3u32.to_le_bytes());
        s.extend(b"GET");
        let (kv, pending) = import(s.clone(), KV1).unwrap();
        assert_eq!(kv.db.entries().count(), 1);
        assert_eq!(pending[&42], b"GET");
        assert_eq!(export(&kv.db, &pending, KV1).unwrap(), s);
    }
}
