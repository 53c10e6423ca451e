//! `serve --instances N`: one service on N instances, for a guest without
//! shared state (an empty `exportable()`), so that guest code runs on
//! several cores.
//!
//! Each instance has its own actor, exactly as a single service has: its
//! own store, connections, timers and journal. The listeners are accepted
//! by one set of accept loops, which hand each new connection to the
//! instance with the fewest open connections ([`Spread`]); a connection
//! stays on its instance until it closes.
//!
//! A swap or rollback replaces every instance at one update point, all or
//! none. The control task prepares (instantiates) one new instance per
//! actor, off the actors, then sends each actor its swap with a shared
//! [`GroupGate`]:
//!
//! 1. each actor, at its own update point, starts its new instance (`init`
//!    and `on-connect` for its connections; the effects are held, as in any
//!    fresh start) and checks that the new version has no state either;
//! 2. it then reports to the gate (ready, or failed with the reason) and
//!    waits, serving nothing, for the gate's decision;
//! 3. when every actor is ready, all commit; when one fails, every actor
//!    drops its new instance and keeps serving the old version, and the swap
//!    fails with that actor's reason. An actor that never reports (it is
//!    stuck in a guest call) fails the swap after [`GATE_TIMEOUT`].
//!
//! So the pause is the slowest actor's start plus the wait for the others,
//! and no instance ever serves the new version while another serves the
//! old one. `WASMHOST_TEST_INSTANCE_FAIL=I` makes instance I (0-based) fail
//! at step 2, for the tests.
//!
//! What a single service can do and N instances cannot (refused, with the
//! reason): shadow swaps, drain and canary, snapshots, `--state-dir`, and
//! host upgrade.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::transfer::root;
use super::{Instance, ServiceHandle};

/// How long an actor that is ready waits for the others.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The decision every member of a group swap waits for.
pub struct GroupGate {
    members: usize,
    ready: AtomicUsize,
    decision: watch::Sender<Option<Result<(), String>>>,
}

impl std::fmt::Debug for GroupGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupGate")
            .field("members", &self.members)
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .finish()
    }
}

impl GroupGate {
    pub fn new(members: usize) -> Arc<GroupGate> {
        Arc::new(GroupGate {
            members,
            ready: AtomicUsize::new(0),
            decision: watch::Sender::new(None),
        })
    }

    /// Member `index` cannot commit: every member aborts. The first
    /// failure is the reason all of them give.
    pub fn fail(&self, index: usize, why: &str) {
        self.decision.send_if_modified(|d| match d {
            None => {
                *d = Some(Err(format!(
                    "instance {index} of {}: {why}; every instance keeps the old version",
                    self.members
                )));
                true
            }
            Some(_) => false,
        });
    }

    /// Why the group swap failed, once it has.
    pub fn failure(&self) -> Option<String> {
        match &*self.decision.borrow() {
            Some(Err(why)) => Some(why.clone()),
            _ => None,
        }
    }

    /// Member `index` is ready to commit; waits for the decision (commit
    /// when every member is ready, the first failure otherwise).
    pub async fn ready(&self, index: usize) -> Result<(), String> {
        if test_fail(index) {
            self.fail(index, "failed on purpose (WASMHOST_TEST_INSTANCE_FAIL)");
        } else if self.ready.fetch_add(1, Ordering::AcqRel) + 1 == self.members {
            self.decision.send_if_modified(|d| {
                let undecided = d.is_none();
                d.get_or_insert(Ok(()));
                undecided
            });
        }
        let mut rx = self.decision.subscribe();
        let decided = tokio::time::timeout(GATE_TIMEOUT, rx.wait_for(Option::is_some)).await;
        match decided {
            Ok(Ok(decision)) => decision.clone().expect("waited for a decision"),
            Ok(Err(_)) => unreachable!("the gate's sender lives as long as the gate"),
            Err(_) => {
                self.fail(
                    index,
                    &format!(
                        "another instance did not get ready within {}s",
                        GATE_TIMEOUT.as_secs()
                    ),
                );
                let decision = self.decision.borrow().clone();
                decision.expect("just decided")
            }
        }
    }
}

/// What runs as several instances must keep no state (an empty
/// `exportable()`, asked after `init`: what a version exports depends on
/// its state), since each copy would hold a different part of it. `who`
/// names the instance in the reason ("the service", "the new version").
pub async fn require_stateless(instance: &mut Instance, who: &str) -> Result<(), String> {
    match instance.exportable().await {
        Ok(formats) if formats.is_empty() => Ok(()),
        Ok(formats) => Err(format!(
            "{who} keeps state (its exportable() lists {}), so it cannot run as several \
             instances: each would hold a different part of it; serve it with --instances 1",
            formats.join(", ")
        )),
        Err(trap) => Err(format!("{who} trapped in exportable(): {}", root(&trap))),
    }
}

fn test_fail(index: usize) -> bool {
    std::env::var("WASMHOST_TEST_INSTANCE_FAIL").is_ok_and(|v| v == index.to_string())
}

/// The instances of a service and how many connections each has open, for
/// the accept loops to hand each new connection to the least loaded.
pub struct Spread {
    handles: Vec<ServiceHandle>,
    load: Vec<AtomicUsize>,
}

impl Spread {
    pub fn new(handles: Vec<ServiceHandle>) -> Arc<Spread> {
        let load = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Arc::new(Spread { handles, load })
    }

    /// The instance with the fewest open connections (the lowest index of
    /// those tied), counted as one more until the returned guard drops.
    pub fn pick(self: &Arc<Spread>) -> (ServiceHandle, LoadGuard) {
        let (index, _) = self
            .load
            .iter()
            .enumerate()
            .min_by_key(|(i, l)| (l.load(Ordering::Acquire), *i))
            .expect("a group has instances");
        self.load[index].fetch_add(1, Ordering::AcqRel);
        let guard = LoadGuard {
            spread: self.clone(),
            index,
        };
        (self.handles[index].clone(), guard)
    }
}

/// One open connection of an instance; dropped when its task ends.
pub struct LoadGuard {
    spread: Arc<Spread>,
    index: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.spread.load[self.index].fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_ready_commit_and_one_failure_aborts_all() {
        let gate = GroupGate::new(3);
        let (a, b, c) = tokio::join!(gate.ready(0), gate.ready(1), gate.ready(2));
        assert!(a.is_ok() && b.is_ok() && c.is_ok());

        let gate = GroupGate::new(3);
        let failing = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            gate.fail(2, "the new version trapped in init");
            Err::<(), String>("own reason".into())
        };
        let (a, b, c) = tokio::join!(gate.ready(0), gate.ready(1), failing);
        let why = a.unwrap_err();
        assert!(
            why.contains("instance 2 of 3: the new version trapped"),
            "{why}"
        );
        assert_eq!(b.unwrap_err(), why);
        assert!(c.is_err());
    }
}
