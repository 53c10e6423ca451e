//! Hash commands (kv-v2 only): HSET, HGET, HDEL, HGETALL, HLEN, HINCRBY.

use bytes::Bytes;

use crate::commands::{Call, NOT_INT, OVERFLOW, WRONGTYPE, parse_int};
use crate::db::{Entry, Value};

type Fields = crate::db::Map<Bytes>;

pub fn execute(call: &mut Call, name: &[u8]) {
    match name {
        b"hset" => hset(call),
        b"hget" => hget(call),
        b"hdel" => hdel(call),
        b"hgetall" => hgetall(call),
        b"hlen" => hlen(call),
        b"hincrby" => hincrby(call),
        _ => unreachable!("dispatched by commands::execute"),
    }
}

/// The hash at `key`: `Ok(None)` if missing, `Err` if another type.
fn hash<'a>(call: &'a mut Call, key: &[u8]) -> Result<Option<&'a mut Fields>, ()> {
    match call.db.get(key, call.now) {
        None => Ok(None),
        Some(Entry {
            value: Value::Hash(h),
            ..
        }) => Ok(Some(&mut **h)),
        Some(_) => Err(()),
    }
}

/// The hash at `key`, created empty if missing.
fn hash_or_new<'a>(call: &'a mut Call, key: &[u8]) -> Result<&'a mut Fields, ()> {
    if hash(call, key)?.is_none() {
        let entry = Entry {
            value: Value::Hash(Box::default()),
            expires_at: None,
        };
        call.db.insert(Bytes::copy_from_slice(key), entry);
    }
    Ok(hash(call, key)?.expect("just created"))
}

fn hset(call: &mut Call) {
    if !call.args.len().is_multiple_of(2) {
        return call
            .out
            .error("ERR wrong number of arguments for 'hset' command");
    }
    let args = call.args;
    let Ok(h) = hash_or_new(call, args[1]) else {
        return call.out.error(WRONGTYPE);
    };
    let added = args[2..]
        .chunks(2)
        .filter(|p| {
            let (field, value) = (Bytes::copy_from_slice(p[0]), Bytes::copy_from_slice(p[1]));
            h.insert(field, value).is_none()
        })
        .count();
    call.out.int(added as i64);
}

fn hget(call: &mut Call) {
    let args = call.args;
    match hash(call, args[1]) {
        Ok(Some(h)) => {
            let v = h.get(args[2]).cloned();
            call.out.opt_bulk(v.as_deref());
        }
        Ok(None) => call.out.nil(),
        Err(()) => call.out.error(WRONGTYPE),
    }
}

fn hdel(call: &mut Call) {
    let args = call.args;
    let (removed, empty) = match hash(call, args[1]) {
        Ok(Some(h)) => (
            args[2..]
                .iter()
                .filter(|f| h.swap_remove(&f[..]).is_some())
                .count(),
            h.is_empty(),
        ),
        Ok(None) => (0, false),
        Err(()) => return call.out.error(WRONGTYPE),
    };
    if empty {
        call.db.remove(args[1], call.now);
    }
    call.out.int(removed as i64);
}

fn hgetall(call: &mut Call) {
    let args = call.args;
    let pairs: Vec<(Bytes, Bytes)> = match hash(call, args[1]) {
        Ok(Some(h)) => h.iter().map(|(f, v)| (f.clone(), v.clone())).collect(),
        Ok(None) => Vec::new(),
        Err(()) => return call.out.error(WRONGTYPE),
    };
    call.out.array(pairs.len() * 2);
    for (f, v) in pairs {
        call.out.bulk(&f);
        call.out.bulk(&v);
    }
}

fn hlen(call: &mut Call) {
    let args = call.args;
    match hash(call, args[1]) {
        Ok(h) => {
            let n = h.map_or(0, |h| h.len());
            call.out.int(n as i64);
        }
        Err(()) => call.out.error(WRONGTYPE),
    }
}

fn hincrby(call: &mut Call) {
    let args = call.args;
    let Some(delta) = parse_int(args[3]) else {
        return call.out.error(NOT_INT);
    };
    let Ok(h) = hash_or_new(call, args[1]) else {
        return call.out.error(WRONGTYPE);
    };
    let current = match h.get(args[2]) {
        None => 0,
        Some(v) => match parse_int(v) {
            Some(n) => n,
            None => return call.out.error("ERR hash value is not an integer"),
        },
    };
    let Some(new) = current.checked_add(delta) else {
        return call.out.error(OVERFLOW);
    };
    h.insert(
        Bytes::copy_from_slice(args[2]),
        Bytes::from(new.to_string()),
    );
    call.out.int(new);
}
