//! The control socket: a Unix socket through which `wasmhost swap`,
//! `status` and `rollback` talk to a running `wasmhost serve`.
//!
//! The socket is private to its owner: it lives in a directory of mode 0700
//! (for the default locations), has mode 0600 itself, and the server
//! checks each client's peer credentials, refusing any other uid.

pub mod client;
pub mod protocol;
pub mod server;

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Where a service's control socket lives: `explicit` (from `--control` or
/// `$WASMHOST_CONTROL`), else `$XDG_RUNTIME_DIR/wasmhost/NAME.sock`, else
/// `/tmp/wasmhost-UID/NAME.sock`.
pub fn socket_path(explicit: Option<PathBuf>, name: &str) -> Result<PathBuf> {
    check_name(name)?;
    if let Some(path) = explicit {
        return Ok(path);
    }
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("wasmhost"),
        None => PathBuf::from(format!("/tmp/wasmhost-{}", nix::unistd::geteuid())),
    };
    Ok(dir.join(format!("{name}.sock")))
}

/// Service names become file names: keep them plain.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with('.');
    if !ok {
        bail!(
            "invalid service name `{name}`: use up to 64 letters, digits, `.`, `_` or `-`, not starting with `.`"
        );
    }
    Ok(())
}
