//! `wasmhost upgrade --exec`: the same handoff, but the new binary replaces
//! this process's image (`execve`, same PID) instead of starting beside it.
//!
//! Phases 1 to 3 run as in the spawn mode, with a throw-away process: it
//! proves that the new binary starts, speaks this handoff version and can
//! load and instantiate the component (filling the compile cache), and is
//! then dismissed. Phase 4 freezes the service as always. Then, instead of
//! sending, this process writes the manifest and the payload to a memfd,
//! clears close-on-exec on every socket it hands over (and on the upgrade
//! client's control connection, which the new image answers), and execs
//! the new binary with `WASMHOST_UPGRADE_MEMFD`. The new image reads the
//! manifest, adopts the descriptors by number, imports the state with the
//! same code as the spawn mode, and serves.
//!
//! If `execve` fails, the flags are restored and the service thaws here.
//! Once it succeeds there is no way back: an error in the new image (a
//! state it rejects, say) ends the process, and it is said on the client's
//! connection and in the log. The check run above is what makes that
//! unlikely; it cannot rule out a failure of the state import itself.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use serde::{Deserialize, Serialize};

use super::handover::{Failure, Upgrader};
use super::takeover::{commit_parts, import, load, max_payload};
use super::{MEMFD_ENV, Manifest, Message, Moved, VERSION};
use crate::control::protocol::{self, Response, ResponseFrame};
use crate::serve::{Launch, ServeOptions, Server};
use crate::service::{self, ComponentInfo, Handoff, Pause};

/// What the old image decided before exec.
pub(super) struct Carry {
    pub binary: PathBuf,
    pub component: PathBuf,
    pub previous: Option<PathBuf>,
    pub reply: Option<RawFd>,
}

/// The manifest's part for an exec: what the new image needs besides the
/// service image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Carried {
    /// Descriptor numbers, in the manifest's order (listeners,
    /// connections, control socket); open across the exec.
    pub fds: Vec<RawFd>,
    pub component: PathBuf,
    pub previous: Option<PathBuf>,
    pub binary: PathBuf,
    /// The upgrade client's control connection, answered by the new image.
    pub reply: Option<RawFd>,
    /// `CLOCK_MONOTONIC` (which survives exec) when the service froze and
    /// just before the exec, in nanoseconds.
    pub frozen_ns: u64,
    pub exec_ns: u64,
    pub export_us: u64,
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Old image: writes the manifest, keeps the descriptors open and execs.
/// Returns only if that failed (the service is still frozen here).
pub(super) fn exec(u: &Upgrader, carry: Carry, handoff: &Handoff) -> Failure {
    let mut fds = handoff.fds.clone();
    fds.extend(u.control.as_ref().map(|c| c.fd));
    let now = monotonic_ns();
    let carried = Carried {
        fds: fds.clone(),
        component: carry.component,
        previous: carry.previous,
        binary: carry.binary.clone(),
        reply: carry.reply,
        frozen_ns: now - handoff.frozen_at.elapsed().as_nanos() as u64,
        exec_ns: now,
        export_us: service::micros(handoff.timings.export),
    };
    let manifest = Message::Manifest(Box::new(Manifest {
        version: VERSION,
        image: handoff.image.clone(),
        state_len: handoff.state.len() as u64,
        conn_bytes_len: handoff.conn_bytes.len() as u64,
        control: u.control.as_ref().map(|c| c.path.clone()),
        fd_count: fds.len(),
        exec: Some(carried),
    }));
    let memfd = match write_memfd(&manifest, &[&handoff.state, &handoff.conn_bytes]) {
        Ok(fd) => fd,
        Err(e) => return Failure::new("exec", format!("{e:#}")),
    };
    let mut keep = fds;
    keep.push(memfd.as_raw_fd());
    keep.extend(carry.reply);
    if let Err(e) = set_cloexec(&keep, false) {
        let _ = set_cloexec(&keep, true);
        return Failure::new("exec", format!("{e:#}"));
    }
    tracing::info!(binary = %carry.binary.display(), "upgrade: replacing this process's image");
    let error = std::process::Command::new(&carry.binary)
        .args(&u.launch.args)
        .env(MEMFD_ENV, memfd.as_raw_fd().to_string())
        .exec();
    let _ = set_cloexec(&keep, true);
    Failure::new(
        "exec",
        format!("cannot exec {}: {error}", carry.binary.display()),
    )
}

fn set_cloexec(fds: &[RawFd], on: bool) -> Result<()> {
    let flag = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    for &fd in fds {
        // SAFETY: every descriptor here is held open by the frozen service
        // (or is the memfd or client connection held by the caller).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        fcntl(fd, FcntlArg::F_SETFD(flag)).context("setting close-on-exec")?;
    }
    Ok(())
}

/// The manifest in a memfd: the JSON length and the payload length (8
/// bytes each, big-endian), the JSON, the payload; positioned at the start.
fn write_memfd(message: &Message, payload: &[&[u8]]) -> Result<OwnedFd> {
    let fd =
        nix::sys::memfd::memfd_create(c"wasmhost-upgrade", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .context("memfd_create")?;
    let mut file = File::from(fd);
    let json = serde_json::to_vec(message)?;
    let payload_len: usize = payload.iter().map(|p| p.len()).sum();
    file.write_all(&(json.len() as u64).to_be_bytes())?;
    file.write_all(&(payload_len as u64).to_be_bytes())?;
    file.write_all(&json)?;
    for part in payload {
        file.write_all(part)?;
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(OwnedFd::from(file))
}

fn read_memfd(fd: OwnedFd, max_payload: u64) -> Result<(Message, Vec<u8>)> {
    let mut file = File::from(fd);
    let mut head = [0u8; 16];
    file.read_exact(&mut head).context("reading the manifest")?;
    let json_len = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    let payload_len = u64::from_be_bytes(head[8..].try_into().expect("8 bytes"));
    ensure!(
        json_len <= super::channel::MAX_JSON as u64 && payload_len <= max_payload,
        "manifest of {json_len} bytes with a payload of {payload_len} is over the limits"
    );
    let mut json = vec![0; json_len as usize];
    file.read_exact(&mut json).context("reading the manifest")?;
    let mut payload = vec![0; payload_len as usize];
    file.read_exact(&mut payload)
        .context("reading the payload")?;
    let message = serde_json::from_slice(&json).context("malformed manifest")?;
    Ok((message, payload))
}

/// Takes a descriptor inherited across exec: it must be open; it is made
/// close-on-exec again.
fn inherited(fd: RawFd) -> Result<OwnedFd> {
    ensure!(fd > 2, "descriptor {fd} cannot be a handed-over socket");
    // SAFETY: the number comes from the manifest the old image wrote for
    // us; checked to be open before it is owned.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .with_context(|| format!("descriptor {fd} from the manifest is not open"))?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// New image: takes over the service from the manifest in `memfd`, and
/// answers the upgrade client.
pub async fn receive_exec(opts: ServeOptions, launch: Launch, memfd: OwnedFd) -> Result<Server> {
    let started = Instant::now();
    let memfd = {
        let raw = memfd.as_fd().as_raw_fd();
        fcntl(memfd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .with_context(|| format!("{MEMFD_ENV}={raw} is not open"))?;
        memfd
    };
    let (message, payload) = read_memfd(memfd, max_payload(&opts))?;
    let Message::Manifest(manifest) = message else {
        bail!("{MEMFD_ENV} holds no manifest");
    };
    let Some(carried) = manifest.exec.clone() else {
        bail!("the manifest is not one for an exec");
    };
    let reply = carried.reply.map(inherited).transpose().ok().flatten();
    let result = take_over(&opts, &manifest, payload, &carried, started).await;
    let (response, outcome) = match result {
        Ok((parts, report)) => {
            let server = Server::assemble(parts, &opts, launch);
            tracing::info!(
                pid = std::process::id(),
                blackout_us = report.pause.pause_us,
                "upgrade --exec committed: the new image serves the service"
            );
            (Response::Swapped(Box::new(report)), Ok(server))
        }
        Err(e) => {
            let message = format!(
                "upgrade --exec failed after exec, in the new image (the service is lost; restart it): {e:#}"
            );
            (Response::Error { message }, Err(e))
        }
    };
    if let Some(fd) = reply {
        answer(fd, response).await;
    }
    outcome
}

async fn take_over(
    opts: &ServeOptions,
    manifest: &Manifest,
    payload: Vec<u8>,
    carried: &Carried,
    started: Instant,
) -> Result<(crate::serve::Parts, service::SwapReport)> {
    let fds = carried
        .fds
        .iter()
        .map(|&fd| inherited(fd))
        .collect::<Result<Vec<_>>>()?;
    let read_ns = monotonic_ns();
    manifest.check(payload.len()).map_err(anyhow::Error::msg)?;
    let image = &manifest.image;
    let loaded = load(
        opts,
        &image.service,
        &carried.component,
        carried.previous.as_deref(),
    )
    .await?;
    let program = loaded.prepared.instance.program.clone();
    let instantiate_us = service::micros(loaded.prepared.instantiate_time);
    let conn_bytes = manifest.conn_bytes_len as usize;
    let (mut parts, mut timings) = import(opts, loaded, manifest, payload, fds).await?;
    timings.export = Duration::from_micros(carried.export_us);
    timings.transfer = Duration::from_nanos(read_ns.saturating_sub(carried.exec_ns));
    let blackout = Duration::from_nanos(monotonic_ns().saturating_sub(carried.frozen_ns));
    let moved = Moved {
        to: ComponentInfo::of(&program),
        compile_us: service::micros(program.compile_time),
        from_cache: program.from_cache,
        instantiate_us,
        state_bytes: manifest.state_len as usize,
        conn_bytes,
    };
    let report = super::report(
        image,
        moved,
        Pause::new(blackout, &timings),
        "exec",
        std::process::id(),
        &carried.binary,
    );
    tracing::debug!("took over in {:?} after exec", started.elapsed());
    commit_parts(&mut parts, &report);
    Ok((parts, report))
}

/// Writes the upgrade's answer on the client's control connection.
async fn answer(fd: OwnedFd, response: Response) {
    let stream = std::os::unix::net::UnixStream::from(fd);
    let sent = async {
        stream.set_nonblocking(true)?;
        let mut stream = tokio::net::UnixStream::from_std(stream)?;
        let frame = ResponseFrame {
            version: protocol::VERSION,
            response,
        };
        protocol::write_frame(&mut stream, &frame).await?;
        anyhow::Ok(())
    };
    if let Err(e) = sent.await {
        tracing::warn!("could not answer the upgrade client: {e:#}");
    }
}
