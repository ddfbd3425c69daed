//! A fake backend ([`FakeBackend`]) and a randomized test of the engine over it.
//!
//! The fake keeps every operation the worker starts in a table. A seeded PRNG
//! decides, step by step (one [`Backend::wait`] or [`Backend::ready`] call), which
//! of them end and how, against simulated peers, and moves a fake clock that the
//! worker reads ([`Worker::set_clock`]); so a real [`Worker::run`] is driven,
//! unchanged, through accepts, short sends, EAGAIN back-offs, spurious
//! ENOBUFS/EAGAIN/ECANCELED receives, resets, refused and timed-out connects,
//! idle timeouts, cancels that lose the race with a completion, listener removal
//! and shutdown with sessions still open.
//!
//! - Clients connect through the multishot accept: each gets a real fd (one end
//!   of a socketpair, or of a loopback TCP connection so that a PROXY header
//!   carries real addresses), because the engine calls setsockopt and
//!   getpeername on it. The other end stays with the fake: shutdown(SHUT_WR) by
//!   the engine shows there as end of stream, and SO_LINGER tells, when the
//!   engine closes the socket, whether it was reset.
//! - A client writes a script (a deterministic byte pattern, or HTTP requests)
//!   in random pieces, then FIN, a reset, or nothing (it stays open); it reads
//!   slowly, stalls, and takes short sends.
//! - A proxy's upstream socket is made by the engine (socket(2)); at its connect
//!   the fake puts one end of a socketpair under the same fd number (dup2), for
//!   the same reasons. The connect succeeds, is refused, times out or never
//!   answers; the upstream then answers with its own script or echoes.
//! - Receive buffers are lent from the fake's own table until released.
//! - A cancelled operation ends in a later step, with ECANCELED or with its own
//!   result if it "finished first" (as io_uring does). An event already in the
//!   batch when the worker cancels its operation is one the worker ignores
//!   (the session is closing): the fake accounts for that.
//! - The wake-up poll fires only when the fake has written a command
//!   (AddListener at the start; RemoveListener now and then; Shutdown at the
//!   end, or early with sessions open), and ends only by its cancel.
//! - The fake never sleeps: when it lets no event happen it moves the clock by
//!   the timeout the worker asked for (and now and then a little anyway).
//!
//! Not covered: UDP (its datagrams go out by sendmsg(2) directly, not through
//! the backend) and SCTP (not in this test kernel; see `proto::sim`).
//!
//! Checked at every call and step: operations only on fds the engine owns (not
//! after it closed them), of the right kind and side (token); connects only to
//! a configured upstream; at most one receive and one send in flight per
//! socket; nothing sent after FIN, nothing received after end of stream,
//! nothing started after an error ended the session or after the shutdown
//! began; a short send goes on with the same buffer from where it stopped, and
//! a send that found no room sends the same bytes again; each operation's last
//! event hands back exactly the memory it was given (a send's buffer, a
//! connect's address: same address and capacity), once; no cancel of an
//! operation whose last event the worker has handled; `close` never with an
//! operation in flight on the fd, never twice; every lent buffer released
//! exactly once, before the next wait; every byte a peer receives is the next
//! one it should get, and none the engine has not received yet; the receive
//! windows (echo: [`SEND_WINDOW`], proxy: `buffer_bytes`) hold; a FIN comes only
//! after everything before it; each session ends within a bounded number of
//! steps once its peers have stopped, and the worker never waits with nothing
//! that can end and no timer. At the end of a sequence: `run` returned after
//! Shutdown with nothing in flight and nothing lent; every socket was closed;
//! a session that ended cleanly before Shutdown delivered everything both ways;
//! an abort resets both sockets; echo/respond/http abort exactly when an error
//! reached them; the listener's counters (accepted = closed, bytes in and out,
//! accept errors) and the worker's session gauge agree with the peers.
//!
//! Each test runs seeds 1..=N (`RINGRESS_FAKE_RUNS=N` to change N) and prints how
//! many sequences reached each notable path. A failure names the seed and the
//! step; `RINGRESS_FAKE_SEED=S RINGRESS_FAKE_TRACE=1 cargo test --lib
//! driver::worker::fake::echo -- --exact --nocapture` replays it with a trace.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use super::{Worker, K_ACCEPT, K_CONNECT, K_RECV, K_SEND, K_WAKE};
use crate::binder::{Binder, ClientProto};
use crate::config::{Action, ProxyConfig};
use crate::driver::backend::{Backend, BufRef, Caps, Event, Op, OpId};
use crate::driver::shared::{ListenerShared, ListenerStats, WorkerStats};
use crate::driver::slab::untoken;
use crate::driver::{wake, Command, UpstreamSet};
use crate::proto::proxy_header::{self, ProxyProtocol};
use crate::proto::sim::stream::http_script;
use crate::proto::sim::Rng;
use crate::proto::SEND_WINDOW;

/// Steps a session may go without moving a byte once its peers have stopped
/// (they write nothing more, so it must end: within this many steps per byte).
const END_BOUND: usize = 5_000;
/// Steps a whole sequence may take.
const MAX_STEPS: usize = 400_000;
/// The token bits that name a session (kind byte removed).
const KEY_MASK: u64 = (1 << 56) - 1;

thread_local! {
    /// Steps of the sequence running on this thread (for the failure report).
    static STEPS: Cell<usize> = const { Cell::new(0) };
    /// The paths this sequence reached so far.
    static SEEN: RefCell<BTreeSet<&'static str>> = const { RefCell::new(BTreeSet::new()) };
    /// A loopback listener for clients that need real TCP addresses.
    static LOOPBACK: TcpListener = TcpListener::bind("127.0.0.1:0").expect("loopback listener");
}

/// Notes that the running sequence reached path `what` (counted once per sequence).
fn hit(what: &'static str) {
    SEEN.with(|s| s.borrow_mut().insert(what));
}

mod complete;
mod ops;
mod peer;
mod sequence;

use ops::*;
use peer::*;

/// What the listener of a sequence is.
#[derive(Debug, Clone)]
struct Setup {
    action: Action,
    /// Proxy: `buffer_bytes` and `idle_timeout_ms`.
    window: usize,
    idle_ms: u64,
    upstreams: Vec<SocketAddr>,
}

/// A [`Backend`] whose operations end as a seeded PRNG and simulated peers say.
pub(super) struct FakeBackend {
    rng: Rng,
    clock: Rc<Cell<Instant>>,
    setup: Setup,
    buf_size: usize,
    trace: bool,
    steps: usize,
    next_op: u64,
    ops: OpTable,
    /// Lent receive buffers: the reference handed out and the buffer.
    lent: BTreeMap<u16, (BufRef, Vec<u8>)>,
    free_bufs: Vec<u16>,
    next_buf: u16,
    sessions: Vec<Sess>,
    /// Sessions whose client arrives next, and from which step.
    next_client: usize,
    arrive_at: usize,
    /// Accepted sessions the worker has not named yet (no operation seen).
    unlinked: Vec<usize>,
    keys: BTreeMap<u64, usize>,
    /// By fd number.
    fds: Vec<Option<Use>>,
    /// Fds the worker closed; kept open here so that their numbers are not reused.
    closed: BTreeSet<RawFd>,
    grave: Vec<OwnedFd>,
    listener: RawFd,
    listener_closed: bool,
    wake_fd: RawFd,
    tx: mpsc::Sender<Command>,
    /// A command was written and the wake-up poll has not reported it yet.
    cmd_pending: bool,
    shutdown_sent: bool,
    /// The worker cancelled its wake-up poll: it is shutting down.
    engine_shutdown: bool,
    remove_at: Option<usize>,
    removed: bool,
    /// Send [`Command::Drain`] right after the listener is removed (as the
    /// supervisor does at SIGTERM). Only for actions it leaves unchanged (not
    /// http), so the peers' expectations hold as they are.
    drain_on_remove: bool,
    /// The worker cancelled its accept: the listener is being removed.
    accept_cancelled: bool,
    early_shutdown_at: Option<usize>,
    /// An accept error to report once (once this many clients have connected),
    /// and the accept errors the listener must count.
    accept_error: Option<(usize, i32)>,
    accept_errors: u64,
    /// Consecutive events handed out by `ready`.
    ready_streak: u32,
    /// Effects of the events of the batch being handled, by operation.
    batch: BTreeMap<u64, Effect>,
    /// Operations whose last event is in the batch being handled.
    ended: BTreeSet<u64>,
    /// The accept whose error (counted) is in the batch being handled.
    counted_accept_error: Option<u64>,
    /// The memory each operation in flight was given (see [`owned_mem`]).
    mem: BTreeMap<u64, (usize, usize)>,
}

impl FakeBackend {
    fn tr(&self, f: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{:>5}] {}", self.steps, f());
        }
    }

    fn advance(&mut self, d: Duration) {
        if !d.is_zero() {
            self.clock.set(self.clock.get() + d);
            self.tr(|| format!("time +{d:?}"));
        }
    }

    fn send_cmd(&mut self, cmd: Command) {
        self.tr(|| format!("command {cmd:?}"));
        self.tx.send(cmd).expect("the worker holds the receiver");
        wake(self.wake_fd);
        self.cmd_pending = true;
    }

    fn peer_of(&self, fd: RawFd) -> (usize, usize) {
        match self.use_of(fd) {
            Some(Use::Peer(s, side)) => (s, side),
            None => panic!("fd {fd} is not a session's socket"),
        }
    }

    fn use_of(&self, fd: RawFd) -> Option<Use> {
        self.fds.get(usize::try_from(fd).ok()?).copied().flatten()
    }

    fn set_use(&mut self, fd: RawFd, u: Use) {
        let i = usize::try_from(fd).expect("an fd");
        if self.fds.len() <= i {
            self.fds.resize(i + 1, None);
        }
        self.fds[i] = Some(u);
    }

    fn pending_on(&self, fd: RawFd, recv: bool) -> bool {
        self.ops.values().any(|p| match p.op {
            Op::Recv { fd: f, .. } => recv && f == fd,
            Op::Send { fd: f, .. } => !recv && f == fd,
            _ => false,
        })
    }

    // ------------------------------------------------------------ steps

    /// Checks made at the start of every step.
    fn begin_step(&mut self) {
        // The worker has handled the last batch: its errors count now.
        self.counted_accept_error = None;
        self.ended.clear();
        for (_, e) in std::mem::take(&mut self.batch) {
            if e.error {
                self.sessions[e.s].p[e.side].errors += 1;
            }
        }
        self.steps += 1;
        STEPS.with(|s| s.set(self.steps));
        assert!(self.steps < MAX_STEPS, "the sequence did not end");
        assert!(
            self.lent.is_empty(),
            "receive buffers still lent after their events were handled: {:?}",
            self.lent.values().map(|(b, _)| *b).collect::<Vec<_>>()
        );
        for s in 0..self.sessions.len() {
            for side in 0..2 {
                self.look_for_fin(s, side);
            }
            let st = &mut self.sessions[s];
            if !st.accepted || st.dropped || st.closed() || self.shutdown_sent {
                st.quiet_since = None;
                continue;
            }
            if st.quiet() {
                let moved = st.p.iter().map(|p| p.taken + p.got).sum();
                if st.moved != moved {
                    st.moved = moved;
                    st.quiet_since = None;
                }
                let since = *st.quiet_since.get_or_insert(self.steps);
                assert!(
                    self.steps - since <= END_BOUND,
                    "session {s}: its peers have stopped, yet {END_BOUND} steps without a byte moved and it has not ended: {}",
                    st.summary()
                );
            } else {
                st.quiet_since = None;
            }
        }
    }

    /// Looks for the engine's FIN on side `side` of session `s` where it matters
    /// now (a peer waits for it, or the engine has every reason to send it).
    fn look_for_fin(&mut self, s: usize, side: usize) {
        let st = &self.sessions[s];
        let p = &st.p[side];
        let Some(end) = &p.end_fd else { return };
        if p.fin_seen || p.closed.is_some() {
            return;
        }
        let due = match &st.kind {
            Kind::Fixed(v, half_close) => *half_close && p.got == v.len(),
            Kind::Proxy { .. } => st.p[1 - side].eof_taken,
            Kind::Echo => false,
        };
        if (p.after_fin || p.fin_after_fin || due) && fin_arrived(end) {
            self.on_fin(s, side);
        }
    }

    /// The engine's FIN reached side `side` of session `s`: it must come after
    /// every byte due.
    fn on_fin(&mut self, s: usize, side: usize) {
        self.tr(|| format!("session {s}: {} sees FIN", name(side)));
        let st = &mut self.sessions[s];
        st.p[side].fin_seen = true;
        if st.p[side].tcp {
            return; // Loopback TCP may show it late: only sockets pairs are exact.
        }
        let due = st.due(side);
        assert_eq!(
            st.p[side].got,
            due,
            "session {s}: FIN to the {} after {} of {due} bytes",
            name(side),
            st.p[side].got
        );
        if let Kind::Proxy { .. } = st.kind {
            assert!(
                st.p[1 - side].eof_taken,
                "session {s}: FIN to the {} before the {} ended",
                name(side),
                name(1 - side)
            );
            hit("proxy: half-close forwarded after every byte");
        }
    }

    /// Sends RemoveListener or Shutdown when the sequence says so.
    fn plan(&mut self) {
        if self.shutdown_sent {
            return;
        }
        if self.remove_at.is_some_and(|at| self.steps >= at) && !self.removed {
            self.removed = true;
            hit("listener removed while sessions run");
            self.send_cmd(Command::RemoveListener { id: 1 });
            if self.drain_on_remove {
                if self.sessions.iter().any(|s| s.accepted && !s.closed()) {
                    hit("Drain with sessions open");
                }
                self.send_cmd(Command::Drain);
            }
        }
        let early = self.early_shutdown_at.is_some_and(|at| self.steps >= at);
        if early || self.may_end() {
            if self.sessions.iter().any(|s| s.accepted && !s.closed()) {
                hit("Shutdown with sessions open");
            }
            self.shutdown_sent = true;
            self.send_cmd(Command::Shutdown);
        }
    }

    /// No client is left to connect, and every session that can end has ended.
    fn may_end(&self) -> bool {
        (self.next_client == self.sessions.len() || self.listener_closed)
            && self
                .sessions
                .iter()
                .all(|s| !s.accepted || s.closed() || s.may_live_on())
    }

    fn peer_moves(&self) -> usize {
        if self.shutdown_sent {
            return 0;
        }
        self.sessions
            .iter()
            .map(|s| s.p[0].moves() + s.p[1].moves())
            .sum()
    }

    /// One peer does one thing; `false` if none can.
    fn peer_move(&mut self) -> bool {
        let n = self.peer_moves();
        if n == 0 {
            return false;
        }
        let mut k = self.rng.below(n);
        for s in 0..self.sessions.len() {
            for side in 0..2 {
                let m = self.sessions[s].p[side].moves();
                if k < m {
                    self.sessions[s].p[side].step(&mut self.rng);
                    let p = &self.sessions[s].p[side];
                    self.tr(|| {
                        format!(
                            "session {s}: {} written {}/{} fin {} reset {} reading {} buffered {}",
                            name(side),
                            p.written,
                            p.out.len(),
                            p.fin_written,
                            p.reset,
                            p.reading,
                            p.buffered
                        )
                    });
                    return true;
                }
                k -= m;
            }
        }
        unreachable!()
    }

    /// Whether operation `p` could end now other than by its cancel.
    fn natural(&self, p: &Pending) -> bool {
        match &p.op {
            Op::PollIn { .. } => self.cmd_pending,
            Op::Accept { .. } => {
                (self
                    .accept_error
                    .is_some_and(|(after, _)| self.next_client >= after)
                    && !p.cancelled)
                    || (!self.shutdown_sent
                        && self.next_client < self.sessions.len()
                        && self.steps >= self.arrive_at)
            }
            Op::Recv { fd, .. } => {
                let (s, side) = self.peer_of(*fd);
                self.sessions[s].p[side].can_recv()
            }
            Op::Send { fd, .. } => {
                let (s, side) = self.peer_of(*fd);
                self.sessions[s].p[side].can_send()
            }
            Op::Connect { fd, .. } => {
                let (s, _) = self.peer_of(*fd);
                self.sessions[s].connect.is_some()
            }
            _ => false,
        }
    }

    /// Operations that could end now (by id, in submission order).
    fn ready_ops(&self) -> Vec<u64> {
        self.ops
            .iter()
            .filter(|(_, p)| p.cancelled || self.natural(p))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Lets something outside the worker happen when nothing can end: the next
    /// client connects, or Shutdown is sent. `false` if nothing can.
    fn unblock(&mut self) -> bool {
        let accepting = self
            .ops
            .values()
            .any(|p| matches!(p.op, Op::Accept { .. }) && !p.cancelled);
        if !self.shutdown_sent
            && accepting
            && self.next_client < self.sessions.len()
            && self.arrive_at > self.steps
        {
            self.arrive_at = self.steps;
            return true;
        }
        if !self.shutdown_sent && self.may_end() {
            self.shutdown_sent = true;
            self.send_cmd(Command::Shutdown);
            return true;
        }
        false
    }
}

impl Backend for FakeBackend {
    fn caps(&self) -> Caps {
        Caps {
            multishot_sctp: false,
            multishot_recv: false,
            multishot_recv_limit: false,
            recv_buf_size: self.buf_size,
            splice: false,
        }
    }

    fn submit(&mut self, token: u64, op: Op) -> OpId {
        self.on_submit(token, &op);
        let id = self.next_op;
        self.next_op += 1;
        self.tr(|| format!("op {id} submitted: {op:?}"));
        if let Some(m) = owned_mem(&op) {
            self.mem.insert(id, m);
        }
        self.ops.insert(
            id,
            Pending {
                token,
                op,
                cancelled: false,
            },
        );
        OpId(id)
    }

    fn cancel(&mut self, id: OpId) {
        let Some(p) = self.ops.get_mut(&id.0) else {
            match self.batch.remove(&id.0) {
                Some(e) => {
                    // Its event is in the batch, not handled yet: the worker
                    // will ignore it (the session is closing).
                    hit("cancel of an operation whose event is not handled yet");
                    self.tr(|| format!("op {} cancelled after its end: {e:?} ignored", id.0));
                    let p = &mut self.sessions[e.s].p[e.side];
                    p.ignored += e.bytes_in;
                    p.got_ignored += e.bytes_out;
                    p.next_send = None;
                }
                None if self.ended.contains(&id.0) => {
                    hit("cancel of an operation whose event is not handled yet");
                    if self.counted_accept_error == Some(id.0) {
                        // The listener is being removed: the error is not counted.
                        self.accept_errors -= 1;
                    }
                }
                // The contract allows it, but the worker forgets an operation
                // when it handles its last event: a cancel after that is a
                // slip in its bookkeeping.
                None => panic!("cancel of op {}, whose last event was handled before", id.0),
            }
            return;
        };
        p.cancelled = true;
        match p.op {
            Op::PollIn { .. } => self.engine_shutdown = true,
            Op::Accept { .. } => self.accept_cancelled = true,
            _ => {}
        }
        self.tr(|| format!("op {} cancelled", id.0));
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        self.begin_step();
        self.ready_streak = 0;
        self.plan();
        for _ in 0..self.rng.below(3) {
            self.peer_move();
        }
        if self.rng.one_in(10) {
            let d = Duration::from_millis(self.rng.below(3) as u64);
            self.advance(d);
        }
        loop {
            let mut ready = self.ready_ops();
            if !ready.is_empty() && (timeout.is_none() || !self.rng.one_in(8)) {
                let n = 1 + self.rng.below(ready.len().min(3));
                for k in 0..n {
                    let j = k + self.rng.below(ready.len() - k);
                    ready.swap(k, j);
                }
                for &id in &ready[..n] {
                    self.complete(id, out);
                }
                return Ok(());
            }
            if let Some(t) = timeout {
                self.advance(t);
                return Ok(());
            }
            if self.peer_move() || self.unblock() {
                continue;
            }
            panic!(
                "the worker waits with no timer, and nothing in flight can end: ops {:?}, sessions {:?}",
                self.ops,
                self.sessions.iter().map(Sess::summary).collect::<Vec<_>>()
            );
        }
    }

    fn ready(&mut self, out: &mut Vec<Event>) {
        if self.ready_streak >= 3 || !self.rng.one_in(4) {
            return;
        }
        let ready = self.ready_ops();
        if ready.is_empty() {
            return;
        }
        self.begin_step();
        self.ready_streak += 1;
        hit("an event ready at once (ready)");
        let id = ready[self.rng.below(ready.len())];
        self.complete(id, out);
    }

    fn data(&self, b: BufRef) -> &[u8] {
        match self.lent.get(&b.id) {
            Some((lent, buf)) if *lent == b => &buf[b.off as usize..(b.off + b.len) as usize],
            _ => panic!("data() of a buffer not lent: {b:?}"),
        }
    }

    fn release(&mut self, b: BufRef) {
        match self.lent.remove(&b.id) {
            Some((lent, _)) if lent == b => self.free_bufs.push(b.id),
            other => panic!("release of a buffer not lent (twice?): {b:?}, lent {other:?}"),
        }
    }

    fn close(&mut self, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        assert!(!self.closed.contains(&raw), "fd {raw} closed twice");
        if let Some(p) = self.ops.values().find(|p| p.op.fd() == raw) {
            panic!("close of fd {raw} with an operation in flight: {p:?}");
        }
        self.closed.insert(raw);
        let aborted = socket2::SockRef::from(&fd).linger().ok().flatten() == Some(Duration::ZERO);
        self.tr(|| format!("fd {raw} closed (reset {aborted})"));
        if raw == self.listener {
            self.listener_closed = true;
        } else {
            let (s, side) = self.peer_of(raw);
            self.look_for_fin(s, side);
            let p = &mut self.sessions[s].p[side];
            p.closed = Some(Closed {
                aborted,
                after_shutdown: self.shutdown_sent,
            });
            p.live = false;
            if side == 0 {
                if let Some(at) = self.unlinked.iter().position(|&x| x == s) {
                    // Closed before any operation: a connection accepted while
                    // its listener was being removed, and so dropped.
                    assert!(
                        self.accept_cancelled,
                        "session {s} closed before any operation, its listener not removed"
                    );
                    self.sessions[s].dropped = true;
                    self.unlinked.remove(at);
                }
            }
        }
        self.grave.push(fd);
    }

    fn in_flight(&self) -> usize {
        self.ops.len()
    }
}

/// Whether the engine's FIN (shutdown(SHUT_WR)) has reached `end`, the fake's
/// end of a connection: a peek finds end of stream.
pub(super) fn fin_arrived(end: &OwnedFd) -> bool {
    let mut b = [MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(end).recv_with_flags(&mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT),
        Ok(0)
    )
}

/// A loopback TCP connection: the accepted end (for the engine) and the other.
pub(super) fn tcp_pair() -> (OwnedFd, OwnedFd) {
    LOOPBACK.with(|l| {
        let addr = l.local_addr().expect("address");
        let c = TcpStream::connect(addr).expect("connect");
        let (a, _) = l.accept().expect("accept");
        (OwnedFd::from(a), OwnedFd::from(c))
    })
}

/// Puts one end of a new socketpair under fd number `fd` (the engine's upstream
/// socket) and returns the other end.
pub(super) fn replace_with_pair(fd: RawFd) -> OwnedFd {
    let (a, b) = UnixStream::pair().expect("socketpair");
    // SAFETY: dup2(2) on two open fds: `fd` is the upstream socket the worker
    // owns and has just handed to a connect; it is atomically made to refer to
    // `a`'s socket instead, and stays open and owned by the worker. No memory
    // is passed.
    let r = unsafe { libc::dup2(a.as_raw_fd(), fd) };
    assert_eq!(r, fd, "dup2: {}", io::Error::last_os_error());
    drop(a);
    OwnedFd::from(b)
}

/// `len` bytes of stream `salt`: a window of a fixed random table of 1 MiB,
/// starting where `salt` says (a reordered or lost piece shows; cheaper than
/// drawing every byte).
pub(super) fn pattern(salt: u64, len: usize) -> Vec<u8> {
    const TABLE: usize = 1 << 20;
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    let t = T.get_or_init(|| {
        let mut r = Rng::new(0x7AB1E);
        (0..TABLE / 8)
            .flat_map(|_| r.next().to_le_bytes())
            .collect()
    });
    let mut at = (Rng::new(salt).next() as usize) % TABLE;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = (len - v.len()).min(TABLE - at);
        v.extend_from_slice(&t[at..at + n]);
        at = 0;
    }
    v
}

/// Bytes a peer writes: mostly little, sometimes bulk (past the echo window).
pub(super) fn data_len(rng: &mut Rng, bulk: bool) -> usize {
    if bulk {
        rng.range(SEND_WINDOW, SEND_WINDOW * 3)
    } else {
        match rng.below(10) {
            0 => 0,
            1..=6 => rng.range(1, 300),
            7 | 8 => rng.range(300, 4000),
            _ => rng.range(4000, 20_000),
        }
    }
}

pub(super) fn binder() -> &'static Binder {
    static B: OnceLock<Binder> = OnceLock::new();
    B.get_or_init(|| Binder::start().expect("binder"))
}
