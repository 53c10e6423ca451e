//! Every start-up error gives a clear message and a non-zero exit, and
//! nothing is left serving.

use std::io::Write;

use wasmhost_tests::{guest, run_wasmhost, test_cache_dir};

fn serve_fails(path: &str, extra: &[&str]) -> String {
    let cache = test_cache_dir();
    // No control socket: these servers must not meet at the default path.
    let mut args = vec![
        "serve",
        path,
        "--listen",
        "127.0.0.1:0",
        "--no-control",
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (status, stderr) = run_wasmhost(&args);
    assert!(
        !status.success(),
        "serve {path} {extra:?} should fail; stderr:\n{stderr}"
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("listening on"),
        "started serving before failing:\n{stderr}"
    );
    stderr
}

fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".wasm").tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f
}

#[test]
fn missing_file() {
    let err = serve_fails("/nonexistent/service.wasm", &[]);
    assert!(
        err.contains("cannot read component /nonexistent/service.wasm"),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn not_webassembly() {
    let f = temp_file(b"#!/bin/sh\necho hello\n");
    let err = serve_fails(f.path().to_str().unwrap(), &[]);
    assert!(err.contains("is not a WebAssembly file"), "{err}");
}

#[test]
fn core_module_is_not_a_component() {
    // The smallest valid core module: magic and version 1.
    let f = temp_file(b"\0asm\x01\0\0\0");
    let err = serve_fails(f.path().to_str().unwrap(), &[]);
    assert!(
        err.contains("is a core WebAssembly module, not a component"),
        "{err}"
    );
    assert!(err.contains("wasm32-wasip2"), "{err}");
}

#[test]
fn component_of_another_world_names_what_is_missing() {
    // The smallest valid component: it exports nothing.
    let f = temp_file(b"\0asm\x0d\0\x01\0");
    let err = serve_fails(f.path().to_str().unwrap(), &[]);
    assert!(err.contains("is not a wasmhost service"), "{err}");
    assert!(
        err.contains("wasmhost:service/handler"),
        "the missing export is named:\n{err}"
    );
}

#[test]
fn init_error_is_shown() {
    let kv = guest("kv");
    let err = serve_fails(kv.to_str().unwrap(), &["--config", "colour=blue"]);
    assert!(err.contains("init returned an error"), "{err}");
    assert!(
        err.contains("unknown setting `colour` (kv knows enable-debug-command=yes|no)"),
        "{err}"
    );
    let chat = guest("chat");
    let err = serve_fails(chat.to_str().unwrap(), &["--config", "history=lots"]);
    assert!(
        err.contains("history must be a number of messages"),
        "{err}"
    );
}

#[test]
fn address_in_use_says_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let echo = guest("echo");
    let cache = test_cache_dir();
    let (status, err) = run_wasmhost(&[
        "serve",
        echo.to_str().unwrap(),
        "--listen",
        &addr,
        "--no-control",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.contains("already in use"), "{err}");
    assert!(err.contains("port 0 picks a free port"), "{err}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let (status, err) = run_wasmhost(&["serve", "x.wasm", "--listen", "localhost"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("is not an IP address with a port"), "{err}");
    let (status, err) = run_wasmhost(&["serve", "x.wasm", "--max-output-buffer", "lots"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("not a size"), "{err}");
}
