//! The client commands `swap`, `status`, `rollback` and `upgrade`: send one request
//! over the service's control socket and print the answer, for people or
//! (with `--json`) for scripts.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cli::{
    CommitArgs, ControlArgs, RollbackArgs, SnapshotArgs, StatusArgs, SwapArgs, UpgradeArgs,
    ValidateMode,
};
use crate::control::{self, client, protocol::Request, protocol::Response};
use crate::service::{
    GradualOptions, GradualStatus, ShadowOptions, ShadowStatus, StatusReport, SwapReport,
    Validation,
};

fn socket(args: &ControlArgs) -> Result<std::path::PathBuf> {
    control::socket_path(args.control.clone(), &args.name)
}

pub async fn swap(args: SwapArgs) -> Result<()> {
    let path = std::path::absolute(&args.new)
        .with_context(|| format!("bad path {}", args.new.display()))?;
    if !path.exists() {
        bail!("cannot read component {}: no such file", path.display());
    }
    if args.shadow {
        return shadow_swap(args, path).await;
    }
    if args.drain || args.canary.is_some() {
        return gradual_swap(args, path).await;
    }
    if !args.json {
        eprintln!(
            "swapping `{}` to {} (compiling, then transferring state)...",
            args.control.name,
            path.display()
        );
    }
    let roundtrip = args.validate == ValidateMode::Roundtrip;
    let request = Request::Swap {
        path,
        fresh: args.fresh,
        no_validate: args.no_validate,
        roundtrip,
        shadow: None,
        gradual: None,
    };
    let report = swapped(
        client::request(&socket(&args.control)?, request).await?,
        "swap aborted",
    )?;
    if roundtrip && report.validation != Some(Validation::RoundTrip) {
        eprintln!(
            "warning: the serving host did not report a round-trip validation (it predates \
             --validate roundtrip): the swap committed after its own validation only"
        );
    }
    print_swap(&report, args.json)
}

/// `swap --shadow`: starts the shadow, follows it with `status` until it is
/// in step (and, with --commit-after, until it has handled that many
/// events), printing progress, then commits if asked.
async fn shadow_swap(args: SwapArgs, path: std::path::PathBuf) -> Result<()> {
    let sock = socket(&args.control)?;
    let say = |line: String| {
        if !args.json {
            eprintln!("{line}");
        }
    };
    say(format!(
        "shadow swap of `{}` to {}: compiling, then syncing the new version...",
        args.control.name,
        path.display()
    ));
    let request = Request::Swap {
        path,
        fresh: false,
        no_validate: false,
        roundtrip: false,
        shadow: Some(ShadowOptions {
            allow_divergence: args.allow_divergence,
            max_lag_ms: args.max_lag_ms,
        }),
        gradual: None,
    };
    let started = match client::request(&sock, request).await? {
        Response::Shadow(status) => status,
        Response::Error { message } => {
            bail!("shadow swap not started, the running version keeps serving: {message}")
        }
        other => bail!("unexpected reply: {other:?}"),
    };
    say(format!(
        "synced by {} ({}, {} bytes, pause {}); catching up on {} journaled events",
        started.sync,
        started.format,
        started.state_bytes,
        us(started.sync_pause_us),
        started.to_replay
    ));
    let mut last_said = std::time::Instant::now();
    let mut was_in_step = false;
    let status = loop {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let status = match client::request(&sock, Request::Status).await? {
            Response::Status(report) => report.shadow,
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected reply: {other:?}"),
        };
        let Some(status) = status else {
            bail!("the service reports no shadow swap (was it aborted?)");
        };
        if status.state != "catching up" && status.state != "in step" {
            let why = status.stopped.as_deref().unwrap_or("no reason given");
            // With divergence allowed, the kept ones are not in the reason.
            let kept = match status.allow_divergence {
                true => divergence_lines(&status),
                false => String::new(),
            };
            bail!(
                "the shadow {}: {why}; the running version keeps serving{kept}",
                status.state
            );
        }
        let in_step = status.state == "in step";
        if in_step && !was_in_step {
            say(format!(
                "in step: {} journaled events replayed, {} live events mirrored",
                status.replayed, status.mirrored
            ));
            was_in_step = true;
        }
        match args.commit_after {
            None if in_step => break status,
            Some(n) if in_step && status.mirrored >= n => break status,
            _ => {}
        }
        if last_said.elapsed() >= std::time::Duration::from_secs(2) {
            say(progress(&status, args.commit_after));
            last_said = std::time::Instant::now();
        }
    };
    if args.commit_after.is_none() {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        } else {
            print!("{}", format_shadow(&status));
            println!(
                "the shadow runs beside the live version: `wasmhost commit` switches to it, \
                 `wasmhost abort` drops it"
            );
        }
        return Ok(());
    }
    say(format!(
        "{} live events mirrored, {} divergences: committing",
        status.mirrored, status.divergences
    ));
    let report = swapped(
        client::request(&sock, Request::Commit).await?,
        "commit refused",
    )?;
    print_swap(&report, args.json)
}

/// `swap --drain` / `--canary`: starts the new version beside the old one
/// and prints both.
async fn gradual_swap(args: SwapArgs, path: std::path::PathBuf) -> Result<()> {
    let request = Request::Swap {
        path,
        fresh: false,
        no_validate: false,
        roundtrip: false,
        shadow: None,
        gradual: Some(GradualOptions {
            canary_percent: args.canary,
            drain_timeout_ms: args.drain_timeout_s.saturating_mul(1000),
        }),
    };
    let status = match client::request(&socket(&args.control)?, request).await? {
        Response::Gradual(status) => status,
        Response::Error { message } => {
            bail!("not started, the running version keeps serving: {message}")
        }
        other => bail!("unexpected reply: {other:?}"),
    };
    print_gradual(&status, args.json)?;
    if !args.json {
        match status.mode.as_str() {
            "canary" => println!(
                "`wasmhost commit` sends every new connection to the new version (the old one then \
                 drains); `wasmhost abort` moves its connections back to the old one"
            ),
            _ => println!(
                "the old version serves its connections until they close (or for {} s, then they \
                 move to the new version); `wasmhost status` follows it, `wasmhost abort` moves \
                 everything back",
                args.drain_timeout_s
            ),
        }
    }
    Ok(())
}

fn print_gradual(status: &GradualStatus, json: bool) -> Result<()> {
    match json {
        true => println!("{}", serde_json::to_string_pretty(status)?),
        false => print!("{}", format_gradual(status)),
    }
    Ok(())
}

/// A drain or canary, for people.
pub fn format_gradual(g: &GradualStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {}, {}% of new connections to the new version{}{}",
        g.mode,
        g.state,
        g.percent,
        g.drain_left_s
            .map(|s| format!(", {s:.0} s left to drain"))
            .unwrap_or_default(),
        g.ended
            .as_deref()
            .map(|why| format!(": {why}"))
            .unwrap_or_default()
    );
    for (which, v) in [("old", &g.old), ("new", &g.new)] {
        let _ = writeln!(
            out,
            "  {which}        {} ({}): {} connections open, {} since, {} events, {} traps",
            v.component.path,
            v.component.short_hash(),
            v.connections,
            v.connections_total,
            v.events,
            v.traps
        );
    }
    out
}

fn progress(s: &ShadowStatus, target: Option<u64>) -> String {
    match s.state.as_str() {
        "catching up" => format!(
            "catching up: {}/{} journaled events replayed, {} live events waiting",
            s.replayed, s.to_replay, s.lag_events
        ),
        _ => format!(
            "in step: {}{} live events mirrored, {} divergences, {} behind",
            s.mirrored,
            target.map(|n| format!("/{n}")).unwrap_or_default(),
            s.divergences,
            s.lag_events
        ),
    }
}

/// The divergences a shadow kept, one per line.
fn divergence_lines(s: &ShadowStatus) -> String {
    let mut out = String::new();
    for d in &s.first_divergences {
        let _ = write!(out, "\n  {}", d.describe());
    }
    out
}

pub async fn commit(args: CommitArgs) -> Result<()> {
    let response = client::request(&socket(&args.control)?, Request::Commit).await?;
    if let Response::Gradual(status) = &response {
        print_gradual(status, args.json)?;
        if !args.json {
            println!("every new connection goes to the new version now; the old one drains");
        }
        return Ok(());
    }
    let report = swapped(response, "commit refused")?;
    print_swap(&report, args.json)
}

pub async fn abort(args: CommitArgs) -> Result<()> {
    match client::request(&socket(&args.control)?, Request::Abort).await? {
        Response::Shadow(status) => match args.json {
            true => println!("{}", serde_json::to_string_pretty(&status)?),
            false => {
                println!("shadow swap aborted; the running version serves on");
                print!("{}", format_shadow(&status));
            }
        },
        Response::Gradual(status) => {
            if !args.json {
                println!(
                    "{} aborted: its connections went back to the running version",
                    status.mode
                );
            }
            print_gradual(&status, args.json)?;
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

/// A shadow swap, for people (in `status` and after `swap --shadow`).
pub fn format_shadow(s: &ShadowStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shadow       {} ({}): {}{}",
        s.component.path,
        s.component.short_hash(),
        s.state,
        s.stopped
            .as_deref()
            .map(|why| format!(": {why}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "  synced     by {} from {} ({} bytes), pause {}; {}/{} journaled events replayed",
        s.sync,
        s.format,
        s.state_bytes,
        us(s.sync_pause_us),
        s.replayed,
        s.to_replay
    );
    let _ = writeln!(
        out,
        "  mirrored   {} live events, {} behind, {} divergences{}, {} with other timer calls; memory {} bytes",
        s.mirrored,
        s.lag_events,
        s.divergences,
        match s.allow_divergence {
            true => " (allowed)",
            false => "",
        },
        s.timer_differences,
        s.memory_bytes
    );
    for d in &s.first_divergences {
        let _ = writeln!(out, "  diverged   {}", d.describe());
    }
    out
}

pub async fn rollback(args: RollbackArgs) -> Result<()> {
    let request = Request::Rollback {
        no_validate: args.no_validate,
        fresh: args.fresh,
    };
    let report = swapped(
        client::request(&socket(&args.control)?, request).await?,
        "rollback aborted",
    )?;
    print_swap(&report, args.json)
}

pub async fn upgrade(args: UpgradeArgs) -> Result<()> {
    let absolute = |p: &Option<std::path::PathBuf>| -> Result<Option<std::path::PathBuf>> {
        match p {
            Some(p) if !p.exists() => bail!("{} does not exist", p.display()),
            Some(p) => Ok(Some(std::path::absolute(p)?)),
            None => Ok(None),
        }
    };
    let request = Request::Upgrade {
        binary: absolute(&args.binary)?,
        component: absolute(&args.component)?,
        timeout_ms: args.timeout_ms,
        exec: args.exec,
    };
    if !args.json {
        let how = match args.exec {
            true => "checking the new binary, then replacing the host's process image",
            false => "starting the new host process, then handing over the service",
        };
        eprintln!("upgrading `{}`: {how}...", args.control.name);
    }
    request_move(&args.control, request, args.json).await
}

/// Sends an upgrade or a migration and prints its report.
async fn request_move(control: &ControlArgs, request: Request, json: bool) -> Result<()> {
    let response = client::request(&socket(control)?, request).await?;
    let report = match response {
        Response::Swapped(report) => report,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply: {other:?}"),
    };
    print_swap(&report, json)
}

pub async fn migrate(args: crate::cli::MigrateArgs) -> Result<()> {
    let tls = args.tls.files().map_err(anyhow::Error::msg)?;
    let request = Request::Migrate {
        to: args.to,
        move_ip: args.move_ip,
        relay: args.relay,
        keepalived: args.keepalived,
        peer_name: args.peer_name.clone(),
        timeout_ms: args.timeout_ms,
        tls: tls.map(|t| [t.cert, t.key, t.ca]),
    };
    if !args.json {
        let how = match args.move_ip {
            Some(addr) => format!("moving {addr} with its connections"),
            None => "relaying its connections".into(),
        };
        eprintln!(
            "migrating `{}` to {} ({how})...",
            args.control.name, args.to
        );
    }
    request_move(&args.control, request, args.json).await
}

pub async fn snapshot(args: SnapshotArgs) -> Result<()> {
    match client::request(&socket(&args.control)?, Request::Snapshot).await? {
        Response::Snapshot(r) => match args.json {
            true => println!("{}", serde_json::to_string_pretty(&r)?),
            false => println!(
                "snapshot of `{}`: {} bytes of {} in {} (export {}), replacing {} journaled events ({} bytes)",
                r.service,
                r.state_bytes,
                r.format,
                us(r.pause_us),
                us(r.export_us),
                r.journal_events,
                r.journal_bytes
            ),
        },
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

/// `wasmhost drain`.
pub async fn drain(args: crate::cli::DrainArgs) -> Result<()> {
    let path = socket(&args.control)?;
    let status = match client::request(
        &path,
        Request::Drain {
            cancel: args.cancel,
        },
    )
    .await?
    {
        Response::Drain(status) => status,
        Response::Error { message } => bail!("{message}"),
        Response::Idle(_) => bail!("this host has no service to drain"),
        other => bail!("unexpected reply: {other:?}"),
    };
    if args.cancel {
        println!(
            "{}: accepting new connections; {} open",
            match status.was_draining {
                true => "drain cancelled",
                false => "was not draining",
            },
            status.connections
        );
        return Ok(());
    }
    println!(
        "draining: accepting no new connections; {} open",
        status.connections
    );
    if !args.wait {
        return Ok(());
    }
    let began = std::time::Instant::now();
    let limit = Duration::from_secs(args.timeout);
    let (mut open, mut shown, mut shown_at) = (status.connections, status.connections, began);
    while open > 0 {
        if began.elapsed() >= limit {
            bail!(
                "{open} connections still open after {} s; the host is still draining \
                 (`wasmhost drain --cancel` accepts again, `wasmhost migrate` moves them)",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        open = match client::request(&path, Request::Status).await? {
            Response::Status(s) if !s.draining => {
                bail!(
                    "the drain was cancelled; {} connections open",
                    s.connections
                )
            }
            Response::Status(s) => s.connections,
            Response::Idle(_) => {
                println!("the service moved to another host; nothing left here");
                return Ok(());
            }
            Response::Moved => bail!(
                "the service moved to a new host process (upgrade), which accepts again; \
                 drain it again if that was not meant"
            ),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected reply: {other:?}"),
        };
        if open > 0 && open != shown && shown_at.elapsed() >= Duration::from_secs(1) {
            eprintln!("draining: {open} connections open");
            (shown, shown_at) = (open, std::time::Instant::now());
        }
    }
    println!("drained in {:.1?}: no connection left", began.elapsed());
    Ok(())
}

/// `wasmhost promote`: the standby serves once this returns.
pub async fn promote(args: crate::cli::PromoteArgs) -> Result<()> {
    let path = socket(&args.control)?;
    eprintln!("promoting the standby (it starts the service from its copy of the state)...");
    match client::request(&path, Request::Promote).await? {
        Response::Promoted { message } => {
            println!("{message}");
            Ok(())
        }
        Response::Error { message } => bail!("{message}"),
        Response::Status(_) => bail!("this host serves already: only a standby is promoted"),
        other => bail!("unexpected reply: {other:?}"),
    }
}

pub async fn status(args: StatusArgs) -> Result<()> {
    match client::request(&socket(&args.control)?, Request::Status).await? {
        Response::Status(mut report) => {
            report.component.check_file();
            if let Some(previous) = &mut report.previous {
                previous.check_file();
            }
            match args.json {
                true => println!("{}", serde_json::to_string_pretty(&report)?),
                false => print!("{}", format_status(&report)),
            }
        }
        Response::Idle(idle) => match args.json {
            true => println!("{}", serde_json::to_string_pretty(&idle)?),
            false => print!("{}", format_idle(&idle)),
        },
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

fn swapped(response: Response, what: &str) -> Result<Box<SwapReport>> {
    match response {
        Response::Swapped(report) => Ok(report),
        Response::Error { message } if message.starts_with("rollback refused") => {
            bail!("{message}")
        }
        Response::Error { message } => {
            bail!("{what}, the running version keeps serving: {message}")
        }
        other => bail!("unexpected reply: {other:?}"),
    }
}

fn print_swap(report: &SwapReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        for warning in &report.warnings {
            eprintln!("warning: {warning}");
        }
        print!("{}", format_swap(report));
    }
    Ok(())
}

fn file_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// Microseconds for people: `412 µs`, `3.2 ms`.
fn us(v: u64) -> String {
    if v < 10_000 {
        format!("{v} µs")
    } else {
        format!("{:.1} ms", v as f64 / 1000.0)
    }
}

pub fn format_swap(r: &SwapReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} committed for `{}`: generation {} -> {}",
        r.kind, r.service, r.generation_from, r.generation_to
    );
    let _ = writeln!(s, "  from    {} ({})", r.from.path, r.from.short_hash());
    let cache = if r.from_cache {
        "from cache"
    } else {
        "compiled"
    };
    let _ = writeln!(
        s,
        "  to      {} ({}), {cache} in {}",
        r.to.path,
        r.to.short_hash(),
        us(r.compile_us)
    );
    match &r.format {
        Some(f) => {
            let roundtrip = match r.validation {
                Some(Validation::RoundTrip) => ", round trip identical",
                _ => "",
            };
            let _ = writeln!(s, "  state   {f}, {} bytes{roundtrip}", r.state_bytes);
        }
        None => {
            let _ = writeln!(s, "  state   none (started fresh)");
        }
    }
    let p = &r.pause;
    let pause = match (&r.upgrade, &r.migrate) {
        (Some(_), _) => "blackout",
        (_, Some(_)) => "freeze",
        _ => "pause",
    };
    let transfer = match r.upgrade.is_some() || r.migrate.is_some() {
        true => format!(", transfer {}", us(p.transfer_us)),
        false => String::new(),
    };
    let _ = writeln!(
        s,
        "  {pause:<7} {} (export {}{transfer}, import {}, validate {}, host {})",
        us(p.pause_us),
        us(p.export_us),
        us(p.import_us),
        us(p.validate_us),
        us(p.host_us)
    );
    let _ = writeln!(s, "  kept    {} connections", r.connections);
    if let Some(shadow) = &r.shadow {
        let _ = writeln!(
            s,
            "  shadow  synced by {}, {} live events mirrored, {} divergences",
            shadow.sync, shadow.mirrored, shadow.divergences
        );
    }
    if let Some(u) = &r.upgrade {
        let _ = writeln!(
            s,
            "  process {} -> {} ({}), {} listeners, {} timers, {} bytes unread and {} unsent moved",
            u.old_pid, u.new_pid, u.binary, u.listeners, u.timers, u.unread_bytes, u.unsent_bytes
        );
    }
    if let Some(m) = &r.migrate {
        s.push_str(&format_migrate(m, "  "));
    }
    s
}

pub fn format_status(r: &StatusReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "service      {} (pid {})", r.service, r.pid);
    let _ = writeln!(
        s,
        "component    {} ({}){}",
        r.component.path,
        r.component.short_hash(),
        r.component
            .file_note("`wasmhost swap` to it, or SIGHUP, serves the new file")
    );
    let _ = writeln!(
        s,
        "generation   {} (for {:.0} s; up {:.0} s)",
        r.generation, r.generation_uptime_s, r.uptime_s
    );
    for l in &r.listeners {
        let _ = writeln!(s, "listening    {} {}", l.name, l.addr);
    }
    if let Some(replication) = &r.replication {
        s.push_str(&format_replication(replication));
    }
    if r.draining {
        let _ = writeln!(
            s,
            "draining     accepting no new connections (`wasmhost drain --cancel` accepts again)"
        );
    }
    let _ = writeln!(
        s,
        "connections  {} open, {} since start",
        r.connections, r.connections_total
    );
    for (i, inst) in r.instances.iter().enumerate() {
        let _ = writeln!(
            s,
            "  instance {i}  generation {} ({}): {} connections open, {} since, {} events, {} traps",
            inst.generation,
            inst.component,
            inst.connections,
            inst.connections_total,
            inst.events,
            inst.traps
        );
    }
    let d = &r.durable;
    let _ = writeln!(
        s,
        "events       {} served, {} traps ({} rebuilt with their state), {} timers armed",
        r.events, r.traps, d.recoveries, r.timers
    );
    if let Some(why) = &d.stopped {
        let _ = writeln!(
            s,
            "STOPPED      {why}; swap in a fixed version with `wasmhost swap --fresh FILE`"
        );
    }
    if d.journal == "on" {
        let _ = writeln!(
            s,
            "journal      {} events, {} bytes since the last snapshot ({}, {} bytes, {:.0} s ago)",
            d.journal_events,
            d.journal_bytes,
            d.snapshot_format,
            d.snapshot_bytes,
            d.snapshot_age_s
        );
        let _ = writeln!(
            s,
            "snapshots    {} taken, {} failed, pause last {} max {}{}",
            d.snapshots,
            d.snapshot_failures,
            us(d.last_snapshot_pause_us),
            us(d.max_snapshot_pause_us),
            d.last_snapshot_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    } else {
        let _ = writeln!(s, "journal      {}", d.journal);
    }
    if let Some(dir) = &d.state_dir {
        let _ = writeln!(
            s,
            "state dir    {} (--fsync {}): snapshot {}, {} journal bytes written since",
            dir.path, dir.fsync, dir.snapshot, dir.journal_bytes
        );
    }
    if d.recoveries > 0 {
        let _ = writeln!(
            s,
            "recovery     last rebuild took {}",
            us(d.last_recovery_us)
        );
    }
    if let Some(p) = &r.previous {
        let _ = writeln!(
            s,
            "previous     {} ({}) (wasmhost rollback){}",
            p.path,
            p.short_hash(),
            p.file_note("rollback uses the version kept in memory, not the file")
        );
    }
    if let Some(shadow) = &r.shadow {
        s.push_str(&format_shadow(shadow));
    }
    if let Some(gradual) = &r.gradual {
        s.push_str(&format_gradual(gradual));
    }
    if r.swaps.is_empty() {
        let _ = writeln!(s, "swaps        none");
    } else {
        let _ = writeln!(s, "swaps        (newest last)");
    }
    for w in &r.swaps {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(w.at_unix_ms),
        );
        let format = w.format.as_deref().unwrap_or("-");
        let _ = writeln!(
            s,
            "  {when} {:<8} {} -> {}  {format} {} bytes, pause {}: {}",
            w.kind,
            file_name(&w.from.path),
            file_name(&w.to.path),
            w.state_bytes,
            us(w.pause_us),
            w.outcome
        );
        if let Some(m) = &w.migrate {
            s.push_str(&format_migrate(m, "      "));
        }
    }
    s
}

/// The status of a host with no service.
/// The replication lines of `status` (a primary with a standby, or a
/// standby).
fn format_replication(r: &crate::standby::ReplicationStatus) -> String {
    let mut s = String::new();
    let peer = r.peer.as_deref().unwrap_or("-");
    let link = match r.connected {
        true => "connected",
        false => "link down, retrying",
    };
    match r.role.as_str() {
        "standby" => {
            let _ = writeln!(
                s,
                "standby      of {peer} (epoch {}), {link}: {} appends written, primary at {}, \
                 {} bytes received; last caught up {} ms ago",
                r.epoch, r.acked_seq, r.shipped_seq, r.received_bytes, r.lag_ms
            );
        }
        _ => {
            let _ = writeln!(
                s,
                "standby      {peer} (epoch {}), {link}, {}: {} of {} appends acknowledged, \
                 lag {} bytes / {} ms",
                r.epoch,
                match r.sync {
                    true => "synchronous",
                    false => "asynchronous",
                },
                r.acked_seq,
                r.shipped_seq,
                r.lag_bytes,
                r.lag_ms
            );
        }
    }
    s
}

pub fn format_idle(idle: &crate::control::protocol::IdleStatus) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "service      none (pid {}): waiting for one on {} (wasmhost migrate --to)",
        idle.pid, idle.waiting_on
    );
    if idle.relaying > 0 {
        let _ = writeln!(
            s,
            "relaying     {} connections for the host the last service moved to",
            idle.relaying
        );
    }
    if let Some(r) = &idle.replication {
        s.push_str(&format_replication(r));
    }
    if let Some(report) = &idle.last_move {
        let _ = writeln!(s, "last service moved away:");
        for line in format_swap(report).lines() {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}

/// A migration's lines: where, how, and the freeze's split.
fn format_migrate(m: &crate::service::MigrateInfo, indent: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{indent}moved   to {} ({}{}), pid {} -> {}, component {}",
        m.to,
        m.mode,
        m.address
            .as_deref()
            .map(|a| format!(" of {a}"))
            .unwrap_or_default(),
        m.sender_pid,
        m.receiver_pid,
        match m.component_sent {
            true => "sent",
            false => "already there",
        }
    );
    let _ = writeln!(
        s,
        "{indent}tcp     freeze {}, address off {}, restore {}, address on + ARP {}, repair off {}",
        us(m.tcp_freeze_us),
        us(m.address_remove_us),
        us(m.tcp_restore_us),
        us(m.address_add_us),
        us(m.repair_off_us)
    );
    let _ = writeln!(
        s,
        "{indent}carried {} listeners, {} timers, {} bytes unread, {} unsent, {} unacknowledged",
        m.listeners, m.timers, m.unread_bytes, m.unsent_bytes, m.unacked_bytes
    );
    if m.relayed > 0 {
        let _ = writeln!(
            s,
            "{indent}relaying {} connections through the sender until they close",
            m.relayed
        );
    }
    if !m.receiver_listens.is_empty() {
        let _ = writeln!(
            s,
            "{indent}listens {} (on the receiver)",
            m.receiver_listens.join(", ")
        );
    }
    s
}
