//! The kv guest under the real binary, driven by the `redis` client crate
//! (and raw sockets where a client would hide what is tested).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use redis::{Commands, RedisResult, Value};
use wasmhost_tests::{Served, expect_reply, redis_connect};

fn err_text<T: std::fmt::Debug>(r: RedisResult<T>) -> String {
    let e = r.expect_err("expected an error reply");
    e.to_string()
}

#[test]
fn strings_and_counters() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    assert_eq!(redis::cmd("PING").query::<String>(&mut c).unwrap(), "PONG");
    assert_eq!(
        redis::cmd("PING")
            .arg("hi")
            .query::<String>(&mut c)
            .unwrap(),
        "hi"
    );
    assert_eq!(
        redis::cmd("ECHO")
            .arg("x y")
            .query::<String>(&mut c)
            .unwrap(),
        "x y"
    );
    let _: () = c.set("name", "wasmhost").unwrap();
    assert_eq!(c.get::<_, String>("name").unwrap(), "wasmhost");
    assert_eq!(c.get::<_, Option<String>>("missing").unwrap(), None);
    // NX / XX
    assert_eq!(
        redis::cmd("SET")
            .arg("name")
            .arg("other")
            .arg("NX")
            .query::<Option<String>>(&mut c)
            .unwrap(),
        None
    );
    assert_eq!(
        redis::cmd("SET")
            .arg("nokey")
            .arg("v")
            .arg("XX")
            .query::<Option<String>>(&mut c)
            .unwrap(),
        None
    );
    assert_eq!(
        redis::cmd("SET")
            .arg("name")
            .arg("v2")
            .arg("XX")
            .query::<String>(&mut c)
            .unwrap(),
        "OK"
    );
    assert_eq!(c.get::<_, String>("name").unwrap(), "v2");
    // Binary-safe values.
    let _: () = c.set("bin", &b"\x00\r\n\xff"[..]).unwrap();
    assert_eq!(c.get::<_, Vec<u8>>("bin").unwrap(), b"\x00\r\n\xff");
    assert_eq!(c.incr::<_, _, i64>("n", 1).unwrap(), 1);
    assert_eq!(redis::cmd("INCR").arg("n").query::<i64>(&mut c).unwrap(), 2);
    assert_eq!(redis::cmd("DECR").arg("n").query::<i64>(&mut c).unwrap(), 1);
    assert_eq!(
        redis::cmd("INCRBY")
            .arg("n")
            .arg(41)
            .query::<i64>(&mut c)
            .unwrap(),
        42
    );
    assert_eq!(
        redis::cmd("DECRBY")
            .arg("n")
            .arg(50)
            .query::<i64>(&mut c)
            .unwrap(),
        -8
    );
    assert_eq!(
        redis::cmd("APPEND")
            .arg("s")
            .arg("ab")
            .query::<i64>(&mut c)
            .unwrap(),
        2
    );
    assert_eq!(
        redis::cmd("APPEND")
            .arg("s")
            .arg("cd")
            .query::<i64>(&mut c)
            .unwrap(),
        4
    );
    assert_eq!(
        redis::cmd("STRLEN").arg("s").query::<i64>(&mut c).unwrap(),
        4
    );
    assert_eq!(
        redis::cmd("STRLEN")
            .arg("nothing")
            .query::<i64>(&mut c)
            .unwrap(),
        0
    );
    let _: () = redis::cmd("MSET")
        .arg("a")
        .arg("1")
        .arg("b")
        .arg("2")
        .query(&mut c)
        .unwrap();
    let got: Vec<Option<String>> = redis::cmd("MGET")
        .arg("a")
        .arg("nope")
        .arg("b")
        .query(&mut c)
        .unwrap();
    assert_eq!(got, vec![Some("1".into()), None, Some("2".into())]);
    assert_eq!(
        redis::cmd("EXISTS")
            .arg("a")
            .arg("b")
            .arg("a")
            .arg("zz")
            .query::<i64>(&mut c)
            .unwrap(),
        3
    );
    assert_eq!(
        redis::cmd("DEL")
            .arg("a")
            .arg("zz")
            .query::<i64>(&mut c)
            .unwrap(),
        1
    );
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    keys.sort();
    assert_eq!(keys, vec!["b", "bin", "n", "name", "s"]);
    let keys: Vec<String> = redis::cmd("KEYS").arg("na?e").query(&mut c).unwrap();
    assert_eq!(keys, vec!["name"]);
    assert_eq!(redis::cmd("DBSIZE").query::<i64>(&mut c).unwrap(), 5);
    assert_eq!(
        redis::cmd("SELECT").arg(0).query::<String>(&mut c).unwrap(),
        "OK"
    );
    assert_eq!(
        redis::cmd("FLUSHALL").query::<String>(&mut c).unwrap(),
        "OK"
    );
    assert_eq!(redis::cmd("DBSIZE").query::<i64>(&mut c).unwrap(), 0);
}

#[test]
fn lists() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    assert_eq!(
        redis::cmd("RPUSH")
            .arg("l")
            .arg("b")
            .arg("c")
            .query::<i64>(&mut c)
            .unwrap(),
        2
    );
    assert_eq!(
        redis::cmd("LPUSH")
            .arg("l")
            .arg("a")
            .arg("z")
            .query::<i64>(&mut c)
            .unwrap(),
        4
    );
    let all: Vec<String> = redis::cmd("LRANGE")
        .arg("l")
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap();
    assert_eq!(all, vec!["z", "a", "b", "c"]);
    let mid: Vec<String> = redis::cmd("LRANGE")
        .arg("l")
        .arg(1)
        .arg(-2)
        .query(&mut c)
        .unwrap();
    assert_eq!(mid, vec!["a", "b"]);
    let none: Vec<String> = redis::cmd("LRANGE")
        .arg("l")
        .arg(10)
        .arg(20)
        .query(&mut c)
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(redis::cmd("LLEN").arg("l").query::<i64>(&mut c).unwrap(), 4);
    assert_eq!(
        redis::cmd("LPOP").arg("l").query::<String>(&mut c).unwrap(),
        "z"
    );
    assert_eq!(
        redis::cmd("RPOP").arg("l").query::<String>(&mut c).unwrap(),
        "c"
    );
    let two: Vec<String> = redis::cmd("LPOP").arg("l").arg(5).query(&mut c).unwrap();
    assert_eq!(two, vec!["a", "b"]);
    // An emptied list is deleted.
    assert_eq!(
        redis::cmd("EXISTS").arg("l").query::<i64>(&mut c).unwrap(),
        0
    );
    assert_eq!(
        redis::cmd("LPOP")
            .arg("l")
            .query::<Option<String>>(&mut c)
            .unwrap(),
        None
    );
    assert_eq!(redis::cmd("LLEN").arg("l").query::<i64>(&mut c).unwrap(), 0);
}

#[test]
fn errors_match_redis() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = c.set("s", "text").unwrap();
    let _: () = redis::cmd("RPUSH").arg("l").arg("x").query(&mut c).unwrap();
    let e = err_text(redis::cmd("GET").query::<String>(&mut c));
    assert!(
        e.contains("wrong number of arguments for 'get' command"),
        "{e}"
    );
    let e = err_text(redis::cmd("SET").arg("k").query::<String>(&mut c));
    assert!(
        e.contains("wrong number of arguments for 'set' command"),
        "{e}"
    );
    let e = err_text(redis::cmd("LPUSH").arg("s").arg("x").query::<i64>(&mut c));
    assert!(e.contains("WRONGTYPE"), "{e}");
    let e = err_text(redis::cmd("GET").arg("l").query::<String>(&mut c));
    assert!(e.contains("WRONGTYPE"), "{e}");
    let e = err_text(redis::cmd("INCR").arg("s").query::<i64>(&mut c));
    assert!(e.contains("value is not an integer or out of range"), "{e}");
    let _: () = c.set("big", i64::MAX).unwrap();
    let e = err_text(redis::cmd("INCR").arg("big").query::<i64>(&mut c));
    assert!(e.contains("increment or decrement would overflow"), "{e}");
    let e = err_text(
        redis::cmd("SET")
            .arg("k")
            .arg("v")
            .arg("EX")
            .arg(0)
            .query::<String>(&mut c),
    );
    assert!(e.contains("invalid expire time in 'set' command"), "{e}");
    let e = err_text(
        redis::cmd("SET")
            .arg("k")
            .arg("v")
            .arg("NX")
            .arg("XX")
            .query::<String>(&mut c),
    );
    assert!(e.contains("syntax error"), "{e}");
    let e = err_text(redis::cmd("SELECT").arg(3).query::<String>(&mut c));
    assert!(e.contains("DB index is out of range"), "{e}");
    let e = err_text(redis::cmd("NOSUCH").arg("a").query::<String>(&mut c));
    assert!(
        e.contains("unknown command 'NOSUCH', with args beginning with: 'a'"),
        "{e}"
    );
    // The connection is still usable after errors.
    assert_eq!(c.get::<_, String>("s").unwrap(), "text");
}

#[test]
fn expiry() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET")
        .arg("short")
        .arg("v")
        .arg("PX")
        .arg(150)
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("long")
        .arg("v")
        .arg("EX")
        .arg(1000)
        .query(&mut c)
        .unwrap();
    let _: () = c.set("forever", "v").unwrap();
    let ttl: i64 = redis::cmd("TTL").arg("long").query(&mut c).unwrap();
    assert!((999..=1000).contains(&ttl), "{ttl}");
    let pttl: i64 = redis::cmd("PTTL").arg("short").query(&mut c).unwrap();
    assert!((1..=150).contains(&pttl), "{pttl}");
    assert_eq!(
        redis::cmd("TTL")
            .arg("forever")
            .query::<i64>(&mut c)
            .unwrap(),
        -1
    );
    assert_eq!(
        redis::cmd("TTL")
            .arg("missing")
            .query::<i64>(&mut c)
            .unwrap(),
        -2
    );
    assert_eq!(
        redis::cmd("EXPIRE")
            .arg("forever")
            .arg(500)
            .query::<i64>(&mut c)
            .unwrap(),
        1
    );
    assert!(
        redis::cmd("TTL")
            .arg("forever")
            .query::<i64>(&mut c)
            .unwrap()
            > 0
    );
    assert_eq!(
        redis::cmd("PERSIST")
            .arg("forever")
            .query::<i64>(&mut c)
            .unwrap(),
        1
    );
    assert_eq!(
        redis::cmd("PERSIST")
            .arg("forever")
            .query::<i64>(&mut c)
            .unwrap(),
        0
    );
    assert_eq!(
        redis::cmd("TTL")
            .arg("forever")
            .query::<i64>(&mut c)
            .unwrap(),
        -1
    );
    assert_eq!(
        redis::cmd("EXPIRE")
            .arg("missing")
            .arg(5)
            .query::<i64>(&mut c)
            .unwrap(),
        0
    );
    assert_eq!(
        redis::cmd("PEXPIRE")
            .arg("long")
            .arg(100)
            .query::<i64>(&mut c)
            .unwrap(),
        1
    );
    // Both short-lived keys disappear: GET says so, and the sweep timer
    // removes them from DBSIZE without any access.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
        if size == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keys did not expire; DBSIZE {size}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.get::<_, Option<String>>("short").unwrap(), None);
    assert_eq!(c.get::<_, Option<String>>("long").unwrap(), None);
    assert_eq!(c.get::<_, String>("forever").unwrap(), "v");
}

#[test]
fn pipelining() {
    let server = Served::start("kv", &[]);
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

#[test]
fn command_split_across_writes_and_inline_commands() {
    let server = Served::start("kv", &[]);
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

#[test]
fn protocol_error_closes_only_that_connection() {
    let server = Served::start("kv", &[]);
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

#[test]
fn handshake_commands_clients_send() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("test")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("SETINFO")
        .arg("LIB-NAME")
        .arg("x")
        .query(&mut c)
        .unwrap();
    let docs: Value = redis::cmd("COMMAND").arg("DOCS").query(&mut c).unwrap();
    assert_eq!(docs, Value::Array(vec![]));
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query(&mut c)
        .unwrap();
    assert_eq!(save, vec!["save", ""]);
    let info: String = redis::cmd("INFO").query(&mut c).unwrap();
    assert!(info.contains("redis_version:"), "{info}");
    let hello: Value = redis::cmd("HELLO").arg(2).query(&mut c).unwrap();
    assert!(
        matches!(hello, Value::Array(ref a) if a.len() == 14),
        "{hello:?}"
    );
    let e = err_text(redis::cmd("HELLO").arg(3).query::<Value>(&mut c));
    assert!(e.contains("NOPROTO"), "{e}");
}

#[test]
fn redis_cli_works_if_installed() {
    // redis-cli is a real client too; .ci/run installs it.
    let Ok(out) = std::process::Command::new("redis-cli")
        .arg("--version")
        .output()
    else {
        eprintln!("redis-cli not installed; skipped");
        return;
    };
    assert!(out.status.success());
    let server = Served::start("kv", &[]);
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
