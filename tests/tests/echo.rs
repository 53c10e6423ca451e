//! The echo guest under the real binary: round trips, many concurrent
//! connections, graceful shutdown.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmhost_tests::Served;

#[test]
fn echo_round_trip() {
    let server = Served::start("echo", &[]);
    let mut conn = TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for msg in [&b"hello\n"[..], b"", b"\x00\xffbinary", &[7u8; 100_000]] {
        conn.write_all(msg).unwrap();
        let mut back = vec![0; msg.len()];
        conn.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }
}

#[test]
fn thousand_concurrent_connections_each_get_their_own_bytes() {
    const CONNS: usize = 1000;
    const ROUNDS: usize = 5;
    let server = Served::start("echo", &[]);
    let addr = server.addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        // Connect everyone first, so all 1000 are open at once.
        let mut conns = Vec::with_capacity(CONNS);
        for _ in 0..CONNS {
            conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut conn)| {
                tokio::spawn(async move {
                    for round in 0..ROUNDS {
                        let msg = format!("connection {i} round {round} {}\n", "x".repeat(i % 97));
                        conn.write_all(msg.as_bytes()).await.unwrap();
                        let mut back = vec![0; msg.len()];
                        conn.read_exact(&mut back).await.unwrap();
                        assert_eq!(back, msg.as_bytes(), "connection {i} got another's bytes");
                    }
                })
            })
            .collect();
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("echoes finished in time");
    });
    drop(server);
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    let server = Served::start("echo", &[]);
    let mut conn = TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"before shutdown").unwrap();
    let mut back = [0; 15];
    conn.read_exact(&mut back).unwrap();
    let (status, stderr) = server.terminate();
    assert!(status.success(), "exit status {status}; stderr:\n{stderr}");
    // The connection was closed by the server: EOF, not a hang.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
}

#[test]
fn the_second_start_loads_the_component_from_the_compile_cache() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let first = Served::start("echo", &["--cache-dir", dir]);
    assert!(
        first.stderr().contains("cached=false"),
        "{}",
        first.stderr()
    );
    drop(first);
    let entries = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(entries, 1, "one compiled component in the cache");
    let second = Served::start("echo", &["--cache-dir", dir]);
    assert!(
        second.stderr().contains("cached=true"),
        "{}",
        second.stderr()
    );
    let third = Served::start("echo", &["--no-cache"]);
    assert!(
        third.stderr().contains("cached=false"),
        "{}",
        third.stderr()
    );
}
