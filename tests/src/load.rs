//! Steady load from real Redis clients, for tests that change the service
//! (swap, upgrade) while it serves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use redis::Connection;

use crate::{Served, redis_connect};

/// Real Redis clients, each sending a steady stream of checked commands
/// on its own connection until [`finish`](Load::finish).
pub struct Load {
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    clients: Vec<std::thread::JoinHandle<u64>>,
}

impl Load {
    /// Connects `clients` clients to `server` and starts them.
    pub fn start(server: &Served, clients: usize) -> Load {
        Load::start_with(|| redis_connect(server), clients)
    }

    /// Starts `clients` clients on connections made by `connect` (for a
    /// server reached another way, e.g. from another network namespace).
    pub fn start_with(connect: impl Fn() -> Connection, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let clients = (0..clients)
            .map(|id| {
                let (c, stop, progress) = (connect(), stop.clone(), progress.clone());
                std::thread::spawn(move || client_loop(c, id, stop, progress))
            })
            .collect();
        Load {
            stop,
            progress,
            clients,
        }
    }

    /// Waits until the clients together have done `more` rounds beyond now.
    pub fn wait(&self, more: u64) {
        wait_progress(&self.progress, more);
    }

    /// Stops the clients, then checks that everything each one wrote reads
    /// back, exactly once. Returns each client's rounds.
    pub fn finish(self, server: &Served) -> Vec<u64> {
        self.finish_with(redis_connect(server))
    }

    /// [`finish`](Self::finish), reading back on `check`.
    pub fn finish_with(self, mut check: Connection) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let rounds: Vec<u64> = self
            .clients
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect();
        for (id, &n) in rounds.iter().enumerate() {
            assert!(n > 0, "client {id} made no progress");
            let mut pipe = redis::pipe();
            for round in 0..n {
                pipe.cmd("GET").arg(format!("k:{id}:{round}"));
            }
            let values: Vec<u64> = pipe.query(&mut check).unwrap();
            assert_eq!(values, (0..n).collect::<Vec<_>>(), "client {id}");
            let count: u64 = redis::cmd("GET")
                .arg(format!("count:{id}"))
                .query(&mut check)
                .unwrap();
            assert_eq!(count, n, "client {id}");
            let len: u64 = redis::cmd("LLEN")
                .arg(format!("list:{id}"))
                .query(&mut check)
                .unwrap();
            assert_eq!(len, n, "client {id}");
        }
        rounds
    }
}

/// One client's steady stream of commands, each reply checked. Returns how
/// many rounds it completed.
fn client_loop(
    mut c: Connection,
    id: usize,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut round: u64 = 0;
    while !stop.load(Ordering::Relaxed) && round < 1_000_000 {
        assert!(Instant::now() < deadline, "client {id}: load ran too long");
        let key = format!("k:{id}:{round}");
        let reply: String = redis::cmd("SET")
            .arg(&key)
            .arg(round)
            .query(&mut c)
            .unwrap();
        assert_eq!(reply, "OK", "client {id} round {round}");
        let back: u64 = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
        assert_eq!(back, round, "client {id} round {round}");
        let n: u64 = redis::cmd("INCR")
            .arg(format!("count:{id}"))
            .query(&mut c)
            .unwrap();
        assert_eq!(n, round + 1, "client {id} round {round}");
        let len: u64 = redis::cmd("RPUSH")
            .arg(format!("list:{id}"))
            .arg(round)
            .query(&mut c)
            .unwrap();
        assert_eq!(len, round + 1, "client {id} round {round}");
        round += 1;
        progress.fetch_add(1, Ordering::Relaxed);
    }
    round
}

/// Waits until the clients together have done `more` rounds beyond now.
fn wait_progress(progress: &AtomicU64, more: u64) {
    let target = progress.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "clients stopped making progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Loads keys `from..to` with pipelined SETs (16-byte values).
pub fn load_keys(addr: SocketAddr, from: u64, to: u64) -> Result<()> {
    let mut c = TcpStream::connect(addr)?;
    let mut reply = vec![0u8; 5 * 10_000];
    let mut i = from;
    while i < to {
        let end = (i + 10_000).min(to);
        let mut batch = Vec::with_capacity(64 * 10_000);
        for k in i..end {
            let (key, value) = (format!("key:{k:010}"), format!("value:{k:010}"));
            write!(
                batch,
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
                key.len(),
                value.len()
            )?;
        }
        c.write_all(&batch)?;
        let n = (end - i) as usize * 5;
        c.read_exact(&mut reply[..n])?;
        if !reply[..n].chunks(5).all(|r| r == b"+OK\r\n") {
            bail!("a SET failed while loading keys");
        }
        i = end;
    }
    Ok(())
}

/// Checks that keys `from..to` hold what [`load_keys`] wrote (pipelined
/// GETs); the error names the first key that does not.
pub fn check_keys(addr: SocketAddr, from: u64, to: u64) -> Result<()> {
    let mut c = TcpStream::connect(addr)?;
    let mut i = from;
    while i < to {
        let end = (i + 10_000).min(to);
        let mut batch = Vec::with_capacity(40 * 10_000);
        let mut expected = Vec::with_capacity(24 * 10_000);
        for k in i..end {
            let (key, value) = (format!("key:{k:010}"), format!("value:{k:010}"));
            write!(batch, "*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len())?;
            write!(expected, "${}\r\n{value}\r\n", value.len())?;
        }
        c.write_all(&batch)?;
        let mut got = vec![0u8; expected.len()];
        c.read_exact(&mut got)?;
        if got != expected {
            let at = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bail!(
                "keys {i}..{end} do not read back: first difference at byte {at}: {:?}",
                String::from_utf8_lossy(&got[at.saturating_sub(20)..(at + 40).min(got.len())])
            );
        }
        i = end;
    }
    Ok(())
}
