//! Profiles of a running host: `perf record -g` while a load runs, the
//! time split by where the code runs (kernel, guest, host, libraries),
//! the top symbols and a flame graph (`inferno`). Guest functions are
//! named when the host runs with `WASMHOST_PERFMAP=1`.

use std::process::Command;

use anyhow::{Context, Result};
use inferno::collapse::Collapse as _;

/// Where a process spent its time under some load.
pub struct Profile {
    /// Top symbols, self time.
    pub top: String,
    /// "kernel 49%, guest 25%, ...".
    pub split: String,
    /// The flame graph (SVG).
    pub flame: Vec<u8>,
}

/// Profiles process `pid` (`perf record -g`) while `load` runs, and
/// draws a flame graph titled `title`; `None` where `perf` does not work
/// here (not installed, or not allowed to profile).
pub fn record(pid: u32, title: &str, load: impl FnOnce() -> Result<()>) -> Result<Option<Profile>> {
    let works = Command::new("perf")
        .args(["stat", "-e", "task-clock", "true"])
        .output();
    if !works.is_ok_and(|o| o.status.success()) {
        return Ok(None);
    }
    let data = tempfile::NamedTempFile::new()?;
    let mut rec = Command::new("perf")
        .args(["record", "-g", "-F", "2000", "-o"])
        .arg(data.path())
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let loaded = load();
    interrupt(rec.id());
    rec.wait()?;
    loaded?;
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "-g",
            "none",
            "--sort",
            "dso,symbol",
            "-i",
        ])
        .arg(data.path())
        .output()?;
    let text = String::from_utf8_lossy(&report.stdout);
    // "  12.34%  wasmhost  [.] symbol   -  -": keep share, object, symbol.
    let top: String = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(20)
        .map(|l| {
            let mut words: Vec<&str> = l.split_whitespace().collect();
            while words.last() == Some(&"-") {
                words.pop();
            }
            format!("{}\n", words.join(" "))
        })
        .collect();
    let by_dso = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "dso", "-i"])
        .arg(data.path())
        .output()?;
    let mut shares: Vec<(String, f64)> = Vec::new();
    for line in String::from_utf8_lossy(&by_dso.stdout).lines() {
        let mut words = line.split_whitespace();
        let (Some(pct), Some(dso)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(pct) = pct.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) else {
            continue;
        };
        let place = match dso {
            "[kernel.kallsyms]" => "kernel (sockets, wake-ups)",
            "[JIT]" => "guest (wasm code)",
            "wasmhost" => "host (wasmhost, tokio, wasmtime)",
            _ => "libraries (libc, ...)",
        };
        match shares.iter_mut().find(|(p, _)| p == place) {
            Some((_, share)) => *share += pct,
            None => shares.push((place.to_string(), pct)),
        }
    }
    let split = shares
        .iter()
        .map(|(place, pct)| format!("{place} {pct:.0}%"))
        .collect::<Vec<_>>()
        .join(", ");
    let script = Command::new("perf")
        .args(["script", "-i"])
        .arg(data.path())
        .output()?;
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default()
        .collapse(&script.stdout[..], &mut folded)
        .context("folding perf's stacks")?;
    let mut flame = Vec::new();
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.into();
    inferno::flamegraph::from_reader(&mut opts, &folded[..], &mut flame)
        .context("drawing the flame graph")?;
    Ok(Some(Profile { top, split, flame }))
}

fn interrupt(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
}
