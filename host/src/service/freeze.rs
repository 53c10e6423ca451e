//! Freezing a service at an update point so that everything it owns can be
//! handed to a new host process (`crate::upgrade`), and thawing it again.
//!
//! Freezing stops every accept loop and connection task
//! ([`crate::net::FreezeSwitch`]); each gives its socket back to the actor
//! through the queue, after the last bytes it read, so once every one has
//! answered, the actor holds the whole service still: listeners, sockets
//! (the kernel keeps what clients sent and nobody read), the bytes read but
//! not yet given to the guest, the bytes the guest sent but not yet
//! written, the timers and the instance. The state is exported with the
//! same negotiation as a swap ([`Actor::export_for`]); the driver sends all
//! of it and answers with a [`Decision`].
//!
//! Thawing ([`Actor::thaw`]) serves parked listeners and connections again
//! and gives the guest the bytes it has not seen. It is the one way a
//! service starts serving: at start-up (no connections), after a failed
//! handoff (in the old process), and after a successful one (in the new
//! process, from what it received).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::recovery::Call;
use super::report::{ComponentInfo, SwapRecord, SwapReport, unix_ms};
use super::transfer::{Exported, SwapKind, Timings};
use super::{Actor, Conn, Event, Msg, Program, Stats};
use crate::bindings::ConnInfo;
use crate::net::{self, FrozenConn, Listener, conn};

/// What a host upgrade asks of the actor.
pub struct HandoffRequest {
    /// The formats the new process's instance imports, most preferred first.
    pub importable: Vec<String>,
    /// How long to wait for every task to stop; then the freeze is undone.
    pub drain_timeout: Duration,
    /// Where the frozen service goes, or why it could not be frozen.
    pub reply: oneshot::Sender<Result<Handoff, String>>,
}

/// The service frozen at an update point, ready to be sent.
pub struct Handoff {
    pub image: ServiceImage,
    /// The state, in `image.format` (empty when that is empty: the
    /// service keeps no state).
    pub state: Vec<u8>,
    /// For each connection of `image.conns`, in order: its unread bytes,
    /// then its unsent bytes.
    pub conn_bytes: Vec<u8>,
    /// The sockets: `image.listeners`, then `image.conns`, in order. They
    /// stay open in this process until the decision is sent.
    pub fds: Vec<RawFd>,
    /// When the service stopped serving events.
    pub frozen_at: Instant,
    /// The export's share of the pause.
    pub timings: Timings,
    /// Commit (the new process serves; this actor ends) or abort (this
    /// actor serves on). Dropping it aborts.
    pub decision: oneshot::Sender<Decision>,
}

/// The driver's verdict on a handoff, with the history record to keep.
pub enum Decision {
    Commit(Box<SwapReport>),
    Abort(Box<SwapRecord>),
}

/// Everything about a service that is not a socket, a byte buffer or the
/// guest's state: what a new host process needs to carry on. Serialisable,
/// so it can cross a process (or, later, a machine).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceImage {
    pub service: String,
    /// The process that froze it.
    pub pid: u32,
    pub generation: u64,
    pub started_unix_ms: u64,
    pub stats: Stats,
    pub history: Vec<SwapRecord>,
    pub component: ComponentInfo,
    pub previous: Option<ComponentInfo>,
    /// The next connection id to hand out: ids are never reused.
    pub next_conn_id: u64,
    /// The state's format; empty for a service that keeps no state (an
    /// empty `exportable()`): the new process then starts its component
    /// with `init` and announces every connection with `on-connect`.
    pub format: String,
    pub listeners: Vec<ListenerImage>,
    pub conns: Vec<ConnImage>,
    pub timers: Vec<TimerImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerImage {
    pub name: String,
    pub addr: std::net::SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnImage {
    pub id: u64,
    pub listener: String,
    pub peer: String,
    /// Bytes read from the client and not yet given to the guest.
    pub unread_len: usize,
    /// Bytes the guest sent and the client has not been sent yet.
    pub unsent_len: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimerImage {
    pub token: u64,
    /// Time left until it fires, in milliseconds (0: due).
    pub remaining_ms: u64,
}

/// A connection held still: its socket and the bytes the guest has not
/// seen.
pub struct ParkedConn {
    pub info: ConnInfo,
    pub frozen: FrozenConn,
    pub unread: Vec<u8>,
}

/// Listeners and connections held still, to be served by [`Actor::thaw`].
#[derive(Default)]
pub struct Parked {
    pub listeners: Vec<Listener>,
    pub conns: BTreeMap<u64, ParkedConn>,
}

/// Where a service's actor starts from: fresh, or what a previous host
/// process handed over.
pub struct Start {
    pub generation: u64,
    pub started: SystemTime,
    pub previous: Option<Arc<Program>>,
    pub history: Vec<SwapRecord>,
    pub stats: Stats,
    pub timers: Vec<TimerImage>,
    pub parked: Parked,
    /// What a rebuild after a trap starts from: the state a host upgrade
    /// carried over (`None`: the instance was started with `init`).
    pub base: Option<crate::durable::Base>,
    /// `--state-dir`: its writer and where it stands.
    pub disk: Option<crate::durable::disk::Attach>,
    /// Records found on disk after `base` (a restart from a state dir), and
    /// how many.
    pub journal: Option<(Vec<u8>, u64)>,
    /// Connections open when the host crashed: each gets `on-close`.
    pub closes: Vec<u64>,
    /// The instance started with `init` although `parked` holds open
    /// connections (a host upgrade of a service that keeps no state): each
    /// gets `on-connect` before anything else.
    pub announce: bool,
}

impl Start {
    /// A service started from nothing, on these listeners.
    pub fn fresh(listeners: Vec<Listener>) -> Start {
        Start {
            generation: 1,
            started: SystemTime::now(),
            previous: None,
            history: Vec::new(),
            stats: Stats::default(),
            timers: Vec::new(),
            parked: Parked {
                listeners,
                conns: BTreeMap::new(),
            },
            base: None,
            disk: None,
            journal: None,
            closes: Vec::new(),
            announce: false,
        }
    }

    /// Takes what a restart from a state dir rebuilt (its base, journal,
    /// timers, and the connections open at the crash); returns the
    /// instance, and sets `next_id` to the first connection id to use.
    pub fn restored(&mut self, restored: super::Restored, next_id: &mut u64) -> super::Instance {
        self.base = Some(restored.base);
        self.journal = Some(restored.journal);
        self.timers = restored.timers;
        self.closes = restored.closes;
        *next_id = restored.next_conn_id;
        restored.instance
    }
}

/// Sockets and bytes collected while freezing.
#[derive(Default)]
struct Freezing {
    parked: Parked,
    /// Frozen connection tasks not yet matched with the table.
    frozen: HashMap<u64, FrozenConn>,
    unread: HashMap<u64, Vec<u8>>,
}

impl Actor {
    /// Runs one handoff; returns whether the service was handed off (the
    /// actor must end). The error is fatal for the service.
    pub(super) async fn handoff(&mut self, request: HandoffRequest) -> Result<bool> {
        if let Some(why) = self.busy() {
            let _ = request
                .reply
                .send(Err(format!("no host upgrade now: {why}")));
            return Ok(false);
        }
        // Held replies go out before the connections are frozen.
        self.flush().await?;
        let frozen_at = Instant::now();
        let mut parked = match self.freeze(request.drain_timeout).await? {
            Ok(parked) => parked,
            Err((why, parked)) => {
                self.thaw(parked, false).await?;
                let _ = request.reply.send(Err(why));
                return Ok(false);
            }
        };
        let drained = frozen_at.elapsed();
        let mut timings = Timings::default();
        let exported = match self
            .export_for(&request.importable, SwapKind::Upgrade, &mut timings)
            .await?
        {
            Ok(exported) => exported,
            // A version that keeps no state (an empty exportable()) hands
            // over none: the new process starts its component with init.
            Err(_) if self.runs_stateless().await => Exported {
                format: String::new(),
                state: Vec::new(),
            },
            Err(why) => {
                self.thaw(parked, false).await?;
                let _ = request.reply.send(Err(why));
                return Ok(false);
            }
        };
        let (decision, decided) = oneshot::channel();
        let handoff = self.image(&mut parked, exported, frozen_at, timings, decision);
        tracing::info!(
            service = &*self.spec.name,
            connections = parked.conns.len(),
            "frozen for a handoff: tasks stopped in {drained:?}, exported and imaged in {:?}",
            frozen_at.elapsed() - drained
        );
        if request.reply.send(Ok(handoff)).is_err() {
            self.thaw(parked, false).await?;
            return Ok(false);
        }
        match decided.await {
            Ok(Decision::Commit(report)) => {
                tracing::info!(
                    service = &*self.spec.name,
                    new_pid = report.upgrade.as_ref().map_or(0, |u| u.new_pid),
                    "handed over to the new host process; closing this process's copies"
                );
                // Dropping a socket closes this process's descriptor only;
                // the new process's copy keeps the connection open.
                drop(parked);
                Ok(true)
            }
            Ok(Decision::Abort(record)) => {
                self.record(*record);
                self.thaw(parked, false).await?;
                Ok(false)
            }
            Err(_) => {
                tracing::warn!(
                    service = &*self.spec.name,
                    "the upgrade ended without a decision; serving on"
                );
                self.thaw(parked, false).await?;
                Ok(false)
            }
        }
    }

    /// Stops every task and collects what they give back, handling the
    /// events already queued meanwhile: connections accepted before the
    /// freeze are announced to the guest, closes are delivered, bytes read
    /// are kept for whoever serves next. On timeout the error comes with
    /// what was collected, to thaw.
    async fn freeze(&mut self, timeout: Duration) -> Result<Result<Parked, (String, Parked)>> {
        self.net.freeze.freeze();
        let deadline = tokio::time::Instant::now() + timeout;
        let listeners = self.spec.listeners.len();
        let mut f = Freezing::default();
        // Counting first keeps this linear in the number of connections.
        let all_frozen = |actor: &Actor, f: &Freezing| {
            f.frozen.len() >= actor.conns.len()
                && actor.conns.keys().all(|id| f.frozen.contains_key(id))
        };
        while f.parked.listeners.len() < listeners || !all_frozen(self, &f) {
            let msg = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => bail!("the service's queue closed while freezing"),
                Err(_) => {
                    let why = format!(
                        "connection tasks did not stop within {} ms ({} of {} stopped)",
                        timeout.as_millis(),
                        f.frozen.len(),
                        self.conns.len()
                    );
                    return Ok(Err((why, self.settle(f))));
                }
            };
            self.while_frozen(msg, &mut f).await?;
        }
        Ok(Ok(self.settle(f)))
    }

    /// Handles one message while the service freezes.
    async fn while_frozen(&mut self, msg: Msg, f: &mut Freezing) -> Result<()> {
        match msg {
            Msg::Event(Event::Data(id, data)) => {
                if let Some(conn) = self.conns.get(&id) {
                    conn.outbox.consumed(data.len());
                    f.unread.entry(id).or_default().extend_from_slice(&data);
                }
            }
            Msg::Event(Event::ReadClosed(id)) => {
                // The guest sees the bytes before the end, as always.
                if let Some(data) = f.unread.remove(&id) {
                    self.deliver_late(id, &data).await?;
                }
                self.handle(Event::ReadClosed(id)).await?;
            }
            Msg::Event(Event::Frozen(frozen)) => {
                f.frozen.insert(frozen.id, frozen);
            }
            Msg::Event(Event::ListenerFrozen(listener)) => f.parked.listeners.push(listener),
            Msg::Event(event @ Event::Connected { .. }) => self.handle(event).await?,
            Msg::Shutdown(done) => self.shutdown_requested = Some(done),
            Msg::Swap(_, _, reply) => {
                let _ = reply.send(Err(BUSY.into()));
            }
            Msg::Handoff(request) => {
                let _ = request.reply.send(Err(BUSY.into()));
            }
            other => self.answer(other),
        }
        Ok(())
    }

    /// Pairs the frozen tasks with the connection table: a connection the
    /// service closed meanwhile is written out and closed, not parked.
    fn settle(&mut self, mut f: Freezing) -> Parked {
        for (id, frozen) in f.frozen {
            match self.conns.get(&id) {
                Some(conn) => {
                    let unread = f.unread.remove(&id).unwrap_or_default();
                    let info = conn.info.clone();
                    f.parked.conns.insert(
                        id,
                        ParkedConn {
                            info,
                            frozen,
                            unread,
                        },
                    );
                }
                None => conn::finish(frozen, &self.net.tracker),
            }
        }
        // Bytes of connections whose task has not stopped yet (a timeout)
        // are given to the guest now, before that task resumes.
        for (id, unread) in f.unread {
            if let Some(p) = f.parked.conns.get_mut(&id) {
                p.unread.extend_from_slice(&unread);
            } else {
                self.late_unread.push((id, unread));
            }
        }
        f.parked
    }

    /// Builds what the driver sends. Sockets stay in `parked`.
    fn image(
        &mut self,
        parked: &mut Parked,
        exported: Exported,
        frozen_at: Instant,
        timings: Timings,
        decision: oneshot::Sender<Decision>,
    ) -> Handoff {
        let mut fds = Vec::with_capacity(parked.listeners.len() + parked.conns.len());
        let listeners = parked
            .listeners
            .iter()
            .map(|l| {
                fds.push(l.listener.as_raw_fd());
                ListenerImage {
                    name: l.name.to_string(),
                    addr: l.listener.local_addr().expect("bound listener"),
                }
            })
            .collect();
        let mut conn_bytes = Vec::new();
        let mut conns = Vec::with_capacity(parked.conns.len());
        for p in parked.conns.values_mut() {
            fds.push(p.frozen.stream.as_raw_fd());
            let unsent = p.frozen.unsent();
            conn_bytes.extend_from_slice(&p.unread);
            conn_bytes.extend_from_slice(unsent);
            conns.push(ConnImage {
                id: p.info.id,
                listener: p.info.listener.clone(),
                peer: p.info.peer.clone(),
                unread_len: p.unread.len(),
                unsent_len: unsent.len(),
            });
        }
        let image = ServiceImage {
            service: self.spec.name.to_string(),
            pid: std::process::id(),
            generation: self.generation,
            started_unix_ms: unix_ms(self.started),
            stats: self.stats.clone(),
            history: self.history.iter().cloned().collect(),
            component: ComponentInfo::of(&self.instance.program),
            previous: self.previous.as_deref().map(ComponentInfo::of),
            next_conn_id: self.net.next_id.load(std::sync::atomic::Ordering::Relaxed),
            format: exported.format,
            listeners,
            conns,
            timers: self.timer_images(),
        };
        Handoff {
            image,
            state: exported.state,
            conn_bytes,
            fds,
            frozen_at,
            timings,
            decision,
        }
    }

    pub(super) fn timer_images(&self) -> Vec<TimerImage> {
        let now = tokio::time::Instant::now();
        let mut timers: Vec<TimerImage> = self
            .timer_keys
            .iter()
            .map(|(&token, key)| TimerImage {
                token,
                remaining_ms: self
                    .timers
                    .deadline(key)
                    .saturating_duration_since(now)
                    .as_millis() as u64,
            })
            .collect();
        timers.sort_by_key(|t| t.token);
        timers
    }

    /// Serves parked listeners and connections, then gives the guest the
    /// bytes it has not seen yet; with `announce`, `on-connect` for every
    /// connection first (a guest that started with `init` has not seen
    /// them).
    pub(super) async fn thaw(&mut self, parked: Parked, announce: bool) -> Result<()> {
        self.net.freeze.thaw();
        let mut unread = std::mem::take(&mut self.late_unread);
        for (id, p) in parked.conns {
            let outbox = conn::adopt(p.frozen, &self.net);
            self.conns.insert(
                id,
                Conn {
                    info: p.info,
                    outbox,
                    side: false,
                },
            );
            if !p.unread.is_empty() {
                unread.push((id, p.unread));
            }
        }
        if announce {
            let mut infos: Vec<ConnInfo> = self.conns.values().map(|c| c.info.clone()).collect();
            infos.sort_unstable_by_key(|info| info.id);
            for info in infos {
                self.deliver(Call::Connect(&info)).await?;
            }
        }
        net::start_accepting(parked.listeners, &self.net);
        for (id, data) in unread {
            self.deliver_late(id, &data).await?;
        }
        Ok(())
    }

    /// A connection task that froze after its freeze was over: serve it
    /// again (or finish it, if the service closed it meanwhile).
    pub(super) fn resume_conn(&mut self, frozen: FrozenConn) {
        match self.conns.get_mut(&frozen.id) {
            Some(conn) => conn.outbox = conn::adopt(frozen, &self.net),
            None => conn::finish(frozen, &self.net.tracker),
        }
    }
}

const BUSY: &str = "an upgrade is in progress; try again when it is over";
