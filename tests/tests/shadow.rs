//! Shadow swaps with real clients: the new version runs beside the old one
//! on the same events and takes over on commit with every key, reply and
//! connection; divergences, traps and a shadow too slow to keep up stop it
//! and leave the old version serving; every failure step of the state
//! machine in `host/src/service/shadow.rs` is provoked once.

use std::time::{Duration, Instant};

use serde_json::Value;
use wasmhost_tests::irc::Room;
use wasmhost_tests::load::{Load, check_keys, load_keys};
use wasmhost_tests::{Finished, LineConn, Served, guest, redis_connect};

fn status(server: &Served) -> Value {
    let out = server.command("status", &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    serde_json::from_str(&out.stdout).expect("status JSON")
}

/// `wasmhost swap GUEST --shadow ARGS...`.
fn shadow(server: &Served, guest_name: &str, args: &[&str]) -> Finished {
    let path = guest(guest_name);
    let mut all = vec![path.to_str().unwrap(), "--shadow"];
    all.extend_from_slice(args);
    server.command("swap", &all)
}

fn json(out: &Finished) -> Value {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        out.stderr,
        out.stdout
    );
    serde_json::from_str(&out.stdout).expect("JSON report")
}

/// Polls `status` until the shadow's state is `state` (at most 20 s).
fn wait_for_shadow(server: &Served, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(server);
        if s["shadow"]["state"] == state {
            return s["shadow"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the shadow never became {state}: {:#}\n{}",
            s["shadow"],
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn redis_cmd<T: redis::FromRedisValue>(c: &mut redis::Connection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c).unwrap()
}

#[test]
fn kv_to_kv_v2_by_shadow_under_fifty_clients_keeps_every_key_reply_and_timer() {
    let server = Served::start("kv", &[]);
    load_keys(server.addr(), 0, 100_000).unwrap();
    let mut c = redis_connect(&server);
    // Reclaimed by kv's sweep timer: proves the timers work after commit.
    let _: () = redis_cmd(&mut c, &["SET", "short-lived", "x", "PX", "1500"]);
    let load = Load::start(&server, 50);
    load.wait(300);
    let report = json(&shadow(
        &server,
        "kv-v2",
        &["--commit-after", "1000", "--json"],
    ));
    assert_eq!(report["kind"], "shadow", "{report:#}");
    assert_eq!(report["generation_to"], 2, "{report:#}");
    assert!(report["pause_us"].as_u64().is_some(), "{report:#}");
    assert_eq!(report["shadow"]["sync"], "journal", "{report:#}");
    assert!(report["shadow"]["mirrored"].as_u64().unwrap() >= 1000);
    assert_eq!(report["shadow"]["divergences"], 0, "{report:#}");
    assert_eq!(report["connections"], 51, "{report:#}");
    load.wait(300);
    // Every reply of every client was right, and everything it wrote is there.
    let rounds = load.finish(&server);
    check_keys(server.addr(), 0, 100_000).unwrap();
    // kv-v2 serves: hashes work on a connection opened before the swap.
    let added: i64 = redis_cmd(&mut c, &["HSET", "h", "f", "v"]);
    assert_eq!(added, 1);
    let expected = 100_000 + 1 + 2 * rounds.len() as i64 + rounds.iter().sum::<u64>() as i64;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys: i64 = redis_cmd(&mut c, &["DBSIZE"]);
        if keys == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the expired key was never reclaimed: {keys} keys, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = status(&server);
    assert_eq!(s["traps"], 0, "{s:#}");
    assert_eq!(s["shadow"]["state"], "committed", "{s:#}");
    assert_eq!(s["swaps"][0]["kind"], "shadow", "{s:#}");
    assert!(
        s["component"]["path"]
            .as_str()
            .unwrap()
            .ends_with("kv-v2.wasm")
    );
    // The new version's journal works: a snapshot, then its own rollback.
    let out = server.command("snapshot", &[]);
    assert!(out.status.success(), "{}", out.stderr);
}

#[test]
fn a_million_keys_move_by_shadow_and_every_one_reads_back() {
    let server = Served::start("kv", &[]);
    load_keys(server.addr(), 0, 1_000_000).unwrap();
    let load = Load::start(&server, 4);
    load.wait(100);
    let report = json(&shadow(
        &server,
        "kv-v2",
        &["--commit-after", "200", "--json"],
    ));
    assert_eq!(report["kind"], "shadow", "{report:#}");
    assert_eq!(report["shadow"]["divergences"], 0, "{report:#}");
    load.wait(100);
    load.finish(&server);
    check_keys(server.addr(), 0, 1_000_000).unwrap();
}

#[test]
fn a_divergence_stops_the_shadow_with_both_outputs_and_the_old_version_serves_on() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = redis_cmd(&mut c, &["SET", "k", "v"]);
    let out = shadow(&server, "kv-odd", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("in step"), "{}", out.stdout);
    // kv-odd answers ECHO reversed: the first ECHO stops the shadow.
    let echoed: String = redis_cmd(&mut c, &["ECHO", "hello"]);
    assert_eq!(echoed, "hello");
    let stopped = wait_for_shadow(&server, "stopped");
    let why = stopped["stopped"].as_str().unwrap();
    assert!(why.contains("diverged"), "{why}");
    assert!(why.contains(r#""$5\r\nhello\r\n""#), "{why}");
    assert!(why.contains(r#""$5\r\nolleh\r\n""#), "{why}");
    assert!(why.contains("ECHO"), "the event is shown: {why}");
    // Nothing to commit; the old version serves with its state.
    let out = server.command("commit", &[]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("no shadow swap is running"),
        "{}",
        out.stderr
    );
    let v: String = redis_cmd(&mut c, &["GET", "k"]);
    assert_eq!(v, "v");
    assert_eq!(status(&server)["generation"], 1);

    // Allowed: counted and kept, and the commit goes through.
    let out = shadow(&server, "kv-odd", &["--allow-divergence"]);
    assert!(out.status.success(), "{}", out.stderr);
    for word in ["one", "two", "three"] {
        let echoed: String = redis_cmd(&mut c, &["ECHO", word]);
        assert_eq!(echoed, word);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&server)["shadow"]["divergences"] != 3 {
        assert!(Instant::now() < deadline, "{:#}", status(&server)["shadow"]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = server.command("status", &[]);
    assert!(
        text.stdout.contains("3 divergences (allowed)"),
        "{}",
        text.stdout
    );
    let out = server.command("commit", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("3 divergences allowed"),
        "{}",
        out.stderr
    );
    let echoed: String = redis_cmd(&mut c, &["ECHO", "abc"]);
    assert_eq!(echoed, "cba", "kv-odd is live");
    let v: String = redis_cmd(&mut c, &["GET", "k"]);
    assert_eq!(v, "v");
}

#[test]
fn a_shadow_that_traps_is_stopped_while_catching_up_or_in_step_and_the_old_version_serves_on() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = redis_cmd(&mut c, &["SET", "k", "v"]);
    // In step: the live version answers ODD-TRAP with an error, the
    // shadow traps on it.
    let out = shadow(&server, "kv-odd", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    let err = redis::cmd("ODD-TRAP").query::<String>(&mut c).unwrap_err();
    assert!(err.to_string().contains("unknown command"), "{err}");
    let stopped = wait_for_shadow(&server, "stopped");
    let why = stopped["stopped"].as_str().unwrap();
    assert!(why.contains("trapped in on-data"), "{why}");
    let s = status(&server);
    assert_eq!(s["traps"], 0, "the live version never trapped: {s:#}");
    assert_eq!(s["generation"], 1);
    // Catching up: ODD-TRAP is in the journal now, and the shadow's replay
    // of it traps. `swap --shadow` says so and fails.
    let out = shadow(&server, "kv-odd", &["--commit-after", "10"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("failed catching up"), "{}", out.stderr);
    assert!(out.stderr.contains("keeps serving"), "{}", out.stderr);
    let v: String = redis_cmd(&mut c, &["GET", "k"]);
    assert_eq!(v, "v");
}

#[test]
fn a_shadow_too_slow_to_keep_up_is_stopped_with_the_reason() {
    let server = Served::start("kv", &[]);
    let out = shadow(&server, "kv-odd", &["--max-lag-ms", "300"]);
    assert!(out.status.success(), "{}", out.stderr);
    let mut c = redis_connect(&server);
    // kv-odd costs milliseconds per command after ODD-SLOW; the live kv
    // answers as always.
    let _ = redis::cmd("ODD-SLOW").query::<String>(&mut c);
    let started = Instant::now();
    let mut sent = 0;
    while status(&server)["shadow"]["state"] != "stopped" {
        assert!(
            started.elapsed() < Duration::from_secs(30) && sent < 200_000,
            "never stopped: {:#}",
            status(&server)["shadow"]
        );
        for _ in 0..200 {
            let pong: String = redis_cmd(&mut c, &["PING"]);
            assert_eq!(pong, "PONG");
            sent += 1;
        }
    }
    let why = status(&server)["shadow"]["stopped"].clone();
    assert!(
        why.as_str().unwrap().contains("too slow to keep up"),
        "{why}"
    );
    let pong: String = redis_cmd(&mut c, &["PING"]);
    assert_eq!(pong, "PONG");
}

#[test]
fn chat_users_stay_joined_through_a_shadow_swap_to_chat_v2_with_divergence_allowed() {
    let server = Served::start("chat", &["--config", "history=100000"]);
    let addr = server.addr();
    let room = Room::join(addr, "before the shadow");
    let (mut room, out, messages) = room.talk_through(|| {
        shadow(
            &server,
            "chat-v2",
            &["--allow-divergence", "--commit-after", "50"],
        )
    });
    assert!(out.status.success(), "{}\n{}", out.stderr, server.stderr());
    assert!(out.stdout.contains("shadow committed"), "{}", out.stdout);
    room.check_joined();
    room.carol.send("LIST");
    room.carol.expect(" 322 carol #rust 3 :before the shadow");
    let history = Room::newcomer_history(addr, "before the shadow");
    assert_eq!(history.len(), messages, "{history:#?}");
}

#[test]
fn an_echo_shadow_knows_the_connections_open_before_it_and_commits_without_a_divergence() {
    let server = Served::start("echo", &[]);
    let mut conn = LineConn::open(&server);
    conn.send("before");
    assert_eq!(conn.recv(), "before");
    let out = shadow(&server, "echo", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    // echo's state (echo/1) is empty; its journal holds the connect and
    // the line, which the shadow replays.
    assert!(out.stdout.contains("by journal"), "{}", out.stdout);
    for i in 0..20 {
        conn.send(&format!("line {i}"));
        assert_eq!(conn.recv(), format!("line {i}"));
    }
    let report = server.command("commit", &["--json"]);
    let report = json(&report);
    assert_eq!(report["shadow"]["divergences"], 0, "{report:#}");
    assert!(report["shadow"]["mirrored"].as_u64().unwrap() >= 20);
    conn.send("after");
    assert_eq!(conn.recv(), "after");
}

#[test]
fn without_a_journal_the_shadow_is_synced_by_one_export() {
    let server = Served::start("kv", &["--journal", "off"]);
    load_keys(server.addr(), 0, 10_000).unwrap();
    let load = Load::start(&server, 8);
    load.wait(100);
    let report = json(&shadow(
        &server,
        "kv-v2",
        &["--commit-after", "200", "--json"],
    ));
    assert_eq!(report["shadow"]["sync"], "export", "{report:#}");
    assert_eq!(report["shadow"]["format"], "kv/1", "{report:#}");
    assert!(report["shadow"]["state_bytes"].as_u64().unwrap() > 10_000 * 20);
    load.finish(&server);
    check_keys(server.addr(), 0, 10_000).unwrap();
}

#[test]
fn while_a_shadow_runs_other_swaps_and_upgrades_are_refused_and_abort_drops_it() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let out = shadow(&server, "kv-v2", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    let again = shadow(&server, "kv-v2", &[]);
    assert!(!again.status.success());
    assert!(again.stderr.contains("already running"), "{}", again.stderr);
    let swap = server.command("swap", &[guest("kv-v2").to_str().unwrap()]);
    assert!(!swap.status.success());
    assert!(swap.stderr.contains("shadow swap"), "{}", swap.stderr);
    let upgrade = server.upgrade(&[]);
    assert!(!upgrade.status.success());
    assert!(upgrade.stderr.contains("shadow swap"), "{}", upgrade.stderr);
    let snapshot = server.command("snapshot", &[]);
    assert!(snapshot.status.success(), "{}", snapshot.stderr);
    let abort = server.command("abort", &[]);
    assert!(abort.status.success(), "{}", abort.stderr);
    assert!(abort.stdout.contains("aborted"), "{}", abort.stdout);
    let _: () = redis_cmd(&mut c, &["SET", "k", "v"]);
    let s = status(&server);
    assert_eq!(s["generation"], 1);
    assert_eq!(s["shadow"]["state"], "aborted", "{s:#}");
    // Now a plain swap goes through.
    server.swap_to("kv-v2");
}

/// Each failure step of the shadow's state machine, provoked with
/// `WASMHOST_TEST_SHADOW_FAIL`: the old version serves on each time.
#[test]
fn every_failure_step_leaves_the_old_version_serving() {
    for step in ["sync", "catch-up", "commit"] {
        let server = Served::start_env("kv", &[], &[("WASMHOST_TEST_SHADOW_FAIL", step)]);
        let mut c = redis_connect(&server);
        let _: () = redis_cmd(&mut c, &["SET", "k", step]);
        let out = shadow(&server, "kv-v2", &[]);
        let failed = match step {
            "commit" => {
                assert!(out.status.success(), "{}", out.stderr);
                let _: () = redis_cmd(&mut c, &["SET", "during", step]);
                let commit = server.command("commit", &[]);
                assert!(!commit.status.success(), "{}", commit.stdout);
                commit.stderr
            }
            _ => {
                assert!(!out.status.success(), "{step}: {}", out.stdout);
                out.stderr
            }
        };
        let expect = match step {
            "commit" => "did not hand over".to_string(),
            _ => format!("WASMHOST_TEST_SHADOW_FAIL={step}"),
        };
        assert!(failed.contains(&expect), "{step}: {failed}");
        assert!(failed.contains("serving") || step == "commit", "{failed}");
        let v: String = redis_cmd(&mut c, &["GET", "k"]);
        assert_eq!(v, step);
        let s = status(&server);
        assert_eq!(s["generation"], 1, "{step}: {s:#}");
        if step == "commit" {
            // The shadow runs on after the refused commit; abort drops it.
            assert_eq!(s["shadow"]["state"], "in step", "{s:#}");
            let abort = server.command("abort", &[]);
            assert!(abort.status.success(), "{}", abort.stderr);
            let v: String = redis_cmd(&mut c, &["GET", "during"]);
            assert_eq!(v, step);
        }
    }
}

#[test]
fn after_a_shadow_commit_a_state_dir_restart_has_the_new_versions_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap(), "--fsync", "always"];
    let server = Served::start("kv", &args);
    load_keys(server.addr(), 0, 2_000).unwrap();
    let mut c = redis_connect(&server);
    let out = shadow(&server, "kv-v2", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    let _: () = redis_cmd(&mut c, &["SET", "during", "shadow"]);
    let commit = server.command("commit", &[]);
    assert!(commit.status.success(), "{}", commit.stderr);
    let _: i64 = redis_cmd(&mut c, &["HSET", "h", "f", "after"]);
    drop(c);
    drop(server); // SIGKILL
    let server = Served::start("kv-v2", &args);
    let mut c = redis_connect(&server);
    let v: String = redis_cmd(&mut c, &["HGET", "h", "f"]);
    assert_eq!(v, "after");
    let v: String = redis_cmd(&mut c, &["GET", "during"]);
    assert_eq!(v, "shadow");
    check_keys(server.addr(), 0, 2_000).unwrap();
}

/// The running version traps while a shadow runs: its state is rebuilt
/// from the journal, the trapping event never reaches the shadow (it is
/// not journaled either), and the shadow commits with no divergence.
#[test]
fn a_trap_in_the_running_version_leaves_the_shadow_in_step() {
    let server = Served::start("kv", &["--config", "enable-debug-command=yes"]);
    let mut c = redis_connect(&server);
    let _: () = redis_cmd(&mut c, &["SET", "a", "1"]);
    let out = shadow(&server, "kv-v2", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    let mut crasher = std::net::TcpStream::connect(server.addr()).unwrap();
    crasher
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    std::io::Write::write_all(&mut crasher, b"*2\r\n$5\r\nDEBUG\r\n$8\r\nSEGFAULT\r\n").unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut crasher, &mut rest).unwrap();
    assert_eq!(rest, b"", "the trapping connection is closed, unanswered");
    let _: () = redis_cmd(&mut c, &["SET", "b", "2"]);
    let s = status(&server);
    assert_eq!(s["durable"]["recoveries"], 1, "{s:#}");
    assert_eq!(s["shadow"]["state"], "in step", "{s:#}");
    let commit = server.command("commit", &["--json"]);
    let report = json(&commit);
    assert_eq!(report["shadow"]["divergences"], 0, "{report:#}");
    for (k, v) in [("a", "1"), ("b", "2")] {
        let got: String = redis_cmd(&mut c, &["GET", k]);
        assert_eq!(got, v);
    }
    // The old version is kept for a rollback, as after any swap.
    let back = server.command("rollback", &[]);
    assert!(back.status.success(), "{}", back.stderr);
    assert!(back.stdout.contains("state   kv/1"), "{}", back.stdout);
    let got: String = redis_cmd(&mut c, &["GET", "b"]);
    assert_eq!(got, "2");
}

/// SIGTERM while a shadow runs: the host shuts down as always.
#[test]
fn shutdown_while_a_shadow_runs_is_clean() {
    let server = Served::start("kv", &[]);
    let out = shadow(&server, "kv-v2", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status:?}\n{stderr}");
}
