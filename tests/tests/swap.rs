//! Live swap under load with real clients: state carried over, no reply
//! lost, no connection closed; failed swaps change nothing; rollback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use wasmhost_tests::irc::Room;
use wasmhost_tests::load::Load;
use wasmhost_tests::{Served, expect_reply, guest, redis_connect};

fn status_json(server: &Served) -> String {
    let out = server.command("status", &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    out.stdout
}

#[test]
fn kv_to_kv_v2_and_back_twenty_times_under_load_of_fifty_connections() {
    const CLIENTS: usize = 50;
    let server = Served::start("kv", &[]);
    let mut setup = redis_connect(&server);
    let _: () = redis::cmd("SET")
        .arg("before")
        .arg("swap")
        .arg("EX")
        .arg(3600)
        .query(&mut setup)
        .unwrap();

    let load = Load::start(&server, CLIENTS);
    load.wait(500);
    let report = server.swap_to("kv-v2");
    assert!(report.contains("generation 1 -> 2"), "{report}");
    assert!(report.contains("state   kv/1"), "{report}");
    assert!(
        report.contains(&format!("kept    {} connections", CLIENTS + 1)),
        "{report}"
    );
    load.wait(200);
    // kv-v2 is live: hashes work (on a separate connection, then removed so
    // kv can come back).
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("v")
        .query(&mut setup)
        .unwrap();
    let _: () = redis::cmd("HDEL")
        .arg("h")
        .arg("f")
        .query(&mut setup)
        .unwrap();
    for i in 0..20 {
        let next = if i % 2 == 0 { "kv" } else { "kv-v2" };
        let report = server.swap_to(next);
        assert!(
            report.contains(&format!("generation {} -> {}", i + 2, i + 3)),
            "{report}"
        );
        load.wait(100);
    }
    // Everything written before and during the swaps reads back.
    load.finish(&server);
    let before: String = redis::cmd("GET").arg("before").query(&mut setup).unwrap();
    assert_eq!(before, "swap");
    let ttl: i64 = redis::cmd("TTL").arg("before").query(&mut setup).unwrap();
    assert!(ttl > 3500, "expiry carried over: {ttl}");
    let status = status_json(&server);
    assert!(status.contains("\"generation\": 22"), "{status}");
    assert_eq!(
        status.matches("\"outcome\": \"committed\"").count(),
        21,
        "{status}"
    );
    assert!(status.contains("\"traps\": 0"), "{status}");
}

#[test]
fn a_command_split_across_a_swap_is_answered() {
    let server = Served::start("kv", &[]);
    let mut conn = TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$5\r\nwh")
        .unwrap();
    // Make sure the first half has reached the service before the swap.
    let mut probe = redis_connect(&server);
    let _: String = redis::cmd("PING").query(&mut probe).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    server.swap_to("kv-v2");
    conn.write_all(b"ole\r\n*2\r\n$3\r\nGET\r\n$4\r\nhalf\r\n")
        .unwrap();
    expect_reply(&mut conn, b"+OK\r\n$5\r\nwhole\r\n");
}

#[test]
fn failed_swaps_leave_the_old_version_serving_with_its_state() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET")
        .arg("keep")
        .arg("me")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("list")
        .arg("a")
        .arg("b")
        .query(&mut c)
        .unwrap();
    let junk = tempfile::Builder::new().suffix(".wasm").tempfile().unwrap();
    std::fs::write(junk.path(), b"not wasm at all").unwrap();
    let cases: [(&str, &str); 5] = [
        (
            &guest("reject-state").display().to_string(),
            "rejected the kv/1 state: this build rejects every state",
        ),
        (
            &guest("trap-import").display().to_string(),
            "trapped in import-state(kv/1)",
        ),
        (
            &guest("trap-export").display().to_string(),
            "validation failed: the new version trapped exporting the kv/1 state",
        ),
        (
            &guest("echo").display().to_string(),
            "no state format in common: the new version imports [echo/1], the running version exports [kv/1]",
        ),
        (
            &junk.path().display().to_string(),
            "is not a WebAssembly file",
        ),
    ];
    for (path, cause) in cases {
        let out = server.command("swap", &[path]);
        assert_eq!(out.status.code(), Some(1), "swap to {path}: {}", out.stderr);
        assert!(
            out.stderr
                .contains("swap aborted, the running version keeps serving"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(cause),
            "swap to {path}: expected {cause:?} in {}",
            out.stderr
        );
        // Same connection, same state.
        let v: String = redis::cmd("GET").arg("keep").query(&mut c).unwrap();
        assert_eq!(v, "me");
        let l: Vec<String> = redis::cmd("LRANGE")
            .arg("list")
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .unwrap();
        assert_eq!(l, vec!["a", "b"]);
    }
    let out = server.command("swap", &["/nonexistent/new.wasm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("no such file"), "{}", out.stderr);
    let status = status_json(&server);
    assert!(status.contains("\"generation\": 1"), "{status}");
    assert_eq!(
        status.matches("\"outcome\": \"aborted: ").count(),
        4,
        "{status}"
    );
    assert!(status.contains("\"traps\": 0"), "{status}");
}

#[test]
fn an_old_version_that_traps_in_export_is_rebuilt_and_the_swap_aborted() {
    // trap-export imports anything and traps when asked to export: as the
    // running version it cannot hand its state over. The host cannot keep
    // a trapped instance, so it rebuilds it from its journal and says so.
    let server = Served::start("trap-export", &[]);
    let out = server.command("swap", &[guest("kv").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the running version trapped in export-state(kv/1)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("its state was rebuilt from the last snapshot and the journal"),
        "{}",
        out.stderr
    );
    let mut conn = TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"hello\n").unwrap();
    let mut reply = [0u8; 8];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"1 hello\n");
}

#[test]
fn rollback_is_refused_while_kv_v2_holds_hashes_and_allowed_without() {
    let server = Served::start("kv", &[]);
    let out = server.command("rollback", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("nothing to roll back to"),
        "{}",
        out.stderr
    );

    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET").arg("s").arg("1").query(&mut c).unwrap();
    server.swap_to("kv-v2");
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("v")
        .arg("g")
        .arg("w")
        .query(&mut c)
        .unwrap();
    let out = server.command("rollback", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("rollback refused: no state format in common"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("exports [kv/2]"), "{}", out.stderr);
    assert!(out.stderr.contains("imports [kv/1]"), "{}", out.stderr);
    // Still kv-v2, with the hash.
    let v: String = redis::cmd("HGET").arg("h").arg("g").query(&mut c).unwrap();
    assert_eq!(v, "w");

    let _: () = redis::cmd("DEL").arg("h").query(&mut c).unwrap();
    let out = server.command("rollback", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("rollback committed"), "{}", out.stdout);
    assert!(out.stdout.contains("kv.wasm"), "{}", out.stdout);
    let v: String = redis::cmd("GET").arg("s").query(&mut c).unwrap();
    assert_eq!(v, "1");
    // kv again: no hashes.
    let e = redis::cmd("HGET")
        .arg("h")
        .arg("f")
        .query::<String>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("unknown command"), "{e}");
    let status = status_json(&server);
    assert!(status.contains("\"generation\": 3"), "{status}");
    assert!(status.contains("\"kind\": \"rollback\""), "{status}");
}

#[test]
fn chat_users_stay_joined_and_every_message_is_delivered_once_across_a_swap() {
    let server = Served::start("chat", &["--config", "history=100000"]);
    let addr = server.addr();
    let room = Room::join(addr, "before the swap");
    let (room, report, messages) = room.talk_through(|| server.swap_to("chat-v2"));
    assert!(report.contains("state   chat/1"), "{report}");
    let mut room = room;
    // Still registered and joined under chat-v2; LIST is new in v2.
    room.check_joined();
    room.carol.send("LIST");
    room.carol.expect(" 322 carol #rust 3 :before the swap");
    // History kept: a newcomer gets every message.
    let history = Room::newcomer_history(addr, "before the swap");
    assert_eq!(history.len(), messages, "{history:#?}");
    // chat-v2 stamps what it receives: messages before the swap replay as
    // they were, later ones with their time. Both kinds prove the swap
    // happened while alice was talking.
    let stamped = history
        .iter()
        .filter(|l| l.contains("PRIVMSG #rust :[20"))
        .count();
    assert!(
        stamped > 0 && stamped < messages,
        "{stamped} of {messages} stamped"
    );
    // Back to chat: chat-v2 still exports chat/1.
    let out = server.command("rollback", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("state   chat/1"), "{}", out.stdout);
    room.bob.send("PRIVMSG #rust :after rollback");
    room.alice
        .expect(":bob!bob@127.0.0.1 PRIVMSG #rust :after rollback");
}

#[test]
fn rollback_fresh_uses_the_kept_previous_version_and_status_flags_a_replaced_file() {
    // Serve a copy of kv, so the test can replace the file under it.
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("service.wasm");
    std::fs::copy(guest("kv"), &served).unwrap();
    let server = Served::start_raw(&served, &["--listen", "127.0.0.1:0"], 1);
    let mut c = redis_connect(&server);
    server.swap_to("kv-v2");
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("v")
        .query(&mut c)
        .unwrap();
    // A rebuild replaces the file: now it is not kv at all.
    std::fs::copy(guest("echo"), dir.path().join("new.wasm")).unwrap();
    std::fs::rename(dir.path().join("new.wasm"), &served).unwrap();
    let status = server.command("status", &[]);
    let echo_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(guest("echo")).unwrap()))
    };
    assert!(
        status.stdout.contains(&format!(
            "the file there has changed since it was loaded (now {}); rollback uses the version \
             kept in memory",
            &echo_hash[..12]
        )),
        "{}",
        status.stdout
    );

    // The state cannot go back (hashes); the refusal names the way out.
    let out = server.command("rollback", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains("run `wasmhost rollback --fresh`"),
        "{}",
        out.stderr
    );
    let out = server.command("rollback", &["--fresh"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("started fresh"), "{}", out.stdout);
    // The same connection is served by kv (not by the echo now on disk),
    // with fresh state.
    let pong: String = redis::cmd("PING").query(&mut c).unwrap();
    assert_eq!(pong, "PONG");
    let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(n, 0);
    let json = status_json(&server);
    assert!(json.contains("\"file_now\""), "{json}");
}
