//! The chat server's state and its handling of IRC commands. Pure logic:
//! outgoing lines and closes are collected in [`Outbox`] and handed to the
//! host by `lib.rs`, so this module is tested natively.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::irc::{self, Message};

pub type ConnId = u64;

/// Longest partial line kept for a connection before it is dropped.
pub const MAX_PENDING: usize = 8192;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub conn: ConnId,
    pub nick: Option<String>,
    pub user: Option<String>,
    pub realname: String,
    /// The peer's address without the port, shown in prefixes.
    pub host: String,
    pub registered: bool,
    /// Bytes received after the last line ending. Only in the state
    /// formats: while serving, the SDK keeps them (see `lib.rs`).
    #[serde(default)]
    pub pending: Vec<u8>,
    /// IRCv3 capabilities the client enabled (chat-v2: `server-time`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caps: Vec<String>,
}

impl User {
    fn prefix(&self) -> String {
        format!(
            "{}!{}@{}",
            self.nick.as_deref().unwrap_or("*"),
            self.user.as_deref().unwrap_or("unknown"),
            self.host
        )
    }

    fn nick_or_star(&self) -> &str {
        self.nick.as_deref().unwrap_or("*")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HistoryLine {
    /// The sender's prefix, `nick!user@host`.
    pub from: String,
    pub text: String,
    /// When it was sent, Unix milliseconds (chat-v2, format chat/2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Channel {
    pub name: String,
    pub topic: Option<String>,
    /// Members in join order.
    pub members: Vec<ConnId>,
    /// The most recent messages, oldest first.
    pub history: VecDeque<HistoryLine>,
}

/// Lines to send and connections to close, produced by one event.
#[derive(Default, Debug)]
pub struct Outbox {
    pub lines: Vec<(ConnId, String)>,
    pub close: Vec<ConnId>,
}

impl Outbox {
    fn line(&mut self, to: ConnId, line: String) {
        self.lines.push((to, line));
    }
}

/// The whole server state; this is what `chat/1` carries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Chat {
    pub server: String,
    pub history_limit: usize,
    pub users: BTreeMap<ConnId, User>,
    /// Channels by folded name.
    pub channels: BTreeMap<String, Channel>,
    /// Registered and pending nicks by folded name (derived; rebuilt on
    /// import).
    #[serde(skip)]
    pub nicks: HashMap<String, ConnId>,
    /// Wall-clock time of the current event, Unix milliseconds (set by the
    /// caller; chat-v2 stamps history with it).
    #[serde(skip)]
    pub now_ms: u64,
}

impl Default for Chat {
    fn default() -> Self {
        Chat {
            server: "wasmhost".into(),
            history_limit: 50,
            users: BTreeMap::new(),
            channels: BTreeMap::new(),
            nicks: HashMap::new(),
            now_ms: 0,
        }
    }
}

/// Whether this build is chat-v2.
const V2: bool = cfg!(feature = "v2");

impl Chat {
    /// The same state without what chat/1 cannot carry (timestamps, caps).
    pub fn to_v1(&self) -> Chat {
        let mut v1 = self.clone();
        v1.users.values_mut().for_each(|u| u.caps.clear());
        for channel in v1.channels.values_mut() {
            channel.history.iter_mut().for_each(|h| h.time = None);
        }
        v1
    }

    pub fn rebuild_nicks(&mut self) {
        self.nicks = self
            .users
            .values()
            .filter_map(|u| u.nick.as_ref().map(|n| (irc::fold(n), u.conn)))
            .collect();
    }

    pub fn connect(&mut self, conn: ConnId, peer: &str) {
        let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        self.users.insert(
            conn,
            User {
                conn,
                host,
                ..User::default()
            },
        );
    }

    /// One line arrived from `conn` (without its line ending). Returns
    /// false once `conn` is gone (QUIT), so the caller stops.
    pub fn line(&mut self, conn: ConnId, line: &[u8], out: &mut Outbox) -> bool {
        if !self.users.contains_key(&conn) {
            return false;
        }
        if let Some(msg) = irc::parse(&String::from_utf8_lossy(line)) {
            self.command(conn, msg, out);
        }
        self.users.contains_key(&conn)
    }

    /// `conn` sent more than [`MAX_PENDING`] bytes without a line ending:
    /// tell it (the caller drops the bytes).
    pub fn line_too_long(&mut self, conn: ConnId, out: &mut Outbox) {
        if let Some(user) = self.users.get(&conn) {
            let nick = user.nick_or_star().to_string();
            out.line(
                conn,
                format!(":{} 417 {nick} :Input line was too long", self.server),
            );
        }
    }

    /// The connection is gone: leave every channel, telling the others.
    pub fn disconnect(&mut self, conn: ConnId, reason: &str, out: &mut Outbox) {
        let Some(user) = self.users.remove(&conn) else {
            return;
        };
        if let Some(nick) = &user.nick {
            self.nicks.remove(&irc::fold(nick));
        }
        let line = format!(":{} QUIT :{reason}", user.prefix());
        for to in self.peers_of(conn) {
            out.line(to, line.clone());
        }
        for channel in self.channels.values_mut() {
            channel.members.retain(|&m| m != conn);
        }
    }

    /// Everyone sharing a channel with `conn`, once each, not `conn`.
    fn peers_of(&self, conn: ConnId) -> Vec<ConnId> {
        let mut peers: Vec<ConnId> = self
            .channels
            .values()
            .filter(|c| c.members.contains(&conn))
            .flat_map(|c| c.members.iter().copied())
            .filter(|&m| m != conn)
            .collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// A numeric reply: `:server CODE nick params`.
    fn reply(&self, conn: ConnId, code: &str, params: &str, out: &mut Outbox) {
        let nick = self.users.get(&conn).map_or("*", User::nick_or_star);
        out.line(conn, format!(":{} {code} {nick} {params}", self.server));
    }

    fn command(&mut self, conn: ConnId, msg: Message, out: &mut Outbox) {
        let registered = self.users[&conn].registered;
        let p = &msg.params;
        match msg.command.as_str() {
            "NICK" => self.nick(conn, p, out),
            "USER" => self.user(conn, p, out),
            "PING" => match p.first() {
                Some(token) => out.line(conn, format!(":{0} PONG {0} :{token}", self.server)),
                None => self.reply(conn, "409", ":No origin specified", out),
            },
            "PONG" | "PASS" => {}
            "CAP" => self.cap(conn, p, out),
            "QUIT" => self.quit(conn, p.first().map(String::as_str), out),
            _ if !registered => self.reply(conn, "451", ":You have not registered", out),
            "JOIN" => self.join(conn, p, out),
            "PART" => self.part(conn, p, out),
            "PRIVMSG" | "NOTICE" => self.privmsg(conn, &msg.command, p, out),
            "NAMES" => self.names_cmd(conn, p, out),
            "TOPIC" => self.topic(conn, p, out),
            "MODE" => self.mode(conn, p, out),
            "WHO" => self.who(conn, p, out),
            "LIST" if V2 => self.list(conn, out),
            other => self.reply(conn, "421", &format!("{other} :Unknown command"), out),
        }
    }

    fn cap(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        let nick = self.users[&conn].nick_or_star().to_string();
        match p.first().map(|s| s.to_ascii_uppercase()).as_deref() {
            Some("LS") | Some("LIST") => {
                let caps = if V2 { "server-time" } else { "" };
                out.line(conn, format!(":{} CAP {nick} LS :{caps}", self.server))
            }
            Some("REQ") => {
                let caps = p.get(1).cloned().unwrap_or_default();
                if V2 && caps.split(' ').all(|c| c == "server-time") {
                    let user = self.users.get_mut(&conn).expect("connected");
                    user.caps = vec!["server-time".into()];
                    out.line(conn, format!(":{} CAP {nick} ACK :{caps}", self.server));
                } else {
                    out.line(conn, format!(":{} CAP {nick} NAK :{caps}", self.server));
                }
            }
            _ => {}
        }
    }

    fn nick(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        let Some(new) = p.first() else {
            return self.reply(conn, "431", ":No nickname given", out);
        };
        if !irc::valid_nick(new) {
            return self.reply(conn, "432", &format!("{new} :Erroneous nickname"), out);
        }
        let key = irc::fold(new);
        match self.nicks.get(&key) {
            Some(&owner) if owner == conn => {
                // Same nick, maybe another case: allow the change below.
            }
            Some(_) => {
                return self.reply(
                    conn,
                    "433",
                    &format!("{new} :Nickname is already in use"),
                    out,
                );
            }
            None => {}
        }
        let user = self.users.get_mut(&conn).expect("connected");
        let old_prefix = user.prefix();
        if let Some(old) = user.nick.replace(new.clone()) {
            self.nicks.remove(&irc::fold(&old));
        }
        self.nicks.insert(key, conn);
        if user.registered {
            let line = format!(":{old_prefix} NICK :{new}");
            out.line(conn, line.clone());
            for to in self.peers_of(conn) {
                out.line(to, line.clone());
            }
        } else {
            self.try_register(conn, out);
        }
    }

    fn user(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        if self.users[&conn].registered {
            return self.reply(conn, "462", ":You may not reregister", out);
        }
        if p.len() < 4 {
            return self.reply(conn, "461", "USER :Not enough parameters", out);
        }
        let user = self.users.get_mut(&conn).expect("connected");
        user.user = Some(
            p[0].chars()
                .filter(|c| !c.is_whitespace())
                .take(16)
                .collect(),
        );
        user.realname = p[3].clone();
        self.try_register(conn, out);
    }

    fn try_register(&mut self, conn: ConnId, out: &mut Outbox) {
        let user = self.users.get_mut(&conn).expect("connected");
        if user.registered || user.nick.is_none() || user.user.is_none() {
            return;
        }
        user.registered = true;
        let prefix = user.prefix();
        let server = self.server.clone();
        self.reply(
            conn,
            "001",
            &format!(":Welcome to the wasmhost chat network {prefix}"),
            out,
        );
        self.reply(
            conn,
            "002",
            &format!(":Your host is {server}, running wasmhost-chat"),
            out,
        );
        self.reply(conn, "003", ":This server is a WebAssembly component", out);
        self.reply(conn, "004", &format!("{server} wasmhost-chat o o"), out);
        self.reply(conn, "422", ":MOTD File is missing", out);
    }

    fn quit(&mut self, conn: ConnId, reason: Option<&str>, out: &mut Outbox) {
        let reason = format!("Quit: {}", reason.unwrap_or("leaving"));
        let host = self.users[&conn].host.clone();
        out.line(conn, format!("ERROR :Closing Link: {host} ({reason})"));
        self.disconnect(conn, &reason, out);
        out.close.push(conn);
    }

    fn join(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        let Some(list) = p.first() else {
            return self.reply(conn, "461", "JOIN :Not enough parameters", out);
        };
        for name in list.split(',').filter(|n| !n.is_empty()) {
            if !irc::valid_channel(name) {
                self.reply(conn, "403", &format!("{name} :No such channel"), out);
                continue;
            }
            let channel = self
                .channels
                .entry(irc::fold(name))
                .or_insert_with(|| Channel {
                    name: name.to_string(),
                    topic: None,
                    members: Vec::new(),
                    history: VecDeque::new(),
                });
            if channel.members.contains(&conn) {
                continue;
            }
            channel.members.push(conn);
            let name = channel.name.clone();
            let line = format!(":{} JOIN {name}", self.users[&conn].prefix());
            for &to in &self.channels[&irc::fold(&name)].members {
                out.line(to, line.clone());
            }
            self.join_info(conn, &name, out);
        }
    }

    /// What a joiner receives: topic, names, then the recent history.
    fn join_info(&self, conn: ConnId, name: &str, out: &mut Outbox) {
        let channel = &self.channels[&irc::fold(name)];
        if let Some(topic) = &channel.topic {
            self.reply(conn, "332", &format!("{name} :{topic}"), out);
        }
        self.names(conn, channel, out);
        self.reply(conn, "366", &format!("{name} :End of /NAMES list"), out);
        let tagged = self
            .users
            .get(&conn)
            .is_some_and(|u| u.caps.iter().any(|c| c == "server-time"));
        for h in &channel.history {
            let line = match h.time {
                // IRCv3 server-time for clients that asked, else in the text.
                Some(t) if tagged => format!(
                    "@time={} :{} PRIVMSG {name} :{}",
                    iso_time(t),
                    h.from,
                    h.text
                ),
                Some(t) => format!(
                    ":{} PRIVMSG {name} :[{}] {}",
                    h.from,
                    iso_time(t)[..19].replace('T', " "),
                    h.text
                ),
                None => format!(":{} PRIVMSG {name} :{}", h.from, h.text),
            };
            out.line(conn, line);
        }
    }

    /// LIST (chat-v2): every channel with its member count and topic.
    fn list(&mut self, conn: ConnId, out: &mut Outbox) {
        self.reply(conn, "321", "Channel :Users  Name", out);
        for c in self.channels.values() {
            let topic = c.topic.as_deref().unwrap_or("");
            self.reply(
                conn,
                "322",
                &format!("{} {} :{topic}", c.name, c.members.len()),
                out,
            );
        }
        self.reply(conn, "323", ":End of /LIST", out);
    }

    fn names(&self, conn: ConnId, channel: &Channel, out: &mut Outbox) {
        let nicks: Vec<&str> = channel
            .members
            .iter()
            .filter_map(|m| self.users.get(m).and_then(|u| u.nick.as_deref()))
            .collect();
        self.reply(
            conn,
            "353",
            &format!("= {} :{}", channel.name, nicks.join(" ")),
            out,
        );
    }

    fn names_cmd(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        let wanted: Vec<String> = match p.first() {
            Some(list) => list.split(',').map(String::from).collect(),
            None => self.channels.values().map(|c| c.name.clone()).collect(),
        };
        for name in &wanted {
            if let Some(channel) = self.channels.get(&irc::fold(name)) {
                self.names(conn, channel, out);
            }
        }
        let end = if p.is_empty() { "*" } else { &p[0] };
        self.reply(conn, "366", &format!("{end} :End of /NAMES list"), out);
    }

    /// The channel `name` if `conn` is on it, else the error reply.
    fn member_channel(&self, conn: ConnId, name: &str, out: &mut Outbox) -> Option<String> {
        let key = irc::fold(name);
        match self.channels.get(&key) {
            None => self.reply(conn, "403", &format!("{name} :No such channel"), out),
            Some(c) if !c.members.contains(&conn) => self.reply(
                conn,
                "442",
                &format!("{} :You're not on that channel", c.name),
                out,
            ),
            Some(_) => return Some(key),
        }
        None
    }

    fn part(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        let Some(list) = p.first() else {
            return self.reply(conn, "461", "PART :Not enough parameters", out);
        };
        let reason = p.get(1).map(|r| format!(" :{r}")).unwrap_or_default();
        for name in list.split(',').filter(|n| !n.is_empty()) {
            let Some(key) = self.member_channel(conn, name, out) else {
                continue;
            };
            let channel = self.channels.get_mut(&key).expect("member_channel checked");
            let line = format!(
                ":{} PART {}{reason}",
                self.users[&conn].prefix(),
                channel.name
            );
            for &to in &channel.members {
                out.line(to, line.clone());
            }
            channel.members.retain(|&m| m != conn);
        }
    }

    fn privmsg(&mut self, conn: ConnId, command: &str, p: &[String], out: &mut Outbox) {
        let notice = command == "NOTICE";
        let Some(targets) = p.first() else {
            if !notice {
                self.reply(
                    conn,
                    "411",
                    &format!(":No recipient given ({command})"),
                    out,
                );
            }
            return;
        };
        let Some(text) = p.get(1).filter(|t| !t.is_empty()) else {
            if !notice {
                self.reply(conn, "412", ":No text to send", out);
            }
            return;
        };
        let prefix = self.users[&conn].prefix();
        for target in targets.split(',').filter(|t| !t.is_empty()) {
            let line = format!(":{prefix} {command} {target} :{text}");
            if target.starts_with('#') || target.starts_with('&') {
                self.send_to_channel(conn, target, &prefix, text, line, notice, out);
            } else if let Some(&to) = self.nicks.get(&irc::fold(target)) {
                out.line(to, line);
            } else if !notice {
                self.reply(conn, "401", &format!("{target} :No such nick/channel"), out);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_to_channel(
        &mut self,
        conn: ConnId,
        target: &str,
        prefix: &str,
        text: &str,
        line: String,
        notice: bool,
        out: &mut Outbox,
    ) {
        let limit = self.history_limit;
        let time = V2.then_some(self.now_ms);
        match self.channels.get_mut(&irc::fold(target)) {
            Some(c) if c.members.contains(&conn) => {
                for &to in c.members.iter().filter(|&&m| m != conn) {
                    out.line(to, line.clone());
                }
                if !notice {
                    c.history.push_back(HistoryLine {
                        from: prefix.to_string(),
                        text: text.to_string(),
                        time,
                    });
                    while c.history.len() > limit {
                        c.history.pop_front();
                    }
                }
            }
            Some(c) if !notice => {
                let name = c.name.clone();
                self.reply(conn, "404", &format!("{name} :Cannot send to channel"), out);
            }
            None if !notice => self.reply(conn, "403", &format!("{target} :No such channel"), out),
            _ => {}
        }
    }

    fn topic(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        let Some(name) = p.first() else {
            return self.reply(conn, "461", "TOPIC :Not enough parameters", out);
        };
        let Some(key) = self.member_channel(conn, name, out) else {
            return;
        };
        let prefix = self.users[&conn].prefix();
        let channel = self.channels.get_mut(&key).expect("member_channel checked");
        let name = channel.name.clone();
        match p.get(1) {
            None => match channel.topic.clone() {
                Some(topic) => self.reply(conn, "332", &format!("{name} :{topic}"), out),
                None => self.reply(conn, "331", &format!("{name} :No topic is set"), out),
            },
            Some(topic) => {
                channel.topic = Some(topic.clone()).filter(|t| !t.is_empty());
                let line = format!(":{prefix} TOPIC {name} :{topic}");
                for &to in &channel.members {
                    out.line(to, line.clone());
                }
            }
        }
    }

    fn mode(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        match p.first() {
            Some(target) if target.starts_with('#') || target.starts_with('&') => {
                match self.channels.get(&irc::fold(target)) {
                    Some(c) => {
                        let name = c.name.clone();
                        self.reply(conn, "324", &format!("{name} +"), out)
                    }
                    None => self.reply(conn, "403", &format!("{target} :No such channel"), out),
                }
            }
            Some(_) => self.reply(conn, "221", "+", out),
            None => self.reply(conn, "461", "MODE :Not enough parameters", out),
        }
    }

    fn who(&mut self, conn: ConnId, p: &[String], out: &mut Outbox) {
        let mask = p.first().cloned().unwrap_or_else(|| "*".into());
        if let Some(channel) = self.channels.get(&irc::fold(&mask)) {
            for m in &channel.members {
                if let Some(u) = self.users.get(m) {
                    let line = format!(
                        "{} {} {} {} {} H :0 {}",
                        channel.name,
                        u.user.as_deref().unwrap_or("unknown"),
                        u.host,
                        self.server,
                        u.nick_or_star(),
                        u.realname
                    );
                    self.reply(conn, "352", &line, out);
                }
            }
        }
        self.reply(conn, "315", &format!("{mask} :End of WHO list"), out);
    }
}

/// `2026-11-25T14:00:05.123Z` for Unix milliseconds `ms`.
pub fn iso_time(ms: u64) -> String {
    let (days, rem) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn iso_time() {
        assert_eq!(super::iso_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::iso_time(1_795_615_205_123),
            "2026-11-25T14:00:05.123Z"
        );
        assert_eq!(super::iso_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
