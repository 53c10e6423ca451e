//! `wasmhost serve`: start a service and run it until shutdown.
//!
//! Start-up is all or nothing: listeners are bound, the component is
//! compiled and type-checked, and `init` is called before the first
//! connection is accepted; any failure returns an error and leaves nothing
//! running. A process started by a host upgrade assembles the same server
//! from what the old process handed over (`crate::upgrade::receive`).

use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::server::{ControlCtx, ControlSocket};
use crate::durable;
use crate::engine::Runtime;
use crate::net::{self, AcceptCtx, ConnLimits, FreezeSwitch, ListenSpec};
use crate::service::{
    self, Ended, Exclusive, Instance, InstanceLimits, Program, ServiceHandle, ServiceSpec, Spread,
    Start,
};
use crate::upgrade::Upgrader;

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The component to start with; `None` for a host that waits for a
    /// service (`--receive`).
    pub guest: Option<PathBuf>,
    pub name: String,
    pub listen: Vec<ListenSpec>,
    pub config: Vec<(String, String)>,
    pub max_connections: usize,
    pub conn_limits: ConnLimits,
    pub instance_limits: InstanceLimits,
    /// Journal, snapshots and the restart budget.
    pub durable: crate::durable::Policy,
    /// The compile cache; `None` compiles every time.
    pub cache: Option<crate::engine::CompileCache>,
    /// How long shutdown waits for connections to flush.
    pub shutdown_timeout: Duration,
    /// The control socket's path; `None` runs without one.
    pub control: Option<PathBuf>,
    /// How many instances serve the service (`--instances`; more than one
    /// only for a guest without state: [`crate::service::Spread`]).
    pub instances: usize,
    /// The link's certificates (`--tls-*`), for receiving and migrating.
    pub tls: Option<crate::migrate::TlsFiles>,
    /// keepalived's track file for this host (`--keepalived-track`), for
    /// `migrate --keepalived`.
    pub keepalived_track: Option<PathBuf>,
    /// A primary's replication (`--sync-standby`).
    pub replication: crate::standby::Replication,
}

/// How this process was started: what a host upgrade starts again.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The binary's path, read at start-up (if the file is replaced later,
    /// an upgrade starts the file now at that path).
    pub exe: PathBuf,
    /// The arguments after the program name.
    pub args: Vec<OsString>,
}

impl Launch {
    /// This process's binary and arguments.
    pub fn current() -> Result<Launch> {
        let exe = std::env::current_exe().context("cannot tell which binary this process runs")?;
        Ok(Launch {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// A started service: listeners bound, instance initialised, accepting.
pub struct Server {
    addrs: Vec<(Arc<str>, SocketAddr)>,
    control: Option<PathBuf>,
    service: ServiceHandle,
    /// With `--instances N`: the other N - 1 instances' actors.
    others: Vec<ServiceHandle>,
    actor: tokio::task::JoinHandle<Result<Ended>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    shutdown_timeout: Duration,
    operations: ControlCtx,
}

/// The parts a server is assembled from, fresh or handed over.
pub(crate) struct Parts {
    pub runtime: Runtime,
    pub instance: Instance,
    /// With `--instances N`: the other N - 1 instances, initialised.
    pub extra: Vec<Instance>,
    pub spec: ServiceSpec,
    pub start: Start,
    pub control: Option<ControlSocket>,
    /// The first connection id to hand out.
    pub next_id: u64,
}

/// A standby's live copy of the service, promoted (`crate::standby`): it
/// stands in for loading and replaying the state dir.
pub struct WarmStart {
    pub runtime: Runtime,
    pub replica: service::Replica,
}

impl Server {
    /// Starts the service described by `opts`, on the listening sockets
    /// systemd passed (`activated`, by name) or on newly bound ones.
    pub async fn start(
        opts: ServeOptions,
        launch: Launch,
        activated: Vec<(String, OwnedFd)>,
    ) -> Result<Server> {
        Server::start_from(opts, launch, activated, None).await
    }

    /// Starts a promoted standby's service from its live copy (`warm`),
    /// whose state is what `opts`'s state dir holds: the same start as
    /// after a crash, without the replay.
    pub async fn start_warm(
        opts: ServeOptions,
        launch: Launch,
        activated: Vec<(String, OwnedFd)>,
        warm: WarmStart,
    ) -> Result<Server> {
        Server::start_from(opts, launch, activated, Some(warm)).await
    }

    async fn start_from(
        opts: ServeOptions,
        launch: Launch,
        activated: Vec<(String, OwnedFd)>,
        warm: Option<WarmStart>,
    ) -> Result<Server> {
        let mut specs = opts.listen.clone();
        net::name_listeners(&mut specs)?;
        let listeners = net::bind_all(&specs, activated).await?;
        let control = match &opts.control {
            Some(path) => Some(ControlSocket::bind(path).await?),
            None => None,
        };
        if opts.instances > 1 && opts.durable.state_dir.is_some() {
            anyhow::bail!(
                "--state-dir keeps a service's state on disk, and --instances {} runs a service \
                 without state: use one or the other",
                opts.instances
            );
        }
        let (runtime, program, mut warm) = match warm {
            Some(WarmStart { runtime, replica }) => {
                (runtime, replica.program.clone(), Some(replica))
            }
            None => {
                let runtime = Runtime::new(opts.cache.clone())?;
                let guest = opts.guest.clone().context(
                    "no component to serve (give one, or --receive to wait for a service)",
                )?;
                let path = std::path::absolute(&guest).unwrap_or(guest);
                let program = load_program(&runtime, &path).await?;
                (runtime, program, None)
            }
        };
        let spec = ServiceSpec {
            name: opts.name.as_str().into(),
            config: opts.config.clone(),
            limits: opts.instance_limits.clone(),
            durable: opts.durable.clone(),
            listeners: listeners
                .iter()
                .map(|l| {
                    let addr = l
                        .listener
                        .local_addr()
                        .expect("bound socket has an address");
                    (l.name.to_string(), addr)
                })
                .collect(),
        };
        let mut start = Start::fresh(listeners);
        let mut next_id = 1;
        let mut extra = Vec::new();
        let instance = match &opts.durable.state_dir {
            None if opts.instances > 1 => {
                let mut first = service::start_fresh(program.clone(), &spec).await?;
                service::require_stateless(&mut first, "the service")
                    .await
                    .map_err(|why| anyhow::anyhow!("--instances {}: {why}", opts.instances))?;
                for _ in 1..opts.instances {
                    extra.push(service::start_fresh(program.clone(), &spec).await?);
                }
                first
            }
            None => service::start_fresh(program, &spec).await?,
            Some(dir) if warm.is_some() => {
                let replica = warm.take().expect("the guard says it is there");
                let reached = replica.reached;
                start.disk = Some(durable::disk::Attach::resume_at(
                    dir,
                    opts.durable.fsync,
                    reached,
                )?);
                let restored = replica.into_restored();
                tracing::info!(
                    "state from the standby's live copy (up to byte {} of journal {}); {} \
                     connections were open at the crash (they get on-close), {} timers armed",
                    reached.1,
                    reached.0,
                    restored.closes.len(),
                    restored.timers.len()
                );
                start.restored(restored, &mut next_id)
            }
            Some(dir) => {
                let fsync = opts.durable.fsync;
                match durable::disk::load(dir)? {
                    None => {
                        tracing::info!("state dir {} is new: starting fresh", dir.display());
                        start.disk = Some(durable::disk::Attach::fresh(dir, fsync)?);
                        service::start_fresh(program, &spec).await?
                    }
                    Some(loaded) => {
                        for warning in &loaded.warnings {
                            tracing::warn!("{warning}");
                        }
                        let began = std::time::Instant::now();
                        let (number, events) = (loaded.number, loaded.records.len());
                        let state_bytes = loaded.state.len();
                        start.disk = Some(durable::disk::Attach::resume(dir, fsync, &loaded)?);
                        let restored = service::restore(program, &spec, loaded)
                            .await
                            .with_context(|| {
                                format!("restoring the state from {}", dir.display())
                            })?;
                        tracing::info!(
                            "state restored from {}: snapshot {number} ({state_bytes} bytes) and \
                             {events} journaled events in {:?}; {} connections were open at the \
                             crash (they get on-close), {} timers armed",
                            dir.display(),
                            began.elapsed(),
                            restored.closes.len(),
                            restored.timers.len()
                        );
                        start.restored(restored, &mut next_id)
                    }
                }
            }
        };
        let parts = Parts {
            runtime,
            instance,
            extra,
            spec,
            start,
            control,
            next_id,
        };
        Ok(Server::assemble(parts, &opts, launch))
    }

    /// Spawns the service actor (which starts serving `parts.start`) and
    /// the control socket.
    pub(crate) fn assemble(parts: Parts, opts: &ServeOptions, launch: Launch) -> Server {
        let (service, mailbox) = service::mailbox();
        let (others, other_mailboxes): (Vec<_>, Vec<_>) =
            parts.extra.iter().map(|_| service::mailbox()).unzip();
        let spread = (!others.is_empty()).then(|| {
            let all = std::iter::once(service.clone()).chain(others.iter().cloned());
            Spread::new(all.collect())
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let net = AcceptCtx {
            service: service.clone(),
            spread,
            limits: opts.conn_limits,
            permits: Arc::new(Semaphore::new(opts.max_connections)),
            next_id: Arc::new(AtomicU64::new(parts.next_id)),
            shutdown: shutdown.clone(),
            freeze: FreezeSwitch::default(),
            tracker: tracker.clone(),
        };
        let addrs = parts
            .spec
            .listeners
            .iter()
            .map(|(name, addr)| (Arc::from(name.as_str()), *addr))
            .collect();
        let (name, limits) = (parts.spec.name.clone(), parts.spec.limits.clone());
        let mut actors = Vec::new();
        for ((instance, handle), mailbox) in
            parts.extra.into_iter().zip(&others).zip(other_mailboxes)
        {
            let net = AcceptCtx {
                service: handle.clone(),
                ..net.clone()
            };
            let start = Start::fresh(Vec::new());
            actors.push(service::spawn(
                instance,
                parts.spec.clone(),
                mailbox,
                net,
                start,
            ));
        }
        let first = service::spawn(parts.instance, parts.spec, mailbox, net, parts.start);
        let actor = match actors.is_empty() {
            true => first,
            false => tokio::spawn(supervise(first, actors)),
        };
        let upgrader = Upgrader {
            service: service.clone(),
            name: name.clone(),
            launch,
            control: parts.control.as_ref().map(ControlSocket::handoff),
            exclusive: Exclusive::default(),
            instances: others.len() + 1,
            tls: opts.tls.clone(),
            keepalived: opts
                .keepalived_track
                .clone()
                .map(|track| crate::migrate::address::Keepalived { track }),
        };
        let operations = ControlCtx {
            runtime: parts.runtime,
            service: service.clone(),
            instances: std::iter::once(service.clone())
                .chain(others.iter().cloned())
                .collect(),
            name,
            limits,
            upgrader,
        };
        let control = parts.control.as_ref().map(|s| s.path().to_path_buf());
        if let Some(socket) = parts.control {
            let serve = socket.serve(operations.clone(), shutdown.clone(), tracker.clone());
            tracker.spawn(serve);
        }
        Server {
            addrs,
            control,
            service,
            others,
            actor,
            shutdown,
            tracker,
            shutdown_timeout: opts.shutdown_timeout,
            operations,
        }
    }

    /// What swaps and upgrades this server (for SIGHUP and SIGUSR2; the
    /// control socket uses the same).
    pub fn operations(&self) -> ControlCtx {
        self.operations.clone()
    }

    /// The bound addresses, with their listener names.
    pub fn addrs(&self) -> &[(Arc<str>, SocketAddr)] {
        &self.addrs
    }

    /// The control socket's path, if there is one.
    pub fn control_path(&self) -> Option<&std::path::Path> {
        self.control.as_deref()
    }

    /// Serves until `shutdown` resolves, then stops accepting, flushes and
    /// closes every connection; or until the service was handed to a new
    /// host process, then lets the connections it was closing finish.
    /// Returns an error if the service failed.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Ended> {
        let ended = tokio::select! {
            _ = shutdown => None,
            result = &mut self.actor => Some(result),
        };
        self.shutdown.cancel();
        let ended = match ended {
            Some(ended) => ended,
            None => {
                tracing::info!("shutting down: closing connections");
                for other in &self.others {
                    other.shutdown().await;
                }
                self.service.shutdown().await;
                self.flush().await;
                (&mut self.actor).await
            }
        };
        match ended {
            Ok(Ok(Ended::Stopped)) => Ok(Ended::Stopped),
            Ok(Ok(Ended::HandedOff)) => {
                self.flush().await;
                tracing::info!(
                    "the service was handed over (to a new host process or another machine); \
                     it ended here"
                );
                Ok(Ended::HandedOff)
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("the service actor panicked: {e}")),
        }
    }

    /// Waits (up to the shutdown timeout) for connection tasks to write
    /// what they have.
    async fn flush(&self) {
        self.tracker.close();
        if tokio::time::timeout(self.shutdown_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still writing after {:?}; closing them unflushed",
                self.shutdown_timeout
            );
        }
    }
}

/// Waits for the actors of `--instances N`: the first to fail is the
/// service's error (the others are then shut down with the server); when
/// they stop, the first instance's end is the service's.
async fn supervise(
    first: tokio::task::JoinHandle<Result<Ended>>,
    others: Vec<tokio::task::JoinHandle<Result<Ended>>>,
) -> Result<Ended> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let count = others.len() + 1;
    for (index, actor) in std::iter::once(first).chain(others).enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let ended = match actor.await {
                Ok(ended) => ended,
                Err(e) => Err(anyhow::anyhow!("instance {index}'s actor panicked: {e}")),
            };
            let _ = tx.send((index, ended));
        });
    }
    let mut first_end = None;
    for _ in 0..count {
        let Some((index, ended)) = rx.recv().await else {
            break;
        };
        match ended {
            Err(e) => return Err(e.context(format!("instance {index} of {count} failed"))),
            Ok(end) if index == 0 => first_end = Some(end),
            Ok(_) => {}
        }
    }
    Ok(first_end.unwrap_or(Ended::Stopped))
}

/// Reads, compiles (or loads from the cache) and type-checks a component,
/// off the async threads.
pub(crate) async fn load_program(
    runtime: &Runtime,
    path: &std::path::Path,
) -> Result<Arc<Program>> {
    let (rt, owned) = (runtime.clone(), path.to_path_buf());
    let program = tokio::task::spawn_blocking(move || Program::prepare(&rt, &owned))
        .await
        .context("compiling the component panicked")??;
    tracing::info!(
        component = %program.path.display(),
        hash = program.short_hash(),
        cached = program.from_cache,
        "component ready in {:?}",
        program.compile_time
    );
    Ok(program)
}
