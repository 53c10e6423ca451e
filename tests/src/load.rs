//! Steady load from real Redis clients, for tests that change the service
//! (swap, upgrade) while it serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::Connection;

/// One client's steady stream of commands, each reply checked. Returns how
/// many rounds it completed.
pub fn client_loop(
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
pub fn wait_progress(progress: &AtomicU64, more: u64) {
    let target = progress.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "clients stopped making progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}
