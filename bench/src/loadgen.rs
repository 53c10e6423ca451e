//! A closed-loop TCP load generator for echo-style services: each
//! connection sends a message, waits for it to come back, records the
//! round trip in an HDR histogram, and repeats. Bounded in time and count.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Debug)]
pub struct EchoLoad {
    pub addr: SocketAddr,
    pub connections: usize,
    pub message_size: usize,
    pub duration: Duration,
    /// Stop after this many round trips in all, whichever comes first.
    pub max_messages: u64,
}

#[derive(Debug)]
pub struct LoadResult {
    pub messages: u64,
    pub elapsed: Duration,
    /// Round-trip times in microseconds.
    pub latency_us: Histogram<u64>,
}

impl LoadResult {
    pub fn per_second(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        self.latency_us.value_at_quantile(p / 100.0) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs the load; all connections are opened before the clock starts.
pub async fn run_echo(load: &EchoLoad) -> Result<LoadResult> {
    let mut conns = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        let c = TcpStream::connect(load.addr)
            .await
            .with_context(|| format!("connecting to {}", load.addr))?;
        c.set_nodelay(true)?;
        conns.push(c);
    }
    let started = Instant::now();
    let deadline = started + load.duration;
    let per_conn = load.max_messages / load.connections as u64 + 1;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| tokio::spawn(echo_conn(conn, i, load.message_size, deadline, per_conn)))
        .collect();
    let mut total = LoadResult {
        messages: 0,
        elapsed: Duration::ZERO,
        latency_us: histogram(),
    };
    for task in tasks {
        let (count, hist) = task.await??;
        total.messages += count;
        total.latency_us.add(hist)?;
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

async fn echo_conn(
    mut conn: TcpStream,
    index: usize,
    size: usize,
    deadline: Instant,
    max: u64,
) -> Result<(u64, Histogram<u64>)> {
    let msg: Vec<u8> = (0..size).map(|i| b'a' + ((i + index) % 26) as u8).collect();
    let mut back = vec![0u8; size];
    let mut hist = histogram();
    let mut count = 0;
    while count < max && Instant::now() < deadline {
        let t = Instant::now();
        conn.write_all(&msg).await?;
        conn.read_exact(&mut back).await?;
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
        anyhow::ensure!(back == msg, "connection {index}: echo returned other bytes");
        count += 1;
    }
    Ok((count, hist))
}
