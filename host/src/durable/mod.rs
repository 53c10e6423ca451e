//! Durable state: snapshots plus a journal of stamped events (issue 9).
//!
//! Every event is recorded ([`Journal`], in the record format of
//! [`journal`]), snapshots are taken at update points ([`Policy`]), and a
//! trap rebuilds the state from the snapshot and the journal
//! (`service/recovery.rs`). With `--state-dir` both go to disk ([`disk`];
//! the actor's side is `service/persist.rs`) and a restart after a crash
//! rebuilds the state from them.
//!
//! # Model
//!
//! A guest's state after event *n* is a function of its state after a
//! snapshot *s* (s <= n) and the events s+1..n, each with its `Stamp`
//! (time and sequence number; `service/event_time.rs`) and the instance's
//! random key. So the host keeps, per service:
//!
//! * the last **snapshot**: `export-state` in the format the running
//!   component itself imports (the first of its `importable()` that its
//!   `exportable()` offers), with the key, the sequence number it was taken
//!   at, the timer table and each open connection's id and info;
//! * the **journal**: every event delivered since, in order, with its stamp:
//!   `connect(info)`, `data(conn, bytes)`, `close(conn)`, `timer(token)`.
//!   Effects are not journaled: they are the guest's output, recomputed by a
//!   replay and discarded (they already happened).
//!
//! A guest whose `exportable()` is empty is stateless: no snapshot, no
//! journal; a trap restarts it fresh as today.
//!
//! # Snapshots
//!
//! Taken by the actor between two events (an update point) when the journal
//! passes `--snapshot-bytes` (default 32 MiB), `--snapshot-events`
//! (default 500,000) or `--snapshot-age-s` (default 60 s), after every
//! committed swap or host upgrade (the transferred state is one), and on
//! `wasmhost snapshot`. The export runs inside the actor like a swap's (a
//! pause, measured and shown in `status`). A snapshot resets the journal.
//! A failed snapshot is retried once the journal has doubled; a journal
//! past 8 x `--snapshot-bytes` is dropped (traps then restart fresh).
//!
//! # Trap recovery (in memory)
//!
//! 1. The trapping event is known (the one being delivered). Drop the
//!    instance.
//! 2. New instance of the same program **with the same key**; import the
//!    snapshot; replay journal events 1..k-1 (k = the trapping one) with
//!    their stamps, effects discarded, timers recomputed from the snapshot's
//!    table plus the replayed `set-timer`/`cancel-timer` effects (compared
//!    with the live table: they must agree).
//! 3. The trapping event: a `data` or `connect` event's connection is
//!    closed (its input may be poison) and `on-close` is delivered; a trapping
//!    `timer` is dropped; a trapping `close` is simply done.
//! 4. Serve on. A trap during replay starts the service fresh (`init`, the
//!    state lost, logged). More than `--restart-budget` traps (default 5)
//!    in a row, with no event served in between, stop the service: its
//!    connections are closed, new ones are closed at once, `status` says
//!    why, and `swap --fresh` with a fixed version serves again. Never a
//!    spin.
//!
//! # On disk: `--state-dir DIR`
//!
//! ```text
//! DIR/snapshot-<n>.bin   magic "WHSNAP1\n", u32 header length, JSON header
//!                        (number, component hash, key, stamps, format or
//!                        init, timers as deadlines, open connections, next
//!                        connection id), u64 state length, the state,
//!                        CRC-32 of all of it; <n> has 20 digits
//! DIR/journal-<n>.log    the records after snapshot <n>: u32 length,
//!                        u32 CRC-32, u8 kind, stamp (wall_ns, mono_ns,
//!                        seq: u64), payload
//! DIR/fleet.json         the dir's epoch, and its standby or primary
//!                        (`crate::standby`: warm standby and fencing)
//! DIR/component-<hash>.wasm  on a standby: the components its copy needs
//! ```
//!
//! Every new base of the journal (the start, a snapshot, a swap, an
//! upgrade, a fresh restart) becomes snapshot `n + 1`, written to a
//! temporary file, fsynced, renamed, the directory fsynced, and the older
//! files removed. A snapshot of the same state (by threshold or `wasmhost
//! snapshot`) is written in the background while appends go on in its new
//! journal: the previous snapshot and the chain of journals after it
//! rebuild the state until it is durable. Any other new base is waited for.
//!
//! Group commit, as Redis's appendfsync: the actor keeps the output (sends
//! and closes) of the events it handles, and when its queue is empty (or
//! 1 MiB / 4,096 effects are held) hands the new records to the writer as
//! one batch: one `write` (and one `fdatasync` with `--fsync always`;
//! once a second with `everysec`, the default; never with `no`), then
//! releases the held output. The writer works in order, so a batch after
//! a snapshot also waits for the snapshot. Never one fsync per event.
//!
//! Start with a state dir that holds a state: load the newest snapshot that
//! checks (an incomplete newer one is skipped with a warning), replay its
//! journal and the newer journals after it; a record cut at the journal's end (the crash interrupted it) is
//! dropped with a warning and cut off the file; a bad record elsewhere
//! stops the start with an error naming the file, the offset and what to
//! do. Timers are restored from the header's deadlines and the replayed
//! effects; every connection open at the crash gets `on-close`; then the
//! service accepts. A different component replays the same journal (its
//! snapshot's format must be one it imports).

//! # Failure at each step
//!
//! | step | fails how | what happens |
//! |---|---|---|
//! | snapshot export | error or trap | no new snapshot; the journal keeps growing; a trap is recovered from the previous snapshot |
//! | snapshot write | disk full, I/O error | a snapshot of the same state: logged, the previous snapshot and the journals after it stay in use, retried at the next threshold; a snapshot that starts a new chain (start, swap, upgrade): the service stops, the files on disk stay valid for a restart |
//! | journal write | I/O error | the service stops before sending the batch's replies; a restart recovers what was written |
//! | recovery replay | trap | fresh start (the budget), state lost, logged and in `status` |
//! | start-up load | corrupt record mid-journal | start refused with the file and offset |
//!
//! Every row gets a test that makes it fail on purpose
//! (`WASMHOST_TEST_DURABLE_FAIL=<step>`), and the service must still serve
//! afterwards. Built and tested so far (tests/tests/durable.rs and
//! crash.rs): `snapshot-export`, `rebuild` (a replay that fails) and
//! `journal-write` (a stop, as designed); `snapshot-write` is injectable
//! but has no test yet.

pub mod disk;
pub mod journal;

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::service::Stamp;

/// Whether the test-only `WASMHOST_TEST_DURABLE_FAIL` names `step` (read
/// once): then that step fails on purpose, with this error text.
pub fn fail_at(step: &str) -> Option<String> {
    static STEP: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let named = STEP.get_or_init(|| std::env::var("WASMHOST_TEST_DURABLE_FAIL").ok());
    (named.as_deref() == Some(step)).then(|| format!("test: WASMHOST_TEST_DURABLE_FAIL={step}"))
}

/// When snapshots are taken and how traps are recovered (`wasmhost serve`
/// flags; the defaults are documented in the README's "Limits and failure
/// behaviour").
#[derive(Clone, Debug)]
pub struct Policy {
    /// Record events and rebuild the state after a trap (`--journal`).
    pub journal: bool,
    /// Take a snapshot once the journal holds this many bytes.
    pub snapshot_bytes: usize,
    /// ... or this many events.
    pub snapshot_events: u64,
    /// ... or its oldest event is this old (checked at each event).
    pub snapshot_age: Duration,
    /// Traps in a row (with no event served between them) after which the
    /// service is stopped instead of rebuilt.
    pub restart_budget: u32,
    /// `--state-dir`: snapshots and the journal on disk.
    pub state_dir: Option<std::path::PathBuf>,
    pub fsync: disk::Fsync,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            journal: true,
            snapshot_bytes: 32 << 20,
            snapshot_events: 500_000,
            snapshot_age: Duration::from_secs(60),
            restart_budget: 5,
            state_dir: None,
            fsync: disk::Fsync::Everysec,
        }
    }
}

/// What a rebuilt instance starts from before the journal is replayed:
/// the same component instantiated with the same key, then `init` or the
/// snapshot's import, each with its recorded stamp.
#[derive(Clone)]
pub struct Base {
    /// The instance's secret key: its random bytes derive from it.
    pub key: [u8; 32],
    /// The instantiation's stamp.
    pub born: Stamp,
    pub start: Begin,
}

#[derive(Clone)]
pub enum Begin {
    /// `init` with the service's `--config`, at this stamp.
    Init(Stamp),
    /// `import-state` of a snapshot: `export-state` in a format the
    /// component itself imports.
    Snapshot {
        format: String,
        state: Bytes,
        stamp: Stamp,
    },
}

impl Base {
    /// The snapshot's size in bytes (0 for `init`).
    pub fn state_bytes(&self) -> usize {
        match &self.start {
            Begin::Init(_) => 0,
            Begin::Snapshot { state, .. } => state.len(),
        }
    }
}

/// Bytes per journal chunk: the journal grows by chunks, never by copying
/// what it holds (a reallocation of megabytes would stall the actor).
const CHUNK: usize = 1 << 20;

/// The events since the base, encoded as [`journal`] records, in chunks
/// (no record spans two). Full chunks are frozen, so a copy of the journal
/// ([`share`](Journal::share)) costs no copy of its bytes.
pub struct Journal {
    pub base: Base,
    /// Chunks no longer appended to.
    frozen: Vec<Bytes>,
    /// The chunk being appended to.
    current: Vec<u8>,
    len: usize,
    events: u64,
    /// When the base was taken.
    since: Instant,
}

impl Journal {
    pub fn new(base: Base) -> Journal {
        Journal {
            base,
            frozen: Vec::new(),
            current: Vec::new(),
            len: 0,
            events: 0,
            since: Instant::now(),
        }
    }

    /// A journal that already holds `bytes` (`events` records) after
    /// `base`: what a restart from a state dir found on disk.
    pub fn resume(base: Base, bytes: Vec<u8>, events: u64) -> Journal {
        let len = bytes.len();
        Journal {
            base,
            frozen: vec![Bytes::from(bytes)],
            current: Vec::new(),
            len,
            events,
            since: Instant::now(),
        }
    }

    /// A second journal with the same base and records, which then grows
    /// on its own (a shadow swap's new version starts from it). The chunk
    /// being written is frozen and shared, not copied: the cost does not
    /// grow with the journal.
    pub fn share(&mut self) -> Journal {
        if !self.current.is_empty() {
            self.frozen
                .push(Bytes::from(std::mem::take(&mut self.current)));
        }
        Journal {
            base: self.base.clone(),
            frozen: self.frozen.clone(),
            current: Vec::new(),
            len: self.len,
            events: self.events,
            since: self.since,
        }
    }

    /// The bytes from offset `from` to the end (records not yet written to
    /// disk).
    pub fn bytes_from(&self, from: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len.saturating_sub(from));
        let mut at = 0;
        for chunk in self.chunks() {
            let end = at + chunk.len();
            if end > from {
                out.extend_from_slice(&chunk[from.saturating_sub(at)..]);
            }
            at = end;
        }
        out
    }

    /// Records one event the instance handled; returns its record.
    pub fn record(&mut self, stamp: Stamp, event: journal::EventRef<'_>) -> &[u8] {
        let need = journal::encoded_len(event);
        if self.current.capacity() - self.current.len() < need {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(need.max(CHUNK)));
            if !full.is_empty() {
                self.frozen.push(Bytes::from(full));
            }
        }
        let start = self.current.len();
        journal::encode(&mut self.current, stamp, event);
        self.len += need;
        self.events += 1;
        &self.current[start..]
    }

    /// Appends records encoded elsewhere (`events` whole records, already
    /// checked): a shadow's journal takes the live version's records as
    /// they are.
    pub fn append_records(&mut self, records: &[u8], events: u64) {
        if self.current.capacity() - self.current.len() < records.len() {
            let full = std::mem::replace(
                &mut self.current,
                Vec::with_capacity(records.len().max(CHUNK)),
            );
            if !full.is_empty() {
                self.frozen.push(Bytes::from(full));
            }
        }
        self.current.extend_from_slice(records);
        self.len += records.len();
        self.events += events;
    }

    /// Starts again from `base` (a snapshot, or `init` after a fresh
    /// start); the journal is emptied.
    pub fn reset(&mut self, base: Base) {
        self.base = base;
        // The chunk being written is kept for the next events (it is
        // shared with no one); the frozen ones are freed.
        self.frozen.clear();
        self.current.clear();
        self.len = 0;
        self.events = 0;
        self.since = Instant::now();
    }

    /// The records, chunk by chunk (each chunk holds whole records).
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        let current = (!self.current.is_empty()).then_some(self.current.as_slice());
        self.frozen.iter().map(|c| &c[..]).chain(current)
    }

    pub fn len_bytes(&self) -> usize {
        self.len
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// How long ago the base was taken.
    pub fn age(&self) -> Duration {
        self.since.elapsed()
    }

    /// Why a snapshot is due now, if it is.
    pub fn due(&self, policy: &Policy) -> Option<&'static str> {
        if self.events == 0 {
            None
        } else if self.len >= policy.snapshot_bytes {
            Some("journal size")
        } else if self.events >= policy.snapshot_events {
            Some("event count")
        } else if self.since.elapsed() >= policy.snapshot_age {
            Some("age")
        } else {
            None
        }
    }
}
