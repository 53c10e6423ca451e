//! Host upgrade: hand a live service (listeners, every connection with its
//! unread and unsent bytes, timers, counters, history and the guest's
//! state) to a new `wasmhost` process, which serves it from the next event
//! on, with a way back until the new process has proved it is ready.
//!
//! # The protocol
//!
//! The old host (O) starts the new binary (N) with its own arguments and
//! `WASMHOST_UPGRADE_FD=<fd>`, one end of a `SOCK_SEQPACKET` socket pair
//! ([`channel`]). Messages are [`Message`]s; every one of them carries or
//! follows from [`VERSION`], and N refuses a version it does not speak.
//!
//! | phase | O does | N does | failure (what happens) |
//! |---|---|---|---|
//! | 1 `spawn` | starts N | | N cannot be started, or exits: O reports it, nothing changed |
//! | 2 `offer` | sends `Offer` (version, component, previous component) | | N gone: as above |
//! | 3 `prepare` | serves on, waits for `Prepared` | loads (compile cache) and instantiates the component, asks `importable()`; answers `Prepared` or `Failed` | `Failed`, N exits, or no answer before the deadline: O kills N, serves on |
//! | 4 `freeze` | at an update point of the actor: stops accepting and reading, handles what was queued, collects sockets and unsent bytes ([`crate::service::Handoff`]), exports the state in the first format of N's `importable()` that O exports (the swap's negotiation); a service that keeps no state (an empty `exportable()`) sends none, with an empty format, and N starts its component with `init` and `on-connect` for every connection | waits | no common format, export refused or trapped, tasks not stopping: O thaws (serves every connection again, gives the guest the bytes it read meanwhile), kills N |
//! | 5 `send` | sends `Manifest` (the service image, lengths, descriptor count) with the state and every connection's unread and unsent bytes as payload, then the descriptors | receives and checks them: lengths, counts, each descriptor is a socket of the kind and address the manifest says | send fails (N died): O kills N, thaws |
//! | 6 `import` | waits for `Ready` | imports the state (the swap's import and validation), arms the timers, builds its service without serving it; answers `Ready` with its timings, or `Failed` | `Failed`, N exits, or no `Ready` before the deadline (`--timeout-ms`): O sends `Abort`, kills N, thaws |
//! | 7 `commit` | stops accepting control clients, sends `Commit` with the report, waits for `Serving`; then closes its copies of the sockets (close, never `shutdown`, which would cut them for N too), answers the client, lets connections it was closing finish, exits 0 | on `Commit`: answers `Serving`, then serves (accepting, reading, writing the unsent bytes first, giving the guest the unread bytes first). On `Abort`: exits without serving. On end of channel without either: O crashed after N was ready, so N serves (it holds everything) | N exits or does not answer `Serving` in time: O kills N and thaws (N touches no socket before `Serving`). O crashes after `Commit`: N serves anyway |
//!
//! O kills N (SIGKILL, and waits for it) *before* it thaws, so the two never
//! read from the same socket. N reads from no socket before it has said
//! `Serving`. Until O hears `Serving`, every failure leaves O serving with
//! its state; after it, N is the service. (One race is left: if O's
//! deadline passes in the instant after N said `Serving`, O kills a
//! serving N and thaws; bytes N read in that instant are lost. The
//! deadline is `--timeout-ms` from the start, so this needs a new process
//! that is ready just as the deadline ends.) One upgrade or swap runs at a
//! time.
//!
//! # Testing the failure paths
//!
//! `WASMHOST_TEST_UPGRADE_FAIL=<step>` in N's environment makes N fail at
//! that step on purpose (tests pass it through a wrapper given as
//! `--binary`): `start` (exit before reading anything), `prepare` (answer
//! `Failed`), `crash` (abort after receiving the manifest, mid-handoff),
//! `import` (answer `Failed` as a state rejection), `ready` (never answer),
//! `commit` (exit on `Commit`, before `Serving`).
//! Each test checks that O still serves every connection with its state
//! and that a later upgrade works.

pub mod channel;
mod exec;
pub(crate) mod handover;
pub(crate) mod takeover;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::service::{ComponentInfo, Pause, ServiceImage, SwapReport, UpgradeInfo};

pub use exec::receive_exec;
pub use handover::{UpgradeOptions, Upgrader, upgrade};
pub use takeover::receive;

/// The handoff protocol version. A new binary that speaks another one is
/// refused at `offer` (the old host keeps serving).
pub const VERSION: u32 = 1;

/// The environment variable naming the new process's end of the channel.
pub const FD_ENV: &str = "WASMHOST_UPGRADE_FD";

/// The environment variable naming the memfd that holds the manifest
/// after an `--exec` upgrade.
pub const MEMFD_ENV: &str = "WASMHOST_UPGRADE_MEMFD";

/// Test-only: the step at which the new process fails on purpose.
pub const FAIL_ENV: &str = "WASMHOST_TEST_UPGRADE_FAIL";

/// A message on the handoff channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Message {
    /// O → N: what to load.
    Offer {
        version: u32,
        service: String,
        component: PathBuf,
        /// The component `rollback` should return to, loaded too.
        previous: Option<PathBuf>,
    },
    /// N → O: the component is compiled and instantiated.
    Prepared(Prepared),
    /// O → N: the frozen service; payload and descriptors follow.
    Manifest(Box<Manifest>),
    /// N → O: everything checked and imported; waiting for `Commit`.
    Ready {
        import_us: u64,
        validate_us: u64,
        /// From the last descriptor received to this message.
        after_receive_us: u64,
    },
    /// O → N: serve. O closes its copies once N answers `Serving`.
    Commit { report: Box<SwapReport> },
    /// N → O: committed; N serves from now on (said before it touches a
    /// socket).
    Serving,
    /// O → N: do not serve; O serves on.
    Abort { reason: String },
    /// N → O: this step failed.
    Failed { step: String, message: String },
}

/// What the new process loaded before anything is frozen.
#[derive(Debug, Serialize, Deserialize)]
pub struct Prepared {
    pub version: u32,
    pub pid: u32,
    /// The formats the loaded component imports, most preferred first.
    pub importable: Vec<String>,
    pub component: ComponentInfo,
    pub compile_us: u64,
    pub from_cache: bool,
    pub instantiate_us: u64,
}

/// What moves besides the descriptors and the payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub image: ServiceImage,
    /// Payload: the state first, then each connection's unread and unsent
    /// bytes in `image.conns` order.
    pub state_len: u64,
    pub conn_bytes_len: u64,
    /// The control socket's path, when its listener is passed too.
    pub control: Option<PathBuf>,
    /// Descriptors that follow: `image.listeners`, `image.conns`, then the
    /// control listener if any.
    pub fd_count: usize,
    /// For `--exec`: the descriptors are not sent but kept open across
    /// `execve`, under these numbers; and what the new image needs to know.
    #[serde(default)]
    pub exec: Option<exec::Carried>,
}

/// What moved in an upgrade, for its report.
pub(crate) struct Moved {
    pub to: ComponentInfo,
    pub compile_us: u64,
    pub from_cache: bool,
    pub instantiate_us: u64,
    pub state_bytes: usize,
    pub conn_bytes: usize,
}

/// The report of a committed upgrade, the same for both modes.
pub(crate) fn report(
    image: &ServiceImage,
    moved: Moved,
    pause: Pause,
    mode: &str,
    new_pid: u32,
    binary: &Path,
) -> SwapReport {
    let unread_bytes = image.conns.iter().map(|c| c.unread_len).sum();
    SwapReport {
        service: image.service.clone(),
        kind: "upgrade".into(),
        generation_from: image.generation,
        generation_to: image.generation + 1,
        from: image.component.clone(),
        to: moved.to,
        format: Some(image.format.clone()).filter(|f| !f.is_empty()),
        state_bytes: moved.state_bytes,
        compile_us: moved.compile_us,
        from_cache: moved.from_cache,
        instantiate_us: moved.instantiate_us,
        pause,
        connections: image.conns.len(),
        warnings: Vec::new(),
        upgrade: Some(UpgradeInfo {
            mode: mode.into(),
            old_pid: image.pid,
            new_pid,
            binary: binary.display().to_string(),
            listeners: image.listeners.len(),
            timers: image.timers.len(),
            unread_bytes,
            unsent_bytes: moved.conn_bytes - unread_bytes,
        }),
        validation: Some(crate::service::Validation::Export),
        shadow: None,
        migrate: None,
    }
}

impl Manifest {
    /// Checks the lengths against each other before anything is trusted.
    pub fn check(&self, payload_len: usize) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!(
                "manifest version {} (this host speaks {VERSION})",
                self.version
            ));
        }
        let conn_bytes: usize = self
            .image
            .conns
            .iter()
            .map(|c| c.unread_len + c.unsent_len)
            .sum();
        if conn_bytes as u64 != self.conn_bytes_len
            || self.state_len + self.conn_bytes_len != payload_len as u64
        {
            return Err(format!(
                "manifest lengths disagree: state {} + connection bytes {} (listed {conn_bytes}) != payload {payload_len}",
                self.state_len, self.conn_bytes_len
            ));
        }
        let fds =
            self.image.listeners.len() + self.image.conns.len() + self.control.is_some() as usize;
        if fds != self.fd_count {
            return Err(format!(
                "manifest lists {fds} sockets but announces {} descriptors",
                self.fd_count
            ));
        }
        Ok(())
    }
}

/// Whether this process was asked (by a test) to fail at `step`.
fn fail_at(step: &str) -> bool {
    std::env::var(FAIL_ENV).is_ok_and(|s| s == step)
}
