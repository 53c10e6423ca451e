//! HAProxy's agent check (`serve --agent-check ADDR`): HAProxy connects,
//! reads one line and closes; the line sets the server's state and weight
//! (HAProxy's `agent-check` server option, "agent-check" in its
//! configuration manual). So HAProxy follows the host with no script:
//!
//! | host state | line | HAProxy does |
//! |---|---|---|
//! | ready | `up ready N%` | sends it new connections, weighted by free capacity |
//! | draining, handing off | `drain` | sends it no new connections, keeps the open ones |
//! | no service (waiting for one, or it moved away) | `maint` | takes it out until it says `ready` |
//! | service failed | `down #why` | marks it down until it says `up` |
//!
//! The weight is the share of `--max-connections` still free (1% at
//! least), so a loaded host gets fewer new connections.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::{State, health};

/// The agent's answer for a state (without the newline).
pub fn reply(state: &State, connections: usize, max_connections: usize) -> String {
    match state {
        State::Ready => format!("up ready {}%", weight(connections, max_connections)),
        State::Draining | State::HandingOff => "drain".into(),
        State::NoService => "maint".into(),
        // HAProxy logs what follows `#`; keep it on one line.
        State::Failed(why) => format!("down #{}", why.replace(['\n', '\r'], " ")),
    }
}

/// The share of `max` still free, in percent, at least 1 (HAProxy reads 0%
/// as drain).
pub fn weight(connections: usize, max: usize) -> u64 {
    if max == 0 {
        return 100;
    }
    // Rounded up: one connection of thousands leaves 100%.
    let free = (max.saturating_sub(connections) as u64 * 100).div_ceil(max as u64);
    free.clamp(1, 100)
}

/// Answers agent checks until the process exits.
pub async fn serve(listener: TcpListener) {
    loop {
        let (mut stream, _) = crate::net::accept_retrying(&listener, "agent check").await;
        tokio::spawn(async move {
            let (state, status) = health().state().await;
            let connections = status.map_or(0, |s| s.connections);
            let line = reply(&state, connections, health().max_connections());
            let answer = async {
                stream.write_all(format!("{line}\n").as_bytes()).await?;
                stream.shutdown().await
            };
            if let Err(e) = answer.await {
                tracing::debug!("agent check: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_the_state() {
        assert_eq!(reply(&State::Ready, 0, 1000), "up ready 100%");
        assert_eq!(reply(&State::Ready, 750, 1000), "up ready 25%");
        assert_eq!(reply(&State::Ready, 1000, 1000), "up ready 1%");
        assert_eq!(reply(&State::Draining, 5, 1000), "drain");
        assert_eq!(reply(&State::HandingOff, 5, 1000), "drain");
        assert_eq!(reply(&State::NoService, 0, 0), "maint");
        assert_eq!(
            reply(&State::Failed("budget\nspent".into()), 0, 10),
            "down #budget spent"
        );
        assert_eq!(weight(3, 0), 100);
        assert_eq!(weight(1, 10_000), 100);
        assert_eq!(weight(999, 1000), 1);
    }
}
