//! The epoll backend: one epoll instance per worker, edge-triggered.
//!
//! It performs the worker's [`Op`]s with non-blocking syscalls and reports the
//! same [`Event`]s as the io_uring backend. Every operation tries its syscall
//! first and waits for readiness only after EAGAIN (as mio does): a socket is
//! registered once, for `EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET`, and the
//! backend remembers whether it was last seen readable and writable. An operation
//! on a socket known to be ready runs inside [`Backend::submit`], so a session's
//! next step runs in the same turn.
//!
//! Fairness: one socket runs at most [`BUDGET`] operations per turn (one
//! [`Backend::wait`]); the rest wait in a run queue for the next turn, so that a
//! fast sender cannot starve the others. A multishot accept takes [`CHUNK`]
//! connections per run and at most [`ACCEPT_BUDGET`] per turn (the worker starts
//! each chunk's sessions before the next chunk); a datagram receive takes at most
//! [`DATAGRAM_BUDGET`] per run.
//!
//! Receive buffers come from two free lists (stream pieces of [`RECV_BUF_SIZE`],
//! datagrams of the largest UDP payload plus one byte), grown on demand up to
//! the io_uring rings' counts: the worker returns every buffer after handling its
//! event, so they stay few; when all are lent a receive ends with ENOBUFS, the
//! same back-pressure as an empty provided-buffer ring.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::backend::{Backend, BufRef, Caps, Event, Meta, MultiKind, Op, OpId, Owned, SpliceSock};
use super::slab::{Key, Slab};
use super::udp;

/// Operations one socket may run per turn before yielding (count).
pub const BUDGET: usize = 16;
/// Connections one listener may accept per turn before yielding (count).
pub const ACCEPT_BUDGET: usize = 64;
/// Datagrams one socket may take per run before yielding (count).
pub const DATAGRAM_BUDGET: usize = 64;
/// Queued operations run before the worker handles their events (count).
pub const CHUNK: usize = 8;
/// Size of each stream receive buffer (bytes), as the io_uring buffers.
pub const RECV_BUF_SIZE: usize = 16 * 1024;
/// Most stream receive buffers lent at once (count), as the io_uring ring's.
pub const RECV_BUF_COUNT: u16 = 256;
/// Most datagram buffers lent at once (count), as the io_uring ring's.
pub const DATAGRAM_BUF_COUNT: u16 = 64;

const GROUP_STREAM: u16 = 0;
const GROUP_DATAGRAM: u16 = 1;

/// What the backend knows of one registered socket.
#[derive(Debug)]
struct FdState {
    readable: bool,
    writable: bool,
    /// The peer's FIN or an error was signalled (EPOLLRDHUP/HUP/ERR): a short
    /// read then does not mean the socket is drained (no new edge will come).
    hup: bool,
    /// The operation waiting for the socket to become readable.
    reader: Option<Key>,
    /// The operation waiting for the socket to become writable.
    writer: Option<Key>,
    /// The turn `ran` counts for.
    turn: u64,
    /// Operations run on this socket in `turn`.
    ran: usize,
}

/// Registered sockets by fd number (a process's fds are small integers, so a
/// vector indexed by fd is the cheapest map).
#[derive(Debug, Default)]
struct FdTable {
    slots: Vec<Option<FdState>>,
}

impl FdTable {
    fn get_mut(&mut self, fd: &RawFd) -> Option<&mut FdState> {
        self.slots.get_mut(usize::try_from(*fd).ok()?)?.as_mut()
    }

    fn contains_key(&self, fd: &RawFd) -> bool {
        usize::try_from(*fd)
            .ok()
            .and_then(|i| self.slots.get(i))
            .is_some_and(Option::is_some)
    }

    fn insert(&mut self, fd: RawFd, st: FdState) {
        let Ok(i) = usize::try_from(fd) else {
            return;
        };
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        self.slots[i] = Some(st);
    }

    fn remove(&mut self, fd: &RawFd) -> Option<FdState> {
        self.slots.get_mut(usize::try_from(*fd).ok()?)?.take()
    }
}

/// One operation in flight.
#[derive(Debug)]
struct EOp {
    token: u64,
    op: Op,
    /// A connect is in progress (EINPROGRESS).
    connecting: bool,
}

/// A free list of equal buffers, grown on demand up to a cap.
#[derive(Debug, Default)]
struct Pool {
    bufs: Vec<Box<[u8]>>,
    free: Vec<u16>,
    size: usize,
    max: u16,
}

impl Pool {
    fn new(size: usize, max: u16) -> Pool {
        Pool {
            bufs: Vec::new(),
            free: Vec::new(),
            size,
            max,
        }
    }

    /// A free buffer's id (a new one while fewer than `max` exist); `None` when
    /// all are lent (back-pressure, reported as ENOBUFS as io_uring does).
    fn take(&mut self) -> Option<u16> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        let id = u16::try_from(self.bufs.len())
            .ok()
            .filter(|&n| n < self.max)?;
        self.bufs.push(vec![0; self.size].into_boxed_slice());
        Some(id)
    }
}

/// The epoll backend of one worker.
pub struct EpollBackend {
    ep: Epoll,
    ops: Slab<EOp>,
    fds: FdTable,
    /// Operations to run in the next turn.
    run: VecDeque<Key>,
    /// Events ready to be reported.
    done: Vec<Event>,
    pools: [Pool; 2],
    turn: u64,
    /// Operations at the front of `run` that belong to this turn, not run yet.
    turn_left: usize,
    events: Vec<EpollEvent>,
}

impl EpollBackend {
    /// A backend with a new epoll instance.
    ///
    /// # Errors
    /// epoll_create1(2) failed (EMFILE, ENOMEM).
    pub fn new() -> io::Result<EpollBackend> {
        Ok(EpollBackend {
            ep: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?,
            ops: Slab::default(),
            fds: FdTable::default(),
            run: VecDeque::new(),
            done: Vec::new(),
            pools: [
                Pool::new(RECV_BUF_SIZE, RECV_BUF_COUNT),
                Pool::new(crate::config::MAX_DATAGRAM_BYTES + 1, DATAGRAM_BUF_COUNT),
            ],
            turn: 0,
            turn_left: 0,
            events: vec![EpollEvent::empty(); 256],
        })
    }

    /// Registers `fd` (once) for every readiness, edge-triggered.
    fn register(&mut self, fd: RawFd) -> io::Result<()> {
        if self.fds.contains_key(&fd) {
            return Ok(());
        }
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        // SAFETY: the worker keeps `fd` open while an operation on it is in flight
        // and closes it through `Backend::close`, which removes it from the set.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        self.ep
            .add(bfd, EpollEvent::new(flags, fd as u64))
            .map_err(io::Error::from)?;
        self.fds.insert(
            fd,
            FdState {
                readable: true,
                writable: true,
                hup: false,
                reader: None,
                writer: None,
                turn: 0,
                ran: 0,
            },
        );
        Ok(())
    }

    /// Ends operation `k` with `res`: its memory goes back in the event.
    fn finish(&mut self, k: Key, res: i32, buf: Option<BufRef>, meta: Meta) {
        let Some(o) = self.ops.remove(k) else {
            return;
        };
        let fd = o.op.fd();
        if let Some(st) = self.fds.get_mut(&fd) {
            if st.reader == Some(k) {
                st.reader = None;
            }
            if st.writer == Some(k) {
                st.writer = None;
            }
        }
        self.done.push(Event {
            token: o.token,
            res,
            more: false,
            buf,
            meta,
            owned: o.op.into_owned(),
        });
    }

    /// Reports one shot of multishot operation `k`.
    fn shot(&mut self, k: Key, res: i32, buf: Option<BufRef>, meta: Meta) {
        if let Some(o) = self.ops.get(k) {
            self.done.push(Event {
                token: o.token,
                res,
                more: true,
                buf,
                meta,
                owned: Owned::None,
            });
        }
    }

    /// Runs operation `k` now if its socket's budget for this turn allows, else
    /// queues it for the next turn.
    fn try_run(&mut self, k: Key) {
        let Some(o) = self.ops.get(k) else {
            return;
        };
        let fd = o.op.fd();
        let turn = self.turn;
        if let Some(st) = self.fds.get_mut(&fd) {
            if st.turn != turn {
                st.turn = turn;
                st.ran = 0;
            }
            if st.ran >= BUDGET {
                self.run.push_back(k);
                return;
            }
            st.ran += 1;
        }
        self.exec(k);
    }

    /// Runs this turn's queued operations until some have ended or none is left,
    /// at most [`CHUNK`] at a time: the worker handles (and gives back the
    /// buffers of) each chunk before the next runs, so a turn with many ready
    /// sockets reuses a few cache-warm buffers instead of lending one per socket.
    fn run_chunk(&mut self) {
        while self.turn_left > 0 && self.done.is_empty() {
            for _ in 0..self.turn_left.min(CHUNK) {
                self.turn_left -= 1;
                if let Some(k) = self.run.pop_front() {
                    self.try_run(k);
                }
            }
        }
    }

    /// Parks operation `k` until its socket becomes readable (`read`) or writable.
    fn park(&mut self, k: Key, fd: RawFd, read: bool) {
        if let Some(st) = self.fds.get_mut(&fd) {
            if read {
                st.reader = Some(k);
            } else {
                st.writer = Some(k);
            }
        }
    }

    /// Performs operation `k` (see [`Op`] for what each reports).
    fn exec(&mut self, k: Key) {
        let Some(o) = self.ops.get_mut(k) else {
            return;
        };
        let fd = o.op.fd();
        let Some(st) = self.fds.get_mut(&fd) else {
            self.finish(k, -libc::EBADF, None, Meta::None);
            return;
        };
        let (readable, writable, hup) = (st.readable, st.writable, st.hup);
        match &mut o.op {
            Op::Accept { multishot, .. } => {
                let multishot = *multishot;
                self.exec_accept(k, fd, readable, multishot)
            }
            Op::PollIn { .. } => {
                if readable {
                    if let Some(st) = self.fds.get_mut(&fd) {
                        st.readable = false;
                    }
                    self.shot(k, 0, None, Meta::None);
                }
                self.park(k, fd, true);
            }
            Op::Recv { .. } => {
                if !readable {
                    return self.park(k, fd, true);
                }
                let Some(id) = self.pools[0].take() else {
                    return self.finish(k, -libc::ENOBUFS, None, Meta::None);
                };
                let buf = &mut self.pools[0].bufs[usize::from(id)];
                match nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::empty()) {
                    Ok(n) => {
                        // A short read drained the socket (as nginx assumes): the
                        // next edge says when more arrives. Not after a FIN or an
                        // error, which has no new edge.
                        if n < buf.len() && !hup {
                            self.set_readable(fd, false);
                        }
                        let b = (n > 0).then_some(buf_ref(GROUP_STREAM, id, 0, n));
                        if b.is_none() {
                            self.pools[0].free.push(id);
                        }
                        self.finish(k, n as i32, b, Meta::None);
                    }
                    Err(e) => {
                        self.pools[0].free.push(id);
                        self.after_error(k, fd, e as i32, true);
                    }
                }
            }
            Op::RecvMsg { hdr, .. } => {
                if !readable {
                    return self.park(k, fd, true);
                }
                let Some(id) = self.pools[0].take() else {
                    return self.finish(k, -libc::ENOBUFS, None, Meta::None);
                };
                let buf = &mut self.pools[0].bufs[usize::from(id)];
                // A short read ends a message, not the socket's queue: only EAGAIN
                // clears readability.
                match crate::sctp::recv(fd, buf, hdr) {
                    Ok((n, flags, info)) => {
                        let b = (n > 0).then_some(buf_ref(GROUP_STREAM, id, 0, n));
                        if b.is_none() {
                            self.pools[0].free.push(id);
                        }
                        self.finish(k, n as i32, b, Meta::Message { flags, info });
                    }
                    Err(e) => {
                        self.pools[0].free.push(id);
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        self.after_error(k, fd, errno, true);
                    }
                }
            }
            Op::RecvMulti { kind, .. } => {
                let kind = *kind;
                self.exec_recv_multi(k, fd, kind, readable);
            }
            Op::Send { buf, off, .. } => {
                if !writable {
                    return self.park(k, fd, false);
                }
                let r = nix::sys::socket::send(
                    fd,
                    &buf[*off..],
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                );
                match r {
                    Ok(n) => self.finish(k, n as i32, None, Meta::None),
                    Err(e) => self.after_error(k, fd, e as i32, false),
                }
            }
            Op::SendMsg { msg, hdr, .. } => {
                // A message goes whole and "writable" only means "some room": a
                // send that finds no room ends with EAGAIN (the worker backs off)
                // instead of waiting for an edge that may not mean enough room.
                let r = crate::sctp::send(fd, &msg.data, msg.info, msg.flags, hdr);
                match r {
                    Ok(n) => self.finish(k, n as i32, None, Meta::None),
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        if errno == libc::EINTR {
                            self.run.push_back(k);
                        } else {
                            self.finish(k, -errno, None, Meta::None);
                        }
                    }
                }
            }
            Op::Splice {
                fd_in,
                fd_out,
                len,
                sock,
                poll_first,
            } => {
                let (fd_in, fd_out, len, poll_first) = (*fd_in, *fd_out, *len, *poll_first);
                let out = *sock == SpliceSock::Out;
                let ready = if out { writable } else { readable };
                if poll_first && !ready {
                    return self.park(k, fd, !out);
                }
                // The worker keeps both fds open until this operation's event.
                let errno = match super::pipe::splice_nonblock(fd_in, fd_out, len) {
                    Ok(n) => return self.finish(k, n, None, Meta::None),
                    Err(errno) => errno,
                };
                // Pipe → socket: EAGAIN is the socket's (the pipe holds what
                // the worker counted). Socket → pipe: the pipe may be full
                // instead, unless the worker asked to wait for the socket
                // (it does so only with an empty pipe); then it is the
                // worker's call.
                if errno == libc::EAGAIN && !(out || poll_first) {
                    return self.finish(k, -libc::EAGAIN, None, Meta::None);
                }
                self.after_error(k, fd, errno, !out);
            }
            Op::Connect { addr, .. } => {
                if o.connecting {
                    if !writable {
                        return self.park(k, fd, false);
                    }
                    // SAFETY: `fd` is the open socket of this operation.
                    let s = unsafe { BorrowedFd::borrow_raw(fd) };
                    let res = match socket2::SockRef::from(&s).take_error() {
                        Ok(None) => 0,
                        Ok(Some(e)) | Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    };
                    return self.finish(k, res, None, Meta::None);
                }
                // SAFETY: as above.
                let s = unsafe { BorrowedFd::borrow_raw(fd) };
                match socket2::SockRef::from(&s).connect(addr) {
                    Ok(()) => self.finish(k, 0, None, Meta::None),
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                        o.connecting = true;
                        // Nothing can be read before the connection is up, and
                        // its completion is the writable edge.
                        if let Some(st) = self.fds.get_mut(&fd) {
                            st.writable = false;
                            st.readable = false;
                        }
                        self.park(k, fd, false);
                    }
                    Err(e) => {
                        self.finish(k, -e.raw_os_error().unwrap_or(libc::EIO), None, Meta::None)
                    }
                }
            }
        }
    }

    fn set_readable(&mut self, fd: RawFd, v: bool) {
        if let Some(st) = self.fds.get_mut(&fd) {
            st.readable = v;
        }
    }

    /// A single-shot receive or send failed with `errno`: EAGAIN parks it until
    /// the socket is ready again, EINTR runs it again, anything else ends it.
    fn after_error(&mut self, k: Key, fd: RawFd, errno: i32, read: bool) {
        match errno {
            libc::EAGAIN => {
                if let Some(st) = self.fds.get_mut(&fd) {
                    if read {
                        st.readable = false;
                    } else {
                        st.writable = false;
                    }
                }
                self.park(k, fd, read);
            }
            libc::EINTR => self.run.push_back(k),
            _ => self.finish(k, -errno, None, Meta::None),
        }
    }

    fn exec_accept(&mut self, k: Key, fd: RawFd, readable: bool, multishot: bool) {
        if !readable {
            return self.park(k, fd, true);
        }
        for _ in 0..if multishot { CHUNK } else { 1 } {
            // SAFETY: accept4 on a listening fd the worker keeps open, with null
            // address pointers.
            let n = unsafe {
                libc::accept4(
                    fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if n >= 0 && !multishot {
                return self.finish(k, n, None, Meta::None);
            }
            if n >= 0 {
                self.shot(k, n, None, Meta::None);
                continue;
            }
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno == libc::EAGAIN {
                self.set_readable(fd, false);
                return self.park(k, fd, true);
            }
            if super::accept_error_pauses(errno) || !multishot {
                // The op ends; the worker pauses (or asks again) and starts a new one.
                return self.finish(k, -errno, None, Meta::None);
            }
            self.shot(k, -errno, None, Meta::None);
        }
        // A chunk accepted: the worker starts those sessions before the next
        // chunk (accepts and their connects interleave); past ACCEPT_BUDGET in
        // this turn, more may be waiting: go on next turn.
        let ran = self.fds.get_mut(&fd).map_or(usize::MAX, |st| st.ran);
        if ran < ACCEPT_BUDGET / CHUNK {
            self.run.push_front(k);
            self.turn_left += 1;
        } else {
            self.run.push_back(k);
        }
    }

    fn exec_recv_multi(&mut self, k: Key, fd: RawFd, kind: MultiKind, readable: bool) {
        if !readable {
            return self.park(k, fd, true);
        }
        let g = match kind {
            MultiKind::Datagram => GROUP_DATAGRAM,
            MultiKind::SctpMany | MultiKind::Stream { .. } => GROUP_STREAM,
        };
        for _ in 0..DATAGRAM_BUDGET {
            let pool = &mut self.pools[usize::from(g)];
            let Some(id) = pool.take() else {
                return self.finish(k, -libc::ENOBUFS, None, Meta::None);
            };
            let buf = &mut pool.bufs[usize::from(id)];
            let r = match kind {
                MultiKind::Datagram => {
                    udp::recv_datagram(fd, buf).map(|(n, truncated, from, to)| {
                        (
                            n,
                            Meta::Datagram {
                                from,
                                to,
                                truncated,
                            },
                        )
                    })
                }
                MultiKind::SctpMany => {
                    let mut hdr = crate::sctp::RecvHeader::new();
                    crate::sctp::recv(fd, buf, &mut hdr)
                        .map(|(n, flags, info)| (n, Meta::Message { flags, info }))
                }
                MultiKind::Stream { .. } => {
                    nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::empty())
                        .map(|n| (n, Meta::None))
                        .map_err(|e| io::Error::from_raw_os_error(e as i32))
                }
            };
            match r {
                Ok((0, _)) if matches!(kind, MultiKind::Stream { .. }) => {
                    // End of stream ends the receive.
                    self.pools[usize::from(g)].free.push(id);
                    return self.finish(k, 0, None, Meta::None);
                }
                Ok((n, meta)) => {
                    let b = buf_ref(g, id, 0, n);
                    self.shot(k, n as i32, Some(b), meta);
                }
                Err(e) => {
                    self.pools[usize::from(g)].free.push(id);
                    match e.raw_os_error().unwrap_or(libc::EIO) {
                        libc::EAGAIN => {
                            self.set_readable(fd, false);
                            return self.park(k, fd, true);
                        }
                        libc::EINTR => {}
                        // A stream's error ends it.
                        errno if matches!(kind, MultiKind::Stream { .. }) => {
                            return self.finish(k, -errno, None, Meta::None)
                        }
                        // An ICMP error on a connected UDP socket: reported, the
                        // receive goes on.
                        errno => self.shot(k, -errno, None, Meta::None),
                    }
                }
            }
        }
        self.run.push_back(k);
    }
}

fn buf_ref(group: u16, id: u16, off: usize, len: usize) -> BufRef {
    BufRef {
        group,
        id,
        off: off as u32,
        len: len as u32,
    }
}

fn key_of(id: OpId) -> Key {
    Key {
        idx: id.0 as u32,
        gen: (id.0 >> 32) as u32,
    }
}

impl Backend for EpollBackend {
    fn caps(&self) -> Caps {
        Caps {
            multishot_sctp: false,
            multishot_recv: false,
            multishot_recv_limit: false,
            recv_buf_size: RECV_BUF_SIZE,
            splice: true,
        }
    }

    fn submit(&mut self, token: u64, op: Op) -> OpId {
        let fd = op.fd();
        let reg = self.register(fd);
        let k = self.ops.insert(EOp {
            token,
            op,
            connecting: false,
        });
        match reg {
            Ok(()) => self.try_run(k),
            Err(e) => self.finish(k, -e.raw_os_error().unwrap_or(libc::EIO), None, Meta::None),
        }
        OpId(u64::from(k.gen) << 32 | u64::from(k.idx))
    }

    fn cancel(&mut self, id: OpId) {
        let k = key_of(id);
        if self.ops.get(k).is_some() {
            self.finish(k, -libc::ECANCELED, None, Meta::None);
        }
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        self.turn += 1;
        let busy = !self.done.is_empty() || !self.run.is_empty();
        let t = match (busy, timeout) {
            (true, _) => EpollTimeout::ZERO,
            (false, None) => EpollTimeout::NONE,
            // Round up, so that a timer is never woken for early.
            (false, Some(d)) => {
                EpollTimeout::try_from(d + Duration::from_micros(999)).unwrap_or(EpollTimeout::MAX)
            }
        };
        let n = match self.ep.wait(&mut self.events, t) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let hup = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
        for i in 0..n {
            let ev = self.events[i];
            let f = ev.events();
            let Some(st) = self.fds.get_mut(&(ev.data() as RawFd)) else {
                continue;
            };
            st.hup |= f.intersects(hup);
            if f.intersects(EpollFlags::EPOLLIN | hup) {
                st.readable = true;
                if let Some(r) = st.reader.take() {
                    self.run.push_back(r);
                }
            }
            if f.intersects(EpollFlags::EPOLLOUT | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                st.writable = true;
                if let Some(w) = st.writer.take() {
                    self.run.push_back(w);
                }
            }
        }
        self.turn_left = self.run.len();
        self.run_chunk();
        out.append(&mut self.done);
        Ok(())
    }

    fn ready(&mut self, out: &mut Vec<Event>) {
        self.run_chunk();
        out.append(&mut self.done);
    }

    fn data(&self, b: BufRef) -> &[u8] {
        let buf = &self.pools[usize::from(b.group)].bufs[usize::from(b.id)];
        &buf[b.off as usize..(b.off + b.len) as usize]
    }

    fn release(&mut self, b: BufRef) {
        self.pools[usize::from(b.group)].free.push(b.id);
    }

    fn forget(&mut self, fd: RawFd) {
        if self.fds.remove(&fd).is_some() {
            // SAFETY: another worker holds `fd` open until it lets the shared
            // socket go, which it does not before this call returns.
            let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Err(e) = self.ep.delete(bfd) {
                tracing::debug!(fd, error = %e, "epoll: cannot take a shared socket out of the set");
            }
        }
    }

    fn close(&mut self, fd: OwnedFd) {
        // Closing the fd takes it out of the epoll set (no EPOLL_CTL_DEL: one
        // syscall less per socket). Only while a duplicate keeps the socket open
        // (a one-to-many socket with a peel-off request at the binder) may its
        // events still come, tagged with this fd number: they mark a later socket
        // of the same number ready, which costs at most one EAGAIN.
        self.fds.remove(&fd.as_raw_fd());
    }

    fn in_flight(&self) -> usize {
        self.ops.len()
    }
}
