//! State that survives traps: every event is journaled, snapshots are taken
//! at update points, and a trap rebuilds the state in a new instance from
//! the snapshot and the journal; only the connection whose event trapped is
//! closed. A guest that traps in a row is stopped by the restart budget.

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::Commands;
use wasmhost_tests::{LineConn, Served, guest, redis_connect};

const SEGFAULT: &[u8] = b"*2\r\n$5\r\nDEBUG\r\n$8\r\nSEGFAULT\r\n";

/// Sends DEBUG SEGFAULT on a connection of its own and checks that the
/// host closes that connection (with no reply).
fn segfault(server: &Served) {
    let mut crasher = TcpStream::connect(server.addr()).unwrap();
    crasher
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    std::io::Write::write_all(&mut crasher, SEGFAULT).unwrap();
    let mut rest = Vec::new();
    crasher.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"", "the trapping connection is closed, unanswered");
}

/// Makes faulty trap on a connection of its own and checks that the host
/// closes that connection (unanswered).
fn trap_on_a_connection_of_its_own(server: &Served) {
    let mut crasher = LineConn::open(server);
    crasher.send("trap");
    assert_eq!(crasher.recv(), "", "the trapping connection is closed");
}

fn status_json(server: &Served) -> serde_json::Value {
    let out = server.command("status", &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

/// `clients` threads each write `keys` keys (checking every reply) while
/// `during` runs; returns the keys each wrote. Bounded: every client has a
/// read timeout.
fn write_load(server: &Served, clients: usize, keys: usize, during: impl FnOnce(&AtomicUsize)) {
    let written = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let mut conn = redis_connect(server);
            let written = written.clone();
            std::thread::spawn(move || {
                for k in 0..keys {
                    let _: () = conn.set(format!("c{c}:k{k}"), k).unwrap();
                    written.fetch_add(1, Ordering::Relaxed);
                }
                // This connection was never closed: it still answers.
                let n: i64 = conn.incr(format!("c{c}:done"), 1).unwrap();
                assert_eq!(n, 1);
            })
        })
        .collect();
    during(&written);
    for t in threads {
        t.join().expect("a client lost its connection or a write");
    }
}

/// Waits until `written` passes `n` (bounded).
fn wait_for(written: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while written.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "the load stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every key each client wrote reads back.
fn check_keys(server: &Served, clients: usize, keys: usize) {
    let mut conn = redis_connect(server);
    for c in 0..clients {
        let names: Vec<String> = (0..keys).map(|k| format!("c{c}:k{k}")).collect();
        let values: Vec<Option<usize>> = conn.mget(&names).unwrap();
        let expected: Vec<Option<usize>> = (0..keys).map(Some).collect();
        assert_eq!(values, expected, "client {c}'s keys");
    }
}

/// The test: kv traps on DEBUG SEGFAULT under load from 50 clients;
/// every other client keeps its connection and correct replies, and every
/// key written before the trap is still there. Snapshots are taken every
/// 500 events, so the rebuild starts from a snapshot and replays a journal.
fn kv_keeps_every_key_through_a_trap_under_load(guest: &str) {
    const CLIENTS: usize = 50;
    const KEYS: usize = 120;
    let server = Served::start(
        guest,
        &[
            "--config",
            "enable-debug-command=yes",
            "--snapshot-events",
            "500",
        ],
    );
    write_load(&server, CLIENTS, KEYS, |written| {
        wait_for(written, CLIENTS * KEYS / 3);
        segfault(&server);
    });
    check_keys(&server, CLIENTS, KEYS);
    let status = status_json(&server);
    let durable = &status["durable"];
    assert_eq!(status["traps"], 1, "{status}");
    assert_eq!(durable["recoveries"], 1, "{status}");
    assert!(durable["snapshots"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(durable["journal"], "on");
}

wasmhost_tests::against! {
    rust => "kv", python => "kv-py";
    kv_keeps_every_key_through_a_trap_under_load,
}

/// Traps with events served between them (six, 300 ms apart, under load)
/// are each recovered: the budget counts traps in a row only.
#[test]
fn isolated_traps_under_load_never_exhaust_the_budget() {
    const CLIENTS: usize = 8;
    const KEYS: usize = 400;
    let server = Served::start(
        "kv",
        &[
            "--config",
            "enable-debug-command=yes",
            "--restart-budget",
            "5",
        ],
    );
    write_load(&server, CLIENTS, KEYS, |_| {
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(300));
            segfault(&server);
        }
    });
    check_keys(&server, CLIENTS, KEYS);
    let status = status_json(&server);
    assert_eq!(status["traps"], 6, "{status}");
    assert_eq!(status["durable"]["recoveries"], 6, "{status}");
    assert!(status["durable"].get("stopped").is_none(), "{status}");
}

/// A trap in `on-timer` drops that timer and keeps the state; no
/// connection is closed.
#[test]
fn a_trap_in_on_timer_drops_the_timer_and_keeps_the_state() {
    let mut server = Served::start("faulty", &[]);
    let mut a = LineConn::open(&server);
    a.send("one");
    assert_eq!(a.recv(), "1 one");
    a.send("trap-timer");
    assert_eq!(a.recv(), "2 trap-timer");
    server.wait_for_output(
        |t| t.contains("guest trapped in on-timer(7)") && t.contains("state rebuilt"),
        Duration::from_secs(20),
    );
    a.send("two");
    assert_eq!(a.recv(), "3 two", "same connection, same state");
    let status = status_json(&server);
    assert_eq!(status["timers"], 0, "the timer that trapped is dropped");
    assert_eq!(status["durable"]["recoveries"], 1, "{status}");
}

/// Replaying the journal rebuilds a state made of clock readings and
/// random numbers exactly: each event is replayed with its own time and
/// random seed. Once from `init` plus the journal, once from a snapshot.
#[test]
fn replay_rebuilds_the_same_clocks_and_random_values() {
    for args in [&[][..], &["--snapshot-events", "3"][..]] {
        let server = Served::start("faulty", args);
        let mut a = LineConn::open(&server);
        let mut remembered = Vec::new();
        for _ in 0..5 {
            a.send("remember");
            let reply = a.recv();
            let (_, memory) = reply.split_once(' ').unwrap();
            remembered.push(memory.to_string());
        }
        a.send("recall");
        let before = a.recv();
        trap_on_a_connection_of_its_own(&server);
        a.send("recall");
        let after = a.recv();
        let (_, before) = before.split_once(' ').unwrap();
        let (_, after) = after.split_once(' ').unwrap();
        assert_eq!(before, after, "{args:?}");
        assert_eq!(before, format!("recall [{}]", remembered.join("; ")));
        assert!(before.contains("random="), "{before}");
        let status = status_json(&server);
        assert_eq!(status["durable"]["recoveries"], 1, "{status}");
        if !args.is_empty() {
            assert_eq!(status["durable"]["snapshot_format"], "faulty/1");
        }
    }
}

/// A guest that traps on every event is stopped by the restart budget, not
/// rebuilt forever: its connections are closed, new ones are closed at
/// once, `status` says why, and a swap to a fixed version with `--fresh`
/// serves again.
#[test]
fn a_guest_that_traps_on_every_event_is_stopped_by_the_budget() {
    let mut server = Served::start(
        "faulty",
        &["--config", "trap-every-event=yes", "--restart-budget", "3"],
    );
    // Each connection's on-connect traps (it is closed) and so does the
    // on-close that follows: two traps in a row per connection.
    for _ in 0..2 {
        let mut a = LineConn::open(&server);
        assert_eq!(a.recv(), "", "closed: its on-connect trapped");
    }
    server.wait_for_output(|t| t.contains("service stopped"), Duration::from_secs(20));
    assert!(server.stderr().contains("4 times in a row"));
    let status = status_json(&server);
    let stopped = status["durable"]["stopped"].as_str().unwrap();
    assert!(stopped.contains("--restart-budget 3"), "{stopped}");
    let text = server.command("status", &[]).stdout;
    assert!(text.contains("STOPPED"), "{text}");
    let mut b = LineConn::open(&server);
    assert_eq!(b.recv(), "", "a stopped service closes new connections");
    // Only a fresh swap can serve again: there is no state to carry.
    let out = server.command("swap", &[guest("kv").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--fresh"), "{}", out.stderr);
    let out = server.command("swap", &["--fresh", guest("echo").to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let mut c = LineConn::open(&server);
    c.send("hello");
    assert_eq!(c.recv(), "hello");
    let status = status_json(&server);
    assert!(status["durable"].get("stopped").is_none(), "{status}");
}

/// `wasmhost snapshot` takes one now; with `--journal off` there is none to
/// take.
#[test]
fn wasmhost_snapshot_takes_one_on_demand() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    for i in 0..100 {
        let _: () = c.set(format!("k{i}"), i).unwrap();
    }
    let out = server.command("snapshot", &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["format"], "kv/1");
    assert!(
        report["state_bytes"].as_u64().unwrap() > 100 * 4,
        "{report}"
    );
    assert!(
        report["journal_events"].as_u64().unwrap() >= 100,
        "{report}"
    );
    let status = status_json(&server);
    assert_eq!(status["durable"]["snapshots"], 1, "{status}");
    assert_eq!(status["durable"]["journal_events"], 0, "{status}");
    let text = server.command("snapshot", &[]).stdout;
    assert!(text.contains("bytes of kv/1"), "{text}");

    // echo's state is empty (echo/1 has no bytes) but it has a format.
    let echo = Served::start("echo", &[]);
    let out = echo.command("snapshot", &[]);
    assert!(out.stdout.contains("0 bytes of echo/1"), "{}", out.stdout);
    let off = Served::start("kv", &["--journal", "off"]);
    let out = off.command("snapshot", &[]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--journal off"), "{}", out.stderr);
}

/// A swap's transferred state is the new generation's snapshot: a trap
/// right after the swap rebuilds from it.
#[test]
fn a_committed_swap_is_a_snapshot() {
    let server = Served::start("faulty", &[]);
    let mut a = LineConn::open(&server);
    a.send("one");
    assert_eq!(a.recv(), "1 one");
    server.swap_to("faulty");
    let status = status_json(&server);
    assert_eq!(status["durable"]["snapshot_format"], "faulty/1");
    assert_eq!(status["durable"]["journal_events"], 0, "{status}");
    trap_on_a_connection_of_its_own(&server);
    a.send("two");
    assert_eq!(a.recv(), "2 two");
}

/// Starts `guest` with `WASMHOST_TEST_DURABLE_FAIL=step`.
fn start_failing(guest_name: &str, step: &str, args: &[&str]) -> Served {
    Served::start_env(guest_name, args, &[("WASMHOST_TEST_DURABLE_FAIL", step)])
}

/// Each step of the recovery made to fail on purpose: the service still
/// serves afterwards.
#[test]
fn a_failed_rebuild_starts_fresh_and_serves_on() {
    let mut server = start_failing("faulty", "rebuild", &[]);
    let mut a = LineConn::open(&server);
    a.send("one");
    assert_eq!(a.recv(), "1 one");
    trap_on_a_connection_of_its_own(&server);
    server.wait_for_output(
        |t| t.contains("rebuilding the state failed") && t.contains("service restarted"),
        Duration::from_secs(20),
    );
    a.send("two");
    assert_eq!(a.recv(), "1 two", "fresh state, same connection");
}

#[test]
fn a_failed_snapshot_keeps_the_journal_and_serves_on() {
    let server = start_failing("faulty", "snapshot-export", &["--snapshot-events", "2"]);
    let mut a = LineConn::open(&server);
    for i in 1..=4 {
        a.send("x");
        assert_eq!(a.recv(), format!("{i} x"));
    }
    let status = status_json(&server);
    let durable = &status["durable"];
    assert_eq!(durable["snapshots"], 0, "{status}");
    assert!(
        durable["snapshot_failures"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(
        durable["last_snapshot_error"]
            .as_str()
            .unwrap()
            .contains("snapshot-export")
    );
    // The journal still rebuilds the state from `init`.
    trap_on_a_connection_of_its_own(&server);
    a.send("x");
    assert_eq!(a.recv(), "5 x");
}

/// After a host upgrade the state the new process imported is its
/// snapshot: a trap there rebuilds from it.
#[test]
fn after_a_host_upgrade_a_trap_rebuilds_from_the_carried_state() {
    let server = Served::start("faulty", &[]);
    let mut a = LineConn::open(&server);
    a.send("before");
    assert_eq!(a.recv(), "1 before");
    server.upgrade_ok(&[]);
    a.send("after");
    assert_eq!(a.recv(), "2 after");
    let status = status_json(&server);
    assert_eq!(status["durable"]["snapshot_format"], "faulty/1", "{status}");
    assert_eq!(status["durable"]["journal_events"], 1, "{status}");
    trap_on_a_connection_of_its_own(&server);
    a.send("rebuilt");
    assert_eq!(a.recv(), "3 rebuilt");
    assert_eq!(status_json(&server)["durable"]["recoveries"], 1);
}
