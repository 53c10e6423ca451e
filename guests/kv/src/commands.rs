//! The Redis commands the kv service answers, with Redis's replies and
//! error messages.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::db::{Db, Entry, Value, glob_match};
use crate::resp::Out;

pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
pub const NOT_INT: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";
pub const OVERFLOW: &str = "ERR increment or decrement would overflow";

/// What the connection does after a command.
#[derive(Debug, PartialEq)]
pub enum After {
    Continue,
    /// QUIT: close once the reply is sent.
    Close,
}

/// One command's context.
pub struct Call<'a> {
    pub db: &'a mut Db,
    pub args: &'a [&'a [u8]],
    pub now: u64,
    pub conn: u64,
    pub out: &'a mut Out,
    /// `--config enable-debug-command=yes`: DEBUG may be used.
    pub debug: bool,
}

/// Arity as in Redis's command table: `n` means exactly n arguments
/// (including the name), `-n` at least n.
fn arity(name: &[u8]) -> Option<i32> {
    Some(match name {
        b"get" | b"incr" | b"decr" | b"strlen" | b"keys" | b"ttl" | b"pttl" | b"persist"
        | b"llen" | b"select" | b"type" | b"echo" => 2,
        b"incrby" | b"decrby" | b"append" => 3,
        b"lrange" => 4,
        b"dbsize" => 1,
        b"set" | b"mset" | b"lpush" | b"rpush" | b"expire" | b"pexpire" => -3,
        b"del" | b"exists" | b"mget" | b"lpop" | b"rpop" | b"client" | b"config" | b"debug" => -2,
        b"ping" | b"quit" | b"command" | b"info" | b"hello" | b"flushall" | b"flushdb" => -1,
        #[cfg(feature = "v2")]
        b"hget" => 3,
        #[cfg(feature = "v2")]
        b"hgetall" | b"hlen" => 2,
        #[cfg(feature = "v2")]
        b"hincrby" => 4,
        #[cfg(feature = "v2")]
        b"hset" => -4,
        #[cfg(feature = "v2")]
        b"hdel" => -3,
        _ => return None,
    })
}

pub fn execute(call: &mut Call) -> After {
    // Lower-cased on the stack: every command name is short.
    let mut lower = [0u8; 32];
    let given = call.args[0];
    let name: &[u8] = match lower.get_mut(..given.len()) {
        Some(name) => {
            name.copy_from_slice(given);
            name.make_ascii_lowercase();
            name
        }
        None => b"",
    };
    #[cfg(feature = "odd")]
    if let Some(after) = crate::odd::execute(call, name) {
        return after;
    }
    let Some(arity) = arity(name) else {
        unknown_command(call);
        return After::Continue;
    };
    let argc = call.args.len() as i32;
    if (arity > 0 && argc != arity) || (arity < 0 && argc < -arity) {
        let name = String::from_utf8_lossy(name);
        call.out.error(&format!(
            "ERR wrong number of arguments for '{name}' command"
        ));
        return After::Continue;
    }
    match name {
        b"quit" => {
            call.out.ok();
            return After::Close;
        }
        b"get" => get(call),
        b"set" => set(call),
        b"incr" => incr_by(call, 1),
        b"decr" => incr_by(call, -1),
        b"incrby" | b"decrby" => incr_by_arg(call, name[0] == b'd'),
        b"append" => append(call),
        b"strlen" => strlen(call),
        b"del" => del(call),
        b"exists" => exists(call),
        b"mget" => mget(call),
        b"mset" => mset(call),
        b"keys" => keys(call),
        // As in Redis: keys past their deadline count until reclaimed.
        b"dbsize" => call.out.int(call.db.len() as i64),
        b"flushall" | b"flushdb" => {
            call.db.clear();
            call.out.ok();
        }
        b"expire" => expire(call, 1000),
        b"pexpire" => expire(call, 1),
        b"ttl" => ttl(call, 1000),
        b"pttl" => ttl(call, 1),
        b"persist" => persist(call),
        b"type" => type_of(call),
        b"lpush" => push(call, true),
        b"rpush" => push(call, false),
        b"lpop" => pop(call, true),
        b"rpop" => pop(call, false),
        b"lrange" => lrange(call),
        b"debug" => debug(call),
        b"llen" => llen(call),
        #[cfg(feature = "v2")]
        b"hset" | b"hget" | b"hdel" | b"hgetall" | b"hlen" | b"hincrby" => {
            crate::hashes::execute(call, name)
        }
        _ => handshake(call, name),
    }
    After::Continue
}

fn unknown_command(call: &mut Call) {
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        lossy(call.args[0])
    );
    for arg in call.args.iter().skip(1).take(16) {
        msg.push_str(&format!("'{}' ", lossy(arg)));
    }
    call.out.error(&msg);
}

fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(128)]);
    s.replace(['\r', '\n'], " ")
}

/// Parses a Redis integer argument strictly (no spaces, no `+`).
pub fn parse_int(b: &[u8]) -> Option<i64> {
    crate::resp::parse_i64(b)
}

fn get(call: &mut Call) {
    match call.db.get(call.args[1], call.now) {
        None => call.out.nil(),
        Some(Entry {
            value: Value::Str(s),
            ..
        }) => call.out.bulk(s),
        Some(_) => call.out.error(WRONGTYPE),
    }
}

/// SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]
fn set(call: &mut Call) {
    let mut nx = false;
    let mut xx = false;
    let mut get = false;
    let mut keep_ttl = false;
    let mut expires_at = None;
    let mut i = 3;
    while i < call.args.len() {
        let opt = call.args[i].to_ascii_lowercase();
        match opt.as_slice() {
            b"nx" if !xx => nx = true,
            b"xx" if !nx => xx = true,
            b"get" => get = true,
            b"keepttl" if expires_at.is_none() => keep_ttl = true,
            b"ex" | b"px" | b"exat" | b"pxat" if expires_at.is_none() && !keep_ttl => {
                let Some(arg) = call.args.get(i + 1) else {
                    return call.out.error(SYNTAX);
                };
                let Some(n) = parse_int(arg) else {
                    return call.out.error(NOT_INT);
                };
                let at = match opt.as_slice() {
                    b"ex" => n
                        .checked_mul(1000)
                        .and_then(|ms| ms.checked_add(call.now as i64)),
                    b"px" => n.checked_add(call.now as i64),
                    b"exat" => n.checked_mul(1000),
                    _ => Some(n),
                };
                match at {
                    Some(at) if n > 0 => expires_at = Some(at as u64),
                    _ => return call.out.error("ERR invalid expire time in 'set' command"),
                }
                i += 1;
            }
            _ => return call.out.error(SYNTAX),
        }
        i += 1;
    }
    let key = &call.args[1];
    let old = call.db.get(key, call.now);
    let old_value = match old {
        Some(Entry {
            value: Value::Str(s),
            ..
        }) => Some(s.clone()),
        Some(_) if get => return call.out.error(WRONGTYPE),
        _ => None,
    };
    let exists = old.is_some();
    let kept_ttl = if keep_ttl {
        old.and_then(|e| e.expires_at)
    } else {
        None
    };
    let write = !(nx && exists || xx && !exists);
    if write {
        let entry = Entry {
            value: Value::Str(Bytes::copy_from_slice(call.args[2])),
            expires_at: expires_at.or(kept_ttl),
        };
        call.db.put(key, entry);
    }
    match (get, write) {
        (true, _) => call.out.opt_bulk(old_value.as_deref()),
        (false, true) => call.out.ok(),
        (false, false) => call.out.nil(),
    }
}

/// The integer in a string value, `Ok(None)` for a missing key.
fn int_value(call: &mut Call, key: &[u8]) -> Result<Option<i64>, &'static str> {
    match call.db.get(key, call.now) {
        None => Ok(None),
        Some(Entry {
            value: Value::Str(s),
            ..
        }) => parse_int(s).map(Some).ok_or(NOT_INT),
        Some(_) => Err(WRONGTYPE),
    }
}

fn incr_by(call: &mut Call, delta: i64) {
    let key = call.args[1];
    let current = match int_value(call, key) {
        Ok(v) => v,
        Err(e) => return call.out.error(e),
    };
    let Some(new) = current.unwrap_or(0).checked_add(delta) else {
        return call.out.error(OVERFLOW);
    };
    let digits = Bytes::from(new.to_string());
    match call.db.get(key, call.now) {
        Some(entry) => entry.value = Value::Str(digits),
        None => call.db.insert(
            Bytes::copy_from_slice(key),
            Entry {
                value: Value::Str(digits),
                expires_at: None,
            },
        ),
    }
    call.out.int(new);
}

fn incr_by_arg(call: &mut Call, negate: bool) {
    let Some(n) = parse_int(call.args[2]) else {
        return call.out.error(NOT_INT);
    };
    let delta = if negate { n.checked_neg() } else { Some(n) };
    match delta {
        Some(d) => incr_by(call, d),
        None => call.out.error(OVERFLOW),
    }
}

fn append(call: &mut Call) {
    let key = &call.args[1];
    match call.db.get(key, call.now) {
        Some(Entry {
            value: Value::Str(s),
            ..
        }) => {
            // In place when the value's buffer is its own (amortized
            // O(1), as Redis), copied once when it is shared (an imported
            // state's buffer).
            let mut grown = std::mem::take(s)
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            grown.extend_from_slice(call.args[2]);
            *s = grown.freeze();
            let len = s.len() as i64;
            call.out.int(len);
        }
        Some(_) => call.out.error(WRONGTYPE),
        None => {
            let value = Bytes::copy_from_slice(call.args[2]);
            call.out.int(value.len() as i64);
            call.db.insert(
                Bytes::copy_from_slice(key),
                Entry {
                    value: Value::Str(value),
                    expires_at: None,
                },
            );
        }
    }
}

fn strlen(call: &mut Call) {
    match call.db.get(call.args[1], call.now) {
        None => call.out.int(0),
        Some(Entry {
            value: Value::Str(s),
            ..
        }) => call.out.int(s.len() as i64),
        Some(_) => call.out.error(WRONGTYPE),
    }
}

fn del(call: &mut Call) {
    let n = call.args[1..]
        .iter()
        .filter(|k| call.db.remove(k, call.now).is_some())
        .count();
    call.out.int(n as i64);
}

fn exists(call: &mut Call) {
    let n = call.args[1..]
        .iter()
        .filter(|k| call.db.contains(k, call.now))
        .count();
    call.out.int(n as i64);
}

fn mget(call: &mut Call) {
    call.out.array(call.args.len() - 1);
    for key in &call.args[1..] {
        match call.db.get(key, call.now) {
            Some(Entry {
                value: Value::Str(s),
                ..
            }) => call.out.bulk(s),
            _ => call.out.nil(),
        }
    }
}

fn mset(call: &mut Call) {
    if call.args.len().is_multiple_of(2) {
        return call
            .out
            .error("ERR wrong number of arguments for 'mset' command");
    }
    for pair in call.args[1..].chunks(2) {
        call.db.put(
            pair[0],
            Entry {
                value: Value::Str(Bytes::copy_from_slice(pair[1])),
                expires_at: None,
            },
        );
    }
    call.out.ok();
}

fn keys(call: &mut Call) {
    let pattern = &call.args[1];
    let found: Vec<&Bytes> = call
        .db
        .keys(call.now)
        .filter(|k| glob_match(pattern, k))
        .collect();
    call.out.array(found.len());
    for key in found {
        call.out.bulk(key);
    }
}

/// EXPIRE/PEXPIRE key n [NX|XX|GT|LT]; `unit` is milliseconds per unit.
fn expire(call: &mut Call, unit: i64) {
    let cmd = if unit == 1 { "pexpire" } else { "expire" };
    let Some(n) = parse_int(call.args[2]) else {
        return call.out.error(NOT_INT);
    };
    let Some(at) = n
        .checked_mul(unit)
        .and_then(|ms| ms.checked_add(call.now as i64))
    else {
        return call
            .out
            .error(&format!("ERR invalid expire time in '{cmd}' command"));
    };
    let key = call.args[1];
    let Some(entry) = call.db.get(key, call.now) else {
        return call.out.int(0);
    };
    let current = entry.expires_at;
    let allowed = match call.args.get(3).map(|o| o.to_ascii_lowercase()) {
        None => true,
        Some(o) if o == b"nx" => current.is_none(),
        Some(o) if o == b"xx" => current.is_some(),
        Some(o) if o == b"gt" => current.is_some_and(|c| at as u64 > c),
        Some(o) if o == b"lt" => current.is_none_or(|c| (at as u64) < c),
        Some(o) => {
            return call
                .out
                .error(&format!("ERR Unsupported option {}", lossy(&o)));
        }
    };
    if !allowed {
        return call.out.int(0);
    }
    if at <= call.now as i64 {
        call.db.remove(key, call.now);
    } else {
        call.db.set_expiry(key, Some(at as u64));
    }
    call.out.int(1);
}

fn ttl(call: &mut Call, unit: u64) {
    let now = call.now;
    match call.db.get(call.args[1], now) {
        None => call.out.int(-2),
        Some(Entry {
            expires_at: None, ..
        }) => call.out.int(-1),
        Some(Entry {
            expires_at: Some(t),
            ..
        }) => call.out.int(((*t - now + unit / 2) / unit) as i64),
    }
}

fn persist(call: &mut Call) {
    let key = call.args[1];
    match call.db.get(key, call.now) {
        Some(Entry {
            expires_at: Some(_),
            ..
        }) => {
            call.db.set_expiry(key, None);
            call.out.int(1);
        }
        _ => call.out.int(0),
    }
}

fn type_of(call: &mut Call) {
    match call.db.get(call.args[1], call.now) {
        None => call.out.simple("none"),
        Some(Entry {
            value: Value::Str(_),
            ..
        }) => call.out.simple("string"),
        Some(Entry {
            value: Value::List(_),
            ..
        }) => call.out.simple("list"),
        Some(Entry {
            value: Value::Hash(_),
            ..
        }) => call.out.simple("hash"),
    }
}

fn push(call: &mut Call, front: bool) {
    let key = &call.args[1];
    let list = match call.db.get(key, call.now) {
        Some(Entry {
            value: Value::List(l),
            ..
        }) => l,
        Some(_) => return call.out.error(WRONGTYPE),
        None => {
            call.db.insert(
                Bytes::copy_from_slice(key),
                Entry {
                    value: Value::List(VecDeque::new()),
                    expires_at: None,
                },
            );
            match call.db.get(key, call.now) {
                Some(Entry {
                    value: Value::List(l),
                    ..
                }) => l,
                _ => unreachable!("just inserted a list"),
            }
        }
    };
    for item in &call.args[2..] {
        if front {
            list.push_front(Bytes::copy_from_slice(item));
        } else {
            list.push_back(Bytes::copy_from_slice(item));
        }
    }
    call.out.int(list.len() as i64);
}

/// LPOP/RPOP key [count]
fn pop(call: &mut Call, front: bool) {
    if call.args.len() > 3 {
        let name = if front { "lpop" } else { "rpop" };
        return call.out.error(&format!(
            "ERR wrong number of arguments for '{name}' command"
        ));
    }
    let count = match call.args.get(2).map(|c| parse_int(c)) {
        None => None,
        Some(Some(n)) if n >= 0 => Some(n as usize),
        Some(_) => {
            return call
                .out
                .error("ERR value is out of range, must be positive");
        }
    };
    let key = call.args[1];
    let list = match call.db.get(key, call.now) {
        Some(Entry {
            value: Value::List(l),
            ..
        }) => l,
        Some(_) => return call.out.error(WRONGTYPE),
        None if count.is_some() => return call.out.nil_array(),
        None => return call.out.nil(),
    };
    let take = count.unwrap_or(1).min(list.len());
    let items: Vec<Bytes> = (0..take)
        .filter_map(|_| {
            if front {
                list.pop_front()
            } else {
                list.pop_back()
            }
        })
        .collect();
    if list.is_empty() {
        call.db.remove(key, call.now);
    }
    match count {
        None => call.out.opt_bulk(items.first().map(|i| &i[..])),
        Some(_) => {
            call.out.array(items.len());
            items.iter().for_each(|i| call.out.bulk(i));
        }
    }
}

fn lrange(call: &mut Call) {
    let (Some(start), Some(stop)) = (parse_int(call.args[2]), parse_int(call.args[3])) else {
        return call.out.error(NOT_INT);
    };
    let list = match call.db.get(call.args[1], call.now) {
        Some(Entry {
            value: Value::List(l),
            ..
        }) => l,
        Some(_) => return call.out.error(WRONGTYPE),
        None => return call.out.array(0),
    };
    let len = list.len() as i64;
    let start = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let stop = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    if start > stop || start >= len {
        return call.out.array(0);
    }
    call.out.array((stop - start + 1) as usize);
    for item in list.range(start as usize..=stop as usize) {
        call.out.bulk(item);
    }
}

fn llen(call: &mut Call) {
    match call.db.get(call.args[1], call.now) {
        None => call.out.int(0),
        Some(Entry {
            value: Value::List(l),
            ..
        }) => call.out.int(l.len() as i64),
        Some(_) => call.out.error(WRONGTYPE),
    }
}

/// PING, ECHO, SELECT and the commands clients send while connecting
/// (CLIENT, COMMAND, CONFIG GET, INFO, HELLO), answered so that clients
/// carry on as they do with Redis.
fn handshake(call: &mut Call, name: &[u8]) {
    let sub = call
        .args
        .get(1)
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    match name {
        b"ping" => match call.args.len() {
            1 => call.out.simple("PONG"),
            2 => call.out.bulk(call.args[1]),
            _ => call
                .out
                .error("ERR wrong number of arguments for 'ping' command"),
        },
        b"echo" => call.out.bulk(call.args[1]),
        b"select" => match parse_int(call.args[1]) {
            Some(0) => call.out.ok(),
            Some(_) => call.out.error("ERR DB index is out of range"),
            None => call.out.error(NOT_INT),
        },
        b"client" => match sub.as_slice() {
            b"setname" | b"setinfo" | b"no-evict" | b"no-touch" | b"reply" => call.out.ok(),
            b"getname" => call.out.nil(),
            b"id" => call.out.int(call.conn as i64),
            _ => call.out.error(&format!(
                "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                lossy(call.args[1])
            )),
        },
        b"command" => match sub.as_slice() {
            b"count" => call.out.int(COMMAND_COUNT),
            b"info" => {
                call.out.array(call.args.len() - 2);
                (2..call.args.len()).for_each(|_| call.out.nil_array());
            }
            _ => call.out.array(0),
        },
        b"config" => config(call, &sub),
        b"info" => info(call),
        b"hello" => hello(call),
        _ => unreachable!("every name with an arity is dispatched"),
    }
}

/// How many commands `arity` knows.
const COMMAND_COUNT: i64 = if cfg!(feature = "v2") { 44 } else { 38 };

/// DEBUG, as far as tests need it: `DEBUG SEGFAULT` crashes the service
/// (here: the guest traps), so a test can make any kv trap. Off unless
/// `--config enable-debug-command=yes`, with Redis's refusal otherwise.
fn debug(call: &mut Call) {
    if !call.debug {
        return call.out.error(
            "ERR DEBUG command not allowed. If the enable-debug-command option is set to \"local\", \
             you can run it from a local connection, otherwise you need to set this option in the \
             configuration file, and then restart the server.",
        );
    }
    match call.args[1].to_ascii_lowercase().as_slice() {
        b"segfault" => panic!("DEBUG SEGFAULT"),
        _ => call.out.error(&format!(
            "ERR unknown subcommand '{}'. Try DEBUG HELP.",
            lossy(call.args[1])
        )),
    }
}

fn config(call: &mut Call, sub: &[u8]) {
    if sub != b"get" {
        return match sub {
            b"resetstat" => call.out.ok(),
            _ => call
                .out
                .error("ERR CONFIG SET and CONFIG REWRITE are not supported by this service"),
        };
    }
    const SETTINGS: &[(&str, &str)] = &[
        ("save", ""),
        ("appendonly", "no"),
        ("databases", "1"),
        ("maxmemory", "0"),
        ("timeout", "0"),
    ];
    let mut found = Vec::new();
    for pattern in &call.args[2..] {
        let pattern = pattern.to_ascii_lowercase();
        found.extend(
            SETTINGS
                .iter()
                .filter(|(k, _)| glob_match(&pattern, k.as_bytes())),
        );
    }
    call.out.array(found.len() * 2);
    for (k, v) in found {
        call.out.bulk(k.as_bytes());
        call.out.bulk(v.as_bytes());
    }
}

/// `INFO [section ...]`: the sections asked for (all with none, `all`,
/// `default` or `everything`; an unknown one adds nothing), as Redis does.
/// `role:master` always: this host serves only where it is the primary (a
/// standby serves no client), so HAProxy's documented Redis check (`tcp-check
/// expect string role:master`) picks the serving host.
fn info(call: &mut Call) {
    let keys = call.db.len();
    let sections = [
        (
            "server",
            "# Server\r\nredis_version:7.2.0\r\nredis_mode:standalone\r\nos:wasmhost\r\n\
             arch_bits:32\r\nserver_name:wasmhost-kv\r\n"
                .to_string(),
        ),
        (
            "replication",
            "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n".to_string(),
        ),
        (
            "keyspace",
            format!("# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n"),
        ),
    ];
    let asked: Vec<String> = call.args[1..]
        .iter()
        .map(|a| lossy(a).to_ascii_lowercase())
        .collect();
    let all = asked.is_empty()
        || asked
            .iter()
            .any(|a| matches!(a.as_str(), "all" | "default" | "everything"));
    let text: Vec<&str> = sections
        .iter()
        .filter(|(name, _)| all || asked.iter().any(|a| a == name))
        .map(|(_, text)| text.as_str())
        .collect();
    call.out.bulk(text.join("\r\n").as_bytes());
}

fn hello(call: &mut Call) {
    if let Some(v) = call.args.get(1)
        && parse_int(v) != Some(2)
    {
        return call
            .out
            .error("NOPROTO this server only speaks RESP2 (HELLO 2)");
    }
    call.out.array(14);
    for (k, v) in [("server", "redis"), ("version", "7.2.0")] {
        call.out.bulk(k.as_bytes());
        call.out.bulk(v.as_bytes());
    }
    call.out.bulk(b"proto");
    call.out.int(2);
    call.out.bulk(b"id");
    call.out.int(call.conn as i64);
    for (k, v) in [("mode", "standalone"), ("role", "master")] {
        call.out.bulk(k.as_bytes());
        call.out.bulk(v.as_bytes());
    }
    call.out.bulk(b"modules");
    call.out.array(0);
}
