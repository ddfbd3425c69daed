//! One worker: the engine both backends run under.
//!
//! A [`Worker`] owns everything a worker thread knows: its listeners (by the
//! supervisor's id), its sessions ([`Conn`] in a slab), its UDP sockets and
//! sessions, its timers, the sessions waiting for an upstream socket, and the
//! shutdown sequence. It decides every operation and hands it to its
//! [`Backend`], which only performs it and reports the end ([`Event`]). So both
//! backends accept, time out, count, close and shut down the same way, by
//! construction.
//!
//! The loop: wait on the backend until the earliest timer; handle each event
//! (hand a completion to its session, then start what the session asks for);
//! handle events that completed at once meanwhile; then run due timers, retry
//! receives that found no buffer, re-drive sessions that waited for an upstream
//! socket, and expire idle UDP sessions.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::backend::{Backend, Caps, Event, Meta, MultiKind, Op, OpId, Owned};
use super::conn::{Conn, ConnectStart, Opened, SEND_STALL_LIMIT};
use super::shared::{ListenerShared, PeelMailbox, Peeled, WorkerStats};
use super::slab::{token, untoken, Key, Slab};
use super::timers::{Timer, Timers};
use super::udp::{After, Datagram, UdpState};
use super::{drain_eventfd, wake, Command, ACCEPT_PAUSE_MS};
use crate::config::Proto;
use crate::proto::{Completion, Side};

const K_WAKE: u8 = 1;
const K_ACCEPT: u8 = 2;
/// Receive on side 0 (client) / 1 (upstream): `K_RECV + side`.
const K_RECV: u8 = 3;
/// Send on side 0 / 1: `K_SEND + side`.
const K_SEND: u8 = 5;
const K_CONNECT: u8 = 7;
/// Multishot receive on a UDP listener socket.
const K_UDP_LISTENER: u8 = 8;
/// Multishot receive on a UDP session's upstream socket.
const K_UDP_UPSTREAM: u8 = 9;

/// How long a shutting-down worker waits for its cancelled operations to end
/// before it gives up (and leaks their memory rather than free it).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How often a shutting-down worker checks whether its operations have ended.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

/// What a worker thread gets from the supervisor.
pub(crate) struct WorkerCtx {
    /// Index of the worker (0-based), for logs.
    pub index: usize,
    /// Commands from the supervisor.
    pub rx: mpsc::Receiver<Command>,
    /// The worker's eventfd: the supervisor, the binder's pool refills and
    /// peel-offs write it.
    pub wake: Arc<OwnedFd>,
    /// The worker's counters.
    pub stats: Arc<WorkerStats>,
    /// Peel-offs finished by the binder for this worker.
    pub peeled: PeelMailbox,
}

/// A TCP or one-to-one SCTP listening socket of this worker.
struct StreamListener {
    fd: OwnedFd,
    shared: Arc<ListenerShared>,
    /// The accept operation in flight.
    op: Option<OpId>,
    /// Being removed: closed once its accept has ended.
    removing: bool,
    /// Accepting paused (EMFILE...) until its timer fires.
    paused: bool,
}

/// Where a listener id leads.
#[derive(Debug, Clone, Copy)]
enum ListenerRef {
    /// An accepting listener in `listeners`.
    Stream(Key),
    /// A UDP listener in the UDP state.
    Udp(Key),
    /// A one-to-many SCTP socket: one session in `conns`.
    Many(Key),
}

/// The operations in flight for one session, by side.
#[derive(Debug, Default)]
struct SessionOps {
    recv: [Option<OpId>; 2],
    send: [Option<OpId>; 2],
    connect: Option<OpId>,
    /// The receive in flight is multishot (one-to-many SCTP echo).
    multi: [bool; 2],
    /// A cancel of that multishot receive is on its way.
    cancelling: [bool; 2],
    /// A send that found no room waits for its retry timer.
    retry: [bool; 2],
    /// The last receive was short: the socket is probably empty.
    drained: [bool; 2],
    /// The session is closing: its operations are being cancelled.
    closing: bool,
}

impl SessionOps {
    fn count(&self) -> usize {
        self.recv.iter().chain(&self.send).flatten().count() + usize::from(self.connect.is_some())
    }
}

/// A session and its operations.
struct Entry {
    conn: Conn,
    ops: SessionOps,
}

/// One worker over backend `B`.
pub(crate) struct Worker<B: Backend> {
    backend: B,
    caps: Caps,
    ctx: WorkerCtx,
    ids: HashMap<u64, ListenerRef>,
    listeners: Slab<StreamListener>,
    conns: Slab<Entry>,
    udp: UdpState,
    timers: Timers,
    /// Sessions waiting for an upstream socket from a namespace pool.
    parked: Vec<Key>,
    /// Sessions whose receive found no buffer (ENOBUFS): re-driven after the batch.
    starved: Vec<Key>,
    /// UDP sockets whose multishot receive ended for lack of buffers.
    udp_starved: Vec<(u8, Key)>,
    wake_op: Option<OpId>,
    events: Vec<Event>,
    /// Set by [`Command::Shutdown`]: the time by which operations must have ended.
    shutdown: Option<Instant>,
}

impl<B: Backend> Worker<B> {
    /// A worker with no listeners yet.
    pub fn new(backend: B, ctx: WorkerCtx) -> Worker<B> {
        Worker {
            caps: backend.caps(),
            backend,
            ctx,
            ids: HashMap::new(),
            listeners: Slab::default(),
            conns: Slab::default(),
            udp: UdpState::default(),
            timers: Timers::default(),
            parked: Vec::new(),
            starved: Vec::new(),
            udp_starved: Vec::new(),
            wake_op: None,
            events: Vec::with_capacity(256),
            shutdown: None,
        }
    }

    /// The backend (for tests).
    #[cfg(test)]
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Runs until [`Command::Shutdown`] has been handled and every operation has
    /// ended (or [`SHUTDOWN_GRACE`] has passed).
    ///
    /// # Errors
    /// The backend failed ([`Backend::wait`]); operations may still be in flight,
    /// so the caller must not free what they point at (dropping the backend leaks
    /// it).
    pub fn run(&mut self) -> io::Result<()> {
        self.arm_wake();
        loop {
            let now = Instant::now();
            let mut wait = match (self.timers.next_wait(now), self.udp.next_wait(now)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if self.shutdown.is_some() {
                wait = Some(wait.map_or(SHUTDOWN_POLL, |w| w.min(SHUTDOWN_POLL)));
            }
            let mut events = std::mem::take(&mut self.events);
            self.backend.wait(wait, &mut events)?;
            while !events.is_empty() {
                self.ctx
                    .stats
                    .completed
                    .fetch_add(events.len() as u64, Relaxed);
                for ev in events.drain(..) {
                    self.handle(ev);
                }
                self.backend.ready(&mut events);
            }
            self.events = events;
            self.after_batch();
            if let Some(deadline) = self.shutdown {
                let left = self.backend.in_flight();
                if left == 0 {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        worker = self.ctx.index,
                        in_flight = left,
                        "operations still in flight at shutdown; leaking their memory"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Work after each batch of events: timers, starved receives, parked sessions,
    /// idle UDP sessions.
    fn after_batch(&mut self) {
        for k in std::mem::take(&mut self.starved) {
            self.drive(k);
        }
        let now = Instant::now();
        for (timer, k) in self.timers.expired(now, &mut self.conns, |e| &mut e.conn) {
            self.on_timer(timer, k);
        }
        for uk in self.udp.sweep(now) {
            self.udp_close(K_UDP_UPSTREAM, uk);
        }
        for (kind, k) in std::mem::take(&mut self.udp_starved) {
            self.arm_udp(kind, k);
        }
        for k in std::mem::take(&mut self.parked) {
            if let Some(e) = self.conns.get_mut(k) {
                e.conn.unpark();
            }
            self.drive(k);
        }
    }

    fn submit(&mut self, kind: u8, k: Key, op: Op) -> OpId {
        self.ctx.stats.submitted.fetch_add(1, Relaxed);
        self.backend.submit(token(kind, k), op)
    }

    fn arm_wake(&mut self) {
        if self.wake_op.is_none() && self.shutdown.is_none() {
            let fd = self.ctx.wake.as_raw_fd();
            self.wake_op = Some(self.submit(K_WAKE, Key { idx: 0, gen: 0 }, Op::PollIn { fd }));
        }
    }

    fn handle(&mut self, ev: Event) {
        let (kind, k) = untoken(ev.token);
        let buf = ev.buf;
        match kind {
            K_WAKE => {
                if !ev.more {
                    self.wake_op = None;
                }
                drain_eventfd(self.ctx.wake.as_raw_fd());
                self.commands();
                self.peeled();
                self.arm_wake();
            }
            K_ACCEPT => self.on_accept(k, ev),
            K_RECV | 4 => self.on_recv(k, side_of(kind - K_RECV), ev),
            K_SEND | 6 => self.on_send(k, side_of(kind - K_SEND), ev),
            K_CONNECT => self.on_connect(k, ev),
            K_UDP_LISTENER | K_UDP_UPSTREAM => self.on_udp(kind, k, ev),
            _ => {}
        }
        if let Some(b) = buf {
            self.backend.release(b);
        }
    }

    fn on_timer(&mut self, timer: Timer, k: Key) {
        match timer {
            Timer::Deadline => {
                if let Some(e) = self.conns.get_mut(k) {
                    if !e.ops.closing {
                        e.conn.complete(Side::Client, Completion::Timeout);
                    }
                }
                self.drive(k);
            }
            Timer::SendRetry(i) => {
                if let Some(e) = self.conns.get_mut(k) {
                    e.ops.retry[usize::from(i)] = false;
                }
                self.drive(k);
            }
            Timer::AcceptPause => {
                if let Some(l) = self.listeners.get_mut(k) {
                    l.paused = false;
                }
                self.arm_accept(k);
            }
        }
    }

    // ------------------------------------------------------------ commands

    fn commands(&mut self) {
        while let Ok(cmd) = self.ctx.rx.try_recv() {
            match cmd {
                Command::AddListener { id, fd, shared } if shared.proto == Proto::Udp => {
                    let k = self.udp.add_listener(fd, shared);
                    self.ids.insert(id, ListenerRef::Udp(k));
                    self.arm_udp(K_UDP_LISTENER, k);
                }
                Command::AddListener { id, fd, shared }
                    if shared.proto == Proto::Sctp
                        && shared.sctp.style == crate::sctp::Style::OneToMany =>
                {
                    let conn = Conn::open(fd, shared, &self.ctx.stats, Opened::Many);
                    let k = self.insert_conn(conn);
                    self.ids.insert(id, ListenerRef::Many(k));
                    self.drive(k);
                }
                Command::AddListener { id, fd, shared } => {
                    let k = self.listeners.insert(StreamListener {
                        fd,
                        shared,
                        op: None,
                        removing: false,
                        paused: false,
                    });
                    self.ids.insert(id, ListenerRef::Stream(k));
                    self.arm_accept(k);
                }
                Command::RemoveListener { id } => match self.ids.remove(&id) {
                    Some(ListenerRef::Stream(k)) => self.remove_listener(k),
                    Some(ListenerRef::Udp(k)) => {
                        for uk in self.udp.end_sessions(k) {
                            self.udp_close(K_UDP_UPSTREAM, uk);
                        }
                        self.udp_close(K_UDP_LISTENER, k);
                    }
                    Some(ListenerRef::Many(k)) => {
                        // Its queued replies go out, then the socket closes.
                        if let Some(e) = self.conns.get_mut(k) {
                            e.conn.io.close();
                        }
                        self.drive(k);
                    }
                    None => {}
                },
                Command::Shutdown => self.begin_shutdown(),
            }
        }
    }

    /// Stops accepting, ends every session (what is queued is dropped, sockets are
    /// closed without a reset), cancels every operation; [`Worker::run`] returns
    /// once they have all ended.
    fn begin_shutdown(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(Instant::now() + SHUTDOWN_GRACE);
        for k in self.listeners.keys() {
            self.remove_listener(k);
        }
        for (_, r) in std::mem::take(&mut self.ids) {
            if let ListenerRef::Udp(k) = r {
                for uk in self.udp.end_sessions(k) {
                    self.udp_close(K_UDP_UPSTREAM, uk);
                }
                self.udp_close(K_UDP_LISTENER, k);
            }
        }
        for k in self.conns.keys() {
            if let Some(e) = self.conns.get_mut(k) {
                e.conn.failed = false;
                e.conn.io.close();
                for l in &mut e.conn.io.legs {
                    l.out.clear();
                }
            }
            self.close(k);
        }
        if let Some(id) = self.wake_op {
            self.backend.cancel(id);
        }
    }

    // ------------------------------------------------------------ listeners

    fn arm_accept(&mut self, k: Key) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        if l.removing {
            if l.op.is_none() {
                self.drop_listener(k);
            }
            return;
        }
        if l.op.is_some() || l.paused {
            return;
        }
        let fd = l.fd.as_raw_fd();
        let id = self.submit(K_ACCEPT, k, Op::Accept { fd });
        if let Some(l) = self.listeners.get_mut(k) {
            l.op = Some(id);
        }
    }

    fn remove_listener(&mut self, k: Key) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        l.removing = true;
        match l.op {
            Some(id) => self.backend.cancel(id),
            None => self.drop_listener(k),
        }
    }

    fn drop_listener(&mut self, k: Key) {
        if let Some(l) = self.listeners.remove(k) {
            self.backend.close(l.fd);
        }
    }

    fn on_accept(&mut self, k: Key, ev: Event) {
        let Some(l) = self.listeners.get_mut(k) else {
            if ev.res >= 0 {
                // SAFETY: the kernel just installed this fd for us; nobody else owns it.
                self.backend.close(unsafe { OwnedFd::from_raw_fd(ev.res) });
            }
            return;
        };
        if !ev.more {
            l.op = None;
        }
        if ev.res >= 0 {
            // SAFETY: as above.
            let fd = unsafe { OwnedFd::from_raw_fd(ev.res) };
            if l.removing {
                self.backend.close(fd);
            } else {
                let conn = Conn::open(fd, l.shared.clone(), &self.ctx.stats, Opened::Accepted);
                let ck = self.insert_conn(conn);
                self.drive(ck);
            }
        } else {
            let errno = -ev.res;
            if errno == libc::ECANCELED || l.removing {
                if !ev.more && l.removing {
                    self.drop_listener(k);
                }
                return;
            }
            if super::accept_error_pauses(errno) {
                l.shared.stats.accept_errors.fetch_add(1, Relaxed);
                tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno),
                    "accept failed; pausing {ACCEPT_PAUSE_MS} ms");
                if !ev.more && !l.paused {
                    l.paused = true;
                    let at = Instant::now() + Duration::from_millis(ACCEPT_PAUSE_MS);
                    self.timers.start(at, Timer::AcceptPause, k);
                }
                return;
            } else if errno == libc::EINTR {
                // SCTP's accept checks for a pending signal before it checks for a
                // non-blocking call, and io_uring's task-work notification counts
                // as one: the accept is simply asked again.
                tracing::debug!(listener = %l.shared.name, "accept interrupted (EINTR); re-armed");
            } else if !super::accept_error_benign(errno) {
                l.shared.stats.accept_errors.fetch_add(1, Relaxed);
                tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno), "accept failed");
            }
        }
        if !ev.more {
            self.arm_accept(k);
        }
    }

    // ------------------------------------------------------------ sessions

    fn insert_conn(&mut self, conn: Conn) -> Key {
        self.conns.insert(Entry {
            conn,
            ops: SessionOps::default(),
        })
    }

    /// Starts sessions for the associations the binder peeled off (one-to-many
    /// proxy) and lets their one-to-many sockets be read again. A socket whose
    /// one-to-many session has gone (listener removed) is closed, which aborts
    /// its association.
    fn peeled(&mut self) {
        let done = std::mem::take(&mut *self.ctx.peeled.lock().unwrap_or_else(|p| p.into_inner()));
        for p in done {
            let Some(e) = self.conns.get_mut(p.conn) else {
                if let Ok(fd) = p.result {
                    self.backend.close(fd);
                }
                continue;
            };
            e.conn
                .peel_finished(p.result.as_ref().err().map(|_| p.assoc));
            let shared = e.conn.listener.clone();
            match p.result {
                Ok(fd) => {
                    let conn = Conn::open(fd, shared, &self.ctx.stats, Opened::Peeled);
                    let nk = self.insert_conn(conn);
                    self.drive(nk);
                }
                Err(err) => {
                    tracing::warn!(listener = %shared.name, error = %err, "SCTP peel-off failed");
                }
            }
            self.drive(p.conn);
        }
    }

    /// Hands session `k`'s peel-off requests to the binder; each answer lands in
    /// this worker's mailbox and wakes it. A request that cannot even be made is
    /// finished at once (the session reads again).
    fn request_peel_offs(ctx: &WorkerCtx, k: Key, c: &mut Conn) {
        for assoc in c.take_peel_offs() {
            let dup = c.legs[0].fd.as_ref().map(OwnedFd::try_clone);
            match (&c.listener.peel, dup) {
                (Some(src), Some(Ok(fd))) => {
                    let (mailbox, wake_fd) = (ctx.peeled.clone(), ctx.wake.clone());
                    src.binder.peel_off(
                        src.netns.clone(),
                        fd,
                        assoc,
                        Box::new(move |result| {
                            mailbox
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Peeled {
                                    conn: k,
                                    assoc,
                                    result,
                                });
                            wake(wake_fd.as_raw_fd());
                        }),
                    );
                }
                (_, dup) => {
                    tracing::warn!(listener = %c.listener.name, assoc, error = ?dup.map(|d| d.err()),
                        "cannot ask for an SCTP peel-off; aborting the association");
                    c.peel_finished(Some(assoc));
                }
            }
        }
    }

    /// Starts what session `k` asks for after a completion: its connect, a send
    /// and a receive per side; closes it when it is done.
    fn drive(&mut self, k: Key) {
        let Some(e) = self.conns.get_mut(k) else {
            return;
        };
        if e.ops.closing || e.conn.finished() {
            self.close(k);
            return;
        }
        if e.conn.take_connect_request() {
            match e.conn.start_connect(&self.ctx.wake) {
                ConnectStart::Go => {
                    let leg = &mut e.conn.legs[1];
                    if let (Some(fd), Some(addr)) = (leg.raw(), leg.dest.take()) {
                        let id = self.submit(K_CONNECT, k, Op::Connect { fd, addr });
                        match self.conns.get_mut(k) {
                            Some(e) => e.ops.connect = Some(id),
                            None => return,
                        }
                    }
                }
                ConnectStart::Wait => {
                    if e.conn.park() {
                        self.parked.push(k);
                    }
                }
                ConnectStart::Failed => {
                    self.close(k);
                    return;
                }
            }
        }
        for side in [Side::Client, Side::Upstream] {
            self.drive_side(k, side);
        }
        if let Some(e) = self.conns.get_mut(k) {
            e.conn.shutdown_drained();
            // Before arming: a request that ends at once lets the session read again.
            Self::request_peel_offs(&self.ctx, k, &mut e.conn);
            self.timers.sync(k, &mut e.conn);
        }
    }

    /// Starts a send and a receive on `side` of session `k` if wanted and none is
    /// in flight.
    fn drive_side(&mut self, k: Key, side: Side) {
        let i = side.index();
        let kind_i = i as u8;
        let Some(e) = self.conns.get_mut(k) else {
            return;
        };
        let Some(fd) = e.conn.legs[i].raw() else {
            return;
        };
        let message = e.conn.is_message_leg(side);
        if e.ops.send[i].is_none() && !e.ops.retry[i] {
            let op = if message {
                e.conn.take_message(side).map(|(msg, hdr)| Op::SendMsg {
                    fd,
                    msg,
                    hdr,
                    // The send buffer of a one-to-many socket is shared by its
                    // associations: bound the wait for room (see on_send).
                    bound: e.conn.many.then_some(SEND_STALL_LIMIT),
                })
            } else {
                e.conn
                    .take_send(side)
                    .map(|(buf, off)| Op::Send { fd, buf, off })
            };
            if let Some(op) = op {
                let id = self.submit(K_SEND + kind_i, k, op);
                match self.conns.get_mut(k) {
                    Some(e) => e.ops.send[i] = Some(id),
                    None => return,
                }
            }
        }
        let Some(e) = self.conns.get_mut(k) else {
            return;
        };
        if e.ops.recv[i].is_some() || !e.conn.wants_recv(side) {
            return;
        }
        let op = if !message {
            Op::Recv {
                fd,
                poll_first: e.ops.drained[i],
            }
        } else if self.caps.multishot_sctp && e.conn.many && e.conn.listener.peel.is_none() {
            // A one-to-many echo socket carries every association's messages: a
            // multishot receive takes them in batches instead of one round trip
            // per message. (Not for proxy: reading must stop while a peel-off is
            // pending.)
            e.ops.multi[i] = true;
            Op::RecvMulti {
                fd,
                kind: MultiKind::SctpMany,
            }
        } else {
            match e.conn.take_recv_header(side) {
                Some(hdr) => Op::RecvMsg { fd, hdr },
                None => return,
            }
        };
        e.conn.take_recv_request(side);
        let id = self.submit(K_RECV + kind_i, k, op);
        if let Some(e) = self.conns.get_mut(k) {
            e.ops.recv[i] = Some(id);
        }
    }

    /// Closes session `k` now if nothing is in flight, else cancels what is and
    /// closes when the last operation has ended. An aborted session's sockets get
    /// SO_LINGER 0 first, so their peers see a reset.
    fn close(&mut self, k: Key) {
        let Some(e) = self.conns.get_mut(k) else {
            return;
        };
        if !e.ops.closing {
            e.ops.closing = true;
            e.conn.linger_if_aborting();
            let ops = &e.ops;
            let ids: Vec<OpId> = ops
                .recv
                .iter()
                .chain(&ops.send)
                .chain(std::iter::once(&ops.connect))
                .flatten()
                .copied()
                .collect();
            for id in ids {
                self.backend.cancel(id);
            }
        }
        let Some(e) = self.conns.get_mut(k) else {
            return;
        };
        if e.ops.count() == 0 {
            if let Some(mut e) = self.conns.remove(k) {
                for leg in &mut e.conn.legs {
                    if let Some(fd) = leg.fd.take() {
                        self.backend.close(fd);
                    }
                }
            }
        }
    }

    fn on_recv(&mut self, k: Key, side: Side, ev: Event) {
        let i = side.index();
        let Some(e) = self.conns.get_mut(k) else {
            return;
        };
        if e.ops.multi[i] {
            self.on_recv_multi(k, side, ev);
            return;
        }
        e.ops.recv[i] = None;
        if let Owned::RecvHeader(h) = ev.owned {
            e.conn.return_recv_header(side, h);
        }
        if !e.ops.closing {
            let res = ev.res;
            if res == -libc::ENOBUFS {
                // Back-pressure from the buffer pool, not an error: retry once
                // this batch has returned its buffers.
                self.ctx.stats.enobufs.fetch_add(1, Relaxed);
                e.conn.io.side(side).recv();
                self.starved.push(k);
                return;
            }
            if res == -libc::EAGAIN || res == -libc::ECANCELED {
                // A receive retried in io-wq on a non-blocking socket after a
                // spurious wake-up (EAGAIN): nothing was read; ask again.
                e.conn.io.side(side).recv();
            } else if e.conn.is_message_leg(side) && res >= 0 {
                let (flags, info) = match ev.meta {
                    Meta::Message { flags, info } => (flags, info),
                    _ => (0, Default::default()),
                };
                let data = ev.buf.map_or(&[][..], |b| self.backend.data(b));
                e.conn.complete_message(side, data, flags, info);
            } else if res > 0 {
                e.ops.drained[i] = (res as usize) < self.caps.recv_buf_size;
                let data = ev.buf.map_or(&[][..], |b| self.backend.data(b));
                e.conn.complete(side, Completion::Recv(data));
            } else if res == 0 {
                e.conn.complete(side, Completion::Eof);
            } else {
                e.conn.complete(side, Completion::Error(-res));
            }
        }
        self.drive(k);
    }

    /// One event of the multishot receive of a one-to-many echo socket. The
    /// receive is cancelled when the session stops asking for more (its window is
    /// full); its last event lacks `more`.
    fn on_recv_multi(&mut self, k: Key, side: Side, ev: Event) {
        let i = side.index();
        let Some(e) = self.conns.get_mut(k) else {
            return;
        };
        if !ev.more {
            e.ops.recv[i] = None;
            e.ops.multi[i] = false;
            e.ops.cancelling[i] = false;
        }
        if e.ops.closing {
            // Cancelled or not, nothing more goes to a closing session.
        } else if ev.res >= 0 {
            if let Meta::Message { flags, info } = ev.meta {
                let data = ev.buf.map_or(&[][..], |b| self.backend.data(b));
                e.conn.complete_message(side, data, flags, info);
            }
            // Still running but no longer wanted: stop it (its last events may
            // still carry data, which the session takes). Once a cancel is on its
            // way, a request made meanwhile is kept for the re-arm.
            let wanted = e.conn.wants_recv(side);
            if ev.more {
                if wanted && !e.ops.cancelling[i] {
                    e.conn.take_recv_request(side);
                } else if !wanted && !e.ops.cancelling[i] {
                    if let Some(id) = e.ops.recv[i] {
                        e.ops.cancelling[i] = true;
                        self.backend.cancel(id);
                    }
                }
            }
        } else if ev.res == -libc::ENOBUFS {
            self.ctx.stats.enobufs.fetch_add(1, Relaxed);
            e.conn.io.side(side).recv();
            if !ev.more {
                self.starved.push(k);
                return;
            }
        } else if ev.res == -libc::ECANCELED || ev.res == -libc::EAGAIN {
            if !ev.more {
                e.conn.io.side(side).recv();
            }
        } else {
            e.conn.complete(side, Completion::Error(-ev.res));
        }
        self.drive(k);
    }

    fn on_send(&mut self, k: Key, side: Side, ev: Event) {
        let i = side.index();
        let Some(e) = self.conns.get_mut(k) else {
            return;
        };
        e.ops.send[i] = None;
        let res = ev.res;
        match ev.owned {
            _ if e.ops.closing => {}
            Owned::Bytes(buf) if res >= 0 => e.conn.sent(side, buf, res as usize),
            Owned::Message(msg, hdr) if res >= 0 => e.conn.message_sent(side, msg, hdr),
            Owned::Bytes(buf) if res == -libc::ECANCELED => e.conn.restore_send(side, buf),
            Owned::Message(msg, hdr) if res == -libc::ECANCELED && e.conn.many => {
                // Not closing, so the bound on the wait for room cancelled it: the
                // association took nothing for SEND_STALL_LIMIT.
                e.conn.restore_message(side, msg, hdr);
                e.conn.send_stalled(side);
            }
            owned if res == -libc::EAGAIN => {
                // No room (an SCTP message goes whole and "writable" only means
                // "some room"; or a send retried in io-wq on a non-blocking
                // socket). Nothing was sent: wait a little (doubling), then send
                // the same again.
                match owned {
                    Owned::Bytes(buf) => e.conn.restore_send(side, buf),
                    Owned::Message(msg, hdr) => e.conn.restore_message(side, msg, hdr),
                    _ => {}
                }
                let wait = e.conn.send_would_block(side);
                tracing::trace!(listener = %e.conn.listener.name, ?wait, "send found no room (EAGAIN)");
                if !wait.is_zero() {
                    e.ops.retry[i] = true;
                    let kind = if i == 0 { 0 } else { 1 };
                    self.timers
                        .start(Instant::now() + wait, Timer::SendRetry(kind), k);
                }
            }
            Owned::Message(_, hdr) => {
                e.conn.legs[i].send_hdr = Some(hdr);
                e.conn.send_failed(side, -res);
            }
            _ => e.conn.complete(side, Completion::Error(-res)),
        }
        self.drive(k);
    }

    fn on_connect(&mut self, k: Key, ev: Event) {
        if let Some(e) = self.conns.get_mut(k) {
            e.ops.connect = None;
            if !e.ops.closing {
                let c = if ev.res == 0 {
                    Completion::Connected
                } else {
                    Completion::Error(-ev.res)
                };
                e.conn.complete(Side::Upstream, c);
            }
        }
        self.drive(k);
    }

    // ------------------------------------------------------------ UDP

    /// The fd, in-flight receive and closing flag of a UDP listener
    /// (`K_UDP_LISTENER`) or upstream socket (`K_UDP_UPSTREAM`).
    fn udp_socket(&mut self, kind: u8, k: Key) -> Option<(i32, &mut Option<OpId>, &mut bool)> {
        if kind == K_UDP_LISTENER {
            let l = self.udp.listeners.get_mut(k)?;
            Some((l.fd.as_raw_fd(), &mut l.recv, &mut l.closing))
        } else {
            let u = self.udp.upstreams.get_mut(k)?;
            Some((u.fd.as_raw_fd(), &mut u.recv, &mut u.closing))
        }
    }

    /// Starts the multishot receive of a UDP socket, unless one runs or it closes.
    fn arm_udp(&mut self, kind: u8, k: Key) {
        if self.shutdown.is_some() {
            return;
        }
        let Some((fd, recv, closing)) = self.udp_socket(kind, k) else {
            return;
        };
        if recv.is_some() || *closing {
            return;
        }
        let op = Op::RecvMulti {
            fd,
            kind: MultiKind::Datagram,
        };
        let id = self.submit(kind, k, op);
        if let Some((_, recv, _)) = self.udp_socket(kind, k) {
            *recv = Some(id);
        }
    }

    /// One event of a UDP multishot receive.
    fn on_udp(&mut self, kind: u8, k: Key, ev: Event) {
        let now = Instant::now();
        let mut watch = None;
        if let (
            true,
            Some(b),
            Meta::Datagram {
                from,
                to,
                truncated,
            },
        ) = (ev.res >= 0, ev.buf, ev.meta)
        {
            let d = Datagram {
                data: self.backend.data(b),
                from,
                to,
                truncated,
            };
            if kind == K_UDP_LISTENER {
                if let After::Watch(uk) = self.udp.on_listener_datagram(k, &d, &self.ctx.wake, now)
                {
                    watch = Some(uk);
                }
            } else {
                self.udp.on_upstream_datagram(k, &d, now);
            }
        }
        let mut starved = false;
        let mut broken = false;
        if ev.res < 0 {
            match -ev.res {
                libc::ENOBUFS => {
                    self.ctx.stats.enobufs.fetch_add(1, Relaxed);
                    starved = true;
                }
                libc::ECANCELED | libc::EAGAIN | libc::EINTR => {}
                errno if kind == K_UDP_UPSTREAM => self.udp.on_upstream_error(k, errno),
                errno @ (libc::ENOMEM | libc::EINVAL | libc::ENOSYS) => {
                    // The receive cannot be set up (no buffer memory): not served.
                    tracing::error!(worker = self.ctx.index, error = %io::Error::from_raw_os_error(errno),
                        "cannot receive on a udp listener; it is not served by this worker");
                    broken = true;
                }
                errno => tracing::debug!(errno, "udp listener receive failed; re-arming"),
            }
        }
        if let Some(uk) = watch {
            self.arm_udp(K_UDP_UPSTREAM, uk);
        }
        if !ev.more {
            let closing = self.udp_socket(kind, k).map(|(_, recv, closing)| {
                *recv = None;
                *closing
            });
            match closing {
                // Its receive has ended: the socket can go.
                Some(true) => self.udp_remove(kind, k),
                Some(false) if broken => {}
                Some(false) if starved => self.udp_starved.push((kind, k)),
                Some(false) => self.arm_udp(kind, k),
                None => {}
            }
        }
    }

    /// Ends a UDP socket: at once if no receive is in flight, else after the
    /// cancelled receive's last event.
    fn udp_close(&mut self, kind: u8, k: Key) {
        let recv = self.udp_socket(kind, k).map(|(_, recv, closing)| {
            *closing = true;
            *recv
        });
        match recv {
            Some(Some(id)) => self.backend.cancel(id),
            Some(None) => self.udp_remove(kind, k),
            None => {}
        }
    }

    /// Closes a UDP socket whose receive has ended.
    fn udp_remove(&mut self, kind: u8, k: Key) {
        let fd = if kind == K_UDP_LISTENER {
            self.udp.listeners.remove(k).map(|l| l.fd)
        } else {
            self.udp.upstreams.remove(k).map(|u| u.fd)
        };
        if let Some(fd) = fd {
            self.backend.close(fd);
        }
    }
}

fn side_of(i: u8) -> Side {
    if i == 0 {
        Side::Client
    } else {
        Side::Upstream
    }
}

/// Runs a worker made by `make` on the calling thread until shutdown. The setup
/// result goes to `ready` first (the supervisor waits for it). A backend failure
/// is logged and marks the worker failed in its counters (the supervisor stops
/// the process); its in-flight memory is leaked, never freed.
pub(crate) fn serve<B: Backend>(
    make: impl FnOnce() -> io::Result<B>,
    ctx: WorkerCtx,
    ready: mpsc::SyncSender<io::Result<()>>,
) {
    let backend = match make() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let stats = ctx.stats.clone();
    let index = ctx.index;
    let mut w = Worker::new(backend, ctx);
    if let Err(e) = w.run() {
        tracing::error!(worker = index, error = %e, "worker backend failed; the worker stops");
        stats.failed.store(true, Relaxed);
        super::notify_worker_failed();
    }
}
