//! The primary's side (the middle column of the protocol in `super`): the
//! migration port hands over a link whose first message is `Follow`, and
//! this ships the state-dir writer's output on it until the link or the
//! service ends.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use super::{EPOCH, FleetFile, Follow, Rep, Shipped, Sink, fail_at, set_status};
use crate::durable::disk;
use crate::migrate::link::{Link, LinkTx};
use crate::migrate::{Message, VERSION};
use crate::serve::ServeOptions;

/// How often the primary tells the standby its head, and checks the
/// synchronous deadline.
const TICK: Duration = Duration::from_millis(100);
const HEARTBEAT_TICKS: u32 = 5;

/// Answers `EpochQuery` (fencing): this host's epoch and whether it serves.
pub async fn answer_epoch(link: &mut Link) -> Result<()> {
    let answer = Message::Epoch {
        epoch: EPOCH.load(Ordering::Acquire),
        serving: super::serving(),
    };
    link.send(&answer, &[]).await
}

/// Serves a standby's link: checks, the component, the chain, then every
/// write until the link or the service ends.
pub async fn feed(mut link: Link, follow: Follow, opts: &ServeOptions) -> Result<()> {
    let peer = link.peer;
    match check(&follow, opts).await {
        Ok(()) => {}
        Err(why) => {
            let refusal = Message::Failed {
                step: "follow".into(),
                message: why.clone(),
            };
            link.send(&refusal, &[]).await?;
            bail!("refused standby {peer}: {why}");
        }
    }
    let (hash, component) = running_component().await?;
    let epoch = EPOCH.load(Ordering::Acquire);
    let following = Message::Following {
        epoch,
        service: opts.name.clone(),
        component: hash.clone(),
    };
    link.send(&following, &[]).await?;
    if fail_at("component") {
        bail!("test: {}=component", super::FAIL_ENV);
    }
    if follow.component.as_deref() != Some(hash.as_str()) {
        let rep = Message::Replicate(Rep::Component { hash: hash.clone() });
        link.send(&rep, &[&component]).await?;
    }
    let sync = opts.replication.sync;
    let (sink, mut source) = Sink::new(sync);
    let sync_flag = sink.sync.clone();
    if fail_at("base") {
        bail!("test: {}=base", super::FAIL_ENV);
    }
    disk::follow(sink)
        .await
        .map_err(|why| anyhow!("cannot attach the standby: {why}"))?;
    if let (Some(dir), Some(standby)) = (&opts.durable.state_dir, &follow.receive) {
        let mut fleet = FleetFile::read(dir)?.unwrap_or_default();
        fleet.epoch = epoch;
        fleet.standby = Some(standby.clone());
        fleet.write(dir)?;
    }
    tracing::info!(
        standby = %peer,
        sync,
        "a standby follows this host's state dir (epoch {epoch})"
    );
    let (mut rx, mut tx) = link.into_split();
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let reader = tokio::spawn(async move {
        loop {
            match rx.recv::<Message>(0).await {
                Ok((Message::Ack { seq }, _)) => {
                    if acks_tx.send(seq).is_err() {
                        return;
                    }
                }
                Ok((other, _)) => {
                    tracing::warn!("standby {peer} sent {other:?}; closing its link");
                    return;
                }
                Err(_) => return,
            }
        }
    });
    let mut feeding = Feeding {
        tx: &mut tx,
        pending: VecDeque::new(),
        shipped: 0,
        acked: 0,
        sync,
        sync_flag,
        timeout: opts.replication.sync_timeout,
        component: hash,
        peer: peer.to_string(),
    };
    feeding.report(epoch, true);
    let ended = feeding.run(&mut source, &mut acks).await;
    reader.abort();
    feeding.release_all();
    source.close();
    feeding.report(epoch, false);
    tx.close().await;
    match ended {
        Ok(why) => {
            tracing::warn!(standby = %peer, "the standby's link ended: {why}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Why this host does not take a standby now.
async fn check(follow: &Follow, opts: &ServeOptions) -> Result<(), String> {
    if follow.version != VERSION {
        return Err(format!(
            "the standby speaks link version {}, this host {VERSION}: run the same wasmhost on both",
            follow.version
        ));
    }
    if opts.durable.state_dir.is_none() {
        return Err(
            "this host keeps no state dir: a primary needs --state-dir to be followed".into(),
        );
    }
    if !super::serving() {
        return Err("this host serves no service now".into());
    }
    let epoch = EPOCH.load(Ordering::Acquire);
    if follow.epoch > epoch {
        return Err(format!(
            "the standby's state dir is at epoch {}, this host's at {epoch}: this host was \
             failed over and must not be followed (the standby was promoted since)",
            follow.epoch
        ));
    }
    if fail_at("follow") {
        return Err(format!("test: {}=follow", super::FAIL_ENV));
    }
    Ok(())
}

/// The running component's hash and bytes (the file it was loaded from,
/// checked against the hash it was loaded with).
async fn running_component() -> Result<(String, Vec<u8>)> {
    let ctx = crate::fleet::health()
        .service()
        .context("this host serves no service now")?;
    let status = crate::control::server::status(&ctx)
        .await
        .map_err(|e| anyhow!("the service does not answer: {e}"))?;
    let path = &status.component.path;
    let bytes = std::fs::read(path).with_context(|| format!("reading the component {path}"))?;
    let hash = hex::encode(Sha256::digest(&bytes));
    if hash != status.component.hash {
        bail!(
            "{path} changed on disk since the service loaded it: the standby cannot be sent the \
             running component (swap to the file on disk first)"
        );
    }
    Ok((hash, bytes))
}

struct Feeding<'a> {
    tx: &'a mut LinkTx,
    /// Appends shipped and not yet acknowledged: sequence number, when,
    /// bytes, and (synchronous) the completion that releases their replies.
    pending: VecDeque<Pending>,
    shipped: u64,
    acked: u64,
    /// `--sync-standby`.
    sync: bool,
    /// Whether the writer holds appends for the standby now.
    sync_flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    timeout: Duration,
    /// The component the standby has.
    component: String,
    peer: String,
}

struct Pending {
    seq: u64,
    at: Instant,
    len: usize,
    done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

impl Feeding<'_> {
    /// Ships until the writer or the link ends; `Ok` says why it ended.
    async fn run(
        &mut self,
        source: &mut super::Source,
        acks: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
    ) -> Result<String> {
        let mut tick = tokio::time::interval(TICK);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                item = source.next() => match item {
                    Some(item) => self.ship(item).await?,
                    None => {
                        return Ok("the service's state-dir writer detached it (the service \
                                   ended or moved, another standby attached, or it fell too \
                                   far behind)".into())
                    }
                },
                ack = acks.recv() => match ack {
                    Some(seq) => self.acked(seq),
                    None => return Ok("the link was lost".into()),
                },
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(HEARTBEAT_TICKS) {
                        let beat = Rep::Heartbeat {
                            seq: self.shipped,
                            unix_ms: crate::service::unix_ms(std::time::SystemTime::now()),
                        };
                        self.tx.send(&Message::Replicate(beat), &[]).await?;
                    }
                    self.check_deadline();
                }
            }
            self.report(EPOCH.load(Ordering::Acquire), true);
        }
    }

    async fn ship(&mut self, item: Shipped) -> Result<()> {
        let (rep, bytes) = match item {
            Shipped::File { name, bytes } => (Rep::File { name }, bytes),
            Shipped::BaseEnd => (Rep::BaseEnd, bytes::Bytes::new()),
            Shipped::Journal { n } => (Rep::Journal { n }, bytes::Bytes::new()),
            Shipped::Append {
                n,
                seq,
                bytes,
                done,
            } => {
                if fail_at("stream") && seq > 1 {
                    if let Some(done) = done {
                        let _ = done.send(Ok(()));
                    }
                    bail!("test: {}=stream", super::FAIL_ENV);
                }
                self.shipped = seq;
                self.pending.push_back(Pending {
                    seq,
                    at: Instant::now(),
                    len: bytes.len(),
                    done,
                });
                (Rep::Append { n, seq }, bytes)
            }
            Shipped::Snapshot {
                n,
                component,
                bytes,
            } => {
                if component != self.component {
                    let (hash, file) = running_component().await?;
                    if hash != component {
                        bail!(
                            "snapshot {n} was written by component {}, and the service runs {} \
                             now: the standby starts again from the chain",
                            &component[..12.min(component.len())],
                            &hash[..12]
                        );
                    }
                    let rep = Message::Replicate(Rep::Component { hash: hash.clone() });
                    self.tx.send(&rep, &[&file]).await?;
                    self.component = hash;
                }
                (Rep::Snapshot { n }, bytes)
            }
        };
        self.tx.send(&Message::Replicate(rep), &[&bytes]).await
    }

    fn acked(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.pending.front().is_some_and(|p| p.seq <= seq) {
            let p = self.pending.pop_front().expect("a pending append");
            if let Some(done) = p.done {
                let _ = done.send(Ok(()));
            }
        }
        if self.sync && !self.sync_flag.load(Ordering::Acquire) && self.pending.is_empty() {
            self.sync_flag.store(true, Ordering::Release);
            tracing::info!(
                standby = %self.peer,
                "the standby caught up: replies wait for it again (--sync-standby)"
            );
        }
    }

    /// `--sync-standby`: a standby that does not acknowledge in time no
    /// longer holds replies back, until it catches up.
    fn check_deadline(&mut self) {
        let late = self
            .pending
            .front()
            .is_some_and(|p| p.at.elapsed() > self.timeout);
        if self.sync && late && self.sync_flag.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                standby = %self.peer,
                "the standby did not acknowledge within {:?}: replies no longer wait for it \
                 (asynchronous until it catches up; a failover now may lose the last writes)",
                self.timeout
            );
            self.release_all();
        }
    }

    /// Completes every held append (the records are on this host's disk).
    fn release_all(&mut self) {
        for p in &mut self.pending {
            if let Some(done) = p.done.take() {
                let _ = done.send(Ok(()));
            }
        }
    }

    fn report(&self, epoch: u64, connected: bool) {
        let lag_bytes = self.pending.iter().map(|p| p.len as u64).sum();
        let lag_ms = self
            .pending
            .front()
            .map_or(0, |p| p.at.elapsed().as_millis() as u64);
        set_status(|s| {
            s.role = "primary".into();
            s.epoch = epoch;
            s.peer = Some(self.peer.clone());
            s.connected = connected;
            s.sync = connected && self.sync && self.sync_flag.load(Ordering::Acquire);
            s.shipped_seq = self.shipped;
            s.acked_seq = self.acked;
            s.lag_bytes = if connected { lag_bytes } else { 0 };
            s.lag_ms = if connected { lag_ms } else { 0 };
        });
    }
}
