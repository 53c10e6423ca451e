//! The shutdown signals: SIGINT and SIGTERM.

use anyhow::Result;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT and SIGTERM handlers. Create them before announcing readiness:
/// from then on the signals are caught instead of killing the process.
pub struct ShutdownSignals {
    int: Signal,
    term: Signal,
}

impl ShutdownSignals {
    pub fn install() -> Result<ShutdownSignals> {
        Ok(ShutdownSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves on the first SIGINT or SIGTERM; returns its name.
    pub async fn received(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}
