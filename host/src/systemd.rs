//! systemd integration: readiness notifications (`NOTIFY_SOCKET`) and
//! socket activation (`LISTEN_FDS`, `LISTEN_FDNAMES`).
//!
//! With `Type=notify` (see `host/systemd/`), systemd learns that the
//! service is ready (`READY=1`), that an upgrade is under way
//! (`RELOADING=1`), which process serves after a host upgrade
//! (`MAINPID=`, sent by the old process before it exits; the unit needs
//! `NotifyAccess=all` so the new process may speak too) and that it is
//! stopping (`STOPPING=1`). Outside systemd every call here does nothing.

use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use sd_notify::NotifyState;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd ({states:?}): {e}");
    }
}

/// Serving: start-up (or taking over) is complete. A process that took
/// over from another says it is the main one now in the same message, so
/// systemd never sees it ready under the old pid (the old process sends
/// `MAINPID=` too, but may be later).
pub fn ready(took_over: bool) {
    match took_over {
        true => notify(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready]),
        false => notify(&[NotifyState::Ready]),
    }
}

/// A host upgrade started; [`ready`] or [`main_pid`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The service is handed to process `pid`, which serves from now on.
pub fn main_pid(pid: u32) {
    notify(&[NotifyState::MainPid(pid)]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Listening sockets passed by socket activation, with their names
/// (`FileDescriptorName=` in the socket unit), removed from the
/// environment. Empty when the process was not socket-activated.
///
/// # Safety
///
/// Changes the environment: call it before any other thread starts.
pub unsafe fn take_listen_fds() -> Result<Vec<(String, OwnedFd)>> {
    // SAFETY: the caller guarantees no other thread runs.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .context("reading the sockets systemd passed (LISTEN_FDS)")?;
    // SAFETY: systemd passed these descriptors to this process (LISTEN_PID
    // was checked); nothing else owns them.
    Ok(fds
        .map(|(fd, name)| (name, unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect())
}
