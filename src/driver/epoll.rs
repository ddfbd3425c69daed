//! The epoll driver: one epoll instance per worker, edge-triggered.
//!
//! It performs the same operations as the io_uring driver and reports the same
//! completions to the same sessions. Every operation tries the syscall first and
//! waits for readiness only after EAGAIN (as mio does): a socket is registered
//! once, for `EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET`, and the worker remembers
//! per socket whether it was last seen readable and writable.
//!
//! Fairness: one connection runs at most [`BUDGET`] operations per turn, then goes
//! to the back of a ready queue, so that a fast sender cannot starve the others.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use nix::sys::socket::MsgFlags;

use super::udp::{self, After, Datagram, UdpState};
use super::{
    accept_error_benign, accept_error_pauses, drain_eventfd, token, untoken, Command, Conn,
    ConnectStart, Key, ListenerIds, ListenerShared, Slab, Timers, WorkerCtx, ACCEPT_PAUSE_MS,
};
use crate::config::Proto;
use crate::proto::{Completion, Side};

/// Operations one connection may run per turn before yielding (count).
pub const BUDGET: usize = 16;
/// Connections one listener may accept per turn before yielding (count).
const ACCEPT_BUDGET: usize = 64;
/// Size of the worker's receive scratch buffer (bytes), as the io_uring buffers.
const SCRATCH: usize = 16 * 1024;

const K_LISTENER: u8 = 1;
const K_CLIENT: u8 = 2;
const K_WAKE: u8 = 3;
const K_UPSTREAM: u8 = 4;
const K_UDP_LISTENER: u8 = 5;
const K_UDP_UPSTREAM: u8 = 6;
/// Datagrams one UDP socket may take per turn before yielding (count).
const UDP_BUDGET: usize = 64;

struct EListener {
    fd: OwnedFd,
    shared: Arc<ListenerShared>,
    paused_until: Option<Instant>,
}

struct EConn {
    conn: Conn,
    /// Last known readiness per side: (readable, writable).
    ready: [(bool, bool); 2],
    /// The peer's FIN or an error was signalled (EPOLLRDHUP/HUP/ERR) per side: a
    /// short read then does not mean the socket is drained.
    hup: [bool; 2],
    /// An SCTP send found no room: try again at this time even without a new
    /// EPOLLOUT edge (a message goes whole; "writable" only means "some room").
    retry_at: Option<Instant>,
    /// Listed in the worker's `send_retries`.
    retry_listed: bool,
}

struct Worker {
    ep: Epoll,
    ctx: WorkerCtx,
    listeners: Slab<EListener>,
    by_id: ListenerIds,
    /// One-to-many SCTP listeners: each is one session in `conns`.
    many_by_id: ListenerIds,
    conns: Slab<EConn>,
    scratch: Vec<u8>,
    ready: VecDeque<Key>,
    ready_listeners: VecDeque<Key>,
    /// Listeners pausing their accepts (EMFILE...), with the end of the pause.
    paused: Vec<(Instant, Key)>,
    /// Sessions waiting for an upstream socket from a namespace pool.
    parked: Vec<Key>,
    /// Sessions with an SCTP send to try again at their `retry_at`.
    send_retries: Vec<Key>,
    timers: Timers,
    udp: UdpState,
    udp_by_id: ListenerIds,
    /// UDP sockets with datagrams possibly left after their budget: (kind, key).
    udp_ready: VecDeque<(u8, Key)>,
    /// Receive buffer for datagrams (the largest UDP payload, plus one byte so
    /// that a larger one shows as MSG_TRUNC).
    dgram: Vec<u8>,
    shutting_down: bool,
}

/// Runs a worker on the calling thread until [`Command::Shutdown`].
pub(crate) fn run(ctx: WorkerCtx, ready: SyncSender<io::Result<()>>) {
    super::serve(Worker::new(ctx), ready, |mut w| w.run());
}

fn errno_of(e: nix::Error) -> i32 {
    e as i32
}

impl Worker {
    fn new(ctx: WorkerCtx) -> io::Result<Worker> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        ep.add(
            ctx.wake.as_fd(),
            EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
                token(K_WAKE, Key { idx: 0, gen: 0 }),
            ),
        )
        .map_err(io::Error::from)?;
        Ok(Worker {
            ep,
            ctx,
            listeners: Slab::default(),
            by_id: Default::default(),
            many_by_id: Default::default(),
            conns: Slab::default(),
            scratch: vec![0; SCRATCH],
            ready: VecDeque::new(),
            ready_listeners: VecDeque::new(),
            paused: Vec::new(),
            parked: Vec::new(),
            send_retries: Vec::new(),
            timers: Timers::default(),
            udp: UdpState::default(),
            udp_by_id: Default::default(),
            udp_ready: VecDeque::new(),
            dgram: vec![0; crate::config::MAX_DATAGRAM_BYTES + 1],
            shutting_down: false,
        })
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let busy = !self.ready.is_empty()
                || !self.ready_listeners.is_empty()
                || !self.udp_ready.is_empty();
            let timeout = if busy {
                EpollTimeout::ZERO
            } else {
                let t = self.pause_timeout();
                let now = Instant::now();
                let t = match self.next_send_retry() {
                    Some(r) => {
                        let ms = (r.saturating_duration_since(now).as_millis().min(1000) as u16)
                            .saturating_add(1);
                        if t == EpollTimeout::NONE || EpollTimeout::from(ms) < t {
                            EpollTimeout::from(ms)
                        } else {
                            t
                        }
                    }
                    None => t,
                };
                let next = match (self.timers.next_wait(now), self.udp.next_wait(now)) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                match next {
                    Some(d) => {
                        let ms = (d.as_millis().min(1000) as u16).saturating_add(1);
                        if t == EpollTimeout::NONE || EpollTimeout::from(ms) < t {
                            EpollTimeout::from(ms)
                        } else {
                            t
                        }
                    }
                    None => t,
                }
            };
            let n = match self.ep.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => 0,
                Err(e) => {
                    tracing::error!(worker = self.ctx.index, error = %e, "epoll_wait failed; worker stops");
                    return;
                }
            };
            self.ctx.stats.completed.fetch_add(n as u64, Relaxed);
            for ev in &events[..n] {
                let (kind, k) = untoken(ev.data());
                let f = ev.events();
                match kind {
                    K_WAKE => {
                        drain_eventfd(self.ctx.wake.as_raw_fd());
                        self.commands();
                        self.peeled();
                    }
                    K_LISTENER => self.accept(k),
                    K_UDP_LISTENER | K_UDP_UPSTREAM => self.udp_drain(kind, k),
                    K_CLIENT | K_UPSTREAM => {
                        let side = if kind == K_CLIENT {
                            Side::Client
                        } else {
                            Side::Upstream
                        };
                        if let Some(c) = self.conns.get_mut(k) {
                            let hup = EpollFlags::EPOLLRDHUP
                                | EpollFlags::EPOLLHUP
                                | EpollFlags::EPOLLERR;
                            c.hup[side.index()] |= f.intersects(hup);
                            let r = &mut c.ready[side.index()];
                            if f.intersects(EpollFlags::EPOLLIN | hup) {
                                r.0 = true;
                            }
                            if f.intersects(
                                EpollFlags::EPOLLOUT | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR,
                            ) {
                                r.1 = true;
                            }
                            if side == Side::Upstream && c.conn.legs[1].connecting && r.1 {
                                finish_connect(c);
                            }
                            self.drive(k);
                        }
                    }
                    _ => {}
                }
            }
            if self.shutting_down {
                return;
            }
            self.unpause();
            let now = Instant::now();
            for k in self.timers.expired(now, &mut self.conns, |c| &mut c.conn) {
                if let Some(c) = self.conns.get_mut(k) {
                    c.conn.complete(Side::Client, Completion::Timeout);
                }
                self.drive(k);
            }
            for uk in self.udp.sweep(now) {
                // Dropping the socket takes it out of the epoll set.
                self.udp.upstreams.remove(uk);
            }
            for _ in 0..self.udp_ready.len() {
                if let Some((kind, k)) = self.udp_ready.pop_front() {
                    self.udp_drain(kind, k);
                }
            }
            for k in std::mem::take(&mut self.parked) {
                if let Some(c) = self.conns.get_mut(k) {
                    c.conn.unpark();
                }
                self.drive(k);
            }
            self.due_send_retries();
            for _ in 0..self.ready_listeners.len() {
                if let Some(k) = self.ready_listeners.pop_front() {
                    self.accept(k);
                }
            }
            for _ in 0..self.ready.len() {
                if let Some(k) = self.ready.pop_front() {
                    self.drive(k);
                }
            }
        }
    }

    /// The earliest time an SCTP send is to be tried again, if any.
    fn next_send_retry(&mut self) -> Option<Instant> {
        let conns = &mut self.conns;
        self.send_retries
            .iter()
            .filter_map(|&k| conns.get_mut(k).and_then(|c| c.retry_at))
            .min()
    }

    /// Tries again the SCTP sends whose back-off has passed.
    fn due_send_retries(&mut self) {
        if self.send_retries.is_empty() {
            return;
        }
        let now = Instant::now();
        for k in std::mem::take(&mut self.send_retries) {
            let Some(c) = self.conns.get_mut(k) else {
                continue;
            };
            match c.retry_at {
                Some(t) if t > now => self.send_retries.push(k),
                _ => {
                    c.retry_at = None;
                    c.retry_listed = false;
                    for r in &mut c.ready {
                        r.1 = true;
                    }
                    self.drive(k);
                }
            }
        }
    }

    /// How long until the earliest paused listener may accept again.
    fn pause_timeout(&self) -> EpollTimeout {
        match self.paused.iter().map(|&(t, _)| t).min() {
            None => EpollTimeout::NONE,
            Some(t) => {
                let wait = t.saturating_duration_since(Instant::now());
                EpollTimeout::from(wait.as_millis().min(1000) as u16 + 1)
            }
        }
    }

    /// Listeners whose accept pause is over accept again. Only paused listeners
    /// are looked at, so a loop turn costs nothing per listener.
    fn unpause(&mut self) {
        if self.paused.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut still = Vec::new();
        for (t, k) in std::mem::take(&mut self.paused) {
            if t > now {
                still.push((t, k));
            } else if let Some(l) = self.listeners.get_mut(k) {
                l.paused_until = None;
                self.ready_listeners.push_back(k);
            }
        }
        self.paused = still;
    }

    fn commands(&mut self) {
        while let Ok(cmd) = self.ctx.rx.try_recv() {
            match cmd {
                Command::AddListener { id, fd, shared } if shared.proto == Proto::Udp => {
                    let name = shared.name.clone();
                    let k = self.udp.add_listener(fd, shared);
                    let Some(l) = self.udp.listeners.get_mut(k) else {
                        continue;
                    };
                    if let Err(e) = self.ep.add(
                        l.fd.as_fd(),
                        EpollEvent::new(
                            EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
                            token(K_UDP_LISTENER, k),
                        ),
                    ) {
                        tracing::error!(listener = %name, error = %e, "epoll_ctl(ADD) on udp listener failed");
                        self.udp.listeners.remove(k);
                        continue;
                    }
                    self.udp_by_id.insert(id, k);
                    self.udp_ready.push_back((K_UDP_LISTENER, k));
                }
                Command::AddListener { id, fd, shared }
                    if shared.proto == Proto::Sctp
                        && shared.sctp.style == crate::sctp::Style::OneToMany =>
                {
                    let conn = Conn::open_many(fd, shared, &self.ctx.stats);
                    if let Some(k) = self.add_conn(conn) {
                        self.many_by_id.insert(id, k);
                        self.drive(k);
                    }
                }
                Command::AddListener { id, fd, shared } => {
                    let k = self.listeners.insert(EListener {
                        fd,
                        shared,
                        paused_until: None,
                    });
                    let l = self.listeners.get_mut(k).expect("just inserted");
                    if let Err(e) = self.ep.add(
                        l.fd.as_fd(),
                        EpollEvent::new(
                            EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
                            token(K_LISTENER, k),
                        ),
                    ) {
                        tracing::error!(listener = %l.shared.name, error = %e, "epoll_ctl(ADD) on listener failed");
                        self.listeners.remove(k);
                        continue;
                    }
                    self.by_id.insert(id, k);
                    // Connections may already wait in the backlog: try at once.
                    self.ready_listeners.push_back(k);
                }
                Command::RemoveListener { id } => {
                    // Closing an fd removes it from the epoll set.
                    if let Some(k) = self.by_id.remove(&id) {
                        self.listeners.remove(k);
                    }
                    if let Some(k) = self.udp_by_id.remove(&id) {
                        for uk in self.udp.end_sessions(k) {
                            self.udp.upstreams.remove(uk);
                        }
                        self.udp.listeners.remove(k);
                    }
                    if let Some(k) = self.many_by_id.remove(&id) {
                        // Its queued replies go out, then the socket closes.
                        if let Some(c) = self.conns.get_mut(k) {
                            c.conn.io.close();
                        }
                        self.drive(k);
                    }
                }
                Command::Shutdown => {
                    self.shutting_down = true;
                    self.by_id.clear();
                    self.many_by_id.clear();
                    for k in self.listeners.keys() {
                        self.listeners.remove(k);
                    }
                    for k in self.conns.keys() {
                        self.conns.remove(k);
                    }
                    self.udp = UdpState::default();
                    self.udp_by_id.clear();
                }
            }
        }
    }

    fn accept(&mut self, k: Key) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        if l.paused_until.is_some() {
            return;
        }
        let lfd = l.fd.as_raw_fd();
        for _ in 0..ACCEPT_BUDGET {
            self.ctx.stats.submitted.fetch_add(1, Relaxed);
            // SAFETY: accept4 on our listening fd with null address pointers.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if errno == libc::EAGAIN {
                    return;
                }
                let Some(l) = self.listeners.get_mut(k) else {
                    return;
                };
                if accept_error_pauses(errno) {
                    l.shared.stats.accept_errors.fetch_add(1, Relaxed);
                    tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno),
                        "accept failed; pausing {ACCEPT_PAUSE_MS} ms");
                    let until = Instant::now() + Duration::from_millis(ACCEPT_PAUSE_MS);
                    l.paused_until = Some(until);
                    self.paused.push((until, k));
                    return;
                }
                if !accept_error_benign(errno) {
                    l.shared.stats.accept_errors.fetch_add(1, Relaxed);
                    tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno), "accept failed");
                }
                continue;
            }
            // SAFETY: accept4 returned a new fd that nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let shared = match self.listeners.get_mut(k) {
                Some(l) => l.shared.clone(),
                None => return,
            };
            let conn = Conn::open(fd, shared, &self.ctx.stats);
            if let Some(ck) = self.add_conn(conn) {
                self.drive(ck);
            }
        }
        // Budget spent: more may be waiting; continue next turn.
        self.ready_listeners.push_back(k);
    }

    /// Adds a session (accepted, or a one-to-many socket) and
    /// registers its client socket; `None` (session dropped) if that fails.
    fn add_conn(&mut self, conn: Conn) -> Option<Key> {
        let ck = self.conns.insert(EConn {
            conn,
            ready: [(true, true), (false, false)],
            hup: [false; 2],
            retry_at: None,
            retry_listed: false,
        });
        let c = self.conns.get_mut(ck)?;
        let fd = c.conn.legs[0].fd.as_ref()?;
        if let Err(e) = register(&self.ep, fd, K_CLIENT, ck) {
            tracing::warn!(error = %e, "epoll_ctl(ADD) on connection failed; closing it");
            self.conns.remove(ck);
            return None;
        }
        Some(ck)
    }

    /// Starts sessions for the associations the binder peeled off (one-to-many
    /// proxy) and lets their one-to-many sockets be read again.
    fn peeled(&mut self) {
        for (k, new) in self.ctx.finish_peel_offs(&mut self.conns, |c| &mut c.conn) {
            if let Some(conn) = new {
                if let Some(nk) = self.add_conn(conn) {
                    self.drive(nk);
                }
            }
            self.drive(k);
        }
    }

    /// Reads the datagrams waiting on a UDP listener or upstream socket (up to
    /// [`UDP_BUDGET`], then yields) and hands them to the shared UDP logic.
    fn udp_drain(&mut self, kind: u8, k: Key) {
        for _ in 0..UDP_BUDGET {
            let fd = if kind == K_UDP_LISTENER {
                self.udp.listeners.get_mut(k).map(|l| l.fd.as_raw_fd())
            } else {
                self.udp.upstreams.get_mut(k).map(|u| u.fd.as_raw_fd())
            };
            let Some(fd) = fd else { return };
            self.ctx.stats.submitted.fetch_add(1, Relaxed);
            match udp::recv_datagram(fd, &mut self.dgram) {
                Ok((n, truncated, from, to)) => {
                    let d = Datagram {
                        data: &self.dgram[..n],
                        from,
                        to,
                        truncated,
                    };
                    let now = Instant::now();
                    if kind == K_UDP_LISTENER {
                        if let After::Watch(uk) =
                            self.udp.on_listener_datagram(k, &d, &self.ctx.wake, now)
                        {
                            self.udp_watch(uk);
                        }
                    } else {
                        self.udp.on_upstream_datagram(k, &d, now);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    if kind == K_UDP_UPSTREAM {
                        self.udp
                            .on_upstream_error(k, e.raw_os_error().unwrap_or(libc::EIO));
                    }
                }
            }
        }
        self.udp_ready.push_back((kind, k));
    }

    /// Registers a new UDP session's upstream socket.
    fn udp_watch(&mut self, uk: Key) {
        let Some(u) = self.udp.upstreams.get_mut(uk) else {
            return;
        };
        if self
            .ep
            .add(
                u.fd.as_fd(),
                EpollEvent::new(
                    EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
                    token(K_UDP_UPSTREAM, uk),
                ),
            )
            .is_err()
        {
            tracing::warn!("epoll_ctl(ADD) on a udp upstream socket failed");
        }
    }

    /// Runs session `k`'s requested operations until they would block, the budget
    /// is spent, or it closes.
    fn drive(&mut self, k: Key) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        for _ in 0..BUDGET {
            if c.conn.finished() {
                c.conn.linger_if_aborting();
                self.conns.remove(k);
                return;
            }
            let mut progress = false;
            if c.conn.take_connect_request() {
                match c.conn.start_connect(&self.ctx.wake) {
                    ConnectStart::Go => start_connect(&self.ep, c, k),
                    ConnectStart::Wait => {
                        // Nothing else can move before the upstream socket arrives.
                        if c.conn.park() {
                            self.parked.push(k);
                        }
                        self.timers.sync(k, &mut c.conn);
                        return;
                    }
                    ConnectStart::Failed => {}
                }
                progress = true;
            }
            for side in [Side::Client, Side::Upstream] {
                let ops = if c.conn.is_message_leg(side) {
                    step_message_side(c, side, &mut self.scratch)
                } else {
                    step_side(c, side, &mut self.scratch)
                };
                if ops > 0 {
                    self.ctx.stats.submitted.fetch_add(ops as u64, Relaxed);
                    progress = true;
                }
            }
            c.conn.shutdown_drained();
            self.ctx.request_peel_offs(k, &mut c.conn);
            if c.retry_at.is_some() && !c.retry_listed {
                c.retry_listed = true;
                self.send_retries.push(k);
            }
            if !progress {
                if c.conn.finished() {
                    c.conn.linger_if_aborting();
                    self.conns.remove(k);
                } else {
                    self.timers.sync(k, &mut c.conn);
                }
                return;
            }
        }
        self.timers.sync(k, &mut c.conn);
        self.ready.push_back(k);
    }
}

/// Adds `fd` to the epoll set, edge-triggered, for reads and writes.
fn register(ep: &Epoll, fd: &OwnedFd, kind: u8, k: Key) -> nix::Result<()> {
    ep.add(
        fd.as_fd(),
        EpollEvent::new(
            EpollFlags::EPOLLIN
                | EpollFlags::EPOLLOUT
                | EpollFlags::EPOLLRDHUP
                | EpollFlags::EPOLLET,
            token(kind, k),
        ),
    )
}

/// Registers the upstream socket and starts a non-blocking connect; completes the
/// session at once when the connect finished or failed synchronously.
fn start_connect(ep: &Epoll, c: &mut EConn, k: Key) {
    let leg = &c.conn.legs[1];
    let (Some(fd), Some(dest)) = (&leg.fd, &leg.dest) else {
        return;
    };
    if let Err(e) = register(ep, fd, K_UPSTREAM, k) {
        c.conn
            .complete(Side::Upstream, Completion::Error(errno_of(e)));
        return;
    }
    match socket2::SockRef::from(fd).connect(dest) {
        Ok(()) => {
            c.ready[1] = (true, true);
            c.conn.complete(Side::Upstream, Completion::Connected);
        }
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => c.ready[1] = (false, false),
        Err(e) => c.conn.complete(
            Side::Upstream,
            Completion::Error(e.raw_os_error().unwrap_or(libc::EIO)),
        ),
    }
}

/// The upstream socket became writable while connecting: read SO_ERROR.
fn finish_connect(c: &mut EConn) {
    let Some(fd) = &c.conn.legs[1].fd else {
        return;
    };
    match socket2::SockRef::from(fd).take_error() {
        Ok(None) => c.conn.complete(Side::Upstream, Completion::Connected),
        Ok(Some(e)) | Err(e) => c.conn.complete(
            Side::Upstream,
            Completion::Error(e.raw_os_error().unwrap_or(libc::EIO)),
        ),
    }
}

/// One message sent and one piece received on SCTP leg `side` if wanted and
/// possible; returns the syscalls made (0: nothing could progress). A short read
/// ends a message, not the socket's queue, so only EAGAIN clears readability.
fn step_message_side(c: &mut EConn, side: Side, scratch: &mut [u8]) -> usize {
    let i = side.index();
    let Some(fd) = c.conn.legs[i].raw() else {
        return 0;
    };
    let mut ops = 0;
    if c.ready[i].1 {
        let r = c.conn.with_next_message(side, |data, info, flags, space| {
            crate::sctp::send(fd, data, info, flags, space)
        });
        if let Some(r) = r {
            ops += 1;
            match r {
                Ok(_) => c.conn.message_sent(side),
                Err(e) => match e.raw_os_error().unwrap_or(libc::EAGAIN) {
                    libc::EAGAIN => {
                        let wait = c.conn.send_would_block(side);
                        if wait.is_zero() {
                            // The queue changed (a stalled association was
                            // aborted): the next send can go now.
                        } else {
                            c.ready[i].1 = false;
                            c.retry_at = Some(Instant::now() + wait);
                            ops -= 1;
                        }
                    }
                    libc::EINTR => {}
                    errno => {
                        c.conn.send_failed(side, errno);
                        if c.conn.finished() {
                            return ops;
                        }
                    }
                },
            }
        }
    }
    c.conn.shutdown_drained();
    if c.ready[i].0 && c.conn.wants_recv(side) {
        ops += 1;
        let Some(space) = c.conn.legs[i].recv_hdr.as_mut() else {
            return ops;
        };
        match crate::sctp::recv(fd, scratch, space) {
            Ok((n, flags, info)) => {
                c.conn.take_recv_request(side);
                c.conn.complete_message(side, &scratch[..n], flags, info);
            }
            Err(e) => match e.raw_os_error().unwrap_or(libc::EIO) {
                libc::EAGAIN => {
                    c.ready[i].0 = false;
                    ops -= 1;
                }
                libc::EINTR => {}
                errno => {
                    c.conn.take_recv_request(side);
                    c.conn.complete(side, Completion::Error(errno));
                }
            },
        }
    }
    ops
}

/// One send and one receive on `side` if wanted and possible; returns the
/// syscalls made (0: nothing could progress).
fn step_side(c: &mut EConn, side: Side, scratch: &mut [u8]) -> usize {
    let i = side.index();
    let Some(fd) = c.conn.legs[i].raw() else {
        return 0;
    };
    let mut ops = 0;
    if c.ready[i].1 {
        if let Some(buf) = c.conn.next_send(side) {
            ops += 1;
            match nix::sys::socket::send(fd, buf, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => c.conn.sent(side, n),
                Err(nix::Error::EAGAIN) => {
                    c.ready[i].1 = false;
                    ops -= 1;
                }
                Err(nix::Error::EINTR) => {}
                Err(e) => {
                    c.conn.complete(side, Completion::Error(errno_of(e)));
                    return ops;
                }
            }
        }
    }
    c.conn.shutdown_drained();
    if c.ready[i].0 && c.conn.wants_recv(side) {
        ops += 1;
        match nix::sys::socket::recv(fd, scratch, MsgFlags::empty()) {
            Ok(0) => {
                c.conn.take_recv_request(side);
                c.conn.complete(side, Completion::Eof);
            }
            Ok(n) => {
                // A short read drained the socket (as nginx assumes): the next
                // edge says when more arrives, so skip the recv that would only
                // return EAGAIN. Not after a FIN or error, which has no new edge.
                if n < scratch.len() && !c.hup[i] {
                    c.ready[i].0 = false;
                }
                c.conn.take_recv_request(side);
                c.conn.complete(side, Completion::Recv(&scratch[..n]));
            }
            Err(nix::Error::EAGAIN) => {
                c.ready[i].0 = false;
                ops -= 1;
            }
            Err(nix::Error::EINTR) => {}
            Err(e) => {
                c.conn.take_recv_request(side);
                c.conn.complete(side, Completion::Error(errno_of(e)));
            }
        }
    }
    ops
}
