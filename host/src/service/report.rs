//! What `status` and `swap` report, as serialisable data (the control
//! socket sends it as JSON; the CLI prints it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::transfer::{Pause, Validation};
use super::{Actor, Program};

/// Most swap records kept for `status`.
pub const HISTORY_LEN: usize = 100;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ComponentInfo {
    pub path: String,
    /// Hex SHA-256 of the component file.
    pub hash: String,
    /// What is at `path` now, when it is no longer the file that was loaded
    /// (a rebuild or a deployment replaced it): its hash, or why it cannot
    /// be read. Filled in by `wasmhost status`, which reads the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_now: Option<String>,
}

impl ComponentInfo {
    pub fn of(program: &Program) -> ComponentInfo {
        ComponentInfo {
            path: program.path.display().to_string(),
            hash: program.hash.clone(),
            file_now: None,
        }
    }

    /// Reads the file at `path` and records in `file_now` how it differs
    /// from what was loaded.
    pub fn check_file(&mut self) {
        use sha2::Digest;
        self.file_now = match std::fs::read(&self.path) {
            Ok(bytes) => {
                let now = hex::encode(sha2::Sha256::digest(&bytes));
                (now != self.hash).then_some(now)
            }
            Err(e) => Some(format!("unreadable: {e}")),
        };
    }

    /// The note `status` prints after a changed file, if it changed.
    pub fn file_note(&self, advice: &str) -> String {
        match &self.file_now {
            None => String::new(),
            Some(now) => format!(
                "\n             the file there has changed since it was loaded (now {}); {advice}",
                &now[..now.len().min(12)]
            ),
        }
    }

    pub fn short_hash(&self) -> &str {
        &self.hash[..self.hash.len().min(12)]
    }
}

/// The outcome of one committed swap, rollback or upgrade.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwapReport {
    pub service: String,
    /// `swap`, `fresh` or `rollback`.
    pub kind: String,
    pub generation_from: u64,
    pub generation_to: u64,
    pub from: ComponentInfo,
    pub to: ComponentInfo,
    /// The negotiated state format; `None` for a fresh swap.
    pub format: Option<String>,
    pub state_bytes: usize,
    /// Reading and compiling the new component (before the pause).
    pub compile_us: u64,
    pub from_cache: bool,
    /// Instantiating the new component (before the pause).
    pub instantiate_us: u64,
    /// The time no event was served, and where it went.
    #[serde(flatten)]
    pub pause: Pause,
    pub connections: usize,
    pub warnings: Vec<String>,
    /// For a host upgrade: the processes and what moved between them.
    #[serde(default)]
    pub upgrade: Option<UpgradeInfo>,
    /// How the new version's import was checked (`none` for a fresh
    /// start). Absent from the reports of hosts that predate the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
    /// For a shadow swap's commit: what the shadow did before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<super::ShadowStatus>,
    /// For a move to another machine (`wasmhost migrate`): where, how, and
    /// the freeze's split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate: Option<MigrateInfo>,
}

/// What a move to another machine did, beyond a swap's state. The pause
/// (`pause_us`) is the freeze: from the sender's last event to the
/// receiver's confirmation that it serves. Its split: `export_us`,
/// `transfer_us`, `import_us`, `validate_us` as for an upgrade, and
/// these.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct MigrateInfo {
    /// `move-ip` (connections recreated on the receiver, the address
    /// moved) or `relay`.
    pub mode: String,
    /// The receiver's `serve --receive` address.
    pub to: String,
    /// The moved service address (`move-ip`).
    #[serde(default)]
    pub address: Option<String>,
    pub sender_pid: u32,
    pub receiver_pid: u32,
    /// Whether the component's bytes were sent (not when the receiver had
    /// them).
    pub component_sent: bool,
    pub listeners: usize,
    pub timers: usize,
    /// Bytes read from clients and not yet given to the guest (the
    /// host's and the kernel's receive queues).
    pub unread_bytes: usize,
    /// Bytes the guest sent that clients had not been sent (the host's
    /// and the kernel's), and sent bytes not yet acknowledged.
    pub unsent_bytes: usize,
    pub unacked_bytes: usize,
    /// Sender: repair mode on and every connection's TCP state read.
    pub tcp_freeze_us: u64,
    /// Sender: the address removed.
    pub address_remove_us: u64,
    /// Receiver: every connection's socket recreated (in repair mode).
    pub tcp_restore_us: u64,
    /// Receiver: the address added and announced (gratuitous ARP).
    pub address_add_us: u64,
    /// Receiver: every socket out of repair mode.
    pub repair_off_us: u64,
    /// `relay`: connections the sender relays until they close.
    #[serde(default)]
    pub relayed: usize,
    /// Where the receiver's listeners are (with `relay`, its own
    /// addresses: point new clients there).
    #[serde(default)]
    pub receiver_listens: Vec<String>,
}

/// What a host upgrade moved, beyond a swap's state.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct UpgradeInfo {
    /// `spawn` (a new process received everything) or `exec` (the same
    /// process re-executed itself).
    pub mode: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// The binary the new process runs.
    pub binary: String,
    pub listeners: usize,
    pub timers: usize,
    /// Bytes read from clients and not yet given to the guest.
    pub unread_bytes: usize,
    /// Bytes the guest sent that were not yet written to clients.
    pub unsent_bytes: usize,
}

/// One entry of the swap history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwapRecord {
    /// Wall-clock time of the swap, Unix milliseconds.
    pub at_unix_ms: u64,
    pub kind: String,
    pub from: ComponentInfo,
    pub to: ComponentInfo,
    pub format: Option<String>,
    pub state_bytes: usize,
    pub pause_us: u64,
    /// `committed`, or `aborted: <why>`.
    pub outcome: String,
    /// For a move to or from another machine: the freeze's split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate: Option<Box<MigrateInfo>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub name: String,
    pub addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub service: String,
    /// The serving process (it changes with every host upgrade).
    #[serde(default)]
    pub pid: u32,
    pub component: ComponentInfo,
    pub generation: u64,
    pub uptime_s: f64,
    pub generation_uptime_s: f64,
    pub listeners: Vec<ListenerInfo>,
    pub connections: usize,
    pub connections_total: u64,
    pub events: u64,
    pub traps: u64,
    pub timers: usize,
    /// The component `rollback` would return to.
    pub previous: Option<ComponentInfo>,
    /// The most recent swaps, oldest first.
    pub swaps: Vec<SwapRecord>,
    /// Journal, snapshots and trap recovery.
    #[serde(default)]
    pub durable: super::DurableStatus,
    /// The running shadow swap, or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<super::ShadowStatus>,
    /// The running drain or canary, or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradual: Option<super::GradualStatus>,
    /// With `serve --instances N`: each instance (the counts above are
    /// then the totals; the rest is the first instance's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceSummary>,
    /// The host is draining (`wasmhost drain`): it accepts no new
    /// connections.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// A standby follows this host (`crate::standby`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::standby::ReplicationStatus>,
}

/// One instance of `serve --instances N`, in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceSummary {
    pub generation: u64,
    /// The short hash of the component it runs.
    pub component: String,
    pub connections: usize,
    pub connections_total: u64,
    pub events: u64,
    pub traps: u64,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

pub fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Actor {
    pub(super) fn status(&self) -> StatusReport {
        let since = |t: SystemTime| t.elapsed().unwrap_or_default().as_secs_f64();
        StatusReport {
            service: self.spec.name.to_string(),
            pid: std::process::id(),
            component: ComponentInfo::of(&self.instance.program),
            generation: self.generation,
            uptime_s: since(self.started),
            generation_uptime_s: since(self.generation_started),
            listeners: self
                .spec
                .listeners
                .iter()
                .map(|(name, addr)| ListenerInfo {
                    name: name.clone(),
                    addr: addr.to_string(),
                })
                .collect(),
            connections: self.conns.len(),
            connections_total: self.stats.connections_total,
            events: self.stats.events,
            traps: self.stats.traps,
            timers: self.timer_keys.len(),
            previous: self.previous.as_deref().map(ComponentInfo::of),
            swaps: self.history.iter().cloned().collect(),
            durable: self.durable_status(),
            shadow: self.shadow_status(),
            gradual: self.gradual_status(),
            instances: Vec::new(),
            draining: crate::fleet::health().draining(),
            replication: crate::standby::status(),
        }
    }

    pub(super) fn record(&mut self, record: SwapRecord) {
        crate::fleet::metrics::swap_recorded(&record);
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(record);
    }
}
