//! The old process's side of a host upgrade (phases 1 to 7 of the
//! protocol in `super`): start the new binary, wait until it is prepared,
//! freeze the service, send it over, and commit or undo.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::channel::{Channel, ChannelClosed};
use super::{FD_ENV, Manifest, Message, Prepared, VERSION};
use crate::control::server::ControlHandoff;
use crate::serve::Launch;
use crate::service::{
    Decision, Exclusive, Handoff, HandoffRequest, Pause, ServiceHandle, SwapRecord, SwapReport,
    Timings, micros,
};

/// What runs an upgrade of one service: held by the control socket and the
/// SIGUSR2 handler.
#[derive(Clone)]
pub struct Upgrader {
    pub service: ServiceHandle,
    pub name: Arc<str>,
    pub launch: Launch,
    /// The control socket, handed over too.
    pub control: Option<ControlHandoff>,
    /// One swap or upgrade at a time.
    pub exclusive: Exclusive,
    /// `serve --instances`: an upgrade hands over one instance only, so it
    /// is refused for more.
    pub instances: usize,
    /// The certificates `serve` was given, for `migrate`'s link.
    pub tls: Option<crate::migrate::TlsFiles>,
    /// This host's keepalived track file (`serve --keepalived-track`).
    pub keepalived: Option<crate::migrate::address::Keepalived>,
}

/// `wasmhost upgrade`'s options.
#[derive(Clone, Debug)]
pub struct UpgradeOptions {
    /// The new binary [default: the path this process started from].
    pub binary: Option<PathBuf>,
    /// Another component for the new process [default: the running one].
    pub component: Option<PathBuf>,
    /// How long the new process may take from start to `Ready`.
    pub timeout: Duration,
    /// Replace this process's image (same PID) instead of starting a new
    /// process beside it.
    pub exec: bool,
    /// `--exec`: the client's connection, answered by the new image.
    pub reply_fd: Option<std::os::fd::RawFd>,
}

impl Default for UpgradeOptions {
    fn default() -> Self {
        UpgradeOptions {
            binary: None,
            component: None,
            timeout: Duration::from_secs(10),
            exec: false,
            reply_fd: None,
        }
    }
}

/// Why an upgrade failed: the phase and the cause.
pub(crate) struct Failure {
    /// `upgrade` or `migrate`.
    what: &'static str,
    pub(crate) step: &'static str,
    message: String,
}

impl Failure {
    pub(crate) fn new(step: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            what: "upgrade",
            step,
            message: message.into(),
        }
    }

    /// A failure of `migrate` at `step`.
    pub(crate) fn migrate(step: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            what: "migrate",
            ..Failure::new(step, message)
        }
    }

    pub(crate) fn text(&self) -> String {
        format!(
            "{} failed at step `{}`: {}",
            self.what, self.step, self.message
        )
    }
}

/// Runs one upgrade. On success the service is the new process's (this
/// actor has ended); on failure this process serves on, and the error says
/// which step failed and why.
pub async fn upgrade(u: &Upgrader, opts: UpgradeOptions) -> Result<SwapReport, String> {
    if u.instances > 1 {
        return Err(format!(
            "a host upgrade hands over one instance, and this service runs {} (--instances): \
             restart it instead, or serve it with --instances 1",
            u.instances
        ));
    }
    let _running = u.exclusive.begin("an upgrade")?;
    let _handing_off = crate::fleet::health().handing_off();
    crate::systemd::reloading();
    let result = run(u, opts).await;
    match &result {
        Ok(report) => match report.upgrade.as_ref() {
            Some(info) if info.new_pid != std::process::id() => {
                crate::systemd::main_pid(info.new_pid)
            }
            _ => crate::systemd::ready(false),
        },
        Err(_) => crate::systemd::ready(false),
    }
    result
}

async fn run(u: &Upgrader, opts: UpgradeOptions) -> Result<SwapReport, String> {
    let status = u.service.status().await.map_err(|e| e.to_string())?;
    let current = PathBuf::from(&status.component.path);
    let component = match &opts.component {
        Some(path) => std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?,
        None => current.clone(),
    };
    // Rollback after the upgrade returns to what ran before it changed.
    let previous = match component == current {
        true => status.previous.map(|p| PathBuf::from(p.path)),
        false => Some(current),
    };
    let binary = opts.binary.clone().unwrap_or_else(|| u.launch.exe.clone());
    let deadline = tokio::time::Instant::now() + opts.timeout;
    tracing::info!(binary = %binary.display(), component = %component.display(), "upgrade: starting the new host process");
    let (channel, theirs) = Channel::pair().map_err(|e| format!("{e:#}"))?;
    let child = spawn(&binary, &u.launch, theirs)
        .map_err(|e| Failure::new("spawn", format!("{e:#}")).text())?;
    let mut h = Handover {
        channel,
        watch: Watch {
            child,
            deadline,
            timeout: opts.timeout,
        },
    };
    let offer = Message::Offer {
        version: VERSION,
        service: u.name.to_string(),
        component: component.clone(),
        previous: previous.clone(),
    };
    let prepared = match h.prepare(offer).await {
        Ok(prepared) => prepared,
        Err(failure) => return Err(h.undo(u, failure, None).await),
    };
    if opts.exec {
        h.dismiss().await;
        let carry = super::exec::Carry {
            binary,
            component,
            previous,
            reply: opts.reply_fd,
        };
        return exec_upgrade(u, carry, &prepared, deadline).await;
    }
    let handoff = match h.freeze(u, &prepared).await {
        Ok(handoff) => handoff,
        Err(failure) => return Err(h.undo(u, failure, None).await),
    };
    match h.send_and_commit(u, &binary, &prepared, &handoff).await {
        Ok(report) => {
            if let Some(control) = &u.control {
                control.hand_over();
            }
            let _ = handoff
                .decision
                .send(Decision::Commit(Box::new(report.clone())));
            h.release();
            Ok(report)
        }
        Err(failure) => {
            let record = aborted_record(&handoff, &prepared, &failure);
            Err(h.undo(u, failure, Some((handoff.decision, record))).await)
        }
    }
}

/// `--exec`: freeze, then replace this process's image. Returns only on
/// failure, after the service thawed.
async fn exec_upgrade(
    u: &Upgrader,
    carry: super::exec::Carry,
    prepared: &Prepared,
    deadline: tokio::time::Instant,
) -> Result<SwapReport, String> {
    let handoff = freeze(u, &prepared.importable, deadline)
        .await
        .map_err(|e| Failure::new("freeze", format!("{e:#}")).text())?;
    let failure = super::exec::exec(u, carry, &handoff);
    let record = aborted_record(&handoff, prepared, &failure);
    let _ = handoff.decision.send(Decision::Abort(Box::new(record)));
    tracing::warn!("{}; this process serves on", failure.text());
    Err(failure.text())
}

/// Starts `binary` with this process's arguments and the channel's other
/// end (its close-on-exec flag cleared in the child only).
fn spawn(binary: &Path, launch: &Launch, theirs: OwnedFd) -> anyhow::Result<Child> {
    if !binary.exists() {
        anyhow::bail!("the new binary {} does not exist", binary.display());
    }
    let fd = theirs.as_raw_fd();
    let mut command = Command::new(binary);
    command
        .args(&launch.args)
        .env(FD_ENV, fd.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let fd = BorrowedFd::borrow_raw(fd);
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )?;
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    drop(theirs);
    Ok(child)
}

/// One upgrade in progress: the channel to the new process, and the
/// process itself watched for exit and deadline.
struct Handover {
    channel: Channel,
    watch: Watch,
}

struct Watch {
    child: Child,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Watch {
    /// Runs `work` until it finishes, the new process exits, or the
    /// deadline passes.
    async fn within<T>(
        &mut self,
        step: &'static str,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> Result<T, Failure> {
        let failed = tokio::select! {
            result = work => match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            },
            status = self.child.wait() => return Err(Failure::new(step, match status {
                Ok(status) => format!("the new process exited ({status})"),
                Err(e) => format!("lost the new process: {e}"),
            })),
            _ = tokio::time::sleep_until(self.deadline) => return Err(Failure::new(step, format!(
                "the new process did not answer within {} ms (--timeout-ms)",
                self.timeout.as_millis()
            ))),
        };
        // A closed channel usually means the process died: say how.
        if failed.downcast_ref::<ChannelClosed>().is_some()
            && let Ok(Ok(status)) =
                tokio::time::timeout(Duration::from_millis(500), self.child.wait()).await
        {
            return Err(Failure::new(
                step,
                format!("the new process exited ({status})"),
            ));
        }
        Err(Failure::new(step, format!("{failed:#}")))
    }
}

impl Handover {
    /// Phases 2 and 3: offer the component, wait until it is loaded.
    async fn prepare(&mut self, offer: Message) -> Result<Prepared, Failure> {
        let ch = &self.channel;
        self.watch.within("offer", ch.send(&offer, &[])).await?;
        let answer = self.watch.within("prepare", recv(ch)).await?;
        match answer {
            Message::Prepared(p) if p.version == VERSION => Ok(p),
            Message::Prepared(p) => Err(Failure::new(
                "prepare",
                format!(
                    "the new binary speaks handoff version {}, this one {VERSION}",
                    p.version
                ),
            )),
            other => Err(unexpected("prepare", other)),
        }
    }

    /// Phase 4, watching the new process meanwhile.
    async fn freeze(&mut self, u: &Upgrader, prepared: &Prepared) -> Result<Handoff, Failure> {
        let deadline = self.watch.deadline;
        self.watch
            .within("freeze", freeze(u, &prepared.importable, deadline))
            .await
    }

    /// The new binary passed the check (`--exec`): let it go.
    async fn dismiss(mut self) {
        let done = Message::Abort {
            reason: "the binary was only checked; this process execs it".into(),
        };
        let _ =
            tokio::time::timeout(Duration::from_millis(500), self.channel.send(&done, &[])).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.watch.child.wait()).await;
        let _ = self.watch.child.kill().await;
    }

    /// Phases 5 to 7: send the manifest, payload and descriptors; wait for
    /// `Ready`; send `Commit`. Returns the report.
    async fn send_and_commit(
        &mut self,
        u: &Upgrader,
        binary: &Path,
        prepared: &Prepared,
        handoff: &Handoff,
    ) -> Result<SwapReport, Failure> {
        let image = &handoff.image;
        let mut fds = handoff.fds.clone();
        fds.extend(u.control.as_ref().map(|c| c.fd));
        let manifest = Message::Manifest(Box::new(Manifest {
            version: VERSION,
            image: image.clone(),
            state_len: handoff.state.len() as u64,
            conn_bytes_len: handoff.conn_bytes.len() as u64,
            control: u.control.as_ref().map(|c| c.path.clone()),
            fd_count: fds.len(),
            exec: None,
        }));
        let ch = &self.channel;
        let sending = Instant::now();
        let send = async {
            ch.send(&manifest, &[&handoff.state, &handoff.conn_bytes])
                .await?;
            ch.send_fds(&fds).await
        };
        self.watch.within("send", send).await?;
        let (import_us, validate_us, after_receive_us) =
            match self.watch.within("import", recv(ch)).await? {
                Message::Ready {
                    import_us,
                    validate_us,
                    after_receive_us,
                } => (import_us, validate_us, after_receive_us),
                other => return Err(unexpected("import", other)),
            };
        let round_trip = sending.elapsed();
        let timings = Timings {
            export: handoff.timings.export,
            transfer: round_trip.saturating_sub(Duration::from_micros(after_receive_us)),
            import: Duration::from_micros(import_us),
            validate: Duration::from_micros(validate_us),
        };
        let report = super::report(
            image,
            super::Moved {
                to: prepared.component.clone(),
                compile_us: prepared.compile_us,
                from_cache: prepared.from_cache,
                instantiate_us: prepared.instantiate_us,
                state_bytes: handoff.state.len(),
                conn_bytes: handoff.conn_bytes.len(),
            },
            Pause::new(handoff.frozen_at.elapsed(), &timings),
            "spawn",
            prepared.pid,
            binary,
        );
        let commit = Message::Commit {
            report: Box::new(report.clone()),
        };
        // From here on, new control clients must reach the new process.
        if let Some(control) = &u.control {
            control.pause();
        }
        self.watch.within("commit", ch.send(&commit, &[])).await?;
        // The new process says it serves before it touches a socket: until
        // then, undoing is safe.
        match self.watch.within("commit", recv(ch)).await? {
            Message::Serving => Ok(report),
            other => Err(unexpected("commit", other)),
        }
    }

    /// After a failure: tell the new process, kill it and wait until it is
    /// gone, and only then let the service thaw (so that the two never read
    /// from one socket). Returns the message for the user.
    async fn undo(
        mut self,
        u: &Upgrader,
        failure: Failure,
        frozen: Option<(oneshot::Sender<Decision>, SwapRecord)>,
    ) -> String {
        let abort = Message::Abort {
            reason: failure.text(),
        };
        let _ =
            tokio::time::timeout(Duration::from_millis(100), self.channel.send(&abort, &[])).await;
        if let Err(e) = self.watch.child.kill().await {
            tracing::warn!("could not kill the new process: {e}");
        }
        if let Some((decision, record)) = frozen {
            let _ = decision.send(Decision::Abort(Box::new(record)));
        }
        if let Some(control) = &u.control {
            control.resume();
        }
        tracing::warn!("{}; this process serves on", failure.text());
        failure.text()
    }

    /// The new process serves now: let it live on when this one exits.
    fn release(self) {
        let Handover { channel, watch } = self;
        drop(channel);
        // Dropping a `Child` with kill_on_drop would kill it.
        std::mem::forget(watch.child);
    }
}

/// Phase 4: freeze the service at its next update point and export its
/// state in the first of `importable` it offers.
pub(crate) async fn freeze(
    u: &Upgrader,
    importable: &[String],
    deadline: tokio::time::Instant,
) -> anyhow::Result<Handoff> {
    let (reply, frozen) = oneshot::channel();
    let request = HandoffRequest {
        importable: importable.to_vec(),
        drain_timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
        reply,
    };
    u.service
        .handoff(request)
        .await
        .map_err(anyhow::Error::msg)?;
    frozen
        .await
        .map_err(|_| anyhow::anyhow!("the service stopped"))?
        .map_err(anyhow::Error::msg)
}

async fn recv(channel: &Channel) -> anyhow::Result<Message> {
    let (message, _) = channel.recv::<Message>(0).await?;
    if let Message::Failed { step, message } = message {
        anyhow::bail!("the new process failed at `{step}`: {message}");
    }
    Ok(message)
}

fn unexpected(step: &'static str, message: Message) -> Failure {
    Failure::new(
        step,
        format!("unexpected message from the new process: {message:?}"),
    )
}

/// The history entry for an upgrade undone after the freeze.
pub(crate) fn aborted_record(
    handoff: &Handoff,
    prepared: &Prepared,
    failure: &Failure,
) -> SwapRecord {
    SwapRecord {
        at_unix_ms: crate::service::unix_ms(SystemTime::now()),
        kind: failure.what.into(),
        from: handoff.image.component.clone(),
        to: prepared.component.clone(),
        format: Some(handoff.image.format.clone()).filter(|f| !f.is_empty()),
        state_bytes: handoff.state.len(),
        pause_us: micros(handoff.frozen_at.elapsed()),
        outcome: format!("aborted: {}", failure.text()),
        migrate: None,
    }
}
