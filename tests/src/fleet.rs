//! Helpers for the fleet tests: the admin HTTP endpoints, HAProxy's agent
//! check, and a real `haproxy` run by the test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `GET path` on the admin listener: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the admin listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (code, body.to_string())
}

/// The line HAProxy's agent check reads.
pub fn agent_line(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the agent check");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    stream
        .read_to_string(&mut line)
        .expect("read the agent line");
    line
}

/// `/metrics` scraped and parsed with a Prometheus text-format parser:
/// the value of each sample by name and labels (`name{k="v",...}`, labels
/// sorted).
pub fn scrape(addr: SocketAddr) -> std::collections::BTreeMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text exposition");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<_> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            labels.sort();
            let key = match labels.is_empty() {
                true => s.metric,
                false => format!("{}{{{}}}", s.metric, labels.join(",")),
            };
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            (key, value)
        })
        .collect()
}

/// `n` distinct free TCP ports on 127.0.0.1 (bound together, then let go:
/// for configurations that need ports before the processes that bind them
/// start).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Why a test that needs `program` cannot run here, if it cannot.
pub fn missing(program: &str) -> Option<String> {
    match Command::new(program).arg("-v").output() {
        Ok(_) => None,
        Err(e) => Some(format!(
            "{program} is not installed ({e}); .ci/setup installs it"
        )),
    }
}

/// Starts `command` with its output (stdout and stderr) in the file `log`.
fn spawn_logged(mut command: Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()))
}

/// A real `haproxy` in the foreground, killed when dropped.
pub struct Haproxy {
    child: Child,
    /// Its admin socket (`show stat`, `show servers state`).
    pub socket: PathBuf,
    log: PathBuf,
}

impl Haproxy {
    /// Starts `haproxy -db -f CONFIG` with `config`, whose `global` section
    /// this adds (with the admin socket in `dir`); waits until the socket
    /// answers.
    pub fn start(dir: &Path, config: &str) -> Haproxy {
        Haproxy::start_in(dir, config, Command::new("haproxy"))
    }

    /// [`start`](Self::start) with `command` (`haproxy`, possibly run
    /// inside a network namespace) to which the arguments are added.
    pub fn start_in(dir: &Path, config: &str, command: Command) -> Haproxy {
        let path = dir.join("haproxy.cfg");
        std::fs::write(
            &path,
            format!("global\n    stats socket \"${{STATS}}\" mode 600 level admin\n\n{config}"),
        )
        .unwrap();
        Haproxy::run(dir, &path, &[], command)
    }

    /// Runs `command -db -f CONFIG` with `envs` and `STATS` (the admin
    /// socket, in `dir`) in its environment: for a configuration file
    /// that reads its values from the environment (`host/fleet/haproxy.cfg`).
    pub fn run(
        dir: &Path,
        config: &Path,
        envs: &[(&str, String)],
        mut command: Command,
    ) -> Haproxy {
        let socket = dir.join("haproxy.sock");
        let log = dir.join("haproxy.log");
        command
            .arg("-db")
            .arg("-f")
            .arg(config)
            .env("STATS", &socket)
            .envs(envs.iter().map(|(k, v)| (k, v)));
        let child = spawn_logged(command, &log);
        let mut haproxy = Haproxy { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while haproxy.try_command("show info").is_none() {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                panic!("haproxy exited with {status}:\n{}", haproxy.log());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not start:\n{}",
                haproxy.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        haproxy
    }

    /// Runs the example configuration `host/fleet/haproxy.cfg` as it is:
    /// clients on `front`, servers host0..host2 at `hosts` (each its
    /// service address and agent-check port), checked every 100 ms.
    pub fn example(dir: &Path, front: &str, hosts: [(String, u16); 3]) -> Haproxy {
        let mut envs = vec![("FRONT", front.to_string()), ("INTER", "100ms".to_string())];
        for (i, (listen, agent)) in hosts.into_iter().enumerate() {
            envs.push((["HOST0", "HOST1", "HOST2"][i], listen));
            envs.push((["AGENT0", "AGENT1", "AGENT2"][i], agent.to_string()));
        }
        let config = crate::workspace_root().join("host/fleet/haproxy.cfg");
        Haproxy::run(dir, &config, &envs, Command::new("haproxy"))
    }

    /// What haproxy printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_command(&self, command: &str) -> Option<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        stream.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut out = String::new();
        stream.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// Runs a command on the admin socket.
    pub fn command(&self, command: &str) -> String {
        self.try_command(command)
            .unwrap_or_else(|| panic!("haproxy's admin socket did not answer `{command}`"))
    }

    /// Each server of `backend`: (name, status, current weight), from
    /// `show stat` (status is e.g. `UP`, `DOWN`, `DRAIN`, `MAINT`).
    pub fn servers(&self, backend: &str) -> Vec<(String, String, u32)> {
        let stat = self.command("show stat");
        let mut lines = stat.lines();
        let header: Vec<&str> = lines
            .next()
            .expect("a header")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
        let (px, sv, status, weight) = (col("pxname"), col("svname"), col("status"), col("weight"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > weight && f[px] == backend)
            .filter(|f| f[sv] != "BACKEND" && f[sv] != "FRONTEND")
            .map(|f| {
                (
                    f[sv].to_string(),
                    f[status].to_string(),
                    f[weight].parse().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Waits until `server` of `backend` satisfies `pred` (status, weight);
    /// panics after `timeout` with what HAProxy says.
    pub fn wait_server(
        &self,
        backend: &str,
        server: &str,
        timeout: Duration,
        pred: impl Fn(&str, u32) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let servers = self.servers(backend);
            if servers
                .iter()
                .any(|(name, status, weight)| name == server && pred(status, *weight))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy's server {server} did not reach the state; it says {servers:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `keepalived` (VRRP only) in a machine of the test's segment,
/// owning the service address with one peer, killed when dropped. Its
/// instance tracks `track` (`vrrp_track_file`, weight 0): 1 there puts it
/// into FAULT. VRRPv3 with `advert_int 0.01`, as measured in
/// `shared/notes/fleet.md`.
pub struct Keepalived {
    child: Child,
    log: PathBuf,
    pub track: PathBuf,
}

impl Keepalived {
    pub fn start(
        machine: &crate::netns::Machine,
        peer: std::net::Ipv4Addr,
        vip: std::net::Ipv4Addr,
        priority: u8,
        dir: &Path,
    ) -> Keepalived {
        let name = &machine.ns;
        let track = dir.join(format!("{name}.track"));
        let conf = dir.join(format!("{name}.keepalived.conf"));
        let log = dir.join(format!("{name}.keepalived.log"));
        // The example configuration, its ${...} values replaced.
        let template =
            std::fs::read_to_string(crate::workspace_root().join("host/fleet/keepalived.conf"))
                .expect("host/fleet/keepalived.conf");
        let values = [
            ("NAME", name.to_string()),
            ("TRACK", track.display().to_string()),
            ("PRIORITY", priority.to_string()),
            ("SELF", machine.ip.to_string()),
            ("PEER", peer.to_string()),
            ("VIP", vip.to_string()),
        ];
        let config = values.iter().fold(template, |text, (k, v)| {
            text.replace(&format!("${{{k}}}"), v)
        });
        let unset = config
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("${"));
        assert!(!unset, "a value is missing:\n{config}");
        std::fs::write(&conf, config).unwrap();
        let pid = |what: &str| dir.join(format!("{name}.{what}.pid"));
        let mut command = machine.command(Path::new("keepalived"));
        command
            .args(["-n", "-l", "-D", "-P", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(pid("main"))
            .arg("-r")
            .arg(pid("vrrp"))
            .arg("-c")
            .arg(pid("checkers"));
        let child = spawn_logged(command, &log);
        Keepalived { child, log, track }
    }

    /// What keepalived logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What its track file holds (`0` or `1`).
    pub fn track_value(&self) -> String {
        std::fs::read_to_string(&self.track)
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        // SIGTERM: keepalived removes its addresses as it goes.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RESP client on one connection.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        Client::on(TcpStream::connect(addr)?)
    }

    pub fn on(stream: TcpStream) -> std::io::Result<Client> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends one command; returns the first line of the reply (and the bulk
    /// string's value when it is one).
    pub fn call(&mut self, args: &[&str]) -> std::io::Result<String> {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.writer.write_all(out.as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(len) = line
            .strip_prefix('$')
            .and_then(|l| l.trim().parse::<usize>().ok())
        {
            let mut value = vec![0; len + 2];
            std::io::Read::read_exact(&mut self.reader, &mut value)?;
            return Ok(String::from_utf8_lossy(&value[..len]).into_owned());
        }
        Ok(line.trim_end().to_string())
    }
}
