//! One task per connection: it reads from the socket and sends the bytes to
//! the service actor as events, and it writes what the service sends.
//!
//! The task never calls the guest. Memory per connection is bounded:
//! reads happen only when the socket is readable and are handed over at
//! once (the actor's queue is bounded, so a slow service slows the readers
//! down), and unsent output is capped by [`ConnLimits::max_output_buffer`].
//! While more than half of that cap is queued, the task stops reading from
//! its socket, so a client that sends requests without reading the replies
//! is throttled instead of buffered.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::service::{Event, ServiceHandle};

/// Per-connection limits.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Largest single read handed to the service, in bytes.
    pub read_chunk: usize,
    /// Most unsent bytes queued for one connection. Reading pauses above
    /// half of it; a send that would exceed it closes the connection.
    pub max_output_buffer: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            read_chunk: 64 * 1024,
            max_output_buffer: 8 * 1024 * 1024,
        }
    }
}

/// State shared between a connection's task and the service actor.
struct Shared {
    /// Bytes queued for writing and not yet written.
    queued: AtomicUsize,
    /// Bytes read and handed to the service but not yet processed by it.
    unprocessed: AtomicUsize,
    /// Wakes the reader: the writer drained to the resume mark, or the
    /// service processed input.
    wake_reader: Notify,
    /// Stops the reader (the connection is closing).
    stop_reading: CancellationToken,
    /// Stops the writer at once, dropping unsent bytes.
    abort: CancellationToken,
    limits: ConnLimits,
}

impl Shared {
    /// Input handed to the service and not yet processed is capped at two
    /// reads, so one busy connection cannot fill the service's queue and
    /// replies are counted against the output limit before more is read.
    fn max_unprocessed(&self) -> usize {
        2 * self.limits.read_chunk
    }

    fn must_wait(&self) -> bool {
        self.queued.load(Ordering::Acquire) > self.limits.max_output_buffer / 2
            || self.unprocessed.load(Ordering::Acquire) >= self.max_unprocessed()
    }
}

/// The actor's handle on a connection: where its output goes.
pub struct Outbox {
    tx: mpsc::UnboundedSender<Bytes>,
    shared: Arc<Shared>,
}

/// Why [`Outbox::send`] refused bytes.
#[derive(Debug, thiserror::Error)]
#[error(
    "output buffer limit of {limit} bytes exceeded ({queued} bytes unsent): the client is not reading"
)]
pub struct Overflow {
    pub queued: usize,
    pub limit: usize,
}

impl Outbox {
    /// Queues `data` for writing. On overflow nothing is queued; the caller
    /// should [`abort`](Outbox::abort) the connection.
    pub fn send(&self, data: Vec<u8>) -> Result<(), Overflow> {
        let limit = self.shared.limits.max_output_buffer;
        let queued = self.shared.queued.load(Ordering::Acquire);
        if queued + data.len() > limit {
            return Err(Overflow { queued, limit });
        }
        self.shared.queued.fetch_add(data.len(), Ordering::AcqRel);
        // The receiver is gone only when the writer has failed; the reader
        // then reports the end of the connection.
        let _ = self.tx.send(Bytes::from(data));
        Ok(())
    }

    /// The service has processed `n` bytes of this connection's input.
    pub fn consumed(&self, n: usize) {
        let before = self.shared.unprocessed.fetch_sub(n, Ordering::AcqRel);
        if before >= self.shared.max_unprocessed() && before - n < self.shared.max_unprocessed() {
            self.shared.wake_reader.notify_one();
        }
    }

    /// Stops reading; the writer sends what is queued, then closes the
    /// socket (it sees the channel end when this outbox is dropped).
    pub fn close(self) {
        self.shared.stop_reading.cancel();
    }

    /// Stops reading and writing at once, dropping unsent bytes.
    pub fn abort(self) {
        self.shared.stop_reading.cancel();
        self.shared.abort.cancel();
    }
}

/// Starts the task for an accepted connection and registers it with the
/// service. Returns once the `Connected` event is queued.
pub async fn spawn(
    stream: TcpStream,
    info: crate::bindings::ConnInfo,
    service: ServiceHandle,
    limits: ConnLimits,
    shutdown: &CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        unprocessed: AtomicUsize::new(0),
        wake_reader: Notify::new(),
        stop_reading: shutdown.child_token(),
        abort: CancellationToken::new(),
        limits,
    });
    let id = info.id;
    let outbox = Outbox {
        tx,
        shared: shared.clone(),
    };
    if service
        .event(Event::Connected { info, outbox })
        .await
        .is_err()
    {
        return; // the service is shutting down
    }
    let (reader, writer) = stream.into_split();
    tracker.spawn(async move {
        tokio::join!(
            read_loop(id, reader, &shared, &service),
            write_loop(id, writer, rx, &shared),
        );
        drop(permit);
    });
}

/// The smallest read buffer.
const MIN_READ: usize = 4096;

/// Doubles the read size after a read that filled the buffer, halves it
/// after one that used under a quarter; between [`MIN_READ`] and `max`.
fn next_read_size(current: usize, read: usize, max: usize) -> usize {
    if read >= current {
        (current * 2).min(max)
    } else if read < current / 4 {
        (current / 2).max(MIN_READ.min(max))
    } else {
        current
    }
}

async fn read_loop(id: u64, reader: OwnedReadHalf, shared: &Shared, service: &ServiceHandle) {
    // One long-lived future (not one per read): creating and dropping
    // them showed up in profiles.
    let stopped = shared.stop_reading.cancelled();
    tokio::pin!(stopped);
    let mut read_size = MIN_READ.min(shared.limits.read_chunk);
    loop {
        // Backpressure: wait until the client has read enough of its
        // replies, and the service has caught up with this connection.
        while shared.must_wait() {
            tokio::select! {
                _ = &mut stopped => break,
                _ = shared.wake_reader.notified() => {}
            }
        }
        let ready = tokio::select! {
            _ = &mut stopped => break,
            ready = reader.readable() => ready,
        };
        if let Err(e) = ready {
            tracing::debug!(conn = id, "read failed: {e}");
            break;
        }
        // Allocate only when there is something to read, so an idle
        // connection holds no read buffer; size it by what recent reads
        // brought, so small requests do not cost a large allocation.
        let mut buf = BytesMut::with_capacity(read_size);
        match reader.try_read_buf(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                read_size = next_read_size(read_size, n, shared.limits.read_chunk);
                shared.unprocessed.fetch_add(n, Ordering::AcqRel);
                if service.event(Event::Data(id, buf.freeze())).await.is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(conn = id, "read failed: {e}");
                break;
            }
        }
    }
    // Tell the service the connection ended (ignored if it closed it itself).
    let _ = service.event(Event::ReadClosed(id)).await;
}

async fn write_loop(
    id: u64,
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    shared: &Shared,
) {
    let resume_mark = shared.limits.max_output_buffer / 2;
    let mut batch = Vec::new();
    let mut single;
    let aborted = shared.abort.cancelled();
    tokio::pin!(aborted);
    loop {
        let first = tokio::select! {
            _ = &mut aborted => return,
            msg = rx.recv() => msg,
        };
        let Some(first) = first else { break };
        // Coalesce what is already queued into one write; a lone message is
        // written as it is.
        let data: &[u8] = match rx.try_recv() {
            Ok(second) => gather([first, second], &mut rx, &mut batch),
            Err(_) => {
                batch.clear();
                single = first;
                &single
            }
        };
        let len = data.len();
        let written = tokio::select! {
            _ = &mut aborted => return,
            r = writer.write_all(data) => r,
        };
        batch.clear();
        if let Err(e) = written {
            tracing::debug!(conn = id, "write failed: {e}");
            shared.stop_reading.cancel();
            return;
        }
        let before = shared.queued.fetch_sub(len, Ordering::AcqRel);
        if before - len <= resume_mark && before > resume_mark {
            shared.wake_reader.notify_one();
        }
    }
    // The service closed the connection (or it ended): everything queued
    // has been written; close our side.
    let _ = writer.shutdown().await;
}

/// Most bytes coalesced into one write.
const MAX_BATCH: usize = 256 * 1024;

fn gather<'a>(
    first: [Bytes; 2],
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    batch: &'a mut Vec<u8>,
) -> &'a [u8] {
    batch.clear();
    for b in first {
        batch.extend_from_slice(&b);
    }
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(more) => batch.extend_from_slice(&more),
            Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_adapts_within_bounds() {
        assert_eq!(next_read_size(4096, 4096, 65536), 8192);
        assert_eq!(next_read_size(65536, 65536, 65536), 65536);
        assert_eq!(next_read_size(16384, 100, 65536), 8192);
        assert_eq!(next_read_size(4096, 10, 65536), 4096);
        assert_eq!(next_read_size(8192, 3000, 65536), 8192);
        assert_eq!(next_read_size(1024, 10, 1024), 1024);
    }
}
