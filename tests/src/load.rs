//! Steady load from real Redis clients, for tests that change the service
//! (swap, upgrade) while it serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let clients = (0..clients)
            .map(|id| {
                let (c, stop, progress) = (redis_connect(server), stop.clone(), progress.clone());
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
        self.stop.store(true, Ordering::Relaxed);
        let rounds: Vec<u64> = self
            .clients
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect();
        let mut check = redis_connect(server);
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
