//! Helpers for the warm standby tests and benchmarks: certificates for
//! hosts on 127.0.0.1, a primary (`serve kv --state-dir --receive`) and a
//! standby (`serve --standby-of`), and waiting on a standby's status.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmhost::migrate::TlsFiles;
use wasmhost::migrate::link::testing::Ca;

use crate::fleet::Client;
use crate::{Served, guest, test_cache_dir, wasmhost_bin};

pub const RECEIVING: &str = "receiving services on ";

/// Certificates for the hosts of a test (all on 127.0.0.1).
pub struct Pki {
    dir: tempfile::TempDir,
    pub tls: TlsFiles,
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("wasmhost standby test CA");
        let tls = ca.host(dir.path(), "host", &["127.0.0.1"]);
        Pki { dir, tls }
    }

    pub fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.tls.cert.display().to_string(),
            "--tls-key".into(),
            self.tls.key.display().to_string(),
            "--tls-ca".into(),
            self.tls.ca.display().to_string(),
        ]
    }

    /// A state dir for a host.
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `serve kv --state-dir DIR --receive 127.0.0.1:0 ...`: a primary.
pub fn primary(
    pki: &Pki,
    dir: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Served, SocketAddr) {
    let mut all: Vec<String> = vec![
        "--state-dir".into(),
        dir.display().to_string(),
        "--receive".into(),
        "127.0.0.1:0".into(),
    ];
    all.extend(pki.args());
    all.extend(args.iter().map(|a| a.to_string()));
    if !args.contains(&"--listen") {
        all.extend(["--listen".into(), "127.0.0.1:0".into()]);
    }
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut served = Served::start_with(&guest("kv"), &all, 1, |bin| {
        let mut command = Command::new(bin);
        command.envs(envs.iter().copied());
        command
    });
    let port = served.printed_addr(RECEIVING);
    (served, port)
}

/// `serve --standby-of PRIMARY --state-dir DIR --receive 127.0.0.1:0 ...`.
pub fn standby(
    pki: &Pki,
    of: SocketAddr,
    dir: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Served {
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("control.sock");
    let mut c = Command::new(wasmhost_bin());
    c.arg("serve")
        .arg("--standby-of")
        .arg(of.to_string())
        .arg("--state-dir")
        .arg(dir)
        .args(["--receive", "127.0.0.1:0"])
        .args(pki.args())
        .args(args)
        .arg("--control")
        .arg(&control)
        .arg("--cache-dir")
        .arg(test_cache_dir())
        .envs(envs.iter().copied());
    Served::spawn(c, control, control_dir, |text| text.contains("standby of "))
}

/// Waits until the standby's `status` satisfies `pred` (its replication
/// section as JSON); panics with the status and the logs after `limit`.
pub fn wait_status(
    standby: &Served,
    limit: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let out = standby.command("status", &["--json"]);
        let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        if pred(&status["replication"]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: status says {}\n{}\n---\n{}",
            out.stdout,
            out.stderr,
            standby.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the standby has its primary's chain and is following.
pub fn wait_following(standby: &mut Served) {
    standby.wait_for_output(
        |t| t.contains("standby has the primary's chain"),
        Duration::from_secs(30),
    );
    wait_status(standby, Duration::from_secs(10), "following", |r| {
        r["connected"] == true && r["role"] == "standby"
    });
}

/// Writers that SET distinct keys through `front` until stopped,
/// reconnecting after any error; they keep every key whose `+OK` arrived.
pub struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    /// When each writer last had a reply.
    last_reply: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    pub fn start(front: SocketAddr, count: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let last_reply = Arc::new(Mutex::new(vec![Instant::now(); count]));
        let threads = (0..count)
            .map(|t| {
                let (stop, acked, last_reply) = (stop.clone(), acked.clone(), last_reply.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let Ok(mut c) = Client::connect(front) else {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        };
                        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                            n += 1;
                            let (key, value) = (format!("w{t}-{n}"), format!("v{n}"));
                            match c.call(&["SET", &key, &value]) {
                                Ok(reply) if reply == "+OK" => {
                                    acked.lock().unwrap().insert(key, value);
                                    last_reply.lock().unwrap()[t] = Instant::now();
                                }
                                _ => break,
                            }
                        }
                    }
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            last_reply,
            threads,
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// The first reply any writer had after `t`, if one did.
    pub fn replied_after(&self, t: Instant) -> Option<Instant> {
        self.last_reply
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|&r| r > t)
            .min()
    }

    pub fn finish(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// `wasmhost promote` on `standby`, which must succeed: where the promoted
/// service listens, and what `promote` printed.
pub fn promote(standby: &Served) -> (SocketAddr, String) {
    let out = standby.command("promote", &[]);
    assert!(
        out.status.success(),
        "promote: {}\n{}",
        out.stderr,
        standby.stderr()
    );
    let addr = out
        .stdout
        .rsplit(' ')
        .next()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in `{}`", out.stdout));
    (addr, out.stdout)
}
