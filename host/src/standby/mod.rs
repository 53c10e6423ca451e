//! Warm standby and failover (issue 13): a second host follows a primary's
//! state dir over the migration link, and `wasmhost promote` makes it
//! serve from what it received, through the same start as a crash restart.
//!
//! ```text
//! primary:  serve kv.wasm --state-dir A --receive P --tls-* [--sync-standby]
//! standby:  serve --standby-of P --state-dir B --receive Q --tls-* --listen ...
//! failover: wasmhost promote        (or keepalived's notify FIFO: --promote-fifo)
//! ```
//!
//! # What moves
//!
//! The primary's state-dir writer (`durable::disk`, one thread doing all
//! the state's I/O in order) is the one place that knows every byte the
//! service makes durable, so it is the one place that ships them: a
//! standby attached to it gets, in the writer's own order,
//!
//! 1. the chain as it is on disk at that instant: the newest complete
//!    snapshot file and every journal after it, whole ([`Shipped::File`]),
//!    then [`Shipped::BaseEnd`];
//! 2. every later append to a journal, with a sequence number
//!    ([`Shipped::Append`]), every new journal ([`Shipped::Journal`]) and
//!    every new snapshot file ([`Shipped::Snapshot`]).
//!
//! The standby writes them as the same files in its own state dir, so its
//! dir is always a state dir a crash restart could start from. Beside the
//! files it keeps a live copy of the service (`service::Replica`, on a task
//! of its own so that it never delays an acknowledgement): rebuilt from
//! the dir whenever a chain or a snapshot arrives, exactly as a restart
//! rebuilds it, then every append replayed with its effects discarded.
//! Promotion is that restart (`Server::start_warm`, or `Server::start` with
//! the dir when the copy does not hold exactly what the dir holds): every
//! connection open on the lost primary gets `on-close`, the timers are
//! re-armed, and the service accepts on the standby's `--listen`
//! addresses. No second way of moving a service exists: the standby is a
//! crash restart whose disk happens to be on another machine, and whose
//! replay was done ahead of time.
//!
//! With `--sync-standby` the primary's writer hands the completion of an
//! append (the signal that releases the batch's replies, `service/persist.rs`)
//! to the link instead of completing it: the replies go out only once the
//! standby acknowledged that append. So a reply a client saw was written on
//! both machines, and a failover loses nothing acknowledged. If the standby
//! does not acknowledge within `--sync-timeout-ms`, the primary warns,
//! releases what waits and goes on asynchronously (reported in `status`
//! and `/metrics`) until the standby has caught up, then waits again.
//!
//! # Epochs and fencing
//!
//! `DIR/fleet.json` holds the state dir's epoch and, on a primary, the
//! standby that followed it. A primary starts at epoch 1; a standby takes
//! its primary's epoch; `promote` writes epoch + 1 before it serves. A
//! primary that starts on a state dir whose `fleet.json` names a standby
//! asks that host for its epoch first (`EpochQuery` on the link): if it is
//! higher the standby was promoted, and this host refuses to serve (it was
//! failed over: start it as the new primary's standby). If the standby
//! cannot be reached the start is refused too, unless `--no-fence` says the
//! operator knows the standby is gone. A standby whose dir has a lower
//! epoch than its primary's (it was the old primary, or followed one)
//! starts its dir afresh from the primary's chain.
//!
//! # Protocol (on the migration link, `crate::migrate::link`)
//!
//! | phase | standby (S) | primary (P) | if S fails here | if P fails here |
//! |---|---|---|---|---|
//! | `connect` | connects to P's `--receive` port (mutual TLS) | accepts | S retries with back-off | S retries; its dir is untouched |
//! | `follow` | sends `Follow { epoch, receive, component }` | refuses without `--state-dir` or a service, or if S's epoch is higher (P is the stale one) | P drops the link, serves on | S logs P's reason, retries |
//! | `component` | writes `component.wasm` (hash checked) | sends the running component unless S has it | P drops the link | S retries; its dir is untouched |
//! | `base` | writes each file of the chain (temporary file, fsync, rename), then removes files not in it | the writer thread reads its chain and attaches the link, between two of its own writes | P detaches, serves on | S keeps what it wrote (each file whole), retries |
//! | `stream` | appends, creates journals, writes snapshots, acknowledges each append | forwards every write; with `--sync-standby` replies wait for S's ack | P releases the waiting replies after `--sync-timeout-ms` (async until S catches up) and serves on | S's dir holds every append it acknowledged; S retries, and `promote` serves from it |
//! | `promote` | stops following, writes epoch + 1 (while the link is still open), starts from its live copy (or its dir) as after a crash | gone, or, alive, learns on the link's loss that S was promoted and stops serving; fenced at its next start | S stays a standby, `promote` reports why | — |
//!
//! The live copy's replay (`replay`) fails on purpose too: the promotion
//! then starts from the dir.
//!
//! Every phase fails on purpose under the test-only environment variable
//! `WASMHOST_TEST_STANDBY_FAIL=<phase>` (on the side the row's "fails
//! here" column names), and the tests check that the primary serves on and
//! the standby recovers (`tests/tests/standby.rs`).
//!
//! # Limits
//!
//! * One standby per primary at a time (a second `Follow` replaces the
//!   first, whose link is closed).
//! * The live copy costs the standby a second instance's memory and CPU
//!   for the replay. A copy that traps, or falls out of step with the dir,
//!   is dropped until the next snapshot or chain (logged), and a promotion
//!   meanwhile replays the dir.
//! * A standby that falls more than [`MAX_QUEUED`] bytes behind is dropped
//!   and starts again from the chain.

pub mod follow;
pub mod primary;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Bytes a standby may fall behind before the primary drops it.
pub const MAX_QUEUED: usize = 64 << 20;

/// The test-only environment variable that names a phase to fail.
pub const FAIL_ENV: &str = "WASMHOST_TEST_STANDBY_FAIL";

/// Whether a test asked this process to fail at `phase`.
pub fn fail_at(phase: &str) -> bool {
    std::env::var(FAIL_ENV).is_ok_and(|s| s == phase)
}

/// What the state-dir writer ships to an attached standby, in its order.
#[derive(Debug)]
pub enum Shipped {
    /// A whole file of the chain at the attach, by name.
    File { name: String, bytes: Bytes },
    /// The chain at the attach is complete; its snapshot was written by
    /// `component` (hex SHA-256).
    BaseEnd { component: String },
    /// Journal `n` starts, empty.
    Journal { n: u64 },
    /// Records appended to journal `n`. `done`: with `--sync-standby`,
    /// the append's completion, sent once the standby acknowledged it.
    Append {
        n: u64,
        seq: u64,
        bytes: Bytes,
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    },
    /// Snapshot `n` is durable (the whole file), written by `component`.
    Snapshot {
        n: u64,
        component: String,
        bytes: Bytes,
    },
}

impl Shipped {
    fn len(&self) -> usize {
        match self {
            Shipped::File { bytes, .. }
            | Shipped::Append { bytes, .. }
            | Shipped::Snapshot { bytes, .. } => bytes.len(),
            Shipped::BaseEnd { .. } | Shipped::Journal { .. } => 0,
        }
    }

    /// Whether it counts against [`MAX_QUEUED`]: appends do; whole files
    /// (the chain, a snapshot) are bounded by the state's own size.
    fn capped(&self) -> bool {
        matches!(self, Shipped::Append { .. })
    }

    /// Completes a held append (the standby is gone or asynchronous; the
    /// records are on this host's disk).
    pub fn release(self) {
        if let Shipped::Append {
            done: Some(done), ..
        } = self
        {
            let _ = done.send(Ok(()));
        }
    }
}

/// Standby → primary: the first message of a standby's link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Follow {
    pub version: u32,
    /// The standby's state dir's epoch.
    pub epoch: u64,
    /// The standby's own migration port (`--receive`), and the name its
    /// certificate carries: where the primary asks for its epoch at its
    /// next start (fencing).
    pub receive: Option<Peer>,
    /// The components (hex SHA-256) the standby has.
    #[serde(default)]
    pub components: Vec<String>,
}

/// Primary → standby: one write of the state dir, in the writer's order;
/// the payload is the bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "rep", rename_all = "kebab-case")]
pub enum Rep {
    /// The component (`DIR/component.wasm`), by its hex SHA-256.
    Component { hash: String },
    /// A whole file of the chain at the attach.
    File { name: String },
    /// The chain is complete: files not in it go. Its snapshot was
    /// written by `component`.
    BaseEnd { component: String },
    /// Journal `n` starts, empty.
    Journal { n: u64 },
    /// Records for journal `n`; acknowledge `seq` once written.
    Append { n: u64, seq: u64 },
    /// Snapshot `n` (the whole file), written by `component`; older
    /// files go.
    Snapshot { n: u64, component: String },
    /// The primary's newest append, and its clock (Unix ms).
    Heartbeat { seq: u64, unix_ms: u64 },
}

/// The largest payload on a standby's link (a snapshot or a journal file).
pub const MAX_PAYLOAD: u64 = 2 << 30;

/// The writer's end of a standby's link.
#[derive(Clone)]
pub struct Sink {
    tx: tokio::sync::mpsc::UnboundedSender<Shipped>,
    /// Bytes shipped and not yet sent on the link.
    queued: Arc<AtomicUsize>,
    /// Whether appends wait for the standby (`--sync-standby`, and not
    /// degraded).
    pub sync: Arc<AtomicBool>,
}

impl Sink {
    /// A sink and the link's end of it.
    pub fn new(sync: bool) -> (Sink, Source) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let sink = Sink {
            tx,
            queued: queued.clone(),
            sync: Arc::new(AtomicBool::new(sync)),
        };
        (sink, Source { rx, queued })
    }

    /// Ships `item`; `false` when the standby is gone or too far behind
    /// (then the sink is to be dropped; a held append is completed).
    pub fn ship(&self, item: Shipped) -> bool {
        let len = item.len();
        let queued = self.queued.fetch_add(len, Ordering::AcqRel) + len;
        if item.capped() && queued > MAX_QUEUED {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            tracing::warn!(
                "the standby is more than {} MiB of journal behind: dropping it (it attaches \
                 again and is sent the chain anew)",
                MAX_QUEUED >> 20
            );
            item.release();
            return false;
        }
        match self.tx.send(item) {
            Ok(()) => true,
            Err(tokio::sync::mpsc::error::SendError(item)) => {
                item.release();
                false
            }
        }
    }

    /// Whether an append's completion is to wait for the standby.
    pub fn waits(&self) -> bool {
        self.sync.load(Ordering::Acquire)
    }
}

/// The link's end: what the writer shipped.
pub struct Source {
    rx: tokio::sync::mpsc::UnboundedReceiver<Shipped>,
    queued: Arc<AtomicUsize>,
}

impl Source {
    pub async fn next(&mut self) -> Option<Shipped> {
        let item = self.rx.recv().await?;
        self.queued.fetch_sub(item.len(), Ordering::AcqRel);
        Some(item)
    }

    /// Stops shipping and completes every held append.
    pub fn close(&mut self) {
        self.rx.close();
        while let Ok(item) = self.rx.try_recv() {
            item.release();
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.close();
    }
}

/// `DIR/fleet.json`: the state dir's place in a primary/standby pair.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetFile {
    /// Raised by every promotion.
    pub epoch: u64,
    /// On a primary: the standby that followed it (its `--receive`
    /// address, and the name its certificate carries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<Peer>,
    /// On a standby: the primary it follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// On a standby: a copy of the chain is being written (from the first
    /// file until the chain is complete); `promote` refuses meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copying: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub name: String,
}

impl FleetFile {
    fn path(dir: &Path) -> PathBuf {
        dir.join("fleet.json")
    }

    /// Reads `DIR/fleet.json`; `None` when there is none.
    pub fn read(dir: &Path) -> Result<Option<FleetFile>> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{} is not valid: move it aside", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes it atomically (temporary file, fsync, rename, directory fsync).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let bytes = serde_json::to_vec_pretty(self).expect("fleet.json serialises");
        crate::durable::disk::write_atomic(&Self::path(dir), &bytes)
    }
}

/// The components this process loaded, by hash: what a standby is sent.
static COMPONENTS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// Records that component `hash` was loaded from `path`.
pub fn note_component(hash: &str, path: &Path) {
    let mut known = COMPONENTS.lock().expect("components lock");
    known.retain(|(h, _)| h != hash);
    known.push((hash.to_string(), path.to_path_buf()));
    if known.len() > 16 {
        known.remove(0);
    }
}

/// The bytes of component `hash`, read from the file it was loaded from
/// (checked: the file may have been rebuilt since).
pub fn component_bytes(hash: &str) -> Result<Vec<u8>> {
    let path = COMPONENTS
        .lock()
        .expect("components lock")
        .iter()
        .find(|(h, _)| h == hash)
        .map(|(_, p)| p.clone())
        .with_context(|| format!("component {} was not loaded by this host", short(hash)))?;
    let bytes = std::fs::read(&path)
        .with_context(|| format!("reading the component {}", path.display()))?;
    let now = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    if now != hash {
        anyhow::bail!(
            "{} changed on disk since the service loaded it (hash {} now, {} loaded): the standby \
             cannot be sent the component the state needs; put the file back, or swap to the new \
             file so a new snapshot is written by it",
            path.display(),
            short(&now),
            short(hash)
        );
    }
    Ok(bytes)
}

fn short(hash: &str) -> &str {
    &hash[..12.min(hash.len())]
}

/// This process's epoch (from its state dir's `fleet.json`), answered to
/// `EpochQuery` on the migration port; 0 when it has none.
pub static EPOCH: AtomicU64 = AtomicU64::new(0);

static FENCED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
/// Whether [`FENCED`] holds a reason: read on every append, without a lock.
static IS_FENCED: AtomicBool = AtomicBool::new(false);

/// Why this host stopped serving, if it learned it was failed over: the
/// state-dir writer then fails every write, so the service stops before
/// another reply goes out.
pub fn fenced() -> Option<String> {
    if !IS_FENCED.load(Ordering::Acquire) {
        return None;
    }
    FENCED.lock().expect("fenced lock").clone()
}

fn fence_now(why: String) {
    *FENCED.lock().expect("fenced lock") = Some(why);
    IS_FENCED.store(true, Ordering::Release);
}

/// Whether this process serves (answered with the epoch).
pub fn serving() -> bool {
    crate::fleet::health().service().is_some()
}

/// Replication as `status` and `/metrics` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// `primary` or `standby`.
    pub role: String,
    pub epoch: u64,
    /// The other host (the standby's link peer, or the primary).
    pub peer: Option<String>,
    /// Whether the link is up now.
    pub connected: bool,
    /// Whether appends wait for the standby now (`--sync-standby` and not
    /// degraded).
    pub sync: bool,
    /// Appends shipped and acknowledged (primary), or received (standby).
    pub acked_seq: u64,
    pub shipped_seq: u64,
    /// Bytes not yet acknowledged by the standby.
    pub lag_bytes: u64,
    /// How long the oldest unacknowledged append has waited (primary), or
    /// since the standby last heard the primary's head (standby), in ms.
    pub lag_ms: u64,
    /// Bytes of journal received (standby).
    pub received_bytes: u64,
}

static STATUS: std::sync::Mutex<Option<ReplicationStatus>> = std::sync::Mutex::new(None);

/// The replication status now, if this host is part of a pair.
pub fn status() -> Option<ReplicationStatus> {
    STATUS.lock().expect("replication status lock").clone()
}

fn set_status(update: impl FnOnce(&mut ReplicationStatus)) {
    let mut status = STATUS.lock().expect("replication status lock");
    update(status.get_or_insert_with(ReplicationStatus::default));
}

/// Forgets the status (the link ended).
fn clear_status() {
    *STATUS.lock().expect("replication status lock") = None;
}

/// A primary's replication settings (`serve --sync-standby`,
/// `--sync-timeout-ms`).
#[derive(Clone, Debug)]
pub struct Replication {
    /// Replies wait for the standby's acknowledgement.
    pub sync: bool,
    /// How long they wait before the primary goes on without it.
    pub sync_timeout: std::time::Duration,
}

impl Default for Replication {
    fn default() -> Replication {
        Replication {
            sync: false,
            sync_timeout: std::time::Duration::from_secs(1),
        }
    }
}

/// How long a starting primary waits for its standby's epoch.
const FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Fencing, before a service starts on state dir `dir` (not for a
/// standby): reads the dir's epoch (1 for a new dir) and, if a standby
/// followed this dir, asks it whether it was promoted since or serves.
/// Refuses to start (with what to do) if so, if it cannot be asked, or if
/// `dir` is a standby's copy that was never promoted; `no_fence` skips the
/// question for this start (a standby's copy then takes a new epoch, as a
/// promotion does).
pub async fn fence(
    dir: &Path,
    tls: Option<&crate::migrate::TlsFiles>,
    no_fence: bool,
) -> Result<()> {
    let mut fleet = FleetFile::read(dir)?.unwrap_or_default();
    if let Some(primary) = fleet.primary.clone() {
        if !no_fence {
            anyhow::bail!(
                "{} is a standby's copy of the primary at {primary}, never promoted: serving from \
                 it beside that primary would split the service in two. Run it as a standby \
                 (`serve --standby-of {primary}`) and `wasmhost promote` it, or start with \
                 --no-fence if that primary is gone for good",
                dir.display()
            );
        }
        if fleet.copying {
            anyhow::bail!(
                "{} holds an unfinished copy of the primary at {primary}'s state: there is \
                 nothing whole to serve. Start it as that host's standby to finish the copy",
                dir.display()
            );
        }
        tracing::warn!(
            "--no-fence: serving {}, a standby's copy, as a new epoch",
            dir.display()
        );
        fleet.epoch += 1;
        fleet.primary = None;
        fleet.write(dir)?;
    }
    if fleet.epoch == 0 {
        fleet.epoch = 1;
        fleet.write(dir)?;
    }
    EPOCH.store(fleet.epoch, Ordering::Release);
    let Some(standby) = fleet.standby.clone() else {
        return Ok(());
    };
    if no_fence {
        tracing::warn!(
            "--no-fence: not asking the standby at {} whether it was promoted",
            standby.addr
        );
        return Ok(());
    }
    let asked = match tls {
        Some(tls) => tokio::time::timeout(FENCE_TIMEOUT, ask_epoch(&standby, tls))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {FENCE_TIMEOUT:?}"))),
        None => Err(anyhow::anyhow!(
            "this host has no certificates for the link (--tls-cert, --tls-key, --tls-ca)"
        )),
    };
    match asked {
        Ok((epoch, serving)) if epoch > fleet.epoch || serving => anyhow::bail!(
            "fenced: the standby at {} {} (epoch {epoch}, this state dir {}), so this host was \
             failed over and must not serve. Start it as that host's standby (`serve \
             --standby-of {} --state-dir ...`; its state dir is replaced by a copy of the new \
             primary's)",
            standby.addr,
            match serving {
                true => "serves",
                false => "was promoted",
            },
            fleet.epoch,
            standby.addr
        ),
        Ok(_) => {
            tracing::info!(
                "fencing: the standby at {} was not promoted; serving at epoch {}",
                standby.addr,
                fleet.epoch
            );
            Ok(())
        }
        Err(e) => anyhow::bail!(
            "cannot ask the standby at {} whether it was promoted ({e:#}); serving without \
             knowing could split the service in two. Start it, or start this host with \
             --no-fence if that standby is gone for good",
            standby.addr
        ),
    }
}

/// Takes the epoch of state dir `dir` (a host upgrade's new process: the
/// old one fenced already).
pub fn adopt_epoch(dir: &Path) -> Result<()> {
    let fleet = FleetFile::read(dir)?.unwrap_or_default();
    EPOCH.store(fleet.epoch, Ordering::Release);
    Ok(())
}

/// Asks the host at `peer` for its epoch on the link.
pub(crate) async fn ask_epoch(peer: &Peer, tls: &crate::migrate::TlsFiles) -> Result<(u64, bool)> {
    use crate::migrate::Message;
    let mut link = crate::migrate::link::Link::connect(peer.addr, &peer.name, tls).await?;
    link.send(&Message::EpochQuery, &[]).await?;
    match link.recv::<Message>(0).await? {
        (Message::Epoch { epoch, serving }, _) => Ok((epoch, serving)),
        (other, _) => anyhow::bail!("expected its epoch, got {other:?}"),
    }
}
