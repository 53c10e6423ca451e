//! Memory: host RSS per idle connection (against the native tokio echo
//! server) and per service instance.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use wasmhost::engine::Runtime;
use wasmhost::service::{Instance, InstanceLimits, Program};
use wasmhost_bench::chart::grouped_bars;
use wasmhost_bench::procs::{echo_native, redis_server, rss_bytes};
use wasmhost_bench::report::Section;
use wasmhost_tests::{Served, guest};

use super::{Benchmark, Ctx, thousands};

pub struct Memory;

/// Opens `n` connections and does one echo round trip on each (so every
/// one is live on the server); returns them, still open.
fn open_idle(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    // In batches, so the listen backlog never overflows (an overflow costs
    // a one-second SYN retry).
    while conns.len() < n {
        let start = conns.len();
        for _ in start..n.min(start + 256) {
            let c = TcpStream::connect(addr).context("connecting (raise the open-file limit?)")?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            conns.push(c);
        }
        for c in &mut conns[start..] {
            c.write_all(b"x")?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)?;
        }
    }
    Ok(conns)
}

/// RSS growth per connection of the server `pid`.
fn per_connection(pid: u32, addr: SocketAddr, n: usize) -> Result<(f64, u64)> {
    // Warm up allocator arenas and runtime structures first.
    drop(open_idle(addr, 100)?);
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_bytes(pid)?;
    let conns = open_idle(addr, n)?;
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_bytes(pid)?;
    drop(conns);
    Ok((after.saturating_sub(before) as f64 / n as f64, before))
}

/// RSS growth of this process per extra instance of `guest_name`.
fn per_instance(ctx: &Ctx, guest_name: &str, n: usize) -> Result<f64> {
    let runtime = Runtime::new(Some(wasmhost_tests::test_cache()))?;
    let program = Program::prepare(&runtime, &guest(guest_name))?;
    Ok(per_instance_of(ctx, &program, n)?.0)
}

/// RSS growth of this process per extra instance of `program` (each one
/// `init`ed), after a warm-up instance, and the linear memory each holds.
pub(super) fn per_instance_of(ctx: &Ctx, program: &Arc<Program>, n: usize) -> Result<(f64, usize)> {
    let limits = InstanceLimits::default();
    let me = std::process::id();
    ctx.rt.block_on(async {
        let mut warm = Instance::new(program.clone(), Arc::from("bench"), &limits).await?;
        warm.init(&[]).await?.map_err(anyhow::Error::msg)?;
        let before = rss_bytes(me)?;
        let mut all = Vec::new();
        for _ in 0..n {
            let mut i = Instance::new(program.clone(), Arc::from("bench"), &limits).await?;
            i.init(&[]).await?.map_err(anyhow::Error::msg)?;
            all.push(i);
        }
        let after = rss_bytes(me)?;
        Ok((
            after.saturating_sub(before) as f64 / n as f64,
            warm.memory_bytes(),
        ))
    })
}

impl Benchmark for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let n = if ctx.quick { 2_000 } else { 10_000 };
        let mut s = Section::new("Memory");
        let host = Served::start("echo", &["--max-connections", "20000"]);
        let (ours, host_idle) = per_connection(host.pid(), host.addr(), n)?;
        let native = echo_native()?;
        let (theirs, _) = per_connection(native.child.id(), native.addr, n)?;
        drop(host);
        let kv = Served::start("kv", &[]);
        std::thread::sleep(Duration::from_millis(300));
        let kv_idle = rss_bytes(kv.pid())?;
        drop(kv);
        let redis = redis_server()?;
        let redis_idle = rss_bytes(redis.child.id())?;
        let (inst_kv, inst_echo) = (per_instance(ctx, "kv", 20)?, per_instance(ctx, "echo", 20)?);
        let _ = writeln!(
            s.body,
            "RSS growth of the server process with {} idle connections (each did one echo round trip, so it is live), \
             after a warm-up; per-instance cost measured in-process by instantiating 20 more instances of a guest \
             (with `init`); the same for every guest and language is in the start-up section's table.\n",
            thousands(n as f64)
        );
        let _ = writeln!(
            s.body,
            "| measurement | wasmhost | baseline |\n|---|---|---|"
        );
        let _ = writeln!(
            s.body,
            "| RSS per idle connection | {:.1} KiB | {:.1} KiB (native tokio echo, 8 KiB buffer per connection) |",
            ours / 1024.0,
            theirs / 1024.0
        );
        let _ = writeln!(
            s.body,
            "| RSS per kv instance | {:.0} KiB | |",
            inst_kv / 1024.0
        );
        let _ = writeln!(
            s.body,
            "| RSS per echo instance | {:.0} KiB | |",
            inst_echo / 1024.0
        );
        let _ = writeln!(
            s.body,
            "| idle process, echo guest | {:.1} MiB | |",
            host_idle as f64 / 1048576.0
        );
        let _ = writeln!(
            s.body,
            "| idle process, kv guest | {:.1} MiB | {:.1} MiB (redis-server) |",
            kv_idle as f64 / 1048576.0,
            redis_idle as f64 / 1048576.0
        );
        s.target(
            "host memory per idle connection",
            "< 10 KiB",
            format!("{:.1} KiB", ours / 1024.0),
            ours < 10.0 * 1024.0,
        );
        s.headline.push((
            "memory per idle connection".into(),
            format!(
                "{:.1} KiB (native tokio echo: {:.1} KiB)",
                ours / 1024.0,
                theirs / 1024.0
            ),
        ));
        s.headline.push((
            "memory per service instance (kv)".into(),
            format!("{:.0} KiB", inst_kv / 1024.0),
        ));
        let (path, file) = ctx.out.chart_path("memory");
        grouped_bars(
            &path,
            "RSS per idle connection (KiB)",
            "KiB",
            &["per idle connection".into()],
            &[
                ("wasmhost".into(), vec![ours / 1024.0]),
                ("native tokio".into(), vec![theirs / 1024.0]),
            ],
        )?;
        s.charts.push((file, "memory per connection".into()));
        Ok(s)
    }
}
