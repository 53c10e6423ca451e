//! Keeping a guest's state through traps: every event the instance handles
//! is recorded in the journal (`crate::durable`), snapshots are taken at
//! update points, and a trap rebuilds the state in a new instance of the
//! same component (same key): the snapshot's import (or `init`), then the
//! journal replayed with each event's recorded stamp and its effects
//! discarded (they already happened). The event that trapped is not in the
//! journal: its connection is closed (its input may be poison; `on-close`
//! is delivered) or its timer dropped.
//!
//! A rebuild uses the new half of the one transfer mechanism
//! ([`super::transfer::import`]) and a snapshot its old half
//! ([`super::transfer::export`]), as swaps and upgrades do.
//!
//! Traps in a row with no event served between them count against the
//! restart budget (`--restart-budget`, default 5): past it, or when even a
//! fresh start fails, the service is stopped (every connection closed, new
//! ones closed at once, `status` says why) instead of spinning. Swapping in
//! a fixed version with `swap --fresh` serves again.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::report::micros;
use super::transfer::{Exported, SwapKind, Timings, Validation, import, negotiate, root};
use super::{Actor, Instance, start_fresh};
use crate::bindings::ConnInfo;
use crate::durable::journal::{self, EventRef};
use crate::durable::{Base, Begin, Journal, fail_at};

/// One event for the guest.
#[derive(Clone, Copy)]
pub(super) enum Call<'a> {
    Connect(&'a ConnInfo),
    Data(u64, &'a [u8]),
    Close(u64),
    Timer(u64),
}

impl<'a> Call<'a> {
    /// The call that delivers a journaled event; `info` holds the
    /// connection's details for a connect.
    pub(super) fn of(event: &'a journal::Event, info: &'a mut Option<ConnInfo>) -> Call<'a> {
        match event {
            journal::Event::Connect {
                conn,
                listener,
                peer,
            } => Call::Connect(info.insert(ConnInfo {
                id: *conn,
                listener: listener.clone(),
                peer: peer.clone(),
            })),
            journal::Event::Data(id, data) => Call::Data(*id, data),
            journal::Event::Close(id) => Call::Close(*id),
            journal::Event::Timer(token) => Call::Timer(*token),
        }
    }

    pub(super) async fn run(self, instance: &mut Instance) -> Result<()> {
        match self {
            Call::Connect(info) => instance.on_connect(info).await,
            Call::Data(id, data) => instance.on_data(id, data).await,
            Call::Close(id) => instance.on_close(id).await,
            Call::Timer(token) => instance.on_timer(token).await,
        }
    }

    pub(super) fn journal(&self) -> EventRef<'_> {
        match *self {
            Call::Connect(info) => EventRef::Connect {
                conn: info.id,
                listener: &info.listener,
                peer: &info.peer,
            },
            Call::Data(id, data) => EventRef::Data(id, data),
            Call::Close(id) => EventRef::Close(id),
            Call::Timer(token) => EventRef::Timer(token),
        }
    }

    /// For messages: `on-data(conn 7)`.
    pub(super) fn describe(&self) -> String {
        match *self {
            Call::Connect(info) => format!("on-connect(conn {})", info.id),
            Call::Data(id, _) => format!("on-data(conn {id})"),
            Call::Close(id) => format!("on-close(conn {id})"),
            Call::Timer(token) => format!("on-timer({token})"),
        }
    }

    /// The connection whose event trapped: closed after the recovery.
    fn culprit(&self) -> Option<u64> {
        match *self {
            Call::Connect(info) => Some(info.id),
            Call::Data(id, _) => Some(id),
            Call::Close(_) | Call::Timer(_) => None,
        }
    }
}

/// How the service came back from a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Recovered {
    /// Rebuilt from the snapshot and the journal: the state is kept.
    Rebuilt,
    /// Started fresh with `init`: the state is lost.
    Fresh,
    /// Stopped: the restart budget is spent or even a fresh start failed.
    Stopped,
}

/// Snapshots and recoveries, for `status`.
#[derive(Default, Debug, Clone)]
pub(super) struct DurableStats {
    pub snapshots: u64,
    pub snapshot_failures: u64,
    pub last_snapshot_pause: Duration,
    pub max_snapshot_pause: Duration,
    pub last_snapshot_error: Option<String>,
    pub last_recovery: Duration,
    /// Traps since the last event served.
    pub trap_streak: u32,
    /// No snapshot before the journal holds this many events (after a
    /// failed one: retrying at every event would spin).
    pub snapshot_hold: u64,
    /// Why there is no journal (`None` while there is one).
    pub journal_off: Option<String>,
}

/// The durable-state part of `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DurableStatus {
    /// `on`, or `off: <why>`.
    pub journal: String,
    pub journal_events: u64,
    pub journal_bytes: usize,
    /// The format and size of the state a rebuild starts from (`init`
    /// when no snapshot was taken since the last fresh start).
    pub snapshot_format: String,
    pub snapshot_bytes: usize,
    /// Seconds since the last snapshot (or fresh start).
    pub snapshot_age_s: f64,
    /// Snapshots taken by this process (thresholds and `wasmhost snapshot`).
    pub snapshots: u64,
    pub snapshot_failures: u64,
    pub last_snapshot_pause_us: u64,
    pub max_snapshot_pause_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot_error: Option<String>,
    /// Traps rebuilt from the snapshot and journal (state kept).
    pub recoveries: u64,
    pub last_recovery_us: u64,
    /// Set when the service was stopped (restart budget spent): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// `--state-dir`, if any, with its `--fsync` mode and the number of the
    /// last snapshot written there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<StateDirStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StateDirStatus {
    pub path: String,
    pub fsync: String,
    pub snapshot: u64,
    /// Journal bytes written there since that snapshot.
    pub journal_bytes: usize,
}

/// What `wasmhost snapshot` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotReport {
    pub service: String,
    pub format: String,
    pub state_bytes: usize,
    /// Journal events and bytes the snapshot replaced.
    pub journal_events: u64,
    pub journal_bytes: usize,
    pub pause_us: u64,
    pub export_us: u64,
}

/// The base of an instance that just ran `init`.
pub(super) fn base_after_init(instance: &Instance) -> Base {
    Base {
        key: instance.key(),
        born: instance.born(),
        start: Begin::Init(instance.stamp()),
    }
}

/// The base of an instance that just imported (or exported) `state`.
pub fn base_of_state(instance: &Instance, format: String, state: Bytes) -> Base {
    Base {
        key: instance.key(),
        born: instance.born(),
        start: Begin::Snapshot {
            format,
            state,
            stamp: instance.stamp(),
        },
    }
}

impl Actor {
    /// Delivers one event, carries out its effects, delivers `on-close` for
    /// the connections they closed, and takes a snapshot if one is due.
    pub(super) async fn deliver(&mut self, call: Call<'_>) -> Result<()> {
        self.call_once(call).await?;
        self.deliver_closes().await?;
        self.snapshot_if_due().await
    }

    /// Delivers `on-close` for the connections that effects closed.
    pub(super) async fn deliver_closes(&mut self) -> Result<()> {
        loop {
            if let Some(id) = self.closing.pop_front() {
                self.call_once(Call::Close(id)).await?;
            } else if let Some(id) = self.side.as_mut().and_then(|s| s.closing.pop_front()) {
                self.call_side_once(Call::Close(id)).await?;
            } else {
                return Ok(());
            }
        }
    }

    async fn call_once(&mut self, call: Call<'_>) -> Result<()> {
        if self.stopped.is_some() {
            return Ok(());
        }
        self.stats.events += 1;
        match call.run(&mut self.instance).await {
            Ok(()) => {
                self.durable.trap_streak = 0;
                let stamp = self.instance.stamp();
                let effects = self.instance.take_effects();
                let record = self
                    .journal
                    .as_mut()
                    .map(|journal| journal.record(stamp, call.journal()));
                if let Some(shadow) = &mut self.shadow {
                    shadow.mirror(stamp, call.journal(), record, &effects);
                }
                self.apply(effects);
            }
            Err(trap) => {
                let what = call.describe();
                self.recover(trap, &what).await?;
                if let Some(id) = call.culprit() {
                    self.close_culprit(id);
                }
            }
        }
        Ok(())
    }

    /// Closes the connection whose event trapped (after what the service
    /// sent it before is written); `on-close` follows.
    fn close_culprit(&mut self, id: u64) {
        if let Some(conn) = self.remove_conn(id) {
            tracing::warn!(
                service = &*self.spec.name,
                conn = id,
                peer = conn.info.peer,
                "closing the connection whose event made the guest trap"
            );
            conn.outbox.close();
            if self.stopped.is_none() {
                self.closing.push_back(id);
            }
        }
    }

    /// A trapped instance cannot be re-entered: rebuild its state in a new
    /// instance from the snapshot and the journal, or start it fresh when
    /// there is no journal (or the rebuild fails), or stop the service when
    /// the restart budget is spent. The trapped call's effects are dropped
    /// with the instance; connections and timers are kept.
    pub(super) async fn recover(&mut self, trap: anyhow::Error, what: &str) -> Result<Recovered> {
        self.stats.traps += 1;
        self.durable.trap_streak += 1;
        let name = self.spec.name.clone();
        let component = self.instance.program.path.display().to_string();
        let budget = self.spec.durable.restart_budget;
        if self.durable.trap_streak > budget {
            tracing::error!(
                service = &*name,
                component,
                "guest trapped in {what}: {trap:#}"
            );
            self.stop(format!(
                "the guest trapped {} times in a row with no event served in between \
                 (--restart-budget {budget}); last in {what}: {}",
                self.durable.trap_streak,
                root(&trap)
            ));
            return Ok(Recovered::Stopped);
        }
        if self.journal.is_none() {
            tracing::error!(
                service = &*name,
                component,
                "guest trapped in {what}; restarting it with fresh state ({}): {trap:#}",
                self.durable.journal_off.as_deref().unwrap_or("no journal")
            );
            return self.restart_fresh().await;
        }
        tracing::error!(
            service = &*name,
            component,
            "guest trapped in {what}; rebuilding its state from the last snapshot and the journal: {trap:#}"
        );
        let started = Instant::now();
        match self.rebuild().await {
            Ok((instance, events)) => {
                let trapped = std::mem::replace(&mut self.instance, instance);
                super::swap::reap(Box::new(trapped));
                self.durable.last_recovery = started.elapsed();
                self.stats.recoveries += 1;
                tracing::info!(
                    service = &*name,
                    "state rebuilt in {:?}: snapshot of {} bytes plus {events} journaled events replayed",
                    started.elapsed(),
                    self.journal.as_ref().map_or(0, |j| j.base.state_bytes()),
                );
                Ok(Recovered::Rebuilt)
            }
            Err(e) => {
                tracing::error!(
                    service = &*name,
                    "rebuilding the state failed: {e:#}; starting the service fresh (its state is lost)"
                );
                self.restart_fresh().await
            }
        }
    }

    /// A new instance of the running component with the trapped one's state:
    /// its base, then the journal replayed with effects discarded. Returns
    /// it with the number of events replayed.
    async fn rebuild(&mut self) -> Result<(Instance, usize)> {
        if let Some(why) = fail_at("rebuild") {
            bail!(why);
        }
        let journal = self.journal.as_ref().expect("rebuild needs a journal");
        let mut records = Vec::new();
        for chunk in journal.chunks() {
            let (read, stop) = journal::read(chunk);
            if let Some(stop) = stop {
                bail!("the journal does not read back: {stop:?}");
            }
            records.extend(read);
        }
        let program = self.instance.program.clone();
        let new = replay(program, &self.spec, &journal.base, &records, |_, _| Ok(())).await?;
        new.advance_past(self.instance.stamp());
        Ok((new, records.len()))
    }

    /// Starts the component fresh (`init`, then `on-connect` for every open
    /// connection); the state is lost. Stops the service if even that fails.
    async fn restart_fresh(&mut self) -> Result<Recovered> {
        let started = Instant::now();
        let program = self.instance.program.clone();
        let mut instance = match start_fresh(program, &self.spec).await {
            Ok(instance) => instance,
            Err(e) => {
                self.stop(format!("restarting it fresh failed: {e:#}"));
                return Ok(Recovered::Stopped);
            }
        };
        let base = base_after_init(&instance);
        let mut connects = Vec::new();
        // Its own connections (not a drain or canary's new version's).
        let ids = self.conn_ids(false);
        for id in ids {
            let info = self.conns[&id].info.clone();
            if let Err(trap) = instance.on_connect(&info).await {
                self.stop(format!(
                    "the freshly started service trapped again in on-connect(conn {id}): {}",
                    root(&trap)
                ));
                return Ok(Recovered::Stopped);
            }
            connects.push((instance.stamp(), info));
        }
        let trapped = std::mem::replace(&mut self.instance, instance);
        super::swap::reap(Box::new(trapped));
        self.apply_effects();
        self.end_shadow(
            "stopped",
            "the running version trapped and restarted fresh: its state was lost, so the \
             shadow's no longer follows it"
                .into(),
        );
        if let Some(journal) = &mut self.journal {
            reset_to(journal, base, &connects);
            self.persist_base(connects.is_empty(), false);
        }
        tracing::info!(
            service = &*self.spec.name,
            "service restarted with fresh state in {:?}",
            started.elapsed()
        );
        Ok(Recovered::Fresh)
    }

    /// Stops serving: every connection is closed (after what was sent to
    /// it is written), new ones are closed at once, timers are dropped.
    /// `status` says why; `swap --fresh` with a fixed version serves again.
    pub(super) fn stop(&mut self, why: String) {
        tracing::error!(
            service = &*self.spec.name,
            "service stopped: {why}. It no longer serves: its connections are closed and new ones \
             are closed at once. Swap in a fixed version with `wasmhost swap --fresh FILE`, or \
             restart the host"
        );
        self.end_shadow("stopped", format!("the running version stopped: {why}"));
        if let Some(side) = self.side.take() {
            super::swap::reap(Box::new(side));
        }
        for (_, conn) in self.conns.drain() {
            conn.outbox.close();
        }
        self.closing.clear();
        self.timers.clear();
        self.timer_keys.clear();
        self.journal = None;
        self.durable.journal_off = Some("the service is stopped".into());
        self.stopped = Some(why);
        self.drop_held();
    }

    /// After a new instance became live (start, swap, upgrade): decides
    /// whether its events are journaled (a guest whose `exportable()` is
    /// empty is stateless; one that cannot import its own export cannot be
    /// snapshotted) and starts the journal at `base`. `preloaded`: records
    /// found on disk after `base`; `resume`: the state dir goes on with its
    /// journal instead of a new snapshot.
    pub(super) async fn start_journal(
        &mut self,
        base: Base,
        connects: &[(super::Stamp, ConnInfo)],
        preloaded: Option<(Vec<u8>, u64)>,
        resume: bool,
    ) {
        self.journal = None;
        self.durable.snapshot_hold = 0;
        let off = match journal_formats(&mut self.instance, &self.spec.durable).await {
            Ok(formats) => {
                self.own_formats = formats;
                None
            }
            Err(why) => Some(why),
        };
        if let Some(why) = &off {
            tracing::info!(service = &*self.spec.name, "no journal: {why}");
            if self.disk.is_some() {
                tracing::warn!(
                    service = &*self.spec.name,
                    "--state-dir keeps nothing for this component ({why}): a crash loses its state"
                );
            }
        } else {
            let mut journal = match preloaded {
                Some((bytes, events)) => Journal::resume(base, bytes, events),
                None => Journal::new(base),
            };
            reset_to_connects(&mut journal, connects);
            self.journal = Some(journal);
        }
        self.durable.journal_off = off;
        if !resume {
            self.persist_base(connects.is_empty(), false);
        }
    }

    async fn snapshot_if_due(&mut self) -> Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if journal.events() < self.durable.snapshot_hold {
            return Ok(());
        }
        let Some(reason) = journal.due(&self.spec.durable) else {
            return Ok(());
        };
        if let Err(why) = self.snapshot(reason).await? {
            let journal = self.journal.as_mut();
            let events = journal.as_ref().map_or(0, |j| j.events());
            // Try again once the journal has grown as much again.
            self.durable.snapshot_hold = events + events.max(1024);
            tracing::warn!(
                service = &*self.spec.name,
                "snapshot ({reason}) failed: {why}; the journal keeps growing ({events} events) and \
                 the snapshot is retried later"
            );
            self.limit_journal();
        }
        Ok(())
    }

    /// A journal that grows past eight times `--snapshot-bytes` because
    /// snapshots keep failing is dropped: memory is bounded, and traps then
    /// restart the service fresh.
    fn limit_journal(&mut self) {
        let limit = self.spec.durable.snapshot_bytes.saturating_mul(8);
        if let Some(journal) = &self.journal
            && journal.len_bytes() > limit
        {
            let why = format!(
                "the journal passed {limit} bytes (8 x --snapshot-bytes) and snapshots keep \
                 failing ({}); journaling stopped, a trap now restarts the service fresh",
                self.durable
                    .last_snapshot_error
                    .as_deref()
                    .unwrap_or("unknown error")
            );
            if self.disk.is_some() {
                // Without a journal nothing more could be made durable.
                self.stop(format!("{why}; with --state-dir that stops the service"));
                return;
            }
            tracing::error!(service = &*self.spec.name, "{why}");
            self.journal = None;
            self.durable.journal_off = Some(why);
        }
    }

    /// Takes a snapshot now: the running instance exports its state in the
    /// first format it imports itself, and the journal starts again from it.
    /// The outer error is fatal for the service; the inner one says why no
    /// snapshot was taken (the service serves on).
    pub(super) async fn snapshot(
        &mut self,
        reason: &str,
    ) -> Result<Result<SnapshotReport, String>> {
        let Some(journal) = &self.journal else {
            let why = self.durable.journal_off.as_deref().unwrap_or("no journal");
            return Ok(Err(format!("no snapshot: {why}")));
        };
        let (journal_events, journal_bytes) = (journal.events(), journal.len_bytes());
        let started = Instant::now();
        let formats = self.own_formats.clone();
        let mut t = Timings::default();
        let exported = match fail_at("snapshot-export") {
            Some(why) => Ok(Err(why)),
            None => self.export_for(&formats, SwapKind::Snapshot, &mut t).await,
        };
        let Exported { format, state } = match exported? {
            Ok(exported) => exported,
            Err(why) => {
                self.durable.snapshot_failures += 1;
                self.durable.last_snapshot_error = Some(why.clone());
                return Ok(Err(why));
            }
        };
        let state_bytes = state.len();
        let base = base_of_state(&self.instance, format.clone(), Bytes::from(state));
        self.seal_journal();
        if let Some(journal) = &mut self.journal {
            let old = std::mem::replace(&mut journal.base, base.clone());
            journal.reset(base);
            super::swap::reap(Box::new(old));
        }
        self.persist_base(true, true);
        let pause = started.elapsed();
        let d = &mut self.durable;
        d.snapshots += 1;
        d.last_snapshot_pause = pause;
        d.max_snapshot_pause = d.max_snapshot_pause.max(pause);
        d.last_snapshot_error = None;
        d.snapshot_hold = 0;
        tracing::debug!(
            service = &*self.spec.name,
            "snapshot ({reason}): {state_bytes} bytes of {format} in {pause:?}, replacing {journal_events} journaled events"
        );
        Ok(Ok(SnapshotReport {
            service: self.spec.name.to_string(),
            format,
            state_bytes,
            journal_events,
            journal_bytes,
            pause_us: micros(pause),
            export_us: micros(t.export),
        }))
    }

    /// The durable-state part of `status`.
    pub(super) fn durable_status(&self) -> DurableStatus {
        let d = &self.durable;
        let (journal, events, bytes, format, state_bytes, age) = match &self.journal {
            Some(j) => (
                "on".to_string(),
                j.events(),
                j.len_bytes(),
                match &j.base.start {
                    Begin::Init(_) => "init".to_string(),
                    Begin::Snapshot { format, .. } => format.clone(),
                },
                j.base.state_bytes(),
                j.age().as_secs_f64(),
            ),
            None => (
                format!("off: {}", d.journal_off.as_deref().unwrap_or("unknown")),
                0,
                0,
                String::new(),
                0,
                0.0,
            ),
        };
        DurableStatus {
            journal,
            journal_events: events,
            journal_bytes: bytes,
            snapshot_format: format,
            snapshot_bytes: state_bytes,
            snapshot_age_s: age,
            snapshots: d.snapshots,
            snapshot_failures: d.snapshot_failures,
            last_snapshot_pause_us: micros(d.last_snapshot_pause),
            max_snapshot_pause_us: micros(d.max_snapshot_pause),
            last_snapshot_error: d.last_snapshot_error.clone(),
            recoveries: self.stats.recoveries,
            last_recovery_us: micros(d.last_recovery),
            stopped: self.stopped.clone(),
            state_dir: self.state_dir_status(),
        }
    }
}

/// The formats `instance`'s component imports, if it can import its own
/// export (a snapshot is in the first of them it exports); otherwise why it
/// gets no journal.
pub(super) async fn journal_formats(
    instance: &mut Instance,
    policy: &crate::durable::Policy,
) -> Result<Vec<String>, String> {
    if !policy.journal {
        return Err("off (--journal off): a trap restarts the service fresh".into());
    }
    let exportable = match instance.exportable().await {
        Ok(formats) => formats,
        Err(trap) => return Err(format!("exportable() trapped: {}", root(&trap))),
    };
    if exportable.is_empty() {
        return Err("the service is stateless (its exportable() is empty)".into());
    }
    let importable = match instance.importable().await {
        Ok(formats) => formats,
        Err(trap) => return Err(format!("importable() trapped: {}", root(&trap))),
    };
    if negotiate(&importable, &exportable).is_none() {
        return Err(format!(
            "the component imports [{}] but exports [{}]: it cannot import its own state, so \
             no snapshot can be taken and a trap restarts it fresh",
            importable.join(", "),
            exportable.join(", ")
        ));
    }
    Ok(importable)
}

/// A new instance of `program` brought to the state after `records`: the
/// base's instantiation with its key, its `init` or snapshot import, then
/// every record replayed with its stamp. Each record's effects go to
/// `effects` (a trap recovery drops them: they already happened; a restart
/// from a state dir rebuilds its timers from them); an error from it ends
/// the replay (a shadow that was aborted while catching up).
pub(super) async fn replay(
    program: std::sync::Arc<super::Program>,
    spec: &super::ServiceSpec,
    base: &Base,
    records: &[journal::Record],
    mut effects: impl FnMut(&journal::Record, Vec<super::Effect>) -> Result<()>,
) -> Result<Instance> {
    let (name, limits) = (spec.name.clone(), &spec.limits);
    let mut new = Instance::rebuild(program, name, limits, base.key, base.born).await?;
    match &base.start {
        Begin::Init(stamp) => {
            new.pin(Some(*stamp));
            match new.init(&spec.config).await {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => bail!("init returned an error: {msg}"),
                Err(trap) => return Err(trap.context("init trapped")),
            }
        }
        Begin::Snapshot {
            format,
            state,
            stamp,
        } => {
            new.pin(Some(*stamp));
            let mut t = Timings::default();
            import(&mut new, format, state, Validation::None, &mut t)
                .await
                .map_err(anyhow::Error::msg)?;
        }
    }
    new.take_effects(); // they already happened
    for (i, record) in records.iter().enumerate() {
        new.pin(Some(record.stamp));
        let mut info = None;
        let call = Call::of(&record.event, &mut info);
        call.run(&mut new).await.with_context(|| {
            format!(
                "replaying journaled event {} of {} ({}) trapped",
                i + 1,
                records.len(),
                call.describe()
            )
        })?;
        effects(record, new.take_effects())?;
    }
    new.pin(None);
    Ok(new)
}

/// What a restart from a state dir rebuilt.
pub struct Restored {
    pub instance: Instance,
    pub base: Base,
    /// The journal's records (after `base`) and how many.
    pub journal: (Vec<u8>, u64),
    /// Timers armed at the crash, with the time left.
    pub timers: Vec<super::TimerImage>,
    /// Connections open at the crash (each gets `on-close`).
    pub closes: Vec<u64>,
    /// The next connection id (above every id the state knows).
    pub next_conn_id: u64,
}

/// Rebuilds a service from what a state dir holds: the snapshot's base,
/// then its journal replayed; the timers and the connections open at the
/// crash are worked out from the snapshot's header and the records.
pub async fn restore(
    program: std::sync::Arc<super::Program>,
    spec: &super::ServiceSpec,
    loaded: crate::durable::disk::Loaded,
) -> Result<Restored> {
    Ok(Replica::load(program, spec, loaded).await?.into_restored())
}

/// Where the timers and the connections stand after a replay: worked out
/// from a snapshot's header and every record's event and effects.
struct Tracking {
    /// Armed timers: token and deadline (Unix ms).
    timers: std::collections::BTreeMap<u64, u64>,
    open: std::collections::BTreeSet<u64>,
    next_conn_id: u64,
}

impl Tracking {
    fn of(header: &crate::durable::disk::SnapshotHeader) -> Tracking {
        Tracking {
            timers: header.timers.iter().copied().collect(),
            open: header.conns.iter().map(|c| c.0).collect(),
            next_conn_id: header.next_conn_id,
        }
    }

    fn record(&mut self, record: &journal::Record, effects: Vec<super::Effect>) {
        let at_ms = record.stamp.wall_ns / 1_000_000;
        match &record.event {
            journal::Event::Connect { conn, .. } => {
                self.open.insert(*conn);
                self.next_conn_id = self.next_conn_id.max(conn + 1);
            }
            journal::Event::Close(conn) => {
                self.open.remove(conn);
            }
            journal::Event::Timer(token) => {
                self.timers.remove(token);
            }
            journal::Event::Data(..) => {}
        }
        for effect in effects {
            match effect {
                super::Effect::SetTimer(token, delay) => {
                    self.timers.insert(token, at_ms + delay.as_millis() as u64);
                }
                super::Effect::CancelTimer(token) => {
                    self.timers.remove(&token);
                }
                super::Effect::Close(conn) => {
                    self.open.remove(&conn);
                }
                super::Effect::Send(..) => {}
            }
        }
    }

    /// The timers with the time left now.
    fn timer_images(&self) -> Vec<super::TimerImage> {
        let now_ms = super::unix_ms(std::time::SystemTime::now());
        self.timers
            .iter()
            .map(|(&token, &deadline)| super::TimerImage {
                token,
                remaining_ms: deadline.saturating_sub(now_ms),
            })
            .collect()
    }
}

/// A service rebuilt from a state dir and kept current as its journal
/// grows: a warm standby's copy (`crate::standby`), replayed continuously
/// with its effects discarded, so a promotion needs no replay.
pub struct Replica {
    pub program: std::sync::Arc<super::Program>,
    instance: Instance,
    base: Base,
    /// The records after `base` (the bytes as on disk), and how many.
    journal: Vec<u8>,
    events: u64,
    tracking: Tracking,
    /// The snapshot it was loaded from, and the journal and length its
    /// records reach.
    pub snapshot: u64,
    pub reached: (u64, u64),
}

impl Replica {
    /// Rebuilds the state `loaded` holds, as a restart does.
    pub async fn load(
        program: std::sync::Arc<super::Program>,
        spec: &super::ServiceSpec,
        loaded: crate::durable::disk::Loaded,
    ) -> Result<Replica> {
        let crate::durable::disk::Loaded {
            number,
            last_journal,
            header,
            state,
            records,
            journal,
            ..
        } = loaded;
        if header.component != program.hash {
            tracing::warn!(
                "the state dir was written by component {} and is restored into {} ({}): the \
                 snapshot's format must be one it imports, and its journal is replayed through it",
                &header.component[..12.min(header.component.len())],
                program.short_hash(),
                program.path.display()
            );
        }
        let base = header.base(state)?;
        let mut tracking = Tracking::of(&header);
        let instance = replay(program.clone(), spec, &base, &records, |record, effects| {
            tracking.record(record, effects);
            Ok(())
        })
        .await
        .context("replaying the state dir's journal")?;
        Ok(Replica {
            program,
            instance,
            base,
            journal,
            events: records.len() as u64,
            tracking,
            snapshot: number,
            reached: last_journal,
        })
    }

    /// Applies a batch of records written to journal `n` at `offset`.
    /// The part a rebuild already read from the file (it ran after the
    /// batch was written) is skipped; a gap is an error.
    pub async fn apply(&mut self, n: u64, offset: u64, bytes: &[u8]) -> Result<()> {
        // A rebuild that read a later journal read all of this one
        // (`disk::load` reads a journal whole once a newer one exists).
        if n < self.reached.0 {
            return Ok(());
        }
        if n > self.reached.0 {
            bail!(
                "records for journal {n}, and the copy reaches journal {}",
                self.reached.0
            );
        }
        let end = offset + bytes.len() as u64;
        if end <= self.reached.1 {
            return Ok(());
        }
        if offset > self.reached.1 {
            bail!(
                "records from byte {offset} of journal {n}, and the copy reaches byte {}",
                self.reached.1
            );
        }
        let bytes = &bytes[(self.reached.1 - offset) as usize..];
        let (records, stop) = journal::read(bytes);
        if let Some(stop) = stop {
            bail!("a batch that does not read whole ({stop:?})");
        }
        for record in &records {
            self.instance.pin(Some(record.stamp));
            let mut info = None;
            let call = Call::of(&record.event, &mut info);
            let ran = call.run(&mut self.instance).await;
            let described = call.describe();
            ran.with_context(|| format!("replaying {described} trapped"))?;
            let effects = self.instance.take_effects();
            self.tracking.record(record, effects);
        }
        self.instance.pin(None);
        self.journal.extend_from_slice(bytes);
        self.events += records.len() as u64;
        self.reached.1 += bytes.len() as u64;
        Ok(())
    }

    /// Journal `n` starts, empty (the state goes on in it), unless a
    /// rebuild already read it.
    pub fn journal_started(&mut self, n: u64) {
        if self.reached.0 < n {
            self.reached = (n, 0);
        }
    }

    /// What a restart from the same files would have rebuilt.
    pub fn into_restored(self) -> Restored {
        Restored {
            timers: self.tracking.timer_images(),
            closes: self.tracking.open.into_iter().collect(),
            next_conn_id: self.tracking.next_conn_id,
            instance: self.instance,
            base: self.base,
            journal: (self.journal, self.events),
        }
    }
}

/// Starts `journal` again at `base`, followed by the `on-connect` events a
/// fresh start delivered.
fn reset_to(journal: &mut Journal, base: Base, connects: &[(super::Stamp, ConnInfo)]) {
    let old = std::mem::replace(&mut journal.base, base.clone());
    journal.reset(base);
    super::swap::reap(Box::new(old));
    reset_to_connects(journal, connects);
}

fn reset_to_connects(journal: &mut Journal, connects: &[(super::Stamp, ConnInfo)]) {
    for (stamp, info) in connects {
        journal.record(*stamp, Call::Connect(info).journal());
    }
}
