//! Drain and canary: two versions of a stateless service live at once,
//! each with its own connections, and the new one takes over gradually.
//!
//! * **drain** (`swap --drain`): every new connection goes to the new
//!   version; the old one keeps its connections until they close. When the
//!   last one closes, or at `--drain-timeout` (the ones left are then moved
//!   to the new version, which gets `on-connect` for them), the new version
//!   is the only one.
//! * **canary** (`swap --canary PERCENT`): that share of new connections
//!   goes to the new version (exactly: every time the running sum of
//!   PERCENT passes 100), the rest to the old one. `wasmhost commit` turns
//!   it into a drain; `wasmhost abort` moves the new version's connections
//!   back to the old one (`on-connect`) and drops it.
//!
//! Only for services without shared state: both versions must declare it
//! with an empty `exportable()` (there is no state to carry, so a
//! connection can move between them with just `on-connect`). A service
//! with state gets a shadow swap instead (`swap --shadow`).
//!
//! Each version's effects reach only its own connections; its timers are
//! its own (the host's timer table tags them). A trap in the new version
//! aborts the drain or canary at once: its connections go back to the old
//! version, except the one whose event trapped, which is closed. A trap in
//! the old version is recovered as always (a fresh restart for a stateless
//! guest, announced its own connections only).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio_util::time::delay_queue;

use super::recovery::{Call, base_after_init};
use super::report::{ComponentInfo, SwapRecord, unix_ms};
use super::state::Effect;
use super::swap::{Prepared, reap};
use super::transfer::root;
use super::{Actor, Instance, MAX_TIMERS};

/// `swap --drain` / `swap --canary`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GradualOptions {
    /// `None`: drain (every new connection to the new version); a share in
    /// percent: canary.
    #[serde(default)]
    pub canary_percent: Option<u8>,
    /// How long the old version keeps its connections once every new
    /// connection goes to the new version.
    pub drain_timeout_ms: u64,
}

/// A drain or canary, for `status` and the control commands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GradualStatus {
    /// `canary` or `drain` (a canary becomes a drain on commit).
    pub mode: String,
    /// `running`, `done` (the new version is the only one) or `aborted`.
    pub state: String,
    /// The share of new connections that go to the new version.
    pub percent: u8,
    pub old: VersionStatus,
    pub new: VersionStatus,
    /// While draining: seconds until the old version's connections are
    /// moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_left_s: Option<f64>,
    pub age_s: f64,
    /// How it ended, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

/// One version's side of a drain or canary: counted since it started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VersionStatus {
    pub component: ComponentInfo,
    pub connections: usize,
    pub connections_total: u64,
    pub events: u64,
    pub traps: u64,
}

/// The new version while both serve.
pub(super) struct Side {
    pub(super) instance: Instance,
    /// `Some(share)` while a canary; `None` once draining.
    canary: Option<u8>,
    /// `canary` or `drain`, as it started (for the swap history).
    kind: &'static str,
    /// The running sum that picks the canary's connections.
    picked: u32,
    drain_timeout: Duration,
    /// Set once draining: when the old version's connections are moved.
    drain_deadline: Option<Instant>,
    /// Its armed timers (tagged as its own in the actor's timer table).
    pub(super) timer_keys: HashMap<u64, delay_queue::Key>,
    /// Its connections closed by an effect, whose `on-close` is due.
    pub(super) closing: VecDeque<u64>,
    /// Its open connections.
    pub(super) conns: usize,
    /// It trapped (why, and the connection whose event it was): it is
    /// aborted at the top of the actor's loop, and gets no event before.
    failed: Option<(String, Option<u64>)>,
    connections_total: u64,
    events: u64,
    traps: u64,
    /// The old version's counters when it started.
    old_events: u64,
    old_traps: u64,
    old_connections_total: u64,
    started: Instant,
}

impl Actor {
    /// `swap --drain` / `--canary`: starts the prepared version beside the
    /// running one. The outer error is fatal for the service; the inner
    /// one says why nothing was started.
    pub(super) async fn start_side(
        &mut self,
        prepared: Prepared,
        opts: GradualOptions,
    ) -> Result<Result<GradualStatus, String>> {
        let what = match opts.canary_percent {
            Some(_) => "a canary",
            None => "a drain",
        };
        if let Some(why) = self.busy() {
            return Ok(Err(format!("{what} cannot start: {why}")));
        }
        if let Some(why) = &self.stopped {
            return Ok(Err(format!(
                "the service is stopped ({why}); swap in a fixed version with --fresh"
            )));
        }
        if let Some(p) = opts.canary_percent
            && !(1..=99).contains(&p)
        {
            return Ok(Err(format!(
                "--canary takes a share from 1 to 99 percent, not {p} (100 is --drain)"
            )));
        }
        let exportable = match self.instance.exportable().await {
            Ok(formats) => formats,
            Err(trap) => return self.old_trapped("exportable()", trap).await,
        };
        let refuse = |which: &str, formats: &[String]| {
            format!(
                "{what} needs a service without shared state, and the {which} version exports \
                 [{}]: its connections share that state, so two versions cannot serve side by \
                 side. Use `swap --shadow` (or a plain swap). A guest declares it has no shared \
                 state with an empty exportable()",
                formats.join(", ")
            )
        };
        if !exportable.is_empty() {
            return Ok(Err(refuse("running", &exportable)));
        }
        let Prepared {
            instance: mut new, ..
        } = prepared;
        match new.init(&self.spec.config).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Ok(Err(format!("the new version's init failed: {msg}"))),
            Err(trap) => {
                return Ok(Err(format!(
                    "the new version trapped in init: {}",
                    root(&trap)
                )));
            }
        }
        // Asked after `init`: what a version exports depends on its state.
        match new.exportable().await {
            Ok(formats) if formats.is_empty() => {}
            Ok(formats) => return Ok(Err(refuse("new", &formats))),
            Err(trap) => {
                return Ok(Err(format!(
                    "the new version trapped in exportable(): {}",
                    root(&trap)
                )));
            }
        }
        let drain_timeout = Duration::from_millis(opts.drain_timeout_ms);
        self.side = Some(Side {
            instance: new,
            canary: opts.canary_percent,
            kind: what.trim_start_matches("a "),
            picked: 0,
            drain_timeout,
            drain_deadline: opts
                .canary_percent
                .is_none()
                .then(|| Instant::now() + drain_timeout),
            timer_keys: HashMap::new(),
            closing: VecDeque::new(),
            conns: 0,
            failed: None,
            connections_total: 0,
            events: 0,
            traps: 0,
            old_events: self.stats.events,
            old_traps: self.stats.traps,
            old_connections_total: self.stats.connections_total,
            started: Instant::now(),
        });
        self.last_gradual = None;
        let effects = self.side_mut().instance.take_effects();
        self.apply_side(effects);
        let status = self.gradual_status().expect("just started");
        tracing::info!(
            service = &*self.spec.name,
            to = %status.new.component.path,
            "{} started: {}% of new connections go to the new version",
            status.mode,
            status.percent
        );
        Ok(Ok(status))
    }

    fn side_mut(&mut self) -> &mut Side {
        self.side.as_mut().expect("a drain or canary runs")
    }

    /// Why no other swap, shadow, drain or upgrade may start now.
    pub(super) fn busy(&self) -> Option<String> {
        if let Some(why) = self.shadow_busy() {
            return Some(why);
        }
        let side = self.side.as_ref()?;
        let what = match side.canary {
            Some(_) => "a canary",
            None => "a drain",
        };
        Some(format!(
            "{what} of {} is running: {}",
            side.instance.program.path.display(),
            match side.canary {
                Some(_) => "`wasmhost commit` or `wasmhost abort` it first",
                None => "wait until it is done (`wasmhost status`), or `wasmhost abort` it",
            }
        ))
    }

    /// Whether a new connection goes to the new version.
    pub(super) fn side_takes_new(&mut self) -> bool {
        let Some(side) = &mut self.side else {
            return false;
        };
        let taken = match side.canary {
            None => true,
            Some(share) => {
                side.picked += u32::from(share);
                if side.picked >= 100 {
                    side.picked -= 100;
                    true
                } else {
                    false
                }
            }
        };
        if taken {
            side.conns += 1;
            side.connections_total += 1;
        }
        taken
    }

    /// Delivers one event to the new version, then `on-close` for the
    /// connections its effects closed.
    pub(super) async fn deliver_side(&mut self, call: Call<'_>) -> Result<()> {
        self.call_side_once(call).await?;
        self.deliver_closes().await
    }

    pub(super) async fn call_side_once(&mut self, call: Call<'_>) -> Result<()> {
        let Some(side) = &mut self.side else {
            return Ok(());
        };
        if side.failed.is_some() {
            return Ok(());
        }
        side.events += 1;
        match call.run(&mut side.instance).await {
            Ok(()) => {
                let effects = side.instance.take_effects();
                self.apply_side(effects);
                Ok(())
            }
            Err(trap) => {
                let side = self.side_mut();
                side.traps += 1;
                let what = call.describe();
                tracing::error!(
                    service = &*self.spec.name,
                    "the new version trapped in {what}: {trap:#}"
                );
                let culprit = match call {
                    Call::Connect(info) => Some(info.id),
                    Call::Data(id, _) => Some(id),
                    Call::Close(_) | Call::Timer(_) => None,
                };
                let why = format!("the new version trapped in {what}: {}", root(&trap));
                self.side_mut().failed = Some((why, culprit));
                Ok(())
            }
        }
    }

    /// The new version's effects: on its own connections and timers only.
    fn apply_side(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(id, data) => self.send(id, data, true),
                Effect::Close(id) => {
                    if self.conns.get(&id).is_some_and(|c| c.side)
                        && let Some(conn) = self.remove_conn(id)
                    {
                        conn.outbox.close();
                        self.side_mut().closing.push_back(id);
                    }
                }
                Effect::SetTimer(token, delay) => {
                    let side = self.side.as_mut().expect("a drain or canary runs");
                    if let Some(key) = side.timer_keys.get(&token) {
                        self.timers.reset(key, delay);
                    } else if side.timer_keys.len() < MAX_TIMERS {
                        let key = self.timers.insert((token, true), delay);
                        side.timer_keys.insert(token, key);
                    }
                }
                Effect::CancelTimer(token) => {
                    let side = self.side.as_mut().expect("a drain or canary runs");
                    if let Some(key) = side.timer_keys.remove(&token) {
                        self.timers.remove(&key);
                    }
                }
            }
        }
    }

    /// The new version's timer `token` fired.
    pub(super) async fn side_timer(&mut self, token: u64) -> Result<()> {
        let Some(side) = &mut self.side else {
            return Ok(());
        };
        side.timer_keys.remove(&token);
        self.deliver_side(Call::Timer(token)).await
    }

    /// `wasmhost abort`, or a trap in the new version: its connections go
    /// back to the old version (`on-connect`), except `culprit` (closed),
    /// and it is dropped.
    pub(super) async fn abort_side(&mut self, why: String, culprit: Option<u64>) -> Result<()> {
        let Some(side) = self.side.take() else {
            return Ok(());
        };
        let side_kind = side.kind;
        let mut status = self.status_of(&side, "aborted");
        status.ended = Some(why.clone());
        for key in side.timer_keys.values() {
            self.timers.remove(key);
        }
        let moved = self.conn_ids(true);
        // Closed by the new version, their `on-close` due: it is gone.
        let closed = side.closing.len();
        tracing::warn!(
            service = &*self.spec.name,
            to = %side.instance.program.path.display(),
            moved = moved.len(),
            closed,
            "{} aborted: {why}; its connections go back to the running version",
            status.mode
        );
        self.record(SwapRecord {
            at_unix_ms: unix_ms(SystemTime::now()),
            kind: side_kind.into(),
            from: ComponentInfo::of(&self.instance.program),
            to: status.new.component.clone(),
            format: None,
            state_bytes: 0,
            pause_us: 0,
            outcome: format!("aborted: {why}"),
            migrate: None,
        });
        reap(Box::new(side));
        for id in moved {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            conn.side = false;
            if Some(id) == culprit {
                tracing::warn!(
                    service = &*self.spec.name,
                    conn = id,
                    "closing the connection whose event made the new version trap"
                );
                if let Some(conn) = self.conns.remove(&id) {
                    conn.outbox.close();
                }
                continue;
            }
            let info = conn.info.clone();
            self.deliver(Call::Connect(&info)).await?;
        }
        self.last_gradual = Some(status);
        Ok(())
    }

    /// `wasmhost commit` of a canary: every new connection goes to the new
    /// version from now on, and the old one drains.
    pub(super) fn commit_side(&mut self) -> Result<GradualStatus, String> {
        let side = self.side_mut();
        if side.canary.is_none() {
            return Err(
                "a drain is running: it is done when the old version's connections have closed \
                 or at its timeout (`wasmhost status` shows both); `wasmhost abort` moves them \
                 all back"
                    .into(),
            );
        }
        side.canary = None;
        side.drain_deadline = Some(Instant::now() + side.drain_timeout);
        tracing::info!(
            service = &*self.spec.name,
            "canary committed: every new connection goes to the new version; the old one drains"
        );
        Ok(self.gradual_status().expect("running"))
    }

    /// When a draining old version's connections are to be moved.
    pub(super) fn drain_deadline(&self) -> Option<Instant> {
        self.side.as_ref().and_then(|s| s.drain_deadline)
    }

    /// At the top of the actor's loop: a new version that trapped is
    /// aborted; a drain whose old version has no connection left (or whose
    /// timeout passed) ends with the new version alone.
    pub(super) async fn tend_side(&mut self) -> Result<()> {
        let Some(side) = &mut self.side else {
            return Ok(());
        };
        if let Some((why, culprit)) = side.failed.take() {
            return self.abort_side(why, culprit).await;
        }
        let Some(deadline) = side.drain_deadline else {
            return Ok(());
        };
        let old_conns = self.conns.len().saturating_sub(side.conns);
        if old_conns > 0 && Instant::now() < deadline {
            return Ok(());
        }
        // Timed out: the old version's connections move to the new one.
        let moved = self.conn_ids(false);
        if !moved.is_empty() {
            tracing::info!(
                service = &*self.spec.name,
                "drain timeout: moving the old version's {} connections to the new version",
                moved.len()
            );
        }
        for id in &moved {
            if let Some(conn) = self.conns.get_mut(id) {
                conn.side = true;
                let info = conn.info.clone();
                self.side_mut().conns += 1;
                self.deliver_side(Call::Connect(&info)).await?;
            }
        }
        if let Some((why, culprit)) = self.side.as_mut().and_then(|s| s.failed.take()) {
            return self.abort_side(why, culprit).await;
        }
        // The old version's own `on-close` calls are due no more.
        self.closing.clear();
        let Some(side) = self.side.take() else {
            return Ok(()); // the new version trapped on a moved connection
        };
        self.promote(side, moved.len()).await
    }

    /// The new version becomes the only one: its timers become the host's,
    /// the old instance is dropped.
    async fn promote(&mut self, side: Side, moved: usize) -> Result<()> {
        let side_kind = side.kind;
        let mut status = self.status_of(&side, "done");
        status.ended = Some(match moved {
            0 => "the old version's connections all closed".into(),
            n => format!("drain timeout: {n} connections moved to the new version"),
        });
        let timers: Vec<(u64, Instant)> = side
            .timer_keys
            .iter()
            .map(|(&token, key)| (token, self.timers.deadline(key).into_std()))
            .collect();
        let Side { instance, .. } = side;
        let connections = self.conns.len();
        let old = self.commit(instance, true);
        for (token, deadline) in timers {
            self.set_timer(token, deadline.saturating_duration_since(Instant::now()));
        }
        for conn in self.conns.values_mut() {
            conn.side = false;
        }
        let base = base_after_init(&self.instance);
        self.start_journal(base, &[], None, false).await;
        tracing::info!(
            service = &*self.spec.name,
            from = %old.path.display(),
            to = %self.instance.program.path.display(),
            connections,
            "{} done: the new version serves alone (generation {})",
            status.mode,
            self.generation
        );
        self.record(SwapRecord {
            at_unix_ms: unix_ms(SystemTime::now()),
            kind: side_kind.into(),
            from: ComponentInfo::of(&old),
            to: status.new.component.clone(),
            format: None,
            state_bytes: 0,
            pause_us: 0,
            outcome: "committed".into(),
            migrate: None,
        });
        self.last_gradual = Some(status);
        Ok(())
    }

    /// The running drain or canary, or the last one.
    pub(super) fn gradual_status(&self) -> Option<GradualStatus> {
        match &self.side {
            Some(side) => Some(self.status_of(side, "running")),
            None => self.last_gradual.clone(),
        }
    }

    fn status_of(&self, side: &Side, state: &str) -> GradualStatus {
        GradualStatus {
            mode: match side.canary {
                Some(_) => "canary",
                None => "drain",
            }
            .into(),
            state: state.into(),
            percent: side.canary.unwrap_or(100),
            old: VersionStatus {
                component: ComponentInfo::of(&self.instance.program),
                connections: self.conns.len().saturating_sub(side.conns),
                connections_total: self.stats.connections_total - side.old_connections_total,
                events: self.stats.events - side.old_events,
                traps: self.stats.traps - side.old_traps,
            },
            new: VersionStatus {
                component: ComponentInfo::of(&side.instance.program),
                connections: side.conns,
                connections_total: side.connections_total,
                events: side.events,
                traps: side.traps,
            },
            drain_left_s: side
                .drain_deadline
                .filter(|_| state == "running")
                .map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64()),
            age_s: side.started.elapsed().as_secs_f64(),
            ended: None,
        }
    }
}
