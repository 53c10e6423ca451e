//! The actor's side of `--state-dir` (`crate::durable::disk`): every new
//! base of the journal is written as a snapshot file, the journal's records
//! are appended in batches (group commit), and the output of the events in
//! a batch (sends and closes) is held until the writer says the batch is
//! written, so what a client saw acknowledged is on disk.

use std::sync::atomic::Ordering;

use anyhow::Result;

use super::Actor;
use super::state::Effect;
use crate::durable::Begin;
use crate::durable::disk::{Attach, SnapshotHeader, Writer};

/// Held output past which a batch is written even while events queue.
const MAX_HELD_BYTES: usize = 1 << 20;
const MAX_HELD_EFFECTS: usize = 4096;

pub(super) struct Disk {
    writer: Writer,
    /// The number of the last snapshot written.
    number: u64,
    /// Journal bytes already handed to the writer.
    flushed: usize,
    /// Output waiting for its batch to be written.
    held: Vec<Effect>,
    held_bytes: usize,
    /// A snapshot was queued and no append has waited for it since.
    base_pending: bool,
    /// Appends of a journal's last records, made as a snapshot started the
    /// next journal: their output is released only once they are written.
    sealing: Vec<tokio::sync::oneshot::Receiver<Result<(), String>>>,
}

impl Disk {
    pub(super) fn new(attach: Attach, flushed: usize) -> Disk {
        Disk {
            writer: attach.writer,
            number: attach.number,
            flushed,
            held: Vec::new(),
            held_bytes: 0,
            base_pending: false,
            sealing: Vec::new(),
        }
    }
}

impl Actor {
    /// Whether output must wait for the journal to be written.
    pub(super) fn holds_output(&self) -> bool {
        self.disk.is_some() && self.journal.is_some()
    }

    /// Holds a send or close until its batch is written.
    pub(super) fn hold(&mut self, effect: Effect) {
        let disk = self.disk.as_mut().expect("holds_output");
        if let Effect::Send(_, data) = &effect {
            disk.held_bytes += data.len();
        }
        disk.held.push(effect);
    }

    /// Whether a batch should be written now: there is something to write
    /// and either nothing else is queued or the held output is large.
    pub(super) fn batch_due(&self) -> bool {
        let (Some(disk), Some(journal)) = (&self.disk, &self.journal) else {
            return false;
        };
        (journal.len_bytes() > disk.flushed
            || disk.base_pending
            || !disk.held.is_empty()
            || !disk.sealing.is_empty())
            && (self.rx.is_empty()
                || disk.held_bytes >= MAX_HELD_BYTES
                || disk.held.len() >= MAX_HELD_EFFECTS)
    }

    /// Writes the journal's new records as one batch, waits for the writer
    /// (and, with `--fsync always`, the sync), then releases the held
    /// output. A write that fails stops the service: nothing unwritten was
    /// acknowledged, and nothing more will be.
    pub(super) async fn flush(&mut self) -> Result<()> {
        let Some(disk) = &mut self.disk else {
            return Ok(());
        };
        let mut failed = None;
        for sealed in std::mem::take(&mut disk.sealing) {
            if let Err(why) = sealed
                .await
                .unwrap_or_else(|_| Err("the state writer thread is gone".into()))
            {
                failed = Some(why);
            }
        }
        if let Some(why) = failed {
            self.stop(format!(
                "the state dir cannot be written ({why}); replies not yet written were not \
                 sent. Fix the disk and restart the host: it recovers from what was written"
            ));
            return Ok(());
        }
        let (Some(disk), Some(journal)) = (&mut self.disk, &self.journal) else {
            return Ok(());
        };
        // An empty batch after a snapshot still waits for the snapshot to
        // be written: the writer works in order.
        if journal.len_bytes() > disk.flushed || disk.base_pending {
            let bytes = journal.bytes_from(disk.flushed);
            disk.flushed = journal.len_bytes();
            disk.base_pending = false;
            let written = disk.writer.append(bytes);
            let result = match written.await {
                Ok(result) => result,
                Err(_) => Err("the state writer thread is gone".into()),
            };
            let result = match crate::durable::fail_at("journal-write") {
                Some(why) => Err(why),
                None => result,
            };
            if let Err(why) = result {
                self.stop(match why.starts_with("fenced") {
                    // A standby was promoted: this host must not serve.
                    true => format!("{why}; replies not yet acknowledged by it were not sent"),
                    false => format!(
                        "the state dir cannot be written ({why}); replies not yet written were \
                         not sent. Fix the disk and restart the host: it recovers from what was \
                         written"
                    ),
                });
                return Ok(());
            }
        }
        self.release_held();
        self.deliver_closes().await
    }

    /// Forgets the held output (the service stopped: its connections are
    /// closed, and none of it was acknowledged).
    pub(super) fn drop_held(&mut self) {
        if let Some(disk) = &mut self.disk {
            disk.held.clear();
            disk.held_bytes = 0;
        }
    }

    /// The state dir's part of `status`.
    pub(super) fn state_dir_status(&self) -> Option<super::recovery::StateDirStatus> {
        let disk = self.disk.as_ref()?;
        let policy = &self.spec.durable;
        Some(super::recovery::StateDirStatus {
            path: policy.state_dir.as_ref()?.display().to_string(),
            fsync: format!("{:?}", policy.fsync).to_lowercase(),
            snapshot: disk.number,
            journal_bytes: disk.flushed,
        })
    }

    /// Carries out the held output (its batch is written).
    fn release_held(&mut self) {
        let Some(disk) = &mut self.disk else {
            return;
        };
        let held = std::mem::take(&mut disk.held);
        disk.held_bytes = 0;
        self.apply_now(held);
    }

    /// Hands the journal's records not yet written to the writer, before a
    /// snapshot that continues the same state resets the journal.
    pub(super) fn seal_journal(&mut self) {
        let (Some(disk), Some(journal)) = (&mut self.disk, &self.journal) else {
            return;
        };
        if journal.len_bytes() > disk.flushed {
            let bytes = journal.bytes_from(disk.flushed);
            disk.flushed = journal.len_bytes();
            disk.sealing.push(disk.writer.append(bytes));
        }
    }

    /// Writes the journal's current base as the state dir's next snapshot
    /// (on the writer's threads; appends after it go to its journal).
    /// `conns`: whether the connections open now are part of the base (a
    /// snapshot or a transferred state) or are journaled after it (a fresh
    /// start). `continues`: a snapshot of the state the journal recorded
    /// ([`Writer::snapshot`]), called after [`seal_journal`](Self::seal_journal).
    pub(super) fn persist_base(&mut self, conns: bool, continues: bool) {
        if self.disk.is_none() || self.journal.is_none() {
            return;
        }
        let now_ms = super::unix_ms(std::time::SystemTime::now());
        let timers = self
            .timer_images()
            .into_iter()
            .map(|t| (t.token, now_ms + t.remaining_ms))
            .collect();
        let (Some(disk), Some(journal)) = (&mut self.disk, &self.journal) else {
            return;
        };
        disk.number += 1;
        disk.flushed = 0;
        disk.base_pending = !continues;
        let base = &journal.base;
        let (format, state, stamp) = match &base.start {
            Begin::Init(stamp) => (None, bytes::Bytes::new(), *stamp),
            Begin::Snapshot {
                format,
                state,
                stamp,
            } => (Some(format.clone()), state.clone(), *stamp),
        };
        let mut open: Vec<(u64, String, String)> = match conns {
            true => self
                .conns
                .values()
                .map(|c| (c.info.id, c.info.listener.clone(), c.info.peer.clone()))
                .collect(),
            false => Vec::new(),
        };
        open.sort_unstable();
        let header = SnapshotHeader {
            number: disk.number,
            component: self.instance.program.hash.clone(),
            key: hex::encode(base.key),
            born: base.born,
            format,
            stamp,
            timers,
            conns: open,
            next_conn_id: self.net.next_id.load(Ordering::Relaxed),
        };
        disk.writer.snapshot(disk.number, header, state, continues);
    }
}
