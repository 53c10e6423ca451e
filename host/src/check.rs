//! `wasmhost check`: tells whether a file is a valid guest for the world
//! `wasmhost:service/service`, and runs a conformance check on it.
//!
//! Everything goes through the host's own code: the file is read, checked
//! and compiled by [`Runtime::load`] (the compile cache included), linked by
//! [`Program::link`] (the linker a swap uses, so a component of another
//! world fails here exactly as `serve` or `swap` would refuse it),
//! instantiated by [`Instance::new`], and state is moved by the one
//! transfer mechanism a swap, rollback and upgrade use: its old half
//! ([`service::export`]: `exportable()`, negotiation, `export-state`) and
//! its new half with round-trip validation ([`service::import_checked`],
//! as `swap --validate roundtrip`). The checks, in order:
//!
//! 1. `importable()` answers on a new instance (a swap asks it before
//!    anything else), and `init` succeeds with the `--config` pairs.
//! 2. [`PROBES`]: three connections (`on-connect`), each sent a few bytes
//!    that are not a complete request or line of any protocol (no
//!    newline), so a guest that keeps per-connection parse buffers holds
//!    some state in them. `close` effects are honoured (`on-close`
//!    follows), `send` effects counted, timers recorded but never fired.
//! 3. For every format F in `exportable()`: F should also be in
//!    `importable()` (a warning if not: the same version could not take
//!    its own state back). Then `export-state(F)`, `import-state(F)` into
//!    a new instance (no `init`, as in a swap), `export-state(F)` again:
//!    the bytes must be identical, else the guest loses or changes state
//!    on import, or its encoding is not canonical (the same state written
//!    in another order); the first differing offset and both lengths are
//!    reported ([`Difference`]).
//! 4. With `--against OTHER`: OTHER must import every F; FILE's export of
//!    F must import into a new instance of OTHER, and when OTHER then lists
//!    F in `exportable()`, OTHER's export of F must equal FILE's.
//! 5. Leaks: on another instance, a warm-up batch of [`BATCH`] connections
//!    and then `--connections` more, in batches (each connection:
//!    `on-connect`, a few bytes of `on-data`, `on-close`); the linear
//!    memory after the last batch must not exceed the memory after the
//!    warm-up by more than [`leak_tolerance`]. If it does, the check goes
//!    on in phases that double the connections so far: a phase in which
//!    memory stays within the tolerance shows a heap that has settled (a
//!    garbage collector sizing its heap), which passes with a note; growth
//!    in every phase up to [`SETTLE_MAX_CONNECTIONS`] is a leak.
//!
//! Linear memory is what the store's limiter allowed the instance's
//! memories to grow to (`Instance::memory_bytes`); it grows in 64 KiB
//! pages and never shrinks.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use wasmtime::component::types::ComponentItem;

use crate::bindings::ConnInfo;
use crate::engine::Runtime;
use crate::service::{
    self, Difference, Effect, Instance, InstanceLimits, Program, Timings, Validation, micros,
    negotiate,
};

/// What the probe connections send: one incomplete request each, no
/// newline (a command cut short, an IRC line, plain text).
pub const PROBES: [&[u8]; 3] = [b"GET ke", b"NICK ad", b"hello wor"];

/// Connections per batch of the leak check (the warm-up is one batch).
pub const BATCH: usize = 250;

/// A WebAssembly page.
const PAGE: usize = 64 << 10;

/// When memory grew over the measured connections, the leak check goes on
/// in phases that double the count, up to this many connections or
/// [`SETTLE_TIME`], to tell a leak (growth in every phase) from a
/// garbage-collected heap sizing itself (growth that stops: JavaScript
/// guests grow by tens of MiB over the first 50,000 connections, then stay
/// flat).
const SETTLE_MAX_CONNECTIONS: usize = 1 << 19;
const SETTLE_TIME: std::time::Duration = std::time::Duration::from_secs(60);

/// The exports every guest must have.
const REQUIRED_EXPORTS: [&str; 2] = ["wasmhost:service/handler", "wasmhost:service/migrate"];

/// What the service's log lines and the instances are named.
const SERVICE: &str = "check";

/// What to check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub file: PathBuf,
    /// The next version, to check that it takes FILE's state.
    pub against: Option<PathBuf>,
    /// Passed to `init`.
    pub config: Vec<(String, String)>,
    /// Connections opened and closed by the leak check after its warm-up.
    pub connections: usize,
    pub limits: InstanceLimits,
}

/// The outcome of `wasmhost check`, for people ([`format_report`]) and as
/// JSON (`--json`).
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// No check failed (warnings allowed) and the file is a valid guest.
    pub ok: bool,
    pub file: ComponentReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against: Option<ComponentReport>,
    /// Why FILE (or OTHER) is not a valid guest: the checks did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub checks: Vec<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leak: Option<LeakReport>,
}

/// What was learnt about one component (fields stay empty when the step
/// that finds them out did not run).
#[derive(Debug, Default, Serialize)]
pub struct ComponentReport {
    pub path: String,
    pub size_bytes: Option<u64>,
    /// Hex SHA-256 of the file.
    pub sha256: Option<String>,
    /// Reading and compiling, or loading from the compile cache.
    pub compile_us: Option<u64>,
    pub from_cache: Option<bool>,
    /// Whether it is a component of the world wasmhost:service/service.
    pub valid: bool,
    pub imports: Vec<Item>,
    pub exports: Vec<Item>,
    pub instantiate_us: Option<u64>,
    /// `importable()` of a new instance.
    pub importable: Vec<String>,
    /// `exportable()`: for FILE after `init` and the probe connections;
    /// for OTHER after importing FILE's state.
    pub exportable: Vec<String>,
    /// Linear memory after `init` (FILE only).
    pub memory_after_init_bytes: Option<usize>,
}

/// An import or export of a component.
#[derive(Debug, Serialize)]
pub struct Item {
    pub name: String,
    /// `instance`, `func`, `type`, `resource`, `module` or `component`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

/// One check and how it went.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
    /// For a round trip that changed the bytes: where.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub difference: Option<Difference>,
}

/// The leak check's measurements.
#[derive(Debug, Serialize)]
pub struct LeakReport {
    /// Connections opened and closed after the warm-up batch.
    pub connections: usize,
    pub batch: usize,
    pub memory_after_warmup_bytes: usize,
    /// Linear memory after each measured batch.
    pub memory_after_batches_bytes: Vec<usize>,
    pub tolerance_bytes: usize,
    /// Timers the guest left armed (the check never fires them).
    pub timers_armed: usize,
}

/// How much the linear memory may grow over the measured batches before
/// it counts as a leak: a page, or 1% of the memory after the warm-up if
/// that is more (allocators round, and garbage-collected guests collect
/// in steps).
pub fn leak_tolerance(after_warmup: usize) -> usize {
    PAGE.max(after_warmup / 100)
}

impl CheckReport {
    fn new(opts: &CheckOptions) -> CheckReport {
        let component = |path: &Path| ComponentReport {
            path: path.display().to_string(),
            ..ComponentReport::default()
        };
        CheckReport {
            ok: false,
            file: component(&opts.file),
            against: opts.against.as_deref().map(component),
            error: None,
            checks: Vec::new(),
            leak: None,
        }
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.outcome == Outcome::Fail)
    }

    /// One line saying what failed, for the exit message.
    pub fn summary(&self) -> String {
        if let Some(error) = &self.error {
            return error.clone();
        }
        let failed: Vec<&str> = self.failures().map(|c| c.name.as_str()).collect();
        if failed.is_empty() {
            return format!("all {} checks passed", self.checks.len());
        }
        format!(
            "check failed: {} of {} checks failed: {}",
            failed.len(),
            self.checks.len(),
            failed.join("; ")
        )
    }
}

/// Runs every check on `opts.file`; `progress` is told of the slow steps.
pub async fn check(runtime: &Runtime, opts: &CheckOptions, progress: &dyn Fn(&str)) -> CheckReport {
    let mut report = CheckReport::new(opts);
    let file = match load(runtime, &opts.file, &mut report.file, progress) {
        Ok(program) => program,
        Err(why) => {
            report.error = Some(why);
            return report;
        }
    };
    let other = match (&opts.against, &mut report.against) {
        (Some(path), Some(info)) => match load(runtime, path, info, progress) {
            Ok(program) => Some(program),
            Err(why) => {
                report.error = Some(format!("--against: {why}"));
                return report;
            }
        },
        _ => None,
    };
    let mut checker = Checker {
        opts,
        report,
        progress,
    };
    checker.run(file, other).await;
    let mut report = checker.report;
    let failed = report.failures().next().is_some();
    report.ok = !failed;
    report
}

/// Reads, compiles and links `path` with the host's loader and linker,
/// recording what it learns; the error says what is wrong and what to do.
fn load(
    runtime: &Runtime,
    path: &Path,
    info: &mut ComponentReport,
    progress: &dyn Fn(&str),
) -> Result<Arc<Program>, String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        format!(
            "cannot read component {}: {e}; pass the path of a component file, e.g. \
             target/guests/echo.wasm (guests/build builds the example guests)",
            path.display()
        )
    })?;
    if !meta.is_file() {
        return Err(format!(
            "{} is not a file; pass the path of a component file, e.g. target/guests/echo.wasm",
            path.display()
        ));
    }
    info.size_bytes = Some(meta.len());
    let slow = match meta.len() > 4 << 20 {
        true => {
            "; compiling a component this large takes seconds unless it is in the compile cache"
        }
        false => "",
    };
    progress(&format!(
        "loading {} ({}{slow})...",
        path.display(),
        human_bytes(meta.len() as usize)
    ));
    let loaded = runtime.load(path).map_err(|e| format!("{e:#}"))?;
    info.sha256 = Some(loaded.hash.clone());
    info.compile_us = Some(micros(loaded.compile_time));
    info.from_cache = Some(loaded.from_cache);
    progress(&format!(
        "{} {} in {:.1?}",
        path.display(),
        match loaded.from_cache {
            true => "loaded from the compile cache",
            false => "compiled",
        },
        loaded.compile_time
    ));
    let ty = loaded.component.component_type();
    let engine = runtime.engine();
    let item = |name: &str, ty: &ComponentItem| Item {
        name: name.to_string(),
        kind: kind(ty),
    };
    info.imports = ty.imports(engine).map(|(n, e)| item(n, &e.ty)).collect();
    info.exports = ty.exports(engine).map(|(n, e)| item(n, &e.ty)).collect();
    match Program::link(runtime, loaded) {
        Ok(program) => {
            info.valid = true;
            Ok(program)
        }
        Err(e) => Err(not_a_service(&format!("{e:#}"), info)),
    }
}

fn kind(item: &ComponentItem) -> &'static str {
    match item {
        ComponentItem::ComponentFunc(_) => "func",
        ComponentItem::CoreFunc(_) => "core func",
        ComponentItem::Module(_) => "module",
        ComponentItem::Component(_) => "component",
        ComponentItem::ComponentInstance(_) => "instance",
        ComponentItem::Type(_) => "type",
        ComponentItem::Resource(_) => "resource",
    }
}

/// The linker's refusal, with what differs from the world and what to do.
fn not_a_service(linker_error: &str, info: &ComponentReport) -> String {
    let mut s = linker_error.to_string();
    let exports: Vec<&str> = info.exports.iter().map(|i| i.name.as_str()).collect();
    let missing: Vec<&str> = REQUIRED_EXPORTS
        .iter()
        .copied()
        .filter(|name| !exports.contains(name))
        .collect();
    if !missing.is_empty() {
        let _ = write!(s, "\n  it does not export {}", missing.join(", "));
    }
    // The host provides its own interface and WASI 0.2; the linker's
    // message above names the first import it could not satisfy.
    let foreign: Vec<&str> = info
        .imports
        .iter()
        .map(|i| i.name.as_str())
        .filter(|name| !name.starts_with("wasmhost:service/") && !name.starts_with("wasi:"))
        .collect();
    if !foreign.is_empty() {
        let _ = write!(
            s,
            "\n  it imports what the host does not provide: {}",
            foreign.join(", ")
        );
    }
    if exports.iter().any(|e| e.starts_with("wasi:cli/run")) {
        let _ = write!(
            s,
            "\n  it exports wasi:cli/run: it is a command (a program with a main), not a service"
        );
    }
    let _ = write!(
        s,
        "\n  what to do: build it for the world `service` of guest-wit/service.wit (in Rust: a \
         cdylib crate with wit_bindgen::generate!({{ path: \"guest-wit\", world: \"service\" }}), \
         built for wasm32-wasip2): it must export wasmhost:service/handler and \
         wasmhost:service/migrate, and import nothing but wasmhost:service/host and WASI 0.2"
    );
    s
}

/// An instance driven like the service actor drives one: effects carried
/// out after each call (closes delivered as `on-close`), one call at a time.
struct Driver {
    instance: Instance,
    open: BTreeSet<u64>,
    timers: BTreeSet<u64>,
    sent_bytes: usize,
    closed_by_guest: usize,
}

impl Driver {
    fn new(instance: Instance) -> Driver {
        Driver {
            instance,
            open: BTreeSet::new(),
            timers: BTreeSet::new(),
            sent_bytes: 0,
            closed_by_guest: 0,
        }
    }

    async fn connect(&mut self, id: u64) -> Result<(), String> {
        let info = ConnInfo {
            id,
            listener: "default".into(),
            peer: format!("127.0.0.1:{}", 40_000 + id % 20_000),
        };
        let result = self.instance.on_connect(&info).await;
        self.open.insert(id);
        trapped(result, &format!("on-connect({id})"))?;
        self.settle().await
    }

    async fn data(&mut self, id: u64, data: &[u8]) -> Result<(), String> {
        if !self.open.contains(&id) {
            return Ok(()); // the guest closed it: late bytes are dropped
        }
        let result = self.instance.on_data(id, data).await;
        trapped(result, &format!("on-data({id})"))?;
        self.settle().await
    }

    /// The peer left.
    async fn close(&mut self, id: u64) -> Result<(), String> {
        if !self.open.remove(&id) {
            return Ok(());
        }
        let result = self.instance.on_close(id).await;
        trapped(result, &format!("on-close({id})"))?;
        self.settle().await
    }

    /// Carries out the effects of the last call; connections the guest
    /// closed get their `on-close`, whose effects are carried out in turn.
    async fn settle(&mut self) -> Result<(), String> {
        // Each round closes at least one open connection, or ends.
        for _ in 0..=self.open.len() + 1 {
            let mut closing = Vec::new();
            for effect in self.instance.take_effects() {
                match effect {
                    Effect::Send(id, data) if self.open.contains(&id) => {
                        self.sent_bytes += data.len()
                    }
                    Effect::Send(..) => {}
                    Effect::Close(id) => {
                        if self.open.remove(&id) {
                            closing.push(id);
                        }
                    }
                    Effect::SetTimer(token, _) => {
                        self.timers.insert(token);
                    }
                    Effect::CancelTimer(token) => {
                        self.timers.remove(&token);
                    }
                }
            }
            if closing.is_empty() {
                return Ok(());
            }
            for id in closing {
                self.closed_by_guest += 1;
                let result = self.instance.on_close(id).await;
                trapped(result, &format!("on-close({id}) of a connection it closed"))?;
            }
        }
        Ok(())
    }
}

fn trapped(result: anyhow::Result<()>, call: &str) -> Result<(), String> {
    result.map_err(|trap| format!("trapped in {call}: {}", service::root(&trap)))
}

struct Checker<'a> {
    opts: &'a CheckOptions,
    report: CheckReport,
    progress: &'a dyn Fn(&str),
}

impl Checker<'_> {
    fn push(&mut self, name: impl Into<String>, outcome: Outcome, detail: impl Into<String>) {
        self.report.checks.push(Check {
            name: name.into(),
            outcome,
            detail: detail.into(),
            difference: None,
        });
    }

    fn file_name(&self) -> String {
        short_name(&self.opts.file)
    }

    async fn instance(&mut self, program: &Arc<Program>, what: &str) -> Option<Instance> {
        match Instance::new(program.clone(), SERVICE.into(), &self.opts.limits).await {
            Ok(instance) => Some(instance),
            Err(e) => {
                self.push(
                    format!("instantiate {what}"),
                    Outcome::Fail,
                    format!("{e:#}"),
                );
                None
            }
        }
    }

    async fn run(&mut self, file: Arc<Program>, other: Option<Arc<Program>>) {
        let Some(exports) = self.file_checks(&file).await else {
            return;
        };
        if let Some(other) = other {
            self.against_checks(&other, &exports).await;
        }
        self.leak_check(&file).await;
    }

    /// Steps 1 to 3; returns the state exported in each format, or `None`
    /// when the guest cannot be driven further.
    async fn file_checks(&mut self, program: &Arc<Program>) -> Option<Vec<(String, Vec<u8>)>> {
        let started = Instant::now();
        let mut instance = self.instance(program, "the component").await?;
        self.report.file.instantiate_us = Some(micros(started.elapsed()));
        let importable = match instance.importable().await {
            Ok(formats) => formats,
            Err(trap) => {
                let why = service::root(&trap);
                self.push("importable()", Outcome::Fail, format!("trapped: {why}"));
                return None;
            }
        };
        self.report.file.importable = importable.clone();
        self.push(
            "importable()",
            Outcome::Pass,
            format!(
                "a new instance answers [{}] (a swap asks it before anything else)",
                importable.join(", ")
            ),
        );
        let config = &self.opts.config;
        let with = match config.is_empty() {
            true => "no configuration".to_string(),
            false => format!("{} --config pairs", config.len()),
        };
        match instance.init(config).await {
            Ok(Ok(())) => self.push("init", Outcome::Pass, format!("with {with}: ok")),
            Ok(Err(msg)) => {
                self.push(
                    "init",
                    Outcome::Fail,
                    format!(
                        "with {with}, init returned an error: {msg}; if it needs configuration, \
                         pass it with --config KEY=VALUE"
                    ),
                );
                return None;
            }
            Err(trap) => {
                let why = service::root(&trap);
                self.push(
                    "init",
                    Outcome::Fail,
                    format!("with {with}, trapped: {why}"),
                );
                return None;
            }
        }
        self.report.file.memory_after_init_bytes = Some(instance.memory_bytes());
        let mut driver = Driver::new(instance);
        let mut driven = Ok(());
        for (id, probe) in (1..).zip(PROBES) {
            driven = match driver.connect(id).await {
                Ok(()) => driver.data(id, probe).await,
                Err(e) => Err(e),
            };
            if driven.is_err() {
                break;
            }
        }
        let probes: Vec<String> = PROBES
            .iter()
            .map(|p| format!("{:?}", String::from_utf8_lossy(p)))
            .collect();
        let name = format!("{} connections with incomplete input", PROBES.len());
        if let Err(why) = driven {
            self.push(name, Outcome::Fail, why);
            return None;
        }
        self.push(
            name,
            Outcome::Pass,
            format!(
                "each sent one of {} (no newline): no trap; the guest sent {} bytes and closed {} \
                 of them",
                probes.join(", "),
                driver.sent_bytes,
                driver.closed_by_guest
            ),
        );
        let mut instance = driver.instance;
        let exportable = match instance.exportable().await {
            Ok(formats) => formats,
            Err(trap) => {
                let why = service::root(&trap);
                self.push("exportable()", Outcome::Fail, format!("trapped: {why}"));
                return None;
            }
        };
        self.report.file.exportable = exportable.clone();
        if exportable.is_empty() {
            self.push(
                "exportable()",
                Outcome::Warn,
                "exports no state format: a next version can only be swapped in with --fresh \
                 (the state is lost)",
            );
        }
        let mut exports = Vec::new();
        for format in &exportable {
            (self.progress)(&format!("round trip of {format}..."));
            // The swap's own export, asked for this format.
            let wanted = [format.clone()];
            let mut timings = Timings::default();
            let exported = service::export(
                &mut instance,
                &wanted,
                service::SwapKind::Swap,
                &mut timings,
            )
            .await;
            let state = match exported {
                Ok(Ok(exported)) => exported.state,
                Ok(Err(msg)) => {
                    let detail = format!("exportable() lists {format}, but: {msg}");
                    self.push(format!("export {format}"), Outcome::Fail, detail);
                    continue;
                }
                Err(service::ExportTrap { call, trap }) => {
                    let why = service::root(&trap);
                    let detail = format!("trapped in {call}: {why}");
                    self.push(format!("export {format}"), Outcome::Fail, detail);
                    break; // the instance is lost
                }
            };
            if importable.contains(format) {
                let target = self.instance(program, "a second instance").await;
                if let Some(target) = target {
                    let (check, _) =
                        round_trip(target, format, &state, "a new instance", true).await;
                    self.report
                        .checks
                        .push(check.named(format!("{format} round trip")));
                }
            } else {
                self.push(
                    format!("{format} importable"),
                    Outcome::Warn,
                    format!(
                        "{format} is exported but not importable by this version itself \
                         (importable: [{}]): a swap to a rebuild of it, or a rollback to it, \
                         cannot carry state in {format}; its round trip was not tried",
                        importable.join(", ")
                    ),
                );
            }
            exports.push((format.clone(), state));
        }
        Some(exports)
    }

    /// Step 4: OTHER takes each format FILE exports.
    async fn against_checks(&mut self, other: &Arc<Program>, exports: &[(String, Vec<u8>)]) {
        let other_name = short_name(self.opts.against.as_deref().unwrap_or(Path::new("")));
        let file_name = self.file_name();
        let started = Instant::now();
        let Some(mut instance) = self.instance(other, "--against").await else {
            return;
        };
        self.report
            .against
            .as_mut()
            .expect("--against")
            .instantiate_us = Some(micros(started.elapsed()));
        let importable = match instance.importable().await {
            Ok(formats) => formats,
            Err(trap) => {
                let why = service::root(&trap);
                self.push(
                    format!("{other_name} importable()"),
                    Outcome::Fail,
                    format!("trapped: {why}"),
                );
                return;
            }
        };
        self.report.against.as_mut().expect("--against").importable = importable.clone();
        drop(instance);
        let exportable: Vec<String> = exports.iter().map(|(f, _)| f.clone()).collect();
        let negotiated = negotiate(&importable, &exportable);
        match &negotiated {
            Some(format) => self.push(
                "swap format",
                Outcome::Pass,
                format!(
                    "a swap from {file_name} to {other_name} would carry the state in {format}"
                ),
            ),
            None => self.push(
                "swap format",
                Outcome::Fail,
                service::no_common_format(service::SwapKind::Swap, &importable, &exportable),
            ),
        }
        for (format, state) in exports {
            let name = format!("{format} into {other_name}");
            if !importable.contains(format) {
                self.push(
                    name,
                    Outcome::Fail,
                    format!(
                        "{other_name} does not import {format} (it imports [{}]): it cannot take \
                         the state {file_name} exports in {format}",
                        importable.join(", ")
                    ),
                );
                continue;
            }
            (self.progress)(&format!("importing {format} into {other_name}..."));
            let Some(target) = self.instance(other, "--against").await else {
                return;
            };
            let (check, exportable_after) =
                round_trip(target, format, state, &other_name, false).await;
            if negotiated.as_ref() == Some(format) {
                self.report.against.as_mut().expect("--against").exportable = exportable_after;
            }
            self.report.checks.push(check.named(name));
        }
    }

    /// Step 5: connections opened and closed must not grow the linear
    /// memory.
    async fn leak_check(&mut self, program: &Arc<Program>) {
        let name = "leak";
        let Some(mut instance) = self.instance(program, "for the leak check").await else {
            return;
        };
        match instance.init(&self.opts.config).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return self.push(name, Outcome::Fail, format!("init: {msg}")),
            Err(trap) => {
                let why = service::root(&trap);
                return self.push(name, Outcome::Fail, format!("init trapped: {why}"));
            }
        }
        let total = self.opts.connections;
        let batch = BATCH.min(total).max(1);
        (self.progress)(&format!(
            "opening and closing {} connections (a warm-up batch of {batch}, then {total})...",
            batch + total
        ));
        let mut driver = Driver::new(instance);
        let mut next_id = 1u64;
        let mut samples = Vec::new();
        let mut after_warmup = 0;
        let mut remaining = total;
        let mut warmup = true;
        while warmup || remaining > 0 {
            let n = match warmup {
                true => batch,
                false => batch.min(remaining),
            };
            let ids: Vec<u64> = (next_id..next_id + n as u64).collect();
            next_id += n as u64;
            if let Err(why) = run_batch(&mut driver, &ids).await {
                return self.push(name, Outcome::Fail, why);
            }
            let memory = driver.instance.memory_bytes();
            if warmup {
                after_warmup = memory;
                warmup = false;
            } else {
                remaining -= n;
                samples.push(memory);
            }
        }
        let tolerance = leak_tolerance(after_warmup);
        // Growth may be a garbage-collected heap sizing itself: go on in
        // doubling phases until one stays flat, or the bound.
        let mut settled = None;
        let mut done = total;
        let started = std::time::Instant::now();
        let mut before = *samples.last().unwrap_or(&after_warmup);
        if before.saturating_sub(after_warmup) > tolerance && total > 0 {
            (self.progress)("memory grew: going on to see whether it settles...");
        }
        while before.saturating_sub(after_warmup) > tolerance
            && total > 0
            && done < SETTLE_MAX_CONNECTIONS
            && started.elapsed() < SETTLE_TIME
        {
            let mut remaining = done;
            while remaining > 0 {
                let n = batch.min(remaining);
                let ids: Vec<u64> = (next_id..next_id + n as u64).collect();
                next_id += n as u64;
                if let Err(why) = run_batch(&mut driver, &ids).await {
                    return self.push(name, Outcome::Fail, why);
                }
                remaining -= n;
                samples.push(driver.instance.memory_bytes());
            }
            let now = driver.instance.memory_bytes();
            if now.saturating_sub(before) <= tolerance {
                settled = Some((before, done, done));
                done *= 2;
                break;
            }
            before = now;
            done *= 2;
        }
        let last = *samples.last().unwrap_or(&after_warmup);
        let growth = match settled {
            Some(_) => 0,
            None => last.saturating_sub(after_warmup),
        };
        let batches = samples.len();
        let timers = driver.timers.len();
        self.report.leak = Some(LeakReport {
            connections: done,
            batch,
            memory_after_warmup_bytes: after_warmup,
            memory_after_batches_bytes: samples,
            tolerance_bytes: tolerance,
            timers_armed: timers,
        });
        let measured = format!(
            "{done} connections opened and closed in {batches} batches after a warm-up batch of \
             {batch} (on-connect, {} bytes of on-data, on-close each)",
            PROBES[0].len()
        );
        if growth > tolerance {
            let timers_note = match timers {
                0 => String::new(),
                n => format!(
                    "; it left {n} timers armed, which check never fires: if it frees a \
                     connection's state when a timer fires, this is not a leak"
                ),
            };
            self.push(
                name,
                Outcome::Fail,
                format!(
                    "{measured}: linear memory grew from {} to {} ({} more, about {} bytes per \
                     connection; tolerance {}): the guest keeps something of every closed \
                     connection{timers_note}",
                    human_bytes(after_warmup),
                    human_bytes(last),
                    human_bytes(growth),
                    growth / done.max(1),
                    human_bytes(tolerance)
                ),
            );
        } else if let Some((at, after, flat)) = settled {
            self.push(
                name,
                Outcome::Pass,
                format!(
                    "{measured}: linear memory grew from {} to {} over the first {after} \
                     connections, then stayed there for {flat} more (tolerance {}): a heap that \
                     sizes itself (a garbage collector), not a leak; budget --max-memory for it",
                    human_bytes(after_warmup),
                    human_bytes(at),
                    human_bytes(tolerance)
                ),
            );
        } else {
            self.push(
                name,
                Outcome::Pass,
                format!(
                    "{measured}: linear memory {} after the warm-up, {} after the last batch \
                     (tolerance {})",
                    human_bytes(after_warmup),
                    human_bytes(last),
                    human_bytes(tolerance)
                ),
            );
        }
    }
}

/// One batch of the leak check: every connection opened and sent a few
/// bytes, then every one closed.
async fn run_batch(driver: &mut Driver, ids: &[u64]) -> Result<(), String> {
    for &id in ids {
        driver.connect(id).await?;
        driver.data(id, PROBES[0]).await?;
    }
    for &id in ids {
        driver.close(id).await?;
    }
    Ok(())
}

impl Check {
    fn named(mut self, name: String) -> Check {
        self.name = name;
        self
    }
}

/// Imports `state` into `target` with the swap's own import and round-trip
/// validation ([`service::import_checked`]). Returns the check (unnamed)
/// and `target`'s `exportable()` after the import. When the validating
/// export fails and `target` does not list `format` in `exportable()`,
/// that is the finding: a failure for the same version
/// (`unlisted_fails`), else a warning.
async fn round_trip(
    mut target: Instance,
    format: &str,
    state: &[u8],
    target_name: &str,
    unlisted_fails: bool,
) -> (Check, Vec<String>) {
    let check = |outcome, detail: String| Check {
        name: String::new(),
        outcome,
        detail,
        difference: None,
    };
    let mut timings = Timings::default();
    let result = service::import_checked(
        &mut target,
        format,
        state,
        Validation::RoundTrip,
        &mut timings,
    )
    .await;
    let exportable = match &result {
        Err(e) if !e.in_validation => Vec::new(),
        _ => target.exportable().await.unwrap_or_default(),
    };
    let listed = exportable.iter().any(|f| f == format);
    let failure = match result {
        Ok(_) => {
            let detail = format!(
                "{} bytes exported, imported into {target_name}, re-exported identically",
                state.len()
            );
            return (check(Outcome::Pass, detail), exportable);
        }
        Err(failure) => failure,
    };
    if let Some((d, again)) = failure.mismatch {
        let detail = format!(
            "not canonical / loses state on import: exported {} bytes, imported into \
             {target_name}, which re-exported {} bytes; first difference at byte {}{}",
            d.first_len,
            d.second_len,
            d.offset,
            excerpt(state, &again, d.offset)
        );
        let failed = Check {
            difference: Some(d),
            ..check(Outcome::Fail, detail)
        };
        return (failed, exportable);
    }
    let why = failure.message.replace("the new version", target_name);
    if failure.in_validation && !listed {
        let detail = format!(
            "{target_name} imported {} bytes of {format} but then does not list {format} in \
             exportable() ([{}]), and {why}{}",
            state.len(),
            exportable.join(", "),
            match unlisted_fails {
                true =>
                    ": the same state should offer the same formats (it loses state on import?)",
                false =>
                    "; a swap with the default validation fails the same way (--no-validate \
                     skips it)",
            }
        );
        let outcome = match unlisted_fails {
            true => Outcome::Fail,
            false => Outcome::Warn,
        };
        return (check(outcome, detail), exportable);
    }
    (check(Outcome::Fail, why), exportable)
}

/// A few bytes of each side around `offset`, for the message.
fn excerpt(first: &[u8], second: &[u8], offset: usize) -> String {
    let show = |bytes: &[u8]| {
        let end = (offset + 8).min(bytes.len());
        let start = offset.min(end);
        match start == end {
            true => "(end)".to_string(),
            false => hex::encode(&bytes[start..end]),
        }
    };
    format!(
        "; from there the export reads {} and the re-export {}",
        show(first),
        show(second)
    )
}

fn short_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `512 bytes`, `47.4 KiB`, `18.0 MiB`.
pub fn human_bytes(n: usize) -> String {
    match n {
        n if n < 1 << 10 => format!("{n} bytes"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n => format!("{:.2} GiB", n as f64 / (1 << 30) as f64),
    }
}

/// Microseconds for people.
fn us(v: u64) -> String {
    match v {
        v if v < 10_000 => format!("{v} µs"),
        v if v < 1_000_000 => format!("{:.1} ms", v as f64 / 1000.0),
        v => format!("{:.1} s", v as f64 / 1e6),
    }
}

/// The report for people.
pub fn format_report(r: &CheckReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "component {}", r.file.path);
    format_component(&mut s, &r.file);
    if let Some(other) = &r.against {
        let _ = writeln!(s, "\nagainst {} (the next version)", other.path);
        format_component(&mut s, other);
    }
    if !r.checks.is_empty() {
        let _ = writeln!(s, "\nchecks");
    }
    for c in &r.checks {
        let label = match c.outcome {
            Outcome::Pass => "pass",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        let _ = writeln!(s, "  {label}  {}: {}", c.name, c.detail);
    }
    if r.error.is_none() {
        let warnings = r
            .checks
            .iter()
            .filter(|c| c.outcome == Outcome::Warn)
            .count();
        let failed = r.failures().count();
        let _ = match failed {
            0 => writeln!(
                s,
                "\ncheck passed: {} checks, {warnings} warnings",
                r.checks.len()
            ),
            n => writeln!(
                s,
                "\ncheck FAILED: {n} of {} checks failed, {warnings} warnings",
                r.checks.len()
            ),
        };
    }
    s
}

fn format_component(s: &mut String, c: &ComponentReport) {
    let mut line = |label: &str, value: &str| {
        let _ = writeln!(s, "  {label:<11} {value}");
    };
    if let Some(size) = c.size_bytes {
        let size = match size < 1 << 10 {
            true => human_bytes(size as usize),
            false => format!("{} ({size} bytes)", human_bytes(size as usize)),
        };
        line("size", &size);
    }
    if let Some(hash) = &c.sha256 {
        line("sha256", hash);
    }
    if let (Some(compile), Some(cached)) = (c.compile_us, c.from_cache) {
        let how = match cached {
            true => "loaded from the compile cache",
            false => "compiled (not in the compile cache)",
        };
        line("compile", &format!("{how} in {}", us(compile)));
    }
    if let Some(t) = c.instantiate_us {
        line("instantiate", &us(t));
    }
    if let Some(m) = c.memory_after_init_bytes {
        line(
            "memory",
            &format!("{} of linear memory after init", human_bytes(m)),
        );
    }
    if c.sha256.is_some() {
        for (label, items) in [("imports", &c.imports), ("exports", &c.exports)] {
            if items.is_empty() {
                line(label, "none");
            }
            for (i, item) in items.iter().enumerate() {
                let label = if i == 0 { label } else { "" };
                line(label, &format!("{} ({})", item.name, item.kind));
            }
        }
    }
    if c.valid {
        let list = |l: &[String]| match l.is_empty() {
            true => "none".to_string(),
            false => l.join(", "),
        };
        if c.instantiate_us.is_some() {
            line("importable", &list(&c.importable));
        }
        if c.memory_after_init_bytes.is_some() {
            let after = format!("after init and {} connections", PROBES.len());
            line("exportable", &format!("{} ({after})", list(&c.exportable)));
        } else if !c.exportable.is_empty() {
            line(
                "exportable",
                &format!("{} (after the import)", list(&c.exportable)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences() {
        assert_eq!(Difference::between(b"abc", b"abc"), None);
        let d = Difference::between(b"abcd", b"abXd").unwrap();
        assert_eq!((d.offset, d.first_len, d.second_len), (2, 4, 4));
        let d = Difference::between(b"abcd", b"ab").unwrap();
        assert_eq!((d.offset, d.first_len, d.second_len), (2, 4, 2));
        let d = Difference::between(b"", b"x").unwrap();
        assert_eq!(d.offset, 0);
    }

    #[test]
    fn tolerance_is_a_page_or_one_percent() {
        assert_eq!(leak_tolerance(1 << 20), PAGE);
        assert_eq!(leak_tolerance(100 << 20), 1 << 20);
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_bytes(48_493), "47.4 KiB");
        assert_eq!(human_bytes(18 << 20), "18.0 MiB");
    }
}
