//! Randomized tests of every session kind, without I/O.
//!
//! [`Sim`] is a simulated driver: it executes a session's [`SessionIo`] requests
//! the way the real drivers do (src/driver/mod.rs `Conn`): one send in flight
//! per side, a short send reported as `Sent(n)` and the rest sent next, one
//! receive per side when the session asks, shutdown(SHUT_WR) once a side has
//! drained, the upstream connect, the deadline turned into `Timeout`, SCTP
//! messages sent whole with the EAGAIN back-off of [`SendBackoff`], send
//! failures through [`Session::on_send_failed`], peel-off requests answered,
//! and the close once `finished`. Its peers are simulated too (a [`Net`] per
//! session kind), and so is the clock. A seeded PRNG picks, step by step, which
//! of the things that could happen next happens: a send completes (short), a
//! receive returns some bytes (or EOF, a reset, or ENOBUFS/ECANCELED, which the
//! driver swallows), a connect succeeds or is refused, a peer writes, reads,
//! stops reading, ends or resets, the clock moves (past a deadline, say).
//!
//! Checked in every sequence: no panic; each peer receives a prefix of what it
//! should, in order (a deterministic byte pattern), and all of it on a clean
//! end; a window is never exceeded by more than one receive; nothing reaches a
//! peer after the session shut down its write side or closed, and nothing new
//! is queued once the session asked to close; an error on one side aborts the
//! session (the other peer sees a reset); the session never waits with nothing
//! that can complete and no timer; it ends within a bounded number of steps once
//! the peers have stopped.
//!
//! Each test runs seeds 1..=N and prints how many sequences reached each notable
//! path (short sends, EAGAIN back-off, stall aborts, timeouts, peel-offs, ...).
//! On failure it prints the seed, the step it failed at and the command that
//! replays it with a trace of every step: `RINGRESS_SIM_SEED=N
//! RINGRESS_SIM_TRACE=1 cargo test --lib proto::sim::stream::proxy -- --exact
//! --nocapture`. `RINGRESS_SIM_RUNS=N` runs N sequences instead of the default.

mod many;
mod sctp;
pub(crate) mod stream;
mod udp;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use super::{
    Completion, ConnInfo, OutMessage, Piece, SendBackoff, SendFailed, Session, SessionIo, Side,
};
use crate::config::Action;
use crate::sctp::MsgInfo;

/// A small seeded PRNG (xorshift64*), so that a sequence can be replayed.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed: close seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// `len` deterministic bytes of stream `salt` (no short period, so a
    /// reordering or a lost piece shows).
    pub fn pattern(salt: u64, len: usize) -> Vec<u8> {
        let mut r = Rng::new(salt);
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&r.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

thread_local! {
    /// Steps of the sequence running on this thread (for the failure report).
    pub(super) static STEPS: Cell<usize> = const { Cell::new(0) };
    /// How many sequences reached each notable path (printed with the totals).
    static HITS: RefCell<BTreeMap<&'static str, u64>> = const { RefCell::new(BTreeMap::new()) };
    /// The paths this sequence reached so far.
    static SEEN: RefCell<BTreeSet<&'static str>> = const { RefCell::new(BTreeSet::new()) };
}

/// Notes that the running sequence reached path `what` (counted once per sequence).
pub(super) fn hit(what: &'static str) {
    SEEN.with(|s| s.borrow_mut().insert(what));
}

/// Runs `one(seed, trace)` for seeds `1..=runs` (or only `RINGRESS_SIM_SEED`),
/// and panics naming the seed and its length if one fails. `module` and `kind`
/// name the test (`module_path!()` and the test function). Returns the number
/// of sequences run.
pub(super) fn run(module: &str, kind: &str, runs: u64, one: impl Fn(u64, bool) -> usize) -> u64 {
    let test = format!(
        "{}::{kind}",
        module.split_once("::").map_or(module, |(_, rest)| rest)
    );
    let started = Instant::now();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let trace = std::env::var_os("RINGRESS_SIM_TRACE").is_some();
    let seeds: Vec<u64> = match env("RINGRESS_SIM_SEED") {
        Some(s) => vec![s],
        None => (1..=env("RINGRESS_SIM_RUNS").unwrap_or(runs)).collect(),
    };
    let mut steps = 0usize;
    HITS.with(|h| h.borrow_mut().clear());
    for &seed in &seeds {
        STEPS.with(|s| s.set(0));
        SEEN.with(|s| s.borrow_mut().clear());
        match catch_unwind(AssertUnwindSafe(|| one(seed, trace))) {
            Ok(n) => {
                steps += n;
                HITS.with(|h| {
                    let mut h = h.borrow_mut();
                    for w in SEEN.with(|s| std::mem::take(&mut *s.borrow_mut())) {
                        *h.entry(w).or_default() += 1;
                    }
                });
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "{kind}: seed {seed} failed at step {} of its sequence: {msg}\n\
                     replay: RINGRESS_SIM_SEED={seed} RINGRESS_SIM_TRACE=1 cargo test --lib \
                     {test} -- --exact --nocapture",
                    STEPS.with(Cell::get)
                );
            }
        }
    }
    let hits = HITS.with(|h| {
        h.borrow()
            .iter()
            .map(|(w, n)| format!("\n    {n:>6}  {w}"))
            .collect::<String>()
    });
    eprintln!(
        "sim {kind}: {} sequences, {steps} steps, {:?}; sequences that reached:{hits}",
        seeds.len(),
        started.elapsed()
    );
    seeds.len() as u64
}

/// What a receive on a leg returned.
#[derive(Debug)]
pub(super) enum Got {
    /// Bytes (a stream socket).
    Bytes(Vec<u8>),
    /// A piece of a message, or a notification (an SCTP socket).
    Piece {
        data: Vec<u8>,
        info: MsgInfo,
        eor: bool,
        notification: bool,
    },
    /// 0: end of stream / association.
    Eof,
    /// An errno.
    Error(i32),
    /// ENOBUFS, ECANCELED or EAGAIN: the driver swallows it and asks again.
    Nothing,
}

/// What a send did.
#[derive(Debug)]
pub(super) enum Put {
    /// Bytes taken (a message: all of it).
    Took(usize),
    /// EAGAIN: no room, nothing sent.
    NoRoom,
    /// An errno.
    Failed(i32),
}

/// The simulated peers of one session (and of its upstream). They check what
/// they receive as it arrives (and panic when it is wrong).
pub(super) trait Net: std::fmt::Debug {
    /// Whether a receive on `side` would complete now.
    fn can_recv(&self, side: Side) -> bool;
    /// A receive on `side` completes.
    fn recv(&mut self, side: Side, rng: &mut Rng) -> Got;
    /// Whether a send on `side` would complete now (else it waits for room).
    fn can_send(&self, side: Side) -> bool;
    /// A byte send of `data` on `side` completes.
    fn send_bytes(&mut self, side: Side, data: &[u8], rng: &mut Rng) -> Put;
    /// A message send on `side` completes.
    fn send_msg(&mut self, side: Side, m: &OutMessage, rng: &mut Rng) -> Put;
    /// shutdown(SHUT_WR) on `side`.
    fn shutdown(&mut self, side: Side);
    /// The upstream connect started.
    fn connect_started(&mut self, _rng: &mut Rng) {}
    /// Whether the upstream connect would complete now.
    fn can_connect(&self) -> bool {
        false
    }
    /// The upstream connect completes: `Ok` or an errno.
    fn connect(&mut self, _rng: &mut Rng) -> Result<(), i32> {
        Err(libc::ECONNREFUSED)
    }
    /// The binder answers the peel-off of `assoc`: whether it worked.
    fn peel(&mut self, _assoc: i32, _rng: &mut Rng) -> bool {
        false
    }
    /// How many things a peer could do now (0: nothing).
    fn peer_moves(&self) -> usize;
    /// A peer does one of them.
    fn peer_step(&mut self, rng: &mut Rng);
    /// The session's sockets were closed (`aborted`: with a reset).
    fn closed(&mut self, aborted: bool);
    /// Whether the peers have stopped: they will write nothing more and take
    /// everything sent to them.
    fn quiet(&self) -> bool;
}

/// One socket of the simulated session, as the driver's `SimSocket`.
#[derive(Default)]
struct SimSocket {
    open: bool,
    connecting: bool,
    /// Carries SCTP messages.
    msg: bool,
    sending: Vec<u8>,
    sent: usize,
    sending_msg: Option<OutMessage>,
    write_shut: bool,
    send_op: bool,
    recv_op: bool,
    backoff: SendBackoff,
    retry_at: Option<Instant>,
}

impl SimSocket {
    fn ready(&self) -> bool {
        self.open && !self.connecting
    }
}

/// What the session reported to the driver, summed.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub too_big: u64,
    pub assoc_up: u64,
    pub assoc_down: u64,
    /// Messages the session dropped itself (`SessionIo::dropped`).
    pub dropped: u64,
    /// Messages lost to send failures and stalls (`send_drops`).
    pub send_drops: u64,
    pub lost: u64,
    /// Associations aborted for taking nothing for `SEND_STALL_LIMIT`.
    pub stalls: u64,
    pub timeouts: u64,
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    Send(Side),
    Retry(Side),
    Recv(Side),
    Connect,
    Timer,
    Peel,
    Peer,
    Tick,
    /// Nothing else can happen: the clock jumps to the next timer.
    Jump(Instant),
}

/// The simulated driver of one session.
pub(super) struct Sim<N: Net> {
    pub rng: Rng,
    pub now: Instant,
    pub session: Session,
    pub io: SessionIo,
    pub net: N,
    sockets: [SimSocket; 2],
    connect_op: bool,
    /// `Some(aborted)` once the driver closed the session.
    pub closed: Option<bool>,
    /// Error completions reported per side (count).
    pub errors: [u32; 2],
    /// EOF completions reported per side (count).
    pub eofs: [u32; 2],
    /// The session of a one-to-many SCTP socket.
    pub many: bool,
    /// Peel-offs asked for and not answered yet.
    peels: Vec<i32>,
    /// Every peel-off asked for.
    pub peel_requests: Vec<i32>,
    pub counts: Counts,
    /// Most bytes a side may have unsent (the window check).
    pub max_unsent: [usize; 2],
    /// Payload queued per side when last looked, once the session asked to close.
    queued_after_close: Option<[usize; 2]>,
    pub steps: usize,
    trace: bool,
    t0: Instant,
}

impl<N: Net> Sim<N> {
    /// A driver for `session` with peers `net`; `msg_legs`: the sockets carry SCTP
    /// messages. Runs `on_open` at once.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        session: Session,
        action: &Action,
        info: &ConnInfo,
        net: N,
        rng: Rng,
        msg_legs: bool,
        many: bool,
        trace: bool,
    ) -> Sim<N> {
        let t0 = Instant::now();
        let leg = |open| SimSocket {
            open,
            msg: msg_legs,
            ..SimSocket::default()
        };
        let mut s = Sim {
            rng,
            now: t0,
            session,
            io: SessionIo::default(),
            net,
            sockets: [leg(true), leg(false)],
            connect_op: false,
            closed: None,
            errors: [0; 2],
            eofs: [0; 2],
            many,
            peels: Vec::new(),
            peel_requests: Vec::new(),
            counts: Counts::default(),
            max_unsent: [usize::MAX; 2],
            queued_after_close: None,
            steps: 0,
            trace,
            t0,
        };
        s.session.on_open(action, info, "tenant", &mut s.io, s.now);
        s.drive();
        s
    }

    fn log(&self, what: std::fmt::Arguments<'_>) {
        if self.trace {
            eprintln!(
                "{:>6} {:>7.3}s {what}",
                self.steps,
                (self.now - self.t0).as_secs_f64()
            );
        }
    }

    /// Runs until the session is closed; panics if that takes more than
    /// `max_steps`, or more than `quiet_limit` once the peers have stopped.
    pub fn run(&mut self, max_steps: usize, quiet_limit: usize) {
        let mut quiet_since = None;
        while self.closed.is_none() {
            self.steps += 1;
            STEPS.with(|s| s.set(self.steps));
            assert!(self.steps <= max_steps, "no end after {max_steps} steps");
            if !self.net.quiet() {
                quiet_since = None;
            } else if quiet_since.is_none() {
                quiet_since = Some(self.steps);
            }
            if let Some(q) = quiet_since {
                assert!(
                    self.steps - q <= quiet_limit,
                    "the peers stopped {quiet_limit} steps ago and the session has not ended"
                );
            }
            let ev = self.choose();
            self.log(format_args!("{ev:?}"));
            self.apply(ev);
            self.drive();
            self.check();
        }
    }

    fn choose(&mut self) -> Ev {
        let mut evs = Vec::with_capacity(8);
        let mut next_timer = self.io.deadline;
        for side in [Side::Client, Side::Upstream] {
            let l = &self.sockets[side.index()];
            match l.retry_at {
                Some(t) if t <= self.now => evs.push(Ev::Retry(side)),
                Some(t) => next_timer = Some(next_timer.map_or(t, |d| d.min(t))),
                None if l.send_op && self.net.can_send(side) => evs.push(Ev::Send(side)),
                None => {}
            }
            if l.recv_op && self.net.can_recv(side) {
                evs.push(Ev::Recv(side));
            }
        }
        if self.connect_op && self.net.can_connect() {
            evs.push(Ev::Connect);
        }
        if self.io.deadline.is_some_and(|d| d <= self.now) {
            evs.push(Ev::Timer);
        }
        if !self.peels.is_empty() {
            evs.push(Ev::Peel);
        }
        // Peers act about as often as the session's operations complete.
        let moves = self.net.peer_moves();
        for _ in 0..moves.min(3) {
            evs.push(Ev::Peer);
        }
        if evs.is_empty() {
            let Some(t) = next_timer else {
                self.log(format_args!("{:#?}", self.net));
                panic!(
                    "stuck: nothing in flight can complete and no timer is set \
                     (sockets: {:?}, connect: {}, close asked: {})",
                    self.sockets
                        .iter()
                        .map(|l| (l.open, l.send_op, l.recv_op))
                        .collect::<Vec<_>>(),
                    self.connect_op,
                    self.io.close
                );
            };
            return Ev::Jump(t);
        }
        if self.rng.one_in(12) {
            return Ev::Tick;
        }
        evs[self.rng.below(evs.len())]
    }

    fn apply(&mut self, ev: Ev) {
        match ev {
            Ev::Send(side) => self.send(side),
            Ev::Retry(side) => {
                let l = &mut self.sockets[side.index()];
                l.retry_at = None;
                l.send_op = false;
            }
            Ev::Recv(side) => self.recv(side),
            Ev::Connect => {
                self.connect_op = false;
                match self.net.connect(&mut self.rng) {
                    Ok(()) => self.complete(Side::Upstream, Completion::Connected),
                    Err(e) => self.complete(Side::Upstream, Completion::Error(e)),
                }
            }
            Ev::Timer => {
                hit("timeout");
                self.io.deadline = None;
                self.counts.timeouts += 1;
                self.complete(Side::Client, Completion::Timeout);
            }
            Ev::Peel => {
                let assoc = self.peels.remove(self.rng.below(self.peels.len()));
                let ok = self.net.peel(assoc, &mut self.rng);
                self.log(format_args!("peel-off of {assoc}: ok {ok}"));
                if let Session::Sctp(s) = &mut self.session {
                    s.on_peeled((!ok).then_some(assoc), &mut self.io);
                }
                hit(if ok {
                    "peel-off: ok"
                } else {
                    "peel-off: failed"
                });
                if !ok {
                    assert!(
                        self.io.sides[0].msgs.iter().any(
                            |m| m.info.assoc == assoc && m.flags & crate::sctp::SCTP_ABORT != 0
                        ),
                        "association {assoc}: its peel-off failed, yet no SCTP_ABORT was queued"
                    );
                }
                self.take_events();
            }
            Ev::Peer => self.net.peer_step(&mut self.rng),
            Ev::Tick => {
                let retry = self.sockets.iter().filter_map(|l| l.retry_at).min();
                if let Some(t) = retry.filter(|_| self.rng.one_in(2)) {
                    // Often straight to a send's retry (a stalled association
                    // takes ~80 of them before it is given up).
                    self.now = self.now.max(t);
                    return;
                }
                let ms = match self.rng.below(20) {
                    0..=13 => self.rng.range(0, 3),
                    14..=18 => self.rng.range(4, 100),
                    _ => self.rng.range(100, 6000),
                };
                self.now += Duration::from_millis(ms as u64);
            }
            Ev::Jump(t) => {
                self.now = self.now.max(t) + Duration::from_millis(self.rng.range(0, 2) as u64)
            }
        }
    }

    fn send(&mut self, side: Side) {
        let i = side.index();
        let l = &mut self.sockets[i];
        l.send_op = false;
        if l.msg {
            let m = l.sending_msg.clone().expect("a message send in flight");
            match self.net.send_msg(side, &m, &mut self.rng) {
                Put::Took(_) => {
                    let l = &mut self.sockets[i];
                    l.backoff.reset();
                    let n = l.sending_msg.take().map_or(0, |m| m.data.len());
                    self.io.sides[i].in_flight = 0;
                    self.complete(side, Completion::Sent(n));
                }
                Put::NoRoom => {
                    hit("send: no room (EAGAIN), back-off");
                    // Conn::send_would_block.
                    let wait = self.sockets[i].backoff.no_room(self.now);
                    if self.many
                        && self.sockets[i].backoff.stalled(self.now)
                        && self.send_stalled(side)
                    {
                        return;
                    }
                    let l = &mut self.sockets[i];
                    l.send_op = true;
                    l.retry_at = Some(self.now + wait);
                }
                Put::Failed(e) => self.send_failed(side, e),
            }
        } else {
            let l = &self.sockets[i];
            match self
                .net
                .send_bytes(side, &l.sending[l.sent..], &mut self.rng)
            {
                Put::Took(n) => {
                    // Conn::sent.
                    let l = &mut self.sockets[i];
                    assert!(n > 0 && l.sent + n <= l.sending.len());
                    if l.sent + n < l.sending.len() {
                        hit("send: short");
                    }
                    l.backoff.reset();
                    l.sent += n;
                    if l.sent >= l.sending.len() {
                        l.sending.clear();
                        l.sent = 0;
                    }
                    self.io.sides[i].in_flight = l.sending.len() - l.sent;
                    self.complete(side, Completion::Sent(n));
                }
                Put::NoRoom => unreachable!("a byte send waits for room instead"),
                Put::Failed(e) => self.send_failed(side, e),
            }
        }
    }

    /// Conn::send_stalled.
    fn send_stalled(&mut self, side: Side) -> bool {
        let i = side.index();
        let Some(head) = self.sockets[i].sending_msg.take() else {
            return false;
        };
        let dropped = 1 + self.io.abort_association(side, head.info.assoc);
        self.io.sides[i].in_flight = 0;
        self.sockets[i].backoff.reset();
        self.counts.send_drops += dropped as u64;
        self.counts.stalls += 1;
        hit("send: association stalled, aborted");
        self.log(format_args!(
            "association {} stalled: aborted, {dropped} dropped",
            head.info.assoc
        ));
        true
    }

    /// Conn::send_failed.
    fn send_failed(&mut self, side: Side, errno: i32) {
        let i = side.index();
        self.sockets[i].sending_msg = None;
        self.sockets[i].sending.clear();
        self.sockets[i].sent = 0;
        let r = self
            .session
            .on_send_failed(side, errno, &mut self.io, self.now);
        self.log(format_args!("send on {side:?} failed ({errno}): {r:?}"));
        match r {
            SendFailed::Dropped(n) => {
                hit("send failed: dropped");
                self.counts.send_drops += u64::from(n);
            }
            SendFailed::Ended => {
                hit("send failed: ended");
                self.errors[i] += 1;
                assert!(
                    self.io.abort,
                    "a send error that ends the session aborts it"
                );
            }
        }
        self.take_events();
    }

    fn recv(&mut self, side: Side) {
        self.sockets[side.index()].recv_op = false;
        let got = self.net.recv(side, &mut self.rng);
        match got {
            Got::Bytes(d) => {
                assert!(!d.is_empty());
                self.complete(side, Completion::Recv(&d));
            }
            Got::Piece {
                data,
                info,
                eor,
                notification,
            } => {
                assert!(!data.is_empty());
                self.complete(
                    side,
                    Completion::Message(Piece {
                        data: &data,
                        info,
                        eor,
                        notification,
                    }),
                );
            }
            Got::Eof => self.complete(side, Completion::Eof),
            Got::Error(e) => self.complete(side, Completion::Error(e)),
            Got::Nothing => {
                hit("receive: swallowed (ENOBUFS/ECANCELED)");
                self.log(format_args!("receive on {side:?} swallowed; asked again"));
                self.io.side(side).recv();
            }
        }
    }

    /// Conn::complete.
    fn complete(&mut self, side: Side, c: Completion<'_>) {
        if self.trace {
            let what = match &c {
                Completion::Recv(d) => format!("Recv({} bytes)", d.len()),
                Completion::Message(p) => format!(
                    "Message({} bytes, {:?}, eor {}, notification {})",
                    p.data.len(),
                    p.info,
                    p.eor,
                    p.notification
                ),
                c => format!("{c:?}"),
            };
            self.log(format_args!("  -> {side:?} {what}"));
        }
        let error = matches!(c, Completion::Error(_));
        match c {
            Completion::Error(_) => {
                hit("completion: error");
                self.errors[side.index()] += 1;
            }
            Completion::Eof => self.eofs[side.index()] += 1,
            Completion::Connected => self.sockets[1].connecting = false,
            _ => {}
        }
        self.session.on_complete(side, c, &mut self.io, self.now);
        let lost = self.io.lost;
        self.take_events();
        if (error || lost) && !self.many {
            assert!(
                self.io.abort,
                "an error on {side:?} must abort the session (the other peer sees a reset)"
            );
        }
    }

    /// Conn::take_sctp_events.
    fn take_events(&mut self) {
        let io = &mut self.io;
        let c = &mut self.counts;
        if io.too_big > 0 {
            hit("sctp: message over max_message_bytes");
        }
        if io.dropped > 0 {
            hit("sctp: message dropped by the session");
        }
        if io.lost {
            hit("sctp: association lost");
        }
        c.too_big += u64::from(std::mem::take(&mut io.too_big));
        c.assoc_up += u64::from(std::mem::take(&mut io.assoc_up));
        c.assoc_down += u64::from(std::mem::take(&mut io.assoc_down));
        c.dropped += u64::from(std::mem::take(&mut io.dropped));
        if std::mem::take(&mut io.lost) {
            c.lost += 1;
        }
    }

    fn finished(&self) -> bool {
        self.io.abort
            || (self.io.close
                && self
                    .sockets
                    .iter()
                    .zip(&self.io.sides)
                    .all(|(l, io)| !l.ready() || io.unsent() == 0))
    }

    /// Acts on the session's requests, as the drivers' `drive`.
    fn drive(&mut self) {
        if self.closed.is_some() {
            return;
        }
        if self.finished() {
            let aborted = self.io.abort;
            hit(if aborted { "end: abort" } else { "end: close" });
            self.log(format_args!("close (aborted: {aborted})"));
            self.closed = Some(aborted);
            self.net.closed(aborted);
            return;
        }
        if std::mem::take(&mut self.io.connect) {
            assert!(!self.sockets[1].open, "a second connect");
            self.sockets[1].open = true;
            self.sockets[1].connecting = true;
            self.connect_op = true;
            self.net.connect_started(&mut self.rng);
        }
        // Conn::shutdown_drained.
        for side in [Side::Client, Side::Upstream] {
            let i = side.index();
            let (l, io) = (&mut self.sockets[i], &self.io.sides[i]);
            if io.shutdown_write && !l.write_shut && l.ready() && io.unsent() == 0 {
                l.write_shut = true;
                self.log(format_args!("shutdown(SHUT_WR) on {side:?}"));
                self.net.shutdown(side);
            }
        }
        for a in std::mem::take(&mut self.io.peel_off) {
            assert!(self.many, "a peel-off asked for by a one-to-one session");
            self.peels.push(a);
            self.peel_requests.push(a);
        }
        for side in [Side::Client, Side::Upstream] {
            let i = side.index();
            let (l, io) = (&mut self.sockets[i], &mut self.io.sides[i]);
            if !l.ready() {
                continue;
            }
            if !l.send_op {
                if l.msg {
                    if l.sending_msg.is_none() {
                        if let Some(m) = io.msgs.pop_front() {
                            io.msg_bytes -= m.data.len();
                            io.in_flight = m.data.len();
                            l.sending_msg = Some(m);
                        }
                    }
                    l.send_op = l.sending_msg.is_some();
                } else {
                    assert!(io.msgs.is_empty(), "a message queued on a byte stream");
                    if l.sending.is_empty() && !io.out.is_empty() {
                        std::mem::swap(&mut l.sending, &mut io.out);
                        l.sent = 0;
                        io.in_flight = l.sending.len();
                    }
                    l.send_op = !l.sending.is_empty();
                }
                if l.send_op {
                    assert!(!l.write_shut || l.msg, "a send after shutdown(SHUT_WR)");
                }
            }
            if !l.recv_op && std::mem::take(&mut io.want_recv) {
                assert!(
                    self.peels.is_empty(),
                    "a receive on the one-to-many socket while a peel-off is pending"
                );
                l.recv_op = true;
            }
        }
    }

    /// The invariants that hold after every step.
    fn check(&mut self) {
        for side in [Side::Client, Side::Upstream] {
            let i = side.index();
            let unsent = self.io.sides[i].unsent();
            if self.max_unsent[i] != usize::MAX && unsent * 2 > self.max_unsent[i] {
                hit("window: over half full");
            }
            assert!(
                unsent <= self.max_unsent[i],
                "{unsent} bytes unsent on {side:?}: over the window by more than one receive \
                 (limit {})",
                self.max_unsent[i]
            );
        }
        if self.io.close && self.closed.is_none() {
            let q = [0, 1].map(|i| self.io.sides[i].out.len() + self.io.sides[i].msg_bytes);
            if let Some(before) = self.queued_after_close {
                assert!(
                    q[0] <= before[0] && q[1] <= before[1],
                    "bytes queued after the session asked to close ({before:?} -> {q:?})"
                );
            }
            self.queued_after_close = Some(q);
        }
    }
}
