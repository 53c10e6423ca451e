//! Network namespaces made by a test and always removed: a small L2
//! segment of "machines" joined by a bridge, for tests that move a
//! service address between hosts (`wasmhost migrate --move-ip`).
//!
//! Each machine is a namespace with one interface `eth0` (a veth whose
//! other end is on the bridge, in a namespace of its own) and the address
//! `10.213.N.H/24`, where N is unique to the test process. Nothing is
//! sent anywhere but these interfaces. Needs root (CAP_SYS_ADMIN and
//! CAP_NET_ADMIN) and `ip` from iproute2: [`Segment::create`] says why not
//! when the machine cannot, and the test then skips with that message.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;

/// A bridge and the machines on it; removed when dropped.
pub struct Segment {
    /// The namespaces, the bridge's first.
    namespaces: Vec<String>,
    /// The third octet of every address on this segment.
    net: u8,
}

/// One machine: its namespace and address.
#[derive(Debug, Clone)]
pub struct Machine {
    pub ns: String,
    pub ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

impl Segment {
    /// A bridge with `machines` machines on it (addresses .1, .2, ...).
    /// `Err` says why this machine cannot (not root, no `ip`).
    pub fn create(machines: usize) -> Result<(Segment, Vec<Machine>), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        // Unique per segment: the tests of one process, and test processes
        // beside each other, build segments at once.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let net = ((pid.wrapping_mul(7).wrapping_add(n)) % 200) as u8 + 20;
        let tag = format!("whm{pid}x{n}");
        let bridge = format!("{tag}-br");
        let mut segment = Segment {
            namespaces: Vec::new(),
            net,
        };
        ip(&["netns", "add", &bridge])?;
        segment.namespaces.push(bridge.clone());
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        let mut list = Vec::new();
        for host in 1..=machines {
            let ns = format!("{tag}-{host}");
            ip(&["netns", "add", &ns])?;
            segment.namespaces.push(ns.clone());
            let peer = format!("p{host}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer,
                "netns", &bridge,
            ])?;
            ip(&["-n", &bridge, "link", "set", &peer, "master", "br0", "up"])?;
            let addr = Ipv4Addr::new(10, 213, net, host as u8);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            list.push(Machine { ns, ip: addr });
        }
        Ok((segment, list))
    }

    /// An address on this segment that no machine has yet (`.host`).
    pub fn spare(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.net, host)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (and the veths' peers).
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

impl Machine {
    /// Adds `addr/24` to this machine's interface.
    pub fn add_address(&self, addr: Ipv4Addr) -> Result<(), String> {
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])
    }

    /// A command run inside this machine (`ip netns exec`).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Runs `f` on a thread inside this machine's network namespace:
    /// sockets it creates belong to the machine, and stay usable from any
    /// thread.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }
}
