//! The standby's side (the left-hand column of the protocol in `super`):
//! `serve --standby-of ADDR` connects to the primary's migration port,
//! writes what it ships as the same files in its own state dir, and
//! acknowledges each append; `promote` ends it.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::{EPOCH, FleetFile, Follow, MAX_PAYLOAD, Peer, Rep, fail_at, set_status};
use crate::durable::disk::{self, Fsync};
use crate::migrate::link::{Link, TlsFiles};
use crate::migrate::{Message, VERSION};

/// A component in a standby's state dir: `component-<hash>.wasm`.
pub fn component_path(dir: &Path, hash: &str) -> PathBuf {
    dir.join(format!("component-{hash}.wasm"))
}

/// The hashes of the components in `dir`.
fn components(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let hash = name.strip_prefix("component-")?.strip_suffix(".wasm")?;
            Some(hash.to_string())
        })
        .collect()
}

/// Removes the components of `dir` but `keep`.
fn keep_component(dir: &Path, keep: &str) {
    for hash in components(dir) {
        if hash != keep {
            let _ = std::fs::remove_file(component_path(dir, &hash));
        }
    }
}

/// How long a standby waits for the next frame (the primary sends a
/// heartbeat every 500 ms) before it gives the link up.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a standby waits between two attempts to reach its primary.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// `serve --standby-of`'s settings.
#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// The primary's migration port.
    pub primary: SocketAddr,
    /// The name the primary's certificate must carry.
    pub primary_name: String,
    pub dir: PathBuf,
    pub tls: TlsFiles,
    /// This host's own migration port, told to the primary for fencing.
    pub receive: Option<Peer>,
    /// When appends are synced (`--fsync`): `always` syncs before each
    /// acknowledgement.
    pub fsync: Fsync,
    /// The service's settings (name, config, limits, compile cache), for
    /// the live copy.
    pub serve: crate::serve::ServeOptions,
}

/// A `promote` request; answered once the service serves (or why not).
pub struct Promotion {
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// A standby promoted: what to serve, and whom to tell.
pub struct Promoted {
    pub component: PathBuf,
    pub epoch: u64,
    pub reply: oneshot::Sender<Result<String, String>>,
    /// The live copy, when it has every write of the state dir (else the
    /// service starts by replaying the dir, as after a crash).
    pub warm: Option<crate::serve::WarmStart>,
}

/// The standby's live copy of the service (`service::Replica`): rebuilt
/// from the state dir when a chain or a snapshot arrives, then every
/// append replayed with its effects discarded. It runs on a task of its
/// own, so replaying never delays an acknowledgement.
struct Warm {
    tx: mpsc::UnboundedSender<WarmCmd>,
}

enum WarmCmd {
    /// The dir has a new chain or snapshot: rebuild from it.
    Reload,
    Journal(u64),
    /// Records written to journal `n` at `offset`.
    Append(u64, u64, Vec<u8>),
    /// Catch up, and hand the copy over.
    Finish(oneshot::Sender<Option<crate::serve::WarmStart>>),
}

impl Warm {
    fn start(opts: &FollowOptions) -> Warm {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let dir = opts.dir.clone();
        let serve = opts.serve.clone();
        tokio::spawn(async move {
            let runtime = match crate::engine::Runtime::new(serve.cache.clone()) {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::warn!("no live copy on this standby ({e:#}): a promotion replays");
                    return;
                }
            };
            let spec = crate::service::ServiceSpec {
                name: serve.name.as_str().into(),
                config: serve.config.clone(),
                limits: serve.instance_limits.clone(),
                listeners: Vec::new(),
                durable: serve.durable.clone(),
            };
            let mut replica: Option<crate::service::Replica> = None;
            let mut queued: std::collections::VecDeque<WarmCmd> = Default::default();
            loop {
                let cmd = match queued.pop_front() {
                    Some(cmd) => cmd,
                    None => match rx.recv().await {
                        Some(cmd) => cmd,
                        None => return,
                    },
                };
                match cmd {
                    WarmCmd::Reload => {
                        // A later reload reads everything queued before it
                        // from the dir: skip to the last one.
                        while let Ok(cmd) = rx.try_recv() {
                            queued.push_back(cmd);
                        }
                        if let Some(last) =
                            queued.iter().rposition(|c| matches!(c, WarmCmd::Reload))
                        {
                            queued.drain(..=last);
                        }
                        replica = None;
                        match reload(&dir, &runtime, &spec).await {
                            Ok(r) => {
                                tracing::info!(
                                    "the standby's live copy is at snapshot {} and byte {} of \
                                     journal {}",
                                    r.snapshot,
                                    r.reached.1,
                                    r.reached.0
                                );
                                replica = Some(r);
                            }
                            Err(e) => tracing::warn!(
                                "the standby's live copy could not be rebuilt ({e:#}); a \
                                 promotion replays the state dir instead"
                            ),
                        }
                    }
                    WarmCmd::Journal(n) => {
                        if let Some(r) = &mut replica {
                            r.journal_started(n);
                        }
                    }
                    WarmCmd::Append(n, offset, bytes) => {
                        let applied = match (&mut replica, fail_at("replay")) {
                            (Some(_), true) => {
                                Err(anyhow::anyhow!("test: {}=replay", super::FAIL_ENV))
                            }
                            (Some(r), false) => r.apply(n, offset, &bytes).await,
                            (None, _) => Ok(()),
                        };
                        if let Err(e) = applied {
                            tracing::warn!(
                                "the standby's live copy stopped ({e:#}); a promotion replays \
                                 the state dir instead"
                            );
                            replica = None;
                        }
                    }
                    WarmCmd::Finish(reply) => {
                        let warm = replica.take().map(|replica| crate::serve::WarmStart {
                            runtime: runtime.clone(),
                            replica,
                        });
                        let _ = reply.send(warm);
                        return;
                    }
                }
            }
        });
        Warm { tx }
    }

    fn send(&self, cmd: WarmCmd) {
        let _ = self.tx.send(cmd);
    }

    /// The copy, once it has replayed everything sent to it, if it has
    /// exactly what `dir` holds.
    async fn finish(&self, dir: &Path) -> Option<crate::serve::WarmStart> {
        let (reply, answer) = oneshot::channel();
        self.send(WarmCmd::Finish(reply));
        let warm = answer.await.ok().flatten()?;
        let newest = disk::newest_header(dir).ok().flatten()?.number;
        let last = disk::last_journal(dir).ok().flatten()?;
        let replica = &warm.replica;
        if replica.snapshot != newest || replica.reached != last {
            tracing::warn!(
                "the live copy (snapshot {}, journal {} to byte {}) is not what the state dir \
                 holds (snapshot {newest}, journal {} to byte {}): replaying the dir instead",
                replica.snapshot,
                replica.reached.0,
                replica.reached.1,
                last.0,
                last.1
            );
            return None;
        }
        Some(warm)
    }
}

/// Rebuilds the live copy from what `dir` holds now.
async fn reload(
    dir: &Path,
    runtime: &crate::engine::Runtime,
    spec: &crate::service::ServiceSpec,
) -> Result<crate::service::Replica> {
    // Reading and checking the files is blocking work: off the runtime's
    // threads, which also serve the link.
    let path = dir.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || disk::load(&path))
        .await
        .context("the state dir's reader stopped")??
        .context("the state dir holds no snapshot")?;
    let path = component_path(dir, &loaded.header.component);
    let program = crate::serve::load_program(runtime, &path).await?;
    crate::service::Replica::load(program, spec, loaded).await
}

/// Follows the primary until promoted. Link failures are retried with
/// back-off for ever: a standby's job is to be there when it is needed.
pub async fn follow(
    opts: &FollowOptions,
    promotions: &mut mpsc::Receiver<Promotion>,
) -> Result<Promoted> {
    let fleet = FleetFile::read(&opts.dir)?.unwrap_or_default();
    EPOCH.store(fleet.epoch, Ordering::Release);
    let mut retry = RETRY_MIN;
    let warm = Warm::start(opts);
    loop {
        let mut session = Session::new(opts, &warm);
        let mut run = Box::pin(session.run());
        let (ended, promotion) = tokio::select! {
            ended = &mut run => (Some(ended), None),
            promotion = promotions.recv() => match promotion {
                Some(p) => (None, Some(p)),
                None => bail!("the control socket closed"),
            },
        };
        // A promotion writes the new epoch while the link is still open: a
        // primary that sees the link close and asks this host learns it
        // was failed over.
        let promoted = promotion.map(|p| promote(opts, p));
        drop(run);
        session.settle();
        let heard = session.heard;
        drop(session);
        match promoted {
            Some(Ok(mut promoted)) => {
                promoted.warm = warm.finish(&opts.dir).await;
                return Ok(promoted);
            }
            Some(Err(())) => continue,
            None => {}
        }
        let Some(ended) = ended else {
            continue;
        };
        match ended {
            Ok(()) => tracing::warn!(primary = %opts.primary, "the primary closed the link"),
            Err(e) => tracing::warn!(primary = %opts.primary, "following: {e:#}"),
        }
        if heard {
            retry = RETRY_MIN;
        }
        set_status(|s| {
            s.connected = false;
            s.sync = false;
        });
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            promotion = promotions.recv() => match promotion {
                Some(p) => if let Ok(mut promoted) = promote(opts, p) {
                    promoted.warm = warm.finish(&opts.dir).await;
                    return Ok(promoted);
                },
                None => bail!("the control socket closed"),
            },
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Stops following and makes this host the primary: epoch + 1 is written
/// before anything serves. `Err` once the reply says why not (the host
/// stays a standby).
fn promote(opts: &FollowOptions, p: Promotion) -> Result<Promoted, ()> {
    let refuse = |p: Promotion, why: String| {
        tracing::error!("promote refused: {why}");
        let _ = p.reply.send(Err(why));
        Err(())
    };
    if fail_at("promote") {
        return refuse(p, format!("test: {}=promote", super::FAIL_ENV));
    }
    let mut fleet = match FleetFile::read(&opts.dir) {
        Ok(fleet) => fleet.unwrap_or_default(),
        Err(e) => return refuse(p, format!("{e:#}")),
    };
    let header = match disk::newest_header(&opts.dir) {
        Ok(header) => header,
        Err(e) => return refuse(p, format!("{e:#}")),
    };
    let Some(header) = header.filter(|_| !fleet.copying) else {
        return refuse(
            p,
            format!(
                "{} holds no complete copy of a primary's state (the first copy did not finish): \
                 nothing to serve",
                opts.dir.display()
            ),
        );
    };
    let component = component_path(&opts.dir, &header.component);
    if !component.exists() {
        return refuse(
            p,
            format!(
                "{} lacks the component {} its newest snapshot needs",
                opts.dir.display(),
                &header.component[..12.min(header.component.len())]
            ),
        );
    }
    fleet.epoch += 1;
    fleet.primary = None;
    fleet.standby = None;
    if let Err(e) = fleet.write(&opts.dir) {
        return refuse(p, format!("cannot write the new epoch: {e:#}"));
    }
    EPOCH.store(fleet.epoch, Ordering::Release);
    super::clear_status();
    tracing::info!(
        "promoted: epoch {}; starting the service from {} as after a crash",
        fleet.epoch,
        opts.dir.display()
    );
    Ok(Promoted {
        component,
        epoch: fleet.epoch,
        reply: p.reply,
        warm: None,
    })
}

/// One link to the primary.
struct Session<'a> {
    opts: &'a FollowOptions,
    warm: &'a Warm,
    /// Whether the chain arrived whole (the link worked).
    heard: bool,
    /// The journal appends go to.
    /// The journal appends go to: its number, file and length.
    journal: Option<(u64, File, u64)>,
    dirty: bool,
    last_sync: Instant,
    /// The chain's files as they arrive (before `BaseEnd`).
    base: Option<HashSet<String>>,
    /// Start the dir afresh (the primary is of a newer epoch).
    wipe: bool,
    received: u64,
    acked: u64,
}

impl<'a> Session<'a> {
    fn new(opts: &'a FollowOptions, warm: &'a Warm) -> Session<'a> {
        Session {
            opts,
            warm,
            heard: false,
            journal: None,
            dirty: false,
            last_sync: Instant::now(),
            base: None,
            wipe: false,
            received: 0,
            acked: 0,
        }
    }

    async fn run(&mut self) -> Result<()> {
        let opts = self.opts;
        if fail_at("connect") {
            bail!("test: {}=connect", super::FAIL_ENV);
        }
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("creating {}", opts.dir.display()))?;
        let mut link = Link::connect(opts.primary, &opts.primary_name, &opts.tls).await?;
        let mut fleet = FleetFile::read(&opts.dir)?.unwrap_or_default();
        let follow = Follow {
            version: VERSION,
            epoch: fleet.epoch,
            receive: opts.receive.clone(),
            components: components(&opts.dir),
        };
        link.send(&Message::Follow(follow), &[]).await?;
        let (epoch, service) = match link.recv::<Message>(0).await? {
            (Message::Following { epoch, service }, _) => (epoch, service),
            (Message::Failed { message, .. }, _) => bail!("the primary refused: {message}"),
            (other, _) => bail!("expected Following, got {other:?}"),
        };
        if epoch < fleet.epoch {
            bail!(
                "the primary at {} is at epoch {epoch} and this state dir at {}: that host was \
                 failed over since, and this host does not follow it. Point --standby-of at the \
                 host that serves now",
                opts.primary,
                fleet.epoch
            );
        }
        // The dir is of another lineage (an older epoch): it is replaced.
        // The new epoch is written only once the copy is whole.
        self.wipe = epoch > fleet.epoch;
        set_status(|s| {
            s.role = "standby".into();
            s.epoch = epoch;
            s.peer = Some(opts.primary.to_string());
            s.connected = true;
            s.acked_seq = 0;
            s.shipped_seq = 0;
        });
        tracing::info!(primary = %opts.primary, "following `{service}` (epoch {epoch})");
        let mut caught_up_since = Instant::now();
        loop {
            let (message, payload) =
                tokio::time::timeout(READ_TIMEOUT, link.recv::<Message>(MAX_PAYLOAD))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("no word from the primary for {READ_TIMEOUT:?}")
                    })??;
            let Message::Replicate(rep) = message else {
                bail!("expected a replicated write, got {message:?}");
            };
            match rep {
                Rep::Component { hash } => {
                    let got = hex::encode(Sha256::digest(&payload));
                    if got != hash {
                        bail!("the component's bytes hash to {got}, not {hash}");
                    }
                    disk::write_atomic(&component_path(&opts.dir, &hash), &payload)?;
                }
                Rep::File { name } => {
                    if self.base.is_none() {
                        // Until the copy is whole, `promote` refuses and a
                        // start as a primary is refused (fencing).
                        fleet.copying = true;
                        fleet.primary = Some(opts.primary.to_string());
                        fleet.write(&opts.dir)?;
                        if self.wipe {
                            remove_files(&opts.dir, &HashSet::new())?;
                        }
                        self.base = Some(HashSet::new());
                    }
                    check_name(&name)?;
                    disk::write_atomic(&opts.dir.join(&name), &payload)?;
                    self.base.as_mut().expect("a base").insert(name);
                    if fail_at("base") {
                        bail!("test: {}=base", super::FAIL_ENV);
                    }
                }
                Rep::BaseEnd { component } => {
                    let base = self.base.take().unwrap_or_default();
                    remove_files(&opts.dir, &base)?;
                    let last = base
                        .iter()
                        .filter_map(|name| match disk::numbered(name) {
                            Some((disk::Kind::Journal, n)) => Some(n),
                            _ => None,
                        })
                        .max()
                        .context("the chain has no journal")?;
                    let path = disk::journal_path(&opts.dir, last);
                    let file = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .with_context(|| format!("opening {}", path.display()))?;
                    let len = file.metadata()?.len();
                    self.journal = Some((last, file, len));
                    keep_component(&opts.dir, &component);
                    fleet.epoch = epoch;
                    fleet.copying = false;
                    fleet.write(&opts.dir)?;
                    EPOCH.store(epoch, Ordering::Release);
                    self.heard = true;
                    self.warm.send(WarmCmd::Reload);
                    self.received = 0;
                    tracing::info!(
                        "standby has the primary's chain ({} files); following its writes",
                        base.len()
                    );
                }
                Rep::Journal { n } => {
                    self.sync_journal()?;
                    self.journal = Some((n, disk::create_journal(&opts.dir, n)?, 0));
                    self.warm.send(WarmCmd::Journal(n));
                }
                Rep::Append { n, seq } => {
                    let (at, file, len) = self
                        .journal
                        .as_mut()
                        .context("an append before the chain")?;
                    if *at != n {
                        bail!("an append to journal {n} while journal {at} is open");
                    }
                    file.write_all(&payload)
                        .with_context(|| format!("appending to journal {n}"))?;
                    let offset = *len;
                    *len += payload.len() as u64;
                    self.received += payload.len() as u64;
                    // To the live copy before anything else can fail: the
                    // bytes are on disk, and the copy must have them too.
                    self.warm.send(WarmCmd::Append(n, offset, payload));
                    self.dirty = true;
                    let due = match opts.fsync {
                        Fsync::Always => true,
                        Fsync::Everysec => self.last_sync.elapsed() >= Duration::from_secs(1),
                        Fsync::No => false,
                    };
                    if due {
                        self.sync_journal()?;
                    }
                    self.acked = seq;
                    link.send(&Message::Ack { seq }, &[]).await?;
                    caught_up_since = Instant::now();
                }
                Rep::Snapshot { n, component } => {
                    disk::write_snapshot(&opts.dir, n, &payload)?;
                    disk::remove_older(&opts.dir, n);
                    keep_component(&opts.dir, &component);
                    self.warm.send(WarmCmd::Reload);
                }
                Rep::Heartbeat { seq, .. } => {
                    if self.acked >= seq {
                        caught_up_since = Instant::now();
                    }
                    let (acked, received) = (self.acked, self.received);
                    set_status(|s| {
                        s.shipped_seq = seq;
                        s.acked_seq = acked;
                        s.received_bytes = received;
                        s.lag_ms = caught_up_since.elapsed().as_millis() as u64;
                    });
                }
            }
        }
    }

    fn sync_journal(&mut self) -> Result<()> {
        if let Some((n, file, _)) = &self.journal
            && self.dirty
        {
            file.sync_data()
                .with_context(|| format!("syncing journal {n}"))?;
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Syncs what was written (the link ended or the host is promoted).
    fn settle(&mut self) {
        if let Err(e) = self.sync_journal() {
            tracing::error!("{e:#}");
        }
    }
}

/// A file name a primary may ship: `snapshot-N.bin` or `journal-N.log`.
fn check_name(name: &str) -> Result<()> {
    if disk::numbered(name).is_some() {
        Ok(())
    } else {
        bail!("the primary sent a file named {name:?}, which is not a snapshot or a journal")
    }
}

/// Removes the snapshot and journal files of `dir` not in `keep`.
fn remove_files(dir: &Path, keep: &HashSet<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if check_name(&name).is_ok() && !keep.contains(&name) {
            std::fs::remove_file(dir.join(&name))
                .with_context(|| format!("removing {name} from {}", dir.display()))?;
        }
    }
    Ok(())
}

/// `--promote-fifo`: reads keepalived's `notify_fifo` and promotes this
/// standby when its VRRP instance (`instance`, or any) becomes MASTER.
/// keepalived writes one line per change, e.g. `INSTANCE "VI_1" MASTER 100`.
pub fn watch_fifo(path: PathBuf, instance: Option<String>, promote: mpsc::Sender<Promotion>) {
    let spawned = std::thread::Builder::new()
        .name("wasmhost-fifo".into())
        .spawn(move || {
            use std::io::BufRead;
            loop {
                // Blocks until keepalived opens it for writing; reopened
                // when keepalived restarts.
                let file = match File::open(&path) {
                    Ok(file) => file,
                    Err(e) => {
                        tracing::error!("--promote-fifo {}: {e}", path.display());
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                for line in std::io::BufReader::new(file).lines() {
                    let Ok(line) = line else { break };
                    if !is_master(&line, instance.as_deref()) {
                        continue;
                    }
                    tracing::info!("keepalived says `{line}`: promoting this standby");
                    let (reply, answer) = oneshot::channel();
                    if promote.blocking_send(Promotion { reply }).is_err() {
                        return;
                    }
                    match answer.blocking_recv() {
                        Ok(Ok(message)) => {
                            tracing::info!("{message}");
                            return;
                        }
                        Ok(Err(why)) => tracing::error!("promotion refused: {why}"),
                        Err(_) => return,
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot watch --promote-fifo: {e}");
    }
}

/// Whether a `notify_fifo` line says `instance` (or any instance) became
/// MASTER.
fn is_master(line: &str, instance: Option<&str>) -> bool {
    let mut words = line.split_whitespace();
    let (Some("INSTANCE"), Some(name), Some("MASTER")) = (words.next(), words.next(), words.next())
    else {
        return false;
    };
    instance.is_none_or(|want| name.trim_matches('"') == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_master_line_of_the_instance_promotes() {
        assert!(is_master(r#"INSTANCE "VI_1" MASTER 100"#, Some("VI_1")));
        assert!(is_master(r#"INSTANCE "VI_1" MASTER 100"#, None));
        assert!(!is_master(r#"INSTANCE "VI_2" MASTER 100"#, Some("VI_1")));
        assert!(!is_master(r#"INSTANCE "VI_1" BACKUP 100"#, Some("VI_1")));
        assert!(!is_master(r#"GROUP "G" MASTER 100"#, None));
        assert!(!is_master("", None));
    }

    #[test]
    fn only_state_files_may_be_shipped() {
        assert!(check_name("snapshot-00000000000000000003.bin").is_ok());
        assert!(check_name("journal-00000000000000000003.log").is_ok());
        assert!(check_name("../etc/passwd").is_err());
        assert!(check_name("fleet.json").is_err());
        assert!(check_name("journal-../x.log").is_err());
    }
}
