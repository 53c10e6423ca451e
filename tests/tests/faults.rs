//! Guests that loop, trap or hoard memory, and clients that never read:
//! the host interrupts, recovers or disconnects, and everyone else keeps
//! being served.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use wasmhost_tests::irc::IrcClient;
use wasmhost_tests::{LineConn, Served};

#[test]
fn a_looping_guest_is_interrupted_and_rebuilt_other_connections_stay_open() {
    let mut server = Served::start("faulty", &["--event-timeout-ms", "300"]);
    let mut a = LineConn::open(&server);
    let mut b = LineConn::open(&server);
    a.send("one");
    assert_eq!(a.recv(), "1 one");
    b.send("two");
    assert_eq!(b.recv(), "2 two");
    a.send("loop");
    server.wait_for_output(
        |t| t.contains("faulty: entering an endless loop"),
        Duration::from_secs(10),
    );
    // B's event waits behind the loop, then goes to the rebuilt instance,
    // which has the state from before the runaway event.
    b.send("after");
    assert_eq!(b.recv(), "3 after", "the state is rebuilt after the trap");
    // The log reaches the test through a reader thread: wait for it.
    server.wait_for_output(
        |t| {
            t.contains("exceeded its CPU deadline of 300 ms")
                && t.contains("state rebuilt")
                && t.contains("closing the connection whose event made the guest trap")
        },
        Duration::from_secs(10),
    );
    // A's input made the guest loop: its connection is closed (sending it
    // again would only loop again).
    assert_eq!(a.recv(), "", "A is closed");
}

#[test]
fn without_a_journal_a_trapping_guest_restarts_fresh() {
    let mut server = Served::start("faulty", &["--journal", "off"]);
    let mut a = LineConn::open(&server);
    let mut b = LineConn::open(&server);
    a.send("x");
    assert_eq!(a.recv(), "1 x");
    a.send("trap");
    // The state is lost with the instance; A's connection is closed.
    server.wait_for_output(|t| t.contains("service restarted"), Duration::from_secs(10));
    assert!(server.stderr().contains("trap requested"));
    assert!(server.stderr().contains("off (--journal off)"));
    assert_eq!(a.recv(), "", "A is closed");
    b.send("y");
    assert_eq!(b.recv(), "1 y");
}

#[test]
fn a_guest_over_its_memory_limit_is_rebuilt() {
    let mut server = Served::start("faulty", &["--max-memory", "32MiB"]);
    let mut b = LineConn::open(&server);
    b.send("before");
    assert_eq!(b.recv(), "1 before");
    let mut a = LineConn::open(&server);
    a.send("grow");
    server.wait_for_output(|t| t.contains("state rebuilt"), Duration::from_secs(10));
    assert!(
        server
            .stderr()
            .contains("memory allocation of 1048576 bytes failed")
    );
    assert_eq!(a.recv(), "", "A is closed");
    b.send("z");
    assert_eq!(b.recv(), "2 z");
}

#[test]
fn a_client_that_never_reads_is_disconnected_not_buffered() {
    let mut server = Served::start("chat", &["--max-output-buffer", "64KiB"]);
    let addr = server.addr();
    // `slow` registers, then never reads again.
    let slow = IrcClient::register(addr, "slow");
    let mut fast = IrcClient::register(addr, "fast");
    fast.send("JOIN #watch");
    fast.expect(" 366 fast #watch ");
    slow_join(slow, &mut fast);
    // Far more than the kernel's socket buffers plus the 64 KiB limit.
    // NOTICE, because once `slow` is gone a PRIVMSG would earn `fast` an
    // error reply per line, and `fast` is not reading either just now.
    let text = "x".repeat(400);
    for i in 0..60_000 {
        fast.send(&format!("NOTICE slow :{i} {text}"));
    }
    fast.expect(":slow!slow@127.0.0.1 QUIT :Connection closed");
    server.wait_for_output(
        |t| t.contains("output buffer limit of 65536 bytes exceeded"),
        Duration::from_secs(10),
    );
    // Everyone else is still served.
    fast.sync("still-alive");
}

/// The host writes a reply straight to the socket when nothing is queued
/// before it, and queues what the socket does not take: a client that
/// reads late (the kernel's buffers fill, writes go partly direct and
/// partly through the queue) must still get every reply, in order. Each
/// ECHO's reply is its own (1 KB with the request's number), so a reordered,
/// lost or repeated reply fails here.
#[test]
fn a_client_that_reads_late_gets_every_reply_in_order() {
    // 40 MB each way: far more than the loopback socket buffers hold.
    const ECHOS: usize = 40_000;
    let body = |i: usize| format!("{i:010}{}", "x".repeat(990));
    let server = Served::start("kv", &["--max-output-buffer", "1MiB"]);
    let conn = TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for start in (0..ECHOS).step_by(1_000) {
            let chunk: String = (start..start + 1_000)
                .map(|i| format!("*2\r\n$4\r\nECHO\r\n$1000\r\n{}\r\n", body(i)))
                .collect();
            writer.write_all(chunk.as_bytes()).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut reader = BufReader::with_capacity(1 << 16, conn);
    let mut line = String::new();
    for i in 0..ECHOS {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "$1000\r\n", "reply {i}");
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{}\r\n", body(i)), "reply {i}");
    }
    sender.join().unwrap();
    assert!(
        !server.stderr().contains("output buffer limit"),
        "{}",
        server.stderr()
    );
}

/// Puts `slow` on #watch (reading its replies once), then stops reading it.
fn slow_join(mut slow: IrcClient, fast: &mut IrcClient) {
    slow.send("JOIN #watch");
    slow.expect(" 366 slow #watch ");
    fast.expect(":slow!slow@127.0.0.1 JOIN #watch");
    // Keep the socket open but unread for the rest of the test.
    std::mem::forget(slow);
}

#[test]
fn a_pipelining_client_that_reads_late_is_throttled_and_loses_nothing() {
    const PINGS: usize = 2_000_000; // 12 MB of requests, 14 MB of replies
    let server = Served::start("kv", &["--max-output-buffer", "1MiB"]);
    let conn = TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = b"PING\r\n".repeat(10_000);
        for _ in 0..PINGS / 10_000 {
            writer.write_all(&chunk).unwrap();
        }
    });
    // Read nothing for a while: the host must stop reading this socket
    // (its output is over the limit's half), not queue replies without end
    // or drop the connection.
    std::thread::sleep(Duration::from_millis(300));
    let mut reader = BufReader::with_capacity(1 << 16, conn);
    let mut line = String::new();
    for i in 0..PINGS {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "+PONG\r\n", "reply {i}");
    }
    sender.join().unwrap();
    assert!(
        !server.stderr().contains("output buffer limit"),
        "{}",
        server.stderr()
    );
}
