//! A compiled, type-checked component ([`Program`]) and a live instance of it
//! ([`Instance`]) with one method per guest export.
//!
//! Every guest call runs under a CPU deadline: the epoch ticker advances
//! every few milliseconds, and at each tick the store's callback either
//! yields to tokio (so a long call never holds a worker thread) or, once the
//! call's budget is spent, interrupts it with a trap.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Store, UpdateDeadline};

use super::event_time::{EventTime, Stamp};
use super::state::{Effect, StoreData};
use crate::bindings::{ConnInfo, Service, ServicePre};
use crate::engine::{Loaded, Runtime};

/// The error a guest call fails with when it overruns its CPU budget.
#[derive(Debug, thiserror::Error)]
#[error("the guest call exceeded its CPU deadline of {} ms", budget.as_millis())]
pub struct DeadlineExceeded {
    pub budget: Duration,
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID) {
        Ok(t) => Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32),
        Err(_) => Duration::ZERO,
    }
}

/// Limits applied to every instance of a service.
#[derive(Clone, Debug)]
pub struct InstanceLimits {
    /// CPU time one event call (`on-*`, `init`) may take.
    pub event_timeout: Duration,
    /// CPU time `export-state` or `import-state` may take.
    pub state_timeout: Duration,
    /// Linear memory one instance may grow to, in bytes.
    pub max_memory: usize,
}

impl Default for InstanceLimits {
    fn default() -> Self {
        InstanceLimits {
            event_timeout: Duration::from_millis(1000),
            state_timeout: Duration::from_millis(10_000),
            max_memory: 1 << 30,
        }
    }
}

/// A component that was read, compiled and linked against the host, ready
/// to be instantiated any number of times. Kept by a service for as long as
/// its generation may be needed again (trap recovery, rollback).
pub struct Program {
    pre: ServicePre<StoreData>,
    pub path: PathBuf,
    /// Hex SHA-256 of the component file.
    pub hash: String,
    pub compile_time: Duration,
    pub from_cache: bool,
}

impl Program {
    /// Reads, compiles (or loads from the cache) and type-checks `path`
    /// against the `wasmhost:service/service` world.
    pub fn prepare(runtime: &Runtime, path: &Path) -> Result<Arc<Program>> {
        Program::link(runtime, runtime.load(path)?)
    }

    /// Type-checks a component [`Runtime::load`] read and compiled (the
    /// second half of [`prepare`](Self::prepare)).
    pub fn link(runtime: &Runtime, loaded: Loaded) -> Result<Arc<Program>> {
        let path = &loaded.path;
        let mut linker = Linker::<StoreData>::new(runtime.engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from)?;
        Service::add_to_linker::<_, HasSelf<_>>(&mut linker, |data| data)
            .map_err(anyhow::Error::from)?;
        let not_a_service = || {
            format!(
                "{} is not a wasmhost service: it does not match the world \
                 wasmhost:service/service (see guest-wit/service.wit)",
                path.display()
            )
        };
        let pre = linker
            .instantiate_pre(&loaded.component)
            .map_err(anyhow::Error::from)
            .with_context(not_a_service)?;
        let pre = ServicePre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(not_a_service)?;
        crate::standby::note_component(&loaded.hash, &loaded.path);
        Ok(Arc::new(Program {
            pre,
            path: loaded.path,
            hash: loaded.hash,
            compile_time: loaded.compile_time,
            from_cache: loaded.from_cache,
        }))
    }

    /// The first 12 hex digits of the hash, for messages.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }
}

/// One live instance of a [`Program`], with its own store.
pub struct Instance {
    store: Store<StoreData>,
    bindings: Service,
    pub program: Arc<Program>,
    limits: InstanceLimits,
    /// The clocks and generators the guest sees (see `event_time`).
    time: EventTime,
    /// The stamp of the instantiation (the component's start functions).
    born: Stamp,
    /// While replaying: the stamp the next calls get instead of a new one.
    pinned: Option<Stamp>,
}

impl Instance {
    /// Instantiates `program` with nothing called yet.
    pub async fn new(
        program: Arc<Program>,
        service: Arc<str>,
        limits: &InstanceLimits,
    ) -> Result<Instance> {
        let time = EventTime::new();
        let born = time.next();
        Instance::instantiate(program, service, limits, time, born).await
    }

    /// Instantiates `program` again as the instance with `key` was, its
    /// instantiation stamped `born`: the start of a rebuild, which then
    /// imports a snapshot and replays the journal with
    /// [`pin`](Self::pin)ned stamps.
    pub async fn rebuild(
        program: Arc<Program>,
        service: Arc<str>,
        limits: &InstanceLimits,
        key: [u8; 32],
        born: Stamp,
    ) -> Result<Instance> {
        let time = EventTime::with_key(key);
        Instance::instantiate(program, service, limits, time, born).await
    }

    async fn instantiate(
        program: Arc<Program>,
        service: Arc<str>,
        limits: &InstanceLimits,
        time: EventTime,
        born: Stamp,
    ) -> Result<Instance> {
        let engine = program.pre.engine();
        // Instantiation runs the component's start functions: a call too.
        time.begin(born);
        let mut store = Store::new(engine, StoreData::new(service, limits.max_memory, &time));
        store.limiter(|data| &mut data.limits);
        store.epoch_deadline_callback(|mut ctx| {
            let data = ctx.data_mut();
            let spent = match data.cpu_clock {
                false => data.call_started.elapsed(),
                true => {
                    let now = thread_cpu_time();
                    now.saturating_sub(*data.cpu_started.get_or_insert(now))
                }
            };
            if spent > data.call_budget {
                return Err(wasmtime::Error::new(DeadlineExceeded {
                    budget: data.call_budget,
                }));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store.data_mut().call_budget = limits.event_timeout;
        store.data_mut().call_started = Instant::now();
        store.set_epoch_deadline(1);
        let bindings = program
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| format!("instantiating {}", program.path.display()))?;
        Ok(Instance {
            store,
            bindings,
            program,
            limits: limits.clone(),
            time,
            born,
            pinned: None,
        })
    }

    /// The instance's secret key (its random bytes derive from it).
    pub fn key(&self) -> [u8; 32] {
        self.time.key()
    }

    /// The stamp of the instantiation.
    pub fn born(&self) -> Stamp {
        self.born
    }

    /// Gives the next calls `stamp` instead of a new one (`None`: new
    /// stamps again). A replay pins each event's recorded stamp.
    pub fn pin(&mut self, stamp: Option<Stamp>) {
        self.pinned = stamp;
    }

    /// Measures each call's deadline in CPU time of the calling thread
    /// (`true`) or in wall time (the default). Only for an instance whose
    /// calls always run on one thread (a shadow's): an async call may
    /// otherwise resume on another thread, whose CPU clock is another.
    pub fn cpu_deadline(&mut self, on: bool) {
        self.store.data_mut().cpu_clock = on;
    }

    /// Makes the next call's stamp come after `last`.
    pub fn advance_past(&self, last: Stamp) {
        self.time.advance_past(last);
    }

    /// Bytes of linear memory the instance holds (every memory of its
    /// core instances), as allowed by the store's limiter.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limits.memory_bytes
    }

    /// Effects recorded by the calls since the last drain.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.store.data_mut().effects)
    }

    /// The stamp of the call in progress, or of the last one: its time and
    /// sequence number.
    pub fn stamp(&self) -> Stamp {
        self.time.stamp()
    }

    /// Starts one call: its stamp (the time the guest sees during it, the
    /// seed of its random bytes) and its deadline.
    fn arm(&mut self, budget: Duration) {
        let stamp = self.pinned.unwrap_or_else(|| self.time.next());
        self.time.begin(stamp);
        let data = self.store.data_mut();
        data.call_started = Instant::now();
        data.call_budget = budget;
        data.cpu_started = None;
        self.store.set_epoch_deadline(1);
    }

    pub async fn init(&mut self, config: &[(String, String)]) -> Result<Result<(), String>> {
        self.arm(self.limits.event_timeout);
        let handler = self.bindings.wasmhost_service_handler();
        handler
            .call_init(&mut self.store, config)
            .await
            .map_err(anyhow::Error::from)
    }

    pub async fn on_connect(&mut self, info: &ConnInfo) -> Result<()> {
        self.arm(self.limits.event_timeout);
        let handler = self.bindings.wasmhost_service_handler();
        handler
            .call_on_connect(&mut self.store, info)
            .await
            .map_err(anyhow::Error::from)
    }

    pub async fn on_data(&mut self, conn: u64, data: &[u8]) -> Result<()> {
        self.arm(self.limits.event_timeout);
        let handler = self.bindings.wasmhost_service_handler();
        handler
            .call_on_data(&mut self.store, conn, data)
            .await
            .map_err(anyhow::Error::from)
    }

    pub async fn on_close(&mut self, conn: u64) -> Result<()> {
        self.arm(self.limits.event_timeout);
        let handler = self.bindings.wasmhost_service_handler();
        handler
            .call_on_close(&mut self.store, conn)
            .await
            .map_err(anyhow::Error::from)
    }

    pub async fn on_timer(&mut self, token: u64) -> Result<()> {
        self.arm(self.limits.event_timeout);
        let handler = self.bindings.wasmhost_service_handler();
        handler
            .call_on_timer(&mut self.store, token)
            .await
            .map_err(anyhow::Error::from)
    }

    pub async fn importable(&mut self) -> Result<Vec<String>> {
        self.arm(self.limits.event_timeout);
        let migrate = self.bindings.wasmhost_service_migrate();
        migrate
            .call_importable(&mut self.store)
            .await
            .map_err(anyhow::Error::from)
    }

    pub async fn exportable(&mut self) -> Result<Vec<String>> {
        self.arm(self.limits.event_timeout);
        let migrate = self.bindings.wasmhost_service_migrate();
        migrate
            .call_exportable(&mut self.store)
            .await
            .map_err(anyhow::Error::from)
    }

    pub async fn export_state(&mut self, format: &str) -> Result<Result<Vec<u8>, String>> {
        self.arm(self.limits.state_timeout);
        let migrate = self.bindings.wasmhost_service_migrate();
        migrate
            .call_export_state(&mut self.store, format)
            .await
            .map_err(anyhow::Error::from)
    }

    pub async fn import_state(&mut self, format: &str, state: &[u8]) -> Result<Result<(), String>> {
        self.arm(self.limits.state_timeout);
        let migrate = self.bindings.wasmhost_service_migrate();
        migrate
            .call_import_state(&mut self.store, format, state)
            .await
            .map_err(anyhow::Error::from)
    }
}
