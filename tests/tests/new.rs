//! `wasmhost new` makes a project that builds with its documented command
//! and serves at once, in each language, outside this workspace; and the
//! state carries across a swap to a rebuild.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wasmhost_tests::{Served, run_command, run_command_for, wasmhost_bin};

fn new_builds_and_serves(lang: &str) {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("hello-{lang}");
    let project = dir.path().join(&name);
    let out = run_command(
        Command::new(wasmhost_bin())
            .args(["new", &name, "--lang", lang, "--dir"])
            .arg(&project),
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("./build"), "{}", out.stdout);
    // The documented build command, as a user would run it.
    let build = run_command_for(
        Command::new(project.join("build")).current_dir(&project),
        Duration::from_secs(600),
    );
    assert!(build.status.success(), "{}\n{}", build.stdout, build.stderr);
    let component = project.join(format!("{name}.wasm"));
    assert!(component.exists(), "{}", build.stderr);
    serve_and_swap(&component, &name);
}

/// Lines come back numbered; a half line and the count survive a swap.
fn serve_and_swap(component: &Path, name: &str) {
    let server = Served::start_raw(component, &["--listen", "127.0.0.1:0"], 1);
    let mut conn = TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    conn.write_all(b"hello\r\nwor").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "1 hello\n");
    let report = server.swap_to_path(component);
    assert!(report.contains(&format!("state   {name}/1")), "{report}");
    conn.write_all(b"ld\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "2 world\n");
}

#[test]
fn rust_project() {
    new_builds_and_serves("rust");
}

#[test]
fn python_project() {
    new_builds_and_serves("python");
}

#[test]
fn js_project() {
    new_builds_and_serves("js");
}

#[test]
fn bad_names_and_taken_folders_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_command(
        Command::new(wasmhost_bin())
            .args(["new", "My_Service"])
            .current_dir(dir.path()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("cannot name a service"),
        "{}",
        out.stderr
    );
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    std::fs::write(dir.path().join("taken/file"), "x").unwrap();
    let out = run_command(
        Command::new(wasmhost_bin())
            .args(["new", "taken"])
            .current_dir(dir.path()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("is not empty"), "{}", out.stderr);
}
