//! UDP listeners on both drivers: echo (sizes, families, namespaces), replies from
//! the address the client sent to, proxy sessions, limits, errors, truncation.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    echo_sizes_root_and_namespace_v4_v6,
    wildcard_replies_from_the_address_sent_to,
    proxy_sessions_keep_clients_apart_expire_and_are_limited,
    closed_upstream_port_is_counted_and_the_listener_goes_on,
    oversized_datagram_is_dropped_and_counted,
    rotating_source_ports_against_a_silent_upstream_stay_bounded,
    burst_of_new_clients_through_the_pool_loses_almost_nothing,
    one_client_two_local_addresses_two_sessions,
);

fn udp_listener(name: &str, netns: Option<&str>, listen: &str, rest: &str) -> String {
    let ns = netns.map_or(String::new(), |n| format!("netns = \"{n}\"\n"));
    format!("[[listener]]\nname = \"{name}\"\n{ns}proto = \"udp\"\nlisten = \"{listen}\"\n{rest}\n")
}

fn cfg(admin: Option<u16>, listeners: &str) -> String {
    let admin = admin.map_or(String::new(), |p| {
        format!("[admin]\nlisten = \"127.0.0.1:{p}\"\n")
    });
    format!("[runtime]\nworkers = 2\nshutdown_timeout_ms = 1000\n{admin}\n{listeners}")
}

/// Sends `data` from `s` to `to` and returns the reply (and its source).
fn ask(s: &UdpSocket, to: SocketAddr, data: &[u8]) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    s.send_to(data, to)?;
    let mut buf = vec![0u8; 70_000];
    let (n, from) = s.recv_from(&mut buf)?;
    buf.truncate(n);
    Ok((buf, from))
}

fn echo_sizes_root_and_namespace_v4_v6(driver: &str) {
    let ns = netns(&format!("ue-{driver}"));
    let (p4, p6) = (free_port(), free_port());
    let l = udp_listener("r4", None, &format!("127.0.0.1:{p4}"), "action = \"echo\"")
        + &udp_listener("r6", None, &format!("[::1]:{p6}"), "action = \"echo\"")
        + &udp_listener("n4", Some(ns.name()), "127.0.0.1:7800", "action = \"echo\"")
        + &udp_listener("n6", Some(ns.name()), "[::1]:7801", "action = \"echo\"");
    let r = Ringress::start(&format!("ue-{driver}"), driver, &cfg(None, &l));
    let targets: [(Option<&TempNetns>, SocketAddr); 4] = [
        (None, SocketAddr::from(([127, 0, 0, 1], p4))),
        (None, format!("[::1]:{p6}").parse().unwrap()),
        (Some(&ns), "127.0.0.1:7800".parse().unwrap()),
        (Some(&ns), "[::1]:7801".parse().unwrap()),
    ];
    for (ns, to) in targets {
        let s = udp_in(ns, to);
        for size in [0usize, 1, 1472, 65_507] {
            let data = payload(size, size as u64 + 1);
            let (back, from) =
                ask(&s, to, &data).unwrap_or_else(|e| panic!("{to} size {size}: {e}"));
            assert_eq!(back.len(), size, "{to}: length");
            assert!(back == data, "{to}: {size}-byte datagram changed");
            assert_eq!(from, to, "reply from another address");
        }
    }
    assert!(r.stop().success());
}

fn wildcard_replies_from_the_address_sent_to(driver: &str) {
    let ns = netns(&format!("uw-{driver}"));
    let l = udp_listener("w", Some(ns.name()), "0.0.0.0:7810", "action = \"echo\"");
    let r = Ringress::start(&format!("uw-{driver}"), driver, &cfg(None, &l));
    // Two local addresses of the namespace; the client's source is 127.0.0.1 for
    // both, so without IP_PKTINFO the reply to 127.0.0.2 would leave from 127.0.0.1.
    for to in ["127.0.0.1:7810", "127.0.0.2:7810"] {
        let to: SocketAddr = to.parse().unwrap();
        let s = udp_in(Some(&ns), to);
        // A connected client drops datagrams from any other source.
        s.connect(to).unwrap();
        s.send(b"where from?").unwrap();
        let mut buf = [0u8; 64];
        let n = s
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no reply from {to}: {e}"));
        assert_eq!(&buf[..n], b"where from?");
        let s2 = udp_in(Some(&ns), to);
        let (_, from) = ask(&s2, to, b"x").unwrap();
        assert_eq!(from, to, "reply source differs from the address sent to");
    }
    assert!(r.stop().success());
}

fn proxy_sessions_keep_clients_apart_expire_and_are_limited(driver: &str) {
    let inside_uml = std::env::var_os("INSIDE_UML").is_some();
    let (clients, per_client) = if inside_uml { (20, 50) } else { (100, 1000) };
    let front = netns(&format!("upf-{driver}"));
    let back = netns(&format!("upb-{driver}"));
    let admin = free_port();
    let l = udp_listener(
        "px",
        Some(front.name()),
        "127.0.0.1:7820",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7821\"\nupstream_netns = \"{}\"\n\
             session_idle_timeout_ms = 1500",
            back.name()
        ),
    ) + &udp_listener(
        "lim",
        Some(front.name()),
        "127.0.0.1:7822",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7821\"\nupstream_netns = \"{}\"\nmax_sessions = 5",
            back.name()
        ),
    ) + &udp_listener("echo", Some(back.name()), "127.0.0.1:7821", "action = \"echo\"");
    let r = Ringress::start(&format!("up-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let to: SocketAddr = "127.0.0.1:7820".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let _sockets = std::thread::scope(|sc| {
        let front = &front;
        let handles: Vec<_> = (0..4)
            .map(|t| {
                sc.spawn(move || {
                    // Every client socket stays open to the end, so that no two
                    // clients share a source port (a reused port is the same client
                    // to a UDP server).
                    let mut keep = Vec::new();
                    for c in (t..clients).step_by(4) {
                        let s = udp_in(Some(front), to);
                        for i in 0..per_client {
                            assert!(Instant::now() < deadline, "too slow");
                            let msg = format!("client {c} datagram {i}");
                            // Loopback does not lose datagrams, but allow a retry.
                            let back = ask(&s, to, msg.as_bytes())
                                .or_else(|_| ask(&s, to, msg.as_bytes()))
                                .unwrap_or_else(|e| panic!("{msg}: {e}"));
                            assert_eq!(
                                back.0,
                                msg.as_bytes(),
                                "a reply crossed to the wrong client"
                            );
                        }
                        keep.push(s);
                    }
                    keep
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<UdpSocket>>()
    });
    // One session per client (a session counts as one accepted connection).
    assert_eq!(
        scrape(
            admin,
            "ringress_listener_connections_accepted_total",
            "px",
            None
        ),
        clients as f64,
        "one session per client"
    );
    assert!(scrape(admin, "ringress_listener_udp_sessions", "px", None) > 0.0);
    // Idle sessions expire after session_idle_timeout_ms (1.5 s).
    let t0 = Instant::now();
    while scrape(admin, "ringress_listener_udp_sessions", "px", None) > 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "sessions did not expire"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // max_sessions = 5: the sixth client onwards gets nothing.
    let lim: SocketAddr = "127.0.0.1:7822".parse().unwrap();
    let mut answered = 0;
    let socks: Vec<UdpSocket> = (0..10).map(|_| udp_in(Some(&front), lim)).collect();
    for s in &socks {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        if ask(s, lim, b"hi").is_ok() {
            answered += 1;
        }
    }
    assert_eq!(answered, 5, "max_sessions = 5 did not hold");
    assert_eq!(
        scrape(admin, "ringress_listener_udp_sessions", "lim", None),
        5.0
    );
    assert!(
        scrape(
            admin,
            "ringress_listener_errors_total",
            "lim",
            Some("session_limit")
        ) >= 5.0
    );
    assert!(r.stop().success());
}

fn closed_upstream_port_is_counted_and_the_listener_goes_on(driver: &str) {
    let front = netns(&format!("ucf-{driver}"));
    let back = netns(&format!("ucb-{driver}"));
    let admin = free_port();
    let l = udp_listener(
        "px",
        Some(front.name()),
        "127.0.0.1:7830",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7831\"\nupstream_netns = \"{}\"",
            back.name()
        ),
    );
    let r = Ringress::start(&format!("uc-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let to: SocketAddr = "127.0.0.1:7830".parse().unwrap();
    let a = udp_in(Some(&front), to);
    a.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Nothing listens on the upstream port: no reply, ever.
    for _ in 0..3 {
        assert!(
            ask(&a, to, b"anyone?").is_err(),
            "a reply from a closed port"
        );
    }
    let t0 = Instant::now();
    while scrape(
        admin,
        "ringress_listener_errors_total",
        "px",
        Some("upstream_refused"),
    ) < 1.0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "ICMP port unreachable not counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The upstream comes up: a new client is served through the same listener.
    let up = udp_in(Some(&back), "127.0.0.1:1".parse().unwrap());
    let up_fd = socket2::SockRef::from(&up);
    up_fd
        .bind(&"127.0.0.1:7831".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        if let Ok((n, from)) = up.recv_from(&mut buf) {
            let _ = up.send_to(&buf[..n], from);
        }
    });
    let b = udp_in(Some(&front), to);
    let (back_msg, _) = ask(&b, to, b"now?").expect("the listener stopped serving");
    assert_eq!(back_msg, b"now?");
    echo.join().unwrap();
    assert!(r.stop().success());
}

fn oversized_datagram_is_dropped_and_counted(driver: &str) {
    let (port, admin) = (free_port(), free_port());
    let l = udp_listener(
        "small",
        None,
        &format!("127.0.0.1:{port}"),
        "action = \"echo\"\nmax_datagram_bytes = 1500",
    );
    let r = Ringress::start(&format!("ut-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let s = udp_in(None, to);
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(
        ask(&s, to, &payload(9000, 1)).is_err(),
        "a 9,000-byte datagram was forwarded"
    );
    assert_eq!(
        scrape(
            admin,
            "ringress_listener_errors_total",
            "small",
            Some("truncated_datagram")
        ),
        1.0
    );
    // Datagrams that fit still pass.
    assert_eq!(ask(&s, to, &payload(1500, 2)).unwrap().0, payload(1500, 2));
    assert!(r.stop().success());
}

/// `n` unbound, non-blocking UDP sockets made inside `ns`.
fn udp_many(ns: &TempNetns, family_of: SocketAddr, n: usize) -> Vec<UdpSocket> {
    let path = ns.path();
    binder()
        .create(
            "test-udp",
            Some(path.as_path()),
            ns.name(),
            ringress::binder::SocketSpec::UdpClients {
                family_of,
                count: n,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(UdpSocket::from)
        .collect()
}

/// UDP datagrams the kernel dropped in namespace `ns` because a socket's receive
/// buffer was full (`RcvbufErrors` of /proc/net/snmp, read from inside `ns`).
fn rcvbuf_errors(ns: &TempNetns) -> u64 {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["cat", "/proc/net/snmp"])
        .output()
        .expect("nsenter");
    let text = String::from_utf8_lossy(&out.stdout);
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp: ")).collect();
    let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "RcvbufErrors")
        .map(|(_, v)| v.parse().unwrap())
        .expect("RcvbufErrors in /proc/net/snmp")
}

fn rotating_source_ports_against_a_silent_upstream_stay_bounded(driver: &str) {
    // In the one-CPU 6.1 guest the abuser, ringress, its binder and the legitimate
    // client share one slow CPU: 5,000 ports there (20,000 on the host).
    let inside_uml = std::env::var_os("INSIDE_UML").is_some();
    let ports: u16 = if inside_uml { 5_000 } else { 20_000 };
    let front = netns(&format!("urf-{driver}"));
    let back = netns(&format!("urb-{driver}"));
    let admin = free_port();
    let l = udp_listener(
        "abused",
        Some(front.name()),
        "127.0.0.1:7840",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7841\"\nupstream_netns = \"{}\"\n\
             session_unreplied_timeout_ms = 1000",
            back.name()
        ),
    ) + &udp_listener(
        "legit",
        Some(front.name()),
        "127.0.0.1:7843",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7842\"\nupstream_netns = \"{}\"",
            back.name()
        ),
    ) + &udp_listener(
        "echo",
        Some(back.name()),
        "127.0.0.1:7842",
        "action = \"echo\"",
    );
    // The abused listener's upstream: bound, never reads, never answers (and,
    // being bound, sends no ICMP port unreachable either).
    let silent = udp_in(Some(&back), "127.0.0.1:1".parse().unwrap());
    socket2::SockRef::from(&silent)
        .bind(&"127.0.0.1:7841".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let r = Ringress::start(&format!("ur-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let base = r.settled_fds();
    let abused: SocketAddr = "127.0.0.1:7840".parse().unwrap();
    let legit: SocketAddr = "127.0.0.1:7843".parse().unwrap();
    let done = AtomicBool::new(false);
    let most_fds = AtomicUsize::new(0);
    let (asked, answered) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        // A legitimate client of the other listener, one round trip every 10 ms.
        sc.spawn(|| {
            let s = udp_in(Some(&front), legit);
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                i += 1;
                let msg = format!("legit {i}");
                asked.fetch_add(1, Ordering::Relaxed);
                let got =
                    ask(&s, legit, msg.as_bytes()).or_else(|_| ask(&s, legit, msg.as_bytes()));
                if got.is_ok_and(|(b, _)| b == msg.as_bytes()) {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        // ringress's fds, every 20 ms.
        sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                most_fds.fetch_max(r.fds(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // The helper threads stop however this thread ends (a failed assertion too).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&done);
        // The abuser: one datagram from each of 20,000 source ports (5,000 in the
        // guest), in batches of 500 sockets (50 in the guest), 50 ms apart.
        // Ports 10000..30000: below the ephemeral range, so no autobound socket of
        // the namespace (the legitimate client) holds one.
        let batch_size = if inside_uml { 50 } else { 500 };
        let mut port = 10_000u16;
        while port < 10_000 + ports {
            let batch = udp_many(&front, abused, batch_size);
            for s in &batch {
                socket2::SockRef::from(s)
                    .bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
                    .unwrap_or_else(|e| panic!("bind port {port}: {e}"));
                let _ = s.send_to(b"scan", abused);
                port += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The sessions end within their unreplied timeout (1 s) and a sweep
        // (250 ms) of the last datagram.
        let sent = Instant::now();
        while scrape(admin, "ringress_listener_udp_sessions", "abused", None) > 0.0 {
            assert!(
                sent.elapsed() < Duration::from_secs(3),
                "unreplied sessions still open {:?} after the last datagram",
                sent.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let took = t0.elapsed();
    let m = metrics(admin);
    let accepted = sample(
        &m,
        "ringress_listener_connections_accepted_total",
        "abused",
        None,
    );
    let limited = sample(
        &m,
        "ringress_listener_errors_total",
        "abused",
        Some("session_limit"),
    );
    let unreplied = sample(
        &m,
        "ringress_listener_udp_sessions_expired_total",
        "abused",
        Some("unreplied"),
    );
    let idle = sample(
        &m,
        "ringress_listener_udp_sessions_expired_total",
        "abused",
        Some("idle"),
    );
    eprintln!(
        "{driver}: {ports} ports in {took:?}: {accepted} sessions, {limited} at the limit, \
         {unreplied} expired unreplied; fds {base} -> at most {}; legit {}/{}",
        most_fds.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
        asked.load(Ordering::Relaxed)
    );
    // Every datagram that reached ringress made a session or was refused at the
    // limit; every session ended unreplied (none idle: nothing answered).
    assert!(accepted > 0.0);
    assert_eq!(unreplied, accepted, "sessions not ended as unreplied");
    assert_eq!(idle, 0.0);
    assert_eq!(
        scrape(
            admin,
            "ringress_listener_connections_active",
            "abused",
            None
        ),
        0.0
    );
    // The fd count is bounded by max_sessions (default 4,096: one upstream socket
    // per session) plus the grown socket pools (at most 8 x 64 per pool, two
    // listeners) and a little slack.
    let bound = base + 4096 + 2 * 8 * 64 + 64;
    let most = most_fds.load(Ordering::Relaxed);
    assert!(
        most <= bound,
        "{most} fds, more than {bound}: {}",
        r.fd_kinds()
    );
    // The legitimate client was answered throughout.
    let (asked, answered) = (
        asked.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
    );
    assert!(asked >= 20, "the legitimate client hardly ran ({asked})");
    if inside_uml {
        // The guest's one CPU also runs the flood: answers may come later than
        // the client's two 500 ms tries now and then; most must come.
        assert!(
            answered * 100 >= asked * 95,
            "the legitimate client lost round trips: {answered} of {asked}"
        );
    } else {
        assert_eq!(answered, asked, "the legitimate client lost round trips");
    }
    // Once the sessions are gone, so are their sockets, and the grown socket pool
    // returns to its base 5 s after it last ran dry (checked every second). The
    // legitimate client's session (idle timeout 30 s) keeps its one socket.
    let t1 = Instant::now();
    while r.fds() > base + 1 {
        assert!(
            t1.elapsed() < Duration::from_secs(12),
            "fds not back to the baseline: {} (base {base} + 1): {}",
            r.fds(),
            r.fd_kinds()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(silent);
    assert!(r.stop().success());
}

fn burst_of_new_clients_through_the_pool_loses_almost_nothing(driver: &str) {
    const CLIENTS: usize = 300;
    const EACH: usize = 5;
    let front = netns(&format!("ubf-{driver}"));
    let back = netns(&format!("ubb-{driver}"));
    let admin = free_port();
    let l = udp_listener(
        "px",
        Some(front.name()),
        "127.0.0.1:7845",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7846\"\nupstream_netns = \"{}\"",
            back.name()
        ),
    ) + &udp_listener(
        "echo",
        Some(back.name()),
        "127.0.0.1:7846",
        "action = \"echo\"",
    );
    let r = Ringress::start(&format!("ub-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let to: SocketAddr = "127.0.0.1:7845".parse().unwrap();
    // 300 new clients (more than the pool's 64 ready sockets), 5 datagrams each
    // back to back, 10 new clients a millisecond: faster than the binder refills
    // the pool, so new sessions wait for a socket.
    let clients = udp_many(&front, to, CLIENTS);
    let kernel_drops_before = rcvbuf_errors(&front) + rcvbuf_errors(&back);
    for (c, s) in clients.iter().enumerate() {
        for i in 0..EACH {
            s.send_to(format!("client {c} datagram {i}").as_bytes(), to)
                .unwrap();
        }
        if (c + 1) % 10 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut got = vec![Vec::new(); CLIENTS];
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    while got.iter().map(Vec::len).sum::<usize>() < CLIENTS * EACH
        && t0.elapsed() < Duration::from_secs(5)
    {
        for (c, s) in clients.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                got[c].push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (c, g) in got.iter().enumerate() {
        for m in g {
            assert!(
                m.starts_with(&format!("client {c} ")),
                "client {c} got {m:?}"
            );
        }
    }
    let received: usize = got.iter().map(Vec::len).sum();
    let lost = CLIENTS * EACH - received;
    // Datagrams the kernel dropped at a full socket buffer (ringress's or the
    // clients', when a CPU shared with other work stalls a reader) are not
    // ringress's loss; they are counted apart and printed.
    let kernel_drops =
        (rcvbuf_errors(&front) + rcvbuf_errors(&back)).saturating_sub(kernel_drops_before);
    let m = metrics(admin);
    let errors = |k| sample(&m, "ringress_listener_errors_total", "px", Some(k));
    eprintln!(
        "{driver}: {received}/{} answered, {lost} lost ({kernel_drops} at full socket \
         buffers); upstream_error {}, session_queue_full {}",
        CLIENTS * EACH,
        errors("upstream_error"),
        errors("session_queue_full")
    );
    // At most 0.1 % lost by ringress (1 of 1,500).
    let by_ringress = lost.saturating_sub(kernel_drops as usize);
    assert!(
        by_ringress * 1000 <= CLIENTS * EACH,
        "{by_ringress} of {} datagrams lost by ringress ({lost} lost, {kernel_drops} of them \
         at full socket buffers)",
        CLIENTS * EACH
    );
    assert!(errors("upstream_error") + errors("session_queue_full") <= 1.0);
    // One session per client (a client whose datagrams the kernel all dropped
    // has none).
    let sessions = sample(
        &m,
        "ringress_listener_connections_accepted_total",
        "px",
        None,
    );
    let answered = got.iter().filter(|g| !g.is_empty()).count() as f64;
    assert!(
        (answered..=CLIENTS as f64).contains(&sessions),
        "{sessions} sessions for {CLIENTS} clients, {answered} of them answered"
    );
    assert!(r.stop().success());
}

fn one_client_two_local_addresses_two_sessions(driver: &str) {
    let front = netns(&format!("u2f-{driver}"));
    let back = netns(&format!("u2b-{driver}"));
    let admin = free_port();
    let l = udp_listener(
        "wild",
        Some(front.name()),
        "0.0.0.0:7850",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7851\"\nupstream_netns = \"{}\"",
            back.name()
        ),
    ) + &udp_listener(
        "echo",
        Some(back.name()),
        "127.0.0.1:7851",
        "action = \"echo\"",
    );
    let r = Ringress::start(&format!("u2-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    // Two local addresses of the namespace's lo; one client socket (source
    // 127.0.0.1:port) writes to both, in turn.
    let a: SocketAddr = "127.0.0.1:7850".parse().unwrap();
    let b: SocketAddr = "127.0.0.2:7850".parse().unwrap();
    let s = udp_in(Some(&front), a);
    for round in 0..3 {
        for to in [a, b] {
            let msg = format!("round {round} to {to}");
            let (back, from) =
                ask(&s, to, msg.as_bytes()).unwrap_or_else(|e| panic!("no reply to {msg:?}: {e}"));
            assert_eq!(back, msg.as_bytes());
            assert_eq!(from, to, "the reply to {to} came from {from}");
        }
    }
    assert_eq!(
        scrape(
            admin,
            "ringress_listener_connections_accepted_total",
            "wild",
            None
        ),
        2.0,
        "one session per (client, local address)"
    );
    assert_eq!(
        scrape(admin, "ringress_listener_udp_sessions", "wild", None),
        2.0
    );
    assert!(r.stop().success());
}
