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

mod chat;
mod irc;

use std::cell::RefCell;

wit_bindgen::generate!({ path: "../../guest-wit", world: "service" });

use exports::wasmhost::service::handler::{ConnId, ConnInfo, Guest as Handler};
use exports::wasmhost::service::migrate::Guest as Migrate;
use wasmhost::service::host;

use chat::{Chat, Outbox};

const CHAT1: &str = "chat/1";
const CHAT2: &str = "chat/2";

fn formats() -> Vec<String> {
    if cfg!(feature = "v2") {
        vec![CHAT2.into(), CHAT1.into()]
    } else {
        vec![CHAT1.into()]
    }
}

thread_local! {
    static CHAT: RefCell<Chat> = RefCell::new(Chat::default());
}

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

fn with_chat(f: impl FnOnce(&mut Chat, &mut Outbox)) {
    let mut out = Outbox::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    CHAT.with_borrow_mut(|chat| {
        chat.now_ms = now;
        f(chat, &mut out)
    });
    flush(out);
}

struct Service;

impl Handler for Service {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
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
        CHAT.set(chat);
        Ok(())
    }

    fn on_connect(conn: ConnInfo) {
        CHAT.with_borrow_mut(|chat| chat.connect(conn.id, &conn.peer));
    }

    fn on_data(conn: ConnId, data: Vec<u8>) {
        with_chat(|chat, out| chat.data(conn, &data, out));
    }

    fn on_close(conn: ConnId) {
        with_chat(|chat, out| chat.disconnect(conn, "Connection closed", out));
    }

    fn on_timer(_token: u64) {}
}

impl Migrate for Service {
    fn importable() -> Vec<String> {
        formats()
    }

    fn exportable() -> Vec<String> {
        formats()
    }

    fn export_state(format: String) -> Result<Vec<u8>, String> {
        if !formats().contains(&format) {
            return Err(format!(
                "this chat cannot export {format}; it exports [{}]",
                formats().join(", ")
            ));
        }
        CHAT.with_borrow(|chat| {
            let json = if format == CHAT1 {
                serde_json::to_vec(&chat.to_v1())
            } else {
                serde_json::to_vec(chat)
            };
            json.map_err(|e| e.to_string())
        })
    }

    fn import_state(format: String, state: Vec<u8>) -> Result<(), String> {
        if !formats().contains(&format) {
            return Err(format!(
                "this chat cannot import {format}; it imports [{}]",
                formats().join(", ")
            ));
        }
        let mut chat: Chat =
            serde_json::from_slice(&state).map_err(|e| format!("invalid {format} state: {e}"))?;
        chat.rebuild_nicks();
        CHAT.set(chat);
        Ok(())
    }
}

export!(Service);

#[cfg(test)]
mod tests {
    use super::chat::*;

    fn lines_to(out: &Outbox, conn: ConnId) -> Vec<&str> {
        out.lines
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, l)| l.as_str())
            .collect()
    }

    #[test]
    fn register_join_talk_and_migrate() {
        let mut chat = Chat::default();
        let mut out = Outbox::default();
        chat.connect(1, "127.0.0.1:5000");
        chat.connect(2, "[::1]:5001");
        chat.data(1, b"NICK alice\r\nUSER a 0 * :Alice\r\nJOIN #r", &mut out);
        assert!(lines_to(&out, 1)[0].contains(" 001 alice "));
        chat.data(1, b"ust\r\nPRIVMSG #rust :hi all\r\n", &mut out);
        chat.data(2, b"NICK ALICE\r\n", &mut out);
        assert!(
            lines_to(&out, 2)
                .iter()
                .any(|l| l.contains(" 433 * ALICE "))
        );
        let json = serde_json::to_vec(&chat).unwrap();
        let mut back: Chat = serde_json::from_slice(&json).unwrap();
        back.rebuild_nicks();
        assert_eq!(back.nicks, chat.nicks);
        let mut out = Outbox::default();
        back.data(
            2,
            b"NICK bob\r\nUSER b 0 * :Bob\r\nJOIN #rust\r\n",
            &mut out,
        );
        let to_bob = lines_to(&out, 2);
        assert!(
            to_bob
                .iter()
                .any(|l| l.ends_with("353 bob = #rust :alice bob")),
            "{to_bob:?}"
        );
        assert!(
            to_bob
                .iter()
                .any(|l| l.contains("PRIVMSG #rust :") && l.ends_with("hi all")),
            "{to_bob:?}"
        );
        assert!(
            lines_to(&out, 1)
                .iter()
                .any(|l| l.starts_with(":bob!b@::1 JOIN #rust"))
        );
    }
}
