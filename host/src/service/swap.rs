//! Live swap: replace the running instance with a new one, carrying the
//! state across, at an update point of the actor (between two events).
//!
//! The slow part happens before, off the actor ([`prepare`]): compiling,
//! type-checking and instantiating the new component and asking which
//! formats it imports. The pause holds only the negotiation, the old
//! instance's `export-state`, the new one's `import-state`, the validation
//! ([`Validation`]: by default the new instance's `export-state` in the
//! format it imported must succeed; `roundtrip` also compares its bytes
//! with the old export; `none` skips it) and the pointer switch. Any failure aborts: the old instance stays live with its state
//! and the new one is dropped with everything it did.

use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

use super::event_time::Stamp;
use super::group::{GroupGate, require_stateless};
use super::recovery::{base_after_init, base_of_state};
use super::report::{ComponentInfo, SwapRecord, SwapReport, micros, unix_ms};
use super::transfer::{Exported, Pause, SwapKind, Timings, Validation, import, root};
use super::{Actor, Instance, InstanceLimits, Program};
use crate::bindings::ConnInfo;
use crate::durable::Base;
use bytes::Bytes;

/// A new version, instantiated and ready to take over.
pub struct Prepared {
    pub instance: Instance,
    /// What it can import, most preferred first.
    pub importable: Vec<String>,
    pub instantiate_time: Duration,
    /// Whether the program was compiled for this swap (not kept from an
    /// earlier generation, as for a rollback).
    pub compiled: bool,
}

/// Instantiates `program` for a swap and asks what it imports. `compiled`
/// says whether `program` was loaded for this swap.
pub async fn prepare(
    program: Arc<Program>,
    service: Arc<str>,
    limits: &InstanceLimits,
    compiled: bool,
) -> Result<Prepared> {
    let started = Instant::now();
    let mut instance = Instance::new(program, service, limits).await?;
    let instantiate_time = started.elapsed();
    let importable = instance
        .importable()
        .await
        .map_err(|e| anyhow::anyhow!("the new version trapped in importable(): {}", root(&e)))?;
    Ok(Prepared {
        instance,
        importable,
        instantiate_time,
        compiled,
    })
}

#[derive(Clone, Debug)]
pub struct SwapOptions {
    pub kind: SwapKind,
    /// Start the new version with `init` and drop the state.
    pub fresh: bool,
    /// How to check the new instance's import before it goes live.
    pub validation: Validation,
    /// Abort unless the service is still at this generation (rollback
    /// prepares against a specific previous generation).
    pub expect_generation: Option<u64>,
    /// For `serve --instances N`: this actor's index and the gate every
    /// instance's swap commits or aborts through ([`super::group`]).
    pub group: Option<(Arc<GroupGate>, usize)>,
}

impl Actor {
    /// Runs one swap. The outer error is fatal for the service (the old
    /// instance trapped and could not be restarted); the inner one aborts
    /// the swap.
    pub(super) async fn swap(
        &mut self,
        prepared: Prepared,
        opts: SwapOptions,
    ) -> Result<Result<SwapReport, String>> {
        let started = Instant::now();
        let from = ComponentInfo::of(&self.instance.program);
        let to = ComponentInfo::of(&prepared.instance.program);
        let kind = match (opts.kind, opts.fresh) {
            (SwapKind::Rollback, _) => "rollback",
            (SwapKind::Swap, true) => "fresh",
            (SwapKind::Swap, false) => "swap",
            (SwapKind::Upgrade, _) => "upgrade",
            (SwapKind::Snapshot, _) => "snapshot",
            (SwapKind::Shadow, _) => "shadow",
        };
        let result = self.transfer(prepared, &opts, started).await;
        if let Some((gate, index)) = &opts.group {
            // Whatever stopped this member stops the others.
            match &result {
                Ok(Ok(_)) => {}
                Ok(Err(why)) => gate.fail(*index, why),
                Err(e) => gate.fail(*index, &format!("{e:#}")),
            }
        }
        let result = result?;
        let record = |format: Option<String>, state_bytes, pause_us, outcome| SwapRecord {
            at_unix_ms: unix_ms(SystemTime::now()),
            kind: kind.into(),
            from: from.clone(),
            to: to.clone(),
            format,
            state_bytes,
            pause_us,
            outcome,
            migrate: None,
        };
        match result {
            Ok(mut report) => {
                report.kind = kind.into();
                let rec = record(
                    report.format.clone(),
                    report.state_bytes,
                    report.pause.pause_us,
                    "committed".into(),
                );
                self.record(rec);
                tracing::info!(
                    service = &*self.spec.name,
                    from = from.short_hash(),
                    to = to.short_hash(),
                    format = report.format.as_deref().unwrap_or("none (fresh)"),
                    state_bytes = report.state_bytes,
                    pause_us = report.pause.pause_us,
                    "{kind} committed: generation {} -> {}",
                    report.generation_from,
                    report.generation_to
                );
                self.deliver_closes().await?;
                Ok(Ok(report))
            }
            Err(why) => {
                self.record(record(
                    None,
                    0,
                    micros(started.elapsed()),
                    format!("aborted: {why}"),
                ));
                tracing::warn!(service = &*self.spec.name, to = %to.path, "{kind} aborted: {why}");
                Ok(Err(why))
            }
        }
    }

    async fn transfer(
        &mut self,
        prepared: Prepared,
        opts: &SwapOptions,
        started: Instant,
    ) -> Result<Result<SwapReport, String>> {
        if let Some(expected) = opts.expect_generation
            && expected != self.generation
        {
            return Ok(Err(format!(
                "the service moved to generation {} while this was prepared (expected {expected}); run it again",
                self.generation
            )));
        }
        if let Some(why) = self.busy() {
            return Ok(Err(why));
        }
        if let Some(why) = &self.stopped
            && !opts.fresh
        {
            return Ok(Err(format!(
                "the service is stopped ({why}): it has no state to carry over; swap in a fixed \
                 version with --fresh"
            )));
        }
        let Prepared {
            instance: mut new,
            importable,
            instantiate_time,
            compiled,
        } = prepared;
        let mut t = Timings::default();
        let mut warnings = Vec::new();
        let mut fresh_start = None;
        let mut transferred = None;
        let exported = match opts.fresh {
            true => None,
            false => match self.export_for(&importable, opts.kind, &mut t).await? {
                Ok(exported) => Some(exported),
                // Nothing to carry: a running version with no state at all
                // (an empty exportable()) hands over like a fresh start.
                Err(_) if self.runs_stateless().await => None,
                Err(why) => return Ok(Err(why)),
            },
        };
        let fresh = exported.is_none();
        let (format, state_bytes) = if let Some(Exported { format, state }) = exported {
            let validated = match import(&mut new, &format, &state, opts.validation, &mut t).await {
                Ok(validated) => validated,
                Err(why) => return Ok(Err(why)),
            };
            let len = state.len();
            // Freeing megabytes can mean unmapping them: not in the pause.
            reap(Box::new(validated));
            // The transferred state is the new generation's first snapshot.
            transferred = Some(Bytes::from(state));
            (Some(format), len)
        } else {
            fresh_start = match self.start_fresh_in(&mut new).await {
                Ok(started) => Some(started),
                Err(why) => return Ok(Err(why)),
            };
            warnings.push(match opts.fresh {
                true => "state dropped: the new version started fresh (init) and saw every open \
                         connection as new"
                    .into(),
                false => "the running version keeps no state (its exportable() is empty): the new \
                          version started with init and saw every open connection as new"
                    .into(),
            });
            (None, 0)
        };
        if let Some((gate, index)) = &opts.group {
            if let Err(why) = require_stateless(&mut new, "the new version").await {
                return Ok(Err(why));
            }
            if let Err(why) = gate.ready(*index).await {
                return Ok(Err(why));
            }
        }
        let connections = self.conns.len();
        let old_program = self.commit(new, fresh);
        let pause = Pause::new(started.elapsed(), &t);
        // After the pause: the new generation's journal starts from the
        // transferred state (or its `init`).
        let (base, connects) = match (fresh_start, &format, transferred) {
            (Some(started), _, _) => started,
            (None, Some(format), Some(state)) => (
                base_of_state(&self.instance, format.clone(), state),
                Vec::new(),
            ),
            (None, _, _) => unreachable!("a swap that is not fresh transfers a state"),
        };
        if let Some(old) = self.journal.take() {
            reap(Box::new(old));
        }
        self.start_journal(base, &connects, None, false).await;
        Ok(Ok(SwapReport {
            service: self.spec.name.to_string(),
            kind: String::new(),
            generation_from: self.generation - 1,
            generation_to: self.generation,
            from: ComponentInfo::of(&old_program),
            to: ComponentInfo::of(&self.instance.program),
            format,
            state_bytes,
            compile_us: if compiled {
                micros(self.instance.program.compile_time)
            } else {
                0
            },
            from_cache: compiled && self.instance.program.from_cache,
            instantiate_us: micros(instantiate_time),
            pause,
            connections,
            warnings,
            upgrade: None,
            validation: Some(match fresh {
                true => Validation::None,
                false => opts.validation,
            }),
            shadow: None,
            migrate: None,
        }))
    }

    /// Whether the running version says it keeps no state (an empty
    /// `exportable()`; a trap answering counts as no).
    pub(super) async fn runs_stateless(&mut self) -> bool {
        matches!(self.instance.exportable().await, Ok(formats) if formats.is_empty())
    }

    /// `--fresh`: `init` and `on-connect` for every open connection, on the
    /// new instance; its effects wait for the commit. Returns the base of
    /// the new generation's journal (its `init`) and the `on-connect` calls
    /// that follow it.
    async fn start_fresh_in(
        &mut self,
        new: &mut Instance,
    ) -> Result<(Base, Vec<(Stamp, ConnInfo)>), String> {
        match new.init(&self.spec.config).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(format!("the new version's init failed: {msg}")),
            Err(trap) => return Err(format!("the new version trapped in init: {}", root(&trap))),
        }
        let base = base_after_init(new);
        let mut connects = Vec::new();
        let ids = self.conn_ids(false);
        for id in ids {
            let info = &self.conns[&id].info;
            if let Err(trap) = new.on_connect(info).await {
                return Err(format!(
                    "the new version trapped in on-connect({id}): {}",
                    root(&trap)
                ));
            }
            connects.push((new.stamp(), info.clone()));
        }
        Ok((base, connects))
    }

    /// Makes `new` the live instance; returns the old program. The old
    /// instance is dropped on the reaper thread, so unmapping its memory
    /// is not part of the pause.
    pub(super) fn commit(&mut self, new: Instance, fresh: bool) -> Arc<Program> {
        self.apply_effects(); // anything the old instance recorded while exporting
        if fresh {
            // The timers belonged to the dropped state.
            self.timers.clear();
            self.timer_keys.clear();
        }
        // A stopped service serves again with the new version.
        self.stopped = None;
        self.durable.trap_streak = 0;
        let old = std::mem::replace(&mut self.instance, new);
        self.apply_effects(); // what the new instance recorded while importing
        // The generation before the previous one is no longer needed; its
        // compiled code is unmapped off the actor too.
        let older = self.previous.replace(old.program.clone());
        self.generation += 1;
        self.generation_started = SystemTime::now();
        let program = old.program.clone();
        reap(Box::new((old, older)));
        program
    }
}

/// Drops `garbage` on a long-lived background thread: freeing a store
/// (its memory, its fiber stack) or a program (its compiled code) means
/// unmapping memory, which takes time the actor should spend serving.
pub(super) fn reap(garbage: Box<dyn Send>) {
    let item = (Instant::now(), garbage);
    if let Err(mpsc::SendError(item)) = reaper().lock().expect("reaper lock").send(item) {
        drop(item); // the reaper is gone: drop it here
    }
}

type Garbage = (Instant, Box<dyn Send>);

/// How long the reaper waits before freeing: unmapping takes the
/// process's memory-map lock, which would stall the new instance's page
/// faults if it overlapped the end of the pause.
const REAP_DELAY: Duration = Duration::from_millis(100);

/// The reaper thread's queue, started on first use ([`start_reaper`]
/// starts it early, so the first swap does not pay for the thread).
fn reaper() -> &'static Mutex<mpsc::Sender<Garbage>> {
    static REAPER: OnceLock<Mutex<mpsc::Sender<Garbage>>> = OnceLock::new();
    REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Garbage>();
        std::thread::Builder::new()
            .name("wasmhost-reaper".into())
            .spawn(move || {
                for (queued, garbage) in rx {
                    std::thread::sleep(REAP_DELAY.saturating_sub(queued.elapsed()));
                    drop(garbage);
                }
            })
            .expect("spawning the reaper thread");
        Mutex::new(tx)
    })
}

pub fn start_reaper() {
    reaper();
}
