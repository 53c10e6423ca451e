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
//! Keys already past their deadline may be present; an importer drops
//! them.

use std::collections::{HashMap, VecDeque};

use crate::db::{Db, Entry, Value};

pub const KV1: &str = "kv/1";
pub const KV2: &str = "kv/2";

/// The formats this build imports, most preferred first.
pub fn importable() -> Vec<String> {
    if cfg!(feature = "v2") {
        vec![KV2.into(), KV1.into()]
    } else {
        vec![KV1.into()]
    }
}

/// The formats this build can export now: kv-v2 offers `kv/1` only while
/// no key holds a hash, so a rollback to kv stays possible until then.
pub fn exportable(db: &Db) -> Vec<String> {
    match (cfg!(feature = "v2"), db.hash_count()) {
        (false, _) => vec![KV1.into()],
        (true, 0) => vec![KV2.into(), KV1.into()],
        (true, _) => vec![KV2.into()],
    }
}

fn magic(format: &str) -> Result<&'static [u8; 4], String> {
    match format {
        KV1 => Ok(b"KV/1"),
        KV2 if cfg!(feature = "v2") => Ok(b"KV/2"),
        other => Err(format!(
            "this version of kv handles [{}], not {other}",
            importable().join(", ")
        )),
    }
}

pub fn export(db: &Db, conns: &HashMap<u64, Vec<u8>>, format: &str) -> Result<Vec<u8>, String> {
    let magic = magic(format)?;
    if format == KV1 && db.hash_count() > 0 {
        return Err(format!(
            "{} keys hold hashes, which kv/1 cannot carry",
            db.hash_count()
        ));
    }
    let mut out = Vec::with_capacity(64 + db.len() * 32);
    out.extend_from_slice(magic);
    out.extend_from_slice(&(db.len() as u64).to_le_bytes());
    for (key, entry) in db.entries() {
        put_bytes(&mut out, key);
        out.extend_from_slice(&entry.expires_at.unwrap_or(0).to_le_bytes());
        match &entry.value {
            Value::Str(s) => {
                out.push(0);
                put_bytes(&mut out, s);
            }
            Value::List(items) => {
                out.push(1);
                out.extend_from_slice(&(items.len() as u32).to_le_bytes());
                items.iter().for_each(|i| put_bytes(&mut out, i));
            }
            Value::Hash(fields) => {
                out.push(2);
                out.extend_from_slice(&(fields.len() as u32).to_le_bytes());
                for (f, v) in fields {
                    put_bytes(&mut out, f);
                    put_bytes(&mut out, v);
                }
            }
        }
    }
    out.extend_from_slice(&(conns.len() as u64).to_le_bytes());
    for (id, pending) in conns {
        out.extend_from_slice(&id.to_le_bytes());
        put_bytes(&mut out, pending);
    }
    Ok(out)
}

/// Decodes a state in `format`; `now` drops keys already expired.
pub fn import(state: &[u8], format: &str, now: u64) -> Result<(Db, HashMap<u64, Vec<u8>>), String> {
    let magic = magic(format)?;
    let mut r = Reader { buf: state, pos: 0 };
    if r.take(4)? != magic {
        return Err(format!("not a {format} state (bad magic)"));
    }
    let nkeys = r.u64()?;
    // Every key takes at least 17 bytes of state: never reserve more.
    let mut db = Db::with_capacity((nkeys as usize).min(state.len() / 17));
    for _ in 0..nkeys {
        let key = r.bytes()?.to_vec();
        let expires_at = Some(r.u64()?).filter(|&t| t != 0);
        let value = match r.u8()? {
            0 => Value::Str(r.bytes()?.to_vec()),
            1 => {
                let n = r.u32()?;
                let mut items = VecDeque::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push_back(r.bytes()?.to_vec());
                }
                Value::List(items)
            }
            2 if format == KV2 => {
                let n = r.u32()?;
                let mut fields = HashMap::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    let field = r.bytes()?.to_vec();
                    fields.insert(field, r.bytes()?.to_vec());
                }
                Value::Hash(fields)
            }
            t => {
                return Err(format!(
                    "unknown value type {t} for a key in {format} state"
                ));
            }
        };
        if expires_at.is_none_or(|t| t > now) {
            db.insert(key, Entry { value, expires_at });
        }
    }
    let mut conns = HashMap::new();
    for _ in 0..r.u64()? {
        let id = r.u64()?;
        conns.insert(id, r.bytes()?.to_vec());
    }
    if r.pos != state.len() {
        return Err(format!(
            "{} unexpected bytes after the kv/1 state",
            state.len() - r.pos
        ));
    }
    Ok((db, conns))
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("kv/1 state truncated at byte {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut db = Db::default();
        db.insert(
            b"s".to_vec(),
            Entry {
                value: Value::Str(b"v".to_vec()),
                expires_at: Some(5000),
            },
        );
        db.insert(
            b"l".to_vec(),
            Entry {
                value: Value::List(VecDeque::from([b"a".to_vec(), b"b".to_vec()])),
                expires_at: None,
            },
        );
        db.insert(
            b"old".to_vec(),
            Entry {
                value: Value::Str(b"x".to_vec()),
                expires_at: Some(10),
            },
        );
        let conns = HashMap::from([(7, b"*1\r\n$4\r\nPI".to_vec())]);
        let state = export(&db, &conns, KV1).unwrap();
        let (mut back, back_conns) = import(&state, KV1, 100).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.get(b"s", 100).unwrap().expires_at, Some(5000));
        assert_eq!(back_conns, conns);
        assert!(import(&state[..state.len() - 1], KV1, 100).is_err());
        assert!(import(&state, "kv/9", 100).is_err());
    }
}
