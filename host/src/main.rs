//! The `wasmhost` binary: parse the command line, set up logging and the
//! runtime, and call the library.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tracing_subscriber::EnvFilter;
use wasmhost::cli::{self, CacheArgs, CheckArgs, Cli, Command, CompileArgs, ServeArgs};
use wasmhost::migrate::Port;
use wasmhost::shutdown::{HostSignal, Signals};
use wasmhost::upgrade::{self, UpgradeOptions};
use wasmhost::{Launch, ServeOptions, Server, engine, fleet, net, service, systemd};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // Before any thread starts: the environment is not to be changed later.
    let handoff = match take_handoff_fd() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: no other thread runs yet.
    let activated = match unsafe { wasmhost::systemd::take_listen_fds() } {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let threads = match &cli.command {
        // A standby replays its live copy beside the link it acknowledges
        // on: two threads, so that the replay never delays an ack.
        Command::Serve(args) => args.threads.map_or_else(
            || {
                let standby = if args.standby_of.is_some() { 2 } else { 1 };
                wasmhost::cli::default_threads()
                    .max(args.instances)
                    .max(standby)
            },
            usize::from,
        ),
        _ => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .thread_name("wasmhost")
        .build()
        .expect("building the tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args, handoff, activated).await,
            Command::Swap(args) => wasmhost::admin::swap(args).await,
            Command::Status(args) => wasmhost::admin::status(args).await,
            Command::Snapshot(args) => wasmhost::admin::snapshot(args).await,
            Command::Rollback(args) => wasmhost::admin::rollback(args).await,
            Command::Commit(args) => wasmhost::admin::commit(args).await,
            Command::Abort(args) => wasmhost::admin::abort(args).await,
            Command::Upgrade(args) => wasmhost::admin::upgrade(args).await,
            Command::Migrate(args) => wasmhost::admin::migrate(args).await,
            Command::Drain(args) => wasmhost::admin::drain(args).await,
            Command::Promote(args) => wasmhost::admin::promote(args).await,
            Command::Compile(args) => compile(args),
            Command::New(args) => new_project(args),
            Command::Check(args) => check(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_env("WASMHOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// How a host upgrade started this process, if one did.
enum Handoff {
    /// Spawned beside the old process: the handoff channel.
    Spawned(OwnedFd),
    /// The old process's image was replaced: the memfd with the manifest.
    Execed(OwnedFd),
}

/// Reads `WASMHOST_UPGRADE_FD` or `WASMHOST_UPGRADE_MEMFD` and removes
/// both from the environment, so that nothing this process starts inherits
/// the name of a descriptor it does not have.
fn take_handoff_fd() -> Result<Option<Handoff>> {
    let spawned = inherited_fd(upgrade::FD_ENV)?;
    let execed = inherited_fd(upgrade::MEMFD_ENV)?;
    Ok(match (spawned, execed) {
        (Some(fd), None) => Some(Handoff::Spawned(fd)),
        (None, Some(fd)) => Some(Handoff::Execed(fd)),
        (None, None) => None,
        (Some(_), Some(_)) => anyhow::bail!(
            "both {} and {} are set; a process is started by one kind of upgrade",
            upgrade::FD_ENV,
            upgrade::MEMFD_ENV
        ),
    })
}

fn inherited_fd(var: &str) -> Result<Option<OwnedFd>> {
    let Some(value) = std::env::var_os(var) else {
        return Ok(None);
    };
    // SAFETY: called at the start of main, before any other thread exists.
    unsafe { std::env::remove_var(var) };
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|&fd| fd > 2)
        .with_context(|| format!("{var} is not a descriptor number: {value:?}"))?;
    // SAFETY: the old host passed this descriptor to this process; nothing
    // else in it knows of it. Check it is open before owning it.
    nix::fcntl::fcntl(
        unsafe { BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .with_context(|| format!("{var}={fd} is not an open descriptor"))?;
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

async fn serve(
    args: ServeArgs,
    handoff: Option<Handoff>,
    activated: Vec<(String, OwnedFd)>,
) -> Result<()> {
    net::raise_fd_limit();
    let receive = args.receive;
    let on_sigterm = OnTerm {
        drain: match args.on_sigterm {
            Some(policy) => policy == cli::OnSigterm::Drain,
            None => std::env::var_os("INVOCATION_ID").is_some(),
        },
        timeout: Duration::from_secs(args.drain_timeout_s),
    };
    let upgraded = handoff.is_some();
    let no_fence = args.no_fence;
    let standby = args.standby_of.map(|primary| StandbyArgs {
        primary,
        primary_name: args.primary_name.clone(),
        standby_name: args.standby_name.clone(),
        fifo: args.promote_fifo.clone(),
        instance: args.promote_instance.clone(),
    });
    if let Some(addr) = args.admin {
        fleet::listen(addr, "--admin", upgraded, fleet::http::serve).await?;
    }
    if let Some(addr) = args.agent_check {
        fleet::listen(addr, "--agent-check", upgraded, fleet::agent::serve).await?;
    }
    let opts = serve_options(args)?;
    let max_connections = opts.max_connections;
    let mut signals = Signals::install()?;
    let launch = Launch::current()?;
    let took_over = handoff.is_some();
    if let Some(dir) = &opts.durable.state_dir {
        // Before the migration port answers anyone's `EpochQuery`.
        wasmhost::standby::adopt_epoch(dir)?;
    }
    let mut port = match receive {
        Some(addr) => {
            let tls = opts
                .tls
                .as_ref()
                .context("--receive needs --tls-cert, --tls-key and --tls-ca")?;
            let port = Port::bind(addr, tls, opts.clone()).await?;
            eprintln!("receiving services on {}", port.local_addr());
            Some(port)
        }
        None => None,
    };
    let mut server = match (handoff, &mut port) {
        (Some(Handoff::Spawned(fd)), _) => upgrade::receive(opts, launch.clone(), fd).await?,
        (Some(Handoff::Execed(fd)), _) => upgrade::receive_exec(opts, launch.clone(), fd).await?,
        (None, port) if standby.is_some() => {
            let standby = standby.expect("the guard says it is there");
            let port = port.as_ref().map(|p| p.local_addr());
            match run_standby(standby, &opts, &launch, port, &mut signals, activated).await? {
                Some(server) => server,
                None => return Ok(()),
            }
        }
        (None, Some(port)) if opts.guest.is_none() => {
            systemd::ready(false);
            match wait_for_service(port, &launch, &mut signals).await? {
                Some(server) => server,
                None => return Ok(()),
            }
        }
        (None, _) => {
            if let Some(dir) = &opts.durable.state_dir {
                wasmhost::standby::fence(dir, opts.tls.as_ref(), no_fence).await?;
            }
            Server::start(opts.clone(), launch.clone(), activated).await?
        }
    };
    systemd::ready(took_over);
    loop {
        // Ready from here (a new service accepts: a drain ended with the
        // process or the host that had it).
        fleet::health().set_draining(false);
        fleet::health().set_service(Some(server.operations()), max_connections);
        for (name, addr) in server.addrs() {
            eprintln!("listening on {name} {addr}");
        }
        if let Some(path) = server.control_path() {
            eprintln!("control socket {}", path.display());
        }
        eprintln!("serving as pid {}", std::process::id());
        let ops = server.operations();
        let ended = server
            .run(handle_signals(&mut signals, ops, on_sigterm))
            .await;
        fleet::health().set_service(None, 0);
        fleet::health().reset_drain();
        let ended = ended?;
        // A service that moved to another machine leaves this host empty:
        // with --receive it waits for one again.
        match (ended, &mut port) {
            // Told to stop (SIGTERM) while the service moved away: stop.
            (service::Ended::HandedOff, Some(_)) if fleet::health().stopping() => return Ok(()),
            (service::Ended::HandedOff, Some(port)) => {
                match wait_for_service(port, &launch, &mut signals).await? {
                    Some(next) => server = next,
                    None => return Ok(()),
                }
            }
            (service::Ended::HandedOff, None) => {
                // --relay: connections this host relays for the receiver
                // live until they close.
                let relaying = wasmhost::migrate::relay::relaying();
                if relaying > 0 {
                    eprintln!("relaying {relaying} connections for the new host until they close");
                    tokio::select! {
                        _ = wasmhost::migrate::relay::wait_idle() => {}
                        _ = wait_for_shutdown(&mut signals) => {}
                    }
                }
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
}

/// `serve --standby-of`'s settings besides the serve options.
struct StandbyArgs {
    primary: std::net::SocketAddr,
    primary_name: Option<String>,
    standby_name: Option<String>,
    fifo: Option<std::path::PathBuf>,
    instance: Option<String>,
}

/// Follows the primary until promoted (then serves: `Some`) or told to
/// stop (`None`).
async fn run_standby(
    s: StandbyArgs,
    opts: &ServeOptions,
    launch: &Launch,
    receive: Option<std::net::SocketAddr>,
    signals: &mut Signals,
    activated: Vec<(String, OwnedFd)>,
) -> Result<Option<Server>> {
    use wasmhost::standby::{self, follow};
    let dir = opts
        .durable
        .state_dir
        .clone()
        .context("--standby-of needs --state-dir")?;
    let tls = opts
        .tls
        .clone()
        .context("--standby-of needs --tls-cert, --tls-key and --tls-ca")?;
    let follow_opts = follow::FollowOptions {
        primary: s.primary,
        primary_name: s.primary_name.unwrap_or_else(|| s.primary.ip().to_string()),
        dir: dir.clone(),
        tls,
        receive: receive.map(|addr| standby::Peer {
            addr,
            name: s.standby_name.unwrap_or_else(|| addr.ip().to_string()),
        }),
        fsync: opts.durable.fsync,
        serve: opts.clone(),
    };
    let (promote, mut promotions) = tokio::sync::mpsc::channel(4);
    let idle = match &opts.control {
        Some(path) => {
            let socket = wasmhost::control::server::ControlSocket::bind(path).await?;
            let stop = tokio_util::sync::CancellationToken::new();
            let primary = s.primary;
            let status = move || wasmhost::control::protocol::IdleStatus {
                pid: std::process::id(),
                waiting_on: format!("standby of {primary}"),
                relaying: 0,
                last_move: None,
                replication: standby::status(),
            };
            let task = tokio::spawn(socket.serve_idle(status, Some(promote.clone()), stop.clone()));
            Some((stop, task))
        }
        None => None,
    };
    if let Some(fifo) = s.fifo {
        follow::watch_fifo(fifo, s.instance, promote.clone());
    }
    eprintln!(
        "standby of {}: following into {} (wasmhost promote makes it serve)",
        s.primary,
        dir.display()
    );
    systemd::ready(false);
    let promoted = tokio::select! {
        promoted = follow::follow(&follow_opts, &mut promotions) => promoted,
        sig = wait_for_shutdown_signal(signals) => {
            tracing::info!("{sig} received: the standby stops");
            return Ok(None);
        }
    };
    // The standby's control socket goes; the service's takes its place.
    if let Some((stop, task)) = idle {
        stop.cancel();
        let _ = task.await;
    }
    let promoted = promoted?;
    let mut opts = opts.clone();
    opts.guest = Some(promoted.component.clone());
    let started = match promoted.warm {
        Some(warm) => Server::start_warm(opts, launch.clone(), activated, warm).await,
        None => Server::start(opts, launch.clone(), activated).await,
    };
    match started {
        Ok(server) => {
            let addrs: Vec<String> = server
                .addrs()
                .iter()
                .map(|(name, addr)| format!("{name} {addr}"))
                .collect();
            let message = format!(
                "promoted at epoch {}: serving on {}",
                promoted.epoch,
                addrs.join(", ")
            );
            eprintln!("{message}");
            let _ = promoted.reply.send(Ok(message));
            Ok(Some(server))
        }
        Err(e) => {
            let _ = promoted.reply.send(Err(format!(
                "promoted (epoch {}), but the service did not start: {e:#}. The state dir is \
                 this host's now: fix the cause and start it as a primary (`wasmhost serve {} \
                 --state-dir {} ...`)",
                promoted.epoch,
                promoted.component.display(),
                dir.display()
            )));
            Err(e)
        }
    }
}

/// Waits for SIGTERM or SIGINT (other signals have nothing to act on).
async fn wait_for_shutdown(signals: &mut Signals) {
    loop {
        if let HostSignal::Shutdown(sig) = signals.next().await {
            tracing::info!("{sig} received: the relayed connections close");
            return;
        }
    }
}

/// Waits for a service on the migration port; `None` if the host is told
/// to stop first.
async fn wait_for_service(
    port: &mut Port,
    launch: &Launch,
    signals: &mut Signals,
) -> Result<Option<Server>> {
    eprintln!("waiting for a service on {}", port.local_addr());
    loop {
        tokio::select! {
            server = port.next(launch.clone()) => return server.map(Some),
            signal = signals.next() => match signal {
                HostSignal::Shutdown(sig) => {
                    tracing::info!("{sig} received while waiting for a service");
                    return Ok(None);
                }
                _ => tracing::info!("no service here yet: nothing to upgrade or reload"),
            },
        }
    }
}

/// What SIGTERM does (`serve --on-sigterm`, `--drain-timeout-s`).
#[derive(Clone, Copy)]
struct OnTerm {
    drain: bool,
    timeout: Duration,
}

/// Answers signals while a service runs: SIGTERM/SIGINT stop it (SIGTERM
/// drains first with `--on-sigterm drain`), SIGUSR2 upgrades the host,
/// SIGHUP swaps to the component file on disk.
async fn handle_signals(
    signals: &mut Signals,
    ops: wasmhost::control::server::ControlCtx,
    on_term: OnTerm,
) {
    loop {
        match signals.next().await {
            HostSignal::Shutdown("SIGTERM") if on_term.drain => {
                systemd::stopping();
                fleet::health().set_stopping();
                fleet::health().drain().await;
                tracing::info!(
                    "SIGTERM received: draining, then stopping (at most {:?}; SIGTERM or \
                     SIGINT again stops at once)",
                    on_term.timeout
                );
                tokio::select! {
                    _ = drained(&ops, on_term.timeout) => {}
                    signal = wait_for_shutdown_signal(signals) => {
                        tracing::info!("{signal} received: stopping without waiting");
                    }
                }
                return;
            }
            HostSignal::Shutdown(sig) => {
                tracing::info!("{sig} received");
                systemd::stopping();
                return;
            }
            HostSignal::Upgrade => {
                tracing::info!("SIGUSR2 received: upgrading the host");
                let upgrader = ops.upgrader.clone();
                tokio::spawn(async move {
                    match upgrade::upgrade(&upgrader, UpgradeOptions::default()).await {
                        Ok(report) => eprint!("{}", wasmhost::admin::format_swap(&report)),
                        Err(e) => tracing::error!("{e}"),
                    }
                });
            }
            HostSignal::Reload => {
                tracing::info!("SIGHUP received: swapping to the component file on disk");
                let ops = ops.clone();
                tokio::spawn(async move {
                    match wasmhost::control::server::reload(&ops).await {
                        Ok(report) => eprint!("{}", wasmhost::admin::format_swap(&report)),
                        Err(e) => {
                            tracing::error!("reload failed, the running version keeps serving: {e}")
                        }
                    }
                });
            }
        }
    }
}

/// Waits until the service has no connection left, or `limit` passed.
async fn drained(ops: &wasmhost::control::server::ControlCtx, limit: Duration) {
    let began = std::time::Instant::now();
    let mut said = began;
    loop {
        let left = limit.saturating_sub(began.elapsed());
        let status = tokio::time::timeout(left, wasmhost::control::server::status(ops)).await;
        let open = match status {
            Ok(Ok(status)) => status.connections,
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!("the service did not answer within {limit:?} of draining: stopping");
                return;
            }
        };
        if open == 0 {
            tracing::info!("drained in {:.1?}: stopping", began.elapsed());
            return;
        }
        if began.elapsed() >= limit {
            tracing::warn!("{open} connections still open after {limit:?} of draining: stopping");
            return;
        }
        if said.elapsed() >= Duration::from_secs(5) {
            tracing::info!("draining: {open} connections open");
            said = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next SIGTERM or SIGINT.
async fn wait_for_shutdown_signal(signals: &mut Signals) -> &'static str {
    loop {
        if let HostSignal::Shutdown(sig) = signals.next().await {
            return sig;
        }
    }
}

fn serve_options(args: ServeArgs) -> Result<ServeOptions> {
    let control = match args.no_control {
        true => None,
        false => Some(wasmhost::control::socket_path(args.control, &args.name)?),
    };
    let cache = compile_cache(args.cache);
    Ok(ServeOptions {
        control,
        guest: args.guest,
        name: args.name,
        listen: args.listen,
        config: args.config,
        max_connections: args.max_connections,
        conn_limits: net::ConnLimits {
            read_chunk: args.read_chunk,
            max_output_buffer: args.max_output_buffer,
        },
        instance_limits: service::InstanceLimits {
            event_timeout: Duration::from_millis(args.event_timeout_ms),
            state_timeout: Duration::from_millis(args.state_timeout_ms),
            max_memory: args.max_memory,
        },
        durable: wasmhost::durable::Policy {
            journal: args.journal == cli::OnOff::On,
            snapshot_bytes: args.snapshot_bytes,
            snapshot_events: args.snapshot_events,
            snapshot_age: Duration::from_secs(args.snapshot_age_s),
            restart_budget: args.restart_budget,
            state_dir: args.state_dir,
            fsync: args.fsync,
        },
        cache,
        shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
        instances: args.instances,
        tls: args.tls.files().map_err(anyhow::Error::msg)?,
        keepalived_track: args.keepalived_track,
        replication: wasmhost::standby::Replication {
            sync: args.sync_standby,
            sync_timeout: Duration::from_millis(args.sync_timeout_ms),
        },
    })
}

/// The compile cache the options ask for, if any.
fn compile_cache(args: CacheArgs) -> Option<engine::CompileCache> {
    if args.no_cache {
        return None;
    }
    let dir = args.cache_dir.or_else(engine::default_cache_dir)?;
    Some(engine::CompileCache {
        dir,
        max_bytes: args.cache_max_size as u64,
    })
}

/// `wasmhost check`: the report on stdout, progress on stderr; an error
/// (exit 1) when the file is not a valid guest or a check failed.
async fn check(args: CheckArgs) -> Result<()> {
    let runtime = engine::Runtime::new(compile_cache(args.cache))?;
    let opts = wasmhost::check::CheckOptions {
        file: args.file,
        against: args.against,
        config: args.config,
        connections: args.connections as usize,
        limits: service::InstanceLimits::default(),
    };
    let progress = |line: &str| eprintln!("check: {line}");
    let report = wasmhost::check::check(&runtime, &opts, &progress).await;
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&report)?),
        false => print!("{}", wasmhost::check::format_report(&report)),
    }
    if !report.ok {
        anyhow::bail!("{}", report.summary());
    }
    Ok(())
}

/// `wasmhost compile`: fills the cache, one line per file.
fn compile(args: CompileArgs) -> Result<()> {
    let Some(cache) = compile_cache(args.cache) else {
        anyhow::bail!("`compile` fills the compile cache: drop --no-cache");
    };
    let dir = cache.dir.clone();
    let runtime = engine::Runtime::new(Some(cache))?;
    let mut failed = 0;
    for file in &args.files {
        match runtime.load(file) {
            Ok(loaded) => println!(
                "{} {} {} in {:.1?}",
                file.display(),
                &loaded.hash[..12],
                if loaded.from_cache {
                    "already cached, loaded"
                } else {
                    "compiled"
                },
                loaded.compile_time
            ),
            Err(e) => {
                eprintln!("error: {e:#}");
                failed += 1;
            }
        }
    }
    eprintln!("compile cache: {}", dir.display());
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} files could not be compiled",
            args.files.len()
        );
    }
    Ok(())
}

/// `wasmhost new`.
fn new_project(args: wasmhost::cli::NewArgs) -> Result<()> {
    let dir = args.dir.unwrap_or_else(|| args.name.clone().into());
    wasmhost::new::create(&args.name, args.lang, &dir)?;
    print!("{}", wasmhost::new::next_steps(&args.name, args.lang, &dir));
    Ok(())
}
