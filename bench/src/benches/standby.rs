//! Warm standby (`serve --standby-of`): what replication costs (kv on a
//! state dir alone, with an asynchronous standby and with a synchronous
//! one, measured in the same run), how far an asynchronous standby lags
//! under that load, and the failover time: a primary killed with SIGKILL
//! under writers that go through HAProxy, to the first reply from the
//! promoted standby, with every acknowledged write checked afterwards.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wasmhost_bench::report::Section;
use wasmhost_tests::Served;
use wasmhost_tests::fleet::{Client, Haproxy, free_ports, missing};
use wasmhost_tests::standby::{Pki, Writers, primary, standby, wait_following};

use super::kv::{geomean_ratio, medians, redis_benchmark};
use super::{Benchmark, Ctx, median, percentile, thousands};

pub struct Standby;

impl Benchmark for Standby {
    fn name(&self) -> &'static str {
        "standby"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let mut s = Section::new("Warm standby: replication cost, standby lag and failover time");
        throughput(ctx, &mut s)?;
        failover(ctx, &mut s)?;
        Ok(s)
    }
}

const TESTS: &str = "set,get";

/// A primary's replication status (`status --json`).
fn replication(host: &Served) -> Option<serde_json::Value> {
    let out = host.command("status", &["--json"]);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    Some(status["replication"].clone()).filter(|r| !r.is_null())
}

/// Samples a primary's lag (bytes, ms) until stopped.
fn sample_lag(
    host: Arc<Served>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(f64, f64)>> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Some(r) = replication(&host) {
                let bytes = r["lag_bytes"].as_f64().unwrap_or(0.0);
                let ms = r["lag_ms"].as_f64().unwrap_or(0.0);
                samples.push((bytes, ms));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        samples
    })
}

fn throughput(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let pki = Pki::new();
    let alone = Served::start(
        "kv",
        &[
            "--state-dir",
            pki.state_dir("alone").to_str().context("UTF-8")?,
        ],
    );
    let (async_p, async_port) = primary(&pki, &pki.state_dir("async-a"), &[], &[]);
    let mut async_s = standby(&pki, async_port, &pki.state_dir("async-b"), &[], &[]);
    wait_following(&mut async_s);
    let (sync_p, sync_port) = primary(&pki, &pki.state_dir("sync-a"), &["--sync-standby"], &[]);
    let mut sync_s = standby(&pki, sync_port, &pki.state_dir("sync-b"), &[], &[]);
    wait_following(&mut sync_s);
    let async_p = Arc::new(async_p);
    let rounds = if ctx.quick { 1 } else { 3 };
    let _ = writeln!(
        s.body,
        "kv with `--state-dir` (`--fsync everysec`, the default) on its own, with an asynchronous \
         standby, and with `--sync-standby` (a reply waits until the standby has written the \
         record); primary and standby on this machine, linked by mutual TLS over loopback. \
         `redis-benchmark -t {TESTS} -c 50 -P N`, {rounds} rounds alternating; medians.\n"
    );
    let _ = writeln!(
        s.body,
        "| -P | test | alone ops/s | async ops/s | sync ops/s | async / alone | sync / alone |\n|---|---|---|---|---|---|---|"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_lag(async_p.clone(), stop.clone());
    for (pipeline, requests) in [(1u32, 50_000u64), (16, 200_000)] {
        let requests = if ctx.quick { requests / 5 } else { requests };
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(redis_benchmark(alone.addr(), TESTS, requests, pipeline)?);
            b.push(redis_benchmark(async_p.addr(), TESTS, requests, pipeline)?);
            c.push(redis_benchmark(sync_p.addr(), TESTS, requests, pipeline)?);
        }
        let (a, b, c) = (medians(&a), medians(&b), medians(&c));
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            let _ = writeln!(
                s.body,
                "| {pipeline} | {} | {} | {} | {} | {:.2} | {:.2} |",
                x.test,
                thousands(x.rps),
                thousands(y.rps),
                thousands(z.rps),
                y.rps / x.rps,
                z.rps / x.rps
            );
        }
        for (what, rows) in [("asynchronous", &b), ("synchronous", &c)] {
            let ratio = geomean_ratio(rows, &a);
            s.headline.push((
                format!("{what} standby vs none (kv, -P {pipeline})"),
                format!("{:.0}% of the throughput", ratio * 100.0),
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("the lag sampler");
    if samples.is_empty() {
        bail!("no replication status from the asynchronous primary");
    }
    let bytes: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let ms: Vec<f64> = samples.iter().map(|s| s.1).collect();
    let _ = writeln!(
        s.body,
        "\nThe asynchronous standby's lag under that load, sampled every 20 ms from the primary's \
         `status` ({} samples): unacknowledged journal bytes median {}, p99 {}, max {}; age of the \
         oldest unacknowledged append median {:.0} ms, p99 {:.0} ms, max {:.0} ms.",
        samples.len(),
        thousands(median(bytes.clone())),
        thousands(percentile(bytes.clone(), 99.0)),
        thousands(bytes.iter().copied().fold(0.0, f64::max)),
        median(ms.clone()),
        percentile(ms.clone(), 99.0),
        ms.iter().copied().fold(0.0, f64::max)
    );
    s.headline.push((
        "asynchronous standby lag under load (p99)".into(),
        format!(
            "{} bytes, {:.0} ms",
            thousands(percentile(bytes, 99.0)),
            percentile(ms, 99.0)
        ),
    ));
    Ok(())
}

/// One failover: (promote took, first reply through HAProxy after the
/// kill, writes acknowledged, acknowledged writes lost).
fn failover_once(pki: &Pki, trial: usize) -> Result<(Duration, Duration, usize, usize)> {
    let ports = free_ports(7);
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let hosts: Vec<String> = (0..4).map(addr).collect();
    let a_dir = pki.state_dir(&format!("failover-{trial}-a"));
    let b_dir = pki.state_dir(&format!("failover-{trial}-b"));
    let (a, a_port) = primary(
        pki,
        &a_dir,
        &[
            "--listen",
            &hosts[0],
            "--agent-check",
            &hosts[1],
            "--sync-standby",
        ],
        &[],
    );
    let mut b = standby(
        pki,
        a_port,
        &b_dir,
        &["--listen", &hosts[2], "--agent-check", &hosts[3]],
        &[],
    );
    wait_following(&mut b);
    let dir = tempfile::tempdir()?;
    let servers = [
        (addr(0), ports[1]),
        (addr(2), ports[3]),
        (addr(5), ports[6]),
    ];
    let haproxy = Haproxy::example(dir.path(), &addr(4), servers);
    haproxy.wait_server("kv", "host0", Duration::from_secs(20), |s, w| {
        s == "UP" && w > 0
    });
    let front: SocketAddr = addr(4).parse()?;
    let writers = Writers::start(front, 8);
    let deadline = Instant::now() + Duration::from_secs(30);
    while writers.acked() < 2000 {
        if Instant::now() > deadline {
            bail!("the writers got too few replies before the kill");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    a.signal(nix_kill());
    let killed = Instant::now();
    let promoted = b.command("promote", &[]);
    if !promoted.status.success() {
        bail!("promote failed: {}", promoted.stderr);
    }
    let promote_took = killed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(first) = writers.replied_after(killed + promote_took) {
            break first;
        }
        if Instant::now() > deadline {
            bail!("no reply through HAProxy within 30 s of the promotion");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    std::thread::sleep(Duration::from_millis(200));
    let acked = writers.finish();
    let mut c = Client::connect(front)?;
    let mut lost = 0;
    for (key, value) in &acked {
        if &c.call(&["GET", key])? != value {
            lost += 1;
        }
    }
    drop(haproxy);
    Ok((promote_took, first - killed, acked.len(), lost))
}

fn nix_kill() -> nix::sys::signal::Signal {
    nix::sys::signal::Signal::SIGKILL
}

fn failover(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let _ = writeln!(s.body, "\n**Failover.**");
    if let Some(why) = missing("haproxy") {
        let _ = writeln!(s.body, "Not measured: {why}.");
        return Ok(());
    }
    let trials = if ctx.quick { 1 } else { 5 };
    let pki = Pki::new();
    let _ = writeln!(
        s.body,
        "A primary with `--sync-standby` and its standby behind HAProxy (`host/fleet/haproxy.cfg` \
         as shipped: checks and agent checks every 100 ms, `fall 2 rise 2`, `retries 3`, \
         `timeout connect 2s`); 8 writers SET distinct keys through HAProxy, reconnecting after \
         any error. The primary is killed with SIGKILL and `wasmhost promote` is run at once \
         (what keepalived's notify FIFO or an operator does); the failover time is from the kill \
         to the first reply any writer gets after the promotion. Then every write whose `+OK` \
         arrived is read back through HAProxy. {trials} trials.\n"
    );
    let _ = writeln!(
        s.body,
        "| trial | promote (kill to serving) | kill to first reply via HAProxy | writes acknowledged | acknowledged writes lost |\n|---|---|---|---|---|"
    );
    let (mut promote, mut first, mut lost_all) = (Vec::new(), Vec::new(), 0);
    for trial in 0..trials {
        let (p, f, acked, lost) = failover_once(&pki, trial)?;
        let _ = writeln!(
            s.body,
            "| {} | {:.1} ms | {:.0} ms | {} | {lost} |",
            trial + 1,
            p.as_secs_f64() * 1e3,
            f.as_secs_f64() * 1e3,
            thousands(acked as f64)
        );
        promote.push(p.as_secs_f64() * 1e3);
        first.push(f.as_secs_f64() * 1e3);
        lost_all += lost;
    }
    let _ = writeln!(
        s.body,
        "\nMost of the time through HAProxy is HAProxy's: a connection it had sent to the dead \
         primary is retried only after its turn-around timer, min(`timeout connect`, 1 s), and \
         the promoted standby is sent traffic once two checks in a row pass."
    );
    s.target(
        "acknowledged writes lost in a failover with --sync-standby",
        "0",
        lost_all.to_string(),
        lost_all == 0,
    );
    s.headline.push((
        "failover, SIGKILL to first reply through HAProxy (median)".into(),
        format!(
            "{:.0} ms (promote {:.0} ms)",
            median(first),
            median(promote)
        ),
    ));
    Ok(())
}
