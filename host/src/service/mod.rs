//! The service actor: one task that owns the current generation's wasmtime
//! `Store` and instance, the connection table and the timers.
//!
//! Connection tasks, timers and (later) the control socket talk to it over
//! one bounded queue, so the instance sees one event at a time, and any
//! message handled between two events (a swap, a shutdown) sees the
//! instance at a quiescent point. Guest calls record effects (send, close,
//! timers) which the actor carries out after each call.

mod event_time;
mod freeze;
mod gradual;
mod group;
mod instance;
mod persist;
mod recovery;
mod report;
mod shadow;
mod state;
mod swap;
mod transfer;

pub use event_time::{EventTime, Stamp};

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};

use bytes::Bytes;
use recovery::Call;
use tokio::sync::{mpsc, oneshot};
use tokio_util::time::{DelayQueue, delay_queue};

pub use freeze::{
    ConnImage, Decision, Handoff, HandoffRequest, ListenerImage, Parked, ParkedConn, ServiceImage,
    Start, TimerImage,
};
pub use gradual::{GradualOptions, GradualStatus, VersionStatus};
pub use group::{GroupGate, LoadGuard, Spread, require_stateless};
pub use instance::{DeadlineExceeded, Instance, InstanceLimits, Program};
pub use recovery::{DurableStatus, Replica, Restored, SnapshotReport, base_of_state, restore};
pub use report::{
    ComponentInfo, HISTORY_LEN, InstanceSummary, MigrateInfo, StatusReport, SwapRecord, SwapReport,
    UpgradeInfo, micros, unix_ms,
};
pub use shadow::{Divergence, ShadowOptions, ShadowStatus, default_max_lag_ms};
pub use state::Effect;
pub use swap::{Prepared, SwapOptions, prepare};
pub use transfer::{
    Difference, ExportTrap, ImportError, Pause, SwapKind, Timings, Validation, export, import,
    import_checked, negotiate, no_common_format, root,
};

use crate::bindings::ConnInfo;
use crate::net::conn::Outbox;
use crate::net::{AcceptCtx, ConnMeta, FrozenConn, Listener};

/// Capacity of the actor's queue. Senders wait when it is full, which is
/// what slows readers down when the service is busy.
const QUEUE_CAPACITY: usize = 4096;

/// Most timers a service may have armed at once; `set-timer` beyond it is
/// refused with a warning in the log.
pub const MAX_TIMERS: usize = 1 << 20;

/// Something that happened to a connection.
pub enum Event {
    Connected {
        info: ConnMeta,
        outbox: Outbox,
    },
    Data(u64, Bytes),
    /// The connection's reader stopped: end of stream, error, or closing.
    ReadClosed(u64),
    /// The connection's task stopped for a freeze and gives its socket back.
    Frozen(FrozenConn),
    /// An accept loop stopped for a freeze and gives its listener back.
    ListenerFrozen(Listener),
}

enum Msg {
    Event(Event),
    Shutdown(oneshot::Sender<()>),
    Status(oneshot::Sender<StatusReport>),
    /// The previous generation's program and the current generation number.
    Previous(oneshot::Sender<Option<(Arc<Program>, u64)>>),
    Swap(
        Box<Prepared>,
        SwapOptions,
        oneshot::Sender<Result<SwapReport, String>>,
    ),
    Handoff(Box<HandoffRequest>),
    Snapshot(oneshot::Sender<Result<SnapshotReport, String>>),
    Shadow(
        Box<Prepared>,
        ShadowOptions,
        oneshot::Sender<Result<ShadowStatus, String>>,
    ),
    Gradual(
        Box<Prepared>,
        GradualOptions,
        oneshot::Sender<Result<GradualStatus, String>>,
    ),
    /// Commit; unless the `bool` (a last attempt), answer
    /// [`Committed::NotYet`] while the shadow is behind.
    Commit(bool, oneshot::Sender<Result<Committed, String>>),
    Abort(oneshot::Sender<Result<Aborted, String>>),
}

/// What `wasmhost commit` did.
pub enum Committed {
    /// A shadow became the live version.
    Shadow(Box<SwapReport>),
    /// A canary became a drain.
    Canary(Box<GradualStatus>),
    /// Nothing yet: the shadow is this many events behind (it now runs at
    /// normal priority to catch up); ask again.
    NotYet(u64),
}

/// What `wasmhost abort` dropped.
pub enum Aborted {
    Shadow(Box<ShadowStatus>),
    Gradual(Box<GradualStatus>),
}

/// The service actor is gone (it has shut down).
#[derive(Debug, thiserror::Error)]
#[error("the service has stopped")]
pub struct Stopped;

/// A cloneable handle for sending to the service actor.
#[derive(Clone)]
pub struct ServiceHandle {
    tx: mpsc::Sender<Msg>,
}

impl ServiceHandle {
    pub async fn event(&self, event: Event) -> Result<(), Stopped> {
        self.tx.send(Msg::Event(event)).await.map_err(|_| Stopped)
    }

    /// Sends the request `make` builds around a reply channel and waits
    /// for the reply.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn status(&self) -> Result<StatusReport, Stopped> {
        self.ask(Msg::Status).await
    }

    /// The previous generation's program (for rollback), with the current
    /// generation number.
    pub async fn previous(&self) -> Result<Option<(Arc<Program>, u64)>, Stopped> {
        self.ask(Msg::Previous).await
    }

    /// Swaps in a prepared instance at the next update point. The error
    /// says why the swap was aborted; the old version is then still live.
    pub async fn swap(&self, prepared: Prepared, opts: SwapOptions) -> Result<SwapReport, String> {
        let msg = |tx| Msg::Swap(Box::new(prepared), opts, tx);
        self.ask(msg).await.map_err(|e| e.to_string())?
    }

    /// Takes a snapshot at the next update point; the error says why none
    /// was taken.
    pub async fn snapshot(&self) -> Result<Result<SnapshotReport, String>, Stopped> {
        self.ask(Msg::Snapshot).await
    }

    /// Starts a shadow of a prepared instance at the next update point
    /// (`swap --shadow`); the error says why none was started.
    pub async fn shadow(
        &self,
        prepared: Prepared,
        opts: ShadowOptions,
    ) -> Result<ShadowStatus, String> {
        let msg = |tx| Msg::Shadow(Box::new(prepared), opts, tx);
        self.ask(msg).await.map_err(|e| e.to_string())?
    }

    /// Starts a prepared (not yet initialised) instance beside the running
    /// one for a drain or canary; the error says why none was started.
    pub async fn gradual(
        &self,
        prepared: Prepared,
        opts: GradualOptions,
    ) -> Result<GradualStatus, String> {
        let msg = |tx| Msg::Gradual(Box::new(prepared), opts, tx);
        self.ask(msg).await.map_err(|e| e.to_string())?
    }

    /// Makes the running shadow the live version, or turns a canary into a
    /// drain (`wasmhost commit`). Unless `last_attempt`, a shadow that is
    /// behind gets [`Committed::NotYet`] instead of a long pause.
    pub async fn commit(&self, last_attempt: bool) -> Result<Committed, String> {
        let msg = |tx| Msg::Commit(last_attempt, tx);
        self.ask(msg).await.map_err(|e| e.to_string())?
    }

    /// Drops the running shadow, drain or canary (`wasmhost abort`).
    pub async fn abort(&self) -> Result<Aborted, String> {
        self.ask(Msg::Abort).await.map_err(|e| e.to_string())?
    }

    /// Freezes the service at its next update point for a host upgrade:
    /// see [`HandoffRequest`]. The error says why it could not; the service
    /// then serves on.
    pub async fn handoff(&self, request: HandoffRequest) -> Result<(), String> {
        let msg = Msg::Handoff(Box::new(request));
        self.tx.send(msg).await.map_err(|_| Stopped.to_string())
    }

    /// Closes every connection (after flushing what the service sent),
    /// delivering `on-close` for each, and stops the actor.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Lets one swap or upgrade run at a time: a second is refused with the
/// reason instead of queueing behind the first.
#[derive(Clone, Default)]
pub struct Exclusive(Arc<std::sync::Mutex<Option<&'static str>>>);

/// Held while a swap or upgrade runs.
pub struct ExclusiveGuard(Exclusive);

impl Exclusive {
    /// Starts `what` (`a swap`, `an upgrade`), unless something else runs.
    pub fn begin(&self, what: &'static str) -> Result<ExclusiveGuard, String> {
        let mut running = self.0.lock().expect("exclusive lock");
        if let Some(other) = *running {
            return Err(format!(
                "refused: {other} is in progress; one swap or upgrade runs at a time, try again when it is over"
            ));
        }
        *running = Some(what);
        Ok(ExclusiveGuard(self.clone()))
    }
}

impl Drop for ExclusiveGuard {
    fn drop(&mut self) {
        *self.0.0.lock().expect("exclusive lock") = None;
    }
}

/// Everything needed to (re)start the service's instance.
#[derive(Clone)]
pub struct ServiceSpec {
    pub name: Arc<str>,
    pub config: Vec<(String, String)>,
    pub limits: InstanceLimits,
    /// Bound listeners, for `status`.
    pub listeners: Vec<(String, std::net::SocketAddr)>,
    /// Journal, snapshots and the restart budget.
    pub durable: crate::durable::Policy,
}

/// Starts a fresh instance of `program` and calls `init`. Errors here mean
/// the service cannot start at all.
pub async fn start_fresh(program: Arc<Program>, spec: &ServiceSpec) -> Result<Instance> {
    let path = program.path.display().to_string();
    let mut instance = Instance::new(program, spec.name.clone(), &spec.limits).await?;
    match instance.init(&spec.config).await {
        Ok(Ok(())) => Ok(instance),
        Ok(Err(msg)) => bail!("the service refused to start: init returned an error: {msg}"),
        Err(trap) => Err(trap.context(format!("{path}: init trapped"))),
    }
}

/// The receiving end of a service's queue, made before the actor so that
/// the accept loops and connections can hold its handle.
pub struct Mailbox(mpsc::Receiver<Msg>);

/// A service's queue: the handle to send to it, and its receiving end for
/// [`spawn`].
pub fn mailbox() -> (ServiceHandle, Mailbox) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    (ServiceHandle { tx }, Mailbox(rx))
}

/// How the actor ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shut down (every connection closed and told to the service).
    Stopped,
    /// Handed to a new host process, which serves every connection now.
    HandedOff,
}

/// Spawns the actor around an initialised instance and starts serving
/// `start`'s listeners and connections.
pub fn spawn(
    instance: Instance,
    spec: ServiceSpec,
    mailbox: Mailbox,
    net: AcceptCtx,
    start: Start,
) -> tokio::task::JoinHandle<Result<Ended>> {
    swap::start_reaper();
    let base = start
        .base
        .unwrap_or_else(|| recovery::base_after_init(&instance));
    let mut actor = Actor {
        spec,
        generation: start.generation,
        started: start.started,
        generation_started: SystemTime::now(),
        previous: start.previous,
        history: start.history.into(),
        instance,
        rx: mailbox.0,
        net,
        conns: HashMap::new(),
        timers: DelayQueue::new(),
        timer_keys: HashMap::new(),
        closing: VecDeque::new(),
        stats: start.stats,
        shutdown_requested: None,
        late_unread: Vec::new(),
        journal: None,
        durable: Default::default(),
        own_formats: Vec::new(),
        stopped: None,
        disk: None,
        shadow: None,
        last_shadow: None,
        side: None,
        last_gradual: None,
    };
    let resume = start.disk.as_ref().is_some_and(|d| d.resume);
    let announce = start.announce;
    let flushed = start.journal.as_ref().map_or(0, |(bytes, _)| bytes.len());
    actor.disk = start.disk.map(|attach| persist::Disk::new(attach, flushed));
    for timer in &start.timers {
        actor.set_timer(timer.token, Duration::from_millis(timer.remaining_ms));
    }
    tokio::spawn(async move {
        actor.start_journal(base, &[], start.journal, resume).await;
        actor.thaw(start.parked, announce).await?;
        // Restarted from a state dir: the connections open at the crash
        // are gone.
        for id in start.closes {
            actor.deliver(Call::Close(id)).await?;
        }
        actor.flush().await?;
        actor.run().await
    })
}

/// Sleeps until `due`, or forever. Made lazily: `select!` builds the future
/// of a disabled branch too (it only does not poll it), and a timer is not
/// free to make at every event.
async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// The guest's view of a connection the host accepted.
pub fn guest_conn_info(meta: ConnMeta) -> ConnInfo {
    ConnInfo {
        id: meta.id,
        listener: meta.listener,
        peer: meta.peer,
    }
}

/// Counters reported by `status`.
#[derive(Default, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub events: u64,
    pub traps: u64,
    pub connections_total: u64,
    /// Traps after which the state was rebuilt from the snapshot and the
    /// journal.
    #[serde(default)]
    pub recoveries: u64,
}

struct Conn {
    info: ConnInfo,
    outbox: Outbox,
    /// Served by the new version of a drain or canary.
    side: bool,
}

struct Actor {
    spec: ServiceSpec,
    /// Counts generations: 1 at start, +1 for each committed swap.
    generation: u64,
    started: SystemTime,
    generation_started: SystemTime,
    /// The program of the generation before this one, kept compiled for
    /// rollback (at most two generations: the current and this one).
    previous: Option<Arc<Program>>,
    /// The most recent swaps, newest last.
    history: VecDeque<SwapRecord>,
    instance: Instance,
    rx: mpsc::Receiver<Msg>,
    /// What connection tasks and accept loops need (to resume them).
    net: AcceptCtx,
    conns: HashMap<u64, Conn>,
    /// Armed timers: the token, and whether it is the new version's of a
    /// drain or canary.
    timers: DelayQueue<(u64, bool)>,
    timer_keys: HashMap<u64, delay_queue::Key>,
    /// Connections closed by an effect, whose `on-close` is still due.
    closing: VecDeque<u64>,
    stats: Stats,
    /// A shutdown asked for while frozen, answered once it is over.
    shutdown_requested: Option<oneshot::Sender<()>>,
    /// Bytes read during a freeze that timed out, from connections whose
    /// task had not stopped yet: the guest gets them when it resumes.
    late_unread: Vec<(u64, Vec<u8>)>,
    /// Every event since the last snapshot; `None` for a stateless guest,
    /// `--journal off`, or a stopped service.
    journal: Option<crate::durable::Journal>,
    durable: recovery::DurableStats,
    /// The formats the running component imports (a snapshot is in the
    /// first of them that it exports).
    own_formats: Vec<String>,
    /// Why the service was stopped (restart budget spent), if it was.
    stopped: Option<String>,
    /// `--state-dir`: the writer and the output waiting for it.
    disk: Option<persist::Disk>,
    /// A shadow swap's new version, running beside this one.
    shadow: Option<shadow::Shadow>,
    /// The last shadow swap that ended, for `status`.
    last_shadow: Option<ShadowStatus>,
    /// A drain or canary's new version, serving beside this one.
    side: Option<gradual::Side>,
    /// The last drain or canary that ended, for `status`.
    last_gradual: Option<GradualStatus>,
}

impl Actor {
    async fn run(mut self) -> Result<Ended> {
        loop {
            if let Some(done) = self.shutdown_requested.take() {
                self.flush().await?;
                self.close_all().await?;
                self.flush().await?;
                let _ = done.send(());
                return Ok(Ended::Stopped);
            }
            // Group commit: one write (and sync) per batch of events, once
            // the queue is empty (or much output is held). Releasing output
            // can deliver `on-close` calls whose output is held again.
            while self.batch_due() {
                self.flush().await?;
            }
            self.flush_shadow();
            self.tend_side().await?;
            let drain_due = self.drain_deadline().map(tokio::time::Instant::from_std);
            let timers_armed = !self.timers.is_empty();
            let shadow_due = self.shadow.as_ref().and_then(|s| s.flush_at());
            let shadow_due = shadow_due.map(tokio::time::Instant::from_std);
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(Msg::Event(event)) => self.handle(event).await?,
                    Some(Msg::Shutdown(done)) => self.shutdown_requested = Some(done),
                    Some(Msg::Swap(prepared, opts, reply)) => {
                        let result = self.swap(*prepared, opts).await?;
                        let _ = reply.send(result);
                    }
                    Some(Msg::Snapshot(reply)) => {
                        let result = self.snapshot("wasmhost snapshot").await?;
                        self.deliver_closes().await?;
                        let _ = reply.send(result);
                    }
                    Some(Msg::Shadow(prepared, opts, reply)) => {
                        let result = self.start_shadow(*prepared, opts).await?;
                        let _ = reply.send(result);
                    }
                    Some(Msg::Gradual(prepared, opts, reply)) => {
                        let result = self.start_side(*prepared, opts).await?;
                        let _ = reply.send(result);
                    }
                    Some(Msg::Commit(last_attempt, reply)) => {
                        let result = if self.side.is_some() {
                            self.commit_side().map(|s| Committed::Canary(Box::new(s)))
                        } else if let Some(behind) = self.shadow_not_ready(last_attempt) {
                            Ok(Committed::NotYet(behind))
                        } else {
                            self.commit_shadow()
                                .await?
                                .map(|r| Committed::Shadow(Box::new(r)))
                        };
                        let _ = reply.send(result);
                    }
                    Some(Msg::Abort(reply)) => {
                        let result = match self.side.is_some() {
                            true => {
                                self.abort_side("by `wasmhost abort`".into(), None).await?;
                                let status = self.gradual_status().expect("just ended");
                                Ok(Aborted::Gradual(Box::new(status)))
                            }
                            false => self.abort_shadow().map(|s| Aborted::Shadow(Box::new(s))),
                        };
                        let _ = reply.send(result);
                    }
                    Some(Msg::Handoff(request)) => {
                        if self.handoff(*request).await? {
                            if let Some(done) = self.shutdown_requested.take() {
                                let _ = done.send(());
                            }
                            return Ok(Ended::HandedOff);
                        }
                    }
                    Some(other) => self.answer(other),
                    None => return Ok(Ended::Stopped),
                },
                Some(expired) = std::future::poll_fn(|cx| self.timers.poll_expired(cx)), if timers_armed => {
                    match expired.into_inner() {
                        (token, true) => self.side_timer(token).await?,
                        (token, false) => {
                            self.timer_keys.remove(&token);
                            self.deliver(Call::Timer(token)).await?;
                        }
                    }
                }
                // A drain's timeout.
                _ = sleep_until(drain_due), if drain_due.is_some() => {}
                // A shadow's batch is due while nothing else happens.
                _ = sleep_until(shadow_due), if shadow_due.is_some() => {}
            }
        }
    }

    /// Answers the requests that do not change the service.
    fn answer(&mut self, msg: Msg) {
        match msg {
            Msg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Msg::Previous(reply) => {
                let previous = self.previous.clone().map(|p| (p, self.generation));
                let _ = reply.send(previous);
            }
            _ => unreachable!("answer() is only given read-only requests"),
        }
    }

    async fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Connected { info, outbox } => {
                if self.stopped.is_some() {
                    outbox.close();
                    return Ok(());
                }
                let side = self.side_takes_new();
                if !side {
                    self.stats.connections_total += 1;
                }
                let info = guest_conn_info(info);
                let conn = Conn {
                    info: info.clone(),
                    outbox,
                    side,
                };
                self.conns.insert(info.id, conn);
                match side {
                    true => self.deliver_side(Call::Connect(&info)).await,
                    false => self.deliver(Call::Connect(&info)).await,
                }
            }
            Event::Data(id, data) => {
                let Some(conn) = self.conns.get(&id) else {
                    return Ok(()); // closed by the service; drop late bytes
                };
                // The table does not change during the call: effects are
                // applied after it.
                match conn.side {
                    true => self.deliver_side(Call::Data(id, &data)).await?,
                    false => self.deliver(Call::Data(id, &data)).await?,
                }
                if let Some(conn) = self.conns.get(&id) {
                    conn.outbox.consumed(data.len());
                }
                Ok(())
            }
            Event::ReadClosed(id) => {
                if let Some(conn) = self.remove_conn(id) {
                    conn.outbox.close();
                    match conn.side {
                        true => self.deliver_side(Call::Close(id)).await?,
                        false => self.deliver(Call::Close(id)).await?,
                    }
                }
                Ok(())
            }
            // Late from a freeze that is over (it timed out): serve it again.
            Event::Frozen(frozen) => {
                self.resume_conn(frozen);
                Ok(())
            }
            Event::ListenerFrozen(listener) => {
                crate::net::start_accepting(vec![listener], &self.net);
                Ok(())
            }
        }
    }

    /// Gives the guest bytes of `id` (if it is still open) outside the
    /// connection's flow control (they were accounted for when read).
    async fn deliver_late(&mut self, id: u64, data: &[u8]) -> Result<()> {
        if !self.conns.contains_key(&id) {
            return Ok(());
        }
        self.deliver(Call::Data(id, data)).await
    }

    fn apply_effects(&mut self) {
        let effects = self.instance.take_effects();
        self.apply(effects);
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        if !self.holds_output() {
            return self.apply_now(effects);
        }
        // Sends and closes wait for their events' records to be written;
        // timers are the host's own and change now.
        let mut now = Vec::new();
        for effect in effects {
            match effect {
                Effect::Send(..) | Effect::Close(_) => self.hold(effect),
                timer => now.push(timer),
            }
        }
        self.apply_now(now);
    }

    fn apply_now(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(id, data) => self.send(id, data, false),
                Effect::Close(id) => {
                    if self.conns.get(&id).is_some_and(|c| !c.side)
                        && let Some(conn) = self.remove_conn(id)
                    {
                        conn.outbox.close();
                        self.closing.push_back(id);
                    }
                }
                Effect::SetTimer(token, delay) => self.set_timer(token, delay),
                Effect::CancelTimer(token) => {
                    if let Some(key) = self.timer_keys.remove(&token) {
                        self.timers.remove(&key);
                    }
                }
            }
        }
    }

    /// Sends `data` on `id` for the old (`side` false) or new version; a
    /// version cannot send on the other's connections.
    fn send(&mut self, id: u64, data: Vec<u8>, side: bool) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        if conn.side != side {
            return;
        }
        if let Err(overflow) = conn.outbox.send(data) {
            tracing::warn!(
                service = &*self.spec.name,
                conn = id,
                peer = conn.info.peer,
                "closing connection: {overflow}"
            );
            let conn = self.remove_conn(id).expect("present");
            conn.outbox.abort();
            match side {
                true => self.side.as_mut().expect("side").closing.push_back(id),
                false => self.closing.push_back(id),
            }
        }
    }

    /// The ids of the connections the old version (`side` false) or a
    /// drain or canary's new version serves, in increasing order.
    fn conn_ids(&self, side: bool) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.side == side)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Removes a connection from the table, keeping a drain or canary's
    /// count of its new version's connections.
    fn remove_conn(&mut self, id: u64) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        if conn.side
            && let Some(side) = &mut self.side
        {
            side.conns -= 1;
        }
        Some(conn)
    }

    fn set_timer(&mut self, token: u64, delay: std::time::Duration) {
        if let Some(key) = self.timer_keys.get(&token) {
            self.timers.reset(key, delay);
        } else if self.timer_keys.len() >= MAX_TIMERS {
            tracing::warn!(
                service = &*self.spec.name,
                token,
                "set-timer refused: {MAX_TIMERS} timers already armed"
            );
        } else {
            let key = self.timers.insert((token, false), delay);
            self.timer_keys.insert(token, key);
        }
    }

    /// Shutdown: close every connection after its output is flushed and
    /// tell the service.
    async fn close_all(&mut self) -> Result<()> {
        let mut ids: Vec<u64> = self.conns.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(conn) = self.remove_conn(id) {
                conn.outbox.close();
                match conn.side {
                    true => self.deliver_side(Call::Close(id)).await?,
                    false => self.deliver(Call::Close(id)).await?,
                }
            }
        }
        Ok(())
    }
}
