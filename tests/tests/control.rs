//! The control socket: private to its owner, robust against bad requests.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use wasmhost_tests::{Served, guest, run_command, wasmhost_bin};

/// Sends one raw frame and returns the reply's JSON text.
fn raw_request(server: &Served, frame: &[u8]) -> String {
    let mut s = UnixStream::connect(&server.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(frame).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

fn frame(json: &str) -> Vec<u8> {
    let mut f = (json.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f
}

fn assert_still_serving(server: &Served) {
    let out = server.command("status", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("generation   1"), "{}", out.stdout);
    let mut c = std::net::TcpStream::connect(server.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
}

#[test]
fn socket_is_private_and_bad_requests_harm_nothing() {
    let server = Served::start("echo", &[]);
    let mode = std::fs::metadata(&server.control)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let reply = raw_request(&server, &frame("this is not json"));
    assert!(
        reply.contains("\"result\":\"error\"") && reply.contains("bad request: malformed message"),
        "{reply}"
    );
    let reply = raw_request(
        &server,
        &frame(r#"{"version":1,"command":"launch-missiles"}"#),
    );
    assert!(reply.contains("bad request: malformed message"), "{reply}");
    let reply = raw_request(&server, &frame(r#"{"version":99,"command":"status"}"#));
    assert!(
        reply.contains("unsupported control protocol version 99 (this host speaks 1)"),
        "{reply}"
    );
    let reply = raw_request(&server, &u32::MAX.to_be_bytes());
    assert!(reply.contains("is over the limit"), "{reply}");
    let reply = raw_request(&server, &frame(r#"{"version":1,"command":"status"}"#));
    assert!(reply.contains("\"result\":\"status\""), "{reply}");
    assert_still_serving(&server);
}

#[test]
fn requests_from_another_user_are_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: cannot run a server as another user here; skipped");
        return;
    }
    // The server runs as `nobody`; this test (root) is the other user.
    // Root passes the socket's file permissions, so this exercises the
    // peer-credential check itself.
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    let own = |p: &std::path::Path| {
        nix::unistd::chown(p, Some(NOBODY.into()), Some(NOBODY.into())).unwrap()
    };
    own(dir.path());
    let kv = dir.path().join("echo.wasm");
    std::fs::copy(guest("echo"), &kv).unwrap();
    own(&kv);
    let control = dir.path().join("ctl").join("echo.sock");
    let mut child = Command::new(wasmhost_bin())
        .args([
            "serve",
            kv.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
        ])
        .arg("--control")
        .arg(&control)
        .env("HOME", dir.path())
        .uid(NOBODY)
        .gid(NOBODY)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !control.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "server did not create its socket"
        );
        assert!(child.try_wait().unwrap().is_none(), "server exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir_mode = std::fs::metadata(control.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);

    let as_root = run_command(
        Command::new(wasmhost_bin())
            .arg("status")
            .arg("--control")
            .arg(&control),
    );
    assert_eq!(as_root.status.code(), Some(1), "{}", as_root.stdout);
    assert!(
        as_root.stderr.contains("permission denied")
            && as_root.stderr.contains("requests from uid 0 are refused"),
        "{}",
        as_root.stderr
    );
    // The owner is still served.
    let as_owner = run_command(
        Command::new(wasmhost_bin())
            .arg("status")
            .arg("--control")
            .arg(&control)
            .uid(NOBODY)
            .gid(NOBODY),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(as_owner.status.success(), "{}", as_owner.stderr);
    assert!(
        as_owner.stdout.contains("generation   1"),
        "{}",
        as_owner.stdout
    );
}

#[test]
fn a_second_service_cannot_take_a_live_socket_and_clients_say_what_is_wrong() {
    let server = Served::start("echo", &[]);
    let out = wasmhost_tests::run(&[
        "serve",
        guest("echo").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control",
        server.control.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr
            .contains("another wasmhost is already using the control socket"),
        "{}",
        out.stderr
    );
    assert_still_serving(&server);

    let out = wasmhost_tests::run(&["status", "--control", "/nonexistent/x.sock"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr
            .contains("no wasmhost service is listening on /nonexistent/x.sock"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_control_directory_others_can_write_to_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("svc.sock");
    let out = wasmhost_tests::run(&[
        "serve",
        guest("echo").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control",
        socket.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("others may write to it (mode 777)"),
        "{}",
        out.stderr
    );
    assert!(!socket.exists());
}
