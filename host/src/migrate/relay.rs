//! `migrate --relay`: after the commit, the sender keeps its client
//! sockets and the receiver serves each of those connections through a
//! local socket pair; the bytes of every connection cross the link, both
//! ways, until both its directions have ended. The same code runs on
//! both sides: on the sender each local stream is a client's TCP socket,
//! on the receiver it is the relay end of the pair whose other end the
//! service reads and writes as if it were the client.
//!
//! Frames on the link: `Data { id }` with the bytes as payload, and
//! `Eof { id }` when one side's local stream has no more to send (its
//! reader saw the end, or an error): the other side then shuts down its
//! local stream's write side. A connection ends when both directions have;
//! the relay ends, and closes the link, when every connection has. If the
//! link breaks, every local stream is closed (a client then sees its
//! connection close, the guest sees `on-close`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use super::Message;
use super::link::{Link, Stream};

/// The most bytes one `Data` frame carries.
const CHUNK: usize = 64 * 1024;
/// A relayed connection's read buffer to begin with.
const FIRST_READ: usize = 4 * 1024;
/// Frames queued for one connection's local stream before the link's
/// reader waits for it (backpressure on the whole link).
const QUEUED: usize = 16;

/// A local stream of the relay: a client's socket, or a socket pair's end.
pub(crate) type Local = Box<dyn Stream>;

/// How many connections this process relays now (both roles).
static RELAYING: AtomicUsize = AtomicUsize::new(0);
static RELAY_DONE: Notify = Notify::const_new();

/// How many connections this process is relaying for another host.
pub fn relaying() -> usize {
    RELAYING.load(Ordering::Relaxed)
}

/// Waits until this process relays no connection any more.
pub async fn wait_idle() {
    loop {
        let done = RELAY_DONE.notified();
        if relaying() == 0 {
            return;
        }
        done.await;
    }
}

/// Relays `conns` over `link` until every connection has ended both ways
/// (or the link breaks).
pub(crate) async fn run(link: Link, conns: Vec<(u64, Local)>) {
    let count = conns.len();
    if count == 0 {
        link.close().await;
        return;
    }
    RELAYING.fetch_add(count, Ordering::Relaxed);
    let peer = link.peer;
    let (mut rx, mut tx) = link.into_split();
    let (frames, mut outgoing) = mpsc::channel::<(Message, Bytes)>(1024);
    // Every connection's two directions; the relay ends at zero.
    let open = Arc::new(AtomicUsize::new(2 * count));
    let all_done = Arc::new(Notify::new());
    let writer = tokio::spawn(async move {
        while let Some((message, payload)) = outgoing.recv().await {
            if tx.send(&message, &[&payload]).await.is_err() {
                break;
            }
        }
        tx.close().await;
    });
    let mut inbound: HashMap<u64, mpsc::Sender<Bytes>> = HashMap::with_capacity(count);
    let mut readers = Vec::with_capacity(count);
    for (id, local) in conns {
        let (mut reader, mut writer_half) = tokio::io::split(local);
        let (to_local, mut queued) = mpsc::channel::<Bytes>(QUEUED);
        inbound.insert(id, to_local);
        // Local -> link.
        let (frames, open_here, done) = (frames.clone(), open.clone(), all_done.clone());
        let reading = tokio::spawn(async move {
            // Small while the connection is quiet (thousands may be
            // relayed), doubled up to CHUNK while reads fill it.
            let mut buf = vec![0u8; FIRST_READ];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        if n == buf.len() && buf.len() < CHUNK {
                            buf.resize(buf.len() * 2, 0);
                        } else if n < buf.len() / 4 && buf.len() > FIRST_READ {
                            buf.truncate(buf.len() / 2);
                            buf.shrink_to_fit();
                        }
                        if frames.send((Message::Data { id }, data)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = frames.send((Message::Eof { id }, Bytes::new())).await;
            if open_here.fetch_sub(1, Ordering::AcqRel) == 1 {
                done.notify_one();
            }
        });
        readers.push(reading.abort_handle());
        // Link -> local: ends when the other side says Eof (the sender is
        // dropped) or the link breaks.
        tokio::spawn(async move {
            while let Some(data) = queued.recv().await {
                if writer_half.write_all(&data).await.is_err() {
                    break;
                }
            }
            let _ = writer_half.shutdown().await;
        });
    }
    drop(frames);
    loop {
        tokio::select! {
            received = rx.recv::<Message>(CHUNK as u64) => match received {
                Ok((Message::Data { id }, payload)) => {
                    if let Some(to_local) = inbound.get(&id) {
                        // A local stream that is gone drops its bytes.
                        let _ = to_local.send(Bytes::from(payload)).await;
                    }
                }
                Ok((Message::Eof { id }, _)) => {
                    if inbound.remove(&id).is_some()
                        && open.fetch_sub(1, Ordering::AcqRel) == 1
                    {
                        break;
                    }
                }
                Ok((other, _)) => tracing::warn!("relay from {peer}: unexpected {other:?}"),
                Err(e) => {
                    if open.load(Ordering::Acquire) > 0 {
                        tracing::warn!(
                            "relay to {peer} broke with {} connections open: closing them ({e:#})",
                            inbound.len()
                        );
                    }
                    break;
                }
            },
            _ = all_done.notified() => {
                if open.load(Ordering::Acquire) == 0 {
                    break;
                }
            }
        }
    }
    // After a broken link, readers still waiting on their local streams
    // stop (their streams close); after a clean end they have all ended.
    // Dropping the senders ends every link -> local task (shutting down
    // the local write sides); the writer ends once every reader has.
    for reading in readers {
        reading.abort();
    }
    drop(inbound);
    let _ = writer.await;
    RELAYING.fetch_sub(count, Ordering::Relaxed);
    RELAY_DONE.notify_waiters();
    tracing::info!("relay to {peer} ended ({count} connections)");
}
