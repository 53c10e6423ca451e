//! Helpers for the integration tests: find the built `wasmhost` binary and
//! guests, start `wasmhost serve` on a free port, read what it prints.
//!
//! The tests drive the real release binary (`cargo build --release -p
//! wasmhost`) and the real guests (`guests/build`); `.ci/test` builds both
//! before running them.

pub mod fleet;
pub mod irc;
pub mod load;
pub mod netns;
pub mod standby;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for the server to print its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The `wasmhost` binary: `$WASMHOST_BIN`, else target/release/wasmhost.
pub fn wasmhost_bin() -> PathBuf {
    let bin = std::env::var_os("WASMHOST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/wasmhost"));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p wasmhost` (or .ci/test, which builds everything)",
        bin.display()
    );
    bin
}

/// A built guest component, target/guests/NAME.wasm.
pub fn guest(name: &str) -> PathBuf {
    let path = target_dir().join("guests").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `guests/build`",
        path.display()
    );
    path
}

/// A compile cache shared by the tests of one run, so each guest is
/// compiled once.
pub fn test_cache_dir() -> PathBuf {
    target_dir().join("test-cache")
}

/// [`test_cache_dir`] as the library's compile cache.
pub fn test_cache() -> wasmhost::engine::CompileCache {
    wasmhost::engine::CompileCache {
        dir: test_cache_dir(),
        max_bytes: wasmhost::engine::DEFAULT_CACHE_MAX_BYTES,
    }
}

/// What the server printed on stderr so far, shared with a reader thread.
#[derive(Default)]
struct Output {
    text: Mutex<String>,
    changed: Condvar,
}

/// A running `wasmhost serve`. Killed when dropped, with every process a
/// host upgrade handed it to.
pub struct Served {
    child: Option<Child>,
    /// Processes that served after a host upgrade (not our children).
    successors: Mutex<Vec<u32>>,
    output: Arc<Output>,
    /// Bound addresses by listener name, from `listening on NAME ADDR`.
    pub addrs: Vec<(String, SocketAddr)>,
    /// Its control socket, in a temporary directory of its own.
    pub control: PathBuf,
    _dir: tempfile::TempDir,
}

/// A real `redis-server` on a free loopback port, killed (SIGKILL) and
/// reaped when dropped.
pub struct RedisServer {
    pub child: Child,
    pub addr: SocketAddr,
}

impl RedisServer {
    /// Starts `redis-server --port P --bind 127.0.0.1 --save "" EXTRA...`
    /// and waits (at most 20 s) until it answers PING.
    pub fn start(extra: &[&str]) -> std::io::Result<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = RedisServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut c) = std::net::TcpStream::connect(server.addr) {
                use std::io::{Read, Write};
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut reply = [0u8; 7];
                if c.write_all(b"PING\r\n").is_ok()
                    && c.read_exact(&mut reply).is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return Ok(server);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(std::io::Error::other(
            "redis-server did not answer PING within 20 s",
        ))
    }

    /// With an append-only file in `dir`, synced as `appendfsync` says
    /// (`always`, `everysec`, `no`).
    pub fn with_aof(dir: &Path, appendfsync: &str) -> std::io::Result<RedisServer> {
        let dir = dir
            .to_str()
            .ok_or_else(|| std::io::Error::other("not UTF-8"))?;
        RedisServer::start(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            appendfsync,
            "--dir",
            dir,
        ])
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis` client connection to a served kv guest.
pub fn redis_connect(server: &Served) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{}/", server.addr())).expect("redis url");
    client
        .get_connection_with_timeout(Duration::from_secs(10))
        .expect("redis connection")
}

/// Reads exactly `expected.len()` bytes from `conn` and compares them.
pub fn expect_reply(conn: &mut impl std::io::Read, expected: &[u8]) {
    let mut got = vec![0; expected.len()];
    conn.read_exact(&mut got).expect("reply");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

/// What a finished `wasmhost` command printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Served {
    /// Starts `wasmhost serve GUEST --listen 127.0.0.1:0 ARGS...` and waits
    /// until it prints its address.
    pub fn start(guest_name: &str, args: &[&str]) -> Served {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Served::start_raw(&guest(guest_name), &all, 1)
    }

    /// Starts `wasmhost serve PATH ARGS...` expecting `listeners` lines.
    pub fn start_raw(path: &Path, args: &[&str], listeners: usize) -> Served {
        Served::start_with(path, args, listeners, |bin| Command::new(bin))
    }

    /// Like [`start`](Self::start), with `envs` set in the server's
    /// environment (e.g. `WASMHOST_TEST_DURABLE_FAIL`).
    pub fn start_env(guest_name: &str, args: &[&str], envs: &[(&str, &str)]) -> Served {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Served::start_with(&guest(guest_name), &all, 1, |bin| {
            let mut command = Command::new(bin);
            command.envs(envs.iter().copied());
            command
        })
    }

    /// Like [`start_raw`](Self::start_raw), with the command made by
    /// `command` from the binary's path (to add a wrapper, environment or
    /// descriptors); `serve` and the arguments are appended to it.
    pub fn start_with(
        path: &Path,
        args: &[&str],
        listeners: usize,
        command: impl FnOnce(&Path) -> Command,
    ) -> Served {
        let dir = tempfile::tempdir().expect("temporary directory");
        let control = dir.path().join("control.sock");
        let mut command = command(&wasmhost_bin());
        command
            .arg("serve")
            .arg(path)
            .args(args)
            .arg("--control")
            .arg(&control);
        if !args
            .iter()
            .any(|a| *a == "--cache-dir" || *a == "--no-cache")
        {
            command.arg("--cache-dir").arg(test_cache_dir());
        }
        Served::spawn(command, control, dir, |text| {
            text.matches("listening on ").count() >= listeners
        })
    }

    /// Runs `command` (a `wasmhost serve` with `--control control`, whose
    /// temporary directory is `dir`) and waits until its stderr satisfies
    /// `started`; then reads its listeners' addresses from what it printed.
    pub fn spawn(
        mut command: Command,
        control: PathBuf,
        dir: tempfile::TempDir,
        started: impl Fn(&str) -> bool,
    ) -> Served {
        let mut child = command
            .env("WASMHOST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting wasmhost");
        let output = Arc::new(Output::default());
        let stderr = child.stderr.take().expect("piped");
        let out = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut text = out.text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
                out.changed.notify_all();
            }
        });
        let mut served = Served {
            child: Some(child),
            successors: Mutex::new(Vec::new()),
            output,
            addrs: Vec::new(),
            control,
            _dir: dir,
        };
        served.wait_for_output(started, START_TIMEOUT);
        served.addrs = served
            .stderr()
            .lines()
            .filter_map(|l| l.strip_prefix("listening on "))
            .map(|rest| {
                let (name, addr) = rest.split_once(' ').expect("listening on NAME ADDR");
                (name.to_string(), addr.parse().expect("an address"))
            })
            .collect();
        served
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.output.text.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for stderr; panics with the output after
    /// `timeout` or if the process exits first.
    pub fn wait_for_output(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut text = self.output.text.lock().unwrap();
        while !pred(&text) {
            let now = Instant::now();
            if now >= deadline {
                panic!("timed out waiting for wasmhost output; it printed:\n{text}");
            }
            let upgraded = !self.successors.lock().unwrap().is_empty();
            if let Some(status) = self
                .child
                .as_mut()
                .filter(|_| !upgraded)
                .and_then(|c| c.try_wait().ok().flatten())
            {
                drop(text);
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "wasmhost exited with {status} early; it printed:\n{}",
                    self.stderr()
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            text = self.output.changed.wait_timeout(text, wait).unwrap().0;
        }
    }

    /// Runs `wasmhost COMMAND ARGS... --control <this server's socket>`,
    /// e.g. `served.command("swap", &[path])`.
    pub fn command(&self, command: &str, args: &[&str]) -> Finished {
        let mut all = vec![command];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--control", self.control.to_str().expect("utf-8 path")]);
        run(&all)
    }

    /// Runs `wasmhost swap GUEST.wasm` against this server and asserts it
    /// committed; returns the report (stdout).
    pub fn swap_to(&self, guest_name: &str) -> String {
        self.swap_to_path(&guest(guest_name))
    }

    /// Swaps to the component at `path`; returns the report.
    pub fn swap_to_path(&self, path: &Path) -> String {
        let out = self.command("swap", &[path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "swap to {} failed: {}\n{}",
            path.display(),
            out.stderr,
            self.stderr()
        );
        out.stdout
    }

    /// The process serving now (it changes with each host upgrade), from
    /// `status --json`.
    pub fn serving_pid(&self) -> u32 {
        let out = self.command("status", &["--json"]);
        assert!(out.status.success(), "status failed: {}", out.stderr);
        let pid = out
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("\"pid\": "))
            .and_then(|v| v.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("no pid in status: {}", out.stdout));
        self.track(pid);
        pid
    }

    /// Remembers a process that serves after an upgrade, to kill it when
    /// the test ends.
    pub fn track(&self, pid: u32) {
        let mut successors = self.successors.lock().unwrap();
        if Some(pid) != self.child.as_ref().map(|c| c.id()) && !successors.contains(&pid) {
            successors.push(pid);
        }
    }

    /// Runs `wasmhost upgrade ARGS...` against this server; on success,
    /// remembers the new process. Returns what the command printed.
    pub fn upgrade(&self, args: &[&str]) -> Finished {
        let out = self.command("upgrade", args);
        if out.status.success() {
            self.serving_pid();
        }
        out
    }

    /// Runs `wasmhost upgrade ARGS...` and asserts it committed; returns the
    /// report.
    pub fn upgrade_ok(&self, args: &[&str]) -> String {
        let out = self.upgrade(args);
        assert!(
            out.status.success(),
            "upgrade failed: {}\n{}",
            out.stderr,
            self.stderr()
        );
        assert!(out.stdout.contains("upgrade committed"), "{}", out.stdout);
        out.stdout
    }

    /// The address printed after `prefix` (e.g. `"admin endpoints on
    /// http://"`), once it is printed.
    pub fn printed_addr(&mut self, prefix: &str) -> SocketAddr {
        self.wait_for_output(|t| t.contains(prefix), START_TIMEOUT);
        let text = self.stderr();
        let rest = &text[text.find(prefix).expect("printed") + prefix.len()..];
        let addr = rest.split_whitespace().next().expect("an address");
        addr.parse()
            .unwrap_or_else(|_| panic!("`{addr}` after `{prefix}` is not an address"))
    }

    /// Sends `signal` to the serving process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal).expect("kill");
    }

    /// Whether the process has exited (without reaping a running one).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit by itself (at most `timeout`).
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let status = wait_timeout(&mut child, timeout);
        std::thread::sleep(Duration::from_millis(50)); // let the reader thread finish
        (status, self.stderr())
    }

    /// Sends SIGTERM and waits for the exit status (at most 30 s).
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50)); // let the reader thread finish
        (status, self.stderr())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for &pid in self.successors.lock().unwrap().iter() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("wasmhost did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `wasmhost ARGS...` to completion (at most 120 s) and returns its
/// exit status and stderr.
pub fn run_wasmhost(args: &[&str]) -> (ExitStatus, String) {
    let out = run(args);
    (out.status, out.stderr)
}

/// Runs `wasmhost ARGS...` to completion (at most 120 s).
pub fn run(args: &[&str]) -> Finished {
    run_command(Command::new(wasmhost_bin()).args(args))
}

/// Runs a prepared command to completion (at most 120 s).
pub fn run_command(command: &mut Command) -> Finished {
    run_command_for(command, Duration::from_secs(120))
}

/// [`run_command`] with its own time limit (builds take minutes).
pub fn run_command_for(command: &mut Command, limit: Duration) -> Finished {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting wasmhost");
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = wait_timeout(&mut child, limit);
    Finished {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// A client of a line-based service: sends lines, reads replies line by
/// line (10 s timeout).
pub struct LineConn {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl LineConn {
    pub fn open(server: &Served) -> LineConn {
        LineConn::connect(server.addr())
    }

    pub fn connect(addr: SocketAddr) -> LineConn {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        LineConn {
            reader: std::io::BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Sends `line` and a newline.
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.writer, bytes).unwrap();
    }

    /// Sends part of a line and gives the server time to hand it to the
    /// guest (nothing comes back to wait for).
    pub fn send_partial(&mut self, bytes: &[u8]) {
        self.send_raw(bytes);
        std::thread::sleep(Duration::from_millis(500));
    }

    /// The next line, without its line ending.
    pub fn recv(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.reader, &mut line).unwrap();
        line.trim_end().to_string()
    }
}

/// Runs each listed test function (taking the guest's name) once per
/// implementation of a service, in a module per implementation:
///
/// ```ignore
/// against! { rust => "kv", python => "kv-py"; strings, lists }
/// ```
#[macro_export]
macro_rules! against {
    ($($module:ident => $guest:literal),+; $($test:ident),+ $(,)?) => {
        $crate::against!(@each [$($test),+] $($module => $guest),+);
    };
    (@each $tests:tt $($module:ident => $guest:literal),+) => {$(
        $crate::against!(@module $module $guest $tests);
    )+};
    (@module $module:ident $guest:literal [$($test:ident),+]) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    super::$test($guest)
                }
            )+
        }
    };
}
