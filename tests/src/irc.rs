//! A small IRC client over a real socket, for the chat tests.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
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
