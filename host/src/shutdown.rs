//! The signals `wasmhost serve` acts on: SIGINT and SIGTERM (shut down),
//! SIGUSR2 (host upgrade with the defaults), SIGHUP (swap to the component
//! file now on disk).

use anyhow::Result;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostSignal {
    /// SIGINT or SIGTERM: drain and exit.
    Shutdown(&'static str),
    /// SIGUSR2: hand the service to a new host process.
    Upgrade,
    /// SIGHUP: re-read the served component from disk and swap to it.
    Reload,
}

/// The handlers. Create them before announcing readiness: from then on the
/// signals are caught instead of killing the process.
pub struct Signals {
    int: Signal,
    term: Signal,
    usr2: Signal,
    hup: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            usr2: signal(SignalKind::user_defined2())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves on the next signal.
    pub async fn next(&mut self) -> HostSignal {
        tokio::select! {
            _ = self.int.recv() => HostSignal::Shutdown("SIGINT"),
            _ = self.term.recv() => HostSignal::Shutdown("SIGTERM"),
            _ = self.usr2.recv() => HostSignal::Upgrade,
            _ = self.hup.recv() => HostSignal::Reload,
        }
    }
}
