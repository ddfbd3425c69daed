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

use super::{Worker, WorkerCtx, K_ACCEPT, K_CONNECT, K_RECV, K_SEND, K_WAKE};
use crate::binder::{Binder, ClientProto};
use crate::config::{Action, Proto, ProxyConfig, SctpConfig};
use crate::driver::backend::{Backend, BufRef, Caps, Event, Op, OpId};
use crate::driver::shared::{ListenerShared, ListenerStats, WorkerStats};
use crate::driver::slab::untoken;
use crate::driver::{eventfd, wake, Command, UpstreamSet};
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

/// What a peer does once it has written its script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum End {
    /// FIN.
    #[default]
    Fin,
    /// A reset.
    Reset,
    /// Nothing: it stays open (until the worker closes it).
    Stay,
}

/// How the engine closed one socket.
#[derive(Debug, Clone, Copy)]
struct Closed {
    /// SO_LINGER {on, 0}: the peer sees a reset.
    aborted: bool,
    /// After the fake sent Shutdown (the session may have been cut short).
    after_shutdown: bool,
}

/// One simulated peer: a client, or a proxy's upstream.
#[derive(Debug, Default)]
struct Peer {
    /// The bytes it writes, in order (an echoing upstream appends what it gets).
    out: Vec<u8>,
    /// Bytes of `out` written so far (the engine may receive them).
    written: usize,
    /// Bytes of `out` the engine received.
    taken: usize,
    /// Bytes of `taken` the engine ignored (a cancelled receive that finished first).
    ignored: usize,
    end: End,
    /// A reset once this much of `out` is written.
    reset_at: Option<usize>,
    fin_written: bool,
    reset: bool,
    /// The engine received the end of stream.
    eof_taken: bool,
    /// An upstream that sends back what it gets past the PROXY header.
    echo: bool,
    /// Bytes it received from the engine.
    got: usize,
    /// Bytes of `got` from sends the engine had cancelled (not counted by it).
    got_ignored: usize,
    /// Its receive buffer: room and bytes waiting in it.
    rcvbuf: usize,
    buffered: usize,
    reading: bool,
    stalls_left: u32,
    /// Receives left that end with ENOBUFS, EAGAIN or ECANCELED.
    spurious: u32,
    /// Sends left that end with EAGAIN (or ECANCELED) without sending.
    eagain: u32,
    max_recv: usize,
    max_write: usize,
    /// Writes only after the engine's FIN.
    after_fin: bool,
    /// Sends its own FIN only after the engine's.
    fin_after_fin: bool,
    /// The connection exists (a client once accepted, an upstream once connected).
    live: bool,
    /// The upstream's connect succeeded (sends and receives may start).
    connected: bool,
    /// The engine's fd, and the fake's end of the connection.
    fd: Option<RawFd>,
    end_fd: Option<OwnedFd>,
    tcp: bool,
    /// FIN from the engine seen at `end_fd`.
    fin_seen: bool,
    closed: Option<Closed>,
    /// Errors the engine got on this socket (not counting cancelled operations).
    errors: u32,
    /// The next send must be this buffer (pointer, length) from this offset.
    next_send: Option<(usize, usize, usize)>,
}

/// What a receive returns.
enum RecvOut {
    Spurious(i32),
    /// A buffer and where in it the payload starts.
    Bytes(Vec<u8>, usize),
    Eof,
    Err(i32),
}

/// What a send does.
enum SendOut {
    Took(usize),
    Again(i32),
    Failed(i32),
}

impl Peer {
    fn new(rng: &mut Rng, out: Vec<u8>, expect_len: usize, bulk: bool) -> Peer {
        let sizes = [1usize, 7, 100, 1500, 16 * 1024];
        // Tiny pieces only for little data, so that a sequence stays short.
        let floor = (out.len().max(expect_len) / 20).max(1);
        let size = |rng: &mut Rng| rng.pick(&sizes).max(floor);
        let len = out.len();
        Peer {
            out,
            end: match rng.below(12) {
                0 => End::Reset,
                1 => End::Stay,
                _ => End::Fin,
            },
            reset_at: rng.one_in(12).then(|| rng.range(0, len)),
            rcvbuf: if bulk {
                rng.pick(&[64 * 1024, 1 << 20])
            } else {
                rng.pick(&[10, 1000, 64 * 1024]).max(floor)
            },
            reading: true,
            stalls_left: rng.range(0, 2) as u32,
            spurious: rng.range(0, 3) as u32,
            eagain: if rng.one_in(4) {
                rng.range(1, 3) as u32
            } else {
                0
            },
            max_recv: if bulk { 64 * 1024 } else { size(rng) },
            max_write: if bulk { 64 * 1024 } else { size(rng) },
            ..Peer::default()
        }
    }

    /// Bytes the engine took and acted on.
    fn eff(&self) -> usize {
        self.taken - self.ignored
    }

    fn may_write(&self) -> bool {
        !self.after_fin || self.fin_seen
    }

    fn can_end(&self) -> bool {
        self.may_write()
            && (!self.fin_after_fin || self.fin_seen)
            && self.written == self.out.len()
            && !self.fin_written
            && !self.reset
            && self.end != End::Stay
    }

    /// It will write nothing more and takes what is sent to it (or is gone).
    fn done(&self) -> bool {
        !self.live || self.reset || (self.fin_written && self.reading)
    }

    fn moves(&self) -> usize {
        if !self.live || self.reset {
            return 0;
        }
        usize::from(self.may_write() && self.written < self.out.len())
            + usize::from(self.can_end())
            + usize::from(self.reading && self.buffered > 0)
            + usize::from(self.reading && self.stalls_left > 0)
            + usize::from(!self.reading)
    }

    fn step(&mut self, rng: &mut Rng) {
        let mut k = rng.below(self.moves());
        let mut next = |on: bool| {
            if !on {
                return false;
            }
            let hit = k == 0;
            k = k.wrapping_sub(1);
            hit
        };
        if next(self.may_write() && self.written < self.out.len()) {
            let left = self.out.len() - self.written;
            self.written += rng.range(1, left.min(self.max_write));
            if let Some(r) = self.reset_at.filter(|&r| self.written >= r) {
                self.written = r.max(self.taken);
                self.reset = true;
            }
        } else if next(self.can_end()) {
            match self.end {
                End::Fin if self.reset_at.is_none() => self.fin_written = true,
                _ => self.reset = true,
            }
        } else if next(self.reading && self.buffered > 0) {
            self.buffered -= rng.range(1, self.buffered);
        } else if next(self.reading && self.stalls_left > 0) {
            self.reading = false;
            self.stalls_left -= 1;
        } else if next(!self.reading) {
            self.reading = true;
        }
        if self.reset {
            // Its buffer is gone with it.
            self.buffered = 0;
            self.reading = true;
        }
    }

    fn can_recv(&self) -> bool {
        self.live
            && (self.reset || self.taken < self.written || self.fin_written || self.spurious > 0)
    }

    fn recv(&mut self, rng: &mut Rng, buf_size: usize) -> RecvOut {
        let real = self.reset || self.taken < self.written || self.fin_written;
        if self.spurious > 0 && (rng.one_in(3) || !real) {
            self.spurious -= 1;
            return RecvOut::Spurious(rng.pick(&[libc::ENOBUFS, libc::EAGAIN, libc::ECANCELED]));
        }
        if self.reset {
            return RecvOut::Err(libc::ECONNRESET);
        }
        if self.taken < self.written {
            let n = rng.range(
                1,
                (self.written - self.taken).min(self.max_recv).min(buf_size),
            );
            let d = &self.out[self.taken..self.taken + n];
            // The payload sits at a random offset in its buffer.
            let off = rng.below(3);
            let mut buf = vec![0xEE; off];
            buf.extend_from_slice(d);
            self.taken += n;
            return RecvOut::Bytes(buf, off);
        }
        RecvOut::Eof
    }

    fn can_send(&self) -> bool {
        self.live && (self.reset || self.buffered < self.rcvbuf || self.eagain > 0)
    }

    fn send(&mut self, rng: &mut Rng, len: usize) -> SendOut {
        let full = !self.reset && self.buffered >= self.rcvbuf;
        if self.eagain > 0 && (rng.one_in(3) || full) {
            self.eagain -= 1;
            return SendOut::Again(if rng.one_in(4) {
                libc::ECANCELED
            } else {
                libc::EAGAIN
            });
        }
        if self.reset {
            return SendOut::Failed(rng.pick(&[libc::EPIPE, libc::ECONNRESET]));
        }
        SendOut::Took(rng.range(1, len.min(self.rcvbuf - self.buffered)))
    }
}

/// What a session's peers should receive.
#[derive(Debug)]
enum Kind {
    /// The client gets back what the engine received from it.
    Echo,
    /// The client gets these bytes (respond, http); `true`: the engine half-closes
    /// after them (respond).
    Fixed(Vec<u8>, bool),
    /// Each side gets what the engine received from the other; the upstream
    /// gets the PROXY header first (made at accept, from the client's addresses).
    Proxy {
        pp: Option<ProxyProtocol>,
        header: Vec<u8>,
    },
}

/// One client connection, its session's peers and what the fake knows of it.
#[derive(Debug)]
struct Sess {
    kind: Kind,
    /// Client and upstream.
    p: [Peer; 2],
    /// The session's key in the worker's tokens.
    key: Option<u64>,
    /// Its fd went to the worker.
    accepted: bool,
    /// The worker closed it without a session (its listener was being removed).
    dropped: bool,
    /// How the upstream's connect ends (`None`: it never answers).
    connect: Option<Result<(), i32>>,
    /// Since when both peers have stopped and no byte has moved (step), and
    /// the bytes moved until then.
    quiet_since: Option<usize>,
    moved: usize,
}

impl Sess {
    /// What side `side` should receive: a prefix, then bytes of a source (as far
    /// as the engine has received them).
    fn stream(&self, side: usize) -> (&[u8], &[u8]) {
        match &self.kind {
            Kind::Echo => (&[], &self.p[0].out[..self.p[0].eff()]),
            Kind::Fixed(v, _) => (&[], v),
            Kind::Proxy { header, .. } => {
                let src = &self.p[1 - side];
                let pre: &[u8] = if side == 1 { header } else { &[] };
                (pre, &src.out[..src.eff()])
            }
        }
    }

    /// Bytes side `side` should have got by now, all told.
    fn due(&self, side: usize) -> usize {
        let (pre, src) = self.stream(side);
        pre.len() + src.len()
    }

    /// `data` reaches side `side`: it must be the next bytes it should get.
    fn deliver(&mut self, side: usize, data: &[u8]) {
        let got = self.p[side].got;
        let (pre, src) = self.stream(side);
        let due = pre.len() + src.len();
        assert!(
            got + data.len() <= due,
            "{}: {} bytes sent at offset {got}, but only {due} are due (not received yet, or made up)",
            name(side),
            data.len()
        );
        let mut at = got;
        let mut rest = data;
        if at < pre.len() {
            let n = rest.len().min(pre.len() - at);
            assert!(
                rest[..n] == pre[at..at + n],
                "{}: wrong header bytes at {at}",
                name(side)
            );
            at += n;
            rest = &rest[n..];
        }
        if !rest.is_empty() {
            let off = at - pre.len();
            assert!(
                rest == &src[off..off + rest.len()],
                "{}: wrong bytes at offset {at} (got {:?}..., expected {:?}...)",
                name(side),
                &rest[..rest.len().min(16)],
                &src[off..(off + 16).min(src.len())]
            );
        }
        let echo_from = pre.len().max(got);
        self.p[side].got += data.len();
        if side == 1 && self.p[1].echo && got + data.len() > echo_from {
            let skip = echo_from - got;
            self.p[1].out.extend_from_slice(&data[skip..]);
        }
    }

    /// Whether the worker has closed every socket of the session.
    fn closed(&self) -> bool {
        self.p[0].closed.is_some() && (self.p[1].fd.is_none() || self.p[1].closed.is_some())
    }

    /// Whether a peer may keep the session open for good (until Shutdown).
    fn may_live_on(&self) -> bool {
        self.p[0].end == End::Stay
            || (matches!(self.kind, Kind::Proxy { .. })
                && self.connect == Some(Ok(()))
                && self.p[1].end == End::Stay)
    }

    /// Both peers have stopped: the session must end.
    fn quiet(&self) -> bool {
        self.p[0].done() && (!matches!(self.kind, Kind::Proxy { .. }) || self.p[1].done())
    }

    fn errors(&self) -> u32 {
        self.p[0].errors + self.p[1].errors
    }

    /// The state of the session in a line (for failure reports).
    fn summary(&self) -> String {
        let side = |i: usize| {
            let p = &self.p[i];
            format!(
                "{}: wrote {}/{} taken {} (ignored {}) fin {} reset {} eof taken {} | got {}/{} \
                 buffered {}/{} reading {} fin seen {} | live {} closed {:?} errors {}",
                name(i),
                p.written,
                p.out.len(),
                p.taken,
                p.ignored,
                p.fin_written,
                p.reset,
                p.eof_taken,
                p.got,
                self.due(i),
                p.buffered,
                p.rcvbuf,
                p.reading,
                p.fin_seen,
                p.live,
                p.closed,
                p.errors
            )
        };
        format!(
            "[{}; {}; connect {:?}, key {:?}]",
            side(0),
            side(1),
            self.connect,
            self.key
        )
    }
}

fn name(side: usize) -> &'static str {
    if side == 0 {
        "client"
    } else {
        "upstream"
    }
}

/// What an fd is to the fake.
#[derive(Debug, Clone, Copy)]
enum Use {
    /// Session `.0`'s client (0) or upstream (1) socket.
    Peer(usize, usize),
}

/// What the event of a (not cancelled) operation tells the worker, kept until
/// the worker has handled the batch it is in: if the worker cancels the
/// operation meanwhile (its event not handled yet), it ignores the event.
#[derive(Debug, Clone, Copy)]
struct Effect {
    s: usize,
    side: usize,
    /// Bytes received from the peer / sent to it.
    bytes_in: usize,
    bytes_out: usize,
    /// An error result (the session must abort).
    error: bool,
}

/// An operation in flight.
#[derive(Debug)]
struct Pending {
    token: u64,
    op: Op,
    cancelled: bool,
}

/// The memory an operation owns (address, capacity), to check that what goes
/// back in its last event is what came in.
fn owned_mem(op: &Op) -> Option<(usize, usize)> {
    match op {
        Op::Send { buf, .. } => Some((buf.as_ptr() as usize, buf.capacity())),
        Op::Connect { addr, .. } => Some((&**addr as *const socket2::SockAddr as usize, 0)),
        _ => None,
    }
}

/// The same for what an event hands back.
fn returned_mem(o: &crate::driver::backend::Owned) -> Option<(usize, usize)> {
    use crate::driver::backend::Owned;
    match o {
        Owned::Bytes(buf) => Some((buf.as_ptr() as usize, buf.capacity())),
        Owned::Addr(addr) => Some((&**addr as *const socket2::SockAddr as usize, 0)),
        _ => None,
    }
}

/// The operations in flight, by id (in submission order): a few at a time, so
/// a sorted vector.
#[derive(Debug, Default)]
struct OpTable(Vec<(u64, Pending)>);

impl OpTable {
    fn at(&self, id: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |(i, _)| *i)
    }
    fn get(&self, id: &u64) -> Option<&Pending> {
        self.at(*id).ok().map(|i| &self.0[i].1)
    }
    fn get_mut(&mut self, id: &u64) -> Option<&mut Pending> {
        self.at(*id).ok().map(|i| &mut self.0[i].1)
    }
    fn remove(&mut self, id: &u64) -> Option<Pending> {
        self.at(*id).ok().map(|i| self.0.remove(i).1)
    }
    fn insert(&mut self, id: u64, p: Pending) {
        match self.at(id) {
            Ok(i) => self.0[i].1 = p,
            Err(i) => self.0.insert(i, (id, p)),
        }
    }
    fn values(&self) -> impl Iterator<Item = &Pending> {
        self.0.iter().map(|(_, p)| p)
    }
    fn iter(&self) -> impl Iterator<Item = (&u64, &Pending)> {
        self.0.iter().map(|(i, p)| (i, p))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

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

    /// Ends operation `id` if it can end now, and checks that its last event
    /// hands back exactly the memory it was given.
    fn complete(&mut self, id: u64, out: &mut Vec<Event>) {
        let before = out.len();
        self.complete_op(id, out);
        if out.len() > before && !self.ops.0.iter().any(|(i, _)| *i == id) {
            self.ended.insert(id);
            let m = self.mem.remove(&id);
            let last = out.last().expect("an event");
            assert!(!last.more, "op {id}: its last event says more");
            assert_eq!(
                returned_mem(&last.owned),
                m,
                "op {id}: its last event does not hand back the memory it was given"
            );
        }
    }

    fn complete_op(&mut self, id: u64, out: &mut Vec<Event>) {
        let Some(p) = self.ops.get(&id) else { return };
        let natural = self.natural(p);
        if !p.cancelled && !natural {
            return;
        }
        let by_cancel = p.cancelled && (!natural || !self.rng.one_in(3));
        let Some(Pending {
            token,
            op,
            cancelled,
        }) = self.ops.remove(&id)
        else {
            return;
        };
        if by_cancel {
            if let Op::Connect { fd, .. } = &op {
                let (s, _) = self.peer_of(*fd);
                if self.sessions[s].connect.is_none() {
                    hit("connect: never answered, cancelled (connect timeout)");
                }
            }
            self.tr(|| format!("op {id} ends: ECANCELED ({op:?})"));
            let mut ev = Event::new(token, -libc::ECANCELED, false);
            ev.owned = op.into_owned();
            out.push(ev);
            return;
        }
        if cancelled {
            hit("a cancelled operation finished first");
        }
        match op {
            Op::PollIn { fd } => {
                self.cmd_pending = false;
                let more = !self.rng.one_in(8);
                if !more {
                    hit("wake-up poll ended (re-armed)");
                }
                self.tr(|| format!("op {id} wake-up poll fires (more {more})"));
                out.push(Event::new(token, i32::from(libc::POLLIN), more));
                if more {
                    self.ops.insert(
                        id,
                        Pending {
                            token,
                            op: Op::PollIn { fd },
                            cancelled,
                        },
                    );
                }
            }
            Op::Accept { fd } => {
                let due = self
                    .accept_error
                    .filter(|&(after, _)| !cancelled && self.next_client >= after);
                if let Some((_, errno)) = due {
                    self.accept_error = None;
                    if crate::driver::accept_error_pauses(errno) {
                        hit("accept error: paused, re-armed after the pause");
                    } else {
                        hit("accept error: re-armed at once");
                    }
                    if !crate::driver::accept_error_benign(errno) && errno != libc::EINTR {
                        self.accept_errors += 1;
                        self.counted_accept_error = Some(id);
                    }
                    self.tr(|| format!("op {id} accept fails: errno {errno}"));
                    out.push(Event::new(token, -errno, false));
                    return;
                }
                let s = self.next_client;
                self.next_client += 1;
                self.arrive_at = self.steps + self.rng.range(0, 30);
                let raw = self.open_client(s);
                self.tr(|| format!("op {id} accepts session {s} (fd {raw})"));
                out.push(Event::new(token, raw, true));
                self.ops.insert(
                    id,
                    Pending {
                        token,
                        op: Op::Accept { fd },
                        cancelled,
                    },
                );
            }
            Op::Recv { fd, .. } => self.end_recv(id, token, fd, cancelled, out),
            Op::Send { fd, buf, off } => self.end_send(id, token, fd, buf, off, cancelled, out),
            Op::Connect { fd, addr } => {
                let (s, _) = self.peer_of(fd);
                let r = self.sessions[s].connect.expect("natural");
                let st = &mut self.sessions[s];
                hit(match r {
                    Ok(()) => "connect: succeeded",
                    Err(libc::ECONNREFUSED) => "connect: refused",
                    Err(_) => "connect: timed out (ETIMEDOUT)",
                });
                let res = match r {
                    Ok(()) => {
                        st.p[1].connected = true;
                        st.p[1].live = !cancelled;
                        0
                    }
                    Err(e) => {
                        if !cancelled {
                            self.batch.insert(
                                id,
                                Effect {
                                    s,
                                    side: 1,
                                    bytes_in: 0,
                                    bytes_out: 0,
                                    error: true,
                                },
                            );
                        }
                        -e
                    }
                };
                self.tr(|| format!("op {id} session {s} connect ends: {res}"));
                let mut ev = Event::new(token, res, false);
                ev.owned = crate::driver::backend::Owned::Addr(addr);
                out.push(ev);
            }
            other => unreachable!("{other:?}"),
        }
    }

    fn end_recv(&mut self, id: u64, token: u64, fd: RawFd, cancelled: bool, out: &mut Vec<Event>) {
        let (s, side) = self.peer_of(fd);
        let r = self.sessions[s].p[side].recv(&mut self.rng, self.buf_size);
        let mut ev = Event::new(token, 0, false);
        let mut effect = Effect {
            s,
            side,
            bytes_in: 0,
            bytes_out: 0,
            error: false,
        };
        match r {
            RecvOut::Spurious(e) => {
                hit(match e {
                    libc::ENOBUFS => "receive: ENOBUFS",
                    libc::EAGAIN => "receive: EAGAIN",
                    _ => "receive: ECANCELED not cancelled",
                });
                ev.res = -e;
            }
            RecvOut::Bytes(buf, off) => {
                let n = buf.len() - off;
                ev.res = n as i32;
                ev.buf = Some(self.lend(buf, off));
                effect.bytes_in = n;
                if cancelled {
                    self.sessions[s].p[side].ignored += n;
                } else {
                    self.check_window(s);
                }
            }
            RecvOut::Eof => {
                self.sessions[s].p[side].eof_taken = true;
            }
            RecvOut::Err(e) => {
                hit("receive: reset");
                effect.error = true;
                ev.res = -e;
            }
        }
        if !cancelled {
            self.batch.insert(id, effect);
        }
        self.tr(|| {
            format!(
                "op {id} session {s} {} receive ends: {}",
                name(side),
                ev.res
            )
        });
        out.push(ev);
    }

    #[allow(clippy::too_many_arguments)]
    fn end_send(
        &mut self,
        id: u64,
        token: u64,
        fd: RawFd,
        buf: Vec<u8>,
        off: usize,
        cancelled: bool,
        out: &mut Vec<Event>,
    ) {
        let (s, side) = self.peer_of(fd);
        let len = buf.len() - off;
        let mark = (buf.as_ptr() as usize, buf.len());
        let r = self.sessions[s].p[side].send(&mut self.rng, len);
        let st = &mut self.sessions[s];
        let mut effect = Effect {
            s,
            side,
            bytes_in: 0,
            bytes_out: 0,
            error: false,
        };
        let res = match r {
            SendOut::Took(n) => {
                st.deliver(side, &buf[off..off + n]);
                effect.bytes_out = n;
                let p = &mut st.p[side];
                p.buffered += n;
                if cancelled {
                    p.got_ignored += n;
                } else if n < len {
                    hit("short send");
                    p.next_send = Some((mark.0, mark.1, off + n));
                }
                n as i32
            }
            SendOut::Again(e) => {
                hit(if e == libc::EAGAIN {
                    "send: EAGAIN (back-off, same bytes again)"
                } else {
                    "send: ECANCELED not cancelled"
                });
                if !cancelled {
                    st.p[side].next_send = Some((mark.0, mark.1, off));
                }
                -e
            }
            SendOut::Failed(e) => {
                hit("send: reset");
                effect.error = true;
                -e
            }
        };
        if !cancelled {
            self.batch.insert(id, effect);
        }
        self.tr(|| {
            format!(
                "op {id} session {s} {} send of {len} ends: {res}",
                name(side)
            )
        });
        let mut ev = Event::new(token, res, false);
        ev.owned = crate::driver::backend::Owned::Bytes(buf);
        out.push(ev);
    }

    /// The receive windows hold: a side is read only while the other has less
    /// than the window unsent, so at most one receive more is in the engine.
    fn check_window(&self, s: usize) {
        let st = &self.sessions[s];
        let one = self.buf_size;
        match &st.kind {
            Kind::Echo => {
                let unsent = st.p[0].eff() - (st.p[0].got - st.p[0].got_ignored);
                assert!(
                    unsent < SEND_WINDOW + one,
                    "session {s}: echo holds {unsent} bytes, past its window"
                );
            }
            Kind::Proxy { header, .. } => {
                let w = self.setup.window;
                let up = header.len() + st.p[0].eff() - (st.p[1].got - st.p[1].got_ignored);
                let down = st.p[1].eff() - (st.p[0].got - st.p[0].got_ignored);
                assert!(
                    up < (w + one).max(header.len() + 1) && down < w + one,
                    "session {s}: proxy holds {up} bytes toward the upstream and {down} toward the client, past the window {w}"
                );
            }
            Kind::Fixed(..) => {}
        }
    }

    /// Lends `buf`, whose payload starts at `off`.
    fn lend(&mut self, buf: Vec<u8>, off: usize) -> BufRef {
        let id = self.free_bufs.pop().unwrap_or_else(|| {
            self.next_buf += 1;
            self.next_buf
        });
        let b = BufRef {
            group: 0,
            id,
            off: off as u32,
            len: (buf.len() - off) as u32,
        };
        self.lent.insert(id, (b, buf));
        b
    }

    /// Client `s` connects: its fd, to be handed out by an accept.
    fn open_client(&mut self, s: usize) -> RawFd {
        let st = &mut self.sessions[s];
        let (engine, end) = if st.p[0].tcp {
            tcp_pair()
        } else {
            let (a, b) = UnixStream::pair().expect("socketpair");
            (OwnedFd::from(a), OwnedFd::from(b))
        };
        if let Kind::Proxy {
            pp: Some(v),
            header,
        } = &mut st.kind
        {
            let sock = socket2::SockRef::from(&engine);
            let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
            let local = sock.local_addr().ok().and_then(|a| a.as_socket());
            if peer.is_some() {
                hit("PROXY header with TCP addresses");
            }
            *header = proxy_header::encode(*v, peer, local, None);
        }
        let raw = engine.into_raw_fd();
        st.accepted = true;
        let c = &mut st.p[0];
        c.fd = Some(raw);
        c.end_fd = Some(end);
        c.live = true;
        c.connected = true;
        self.set_use(raw, Use::Peer(s, 0));
        self.unlinked.push(s);
        raw
    }

    /// The session an operation with `token` belongs to; `by_fd`: the session
    /// whose socket it is on, if known.
    fn link(&mut self, token: u64, by_fd: Option<usize>) -> usize {
        let key = token & KEY_MASK;
        if let Some(&s) = self.keys.get(&key) {
            if let Some(f) = by_fd {
                assert_eq!(s, f, "an operation of session {s} on session {f}'s socket");
            }
            return s;
        }
        let s = match by_fd {
            Some(f) => f,
            None => *self
                .unlinked
                .first()
                .expect("an upstream connect for no accepted client"),
        };
        let at = self
            .unlinked
            .iter()
            .position(|&x| x == s)
            .expect("a session with two keys");
        self.unlinked.remove(at);
        self.sessions[s].key = Some(key);
        self.keys.insert(key, s);
        s
    }

    /// Checks an operation the worker starts.
    fn on_submit(&mut self, token: u64, op: &Op) {
        let (kind, _) = untoken(token);
        let fd = op.fd();
        assert!(
            !self.engine_shutdown,
            "{op:?} started after the worker began its shutdown"
        );
        assert!(
            !self.closed.contains(&fd),
            "{op:?} on fd {fd} after the worker closed it"
        );
        match op {
            Op::PollIn { fd } => {
                assert_eq!((*fd, kind), (self.wake_fd, K_WAKE));
                assert!(
                    !self.ops.values().any(|p| matches!(p.op, Op::PollIn { .. })),
                    "two wake-up polls"
                );
            }
            Op::Accept { fd } => {
                assert_eq!((*fd, kind), (self.listener, K_ACCEPT));
                assert!(
                    !self.ops.values().any(|p| matches!(p.op, Op::Accept { .. })),
                    "two accepts on one listener"
                );
            }
            Op::Connect { fd, addr } => {
                assert_eq!(kind, K_CONNECT);
                assert!(
                    self.use_of(*fd).is_none(),
                    "a connect on fd {fd}, which is in use"
                );
                let s = self.link(token, None);
                let st = &mut self.sessions[s];
                assert!(
                    matches!(st.kind, Kind::Proxy { .. }) && st.p[1].fd.is_none(),
                    "session {s}: a second upstream"
                );
                assert_eq!(st.errors(), 0, "session {s}: a connect after an error");
                let a = addr.as_socket().expect("an IP address");
                assert!(
                    self.setup.upstreams.contains(&a),
                    "connect to {a}, not an upstream"
                );
                st.p[1].fd = Some(*fd);
                st.p[1].end_fd = Some(replace_with_pair(*fd));
                self.set_use(*fd, Use::Peer(s, 1));
            }
            Op::Recv { fd, .. } | Op::Send { fd, .. } => {
                let recv = matches!(op, Op::Recv { .. });
                let Some(Use::Peer(s, side)) = self.use_of(*fd) else {
                    panic!("{op:?} on fd {fd}, not a session's socket");
                };
                let want = if recv { K_RECV } else { K_SEND } + side as u8;
                assert_eq!(kind, want, "{op:?}: a token of the other side");
                self.link(token, Some(s));
                let st = &self.sessions[s];
                let p = &st.p[side];
                assert!(
                    p.connected,
                    "session {s}: {op:?} before the connect completed"
                );
                assert_eq!(
                    st.errors(),
                    0,
                    "session {s}: {op:?} after an error ended the session"
                );
                assert!(
                    !self.pending_on(*fd, recv),
                    "session {s}: two {} in flight on the {}",
                    if recv { "receives" } else { "sends" },
                    name(side)
                );
                if let Op::Recv {
                    poll_first: true, ..
                } = op
                {
                    hit("a receive after a short one waits for data (poll_first)");
                }
                if recv {
                    assert!(
                        !p.eof_taken,
                        "session {s}: a receive on the {} after its end of stream",
                        name(side)
                    );
                } else if let Op::Send { buf, off, .. } = op {
                    assert!(*off < buf.len(), "session {s}: an empty send");
                    // Only where the session asks for a half-close (respond; proxy
                    // once the other side ended): a peek per send is not free.
                    let half_close = match &st.kind {
                        Kind::Fixed(_, h) => *h,
                        Kind::Proxy { .. } => st.p[1 - side].eof_taken,
                        Kind::Echo => false,
                    };
                    if !p.tcp && half_close && p.end_fd.as_ref().is_some_and(fin_arrived) {
                        panic!("session {s}: a send to the {} after its FIN", name(side));
                    }
                    let mark = (buf.as_ptr() as usize, buf.len(), *off);
                    let st = &mut self.sessions[s];
                    if let Some(want) = st.p[side].next_send.take() {
                        assert_eq!(
                            mark,
                            want,
                            "session {s}: the {} send does not go on with the same buffer (pointer, length, offset)",
                            name(side)
                        );
                    }
                }
            }
            other => panic!("no such operation on a TCP listener: {other:?}"),
        }
    }

    /// Checks at the end of a sequence (after `run` returned); returns its steps.
    fn finish(&self, stats: &ListenerStats, worker: &WorkerStats) -> usize {
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

impl Backend for FakeBackend {
    fn caps(&self) -> Caps {
        Caps {
            multishot_sctp: false,
            recv_buf_size: self.buf_size,
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
fn fin_arrived(end: &OwnedFd) -> bool {
    let mut b = [MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(end).recv_with_flags(&mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT),
        Ok(0)
    )
}

/// A loopback TCP connection: the accepted end (for the engine) and the other.
fn tcp_pair() -> (OwnedFd, OwnedFd) {
    LOOPBACK.with(|l| {
        let addr = l.local_addr().expect("address");
        let c = TcpStream::connect(addr).expect("connect");
        let (a, _) = l.accept().expect("accept");
        (OwnedFd::from(a), OwnedFd::from(c))
    })
}

/// Puts one end of a new socketpair under fd number `fd` (the engine's upstream
/// socket) and returns the other end.
fn replace_with_pair(fd: RawFd) -> OwnedFd {
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
fn pattern(salt: u64, len: usize) -> Vec<u8> {
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
fn data_len(rng: &mut Rng, bulk: bool) -> usize {
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

fn binder() -> &'static Binder {
    static B: OnceLock<Binder> = OnceLock::new();
    B.get_or_init(|| Binder::start().expect("binder"))
}

/// The actions under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Echo,
    Respond,
    Http,
    /// Proxy, with or without a PROXY header.
    Proxy(bool),
}

/// The listener and the clients of one sequence.
fn make_setup(act: Act, rng: &mut Rng, seed: u64) -> (Setup, Vec<Sess>) {
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
                upstream_netns: None,
                upstream_netns_path: None,
                upstream_netns_line: 0,
                connect_timeout_ms: rng.pick(&[5, 1000, 1000]),
                idle_timeout_ms: rng.pick(&[0, 0, 0, 0, 2, 5, 50]),
                buffer_bytes: rng.pick(&[1, 100, 1000, 4096, 65_536]),
                proxy_protocol: pp.then(|| rng.pick(&[ProxyProtocol::V1, ProxyProtocol::V2])),
                session_idle_timeout_ms: 30_000,
                max_sessions: 1,
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
        (Act::Http, _) => Action::Http,
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
fn one(act: Act, seed: u64, trace: bool) -> usize {
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
    let shared = Arc::new(ListenerShared {
        name: "fake".into(),
        action: setup.action.clone(),
        netns: "root".into(),
        upstream,
        proto: Proto::Tcp,
        max_datagram: 0,
        sctp: SctpConfig::default(),
        peel: None,
        stats: ListenerStats::default(),
    });
    let listener = OwnedFd::from(
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket"),
    );
    let (tx, rx) = mpsc::channel();
    let wake_fd = Arc::new(eventfd().expect("eventfd"));
    let stats = Arc::new(WorkerStats::default());
    let ctx = WorkerCtx {
        index: 0,
        rx,
        wake: wake_fd.clone(),
        stats: stats.clone(),
        peeled: Default::default(),
    };
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
        fd: listener,
        shared: shared.clone(),
    });
    let mut w = Worker::new(fake, ctx);
    w.set_clock(clock);
    w.run().expect("a fake backend never fails");
    w.backend().finish(&shared.stats, &stats)
}

/// Runs `one(act, seed)` for seeds `1..=runs` (or only `RINGRESS_FAKE_SEED`) and
/// panics naming the seed and its step if one fails.
fn run(test: &str, act: Act, runs: u64) {
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
fn echo() {
    run("echo", Act::Echo, 2000);
}

#[test]
fn respond() {
    run("respond", Act::Respond, 2000);
}

#[test]
fn http() {
    run("http", Act::Http, 2000);
}

#[test]
fn proxy() {
    run("proxy", Act::Proxy(false), 2000);
}

#[test]
fn proxy_protocol() {
    run("proxy_protocol", Act::Proxy(true), 2000);
}
