//! What keeping the state through traps costs: kv's throughput with the
//! journal on (snapshots at the default thresholds) against the journal off,
//! with 100,000 keys in the state, redis-server beside them; and how long a
//! rebuild takes against the journal's length.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wasmhost_bench::procs::{redis_aof, redis_server};
use wasmhost_bench::report::Section;
use wasmhost_tests::Served;

use super::kv::{TESTS, geomean_ratio, medians, redis_benchmark};
use super::swap::load_keys;
use super::{Benchmark, Ctx, thousands};

pub struct DurableCost;

/// Keys in the state while the throughput is measured.
const KEYS: u64 = 100_000;

/// The service's status as JSON.
fn status(host: &Served) -> Result<serde_json::Value> {
    let out = host.command("status", &["--json"]);
    if !out.status.success() {
        bail!("wasmhost status failed: {}", out.stderr);
    }
    serde_json::from_str(&out.stdout).context("reading wasmhost status --json")
}

/// Makes kv trap with DEBUG SEGFAULT and returns the rebuild's duration
/// (µs) from `status`.
fn trap_and_rebuild(host: &Served, recoveries_before: u64) -> Result<u64> {
    let mut c = TcpStream::connect(host.addr())?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    c.write_all(b"*2\r\n$5\r\nDEBUG\r\n$8\r\nSEGFAULT\r\n")?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        bail!(
            "DEBUG SEGFAULT answered instead of trapping: {}",
            String::from_utf8_lossy(&rest)
        );
    }
    let s = status(host)?;
    let d = &s["durable"];
    if d["recoveries"].as_u64() != Some(recoveries_before + 1) {
        bail!("the trap was not rebuilt: {d}");
    }
    d["last_recovery_us"]
        .as_u64()
        .context("no last_recovery_us in status")
}

impl Benchmark for DurableCost {
    fn name(&self) -> &'static str {
        "durable"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let mut s = Section::new("Keeping the state through traps: journal cost and rebuild time");
        throughput(ctx, &mut s)?;
        fsync_modes(ctx, &mut s)?;
        rebuild_time(ctx, &mut s)?;
        Ok(s)
    }
}

fn throughput(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let on = Served::start("kv", &[]);
    let off = Served::start("kv", &["--journal", "off"]);
    let redis = redis_server()?;
    for addr in [on.addr(), off.addr(), redis.addr] {
        load_keys(addr, 0, KEYS)?;
    }
    let rounds = if ctx.quick { 1 } else { 5 };
    let _ = writeln!(
        s.body,
        "kv with {} keys, `redis-benchmark -t {TESTS} -c 50 -P N`, {rounds} rounds alternating between \
         kv with the journal on (every event recorded; snapshots at the default thresholds: 32 MiB, \
         500,000 events or 60 s), kv with `--journal off`, and redis-server (no persistence); medians. \
         Every event is journaled, reads too: the host cannot tell them apart.\n",
        thousands(KEYS as f64)
    );
    let _ = writeln!(
        s.body,
        "| -P | test | journal on ops/s | journal off ops/s | on / off | redis ops/s | on / redis |\n|---|---|---|---|---|---|---|"
    );
    for (pipeline, requests) in [(1u32, 100_000u64), (16, 500_000)] {
        let requests = if ctx.quick { requests / 5 } else { requests };
        let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(redis_benchmark(on.addr(), TESTS, requests, pipeline)?);
            b.push(redis_benchmark(off.addr(), TESTS, requests, pipeline)?);
            r.push(redis_benchmark(redis.addr, TESTS, requests, pipeline)?);
        }
        let (a, b, r) = (medians(&a), medians(&b), medians(&r));
        for ((x, y), z) in a.iter().zip(&b).zip(&r) {
            let _ = writeln!(
                s.body,
                "| {pipeline} | {} | {} | {} | {:.2} | {} | {:.2} |",
                x.test,
                thousands(x.rps),
                thousands(y.rps),
                x.rps / y.rps,
                thousands(z.rps),
                x.rps / z.rps
            );
        }
        let ratio = geomean_ratio(&a, &b);
        s.target(
            &format!("journal on vs off, kv with 100,000 keys, -P {pipeline}"),
            ">= 95%",
            format!("{:.0}% (geometric mean over {TESTS})", ratio * 100.0),
            ratio >= 0.95,
        );
        s.headline.push((
            format!("journal on vs off (kv, 100,000 keys, -P {pipeline})"),
            format!("{:.0}% of the throughput", ratio * 100.0),
        ));
    }
    let d = status(&on)?["durable"].clone();
    let _ = writeln!(
        s.body,
        "\nDuring these runs the journaled kv took {} snapshots of about {} bytes; the longest \
         snapshot pause was {} µs (the last {} µs); its journal holds {} events ({} bytes) now.",
        d["snapshots"],
        d["snapshot_bytes"],
        d["max_snapshot_pause_us"],
        d["last_snapshot_pause_us"],
        d["journal_events"],
        d["journal_bytes"]
    );
    Ok(())
}

/// `--state-dir` with each `--fsync` mode beside redis-server with the same
/// `appendfsync`.
fn fsync_modes(ctx: &Ctx, s: &mut Section) -> Result<()> {
    const TESTS: &str = "set,get";
    let dir = tempfile::tempdir()?;
    let rounds = if ctx.quick { 1 } else { 3 };
    let _ = writeln!(
        s.body,
        "\n**On disk** (`--state-dir`, each `--fsync` mode) beside redis-server with `--appendonly yes` \
         and the same `appendfsync`, both with {} keys loaded; `redis-benchmark -t {TESTS} -c 50 -P N`, \
         {rounds} rounds alternating; medians. wasmhost writes a record for every event, reads too, and \
         sends no reply before its record is written (`always`: synced); Redis writes only commands \
         that change data.\n",
        thousands(KEYS as f64)
    );
    let _ = writeln!(
        s.body,
        "| fsync | -P | test | wasmhost ops/s | redis ops/s | ratio |\n|---|---|---|---|---|---|"
    );
    for mode in ["always", "everysec", "no"] {
        let state = dir.path().join(format!("wasmhost-{mode}"));
        let host = Served::start(
            "kv",
            &[
                "--state-dir",
                state.to_str().context("UTF-8")?,
                "--fsync",
                mode,
            ],
        );
        let redis_dir = dir.path().join(format!("redis-{mode}"));
        std::fs::create_dir_all(&redis_dir)?;
        let redis = redis_aof(&redis_dir, mode)?;
        load_keys(host.addr(), 0, KEYS)?;
        load_keys(redis.addr, 0, KEYS)?;
        for (pipeline, requests) in [(1u32, 50_000u64), (16, 200_000)] {
            let requests = if ctx.quick { requests / 5 } else { requests };
            let (mut a, mut r) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                a.push(redis_benchmark(host.addr(), TESTS, requests, pipeline)?);
                r.push(redis_benchmark(redis.addr, TESTS, requests, pipeline)?);
            }
            let (a, r) = (medians(&a), medians(&r));
            for (x, z) in a.iter().zip(&r) {
                let _ = writeln!(
                    s.body,
                    "| {mode} | {pipeline} | {} | {} | {} | {:.2} |",
                    x.test,
                    thousands(x.rps),
                    thousands(z.rps),
                    x.rps / z.rps
                );
            }
            let ratio = geomean_ratio(&a, &r);
            s.headline.push((
                format!("--state-dir --fsync {mode} vs redis appendfsync {mode}, -P {pipeline}"),
                format!("{:.0}% of redis ops/s", ratio * 100.0),
            ));
        }
    }
    Ok(())
}

fn rebuild_time(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let extra: &[u64] = if ctx.quick {
        &[0, 10_000]
    } else {
        &[0, 10_000, 100_000, 400_000]
    };
    let _ = writeln!(
        s.body,
        "\n**Rebuild after a trap** (kv, DEBUG SEGFAULT): a new instance imports the snapshot and \
         replays the journal. Each row starts a kv, writes {} keys (pipelined SETs, 10,000 per \
         write), then either takes a snapshot (`wasmhost snapshot`) and writes N more keys, or \
         keeps everything in the journal (no snapshot: the rebuild runs `init` and replays every \
         write). The rebuild time is the host's (`status`: `last_recovery_us`).\n",
        thousands(KEYS as f64)
    );
    let _ = writeln!(
        s.body,
        "| base | keys after it | journal events | journal bytes | rebuild |\n|---|---|---|---|---|"
    );
    let mut headline = None;
    for snapshot in [true, false] {
        for &n in extra {
            if !snapshot && n > 0 {
                continue;
            }
            let host = Served::start("kv", &["--config", "enable-debug-command=yes"]);
            load_keys(host.addr(), 0, KEYS)?;
            if snapshot {
                let out = host.command("snapshot", &[]);
                if !out.status.success() {
                    bail!("wasmhost snapshot failed: {}", out.stderr);
                }
            }
            load_keys(host.addr(), KEYS, KEYS + n)?;
            let d = status(&host)?["durable"].clone();
            let us = trap_and_rebuild(&host, 0)?;
            let base = match snapshot {
                true => format!("snapshot of {} keys", thousands(KEYS as f64)),
                false => "init".to_string(),
            };
            let written = if snapshot { n } else { KEYS };
            let _ = writeln!(
                s.body,
                "| {base} | {} | {} | {} | {:.1} ms |",
                thousands(written as f64),
                d["journal_events"],
                thousands(d["journal_bytes"].as_f64().unwrap_or(0.0)),
                us as f64 / 1000.0
            );
            if !snapshot {
                headline = Some(us);
            }
            if snapshot && n == 0 {
                s.headline.push((
                    "rebuild after a trap, kv with 100,000 keys, from a snapshot".into(),
                    format!("{:.1} ms", us as f64 / 1000.0),
                ));
            }
        }
    }
    if let Some(us) = headline {
        s.headline.push((
            "rebuild after a trap, kv with 100,000 keys, all in the journal".into(),
            format!("{:.1} ms", us as f64 / 1000.0),
        ));
    }
    restart_time(s)
}

/// `kill -9` and a restart on the state dir: how long until the service
/// answers again, with 100,000 keys in a snapshot or in the journal.
fn restart_time(s: &mut Section) -> Result<()> {
    let _ = writeln!(
        s.body,
        "\n**Restart after `kill -9`** (`--state-dir`, `--fsync everysec`): a new `wasmhost serve` on \
         the same directory loads the snapshot, replays the journal and answers PING; the time is \
         from starting the process to the first PONG (the component comes from the compile cache).\n"
    );
    let _ = writeln!(
        s.body,
        "| state on disk | restart to first PONG |\n|---|---|"
    );
    for snapshot in [true, false] {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("state");
        let args = ["--state-dir", state.to_str().context("UTF-8")?];
        let host = Served::start("kv", &args);
        load_keys(host.addr(), 0, KEYS)?;
        if snapshot {
            let out = host.command("snapshot", &[]);
            if !out.status.success() {
                bail!("wasmhost snapshot failed: {}", out.stderr);
            }
        }
        drop(host); // SIGKILL
        let began = std::time::Instant::now();
        let host = Served::start("kv", &args);
        wasmhost_bench::procs::wait_for_pong(host.addr(), Duration::from_secs(120))?;
        let took = began.elapsed();
        let what = match snapshot {
            true => "snapshot of 100,000 keys, empty journal",
            false => "100,000 keys in the journal (snapshot of `init`)",
        };
        let _ = writeln!(s.body, "| {what} | {:.0} ms |", took.as_secs_f64() * 1000.0);
        if snapshot {
            s.headline.push((
                "restart after kill -9, kv with 100,000 keys on disk".into(),
                format!("{:.0} ms to the first reply", took.as_secs_f64() * 1000.0),
            ));
        }
    }
    Ok(())
}
