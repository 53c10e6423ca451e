//! `wasmhost serve`: start a service and run it until shutdown.
//!
//! Start-up is all or nothing: listeners are bound, the component is
//! compiled and type-checked, and `init` is called before the first
//! connection is accepted; any failure returns an error and leaves nothing
//! running.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::server::{ControlCtx, ControlSocket};
use crate::engine::Runtime;
use crate::net::{self, AcceptCtx, ConnLimits, ListenSpec};
use crate::service::{self, InstanceLimits, Program, ServiceHandle, ServiceSpec};

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub guest: PathBuf,
    pub name: String,
    pub listen: Vec<ListenSpec>,
    pub config: Vec<(String, String)>,
    pub max_connections: usize,
    pub conn_limits: ConnLimits,
    pub instance_limits: InstanceLimits,
    /// Compile cache directory; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// How long shutdown waits for connections to flush.
    pub shutdown_timeout: Duration,
    /// The control socket's path; `None` runs without one.
    pub control: Option<PathBuf>,
}

/// A started service: listeners bound, instance initialised, accepting.
pub struct Server {
    addrs: Vec<(Arc<str>, SocketAddr)>,
    control: Option<PathBuf>,
    service: ServiceHandle,
    actor: tokio::task::JoinHandle<Result<()>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    shutdown_timeout: Duration,
}

impl Server {
    /// Starts the service described by `opts`.
    pub async fn start(opts: ServeOptions) -> Result<Server> {
        let mut specs = opts.listen.clone();
        net::name_listeners(&mut specs)?;
        let listeners = net::bind_all(&specs).await?;
        let control = match &opts.control {
            Some(path) => Some(ControlSocket::bind(path).await?),
            None => None,
        };
        let runtime = Runtime::new(opts.cache_dir.clone())?;
        let path = std::path::absolute(&opts.guest).unwrap_or_else(|_| opts.guest.clone());
        let rt = runtime.clone();
        let program = tokio::task::spawn_blocking(move || Program::prepare(&rt, &path))
            .await
            .context("compiling the component panicked")??;
        tracing::info!(
            component = %program.path.display(),
            hash = program.short_hash(),
            cached = program.from_cache,
            "component ready in {:?}",
            program.compile_time
        );
        let spec = ServiceSpec {
            name: opts.name.as_str().into(),
            config: opts.config.clone(),
            limits: opts.instance_limits.clone(),
            listeners: listeners
                .iter()
                .map(|l| {
                    (
                        l.name.to_string(),
                        l.listener
                            .local_addr()
                            .expect("bound socket has an address"),
                    )
                })
                .collect(),
        };
        let instance = service::start_fresh(program, &spec).await?;
        let (name, limits) = (spec.name.clone(), spec.limits.clone());
        let (service, actor) = service::spawn(instance, spec);
        let mut server = Server::accept_on(listeners, service.clone(), actor, &opts);
        if let Some(socket) = control {
            server.control = Some(socket.path().to_path_buf());
            let ctx = ControlCtx {
                runtime,
                service,
                name,
                limits,
            };
            server
                .tracker
                .spawn(socket.serve(ctx, server.shutdown.clone()));
        }
        Ok(server)
    }

    fn accept_on(
        listeners: Vec<net::Listener>,
        service: ServiceHandle,
        actor: tokio::task::JoinHandle<Result<()>>,
        opts: &ServeOptions,
    ) -> Server {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ctx = AcceptCtx {
            service: service.clone(),
            limits: opts.conn_limits,
            permits: Arc::new(Semaphore::new(opts.max_connections)),
            next_id: Arc::new(AtomicU64::new(1)),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        };
        let mut addrs = Vec::new();
        for listener in listeners {
            let addr = listener
                .listener
                .local_addr()
                .expect("bound socket has an address");
            addrs.push((listener.name.clone(), addr));
            tracker.spawn(net::accept_loop(listener, ctx.clone()));
        }
        Server {
            addrs,
            control: None,
            service,
            actor,
            shutdown,
            tracker,
            shutdown_timeout: opts.shutdown_timeout,
        }
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
    /// closes every connection. Returns an error if the service failed.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let failed = tokio::select! {
            _ = shutdown => None,
            result = &mut self.actor => Some(result),
        };
        self.shutdown.cancel();
        if let Some(result) = failed {
            self.tracker.close();
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("the service actor panicked: {e}")),
            };
        }
        tracing::info!("shutting down: closing connections");
        self.service.shutdown().await;
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
        match self.actor.await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("the service actor panicked: {e}")),
        }
    }
}
