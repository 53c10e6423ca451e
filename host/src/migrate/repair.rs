//! Freezing an established TCP connection and recreating it in another
//! kernel, with Linux's `TCP_REPAIR` (the sequence CRIU's libsoccr uses;
//! `shared/notes/tcp-repair.md` has what was measured here).
//!
//! In repair mode a socket is silent: it sends nothing (no ACK, no FIN,
//! no RST, even when closed) and its sequence numbers, options and queues
//! can be read and written. [`freeze`] reads them from a socket in repair
//! mode; [`restore`] makes a socket in repair mode that continues the
//! connection (same addresses, sequence numbers, options, window and
//! sent-but-unacknowledged bytes); [`leave`] brings it back to life: the
//! kernel sends a window probe and the peer answers at once.
//!
//! What the two kernel queues become: the receive queue (bytes the client
//! sent, that the kernel acknowledged and nobody read) is read out and
//! joins the host's own unread bytes, so the new socket starts with an
//! empty receive queue at the sequence number after them. The send queue
//! splits in two: the part already on the wire but not acknowledged must
//! be restored in repair mode (the peer may acknowledge it, or the kernel
//! may have to retransmit it); the part never sent joins the host's own
//! unsent bytes and is written normally once the socket is out of repair
//! mode (written in repair mode, it would wait for a retransmission timer).
//!
//! Needs CAP_NET_ADMIN. IPv4, ESTABLISHED connections only; congestion
//! state (cwnd, RTT estimate) and socket options other than the ones read
//! here are not carried: the restored connection starts slow, and the
//! host sets its own options again.

use std::io;
use std::mem::size_of;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

/// `TCP_ESTABLISHED` (linux/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
/// The largest refill of a queue in one `send` (the kernel takes a
/// repair-mode send as one segment-sized piece at a time).
const REFILL_CHUNK: usize = 64 * 1024;

/// `struct tcp_repair_opt` (linux/tcp.h).
#[repr(C)]
struct RepairOpt {
    code: u32,
    val: u32,
}

/// `struct tcp_repair_window` (linux/tcp.h): the send and receive
/// windows, carried so that the new socket neither shrinks a window the
/// peer was promised nor sends beyond the peer's.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// One connection's TCP state: what [`restore`] needs besides the bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TcpImage {
    pub local: SocketAddrV4,
    pub peer: SocketAddrV4,
    /// The sequence number the peer sends next (after the receive queue,
    /// which travels as unread bytes).
    pub recv_seq: u32,
    /// The first sequence number not yet acknowledged by the peer: where
    /// the restored send queue (the unacknowledged bytes) starts.
    pub send_seq: u32,
    /// Length of the sent-but-unacknowledged bytes that follow.
    pub unacked_len: u32,
    pub mss: u32,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub sack: bool,
    /// The peer's timestamp clock offset is kept by carrying our clock's
    /// value (`TCP_TIMESTAMP`), when timestamps are on.
    pub timestamps: bool,
    pub timestamp: u32,
    pub window: Window,
}

/// A connection read out of a socket in repair mode.
#[derive(Debug)]
pub struct Frozen {
    pub image: TcpImage,
    /// The receive queue: received and acknowledged, not read.
    pub unread: Vec<u8>,
    /// Sent and not acknowledged: restored in repair mode.
    pub unacked: Vec<u8>,
    /// Queued and never sent: written after repair mode ends.
    pub unsent: Vec<u8>,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    match r {
        -1 => Err(io::Error::last_os_error()),
        r => Ok(r),
    }
}

fn set<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn get<T: Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`.
    check(unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut T).cast(), &mut len) })?;
    Ok(value)
}

fn ioctl_len(fd: RawFd, request: libc::c_ulong) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: these requests write one int.
    check(unsafe { libc::ioctl(fd, request as _, &mut n) })?;
    Ok(n.max(0) as usize)
}

fn tcp<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    set(fd, libc::IPPROTO_TCP, name, value)
}

/// Puts a socket in repair mode: from now on it sends nothing.
pub fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    tcp(fd.as_raw_fd(), libc::TCP_REPAIR, &TCP_REPAIR_ON)
}

/// Takes a socket out of repair mode: it speaks again (a window probe
/// resynchronises the peer at once). `SO_REUSEADDR` is set again (leaving
/// repair mode can reset it, and a restored socket would then block the
/// listener's port after it closes).
pub fn leave(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    tcp(fd, libc::TCP_REPAIR, &TCP_REPAIR_OFF)?;
    set(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1 as &libc::c_int)
}

fn v4(addr: SocketAddr, what: &str) -> io::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => Ok(SocketAddrV4::new(ip, a.port())),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{what} {a} is IPv6: only IPv4 connections can be moved"),
            )),
        },
    }
}

/// Peeks `len` bytes of the queue `queue` (repair mode selects it).
fn peek_queue(fd: RawFd, queue: libc::c_int, len: usize) -> io::Result<Vec<u8>> {
    tcp(fd, libc::TCP_REPAIR_QUEUE, &queue)?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        // SAFETY: writes at most `len - got` bytes after `got`.
        let n = check(unsafe {
            libc::recv(
                fd,
                buf[got..].as_mut_ptr().cast(),
                len - got,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            ) as libc::c_int
        })? as usize;
        if n == 0 {
            break;
        }
        // A peek reads from the start each time: one call must take it
        // all, or the queue moved under us.
        got += n;
        if got < len {
            return Err(io::Error::other(format!(
                "the kernel queue gave {got} of {len} bytes in one peek"
            )));
        }
    }
    buf.truncate(got);
    Ok(buf)
}

fn queue_seq(fd: RawFd, queue: libc::c_int) -> io::Result<u32> {
    tcp(fd, libc::TCP_REPAIR_QUEUE, &queue)?;
    get::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)
}

/// Reads a connection out of `fd`, which must be in repair mode
/// ([`enter`]). The socket is left as it was: [`leave`] resumes it.
pub fn freeze(fd: BorrowedFd<'_>) -> io::Result<Frozen> {
    let sock = fd.as_raw_fd();
    let info: libc::tcp_info = {
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes of tcp_info.
        check(unsafe {
            libc::getsockopt(
                sock,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        })?;
        info
    };
    if info.tcpi_state != TCP_ESTABLISHED {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the connection is in TCP state {}, not ESTABLISHED (a closing connection cannot be moved)",
                info.tcpi_state
            ),
        ));
    }
    let borrowed = socket2::SockRef::from(&fd);
    let local = v4(
        borrowed
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))?,
        "local address",
    )?;
    let peer = v4(
        borrowed
            .peer_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))?,
        "peer",
    )?;
    let outq = ioctl_len(sock, libc::TIOCOUTQ as libc::c_ulong)?;
    let unsent_len = ioctl_len(sock, SIOCOUTQNSD)?;
    let inq = ioctl_len(sock, libc::FIONREAD as libc::c_ulong)?;
    let mss = get::<u32>(sock, libc::IPPROTO_TCP, libc::TCP_MAXSEG)?;
    let timestamps = info.tcpi_options & TCPI_OPT_TIMESTAMPS != 0;
    let timestamp = get::<u32>(sock, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)?;
    let window = get::<Window>(sock, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW)?;
    let recv_end = queue_seq(sock, TCP_RECV_QUEUE)?;
    let unread = peek_queue(sock, TCP_RECV_QUEUE, inq)?;
    let send_end = queue_seq(sock, TCP_SEND_QUEUE)?;
    let mut send_queue = peek_queue(sock, TCP_SEND_QUEUE, outq)?;
    if unread.len() != inq || send_queue.len() != outq || unsent_len > outq {
        return Err(io::Error::other(format!(
            "the kernel queues changed while frozen (receive {} of {inq}, send {} of {outq}, unsent {unsent_len})",
            unread.len(),
            send_queue.len()
        )));
    }
    let unsent = send_queue.split_off(outq - unsent_len);
    let wscale = info.tcpi_snd_rcv_wscale;
    Ok(Frozen {
        image: TcpImage {
            local,
            peer,
            recv_seq: recv_end,
            send_seq: send_end.wrapping_sub(outq as u32),
            unacked_len: send_queue.len() as u32,
            mss,
            // Without window scaling both are 0 (no option to restore).
            snd_wscale: if info.tcpi_options & TCPI_OPT_WSCALE != 0 {
                wscale & 0x0f
            } else {
                0
            },
            rcv_wscale: if info.tcpi_options & TCPI_OPT_WSCALE != 0 {
                wscale >> 4
            } else {
                0
            },
            sack: info.tcpi_options & TCPI_OPT_SACK != 0,
            timestamps,
            timestamp,
            window,
        },
        unread,
        unacked: send_queue,
        unsent,
    })
}

/// Makes a socket in repair mode that continues the connection `image`
/// describes, with `unacked` (its sent-but-unacknowledged bytes) in its
/// send queue. The local address need not be up yet (`IP_TRANSPARENT`):
/// the socket sends nothing until [`leave`].
pub fn restore(image: &TcpImage, unacked: &[u8]) -> io::Result<OwnedFd> {
    if unacked.len() != image.unacked_len as usize {
        return Err(io::Error::other(format!(
            "{} unacknowledged bytes for a connection that lists {}",
            unacked.len(),
            image.unacked_len
        )));
    }
    // SAFETY: a new socket; owned from here on.
    let fd = unsafe {
        OwnedFd::from_raw_fd(check(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?)
    };
    let sock = fd.as_raw_fd();
    tcp(sock, libc::TCP_REPAIR, &TCP_REPAIR_ON)?;
    set(
        sock,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        &1 as &libc::c_int,
    )?;
    // Binding to an address this machine does not have yet.
    set(sock, libc::SOL_IP, libc::IP_TRANSPARENT, &1 as &libc::c_int)?;
    let sref = socket2::SockRef::from(&fd);
    sref.bind(&SocketAddr::V4(image.local).into())?;
    tcp(sock, libc::TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE)?;
    tcp(sock, libc::TCP_QUEUE_SEQ, &image.recv_seq)?;
    tcp(sock, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE)?;
    tcp(sock, libc::TCP_QUEUE_SEQ, &image.send_seq)?;
    // In repair mode, connect sends no SYN: the socket is ESTABLISHED.
    sref.connect(&SocketAddr::V4(image.peer).into())?;
    let mut opts = vec![RepairOpt {
        code: TCPOPT_MSS,
        val: image.mss,
    }];
    if image.sack {
        opts.push(RepairOpt {
            code: TCPOPT_SACK_PERM,
            val: 0,
        });
    }
    if image.snd_wscale != 0 || image.rcv_wscale != 0 {
        opts.push(RepairOpt {
            code: TCPOPT_WINDOW,
            val: u32::from(image.snd_wscale) | (u32::from(image.rcv_wscale) << 16),
        });
    }
    if image.timestamps {
        opts.push(RepairOpt {
            code: TCPOPT_TIMESTAMP,
            val: 0,
        });
    }
    // SAFETY: `opts` is a live array of `opts.len()` tcp_repair_opt.
    check(unsafe {
        libc::setsockopt(
            sock,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            (opts.len() * size_of::<RepairOpt>()) as libc::socklen_t,
        )
    })?;
    if image.timestamps {
        tcp(sock, libc::TCP_TIMESTAMP, &image.timestamp)?;
    }
    tcp(sock, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE)?;
    for chunk in unacked.chunks(REFILL_CHUNK) {
        let mut sent = 0;
        while sent < chunk.len() {
            // SAFETY: reads `chunk.len() - sent` bytes of `chunk`.
            let n = check(unsafe {
                libc::send(
                    sock,
                    chunk[sent..].as_ptr().cast(),
                    chunk.len() - sent,
                    libc::MSG_DONTWAIT,
                ) as libc::c_int
            })?;
            sent += n as usize;
        }
    }
    tcp(sock, libc::TCP_REPAIR_WINDOW, &image.window)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    use super::*;

    /// A loopback connection (client, server), or `None` with a SKIPPED
    /// line for `test` where this process may not use repair mode.
    fn connected(test: &str) -> Option<(TcpStream, TcpStream)> {
        if !can_repair() {
            eprintln!("SKIPPED {test}: TCP_REPAIR needs CAP_NET_ADMIN (run as root)");
            return None;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        Some((client, server))
    }

    /// Whether this process may use repair mode (CAP_NET_ADMIN).
    fn can_repair() -> bool {
        let s = TcpStream::connect(
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap(),
        );
        let Ok(s) = s else { return false };
        enter(s.as_fd()).is_ok()
    }

    /// A connection frozen with bytes in both kernel queues, closed in
    /// repair mode (silently) and recreated in a new socket: the client
    /// notices nothing, gets the bytes that were unsent, and the bytes it
    /// had sent come back as unread.
    #[test]
    fn a_connection_survives_freeze_close_and_restore() {
        let Some((mut client, mut server)) =
            connected("a_connection_survives_freeze_close_and_restore")
        else {
            return;
        };
        // Both ways work before.
        client.write_all(b"ping").unwrap();
        let mut four = [0u8; 4];
        server.read_exact(&mut four).unwrap();
        server.write_all(b"pong").unwrap();
        client.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"pong");
        // The client sends bytes nobody reads: the receive queue.
        client.write_all(b"hello from the client").unwrap();
        // The server sends more than the client reads: what the client's
        // window does not take stays in the server's send queue, unsent.
        let pattern = |i: usize| (i % 251) as u8;
        server.set_nonblocking(true).unwrap();
        let mut written = 0usize;
        while written < 32 << 20 {
            let chunk: Vec<u8> = (written..written + 65536).map(pattern).collect();
            match server.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        enter(server.as_fd()).unwrap();
        let frozen = freeze(server.as_fd()).unwrap();
        assert_eq!(frozen.unread, b"hello from the client");
        assert!(
            !frozen.unsent.is_empty(),
            "a full window leaves bytes unsent ({written} written)"
        );
        // Close in repair mode: the client must see no FIN and no RST.
        drop(server);
        let image: TcpImage =
            serde_json::from_str(&serde_json::to_string(&frozen.image).unwrap()).unwrap();
        let restored = restore(&image, &frozen.unacked).unwrap();
        leave(restored.as_fd()).unwrap();
        let mut server = TcpStream::from(restored);
        // The unsent bytes are written normally, from another thread while
        // the client reads everything, in order.
        let unsent = frozen.unsent.clone();
        let writer = std::thread::spawn(move || {
            server.write_all(&unsent).unwrap();
            server
        });
        let mut got = vec![0u8; written];
        client.read_exact(&mut got).unwrap();
        let first_wrong = got.iter().enumerate().position(|(i, b)| *b != pattern(i));
        assert_eq!(first_wrong, None, "{written} bytes arrive in order");
        let mut server = writer.join().unwrap();
        // And on, both ways.
        client.write_all(b"again").unwrap();
        let mut five = [0u8; 5];
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        server.read_exact(&mut five).unwrap();
        assert_eq!(&five, b"again");
        server.write_all(b"bye").unwrap();
        let mut three = [0u8; 3];
        client.read_exact(&mut three).unwrap();
        assert_eq!(&three, b"bye");
    }

    /// A socket that left repair mode without being moved serves on: the
    /// sender's way back.
    #[test]
    fn leaving_repair_mode_resumes_the_connection() {
        let Some((mut client, mut server)) =
            connected("leaving_repair_mode_resumes_the_connection")
        else {
            return;
        };
        enter(server.as_fd()).unwrap();
        client.write_all(b"while frozen").unwrap();
        let frozen = freeze(server.as_fd()).unwrap();
        leave(server.as_fd()).unwrap();
        // The bytes were only peeked: they are still there to read.
        let mut got = vec![0u8; frozen.unread.len()];
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, b"while frozen");
        server.write_all(b"ok").unwrap();
        let mut two = [0u8; 2];
        client.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ok");
    }
}
