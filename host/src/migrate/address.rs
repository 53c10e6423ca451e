//! The service address of `migrate --move-ip`: finding the interface
//! that carries it, removing and adding it (netlink, through
//! `rtnetlink`), announcing it (a gratuitous ARP, so that the segment's
//! ARP caches point at the new machine at once, not after their entries
//! expire), and checking the capabilities all of that takes.

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::TryStreamExt;
use nix::ifaddrs::getifaddrs;
use serde::{Deserialize, Serialize};

/// An IPv4 address with its prefix length: `10.0.0.100/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddr {
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

impl FromStr for ServiceAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: expected IP/PREFIX, e.g. 10.0.0.100/24"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("`{ip}` is not an IPv4 address (only IPv4 can move)"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| format!("`{prefix}` is not a prefix length (1 to 32)"))?;
        Ok(ServiceAddr { ip, prefix })
    }
}

impl ServiceAddr {
    fn contains(&self, other: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        u32::from(self.ip) & mask == u32::from(other) & mask
    }
}

/// A network interface: its index, name and hardware address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
}

fn interface(name: &str) -> Result<Interface> {
    let index = nix::net::if_::if_nametoindex(name)
        .with_context(|| format!("interface {name} has no index"))?;
    let mac = getifaddrs()?
        .filter(|i| i.interface_name == name)
        .find_map(|i| {
            i.address
                .as_ref()
                .and_then(|a| a.as_link_addr())
                .and_then(|l| l.addr())
        })
        .ok_or_else(|| anyhow!("interface {name} has no hardware address (not Ethernet?)"))?;
    Ok(Interface {
        index,
        name: name.to_string(),
        mac,
    })
}

/// The interface that carries `ip` on this machine, if one does.
pub fn holding(ip: Ipv4Addr) -> Result<Option<Interface>> {
    let name = getifaddrs()?.find_map(|i| {
        let v4 = i.address.as_ref()?.as_sockaddr_in()?.ip();
        (v4 == ip).then_some(i.interface_name)
    });
    name.map(|n| interface(&n)).transpose()
}

/// The interface on the service address's segment: the one with an
/// address of its own in `addr`'s subnet (the receiving side).
pub fn on_segment(addr: &ServiceAddr) -> Result<Interface> {
    let name = getifaddrs()?
        .find_map(|i| {
            let v4 = i.address.as_ref()?.as_sockaddr_in()?.ip();
            (v4 != addr.ip && addr.contains(v4)).then_some(i.interface_name)
        })
        .ok_or_else(|| {
            anyhow!(
                "no interface here has an address in {addr}'s subnet: the service address can \
                 only move between machines on one segment (give this machine an address there)"
            )
        })?;
    interface(&name)
}

async fn handle() -> Result<rtnetlink::Handle> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Removes the address from the interface (`ip addr del`).
pub async fn remove(addr: &ServiceAddr, on: &Interface) -> Result<()> {
    let handle = handle().await?;
    let mut found = handle
        .address()
        .get()
        .set_link_index_filter(on.index)
        .set_address_filter(IpAddr::V4(addr.ip))
        .execute();
    let Some(message) = found.try_next().await? else {
        bail!("{} is not on {} any more", addr.ip, on.name);
    };
    handle
        .address()
        .del(message)
        .execute()
        .await
        .with_context(|| format!("removing {addr} from {}", on.name))
}

/// Adds the address to the interface (`ip addr add`); an address already
/// there is left as it is.
pub async fn add(addr: &ServiceAddr, on: &Interface) -> Result<()> {
    let handle = handle().await?;
    match handle
        .address()
        .add(on.index, IpAddr::V4(addr.ip), addr.prefix)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("adding {addr} to {}", on.name))),
    }
}

/// Broadcasts a gratuitous ARP for `ip` from the interface, as a request
/// ("who has IP? tell IP", sender and target both `ip`) and as a reply:
/// every host on the segment updates its cache entry for `ip` to this
/// interface's address (some hosts heed only one of the two forms).
///
/// Closing a packet socket waits for the kernel's RCU grace period (about
/// 10 ms measured here), so the socket is closed on another thread: the
/// announcement is out when this returns, the cleanup is not in the way.
pub fn announce(ip: Ipv4Addr, on: &Interface) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: a new socket, owned from here on.
    let fd = unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = on.index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let mut result = Ok(());
    for (op, target_mac) in [(1u16, [0u8; 6]), (2u16, on.mac)] {
        let mut arp = Vec::with_capacity(28);
        arp.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
        arp.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        arp.extend_from_slice(&[6, 4]);
        arp.extend_from_slice(&op.to_be_bytes());
        arp.extend_from_slice(&on.mac);
        arp.extend_from_slice(&ip.octets());
        arp.extend_from_slice(&target_mac);
        arp.extend_from_slice(&ip.octets());
        // SAFETY: `arp` and `to` are live for the call, with the sizes given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                arp.as_ptr().cast(),
                arp.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            result = Err(std::io::Error::last_os_error());
        }
    }
    std::thread::spawn(move || drop(fd));
    result
}

/// A listening socket on `addr`, which need not be an address of this
/// machine yet (`IP_FREEBIND`): the receiver binds the service's
/// listeners before the address arrives, and they accept once it does.
pub fn listen_ahead(addr: std::net::SocketAddr) -> std::io::Result<std::os::fd::OwnedFd> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    let one: libc::c_int = 1;
    // SAFETY: `one` is a live int for the call.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_IP,
            libc::IP_FREEBIND,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Whether this process may move an address and its connections:
/// CAP_NET_ADMIN (repair mode, addresses) and CAP_NET_RAW (ARP).
pub fn check_capabilities() -> Result<(), String> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status to check capabilities: {e}"))?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or("/proc/self/status shows no CapEff line")?;
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_NET_RAW, "CAP_NET_RAW"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    match missing.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "--move-ip needs {} (moving connections uses TCP_REPAIR, moving the address uses \
             netlink and ARP): run as root or grant them (systemd: AmbientCapabilities=)",
            missing.join(" and ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses_parse_and_say_what_is_wrong() {
        let a: ServiceAddr = "10.0.0.100/24".parse().unwrap();
        assert_eq!(a.to_string(), "10.0.0.100/24");
        assert!(a.contains("10.0.0.7".parse().unwrap()));
        assert!(!a.contains("10.0.1.7".parse().unwrap()));
        assert!(
            "10.0.0.100"
                .parse::<ServiceAddr>()
                .unwrap_err()
                .contains("IP/PREFIX")
        );
        assert!(
            "::1/64"
                .parse::<ServiceAddr>()
                .unwrap_err()
                .contains("IPv4")
        );
        assert!(
            "10.0.0.1/33"
                .parse::<ServiceAddr>()
                .unwrap_err()
                .contains("prefix")
        );
    }
}

/// A receiver owes its instance a return out of FAULT (a failed move put
/// it there; [`Keepalived::owe`]).
static OWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// keepalived owns the service address (`migrate --keepalived`): wasmhost
/// never adds or removes it, but moves it by putting its own keepalived
/// instance into FAULT and out of it through a `vrrp_track_file` with
/// weight 0 (`serve --keepalived-track FILE`). keepalived re-adds an
/// address removed behind its back, so the two must never both manage one
/// address. The sequence (measured in `shared/notes/fleet.md`):
///
/// 1. the receiver holds its own instance in FAULT ([`Keepalived::fault`])
///    before the sender freezes, so it cannot take the address before its
///    sockets exist (its kernel would reset the clients);
/// 2. the sender, frozen, goes into FAULT and waits until keepalived has
///    dropped the address ([`wait_for`]);
/// 3. the receiver restores the sockets, leaves FAULT, waits until
///    keepalived has added the address (keepalived sends the gratuitous
///    ARP), then leaves repair mode;
/// 4. the sender stays in FAULT while the receiver holds the connections
///    (out of FAULT it would preempt and take the address back without
///    the sockets); it leaves FAULT when a service comes back to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalived {
    /// The track file of this host's keepalived instance.
    pub track: std::path::PathBuf,
}

impl Keepalived {
    /// Puts this host's keepalived instance into FAULT (`true`: it drops
    /// the address and advertises priority 0) or out of it.
    /// Records that this host's instance is in FAULT only for a move that
    /// failed, and must leave it.
    pub fn owe() {
        OWED.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Takes over the debt of [`owe`](Self::owe): whoever takes it decides
    /// when the instance leaves FAULT.
    pub fn take_owed() -> bool {
        OWED.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Whether the file holds the instance in FAULT now.
    pub fn in_fault(&self) -> bool {
        std::fs::read_to_string(&self.track).is_ok_and(|s| s.trim() != "0" && !s.trim().is_empty())
    }

    pub fn fault(&self, on: bool) -> Result<()> {
        std::fs::write(&self.track, if on { "1\n" } else { "0\n" }).with_context(|| {
            format!(
                "cannot write keepalived's track file {} (--keepalived-track)",
                self.track.display()
            )
        })
    }
}

/// Waits until `ip` is on this machine (`present`) or gone from it; how
/// long that took, or an error after `limit`.
pub async fn wait_for(
    ip: Ipv4Addr,
    present: bool,
    limit: std::time::Duration,
) -> Result<std::time::Duration> {
    let began = std::time::Instant::now();
    loop {
        if holding(ip)?.is_some() == present {
            return Ok(began.elapsed());
        }
        if began.elapsed() >= limit {
            bail!(
                "keepalived did not {} {ip} within {limit:?}: check that the track file is in a \
                 vrrp_track_file with weight 0 that the instance holding {ip} tracks",
                if present { "add" } else { "remove" }
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}
