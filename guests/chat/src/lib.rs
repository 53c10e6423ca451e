//! `chat`: a multi-user chat service speaking a subset of IRC (RFC 2812)
//! that ordinary IRC clients accept.
//!
//! Configuration (`--config KEY=VALUE`): `server_name` (default
//! `wasmhost`), `history` (messages replayed on JOIN per channel, default
//! 50).
//!
//! Built with the `v2` feature it is chat-v2: history lines carry the time
//! they were sent (replayed with IRCv3 `server-time` tags to clients that
//! ask with `CAP REQ :server-time`, else as `[time]` in the text), and LIST
//! answers 321/322/323. It imports `chat/2` and `chat/1` and exports both
//! (`chat/1` without the timestamps, so a rollback to chat works).
//!
//! `chat/2` is `chat/1` plus `"time"` (Unix milliseconds) in history
//! entries and `"caps"` (a list of strings) in users, both optional.
//!
//! State format `chat/1` is JSON (UTF-8):
//!
//! ```text
//! { "server": "wasmhost", "history_limit": 50,
//!   "users": { "<conn id>": { "conn": 7, "nick": "alice" | null,
//!              "user": "alice" | null, "realname": "Alice", "host": "127.0.0.1",
//!              "registered": true, "pending": [bytes of a partial line] } },
//!   "channels": { "<lower-case name>": { "name": "#Rust", "topic": "..." | null,
//!                 "members": [7, 9], "history": [ { "from": "nick!user@host",
//!                 "text": "hello" } ] } } }
//! ```
//!
//! Precisely:
//!
//! * Ids are u64 and may exceed 2^53 (read them exactly, not as doubles);
//!   numbers are plain integers (no `3.0`, `3e0`, `-0`); `history_limit`
//!   fits in u32; `pending` holds byte values 0-255, at most 8192 of them
//!   and never a `\n`.
//! * A user's key is its `conn` in decimal; a channel's key is its `name`
//!   with ASCII letters lower-cased (other characters unchanged). `nick`,
//!   `user` and `topic` may be absent (= null); every other field is
//!   required; unknown fields are ignored. `registered` implies `nick` and
//!   `user`; `realname` is `""` until USER. `host` is the peer address
//!   without the port, IPv6 brackets stripped.
//! * History is oldest first, members in join order (the NAMES order).
//!   Channels are kept when empty. The nick index is derived on import.
//! * A chat/1 reader accepts chat/2's optional `time` and `caps` and uses
//!   them; a chat/1 writer never writes them.
//! * Writers order users by id and channels by key (as serde writes the
//!   maps here), so a state imported and exported again is the same bytes.

mod chat;
mod irc;
#[cfg(test)]
mod prop;

use wasmhost_guest::state::{Formats, Pending};
use wasmhost_guest::{ConnId, ConnInfo, Input, Service, host};

use chat::{Chat, MAX_PENDING, Outbox};

const CHAT1: &str = "chat/1";
const CHAT2: &str = "chat/2";

/// Hands one event's output to the host.
fn flush(out: Outbox) {
    for (conn, mut line) in out.lines {
        line.push_str("\r\n");
        host::send(conn, line.as_bytes());
    }
    for conn in out.close {
        host::close(conn);
    }
}

impl Chat {
    /// Runs `f` with the event's time set, then sends what it produced.
    fn event(&mut self, f: impl FnOnce(&mut Chat, &mut Outbox)) {
        let mut out = Outbox::default();
        self.now_ms = host::now_ms();
        f(self, &mut out);
        flush(out);
    }
}

impl Service for Chat {
    const MAX_INPUT: usize = MAX_PENDING;

    fn init(config: Vec<(String, String)>) -> Result<Self, String> {
        let mut chat = Chat::default();
        for (key, value) in config {
            match key.as_str() {
                "server_name" if !value.is_empty() && !value.contains(' ') => chat.server = value,
                "history" => {
                    chat.history_limit = value.parse().map_err(|_| {
                        format!("history must be a number of messages, got `{value}`")
                    })?
                }
                _ => {
                    return Err(format!(
                        "unknown or invalid setting `{key}={value}` (known: server_name, history)"
                    ));
                }
            }
        }
        Ok(chat)
    }

    fn on_connect(&mut self, conn: &ConnInfo) {
        self.connect(conn.id, &conn.peer);
    }

    fn on_data(&mut self, conn: ConnId, input: &mut Input) {
        self.event(|chat, out| {
            while let Some(line) = input.line() {
                if !chat.line(conn, line, out) {
                    input.clear();
                    break;
                }
            }
        });
    }

    fn on_overflow(&mut self, conn: ConnId, input: &mut Input) {
        self.event(|chat, out| chat.line_too_long(conn, out));
        input.clear();
    }

    fn on_close(&mut self, conn: ConnId) {
        self.event(|chat, out| chat.disconnect(conn, "Connection closed", out));
    }

    fn formats() -> Formats<Self> {
        let formats = Formats::<Chat>::new();
        let formats = if cfg!(feature = "v2") {
            formats.format(CHAT2, |c, p| export(c.clone(), p), |s| import(&s, CHAT2))
        } else {
            formats
        };
        formats.format(CHAT1, |c, p| export(c.to_v1(), p), |s| import(&s, CHAT1))
    }
}

/// Writes `chat` as JSON with each user's unfinished line.
fn export(mut chat: Chat, pending: &Pending) -> Result<Vec<u8>, String> {
    for (conn, bytes) in pending {
        if let Some(user) = chat.users.get_mut(conn) {
            user.pending.clone_from(bytes);
        }
    }
    serde_json::to_vec(&chat).map_err(|e| e.to_string())
}

fn import(state: &[u8], format: &str) -> Result<(Chat, Pending), String> {
    let mut chat: Chat = serde_json::from_slice(state).map_err(|e| format!("{format}: {e}"))?;
    chat.rebuild_nicks();
    let pending = chat
        .users
        .iter_mut()
        .map(|(conn, user)| (*conn, std::mem::take(&mut user.pending)))
        .collect();
    Ok((chat, pending))
}

wasmhost_guest::export_service!(Chat);

#[cfg(test)]
mod tests {
    use wasmhost_guest::testing::TestHost;

    use super::*;

    #[test]
    fn register_join_talk_and_migrate() {
        let mut host = TestHost::<Chat>::start(&[]).unwrap();
        let (alice, _) = host.connect();
        let (other, _) = host.connect();
        let out = host.data(alice, "NICK alice\r\nUSER a 0 * :Alice\r\nJOIN #r");
        assert!(out.text_to(alice).contains(" 001 alice "));
        host.data(alice, "ust\r\nPRIVMSG #rust :hi all\r\n");
        let out = host.data(other, "NICK ALICE\r\n");
        assert!(out.text_to(other).contains(" 433 * ALICE "));
        // Half a line crosses the swap.
        host.data(other, "NICK bob\r\nUSER b 0 * :Bob\r\nJOIN #ru");
        let before = host.export(CHAT1).unwrap();
        let mut host = host.swap_to::<Chat>(CHAT1).unwrap();
        assert_eq!(
            host.export(CHAT1).unwrap(),
            before,
            "round trip is byte for byte"
        );
        let out = host.data(other, "st\r\n");
        let to_bob = out.text_to(other);
        assert!(to_bob.contains("353 bob = #rust :alice bob"), "{to_bob}");
        assert!(to_bob.contains("PRIVMSG #rust :hi all"), "{to_bob}");
        assert!(
            out.text_to(alice)
                .starts_with(":bob!b@127.0.0.1 JOIN #rust")
        );
    }

    #[test]
    fn an_overlong_line_is_refused_and_dropped() {
        let mut host = TestHost::<Chat>::start(&[]).unwrap();
        let (c, _) = host.connect();
        let out = host.data(c, vec![b'x'; MAX_PENDING + 1]);
        assert!(out.text_to(c).contains(" 417 * :Input line was too long"));
        assert!(host.pending(c).is_empty());
        let out = host.data(c, "NICK zed\r\n");
        assert!(out.is_empty(), "registration needs USER too");
    }
}
