//! The io_uring backend: one ring per worker, never shared.
//!
//! - What the kernel offers is probed once per process ([`probe()`]): setup flags
//!   (`SINGLE_ISSUER | DEFER_TASKRUN`, 6.1, else the best the kernel takes),
//!   multishot accept, RECVMSG and RECV, the multishot receive's byte limit
//!   (6.18) and the opcodes (`CLOSE`, ...); every ring is built from that.
//! - [`Op::Accept`]: `IORING_OP_ACCEPT` multishot (5.19) with `SOCK_NONBLOCK |
//!   SOCK_CLOEXEC`, single-shot where the kernel lacks multishot.
//! - [`Op::Recv`]: single-shot `IORING_OP_RECV` with `IOSQE_BUFFER_SELECT` from a
//!   provided-buffer ring (5.19), for kernels without multishot receive (or with
//!   it turned off). `poll_first` sets `IORING_RECVSEND_POLL_FIRST` (5.19).
//! - [`Op::RecvMulti`] of a stream ([`MultiKind::Stream`]): multishot
//!   `IORING_OP_RECV` (`IORING_RECV_MULTISHOT`, 6.0) from the same ring, one CQE
//!   per filled buffer: the poll stays armed in the kernel instead of being armed
//!   and disarmed per receive. A proxy side gives it the room left in its window
//!   as a total byte limit (`sqe->optlen`, 6.18), after which the kernel ends it:
//!   the window is passed by less than one buffer, as with single-shot
//!   receives; without that limit in the kernel, proxy sides stay single-shot.
//!   Other sessions cancel it when they stop wanting data; CQEs that come before
//!   the cancel lands are taken, so their overshoot is bounded by the ring: at
//!   most [`BUF_COUNT`] × [`BUF_SIZE`] bytes (4 MiB) per receive (the kernel ends
//!   it with ENOBUFS once the ring is empty); measured, a receive flooded over
//!   loopback took ~1.4 MiB past a 64 KiB window before its cancel landed.
//! - [`Op::RecvMsg`]: single-shot `IORING_OP_RECVMSG` from the same ring; the
//!   SCTP header it points at is owned by the operation.
//! - [`Op::RecvMulti`]: multishot `IORING_OP_RECVMSG` (6.0) into a ring of
//!   datagram buffers (UDP) or the stream ring (one-to-many SCTP); each CQE's
//!   buffer holds `io_uring_recvmsg_out`, the name, the control messages and the
//!   payload, which the backend parses into [`Meta`](super::backend::Meta).
//! - [`Op::Send`] / [`Op::SendMsg`]: `IORING_OP_SEND` / `SENDMSG` with
//!   `MSG_NOSIGNAL`; a bounded send is linked to an `IORING_OP_LINK_TIMEOUT`
//!   (5.5).
//! - [`Op::Splice`]: splice(2) at once from the worker (non-blocking, as
//!   epoll does); when that found the socket without room (pipe → socket) or
//!   the worker asks to wait (`poll_first`), a one-shot `IORING_OP_POLL_ADD` on
//!   the socket is the operation, and its CQE runs the splice(2). An
//!   `IORING_OP_SPLICE` (5.7) always runs in an io-wq worker thread (the
//!   kernel forces it async), a thread hop per splice: with
//!   `RINGRESS_URING_SPLICE=ring` every splice is one, after a linked
//!   (`IOSQE_IO_LINK`) `IORING_OP_POLL_ADD` where it waits (measured in
//!   BENCHMARKS.md).
//! - [`Op::Connect`], [`Op::PollIn`] (multishot `IORING_OP_POLL_ADD`, 5.13) and
//!   cancels (`IORING_OP_ASYNC_CANCEL`).
//! - [`Backend::close`]: `IORING_OP_CLOSE` (5.6) where the probe lists `CLOSE`,
//!   submitted with the loop's next `io_uring_enter` instead of a close(2) each;
//!   the socket's [`OwnedFd`] stays in the backend's table until the close's CQE,
//!   then is forgotten (the kernel closed it). Without the opcode: close(2).
//!
//! Every operation's memory lives in the backend's table from the push of its SQE
//! to its last CQE. If the backend is dropped with operations in flight (an
//! `io_uring_enter` error, a panic, a shutdown that gave up), that memory, the
//! buffer rings and the ring are leaked, never freed.

mod bufring;
mod completion;
mod ops;
mod probe;

pub use probe::*;

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::backend::{Backend, BufRef, Caps, Event, MultiKind, Op, OpId, SpliceSock};
use super::slab::Slab;
use super::udp;
use bufring::BufRing;

/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 1024;
/// Buffers in the stream provided-buffer ring (a power of two, at most 32768).
pub const BUF_COUNT: u16 = 256;
/// Size of each stream buffer (bytes).
pub const BUF_SIZE: usize = 16 * 1024;
/// Buffer group of the stream buffers.
const BGID: u16 = 1;
/// Buffer group of the datagram buffers.
const BGID_UDP: u16 = 2;
/// Datagram buffers (a power of two).
const UDP_BUF_COUNT: u16 = 64;
/// Size of each datagram buffer: io_uring_recvmsg_out, the source address, the
/// control messages, and the largest UDP payload with a byte to spare (bytes).
const UDP_BUF_SIZE: usize = 16 + udp::NAME_SPACE + udp::CONTROL_SPACE + 65_536;
/// splice(2) calls one turn (one [`Backend::wait`] to the next) may make at
/// once (count); past it, a splice waits for its poll's CQE, so that a bulk
/// transfer whose every splice finds the socket ready does not keep the worker
/// from its ring, timers and other sessions (as epoll's per-socket budget).
const SPLICE_NOW_BUDGET: usize = 128;
/// `IORING_RECVSEND_POLL_FIRST` (sqe->ioprio of RECV/SEND, Linux 5.19).
const RECVSEND_POLL_FIRST: u16 = 1;

/// user_data of an operation: its key in the table (kind byte 0).
const UD_OP: u8 = 0;
/// user_data of an ASYNC_CANCEL.
const UD_CANCEL: u8 = 0xfe;
/// user_data of a LINK_TIMEOUT bounding a send.
const UD_LINK_TIMEOUT: u8 = 0xfd;
/// user_data of an `IORING_OP_CLOSE`: its key in the table of closes.
const UD_CLOSE: u8 = 0xfc;
/// user_data of the `IORING_OP_POLL_ADD` linked before an `IORING_OP_SPLICE`
/// that waits for its socket (`RINGRESS_URING_SPLICE=ring`): the splice's key.
const UD_SPLICE_POLL: u8 = 0xfb;

/// Operations whose memory was leaked because a backend ended with them in flight
/// (count, process-wide).
pub static LEAKED_OPS: AtomicU64 = AtomicU64::new(0);

/// Submits what is queued and waits for `want` CQEs (0 or 1) at most `timeout`
/// (io_uring_enter(2) with `IORING_ENTER_EXT_ARG`, 5.11, for the timeout).
///
/// # Errors
/// io_uring_enter(2) failed with anything but EINTR, EBUSY (the CQ is full:
/// reap first) or ETIME (the timeout passed).
pub(crate) fn enter(ring: &mut IoUring, want: usize, timeout: Option<Duration>) -> io::Result<()> {
    let res = match timeout {
        Some(d) if want > 0 => {
            let ts = types::Timespec::from(d);
            let args = types::SubmitArgs::new().timespec(&ts);
            ring.submitter().submit_with_args(want, &args)
        }
        _ => ring.submit_and_wait(want),
    };
    match res {
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EBUSY | libc::ETIME)
            ) =>
        {
            Err(e)
        }
        _ => Ok(()),
    }
}

/// One operation in flight: its token and the memory its SQE points at.
struct UOp {
    token: u64,
    op: Op,
}

/// Everything the kernel may touch: leaked as a whole if the backend ends with
/// operations in flight.
struct KernelMem {
    ring: IoUring,
    bufs: BufRing,
    /// Datagram buffers, made with the first datagram receive.
    udp_bufs: Option<BufRing>,
    /// The RECVMSG template (name and control sizes) every UDP receive points to.
    udp_msghdr: Box<libc::msghdr>,
    /// The multishot RECVMSG template of one-to-many SCTP sockets: no name, room
    /// for one SCTP_RCVINFO.
    many_msghdr: Box<libc::msghdr>,
    /// The operations in flight.
    ops: Slab<UOp>,
    /// Sockets whose `IORING_OP_CLOSE` is in flight: owned here until its CQE,
    /// then forgotten (never closed twice).
    closes: Slab<OwnedFd>,
    /// Entries that did not fit in the SQ.
    overflow: VecDeque<squeue::Entry>,
    /// Timespecs of send bounds (link timeouts), by bound; never shrunk while
    /// linked timeouts point at them.
    bounds: Vec<(Duration, Box<types::Timespec>)>,
}

/// The io_uring backend of one worker.
pub struct UringBackend {
    mem: ManuallyDrop<KernelMem>,
    multishot_accept: bool,
    multishot_recvmsg: bool,
    /// Sockets are closed with `IORING_OP_CLOSE` (the probe lists `CLOSE`, 5.6).
    ring_close: bool,
    /// Multishot `IORING_OP_RECV` for stream sockets (6.0; the probe's
    /// `multishot_recv`).
    multishot_recv: bool,
    /// A multishot `IORING_OP_RECV` takes a total byte limit (6.18; the probe's
    /// `multishot_recv_limit`).
    multishot_recv_limit: bool,
    /// The probe lists `IORING_OP_SPLICE` (5.7).
    splice: bool,
    /// [`Op::Splice`] runs splice(2) from the worker (at once, or on its poll's
    /// CQE) instead of an `IORING_OP_SPLICE` (`RINGRESS_URING_SPLICE=ring`
    /// turns it off).
    pub(super) splice_now: bool,
    /// splice(2) calls made at once since the last [`Backend::wait`] (count).
    splice_turn: usize,
    /// Cancels, link timeouts and splice polls whose CQE has not come yet (count).
    aux: usize,
    /// Events made without the kernel (a receive that could not be set up).
    done: Vec<Event>,
    /// Buffers were given back since the ring's tail was last published.
    unpublished: bool,
    /// CQEs copied out of the ring (user_data, result, flags), reused per wait.
    cqes: Vec<(u64, i32, u32)>,
    /// Tests: once this is set, `wait` fails with EIO (an `io_uring_enter`
    /// error) without reaping anything.
    #[cfg(test)]
    pub fail_wait: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl UringBackend {
    /// A ring with the setup flags the probe chose, a provided-buffer ring, and
    /// the probe's answers on multishot accept, RECVMSG and RECV.
    ///
    /// # Errors
    /// io_uring_setup(2) failed, or registering the buffer ring failed (Linux
    /// before 5.19).
    pub fn new(p: &UringProbe) -> io::Result<UringBackend> {
        let ring = p.setup.builder().build(RING_ENTRIES)?;
        let bufs = BufRing::new(&ring, BUF_COUNT, BUF_SIZE, BGID).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("registering a provided-buffer ring (Linux 5.19+) failed: {e}"),
            )
        })?;
        // SAFETY: an all-zero msghdr is valid; only the two sizes are set.
        let mut udp_msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        udp_msghdr.msg_namelen = udp::NAME_SPACE as _;
        udp_msghdr.msg_controllen = udp::CONTROL_SPACE as _;
        // SAFETY: as above.
        let mut many_msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        many_msghdr.msg_controllen = (crate::sctp::RECV_CONTROL_WORDS * 8) as _;
        Ok(UringBackend {
            mem: ManuallyDrop::new(KernelMem {
                ring,
                bufs,
                udp_bufs: None,
                udp_msghdr,
                many_msghdr,
                ops: Slab::default(),
                closes: Slab::default(),
                overflow: VecDeque::new(),
                bounds: Vec::new(),
            }),
            multishot_accept: p.multishot_accept,
            multishot_recvmsg: p.multishot_recvmsg,
            ring_close: p.opcodes.contains(&"CLOSE"),
            multishot_recv: p.multishot_recv,
            multishot_recv_limit: p.multishot_recv_limit,
            splice: p.opcodes.contains(&"SPLICE"),
            splice_now: std::env::var("RINGRESS_URING_SPLICE").map_or(true, |v| v != "ring"),
            splice_turn: 0,
            aux: 0,
            done: Vec::new(),
            unpublished: false,
            cqes: Vec::with_capacity(256),
            #[cfg(test)]
            fail_wait: None,
        })
    }

    fn push(&mut self, e: squeue::Entry) {
        let m = &mut *self.mem;
        if !m.overflow.is_empty() {
            m.overflow.push_back(e);
            return;
        }
        // SAFETY: every buffer an entry points to (send bytes, SCTP messages and
        // their boxed headers, connect addresses, msghdr templates, timespecs) is
        // owned by `self.mem` until the entry's last CQE, and leaked with it if
        // the backend ends first.
        if unsafe { m.ring.submission().push(&e) }.is_err() {
            m.overflow.push_back(e);
        }
    }

    fn flush_overflow(&mut self) {
        let m = &mut *self.mem;
        while let Some(e) = m.overflow.front() {
            // SAFETY: as in `push`.
            if unsafe { m.ring.submission().push(e) }.is_err() {
                break;
            }
            m.overflow.pop_front();
        }
    }

    /// The timespec of a send bound `d`, made once per distinct bound.
    fn bound_ts(&mut self, d: Duration) -> *const types::Timespec {
        let b = &mut self.mem.bounds;
        if let Some((_, ts)) = b.iter().find(|(x, _)| *x == d) {
            return &**ts;
        }
        b.push((d, Box::new(types::Timespec::from(d))));
        &*b[b.len() - 1].1
    }

    fn ring_of(&self, group: u16) -> Option<&BufRing> {
        if group == BGID_UDP {
            self.mem.udp_bufs.as_ref()
        } else {
            Some(&self.mem.bufs)
        }
    }
}

impl Backend for UringBackend {
    fn caps(&self) -> Caps {
        Caps {
            multishot_sctp: self.multishot_recvmsg,
            multishot_recv: self.multishot_recv,
            multishot_recv_limit: self.multishot_recv_limit,
            recv_buf_size: BUF_SIZE,
            splice: self.splice,
        }
    }

    fn submit(&mut self, token: u64, op: Op) -> OpId {
        if let Op::RecvMulti {
            kind: MultiKind::Datagram,
            ..
        } = op
        {
            if self.mem.udp_bufs.is_none() {
                let m = &mut *self.mem;
                match BufRing::new(&m.ring, UDP_BUF_COUNT, UDP_BUF_SIZE, BGID_UDP) {
                    Ok(b) => m.udp_bufs = Some(b),
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(libc::ENOMEM);
                        tracing::error!(error = %e, "cannot register the datagram buffer ring");
                        self.done.push(Event::new(token, -errno, false));
                        return OpId(u64::MAX);
                    }
                }
            }
        }
        let mut op = op;
        if let Op::Splice {
            fd_in,
            fd_out,
            len,
            sock,
            poll_first,
        } = &mut op
        {
            if self.splice_now && !*poll_first && self.splice_turn < SPLICE_NOW_BUDGET {
                self.splice_turn += 1;
                // splice(2) at once, as epoll does (an IORING_OP_SPLICE always
                // goes through an io-wq worker); the ring only polls the socket
                // when it had no room (then the poll's CQE runs the splice).
                // The event goes with this turn's others.
                match crate::driver::pipe::splice_nonblock(*fd_in, *fd_out, *len) {
                    Err(libc::EAGAIN) if *sock == SpliceSock::Out => *poll_first = true,
                    r => {
                        let res = r.unwrap_or_else(|errno| -errno);
                        self.done.push(Event::new(token, res, false));
                        return OpId(u64::MAX);
                    }
                }
            }
        }
        let poll = match &op {
            Op::Splice {
                sock,
                poll_first: true,
                ..
            } if !self.splice_now => Some((op.fd(), *sock)),
            _ => None,
        };
        let k = self.mem.ops.insert(UOp { token, op });
        if let Some((fd, sock)) = poll {
            // Wait for the socket first: a one-shot poll linked to the splice
            // (IOSQE_IO_LINK); the splice runs once it fires, and ends with
            // -ECANCELED if it is cancelled. Its own CQE is counted in `aux`.
            let mask = match sock {
                SpliceSock::In => libc::POLLIN,
                SpliceSock::Out => libc::POLLOUT,
            };
            let e = opcode::PollAdd::new(types::Fd(fd), mask as u32)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(super::slab::token(UD_SPLICE_POLL, k));
            self.aux += 1;
            self.push(e);
        }
        if let Some((e, bound)) = self.entry(k) {
            self.push(e);
            if let Some(d) = bound {
                let ts = self.bound_ts(d);
                let lt = opcode::LinkTimeout::new(ts)
                    .build()
                    .user_data(super::slab::token(UD_LINK_TIMEOUT, k));
                self.aux += 1;
                self.push(lt);
            }
        }
        OpId(super::slab::token(UD_OP, k))
    }

    fn cancel(&mut self, id: OpId) {
        let (kind, k) = super::slab::untoken(id.0);
        let Some(uop) = self.mem.ops.get(k).filter(|_| kind == UD_OP) else {
            return;
        };
        let linked = !self.splice_now
            && matches!(
                uop.op,
                Op::Splice {
                    poll_first: true,
                    ..
                }
            );
        if linked {
            // A splice still behind its poll is not found by a cancel of its
            // own: cancel the poll, which ends the splice with -ECANCELED.
            let e = opcode::AsyncCancel::new(super::slab::token(UD_SPLICE_POLL, k))
                .build()
                .user_data(super::slab::token(UD_CANCEL, k));
            self.aux += 1;
            self.push(e);
        }
        let e = opcode::AsyncCancel::new(id.0)
            .build()
            .user_data(super::slab::token(UD_CANCEL, k));
        self.aux += 1;
        self.push(e);
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_wait.as_ref().is_some_and(|f| f.load(Relaxed)) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.splice_turn = 0;
        if std::mem::take(&mut self.unpublished) {
            self.mem.bufs.publish();
            if let Some(b) = &self.mem.udp_bufs {
                b.publish();
            }
        }
        self.flush_overflow();
        // Entries still waiting for SQ room, or events already made: submit
        // without waiting for a CQE.
        let want = usize::from(self.mem.overflow.is_empty() && self.done.is_empty());
        enter(&mut self.mem.ring, want, timeout)?;
        out.append(&mut self.done);
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.mem
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &cqes {
            if let Some(ev) = self.event(ud, res, flags) {
                out.push(ev);
            }
        }
        cqes.clear();
        self.cqes = cqes;
        Ok(())
    }

    fn ready(&mut self, out: &mut Vec<Event>) {
        out.append(&mut self.done);
    }

    fn data(&self, b: BufRef) -> &[u8] {
        match self.ring_of(b.group) {
            Some(r) => {
                let all = r.data(b.id, (b.off + b.len) as usize);
                &all[(b.off as usize).min(all.len())..]
            }
            None => &[],
        }
    }

    fn release(&mut self, b: BufRef) {
        let m = &mut *self.mem;
        let ring = if b.group == BGID_UDP {
            m.udp_bufs.as_mut()
        } else {
            Some(&mut m.bufs)
        };
        if let Some(r) = ring {
            r.push(b.id);
            self.unpublished = true;
        }
    }

    /// `IORING_OP_CLOSE` where the kernel has it (5.6), submitted with the next
    /// [`Backend::wait`]; close(2) now otherwise.
    fn close(&mut self, fd: OwnedFd) {
        if !self.ring_close {
            drop(fd);
            return;
        }
        let raw = fd.as_raw_fd();
        let k = self.mem.closes.insert(fd);
        let e = opcode::Close::new(types::Fd(raw))
            .build()
            .user_data(super::slab::token(UD_CLOSE, k));
        self.push(e);
    }

    fn in_flight(&self) -> usize {
        self.mem.ops.len() + self.mem.closes.len() + self.aux
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        let left = self.in_flight();
        if left > 0 {
            // The kernel may still write into what these operations point at (an
            // io-wq worker may be running one): leak the ring, its buffers and the
            // operations rather than free memory the kernel may use.
            LEAKED_OPS.fetch_add(left as u64, Relaxed);
            tracing::warn!(
                in_flight = left,
                "io_uring backend ended with operations in flight; their memory is leaked"
            );
            return;
        }
        // SAFETY: nothing is in flight, and `mem` is not used after this. Fields
        // drop in declaration order: the ring before the buffers it points to.
        unsafe { ManuallyDrop::drop(&mut self.mem) };
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Whether `peer` sees the other end closed (EOF); `false` while it is open.
    fn peer_closed(peer: &mut UnixStream) -> bool {
        use std::io::Read;
        let mut b = [0u8; 1];
        match peer.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("read: {e}"),
        }
    }

    #[test]
    fn close_goes_through_the_ring_and_ends_with_its_cqe() {
        let p = probe().as_ref().expect("io_uring");
        if !p.opcodes.contains(&"CLOSE") {
            return;
        }
        let mut b = UringBackend::new(p).expect("ring");
        let (ours, mut peer) = UnixStream::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        b.close(OwnedFd::from(ours));
        assert_eq!(b.in_flight(), 1, "the close is in flight until its CQE");
        assert!(!peer_closed(&mut peer), "closed before the submit");
        let mut out = Vec::new();
        b.wait(Some(Duration::from_secs(2)), &mut out).unwrap();
        assert!(out.is_empty(), "a close makes no event: {out:?}");
        assert_eq!(b.in_flight(), 0);
        assert!(peer_closed(&mut peer));
    }

    #[test]
    fn without_the_close_opcode_close_is_close2() {
        let mut p = probe().as_ref().expect("io_uring").clone();
        p.opcodes.retain(|o| *o != "CLOSE");
        let mut b = UringBackend::new(&p).expect("ring");
        let (ours, mut peer) = UnixStream::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        b.close(OwnedFd::from(ours));
        assert_eq!(b.in_flight(), 0);
        assert!(peer_closed(&mut peer));
    }

    /// Waits for the next event of the backend (at most 5 s).
    fn next(b: &mut UringBackend, out: &mut Vec<Event>) -> Event {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.is_empty() {
            assert!(std::time::Instant::now() < deadline, "no event");
            b.wait(Some(Duration::from_millis(100)), out).unwrap();
        }
        out.remove(0)
    }

    /// A multishot stream receive stays armed across receives; with a byte limit
    /// (where the kernel takes one, 6.18) the kernel ends it once that many bytes
    /// came, with the last bytes in its last event; a cancel ends it otherwise.
    #[test]
    fn multishot_stream_receive_ends_at_its_limit_or_cancel() {
        // As probed, and as on a kernel without the limit (6.0-6.17).
        for disabled in ["", "multishot_recv_limit"] {
            let p = probe_with(false, &parse_disable(disabled)).expect("io_uring");
            if p.multishot_recv {
                limit_or_cancel(&p);
            }
        }
    }

    fn limit_or_cancel(p: &UringProbe) {
        let mut b = UringBackend::new(p).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        let mut out = Vec::new();
        for limit in [1000u32, 0] {
            let kind = MultiKind::Stream { limit };
            let id = b.submit(
                7,
                Op::RecvMulti {
                    fd: rx.as_raw_fd(),
                    kind,
                },
            );
            let mut got = 0;
            for _ in 0..2 {
                tx.write_all(&[1u8; 600]).unwrap();
                let ev = next(&mut b, &mut out);
                assert_eq!((ev.token, ev.res), (7, 600), "{ev:?}");
                got += ev.res as u32;
                let buf = ev.buf.expect("bytes in a buffer");
                assert_eq!(b.data(buf), &[1u8; 600][..]);
                b.release(buf);
                let ended = limit > 0 && got >= limit && p.multishot_recv_limit;
                assert_eq!(ev.more, !ended, "limit {limit}, {got} bytes: {ev:?}");
            }
            if limit == 0 || !p.multishot_recv_limit {
                b.cancel(id);
                let ev = next(&mut b, &mut out);
                assert_eq!((ev.res, ev.more), (-libc::ECANCELED, false), "{ev:?}");
            }
            // Nothing in flight but the cancel's own CQE, reaped on the next wait.
            assert_eq!(b.mem.ops.len(), 0);
        }
    }
}
