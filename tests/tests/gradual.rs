//! Drain and canary with real connections: two versions of a stateless
//! echo serve side by side, connections go where the rule says, and
//! every way it ends (the old version's connections close, the timeout,
//! commit, abort, a trap in the new version) leaves every open connection
//! served.

use std::time::{Duration, Instant};

use serde_json::Value;
use wasmhost_tests::{LineConn, Served, guest};

fn status(server: &Served) -> Value {
    let out = server.command("status", &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    serde_json::from_str(&out.stdout).expect("status JSON")
}

/// `wasmhost swap echo-stateless ARGS...`, which must succeed; returns the
/// drain or canary's status.
fn start(server: &Served, args: &[&str]) -> Value {
    let path = guest("echo-stateless");
    let mut all = vec![path.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let out = server.command("swap", &all);
    assert!(out.status.success(), "{}\n{}", out.stderr, server.stderr());
    serde_json::from_str(&out.stdout).expect("JSON status")
}

/// Opens a connection and checks that it echoes (so the host has routed
/// it before the next one is opened).
fn open(server: &Served, name: &str) -> LineConn {
    let mut conn = LineConn::open(server);
    echoes(&mut conn, name);
    conn
}

fn echoes(conn: &mut LineConn, line: &str) {
    conn.send(line);
    assert_eq!(conn.recv(), line);
}

/// Polls `status` until `pred` holds on its `gradual` part (at most 10 s).
fn wait_gradual(server: &Served, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(server);
        if pred(&s["gradual"]) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "never {what}: {:#}\n{}",
            s["gradual"],
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_drain_sends_new_connections_to_the_new_version_and_ends_when_the_old_ones_close() {
    let server = Served::start("echo-stateless", &[]);
    let mut old: Vec<LineConn> = (0..3).map(|i| open(&server, &format!("old {i}"))).collect();
    let started = start(&server, &["--drain"]);
    assert_eq!(started["mode"], "drain", "{started:#}");
    assert_eq!(started["percent"], 100);
    assert_eq!(started["old"]["connections"], 3, "{started:#}");
    let mut new: Vec<LineConn> = (0..2).map(|i| open(&server, &format!("new {i}"))).collect();
    let s = status(&server);
    assert_eq!(s["gradual"]["new"]["connections"], 2, "{s:#}");
    assert_eq!(s["gradual"]["old"]["connections"], 3, "{s:#}");
    // Both versions serve their own connections.
    for (i, conn) in old.iter_mut().chain(new.iter_mut()).enumerate() {
        echoes(conn, &format!("both {i}"));
    }
    // While it runs, no other swap.
    let swap = server.command("swap", &[guest("echo-stateless").to_str().unwrap()]);
    assert!(!swap.status.success());
    assert!(swap.stderr.contains("a drain"), "{}", swap.stderr);
    // The old version's connections close: the drain is done.
    old.truncate(1);
    wait_gradual(&server, "down to one old connection", |g| {
        g["old"]["connections"] == 1
    });
    drop(old);
    let s = wait_gradual(&server, "done", |g| g["state"] == "done");
    assert_eq!(s["generation"], 2, "{s:#}");
    let last = s["swaps"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "drain", "{last:#}");
    assert_eq!(last["outcome"], "committed", "{last:#}");
    for (i, conn) in new.iter_mut().enumerate() {
        echoes(conn, &format!("after {i}"));
    }
    let mut later = open(&server, "later");
    echoes(&mut later, "again");
}

#[test]
fn at_the_drain_timeout_the_old_versions_connections_move_to_the_new_one() {
    let server = Served::start("echo-stateless", &[]);
    let mut old: Vec<LineConn> = (0..2).map(|i| open(&server, &format!("old {i}"))).collect();
    start(&server, &["--drain", "--drain-timeout-s", "1"]);
    let s = wait_gradual(&server, "done", |g| g["state"] == "done");
    let ended = s["gradual"]["ended"].as_str().unwrap();
    assert!(ended.contains("2 connections moved"), "{ended}");
    assert_eq!(s["connections"], 2, "{s:#}");
    for (i, conn) in old.iter_mut().enumerate() {
        echoes(conn, &format!("moved {i}"));
    }
}

#[test]
fn a_canary_takes_its_share_then_commit_drains_the_old_version() {
    let server = Served::start("echo-stateless", &[]);
    let started = start(&server, &["--canary", "30"]);
    assert_eq!(started["mode"], "canary", "{started:#}");
    // 30%: exactly 3 of 10 new connections.
    let mut conns: Vec<LineConn> = (0..10).map(|i| open(&server, &format!("c{i}"))).collect();
    let s = status(&server);
    assert_eq!(s["gradual"]["new"]["connections"], 3, "{s:#}");
    assert_eq!(s["gradual"]["old"]["connections"], 7, "{s:#}");
    let text = server.command("status", &[]).stdout;
    assert!(text.contains("canary       running, 30%"), "{text}");
    let commit = server.command("commit", &["--json"]);
    assert!(commit.status.success(), "{}", commit.stderr);
    let committed: Value = serde_json::from_str(&commit.stdout).unwrap();
    assert_eq!(committed["mode"], "drain", "{committed:#}");
    // Every new connection goes to the new version now.
    let extra: Vec<LineConn> = (0..4).map(|i| open(&server, &format!("d{i}"))).collect();
    let s = status(&server);
    assert_eq!(s["gradual"]["new"]["connections"], 7, "{s:#}");
    // The first ten close (the old version's seven among them): done.
    for conn in conns.iter_mut() {
        echoes(conn, "last");
    }
    drop(conns);
    let s = wait_gradual(&server, "done", |g| g["state"] == "done");
    assert_eq!(s["connections"], 4, "{s:#}");
    for (i, mut conn) in extra.into_iter().enumerate() {
        echoes(&mut conn, &format!("end {i}"));
    }
}

#[test]
fn an_aborted_canary_leaves_only_the_old_version_with_every_connection() {
    let server = Served::start("echo-stateless", &[]);
    start(&server, &["--canary", "50"]);
    let mut conns: Vec<LineConn> = (0..4).map(|i| open(&server, &format!("c{i}"))).collect();
    let s = status(&server);
    assert_eq!(s["gradual"]["new"]["connections"], 2, "{s:#}");
    let abort = server.command("abort", &[]);
    assert!(abort.status.success(), "{}", abort.stderr);
    assert!(abort.stdout.contains("canary aborted"), "{}", abort.stdout);
    let s = status(&server);
    assert_eq!(s["gradual"]["state"], "aborted", "{s:#}");
    assert_eq!(s["generation"], 1, "{s:#}");
    assert_eq!(s["connections"], 4, "{s:#}");
    for (i, conn) in conns.iter_mut().enumerate() {
        echoes(conn, &format!("back {i}"));
    }
    // New connections: the old version, with no canary.
    let mut later = open(&server, "later");
    echoes(&mut later, "still");
    let s = status(&server);
    assert_eq!(s["gradual"]["state"], "aborted");
    assert_eq!(s["connections"], 5, "{s:#}");
}

#[test]
fn a_trap_in_the_canary_aborts_it_and_closes_only_the_connection_that_made_it_trap() {
    let server = Served::start("echo-stateless", &[]);
    start(&server, &["--canary", "50"]);
    // 50%: the 2nd and 4th connections go to the canary.
    let mut conns: Vec<LineConn> = (0..4).map(|i| open(&server, &format!("c{i}"))).collect();
    conns[1].send("TRAP-NEW");
    let s = wait_gradual(&server, "aborted", |g| g["state"] == "aborted");
    let ended = s["gradual"]["ended"].as_str().unwrap();
    assert!(ended.contains("trapped"), "{ended}");
    assert_eq!(s["gradual"]["new"]["traps"], 1, "{s:#}");
    assert_eq!(s["traps"], 0, "the old version never trapped: {s:#}");
    // The culprit is closed; the other canary connection moved back.
    assert_eq!(s["connections"], 3, "{s:#}");
    for i in [0, 2, 3] {
        echoes(&mut conns[i], &format!("after {i}"));
    }
}

#[test]
fn services_with_state_are_refused_drain_and_canary_with_the_reason() {
    let server = Served::start("kv", &[]);
    for args in [&["--drain"][..], &["--canary", "10"]] {
        let mut all = vec![guest("kv-v2").to_str().unwrap().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = server.command("swap", &all);
        assert!(!out.status.success());
        assert!(out.stderr.contains("exports [kv/1]"), "{}", out.stderr);
        assert!(out.stderr.contains("--shadow"), "{}", out.stderr);
        assert!(out.stderr.contains("empty exportable()"), "{}", out.stderr);
    }
    // echo declares a state format (an empty one): refused as well.
    let echo = Served::start("echo", &[]);
    let out = echo.command(
        "swap",
        &[guest("echo-stateless").to_str().unwrap(), "--drain"],
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains("exports [echo/1]"), "{}", out.stderr);
    assert_eq!(status(&server)["generation"], 1);
    // A stateless service may not drain into a version with state: kv's
    // exportable() lists kv/1 once it has run init.
    let stateless = Served::start("echo-stateless", &[]);
    let out = stateless.command("swap", &[guest("kv").to_str().unwrap(), "--drain"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("the new version exports [kv/1]"),
        "{}",
        out.stderr
    );
    assert_eq!(status(&stateless)["generation"], 1);
}

#[test]
fn a_stateless_services_shadow_starts_fresh_with_every_open_connection() {
    let server = Served::start("echo-stateless", &[]);
    let mut conn = open(&server, "before");
    let out = server.command(
        "swap",
        &[guest("echo-stateless").to_str().unwrap(), "--shadow"],
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("by fresh"), "{}", out.stdout);
    for i in 0..10 {
        echoes(&mut conn, &format!("line {i}"));
    }
    let commit = server.command("commit", &["--json"]);
    assert!(commit.status.success(), "{}", commit.stderr);
    let report: Value = serde_json::from_str(&commit.stdout).unwrap();
    assert_eq!(report["shadow"]["divergences"], 0, "{report:#}");
    echoes(&mut conn, "after");
}

#[test]
fn a_rapid_swap_from_a_stateless_version_starts_the_new_one_with_every_connection() {
    let server = Served::start("echo-stateless", &[]);
    let mut conn = open(&server, "before");
    let out = server.command("swap", &[guest("echo-stateless").to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("keeps no state"), "{}", out.stderr);
    assert!(out.stdout.contains("state   none"), "{}", out.stdout);
    echoes(&mut conn, "after");
    assert_eq!(status(&server)["generation"], 2);
}

/// SIGTERM while a canary runs: both versions' connections get their
/// `on-close` and the host exits cleanly.
#[test]
fn shutdown_while_a_canary_runs_is_clean() {
    let server = Served::start("echo-stateless", &[]);
    start(&server, &["--canary", "50"]);
    let _conns: Vec<LineConn> = (0..4).map(|i| open(&server, &format!("c{i}"))).collect();
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status:?}\n{stderr}");
}
