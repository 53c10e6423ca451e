//! Shadow swaps: the new version runs beside the live one on the same
//! events, with the same clocks and random bytes, and what it would have
//! sent is compared with what the live version sent. Once it has kept up
//! and agreed, it takes over between two events: the pause is a pointer
//! switch plus the few events still queued for it, whatever the state's
//! size, and the new version has already met live traffic.
//!
//! # Phases
//!
//! ```text
//! prepare ─> sync ─> catch up ─> in step ─┬─> commit ─> the new version is live
//!                                         └─> abort ──> the old version only
//! any phase after prepare ─> stopped (why: divergence, trap, too slow, ...)
//! ```
//!
//! * **prepare** (control task, off the actor; as every swap): compile,
//!   instantiate, `importable()`.
//! * **sync** (actor, at an update point): how the shadow gets the state,
//!   first that applies:
//!   - `fresh`: the live version is stateless (`exportable()` empty): the
//!     shadow gets `init` and `on-connect` for every open connection;
//!   - `journal`: the live journal's base is `init` or a snapshot in a
//!     format the new version imports: the journal is shared (its chunks
//!     are frozen, not copied), so there is no pause;
//!   - `export`: otherwise the live version exports its state in the first
//!     format the new one imports ([`transfer::export`](super::transfer::export)):
//!     a pause as long as that export.
//!
//!   The live timer table is copied. From here on every event the live
//!   version handles is queued for the shadow with its stamp and its
//!   output, in batches (one wake-up of the shadow's thread per batch).
//! * **catch up** (the shadow's own thread and store): the instance is
//!   built by [`replay`] (the function that rebuilds a trapped guest):
//!   instantiated with the live instance's key, `init` or `import-state`
//!   of the base, then the journal's records with their stamps, effects
//!   discarded. Then the queued events.
//! * **in step**: the shadow found its queue empty once after catching up.
//!   Each mirrored event is delivered with the live event's stamp; its
//!   sends and closes are compared per connection with the live version's
//!   (a different order of the same bytes to different connections is no
//!   divergence); its timer calls update its own copy of the timer table
//!   and are compared (a difference is counted, not a divergence). The
//!   shadow keeps its own journal (the shared one plus what it handled)
//!   and takes its own snapshots on its thread, so after the commit a
//!   trap still rebuilds the state.
//! * **commit** (actor, at an update point): the queued events are handed
//!   over, the actor waits for the shadow to handle them and give back its
//!   instance, journal and timers, and switches (the swap's own
//!   `commit`). The timer table is replaced only when the shadow's timer
//!   calls ever differed. The old instance is dropped off the pause.
//! * **abort**: the shadow's queue is closed; its thread drops it (a
//!   catch-up in progress ends within 1,024 replayed events).
//!
//! # What fails where
//!
//! | phase | failure | what happens |
//! |---|---|---|
//! | prepare | not a component, instantiation, `importable()` | `swap` fails; nothing started |
//! | sync | no format in common, export refused, a shadow already running | `swap` fails with the reason; the live version serves on |
//! | sync | the live version traps exporting | recovered as any trap (state rebuilt); `swap` fails |
//! | catch up | `init`, `import-state` or a replayed event fails or traps | the shadow stops with the reason |
//! | in step | different bytes sent, or different closes | the shadow stops with the event and both outputs, unless `--allow-divergence` (counted, the first few kept) |
//! | in step | the shadow traps or overruns its deadline (in its thread's CPU time: it may wait for idle CPU mid-call) | the shadow stops with the reason |
//! | in step | an event waited longer than `--max-lag-ms`, or 256 MiB queued | the shadow stops ("too slow to keep up") |
//! | any | the live version restarts fresh or stops | the shadow stops: its state no longer follows the live one |
//! | commit | the shadow stopped | commit refused with the reason; nothing changes |
//! | commit | the shadow does not hand over within 2 s | commit refused; the shadow runs on |
//!
//! The live version never waits for the shadow except in the commit, and
//! a shadow that stops has no effect on it. `WASMHOST_TEST_SHADOW_FAIL`
//! names a step to fail on purpose in tests: `sync` (refused at the update
//! point), `catch-up` (the replay fails) or `commit` (the shadow does not
//! hand over).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::recovery::{Call, base_of_state, journal_formats, replay};
use super::report::{ComponentInfo, SwapRecord, SwapReport, micros, unix_ms};
use super::state::Effect;
use super::swap::{Prepared, reap};
use super::transfer::{Exported, Pause, SwapKind, Timings, export, root};
use super::{Actor, Instance, Program, ServiceSpec, TimerImage};
use crate::durable::journal::{self, EventRef};
use crate::durable::{Base, Begin, Journal};

/// How long a commit waits for the shadow to handle its queued events.
const COMMIT_WAIT: Duration = Duration::from_secs(2);

/// Events a shadow may be behind when the commit's pause begins (it
/// includes handling them): `wasmhost commit` waits, serving, for fewer.
const COMMIT_BEHIND: u64 = 32;

/// ... and at most this many on its last attempt, else it is refused.
const COMMIT_MAX_BEHIND: u64 = 1_000;

/// Bytes queued for the shadow past which it is stopped as too slow,
/// whatever `--max-lag-ms` says: memory stays bounded.
const MAX_QUEUED_BYTES: u64 = 256 << 20;

/// A batch goes to the shadow when it holds this many events or bytes, or
/// its first event is this old: waking the shadow's thread for every
/// event would cost the live version (a system call) and the machine (a
/// context switch) more than the shadow's own work.
const BATCH_EVENTS: usize = 256;
const BATCH_BYTES: usize = 256 << 10;
const BATCH_AGE: Duration = Duration::from_millis(1);

/// Divergences kept for `status` with `--allow-divergence`.
const KEPT_DIVERGENCES: usize = 5;

/// Bytes of an output shown in a divergence.
const SHOWN_BYTES: usize = 200;

/// `swap --shadow`'s options.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShadowOptions {
    /// Count divergences instead of stopping at the first.
    #[serde(default)]
    pub allow_divergence: bool,
    /// The longest an event may wait for the shadow before it is stopped
    /// as too slow.
    #[serde(default = "default_max_lag_ms")]
    pub max_lag_ms: u64,
}

pub fn default_max_lag_ms() -> u64 {
    10_000
}

impl Default for ShadowOptions {
    fn default() -> Self {
        ShadowOptions {
            allow_divergence: false,
            max_lag_ms: default_max_lag_ms(),
        }
    }
}

/// A shadow swap, for `status` and the control commands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShadowStatus {
    pub component: ComponentInfo,
    /// `catching up`, `in step`, `stopped`, `committed` or `aborted`.
    pub state: String,
    /// How it got the state: `fresh`, `journal` or `export`.
    pub sync: String,
    /// The format of the state it started from (`init` for none).
    pub format: String,
    pub state_bytes: usize,
    /// The live version's pause at the sync (the export, if any).
    pub sync_pause_us: u64,
    /// Journaled events replayed while catching up, of how many.
    pub replayed: u64,
    pub to_replay: u64,
    /// Live events handled by the shadow and compared.
    pub mirrored: u64,
    /// Live events queued for it and not yet handled.
    pub lag_events: u64,
    pub divergences: u64,
    /// Events whose timer calls differed (not a divergence).
    pub timer_differences: u64,
    /// The first divergences (with `--allow-divergence`), or the one that
    /// stopped it.
    pub first_divergences: Vec<Divergence>,
    /// The shadow's linear memory.
    pub memory_bytes: usize,
    pub allow_divergence: bool,
    pub max_lag_ms: u64,
    /// Seconds since it was started.
    pub age_s: f64,
    /// Why it stopped, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// One event on which the two versions did not agree.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Divergence {
    /// Its number among the mirrored events, from 1.
    pub event: u64,
    /// The event, with its bytes: `on-data(conn 7) "PING\r\n"`.
    pub call: String,
    pub conn: u64,
    /// What the live version sent to `conn`, and what the shadow would
    /// have sent (escaped, cut at 200 bytes; `(closed)` when it closed it).
    pub live: String,
    pub shadow: String,
}

impl Divergence {
    pub fn describe(&self) -> String {
        format!(
            "mirrored event {} {}: the running version sent {} to conn {}, the new version would have sent {}",
            self.event, self.call, self.live, self.conn, self.shadow
        )
    }
}

/// What a live event did, as the shadow compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    /// `len` bytes, taken in order from the batch's `bytes`.
    Send(u64, u32),
    Close(u64),
    SetTimer(u64, Duration),
    CancelTimer(u64),
}

/// Live events on their way to the shadow: their journal records (the
/// same encoding), and each one's output.
#[derive(Default)]
struct Batch {
    records: Vec<u8>,
    events: usize,
    acts: Vec<Act>,
    /// Where each event's acts end in `acts`.
    ends: Vec<u32>,
    bytes: Vec<u8>,
    /// When its first event was added.
    since: Option<Instant>,
}

impl Batch {
    /// Adds one event: its journal `record` if the live version keeps one
    /// (copied, not encoded again), and its effects.
    fn push(
        &mut self,
        stamp: super::Stamp,
        event: EventRef<'_>,
        record: Option<&[u8]>,
        effects: &[Effect],
    ) {
        match record {
            Some(record) => self.records.extend_from_slice(record),
            None => journal::encode(&mut self.records, stamp, event),
        }
        self.events += 1;
        for effect in effects {
            let act = match effect {
                Effect::Send(conn, data) => {
                    self.bytes.extend_from_slice(data);
                    Act::Send(*conn, data.len() as u32)
                }
                Effect::Close(conn) => Act::Close(*conn),
                Effect::SetTimer(token, delay) => Act::SetTimer(*token, *delay),
                Effect::CancelTimer(token) => Act::CancelTimer(*token),
            };
            self.acts.push(act);
        }
        self.ends.push(self.acts.len() as u32);
        self.since.get_or_insert_with(Instant::now);
    }

    fn size(&self) -> usize {
        self.records.len() + self.bytes.len()
    }
}

enum ToShadow {
    Events(Batch),
    /// Hand over after the events before this.
    Commit(oneshot::Sender<Result<Box<Runner>, String>>),
}

/// Shared between the actor and the shadow's thread.
#[derive(Default)]
struct Shared {
    handled: AtomicU64,
    handled_bytes: AtomicU64,
    in_step: AtomicBool,
    stopped: AtomicBool,
    /// A commit waits for it: run at normal priority (see
    /// [`lower_priority`]).
    boost: AtomicBool,
    info: Mutex<Info>,
}

#[derive(Default)]
struct Info {
    replayed: u64,
    to_replay: u64,
    divergences: u64,
    timer_differences: u64,
    first: Vec<Divergence>,
    stop: Option<String>,
    memory_bytes: usize,
}

impl Shared {
    fn info(&self) -> std::sync::MutexGuard<'_, Info> {
        self.info.lock().expect("shadow info lock")
    }

    fn stop(&self, why: String) {
        let mut info = self.info();
        if info.stop.is_none() {
            info.stop = Some(why);
        }
        self.stopped.store(true, Ordering::Release);
    }
}

/// How the shadow was given the state.
struct Synced {
    kind: &'static str,
    format: String,
    state_bytes: usize,
    pause: Duration,
}

/// The actor's side of a running shadow.
pub(super) struct Shadow {
    tx: mpsc::UnboundedSender<ToShadow>,
    shared: Arc<Shared>,
    batch: Batch,
    /// Events and bytes handed over so far.
    sent: u64,
    sent_bytes: u64,
    program: Arc<Program>,
    compiled: bool,
    instantiate_time: Duration,
    sync: Synced,
    opts: ShadowOptions,
    started: Instant,
}

/// Whether the test-only `WASMHOST_TEST_SHADOW_FAIL` names `step`.
fn fail_at(step: &str) -> Option<String> {
    static STEP: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let named = STEP.get_or_init(|| std::env::var("WASMHOST_TEST_SHADOW_FAIL").ok());
    (named.as_deref() == Some(step)).then(|| format!("test: WASMHOST_TEST_SHADOW_FAIL={step}"))
}

impl Shadow {
    /// Queues one live event and what it did.
    pub(super) fn mirror(
        &mut self,
        stamp: super::Stamp,
        event: EventRef<'_>,
        record: Option<&[u8]>,
        effects: &[Effect],
    ) {
        self.batch.push(stamp, event, record, effects);
    }

    fn status(&self, state: Option<&str>) -> ShadowStatus {
        let handled = self.shared.handled.load(Ordering::Acquire);
        let info = self.shared.info();
        let state = match (state, &info.stop) {
            (Some(state), _) => state,
            (None, Some(_)) => "stopped",
            (None, None) if self.shared.in_step.load(Ordering::Acquire) => "in step",
            (None, None) => "catching up",
        };
        ShadowStatus {
            component: ComponentInfo::of(&self.program),
            state: state.into(),
            sync: self.sync.kind.into(),
            format: self.sync.format.clone(),
            state_bytes: self.sync.state_bytes,
            sync_pause_us: micros(self.sync.pause),
            replayed: info.replayed,
            to_replay: info.to_replay,
            mirrored: handled,
            lag_events: (self.sent + self.batch.events as u64).saturating_sub(handled),
            divergences: info.divergences,
            timer_differences: info.timer_differences,
            first_divergences: info.first.clone(),
            memory_bytes: info.memory_bytes,
            allow_divergence: self.opts.allow_divergence,
            max_lag_ms: self.opts.max_lag_ms,
            age_s: self.started.elapsed().as_secs_f64(),
            stopped: info.stop.clone(),
        }
    }

    /// When the pending batch is due, if there is one.
    pub(super) fn flush_at(&self) -> Option<Instant> {
        self.batch.since.map(|since| since + BATCH_AGE)
    }

    /// Hands the pending events over if `now`, or the batch is large or
    /// old enough. Returns why the shadow stopped, if it did.
    fn flush(&mut self, now: bool) -> Option<String> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Some(self.stop_reason());
        }
        let batch = &self.batch;
        let due = now
            || batch.events >= BATCH_EVENTS
            || batch.size() >= BATCH_BYTES
            || batch
                .since
                .is_some_and(|since| since.elapsed() >= BATCH_AGE);
        if batch.events == 0 || !due {
            return None;
        }
        let queued = self.sent_bytes - self.shared.handled_bytes.load(Ordering::Acquire);
        if queued > MAX_QUEUED_BYTES {
            let why = format!(
                "too slow to keep up: {queued} bytes of events queued for it ({} events behind; the \
                 limit is {MAX_QUEUED_BYTES} bytes)",
                self.sent - self.shared.handled.load(Ordering::Acquire)
            );
            self.shared.stop(why);
            return Some(self.stop_reason());
        }
        let batch = std::mem::take(&mut self.batch);
        self.sent += batch.events as u64;
        self.sent_bytes += batch.size() as u64;
        if self.tx.send(ToShadow::Events(batch)).is_err() {
            self.shared.stop("its thread ended".into());
            return Some(self.stop_reason());
        }
        None
    }

    fn stop_reason(&self) -> String {
        self.shared.info().stop.clone().unwrap_or_default()
    }
}

impl Actor {
    /// `swap --shadow`: syncs a shadow of `prepared`'s component at this
    /// update point and starts its thread. The outer error is fatal for the
    /// service; the inner one says why no shadow was started.
    pub(super) async fn start_shadow(
        &mut self,
        prepared: Prepared,
        opts: ShadowOptions,
    ) -> Result<Result<ShadowStatus, String>> {
        if let Some(why) = self.busy() {
            return Ok(Err(why));
        }
        if let Some(why) = &self.stopped {
            return Ok(Err(format!(
                "the service is stopped ({why}): there is nothing to shadow; swap in a fixed \
                 version with --fresh"
            )));
        }
        if let Some(why) = fail_at("sync") {
            return Ok(Err(why));
        }
        let started = Instant::now();
        let Prepared {
            instance: probe,
            importable,
            instantiate_time,
            compiled,
        } = prepared;
        let program = probe.program.clone();
        reap(Box::new(probe));
        let exportable = match self.instance.exportable().await {
            Ok(formats) => formats,
            Err(trap) => return self.old_trapped("exportable()", trap).await,
        };
        let (journal, kind) = if exportable.is_empty() {
            (self.fresh_journal(), "fresh")
        } else if let Some(live) = &mut self.journal
            && match &live.base.start {
                Begin::Init(_) => true,
                Begin::Snapshot { format, .. } => importable.contains(format),
            }
        {
            (live.share(), "journal")
        } else {
            let mut t = Timings::default();
            let exported = self
                .export_for(&importable, SwapKind::Shadow, &mut t)
                .await?;
            let Exported { format, state } = match exported {
                Ok(exported) => exported,
                Err(why) => return Ok(Err(why)),
            };
            let base = base_of_state(&self.instance, format, Bytes::from(state));
            (Journal::new(base), "export")
        };
        let (format, state_bytes) = match &journal.base.start {
            Begin::Init(_) => ("init".to_string(), 0),
            Begin::Snapshot { format, state, .. } => (format.clone(), state.len()),
        };
        let shared = Arc::new(Shared::default());
        shared.info().to_replay = journal.events();

        let (tx, rx) = mpsc::unbounded_channel();
        let runner = Start {
            program: program.clone(),
            spec: self.spec.clone(),
            journal,
            timers: self.timer_images(),
            opts: opts.clone(),
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name(format!("wasmhost-shadow-{}", self.spec.name))
            .spawn(move || runner.run(rx))?;
        let sync = Synced {
            kind,
            format,
            state_bytes,
            pause: started.elapsed(),
        };
        tracing::info!(
            service = &*self.spec.name,
            to = %program.path.display(),
            sync = kind,
            format = sync.format,
            "shadow started: the new version catches up, then gets every event the running version gets"
        );
        self.last_shadow = None;
        self.shadow = Some(Shadow {
            tx,
            shared,
            batch: Batch::default(),
            sent: 0,
            sent_bytes: 0,
            program,
            compiled,
            instantiate_time,
            sync,
            opts,
            started: Instant::now(),
        });
        Ok(Ok(self.shadow_status().expect("just started")))
    }

    /// A stateless live version's shadow starts with `init` and
    /// `on-connect` for every open connection.
    fn fresh_journal(&self) -> Journal {
        let stamp = self.instance.stamp();
        let base = Base {
            key: self.instance.key(),
            born: self.instance.born(),
            start: Begin::Init(stamp),
        };
        let mut journal = Journal::new(base);
        let ids = self.conn_ids(false);
        for id in ids {
            journal.record(stamp, Call::Connect(&self.conns[&id].info).journal());
        }
        journal
    }

    /// Before a commit: the shadow gets normal priority to catch up, and
    /// unless `last_attempt`, how far it is behind if that is more than a
    /// short pause's worth.
    pub(super) fn shadow_not_ready(&mut self, last_attempt: bool) -> Option<u64> {
        let shadow = self.shadow.as_mut()?;
        shadow.shared.boost.store(true, Ordering::Release);
        // Hand over what is pending, so the shadow can work on it.
        shadow.flush(true);
        let status = shadow.status(None);
        (!last_attempt && status.state == "in step" && status.lag_events > COMMIT_BEHIND)
            .then_some(status.lag_events)
    }

    /// Why nothing else may start while a shadow runs, if one does.
    pub(super) fn shadow_busy(&self) -> Option<String> {
        let shadow = self.shadow.as_ref()?;
        Some(format!(
            "a shadow swap to {} is already running: `wasmhost commit` or `wasmhost abort` it first",
            shadow.program.path.display()
        ))
    }

    /// The running or last shadow, for `status`.
    pub(super) fn shadow_status(&self) -> Option<ShadowStatus> {
        match &self.shadow {
            Some(shadow) => Some(shadow.status(None)),
            None => self.last_shadow.clone(),
        }
    }

    /// At the top of the actor's loop: hands queued events to the shadow
    /// when a batch is due, and notices one that stopped.
    pub(super) fn flush_shadow(&mut self) {
        if let Some(shadow) = &mut self.shadow
            && let Some(why) = shadow.flush(false)
        {
            self.end_shadow("stopped", why);
        }
    }

    /// Ends the running shadow, if any: `state` is `stopped` or `aborted`.
    pub(super) fn end_shadow(&mut self, state: &str, why: String) {
        let Some(shadow) = self.shadow.take() else {
            return;
        };
        shadow.shared.stop(why.clone());
        let status = shadow.status(Some(state));
        tracing::warn!(
            service = &*self.spec.name,
            to = %shadow.program.path.display(),
            "shadow swap {state}: {why}; the running version serves on"
        );
        self.record(SwapRecord {
            at_unix_ms: unix_ms(SystemTime::now()),
            kind: "shadow".into(),
            from: ComponentInfo::of(&self.instance.program),
            to: status.component.clone(),
            format: Some(status.format.clone()),
            state_bytes: status.state_bytes,
            pause_us: status.sync_pause_us,
            outcome: format!("{state}: {why}"),
            migrate: None,
        });
        self.last_shadow = Some(status);
        // Dropping the queue ends the thread, which drops the instance.
        drop(shadow);
    }

    /// `wasmhost abort`: drops the running shadow.
    pub(super) fn abort_shadow(&mut self) -> Result<ShadowStatus, String> {
        if self.shadow.is_none() {
            return Err(self.no_shadow());
        }
        self.end_shadow("aborted", "by `wasmhost abort`".into());
        Ok(self.last_shadow.clone().expect("just ended"))
    }

    fn no_shadow(&self) -> String {
        match &self.last_shadow {
            Some(last) => format!(
                "no shadow swap is running: the last one ({}) {}{}",
                last.component.path,
                last.state,
                last.stopped
                    .as_deref()
                    .map(|why| format!(": {why}"))
                    .unwrap_or_default()
            ),
            None => {
                "no shadow swap is running: start one with `wasmhost swap NEW.wasm --shadow`".into()
            }
        }
    }

    /// `wasmhost commit`: the shadow handles what is queued for it and
    /// becomes the live instance. The outer error is fatal for the service;
    /// the inner one says why nothing changed.
    pub(super) async fn commit_shadow(&mut self) -> Result<Result<SwapReport, String>> {
        let started = Instant::now();
        let Some(shadow) = &mut self.shadow else {
            return Ok(Err(self.no_shadow()));
        };
        let now = shadow.status(None);
        if now.state == "catching up" {
            return Ok(Err(format!(
                "the shadow is still catching up ({} of {} journaled events replayed, {} live \
                 events waiting): commit once `wasmhost status` shows it in step",
                now.replayed, now.to_replay, now.lag_events
            )));
        }
        if now.state == "in step" && now.lag_events > COMMIT_MAX_BEHIND {
            return Ok(Err(format!(
                "the shadow is {} events behind (at most {COMMIT_MAX_BEHIND} for a commit, so the \
                 pause stays short): the machine is too busy for it to catch up; it runs on: \
                 commit again when the load drops, or abort",
                now.lag_events
            )));
        }
        if let Some(why) = shadow.flush(true) {
            self.end_shadow("stopped", why.clone());
            return Ok(Err(format!("the shadow stopped: {why}")));
        }
        let (reply, handed) = oneshot::channel();
        let _ = shadow.tx.send(ToShadow::Commit(reply));
        let runner = match tokio::time::timeout(COMMIT_WAIT, handed).await {
            Ok(Ok(Ok(runner))) => runner,
            Ok(Ok(Err(why))) => {
                return Ok(Err(format!(
                    "the shadow did not hand over ({why}); it runs on: commit again, or abort"
                )));
            }
            Ok(Err(_)) => {
                let why = self.shadow.as_ref().map(Shadow::stop_reason);
                let why = why.unwrap_or_default();
                self.end_shadow("stopped", why.clone());
                return Ok(Err(format!("the shadow stopped: {why}")));
            }
            Err(_) => {
                let behind = self
                    .shadow
                    .as_ref()
                    .map_or(0, |s| s.status(None).lag_events);
                return Ok(Err(format!(
                    "the shadow did not catch up within {COMMIT_WAIT:?} ({behind} events behind); \
                     it runs on: commit again when `wasmhost status` shows it in step, or abort"
                )));
            }
        };
        let shadow = self.shadow.take().expect("checked");
        let mut status = shadow.status(Some("committed"));
        status.lag_events = 0;
        let Runner {
            mut instance,
            journal,
            own_formats,
            journal_off,
            timers,
            timers_differ,
            ..
        } = *runner;
        instance.pin(None);
        instance.cpu_deadline(false);
        instance.advance_past(self.instance.stamp());
        if timers_differ {
            self.timers.clear();
            self.timer_keys.clear();
            let now_ms = unix_ms(SystemTime::now());
            for (token, deadline_ms) in timers {
                self.set_timer(
                    token,
                    Duration::from_millis(deadline_ms.saturating_sub(now_ms)),
                );
            }
        }
        let connections = self.conns.len();
        let old_program = self.commit(instance, false);
        if let Some(old) = self.journal.take() {
            reap(Box::new(old));
        }
        self.journal = journal;
        self.own_formats = own_formats;
        self.durable.journal_off = journal_off;
        self.durable.snapshot_hold = 0;
        let pause = Pause::new(started.elapsed(), &Timings::default());
        // The new version's journal is a new chain in the state dir.
        self.persist_base(true, false);
        let from = ComponentInfo::of(&old_program);
        let to = ComponentInfo::of(&self.instance.program);
        self.record(SwapRecord {
            at_unix_ms: unix_ms(SystemTime::now()),
            kind: "shadow".into(),
            from: from.clone(),
            to: to.clone(),
            format: Some(status.format.clone()),
            state_bytes: status.state_bytes,
            pause_us: pause.pause_us,
            outcome: "committed".into(),
            migrate: None,
        });
        tracing::info!(
            service = &*self.spec.name,
            from = from.short_hash(),
            to = to.short_hash(),
            mirrored = status.mirrored,
            divergences = status.divergences,
            pause_us = pause.pause_us,
            "shadow committed: generation {} -> {}",
            self.generation - 1,
            self.generation
        );
        let mut warnings = Vec::new();
        if status.divergences > 0 {
            warnings.push(format!(
                "committed with {} divergences allowed (see the report's shadow section)",
                status.divergences
            ));
        }
        if let Some(why) = &self.durable.journal_off
            && self.spec.durable.journal
        {
            warnings.push(format!("the new version has no journal: {why}"));
        }
        self.last_shadow = Some(status.clone());
        self.deliver_closes().await?;
        Ok(Ok(SwapReport {
            service: self.spec.name.to_string(),
            kind: "shadow".into(),
            generation_from: self.generation - 1,
            generation_to: self.generation,
            from,
            to,
            format: Some(status.format.clone()),
            state_bytes: status.state_bytes,
            compile_us: match shadow.compiled {
                true => micros(self.instance.program.compile_time),
                false => 0,
            },
            from_cache: shadow.compiled && self.instance.program.from_cache,
            instantiate_us: micros(shadow.instantiate_time),
            pause,
            connections,
            warnings,
            upgrade: None,
            validation: None,
            shadow: Some(status),
            migrate: None,
        }))
    }
}

/// What the shadow's thread starts from.
struct Start {
    program: Arc<Program>,
    spec: ServiceSpec,
    /// The base and the records to replay (the shadow keeps it growing).
    journal: Journal,
    timers: Vec<TimerImage>,
    opts: ShadowOptions,
    shared: Arc<Shared>,
}

/// The shadow on its thread: its instance, journal and timers.
struct Runner {
    instance: Instance,
    journal: Option<Journal>,
    own_formats: Vec<String>,
    journal_off: Option<String>,
    /// Armed timers: token -> deadline (Unix ms).
    timers: BTreeMap<u64, u64>,
    /// Whether its timer calls ever differed from the live version's.
    timers_differ: bool,
    spec: ServiceSpec,
    opts: ShadowOptions,
    shared: Arc<Shared>,
    /// Mirrored events handled.
    handled: u64,
}

impl Start {
    /// The thread's body: catch up, then handle batches until the queue
    /// closes (abort, or the actor stopped) or a commit takes the shadow.
    fn run(self, mut rx: mpsc::UnboundedReceiver<ToShadow>) {
        let shared = self.shared.clone();
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return shared.stop(format!("cannot start its runtime: {e}")),
        };
        rt.block_on(async move {
            let mut runner = match self.catch_up().await {
                Ok(runner) => runner,
                Err(why) => return shared.stop(why),
            };
            // Catching up runs at normal priority; in step, the shadow
            // yields the CPU to the live version until a commit waits.
            let mut idle = false;
            loop {
                if idle && shared.boost.load(Ordering::Acquire) {
                    set_priority(false);
                    idle = false;
                }
                let message = match rx.try_recv() {
                    Ok(message) => message,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if !shared.in_step.swap(true, Ordering::AcqRel)
                            && !shared.boost.load(Ordering::Acquire)
                        {
                            set_priority(true);
                            idle = true;
                        }
                        match rx.recv().await {
                            Some(message) => message,
                            None => return,
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                };
                match message {
                    ToShadow::Events(batch) => {
                        if let Err(why) = runner.handle(batch).await {
                            return shared.stop(why);
                        }
                    }
                    ToShadow::Commit(reply) => {
                        if let Some(why) = fail_at("commit") {
                            let _ = reply.send(Err(why));
                            continue;
                        }
                        match reply.send(Ok(Box::new(runner))) {
                            Ok(()) => return,
                            // The commit gave up waiting: shadow on.
                            Err(back) => runner = *back.expect("sent Ok"),
                        }
                    }
                }
            }
        });
    }

    async fn catch_up(self) -> Result<Runner, String> {
        let Start {
            program,
            spec,
            journal,
            timers,
            opts,
            shared,
        } = self;
        if let Some(why) = fail_at("catch-up") {
            return Err(why);
        }
        let mut records = Vec::new();
        for chunk in journal.chunks() {
            let (read, stop) = journal::read(chunk);
            if let Some(stop) = stop {
                return Err(format!("the journal does not read back: {stop:?}"));
            }
            records.extend(read);
        }
        let mut replayed = 0u64;
        let mut instance = replay(program, &spec, &journal.base, &records, |_, _| {
            replayed += 1;
            if replayed.is_multiple_of(1024) {
                shared.info().replayed = replayed;
                // Aborted or stopped meanwhile: no use going on.
                if shared.stopped.load(Ordering::Acquire) {
                    anyhow::bail!("stopped while catching up");
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| format!("the new version failed catching up: {e:#}"))?;
        drop(records);
        shared.info().replayed = replayed;
        let (own_formats, journal_off) = match journal_formats(&mut instance, &spec.durable).await {
            Ok(formats) => (formats, None),
            Err(why) => (Vec::new(), Some(why)),
        };
        let now_ms = unix_ms(SystemTime::now());
        let mut runner = Runner {
            journal: journal_off.is_none().then_some(journal),
            own_formats,
            journal_off,
            timers: timers
                .iter()
                .map(|t| (t.token, now_ms + t.remaining_ms))
                .collect(),
            timers_differ: false,
            instance,
            spec,
            opts,
            shared,
            handled: 0,
        };
        runner.snapshot_if_due().await?;
        runner.publish_memory();
        // From now on its thread may wait for idle CPU in mid-call: its
        // deadlines count the CPU it got, not the time it waited.
        runner.instance.cpu_deadline(true);
        Ok(runner)
    }
}

impl Runner {
    /// Delivers a batch of live events, comparing each one's output.
    async fn handle(&mut self, batch: Batch) -> Result<(), String> {
        if let Some(since) = batch.since {
            let waited = since.elapsed();
            if waited > Duration::from_millis(self.opts.max_lag_ms) {
                return Err(format!(
                    "too slow to keep up: events waited {} ms for it (--max-lag-ms {})",
                    waited.as_millis(),
                    self.opts.max_lag_ms
                ));
            }
        }
        let (records, stop) = journal::read(&batch.records);
        if let Some(stop) = stop {
            return Err(format!("a mirrored batch does not read back: {stop:?}"));
        }
        let (mut act_at, mut byte_at) = (0usize, 0usize);
        for (record, &end) in records.iter().zip(&batch.ends) {
            let end = end as usize;
            let live = &batch.acts[act_at..end];
            let live_len: usize = live
                .iter()
                .map(|a| match a {
                    Act::Send(_, len) => *len as usize,
                    _ => 0,
                })
                .sum();
            let live_bytes = &batch.bytes[byte_at..byte_at + live_len];
            (act_at, byte_at) = (end, byte_at + live_len);
            self.handled += 1;
            let mut info = None;
            let call = Call::of(&record.event, &mut info);
            self.instance.pin(Some(record.stamp));
            if let Err(trap) = call.run(&mut self.instance).await {
                return Err(format!(
                    "the new version trapped in {} (mirrored event {}): {}",
                    call.describe(),
                    self.handled,
                    root(&trap)
                ));
            }
            let effects = self.instance.take_effects();
            if let Err(divergence) = self.compare(&call, record.stamp, live, live_bytes, &effects) {
                let mut info = self.shared.info();
                info.divergences += 1;
                let text = divergence.describe();
                if info.first.len() < KEPT_DIVERGENCES {
                    info.first.push(divergence);
                }
                if !self.opts.allow_divergence {
                    return Err(format!("diverged at {text}"));
                }
            }
            self.shared.handled.store(self.handled, Ordering::Release);
        }
        // The batch is the live version's records: its journal takes them
        // as they are.
        if let Some(journal) = &mut self.journal {
            journal.append_records(&batch.records, records.len() as u64);
        }
        self.snapshot_if_due().await?;
        self.publish_memory();
        self.shared
            .handled_bytes
            .fetch_add(batch.size() as u64, Ordering::AcqRel);
        Ok(())
    }

    /// Compares the shadow's effects of one event with the live version's;
    /// applies its timer calls to its own table.
    fn compare(
        &mut self,
        call: &Call<'_>,
        stamp: super::Stamp,
        live: &[Act],
        live_bytes: &[u8],
        effects: &[Effect],
    ) -> Result<(), Divergence> {
        if let Call::Timer(token) = call {
            self.timers.remove(token);
        }
        let at_ms = stamp.wall_ns / 1_000_000;
        let mut shadow_timers = Vec::new();
        for effect in effects {
            match effect {
                Effect::SetTimer(token, delay) => {
                    self.timers.insert(*token, at_ms + delay.as_millis() as u64);
                    shadow_timers.push(Act::SetTimer(*token, *delay));
                }
                Effect::CancelTimer(token) => {
                    self.timers.remove(token);
                    shadow_timers.push(Act::CancelTimer(*token));
                }
                Effect::Send(..) | Effect::Close(_) => {}
            }
        }
        let live_timers = live
            .iter()
            .filter(|a| matches!(a, Act::SetTimer(..) | Act::CancelTimer(_)));
        if !live_timers.copied().eq(shadow_timers) {
            self.timers_differ = true;
            self.shared.info().timer_differences += 1;
        }
        if same_output(live, live_bytes, effects) {
            return Ok(());
        }
        // Not the same sends in the same order: the same bytes per
        // connection, in another order across connections, still agree.
        let (live_out, shadow_out) = (live_outputs(live, live_bytes), outputs_of(effects));
        if live_out == shadow_out {
            return Ok(());
        }
        let conns = live_out.keys().chain(shadow_out.keys());
        let conn = conns
            .copied()
            .find(|c| live_out.get(c) != shadow_out.get(c))
            .expect("the outputs differ somewhere");
        Err(Divergence {
            event: self.handled,
            call: describe_with_data(call),
            conn,
            live: show(live_out.get(&conn)),
            shadow: show(shadow_out.get(&conn)),
        })
    }

    /// A snapshot of the shadow's own state on its own thread when its
    /// journal is due one (the policy of `serve`), so the journal it hands
    /// over stays bounded.
    async fn snapshot_if_due(&mut self) -> Result<(), String> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if journal.due(&self.spec.durable).is_none() {
            return Ok(());
        }
        let mut t = Timings::default();
        let exported = export(
            &mut self.instance,
            &self.own_formats,
            SwapKind::Snapshot,
            &mut t,
        )
        .await
        .map_err(|trap| {
            format!(
                "the new version trapped in {} taking its own snapshot: {}",
                trap.call,
                root(&trap.trap)
            )
        })?;
        match exported {
            Ok(Exported { format, state }) => {
                let base = base_of_state(&self.instance, format, Bytes::from(state));
                if let Some(journal) = &mut self.journal {
                    journal.reset(base);
                }
            }
            Err(why) => {
                self.journal = None;
                self.journal_off = Some(format!(
                    "the new version's snapshot failed while it was a shadow: {why}"
                ));
            }
        }
        Ok(())
    }

    fn publish_memory(&self) {
        self.shared.info().memory_bytes = self.instance.memory_bytes();
    }
}

/// Puts the calling thread (the shadow's) in Linux's `SCHED_IDLE` class
/// (`idle`), or back in the normal one. While idle it runs only on CPU
/// time nothing else wants, so a busy machine gives its cores to the live
/// version (and its clients) first: the shadow then falls behind, catches
/// up when the load drops, and is stopped past `--max-lag-ms` if it never
/// does. Catching up at the start and before a commit runs at normal
/// priority. Failing to change it is harmless: logged.
fn set_priority(idle: bool) {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = match idle {
        true => libc::SCHED_IDLE,
        false => libc::SCHED_OTHER,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // is the calling thread.
    let done = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if done == 0 {
        return;
    }
    let why = std::io::Error::last_os_error();
    match idle {
        true => tracing::debug!("could not put the shadow thread in SCHED_IDLE: {why}"),
        // Linux lets a thread leave SCHED_IDLE only with CAP_SYS_NICE or
        // an RLIMIT_NICE that allows nice 0.
        false => tracing::warn!(
            "could not give the shadow thread normal priority back for its catch-up ({why}): it \
             stays in SCHED_IDLE, so under a load that keeps every core busy it catches up only \
             when the load drops; allow it with CAP_SYS_NICE or RLIMIT_NICE 20 (`ulimit -e 20`, \
             systemd LimitNICE=20)"
        ),
    }
}

/// Per connection: the bytes sent to it in one event, and whether it was
/// closed.
#[derive(Default, PartialEq, Eq, Debug)]
struct Output {
    sent: Vec<u8>,
    closed: bool,
}

/// Whether the shadow's sends and closes are the live version's, in the
/// same order (the common case, checked without building maps).
fn same_output(live: &[Act], mut live_bytes: &[u8], effects: &[Effect]) -> bool {
    let live = live
        .iter()
        .filter(|a| matches!(a, Act::Send(..) | Act::Close(_)));
    let shadow = effects
        .iter()
        .filter(|e| matches!(e, Effect::Send(..) | Effect::Close(_)));
    let mut shadow = shadow.fuse();
    for act in live {
        let same = match (act, shadow.next()) {
            (Act::Send(conn, len), Some(Effect::Send(to, data))) => {
                let (sent, rest) = live_bytes.split_at(*len as usize);
                live_bytes = rest;
                conn == to && sent == &data[..]
            }
            (Act::Close(conn), Some(Effect::Close(to))) => conn == to,
            _ => false,
        };
        if !same {
            return false;
        }
    }
    shadow.next().is_none()
}

fn live_outputs(live: &[Act], mut bytes: &[u8]) -> HashMap<u64, Output> {
    let mut out: HashMap<u64, Output> = HashMap::new();
    for act in live {
        match *act {
            Act::Send(conn, len) => {
                let (sent, rest) = bytes.split_at(len as usize);
                out.entry(conn).or_default().sent.extend_from_slice(sent);
                bytes = rest;
            }
            Act::Close(conn) => out.entry(conn).or_default().closed = true,
            Act::SetTimer(..) | Act::CancelTimer(_) => {}
        }
    }
    out
}

fn outputs_of(effects: &[Effect]) -> HashMap<u64, Output> {
    let mut out: HashMap<u64, Output> = HashMap::new();
    for effect in effects {
        match effect {
            Effect::Send(conn, data) => out.entry(*conn).or_default().sent.extend_from_slice(data),
            Effect::Close(conn) => out.entry(*conn).or_default().closed = true,
            Effect::SetTimer(..) | Effect::CancelTimer(_) => {}
        }
    }
    out
}

/// An output for people: escaped bytes, cut at [`SHOWN_BYTES`].
fn show(output: Option<&Output>) -> String {
    let Some(output) = output else {
        return "nothing".into();
    };
    let mut s = escaped(&output.sent);
    if output.closed {
        s.push_str(if output.sent.is_empty() {
            "(closed)"
        } else {
            " then closed"
        });
    }
    s
}

fn escaped(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let cut = &bytes[..bytes.len().min(SHOWN_BYTES)];
    let mut s = format!("{:?}", String::from_utf8_lossy(cut));
    if cut.len() < bytes.len() {
        s.push_str(&format!(" (and {} more bytes)", bytes.len() - cut.len()));
    }
    s
}

fn describe_with_data(call: &Call<'_>) -> String {
    match call {
        Call::Data(_, data) => format!("{} {}", call.describe(), escaped(data)),
        _ => call.describe(),
    }
}
