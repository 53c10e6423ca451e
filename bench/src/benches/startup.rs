//! Start-up: `wasmhost serve` to the first answer, with an empty compile
//! cache (cold) and a filled one (warm), beside redis-server's start.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use wasmhost_bench::chart::grouped_bars;
use wasmhost_bench::procs::{free_port, redis_server, wait_for_pong};
use wasmhost_bench::report::Section;
use wasmhost_tests::{guest, wasmhost_bin};

use super::{Benchmark, Ctx, median};

pub struct Startup;

/// Time from spawning `serve kv` to its first PONG.
fn serve_to_pong(cache: &Path) -> Result<Duration> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let started = Instant::now();
    let mut child = Command::new(wasmhost_bin())
        .args([
            "serve",
            guest("kv").to_str().unwrap(),
            "--no-control",
            "--listen",
            &addr.to_string(),
            "--cache-dir",
        ])
        .arg(cache)
        .stderr(Stdio::null())
        .spawn()?;
    let waited = wait_for_pong(addr, Duration::from_secs(120));
    let elapsed = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    waited?;
    Ok(elapsed)
}

impl Benchmark for Startup {
    fn name(&self) -> &'static str {
        "startup"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let runs = if ctx.quick { 2 } else { 5 };
        let mut cold = Vec::new();
        for _ in 0..runs {
            let dir = tempfile::tempdir()?;
            cold.push(serve_to_pong(dir.path())?.as_secs_f64() * 1000.0);
        }
        let dir = tempfile::tempdir()?;
        serve_to_pong(dir.path())?;
        let mut warm = Vec::new();
        for _ in 0..runs {
            warm.push(serve_to_pong(dir.path())?.as_secs_f64() * 1000.0);
        }
        let mut redis = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let r = redis_server()?;
            redis.push(t.elapsed().as_secs_f64() * 1000.0);
            drop(r);
        }
        let (c, w, r) = (median(cold), median(warm), median(redis));
        let mut s = Section::new("Start-up to first answer");
        let _ = writeln!(
            s.body,
            "From spawning the process to the first PONG on a new connection; median of {runs} runs.\n"
        );
        let _ = writeln!(
            s.body,
            "| | ms |\n|---|---|\n| `wasmhost serve kv.wasm`, empty compile cache (cold) | {c:.1} |\n| `wasmhost serve kv.wasm`, compile cache filled (warm) | {w:.1} |\n| `redis-server` (baseline) | {r:.1} |"
        );
        s.headline.push((
            "start-up to first answer, cold / warm cache".into(),
            format!("{c:.0} / {w:.0} ms (redis-server {r:.0} ms)"),
        ));
        let (path, file) = ctx.out.chart_path("startup");
        grouped_bars(
            &path,
            "start-up to first answer (ms)",
            "ms",
            &["cold".into(), "warm".into(), "redis-server".into()],
            &[("ms".into(), vec![c, w, r])],
        )?;
        s.charts.push((file, "start-up".into()));
        Ok(s)
    }
}
