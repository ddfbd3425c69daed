//! Operating ringress, on both drivers: metrics, namespaces that come and go,
//! reload, graceful shutdown, systemd readiness.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    metrics_match_known_traffic,
    glob_follows_namespaces_as_they_come_and_go,
    reload_keeps_transfers_adds_and_removes,
    sigterm_lets_transfers_finish,
    ready_arrives_after_listeners_accept,
    non_root_with_only_its_capabilities,
    explicit_namespace_vanishes_and_returns,
    status_shows_the_io_uring_probe,
    sighup_during_start_up_reloads_once_ready,
    sigterm_during_start_up_exits_0_and_frees_the_port,
    signals_wait_while_the_config_is_read,
    sigterm_closes_an_idle_keep_alive_at_once,
    sigterm_answers_a_request_in_progress_with_close,
    sigterm_lets_a_64mib_proxy_transfer_finish,
);

/// Starts ringress for a start-up signal test and waits `ms` milliseconds: counted
/// from the spawn for a child started with the signals already blocked (`pre`),
/// else from the moment ringress's own code has blocked them. A signal sent
/// before that (while the child is still in execve(2) or the dynamic loader)
/// gets the default action before any code of ringress runs; only a mask set
/// before execve (as here with `pre`, or by a supervisor) can keep it.
fn spawn_and_wait(tag: &str, driver: &str, cfg: &str, ms: u64, pre: bool) -> Ringress {
    let mut r = Ringress::spawn(tag, driver, cfg, pre);
    if !pre {
        r.wait_signals_blocked();
    }
    std::thread::sleep(Duration::from_millis(ms));
    r
}

/// (delay in ms, child started with the signals blocked) for the start-up tests.
const START_UP_SIGNALS: &[(u64, bool)] = &[
    (0, true),
    (1, true),
    (5, true),
    (0, false),
    (1, false),
    (5, false),
];

fn echo_cfg(port: u16) -> String {
    format!(
        "[runtime]\nworkers = 2\n[[listener]]\nname = \"e\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
    )
}

fn sighup_during_start_up_reloads_once_ready(driver: &str) {
    for &(ms, blocked) in START_UP_SIGNALS {
        let port = free_port();
        let tag = format!("hup{ms}-{driver}");
        let mut r = spawn_and_wait(&tag, driver, &echo_cfg(port), ms, blocked);
        r.signal(libc::SIGHUP);
        r.wait_running();
        // Acted on once ready: a reload of the same file.
        r.wait_log("config reloaded", 1, 10);
        assert!(
            r.child.try_wait().unwrap().is_none(),
            "SIGHUP at {ms} ms (pre-blocked: {blocked}) ended the process"
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(
            echo_roundtrip(connect_in(None, addr).unwrap(), b"after hup"),
            b"after hup"
        );
        let st = r.stop();
        assert!(
            st.success(),
            "SIGHUP at {ms} ms (pre-blocked: {blocked}), then SIGTERM: exit status {st}"
        );
    }
}

/// The config is a FIFO: ringress waits in read(2) for it while the signals are
/// sent, so they are blocked before the config is read (deterministically, not by
/// timing). SIGHUP: once started it reloads (reading the FIFO again) and serves;
/// SIGTERM: it exits 0 once started, leaving the port free.
fn signals_wait_while_the_config_is_read(driver: &str) {
    for sig in [libc::SIGHUP, libc::SIGTERM] {
        let port = free_port();
        let dir = TempDir::new(&format!("fifo{sig}-{driver}"));
        let fifo = dir.0.join("ringress.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut r = Ringress::spawn_with_config_path(driver, &fifo);
        r.wait_signals_blocked();
        r.signal(sig);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            r.child.try_wait().unwrap().is_none(),
            "signal {sig} before the config ended the process"
        );
        let cfg = echo_cfg(port);
        let (f2, c2) = (fifo.clone(), cfg.clone());
        // Blocks until ringress opens the FIFO to read it.
        let writer = std::thread::spawn(move || std::fs::write(&f2, &c2).unwrap());
        if sig == libc::SIGHUP {
            r.wait_running();
            writer.join().unwrap();
            r.wait_log("SIGHUP received during start-up", 1, 20);
            r.wait_log("SIGHUP: reloading", 1, 10);
            // The reload reads the FIFO again.
            std::fs::write(&fifo, &cfg).unwrap();
            r.wait_log("config reloaded", 1, 10);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            assert_eq!(
                echo_roundtrip(connect_in(None, addr).unwrap(), b"fifo"),
                b"fifo"
            );
            let st = r.stop();
            assert!(st.success(), "exit status {st}");
        } else {
            writer.join().unwrap();
            let st = r.wait_exit(20);
            assert!(
                st.success(),
                "SIGTERM before the config: exit status {st}:\n{}",
                r.stderr()
            );
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("port still bound");
        }
        drop(dir);
    }
}

fn sigterm_during_start_up_exits_0_and_frees_the_port(driver: &str) {
    for &(ms, blocked) in START_UP_SIGNALS {
        let port = free_port();
        let tag = format!("term{ms}-{driver}");
        let mut r = spawn_and_wait(&tag, driver, &echo_cfg(port), ms, blocked);
        r.signal(libc::SIGTERM);
        let st = r.wait_exit(20);
        assert!(
            st.success(),
            "SIGTERM at {ms} ms (pre-blocked: {blocked}): exit status {st}:\n{}",
            r.stderr()
        );
        // Nothing left bound: the port can be bound again at once.
        std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("SIGTERM at {ms} ms: port {port} still bound: {e}"));
    }
}

fn metric(samples: &prometheus_parse::Scrape, name: &str, listener: &str) -> f64 {
    sample(samples, name, listener, None)
}

fn metrics_match_known_traffic(driver: &str) {
    const N: usize = 20;
    const M: usize = 1000;
    let (port, admin) = (free_port(), free_port());
    let cfg = format!(
        "[runtime]\nworkers = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"m\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
    );
    let r = Ringress::start(&format!("met-{driver}"), driver, &cfg);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for i in 0..N {
        let s = connect_in(None, addr).unwrap();
        assert!(echo_roundtrip(s, &payload(M, i as u64)).len() == M);
    }
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    // The last closes may still be in flight in the server.
    let deadline = Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let scrape = metrics(admin);
        if metric(&scrape, "ringress_listener_connections_closed_total", "m") == N as f64
            || Instant::now() > deadline
        {
            break scrape;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let m = |name| metric(&scrape, name, "m");
    assert_eq!(m("ringress_listener_connections_accepted_total"), N as f64);
    assert_eq!(m("ringress_listener_connections_closed_total"), N as f64);
    assert_eq!(m("ringress_listener_connections_active"), 0.0);
    assert_eq!(m("ringress_listener_bytes_in_total"), (N * M) as f64);
    assert_eq!(m("ringress_listener_bytes_out_total"), (N * M) as f64);
    let threads = scrape
        .samples
        .iter()
        .find(|s| s.metric == "ringress_process_threads")
        .expect("no thread gauge");
    assert!(matches!(threads.value, prometheus_parse::Value::Gauge(v) if v == r.threads() as f64));
    let workers = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "ringress_worker_submitted_total")
        .count();
    assert_eq!(workers, 2);

    let (code, status) = Ringress::admin_get(admin, "/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let l = &v["listeners"][0];
    assert_eq!(l["name"], "m");
    assert_eq!(l["state"], "serving");
    assert_eq!(l["driver"], driver);
    assert_eq!(l["address"], addr.to_string());
    assert_eq!(Ringress::admin_get(admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(Ringress::admin_get(admin, "/nope").0, 404);
    assert!(r.stop().success());
}

fn glob_follows_namespaces_as_they_come_and_go(driver: &str) {
    let pid = std::process::id();
    let tag = |i: usize| format!("g{driver}{i}");
    let listen: SocketAddr = "127.0.0.1:7600".parse().unwrap();
    let mut spaces: Vec<TempNetns> = (0..3).map(|i| netns(&tag(i))).collect();
    let cfg = format!(
        "[runtime]\nworkers = 2\n[[listener]]\nname = \"t\"\nnetns = \"rgt-g{driver}*-{pid}\"\n\
         listen = \"{listen}\"\naction = \"echo\"\n"
    );
    let r = Ringress::start(&format!("glob-{driver}"), driver, &cfg);
    let threads = r.threads();
    let serves = |ns: &TempNetns| {
        connect_in(Some(ns), listen)
            .map(|s| echo_roundtrip(s, b"ping") == b"ping")
            .unwrap_or(false)
    };
    for ns in &spaces {
        assert!(serves(ns), "{} not served at start", ns.name());
    }
    // 50 more while running: each served within 1 s of its creation.
    for i in 3..53 {
        let ns = netns(&tag(i));
        let t0 = Instant::now();
        while !serves(&ns) {
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "{} not served within 1 s",
                ns.name()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        spaces.push(ns);
    }
    assert_eq!(r.threads(), threads);
    let fds_before = r.settled_fds();
    // Delete 20: their listeners close and their fds go.
    let gone: Vec<TempNetns> = spaces.drain(..20).collect();
    drop(gone);
    let want = fds_before - 20 * 2;
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.fds() > want {
        assert!(
            Instant::now() < deadline,
            "fds {} did not drop to {want} after deleting 20 namespaces",
            r.fds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for ns in &spaces {
        assert!(serves(ns), "{} stopped serving", ns.name());
    }
    assert_eq!(r.threads(), threads, "thread count changed");
    assert!(r.stop().success());
}

/// Echoes `n` bytes in paced chunks (taking about `secs`), checking every byte.
fn paced_echo(
    s: std::net::TcpStream,
    n: usize,
    secs: f64,
    seed: u64,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let data = payload(n, seed);
        let mut w = s.try_clone().unwrap();
        let d2 = data.clone();
        let chunks = 50;
        let writer = std::thread::spawn(move || {
            for c in d2.chunks(n.div_ceil(chunks)) {
                if w.write_all(c).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs_f64(secs / chunks as f64));
            }
            let _ = w.shutdown(Shutdown::Write);
        });
        let mut r = s;
        let (back, err) = read_until_end(&mut r);
        writer.join().unwrap();
        err.is_none() && back == data
    })
}

fn reload_keeps_transfers_adds_and_removes(driver: &str) {
    let (p_stay, p_gone, p_new) = (free_port(), free_port(), free_port());
    let l = |name: &str, port: u16| {
        format!(
            "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
        )
    };
    let cfg_a = format!(
        "[runtime]\nworkers = 2\n{}{}",
        l("stay", p_stay),
        l("gone", p_gone)
    );
    let cfg_b = format!(
        "[runtime]\nworkers = 2\n{}{}",
        l("stay", p_stay),
        l("new", p_new)
    );
    let r = Ringress::start(&format!("rl-{driver}"), driver, &cfg_a);
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let transfer = paced_echo(connect_in(None, at(p_stay)).unwrap(), 8 << 20, 1.5, 1);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(r.config_path(), &cfg_b).unwrap();
    r.signal(libc::SIGHUP);
    r.wait_log("config reloaded", 1, 10);
    assert!(
        transfer.join().unwrap(),
        "transfer through a kept listener broke"
    );
    assert_eq!(
        echo_roundtrip(connect_in(None, at(p_new)).unwrap(), b"n"),
        b"n"
    );
    let e = connect_in(None, at(p_gone)).expect_err("removed listener still accepts");
    assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
    // A broken config is rejected; everything keeps serving.
    std::fs::write(
        r.config_path(),
        "[[listener]]\nname = \"x\"\nlisten = \"nonsense\"\n",
    )
    .unwrap();
    r.signal(libc::SIGHUP);
    r.wait_log("reload rejected", 1, 10);
    assert!(
        r.stderr().contains("invalid socket address"),
        "{}",
        r.stderr()
    );
    for p in [p_stay, p_new] {
        assert_eq!(echo_roundtrip(connect_in(None, at(p)).unwrap(), b"k"), b"k");
    }
    assert!(r.stop().success());
}

fn sigterm_lets_transfers_finish(driver: &str) {
    let port = free_port();
    let cfg = format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 8000\n[[listener]]\nname = \"e\"\n\
         listen = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
    );
    let mut r = Ringress::start(&format!("term-{driver}"), driver, &cfg);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let transfers: Vec<_> = (0..4)
        .map(|i| paced_echo(connect_in(None, addr).unwrap(), 4 << 20, 1.5, i))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    r.signal(libc::SIGTERM);
    r.wait_log("shutting down", 1, 5);
    // No new connections once shutting down.
    std::thread::sleep(Duration::from_millis(100));
    assert!(connect_in(None, addr).is_err(), "accepting after SIGTERM");
    for t in transfers {
        assert!(t.join().unwrap(), "a transfer did not finish intact");
    }
    let status = r.wait_exit(10);
    assert!(status.success(), "exit status {status}");
}

fn http_cfg(port: u16) -> String {
    format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 20000\n[[listener]]\nname = \"h\"\n\
         listen = \"127.0.0.1:{port}\"\naction = \"http\"\n"
    )
}

/// Reads one `200 OK` response (head and its 3-byte body) from `s`.
fn read_response(s: &mut std::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\nok\n") {
        s.read_exact(&mut b).expect("reading a response");
        got.push(b[0]);
    }
    String::from_utf8(got).unwrap()
}

fn sigterm_closes_an_idle_keep_alive_at_once(driver: &str) {
    let port = free_port();
    let mut r = Ringress::start(&format!("idle-{driver}"), driver, &http_cfg(port));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = connect_in(None, addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let resp = read_response(&mut s);
    assert!(!resp.contains("Connection: close"), "{resp}");
    // The connection is now idle between requests.
    let t0 = Instant::now();
    r.signal(libc::SIGTERM);
    let (rest, err) = read_until_end(&mut s);
    assert!(
        err.is_none() && rest.is_empty(),
        "idle client: {rest:?} {err:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "EOF after {:?}",
        t0.elapsed()
    );
    drop(s);
    let st = r.wait_exit(5);
    assert!(st.success(), "exit status {st}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "exit {:?} after SIGTERM with shutdown_timeout_ms = 20000",
        t0.elapsed()
    );
}

fn sigterm_answers_a_request_in_progress_with_close(driver: &str) {
    let port = free_port();
    let mut r = Ringress::start(&format!("inprog-{driver}"), driver, &http_cfg(port));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = connect_in(None, addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    read_response(&mut s);
    // Half a head before SIGTERM, the rest after the workers were told.
    s.write_all(b"GET /second HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    r.signal(libc::SIGTERM);
    r.wait_log("shutting down", 1, 5);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        r.child.try_wait().unwrap().is_none(),
        "exited with a request in progress"
    );
    s.write_all(b"st: x\r\n\r\n").unwrap();
    let resp = read_response(&mut s);
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    assert!(
        resp.contains("Connection: close\r\n"),
        "no Connection: close:\n{resp}"
    );
    let (rest, err) = read_until_end(&mut s);
    assert!(
        err.is_none() && rest.is_empty(),
        "after the response: {rest:?} {err:?}"
    );
    drop(s);
    let st = r.wait_exit(5);
    assert!(st.success(), "exit status {st}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "exit {:?} after SIGTERM",
        t0.elapsed()
    );
}

fn sigterm_lets_a_64mib_proxy_transfer_finish(driver: &str) {
    let up_port = free_port();
    let _up = Upstream::spawn(None, SocketAddr::from(([127, 0, 0, 1], up_port)), |s| {
        // Echo as it arrives, then FIN.
        let mut w = s.try_clone().unwrap();
        let mut r = s;
        let _ = std::io::copy(&mut r, &mut w);
        let _ = w.shutdown(Shutdown::Write);
    });
    let port = free_port();
    let cfg = format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 20000\n[[listener]]\nname = \"px\"\n\
         listen = \"127.0.0.1:{port}\"\naction = \"proxy\"\nupstream = \"127.0.0.1:{up_port}\"\n"
    );
    let mut r = Ringress::start(&format!("pxterm-{driver}"), driver, &cfg);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // 64 MiB written over about 2 s and echoed back through the proxy.
    let transfer = paced_echo(connect_in(None, addr).unwrap(), 64 << 20, 2.0, 7);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!transfer.is_finished(), "the transfer ended before SIGTERM");
    r.signal(libc::SIGTERM);
    r.wait_log("shutting down", 1, 5);
    assert!(
        transfer.join().unwrap(),
        "the transfer did not finish intact"
    );
    let st = r.wait_exit(5);
    assert!(st.success(), "exit status {st}");
}

fn ready_arrives_after_listeners_accept(driver: &str) {
    let dir = TempDir::new(&format!("notify-{driver}"));
    let sock_path = dir.0.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let cfg = format!(
        "[runtime]\nworkers = 1\n[[listener]]\nname = \"e\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
    );
    let mut r = Ringress::start_with(
        &format!("rdy-{driver}"),
        driver,
        &cfg,
        None,
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // READY=1 means the listener already accepts.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    drop(s);
    r.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(r.wait_exit(10).success());
}

fn non_root_with_only_its_capabilities(driver: &str) {
    // uid/gid 65534 (nobody) holding CAP_SYS_ADMIN (setns) and CAP_NET_BIND_SERVICE
    // (port 80) as ambient capabilities, nothing else.
    let ns = netns(&format!("caps-{driver}"));
    let dir = TempDir::new(&format!("caps-{driver}"));
    let cfg_path = dir.0.join("ringress.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[runtime]\nworkers = 1\nshutdown_timeout_ms = 1000\n[[listener]]\nname = \"low\"\n\
             netns = \"{}\"\nlisten = \"127.0.0.1:80\"\naction = \"respond\"\nrespond = \"ack\\n\"\n",
            ns.name()
        ),
    )
    .unwrap();
    let log = dir.0.join("stderr.log");
    let mut child = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+sys_admin,+net_bind_service",
            "--ambient-caps=-all,+sys_admin,+net_bind_service",
            "--bounding-set=-all,+sys_admin,+net_bind_service",
            "--",
            bin(),
            "run",
            cfg_path.to_str().unwrap(),
            "--io",
            driver,
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("setpriv (util-linux)");
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    while !text().contains("ringress running") {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("ringress as nobody exited with {st}:\n{}", text());
        }
        assert!(Instant::now() < deadline, "did not start:\n{}", text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    let mut s = connect_in(Some(&ns), "127.0.0.1:80".parse().unwrap()).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(
        uid_line.contains("65534"),
        "not running as nobody: {uid_line}"
    );
    assert_eq!(got, b"ack\n");
    assert!(st.success(), "{st}: {}", text());
}

fn explicit_namespace_vanishes_and_returns(driver: &str) {
    let stay = netns(&format!("exs-{driver}"));
    let name = format!("rgt-exv-{driver}-{}", std::process::id());
    let come_go = TempNetns::create(&name).unwrap();
    let admin = free_port();
    let listen: SocketAddr = "127.0.0.1:7700".parse().unwrap();
    let cfg = format!(
        "[runtime]\nworkers = 1\nshutdown_timeout_ms = 1000\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"stay\"\nnetns = \"{}\"\nlisten = \"{listen}\"\naction = \"echo\"\n\
         [[listener]]\nname = \"cg\"\nnetns = \"{name}\"\nlisten = \"{listen}\"\naction = \"echo\"\n",
        stay.name()
    );
    let r = Ringress::start_with(
        &format!("exv-{driver}"),
        driver,
        &cfg,
        None,
        &[("RUST_LOG", "info")],
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let state = |l: &str| {
        let (_, body) = Ringress::admin_get(admin, "/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == l)
            .map(|x| x["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state("cg"), "serving");
    drop(come_go);
    r.wait_log("namespace vanished", 1, 5);
    assert_eq!(state("cg"), "down");
    assert_eq!(
        echo_roundtrip(connect_in(Some(&stay), listen).unwrap(), b"s"),
        b"s"
    );
    // It comes back under the same name: bound again.
    let back = TempNetns::create(&name).unwrap();
    let t0 = Instant::now();
    loop {
        if let Ok(s) = connect_in(Some(&back), listen) {
            assert_eq!(echo_roundtrip(s, b"b"), b"b");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "not bound again:\n{}",
            r.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(state("cg"), "serving");
    assert!(r.stop().success());
}

/// `GET /status` has a top-level `"io_uring"`: the probe's findings on the io_uring
/// driver (following `RINGRESS_URING_DISABLE`), `null` on epoll; the other fields
/// stay.
fn status_shows_the_io_uring_probe(driver: &str) {
    let (port, admin) = (free_port(), free_port());
    let cfg = format!(
        "[runtime]\nworkers = 1\nshutdown_timeout_ms = 1000\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"s\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let status = || {
        let (code, body) = Ringress::admin_get(admin, "/status");
        assert_eq!(code, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let r = Ringress::start(&format!("st-{driver}"), driver, &cfg);
    let v = status();
    assert_eq!(v["driver"], driver);
    assert_eq!(v["workers"], 1);
    assert_eq!(v["listeners"][0]["name"], "s");
    if driver == "epoll" {
        assert!(v["io_uring"].is_null(), "{v}");
        assert!(r.stop().success());
        return;
    }
    let u = &v["io_uring"];
    assert!(u.is_object(), "{v}");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(u["kernel"], release.trim(), "{u}");
    assert!(u["setup"]["single_issuer"].is_boolean(), "{u}");
    assert!(
        u["features"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "NODROP"),
        "{u}"
    );
    assert!(
        u["opcodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "ACCEPT"),
        "{u}"
    );
    assert_eq!(u["buf_ring"], true, "{u}");
    for k in [
        "multishot_accept",
        "multishot_recvmsg",
        "multishot_recv",
        "recv_bundle",
    ] {
        assert!(u[k].is_boolean(), "{k}: {u}");
    }
    assert!(
        r.stderr().contains("io = uring: using io_uring"),
        "{}",
        r.stderr()
    );
    assert!(r.stop().success());
    // Features turned off by the environment show as absent.
    let r = Ringress::start_with(
        &format!("st-{driver}-off"),
        driver,
        &cfg,
        None,
        &[("RINGRESS_URING_DISABLE", "multishot_accept,defer_taskrun")],
    );
    let u = status()["io_uring"].clone();
    assert_eq!(u["multishot_accept"], false, "{u}");
    assert_eq!(u["setup"]["defer_taskrun"], false, "{u}");
    assert_eq!(
        echo_roundtrip(
            connect_in(None, SocketAddr::from(([127, 0, 0, 1], port))).unwrap(),
            b"x"
        ),
        b"x"
    );
    assert!(r.stop().success());
}

#[test]
fn json_logs_are_one_object_per_line() {
    let port = free_port();
    let dir = TempDir::new("jsonlog");
    let cfg = dir.0.join("c.toml");
    std::fs::write(
        &cfg,
        format!("[[listener]]\nname = \"j\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n"),
    )
    .unwrap();
    let log = dir.0.join("log");
    let mut child = std::process::Command::new(bin())
        .args([
            "--log-format",
            "json",
            "run",
            cfg.to_str().unwrap(),
            "--io",
            "epoll",
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("ringress running")
    {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let mut bound = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        if v["fields"]["message"] == "listener bound" {
            assert_eq!(v["fields"]["listener"], "j");
            bound += 1;
        }
    }
    assert_eq!(bound, 1, "{text}");
}

/// The listener label of `ringress_listener_up` in `body`, as parsed by the
/// Python prometheus_client parser for `format` ("openmetrics" or "prometheus"):
/// an independent implementation of both text formats.
fn parsed_listener_labels(body: &str, format: &str) -> Result<Vec<String>, String> {
    const SCRIPT: &str = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families as prom\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as om\n\
        parse = om if sys.argv[1] == 'openmetrics' else prom\n\
        for f in parse(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       if s.name == 'ringress_listener_up':\n\
        \x20           print(repr(s.labels['listener']))\n";
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT, format])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("/usr/bin/python3: {e} (tools/setup installs python3-prometheus-client)")
        })?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Listener names with `"`, `\` and non-ASCII letters: /metrics parses with an
/// OpenMetrics parser (asked for by Accept) and a Prometheus text 0.0.4 parser
/// (the default), and the label value reads back as the name in both.
#[test]
fn odd_listener_names_are_escaped_in_metrics() {
    let (port, admin) = (free_port(), free_port());
    let cfg = format!(
        "[runtime]\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = 'a\"b\\c é'\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
    );
    let r = Ringress::start("oddname", "epoll", &cfg);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let get = |accept: &str| {
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}\r\n").unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        let (head, body) = all.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    };
    let want = vec!["'a\"b\\\\c é'".to_string()];
    let (head, body) =
        get("Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(
        parsed_listener_labels(&body, "openmetrics").unwrap(),
        want,
        "{body}"
    );
    let (head, body) = get("");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(!body.contains("# EOF"), "{body}");
    assert!(
        body.contains("# TYPE ringress_listener_connections_accepted_total counter"),
        "{body}"
    );
    assert_eq!(
        parsed_listener_labels(&body, "prometheus").unwrap(),
        want,
        "{body}"
    );
    // The in-tree scrape helper still reads the default format.
    assert_eq!(
        scrape(admin, "ringress_listener_up", "a\\\"b\\\\c é", None),
        1.0
    );
    assert!(r.stop().success());
}
