//! `loadgen ADDR`: closed-loop echo load against ADDR; prints JSON with
//! throughput and latency percentiles.

use std::time::Duration;

use clap::Parser;
use wasmhost_bench::loadgen::{EchoLoad, run_echo};

#[derive(Parser)]
#[command(about = "Closed-loop echo load generator (bounded in time and count)")]
struct Args {
    /// Where the echo service listens, e.g. 127.0.0.1:7000 (loopback only).
    addr: std::net::SocketAddr,
    #[arg(long, default_value_t = 50)]
    connections: usize,
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 10_000_000)]
    max_messages: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.addr.ip().is_loopback(),
        "loadgen sends traffic to loopback addresses only"
    );
    let load = EchoLoad {
        addr: a.addr,
        connections: a.connections,
        message_size: a.size,
        duration: Duration::from_secs(a.seconds),
        max_messages: a.max_messages,
    };
    let r = run_echo(&load).await?;
    let json = serde_json::json!({
        "messages": r.messages,
        "seconds": r.elapsed.as_secs_f64(),
        "per_second": r.per_second(),
        "p50_ms": r.percentile_ms(50.0),
        "p99_ms": r.percentile_ms(99.0),
        "max_ms": r.latency_us.max() as f64 / 1000.0,
    });
    println!("{json:#}");
    Ok(())
}
