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
//!
//! [`World`] is the migration fixture the tests and the benchmark share:
//! a client, hosts A and B, the service address on A, and certificates.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use wasmhost::migrate::TlsFiles;
use wasmhost::migrate::link::testing::Ca;

use crate::{Finished, Served, guest, test_cache_dir, wasmhost_bin};

/// The port `serve --receive` listens on, on each machine's address.
pub const RECEIVE_PORT: u16 = 7400;
/// The port the service listens on, on the service address.
pub const SERVICE_PORT: u16 = 6379;

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
    /// Whether `addr` is on this machine's interface now.
    pub fn has_address(&self, addr: Ipv4Addr) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "-4", "addr", "show", "dev", "eth0"])
            .output()
            .expect("ip addr show");
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {addr}/"))
    }

    /// Removes `addr/24` from this machine's interface.
    pub fn remove_address(&self, addr: Ipv4Addr) -> Result<(), String> {
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "del",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])
    }

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

/// The segment, its machines (client, A, B), the service address (on A),
/// and certificates for A and B from one CA.
pub struct World {
    _dir: tempfile::TempDir,
    pub client: Machine,
    pub a: Machine,
    pub b: Machine,
    /// The service address, on A at first.
    pub service: Ipv4Addr,
    pub tls_a: TlsFiles,
    pub tls_b: TlsFiles,
    /// A directory for more certificates.
    pub dir: std::path::PathBuf,
    // Last: removed after the hosts are gone.
    _segment: Segment,
}

impl World {
    /// A segment with a client, A and B, the service address on A, and
    /// certificates for A and B; `Err` says why this machine cannot.
    pub fn create() -> Result<World, String> {
        let (segment, machines) = Segment::create(3)?;
        let [client, a, b]: [Machine; 3] = machines.try_into().expect("three machines");
        let service = segment.spare(100);
        a.add_address(service)
            .expect("adding the service address to A");
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = Ca::new("wasmhost test CA");
        let tls_a = ca.host(dir.path(), "a", &[&a.ip.to_string()]);
        let tls_b = ca.host(dir.path(), "b", &[&b.ip.to_string()]);
        Ok(World {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            client,
            a,
            b,
            service,
            tls_a,
            tls_b,
            _segment: segment,
        })
    }

    /// `wasmhost serve [kv] --receive IP:7400` on machine `m`: with a
    /// component it serves it on the service address; without, it waits.
    pub fn host(&self, m: &Machine, serve_kv: bool, envs: &[(&str, &str)]) -> Served {
        self.host_of(m, serve_kv.then_some(("kv", &[][..])), envs)
    }

    /// Like [`host`](Self::host), serving guest `serve.0` with arguments
    /// `serve.1` (or waiting, without).
    pub fn host_of(
        &self,
        m: &Machine,
        serve: Option<(&str, &[&str])>,
        envs: &[(&str, &str)],
    ) -> Served {
        self.host_with(m, serve, &[], envs)
    }

    /// Like [`host_of`](Self::host_of), with `args` for `serve` whether
    /// it serves a guest or waits.
    pub fn host_with(
        &self,
        m: &Machine,
        serve: Option<(&str, &[&str])>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Served {
        let serve_kv = serve.is_some();
        let tls = if m.ip == self.a.ip {
            &self.tls_a
        } else {
            &self.tls_b
        };
        let dir = tempfile::tempdir().expect("temporary directory");
        let control = dir.path().join("control.sock");
        let mut c = m.command(&wasmhost_bin());
        c.arg("serve");
        if let Some((name, args)) = serve {
            c.arg(guest(name))
                .arg("--listen")
                .arg(format!("{}:{SERVICE_PORT}", self.service))
                .args(args);
        }
        c.args(args);
        c.args(["--name", "svc", "--receive"])
            .arg(format!("{}:{RECEIVE_PORT}", m.ip))
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-ca")
            .arg(&tls.ca)
            .arg("--control")
            .arg(&control)
            .arg("--cache-dir")
            .arg(test_cache_dir())
            .envs(envs.iter().copied());
        Served::spawn(c, control, dir, move |text| {
            text.contains("receiving services on")
                && match serve_kv {
                    true => text.contains("listening on "),
                    false => text.contains("waiting for a service"),
                }
        })
    }

    pub fn service_addr(&self) -> SocketAddr {
        SocketAddr::from((self.service, SERVICE_PORT))
    }

    /// `wasmhost migrate` from `from` to machine `to`.
    pub fn migrate(&self, from: &Served, to: &Machine, extra: &[&str]) -> Finished {
        let ip = format!("{}/24", self.service);
        let mut args = vec!["--move-ip", ip.as_str()];
        args.extend_from_slice(extra);
        self.migrate_with(from, to, &args)
    }

    /// `wasmhost migrate --relay` from `from` to machine `to`.
    pub fn relay(&self, from: &Served, to: &Machine, extra: &[&str]) -> Finished {
        let mut args = vec!["--relay"];
        args.extend_from_slice(extra);
        self.migrate_with(from, to, &args)
    }

    fn migrate_with(&self, from: &Served, to: &Machine, how: &[&str]) -> Finished {
        let to = format!("{}:{RECEIVE_PORT}", to.ip);
        let mut args = vec!["--to", &to, "--name", "svc", "--json"];
        args.extend_from_slice(how);
        from.command("migrate", &args)
    }

    /// A raw connection from the client machine to `addr`.
    pub fn connect_to(&self, addr: SocketAddr) -> TcpStream {
        let s = self
            .client
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .expect("connecting from the client machine");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// A raw connection from the client machine to the service address.
    pub fn connect(&self) -> TcpStream {
        self.connect_to(self.service_addr())
    }

    /// A redis client from the client machine.
    pub fn redis(&self) -> redis::Connection {
        self.redis_to(self.service_addr())
    }

    /// A redis client from the client machine to `addr`.
    pub fn redis_to(&self, addr: SocketAddr) -> redis::Connection {
        let url = format!("redis://{addr}/");
        self.client.run(move || {
            redis::Client::open(url)
                .unwrap()
                .get_connection_with_timeout(Duration::from_secs(10))
                .expect("redis connection from the client machine")
        })
    }
}
