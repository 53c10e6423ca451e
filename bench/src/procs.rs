//! Starting the servers under test and the baselines, and reading their
//! memory use.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
pub use wasmhost_tests::RedisServer;

/// A baseline server process, killed when dropped.
pub struct Baseline {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary built next to the running one (target/release/NAME).
pub fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("exe has a directory")?.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build with `cargo build --release -p wasmhost-bench`",
        path.display()
    );
    Ok(path)
}

/// Starts `echo-native` on a free loopback port.
pub fn echo_native() -> Result<Baseline> {
    echo_native_on(None)
}

/// [`echo_native`] with `threads` tokio worker threads (default: one per
/// core).
pub fn echo_native_on(threads: Option<usize>) -> Result<Baseline> {
    let mut command = Command::new(sibling_bin("echo-native")?);
    command.arg("127.0.0.1:0");
    if let Some(n) = threads {
        command.arg(n.to_string());
    }
    let mut child = command
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("piped")).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .context("echo-native did not print its address")?
        .parse()?;
    Ok(Baseline { child, addr })
}

/// A free loopback port (bound and released; a small race, acceptable
/// for a benchmark).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a real `redis-server` (no persistence) on a free loopback port.
pub fn redis_server() -> Result<RedisServer> {
    RedisServer::start(&["--appendonly", "no"])
        .context("starting redis-server (install redis-server; bench/run does)")
}

/// A `redis-server` with an append-only file in `dir`, synced as
/// `appendfsync` says (`always`, `everysec`, `no`).
pub fn redis_aof(dir: &std::path::Path, appendfsync: &str) -> Result<RedisServer> {
    RedisServer::with_aof(dir, appendfsync)
        .context("starting redis-server (install redis-server; bench/run does)")
}

/// Polls `addr` with RESP PING until PONG; returns how long it took.
pub fn wait_for_pong(addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Ok(mut c) = TcpStream::connect(addr) {
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"PING\r\n")?;
            let mut reply = [0u8; 7];
            if c.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n" {
                return Ok(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("{addr} did not answer PING within {timeout:?}")
}

/// Resident memory of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}
