//! The benchmarks, each against a real baseline measured in the same run.

mod chat;
mod durable;
mod echo;
mod kv;
mod memory;
mod migrate;
mod shadow;
mod standby;
mod startup;
mod swap;
mod upgrade;

use std::path::PathBuf;

use anyhow::Result;
use wasmhost_bench::report::{Output, Section};

pub struct Ctx {
    pub out: Output,
    pub quick: bool,
    /// For the async pieces (load generator, control client).
    pub rt: tokio::runtime::Runtime,
}

pub trait Benchmark {
    fn name(&self) -> &'static str;
    fn run(&self, ctx: &Ctx) -> Result<Section>;
}

/// Every benchmark, in report order.
pub fn all() -> Vec<Box<dyn Benchmark>> {
    vec![
        Box::new(kv::KvVsRedis),
        Box::new(echo::EchoVsTokio),
        Box::new(swap::SwapPause),
        Box::new(shadow::ShadowSwap),
        Box::new(chat::ChatGuests),
        Box::new(durable::DurableCost),
        Box::new(upgrade::UpgradeBlackout),
        Box::new(migrate::MigrateFreeze),
        Box::new(standby::Standby),
        Box::new(memory::Memory),
        Box::new(startup::Startup),
    ]
}

/// The guests of each language the report covers: (name, language).
pub const GUESTS: [(&str, &str); 5] = [
    ("echo", "Rust"),
    ("kv", "Rust"),
    ("chat", "Rust"),
    ("kv-py", "Python"),
    ("chat-js", "JavaScript"),
];

/// A guest that may not be built: target/guests/NAME.wasm if it exists.
/// The Python and JavaScript guests need their toolchains (`guests/build
/// --skip-lang` leaves them out), so their rows say "not built" instead
/// of failing the run.
pub fn built(name: &str) -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| wasmhost_tests::workspace_root().join("target"));
    let path = target.join("guests").join(format!("{name}.wasm"));
    path.exists().then_some(path)
}

/// What a row of a guest that is not built says.
pub fn not_built(name: &str) -> String {
    format!("{name}: not built (`guests/build {name}`), skipped")
}

/// One line about the machine, for the report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("Machine: {cores} cores ({cpu}); load generators and servers share it.")
}

/// Median of a non-empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The p-th percentile (nearest rank) of a non-empty list.
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// `12345.6` as `12,346`.
pub fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}
