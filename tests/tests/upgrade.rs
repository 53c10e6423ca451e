//! Host upgrade with real processes and real clients: the serving process
//! changes, no connection closes, every reply is right, state, timers and
//! buffered bytes move along; a new process that fails at any step leaves
//! the old one serving everything.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use wasmhost_tests::irc::Room;
use wasmhost_tests::load::Load;
use wasmhost_tests::{Served, expect_reply, guest, redis_connect, wasmhost_bin};

fn status_json(server: &Served) -> String {
    let out = server.command("status", &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    out.stdout
}

/// A JSON number field of `status --json` (top level, pretty-printed).
fn status_number(status: &str, field: &str) -> u64 {
    let prefix = format!("\"{field}\": ");
    status
        .lines()
        .find_map(|l| l.strip_prefix("  ")?.strip_prefix(&prefix))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// kv with `k` = `v` and `clients` checked clients sending commands.
fn kv_under_load(clients: usize) -> (Served, redis::Connection, Load) {
    let server = Served::start("kv", &[]);
    let mut setup = redis_connect(&server);
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut setup)
        .unwrap();
    let load = Load::start(&server, clients);
    load.wait(200);
    (server, setup, load)
}

#[test]
fn kv_upgraded_ten_times_under_load_of_a_hundred_connections_loses_nothing() {
    const CLIENTS: usize = 100;
    let (server, mut setup, load) = kv_under_load(CLIENTS);
    let connections_before = status_number(&status_json(&server), "connections_total");

    let mut pids = vec![server.serving_pid()];
    for i in 0..10 {
        let report = server.upgrade_ok(&[]);
        assert!(
            report.contains(&format!("generation {} -> {}", i + 1, i + 2)),
            "{report}"
        );
        assert!(
            report.contains(&format!("kept    {} connections", CLIENTS + 1)),
            "{report}"
        );
        assert!(report.contains("state   kv/1"), "{report}");
        let pid = server.serving_pid();
        assert!(!pids.contains(&pid), "upgrade {i}: pid {pid} served before");
        pids.push(pid);
        load.wait(100);
    }
    let status = status_json(&server);
    assert_eq!(
        status_number(&status, "connections_total"),
        connections_before,
        "no client had to reconnect: {status}"
    );
    // Every client's commands landed exactly once, on the same connection.
    load.finish(&server);
    let v: String = redis::cmd("GET").arg("k").query(&mut setup).unwrap();
    assert_eq!(v, "v");
    assert_eq!(status_number(&status, "generation"), 11);
    assert_eq!(
        status.matches("\"kind\": \"upgrade\"").count(),
        10,
        "{status}"
    );
}

#[test]
fn chat_users_stay_joined_and_messages_arrive_once_across_ten_upgrades() {
    let server = Served::start("chat", &["--config", "history=100000"]);
    let addr = server.addr();
    let room = Room::join(addr, "before the upgrade");
    // Ten upgrades in a row while alice talks.
    let (room, reports, messages) =
        room.talk_through(|| (0..10).map(|_| server.upgrade_ok(&[])).collect::<Vec<_>>());
    for (i, report) in reports.iter().enumerate() {
        assert!(report.contains("state   chat/1"), "{report}");
        assert!(report.contains("kept    3 connections"), "{report}");
        assert!(
            report.contains(&format!("generation {} -> {}", i + 1, i + 2)),
            "{report}"
        );
    }
    let mut room = room;
    room.check_joined();
    let history = Room::newcomer_history(addr, "before the upgrade").len();
    assert_eq!(history, messages, "the new process kept the history");
}

/// Raises this process's open-file limit to `want`, or skips nothing: a
/// machine that cannot give it fails the test with the reason.
fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= want,
        "this test needs {want} open files; the hard limit is {hard} (raise it with ulimit -Hn)"
    );
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

#[test]
fn ten_thousand_idle_connections_survive_an_upgrade_and_each_answers() {
    const CONNS: usize = 10_000;
    raise_fd_limit(CONNS as u64 + 1000);
    let server = Served::start("kv", &["--max-connections", "20000"]);
    let mut conns: Vec<TcpStream> = Vec::with_capacity(CONNS);
    let deadline = Instant::now() + Duration::from_secs(120);
    while conns.len() < CONNS {
        assert!(Instant::now() < deadline, "connecting took too long");
        let c = TcpStream::connect(server.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        conns.push(c);
    }
    // Wait until the service has seen every connection.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_number(&status_json(&server), "connections") < CONNS as u64 {
        assert!(
            Instant::now() < deadline,
            "the service never saw every connection"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = server.upgrade_ok(&["--timeout-ms", "60000"]);
    assert!(
        report.contains(&format!("kept    {CONNS} connections")),
        "{report}"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(format!("*2\r\n$4\r\nECHO\r\n$5\r\n{i:05}\r\n").as_bytes())
            .unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        expect_reply(c, format!("$5\r\n{i:05}\r\n").as_bytes());
    }
    eprintln!("{report}");
}

#[test]
fn a_half_received_command_and_unsent_replies_move_to_the_new_process() {
    let server = Served::start("kv", &[]);
    let mut setup = redis_connect(&server);
    let value = "v".repeat(1_000_000);
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&value)
        .query(&mut setup)
        .unwrap();
    // A client that asks for 7 MB of replies and does not read them: the
    // socket buffers take a few, the rest waits in the host.
    let mut lazy = TcpStream::connect(server.addr()).unwrap();
    lazy.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    lazy.write_all(&b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n".repeat(7))
        .unwrap();
    // A client in the middle of a command.
    let mut half = TcpStream::connect(server.addr()).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    half.write_all(b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$5\r\nwh")
        .unwrap();
    let _: String = redis::cmd("PING").query(&mut setup).unwrap();
    std::thread::sleep(Duration::from_millis(100));

    let out = server.upgrade(&["--json"]);
    assert!(out.status.success(), "{}\n{}", out.stderr, server.stderr());
    let unsent = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"unsent_bytes\": "))
        .and_then(|v| v.trim_end_matches(',').parse::<u64>().ok())
        .expect("unsent_bytes in the report");
    assert!(
        unsent > 0,
        "the lazy client's replies were still in the host: {}",
        out.stdout
    );

    half.write_all(b"ole\r\n*2\r\n$3\r\nGET\r\n$4\r\nhalf\r\n")
        .unwrap();
    expect_reply(&mut half, b"+OK\r\n$5\r\nwhole\r\n");
    let reply = format!("$1000000\r\n{value}\r\n");
    let mut got = vec![0; reply.len()];
    for i in 0..7 {
        lazy.read_exact(&mut got).unwrap();
        assert!(
            got == reply.as_bytes(),
            "reply {i} arrived whole and in order"
        );
    }
}

#[test]
fn an_armed_timer_fires_in_the_new_process_on_time() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let set_at = Instant::now();
    let _: () = redis::cmd("SET")
        .arg("soon")
        .arg("gone")
        .arg("PX")
        .arg(1500)
        .query(&mut c)
        .unwrap();
    let report = server.upgrade_ok(&[]);
    assert!(
        set_at.elapsed() < Duration::from_millis(1400),
        "the upgrade was too slow for this test"
    );
    assert!(
        !report.contains(" 0 timers"),
        "the expiry timer moved: {report}"
    );
    let old: String = redis::cmd("GET").arg("soon").query(&mut c).unwrap();
    assert_eq!(old, "gone");
    // DBSIZE counts a key until the sweep timer reclaims it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: u64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
        if n == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the expiry timer never fired");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fired = set_at.elapsed();
    assert!(
        fired >= Duration::from_millis(1500),
        "fired early: {fired:?}"
    );
}

/// A wrapper around the real binary that fails at `step` (the new
/// process's test hook).
fn failing_binary(dir: &std::path::Path, step: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("wasmhost-fail-{step}"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nWASMHOST_TEST_UPGRADE_FAIL={step} exec '{}' \"$@\"\n",
            wasmhost_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn a_new_process_failing_at_any_step_leaves_the_old_one_serving_everything() {
    let server = Served::start("kv", &[]);
    let dir = tempfile::tempdir().unwrap();
    let pid = server.serving_pid();
    let mut c = redis_connect(&server);
    let mut raw = TcpStream::connect(server.addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cases = [
        ("start", "the new process exited (exit status: 3)"),
        ("prepare", "failed at `prepare`"),
        ("crash", "the new process exited (signal: 9"),
        ("import", "rejecting the state"),
        ("ready", "did not answer within 3000 ms"),
        ("commit", "the new process exited (exit status: 3)"),
    ];
    for (i, (step, why)) in cases.iter().enumerate() {
        let _: () = redis::cmd("RPUSH")
            .arg("steps")
            .arg(*step)
            .query(&mut c)
            .unwrap();
        // A command half sent when the upgrade starts, finished after it.
        raw.write_all(b"*2\r\n$4\r\nINCR\r\n$1\r").unwrap();
        let binary = failing_binary(dir.path(), step);
        let out = server.upgrade(&["--binary", binary.to_str().unwrap(), "--timeout-ms", "3000"]);
        assert!(!out.status.success(), "{step}: {}", out.stdout);
        assert!(
            out.stderr.contains("upgrade failed at step"),
            "{step}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(why), "{step}: {}", out.stderr);
        assert_eq!(server.serving_pid(), pid, "{step}: the old process serves");
        raw.write_all(b"\nn\r\n").unwrap();
        expect_reply(&mut raw, format!(":{}\r\n", i + 1).as_bytes());
        let steps: Vec<String> = redis::cmd("LRANGE")
            .arg("steps")
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .unwrap();
        assert_eq!(steps.len(), i + 1, "{step}: state kept");
    }
    let status = status_json(&server);
    assert_eq!(status_number(&status, "connections"), 2, "{status}");
    assert!(
        status.contains("aborted: upgrade failed at step"),
        "{status}"
    );
    // And a good upgrade still works.
    let report = server.upgrade_ok(&[]);
    assert!(report.contains("kept    2 connections"), "{report}");
    assert_ne!(server.serving_pid(), pid);
    let steps: u64 = redis::cmd("LLEN").arg("steps").query(&mut c).unwrap();
    assert_eq!(steps, cases.len() as u64);
    raw.write_all(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n").unwrap();
    expect_reply(&mut raw, format!(":{}\r\n", cases.len() + 1).as_bytes());
}

#[test]
fn a_binary_that_cannot_start_or_a_component_that_cannot_take_the_state_is_refused() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    let pid = server.serving_pid();
    // A binary that cannot be started fails at `spawn`.
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("wasmhost");
    std::fs::write(&not_executable, "not a program").unwrap();
    let out = server.upgrade(&["--binary", not_executable.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("failed at step `spawn`"),
        "{}",
        out.stderr
    );
    // A component with no state format in common fails at `freeze`.
    let stateless = guest("faulty");
    let out = server.upgrade(&["--component", stateless.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("failed at step `freeze`"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("no state format in common"),
        "{}",
        out.stderr
    );
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
    let reject = guest("reject-state");
    let out = server.upgrade(&["--component", reject.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("upgrade failed at step"),
        "{}",
        out.stderr
    );
    assert_eq!(server.serving_pid(), pid);
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
    // --component changes the guest in the same step: kv-v2 has hashes.
    let v2 = guest("kv-v2");
    let report = server.upgrade_ok(&["--component", v2.to_str().unwrap()]);
    assert!(report.contains("kv-v2.wasm"), "{report}");
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("1")
        .query(&mut c)
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
    // Rollback returns to the component that ran before the upgrade.
    let _: () = redis::cmd("DEL").arg("h").query(&mut c).unwrap();
    let out = server.command("rollback", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("-> kv.wasm") || out.stdout.contains("/kv.wasm"),
        "{}",
        out.stdout
    );
}

#[test]
fn sigusr2_upgrades_and_a_second_request_during_an_upgrade_is_refused() {
    let server = Served::start("kv", &[]);
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    let pid = server.serving_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.serving_pid() == pid {
        assert!(Instant::now() < deadline, "SIGUSR2 did not upgrade");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");

    // While one upgrade waits for a new process that never gets ready,
    // a swap and another upgrade are refused with the reason.
    let dir = tempfile::tempdir().unwrap();
    let hang = failing_binary(dir.path(), "ready");
    let control = server.control.clone();
    let slow = std::thread::spawn(move || {
        wasmhost_tests::run(&[
            "upgrade",
            "--binary",
            hang.to_str().unwrap(),
            "--timeout-ms",
            "4000",
            "--control",
            control.to_str().unwrap(),
        ])
    });
    std::thread::sleep(Duration::from_millis(1000));
    let swap = server.command("swap", &[guest("kv").to_str().unwrap()]);
    assert!(!swap.status.success());
    assert!(
        swap.stderr.contains("an upgrade is in progress"),
        "{}",
        swap.stderr
    );
    let again = server.upgrade(&[]);
    assert!(!again.status.success());
    assert!(
        again.stderr.contains("an upgrade is in progress"),
        "{}",
        again.stderr
    );
    let slow = slow.join().unwrap();
    assert!(!slow.status.success(), "{}", slow.stdout);
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
}

#[test]
fn exec_upgrade_under_load_keeps_the_pid_every_connection_and_the_state() {
    const CLIENTS: usize = 50;
    let (server, mut setup, load) = kv_under_load(CLIENTS);
    let pid = server.serving_pid();
    for i in 0..3 {
        let report = server.upgrade_ok(&["--exec"]);
        assert!(
            report.contains(&format!("process {pid} -> {pid} ")),
            "{report}"
        );
        assert!(
            report.contains(&format!("generation {} -> {}", i + 1, i + 2)),
            "{report}"
        );
        assert!(
            report.contains(&format!("kept    {} connections", CLIENTS + 1)),
            "{report}"
        );
        assert_eq!(server.serving_pid(), pid, "the same process serves");
        load.wait(100);
    }
    // A spawn upgrade from the re-executed image works too.
    server.upgrade_ok(&[]);
    load.wait(100);
    load.finish(&server);
    let v: String = redis::cmd("GET").arg("k").query(&mut setup).unwrap();
    assert_eq!(v, "v");
}

#[test]
fn exec_upgrade_to_a_binary_that_fails_its_check_changes_nothing() {
    let server = Served::start("kv", &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    let pid = server.serving_pid();
    for step in ["start", "prepare"] {
        let binary = failing_binary(dir.path(), step);
        let out = server.upgrade(&["--exec", "--binary", binary.to_str().unwrap()]);
        assert!(!out.status.success(), "{step}: {}", out.stdout);
        assert!(
            out.stderr.contains("upgrade failed at step"),
            "{step}: {}",
            out.stderr
        );
        assert_eq!(server.serving_pid(), pid);
        let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
        assert_eq!(v, "v");
    }
    let missing = dir.path().join("no-such-binary");
    let out = server.upgrade(&["--exec", "--binary", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
}

/// Reads systemd notifications sent to `socket` until one contains
/// `want`; returns everything read.
fn notifications_until(socket: &std::os::unix::net::UnixDatagram, want: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        assert!(
            Instant::now() < deadline,
            "no {want} from wasmhost; got:\n{seen}"
        );
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    seen
}

#[test]
fn under_systemd_it_takes_activated_sockets_and_reports_ready_reloading_and_mainpid() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    // What systemd would do: bind the listener, open the notify socket.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let fd = listener.as_raw_fd();
    let server = Served::start_with(&guest("kv"), &["--listen", "web=127.0.0.1:0"], 1, |bin| {
        // LISTEN_PID must be the service's own pid: the shell execs it.
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(bin)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "web")
            .env("NOTIFY_SOCKET", &notify_path);
        // SAFETY: dup2 and fcntl are async-signal-safe; fd 3 is where
        // systemd puts the first passed socket, open across exec.
        unsafe {
            c.pre_exec(move || {
                let ok = if fd == 3 {
                    nix::libc::fcntl(3, nix::libc::F_SETFD, 0)
                } else {
                    nix::libc::dup2(fd, 3)
                };
                if ok < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    });
    assert_eq!(server.addrs[0].0, "web");
    assert_eq!(
        server.addrs[0].1.port(),
        port,
        "serves on the passed socket"
    );
    drop(listener);
    notifications_until(&notify, "READY=1");
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();

    let report = server.upgrade_ok(&[]);
    let new_pid = server.serving_pid();
    let mut seen = notifications_until(&notify, &format!("MAINPID={new_pid}"));
    if !seen.contains("READY=1") {
        seen.push_str(&notifications_until(&notify, "READY=1"));
    }
    let reloading = seen.find("RELOADING=1").expect("RELOADING=1 sent");
    assert!(
        seen[reloading..].contains("READY=1"),
        "ready again after the reload: {seen}"
    );
    assert!(report.contains("kept    1 connections"), "{report}");
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
    // A new client reaches the new process on the same port.
    let mut again = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(10))
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut again).unwrap();
    assert_eq!(v, "v");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    notifications_until(&notify, "STOPPING=1");
}

#[test]
fn sighup_swaps_to_the_component_file_now_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("service.wasm");
    std::fs::copy(guest("kv"), &path).unwrap();
    let server = Served::start_raw(&path, &["--listen", "127.0.0.1:0"], 1);
    let mut c = redis_connect(&server);
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    // Deploy kv-v2 over the file (a rename, as deployments do), then HUP.
    let staged = dir.path().join("staged.wasm");
    std::fs::copy(guest("kv-v2"), &staged).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    let pid = server.serving_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_number(&status_json(&server), "generation") < 2 {
        assert!(Instant::now() < deadline, "SIGHUP did not swap");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.serving_pid(), pid, "a swap, not an upgrade");
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("1")
        .query(&mut c)
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
}

/// A service that keeps no state (an empty `exportable()`) hands over no
/// state: the new process starts its component with `init`, announces
/// every connection with `on-connect`, and the connections serve on.
#[test]
fn a_stateless_service_is_upgraded_with_its_connections() {
    let server = Served::start("echo-stateless", &[]);
    let mut conns: Vec<wasmhost_tests::LineConn> = (0..3)
        .map(|i| {
            let mut c = wasmhost_tests::LineConn::open(&server);
            c.send(&format!("before {i}"));
            assert_eq!(c.recv(), format!("before {i}"));
            c
        })
        .collect();
    let old_pid = server.serving_pid();
    let events = status_number(&status_json(&server), "events");
    let report = server.upgrade_ok(&[]);
    assert!(report.contains("state   none"), "{report}");
    assert!(report.contains("kept    3 connections"), "{report}");
    assert_ne!(server.serving_pid(), old_pid);
    // The new instance was told of each connection (on-connect).
    let after = status_number(&status_json(&server), "events");
    assert_eq!(after, events + 3, "events before {events}, after {after}");
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(&format!("after {i}"));
        assert_eq!(c.recv(), format!("after {i}"));
    }
    let status = status_json(&server);
    assert_eq!(status_number(&status, "connections"), 3, "{status}");
    let mut late = wasmhost_tests::LineConn::open(&server);
    late.send("new");
    assert_eq!(late.recv(), "new");
}
