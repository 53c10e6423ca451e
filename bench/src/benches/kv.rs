//! kv guest vs a real redis-server, with redis-benchmark at -P 1 and -P 16.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context, Result, bail};
use wasmhost_bench::chart::grouped_bars;
use wasmhost_bench::procs::redis_server;
use wasmhost_bench::report::Section;
use wasmhost_tests::Served;

use super::{Benchmark, Ctx, median, thousands};

pub struct KvVsRedis;

const TESTS: &str = "set,get,incr,lpush,lpop";

/// One redis-benchmark row.
#[derive(Clone, Debug)]
struct Row {
    test: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn redis_benchmark(
    addr: SocketAddr,
    tests: &str,
    requests: u64,
    pipeline: u32,
) -> Result<Vec<Row>> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-t",
            tests,
            "-c",
            "50",
        ])
        .args([
            "-n",
            &requests.to_string(),
            "-P",
            &pipeline.to_string(),
            "--csv",
        ])
        .output()
        .context("running redis-benchmark (install redis-tools; bench/run does)")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        if f.len() < 8 {
            continue;
        }
        rows.push(Row {
            test: f[0].to_string(),
            rps: f[1].parse()?,
            p50_ms: f[4].parse()?,
            p99_ms: f[6].parse()?,
        });
    }
    // One row per test asked for (five for the comparison, one for the
    // profile's `get`).
    let expected = tests.split(',').count();
    if rows.len() != expected {
        bail!(
            "redis-benchmark printed {} result rows, expected {expected}:\n{text}",
            rows.len()
        );
    }
    Ok(rows)
}

/// Median over rounds, per test.
fn medians(rounds: &[Vec<Row>]) -> Vec<Row> {
    (0..rounds[0].len())
        .map(|i| Row {
            test: rounds[0][i].test.clone(),
            rps: median(rounds.iter().map(|r| r[i].rps).collect()),
            p50_ms: median(rounds.iter().map(|r| r[i].p50_ms).collect()),
            p99_ms: median(rounds.iter().map(|r| r[i].p99_ms).collect()),
        })
        .collect()
}

/// Geometric mean of the per-test throughput ratios.
fn geomean_ratio(ours: &[Row], theirs: &[Row]) -> f64 {
    let logs: f64 = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a.rps / b.rps).ln())
        .sum();
    (logs / ours.len() as f64).exp()
}

impl Benchmark for KvVsRedis {
    fn name(&self) -> &'static str {
        "kv"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let host = Served::start("kv", &[]);
        let redis = redis_server()?;
        let rounds = if ctx.quick { 1 } else { 3 };
        let mut s = Section::new("kv guest vs redis-server (redis-benchmark, 50 clients)");
        let _ = writeln!(
            s.body,
            "`redis-benchmark -t {TESTS} -c 50 -P N --csv`, {rounds} rounds alternating between the two servers; \
             medians. Ratio = wasmhost / redis.\n"
        );
        let _ = writeln!(
            s.body,
            "| test | -P | wasmhost ops/s | redis ops/s | ratio | wasmhost p50 / p99 ms | redis p50 / p99 ms |\n|---|---|---|---|---|---|---|"
        );
        for (pipeline, requests, goal) in [(1u32, 100_000u64, 0.8), (16, 500_000, 0.5)] {
            let requests = if ctx.quick { requests / 5 } else { requests };
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            for _ in 0..rounds {
                ours.push(redis_benchmark(host.addr(), TESTS, requests, pipeline)?);
                theirs.push(redis_benchmark(redis.addr, TESTS, requests, pipeline)?);
            }
            let (ours, theirs) = (medians(&ours), medians(&theirs));
            for (a, b) in ours.iter().zip(&theirs) {
                let _ = writeln!(
                    s.body,
                    "| {} | {pipeline} | {} | {} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} |",
                    a.test,
                    thousands(a.rps),
                    thousands(b.rps),
                    a.rps / b.rps,
                    a.p50_ms,
                    a.p99_ms,
                    b.p50_ms,
                    b.p99_ms
                );
            }
            let ratio = geomean_ratio(&ours, &theirs);
            s.target(
                &format!("kv ops/s vs redis-server at -P {pipeline}"),
                &format!(">= {:.0}%", goal * 100.0),
                format!("{:.0}% (geometric mean over {TESTS})", ratio * 100.0),
                ratio >= goal,
            );
            s.headline.push((
                format!("kv vs redis-server, -P {pipeline}"),
                format!("{:.0}% of redis ops/s", ratio * 100.0),
            ));
            let (path, file) = ctx.out.chart_path(&format!("kv-p{pipeline}"));
            grouped_bars(
                &path,
                &format!("kv guest vs redis-server, -P {pipeline} (ops/s)"),
                "operations/s",
                &ours.iter().map(|r| r.test.clone()).collect::<Vec<_>>(),
                &[
                    ("wasmhost kv".into(), ours.iter().map(|r| r.rps).collect()),
                    (
                        "redis-server".into(),
                        theirs.iter().map(|r| r.rps).collect(),
                    ),
                ],
            )?;
            s.charts
                .push((file, format!("kv vs redis at -P {pipeline}")));
        }
        if let Some(profile) = profile(&host, ctx)? {
            let _ = writeln!(
                s.body,
                "\nWhere the host's time goes (`perf record` on the wasmhost process during `redis-benchmark -t get -P 1`; \
                 top symbols, self time):\n\n```\n{profile}```"
            );
        }
        Ok(s)
    }
}

/// A flat profile of the host during a GET run, if `perf` works here.
fn profile(host: &Served, ctx: &Ctx) -> Result<Option<String>> {
    let works = Command::new("perf")
        .args(["stat", "-e", "task-clock", "true"])
        .output();
    if !works.is_ok_and(|o| o.status.success()) {
        return Ok(None);
    }
    let data = tempfile::NamedTempFile::new()?;
    let mut rec = Command::new("perf")
        .args(["record", "-F", "2000", "-o"])
        .arg(data.path())
        .args(["-p", &host.pid().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    redis_benchmark(
        host.addr(),
        "get",
        if ctx.quick { 20_000 } else { 200_000 },
        1,
    )?;
    nix_interrupt(rec.id());
    rec.wait()?;
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,symbol",
            "-i",
        ])
        .arg(data.path())
        .output()?;
    let text = String::from_utf8_lossy(&report.stdout);
    // "  12.34%  wasmhost  [.] symbol   -  -": keep share, object, symbol.
    let top: String = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(20)
        .map(|l| {
            let mut words: Vec<&str> = l.split_whitespace().collect();
            while words.last() == Some(&"-") {
                words.pop();
            }
            format!("{}\n", words.join(" "))
        })
        .collect();
    Ok(Some(top))
}

fn nix_interrupt(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
}
