//! The kv guest under the real binary, driven by the `redis` client crate
//! (and raw sockets where a client would hide what is tested).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use redis::{Commands, Connection, RedisResult, Value};
use wasmhost_tests::{Served, expect_reply, redis_connect};

/// Sends `args` as one command and returns the typed reply.
fn cmd<T: redis::FromRedisValue>(c: &mut Connection, args: &[&str]) -> T {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(c).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Sends `args` and returns the error reply's text.
fn err(c: &mut Connection, args: &[&str]) -> String {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    let result: RedisResult<Value> = command.query(c);
    result.expect_err("expected an error reply").to_string()
}

fn strings_and_counters(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut c = redis_connect(&server);
    let c = &mut c;
    assert_eq!(cmd::<String>(c, &["PING"]), "PONG");
    assert_eq!(cmd::<String>(c, &["PING", "hi"]), "hi");
    assert_eq!(cmd::<String>(c, &["ECHO", "x y"]), "x y");
    let _: () = c.set("name", "wasmhost").unwrap();
    assert_eq!(c.get::<_, String>("name").unwrap(), "wasmhost");
    assert_eq!(c.get::<_, Option<String>>("missing").unwrap(), None);
    // NX / XX
    assert_eq!(
        cmd::<Option<String>>(c, &["SET", "name", "other", "NX"]),
        None
    );
    assert_eq!(cmd::<Option<String>>(c, &["SET", "nokey", "v", "XX"]), None);
    assert_eq!(cmd::<String>(c, &["SET", "name", "v2", "XX"]), "OK");
    assert_eq!(c.get::<_, String>("name").unwrap(), "v2");
    // Binary-safe values.
    let _: () = c.set("bin", &b"\x00\r\n\xff"[..]).unwrap();
    assert_eq!(c.get::<_, Vec<u8>>("bin").unwrap(), b"\x00\r\n\xff");
    assert_eq!(c.incr::<_, _, i64>("n", 1).unwrap(), 1);
    assert_eq!(cmd::<i64>(c, &["INCR", "n"]), 2);
    assert_eq!(cmd::<i64>(c, &["DECR", "n"]), 1);
    assert_eq!(cmd::<i64>(c, &["INCRBY", "n", "41"]), 42);
    assert_eq!(cmd::<i64>(c, &["DECRBY", "n", "50"]), -8);
    assert_eq!(cmd::<i64>(c, &["APPEND", "s", "ab"]), 2);
    assert_eq!(cmd::<i64>(c, &["APPEND", "s", "cd"]), 4);
    assert_eq!(cmd::<i64>(c, &["STRLEN", "s"]), 4);
    assert_eq!(cmd::<i64>(c, &["STRLEN", "nothing"]), 0);
    assert_eq!(cmd::<String>(c, &["MSET", "a", "1", "b", "2"]), "OK");
    let got: Vec<Option<String>> = cmd(c, &["MGET", "a", "nope", "b"]);
    assert_eq!(got, vec![Some("1".into()), None, Some("2".into())]);
    assert_eq!(cmd::<i64>(c, &["EXISTS", "a", "b", "a", "zz"]), 3);
    assert_eq!(cmd::<i64>(c, &["DEL", "a", "zz"]), 1);
    let mut keys: Vec<String> = cmd(c, &["KEYS", "*"]);
    keys.sort();
    assert_eq!(keys, vec!["b", "bin", "n", "name", "s"]);
    assert_eq!(cmd::<Vec<String>>(c, &["KEYS", "na?e"]), vec!["name"]);
    assert_eq!(cmd::<String>(c, &["TYPE", "name"]), "string");
    assert_eq!(cmd::<i64>(c, &["DBSIZE"]), 5);
    assert_eq!(cmd::<String>(c, &["SELECT", "0"]), "OK");
    assert_eq!(cmd::<String>(c, &["FLUSHALL"]), "OK");
    assert_eq!(cmd::<i64>(c, &["DBSIZE"]), 0);
}

fn lists(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut c = redis_connect(&server);
    let c = &mut c;
    assert_eq!(cmd::<i64>(c, &["RPUSH", "l", "b", "c"]), 2);
    assert_eq!(cmd::<i64>(c, &["LPUSH", "l", "a", "z"]), 4);
    assert_eq!(
        cmd::<Vec<String>>(c, &["LRANGE", "l", "0", "-1"]),
        vec!["z", "a", "b", "c"]
    );
    assert_eq!(
        cmd::<Vec<String>>(c, &["LRANGE", "l", "1", "-2"]),
        vec!["a", "b"]
    );
    assert!(cmd::<Vec<String>>(c, &["LRANGE", "l", "10", "20"]).is_empty());
    assert_eq!(cmd::<String>(c, &["TYPE", "l"]), "list");
    assert_eq!(cmd::<i64>(c, &["LLEN", "l"]), 4);
    assert_eq!(cmd::<String>(c, &["LPOP", "l"]), "z");
    assert_eq!(cmd::<String>(c, &["RPOP", "l"]), "c");
    assert_eq!(cmd::<Vec<String>>(c, &["LPOP", "l", "5"]), vec!["a", "b"]);
    // An emptied list is deleted.
    assert_eq!(cmd::<i64>(c, &["EXISTS", "l"]), 0);
    assert_eq!(cmd::<Option<String>>(c, &["LPOP", "l"]), None);
    assert_eq!(cmd::<i64>(c, &["LLEN", "l"]), 0);
}

fn errors_match_redis(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut c = redis_connect(&server);
    let c = &mut c;
    let _: () = c.set("s", "text").unwrap();
    assert_eq!(cmd::<i64>(c, &["RPUSH", "l", "x"]), 1);
    let _: () = c.set("big", i64::MAX).unwrap();
    let cases: [(&[&str], &str); 10] = [
        (&["GET"], "wrong number of arguments for 'get' command"),
        (&["SET", "k"], "wrong number of arguments for 'set' command"),
        (
            &["LPUSH", "s", "x"],
            "Operation against a key holding the wrong kind of value",
        ),
        (&["GET", "l"], "WRONGTYPE"),
        (&["INCR", "s"], "value is not an integer or out of range"),
        (&["INCR", "big"], "increment or decrement would overflow"),
        (
            &["SET", "k", "v", "EX", "0"],
            "invalid expire time in 'set' command",
        ),
        (&["SET", "k", "v", "NX", "XX"], "syntax error"),
        (&["SELECT", "3"], "DB index is out of range"),
        (
            &["NOSUCH", "a"],
            "unknown command 'NOSUCH', with args beginning with: 'a'",
        ),
    ];
    for (args, expected) in cases {
        let e = err(c, args);
        assert!(e.contains(expected), "{args:?}: {e}");
    }
    // The connection is still usable after errors, and nothing changed.
    assert_eq!(c.get::<_, String>("s").unwrap(), "text");
    assert_eq!(cmd::<i64>(c, &["EXISTS", "k"]), 0);
}

fn expiry(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut c = redis_connect(&server);
    let c = &mut c;
    assert_eq!(cmd::<String>(c, &["SET", "short", "v", "PX", "150"]), "OK");
    assert_eq!(cmd::<String>(c, &["SET", "long", "v", "EX", "1000"]), "OK");
    let _: () = c.set("forever", "v").unwrap();
    let ttl: i64 = cmd(c, &["TTL", "long"]);
    assert!((999..=1000).contains(&ttl), "{ttl}");
    let pttl: i64 = cmd(c, &["PTTL", "short"]);
    assert!((1..=150).contains(&pttl), "{pttl}");
    assert_eq!(cmd::<i64>(c, &["TTL", "forever"]), -1);
    assert_eq!(cmd::<i64>(c, &["TTL", "missing"]), -2);
    assert_eq!(cmd::<i64>(c, &["EXPIRE", "forever", "500"]), 1);
    assert!(cmd::<i64>(c, &["TTL", "forever"]) > 0);
    assert_eq!(cmd::<i64>(c, &["PERSIST", "forever"]), 1);
    assert_eq!(cmd::<i64>(c, &["PERSIST", "forever"]), 0);
    assert_eq!(cmd::<i64>(c, &["TTL", "forever"]), -1);
    assert_eq!(cmd::<i64>(c, &["EXPIRE", "missing", "5"]), 0);
    assert_eq!(cmd::<i64>(c, &["PEXPIRE", "long", "100"]), 1);
    // DBSIZE counts keys not yet reclaimed, as in Redis: it drops to 1
    // only when the sweep timer has deleted both keys, with no access.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let size: i64 = cmd(c, &["DBSIZE"]);
        if size == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keys were not swept; DBSIZE {size}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.get::<_, Option<String>>("short").unwrap(), None);
    assert_eq!(c.get::<_, Option<String>>("long").unwrap(), None);
    assert_eq!(c.get::<_, String>("forever").unwrap(), "v");
}

fn pipelining(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut c = redis_connect(&server);
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.cmd("SET").arg(format!("k{i}")).arg(i).ignore();
        pipe.cmd("INCR").arg(format!("k{i}"));
    }
    pipe.cmd("DBSIZE");
    let results: Vec<i64> = pipe.query(&mut c).unwrap();
    assert_eq!(results.len(), 501);
    for (i, r) in results[..500].iter().enumerate() {
        assert_eq!(*r, i as i64 + 1);
    }
    assert_eq!(results[500], 500);
}

fn command_split_across_writes_and_inline_commands(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut conn = TcpStream::connect(server.addr()).unwrap();
    conn.set_nodelay(true).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let cmd = b"*3\r\n$3\r\nSET\r\n$5\r\nsplit\r\n$5\r\nvalue\r\n";
    // Every split point, each half sent in its own write.
    for cut in 1..cmd.len() {
        conn.write_all(&cmd[..cut]).unwrap();
        conn.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1));
        conn.write_all(&cmd[cut..]).unwrap();
        expect_reply(&mut conn, b"+OK\r\n");
    }
    // Two commands and a half in one write, the rest later.
    conn.write_all(
        b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$5\r\nsplit\r\n*2\r\n$3\r\nGET\r\n$5\r\nsp",
    )
    .unwrap();
    expect_reply(&mut conn, b"+PONG\r\n$5\r\nvalue\r\n");
    conn.write_all(b"lit\r\n").unwrap();
    expect_reply(&mut conn, b"$5\r\nvalue\r\n");
    // Inline commands, as typed into telnet.
    conn.write_all(b"PING\r\nGET split\r\n").unwrap();
    expect_reply(&mut conn, b"+PONG\r\n$5\r\nvalue\r\n");
    // QUIT answers and closes.
    conn.write_all(b"QUIT\r\n").unwrap();
    expect_reply(&mut conn, b"+OK\r\n");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

fn protocol_error_closes_only_that_connection(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut bad = TcpStream::connect(server.addr()).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut good = redis_connect(&server);
    bad.write_all(b"*1\r\n+PING\r\n").unwrap();
    let mut reply = String::new();
    bad.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "-Protocol error: expected '$'\r\n");
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut good).unwrap(),
        "PONG"
    );
}

fn handshake_commands_clients_send(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut c = redis_connect(&server);
    let c = &mut c;
    assert_eq!(cmd::<String>(c, &["CLIENT", "SETNAME", "test"]), "OK");
    assert_eq!(
        cmd::<String>(c, &["CLIENT", "SETINFO", "LIB-NAME", "x"]),
        "OK"
    );
    assert_eq!(cmd::<Value>(c, &["COMMAND", "DOCS"]), Value::Array(vec![]));
    assert_eq!(
        cmd::<Vec<String>>(c, &["CONFIG", "GET", "save"]),
        vec!["save", ""]
    );
    let info: String = cmd(c, &["INFO"]);
    assert!(info.contains("redis_version:"), "{info}");
    let hello: Value = cmd(c, &["HELLO", "2"]);
    assert!(
        matches!(hello, Value::Array(ref a) if a.len() == 14),
        "{hello:?}"
    );
    assert!(err(c, &["HELLO", "3"]).contains("NOPROTO"));
}

fn redis_cli_works_if_installed(guest: &str) {
    // redis-cli is a real client too; .ci/setup installs it, so under CI
    // its absence is a failure, not a skip.
    let Ok(out) = std::process::Command::new("redis-cli")
        .arg("--version")
        .output()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-cli is missing under CI"
        );
        eprintln!("redis-cli not installed; skipped");
        return;
    };
    assert!(out.status.success());
    let server = Served::start(guest, &[]);
    let port = server.addr().port().to_string();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&["SET", "greeting", "hello world"]), "OK");
    assert_eq!(run(&["GET", "greeting"]), "hello world");
    assert_eq!(run(&["RPUSH", "l", "1", "2"]), "2");
    assert_eq!(run(&["LRANGE", "l", "0", "-1"]), "1\n2");
}

/// Redis's DEBUG SEGFAULT, behind its `enable-debug-command` option: how any
/// test makes kv trap. The host rebuilds the guest's state, closes the
/// connection whose command trapped, and every other connection stays open
/// (tests/tests/durable.rs tries it under load).
fn debug_segfault_traps_only_when_enabled(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut c = redis_connect(&server);
    let e = err(&mut c, &["DEBUG", "SEGFAULT"]);
    assert!(e.contains("DEBUG command not allowed"), "{e}");
    drop(server);

    let mut server = Served::start(guest, &["--config", "enable-debug-command=yes"]);
    let mut other = redis_connect(&server);
    assert_eq!(cmd::<String>(&mut other, &["PING"]), "PONG");
    let mut crasher = TcpStream::connect(server.addr()).unwrap();
    crasher
        .write_all(b"*2\r\n$5\r\nDEBUG\r\n$8\r\nSEGFAULT\r\n")
        .unwrap();
    server.wait_for_output(|t| t.contains("state rebuilt"), Duration::from_secs(20));
    assert_eq!(cmd::<String>(&mut other, &["PING"]), "PONG");
    // The connection whose command trapped is closed, with no reply.
    crasher
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    crasher.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"");
    let status = server.command("status", &["--json"]);
    assert!(status.stdout.contains("\"traps\": 1"), "{}", status.stdout);
    assert!(
        status.stdout.contains("\"recoveries\": 1"),
        "{}",
        status.stdout
    );
}

// Every test above runs against each implementation of the service, which
// must answer byte for byte alike.
wasmhost_tests::against! {
    rust => "kv", python => "kv-py";
    strings_and_counters,
    lists,
    errors_match_redis,
    expiry,
    pipelining,
    command_split_across_writes_and_inline_commands,
    protocol_error_closes_only_that_connection,
    handshake_commands_clients_send,
    redis_cli_works_if_installed,
    debug_segfault_traps_only_when_enabled,
}
