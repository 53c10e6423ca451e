//! One task per connection: it reads from the socket and sends the bytes to
//! the service actor as events, and it writes what the service sends when
//! the socket does not take it at once.
//!
//! The actor writes a reply straight to the socket (a non-blocking send,
//! on its own thread) when nothing is queued for that connection; only
//! what the socket does not take goes to the connection's task, which
//! writes it when the socket is writable. Every reply so costs one system
//! call and no hand-off while clients keep up, as in Redis's event loop,
//! and order is kept: the actor writes directly only while the task holds
//! nothing unwritten.
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
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AcceptCtx;
use crate::service::{Event, LoadGuard, ServiceHandle};

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
    /// The socket, shared by the task and the actor's [`Outbox`] (which
    /// writes to it directly); `None` once frozen or closing.
    direct: std::sync::Mutex<Option<Arc<TcpStream>>>,
    limits: ConnLimits,
}

impl Shared {
    /// Input handed to the service and not yet processed is capped at two
    /// reads, so one busy connection cannot fill the service's queue and
    /// replies are counted against the output limit before more is read.
    fn max_unprocessed(&self) -> usize {
        2 * self.limits.read_chunk
    }

    /// `n` queued bytes were written: wake the reader if that brought the
    /// queue down to the resume mark.
    fn written(&self, n: usize) {
        let resume_mark = self.limits.max_output_buffer / 2;
        let before = self.queued.fetch_sub(n, Ordering::AcqRel);
        if before - n <= resume_mark && before > resume_mark {
            self.wake_reader.notify_one();
        }
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
    /// Writes `data` to the socket if nothing is queued before it and the
    /// socket takes it, and queues what it does not take. On overflow
    /// nothing is written or queued; the caller should
    /// [`abort`](Outbox::abort) the connection.
    pub fn send(&self, data: Vec<u8>) -> Result<(), Overflow> {
        let limit = self.shared.limits.max_output_buffer;
        let queued = self.shared.queued.load(Ordering::Acquire);
        if queued + data.len() > limit {
            return Err(Overflow { queued, limit });
        }
        let mut written = 0;
        // `queued` counts every byte handed to the task and not yet
        // written, so at zero the task holds nothing that must go first;
        // the actor is the only sender, so nothing is added meanwhile. The
        // lock keeps the task from giving the socket up (a freeze) while
        // this writes.
        if queued == 0 {
            let direct = self.shared.direct.lock().expect("direct lock");
            if let Some(stream) = direct.as_ref() {
                // Full, or failing: the task writes it, or meets the error.
                written = stream.try_write(&data).unwrap_or(0);
                crate::fleet::metrics::written(written);
            }
        }
        if written == data.len() {
            return Ok(());
        }
        let rest = Bytes::from(data).slice(written..);
        self.shared.queued.fetch_add(rest.len(), Ordering::AcqRel);
        // The receiver is gone only when the writer has failed; the reader
        // then reports the end of the connection.
        let _ = self.tx.send(rest);
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

impl Shared {
    fn new(limits: ConnLimits, shutdown: &CancellationToken) -> Arc<Shared> {
        Arc::new(Shared {
            queued: AtomicUsize::new(0),
            unprocessed: AtomicUsize::new(0),
            wake_reader: Notify::new(),
            stop_reading: shutdown.child_token(),
            abort: CancellationToken::new(),
            direct: std::sync::Mutex::new(None),
            limits,
        })
    }

    /// No more direct writes from the actor (the task is giving up the
    /// socket); waits for one in progress, which holds the lock.
    fn end_direct(&self) {
        self.direct.lock().expect("direct lock").take();
    }
}

/// A connection whose task stopped for a freeze (host upgrade): the socket
/// with every byte the service sent that was not written yet. The kernel
/// still holds what the client sent and nobody read, so nothing is lost
/// while it is parked; [`adopt`] starts serving it again, in this process
/// or in the one it was handed to.
pub struct FrozenConn {
    pub id: u64,
    pub stream: Arc<TcpStream>,
    /// What the writer had not written when it stopped; what the service
    /// queued since is still in the task's channel
    /// ([`FrozenConn::take_unsent`]).
    unsent: Vec<u8>,
    /// The stopped task's channel and shared state; `None` for a socket
    /// received from another process (nothing is queued on this side).
    task: Option<(mpsc::UnboundedReceiver<Bytes>, Arc<Shared>)>,
    permit: Option<OwnedSemaphorePermit>,
}

impl FrozenConn {
    /// A connection received from another process, with its unsent bytes.
    pub fn received(
        id: u64,
        stream: std::net::TcpStream,
        unsent: Vec<u8>,
    ) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(FrozenConn {
            id,
            stream: Arc::new(TcpStream::from_std(stream)?),
            unsent,
            task: None,
            permit: None,
        })
    }

    /// Everything not yet written (see [`take_unsent`](Self::take_unsent)),
    /// kept for later.
    pub fn unsent(&mut self) -> &[u8] {
        if let Some((rx, _)) = &mut self.task {
            while let Ok(more) = rx.try_recv() {
                self.unsent.extend_from_slice(&more);
            }
        }
        &self.unsent
    }

    /// Everything not yet written, in order: the writer's remainder, then
    /// what the service queued after the writer stopped.
    pub fn take_unsent(&mut self) -> Vec<u8> {
        self.unsent();
        std::mem::take(&mut self.unsent)
    }
}

/// Starts the task for an accepted connection and registers it with the
/// service. Returns once the `Connected` event is queued.
pub async fn spawn(
    stream: TcpStream,
    info: super::ConnMeta,
    ctx: &AcceptCtx,
    permit: OwnedSemaphorePermit,
    load: Option<LoadGuard>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Shared::new(ctx.limits, &ctx.shutdown);
    let id = info.id;
    let outbox = Outbox {
        tx,
        shared: shared.clone(),
    };
    if ctx
        .service
        .event(Event::Connected { info, outbox })
        .await
        .is_err()
    {
        return; // the service is shutting down
    }
    start(id, Arc::new(stream), rx, shared, ctx, Some(permit), load);
}

/// Serves a frozen connection again: its unsent bytes go out first. The
/// caller already knows the connection (no `Connected` event); the
/// returned outbox is where its output goes from now on.
pub fn adopt(mut frozen: FrozenConn, ctx: &AcceptCtx) -> Outbox {
    let unsent = frozen.take_unsent();
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Shared::new(ctx.limits, &ctx.shutdown);
    if !unsent.is_empty() {
        // Not checked against the limit: these bytes were accepted already.
        shared.queued.fetch_add(unsent.len(), Ordering::AcqRel);
        let _ = tx.send(Bytes::from(unsent));
    }
    // A connection handed over counts against --max-connections like any
    // other; if there are more than it allows, it is served all the same.
    let permit = frozen
        .permit
        .take()
        .or_else(|| ctx.permits.clone().try_acquire_owned().ok());
    start(
        frozen.id,
        frozen.stream,
        rx,
        shared.clone(),
        ctx,
        permit,
        None,
    );
    Outbox { tx, shared }
}

/// A frozen connection the service closed meanwhile: write what it has,
/// then close it (or drop it, if the service aborted it).
pub fn finish(frozen: FrozenConn, tracker: &TaskTracker) {
    let FrozenConn {
        id,
        stream,
        unsent,
        task,
        permit,
    } = frozen;
    let (mut rx, shared) = task.unwrap_or_else(|| {
        let (_, rx) = mpsc::unbounded_channel();
        (
            rx,
            Shared::new(ConnLimits::default(), &CancellationToken::new()),
        )
    });
    tracker.spawn(async move {
        write_loop(id, &stream, &mut rx, &shared, None, unsent).await;
        drop(permit);
    });
}

/// How a reader stopped.
enum ReadEnd {
    /// End of stream, an error, or the connection is closing; the service
    /// has been told (`ReadClosed`).
    Ended,
    /// Frozen: the service has not been told anything.
    Frozen,
}

/// How a writer stopped.
enum WriteEnd {
    /// Everything was written and the channel closed.
    Done,
    /// A write failed, or the connection was aborted.
    Stopped,
    /// Frozen; these bytes were not written.
    Frozen(Vec<u8>),
}

fn start(
    id: u64,
    stream: Arc<TcpStream>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    shared: Arc<Shared>,
    ctx: &AcceptCtx,
    permit: Option<OwnedSemaphorePermit>,
    load: Option<LoadGuard>,
) {
    let service = ctx.service.clone();
    let freeze = ctx.freeze.token();
    ctx.tracker.spawn(async move {
        // Counts this connection against its instance until the task ends.
        let _load = load;
        *shared.direct.lock().expect("direct lock") = Some(stream.clone());
        let (read_end, write_end) = tokio::join!(
            read_loop(id, &stream, &shared, &service, &freeze),
            write_loop(id, &stream, &mut rx, &shared, Some(&freeze), Vec::new()),
        );
        // The writer has stopped: from now on the actor writes nothing
        // directly (this waits for a write in progress). A frozen socket
        // is handed over only after this, and what the writer left is in
        // `unsent` or the channel: the actor writes directly only while
        // nothing is queued, so its bytes are already in order before it.
        shared.end_direct();
        match (read_end, write_end) {
            (ReadEnd::Frozen, WriteEnd::Frozen(unsent)) => {
                let frozen = FrozenConn {
                    id,
                    stream,
                    unsent,
                    task: Some((rx, shared)),
                    permit,
                };
                // If the service is gone, the socket closes here.
                let _ = service.event(Event::Frozen(frozen)).await;
            }
            (ReadEnd::Frozen, _) => {
                // The writer failed or was stopped while reading froze.
                let _ = service.event(Event::ReadClosed(id)).await;
            }
            (ReadEnd::Ended, WriteEnd::Frozen(unsent)) => {
                // The connection is ending: write what it has, then close.
                write_loop(id, &stream, &mut rx, &shared, None, unsent).await;
            }
            (ReadEnd::Ended, _) => {}
        }
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

async fn read_loop(
    id: u64,
    reader: &TcpStream,
    shared: &Shared,
    service: &ServiceHandle,
    freeze: &CancellationToken,
) -> ReadEnd {
    // One long-lived future each (not one per read): creating and
    // dropping them showed up in profiles.
    let stopped = shared.stop_reading.cancelled();
    tokio::pin!(stopped);
    let frozen = freeze.cancelled();
    tokio::pin!(frozen);
    let mut read_size = MIN_READ.min(shared.limits.read_chunk);
    'reading: loop {
        // Backpressure: wait until the client has read enough of its
        // replies, and the service has caught up with this connection.
        while shared.must_wait() {
            tokio::select! {
                biased;
                _ = &mut stopped => break 'reading,
                _ = &mut frozen => return ReadEnd::Frozen,
                _ = shared.wake_reader.notified() => {}
            }
        }
        let ready = tokio::select! {
            biased;
            _ = &mut stopped => break,
            _ = &mut frozen => return ReadEnd::Frozen,
            ready = reader.readable() => ready,
        };
        if let Err(e) = ready {
            tracing::debug!(conn = id, "read failed: {e}");
            break;
        }
        // Allocate only when there is something to read, so an idle
        // connection holds no read buffer; size it by what recent reads
        // brought, so small requests do not cost a large allocation.
        match read_now(reader, read_size) {
            Ok(buf) if buf.is_empty() => break,
            Ok(buf) => {
                let n = buf.len();
                crate::fleet::metrics::read(n);
                read_size = next_read_size(read_size, n, shared.limits.read_chunk);
                shared.unprocessed.fetch_add(n, Ordering::AcqRel);
                if service.event(Event::Data(id, buf.freeze())).await.is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::debug!(conn = id, "read failed: {e}");
                break;
            }
        }
    }
    // Tell the service the connection ended (ignored if it closed it itself).
    let _ = service.event(Event::ReadClosed(id)).await;
    ReadEnd::Ended
}

/// One read of up to `len` bytes from a socket that said it is readable:
/// what it read (empty at the end of the stream), or `WouldBlock` if
/// there was nothing after all.
///
/// A read that does not fill the buffer drained the socket, so it also
/// clears the socket's readiness, as tokio's own `poll_read` does (epoll
/// is edge-triggered: new data raises readiness again). Without that, the
/// next `readable()` returns at once and costs a `recv` that finds
/// nothing: one system call in three on a request-reply connection.
/// `try_io` clears readiness only when its closure says `WouldBlock`, so
/// a short read reports that and hands its bytes back through `got`;
/// readiness raised after the read began is kept (tokio compares ticks).
fn read_now(reader: &TcpStream, len: usize) -> std::io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(len);
    let mut got = None;
    let fd = reader.as_raw_fd();
    let done = reader.try_io(Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        let room = spare.len();
        // SAFETY: `recv` writes at most `room` bytes into the buffer's
        // spare capacity, which it owns for this call.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), room, 0) };
        let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
        if 0 < n && n < room {
            got = Some(n);
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    let n = match (done, got) {
        (_, Some(n)) | (Ok(n), None) => n,
        (Err(e), None) => return Err(e),
    };
    // SAFETY: `recv` initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(n) };
    Ok(buf)
}

/// One write when the socket is writable.
async fn write_some(stream: &TcpStream, data: &[u8]) -> std::io::Result<usize> {
    loop {
        stream.writable().await?;
        match stream.try_write(data) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Ok(n) => {
                crate::fleet::metrics::written(n);
                return Ok(n);
            }
            other => return other,
        }
    }
}

/// Writes what the service sends (after `carry`, bytes left from before a
/// freeze) until the channel closes, then closes the socket's write side.
/// With `freeze`, it stops when that token is cancelled and returns what
/// it did not write, unless the connection is already closing (then it
/// finishes: those bytes are the service's last words to the client).
async fn write_loop(
    id: u64,
    writer: &TcpStream,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    shared: &Shared,
    freeze: Option<&CancellationToken>,
    carry: Vec<u8>,
) -> WriteEnd {
    let mut batch = Vec::new();
    let aborted = shared.abort.cancelled();
    tokio::pin!(aborted);
    let never = CancellationToken::new();
    let frozen = freeze.unwrap_or(&never).cancelled();
    tokio::pin!(frozen);
    let mut freezable = freeze.is_some();
    let mut carry = Some(carry).filter(|c| !c.is_empty());
    loop {
        let owned: Bytes;
        let data: &[u8] = if let Some(c) = carry.take() {
            owned = Bytes::from(c);
            &owned
        } else {
            let first = tokio::select! {
                biased;
                _ = &mut aborted => return WriteEnd::Stopped,
                _ = &mut frozen, if freezable => {
                    if shared.stop_reading.is_cancelled() {
                        freezable = false; // closing: finish instead
                        continue;
                    }
                    return WriteEnd::Frozen(Vec::new());
                }
                msg = rx.recv() => msg,
            };
            let Some(first) = first else { break };
            // Coalesce what is already queued into one write; a lone
            // message is written as it is.
            match rx.try_recv() {
                Ok(second) => gather([first, second], rx, &mut batch),
                Err(_) => {
                    owned = first;
                    &owned
                }
            }
        };
        let mut off = 0;
        while off < data.len() {
            let written = tokio::select! {
                biased;
                _ = &mut aborted => return WriteEnd::Stopped,
                _ = &mut frozen, if freezable => {
                    if shared.stop_reading.is_cancelled() {
                        freezable = false;
                        continue;
                    }
                    return WriteEnd::Frozen(data[off..].to_vec());
                }
                r = write_some(writer, &data[off..]) => r,
            };
            match written {
                Ok(n) if n > 0 => {
                    off += n;
                    shared.written(n);
                }
                Ok(_) => {
                    tracing::debug!(conn = id, "write failed: the socket accepts no more");
                    shared.stop_reading.cancel();
                    return WriteEnd::Stopped;
                }
                Err(e) => {
                    tracing::debug!(conn = id, "write failed: {e}");
                    shared.stop_reading.cancel();
                    return WriteEnd::Stopped;
                }
            }
        }
        batch.clear();
    }
    // The service closed the connection (or it ended): everything queued
    // has been written, and the outbox (the only direct writer) is gone
    // with the channel; close our side.
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(writer),
        nix::sys::socket::Shutdown::Write,
    );
    WriteEnd::Done
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
