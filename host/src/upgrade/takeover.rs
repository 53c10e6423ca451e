//! The new process's side of a host upgrade (the right-hand column of the
//! protocol in `super`): load the offered component, receive the frozen
//! service, check every socket against the manifest, import the state,
//! and serve once the old process commits.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::socket::{SockType, getsockopt, sockopt};

use super::channel::Channel;
use super::{Manifest, Message, VERSION, fail_at};
use crate::control::server::ControlSocket;
use crate::engine::Runtime;
use crate::net::{ConnMeta, FrozenConn, Listener};
use crate::serve::{Launch, Parts, ServeOptions, Server, load_program};
use crate::service::{
    self, ComponentInfo, ConnImage, ListenerImage, ParkedConn, Program, ServiceSpec, Start,
    SwapRecord, SwapReport, Timings,
};

/// Takes over the service the old process hands over on `fd`. Returns the
/// server, serving, once the old process has committed; any error before
/// that is also sent to the old process (which serves on).
pub async fn receive(opts: ServeOptions, launch: Launch, fd: OwnedFd) -> Result<Server> {
    if fail_at("start") {
        eprintln!("test: {}=start: exiting at start", super::FAIL_ENV);
        std::process::exit(3);
    }
    let channel = Channel::from_fd(fd)?;
    let mut t = Takeover {
        channel: &channel,
        opts: &opts,
        step: "offer",
    };
    match t.run().await {
        Ok((parts, report)) => {
            let server = Server::assemble(parts, &opts, launch);
            tracing::info!(
                pid = std::process::id(),
                blackout_us = report.pause.pause_us,
                "upgrade committed: this process serves the service now"
            );
            Ok(server)
        }
        Err(e) => {
            let failed = Message::Failed {
                step: t.step.into(),
                message: format!("{e:#}"),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), channel.send(&failed, &[])).await;
            Err(e.context(format!(
                "taking over the service failed at step `{}`",
                t.step
            )))
        }
    }
}

struct Takeover<'a> {
    channel: &'a Channel,
    opts: &'a ServeOptions,
    /// The step in progress, for the error.
    step: &'static str,
}

/// What the new process loaded before it received anything.
pub(crate) struct Loaded {
    runtime: Runtime,
    pub prepared: service::Prepared,
    previous: Option<Arc<Program>>,
}

impl Takeover<'_> {
    async fn run(&mut self) -> Result<(Parts, SwapReport)> {
        let loaded = self.prepare().await?;
        self.step = "send";
        let max_payload = max_payload(self.opts);
        let (message, payload) = self.channel.recv::<Message>(max_payload).await?;
        if let Message::Abort { reason } = &message {
            // `upgrade --exec` ran this process only to check the binary.
            tracing::info!("the old host is done with this process: {reason}");
            std::process::exit(0);
        }
        let Message::Manifest(manifest) = message else {
            bail!("expected the manifest, got {message:?}");
        };
        let fds = self.channel.recv_fds(manifest.fd_count).await?;
        if fail_at("crash") {
            eprintln!("test: {}=crash: dying mid-handoff", super::FAIL_ENV);
            // SIGKILL: a crash that leaves no core file behind.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        let received = Instant::now();
        manifest.check(payload.len()).map_err(anyhow::Error::msg)?;
        self.step = "import";
        let (parts, timings) = import(self.opts, loaded, &manifest, payload, fds).await?;
        if fail_at("ready") {
            eprintln!("test: {}=ready: never answering", super::FAIL_ENV);
            std::future::pending::<()>().await;
        }
        let ready = Message::Ready {
            import_us: service::micros(timings.import),
            validate_us: service::micros(timings.validate),
            after_receive_us: service::micros(received.elapsed()),
        };
        self.channel.send(&ready, &[]).await?;
        self.step = "commit";
        let mut report = self.await_commit().await?;
        if report.kind.is_empty() {
            // The old host vanished without its report: say what is known.
            report.kind = "upgrade".into();
            report.from = manifest.image.component.clone();
            report.to = ComponentInfo::of(&parts.instance.program);
            report.format = Some(manifest.image.format.clone()).filter(|f| !f.is_empty());
            report.state_bytes = manifest.state_len as usize;
        }
        let mut parts = parts;
        commit_parts(&mut parts, &report);
        Ok((parts, report))
    }

    /// Phases 2 and 3: load what the old process offers.
    async fn prepare(&mut self) -> Result<Loaded> {
        let (offer, _) = self.channel.recv::<Message>(0).await?;
        let Message::Offer {
            version,
            service: name,
            component,
            previous,
        } = offer
        else {
            bail!("expected an offer, got {offer:?}");
        };
        if version != VERSION {
            bail!("the old host speaks handoff version {version}, this binary {VERSION}");
        }
        if name != self.opts.name {
            bail!(
                "the old host serves `{name}` but this process was started as `{}`",
                self.opts.name
            );
        }
        self.step = "prepare";
        let loaded = load(self.opts, &name, &component, previous.as_deref()).await?;
        let prepared = &loaded.prepared;
        if fail_at("prepare") {
            bail!("test: {}=prepare", super::FAIL_ENV);
        }
        let program = &prepared.instance.program;
        let answer = Message::Prepared(super::Prepared {
            version: VERSION,
            pid: std::process::id(),
            importable: prepared.importable.clone(),
            component: ComponentInfo::of(program),
            compile_us: service::micros(program.compile_time),
            from_cache: program.from_cache,
            instantiate_us: service::micros(prepared.instantiate_time),
        });
        self.channel.send(&answer, &[]).await?;
        Ok(loaded)
    }

    /// Phase 7: wait for the old process's verdict.
    async fn await_commit(&mut self) -> Result<SwapReport> {
        match self.channel.recv::<Message>(0).await {
            Ok((Message::Commit { report }, _)) => {
                if fail_at("commit") {
                    eprintln!("test: {}=commit: exiting before serving", super::FAIL_ENV);
                    std::process::exit(3);
                }
                // Said before any socket is touched: the old process may
                // undo the upgrade until it hears this.
                self.channel.send(&Message::Serving, &[]).await?;
                Ok(*report)
            }
            Ok((Message::Abort { reason }, _)) => Err(anyhow!("the old host aborted: {reason}")),
            Ok((other, _)) => Err(anyhow!("expected commit or abort, got {other:?}")),
            Err(e) => {
                // The old process is gone without a verdict after this one
                // was ready: it crashed, and this process holds everything.
                tracing::warn!(
                    "the old host vanished after this process was ready ({e:#}); serving"
                );
                Ok(SwapReport::default()) // completed by the caller
            }
        }
    }
}

/// Phase 6: check the sockets, import the state, build the service.
pub(crate) async fn import(
    opts: &ServeOptions,
    loaded: Loaded,
    manifest: &Manifest,
    mut payload: Vec<u8>,
    fds: Vec<OwnedFd>,
) -> Result<(Parts, Timings)> {
    let began = Instant::now();
    let image = &manifest.image;
    let conn_bytes = payload.split_off(manifest.state_len as usize);
    // The sockets are checked and registered on other threads while the
    // guest imports the state here: the two are independent, and each
    // can take tens of milliseconds.
    let (listeners, conns, control) = (
        image.listeners.clone(),
        image.conns.clone(),
        manifest.control.clone(),
    );
    let sockets = tokio::task::spawn_blocking(move || {
        let adopted = adopt_sockets(&listeners, &conns, control.as_deref(), fds, &conn_bytes);
        (adopted, began.elapsed())
    });
    let mut instance = loaded.prepared.instance;
    let mut timings = Timings::default();
    // The old version keeps no state: start this one with init.
    let stateless = image.format.is_empty();
    let imported = if fail_at("import") {
        Err(format!(
            "test: {}=import: rejecting the state",
            super::FAIL_ENV
        ))
    } else if stateless {
        match instance.init(&opts.config).await {
            Ok(Ok(())) => Ok(None),
            Ok(Err(msg)) => Err(format!("the component's init failed: {msg}")),
            Err(trap) => Err(format!(
                "the component trapped in init: {}",
                service::root(&trap)
            )),
        }
    } else {
        service::import(
            &mut instance,
            &image.format,
            &payload,
            service::Validation::Export,
            &mut timings,
        )
        .await
    };
    let (adopted, adopt_time) = sockets.await.context("adopting the sockets panicked")?;
    let Sockets {
        listeners,
        conns,
        control,
    } = adopted?;
    imported.map_err(anyhow::Error::msg)?;
    tracing::info!(
        connections = image.conns.len(),
        "received service: sockets checked and registered in {adopt_time:?}, state imported in {:?}; both done in {:?}",
        timings.import + timings.validate,
        began.elapsed()
    );
    let spec = ServiceSpec {
        name: image.service.as_str().into(),
        config: opts.config.clone(),
        limits: opts.instance_limits.clone(),
        durable: opts.durable.clone(),
        listeners: image
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.addr))
            .collect(),
    };
    let start = Start {
        generation: image.generation + 1,
        started: UNIX_EPOCH + Duration::from_millis(image.started_unix_ms),
        previous: loaded.previous,
        history: image.history.clone(),
        stats: image.stats.clone(),
        // A stateless version's timers went with its instance.
        timers: match stateless {
            true => Vec::new(),
            false => image.timers.clone(),
        },
        parked: service::Parked { listeners, conns },
        // The carried state is where a rebuild after a trap starts (init,
        // when there is none).
        base: (!stateless).then(|| {
            service::base_of_state(&instance, image.format.clone(), bytes::Bytes::from(payload))
        }),
        // The carried state becomes the state dir's next snapshot.
        disk: match &opts.durable.state_dir {
            Some(dir) => Some(
                crate::durable::disk::Attach::fresh(dir, opts.durable.fsync)
                    .context("opening the state dir")?,
            ),
            None => None,
        },
        journal: None,
        closes: Vec::new(),
        announce: stateless,
    };
    let parts = Parts {
        extra: Vec::new(),
        runtime: loaded.runtime,
        instance,
        spec,
        start,
        control,
        next_id: image.next_conn_id,
    };
    Ok((parts, timings))
}

/// Loads the component (and the previous one, for rollback), instantiates
/// it and asks what it imports.
pub(crate) async fn load(
    opts: &ServeOptions,
    name: &str,
    component: &Path,
    previous: Option<&Path>,
) -> Result<Loaded> {
    let runtime = Runtime::new(opts.cache.clone())?;
    let program = load_program(&runtime, component).await?;
    let previous = match previous {
        Some(path) => match load_program(&runtime, path).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(
                    "cannot load the previous component (rollback will not be possible): {e:#}"
                );
                None
            }
        },
        None => None,
    };
    let prepared = service::prepare(program, name.into(), &opts.instance_limits, true).await?;
    Ok(Loaded {
        runtime,
        prepared,
        previous,
    })
}

/// The most payload this host accepts: a state as large as an instance's
/// memory, and every connection's buffers full.
pub(crate) fn max_payload(opts: &ServeOptions) -> u64 {
    let per_conn = opts.conn_limits.max_output_buffer + 2 * opts.conn_limits.read_chunk;
    opts.instance_limits.max_memory as u64 + (opts.max_connections as u64 + 1) * per_conn as u64
}

/// This process serves now: it owns the control socket's file, and the
/// upgrade goes into the history.
pub(crate) fn commit_parts(parts: &mut Parts, report: &SwapReport) {
    if let Some(control) = &parts.control {
        control.claim();
    }
    parts.start.history.push(committed_record(report));
    if parts.start.history.len() > service::HISTORY_LEN {
        parts.start.history.remove(0);
    }
}

/// The history entry of the upgrade that started this process.
fn committed_record(report: &SwapReport) -> SwapRecord {
    SwapRecord {
        at_unix_ms: service::unix_ms(SystemTime::now()),
        kind: match report.kind.is_empty() {
            true => "upgrade".into(),
            false => report.kind.clone(),
        },
        from: report.from.clone(),
        to: report.to.clone(),
        format: report.format.clone(),
        state_bytes: report.state_bytes,
        pause_us: report.pause.pause_us,
        outcome: "committed".into(),
        migrate: report.migrate.clone().map(Box::new),
    }
}

/// Checks that `fd` is a listening TCP socket (`SO_ACCEPTCONN`) bound to
/// the manifest's address.
fn adopt_listener(fd: OwnedFd, image: &ListenerImage) -> Result<Listener> {
    check_kind(&fd, true).with_context(|| format!("listener `{}`", image.name))?;
    let listener = std::net::TcpListener::from(fd);
    let addr = listener.local_addr()?;
    if addr != image.addr {
        bail!(
            "listener `{}`: the descriptor is bound to {addr}, the manifest says {}",
            image.name,
            image.addr
        );
    }
    listener.set_nonblocking(true)?;
    Ok(Listener {
        name: image.name.as_str().into(),
        listener: tokio::net::TcpListener::from_std(listener)?,
    })
}

/// The handed-over sockets, checked and ready to serve.
struct Sockets {
    listeners: Vec<Listener>,
    conns: BTreeMap<u64, ParkedConn>,
    control: Option<ControlSocket>,
}

/// Checks every socket against the manifest and registers it with the
/// reactor (on a blocking thread, inside the runtime).
fn adopt_sockets(
    listeners: &[ListenerImage],
    conns: &[ConnImage],
    control: Option<&Path>,
    fds: Vec<OwnedFd>,
    conn_bytes: &[u8],
) -> Result<Sockets> {
    let mut fds = fds.into_iter();
    let listeners = listeners
        .iter()
        .map(|l| adopt_listener(fds.next().expect("counted"), l))
        .collect::<Result<Vec<_>>>()?;
    let conn_fds: Vec<OwnedFd> = fds.by_ref().take(conns.len()).collect();
    let conns = adopt_conns(conns, conn_fds, conn_bytes)?;
    let control = match control {
        Some(path) => Some(adopt_control(fds.next().expect("counted"), path)?),
        None => None,
    };
    Ok(Sockets {
        listeners,
        conns,
        control,
    })
}

/// Checks and adopts every connection. Registering thousands of sockets
/// with the reactor is most of a large takeover, and the old process is
/// idle meanwhile, so above a few thousand it runs on two threads. Runs on
/// a blocking thread.
fn adopt_conns(
    images: &[ConnImage],
    fds: Vec<OwnedFd>,
    bytes: &[u8],
) -> Result<BTreeMap<u64, ParkedConn>> {
    let mut offset = 0;
    let jobs: Vec<(&ConnImage, OwnedFd, &[u8])> = images
        .iter()
        .zip(fds)
        .map(|(c, fd)| {
            let mine = &bytes[offset..offset + c.unread_len + c.unsent_len];
            offset += mine.len();
            (c, fd, mine)
        })
        .collect();
    let adopt_all = |jobs: Vec<(&ConnImage, OwnedFd, &[u8])>| {
        jobs.into_iter()
            .map(|(c, fd, mine)| Ok((c.id, adopt_conn(fd, c, mine)?)))
            .collect::<Result<Vec<_>>>()
    };
    if jobs.len() < PARALLEL_ADOPT {
        return Ok(adopt_all(jobs)?.into_iter().collect());
    }
    let mut first = jobs;
    let second = first.split_off(first.len() / 2);
    let runtime = tokio::runtime::Handle::current();
    let (a, b) = std::thread::scope(|s| {
        let other = s.spawn(|| {
            let _in_runtime = runtime.enter();
            adopt_all(second)
        });
        let a = adopt_all(first);
        (a, other.join().expect("adopting connections panicked"))
    });
    Ok(a?.into_iter().chain(b?).collect())
}

/// Connections above which [`adopt_conns`] uses a second thread.
const PARALLEL_ADOPT: usize = 2000;

/// Checks that `fd` is a connected TCP socket to the manifest's peer (a
/// peer already gone is allowed: the connection then ends as usual).
fn adopt_conn(fd: OwnedFd, image: &ConnImage, bytes: &[u8]) -> Result<ParkedConn> {
    let what = || format!("connection {} ({})", image.id, image.peer);
    check_kind(&fd, false).with_context(what)?;
    let stream = std::net::TcpStream::from(fd);
    if let Ok(peer) = stream.peer_addr()
        && peer.to_string() != image.peer
    {
        bail!("{}: the descriptor's peer is {peer}", what());
    }
    let (unread, rest) = bytes.split_at(image.unread_len);
    let unsent = rest[..image.unsent_len].to_vec();
    Ok(ParkedConn {
        info: service::guest_conn_info(ConnMeta {
            id: image.id,
            listener: image.listener.clone(),
            peer: image.peer.clone(),
        }),
        frozen: FrozenConn::received(image.id, stream, unsent).with_context(what)?,
        unread: unread.to_vec(),
    })
}

/// Checks that `fd` is the listening Unix socket at `path`.
fn adopt_control(fd: OwnedFd, path: &Path) -> Result<ControlSocket> {
    check_kind(&fd, true).context("control socket")?;
    let listener = UnixListener::from(fd);
    let bound = listener.local_addr()?;
    if bound.as_pathname() != Some(path) {
        bail!(
            "control socket: the descriptor is bound to {:?}, the manifest says {}",
            bound.as_pathname(),
            path.display()
        );
    }
    ControlSocket::adopt(listener, path)
}

/// A stream socket, listening or not as expected.
fn check_kind(fd: &OwnedFd, listening: bool) -> Result<()> {
    let ty = getsockopt(fd, sockopt::SockType).context("the descriptor is not a socket")?;
    if ty != SockType::Stream {
        bail!("the descriptor is a {ty:?} socket, not a stream socket");
    }
    let accepting = getsockopt(fd, sockopt::AcceptConn)?;
    if accepting != listening {
        bail!(
            "the descriptor is {}a listening socket",
            if accepting { "" } else { "not " }
        );
    }
    Ok(())
}
