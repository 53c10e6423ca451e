//! The control protocol: versioned request and response messages, framed
//! as a 4-byte big-endian length followed by that many bytes of JSON.
//!
//! Every request carries the protocol version; a host answers a version it
//! does not speak with an error instead of guessing. A malformed or
//! oversized frame gets an error reply and changes nothing.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::service::{
    GradualOptions, GradualStatus, ShadowOptions, ShadowStatus, SnapshotReport, StatusReport,
    SwapReport,
};

/// The protocol version this host speaks.
pub const VERSION: u32 = 1;

/// Largest frame accepted, in bytes. Requests are small (a path, a few
/// flags); status replies grow with the swap history, which is capped.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct RequestFrame {
    pub version: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// The service's state: component, generation, counters, swap history.
    Status,
    /// Replace the running component with the one at `path`.
    Swap {
        /// Absolute path, readable by the serving process.
        path: PathBuf,
        /// Start the new version fresh (`init`), dropping the state, when
        /// there is no common format (or even when there is one).
        #[serde(default)]
        fresh: bool,
        /// Skip the check that the new version can export the state it
        /// imported.
        #[serde(default)]
        no_validate: bool,
        /// Also require the new version's validating export to equal the
        /// running version's export byte for byte (`--validate
        /// roundtrip`). Left out when false, so the request is the same as
        /// before for hosts that predate it; a host that does not know it
        /// ignores it, and its report then has no `validation`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        roundtrip: bool,
        /// Start the new version as a shadow (`swap --shadow`) instead of
        /// switching now. Left out when absent, as `roundtrip`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shadow: Option<ShadowOptions>,
        /// Start the new version beside the old one for a drain or canary
        /// (`swap --drain`, `--canary`). Left out when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gradual: Option<GradualOptions>,
    },
    /// Make the running shadow the live version (`wasmhost commit`).
    Commit,
    /// Drop the running shadow (`wasmhost abort`).
    Abort,
    /// Swap back to the previous generation's component.
    Rollback {
        #[serde(default)]
        no_validate: bool,
        /// Start the previous version fresh (`init`), dropping the state.
        #[serde(default)]
        fresh: bool,
    },
    /// Take a snapshot of the state now (`wasmhost snapshot`).
    Snapshot,
    /// Make this standby the primary (`wasmhost promote`).
    Promote,
    /// Hand the service to a new host process (`wasmhost upgrade`).
    Upgrade {
        /// The new binary [default: the path the host started from].
        #[serde(default)]
        binary: Option<PathBuf>,
        /// Another component for the new process [default: the running one].
        #[serde(default)]
        component: Option<PathBuf>,
        /// How long the new process may take to be ready.
        #[serde(default = "default_upgrade_timeout_ms")]
        timeout_ms: u64,
        /// Replace the host's process image in place (same PID).
        #[serde(default)]
        exec: bool,
    },
    /// Stop accepting new connections and report `drain` to the fleet's
    /// tools (`wasmhost drain`); with `cancel`, accept again.
    Drain {
        #[serde(default)]
        cancel: bool,
    },
    /// Move the service to another machine (`wasmhost migrate`).
    Migrate {
        to: std::net::SocketAddr,
        /// `--move-ip`; `None` with `relay`.
        #[serde(default)]
        move_ip: Option<crate::migrate::ServiceAddr>,
        /// `--relay`.
        #[serde(default)]
        relay: bool,
        /// `--keepalived` (with `move_ip`): keepalived moves the address.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        keepalived: bool,
        #[serde(default)]
        peer_name: Option<String>,
        #[serde(default = "default_upgrade_timeout_ms")]
        timeout_ms: u64,
        /// The link's certificates: cert, key, CA [default: `serve`'s].
        #[serde(default)]
        tls: Option<[PathBuf; 3]>,
    },
}

fn default_upgrade_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub version: u32,
    #[serde(flatten)]
    pub response: Response,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(Box<StatusReport>),
    Swapped(Box<SwapReport>),
    Snapshot(Box<SnapshotReport>),
    /// A shadow swap started, or aborted.
    Shadow(Box<ShadowStatus>),
    /// A drain or canary started, committed (a canary became a drain) or
    /// aborted.
    Gradual(Box<GradualStatus>),
    Error {
        message: String,
    },
    /// The service was handed to a new host process while this request
    /// waited; nothing was done. Connect again to reach the new process.
    Moved,
    /// A drain started or was cancelled.
    Drain(DrainStatus),
    /// This host has no service (`serve --receive`, waiting for one):
    /// what it waits on, and where its last service went.
    Idle(Box<IdleStatus>),
    /// A standby was promoted and serves.
    Promoted {
        message: String,
    },
}

/// The answer to `drain`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainStatus {
    /// Whether the host drains now.
    pub draining: bool,
    /// Whether it drained before this request.
    pub was_draining: bool,
    /// Connections still open.
    pub connections: usize,
}

/// The status of a host with no service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleStatus {
    pub pid: u32,
    /// The address it takes services on.
    pub waiting_on: String,
    /// Connections it relays for another host (`migrate --relay`).
    pub relaying: usize,
    /// The move that took its last service away, if one did.
    pub last_move: Option<crate::service::SwapReport>,
    /// A standby (`serve --standby-of`): its replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::standby::ReplicationStatus>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub async fn read_frame<T, R>(reader: &mut R) -> Result<T, FrameError>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

pub async fn write_frame<T, W>(writer: &mut W, message: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let body = serde_json::to_vec(message)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    writer.write_all(&(body.len() as u32).to_be_bytes()).await?;
    writer.write_all(&body).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_requests_stay_compatible_with_hosts_and_clients_before_roundtrip() {
        // What clients before `--validate roundtrip` send.
        let old: Request = serde_json::from_str(
            r#"{"command":"swap","path":"/a.wasm","fresh":false,"no_validate":false}"#,
        )
        .unwrap();
        assert_eq!(
            old,
            Request::Swap {
                path: "/a.wasm".into(),
                fresh: false,
                no_validate: false,
                roundtrip: false,
                shadow: None,
                gradual: None,
            }
        );
        // Without roundtrip the request is what it always was.
        let plain = serde_json::to_string(&old).unwrap();
        assert!(!plain.contains("roundtrip"), "{plain}");
        let Request::Swap { path, fresh, .. } = old else {
            unreachable!()
        };
        let roundtrip = Request::Swap {
            path,
            fresh,
            no_validate: false,
            roundtrip: true,
            shadow: None,
            gradual: None,
        };
        let json = serde_json::to_string(&roundtrip).unwrap();
        assert!(json.contains(r#""roundtrip":true"#), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), roundtrip);
    }

    #[test]
    fn reports_without_a_validation_field_still_parse() {
        let report: crate::service::SwapReport = serde_json::from_str(
            r#"{"service":"s","kind":"swap","generation_from":1,"generation_to":2,
                "from":{"path":"a","hash":"00"},"to":{"path":"b","hash":"11"},
                "format":"kv/1","state_bytes":3,"compile_us":1,"from_cache":true,
                "instantiate_us":1,"pause_us":1,"export_us":0,"import_us":0,
                "validate_us":0,"host_us":1,"connections":0,"warnings":[]}"#,
        )
        .unwrap();
        assert_eq!(report.validation, None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever arrives on the control socket, the decoder answers with
        /// a frame or an error; it never panics, and never believes a length
        /// over the limit.
        #[test]
        fn the_frame_decoder_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut reader = bytes.as_slice();
            let _ = rt.block_on(read_frame::<RequestFrame, _>(&mut reader));
        }

        /// Valid JSON requests with arbitrary field values decode or are
        /// refused, without panicking.
        #[test]
        fn json_with_arbitrary_fields_is_refused_cleanly(kind in "[a-z-]{0,12}", path in ".{0,40}", n in proptest::prelude::any::<i64>()) {
            let body = format!(
                r#"{{"version":1,"request":"{kind}","path":{path:?},"timeout_ms":{n},"fresh":{n}}}"#
            );
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(body.as_bytes());
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut reader = frame.as_slice();
            let _ = rt.block_on(read_frame::<RequestFrame, _>(&mut reader));
        }
    }
}
