//! Running in a fleet: what load balancers, orchestrators and keepalived
//! see of a host, and how a host leaves the fleet's rotation.
//!
//! * [`Health`] is the process's one view of its own state: whether it has
//!   a service, whether it is draining, handing the service off (host
//!   upgrade, migration) or stopped. Every outward signal reads it, so they
//!   agree with each other:
//!   * the admin HTTP listener (`serve --admin ADDR`, [`http`]): `/livez`,
//!     `/readyz` and Prometheus `/metrics` ([`metrics`]);
//!   * HAProxy's agent check (`serve --agent-check ADDR`, [`agent`]);
//!   * `wasmhost status` (its `draining` line).
//! * **Drain** (`wasmhost drain`, SIGTERM under systemd): the accept loops
//!   stop listening (new connections are refused at once, so a balancer
//!   retries them elsewhere instead of waiting on a backlog nobody
//!   accepts), the agent check answers `drain`, `/readyz` answers 503, and
//!   the open connections go on until they close (or move with `migrate`).
//!   `drain --cancel` listens again on the same addresses. A host upgrade
//!   or a migration ends a drain: the process that serves next accepts.
//!
//! The admin and agent listeners belong to the process, not to a service:
//! a host that waits for a service (`serve --receive`) answers them too
//! (not ready, `maint`). They are not handed over by a host upgrade: the
//! new process binds them when the old one exits ([`listen`]); in between
//! the old one answers (not ready and `drain` while it hands over, then
//! `maint` until it exits), and in the instant between the two a probe is
//! refused (HAProxy does not count a failed agent
//! check against a server; a readiness probe retries).

pub mod agent;
pub mod http;
pub mod metrics;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::control::server::ControlCtx;
use crate::service::StatusReport;

/// What the host is doing, as the fleet's tools see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Serving and accepting.
    Ready,
    /// Serving its open connections, accepting no new ones.
    Draining,
    /// A host upgrade or migration is moving the service.
    HandingOff,
    /// No service here: waiting for one (`serve --receive`), or its
    /// service moved to another machine.
    NoService,
    /// The service stopped (its restart budget is spent) or does not
    /// answer: why.
    Failed(String),
}

impl State {
    /// A word for logs, `status` and the HTTP answers.
    pub fn describe(&self) -> String {
        match self {
            State::Ready => "ready".into(),
            State::Draining => "draining".into(),
            State::HandingOff => "handing the service off".into(),
            State::NoService => "no service".into(),
            State::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// How long a health answer waits for the service's actor: an actor busy
/// longer than this (a guest call stuck until its deadline) is reported
/// as not answering.
pub const STATUS_DEADLINE: Duration = Duration::from_secs(2);

/// The process's health: one per process ([`health`]).
pub struct Health {
    draining: watch::Sender<bool>,
    /// Accept loops running, and those whose socket listens now.
    loops: AtomicUsize,
    listening: AtomicUsize,
    /// SIGTERM is draining the host before it stops.
    stopping: std::sync::atomic::AtomicBool,
    handing_off: AtomicUsize,
    service: Mutex<Option<ControlCtx>>,
    max_connections: AtomicUsize,
}

static HEALTH: LazyLock<Health> = LazyLock::new(|| Health {
    draining: watch::Sender::new(false),
    loops: AtomicUsize::new(0),
    listening: AtomicUsize::new(0),
    stopping: std::sync::atomic::AtomicBool::new(false),
    handing_off: AtomicUsize::new(0),
    service: Mutex::new(None),
    max_connections: AtomicUsize::new(0),
});

/// This process's health.
pub fn health() -> &'static Health {
    &HEALTH
}

/// Held while a host upgrade or migration moves the service.
pub struct HandingOff(());

impl Drop for HandingOff {
    fn drop(&mut self) {
        HEALTH.handing_off.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held by an accept loop while it runs.
pub struct AcceptLoop(());

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        HEALTH.loops.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held by an accept loop while its socket listens.
pub struct Listening(());

impl Drop for Listening {
    fn drop(&mut self) {
        HEALTH.listening.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Health {
    /// The service now served (`None` once it ended or moved away), and
    /// its `--max-connections` (for the agent check's weight).
    pub fn set_service(&self, ops: Option<ControlCtx>, max_connections: usize) {
        *self.service.lock().expect("health lock") = ops;
        self.max_connections
            .store(max_connections, Ordering::Relaxed);
    }

    pub fn service(&self) -> Option<ControlCtx> {
        self.service.lock().expect("health lock").clone()
    }

    /// Forgets a drain without a word: the service it was for ended (a
    /// service that comes next accepts).
    pub fn reset_drain(&self) {
        self.draining.send_replace(false);
    }

    /// Marks the host as stopping (a SIGTERM drain): a drain can no longer
    /// be cancelled.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Ends a drain and waits (at most a second) until every accept loop
    /// listens again, so that a connection made after this returns is
    /// accepted. Refused while the host stops; returns whether a drain was
    /// running.
    pub async fn undrain(&self) -> Result<bool, String> {
        if self.stopping() {
            return Err("the host is stopping (SIGTERM): its drain ends when it exits".into());
        }
        let was = self.set_draining(false);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.listening.load(Ordering::Acquire) < self.loops.load(Ordering::Acquire) {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the drain is cancelled, but {} of {} listeners do not listen yet (the log \
                     says why)",
                    self.loops.load(Ordering::Acquire) - self.listening.load(Ordering::Acquire),
                    self.loops.load(Ordering::Acquire)
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(was)
    }

    /// Starts (`true`) or ends a drain; returns whether one was running.
    pub fn set_draining(&self, on: bool) -> bool {
        let was = self.draining.send_replace(on);
        if was != on {
            match on {
                true => tracing::info!("draining: accepting no new connections"),
                false => tracing::info!("drain cancelled: accepting again"),
            }
        }
        was
    }

    pub fn draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Follows the drain flag (the accept loops wait on it).
    pub fn watch_draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Counts a running accept loop until the guard drops.
    pub fn accept_loop(&self) -> AcceptLoop {
        self.loops.fetch_add(1, Ordering::AcqRel);
        AcceptLoop(())
    }

    /// Counts an accept loop as listening until the guard drops.
    pub fn listening(&self) -> Listening {
        self.listening.fetch_add(1, Ordering::AcqRel);
        Listening(())
    }

    /// Starts a drain and waits (at most a second) until every accept loop
    /// has stopped listening, so that a connection attempt made after this
    /// returns is refused.
    pub async fn drain(&self) -> bool {
        let was = self.set_draining(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.listening.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    "{} listeners still listen 1 s into the drain",
                    self.listening.load(Ordering::Acquire)
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        was
    }

    /// Marks a handoff in progress until the guard drops.
    pub fn handing_off(&self) -> HandingOff {
        self.handing_off.fetch_add(1, Ordering::AcqRel);
        HandingOff(())
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::Relaxed)
    }

    /// The state now, and the service's status when it answered.
    pub async fn state(&self) -> (State, Option<StatusReport>) {
        let Some(ops) = self.service() else {
            return (State::NoService, None);
        };
        let status =
            tokio::time::timeout(STATUS_DEADLINE, crate::control::server::status(&ops)).await;
        let status = match status {
            Ok(Ok(status)) => status,
            Ok(Err(_)) if self.handing_off.load(Ordering::Acquire) > 0 => {
                return (State::HandingOff, None);
            }
            Ok(Err(_)) => return (State::NoService, None),
            // A frozen service answers when its handoff ends.
            Err(_) if self.handing_off.load(Ordering::Acquire) > 0 => {
                return (State::HandingOff, None);
            }
            Err(_) => {
                return (
                    State::Failed(format!(
                        "the service did not answer within {STATUS_DEADLINE:?}"
                    )),
                    None,
                );
            }
        };
        let state = if let Some(why) = &status.durable.stopped {
            State::Failed(why.clone())
        } else if self.handing_off.load(Ordering::Acquire) > 0 {
            State::HandingOff
        } else if self.draining() {
            State::Draining
        } else {
            State::Ready
        };
        (state, Some(status))
    }
}

/// Binds an admin or agent listener (`flag` names it in errors) and
/// serves it with `serve`. A process started by a host upgrade finds the
/// address still held by the process it takes over from: it binds as soon
/// as that one exits (the old process answers until then, "not ready"
/// while it hands the service over).
pub async fn listen<F, Fut>(
    addr: std::net::SocketAddr,
    flag: &'static str,
    upgraded: bool,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && upgraded => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            let taken = async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(listener) => return Some(listener),
                        Err(_) if tokio::time::Instant::now() < deadline => {}
                        Err(e) => {
                            tracing::error!("cannot listen on {addr} ({flag}) after 300 s: {e}");
                            return None;
                        }
                    }
                }
            };
            let waiting = async move {
                if let Some(listener) = taken.await {
                    tracing::info!("{flag} listening on {addr}, taken from the old process");
                    serve(listener).await;
                }
            };
            tokio::spawn(waiting);
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
            "cannot listen on {addr} ({flag}): the address is in use; stop the process using it \
             or choose another address"
        ),
        Err(e) => anyhow::bail!("cannot listen on {addr} ({flag}): {e}"),
    };
    let bound = listener.local_addr()?;
    match flag {
        "--admin" => eprintln!("admin endpoints on http://{bound}"),
        _ => eprintln!("HAProxy agent check on {bound}"),
    }
    tokio::spawn(serve(listener));
    Ok(())
}
