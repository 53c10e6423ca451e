//! `wasmhost migrate --move-ip` freeze against live connections and state
//! size: kv moved back and forth between two "machines" (network
//! namespaces on one bridge) holding 10 or 1,000 idle client connections
//! and 1,000 or 100,000 keys, while a client PINGs throughout from a third.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wasmhost::service::{MigrateInfo, SwapReport};
use wasmhost_bench::report::Section;
use wasmhost_tests::load::load_keys;
use wasmhost_tests::netns::World;

use super::swap::{Probe, ms};
use super::{Benchmark, Ctx, median};

pub struct MigrateFreeze;

#[derive(Clone, Copy)]
enum Mode {
    MoveIp,
    Relay,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::MoveIp => "move-ip",
            Mode::Relay => "relay",
        }
    }
}

impl Benchmark for MigrateFreeze {
    fn name(&self) -> &'static str {
        "migrate"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let mut s =
            Section::new("Moving a service to another machine (`migrate --move-ip` and `--relay`)");
        let w = match World::create() {
            Ok(w) => w,
            Err(why) => {
                let _ = writeln!(
                    s.body,
                    "Not measured: this machine cannot make network namespaces ({why})."
                );
                return Ok(s);
            }
        };
        let (cases, moves): (&[(Mode, usize, u64)], usize) = if ctx.quick {
            (&[(Mode::MoveIp, 10, 1_000), (Mode::Relay, 10, 1_000)], 2)
        } else {
            (
                &[
                    (Mode::MoveIp, 10, 1_000),
                    (Mode::MoveIp, 1_000, 1_000),
                    (Mode::MoveIp, 10, 100_000),
                    (Mode::MoveIp, 1_000, 100_000),
                    (Mode::Relay, 10, 1_000),
                    (Mode::Relay, 1_000, 1_000),
                ],
                6,
            )
        };
        let _ = writeln!(
            s.body,
            "kv on host A, listening on a service address, holding N idle client connections (from a third \
             machine) and K keys, moved A -> B -> A ... {moves} times; each move freezes every connection \
             with TCP_REPAIR, moves the address, the state and the sockets' TCP state over a mutual-TLS link, \
             and resumes them on the other host. The machines are network namespaces on one bridge (veth), \
             so the link is fast and this is the host's own cost. *Freeze* is from the sender's last event to \
             the receiver's confirmation that it serves; its split: the guest's export, the transfer (send \
             to READY minus the receiver's own work), import and validation, TCP freeze (repair mode on and \
             every socket read, sender), address off (sender), TCP restore (receiver), address on and \
             gratuitous ARP, and repair off (receiver). *Worst client* is the slowest PING seen by a client \
             pinging throughout. With `--relay` nothing moves but the service: the receiver listens on its own \
             address and the sender relays the existing connections (through every host they passed, as the \
             moves alternate), so there is no TCP or address work in the freeze. With `--move-ip`, a PING sent \
             during the freeze is lost with the address, and the client's TCP \
             resends it only when its retransmission timer fires (Linux: at least 200 ms, doubling while it \
             keeps failing), so a request-reply client's gap is about that timer, not the freeze; a client \
             that keeps sending recovers by fast retransmission. Medians of the moves.\n"
        );
        let _ = writeln!(
            s.body,
            "| mode | connections | keys | state bytes | freeze p50 / max ms | export | transfer | import + validate | TCP freeze | address off | TCP restore | address on + ARP | repair off | worst client ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for &(mode, conns, keys) in cases {
            let a = w.host(&w.a, true, &[]);
            let b = w.host(&w.b, false, &[]);
            let addr = w.service_addr();
            w.client
                .run(move || load_keys(addr, 0, keys))
                .context("loading keys")?;
            let probe = w.client.run(move || Probe::start(addr))?;
            let held: Vec<TcpStream> = w.client.run(move || {
                (0..conns)
                    .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
                    .collect::<std::io::Result<Vec<_>>>()
            })?;
            let mut reports = Vec::new();
            let mut worst = Duration::ZERO;
            for n in 0..moves {
                let (from, to) = match n % 2 {
                    0 => (&a, &w.b),
                    _ => (&b, &w.a),
                };
                let t = Instant::now();
                let out = match mode {
                    Mode::MoveIp => w.migrate(from, to, &["--timeout-ms", "60000"]),
                    Mode::Relay => w.relay(from, to, &["--timeout-ms", "60000"]),
                };
                if !out.status.success() {
                    bail!(
                        "migrate {} of {conns} connections, {keys} keys failed: {}",
                        n + 1,
                        out.stderr
                    );
                }
                worst = worst.max(probe.worst_between(t, Instant::now()));
                let report: SwapReport =
                    serde_json::from_str(&out.stdout).context("reading migrate's report")?;
                reports.push(report);
            }
            drop(held);
            let col = |f: &dyn Fn(&SwapReport) -> u64| {
                median(reports.iter().map(|r| f(r) as f64).collect())
            };
            let tcp =
                |f: fn(&MigrateInfo) -> u64| col(&|r: &SwapReport| r.migrate.as_ref().map_or(0, f));
            let freezes: Vec<f64> = reports.iter().map(|r| r.pause.pause_us as f64).collect();
            let max = freezes.iter().cloned().fold(0.0, f64::max);
            let _ = writeln!(
                s.body,
                "| {} | {conns} | {keys} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
                mode.name(),
                reports[0].state_bytes,
                ms(median(freezes.clone())),
                ms(max),
                ms(col(&|r| r.pause.export_us)),
                ms(col(&|r| r.pause.transfer_us)),
                ms(col(&|r| r.pause.import_us + r.pause.validate_us)),
                ms(tcp(|m| m.tcp_freeze_us)),
                ms(tcp(|m| m.address_remove_us)),
                ms(tcp(|m| m.tcp_restore_us)),
                ms(tcp(|m| m.address_add_us)),
                ms(tcp(|m| m.repair_off_us)),
                worst.as_secs_f64() * 1000.0
            );
            if keys == 1_000 {
                s.headline.push((
                    format!("migrate --{} freeze p50, {conns} connections", mode.name()),
                    format!("{} ms", ms(median(freezes))),
                ));
            }
        }
        Ok(s)
    }
}
