//! Warm standby and failover (`serve --standby-of`, `--sync-standby`,
//! `wasmhost promote`, fencing): a primary killed with SIGKILL behind a real
//! HAProxy, the standby promoted, and every acknowledged write read back;
//! and each phase of the replication protocol failed on purpose.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wasmhost_tests::fleet::{Client, Haproxy, agent_line, free_ports, missing};
use wasmhost_tests::standby::{
    Pki, RECEIVING, Writers, primary, promote, standby, wait_following, wait_status,
};
use wasmhost_tests::{Served, guest, test_cache_dir, wasmhost_bin};

fn set_get(addr: SocketAddr, key: &str, value: &str) {
    let mut c = Client::connect(addr).expect("connect to kv");
    assert_eq!(c.call(&["SET", key, value]).unwrap(), "+OK");
    assert_eq!(c.call(&["GET", key]).unwrap(), value);
}

#[test]
fn sync_standby_takes_over_a_killed_primary_behind_haproxy_and_loses_no_acknowledged_write() {
    if let Some(why) = missing("haproxy") {
        eprintln!("SKIPPED sync_standby_takes_over_a_killed_primary: {why}");
        return;
    }
    let pki = Pki::new();
    let ports = free_ports(7);
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let (dir_a, dir_b) = (pki.state_dir("a"), pki.state_dir("b"));
    let hosts: Vec<String> = (0..4).map(addr).collect();
    // Small snapshot thresholds: snapshots are shipped during the run.
    let a_args = [
        "--snapshot-events",
        "300",
        "--listen",
        &hosts[0],
        "--agent-check",
        &hosts[1],
        "--sync-standby",
    ];
    let (a, a_port) = primary(&pki, &dir_a, &a_args, &[]);
    let b_args = [
        "--snapshot-events",
        "300",
        "--listen",
        &hosts[2],
        "--agent-check",
        &hosts[3],
    ];
    let mut b = standby(&pki, a_port, &dir_b, &b_args, &[]);
    wait_following(&mut b);
    let b_agent: SocketAddr = addr(3).parse().unwrap();
    assert_eq!(
        agent_line(b_agent).trim(),
        "maint",
        "a standby is out of rotation"
    );
    let status = a.command("status", &[]).stdout;
    assert!(
        status.contains("synchronous"),
        "the primary waits for its standby: {status}"
    );

    // HAProxy's example configuration: host0 the primary, host1 the
    // standby, host2 nothing.
    let dir = tempfile::tempdir().unwrap();
    let hosts = [
        (addr(0), ports[1]),
        (addr(2), ports[3]),
        (addr(5), ports[6]),
    ];
    let haproxy = Haproxy::example(dir.path(), &addr(4), hosts);
    haproxy.wait_server("kv", "host0", Duration::from_secs(20), |s, w| {
        s == "UP" && w > 0
    });
    let front: SocketAddr = addr(4).parse().unwrap();
    let writers = Writers::start(front, 4);
    let deadline = Instant::now() + Duration::from_secs(30);
    while writers.acked() < 1500 {
        assert!(Instant::now() < deadline, "the writers got too few replies");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The primary's machine is lost.
    a.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    let acked_at_kill = writers.acked();
    promote(&b);
    let promote_took = killed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(first) = writers.replied_after(killed + promote_took) {
            break first;
        }
        assert!(
            Instant::now() < deadline,
            "no reply through HAProxy after the promotion: {:?}\n{}",
            haproxy.servers("kv"),
            b.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_millis(300));
    let acked = writers.finish();
    eprintln!(
        "failover: SIGKILL to promoted in {promote_took:?}, to the first reply through HAProxy \
         in {:?}; {acked_at_kill} writes acknowledged before the kill, {} in all",
        first - killed,
        acked.len()
    );
    assert!(
        b.stderr().contains("state from the standby's live copy"),
        "the standby started from its live copy, as after a crash:\n{}",
        b.stderr()
    );
    // Every acknowledged write is there, read through HAProxy.
    let mut c = Client::connect(front).unwrap();
    let mut lost = Vec::new();
    for (key, value) in &acked {
        let got = c.call(&["GET", key]).unwrap();
        if &got != value {
            lost.push(format!("{key}={value} reads {got}"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );

    // The old primary comes back: it asks the promoted standby and
    // refuses to serve.
    let mut c = Command::new(wasmhost_bin());
    c.arg("serve")
        .arg(guest("kv"))
        .args(a_args)
        .arg("--state-dir")
        .arg(&dir_a)
        .args(pki.args())
        .arg("--no-control")
        .arg("--cache-dir")
        .arg(test_cache_dir());
    let back = wasmhost_tests::run_command_for(&mut c, Duration::from_secs(30));
    assert!(
        !back.status.success(),
        "the old primary served:\n{}",
        back.stderr
    );
    assert!(
        back.stderr.contains("fenced"),
        "it says why: {}",
        back.stderr
    );

    // It follows the new primary instead: its dir, of the old epoch, is
    // replaced by a copy of the new primary's.
    let b_port = b.printed_addr(RECEIVING);
    let mut a2 = standby(&pki, b_port, &dir_a, &[], &[]);
    wait_following(&mut a2);
    wait_status(&a2, Duration::from_secs(5), "epoch 2", |r| r["epoch"] == 2);
    drop(haproxy);
}

#[test]
fn a_standby_follows_a_swap_under_sync_replication_and_serves_the_new_version() {
    let pki = Pki::new();
    let (dir_a, dir_b) = (pki.state_dir("a"), pki.state_dir("b"));
    let (a, a_port) = primary(&pki, &dir_a, &["--sync-standby"], &[]);
    let mut b = standby(&pki, a_port, &dir_b, &["--listen", "127.0.0.1:0"], &[]);
    wait_following(&mut b);
    set_get(a.addr(), "before", "1");
    // A swap starts a new chain, written by another component: the
    // standby gets that component.
    a.swap_to("kv-v2");
    set_get(a.addr(), "after", "2");
    wait_status(&b, Duration::from_secs(10), "caught up", |r| {
        r["acked_seq"].as_u64() >= Some(1) && r["acked_seq"] == r["shipped_seq"]
    });
    let kv_v2 = std::fs::read(guest("kv-v2")).unwrap();
    let v2_file = dir_b.join(format!("component-{}.wasm", kv_v2_hash()));
    assert_eq!(
        std::fs::read(&v2_file).ok(),
        Some(kv_v2),
        "the standby has the running component"
    );
    drop(a);
    let (addr, said) = promote(&b);
    assert!(said.contains("epoch 2"), "{said}");
    let mut c = Client::connect(addr).unwrap();
    assert_eq!(c.call(&["GET", "before"]).unwrap(), "1");
    assert_eq!(c.call(&["GET", "after"]).unwrap(), "2");
    let status = b.command("status", &[]).stdout;
    assert!(
        status.contains(&kv_v2_hash()[..12]),
        "serves kv-v2: {status}"
    );
    assert!(
        b.stderr().contains("state from the standby's live copy"),
        "the live copy was rebuilt with kv-v2 and served:\n{}",
        b.stderr()
    );
}

/// A live copy that fails (its replay, on purpose) is dropped, and the
/// promotion replays the state dir instead: the state is the same.
#[test]
fn a_standby_whose_live_copy_failed_promotes_from_its_state_dir() {
    let pki = Pki::new();
    let (dir_a, dir_b) = (pki.state_dir("a"), pki.state_dir("b"));
    let (a, a_port) = primary(&pki, &dir_a, &["--sync-standby"], &[]);
    set_get(a.addr(), "k", "1");
    let env = [("WASMHOST_TEST_STANDBY_FAIL", "replay")];
    let mut b = standby(&pki, a_port, &dir_b, &["--listen", "127.0.0.1:0"], &env);
    wait_following(&mut b);
    set_get(a.addr(), "k2", "2");
    b.wait_for_output(|t| t.contains("live copy stopped"), Duration::from_secs(10));
    drop(a);
    let (addr, _) = promote(&b);
    assert!(
        b.stderr().contains("state restored from"),
        "promoted from the state dir:\n{}",
        b.stderr()
    );
    let mut c = Client::connect(addr).unwrap();
    assert_eq!(c.call(&["GET", "k"]).unwrap(), "1");
    assert_eq!(c.call(&["GET", "k2"]).unwrap(), "2");
}

fn kv_v2_hash() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(guest("kv-v2")).unwrap()))
}

/// The primary's replication status.
fn replication(host: &Served) -> serde_json::Value {
    let out = host.command("status", &["--json"]);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    status["replication"].clone()
}

#[test]
fn a_standby_that_stops_acknowledging_stops_holding_replies_until_it_catches_up() {
    let pki = Pki::new();
    let (dir_a, dir_b) = (pki.state_dir("a"), pki.state_dir("b"));
    let (a, a_port) = primary(
        &pki,
        &dir_a,
        &["--sync-standby", "--sync-timeout-ms", "300"],
        &[],
    );
    let mut b = standby(&pki, a_port, &dir_b, &[], &[]);
    wait_following(&mut b);
    set_get(a.addr(), "k0", "0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while replication(&a)["sync"] != true {
        assert!(
            Instant::now() < deadline,
            "never synchronous: {}",
            replication(&a)
        );
        set_get(a.addr(), "k0", "0");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The standby stops (SIGSTOP): the next reply waits for it, then the
    // primary gives up waiting.
    b.signal(nix::sys::signal::Signal::SIGSTOP);
    let began = Instant::now();
    set_get(a.addr(), "k1", "1");
    let held = began.elapsed();
    assert!(
        held >= Duration::from_millis(250),
        "a reply was released before the standby acknowledged it ({held:?})"
    );
    assert!(held < Duration::from_secs(5), "held {held:?}");
    let r = replication(&a);
    assert_eq!(
        r["sync"], false,
        "asynchronous while the standby is stopped: {r}"
    );
    // Later replies do not wait.
    let began = Instant::now();
    set_get(a.addr(), "k2", "2");
    assert!(began.elapsed() < Duration::from_millis(250));
    // It resumes, catches up, and replies wait for it again.
    b.signal(nix::sys::signal::Signal::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        set_get(a.addr(), "k3", "3");
        let r = replication(&a);
        if r["sync"] == true && r["connected"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never synchronous again: {r}\n{}",
            a.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        a.stderr().contains("did not acknowledge within"),
        "{}",
        a.stderr()
    );
}

#[test]
fn a_primary_whose_standby_was_promoted_beside_it_stops_serving() {
    let pki = Pki::new();
    let (dir_a, dir_b) = (pki.state_dir("a"), pki.state_dir("b"));
    let (mut a, a_port) = primary(&pki, &dir_a, &[], &[]);
    set_get(a.addr(), "k", "1");
    let mut b = standby(&pki, a_port, &dir_b, &["--listen", "127.0.0.1:0"], &[]);
    wait_following(&mut b);
    // Promoted by mistake while the primary lives (a partition, a wrong
    // keepalived state): the primary learns it and stops.
    let (addr, _) = promote(&b);
    a.wait_for_output(
        |t| t.contains("fenced: the standby at"),
        Duration::from_secs(10),
    );
    let mut c = Client::connect(a.addr()).unwrap();
    let reply = c.call(&["SET", "k", "2"]);
    assert!(reply.is_err(), "the fenced primary answered {reply:?}");
    let status = a.command("status", &[]);
    assert!(
        status.stdout.contains("fenced") || status.stderr.contains("fenced"),
        "status says why: {}{}",
        status.stdout,
        status.stderr
    );
    // The promoted standby has the write the old primary acknowledged.
    assert_eq!(
        Client::connect(addr).unwrap().call(&["GET", "k"]).unwrap(),
        "1"
    );
}

/// Each phase of the protocol failed on purpose: the primary serves on,
/// and the standby recovers once the fault is gone.
#[test]
fn every_phase_of_following_fails_safely() {
    let pki = Pki::new();
    for phase in [
        "connect",
        "follow",
        "component",
        "base",
        "stream",
        "promote",
    ] {
        let primary_side = matches!(phase, "follow" | "component" | "stream");
        let env = [("WASMHOST_TEST_STANDBY_FAIL", phase)];
        let none: &[(&str, &str)] = &[];
        let (p_env, s_env) = match primary_side {
            true => (&env[..], none),
            false => (none, &env[..]),
        };
        let (dir_a, dir_b) = (
            pki.state_dir(&format!("{phase}-a")),
            pki.state_dir(&format!("{phase}-b")),
        );
        let sync: &[&str] = match phase {
            "stream" => &["--sync-standby", "--sync-timeout-ms", "200"],
            _ => &[],
        };
        let (a, a_port) = primary(&pki, &dir_a, sync, p_env);
        set_get(a.addr(), "k", "1");
        let mut b = standby(&pki, a_port, &dir_b, &["--listen", "127.0.0.1:0"], s_env);
        let failed = format!("STANDBY_FAIL={phase}");
        match phase {
            "promote" => {
                wait_following(&mut b);
                let out = b.command("promote", &[]);
                assert!(!out.status.success(), "promote failed on purpose");
                assert!(
                    out.stderr.contains("STANDBY_FAIL=promote"),
                    "{}",
                    out.stderr
                );
                // Still a standby, following.
                wait_status(&b, Duration::from_secs(10), "following after", |r| {
                    r["connected"] == true
                });
            }
            "stream" => {
                // It fails at the second append after each attach.
                wait_following(&mut b);
                set_get(a.addr(), "s1", "1");
                set_get(a.addr(), "s2", "2");
                b.wait_for_output(|t| t.contains("closed"), Duration::from_secs(20));
            }
            // The primary closes the link after `Following`.
            "component" => b.wait_for_output(|t| t.contains("closed"), Duration::from_secs(20)),
            _ => b.wait_for_output(|t| t.contains(&failed), Duration::from_secs(20)),
        }
        // The primary serves on, its replies not held back.
        let began = Instant::now();
        set_get(a.addr(), &format!("{phase}-after"), "2");
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{phase}: the primary's replies were held back"
        );
        // With the fault gone the standby catches up and can serve.
        if !primary_side {
            drop(b);
            let mut b = standby(&pki, a_port, &dir_b, &["--listen", "127.0.0.1:0"], &[]);
            wait_following(&mut b);
            set_get(a.addr(), "last", "3");
            wait_status(&b, Duration::from_secs(10), "caught up", |r| {
                r["acked_seq"].as_u64() >= Some(1) && r["acked_seq"] == r["shipped_seq"]
            });
            drop(a);
            let (addr, _) = promote(&b);
            let mut c = Client::connect(addr).unwrap();
            assert_eq!(c.call(&["GET", "k"]).unwrap(), "1", "{phase}");
            assert_eq!(c.call(&["GET", "last"]).unwrap(), "3", "{phase}");
        }
    }
}

#[test]
fn a_standby_copy_never_promoted_and_an_unreachable_standby_refuse_to_serve() {
    let pki = Pki::new();
    let (dir_a, dir_b) = (pki.state_dir("a"), pki.state_dir("b"));
    let (a, a_port) = primary(&pki, &dir_a, &[], &[]);
    set_get(a.addr(), "k", "1");
    let mut b = standby(&pki, a_port, &dir_b, &[], &[]);
    wait_following(&mut b);
    drop(b);
    drop(a);
    let serve = |dir: &Path, extra: &[&str]| {
        let mut c = Command::new(wasmhost_bin());
        c.arg("serve")
            .arg(guest("kv"))
            .args(["--listen", "127.0.0.1:0", "--no-control", "--state-dir"])
            .arg(dir)
            .args(pki.args())
            .args(extra)
            .arg("--cache-dir")
            .arg(test_cache_dir());
        c
    };
    // The standby's copy, started as a primary.
    let out = wasmhost_tests::run_command_for(&mut serve(&dir_b, &[]), Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(out.stderr.contains("standby's copy"), "{}", out.stderr);
    // The primary, whose standby is gone: it cannot ask.
    let out = wasmhost_tests::run_command_for(&mut serve(&dir_a, &[]), Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(out.stderr.contains("--no-fence"), "{}", out.stderr);
    // Told that the standby is gone for good, it serves its state.
    let mut c = serve(&dir_a, &["--no-fence"]);
    let served = Served::spawn(
        {
            c.env("WASMHOST_LOG", "info");
            c
        },
        PathBuf::new(),
        tempfile::tempdir().unwrap(),
        |t| t.contains("listening on "),
    );
    let mut client = Client::connect(served.addr()).unwrap();
    assert_eq!(client.call(&["GET", "k"]).unwrap(), "1");
}

/// `--promote-fifo`: keepalived's notify FIFO promotes the standby when its
/// VRRP instance becomes MASTER (the lines are keepalived's format; the
/// keepalived tests of `fleet.rs` run the daemon itself).
#[test]
fn keepalived_saying_master_on_the_notify_fifo_promotes_the_standby() {
    let pki = Pki::new();
    let (dir_a, dir_b) = (pki.state_dir("a"), pki.state_dir("b"));
    let (a, a_port) = primary(&pki, &dir_a, &["--sync-standby"], &[]);
    set_get(a.addr(), "k", "1");
    let fifo = pki.state_dir("notify.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let fifo_arg = fifo.display().to_string();
    let mut b = standby(
        &pki,
        a_port,
        &dir_b,
        &[
            "--listen",
            "127.0.0.1:0",
            "--promote-fifo",
            &fifo_arg,
            "--promote-instance",
            "VI_1",
        ],
        &[],
    );
    wait_following(&mut b);
    let mut notify = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    use std::io::Write;
    // Other instances and other states do not promote.
    writeln!(notify, "INSTANCE \"VI_2\" MASTER 100").unwrap();
    writeln!(notify, "INSTANCE \"VI_1\" BACKUP 100").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!b.stderr().contains("promoted at epoch"), "{}", b.stderr());
    drop(a);
    writeln!(notify, "INSTANCE \"VI_1\" MASTER 100").unwrap();
    b.wait_for_output(
        |t| t.contains("promoted at epoch 2"),
        Duration::from_secs(20),
    );
    let text = b.stderr();
    let line = text
        .lines()
        .find(|l| l.contains("promoted at epoch 2"))
        .unwrap();
    let addr: SocketAddr = line.rsplit(' ').next().unwrap().trim().parse().unwrap();
    assert_eq!(
        Client::connect(addr).unwrap().call(&["GET", "k"]).unwrap(),
        "1"
    );
}
