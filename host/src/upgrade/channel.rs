//! The handoff channel: a Unix `SOCK_SEQPACKET` socket pair between the old
//! and the new host process.
//!
//! Sequenced packets keep message boundaries, so file descriptors passed
//! with `SCM_RIGHTS` arrive with exactly the packet they were sent with
//! (on a stream socket they would attach to whatever bytes the reader
//! happens to read). On it:
//!
//! * a message is a head packet (`M`, the JSON length, the payload length)
//!   followed by body packets (`B`) of at most [`CHUNK`] bytes carrying the
//!   JSON and then the binary payload; the receiver checks every length
//!   against the head and against its limit;
//! * descriptors go in `F` packets of at most [`FDS_PER_PACKET`], each
//!   carrying its count; they are received close-on-exec, and a packet
//!   whose control data was truncated (the kernel drops descriptors that do
//!   not fit) is an error, not a silent loss.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, ensure};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::unix::AsyncFd;

/// Largest body packet, well under the default socket buffer.
pub const CHUNK: usize = 64 * 1024;

/// Descriptors per packet: the kernel's limit (`SCM_MAX_FD`) is 253.
pub const FDS_PER_PACKET: usize = 250;

/// Largest JSON part of a message (a manifest of 10,000 connections is
/// about 1 MB).
pub const MAX_JSON: usize = 256 << 20;

const HEAD: u8 = b'M';
const BODY: u8 = b'B';
const FDS: u8 = b'F';

/// The other end is gone (closed, or its process died).
#[derive(Debug, thiserror::Error)]
#[error("the other process closed the handoff channel")]
pub struct ChannelClosed;

/// One end of the handoff channel.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    /// A connected pair: this process's end, and the end for the child
    /// (close-on-exec; the spawner clears that flag in the child only).
    pub fn pair() -> Result<(Channel, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .context("creating the handoff socket pair")?;
        Ok((Channel::from_fd(ours)?, theirs))
    }

    /// Wraps an inherited end (the new process's side).
    pub fn from_fd(fd: OwnedFd) -> Result<Channel> {
        use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).context("handoff socket")?;
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).context("handoff socket")?;
        let ty = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
            .context("the handoff descriptor is not a socket")?;
        ensure!(
            ty == SockType::SeqPacket,
            "the handoff descriptor is a {ty:?} socket, not a sequenced-packet one"
        );
        // SAFETY: an `OwnedFd` is an open descriptor that nothing else
        // closes or replaces while the `AsyncFd` owns it.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| anyhow::anyhow!("registering the handoff socket: {e}"))?;
        Ok(Channel { fd })
    }

    /// Sends `message` as JSON, followed by `payload` (the parts in order).
    pub async fn send<T: Serialize>(&self, message: &T, payload: &[&[u8]]) -> Result<()> {
        let json = serde_json::to_vec(message)?;
        let payload_len: usize = payload.iter().map(|p| p.len()).sum();
        let mut head = vec![HEAD];
        head.extend_from_slice(&(json.len() as u64).to_be_bytes());
        head.extend_from_slice(&(payload_len as u64).to_be_bytes());
        self.send_packet(&head, &[]).await?;
        let mut packet = Vec::with_capacity(CHUNK + 1);
        packet.push(BODY);
        for part in std::iter::once(json.as_slice()).chain(payload.iter().copied()) {
            let mut rest = part;
            while !rest.is_empty() {
                let take = (CHUNK + 1 - packet.len()).min(rest.len());
                packet.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if packet.len() == CHUNK + 1 {
                    self.send_packet(&packet, &[]).await?;
                    packet.truncate(1);
                }
            }
        }
        if packet.len() > 1 {
            self.send_packet(&packet, &[]).await?;
        }
        Ok(())
    }

    /// Receives a message and its payload; refuses a payload over
    /// `max_payload` bytes before reading it.
    pub async fn recv<T: DeserializeOwned>(&self, max_payload: u64) -> Result<(T, Vec<u8>)> {
        let (head, fds) = self.recv_packet().await?;
        ensure!(fds.is_empty(), "descriptors arrived with a message head");
        ensure!(
            head.len() == 17 && head[0] == HEAD,
            "expected a message head, got a packet of kind {:?} and {} bytes",
            head.first().map(|&b| b as char),
            head.len()
        );
        let json_len = u64::from_be_bytes(head[1..9].try_into().expect("8 bytes"));
        let payload_len = u64::from_be_bytes(head[9..17].try_into().expect("8 bytes"));
        ensure!(
            json_len <= MAX_JSON as u64,
            "message of {json_len} bytes is over the limit of {MAX_JSON}"
        );
        ensure!(
            payload_len <= max_payload,
            "payload of {payload_len} bytes is over the limit of {max_payload}"
        );
        let total = (json_len + payload_len) as usize;
        let mut body = Vec::with_capacity(total);
        while body.len() < total {
            let (packet, fds) = self.recv_packet().await?;
            ensure!(fds.is_empty(), "descriptors arrived inside a message body");
            ensure!(
                packet.first() == Some(&BODY),
                "message body cut short: {} of {total} bytes",
                body.len()
            );
            ensure!(
                body.len() + packet.len() - 1 <= total,
                "message body longer than its head says ({total} bytes)"
            );
            body.extend_from_slice(&packet[1..]);
        }
        let payload = body.split_off(json_len as usize);
        let message = serde_json::from_slice(&body).context("malformed handoff message")?;
        Ok((message, payload))
    }

    /// Sends descriptors in batches the kernel accepts.
    pub async fn send_fds(&self, fds: &[RawFd]) -> Result<()> {
        for batch in fds.chunks(FDS_PER_PACKET) {
            let mut packet = vec![FDS];
            packet.extend_from_slice(&(batch.len() as u32).to_be_bytes());
            self.send_packet(&packet, batch).await?;
        }
        Ok(())
    }

    /// Receives exactly `count` descriptors.
    pub async fn recv_fds(&self, count: usize) -> Result<Vec<OwnedFd>> {
        let mut all = Vec::with_capacity(count);
        while all.len() < count {
            let (packet, fds) = self.recv_packet().await?;
            ensure!(
                packet.len() == 5 && packet[0] == FDS,
                "expected descriptors, got a packet of {} bytes ({} of {count} descriptors received)",
                packet.len(),
                all.len()
            );
            let announced = u32::from_be_bytes(packet[1..5].try_into().expect("4 bytes")) as usize;
            ensure!(
                fds.len() == announced,
                "a descriptor batch announced {announced} descriptors but carried {}",
                fds.len()
            );
            all.extend(fds);
        }
        ensure!(
            all.len() == count,
            "received {} descriptors, expected {count}",
            all.len()
        );
        Ok(all)
    }

    async fn send_packet(&self, data: &[u8], fds: &[RawFd]) -> Result<()> {
        loop {
            let mut ready = self.fd.writable().await?;
            let sent = ready.try_io(|fd| {
                let iov = [IoSlice::new(data)];
                let rights = [ControlMessage::ScmRights(fds)];
                let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
                sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if is_closed(&e) => return Err(ChannelClosed.into()),
                Ok(Err(e)) => return Err(e).context("sending on the handoff channel"),
                Err(_would_block) => continue,
            }
        }
    }

    async fn recv_packet(&self) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; CHUNK + 64];
        loop {
            let mut ready = self.fd.readable().await?;
            let received = ready.try_io(|fd| receive(fd.as_raw_fd(), &mut buf));
            match received {
                Ok(Ok((0, _, _))) => return Err(ChannelClosed.into()),
                Ok(Err(e)) if is_closed(&e) => return Err(ChannelClosed.into()),
                Ok(Ok((n, fds, flags))) => {
                    ensure!(
                        !flags.contains(MsgFlags::MSG_CTRUNC),
                        "descriptors were lost: the control data of a handoff packet was truncated"
                    );
                    ensure!(
                        !flags.contains(MsgFlags::MSG_TRUNC),
                        "a handoff packet was larger than {} bytes",
                        buf.len()
                    );
                    buf.truncate(n);
                    return Ok((buf, fds));
                }
                Ok(Err(e)) => return Err(e).context("receiving on the handoff channel"),
                Err(_would_block) => continue,
            }
        }
    }
}

/// One `recvmsg`: the byte count, the descriptors (owned at once, so they
/// are closed on any later error) and the flags.
fn receive(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, MsgFlags)> {
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_PACKET]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    Ok((msg.bytes, fds, msg.flags))
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_with_large_payloads_and_many_descriptors_cross_intact() {
        let (a, b) = Channel::pair().unwrap();
        let b = Channel::from_fd(b).unwrap();
        let payload: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i % 251) as u8).collect();
        let files: Vec<std::fs::File> = (0..600)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let send = async {
            a.send(
                &vec!["hello".to_string()],
                &[&payload[..10], &payload[10..]],
            )
            .await
            .unwrap();
            a.send_fds(&raw).await.unwrap();
        };
        let recv = async {
            let (msg, got): (Vec<String>, Vec<u8>) = b.recv(1 << 30).await.unwrap();
            let fds = b.recv_fds(600).await.unwrap();
            (msg, got, fds)
        };
        let ((), (msg, got, fds)) = tokio::join!(send, recv);
        assert_eq!(msg, vec!["hello".to_string()]);
        assert_eq!(got, payload);
        assert_eq!(fds.len(), 600);
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & nix::libc::FD_CLOEXEC,
            0,
            "received fds are close-on-exec"
        );
    }

    #[tokio::test]
    async fn a_payload_over_the_limit_and_a_closed_peer_are_errors() {
        let (a, b) = Channel::pair().unwrap();
        let b = Channel::from_fd(b).unwrap();
        a.send(&1u32, &[&[0u8; 100]]).await.unwrap();
        let err = b.recv::<u32>(99).await.unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        let (a, b) = Channel::pair().unwrap();
        let b = Channel::from_fd(b).unwrap();
        drop(a);
        let err = b.recv::<u32>(1 << 20).await.unwrap_err();
        assert!(err.to_string().contains("closed"), "{err:#}");
    }
}
