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
async fn accept_loop(listener: Listener, ctx: AcceptCtx) {
    let frozen = ctx.freeze.token();
    loop {
        let permit = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return,
            _ = frozen.cancelled() => break,
            p = ctx.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let accepted = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return,
            _ = frozen.cancelled() => break,
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
        let _ = stream.set_nodelay(true);
        let info = ConnMeta {
            id: ctx.next_id.fetch_add(1, Ordering::Relaxed),
            listener: listener.name.to_string(),
            peer: peer.to_string(),
        };
        match &ctx.spread {
            None => conn::spawn(stream, info, &ctx, permit, None).await,
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
    let _ = ctx.service.event(Event::ListenerFrozen(listener)).await;
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
