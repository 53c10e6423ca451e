//! The one way to move a service's state from one instance to another:
//! negotiate a format, export it from the running instance, import it into
//! the new one (and, if asked, validate the import: [`Validation`]), and
//! account for the pause.
//!
//! What validation checks, exactly: with [`Validation::Export`] (the
//! default of `swap`, `rollback`, SIGHUP and upgrade) the new instance's
//! `export-state` in the very format it just imported must return the
//! state (not an error, not a trap); the bytes are not looked at, and the
//! format need not be in the new version's `exportable()` (the call is made
//! all the same, so a version that imports a format it cannot write fails
//! it). [`Validation::RoundTrip`] (`swap --validate roundtrip`) also compares
//! those bytes with what the old version exported and aborts on the first
//! difference: the format must then be round-trip stable (the same state
//! always written as the same bytes). [`Validation::None`]
//! (`--no-validate`) skips the export. `wasmhost check` runs the same
//! round trip ahead of time, outside any pause.
//!
//! Swap and rollback run both halves in this process ([`super::swap`]);
//! host upgrade runs [`Actor::export_for`] in the old process and
//! [`import`] in the new one (`crate::upgrade`), with the bytes in between
//! carried over the handoff socket. Trap recovery and shadow swaps are to
//! use the same halves, so there is one place to get the transfer right and
//! one [`Pause`] to report its cost.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::recovery::Recovered;
use super::report::micros;
use super::{Actor, Instance};

/// What moves a service, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapKind {
    Swap,
    Rollback,
    /// A new host process takes the service over.
    Upgrade,
    /// A snapshot: the running version's state in a format it imports itself.
    Snapshot,
    /// The state a shadow swap's new version starts from.
    Shadow,
}

/// Guest and transfer time spent inside a pause.
#[derive(Default, Clone, Copy, Debug)]
pub struct Timings {
    pub export: Duration,
    /// Carrying the state and resources to another process (upgrade).
    pub transfer: Duration,
    pub import: Duration,
    pub validate: Duration,
}

/// The time no event was served, and where it went. The same for every
/// way of moving a service (swap, rollback, upgrade).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Pause {
    /// The whole pause (for an upgrade: the blackout).
    pub pause_us: u64,
    /// The old version's `export-state`.
    pub export_us: u64,
    /// Sending state, connections and listeners to the new process.
    #[serde(default)]
    pub transfer_us: u64,
    /// The new version's `import-state`.
    pub import_us: u64,
    /// The new version's validating `export-state`.
    pub validate_us: u64,
    /// The rest: negotiation, stopping and resuming I/O, the host's own work.
    pub host_us: u64,
}

impl Pause {
    pub fn new(total: Duration, t: &Timings) -> Pause {
        let accounted = t.export + t.transfer + t.import + t.validate;
        Pause {
            pause_us: micros(total),
            export_us: micros(t.export),
            transfer_us: micros(t.transfer),
            import_us: micros(t.import),
            validate_us: micros(t.validate),
            host_us: micros(total.saturating_sub(accounted)),
        }
    }
}

/// The first format the new version imports that the old one exports.
pub fn negotiate(importable: &[String], exportable: &[String]) -> Option<String> {
    importable.iter().find(|f| exportable.contains(f)).cloned()
}

/// How the new version's import is checked before it goes live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Validation {
    /// No check beyond `import-state` succeeding (`--no-validate`).
    #[serde(rename = "none")]
    None,
    /// The new instance's `export-state` in the format it imported must
    /// return the state (not an error, not a trap); its bytes are not
    /// looked at. One more export inside the pause.
    #[default]
    #[serde(rename = "export")]
    Export,
    /// As `Export`, and those bytes must equal the old version's export
    /// (`--validate roundtrip`): nothing was lost or changed on import. The
    /// same export plus a comparison of the bytes.
    #[serde(rename = "roundtrip")]
    RoundTrip,
}

/// Where two exports of a state first differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// The first byte offset at which they differ (the shorter one's length
    /// when it is a prefix of the other).
    pub offset: usize,
    /// The length of the first export (the running version's, or the one
    /// `wasmhost check` started from).
    pub first_len: usize,
    /// The length of the second (the re-export after the import).
    pub second_len: usize,
}

impl Difference {
    /// Compares two exports; `None` when they are identical.
    pub fn between(first: &[u8], second: &[u8]) -> Option<Difference> {
        if first == second {
            return None;
        }
        let offset = first
            .iter()
            .zip(second)
            .position(|(a, b)| a != b)
            .unwrap_or(first.len().min(second.len()));
        Some(Difference {
            offset,
            first_len: first.len(),
            second_len: second.len(),
        })
    }
}

/// The innermost cause of a guest call's failure, without the wasm
/// backtrace (that goes to the log).
pub fn root(e: &anyhow::Error) -> String {
    e.root_cause().to_string()
}

/// A state exported for a new version.
pub struct Exported {
    pub format: String,
    pub state: Vec<u8>,
}

/// Why no state could be exported: the text for the user.
pub fn no_common_format(kind: SwapKind, importable: &[String], exportable: &[String]) -> String {
    let (imports, exports) = (importable.join(", "), exportable.join(", "));
    match kind {
        SwapKind::Swap => format!(
            "no state format in common: the new version imports [{imports}], the running version \
             exports [{exports}] now; use --fresh to start the new version without the state"
        ),
        SwapKind::Rollback => format!(
            "rollback refused: no state format in common: the previous version imports [{imports}], \
             the running version exports [{exports}] now. Rolling back now would lose the state; if \
             that is what you want, run `wasmhost rollback --fresh`"
        ),
        SwapKind::Upgrade => format!(
            "no state format in common: the component the new host loaded imports [{imports}], the \
             running version exports [{exports}] now; upgrade with a --component that imports one of them"
        ),
        SwapKind::Shadow => format!(
            "no state format in common: the new version imports [{imports}], the running version \
             exports [{exports}] now (and its journal's snapshot is in none the new version \
             imports); a shadow swap needs one"
        ),
        SwapKind::Snapshot => format!(
            "the running version exports [{exports}] now, none of which it imports itself \
             ([{imports}]): no snapshot can be taken until it does"
        ),
    }
}

/// A trap in the old half: which call trapped, and the trap.
pub struct ExportTrap {
    pub call: String,
    pub trap: anyhow::Error,
}

/// The old half on an instance: asks it what it exports now, picks the
/// first of `importable` it offers, and exports the state in it. The outer
/// error is a trap (the instance is lost); the inner one says why nothing
/// could be exported.
pub async fn export(
    old: &mut Instance,
    importable: &[String],
    kind: SwapKind,
    t: &mut Timings,
) -> Result<Result<Exported, String>, ExportTrap> {
    let trapped = |call: String| move |trap| ExportTrap { call, trap };
    let exportable = old
        .exportable()
        .await
        .map_err(trapped("exportable()".into()))?;
    let Some(format) = negotiate(importable, &exportable) else {
        return Ok(Err(no_common_format(kind, importable, &exportable)));
    };
    let began = Instant::now();
    let result = old.export_state(&format).await;
    t.export = began.elapsed();
    match result.map_err(trapped(format!("export-state({format})")))? {
        Ok(state) => Ok(Ok(Exported { format, state })),
        Err(msg) => Ok(Err(format!(
            "the running version refused to export {format}: {msg}"
        ))),
    }
}

impl Actor {
    /// The old half on the running instance ([`export`]). The outer error
    /// is fatal for the service (the old instance trapped and could not be
    /// restarted); the inner one aborts the move.
    pub(super) async fn export_for(
        &mut self,
        importable: &[String],
        kind: SwapKind,
        t: &mut Timings,
    ) -> Result<Result<Exported, String>> {
        match export(&mut self.instance, importable, kind, t).await {
            Ok(exported) => Ok(exported),
            Err(ExportTrap { call, trap }) => self.old_trapped(&call, trap).await,
        }
    }

    pub(super) async fn old_trapped<T>(
        &mut self,
        call: &str,
        trap: anyhow::Error,
    ) -> Result<Result<T, String>> {
        let why = root(&trap);
        let outcome = match self.recover(trap, call).await? {
            Recovered::Rebuilt => "its state was rebuilt from the last snapshot and the journal",
            Recovered::Fresh => "it was restarted with fresh state (its state is lost)",
            Recovered::Stopped => "the service is stopped (see `wasmhost status`)",
        };
        Ok(Err(format!(
            "the running version trapped in {call}: {why}; {outcome}"
        )))
    }
}

/// The new half: the new instance's `import-state`, then (unless
/// [`Validation::None`]) a validating `export-state` in the same format,
/// compared with `state` for [`Validation::RoundTrip`]. The validating
/// export is returned so the caller can free it off the pause.
pub async fn import(
    new: &mut Instance,
    format: &str,
    state: &[u8],
    validation: Validation,
    t: &mut Timings,
) -> Result<Option<Vec<u8>>, String> {
    import_checked(new, format, state, validation, t)
        .await
        .map_err(|e| e.message)
}

/// Why [`import_checked`] failed.
pub struct ImportError {
    /// The text for the user (about "the new version").
    pub message: String,
    /// False when `import-state` itself failed, true when the validating
    /// export did.
    pub in_validation: bool,
    /// For a failed round trip: where the bytes differ, and the new
    /// version's export.
    pub mismatch: Option<(Difference, Vec<u8>)>,
}

/// [`import`], saying which step failed and, for a round trip, what the
/// new version exported (`wasmhost check` shows it).
pub async fn import_checked(
    new: &mut Instance,
    format: &str,
    state: &[u8],
    validation: Validation,
    t: &mut Timings,
) -> Result<Option<Vec<u8>>, ImportError> {
    let failed = |message, in_validation| ImportError {
        message,
        in_validation,
        mismatch: None,
    };
    let began = Instant::now();
    let result = new.import_state(format, state).await;
    t.import = began.elapsed();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(msg)) => {
            let why = format!("the new version rejected the {format} state: {msg}");
            return Err(failed(why, false));
        }
        Err(trap) => {
            let why = format!(
                "the new version trapped in import-state({format}): {}",
                root(&trap)
            );
            return Err(failed(why, false));
        }
    }
    if validation == Validation::None {
        return Ok(None);
    }
    let began = Instant::now();
    let result = new.export_state(format).await;
    t.validate = began.elapsed();
    let exported = match result {
        Ok(Ok(exported)) => exported,
        Ok(Err(msg)) => {
            let why = format!(
                "validation failed: the new version cannot export the {format} state it imported: {msg}"
            );
            return Err(failed(why, true));
        }
        Err(trap) => {
            let why = format!(
                "validation failed: the new version trapped exporting the {format} state it imported: {}",
                root(&trap)
            );
            return Err(failed(why, true));
        }
    };
    if validation == Validation::RoundTrip
        && let Some(d) = Difference::between(state, &exported)
    {
        let message = format!(
            "round-trip validation failed: the new version re-exported the {format} state it \
             imported with different bytes: first difference at byte {} (the running version \
             exported {} bytes, the new version {}); it loses or changes state on import, or its \
             {format} encoding is not canonical (the same state written in another order)",
            d.offset, d.first_len, d.second_len
        );
        return Err(ImportError {
            message,
            in_validation: true,
            mismatch: Some((d, exported)),
        });
    }
    Ok(Some(exported))
}
