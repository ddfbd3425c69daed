//! One worker: the engine both backends run under.
//!
//! A [`Worker`] owns everything a worker thread knows: its listeners (by the
//! supervisor's id), its sessions ([`ActiveSession`] in a slab), its UDP sockets and
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
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

mod accept;
pub(crate) use accept::drop_new_handshakes;
mod datagram;
#[cfg(test)]
mod fake;
mod session;
#[cfg(test)]
mod tests;

use super::active::ActiveSession;
use super::backend::{Backend, Caps, Event, Op, OpId};
use super::shared::{ListenerShared, PeelMailbox, WorkerStats};
use super::slab::{token, untoken, Key, Slab};
use super::timers::{Timer, Timers};
use super::udp::UdpState;
use super::{drain_eventfd, Command, ListenerFd};
use crate::config::Proto;
use crate::proto::Origin;
use crate::proto::{Completion, Side};

const K_WAKE: u8 = 1;
const K_ACCEPT: u8 = 2;
/// Receive on side 0 (client) / 1 (upstream): `K_RECV + side`.
const K_RECV: u8 = 3;
/// Receive on side 1.
const K_RECV1: u8 = K_RECV + 1;
/// Send on side 0 / 1: `K_SEND + side`.
const K_SEND: u8 = 5;
/// Send on side 1.
const K_SEND1: u8 = K_SEND + 1;
const K_CONNECT: u8 = 7;
/// Multishot receive on a UDP listener socket.
const K_UDP_LISTENER: u8 = 8;
/// Multishot receive on a UDP session's upstream socket.
const K_UDP_UPSTREAM: u8 = 9;
/// Splice from side 0 / 1's socket into its direction's pipe (in place of a
/// receive on that side): `K_SPLICE_IN + side`.
const K_SPLICE_IN: u8 = 10;
/// Splice in on side 1.
const K_SPLICE_IN1: u8 = K_SPLICE_IN + 1;
/// Splice from the pipe toward side 0 / 1 out to its socket (in place of a
/// send on that side): `K_SPLICE_OUT + side`.
const K_SPLICE_OUT: u8 = 12;
/// Splice out on side 1.
const K_SPLICE_OUT1: u8 = K_SPLICE_OUT + 1;

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
    /// The binder, which attaches the SYN-dropping filter of a removed TCP
    /// listener (workers hold no capability); `None` in tests: the worker does it.
    pub binder: Option<crate::binder::Binder>,
    /// Filters the binder attached (or failed to), by listener, waiting for this
    /// worker (which the binder wakes through its eventfd).
    pub filtered: FilterMailbox,
}

/// Answers of [`crate::binder::Binder::attach_drop_filter`] for a worker's
/// listeners, by listener key.
pub(crate) type FilterMailbox = Arc<std::sync::Mutex<Vec<(Key, io::Result<()>)>>>;

/// A TCP or one-to-one SCTP listening socket of this worker.
struct StreamListener {
    fd: ListenerFd,
    shared: Arc<ListenerShared>,
    /// The accept operation in flight.
    op: Option<OpId>,
    /// Being removed: closed once its accept has ended.
    removing: bool,
    /// Removed, draining its accept queue until its [`Timer::ListenerDrain`].
    draining: bool,
    /// Accepting paused (EMFILE..., or a cap) until its timer fires.
    paused: bool,
    /// Held at a cap (counted in the listener's `at_capacity` gauge).
    capped: bool,
}

/// Where a listener id leads.
#[derive(Debug, Clone, Copy)]
enum ListenerRef {
    /// An accepting listener in `listeners`.
    Stream(Key),
    /// A UDP listener in the UDP state.
    Udp(Key),
    /// A one-to-many SCTP socket: one session in `sessions`.
    Many(Key),
}

/// The operations in flight for one session, by side.
#[derive(Debug, Default)]
struct SessionOps {
    recv: [Option<OpId>; 2],
    send: [Option<OpId>; 2],
    connect: Option<OpId>,
    /// The receive in flight is multishot (a stream where the backend has it, or
    /// one-to-many SCTP echo).
    multi: [bool; 2],
    /// A cancel of that multishot receive is on its way.
    cancelling: [bool; 2],
    /// A send that found no room waits for its retry timer.
    retry: [bool; 2],
    /// The last receive was short: the socket is probably empty.
    drained: [bool; 2],
    /// Splice in (by side): the last one found no room in the pipe (EAGAIN
    /// with bytes in it); the next waits for a splice out of that pipe.
    fill_blocked: [bool; 2],
    /// Splice in (by side): how many bytes the one in flight asked for.
    fill_len: [u32; 2],
    /// Splice out (by side): the last one found no room in the socket
    /// (EAGAIN); the next waits for it to be writable.
    splice_wait: [bool; 2],
    /// The session is closing: its operations are being cancelled.
    closing: bool,
}

impl SessionOps {
    fn count(&self) -> usize {
        self.recv.iter().chain(&self.send).flatten().count() + usize::from(self.connect.is_some())
    }
}

/// A session and its operations.
struct SessionSlot {
    session: ActiveSession,
    ops: SessionOps,
}

/// One worker over backend `B`.
pub(crate) struct Worker<B: Backend> {
    backend: B,
    caps: Caps,
    ctx: WorkerCtx,
    ids: HashMap<u64, ListenerRef>,
    listeners: Slab<StreamListener>,
    sessions: Slab<SessionSlot>,
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
    /// Set by [`Command::Drain`]: every session, and every one opened from now
    /// on, has been told ([`crate::proto::Session::on_drain`]).
    draining: bool,
    /// The time of the batch being handled: what sessions are told it is.
    now: Instant,
    /// Tests: a clock read instead of `Instant::now()` (a fake backend moves it
    /// forward when it "waits").
    #[cfg(test)]
    clock: Option<std::rc::Rc<std::cell::Cell<Instant>>>,
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
            sessions: Slab::default(),
            udp: UdpState::default(),
            timers: Timers::default(),
            parked: Vec::new(),
            starved: Vec::new(),
            udp_starved: Vec::new(),
            wake_op: None,
            events: Vec::with_capacity(256),
            shutdown: None,
            draining: false,
            now: Instant::now(),
            #[cfg(test)]
            clock: None,
        }
    }

    /// The time now: `Instant::now()`, or in tests the clock set with
    /// [`Worker::set_clock`].
    fn clock(&self) -> Instant {
        #[cfg(test)]
        if let Some(c) = &self.clock {
            return c.get();
        }
        Instant::now()
    }

    /// Makes the worker read `clock` instead of `Instant::now()` (for tests).
    #[cfg(test)]
    pub fn set_clock(&mut self, clock: std::rc::Rc<std::cell::Cell<Instant>>) {
        self.now = clock.get();
        self.clock = Some(clock);
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
        #[cfg(debug_assertions)]
        let panic_at = test_panic_at(self.ctx.index);
        loop {
            let now = self.clock();
            self.ctx.stats.heartbeat.beat_at(now);
            #[cfg(debug_assertions)]
            if panic_at.is_some_and(|at| now >= at) {
                panic!(
                    "RINGRESS_TEST_WORKER_PANIC asked worker {} to panic",
                    self.ctx.index
                );
            }
            let mut wait = match (self.timers.next_wait(now), self.udp.next_wait(now)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Idle or not, the worker beats at least this often (`/healthz`).
            let beat = crate::health::BEAT_EVERY;
            wait = Some(wait.map_or(beat, |w| w.min(beat)));
            if self.shutdown.is_some() {
                wait = Some(wait.map_or(SHUTDOWN_POLL, |w| w.min(SHUTDOWN_POLL)));
            }
            if super::upstream::top_ups_pending() {
                // Pools left short by this worker's takes are topped up once it
                // has been idle this long.
                let t = super::upstream::TOP_UP_IDLE;
                wait = Some(wait.map_or(t, |w| w.min(t)));
            }
            let mut events = std::mem::take(&mut self.events);
            self.backend.wait(wait, &mut events)?;
            if events.is_empty() {
                super::upstream::send_top_ups();
            }
            while !events.is_empty() {
                self.now = self.clock();
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
            // The pool refills this turn's connects asked for: one message per
            // pool, at most, before the worker waits.
            super::upstream::send_refills();
            if let Some(deadline) = self.shutdown {
                let left = self.backend.in_flight();
                if left == 0 {
                    return Ok(());
                }
                if self.clock() >= deadline {
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
    /// idle UDP sessions, UDP sessions waiting for an upstream socket.
    fn after_batch(&mut self) {
        self.now = self.clock();
        let now = self.now;
        for k in std::mem::take(&mut self.starved) {
            self.drive(k);
        }
        for (timer, k) in self
            .timers
            .expired(now, &mut self.sessions, |e| &mut e.session)
        {
            self.on_timer(timer, k);
        }
        for uk in self.udp.sweep(now) {
            self.udp_close(K_UDP_UPSTREAM, uk);
        }
        if self.udp.any_waiting() {
            // UDP sessions waiting for an upstream socket: the pool's refill wakes
            // the worker through its eventfd, and this batch may be that wake.
            let wake = self.ctx.wake.clone();
            for uk in self.udp.retry_waiting(&wake, now) {
                self.arm_udp(K_UDP_UPSTREAM, uk);
            }
        }
        for (kind, k) in std::mem::take(&mut self.udp_starved) {
            self.arm_udp(kind, k);
        }
        for k in std::mem::take(&mut self.parked) {
            if let Some(e) = self.sessions.get_mut(k) {
                e.session.unpark();
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
                self.filtered();
                self.arm_wake();
            }
            K_ACCEPT => self.on_accept(k, ev),
            K_RECV | K_RECV1 => self.on_recv(k, side_of(kind - K_RECV), ev),
            K_SEND | K_SEND1 => self.on_send(k, side_of(kind - K_SEND), ev),
            K_CONNECT => self.on_connect(k, ev),
            K_SPLICE_IN | K_SPLICE_IN1 => self.on_splice_in(k, side_of(kind - K_SPLICE_IN), ev),
            K_SPLICE_OUT | K_SPLICE_OUT1 => self.on_splice_out(k, side_of(kind - K_SPLICE_OUT), ev),
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
                if let Some(e) = self.sessions.get_mut(k) {
                    if !e.ops.closing {
                        e.session
                            .complete(Side::Client, Completion::Timeout, self.now);
                    }
                }
                self.drive(k);
            }
            Timer::SendRetry(i) => {
                if let Some(e) = self.sessions.get_mut(k) {
                    e.ops.retry[usize::from(i)] = false;
                }
                self.drive(k);
            }
            Timer::ListenerDrain => self.remove_listener(k),
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
                    let Some(fd) = own_fd(fd, &shared) else {
                        continue;
                    };
                    let k = self.udp.add_listener(fd, shared);
                    self.ctx.stats.listeners.fetch_add(1, Relaxed);
                    self.ids.insert(id, ListenerRef::Udp(k));
                    self.arm_udp(K_UDP_LISTENER, k);
                }
                Command::AddListener { id, fd, shared }
                    if shared.proto == Proto::Sctp
                        && shared.sctp.style == crate::sctp::Style::OneToMany =>
                {
                    let Some(fd) = own_fd(fd, &shared) else {
                        continue;
                    };
                    let session =
                        ActiveSession::open(fd, shared, &self.ctx.stats, Origin::Many, self.now);
                    let k = self.insert_session(session);
                    self.ids.insert(id, ListenerRef::Many(k));
                    self.drive(k);
                }
                Command::AddListener { id, fd, shared } => {
                    let k = self.listeners.insert(StreamListener {
                        fd,
                        shared,
                        op: None,
                        removing: false,
                        draining: false,
                        paused: false,
                        capped: false,
                    });
                    self.ctx.stats.listeners.fetch_add(1, Relaxed);
                    self.ids.insert(id, ListenerRef::Stream(k));
                    self.arm_accept(k);
                }
                Command::UpdateListener {
                    id,
                    shared,
                    backlog,
                } => match self.ids.get(&id).copied() {
                    Some(ListenerRef::Stream(k)) => self.update_listener(k, shared, backlog),
                    Some(ListenerRef::Udp(k)) => {
                        for uk in self.udp.update_listener(k, shared) {
                            self.udp_close(K_UDP_UPSTREAM, uk);
                        }
                    }
                    // One-to-many SCTP listeners are bound anew by every reload
                    // (`keeps_sockets` in server.rs): never updated in place.
                    Some(ListenerRef::Many(_)) | None => {}
                },
                Command::RemoveListener { id } => self.stop_listener(id, true),
                Command::Drain => self.begin_drain(),
                Command::AcceptAgain => {
                    for k in self.listeners.keys() {
                        let op = self.listeners.get(k).and_then(|l| l.op);
                        if let Some(id) = op {
                            // ECANCELED re-arms it (on_accept).
                            self.backend.cancel(id);
                        }
                    }
                }
                Command::DetachListener { id } => self.stop_listener(id, false),
                Command::ExportListeners { reply } => {
                    let _ = reply.send(self.export_listeners());
                }
                Command::Shutdown => self.begin_shutdown(),
            }
        }
    }

    /// Tells every open session that the process is stopping (once); sessions
    /// opened later are told as they open ([`Worker::insert_session`]). What each
    /// does is the session's policy ([`crate::proto::Session::on_drain`]).
    fn begin_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let now = self.now;
        for k in self.sessions.keys() {
            if let Some(e) = self.sessions.get_mut(k) {
                if !e.ops.closing {
                    e.session.drain(now);
                }
            }
            self.drive(k);
        }
    }

    /// Stops accepting on listener `id` and closes this worker's fd of it;
    /// connections already accepted go on, a UDP listener's proxy sessions end
    /// (their replies left through its fd), a one-to-many SCTP socket sends its
    /// queued replies first. With `drain` ([`Command::RemoveListener`]) a TCP
    /// listener first serves its accept queue behind a SYN filter
    /// ([`Worker::drain_listener`]); without ([`Command::DetachListener`]) nothing
    /// touches the socket, which another process may share (binary upgrade).
    fn stop_listener(&mut self, id: u64, drain: bool) {
        match self.ids.remove(&id) {
            Some(ListenerRef::Stream(k)) if drain => self.drain_listener(k),
            Some(ListenerRef::Stream(k)) => self.remove_listener(k),
            Some(ListenerRef::Udp(k)) => self.close_udp_listener(k),
            Some(ListenerRef::Many(k)) => {
                if let Some(e) = self.sessions.get_mut(k) {
                    e.session.io.close();
                }
                self.drive(k);
            }
            None => {}
        }
    }

    /// Ends UDP listener `k`'s sessions and closes it.
    fn close_udp_listener(&mut self, k: Key) {
        for uk in self.udp.end_sessions(k) {
            self.udp_close(K_UDP_UPSTREAM, uk);
        }
        self.udp_close(K_UDP_LISTENER, k);
    }

    /// Copies (`F_DUPFD_CLOEXEC`, close-on-exec) of this worker's TCP, one-to-one
    /// SCTP and UDP listener sockets that are accepting, by listener id. One-to-many
    /// SCTP sockets carry associations and are not exported. A failed dup (EMFILE)
    /// leaves that socket out, with a warning.
    fn export_listeners(&self) -> Vec<(u64, OwnedFd)> {
        let mut out = Vec::with_capacity(self.ids.len());
        for (&id, r) in &self.ids {
            let fd = match *r {
                ListenerRef::Stream(k) => self
                    .listeners
                    .get(k)
                    .filter(|l| !l.removing)
                    .map(|l| l.fd.as_fd()),
                ListenerRef::Udp(k) => self
                    .udp
                    .listeners
                    .get(k)
                    .filter(|l| !l.closing)
                    .map(|l| l.fd.as_fd()),
                ListenerRef::Many(_) => None,
            };
            if let Some(fd) = fd {
                match fd.try_clone_to_owned() {
                    Ok(c) => out.push((id, c)),
                    Err(e) => tracing::warn!(worker = self.ctx.index, listener = id, error = %e,
                        "cannot copy a listener socket for a takeover"),
                }
            }
        }
        out
    }

    /// Stops accepting, ends every session (what is queued is dropped, sockets are
    /// closed without a reset), cancels every operation; [`Worker::run`] returns
    /// once they have all ended.
    fn begin_shutdown(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(self.clock() + SHUTDOWN_GRACE);
        for k in self.listeners.keys() {
            self.remove_listener(k);
        }
        for (_, r) in std::mem::take(&mut self.ids) {
            if let ListenerRef::Udp(k) = r {
                self.close_udp_listener(k);
            }
        }
        for k in self.sessions.keys() {
            if let Some(e) = self.sessions.get_mut(k) {
                e.session.failed = false;
                e.session.io.close();
                for l in &mut e.session.io.sides {
                    l.out.clear();
                }
            }
            self.close(k);
        }
        if let Some(id) = self.wake_op {
            self.backend.cancel(id);
        }
    }
}

/// Debug builds only: `RINGRESS_TEST_WORKER_PANIC=INDEX:AFTER_MS` makes worker
/// INDEX panic once AFTER_MS have passed since it started (to test that a worker
/// panic stops the process with a failure). Release builds have no such hook.
#[cfg(debug_assertions)]
fn test_panic_at(index: usize) -> Option<Instant> {
    let v = std::env::var("RINGRESS_TEST_WORKER_PANIC").ok()?;
    let (i, ms) = v.split_once(':')?;
    let ms: u64 = ms.parse().ok()?;
    (i.parse::<usize>().ok()? == index).then(|| Instant::now() + Duration::from_millis(ms))
}

fn side_of(i: u8) -> Side {
    if i == 0 {
        Side::Client
    } else {
        Side::Upstream
    }
}

/// The worker's own fd of a UDP or one-to-many SCTP listener: these sockets are
/// never shared by workers (the supervisor does not send them so; if it did, the
/// listener is refused here with an error rather than served twice).
fn own_fd(fd: ListenerFd, shared: &ListenerShared) -> Option<OwnedFd> {
    match fd {
        ListenerFd::Own(fd) => Some(fd),
        ListenerFd::Shared(_) => {
            tracing::error!(listener = %shared.name,
                "a UDP or one-to-many SCTP socket cannot be shared by workers; not served");
            None
        }
    }
}

/// Runs a worker made by `make` on the calling thread until shutdown. Once the
/// backend exists the thread drops every capability ([`crate::privs::drop_all`]);
/// the setup result goes to `ready` then (the supervisor waits for it). A backend
/// failure or a panic in the loop is logged and marks the worker failed in its
/// counters (the supervisor stops the process, exit status 1); its in-flight
/// memory (and, after a panic, the whole worker with its ring) is leaked, never
/// freed.
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
    if let Err(e) = crate::privs::drop_all() {
        let _ = ready.send(Err(io::Error::other(format!(
            "worker {}: cannot drop its capabilities: {e}",
            ctx.index
        ))));
        return;
    }
    let _ = ready.send(Ok(()));
    let stats = ctx.stats.clone();
    let index = ctx.index;
    let mut w = Worker::new(backend, ctx);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run())) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            stats.failed.store(true, Relaxed);
            super::notify_worker_failed();
            tracing::error!(worker = index, error = %e, "worker backend failed; the worker stops");
        }
        Err(_) => {
            // The kernel may still write into buffers the ring owns: never free them.
            std::mem::forget(w);
            stats.failed.store(true, Relaxed);
            super::notify_worker_failed();
            tracing::error!(
                worker = index,
                "worker panicked; the worker stops (its ring and buffers are leaked)"
            );
        }
    }
}
