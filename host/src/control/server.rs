//! The control socket's server side, run by `wasmhost serve`.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::protocol::{self, FrameError, Request, RequestFrame, Response, ResponseFrame, VERSION};
use crate::engine::Runtime;
use crate::service::{
    self, GradualOptions, InstanceLimits, Program, ServiceHandle, ShadowOptions, SwapKind,
    SwapOptions, SwapReport, Validation,
};
use crate::upgrade::{self, UpgradeOptions, Upgrader};

/// What request handlers need.
#[derive(Clone)]
pub struct ControlCtx {
    pub runtime: Runtime,
    pub service: ServiceHandle,
    /// Every instance's actor, `service` first (more than one with
    /// `serve --instances N`).
    pub instances: Vec<ServiceHandle>,
    pub name: Arc<str>,
    pub limits: InstanceLimits,
    pub upgrader: Upgrader,
}

/// Whether this process accepts control connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Open,
    /// A host upgrade is handing the service over: clients wait in the
    /// socket's backlog for whichever process serves next.
    Paused,
    /// Another process owns the socket: stop, and keep its file.
    HandedOver,
}

/// A bound control socket; the file is removed when this is dropped,
/// unless the socket was handed to a new host process.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    gate: Arc<watch::Sender<Gate>>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if *self.gate.borrow() != Gate::HandedOver {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a host upgrade needs of the control socket: its descriptor and
/// path to send, and a way to stop accepting on it.
#[derive(Clone)]
pub struct ControlHandoff {
    pub path: PathBuf,
    /// Valid while the control socket's task runs (until shutdown).
    pub fd: RawFd,
    gate: Arc<watch::Sender<Gate>>,
}

impl ControlHandoff {
    /// Stop accepting until [`resume`](Self::resume) or
    /// [`hand_over`](Self::hand_over), so that no client reaches a process
    /// that is about to stop serving.
    pub fn pause(&self) {
        self.gate.send_replace(Gate::Paused);
    }

    pub fn resume(&self) {
        self.gate.send_replace(Gate::Open);
    }

    pub fn handed_over(&self) -> bool {
        *self.gate.borrow() == Gate::HandedOver
    }

    /// The new process owns the socket now: close this process's copy and
    /// keep the file.
    pub fn hand_over(&self) {
        self.gate.send_replace(Gate::HandedOver);
    }
}

impl ControlSocket {
    /// Binds `path` (mode 0600), creating its directory (mode 0700) if
    /// needed. Refuses a path where another service is listening, and a
    /// directory that others can write to or that belongs to another user.
    pub async fn bind(path: &Path) -> Result<ControlSocket> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        prepare_dir(dir)?;
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another wasmhost is already using the control socket {}; stop it, or give this \
                 service another --name (or --control PATH)",
                path.display()
            );
        }
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed a stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!(
                "cannot remove the stale control socket {}: {e}",
                path.display()
            ),
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot create the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            gate: Arc::new(watch::Sender::new(Gate::Open)),
        })
    }

    /// A control socket handed over by the previous host process. Its
    /// file stays when this is dropped, until [`claim`](Self::claim): the
    /// previous process still serves on it if the handoff fails.
    pub fn adopt(listener: std::os::unix::net::UnixListener, path: &Path) -> Result<ControlSocket> {
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener: UnixListener::from_std(listener)?,
            path: path.to_path_buf(),
            gate: Arc::new(watch::Sender::new(Gate::HandedOver)),
        })
    }

    /// This process serves on the socket now: remove its file on exit.
    pub fn claim(&self) {
        self.gate.send_replace(Gate::Open);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn handoff(&self) -> ControlHandoff {
        ControlHandoff {
            path: self.path.clone(),
            fd: self.listener.as_raw_fd(),
            gate: self.gate.clone(),
        }
    }

    /// Answers requests until `shutdown`; each client's task is tracked,
    /// so a reply in progress is finished before the process exits.
    pub async fn serve(self, ctx: ControlCtx, shutdown: CancellationToken, tracker: TaskTracker) {
        let mut gate = self.gate.subscribe();
        loop {
            let state = *gate.borrow_and_update();
            if state == Gate::HandedOver {
                return;
            }
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = gate.changed() => continue,
                accepted = self.listener.accept(), if state == Gate::Open => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("control socket accept failed: {e}");
                        continue;
                    }
                },
            };
            let ctx = ctx.clone();
            tracker.spawn(async move {
                if let Err(e) = handle_client(stream, &ctx).await {
                    tracing::debug!("control client: {e}");
                }
            });
        }
    }
}

/// Creates `dir` with mode 0700 if missing; refuses one that another
/// (non-root) user owns, or that others may write to unless it is sticky
/// like /tmp.
fn prepare_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let meta =
        std::fs::metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    // Ours, or root's (like /run/user or /tmp): another user's directory
    // could be swapped out from under us.
    if meta.uid() != me && meta.uid() != 0 {
        bail!(
            "refusing the control directory {}: it belongs to uid {}, not to this user (uid {me}); \
             remove it or pass --control PATH",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
        bail!(
            "refusing the control directory {}: others may write to it (mode {:o}); chmod 700 it or pass --control PATH",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

impl ControlSocket {
    /// For a host with no service: answers `status` with `idle()` and
    /// every other request with an error saying there is no service, until
    /// `stop` is cancelled (then the socket is closed and its file removed).
    pub async fn serve_idle(
        self,
        idle: impl Fn() -> protocol::IdleStatus + Send + Sync + 'static,
        promote: Option<tokio::sync::mpsc::Sender<crate::standby::follow::Promotion>>,
        stop: CancellationToken,
    ) {
        let idle = Arc::new(idle);
        let tracker = TaskTracker::new();
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("control socket accept failed: {e}");
                        continue;
                    }
                },
            };
            let idle = idle.clone();
            let promote = promote.clone();
            tracker.spawn(async move {
                let answer = |request: Request| {
                    let idle = idle.clone();
                    let promote = promote.clone();
                    async move {
                        match (request, promote) {
                            (Request::Status, _) => Response::Idle(Box::new(idle())),
                            (Request::Promote, Some(promote)) => {
                                let (reply, answer) = tokio::sync::oneshot::channel();
                                let promotion = crate::standby::follow::Promotion { reply };
                                if promote.send(promotion).await.is_err() {
                                    return Response::Error {
                                        message: "this standby is shutting down".into(),
                                    };
                                }
                                match answer.await {
                                    Ok(Ok(message)) => Response::Promoted { message },
                                    Ok(Err(message)) => Response::Error { message },
                                    Err(_) => Response::Error {
                                        message: "the promotion failed; see the host's log".into(),
                                    },
                                }
                            }
                            _ => Response::Error {
                                message: format!(
                                    "no service here: this host waits for one on {} (migrate \
                                     sends it one); `status` says where its last one went",
                                    idle().waiting_on
                                ),
                            },
                        }
                    }
                };
                if let Err(e) = serve_client(stream, answer).await {
                    tracing::debug!("control client: {e}");
                }
            });
        }
        // The socket goes now (a service's own takes its place); requests
        // in flight are answered on their connections (a `promote` is
        // answered once the service it started serves).
        drop(self);
        tracker.close();
    }
}

async fn handle_client(stream: UnixStream, ctx: &ControlCtx) -> Result<()> {
    let fd = stream.as_raw_fd();
    serve_client(stream, |request| handle(request, ctx, fd)).await
}

/// Reads requests from a control client (after checking it is this
/// user) and answers each with `answer`.
async fn serve_client<F: Future<Output = Response>>(
    mut stream: UnixStream,
    answer: impl Fn(Request) -> F,
) -> Result<()> {
    let peer = stream.peer_cred()?.uid();
    let me = nix::unistd::geteuid().as_raw();
    if peer != me {
        tracing::warn!(
            peer_uid = peer,
            "refused a control request from another user"
        );
        let message = format!(
            "permission denied: this service's control socket belongs to uid {me}; requests from uid {peer} are refused"
        );
        reply(&mut stream, Response::Error { message }).await?;
        return Ok(());
    }
    loop {
        let frame: RequestFrame = match protocol::read_frame(&mut stream).await {
            Ok(frame) => frame,
            Err(FrameError::Closed) => return Ok(()),
            Err(e @ (FrameError::TooLarge(_) | FrameError::Malformed(_))) => {
                // The stream cannot be trusted to be in step any more.
                reply(
                    &mut stream,
                    Response::Error {
                        message: format!("bad request: {e}"),
                    },
                )
                .await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let response = if frame.version != VERSION {
            Response::Error {
                message: format!(
                    "unsupported control protocol version {} (this host speaks {VERSION})",
                    frame.version
                ),
            }
        } else {
            answer(frame.request).await
        };
        reply(&mut stream, response).await?;
    }
}

async fn reply(stream: &mut UnixStream, response: Response) -> Result<()> {
    protocol::write_frame(
        stream,
        &ResponseFrame {
            version: VERSION,
            response,
        },
    )
    .await?;
    Ok(())
}

/// Answers one request; `client` is the connection's descriptor, which an
/// `upgrade --exec` keeps open for the new image to answer on.
async fn handle(request: Request, ctx: &ControlCtx, client: RawFd) -> Response {
    let single = match &request {
        Request::Swap {
            shadow: Some(_), ..
        } => Some("a shadow swap"),
        Request::Swap {
            gradual: Some(_), ..
        } => Some("a drain or canary"),
        Request::Commit => Some("commit"),
        Request::Abort => Some("abort"),
        Request::Snapshot => Some("a snapshot"),
        _ => None,
    };
    if let Some(what) = single
        && ctx.instances.len() > 1
    {
        return Response::Error {
            message: format!(
                "{what} needs a service on one instance, and this one runs on {} (--instances)",
                ctx.instances.len()
            ),
        };
    }
    let result = match request {
        Request::Promote => Err(
            "this host serves already (it is a primary): `promote` makes a standby (`serve \
             --standby-of`) serve"
                .into(),
        ),
        Request::Status => status(ctx)
            .await
            .map(|s| Response::Status(Box::new(s)))
            .map_err(|e| e.to_string()),
        Request::Swap {
            shadow: Some(_),
            gradual: Some(_),
            ..
        } => Err("bad request: a swap is a shadow swap or a drain/canary, not both".into()),
        Request::Swap {
            path,
            fresh,
            no_validate,
            roundtrip,
            gradual: Some(opts),
            ..
        } => match fresh || no_validate || roundtrip {
            true => Err(
                "bad request: a drain or canary takes none of fresh, no_validate and roundtrip \
                 (the new version starts with init; there is no state to carry)"
                    .into(),
            ),
            false => gradual_swap(ctx, &path, opts).await,
        },
        Request::Swap {
            path,
            fresh,
            no_validate,
            roundtrip,
            shadow: Some(opts),
            ..
        } => match fresh || no_validate || roundtrip {
            true => Err(
                "bad request: a shadow swap takes none of fresh, no_validate and roundtrip (the \
                 shadow is validated by running it on live events)"
                    .into(),
            ),
            false => shadow_swap(ctx, &path, opts).await,
        },
        Request::Swap {
            path,
            fresh,
            no_validate,
            roundtrip,
            shadow: None,
            gradual: None,
        } => match (no_validate, roundtrip) {
            (true, true) => Err(
                "bad request: no_validate and roundtrip exclude each other (--no-validate skips the \
                 export that --validate roundtrip compares)"
                    .into(),
            ),
            (true, false) => swap(ctx, &path, fresh, Validation::None).await,
            (false, true) => swap(ctx, &path, fresh, Validation::RoundTrip).await,
            (false, false) => swap(ctx, &path, fresh, Validation::Export).await,
        },
        Request::Commit => commit(ctx).await,
        Request::Abort => ctx.service.abort().await.map(|aborted| match aborted {
            service::Aborted::Shadow(status) => Response::Shadow(status),
            service::Aborted::Gradual(status) => Response::Gradual(status),
        }),
        Request::Snapshot => match ctx.service.snapshot().await {
            Ok(Ok(report)) => Ok(Response::Snapshot(Box::new(report))),
            Ok(Err(why)) => Err(why),
            Err(stopped) => Err(stopped.to_string()),
        },
        Request::Rollback { no_validate, fresh } => {
            let validation = match no_validate {
                true => Validation::None,
                false => Validation::Export,
            };
            rollback(ctx, fresh, validation).await
        }
        Request::Upgrade {
            binary,
            component,
            timeout_ms,
            exec,
        } => {
            let opts = UpgradeOptions {
                binary,
                component,
                timeout: Duration::from_millis(timeout_ms),
                exec,
                reply_fd: Some(client),
            };
            upgrade::upgrade(&ctx.upgrader, opts)
                .await
                .map(|report| Response::Swapped(Box::new(report)))
        }
        Request::Drain { cancel } => {
            let health = crate::fleet::health();
            let was_draining = match cancel {
                true => health.undrain().await,
                false => Ok(health.drain().await),
            };
            let Ok(was_draining) = was_draining else {
                return Response::Error {
                    message: was_draining.unwrap_err(),
                };
            };
            status(ctx)
                .await
                .map(|s| {
                    Response::Drain(crate::control::protocol::DrainStatus {
                        draining: !cancel,
                        was_draining,
                        connections: s.connections,
                    })
                })
                .map_err(|e| e.to_string())
        }
        Request::Migrate {
            to,
            move_ip,
            relay,
            keepalived,
            peer_name,
            timeout_ms,
            tls,
        } => {
            let how = match (move_ip, relay) {
                (Some(addr), false) => Ok(crate::migrate::How::MoveIp(addr)),
                (None, true) => Ok(crate::migrate::How::Relay),
                _ => Err("a migration either moves the address (--move-ip) or relays (--relay)"),
            };
            let opts = how.map(|how| crate::migrate::MigrateOptions {
                to,
                peer_name,
                how,
                keepalived,
                timeout: Duration::from_millis(timeout_ms),
                tls: tls.map(|[cert, key, ca]| crate::migrate::TlsFiles { cert, key, ca }),
            });
            match opts {
                Ok(opts) => crate::migrate::migrate(&ctx.upgrader, opts)
                    .await
                    .map(|report| Response::Swapped(Box::new(report))),
                Err(why) => Err(why.to_string()),
            }
        }
    };
    match result {
        Ok(response) => response,
        // A client that connected just before a host upgrade committed
        // reached this process after its service left: send it on.
        Err(_)
            if ctx
                .upgrader
                .control
                .as_ref()
                .is_some_and(|c| c.handed_over()) =>
        {
            Response::Moved
        }
        Err(message) => Response::Error { message },
    }
}

/// SIGHUP: swap to the component file now at the running component's
/// path (replaced on disk by a deployment), carrying the state.
pub async fn reload(ctx: &ControlCtx) -> Result<SwapReport, String> {
    let status = ctx.service.status().await.map_err(|e| e.to_string())?;
    let path = PathBuf::from(status.component.path);
    match swap(ctx, &path, false, Validation::Export).await? {
        Response::Swapped(report) => Ok(*report),
        other => Err(format!("unexpected outcome: {other:?}")),
    }
}

/// Reads and compiles a component for a swap, off the async workers.
async fn load(ctx: &ControlCtx, path: &Path) -> Result<Arc<Program>, String> {
    let runtime = ctx.runtime.clone();
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || Program::prepare(&runtime, &owned))
        .await
        .map_err(|e| format!("compiling panicked: {e}"))?
        .map_err(|e| format!("{e:#}"))
}

async fn swap(
    ctx: &ControlCtx,
    path: &Path,
    fresh: bool,
    validation: Validation,
) -> Result<Response, String> {
    let _running = ctx.upgrader.exclusive.begin("a swap")?;
    let program = load(ctx, path).await?;
    let opts = SwapOptions {
        kind: SwapKind::Swap,
        fresh,
        validation,
        expect_generation: None,
        group: None,
    };
    run_swap(ctx, program, opts, true).await
}

/// `swap --shadow`: prepares the new version as for any swap and starts
/// it as a shadow; returns once it is synced (the client then follows its
/// progress with `status`).
async fn shadow_swap(
    ctx: &ControlCtx,
    path: &Path,
    opts: ShadowOptions,
) -> Result<Response, String> {
    let _running = ctx.upgrader.exclusive.begin("a swap")?;
    let status = ctx
        .service
        .shadow(load_prepared(ctx, path).await?, opts)
        .await?;
    Ok(Response::Shadow(Box::new(status)))
}

/// Reads, compiles and instantiates the component at `path` for a swap
/// ([`service::prepare`]).
async fn load_prepared(ctx: &ControlCtx, path: &Path) -> Result<service::Prepared, String> {
    let program = load(ctx, path).await?;
    service::prepare(program, ctx.name.clone(), &ctx.limits, true)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// `swap --drain` / `--canary`: prepares the new version as for any swap
/// and starts it beside the running one.
async fn gradual_swap(
    ctx: &ControlCtx,
    path: &Path,
    opts: GradualOptions,
) -> Result<Response, String> {
    let _running = ctx.upgrader.exclusive.begin("a swap")?;
    let status = ctx
        .service
        .gradual(load_prepared(ctx, path).await?, opts)
        .await?;
    Ok(Response::Gradual(Box::new(status)))
}

/// How long `wasmhost commit` waits, serving all along, for a shadow that
/// is behind to catch up before it commits anyway (or is refused).
const COMMIT_CATCH_UP: Duration = Duration::from_secs(5);

/// `wasmhost commit`: a shadow that is behind first catches up (the
/// service serves meanwhile), so the pause is short; then it commits.
async fn commit(ctx: &ControlCtx) -> Result<Response, String> {
    let _running = ctx.upgrader.exclusive.begin("a commit")?;
    let deadline = tokio::time::Instant::now() + COMMIT_CATCH_UP;
    loop {
        let last_attempt = tokio::time::Instant::now() >= deadline;
        return Ok(match ctx.service.commit(last_attempt).await? {
            service::Committed::Shadow(report) => Response::Swapped(report),
            service::Committed::Canary(status) => Response::Gradual(status),
            service::Committed::NotYet(_) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
        });
    }
}

async fn rollback(
    ctx: &ControlCtx,
    fresh: bool,
    validation: Validation,
) -> Result<Response, String> {
    let _running = ctx.upgrader.exclusive.begin("a rollback")?;
    let previous = ctx.service.previous().await.map_err(|e| e.to_string())?;
    let Some((program, generation)) = previous else {
        return Err("nothing to roll back to: this service has not been swapped yet".into());
    };
    let opts = SwapOptions {
        kind: SwapKind::Rollback,
        fresh,
        validation,
        expect_generation: Some(generation),
        group: None,
    };
    run_swap(ctx, program, opts, false).await
}

async fn run_swap(
    ctx: &ControlCtx,
    program: Arc<Program>,
    opts: SwapOptions,
    compiled: bool,
) -> Result<Response, String> {
    if ctx.instances.len() > 1 {
        return group_swap(ctx, program, opts, compiled).await;
    }
    let prepared = service::prepare(program, ctx.name.clone(), &ctx.limits, compiled)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let report = ctx.service.swap(prepared, opts).await?;
    Ok(Response::Swapped(Box::new(report)))
}

/// A swap or rollback of every instance of `serve --instances N`, all or
/// none ([`service::GroupGate`]): one new instance per actor, prepared
/// first; the report is the first instance's, with the longest pause.
async fn group_swap(
    ctx: &ControlCtx,
    program: Arc<Program>,
    opts: SwapOptions,
    compiled: bool,
) -> Result<Response, String> {
    let mut prepared = Vec::with_capacity(ctx.instances.len());
    for _ in &ctx.instances {
        let new = service::prepare(program.clone(), ctx.name.clone(), &ctx.limits, compiled)
            .await
            .map_err(|e| format!("{e:#}"))?;
        prepared.push(new);
    }
    let gate = service::GroupGate::new(ctx.instances.len());
    let swaps = ctx
        .instances
        .iter()
        .zip(prepared)
        .enumerate()
        .map(|(i, (h, p))| {
            let opts = SwapOptions {
                group: Some((gate.clone(), i)),
                ..opts.clone()
            };
            let handle = h.clone();
            async move { handle.swap(p, opts).await }
        });
    let tasks: Vec<_> = swaps.map(tokio::spawn).collect();
    let mut reports = Vec::with_capacity(tasks.len());
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(why)) => failed = failed.or(Some(why)),
            Err(e) => failed = failed.or(Some(format!("a swap task panicked: {e}"))),
        }
    }
    if let Some(why) = failed {
        // The gate's reason names the instance that failed.
        return Err(gate.failure().unwrap_or(why));
    }
    // The slowest instance's report (its pause is the service's), with
    // every instance's connections.
    let connections = reports.iter().map(|r| r.connections).sum();
    let slowest = (0..reports.len())
        .max_by_key(|&i| reports[i].pause.pause_us)
        .expect("a group has instances");
    let mut report = reports.swap_remove(slowest);
    report.connections = connections;
    report.warnings.push(format!(
        "{} instances swapped together; the figures are the slowest one's (instance {slowest})",
        ctx.instances.len()
    ));
    Ok(Response::Swapped(Box::new(report)))
}

/// The first instance's status; with `--instances N`, every instance's
/// connections and events too, and the totals.
pub async fn status(ctx: &ControlCtx) -> Result<service::StatusReport, service::Stopped> {
    let summary = |s: &service::StatusReport| service::InstanceSummary {
        generation: s.generation,
        component: s.component.short_hash().to_string(),
        connections: s.connections,
        connections_total: s.connections_total,
        events: s.events,
        traps: s.traps,
    };
    let mut first = ctx.service.status().await?;
    if ctx.instances.len() > 1 {
        first.instances.push(summary(&first));
        for handle in &ctx.instances[1..] {
            first.instances.push(summary(&handle.status().await?));
        }
        let all = &first.instances;
        first.connections = all.iter().map(|i| i.connections).sum();
        first.connections_total = all.iter().map(|i| i.connections_total).sum();
        first.events = all.iter().map(|i| i.events).sum();
        first.traps = all.iter().map(|i| i.traps).sum();
    }
    Ok(first)
}
