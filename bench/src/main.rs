//! `bench`: runs every benchmark against its baseline in the same run and
//! writes a dated Markdown report with SVG charts under bench/results/,
//! then refreshes the README's Performance table.
//!
//! A benchmark is a [`benches::Benchmark`]: a name and a `run` that
//! returns a report [`Section`](wasmhost_bench::report::Section). A new
//! capability (host upgrade, say) adds one file under `src/benches/` and
//! one line in [`benches::all`].

mod benches;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Parser;
use wasmhost_bench::report::{Output, update_readme};

#[derive(Parser)]
#[command(about = "Benchmark wasmhost against real baselines; writes bench/results/<date>.md")]
struct Args {
    /// Shorter runs and smaller sizes (a smoke test of the harness).
    #[arg(long)]
    quick: bool,
    /// Run only these benchmarks (comma-separated): kv, echo, swap, chat, durable, upgrade, standby,
    /// migrate, memory, startup.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where reports and charts go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Do not rewrite the README's Performance table.
    #[arg(long)]
    no_readme: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    wasmhost::net::raise_fd_limit();
    std::fs::create_dir_all(&args.out)?;
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "")
        .trim_end_matches('Z')
        .to_string();
    let ctx = benches::Ctx {
        out: Output {
            dir: args.out.clone(),
            stamp,
        },
        quick: args.quick,
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?,
    };
    let all = benches::all();
    for name in &args.only {
        if !all.iter().any(|b| b.name() == name) {
            bail!("no benchmark named `{name}`");
        }
    }
    let mut sections = Vec::new();
    for bench in all
        .iter()
        .filter(|b| args.only.is_empty() || args.only.iter().any(|n| n == b.name()))
    {
        let started = Instant::now();
        eprintln!("bench: {} ...", bench.name());
        let section = bench.run(&ctx)?;
        eprintln!("bench: {} done in {:.0?}", bench.name(), started.elapsed());
        sections.push(section);
    }
    let path = ctx.out.write(&sections, &benches::machine())?;
    eprintln!("bench: report written to {}", path.display());
    if !args.no_readme && args.only.is_empty() && !args.quick {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        update_readme(
            &wasmhost_tests::workspace_root().join("README.md"),
            &sections,
            &name,
        )?;
        eprintln!("bench: README Performance table updated");
    }
    for t in sections.iter().flat_map(|s| &s.targets) {
        eprintln!(
            "target {:<50} {:<7} {} (goal {})",
            t.name,
            if t.met { "met" } else { "MISSED" },
            t.measured,
            t.goal
        );
    }
    Ok(())
}
