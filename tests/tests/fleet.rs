//! Running in a fleet: the admin endpoints, HAProxy's agent check, drain,
//! SIGTERM under systemd, and a rolling upgrade behind a real HAProxy.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmhost_tests::fleet::{Client, Haproxy, agent_line, free_ports, http_get, missing, scrape};
use wasmhost_tests::{Served, guest};

const ADMIN: &str = "admin endpoints on http://";
const AGENT: &str = "HAProxy agent check on ";

fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[test]
fn endpoints_agent_and_metrics_follow_a_drain() {
    let mut served = Served::start(
        "kv",
        &["--admin", "127.0.0.1:0", "--agent-check", "127.0.0.1:0"],
    );
    let (admin, agent) = (served.printed_addr(ADMIN), served.printed_addr(AGENT));
    assert_eq!(http_get(admin, "/livez"), (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/readyz"), (200, "ready\n".into()));
    assert_eq!(http_get(admin, "/nowhere").0, 404);
    assert_eq!(agent_line(agent), "up ready 100%\n");

    let mut client = Client::connect(served.addr()).unwrap();
    for i in 0..20 {
        assert_eq!(client.call(&["SET", &format!("k{i}"), "v"]).unwrap(), "+OK");
    }
    let info = client.call(&["INFO", "replication"]).unwrap();
    assert!(info.contains("role:master"), "{info}");
    assert!(
        !info.contains("# Keyspace"),
        "INFO replication is one section: {info}"
    );
    served.swap_to("kv");

    let m = scrape(admin);
    assert_eq!(m["wasmhost_ready"], 1.0, "{m:?}");
    assert_eq!(m["wasmhost_connections"], 1.0, "{m:?}");
    assert!(m["wasmhost_events_total"] >= 21.0, "{m:?}");
    assert!(m["wasmhost_received_bytes_total"] > 400.0, "{m:?}");
    assert!(m["wasmhost_sent_bytes_total"] >= 100.0, "{m:?}");
    assert_eq!(m["wasmhost_generation"], 2.0, "{m:?}");
    let swaps = "wasmhost_swap_pause_seconds_count{kind=\"swap\",outcome=\"committed\"}";
    assert_eq!(m.get(swaps), Some(&1.0), "{m:?}");

    // Drain: new connections are refused, the open one is served, every
    // signal says so.
    let out = served.command("drain", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("1 open"), "{}", out.stdout);
    assert!(
        refused(served.addr()),
        "a draining host accepted a connection"
    );
    assert_eq!(client.call(&["GET", "k3"]).unwrap(), "v");
    assert_eq!(agent_line(agent), "drain\n");
    assert_eq!(http_get(admin, "/readyz").0, 503);
    assert_eq!(http_get(admin, "/livez").0, 200);
    assert_eq!(scrape(admin)["wasmhost_draining"], 1.0);
    let status = served.command("status", &[]);
    assert!(status.stdout.contains("draining"), "{}", status.stdout);

    // --wait gives up while a connection stays, and says so.
    let out = served.command("drain", &["--wait", "--timeout", "1"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("1 connections still open"),
        "{}",
        out.stderr
    );
    // It returns once the last connection closes.
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(client);
    });
    let out = served.command("drain", &["--wait", "--timeout", "30"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("drained in"), "{}", out.stdout);
    closer.join().unwrap();

    // Cancelled: the same address accepts again, with the state.
    let out = served.command("drain", &["--cancel"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("drain cancelled"), "{}", out.stdout);
    let mut again = Client::connect(served.addr()).unwrap();
    assert_eq!(again.call(&["GET", "k19"]).unwrap(), "v");
    assert_eq!(agent_line(agent), "up ready 100%\n");
    assert_eq!(http_get(admin, "/readyz").0, 200);
}

#[test]
fn sigterm_drains_then_exits_when_the_last_connection_closes() {
    let mut served = Served::start(
        "kv",
        &[
            "--admin",
            "127.0.0.1:0",
            "--on-sigterm",
            "drain",
            "--drain-timeout-s",
            "60",
        ],
    );
    let admin = served.printed_addr(ADMIN);
    let addr = served.addr();
    let mut client = Client::connect(addr).unwrap();
    assert_eq!(client.call(&["SET", "a", "1"]).unwrap(), "+OK");
    served.signal(nix::sys::signal::Signal::SIGTERM);
    served.wait_for_output(
        |t| t.contains("SIGTERM received: draining"),
        Duration::from_secs(10),
    );
    assert!(refused(addr), "a draining host accepted a connection");
    assert_eq!(http_get(admin, "/readyz").0, 503);
    // Still serving the open connection, for as long as it stays.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(client.call(&["INCR", "n"]).map(|_| ()).ok(), Some(()));
        assert!(served.exited().is_none(), "{}", served.stderr());
    }
    let began = Instant::now();
    drop(client);
    let (status, stderr) = served.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("drained in"), "{stderr}");
    assert!(began.elapsed() < Duration::from_secs(15), "{stderr}");
}

#[test]
fn sigterm_drain_stops_at_its_timeout_and_a_second_signal_at_once() {
    let served = Served::start("kv", &["--on-sigterm", "drain", "--drain-timeout-s", "1"]);
    let mut client = Client::connect(served.addr()).unwrap();
    assert_eq!(client.call(&["PING"]).unwrap(), "+PONG");
    served.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, stderr) = served.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("still open after 1s of draining"),
        "{stderr}"
    );

    let mut served = Served::start("kv", &["--on-sigterm", "drain"]);
    let _client = Client::connect(served.addr()).unwrap();
    served.signal(nix::sys::signal::Signal::SIGTERM);
    served.wait_for_output(
        |t| t.contains("SIGTERM received: draining"),
        Duration::from_secs(10),
    );
    served.signal(nix::sys::signal::Signal::SIGINT);
    let (status, stderr) = served.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("stopping without waiting"), "{stderr}");
}

/// Clients through HAProxy: each connection sets and reads back its own
/// keys, then closes, and the next one connects again. Any error (a
/// refused or cut connection, a wrong reply) is counted.
struct Clients {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(front: SocketAddr, count: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..count)
            .map(|t| {
                let (stop, requests, errors) = (stop.clone(), requests.clone(), errors.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let mut session = || -> Result<(), String> {
                            let mut c =
                                Client::connect(front).map_err(|e| format!("connect: {e}"))?;
                            for _ in 0..5 {
                                n += 1;
                                let (key, value) = (format!("c{t}-{n}"), n.to_string());
                                let set = c
                                    .call(&["SET", &key, &value])
                                    .map_err(|e| format!("SET: {e}"))?;
                                let got =
                                    c.call(&["GET", &key]).map_err(|e| format!("GET: {e}"))?;
                                if set != "+OK" || got != value {
                                    return Err(format!("SET {key} {value}: {set}, GET: {got}"));
                                }
                                requests.fetch_add(2, Ordering::Relaxed);
                            }
                            Ok(())
                        };
                        if let Err(e) = session() {
                            errors.lock().unwrap().push(e);
                        }
                    }
                })
            })
            .collect();
        Clients {
            stop,
            requests,
            errors,
            threads,
        }
    }

    /// Stops them; returns the requests answered and the errors.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.requests.load(Ordering::Relaxed), errors)
    }
}

fn connections_total(served: &Served) -> u64 {
    let out = served.command("status", &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    status["connections_total"]
        .as_u64()
        .expect("connections_total")
}

/// Three hosts behind HAProxy, each restarted in turn: drained through
/// its agent check, stopped, started again, back in rotation, while
/// clients keep connecting through HAProxy. No client sees an error.
#[test]
fn rolling_restart_of_three_hosts_behind_haproxy_loses_no_request() {
    if let Some(why) = missing("haproxy") {
        eprintln!("SKIPPED rolling_restart_of_three_hosts_behind_haproxy_loses_no_request: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(7);
    let (front, nodes): (u16, Vec<(u16, u16)>) = (
        ports[0],
        (0..3)
            .map(|i| (ports[1 + 2 * i], ports[2 + 2 * i]))
            .collect(),
    );
    let start = |i: usize| {
        let (listen, agent) = (
            format!("127.0.0.1:{}", nodes[i].0),
            format!("127.0.0.1:{}", nodes[i].1),
        );
        Served::start_raw(
            &guest("kv"),
            &["--listen", &listen, "--agent-check", &agent],
            1,
        )
    };
    let mut hosts: Vec<Option<Served>> = (0..3).map(|i| Some(start(i))).collect();
    // The example configuration, as it is, with its values from the
    // environment.
    let servers = [0, 1, 2].map(|i| (format!("127.0.0.1:{}", nodes[i].0), nodes[i].1));
    let haproxy = Haproxy::example(dir.path(), &format!("127.0.0.1:{front}"), servers);
    let up = |status: &str, weight: u32| status == "UP" && weight > 0;
    for i in 0..3 {
        haproxy.wait_server("kv", &format!("host{i}"), Duration::from_secs(20), up);
    }
    let clients = Clients::start(format!("127.0.0.1:{front}").parse().unwrap(), 6);
    for (i, slot) in hosts.iter_mut().enumerate() {
        let host = slot.take().unwrap();
        // Wait until this host has had traffic, so the drain has work.
        let deadline = Instant::now() + Duration::from_secs(20);
        while connections_total(&host) < 10 {
            assert!(
                Instant::now() < deadline,
                "host{i} got no traffic: {:?}",
                haproxy.servers("kv")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = host.command("drain", &["--wait", "--timeout", "30"]);
        assert!(
            out.status.success(),
            "draining host{i}: {}\n{}",
            out.stderr,
            host.stderr()
        );
        // HAProxy heard `drain` from the agent (its regular check may
        // then also see the port refuse).
        let drained = format!("kv/host{i} enters drain state");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !haproxy.log().contains(&drained) {
            assert!(
                Instant::now() < deadline,
                "no `{drained}`:\n{}",
                haproxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        haproxy.wait_server(
            "kv",
            &format!("host{i}"),
            Duration::from_secs(10),
            |s, w| s != "UP" || w == 0,
        );
        let (status, stderr) = host.terminate();
        assert!(status.success(), "host{i} stopping: {stderr}");
        let restarted = start(i);
        haproxy.wait_server("kv", &format!("host{i}"), Duration::from_secs(20), up);
        let deadline = Instant::now() + Duration::from_secs(20);
        while connections_total(&restarted) < 10 {
            assert!(
                Instant::now() < deadline,
                "restarted host{i} got no traffic"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        *slot = Some(restarted);
    }
    let (requests, errors) = clients.finish();
    assert!(
        errors.is_empty(),
        "{} client errors, first: {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        haproxy.log()
    );
    assert!(requests > 300, "only {requests} requests answered");
    eprintln!("rolling restart: {requests} requests answered through HAProxy, no error");
}

/// The admin listener is the process's: after a host upgrade the new
/// process answers on the same address once the old one has exited.
#[test]
fn admin_endpoints_follow_a_host_upgrade() {
    let port = free_ports(1)[0];
    let admin_arg = format!("127.0.0.1:{port}");
    let mut served = Served::start("kv", &["--admin", &admin_arg]);
    let admin = served.printed_addr(ADMIN);
    assert_eq!(http_get(admin, "/readyz").0, 200);
    let old = served.pid();
    served.upgrade_ok(&[]);
    let new = served.serving_pid();
    assert_ne!(old, new);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let gone = served.exited().is_some();
        let answer = std::panic::catch_unwind(|| http_get(admin, "/readyz"));
        if gone && matches!(answer, Ok((200, _))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the upgrade /readyz says {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = scrape(admin);
    assert_eq!(m["wasmhost_ready"], 1.0);
    assert_eq!(m["wasmhost_service"], 1.0);
}

/// `migrate --keepalived`: keepalived owns the service address on A and
/// B; kv moves A -> B -> A twice under direct clients and clients through
/// HAProxy (whose own connections to the address move too), with the
/// receiver failing on purpose first. No connection breaks, and the
/// address is always where the service is.
#[test]
fn keepalived_moves_the_address_and_haproxy_connections_survive() {
    let test = "keepalived_moves_the_address_and_haproxy_connections_survive";
    if let Some(why) = missing("keepalived").or_else(|| missing("haproxy")) {
        eprintln!("SKIPPED {test}: {why}");
        return;
    }
    let w = match wasmhost_tests::netns::World::create() {
        Ok(w) => w,
        Err(why) => {
            eprintln!("SKIPPED {test}: cannot make network namespaces here: {why}");
            return;
        }
    };
    // keepalived, not the test, owns the address from here on.
    w.a.remove_address(w.service).unwrap();
    // A first: with `nopreempt`, whoever takes the address keeps it.
    let ka = wasmhost_tests::fleet::Keepalived::start(&w.a, w.b.ip, w.service, 254, &w.dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w.a.has_address(w.service) {
        assert!(
            Instant::now() < deadline,
            "keepalived did not give A the address\n{}",
            ka.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kb = wasmhost_tests::fleet::Keepalived::start(&w.b, w.a.ip, w.service, 253, &w.dir);
    let logs = || {
        format!(
            "A's keepalived:\n{}\nB's keepalived:\n{}",
            ka.log(),
            kb.log()
        )
    };
    // B is a backup (it would say so in its log) and leaves A the address.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kb.log().contains("Entering BACKUP STATE") {
        assert!(Instant::now() < deadline, "B is no backup\n{}", logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        w.a.has_address(w.service) && !w.b.has_address(w.service),
        "{}",
        logs()
    );
    let (a_track, b_track) = (ka.track.to_str().unwrap(), kb.track.to_str().unwrap());
    let a = w.host_with(
        &w.a,
        Some(("kv", &[])),
        &["--keepalived-track", a_track],
        &[],
    );
    // HAProxy on the client machine, in front of the service address.
    let front: SocketAddr = (w.client.ip, 7500).into();
    let haproxy = Haproxy::start_in(
        &w.dir,
        &format!(
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    \
             timeout server 60s\n\nfrontend kv\n    bind {front}\n    default_backend svc\n\n\
             backend svc\n    server svc {} check inter 100ms fall 3 rise 2\n",
            w.service_addr()
        ),
        w.client.command(std::path::Path::new("haproxy")),
    );
    // 8 clients to the address, 4 through HAProxy.
    let made = std::sync::atomic::AtomicUsize::new(0);
    let load = wasmhost_tests::load::Load::start_with(
        || match made.fetch_add(1, Ordering::Relaxed) {
            0..8 => w.redis(),
            _ => w.redis_to(front),
        },
        12,
    );
    load.wait(200);

    // The receiver fails at import: A resumes, keepalived gives it the
    // address back, and nobody notices.
    let failing = w.host_with(
        &w.b,
        None,
        &["--keepalived-track", b_track],
        &[("WASMHOST_TEST_MIGRATE_FAIL", "import")],
    );
    let out = w.migrate(&a, &w.b, &["--keepalived"]);
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(out.stderr.contains("import"), "{}", out.stderr);
    assert!(
        w.a.has_address(w.service),
        "A resumed without its address\n{}",
        logs()
    );
    // B, in FAULT only for the failed move, leaves it 10 s later.
    let deadline = Instant::now() + Duration::from_secs(20);
    while kb.track_value() != "0" {
        assert!(
            Instant::now() < deadline,
            "B stayed in FAULT:\n{}",
            failing.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(w.a.has_address(w.service), "B took the address\n{}", logs());
    drop(failing);
    load.wait(200);

    let b = w.host_with(&w.b, None, &["--keepalived-track", b_track], &[]);
    for round in 0..2 {
        let out = w.migrate(&a, &w.b, &["--keepalived"]);
        assert!(
            out.status.success(),
            "A -> B (round {round}): {}\nA:\n{}\nB:\n{}\n{}",
            out.stderr,
            a.stderr(),
            b.stderr(),
            logs()
        );
        if round == 0 {
            eprintln!("A -> B with keepalived: {}", out.stdout);
        }
        assert!(w.b.has_address(w.service) && !w.a.has_address(w.service));
        // A stays in FAULT while B holds the connections.
        assert_eq!(
            (ka.track_value(), kb.track_value()),
            ("1".into(), "0".into())
        );
        load.wait(200);
        let out = w.migrate(&b, &w.a, &["--keepalived"]);
        assert!(
            out.status.success(),
            "B -> A (round {round}): {}\nA:\n{}\nB:\n{}\n{}",
            out.stderr,
            a.stderr(),
            b.stderr(),
            logs()
        );
        assert!(w.a.has_address(w.service) && !w.b.has_address(w.service));
        assert_eq!(
            (ka.track_value(), kb.track_value()),
            ("0".into(), "1".into())
        );
        load.wait(200);
    }
    // Every client kept its one connection and every write reads back.
    load.finish_with(w.redis());
    // HAProxy's health checks may fail while the address is nowhere (a
    // check's SYN is not resent for 1 s) and on a busy machine mark the
    // server down for a moment: established connections are kept (no
    // `on-marked-down shutdown-sessions`), which the load checked above.
    let down = haproxy.log().matches("is DOWN").count();
    eprintln!("HAProxy marked the service down {down} times during the moves");
    drop((a, b));
}

/// "Let connections finish, or move them with migrate": a drained host's
/// connections move to another machine, where the service accepts again.
#[test]
fn a_drained_host_moves_its_connections_and_the_receiver_accepts() {
    let test = "a_drained_host_moves_its_connections_and_the_receiver_accepts";
    let w = match wasmhost_tests::netns::World::create() {
        Ok(w) => w,
        Err(why) => {
            eprintln!("SKIPPED {test}: cannot make network namespaces here: {why}");
            return;
        }
    };
    let fleet_args = ["--admin", "127.0.0.1:0", "--agent-check", "127.0.0.1:0"];
    let mut a = w.host_with(&w.a, Some(("kv", &[])), &fleet_args, &[]);
    let mut b = w.host_with(&w.b, None, &fleet_args, &[]);
    // The endpoints listen on each machine's loopback: ask from there.
    let (a_admin, a_agent) = (a.printed_addr(ADMIN), a.printed_addr(AGENT));
    let (b_admin, b_agent) = (b.printed_addr(ADMIN), b.printed_addr(AGENT));
    let on = |m: &wasmhost_tests::netns::Machine, admin: SocketAddr, agent: SocketAddr| {
        m.run(move || {
            (
                agent_line(agent),
                http_get(admin, "/readyz").0,
                http_get(admin, "/livez").0,
            )
        })
    };
    assert_eq!(on(&w.b, b_admin, b_agent), ("maint\n".into(), 503, 200));
    let mut kept = Client::on(w.connect()).unwrap();
    assert_eq!(kept.call(&["SET", "x", "1"]).unwrap(), "+OK");
    let out = a.command("drain", &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(on(&w.a, a_admin, a_agent), ("drain\n".into(), 503, 200));
    let addr = w.service_addr();
    let refused_now = || {
        w.client.run(move || {
            matches!(
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            )
        })
    };
    assert!(refused_now(), "a draining host accepted a connection");
    assert_eq!(kept.call(&["INCR", "n"]).unwrap(), ":1");
    let out = w.migrate(&a, &w.b, &[]);
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        out.stderr,
        a.stderr(),
        b.stderr()
    );
    // The kept connection is on B now, and B accepts new ones.
    assert_eq!(kept.call(&["INCR", "n"]).unwrap(), ":2");
    let mut new = Client::on(w.connect()).unwrap();
    assert_eq!(new.call(&["GET", "x"]).unwrap(), "1");
    let status = b.command("status", &[]);
    assert!(!status.stdout.contains("draining"), "{}", status.stdout);
    // A has no service now; B serves and accepts (each process sees it
    // within moments of the move).
    let soon = |m: &wasmhost_tests::netns::Machine, admin, agent, want: (String, u16, u16)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = on(m, admin, agent);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{} says {got:?}", m.ns);
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    soon(&w.a, a_admin, a_agent, ("maint\n".into(), 503, 200));
    soon(&w.b, b_admin, b_agent, ("up ready 100%\n".into(), 200, 200));
}
