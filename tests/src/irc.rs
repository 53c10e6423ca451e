//! A small IRC client over a real socket, for the chat tests.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct IrcClient {
    pub nick: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// Every line received, in order.
    pub seen: Vec<String>,
}

impl IrcClient {
    pub fn connect(addr: SocketAddr, nick: &str) -> IrcClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        IrcClient {
            nick: nick.to_string(),
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            seen: Vec::new(),
        }
    }

    /// Connects and registers (NICK + USER), waiting for 001.
    pub fn register(addr: SocketAddr, nick: &str) -> IrcClient {
        let mut c = IrcClient::connect(addr, nick);
        c.send(&format!("NICK {nick}"));
        c.send(&format!("USER {nick} 0 * :{nick} test"));
        c.expect(&format!(" 001 {nick} "));
        c
    }

    pub fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("send");
    }

    /// Sends raw bytes (partial lines allowed).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Reads lines until one contains `needle`; returns it. Panics with
    /// what was seen after 10 s.
    pub fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!(
                    "{}: connection closed waiting for {needle:?}; seen {:#?}",
                    self.nick, self.seen
                ),
                Ok(_) => {
                    let line = line.trim_end().to_string();
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "{}: {e} waiting for {needle:?}; seen {:#?}",
                    self.nick, self.seen
                ),
            }
        }
        panic!(
            "{}: timed out waiting for {needle:?}; seen {:#?}",
            self.nick, self.seen
        )
    }

    /// Sends PING with a unique token and returns every line received
    /// before the PONG: a barrier that proves nothing else is pending.
    pub fn sync(&mut self, token: &str) -> Vec<String> {
        let start = self.seen.len();
        self.send(&format!("PING {token}"));
        self.expect(&format!("PONG wasmhost :{token}"));
        let end = self.seen.len() - 1;
        self.seen[start..end].to_vec()
    }

    /// Reads until the server closes the connection; returns the lines.
    pub fn read_to_close(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return lines,
                Ok(_) => lines.push(line.trim_end().to_string()),
                Err(e) => panic!("{}: {e} waiting for close; got {lines:#?}", self.nick),
            }
        }
    }
}

/// Three users joined to `#rust` under a topic, for tests that change the
/// service while they talk.
pub struct Room {
    pub alice: IrcClient,
    pub bob: IrcClient,
    pub carol: IrcClient,
}

impl Room {
    pub fn join(addr: SocketAddr, topic: &str) -> Room {
        let mut alice = IrcClient::register(addr, "alice");
        let mut bob = IrcClient::register(addr, "bob");
        let mut carol = IrcClient::register(addr, "carol");
        for c in [&mut alice, &mut bob, &mut carol] {
            c.send("JOIN #rust");
            let nick = c.nick.clone();
            c.expect(&format!(" 366 {nick} #rust "));
        }
        alice.sync("joined");
        bob.sync("joined");
        carol.send(&format!("TOPIC #rust :{topic}"));
        carol.sync("topic");
        Room { alice, bob, carol }
    }

    /// Checks that everyone is still registered and joined: a private
    /// message arrives, NAMES lists all three.
    pub fn check_joined(&mut self) {
        self.bob.send("PRIVMSG alice :still there?");
        self.alice.expect(" PRIVMSG alice :still there?");
        self.carol.send("NAMES #rust");
        self.carol.expect(" 353 carol = #rust :alice bob carol");
    }

    /// A newcomer, dave, joins and gets the topic and the channel's
    /// history: returns its messages.
    pub fn newcomer_history(addr: SocketAddr, topic: &str) -> Vec<String> {
        let mut dave = IrcClient::register(addr, "dave");
        dave.send("JOIN #rust");
        dave.expect(&format!(" 332 dave #rust :{topic}"));
        let replay = dave.sync("history");
        replay
            .into_iter()
            .filter(|l| l.contains("PRIVMSG #rust :"))
            .collect()
    }

    /// Alice talks steadily from before `change` until 100 messages after
    /// it (at most 20,000 messages); then bob and carol must have seen
    /// every message exactly once, in order. Returns the room, what
    /// `change` returned and how many messages alice sent.
    pub fn talk_through<R>(self, change: impl FnOnce() -> R) -> (Room, R, usize) {
        let Room {
            alice,
            mut bob,
            mut carol,
        } = self;
        let changed = Arc::new(AtomicBool::new(false));
        let done = changed.clone();
        let talker = std::thread::spawn(move || {
            let (mut after, mut sent) = (0, 0);
            let mut alice = alice;
            while after < 100 && sent < 20_000 {
                alice.send(&format!("PRIVMSG #rust :message {sent}"));
                sent += 1;
                if done.load(Ordering::Relaxed) {
                    after += 1;
                }
                if sent % 5 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            (alice, sent)
        });
        bob.expect("PRIVMSG #rust :message 20");
        let result = change();
        changed.store(true, Ordering::Relaxed);
        let (alice, messages) = talker.join().unwrap();
        for listener in [&mut bob, &mut carol] {
            listener.expect(&format!("PRIVMSG #rust :message {}", messages - 1));
            // From alice, at whatever address she connects from.
            let got: Vec<&str> = listener
                .seen
                .iter()
                .filter(|l| l.starts_with(":alice!alice@"))
                .filter_map(|l| l.split_once(" PRIVMSG #rust :message ").map(|(_, n)| n))
                .collect();
            let expected: Vec<String> = (0..messages).map(|i| i.to_string()).collect();
            assert_eq!(
                got,
                expected.iter().map(String::as_str).collect::<Vec<_>>(),
                "{} saw each message exactly once, in order",
                listener.nick
            );
        }
        (Room { alice, bob, carol }, result, messages)
    }
}
