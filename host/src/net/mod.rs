//! Listening sockets and the accept loop. The host owns every socket; the
//! service only ever sees connection ids.

pub mod conn;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use conn::{ConnLimits, FrozenConn};

use crate::service::{Event, ServiceHandle, Spread};

/// A `--listen [NAME=]ADDR` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: String,
    pub addr: SocketAddr,
}

impl std::str::FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addr) = match s.split_once('=') {
            Some((name, addr)) => (name.to_string(), addr),
            None => (String::new(), s),
        };
        if name.is_empty() && s.contains('=') {
            return Err("the listener name before `=` is empty".into());
        }
        let addr = addr.parse().map_err(|_| {
            format!("`{addr}` is not an IP address with a port, e.g. 127.0.0.1:7000 or [::1]:0")
        })?;
        Ok(ListenSpec { name, addr })
    }
}

/// Gives unnamed listeners the names `default`, `default-2`, ... and
/// rejects duplicate names.
pub fn name_listeners(specs: &mut [ListenSpec]) -> Result<()> {
    let mut unnamed = 0;
    for spec in specs.iter_mut() {
        if spec.name.is_empty() {
            unnamed += 1;
            spec.name = match unnamed {
                1 => "default".into(),
                n => format!("default-{n}"),
            };
        }
    }
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.name == spec.name) {
            bail!(
                "two listeners are named `{}`; give each --listen a distinct NAME=",
                spec.name
            );
        }
    }
    Ok(())
}

/// What the host knows of an accepted connection. The socket layer does
/// not know the guest's types: the service turns this into the guest's
/// `conn-info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnMeta {
    /// Unique for the connection's whole life, across swaps and upgrades.
    pub id: u64,
    /// The name of the listener that accepted it.
    pub listener: String,
    /// The peer's address, e.g. `127.0.0.1:53122`.
    pub peer: String,
}

/// A bound listener with its name.
pub struct Listener {
    pub name: Arc<str>,
    pub listener: TcpListener,
}

/// Binds every listener, or none: an error names the address and says
/// what to do. A listener whose name matches a socket passed by systemd
/// (`activated`) takes that socket instead of binding; a passed socket no
/// `--listen` names is an error.
pub async fn bind_all(
    specs: &[ListenSpec],
    mut activated: Vec<(String, OwnedFd)>,
) -> Result<Vec<Listener>> {
    let mut bound = Vec::with_capacity(specs.len());
    for spec in specs {
        let listener = match activated.iter().position(|(name, _)| *name == spec.name) {
            Some(i) => adopt_activated(spec, activated.swap_remove(i).1)?,
            None => bind(spec).await?,
        };
        bound.push(Listener {
            name: spec.name.as_str().into(),
            listener,
        });
    }
    if let Some((name, _)) = activated.first() {
        bail!(
            "systemd passed a socket named `{name}` but no --listen names it; add \
             --listen {name}=ADDR (or set FileDescriptorName= in the socket unit to a listener's name)"
        );
    }
    Ok(bound)
}

async fn bind(spec: &ListenSpec) -> Result<TcpListener> {
    match TcpListener::bind(spec.addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "cannot listen on {} ({}): the address is already in use; stop the process \
             using it or choose another with --listen {}=ADDR (port 0 picks a free port)",
            spec.addr,
            spec.name,
            spec.name
        ),
        Err(e) => bail!("cannot listen on {} ({}): {e}", spec.addr, spec.name),
    }
}

/// A socket-activated listener: it must be a listening TCP socket. Its own
/// address wins over the one given with `--listen`.
fn adopt_activated(spec: &ListenSpec, fd: OwnedFd) -> Result<TcpListener> {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let stream = getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    if !listening || !stream {
        bail!(
            "the socket systemd passed as `{}` is not a listening TCP socket; use ListenStream= in the socket unit",
            spec.name
        );
    }
    let listener = std::net::TcpListener::from(fd);
    let addr = listener.local_addr()?;
    if addr != spec.addr && spec.addr.port() != 0 {
        tracing::warn!(
            listener = spec.name,
            "systemd passed a socket on {addr}; serving there, not on {}",
            spec.addr
        );
    }
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

/// Stops every accept loop and connection task of a service at once, so
/// the service actor can hand their sockets over (host upgrade) or resume
/// them. Tasks take the current token when they start: a task started
/// while frozen stops at once, and [`FreezeSwitch::thaw`] gives tasks
/// started afterwards a fresh one.
#[derive(Clone, Default)]
pub struct FreezeSwitch(Arc<Mutex<CancellationToken>>);

impl FreezeSwitch {
    pub fn token(&self) -> CancellationToken {
        self.0.lock().expect("freeze lock").clone()
    }

    /// Stops every task holding the current token.
    pub fn freeze(&self) {
        self.0.lock().expect("freeze lock").cancel();
    }

    /// Tasks started from now on run until the next [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        let mut token = self.0.lock().expect("freeze lock");
        if token.is_cancelled() {
            *token = CancellationToken::new();
        }
    }
}

/// What every accept loop and connection task of one service shares.
#[derive(Clone)]
pub struct AcceptCtx {
    pub service: ServiceHandle,
    /// With `serve --instances N`: the instances a new connection is
    /// handed to, the least loaded first (only the first instance's actor
    /// runs accept loops).
    pub spread: Option<Arc<Spread>>,
    pub limits: ConnLimits,
    /// Caps open connections; an accept waits for a free permit.
    pub permits: Arc<Semaphore>,
    /// Source of connection ids: never reused by this host, nor by the
    /// hosts it hands the service to.
    pub next_id: Arc<AtomicU64>,
    pub shutdown: CancellationToken,
    pub freeze: FreezeSwitch,
    pub tracker: TaskTracker,
}

/// Starts an accept loop for each listener.
pub fn start_accepting(listeners: Vec<Listener>, ctx: &AcceptCtx) {
    for listener in listeners {
        ctx.tracker.spawn(accept_loop(listener, ctx.clone()));
    }
}

/// Accepts connections until shutdown, or until a freeze, when the
/// listener goes back to the service (`Event::ListenerFrozen`).
///
/// While the host drains ([`crate::fleet`]) the listener stops listening
/// (new connections are refused) and listens again on the same address
/// when the drain is cancelled, or before it goes back to the service for
/// a handoff (the process that serves next accepts).
async fn accept_loop(mut listener: Listener, ctx: AcceptCtx) {
    let frozen = ctx.freeze.token();
    let health = crate::fleet::health();
    let _running = health.accept_loop();
    let mut draining = health.watch_draining();
    let addr = listener.listener.local_addr().ok();
    let mut _listening = Some(health.listening());
    loop {
        if *draining.borrow_and_update() {
            // Connections the kernel completed but nobody accepted yet
            // would be reset by the shutdown: accept them first.
            loop {
                let Ok(permit) = ctx.permits.clone().try_acquire_owned() else {
                    break; // at --max-connections: the rest wait no longer
                };
                match accept_now(&listener) {
                    Queued::Accepted(stream, peer) => {
                        serve_accepted(stream, peer, permit, &listener, &ctx).await
                    }
                    Queued::Failed => {}
                    Queued::Empty => break,
                }
            }
            stop_listening(&listener);
            _listening = None;
            // Until it listens again; a socket that cannot (its port taken
            // meanwhile) is retried, and goes back to the service as it is
            // on a freeze (a handoff collects every listener).
            let mut ended = None;
            let mut retry = std::time::Duration::from_millis(100);
            loop {
                if let Some(end) = ended {
                    match listen_again(&listener, addr) {
                        Ok(()) => {
                            _listening = Some(health.listening());
                            listener = reregister(listener);
                        }
                        Err(e) => tracing::error!(
                            listener = &*listener.name,
                            "cannot listen again after a drain: {e:#}"
                        ),
                    }
                    if _listening.is_some() || end != Resume::Accept {
                        match end {
                            Resume::Accept => break,
                            Resume::Freeze => {
                                let _ = ctx.service.event(Event::ListenerFrozen(listener)).await;
                                return;
                            }
                            // Listening again, so that a socket systemd
                            // passed is left as it gave it.
                            Resume::Stop => return,
                        }
                    }
                    tokio::select! {
                        biased;
                        _ = ctx.shutdown.cancelled() => ended = Some(Resume::Stop),
                        _ = frozen.cancelled() => ended = Some(Resume::Freeze),
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(std::time::Duration::from_secs(5));
                    continue;
                }
                tokio::select! {
                    biased;
                    _ = ctx.shutdown.cancelled() => ended = Some(Resume::Stop),
                    _ = frozen.cancelled() => ended = Some(Resume::Freeze),
                    _ = draining.changed() => {
                        if !*draining.borrow_and_update() {
                            ended = Some(Resume::Accept);
                        }
                    }
                }
            }
            continue;
        }
        let permit = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return,
            _ = frozen.cancelled() => break,
            _ = draining.changed() => continue,
            p = ctx.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let accepted = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return,
            _ = frozen.cancelled() => break,
            _ = draining.changed() => continue,
            a = listener.listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE or a connection reset before accept: log,
                // back off briefly, go on.
                tracing::warn!(listener = &*listener.name, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        serve_accepted(stream, peer, permit, &listener, &ctx).await;
    }
    let _ = ctx.service.event(Event::ListenerFrozen(listener)).await;
}

/// Hands an accepted connection to the service (the least loaded instance
/// with `--instances N`).
async fn serve_accepted(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    listener: &Listener,
    ctx: &AcceptCtx,
) {
    let _ = stream.set_nodelay(true);
    let info = ConnMeta {
        id: ctx.next_id.fetch_add(1, Ordering::Relaxed),
        listener: listener.name.to_string(),
        peer: peer.to_string(),
    };
    match &ctx.spread {
        None => conn::spawn(stream, info, ctx, permit, None).await,
        Some(spread) => {
            let (service, load) = spread.pick();
            let routed = AcceptCtx {
                service,
                ..ctx.clone()
            };
            conn::spawn(stream, info, &routed, permit, Some(load)).await
        }
    }
}

/// Why a drained listener stops waiting.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// The drain was cancelled.
    Accept,
    /// A handoff collects the listener.
    Freeze,
    /// The service stops.
    Stop,
}

/// What one look at the accept queue found.
enum Queued {
    Accepted(tokio::net::TcpStream, SocketAddr),
    /// A connection that failed on the way (reset while queued): skipped.
    Failed,
    /// Nothing queued.
    Empty,
}

/// One connection from the accept queue without waiting (`accept4` on the
/// descriptor itself: the runtime's readiness may not have seen it yet).
fn accept_now(listener: &Listener) -> Queued {
    use nix::sys::socket::{SockFlag, accept4};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = match accept4(listener.listener.as_raw_fd(), flags) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::EAGAIN) => return Queued::Empty,
        Err(nix::errno::Errno::ECONNABORTED | nix::errno::Errno::EINTR) => return Queued::Failed,
        Err(_) => return Queued::Empty,
    };
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let Ok(peer) = stream.peer_addr() else {
        return Queued::Failed;
    };
    match tokio::net::TcpStream::from_std(stream) {
        Ok(stream) => Queued::Accepted(stream, peer),
        Err(_) => Queued::Failed,
    }
}

/// Takes a listener out of LISTEN (Linux: `shutdown` of a listening
/// socket), so connection attempts are refused instead of queueing in a
/// backlog nobody accepts; the descriptor stays open.
fn stop_listening(listener: &Listener) {
    use nix::sys::socket::{Shutdown, shutdown};
    use std::os::fd::AsRawFd;
    if let Err(e) = shutdown(listener.listener.as_raw_fd(), Shutdown::Read) {
        tracing::warn!(
            listener = &*listener.name,
            "cannot stop listening to drain: {e}"
        );
    }
}

/// Listens again after [`stop_listening`]. A socket bound to an explicit
/// port kept it; one bound to port 0 gave its port back, so it is bound
/// to the same address again first.
fn listen_again(listener: &Listener, addr: Option<SocketAddr>) -> Result<()> {
    use anyhow::Context;
    use nix::sys::socket::{Backlog, SockaddrStorage, bind, listen};
    use std::os::fd::AsRawFd;
    let fd = listener.listener.as_raw_fd();
    if let Some(addr) = addr {
        // EINVAL: still bound (an explicit port), which is what we want.
        match bind(fd, &SockaddrStorage::from(addr)) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(e).with_context(|| format!("binding {addr} again")),
        }
    }
    listen(
        &listener.listener,
        Backlog::new(1024).expect("backlog in range"),
    )
    .context("listening again")?;
    Ok(())
}

/// Registers a listener that listens again with the runtime anew: the old
/// registration saw the hang-up of the shutdown, which tokio keeps as a
/// readiness that never clears (an accept loop would spin on it).
fn reregister(listener: Listener) -> Listener {
    let name = listener.name;
    let socket = match listener.listener.into_std() {
        Ok(socket) => socket,
        Err(e) => panic!("a listener could not leave the runtime's reactor: {e}"),
    };
    let listener = TcpListener::from_std(socket)
        .unwrap_or_else(|e| panic!("a listener could not rejoin the runtime's reactor: {e}"));
    Listener { name, listener }
}

/// The next connection on a listener of the host's own (the admin HTTP,
/// agent check and migration ports): a failed accept (usually EMFILE, or a
/// connection reset before it was accepted) is logged as `what`'s and
/// retried after a short pause, never the end of the listener.
pub async fn accept_retrying(
    listener: &TcpListener,
    what: &str,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Each connection is a file descriptor: raises the soft open-file limit to
/// the hard one, so `--max-connections` is not capped by a small default.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
    }
}
