//! The chat guests side by side: `chat` (Rust) and `chat-js` (JavaScript,
//! componentize-js). Messages delivered per second through one channel
//! with N clients, and the swap pause chat -> chat-js -> chat with a few
//! hundred users joined (chat <-> chat-v2 is the Rust-to-Rust reference).
//! The Rust guest is the baseline; there are no targets.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wasmhost::service::SwapReport;
use wasmhost_bench::chart::grouped_bars;
use wasmhost_bench::irc::{ChatLoad, ChatResult, IrcClient, joined, run_chat};
use wasmhost_bench::report::Section;
use wasmhost_tests::Served;

use super::swap::{Probe, ms, pause_head, pause_row, swap};
use super::{Benchmark, Ctx, built, median, not_built, thousands};

pub struct ChatGuests;

/// The guests compared: (name, language).
const CHATS: [(&str, &str); 2] = [("chat", "Rust"), ("chat-js", "JavaScript")];

impl Benchmark for ChatGuests {
    fn name(&self) -> &'static str {
        "chat"
    }

    fn run(&self, ctx: &Ctx) -> Result<Section> {
        let mut s = Section::new("chat guests: Rust and JavaScript");
        throughput(ctx, &mut s)?;
        swaps(ctx, &mut s)?;
        Ok(s)
    }
}

/// Messages per second through one channel, every client sending.
fn throughput(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let (client_counts, secs, rounds): (&[usize], u64, usize) = if ctx.quick {
        (&[20], 1, 1)
    } else {
        (&[10, 100], 3, 2)
    };
    let servers: Vec<Option<Served>> = CHATS
        .iter()
        .map(|(name, _)| built(name).map(|_| Served::start(name, &[])))
        .collect();
    let _ = writeln!(
        s.body,
        "N IRC clients joined to one channel, each in a closed loop: `PRIVMSG #channel` (the text is the time it \
         was sent) and `PING`, then wait for its PONG while reading everyone else's messages; each message is \
         delivered to the N-1 others, all checked to arrive exactly once. {secs} s per run, {rounds} rounds \
         alternating between the guests; medians. *Latency* is from a message's send to its receipt by another \
         client. The Rust guest is the baseline: no targets.\n"
    );
    let _ = writeln!(
        s.body,
        "| clients | guest | messages sent/s | deliveries/s | vs chat (Rust) | delivery p50 / p99 ms |\n|---|---|---|---|---|---|"
    );
    let mut cats = Vec::new();
    let mut series: Vec<(String, Vec<f64>)> = CHATS
        .iter()
        .map(|(name, lang)| (format!("{name} ({lang})"), Vec::new()))
        .collect();
    for &clients in client_counts {
        let mut results: Vec<Vec<ChatResult>> = CHATS.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for (g, server) in servers.iter().enumerate() {
                let Some(server) = server else { continue };
                let load = ChatLoad {
                    addr: server.addr(),
                    clients,
                    channel: format!("#load{clients}"),
                    prefix: format!("r{round}n{clients}c"),
                    duration: Duration::from_secs(secs),
                    max_messages: 10_000_000,
                };
                let result = ctx
                    .rt
                    .block_on(run_chat(&load))
                    .with_context(|| format!("{} with {clients} clients", CHATS[g].0))?;
                results[g].push(result);
            }
        }
        let rate =
            |v: &[ChatResult]| median(v.iter().map(ChatResult::delivered_per_second).collect());
        let base = (!results[0].is_empty()).then(|| rate(&results[0]));
        let mut figures = Vec::new();
        for (g, (name, lang)) in CHATS.iter().enumerate() {
            let r = &results[g];
            if r.is_empty() {
                let _ = writeln!(s.body, "| {clients} | {name} ({lang}) | not built | | | |");
                series[g].1.push(0.0);
                continue;
            }
            let delivered = rate(r);
            let pct = |p| median(r.iter().map(|x| x.percentile_ms(p)).collect());
            let vs = base.map_or(String::new(), |b| format!("{:.2}", delivered / b));
            let _ = writeln!(
                s.body,
                "| {clients} | {name} ({lang}) | {} | {} | {vs} | {:.3} / {:.3} |",
                thousands(median(r.iter().map(ChatResult::sent_per_second).collect())),
                thousands(delivered),
                pct(50.0),
                pct(99.0)
            );
            figures.push(format!("{name} {}", thousands(delivered)));
            series[g].1.push(delivered);
        }
        // The README gets the largest channel.
        if Some(&clients) == client_counts.last() {
            s.headline.push((
                format!(
                    "chat deliveries/s, {clients} clients in one channel (Rust / JavaScript guest)"
                ),
                if results[1].is_empty() {
                    format!("{} (chat-js not built)", figures.join(", "))
                } else {
                    figures.join(", ")
                },
            ));
        }
        cats.push(format!("{clients} clients"));
    }
    for (g, (name, _)) in CHATS.iter().enumerate() {
        if servers[g].is_none() {
            let _ = writeln!(s.body, "\n{}", not_built(name));
        }
    }
    let (path, file) = ctx.out.chart_path("chat");
    grouped_bars(
        &path,
        "chat: messages delivered per second",
        "deliveries/s",
        &cats,
        &series,
    )?;
    s.charts.push((file, "chat deliveries per second".into()));
    Ok(())
}

/// Users joined for the swap: everyone in `#lobby` and in one of
/// `ROOMS` rooms, with messages in each channel's history.
const ROOMS: usize = 10;

/// Joins `users` users and fills the channels' history; returns the
/// clients, with nothing left to read.
async fn populate(addr: std::net::SocketAddr, users: usize) -> Result<Vec<IrcClient>> {
    let mut clients = joined(addr, "user", users, "#lobby").await?;
    for (i, c) in clients.iter_mut().enumerate() {
        c.join(&format!("#room{}", i % ROOMS)).await?;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut text = format!(
            "PRIVMSG #room{} :hello from {} in my room\r\n",
            i % ROOMS,
            c.nick
        );
        if i < 60 {
            text += &format!("PRIVMSG #lobby :hello everyone, this is {}\r\n", c.nick);
        }
        c.send(&text).await?;
        c.sync("said").await?;
    }
    for c in &mut clients {
        c.sync("populated").await?;
    }
    Ok(clients)
}

/// The swap pause between the Rust and JavaScript chat guests, beside
/// chat <-> chat-v2, with a few hundred users joined.
fn swaps(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let (users, rounds) = if ctx.quick { (200, 3) } else { (500, 10) };
    let _ = writeln!(
        s.body,
        "\n### Swap pause across languages: chat (Rust) <-> chat-js (JavaScript), {users} users\n\n\
         {users} users registered, all in `#lobby` and each in one of {ROOMS} rooms, with history in every \
         channel; the `chat/1` state moves in rounds of chat -> chat-v2 -> chat -> chat-js -> chat after one \
         warm-up round (chat <-> chat-v2 is the Rust-to-Rust reference). *Worst client* is the slowest PING of \
         a client pinging throughout. Afterwards a private message between two users checks that the users \
         came through. No target.\n"
    );
    let host = Served::start("chat", &["--state-timeout-ms", "120000"]);
    let mut clients = ctx
        .rt
        .block_on(populate(host.addr(), users))
        .context("joining the users")?;
    let probe = Probe::start_with(
        host.addr(),
        b"PING probe\r\n",
        b":wasmhost PONG wasmhost :probe\r\n",
    )?;
    let js = built("chat-js").is_some();
    let order: &[(&str, usize)] = if js {
        &[("chat-v2", 0), ("chat", 0), ("chat-js", 1), ("chat", 2)]
    } else {
        &[("chat-v2", 0), ("chat", 0)]
    };
    let mut reports: [Vec<SwapReport>; 3] = Default::default();
    let mut worst = [Duration::ZERO; 3];
    for round in 0..=rounds {
        for &(to, row) in order {
            let t = Instant::now();
            let report = swap(ctx, &host, to)?;
            let w = probe.worst_between(t, Instant::now());
            if round > 0 {
                reports[row].push(report);
                worst[row] = worst[row].max(w);
            }
        }
    }
    drop(probe);
    ctx.rt.block_on(async {
        let to = clients[1].nick.clone();
        clients[0]
            .send(&format!("PRIVMSG {to} :still here after the swaps\r\n"))
            .await?;
        clients[1].expect("PRIVMSG").await?;
        for c in &mut clients {
            c.sync("after").await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    if reports.iter().flatten().any(|r| r.connections < users) {
        bail!("a swap kept fewer than {users} connections");
    }
    let _ = writeln!(s.body, "{}", pause_head("users"));
    let n = users.to_string();
    let rows = [
        "chat <-> chat-v2 (Rust, reference)",
        "chat -> chat-js (Rust -> JavaScript)",
        "chat-js -> chat (JavaScript -> Rust)",
    ];
    for (row, what) in rows.iter().enumerate() {
        if reports[row].is_empty() {
            let _ = writeln!(s.body, "| {what} | {n} | not built | | | | | | | |");
        } else {
            let _ = writeln!(s.body, "{}", pause_row(what, &n, &reports[row], worst[row]));
        }
    }
    if js {
        let p50 =
            |r: &[SwapReport]| ms(median(r.iter().map(|r| r.pause.pause_us as f64).collect()));
        s.headline.push((
            format!("swap pause p50, chat -> chat-js / chat-js -> chat (Rust <-> JavaScript), {users} users"),
            format!("{} / {} ms", p50(&reports[1]), p50(&reports[2])),
        ));
    } else {
        let _ = writeln!(s.body, "\n{}", not_built("chat-js"));
    }
    Ok(())
}
