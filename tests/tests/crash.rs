//! `--state-dir`: `kill -9` of the host loses nothing a client saw
//! acknowledged, side by side with a real redis-server with
//! `--appendonly yes --appendfsync always`; chat keeps its channels, topics
//! and history (its users are gone with their connections); a damaged
//! journal is handled as documented; a state dir that cannot be written
//! stops the service without acknowledging anything unwritten.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmhost_tests::irc::IrcClient;
use wasmhost_tests::{RedisServer, Served, guest, run};

const CLIENTS: usize = 8;

/// What one client saw acknowledged: the last INCR reply of its counter
/// and the SETs that got +OK.
#[derive(Default, Debug)]
struct Acked {
    counter: i64,
    keys: Vec<String>,
}

/// Writes until the server goes away (or 20,000 writes, or 30 s): each
/// client alternately INCRs its counter and SETs a new key, remembering
/// what was acknowledged. `running` turns true once every client wrote.
fn write_until_killed(addr: SocketAddr, running: Arc<AtomicBool>) -> Vec<Acked> {
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let started = started.clone();
            let running = running.clone();
            std::thread::spawn(move || {
                let mut acked = Acked::default();
                let Ok(mut conn) = TcpStream::connect(addr) else {
                    return acked;
                };
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                for i in 0..20_000 {
                    if Instant::now() > deadline {
                        break;
                    }
                    let counter = format!("counter:{c}");
                    let request =
                        format!("*2\r\n$4\r\nINCR\r\n${}\r\n{counter}\r\n", counter.len());
                    let Some(reply) = exchange(&mut conn, &request) else {
                        break;
                    };
                    let n: i64 = reply[1..reply.len() - 2].parse().expect("an integer reply");
                    assert_eq!(
                        n,
                        acked.counter + 1,
                        "client {c}: INCR went {n} after {}",
                        acked.counter
                    );
                    acked.counter = n;
                    let key = format!("k:{c}:{i}");
                    let request =
                        format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$1\r\nv\r\n", key.len());
                    let Some(reply) = exchange(&mut conn, &request) else {
                        break;
                    };
                    assert_eq!(reply, "+OK\r\n");
                    acked.keys.push(key);
                    if i == 10 {
                        started.fetch_add(1, Ordering::SeqCst);
                    }
                    if started.load(Ordering::SeqCst) == CLIENTS {
                        running.store(true, Ordering::SeqCst);
                    }
                }
                acked
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Sends `request` and reads one line of reply; `None` once the server is
/// gone.
fn exchange(conn: &mut TcpStream, request: &str) -> Option<String> {
    conn.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => reply.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8(reply).unwrap())
}

/// Every acknowledged write is there: each counter is at least what its
/// client saw (one more if the last INCR was written but its reply lost),
/// and every acknowledged key exists.
fn check_acked(addr: SocketAddr, acked: &[Acked], who: &str) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut total = 0;
    for (c, a) in acked.iter().enumerate() {
        let counter = format!("counter:{c}");
        let reply = exchange(
            &mut conn,
            &format!("*2\r\n$3\r\nGET\r\n${}\r\n{counter}\r\n", counter.len()),
        )
        .unwrap();
        let value = if reply == "$-1\r\n" {
            0
        } else {
            let mut body = vec![0u8; reply[1..reply.len() - 2].parse::<usize>().unwrap() + 2];
            conn.read_exact(&mut body).unwrap();
            String::from_utf8_lossy(&body[..body.len() - 2])
                .parse()
                .unwrap()
        };
        assert!(
            value == a.counter || value == a.counter + 1,
            "{who}: client {c}'s counter is {value}, its last acknowledged INCR said {}",
            a.counter
        );
        for key in &a.keys {
            let reply = exchange(
                &mut conn,
                &format!("*2\r\n$6\r\nEXISTS\r\n${}\r\n{key}\r\n", key.len()),
            )
            .unwrap();
            assert_eq!(reply, ":1\r\n", "{who}: acknowledged key {key} is lost");
        }
        total += a.keys.len();
    }
    assert!(
        total > CLIENTS * 10,
        "{who}: too few writes to show anything ({total})"
    );
}

/// Runs the load against a server, kills it with SIGKILL once every client
/// is writing (`kill` does it), and returns what was acknowledged.
fn load_and_kill(addr: SocketAddr, kill: impl FnOnce()) -> Vec<Acked> {
    let running = Arc::new(AtomicBool::new(false));
    let flag = running.clone();
    let load = std::thread::spawn(move || write_until_killed(addr, flag));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    kill();
    load.join().unwrap()
}

#[test]
fn kill_9_loses_no_acknowledged_write_like_redis_with_appendfsync_always() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    // Snapshots every 300 events: the kill often comes while one is being
    // written in the background, with the chain of journals in use.
    let args = [
        "--state-dir",
        state,
        "--fsync",
        "always",
        "--snapshot-events",
        "300",
    ];
    let server = Served::start("kv", &args);
    let acked = load_and_kill(server.addr(), || drop(server)); // SIGKILL
    let mut server = Served::start("kv", &args);
    server.wait_for_output(
        |t| t.contains("state restored from"),
        Duration::from_secs(10),
    );
    check_acked(server.addr(), &acked, "wasmhost");
    // The clients' connections were open at the crash: the restored
    // service closed them (on-close) and serves new ones.
    let status = server.command("status", &["--json"]);
    assert!(
        status.stdout.contains("\"connections\": 0"),
        "{}",
        status.stdout
    );

    // The same load against redis-server, killed the same way.
    let redis_dir = dir.path().join("redis");
    std::fs::create_dir(&redis_dir).unwrap();
    let redis = RedisServer::with_aof(&redis_dir, "always").expect("redis-server (.ci/setup)");
    let acked = load_and_kill(redis.addr, || drop(redis)); // SIGKILL
    let redis = RedisServer::with_aof(&redis_dir, "always").expect("redis-server");
    check_acked(redis.addr, &acked, "redis-server");
}

#[test]
fn chat_keeps_channels_topics_and_history_through_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap()];
    let server = Served::start("chat", &args);
    let mut alice = IrcClient::register(server.addr(), "alice");
    alice.send("JOIN #keep");
    alice.expect(" 366 alice #keep ");
    alice.send("TOPIC #keep :still here");
    alice.expect("TOPIC #keep :still here");
    alice.send("PRIVMSG #keep :written before the crash");
    alice.sync("before-kill");
    drop(server); // SIGKILL
    let server = Served::start("chat", &args);
    // alice's connection died with the host: her nick is free again.
    let mut bob = IrcClient::register(server.addr(), "alice");
    bob.send("JOIN #keep");
    let seen = bob.sync("after-restart").join("\n");
    assert!(seen.contains(" 366 alice #keep "), "{seen}");
    assert!(seen.contains("still here"), "{seen}");
    assert!(seen.contains("written before the crash"), "{seen}");
}

#[test]
fn a_corrupt_journal_refuses_to_start_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap(), "--fsync", "always"];
    let server = Served::start("kv", &args);
    let mut c = wasmhost_tests::redis_connect(&server);
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(i)
            .query(&mut c)
            .unwrap();
    }
    drop(server);
    let journal = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".log"))
        .unwrap();
    let mut bytes = std::fs::read(&journal).unwrap();
    // A torn last record (the crash cut its write): dropped with a warning.
    std::fs::write(&journal, &bytes[..bytes.len() - 3]).unwrap();
    let mut server = Served::start("kv", &args);
    server.wait_for_output(
        |t| t.contains("dropped an incomplete record"),
        Duration::from_secs(10),
    );
    let mut c = wasmhost_tests::redis_connect(&server);
    let v: i64 = redis::cmd("GET").arg("k48").query(&mut c).unwrap();
    assert_eq!(v, 48);
    drop(server);
    // A flipped byte mid-journal: the start is refused with what to do.
    bytes = std::fs::read(&journal).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&journal, &bytes).unwrap();
    let out = run(&[
        "serve",
        guest("kv").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-control",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("is corrupt at byte"), "{}", out.stderr);
    assert!(out.stderr.contains("truncate -s"), "{}", out.stderr);
}

#[test]
fn a_journal_that_cannot_be_written_stops_the_service_before_any_reply() {
    no_reply_when_failing("journal-write");
}

#[test]
fn a_snapshot_that_cannot_be_written_stops_the_service_before_any_reply() {
    no_reply_when_failing("snapshot-write");
}

/// With `WASMHOST_TEST_DURABLE_FAIL=step` a write gets no reply, the log
/// says why and `status` shows the service stopped.
fn no_reply_when_failing(step: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap()];
    let mut server = Served::start_env("kv", &args, &[("WASMHOST_TEST_DURABLE_FAIL", step)]);
    let mut c = TcpStream::connect(server.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert_eq!(rest, b"", "no reply for a write that was not written");
    server.wait_for_output(
        |t| t.contains("the state dir cannot be written") && t.contains(step),
        Duration::from_secs(10),
    );
    let status = server.command("status", &["--json"]);
    assert!(status.stdout.contains("\"stopped\""), "{}", status.stdout);
}

/// Snapshots by threshold, a host upgrade (the new process writes its own
/// snapshot) and `wasmhost snapshot`, then `kill -9`: everything is there,
/// and the state dir holds one snapshot and its journal.
#[test]
fn snapshots_and_an_upgrade_keep_the_state_dir_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = [
        "--state-dir",
        state.to_str().unwrap(),
        "--fsync",
        "always",
        "--snapshot-events",
        "40",
    ];
    let server = Served::start("kv", &args);
    let mut c = wasmhost_tests::redis_connect(&server);
    let set = |c: &mut redis::Connection, from: usize, to: usize| {
        for i in from..to {
            let _: () = redis::cmd("SET")
                .arg(format!("k{i}"))
                .arg(i)
                .query(c)
                .unwrap();
        }
    };
    set(&mut c, 0, 100);
    server.upgrade_ok(&[]);
    set(&mut c, 100, 200);
    let out = server.command("snapshot", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    set(&mut c, 200, 220);
    // Snapshots are written in the background; once the last one is, the
    // files before it are removed: one snapshot and its journal remain.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let files: Vec<String> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != "fleet.json")
            .collect();
        if files.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "old files stay: {files:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    drop(server);
    let server = Served::start("kv", &args);
    let mut c = wasmhost_tests::redis_connect(&server);
    let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(n, 220);
    let v: i64 = redis::cmd("GET").arg("k219").query(&mut c).unwrap();
    assert_eq!(v, 219);
}

/// A timer armed before the crash fires after the restart: kv's expiry
/// sweep removes keys that expired while the host was down (DBSIZE counts
/// expired keys until they are swept; nothing here reads them).
#[test]
fn timers_armed_at_the_crash_fire_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap(), "--fsync", "always"];
    let server = Served::start("kv", &args);
    let mut c = wasmhost_tests::redis_connect(&server);
    let _: () = redis::cmd("SET").arg("keep").arg(1).query(&mut c).unwrap();
    for i in 0..10 {
        let _: () = redis::cmd("SET")
            .arg(format!("e{i}"))
            .arg("v")
            .arg("PX")
            .arg(300)
            .query(&mut c)
            .unwrap();
    }
    drop(c);
    drop(server); // SIGKILL
    let server = Served::start("kv", &args);
    let mut c = wasmhost_tests::redis_connect(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the sweep never ran: {n} keys");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = server.command("status", &["--json"]);
    assert!(status.stdout.contains("\"timers\": 0"), "{}", status.stdout);
}

/// Output made by an `on-close` that follows a held close (the QUIT that
/// chat sends the others when a user's connection ends) goes out at once,
/// not with the next event.
#[test]
fn output_after_a_held_close_is_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap(), "--fsync", "always"];
    let server = Served::start("chat", &args);
    let mut alice = IrcClient::register(server.addr(), "alice");
    alice.send("JOIN #room");
    alice.expect(" 366 alice #room ");
    let mut bob = IrcClient::register(server.addr(), "bob");
    bob.send("JOIN #room");
    bob.expect(" 366 bob #room ");
    alice.expect(":bob!bob@127.0.0.1 JOIN #room");
    bob.send("QUIT :bye");
    alice.expect(":bob!bob@127.0.0.1 QUIT");
    let mut carol = IrcClient::register(server.addr(), "carol");
    carol.send("JOIN #room");
    carol.expect(" 366 carol #room ");
    alice.expect(":carol!carol@127.0.0.1 JOIN #room");
    drop(carol); // the connection ends without QUIT: chat's on-close tells the room
    alice.expect(":carol!carol@127.0.0.1 QUIT");
}
