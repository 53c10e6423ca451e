//! The receiver's side of a migration (the right-hand column of the
//! protocol in `super`): `serve --receive ADDR` keeps a [`Port`] open for
//! the process's whole life. While the host has no service, the port
//! takes one offer at a time and, once the sender commits, hands the
//! service to the process's main loop, which serves it; while the host
//! serves, offers are refused. At any time the port answers `Query`
//! (what became of a migration), which is how a sender that lost the link
//! after `Commit` learns whether this host serves.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::address;
use super::link::{Link, TlsFiles};
use super::{FAIL_ENV, Manifest, Message, Mode, Offer, Outcome, VERSION, fail_at, repair};
use crate::control::server::ControlSocket;
use crate::serve::{Launch, Parts, ServeOptions, Server};
use crate::service::{self, ComponentInfo, SwapReport};
use crate::upgrade::takeover;

/// The longest a migration may take on the receiving side, from the offer
/// to the commit (the sender's own deadline is usually far shorter).
const RECEIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// How many migrations' outcomes the port remembers.
const OUTCOMES: usize = 64;

/// Where services arrive from other hosts.
pub struct Port {
    addr: SocketAddr,
    shared: Arc<Shared>,
    arrived: mpsc::Receiver<Arrived>,
}

struct Shared {
    opts: ServeOptions,
    /// Where the port listens (with `--relay`, the service's listeners
    /// move to this address's IP).
    addr: SocketAddr,
    /// Whether the host has no service and takes an offer.
    waiting: Mutex<bool>,
    /// One migration in progress at a time.
    busy: tokio::sync::Mutex<()>,
    outcomes: Mutex<VecDeque<(String, Outcome)>>,
    arrived: mpsc::Sender<Arrived>,
    /// While the host waits: the control socket answering `status`.
    idle: tokio::sync::Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

/// A service received and committed: the parts to serve it from.
struct Arrived {
    parts: Parts,
    report: SwapReport,
    /// `--relay`: the relay ends of the connections' socket pairs.
    relay_ends: Vec<(u64, OwnedFd)>,
}

impl Port {
    /// Binds `addr` and starts answering on it.
    pub async fn bind(addr: SocketAddr, tls: &TlsFiles, opts: ServeOptions) -> Result<Port> {
        let acceptor = tls.acceptor()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for migrations on {addr} (--receive)"))?;
        let addr = listener.local_addr()?;
        let (tx, arrived) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            opts,
            addr,
            waiting: Mutex::new(false),
            busy: tokio::sync::Mutex::new(()),
            outcomes: Mutex::new(VecDeque::new()),
            arrived: tx,
            idle: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        Ok(Port {
            addr,
            shared,
            arrived,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for a service (the host has none now), and serves it.
    pub async fn next(&mut self, launch: Launch) -> Result<Server> {
        *self.shared.waiting.lock().expect("port lock") = true;
        self.shared.start_idle().await?;
        tracing::info!(addr = %self.addr, "waiting for a service (wasmhost migrate --to)");
        let arrived = self
            .arrived
            .recv()
            .await
            .ok_or_else(|| anyhow!("the migration port stopped"))?;
        tracing::info!(
            pid = std::process::id(),
            freeze_us = arrived.report.pause.pause_us,
            "migration committed: this host serves `{}` now",
            arrived.report.service
        );
        Ok(Server::assemble(arrived.parts, &self.shared.opts, launch))
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    loop {
        let (tcp, peer) = crate::net::accept_retrying(&listener, "migration port").await;
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let link = match Link::accept(tcp, &acceptor).await {
                Ok(link) => link,
                Err(e) => {
                    tracing::warn!("migration port: refused {peer}: {e:#}");
                    return;
                }
            };
            if let Err(e) = serve_link(link, &shared).await {
                tracing::warn!("migration from {peer}: {e:#}");
            }
        });
    }
}

impl Shared {
    /// Opens the control socket of a host with no service (`status` says
    /// what it waits on and where its last service went).
    async fn start_idle(&self) -> Result<()> {
        let Some(path) = &self.opts.control else {
            return Ok(());
        };
        let mut idle = self.idle.lock().await;
        if idle.is_some() {
            return Ok(());
        }
        let socket = ControlSocket::bind(path).await?;
        let stop = CancellationToken::new();
        let waiting_on = self.addr.to_string();
        let status = move || crate::control::protocol::IdleStatus {
            pid: std::process::id(),
            waiting_on: waiting_on.clone(),
            relaying: super::relay::relaying(),
            last_move: super::last_move(),
            replication: None,
        };
        let task = tokio::spawn(socket.serve_idle(status, None, stop.clone()));
        *idle = Some((stop, task));
        Ok(())
    }

    /// Closes that socket (the service's own takes its place).
    async fn stop_idle(&self) {
        if let Some((stop, task)) = self.idle.lock().await.take() {
            stop.cancel();
            let _ = task.await;
        }
    }

    fn remember(&self, id: &str, outcome: Outcome) {
        let mut outcomes = self.outcomes.lock().expect("outcomes lock");
        outcomes.retain(|(known, _)| known != id);
        outcomes.push_back((id.to_string(), outcome));
        if outcomes.len() > OUTCOMES {
            outcomes.pop_front();
        }
    }

    fn outcome(&self, id: &str) -> Outcome {
        let outcomes = self.outcomes.lock().expect("outcomes lock");
        outcomes
            .iter()
            .find(|(known, _)| known == id)
            .map_or(Outcome::Unknown, |(_, o)| *o)
    }
}

/// How long keepalived may take to add the address here.
const KEEPALIVED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// After a failed `--keepalived` migration: this host's instance, put into
/// FAULT for it, leaves FAULT once the sender has had time to take the
/// address back (it resumes, and preempts this host), unless another
/// migration has begun meanwhile.
async fn leave_fault_later(keepalived: address::Keepalived) {
    address::Keepalived::owe();
    tokio::time::sleep(KEEPALIVED_WAIT).await;
    if !address::Keepalived::take_owed() {
        return; // another move took it over: that one decides
    }
    match keepalived.fault(false) {
        Ok(()) => tracing::info!("migrate: keepalived instance out of FAULT again"),
        Err(e) => tracing::error!("migrate: {e:#}"),
    }
}

/// One link: a query, or an offer.
async fn serve_link(mut link: Link, shared: &Shared) -> Result<()> {
    let (first, _) = link.recv::<Message>(0).await?;
    let offer = match first {
        Message::Query { id } => {
            let outcome = shared.outcome(&id);
            link.send(&Message::Outcome { id, outcome }, &[]).await?;
            return Ok(());
        }
        Message::Offer(offer) => offer,
        Message::Follow(follow) => {
            return crate::standby::primary::feed(link, follow, &shared.opts).await;
        }
        Message::EpochQuery => return crate::standby::primary::answer_epoch(&mut link).await,
        other => bail!("expected an offer, a query or a standby, got {other:?}"),
    };
    let refuse = |message: String| Message::Failed {
        step: "offer".into(),
        message,
    };
    let Ok(busy) = shared.busy.try_lock() else {
        link.send(
            &refuse("another migration to this host is in progress".into()),
            &[],
        )
        .await?;
        bail!("refused an offer: another migration is in progress");
    };
    if !*shared.waiting.lock().expect("port lock") {
        let why = format!(
            "this host serves `{}` already: a host takes a service only while it has none",
            shared.opts.name
        );
        link.send(&refuse(why.clone()), &[]).await?;
        bail!("refused an offer: {why}");
    }
    let id = offer.id.clone();
    let mut r = Receiving {
        link: &mut link,
        shared,
        step: "offer",
        keepalived: None,
    };
    // A sender that vanishes without closing the link (its machine lost)
    // must not hold this port forever.
    let ran = tokio::time::timeout(RECEIVE_TIMEOUT, r.run(offer)).await;
    let ran = ran.unwrap_or_else(|_| {
        Err(anyhow!(
            "the migration took more than {} s; dropping it",
            RECEIVE_TIMEOUT.as_secs()
        ))
    });
    match ran {
        Ok(mut arrived) => {
            *shared.waiting.lock().expect("port lock") = false;
            let relay_ends = std::mem::take(&mut arrived.relay_ends);
            // The main loop is waiting in `Port::next`.
            let _ = shared.arrived.send(arrived).await;
            // The migration is over; its relay may outlive many others.
            drop(busy);
            if !relay_ends.is_empty() {
                let locals = relay_locals(relay_ends)?;
                super::relay::run(link, locals).await;
            }
            Ok(())
        }
        Err(e) => {
            shared.remember(&id, Outcome::Aborted);
            if let Some((keepalived, was_fault)) = r.keepalived.take() {
                // Back into FAULT at once (a commit that failed after
                // taking it out must not leave this host the address).
                if let Err(e) = keepalived.fault(true) {
                    tracing::error!("migrate: {e:#}");
                }
                if !was_fault {
                    tokio::spawn(leave_fault_later(keepalived));
                }
            }
            // Still waiting: `status` answers again.
            if let Err(e) = shared.start_idle().await {
                tracing::warn!("the control socket did not reopen: {e:#}");
            }
            let step = r.step;
            let failed = Message::Failed {
                step: step.into(),
                message: format!("{e:#}"),
            };
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), link.send(&failed, &[]))
                    .await;
            Err(e.context(format!("receiving failed at step `{step}`")))
        }
    }
}

struct Receiving<'a> {
    link: &'a mut Link,
    shared: &'a Shared,
    /// The step in progress, for the error.
    step: &'static str,
    /// `--keepalived`: this host's instance held in FAULT, and whether it
    /// was in FAULT before.
    keepalived: Option<(address::Keepalived, bool)>,
}

impl Receiving<'_> {
    async fn run(&mut self, offer: Offer) -> Result<Arrived> {
        let opts = &self.shared.opts;
        if offer.version != VERSION {
            bail!(
                "the sender speaks migration version {}, this host {VERSION}",
                offer.version
            );
        }
        if offer.service != opts.name {
            bail!(
                "the sender moves `{}` but this host was started as `{}`: start it with --name {}",
                offer.service,
                opts.name,
                offer.service
            );
        }
        let moving = match offer.mode {
            Mode::MoveIp => {
                let addr = offer
                    .address
                    .ok_or_else(|| anyhow!("a move-ip offer without an address"))?;
                address::check_capabilities().map_err(anyhow::Error::msg)?;
                Some((addr, address::on_segment(&addr)?))
            }
            Mode::Relay => None,
        };
        if offer.keepalived {
            let track = opts.keepalived_track.clone().ok_or_else(|| {
                anyhow!(
                    "the sender lets keepalived move the address (--keepalived), and this host \
                     has no keepalived track file: serve it with --keepalived-track FILE"
                )
            })?;
            // Held in FAULT until the sockets exist, so that keepalived
            // cannot give this machine the address before.
            let keepalived = address::Keepalived { track };
            // In FAULT only for a move that failed here: not "before".
            let owed = address::Keepalived::take_owed();
            let was_fault = keepalived.in_fault() && !owed;
            keepalived.fault(true)?;
            self.keepalived = Some((keepalived, was_fault));
        }
        if fail_at("offer") {
            bail!("test: {FAIL_ENV}=offer");
        }
        let path = received_dir(opts)?.join(format!("{}.wasm", offer.component_hash));
        let need = !path.exists();
        self.link
            .send(&Message::Need { component: need }, &[])
            .await?;
        self.step = "prepare";
        if need {
            let (message, bytes) = self.link.recv::<Message>(offer.component_size).await?;
            let Message::Component = message else {
                bail!("expected the component, got {message:?}");
            };
            let hash = hex::encode(Sha256::digest(&bytes));
            if hash != offer.component_hash {
                bail!(
                    "the component's bytes hash to {hash}, the offer said {}",
                    offer.component_hash
                );
            }
            let partial = path.with_extension("partial");
            std::fs::write(&partial, &bytes)
                .and_then(|()| std::fs::rename(&partial, &path))
                .with_context(|| format!("cannot store the component as {}", path.display()))?;
        }
        let loaded = takeover::load(opts, &offer.service, &path, None).await?;
        if fail_at("prepare") {
            bail!("test: {FAIL_ENV}=prepare");
        }
        let program = &loaded.prepared.instance.program;
        let prepared = crate::upgrade::Prepared {
            version: crate::upgrade::VERSION,
            pid: std::process::id(),
            importable: loaded.prepared.importable.clone(),
            component: ComponentInfo::of(program),
            compile_us: service::micros(program.compile_time),
            from_cache: program.from_cache,
            instantiate_us: service::micros(loaded.prepared.instantiate_time),
        };
        self.link.send(&Message::Prepared(prepared), &[]).await?;
        self.step = "send";
        let budget = takeover::max_payload(opts).saturating_mul(2);
        let (message, mut payload) = self.link.recv::<Message>(budget).await?;
        let manifest = match message {
            Message::Manifest(m) => m,
            Message::Abort { reason } => bail!("the sender aborted: {reason}"),
            other => bail!("expected the manifest, got {other:?}"),
        };
        if fail_at("crash") {
            eprintln!("test: {FAIL_ENV}=crash: dying mid-transfer");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        let received = Instant::now();
        manifest
            .check(offer.mode, payload.len())
            .map_err(anyhow::Error::msg)?;
        self.step = "import";
        let mut manifest = manifest;
        let unacked = payload.split_off(payload.len() - manifest.unacked_len() as usize);
        let restoring = Instant::now();
        let Sockets {
            fds,
            repaired,
            relay_ends,
        } = match offer.mode {
            Mode::MoveIp => restore_sockets(&manifest, &unacked)?,
            Mode::Relay => relay_sockets(&mut manifest, self.shared.addr.ip())?,
        };
        let tcp_restore = restoring.elapsed();
        if fail_at("import") {
            bail!("test: {FAIL_ENV}=import: rejecting the state");
        }
        self.shared.stop_idle().await;
        let control = match &opts.control {
            Some(path) => Some(ControlSocket::bind(path).await?),
            None => None,
        };
        let (mut parts, timings) =
            takeover::import(opts, loaded, &manifest.upgrade, payload, fds).await?;
        parts.control = control;
        if fail_at("ready") {
            eprintln!("test: {FAIL_ENV}=ready: never answering");
            std::future::pending::<()>().await;
        }
        let ready = Message::Ready {
            import_us: service::micros(timings.import),
            validate_us: service::micros(timings.validate),
            tcp_restore_us: service::micros(tcp_restore),
            after_receive_us: service::micros(received.elapsed()),
        };
        self.link.send(&ready, &[]).await?;
        self.step = "commit";
        let report = match self.link.recv::<Message>(0).await {
            Ok((Message::Commit { report }, _)) => *report,
            Ok((Message::Abort { reason }, _)) => bail!("the sender aborted: {reason}"),
            Ok((other, _)) => bail!("expected commit or abort, got {other:?}"),
            Err(e) => bail!("the link closed before the sender committed ({e:#}); dropping it"),
        };
        if fail_at("commit") {
            eprintln!("test: {FAIL_ENV}=commit: exiting before serving");
            std::process::exit(3);
        }
        // From here on this host serves, whatever happens to the link.
        self.shared.remember(&offer.id, Outcome::Serving);
        let adding = Instant::now();
        match (&moving, &self.keepalived) {
            (Some((addr, _)), Some((keepalived, _))) => {
                // keepalived adds the address and announces it.
                keepalived.fault(false)?;
                if let Err(e) = address::wait_for(addr.ip, true, KEEPALIVED_WAIT).await {
                    tracing::warn!("migrate: {e:#}; serving anyway");
                }
            }
            (Some((addr, iface)), None) => {
                address::add(addr, iface).await?;
                if let Err(e) = address::announce(addr.ip, iface) {
                    tracing::warn!("migrate: could not announce {}: {e}", addr.ip);
                }
            }
            (None, _) => {}
        }
        let address_add = adding.elapsed();
        let leaving = Instant::now();
        for fd in &repaired {
            // SAFETY: the parts own these sockets and keep them open.
            repair::leave(unsafe { BorrowedFd::borrow_raw(*fd) })
                .context("a connection did not leave repair mode")?;
        }
        let repair_off = leaving.elapsed();
        let listening: Vec<String> = parts
            .spec
            .listeners
            .iter()
            .map(|(name, addr)| format!("{name} {addr}"))
            .collect();
        let serving = Message::Serving {
            address_add_us: service::micros(address_add),
            repair_off_us: service::micros(repair_off),
            listening: listening.clone(),
        };
        let _ = self.link.send(&serving, &[]).await;
        let mut report = report;
        if let Some(info) = report.migrate.as_mut() {
            info.address_add_us = service::micros(address_add);
            info.repair_off_us = service::micros(repair_off);
            info.receiver_listens = listening;
        }
        takeover::commit_parts(&mut parts, &report);
        Ok(Arrived {
            parts,
            report,
            relay_ends,
        })
    }
}

/// The listeners (bound ahead of their address) and every connection's
/// socket, recreated in repair mode: the descriptors in the manifest's
/// order, and the connections' raw descriptors for leaving repair mode
/// at the commit.
fn restore_sockets(manifest: &Manifest, unacked: &[u8]) -> Result<Sockets> {
    let image = &manifest.upgrade.image;
    // The connections first: a port with a listening socket on it takes no
    // other socket, but a listener may join connections that share the
    // port (SO_REUSEADDR on both).
    let mut conns = Vec::with_capacity(image.conns.len());
    let mut offset = 0;
    for (conn, tcp) in image.conns.iter().zip(&manifest.tcp) {
        let mine = &unacked[offset..offset + tcp.unacked_len as usize];
        offset += mine.len();
        conns.push(repair::restore(tcp, mine).with_context(|| {
            format!(
                "connection {} ({}): restoring its socket",
                conn.id, conn.peer
            )
        })?);
    }
    let conn_fds = conns.iter().map(|fd| fd.as_fd().as_raw_fd()).collect();
    let mut fds = Vec::with_capacity(image.listeners.len() + image.conns.len());
    for l in &image.listeners {
        fds.push(
            address::listen_ahead(l.addr)
                .with_context(|| format!("listener `{}` on {}", l.name, l.addr))?,
        );
    }
    fds.extend(conns);
    Ok(Sockets {
        fds,
        repaired: conn_fds,
        relay_ends: Vec::new(),
    })
}

/// The sockets a migration's service starts from.
struct Sockets {
    /// In the manifest's order: listeners, then connections.
    fds: Vec<OwnedFd>,
    /// `--move-ip`: the connections, in repair mode until the commit.
    repaired: Vec<RawFd>,
    /// `--relay`: the relay end of each connection's socket pair.
    relay_ends: Vec<(u64, OwnedFd)>,
}

/// `--relay`: each connection becomes a socket pair (the service serves
/// one end as if it were the client, the relay carries the other's bytes
/// over the link), and the listeners move to this host's own address
/// (the one it receives on), same ports. The manifest's listener
/// addresses are rewritten to match, so the service reports them.
fn relay_sockets(manifest: &mut Manifest, here: std::net::IpAddr) -> Result<Sockets> {
    let image = &mut manifest.upgrade.image;
    let mut fds = Vec::with_capacity(image.listeners.len() + image.conns.len());
    for l in &mut image.listeners {
        let addr = std::net::SocketAddr::new(here, l.addr.port());
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("listener `{}`: cannot listen on {addr}", l.name))?;
        l.addr = listener.local_addr()?;
        fds.push(OwnedFd::from(listener));
    }
    let mut relay_ends = Vec::with_capacity(image.conns.len());
    for conn in &image.conns {
        let (service_end, relay_end) = std::os::unix::net::UnixStream::pair()
            .with_context(|| format!("connection {}: a socket pair", conn.id))?;
        fds.push(OwnedFd::from(service_end));
        relay_ends.push((conn.id, OwnedFd::from(relay_end)));
    }
    Ok(Sockets {
        fds,
        repaired: Vec::new(),
        relay_ends,
    })
}

/// The relay ends as the relay's local streams.
fn relay_locals(ends: Vec<(u64, OwnedFd)>) -> Result<Vec<(u64, super::relay::Local)>> {
    ends.into_iter()
        .map(|(id, fd)| {
            let stream = std::os::unix::net::UnixStream::from(fd);
            stream.set_nonblocking(true)?;
            let local: super::relay::Local = Box::new(tokio::net::UnixStream::from_std(stream)?);
            Ok((id, local))
        })
        .collect()
}

/// Where received components are kept, by hash: beside the compile cache,
/// or in the temporary directory.
fn received_dir(opts: &ServeOptions) -> Result<PathBuf> {
    let dir = match &opts.cache {
        Some(cache) => cache.dir.join("received"),
        None => std::env::temp_dir().join(format!(
            "wasmhost-received-{}",
            nix::unistd::getuid().as_raw()
        )),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create {} for received components", dir.display()))?;
    Ok(dir)
}
