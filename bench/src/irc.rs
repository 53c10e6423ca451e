//! A small async IRC client and a closed-loop channel load for the chat
//! guests: every client sends a message to one channel and waits for its
//! own PING to come back, while it receives everyone else's messages.
//! Bounded in time and count; every read has a time limit.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long one read may wait before the load gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines one wait may skip before it gives up (a bound besides time).
const MAX_LINES: usize = 1_000_000;

/// One client connection, registered under `nick`.
pub struct IrcClient {
    pub nick: String,
    conn: BufReader<TcpStream>,
    line: String,
}

impl IrcClient {
    /// Connects and registers (NICK, USER), waiting for the welcome (001).
    pub async fn register(addr: SocketAddr, nick: &str) -> Result<IrcClient> {
        let conn = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        conn.set_nodelay(true)?;
        let mut c = IrcClient {
            nick: nick.to_string(),
            conn: BufReader::new(conn),
            line: String::new(),
        };
        c.send(&format!("NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n"))
            .await?;
        c.expect(&format!(" 001 {nick} ")).await?;
        Ok(c)
    }

    /// Sends raw text (one or more `\r\n`-terminated lines).
    pub async fn send(&mut self, text: &str) -> Result<()> {
        self.conn.get_mut().write_all(text.as_bytes()).await?;
        Ok(())
    }

    /// The next line, without its line ending.
    pub async fn next_line(&mut self) -> Result<&str> {
        self.line.clear();
        let n = tokio::time::timeout(READ_TIMEOUT, self.conn.read_line(&mut self.line))
            .await
            .with_context(|| format!("{}: no line within {READ_TIMEOUT:?}", self.nick))??;
        if n == 0 {
            bail!("{}: the server closed the connection", self.nick);
        }
        Ok(self.line.trim_end())
    }

    /// Reads lines until one contains `needle`.
    pub async fn expect(&mut self, needle: &str) -> Result<()> {
        for _ in 0..MAX_LINES {
            if self.next_line().await?.contains(needle) {
                return Ok(());
            }
        }
        bail!("{}: no line with {needle:?}", self.nick)
    }

    /// Joins `channel`, waiting for the end of its names list (366).
    pub async fn join(&mut self, channel: &str) -> Result<()> {
        self.send(&format!("JOIN {channel}\r\n")).await?;
        let nick = self.nick.clone();
        self.expect(&format!(" 366 {nick} {channel} ")).await
    }

    /// PING with `token` and read up to its PONG: everything sent to this
    /// client before is read.
    pub async fn sync(&mut self, token: &str) -> Result<()> {
        self.send(&format!("PING {token}\r\n")).await?;
        self.expect(" PONG ").await?;
        if !self.line.trim_end().ends_with(&format!(":{token}")) {
            bail!("{}: unexpected PONG {:?}", self.nick, self.line.trim_end());
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct ChatLoad {
    pub addr: SocketAddr,
    /// Clients in the channel; every one sends, every one receives.
    pub clients: usize,
    pub channel: String,
    /// Nicks are `{prefix}{i}` (unique per run: a nick is free again only
    /// once the server has seen the previous run's connections close).
    pub prefix: String,
    pub duration: Duration,
    /// Stop after this many messages sent in all, whichever comes first.
    pub max_messages: u64,
}

#[derive(Debug)]
pub struct ChatResult {
    pub sent: u64,
    /// Messages received (each sent one reaches every other member).
    pub delivered: u64,
    pub elapsed: Duration,
    /// From a message's send to its receipt by another client, in
    /// microseconds.
    pub latency_us: Histogram<u64>,
}

impl ChatResult {
    pub fn delivered_per_second(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }

    pub fn sent_per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        self.latency_us.value_at_quantile(p / 100.0) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Registers `n` clients named `{prefix}{i}` and joins them all to
/// `channel`; returns them with nothing left to read.
pub async fn joined(
    addr: SocketAddr,
    prefix: &str,
    n: usize,
    channel: &str,
) -> Result<Vec<IrcClient>> {
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = IrcClient::register(addr, &format!("{prefix}{i}")).await?;
        c.join(channel).await?;
        clients.push(c);
    }
    // Each join was announced to the members before it: read those.
    for c in &mut clients {
        c.sync("joined").await?;
    }
    Ok(clients)
}

/// Runs the load: clients join first, then the clock starts. Fails unless
/// every message reached every other member exactly once.
pub async fn run_chat(load: &ChatLoad) -> Result<ChatResult> {
    anyhow::ensure!(load.clients >= 2, "a channel load needs two clients");
    let clients = joined(load.addr, &load.prefix, load.clients, &load.channel).await?;
    let started = Instant::now();
    let deadline = started + load.duration;
    let per_client = load.max_messages / load.clients as u64 + 1;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let channel = load.channel.clone();
            tokio::spawn(chat_client(c, channel, started, deadline, per_client))
        })
        .collect();
    let mut total = ChatResult {
        sent: 0,
        delivered: 0,
        elapsed: Duration::ZERO,
        latency_us: histogram(),
    };
    let mut clients = Vec::new();
    for task in tasks {
        let (c, sent, delivered, hist) = task.await??;
        total.sent += sent;
        total.delivered += delivered;
        total.latency_us.add(hist)?;
        clients.push(c);
    }
    // Every sender has stopped and each of its messages was handled before
    // its last PONG, so a PING now returns after every delivery.
    let drains: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(drain(c, started)))
        .collect();
    for task in drains {
        let (delivered, hist) = task.await??;
        total.delivered += delivered;
        total.latency_us.add(hist)?;
    }
    total.elapsed = started.elapsed();
    let expected = total.sent * (load.clients as u64 - 1);
    if total.delivered != expected {
        bail!(
            "{} messages sent to {} members should make {expected} deliveries, got {}",
            total.sent,
            load.clients,
            total.delivered
        );
    }
    Ok(total)
}

/// If `line` is a channel message of the load, the time it was sent
/// (microseconds after the start), which is its text.
fn message_time(line: &str) -> Option<u64> {
    if !line.contains(" PRIVMSG ") {
        return None;
    }
    line.rsplit_once(" :")?.1.parse().ok()
}

fn record(hist: &mut Histogram<u64>, started: Instant, sent_us: u64) -> Result<()> {
    let now = started.elapsed().as_micros() as u64;
    hist.record(now.saturating_sub(sent_us).max(1))?;
    Ok(())
}

async fn chat_client(
    mut c: IrcClient,
    channel: String,
    started: Instant,
    deadline: Instant,
    max: u64,
) -> Result<(IrcClient, u64, u64, Histogram<u64>)> {
    let mut hist = histogram();
    let (mut sent, mut delivered) = (0, 0);
    while sent < max && Instant::now() < deadline {
        let at = started.elapsed().as_micros();
        c.send(&format!("PRIVMSG {channel} :{at}\r\nPING {sent}\r\n"))
            .await?;
        delivered += until_pong(&mut c, &sent.to_string(), started, &mut hist).await?;
        sent += 1;
    }
    Ok((c, sent, delivered, hist))
}

async fn drain(mut c: IrcClient, started: Instant) -> Result<(u64, Histogram<u64>)> {
    let mut hist = histogram();
    c.send("PING drained\r\n").await?;
    let delivered = until_pong(&mut c, "drained", started, &mut hist).await?;
    Ok((delivered, hist))
}

/// Reads up to the PONG of `token`; returns how many of the load's
/// messages came before it, with their latencies recorded.
async fn until_pong(
    c: &mut IrcClient,
    token: &str,
    started: Instant,
    hist: &mut Histogram<u64>,
) -> Result<u64> {
    let end = format!(":{token}");
    let mut delivered = 0;
    for _ in 0..MAX_LINES {
        let line = c.next_line().await?;
        if let Some(t) = message_time(line) {
            delivered += 1;
            record(hist, started, t)?;
        } else if line.contains(" PONG ") && line.ends_with(&end) {
            return Ok(delivered);
        }
    }
    bail!("{}: no PONG {token} after {MAX_LINES} lines", c.nick)
}
