//! The sender's side of a migration (the left-hand column of the
//! protocol in `super`): offer the service, freeze it with the host
//! upgrade's freeze, freeze its connections and remove the address, send
//! everything, and commit or resume.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use sha2::{Digest, Sha256};

use super::address::{self, Interface, ServiceAddr};
use super::link::{Link, TlsFiles};
use super::repair::{self, Frozen};
use super::{Manifest, Message, Mode, Offer, Outcome, VERSION};
use crate::service::{Decision, Handoff, MigrateInfo, Pause, SwapReport, Timings, micros};
use crate::upgrade::handover::{Failure, aborted_record, freeze};
use crate::upgrade::{Prepared, Upgrader};

/// How a migration moves the connections.
#[derive(Debug, Clone, Copy)]
pub enum How {
    /// `--move-ip`: the connections are recreated on the receiver and the
    /// service address moves with them.
    MoveIp(ServiceAddr),
    /// `--relay`: this host keeps the client sockets and relays their
    /// bytes; the receiver listens on its own addresses.
    Relay,
}

/// `wasmhost migrate`'s options.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The receiver's `serve --receive` address.
    pub to: SocketAddr,
    /// The name the receiver's certificate must carry [default: the IP
    /// of `to`].
    pub peer_name: Option<String>,
    /// How the connections move.
    pub how: How,
    /// With `How::MoveIp`: keepalived moves the address
    /// ([`address::Keepalived`]).
    pub keepalived: bool,
    /// How long the receiver may take from the offer to `Ready`.
    pub timeout: Duration,
    /// The link's certificates [default: the ones `serve` was given].
    pub tls: Option<TlsFiles>,
}

/// Moves the service to another host. On success this host's service has
/// ended (the receiver serves every connection); on failure this host
/// serves on, and the error says which step failed and why.
pub async fn migrate(u: &Upgrader, opts: MigrateOptions) -> Result<SwapReport, String> {
    if u.instances > 1 {
        return Err(format!(
            "a migration moves one instance, and this service runs {} (--instances): serve it \
             with --instances 1",
            u.instances
        ));
    }
    let _running = u.exclusive.begin("a migration")?;
    run(u, opts).await.map_err(|f| {
        tracing::warn!("{}; this host serves on", f.text());
        f.text()
    })
}

/// How long keepalived may take to drop or add the address (three
/// advertisement intervals and the skew at `advert_int 1`, and margin).
const KEEPALIVED_WAIT: Duration = Duration::from_secs(10);

/// What the sender holds while the service is frozen.
struct Frozen2 {
    handoff: Handoff,
    /// The connection sockets in repair mode, in `image.conns` order.
    repaired: Vec<RawFd>,
    /// The address removed, and the interface it was on.
    removed: Option<(ServiceAddr, Interface)>,
    /// `--keepalived`: this host's track file...
    keepalived: Option<address::Keepalived>,
    /// ...and the address keepalived dropped once this host went into
    /// FAULT.
    in_fault: Option<std::net::Ipv4Addr>,
    /// Held until the service is released or resumes (also while
    /// `settle_later` waits): the fleet sees a handoff, not a failure.
    _handing_off: crate::fleet::HandingOff,
    tcp_freeze: Duration,
    address_remove: Duration,
}

async fn run(u: &Upgrader, opts: MigrateOptions) -> Result<SwapReport, Failure> {
    let handing_off = crate::fleet::health().handing_off();
    let tls = opts.tls.clone().or_else(|| u.tls.clone()).ok_or_else(|| {
        Failure::migrate(
            "connect",
            "the link needs certificates: give `migrate` (or `serve`) --tls-cert, --tls-key and --tls-ca",
        )
    })?;
    let moving = match opts.how {
        How::MoveIp(addr) => {
            address::check_capabilities().map_err(|e| Failure::migrate("offer", e))?;
            let iface = address::holding(addr.ip)
                .map_err(|e| Failure::migrate("offer", format!("{e:#}")))?
                .ok_or_else(|| {
                    Failure::migrate(
                        "offer",
                        format!(
                            "{} is not an address of this machine: --move-ip names the address \
                             the service listens on, which moves with it",
                            addr.ip
                        ),
                    )
                })?;
            Some((addr, iface))
        }
        How::Relay => None,
    };
    let keepalived = match (opts.keepalived, &opts.how) {
        (false, _) => None,
        (true, How::Relay) => {
            return Err(Failure::migrate(
                "offer",
                "--keepalived lets keepalived move the address: use it with --move-ip",
            ));
        }
        (true, How::MoveIp(_)) => Some(u.keepalived.clone().ok_or_else(|| {
            Failure::migrate(
                "offer",
                "--keepalived needs this host's keepalived track file: serve with \
                 --keepalived-track FILE",
            )
        })?),
    };
    let status = u
        .service
        .status()
        .await
        .map_err(|e| Failure::migrate("offer", e.to_string()))?;
    let component = std::fs::read(&status.component.path).map_err(|e| {
        Failure::migrate(
            "offer",
            format!(
                "cannot read the running component {}: {e}",
                status.component.path
            ),
        )
    })?;
    let component_hash = hex::encode(Sha256::digest(&component));
    // The file may have been rebuilt since it was loaded: sending it would
    // move the service to another version than the one running.
    if component_hash != status.component.hash {
        return Err(Failure::migrate(
            "offer",
            format!(
                "{} changed on disk since the service loaded it (hash {} now, {} running): swap \
                 to the new file first (`wasmhost swap`, or SIGHUP), then migrate",
                status.component.path,
                &component_hash[..12],
                &status.component.hash[..12.min(status.component.hash.len())]
            ),
        ));
    }
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let within = |step: &'static str| Within {
        step,
        deadline,
        timeout: opts.timeout,
    };
    let name = opts
        .peer_name
        .clone()
        .unwrap_or_else(|| opts.to.ip().to_string());
    tracing::info!(to = %opts.to, how = ?opts.how, "migrate: connecting to the receiver");
    let mut link = within("connect")
        .run(Link::connect(opts.to, &name, &tls))
        .await?;
    let id = migration_id();
    let offer = Offer {
        version: VERSION,
        id: id.clone(),
        service: u.name.to_string(),
        mode: match opts.how {
            How::MoveIp(_) => Mode::MoveIp,
            How::Relay => Mode::Relay,
        },
        address: moving.as_ref().map(|(addr, _)| *addr),
        keepalived: keepalived.is_some(),
        component_hash,
        component_size: component.len() as u64,
    };
    within("offer")
        .run(link.send(&Message::Offer(offer), &[]))
        .await?;
    let component_sent = match within("offer").run(recv(&mut link)).await? {
        Message::Need { component: true } => {
            within("prepare")
                .run(link.send(&Message::Component, &[&component]))
                .await?;
            true
        }
        Message::Need { component: false } => false,
        other => return Err(unexpected("offer", other)),
    };
    let prepared = match within("prepare").run(recv(&mut link)).await? {
        Message::Prepared(p) => p,
        other => return Err(unexpected("prepare", other)),
    };
    // Phase 4: the service stops between two events.
    let handoff = within("freeze")
        .run(freeze(u, &prepared.importable, deadline))
        .await?;
    let mut frozen = Frozen2 {
        handoff,
        repaired: Vec::new(),
        removed: None,
        keepalived,
        in_fault: None,
        _handing_off: handing_off,
        tcp_freeze: Duration::ZERO,
        address_remove: Duration::ZERO,
    };
    let tcp = match &moving {
        Some((addr, iface)) => match freeze_connections(&mut frozen, addr, iface).await {
            Ok(tcp) => tcp,
            Err(failure) => return Err(resume(frozen, &prepared, failure, Some(link)).await),
        },
        None => Vec::new(),
    };
    match send_and_commit(&mut link, &frozen, tcp, &prepared, &opts).await {
        Ok(mut report) => {
            if let Some(info) = report.migrate.as_mut() {
                info.component_sent = component_sent;
            }
            match opts.how {
                How::MoveIp(_) => {
                    release(frozen, &report);
                    link.close().await;
                }
                How::Relay => {
                    // Copies of the client sockets outlive the service's.
                    let locals = match relay_sockets(&frozen.handoff) {
                        Ok(locals) => locals,
                        Err(e) => {
                            tracing::error!(
                                "migrate: cannot keep the client sockets to relay them ({e}); \
                                 their connections end"
                            );
                            Vec::new()
                        }
                    };
                    release(frozen, &report);
                    tracing::info!(
                        "migrate: relaying {} connections to {} until they close",
                        locals.len(),
                        opts.to
                    );
                    tokio::spawn(super::relay::run(link, locals));
                }
            }
            Ok(report)
        }
        Err(Sent::Before(failure)) => Err(resume(frozen, &prepared, failure, Some(link)).await),
        Err(Sent::AfterCommit(failure, report)) => {
            // R serves if and only if it received `Commit`: ask it.
            drop(link);
            let ask = Asker {
                opts,
                name,
                tls,
                id,
            };
            match ask.outcome().await {
                Ok(Outcome::Serving) => {
                    tracing::info!("migrate: the link broke after commit, and the receiver serves");
                    release(frozen, &report);
                    Ok(*report)
                }
                Ok(_) => Err(resume(frozen, &prepared, failure, None).await),
                Err(unreachable) => {
                    let message = format!(
                        "{}; the receiver cannot be asked whether it serves ({unreachable:#}), so \
                         this host stays frozen rather than risk serving the service twice, and \
                         keeps asking: it ends its service if the receiver serves, and resumes \
                         if the receiver does not",
                        failure.text()
                    );
                    tokio::spawn(settle_later(frozen, report, prepared, failure, ask));
                    Err(Failure::migrate("commit", message))
                }
            }
        }
    }
}

/// In doubt after `Commit`: asks the receiver again (every second, then
/// every five) until it answers, then releases or resumes. The service
/// stays frozen meanwhile: serving it here while the receiver may serve it
/// too would put one address on two machines.
async fn settle_later(
    frozen: Frozen2,
    report: Box<SwapReport>,
    prepared: Prepared,
    failure: Failure,
    ask: Asker,
) {
    let id = &ask.id;
    let mut wait = Duration::from_secs(1);
    for attempt in 1u64.. {
        tokio::time::sleep(wait).await;
        wait = Duration::from_secs(5);
        match ask.outcome().await {
            Ok(Outcome::Serving) => {
                tracing::info!("migrate {id}: the receiver serves; this host's service ends");
                release(frozen, &report);
                return;
            }
            Ok(_) => {
                tracing::warn!("migrate {id}: the receiver does not serve; this host resumes");
                resume(frozen, &prepared, failure, None).await;
                return;
            }
            Err(e) if attempt % 12 == 1 => {
                tracing::warn!(
                    "migrate {id}: still frozen, the receiver cannot be asked yet: {e:#}"
                );
            }
            Err(_) => {}
        }
    }
}

/// A migration id, unique across this host's migrations.
fn migration_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!(
        "{}-{}-{at}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A step with the migration's deadline.
struct Within {
    step: &'static str,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Within {
    async fn run<T>(&self, work: impl Future<Output = anyhow::Result<T>>) -> Result<T, Failure> {
        match tokio::time::timeout_at(self.deadline, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Failure::migrate(self.step, format!("{e:#}"))),
            Err(_) => Err(Failure::migrate(
                self.step,
                format!(
                    "the receiver did not answer within {} ms (--timeout-ms)",
                    self.timeout.as_millis()
                ),
            )),
        }
    }
}

async fn recv(link: &mut Link) -> anyhow::Result<Message> {
    let (message, _) = link.recv::<Message>(0).await?;
    if let Message::Failed { step, message } = message {
        anyhow::bail!("the receiver failed at `{step}`: {message}");
    }
    Ok(message)
}

fn unexpected(step: &'static str, message: Message) -> Failure {
    Failure::migrate(
        step,
        format!("unexpected message from the receiver: {message:?}"),
    )
}

/// Phase 4, after the service froze: every connection socket into repair
/// mode, the address off this machine, then each connection's TCP state
/// and queues read. On failure, `frozen` says what to undo.
async fn freeze_connections(
    frozen: &mut Frozen2,
    addr: &ServiceAddr,
    iface: &Interface,
) -> Result<Vec<Frozen>, Failure> {
    let image = &frozen.handoff.image;
    let conn_fds = &frozen.handoff.fds[image.listeners.len()..];
    let began = Instant::now();
    for (conn, &fd) in image.conns.iter().zip(conn_fds) {
        // SAFETY: the actor keeps the frozen sockets open until the
        // decision is sent, which happens after this.
        let fd_ref = unsafe { BorrowedFd::borrow_raw(fd) };
        repair::enter(fd_ref).map_err(|e| {
            Failure::migrate(
                "freeze",
                format!("connection {} ({}): repair mode: {e}", conn.id, conn.peer),
            )
        })?;
        frozen.repaired.push(fd);
    }
    let entered = began.elapsed();
    let removing = Instant::now();
    match frozen.keepalived.clone() {
        Some(keepalived) => {
            let failed = |e: anyhow::Error| Failure::migrate("freeze", format!("{e:#}"));
            keepalived.fault(true).map_err(failed)?;
            frozen.in_fault = Some(addr.ip);
            address::wait_for(addr.ip, false, KEEPALIVED_WAIT)
                .await
                .map_err(failed)?;
        }
        None => {
            address::remove(addr, iface)
                .await
                .map_err(|e| Failure::migrate("freeze", format!("{e:#}")))?;
            frozen.removed = Some((*addr, iface.clone()));
        }
    }
    frozen.address_remove = removing.elapsed();
    let reading = Instant::now();
    let mut tcp = Vec::with_capacity(frozen.repaired.len());
    for (conn, &fd) in image.conns.iter().zip(&frozen.repaired) {
        // SAFETY: as above.
        let fd_ref = unsafe { BorrowedFd::borrow_raw(fd) };
        let state = repair::freeze(fd_ref).map_err(|e| {
            Failure::migrate(
                "freeze",
                format!("connection {} ({}): {e}", conn.id, conn.peer),
            )
        })?;
        if u32::from(*state.image.local.ip()) != u32::from(addr.ip) {
            return Err(Failure::migrate(
                "freeze",
                format!(
                    "connection {} ({}) is to {}, not to the moving address {}: only connections \
                     to the service address can move with it",
                    conn.id, conn.peer, state.image.local, addr.ip
                ),
            ));
        }
        tcp.push(state);
    }
    frozen.tcp_freeze = entered + reading.elapsed();
    Ok(tcp)
}

/// How sending ended badly: before `Commit` (resume), or after it (ask).
enum Sent {
    Before(Failure),
    AfterCommit(Failure, Box<SwapReport>),
}

/// Phases 5 to 7: the manifest and payload, `Ready`, `Commit`, `Serving`.
async fn send_and_commit(
    link: &mut Link,
    frozen: &Frozen2,
    tcp: Vec<Frozen>,
    prepared: &Prepared,
    opts: &MigrateOptions,
) -> Result<SwapReport, Sent> {
    let handoff = &frozen.handoff;
    let mut image = handoff.image.clone();
    // Each connection's bytes: the host's unread bytes, then the kernel's
    // receive queue; the kernel's unsent bytes, then the host's.
    let mut conn_bytes = Vec::with_capacity(handoff.conn_bytes.len());
    let mut unacked = Vec::new();
    let mut offset = 0;
    for (i, conn) in image.conns.iter_mut().enumerate() {
        let host = &handoff.conn_bytes[offset..offset + conn.unread_len + conn.unsent_len];
        offset += host.len();
        let (host_unread, host_unsent) = host.split_at(conn.unread_len);
        conn_bytes.extend_from_slice(host_unread);
        // With --relay the kernel queues stay in this host's sockets and
        // cross the link later, in order.
        if let Some(state) = tcp.get(i) {
            conn_bytes.extend_from_slice(&state.unread);
            conn_bytes.extend_from_slice(&state.unsent);
            conn.unread_len += state.unread.len();
            conn.unsent_len += state.unsent.len();
            unacked.extend_from_slice(&state.unacked);
        }
        conn_bytes.extend_from_slice(host_unsent);
    }
    let unread_bytes = image.conns.iter().map(|c| c.unread_len).sum();
    let unsent_bytes = image.conns.iter().map(|c| c.unsent_len).sum();
    let manifest = Manifest {
        upgrade: crate::upgrade::Manifest {
            version: crate::upgrade::VERSION,
            image: image.clone(),
            state_len: handoff.state.len() as u64,
            conn_bytes_len: conn_bytes.len() as u64,
            control: None,
            fd_count: image.listeners.len() + image.conns.len(),
            exec: None,
        },
        tcp: tcp.into_iter().map(|t| t.image).collect(),
    };
    let deadline = tokio::time::Instant::now()
        + opts
            .timeout
            .saturating_sub(handoff.frozen_at.elapsed())
            .max(Duration::from_secs(1));
    let within = |step| Within {
        step,
        deadline,
        timeout: opts.timeout,
    };
    let sending = Instant::now();
    within("send")
        .run(link.send(
            &Message::Manifest(Box::new(manifest)),
            &[&handoff.state, &conn_bytes, &unacked],
        ))
        .await
        .map_err(Sent::Before)?;
    let ready = within("import")
        .run(recv(link))
        .await
        .map_err(Sent::Before)?;
    let Message::Ready {
        import_us,
        validate_us,
        tcp_restore_us,
        after_receive_us,
    } = ready
    else {
        return Err(Sent::Before(unexpected("import", ready)));
    };
    let timings = Timings {
        export: handoff.timings.export,
        transfer: sending
            .elapsed()
            .saturating_sub(Duration::from_micros(after_receive_us)),
        import: Duration::from_micros(import_us),
        validate: Duration::from_micros(validate_us),
    };
    let mut report = SwapReport {
        service: image.service.clone(),
        kind: "migrate".into(),
        generation_from: image.generation,
        generation_to: image.generation + 1,
        from: image.component.clone(),
        to: prepared.component.clone(),
        format: Some(image.format.clone()).filter(|f| !f.is_empty()),
        state_bytes: handoff.state.len(),
        compile_us: prepared.compile_us,
        from_cache: prepared.from_cache,
        instantiate_us: prepared.instantiate_us,
        pause: Pause::new(handoff.frozen_at.elapsed(), &timings),
        connections: image.conns.len(),
        warnings: Vec::new(),
        upgrade: None,
        validation: Some(crate::service::Validation::Export),
        shadow: None,
        migrate: Some(MigrateInfo {
            mode: match opts.how {
                How::MoveIp(_) => "move-ip".into(),
                How::Relay => "relay".into(),
            },
            to: opts.to.to_string(),
            address: match opts.how {
                How::MoveIp(addr) => Some(addr.to_string()),
                How::Relay => None,
            },
            sender_pid: std::process::id(),
            receiver_pid: prepared.pid,
            component_sent: false,
            listeners: image.listeners.len(),
            timers: image.timers.len(),
            unread_bytes,
            unsent_bytes,
            unacked_bytes: unacked.len(),
            tcp_freeze_us: micros(frozen.tcp_freeze),
            address_remove_us: micros(frozen.address_remove),
            tcp_restore_us,
            address_add_us: 0,
            repair_off_us: 0,
            relayed: 0,
            receiver_listens: Vec::new(),
        }),
    };
    let commit = Message::Commit {
        report: Box::new(report.clone()),
    };
    if let Err(failure) = within("commit").run(link.send(&commit, &[])).await {
        return Err(Sent::AfterCommit(failure, Box::new(report)));
    }
    match within("commit").run(recv(link)).await {
        Ok(Message::Serving {
            address_add_us,
            repair_off_us,
            listening,
        }) => {
            report.pause = Pause::new(handoff.frozen_at.elapsed(), &timings);
            if let Some(info) = report.migrate.as_mut() {
                info.address_add_us = address_add_us;
                info.repair_off_us = repair_off_us;
                info.receiver_listens = listening;
                if matches!(opts.how, How::Relay) {
                    info.relayed = image.conns.len();
                }
            }
            Ok(report)
        }
        Ok(other) => Err(Sent::AfterCommit(
            unexpected("commit", other),
            Box::new(report),
        )),
        Err(failure) => Err(Sent::AfterCommit(failure, Box::new(report))),
    }
}

/// `--relay`: copies of the frozen client sockets (the service closes its
/// own at the commit), as relay streams by connection id.
fn relay_sockets(handoff: &Handoff) -> std::io::Result<Vec<(u64, super::relay::Local)>> {
    let conn_fds = &handoff.fds[handoff.image.listeners.len()..];
    handoff
        .image
        .conns
        .iter()
        .zip(conn_fds)
        .map(|(conn, &fd)| {
            // SAFETY: the actor keeps the socket open until the decision,
            // which is sent after this.
            let copy = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
            let stream = std::net::TcpStream::from(copy);
            stream.set_nonblocking(true)?;
            let local: super::relay::Local = Box::new(tokio::net::TcpStream::from_std(stream)?);
            Ok((conn.id, local))
        })
        .collect()
}

/// The receiver serves: this host's service ends. Its sockets close in
/// repair mode, so no client sees a FIN or a reset.
fn release(frozen: Frozen2, report: &SwapReport) {
    super::remember_move(report);
    let _ = frozen
        .handoff
        .decision
        .send(Decision::Commit(Box::new(report.clone())));
}

/// Undoes a migration before its commit: every socket out of repair
/// mode, the address back (and announced, in case the receiver announced
/// it), then the service thaws. Returns the failure for the caller.
async fn resume(
    frozen: Frozen2,
    prepared: &Prepared,
    failure: Failure,
    link: Option<Link>,
) -> Failure {
    if let Some(mut link) = link {
        let abort = Message::Abort {
            reason: failure.text(),
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), link.send(&abort, &[])).await;
    }
    let Frozen2 {
        handoff,
        repaired,
        removed,
        keepalived,
        in_fault,
        ..
    } = frozen;
    // keepalived takes the address back first (this host preempts: the
    // receiver still holds its instance in FAULT).
    if let (Some(keepalived), Some(ip)) = (&keepalived, in_fault) {
        match keepalived.fault(false) {
            Ok(()) => {
                if let Err(e) = address::wait_for(ip, true, KEEPALIVED_WAIT).await {
                    tracing::error!("migrate: resuming: {e:#}");
                }
            }
            Err(e) => tracing::error!("migrate: resuming: {e:#}; {ip} stays off this host"),
        }
    }
    for fd in repaired {
        // SAFETY: the actor keeps the sockets open until the decision.
        if let Err(e) = repair::leave(unsafe { BorrowedFd::borrow_raw(fd) }) {
            tracing::error!("migrate: a socket did not leave repair mode: {e}");
        }
    }
    if let Some((addr, iface)) = removed {
        if let Err(e) = address::add(&addr, &iface).await {
            tracing::error!(
                "migrate: could not put {addr} back on {}: {e:#}",
                iface.name
            );
        }
        if let Err(e) = address::announce(addr.ip, &iface) {
            tracing::warn!("migrate: could not announce {} again: {e}", addr.ip);
        }
    }
    let record = aborted_record(&handoff, prepared, &failure);
    let _ = handoff.decision.send(Decision::Abort(Box::new(record)));
    failure
}

/// How to reach the receiver of a migration to ask what became of it.
struct Asker {
    opts: MigrateOptions,
    name: String,
    tls: TlsFiles,
    id: String,
}

impl Asker {
    /// Asks the receiver, on a new link, whether it serves migration `id`.
    /// Connection refused means its process is gone (the service lives
    /// only there): `Aborted`.
    async fn outcome(&self) -> anyhow::Result<Outcome> {
        let ask = async {
            let mut link = match Link::connect(self.opts.to, &self.name, &self.tls).await {
                Ok(link) => link,
                Err(e)
                    if e.chain().any(|c| {
                        c.downcast_ref::<std::io::Error>()
                            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
                    }) =>
                {
                    return Ok(Outcome::Aborted);
                }
                Err(e) => return Err(e),
            };
            let query = Message::Query {
                id: self.id.clone(),
            };
            link.send(&query, &[]).await?;
            match link.recv::<Message>(0).await? {
                (Message::Outcome { outcome, .. }, _) => Ok(outcome),
                (other, _) => anyhow::bail!("unexpected answer to a query: {other:?}"),
            }
        };
        tokio::time::timeout(self.opts.timeout.max(Duration::from_secs(2)), ask)
            .await
            .context("no answer")?
    }
}
