//! Guests in other languages swap into each other live, carrying the state:
//! kv (Rust) -> kv-py (Python) -> kv under load, and chat (Rust) -> chat-js
//! (JavaScript) -> chat while users talk. The checks are those of the
//! live-swap tests: every reply correct, no connection closed, every key and
//! every user, channel and history line kept, a half-received command
//! completed by the next version.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use wasmhost_tests::irc::Room;
use wasmhost_tests::load::Load;
use wasmhost_tests::{Served, expect_reply, redis_connect};

/// Sends the first half of a SET on `conn` and waits until the service has
/// it (a PING on another connection is answered after it).
fn send_half_set(server: &Served, conn: &mut TcpStream, key: &str) {
    let head = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$5\r\nwh", key.len());
    conn.write_all(head.as_bytes()).unwrap();
    let mut probe = redis_connect(server);
    let _: String = redis::cmd("PING").query(&mut probe).unwrap();
    std::thread::sleep(Duration::from_millis(50));
}

/// Completes the SET begun by [`send_half_set`] and reads it back.
fn finish_half_set(conn: &mut TcpStream, key: &str) {
    let tail = format!("ole\r\n*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    conn.write_all(tail.as_bytes()).unwrap();
    expect_reply(conn, b"+OK\r\n$5\r\nwhole\r\n");
}

#[test]
fn kv_to_kv_py_and_back_under_load_keeps_every_key() {
    const CLIENTS: usize = 20;
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET")
        .arg("lang")
        .arg("rust")
        .arg("EX")
        .arg(3600)
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("langs")
        .arg(&["rust", "python", "javascript"])
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("bin")
        .arg(&b"\x00\r\n\xff"[..])
        .query(&mut c)
        .unwrap();
    let mut half = TcpStream::connect(server.addr()).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let load = Load::start(&server, CLIENTS);
    load.wait(300);
    send_half_set(&server, &mut half, "to-python");
    let report = server.swap_to("kv-py");
    assert!(report.contains("state   kv/1"), "{report}");
    assert!(
        report.contains(&format!("kept    {} connections", CLIENTS + 2)),
        "{report}"
    );
    finish_half_set(&mut half, "to-python");
    load.wait(300);

    // Python answers now: the keys written by Rust read back.
    let lang: String = redis::cmd("GET").arg("lang").query(&mut c).unwrap();
    assert_eq!(lang, "rust");
    let ttl: i64 = redis::cmd("TTL").arg("lang").query(&mut c).unwrap();
    assert!(ttl > 3500, "expiry carried into Python: {ttl}");
    let _: () = redis::cmd("LPUSH")
        .arg("langs")
        .arg("c")
        .query(&mut c)
        .unwrap();

    send_half_set(&server, &mut half, "to-rust");
    let report = server.swap_to("kv");
    assert!(report.contains("state   kv/1"), "{report}");
    finish_half_set(&mut half, "to-rust");
    load.wait(300);
    load.finish(&server);

    let langs: Vec<String> = redis::cmd("LRANGE")
        .arg("langs")
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap();
    assert_eq!(langs, ["c", "rust", "python", "javascript"]);
    let bin: Vec<u8> = redis::cmd("GET").arg("bin").query(&mut c).unwrap();
    assert_eq!(bin, b"\x00\r\n\xff");
    let ttl: i64 = redis::cmd("TTL").arg("lang").query(&mut c).unwrap();
    assert!(ttl > 3500, "expiry carried back: {ttl}");
    for key in ["to-python", "to-rust"] {
        let v: String = redis::cmd("GET").arg(key).query(&mut c).unwrap();
        assert_eq!(v, "whole");
    }
    let status = server.command("status", &["--json"]);
    assert!(
        status.stdout.contains("\"generation\": 3"),
        "{}",
        status.stdout
    );
    assert!(status.stdout.contains("\"traps\": 0"), "{}", status.stdout);
}

#[test]
fn chat_to_chat_js_and_back_keeps_users_channels_and_history() {
    let server = Served::start("chat", &["--config", "history=100000"]);
    let addr = server.addr();
    let room = Room::join(addr, "before the swaps");
    let (mut room, report, to_js) = room.talk_through(|| server.swap_to("chat-js"));
    assert!(report.contains("state   chat/1"), "{report}");
    // JavaScript serves the same users in the same channel.
    room.check_joined();
    // A line begun under JavaScript is finished under Rust. (No barrier
    // can follow a half line on its own connection: give it time to arrive.)
    room.bob.send_raw(b"PRIVMSG #rust :half ");
    std::thread::sleep(Duration::from_millis(100));
    room.bob.seen.clear();
    room.carol.seen.clear();
    let (mut room, report, to_rust) = room.talk_through(|| server.swap_to("chat"));
    assert!(report.contains("state   chat/1"), "{report}");
    room.bob.send_raw(b"and half\r\n");
    room.alice
        .expect(":bob!bob@127.0.0.1 PRIVMSG #rust :half and half");
    room.check_joined();
    // Every message of both talks is in the history a newcomer gets.
    let history = Room::newcomer_history(addr, "before the swaps");
    assert_eq!(history.len(), to_js + to_rust + 1, "{history:#?}");
}
