//! The primary's side (the middle column of the protocol in `super`): the
//! migration port hands over a link whose first message is `Follow`, and
//! this ships the state-dir writer's output on it until the link or the
//! service ends.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use super::{EPOCH, FleetFile, Follow, Peer, Rep, Shipped, Sink, fail_at, set_status};
use crate::durable::disk;
use crate::migrate::link::{Link, LinkTx};
use crate::migrate::{Message, VERSION};
use crate::serve::ServeOptions;

/// How often the primary tells the standby its head, and checks the
/// synchronous deadline.
const TICK: Duration = Duration::from_millis(100);
const HEARTBEAT_TICKS: u32 = 5;

/// The longest one frame may take to send before the link is given up
/// (a standby that stopped reading, a link that black-holes).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers `EpochQuery` (fencing): this host's epoch and whether it serves.
pub async fn answer_epoch(link: &mut Link) -> Result<()> {
    let answer = Message::Epoch {
        epoch: EPOCH.load(Ordering::Acquire),
        serving: super::serving(),
    };
    link.send(&answer, &[]).await
}

/// Serves a standby's link: checks, the chain, then every write until the
/// link or the service ends.
pub async fn feed(mut link: Link, follow: Follow, opts: &ServeOptions) -> Result<()> {
    let peer = link.peer;
    if let Err(why) = check(&follow, opts) {
        let refusal = Message::Failed {
            step: "follow".into(),
            message: why.clone(),
        };
        link.send(&refusal, &[]).await?;
        bail!("refused standby {peer}: {why}");
    }
    let epoch = EPOCH.load(Ordering::Acquire);
    // Where this host asks the standby for its epoch: its --receive
    // address (a wildcard one names the address the link came from).
    let standby = follow.receive.clone().map(|mut r| {
        if r.addr.ip().is_unspecified() {
            r.addr.set_ip(peer.ip());
        }
        r
    });
    // Recorded before anything is shipped: from now on this state dir
    // exists on another host, and a restart must ask that host first.
    if let (Some(dir), Some(standby)) = (&opts.durable.state_dir, &standby) {
        let mut fleet = FleetFile::read(dir)?.unwrap_or_default();
        fleet.epoch = epoch;
        fleet.standby = Some(standby.clone());
        fleet.write(dir)?;
    }
    let following = Message::Following {
        epoch,
        service: opts.name.clone(),
    };
    link.send(&following, &[]).await?;
    if fail_at("component") {
        bail!("test: {}=component", super::FAIL_ENV);
    }
    // Synchronous only once the standby has the chain and keeps up
    // (`Feeding::check_deadline`): the chain's transfer holds no reply.
    let (sink, mut source) = Sink::new(false);
    let sync_flag = sink.sync.clone();
    if fail_at("base") {
        bail!("test: {}=base", super::FAIL_ENV);
    }
    disk::follow(sink)
        .await
        .map_err(|why| anyhow!("cannot attach the standby: {why}"))?;
    let sync = opts.replication.sync;
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
        based: false,
        timeout: opts.replication.sync_timeout,
        have: follow.components.iter().cloned().collect(),
        peer: peer.to_string(),
    };
    feeding.report(epoch, true);
    let ended = feeding.run(&mut source, &mut acks).await;
    reader.abort();
    // Was the standby promoted? Then this host was failed over: it stops
    // (every later write fails, and no held reply is released).
    let promoted = match (&ended, &standby) {
        (Ok(End::Detached), _) | (_, None) => None,
        (_, Some(standby)) => promoted_since(standby, opts, epoch).await,
    };
    match &promoted {
        Some(why) => {
            tracing::error!("{why}");
            super::fence_now(why.clone());
            feeding.fail_all(why);
        }
        None => feeding.release_all(),
    }
    source.close();
    feeding.report(epoch, false);
    tx.close().await;
    match ended {
        Ok(end) => {
            tracing::warn!(standby = %peer, "the standby's link ended: {}", end.describe());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Asks a standby that went away whether it was promoted: `Some(why)` if
/// it was (at a higher epoch than this host's).
async fn promoted_since(standby: &Peer, opts: &ServeOptions, epoch: u64) -> Option<String> {
    let tls = opts.tls.as_ref()?;
    let limit = opts.replication.sync_timeout.max(Duration::from_secs(1));
    let asked = tokio::time::timeout(limit, super::ask_epoch(standby, tls)).await;
    match asked {
        Ok(Ok((theirs, _))) if theirs > epoch => Some(format!(
            "fenced: the standby at {} was promoted (epoch {theirs}, this host {epoch}); this host \
             was failed over and stops serving. Start it as that host's standby (`serve \
             --standby-of {}`)",
            standby.addr, standby.addr
        )),
        _ => None,
    }
}

/// Why this host does not take a standby now.
fn check(follow: &Follow, opts: &ServeOptions) -> Result<(), String> {
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
    if follow.receive.is_none() {
        return Err(
            "the standby gave no --receive address: a primary records where its standby is, to \
             ask it at its next start whether it was promoted (fencing)"
                .into(),
        );
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

/// Why a standby's link ended without an error.
enum End {
    /// The writer let go of it (the service ended or moved, another standby
    /// attached, or it fell too far behind).
    Detached,
    /// The standby closed it.
    Lost,
}

impl End {
    fn describe(&self) -> &'static str {
        match self {
            End::Detached => {
                "the service's state-dir writer let go of it (the service ended or moved, another \
                 standby attached, or it fell too far behind)"
            }
            End::Lost => "the standby closed it",
        }
    }
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
    /// Whether the chain was sent whole.
    based: bool,
    timeout: Duration,
    /// The components the standby has.
    have: HashSet<String>,
    peer: String,
}

struct Pending {
    seq: u64,
    at: Instant,
    len: usize,
    done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

impl Feeding<'_> {
    /// Ships until the writer or the link ends.
    async fn run(
        &mut self,
        source: &mut super::Source,
        acks: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
    ) -> Result<End> {
        let mut tick = tokio::time::interval(TICK);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                item = source.next() => match item {
                    Some(item) => self.ship(item).await?,
                    None => return Ok(End::Detached),
                },
                ack = acks.recv() => match ack {
                    Some(seq) => self.acked(seq),
                    None => return Ok(End::Lost),
                },
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(HEARTBEAT_TICKS) {
                        let beat = Rep::Heartbeat {
                            seq: self.shipped,
                            unix_ms: crate::service::unix_ms(std::time::SystemTime::now()),
                        };
                        self.send(beat, &[]).await?;
                    }
                    // `status` and `/metrics` see the lag at this pace.
                    self.report(EPOCH.load(Ordering::Acquire), true);
                }
            }
            self.check_deadline();
        }
    }

    async fn send(&mut self, rep: Rep, payload: &[u8]) -> Result<()> {
        tokio::time::timeout(
            SEND_TIMEOUT,
            self.tx.send(&Message::Replicate(rep), &[payload]),
        )
        .await
        .map_err(|_| anyhow!("the standby took no data for {SEND_TIMEOUT:?}"))?
    }

    /// Sends component `hash` unless the standby has it.
    async fn component(&mut self, hash: &str) -> Result<()> {
        if self.have.contains(hash) {
            return Ok(());
        }
        let bytes = super::component_bytes(hash)?;
        self.send(Rep::Component { hash: hash.into() }, &bytes)
            .await?;
        self.have.insert(hash.into());
        Ok(())
    }

    async fn ship(&mut self, item: Shipped) -> Result<()> {
        let (rep, bytes) = match item {
            Shipped::File { name, bytes } => (Rep::File { name }, bytes),
            Shipped::BaseEnd { component } => {
                self.component(&component).await?;
                self.based = true;
                (Rep::BaseEnd { component }, bytes::Bytes::new())
            }
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
                self.component(&component).await?;
                (Rep::Snapshot { n, component }, bytes)
            }
        };
        self.send(rep, &bytes).await
    }

    fn acked(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.pending.front().is_some_and(|p| p.seq <= seq) {
            let p = self.pending.pop_front().expect("a pending append");
            if let Some(done) = p.done {
                let _ = done.send(Ok(()));
            }
        }
    }

    /// `--sync-standby`: a standby that does not acknowledge in time no
    /// longer holds replies back; one that has the chain and keeps up
    /// (its oldest unacknowledged append younger than half the timeout)
    /// holds them again.
    fn check_deadline(&mut self) {
        if !self.sync {
            return;
        }
        let oldest = self.pending.front().map(|p| p.at.elapsed());
        let waits = self.sync_flag.load(Ordering::Acquire);
        if waits && oldest.is_some_and(|age| age > self.timeout) {
            self.sync_flag.store(false, Ordering::Release);
            tracing::warn!(
                standby = %self.peer,
                "the standby did not acknowledge within {:?}: replies no longer wait for it \
                 (asynchronous until it catches up; a failover now may lose the last writes)",
                self.timeout
            );
            self.release_all();
            self.report(EPOCH.load(Ordering::Acquire), true);
        } else if !waits && self.based && oldest.is_none_or(|age| age < self.timeout / 2) {
            self.sync_flag.store(true, Ordering::Release);
            tracing::info!(
                standby = %self.peer,
                "the standby has the chain and keeps up: replies wait for it (--sync-standby)"
            );
            self.report(EPOCH.load(Ordering::Acquire), true);
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

    /// Fails every held append: their replies are never sent.
    fn fail_all(&mut self, why: &str) {
        for p in &mut self.pending {
            if let Some(done) = p.done.take() {
                let _ = done.send(Err(why.to_string()));
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
