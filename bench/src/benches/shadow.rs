//! Shadow swaps: the commit's pause against the state's size, beside the
//! rapid swap's at the same sizes; and what a running shadow costs the live
//! version's throughput.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wasmhost::control::client;
use wasmhost::control::protocol::{Request, Response};
use wasmhost::service::{ShadowOptions, ShadowStatus, SwapReport};
use wasmhost_bench::report::Section;
use wasmhost_tests::{Served, guest};

use super::kv::{TESTS, geomean_ratio, medians, redis_benchmark};
use super::swap::{Probe, load_keys, ms, swap};
use super::{Benchmark, Ctx, median, percentile, thousands};

pub struct ShadowSwap;

/// Live events a shadow handles before each benchmark commit.
const MIRRORED_BEFORE_COMMIT: u64 = 200;

fn request(ctx: &Ctx, host: &Served, request: Request) -> Result<Response> {
    ctx.rt.block_on(client::request(&host.control, request))
}

/// The running shadow's status.
fn shadow_status(ctx: &Ctx, host: &Served) -> Result<ShadowStatus> {
    match request(ctx, host, Request::Status)? {
        Response::Status(s) => s.shadow.context("no shadow in status"),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Starts a shadow of `to` and waits until it is in step and has handled
/// `mirrored` live events (the probe's PINGs make them).
fn start_shadow(ctx: &Ctx, host: &Served, to: &str, mirrored: u64) -> Result<ShadowStatus> {
    let started = match request(
        ctx,
        host,
        Request::Swap {
            path: guest(to),
            fresh: false,
            no_validate: false,
            roundtrip: false,
            shadow: Some(ShadowOptions::default()),
            gradual: None,
        },
    )? {
        Response::Shadow(s) => *s,
        Response::Error { message } => bail!("shadow swap failed: {message}"),
        other => bail!("unexpected reply {other:?}"),
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = shadow_status(ctx, host)?;
        if let Some(why) = &s.stopped {
            bail!("the shadow stopped: {why}");
        }
        if s.state == "in step" && s.mirrored >= mirrored {
            return Ok(ShadowStatus {
                sync_pause_us: started.sync_pause_us,
                ..s
            });
        }
        if Instant::now() > deadline {
            bail!("the shadow did not get in step within 10 minutes: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn commit(ctx: &Ctx, host: &Served) -> Result<SwapReport> {
    match request(ctx, host, Request::Commit)? {
        Response::Swapped(r) => Ok(*r),
        Response::Error { message } => bail!("commit failed: {message}"),
        other => bail!("unexpected reply {other:?}"),
    }
}

impl Benchmark for ShadowSwap {
    fn name(&self) -> &'static str {
        "shadow"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let mut s =
            Section::new("Shadow swaps: commit pause vs state size, and the cost of a shadow");
        commit_pause(ctx, &mut s)?;
        throughput(ctx, &mut s)?;
        Ok(s)
    }
}

fn commit_pause(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let host = Served::start(
        "kv",
        &["--max-memory", "4GiB", "--state-timeout-ms", "120000"],
    );
    let probe = Probe::start(host.addr())?;
    let sizes: &[(u64, usize)] = if ctx.quick {
        &[(1_000, 4), (20_000, 2)]
    } else {
        &[(20_000, 10), (100_000, 10), (1_000_000, 4)]
    };
    let _ = writeln!(
        s.body,
        "kv with N keys (`key:NNNNNNNNNN`, 16-byte values), a client PINGing throughout. At each size, \
         alternating kv -> kv-v2 -> kv: rapid swaps (`wasmhost swap`, validation on), then shadow swaps \
         (`swap --shadow`, {MIRRORED_BEFORE_COMMIT} live events mirrored, then `wasmhost commit`). *Sync \
         pause* is the live version's pause when the shadow started: none when it replays the journal, an \
         export when the journal's snapshot is in a format the new version does not import (kv-v2 -> kv \
         after kv-v2 took its own `kv/2` snapshot). *Commit pause* is the `pause_us` of the commit's \
         report.\n"
    );
    let _ = writeln!(
        s.body,
        "| keys | rapid swaps | rapid pause p50 / p99 ms | shadow swaps | sync pause p50 / max ms | commit pause p50 / p99 ms | worst client during commits ms |\n|---|---|---|---|---|---|---|"
    );
    let mut loaded = 0;
    let mut next = "kv-v2";
    let mut commit_p99_max: f64 = 0.0;
    for &(keys, swaps) in sizes {
        load_keys(host.addr(), loaded, keys).context("loading keys")?;
        loaded = keys;
        let mut rapid = Vec::new();
        for _ in 0..swaps {
            rapid.push(swap(ctx, &host, next)?.pause.pause_us as f64);
            next = if next == "kv" { "kv-v2" } else { "kv" };
        }
        let (mut sync, mut commits) = (Vec::new(), Vec::new());
        let mut worst = Duration::ZERO;
        for _ in 0..swaps {
            let shadow = start_shadow(ctx, &host, next, MIRRORED_BEFORE_COMMIT)?;
            sync.push(shadow.sync_pause_us as f64);
            let t = Instant::now();
            commits.push(commit(ctx, &host)?.pause.pause_us as f64);
            worst = worst.max(probe.worst_between(t, Instant::now()));
            next = if next == "kv" { "kv-v2" } else { "kv" };
        }
        let p99 = percentile(commits.clone(), 99.0);
        commit_p99_max = commit_p99_max.max(p99);
        let _ = writeln!(
            s.body,
            "| {} | {swaps} | {} / {} | {swaps} | {} / {} | {} / {} | {:.2} |",
            thousands(keys as f64),
            ms(median(rapid.clone())),
            ms(percentile(rapid.clone(), 99.0)),
            ms(median(sync.clone())),
            ms(sync.iter().copied().fold(0.0, f64::max)),
            ms(median(commits.clone())),
            ms(p99),
            worst.as_secs_f64() * 1000.0
        );
        s.headline.push((
            format!(
                "shadow commit pause p50 / p99, {} keys",
                thousands(keys as f64)
            ),
            format!(
                "{} / {} ms (rapid swap: {} / {} ms)",
                ms(median(commits)),
                ms(p99),
                ms(median(rapid.clone())),
                ms(percentile(rapid, 99.0))
            ),
        ));
    }
    s.target(
        "shadow commit pause p99, any state size",
        "< 1 ms",
        format!("{} ms (worst size)", ms(commit_p99_max)),
        commit_p99_max < 1000.0,
    );
    Ok(())
}

/// Keys in the state while the throughput is measured.
const KEYS: u64 = 100_000;

fn throughput(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let host = Served::start("kv", &[]);
    load_keys(host.addr(), 0, KEYS)?;
    let rounds = if ctx.quick { 1 } else { 5 };
    let _ = writeln!(
        s.body,
        "\n**The live version's throughput while a shadow runs**: kv with {} keys, `redis-benchmark -t \
         {TESTS} -c 50 -P N`, {rounds} rounds alternating between kv alone and kv with a kv-v2 shadow \
         (started before the round, aborted after it); medians. The shadow runs on its own thread and \
         competes for this machine's cores with the live version and the load generator; the live \
         version pays for copying each event and its output into the shadow's queue.\n",
        thousands(KEYS as f64)
    );
    let _ = writeln!(
        s.body,
        "| -P | test | alone ops/s | with a shadow ops/s | with / alone | shadow behind at the end (events) |\n|---|---|---|---|---|---|"
    );
    for (pipeline, requests) in [(1u32, 100_000u64), (16, 500_000)] {
        let requests = if ctx.quick { requests / 5 } else { requests };
        let (mut alone, mut shadowed, mut behind) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            alone.push(redis_benchmark(host.addr(), TESTS, requests, pipeline)?);
            start_shadow(ctx, &host, "kv-v2", 0)?;
            shadowed.push(redis_benchmark(host.addr(), TESTS, requests, pipeline)?);
            let status = shadow_status(ctx, &host)?;
            if let Some(why) = status.stopped {
                bail!("the shadow stopped during the round: {why}");
            }
            behind.push(status.lag_events as f64);
            match request(ctx, &host, Request::Abort)? {
                Response::Shadow(_) => {}
                other => bail!("abort: unexpected reply {other:?}"),
            }
        }
        let (a, b) = (medians(&alone), medians(&shadowed));
        let lag = median(behind);
        for (x, y) in a.iter().zip(&b) {
            let _ = writeln!(
                s.body,
                "| {pipeline} | {} | {} | {} | {:.2} | {lag:.0} |",
                x.test,
                thousands(x.rps),
                thousands(y.rps),
                y.rps / x.rps
            );
        }
        let ratio = geomean_ratio(&b, &a);
        s.target(
            &format!("throughput with a shadow running, -P {pipeline}"),
            ">= 80% of kv alone",
            format!("{:.0}% (geometric mean over {TESTS})", ratio * 100.0),
            ratio >= 0.8,
        );
        s.headline.push((
            format!("throughput with a shadow running (kv, -P {pipeline})"),
            format!("{:.0}% of kv alone", ratio * 100.0),
        ));
    }
    Ok(())
}
