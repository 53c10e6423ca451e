//! `wasmhost check` (is a file a valid guest, does it pass the conformance
//! checks) and `wasmhost swap --validate roundtrip`.
//!
//! Byte-for-byte assertions use echo (an empty state) and lossy-import
//! (guests/faulty built to drop each connection's pending bytes on
//! import, whose `faulty/1` format is fixed); every example guest must
//! pass, and the kv and chat versions in Rust, Python and JavaScript must
//! read each other's state.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use wasmhost_tests::{Finished, LineConn, Served, guest, run, test_cache_dir};

/// Runs `wasmhost check ARGS... --cache-dir <the tests' cache>`.
fn check(args: &[&str]) -> Finished {
    let cache = test_cache_dir();
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--cache-dir", cache.to_str().unwrap()]);
    run(&all)
}

fn path(name: &str) -> String {
    guest(name).to_str().unwrap().to_string()
}

fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".wasm").tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f
}

/// Asserts the check failed (exit 1) because FILE is not a valid guest,
/// and ran no conformance check; returns stderr.
fn invalid(out: &Finished) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(!out.stdout.contains("\nchecks\n"), "{}", out.stdout);
    assert!(!out.stdout.contains("\"outcome\""), "{}", out.stdout);
    out.stderr.clone()
}

#[test]
fn echo_passes() {
    let out = check(&[&path("echo")]);
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let o = &out.stdout;
    for expected in [
        "exports     wasmhost:service/handler (instance)",
        "wasmhost:service/migrate (instance)",
        "imports     ",
        "wasmhost:service/host (instance)",
        "importable  echo/1",
        "exportable  echo/1 (after init and 3 connections)",
        "sha256      ",
        "of linear memory after init",
        "pass  init",
        "pass  3 connections with incomplete input",
        "pass  echo/1 round trip: 0 bytes exported, imported into a new instance, re-exported identically",
        "pass  leak: 2000 connections opened and closed",
        "check passed: 5 checks, 0 warnings",
    ] {
        assert!(o.contains(expected), "missing {expected:?} in:\n{o}");
    }
    assert!(!o.contains("FAIL"), "{o}");
    // The slow steps say what they do on stderr.
    assert!(out.stderr.contains("check: loading"), "{}", out.stderr);
}

#[test]
fn echo_as_json() {
    let out = check(&[&path("echo"), "--json", "--connections", "300"]);
    assert!(out.status.success(), "{}", out.stderr);
    let o = &out.stdout;
    assert!(o.trim_start().starts_with('{'), "{o}");
    for expected in [
        "\"ok\": true",
        "\"importable\": [\n      \"echo/1\"",
        "\"name\": \"wasmhost:service/handler\"",
        "\"memory_after_init_bytes\": ",
        "\"connections\": 300",
        "\"outcome\": \"pass\"",
    ] {
        assert!(o.contains(expected), "missing {expected:?} in:\n{o}");
    }
    assert!(!o.contains("\"outcome\": \"fail\""), "{o}");
}

#[test]
fn a_file_that_is_not_webassembly() {
    let readme = wasmhost_tests::workspace_root().join("README.md");
    let err = invalid(&check(&[readme.to_str().unwrap()]));
    assert!(err.contains("is not a WebAssembly file"), "{err}");
    assert!(err.contains("pass a component built for"), "{err}");
}

#[test]
fn a_missing_file_or_a_directory() {
    let err = invalid(&check(&["/nonexistent/service.wasm"]));
    assert!(
        err.contains("cannot read component /nonexistent/service.wasm"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let err = invalid(&check(&[dir.path().to_str().unwrap()]));
    assert!(err.contains("is not a file"), "{err}");
}

#[test]
fn a_core_module() {
    let f = temp_file(b"\0asm\x01\0\0\0");
    let err = invalid(&check(&[f.path().to_str().unwrap()]));
    assert!(
        err.contains("is a core WebAssembly module, not a component"),
        "{err}"
    );
    assert!(err.contains("wasm32-wasip2"), "{err}");
}

#[test]
fn a_component_without_our_exports() {
    // The smallest valid component: it imports and exports nothing.
    let f = temp_file(b"\0asm\x0d\0\x01\0");
    let out = check(&[f.path().to_str().unwrap()]);
    let err = invalid(&out);
    assert!(err.contains("is not a wasmhost service"), "{err}");
    assert!(
        err.contains("it does not export wasmhost:service/handler, wasmhost:service/migrate"),
        "{err}"
    );
    assert!(
        err.contains("what to do: build it for the world `service`"),
        "{err}"
    );
    // What it is was found out all the same.
    assert!(out.stdout.contains("exports     none"), "{}", out.stdout);
}

/// `(component (import "foo:bar/baz" (instance (export "f" (func)))))`,
/// encoded by hand.
const FOREIGN_IMPORT: &[u8] = b"\0asm\x0d\0\x01\0\
    \x07\x0e\x01\x42\x02\x01\x40\x00\x01\x00\x04\x00\x01f\x01\x00\
    \x0a\x10\x01\x00\x0bfoo:bar/baz\x05\x00";

#[test]
fn a_component_with_imports_the_host_does_not_provide() {
    let f = temp_file(FOREIGN_IMPORT);
    let out = check(&[f.path().to_str().unwrap(), "--json"]);
    let err = invalid(&out);
    // The host's own linker refuses it, naming the import...
    assert!(
        err.contains(
            "component imports instance `foo:bar/baz`, but a matching implementation was not found"
        ),
        "{err}"
    );
    assert!(
        err.contains("it imports what the host does not provide: foo:bar/baz"),
        "{err}"
    );
    // ...and the JSON report says so too.
    assert!(out.stdout.contains("\"valid\": false"), "{}", out.stdout);
    assert!(
        out.stdout.contains("\"name\": \"foo:bar/baz\""),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("\"error\": "), "{}", out.stdout);
}

#[test]
fn a_guest_that_loses_state_on_import_fails() {
    let out = check(&[&path("lossy-import")]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    let o = &out.stdout;
    // 3 connections: 8 (counter) + 4 (count) + 3 x 12 (id, length) + 4 (no
    // memories) = 52 bytes, plus their 6 + 7 + 9 pending bytes; the first
    // difference is the first connection's length of pending bytes, after
    // 8 + 4 + 8 bytes.
    assert!(
        o.contains(
            "FAIL  faulty/1 round trip: not canonical / loses state on import: exported 74 \
             bytes, imported into a new instance, which re-exported 52 bytes; first difference \
             at byte 20"
        ),
        "{o}"
    );
    assert!(o.contains("pass  leak"), "{o}");
    assert!(o.contains("check FAILED: 1 of 5 checks failed"), "{o}");
    assert!(
        out.stderr
            .contains("error: check failed: 1 of 5 checks failed: faulty/1 round trip"),
        "{}",
        out.stderr
    );

    let out = check(&[&path("lossy-import"), "--json", "--connections", "10"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let o = &out.stdout;
    for expected in [
        "\"ok\": false",
        "\"outcome\": \"fail\"",
        "\"offset\": 20",
        "\"first_len\": 74",
        "\"second_len\": 52",
    ] {
        assert!(o.contains(expected), "missing {expected:?} in:\n{o}");
    }
}

#[test]
fn against_the_next_version() {
    let out = check(&[&path("echo"), "--against", &path("echo")]);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let o = &out.stdout;
    assert!(
        o.contains(
            "pass  swap format: a swap from echo.wasm to echo.wasm would carry the state in echo/1"
        ),
        "{o}"
    );
    assert!(
        o.contains("pass  echo/1 into echo.wasm: 0 bytes exported, imported into echo.wasm, re-exported identically"),
        "{o}"
    );

    // echo does not read faulty/1.
    let out = check(&[&path("lossy-import"), "--against", &path("echo")]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let o = &out.stdout;
    assert!(
        o.contains("FAIL  swap format: no state format in common"),
        "{o}"
    );
    assert!(
        o.contains("FAIL  faulty/1 into echo.wasm: echo.wasm does not import faulty/1"),
        "{o}"
    );

    // A next version that loses the state it is given.
    let out = check(&[&path("echo"), "--against", &path("lossy-import")]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let out = check(&[&path("lossy-import"), "--against", &path("lossy-import")]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stdout.contains(
            "FAIL  faulty/1 into lossy-import.wasm: not canonical / loses state on import: \
             exported 74 bytes, imported into lossy-import.wasm, which re-exported 52 bytes"
        ),
        "{}",
        out.stdout
    );
}

/// Every example guest, in every language, passes: valid, its formats
/// round-trip byte for byte, no leak.
#[test]
fn every_example_guest_passes() {
    for (name, format) in [
        ("kv", "kv/1"),
        ("kv-v2", "kv/2"),
        ("kv-py", "kv/1"),
        ("chat", "chat/1"),
        ("chat-v2", "chat/2"),
        ("chat-js", "chat/1"),
    ] {
        let out = check(&[&path(name)]);
        assert!(
            out.status.success(),
            "{name}:\n{}\n{}",
            out.stdout,
            out.stderr
        );
        let o = &out.stdout;
        assert!(o.contains(&format!("importable  {format}")), "{o}");
        assert!(
            o.contains(&format!("pass  {format} round trip: ")),
            "{name}: {o}"
        );
        assert!(o.contains("pass  leak: "), "{name}: {o}");
    }
}

/// The next version may be in another language: each reads what the other
/// writes, byte for byte.
#[test]
fn versions_in_other_languages_read_each_others_state() {
    for (from, to, format) in [
        ("kv", "kv-py", "kv/1"),
        ("kv-py", "kv", "kv/1"),
        ("kv", "kv-v2", "kv/1"),
        ("chat", "chat-js", "chat/1"),
        ("chat-js", "chat", "chat/1"),
    ] {
        let out = check(&[&path(from), "--against", &path(to), "--connections", "250"]);
        assert!(
            out.status.success(),
            "{from} -> {to}:\n{}\n{}",
            out.stdout,
            out.stderr
        );
        let expected = format!(
            "swap format: a swap from {from}.wasm to {to}.wasm would carry the state in {format}"
        );
        assert!(out.stdout.contains(&expected), "{}", out.stdout);
    }
}

#[test]
fn roundtrip_validation_aborts_a_lossy_swap_and_the_old_version_keeps_serving() {
    let server = Served::start("lossy-import", &[]);
    let lossy = path("lossy-import");
    let mut c = LineConn::open(&server);
    c.send_raw(b"hello\n");
    assert_eq!(c.recv(), "1 hello");

    // Nothing pending: the round trip is exact and the swap commits.
    let out = server.command("swap", &[&lossy, "--validate", "roundtrip"]);
    assert!(out.status.success(), "{}\n{}", out.stderr, server.stderr());
    assert!(
        out.stdout
            .contains("state   faulty/1, 28 bytes, round trip identical"),
        "{}",
        out.stdout
    );

    // Half a line pending: the new version would drop it.
    c.send_partial(b"part");
    let out = server.command("swap", &[&lossy, "--validate", "roundtrip"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains(
            "swap aborted, the running version keeps serving: round-trip validation failed: the \
             new version re-exported the faulty/1 state it imported with different bytes: first \
             difference at byte 20 (the running version exported 32 bytes, the new version 28)"
        ),
        "{}",
        out.stderr
    );
    // The old version kept serving, with the pending bytes.
    c.send_raw(b"ial\n");
    assert_eq!(c.recv(), "2 partial");
    let status = server.command("status", &[]);
    assert!(
        status.stdout.contains("generation   2"),
        "{}",
        status.stdout
    );
    assert!(
        status
            .stdout
            .contains("aborted: round-trip validation failed"),
        "{}",
        status.stdout
    );

    // The default validation (the new version can export what it
    // imported) does not see the loss: the first half of the line is gone.
    c.send_partial(b"part");
    let out = server.command("swap", &[&lossy, "--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("\"validation\": \"export\""),
        "{}",
        out.stdout
    );
    c.send_raw(b"ial\n");
    assert_eq!(c.recv(), "3 ial");
}

#[test]
fn roundtrip_validation_passes_a_stable_swap() {
    let server = Served::start("echo", &[]);
    let mut c = TcpStream::connect(server.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let out = server.command(
        "swap",
        &[&path("echo"), "--validate", "roundtrip", "--json"],
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("\"validation\": \"roundtrip\""),
        "{}",
        out.stdout
    );
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
    c.write_all(b"still echoing").unwrap();
    let mut got = [0; 13];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still echoing");
}

#[test]
fn roundtrip_and_no_validate_exclude_each_other() {
    let out = run(&["swap", "x.wasm", "--validate", "roundtrip", "--no-validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    let out = run(&["swap", "x.wasm", "--validate", "roundtrip", "--fresh"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    let out = run(&["swap", "x.wasm", "--validate", "sometimes"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
}

/// One request in the control protocol's framing; the reply's JSON.
fn raw_request(server: &Served, json: &str) -> String {
    let mut s = UnixStream::connect(&server.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(&(json.len() as u32).to_be_bytes()).unwrap();
    s.write_all(json.as_bytes()).unwrap();
    let mut len = [0; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

#[test]
fn the_swap_request_stays_backward_compatible() {
    let server = Served::start("echo", &[]);
    let echo = path("echo");
    // As clients before --validate roundtrip send it.
    let reply = raw_request(
        &server,
        &format!(
            r#"{{"version":1,"command":"swap","path":"{echo}","fresh":false,"no_validate":false}}"#
        ),
    );
    assert!(reply.contains(r#""result":"swapped""#), "{reply}");
    assert!(reply.contains(r#""validation":"export""#), "{reply}");
    let reply = raw_request(
        &server,
        &format!(r#"{{"version":1,"command":"swap","path":"{echo}","roundtrip":true}}"#),
    );
    assert!(reply.contains(r#""validation":"roundtrip""#), "{reply}");
    let reply = raw_request(
        &server,
        &format!(
            r#"{{"version":1,"command":"swap","path":"{echo}","no_validate":true,"roundtrip":true}}"#
        ),
    );
    assert!(reply.contains(r#""result":"error""#), "{reply}");
    assert!(reply.contains("exclude each other"), "{reply}");
}
