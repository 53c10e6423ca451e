//! Start-up: `wasmhost serve` to the first answer, with an empty compile
//! cache (cold) and a filled one (warm), beside redis-server's start; and
//! per guest and language (Rust, Python, JavaScript): component size,
//! compile, cached load, instantiate and memory per instance.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use wasmhost::engine::{CompileCache, DEFAULT_CACHE_MAX_BYTES, Runtime};
use wasmhost::service::{Instance, InstanceLimits, Program};
use wasmhost_bench::chart::grouped_bars;
use wasmhost_bench::procs::{free_port, redis_server, wait_for_pong};
use wasmhost_bench::report::Section;
use wasmhost_tests::{guest, test_cache_dir, wasmhost_bin};

use super::memory::per_instance_of;
use super::{Benchmark, Ctx, GUESTS, built, median, not_built};

pub struct Startup;

/// Time from spawning `serve kv` to its first PONG.
fn serve_to_pong(cache: &Path) -> Result<Duration> {
    serve_to_pong_of(&guest("kv"), cache)
}

/// Time from spawning `serve COMPONENT` (a kv service) to its first PONG.
fn serve_to_pong_of(component: &Path, cache: &Path) -> Result<Duration> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let started = Instant::now();
    let mut child = Command::new(wasmhost_bin())
        .args([
            "serve",
            component.to_str().context("a UTF-8 path")?,
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
        // kv-py from a filled cache (the tests' cache, which the other
        // benchmarks fill; a first serve fills it if not).
        let py_warm = match built("kv-py") {
            Some(path) => {
                serve_to_pong_of(&path, &test_cache_dir())?;
                let mut v = Vec::new();
                for _ in 0..runs {
                    v.push(serve_to_pong_of(&path, &test_cache_dir())?.as_secs_f64() * 1000.0);
                }
                Some(median(v))
            }
            None => None,
        };
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
        match py_warm {
            Some(p) => {
                let _ = writeln!(
                    s.body,
                    "| `wasmhost serve kv-py.wasm` (Python), compile cache filled (warm) | {p:.1} |"
                );
            }
            None => {
                let _ = writeln!(
                    s.body,
                    "| `wasmhost serve kv-py.wasm` (Python) | not built |"
                );
            }
        }
        s.headline.push((
            "start-up to first answer, cold / warm cache".into(),
            format!("{c:.0} / {w:.0} ms (redis-server {r:.0} ms)"),
        ));
        per_guest(ctx, &mut s)?;
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

/// What one guest costs to load and run.
struct Costs {
    bytes: u64,
    cold_ms: f64,
    cached_ms: f64,
    instantiate_ms: f64,
    init_ms: f64,
    /// Linear memory of one instance after `init`.
    memory: usize,
    /// RSS growth per extra instance.
    rss: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Compiles `path` into an empty cache (`cold_runs` times, each with a new
/// cache), loads it from the cache, instantiates and `init`s it.
fn costs(ctx: &Ctx, path: &Path, cold_runs: usize, runs: usize) -> Result<Costs> {
    let mut cold = Vec::new();
    let mut runtime = None;
    let dir = tempfile::tempdir()?;
    for i in 0..cold_runs {
        let cache = dir.path().join(i.to_string());
        let rt = Runtime::new(Some(CompileCache {
            dir: cache,
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
        }))?;
        let loaded = rt.load(path)?;
        ensure!(!loaded.from_cache, "a new cache had {}", path.display());
        cold.push(ms(loaded.compile_time));
        runtime = Some(rt);
    }
    let runtime = runtime.context("at least one cold compile")?;
    let (mut cached, mut program) = (Vec::new(), None);
    for _ in 0..runs {
        let loaded = runtime.load(path)?;
        ensure!(loaded.from_cache, "{} was not in the cache", path.display());
        cached.push(ms(loaded.compile_time));
        program = Some(Program::link(&runtime, loaded)?);
    }
    let program = program.context("at least one run")?;
    let limits = InstanceLimits::default();
    let (mut inst, mut init) = (Vec::new(), Vec::new());
    ctx.rt.block_on(async {
        for _ in 0..runs {
            let t = Instant::now();
            let mut i = Instance::new(program.clone(), Arc::from("bench"), &limits).await?;
            inst.push(ms(t.elapsed()));
            let t = Instant::now();
            i.init(&[]).await?.map_err(anyhow::Error::msg)?;
            init.push(ms(t.elapsed()));
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let (rss, memory) = per_instance_of(ctx, &program, 20)?;
    Ok(Costs {
        bytes: std::fs::metadata(path)?.len(),
        cold_ms: median(cold),
        cached_ms: median(cached),
        instantiate_ms: median(inst),
        init_ms: median(init),
        memory,
        rss,
    })
}

/// The per-guest table: one row per guest of each language.
fn per_guest(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let (cold_runs, runs) = if ctx.quick { (1, 3) } else { (2, 10) };
    let _ = writeln!(
        s.body,
        "\n### Per guest and language\n\n\
         In-process, with the host's library: *cold compile* reads and compiles the component into an empty \
         compile cache (median of {cold_runs}); *cached load* reads it back from the cache; *instantiate* and \
         *init* are one new instance and its `init` (medians of {runs}); *linear memory* is what one instance \
         holds after `init`; *RSS per instance* is this process's growth per extra instance (after `init`). \
         Python and JavaScript components carry their interpreter (CPython, StarlingMonkey).\n"
    );
    let _ = writeln!(
        s.body,
        "| guest | language | component | cold compile ms | cached load ms | instantiate ms | init ms | linear memory per instance | RSS per instance |\n|---|---|---|---|---|---|---|---|---|"
    );
    let mut missing = Vec::new();
    for (name, lang) in GUESTS {
        let Some(path) = built(name) else {
            let _ = writeln!(s.body, "| {name} | {lang} | not built | | | | | | |");
            missing.push(name);
            continue;
        };
        let c = costs(ctx, &path, cold_runs, runs).with_context(|| format!("measuring {name}"))?;
        let _ = writeln!(
            s.body,
            "| {name} | {lang} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {} | {:.0} KiB |",
            size(c.bytes as f64),
            c.cold_ms,
            c.cached_ms,
            c.instantiate_ms,
            c.init_ms,
            size(c.memory as f64),
            c.rss / 1024.0
        );
        if lang != "Rust" {
            s.headline.push((
                format!("{name} ({lang}): component, cold compile / cached load, instantiate"),
                format!(
                    "{}, {:.0} / {:.0} ms, {:.1} ms",
                    size(c.bytes as f64),
                    c.cold_ms,
                    c.cached_ms,
                    c.instantiate_ms + c.init_ms
                ),
            ));
        }
    }
    for name in missing {
        let _ = writeln!(s.body, "\n{}", not_built(name));
    }
    Ok(())
}

/// `18379896.0` as `17.5 MiB`, `157993.0` as `154 KiB`.
fn size(bytes: f64) -> String {
    if bytes >= 1048576.0 {
        format!("{:.1} MiB", bytes / 1048576.0)
    } else {
        format!("{:.0} KiB", bytes / 1024.0)
    }
}
