//! The contract between the worker (`driver::worker`) and an I/O backend.
//!
//! The worker decides what to do; a backend only does it. The worker starts
//! operations ([`Op`]) on sockets it owns, each tagged with a 64-bit token (what the
//! operation is for: which session, which side), and the backend reports how each
//! one ended ([`Event`]). The io_uring backend turns an [`Op`] into an SQE and a CQE
//! into an [`Event`]; the epoll backend performs the same operation with a
//! non-blocking syscall, waits for readiness only after EAGAIN, and reports the
//! same event. This is the shape of mio's `Selector` turned completion-style, as
//! compio's ops are: one operation defined once, implemented per backend.
//!
//! # Ownership of kernel-visible memory
//! Everything the kernel may read or write while an operation is in flight (the
//! bytes of a send, an SCTP message and its `msghdr`, a connect address) is moved
//! *into* the [`Op`] when it starts and handed back in the [`Event`] that ends it
//! ([`Owned`]). Until then only the backend holds it, and a backend never frees it
//! while the kernel may still use it: a backend dropped with operations in flight
//! (after an `io_uring_enter` error, or while a panic unwinds) leaks that memory
//! instead. Receive buffers belong to the backend (a provided-buffer ring, or a
//! free list of the same size): an event lends one ([`BufRef`]) until the worker
//! gives it back with [`Backend::release`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use crate::proto::OutMessage;
use crate::sctp::{MsgInfo, RecvHeader, SendHeader};

/// Identifies one operation started with [`Backend::submit`], for
/// [`Backend::cancel`]. Unique while the operation is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpId(pub(crate) u64);

/// What a multishot receive of datagrams reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiKind {
    /// UDP: each datagram with its source address and destination (IP_PKTINFO).
    Datagram,
    /// A one-to-many SCTP socket: each message piece with SCTP_RCVINFO.
    SctpMany,
    /// A stream socket (TCP): bytes, as [`Op::Recv`] gives them, one event per
    /// filled buffer; `res` 0 (end of stream) ends it. Only where
    /// [`Caps::multishot_recv`] says so.
    Stream {
        /// End the receive (last event without `more`, carrying bytes) once it
        /// has taken this many bytes or more (the last buffer may pass it by
        /// less than [`Caps::recv_buf_size`]); 0: no limit. Only where
        /// [`Caps::multishot_recv_limit`] says so.
        limit: u32,
    },
}

/// One operation on a socket the worker owns (the fd stays open until the
/// operation's last event).
#[derive(Debug)]
pub enum Op {
    /// Accept connections on a listening socket, as non-blocking, close-on-exec
    /// sockets (`accept4(2)` flags `SOCK_NONBLOCK | SOCK_CLOEXEC`). With
    /// `multishot`: one event per connection (`res` = the new fd) while `more`;
    /// the op ends on an error that pauses accepting (EMFILE, ENFILE, ENOBUFS,
    /// ENOMEM) or on cancel. Without: one connection (or error), then the op ends;
    /// the worker asks for it near a cap, where a multishot accept could take a
    /// whole accept queue before it is cancelled.
    Accept {
        /// The listening socket.
        fd: RawFd,
        /// Go on accepting until cancelled (else: one connection).
        multishot: bool,
    },
    /// Readable-poll of an eventfd (the worker's wake-up). Multishot: one event per
    /// wake-up; the worker drains the eventfd.
    PollIn {
        /// The eventfd.
        fd: RawFd,
    },
    /// Receive bytes from a stream socket into a backend buffer. One event:
    /// `res` > 0 bytes in [`Event::buf`], 0 end of stream, < 0 errno (ENOBUFS:
    /// no buffer was free, which is back-pressure).
    Recv {
        /// The socket.
        fd: RawFd,
        /// The last receive on it was short, so it is probably empty: wait for
        /// readiness before trying (io_uring `IORING_RECVSEND_POLL_FIRST`, 5.19).
        poll_first: bool,
    },
    /// Receive one SCTP message piece (recvmsg(2)) into a backend buffer, with
    /// the socket's header memory. One event; [`Meta::Message`] holds the flags
    /// and SCTP_RCVINFO; the header comes back in [`Owned::RecvHeader`].
    RecvMsg {
        /// The SCTP socket.
        fd: RawFd,
        /// Its recvmsg header, moved in for the operation.
        hdr: Box<RecvHeader>,
    },
    /// Receive datagrams, one-to-many SCTP pieces or stream bytes, one event
    /// each (multishot while `more`), with [`Meta::Datagram`], [`Meta::Message`]
    /// or nothing ([`MultiKind::Stream`]). It ends with an event without `more`:
    /// end of stream (`res` 0), an error, -ENOBUFS (no buffer was free:
    /// back-pressure), -ECANCELED (cancelled); that last event may still carry
    /// bytes (`res` > 0), which count like any other. Until a cancel lands the
    /// receive goes on taking bytes, so a worker that stops wanting data takes
    /// at most what the backend's buffers hold past that point
    /// ([`Caps::recv_buf_size`] × the buffers in its pool).
    RecvMulti {
        /// The socket.
        fd: RawFd,
        /// What it carries.
        kind: MultiKind,
    },
    /// Send `buf[off..]` (`MSG_NOSIGNAL`). One event: `res` = bytes sent (maybe
    /// short), or -errno; the buffer comes back in [`Owned::Bytes`].
    Send {
        /// The socket.
        fd: RawFd,
        /// The bytes, owned by the operation until its event.
        buf: Vec<u8>,
        /// Where in `buf` the send starts (bytes).
        off: usize,
    },
    /// Send one whole SCTP message (sendmsg(2) with SCTP_SNDINFO). One event:
    /// `res` >= 0 sent, -EAGAIN no room now (nothing sent), -ECANCELED the wait
    /// for room passed `bound`, other -errno failed. Message and header come back
    /// in [`Owned::Message`].
    SendMsg {
        /// The SCTP socket.
        fd: RawFd,
        /// The message, owned by the operation until its event.
        msg: OutMessage,
        /// The socket's sendmsg header, moved in for the operation.
        hdr: Box<SendHeader>,
        /// The longest a send may wait for room before it is cancelled (io_uring
        /// link timeout, 5.5); `None`: no bound. epoll never waits (EAGAIN).
        bound: Option<Duration>,
    },
    /// Move up to `len` bytes from `fd_in` to `fd_out` with splice(2)
    /// (`SPLICE_F_NONBLOCK | SPLICE_F_MOVE`), one of them a pipe, the other a
    /// socket (`sock` says which). One event: `res` > 0 bytes moved, 0 end of
    /// stream (socket → pipe only), -EAGAIN nothing could move now (the socket
    /// had no bytes or no room, or the pipe was full), other -errno failed.
    /// Both backends try splice(2) first (io_uring: unless `poll_first`) and,
    /// after EAGAIN, wait for the socket themselves where the EAGAIN can only
    /// be the socket's (pipe → socket, or `poll_first`); otherwise (socket →
    /// pipe: the pipe may be full) they report it. io_uring waits with an
    /// `IORING_OP_POLL_ADD` linked to an `IORING_OP_SPLICE` (5.7), and may
    /// report an EAGAIN of that splice too. No memory is owned: only the two
    /// fds, which stay open until the event.
    Splice {
        /// Where the bytes come from: a socket or a pipe's read end.
        fd_in: RawFd,
        /// Where they go: a pipe's write end or a socket.
        fd_out: RawFd,
        /// Most bytes to move (bytes, > 0).
        len: u32,
        /// Which end is the socket (the one waited on).
        sock: SpliceSock,
        /// Wait until the socket is ready (readable for [`SpliceSock::In`],
        /// writable for [`SpliceSock::Out`]) before trying.
        poll_first: bool,
    },
    /// Connect a non-blocking socket to `addr`. One event: `res` 0 or -errno.
    Connect {
        /// The socket.
        fd: RawFd,
        /// The destination, owned by the operation until its event.
        addr: Box<socket2::SockAddr>,
    },
}

/// Which end of an [`Op::Splice`] is the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceSock {
    /// `fd_in`: socket → pipe (wait for readable).
    In,
    /// `fd_out`: pipe → socket (wait for writable).
    Out,
}

impl Op {
    /// The socket the operation is on (of a splice: its socket end).
    pub fn fd(&self) -> RawFd {
        match self {
            Op::Splice {
                fd_in,
                fd_out,
                sock,
                ..
            } => match sock {
                SpliceSock::In => *fd_in,
                SpliceSock::Out => *fd_out,
            },
            Op::Accept { fd, .. }
            | Op::PollIn { fd }
            | Op::Recv { fd, .. }
            | Op::RecvMsg { fd, .. }
            | Op::RecvMulti { fd, .. }
            | Op::Send { fd, .. }
            | Op::SendMsg { fd, .. }
            | Op::Connect { fd, .. } => *fd,
        }
    }

    /// Ends the operation: the memory it owned, to hand back with its last event.
    pub fn into_owned(self) -> Owned {
        match self {
            Op::Send { buf, .. } => Owned::Bytes(buf),
            Op::SendMsg { msg, hdr, .. } => Owned::Message(msg, hdr),
            Op::RecvMsg { hdr, .. } => Owned::RecvHeader(hdr),
            Op::Connect { addr, .. } => Owned::Addr(addr),
            Op::Accept { .. }
            | Op::PollIn { .. }
            | Op::Recv { .. }
            | Op::RecvMulti { .. }
            | Op::Splice { .. } => Owned::None,
        }
    }
}

/// Memory an operation owned, handed back with its last event.
#[derive(Debug)]
pub enum Owned {
    /// Nothing (accept, polls, receives into backend buffers).
    None,
    /// The buffer of an [`Op::Send`].
    Bytes(Vec<u8>),
    /// The message and header of an [`Op::SendMsg`].
    Message(OutMessage, Box<SendHeader>),
    /// The header of an [`Op::RecvMsg`].
    RecvHeader(Box<RecvHeader>),
    /// The address of an [`Op::Connect`].
    Addr(Box<socket2::SockAddr>),
}

/// A receive buffer lent by the backend with an event: read it with
/// [`Backend::data`], give it back with [`Backend::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufRef {
    /// Which pool (backend-defined).
    pub group: u16,
    /// Which buffer in the pool.
    pub id: u16,
    /// Where the payload starts in it (bytes).
    pub off: u32,
    /// Payload length (bytes).
    pub len: u32,
}

/// What a receive learned besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Meta {
    /// Nothing more.
    #[default]
    None,
    /// A datagram's addresses.
    Datagram {
        /// Its source (`None` if the kernel gave none).
        from: Option<SocketAddr>,
        /// The address it was sent to (IP_PKTINFO / IPV6_PKTINFO), for replies.
        to: Option<IpAddr>,
        /// It did not fit the buffer (MSG_TRUNC).
        truncated: bool,
    },
    /// An SCTP piece: recvmsg flags (MSG_EOR, MSG_NOTIFICATION) and SCTP_RCVINFO.
    Message {
        /// `msg_flags`.
        flags: i32,
        /// Stream id, PPID, association.
        info: MsgInfo,
    },
}

/// How one operation (or one shot of a multishot operation) ended.
#[derive(Debug)]
pub struct Event {
    /// The token the operation was submitted with.
    pub token: u64,
    /// The result: >= 0 as the operation defines, < 0 a negated errno.
    pub res: i32,
    /// A multishot operation goes on (io_uring `IORING_CQE_F_MORE`): more events
    /// with this token follow. `false` on the last event of every operation.
    pub more: bool,
    /// The received bytes, if any.
    pub buf: Option<BufRef>,
    /// Addresses or SCTP info of a receive.
    pub meta: Meta,
    /// Memory the operation owned (last event only).
    pub owned: Owned,
}

impl Event {
    /// An event with only a token, a result and `more`.
    pub fn new(token: u64, res: i32, more: bool) -> Event {
        Event {
            token,
            res,
            more,
            buf: None,
            meta: Meta::None,
            owned: Owned::None,
        }
    }
}

/// What a backend can do, decided once at start (the io_uring probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// [`Op::RecvMulti`] with [`MultiKind::SctpMany`] is worth using (io_uring
    /// multishot RECVMSG, 6.0); otherwise one-to-many sockets use [`Op::RecvMsg`].
    pub multishot_sctp: bool,
    /// [`Op::RecvMulti`] with [`MultiKind::Stream`] is worth using for stream
    /// sockets (io_uring `IORING_RECV_MULTISHOT` on `IORING_OP_RECV`, 6.0):
    /// one armed receive per side instead of one per buffer.
    pub multishot_recv: bool,
    /// Such a receive takes [`MultiKind::Stream`]'s `limit` (io_uring
    /// `sqe->optlen` of a multishot `IORING_OP_RECV`, Linux 6.18).
    pub multishot_recv_limit: bool,
    /// Size of every receive buffer (bytes): a receive shorter than this drained
    /// the socket.
    pub recv_buf_size: usize,
    /// [`Op::Splice`] is available (epoll: splice(2), Linux 2.6.17; io_uring:
    /// the probe lists `IORING_OP_SPLICE`, 5.7).
    pub splice: bool,
}

/// An I/O backend: starts operations, reports their ends.
pub trait Backend {
    /// What this backend can do.
    fn caps(&self) -> Caps;

    /// Starts `op`; its events carry `token`. The backend owns what `op` holds
    /// until the last event hands it back.
    fn submit(&mut self, token: u64, op: Op) -> OpId;

    /// Asks operation `id` to end early. Its last event still comes (with
    /// -ECANCELED, or with its result if it finished first). Cancelling an
    /// operation that already ended does nothing.
    fn cancel(&mut self, id: OpId);

    /// Waits until at least one event is ready or `timeout` passes (`None`: no
    /// limit), then appends the ready events to `out`.
    ///
    /// # Errors
    /// The backend cannot go on (io_uring_enter(2) or epoll_wait(2) failed with
    /// something other than EINTR/EBUSY/ETIME); operations may still be in flight.
    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()>;

    /// Appends events that became ready without waiting (epoll: operations run
    /// at once by [`Backend::submit`]); called by the worker after handling a
    /// batch, so that a session's next step runs in the same turn.
    fn ready(&mut self, out: &mut Vec<Event>);

    /// The bytes of a lent receive buffer.
    fn data(&self, b: BufRef) -> &[u8];

    /// Gives a lent receive buffer back.
    fn release(&mut self, b: BufRef);

    /// Closes a socket the worker is done with (no operation on it is in flight).
    /// epoll: close(2) now. io_uring: an `IORING_OP_CLOSE` (5.6) that goes with
    /// the next [`Backend::wait`]'s submit, so the fd stays open (owned by the
    /// backend, counted in [`Backend::in_flight`]) until that turn's
    /// io_uring_enter(2); it makes no event (close(2) now where the kernel lacks
    /// the opcode: no kernel with provided-buffer rings, 5.19, does). Also under
    /// `RINGRESS_URING_SETUP=plain`, whose 6.1-era path has the opcode.
    fn close(&mut self, fd: OwnedFd);

    /// Stops watching a socket the worker is done with but other workers still
    /// hold open under the same fd number (a shared listener socket,
    /// [`crate::driver::ListenerFd::Shared`]); no operation on it is in flight.
    /// epoll takes it out of its set (EPOLL_CTL_DEL: closing this worker's hold
    /// would not, while the file stays open, epoll(7) "Q6"); io_uring has nothing
    /// to undo.
    fn forget(&mut self, _fd: RawFd) {}

    /// Operations started and not ended yet (count).
    fn in_flight(&self) -> usize;
}
