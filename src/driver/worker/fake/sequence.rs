//! One randomized sequence (a worker over the fake, one listener, its clients),
//! the checks at its end, and the tests.

use super::*;

impl FakeBackend {
    /// Checks at the end of a sequence (after `run` returned); returns its steps.
    pub(super) fn finish(&self, stats: &ListenerStats, worker: &WorkerStats) -> usize {
        assert!(
            self.ops.is_empty(),
            "operations in flight after run returned: {:?}",
            self.ops
        );
        assert!(self.lent.is_empty(), "buffers still lent at the end");
        assert!(self.listener_closed, "the listener was never closed");
        let (mut accepted, mut bytes_in, mut bytes_out) = (0u64, 0u64, 0u64);
        for (i, s) in self.sessions.iter().enumerate() {
            if !s.accepted {
                continue;
            }
            for (side, p) in s.p.iter().enumerate() {
                if p.fd.is_some() {
                    assert!(
                        p.closed.is_some(),
                        "session {i}: the {} socket was never closed",
                        name(side)
                    );
                }
            }
            if s.dropped {
                hit("a connection accepted while the listener was removed, closed");
                continue;
            }
            accepted += 1;
            let c = s.p[0].closed.expect("closed");
            if let Some(u) = s.p[1].closed {
                assert_eq!(
                    c.aborted, u.aborted,
                    "session {i}: one socket reset, the other not"
                );
            }
            // Errors of the last batch, which the worker handled before returning.
            let late = self.batch.values().filter(|e| e.s == i && e.error).count();
            let errors = s.errors() + late as u32;
            match &s.kind {
                Kind::Proxy { .. } => {
                    if c.aborted {
                        hit("proxy: aborted");
                    }
                    let timers = self.setup.idle_ms > 0
                        || stats.upstream_timeouts.load(Relaxed) > 0
                        || s.connect != Some(Ok(()));
                    if errors == 0 && !timers {
                        assert!(!c.aborted, "session {i}: aborted with no error or timeout");
                    }
                }
                Kind::Fixed(..) if c.aborted && errors == 0 => {
                    // The lingering close of respond and http resets a client
                    // that took nothing of what is still queued (or in flight)
                    // for LINGER_MS; the fake's clock jumps there. (A send in
                    // flight may still complete after that decision, so the
                    // client may have got it all.) The proto simulation checks
                    // the condition exactly.
                    hit("a stalled reader reset by the lingering close's deadline");
                }
                _ => assert_eq!(
                    c.aborted,
                    errors > 0,
                    "session {i}: aborted (linger 0) if and only if an error reached it ({errors} errors)"
                ),
            }
            if c.after_shutdown && !c.aborted {
                hit("a session closed (not reset) by Shutdown");
            }
            if !c.aborted && !c.after_shutdown {
                match &s.kind {
                    Kind::Echo => {
                        assert!(s.p[0].eof_taken, "session {i}: echo ended before EOF");
                        assert_eq!(
                            s.p[0].got,
                            s.p[0].eff(),
                            "session {i}: echo ended cleanly but short"
                        );
                    }
                    Kind::Fixed(v, _) => {
                        assert_eq!(
                            s.p[0].got,
                            v.len(),
                            "session {i}: ended cleanly without every answer"
                        );
                    }
                    Kind::Proxy { .. } => {
                        for side in 0..2 {
                            assert_eq!(
                                s.p[side].got,
                                s.due(side),
                                "session {i}: the {} got less than due on a clean end",
                                name(side)
                            );
                        }
                    }
                }
                hit("clean end: everything delivered, checked");
            }
            bytes_in += (s.p[0].eff()) as u64;
            bytes_out += (s.p[0].got - s.p[0].got_ignored) as u64;
        }
        assert_eq!(
            stats.accepted.load(Relaxed),
            accepted,
            "accepted sessions counted"
        );
        assert_eq!(
            stats.closed.load(Relaxed),
            accepted,
            "closed sessions counted"
        );
        assert_eq!(stats.bytes_in.load(Relaxed), bytes_in, "bytes_in");
        assert_eq!(stats.bytes_out.load(Relaxed), bytes_out, "bytes_out");
        assert_eq!(
            stats.accept_errors.load(Relaxed),
            self.accept_errors,
            "accept_errors"
        );
        assert_eq!(worker.sessions.load(Relaxed), 0, "the open-sessions gauge");
        self.steps
    }
}

/// The actions under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Act {
    Echo,
    Respond,
    Http,
    /// Proxy, with or without a PROXY header.
    Proxy(bool),
}

/// The listener and the clients of one sequence.
pub(super) fn make_setup(act: Act, rng: &mut Rng, seed: u64) -> (Setup, Vec<Sess>) {
    let n = rng.pick(&[1, 1, 2, 3, 4]);
    let mut setup = Setup {
        action: Action::Echo,
        window: 0,
        idle_ms: 0,
        upstreams: vec![],
    };
    let proxy = match act {
        Act::Proxy(pp) => {
            let upstreams: Vec<SocketAddr> = if rng.one_in(3) {
                vec!["127.0.0.1:1".parse().expect("literal")]
            } else {
                vec![
                    "127.0.0.1:1".parse().expect("literal"),
                    "127.0.0.2:2".parse().expect("literal"),
                ]
            };
            let cfg = Arc::new(ProxyConfig {
                upstreams: upstreams.clone(),
                connect_timeout_ms: rng.pick(&[5, 1000, 1000]),
                idle_timeout_ms: rng.pick(&[0, 0, 0, 0, 2, 5, 50]),
                buffer_bytes: rng.pick(&[1, 100, 1000, 4096, 65_536]),
                proxy_protocol: pp.then(|| rng.pick(&[ProxyProtocol::V1, ProxyProtocol::V2])),
                ..ProxyConfig::test()
            });
            setup.window = cfg.buffer_bytes;
            setup.idle_ms = cfg.idle_timeout_ms;
            setup.upstreams = upstreams;
            Some(cfg)
        }
        _ => None,
    };
    let reply = pattern(seed ^ 0xAB, rng.range(1, 3000));
    setup.action = match (act, &proxy) {
        (Act::Echo, _) => Action::Echo,
        (Act::Respond, _) => Action::Respond(reply.clone()),
        (Act::Http, _) => Action::Http(crate::config::HttpConfig {
            // The fake moves its clock by whole timeouts: the head and
            // keep-alive deadlines would cut the scripts short (0: none).
            header_timeout_ms: 0,
            keepalive_timeout_ms: 0,
        }),
        (Act::Proxy(_), Some(cfg)) => Action::Proxy(cfg.clone()),
        (Act::Proxy(_), None) => unreachable!(),
    };
    let mut sessions = Vec::new();
    for i in 0..n {
        let salt = seed.wrapping_mul(64).wrapping_add(i as u64);
        let bulk = rng.one_in(40);
        let (kind, client, upstream) = match act {
            Act::Echo => {
                let out = pattern(salt, data_len(rng, bulk));
                let len = out.len();
                (Kind::Echo, Peer::new(rng, out, len, bulk), Peer::default())
            }
            Act::Respond => {
                let len = if rng.one_in(10) {
                    rng.range(60_000, 100_000)
                } else {
                    data_len(rng, false)
                };
                let mut c = Peer::new(rng, pattern(salt, len), reply.len(), false);
                c.fin_after_fin = rng.one_in(3);
                (Kind::Fixed(reply.clone(), true), c, Peer::default())
            }
            Act::Http => {
                let (out, expect) = http_script(rng, salt);
                let c = Peer::new(rng, out, expect.len(), false);
                (Kind::Fixed(expect, false), c, Peer::default())
            }
            Act::Proxy(pp) => {
                let a = pattern(salt, data_len(rng, bulk));
                let echo = rng.one_in(3);
                let b = if echo {
                    Vec::new()
                } else {
                    pattern(salt ^ 0x5555, data_len(rng, bulk))
                };
                let (la, lb) = (a.len(), b.len());
                let mut c = Peer::new(rng, a, lb.max(la), bulk);
                let mut u = Peer::new(rng, b, la, bulk);
                c.tcp = pp && rng.one_in(2);
                u.echo = echo;
                if echo {
                    // Sends back what it gets, and ends after the client's end.
                    u.fin_after_fin = true;
                } else {
                    // One may wait for the other's end, not both.
                    u.after_fin = rng.one_in(4);
                    c.fin_after_fin = !u.after_fin && !c.tcp && rng.one_in(4);
                }
                let kind = Kind::Proxy {
                    pp: proxy.as_ref().and_then(|p| p.proxy_protocol).filter(|_| pp),
                    header: Vec::new(),
                };
                (kind, c, u)
            }
        };
        let connect = match act {
            Act::Proxy(_) => match rng.below(20) {
                0 => None,
                1 | 2 => Some(Err(libc::ECONNREFUSED)),
                3 => Some(Err(libc::ETIMEDOUT)),
                _ => Some(Ok(())),
            },
            _ => None,
        };
        sessions.push(Sess {
            kind,
            p: [client, upstream],
            key: None,
            accepted: false,
            dropped: false,
            connect,
            quiet_since: None,
            moved: 0,
        });
    }
    (setup, sessions)
}

/// One sequence: a worker over a fake backend, one listener, its clients.
/// Returns the number of steps.
pub(super) fn one(act: Act, seed: u64, trace: bool) -> usize {
    let mut rng = Rng::new(seed);
    let (setup, sessions) = make_setup(act, &mut rng, seed);
    let upstream = match &setup.action {
        Action::Proxy(p) => Some(Arc::new(
            UpstreamSet::new(
                p.upstreams.clone(),
                None,
                ClientProto::Tcp,
                "fake",
                binder(),
            )
            .expect("upstreams in the root namespace"),
        )),
        _ => None,
    };
    let shared = Arc::new(ListenerShared::test("fake", setup.action.clone(), upstream));
    let listener = OwnedFd::from(
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket"),
    );
    let (ctx, tx, wake_fd, stats) = crate::driver::worker::tests::ctx();
    let clock = Rc::new(Cell::new(Instant::now()));
    let early = rng.one_in(6).then(|| rng.range(1, 300));
    let remove = rng.one_in(8).then(|| rng.range(1, 200));
    let accept_error = rng.one_in(6).then(|| {
        let after = rng.below(3);
        let errno = rng.pick(&[
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ECONNABORTED,
            libc::EINTR,
            libc::EPROTO,
            libc::EINVAL,
        ]);
        (after, errno)
    });
    let buf_size = rng.pick(&[512, 4096, 16 * 1024, 64 * 1024]);
    let mut fake = FakeBackend {
        rng,
        clock: clock.clone(),
        setup,
        buf_size,
        trace,
        steps: 0,
        next_op: 1,
        ops: OpTable::default(),
        lent: BTreeMap::new(),
        free_bufs: Vec::new(),
        next_buf: 0,
        sessions,
        next_client: 0,
        arrive_at: 0,
        unlinked: Vec::new(),
        keys: BTreeMap::new(),
        fds: Vec::new(),
        closed: BTreeSet::new(),
        grave: Vec::new(),
        listener: listener.as_raw_fd(),
        listener_closed: false,
        wake_fd: wake_fd.as_raw_fd(),
        tx,
        cmd_pending: false,
        shutdown_sent: false,
        engine_shutdown: false,
        remove_at: remove,
        removed: false,
        drain_on_remove: act != Act::Http,
        accept_cancelled: false,
        early_shutdown_at: early,
        accept_error,
        accept_errors: 0,
        ready_streak: 0,
        batch: BTreeMap::new(),
        mem: BTreeMap::new(),
        counted_accept_error: None,
        ended: BTreeSet::new(),
    };
    fake.send_cmd(Command::AddListener {
        id: 1,
        fd: listener.into(),
        shared: shared.clone(),
    });
    let mut w = Worker::new(fake, ctx);
    w.set_clock(clock);
    w.run().expect("a fake backend never fails");
    w.backend().finish(&shared.stats, &stats)
}

/// Runs `one(act, seed)` for seeds `1..=runs` (or only `RINGRESS_FAKE_SEED`) and
/// panics naming the seed and its step if one fails.
pub(super) fn run(test: &str, act: Act, runs: u64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let trace = std::env::var_os("RINGRESS_FAKE_TRACE").is_some();
    let seeds: Vec<u64> = match env("RINGRESS_FAKE_SEED") {
        Some(s) => vec![s],
        None => (1..=env("RINGRESS_FAKE_RUNS").unwrap_or(runs)).collect(),
    };
    let started = Instant::now();
    let mut hits: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut steps = 0usize;
    let mut longest = (0, 0);
    for &seed in &seeds {
        STEPS.with(|s| s.set(0));
        SEEN.with(|s| s.borrow_mut().clear());
        match catch_unwind(AssertUnwindSafe(|| one(act, seed, trace))) {
            Ok(n) => {
                steps += n;
                longest = longest.max((n, seed));
                for w in SEEN.with(|s| std::mem::take(&mut *s.borrow_mut())) {
                    *hits.entry(w).or_default() += 1;
                }
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "{test}: seed {seed} failed at step {}: {msg}\n\
                     replay: RINGRESS_FAKE_SEED={seed} RINGRESS_FAKE_TRACE=1 cargo test --lib \
                     driver::worker::fake::{test} -- --exact --nocapture",
                    STEPS.with(Cell::get)
                );
            }
        }
    }
    let hits: String = hits
        .iter()
        .map(|(w, n)| format!("\n    {n:>6}  {w}"))
        .collect();
    eprintln!(
        "fake backend {test}: {} sequences, {steps} steps (longest: seed {}, {} steps), {:?}; \
         sequences that reached:{hits}",
        seeds.len(),
        longest.1,
        longest.0,
        started.elapsed()
    );
}

#[test]
pub(super) fn echo() {
    run("echo", Act::Echo, 2000);
}

#[test]
pub(super) fn respond() {
    run("respond", Act::Respond, 2000);
}

#[test]
pub(super) fn http() {
    run("http", Act::Http, 2000);
}

#[test]
pub(super) fn proxy() {
    run("proxy", Act::Proxy(false), 2000);
}

#[test]
pub(super) fn proxy_protocol() {
    run("proxy_protocol", Act::Proxy(true), 2000);
}
