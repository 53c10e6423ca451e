//! `wasmhost migrate --move-ip`: a live kv service moved between two
//! "machines" (network namespaces on one bridge, made by each test and
//! removed after it) with its state and every connection, while clients
//! in a third namespace keep using it; and every failure before the
//! commit leaves the sender serving.
//!
//! These tests need root (namespaces, TCP_REPAIR, addresses); where the
//! machine cannot make namespaces they print `SKIPPED` with the reason.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use wasmhost::migrate::link::testing::Ca;
use wasmhost_tests::irc::Room;
use wasmhost_tests::load::Load;
use wasmhost_tests::netns::{SERVICE_PORT, World};
use wasmhost_tests::{Finished, Served};

/// The segment for one test, or `None` (with a SKIPPED line saying why)
/// where this machine cannot make one.
fn world(test: &str) -> Option<World> {
    match World::create() {
        Ok(w) => Some(w),
        Err(why) => {
            eprintln!("SKIPPED {test}: cannot make network namespaces here: {why}");
            None
        }
    }
}

fn ok(out: &Finished, what: &str, hosts: &[&Served]) {
    let logs: Vec<String> = hosts.iter().map(|h| h.stderr()).collect();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}\nhost logs:\n{}",
        out.stderr,
        out.stdout,
        logs.join("\n----\n")
    );
}

fn roundtrip(c: &mut TcpStream, send: &[u8], expect: &[u8]) {
    c.write_all(send).unwrap();
    let mut got = vec![0u8; expect.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expect)
    );
}

/// The scenario: 20 clients under load while kv moves A -> B -> A
/// five times; no connection breaks, every reply is right, every key is
/// kept, and a command half-sent before a move completes after it.
#[test]
fn kv_moves_between_machines_and_back_with_every_connection() {
    let Some(w) = world("kv_moves_between_machines_and_back_with_every_connection") else {
        return;
    };
    let a = w.host(&w.a, true, &[]);
    let mut b = w.host(&w.b, false, &[]);
    let mut seed = w.connect();
    roundtrip(
        &mut seed,
        b"*3\r\n$3\r\nSET\r\n$4\r\nseed\r\n$5\r\nfirst\r\n",
        b"+OK\r\n",
    );
    let load = Load::start_with(|| w.redis(), 20);
    load.wait(200);
    let mut half = w.connect();
    for round in 0..5 {
        // Half a command before the move, the rest after it.
        half.write_all(b"*3\r\n$3\r\nSET\r\n$4\r\nhalf").unwrap();
        let out = w.migrate(&a, &w.b, &[]);
        ok(&out, &format!("migrate A -> B (round {round})"), &[&a, &b]);
        assert!(
            out.stdout.contains("\"kind\": \"migrate\""),
            "{}",
            out.stdout
        );
        if round == 0 {
            eprintln!("first move's report: {}", out.stdout);
            // The receiver's status shows the move and its split.
            let status = b.command("status", &[]);
            assert!(status.status.success(), "{}", status.stderr);
            assert!(
                status.stdout.contains("address on + ARP"),
                "{}",
                status.stdout
            );
            // And the sender's says it has none, and where it went.
            let idle = a.command("status", &[]);
            assert!(idle.status.success(), "{}", idle.stderr);
            assert!(
                idle.stdout.contains("service      none") && idle.stdout.contains("moved   to"),
                "{}",
                idle.stdout
            );
        }
        roundtrip(&mut half, b"\r\n$2\r\nB!\r\n", b"+OK\r\n");
        load.wait(200);
        b.wait_for_output(
            |t| t.matches("serving as pid").count() >= 1,
            Duration::from_secs(10),
        );
        let out = w.migrate(&b, &w.a, &[]);
        ok(&out, &format!("migrate B -> A (round {round})"), &[&a, &b]);
        roundtrip(
            &mut half,
            b"*2\r\n$3\r\nGET\r\n$4\r\nhalf\r\n",
            b"$2\r\nB!\r\n",
        );
        load.wait(200);
    }
    let rounds = load.finish_with(w.redis());
    assert!(rounds.iter().all(|&n| n > 0));
    roundtrip(
        &mut seed,
        b"*2\r\n$3\r\nGET\r\n$4\r\nseed\r\n",
        b"$5\r\nfirst\r\n",
    );
    // Both hosts report the moves in their history.
    let status = a.command("status", &["--json"]);
    assert!(status.status.success(), "{}", status.stderr);
    assert!(
        status.stdout.matches("\"kind\": \"migrate\"").count() >= 2,
        "{}",
        status.stdout
    );
    drop(half);
    drop(a);
    drop(b);
}

/// `--relay`: the same load through five moves there and back; the
/// clients' connections stay on the first host and are relayed (through
/// every host they passed), new clients reach the receiver directly, and
/// nothing is lost.
#[test]
fn kv_relayed_between_machines_keeps_every_connection() {
    let Some(w) = world("kv_relayed_between_machines_keeps_every_connection") else {
        return;
    };
    let a = w.host(&w.a, true, &[]);
    let b = w.host(&w.b, false, &[]);
    let load = Load::start_with(|| w.redis(), 20);
    load.wait(200);
    let mut half = w.connect();
    for round in 0..5 {
        half.write_all(b"*3\r\n$3\r\nSET\r\n$4\r\nhalf").unwrap();
        let out = w.relay(&a, &w.b, &[]);
        ok(&out, &format!("relay A -> B (round {round})"), &[&a, &b]);
        assert!(out.stdout.contains("\"mode\": \"relay\""), "{}", out.stdout);
        roundtrip(&mut half, b"\r\n$2\r\nB!\r\n", b"+OK\r\n");
        // A new client reaches B on B's own address.
        let mut direct = w.connect_to(SocketAddr::from((w.b.ip, SERVICE_PORT)));
        roundtrip(
            &mut direct,
            b"*2\r\n$3\r\nGET\r\n$4\r\nhalf\r\n",
            b"$2\r\nB!\r\n",
        );
        load.wait(200);
        let out = w.relay(&b, &w.a, &[]);
        ok(&out, &format!("relay B -> A (round {round})"), &[&a, &b]);
        roundtrip(
            &mut direct,
            b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n",
            format!(":{}\r\n", round + 1).as_bytes(),
        );
        load.wait(200);
    }
    // The service listens on A's own address now; everything every client
    // wrote reads back there.
    load.finish_with(w.redis_to(SocketAddr::from((w.a.ip, SERVICE_PORT))));
}

/// A relayed connection ends as a direct one would, from either side: the
/// guest closing it (QUIT) reaches the client, the client closing it
/// reaches the guest, and once none is left the sender's relay ends.
#[test]
fn relayed_connections_close_from_either_side() {
    let Some(w) = world("relayed_connections_close_from_either_side") else {
        return;
    };
    let a = w.host(&w.a, true, &[]);
    let mut b = w.host(&w.b, false, &[]);
    let (mut quits, mut leaves) = (w.connect(), w.connect());
    roundtrip(&mut quits, b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n");
    roundtrip(&mut leaves, b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n");
    let out = w.relay(&a, &w.b, &[]);
    ok(&out, "relay A -> B", &[&a, &b]);
    assert!(out.stdout.contains("\"relayed\": 2"), "{}", out.stdout);
    // The guest closes: the client reads the reply, then the end.
    roundtrip(&mut quits, b"*1\r\n$4\r\nQUIT\r\n", b"+OK\r\n");
    let mut rest = Vec::new();
    quits
        .read_to_end(&mut rest)
        .expect("the end of the connection, not an error");
    assert!(rest.is_empty(), "{rest:?}");
    // The client closes: the guest sees it, and the relay ends.
    drop(leaves);
    b.wait_for_output(|t| t.contains("relay to "), Duration::from_secs(10));
    let mut a = a;
    a.wait_for_output(
        |t| t.contains("relay to ") && t.contains("ended (2 connections)"),
        Duration::from_secs(10),
    );
    let status = b.command("status", &["--json"]);
    assert!(
        status.stdout.contains("\"connections\": 0,"),
        "{}",
        status.stdout
    );
}

/// Each step at which the receiver fails on purpose: the migration fails
/// naming the step, and the sender serves every connection with its
/// state (and a later migration works).
#[test]
fn a_receiver_failing_at_any_step_leaves_the_sender_serving() {
    let Some(w) = world("a_receiver_failing_at_any_step_leaves_the_sender_serving") else {
        return;
    };
    let a = w.host(&w.a, true, &[]);
    let mut c = w.connect();
    roundtrip(
        &mut c,
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n0\r\n",
        b"+OK\r\n",
    );
    // Clients busy throughout: every resume happens under load.
    let load = Load::start_with(|| w.redis(), 10);
    for (n, step) in ["offer", "prepare", "crash", "import", "ready", "commit"]
        .into_iter()
        .enumerate()
    {
        let b = w.host(&w.b, false, &[("WASMHOST_TEST_MIGRATE_FAIL", step)]);
        let out = w.migrate(&a, &w.b, &["--timeout-ms", "3000"]);
        assert!(
            !out.status.success(),
            "migrate succeeded with the receiver failing at {step}"
        );
        assert!(
            out.stderr.contains("migrate failed at step"),
            "{step}: {}",
            out.stderr
        );
        // The sender serves the old connection, with its state.
        let value = (n + 1).to_string();
        roundtrip(
            &mut c,
            b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n",
            format!(":{value}\r\n").as_bytes(),
        );
        // And new ones.
        let mut fresh = w.connect();
        roundtrip(
            &mut fresh,
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            format!("${}\r\n{value}\r\n", value.len()).as_bytes(),
        );
        load.wait(100);
        drop(b);
    }
    // After all that, a real migration still works.
    let b = w.host(&w.b, false, &[]);
    let out = w.migrate(&a, &w.b, &[]);
    ok(&out, "migrate after the failures", &[&a, &b]);
    roundtrip(&mut c, b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n", b":7\r\n");
    load.finish_with(w.redis());
}

/// Chat users stay joined through a move there and back, and every
/// message arrives exactly once.
#[test]
fn chat_users_stay_joined_across_machines() {
    let Some(w) = world("chat_users_stay_joined_across_machines") else {
        return;
    };
    let chat: &[&str] = &["--config", "history=100000"];
    let a = w.host_of(&w.a, Some(("chat", chat)), &[]);
    let b = w.host(&w.b, false, &[]);
    let addr = w.service_addr();
    let room = w.client.run(move || Room::join(addr, "before the move"));
    let (room, outs, messages) = room.talk_through(|| {
        let there = w.migrate(&a, &w.b, &[]);
        std::thread::sleep(Duration::from_millis(200));
        let back = w.migrate(&b, &w.a, &[]);
        [there, back]
    });
    for out in &outs {
        ok(out, "migrate of chat", &[&a, &b]);
        assert!(
            out.stdout.contains("\"format\": \"chat/1\""),
            "{}",
            out.stdout
        );
    }
    let mut room = room;
    room.check_joined();
    let history = w
        .client
        .run(move || Room::newcomer_history(addr, "before the move").len());
    assert_eq!(history, messages, "the history came back with the service");
}

/// A sender whose certificate another CA signed is refused, and serves on.
#[test]
fn a_sender_with_a_foreign_certificate_is_refused() {
    let Some(w) = world("a_sender_with_a_foreign_certificate_is_refused") else {
        return;
    };
    let a = w.host(&w.a, true, &[]);
    let _b = w.host(&w.b, false, &[]);
    let mut c = w.connect();
    roundtrip(
        &mut c,
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
        b"+OK\r\n",
    );
    let foreign = Ca::new("someone else").host(&w.dir, "x", &[&w.a.ip.to_string()]);
    let (cert, key) = (
        foreign.cert.to_str().unwrap(),
        foreign.key.to_str().unwrap(),
    );
    let out = w.migrate(
        &a,
        &w.b,
        &[
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-ca",
            w.tls_a.ca.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "a foreign certificate was accepted");
    assert!(
        out.stderr.contains("step `connect`") || out.stderr.contains("step `offer`"),
        "{}",
        out.stderr
    );
    roundtrip(&mut c, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"$1\r\nv\r\n");
}
