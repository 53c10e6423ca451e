//! Live swap: replace the running instance with a new one, carrying the
//! state across, at an update point of the actor (between two events).
//!
//! The slow part happens before, off the actor ([`prepare`]): compiling,
//! type-checking and instantiating the new component and asking which
//! formats it imports. The pause holds only the negotiation, the old
//! instance's `export-state`, the new one's `import-state`, an optional
//! validation (the new instance exports what it imported) and the pointer
//! switch. Any failure aborts: the old instance stays live with its state
//! and the new one is dropped with everything it did.

use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

use super::report::{ComponentInfo, SwapRecord, SwapReport, micros, unix_ms};
use super::{Actor, Instance, InstanceLimits, Program};

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapKind {
    Swap,
    Rollback,
}

#[derive(Clone, Debug)]
pub struct SwapOptions {
    pub kind: SwapKind,
    /// Start the new version with `init` and drop the state.
    pub fresh: bool,
    /// Check that the new instance can export the state it imported.
    pub validate: bool,
    /// Abort unless the service is still at this generation (rollback
    /// prepares against a specific previous generation).
    pub expect_generation: Option<u64>,
}

/// Guest time spent inside the pause.
#[derive(Default)]
struct Timings {
    export: Duration,
    import: Duration,
    validate: Duration,
}

/// The innermost cause of a guest call's failure, without the wasm
/// backtrace (that goes to the log).
fn root(e: &anyhow::Error) -> String {
    e.root_cause().to_string()
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
        };
        let result = self.transfer(prepared, &opts, started).await?;
        let record = |format: Option<String>, state_bytes, pause_us, outcome| SwapRecord {
            at_unix_ms: unix_ms(SystemTime::now()),
            kind: kind.into(),
            from: from.clone(),
            to: to.clone(),
            format,
            state_bytes,
            pause_us,
            outcome,
        };
        match result {
            Ok(mut report) => {
                report.kind = kind.into();
                let rec = record(
                    report.format.clone(),
                    report.state_bytes,
                    report.pause_us,
                    "committed".into(),
                );
                self.record(rec);
                tracing::info!(
                    service = &*self.spec.name,
                    from = from.short_hash(),
                    to = to.short_hash(),
                    format = report.format.as_deref().unwrap_or("none (fresh)"),
                    state_bytes = report.state_bytes,
                    pause_us = report.pause_us,
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
        let Prepared {
            instance: mut new,
            importable,
            instantiate_time,
            compiled,
        } = prepared;
        let mut t = Timings::default();
        let exportable = match self.instance.exportable().await {
            Ok(formats) => formats,
            Err(trap) => return self.old_trapped("exportable()", trap).await,
        };
        let format = importable.iter().find(|f| exportable.contains(f)).cloned();
        let mut warnings = Vec::new();
        let state_bytes = if opts.fresh {
            if let Err(why) = self.start_fresh_in(&mut new).await {
                return Ok(Err(why));
            }
            warnings.push(
                "state dropped: the new version started fresh (init) and saw every open connection as new".into(),
            );
            0
        } else {
            let Some(format) = &format else {
                let (imports, exports) = (importable.join(", "), exportable.join(", "));
                return Ok(Err(match opts.kind {
                    SwapKind::Swap => format!(
                        "no state format in common: the new version imports [{imports}], the running version \
                         exports [{exports}] now; use --fresh to start the new version without the state"
                    ),
                    SwapKind::Rollback => format!(
                        "rollback refused: no state format in common: the previous version imports [{imports}], \
                         the running version exports [{exports}] now. Rolling back now would lose the state; if \
                         that is what you want, run `wasmhost swap --fresh` with the previous component"
                    ),
                }));
            };
            let state = match self.export(format, &mut t).await? {
                Ok(state) => state,
                Err(why) => return Ok(Err(why)),
            };
            let validated = match import(&mut new, format, &state, opts.validate, &mut t).await {
                Ok(validated) => validated,
                Err(why) => return Ok(Err(why)),
            };
            let len = state.len();
            // Freeing megabytes can mean unmapping them: not in the pause.
            reap(Box::new((state, validated)));
            len
        };
        let connections = self.conns.len();
        let old_program = self.commit(new, opts.fresh);
        let pause = started.elapsed();
        let guest = t.export + t.import + t.validate;
        Ok(Ok(SwapReport {
            service: self.spec.name.to_string(),
            kind: String::new(),
            generation_from: self.generation - 1,
            generation_to: self.generation,
            from: ComponentInfo::of(&old_program),
            to: ComponentInfo::of(&self.instance.program),
            format: if opts.fresh { None } else { format },
            state_bytes,
            compile_us: if compiled {
                micros(self.instance.program.compile_time)
            } else {
                0
            },
            from_cache: compiled && self.instance.program.from_cache,
            instantiate_us: micros(instantiate_time),
            pause_us: micros(pause),
            export_us: micros(t.export),
            import_us: micros(t.import),
            validate_us: micros(t.validate),
            host_us: micros(pause.saturating_sub(guest)),
            connections,
            warnings,
        }))
    }

    /// The old instance's `export-state`. A trap loses the old instance:
    /// it is restarted fresh and the swap is aborted.
    async fn export(&mut self, format: &str, t: &mut Timings) -> Result<Result<Vec<u8>, String>> {
        let began = Instant::now();
        let result = self.instance.export_state(format).await;
        t.export = began.elapsed();
        match result {
            Ok(Ok(state)) => Ok(Ok(state)),
            Ok(Err(msg)) => Ok(Err(format!(
                "the running version refused to export {format}: {msg}"
            ))),
            Err(trap) => {
                self.old_trapped(&format!("export-state({format})"), trap)
                    .await
            }
        }
    }

    async fn old_trapped<T>(
        &mut self,
        call: &str,
        trap: anyhow::Error,
    ) -> Result<Result<T, String>> {
        let why = root(&trap);
        self.recover(trap).await?;
        Ok(Err(format!(
            "the running version trapped in {call}: {why}; it was restarted with fresh state (its state is lost)"
        )))
    }

    /// `--fresh`: `init` and `on-connect` for every open connection, on the
    /// new instance; its effects wait for the commit.
    async fn start_fresh_in(&mut self, new: &mut Instance) -> Result<(), String> {
        match new.init(&self.spec.config).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(format!("the new version's init failed: {msg}")),
            Err(trap) => return Err(format!("the new version trapped in init: {}", root(&trap))),
        }
        let mut ids: Vec<u64> = self.conns.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Err(trap) = new.on_connect(&self.conns[&id].info).await {
                return Err(format!(
                    "the new version trapped in on-connect({id}): {}",
                    root(&trap)
                ));
            }
        }
        Ok(())
    }

    /// Makes `new` the live instance; returns the old program. The old
    /// instance is dropped on the reaper thread, so unmapping its memory
    /// is not part of the pause.
    fn commit(&mut self, new: Instance, fresh: bool) -> Arc<Program> {
        self.apply_effects(); // anything the old instance recorded while exporting
        if fresh {
            // The timers belonged to the dropped state.
            self.timers.clear();
            self.timer_keys.clear();
        }
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

/// The new instance's `import-state`, then (if asked) a validating
/// `export-state` in the same format.
async fn import(
    new: &mut Instance,
    format: &str,
    state: &[u8],
    validate: bool,
    t: &mut Timings,
) -> Result<Option<Vec<u8>>, String> {
    let began = Instant::now();
    let result = new.import_state(format, state).await;
    t.import = began.elapsed();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(msg)) => {
            return Err(format!(
                "the new version rejected the {format} state: {msg}"
            ));
        }
        Err(trap) => {
            return Err(format!(
                "the new version trapped in import-state({format}): {}",
                root(&trap)
            ));
        }
    }
    if !validate {
        return Ok(None);
    }
    let began = Instant::now();
    let result = new.export_state(format).await;
    t.validate = began.elapsed();
    match result {
        Ok(Ok(exported)) => Ok(Some(exported)),
        Ok(Err(msg)) => Err(format!(
            "validation failed: the new version cannot export the {format} state it imported: {msg}"
        )),
        Err(trap) => Err(format!(
            "validation failed: the new version trapped exporting the {format} state it imported: {}",
            root(&trap)
        )),
    }
}

/// Drops `garbage` on a long-lived background thread: freeing a store
/// (its memory, its fiber stack) or a program (its compiled code) means
/// unmapping memory, which takes time the actor should spend serving.
fn reap(garbage: Box<dyn Send>) {
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
