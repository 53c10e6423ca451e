//! The command line (clap derive). Each subcommand maps onto a library call.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::net::ListenSpec;

/// wasmhost runs network services as WebAssembly components and keeps them
/// running while their code changes. The host owns every socket, timer and
/// buffer; the service's code sees connections as ids and events.
#[derive(Parser, Debug)]
#[command(name = "wasmhost", version, about, long_about = None)]
#[command(
    after_help = "Logging: set WASMHOST_LOG (e.g. `debug`, `wasmhost=debug,guest=warn`); default `info`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a component (a WebAssembly component of the world
    /// wasmhost:service/service) on one or more TCP listeners.
    Serve(Box<ServeArgs>),
    /// Replace a running service's component live, carrying its state over.
    ///
    /// The new component is compiled, type-checked and instantiated while the
    /// old one keeps serving. Then, between two events, the old version
    /// exports its state in the first format of the new version's
    /// `importable()` that the old version's `exportable()` offers, the new
    /// version imports it, the import is validated (see --validate), and
    /// every later event goes to the new version. Connections, timers and
    /// buffered bytes are untouched. On any failure the old version keeps
    /// serving with its state and this exits non-zero.
    ///
    /// `wasmhost check RUNNING.wasm --against NEW.wasm` tries the same
    /// export, import and round trip ahead of time, outside any pause.
    ///
    /// With --shadow the new version first runs beside the old one on the
    /// same events and takes over only on `wasmhost commit` (or by itself
    /// with --commit-after): see --shadow. With --drain or --canary both
    /// versions of a service without shared state serve side by side, each
    /// its own connections: see --drain.
    Swap(SwapArgs),
    /// Make the running shadow (`swap --shadow`) the live version, or send
    /// every new connection to a canary's new version (`swap --canary`).
    ///
    /// Shadow: a shadow that is behind first catches up (at normal CPU
    /// priority, the service serving all along) until at most 32 events
    /// are queued for it, for up to 5 s; then, between two events, it
    /// handles those and becomes the live instance, with its own timers and
    /// journal, and the old instance is dropped. The pause does not depend
    /// on the state's size. Refused, with the reason, when no shadow is
    /// running, it stopped, it is still catching up, or it is still more
    /// than 1,000 events behind after the 5 s (the machine is too busy for
    /// it); a shadow that does not hand over within 2 s runs on.
    ///
    /// Canary: it becomes a drain (see `swap --drain`).
    Commit(CommitArgs),
    /// Drop the running shadow (the running version serves on, untouched),
    /// or end a drain or canary: the new version's connections go back to
    /// the old one (`on-connect`) and it is dropped.
    Abort(CommitArgs),
    /// Show a running service: component, generation, counters, swap history.
    Status(StatusArgs),
    /// Take a snapshot of a running service's state now.
    ///
    /// Between two events the service exports its state in the first format
    /// it imports itself, and its journal starts again from there: a trap
    /// after this replays only the events since. Snapshots are also taken
    /// by themselves (`serve --snapshot-bytes/--snapshot-events/
    /// --snapshot-age-s`) and after every swap. Fails, with the reason, for
    /// a stateless service or one running with `--journal off`.
    Snapshot(SnapshotArgs),
    /// Swap back to the previous generation's component, with its state.
    ///
    /// Works when the running version can export a format the previous one
    /// imports; refused, with the reason, otherwise.
    Rollback(RollbackArgs),
    /// Replace the running host process with a new one, keeping every
    /// connection open.
    ///
    /// The running host starts the new binary with its own arguments; the
    /// new process loads and instantiates the component and says it is
    /// ready to receive. Then, between two events, the running host stops
    /// accepting and reading, and hands over every listener (the control
    /// socket too), every live connection with the bytes read but not yet
    /// processed and the bytes not yet written, every armed timer, the
    /// counters, the swap history and the guest's state (exported in a
    /// format the new component imports, as in `swap`). The new process
    /// checks and imports it all and answers READY; only then does the old
    /// process close its copies and exit, and the new one serves. If the new
    /// process fails at any step or is not ready within --timeout-ms, it is
    /// killed and the old process serves on with everything; this command
    /// then says which step failed and exits 1.
    ///
    /// `kill -USR2 <pid>` of `wasmhost serve` does the same with the
    /// defaults.
    Upgrade(UpgradeArgs),
    /// Move the running service, with its state and every live connection,
    /// to a host on another machine (`serve --receive` there).
    ///
    /// The same move as `upgrade`, across the network: this host offers the
    /// service on a mutually authenticated TLS link; the receiver loads the
    /// component (sent unless it has it) and says it is prepared. Then,
    /// between two events, this host stops, freezes every connection with
    /// TCP_REPAIR, removes the service address (--move-ip) and sends the
    /// state, timers, counters, history, each connection's TCP state and
    /// unread and unsent bytes. The receiver imports it all, recreates the
    /// sockets and answers READY; on COMMIT it adds the address, announces
    /// it and serves; clients see a pause (the freeze), never an error.
    /// Until the receiver is ready, any failure (a refusal, a timeout, the
    /// receiver dying) makes this host resume with every connection and its
    /// state, and this command says which step failed.
    Migrate(MigrateArgs),
    /// Take a host out of rotation: stop accepting new connections and
    /// let the open ones finish.
    ///
    /// The listeners stop listening (a new connection is refused at once,
    /// so a load balancer retries it on another host), HAProxy's agent
    /// check (`serve --agent-check`) answers `drain` and `/readyz` (`serve
    /// --admin`) answers 503. Open connections are served as before until
    /// their clients close them, or move them elsewhere with `migrate`.
    /// With --wait this waits until no connection is left (printing how
    /// many are), at most --timeout seconds. `drain --cancel` listens again
    /// on the same addresses. A host upgrade or migration ends a drain.
    ///
    /// `serve --on-sigterm drain` (the default under systemd) makes SIGTERM
    /// drain, then stop when the connections are gone or after
    /// --drain-timeout-s.
    Drain(DrainArgs),
    /// Make a standby (`serve --standby-of`) the primary: it serves now.
    ///
    /// The standby stops following, writes its state dir's epoch + 1 (so
    /// the old primary, if it comes back, refuses to serve: it was failed
    /// over), then starts the service from the snapshots and journal it
    /// received, as a restart after a crash does: the connections that were
    /// open on the lost primary get `on-close`, timers are re-armed, and it
    /// accepts on its --listen addresses. Returns once it accepts. Run it
    /// only when the primary is gone (a load balancer or keepalived sends
    /// clients to the standby): both serving would split the service.
    /// `serve --promote-fifo` does the same on keepalived's word.
    Promote(PromoteArgs),
    /// Check that a file is a valid guest and run a conformance check on it.
    ///
    /// Exits 1 with what is wrong and what to do when FILE is not a
    /// component of the world wasmhost:service/service (not a file, not
    /// WebAssembly, a core module, missing exports, imports the host does
    /// not provide). Otherwise prints its imports and exports, importable()
    /// and exportable(), size, hash, compile time (and whether it came from
    /// the compile cache), instantiate time and its linear memory after
    /// init, then checks, with the host's own loader, linker and state
    /// transfer:
    ///
    /// * a new instance answers importable() (a swap asks it before init),
    ///   and init succeeds with the --config pairs (none by default);
    ///
    /// * three connections are opened (on-connect) and each is sent a few
    ///   bytes that are not a complete request or line of any protocol
    ///   (on-data, no newline), so the state holds unfinished input;
    ///
    /// * for every format F in exportable(): F should be in importable()
    ///   too (a warning if not); export-state(F), import-state(F) into a new
    ///   instance (no init, as in a swap) and export-state(F) there must
    ///   give the same bytes, else "not canonical / loses state on import"
    ///   with the first differing offset and both lengths;
    ///
    /// * with --against OTHER.wasm (the next version): OTHER must import
    ///   every F and accept FILE's export of it, and when OTHER then lists F
    ///   in exportable(), its export of F must be the same bytes;
    ///
    /// * leaks: on a new instance, a warm-up batch of 250 connections, then
    ///   --connections more in batches of 250, each opened, sent a few bytes
    ///   and closed; the linear memory after the last batch may exceed the
    ///   memory after the warm-up by 64 KiB or 1%, whichever is more.
    ///
    /// Exits 0 when every check passes (warnings allowed), 1 with a summary
    /// of what failed. Guest calls run under serve's default deadlines and
    /// memory limit.
    Check(CheckArgs),
    /// Compile components into the compile cache ahead of time.
    ///
    /// `serve`, `swap` and `upgrade` then load them at once instead of
    /// compiling (seconds for a Python or JavaScript guest). Prints, per
    /// file, its hash and whether it was compiled or already cached; exits
    /// 1 if any file is not a valid component.
    Compile(CompileArgs),
    /// Create a guest project to start from: a working service in Rust,
    /// Python or JavaScript.
    ///
    /// The service echoes lines back, numbered, and carries its count and
    /// each connection's unfinished line across a swap (state format
    /// NAME/1). The project has a `build` script that writes NAME.wasm, a
    /// unit test of its logic and a README, and builds anywhere (inside
    /// another workspace too): it carries a copy of the WIT contract and,
    /// for Rust, of the guest SDK. Python and JavaScript toolchains are
    /// installed by the first build at pinned versions.
    New(NewArgs),
}

#[derive(Args, Debug)]
pub struct NewArgs {
    /// The service's name: lower-case letters, digits and `-`. It names
    /// the folder, the package, the component and the state format.
    pub name: String,

    /// The language of the guest.
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: crate::new::Lang,

    /// Where to create the project [default: ./NAME]; must not exist or be
    /// empty.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Where compiled components are kept (shared by `serve` and `compile`).
#[derive(Args, Debug)]
pub struct CacheArgs {
    /// Directory for compiled components [default: $XDG_CACHE_HOME/wasmhost
    /// or ~/.cache/wasmhost].
    #[arg(long, value_name = "DIR", env = "WASMHOST_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Most bytes the compile cache may hold; past it the least recently
    /// used entries are removed (a Python or JavaScript guest compiles to
    /// 30-40 MB, a Rust one to well under 1 MB).
    #[arg(long, value_name = "BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub cache_max_size: usize,

    /// Compile the component every time; do not read or write the cache.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The component to check, e.g. target/guests/kv.wasm.
    pub file: PathBuf,

    /// The next version of the service: check that it imports every state
    /// format FILE exports, accepts FILE's state and re-exports it
    /// unchanged.
    #[arg(long, value_name = "OTHER.wasm")]
    pub against: Option<PathBuf>,

    /// A KEY=VALUE pair passed to `init`; repeatable, in order.
    #[arg(short, long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,

    /// How many connections the leak check opens and closes after its
    /// warm-up batch.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2000,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub connections: u32,

    /// Print the report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The components to compile.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Args, Debug)]
pub struct UpgradeArgs {
    /// The new wasmhost binary [default: the file now at the path the
    /// running host was started from, so replacing that file and upgrading
    /// runs the new build].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,

    /// Load this component in the new process instead of the running one
    /// (the state moves by the usual format negotiation).
    #[arg(long, value_name = "PATH")]
    pub component: Option<PathBuf>,

    /// How long the new process may take from its start to READY
    /// (loading, instantiating, receiving, importing).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub timeout_ms: u64,

    /// Replace the running process's image with the new binary (execve:
    /// same PID, the manifest passed in a memfd, the sockets kept open)
    /// instead of starting a second process. The new binary is first run
    /// once to check that it starts, speaks this handoff version and loads
    /// the component; after the exec there is no way back, so a failure
    /// there ends the service.
    #[arg(long)]
    pub exec: bool,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub control: ControlArgs,
}

/// The certificates of the link between hosts (`serve --receive`,
/// `migrate`), PEM files.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// This host's certificate (with any intermediates). A receiver's must
    /// name the address or name senders connect to (see `migrate
    /// --peer-name`).
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// This host's private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// The CA certificate(s) the other host's certificate must be signed
    /// by: both sides check each other.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, when all three are given; an error naming the missing
    /// flags when only some are.
    pub fn files(&self) -> Result<Option<crate::migrate::TlsFiles>, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(crate::migrate::TlsFiles {
                cert: std::path::absolute(cert).unwrap_or_else(|_| cert.clone()),
                key: std::path::absolute(key).unwrap_or_else(|_| key.clone()),
                ca: std::path::absolute(ca).unwrap_or_else(|_| ca.clone()),
            })),
            (None, None, None) => Ok(None),
            _ => Err("--tls-cert, --tls-key and --tls-ca go together: give all three".into()),
        }
    }
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The receiving host's `serve --receive` address, e.g. 10.0.0.2:7400.
    #[arg(long, value_name = "ADDR")]
    pub to: std::net::SocketAddr,

    /// Move the service address with the connections: IP/PREFIX (IPv4),
    /// e.g. 10.0.0.100/24. The service must listen on it, it must be an
    /// address of this machine, and the receiver must have an address of
    /// its own in the same subnet (one L2 segment). This host freezes
    /// every connection (TCP_REPAIR), removes the address and sends each
    /// connection's TCP state; the receiver recreates the sockets, adds the
    /// address, announces it (gratuitous ARP) and serves. Needs
    /// CAP_NET_ADMIN and CAP_NET_RAW on both hosts.
    #[arg(
        long,
        value_name = "IP/PREFIX",
        required_unless_present = "relay",
        conflicts_with = "relay"
    )]
    pub move_ip: Option<crate::migrate::ServiceAddr>,

    /// Move the service where its address cannot move (another segment,
    /// no CAP_NET_ADMIN): the receiver listens on its own address (the IP
    /// of its --receive, the same ports), so new clients go there (point
    /// the balancer or DNS at it), while this host keeps the existing
    /// client sockets and relays their bytes both ways over the link until
    /// they close. The guest on the receiver sees the same connections.
    /// Needs no privileges. This host keeps running until the last relayed
    /// connection closes.
    #[arg(long)]
    pub relay: bool,

    /// With --move-ip: keepalived moves the address instead of wasmhost
    /// (never let both manage one address). This host puts its keepalived
    /// instance into FAULT through its `serve --keepalived-track` file and
    /// waits until keepalived has dropped the address; the receiver holds
    /// its own instance in FAULT until its sockets are restored, then lets
    /// keepalived take the address there. This host stays in FAULT while
    /// the receiver serves (it leaves FAULT when a service comes back).
    #[arg(long, requires = "move_ip")]
    pub keepalived: bool,

    /// The name the receiver's certificate must carry [default: the IP
    /// address of --to].
    #[arg(long, value_name = "NAME")]
    pub peer_name: Option<String>,

    /// How long the receiver may take from the offer to READY (loading
    /// the component, receiving, importing); past it this host resumes.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub timeout_ms: u64,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// The link's certificates [default: the ones `serve` was given].
    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub control: ControlArgs,
}

/// How to reach a running service.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The service's name, as given to `serve --name`.
    #[arg(long, default_value = "default")]
    pub name: String,

    /// The service's control socket [default: $XDG_RUNTIME_DIR/wasmhost/NAME.sock,
    /// else /tmp/wasmhost-UID/NAME.sock].
    #[arg(long, value_name = "PATH", env = "WASMHOST_CONTROL")]
    pub control: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SwapArgs {
    /// The new component.
    pub new: PathBuf,

    /// Start the new version with `init` instead of importing the state
    /// (for a version with no state format in common); every open
    /// connection is announced to it with `on-connect`. The state is lost.
    #[arg(long)]
    pub fresh: bool,

    /// Skip validating the import: the new version goes live as soon as
    /// its `import-state` succeeds (shortens the pause by one export).
    #[arg(long)]
    pub no_validate: bool,

    /// How the new version's import is validated, inside the pause, before
    /// it goes live. `export`: the new version's `export-state` in the
    /// format it just imported must return the state (not an error, not a
    /// trap); the bytes are not looked at, and the call is made even if
    /// the format is not in its `exportable()`. `roundtrip`: the same, and
    /// those bytes must equal what the running version exported, byte for
    /// byte, else the swap aborts (the running version keeps serving)
    /// naming the first differing byte. It catches a version that loses or
    /// changes state on import, but needs a round-trip-stable format (the
    /// same state always written as the same bytes: not in hash-map order,
    /// no timestamps of the export). Both cost one more export-state inside
    /// the pause than --no-validate; roundtrip adds a byte comparison.
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value = "export",
        conflicts_with_all = ["no_validate", "fresh"]
    )]
    pub validate: ValidateMode,

    /// Gradual swap: run the new version as a shadow beside the old one
    /// before it takes over. The shadow gets the state without a pause
    /// (the journal's snapshot plus the journal, replayed on its own
    /// thread) or, when it imports none of the journal's formats, from one
    /// export of the running version (a pause as long as the export). Then
    /// every event the running version handles goes to the shadow too, with
    /// the same clocks and random bytes; what it would send and close is
    /// compared, per connection, with what the running version did, and
    /// thrown away. The first difference stops the shadow (see
    /// --allow-divergence), as do a trap and falling behind (see
    /// --max-lag-ms); the running version is never affected. This command
    /// returns once the shadow is in step (progress on stderr); `wasmhost
    /// commit` then switches to it, with a pause that does not depend on
    /// the state's size, and `wasmhost abort` drops it. `wasmhost status`
    /// shows it. No other swap or upgrade runs while a shadow does.
    #[arg(long, conflicts_with_all = ["fresh", "no_validate", "drain", "canary"])]
    pub shadow: bool,

    /// With --shadow: wait until the shadow has handled N live events in
    /// agreement (or N in all with --allow-divergence), then commit and
    /// print the commit's report. Interrupting the wait leaves the shadow
    /// running.
    #[arg(long, value_name = "N", requires = "shadow")]
    pub commit_after: Option<u64>,

    /// With --shadow: count divergences (the first 5 are kept for `status`)
    /// instead of stopping the shadow at the first.
    #[arg(long, requires = "shadow")]
    pub allow_divergence: bool,

    /// With --shadow: stop the shadow as too slow once an event has waited
    /// this long for it (its catch-up counts too). It is also stopped when
    /// 256 MiB of events are queued for it.
    #[arg(long, value_name = "MS", default_value_t = 10_000, requires = "shadow")]
    pub max_lag_ms: u64,

    /// Gradual swap of a stateless service: both versions serve, every new
    /// connection goes to the new version, and the old one keeps its
    /// connections until they close (or --drain-timeout-s passes: the ones
    /// left then move to the new version, which gets `on-connect` for
    /// them). Then the new version serves alone. Only for services without
    /// shared state: both versions must say so with an empty
    /// `exportable()`; a service with state is refused (use --shadow). A
    /// trap in the new version aborts: its connections go back to the old
    /// one. Returns at once; `wasmhost status` shows both versions side by
    /// side, `wasmhost abort` moves everything back.
    #[arg(long, conflicts_with_all = ["fresh", "no_validate", "canary"])]
    pub drain: bool,

    /// Canary of a stateless service: PERCENT of new connections (1-99,
    /// exactly: every time the running sum passes 100) go to the new
    /// version, the rest to the old one. `wasmhost commit` sends every new
    /// connection to the new version and drains the old one (as --drain);
    /// `wasmhost abort`, or a trap in the new version, moves the new
    /// version's connections back to the old one and drops it. The same
    /// requirement as --drain: no shared state.
    #[arg(long, value_name = "PERCENT", conflicts_with_all = ["fresh", "no_validate"], value_parser = clap::value_parser!(u8).range(1..=99))]
    pub canary: Option<u8>,

    /// With --drain or --canary: how long the old version keeps its
    /// connections once every new connection goes to the new version.
    #[arg(long, value_name = "S", default_value_t = 300)]
    pub drain_timeout_s: u64,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub control: ControlArgs,
}

/// `swap --validate MODE`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValidateMode {
    /// The new version must export the format it imported.
    Export,
    /// ...and its export must equal the running version's, byte for byte.
    Roundtrip,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Wait until every connection is closed.
    #[arg(long, conflicts_with = "cancel")]
    pub wait: bool,

    /// With --wait: give up after this many seconds (exit 1, the host
    /// still draining).
    #[arg(long, value_name = "S", default_value_t = 300, requires = "wait")]
    pub timeout: u64,

    /// End the drain: listen and accept again.
    #[arg(long)]
    pub cancel: bool,

    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// Skip checking that the previous version can export the state it imports.
    #[arg(long)]
    pub no_validate: bool,

    /// Start the previous version with fresh state (`init`, then `on-connect`
    /// for every open connection), dropping the running version's state.
    /// For when the state cannot go back (no format in common). Uses the
    /// previous version as it was compiled and kept when it was replaced,
    /// not whatever file is now at its path.
    #[arg(long)]
    pub fresh: bool,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The service component, e.g. target/guests/kv.wasm. Optional with
    /// --receive: the host then starts empty and serves the first service
    /// it receives.
    #[arg(required_unless_present_any = ["receive", "standby_of"])]
    pub guest: Option<PathBuf>,

    /// Be a warm standby of the primary whose `serve --receive` port is
    /// ADDR: copy its snapshots and journal into --state-dir as it writes
    /// them (over the mutually authenticated link, --tls-*), and serve
    /// only once promoted (`wasmhost promote`, or --promote-fifo). It
    /// needs --receive: the primary records that address, and asks this
    /// host there whether it was promoted before it serves again. Until
    /// then it does not listen on --listen; its agent check says `maint`
    /// and `/readyz` 503; `status` shows its lag.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "guest",
        requires_all = ["state_dir", "receive", "tls_cert", "tls_key", "tls_ca"]
    )]
    pub standby_of: Option<std::net::SocketAddr>,

    /// With --standby-of: the name the primary's certificate must carry
    /// [default: the IP of --standby-of].
    #[arg(long, value_name = "NAME", requires = "standby_of")]
    pub primary_name: Option<String>,

    /// With --standby-of: the name this host's certificate carries, told
    /// to the primary, which checks it when it asks this host for its
    /// epoch [default: the IP of --receive].
    #[arg(long, value_name = "NAME", requires = "standby_of")]
    pub standby_name: Option<String>,

    /// With --standby-of: keepalived's `notify_fifo`. A line saying this
    /// host's VRRP instance became MASTER (`INSTANCE "NAME" MASTER ...`)
    /// promotes the standby, as `wasmhost promote` does.
    #[arg(long, value_name = "PATH", requires = "standby_of")]
    pub promote_fifo: Option<PathBuf>,

    /// With --promote-fifo: the VRRP instance whose MASTER line promotes
    /// [default: any instance].
    #[arg(long, value_name = "NAME", requires = "promote_fifo")]
    pub promote_instance: Option<String>,

    /// A primary's replies wait until its standby has their events'
    /// records (not only this host's disk), so a failover loses nothing a
    /// client saw acknowledged. A standby that does not acknowledge
    /// within --sync-timeout-ms stops holding replies back (a warning;
    /// `status` says `async`) until it catches up.
    /// On a standby it applies once it is promoted.
    #[arg(long, requires = "state_dir")]
    pub sync_standby: bool,

    /// With --sync-standby: how long replies wait for the standby.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub sync_timeout_ms: u64,

    /// Serve from --state-dir even though the standby that followed it
    /// cannot be asked whether it was promoted (or the dir is a standby's
    /// copy). Only when that other host is gone for good: if it serves,
    /// the service is split in two.
    #[arg(long, requires = "state_dir")]
    pub no_fence: bool,

    /// Take services that `wasmhost migrate --to` sends from other hosts,
    /// on this address (TCP, mutual TLS: needs --tls-cert, --tls-key and
    /// --tls-ca). The host takes a service only while it has none: without
    /// a component it waits for one; with one, it waits again after its
    /// service moved away. It also answers a sender that lost the link
    /// after committing, so the sender learns whether this host serves.
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub receive: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Address to listen on, optionally named (`--listen admin=127.0.0.1:7001`);
    /// repeatable. The service sees the name in each connection's info. Port 0
    /// picks a free port. Each bound address is printed on stderr as
    /// `listening on NAME ADDR`.
    #[arg(
        short,
        long = "listen",
        value_name = "[NAME=]ADDR",
        default_value = "127.0.0.1:7000"
    )]
    pub listen: Vec<ListenSpec>,

    /// A KEY=VALUE pair passed to the service's `init`; repeatable, in order.
    #[arg(short, long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,

    /// The service's name: it tags the service's log lines and names its
    /// control socket, so several services can run side by side.
    #[arg(long, default_value = "default")]
    pub name: String,

    /// The control socket for `swap`, `status` and `rollback` (mode 0600;
    /// other users are refused) [default: $XDG_RUNTIME_DIR/wasmhost/NAME.sock,
    /// else /tmp/wasmhost-UID/NAME.sock].
    #[arg(long, value_name = "PATH", env = "WASMHOST_CONTROL")]
    pub control: Option<PathBuf>,

    /// Run without a control socket (the service cannot be swapped).
    #[arg(long, conflicts_with = "control")]
    pub no_control: bool,

    /// Most connections open at once; further clients wait in the listen
    /// backlog until one closes.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Most unsent bytes per connection (suffixes KiB, MiB). Reading from a
    /// connection pauses while more than half of this is unsent; a send
    /// beyond it closes the connection (the client is not reading).
    #[arg(long, value_name = "BYTES", default_value = "8MiB", value_parser = parse_size)]
    pub max_output_buffer: usize,

    /// Largest read from a socket handed to the service in one `on-data`.
    #[arg(long, value_name = "BYTES", default_value = "64KiB", value_parser = parse_size)]
    pub read_chunk: usize,

    /// How long one event call may run before it is interrupted (a trap:
    /// the state is rebuilt and the connection whose event it was closed).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub event_timeout_ms: u64,

    /// How long `export-state` or `import-state` may run during a swap.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub state_timeout_ms: u64,

    /// Most linear memory one service instance may grow to.
    #[arg(long, value_name = "BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub max_memory: usize,

    /// Record every event since the last snapshot, so that a trap loses
    /// only the event that trapped: the state is rebuilt in a new instance
    /// from the snapshot and the journal. `off`: a trap restarts the
    /// service with fresh state (`init`). Stateless guests (empty
    /// `exportable()`) are never journaled.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub journal: OnOff,

    /// Take a snapshot (the state exported in a format the component
    /// imports itself, between two events) once the journal holds this
    /// many bytes...
    #[arg(long, value_name = "BYTES", default_value = "32MiB", value_parser = parse_size)]
    pub snapshot_bytes: usize,

    /// ... or this many events...
    #[arg(long, value_name = "N", default_value_t = 500_000)]
    pub snapshot_events: u64,

    /// ... or its first event is this many seconds old.
    #[arg(long, value_name = "S", default_value_t = 60)]
    pub snapshot_age_s: u64,

    /// Traps in a row, with no event served between them, that are
    /// recovered; one more stops the service (its connections are closed,
    /// `status` says why, `swap --fresh` with a fixed version serves again).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub restart_budget: u32,

    /// Keep the snapshots and the journal in DIR (created if missing), so
    /// that a host crash loses nothing a client saw acknowledged: a reply is
    /// sent only once its event's record is written (see --fsync). On start
    /// with a DIR that holds a state, the state is rebuilt from it (the
    /// connections open at the crash get `on-close`) before accepting.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// With --state-dir: when the journal is synced to disk, as Redis's
    /// appendfsync. `always`: before each batch's replies are sent (nothing
    /// acknowledged is lost, one fdatasync per batch of events); `everysec`:
    /// once a second (a crash of the machine loses at most the last second;
    /// a crash of the process loses nothing written); `no`: when the kernel
    /// likes.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "everysec",
        requires = "state_dir"
    )]
    pub fsync: crate::durable::disk::Fsync,

    #[command(flatten)]
    pub cache: CacheArgs,

    /// How long shutdown waits for connections to flush their output.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub shutdown_timeout_ms: u64,

    /// Worker threads for socket I/O and the service's actors [default:
    /// half the cores, 1 to 4, and at least --instances]. One instance runs
    /// its guest on one actor at a time, so more threads only add
    /// cross-thread wake-ups; on a 2-core machine one thread serves about
    /// 30% more requests than two.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,

    /// Run N instances of the service, each with its own actor, so that its
    /// guest code runs on N cores; `auto` is the number of cores. Only for
    /// a service without shared state (its `exportable()` is empty, such as
    /// a stateless proxy or echo): a service that keeps state is refused.
    /// Each new connection goes to the instance with the fewest open
    /// connections and stays there. `swap` and `rollback` replace every
    /// instance at one update point, all or none; shadow swaps, drain and
    /// canary, snapshots, `--state-dir` and host upgrade need a single
    /// instance.
    #[arg(long, value_name = "N|auto", default_value = "1", value_parser = parse_instances)]
    pub instances: usize,

    /// Serve /livez, /readyz and Prometheus /metrics over HTTP on this
    /// address (e.g. 127.0.0.1:9100). See "Running a fleet" in the README.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,

    /// Answer HAProxy's agent check on this address: `up ready N%` (N the
    /// share of --max-connections free), `drain` while draining or handing
    /// the service off, `maint` with no service, `down` when the service
    /// failed. In haproxy.cfg: `server NAME ADDR agent-check agent-addr IP
    /// agent-port PORT agent-inter 1s`.
    #[arg(long, value_name = "ADDR")]
    pub agent_check: Option<std::net::SocketAddr>,

    /// What SIGTERM does: `stop` closes every connection after flushing
    /// it; `drain` drains (see `wasmhost drain`), then stops once the
    /// connections are gone or after --drain-timeout-s. [default: drain
    /// under systemd (INVOCATION_ID is set), stop otherwise]. A second
    /// SIGTERM or SIGINT stops at once.
    #[arg(long, value_name = "drain|stop")]
    pub on_sigterm: Option<OnSigterm>,

    /// How long a SIGTERM drain waits for connections to close before it
    /// stops the service anyway (keep it under systemd's TimeoutStopSec).
    #[arg(long, value_name = "S", default_value_t = 60)]
    pub drain_timeout_s: u64,

    /// The track file of this machine's keepalived instance that owns the
    /// service address (a `vrrp_track_file` with weight 0 in
    /// keepalived.conf): `migrate --keepalived` writes 1 to it to put the
    /// instance into FAULT (keepalived drops the address and the peer
    /// takes it) and 0 to take it out. Needed on both hosts of such a move.
    #[arg(long, value_name = "FILE")]
    pub keepalived_track: Option<PathBuf>,
}

/// `serve --on-sigterm`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnSigterm {
    Drain,
    Stop,
}

/// `--instances`: a count from 1 to 256, or `auto` (the number of cores).
fn parse_instances(s: &str) -> Result<usize, String> {
    if s == "auto" {
        return Ok(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(256));
    }
    match s.parse::<usize>() {
        Ok(n @ 1..=256) => Ok(n),
        _ => Err(format!("`{s}` is not a number from 1 to 256, or auto")),
    }
}

/// A switch.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

/// The default worker thread count: half the cores, at least 1, at most 4.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (cores / 2).clamp(1, 4)
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Parses `4096`, `64KiB`, `8MiB`, `1GiB` (also `k`, `m`, `g`, `KB`...:
/// all binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 65536, 64KiB or 8MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("8XB").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn listen_specs() {
        let l: ListenSpec = "admin=127.0.0.1:0".parse().unwrap();
        assert_eq!(l.name, "admin");
        let l: ListenSpec = "[::1]:7000".parse().unwrap();
        assert_eq!(l.name, "");
        assert!("=127.0.0.1:1".parse::<ListenSpec>().is_err());
        assert!("localhost:1".parse::<ListenSpec>().is_err());
    }
}
