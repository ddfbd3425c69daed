//! The io_uring driver: one ring per worker, never shared.
//!
//! - Setup flags are probed once: `SINGLE_ISSUER | DEFER_TASKRUN` (Linux 6.1),
//!   else `SINGLE_ISSUER | COOP_TASKRUN` (6.0 / 5.19), else `COOP_TASKRUN` (5.19),
//!   else none. The choice is logged once per process.
//! - Accept: `IORING_OP_ACCEPT` multishot (5.19), re-armed when a CQE lacks
//!   `IORING_CQE_F_MORE`; single-shot where the kernel rejects multishot (EINVAL).
//! - Receive: single-shot `IORING_OP_RECV` with `IOSQE_BUFFER_SELECT` from a
//!   provided-buffer ring (5.19). Single-shot, so that a session under
//!   back-pressure simply stops asking (a multishot receive keeps pulling data in
//!   until its cancel lands, which broke the per-direction window in our tests);
//!   the data is copied out and the buffer returned at once. After a short read the
//!   next receive carries `IORING_RECVSEND_POLL_FIRST` (5.19), skipping an attempt
//!   that would find the socket empty. ENOBUFS (ring empty) parks the connection until the end of
//!   the CQE batch, when buffers are back.
//! - Send: `IORING_OP_SEND` with `MSG_NOSIGNAL`; a short send re-submits the rest.
//! - The supervisor wakes the ring through an eventfd watched by a multishot
//!   `IORING_OP_POLL_ADD` (5.13).
//! - Connections with ops in flight are cancelled (`IORING_OP_ASYNC_CANCEL`) and
//!   closed only when their last CQE has arrived.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::udp::{self, After, Datagram, UdpState};
use super::{
    accept_error_benign, accept_error_pauses, drain_eventfd, token, untoken, Command, Conn,
    ConnectStart, Key, ListenerIds, ListenerShared, Slab, Timers, WorkerCtx, ACCEPT_PAUSE_MS,
};
use crate::config::Proto;
use crate::proto::{Completion, Side};
use std::sync::atomic::Ordering::Relaxed;

/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 1024;
/// Buffers in the provided-buffer ring (a power of two, at most 32768).
pub const BUF_COUNT: u16 = 256;
/// Size of each provided buffer (bytes).
pub const BUF_SIZE: usize = 16 * 1024;
/// Buffer group id of the receive buffers.
const BGID: u16 = 1;

const K_ACCEPT: u8 = 1;
const K_WAKE: u8 = 4;
const K_TIMER: u8 = 5;
const K_CANCEL: u8 = 6;
const K_CONNECT: u8 = 7;
/// Receive on side 0 (client) / 1 (upstream): `K_RECV + side`.
const K_RECV: u8 = 8;
/// Send on side 0 (client) / 1 (upstream): `K_SEND + side`.
const K_SEND: u8 = 10;
const K_RECV1: u8 = K_RECV + 1;
/// Multishot RECVMSG on a UDP listener socket.
const K_UDP_LISTENER: u8 = 12;
/// Multishot RECVMSG on a UDP session's upstream socket.
const K_UDP_UPSTREAM: u8 = 13;
/// Buffer group of the datagram buffers.
const BGID_UDP: u16 = 2;
/// Datagram buffers (a power of two).
const UDP_BUF_COUNT: u16 = 64;
/// Size of each datagram buffer: io_uring_recvmsg_out, the source address, the
/// control messages, and the largest UDP payload with a byte to spare (bytes).
const UDP_BUF_SIZE: usize = 16 + udp::NAME_SPACE + udp::CONTROL_SPACE + 65_536;
/// `IORING_RECVSEND_POLL_FIRST` (sqe->ioprio of RECV/SEND, Linux 5.19): arm the
/// poll at once instead of trying the receive first.
const RECVSEND_POLL_FIRST: u16 = 1;
const K_SEND1: u8 = K_SEND + 1;
/// The LINK_TIMEOUT bounding a send on a one-to-many socket (its CQE is ignored).
const K_STALL: u8 = 14;

/// The setup flags chosen, for logs.
#[derive(Debug, Clone, Copy)]
pub struct RingFeatures {
    /// `IORING_SETUP_SINGLE_ISSUER` (6.0).
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN` (6.1).
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (5.19).
    pub coop_taskrun: bool,
}

/// Builds a ring with the best setup flags this kernel takes.
///
/// With the environment variable `RINGRESS_URING_SETUP=plain` no setup flag is
/// tried (for tests and debugging: the flavour in which an SCTP accept completes
/// with EINTR most often, see `Worker::on_accept`).
///
/// # Errors
/// io_uring_setup(2) failed even with no flags (ENOSYS, EPERM, ENOMEM).
pub fn build_ring(entries: u32) -> io::Result<(IoUring, RingFeatures)> {
    let attempts: [(bool, bool, bool); 4] = [
        (true, true, false),
        (true, false, true),
        (false, false, true),
        (false, false, false),
    ];
    let plain = std::env::var_os("RINGRESS_URING_SETUP").is_some_and(|v| v == "plain");
    let attempts = if plain { &attempts[3..] } else { &attempts[..] };
    let mut last = None;
    for &(si, dt, coop) in attempts {
        let mut b = IoUring::builder();
        if si {
            b.setup_single_issuer();
        }
        if dt {
            b.setup_defer_taskrun();
        }
        if coop {
            b.setup_coop_taskrun();
        }
        match b.build(entries) {
            Ok(r) => {
                return Ok((
                    r,
                    RingFeatures {
                        single_issuer: si,
                        defer_taskrun: dt,
                        coop_taskrun: coop,
                    },
                ))
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("io_uring_setup failed")))
}

/// Sets up (and drops) a small ring, to tell whether io_uring is usable.
///
/// # Errors
/// The io_uring_setup(2) error.
pub fn probe_setup() -> io::Result<()> {
    IoUring::new(4).map(drop)
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19): `count` buffers
/// of `size` bytes that the kernel picks from for receives.
struct BufRing {
    ring: *mut types::BufRingEntry,
    ring_bytes: usize,
    bufs: *mut u8,
    bufs_bytes: usize,
    count: u16,
    size: usize,
    tail: u16,
}

fn mmap_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous private mapping, no fd, no fixed address; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

impl BufRing {
    fn new(ring: &IoUring, count: u16, size: usize, bgid: u16) -> io::Result<BufRing> {
        let ring_bytes = count as usize * std::mem::size_of::<types::BufRingEntry>();
        let bufs_bytes = count as usize * size;
        let r = mmap_anon(ring_bytes)?;
        let bufs = match mmap_anon(bufs_bytes) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: `r` is the mapping of `ring_bytes` made just above.
                unsafe { libc::munmap(r.cast(), ring_bytes) };
                return Err(e);
            }
        };
        let mut br = BufRing {
            ring: r.cast(),
            ring_bytes,
            bufs,
            bufs_bytes,
            count,
            size,
            tail: 0,
        };
        // SAFETY: the ring memory is page aligned, `count` entries long, a power of
        // two, and stays mapped until Drop, which runs after the ring is gone
        // (Worker declares `ring` before `bufs`).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(r as u64, count, bgid, 0)?;
        }
        for bid in 0..count {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    /// Adds buffer `bid` at the tail (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        let idx = (self.tail & (self.count - 1)) as usize;
        // SAFETY: idx < count, inside the ring mapping; the kernel reads only entries
        // between its head and the published tail, and this one is past the tail.
        let e = unsafe { &mut *self.ring.add(idx) };
        // SAFETY: bid < count, so the buffer lies inside the `bufs` mapping.
        e.set_addr(unsafe { self.bufs.add(bid as usize * self.size) } as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel (release store of the tail).
    fn publish(&self) {
        // SAFETY: the tail field lives in entry 0's reserved bytes (liburing
        // io_uring_buf_ring layout), a naturally aligned u16 shared with the kernel.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`, which the kernel has just filled.
    fn data(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.size);
        // SAFETY: bid < count (the kernel only reports ids we gave it) and the kernel
        // is done with the buffer until we push it again.
        unsafe {
            std::slice::from_raw_parts(self.bufs.add((bid % self.count) as usize * self.size), len)
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both mappings were made in `new` with these lengths; the ring that
        // used them has been dropped before (field order in Worker).
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
            libc::munmap(self.bufs.cast(), self.bufs_bytes);
        }
    }
}

struct UListener {
    fd: OwnedFd,
    shared: Arc<ListenerShared>,
    /// An accept SQE is in flight.
    armed: bool,
    removing: bool,
    /// The pause timer is in flight.
    paused: bool,
}

struct UConn {
    conn: Conn,
    /// Ops in flight on this session (at most one recv and one send per side, and
    /// one connect).
    ops: u8,
    recv_armed: [bool; 2],
    /// The last receive on that side was short: the socket is probably empty.
    drained: [bool; 2],
    send_armed: [bool; 2],
    /// The send slot holds a back-off timer after EAGAIN, not a send.
    send_retry: [bool; 2],
    /// The receive in flight is a multishot RECVMSG (one-to-many echo socket).
    recv_multi: [bool; 2],
    /// A cancel of that multishot RECVMSG is on its way.
    recv_cancel: [bool; 2],
    connect_armed: bool,
    closing: bool,
}

struct Worker {
    // Field order matters: the ring is dropped before the buffers it points to.
    ring: IoUring,
    bufs: BufRing,
    /// Datagram buffers, made with the first UDP listener.
    udp_bufs: Option<BufRing>,
    /// The RECVMSG template (name and control sizes) every UDP receive points to.
    udp_msghdr: Box<libc::msghdr>,
    /// The multishot RECVMSG template of one-to-many SCTP sockets: no name, room
    /// for one SCTP_RCVINFO.
    many_msghdr: Box<libc::msghdr>,
    /// Multishot RECVMSG works here (Linux 6.0+); false after an EINVAL.
    many_multishot: bool,
    udp: UdpState,
    udp_by_id: ListenerIds,
    /// UDP sockets whose receive found no buffer: re-armed after the batch.
    udp_starved: Vec<(u8, Key)>,
    ctx: WorkerCtx,
    listeners: Slab<UListener>,
    by_id: ListenerIds,
    /// One-to-many SCTP listeners: each is one session in `conns`.
    many_by_id: ListenerIds,
    conns: Slab<UConn>,
    multishot_accept: bool,
    /// Connections whose receive found no buffer (ENOBUFS), to re-arm.
    starved: Vec<Key>,
    /// Sessions waiting for an upstream socket from a namespace pool.
    parked: Vec<Key>,
    timers: Timers,
    /// Entries that did not fit in the SQ.
    overflow: VecDeque<squeue::Entry>,
    /// Timespec storage for pause timers (must outlive the SQE).
    pause_ts: Box<types::Timespec>,
    /// Timespec storage of the stall guard of one-to-many sends.
    stall_ts: Box<types::Timespec>,
    /// Timespec storage for the back-offs of a send that found no room: 1, 2, 4,
    /// ... [`super::SEND_RETRY_MAX_MS`] ms. Never resized, so the elements stay put
    /// while Timeout SQEs point at them.
    retry_ts: Vec<types::Timespec>,
    wake_armed: bool,
    in_flight: usize,
    shutting_down: bool,
    /// Ops were still in flight when shutdown gave up waiting: leak, never free.
    leak: bool,
    cqes: Vec<(u64, i32, u32)>,
}

static LOGGED: Once = Once::new();

/// Runs a worker on the calling thread until [`Command::Shutdown`].
pub(crate) fn run(ctx: WorkerCtx, ready: SyncSender<io::Result<()>>) {
    super::serve(Worker::new(ctx), ready, |mut w| {
        w.run();
        if w.leak {
            std::mem::forget(w);
        }
    });
}

impl Worker {
    fn new(ctx: WorkerCtx) -> io::Result<Worker> {
        let (ring, feat) = build_ring(RING_ENTRIES)?;
        let bufs = BufRing::new(&ring, BUF_COUNT, BUF_SIZE, BGID).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("registering a provided-buffer ring (Linux 5.19+) failed: {e}"),
            )
        })?;
        LOGGED.call_once(|| {
            tracing::info!(
                single_issuer = feat.single_issuer,
                defer_taskrun = feat.defer_taskrun,
                coop_taskrun = feat.coop_taskrun,
                buffers = BUF_COUNT,
                buffer_bytes = BUF_SIZE,
                "io_uring ring set up"
            );
        });
        // SAFETY: an all-zero msghdr is valid; only the two sizes are set.
        let mut udp_msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        udp_msghdr.msg_namelen = udp::NAME_SPACE as _;
        udp_msghdr.msg_controllen = udp::CONTROL_SPACE as _;
        // SAFETY: as above.
        let mut many_msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        many_msghdr.msg_controllen = (crate::sctp::RECV_CONTROL_WORDS * 8) as _;
        Ok(Worker {
            ring,
            bufs,
            udp_bufs: None,
            udp_msghdr,
            many_msghdr,
            many_multishot: true,
            udp: UdpState::default(),
            udp_by_id: Default::default(),
            udp_starved: Vec::new(),
            ctx,
            listeners: Slab::default(),
            by_id: Default::default(),
            many_by_id: Default::default(),
            conns: Slab::default(),
            multishot_accept: true,
            starved: Vec::new(),
            parked: Vec::new(),
            timers: Timers::default(),
            overflow: VecDeque::new(),
            pause_ts: Box::new(types::Timespec::new().nsec((ACCEPT_PAUSE_MS * 1_000_000) as u32)),
            stall_ts: Box::new(types::Timespec::from(super::SEND_STALL_LIMIT)),
            retry_ts: (0..=super::SEND_RETRY_MAX_MS.trailing_zeros())
                .map(|e| types::Timespec::new().nsec((1u32 << e) * 1_000_000))
                .collect(),
            wake_armed: false,
            in_flight: 0,
            shutting_down: false,
            leak: false,
            cqes: Vec::with_capacity(256),
        })
    }

    fn push(&mut self, e: squeue::Entry) {
        self.in_flight += 1;
        self.ctx.stats.submitted.fetch_add(1, Relaxed);
        if !self.overflow.is_empty() {
            self.overflow.push_back(e);
            return;
        }
        // SAFETY: every buffer an entry points to (send slices, SCTP messages and
        // their boxed msghdr/iovec/control space in the session's Leg, timespecs,
        // connect addresses) is owned by the worker and kept alive and unmoved
        // until the entry's CQE (sessions close only when their ops reach 0).
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.overflow.push_back(e);
        }
    }

    fn flush_overflow(&mut self) {
        while let Some(e) = self.overflow.front() {
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push(e) }.is_err() {
                break;
            }
            self.overflow.pop_front();
        }
    }

    fn arm_wake(&mut self) {
        if !self.wake_armed {
            self.wake_armed = true;
            let fd = self.ctx.wake.as_raw_fd();
            let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(token(K_WAKE, Key { idx: 0, gen: 0 }));
            self.push(e);
        }
    }

    fn run(&mut self) {
        self.arm_wake();
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            self.flush_overflow();
            let now = Instant::now();
            let next = match (self.timers.next_wait(now), self.udp.next_wait(now)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = match (shutdown_deadline, next) {
                (Some(_), t) => Some(t.map_or(SHUTDOWN_POLL, |t| t.min(SHUTDOWN_POLL))),
                (None, t) => t,
            };
            // Entries still waiting for SQ room: submit without waiting for a CQE.
            let want = usize::from(self.overflow.is_empty());
            let res = match wait {
                Some(d) => {
                    let ts = types::Timespec::from(d);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(want, &args)
                }
                None => self.ring.submit_and_wait(want),
            };
            match res {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::ETIME)
                    ) => {}
                Err(e) => {
                    tracing::error!(worker = self.ctx.index, error = %e, "io_uring_enter failed; worker stops");
                    return;
                }
            }
            self.cqes.clear();
            for c in self.ring.completion() {
                self.cqes.push((c.user_data(), c.result(), c.flags()));
            }
            self.ctx
                .stats
                .completed
                .fetch_add(self.cqes.len() as u64, Relaxed);
            let cqes = std::mem::take(&mut self.cqes);
            for &(ud, res, flags) in &cqes {
                self.handle(ud, res, flags);
            }
            self.cqes = cqes;
            // Buffers returned during this batch: let parked receives retry.
            self.bufs.publish();
            for k in std::mem::take(&mut self.starved) {
                self.drive(k);
            }
            for k in self
                .timers
                .expired(Instant::now(), &mut self.conns, |c| &mut c.conn)
            {
                if let Some(c) = self.conns.get_mut(k) {
                    if !c.closing {
                        c.conn.complete(Side::Client, Completion::Timeout);
                    }
                }
                self.drive(k);
            }
            for uk in self.udp.sweep(Instant::now()) {
                self.udp_close(K_UDP_UPSTREAM, uk);
            }
            for (kind, k) in std::mem::take(&mut self.udp_starved) {
                self.arm_udp(kind, k);
            }
            for k in std::mem::take(&mut self.parked) {
                if let Some(c) = self.conns.get_mut(k) {
                    c.conn.unpark();
                }
                self.drive(k);
            }
            if self.shutting_down {
                let deadline = *shutdown_deadline
                    .get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
                if self.in_flight == 0 {
                    return;
                }
                if Instant::now() >= deadline {
                    // The kernel may still use buffers of ops that did not finish
                    // cancelling: never free them (the thread is ending anyway).
                    tracing::warn!(
                        worker = self.ctx.index,
                        in_flight = self.in_flight,
                        "io_uring ops still in flight at shutdown; leaking their buffers"
                    );
                    self.leak = true;
                    return;
                }
            }
        }
    }

    fn handle(&mut self, ud: u64, res: i32, flags: u32) {
        let (kind, key) = untoken(ud);
        let more = cqueue::more(flags);
        if !more {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        match kind {
            K_WAKE => {
                if !more {
                    self.wake_armed = false;
                }
                drain_eventfd(self.ctx.wake.as_raw_fd());
                self.commands();
                self.peeled();
                if !self.shutting_down {
                    self.arm_wake();
                }
            }
            K_ACCEPT => self.on_accept(key, res, more),
            K_TIMER => {
                if let Some(l) = self.listeners.get_mut(key) {
                    l.paused = false;
                }
                self.arm_accept(key);
            }
            K_RECV | K_RECV1 => self.on_recv(key, side_of(kind - K_RECV), res, flags),
            K_SEND | K_SEND1 => self.on_send(key, side_of(kind - K_SEND), res),
            K_CONNECT => self.on_connect(key, res),
            K_UDP_LISTENER | K_UDP_UPSTREAM => self.on_udp(kind, key, res, flags),
            _ => {}
        }
    }

    fn commands(&mut self) {
        while let Ok(cmd) = self.ctx.rx.try_recv() {
            match cmd {
                Command::AddListener { id, fd, shared } if shared.proto == Proto::Udp => {
                    if self.udp_bufs.is_none() {
                        match BufRing::new(&self.ring, UDP_BUF_COUNT, UDP_BUF_SIZE, BGID_UDP) {
                            Ok(b) => self.udp_bufs = Some(b),
                            Err(e) => {
                                tracing::error!(listener = %shared.name, error = %e,
                                    "cannot register the datagram buffer ring; listener not served");
                                continue;
                            }
                        }
                    }
                    let k = self.udp.add_listener(fd, shared);
                    self.udp_by_id.insert(id, k);
                    self.arm_udp(K_UDP_LISTENER, k);
                }
                Command::AddListener { id, fd, shared }
                    if shared.proto == Proto::Sctp
                        && shared.sctp.style == crate::sctp::Style::OneToMany =>
                {
                    let conn = Conn::open_many(fd, shared, &self.ctx.stats);
                    let k = self.insert_conn(conn);
                    self.many_by_id.insert(id, k);
                    self.drive(k);
                }
                Command::AddListener { id, fd, shared } => {
                    let k = self.listeners.insert(UListener {
                        fd,
                        shared,
                        armed: false,
                        removing: false,
                        paused: false,
                    });
                    self.by_id.insert(id, k);
                    self.arm_accept(k);
                }
                Command::RemoveListener { id } => {
                    if let Some(k) = self.by_id.remove(&id) {
                        self.remove_listener(k);
                    }
                    if let Some(k) = self.udp_by_id.remove(&id) {
                        for uk in self.udp.end_sessions(k) {
                            self.udp_close(K_UDP_UPSTREAM, uk);
                        }
                        self.udp_close(K_UDP_LISTENER, k);
                    }
                    if let Some(k) = self.many_by_id.remove(&id) {
                        // Its queued replies go out, then the socket closes.
                        if let Some(c) = self.conns.get_mut(k) {
                            c.conn.io.close();
                        }
                        self.drive(k);
                    }
                }
                Command::Shutdown => self.shutdown(),
            }
        }
    }

    /// The fd and the (armed, closing) flags of a UDP listener (`K_UDP_LISTENER`)
    /// or upstream socket (`K_UDP_UPSTREAM`).
    fn udp_socket(&mut self, kind: u8, k: Key) -> Option<(RawFd, &mut bool, &mut bool)> {
        if kind == K_UDP_LISTENER {
            let l = self.udp.listeners.get_mut(k)?;
            Some((l.fd.as_raw_fd(), &mut l.armed, &mut l.closing))
        } else {
            let u = self.udp.upstreams.get_mut(k)?;
            Some((u.fd.as_raw_fd(), &mut u.armed, &mut u.closing))
        }
    }

    /// Arms the multishot RECVMSG of a UDP listener (`K_UDP_LISTENER`) or upstream
    /// socket (`K_UDP_UPSTREAM`), unless armed or closing.
    fn arm_udp(&mut self, kind: u8, k: Key) {
        if self.shutting_down {
            return;
        }
        let Some((fd, armed, closing)) = self.udp_socket(kind, k) else {
            return;
        };
        if *armed || *closing {
            return;
        }
        *armed = true;
        // The msghdr is boxed and lives as long as the worker, past every CQE.
        let e = opcode::RecvMsgMulti::new(types::Fd(fd), &*self.udp_msghdr, BGID_UDP)
            .build()
            .user_data(token(kind, k));
        self.push(e);
    }

    /// One CQE of a UDP multishot RECVMSG.
    fn on_udp(&mut self, kind: u8, k: Key, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let now = Instant::now();
        let mut watch = None;
        if let (Some(bid), Some(bufs)) = (bid, &self.udp_bufs) {
            if res >= 0 {
                let raw = bufs.data(bid, res as usize);
                if let Ok(out) = types::RecvMsgOut::parse(raw, &self.udp_msghdr) {
                    let d = Datagram {
                        data: out.payload_data(),
                        from: udp::parse_name(out.name_data()),
                        to: udp::parse_pktinfo(out.control_data()),
                        truncated: out.is_payload_truncated(),
                    };
                    if kind == K_UDP_LISTENER {
                        if let After::Watch(uk) =
                            self.udp.on_listener_datagram(k, &d, &self.ctx.wake, now)
                        {
                            watch = Some(uk);
                        }
                    } else {
                        self.udp.on_upstream_datagram(k, &d, now);
                    }
                }
            }
        }
        if let (Some(bid), Some(bufs)) = (bid, &mut self.udp_bufs) {
            bufs.push(bid);
            bufs.publish();
        }
        let mut starved = false;
        if res < 0 {
            match -res {
                libc::ENOBUFS => {
                    self.ctx.stats.enobufs.fetch_add(1, Relaxed);
                    starved = true;
                }
                libc::ECANCELED => {}
                errno if kind == K_UDP_UPSTREAM => self.udp.on_upstream_error(k, errno),
                errno => tracing::debug!(errno, "udp listener receive failed; re-arming"),
            }
        }
        if let Some(uk) = watch {
            self.arm_udp(K_UDP_UPSTREAM, uk);
        }
        if !more {
            let closing = self.udp_socket(kind, k).map(|(_, armed, closing)| {
                *armed = false;
                *closing
            });
            match closing {
                // Its receive has ended: the socket can go.
                Some(true) => self.udp_remove(kind, k),
                Some(false) if starved => self.udp_starved.push((kind, k)),
                Some(false) => self.arm_udp(kind, k),
                None => {}
            }
        }
    }

    /// Ends a UDP listener (`K_UDP_LISTENER`) or upstream socket: at once if no
    /// receive is in flight, else after the cancelled receive's last CQE.
    fn udp_close(&mut self, kind: u8, k: Key) {
        let armed = self.udp_socket(kind, k).map(|(_, armed, closing)| {
            *closing = true;
            *armed
        });
        match armed {
            Some(true) => {
                let e = opcode::AsyncCancel::new(token(kind, k))
                    .build()
                    .user_data(token(K_CANCEL, k));
                self.push(e);
            }
            Some(false) => self.udp_remove(kind, k),
            None => {}
        }
    }

    /// Drops a UDP socket whose receive has ended.
    fn udp_remove(&mut self, kind: u8, k: Key) {
        if kind == K_UDP_LISTENER {
            self.udp.listeners.remove(k);
        } else {
            self.udp.upstreams.remove(k);
        }
    }

    fn remove_listener(&mut self, k: Key) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        l.removing = true;
        if l.armed {
            let e = opcode::AsyncCancel::new(token(K_ACCEPT, k))
                .build()
                .user_data(token(K_CANCEL, k));
            self.push(e);
        } else if !l.paused {
            self.listeners.remove(k);
        }
    }

    fn shutdown(&mut self) {
        self.shutting_down = true;
        for k in self.listeners.keys() {
            self.remove_listener(k);
        }
        for k in self.conns.keys() {
            if let Some(c) = self.conns.get_mut(k) {
                c.conn.failed = false;
                c.conn.io.close();
                for l in &mut c.conn.io.legs {
                    l.out.clear();
                }
            }
            self.close(k);
        }
        // Everything else in flight (the eventfd poll, timers) is cancelled too.
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(token(K_CANCEL, Key { idx: 0, gen: 0 }));
        self.push(e);
    }

    fn arm_accept(&mut self, k: Key) {
        let multishot = self.multishot_accept;
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        if l.removing {
            self.listeners.remove(k);
            return;
        }
        if l.armed || l.paused {
            return;
        }
        l.armed = true;
        let fd = types::Fd(l.fd.as_raw_fd());
        // SCTP sockets must be non-blocking: a send that waits for room is punted
        // to an io-wq thread, which would block on a blocking socket (a thread per
        // stalled association); non-blocking, it completes with EAGAIN instead.
        let nonblock = if l.shared.proto == Proto::Sctp {
            libc::SOCK_NONBLOCK
        } else {
            0
        };
        let e = if multishot {
            opcode::AcceptMulti::new(fd)
                .flags(libc::SOCK_CLOEXEC | nonblock)
                .build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
                .build()
        };
        self.push(e.user_data(token(K_ACCEPT, k)));
    }

    fn on_accept(&mut self, k: Key, res: i32, more: bool) {
        let Some(l) = self.listeners.get_mut(k) else {
            if res >= 0 {
                // SAFETY: the kernel just installed this fd for us; nobody else owns it.
                drop(unsafe { OwnedFd::from_raw_fd(res) });
            }
            return;
        };
        if !more {
            l.armed = false;
        }
        if res >= 0 {
            // SAFETY: as above.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            if l.removing {
                drop(fd);
            } else {
                let shared = l.shared.clone();
                let conn = Conn::open(fd, shared, &self.ctx.stats);
                let ck = self.insert_conn(conn);
                self.drive(ck);
            }
        } else {
            let errno = -res;
            if errno == libc::ECANCELED || l.removing {
                if !more {
                    self.listeners.remove(k);
                }
                return;
            }
            if errno == libc::EINVAL && self.multishot_accept {
                tracing::info!(
                    worker = self.ctx.index,
                    "multishot accept rejected (EINVAL): using single-shot accept"
                );
                self.multishot_accept = false;
            } else if accept_error_pauses(errno) {
                l.shared.stats.accept_errors.fetch_add(1, Relaxed);
                tracing::warn!(listener = %l.shared.name, errno, error = %io::Error::from_raw_os_error(errno),
                    "accept failed; pausing {ACCEPT_PAUSE_MS} ms");
                if !more && !l.paused {
                    l.paused = true;
                    let e = opcode::Timeout::new(&*self.pause_ts as *const types::Timespec)
                        .build()
                        .user_data(token(K_TIMER, k));
                    self.push(e);
                }
                return;
            } else if errno == libc::EINTR {
                // SCTP's accept checks for a pending signal before it checks for
                // a non-blocking call, and io_uring's task-work notification counts
                // as one: the accept is simply asked again.
                tracing::debug!(listener = %l.shared.name, "accept interrupted (EINTR); re-armed");
            } else if !accept_error_benign(errno) {
                l.shared.stats.accept_errors.fetch_add(1, Relaxed);
                tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno), "accept failed");
            }
        }
        if !more {
            self.arm_accept(k);
        }
    }

    /// Adds a session (accepted, or a one-to-many socket).
    fn insert_conn(&mut self, conn: Conn) -> Key {
        self.conns.insert(UConn {
            conn,
            ops: 0,
            recv_armed: [false; 2],
            drained: [false; 2],
            send_armed: [false; 2],
            send_retry: [false; 2],
            recv_multi: [false; 2],
            recv_cancel: [false; 2],
            connect_armed: false,
            closing: false,
        })
    }

    /// Starts sessions for the associations the binder peeled off (one-to-many
    /// proxy) and lets their one-to-many sockets be read again.
    fn peeled(&mut self) {
        for (k, new) in self.ctx.finish_peel_offs(&mut self.conns, |c| &mut c.conn) {
            if let Some(conn) = new {
                let nk = self.insert_conn(conn);
                self.drive(nk);
            }
            self.drive(k);
        }
    }

    /// One CQE of the multishot RECVMSG of a one-to-many echo socket: a piece of a
    /// message (or a notification) laid out as io_uring_recvmsg_out, name, control
    /// (SCTP_RCVINFO), payload. The receive is cancelled when the session stops
    /// asking for more (its window is full); the last CQE lacks F_MORE.
    fn on_recv_multi(&mut self, k: Key, side: Side, res: i32, flags: u32) {
        let i = side.index();
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let mut starved = false;
        if let Some(c) = self.conns.get_mut(k) {
            if !more {
                c.ops -= 1;
                c.recv_armed[i] = false;
                c.recv_multi[i] = false;
                c.recv_cancel[i] = false;
            }
            if c.closing {
                // Cancelled or not, nothing more goes to a closing session.
            } else if res == -libc::EINVAL && !more && self.many_multishot {
                // Multishot RECVMSG came with Linux 6.0: use single-shot receives.
                tracing::info!(worker = self.ctx.index, "multishot RECVMSG rejected (EINVAL): using single-shot receives on one-to-many SCTP sockets");
                self.many_multishot = false;
                c.conn.io.side(side).recv();
            } else if let (true, Some(bid)) = (res >= 0, bid) {
                let raw = self.bufs.data(bid, res as usize);
                if let Ok(out) = types::RecvMsgOut::parse(raw, &self.many_msghdr) {
                    let info = crate::sctp::msg_info(out.control_data());
                    c.conn
                        .complete_message(side, out.payload_data(), out.flags() as i32, info);
                }
                // Still running but no longer wanted: stop it (its last CQEs may
                // still carry data, which the session takes). Once a cancel is on
                // its way, a request made meanwhile is kept for the re-arm.
                let wanted = c.conn.take_recv_request(side);
                if more && !c.closing {
                    if c.recv_cancel[i] {
                        if wanted {
                            c.conn.io.side(side).recv();
                        }
                    } else if !wanted {
                        c.recv_cancel[i] = true;
                        let e = opcode::AsyncCancel::new(token(K_RECV + i as u8, k))
                            .build()
                            .user_data(token(K_CANCEL, k));
                        self.push(e);
                    }
                } else if wanted {
                    // The last CQE: drive() below re-arms.
                    c.conn.io.side(side).recv();
                }
            } else if res == -libc::ENOBUFS {
                starved = true;
                self.ctx.stats.enobufs.fetch_add(1, Relaxed);
                c.conn.io.side(side).recv();
                self.starved.push(k);
            } else if res < 0 && res != -libc::ECANCELED && res != -libc::EAGAIN {
                c.conn.complete(side, Completion::Error(-res));
            } else if res == -libc::EAGAIN && !more {
                c.conn.io.side(side).recv();
            }
        }
        if let Some(bid) = bid {
            self.bufs.push(bid);
        }
        // Replies queued by this piece go out now (the receive stays armed).
        if !starved {
            self.drive(k);
        }
    }

    fn on_recv(&mut self, k: Key, side: Side, res: i32, flags: u32) {
        if self
            .conns
            .get_mut(k)
            .is_some_and(|c| c.recv_multi[side.index()])
        {
            self.on_recv_multi(k, side, res, flags);
            return;
        }
        let bid = cqueue::buffer_select(flags);
        let mut starved = false;
        if let Some(c) = self.conns.get_mut(k) {
            c.ops -= 1;
            c.recv_armed[side.index()] = false;
            if !c.closing && c.conn.is_message_leg(side) && res == -libc::EAGAIN {
                // A receive retried in io-wq on a non-blocking socket after a
                // spurious wake-up: nothing was read; ask again.
                c.conn.io.side(side).recv();
            } else if !c.closing
                && c.conn.is_message_leg(side)
                && (res >= 0 || -res == libc::ENOBUFS)
            {
                if res == libc::ENOBUFS.wrapping_neg() {
                    starved = true;
                    self.ctx.stats.enobufs.fetch_add(1, Relaxed);
                    c.conn.io.side(side).recv();
                    self.starved.push(k);
                } else {
                    let (mflags, info) = c.conn.received(side);
                    let data = match bid {
                        Some(bid) => self.bufs.data(bid, res as usize),
                        None => &[][..],
                    };
                    c.conn.complete_message(side, data, mflags, info);
                }
            } else if !c.closing {
                if res > 0 {
                    c.drained[side.index()] = (res as usize) < BUF_SIZE;
                    if let Some(bid) = bid {
                        let data = self.bufs.data(bid, res as usize);
                        c.conn.complete(side, Completion::Recv(data));
                    }
                } else if res == 0 {
                    c.conn.complete(side, Completion::Eof);
                } else if -res == libc::ENOBUFS {
                    // Back-pressure from the buffer ring, not an error: retry once
                    // this batch has returned its buffers.
                    starved = true;
                    self.ctx.stats.enobufs.fetch_add(1, Relaxed);
                    c.conn.io.side(side).recv();
                    self.starved.push(k);
                } else if -res != libc::ECANCELED {
                    c.conn.complete(side, Completion::Error(-res));
                }
            }
        }
        if let Some(bid) = bid {
            self.bufs.push(bid);
        }
        if !starved {
            self.drive(k);
        }
    }

    fn on_send(&mut self, k: Key, side: Side, res: i32) {
        if let Some(c) = self.conns.get_mut(k) {
            let i = side.index();
            c.ops -= 1;
            c.send_armed[i] = false;
            if std::mem::take(&mut c.send_retry[i]) {
                // The back-off timer of an EAGAIN send ended (-ETIME), or was
                // cancelled: drive() sends the same bytes again.
            } else if !c.closing && res == -libc::ECANCELED && c.conn.many {
                // Not closing, so the stall guard (LINK_TIMEOUT) cancelled it.
                c.conn.send_stalled(side);
            } else if !c.closing && res == -libc::EAGAIN {
                // The kernel had no room yet (an SCTP message is sent whole, and
                // POLLOUT only means "some room"; a send retried in io-wq on a
                // non-blocking socket ends here). Nothing was sent: wait a little
                // (doubling), then send again. The send slot stays taken.
                let wait = c.conn.send_would_block(side);
                tracing::trace!(listener = %c.conn.listener.name, ?wait, "send found no room (EAGAIN)");
                if !wait.is_zero() {
                    let level = (wait.as_millis() as u64).trailing_zeros() as usize;
                    let ts = &self.retry_ts[level.min(self.retry_ts.len() - 1)];
                    c.send_retry[i] = true;
                    c.send_armed[i] = true;
                    c.ops += 1;
                    let e = opcode::Timeout::new(ts as *const types::Timespec)
                        .build()
                        .user_data(token(K_SEND + i as u8, k));
                    self.push(e);
                    return;
                }
            } else if !c.closing {
                if res >= 0 && c.conn.is_message_leg(side) {
                    c.conn.message_sent(side);
                } else if res >= 0 {
                    c.conn.sent(side, res as usize);
                } else if -res != libc::ECANCELED {
                    c.conn.send_failed(side, -res);
                }
            }
        }
        self.drive(k);
    }

    fn on_connect(&mut self, k: Key, res: i32) {
        if let Some(c) = self.conns.get_mut(k) {
            c.ops -= 1;
            c.connect_armed = false;
            if !c.closing {
                if res == 0 {
                    c.conn.complete(Side::Upstream, Completion::Connected);
                } else {
                    let errno = if -res == libc::ECANCELED {
                        libc::ETIMEDOUT
                    } else {
                        -res
                    };
                    c.conn.complete(Side::Upstream, Completion::Error(errno));
                }
            }
        }
        self.drive(k);
    }

    /// Acts on the session's requests after a completion (see the module docs of
    /// [`super`]).
    fn drive(&mut self, k: Key) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if c.closing || c.conn.finished() {
            self.close(k);
            return;
        }
        let mut entries: [Option<squeue::Entry>; 5] = Default::default();
        // A LINK_TIMEOUT to push right after the send on side 0 / 1.
        let mut stall_guard: [Option<squeue::Entry>; 2] = Default::default();
        if c.conn.take_connect_request() {
            match c.conn.start_connect(&self.ctx.wake) {
                ConnectStart::Go => {
                    let leg = &c.conn.legs[1];
                    if let (Some(fd), Some(dest)) = (leg.raw(), &leg.dest) {
                        // The boxed address stays put until the CQE (Leg::dest).
                        let e =
                            opcode::Connect::new(types::Fd(fd), dest.as_ptr().cast(), dest.len())
                                .build()
                                .user_data(token(K_CONNECT, k));
                        c.connect_armed = true;
                        c.ops += 1;
                        entries[4] = Some(e);
                    }
                }
                ConnectStart::Wait => {
                    if c.conn.park() {
                        self.parked.push(k);
                    }
                }
                ConnectStart::Failed => {
                    self.close(k);
                    return;
                }
            }
        }
        c.conn.shutdown_drained();
        // Before arming: a request that ends at once lets the session read again.
        self.ctx.request_peel_offs(k, &mut c.conn);
        for side in [Side::Client, Side::Upstream] {
            let i = side.index();
            let Some(fd) = c.conn.legs[i].raw().map(types::Fd) else {
                continue;
            };
            if c.conn.is_message_leg(side) {
                if !c.send_armed[i] {
                    // The header, its control buffer and the message stay put in
                    // the leg until the CQE (Conn::with_next_message).
                    let hdr = c.conn.with_next_message(side, |data, info, flags, space| {
                        space.prepare(data, info, flags)
                    });
                    if let Some(hdr) = hdr {
                        let mut e = opcode::SendMsg::new(fd, hdr)
                            .flags(libc::MSG_NOSIGNAL as u32)
                            .build()
                            .user_data(token(K_SEND + i as u8, k));
                        if c.conn.many {
                            // The send buffer of a one-to-many socket is shared by
                            // its associations, and io_uring keeps a send that finds
                            // no room waiting: bound the wait (Linux 5.5 link
                            // timeout); a send cancelled by it means that message's
                            // association took nothing for SEND_STALL_LIMIT.
                            e = e.flags(squeue::Flags::IO_LINK);
                            stall_guard[i] = Some(
                                opcode::LinkTimeout::new(&*self.stall_ts as *const types::Timespec)
                                    .build()
                                    .user_data(token(K_STALL, k)),
                            );
                        }
                        c.send_armed[i] = true;
                        c.ops += 1;
                        entries[i] = Some(e);
                    }
                }
                // A one-to-many echo socket carries every association's messages:
                // a multishot RECVMSG (Linux 6.0) takes them in batches, one CQE
                // each, instead of one ring round trip per message. (Not for proxy:
                // reading must stop while a peel-off is pending.)
                let multi = self.many_multishot && c.conn.many && c.conn.listener.peel.is_none();
                if !c.recv_armed[i] && multi && c.conn.take_recv_request(side) {
                    // The template only gives sizes; it lives as long as the worker.
                    let e = opcode::RecvMsgMulti::new(fd, &*self.many_msghdr, BGID)
                        .build()
                        .user_data(token(K_RECV + i as u8, k));
                    c.recv_armed[i] = true;
                    c.recv_multi[i] = true;
                    c.ops += 1;
                    entries[2 + i] = Some(e);
                } else if !c.recv_armed[i] && c.conn.take_recv_request(side) {
                    // Null buffer: the kernel picks one from the ring (BUFFER_SELECT).
                    if let Some(hdr) = c.conn.recv_header(side, std::ptr::null_mut(), BUF_SIZE) {
                        let e = opcode::RecvMsg::new(fd, hdr)
                            .buf_group(BGID)
                            .build()
                            .flags(squeue::Flags::BUFFER_SELECT)
                            .user_data(token(K_RECV + i as u8, k));
                        c.recv_armed[i] = true;
                        c.ops += 1;
                        entries[2 + i] = Some(e);
                    }
                }
                continue;
            }
            if !c.send_armed[i] {
                if let Some(buf) = c.conn.next_send(side) {
                    let len = buf.len().min(u32::MAX as usize) as u32;
                    let e = opcode::Send::new(fd, buf.as_ptr(), len)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(token(K_SEND + i as u8, k));
                    c.send_armed[i] = true;
                    c.ops += 1;
                    entries[i] = Some(e);
                }
            }
            if !c.recv_armed[i] && c.conn.take_recv_request(side) {
                // After a short read the socket is most likely empty: skip the
                // attempt that would fail and go straight to the poll.
                let ioprio = if c.drained[i] { RECVSEND_POLL_FIRST } else { 0 };
                let e = opcode::Recv::new(fd, std::ptr::null_mut(), BUF_SIZE as u32)
                    .buf_group(BGID)
                    .ioprio(ioprio)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
                    .user_data(token(K_RECV + i as u8, k));
                c.recv_armed[i] = true;
                c.ops += 1;
                entries[2 + i] = Some(e);
            }
        }
        self.timers.sync(k, &mut c.conn);
        let [s0, s1, r0, r1, conn] = entries;
        let [g0, g1] = stall_guard;
        for e in [s0, g0, s1, g1, r0, r1, conn].into_iter().flatten() {
            self.push(e);
        }
    }

    /// Closes session `k` now if nothing is in flight, else cancels what is and
    /// closes when the last CQE arrives. An aborted session's sockets get
    /// SO_LINGER 0 first, so their peers see a reset.
    fn close(&mut self, k: Key) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if !c.closing {
            c.closing = true;
            c.conn.linger_if_aborting();
        }
        if c.ops == 0 {
            self.conns.remove(k);
            return;
        }
        let mut cancel = Vec::with_capacity(5);
        for i in 0..2 {
            if std::mem::take(&mut c.recv_armed[i]) {
                cancel.push(K_RECV + i as u8);
            }
            if std::mem::take(&mut c.send_armed[i]) {
                cancel.push(K_SEND + i as u8);
            }
        }
        if std::mem::take(&mut c.connect_armed) {
            cancel.push(K_CONNECT);
        }
        for kind in cancel {
            let e = opcode::AsyncCancel::new(token(kind, k))
                .build()
                .user_data(token(K_CANCEL, k));
            self.push(e);
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

/// How often a shutting-down worker checks whether its ops have drained.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);
