//! The report: sections written by the benchmarks, targets met or
//! missed, a dated Markdown file with its charts, and the README's
//! Performance table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A target from the benchmark issue, checked against a measurement.
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
    /// For a missed target: why, from this run's measurements, and what it
    /// would take.
    pub why: Option<String>,
}

/// One benchmark's part of the report.
#[derive(Default)]
pub struct Section {
    pub title: String,
    /// Markdown body (tables, notes).
    pub body: String,
    /// Chart file names (relative to the report), with alt text.
    pub charts: Vec<(String, String)>,
    pub targets: Vec<Target>,
    /// Rows for the README's Performance table: (what, figure).
    pub headline: Vec<(String, String)>,
}

impl Section {
    pub fn new(title: &str) -> Section {
        Section {
            title: title.into(),
            ..Section::default()
        }
    }

    pub fn target(&mut self, name: &str, goal: &str, measured: String, met: bool) {
        self.targets.push(Target {
            name: name.into(),
            goal: goal.into(),
            measured,
            met,
            why: None,
        });
    }

    /// Says why the target just added is missed (from this run's
    /// measurements) and what it would take; nothing if it is met.
    pub fn why_missed(&mut self, why: String) {
        if let Some(t) = self.targets.last_mut().filter(|t| !t.met) {
            t.why = Some(why);
        }
    }
}

/// Where a run writes: `bench/results/<stamp>.md` and
/// `bench/results/<stamp>-<chart>.svg`.
pub struct Output {
    pub dir: PathBuf,
    pub stamp: String,
}

impl Output {
    pub fn chart_path(&self, name: &str) -> (PathBuf, String) {
        let file = format!("{}-{name}.svg", self.stamp);
        (self.dir.join(&file), file)
    }

    pub fn write(&self, sections: &[Section], machine: &str) -> Result<PathBuf> {
        let mut md = String::new();
        let _ = writeln!(md, "# wasmhost benchmarks, {}\n", self.stamp);
        let _ = writeln!(md, "{machine}\n");
        let _ = writeln!(
            md,
            "Every figure is measured in this run, beside its baseline on the same machine.\n"
        );
        let _ = writeln!(
            md,
            "## Targets\n\n| target | goal | measured | |\n|---|---|---|---|"
        );
        for t in sections.iter().flat_map(|s| &s.targets) {
            let mark = if t.met { "met" } else { "**missed**" };
            let _ = writeln!(md, "| {} | {} | {} | {mark} |", t.name, t.goal, t.measured);
        }
        let missed: Vec<&Target> = sections
            .iter()
            .flat_map(|s| &s.targets)
            .filter(|t| t.why.is_some())
            .collect();
        if !missed.is_empty() {
            let _ = writeln!(
                md,
                "\nWhy the missed targets are missed, and what it would take:\n"
            );
            for t in missed {
                let _ = writeln!(
                    md,
                    "- **{}**: {}",
                    t.name,
                    t.why.as_deref().unwrap_or_default()
                );
            }
        }
        for s in sections {
            let _ = writeln!(md, "\n## {}\n\n{}", s.title, s.body.trim_end());
            for (file, alt) in &s.charts {
                let _ = writeln!(md, "\n![{alt}]({file})");
            }
        }
        let path = self.dir.join(format!("{}.md", self.stamp));
        std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

const START: &str = "<!-- performance:start -->";
const END: &str = "<!-- performance:end -->";

/// Replaces the README's Performance table (between the markers) with
/// this run's headline figures.
pub fn update_readme(readme: &Path, sections: &[Section], report: &str) -> Result<()> {
    let text = std::fs::read_to_string(readme)?;
    let (Some(a), Some(b)) = (text.find(START), text.find(END)) else {
        anyhow::bail!("{} has no {START} ... {END} markers", readme.display());
    };
    let mut table = format!(
        "{START}\nLatest run: [{report}](bench/results/{report}).\n\n| measurement | result |\n|---|---|\n"
    );
    for (what, figure) in sections.iter().flat_map(|s| &s.headline) {
        let _ = writeln!(table, "| {what} | {figure} |");
    }
    let updated = format!("{}{table}{}", &text[..a], &text[b..]);
    std::fs::write(readme, updated)?;
    Ok(())
}
