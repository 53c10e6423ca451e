//! Host upgrade blackout against live connections and state size: kv with
//! 1,000 and 100,000 keys, 100 to 10,000 idle connections held open, while
//! a client PINGs throughout and measures the worst latency it sees.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wasmhost::control::client;
use wasmhost::control::protocol::{Request, Response};
use wasmhost::service::SwapReport;
use wasmhost_bench::chart::grouped_bars;
use wasmhost_bench::report::Section;
use wasmhost_tests::Served;

use super::swap::{Probe, load_keys, ms};
use super::{Benchmark, Ctx, median};

pub struct UpgradeBlackout;

fn upgrade(ctx: &Ctx, host: &Served) -> Result<SwapReport> {
    let request = Request::Upgrade {
        binary: None,
        component: None,
        timeout_ms: 60_000,
        exec: false,
    };
    match ctx.rt.block_on(client::request(&host.control, request))? {
        Response::Swapped(report) => {
            if let Some(u) = &report.upgrade {
                host.track(u.new_pid);
            }
            Ok(*report)
        }
        Response::Error { message } => bail!("upgrade failed: {message}"),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Opens idle connections to `host` until `conns` are open, and waits
/// until the service has seen them all (plus the probe's).
fn hold(host: &Served, conns: &mut Vec<TcpStream>, want: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while conns.len() < want {
        if Instant::now() > deadline {
            bail!("opening {want} connections took too long");
        }
        conns.push(TcpStream::connect(host.addr()).context("connecting")?);
    }
    loop {
        let out = host.command("status", &["--json"]);
        let open = out
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("\"connections\": "))
            .and_then(|v| v.trim_end_matches(',').parse::<usize>().ok())
            .unwrap_or(0);
        if open > want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the service saw {open} of {want} connections");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Benchmark for UpgradeBlackout {
    fn name(&self) -> &'static str {
        "upgrade"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let (sizes, conn_counts, runs): (&[u64], &[usize], usize) = if ctx.quick {
            (&[1_000], &[100, 1_000], 2)
        } else {
            (&[1_000, 100_000], &[100, 1_000, 10_000], 5)
        };
        let mut s = Section::new("Host upgrade blackout vs connections and state");
        let _ = writeln!(
            s.body,
            "`wasmhost upgrade` (spawn mode) of kv holding N idle client connections and K keys; every connection, \
             its buffers, the timers and the state move to a new process. *Blackout* is from the freeze in the old \
             process to its commit (the new process has checked every socket and imported the state); *worst \
             client* is the slowest PING of a client pinging throughout, which also includes the new process \
             resuming every connection. Median of {runs} upgrades per row.\n"
        );
        let _ = writeln!(
            s.body,
            "| keys | state bytes | connections | blackout p50 / max ms | export | transfer | import + validate | host ms | worst client ms |\n|---|---|---|---|---|---|---|---|---|"
        );
        let (mut cats, mut guest, mut transfer, mut host_part) = (vec![], vec![], vec![], vec![]);
        for &keys in sizes {
            let host = Served::start(
                "kv",
                &[
                    "--max-connections",
                    "20000",
                    "--max-memory",
                    "4GiB",
                    "--state-timeout-ms",
                    "120000",
                ],
            );
            load_keys(host.addr(), 0, keys).context("loading keys")?;
            let probe = Probe::start(host.addr())?;
            let mut conns = Vec::new();
            for &n in conn_counts {
                hold(&host, &mut conns, n)?;
                let mut reports = Vec::new();
                let mut worst = Duration::ZERO;
                for _ in 0..runs {
                    let t = Instant::now();
                    reports.push(upgrade(ctx, &host)?);
                    worst = worst.max(probe.worst_between(t, Instant::now()));
                }
                let col = |f: fn(&SwapReport) -> u64| {
                    reports.iter().map(|r| f(r) as f64).collect::<Vec<f64>>()
                };
                let blackout = col(|r| r.pause.pause_us);
                let max = blackout.iter().copied().fold(0.0, f64::max);
                let p50 = median(blackout);
                let guest_us = median(col(|r| {
                    r.pause.export_us + r.pause.import_us + r.pause.validate_us
                }));
                let _ = writeln!(
                    s.body,
                    "| {keys} | {} | {n} | {} / {} | {} | {} | {} | {} | {:.1} |",
                    reports[0].state_bytes,
                    ms(p50),
                    ms(max),
                    ms(median(col(|r| r.pause.export_us))),
                    ms(median(col(|r| r.pause.transfer_us))),
                    ms(median(col(|r| r.pause.import_us + r.pause.validate_us))),
                    ms(median(col(|r| r.pause.host_us))),
                    worst.as_secs_f64() * 1000.0
                );
                s.headline.push((
                    format!("upgrade blackout p50, {n} connections, {keys} keys"),
                    format!("{} ms", ms(p50)),
                ));
                if n == 10_000 {
                    s.target(
                        &format!("upgrade blackout p50, 10,000 connections, {keys} keys"),
                        "< 100 ms",
                        format!("{} ms", ms(p50)),
                        p50 < 100_000.0,
                    );
                }
                cats.push(format!("{n} conns, {keys} keys"));
                guest.push(guest_us / 1000.0);
                transfer.push(median(col(|r| r.pause.transfer_us)) / 1000.0);
                host_part.push(median(col(|r| r.pause.host_us)) / 1000.0);
            }
            drop(probe);
        }
        let (path, file) = ctx.out.chart_path("upgrade");
        grouped_bars(
            &path,
            "upgrade blackout split (median, ms)",
            "ms",
            &cats,
            &[
                ("guest (export, import, validate)".into(), guest),
                ("transfer".into(), transfer),
                ("host".into(), host_part),
            ],
        )?;
        s.charts.push((file, "upgrade blackout split".into()));
        Ok(s)
    }
}
