//! `--state-dir DIR`: snapshots and the journal on disk, so that a host
//! crash loses nothing a client saw acknowledged.
//!
//! ```text
//! DIR/snapshot-<n>.bin   "WHSNAP1\n", u32 LE header length, the header
//!                        (JSON: SnapshotHeader), u64 LE state length, the
//!                        state, u32 LE CRC-32 of everything before it
//! DIR/journal-<n>.log    the records after snapshot <n> (`journal`'s format)
//! DIR/fleet.json         the epoch and the standby (`crate::standby`)
//! ```
//!
//! A standby attached to the writer (`crate::standby`) is sent the chain as
//! it is on disk, then every write in the writer's order ([`follow`]).
//!
//! Snapshot `n` is written to a temporary file, fsynced, renamed, and the
//! directory fsynced; then the files of older snapshots are removed. A
//! snapshot that continues the state the journal has been recording (by
//! threshold or `wasmhost snapshot`) is written in the background by a
//! thread of its own: `journal-<n>.log` starts at once (the previous
//! journal is complete and synced first), so the chain "snapshot `k`, then
//! journals `k`, `k+1`, ..." rebuilds the state until snapshot `n` is
//! durable, and no reply waits for the snapshot. A snapshot that starts a
//! new chain (the start, a swap, an upgrade, a fresh restart) is waited for
//! before its journal starts. A failed background snapshot leaves the chain
//! in use (the next threshold tries again); any other failed write stops
//! the service.
//!
//! One writer thread does all the I/O in order ([`Writer`]): a snapshot,
//! then appends to its journal. The actor hands it each batch of records
//! (group commit: one `write` per batch, and with `--fsync always` one
//! `fdatasync`) and releases the batch's replies only when the writer says
//! the batch is written (`always`: synced). With `everysec` the writer
//! syncs the journal once a second; with `no`, never (the kernel decides).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::journal::{self, Record, Stop};
use super::{Base, Begin};
use crate::service::Stamp;
use crate::standby::{Shipped, Sink};

const MAGIC: &[u8; 8] = b"WHSNAP1\n";

/// When the journal is synced to disk (`--fsync`, as Redis's `appendfsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Every batch of events, before its replies are sent.
    Always,
    /// Once a second: a crash loses at most the last second.
    Everysec,
    /// Never by wasmhost: the kernel writes back when it likes.
    No,
}

/// What a snapshot file says besides the state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub number: u64,
    /// The component that wrote it (hex SHA-256).
    pub component: String,
    /// The instance's key, hex.
    pub key: String,
    pub born: Stamp,
    /// `init` (no state follows) or the state's format.
    pub format: Option<String>,
    pub stamp: Stamp,
    /// Timers armed when it was taken: token and deadline (Unix ms).
    pub timers: Vec<(u64, u64)>,
    /// Connections open when it was taken: id, listener, peer.
    pub conns: Vec<(u64, String, String)>,
    /// Every connection id below this was used.
    pub next_conn_id: u64,
}

impl SnapshotHeader {
    /// The base a rebuild starts from.
    pub fn base(&self, state: Vec<u8>) -> Result<Base> {
        let key: [u8; 32] = hex::decode(&self.key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .context("the snapshot's key is not 32 hex bytes")?;
        let start = match &self.format {
            None => Begin::Init(self.stamp),
            Some(format) => Begin::Snapshot {
                format: format.clone(),
                state: state.into(),
                stamp: self.stamp,
            },
        };
        Ok(Base {
            key,
            born: self.born,
            start,
        })
    }
}

/// Encodes a snapshot file.
pub fn encode_snapshot(header: &SnapshotHeader, state: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(header).expect("a header serialises");
    let mut out = Vec::with_capacity(8 + 4 + head.len() + 8 + state.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&(state.len() as u64).to_le_bytes());
    out.extend_from_slice(state);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a snapshot file; the error says what is wrong with it.
pub fn decode_snapshot(data: &[u8]) -> Result<(SnapshotHeader, Vec<u8>), String> {
    if data.len() < MAGIC.len() + 4 + 8 + 4 || &data[..8] != MAGIC {
        return Err("not a wasmhost snapshot (bad magic or too short)".into());
    }
    let (body, crc) = data.split_at(data.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    let head_len = u32::from_le_bytes(body[8..12].try_into().expect("4")) as usize;
    let head = body.get(12..12 + head_len).ok_or("the header is cut")?;
    let header: SnapshotHeader =
        serde_json::from_slice(head).map_err(|e| format!("bad header: {e}"))?;
    let rest = &body[12 + head_len..];
    let state_len = rest
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8")) as usize)
        .ok_or("the state's length is cut")?;
    if rest.len() != 8 + state_len {
        return Err(format!(
            "the state is {} bytes, its length says {state_len}",
            rest.len().saturating_sub(8)
        ));
    }
    Ok((header, rest[8..].to_vec()))
}

pub(crate) fn snapshot_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n:020}.bin"))
}

pub(crate) fn journal_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("journal-{n:020}.log"))
}

/// The kinds of numbered file in a state dir.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Snapshot,
    Journal,
}

/// What a file name in a state dir names: `snapshot-<n>.bin` or
/// `journal-<n>.log`, and `n`.
pub(crate) fn numbered(name: &str) -> Option<(Kind, u64)> {
    let parse = |prefix: &str, suffix: &str| {
        name.strip_prefix(prefix)?
            .strip_suffix(suffix)?
            .parse::<u64>()
            .ok()
    };
    parse("snapshot-", ".bin")
        .map(|n| (Kind::Snapshot, n))
        .or_else(|| parse("journal-", ".log").map(|n| (Kind::Journal, n)))
}

/// The numbers of the snapshot files in `dir`, highest first.
pub(crate) fn snapshot_numbers(dir: &Path) -> Result<Vec<u64>> {
    let mut numbers: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        if let Some((Kind::Snapshot, n)) = numbered(&entry?.file_name().to_string_lossy()) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable_by(|a, b| b.cmp(a));
    Ok(numbers)
}

/// What a state dir holds: the newest snapshot and the records after it.
pub struct Loaded {
    /// The snapshot's number (from its file name).
    pub number: u64,
    /// The journal appends go on in, and its length that reads back.
    pub last_journal: (u64, u64),
    pub header: SnapshotHeader,
    pub state: Vec<u8>,
    pub records: Vec<Record>,
    /// The journals' bytes that read back, in order (a torn tail cut off).
    pub journal: Vec<u8>,
    /// A warning to log (a torn record dropped, a bad newer snapshot skipped).
    pub warnings: Vec<String>,
}

/// Reads the newest valid snapshot of `dir` and its journal. `None` when
/// there is none (a new state dir). A torn record at the journal's end is
/// dropped with a warning; a corrupt one elsewhere is an error that says
/// what to do.
pub fn load(dir: &Path) -> Result<Option<Loaded>> {
    if !dir.exists() {
        return Ok(None);
    }
    let mut warnings = Vec::new();
    for n in snapshot_numbers(dir)? {
        let path = snapshot_path(dir, n);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (header, state) = match decode_snapshot(&data) {
            Ok(decoded) => decoded,
            Err(why) => {
                warnings.push(format!(
                    "{} is not a complete snapshot ({why}); using an older one",
                    path.display()
                ));
                continue;
            }
        };
        // Its journal, then the journals of newer snapshots that were still
        // being written (a snapshot that continues the same state starts
        // its journal before it is durable: the chain goes on through them).
        let (mut records, mut journal, mut last) = (Vec::new(), Vec::new(), (n, 0));
        let mut j = n;
        loop {
            let jpath = journal_path(dir, j);
            // Whether a newer journal exists, asked before this one is
            // read: a newer journal is started only once this one is
            // complete, so a journal read after the answer `yes` is whole
            // (a standby's live copy reads a dir that is being written).
            let is_last = !journal_path(dir, j + 1).exists();
            let bytes = match std::fs::read(&jpath) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && j == n => Vec::new(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(e).with_context(|| format!("reading {}", jpath.display())),
            };
            let (read, stop) = journal::read(&bytes);
            let good = match stop {
                None => bytes.len(),
                Some(Stop::Torn { offset }) if is_last => {
                    warnings.push(format!(
                        "{}: dropped an incomplete record at byte {offset} of {} (the crash \
                         interrupted its write; its reply was never sent)",
                        jpath.display(),
                        bytes.len()
                    ));
                    offset
                }
                Some(Stop::Torn { offset }) | Some(Stop::Corrupt { offset, .. }) => bail!(
                    "{} is corrupt at byte {offset} ({}), with records after it. The state up to \
                     there is in {} and the records before byte {offset}. To start from them, cut \
                     the journal there (`truncate -s {offset} {}`), move any newer journal aside, \
                     and start again; to start from the snapshot alone, move the journals aside",
                    jpath.display(),
                    match &stop {
                        Some(Stop::Corrupt { why, .. }) => why.as_str(),
                        _ => "a record cut short before the end of the chain",
                    },
                    path.display(),
                    jpath.display()
                ),
            };
            records.extend(read);
            journal.extend_from_slice(&bytes[..good]);
            last = (j, good as u64);
            if is_last {
                break;
            }
            j += 1;
        }
        return Ok(Some(Loaded {
            number: n,
            last_journal: last,
            header,
            state,
            records,
            journal,
            warnings,
        }));
    }
    if !warnings.is_empty() {
        bail!(
            "{} has snapshot files but none is complete: {}; move them aside to start empty",
            dir.display(),
            warnings.join("; ")
        );
    }
    Ok(None)
}

/// The next snapshot number for `dir` (above every snapshot and journal).
pub fn next_number(dir: &Path) -> Result<u64> {
    let mut next = snapshot_numbers(dir)?.first().map_or(1, |n| n + 1);
    while journal_path(dir, next).exists() {
        next += 1;
    }
    Ok(next)
}

/// A state dir as a service starts on it.
pub struct Attach {
    pub writer: Writer,
    /// The last snapshot number used (the next one is `number + 1`).
    pub number: u64,
    /// Whether the service goes on appending to `journal-<number>.log`
    /// (a restart that loaded it) instead of writing a new snapshot first.
    pub resume: bool,
}

impl Attach {
    /// Opens `dir` for a service that starts with a new snapshot.
    pub fn fresh(dir: &Path, fsync: Fsync) -> Result<Attach> {
        let writer = Writer::start(dir, fsync)?;
        Ok(Attach {
            writer,
            number: next_number(dir)? - 1,
            resume: false,
        })
    }

    /// Opens `dir` for a service restarted from what [`load`] found:
    /// appends go on in its journal, cut to the bytes that read back.
    pub fn resume(dir: &Path, fsync: Fsync, loaded: &Loaded) -> Result<Attach> {
        Attach::resume_at(dir, fsync, loaded.last_journal)
    }

    /// Opens `dir` for a service whose state reaches byte `good` of
    /// journal `n` (a restart, or a standby's live copy promoted).
    pub fn resume_at(dir: &Path, fsync: Fsync, (n, good): (u64, u64)) -> Result<Attach> {
        let writer = Writer::start(dir, fsync)?;
        let path = journal_path(dir, n);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_len(good)
            .with_context(|| format!("cutting the torn record off {}", path.display()))?;
        let _ = writer.tx.send(Cmd::Resume { n, journal: file });
        Ok(Attach {
            writer,
            number: n,
            resume: true,
        })
    }
}

enum Cmd {
    /// Write snapshot `n` (the whole file) and start `journal-<n>.log`
    /// ([`Writer::snapshot`]).
    Snapshot {
        n: u64,
        file: Box<(SnapshotHeader, Bytes)>,
        continues: bool,
    },
    /// Go on appending to journal `n`.
    Resume { n: u64, journal: File },
    /// Attach a standby: ship the chain on disk, then every write.
    Follow {
        sink: Sink,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Append to the current journal; sync first with `sync`.
    Append {
        bytes: Vec<u8>,
        sync: bool,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// The writer thread's handle.
pub struct Writer {
    tx: Arc<mpsc::Sender<Cmd>>,
    pub fsync: Fsync,
}

impl Writer {
    /// Starts the writer for `dir` (created if missing).
    pub fn start(dir: &Path, fsync: Fsync) -> Result<Writer> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (tx, rx) = mpsc::channel();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("wasmhost-state".into())
            .spawn(move || write_loop(&dir, fsync, rx))
            .context("starting the state writer thread")?;
        let tx = Arc::new(tx);
        *CURRENT.lock().expect("writer registry lock") = Some(Arc::downgrade(&tx));
        Ok(Writer { tx, fsync })
    }

    /// Queues snapshot `n`; later appends go to its journal.
    ///
    /// `continues`: the snapshot is of the same state the journal has been
    /// recording (a snapshot by threshold or `wasmhost snapshot`), so the
    /// journal so far plus the new one still rebuild it from the previous
    /// snapshot: appends switch to the new journal at once and the snapshot
    /// is written in the background, delaying no reply. Otherwise (a start,
    /// a swap, an upgrade, a fresh restart) the appends after it wait until
    /// it is durable.
    /// The file is encoded on the snapshot thread: no copy of the state is
    /// made on the caller's (the actor's) time.
    pub fn snapshot(&self, n: u64, header: SnapshotHeader, state: Bytes, continues: bool) {
        let file = Box::new((header, state));
        let _ = self.tx.send(Cmd::Snapshot { n, file, continues });
    }

    /// Appends a batch of records; resolves once they are written (and,
    /// with `--fsync always`, synced).
    pub fn append(&self, bytes: Vec<u8>) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let sync = self.fsync == Fsync::Always;
        if let Err(mpsc::SendError(Cmd::Append { done, .. })) =
            self.tx.send(Cmd::Append { bytes, sync, done })
        {
            let _ = done.send(Err("the state writer thread is gone".into()));
        }
        rx
    }
}

struct Current {
    n: u64,
    journal: File,
    dirty: bool,
    /// Set when a write failed: nothing more is written.
    failed: Option<String>,
}

/// A snapshot for the snapshot thread, and who waits for it.
type SnapshotJob = (
    u64,
    Box<(SnapshotHeader, Bytes)>,
    Option<mpsc::Sender<Result<(), String>>>,
);

fn write_loop(dir: &Path, fsync: Fsync, rx: mpsc::Receiver<Cmd>) {
    let mut current: Option<Current> = None;
    let mut last_sync = Instant::now();
    let mut seq: u64 = 0;
    // Snapshots are written by a thread of their own, in order, so that a
    // large one does not hold up the journal's appends.
    let (jobs, queue) = mpsc::channel::<SnapshotJob>();
    let snapshot_dir = dir.to_path_buf();
    // The standby attached, shared with the snapshot thread: a snapshot
    // is shipped, and the older files removed, under its lock, so an
    // attach reads a chain no removal cuts.
    let replica: Arc<Mutex<Option<Sink>>> = Arc::new(Mutex::new(None));
    let shipping = replica.clone();
    let snapshotter = std::thread::Builder::new()
        .name("wasmhost-snapshot".into())
        .spawn(move || {
            for (n, file, done) in queue {
                let (header, state) = *file;
                let file = encode_snapshot(&header, &state);
                drop(state);
                let result = write_snapshot(&snapshot_dir, n, &file).map_err(|e| {
                    format!("writing snapshot {n} to {}: {e:#}", snapshot_dir.display())
                });
                match &result {
                    Ok(()) => {
                        let mut standby = shipping.lock().expect("replica lock");
                        remove_older(&snapshot_dir, n);
                        if let Some(sink) = standby.as_ref() {
                            let shipped = Shipped::Snapshot {
                                n,
                                component: header.component.clone(),
                                bytes: Bytes::from(file),
                            };
                            if !sink.ship(shipped) {
                                *standby = None;
                            }
                        }
                    }
                    Err(why) => tracing::error!(
                        "{why}; the previous snapshot and the journals after it stay in use"
                    ),
                }
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        });
    if let Err(e) = snapshotter {
        tracing::error!("cannot start the snapshot thread: {e}");
        return;
    }
    loop {
        let cmd = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(cmd) => Some(cmd),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match cmd {
            Some(Cmd::Snapshot { n, file, continues }) => {
                // The journal so far must be on disk before the next one
                // starts (with `always` it is already synced).
                if let Some(c) = &mut current
                    && c.dirty
                    && fsync != Fsync::No
                    && c.journal.sync_data().is_ok()
                {
                    c.dirty = false;
                }
                let written = match continues {
                    true => {
                        let _ = jobs.send((n, file, None));
                        Ok(())
                    }
                    false => {
                        let (done, wait) = mpsc::channel();
                        let _ = jobs.send((n, file, Some(done)));
                        wait.recv()
                            .unwrap_or_else(|_| Err("the snapshot thread is gone".into()))
                    }
                };
                let started = written.and_then(|()| {
                    create_journal(dir, n)
                        .map_err(|e| format!("creating journal {n} in {}: {e:#}", dir.display()))
                });
                match started {
                    Ok(journal) => {
                        ship(&replica, Shipped::Journal { n });
                        current = Some(Current {
                            n,
                            journal,
                            dirty: false,
                            failed: None,
                        });
                    }
                    Err(why) => {
                        tracing::error!("{why}");
                        match &mut current {
                            Some(c) => c.failed = Some(why),
                            None => {
                                current = None;
                            }
                        }
                    }
                }
            }
            Some(Cmd::Resume { n, journal }) => {
                current = Some(Current {
                    n,
                    journal,
                    dirty: false,
                    failed: None,
                });
            }
            Some(Cmd::Append { bytes, sync, done }) => {
                let result = match (&mut current, crate::standby::fenced()) {
                    (_, Some(why)) => Err(why),
                    (None, None) => Err("no snapshot was written yet".to_string()),
                    (Some(c), None) => c.append(&bytes, sync).map(|()| c.n),
                };
                let mut standby = replica.lock().expect("replica lock");
                match (result, standby.as_ref()) {
                    (Ok(n), Some(sink)) => {
                        seq += 1;
                        let waits = sink.waits();
                        let (held, done) = match waits {
                            true => (Some(done), None),
                            false => (None, Some(done)),
                        };
                        let shipped = Shipped::Append {
                            n,
                            seq,
                            bytes: Bytes::from(bytes),
                            done: held,
                        };
                        if !sink.ship(shipped) {
                            *standby = None;
                        }
                        if let Some(done) = done {
                            let _ = done.send(Ok(()));
                        }
                    }
                    (result, _) => {
                        let _ = done.send(result.map(|_| ()));
                    }
                }
            }
            Some(Cmd::Follow { sink, reply }) => {
                let mut standby = replica.lock().expect("replica lock");
                let attached = chain_files(dir)
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|(files, component)| {
                        let shipped = files
                            .into_iter()
                            .map(|(name, bytes)| Shipped::File { name, bytes })
                            .chain([Shipped::BaseEnd { component }])
                            .all(|item| sink.ship(item));
                        match shipped {
                            true => Ok(()),
                            false => Err("the standby's link closed during the attach".into()),
                        }
                    })
                    .map(|()| {
                        seq = 0;
                        *standby = Some(sink);
                    });
                let _ = reply.send(attached);
            }
            None => {}
        }
        if fsync == Fsync::Everysec
            && last_sync.elapsed() >= Duration::from_secs(1)
            && let Some(c) = &mut current
            && c.dirty
        {
            if let Err(e) = c.journal.sync_data() {
                c.failed = Some(format!("syncing journal {}: {e}", c.n));
            }
            c.dirty = false;
            last_sync = Instant::now();
        }
    }
}

/// Ships `item` to the standby attached, if any; drops a standby that is
/// gone or too far behind.
fn ship(replica: &Mutex<Option<Sink>>, item: Shipped) {
    let mut standby = replica.lock().expect("replica lock");
    if let Some(sink) = standby.as_ref()
        && !sink.ship(item)
    {
        *standby = None;
    }
}

impl Current {
    fn append(&mut self, bytes: &[u8], sync: bool) -> Result<(), String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        let result = self.journal.write_all(bytes).and_then(|()| match sync {
            true => self.journal.sync_data(),
            false => Ok(()),
        });
        match result {
            Ok(()) => {
                self.dirty = !sync;
                Ok(())
            }
            Err(e) => {
                let why = format!("appending to journal {}: {e}", self.n);
                self.failed = Some(why.clone());
                Err(why)
            }
        }
    }
}

/// Writes snapshot `n` atomically: a temporary file, synced, renamed, and
/// the directory synced.
pub(crate) fn write_snapshot(dir: &Path, n: u64, file: &[u8]) -> Result<()> {
    if let Some(why) = super::fail_at("snapshot-write") {
        bail!(why);
    }
    write_atomic(&snapshot_path(dir, n), file)
}

/// Writes `path` whole or not at all: a temporary file beside it, synced,
/// renamed over it, and the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The chain a restart would load from `dir` now, as whole files: the
/// newest complete snapshot and the journals after it (for a standby that
/// attaches; called on the writer thread, between two of its writes).
fn chain_files(dir: &Path) -> Result<(Vec<(String, Bytes)>, String)> {
    for n in snapshot_numbers(dir)? {
        let path = snapshot_path(dir, n);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let Ok((header, _)) = decode_snapshot(&data) else {
            continue;
        };
        let mut files = vec![(file_name(&path), Bytes::from(data))];
        let mut j = n;
        loop {
            let jpath = journal_path(dir, j);
            match std::fs::read(&jpath) {
                Ok(bytes) => files.push((file_name(&jpath), Bytes::from(bytes))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && j > n => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", jpath.display())),
            }
            j += 1;
        }
        return Ok((files, header.component));
    }
    bail!("{} holds no complete snapshot yet", dir.display())
}

/// The newest journal in `dir` and its length.
pub fn last_journal(dir: &Path) -> Result<Option<(u64, u64)>> {
    let mut last = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let Some((Kind::Journal, n)) = numbered(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        if last.is_none_or(|(m, _)| n > m) {
            last = Some((n, entry.metadata()?.len()));
        }
    }
    Ok(last)
}

/// The header of the newest complete snapshot in `dir`, if any: the base a
/// restart would start from, and the component that wrote it.
pub fn newest_header(dir: &Path) -> Result<Option<SnapshotHeader>> {
    for n in snapshot_numbers(dir)? {
        let path = snapshot_path(dir, n);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if let Ok((header, _)) = decode_snapshot(&data) {
            return Ok(Some(header));
        }
    }
    Ok(None)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The writer of the service this process serves now, for a standby that
/// attaches (`crate::standby::primary`).
static CURRENT: Mutex<Option<Weak<mpsc::Sender<Cmd>>>> = Mutex::new(None);

/// Attaches a standby to the state-dir writer serving now: it gets the
/// chain as it is on disk, then every later write (`crate::standby`).
/// Replaces a standby attached before.
pub async fn follow(sink: Sink) -> Result<(), String> {
    let tx = CURRENT
        .lock()
        .expect("writer registry lock")
        .as_ref()
        .and_then(Weak::upgrade)
        .ok_or("this host's service keeps no state dir now (serve --state-dir)")?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send(Cmd::Follow { sink, reply })
        .map_err(|_| "the state writer thread is gone".to_string())?;
    drop(tx);
    answer
        .await
        .unwrap_or_else(|_| Err("the state writer thread is gone".into()))
}

/// Creates journal `n` (empty) and makes its name durable.
pub(crate) fn create_journal(dir: &Path, n: u64) -> Result<File> {
    let journal = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(journal_path(dir, n))?;
    File::open(dir)?.sync_all()?;
    Ok(journal)
}

/// Removes the snapshots and journals before `n` (snapshot `n` is durable;
/// journals after it are kept).
pub(crate) fn remove_older(dir: &Path, n: u64) {
    if let Ok(numbers) = snapshot_numbers(dir) {
        for old in numbers.into_iter().filter(|&m| m < n) {
            let _ = std::fs::remove_file(snapshot_path(dir, old));
            let _ = std::fs::remove_file(journal_path(dir, old));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SnapshotHeader {
        let stamp = Stamp {
            wall_ns: 1,
            mono_ns: 2,
            seq: 3,
        };
        SnapshotHeader {
            number: 7,
            component: "ab".into(),
            key: hex::encode([5u8; 32]),
            born: stamp,
            format: Some("kv/1".into()),
            stamp,
            timers: vec![(1, 99)],
            conns: vec![(4, "default".into(), "127.0.0.1:1".into())],
            next_conn_id: 5,
        }
    }

    #[test]
    fn a_snapshot_round_trips_and_any_cut_or_flip_is_refused() {
        let file = encode_snapshot(&header(), b"state bytes");
        let (h, state) = decode_snapshot(&file).unwrap();
        assert_eq!((h.number, state.as_slice()), (7, &b"state bytes"[..]));
        for cut in 0..file.len() {
            assert!(decode_snapshot(&file[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 1;
            assert!(decode_snapshot(&bad).is_err(), "flip at {i}");
        }
    }

    /// A state dir with snapshot 3 and a journal of `records` records.
    fn state_dir(records: u64) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let mut h = header();
        h.number = 3;
        std::fs::write(snapshot_path(dir.path(), 3), encode_snapshot(&h, b"s")).unwrap();
        let mut journal = Vec::new();
        for i in 0..records {
            let stamp = Stamp {
                wall_ns: i,
                mono_ns: i,
                seq: i,
            };
            journal::encode(&mut journal, stamp, journal::EventRef::Data(4, b"SET k v"));
        }
        std::fs::write(journal_path(dir.path(), 3), &journal).unwrap();
        (dir, journal)
    }

    #[test]
    fn a_journal_cut_at_every_byte_of_its_last_record_loads_without_it() {
        let (dir, journal) = state_dir(3);
        let last = journal.len() / 3 * 2;
        for cut in last..journal.len() {
            std::fs::write(journal_path(dir.path(), 3), &journal[..cut]).unwrap();
            let loaded = load(dir.path()).unwrap().unwrap();
            assert_eq!(loaded.records.len(), 2, "cut at {cut}");
            assert_eq!(loaded.journal.len(), last);
            assert_eq!(
                loaded.warnings.len(),
                usize::from(cut > last),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_flipped_byte_mid_journal_refuses_to_load_and_says_what_to_do() {
        let (dir, mut journal) = state_dir(3);
        let at = journal.len() / 3 + 20;
        journal[at] ^= 0x10;
        std::fs::write(journal_path(dir.path(), 3), &journal).unwrap();
        let e = load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("is corrupt at byte"), "{e}");
        assert!(e.contains("truncate -s"), "{e}");
    }

    #[test]
    fn journals_of_snapshots_still_being_written_continue_the_chain() {
        let (dir, first) = state_dir(2);
        // Snapshot 4 continued the state but never completed; its journal
        // holds the events after it.
        std::fs::write(snapshot_path(dir.path(), 4), b"WHSNAP1\nhalf").unwrap();
        let mut second = Vec::new();
        let stamp = Stamp {
            wall_ns: 9,
            mono_ns: 9,
            seq: 9,
        };
        journal::encode(&mut second, stamp, journal::EventRef::Close(4));
        std::fs::write(journal_path(dir.path(), 4), &second[..second.len() - 1]).unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.number, 3);
        assert_eq!(
            loaded.records.len(),
            2,
            "the torn last record of journal 4 is dropped"
        );
        assert_eq!(loaded.last_journal, (4, 0));
        std::fs::write(journal_path(dir.path(), 4), &second).unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.records.len(), 3);
        assert_eq!(loaded.journal.len(), first.len() + second.len());
        assert_eq!(loaded.last_journal, (4, second.len() as u64));
        assert_eq!(next_number(dir.path()).unwrap(), 5);
        // A record cut short before the end of the chain is corruption.
        std::fs::write(journal_path(dir.path(), 3), &first[..first.len() - 1]).unwrap();
        let e = load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("is corrupt"), "{e}");
    }

    #[test]
    fn a_damaged_newest_snapshot_falls_back_to_the_one_before() {
        let (dir, _) = state_dir(1);
        std::fs::write(snapshot_path(dir.path(), 4), b"WHSNAP1\ncut short").unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.number, 3);
        assert!(loaded.warnings[0].contains("not a complete snapshot"));
        assert_eq!(
            load(tempfile::tempdir().unwrap().path())
                .unwrap()
                .map(|_| ()),
            None
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode_snapshot(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode_snapshot(&with_magic);
        }
    }
}
