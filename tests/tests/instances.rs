//! `serve --instances N`: a stateless echo on several instances, with real
//! connections. New connections go to the least loaded instance, a swap
//! or rollback replaces every instance together or none of them, and a
//! service with state is refused.

use std::time::Duration;

use serde_json::Value;
use wasmhost_tests::{LineConn, Served, guest, run_wasmhost, test_cache_dir};

fn status(server: &Served) -> Value {
    let out = server.command("status", &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    serde_json::from_str(&out.stdout).expect("status JSON")
}

fn echoes(conn: &mut LineConn, line: &str) {
    conn.send(line);
    assert_eq!(conn.recv(), line);
}

/// Opens a connection and checks that it echoes (so the host has routed
/// it before the next one is opened).
fn open(server: &Served, name: &str) -> LineConn {
    let mut conn = LineConn::open(server);
    echoes(&mut conn, name);
    conn
}

fn per_instance(s: &Value, field: &str) -> Vec<u64> {
    let all = s["instances"].as_array().expect("an instances list");
    all.iter().map(|i| i[field].as_u64().unwrap()).collect()
}

/// Polls `status` until every instance has `want` open connections (the
/// host counts a closed connection once its close is processed).
fn wait_connections(server: &Served, want: &[u64]) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(server);
        if per_instance(&s, "connections") == want {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections never became {want:?}: {:#}",
            s["instances"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_go_to_the_least_loaded_instance() {
    let server = Served::start("echo-stateless", &["--instances", "3"]);
    let mut conns: Vec<LineConn> = (0..6).map(|i| open(&server, &format!("c{i}"))).collect();
    let s = wait_connections(&server, &[2, 2, 2]);
    assert_eq!(s["connections"], 6, "the total: {s:#}");
    // Round robin so far (ties go to the lowest index): c0 and c1 are on
    // instances 0 and 1. Once they close, the next two fill those first.
    conns.drain(0..2);
    let s = wait_connections(&server, &[1, 1, 2]);
    assert!(per_instance(&s, "events").iter().all(|&e| e > 0), "{s:#}");
    conns.push(open(&server, "n1"));
    conns.push(open(&server, "n2"));
    wait_connections(&server, &[2, 2, 2]);
    for (i, conn) in conns.iter_mut().enumerate() {
        echoes(conn, &format!("still {i}"));
    }
    let text = server.command("status", &[]);
    assert!(text.stdout.contains("instance 2"), "{}", text.stdout);
}

#[test]
fn a_swap_and_a_rollback_replace_every_instance() {
    let server = Served::start("echo-stateless", &["--instances", "2"]);
    let mut conns: Vec<LineConn> = (0..4).map(|i| open(&server, &format!("c{i}"))).collect();
    let before = status(&server);
    let old_hash = before["component"]["hash"].as_str().unwrap().to_string();
    // Another stateless build: the echo guest with its own hash.
    let other = guest("echo-stateless-v2");
    let out = server.command("swap", &[other.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}\n{}", out.stderr, server.stderr());
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["connections"], 4, "{report:#}");
    let s = status(&server);
    assert_eq!(per_instance(&s, "generation"), [2, 2], "{s:#}");
    let components: Vec<&str> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["component"].as_str().unwrap())
        .collect();
    assert_ne!(components[0], &old_hash[..12]);
    assert_eq!(components[0], components[1], "{s:#}");
    for (i, conn) in conns.iter_mut().enumerate() {
        echoes(conn, &format!("new {i}"));
    }
    let out = server.command("rollback", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    let s = status(&server);
    assert_eq!(per_instance(&s, "generation"), [3, 3], "{s:#}");
    assert_eq!(s["component"]["hash"], old_hash);
    for (i, conn) in conns.iter_mut().enumerate() {
        echoes(conn, &format!("back {i}"));
    }
}

#[test]
fn when_one_instance_fails_its_swap_none_swaps() {
    let server = Served::start_env(
        "echo-stateless",
        &["--listen", "127.0.0.1:0", "--instances", "3"],
        &[("WASMHOST_TEST_INSTANCE_FAIL", "1")],
    );
    let mut conns: Vec<LineConn> = (0..3).map(|i| open(&server, &format!("c{i}"))).collect();
    let other = guest("echo-stateless-v2");
    let out = server.command("swap", &[other.to_str().unwrap()]);
    assert!(!out.status.success(), "the swap must fail");
    assert!(
        out.stderr
            .contains("instance 1 of 3: failed on purpose (WASMHOST_TEST_INSTANCE_FAIL)"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("every instance keeps the old version"));
    let s = status(&server);
    assert_eq!(per_instance(&s, "generation"), [1, 1, 1], "{s:#}");
    for (i, conn) in conns.iter_mut().enumerate() {
        echoes(conn, &format!("old {i}"));
    }
    // A version with state is refused the same way, by every instance.
    let out = server.command("swap", &[guest("kv").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("keeps state"), "{}", out.stderr);
    let s = status(&server);
    assert_eq!(per_instance(&s, "generation"), [1, 1, 1], "{s:#}");
    for (i, conn) in conns.iter_mut().enumerate() {
        echoes(conn, &format!("still old {i}"));
    }
    // What a single instance can do and three cannot is refused with why.
    let out = server.command("swap", &[other.to_str().unwrap(), "--shadow"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--instances"), "{}", out.stderr);
}

#[test]
fn a_service_with_state_is_refused() {
    let cache = test_cache_dir();
    let (status, stderr) = run_wasmhost(&[
        "serve",
        guest("kv").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-control",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--instances",
        "2",
    ]);
    assert!(!status.success());
    assert!(stderr.contains("keeps state"), "{stderr}");
    assert!(stderr.contains("kv/1"), "{stderr}");
    let (status, stderr) = run_wasmhost(&[
        "serve",
        guest("echo-stateless").to_str().unwrap(),
        "--no-control",
        "--instances",
        "none",
    ]);
    assert!(!status.success());
    assert!(stderr.contains("or auto"), "{stderr}");
}
